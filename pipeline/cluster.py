"""Where the Dask graph runs: a local cluster, a SLURM cluster from a profile, or an existing one.

`connect(spec)` is the one entry point: a context manager that yields a connected
`distributed.Client` and tears everything down afterwards. The spec is

- ``"local"``: a `LocalCluster` sized to this machine; one worker per GPU (worker resource
  ``GPU=1``, each worker sees only its GPU) when torch sees GPUs, else CPU workers;
- ``"slurm:PROFILE"``: a `dask_jobqueue.SLURMCluster` built from a profile (dask-jobqueue's
  YAML format, ``jobqueue: slurm: ...``, plus an optional ``ptyinr:`` section), scaling
  adaptively between ``minimum_jobs`` and ``maximum_jobs``; workers retire (``--lifetime``,
  staggered) before the walltime so SLURM never kills one in the middle of a task;
- a scheduler address (``tls://host:8786``): attach to a cluster someone else started, with
  the TLS credentials of Dask's own configuration (``distributed.comm.tls.*``, e.g.
  ``DASK_DISTRIBUTED__COMM__TLS__CA_FILE``); a plain ``tcp://`` address is refused unless the
  caller passes ``insecure=True`` (``--insecure``).

Security: the scheduler and workers of a SLURM cluster talk TLS (mutual: a peer without the
cluster's certificate cannot connect), with per-cluster temporary credentials or the
cert/key files named in the profile (``ptyinr: security:``). The scheduler binds the profile's
``interface`` (else ``ptyinr: scheduler_host``, else the one address Dask advertises to
workers), never all interfaces unless the profile says ``scheduler_host: 0.0.0.0``. Dashboards
bind 127.0.0.1 unless a profile (``ptyinr: dashboard_address``) or caller names a host; the
SSH-tunnel command is printed next to the dashboard link. A local cluster binds loopback only.

Tasks ask for ``task_resources(client)`` (``{"GPU": 1}`` when the workers have GPUs), and a
run records ``slurm_job_ids(client)`` / ``current_slurm_job_id()`` in its attrs.

Profiles are found, in order, in ``$PTYINR_PROFILES`` (one or more directories, separated by
``os.pathsep``), ``~/.config/ptyinr/profiles`` and the profiles bundled with the package
(``ptyinr.slurm``'s ``profiles/``, found with `importlib.resources`); a user profile with the
name of a bundled one wins. A path to a ``.yaml`` file also works.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import sys
import threading
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import dask
import yaml
from dask.utils import parse_bytes, parse_timedelta
from distributed.diagnostics.plugin import WorkerPlugin

from ptyinr.errors import ConfigError, InputError

PROFILE_SUFFIXES = (".yaml", ".yml")
_PROFILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_ADDRESS = re.compile(r"^(tcp|tls|ws|wss|ucx|inproc)://\S+$")
_SLURM_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")
_SLURM_CLIENT_TOOLS = ("sbatch", "squeue", "scancel")

# Options of the ``ptyinr:`` section of a profile, with their defaults.
_PTYINR_DEFAULTS: dict[str, Any] = {
    "minimum_jobs": 0,
    "maximum_jobs": 4,
    "lifetime_margin": None,  # time before the walltime by which every worker has retired
    # torch CPU threads per task; None = 1, as a job's cores are already shared out among
    # its dask threads (cores = processes x threads)
    "torch_threads": None,
    "driver": {},  # defaults for `ptyinr submit`: partition, cpus, memory, time
    # Network and TLS (see the module docstring): the scheduler's listening address (null =
    # jobqueue.slurm.interface, else the address Dask advertises; "0.0.0.0" = all interfaces),
    # the dashboard's ("127.0.0.1:8787" when null; a bare ":PORT" also means 127.0.0.1), and
    # TLS files {ca_file, cert, key} (null = per-cluster temporary credentials).
    "scheduler_host": None,
    "dashboard_address": None,
    "security": None,
}
_DRIVER_KEYS = {"partition", "cpus", "memory", "time"}
_SECURITY_KEYS = {"ca_file", "cert", "key"}
_SECURE_SCHEMES = ("tls", "wss")  # schemes whose connections are encrypted and authenticated
DEFAULT_DASHBOARD = "127.0.0.1:8787"
_LOOPBACK = "127.0.0.1"
_SHELL_SAFE_PATH = re.compile(r"^[A-Za-z0-9_./+@-]+$")
# Keyword arguments of SLURMCluster that a profile may not set (they are ours to choose).
_RESERVED_KEYS = {"n_workers", "scheduler_options", "log_directory", "config_name"}


# --------------------------------------------------------------------------- cluster specs


@dataclass(frozen=True)
class ClusterSpec:
    """A parsed ``--cluster`` value: kind is ``local``, ``slurm`` or ``address``."""

    kind: str
    profile: str | None = None
    address: str | None = None


def parse_cluster_spec(spec: str) -> ClusterSpec:
    """Parse ``local``, ``slurm:PROFILE`` or a scheduler address; InputError otherwise."""
    text = (spec or "").strip()
    if text == "local":
        return ClusterSpec("local")
    if text.startswith("slurm:"):
        profile = text.removeprefix("slurm:").strip()
        if not profile:
            raise InputError(f"cluster spec {spec!r}: expected slurm:PROFILE with a profile name")
        return ClusterSpec("slurm", profile=profile)
    if _ADDRESS.match(text):
        return ClusterSpec("address", address=text)
    raise InputError(
        f"unknown cluster spec {spec!r}: expected 'local', 'slurm:PROFILE' "
        "or a scheduler address like tcp://host:8786"
    )


# --------------------------------------------------------------------------- profiles


@dataclass(frozen=True)
class Profile:
    """A validated SLURM profile: SLURMCluster keyword arguments plus ptyinr's own options."""

    name: str
    path: Path
    jobqueue: dict[str, Any]
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def walltime_s(self) -> float:
        """Worker job walltime in seconds."""
        return parse_slurm_time(str(self.jobqueue.get("walltime") or _default("walltime")))

    @property
    def has_gpus(self) -> bool:
        """Whether workers declare the ``GPU`` resource (so tasks must ask for it)."""
        return "GPU" in worker_resources_from_args(self.jobqueue.get("worker_extra_args") or [])


