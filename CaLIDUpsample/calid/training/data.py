"""Training data: short-axis stacks found in folders, a patient-level split, and random batches.

Reading image files needs SimpleITK, which is imported only where files are read: the samplers, and stacks read
from a pack (``calid.training.pack``), work on a machine without it, such as the GPU machine this project is lent.

The samplers draw from their own ``torch.Generator``, whose state is saved in checkpoints, so a resumed
run sees exactly the batches the interrupted run would have seen.
"""

from __future__ import annotations

import copy
import json
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import CalidError
from ..intensity import IntensityMap

THIN_SLICE_MM = 6.0


@dataclass
class Volume:
    """One 3D stack, normalised for the network, with the slice axis first: (slices, rows, cols)."""

    patient: str
    path: str
    stack: np.ndarray
    slice_spacing: float


def find_volumes(folders: list[str | Path]) -> list[tuple[str, Path]]:
    """``(patient, file)`` for every image under the folders; label files are skipped by name.

    The patient is the first sub-folder below the given folder (ACDC's ``patientNNN/``), or the file's
    own name for files directly in it (Sunnybrook's ``SCDxxxxxxx_sa_cine.nii.gz``).
    """
    from ..imageio import FILE_SUFFIXES, has_image_suffix, is_label_file

    found = []
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise CalidError(f"data folder not found: {folder}")
        files = sorted(Path(root) / name for root, _, names in os.walk(folder, followlinks=True) for name in names)
        for path in files:
            if not has_image_suffix(path) or is_label_file(path):
                continue
            rel = path.relative_to(folder)
            patient = rel.parts[0] if len(rel.parts) > 1 else _strip_suffix(path.name)
            found.append((patient, path))
    if not found:
        raise CalidError(f"no volumes ({', '.join(FILE_SUFFIXES)}) found in {', '.join(map(str, folders))}")
    return found


