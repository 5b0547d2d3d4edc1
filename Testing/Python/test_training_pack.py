"""Training from a pack (``calid.training.pack``): what a lent GPU machine without SimpleITK trains on.

Real stacks (the bundled Sunnybrook sample's ``dataset`` fixture), a real pack file, a real ``calid train`` process in
which SimpleITK cannot be imported (the GPU machine's image has none: here it is blocked in ``sys.modules``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from calid.errors import CalidError
from calid.modelstore import load_model
from calid.motion import pair_flow
from calid.training import data
from calid.training.pack import read_pack, write_pack

WITHOUT_SIMPLEITK = "import sys; sys.modules['SimpleITK'] = None; from calid.cli import main; sys.exit(main(sys.argv[1:]))"


@pytest.fixture
def volumes(dataset):
    entries = data.find_volumes([dataset])
    return data.load_volumes([e for e in entries if e[0] != "patient003"]), data.load_volumes(
        [e for e in entries if e[0] == "patient003"])


@pytest.fixture
def pack_file(tmp_path, volumes):
    train, validation = volumes
    return write_pack(tmp_path / "stacks.npz", train, validation,
                      {"train": ["patient000", "patient001", "patient002"], "validation": ["patient003"]}, crop=80)


def test_a_pack_gives_back_each_stack_within_half_a_quantisation_step(tmp_path, volumes, pack_file):
    train, validation = volumes
    train_back, validation_back, split = read_pack(pack_file)
    assert split == {"train": ["patient000", "patient001", "patient002"], "validation": ["patient003"]}
    assert [v.patient for v in train_back] == [v.patient for v in train]
    assert [v.patient for v in validation_back] == ["patient003"]
    for original, back in zip(train + validation, train_back + validation_back):
        assert back.stack.dtype == np.float32 and back.slice_spacing == pytest.approx(original.slice_spacing)
        h, w = original.stack.shape[1:]
        centre = original.stack[:, (h - 80) // 2:(h - 80) // 2 + 80, (w - 80) // 2:(w - 80) // 2 + 80]
        assert back.stack.shape == centre.shape == (original.stack.shape[0], 80, 80)
        step = (centre.max() - centre.min()) / 255
        assert np.abs(back.stack - centre).max() <= step / 2 + 1e-5
        assert back.path.startswith("stacks.npz:")
    assert not list(tmp_path.glob("*.partial*"))


def test_what_is_not_a_pack_is_refused_in_one_line(tmp_path):
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(CalidError, match="not a CaLID training pack"):
        read_pack(tmp_path / "other.npz")
    np.savez(tmp_path / "pickled.npz", format=np.array("calid-training-pack-1"), ranges=np.array([{}], dtype=object))
    with pytest.raises(CalidError, match="cannot read the training pack"):  # objects would need pickle: never loaded
        read_pack(tmp_path / "pickled.npz")
    with pytest.raises(CalidError, match="not found"):
        read_pack(tmp_path / "missing.npz")


def test_a_truncated_pack_is_refused_in_one_line(tmp_path, pack_file):
    cut = tmp_path / "cut.npz"
    cut.write_bytes(pack_file.read_bytes()[: pack_file.stat().st_size // 2])
    with pytest.raises(CalidError, match="cannot read the training pack"):
        read_pack(cut)


def test_flows_estimated_up_front_are_those_batches_would_estimate(volumes):
    train, _ = volumes
    lazy = data.MotionTripletSampler(train, 64, torch.Generator().manual_seed(3), "dis")
    eager = data.MotionTripletSampler(train, 64, torch.Generator().manual_seed(3), "dis")
    eager.estimate_all_flows()
    assert len(eager._flows) == sum(len(v.stack) - span for v in train for span in range(2, 7) if len(v.stack) > span)
    assert torch.equal(eager._flows[(0, 1, 3)].float(),
                       torch.from_numpy(pair_flow(train[0].stack[1], train[0].stack[3], "dis")).half().float())
    assert (0, 0, 1) not in eager._flows  # neighbours one slice apart are never a pair: a target lies between
    for a, b in zip(lazy.batch(6), eager.batch(6)):
        assert torch.equal(a, b)


def test_a_second_draw_over_the_same_triplets_estimates_no_flow_again(volumes, monkeypatch):
    train, _ = volumes
    sampler = data.MotionTripletSampler(train, 64, torch.Generator().manual_seed(3), "dis")
    sampler.estimate_all_flows()
    expected = data.MotionTripletSampler(train, 64, torch.Generator().manual_seed(0), "dis").batch(6)
    monkeypatch.setattr("calid.motion.pair_flow", lambda *a, **k: pytest.fail("a flow was estimated again"))
    twin = data.with_generator(sampler, torch.Generator().manual_seed(0))
    for a, b in zip(twin.batch(6), expected):
        assert torch.equal(a, b)  # what a new sampler with that generator draws, every flow from the cache


@pytest.mark.slow
def test_calid_train_runs_from_a_pack_where_simpleitk_cannot_be_imported(tmp_path, pack_file, error_head_model_dir):
    run = tmp_path / "run"
    args = ["train", "--pack", pack_file, "--init", error_head_model_dir, "--output", run, "--denoiser-steps", "2",
            "--denoiser-batch", "2", "--val-volumes", "1", "--val-every", "2",
            "--flows-up-front", "--no-recalibrate", "--threads", "2"]
    proc = subprocess.run([sys.executable, "-c", WITHOUT_SIMPLEITK, *map(str, args)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    card = json.loads((run / "model" / "model.json").read_text(encoding="utf-8"))
    assert card["training"]["data"] == [str(pack_file.resolve())]
    assert card["training"]["split"]["validation"] == ["patient003"] and card["training"]["train_volumes"] == 3
    assert card["training"]["settings"]["recalibrate"] is False
    base, _ = load_model(error_head_model_dir)
    model, _ = load_model(run / "model")
    assert model.error_head.calibration.to_config() == base.error_head.calibration.to_config()  # left for later
    assert any(not torch.equal(a, b) for a, b in zip(model.interpolator.state_dict().values(),
                                                     base.interpolator.state_dict().values()))


@pytest.mark.parametrize("extra, message", [
    ([], "as folders or as one --pack file"),
    (["DATA"], "as folders or as one --pack file"),
    (["--split", "SPLIT"], "--split does not go with --pack"),
])
def test_a_pack_with_folders_or_a_split_is_refused_in_one_line(tmp_path, pack_file, dataset, extra, message):
    extra = [str(dataset) if a == "DATA" else str(pack_file) if a == "SPLIT" else a for a in extra]
    pack_args = [] if not extra else ["--pack", str(pack_file)]
    proc = subprocess.run([sys.executable, "-m", "calid", "train", *pack_args, *extra, "--output",
                           str(tmp_path / "run")], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