def bundled_profiles_dir() -> Path:
    """The folder of the profiles shipped with ptyinr (package data of ``ptyinr.slurm``)."""
    folder = resources.files("ptyinr.slurm") / "profiles"
    # An installed or editable package lives on the file system; a package imported from a
    # zip archive has no such folder, and then only the user's profile folders count.
    return folder if isinstance(folder, Path) else Path(str(folder))


def user_profiles_dir() -> Path:
    """The user's own profile folder, ``~/.config/ptyinr/profiles``."""
    return Path("~/.config/ptyinr/profiles").expanduser()


def profile_dirs() -> list[Path]:
    """Directories searched for profiles, highest priority first."""
    dirs: list[Path] = []
    env = os.environ.get("PTYINR_PROFILES")
    if env:
        dirs += [Path(p).expanduser() for p in env.split(os.pathsep) if p]
    dirs.append(user_profiles_dir())
    dirs.append(bundled_profiles_dir())
    return dirs


def available_profiles() -> dict[str, Path]:
    """Every profile name that `find_profile` resolves, with the file it resolves to."""
    found: dict[str, Path] = {}
    for folder in profile_dirs():
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if path.suffix in PROFILE_SUFFIXES and path.is_file():
                found.setdefault(path.stem, path)
    return dict(sorted(found.items()))


def find_profile(name: str) -> Path:
    """The file of profile NAME (or NAME itself when it is a path to a YAML file)."""
    candidate = Path(name).expanduser()
    if candidate.suffix in PROFILE_SUFFIXES and ("/" in name or candidate.is_file()):
        if not candidate.is_file():
            raise InputError(f"profile file {candidate} does not exist")
        return candidate
    if not _PROFILE_NAME.match(name):
        raise InputError(
            f"profile name {name!r} is not valid: expected letters, digits, '.', '_', '-' "
            "or a path to a .yaml file"
        )
    for folder in profile_dirs():
        for suffix in PROFILE_SUFFIXES:
            path = folder / f"{name}{suffix}"
            if path.is_file():
                return path
    known = ", ".join(available_profiles()) or "none"
    searched = ", ".join(str(d) for d in profile_dirs())
    raise InputError(f"no SLURM profile named {name!r} (known: {known}; searched {searched})")


def load_profile(name: str) -> Profile:
    """Find, read and validate a profile; ConfigError names the file, key and value at fault."""
    path = find_profile(name)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"profile {path}: not readable YAML ({first})") from exc
    return validate_profile(data, path)


def validate_profile(data: Any, path: Path) -> Profile:
    """Check a parsed profile against dask-jobqueue's SLURM keys and ptyinr's options."""
    where = f"profile {path}"
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping with a 'jobqueue: slurm:' section")
    unknown_top = set(data) - {"jobqueue", "ptyinr"}
    if unknown_top:
        raise ConfigError(
            f"{where}: unknown top-level key(s) {sorted(unknown_top)}; expected 'jobqueue' "
            "and optionally 'ptyinr'"
        )
    jq = data.get("jobqueue")
    if not isinstance(jq, Mapping) or not isinstance(jq.get("slurm"), Mapping):
        raise ConfigError(f"{where}: missing section 'jobqueue: slurm:' (dask-jobqueue format)")
    if set(jq) != {"slurm"}:
        raise ConfigError(f"{where}: 'jobqueue' must hold only 'slurm', found {sorted(jq)}")

    allowed = _slurm_keys()
    kwargs: dict[str, Any] = {}
    for raw_key, value in jq["slurm"].items():
        key = str(raw_key).replace("-", "_")
        if key in _RESERVED_KEYS:
            raise ConfigError(f"{where}: jobqueue.slurm.{raw_key} is set by ptyinr, remove it")
        if key not in allowed:
            raise ConfigError(
                f"{where}: unknown key jobqueue.slurm.{raw_key}; expected one of "
                f"{', '.join(sorted(allowed))}"
            )
        kwargs[key] = value
    _check_slurm_values(kwargs, where)

    options = dict(_PTYINR_DEFAULTS)
    extra = data.get("ptyinr") or {}
    if not isinstance(extra, Mapping):
        raise ConfigError(f"{where}: 'ptyinr' must be a mapping, got {extra!r}")
    for key, value in extra.items():
        if key not in _PTYINR_DEFAULTS:
            raise ConfigError(
                f"{where}: unknown key ptyinr.{key}; expected one of {sorted(_PTYINR_DEFAULTS)}"
            )
        options[key] = value
    _check_ptyinr_values(options, where, kwargs)
    return Profile(name=path.stem, path=path, jobqueue=kwargs, options=options)


