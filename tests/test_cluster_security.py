"""Clusters are not open to whoever can reach them: SLURM clusters talk (mutual) TLS with
per-cluster temporary credentials, schedulers bind only the profile's interface, dashboards
bind loopback; plain tcp:// addresses are refused without --insecure.

The `slurm:local-test` tests run against the single-node test SLURM (tests/slurm_support.py)
and are skipped, with the reason, where its packages are absent.
"""

from __future__ import annotations

import operator  # tasks from stdlib: worker jobs cannot import tests/
import os
import socket
import stat
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from typer.testing import CliRunner

from ptyinr import cluster
from ptyinr.cluster import connect, load_profile, slurm_cluster_kwargs
from ptyinr.errors import InputError

CONNECT_TIMEOUT = "5s"


def _app():  # imported lazily: workers unpickling this module's functions skip the CLI
    from ptyinr.cli.main import app

    return app


def non_loopback_ipv4() -> str | None:
    """An IPv4 address of this machine that is not loopback, or None."""
    try:
        import psutil

        for addrs in psutil.net_if_addrs().values():
            for a in addrs:
                if a.family == socket.AF_INET and not a.address.startswith("127."):
                    return a.address
    except ImportError:  # pragma: no cover - psutil comes with distributed
        pass
    try:
        ip = socket.gethostbyname(socket.gethostname())
    except OSError:
        return None
    return None if ip.startswith("127.") else ip


