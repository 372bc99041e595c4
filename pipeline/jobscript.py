"""The driver job script of ``ptyinr submit``: validated, shell-quoted, rendered from a template.

A driver job is a small CPU allocation that runs the Dask scheduler and the client (``ptyinr
run|scan ... --cluster slurm:PROFILE``); the client then submits the GPU worker jobs through the
profile. The user can log out while it runs.

Every user-provided value that reaches the script is checked here, because a job script is
shell code: values that land in ``#SBATCH`` lines (job name, time, memory, partition, log
folder, extra directives) must match strict patterns and may not hold control characters (a
newline there would start a new shell line); values that land in shell lines (ptyinr arguments,
paths, environment) are quoted with `shlex.quote`, so spaces, quotes, ``;``, ``$()``, backticks
and newlines stay data. The profile's ``job_script_prologue`` is shell code by design (module
loads, environment activation) and is copied as written, exactly as dask-jobqueue does for the
worker jobs.

The driver's cluster is secure like every ``slurm:PROFILE`` cluster (TLS between scheduler and
workers with per-cluster temporary credentials, dashboard on the node's 127.0.0.1): a driver
job may not be given ``--insecure`` or a plain ``tcp://`` scheduler address. The script itself
holds no credentials; it is written readable by its owner only (mode 0600), as ``--env``
values may be private.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

from ptyinr.cluster import (
    is_secure_address,
    load_profile,
    parse_cluster_spec,
    parse_slurm_time,
    require_slurm_client,
)
from ptyinr.errors import InputError

#: The driver job template, package data of ``ptyinr.slurm`` (slurm/templates/ in the source).
TEMPLATE: Traversable = resources.files("ptyinr.slurm") / "templates" / "driver.sh.in"
ACTIONS = ("run", "scan")

_JOB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_MEMORY = re.compile(r"^[1-9][0-9]*[KMGT]?$")
_PARTITION = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.,-]{0,127}$")
_DIRECTIVE = re.compile(r"^--[A-Za-z][A-Za-z0-9-]*(=[A-Za-z0-9_.,:/=+@%&|\[\]-]+)?$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TOKEN = re.compile(r"@([A-Z_]+)@")


@dataclass(frozen=True)
class DriverJob:
    """Everything that goes into one driver script; `render_driver_script` validates it."""

    args: tuple[str, ...]  # the ptyinr argument list, e.g. ("run", "a.zarr", "--cluster", ...)
    log_dir: Path
    workdir: Path
    job_name: str = "ptyinr-run"
    time: str = "1-00:00:00"
    cpus: int = 1
    memory: str = "4G"
    partition: str | None = None
    account: str | None = None
    directives: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    prologue: tuple[str, ...] = field(default=(), repr=False)
    python: str = sys.executable

    @property
    def log_pattern(self) -> str:
        """The ``--output`` pattern (``%j`` = job id); '%' of the folder itself is escaped."""
        return str(self.log_dir).replace("%", "%%") + f"/{self.job_name}-%j.log"

    def log_path(self, job_id: str) -> Path:
        """Where the driver's log of job JOB_ID is written."""
        return self.log_dir / f"{self.job_name}-{job_id}.log"


def _no_control(value: str, what: str) -> None:
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise InputError(f"{what} {value!r} contains a control character (newline, tab, ...)")


def _no_nul(value: str, what: str) -> None:
    if "\0" in value:
        raise InputError(f"{what} {value!r} contains a NUL character")


