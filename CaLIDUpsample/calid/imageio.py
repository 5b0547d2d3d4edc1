"""Reading and writing volumes with SimpleITK: NIfTI, NRRD, MetaImage and DICOM series folders.

Every problem with an input becomes a ``CalidError`` with a one-line message; outputs are written to a
temporary folder beside the destination and moved into place only when complete, so an interrupted or
failed run never leaves a half-written file.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import SimpleITK as sitk

from .errors import CalidError, first_few
from .file_completeness import check_complete
from .segmentation.labels import LABELS
from .staging import staging_folder

FILE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
"""Single-file (or header + data) formats, matched on the end of the file name."""

DICOM_UNIFORMITY_TOLERANCE_MM = 0.05

DICOM_IDENTITY_TAGS = (
    "0010|0010", "0010|0020", "0010|0030", "0010|0040",  # patient: name, ID, birth date, sex
    "0020|000d", "0008|0020", "0008|0030", "0008|0050", "0020|0010", "0008|1030", "0008|0090",  # the study
    "0020|0052",  # the frame of reference: the same patient coordinates as the acquired series
)
"""What a derived series keeps of its DICOM source, so that a viewer or PACS files it in the acquired series' study,
with its patient: the written series had no patient, a study of its own and no frame of reference. The values are
read in the source's character set and written in UTF-8 (``0008|0005`` ISO_IR 192)."""

DICOM_CHARSETS = {"": "latin_1", "ISO_IR 6": "ascii", "ISO_IR 100": "latin_1", "ISO_IR 101": "iso8859_2",
                  "ISO_IR 109": "iso8859_3", "ISO_IR 110": "iso8859_4", "ISO_IR 144": "iso8859_5",
                  "ISO_IR 127": "iso8859_6", "ISO_IR 126": "iso8859_7", "ISO_IR 138": "iso8859_8",
                  "ISO_IR 148": "iso8859_9", "ISO_IR 203": "iso8859_15", "ISO_IR 166": "tis_620",
                  "ISO_IR 192": "utf_8", "GB18030": "gb18030", "GBK": "gbk"}
"""DICOM's single-byte and Unicode character sets (0008,0005) by Python codec; a source without one is read as
Latin-1, as scanners that omit it mostly write. ISO 2022 code extensions are not read: such a value is left out."""

DICOMDIR_CLASS = re.compile(rb"1\.2\.840\.10008\.1\.3\.10(?![0-9.])")
"""The Media Storage SOP Class of a DICOMDIR: a DICOM file of no series, which an export may put beside the images."""

DICOM_DESCRIPTION = "CaLID upsampled"
MAP_DESCRIPTION = "CaLID expected absolute error"
LABELS_DESCRIPTION = "CaLID segmentation labels"
"""The series descriptions of a dense volume, its uncertainty map and its labels: a viewer lists them by these."""

# ITK prints multi-line warnings to stderr (e.g. "unexpected scales in sform" for every ACDC file);
# they would drown the one-line messages and the JSON progress protocol. Real problems raise instead.
sitk.ProcessObject_SetGlobalWarningDisplay(False)


LABEL_TAGS = ("_gt", "_seg", "_label", "_labels", "_mask", "_contours")
"""A label file is named like its image with one of these before the suffix (ACDC's ``_gt``, Sunnybrook's
``_contours``). One list for both uses: training skips such files as images, and evaluation and segmentation training
pair them with their image; two lists had drifted (``_mask`` files were skipped as images but never found as labels)."""
_LABEL_NAME = re.compile("(" + "|".join(LABEL_TAGS) + r")(\.|$)", re.IGNORECASE)


