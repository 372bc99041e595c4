"""ptyinr.cluster: specs, profiles, sizing, resources, clear errors; live local clusters."""

from __future__ import annotations

import os
import textwrap
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ptyinr import cluster
from ptyinr.cluster import (
    ClusterSpec,
    connect,
    lifetime_args,
    load_profile,
    local_layout,
    parse_cluster_spec,
    parse_slurm_time,
    slurm_cluster_kwargs,
    slurm_job_ids,
    task_resources,
)
from ptyinr.errors import ConfigError, InputError

GOOD_PROFILE = """\
jobqueue:
  slurm:
    cores: 2
    memory: 4GiB
    walltime: "01:00:00"
    job_extra_directives: ["--gres=gpu:1"]
    worker_extra_args: ["--resources", "GPU=1"]
ptyinr:
  minimum_jobs: 0
  maximum_jobs: 3
"""


@pytest.fixture
def profile_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A user profile folder ($PTYINR_PROFILES) and no ~/.config profiles."""
    folder = tmp_path / "profiles"
    folder.mkdir()
    monkeypatch.setenv("PTYINR_PROFILES", str(folder))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return folder


def _app():  # imported lazily: workers unpickling this module's functions skip the CLI
    from ptyinr.cli.main import app

    return app


# --------------------------------------------------------------------------- specs


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("local", ClusterSpec("local")),
        (" local ", ClusterSpec("local")),
        ("slurm:gpu-node", ClusterSpec("slurm", profile="gpu-node")),
        ("slurm:/site/my.yaml", ClusterSpec("slurm", profile="/site/my.yaml")),
        ("tcp://10.0.0.5:8786", ClusterSpec("address", address="tcp://10.0.0.5:8786")),
        ("tls://head:8786", ClusterSpec("address", address="tls://head:8786")),
    ],
)
def test_parse_cluster_spec(spec: str, expected: ClusterSpec) -> None:
    assert parse_cluster_spec(spec) == expected


@pytest.mark.parametrize("spec", ["", "slurm:", "locale", "10.0.0.5:8786", "http://x:1", "gpu"])
def test_parse_cluster_spec_refuses_unknown(spec: str) -> None:
    with pytest.raises(InputError, match="cluster spec"):
        parse_cluster_spec(spec)


# --------------------------------------------------------------------------- sizing


def test_local_layout_cpu_does_not_oversubscribe() -> None:
    small = local_layout(None, None, [], cores=2)
    assert small == {
        "n_workers": 2,
        "threads_per_worker": 1,
        "torch_threads": 1,
        "resources": None,
        "gpu_ids": None,
    }
    big = local_layout(None, None, [], cores=32)
    assert big["n_workers"] == 4 and big["torch_threads"] == 8
    mixed = local_layout(3, 2, [], cores=12)
    assert mixed["n_workers"] * mixed["threads_per_worker"] * mixed["torch_threads"] <= 12
    assert local_layout(8, None, [], cores=2)["torch_threads"] == 1  # never below one


def test_local_layout_one_worker_per_gpu() -> None:
    layout = local_layout(None, None, ["2", "5"], cores=16)
    assert layout["n_workers"] == 2
    assert layout["resources"] == {"GPU": 1}
    assert layout["gpu_ids"] == ["2", "5"]
    assert layout["torch_threads"] == 8
    assert local_layout(1, None, ["0", "1"], cores=4)["gpu_ids"] == ["0"]
    with pytest.raises(InputError, match="only 2 GPU"):
        local_layout(3, None, ["0", "1"], cores=4)
    with pytest.raises(InputError, match="n_workers"):
        local_layout(0, None, [], cores=4)


# --------------------------------------------------------------------------- times


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30", 1800),
        ("30:15", 1815),
        ("04:00:00", 14400),
        ("1-00:00:00", 86400),
        ("2-12", 2 * 86400 + 12 * 3600),
        ("1-02:30", 86400 + 2 * 3600 + 30 * 60),
    ],
)
def test_parse_slurm_time(text: str, seconds: float) -> None:
    assert parse_slurm_time(text) == seconds


@pytest.mark.parametrize("text", ["", "1h", "04:00:00:00", "-1", "a-01"])
def test_parse_slurm_time_refuses(text: str) -> None:
    with pytest.raises(InputError, match="SLURM time"):
        parse_slurm_time(text)


@pytest.mark.parametrize("walltime", [300, 900, 3600, 4 * 3600, 2 * 86400])
def test_workers_retire_before_the_walltime(walltime: float) -> None:
    args = lifetime_args(walltime)
    lifetime = float(args[args.index("--lifetime") + 1].rstrip("s"))
    stagger = float(args[args.index("--lifetime-stagger") + 1].rstrip("s"))
    assert lifetime > 0 and stagger > 0
    assert lifetime + stagger < walltime
    assert lifetime > 0.5 * walltime  # and they do not retire needlessly early


# --------------------------------------------------------------------------- profiles


def test_bundled_profiles_are_valid() -> None:
    names = cluster.available_profiles()
    assert {"gpu-node", "cpu-node", "local-test"} <= set(names)
    gpu = load_profile("gpu-node")
    assert gpu.has_gpus and "--gres=gpu:1" in gpu.jobqueue["job_extra_directives"]
    assert gpu.jobqueue["processes"] == 1
    assert not load_profile("cpu-node").has_gpus
    test = load_profile("local-test")
    assert test.has_gpus and test.jobqueue["cores"] == 1 and test.jobqueue["interface"] == "lo"


def test_profile_job_script_has_gpu_lifetime_and_resources() -> None:
    script = cluster.profile_job_script("local-test")
    assert "#SBATCH --gres=gpu:1" in script
    assert "--resources GPU=1" in script
    assert "--lifetime " in script and "--lifetime-stagger " in script
    assert "#SBATCH -J ptyinr-worker" in script


def test_user_profile_overrides_bundled_one(profile_dir: Path) -> None:
    (profile_dir / "gpu-node.yaml").write_text(GOOD_PROFILE)
    prof = load_profile("gpu-node")
    assert prof.path == profile_dir / "gpu-node.yaml"
    assert prof.jobqueue["cores"] == 2 and prof.options["maximum_jobs"] == 3
    assert load_profile("local-test").path.parent == cluster.bundled_profiles_dir()
    assert load_profile(str(profile_dir / "gpu-node.yaml")).jobqueue["cores"] == 2


def test_absent_profile_names_what_is_known(profile_dir: Path) -> None:
    with pytest.raises(InputError, match=r"no SLURM profile named 'nope'.*local-test"):
        load_profile("nope")
    with pytest.raises(InputError, match="does not exist"):
        load_profile(str(profile_dir / "missing.yaml"))
    with pytest.raises(InputError, match="not valid"):
        load_profile("../etc/passwd")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("jobqueue: [1, 2\n", "not readable YAML"),
        ("- a\n- b\n", "expected a mapping"),
        ("other: {}\n", "unknown top-level key"),
        ("jobqueue:\n  pbs: {cores: 1}\n", "jobqueue: slurm"),
        (GOOD_PROFILE.replace("cores: 2", "corez: 2"), "unknown key jobqueue.slurm.corez"),
        (GOOD_PROFILE.replace("cores: 2", "cores: two"), "jobqueue.slurm.cores = 'two'"),
        (GOOD_PROFILE.replace("    cores: 2\n", ""), "jobqueue.slurm.cores is required"),
        (GOOD_PROFILE.replace("memory: 4GiB", "memory: lots"), "jobqueue.slurm.memory"),
        (GOOD_PROFILE.replace('"01:00:00"', "1:00:00"), "quoted SLURM time"),
        (GOOD_PROFILE.replace('"01:00:00"', '"1h"'), "jobqueue.slurm.walltime"),
        (GOOD_PROFILE.replace('"GPU=1"', '"GPU"'), "worker_extra_args"),
        (GOOD_PROFILE.replace("maximum_jobs: 3", "maximum_jobs: 0"), "ptyinr.maximum_jobs"),
        (GOOD_PROFILE + "  colour: blue\n", "unknown key ptyinr.colour"),
        (GOOD_PROFILE.replace("    cores: 2\n", "    cores: 2\n    n_workers: 3\n"), "n_workers"),
        (GOOD_PROFILE.replace("    cores: 2\n", "    cores: 2\n    protocol: tcp://\n"), "tls://"),
        (GOOD_PROFILE + "  scheduler_host: 'a b'\n", "ptyinr.scheduler_host"),
        (GOOD_PROFILE + "  dashboard_address: 'nowhere'\n", "ptyinr.dashboard_address"),
        (GOOD_PROFILE + "  security: {cert: a.pem}\n", "ptyinr.security"),
        (GOOD_PROFILE + "  security: true\n", "ptyinr.security"),
    ],
)
def test_invalid_profile_is_a_clear_config_error(profile_dir: Path, text: str, match: str) -> None:
    path = profile_dir / "site.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match) as info:
        load_profile("site")
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_invalid_profile_refused_before_anything_starts(profile_dir: Path) -> None:
    (profile_dir / "broken.yaml").write_text("jobqueue:\n  slurm:\n    cores: 1\n")
    with pytest.raises(ConfigError, match="memory is required"), connect("slurm:broken"):
        pass


def test_cluster_kwargs_lifetime_logs_and_driver_tag(tmp_path: Path) -> None:
    prof = load_profile("local-test")
    log_dir = tmp_path / "logs with space 'q' %x"
    kw = slurm_cluster_kwargs(prof, log_dir=log_dir, environ={})
    assert kw["job_name"] == "ptyinr-worker"
    assert "--lifetime" in kw["worker_extra_args"]
    (output,) = [d for d in kw["job_extra_directives"] if d.startswith("--output=")]
    import shlex

    # sbatch reads the quoted value as one word; the folder's own '%' is escaped.
    (word,) = shlex.split(output.removeprefix("--output="))
    assert word == str(log_dir.resolve()).replace("%", "%%") + "/ptyinr-worker-%j.log"
    assert not any(d.startswith("--comment") for d in kw["job_extra_directives"])
    driver = slurm_cluster_kwargs(prof, environ={"PTYINR_DRIVER": "1", "SLURM_JOB_ID": "42"})
    assert "--comment=ptyinr-driver-42" in driver["job_extra_directives"]
    assert prof.jobqueue["job_extra_directives"] == ["--gres=gpu:1"]  # profile left untouched
    with pytest.raises(InputError, match="control character"):
        slurm_cluster_kwargs(prof, log_dir=tmp_path / "a\nb", environ={})


def test_cluster_kwargs_tls_and_addresses(profile_dir: Path) -> None:
    (profile_dir / "site.yaml").write_text(GOOD_PROFILE)
    prof = load_profile("site")
    kw = slurm_cluster_kwargs(prof, environ={}, default_host="10.0.0.7", security="SEC")
    assert kw["protocol"] == "tls://" and kw["security"] == "SEC"
    assert kw["worker_extra_args"][-2:] == ["--dashboard-address", "127.0.0.1:0"]
    # no interface in the profile: only the address Dask advertises, never all interfaces
    assert kw["scheduler_options"] == {"dashboard_address": "127.0.0.1:8787", "host": "10.0.0.7"}
    kw = slurm_cluster_kwargs(prof, environ={}, default_host="h", dashboard_address=":0")
    assert kw["scheduler_options"]["dashboard_address"] == "127.0.0.1:0"
    assert "security" not in slurm_cluster_kwargs(prof, environ={}, default_host="h")

    (profile_dir / "ib.yaml").write_text(
        GOOD_PROFILE.replace("    cores: 2\n", "    cores: 2\n    interface: ib0\n")
        + "  dashboard_address: ':9999'\n"
    )
    kw = slurm_cluster_kwargs(load_profile("ib"), environ={})
    assert kw["scheduler_options"] == {"dashboard_address": "127.0.0.1:9999", "interface": "ib0"}
    (profile_dir / "open.yaml").write_text(
        GOOD_PROFILE + "  scheduler_host: 0.0.0.0\n  dashboard_address: 0.0.0.0:8787\n"
    )
    kw = slurm_cluster_kwargs(load_profile("open"), environ={})  # the profile's explicit choice
    assert kw["scheduler_options"] == {"dashboard_address": "0.0.0.0:8787", "host": "0.0.0.0"}


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (":8787", "127.0.0.1:8787"),
        (8787, "127.0.0.1:8787"),
        ("0", "127.0.0.1:0"),
        ("10.0.0.1:80", "10.0.0.1:80"),
        ("0.0.0.0:8787", "0.0.0.0:8787"),
        (None, None),
    ],
)
def test_loopback_dashboard(given: object, expected: str | None) -> None:
    assert cluster.loopback_dashboard(given) == expected  # type: ignore[arg-type]


def test_ssh_tunnel_command_and_secure_addresses() -> None:
    assert cluster.ssh_tunnel_command("http://127.0.0.1:4321/status", "ann", "login1") == (
        "ssh -N -L 8787:localhost:4321 ann@login1  then open http://localhost:8787/status"
    )
    assert cluster.ssh_tunnel_command("http://10.0.0.1:4321/status", "ann", "h") is None
    assert cluster.is_secure_address("tls://h:1") and cluster.is_secure_address("wss://h:1")
    assert not cluster.is_secure_address("tcp://h:1") and not cluster.is_secure_address("ws://h")


def test_profile_security_files(profile_dir: Path, tmp_path: Path) -> None:
    from distributed.security import Security

    files = {name: tmp_path / f"{name}.pem" for name in ("ca", "cert", "key")}
    for path in files.values():
        path.write_text("x")
    files["key"].chmod(0o644)
    (profile_dir / "site.yaml").write_text(
        GOOD_PROFILE + f"  security: {{ca_file: {files['ca']}, cert: {files['cert']}, "
        f"key: {files['key']}}}\n"
    )
    prof = load_profile("site")
    with pytest.raises(ConfigError, match=r"readable by others.*chmod 600"):
        cluster.cluster_security(prof)
    files["key"].chmod(0o600)
    sec = cluster.cluster_security(prof)
    assert sec.require_encryption
    assert sec.tls_ca_file == str(files["ca"])
    for role in ("client", "scheduler", "worker"):
        assert getattr(sec, f"tls_{role}_cert") == str(files["cert"])
        assert getattr(sec, f"tls_{role}_key") == str(files["key"])
    files["ca"].unlink()
    with pytest.raises(ConfigError, match=r"ca_file.*no such file"):
        cluster.cluster_security(prof)
    temporary = cluster.cluster_security(load_profile("local-test"))
    assert isinstance(temporary, Security) and temporary.require_encryption
    assert "BEGIN CERTIFICATE" in temporary.tls_ca_file  # in memory, made for this cluster


# --------------------------------------------------------------------------- missing sbatch


def _path_without_slurm(tmp_path: Path) -> str:
    """A PATH that has python's folder and coreutils-like tools but no SLURM client."""
    empty = tmp_path / "bin"
    empty.mkdir()
    return str(empty)


