"""An engine's state saved as a Zarr group and read back without pickle.

A checkpoint of a run in a scan store is the group `checkpoints/<run_id>/<part>` of the store
(a node of the store's own hierarchy, so Zarr sees no foreign folder): each tensor of the state
is one array (`t0`, `t1`, ...), and the state's structure (nested dicts and lists, numbers,
strings, where each tensor goes) is JSON in the group's attributes. Reading it back creates
tensors and plain Python values only; nothing in a checkpoint is ever executed, so a file
planted in a shared store can at worst be refused. A checkpoint is written under a temporary
name beside its final one and swapped in whole, so a killed process leaves the previous
checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from ptyinr.errors import InputError

FORMAT = "ptyinr-checkpoint/1"
_TENSOR = "__tensor__"  # {"__tensor__": "t3", "dtype": "float32"}
_PAIRS = "__pairs__"  # a dict with keys that are not strings: [[key, value], ...]
_TUPLE = "__tuple__"


class UnreadableCheckpoint(InputError):
    """A checkpoint that is not ours, or is truncated: the run starts over instead."""


def save_state(path: str | Path, state: dict[str, Any]) -> None:
    """Write `state` (dicts, lists, tuples, tensors, numbers, strings, None) as a Zarr group
    at `path`, replacing any previous one whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _ensure_parent_groups(path)
    tmp = path.with_name(f"tmp-{path.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tensors: list[torch.Tensor] = []
    tree = _encode(state, tensors)
    group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
    for i, tensor in enumerate(tensors):
        values = tensor.detach().cpu()
        if values.dtype == torch.bfloat16:
            values = values.float()  # numpy has no bfloat16; the tree records the dtype
        array = values.numpy()
        group.create_array(f"t{i}", shape=array.shape, dtype=array.dtype, fill_value=0)[...] = array
    group.attrs.update({"format": FORMAT, "tree": tree})
    old = path.with_name(f"old-{path.name}-{os.getpid()}")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def load_state(path: str | Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """The state saved at `path` (UnreadableCheckpoint naming it when it is not a complete
    ptyinr checkpoint)."""
    path = Path(path)
    try:
        group = zarr.open_group(str(path), mode="r")
        attrs = dict(group.attrs)
        if attrs.get("format") != FORMAT:
            raise ValueError(f"format {attrs.get('format')!r}, expected {FORMAT!r}")
        arrays = {name: np.asarray(group[name][...]) for name in _tensor_names(attrs["tree"])}
        state = _decode(attrs["tree"], arrays, torch.device(device))
    except UnreadableCheckpoint:
        raise
    except Exception as exc:  # truncated, foreign, missing arrays, not Zarr at all
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise UnreadableCheckpoint(
            f"checkpoint {str(path)!r}: not a readable ptyinr checkpoint ({reason})"
        ) from None
    if not isinstance(state, dict):
        raise UnreadableCheckpoint(f"checkpoint {str(path)!r}: not a ptyinr checkpoint")
    return state


def read_counters(path: str | Path) -> dict[str, Any]:
    """The checkpoint's numbers and strings (epoch, step, engine, ...) without its arrays."""
    try:
        tree = dict(zarr.open_group(str(path), mode="r").attrs)["tree"]
        return {k: v for k, v in tree.items() if not isinstance(v, dict | list)}
    except Exception as exc:
        raise UnreadableCheckpoint(f"checkpoint {str(path)!r}: unreadable ({exc})") from None


def exists(path: str | Path) -> bool:
    """Whether something is saved at `path` (readable or not)."""
    return Path(path).exists()


# --------------------------------------------------------------------------------- encoding


def _encode(value: Any, tensors: list[torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        tensors.append(value)
        return {_TENSOR: f"t{len(tensors) - 1}", "dtype": str(value.dtype).removeprefix("torch.")}
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: _encode(v, tensors) for k, v in value.items()}
        return {_PAIRS: [[_encode(k, tensors), _encode(v, tensors)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {_TUPLE: [_encode(v, tensors) for v in value]}
    if isinstance(value, list):
        return [_encode(v, tensors) for v in value]
    if isinstance(value, bool | int | str) or value is None:
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            return {"__float__": repr(value)}
        return value
    if isinstance(value, np.generic):
        return _encode(value.item(), tensors)
    raise TypeError(f"checkpoint state: cannot save a {type(value).__name__}")


def _decode(value: Any, arrays: dict[str, np.ndarray], device: torch.device) -> Any:
    if isinstance(value, list):
        return [_decode(v, arrays, device) for v in value]
    if not isinstance(value, dict):
        return value
    if _TENSOR in value:
        dtype = getattr(torch, str(value["dtype"]))
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"tensor dtype {value['dtype']!r}")
        return torch.from_numpy(arrays[value[_TENSOR]].copy()).to(device=device, dtype=dtype)
    if _PAIRS in value:
        return {_decode(k, arrays, device): _decode(v, arrays, device) for k, v in value[_PAIRS]}
    if _TUPLE in value:
        return tuple(_decode(v, arrays, device) for v in value[_TUPLE])
    if "__float__" in value:
        return float(value["__float__"])
    return {k: _decode(v, arrays, device) for k, v in value.items()}


def _tensor_names(tree: Any) -> list[str]:
    found: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, list):
            for v in value:
                walk(v)
        elif isinstance(value, dict):
            if _TENSOR in value:
                found.append(str(value[_TENSOR]))
                return
            for v in value.values():
                walk(v)

    walk(tree)
    return found


def _ensure_parent_groups(path: Path, depth: int = 3) -> None:
    """Inside a Zarr store (an ancestor within `depth` levels holds zarr.json), make the
    folders between it and `path` Zarr groups, so the checkpoint is a node of the store."""
    between = []
    for parent in path.parents[:depth]:
        if (parent / "zarr.json").is_file():
            for folder in reversed(between):
                if not (folder / "zarr.json").is_file():
                    zarr.open_group(str(folder), mode="a", zarr_format=3)
            return
        between.append(parent)
