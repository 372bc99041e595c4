"""The engine's CLI end to end on tiny data, and every user-error path of issue 2 item 8.

Each error must exit with status 2, print one line naming the thing and what was expected,
and write nothing into the store (the store's file listing is compared before and after).
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch
import zarr
from typer.testing import CliRunner

from ptyinr import store
from ptyinr.cli.main import app
from ptyinr.config import load_config

TINY_TOML = """
[simulate]
object_size = 48
probe_size = 16
focus_fwhm_px = 3.0
overlap = 0.0
noise = "clean"

[model]
siren_width = 16
siren_hidden_layers = 1
hash_levels = 4
hash_log2_table_size = 10
probe_init_steps = 20

[train]
epochs = 4
lr_object = 1e-3
lr_probe = 1e-3
threads = 1
device = "cpu"
"""

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def listing(path: Path) -> list[tuple[str, int, int]]:
    """Every file under `path` with its size and modification time."""
    if path.is_file():
        st = path.stat()
        return [(path.name, st.st_size, st.st_mtime_ns)]
    return sorted(
        (str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns)
        for p in path.rglob("*")
        if p.is_file()
    )


def assert_user_error(result, *names: str) -> str:
    """Exit 2, one line on stderr naming each of `names`, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:"), lines[0]
    for name in names:
        assert name in lines[0], (name, lines[0])
    assert "Traceback" not in result.output
    return lines[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """A simulated store (through the CLI) and the preset that made it."""
    root = tmp_path_factory.mktemp("cli")
    preset = root / "tiny.toml"
    preset.write_text(TINY_TOML)
    path = root / "scan.zarr"
    result = invoke("simulate", path, "--preset", preset, "--seed", 1)
    assert result.exit_code == 0, result.output
    assert "wrote" in result.stdout
    return {"root": root, "preset": preset, "store": path}


def reconstruct_run(tiny: dict[str, Path], run_id: str, *sets: str):
    """`ptyinr reconstruct` of the tiny store with its preset and `--set` overrides."""
    overrides = [a for item in sets for a in ("--set", item)]
    return invoke(
        "reconstruct",
        tiny["store"],
        "--config",
        tiny["preset"],
        *overrides,
        "--run-id",
        run_id,
        "--quiet",
    )


# ------------------------------------------------------------------------------ end to end


def test_simulate_reconstruct_evaluate_show(tiny):
    path, preset = tiny["store"], tiny["preset"]
    ds = store.open_scan_store(path)
    assert "true_object" in ds and "true_probe" in ds
    assert ds.sizes["det_y"] == 16 and ds.attrs["positions_unit"] == "m"

    result = reconstruct_run(tiny, "r1", "train.epochs=3")
    assert result.exit_code == 0, result.output
    assert "r1" in result.stdout and "complete" in result.stdout

    runs = {r["run_id"]: r for r in store.list_runs(path)}
    assert runs["r1"]["status"] == "complete"
    run = store.open_run(path, "r1")
    assert run["object"].dtype == np.complex64 and run["probe"].dtype == np.complex64
    assert run["probe"].shape == (16, 16)
    assert run["object"]["y"].attrs["units"] == "m"
    assert run.sizes["epoch"] == 3
    expected = load_config(preset, ["train.epochs=3"])
    # recorded as resolved: data.source = auto became the array the run read
    expected = expected.model_copy(
        update={"data": expected.data.model_copy(update={"source": "intensities"})}
    )
    assert run.attrs["config"] == json.loads(json.dumps(expected.model_dump()))
    # the object grid covers the scanned windows, in the store's metres
    pixel = store.object_pixel_size(ds, (16, 16))
    np.testing.assert_allclose(np.diff(run["object"]["x"].values), pixel[1], rtol=1e-9)

    result = invoke("evaluate", path, "--run", "r1", "--json")
    assert result.exit_code == 0, result.output
    scores = json.loads(result.stdout)
    for key in ("amplitude_psnr_db", "phase_psnr_db", "relative_error"):
        assert np.isfinite(scores[key])
    assert scores["relative_error"] == pytest.approx(
        runs["r1"]["quality"]["relative_error"], rel=1e-6
    )
    # the comparison figure, beside the store by default, named on stderr under --json
    comparison = (
        path.parent / f"{path.name.removesuffix('.zarr')}.figures" / "r1" / "comparison.png"
    )
    assert comparison.is_file() and str(comparison) in result.stderr
    result = invoke("evaluate", path, "--run-id", "r1", "--out", tiny["root"] / "eval")
    assert result.exit_code == 0, result.output
    assert (tiny["root"] / "eval" / "comparison.png").is_file()

    out = tiny["root"] / "figures"
    result = invoke("show", path, "--run", "r1", "--out", out, "--unwrap")
    assert result.exit_code == 0, result.output
    pngs = sorted(out.glob("*.png"))
    names = " ".join(p.name for p in pngs)
    assert len(pngs) >= 3 and all(w in names for w in ("amplitude", "phase", "probe", "loss"))
    assert "phase_unwrapped" in names
    for png in pngs:
        assert matplotlib.image.imread(png).ndim == 3  # a real image


def test_a_finished_run_leaves_no_checkpoint_folder(tiny, recwarn):
    """Checkpoints exist while a run can resume; afterwards the store is pure Zarr again, so
    listing its members raises no "not recognized as a component" warning."""
    path = tiny["store"]
    result = reconstruct_run(tiny, "ckpt", "train.epochs=2", "train.checkpoint_every=1")
    assert result.exit_code == 0, result.output
    assert {r["run_id"]: r for r in store.list_runs(path)}["ckpt"]["status"] == "complete"
    assert not (path / "checkpoints").exists()
    recwarn.clear()
    members = dict(zarr.open_group(path, mode="r").members())
    assert "reconstructions" in members
    assert not [w for w in recwarn if "not recognized" in str(w.message)]


def test_removing_one_runs_checkpoints_keeps_the_others(tmp_path):
    from ptyinr.reconstruct import checkpoint_path, remove_checkpoints

    for run in ("a", "b"):
        checkpoint_path(tmp_path, run).mkdir(parents=True)
        (checkpoint_path(tmp_path, run) / "zarr.json").write_text("{}")
    remove_checkpoints(tmp_path, "a")
    assert not checkpoint_path(tmp_path, "a").parent.exists()
    assert checkpoint_path(tmp_path, "b").exists()
    remove_checkpoints(tmp_path, "b")
    assert not (tmp_path / "checkpoints").exists()


def test_reconstruct_with_known_probe_file(tiny):
    path, preset = tiny["store"], tiny["preset"]
    probe_file = tiny["root"] / "probe.npy"
    np.save(probe_file, store.open_scan_store(path)["true_probe"].values)
    result = invoke(
        "reconstruct",
        path,
        "--config",
        preset,
        "--probe",
        probe_file,
        "--run-id",
        "known",
        "--quiet",
    )
    assert result.exit_code == 0, result.output
    run = store.open_run(path, "known")
    assert bool(run.attrs["known_probe"]) is True
    truth = np.load(probe_file)
    estimate = run["probe"].values
    # the fixed probe is the file's, up to the global scale the trainer fits
    ratio = estimate[truth != 0] / truth[truth != 0]
    np.testing.assert_allclose(ratio, ratio.mean(), rtol=1e-3)


def test_demo_runs_and_writes_figures(tmp_path):
    out = tmp_path / "demo"
    result = invoke(
        "demo",
        "--out",
        out,
        "--set",
        "model.siren_width=16",
        "--set",
        "model.siren_hidden_layers=1",
        "--set",
        "model.hash_levels=4",
        "--set",
        "model.hash_log2_table_size=10",
        "--set",
        "model.probe_init_steps=10",
        "--set",
        "train.epochs=2",
        "--set",
        "train.threads=1",
    )
    assert result.exit_code == 0, result.output
    assert "quality" in result.stdout.lower()
    runs = {r["run_id"]: r for r in store.list_runs(out / "demo.zarr")}
    assert runs["demo"]["status"] == "complete"
    assert len(list((out / "figures").glob("*.png"))) >= 3


# ------------------------------------------------------------------------------ errors


def test_reconstruct_refuses_a_directory_that_is_not_a_store(tmp_path, tiny):
    plain = tmp_path / "plain.zarr"
    plain.mkdir()
    (plain / "readme.txt").write_text("not a store")
    before = listing(plain)
    assert_user_error(invoke("reconstruct", plain, "--config", tiny["preset"]), str(plain))
    assert listing(plain) == before


def test_reconstruct_refuses_a_zarr_group_without_the_schema(tmp_path, tiny):
    other = tmp_path / "other.zarr"
    zarr.open_group(str(other), mode="w", zarr_format=3).attrs["kind"] = "something else"
    before = listing(other)
    assert_user_error(invoke("reconstruct", other, "--config", tiny["preset"]), "schema_version")
    assert listing(other) == before


def test_reconstruct_refuses_a_file_and_a_missing_path(tmp_path, tiny):
    a_file = tmp_path / "scan.h5"
    a_file.write_bytes(b"\x89HDF\r\n")
    before = listing(a_file)
    assert_user_error(invoke("reconstruct", a_file, "--config", tiny["preset"]), str(a_file))
    assert listing(a_file) == before
    missing = tmp_path / "missing.zarr"
    assert_user_error(invoke("reconstruct", missing, "--config", tiny["preset"]), str(missing))
    assert not missing.exists()


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["--set", "model.bogus=1"], ["model.bogus"]),
        (["--set", "bogus.key=1"], ["bogus"]),
        (["--set", "train.epochs=abc"], ["train.epochs", "abc"]),
        (["--set", "train.epochs=0"], ["train.epochs", "0"]),
        (["--set", "train.lr_object=7"], ["train.lr_object", "7"]),
        (["--set", "model.object=resnet"], ["model.object", "resnet"]),
        (["--set", "noequals"], ["noequals"]),
        (["--config", "no-such-preset"], ["no-such-preset"]),
        (["--run-id", "r0"], ["r0", "already exists"]),
        (["--run-id", "bad/name"], ["bad/name"]),
    ],
)
def test_reconstruct_config_errors_write_nothing(tiny, args, names):
    path = tiny["store"]
    if "r0" in args and "r0" not in {r["run_id"] for r in store.list_runs(path)}:
        result = invoke(
            "reconstruct", path, "--config", tiny["preset"], "--run-id", "r0", "--quiet"
        )
        assert result.exit_code == 0, result.output
    before = listing(path)
    result = invoke("reconstruct", path, "--config", tiny["preset"], *args, "--quiet")
    assert_user_error(result, *names)
    assert listing(path) == before