def _slurm_keys() -> set[str]:
    """SLURMCluster keyword arguments a profile may set (dask-jobqueue's config keys)."""
    import dask_jobqueue  # noqa: F401  (registers the jobqueue.* defaults in dask.config)

    keys = {k.replace("-", "_") for k in dask.config.get("jobqueue.slurm", {})}
    keys |= {"nanny", "protocol", "job_cpu", "job_mem"}
    # Deprecated aliases only produce warnings downstream; refuse them up front.
    return keys - {"extra", "env_extra", "job_extra", "header_skip"} - _RESERVED_KEYS


def _default(key: str) -> Any:
    import dask_jobqueue  # noqa: F401

    return dask.config.get(f"jobqueue.slurm.{key}", None)


def _check_slurm_values(kw: dict[str, Any], where: str) -> None:
    def bad(key: str, expected: str) -> ConfigError:
        return ConfigError(f"{where}: jobqueue.slurm.{key} = {kw[key]!r}, expected {expected}")

    for key in ("cores", "memory"):
        if kw.get(key) is None:
            raise ConfigError(f"{where}: jobqueue.slurm.{key} is required")
    for key in ("cores", "processes", "job_cpu"):
        if key in kw and kw[key] is not None:
            if isinstance(kw[key], bool) or not isinstance(kw[key], int) or kw[key] < 1:
                raise bad(key, "a positive integer")
    if (kw.get("processes") or 1) > kw["cores"]:
        raise bad("processes", f"at most cores ({kw['cores']})")
    for key in ("memory", "job_mem"):
        if kw.get(key) is not None:
            try:
                if parse_bytes(str(kw[key])) <= 0:
                    raise ValueError
            except (ValueError, TypeError):
                raise bad(key, "a size like '16GiB'") from None
    if "walltime" in kw:
        if not isinstance(kw["walltime"], str):
            raise bad(
                "walltime",
                'a quoted SLURM time like "04:00:00" (YAML reads 04:00:00 unquoted as a number)',
            )
        try:
            parse_slurm_time(kw["walltime"])
        except InputError:
            raise bad("walltime", "a SLURM time like '04:00:00' or '1-00:00:00'") from None
    if kw.get("protocol") not in (None, "tls://", "tls"):
        raise bad("protocol", "tls:// or nothing (ptyinr clusters talk TLS)")
    for key in (
        "name",
        "queue",
        "account",
        "interface",
        "python",
        "local_directory",
        "shebang",
        "shared_temp_directory",
    ):
        if kw.get(key) is not None and not isinstance(kw[key], str):
            raise bad(key, "a string")
    if kw.get("name") is not None and not _PROFILE_NAME.match(kw["name"]):
        raise bad("name", "letters, digits, '.', '_', '-'")
    for key in (
        "job_extra_directives",
        "worker_extra_args",
        "job_script_prologue",
        "job_directives_skip",
    ):
        value = kw.get(key)
        if value is not None and (
            not isinstance(value, list) or not all(isinstance(v, str) for v in value)
        ):
            raise bad(key, "a list of strings")
    for key in ("job_extra_directives", "job_script_prologue", "worker_extra_args"):
        for item in kw.get(key) or []:
            if "\n" in item or "\r" in item:
                raise ConfigError(f"{where}: jobqueue.slurm.{key} item {item!r} holds a newline")
    try:
        worker_resources_from_args(kw.get("worker_extra_args") or [])
    except ValueError as exc:
        raise bad("worker_extra_args", f"--resources NAME=NUMBER ({exc})") from None


def _check_ptyinr_values(opt: dict[str, Any], where: str, kw: dict[str, Any]) -> None:
    def bad(key: str, expected: str) -> ConfigError:
        return ConfigError(f"{where}: ptyinr.{key} = {opt[key]!r}, expected {expected}")

    for key in ("minimum_jobs", "maximum_jobs"):
        if isinstance(opt[key], bool) or not isinstance(opt[key], int) or opt[key] < 0:
            raise bad(key, "an integer >= 0")
    if opt["maximum_jobs"] < max(1, opt["minimum_jobs"]):
        raise bad("maximum_jobs", f">= max(1, minimum_jobs = {opt['minimum_jobs']})")
    if opt["torch_threads"] is not None and (
        not isinstance(opt["torch_threads"], int) or opt["torch_threads"] < 1
    ):
        raise bad("torch_threads", "a positive integer or null")
    if opt["lifetime_margin"] is not None:
        try:
            margin = parse_timedelta(opt["lifetime_margin"], default="s")
        except (ValueError, TypeError, KeyError):
            raise bad("lifetime_margin", "a duration like '10m'") from None
        walltime = parse_slurm_time(str(kw.get("walltime") or _default("walltime")))
        if not 0 < margin < walltime:
            raise bad("lifetime_margin", f"between 0 and the walltime ({walltime:.0f} s)")
    driver = opt["driver"] or {}
    if not isinstance(driver, Mapping) or set(driver) - _DRIVER_KEYS:
        raise bad("driver", f"a mapping with keys among {sorted(_DRIVER_KEYS)}")
    opt["driver"] = dict(driver)
    host = opt["scheduler_host"]
    if host is not None and (
        not isinstance(host, str) or not host or any(c.isspace() for c in host) or "/" in host
    ):
        raise bad("scheduler_host", "an address or host name like 10.1.2.3, or 0.0.0.0 for all")
    dash = opt["dashboard_address"]
    if dash is not None:
        try:
            opt["dashboard_address"] = loopback_dashboard(dash)
        except InputError:
            raise bad("dashboard_address", "HOST:PORT, or :PORT for 127.0.0.1") from None
    sec = opt["security"]
    if sec is not None:
        if (
            not isinstance(sec, Mapping)
            or set(sec) != _SECURITY_KEYS
            or not all(isinstance(v, str) and v for v in sec.values())
        ):
            raise bad(
                "security",
                "null (temporary credentials per cluster) or a mapping of file paths "
                "{ca_file, cert, key}",
            )
        opt["security"] = dict(sec)


