"""The conventions every `ptyinr` command follows (issue 15).

A light import (help and completion answer without loading torch, scipy, xarray, matplotlib or
distributed), `--version`, `-h`, shell completion, help panels, help text on every parameter
that rich markup does not eat, closed choice sets identical to what the pipeline accepts, one
spelling per concept (old spellings still taken), and `--json` with nothing else on stdout.
"""

from __future__ import annotations

import json
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import pytest
import typer
from rich.text import Text
from typer.testing import CliRunner

from ptyinr.cli import common
from ptyinr.cli.main import PANELS, app
from ptyinr.version import __version__

runner = CliRunner()

HEAVY = ("torch", "scipy", "xarray", "matplotlib", "distributed")

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

[train]
epochs = 2
threads = 1
device = "cpu"
"""


def invoke(*args: object, **kwargs: Any):
    return runner.invoke(app, [str(a) for a in args], **kwargs)


def help_text(*command: str) -> str:
    """`ptyinr COMMAND --help`, wide enough that no help line wraps."""
    result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    return result.stdout


def walk(command: Any, path: str = "") -> list[tuple[str, Any]]:
    """(command path, command) of the whole tree below `command`, groups included."""
    found = [(path, command)]
    for name, sub in getattr(command, "commands", {}).items():
        found += walk(sub, f"{path} {name}".strip())
    return found


@pytest.fixture(scope="module")
def tree() -> list[tuple[str, Any]]:
    return walk(typer.main.get_command(app))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A small simulated store, written through the CLI."""
    root = tmp_path_factory.mktemp("conventions")
    preset = root / "tiny.toml"
    preset.write_text(TINY_TOML)
    path = root / "scan.zarr"
    result = invoke("simulate", path, "--preset", preset, "--seed", 1)
    assert result.exit_code == 0, result.output
    return {"root": root, "preset": preset, "store": path}


# ------------------------------------------------------------------------- a light import


@pytest.mark.parametrize(
    "argv", [None, ["--help"], ["simulate", "--help"], ["export", "-h"], ["run", "--help"]]
)
def test_the_cli_and_its_help_load_no_heavy_library(argv: list[str] | None) -> None:
    """Importing the app (and rendering help) leaves torch, scipy, xarray, matplotlib and
    distributed unloaded: they are imported by the commands that use them."""
    code = "import sys\nfrom ptyinr.cli.main import app\n"
    if argv is not None:
        code += f"try:\n    app({argv!r}, prog_name='ptyinr')\nexcept SystemExit:\n    pass\n"
    code += f"print([m for m in {HEAVY!r} if m in sys.modules])\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout[-2000:]


# ------------------------------------------------------------ version, -h, completion, panels


def test_version_prints_the_package_version() -> None:
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"ptyinr {__version__}"


@pytest.mark.parametrize("command", [[], ["simulate"], ["profiles", "copy"], ["nn", "train"]])
def test_h_is_help(command: list[str]) -> None:
    long, short = invoke(*command, "--help"), invoke(*command, "-h")
    assert long.exit_code == short.exit_code == 0
    assert short.stdout == long.stdout and "Usage:" in short.stdout


def complete(words: str) -> list[str]:
    """What bash completion offers for the command line `words` (cursor at its end)."""
    env = {
        "_PTYINR_COMPLETE": "complete_bash",
        "COMP_WORDS": words,
        "COMP_CWORD": str(len(words.split(" ")) - 1),
    }
    result = runner.invoke(app, [], env=env, prog_name="ptyinr")
    assert result.exit_code == 0, result.output
    return result.stdout.split()


def test_shell_completion_offers_commands_and_choices() -> None:
    assert complete("ptyinr sim") == ["simulate"]
    assert complete("ptyinr ingest in.h5 out.zarr --dc c") == ["centre", "corner"]
    assert complete("ptyinr export s.zarr --format ") == [c.value for c in common.ExportFormat]
    assert complete("ptyinr reconstruct s.zarr --device cu") == ["cuda"]
    script = invoke("--show-completion", "bash", prog_name="ptyinr")
    assert script.exit_code == 0 and "_PTYINR_COMPLETE=complete_bash" in script.stdout


