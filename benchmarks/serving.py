"""Serving throughput benchmark (issue 4): the engine against its baselines, one run, one
machine, so that the ratios are comparable.

Usage:
    python -m benchmarks.serving                 # full run (~8 min on 2 CPU cores)
    python -m benchmarks.serving --quick         # smoke run (~1 min)

Run from a source checkout: the benchmarks are not part of the installed package, and the
`ctxpeft` CLI does not import them (docs/ARCHITECTURE.md, "Benchmarks stay in the checkout").

Systems, all on the `small` preset, adapters drawn by Zipf (alpha = 1) over N adapters:
    engine         this engine: grouping + mixing up to the device slots
    grouping-only  this engine, one adapter per batch (max_adapters_per_batch=1)
    base           the backbone with no adapters, same batching (b)
    peft-naive     PEFT, set_adapter per request, batch 1 (c)
    peft-mixed     PEFT mixed batches through adapter_names= (d)
Closed loop (saturation) for every system and N; open loop (Poisson) for the engine at N=64
at fractions of its closed-loop throughput; and the cold load of a rank-8 `paper`-preset
adapter from disk to servable. Results: benchmarks/results/serving.json, a plot at
docs/serving_throughput.png and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import json
import os
import platform
import random
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from adapters.backbone import Backbone, connector_spec
from adapters.bank import AdapterBank
from adapters.decoding import generate
from adapters.format import load_adapter, save_adapter
from adapters.model import ContextPEFTModel
from adapters.presets import get_preset
from benchmarks.baselines import BatchServer, PeftLoras, base_step, greedy
from benchmarks.cold_load import make_adapter, registry_trials
from benchmarks.plotting import save_figure
from benchmarks.serving_args import ROOT, add_arguments, prefill_settings
from benchmarks.workload import Picker, RunResult, closed_loop, open_loop
from service.engine import CaptionRequest, Engine, EngineConfig
from service.store import AdapterStore

TENANT = "bench"


# --- set-up ------------------------------------------------------------------------------------
def build_backbone(preset: str, seed: int, device: str = "cpu") -> Backbone:
    # Pretrained presets (smol) load their built folder when there is one: the same weights
    # as converting the packaged files again, in a second instead of a minute.
    built = ROOT / "var" / "backbones" / preset
    if not isinstance(get_preset(preset).lm, dict) and (built / "backbone.json").is_file():
        return Backbone.load(built, device=device)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return Backbone.build(preset, device=device)


def images(count: int, size: int, seed: int) -> list[Image.Image]:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (count, size, size, 3), generator=generator, dtype=torch.uint8)
    return [Image.fromarray(p.numpy(), "RGB") for p in pixels]


# --- systems under test -------------------------------------------------------------------
Counters = Callable[[], tuple[int, int, int]]  # (batches, rows, distinct adapters summed)
Submit = Callable[[int, int], Awaitable[int]]


@dataclass
class Bench:
    """What every system is built from, made once per run."""

    args: argparse.Namespace
    backbone: Backbone  # the engine's (context layers injected)
    store: AdapterStore
    pics: list[Image.Image]
    pixels: torch.Tensor  # the same images preprocessed, for the baselines
    base_backbone: Backbone  # untouched, for (b)
    connector: torch.nn.Linear  # (b)'s one connector
    loras: PeftLoras | None  # (c) and (d)


@contextlib.contextmanager
def open_system(bench: Bench, system: str) -> Iterator[tuple[Submit, Counters]]:
    args = bench.args
    wait = args.max_wait_ms / 1000
    if system in ("engine", "grouping-only"):
        config = EngineConfig(
            max_batch_size=args.max_batch,
            max_wait_ms=args.max_wait_ms,
            device_slots=args.slots,
            max_rank=args.rank,
            cpu_cache_bytes=args.cpu_cache_mb << 20,
            encoder_cache_entries=0,  # the baselines encode every image: so does the engine
            queue_size=4096,
            tenant_max_inflight=4096,
            default_max_new_tokens=args.max_new_tokens,
            max_new_tokens_limit=args.max_new_tokens,
            max_adapters_per_batch=1 if system == "grouping-only" else None,
            **prefill_settings(args),
        )
        with Engine(bench.backbone, bench.store, config) as engine:

            async def submit(adapter: int, image: int) -> int:
                request = CaptionRequest(bench.pics[image], (f"a{adapter}",), tenant=TENANT)
                return (await engine.caption(request))[0].tokens

            def counters() -> tuple[int, int, int]:
                s = engine.stats()
                return s.batches, s.rows, s.adapters_in_batches

            yield submit, counters
        return
    if system == "base":
        step = base_step(bench.base_backbone, bench.connector, args.max_new_tokens)
        server = BatchServer(step, args.max_batch, wait)
    elif system == "peft-naive" and bench.loras is not None:
        server = BatchServer(bench.loras.naive_step(args.max_new_tokens), 1, 0.0)
    elif system == "peft-mixed" and bench.loras is not None:
        server = BatchServer(bench.loras.mixed_step(args.max_new_tokens), args.max_batch, wait)
    else:
        raise ValueError(f"unknown system {system!r}")

    async def submit_pixels(adapter: int, image: int) -> int:
        return await server.submit(adapter, bench.pixels[image])

    try:
        yield submit_pixels, server.counters
    finally:
        server.close()


def measure(bench: Bench, system: str, adapters: int, rate: float | None, seed: int) -> RunResult:
    """One load pattern against a fresh system; batch statistics count from the warm-up's end."""
    args = bench.args
    pick = Picker(adapters, len(bench.pics), seed=seed)
    with open_system(bench, system) as (submit, counters):

        async def run() -> RunResult:
            marks: list[tuple[int, int, int]] = []
            if system in ("engine", "grouping-only"):
                # Every adapter read and checked once before the clock starts: steady-state
                # serving, not cold loads (those are measured apart: cold_load).
                await asyncio.gather(*(submit(a, a % len(bench.pics)) for a in range(adapters)))

            async def mark() -> None:
                await asyncio.sleep(args.warmup)
                marks.append(counters())

            marker = asyncio.create_task(mark())
            if rate is None:
                result = await closed_loop(submit, pick, args.clients, args.warmup, args.duration)
            else:
                result = await open_loop(submit, pick, rate, args.warmup, args.duration, seed)
            await marker
            end = counters()
            result.extra["batch_counters"] = [b - a for a, b in zip(marks[0], end, strict=True)]
            return result

        return asyncio.run(run())


