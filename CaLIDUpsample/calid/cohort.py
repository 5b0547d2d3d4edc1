"""Cohort mode: many inputs to an output folder, resumable, with a CSV of what was done.

Inputs come from a folder (its image files but label files, its sub-folders as DICOM series, or their image files
where they hold no series: ACDC's folder per patient) or a list file (one path per line). Each output keeps its
input's path below the inputs' common folder (``p1/sax.nii.gz`` and ``p2/sax.nii.gz`` of a list go to ``OUT/p1/``
and ``OUT/p2/``, a folder's files straight into ``OUT``). An output
that already exists is skipped, so an interrupted cohort is resumed by running the same command again; one that
the record says was made from another input or with other settings is refused before anything runs (it would
have been kept and reported as this input's). An input that fails, whatever the reason, is recorded and the others
go on. The record (``calid_cohort.csv``) keeps the rows of every run into the folder. Under
``torchrun --nproc_per_node N`` the list is sharded across processes (rank r takes items r, r+N, ...; each uses GPU
``LOCAL_RANK`` when there are GPUs); rank 0 merges the per-rank CSV files once every rank is done.
"""

from __future__ import annotations

import csv
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

from .cine import input_warning
from .devices import resolve_device
from .engine import UpsampleOptions, upsample_file
from .errors import CalidError, Cancelled, first_few
from .imageio import has_image_suffix, holds_dicom_series, is_label_file
from .modelindex import DEFAULT_MODEL
from .modelstore import load_model
from .progress import Progress

CSV_FIELDS = ["input", "output", "status", "seconds", "factor", "settings", "device", "rank", "message"]
LIST_SUFFIXES = (".txt", ".csv", ".lst")


def is_cohort_input(path: Path) -> bool:
    """A list file, or a folder that holds image files or sub-folders and is no DICOM series itself (an export's
    series folder may hold a sub-folder too, such as ``__MACOSX``: it was taken for a cohort of one bad input). A
    DICOM series beside volume files is refused: it was taken for one input and the volumes left out unsaid."""
    if path.is_file():
        return path.suffix.lower() in LIST_SUFFIXES
    if path.is_dir():
        entries = list(path.iterdir())
        volumes = [p.name for p in entries if has_image_suffix(p)]
        if not holds_dicom_series(path):
            return bool(volumes) or any(p.is_dir() for p in entries)
        if volumes:
            raise CalidError(f"{path} holds a DICOM series and volume files ({first_few(sorted(volumes))}): put the "
                             "series in a folder of its own")
    return False


def list_inputs(source: Path, output_dir: Path) -> list[Path]:
    """The inputs of a list file (a spreadsheet's byte-order mark ignored), or of a folder: its image files but
    label files (ACDC keeps ``_gt`` labels beside each volume; upsampled as intensities they were written like
    dense labels, with classes between neighbours that neither has), and its sub-folders but the output folder: a
    DICOM series each, or, where one holds volume files and no series (ACDC's folder per patient), those files."""
    if source.is_file():
        lines = [line.strip() for line in source.read_text(encoding="utf-8-sig").splitlines()]
        items = [Path(line) if Path(line).is_absolute() else source.parent / line
                 for line in lines if line and not line.startswith("#")]
    else:
        output = output_dir.resolve()
        items = []
        for path in sorted(source.iterdir()):
            if path.is_dir() and path.resolve() != output:
                volumes = [p for p in sorted(path.iterdir()) if _is_volume_file(p)]
                items += volumes if volumes and not holds_dicom_series(path) else [path]
            elif _is_volume_file(path):
                items.append(path)
    if not items:
        raise CalidError(f"no inputs found in {source}")
    return items


def _is_volume_file(path: Path) -> bool:
    """An image file that is no label file."""
    return path.is_file() and has_image_suffix(path) and not is_label_file(path)


def settings_of(options: UpsampleOptions) -> str:
    """What makes a run's outputs what they are, as the record keeps it: a resumed cohort must use the same."""
    scale = f"spacing {options.spacing} mm" if options.spacing else f"x{options.factor or 2}"
    model = f" {options.model or DEFAULT_MODEL}, steps {options.steps or 'default'}, seed {options.seed}, samples " \
            f"{options.samples}{', CaLID+' if options.plus else ''}, {options.cine_noise} cine noise" \
        if options.method == "calid" else ""
    axis = "" if options.slice_axis is None else f", slice axis {options.slice_axis}"
    return f"{options.method} {scale}{model}{axis}"