def test_every_command_sits_in_one_help_panel(tree: list[tuple[str, Any]]) -> None:
    top = {name: cmd for name, cmd in tree if name and " " not in name}
    listed = [name for names in PANELS.values() for name in names]
    assert sorted(listed) == sorted(top), "PANELS must list each top-level command once"
    for name, cmd in top.items():
        assert cmd.rich_help_panel in PANELS and name in PANELS[cmd.rich_help_panel], name
    text = help_text()
    for panel in PANELS:
        assert f"─ {panel} ─" in text


# ------------------------------------------------------------------------------ help text


def test_every_parameter_has_help(tree: list[tuple[str, Any]]) -> None:
    missing = {
        (path, param.name)
        for path, cmd in tree
        for param in cmd.params
        if not (getattr(param, "help", None) or "").strip()
    }
    assert not missing, sorted(missing)


def test_no_help_text_is_eaten_by_rich_markup(tree: list[tuple[str, Any]]) -> None:
    """Rich markup reads `[word]` as a style: text meant literally must be escaped (\\[)."""
    texts = [(path, "help", cmd.help or "") for path, cmd in tree]
    texts += [
        (path, p.name, getattr(p, "help", None) or "") for path, cmd in tree for p in cmd.params
    ]
    for path, what, text in texts:
        assert Text.from_markup(text).plain == text.replace("\\[", "["), (path, what, text)


def test_simulate_help_shows_its_brackets_and_choices() -> None:
    text = help_text("simulate")
    assert "take the [simulate] table of a preset" in text
    assert "a preset's [simulate] table" in text
    assert "clean|poisson|gaussian|mixed|counts" in text and "raster|spiral|jitter" in text


# ------------------------------------------------------------------- closed choice sets


def _literal(annotation: Any) -> set[str]:
    """The strings of a Literal, also inside `Literal[...] | None`."""
    if typing.get_origin(annotation) is typing.Literal:
        return set(typing.get_args(annotation))
    return set().union(*(_literal(a) for a in typing.get_args(annotation)))


def _values(enum: type) -> set[str]:
    return {c.value for c in enum}


def test_choices_are_what_the_pipeline_accepts() -> None:
    import dataclasses

    from ptyinr.config import ReconstructionConfig
    from ptyinr.export import EXPORTERS
    from ptyinr.ingest.convert import Conversions
    from ptyinr.simulate import SimulationConfig

    sim = SimulationConfig.model_fields
    assert _values(common.Noise) == _literal(sim["noise"].annotation)
    assert _values(common.ScanKind) == _literal(sim["scan"].annotation)
    train = ReconstructionConfig.model_fields["train"].annotation
    assert _values(common.Device) == _literal(train.model_fields["device"].annotation)
    fields = {f.name: f.type for f in dataclasses.fields(Conversions)}
    hints = typing.get_type_hints(Conversions)
    for name, enum in [
        ("dc", common.DcPosition),
        ("positions_unit", common.PositionsUnit),
        ("positions_order", common.PositionsOrder),
        ("negative", common.Negative),
    ]:
        assert name in fields and _values(enum) == _literal(hints[name]), name
    assert list(_values(common.ExportFormat)) and _values(common.ExportFormat) == set(EXPORTERS)
    from ptyinr.cli.export import FORMAT_DESCRIPTIONS

    assert FORMAT_DESCRIPTIONS == {k: e.description for k, e in EXPORTERS.items()}


def test_parallel_choices_are_those_ingest_archive_takes(tmp_path: Path) -> None:
    """ingest_archive refuses an unknown `parallel` naming the ones it takes: the CLI's."""
    from ptyinr.errors import InputError
    from ptyinr.ingest import ingest_archive

    (tmp_path / "a.h5").write_bytes(b"not hdf5")
    with pytest.raises(InputError) as info:
        ingest_archive(str(tmp_path / "*.h5"), tmp_path / "out", parallel="bogus")
    named = {w.strip(",") for w in str(info.value).split("expected")[-1].split()}
    assert _values(common.Parallel) <= named


def test_retries_default_is_the_graphs() -> None:
    from ptyinr import graph
    from ptyinr.cli import run

    assert run.DEFAULT_RETRIES == graph.DEFAULT_RETRIES