def _strip_suffix(name: str) -> str:
    from ..imageio import FILE_SUFFIXES

    for suffix in FILE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def patient_group(path: Path) -> str:
    """The pathology group from an ACDC-style ``Info.cfg`` beside the volume, else ``unknown``."""
    info = path.parent / "Info.cfg"
    if info.is_file():
        for line in info.read_text(encoding="utf-8").splitlines():
            if line.lower().startswith("group:"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def split_patients(volumes: list[tuple[str, Path]], val_fraction: float, seed: int,
                   thin_spacings: dict[str, bool]) -> dict[str, list[str]]:
    """Stratified by group; at least 3 thin-slice patients go to validation (but no more than the share of all, and
    not every one of them). Patients that share a scan (``duplicates``: ACDC files one scan twice) are split as one,
    on the side of the first of them."""
    from . import duplicates

    follows = {p: min(group) for group in duplicates.same_scan_groups(volumes) for p in group if p != min(group)}
    split = _split_distinct(volumes, val_fraction, seed, thin_spacings, set(follows))
    for patient, first in follows.items():
        split["validation" if first in split["validation"] else "train"].append(patient)
    return {side: sorted(patients) for side, patients in split.items()}


def _split_distinct(volumes: list[tuple[str, Path]], val_fraction: float, seed: int, thin_spacings: dict[str, bool],
                    copies: set[str]) -> dict[str, list[str]]:
    """``split_patients`` of the patients other than ``copies`` (those whose scans another patient holds too)."""
    patients = sorted({p for p, _ in volumes} - copies)
    if len(patients) < 2 or val_fraction <= 0:
        return {"train": patients, "validation": []}
    group_of = {p: patient_group(path) for p, path in volumes if p not in copies}
    rng = np.random.default_rng(seed)
    by_group: dict[str, list[str]] = defaultdict(list)
    for p in rng.permutation(patients).tolist():
        by_group[group_of[p]].append(p)
    thin = [p for p in patients if thin_spacings.get(p)]
    # At least 3 thin-slice patients validate (ACDC has 12 in 100: a share of them would be one or two), but never
    # more than the share of all patients, nor all of them: a site fine-tuning on a few 5 mm stacks keeps its share.
    most = max(1, round(val_fraction * len(patients)))
    thin_quota = min(max(3, round(val_fraction * len(thin))), most, max(len(thin) - 1, 0))
    validation: list[str] = []
    groups = sorted(by_group)
    while sum(p in validation for p in thin) < thin_quota:  # round-robin over groups for thin patients
        for g in groups:
            pick = next((p for p in by_group[g] if thin_spacings.get(p) and p not in validation), None)
            if pick and sum(p in validation for p in thin) < thin_quota:
                validation.append(pick)
    for g in groups:  # every group of two or more patients is seen in validation; a lone patient trains
        quota = max(1 if len(by_group[g]) > 1 else 0, round(val_fraction * len(by_group[g])))
        for p in by_group[g]:
            if sum(q in validation for q in by_group[g]) >= quota:
                break
            if p not in validation:
                validation.append(p)
    if not validation:  # every group a lone patient (a few patients of a few pathologies): still one
        validation.append(by_group[groups[0]][0])
    train = [p for p in patients if p not in validation]
    if not train:
        raise CalidError("validation split leaves no training patients: lower --val-fraction")
    return {"train": train, "validation": sorted(validation)}


def load_split(path: Path) -> dict[str, list[str]]:
    """A ``split.json`` written by training, or a model card (``model.json``), whose split is under ``training``."""
    try:
        content = json.loads(Path(path).read_text(encoding="utf-8"))
        split = content.get("training", {}).get("split", content)
        return {"train": list(split["train"]), "validation": list(split["validation"])}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CalidError(f"{path} is not a split file or model card with train/validation lists ({exc})") from None


def load_volumes(entries: list[tuple[str, Path]]) -> list[Volume]:
    """Read each file; a 4D cine gives one stack per phase. Stacks with fewer than 3 slices (and 2D images) are
    dropped."""
    import SimpleITK as sitk

    from ..geometry import find_slice_axis, to_stack
    from ..imageio import read_image

    volumes = []
    for patient, path in entries:
        image = read_image(path)
        if image.GetDimension() < 3:
            continue
        frames = [image[:, :, :, t] for t in range(image.GetSize()[3])] if image.GetDimension() == 4 else [image]
        for frame in frames:
            axis = find_slice_axis(frame)
            array = sitk.GetArrayFromImage(frame).astype(np.float32)
            stack = to_stack(array, axis)
            if stack.shape[0] < 3:
                continue
            normalised = np.ascontiguousarray(IntensityMap.fit(stack).to_network(stack))
            volumes.append(Volume(patient, str(path), normalised, frame.GetSpacing()[axis]))
    return volumes


def validation_order(volumes: list[Volume]) -> list[Volume]:
    """Validation stacks in the order whose first ``val_volumes`` the trainer validates on: thin-slice stacks (the
    clinical 10 mm gaps) first, then by patient and file."""
    return sorted(volumes, key=lambda v: (v.slice_spacing > THIN_SLICE_MM, v.patient, v.path))


def _crop_origin(size: int, crop: int, generator: torch.Generator, jitter: float = 0.25) -> int:
    """Crops are centred on the middle of the slice (where SAX acquisitions put the heart), with jitter."""
    if size <= crop:
        return 0
    centre = (size - crop) / 2
    spread = min(jitter * size, centre)
    offset = (torch.rand((), generator=generator).item() * 2 - 1) * spread
    return int(round(centre + offset))


def pad_to(x: torch.Tensor, size: int, value: float) -> torch.Tensor:
    ph, pw = max(size - x.shape[-2], 0), max(size - x.shape[-1], 0)
    if ph or pw:
        x = torch.nn.functional.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=value)
    return x


