"""``calid train``: a real (tiny) run, exact resume after a kill, DDP with two processes, fine-tuning."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from calid.modelstore import inherited_provenance, load_model, save_model
from calid.training.checkpoint import (CHECKPOINT, load_rank_random_state, rank_random_state_path,
                                      read_checkpoint_info)
from calid.imageio import write_image
from calid.training.config import TrainConfig
from calid.training.data import find_volumes, load_volumes, split_patients
from calid.training.trainer import Trainer

pytestmark = pytest.mark.slow
TORCHRUN = Path(sys.executable).with_name("torchrun")
TINY = ["--preset", "tiny", "--vae-batch", "4", "--denoiser-batch", "4", "--val-volumes", "1", "--log-every", "2",
        "--seed", "1"]


def train(*args, timeout=600, env=None):
    return subprocess.run([sys.executable, "-m", "calid", "train", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def test_tiny_training_writes_a_usable_model(dataset, tmp_path, small_image):
    run = tmp_path / "run"
    proc = train(dataset, "--output", run, "--vae-steps", "6", "--denoiser-steps", "6", "--val-every", "6",
                 "--checkpoint-every", "3", "--val-fraction", "0.25", *TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    split = json.loads((run / "split.json").read_text(encoding="utf-8"))
    assert len(split["validation"]) == 1 and len(split["train"]) == 3
    assert not set(split["train"]) & set(split["validation"])
    card = json.loads((run / "model" / "model.json").read_text(encoding="utf-8"))
    assert card["training"]["split"] == split and card["weights_dtype"] == "float16"
    assert {"val_psnr_model", "val_psnr_linear"} <= set(card["metrics"]["training_validation"])
    assert (run / "curves.png").read_bytes()[:4] == b"\x89PNG"
    lines = (run / "metrics.csv").read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("step,stage,loss") and any(",validation," in l for l in lines)
    model, _ = load_model(run / "model")
    out = subprocess.run([sys.executable, "-m", "calid", "upsample", str(dataset / "patient000" / "patient000_frame01.nii.gz"),
                          str(tmp_path / "dense.nrrd"), "--model", str(run / "model"), "--steps", "2"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr


def test_resume_after_kill_matches_an_uninterrupted_run(dataset, tmp_path):
    common = [dataset, "--vae-steps", "8", "--denoiser-steps", "8", "--checkpoint-every", "2", "--val-every", "100",
              "--val-fraction", "0.25", *TINY]
    reference = train(*common, "--output", tmp_path / "ref")
    assert reference.returncode == 0, reference.stderr[-3000:]

    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "calid", "train", *map(str, common), "--output", str(run)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    checkpoint = run / "checkpoint.safetensors"
    deadline = time.time() + 300
    while time.time() < deadline:
        if checkpoint.is_file():
            try:
                if read_checkpoint_info(checkpoint)["step"] >= 10:
                    break
            except Exception:  # being replaced right now
                pass
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stopped = read_checkpoint_info(checkpoint)["step"]
    assert 10 <= stopped < 16, "the run should be killed inside the denoiser stage"
    resumed = train(*common, "--output", run, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = load_file(str(tmp_path / "ref" / "model" / "model.safetensors"))
    b = load_file(str(run / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key].float().numpy(), b[key].float().numpy(), atol=2e-3, err_msg=key)
    # The log reads as the uninterrupted run's: the steps after the checkpoint, logged again, are not there twice.
    logged = [(row["step"], row["stage"]) for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]
    assert logged == [(row["step"], row["stage"]) for row in
                      map(json.loads, (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines())]
    rows = [len((folder / "metrics.csv").read_text().splitlines()) for folder in (run, tmp_path / "ref")]
    assert rows[0] == rows[1]
    # Resumed with another learning rate it would train another model than the checkpoint's: refused, named.
    other = train(*common, "--output", run, "--resume", "--lr", "0.001")
    assert other.returncode == 2 and other.stderr.count("\n") == 1, other.stderr
    assert "started with --lr 0.0002; now --lr 0.001" in other.stderr


def test_ddp_two_processes_with_gloo(dataset, tmp_path):
    run = tmp_path / "ddp"
    proc = subprocess.run([str(TORCHRUN), "--nproc_per_node", "2", "--master_port", "29533", "-m", "calid", "train",
                           str(dataset), "--output", str(run), "--vae-steps", "4", "--denoiser-steps", "4",
                           "--val-every", "4", "--checkpoint-every", "4", "--val-fraction", "0.25", "--device", "cpu",
                           "--threads", "1", *TINY],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    card = json.loads((run / "model" / "model.json").read_text(encoding="utf-8"))
    assert card["training"]["world_size"] == 2
    # rank 1 draws its own batches: a resumed run gives it its own random state back, not rank 0's
    assert rank_random_state_path(run / CHECKPOINT, 1).is_file()
    rank0, rank1 = torch.Generator(), torch.Generator()
    rank0.set_state(load_file(str(run / CHECKPOINT))["rng.sampler"])
    load_rank_random_state(run / CHECKPOINT, 1, rank1, read_checkpoint_info(run / CHECKPOINT)["step"])
    assert not torch.equal(rank0.get_state(), rank1.get_state())


def test_ddp_processes_end_a_timed_denoiser_stage_after_the_same_step(dataset, tmp_path, tiny_model_dir):
    run = tmp_path / "ddp-timed"
    proc = subprocess.run([str(TORCHRUN), "--nproc_per_node", "2", "--master_port", "29534", "-m", "calid", "train",
                           str(dataset), "--output", str(run), "--init", str(tiny_model_dir), "--denoiser-steps", "50",
                           "--denoiser-minutes", "0.0001", "--val-every", "50", "--val-fraction", "0.25",
                           "--device", "cpu", "--threads", "1", *TINY],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    card = json.loads((run / "model" / "model.json").read_text(encoding="utf-8"))
    assert card["training"]["world_size"] == 2 and card["training"]["denoiser_steps_trained"] == 1


def test_fine_tuning_from_an_existing_model_keeps_its_vae(dataset, tmp_path, tiny_model_dir):
    run = tmp_path / "tune"
    proc = train(dataset, "--output", run, "--init", tiny_model_dir, "--denoiser-steps", "4", "--val-every", "4",
                 "--val-fraction", "0.25", "--progress", "json", *TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stages = [line for line in proc.stdout.splitlines() if "filter-comment" in line]
    assert "encoding training stacks" in stages[0] and "training denoiser" in stages[1]  # the slow part is named
    base, _ = load_model(tiny_model_dir)
    tuned, card = load_model(run / "model")
    assert card["training"]["vae_steps"] == 0 and card["training"]["base_model"] == "tiny"
    for (name, p), (_, q) in zip(base.vae.state_dict().items(), tuned.vae.state_dict().items()):
        np.testing.assert_allclose(p.numpy(), q.numpy(), atol=1e-3, err_msg=name)
    changed = [not np.allclose(p.detach().numpy(), q.detach().numpy()) for p, q in zip(base.interpolator.parameters(), tuned.interpolator.parameters())]
    assert any(changed)


def test_a_wider_new_denoiser_on_a_trained_vae_ends_when_its_minutes_are_up(dataset, tmp_path, tiny_model_dir):
    run = tmp_path / "wide"
    proc = train(dataset, "--output", run, "--init", tiny_model_dir, "--denoiser-channels", "16,32,48",
                 "--denoiser-steps", "500", "--denoiser-minutes", "0.0001", "--val-every", "500",
                 "--val-fraction", "0.25", *TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    base, _ = load_model(tiny_model_dir)
    wide, card = load_model(run / "model")
    assert card["config"]["denoiser"]["channels"] == [16, 32, 48]
    assert card["training"]["denoiser_steps_trained"] == 1 and card["metrics"]["training_validation"]
    for (name, p), (_, q) in zip(base.vae.state_dict().items(), wide.vae.state_dict().items()):
        np.testing.assert_allclose(p.numpy(), q.numpy(), atol=1e-3, err_msg=name)
    assert sum(p.numel() for p in wide.interpolator.parameters()) > sum(p.numel() for p in base.interpolator.parameters())

    refused = train(dataset, "--output", tmp_path / "bad", "--init", tiny_model_dir, "--denoiser-channels", "16,32,40",
                    *TINY)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert "--denoiser-channels: widths must be positive multiples of" in refused.stderr
    no_time = train(dataset, "--output", tmp_path / "none", "--init", tiny_model_dir, "--denoiser-minutes", "0", *TINY)
    assert no_time.returncode == 2 and "--denoiser-minutes must be positive, not 0.0" in no_time.stderr
    assert not (tmp_path / "bad").exists() and not (tmp_path / "none").exists()


def test_one_step_fine_tuning_records_its_timesteps_and_refuses_more_steps(dataset, tmp_path, tiny_model_dir):
    run = tmp_path / "tune"
    proc = train(dataset, "--output", run, "--init", tiny_model_dir, "--denoiser-steps", "2", "--val-every", "2",
                 "--val-fraction", "0.25", "--min-timestep", "750", *TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, card = load_model(run / "model")
    assert card["config"]["diffusion"]["min_timestep"] == 750 and card["config"]["default_steps"] == 1
    volume = dataset / "patient000" / "patient000_frame01.nii.gz"
    upsample = [sys.executable, "-m", "calid", "upsample", str(volume), "--model", str(run / "model")]
    ok = subprocess.run([*upsample, str(tmp_path / "dense.nrrd")], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    refused = subprocess.run([*upsample, str(tmp_path / "refused.nrrd"), "--steps", "2"], capture_output=True,
                             text=True, timeout=300)
    assert refused.returncode == 2 and "timesteps >= 750 only: use --steps 1" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and not (tmp_path / "refused.nrrd").exists()
    # Tuning that model again without --min-timestep (the Slicer module's way) keeps training where it is sampled.
    again = Trainer(TrainConfig(data=[str(dataset)], output=str(tmp_path / "again"), init=str(run / "model")))
    assert again.min_timestep == 750 and again.model.config["default_steps"] == 1


def test_fine_tuned_model_keeps_its_base_models_terms_and_citation(dataset, tmp_path, tiny_model_dir):
    model, _ = load_model(tiny_model_dir)
    base = save_model(model, tmp_path / "base", {"name": "base", "training": {
        "terms": "research, non-commercial use only", "citation": "Bernard et al., IEEE TMI 2018"}})
    tuned = Trainer(TrainConfig(data=[str(dataset)], output=str(tmp_path / "tune"), init=str(base)))
    terms, citation = inherited_provenance("CC0 1.0", "Radau et al., MIDAS 2009", tuned.base_card)
    assert terms.startswith("CC0 1.0") and "base model base: research, non-commercial use only" in terms
    assert "Radau" in citation and "Bernard" in citation
    again = {"name": "tuned", "training": {"terms": terms, "citation": citation}}
    assert inherited_provenance("CC0 1.0", "Radau et al., MIDAS 2009", again) == (terms, citation)  # same data again
    fresh = Trainer(TrainConfig(data=[str(dataset)], output=str(tmp_path / "fresh"), data_terms="CC0 1.0"))
    assert inherited_provenance("CC0 1.0", "", fresh.base_card) == ("CC0 1.0", "")


def test_existing_run_is_not_overwritten(dataset, tmp_path):
    run = tmp_path / "run"
    assert train(dataset, "--output", run, "--vae-steps", "2", "--denoiser-steps", "2", "--val-every", "2",
                 "--val-fraction", "0.25", *TINY).returncode == 0
    split = (run / "split.json").read_bytes()
    again = train(dataset, "--output", run, "--vae-steps", "2", "--denoiser-steps", "2", *TINY[:-1], "5")
    assert again.returncode == 2 and "already holds a training run" in again.stderr
    assert (run / "split.json").read_bytes() == split  # a later --resume trains on the run's own split


@pytest.mark.parametrize("option, value", [("--denoiser-batch", "0"), ("--lr", "-1"), ("--vae-steps", "-1"),
                                           ("--checkpoint-every", "0"), ("--val-fraction", "1.5")])
def test_out_of_range_numbers_are_refused_before_anything_is_written(option, value, dataset, tmp_path):
    proc = train(dataset, "--output", tmp_path / "run", *TINY, option, value)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and option in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists()


def test_a_refused_run_leaves_no_output_folder(tmp_path):
    (tmp_path / "labels_only").mkdir()
    proc = train(tmp_path / "labels_only", "--output", tmp_path / "run", *TINY)
    assert proc.returncode == 2 and not (tmp_path / "run").exists(), proc.stderr


def test_an_output_that_is_a_file_is_refused_in_one_line(dataset, tmp_path):
    (tmp_path / "afile").write_text("mine")
    for output, message in ((tmp_path / "afile", "is a file, not a folder"),
                            (tmp_path / "afile" / "run", "cannot make the output folder")):
        proc = train(dataset, "--output", output, *TINY)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
    assert (tmp_path / "afile").read_text() == "mine"


def test_a_few_patients_each_of_its_own_group_still_split_and_unusable_files_are_left_out(tmp_path, sample_image):
    """Four ACDC-like patients of four pathologies: each group gave one validation patient, all four, so no
    validation share could train. A 2D image and a two-slice stack give no stack: not split, not an error."""
    root = tmp_path / "data"
    for i, group in enumerate(("DCM", "HCM", "MINF", "NOR", "RV")):
        folder = root / f"patient{i:03d}"
        folder.mkdir(parents=True)
        (folder / "Info.cfg").write_text(f"ED: 1\nGroup: {group}\n")
        image = sample_image[16 + 8 * i: 80 + 8 * i, 16:80, :]  # distinct scans, not copies of one
        write_image(image[:, :, 4] if i == 3 else image[:, :, :2] if i == 4 else image,
                    folder / f"patient{i:03d}_frame01.nii.gz")
    volumes = find_volumes([root])
    split = split_patients(volumes[:4], 0.2, 0, {})
    assert len(split["validation"]) == 1 and len(split["train"]) == 3
    # Thin-slice stacks (5 mm, what a site gives to refit the 10 mm gaps) keep the share too: three of them went to
    # validation whatever it was (ACDC's rule: at least 3 of its 12 thin-slice patients).
    thin = split_patients(volumes[:4], 0.2, 0, dict.fromkeys((p for p, _ in volumes[:4]), True))
    assert len(thin["validation"]) == 1 and len(thin["train"]) == 3
    stacks = load_volumes(volumes)
    assert sorted({v.patient for v in stacks}) == ["patient000", "patient001", "patient002"]


def test_denoiser_sees_every_in_plane_orientation_of_each_training_stack(dataset, tmp_path, tiny_model_dir):
    trainer = Trainer(TrainConfig(data=[str(dataset)], output=str(tmp_path / "run"), init=str(tiny_model_dir),
                                  val_fraction=0.25))
    trainer.out.mkdir()
    trainer._prepare_data()
    latents = trainer._encode_training_latents()
    assert len(latents) == 8 * len(trainer.train_volumes)
    first = latents[:8]
    assert all(z.shape[0] == trainer.train_volumes[0].stack.shape[0] for z in first)
    assert len({z.numpy().tobytes() for z in first}) == 8  # eight different orientations, not copies


def test_the_trainer_makes_its_examples_in_the_inference_layout_and_trains_in_its_own():
    import torch

    from calid.devices import inference_layout
    from calid.networks import TINY_CONFIG, CaLID
    from conftest import is_channels_last

    model = CaLID(TINY_CONFIG)
    with inference_layout(model, torch.device("cpu")):
        assert is_channels_last(model)
    assert all(p.is_contiguous() for p in model.parameters())


def test_a_resumed_run_forgets_the_rows_logged_after_its_checkpoint(tmp_path):
    """The resumed run logs those steps again: both files held them twice (found resuming a run that logged every
    step and saved every fourth)."""
    from calid.training.metrics_log import append_metrics, forget_after

    for step in range(1, 7):
        append_metrics(tmp_path, ["step", "loss"], {"step": step, "loss": 1.0 / step, "stage": "denoiser"})
    forget_after(tmp_path, 4)
    append_metrics(tmp_path, ["step", "loss"], {"step": 5, "loss": 0.2, "stage": "denoiser"})
    logged = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in logged] == [1, 2, 3, 4, 5]
    assert [line.split(",")[0] for line in (tmp_path / "metrics.csv").read_text().splitlines()] == \
        ["step", "1", "2", "3", "4", "5"]
