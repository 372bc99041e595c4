"""Multiresolution hash-grid encoding (Instant-NGP, Müller et al. 2022) in plain PyTorch.

Runs on any device. Level l has a grid of N_l = floor(base * scale**l) cells per axis
((N_l + 1)**2 vertices). A level whose vertices fit the table is indexed densely
(iy * (N_l + 1) + ix); finer levels use Instant-NGP's spatial hash
(ix * 1) XOR (iy * 2654435761) mod T. Features at the 4 cell corners are blended bilinearly
and the levels concatenated. All levels share one parameter tensor, so a batch of
coordinates costs one gather, not one per level.

Coordinates that never change (a probe's pixel grid) need their corner rows and bilinear
weights only once: `HashGridEncoding.fixed(coords)` precomputes them, and a forward pass is
then one fused gather-and-blend of the table (`FixedCoordinates`), and so is its backward
pass, over the same pairs sorted by table row (measured in benchmarks/bench_warm_start.py).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn import functional

HASH_PRIMES = (1, 2654435761)


def level_resolutions(levels: int, base_resolution: int, per_level_scale: float) -> list[int]:
    """Cells per axis of each level: floor(base * scale**l)."""
    return [math.floor(base_resolution * per_level_scale**level) for level in range(levels)]


class HashGridEncoding(nn.Module):
    """(K, 2) coordinates in [0, 1] -> (K, levels * features) encoding."""

    def __init__(
        self,
        levels: int = 16,
        features: int = 2,
        log2_table_size: int = 15,
        base_resolution: int = 16,
        per_level_scale: float = 1.5,
    ) -> None:
        super().__init__()
        self.levels = levels
        self.features = features
        self.table_size = 2**log2_table_size
        resolutions = level_resolutions(levels, base_resolution, per_level_scale)
        sizes = [min((r + 1) ** 2, self.table_size) for r in resolutions]
        offsets = [0]
        for size in sizes[:-1]:
            offsets.append(offsets[-1] + size)
        self.register_buffer("resolution", torch.tensor(resolutions, dtype=torch.int64))
        self.register_buffer("level_size", torch.tensor(sizes, dtype=torch.int64))
        self.register_buffer("level_offset", torch.tensor(offsets, dtype=torch.int64))
        self.register_buffer(
            "dense", torch.tensor([(r + 1) ** 2 <= self.table_size for r in resolutions])
        )
        self.table = nn.Parameter(torch.empty(sum(sizes), features).uniform_(-1e-4, 1e-4))

    @property
    def output_dim(self) -> int:
        return self.levels * self.features

    def vertex_indices(self, vertices: torch.Tensor) -> torch.Tensor:
        """Row of `table` for integer vertices (..., levels, 2) -> (..., levels)."""
        iy, ix = vertices[..., 0], vertices[..., 1]
        dense_index = iy * (self.resolution + 1) + ix
        hashed_index = torch.bitwise_xor(ix * HASH_PRIMES[0], iy * HASH_PRIMES[1])
        hashed_index = torch.remainder(hashed_index, self.level_size)
        local = torch.where(self.dense, dense_index, hashed_index)
        return local + self.level_offset

    def corners(self, coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Table rows and bilinear weights of the 4 cell corners, (K, L, 4) each.

        Corner order (dy, dx) = (0, 0), (0, 1), (1, 0), (1, 1); the arithmetic is the
        forward pass's, so `fixed` reproduces it to float rounding."""
        scale = self.resolution.to(coords.dtype)  # (L,)
        position = coords[:, None, :] * scale[None, :, None]  # (K, L, 2)
        cell = torch.floor(position).long()
        cell = torch.minimum(cell.clamp_min(0), (self.resolution - 1)[None, :, None])
        frac = position - cell.to(coords.dtype)  # (K, L, 2) in [0, 1]
        rows, weights = [], []
        for dy in (0, 1):
            wy = frac[..., 0] if dy else 1.0 - frac[..., 0]
            for dx in (0, 1):
                wx = frac[..., 1] if dx else 1.0 - frac[..., 1]
                rows.append(self.vertex_indices(cell + torch.tensor([dy, dx], device=cell.device)))
                weights.append(wy * wx)
        return torch.stack(rows, dim=-1), torch.stack(weights, dim=-1)

    @torch.no_grad()
    def fixed(self, coords: torch.Tensor) -> FixedCoordinates:
        """The encoding of these coordinates as a function of the table alone (see
        `FixedCoordinates`): precomputed once, for coordinates that never change."""
        rows, weights = self.corners(coords.detach())
        return FixedCoordinates(rows, weights, self.levels, self.features, len(self.table))

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        scale = self.resolution.to(coords.dtype)  # (L,)
        position = coords[:, None, :] * scale[None, :, None]  # (K, L, 2)
        cell = torch.floor(position).long()
        cell = torch.minimum(cell.clamp_min(0), (self.resolution - 1)[None, :, None])
        frac = position - cell.to(coords.dtype)  # (K, L, 2) in [0, 1]
        out = 0.0
        for dy in (0, 1):
            wy = frac[..., 0] if dy else 1.0 - frac[..., 0]
            for dx in (0, 1):
                wx = frac[..., 1] if dx else 1.0 - frac[..., 1]
                corner = cell + torch.tensor([dy, dx], device=cell.device)
                rows = self.vertex_indices(corner)  # (K, L)
                out = out + (wy * wx)[..., None] * self.table[rows]  # (K, L, F)
        return out.reshape(coords.shape[0], self.output_dim)