def combine(results: list[RunResult]) -> dict[str, Any]:
    """Rounds of one configuration: median throughput, pooled latencies and batch counts."""
    pooled = RunResult(
        seconds=sum(r.seconds for r in results),
        latencies_s=[x for r in results for x in r.latencies_s],
        tokens=sum(r.tokens for r in results),
        errors=sum(r.errors for r in results),
    )
    batches, rows, adapters = (sum(r.extra["batch_counters"][i] for r in results) for i in range(3))
    summary = pooled.summary()
    summary.update(
        throughput_rps=round(statistics.median(r.throughput for r in results), 3),
        rounds_rps=[round(r.throughput, 2) for r in results],
        tokens_per_s=round(statistics.median(r.tokens_per_s for r in results), 2),
        mean_batch_size=round(rows / max(1, batches), 2),
        mean_adapters_per_batch=round(adapters / max(1, batches), 2),
    )
    return summary


def closed_plans(args: argparse.Namespace) -> list[tuple[str, int]]:
    sizes = [int(n) for n in args.adapters.split(",")]
    plans = [("base", 1)]
    for n in sizes:
        plans.append(("engine", n))
        if n > 1:
            plans.append(("grouping-only", n))
        if n <= args.peft_max:
            plans += [("peft-mixed", n), ("peft-naive", n)]
    return plans