def loopback_dashboard(address: str | int | None) -> str | None:
    """A dashboard address with 127.0.0.1 where it names no host: ``:8787``, ``8787`` ->
    ``127.0.0.1:8787``; ``HOST:PORT`` stays (an explicit choice); None (no dashboard) stays."""
    if address is None:
        return None
    text = str(address).strip()
    if "://" in text:
        text = text.split("://", 1)[1]
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "", text
    if not port.isdigit() or int(port) > 65535 or any(c.isspace() for c in host):
        raise InputError(f"dashboard address {address!r}: expected HOST:PORT or :PORT")
    return f"{host or _LOOPBACK}:{int(port)}"


def is_secure_address(address: str) -> bool:
    """Whether a scheduler address uses an encrypted, authenticated comm (tls://, wss://)."""
    return address.split("://", 1)[0].lower() in _SECURE_SCHEMES


def _tls_config_security() -> Any:
    """The client Security of Dask's configuration (distributed.comm.tls.*); InputError when
    it lacks the CA file or the client certificate a tls:// scheduler asks for."""
    from distributed.security import Security

    sec = Security()
    tls = sec.get_tls_config_for_role("client")
    if not (tls.get("ca_file") and tls.get("cert")):
        raise InputError(
            "a tls:// scheduler needs TLS credentials: set distributed.comm.tls.ca-file and "
            "distributed.comm.tls.client.cert (and .key) in Dask's config, e.g. "
            "DASK_DISTRIBUTED__COMM__TLS__CA_FILE, DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT, "
            "DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY"
        )
    return Security(
        require_encryption=True,
        **{k: getattr(sec, k) for k in ("tls_ca_file", "tls_client_cert", "tls_client_key")},
    )


def parse_slurm_time(text: str) -> float:
    """Seconds in a SLURM time ("MM", "MM:SS", "HH:MM:SS", "D-HH[:MM[:SS]]")."""
    m = _SLURM_TIME.match(text.strip())
    if not m:
        raise InputError(f"time {text!r} is not a SLURM time like '04:00:00' or '1-00:00:00'")
    days, a, b, c = m.groups()
    parts = [int(x) for x in (a, b, c) if x is not None]
    if days is not None:  # D-HH, D-HH:MM, D-HH:MM:SS
        h, mi, s = ([*parts, 0, 0])[:3]
        return float(int(days) * 86400 + h * 3600 + mi * 60 + s)
    if len(parts) == 1:  # MM
        return float(parts[0] * 60)
    if len(parts) == 2:  # MM:SS
        return float(parts[0] * 60 + parts[1])
    return float(parts[0] * 3600 + parts[1] * 60 + parts[2])  # HH:MM:SS


def worker_resources_from_args(args: list[str]) -> dict[str, float]:
    """The ``--resources "A=1 B=2"`` of a dask-worker argument list, as a dict."""
    out: dict[str, float] = {}
    for i, arg in enumerate(args):
        value = None
        if arg == "--resources":
            if i + 1 >= len(args):
                raise ValueError("--resources without a value")
            value = args[i + 1]
        elif arg.startswith("--resources="):
            value = arg.split("=", 1)[1]
        if value is None:
            continue
        for item in re.split(r"[\s,]+", value.strip()):
            if not item:
                continue
            name, sep, number = item.partition("=")
            if not sep:
                raise ValueError(f"resource {item!r} has no '='")
            out[name] = float(number)
    return out


def lifetime_args(walltime_s: float, margin_s: float | None = None) -> list[str]:
    """dask-worker ``--lifetime``/``--lifetime-stagger`` so every worker retires before SLURM
    kills it: lifetime + stagger = walltime - margin (margin defaults to 10 % of the walltime,
    between 1 and 15 minutes, and at most a quarter of it)."""
    if margin_s is None:
        margin_s = min(max(0.1 * walltime_s, 60.0), 900.0, 0.25 * walltime_s)
    stagger = margin_s / 2
    lifetime = walltime_s - margin_s - stagger
    if lifetime <= 0:
        raise InputError(f"walltime {walltime_s:.0f} s is too short for a worker lifetime")
    return ["--lifetime", f"{int(lifetime)}s", "--lifetime-stagger", f"{int(stagger)}s"]


