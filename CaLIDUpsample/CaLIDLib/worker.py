"""A background worker process whose output lines are read on a thread and handed over on ``poll()``.

The caller decides when to poll: a ``qt.QTimer`` in the Slicer panel (the UI never blocks), or a loop in
blocking mode (``waitForCompletion=True``), so this class needs no Qt. Cancel first asks politely
(SIGTERM: ``calid`` exits with code 130; ``upsample`` writes nothing, ``train`` keeps its last checkpoint),
then kills the whole process tree (``PythonSlicer`` is a launcher whose child is the real Python).

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


class WorkerProcess:
    def __init__(self, command: list[str], env: dict[str, str] | None = None):
        self.command = command
        self.env = env
        self.lines: queue.Queue[str] = queue.Queue()
        self.process: subprocess.Popen | None = None
        self.cancelled = False
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
        self.process = subprocess.Popen(
            self.command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            bufsize=1, env=self.env, start_new_session=(os.name != "nt"),
        )
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
        """Deliver the lines read so far; True while the process runs or lines remain unread."""
        while True:
            try:
                on_line(self.lines.get_nowait())
            except queue.Empty:
                break
        running = self.process is not None and self.process.poll() is None
        reading = self._reader is not None and self._reader.is_alive()
        return running or reading or not self.lines.empty()

    def wait(self, on_line: Callable[[str], None], interval: float = 0.05) -> int:
        while self.poll(on_line):
            time.sleep(interval)
        return self.returncode

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def cancel(self, grace: float = GRACE_SECONDS) -> None:
        """SIGTERM, then after ``grace`` seconds kill every process of the tree."""
        if self.process is None or self.process.poll() is not None:
            return
        self.cancelled = True
        self.process.terminate()
        try:
            self.process.wait(grace)
        except subprocess.TimeoutExpired:
            self._kill_tree()

    def _kill_tree(self) -> None:
        try:
            import psutil

            parent = psutil.Process(self.process.pid)
            for child in parent.children(recursive=True):
                child.kill()
            parent.kill()
        except ImportError:  # no psutil: the process group started with the worker covers its children
            if os.name != "nt":
                os.killpg(self.process.pid, signal.SIGKILL)
            else:
                self.process.kill()
        except Exception:  # already gone
            pass
        self.process.wait()
