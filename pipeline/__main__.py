"""``python -m ptyinr ...``: the `ptyinr` command with this interpreter (the SLURM driver job
runs it this way, so it needs no console script on PATH)."""

from ptyinr.cli.main import app

if __name__ == "__main__":  # pragma: no cover
    app(prog_name="ptyinr")
