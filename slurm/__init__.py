"""SLURM files shipped with ptyinr as package data: dask-jobqueue profiles (`profiles/`) and the
driver-job template (`templates/`). `local/` (the single-node test SLURM) stays in the source
tree; it is not installed."""