def slurm_cluster_kwargs(
    profile: Profile,
    *,
    log_dir: Path | None = None,
    dashboard_address: str | None = "default",
    environ: Mapping[str, str] | None = None,
    security: Any = None,
    default_host: str | None = None,
) -> dict[str, Any]:
    """SLURMCluster keyword arguments for a profile: lifetime, logs, driver tag, TLS and the
    addresses the scheduler and its dashboard bind (pure but for `default_host`, which is
    Dask's advertised address when not given and needed).

    dashboard_address "default" = the profile's ``ptyinr.dashboard_address`` or 127.0.0.1:8787;
    a bare ":PORT" binds 127.0.0.1; None = no dashboard. SECURITY (a distributed Security)
    goes to the scheduler and, as files, to the workers; the protocol is always tls://."""
    env = os.environ if environ is None else environ
    kw = {k: (list(v) if isinstance(v, list) else v) for k, v in profile.jobqueue.items()}
    kw.setdefault("name", "ptyinr-worker")
    args = list(kw.get("worker_extra_args") or [])
    if not any(a == "--lifetime" or a.startswith("--lifetime=") for a in args):
        margin = profile.options.get("lifetime_margin")
        margin_s = parse_timedelta(margin, default="s") if margin is not None else None
        args += lifetime_args(profile.walltime_s, margin_s)
    own_dashboard = ("--dashboard", "--no-dashboard", "--dashboard-address")
    if not any(a.split("=", 1)[0] in own_dashboard for a in args):
        # Each worker's own dashboard: on its node's loopback, as the scheduler's.
        args += ["--dashboard-address", f"{_LOOPBACK}:0"]
    kw["worker_extra_args"] = args
    directives = list(kw.get("job_extra_directives") or [])
    if log_dir is not None:
        # Our own quoted --output (dask-jobqueue writes log_directory unquoted).
        folder = str(Path(log_dir).resolve())
        _no_control(folder, "log folder")
        if "\\" in folder:  # sbatch's #SBATCH parser treats '\' as an escape
            raise InputError(f"log folder {folder}: a backslash is not supported")
        # sbatch expands %-patterns in --output: keep the folder's own '%' literal.
        log = folder.replace("%", "%%") + f"/{kw['name']}-%j.log"
        directives.append(f"--output={shlex.quote(log)}")  # stdout and stderr, one file
    if env.get("PTYINR_DRIVER") == "1" and env.get("SLURM_JOB_ID", "").isdigit():
        # Worker jobs of a `ptyinr submit` driver: tagged so `ptyinr cancel` finds them.
        directives.append(f"--comment=ptyinr-driver-{env['SLURM_JOB_ID']}")
    kw["job_extra_directives"] = directives
    if dashboard_address == "default":
        dashboard_address = profile.options.get("dashboard_address") or DEFAULT_DASHBOARD
    options: dict[str, Any] = {"dashboard_address": loopback_dashboard(dashboard_address)}
    host = profile.options.get("scheduler_host")
    if host:
        options["host"] = host  # "0.0.0.0": all interfaces, the profile's explicit choice
    elif kw.get("interface"):
        options["interface"] = kw["interface"]
    else:
        # Dask would listen on every interface and advertise this one address: bind only it.
        from distributed.utils import get_ip

        options["host"] = default_host or get_ip()
    kw["scheduler_options"] = options
    kw["protocol"] = "tls://"
    if security is not None:
        kw["security"] = security
    kw["job_name"] = kw["name"]  # `name` alone names the cluster and its workers, not jobs
    return kw


def _no_control(text: str, what: str) -> None:
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise InputError(f"{what} {text!r} contains a control character (newline, tab, ...)")


def profile_job_script(name: str) -> str:
    """The worker job script dask-jobqueue generates for a profile (no scheduler started)."""
    from dask_jobqueue.slurm import SLURMJob

    profile = load_profile(name)
    kw = slurm_cluster_kwargs(profile, log_dir=None, environ={}, default_host="SCHEDULER")
    kw.pop("scheduler_options", None)
    kw.pop("shared_temp_directory", None)
    kw["name"] = f"{kw['name']}-0"  # the worker's name, as the cluster would give it
    kw["security"] = _placeholder_security(profile)
    try:
        job = SLURMJob(scheduler="tls://SCHEDULER:8786", **kw)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"profile {profile.path}: {exc}") from exc
    return job.job_script()


def _placeholder_security(profile: Profile) -> Any:
    """For `profile_job_script`: the profile's TLS files, or where the temporary ones go."""
    from distributed.security import Security

    files = profile.options.get("security")
    if files:
        ca, cert, key = files["ca_file"], files["cert"], files["key"]
    else:
        folder = "TLS-DIR"  # a private folder made per cluster (see cluster_security)
        ca, cert, key = (
            f"{folder}/.dask-jobqueue.worker.{k}.XXXX" for k in ("ca_file", "cert", "key")
        )
    return Security(tls_ca_file=ca, tls_worker_cert=cert, tls_worker_key=key)