def test_config_file_errors_name_the_file(tiny, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nepochs = 'many'\n")
    before = listing(tiny["store"])
    assert_user_error(
        invoke("reconstruct", tiny["store"], "--config", bad), str(bad), "train.epochs"
    )
    assert listing(tiny["store"]) == before


@pytest.mark.parametrize(
    ("content", "names"),
    [
        (np.ones((8, 8), np.complex64), ["(8, 8)", "(16, 16)"]),
        (np.ones((2, 16, 16), np.complex64), ["(2, 16, 16)", "(16, 16)"]),
        (np.full((16, 16), np.nan, np.complex64), ["NaN"]),
        (b"not numpy at all", [".npy"]),
    ],
)
def test_probe_file_errors_write_nothing(tiny, tmp_path, content, names):
    probe_file = tmp_path / "probe.npy"
    if isinstance(content, bytes):
        probe_file.write_bytes(content)
    else:
        np.save(probe_file, content)
    before = listing(tiny["store"])
    result = invoke("reconstruct", tiny["store"], "--config", tiny["preset"], "--probe", probe_file)
    assert_user_error(result, str(probe_file), *names)
    assert listing(tiny["store"]) == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_a_user_error(tiny):
    before = listing(tiny["store"])
    result = invoke("reconstruct", tiny["store"], "--config", tiny["preset"], "--device", "cuda")
    assert_user_error(result, "cuda")
    assert listing(tiny["store"]) == before


def test_evaluate_and_show_refuse_unknown_runs(tiny, tmp_path):
    before = listing(tiny["store"])
    assert_user_error(invoke("evaluate", tiny["store"], "--run", "nosuch"), "nosuch")
    out = tmp_path / "figs"
    assert_user_error(invoke("show", tiny["store"], "--run", "nosuch", "--out", out), "nosuch")
    assert not out.exists()
    assert listing(tiny["store"]) == before


def test_simulate_errors_write_nothing(tiny, tmp_path):
    before = listing(tiny["store"])
    assert_user_error(invoke("simulate", tiny["store"]), str(tiny["store"]), "--overwrite")
    assert listing(tiny["store"]) == before
    fresh = tmp_path / "new.zarr"
    assert_user_error(invoke("simulate", fresh, "--noise", "loud"), "noise", "loud")
    assert_user_error(invoke("simulate", fresh, "--overlap", "1.5"), "overlap", "1.5")
    assert_user_error(invoke("simulate", fresh, "--preset", "no-such-preset"), "no-such-preset")
    assert not fresh.exists()


def test_a_diverging_fit_is_one_line_exit_1_and_writes_no_run(tmp_path, tiny):
    """NaN in the frames makes the loss NaN: ReconstructionFailed, reported without traceback."""
    ds = store.open_scan_store(tiny["store"])
    frames = ds["intensities"].values.copy()
    frames[2, 5, 5] = np.nan
    keep = ("wavelength_m", "detector_distance_m", "detector_pixel_size_m", "positions_unit")
    path = store.create_scan_store(
        tmp_path / "nan.zarr",
        frames,
        ds["positions"].values,
        attrs={**{k: ds.attrs[k] for k in keep}, "scan_id": "nan"},
    )
    result = invoke("reconstruct", path, "--config", tiny["preset"], "--run-id", "x", "--quiet")
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "nan" in lines[0] and "step 1" in lines[0], result.stderr
    assert "Traceback" not in result.output
    assert store.list_runs(path) == []
