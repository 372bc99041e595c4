"""The data terms (ptyinr.losses) against independent computations, the `auto` choice, and
fits with each of them.

The engines see amplitudes sqrt(I / scale) and predict intensities in the same units, so a
likelihood of counts k = scale x amplitude^2 is checked through scipy's own distributions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr
from scipy import stats
from tiny import TINY_MODEL

from ptyinr import evaluate, losses
from ptyinr.config import load_config
from ptyinr.engines.base import sample_frames
from ptyinr.errors import ConfigError
from ptyinr.launch import build_engine, fit
from ptyinr.losses import (
    COUNTS_LOSS,
    LOSSES,
    choose_loss,
    gaussian_amplitude,
    get_loss,
    intensity_quantum,
    poisson_intensity,
    smooth_l1_amplitude,
)
from ptyinr.scandata import ScanData, StoreFrames
from ptyinr.simulate import SimulationConfig, simulate_scan, write_simulated_store

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def counts_case(seed: int = 0, shape: tuple[int, ...] = (3, 8, 8)):
    """Poisson counts of a known mean, as the engines see them (amplitudes, scale)."""
    rng = np.random.default_rng(seed)
    mean = rng.gamma(1.0, 5.0, size=shape)
    counts = rng.poisson(mean).astype(np.float64)
    scale = float(counts.max())
    amplitude = torch.as_tensor(np.sqrt(counts / scale))
    return rng, mean, counts, scale, amplitude


# ------------------------------------------------------------------ Poisson


def test_poisson_differences_are_scipys_log_likelihood_differences(monkeypatch):
    """scale x pixels x (L(p1) - L(p2)) = -(sum logpmf(k | scale p1) - sum logpmf(k | scale p2)):
    the loss is the Poisson NLL of the counts up to a prediction-independent constant (with
    its background floor at ~0; the floor's own effect is the next test's)."""
    monkeypatch.setattr(losses, "POISSON_EPS", 1e-30)
    rng, mean, counts, scale, amplitude = counts_case()
    p1 = mean / scale
    p2 = p1 * rng.uniform(0.5, 1.5, size=p1.shape)
    loss1 = float(poisson_intensity(torch.as_tensor(p1), amplitude))
    loss2 = float(poisson_intensity(torch.as_tensor(p2), amplitude))
    nll = [-stats.poisson.logpmf(counts, scale * p).sum() for p in (p1, p2)]
    np.testing.assert_allclose(scale * counts.size * (loss1 - loss2), nll[0] - nll[1], rtol=1e-6)


def test_poisson_gradient_vanishes_at_the_measurement_and_is_one_minus_m_over_p():
    _, mean, counts, scale, amplitude = counts_case(seed=1)
    measured = counts / scale
    at_fit = torch.as_tensor(measured, dtype=torch.float64).requires_grad_(True)
    value = poisson_intensity(at_fit, amplitude)
    value.backward()
    assert abs(float(value.detach())) < 1e-9  # zero at a perfect fit (>= 0 elsewhere)
    np.testing.assert_allclose(at_fit.grad.numpy(), 0.0, atol=1e-9)
    # away from it: d/dp mean(p - m log p) = (1 - m / p) / pixels by hand, with the floor
    # added to both
    predicted = torch.as_tensor(mean / scale, dtype=torch.float64).requires_grad_(True)
    value = poisson_intensity(predicted, amplitude)
    value.backward()
    eps = losses.POISSON_EPS
    expected = (1.0 - (measured + eps) / (mean / scale + eps)) / counts.size
    np.testing.assert_allclose(predicted.grad.numpy(), expected, rtol=1e-5)
    assert float(value.detach()) > 0


# ------------------------------------------------------------------ Gaussian


def test_gaussian_is_scipys_amplitude_likelihood_with_poisson_amplitude_noise():
    """2 (sqrt p - a)^2 = the Gaussian NLL of amplitudes in sqrt(counts) with sigma 1/2 (the
    amplitude noise of counts), divided by scale, up to a constant."""
    rng, mean, counts, scale, amplitude = counts_case(seed=2)
    p1 = mean / scale
    p2 = p1 * rng.uniform(0.5, 1.5, size=p1.shape)
    loss = [float(gaussian_amplitude(torch.as_tensor(p), amplitude)) for p in (p1, p2)]
    nll = [-stats.norm.logpdf(np.sqrt(counts), np.sqrt(scale * p), 0.5).sum() for p in (p1, p2)]
    np.testing.assert_allclose(
        scale * counts.size * (loss[0] - loss[1]), nll[0] - nll[1], rtol=1e-6
    )


def test_the_likelihoods_agree_near_a_fit_so_their_curves_compare():
    _, mean, _, scale, _ = counts_case(seed=3)
    truth = torch.as_tensor(mean / scale)
    predicted = truth * (
        1
        + 0.01
        * torch.randn(truth.shape, generator=torch.Generator().manual_seed(0), dtype=truth.dtype)
    )
    amplitude = truth.sqrt()
    ratio = float(
        poisson_intensity(predicted, amplitude) / gaussian_amplitude(predicted, amplitude)
    )
    assert ratio == pytest.approx(1.0, abs=0.02)


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_masked_pixels_do_not_count(loss):
    _, mean, _, scale, amplitude = counts_case(seed=4)
    predicted = torch.as_tensor(mean / scale)
    valid = torch.ones(amplitude.shape[-2:], dtype=torch.bool)
    valid[2:5, 3] = False
    corrupted = predicted.clone()
    corrupted[:, ~valid] = 1e3  # wildly wrong only where the detector is not trusted
    fn = get_loss(loss)
    a = fn(predicted, amplitude, 0.01, valid)
    b = fn(corrupted, amplitude, 0.01, valid)
    assert float(a) == pytest.approx(float(b), rel=1e-12)
    assert float(fn(corrupted, amplitude, 0.01, None)) > 10 * float(a)


def test_registry_names_the_losses_and_refuses_unknown_ones():
    assert LOSSES["smooth_l1"] is smooth_l1_amplitude
    assert get_loss("poisson") is poisson_intensity and get_loss("gaussian") is gaussian_amplitude
    with pytest.raises(ConfigError, match=r"train.loss = 'l3'.*gaussian, poisson, smooth_l1"):
        get_loss("l3")
    with pytest.raises(ConfigError, match=r"train.loss"):
        load_config(overrides=["train.loss=l3"])


# ------------------------------------------------------------------ auto


def test_auto_chooses_the_counts_loss_for_counts_and_smooth_l1_for_floats():
    assert COUNTS_LOSS in ("gaussian", "poisson")  # a likelihood of the counts
    rng, mean, counts, _, _ = counts_case(seed=5, shape=(4, 16, 16))
    ints = rng.poisson(mean)  # integer dtype
    assert choose_loss("auto", lambda: ints).name == COUNTS_LOSS
    scaled = (counts * 3.7e4).astype(np.float32)  # counts times a gain, as float32
    choice = choose_loss("auto", lambda: scaled)
    assert choice.name == COUNTS_LOSS and "3.7e+04" in choice.reason
    assert intensity_quantum(scaled.astype(np.float64).ravel()) == pytest.approx(3.7e4, rel=1e-5)
    floats = (mean * 1e3).astype(np.float32)
    assert choose_loss("auto", lambda: floats).name == "smooth_l1"
    noisy = np.clip(counts + rng.normal(0, 0.3, counts.shape), 0, None)  # mixed noise
    assert choose_loss("auto", lambda: noisy).name == "smooth_l1"
    pedestal = choose_loss("auto", lambda: ints + 100)
    assert pedestal.name == "smooth_l1" and "dark level of 100" in pedestal.reason
    assert choose_loss("auto", lambda: counts - 2).name == "smooth_l1"  # negatives
    # a named loss is taken as named, without looking at the data
    explicit = choose_loss("smooth_l1", lambda: pytest.fail("sampled"))
    assert explicit.record() == {
        "loss": "smooth_l1",
        "requested": "smooth_l1",
        "reason": "train.loss = 'smooth_l1'",
    }


@pytest.mark.parametrize(
    ("noise", "expected"),
    [
        ("poisson", COUNTS_LOSS),
        ("counts", COUNTS_LOSS),
        ("clean", "smooth_l1"),
        ("mixed", "smooth_l1"),
    ],
)
def test_auto_on_simulated_scans(noise, expected):
    sim = simulate_scan(
        SimulationConfig(object_size=40, probe_size=16, focus_fwhm_px=3, overlap=0.3, noise=noise)
    )
    data = ScanData(np.asarray(sim["intensities"]), sim["positions_px"])
    assert choose_loss("auto", lambda: sample_frames(data)).name == expected


def test_sample_frames_keeps_a_stores_integer_counts_and_drops_bad_pixels(tmp_path):
    path = write_simulated_store(
        tmp_path / "s.zarr",
        SimulationConfig(
            object_size=40, probe_size=16, focus_fwhm_px=3, overlap=0.3, noise="counts"
        ),
    )
    frames = StoreFrames(str(path), "intensities")
    bad = np.zeros(frames.shape[1:], bool)
    bad[0, :5] = True
    positions = np.zeros((frames.shape[0], 2))
    sample = sample_frames(ScanData(frames, positions, bad_pixels=bad), count=4)
    assert np.issubdtype(sample.dtype, np.integer)
    assert sample.shape == (4, bad.size - 5)
    assert choose_loss("auto", lambda: sample).name == COUNTS_LOSS


# ------------------------------------------------------------------ fits


@pytest.fixture(scope="module")
def poisson_scan() -> dict:
    return simulate_scan(
        SimulationConfig(
            object_size=40, probe_size=16, focus_fwhm_px=3, overlap=0.3, noise="poisson", alpha=1e3
        )
    )


def object_error(result, sim: dict) -> float:
    truth = xr.DataArray(
        sim["object"],
        dims=("ty", "tx"),
        coords={"ty": np.arange(sim["object"].shape[0]), "tx": np.arange(sim["object"].shape[1])},
    )
    interior = evaluate.scanned_interior(
        result.geometry.object_shape, result.geometry.window_centres_on_grid()
    )
    return evaluate.compare_object(result.object, truth, mask=interior, remove_ramp=True)[
        "relative_error"
    ]


@pytest.mark.parametrize("loss", ["smooth_l1", "gaussian", "poisson"])
@pytest.mark.parametrize("method", ["pixels", "ptyinr"])
def test_a_fit_with_each_loss_reduces_the_error(poisson_scan, loss, method):
    data = ScanData(poisson_scan["intensities"], poisson_scan["positions_px"])
    overrides = [*TINY_MODEL, "train.device=cpu", f"model.method={method}", f"train.loss={loss}"]
    if method == "pixels":
        overrides += ["train.lr_object=1e-2", "train.lr_probe=1e-2"]
    start = object_error(
        build_engine(data, load_config(overrides=overrides)).result(), poisson_scan
    )
    epochs = 60 if method == "pixels" else 40
    result = fit(
        data, load_config(overrides=[*overrides, f"train.epochs={epochs}"]), progress=False
    )
    assert result.info["data_term"]["loss"] == loss
    assert np.all(np.isfinite(result.loss.values)) and np.all(result.loss.values >= 0)
    assert result.loss.values[-1] < result.loss.values[0]
    error = object_error(result, poisson_scan)
    print(f"{method} {loss}: object error {start:.3f} -> {error:.3f}")
    assert error < 0.8 * start


@pytest.mark.parametrize("method", ["ptyinr", "pixels", "epie"])
def test_every_engine_trains_and_reports_with_the_auto_choice(poisson_scan, method, monkeypatch):
    """The base chooses once; the step, the reported loss and the held-out loss all use it."""
    data = ScanData(poisson_scan["intensities"], poisson_scan["positions_px"])
    cfg = load_config(
        overrides=[
            *TINY_MODEL,
            "train.device=cpu",
            f"model.method={method}",
            "train.loss=auto",
            "train.epochs=2",
            "train.validation_fraction=0.1",
        ]
    )
    calls: list[int] = []
    original = get_loss(COUNTS_LOSS)

    def counted(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setitem(LOSSES, COUNTS_LOSS, counted)
    engine = build_engine(data, cfg)
    assert engine.loss_fn is counted
    result = engine.fit(progress=False)
    record = result.info["data_term"]
    assert record["loss"] == COUNTS_LOSS and record["requested"] == "auto"
    assert "photon counts" in record["reason"]
    assert len(calls) >= 4  # two epochs of training plus two held-out evaluations
    assert len(result.info["validation"]["loss"]) == 2