def has_image_suffix(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(FILE_SUFFIXES)


def is_label_file(path: str | os.PathLike) -> bool:
    return bool(_LABEL_NAME.search(Path(path).name))


def find_labels(image_path: Path) -> Path | None:
    """The label file beside an image (``LABEL_TAGS``, the tag in either case), or None."""
    name = image_path.name
    for suffix in FILE_SUFFIXES:
        if name.lower().endswith(suffix):
            stem, ext = name[: -len(suffix)], name[-len(suffix):]
            for tag in LABEL_TAGS:
                for spelling in (tag, tag.upper()):
                    candidate = image_path.with_name(stem + spelling + ext)
                    if candidate.is_file():
                        return candidate
    return None


def read_image(path: str | os.PathLike) -> sitk.Image:
    """Read a file or a DICOM series folder. Checks only that it can be read, see ``validate_volume``."""
    path = Path(path)
    if not path.exists():
        raise CalidError(f"input not found: {path}")
    if path.is_dir():
        return _read_dicom_series(path)
    if not has_image_suffix(path):
        raise CalidError(f"unsupported input format: {path.name} (use {', '.join(FILE_SUFFIXES)} or a DICOM folder)")
    check_complete(path)
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise CalidError(f"cannot read {path}: {_first_line(exc)}") from None


def read_header(path: str | os.PathLike) -> sitk.ImageFileReader | None:
    """The header of an image file (dimension, size, spacing: no voxels read), or None when ITK cannot read it
    (``read_image`` then says why in its one line)."""
    header = sitk.ImageFileReader()
    header.SetFileName(str(path))
    try:
        header.ReadImageInformation()
    except RuntimeError:
        return None
    return header


def _read_dicom_series(folder: Path) -> sitk.Image:
    return read_dicom_files(single_series_files(folder), folder)


def holds_dicom_series(folder: Path) -> bool:
    return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))


def single_series_files(folder: Path) -> list[str]:
    """The files of the one DICOM series in ``folder`` (not its sub-folders), refusing a folder with none (naming
    the sub-folders that hold series, as a DICOMDIR export nests them), with several, or with a DICOM file that
    GDCM cannot read: it leaves such a file out of the series without a word, and a truncated first or last file
    cost the stack its base or apex slice silently."""
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series:
        below = series_folders_below(folder)
        hint = f": the series are in sub-folders ({', '.join(below)}): give one of them" if below else ""
        raise CalidError(f"no DICOM series found in folder {folder}{hint}")
    if len(series) > 1:
        listed = "; ".join(f"{_series_description(files[0])}: {len(files)} files" for files in
                           (sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid) for uid in series[:4]))
        more = "; ..." if len(series) > 4 else ""
        raise CalidError(f"folder {folder} holds {len(series)} DICOM series ({listed}{more}); put one series per "
                         "folder")
    files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0]))
    check_all_dicom_read(folder, files)
    return files


def check_all_dicom_read(folder: Path, files: Sequence[str]) -> None:
    """Refuse ``folder`` when a DICOM file of it is not among ``files``, those GDCM could read into series, and its
    header cannot be read either (a file of another series, or a DICOMDIR, is no concern of this one)."""
    listed = {Path(name).name for name in files}
    unreadable = [p.name for p in sorted(folder.iterdir())
                  if p.is_file() and p.name not in listed and _is_dicom(p) and read_header(p) is None]
    if unreadable:
        raise CalidError(f"DICOM file(s) in {folder} that cannot be read (truncated or damaged?): "
                         f"{first_few(unreadable)}")


def _series_description(first_file: str) -> str:
    """A series' description (0008,103e) from its first file, for a message that tells the series apart."""
    header = read_header(first_file)
    return header.GetMetaData("0008|103e").strip() if header and header.HasMetaDataKey("0008|103e") else \
        "no description"


def _is_dicom(path: Path) -> bool:
    """A DICOM part-10 file other than a DICOMDIR: "DICM" after its 128-byte preamble."""
    try:
        with open(path, "rb") as file:
            start = file.read(1024)
    except OSError:
        return False
    return start[128:132] == b"DICM" and not DICOMDIR_CLASS.search(start)


