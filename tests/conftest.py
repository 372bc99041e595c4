"""Shared pytest set-up. Keep this small: fixtures live in their own modules, listed here."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

# Session SLURM on localhost for tests marked `slurm` (tests/slurm_support.py).
pytest_plugins = ["slurm_support"]


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny tensors: one torch thread (two threads on a busy 2-core box run ~30x slower).
    Use with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
