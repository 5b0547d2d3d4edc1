"""What a clinician reads off the product, against the experts: ventricular volumes, ejection fractions and
myocardial mass on unseen ACDC patients, as Bland-Altman bias and 95 % limits of agreement.

The removed-slice benchmarks score slices; a clinician reads volumes. For each validation patient of a model card
(less any scan that copies a training patient's), both phases the experts labelled (ED and ES, from ``Info.cfg``):

- **experts**: the manual labels, voxels counted on the acquired grid (what the other rows are compared with);
- **segmenter on the acquired slices**: ``calid segment``, the same grid;
- **CaLID x2 + segmentation**: ``calid upsample SAX DENSE --factor 2 --segmentation LABELS``, the product's one
  command; its dense grid spans first to last acquired slice centre, so it leaves out the half slice beyond each end
  that the acquired grid counts (README, Segmentation and volumes): its volumes are smaller by construction, its
  ejection fractions comparable;
- **experts' labels + CaLID x2**: ``--input-segmentation`` with the manual labels: the same dense grid with the
  experts' own outlines on the acquired slices, which separates the grid's half slices from the segmenter's errors.

    python Testing/Benchmarks/volumes_acdc.py --threads 2     # about 10 minutes on 2 cores

Differences are method minus experts; an ejection fraction in percentage points. A value the method could not give
(a cavity it did not find) is left out of that row and counted.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark_cli import model_or_error  # noqa: E402

from calid.engine import UpsampleOptions, upsample_file  # noqa: E402
from calid.evaluation import select_patients  # noqa: E402
from calid.imageio import read_image, validate_volume  # noqa: E402
from calid.modelindex import DEFAULT_MODEL  # noqa: E402
from calid.modelstore import resolve_model_dir  # noqa: E402
from calid.segmentation.inference import segment_image  # noqa: E402
from calid.segmentation.measures import ejection_fractions, structure_volumes  # noqa: E402
from calid.segmentation.store import load_segmenter  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
METHODS = ("segmenter on the acquired slices", "CaLID x2 + segmentation", "experts' labels + CaLID x2")
MEASURES = (("lv_cavity_ml", "ED", "LV end-diastolic volume (mL)"),
            ("lv_cavity_ml", "ES", "LV end-systolic volume (mL)"),
            ("lv_ejection_fraction_percent", None, "LV ejection fraction (points)"),
            ("rv_cavity_ml", "ED", "RV end-diastolic volume (mL)"),
            ("rv_cavity_ml", "ES", "RV end-systolic volume (mL)"),
            ("rv_ejection_fraction_percent", None, "RV ejection fraction (points)"),
            ("lv_myocardium_mass_g", "ED", "LV myocardial mass at ED (g)"))
"""(key, phase or None for a fraction, row label)."""


def phases(folder: Path) -> dict[str, Path]:
    """The ED and ES frames the experts labelled, from the patient's ``Info.cfg``."""
    info = dict(line.split(":", 1) for line in (folder / "Info.cfg").read_text().splitlines() if ":" in line)
    return {phase: folder / f"{folder.name}_frame{int(info[phase]):02d}.nii.gz" for phase in ("ED", "ES")}


def measures(ed: dict, es: dict) -> dict:
    """Both phases' volumes and both ventricles' ejection fractions (None where one cannot be given)."""
    fractions, _ = ejection_fractions(ed, es)
    return {"ED": ed, "ES": es, **fractions}


def value(report: dict, key: str, phase: str | None):
    return report[key] if phase is None else report[phase][key]


def patient_reports(folder: Path, model, network, card, scratch: Path) -> dict[str, dict]:
    """Every method's volumes and fractions for one patient (the experts' first)."""
    volumes = {name: {} for name in ("experts", *METHODS)}
    for phase, path in phases(folder).items():
        image = validate_volume(read_image(path), str(path))
        truth = path.with_name(path.name.replace(".nii.gz", "_gt.nii.gz"))
        volumes["experts"][phase] = structure_volumes(read_image(truth))
        volumes[METHODS[0]][phase] = structure_volumes(segment_image(image, network, card["config"]))
        for index, (method, given) in enumerate(((METHODS[1], None), (METHODS[2], truth))):
            stem = scratch / f"{folder.name}_{phase}_{index}"
            labels = stem.with_name(stem.name + "_labels.nii.gz")
            upsample_file(path, stem.with_name(stem.name + "_dense.nii.gz"), UpsampleOptions(factor=2, device="cpu"),
                          model=model, segmentation_path=labels, input_segmentation_path=given)
            volumes[method][phase] = structure_volumes(read_image(labels))
    return {name: measures(v["ED"], v["ES"]) for name, v in volumes.items()}


def agreement(reports: list[dict]) -> str:
    """The Markdown table: per method and measure, the experts' mean, bias, SD and 95 % limits of agreement."""
    lines = ["| measure | experts (mean) | method | bias | SD | 95 % limits of agreement | n |",
             "|---|---|---|---|---|---|---|"]
    for key, phase, label in MEASURES:
        truth = [value(r["experts"], key, phase) for r in reports]
        for method in METHODS:
            pairs = [(value(r[method], key, phase), t) for r, t in zip(reports, truth)
                     if value(r[method], key, phase) is not None and t is not None]
            differences = np.array([m - t for m, t in pairs])
            mean_truth = np.mean([t for _, t in pairs])
            bias = differences.mean()
            sd = differences.std(ddof=1) if len(pairs) > 1 else None  # one patient gives no spread
            limits = "–" if sd is None else f"{bias - 1.96 * sd:+.1f} to {bias + 1.96 * sd:+.1f}"
            missing = len(reports) - len(pairs)
            lines.append(f"| {label} | {mean_truth:.1f} | {method} | {bias:+.1f} | "
                         f"{'–' if sd is None else f'{sd:.1f}'} | {limits} | {len(pairs)}"
                         f"{f' ({missing} not given)' if missing else ''} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "acdc" / "training")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--patients", default=None,
                        help="a model card or split file (its validation patients) or a comma-separated list; "
                             "default: calid-acdc's validation patients")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write every patient's figures here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not args.data.is_dir():
        parser.error(f"no ACDC training folder at {args.data}")
    split = args.patients or str(resolve_model_dir("calid-acdc") / "model.json")
    selection = select_patients(split, [str(args.data)])
    folders = sorted(f for f in args.data.iterdir() if (f / "Info.cfg").is_file()
                     and (selection.wanted is None or f.name in selection.wanted))
    if not folders:
        parser.error(f"no patient of {split} in {args.data}")
    model, _ = model_or_error(parser, args.model)
    network, card = load_segmenter()
    reports = []
    with tempfile.TemporaryDirectory() as scratch:
        for folder in folders:
            reports.append({"patient": folder.name, **patient_reports(folder, model, network, card, Path(scratch))})
            print(f"{folder.name}: LV EF experts {reports[-1]['experts']['lv_ejection_fraction_percent']}, "
                  + ", ".join(f"{m} {reports[-1][m]['lv_ejection_fraction_percent']}" for m in METHODS),
                  file=sys.stderr, flush=True)
    print(f"{len(folders)} patients ({', '.join(f.name for f in folders)}), model {args.model}, "
          f"segmenter calid-seg-acdc; {selection.note() if selection.left_out else 'none left out'}\n")
    print(agreement(reports))
    if args.json:
        args.json.write_text(json.dumps(reports, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