def validate_driver_job(job: DriverJob) -> None:
    """InputError naming the first value that may not go into a job script."""
    if not _JOB_NAME.match(job.job_name):
        raise InputError(f"job name {job.job_name!r}: expected 1-64 letters, digits, '.', '_', '-'")
    try:
        parse_slurm_time(job.time)
    except InputError:
        raise InputError(
            f"time {job.time!r}: expected a SLURM time like '04:00:00' or '1-00:00:00'"
        ) from None
    if isinstance(job.cpus, bool) or not isinstance(job.cpus, int) or not 1 <= job.cpus <= 4096:
        raise InputError(f"cpus {job.cpus!r}: expected an integer from 1 to 4096")
    if not _MEMORY.match(job.memory):
        raise InputError(f"memory {job.memory!r}: expected a SLURM size like 4G or 500M")
    for what, value in (("partition", job.partition), ("account", job.account)):
        if value is not None and not _PARTITION.match(value):
            raise InputError(f"{what} {value!r}: expected letters, digits, '_', '.', ',', '-'")
    for directive in job.directives:
        if not _DIRECTIVE.match(directive):
            raise InputError(
                f"sbatch directive {directive!r} refused: expected one option like "
                "--constraint=a100 or --exclusive (letters, digits and _.,:/=+@%&|[]- only)"
            )
    for name, value in job.env:
        if not _ENV_NAME.match(name):
            raise InputError(f"environment variable name {name!r}: expected [A-Za-z_][A-Za-z0-9_]*")
        _no_nul(value, f"value of environment variable {name}")
    for what, path in (("log folder", job.log_dir), ("working directory", job.workdir)):
        if not path.is_absolute():
            raise InputError(f"{what} {path}: expected an absolute path")
    _no_control(str(job.log_dir), "log folder")  # it goes into an #SBATCH line
    if "\\" in str(job.log_dir):  # sbatch's own #SBATCH parser treats '\' as an escape
        raise InputError(f"log folder {job.log_dir}: a backslash is not supported")
    _no_nul(str(job.workdir), "working directory")
    _no_nul(job.python, "python")
    if not job.args:
        raise InputError("no ptyinr command to run in the driver job")
    for arg in job.args:
        _no_nul(arg, "argument")
    for line in job.prologue:
        if "\n" in line or "\r" in line:
            raise InputError(f"profile prologue line {line!r} holds a newline")


def render_driver_script(job: DriverJob, template: Path | Traversable | None = None) -> str:
    """The driver script for JOB, from TEMPLATE (ptyinr.slurm's templates/driver.sh.in) or
    the given template file."""
    validate_driver_job(job)
    directives = []
    if job.partition:
        directives.append(f"--partition={job.partition}")
    if job.account:
        directives.append(f"--account={job.account}")
    directives += list(job.directives)
    values = {
        "JOB_NAME": job.job_name,
        "LOG_FILE": shlex.quote(job.log_pattern),
        "TIME": job.time,
        "CPUS": str(job.cpus),
        "MEMORY": job.memory,
        "DIRECTIVES": "\n".join(f"#SBATCH {d}" for d in directives),
        "PROLOGUE": "\n".join(job.prologue) if job.prologue else "# (none)",
        "ENV": "\n".join(f"export {k}={shlex.quote(v)}" for k, v in job.env) or "# (none)",
        "LOG_DIR": shlex.quote(str(job.log_dir)),
        "WORKDIR": shlex.quote(str(job.workdir)),
        "PYTHON": shlex.quote(job.python),
        "ARGS": " ".join(shlex.quote(a) for a in job.args),
    }
    text = (template or TEMPLATE).read_text(encoding="utf-8")

    def substitute(match: re.Match[str]) -> str:
        key = match.group(1)
        if key not in values:
            raise InputError(f"template {template or TEMPLATE}: unknown placeholder @{key}@")
        return values[key]

    # One pass: a value that happens to contain '@ARGS@' is data, never a placeholder.
    return _TOKEN.sub(substitute, text)


