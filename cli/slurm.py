"""SLURM commands: profiles, submit run|scan, status, cancel.

`ptyinr submit` writes a driver job script (scheduler + client in a small CPU allocation,
GPU workers as further jobs through a dask-jobqueue profile) and sbatches it, so the user can
log out; `status` and `cancel` work on the jobs it created (their names start with 'ptyinr').
"""

from __future__ import annotations

import getpass
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ptyinr.cli.common import JsonOption, fail, print_json
from ptyinr.errors import InputError

_JOB_ID = re.compile(r"^[0-9]+(_[0-9]+)?$")
_console = Console()
_err = Console(stderr=True)


_fail = fail


# --------------------------------------------------------------------------- profiles

profiles_app = typer.Typer(
    help=(
        "SLURM profiles (dask-jobqueue YAML): list them, show the job script of one, or copy "
        "one (e.g. a bundled one) to edit it for your site."
    ),
    invoke_without_command=True,
    no_args_is_help=False,
)


@profiles_app.callback()
def profiles(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """List the profiles usable with --cluster slurm:NAME and where each comes from."""
    if ctx.invoked_subcommand is not None:
        return
    from ptyinr.cluster import available_profiles, load_profile, profile_dirs

    rows: list[dict[str, Any]] = []
    for name, path in available_profiles().items():
        try:
            prof = load_profile(str(path))
        except InputError as exc:
            rows.append({"profile": name, "file": str(path), "error": str(exc)})
            continue
        jq, opt = prof.jobqueue, prof.options
        rows.append(
            {
                "profile": name,
                "cores": jq.get("cores"),
                "memory": jq.get("memory"),
                "walltime": jq.get("walltime"),
                "gpus": prof.has_gpus,
                "minimum_jobs": opt["minimum_jobs"],
                "maximum_jobs": opt["maximum_jobs"],
                "file": str(path),
                "error": None,
            }
        )
    if as_json:
        print_json({"profiles": rows, "searched": [str(d) for d in profile_dirs()]})
        return
    table = Table("profile", "cores", "memory", "walltime", "GPU", "jobs", "file")
    for row in rows:
        if row["error"]:
            table.add_row(
                row["profile"], "", "", "", "", "", f"[red]invalid: {escape(row['error'])}[/red]"
            )
            continue
        table.add_row(
            row["profile"],
            str(row["cores"]),
            str(row["memory"]),
            str(row["walltime"] or ""),
            "yes" if row["gpus"] else "no",
            f"{row['minimum_jobs']}-{row['maximum_jobs']}",
            row["file"],
        )
    _console.print(table)
    _console.print(
        "searched: " + ", ".join(str(d) for d in profile_dirs()), highlight=False, soft_wrap=True
    )


@profiles_app.command("show")
def profiles_show(name: str = typer.Argument(..., help="profile name or path to a .yaml")) -> None:
    """Print the worker job script that dask-jobqueue generates for profile NAME."""
    from ptyinr.cluster import profile_job_script

    try:
        script = profile_job_script(name)
    except InputError as exc:
        raise _fail(exc) from None
    typer.echo(script)


@profiles_app.command("copy")
def profiles_copy(
    name: str = typer.Argument(..., help="profile to copy (see `ptyinr profiles`)"),
    dest: Path | None = typer.Argument(
        None, help="a .yaml file or a folder; default: your profile folder"
    ),
    force: bool = typer.Option(False, "--force", help="replace an existing file"),
) -> None:
    """Copy profile NAME to DEST (default ~/.config/ptyinr/profiles/NAME.yaml) to edit it."""
    from ptyinr.cluster import PROFILE_SUFFIXES, find_profile, profile_dirs, user_profiles_dir

    try:
        source = find_profile(name)
        if dest is None:
            target = user_profiles_dir() / f"{source.stem}.yaml"
        elif dest.expanduser().is_dir():
            target = dest.expanduser() / source.name
        elif dest.suffix in PROFILE_SUFFIXES:
            target = dest.expanduser()
        else:
            raise InputError(f"copy to {dest}: expected a .yaml file or an existing folder")
        if target.exists() and not force:
            raise InputError(f"{target} already exists; pass --force to replace it")
        if target.exists() and target.resolve() == source.resolve():
            raise InputError(
                f"{target} is profile {name!r} itself; remove it to copy the one it hides"
            )
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
        except OSError as exc:
            raise InputError(f"copy {source} -> {target}: {exc.strerror or exc}") from None
    except InputError as exc:
        raise _fail(exc) from None
    searched = target.parent.resolve() in {d.resolve() for d in profile_dirs()}
    use = target.stem if searched else str(target)
    _console.print(f"copied {source} -> {target}", highlight=False, soft_wrap=True)
    _console.print(f"edit it, then use --cluster slurm:{use}", highlight=False, soft_wrap=True)


# --------------------------------------------------------------------------- submit

submit_app = typer.Typer(
    help=(
        "Submit `ptyinr run|scan ...` as a SLURM driver job (scheduler + client on a small CPU "
        "allocation; the GPU workers are further jobs from the profile). Arguments after "
        "run/scan (or after `--`) are passed to that command."
    ),
    no_args_is_help=True,
)
_PASSTHROUGH = {"allow_extra_args": True, "ignore_unknown_options": True}


def _submit(
    action: str,
    args: list[str],
    profile: str,
    dry_run: bool,
    job_name: str | None,
    log_dir: Path,
    time: str | None,
    cpus: int | None,
    mem: str | None,
    partition: str | None,
    sbatch: list[str],
    env: list[str],
    workdir: Path | None,
) -> None:
    from ptyinr.jobscript import driver_job, parse_env, render_driver_script, submit_driver

    try:
        job = driver_job(
            action,
            args,
            profile,
            log_dir=log_dir,
            workdir=workdir,
            job_name=job_name,
            time=time,
            cpus=cpus,
            memory=mem,
            partition=partition,
            directives=sbatch,
            env=parse_env(env),
        )
        script = render_driver_script(job)
        if dry_run:
            typer.echo(script, nl=False)
            return
        job_id, script_path, log_path = submit_driver(job, script)
    except InputError as exc:
        raise _fail(exc) from None
    _console.print(f"submitted driver job [bold]{job_id}[/bold] ({job.job_name})", highlight=False)
    _console.print(f"script: {script_path}", highlight=False, soft_wrap=True)
    _console.print(f"log:    {log_path}", highlight=False, soft_wrap=True)
    _console.print(f"follow with: ptyinr status; stop with: ptyinr cancel {job_id}")


def _make_submit(action: str) -> Any:
    def command(
        ctx: typer.Context,
        args: list[str] = typer.Argument(None, help=f"arguments of `ptyinr {action}`"),
        profile: str = typer.Option(
            os.environ.get("PTYINR_PROFILE", "gpu-node"),
            "--profile",
            "-p",
            help="SLURM profile of the workers (ptyinr profiles); default $PTYINR_PROFILE",
        ),
        dry_run: bool = typer.Option(False, "--dry-run", help="print the script, submit nothing"),
        job_name: str | None = typer.Option(None, "--job-name", help=f"default ptyinr-{action}"),
        log_dir: Path = typer.Option(
            Path("ptyinr-logs"), "--log-dir", help="driver log, script and worker logs"
        ),
        time: str | None = typer.Option(None, "--time", help="driver walltime, e.g. 1-00:00:00"),
        cpus: int | None = typer.Option(None, "--cpus", help="driver CPUs (profile default)"),
        mem: str | None = typer.Option(None, "--mem", help="driver memory, e.g. 8G"),
        partition: str | None = typer.Option(None, "--partition", help="driver partition"),
        sbatch: list[str] = typer.Option(
            [], "--sbatch", help="extra #SBATCH directive, e.g. --sbatch=--qos=long (repeat)"
        ),
        env: list[str] = typer.Option([], "--env", help="NAME=VALUE for the driver (repeat)"),
        workdir: Path | None = typer.Option(None, "--workdir", help="default: this directory"),
    ) -> None:
        _submit(
            action,
            [*(args or []), *ctx.args],
            profile,
            dry_run,
            job_name,
            log_dir,
            time,
            cpus,
            mem,
            partition,
            sbatch,
            env,
            workdir,
        )

    command.__doc__ = f"Submit `ptyinr {action} ARGS...` as a SLURM driver job."
    return command


for _action in ("run", "scan"):
    submit_app.command(_action, context_settings=_PASSTHROUGH)(_make_submit(_action))


# --------------------------------------------------------------------------- status / cancel


def _squeue(user: str) -> list[dict[str, str]]:
    fields = ["id", "name", "state", "time", "limit", "reason", "comment"]
    proc = subprocess.run(
        ["squeue", "-h", "-u", user, "-o", "%i\t%j\t%T\t%M\t%l\t%R\t%k"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines() or [f"exit {proc.returncode}"]
        raise InputError(f"squeue failed (is SLURM_CONF right, the controller up?): {lines[-1]}")
    rows = [dict(zip(fields, line.split("\t"), strict=False)) for line in proc.stdout.splitlines()]
    # ptyinr's jobs: drivers (named ptyinr-*), and workers (named by their profile, tagged
    # with their driver's id when a driver started them).
    return [
        r
        for r in rows
        if r.get("name", "").startswith("ptyinr")
        or r.get("comment", "").startswith("ptyinr-driver-")
    ]


def _list_runs_hook() -> Any:
    """`ptyinr.store.list_runs(store) -> list[dict]`, or None where it is not available."""
    try:
        from ptyinr.store import list_runs
    except ImportError:
        return None
    return list_runs


def _runs_of(store: Path) -> list[dict[str, Any]] | None:
    """The runs recorded in `store` (None where the store API is not available)."""
    list_runs = _list_runs_hook()
    if list_runs is None:
        return None
    return [run if isinstance(run, dict) else {"run_id": str(run)} for run in list_runs(store)]


def status(
    stores: list[Path] = typer.Argument(None, help="scan stores whose runs to list as well"),
    as_json: JsonOption = False,
) -> None:
    """Show your ptyinr SLURM jobs (drivers and workers) and the runs in the given stores.

    With --json: {"jobs": [...] or null without SLURM, "stores": {STORE: \\[runs]}}."""
    document: dict[str, Any] = {"jobs": None, "stores": {}}
    if shutil.which("squeue") is None:
        _err.print("squeue not found on PATH: no SLURM jobs to show", highlight=False)
    else:
        try:
            rows = _squeue(getpass.getuser())
        except (InputError, subprocess.TimeoutExpired) as exc:
            raise _fail(InputError(str(exc))) from None
        for r in rows:
            driver = r.get("comment", "").removeprefix("ptyinr-driver-")
            r["driver"] = driver if driver.isdigit() else None
        document["jobs"] = rows
    for store in stores or []:
        try:
            document["stores"][str(store)] = _runs_of(store)
        except InputError as exc:
            raise _fail(exc) from None
    if as_json:
        print_json(document)
        return
    if document["jobs"] is not None:
        rows = document["jobs"]
        table = Table("job", "name", "state", "time", "limit", "reason/node", "driver")
        for r in rows:
            table.add_row(
                r["id"],
                r["name"],
                r["state"],
                r["time"],
                r["limit"],
                r["reason"],
                r["driver"] or "",
            )
        _console.print(table if rows else "no ptyinr jobs in the queue")
    for store, runs in document["stores"].items():
        if runs is None:
            _err.print(
                "run states need ptyinr.store.list_runs, not in this version", highlight=False
            )
            return
        table = Table("run", "status", "created", "resolution", title=store)
        for run in runs:
            resolution = next(
                (run[k] for k in ("resolution_m", "resolution_px", "resolution") if k in run), ""
            )
            table.add_row(
                str(run.get("run_id", "?")),
                str(run.get("status", "unknown")),
                str(run.get("created") or ""),
                str(resolution),
            )
        _console.print(table if runs else f"{store}: no runs", highlight=False)


def cancel(job_ids: list[str] = typer.Argument(..., help="driver (or worker) job ids")) -> None:
    """Cancel ptyinr jobs; cancelling a driver also cancels the worker jobs it started."""
    try:
        for job_id in job_ids:
            if not _JOB_ID.match(job_id):
                raise InputError(f"job id {job_id!r}: expected digits like 12345")
        from ptyinr.cluster import require_slurm_client

        require_slurm_client(("scancel", "squeue"))
        rows = _squeue(getpass.getuser())
    except InputError as exc:
        raise _fail(exc) from None
    workers = [
        r["id"] for r in rows if r.get("comment", "").removeprefix("ptyinr-driver-") in job_ids
    ]
    targets = list(dict.fromkeys([*job_ids, *workers]))
    proc = subprocess.run(["scancel", *targets], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"]
        raise _fail(InputError(f"scancel {' '.join(targets)}: {lines[-1]}"))
    extra = f" and {len(workers)} worker job(s) ({', '.join(workers)})" if workers else ""
    _console.print(f"cancelled {', '.join(job_ids)}{extra}", highlight=False)


def register(app: typer.Typer) -> None:
    """Attach profiles, submit, status and cancel to the `ptyinr` application."""
    app.add_typer(profiles_app, name="profiles")
    app.add_typer(submit_app, name="submit")
    app.command("status")(status)
    app.command("cancel")(cancel)
