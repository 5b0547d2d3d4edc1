"""A background worker process whose output lines are read on a thread and handed over on ``poll()``.

The caller decides when to poll: a ``qt.QTimer`` in the Slicer panel (the UI never blocks), or a loop in
blocking mode (``waitForCompletion=True``), so this class needs no Qt.

The worker is a process tree, not one process: ``PythonSlicer`` is a CTKAppLauncher, which starts the real
Python (``python-real``) as its child, lets it write to the inherited stdout and forwards no signal. Stopping
only the launcher leaves the real worker computing, orphaned. So cancel addresses the whole tree:

- POSIX: the worker starts in a session of its own, and the process group (launcher and real Python alike)
  gets SIGTERM (``calid`` exits with code 130: ``upsample`` writes nothing, ``train`` keeps its last
  checkpoint), then SIGKILL if it still runs ``GRACE_SECONDS`` later. ``cancel`` returns at once; ``poll``
  sends the SIGKILL, so the panel never freezes.
- Windows: there is no SIGTERM (``terminate`` is already a kill); the children are killed first, while the
  launcher can still name them, then the launcher (``kill_tree``). ``train``'s checkpoint is written
  atomically, so it survives the kill.

Output is read as UTF-8 (``PYTHONIOENCODING=utf-8`` in ``WorkerLogic.workerEnvironment``), undecodable bytes
replaced: with the locale's codec one odd byte would end the reader and the pipe would stop draining. On
Windows the console window of ``PythonSlicer.exe`` is hidden, as Slicer's own ``launchConsoleProcess`` does.

A standby worker (``WorkerProcess.standby``) is started before its run is known: ``calid standby`` imports the
engine and waits for a command file in a folder of its own; ``send`` writes that file, after which it is an
ordinary worker. ``discard`` removes the folder (a standby worker still waiting then ends by itself).
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

from calid.standby import hand_over

GRACE_SECONDS = 5.0
WINDOWS = os.name == "nt"
CREATE_NO_WINDOW = 0x08000000  # subprocess.CREATE_NO_WINDOW, which only Windows' subprocess defines
STARTF_USESHOWWINDOW, SW_HIDE = 0x1, 0


def popen_options() -> dict:
    """``Popen`` keywords for a worker: a tree that cancel can reach, read as UTF-8, no console window.

    POSIX: a session (and process group) of its own, which the real Python under the launcher shares.
    Windows: no console window (``PythonSlicer.exe`` is a console program): no console for the launcher, and a
    hidden window should one be made, as Slicer's ``launchConsoleProcess`` asks.
    """
    options = dict(stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, encoding="utf-8",
                   errors="replace", bufsize=1)
    if WINDOWS:
        startup = subprocess.STARTUPINFO()
        startup.dwFlags |= STARTF_USESHOWWINDOW
        startup.wShowWindow = SW_HIDE
        options.update(creationflags=CREATE_NO_WINDOW, startupinfo=startup)
    else:
        options.update(start_new_session=True)
    return options


def kill_tree(process: subprocess.Popen) -> None:
    """Kill ``process`` and everything below it: the children first, found while the launcher still lives."""
    try:
        import psutil
    except ImportError:  # psutil comes with CaLID's requirements; before they are installed, Windows' own tool
        if WINDOWS:
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(process.pid)], capture_output=True,
                           creationflags=CREATE_NO_WINDOW)
        else:
            process.kill()
        return
    try:
        children = psutil.Process(process.pid).children(recursive=True)
    except psutil.Error:  # already gone
        children = []
    for child in children:
        try:
            child.kill()
        except psutil.Error:
            pass
    if process.poll() is None:
        process.kill()


class WorkerProcess:
    def __init__(self, command: list[str], env: dict[str, str] | None = None):
        self.command = command
        self.env = env
        self.lines: queue.Queue[str] = queue.Queue()
        self.process: subprocess.Popen | None = None
        self.cancelled = False
        self._kill_at: float | None = None
        """When a cancelled POSIX worker still running gets SIGKILL (``poll`` sends it)."""
        self._reader: threading.Thread | None = None
        self.handoff: Path | None = None
        """A standby worker's folder, where ``send`` writes its command file."""

    @classmethod
    def standby(cls, python: str, env: dict[str, str] | None = None) -> "WorkerProcess":
        """A started ``calid standby`` worker: importing now, its run to come through ``send``."""
        handoff = Path(tempfile.mkdtemp(prefix="CaLID-standby-"))
        worker = cls([python, "-m", "calid", "standby", "--command-file", str(handoff / "command.json")], env)
        worker.handoff = handoff
        worker.start()
        return worker

    def start(self) -> None:
        self.process = subprocess.Popen(self.command, env=self.env, **popen_options())
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def isStandingBy(self) -> bool:
        """A standby worker alive and still waiting for its run."""
        return self.handoff is not None and self.command[3] == "standby" and self.process.poll() is None

    def send(self, arguments: list[str]) -> None:
        """Give a standby worker its run: ``calid`` followed by ``arguments`` (written whole, then renamed)."""
        assert self.handoff is not None
        hand_over(self.handoff / "command.json", json.dumps(arguments))
        self.command = [*self.command[:3], *arguments]

    def discard(self) -> None:
        """Remove a standby worker's folder; if it is still waiting, it ends by itself."""
        if self.handoff is not None:
            shutil.rmtree(self.handoff, ignore_errors=True)

    def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))
        self.process.stdout.close()

    def poll(self, on_line: Callable[[str], None]) -> bool:
        """Deliver the lines read so far; True while the process runs or lines remain unread.

        The real Python under a launcher holds the pipe: the reader ends only when it has ended too."""
        if self._kill_at is not None and time.monotonic() >= self._kill_at:
            self._kill_at = None
            self._signal_group(signal.SIGKILL)
        while True:
            try:
                on_line(self.lines.get_nowait())
            except queue.Empty:
                break
        running = self.process is not None and self.process.poll() is None
        reading = self._reader is not None and self._reader.is_alive()
        if not (running or reading):
            self._kill_at = None  # the tree has ended: its group id may be reused
        return running or reading or not self.lines.empty()

    def wait(self, on_line: Callable[[str], None], interval: float = 0.05) -> int:
        while self.poll(on_line):
            time.sleep(interval)
        return self.returncode

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def cancel(self, grace: float = GRACE_SECONDS) -> None:
        """Stop the whole tree and return at once: POSIX, SIGTERM to the group now and SIGKILL from ``poll`` after
        ``grace`` seconds; Windows, ``kill_tree`` now."""
        if self.process is None or self.cancelled or self.process.poll() is not None:
            return
        self.cancelled = True
        if WINDOWS:
            kill_tree(self.process)
        else:
            self._kill_at = time.monotonic() + grace
            self._signal_group(signal.SIGTERM)

    def _signal_group(self, signum: int) -> None:
        """``signum`` to the worker's process group (its id is the launcher's, which started the session)."""
        try:
            os.killpg(self.process.pid, signum)
        except (ProcessLookupError, PermissionError):  # the whole group has ended
            pass
