"""ptyinr: PtyINR ptychographic reconstruction at facility scale.

Data flow, one module per stage: ingest/store -> preprocess -> physics + models -> train
-> evaluate -> results back to Zarr; `graph` wires stages into a Dask graph, `cluster` picks
where it runs.
"""

__version__ = "0.1.0"
