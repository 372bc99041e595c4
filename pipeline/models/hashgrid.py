"""Multiresolution hash-grid encoding (Instant-NGP, Müller et al. 2022) in plain PyTorch.

Runs on any device. Level l has a grid of N_l = floor(base * scale**l) cells per axis
((N_l + 1)**2 vertices). A level whose vertices fit the table is indexed densely
(iy * (N_l + 1) + ix); finer levels use Instant-NGP's spatial hash
(ix * 1) XOR (iy * 2654435761) mod T. Features at the 4 cell corners are blended bilinearly
and the levels concatenated. All levels share one parameter tensor, so a batch of
coordinates costs one gather, not one per level.
"""

from __future__ import annotations

import math

import torch
from torch import nn

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