def _temporary_security() -> Any:
    """Fresh TLS credentials held in memory (one-line InputError without `cryptography`)."""
    from distributed.security import Security

    try:
        return Security.temporary()
    except ImportError:
        raise InputError(
            "TLS credentials for the cluster need the 'cryptography' package: "
            "pip install cryptography (or name cert/key files in the profile's "
            "ptyinr.security)"
        ) from None


def cluster_security(profile: Profile) -> Any:
    """The Security of a SLURM cluster: the profile's files (``ptyinr.security``), checked to
    exist and the key to be private, or fresh temporary credentials (in memory; dask-jobqueue
    writes the workers' copies into the cluster's private TLS folder, mode 0600)."""
    from distributed.security import Security

    files = profile.options.get("security")
    if not files:
        return _temporary_security()
    where = f"profile {profile.path}: ptyinr.security"
    paths = {k: Path(os.path.expandvars(v)).expanduser() for k, v in files.items()}
    for key, path in paths.items():
        if not path.is_file():
            raise ConfigError(f"{where}.{key} = {files[key]!r}: no such file")
    mode = paths["key"].stat().st_mode & 0o777
    if mode & 0o077:
        raise ConfigError(
            f"{where}.key {paths['key']}: readable by others (mode {mode:o}); "
            f"run chmod 600 {shlex.quote(str(paths['key']))}"
        )
    ca, cert, key = (str(paths[k]) for k in ("ca_file", "cert", "key"))
    return Security(
        require_encryption=True,
        tls_ca_file=ca,
        **{f"tls_{role}_{kind}": value
           for role in ("client", "scheduler", "worker")
           for kind, value in (("cert", cert), ("key", key))},
    )  # fmt: skip


def private_tls_dir(profile: Profile, log_dir: Path) -> Path:
    """A new folder (mode 0700) for the workers' copies of the temporary credentials, on a
    file system the worker nodes see: the profile's ``shared_temp_directory``, else the log
    folder, else ~/.cache/ptyinr when that path needs shell quoting (dask-jobqueue writes
    these paths unquoted into the job script)."""
    import tempfile

    given = profile.jobqueue.get("shared_temp_directory")
    bases = [Path(os.path.expandvars(given)).expanduser()] if given else []
    bases += [log_dir, Path("~/.cache/ptyinr").expanduser()]
    for base in bases:
        base = base.resolve()
        if _SHELL_SAFE_PATH.match(str(base) + "/.ptyinr-tls-x"):
            base.mkdir(parents=True, exist_ok=True)
            return Path(tempfile.mkdtemp(prefix=".ptyinr-tls-", dir=base))
    raise ConfigError(
        f"profile {profile.path}: no folder for the TLS files without spaces or shell "
        "characters; set jobqueue.slurm.shared_temp_directory to one on a shared file system"
    )


# --------------------------------------------------------------------------- worker set-up


class WorkerSetup(WorkerPlugin):
    """Worker plugin: pin a local GPU and size torch's CPU threads, so N workers on one
    machine do not oversubscribe its cores. distributed starts workers with
    OMP_NUM_THREADS=1; this sets it (and MKL/OpenBLAS) to the worker's share before a task
    first imports torch, which reads it then, in every thread."""

    name = "ptyinr-worker-setup"
    idempotent = True

    def __init__(self, torch_threads: int, gpu_ids: list[str] | None = None):
        self.torch_threads = max(1, int(torch_threads))
        self.gpu_ids = gpu_ids

    def setup(self, worker: Any) -> None:
        """Runs in each worker before its first task."""
        if self.gpu_ids:
            try:
                index = int(worker.name)
            except (TypeError, ValueError):
                index = 0
            os.environ["CUDA_VISIBLE_DEVICES"] = self.gpu_ids[index % len(self.gpu_ids)]
        threads = self.torch_threads
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ[var] = str(threads)  # read by torch when a task first imports it
        torch = sys.modules.get("torch")
        if torch is not None:  # already imported: its pool is sized, resize it
            torch.set_num_threads(threads)


# --------------------------------------------------------------------------- connect

# What each client's workers are expected to offer, for task_resources when none is up yet.
_EXPECTED_GPU: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def connect(
    spec: str = "local",
    *,
    n_workers: int | None = None,
    threads_per_worker: int | None = None,
    log_dir: str | Path | None = None,
    minimum_jobs: int | None = None,
    maximum_jobs: int | None = None,
    dashboard_address: str | None = "default",
    quiet: bool = False,
    insecure: bool = False,
    local_tls: bool = True,
) -> Iterator[Any]:
    """Yield a `distributed.Client` connected to the cluster named by SPEC; close it after.

    n_workers / threads_per_worker size a local cluster; log_dir (default $PTYINR_LOG_DIR
    or ./ptyinr-logs), minimum_jobs and maximum_jobs apply to SLURM; the dashboard link (and
    the SSH tunnel to it) is printed to stderr unless quiet. dashboard_address: "default" =
    127.0.0.1:8787 (or the profile's), ":PORT" = 127.0.0.1:PORT, None = no dashboard.
    A plain (tcp://) scheduler address is refused unless insecure. A local cluster talks TLS
    with temporary credentials too (`local_tls`): on a shared login node, loopback is
    reachable by every user of the machine; only tests that hand its address to another
    client turn it off.
    """
    parsed = parse_cluster_spec(spec)
    if insecure and not (parsed.kind == "address" and not is_secure_address(parsed.address or "")):
        raise InputError(
            f"--insecure applies only to a plain scheduler address (tcp://...), not to {spec!r}"
        )
    if dashboard_address == "default" and parsed.kind == "local":
        dashboard_address = DEFAULT_DASHBOARD
    if parsed.kind == "local":
        cm = _local_client(n_workers, threads_per_worker, dashboard_address, local_tls)
    elif parsed.kind == "slurm":
        folder = Path(log_dir or os.environ.get("PTYINR_LOG_DIR") or "ptyinr-logs")
        cm = _slurm_client(
            parsed.profile or "", folder, minimum_jobs, maximum_jobs, dashboard_address
        )
    else:
        cm = _attached_client(parsed.address or "", insecure)
    with cm as client:
        if not quiet:
            _announce(client, parsed)
        yield client


