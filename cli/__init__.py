"""The `ptyinr` command line: one module per command group, wired together in `cli.main`."""
