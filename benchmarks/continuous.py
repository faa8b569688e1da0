"""Continuous vs static batching (issue 10): the same engine with `scheduling="continuous"`
(rows join and leave the running batch between decode steps) and `scheduling="static"` (a batch
runs to its end before the next starts), one run, interleaved, so the ratios are comparable.

Usage:
    python -m benchmarks.continuous             # full run (~15 min on 2 CPU cores)
    python -m benchmarks.continuous --quick     # smoke run (~2 min)

Workload: `small` preset, rank-8 context-specific LoRA adapters, N = 64 drawn by Zipf
(alpha = 1), images uniform over 64, and `max_new_tokens` drawn uniformly from 4..48 per
request, so rows of one batch do not end together (the case continuous batching is for).
  1. closed loop (saturation), both modes, N = 64 and N = 1: throughput, and the static
     mode's capacity that the open-loop rates are fractions of;
  2. open loop (Poisson) at 50%, 80% and 95% of the static capacity, both modes, rounds
     interleaved: latency p50 / p99 and time to first token p50 / p99.
Results: benchmarks/results/continuous.json, docs/continuous_latency.png (latency vs offered
load) and a Markdown table on stdout. The comparisons with the base model and PEFT mixed
batches are `python -m benchmarks.serving` (same engine, fixed 16 tokens).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from adapters.backbone import Backbone
from benchmarks.plotting import save_figure
from benchmarks.serving import TENANT, images, make_adapter
from benchmarks.serving_args import ROOT, add_prefill_arguments, prefill_settings
from benchmarks.workload import Picker, RunResult, closed_loop, open_loop
from service.engine import CaptionRequest, Engine, EngineConfig
from service.store import AdapterStore

MODES = ("continuous", "static")


def percentile(values: list[float], q: int) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def measure(
    args: argparse.Namespace,
    backbone: Any,
    store: AdapterStore,
    pics: list[Any],
    mode: str,
    adapters: int,
    rate: float | None,
    seed: int,
) -> dict[str, Any]:
    """One load pattern against a fresh engine: throughput, latency and time to first token of
    the requests that finished inside the measured window."""
    low, high = (int(x) for x in args.tokens.split(","))
    config = EngineConfig(
        scheduling=mode,  # type: ignore[arg-type]
        max_batch_size=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        device_slots=args.slots,
        max_rank=args.rank,
        encoder_cache_entries=0,
        queue_size=4096,
        tenant_max_inflight=4096,
        default_max_new_tokens=high,
        max_new_tokens_limit=high,
        request_timeout_s=600,
        **prefill_settings(args),
    )
    lengths = random.Random(seed)
    first_tokens: list[tuple[float, float]] = []  # (finished at, time to first token)
    with Engine(backbone, store, config) as engine:

        async def submit(adapter: int, image: int) -> int:
            started = time.perf_counter()
            first: list[float] = []

            def on_token(_: int, __: int) -> None:
                if not first:
                    first.append(time.perf_counter())

            request = CaptionRequest(
                pics[image],
                (f"a{adapter}",),
                tenant=TENANT,
                max_new_tokens=lengths.randint(low, high),
                on_token=on_token,
            )
            result = (await engine.caption(request))[0]
            if first:
                first_tokens.append((time.perf_counter(), first[0] - started))
            return result.tokens

        async def run() -> RunResult:
            pick = Picker(adapters, len(pics), seed=seed)
            if rate is None:
                return await closed_loop(submit, pick, args.clients, args.warmup, args.duration)
            return await open_loop(submit, pick, rate, args.warmup, args.duration, seed)

        begun = time.perf_counter()
        result = asyncio.run(run())
        stats = engine.stats()
    start = begun + args.warmup
    ttft = [t for done, t in first_tokens if start <= done < start + args.duration]
    summary = result.summary()
    summary.update(
        ttft_p50_ms=round(percentile(ttft, 50) * 1000, 1),
        ttft_p99_ms=round(percentile(ttft, 99) * 1000, 1),
        rows_per_step=round(stats.mean_batch_size, 2),
        adapters_per_step=round(stats.mean_adapters_per_batch, 2),
    )
    return summary


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    with torch.random.fork_rng():
        torch.manual_seed(args.seed)
        backbone = Backbone.build(args.preset, device=args.device)
    if args.dtype != "float32":
        backbone.to(getattr(torch, args.dtype))
    pics = images(64, backbone.config.image_size, args.seed)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="ctxpeft-continuous-") as tmp:
        store = AdapterStore(Path(tmp) / "store")
        for i in range(args.adapters):
            adapter = make_adapter(backbone, args.rank, seed=i)
            store.write_version(TENANT, f"a{i}", functools.partial(_save, adapter))
        bench = functools.partial(measure, args, backbone, store, pics)

        closed: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for round_ in range(args.rounds):
            plans = [(mode, n) for mode in MODES for n in (args.adapters, 1)]
            random.Random(args.seed + round_).shuffle(plans)
            for mode, n in plans:
                row = bench(mode, n, None, args.seed + round_)
                closed.setdefault((mode, n), []).append(row)
                print(f"closed {mode:>10} N={n:<3} {row['throughput_rps']:6.2f} req/s", flush=True)
        for (mode, n), runs in closed.items():
            rows.append(_pooled(runs, mode=mode, adapters=n, load="closed"))
        capacity = next(
            r["throughput_rps"]
            for r in rows
            if r["mode"] == "static" and r["adapters"] == args.adapters
        )
        fractions = [float(f) for f in args.open_loop.split(",") if f.strip()]
        open_runs: dict[tuple[str, float], list[dict[str, Any]]] = {}
        for round_ in range(args.rounds):
            plans = [(mode, f) for mode in MODES for f in fractions]
            random.Random(args.seed + 100 + round_).shuffle(plans)
            for mode, fraction in plans:
                row = bench(mode, args.adapters, capacity * fraction, args.seed + round_)
                open_runs.setdefault((mode, fraction), []).append(row)
                print(
                    f"open@{fraction:.0%} {mode:>10} p50 {row['p50_ms']:7.0f} ms "
                    f"p99 {row['p99_ms']:7.0f} ms ttft p50 {row['ttft_p50_ms']:6.0f} ms",
                    flush=True,
                )
        for (mode, fraction), runs in open_runs.items():
            rows.append(
                _pooled(
                    runs,
                    mode=mode,
                    adapters=args.adapters,
                    load=f"open@{fraction:.0%}",
                    rate_rps=round(capacity * fraction, 2),
                )
            )
    return {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": str(backbone.device),
            "gpu": torch.cuda.get_device_name(0) if backbone.device.type == "cuda" else None,
            "load_before": [round(x, 2) for x in load_before],
            "load_after": [round(x, 2) for x in os.getloadavg()],
        },
        "args": {k: str(v) for k, v in vars(args).items()},
        "static_capacity_rps": capacity,
        "rows": rows,
        "ratios": ratios(rows, args.adapters),
    }


def _save(adapter: Any, folder: Path) -> None:
    from adapters.format import save_adapter

    save_adapter(adapter, folder)


def _pooled(runs: list[dict[str, Any]], **labels: Any) -> dict[str, Any]:
    """Rounds of one configuration: medians of each figure."""
    keys = [k for k, v in runs[0].items() if isinstance(v, int | float)]
    out: dict[str, Any] = dict(labels)
    for key in keys:
        out[key] = round(statistics.median(float(r[key]) for r in runs), 2)
    out["rounds"] = len(runs)
    return out


def ratios(rows: list[dict[str, Any]], n: int) -> dict[str, float]:
    def get(mode: str, adapters: int, load: str, key: str) -> float:
        return float(
            next(
                r[key]
                for r in rows
                if r["mode"] == mode and r["adapters"] == adapters and r["load"] == load
            )
        )

    out = {
        f"closed: continuous/static N={n} (>= 1.0)": get(
            "continuous", n, "closed", "throughput_rps"
        )
        / get("static", n, "closed", "throughput_rps"),
        f"closed: continuous N={n} / N=1 (>= 0.9)": get("continuous", n, "closed", "throughput_rps")
        / get("continuous", 1, "closed", "throughput_rps"),
    }
    for r in rows:
        if r["mode"] == "continuous" and r["load"].startswith("open"):
            load = r["load"]
            for key in ("p50_ms", "p99_ms", "ttft_p50_ms"):
                out[f"{load} {key}: continuous/static (<= 0.5 at 80%)"] = r[key] / get(
                    "static", n, load, key
                )
    return {k: round(v, 2) for k, v in out.items()}


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["load"].startswith("open")]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for mode, color in (("continuous", "tab:blue"), ("static", "tab:orange")):
        pts = sorted((r["rate_rps"], r) for r in rows if r["mode"] == mode)
        xs = [x for x, _ in pts]
        left.plot(xs, [r["p50_ms"] for _, r in pts], "o-", color=color, label=f"{mode} p50")
        left.plot(xs, [r["p99_ms"] for _, r in pts], "s--", color=color, label=f"{mode} p99")
        right.plot(xs, [r["ttft_p50_ms"] for _, r in pts], "o-", color=color, label=f"{mode} p50")
        right.plot(xs, [r["ttft_p99_ms"] for _, r in pts], "s--", color=color, label=f"{mode} p99")
    capacity = result["static_capacity_rps"]
    left.set(xlabel="offered load (requests/s)", ylabel="latency (ms)", yscale="log")
    left.set_title(f"Latency vs offered load (static capacity {capacity:.1f} req/s)")
    right.set(xlabel="offered load (requests/s)", ylabel="time to first token (ms)", yscale="log")
    right.set_title("Time to first token")
    save_figure(fig, path, legends=(left, right))


def table(result: dict[str, Any]) -> str:
    lines = [
        "| mode | N | load | req/s | p50 ms | p99 ms | TTFT p50 ms | TTFT p99 ms | rows/step |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['mode']} | {r['adapters']} | {r['load']} | {r['throughput_rps']:.2f} | "
            f"{r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['ttft_p50_ms']:.0f} | "
            f"{r['ttft_p99_ms']:.0f} | {r['rows_per_step']:.1f} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--adapters", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--tokens", default="4,48", help="max_new_tokens drawn from low,high")
    parser.add_argument("--clients", type=int, default=64, help="closed-loop concurrency")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--slots", type=int, default=16)
    add_prefill_arguments(parser)
    parser.add_argument("--open-loop", default="0.5,0.8,0.95")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--duration", type=float, default=15.0)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.warmup, args.duration, args.open_loop = 1, 1.0, 4.0, "0.8"
    tmp = Path(tempfile.gettempdir())
    out = args.out or (
        tmp / "ctxpeft-continuous-quick.json"
        if args.quick
        else ROOT / "benchmarks/results/continuous.json"
    )
    picture = args.plot or (
        tmp / "ctxpeft-continuous-quick.png" if args.quick else ROOT / "docs/continuous_latency.png"
    )
    result = run_all(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, picture)
    print(table(result))
    print(json.dumps(result["ratios"], indent=2))
    print(f"results: {out}  plot: {picture}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
