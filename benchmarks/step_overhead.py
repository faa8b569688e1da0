"""Host time per engine step outside the forward (issue 24): what the step loop costs around
its forward passes, at 1, 8, 32 and 128 running rows over 16 adapters.

Usage:
    python -m benchmarks.step_overhead                      # demo and small presets (~3 min)
    python -m benchmarks.step_overhead --preset demo --rows 32 --seconds 4
    python -m benchmarks.step_overhead --preset small --device cuda --overlap on

The engine runs as it serves (its worker thread, an asyncio closed loop of clients on the
main thread): `rows` clients, a batch of at most `rows` rows, adapters drawn uniformly from
16, every caption `max_new_tokens` long (EOS is not a stop here: each row runs its full
length, so the batch holds `rows` rows and joins come at a steady rate). Each iteration of the
step loop is timed on the worker thread, and so is every call inside it that runs the model:
the LM forward (prefill and decode), the vision encoder. Host time = the iteration's time less
those: scheduling, routing and mask metadata, KV bookkeeping, the host read, result delivery.
Iterations that ran no decode step (the worker idle) are left out.

Measured with the instrumented classes of whichever tree is imported (`StepLoop.iterate`,
`ContextPEFTModel.lm_forward`, `Backbone.encode_images` exist on every version since the
continuous-batching engine), so the same file measures an older checkout:
    PYTHONPATH=/tmp/ctxpeft-before python benchmarks/step_overhead.py ...
On CUDA the forward's time is its launch time (host) unless CTXPEFT_SYNC_TIMING=1 adds a
synchronisation after each call (then it is the device's). With overlap on (`--overlap on`,
the default on CUDA) the host waits for the device in the token read instead, so compare the
mean step time (steps per second) of `--overlap off` and `--overlap on` without
CTXPEFT_SYNC_TIMING: that is what overlap changes.
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
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
ADAPTERS = 16
TENANT = "bench"


class StepClock:
    """Per-iteration timings of the worker thread, taken by wrapping methods of the engine's
    classes (restored on exit)."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []
        self._current: dict[str, float] | None = None
        self._thread: int | None = None
        self._patches: list[tuple[Any, str, Any]] = []
        self.sync = os.environ.get("CTXPEFT_SYNC_TIMING") == "1" and torch.cuda.is_available()

    def _wrap(self, owner: Any, name: str, phase: str, outer: bool = False) -> None:
        original = owner.__dict__[name]
        clock = self

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if outer:
                clock._thread = threading.get_ident()
                clock._current = {"rows": 0.0}
            elif threading.get_ident() != clock._thread or clock._current is None:
                return original(*args, **kwargs)
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                if clock.sync:
                    torch.cuda.synchronize()
                spent = time.perf_counter() - started
                current = clock._current
                if current is not None:
                    current[phase] = current.get(phase, 0.0) + spent
                    current[phase + "_calls"] = current.get(phase + "_calls", 0.0) + 1
                    if outer:
                        if current.get("decode_rows"):
                            clock.steps.append(current)
                        clock._current = None

        setattr(owner, name, timed)
        self._patches.append((owner, name, original))

    def _count_rows(self, owner: Any) -> None:
        original = owner.__dict__["step"]
        clock = self

        @functools.wraps(original)
        def step(state: Any, *args: Any, **kwargs: Any) -> Any:
            if clock._current is not None and threading.get_ident() == clock._thread:
                clock._current["decode_rows"] = float(len(state.lengths))
                clock._current["width"] = float(state.width)
            return original(state, *args, **kwargs)

        owner.step = step
        self._patches.append((owner, "step", original))

    @contextmanager
    def installed(self) -> Iterator[StepClock]:
        from adapters.backbone import Backbone
        from adapters.decoding import DecodeState
        from adapters.model import ContextPEFTModel
        from service.engine.loop import StepLoop

        self._wrap(StepLoop, "iterate", "total", outer=True)
        self._wrap(ContextPEFTModel, "lm_forward", "forward")
        self._wrap(Backbone, "encode_images", "encode")
        self._count_rows(DecodeState)
        # The loop's phases where the tree has them (this tree's names; absent ones skipped).
        for name in ("_sweep_queue", "_leave", "_join", "_decode", "_advance"):
            if name in StepLoop.__dict__:
                self._wrap(StepLoop, name, name.strip("_"))
        try:
            yield self
        finally:
            for owner, name, original in reversed(self._patches):
                setattr(owner, name, original)


