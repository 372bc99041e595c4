"""Driver job scripts: injection attempts in every user value fail safely.

Each hostile value must either be refused with InputError, or end up as inert data: the
script passes `bash -n`, has exactly the #SBATCH lines we wrote, and running it (with a stub
in place of python) hands the stub the exact arguments and environment and never runs the
injected command (the canary file is never created).
"""

from __future__ import annotations

import json
import os
import shlex
import stat
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ptyinr.errors import InputError
from ptyinr.jobscript import (
    DriverJob,
    driver_job,
    normalise_job_name,
    parse_env,
    render_driver_script,
    submit_driver,
)


def hostile(canary: Path) -> list[str]:
    """Values that try to run `touch CANARY` when pasted into a shell script."""
    c = shlex.quote(str(canary))
    return [
        "plain value with spaces",
        "it's quoted",
        'say "hi"',
        f"x; touch {c}",
        f"x && touch {c}",
        f"$(touch {c})",
        f"`touch {c}`",
        f"'; touch {c}; '",
        f'"; touch {c}; "',
        f"line one\ntouch {c}",
        f"line one\n#SBATCH --wrap=touch {c}",
        f"a\\'; touch {c} #",
        "${HOME} $PATH @ARGS@ %j",
        f"--x=$(touch {c})",
    ]


@pytest.fixture
def canary(tmp_path: Path) -> Path:
    return tmp_path / "canary"


@pytest.fixture
def stub(tmp_path: Path) -> Path:
    """An executable standing in for python: records its argv and the environment."""
    folder = tmp_path / "bin dir $(x) 'q'"
    folder.mkdir()
    path = folder / "python"
    path.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        "json.dump({'argv': sys.argv[1:], 'env': dict(os.environ), 'cwd': os.getcwd()},\n"
        "          open(os.environ['STUB_OUT'], 'w'))\n"
    )
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def base_job(tmp_path: Path, stub: Path) -> DriverJob:
    workdir = tmp_path / "work"
    workdir.mkdir(exist_ok=True)
    return DriverJob(
        args=("run", "a.zarr"),
        log_dir=tmp_path / "logs",
        workdir=workdir,
        python=str(stub),
    )


def sbatch_lines(script: str) -> list[str]:
    """The #SBATCH lines sbatch reads: those before the first command line."""
    lines = []
    for line in script.splitlines()[1:]:
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            if stripped.startswith("#SBATCH"):
                lines.append(stripped)
            continue
        break
    return lines


