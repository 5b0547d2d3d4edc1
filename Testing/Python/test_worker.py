"""WorkerProcess with real processes: stopping a worker that runs under a launcher, as ``PythonSlicer`` is, and
reading what it prints. The launcher is ``launcher_standin.py`` (a stand-in for CTKAppLauncher, conftest)."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil
import pytest

from CaLIDLib import WorkerLogic, worker
from CaLIDLib.worker import WorkerProcess, kill_tree

SLEEPER = "import time; print('ready', flush=True); time.sleep(30)"
STUBBORN = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(30)"


def ended(process: psutil.Process) -> bool:
    """Gone, or a zombie nobody has reaped yet (an orphan's new parent may be slow to, or never do it)."""
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
def started(python_launcher):
    """Start ``python -c CODE`` under the launcher; yields (worker, the real Python, its lines) once it printed."""
    workers = []

    def start(code: str):
        process = WorkerProcess([python_launcher, "-c", code])
        process.start()
        workers.append(process)
        lines = []
        deadline = time.monotonic() + 20
        while "ready" not in lines and time.monotonic() < deadline:
            process.poll(lines.append)
            time.sleep(0.02)
        (real,) = psutil.Process(process.process.pid).children()
        return process, real, lines

    yield start
    for process in workers:  # whatever a failing test left running
        for child in psutil.Process(process.process.pid).children(recursive=True) if process.process.poll() is None else []:
            child.kill()
        process.process.kill()


def test_cancel_stops_the_real_python_under_the_launcher(started):
    process, real, lines = started(SLEEPER)
    begun = time.monotonic()
    process.cancel()
    process.wait(lines.append)
    assert time.monotonic() - begun < 3, "the worker under the launcher went on after cancel"
    assert ended(real) and process.cancelled


def test_a_worker_that_ignores_sigterm_is_killed_after_the_grace(started):
    process, real, lines = started(STUBBORN)
    begun = time.monotonic()
    process.cancel(grace=0.5)
    process.wait(lines.append)
    assert 0.5 <= time.monotonic() - begun < 3
    assert ended(real)


def test_kill_tree_kills_the_launchers_children_first(started):
    """The Windows way (no SIGTERM there), run here on the same kind of tree."""
    process, real, lines = started(SLEEPER)
    kill_tree(process.process)
    process.wait(lines.append)
    assert ended(real) and process.returncode is not None


def test_output_is_read_as_utf8_and_an_undecodable_byte_does_not_stop_the_reader():
    code = r"import sys; sys.stdout.buffer.write(b'caf\xe9 \xc2\xb5m\n'); sys.stdout.flush(); print('after')"
    process = WorkerProcess([sys.executable, "-c", code])
    process.start()
    lines = []
    assert process.wait(lines.append) == 0
    assert lines == ["caf\ufffd \u00b5m", "after"]
    assert WorkerLogic.workerEnvironment()["PYTHONIOENCODING"] == "utf-8"


class StartupInfo:
    """Stand-in for Windows' ``subprocess.STARTUPINFO``, which Python defines only on Windows."""

    dwFlags = 0
    wShowWindow = 1


@pytest.mark.parametrize("windows", [True, False])
def test_popen_arguments_hide_the_console_on_windows_and_group_the_tree_elsewhere(monkeypatch, windows):
    calls = []
    monkeypatch.setattr(worker, "WINDOWS", windows)
    monkeypatch.setattr(subprocess, "STARTUPINFO", StartupInfo, raising=False)
    monkeypatch.setattr(subprocess, "Popen", lambda command, **kwargs: calls.append(kwargs))
    monkeypatch.setattr(worker.threading, "Thread", lambda **kwargs: type("Idle", (), {"start": lambda self: None})())
    WorkerProcess(["PythonSlicer", "-m", "calid", "devices"]).start()
    (options,) = calls
    assert options["encoding"] == "utf-8" and options["errors"] == "replace"
    if windows:
        assert options["creationflags"] & 0x08000000  # CREATE_NO_WINDOW
        assert options["startupinfo"].dwFlags & 0x1 and options["startupinfo"].wShowWindow == 0  # SW_HIDE
        assert "start_new_session" not in options
    else:
        assert options["start_new_session"] and "creationflags" not in options
