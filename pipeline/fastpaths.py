"""Fast paths for the object networks, each switchable (config.PerformanceConfig) and
measured in benchmarks/bench_scale.py and benchmarks/bench_precision.py: TF32 matmuls,
bfloat16 hidden layers, torch.compile."""

from __future__ import annotations

from typing import Any

import torch

from pipeline.config import PerformanceConfig
from pipeline.models.siren import Siren


def _to_float32(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
    """Forward hook: a network's output back to float32 (amplitude/phase maths stay fp32)."""
    return output.float()


def native_bf16(device: torch.device, cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this device multiplies bfloat16 natively (so bf16 GEMMs pay off): Ampere or
    newer GPUs; CPUs with AMX (oneDNN's bf16 path; without AMX it emulates, no faster)."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type == "cpu":
        try:
            with open(cpuinfo) as fh:
                return any(line.startswith("flags") and " amx_bf16" in line for line in fh)
        except OSError:
            return False
    return False


def resolve_precision(performance: PerformanceConfig, device: torch.device) -> str:
    """performance.precision with `auto` decided for this device: "bf16" or "fp32"."""
    if performance.precision != "auto":
        return performance.precision
    return "bf16" if native_bf16(device) else "fp32"


def _object_nets(field: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for name in ("amplitude_net", "phase_net") if (m := getattr(field, name, None))]


def set_object_precision(field: torch.nn.Module, precision: str) -> torch.dtype | None:
    """Switch an object field's networks to "fp32", "bf16-backward" or "bf16" (also mid-run:
    no state changes, only how the next passes compute). Returns the autocast dtype that
    `memory.sample_object` must apply around non-SIREN networks, or None.

    SIRENs run their hidden layers in bfloat16 themselves (first layer and head stay
    float32), or only their backward GEMMs (models.siren); other networks run whole under
    autocast for bf16, their outputs cast back to float32 by a forward hook, and in float32
    for bf16-backward (their GEMMs are a small part of a step)."""
    dtype = torch.bfloat16 if precision == "bf16" else None
    grad_dtype = torch.bfloat16 if precision == "bf16-backward" else None
    autocast_dtype = None
    for net in _object_nets(field):
        if isinstance(net, Siren):
            net.hidden_dtype = dtype
            net.grad_dtype = grad_dtype
        elif dtype is not None:
            autocast_dtype = dtype
            if not getattr(net, "_ptyinr_float32_hook", False):
                net.register_forward_hook(_to_float32)
                net._ptyinr_float32_hook = True
    return autocast_dtype


def prepare_object_field(
    field: torch.nn.Module, performance: PerformanceConfig, device: torch.device
) -> torch.dtype | None:
    """Apply the switchable fast paths to an object field; returns the autocast dtype that
    `sample_object` must apply around the networks, or None.

    - tf32: TF32 matmuls for the whole process (CUDA only; a no-op on CPU);
    - precision: see set_object_precision (state_dict keys are unchanged, so checkpoints are
      interchangeable between precisions);
    - compile: `nn.Module.compile` of each object network in place (state_dict unchanged).
    """
    if performance.tf32 and device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    nets = _object_nets(field)
    autocast_dtype = set_object_precision(field, resolve_precision(performance, device))
    if performance.compile and nets:
        for net in nets:
            net.compile(dynamic=True)
    return autocast_dtype
