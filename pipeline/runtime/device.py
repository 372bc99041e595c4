"""The device a run computes on, and the process-wide settings that go with it (threads, the
CPU heap policy, TF32). Applied once per run by `ptyinr.runtime.resolve_runtime`."""

from __future__ import annotations

import ctypes

import torch

from ptyinr.errors import InputError


def select_device(name: str) -> torch.device:
    """train.device resolved: auto = CUDA when torch sees a device, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' requested but torch sees no CUDA device; use --device cpu")
    return torch.device(name)


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def bound_cpu_heap(threshold_bytes: int = 1 << 20) -> bool:
    """Serve allocations above `threshold_bytes` with mmap, returned to the system on free.

    glibc raises its mmap threshold dynamically (up to 32 MiB) once a large block is freed;
    from then on medium-sized tensors live in heaps that fragment across the autograd and
    main threads and hold up to ~2x the live tensor bytes. A fixed threshold keeps the
    process's RSS at the live bytes the memory plan counts; page faults on the fresh pages
    cost little next to the GEMMs that fill them. No-op (False) without glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(threshold_bytes)))
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        return False
