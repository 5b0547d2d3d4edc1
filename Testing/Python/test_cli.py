"""The ``calid`` command end to end in real processes: progress protocol, cohorts, resume, torchrun."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from calid.imageio import write_image
from calid.modelindex import BUNDLED_DIR
from calid.standby import hand_over

pytestmark = pytest.mark.slow
TORCHRUN = Path(sys.executable).with_name("torchrun")


def calid(*args, timeout=300) -> subprocess.CompletedProcess:
    """``calid ARGS`` in a process of its own; its output read as UTF-8 whatever the locale (a progress bar's
    blocks are not ASCII, and CI's locale may be)."""
    return subprocess.run([sys.executable, "-m", "calid", *map(str, args)], capture_output=True, text=True,
                          encoding="utf-8", errors="replace", timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_json_progress_protocol(tmp_path, small_image, tiny_model_dir):
    source = tmp_path / "in.nii.gz"
    write_image(small_image, source)
    proc = calid("upsample", source, tmp_path / "out.nrrd", "--model", tiny_model_dir, "--steps", "3",
                 "--progress", "json", "--factor", "3")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    fractions = [float(l[len("<filter-progress>"):-len("</filter-progress>")]) for l in lines if l.startswith("<filter-progress>")]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and len(fractions) > 3
    events = [json.loads(l) for l in lines if l.startswith("{")]
    assert {e["event"] for e in events} >= {"progress", "done"}
    assert any(l.startswith("<filter-comment>") for l in lines)
    done = events[-1]
    assert done["event"] == "done" and done["factor"] == 3 and done["size"][2] == 16
    assert sitk.ReadImage(str(tmp_path / "out.nrrd")).GetSize()[2] == 16


def test_version_and_models_listing(tiny_model_dir, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "calid", "--version"], capture_output=True, text=True)
    assert proc.stdout.startswith("calid ")
    user = Path(os.environ["CALID_MODELS_DIR"])
    shutil.copytree(tiny_model_dir, user / "my-site-model")
    listed = json.loads(calid("models", "--json").stdout)
    assert any(m["name"] == "my-site-model" and m["source"] == "user" and m["kind"] == "interpolation" for m in listed)
    assert {"name": "calid-seg-acdc", "kind": "segmentation", "source": "bundled"}.items() <= \
        next(m for m in listed if m["name"] == "calid-seg-acdc").items()


def test_a_reader_that_stops_reading_ends_the_listing_quietly():
    """``calid models --json | head``: the closed pipe is the reader's choice, not an internal error."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([sys.executable, "-m", "calid", "models", "--json"], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert proc.returncode == 1 and proc.stderr == ""


def test_models_listing_skips_a_folder_whose_card_is_not_json_and_says_so(tmp_path):
    """A broken card is no model of either kind: it is neither listed (twice, as both kinds, it once was) nor
    offered, and the listing says which folder it skipped."""
    broken = Path(os.environ["CALID_MODELS_DIR"]) / "half-copied"
    broken.mkdir(parents=True)
    (broken / "model.json").write_text('{"format": "calid-model/1", "config": {', encoding="utf-8")
    proc = calid("models", "--json")
    assert proc.returncode == 0, proc.stderr
    assert "half-copied" not in {m["name"] for m in json.loads(proc.stdout)}
    assert proc.stderr.strip() == f"calid: skipped {broken}: its model.json cannot be read " \
        "(Expecting property name enclosed in double quotes: line 1 column 40 (char 39))"
    (broken / "model.json").write_text('{"config": {}}', encoding="utf-8")  # no format: listed as both kinds
    proc = calid("models", "--json")
    assert "half-copied" not in {m["name"] for m in json.loads(proc.stdout)}
    assert proc.stderr.strip() == f"calid: skipped {broken}: its model.json names no CaLID model format (None)"
    # a card without weights, and a user model a bundled one hides: neither can be used, so neither is offered
    (broken / "model.json").write_text('{"format": "calid-model/1", "config": {}}', encoding="utf-8")
    hidden = Path(os.environ["CALID_MODELS_DIR"]) / "calid-seg-acdc"
    shutil.copytree(BUNDLED_DIR / "calid-seg-acdc", hidden)
    proc = calid("models", "--json")
    listed = [(m["name"], m["source"]) for m in json.loads(proc.stdout)]
    assert "half-copied" not in dict(listed) and ("calid-seg-acdc", "user") not in listed
    assert proc.stderr.splitlines() == [f"calid: skipped {hidden}: a bundled model is named calid-seg-acdc too, and "
                                        "--model calid-seg-acdc selects it: rename it",
                                        f"calid: skipped {broken}: it has no model.safetensors"]


def test_devices_names_the_releases_a_timing_depends_on():
    """``calid devices`` (the Slicer panel's probe, and the benchmarks' header) names torch's build, MONAI's and
    OpenCV's releases and the machine, each as installed here."""
    import cv2
    import monai
    import torch

    info = json.loads(calid("devices").stdout)
    software = info["software"]
    assert info["torch"] == software["torch"] == torch.__version__
    assert software["monai"] == monai.__version__
    assert cv2.__version__ in software["opencv-python-headless"]
    assert software["machine"].endswith(f"{os.cpu_count()} cores")


def make_cohort(folder: Path, image: sitk.Image, count: int) -> list[Path]:
    folder.mkdir()
    paths = []
    for i in range(count):
        path = folder / f"case{i}.nrrd"
        write_image(image[:, :, i % 2:], path)
        paths.append(path)
    return paths


def standby(command_file: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "calid", "standby", "--command-file", str(command_file), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_standby_runs_the_command_file_it_waits_for(tmp_path, small_image, tiny_model_dir):
    source = tmp_path / "in.nii.gz"
    write_image(small_image, source)
    handoff = tmp_path / "handoff"
    handoff.mkdir()
    worker = standby(handoff / "command.json")
    assert json.loads(worker.stdout.readline()) == {"event": "ready"}  # imported, nothing run yet
    assert worker.poll() is None and not (tmp_path / "out.nrrd").exists()
    hand_over(handoff / "command.json", json.dumps(["upsample", str(source), str(tmp_path / "out.nrrd"), "--model",
                                                    str(tiny_model_dir), "--steps", "1"]))
    out, err = worker.communicate(timeout=300)
    assert worker.returncode == 0, err
    assert sitk.ReadImage(str(tmp_path / "out.nrrd")).GetSize()[2] == 2 * small_image.GetSize()[2] - 1
    assert list(handoff.iterdir()) == []  # the command file is consumed


def test_standby_refuses_bad_command_files_and_ends_when_abandoned(tmp_path):
    handoff = tmp_path / "handoff"
    handoff.mkdir()
    for garbage in ("upsample in.nii.gz out.nrrd", '["standby"]', "[]", '{"argv": []}'):
        worker = standby(handoff / "command.json")
        hand_over(handoff / "command.json", garbage)
        _, err = worker.communicate(timeout=120)
        assert worker.returncode == 2 and err.count("\n") == 1 and "JSON list" in err
    waiting = standby(handoff / "command.json")
    assert json.loads(waiting.stdout.readline()) == {"event": "ready"}
    shutil.rmtree(handoff)  # the caller gave up on it
    assert waiting.wait(timeout=30) == 0
    idle = standby(tmp_path / "command.json", "--idle-minutes", "0.001")
    assert idle.wait(timeout=120) == 0 and not idle.stderr.read()
    never = standby(tmp_path / "command.json", "--idle-minutes", "-1")  # it said ready and left, silently
    _, err = never.communicate(timeout=120)
    assert never.returncode == 2 and err.strip() == "calid: error: --idle-minutes must be positive, not -1.0"


def test_cohort_folder_is_resumable_and_reports_failures(tmp_path, small_image, tiny_model_dir):
    inputs = make_cohort(tmp_path / "in", small_image, 3)
    (tmp_path / "in" / "broken.nii.gz").write_bytes(b"not an image")
    proc = calid("upsample", tmp_path / "in", tmp_path / "out", "--model", tiny_model_dir, "--steps", "1")
    assert proc.returncode == 1  # one input failed, the others were done
    rows = {Path(r["input"]).name: r for r in csv.DictReader(open(tmp_path / "out" / "calid_cohort.csv", encoding="utf-8"))}
    assert [rows[p.name]["status"] for p in inputs] == ["done"] * 3
    assert rows["broken.nii.gz"]["status"] == "failed" and "cannot read" in rows["broken.nii.gz"]["message"]
    told = proc.stderr.splitlines()  # not only in the record: it said nothing at all
    assert told[-2].startswith("calid: failed: ") and "broken.nii.gz: cannot read" in told[-2]
    record = tmp_path / "out" / "calid_cohort.csv"
    assert told[-1] == f"calid: 4 inputs: 3 done, 0 skipped (output exists), 1 failed; record: {record}"
    (tmp_path / "in" / "broken.nii.gz").unlink()
    first_mtime = (tmp_path / "out" / "case0.nrrd").stat().st_mtime_ns
    (tmp_path / "out" / "case2.nrrd").unlink()  # as if interrupted before the last one
    proc = calid("upsample", tmp_path / "in", tmp_path / "out", "--model", tiny_model_dir, "--steps", "1")
    assert proc.returncode == 0, proc.stderr
    record = tmp_path / "out" / "calid_cohort.csv"
    resumed = {Path(r["input"]).name: r for r in csv.DictReader(open(record, encoding="utf-8"))}
    assert {name: r["status"] for name, r in resumed.items()} == {"case0.nrrd": "done", "case1.nrrd": "done",
                                                                  "case2.nrrd": "done"}
    assert resumed["case0.nrrd"] == rows["case0.nrrd"]  # the first run's record kept (it was rewritten as skipped)
    assert (tmp_path / "out" / "case0.nrrd").stat().st_mtime_ns == first_mtime
    # the record re-saved by a spreadsheet: a byte-order mark, a column of its own
    lines = record.read_text(encoding="utf-8").splitlines()
    record.write_text("\ufeff" + "\n".join([lines[0] + ",notes"] + [line + ",checked" for line in lines[1:]]) + "\n",
                      encoding="utf-8")
    (tmp_path / "out" / "case1.nrrd").unlink()
    proc = calid("upsample", tmp_path / "in", tmp_path / "out", "--model", tiny_model_dir, "--steps", "1")
    again = {Path(r["input"]).name: r for r in csv.DictReader(open(record, encoding="utf-8"))}
    assert proc.returncode == 0, proc.stderr
    assert again["case0.nrrd"] == rows["case0.nrrd"] and again["case1.nrrd"]["status"] == "done"
    (tmp_path / "out" / "calid_cohort.csv").unlink()  # outputs with no record of the run that made them
    proc = calid("upsample", tmp_path / "in", tmp_path / "out", "--model", tiny_model_dir, "--steps", "1")
    statuses = {r["status"] for r in csv.DictReader(open(tmp_path / "out" / "calid_cohort.csv", encoding="utf-8"))}
    assert proc.returncode == 0 and statuses == {"skipped"}


def test_a_cancelled_cohort_keeps_the_record_of_what_it_finished(tmp_path, small_image, tiny_model_dir, monkeypatch,
                                                                   capsys):
    """Stopped at its second input, it wrote no record: the next run listed the first output as skipped, and the
    run in between left the second input's empty folder. A failed input's reason is in its JSON event too, and a
    record is found again under another spelling of the output folder."""
    import calid.cohort
    from calid.engine import UpsampleOptions
    from calid.errors import Cancelled

    inputs = make_cohort(tmp_path / "in", small_image, 3)
    (tmp_path / "in" / "sub").mkdir()
    write_image(small_image, tmp_path / "in" / "sub" / "case9.nrrd")
    listed = tmp_path / "cohort.txt"  # a list, so that the last input's output has a folder of its own
    listed.write_text("\n".join(str(p) for p in [*inputs, tmp_path / "in" / "sub" / "case9.nrrd"]), encoding="utf-8")
    real = calid.cohort.upsample_file

    def stop_at_the_third(item, target, *args, **kwargs):
        if item.name == "case9.nrrd":
            raise Cancelled()
        return real(item, target, *args, **kwargs)

    monkeypatch.setattr(calid.cohort, "upsample_file", stop_at_the_third)
    monkeypatch.chdir(tmp_path)
    options = UpsampleOptions(method="linear", model=str(tiny_model_dir))
    with pytest.raises(Cancelled):
        calid.cohort.run_cohort(listed, Path("out"), options, "none")
    record = {Path(r["input"]).name: r for r in csv.DictReader(open(tmp_path / "out" / "calid_cohort.csv",
                                                                     encoding="utf-8"))}
    assert [record[p.name]["status"] for p in inputs] == ["done"] * 3 and not (tmp_path / "out" / "sub").exists()
    monkeypatch.setattr(calid.cohort, "upsample_file", real)
    (tmp_path / "in" / "sub" / "case9.nrrd").write_bytes(b"not an image")
    capsys.readouterr()
    assert calid.cohort.run_cohort(listed, tmp_path / "out", options, "json") == 1
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    failed = [e for e in events if e.get("status") == "failed"]
    assert len(failed) == 1 and "cannot read" in failed[0]["message"]
    assert [e.get("resumed", False) for e in events if e["event"] == "progress"] == [True, True, True, False]
    assert events[-1] == {"event": "summary", "inputs": 4, "done": 3, "skipped": 0, "failed": 1,
                          "record": str(tmp_path / "out" / "calid_cohort.csv")}  # the last line a program reads
    again = {Path(r["input"]).name: r for r in csv.DictReader(open(tmp_path / "out" / "calid_cohort.csv",
                                                                    encoding="utf-8"))}
    assert [again[p.name] for p in inputs] == [record[p.name] for p in inputs]  # kept, not "skipped"

    def stop_at_the_first(item, target, *args, **kwargs):
        raise Cancelled()

    (tmp_path / "out" / "case0.nrrd").unlink()  # redone, and cancelled there: the later inputs' records stay
    monkeypatch.setattr(calid.cohort, "upsample_file", stop_at_the_first)
    with pytest.raises(Cancelled):
        calid.cohort.run_cohort(listed, tmp_path / "out", options, "none")
    kept = {Path(r["input"]).name: r for r in csv.DictReader(open(tmp_path / "out" / "calid_cohort.csv",
                                                                   encoding="utf-8"))}
    assert set(kept) == {"case1.nrrd", "case2.nrrd"} and kept["case1.nrrd"] == record["case1.nrrd"]


def test_cohort_list_file(tmp_path, small_image, tiny_model_dir):
    inputs = make_cohort(tmp_path / "in", small_image, 2)
    listing = tmp_path / "cases.txt"
    listing.write_text("# cohort\n" + "\n".join(str(p) for p in inputs) + "\n", encoding="utf-8")
    proc = calid("upsample", listing, tmp_path / "out", "--model", tiny_model_dir, "--steps", "1", "--progress", "bar")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "out").glob("*.nrrd")) == ["case0.nrrd", "case1.nrrd"]
    assert "1/2 case0.nrrd: generating missing slices" in proc.stderr  # which input of how many, and its stage
    assert "2/2 case1.nrrd: decoding" in proc.stderr