def series_folders_below(folder: Path, most: int = 3, looked_at: int = 50) -> list[str]:
    """Up to ``most`` sub-folders of ``folder`` (of the first ``looked_at`` walked) that hold a DICOM series."""
    found = []
    for count, (root, dirs, _files) in enumerate(os.walk(folder)):
        dirs.sort()
        if count >= looked_at or len(found) >= most:
            break
        if Path(root) != folder and holds_dicom_series(Path(root)):
            found.append(str(root))
    return found


def read_dicom_files(files: Sequence[str], folder: Path) -> sitk.Image:
    """One volume from DICOM slice files (also one phase of a cine), refusing non-uniform slice positions; the
    source's patient, study and frame of reference (``DICOM_IDENTITY_TAGS``) in its metadata (``dicom_identity``)."""
    _check_uniform_dicom_spacing(files)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise CalidError(f"cannot read DICOM series in {folder}: {_first_line(exc)}") from None
    header = read_header(files[0])  # read into the series a moment ago
    for tag, value in (_identity_of(header) if header is not None else {}).items():
        image.SetMetaData(tag, value)
    return image


def _identity_of(header: sitk.ImageFileReader) -> dict[str, str]:
    """A DICOM file's ``DICOM_IDENTITY_TAGS``, decoded from its character set, with ``0008|0005`` ISO_IR 192 (how
    they are written). ITK hands other bytes than UTF-8 over undecoded (a Latin-1 "MÜLLER" could not even be set on
    an image: the input was refused); a value in a set not read here is left out, not garbled."""
    charset = header.GetMetaData("0008|0005").strip() if header.HasMetaDataKey("0008|0005") else ""
    codec = DICOM_CHARSETS.get(charset)
    identity = {}
    for tag in DICOM_IDENTITY_TAGS:
        if header.HasMetaDataKey(tag):
            raw = header.GetMetaData(tag).encode("utf-8", "surrogateescape")
            try:
                identity[tag] = raw.decode(codec or "ascii").strip(" \x00")  # the padding to an even length
            except UnicodeDecodeError:
                continue
    return {"0008|0005": "ISO_IR 192", **identity} if identity else {}


def dicom_identity(image: sitk.Image) -> dict[str, str]:
    """The identity an image read by ``read_dicom_files`` carries (``_identity_of``; none for other formats)."""
    return {tag: image.GetMetaData(tag) for tag in ("0008|0005", *DICOM_IDENTITY_TAGS) if image.HasMetaDataKey(tag)}


def run_identity(source: dict[str, str]) -> dict[str, str]:
    """What every DICOM output of one run is written with: the source's identity (``dicom_identity``), and where
    it has none (another format) a new study and frame of reference, so that a run's volume, map and labels are one
    study in the same patient coordinates."""
    return {"0020|000d": new_uid(), "0020|0052": new_uid(), **source}


def new_uid() -> str:
    """A DICOM UID of its own, in the UUID form (2.25.<128-bit integer>, ISO/IEC 9834-8). UIDs from the time to the
    second gave two outputs written within one second (a cohort's, a volume and its map) the same series UID, which
    a DICOM database reads as one series."""
    return f"2.25.{uuid.uuid4().int}"


def _check_uniform_dicom_spacing(files: Sequence[str]) -> None:
    """Slice positions that do not step uniformly along the slices' normal would be put silently on a wrong grid:
    refuse them."""
    if len(files) < 2:
        return
    positions, normal = [], None
    for name in files:
        header = sitk.ImageFileReader()
        header.SetFileName(name)
        header.ReadImageInformation()
        try:
            positions.append([float(v) for v in header.GetMetaData("0020|0032").split("\\")])
            if normal is None:
                o = [float(v) for v in header.GetMetaData("0020|0037").split("\\")]
                normal = np.cross(o[:3], o[3:])
        except RuntimeError:
            return  # no patient position: nothing to check, SimpleITK orders by instance number
    normal = normal / np.linalg.norm(normal)
    steps = np.diff(np.asarray(positions), axis=0)
    drift = np.linalg.norm(steps - np.outer(steps @ normal, normal), axis=1)
    if drift.max() > DICOM_UNIFORMITY_TOLERANCE_MM:  # ITK would put every slice on the first one's normal
        raise CalidError(f"DICOM slices are not stacked along their normal: from one slice to the next the position "
                         f"moves up to {drift.max():.2f} mm within the slice plane")
    distances = np.asarray(positions) @ normal
    if np.ptp(np.diff(distances)) > DICOM_UNIFORMITY_TOLERANCE_MM:
        where = ", ".join(f"{d:.2f}" for d in distances)
        raise CalidError(f"DICOM slices are not uniformly spaced (positions along the normal, mm: {where})")