def summarise(steps: list[dict[str, float]], rows: int) -> dict[str, Any]:
    """Medians over the steps that decoded at least 3/4 of `rows` rows (the steady state)."""
    full = [s for s in steps if s["decode_rows"] >= max(1, rows * 3 // 4)]
    if not full:
        return {"rows": rows, "steps": 0}

    def med(values: list[float]) -> float:
        return round(statistics.median(values) * 1e3, 4)

    def host(s: dict[str, float]) -> float:
        return s["total"] - s.get("forward", 0.0) - s.get("encode", 0.0)

    totals = [s["total"] for s in full]
    hosts = [host(s) for s in full]
    decode_only = [s for s in full if s.get("forward_calls", 0) == 1]
    joining = [s for s in full if s.get("forward_calls", 0) > 1]
    phases = sorted(
        k
        for k in {k for s in full for k in s} - {"rows", "decode_rows", "width", "total"}
        if not k.endswith("_calls")
    )
    return {
        "rows": rows,
        "steps": len(full),
        "joining_steps": len(joining),
        "mean_rows": round(statistics.mean(s["decode_rows"] for s in full), 2),
        "mean_width": round(statistics.mean(s.get("width", 0.0) for s in full), 1),
        "step_ms": med(totals),
        "step_mean_ms": round(statistics.mean(totals) * 1e3, 4),
        # Host time per step: the mean over every step (joins included), and the medians of
        # the steps that only decode and of those where rows joined.
        "host_mean_ms": round(statistics.mean(hosts) * 1e3, 4),
        "host_decode_ms": med([host(s) for s in decode_only]) if decode_only else None,
        "host_join_ms": med([host(s) for s in joining]) if joining else None,
        "host_share": round(sum(hosts) / sum(totals), 4),
        # Mean ms per step spent in each timed call (phases overlap: _decode holds a forward).
        "phase_mean_ms": {
            p: round(sum(s.get(p, 0.0) for s in full) / len(full) * 1e3, 4) for p in phases
        },
    }


def run_point(
    preset: str,
    rows: int,
    seconds: float,
    max_new_tokens: int,
    seed: int,
    device: str = "cpu",
    overlap: str | None = None,
) -> dict[str, Any]:
    from adapters.format import save_adapter
    from benchmarks.cold_load import make_adapter
    from benchmarks.serving import build_backbone
    from service.engine import CaptionRequest, Engine, EngineConfig
    from service.store import AdapterStore

    # (An older tree's build_backbone takes no device: only a device other than the CPU
    # needs the argument.)
    backbone = (
        build_backbone(preset, seed) if device == "cpu" else build_backbone(preset, seed, device)
    )
    generator = torch.Generator().manual_seed(seed)
    size = backbone.config.image_size
    pixels = torch.randint(0, 256, (64, size, size, 3), generator=generator, dtype=torch.uint8)
    pics = [Image.fromarray(p.numpy(), "RGB") for p in pixels]
    with tempfile.TemporaryDirectory(prefix="ctxpeft-steps-") as work:
        store = AdapterStore(Path(work) / "store")
        for i in range(ADAPTERS):
            adapter = make_adapter(backbone, 8, seed=i)
            store.write_version(TENANT, f"a{i}", functools.partial(save_adapter, adapter))
        # `overlap` only when asked for: a tree older than the setting measures as it is.
        extra: dict[str, Any] = {} if overlap is None else {"overlap": overlap}
        config = EngineConfig(
            **extra,
            max_batch_size=rows,
            device_slots=ADAPTERS,
            max_rank=8,
            encoder_cache_entries=0,
            queue_size=4 * rows + 8,
            tenant_max_inflight=4 * rows + 8,
            default_max_new_tokens=max_new_tokens,
            max_new_tokens_limit=max_new_tokens,
        )
        clock = StepClock()
        with Engine(backbone, store, config) as engine, clock.installed():
            # EOS is no stop: every row decodes max_new_tokens (a steady batch of `rows`).
            engine.loop.eos = -1000
            pick = random.Random(seed)

            async def client(until: float) -> None:
                while time.perf_counter() < until:
                    request = CaptionRequest(
                        pics[pick.randrange(len(pics))],
                        (f"a{pick.randrange(ADAPTERS)}",),
                        tenant=TENANT,
                    )
                    await engine.caption(request)

            async def load() -> None:
                warm = time.perf_counter() + min(2.0, seconds)
                await asyncio.gather(*(client(warm) for _ in range(rows)))
                clock.steps.clear()  # warm: adapters bound, buffers grown
                until = time.perf_counter() + seconds
                await asyncio.gather(*(client(until) for _ in range(rows)))

            asyncio.run(load())
            steps = list(clock.steps)
    point = {"preset": preset, "device": str(backbone.device), "overlap": overlap}
    return {**point, **summarise(steps, rows)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="demo,small", help="backbone presets")
    parser.add_argument("--rows", default="1,8,32,128", help="running rows per point")
    parser.add_argument("--seconds", type=float, default=6.0, help="measured per point")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--label", default="", help="a name for this tree in the output")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    parser.add_argument(
        "--overlap",
        default=None,
        help="the engine's overlap setting, checked by EngineConfig (default: the tree's own)",
    )
    parser.add_argument("--out", type=Path, default=None, help="results JSON path")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    points = []
    for preset in args.preset.split(","):
        for rows in (int(r) for r in args.rows.split(",")):
            point = run_point(
                preset,
                rows,
                args.seconds,
                args.max_new_tokens,
                args.seed,
                args.device,
                args.overlap,
            )
            points.append(point)
            print(json.dumps(point), flush=True)
    result = {
        "label": args.label,
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": args.threads,
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "points": points,
    }
    print(table(points))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


def table(points: list[dict[str, Any]]) -> str:
    lines = [
        "| preset | rows | step ms (mean) | host ms (mean) | decode-only step | joining step "
        "| host share |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in points:
        if not p.get("steps"):
            continue
        lines.append(
            f"| {p['preset']} | {p['rows']} | {p['step_mean_ms']:.3f} | {p['host_mean_ms']:.3f} "
            f"| {_ms(p['host_decode_ms'])} | {_ms(p['host_join_ms'])} | "
            f"{p['host_share'] * 100:.1f}% |"
        )
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


if __name__ == "__main__":
    raise SystemExit(main())