def test_cohort_inputs_of_the_same_name_keep_their_folders(tmp_path, small_image):
    """Every patient's ``sax.nrrd`` gets its own output; by bare name the second was skipped as 'output exists'."""
    for patient, start in (("p1", 0), ("p2", 1)):
        (tmp_path / "in" / patient).mkdir(parents=True)
        write_image(small_image[:, :, start:], tmp_path / "in" / patient / "sax.nrrd")
    listing = tmp_path / "cases.txt"
    listing.write_text("in/p1/sax.nrrd\nin/p2/sax.nrrd\n", encoding="utf-8")
    proc = calid("upsample", listing, tmp_path / "out", "--method", "linear")
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(open(tmp_path / "out" / "calid_cohort.csv", encoding="utf-8")))
    assert [r["status"] for r in rows] == ["done", "done"]
    sizes = [sitk.ReadImage(str(tmp_path / "out" / p / "sax.nrrd")).GetSize()[2] for p in ("p1", "p2")]
    assert sizes == [2 * small_image.GetSize()[2] - 1, 2 * small_image.GetSize()[2] - 3]


def test_a_cohort_refuses_results_of_other_inputs_or_settings_and_keeps_every_batchs_record(tmp_path, small_image):
    """A second batch whose scan maps to an output of the first, or a rerun with other settings, kept the earlier
    result and reported it as done; a second batch's record replaced the first's; labels beside the scans (ACDC's
    ``_gt``) were upsampled as intensities; the output folder inside the input folder was an input of the rerun;
    a list saved with a byte-order mark lost its first entry."""
    for site, start in (("site1", 0), ("site2", 1)):
        (tmp_path / site / "p1").mkdir(parents=True)
        write_image(small_image[:, :, start:], tmp_path / site / "p1" / "sax.nrrd")
        (tmp_path / f"{site}.txt").write_text(f"\ufeff{site}/p1/sax.nrrd\n", encoding="utf-8")
    out, record = tmp_path / "out", tmp_path / "out" / "calid_cohort.csv"
    assert calid("upsample", tmp_path / "site1.txt", out, "--method", "linear").returncode == 0
    proc = calid("upsample", tmp_path / "site2.txt", out, "--method", "linear")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "sax.nrrd (made from " in proc.stderr and "site1" in proc.stderr
    proc = calid("upsample", tmp_path / "site1.txt", out, "--method", "morph")
    assert proc.returncode == 2 and "sax.nrrd (made with linear x2)" in proc.stderr
    write_image(small_image[:, :, 2:], tmp_path / "site1" / "p1" / "other.nrrd")
    (tmp_path / "batch2.txt").write_text("site1/p1/other.nrrd\n", encoding="utf-8")
    assert calid("upsample", tmp_path / "batch2.txt", out, "--method", "linear").returncode == 0
    rows = list(csv.DictReader(open(record, encoding="utf-8")))
    assert sorted(Path(r["input"]).name for r in rows) == ["other.nrrd", "sax.nrrd"]  # both batches' rows
    assert {r["settings"] for r in rows} == {"linear x2"}

    folder = tmp_path / "patient001"
    folder.mkdir()
    write_image(small_image, folder / "patient001_frame01.nrrd")
    write_image(sitk.Cast(small_image > 300, sitk.sitkUInt8), folder / "patient001_frame01_gt.nrrd")
    for _ in range(2):  # the output folder inside the input folder: the second run is a resume, not a failure
        proc = calid("upsample", folder, folder / "dense", "--method", "linear")
        assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (folder / "dense").glob("*.nrrd")) == ["patient001_frame01.nrrd"]
    proc = calid("upsample", folder, folder, "--method", "linear")
    assert proc.returncode == 2 and "the output folder is the input folder" in proc.stderr
    # ACDC's layout, a folder per patient: their volumes are the inputs (each was read as a DICOM series and failed)
    proc = calid("upsample", tmp_path / "site1", tmp_path / "by_patient", "--method", "linear")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "by_patient").glob("*.nrrd")) == ["other.nrrd", "sax.nrrd"]  # one
    # patient folder: the inputs' common folder is its own