def test_missing_sbatch_is_a_clear_input_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _path_without_slurm(tmp_path)
    monkeypatch.setenv("PATH", path)
    with pytest.raises(InputError, match="sbatch") as info, connect("slurm:local-test"):
        pass
    assert path in str(info.value) and "--cluster local" in str(info.value)


def test_cli_submit_without_sbatch_exits_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", _path_without_slurm(tmp_path))
    result = CliRunner().invoke(
        _app(),
        ["submit", "run", "a.zarr", "--profile", "local-test", "--log-dir", str(tmp_path / "l")],
    )
    assert result.exit_code == 2
    assert "sbatch not found on PATH" in result.output
    assert not (tmp_path / "l").exists()


def test_cli_profiles_list_and_show() -> None:
    runner = CliRunner()
    listed = runner.invoke(_app(), ["profiles"])
    assert listed.exit_code == 0, listed.output
    assert "local-test" in listed.output and "gpu-node" in listed.output
    shown = runner.invoke(_app(), ["profiles", "show", "gpu-node"])
    assert shown.exit_code == 0, shown.output
    assert "#SBATCH --gres=gpu:1" in shown.output and "distributed.cli.dask_worker" in shown.output
    assert "tls://SCHEDULER:8786" in shown.output and "--tls-key" in shown.output
    missing = runner.invoke(_app(), ["profiles", "show", "nope"])
    assert missing.exit_code == 2 and "no SLURM profile named 'nope'" in missing.output