def validate_volume(image: sitk.Image, source: str = "input") -> sitk.Image:
    """Return a scalar 3D image or raise a one-line error naming what is wrong with it."""
    if not isinstance(image, sitk.Image):  # the Python API's callers: a numpy array has no geometry to keep
        raise CalidError(f"{source} is a {type(image).__name__}, not a SimpleITK image (read it with "
                         "SimpleITK.ReadImage, or wrap an array with SimpleITK.GetImageFromArray and set its geometry)")
    if image.GetNumberOfComponentsPerPixel() > 1:
        raise CalidError(f"{source} is a vector/RGB image ({image.GetNumberOfComponentsPerPixel()} components): "
                         "give a single-channel MRI volume")
    if image.GetDimension() == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]
    if image.GetDimension() == 4:
        raise CalidError(f"{source} is 4D ({image.GetSize()[3]} time points): this step needs one cardiac phase "
                         "as a 3D volume (calid upsample takes cine input)")
    if image.GetDimension() != 3:
        raise CalidError(f"{source} is {image.GetDimension()}D: a stack of at least 2 short-axis slices is needed")
    check_direction(image, source)
    return check_pixels(image, source)


def refuse_label_map(image: sitk.Image, source: str | os.PathLike = "input") -> sitk.Image:
    """Refuse an input that holds only label values where an MR image is needed (``calid segment`` segmented a
    ground-truth file without a word, ``calid upsample`` interpolated one as intensities); return the image."""
    values, label_values = sitk.GetArrayViewFromImage(image), [0, *LABELS]
    if values.size and values.min() >= 0 and values.max() <= max(label_values):  # cheap before np.unique
        present = np.unique(values)
        if present.size > 1 and np.isin(present, label_values).all():
            raise CalidError(f"{source} holds only the values {', '.join(f'{v:g}' for v in present)}: a label map, "
                             "not an MR image; give the image (labels are read by calid volumes, or by "
                             "--input-segmentation)")
    return image


def warn_if_dicom_by_typo(path: str | os.PathLike | None, warn: Callable[[str], None]) -> None:
    """An output with a suffix that is no image format (a typo such as ``.nrd``) becomes a DICOM series folder of
    that name: say so through ``warn``."""
    if path is not None and Path(path).suffix and not has_image_suffix(path):
        warn(f"{path} has no image file suffix ({', '.join(FILE_SUFFIXES)}): it is written as a DICOM series into a "
             "folder of that name")


DIRECTION_TOLERANCE = 1e-3
"""How far from orthonormal the image axes may be: 0.06 degrees, 0.1 mm over 10 cm. NIfTI stores them in float32
(the 411 ACDC and Sunnybrook files: up to 2.6e-5)."""


