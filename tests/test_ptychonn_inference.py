"""Fast PtychoNN inference (ptyinr.ptychonn_inference): the prepared network computes what the
plain eval-mode network computes, on a tiny network whose BatchNorm layers carry non-trivial
running statistics and affine parameters (so a wrong fold would show), on random input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ptyinr import ptychonn_inference
from ptyinr.models.ptychonn import PtychoNN, PtychoNNSpec
from ptyinr.ptychonn_inference import (
    TOLERANCE,
    depthwise_single_outputs,
    for_inference,
    fuse_batchnorm,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: float32: the fold only changes the order of a few multiplications and additions
FLOAT32_TOLERANCE = 1e-5


def tiny_network(seed: int = 0) -> PtychoNN:
    """16 x 16 frames, input cropped to 8 x 8 (so the final bilinear resize runs too), 4
    channels, 2 levels, in eval mode. Its BatchNorm running statistics are those of random
    inputs (as training leaves them: activations stay alive through the layers), then moved
    off them at random, with weights != 1 and biases != 0, so every term of the fold counts."""
    torch.manual_seed(seed)
    net = PtychoNN(PtychoNNSpec(frame_shape=(16, 16), input_size=8, channels=4, depth=2))
    norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    for module in norms:
        module.momentum = None  # cumulative average over the calibration batches
    net.train()
    with torch.no_grad():
        for k in range(4):
            net(inputs(32, seed=100 + k))
        for module in norms:
            module.running_mean.add_(
                0.3 * module.running_var.sqrt() * torch.randn(module.num_features)
            )
            module.running_var.mul_(torch.empty(module.num_features).uniform_(0.5, 2.0))
            module.weight.uniform_(0.5, 2.0)
            module.bias.normal_(0.0, 0.3)
    return net.eval()


def inputs(n: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand((n, 1, 8, 8), generator=generator) * 2.0


def plain(net: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return net(x)


def max_difference(got, want) -> float:
    return max(float((g - w).abs().max()) for g, w in zip(got, want, strict=True))


def test_statistics_matter() -> None:
    """The test network is sensitive to every BatchNorm's statistics: 10 % on one running
    variance (of the encoder's, the amplitude's or the phase's last BatchNorm) changes the
    output far beyond the tolerance, so a wrong fold would fail the comparisons below."""
    x = inputs(6)
    want = plain(tiny_network(), x)
    for part in ("encoder", "amplitude", "phase"):
        net = tiny_network()
        norm = [m for m in getattr(net, part).modules() if isinstance(m, nn.BatchNorm2d)][-1]
        with torch.no_grad():
            norm.running_var.mul_(1.1)
        assert max_difference(plain(net, x), want) > 100 * FLOAT32_TOLERANCE, part


def test_fuse_batchnorm_folds_every_pair_and_leaves_the_original() -> None:
    net = tiny_network()
    x = inputs(6)
    before = plain(net, x)
    fused = fuse_batchnorm(net)
    kinds = [type(m) for m in fused.modules()]
    assert nn.BatchNorm2d not in kinds
    assert kinds.count(nn.Conv2d) == sum(isinstance(m, nn.Conv2d) for m in net.modules())
    assert max_difference(plain(fused, x), before) < FLOAT32_TOLERANCE
    # the caller's network is untouched (its BatchNorms are still there and still apply)
    assert any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    assert max_difference(plain(net, x), before) == 0.0


def test_depthwise_last_layer_is_the_same_convolution() -> None:
    """In float32 (no bf16 rounding to hide behind) the depthwise-and-sum form of the
    one-output-channel convolutions gives the plain network's outputs."""
    net = tiny_network()
    x = inputs(6)
    rewritten = depthwise_single_outputs(fuse_batchnorm(net))
    single = [m for m in rewritten.modules() if isinstance(m, nn.Conv2d) and m.out_channels == 1]
    assert not single  # both decoders' last layers were replaced
    assert max_difference(plain(rewritten, x), plain(net, x)) < FLOAT32_TOLERANCE


def test_float32_matches_the_plain_network() -> None:
    net = tiny_network()
    x = inputs(10)
    predict = for_inference(net, "cpu", x[:4])
    amplitude, phase = predict(x)
    want = plain(net, x)
    assert amplitude.shape == phase.shape == (10, 16, 16)
    assert amplitude.dtype == phase.dtype == torch.float32
    assert amplitude.is_contiguous() and phase.is_contiguous()
    assert max_difference((amplitude, phase), want) < FLOAT32_TOLERANCE
    # blocks of any size (a scan's last block is shorter)
    assert max_difference(predict(x[:3]), plain(net, x[:3])) < FLOAT32_TOLERANCE


def test_bfloat16_is_close_but_rounded() -> None:
    net = tiny_network()
    x = inputs(10)
    amplitude, phase = for_inference(net, "cpu", x, precision="bfloat16")(x)
    assert amplitude.dtype == torch.float32
    difference = max_difference((amplitude, phase), plain(net, x))
    assert 0.0 < difference < TOLERANCE["bfloat16"]


def test_without_example_the_first_call_checks() -> None:
    net = tiny_network()
    x = inputs(7)
    predict = for_inference(net, "cpu")
    assert max_difference(predict(x[:5]), plain(net, x[:5])) < FLOAT32_TOLERANCE
    assert max_difference(predict(x[5:]), plain(net, x[5:])) < FLOAT32_TOLERANCE


def test_a_wrong_preparation_falls_back_to_the_plain_network(monkeypatch, capsys) -> None:
    """A prepared network that differs beyond tolerance is not used: the plain one is, and
    stderr says so."""

    def broken(network: nn.Module) -> nn.Module:
        fused = fuse_batchnorm(network)
        with torch.no_grad():
            [m for m in fused.modules() if isinstance(m, nn.Conv2d)][-1].bias.add_(0.5)
        return fused

    monkeypatch.setattr(ptychonn_inference, "fuse_batchnorm", broken)
    net = tiny_network()
    x = inputs(6)
    predict = for_inference(net, "cpu", x)
    assert "using the plain one" in capsys.readouterr().err
    assert max_difference(predict(x), plain(net, x)) == 0.0


def test_unknown_precision_is_refused() -> None:
    with pytest.raises(ValueError, match="precision = 'float16'"):
        for_inference(tiny_network(), "cpu", inputs(2), precision="float16")  # type: ignore[arg-type]