# --------------------------------------------------------------------------- live local clusters


def _worker_view() -> dict[str, object]:
    import torch

    return {
        "torch_threads": torch.get_num_threads(),
        "omp": os.environ.get("OMP_NUM_THREADS"),
        "cuda_visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "slurm_job": os.environ.get("SLURM_JOB_ID"),
    }


def test_local_cpu_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cluster, "cuda_gpu_ids", lambda: [])
    monkeypatch.setattr(cluster, "_cores", lambda: 6)  # as if on 6 cores: 3 torch threads each
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with connect(
        "local", n_workers=2, dashboard_address=":0", quiet=True, local_tls=False
    ) as client:
        assert len(client.scheduler_info()["workers"]) == 2
        assert task_resources(client) == {}
        view = client.submit(_worker_view, resources=task_resources(client), pure=False).result(60)
        assert view["omp"] == "3"  # not distributed's default of 1
        # torch takes OMP_NUM_THREADS, capped at the cores it really has
        assert view["torch_threads"] == min(3, os.cpu_count() or 1)
        assert slurm_job_ids(client) == []
        # Attaching to the same scheduler by address works too (plain tcp: insecure=True).
        with connect(client.scheduler.address, quiet=True, insecure=True) as attached:
            assert attached.submit(sum, [1, 2]).result(30) == 3