def reachable(host: str, port: int, timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def dashboard_port(client: object) -> int:
    parts = urlsplit(client.dashboard_link)  # type: ignore[attr-defined]
    assert parts.hostname == "127.0.0.1", client.dashboard_link  # type: ignore[attr-defined]
    assert parts.port
    return parts.port


# --------------------------------------------------------------------------- local cluster


def test_local_cluster_binds_loopback_only_and_talks_tls(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Loopback is shared by every user of a login node: the local cluster talks TLS too, and
    a client without its credentials (plain TCP, or TLS with other certificates) is refused."""
    from distributed import Client
    from distributed.security import Security

    monkeypatch.setattr(cluster, "cuda_gpu_ids", lambda: [])
    with connect("local", n_workers=1, dashboard_address=":0", quiet=True) as client:
        client.wait_for_workers(1, timeout=60)
        assert client.scheduler.address.startswith("tls://127.0.0.1:")
        workers = client.scheduler_info()["workers"]
        assert workers and all(a.startswith("tls://127.0.0.1:") for a in workers)
        assert client.submit(sum, [1, 2]).result() == 3
        plain = client.scheduler.address.replace("tls://", "tcp://")
        with pytest.raises((OSError, TimeoutError)):
            Client(plain, timeout=3)
        with pytest.raises((OSError, TimeoutError)):
            Client(client.scheduler.address, timeout=3, security=Security.temporary())
        port = dashboard_port(client)
        assert reachable("127.0.0.1", port)
        ip = non_loopback_ipv4()
        if ip is not None:
            sched_port = int(client.scheduler.address.rsplit(":", 1)[1])
            assert not reachable(ip, port), f"dashboard reachable on {ip}:{port}"
            assert not reachable(ip, sched_port), f"scheduler reachable on {ip}:{sched_port}"


def test_local_default_dashboard_is_loopback() -> None:
    with pytest.MonkeyPatch.context() as mp:
        seen: dict[str, object] = {}

        class FakeCluster:
            def __init__(self, **kw: object) -> None:
                seen.update(kw)
                raise RuntimeError("stop here")

        import distributed

        mp.setattr(distributed, "LocalCluster", FakeCluster)
        with pytest.raises(RuntimeError, match="stop here"), connect("local", quiet=True):
            pass
    assert seen["host"] == "127.0.0.1"
    assert seen["dashboard_address"] == "127.0.0.1:8787"


# --------------------------------------------------------------------------- addresses


def test_plain_tcp_address_is_refused_without_insecure() -> None:
    with pytest.raises(InputError, match="--insecure"), connect("tcp://127.0.0.1:1", quiet=True):
        pass
    with pytest.raises(InputError, match="only to a plain scheduler address"):
        with connect("local", insecure=True, quiet=True):
            pass


def test_tls_address_needs_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("CA_FILE", "CLIENT__CERT", "CLIENT__KEY"):
        monkeypatch.delenv(f"DASK_DISTRIBUTED__COMM__TLS__{var}", raising=False)
    with pytest.raises(InputError, match="DASK_DISTRIBUTED__COMM__TLS__CA_FILE"):
        with connect("tls://127.0.0.1:1", quiet=True):
            pass


@pytest.mark.parametrize("command", ["run", "scan"])
def test_cli_refuses_tcp_address_without_insecure(tmp_path: Path, command: str) -> None:
    data = tmp_path / "scan.zarr"
    data.mkdir()
    result = CliRunner().invoke(_app(), [command, str(data), "--cluster", "tcp://127.0.0.1:1"])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "refused" in text and "plain-TCP" in text and "--insecure" in text and "tls://" in text


def test_cli_insecure_only_for_tcp_addresses(tmp_path: Path) -> None:
    data = tmp_path / "scan.zarr"
    data.mkdir()
    result = CliRunner().invoke(_app(), ["run", str(data), "--cluster", "local", "--insecure"])
    assert result.exit_code == 2, result.output
    assert "--insecure applies only" in result.output


# --------------------------------------------------------------------------- SLURM (real)


def test_slurm_kwargs_are_tls_and_bind_the_interface() -> None:
    kw = slurm_cluster_kwargs(load_profile("local-test"), environ={}, dashboard_address=":0")
    assert kw["protocol"] == "tls://"
    assert kw["scheduler_options"] == {"dashboard_address": "127.0.0.1:0", "interface": "lo"}


@pytest.mark.slurm
@pytest.mark.timeout(300)
def test_slurm_cluster_is_tls_only_and_dashboard_is_loopback(tmp_path: Path) -> None:
    from distributed import Client
    from distributed.security import Security

    logs = tmp_path / "logs"
    with connect(
        "slurm:local-test", log_dir=logs, minimum_jobs=1, maximum_jobs=1,
        dashboard_address=":0", quiet=True,
    ) as client:  # fmt: skip
        address = client.scheduler.address
        assert address.startswith("tls://127.0.0.1:"), address
        # The run's own TLS client works: a trivial task runs on a SLURM worker.
        assert client.submit(operator.add, 1, 2, pure=False).result(timeout=120) == 3
        workers = client.scheduler_info()["workers"]
        assert workers and all(a.startswith("tls://") for a in workers)

        # The workers' copies of the credentials: a private folder, files for the owner only;
        # the worker job script names them and holds no key material.
        (tls_dir,) = logs.glob(".ptyinr-tls-*")
        assert stat.S_IMODE(tls_dir.stat().st_mode) == 0o700
        files = list(tls_dir.iterdir())
        assert files and all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)
        script = client.cluster.job_script()  # type: ignore[union-attr]
        assert "--tls-key" in script and "BEGIN" not in script and "PRIVATE" not in script

        # A plain-TCP client cannot talk to the scheduler.
        plain = address.replace("tls://", "tcp://")
        with pytest.raises((OSError, TimeoutError)):
            Client(plain, timeout=CONNECT_TIMEOUT)
        # Nor can a TLS client with credentials of its own (another CA).
        with pytest.raises((OSError, TimeoutError)):
            Client(address, timeout=CONNECT_TIMEOUT, security=Security.temporary())
        # A second client with the cluster's credentials can.
        with Client(address, timeout="30s", security=client.security) as again:
            assert again.submit(operator.add, 2, 3, pure=False).result(timeout=60) == 5

        port = dashboard_port(client)
        assert reachable("127.0.0.1", port)
        ip = non_loopback_ipv4()
        if ip is None:
            pytest.skip("this machine has no non-loopback IPv4 address to try the dashboard on")
        assert not reachable(ip, port), f"dashboard reachable on {ip}:{port}"
        sched_port = int(address.rsplit(":", 1)[1])
        assert not reachable(ip, sched_port), f"scheduler reachable on {ip}:{sched_port}"
        for info in client.scheduler_info()["workers"].values():  # each worker's own dashboard
            port = info.get("services", {}).get("dashboard")
            assert port and reachable("127.0.0.1", port) and not reachable(ip, port)
    assert not list(logs.glob(".ptyinr-tls-*"))  # removed with the cluster


@pytest.mark.slurm
@pytest.mark.timeout(120)
def test_slurm_announces_loopback_dashboard_and_tunnel(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with connect(
        "slurm:local-test", log_dir=tmp_path / "logs", minimum_jobs=0, maximum_jobs=1,
        dashboard_address=":0",
    ) as client:  # fmt: skip
        port = dashboard_port(client)
    err = " ".join(capsys.readouterr().err.split())
    assert f"http://127.0.0.1:{port}/status" in err
    assert f"ssh -N -L 8787:localhost:{port} " in err


def test_tls_dir_is_private_and_shell_safe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    prof = load_profile("local-test")
    folder = cluster.private_tls_dir(prof, tmp_path / "logs")
    assert folder.parent == (tmp_path / "logs").resolve()
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    odd = cluster.private_tls_dir(prof, tmp_path / "worker logs")  # unquoted in job scripts
    assert odd.parent == (tmp_path / "home" / ".cache" / "ptyinr").resolve()
    assert os.access(odd, os.W_OK)
