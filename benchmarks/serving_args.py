"""Command-line flags of the serving benchmark (argparse only, no torch), and the checkout's
root. Used by benchmarks/serving.py and benchmarks/continuous.py."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def add_prefill_arguments(parser: argparse.ArgumentParser) -> None:
    """The engine's join settings (default: the engine's defaults), to compare policies."""
    parser.add_argument("--max-prefill-rows", type=int, default=None)
    parser.add_argument("--prefill-min-rows", type=int, default=None)
    parser.add_argument("--prefill-max-wait-steps", type=int, default=None)


def prefill_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The EngineConfig keywords of the join flags that were given."""
    names = ("max_prefill_rows", "prefill_min_rows", "prefill_max_wait_steps")
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="small", help="backbone preset under test")
    parser.add_argument("--adapters", default="1,8,64,512", help="values of N")
    parser.add_argument("--peft-max", type=int, default=64, help="largest N for PEFT baselines")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank of the adapters")
    parser.add_argument("--clients", type=int, default=128, help="closed-loop concurrency")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before measuring")
    parser.add_argument("--duration", type=float, default=6.0, help="seconds measured")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--slots", type=int, default=16, help="device slots of the bank")
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    add_prefill_arguments(parser)
    parser.add_argument("--cpu-cache-mb", type=int, default=256)
    parser.add_argument(
        "--open-loop", default="0.5,0.8", help="Poisson rates as fractions of engine N=64"
    )
    parser.add_argument("--cold-loads", type=int, default=20, help="cold-load trials")
    parser.add_argument("--cold-preset", default="paper")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="short smoke run")
    parser.add_argument(
        "--compute-only", action="store_true", help="only the per-batch compute breakdown"
    )
    parser.add_argument(
        "--compute-repeats", type=int, default=7, help="rounds of the compute breakdown"
    )
    parser.add_argument(
        "--device",
        default="cpu",
        help="cpu, cuda, cuda:N (other than cpu: --compute-only, without the PEFT case)",
    )
    parser.add_argument("--out", type=Path, default=None, help="results JSON path")
    parser.add_argument("--plot", type=Path, default=None, help="plot PNG path")