def test_local_gpu_cluster_pins_one_gpu_per_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    """With GPUs (faked: torch here has none), one worker per GPU, each seeing only its own."""
    monkeypatch.setattr(cluster, "cuda_gpu_ids", lambda: ["0", "1"])

    def slow_view() -> dict[str, object]:
        time.sleep(0.5)  # both GPU tasks must be running at once, one per worker
        return {"cuda_visible": os.environ.get("CUDA_VISIBLE_DEVICES")}

    with connect("local", dashboard_address=":0", quiet=True) as client:
        workers = client.scheduler_info()["workers"].values()
        assert [w["resources"] for w in workers] == [{"GPU": 1}, {"GPU": 1}]
        assert task_resources(client) == {"GPU": 1}
        seen = client.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES"))
        assert sorted(seen.values()) == ["0", "1"]
        futures = [client.submit(slow_view, resources={"GPU": 1}, pure=False) for _ in range(2)]
        views = client.gather(futures)
        assert sorted(str(v["cuda_visible"]) for v in views) == ["0", "1"]


def test_task_resources_before_workers_arrive() -> None:
    class FakeClient:
        def scheduler_info(self) -> dict[str, object]:
            return {"workers": {}}

    fake = FakeClient()
    assert task_resources(fake) == {}
    cluster._EXPECTED_GPU[fake] = True
    assert task_resources(fake) == {"GPU": 1}


