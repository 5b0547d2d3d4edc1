"""CaLIDTrainingLogic against slicer-core's real MRML scene, with the real ``calid train`` worker.

The base model is the session's tiny random model; the training volumes are crops of the committed sample.
"""

from __future__ import annotations

import json
import math
import sys
import time

import numpy as np
import pytest
import SimpleITK as sitk

pytest.importorskip("slicer", reason="slicer-core is not installed")

from CaLIDLib import CaLIDTrainingLogic, WorkerError  # noqa: E402
from CaLIDLib.volumes import write_nodes  # noqa: E402
from calid.modelindex import list_models  # noqa: E402
from calid.training.checkpoint import read_checkpoint_info  # noqa: E402
from test_slicer_logic import node_array, private_tmp, ras, scene, volume_node  # noqa: E402,F401 (fixtures)

pytestmark = [pytest.mark.slicer, pytest.mark.slow]
FAST = {"batchSize": 2, "device": "cpu", "validationFraction": 0.5}


@pytest.fixture
def nodes(scene, sample_image):
    """Two 'patients' in the scene: a 64x64 crop of the sample (12 slices, 8 mm, oblique) and its mirror image."""
    array = sitk.GetArrayFromImage(sample_image[32:96, 24:88, :])
    return [volume_node(scene, array, name="SAX a"), volume_node(scene, array[:, :, ::-1].copy(), name="SAX b")]


@pytest.fixture
def models(tmp_path):
    """The user models folder of this test (conftest points CALID_MODELS_DIR there); runs go beside it."""
    return tmp_path / "user-models"


def steps_in(logic) -> list[int]:
    return list(logic.curves.rows())


def test_scene_volumes_are_exported_with_their_geometry(scene, nodes, tmp_path):
    twin = volume_node(scene, np.zeros((4, 5, 6), np.int16), name="SAX a")  # same name as another node
    paths = write_nodes([*nodes, twin], tmp_path / "data")
    assert [p.name for p in paths] == ["SAX_a.nrrd", "SAX_b.nrrd", "SAX_a_2.nrrd"]
    for node, path in zip(nodes, paths):
        image = sitk.ReadImage(str(path))
        assert np.array_equal(sitk.GetArrayFromImage(image), node_array(node))
        for ijk in ((0, 0, 0), (63, 0, 0), (0, 63, 11), (40, 17, 5)):
            lps = np.array(image.TransformIndexToPhysicalPoint(ijk))
            np.testing.assert_allclose(lps * [-1, -1, 1], ras(node, ijk), atol=1e-4)


def test_fine_tuning_from_scene_volumes_end_to_end(scene, nodes, tiny_model_dir, private_tmp, models):
    logic = CaLIDTrainingLogic(scene, python=sys.executable)
    logic.setStandby(True)  # as the panel does: the run goes to a worker that has imported the engine already
    first = logic.standby
    log, progress = [], []
    logic.logCallback = log.append
    model = logic.train(nodes, baseModel=str(tiny_model_dir), steps=10, outputName="site", **FAST,
                        progressCallback=lambda f, stage, eta: progress.append((f, eta, len(steps_in(logic)))))
    assert model == models / "site" and (model / "model.safetensors").is_file()
    assert {"name": "site", "source": "user"}.items() <= next(m for m in list_models() if m["name"] == "site").items()
    card = json.loads((model / "model.json").read_text(encoding="utf-8"))
    assert card["name"] == "site" and card["training"]["denoiser_steps"] == 10
    assert "SAX a" in card["description"]
    # The scene's volumes went to the worker through a temporary folder, gone after the run: the card names them
    assert card["training"]["data"] == ["3D Slicer volumes " + ", ".join(n.GetName() for n in nodes)]

    fractions = [f for f, _, _ in progress]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    assert any(eta is not None for _, eta, _ in progress)
    rows = logic.curves.rows()
    assert any(0 < seen < len(rows) for _, _, seen in progress), "the table should fill while the run goes on"
    assert list(rows) == [2, 4, 5, 6, 8, 10]  # validation every 2 steps, loss every 5
    assert all(math.isfinite(rows[s]["loss"]) for s in (5, 10))
    assert all(math.isfinite(rows[s]["val_psnr_model"]) and math.isfinite(rows[s]["val_psnr_linear"]) for s in (2, 10))
    assert logic.curves.psnrChart.GetNumberOfPlotSeriesNodes() == 2
    assert logic.curves.lossChart.GetNumberOfPlotSeriesNodes() == 1
    assert any(line.startswith("step 5: loss") for line in log) and any("validation PSNR" in line for line in log)
    assert (models.parent / "runs" / "site" / "metrics.csv").is_file()
    assert first.command[3] == "train" and first.returncode == 0
    logic.setStandby(False)
    assert list(private_tmp.iterdir()) == []


def test_a_time_limit_ends_the_training_and_keeps_the_model_as_it_is_then(scene, nodes, tiny_model_dir, private_tmp,
                                                                         models):
    logic = CaLIDTrainingLogic(scene, python=sys.executable)
    progress = []
    model = logic.train(nodes, baseModel=str(tiny_model_dir), steps=500, timeLimitMinutes=0.0001, outputName="quick",
                        **FAST, progressCallback=lambda f, stage, eta: progress.append(f))
    card = json.loads((model / "model.json").read_text(encoding="utf-8"))
    assert card["training"]["denoiser_steps"] == 500 and card["training"]["denoiser_steps_trained"] == 1
    assert progress[-1] == pytest.approx(1.0) and list(private_tmp.iterdir()) == []


