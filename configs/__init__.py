"""TOML presets: the defaults, the paper's simulation cases, beamline setups.

Kept as a package so the presets are installed with `ptyinr` and found by name
(`ptyinr reconstruct STORE --config paper-clean-40`).
"""
