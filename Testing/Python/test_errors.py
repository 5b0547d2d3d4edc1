"""Bad input: a one-line error naming the problem, exit code 2, no partial output, input untouched."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from calid.cli import main
from calid.imageio import write_image
from calid.modelstore import CARD_FILE, WEIGHTS_FILE


def digest(path: Path) -> str:
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    return hashlib.sha256(b"".join(f.read_bytes() for f in files if f.is_file())).hexdigest()


def run_cli(args, capsys) -> tuple[int, str]:
    code = main([str(a) for a in args])
    err = capsys.readouterr().err.strip()
    return code, err


def assert_clean_failure(code, err, out_dir: Path, expected: str):
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("calid: error:") and expected in err, err
    assert "Traceback" not in err
    leftovers = [p.name for p in out_dir.iterdir() if p.name.startswith(("out", ".calid"))]
    assert leftovers == [], leftovers


def image_from(array, spacing=(1.4, 1.4, 10.0)):
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(spacing[: img.GetDimension()] if img.GetDimension() <= 3 else (*spacing, 1.0))
    return img


def move_dicom_slice(path: Path, offset: np.ndarray) -> None:
    """Rewrite one DICOM file with its Image Position (Patient) moved by ``offset`` mm."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    image = reader.Execute()
    position = [float(v) for v in image.GetMetaData("0020|0032").split("\\")]
    image.SetMetaData("0020|0032", "\\".join(f"{p + d:.6f}" for p, d in zip(position, offset)))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetFileName(str(path))
    writer.Execute(image)