class _BlendRows(torch.autograd.Function):
    """out[m] = sum_c weights[m, c] * table[rows[m, c]], differentiable in the table only.

    Both directions are weighted bag sums (`embedding_bag`): forward over each point's 4
    corners, backward over each table row's (point, weight) pairs, precomputed sorted by
    row (`FixedCoordinates`). On CPU that backward is ~3x faster than scattering with
    index_add_, which in turn beats index_put_ (accumulate) and embedding_dense_backward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, table: torch.Tensor, fixed: FixedCoordinates
    ) -> torch.Tensor:
        ctx.fixed = fixed
        ctx.table_shape = table.shape
        weights = fixed.weights.to(table.dtype)
        return functional.embedding_bag(fixed.rows, table, per_sample_weights=weights, mode="sum")

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx, grad: torch.Tensor
    ) -> tuple[torch.Tensor, None]:
        fixed: FixedCoordinates = ctx.fixed
        per_row = functional.embedding_bag(
            fixed.row_points,
            grad.contiguous(),
            fixed.row_offsets,
            mode="sum",
            per_sample_weights=fixed.row_weights.to(grad.dtype),
        )
        table_grad = grad.new_zeros(ctx.table_shape)
        table_grad.index_copy_(0, fixed.touched_rows, per_row)
        return table_grad, None


class FixedCoordinates(nn.Module):
    """A hash-grid encoding at fixed coordinates: table (rows, F) -> (K, levels * F).

    Holds, as non-persistent buffers (they follow `.to(device)` but stay out of state
    dicts), each point-level's 4 corner rows and bilinear weights and, for the backward
    pass, the same pairs sorted by table row; no parameters: call it with the table of any
    `HashGridEncoding` of the same layout. Build it with `HashGridEncoding.fixed`."""

    def __init__(
        self,
        rows: torch.Tensor,
        weights: torch.Tensor,
        levels: int,
        features: int,
        table_rows: int,
    ) -> None:
        super().__init__()
        self.points = int(rows.shape[0])
        self.levels = levels
        self.features = features
        self.table_rows = table_rows
        index = torch.int32 if table_rows < 2**31 and rows.numel() < 2**31 else torch.int64
        rows = rows.reshape(-1, 4)
        flat = rows.reshape(-1)
        order = torch.argsort(flat, stable=True)
        touched, counts = torch.unique_consecutive(flat[order], return_counts=True)
        self.register_buffer("rows", rows.to(index).contiguous(), persistent=False)
        self.register_buffer("weights", weights.reshape(-1, 4).contiguous(), persistent=False)
        # transposed: for each touched table row, its (point-level, weight) pairs
        self.register_buffer("touched_rows", touched, persistent=False)
        self.register_buffer("row_offsets", (counts.cumsum(0) - counts).to(index), persistent=False)
        self.register_buffer(
            "row_points", torch.div(order, 4, rounding_mode="floor").to(index), persistent=False
        )
        self.register_buffer("row_weights", weights.reshape(-1)[order], persistent=False)

    @property
    def output_dim(self) -> int:
        return self.levels * self.features

    def forward(self, table: torch.Tensor) -> torch.Tensor:
        if table.shape != (self.table_rows, self.features):
            raise ValueError(
                f"table of shape {tuple(table.shape)} is not the layout these coordinates were "
                f"fixed for ({self.table_rows}, {self.features})"
            )
        out = _BlendRows.apply(table, self)
        return out.reshape(self.points, self.output_dim)


class TinyCudaHashGrid(nn.Module):  # pragma: no cover - needs CUDA and tinycudann
    """The same encoding through tiny-cuda-nn, for speed on CUDA when it is installed."""

    def __init__(self, **kwargs: float) -> None:
        super().__init__()
        import tinycudann as tcnn

        self.encoding = tcnn.Encoding(
            2,
            {
                "otype": "HashGrid",
                "n_levels": kwargs["levels"],
                "n_features_per_level": kwargs["features"],
                "log2_hashmap_size": kwargs["log2_table_size"],
                "base_resolution": kwargs["base_resolution"],
                "per_level_scale": kwargs["per_level_scale"],
            },
        )
        self.output_dim = int(kwargs["levels"] * kwargs["features"])

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        return self.encoding(coords).float()


def tinycudann_available() -> bool:
    """True when tiny-cuda-nn imports and a CUDA device exists."""
    if not torch.cuda.is_available():
        return False
    try:
        import tinycudann  # noqa: F401
    except Exception:
        return False
    return True


class HashGridMLP(nn.Module):
    """Hash-grid encoding followed by a small ReLU MLP: coordinates -> one real value."""

    def __init__(
        self,
        levels: int = 16,
        features: int = 2,
        log2_table_size: int = 15,
        base_resolution: int = 16,
        per_level_scale: float = 1.5,
        hidden_layers: int = 2,
        width: int = 64,
        use_tinycudann: bool = False,
    ) -> None:
        super().__init__()
        settings = dict(
            levels=levels,
            features=features,
            log2_table_size=log2_table_size,
            base_resolution=base_resolution,
            per_level_scale=per_level_scale,
        )
        if use_tinycudann and tinycudann_available():  # pragma: no cover
            self.encoding: nn.Module = TinyCudaHashGrid(**settings)
        else:
            self.encoding = HashGridEncoding(**settings)
        layers: list[nn.Module] = []
        fan_in = self.encoding.output_dim
        for _ in range(hidden_layers):
            layers += [nn.Linear(fan_in, width), nn.ReLU()]
            fan_in = width
        layers.append(nn.Linear(fan_in, 1))
        self.mlp = nn.Sequential(*layers)

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.encoding(coords))

    def forward_fixed(self, fixed: FixedCoordinates) -> torch.Tensor:
        """The same as `self(coords)` for the coordinates `fixed` was built from (by
        `self.encoding.fixed(coords)`, or by any encoding of the same layout)."""
        return self.mlp(fixed(self.encoding.table))
