"""Cine (2D+T) short-axis images: read, check and write them (``engine.upsample_cine`` upsamples them).

A cine is held as a 4D scalar ``SimpleITK.Image`` (x, y, z, t) whose fourth axis has the first frame's time as
origin and the frame interval as spacing, plus the frame times as read (kept exactly for outputs that can
store them: sequence NRRD and DICOM). Inputs: a 4D file (NIfTI, MetaImage), a Slicer sequence NRRD
(``.seq.nrrd``: SimpleITK returns it as a 3D image whose pixel components are the frames, with the frame
times in the ``axis N index values`` header field), or a DICOM folder whose files repeat each slice position
once per trigger time (0018,1060). Reading and writing only: ``engine.upsample_cine`` puts every phase on the
dense grid, as it does the single phase of a volume.
"""

from __future__ import annotations

import gzip
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, unquote

import numpy as np
import SimpleITK as sitk

from . import geometry
from .errors import CalidError
from .imageio import (DICOM_DESCRIPTION, check_all_dicom_read, dicom_identity, has_image_suffix, output_folder,
                      read_dicom_files, read_header, read_image, single_series_files, write_image, writing)
from .staging import staging_file

TIME_TOLERANCE = 0.25
"""Frame intervals may differ by this fraction of the mean interval: trigger times are rounded to ms and jitter with
the heartbeat (±1.5 ms at 45 ms frames was refused at 0.1); a missing frame doubles an interval, far beyond it."""
POSITION_DECIMALS = 2
"""DICOM slice positions (mm along the normal) that agree to this many decimals are the same slice."""
INDEX_VALUES = re.compile(r"^axis (\d+) index values$")
SEQUENCE_FIELD = re.compile(r"^axis (\d+) (.+)$")
NRRD_TYPES = {"int8": "signed char", "uint8": "uchar", "int16": "short", "uint16": "ushort", "int32": "int",
              "uint32": "uint", "int64": "longlong", "uint64": "ulonglong", "float32": "float", "float64": "double"}


MS_PER_TIME_UNIT = {"ms": 1.0, "msec": 1.0, "millisecond": 1.0, "milliseconds": 1.0,
                    "s": 1000.0, "sec": 1000.0, "second": 1000.0, "seconds": 1000.0}
NIFTI_UNITS_OFFSET = 123  # xyzt_units in a NIfTI-1 header (little-endian, as ITK writes it)
NIFTI_TIME_UNIT_BITS = 0x38
"""The time unit's bits of a NIfTI header's ``xyzt_units``; ITK reads a NIfTI time axis in seconds when they name a
unit, and leaves it as stored when they do not (Sunnybrook's cines: 1 per frame, no unit)."""


@dataclass
class Cine:
    """A 4D scalar image (x, y, z, t) with its frame times and the sequence header fields to write back.

    ``times`` are kept as read, so that an output in the input's form has the same time axis; ``time_unit`` is
    what the source says they are in (None where it does not say: a NIfTI without a time unit, a MetaImage), and
    ``times_ms`` what is reported to a user, only where that is known.
    """

    image: sitk.Image
    times: tuple[float, ...]
    sequence_fields: dict[str, str] = field(default_factory=dict)  # "index type", "quantity", ... (no axis number)
    time_unit: str | None = None
    identity: dict[str, str] = field(default_factory=dict)  # a DICOM source's patient, study (dicom_identity)

    @property
    def phases(self) -> int:
        return self.image.GetSize()[3]

    @property
    def times_ms(self) -> tuple[float | None, ...]:
        """Each frame's time in ms, or None for every frame where the source names no time unit."""
        if self._ms_per_unit is None:
            return (None,) * len(self.times)
        return tuple(round(t, 3) for t in self.times_in("ms"))

    def times_in(self, unit: str) -> tuple[float, ...]:
        """The frame times in ``unit`` (a key of ``MS_PER_TIME_UNIT``), or as read where the source names no unit:
        an output in another format says the same times in its own unit (NIfTI seconds, DICOM ms)."""
        if self._ms_per_unit is None:
            return self.times
        return tuple(t * self._ms_per_unit / MS_PER_TIME_UNIT[unit] for t in self.times)

    @property
    def _ms_per_unit(self) -> float | None:
        return MS_PER_TIME_UNIT.get((self.time_unit or "").strip().lower())