def _announce(client: Any, parsed: ClusterSpec) -> None:
    from importlib.util import find_spec

    from rich.console import Console

    where = {"local": "local cluster", "slurm": f"SLURM profile {parsed.profile}"}.get(
        parsed.kind, f"scheduler {parsed.address}"
    )
    console = Console(stderr=True)
    if not find_spec("bokeh"):
        console.print(f"Dask on {where}; dashboard: unavailable (pip install bokeh)")
        return
    link = client.dashboard_link
    console.print(f"Dask on {where}; dashboard: {link}", highlight=False, soft_wrap=True)
    tunnel = ssh_tunnel_command(link) if parsed.kind != "address" else None
    if tunnel:
        console.print(f"  from your computer: {tunnel}", highlight=False, soft_wrap=True)


def ssh_tunnel_command(link: str, user: str | None = None, host: str | None = None) -> str | None:
    """The ``ssh -L`` command that forwards a loopback-bound dashboard LINK to the user's
    computer (then open http://localhost:8787/status there); None for other hosts."""
    import getpass
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(link)
    if parts.hostname not in ("127.0.0.1", "localhost", "::1") or not parts.port:
        return None
    user = user or getpass.getuser()
    if not host:
        host = socket.getfqdn()
        if host.startswith("localhost"):  # no DNS name: the bare host name is the better bet
            host = socket.gethostname()
    return (
        f"ssh -N -L 8787:localhost:{parts.port} {user}@{host}  "
        f"then open http://localhost:8787{parts.path or '/status'}"
    )