def check_direction(image: sitk.Image, source: str = "input") -> None:
    """Refuse a sheared grid (image axes not at right angles, of a volume or a cine): NIfTI cannot store one (ITK
    would write the output a few mm off without a word) nor DICOM, and no scanner acquires short-axis slices so."""
    dimension = image.GetDimension()
    axes = np.asarray(image.GetDirection()).reshape(dimension, dimension)[:3, :3]
    if not np.allclose(axes.T @ axes, np.eye(3), atol=DIRECTION_TOLERANCE):
        unit = axes / np.maximum(np.linalg.norm(axes, axis=0), 1e-12)
        angles = np.degrees(np.arccos(np.clip([unit[:, 0] @ unit[:, 1], unit[:, 0] @ unit[:, 2],
                                                unit[:, 1] @ unit[:, 2]], -1, 1)))
        if np.allclose(angles, 90, atol=0.06):
            raise CalidError(f"{source} has a direction matrix whose axes are not of unit length: fix its header")
        raise CalidError(f"{source} has a sheared grid (its axes are {', '.join(f'{a:.2f}' for a in angles)} degrees "
                         "apart, not 90): resample it onto an orthogonal grid first")


def check_pixels(image: sitk.Image, source: str = "input") -> sitk.Image:
    """Refuse complex and non-finite voxels (of a volume or a whole cine); return the image."""
    if image.GetPixelID() in (sitk.sitkComplexFloat32, sitk.sitkComplexFloat64):
        raise CalidError(f"{source} has complex pixels: give a magnitude image")
    values = sitk.GetArrayViewFromImage(image)
    if not np.isfinite(values).all():
        bad = int(values.size - np.isfinite(values).sum())
        raise CalidError(f"{source} contains {bad} NaN/Inf voxels")
    return image


def output_folder(path: Path) -> Path:
    """The folder an output will be written in, checked to exist and be writable (one-line errors)."""
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise CalidError(f"output folder does not exist: {parent}")
    if not os.access(parent, os.W_OK):
        raise CalidError(f"output folder is not writable: {parent}")
    return parent


def check_output_path(path: str | os.PathLike) -> Path:
    """``output_folder``, and the output itself can be made there: a file format's path is not a folder, and a DICOM
    series' folder (a path without a file suffix) does not exist yet, as ``write_image`` would refuse after the run.
    Returns the folder."""
    path = Path(path)
    parent = output_folder(path)
    if has_image_suffix(path):
        if path.is_dir():
            raise CalidError(f"output path is a folder: {path}")
    elif path.is_dir():
        raise CalidError(f"output folder already exists: {path}")
    elif path.exists():
        raise CalidError(f"output {path} is a file without an image suffix (.nii.gz, .nrrd, ...); a path without one "
                         "is written as a new DICOM folder")
    return parent


def check_outputs(outputs: Sequence[str | os.PathLike | None], inputs: Sequence[str | os.PathLike | None]) -> None:
    """All of a run's output paths, checked before anything is computed or written: each one's folder exists and is
    writable, none is an input, and no two are the same (the map or the labels would replace the volume). A run
    that failed on its second output left its first one behind."""
    read = {Path(p).resolve() for p in inputs if p is not None}
    written: set[Path] = set()
    for path in (Path(p) for p in outputs if p is not None):
        check_output_path(path)
        resolved = path.resolve()
        if resolved in read:
            raise CalidError(f"output {path} would overwrite the input")
        if resolved in written:
            raise CalidError(f"two outputs are the same path: {path}")
        written.add(resolved)


@contextmanager
def writing(path: str | os.PathLike):
    """A failure of the file system while writing ``path`` (permissions ``os.access`` did not see, a full disk)
    becomes a one-line error."""
    try:
        yield
    except OSError as exc:
        raise CalidError(f"cannot write {path}: {exc.strerror or exc}") from None


def write_image(image: sitk.Image, path: str | os.PathLike, frame_times: Sequence[float] | None = None,
                identity: dict[str, str] | None = None, description: str = DICOM_DESCRIPTION,
                adjust: Callable[[Path], None] | None = None) -> Path:
    """Write atomically: a file format by its suffix, otherwise a DICOM series into the folder ``path``.

    A 4D (cine) image becomes, as DICOM, one file per slice and phase with its trigger time (0018,1060):
    ``frame_times`` (ms) when given, else the time axis' origin and spacing. A DICOM series is a new series named
    ``description`` in the patient and study of ``identity`` (``run_identity``; a new study when None).
    ``adjust``: called with a file format's written file before it is moved into place (what ITK cannot say).
    """
    path = Path(path)
    parent = check_output_path(path)
    with writing(path):
        _write_staged(image, path, parent, frame_times, identity or run_identity({}), description, adjust)
    return path