def test_a_wrong_choice_is_one_line_naming_option_value_and_choices(tmp_path: Path) -> None:
    result = invoke("export", tmp_path / "s.zarr", "--run-id", "r", "--format", "png")
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == ["error: --format='png': expected one of cxi, ptychodus, tiff, npz"]
    upper = invoke("simulate", tmp_path / "n.zarr", "--noise", "LOUD")
    assert upper.exit_code == 2 and "--noise='LOUD'" in upper.stderr
    assert not (tmp_path / "n.zarr").exists()


# ----------------------------------------------------------------- one spelling per concept


def test_force_and_the_old_overwrite_both_replace(tiny: dict[str, Path]) -> None:
    path, preset = tiny["store"], tiny["preset"]
    again = invoke("simulate", path, "--preset", preset)
    assert again.exit_code == 2 and "--force" in again.stderr
    for flag in ("--force", "--overwrite"):
        result = invoke("simulate", path, "--preset", preset, "--seed", 1, flag)
        assert result.exit_code == 0, (flag, result.output)
    assert "--overwrite" not in help_text("simulate")


@pytest.mark.parametrize("command", ["evaluate", "show", "export"])
def test_run_id_names_the_run_to_read(command: str, tiny: dict[str, Path]) -> None:
    extra = ["--format", "npz"] if command == "export" else []
    for flag in ("--run-id", "--run"):  # --run: the old spelling, hidden
        result = invoke(command, tiny["store"], flag, "nosuch", *extra)
        assert result.exit_code == 2 and "no run 'nosuch'" in result.stderr, result.output
    missing = invoke(command, tiny["store"], *extra)
    assert missing.exit_code == 2
    assert missing.stderr.startswith("error: --run-id missing") and missing.stdout == ""
    both = invoke(command, tiny["store"], "--run-id", "a", "--run", "b", *extra)
    assert both.exit_code == 2 and "give one" in both.stderr
    text = help_text(command)
    assert "--run-id" in text and "--run " not in text


def test_shared_options_have_one_spelling(tree: list[tuple[str, Any]]) -> None:
    """Where a command takes one of these concepts, it is spelled the same (hidden aliases
    aside): the output folder/file, replacing, the run's name, quiet progress."""
    expected = {
        "out": {"--out", "-o"},
        "force": {"--force"},
        "run_id": {"--run-id"},
        "quiet": {"--quiet", "-q"},
        "as_json": {"--json"},
    }
    for path, cmd in tree:
        for param in cmd.params:
            if param.name in expected and param.param_type_name == "option":
                assert set(param.opts) == expected[param.name], (path, param.opts)
            if param.name == "overwrite" and param.param_type_name == "option":
                assert param.hidden, path


# --------------------------------------------------------------------------------- --json


def test_info_json(tiny: dict[str, Path]) -> None:
    result = invoke("info", tiny["store"], "--json")
    assert result.exit_code == 0, result.output
    facts = json.loads(result.stdout)
    assert facts["frames"] > 0 and facts["frame_shape"] == [16, 16]
    assert facts["positions_unit"] == "m" and facts["plots"] == []


def test_plan_json(tiny: dict[str, Path]) -> None:
    args = ["reconstruct", tiny["store"], "--config", tiny["preset"]]
    text = invoke(*args, "--plan-for", "cuda:8GiB")
    result = invoke(*args, "--plan-for", "cuda:8GiB", "--json")
    assert result.exit_code == text.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    frames = json.loads(invoke("info", tiny["store"], "--json").stdout)["frames"]
    assert plan["workload"]["n_positions"] == frames
    assert plan["workload"]["frame_shape"] == [16, 16]
    assert plan["device"] == "cuda" and plan["time_s"] is None and plan["memory"]["fits"]
    assert plan["memory"]["peak"] == max(
        sum(plan["memory"]["parts"].values()), plan["memory"]["loading_peak"]
    )
    assert plan["memory"]["budget"] <= 8 * 2**30
    too_small = invoke(*args, "--plan-for", "cuda:1KiB", "--json")
    assert too_small.exit_code == 2 and json.loads(too_small.stdout)["memory"]["fits"] is False
    assert too_small.stderr.startswith("error:")