def cuda_gpu_ids() -> list[str]:
    """Ids of the GPUs torch can use here (as CUDA_VISIBLE_DEVICES entries); [] on CPU."""
    if not any(Path(p).exists() for p in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd")):
        return []  # no GPU driver here: skip importing torch (seconds) just to learn that
    try:
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # a broken CUDA install means: no GPUs
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        ids = [v.strip() for v in visible.split(",") if v.strip()]
        return ids[:count]
    return [str(i) for i in range(count)]


def local_layout(
    n_workers: int | None, threads_per_worker: int | None, gpu_ids: list[str], cores: int
) -> dict[str, Any]:
    """Sizes of a local cluster: workers, dask threads, torch threads, resources (pure)."""
    if n_workers is not None and n_workers < 1:
        raise InputError(f"n_workers = {n_workers}: expected at least 1")
    if threads_per_worker is not None and threads_per_worker < 1:
        raise InputError(f"threads_per_worker = {threads_per_worker}: expected at least 1")
    if gpu_ids:
        n = n_workers or len(gpu_ids)
        if n > len(gpu_ids):
            raise InputError(f"n_workers = {n}: this machine has only {len(gpu_ids)} GPU(s)")
        resources: dict[str, float] | None = {"GPU": 1}
    else:
        n = n_workers or max(1, min(cores, 4))
        resources = None
    tpw = threads_per_worker or 1
    return {
        "n_workers": n,
        "threads_per_worker": tpw,
        "torch_threads": max(1, cores // (n * tpw)),
        "resources": resources,
        "gpu_ids": gpu_ids[:n] if gpu_ids else None,
    }


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


@contextlib.contextmanager
def _local_client(
    n_workers: int | None,
    threads_per_worker: int | None,
    dashboard_address: str | None,
    tls: bool = True,
) -> Iterator[Any]:
    from distributed import Client, LocalCluster

    layout = local_layout(n_workers, threads_per_worker, cuda_gpu_ids(), _cores())
    threads = str(layout["torch_threads"])
    cluster = LocalCluster(
        n_workers=layout["n_workers"],
        threads_per_worker=layout["threads_per_worker"],
        processes=True,
        resources=layout["resources"],
        host=_LOOPBACK,  # scheduler and workers listen on loopback only
        dashboard_address=loopback_dashboard(dashboard_address),
        env={"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads},
        **({"protocol": "tls://", "security": _temporary_security()} if tls else {}),
    )
    try:
        with Client(cluster) as client:
            client.register_plugin(WorkerSetup(layout["torch_threads"], layout["gpu_ids"]))
            _EXPECTED_GPU[client] = bool(layout["resources"])
            yield client
    finally:
        cluster.close()


def require_slurm_client(tools: tuple[str, ...] = _SLURM_CLIENT_TOOLS) -> None:
    """InputError unless the SLURM client commands are on PATH."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        raise InputError(
            f"{', '.join(missing)} not found on PATH ({os.environ.get('PATH', '')}): "
            "--cluster slurm:PROFILE needs a SLURM client (run on a login node) "
            "or use --cluster local"
        )


@contextlib.contextmanager
def _slurm_client(
    profile_name: str,
    log_dir: Path,
    minimum_jobs: int | None,
    maximum_jobs: int | None,
    dashboard_address: str | None,
) -> Iterator[Any]:
    profile = load_profile(profile_name)
    require_slurm_client()
    from dask_jobqueue import SLURMCluster
    from distributed import Client

    lo = profile.options["minimum_jobs"] if minimum_jobs is None else minimum_jobs
    hi = profile.options["maximum_jobs"] if maximum_jobs is None else maximum_jobs
    if lo < 0 or hi < max(1, lo):
        raise InputError(
            f"minimum_jobs = {lo}, maximum_jobs = {hi}: need 0 <= min <= max, max >= 1"
        )
    log_dir.mkdir(parents=True, exist_ok=True)
    security = cluster_security(profile)
    kwargs = slurm_cluster_kwargs(
        profile, log_dir=log_dir, dashboard_address=dashboard_address, security=security
    )
    tls_dir = None if profile.options.get("security") else private_tls_dir(profile, log_dir)
    if tls_dir is not None:
        kwargs["shared_temp_directory"] = str(tls_dir)
    try:
        cluster = SLURMCluster(**kwargs)
    except (TypeError, ValueError) as exc:  # e.g. an interface this machine lacks
        if tls_dir is not None:
            shutil.rmtree(tls_dir, ignore_errors=True)
        raise ConfigError(f"profile {profile.path}: {exc}") from exc
    try:
        with _terminate_on_sigterm(), Client(cluster) as client:
            client.register_plugin(WorkerSetup(profile.options["torch_threads"] or 1))
            _EXPECTED_GPU[client] = profile.has_gpus
            cluster.adapt(minimum_jobs=lo, maximum_jobs=hi, interval="1s")
            yield client
    finally:
        try:
            cluster.close()  # scancels every worker job it submitted
        finally:
            if tls_dir is not None:
                _remove_tls_dir(cluster, tls_dir)


def _remove_tls_dir(cluster: Any, folder: Path) -> None:
    """Delete the workers' copies of the temporary credentials (dask-jobqueue keeps them as
    open temporary files on the cluster object) and their folder."""
    for key in ("ca_file", "cert", "key"):
        handle = getattr(cluster, f"_job_{key}", None)
        if handle is not None:
            with contextlib.suppress(OSError):
                handle.close()
    shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def _terminate_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM (scancel, walltime) into KeyboardInterrupt so the cluster closes and
    cancels its worker jobs instead of leaving them to time out."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _attached_client(address: str, insecure: bool = False) -> Iterator[Any]:
    from distributed import Client

    if is_secure_address(address):
        security = _tls_config_security()
    elif insecure:
        security = None
    else:
        raise InputError(
            f"--cluster {address}: refused, a plain-TCP scheduler has no encryption or "
            "authentication (whoever reaches it can run code as you); use a tls:// address "
            "with credentials in Dask's config, or pass --insecure if you trust the network"
        )
    try:
        client = Client(address, timeout="10s", security=security)
    except (OSError, TimeoutError) as exc:
        raise InputError(f"cannot connect to the Dask scheduler at {address}: {exc}") from exc
    with client:
        yield client


# --------------------------------------------------------------------------- helpers for runs


def task_resources(client: Any) -> dict[str, float]:
    """Resources a reconstruction task should ask for: ``{"GPU": 1}`` on GPU workers, else {}.

    Decided from the workers that are up; with none up yet (adaptive SLURM), from what the
    cluster was built to provide."""
    workers = client.scheduler_info().get("workers", {})
    if workers:
        return {"GPU": 1} if any("GPU" in w.get("resources", {}) for w in workers.values()) else {}
    return {"GPU": 1} if _EXPECTED_GPU.get(client, False) else {}


def current_slurm_job_id() -> str | None:
    """The SLURM job this process runs in (call inside a task), or None outside SLURM."""
    return os.environ.get("SLURM_JOB_ID") or None


def slurm_job_ids(client: Any) -> list[str]:
    """Sorted SLURM job ids of the workers currently connected (empty outside SLURM)."""
    found = client.run(current_slurm_job_id, on_error="return")
    ids = {v for v in found.values() if isinstance(v, str) and v}
    return sorted(ids, key=lambda s: (len(s), s))


__all__ = [
    "ClusterSpec",
    "Profile",
    "WorkerSetup",
    "available_profiles",
    "bundled_profiles_dir",
    "cluster_security",
    "connect",
    "cuda_gpu_ids",
    "current_slurm_job_id",
    "find_profile",
    "is_secure_address",
    "lifetime_args",
    "load_profile",
    "local_layout",
    "loopback_dashboard",
    "parse_cluster_spec",
    "parse_slurm_time",
    "private_tls_dir",
    "profile_dirs",
    "profile_job_script",
    "require_slurm_client",
    "slurm_cluster_kwargs",
    "slurm_job_ids",
    "ssh_tunnel_command",
    "task_resources",
    "user_profiles_dir",
    "worker_resources_from_args",
]
