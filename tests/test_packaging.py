"""Packaging: the source folders (pipeline/ cli/ configs/ slurm/) install as the one package
`ptyinr`; its data (presets, SLURM profiles, the driver template) is found with
importlib.resources, so an installed wheel works away from the checkout.

The whole round trip (wheel -> fresh venv -> demo, import contracts) is .ci/check-wheel; here a
wheel is built without build isolation (about a second) and used unpacked."""

from __future__ import annotations

import fnmatch
import importlib.util
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from importlib import resources
from importlib.metadata import version
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ptyinr import cluster, jobscript
from ptyinr.cluster import load_profile
from ptyinr.errors import InputError

REPO = Path(__file__).resolve().parent.parent
SETUPTOOLS = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
BUNDLED = ("cpu-node", "gpu-node", "local-test")
USER_PROFILE = """\
jobqueue:
  slurm:
    cores: 3
    memory: 6GiB
    walltime: "02:00:00"
"""


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty HOME and no $PTYINR_PROFILES: only the bundled profiles exist."""
    folder = tmp_path / "home"
    folder.mkdir()
    monkeypatch.setenv("HOME", str(folder))
    monkeypatch.delenv("PTYINR_PROFILES", raising=False)
    return folder


def _source_folders() -> dict[str, Path]:
    """Every folder under the package-dir roots holding Python files, by its installed name."""
    found: dict[str, Path] = {}
    for name, folder in SETUPTOOLS["package-dir"].items():
        root = REPO / folder
        for path in [root, *sorted(p for p in root.rglob("*") if p.is_dir())]:
            if path.name == "__pycache__" or not (
                (path / "__init__.py").is_file() or any(path.glob("*.py"))
            ):
                continue
            found[".".join([name, *path.relative_to(root).parts])] = path
    return found


# --------------------------------------------------------------------------- pyproject.toml


def test_packages_list_every_source_package() -> None:
    """A new subpackage (a folder with an __init__.py) must be added to [tool.setuptools]
    packages, or the wheel silently lacks it (the editable install would still find it)."""
    folders = _source_folders()
    no_init = [
        str(p.relative_to(REPO)) for p in folders.values() if not (p / "__init__.py").is_file()
    ]
    assert not no_init, f"folders with Python files but no __init__.py: {no_init}"
    listed = set(SETUPTOOLS["packages"])
    assert not set(folders) - listed, (
        f"add to [tool.setuptools] packages in pyproject.toml: {sorted(set(folders) - listed)}"
    )
    assert not listed - set(folders), f"listed but absent: {sorted(listed - set(folders))}"
    assert "ptyinr.slurm.local" not in listed  # the test SLURM stays in the source tree


def test_package_data_patterns_match_files_and_leave_out_the_test_slurm() -> None:
    data = SETUPTOOLS["package-data"]
    folders = SETUPTOOLS["package-dir"]
    assert set(data) >= {"ptyinr.configs", "ptyinr.slurm"}
    for package, patterns in data.items():
        root = REPO / folders[package]
        for pattern in patterns:
            matched = list(root.glob(pattern))
            assert matched, f"package-data {package}: {pattern!r} matches nothing in {root}"
            assert not [p for p in matched if "local" in p.relative_to(root).parts[:1]]
    local = [str(p.relative_to(REPO / "slurm")) for p in (REPO / "slurm" / "local").iterdir()]
    patterns = data["ptyinr.slurm"]
    assert not [f for f in local if any(fnmatch.fnmatch(f, pat) for pat in patterns)]


# --------------------------------------------------------------------------- bundled files


def test_bundled_profiles_and_template_come_from_importlib_resources(home: Path) -> None:
    folder = resources.files("ptyinr.slurm") / "profiles"
    assert {f"{name}.yaml" for name in BUNDLED} <= {p.name for p in folder.iterdir()}
    assert cluster.bundled_profiles_dir() == Path(str(folder))
    assert cluster.profile_dirs()[-1] == cluster.bundled_profiles_dir()
    assert set(BUNDLED) <= set(cluster.available_profiles())
    for name in BUNDLED:
        prof = load_profile(name)
        assert prof.path == cluster.bundled_profiles_dir() / f"{name}.yaml"
        assert prof.jobqueue["cores"] >= 1
    template = (resources.files("ptyinr.slurm") / "templates" / "driver.sh.in").read_text()
    assert jobscript.TEMPLATE.read_text() == template
    assert template.rstrip().splitlines()[-1] == "exec @PYTHON@ -m ptyinr @ARGS@"
    assert not hasattr(cluster, "REPO_ROOT") and not hasattr(jobscript, "REPO_ROOT")


def test_user_profile_wins_over_the_bundled_one(home: Path) -> None:
    bundled = load_profile("gpu-node")
    user_dir = home / ".config" / "ptyinr" / "profiles"
    assert cluster.profile_dirs() == [user_dir, cluster.bundled_profiles_dir()]
    user_dir.mkdir(parents=True)
    (user_dir / "gpu-node.yaml").write_text(USER_PROFILE)
    prof = load_profile("gpu-node")
    assert prof.path == user_dir / "gpu-node.yaml" != bundled.path
    assert prof.jobqueue["cores"] == 3
    assert cluster.available_profiles()["gpu-node"] == user_dir / "gpu-node.yaml"
    assert load_profile("cpu-node").path.parent == cluster.bundled_profiles_dir()


def test_profiles_copy_puts_a_bundled_profile_where_it_wins(home: Path, tmp_path: Path) -> None:
    from ptyinr.cli.main import app

    runner = CliRunner()
    user_dir = home / ".config" / "ptyinr" / "profiles"
    result = runner.invoke(app, ["profiles", "copy", "gpu-node"])
    assert result.exit_code == 0, result.output
    copied = user_dir / "gpu-node.yaml"
    bundled = cluster.bundled_profiles_dir() / "gpu-node.yaml"
    assert copied.read_text() == bundled.read_text()
    assert "--cluster slurm:gpu-node" in result.output
    assert load_profile("gpu-node").path == copied

    again = runner.invoke(app, ["profiles", "copy", "gpu-node"])
    assert again.exit_code == 2 and "--force" in again.output
    copied.write_text(USER_PROFILE)
    forced = runner.invoke(app, ["profiles", "copy", "local-test", str(copied), "--force"])
    assert forced.exit_code == 0, forced.output
    assert copied.read_text() == (cluster.bundled_profiles_dir() / "local-test.yaml").read_text()

    result = runner.invoke(app, ["profiles", "copy", "cpu-node", str(user_dir / "mysite.yaml")])
    assert result.exit_code == 0, result.output
    assert load_profile("mysite").jobqueue == load_profile("cpu-node").jobqueue
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = runner.invoke(app, ["profiles", "copy", "cpu-node", str(elsewhere)])
    assert result.exit_code == 0, result.output
    assert (elsewhere / "cpu-node.yaml").is_file()
    assert f"--cluster slurm:{elsewhere / 'cpu-node.yaml'}" in result.output

    for args, message in [
        (["nope"], "no SLURM profile named 'nope'"),
        (["cpu-node", str(tmp_path / "notes.txt")], "expected a .yaml file"),
    ]:
        result = runner.invoke(app, ["profiles", "copy", *args])
        assert result.exit_code == 2 and message in result.output, result.output
    with pytest.raises(InputError):
        load_profile("nope")


# --------------------------------------------------------------------------- entry points


def test_python_m_ptyinr_runs_the_cli(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ptyinr", "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Usage: ptyinr" in proc.stdout
    assert "demo" in proc.stdout and "submit" in proc.stdout


def _can_build_offline() -> bool:
    """pip and a setuptools that builds wheels by itself (>= 70.1) or with `wheel`."""
    if importlib.util.find_spec("pip") is None or importlib.util.find_spec("setuptools") is None:
        return False
    major, minor = (int(x) for x in version("setuptools").split(".")[:2])
    return (major, minor) >= (70, 1) or importlib.util.find_spec("wheel") is not None


@pytest.mark.skipif(not _can_build_offline(), reason="needs pip and setuptools >= 70.1 here")
def test_wheel_holds_only_ptyinr_and_works_unpacked(tmp_path: Path) -> None:
    """Build the wheel from a copy of the sources (no build isolation: offline, ~1 s), check its
    file list, and import the unpacked wheel instead of the checkout."""
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "dist")
    for name in ("pipeline", "cli", "configs", "slurm"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(src),
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-q",
            "-w",
            str(tmp_path / "dist"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = (tmp_path / "dist").glob("ptyinr-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        zf.extractall(tmp_path / "site")
    top = {n.split("/", 1)[0] for n in names}
    assert {t for t in top if not fnmatch.fnmatch(t, "ptyinr-*.dist-info")} == {"ptyinr"}
    for name in [
        "ptyinr/__main__.py",
        "ptyinr/cli/main.py",
        "ptyinr/configs/defaults.toml",
        "ptyinr/slurm/templates/driver.sh.in",
        *(f"ptyinr/slurm/profiles/{p}.yaml" for p in BUNDLED),
    ]:
        assert name in names
    assert not [n for n in names if n.startswith("ptyinr/slurm/local/")]

    site = tmp_path / "site"
    probe = (
        "import sys; from pathlib import Path; import ptyinr;"
        "from ptyinr.cluster import find_profile; from ptyinr.jobscript import TEMPLATE;"
        "from ptyinr.config import load_config; load_config('demo', []);"
        "print(ptyinr.__file__); print(find_profile('gpu-node')); print(TEMPLATE);"
        "print(len(TEMPLATE.read_text()))"
    )
    env = {**os.environ, "PYTHONPATH": str(site), "HOME": str(tmp_path / "home")}
    env.pop("PTYINR_PROFILES", None)
    proc = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    package, profile, template, size = proc.stdout.split("\n")[:4]
    assert Path(package) == site / "ptyinr" / "__init__.py"
    assert Path(profile) == site / "ptyinr" / "slurm" / "profiles" / "gpu-node.yaml"
    assert Path(template) == site / "ptyinr" / "slurm" / "templates" / "driver.sh.in"
    assert int(size) > 0