def check_uniform_times(times: list[float] | tuple[float, ...], where: str) -> None:
    """Frames must be in increasing, evenly spaced time: a 4D file's time axis has one spacing, and a gap
    (a missing frame) would otherwise pass unnoticed."""
    steps = np.diff(np.asarray(times, dtype=float))
    if len(steps) and (steps.min() <= 0 or np.ptp(steps) > TIME_TOLERANCE * steps.mean()):
        listed = ", ".join(f"{t:g}" for t in times)
        raise CalidError(f"{where}: frame times are not uniform (a missing or extra frame?): {listed}")


def _with_time_axis(volumes: list[sitk.Image], times: tuple[float, ...]) -> sitk.Image:
    """Join equally shaped 3D phases into one 4D image whose time origin/spacing are the first time and mean step."""
    try:
        joined = sitk.JoinSeries(volumes)
    except RuntimeError as exc:
        raise CalidError(f"the phases of the cine do not share one grid: {str(exc).strip().splitlines()[-1]}") from None
    _set_times(joined, times)
    return joined


def _set_times(image: sitk.Image, times: tuple[float, ...]) -> None:
    """Give a 4D image the time axis of ``times``: the first as origin, their mean interval as spacing (1 for one)."""
    step = float(np.mean(np.diff(times))) if len(times) > 1 else 1.0
    image.SetOrigin((*image.GetOrigin()[:3], float(times[0])))
    image.SetSpacing((*image.GetSpacing()[:3], step))


def phase_of(image: sitk.Image, t: int) -> sitk.Image:
    """Phase ``t`` of a 4D image (x, y, z, t) as a 3D image with its spatial geometry."""
    size = list(image.GetSize())
    return sitk.Extract(image, [*size[:3], 0], [0, 0, 0, t])


def cine_from_4d(image: sitk.Image) -> Cine:
    """A 4D file: its time axis is uniform by construction, in seconds where a NIfTI header names a time unit."""
    origin, step = image.GetOrigin()[3], image.GetSpacing()[3]
    units = image.GetMetaData("xyzt_units") if image.HasMetaDataKey("xyzt_units") else "0"
    unit = "s" if units.isdigit() and int(units) & NIFTI_TIME_UNIT_BITS else None
    return Cine(image, tuple(origin + t * step for t in range(image.GetSize()[3])), time_unit=unit)


def sequence_axis(image: sitk.Image) -> int | None:
    """The list axis number of a sequence NRRD read as a vector image, or None for a plain vector image."""
    for key in image.GetMetaDataKeys():
        match = INDEX_VALUES.match(key)
        if match:
            return int(match.group(1))
    is_list = image.HasMetaDataKey("NRRD_kinds[pixel]") and image.GetMetaData("NRRD_kinds[pixel]") == "list"
    return 0 if is_list and image.GetNumberOfComponentsPerPixel() > 1 else None


def cine_from_sequence(image: sitk.Image, axis: int, where: str) -> Cine:
    """A sequence NRRD (frames as pixel components) -> 4D cine, keeping its index values and fields."""
    count = image.GetNumberOfComponentsPerPixel()
    fields = {}
    for key in image.GetMetaDataKeys():
        match = SEQUENCE_FIELD.match(key)
        if match and int(match.group(1)) == axis:
            fields[match.group(2)] = image.GetMetaData(key)
    if fields.pop("index type", "numeric") != "numeric":
        raise CalidError(f"{where}: the sequence index is text, not time: a cine needs numeric frame times")
    values = fields.pop("index values", " ".join(str(t) for t in range(count))).split()
    try:
        times = tuple(float(unquote(v)) for v in values)
    except ValueError:
        raise CalidError(f"{where}: sequence index values are not numbers: {' '.join(values[:5])}") from None
    if len(times) != count:
        raise CalidError(f"{where}: {len(times)} index values for {count} frames")
    check_uniform_times(times, where)
    frames = [sitk.VectorIndexSelectionCast(image, t) for t in range(count)]
    fields["index type"] = "numeric"
    unit = fields.get("unit") or _nrrd_field(image, "NRRD_units[pixel]")  # Slicer writes the NRRD "units" field
    return Cine(_with_time_axis(frames, times), times, fields, unit or None)


