"""Hidden staging files and folders beside an output, named after the process that writes them.

Every output (an image, a cine's sequence file, a model folder) is written under a hidden ``.calid-...`` name in its
destination folder and renamed into place when complete, so no reader ever sees half of it. A run that is killed
outright (SIGKILL, the out-of-memory killer) skips its cleanup and leaves that hidden name behind, a cine's worth of
bytes where a user does not look. The name holds the host, its process-id namespace (containers on one host have
their own) and the process id, so the next write into the same folder removes what a process of this host and
namespace that no longer runs left there. Another host's or container's leftovers (a shared disk) and anything on
Windows, where a process cannot be probed without a library, are left alone.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

PREFIX = ".calid-"


def _host() -> str:
    """This host's name, file-safe, with the inode of its process-id namespace where Linux names one: a process in
    another namespace (a container) sees other process ids and must not judge this one's files."""
    try:
        namespace = "." + re.sub(r"\D", "", os.readlink("/proc/self/ns/pid"))
    except OSError:  # not Linux: one namespace
        namespace = ""
    return (re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname()) or "host") + namespace


_HOST = _host()
_NAME = re.compile(rf"^{re.escape(PREFIX)}(?:[a-z]+-)?(?P<host>[A-Za-z0-9._]+)-(?P<pid>\d+)-")


def staging_folder(parent: Path, kind: str = "") -> Path:
    """A new private folder in ``parent`` to write into (``kind``, such as "model", names what it holds), after
    removing what killed runs of this host left in ``parent``."""
    remove_leftovers(parent)
    return Path(tempfile.mkdtemp(prefix=_prefix(kind), dir=parent))


def staging_file(parent: Path, suffix: str) -> tuple[int, str]:
    """``tempfile.mkstemp``'s open handle and path of a new file in ``parent``, likewise, with the permissions the
    user's umask gives any new file (``mkstemp`` makes it private, and the renamed output kept that)."""
    remove_leftovers(parent)
    handle, path = tempfile.mkstemp(prefix=_prefix(""), suffix=suffix, dir=parent)
    if hasattr(os, "fchmod"):  # POSIX; Windows has no such bits to set
        os.fchmod(handle, 0o666 & ~current_umask())
    return handle, path


def current_umask() -> int:
    """The process's umask (reading it means setting it: it is set back at once)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def remove_leftovers(parent: Path) -> list[Path]:
    """Remove the staging files and folders in ``parent`` whose process, on this host, has ended; return them."""
    if os.name != "posix":
        return []
    removed = []
    try:
        entries = list(Path(parent).iterdir())
    except OSError:
        return []
    for entry in entries:
        match = _NAME.match(entry.name)
        if match is None or match["host"] != _HOST or _running(int(match["pid"])):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def _prefix(kind: str) -> str:
    return f"{PREFIX}{kind + '-' if kind else ''}{_HOST}-{os.getpid()}-"


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists (POSIX signal 0 probes without signalling); one of another user counts."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
