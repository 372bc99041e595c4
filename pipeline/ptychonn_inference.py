"""PtychoNN inference made fast on the CPU without changing what the network computes.

A preview runs a trained PtychoNN (ptyinr.models.ptychonn) once over every frame of a scan;
in eval mode its BatchNorm layers are fixed affine maps. `for_inference` prepares a copy of the
network for that, once, after loading:

- every Conv2d followed by a BatchNorm2d is folded into one Conv2d (the BatchNorm's scale in
  the weights, its shift in the bias: `torch.nn.utils.fusion.fuse_conv_bn_eval`), which removes
  a full pass over every activation per layer;
- weights and input are in the channels-last memory format, which oneDNN's convolutions,
  ReLU and bilinear upsampling take without reordering each layer's activations;
- it runs under `torch.inference_mode` (no autograd bookkeeping);
- optionally (`precision="bfloat16"`) weights and activations are bfloat16 (oneDNN's bf16
  convolutions, on CPUs with native bf16 instructions: AVX512-BF16 / AMX; `bf16_supported`);
  outputs are float32 again. Whole-network bf16 rather than autocast (measured as fast, with
  the same outputs), so that the last convolution (one output channel) can run as a
  depthwise convolution summed over the channels (`_DepthwiseSum`): the same sum in another
  order, ~2.5x faster than oneDNN's bf16 convolution of one output channel.

Why not torch.jit or torch.compile: torch.jit is deprecated in the torch this project uses
(and trace + freeze was no faster), torch.compile took 147 s to compile (a preview's
inference takes under a second) for no faster steady state; both measured in
benchmarks/bench_ptychonn_inference.py.

The prepared network is checked once against the plain one, on the first frames of its first
call (max abs difference of amplitude and phase); where it differs beyond the tolerance of its
precision the plain network is used instead, with one line on stderr, so a preview is never
wrong for speed.
"""

from __future__ import annotations

import copy
import itertools
import sys
from collections.abc import Callable
from typing import Literal

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

Precision = Literal["float32", "bfloat16"]
Predictor = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

#: max abs difference (amplitude units and radians) accepted against the plain network:
#: float32 differs by summation order only; bfloat16 keeps 8 bits of mantissa per layer
TOLERANCE: dict[str, float] = {"float32": 1e-3, "bfloat16": 0.15}
#: frames the plain network predicts once to check the prepared one (4096 values each of
#: amplitude and phase at 32 x 32): few, as a preview is one pass and the plain network is
#: ~4x slower per frame
CHECK_FRAMES = 2


def fuse_batchnorm(network: nn.Module) -> nn.Module:
    """A copy of `network` in eval mode with each Conv2d directly followed by a BatchNorm2d
    (inside an nn.Sequential) folded into one Conv2d; the BatchNorm becomes nn.Identity.
    The same function (eval-mode BatchNorm is affine), one pass over the activations less."""
    fused = copy.deepcopy(network).eval()
    for module in fused.modules():
        if not isinstance(module, nn.Sequential):
            continue
        names = list(module._modules)
        for first, second in itertools.pairwise(names):
            conv, norm = module._modules[first], module._modules[second]
            if (
                isinstance(conv, nn.Conv2d)
                and isinstance(norm, nn.BatchNorm2d)
                and norm.track_running_stats
                and norm.running_mean is not None
            ):
                module._modules[first] = fuse_conv_bn_eval(conv, norm)
                module._modules[second] = nn.Identity()
    return fused