def check_record(pairs: list[tuple[Path, Path]], done_before: dict[str, dict], settings: str) -> None:
    """Refuse outputs that the record says were made from another input or with other settings: a resumed run
    kept them and reported them as this input's (records written before stop 46 name no settings: kept)."""
    clashes = []
    for item, target in pairs:
        row = done_before.get(str(target.resolve()))
        if row is None or not row.get("settings") or not target.exists():
            continue
        if Path(row["input"]).resolve() != item.resolve():
            clashes.append(f"{target.name} (made from {row['input']})")
        elif row["settings"] != settings:
            clashes.append(f"{target.name} (made with {row['settings']})")
    if clashes:
        raise CalidError(f"the output folder holds results of other inputs or settings: {first_few(clashes)}; this "
                         f"run's settings are {settings}: give another output folder, or remove those to redo them")


def output_names(items: list[Path]) -> list[Path]:
    """Each input's path below the inputs' common folder: same-named files of different folders (every patient's
    ``sax.nii.gz``) each get their own output, where the bare name had them share one and skip all but the first."""
    absolute = [Path(os.path.abspath(item)) for item in items]  # a symbolic link keeps its own name
    try:
        common = Path(os.path.commonpath([item.parent for item in absolute]))
        names = [item.relative_to(common) for item in absolute]
    except ValueError:  # no common folder (other drives): the bare names, if they differ
        names = [Path(item.name) for item in items]
    if len(set(names)) < len(names):
        raise CalidError("two inputs would be written to the same output: " +
                         ", ".join(str(item) for item, name in zip(items, names) if names.count(name) > 1))
    return names


def run_cohort(source: Path, output_dir: Path, options: UpsampleOptions, progress_mode: str,
               csv_path: Path | None = None) -> int:
    """Process every input; returns the number of failures (the exit code is non-zero if any)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    if source.is_dir() and source.resolve() == output_dir.resolve():
        raise CalidError(f"the output folder is the input folder {source}: give another one")
    final_csv = csv_path or output_dir / "calid_cohort.csv"
    if final_csv.is_dir() or (csv_path is not None and not final_csv.parent.is_dir()):
        raise CalidError(f"cannot write the record {final_csv}: give a file in an existing folder (--csv)")
    items = list_inputs(source, output_dir)
    targets = [output_dir / name for name in output_names(items)]
    ours = {str(target.resolve()) for target in targets}
    done_before = _done_rows(final_csv)
    settings = settings_of(options)
    check_record(list(zip(items, targets)), done_before, settings)
    output_dir.mkdir(parents=True, exist_ok=True)
    if world > 1 and options.device == "auto" and torch.cuda.is_available():
        options = replace(options, device=f"cuda:{int(os.environ.get('LOCAL_RANK', rank)) % torch.cuda.device_count()}")
    device = resolve_device(options.device)
    model, _ = load_model(options.model, device)
    mine = list(zip(items, targets))[rank::world]
    rows = []
    overall = Progress(progress_mode if progress_mode == "json" else "none", len(mine))
    shard = {"rank": rank} if world > 1 else {}  # each process reports its own share of the inputs
    try:
        for number, (item, target) in enumerate(mine, 1):
            resumed = target.exists() and str(target.resolve()) in done_before
            if resumed:  # a resumed run keeps the record that made it
                row = done_before[str(target.resolve())]
            else:  # the bar counts the whole cohort's inputs, whichever process makes this one
                row = _process(item, target, output_dir, options, device, model,
                               f"{(number - 1) * world + rank + 1}/{len(items)} {item.name}"
                               if progress_mode == "bar" else "", rank, world, settings)
            rows.append(row)
            told = {"message": row["message"]} if row.get("message") and row["status"] == "failed" else {}
            overall.advance(1, item=str(item), status=row["status"], **({"resumed": True} if resumed else {}),
                            **told, **shard)
    finally:  # a cancelled cohort keeps the record of what it and earlier runs finished, to resume from
        reached = {str(Path(row["output"]).resolve()) for row in rows}
        kept = [key for key in (str(target.resolve()) for _, target in mine) if key not in reached]
        if rank == 0:  # earlier runs' rows of other inputs into this folder: a later batch kept only its own
            kept += [key for key in done_before if key not in ours]
        part = final_csv.with_name(f"{final_csv.stem}.rank{rank}.csv") if world > 1 else final_csv
        _write_csv(part, rows + [done_before[key] for key in kept if key in done_before and Path(key).exists()])
    failed = sum(row["status"] == "failed" for row in rows)
    if world == 1:
        _summarise(rows, final_csv, overall)
        return failed
    dist.barrier()
    if rank == 0:
        merged = []
        for r in range(world):
            with open(final_csv.with_name(f"{final_csv.stem}.rank{r}.csv"), newline="", encoding="utf-8") as f:
                merged.extend(csv.DictReader(f))
        for shard_csv in _shard_records(final_csv):  # a cancelled earlier run's too, now merged or redone
            shard_csv.unlink()
        _write_csv(final_csv, sorted(merged, key=lambda row: row["input"]))
        # every process's inputs, once; this run's only, as one process counts them
        _summarise([row for row in merged if row["output"] in ours], final_csv, overall)
    total = torch.tensor([failed])
    dist.all_reduce(total)  # every process exits 1 when any input failed, whichever process had it
    dist.destroy_process_group()
    return int(total.item())


def _process(item: Path, target: Path, output_dir: Path, options: UpsampleOptions, device: torch.device, model,
             bar: str, rank: int, world: int, settings: str) -> dict:
    """One input of the cohort not done before: its record (done, skipped or failed, and why), its input and output
    recorded as absolute paths so that a run from another folder finds them again. ``bar`` names the input's
    progress bar ("3/40 case.nii.gz"); "" shows none."""
    row = {"input": os.path.abspath(item), "output": str(target.resolve()), "rank": rank, "device": str(device)}
    started = time.perf_counter()
    if target.exists():
        row.update(status="skipped", message="output exists")
    else:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            item_progress = Progress("bar" if bar else "none", subject=bar)
            warning = input_warning(item, options.slice_axis)  # as a single input says it: an isotropic volume
            if warning:
                item_progress.warning(f"{item}: {warning}")
            result = upsample_file(item, target, replace(options, device=str(device)), model=model,
                                   progress=item_progress)
            item_progress.close()
            row.update(status="done", factor=result.factor, settings=settings)
        except CalidError as exc:
            row.update(status="failed", message=str(exc))
        except (Cancelled, KeyboardInterrupt):
            if world == 1:
                _remove_if_empty(target.parent, output_dir)
            raise
        except OSError as exc:
            row.update(status="failed", message=f"cannot write {target.parent}: {exc.strerror or exc}")
        except Exception as exc:  # noqa: BLE001 - one input's failure must not stop the cohort
            row.update(status="failed", message=f"internal error: {type(exc).__name__}: {exc}")
        if row["status"] == "failed" and world == 1:  # another process may be about to write into it
            _remove_if_empty(target.parent, output_dir)
    row["seconds"] = round(time.perf_counter() - started, 2)
    return row


def _remove_if_empty(folder: Path, output_dir: Path) -> None:
    """The folder made for an output that was not written, unless it is the cohort's own or holds anything."""
    if folder.resolve() != output_dir.resolve():
        try:
            folder.rmdir()
        except OSError:
            pass


