"""Shared pytest set-up. Keep this small: fixtures live in their own modules, listed here."""

# Session SLURM on localhost for tests marked `slurm` (tests/slurm_support.py).
pytest_plugins = ["slurm_support"]
