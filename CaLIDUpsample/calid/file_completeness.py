"""Cut image files refused before ITK reads them.

A download or copy that stopped early leaves a file whose header promises more voxels than follow it. ITK's readers
handle that badly: the NIfTI reader fills the missing voxels with zeros and says nothing (a volume with empty slices),
MetaIO prints its own lines on the console before the error. ``check_complete`` compares the bytes there are with
those the header promises and raises the one-line error itself; a header it cannot parse is left to ITK, which says
what is wrong with it.
"""

from __future__ import annotations

import gzip
import re
import struct
import zlib
from pathlib import Path

from .errors import CalidError

METAIMAGE_TYPE_BYTES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
                        "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4,
                        "MET_DOUBLE": 8}
"""Bytes of each MetaIO element type (MetaIO's own table; MET_LONG is 4 bytes there on every platform)."""
METAIMAGE_HEADER_LIMIT = 1 << 16
"""A MetaImage header is a few hundred bytes of ``key = value`` lines; reading stops here if it does not end."""


def check_complete(path: Path) -> None:
    """Raise ``CalidError`` if the NIfTI or MetaImage file ``path`` holds fewer bytes than its header promises."""
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        _check_nifti(path)
    elif name.endswith((".mha", ".mhd")):
        _check_metaimage(path)


def _incomplete(path: Path, size: int, promised: int) -> CalidError:
    return CalidError(f"cannot read {path}: the file is incomplete ({size} bytes where its header promises "
                      f"{promised})")


def _check_nifti(path: Path) -> None:
    """ITK's NIfTI reader fills the voxels a truncated file lacks with zeros and says nothing (a cut download became
    a volume with empty slices): compare the bytes there are with those the header promises, a gzip stream with
    its end marker."""
    try:
        if path.name.lower().endswith(".gz"):
            with gzip.open(path, "rb") as stream:
                header = stream.read(540)
                size = len(header) + sum(len(chunk) for chunk in iter(lambda: stream.read(1 << 22), b""))
        else:
            with open(path, "rb") as stream:
                header = stream.read(540)
            size = path.stat().st_size
    except (OSError, EOFError, zlib.error) as exc:  # a bad or cut gzip stream
        raise CalidError(f"cannot read {path}: the file is damaged or incomplete ({exc})") from None
    promised = _nifti_bytes(header)
    if promised is not None and size < promised:
        raise _incomplete(path, size, promised)


def _nifti_bytes(header: bytes) -> int | None:
    """Header and voxel bytes a NIfTI-1 or NIfTI-2 header describes (None when it is neither: ITK will say so)."""
    for endian in "<>":
        if len(header) >= 348 and struct.unpack(endian + "i", header[:4])[0] == 348:
            dims = struct.unpack(endian + "8h", header[40:56])
            bitpix = struct.unpack(endian + "h", header[72:74])[0]
            offset = int(struct.unpack(endian + "f", header[108:112])[0])
        elif len(header) >= 540 and struct.unpack(endian + "i", header[:4])[0] == 540:
            bitpix = struct.unpack(endian + "h", header[14:16])[0]
            dims = struct.unpack(endian + "8q", header[16:80])
            offset = struct.unpack(endian + "q", header[168:176])[0]
        else:
            continue
        if not 1 <= dims[0] <= 7 or bitpix <= 0:
            return None
        voxels = 1
        for extent in dims[1: dims[0] + 1]:
            voxels *= max(int(extent), 1)
        return offset + voxels * bitpix // 8
    return None


def _check_metaimage(path: Path) -> None:
    """A MetaImage's voxels: after its header (``.mha``, ``ElementDataFile = LOCAL``) or in the one file the header
    names (``.mhd``). Compressed voxels are checked against ``CompressedDataSize`` when the header gives it."""
    try:
        with open(path, "rb") as stream:
            head = stream.read(METAIMAGE_HEADER_LIMIT)
        fields, header_bytes = _metaimage_header(head)
        if fields is None:
            return
        data_file = fields.get("ElementDataFile", "")
        if data_file.upper() == "LOCAL":  # MetaIO reads the word in any case
            size = path.stat().st_size - header_bytes
        elif data_file and "%" not in data_file and " " not in data_file and data_file.upper() != "LIST":
            data_path = path.parent / data_file
            if not data_path.is_file():
                raise CalidError(f"cannot read {path}: its voxel file {data_file} is not beside it")
            size = data_path.stat().st_size
        else:
            return  # a list or pattern of slice files: ITK checks each
    except OSError as exc:
        raise CalidError(f"cannot read {path}: {exc.strerror or exc}") from None
    promised = _metaimage_bytes(fields)
    if promised is not None and size < promised:
        raise _incomplete(path, size, promised)


def _metaimage_header(head: bytes) -> tuple[dict[str, str] | None, int]:
    """The ``key = value`` fields of a MetaImage header and its length in bytes (up to the end of the
    ``ElementDataFile`` line, which ends it); (None, 0) when ``head`` is not one."""
    fields, offset = {}, 0
    for line in head.splitlines(keepends=True):
        offset += len(line)
        match = re.match(rb"^\s*([^=\s]+)\s*=\s*(.*?)\s*$", line)
        if match is None:
            return None, 0
        key, value = match.group(1).decode("ascii", "replace"), match.group(2).decode("utf-8", "replace")
        fields[key] = value
        if key == "ElementDataFile":
            return fields, offset
    return None, 0


def _metaimage_bytes(fields: dict[str, str]) -> int | None:
    """Voxel bytes a MetaImage header promises (None when it does not say, or names a type MetaIO does not)."""
    try:
        if fields.get("CompressedData", "False").lower() == "true":
            return int(fields["CompressedDataSize"]) if "CompressedDataSize" in fields else None
        voxels = 1
        for extent in fields["DimSize"].split():
            voxels *= int(extent)
        channels = int(fields.get("ElementNumberOfChannels", "1"))
        return voxels * channels * METAIMAGE_TYPE_BYTES[fields["ElementType"]]
    except (KeyError, ValueError):
        return None