def run_script(script: str, tmp_path: Path) -> dict[str, object]:
    """bash -n, then run the script (no sbatch): what the stub python received."""
    path = tmp_path / "driver.sh"
    path.write_text(script)
    syntax = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    out = tmp_path / "stub.json"
    env = {"PATH": os.environ["PATH"], "STUB_OUT": str(out), "HOME": str(tmp_path)}
    proc = subprocess.run(["bash", str(path)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(out.read_text())


def test_plain_script_runs_the_command(tmp_path: Path, stub: Path) -> None:
    job = base_job(tmp_path, stub)
    script = render_driver_script(job)
    seen = run_script(script, tmp_path)
    assert seen["argv"] == ["-m", "ptyinr", "run", "a.zarr"]
    assert seen["cwd"] == str(job.workdir)
    env = seen["env"]
    assert isinstance(env, dict)
    assert env["PTYINR_DRIVER"] == "1" and env["PTYINR_LOG_DIR"] == str(job.log_dir)
    assert sbatch_lines(script) == [
        "#SBATCH --job-name=ptyinr-run",
        f"#SBATCH --output={tmp_path}/logs/ptyinr-run-%j.log",
        "#SBATCH --time=1-00:00:00",
        "#SBATCH --ntasks=1",
        "#SBATCH --cpus-per-task=1",
        "#SBATCH --mem=4G",
    ]


def test_hostile_arguments_env_and_paths_stay_data(
    tmp_path: Path, stub: Path, canary: Path
) -> None:
    values = hostile(canary)
    workdir = tmp_path / "work ; $(touch x) `y` 'z'"
    workdir.mkdir()
    job = replace(
        base_job(tmp_path, stub),
        args=("run", *values),
        env=tuple((f"VAR_{i}", v) for i, v in enumerate(values)),
        workdir=workdir,
        log_dir=tmp_path / "logs $(touch x) ; `y` 'q' \"d\" %j #h",
    )
    script = render_driver_script(job)
    seen = run_script(script, tmp_path)
    assert not canary.exists()
    assert seen["argv"] == ["-m", "ptyinr", "run", *values]
    env = seen["env"]
    assert isinstance(env, dict)
    for i, value in enumerate(values):
        assert env[f"VAR_{i}"] == value
    assert seen["cwd"] == str(workdir)
    assert env["PTYINR_LOG_DIR"] == str(job.log_dir)
    # No extra directive slipped in; the log path reads back as one word, '%' escaped.
    lines = sbatch_lines(script)
    assert len(lines) == 6
    (output,) = [line for line in lines if line.startswith("#SBATCH --output=")]
    (word,) = shlex.split(output.removeprefix("#SBATCH --output="))
    assert word == str(job.log_dir).replace("%", "%%") + "/ptyinr-run-%j.log"


@pytest.mark.parametrize(
    "field", ["job_name", "time", "memory", "partition", "account", "directive", "log_dir"]
)
def test_hostile_sbatch_values_are_refused(
    tmp_path: Path, stub: Path, canary: Path, field: str
) -> None:
    """Values that land in #SBATCH lines: only strict patterns pass; no hostile one does."""
    job = base_job(tmp_path, stub)
    for value in hostile(canary):
        if field == "directive":
            bad = replace(job, directives=(value,))
        elif field == "log_dir":
            if "\n" not in value and "\\" not in value:
                continue  # quoted and tested above; only control chars/backslash are refused
            bad = replace(job, log_dir=tmp_path / value)
        else:
            bad = replace(job, **{field: value})
        with pytest.raises(InputError):
            render_driver_script(bad)
    assert not canary.exists()


def test_directives_and_env_names(tmp_path: Path, stub: Path) -> None:
    job = replace(
        base_job(tmp_path, stub),
        directives=("--constraint=a100|h100", "--exclusive", "--gres=gpu:a100:1"),
        partition="cpu,short",
        account="proj_42",
    )
    lines = sbatch_lines(render_driver_script(job))
    assert lines[-5:] == [
        "#SBATCH --partition=cpu,short",
        "#SBATCH --account=proj_42",
        "#SBATCH --constraint=a100|h100",
        "#SBATCH --exclusive",
        "#SBATCH --gres=gpu:a100:1",
    ]
    for bad in ["-p gpu", "--qos=long extra", "--mail-user=a@b;rm", "--x='y'", "--", "qos=long"]:
        with pytest.raises(InputError, match="directive"):
            render_driver_script(replace(job, directives=(bad,)))
    for name in ["1ABC", "A-B", "A B", "A;B", "$(x)", ""]:
        with pytest.raises(InputError, match="environment variable name"):
            render_driver_script(replace(job, env=((name, "v"),)))
    assert parse_env(["A=1", "B=x=y", "C="]) == (("A", "1"), ("B", "x=y"), ("C", ""))
    for item in ["A", "=1", "A B=1", "$(x)=1"]:
        with pytest.raises(InputError, match="--env"):
            parse_env([item])


def test_other_checks(tmp_path: Path, stub: Path) -> None:
    job = base_job(tmp_path, stub)
    with pytest.raises(InputError, match="cpus"):
        render_driver_script(replace(job, cpus=0))
    with pytest.raises(InputError, match="absolute"):
        render_driver_script(replace(job, workdir=Path("relative")))
    with pytest.raises(InputError, match="no ptyinr command"):
        render_driver_script(replace(job, args=()))
    with pytest.raises(InputError, match="NUL"):
        render_driver_script(replace(job, args=("a\0b",)))
    assert normalise_job_name(None, "scan") == "ptyinr-scan"
    assert normalise_job_name("night", "run") == "ptyinr-night"
    assert normalise_job_name("ptyinr-x", "run") == "ptyinr-x"


def test_driver_job_from_profile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "profiles"
    folder.mkdir()
    (folder / "site.yaml").write_text(
        "jobqueue:\n  slurm:\n    cores: 4\n    memory: 8GiB\n    account: proj1\n"
        "    python: /opt/env/bin/python\n"
        "    job_script_prologue: ['module load cuda', 'source /opt/env/bin/activate']\n"
        "ptyinr:\n  driver: {partition: cpu, cpus: 2, memory: 6G, time: '02:00:00'}\n"
    )
    monkeypatch.setenv("PTYINR_PROFILES", str(folder))
    job = driver_job("scan", ["s*.zarr", "--grid", "a=1,2"], "site", log_dir=tmp_path / "l")
    assert job.args == ("scan", "s*.zarr", "--grid", "a=1,2", "--cluster", "slurm:site")
    assert (job.partition, job.cpus, job.memory, job.time) == ("cpu", 2, "6G", "02:00:00")
    assert job.account == "proj1" and job.python == "/opt/env/bin/python"
    script = render_driver_script(job)
    assert "module load cuda\nsource /opt/env/bin/activate\n" in script
    assert script.index("module load cuda") > script.index("#SBATCH --account=proj1")
    explicit = driver_job(
        "run", ["a", "--cluster", "tls://h:1"], "site", log_dir=tmp_path, time="5"
    )
    assert explicit.args == ("run", "a", "--cluster", "tls://h:1") and explicit.time == "5"
    with pytest.raises(InputError, match="submit 'rm'"):
        driver_job("rm", [], "site", log_dir=tmp_path)


def test_cli_dry_run_prints_a_valid_script(tmp_path: Path, canary: Path) -> None:
    from ptyinr.cli.main import app

    hostile_path = f"scan $(touch {canary}).zarr"
    result = CliRunner().invoke(
        app,
        [
            "submit",
            "run",
            hostile_path,
            "--set",
            "train.epochs=3",
            "--profile",
            "local-test",
            "--dry-run",
            "--env",
            f"NOTE=`touch {canary}`",
            "--log-dir",
            str(tmp_path / "logs"),
            "--",
            "--force",
        ],
    )
    assert result.exit_code == 0, result.output
    script = result.stdout
    assert script.startswith("#!/usr/bin/env bash\n")
    path = tmp_path / "dry.sh"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    last = script.strip().splitlines()[-1]
    words = shlex.split(last)
    assert words[words.index("-m") + 1 :] == [
        "ptyinr",
        "run",
        hostile_path,
        "--set",
        "train.epochs=3",
        "--force",
        "--cluster",
        "slurm:local-test",
    ]
    assert not (tmp_path / "logs").exists()  # a dry run writes nothing
    assert not canary.exists()


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--job-name", "x;touch y", "job name"),
        ("--time", "$(reboot)", "time"),
        ("--sbatch", "--qos=a\n#SBATCH --x", "directive"),
        ("--env", "BAD NAME=1", "--env"),
        ("--mem", "4G; id", "memory"),
    ],
)
def test_cli_refuses_bad_values_with_exit_2(
    tmp_path: Path, option: str, value: str, message: str
) -> None:
    from ptyinr.cli.main import app

    result = CliRunner().invoke(
        app, ["submit", "run", "a.zarr", "--profile", "local-test", "--dry-run", option, value]
    )
    assert result.exit_code == 2
    assert message in result.output
    assert "#!/usr/bin/env bash" not in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["a.zarr", "--insecure"], "--insecure is refused"),
        (["a.zarr", "--cluster", "tcp://h:1"], "only secure clusters"),
        (["a.zarr", "--cluster=ws://h:1"], "only secure clusters"),
    ],
)
def test_driver_job_refuses_insecure_clusters(
    tmp_path: Path, args: list[str], message: str
) -> None:
    with pytest.raises(InputError, match=message):
        driver_job("run", args, "local-test", log_dir=tmp_path)
    from ptyinr.cli.main import app

    result = CliRunner().invoke(
        app, ["submit", "run", "--profile", "local-test", "--dry-run", "--", *args]
    )
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "#!/usr/bin/env bash" not in result.output


def test_submitted_script_is_private(
    tmp_path: Path, stub: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The driver script is written mode 0600 (--env values may be private); a stand-in
    sbatch accepts it."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    for tool in ("sbatch",):
        fake = bin_dir / tool
        fake.write_text("#!/bin/sh\necho 4242\n")
        fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    job = replace(base_job(tmp_path, stub), env=(("TOKEN", "secret"),))
    job_id, path, _ = submit_driver(job)
    assert job_id == "4242"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == render_driver_script(job)