def _summarise(rows: list[dict], record: Path, progress: Progress) -> None:
    """The cohort's end: in JSON mode one ``summary`` event with the counts and the record (each input's status
    went out as it finished); otherwise each failed input with its reason, and the counts, on stderr (a cohort that
    failed some inputs said nothing outside its CSV record)."""
    counts = {status: sum(row["status"] == status for row in rows) for status in ("done", "skipped", "failed")}
    if progress.mode == "json":
        progress.event("summary", inputs=len(rows), **counts, record=str(record))
        return
    for row in rows:
        if row["status"] == "failed":
            print(f"calid: failed: {row['input']}: {row['message']}", file=sys.stderr)
    print(f"calid: {len(rows)} inputs: {counts['done']} done, {counts['skipped']} skipped (output exists), "
          f"{counts['failed']} failed; record: {record}", file=sys.stderr)


def _shard_records(final_csv: Path) -> list[Path]:
    """The per-process records a run under torchrun leaves until they are merged (all of them, if it was stopped)."""
    return sorted(final_csv.parent.glob(f"{final_csv.stem}.rank*.csv"))


def _done_rows(final_csv: Path) -> dict[str, dict]:
    """The rows earlier runs of the cohort recorded as done, by resolved output path (the folder may be named
    another way this time), in this version's columns: from its record, and from the per-process records a run
    under torchrun left unmerged when it was stopped (none where no record can be read; a copy saved by a
    spreadsheet, with a byte-order mark or columns of its own, is read)."""
    rows = []
    for path in [final_csv, *_shard_records(final_csv)]:
        try:
            with open(path, newline="", encoding="utf-8-sig") as f:
                rows += list(csv.DictReader(f))
        except (OSError, csv.Error, UnicodeDecodeError):
            continue
    return {str(Path(row["output"]).resolve()): {field: row.get(field, "") for field in CSV_FIELDS}
            for row in rows if row.get("status") == "done" and row.get("output")}


def _write_csv(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
