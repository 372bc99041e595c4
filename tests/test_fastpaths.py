"""Mixed precision of the object networks (ptyinr.fastpaths, models.siren)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from ptyinr import evaluate
from ptyinr.config import load_config
from ptyinr.launch import fit
from ptyinr.models.fields import build_object_field
from ptyinr.models.siren import Siren
from ptyinr.runtime import precision as fastpaths
from ptyinr.scandata import ScanData
from ptyinr.simulate import SimulationConfig, simulate_scan


def _coords(n: int = 2048) -> torch.Tensor:
    return torch.rand(n, 2, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_bf16_runs_only_the_hidden_layers_in_bfloat16() -> None:
    torch.manual_seed(0)
    net = Siren(2, 1, width=64, hidden_layers=2)
    seen: dict[str, torch.dtype] = {}
    for name, module in [("first", net.body[0]), ("hidden", net.body[1]), ("head", net.head)]:
        module.register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o.dtype))
    x = _coords()
    reference = net(x).detach()
    net.hidden_dtype = torch.bfloat16
    mixed = net(x)
    assert seen == {"first": torch.float32, "hidden": torch.bfloat16, "head": torch.float32}
    assert mixed.dtype == torch.float32
    mixed.sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in net.parameters())
    gap = float((mixed.detach() - reference).norm() / reference.norm())
    assert 1e-4 < gap < 5e-2  # bfloat16 was used, and stays close


def test_float32_first_layer_is_more_accurate_than_whole_network_autocast() -> None:
    """Why the first layer stays float32: omega * W x reaches ~15 rad, where bfloat16's
    spacing (0.06 rad) blurs the coordinate encoding; judged against float64."""
    torch.manual_seed(0)
    net = Siren(2, 1, width=256, hidden_layers=3)
    x = _coords()
    exact = net.double()(x.double()).detach()
    net.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        whole = net(x).float().detach()
    net.hidden_dtype = torch.bfloat16
    mixed = net(x).detach().double()

    def error(y: torch.Tensor) -> float:
        return float((y.double() - exact).norm() / exact.norm())

    assert error(mixed) < 0.5 * error(whole)


def test_bf16_backward_keeps_the_float32_function_and_approximates_the_gradients() -> None:
    """bf16-backward: the forward pass is the float32 one, bit for bit (so the loss floor is
    float32's); the gradients carry only bfloat16 rounding noise, judged against float64,
    and are closer to it than whole-bf16 hidden layers'."""
    torch.manual_seed(0)
    net = Siren(2, 1, width=256, hidden_layers=3)
    x = _coords()
    target = torch.randn(x.shape[0], 1, generator=torch.Generator().manual_seed(2)) * 0.1
    exact_net = Siren(2, 1, width=256, hidden_layers=3).double()
    exact_net.load_state_dict(net.state_dict())
    exact_out = exact_net(x.double())
    (exact_out - target.double()).square().sum().backward()
    exact_grads = [p.grad for p in exact_net.parameters()]

    def run(hidden: torch.dtype | None, grad: torch.dtype | None) -> tuple[torch.Tensor, float]:
        net.hidden_dtype, net.grad_dtype = hidden, grad
        net.zero_grad(set_to_none=True)
        out = net(x)
        (out - target).square().sum().backward()
        worst = max(
            float((p.grad.double() - g).norm() / g.norm())
            for p, g in zip(net.parameters(), exact_grads, strict=True)
        )
        return out.detach(), worst

    fp32_out, fp32_grad_error = run(None, None)
    backward_out, backward_grad_error = run(None, torch.bfloat16)
    bf16_out, bf16_grad_error = run(torch.bfloat16, None)
    assert torch.equal(backward_out, fp32_out)
    assert fp32_grad_error < 1e-5
    assert 1e-4 < backward_grad_error < 1e-2  # bfloat16 was used, and stays close
    assert backward_grad_error < bf16_grad_error
    assert float((bf16_out - fp32_out).norm() / fp32_out.norm()) > 1e-3
    with torch.no_grad():  # inference takes the plain float32 path
        net.hidden_dtype, net.grad_dtype = None, torch.bfloat16
        assert torch.equal(net(x), fp32_out)


def test_bf16_backward_float32_reduction_matches_autograd() -> None:
    """The hand-written backward pass itself, with no reduced precision in it: autograd's
    gradients to float32 rounding (a wrong index or omega would show at O(1))."""
    torch.manual_seed(0)
    net = Siren(2, 3, width=32, hidden_layers=2, first_omega=20.0, hidden_omega=25.0)
    x = _coords(300)
    weights = torch.randn(300, 3)

    def grads(grad_dtype: torch.dtype | None) -> list[torch.Tensor]:
        net.grad_dtype = grad_dtype
        net.zero_grad(set_to_none=True)
        (net(x) * weights).sum().backward()
        return [p.grad.clone() for p in net.parameters()]

    for mine, reference in zip(grads(torch.float32), grads(None), strict=True):
        torch.testing.assert_close(mine, reference, rtol=1e-4, atol=1e-6)
    net.grad_dtype = torch.bfloat16
    out = net(x).sum()  # its saved cosines become gradients in place: one backward only
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        out.backward()


def test_resolve_precision(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    for explicit in ("fp32", "bf16-backward", "bf16"):
        cfg = load_config(overrides=[f"performance.precision={explicit}"])
        assert fastpaths.resolve_precision(cfg, cpu, 1000) == explicit

    def auto(native: bool, *overrides: str, n: int | None = 1000) -> str:
        monkeypatch.setattr(fastpaths, "native_bf16", lambda device, x=native: x)
        cfg = load_config(overrides=["performance.precision=auto", *overrides])
        return fastpaths.resolve_precision(cfg, cpu, n)

    assert load_config().performance.precision == "auto"
    assert auto(True, "train.batch_size=32") == "bf16"  # mini-batches of a wide SIREN
    assert auto(True, "train.batch_size=32", n=None) == "bf16"
    assert auto(False, "train.batch_size=32") == "fp32"  # emulated bf16: no faster
    assert auto(True, "train.batch_size=0") == "fp32"  # full batch: float32's lower floor
    assert auto(True, "train.batch_size=1000") == "fp32"  # a batch of all positions
    assert auto(True, "train.batch_size=32", "model.siren_width=128") == "fp32"  # too narrow
    assert auto(True, "train.batch_size=32", "model.object=hashgrid") == "fp32"


def test_native_bf16_reads_the_cpu_flags(tmp_path: Path) -> None:
    amx = tmp_path / "amx"
    amx.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 amx_bf16 amx_tile\n")
    plain = tmp_path / "plain"
    plain.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n")
    cpu = torch.device("cpu")
    assert fastpaths.native_bf16(cpu, str(amx))
    assert not fastpaths.native_bf16(cpu, str(plain))  # emulated bf16 is no faster
    assert not fastpaths.native_bf16(cpu, str(tmp_path / "missing"))
    assert not fastpaths.native_bf16(torch.device("meta"))


@pytest.mark.parametrize("kind", ["siren", "hashgrid"])
def test_prepare_object_field_per_network_kind(kind: str) -> None:
    cfg = load_config(
        overrides=[f"model.object={kind}", "model.siren_width=32", "performance.precision=bf16"]
    )
    field = build_object_field((20, 24), cfg.model)
    cpu = torch.device("cpu")
    dtype = fastpaths.prepare_object_field(
        field, fastpaths.resolve_precision(cfg, cpu), cfg.performance.compile
    )
    if kind == "siren":
        assert dtype is None  # the SIRENs cast their hidden layers themselves
        assert field.amplitude_net.hidden_dtype == torch.bfloat16
    else:
        assert dtype == torch.bfloat16  # whole network under autocast
        with torch.autocast("cpu", dtype=dtype):
            values = field.sample(torch.arange(100))
        assert values.dtype == torch.complex64


def test_bf16_known_probe_reconstruction_matches_fp32() -> None:
    """The same small reconstruction in both precisions reaches the same object quality."""
    sim = simulate_scan(
        SimulationConfig(object_size=40, probe_size=16, focus_fwhm_px=3, overlap=0.3)
    )
    data = ScanData(np.asarray(sim["intensities"]), np.asarray(sim["positions_px"]))
    n = sim["object"].shape[0]
    truth = xr.DataArray(
        np.asarray(sim["object"]),
        dims=("y", "x"),
        coords={"y": np.arange(n, dtype=float), "x": np.arange(n, dtype=float)},
    )
    errors = {}
    for precision in ("fp32", "bf16-backward", "bf16"):
        cfg = load_config(
            overrides=[
                "model.siren_width=64",
                "model.siren_hidden_layers=2",
                "train.lr_object=3e-3",
                "train.batch_size=64",
                "train.epochs=60",
                "train.threads=1",
                "train.device=cpu",
                f"performance.precision={precision}",
            ]
        )
        result = fit(data, cfg, known_probe=np.asarray(sim["probe"]), progress=False)
        assert result.info["object_precision"] == precision  # recorded with the run
        interior = evaluate.scanned_interior(
            result.geometry.object_shape, result.geometry.window_centres_on_grid()
        )
        scores = evaluate.compare_object(result.object, truth, mask=interior, remove_ramp=False)
        errors[precision] = scores["relative_error"]
    assert errors["fp32"] < 0.15
    assert errors["bf16"] == pytest.approx(errors["fp32"], abs=0.02)
    assert errors["bf16-backward"] == pytest.approx(errors["fp32"], abs=0.02)
