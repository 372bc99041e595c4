"""Settings shared by the tests that train: networks small enough for a few seconds on one
CPU thread, yet the full method (SIREN object, hash-grid probe, data-driven probe start)."""

from __future__ import annotations

TINY_MODEL = [
    "model.siren_width=32",
    "model.siren_hidden_layers=1",
    "model.hash_levels=4",
    "model.hash_log2_table_size=10",
    "model.probe_init_steps=20",
    "train.lr_object=1e-3",
    "train.lr_probe=1e-3",
    "train.threads=1",
]