def parse_env(items: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """``KEY=VALUE`` strings (from --env) as pairs; InputError for a malformed one."""
    pairs = []
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not _ENV_NAME.match(name):
            raise InputError(f"--env {item!r}: expected NAME=VALUE with NAME like MY_VAR")
        pairs.append((name, value))
    return tuple(pairs)


def normalise_job_name(name: str | None, action: str) -> str:
    """Driver job names start with 'ptyinr' so `ptyinr status` finds them."""
    if not name:
        return f"ptyinr-{action}"
    return name if name.startswith("ptyinr") else f"ptyinr-{name}"


def driver_job(
    action: str,
    args: Sequence[str],
    profile: str,
    *,
    log_dir: Path,
    workdir: Path | None = None,
    job_name: str | None = None,
    time: str | None = None,
    cpus: int | None = None,
    memory: str | None = None,
    partition: str | None = None,
    directives: Sequence[str] = (),
    env: Mapping[str, str] | Sequence[tuple[str, str]] = (),
) -> DriverJob:
    """A driver job for ``ptyinr ACTION ARGS --cluster slurm:PROFILE``; the profile supplies
    the prologue, account, python and the driver's defaults (``ptyinr: driver:``)."""
    if action not in ACTIONS:
        raise InputError(f"submit {action!r}: expected one of {', '.join(ACTIONS)}")
    check_secure_args(args)
    prof = load_profile(profile)
    defaults = prof.options.get("driver") or {}
    full_args = [action, *args]
    if not any(a == "--cluster" or a.startswith("--cluster=") for a in args):
        full_args += ["--cluster", f"slurm:{profile}"]
    pairs = tuple(env.items()) if isinstance(env, Mapping) else tuple(env)
    return DriverJob(
        args=tuple(full_args),
        log_dir=Path(log_dir).expanduser().absolute(),
        workdir=Path(workdir or Path.cwd()).expanduser().absolute(),
        job_name=normalise_job_name(job_name, action),
        time=time or str(defaults.get("time") or "1-00:00:00"),
        cpus=cpus or int(defaults.get("cpus") or 1),
        memory=memory or str(defaults.get("memory") or "4G"),
        partition=partition or defaults.get("partition"),
        account=prof.jobqueue.get("account"),
        directives=tuple(directives),
        env=pairs,
        prologue=tuple(prof.jobqueue.get("job_script_prologue") or ()),
        python=prof.jobqueue.get("python") or sys.executable,
    )


def check_secure_args(args: Sequence[str]) -> None:
    """InputError for driver arguments that would run an insecure cluster: ``--insecure`` or
    a plain (tcp://) scheduler address."""
    for i, arg in enumerate(args):
        if arg == "--insecure" or arg.startswith("--insecure="):
            raise InputError(
                "--insecure is refused in a driver job: its cluster talks TLS (slurm:PROFILE "
                "or a tls:// address)"
            )
        value = None
        if arg == "--cluster" and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith("--cluster="):
            value = arg.split("=", 1)[1]
        if value is None:
            continue
        try:
            spec = parse_cluster_spec(value)
        except InputError:
            continue  # the driver's ptyinr reports it, as for any other bad argument
        if spec.kind == "address" and not is_secure_address(spec.address or ""):
            raise InputError(
                f"--cluster {value}: a driver job runs only secure clusters; use "
                "slurm:PROFILE (TLS with temporary credentials) or a tls:// address"
            )


def submit_driver(job: DriverJob, script: str | None = None) -> tuple[str, Path, Path]:
    """Write the script into the log folder and sbatch it: (job id, script path, log path)."""
    script = script if script is not None else render_driver_script(job)
    require_slurm_client(("sbatch",))
    job.log_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    path = job.log_dir / f"{job.job_name}-{stamp}.sh"
    # Owner-only (0600) from the start: --env values may be private.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(script)
    proc = subprocess.run(
        ["sbatch", "--parsable", str(path)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        reason = (proc.stderr or proc.stdout).strip().splitlines()
        raise InputError(f"sbatch refused {path}: {reason[-1] if reason else proc.returncode}")
    job_id = proc.stdout.strip().split(";")[0]
    if not job_id.isdigit():
        raise InputError(f"sbatch {path}: unexpected output {proc.stdout.strip()!r}")
    return job_id, path, job.log_path(job_id)


__all__ = [
    "ACTIONS",
    "TEMPLATE",
    "DriverJob",
    "check_secure_args",
    "driver_job",
    "normalise_job_name",
    "parse_env",
    "render_driver_script",
    "submit_driver",
    "validate_driver_job",
]