def run_all(bench: Bench) -> list[dict[str, Any]]:
    """Every closed-loop configuration once per round, rounds interleaved so that a slow
    spell of a shared machine hits all systems alike; then the open-loop runs."""
    args = bench.args
    plans = closed_plans(args)
    results: dict[tuple[str, int], list[RunResult]] = {plan: [] for plan in plans}
    for round_ in range(args.rounds):
        # A new order each round: no system always follows the same neighbour.
        order = list(plans)
        random.Random(args.seed + round_).shuffle(order)
        for system, n in order:
            result = measure(bench, system, n, None, seed=args.seed + round_)
            results[(system, n)].append(result)
            print(
                f"round {round_ + 1}/{args.rounds} {system:>14} N={n:<4} "
                f"{result.throughput:7.2f} req/s",
                flush=True,
            )
    rows = [
        {"system": system, "adapters": n, "mode": "closed", **combine(results[(system, n)])}
        for system, n in plans
    ]
    capacity = next(
        (r["throughput_rps"] for r in rows if r["system"] == "engine" and r["adapters"] == 64), 0.0
    )
    for fraction in [float(f) for f in args.open_loop.split(",") if f] if capacity else []:
        rate = float(capacity) * fraction
        result = measure(bench, "engine", 64, rate, seed=args.seed)
        rows.append(
            {
                "system": "engine",
                "adapters": 64,
                "mode": f"open@{fraction:.0%}",
                "rate_rps": round(rate, 2),
                **combine([result]),
            }
        )
    for row in rows:
        print(_line(row), flush=True)
    return rows


def _line(row: dict[str, Any]) -> str:
    return (
        f"{row['system']:>14} N={row['adapters']:<4} {row['mode']:<9} "
        f"{row['throughput_rps']:7.2f} req/s  p50 {row['p50_ms']:8.1f} ms  "
        f"p99 {row['p99_ms']:8.1f} ms  batch {row['mean_batch_size']:5.2f}  "
        f"adapters/batch {row['mean_adapters_per_batch']:5.2f}  errors {row['errors']}"
    )