class _DepthwiseSum(nn.Module):
    """A Conv2d with one output channel, as a depthwise convolution summed over the channels
    (the same sum of products, in another order). oneDNN pads a convolution's output channels
    to a full vector, so one output channel costs as much as 16: PtychoNN's last layer (32 -> 1
    at the full 32 x 32) was a fifth of the network's time; in bfloat16 this form of it is
    ~2.5x faster (in float32 it is not: it is used for bfloat16 only)."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        channels = conv.in_channels
        self.depthwise = nn.Conv2d(
            channels,
            channels,
            conv.kernel_size,  # type: ignore[arg-type]
            stride=conv.stride,  # type: ignore[arg-type]
            padding=conv.padding,  # type: ignore[arg-type]
            dilation=conv.dilation,  # type: ignore[arg-type]
            groups=channels,
            bias=False,
            padding_mode=conv.padding_mode,
        )
        with torch.no_grad():
            self.depthwise.weight.copy_(conv.weight.reshape(self.depthwise.weight.shape))
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.depthwise(x).sum(1, keepdim=True)
        return y if self.bias is None else y + self.bias.view(1, -1, 1, 1)


def depthwise_single_outputs(network: nn.Module) -> nn.Module:
    """`network` (changed in place and returned) with every Conv2d of one output channel
    inside an nn.Sequential replaced by the equivalent `_DepthwiseSum`."""
    for module in network.modules():
        if not isinstance(module, nn.Sequential):
            continue
        for name, child in module._modules.items():
            if isinstance(child, nn.Conv2d) and child.out_channels == 1 and child.groups == 1:
                module._modules[name] = _DepthwiseSum(child)
    return network


def bf16_supported() -> bool:
    """Whether this CPU has native bfloat16 instructions (oneDNN's avx512_core_bf16 or AMX);
    elsewhere bf16 would be emulated and slower than float32."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX512", "AMX"):
        return False
    try:
        with open("/proc/cpuinfo") as fh:
            flags = fh.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _predictor(network: nn.Module, device: torch.device, dtype: torch.dtype) -> Predictor:
    channels_last = device.type == "cpu"

    def predict(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.to(device, dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            amplitude, phase = network(x)
        return amplitude.float().contiguous(), phase.float().contiguous()

    return predict


def for_inference(
    network: nn.Module,
    device: torch.device | str,
    example: torch.Tensor | None = None,
    *,
    precision: Precision = "float32",
) -> Predictor:
    """A function (B, 1, n, n) network input -> (amplitude, phase), each (B, Ny, Nx) float32,
    computing what `network` computes in eval mode (it is put in eval mode, not otherwise
    changed), faster (see the module docstring).

    `example`: real network inputs, run once to warm the prepared network up (oneDNN builds
    its kernels on a shape's first call) and to check it against the plain one on their
    first CHECK_FRAMES; beyond TOLERANCE[precision] the plain network is used instead (one
    line on stderr). None: the first call's input serves, its outputs reused (a preview is
    one pass: warming up on other frames would cost as much as it saves)."""
    device = torch.device(device)
    if precision not in TOLERANCE:
        raise ValueError(f"precision = {precision!r}: expected one of {sorted(TOLERANCE)}")
    plain = network.eval()
    dtype = torch.bfloat16 if precision == "bfloat16" else torch.float32
    fused = fuse_batchnorm(network)
    if precision == "bfloat16":
        fused = depthwise_single_outputs(fused)
    fused = fused.to(device, dtype)
    if device.type == "cpu":
        fused = fused.to(memory_format=torch.channels_last)
    fast = _predictor(fused, device, dtype)
    reference = _predictor(plain, device, torch.float32)
    chosen: list[Predictor] = []

    def first_checks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if chosen:
            return chosen[0](x)
        out = fast(x)
        if _matches(out, reference, x, precision):
            chosen.append(fast)
            return out
        chosen.append(reference)
        return reference(x)

    if example is not None:
        first_checks(example)
    return first_checks


def _matches(
    out: tuple[torch.Tensor, torch.Tensor],
    reference: Predictor,
    x: torch.Tensor,
    precision: Precision,
) -> bool:
    """Whether the prepared network's outputs `out` for `x` match the plain network's on the
    first CHECK_FRAMES frames (one line on stderr when not)."""
    k = min(len(x), CHECK_FRAMES)
    want = reference(x[:k])
    difference = max(float((o[:k] - w).abs().max()) for o, w in zip(out, want, strict=True))
    if difference <= TOLERANCE[precision]:
        return True
    print(
        f"ptychonn inference: the prepared network differs from the plain one by "
        f"{difference:.3g} (> {TOLERANCE[precision]:g}, {precision}); using the plain one",
        file=sys.stderr,
    )
    return False
