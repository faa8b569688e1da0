"""`ctxpeft bench`: the serving throughput benchmark (benchmarks/serving.py) from the CLI.

    ctxpeft bench --quick          # smoke run, about two minutes
    ctxpeft bench                  # the recorded run: results JSON, plot, Markdown table

The harness lives in the source checkout's `benchmarks/`, which is not an installed package:
run the command from a checkout or an editable install (`pip install -e .`).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

# service/commands/bench.py -> the checkout that holds benchmarks/
_CHECKOUT = Path(__file__).resolve().parents[2]


def _importable() -> bool:
    """Make `benchmarks` importable from the checkout; False when there is none."""
    if not (_CHECKOUT / "benchmarks" / "serving.py").is_file():
        return False
    if str(_CHECKOUT) not in sys.path:
        sys.path.insert(0, str(_CHECKOUT))
    return True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # The flags are the harness's own (argparse only, no torch: `ctxpeft --help` stays fast).
    if _importable():
        importlib.import_module("benchmarks.serving_args").add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    if not _importable():
        print(
            "ctxpeft bench needs the source checkout's benchmarks/ folder; run it from a "
            "checkout (python -m benchmarks.serving) or an editable install",
            file=sys.stderr,
        )
        return 2
    code: int = importlib.import_module("benchmarks.serving").run(args)
    return code