# --- cold load ------------------------------------------------------------------------------
def cold_load(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Disk to servable (validated, on the CPU tier, copied into a bank slot) for a rank-8
    adapter of the `paper` preset, through the registry's own loader thread
    (`benchmarks.cold_load` has the step-by-step breakdown)."""
    started = time.perf_counter()
    backbone = build_backbone(args.cold_preset, args.seed)
    build_s = time.perf_counter() - started
    adapter = make_adapter(backbone, args.rank, seed=1)
    times = registry_trials(backbone, adapter, work / "cold", args.cold_loads, args.rank)
    save_adapter(adapter, work / "cold-size")
    size = (work / "cold-size" / "adapter.safetensors").stat().st_size
    totals = times["total"]
    return {
        "preset": args.cold_preset,
        "rank": args.rank,
        "file_bytes": size,
        "trials": args.cold_loads,
        "p50_ms": round(statistics.median(totals) * 1000, 2),
        "max_ms": round(max(totals) * 1000, 2),
        "disk_to_cpu_p50_ms": round(statistics.median(times["disk_to_cpu"]) * 1000, 2),
        "cpu_to_slot_p50_ms": round(statistics.median(times["cpu_to_slot"]) * 1000, 2),
        "backbone_build_s": round(build_s, 1),
        "note": "files just written: read from the OS page cache, not the physical disk",
    }


# --- where the time goes ------------------------------------------------------------------------
def compute_breakdown(bench: Bench, repeats: int = 7) -> dict[str, Any]:
    """One batch of `max_batch` rows x `max_new_tokens` on the LM side only (image features
    precomputed), per way of applying adapters: separates the method's arithmetic from the
    serving machinery. Every case runs once per round in a new random order (after one
    untimed round); median seconds, and each case's ratio to the base model round by round
    (median, min, max): the ratios are what a shared machine's load cannot move much."""
    args = bench.args
    rows = args.max_batch
    features = bench.backbone.encode_images(bench.pixels[:rows])
    model = ContextPEFTModel(bench.backbone)
    bank = AdapterBank(
        bench.backbone.dims,
        connector_spec(bench.backbone),
        16,
        args.rank,
        device=bench.backbone.device,
    )
    for slot in range(16):
        ref = bench.store.latest(TENANT, f"a{slot}")
        assert ref is not None
        dims = bench.backbone.dims
        bank.load(slot, load_adapter(bench.store.path(ref), dims, max_rank=args.rank))
    zeros = torch.zeros(rows, dtype=torch.long)
    mixed = torch.arange(rows) % 16
    base = bench.base_backbone

    def base_lm(embeds: torch.Tensor, cache: Any, _: list[int]) -> torch.Tensor:
        return base.lm(inputs_embeds=embeds, cache=cache, use_cache=True, logits_to_keep=1).logits

    cases: dict[str, Callable[[], object]] = {
        "base (no adapters)": lambda: greedy(
            base, base_lm, bench.connector(features), args.max_new_tokens
        ),
        "context-peft, 1 adapter": lambda: generate(
            model, features, bank, zeros, args.max_new_tokens
        ),
        "context-peft, 16 adapters": lambda: generate(
            model, features, bank, mixed, args.max_new_tokens
        ),
    }
    loras = bench.loras
    if loras is not None:
        cases["peft adapter_names, 16 adapters"] = lambda: loras.mixed_generate(
            mixed.tolist(), features, args.max_new_tokens
        )
    times: dict[str, list[float]] = {name: [] for name in cases}
    cpu: dict[str, list[float]] = {name: [] for name in cases}
    order = list(cases)
    shuffle = random.Random(args.seed).shuffle
    for round_ in range(repeats + 1):
        shuffle(order)
        for name in order:
            started, started_cpu = time.perf_counter(), time.thread_time()
            cases[name]()
            if round_:
                times[name].append(time.perf_counter() - started)
                cpu[name].append(time.thread_time() - started_cpu)

    def ratios(samples: dict[str, list[float]]) -> dict[str, dict[str, float]]:
        base = samples["base (no adapters)"]
        out = {}
        for name, values in samples.items():
            per_round = [a / b for a, b in zip(values, base, strict=True)]
            out[name] = {
                "median": round(statistics.median(per_round), 3),
                "min": round(min(per_round), 3),
                "max": round(max(per_round), 3),
            }
        return out

    return {
        "median_seconds": {name: round(statistics.median(t), 4) for name, t in times.items()},
        "min_seconds": {name: round(min(t), 4) for name, t in times.items()},
        "ratio_to_base_per_round": ratios(times),
        # With one torch thread all compute runs on this thread: its CPU time leaves out
        # the time other processes hold the core.
        "cpu_median_seconds": {name: round(statistics.median(t), 4) for name, t in cpu.items()},
        "cpu_ratio_to_base_per_round": ratios(cpu),
        "rounds": repeats,
    }


# --- report --------------------------------------------------------------------------------
def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    closed = [r for r in rows if r["mode"] == "closed"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {
        "engine": ("o-", "tab:blue"),
        "grouping-only": ("s--", "tab:orange"),
        "peft-mixed": ("^-", "tab:red"),
        "peft-naive": ("v:", "tab:gray"),
    }
    for system, (style, color) in styles.items():
        pts = sorted((r["adapters"], r) for r in closed if r["system"] == system)
        if pts:
            xs = [n for n, _ in pts]
            left.plot(xs, [r["throughput_rps"] for _, r in pts], style, color=color, label=system)
            right.plot(
                xs, [r["mean_adapters_per_batch"] for _, r in pts], style, color=color, label=system
            )
    for r in closed:
        if r["system"] == "base":
            left.axhline(
                r["throughput_rps"], color="tab:green", ls="-.", label="base (no adapters)"
            )
    left.set(xscale="log", xlabel="adapters N (Zipf alpha=1)", ylabel="requests / s")
    left.set_title("Closed-loop throughput")
    right.set(xscale="log", xlabel="adapters N", ylabel="distinct adapters per batch")
    right.set_title("Adapter mixing per batch")
    save_figure(fig, path, legends=(left, right))


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| system | N | load | req/s | tokens/s | p50 ms | p99 ms | batch | adapters/batch |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['system']} | {r['adapters']} | {r['mode']} | {r['throughput_rps']:.2f} | "
            f"{r['tokens_per_s']:.1f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | "
            f"{r['mean_batch_size']:.1f} | {r['mean_adapters_per_batch']:.2f} |"
        )
    return "\n".join(lines)