DETACHED_DATA_SUFFIXES = (".raw", ".zraw", ".raw.gz")
"""The data files ITK writes beside a ``.mhd`` or ``.nhdr`` header, named after it."""


def remove_output(path: str | os.PathLike) -> None:
    """Take back what ``write_image`` wrote at ``path`` (a DICOM folder, or a file and a detached header's data
    file): a run whose later output failed leaves no part of its result behind."""
    path = Path(path)
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
        return
    detached = path.suffix.lower() in (".mhd", ".nhdr")
    for file in [path] + [path.with_suffix(s) for s in DETACHED_DATA_SUFFIXES if detached]:
        file.unlink(missing_ok=True)


def _write_staged(image: sitk.Image, path: Path, parent: Path, frame_times: Sequence[float] | None,
                  identity: dict[str, str], description: str, adjust: Callable[[Path], None] | None) -> None:
    staging = staging_folder(parent)
    try:
        if has_image_suffix(path):
            try:
                sitk.WriteImage(image, str(staging / path.name), useCompression=str(path).endswith((".gz", ".nrrd", ".mha")))
            except RuntimeError as exc:
                raise CalidError(f"cannot write {path}: {_first_line(exc)}") from None
            if adjust is not None:
                adjust(staging / path.name)
            _move_into_place(staging, parent, header_name=path.name)
        else:
            _write_dicom_series(image, staging / "series", frame_times, identity, description)
            if path.exists():
                raise CalidError(f"output folder already exists: {path}")
            os.replace(staging / "series", path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _move_into_place(staging: Path, destination: Path, header_name: str) -> None:
    """Move data files first and the header last, so a reader never sees a header without its data."""
    names = sorted(p.name for p in staging.iterdir())
    for name in [n for n in names if n != header_name] + [header_name]:
        os.replace(staging / name, destination / name)


def _write_dicom_series(image: sitk.Image, folder: Path, frame_times: Sequence[float] | None,
                        identity: dict[str, str], description: str) -> None:
    """One MR image per slice along the third axis (and per phase of a cine), each with its own position and
    trigger time: a derived series of its own in ``identity``'s patient and study."""
    folder.mkdir()
    image, pixel_tags = _dicom_pixels(image)
    if image.GetDimension() == 4:
        count, origin, step = image.GetSize()[3], image.GetOrigin()[3], image.GetSpacing()[3]
        times = list(frame_times) if frame_times is not None else [origin + t * step for t in range(count)]
        frames = [(image[:, :, :, t], times[t]) for t in range(count)]
    else:
        frames = [(image, None)]
    direction = frames[0][0].GetDirection()
    series_uid = new_uid()
    series_tags = {
        **identity,
        "0008|0060": "MR",
        "0008|0008": "DERIVED\\SECONDARY",
        "0018|0020": "RM",  # scanning sequence and variant, required of an MR image: "research mode", none
        "0018|0021": "NONE",
        "0008|103e": description,
        "0020|000e": series_uid,
        "0020|0037": "\\".join(f"{v:.10g}" for v in (direction[0], direction[3], direction[6],
                                                          direction[1], direction[4], direction[7])),
        "0018|0050": f"{image.GetSpacing()[2]:.6g}",
        "0018|0088": f"{image.GetSpacing()[2]:.6g}",
        **pixel_tags,
    }
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for t, (volume, trigger_time) in enumerate(frames):
        for k in range(volume.GetDepth()):
            number = t * volume.GetDepth() + k + 1
            slice_image = volume[:, :, k:k + 1]  # 3D, so that GDCM writes the spacing between slices (2D: 1 mm)
            for tag, value in series_tags.items():
                slice_image.SetMetaData(tag, value)
            position = volume.TransformIndexToPhysicalPoint((0, 0, k))
            slice_image.SetMetaData("0020|0032", "\\".join(f"{v:.6f}" for v in position))
            slice_image.SetMetaData("0020|0013", str(number))
            slice_image.SetMetaData("0008|0018", f"{series_uid}.{number}")  # 44 + 6 characters: within 64
            name = f"slice{k + 1:04d}.dcm"
            if trigger_time is not None:
                slice_image.SetMetaData("0018|1060", f"{trigger_time:.6g}")
                slice_image.SetMetaData("0020|0100", str(t + 1))  # temporal position identifier
                name = f"phase{t + 1:03d}_{name}"
            writer.SetFileName(str(folder / name))
            try:
                writer.Execute(slice_image)
            except RuntimeError as exc:
                raise CalidError(f"cannot write DICOM series {folder}: {_first_line(exc)}") from None


DICOM_INTEGER_PIXELS = (sitk.sitkUInt8, sitk.sitkInt8, sitk.sitkUInt16, sitk.sitkInt16)
"""Pixel types a DICOM MR series stores as they are (checked: each reads back equal); 32-bit integers go in as 16
bits when their values fit, else with a rescale slope like floats."""


def _dicom_pixels(image: sitk.Image) -> tuple[sitk.Image, dict[str, str]]:
    """DICOM stores integers: integer volumes go in as they are; any other (a float input, the uncertainty map) as
    16-bit values with a rescale slope and intercept over its range, which every reader applies (each value read back
    within half a slope, 1/130000 of the range): unsigned from 0 when the minimum is 0 (so that the map's zeros stay
    exactly 0), else signed around the range's middle. A plain cast to int16 had dropped the fractions, wrapped
    values over 32767 and written the map, a fraction of an intensity unit, as zeros."""
    if image.GetPixelID() in DICOM_INTEGER_PIXELS:
        return image, {}
    values = sitk.GetArrayViewFromImage(image)
    low, high = float(values.min()), float(values.max())
    if image.GetPixelID() in (sitk.sitkUInt32, sitk.sitkInt32):  # an MR image holds 8 or 16 bits, not 32
        for pixel, dtype in ((sitk.sitkInt16, np.int16), (sitk.sitkUInt16, np.uint16)):
            if np.iinfo(dtype).min <= low and high <= np.iinfo(dtype).max:
                return sitk.Cast(image, pixel), {}
    if low == 0:  # unsigned from an intercept of 0: a 0 (the map on acquired slices) reads back exactly 0
        intercept, slope, signed = 0.0, float(f"{max(high, 1e-12) / 65000:.8g}"), "0"
    else:
        intercept = float(f"{(low + high) / 2:.8g}")  # a DICOM decimal string holds at most 16 characters
        slope, signed = float(f"{max(high - low, 1e-12) / 65000:.8g}"), "1"
    tags = {"0028|1052": f"{intercept:.8g}", "0028|1053": f"{slope:.8g}", "0028|0100": "16", "0028|0101": "16",
            "0028|0102": "15", "0028|0103": signed}
    return sitk.Cast(image, sitk.sitkFloat64), tags


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    # ITK messages start with a file/line banner; the description is the most useful line, then the ITK ERROR
    # line (a "Reason:" line after it can be a stale errno: "No such file or directory" for a file that is there).
    for line in lines:
        if line.lower().startswith("description:"):
            return line.split(":", 1)[1].strip()
    for i, line in enumerate(lines):
        if line.startswith("ITK ERROR:"):
            message = re.sub(r"^ITK ERROR: \w+\(0x[0-9a-f]+\): ", "", line)
            if message.endswith(":") and i + 1 < len(lines):  # NRRD's reason is its library's last line
                message += " " + re.sub(r"^\[\w+\] (_?\w+: )?", "", lines[-1])
            return message
    return lines[-1] if lines else type(exc).__name__