def bad_inputs(tmp: Path, small_image: sitk.Image) -> dict[str, tuple[Path, str]]:
    """Each case: (input path, a phrase the message must contain)."""
    cases = {}
    cases["missing"] = (tmp / "nope.nii.gz", "input not found")
    corrupt = tmp / "corrupt.nii.gz"
    corrupt.write_bytes(b"\x1f\x8b garbage, not a gzip'd NIfTI")
    cases["corrupt"] = (corrupt, "cannot read")
    damaged = tmp / "damaged.nii.gz"  # a whole gzip stream whose deflate data is damaged in the middle
    write_image(small_image, damaged)
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = bytes(64)
    damaged.write_bytes(bytes(data))
    cases["damaged .nii.gz"] = (damaged, "damaged or incomplete")
    truncated = tmp / "truncated.nrrd"
    write_image(small_image, truncated)
    truncated.write_bytes(truncated.read_bytes()[:400])
    cases["truncated"] = (truncated, "cannot read")
    cut_nrrd = tmp / "cut.nrrd"
    write_image(small_image, cut_nrrd)
    cut_nrrd.write_bytes(cut_nrrd.read_bytes()[: len(cut_nrrd.read_bytes()) * 2 // 3])
    cases["truncated .nrrd voxels"] = (cut_nrrd, "expected")  # NRRD's reason, not only "Error reading"
    # ITK's NIfTI reader would fill the missing slices with zeros; MetaIO prints its own lines before the error
    for suffix, compress in ((".nii.gz", True), (".nii", False), (".mha", False), (".mha", True)):
        cut = tmp / f"cut{'z' if compress else ''}{suffix}"
        sitk.WriteImage(small_image, str(cut), compress)
        cut.write_bytes(cut.read_bytes()[: len(cut.read_bytes()) * 2 // 3])
        cases[f"truncated {suffix}{' compressed' if compress else ''}"] = (cut, "incomplete")
    header = tmp / "split.mhd"  # a header with its voxels in a .raw file beside it
    sitk.WriteImage(small_image, str(header))
    raw = header.with_suffix(".raw")
    raw.write_bytes(raw.read_bytes()[:1000])
    cases["truncated .mhd voxel file"] = (header, "incomplete")
    lone = tmp / "lone.mhd"
    lone.write_text(header.read_text(encoding="ascii").replace("split.raw", "lone.raw"), encoding="ascii")
    cases[".mhd without its voxel file"] = (lone, "voxel file lone.raw is not beside it")
    empty_dir = tmp / "emptydir"
    empty_dir.mkdir()
    cases["folder without DICOM"] = (empty_dir, "no DICOM series")
    unknown = tmp / "notes.txt.bin"
    unknown.write_text("hello", encoding="utf-8")
    cases["unknown format"] = (unknown, "unsupported input format")
    two_d = tmp / "slice.nrrd"
    sitk.WriteImage(small_image[:, :, 0], str(two_d))
    cases["2D"] = (two_d, "2D")
    one = tmp / "one.nrrd"
    sitk.WriteImage(small_image[:, :, 0:1], str(one))
    cases["one slice"] = (one, "at least 2")
    four_d = tmp / "cine.nii.gz"
    sitk.WriteImage(sitk.JoinSeries([small_image[:, :, 0:1]] * 3), str(four_d))  # a cine of one slice position
    cases["4D"] = (four_d, "at least 2")
    rgb = tmp / "rgb.nrrd"
    sitk.WriteImage(sitk.Compose([small_image] * 3), str(rgb))
    cases["RGB"] = (rgb, "vector/RGB")
    nan = tmp / "nan.nrrd"
    values = sitk.GetArrayFromImage(small_image).astype(np.float32)
    values[2, 10, 10] = np.nan
    values[3, 5, 5] = np.inf
    nan_img = sitk.GetImageFromArray(values)
    nan_img.CopyInformation(small_image)
    sitk.WriteImage(nan_img, str(nan))
    cases["NaN/Inf"] = (nan, "2 NaN/Inf voxels")
    axes = np.array(small_image.GetDirection()).reshape(3, 3)
    dicom = tmp / "uneven_dicom"
    write_image(small_image, dicom)
    move_dicom_slice(sorted(dicom.iterdir())[3], 3.0 * np.cross(axes[:, 0], axes[:, 1]))
    cases["non-uniform DICOM"] = (dicom, "not uniformly spaced (positions")
    drifting = tmp / "drifting_dicom"  # uniform along the normal, but each slice 2 mm further along the rows
    write_image(small_image, drifting)
    for k, name in enumerate(sorted(drifting.iterdir())):
        move_dicom_slice(name, 2.0 * k * axes[:, 0])
    cases["DICOM slices drifting in-plane"] = (drifting, "moves up to 2.00 mm within the slice plane")
    sheared = tmp / "sheared.nrrd"  # axes 73 degrees apart: NIfTI cannot store it, ITK moved the voxels silently
    shear = sitk.Image(small_image)
    shear.SetDirection((1, 0.29, 0, 0, 0.957, 0, 0, 0, 1))
    sitk.WriteImage(shear, str(sheared))
    cases["sheared grid"] = (sheared, "sheared grid (its axes are 73.14, 90.00, 90.00 degrees apart")
    return cases


@pytest.fixture
def cases(tmp_path, small_image):
    (tmp_path / "inputs").mkdir()
    return bad_inputs(tmp_path / "inputs", small_image)


CASE_NAMES = ["missing", "corrupt", "damaged .nii.gz", "truncated", "truncated .nrrd voxels",
              "truncated .nii.gz compressed",
              "truncated .nii", "truncated .mha", "truncated .mha compressed", "truncated .mhd voxel file",
              ".mhd without its voxel file", "DICOM slices drifting in-plane", "sheared grid",
              "folder without DICOM", "unknown format", "2D", "one slice", "4D",
              "RGB", "NaN/Inf", "non-uniform DICOM"]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_bad_input(name, cases, tmp_path, tiny_model_dir, capfd):
    """``capfd``: what the file libraries print on the process's own stderr counts against the one line too."""
    source, expected = cases[name]
    before = digest(source) if source.exists() else None
    code, err = run_cli(["upsample", source, tmp_path / "out.nrrd", "--model", tiny_model_dir, "--steps", "1"], capfd)
    assert_clean_failure(code, err, tmp_path, expected)
    if before is not None:
        assert digest(source) == before


def test_a_metaimage_naming_its_local_voxels_in_lower_case_is_read(tmp_path, small_image):
    """MetaIO reads ``ElementDataFile = Local`` as LOCAL: the completeness check must too (it refused it)."""
    path = tmp_path / "lower.mha"
    sitk.WriteImage(small_image, str(path))
    path.write_bytes(path.read_bytes().replace(b"ElementDataFile = LOCAL", b"ElementDataFile = Local", 1))
    from calid.imageio import read_image

    assert read_image(path).GetSize() == small_image.GetSize()


@pytest.fixture
def good_input(tmp_path, small_image):
    path = tmp_path / "good.nrrd"
    write_image(small_image, path)
    return path


@pytest.mark.parametrize("args,expected", [
    (["--factor", "1"], "at least 2"),
    (["--factor", "0"], "at least 2"),
    (["--factor", "500"], "too large"),
    (["--spacing", "20"], "not finer than the slice spacing"),
    (["--spacing", "-1"], "must be positive"),
    (["--spacing", "0.001"], "target spacing 0.001 mm would take factor"),  # not "factor N", which nobody asked for
    (["--steps", "0"], "--steps"),
    (["--samples", "0"], "--samples"),
    (["--uncertainty", "UNC"], "has no error head"),
    (["--device", "tpu"], "unknown device"),
    (["--threads", "0"], "--threads"),
])
def test_bad_options(args, expected, good_input, tmp_path, tiny_model_dir, capsys):
    args = [str(tmp_path / "out_unc.nrrd") if a == "UNC" else a for a in args]
    code, err = run_cli(["upsample", good_input, tmp_path / "out.nrrd", "--model", tiny_model_dir, *args], capsys)
    assert_clean_failure(code, err, tmp_path, expected)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_but_unavailable(good_input, tmp_path, tiny_model_dir, capsys):
    code, err = run_cli(["upsample", good_input, tmp_path / "out.nrrd", "--model", tiny_model_dir, "--device", "cuda"], capsys)
    assert_clean_failure(code, err, tmp_path, "CUDA was requested but is not available")


@pytest.mark.parametrize("args", [["upsample", "in.nii.gz", "out.nrrd", "--slice-axis", "5"],
                                  ["upsample", "in.nii.gz"], ["upsample", "in.nii.gz", "out.nrrd", "--factor", "two"],
                                  ["nonsense"]])
def test_bad_arguments_are_one_line(args, capsys):
    with pytest.raises(SystemExit) as ended:
        main(args)
    err = capsys.readouterr().err.strip()
    assert ended.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("calid: error:"), err
    assert "--help" in err


def test_output_not_writable(good_input, tmp_path, tiny_model_dir, capsys):
    code, err = run_cli(["upsample", good_input, "/proc/self/out.nrrd", "--model", tiny_model_dir, "--steps", "1"], capsys)
    assert code == 2 and "not writable" in err and len(err.splitlines()) == 1


def test_an_output_the_file_system_refuses_is_one_line(good_input, tmp_path, tiny_model_dir, capsys):
    """/sys refuses new files even to root, whom ``os.access`` tells it may write there."""
    code, err = run_cli(["upsample", good_input, "/sys/out.nrrd", "--model", tiny_model_dir, "--steps", "1"], capsys)
    assert code == 2 and err.startswith("calid: error:") and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("second", ["--uncertainty", "--segmentation"])
def test_a_bad_second_output_leaves_no_first_output(second, good_input, tmp_path, tiny_model_dir, capsys):
    """Every output path is checked before anything is computed, so the volume is not written and then orphaned."""
    code, err = run_cli(["upsample", good_input, tmp_path / "out.nrrd", "--method", "linear", second,
                         tmp_path / "no" / "out_2.nrrd"], capsys)
    assert_clean_failure(code, err, tmp_path, "output folder does not exist")


@pytest.mark.parametrize("second, make, expected", [
    ("--segmentation", "folder", "output folder already exists"),  # a DICOM series' folder
    ("--uncertainty", "file", "file without an image suffix"),
    ("--uncertainty", "folder.nrrd", "output path is a folder")])
def test_a_second_output_that_cannot_be_made_there_is_refused_before_the_run(second, make, expected, good_input,
                                                                           tmp_path, capsys):
    """Its folder exists and is writable, but the path is taken: this was found only when it was written, after
    the volume had been."""
    taken = tmp_path / make
    taken.mkdir() if make.startswith("folder") else taken.write_text("mine")
    code, err = run_cli(["upsample", good_input, tmp_path / "out.nrrd", "--method", "linear", second, taken], capsys)
    assert_clean_failure(code, err, tmp_path, expected)


def test_a_failed_later_write_takes_back_the_outputs_already_written(good_input, tmp_path, error_head_model_dir,
                                                                     monkeypatch):
    """A failure no check can foresee (here the map's write; a full disk) leaves neither the volume nor its data."""
    import calid.engine
    from calid.modelstore import load_model

    def refuse_the_map(image, path, **written_as):
        if "map" in str(path):
            raise OSError("No space left on device")
        return write_image(image, path, **written_as)

    monkeypatch.setattr(calid.engine, "write_image", refuse_the_map)
    with pytest.raises(OSError):
        calid.engine.upsample_file(good_input, tmp_path / "out.mhd", calid.engine.UpsampleOptions(steps=1),
                                   uncertainty_path=tmp_path / "map.nrrd", model=load_model(error_head_model_dir)[0])
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("out")) == []


@pytest.mark.parametrize("second", ["--uncertainty", "--segmentation"])
def test_a_second_output_on_the_volumes_path_is_refused(second, good_input, tmp_path, tiny_model_dir, capsys):
    code, err = run_cli(["upsample", good_input, tmp_path / "out.nrrd", "--model", tiny_model_dir, second,
                         tmp_path / "out.nrrd"], capsys)
    assert_clean_failure(code, err, tmp_path, "two outputs are the same path")


def test_an_output_suffix_that_is_no_image_format_is_named_before_it_becomes_a_dicom_folder(good_input, tmp_path,
                                                                                              capsys):
    code, err = run_cli(["upsample", good_input, tmp_path / "out.nrd", "--method", "linear", "--progress", "none"],
                        capsys)
    assert code == 0 and (tmp_path / "out.nrd").is_dir()  # a folder name with a dot stays allowed
    assert err.splitlines()[0].startswith("calid: warning: ") and "written as a DICOM series" in err, err


def test_output_folder_missing(good_input, tmp_path, tiny_model_dir, capsys):
    code, err = run_cli(["upsample", good_input, tmp_path / "no" / "such" / "out.nrrd", "--model", tiny_model_dir], capsys)
    assert code == 2 and "output folder does not exist" in err


def test_a_killed_runs_staging_is_removed_by_the_next_write_there(good_input, tmp_path, capsys):
    """SIGKILL skips every cleanup: the hidden staging folder and file a killed writer left (a cine's worth of bytes)
    go with the next write into that folder; a running process's, and another host's, stay."""
    from calid.staging import staging_file, staging_folder

    out = tmp_path / "out"
    out.mkdir()
    killed = subprocess.run([sys.executable, "-c", (
        "import os, signal, sys; from pathlib import Path; from calid.staging import staging_file, staging_folder\n"
        "folder = staging_folder(Path(sys.argv[1])); (folder / 'part.nrrd').write_bytes(b'x' * 1000)\n"
        "os.close(staging_file(Path(sys.argv[1]), '.seq.nrrd')[0])\n"
        "os.kill(os.getpid(), signal.SIGKILL)"), str(out)], env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert killed.returncode == -9
    left = sorted(p.name for p in out.iterdir())
    assert len(left) == 2 and all(name.startswith(".calid-") for name in left)
    running = staging_folder(out, "model")  # this test's own process: still running
    os.close(staging_file(out, ".seq.nrrd")[0])
    elsewhere = out / ".calid-otherhost-1-abcdefgh"
    elsewhere.mkdir()
    assert main(["upsample", str(good_input), str(out / "dense.nrrd"), "--method", "linear", "--progress", "none"]) == 0
    remaining = sorted(p.name for p in out.iterdir())
    assert not set(left) & set(remaining) and running.name in remaining and elsewhere.name in remaining
    assert len(remaining) == 4 and "dense.nrrd" in remaining


def test_a_running_writers_staging_is_kept_from_another_pid_namespace_and_staged_files_are_not_private(tmp_path):
    """A process in another PID namespace on the same host (a container) cannot see the writer's process id: it
    judged the writer's live folder a leftover and removed it. And ``mkstemp``'s private mode stayed on the output."""
    import shutil as shell

    from calid.staging import current_umask, staging_file, staging_folder

    live = staging_folder(tmp_path)
    handle, staged = staging_file(tmp_path, ".png")
    os.close(handle)
    assert os.stat(staged).st_mode & 0o777 == 0o666 & ~current_umask()
    if shell.which("unshare") is None:
        pytest.skip("no unshare here")
    elsewhere = subprocess.run(["unshare", "-Urpf", "--mount-proc", sys.executable, "-c",
                                "import sys; from pathlib import Path; from calid.staging import remove_leftovers; "
                                "print(remove_leftovers(Path(sys.argv[1])))", str(tmp_path)],
                               capture_output=True, text=True,
                               env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    if elsewhere.returncode != 0:
        pytest.skip(f"no user namespaces here: {elsewhere.stderr.strip()[:200]}")
    assert elsewhere.stdout.strip() == "[]" and live.is_dir() and Path(staged).is_file()


def test_the_python_apis_wrong_types_are_calid_errors(small_image):
    """The README says the API raises calid.CalidError: an array for an image was an AttributeError, a factor given as
    text a TypeError from deep in the geometry."""
    import calid
    from calid.engine import UpsampleOptions

    with pytest.raises(calid.CalidError, match="is a ndarray, not a SimpleITK image"):
        calid.upsample_image(np.zeros((4, 4, 4)), UpsampleOptions(factor=2, method="linear"))
    for options, expected in ((UpsampleOptions(factor="2", method="linear"), "--factor must be a whole number"),
                              (UpsampleOptions(steps=1.5), "--steps must be a whole number"),
                              (UpsampleOptions(spacing="5", method="linear"), "--spacing must be a number")):
        with pytest.raises(calid.CalidError, match=expected):
            calid.upsample_image(small_image, options)
    assert calid.upsample_image(small_image, UpsampleOptions(factor=np.int64(2), method="linear")).factor == 2


def test_output_equal_to_input_is_refused(good_input, tmp_path, tiny_model_dir, capsys):
    before = digest(good_input)
    code, err = run_cli(["upsample", good_input, good_input, "--model", tiny_model_dir], capsys)
    assert code == 2 and "overwrite the input" in err
    assert digest(good_input) == before


def broken_model(tiny_model_dir: Path, tmp_path: Path, how: str) -> Path:
    target = tmp_path / f"model-{how.replace(' ', '-')}"
    shutil.copytree(tiny_model_dir, target)
    card = json.loads((target / CARD_FILE).read_text(encoding="utf-8"))
    weights = target / WEIGHTS_FILE
    if how == "checksum mismatch":
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif how == "corrupt":
        weights.write_bytes(b"not a safetensors file")
        card["sha256"] = hashlib.sha256(b"not a safetensors file").hexdigest()
    elif how == "incompatible config":
        card["config"]["denoiser"]["channels"] = [24, 48, 48]
    elif how == "bad card":
        (target / CARD_FILE).write_text("{ not json", encoding="utf-8")
        return target
    elif how == "no weights":
        weights.unlink()
    elif how == "huge layers":  # built at that size, this took 10 GB and 24 s before the weights were compared
        card["config"]["vae"]["channels"] = [4096, 4096, 4096]
    elif how == "card is a list":
        card = [card]
    elif how == "negative width":
        card["config"]["vae"]["latent_channels"] = -4
    elif how == "zero default steps":
        card["config"]["default_steps"] = 0
    elif how == "calibration of the wrong shape":
        from calid.networks import ERROR_HEAD_CONFIG

        card["config"]["error_head"] = {**ERROR_HEAD_CONFIG, "calibration": {
            "gaps_mm": [10.0, 20.0], "log_scale": [0.0], "correction": [[0.0, 0.0]]}}
        card["config"]["motion"] = {"flow": "dis"}
    (target / CARD_FILE).write_text(json.dumps(card), encoding="utf-8")
    return target


@pytest.mark.parametrize("how,expected", [
    ("checksum mismatch", "checksum mismatch"),
    ("corrupt", "corrupt weights file"),
    ("incompatible config", "do not fit the config"),
    ("bad card", "not valid JSON"),
    ("no weights", "has no model.safetensors"),
    ("huge layers", "do not fit the config in its card (vae."),
    ("card is a list", "is not a calid-model/1 card"),
    ("negative width", "has an invalid config: RuntimeError"),
    ("zero default steps", "invalid diffusion settings: ValueError: default_steps must be a whole number"),
    ("calibration of the wrong shape", "has an invalid config: ValueError: the calibration's correction must be 2 x 1"),
])
def test_bad_models(how, expected, good_input, tmp_path, tiny_model_dir, capsys):
    model = broken_model(tiny_model_dir, tmp_path, how)
    code, err = run_cli(["upsample", good_input, tmp_path / "out.nrrd", "--model", model], capsys)
    assert_clean_failure(code, err, tmp_path, expected)


def test_a_folder_named_like_a_bundled_model_does_not_stand_in_for_it(good_input, tmp_path, tiny_model_dir, capsys,
                                                                      monkeypatch):
    """A bare name is a model's first: a (broken) copy in the working directory replaced the default model."""
    from calid.modelstore import resolve_model_dir

    broken = broken_model(tiny_model_dir, tmp_path, "bad card")
    broken.rename(tmp_path / "calid-acdc-scd")
    monkeypatch.chdir(tmp_path)
    assert resolve_model_dir(None).parent.name == "models" and resolve_model_dir(None) != tmp_path / "calid-acdc-scd"
    assert resolve_model_dir("./calid-acdc-scd") == Path("calid-acdc-scd")  # as a path, it is that folder


def test_an_imported_model_is_checked_named_and_copied_whole(tiny_model_dir, tmp_path, monkeypatch):
    """Only its card and weights come in, under a name of one folder that no bundled model has; a folder that is no
    CaLID model (a card of another kind, weights not matching it) is refused before anything is copied."""
    from calid.modelindex import import_model

    monkeypatch.setenv("CALID_MODELS_DIR", str(tmp_path / "user"))
    source = tmp_path / "colleague"
    shutil.copytree(tiny_model_dir, source)
    (source / "model.pt").write_bytes(b"a pickle")
    for name, error in (("../escape", ValueError), ("a/b", ValueError), ("calid-acdc", FileExistsError)):
        with pytest.raises(error):
            import_model(source, name)
    assert not (tmp_path / "escape").exists() and not (tmp_path / "user").exists()
    target = import_model(source, "mine")
    assert sorted(p.name for p in target.iterdir()) == [CARD_FILE, WEIGHTS_FILE]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o777 & ~umask  # readable in a shared models folder, not private
    with pytest.raises(FileExistsError):
        import_model(source, "mine")
    (source / WEIGHTS_FILE).write_bytes(b"other weights")
    with pytest.raises(ValueError, match="do not match the checksum"):
        import_model(source, "theirs")
    (source / CARD_FILE).write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ValueError, match="not a CaLID model card"):
        import_model(source, "theirs")
    assert sorted(p.name for p in (tmp_path / "user").iterdir()) == ["mine"]


def test_missing_model_lists_what_exists(good_input, tmp_path, capsys):
    code, err = run_cli(["upsample", good_input, tmp_path / "out.nrrd", "--model", "no-such-model"], capsys)
    assert_clean_failure(code, err, tmp_path, "model not found: no-such-model (available:")


def test_real_process_prints_no_traceback(tmp_path):
    """The same through a real ``python -m calid`` process, as users and the Slicer worker run it."""
    proc = subprocess.run([sys.executable, "-m", "calid", "upsample", str(tmp_path / "missing.nii"), str(tmp_path / "o.nrrd")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"calid: error: input not found: {tmp_path / 'missing.nii'}"
