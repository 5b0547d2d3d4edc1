"""The logics with the worker started as in Slicer: through a launcher (``launcher_standin.py``, a stand-in for
CTKAppLauncher, which ``PythonSlicer`` is) with the real Python below it, on slicer-core's MRML scene.

Cancel, Stop and leaving the module must end that real Python, for a cold worker, a standby worker and training;
closing the scene must cancel a run and load nothing into the next scene.
"""

from __future__ import annotations

import time

import psutil
import pytest

pytest.importorskip("slicer", reason="slicer-core is not installed")

from CaLIDLib import CaLIDTrainingLogic, CaLIDUpsampleLogic  # noqa: E402
from test_slicer_logic import private_tmp, sample_array, scene, volume_node, volumes  # noqa: E402,F401 (fixtures)
from test_slicer_training import FAST, models, nodes  # noqa: E402,F401 (fixtures)
from test_worker import ended  # noqa: E402

pytestmark = [pytest.mark.slicer, pytest.mark.slow]
SLOW_RUN = dict(factor=4, device="cpu", steps=200)  # long enough to be cancelled in the middle


def real_pythons(worker) -> list[psutil.Process]:
    """The processes below the worker's launcher, once it has started them."""
    deadline = time.monotonic() + 20
    while not (children := psutil.Process(worker.process.pid).children(recursive=True)) and time.monotonic() < deadline:
        time.sleep(0.02)
    return children


class CancelWhen:
    """A progress callback that cancels once ``ready(fraction)``, noting the time and the real Pythons then."""

    def __init__(self, logic, ready):
        self.logic, self.ready = logic, ready
        self.at: float | None = None
        self.pythons: list[psutil.Process] = []

    def __call__(self, fraction, stage, eta):
        if self.at is None and self.ready(fraction):
            self.pythons = real_pythons(self.logic.job.worker)
            self.at = time.monotonic()
            self.logic.cancel()

    def assert_stopped_by_sigterm(self):
        """Every real Python ended, and before the grace's SIGKILL: the SIGTERM reached them."""
        took = time.monotonic() - self.at
        assert self.pythons and all(ended(p) for p in self.pythons), "a real Python under the launcher went on"
        assert took < 4, f"{took:.1f} s from cancel to the end of the run"


def test_cancel_of_a_cold_run_ends_the_real_python(scene, sample_array, tiny_model_dir, private_tmp, python_launcher):
    node = volume_node(scene, sample_array)
    logic = CaLIDUpsampleLogic(scene, python=python_launcher)
    cancel = CancelWhen(logic, lambda fraction: fraction > 0)
    before = volumes(scene)
    assert logic.process(node, **SLOW_RUN, model=str(tiny_model_dir), progressCallback=cancel) is None
    cancel.assert_stopped_by_sigterm()
    assert volumes(scene) == before and list(private_tmp.iterdir()) == []


def test_cancel_of_a_standby_run_and_leaving_the_module_end_the_real_pythons(scene, sample_array, tiny_model_dir,
                                                                             private_tmp, python_launcher):
    node = volume_node(scene, sample_array)
    logic = CaLIDUpsampleLogic(scene, python=python_launcher)
    logic.setStandby(True)
    first = logic.standby
    cancel = CancelWhen(logic, lambda fraction: fraction > 0.2)
    assert logic.process(node, **SLOW_RUN, model=str(tiny_model_dir), progressCallback=cancel) is None
    assert cancel.logic.job is None and first.cancelled
    cancel.assert_stopped_by_sigterm()
    waiting = real_pythons(logic.standby)
    assert waiting and logic.standby.isStandingBy
    logic.setStandby(False)  # what leaving the module does
    deadline = time.monotonic() + 4
    while not all(ended(p) for p in waiting) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(ended(p) for p in waiting), "the waiting worker's real Python outlived the module"
    assert list(private_tmp.iterdir()) == []


def test_stop_of_training_ends_the_real_python(scene, nodes, tiny_model_dir, private_tmp, models, python_launcher):
    """That the checkpoint is kept is test_slicer_training's (the same SIGTERM, without a launcher)."""
    logic = CaLIDTrainingLogic(scene, python=python_launcher)
    stop = CancelWhen(logic, lambda fraction: True)
    assert logic.train(nodes, baseModel=str(tiny_model_dir), steps=40, outputName="stopped", progressCallback=stop,
                       **FAST) is None
    stop.assert_stopped_by_sigterm()
    assert not (models / "stopped").exists() and list(private_tmp.iterdir()) == []


@pytest.mark.parametrize("worker_done", [False, True], ids=["while it runs", "just after its worker ended"])
def test_closing_the_scene_cancels_the_run_and_loads_nothing(scene, sample_array, tiny_model_dir, private_tmp,
                                                             python_launcher, worker_done):
    node = volume_node(scene, sample_array)
    logic = CaLIDUpsampleLogic(scene, python=python_launcher)
    finished = []
    options = dict(factor=2, device="cpu", steps=1) if worker_done else SLOW_RUN
    logic.process(node, **options, model=str(tiny_model_dir), waitForCompletion=False,
                  onFinished=lambda *result: finished.append(result))
    worker = logic.job.worker
    if worker_done:
        worker.process.wait(60)
    scene.Clear(0)
    while logic.poll():
        time.sleep(0.05)
    assert finished == [(None, None)] and volumes(scene) == 0
    assert worker.returncode == (0 if worker_done else -15)  # -15: the launcher, ended by SIGTERM
    assert list(private_tmp.iterdir()) == []