def test_stop_keeps_a_checkpoint_and_resume_finishes_the_run(scene, nodes, tiny_model_dir, private_tmp, models):
    logic = CaLIDTrainingLogic(scene, python=sys.executable)
    settings = dict(baseModel=str(tiny_model_dir), steps=40, outputName="stopped", checkpointEvery=5, **FAST)
    checkpoint = models.parent / "runs" / "stopped" / "checkpoint.safetensors"
    seen, finished = [], []
    assert logic.train(nodes, **settings, waitForCompletion=False, onFinished=lambda *r: finished.append(r),
                       progressCallback=lambda f, stage, eta: seen.append(f)) is None
    worker = logic.job.worker
    while logic.poll():
        if not worker.cancelled and seen and seen[-1] >= 0.4 and checkpoint.is_file():
            logic.stop()
        time.sleep(0.05)
    assert worker.returncode == 130, "SIGTERM should end calid train cleanly, not by a kill after the grace period"
    assert finished == [(None, None)] and not logic.isRunning
    stopped_at = read_checkpoint_info(checkpoint)["step"]
    assert 5 <= stopped_at < 40 and stopped_at % 5 == 0
    assert not (models / "stopped").exists() and list(private_tmp.iterdir()) == []
    assert CaLIDTrainingLogic.canResume("stopped")
    with pytest.raises(ValueError, match="resume it"):
        logic.train(nodes, **settings)

    model = logic.train(nodes, **settings, resume=True)
    assert model == models / "stopped"
    assert "stopped" in {m["name"] for m in list_models()}
    assert read_checkpoint_info(checkpoint)["step"] == 40
    steps = steps_in(logic)
    assert steps == sorted(set(steps)) and steps[-1] == 40 and 5 in steps  # history kept, nothing twice
    assert list(private_tmp.iterdir()) == []


def test_data_folder_is_passed_as_is_and_worker_errors_are_raised(scene, tmp_path, tiny_model_dir, private_tmp, models,
                                                                  monkeypatch):
    folder = tmp_path / "my scans"
    folder.mkdir()
    logic = CaLIDTrainingLogic(scene, python=sys.executable)
    commands = []
    build = logic.workerCommand
    monkeypatch.setattr(logic, "workerCommand", lambda *a: commands.append(a) or build(*a))
    before = scene.GetNumberOfNodes()
    with pytest.raises(WorkerError, match="no volumes"):
        logic.train(folder, baseModel=str(tiny_model_dir), steps=4, outputName="empty", **FAST)
    assert commands[0][0] == folder
    assert scene.GetNumberOfNodes() == before and logic.curves is None  # no empty curves of the refused run
    assert list(private_tmp.iterdir()) == [] and not (models / "empty").exists()


@pytest.mark.parametrize("name, kwargs, message", [
    ("bad/name", {}, "letters, digits"),
    ("taken", {}, "already exists: choose another name"),
    ("calid-seg-acdc", {}, "already exists: choose another name"),  # a bundled segmenter's: refused after training
    ("nothing", {"resume": True}, "no stopped run"),
    ("-x", {}, "begin with a letter or digit"),  # the worker read it as an option
    ("zero", {"steps": 0}, "steps must be a whole number of at least 1"),  # saved the base model as a new one
    ("half", {"batchSize": 0}, "batch size must be"),
    ("seldom", {"checkpointEvery": 0}, "checkpoint interval must be"),
    ("down", {"learningRate": -1.0}, "learning rate must be positive"),
    ("never", {"timeLimitMinutes": -5}, "time limit must be 0"),  # was ignored: no limit
    ("empty", {"empty": True}, "is empty"),
])
def test_bad_requests_fail_before_anything_starts(scene, nodes, models, name, kwargs, message):
    (models / "taken").mkdir(parents=True)
    if kwargs.pop("empty", False):
        nodes = [*nodes, scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "blank")]
    before = scene.GetNumberOfNodes()
    with pytest.raises(ValueError, match=message):
        CaLIDTrainingLogic(scene, python=sys.executable).train(nodes, outputName=name, **kwargs)
    assert scene.GetNumberOfNodes() == before  # no curves, charts or tables of a run that never started


def test_curves_taken_out_of_a_scene_that_was_cleared_meanwhile(scene):
    """A run refused after the user closed the scene: the curves are gone already, and removing them again must not
    raise (it left the panel's buttons as during the run)."""
    from CaLIDLib.curves import TrainingCurves

    curves = TrainingCurves(scene, "closed")
    scene.Clear(0)
    curves.remove()
    assert scene.GetNodesByClass("vtkMRMLTableNode").GetNumberOfItems() == 0


def test_closing_the_scene_forgets_the_runs_curves(scene, sample_image):
    """Show curves stayed enabled on chart nodes the closed scene had taken away."""
    logic = CaLIDTrainingLogic(scene, python=sys.executable)
    logic._startCurves("closed", None)
    assert logic.curves is not None
    scene.Clear(0)
    assert logic.curves is None


def test_no_volumes_selected(scene):
    with pytest.raises(ValueError, match="at least one volume"):
        CaLIDTrainingLogic(scene, python=sys.executable).train([])