def dihedral(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    k = int(torch.randint(4, (), generator=generator))
    x = torch.rot90(x, k, dims=(-2, -1))
    return x.flip(-1) if torch.rand((), generator=generator) < 0.5 else x


def intensity_jitter(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Small gamma and contrast changes of a slice in the network range [-1, 1] (scanner-to-scanner variation)."""
    unit = ((x + 1) / 2).clamp_min(0)
    gamma = float(torch.empty(()).uniform_(0.8, 1.25, generator=generator))
    contrast = float(torch.empty(()).uniform_(0.9, 1.1, generator=generator))
    return unit.pow(gamma) * contrast * 2 - 1


class SliceSampler:
    """Random single slices for the VAE: crops, flips/rotations, small gamma and contrast changes."""

    def __init__(self, volumes: list[Volume], crop: int, generator: torch.Generator):
        self.slices = [torch.from_numpy(s) for v in volumes for s in v.stack]
        self.crop = crop
        self.generator = generator

    def batch(self, size: int) -> torch.Tensor:
        g = self.generator
        out = []
        for i in torch.randint(len(self.slices), (size,), generator=g).tolist():
            s = pad_to(self.slices[i], self.crop, -1.0)
            y0, x0 = _crop_origin(s.shape[0], self.crop, g, 0.35), _crop_origin(s.shape[1], self.crop, g, 0.35)
            out.append(intensity_jitter(dihedral(s[y0:y0 + self.crop, x0:x0 + self.crop], g), g))
        return torch.stack(out)[:, None]


GAP_WEIGHTS = torch.tensor([0.6, 0.25, 0.15])
"""Gaps of 1-3 slices on each side of a target, small gaps more often: K=2 is the clinical case."""


def draw_triplet(n: int, generator: torch.Generator, endpoint_rate: float) -> tuple[int, int, int, float]:
    """Slice indices (below, target, above) of a stack of ``n`` slices and the target's fraction alpha.

    With probability ``endpoint_rate`` the target is one of the neighbours (alpha exactly 0 or 1), which teaches
    the network the endpoints that CaLID+ uses to invert the acquired slices.
    """
    g = generator
    gap_a, gap_b = (torch.multinomial(GAP_WEIGHTS, 2, replacement=True, generator=g) + 1).tolist()
    while gap_a + gap_b > n - 1:
        gap_a, gap_b = max(1, gap_a - 1), max(1, gap_b - 1)
    if torch.rand((), generator=g) < endpoint_rate:
        lo = int(torch.randint(n - gap_a, (), generator=g))
        hi = lo + gap_a
        at_top = bool(torch.rand((), generator=g) < 0.5)
        return (lo, hi, hi, 1.0) if at_top else (lo, lo, hi, 0.0)
    lo = int(torch.randint(n - gap_a - gap_b, (), generator=g))
    return lo, lo + gap_a, lo + gap_a + gap_b, gap_a / (gap_a + gap_b)


def crop_centred(x: torch.Tensor, crop: int, generator: torch.Generator, value: float) -> torch.Tensor:
    """Pad (..., H, W) to at least ``crop`` and cut a ``crop`` square near the middle (see ``_crop_origin``)."""
    x = pad_to(x, crop, value)
    y0 = _crop_origin(x.shape[-2], crop, generator)
    x0 = _crop_origin(x.shape[-1], crop, generator)
    return x[..., y0:y0 + crop, x0:x0 + crop]


class TripletSampler:
    """Random (below, target, above, alpha) latent crops from encoded stacks (``draw_triplet``)."""

    def __init__(self, latents: list[torch.Tensor], crop: int, generator: torch.Generator, endpoint_rate: float = 0.1):
        self.latents = [z for z in latents if z.shape[0] >= 3]
        self.crop = crop
        self.generator = generator
        self.endpoint_rate = endpoint_rate

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        g = self.generator
        triples, alphas = [], []
        for v in torch.randint(len(self.latents), (size,), generator=g).tolist():
            z = self.latents[v]
            lo, mid, hi, alpha = draw_triplet(z.shape[0], g, self.endpoint_rate)
            triples.append(crop_centred(z[[lo, mid, hi]], self.crop, g, float(z.min())))
            alphas.append(alpha)
        below, target, above = torch.stack(triples).unbind(1)
        return below, target, above, torch.tensor(alphas)


def with_generator(sampler, generator: torch.Generator):
    """``sampler`` (a ``TripletSampler`` or ``MotionTripletSampler``) drawing from ``generator`` instead, its stacks
    and flow cache shared: a second draw over the same triplets (the residual scale's, beside the training batches)
    estimates no flow twice."""
    twin = copy.copy(sampler)
    twin.generator = generator
    return twin


class MotionTripletSampler:
    """Random (warped below, target, warped above, alpha) image crops (N, 1, crop, crop) for motion-aware models.

    Both neighbours are warped along their optical flow (``calid.motion``, estimated on whole slices and cached)
    to the target's position before cropping, as ``generation.generate_missing_phases`` does at inference; the
    three crops then share one random 90-degree rotation/flip, so every orientation is seen without estimating
    flows eight times. The trainer encodes the crops with the frozen VAE.

    The flows here are one-view DIS even for a model that averages 8 views at inference (``motion.pair_flow``): a
    fine-tuning run draws thousands of different pairs (with 8 views the first fold of the Sunnybrook fine-tuning
    benchmark had not ended after 13 minutes on 2 shared cores, against 4-5 minutes a fold with one view). The
    bundled weights were trained on one-view warps and gain on 8-view ones (docs/measurements.md); 900 more
    steps on 8-view triplets scored the same as 900 more on one-view ones (heart PSNR 19.55 / 18.59 against
    19.55 / 18.60 with 10 / 20 mm gaps).
    """

    def __init__(self, volumes: list[Volume], crop: int, generator: torch.Generator, flow: str):
        self.stacks = [torch.from_numpy(v.stack) for v in volumes if v.stack.shape[0] >= 3]
        self.crop = crop
        self.generator = generator
        self.flow = flow
        self._flows: dict[tuple[int, int, int], torch.Tensor] = {}

    def _pair_flow(self, v: int, lo: int, hi: int) -> torch.Tensor:
        from ..motion import pair_flow

        if (v, lo, hi) not in self._flows:
            stack = self.stacks[v].numpy()
            self._flows[(v, lo, hi)] = torch.from_numpy(pair_flow(stack[lo], stack[hi], self.flow)).half()
        return self._flows[(v, lo, hi)].float()

    def estimate_all_flows(self) -> None:
        """Every flow ``batch`` can ask for (each stack's pairs 2 to ``2 * len(GAP_WEIGHTS)`` slices apart), estimated
        now and in parallel (``motion.pair_flows``, one thread per pair). A GPU run would otherwise wait for flows
        found one at a time as batches first draw them: thousands of pairs, minutes on one core."""
        from ..motion import pair_flows

        widest = 2 * len(GAP_WEIGHTS)
        for v, stack in enumerate(self.stacks):
            slices = stack.numpy()
            wanted = [(v, lo, lo + span) for span in range(2, widest + 1) for lo in range(len(slices) - span)
                      if (v, lo, lo + span) not in self._flows]
            if wanted:
                flows = pair_flows([(slices[lo], slices[hi]) for _, lo, hi in wanted], self.flow)
                self._flows.update({key: torch.from_numpy(f).half() for key, f in zip(wanted, flows)})

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        from ..motion import warped_neighbours

        g = self.generator
        triples, alphas = [], []
        for v in torch.randint(len(self.stacks), (size,), generator=g).tolist():
            stack = self.stacks[v]
            lo, mid, hi, alpha = draw_triplet(stack.shape[0], g, 0.0)
            below, above = warped_neighbours(stack[lo][None, None], stack[hi][None, None], self._pair_flow(v, lo, hi)[None],
                                             torch.tensor([alpha]))
            triple = torch.stack([below[0, 0], stack[mid], above[0, 0]])
            triples.append(dihedral(crop_centred(triple, self.crop, g, -1.0), g))
            alphas.append(alpha)
        below, target, above = torch.stack(triples)[:, :, None].unbind(1)
        return below, target, above, torch.tensor(alphas)


class EstimateSampler:
    """Random (estimate, warped below, warped above, target) image crops (N, 1, crop, crop), alpha and the gap in mm
    between the neighbours (N,): the examples of the pixel-space stages after generation, the refiner (``networks.Refiner``) and the error head (``ErrorHead``).

    The estimates are the model's own output for slices removed from each training stack (every other slice, both
    parities, K=2; every third from the first, K=3: 10-30 mm gaps), made once when the stage starts, unrefined for
    the refiner (``refine=False``: its training data is what it will see) and final for the error head, with the
    warped neighbours exactly as ``generation.generate_missing_phases`` makes them. Examples from thin-slice stacks
    (<= ``THIN_SLICE_MM``: the only 10 mm gaps, the clinical case, but 8 of ACDC's 85 training patients) are drawn
    ``thin_weight`` times as often.
    """

    REMOVALS = ((2, 0), (2, 1), (3, 0))  # (K, first kept slice)

    def __init__(self, model, volumes: list[Volume], crop: int, generator: torch.Generator, device, steps: int,
                 thin_weight: float = 1.0, refine: bool = False, on_volume: Callable[[], None] | None = None):
        from ..generation import GapItems, generate_missing

        self.crop = crop
        self.generator = generator
        self.items: list[tuple[torch.Tensor, float, float]] = []
        weights = []
        for v in volumes:
            for factor, first in self.REMOVALS:
                kept = np.ascontiguousarray(v.stack[first::factor])
                if len(kept) < 2:
                    continue
                gaps = GapItems(model, kept[None], factor, 1)  # its flows serve the estimate and the warped neighbours
                gap_mm = v.slice_spacing * factor
                estimate = generate_missing(model, kept, factor, steps, device=device, refine=refine,
                                            flows=gaps.flows, gap_mm=gap_mm)[0]
                wb, wa = (torch.from_numpy(gaps.crop(x)) for x in gaps.warped(slice(None)))
                for i, (b, a) in enumerate(zip(gaps.below.tolist(), gaps.alpha.tolist())):
                    target = torch.from_numpy(v.stack[first + b * factor + round(a * factor)])
                    self.items.append((torch.stack([torch.from_numpy(estimate[i]), wb[i], wa[i], target]).half(), float(a),
                                       gap_mm))
                    weights.append(thin_weight if v.slice_spacing <= THIN_SLICE_MM else 1.0)
            if on_volume is not None:  # minutes in all: the caller shows them as progress
                on_volume()
        self.weights = torch.tensor(weights, dtype=torch.float64)

    def whole_slices(self, multiple: int):
        """Every example uncropped, cut to a multiple of ``multiple`` in-plane (at most ``multiple - 1`` edge pixels
        lost, no padding to distort sums): (estimate, below, above, target) (1, 1, H, W), alpha, gap (1,)."""
        for item, alpha, gap_mm in self.items:
            h, w = item.shape[-2:]
            x = item.float()[:, None, None, : h - h % multiple, : w - w % multiple]
            yield (*x.unbind(0), torch.tensor([alpha]), torch.tensor([gap_mm]))

    def batch(self, size: int) -> tuple[torch.Tensor, ...]:
        g = self.generator
        crops, alphas, gaps = [], [], []
        for i in torch.multinomial(self.weights, size, replacement=True, generator=g).tolist():
            item, alpha, gap_mm = self.items[i]
            crops.append(dihedral(crop_centred(item.float(), self.crop, g, -1.0), g))
            alphas.append(alpha)
            gaps.append(gap_mm)
        estimate, below, above, target = torch.stack(crops)[:, :, None].unbind(1)
        return estimate, below, above, target, torch.tensor(alphas), torch.tensor(gaps)