def test_reconstruct_json(tiny: dict[str, Path], tmp_path: Path) -> None:
    path = tmp_path / "scan.zarr"
    assert invoke("simulate", path, "--preset", tiny["preset"], "--seed", 3).exit_code == 0
    result = invoke(
        "reconstruct", path, "--config", tiny["preset"], "--run-id", "r", "--json", "-q"
    )
    assert result.exit_code == 0, result.output
    done = json.loads(result.stdout)
    assert done["run_id"] == "r" and done["status"] == "complete" and done["epochs"] == 2
    assert done["final_loss"] > 0 and done["quality"]["relative_error"] >= 0
    (row,) = json.loads(invoke("results", path, "--json").stdout)
    assert row["run_id"] == "r" and row["final_loss"] == pytest.approx(done["final_loss"])


def test_results_and_profiles_and_status_json(
    tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    results = invoke("results", tiny["store"], "--json")
    assert results.exit_code == 0 and json.loads(results.stdout) == []
    profiles = invoke("profiles", "--json")
    assert profiles.exit_code == 0, profiles.output
    listed = json.loads(profiles.stdout)
    names = {p["profile"] for p in listed["profiles"]}
    assert {"gpu-node", "local-test"} <= names and listed["searched"]
    monkeypatch.setenv("PATH", str(tmp_path))  # no squeue
    status = invoke("status", tiny["store"], "--json")
    assert status.exit_code == 0, status.output
    assert json.loads(status.stdout) == {"jobs": None, "stores": {str(tiny["store"]): []}}
    assert "squeue not found" in status.stderr


def test_run_and_scan_json(tiny: dict[str, Path], tmp_path: Path) -> None:
    """`run --json` and `scan --json`: stdout is the JSON alone, progress went to stderr."""
    from ptyinr.cluster import connect

    path = tmp_path / "scan.zarr"
    assert invoke("simulate", path, "--preset", tiny["preset"], "--seed", 2).exit_code == 0

    sets = [a for item in ("train.epochs=2", "model.probe_init_steps=5") for a in ("--set", item)]
    base = ["--config", str(tiny["preset"]), *sets, "--no-frc", "--quiet"]
    # a plain-TCP loopback cluster shared by both commands (hence --insecure): one start
    with connect("local", n_workers=1, dashboard_address=None, quiet=True, local_tls=False) as c:
        on = ["--cluster", c.scheduler.address, "--insecure"]
        ran = invoke("run", path, *base, *on, "--run-id", "j1", "--json")
        assert ran.exit_code == 0, ran.output
        (row,) = json.loads(ran.stdout)
        assert row["run_id"] == "j1" and row["status"] == "complete"
        assert row["final_loss"] > 0 and row["resolution"] is None  # no FRC asked for
        out = tmp_path / "summary"
        scanned = invoke(
            "scan",
            path,
            *base,
            *on,
            "--grid",
            "train.lr_object=1e-3,2e-3",
            "--out",
            out,
            "--json",
        )
    assert scanned.exit_code == 0, scanned.output
    summary = json.loads(scanned.stdout)
    assert summary["summary"]["csv"] == str(out / "summary.csv") and (out / "summary.csv").exists()
    runs = summary["runs"]
    assert sorted(r["label"]["train.lr_object"] for r in runs) == [1e-3, 2e-3]
    assert all(r["status"] == "complete" for r in runs) and sum(r["best"] for r in runs) == 1
    assert "scan: 1 store(s) x 2 configuration(s)" in scanned.stderr
    listed = json.loads(invoke("results", path, "--json").stdout)
    assert {r["run_id"] for r in listed} == {"j1", *(r["run_id"] for r in runs)}


def test_print_json_writes_strict_json(capsys: pytest.CaptureFixture[str]) -> None:
    common.print_json({"a": float("nan"), "b": [1.5, float("inf")], "c": Path("x"), 1: None})
    assert json.loads(capsys.readouterr().out) == {
        "a": None,
        "b": [1.5, None],
        "c": "x",
        "1": None,
    }
