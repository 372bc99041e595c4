"""The `ptyinr` command line: one module per command group, wired together in `ptyinr.cli.main`."""
