"""Precision and compilation of the object networks, each switchable (config.PerformanceConfig)
and measured in benchmarks/bench_scale.py and benchmarks/bench_precision.py: bfloat16 hidden
layers, torch.compile (TF32 is set process-wide by ptyinr.runtime.resolve_runtime)."""

from __future__ import annotations

import functools
from typing import Any

import torch

from ptyinr.config import ReconstructionConfig
from ptyinr.models.siren import Siren


def _to_float32(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
    """Forward hook: a network's output back to float32 (amplitude/phase maths stay fp32)."""
    return output.float()


def native_bf16(device: torch.device, cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this device multiplies bfloat16 natively (so bf16 GEMMs pay off): Ampere or
    newer GPUs; CPUs with AMX (oneDNN's bf16 path; without AMX it emulates, no faster)."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type == "cpu":
        return _cpu_has_amx_bf16(cpuinfo)
    return False


@functools.cache
def _cpu_has_amx_bf16(cpuinfo: str) -> bool:
    """Read once per process: the memory plan asks for every candidate layout it tries."""
    try:
        with open(cpuinfo) as fh:
            return any(line.startswith("flags") and " amx_bf16" in line for line in fh)
    except OSError:
        return False


# narrower SIRENs' GEMMs are too small for bfloat16 to pay: mini-batch steps at width 64 / 128 / 256
# took 1.12x / 0.93x / 0.65x the float32 step on this project's AMX CPU (0.39x at 512)
AUTO_BF16_MIN_WIDTH = 256


def resolve_precision(
    config: ReconstructionConfig, device: torch.device, n_positions: int | None = None
) -> str:
    """performance.precision with `auto` decided: "bf16" where all of these hold, else
    "fp32" (each measured: benchmarks/RESULTS.md, "Precision" and "Scale and speed"):

    - the device multiplies bfloat16 natively (emulated bf16 is no faster);
    - the object networks are SIRENs at least AUTO_BF16_MIN_WIDTH wide;
    - the run takes mini-batches (0 < batch_size < positions; `n_positions` None: any
      batch_size > 0 or auto counts): mini-batch gradient noise is far above bfloat16's rounding,
      and the loss floors match float32's, while full-batch fits near their floor reach a
      lower loss in float32.
    """
    performance = config.performance
    if performance.precision != "auto":
        return performance.precision
    if n_positions is None:
        batch = config.train.batch_size
        mini_batch = batch == "auto" or int(batch) > 0
    else:
        mini_batch = config.train.batch_size_for(n_positions) > 0
    wide_siren = config.model.object == "siren" and config.model.siren_width >= AUTO_BF16_MIN_WIDTH
    return "bf16" if mini_batch and wide_siren and native_bf16(device) else "fp32"


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
    field: torch.nn.Module, precision: str, compile_networks: bool = False
) -> torch.dtype | None:
    """Apply the switchable fast paths to an object field; returns the autocast dtype that
    `tiles.sample_object` must apply around the networks, or None.

    - precision (already resolved: resolve_precision): see set_object_precision (state_dict
      keys are unchanged, so checkpoints are interchangeable between precisions);
    - compile: `nn.Module.compile` of each object network in place (state_dict unchanged).
    """
    nets = _object_nets(field)
    autocast_dtype = set_object_precision(field, precision)
    if compile_networks and nets:
        for net in nets:
            net.compile(dynamic=True)
    return autocast_dtype