def test_profile_file_dirs_order(profile_dir: Path, tmp_path: Path) -> None:
    dirs = cluster.profile_dirs()
    assert dirs[0] == profile_dir
    assert dirs[-1] == cluster.bundled_profiles_dir()
    assert Path(tmp_path / "home" / ".config/ptyinr/profiles") in dirs
    text = textwrap.dedent(GOOD_PROFILE)
    (profile_dir / "x.yml").write_text(text)
    assert cluster.available_profiles()["x"] == profile_dir / "x.yml"


def test_cli_status_shows_runs_of_stores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without squeue it says so, and still lists the runs through ptyinr.store.list_runs."""
    from ptyinr.cli import slurm as cli_slurm

    def fake_list_runs(path: Path) -> list[dict[str, object]]:
        if path.name == "bad.zarr":
            raise InputError(f"{path}: not a scan store")
        return [
            {"run_id": "r1", "status": "complete", "created": "2026-01-01", "resolution_m": 3e-8}
        ]

    monkeypatch.setenv("PATH", _path_without_slurm(tmp_path))
    monkeypatch.setattr(cli_slurm, "_list_runs_hook", lambda: fake_list_runs)
    result = CliRunner().invoke(_app(), ["status", "a.zarr"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "squeue not found" in result.output
    assert "r1" in result.output and "complete" in result.output and "3e-08" in result.output
    bad = CliRunner().invoke(_app(), ["status", "bad.zarr"])
    assert bad.exit_code == 2 and "not a scan store" in bad.output
    monkeypatch.setattr(cli_slurm, "_list_runs_hook", lambda: None)
    missing = CliRunner().invoke(_app(), ["status", "a.zarr"])
    assert missing.exit_code == 0 and "list_runs" in missing.output