def ratios(rows: list[dict[str, Any]]) -> dict[str, float]:
    def get(system: str, n: int) -> float | None:
        for r in rows:
            if r["system"] == system and r["adapters"] == n and r["mode"] == "closed":
                return float(r["throughput_rps"])
        return None

    e64, e1 = get("engine", 64), get("engine", 1)
    out: dict[str, float] = {}
    for name, other in (
        ("engine64/engine1 (>= 0.9)", e1),
        ("engine64/base (>= 0.8)", get("base", 1)),
        ("engine64/peft-naive64 (>= 5)", get("peft-naive", 64)),
        ("engine64/peft-mixed64 (>= 1.5)", get("peft-mixed", 64)),
        ("engine64/grouping-only64", get("grouping-only", 64)),
    ):
        if e64 and other:
            out[name] = round(e64 / other, 2)
    return out


def run(args: argparse.Namespace) -> int:
    if args.quick:
        args.adapters, args.rounds, args.warmup, args.duration = "1,8,64", 1, 1.0, 3.0
        args.cold_loads, args.open_loop = 5, "0.5"
    if args.compute_only:
        args.adapters, args.peft_max = "16", 16
    if args.device != "cpu":
        if not args.compute_only:
            raise SystemExit(
                "--device other than cpu needs --compute-only: the serving comparison runs "
                "its baselines on the CPU"
            )
        args.peft_max = 0  # the PEFT baseline's connectors live on the CPU
    given_out = args.out  # --out as given (a compute-only run writes there when given)
    # A quick or partial run never overwrites the recorded results.
    scratch = args.quick or args.compute_only
    tmp = Path(tempfile.gettempdir())
    args.out = args.out or (
        tmp / "ctxpeft-serving-quick.json" if scratch else ROOT / "benchmarks/results/serving.json"
    )
    args.plot = args.plot or (
        tmp / "ctxpeft-serving-quick.png" if scratch else ROOT / "docs/serving_throughput.png"
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    load_before = os.getloadavg()
    sizes = [int(n) for n in args.adapters.split(",")]
    backbone = build_backbone(args.preset, args.seed, args.device)
    pics = images(64, backbone.config.image_size, args.seed)
    with tempfile.TemporaryDirectory(prefix="ctxpeft-bench-") as scratch_dir:
        work = Path(scratch_dir)
        store = AdapterStore(work / "store")
        started = time.perf_counter()
        adapters = [make_adapter(backbone, args.rank, seed=i) for i in range(max(sizes))]
        for i, adapter in enumerate(adapters):
            store.write_version(TENANT, f"a{i}", functools.partial(save_adapter, adapter))
        print(f"{len(adapters)} adapters written in {time.perf_counter() - started:.1f} s")
        base_backbone = build_backbone(args.preset, args.seed, args.device)
        peft_n = max([n for n in sizes if n <= args.peft_max], default=0)
        started = time.perf_counter()
        loras = None
        if peft_n:
            peft_backbone = build_backbone(args.preset, args.seed)
            loras = PeftLoras(peft_backbone, adapters[:peft_n], args.rank)
            print(
                f"PEFT model with {peft_n} adapters built in {time.perf_counter() - started:.1f} s"
            )
        connector = torch.nn.Linear(backbone.vision_dim, backbone.dims.hidden_size).eval()
        connector = connector.to(backbone.device)
        bench = Bench(
            args,
            backbone,
            store,
            pics,
            base_backbone.preprocess(pics),
            base_backbone,
            connector,
            loras,
        )
        del adapters  # the store holds them; only PEFT keeps its own copies
        # Set-up objects (models, adapter sets) are permanent: keep them out of the cyclic
        # collector's full passes, which would otherwise land inside measured windows.
        gc.collect()
        gc.freeze()
        compute = compute_breakdown(bench, args.compute_repeats)
        compute["machine"] = {
            "preset": args.preset,
            "device": str(backbone.device),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        }
        print(json.dumps({"batch_seconds": compute}, indent=2), flush=True)
        if args.compute_only:
            out = given_out or ROOT / "benchmarks" / "results" / f"compute_only_{args.preset}.json"
            out.write_text(json.dumps(compute, indent=2) + "\n")
            print(f"wrote {out}")
            return 0
        rows = run_all(bench)
        cold = cold_load(args, work) if args.cold_loads else {}
    report = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "device": str(backbone.device),
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        },
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "runs": rows,
        "ratios": ratios(rows),
        "cold_load": cold,
        "batch_seconds": compute,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    plot(rows, args.plot)
    print(table(rows))
    print(json.dumps({"ratios": report["ratios"], "cold_load": cold}, indent=2))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