def test_torchrun_two_processes_shard_the_cohort(tmp_path, small_image, tiny_model_dir):
    make_cohort(tmp_path / "in", small_image, 4)
    proc = subprocess.run([str(TORCHRUN), "--nproc_per_node", "2", "--master_port", "29517", "-m", "calid", "upsample",
                           str(tmp_path / "in"), str(tmp_path / "out"), "--model", str(tiny_model_dir), "--steps", "1",
                           "--device", "cpu", "--threads", "1", "--progress", "bar"],
                          capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = list(csv.DictReader(open(tmp_path / "out" / "calid_cohort.csv", encoding="utf-8")))
    assert sorted(r["status"] for r in rows) == ["done"] * 4
    # each process's bars count the whole cohort: 1/4 and 3/4 on rank 0, 2/4 and 4/4 on rank 1 (not 1/2 twice)
    assert all(f"{k}/4 case{k - 1}.nrrd: " in proc.stderr for k in range(1, 5)) and "/2 case" not in proc.stderr
    assert proc.stderr.count("calid: 4 inputs: 4 done") == 1
    assert sorted(r["rank"] for r in rows) == ["0", "0", "1", "1"]
    assert not list((tmp_path / "out").glob("*.rank*.csv"))
    single = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "case1.nrrd")))
    assert single.shape[0] == (small_image.GetSize()[2] - 1 - 1) * 2 + 1
    assert np.isfinite(single).all()
