"""How long `ptyinr --help` takes, against the interpreter's own start (`python -c pass`).

The commands run N times each, interleaved (help, pass, help, pass, ...) so that a busy
machine slows both alike; the table gives the median and spread of each and the ratio of the
medians. `--baseline-cli DIR` also times the help of another copy of the `cli/` folder (e.g.
the last commit's, written out with `git show`), run against the same pipeline:

    python benchmarks/bench_cli.py -n 15
    mkdir -p /tmp/cli-head && for f in $(git ls-tree --name-only HEAD cli/); do
        git show HEAD:$f > /tmp/cli-head/$(basename $f); done
    python benchmarks/bench_cli.py -n 15 --baseline-cli /tmp/cli-head

Why: the help and shell completion run the whole CLI module tree on every keystroke of a
completion, so it must not import torch, xarray, dask or matplotlib (issue 15).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

# The help of a cli/ folder other than the installed one: load it as ptyinr.cli first.
_BASELINE = """
import importlib.util, sys
import ptyinr
spec = importlib.util.spec_from_file_location(
    "ptyinr.cli", {init!r}, submodule_search_locations=[{folder!r}]
)
module = importlib.util.module_from_spec(spec)
sys.modules["ptyinr.cli"] = module
spec.loader.exec_module(module)
from ptyinr.cli.main import app
app(["--help"], prog_name="ptyinr")
"""


def help_command() -> list[str]:
    """The `ptyinr` console script beside this interpreter, else `python -m ptyinr`."""
    script = Path(sys.executable).with_name("ptyinr")
    found = str(script) if script.exists() else shutil.which("ptyinr")
    return [found, "--help"] if found else [sys.executable, "-m", "ptyinr", "--help"]


def seconds(command: list[str]) -> float:
    """Wall time of one run of `command` (output discarded; a failure stops the benchmark)."""
    start = time.perf_counter()
    subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=15, help="runs of each command")
    parser.add_argument("--baseline-cli", type=Path, help="another cli/ folder to time too")
    args = parser.parse_args()

    commands = {
        "ptyinr --help": help_command(),
        "python -c pass": [sys.executable, "-c", "pass"],
    }
    if args.baseline_cli:
        folder = args.baseline_cli.resolve()
        code = _BASELINE.format(init=str(folder / "__init__.py"), folder=str(folder))
        commands[f"ptyinr --help ({folder})"] = [sys.executable, "-c", code]
    for command in commands.values():  # warm the file cache once
        seconds(command)
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(args.n):
        for name, command in commands.items():
            times[name].append(seconds(command))

    base = statistics.median(times["python -c pass"])
    print(f"{args.n} runs each, interleaved; {sys.executable} (Python {sys.version.split()[0]})")
    print()
    print("| command | median (s) | min (s) | max (s) | median / python -c pass |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, values in times.items():
        median = statistics.median(values)
        print(
            f"| `{name}` | {median:.3f} | {min(values):.3f} | {max(values):.3f} "
            f"| {median / base:.1f} |"
        )


if __name__ == "__main__":
    main()
