"""SIREN: sine-activated MLP for coordinate -> value (Sitzmann et al. 2020).

Initialisation follows the paper: first layer weights U(-1/fan_in, 1/fan_in), later layers
U(-sqrt(6/fan_in)/omega, sqrt(6/fan_in)/omega), so the pre-activations stay ~ U(-pi/2.. ) and
the network represents high frequencies from the first step.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn import functional


class SineLayer(nn.Module):
    """y = sin(omega * (W x + b))."""

    def __init__(self, fan_in: int, fan_out: int, omega: float, is_first: bool) -> None:
        super().__init__()
        self.omega = float(omega)
        self.linear = nn.Linear(fan_in, fan_out)
        bound = 1.0 / fan_in if is_first else math.sqrt(6.0 / fan_in) / self.omega
        with torch.no_grad():
            self.linear.weight.uniform_(-bound, bound)
            self.linear.bias.uniform_(-1.0 / math.sqrt(fan_in), 1.0 / math.sqrt(fan_in))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # omega folded into the (small) weight and bias instead of scaling the (large)
        # activation: the same function and the same parameters and gradients, one
        # element-wise pass fewer forward and backward (~5-10 % of a step, measured)
        linear = self.linear
        return torch.sin(functional.linear(x, linear.weight * self.omega, linear.bias * self.omega))


class Siren(nn.Module):
    """Coordinates (..., in_features) -> (..., out_features) through `hidden_layers` sine layers.

    `hidden_layers` counts the width x width layers after the first sine layer, so the paper's
    "3 hidden layers of 512" is Siren(2, 1, width=512, hidden_layers=3).
    """

    def __init__(
        self,
        in_features: int = 2,
        out_features: int = 1,
        width: int = 512,
        hidden_layers: int = 3,
        first_omega: float = 30.0,
        hidden_omega: float = 30.0,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [SineLayer(in_features, width, first_omega, is_first=True)]
        layers += [
            SineLayer(width, width, hidden_omega, is_first=False) for _ in range(hidden_layers)
        ]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, out_features)
        bound = math.sqrt(6.0 / width) / hidden_omega
        with torch.no_grad():
            self.head.weight.uniform_(-bound, bound)
            self.head.bias.zero_()

        # set by ptyinr.runtime.precision.set_object_precision: bfloat16 hidden layers (bf16), or
        # a float32 forward pass with bfloat16 backward GEMMs (bf16-backward)
        self.hidden_dtype: torch.dtype | None = None
        self.grad_dtype: torch.dtype | None = None

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        if self.hidden_dtype is None:
            if self.grad_dtype is not None and torch.is_grad_enabled():
                return self._forward_reduced_backward(coords)
            return self.head(self.body(coords))
        # Mixed precision: only the width x width layers (all of the FLOPs) run in
        # hidden_dtype. The first layer stays float32 because omega * (W x) reaches ~15 rad,
        # where bfloat16's 8-bit mantissa would blur the coordinate encoding by ~0.06 rad;
        # the head stays float32 so amplitude and phase keep float32 resolution.
        first, *hidden = self.body
        x = first(coords.float())
        with torch.autocast(x.device.type, dtype=self.hidden_dtype):
            for layer in hidden:
                x = layer(x)
        return self.head(x.float())

    def _forward_reduced_backward(self, coords: torch.Tensor) -> torch.Tensor:
        params: list[torch.Tensor] = []
        omegas = []
        for layer in self.body:
            params += [layer.linear.weight, layer.linear.bias]
            omegas.append(layer.omega)
        params += [self.head.weight, self.head.bias]
        return _SirenReducedBackward.apply(coords.float(), tuple(omegas), self.grad_dtype, *params)


class _SirenReducedBackward(torch.autograd.Function):
    """A whole SIREN with a float32 forward pass and `grad_dtype` GEMMs in the backward pass.

    Why: the backward pass holds two of each layer's three GEMMs, which run several times
    faster in bfloat16 where it is native, while the forward pass, and so the function the
    networks represent, stays float32 bit for bit (same ops, same order as Siren.body/head).
    The price is ~4e-3 relative rounding noise in the gradients. That is far below
    mini-batch noise, but near convergence of a full-batch fit the true gradient cancels
    while the rounding noise does not, so the loss floor rises too (measured:
    benchmarks/RESULTS.md, "Precision"); hence a switch, not the default.

    Saved per hidden layer, in `grad_dtype`: its input (for the weight gradient) and the
    cosine of its pre-activation (the sine's derivative). The first layer (coordinate input,
    omega * W x reaches ~15 rad) keeps its cosine in float32.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        coords: torch.Tensor,
        omegas: tuple[float, ...],
        grad_dtype: torch.dtype,
        *params: torch.Tensor,
    ) -> torch.Tensor:
        x = coords
        inputs = [coords]
        cosines = []
        weights = []
        for i, omega in enumerate(omegas):
            scaled = params[2 * i] * omega
            z = torch.addmm(params[2 * i + 1] * omega, x, scaled.t())
            if i:
                weights.append(scaled.to(grad_dtype))
                cosines.append(torch.cos(z, out=torch.empty_like(z, dtype=grad_dtype)))
            else:
                cosines.append(torch.cos(z))
            x = z.sin_()  # in place: the pre-activation is not needed again
            inputs.append(x.to(grad_dtype))
        head_weight, head_bias = params[-2], params[-1]
        out = torch.addmm(head_bias, x, head_weight.t())
        ctx.omegas = omegas
        ctx.consumed = False
        ctx.save_for_backward(*inputs, *cosines, *weights, head_weight.to(grad_dtype))
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if ctx.consumed:  # the cosines were turned into gradients in place the first time
            raise RuntimeError("a bf16-backward SIREN graph can be backpropagated only once")
        ctx.consumed = True
        omegas = ctx.omegas
        n = len(omegas)
        saved = ctx.saved_tensors
        inputs, cosines = saved[: n + 1], saved[n + 1 : 2 * n + 1]
        weights, head_weight = saved[2 * n + 1 : 3 * n], saved[-1]
        grad_dtype = head_weight.dtype
        grad_out_reduced = grad_out.to(grad_dtype)
        grads: list[torch.Tensor | None] = [None] * (2 * n + 2)
        grads[-2] = _weight_grad(grad_out_reduced, inputs[-1])
        grads[-1] = grad_out.sum(0)
        grad_x = torch.mm(grad_out_reduced, head_weight)
        for i in reversed(range(n)):
            # dL/dz = dL/dx * cos(z), in place of the cosines (each is used once)
            grad_z = cosines[i].mul_(grad_x)
            grads[2 * i + 1] = grad_z.sum(0, dtype=torch.float32).mul_(omegas[i])
            if i == 0:
                grads[0] = torch.mm(grad_z.t(), inputs[0]).mul_(omegas[0])
            else:
                grads[2 * i] = _weight_grad(grad_z, inputs[i]).mul_(omegas[i])
                grad_x = torch.mm(grad_z, weights[i - 1])
        return (None, None, None, *grads)


def _weight_grad(grad_z: torch.Tensor, layer_input: torch.Tensor) -> torch.Tensor:
    """grad_z^T @ input as a float32 (out, in) matrix."""
    return torch.mm(grad_z.t(), layer_input).float()