def _nrrd_field(image: sitk.Image, key: str) -> str | None:
    return image.GetMetaData(key).strip().strip('"') if image.HasMetaDataKey(key) else None


def _dicom_header(name: str) -> tuple[float, float | None, tuple[float, ...]]:
    """(position along the slice normal in mm, trigger time in ms or None, orientation rounded) of one DICOM file."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(name)
    reader.ReadImageInformation()
    position = np.array([float(v) for v in reader.GetMetaData("0020|0032").split("\\")])
    orientation = [float(v) for v in reader.GetMetaData("0020|0037").split("\\")]
    normal = np.cross(orientation[:3], orientation[3:])
    trigger = float(reader.GetMetaData("0018|1060")) if reader.HasMetaDataKey("0018|1060") else None
    return float(position @ normal), trigger, tuple(round(v, 4) for v in orientation)


def dicom_cine_frames(folder: Path) -> tuple[list[list[str]], tuple[float, ...]] | None:
    """Files of a DICOM cine folder as (frames[phase] = files in slice order, frame times in ms), or None when
    no slice position repeats (a 3D series: ``imageio.read_image`` handles it and its errors). The cine is one
    series, or one series per slice position (``_slice_series_files``)."""
    try:
        files = single_series_files(folder)
    except CalidError:
        files = _slice_series_files(folder)
        if files is None:
            return None  # read_image says what is wrong with the folder
    try:
        headers = [_dicom_header(name)[:2] for name in files]
    except (RuntimeError, ValueError):
        return None  # no usable position or orientation: not something to group into a cine
    positions: dict[float, list[tuple[float | None, str]]] = {}
    for name, (distance, trigger) in zip(files, headers):
        positions.setdefault(round(distance, POSITION_DECIMALS), []).append((trigger, name))
    if all(len(frames) == 1 for frames in positions.values()):
        return None
    return _order_frames(positions, folder)


def _slice_series_files(folder: Path) -> list[str] | None:
    """The files of a cine exported as one series per slice position (Siemens' usual short-axis cine), or None when
    ``folder`` is not that: every series one position over several trigger times, all in one orientation, no two at
    the same position. Refused as "several series" before, and one series per folder is one slice, which no
    interpolation can use."""
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if len(series) < 2:
        return None
    files, positions, orientations = [], set(), set()
    try:
        for uid in series:
            names = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid))
            headers = [_dicom_header(name) for name in names]
            distances = {round(distance, POSITION_DECIMALS) for distance, _, _ in headers}
            if len(names) < 2 or len(distances) != 1 or any(trigger is None for _, trigger, _ in headers):
                return None
            positions |= distances
            orientations |= {orientation for _, _, orientation in headers}
            files += names
    except (RuntimeError, ValueError):
        return None
    if len(orientations) != 1 or len(positions) != len(series):
        return None
    check_all_dicom_read(folder, files)
    return files


def _order_frames(positions: dict[float, list[tuple[float | None, str]]],
                  folder: Path) -> tuple[list[list[str]], tuple[float, ...]]:
    """Check that every slice position has the same, uniformly timed frames; order them into phases."""
    counts = {d: len(frames) for d, frames in positions.items()}
    most = Counter(counts.values()).most_common(1)[0][0]
    odd = {d: c for d, c in counts.items() if c != most}
    if odd and most == 1:  # a stack, not a cine, with a slice acquired again
        listed = ", ".join(f"{d:g} mm ({c} images)" for d, c in sorted(odd.items()))
        raise CalidError(f"DICOM series in {folder} has several images at slice position {listed}: a slice acquired "
                         "again? Keep one image per position")
    if odd:
        listed = ", ".join(f"{d:g} mm: {c}" for d, c in sorted(odd.items()))
        raise CalidError(f"DICOM cine in {folder} has mismatched phases (missing or extra frames): most slice "
                         f"positions have {most} phases, but {listed}")
    per_position = []
    for distance in sorted(positions):
        frames = positions[distance]
        if any(trigger is None for trigger, _ in frames):
            raise CalidError(f"DICOM cine in {folder}: slice position {distance:g} mm repeats without trigger times "
                             "(0018,1060): cannot order its phases")
        frames = sorted(frames, key=lambda frame: frame[0])
        triggers = [trigger for trigger, _ in frames]
        if len(set(triggers)) != len(triggers):
            raise CalidError(f"DICOM cine in {folder}: slice position {distance:g} mm has two frames with the same "
                             "trigger time (two series mixed?)")
        check_uniform_times(triggers, f"DICOM cine in {folder}, slice position {distance:g} mm")
        per_position.append(frames)
    times = tuple(float(np.mean([frames[t][0] for frames in per_position])) for t in range(most))
    return [[frames[t][1] for frames in per_position] for t in range(most)], times


def read_input(path: str | os.PathLike) -> sitk.Image | Cine:
    """The input as a 3D image, or as a ``Cine`` when it has several phases (validated either way later)."""
    path = Path(path)
    if path.is_dir():
        found = dicom_cine_frames(path)
        if found is not None:
            frames, times = found
            phases = [read_dicom_files(files, path) for files in frames]
            return Cine(_with_time_axis(phases, times), times, time_unit="ms",  # trigger times
                        identity=dicom_identity(phases[0]))
    image = read_image(path)
    if image.GetDimension() == 4 and image.GetSize()[3] > 1:
        return cine_from_4d(image)
    axis = sequence_axis(image) if image.GetDimension() == 3 else None
    return image if axis is None else cine_from_sequence(image, axis, str(path))


def input_warning(path: str | os.PathLike, slice_axis: int | None = None) -> str | None:
    """``geometry.sparse_stack_warning`` for an input path, read before the run so the line comes first.

    A file's header is enough (spacing and size, no voxels); a DICOM folder is read whole, as its spacing
    comes from the slice positions. Unreadable inputs raise the engine's own one-line error.
    """
    path = Path(path)
    header = read_header(path) if path.is_file() and has_image_suffix(path) else None
    if header is not None:
        return geometry.sparse_stack_warning(header, slice_axis)
    source = read_input(path)  # a DICOM folder, or a file it says what is wrong with
    return geometry.sparse_stack_warning(source.image if isinstance(source, Cine) else source, slice_axis)


def check_cine_output(path: str | os.PathLike, labels: bool = False) -> None:
    """A one-line error for a path a cine cannot be written to, so that it comes before anything is computed or
    written. ``labels``: a cine of labels, which is written as one 4D file (not as DICOM MR images)."""
    if Path(path).name.lower().endswith(".nhdr"):
        if labels:
            raise CalidError("a cine's labels are written as .seq.nrrd, .nrrd, .nii.gz, .nii or .mha, not .nhdr")
        raise CalidError("a cine is written as .seq.nrrd, .nrrd, .nii.gz, .nii, .mha or a DICOM folder, not .nhdr")
    if labels and not has_image_suffix(path):
        raise CalidError(f"a cine's labels are written as one 4D file (.nii.gz, .nii, .mha or .seq.nrrd), not as a "
                         f"DICOM folder: {path}")


def write_cine(image: sitk.Image, like: Cine, path: str | os.PathLike, identity: dict[str, str] | None = None,
               description: str = DICOM_DESCRIPTION) -> Path:
    """Write a 4D image with ``like``'s frame times: ``.nrrd`` as a Slicer sequence, a suffix-less path as a
    DICOM cine folder (trigger times in ms; ``identity`` and ``description`` as ``imageio.write_image``), other
    suffixes (NIfTI: time in seconds; MetaImage) as a 4D file. Times whose unit the input did not name are written
    as read."""
    check_cine_output(path)
    path = Path(path)
    if path.name.lower().endswith(".nrrd"):
        return _write_sequence_nrrd(image, like, path)
    adjust = None
    if path.name.lower().endswith((".nii", ".nii.gz")):
        image = sitk.Image(image)  # the caller's image keeps its axis
        _set_times(image, like.times_in("s"))
        if like.time_unit is None:
            adjust = _without_nifti_time_unit
    return write_image(image, path, frame_times=like.times_in("ms"), identity=identity, description=description,
                       adjust=adjust)


def _without_nifti_time_unit(path: Path) -> None:
    """Clear a written NIfTI header's time unit: ITK always writes seconds, so a cine whose source named no unit
    (Sunnybrook's frames 1, 2, 3) read back as frames a second apart, and as 1000 ms frames in DICOM."""
    compressed = path.name.lower().endswith(".gz")
    data = bytearray(gzip.decompress(path.read_bytes()) if compressed else path.read_bytes())
    if int.from_bytes(data[:4], "little") != 348:  # not the NIfTI-1 header ITK writes: leave it as it is
        return
    data[NIFTI_UNITS_OFFSET] &= ~NIFTI_TIME_UNIT_BITS & 0xFF
    path.write_bytes(gzip.compress(bytes(data), compresslevel=6) if compressed else bytes(data))


def _sequence_header(image: sitk.Image, like: Cine) -> str:
    """Header of a sequence NRRD as Slicer writes it: list axis last (axis 3), frame times as index values."""
    size, spacing = image.GetSize(), image.GetSpacing()
    direction = np.asarray(image.GetDirection()).reshape(4, 4)[:3, :3]
    axes = " ".join("(" + ",".join(f"{v:.17g}" for v in direction[:, j] * spacing[j]) + ")" for j in range(3))
    dtype = sitk.GetArrayViewFromImage(image).dtype
    values = " ".join(quote(f"{t:.17g}") for t in like.times)
    fields = {"index type": "numeric", **like.sequence_fields, "index values": values}
    time = [f'labels: "" "" "" "time"', f'units: "" "" "" "{like.time_unit}"'] if like.time_unit else []
    lines = ["NRRD0004", f"type: {NRRD_TYPES[dtype.name]}", "dimension: 4", "space: left-posterior-superior",
             "sizes: " + " ".join(str(s) for s in size), f"space directions: {axes} none",
             "kinds: domain domain domain list", *time, "endian: little", "encoding: gzip",
             "space origin: (" + ",".join(f"{v:.17g}" for v in image.GetOrigin()[:3]) + ")",
             "DataNodeClassName:=vtkMRMLScalarVolumeNode"]
    lines += [f"axis 3 {key}:={value}" for key, value in fields.items()]
    return "\n".join(lines) + "\n\n"


def _write_sequence_nrrd(image: sitk.Image, like: Cine, path: Path) -> Path:
    """Atomic like ``imageio.write_image``: a temporary file beside the destination, renamed when complete."""
    parent = output_folder(path)
    array = sitk.GetArrayFromImage(image)  # (t, z, y, x): x fastest, the list axis slowest, as in the header
    with writing(path):
        handle, staging = staging_file(parent, ".seq.nrrd")
        try:
            with os.fdopen(handle, "wb") as out:
                out.write(_sequence_header(image, like).encode("ascii"))
                out.write(gzip.compress(array.astype(array.dtype.newbyteorder("<")).tobytes(), compresslevel=6))
            os.replace(staging, path)
        finally:
            if os.path.exists(staging):
                os.unlink(staging)
    return path
