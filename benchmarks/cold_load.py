"""Cold-load benchmark (issue 11): one adapter version from disk to servable, and where the
time goes.

    python -m benchmarks.cold_load                      # paper preset, rank 8, 30 trials
    python -m benchmarks.cold_load --preset small --trials 50 --threads 1

A rank-r context-specific LoRA set on every target of the preset (plus its connector) is
written as a new version before each trial, then loaded two ways:
  registry  the service's own path: `cache.want` -> the loader thread reads and validates
            (fingerprint, shapes, finite values) into the CPU tier = disk -> CPU; then
            `cache.bind` copies it into a bank slot = CPU -> slot;
  steps     the same work on this thread, timed step by step: read the safetensors file,
            validate the tensors, build the `AdapterSet`, copy it into a bank slot.
Files were just written, so reads come from the OS page cache, not the physical disk.
Results: a table on stdout and benchmarks/results/cold_load.json (p50, p90, min, max).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from adapters.adapter_set import AdapterSet, tensor_shapes
from adapters.backbone import Backbone, connector_spec
from adapters.bank import AdapterBank
from adapters.config import AdapterConfig, resolve_targets
from adapters.format import WEIGHTS_FILE, check_tensors, read_tensors, save_adapter
from service.registry import open_adapters
from service.store import AdapterStore

TENANT = "bench"
RESULTS = Path(__file__).parent / "results" / "cold_load.json"


def make_adapter(backbone: Backbone, rank: int, seed: int) -> AdapterSet:
    """A rank-r context-specific LoRA set on every target, with non-zero random weights."""
    config = AdapterConfig(
        method="lora",
        connector=connector_spec(backbone),
        base_fingerprint=backbone.fingerprint(),
        rank=rank,
        targets=resolve_targets("lora", "all"),
        num_layers=backbone.dims.num_layers,
    )
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in tensor_shapes(config, backbone.dims).items():
        scale = 0.02 if name.endswith("lora_B") else 0.05
        tensors[name] = torch.randn(shape, generator=generator) * scale
    return AdapterSet(config, backbone.dims, tensors)


def registry_trials(
    backbone: Backbone, adapter: AdapterSet, work: Path, trials: int, max_rank: int
) -> dict[str, list[float]]:
    """Disk -> CPU tier (loader thread) and CPU tier -> bank slot, seconds per trial."""
    store = AdapterStore(work / "registry")
    bank = AdapterBank(backbone.dims, connector_spec(backbone), 2, max_rank=max_rank)
    registry, cache = open_adapters(store, backbone, bank, budget_bytes=1 << 30)
    times: dict[str, list[float]] = {"total": [], "disk_to_cpu": [], "cpu_to_slot": []}
    try:
        for _ in range(trials):
            store.write_version(TENANT, "cold", lambda folder: save_adapter(adapter, folder))
            version = registry.resolve(TENANT, "cold")
            t0 = time.perf_counter()
            cache.want(version)
            while not cache.is_ready(version):
                time.sleep(0.0001)
            t1 = time.perf_counter()
            slots, _, _ = cache.bind([version])
            t2 = time.perf_counter()
            cache.release(slots, [version])
            cache.unwant(version)
            times["total"].append(t2 - t0)
            times["disk_to_cpu"].append(t1 - t0)
            times["cpu_to_slot"].append(t2 - t1)
    finally:
        cache.close()
    return times


def step_trials(
    backbone: Backbone, adapter: AdapterSet, work: Path, trials: int, max_rank: int
) -> dict[str, list[float]]:
    """The loader's work on this thread, step by step, seconds per trial."""
    bank = AdapterBank(backbone.dims, connector_spec(backbone), 2, max_rank=max_rank)
    folder = work / "steps"
    times: dict[str, list[float]] = {"read": [], "validate": [], "adapter_set": [], "to_slot": []}
    for trial in range(trials):
        version = folder / f"v{trial}"
        save_adapter(adapter, version)
        t0 = time.perf_counter()
        tensors = read_tensors(version / WEIGHTS_FILE)
        t1 = time.perf_counter()
        check_tensors(adapter.config, backbone.dims, tensors)
        t2 = time.perf_counter()
        loaded = AdapterSet.adopt(adapter.config, backbone.dims, tensors)
        t3 = time.perf_counter()
        bank.load(trial % 2, loaded)
        t4 = time.perf_counter()
        for name, seconds in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            times[name].append(seconds)
    return times


def summary(values: list[float]) -> dict[str, float]:
    ms = sorted(1000 * v for v in values)
    return {
        "p50_ms": round(statistics.median(ms), 2),
        "p90_ms": round(ms[int(0.9 * (len(ms) - 1))], 2),
        "min_ms": round(ms[0], 2),
        "max_ms": round(ms[-1], 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--max-rank", type=int, default=8, help="the bank's max_rank")
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    with torch.random.fork_rng():
        torch.manual_seed(args.seed)
        backbone = Backbone.build(args.preset)
    adapter = make_adapter(backbone, args.rank, seed=1)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="ctxpeft-cold-") as tmp:
        work = Path(tmp)
        save_adapter(adapter, work / "size")
        size = (work / "size" / WEIGHTS_FILE).stat().st_size
        # Alternate the two measurements in rounds so both see the same machine load.
        registry: dict[str, list[float]] = {}
        steps: dict[str, list[float]] = {}
        rounds = 5
        for round_ in range(rounds):
            share = args.trials // rounds + (1 if round_ < args.trials % rounds else 0)
            for target, trials in (
                (
                    registry,
                    registry_trials(backbone, adapter, work / f"r{round_}", share, args.max_rank),
                ),
                (steps, step_trials(backbone, adapter, work / f"s{round_}", share, args.max_rank)),
            ):
                for key, values in trials.items():
                    target.setdefault(key, []).extend(values)
    result = {
        "benchmark": "cold_load",
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        },
        "settings": {
            "preset": args.preset,
            "rank": args.rank,
            "max_rank": args.max_rank,
            "trials": args.trials,
            "file_bytes": size,
            "tensors": len(adapter.tensors()),
        },
        "registry": {key: summary(values) for key, values in registry.items()},
        "steps": {key: summary(values) for key, values in steps.items()},
        "note": "files just written: read from the OS page cache, not the physical disk",
    }
    print(
        f"{args.preset} rank {args.rank}: {size / 1e6:.1f} MB, {args.trials} trials, "
        f"load {load_before[0]:.1f} -> {os.getloadavg()[0]:.1f}"
    )
    print("| path | step | p50 ms | p90 ms | min ms | max ms |\n|---|---|---:|---:|---:|---:|")
    for part in ("registry", "steps"):
        for key, s in result[part].items():  # type: ignore[attr-defined]
            print(
                f"| {part} | {key} | {s['p50_ms']} | {s['p90_ms']} | {s['min_ms']} | {s['max_ms']} |"
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
