"""Tenant fair share (issue 23): one tenant's caption latency alone, then while two other
tenants flood the service, in one run, on one machine, black-box over HTTP.

    python -m benchmarks.fair_share                  # 20 s phases after 3 s warm-ups
    python -m benchmarks.fair_share --quick          # 5 s phases, a smoke run
    python -m benchmarks.fair_share --save           # JSON to benchmarks/results/fair_share.json

The service is the real one as `ctxpeft serve` runs it by default: `create_app(Settings(...))`
on uvicorn in this process (the lifespan loads the engine, `Engine.from_settings`), the `demo`
backbone and its public demo adapters, every setting at its default (max_batch_size 32,
tenant_max_inflight 32, ...) except the keys: three tenants a, b and c, one caption key each,
equal weights, the default priority. The demo is built first where it is missing, with the
function `ctxpeft demo` runs (`adapters.demo.build_demo`), into `--runtime-dir` (default the
checkout's `var/`); the service runs in a temporary runtime folder (its usage database and job
folders stay there) that links to that folder's backbones and reads its adapter store.

The workload: every request is POST /caption of a synthetic scene (the demo's own sample
pictures, `adapters.data.samples`; each tenant cycles through 1,024 different ones, more than
the encoder cache's 512 entries, so the cache does not answer: the JSON counts the answers
with `usage.image_cached`) with `--adapter` (public
`describe` by default, the demo task with the longest captions). Tenant b sends one
request at a time, `--b-tokens` (24) max_new_tokens; tenants a and c each keep exactly
`--flood` (31) requests in flight (closed loop: 31 clients each, a new request as soon as one
is answered) with `--flood-tokens` (64), so the 32-row batch is full and a backlog waits.

Phases: "alone" (b only: `--warmup` s not measured, then `--duration` s) and "flood" (a and c
start; `--warmup` s for the batch to fill, then b for `--duration` s while a's and c's answers
in that window are counted). For b in each phase: requests, client-side latency p50/p99 and
the answer's `timings_ms.queue` (admission to the start of its batch) p50/p99, and the tokens
the captions really had (EOS ends demo captions early). For a and c: captions/s in the window.
From /metrics before and after each window: rows per decode step (is the batch full?) and
decode steps/s. Target (issue 23): b's queue p99 under the flood <= 4 x b's latency p99 alone.

Prints a Markdown table and writes JSON to `--out` (default /tmp/ctxpeft-fair-share.json):
the rows, b's raw samples, the load average before and after, the platform, torch's version
and threads, the settings that matter.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch
from prometheus_client.parser import text_string_to_metric_families

from adapters.backbone_build import BACKBONES_DIR
from adapters.data.samples import SceneSamples
from adapters.demo import DemoPlan, build_demo
from benchmarks.live_server import live_server
from service.api.app import create_app
from service.commands.demo import StoreSink
from service.settings import EngineConfig, Settings
from service.store import AdapterStore

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "fair_share.json"
DEFAULT_OUT = Path(tempfile.gettempdir()) / "ctxpeft-fair-share.json"
TENANTS = ("a", "b", "c")
PROBE = "b"  # the tenant that sends one request at a time
FLOODERS = ("a", "c")
READY_TIMEOUT_S = 120.0
TIMEOUT_S = 120.0  # one request, client side: far above anything a phase should see
TARGET_RATIO = 4.0
# Pictures each tenant cycles through: more than the encoder cache holds (encoder_cache_entries,
# 512, one LRU for all tenants), so a picture is always evicted before it comes round again.
PICTURES_PER_TENANT = 1024
TRANSPORT_ERROR = 0  # the status recorded for a request that got no HTTP answer


def key(tenant: str) -> str:
    return f"fair-share-bench-{tenant}-0001"


def keys_json() -> str:
    """One caption key per tenant; equal weights and the default priority (none given)."""
    entries = [{"key": key(t), "tenant": t, "rights": ["caption"]} for t in TENANTS]
    return json.dumps({"keys": entries})


# --- the demo and the service ---------------------------------------------------------------


def ensure_demo(runtime: Path) -> float:
    """Build what is missing of the demo into `runtime` (as `ctxpeft demo`); seconds taken."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as `ctxpeft demo`: the tiny model trains fastest on one thread
    try:
        store = AdapterStore(runtime / "adapters")
        report = build_demo(runtime, StoreSink(store), DemoPlan(), progress=False)
    finally:
        torch.set_num_threads(threads)
    state = "up to date" if report.up_to_date else "built"
    print(f"demo {state} in {report.seconds:.1f} s: {report.backbone_dir}", flush=True)
    return report.seconds


def service_settings(runtime: Path, serve_dir: Path, flood: int) -> Settings:
    """Defaults but for the keys and the folders; tenant_max_inflight raised only if needed."""
    (serve_dir / BACKBONES_DIR).symlink_to((runtime / BACKBONES_DIR).resolve())
    settings = Settings(
        runtime_dir=serve_dir,
        store_dir=(runtime / "adapters").resolve(),
        backbone="demo",
        keys=keys_json(),
    )
    if settings.tenant_max_inflight < flood:
        print(f"tenant_max_inflight raised from {settings.tenant_max_inflight} to {flood}")
        settings.tenant_max_inflight = flood
    else:
        print(
            f"tenant_max_inflight {settings.tenant_max_inflight} (default) >= {flood} in "
            "flight per flooding tenant: unchanged"
        )
    return settings


@contextmanager
def running_service(settings: Settings) -> Iterator[str]:
    """The app on uvicorn in this process; yields its URL once /readyz says the engine runs."""
    with live_server(create_app(settings)) as url:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while httpx.get(f"{url}/readyz", timeout=10).status_code != 200:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the engine was not ready within {READY_TIMEOUT_S} s")
            time.sleep(0.1)
        yield url


# --- requests ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Body:
    """One encoded multipart caption request (built before the phases: cheap to send)."""

    content: bytes
    content_type: str


def caption_bodies(count: int, image_size: int, adapter: str, tokens: int, seed: int) -> list[Body]:
    """`count` requests, each a different synthetic scene (the demo's sample pictures)."""
    samples, rng = SceneSamples(image_size), random.Random(seed)
    pictures: dict[bytes, None] = {}  # a few scenes repeat: drawn until `count` differ
    while len(pictures) < count:
        pictures[samples.draw(rng).png] = None
    bodies = []
    for picture in pictures:
        request = httpx.Request(
            "POST",
            "http://bench/caption",
            files={"image": ("scene.png", picture, "image/png")},
            data={"adapter": adapter, "max_new_tokens": str(tokens)},
        )
        bodies.append(Body(request.read(), request.headers["content-type"]))
    return bodies


class Bodies:
    """Hands out the bodies in turn, from any thread (a fresh picture per request as long as
    there are more bodies than requests of a run; then the cycle starts again)."""

    def __init__(self, bodies: list[Body]) -> None:
        self._bodies, self._next, self._lock = bodies, 0, threading.Lock()

    def __call__(self) -> Body:
        with self._lock:
            body = self._bodies[self._next % len(self._bodies)]
            self._next += 1
        return body


@dataclass(frozen=True)
class Answer:
    finished: float  # time.perf_counter() when the answer was in
    status: int
    latency_ms: float
    queue_ms: float | None = None
    tokens: int | None = None
    image_cached: bool | None = None


def parse(status: int, started: float, finished: float, payload: bytes) -> Answer:
    latency_ms = (finished - started) * 1000
    if status != 200:
        return Answer(finished, status, latency_ms)
    answer = json.loads(payload)
    return Answer(
        finished,
        status,
        latency_ms,
        queue_ms=float(answer["timings_ms"]["queue"]),
        tokens=int(answer["tokens"]),
        image_cached=bool(answer["usage"]["image_cached"]),
    )


def sequential(url: str, tenant: str, bodies: Bodies, seconds: float) -> list[Answer]:
    """One request at a time for `seconds`: the probe tenant."""
    answers = []
    headers = {"Authorization": f"Bearer {key(tenant)}"}
    with httpx.Client(headers=headers, timeout=TIMEOUT_S) as client:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            body = bodies()
            started = time.perf_counter()
            try:
                response = client.post(
                    f"{url}/caption",
                    content=body.content,
                    headers={"content-type": body.content_type},
                )
            except httpx.TransportError:
                answers.append(Answer(time.perf_counter(), TRANSPORT_ERROR, 0.0))
                continue
            answers.append(
                parse(response.status_code, started, time.perf_counter(), response.content)
            )
    return answers


@dataclass
class Flood:
    """Tenants each keeping `inflight` requests in flight (closed loop), in one asyncio loop
    on a thread of its own, until stopped. Answers are recorded per tenant."""

    url: str
    bodies: dict[str, Bodies]
    inflight: int
    answers: dict[str, list[Answer]] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self.answers = {tenant: [] for tenant in self.bodies}
        self._thread = threading.Thread(target=asyncio.run, args=(self._run(),), daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=TIMEOUT_S)

    async def _run(self) -> None:
        limits = httpx.Limits(
            max_connections=self.inflight, max_keepalive_connections=self.inflight
        )
        clients = [
            httpx.AsyncClient(
                headers={"Authorization": f"Bearer {key(tenant)}"}, timeout=TIMEOUT_S, limits=limits
            )
            for tenant in self.bodies
        ]
        try:
            await asyncio.gather(
                *(
                    self._client(client, tenant)
                    for client, tenant in zip(clients, self.bodies, strict=True)
                    for _ in range(self.inflight)
                )
            )
        finally:
            for client in clients:
                await client.aclose()

    async def _client(self, client: httpx.AsyncClient, tenant: str) -> None:
        bodies, answers = self.bodies[tenant], self.answers[tenant]
        while not self._stop.is_set():
            body = bodies()
            started = time.perf_counter()
            try:
                response = await client.post(
                    f"{self.url}/caption",
                    content=body.content,
                    headers={"content-type": body.content_type},
                )
            except httpx.TransportError:
                answers.append(Answer(time.perf_counter(), TRANSPORT_ERROR, 0.0))
                continue
            answers.append(
                parse(response.status_code, started, time.perf_counter(), response.content)
            )


# --- measuring --------------------------------------------------------------------------------


def scrape(url: str) -> dict[str, float]:
    """The engine's step counters from /metrics (open: the benchmark sets no scrape token)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    wanted = {"ctxpeft_batch_size_sum", "ctxpeft_batch_size_count", "ctxpeft_engine_steps_total"}
    values = {name: 0.0 for name in wanted}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted:
                values[sample.name] += sample.value
    return values


def engine_rates(
    before: dict[str, float], after: dict[str, float], seconds: float
) -> dict[str, float]:
    rows = after["ctxpeft_batch_size_sum"] - before["ctxpeft_batch_size_sum"]
    steps = after["ctxpeft_batch_size_count"] - before["ctxpeft_batch_size_count"]
    decode = after["ctxpeft_engine_steps_total"] - before["ctxpeft_engine_steps_total"]
    return {
        "rows_per_step": round(rows / steps, 2) if steps else 0.0,
        "steps_per_s": round(decode / seconds, 1),
    }


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), linear between the nearest ranks."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def probe_summary(answers: list[Answer]) -> dict[str, Any]:
    """The probe tenant's row of one phase."""
    ok = [a for a in answers if a.status == 200]
    latency = [a.latency_ms for a in ok]
    queue = [a.queue_ms for a in ok if a.queue_ms is not None]
    tokens = [a.tokens for a in ok if a.tokens is not None]
    return {
        "requests": len(ok),
        "errors": sorted({a.status for a in answers if a.status != 200}),
        "error_count": len(answers) - len(ok),
        "latency_p50_ms": round(percentile(latency, 50), 1),
        "latency_p99_ms": round(percentile(latency, 99), 1),
        "queue_p50_ms": round(percentile(queue, 50), 1),
        "queue_p99_ms": round(percentile(queue, 99), 1),
        "mean_tokens": round(statistics.fmean(tokens), 2) if tokens else None,
        "max_tokens": max(tokens, default=None),
        "image_cached": sum(1 for a in ok if a.image_cached),
        "samples": {"latency_ms": [round(x, 2) for x in latency], "queue_ms": queue},
    }


def flood_summary(answers: list[Answer], start: float, end: float) -> dict[str, Any]:
    """A flooding tenant's answers that came in during [start, end)."""
    window = [a for a in answers if start <= a.finished < end]
    ok = [a for a in window if a.status == 200]
    tokens = [a.tokens for a in ok if a.tokens is not None]
    return {
        "captions": len(ok),
        "captions_per_s": round(len(ok) / (end - start), 1),
        "errors": sorted({a.status for a in window if a.status != 200}),
        "error_count": len(window) - len(ok),
        "mean_tokens": round(statistics.fmean(tokens), 2) if tokens else None,
        "max_tokens": max(tokens, default=None),
        "image_cached": sum(1 for a in ok if a.image_cached),
        "latency_p50_ms": round(percentile([a.latency_ms for a in ok], 50), 1),
        "queue_p50_ms": round(
            percentile([a.queue_ms for a in ok if a.queue_ms is not None], 50), 1
        ),
    }


def measured(url: str, run: Callable[[], list[Answer]]) -> tuple[list[Answer], dict[str, Any]]:
    """Run one measured window; its answers and the engine's rates over it."""
    before, started = scrape(url), time.perf_counter()
    answers = run()
    seconds = time.perf_counter() - started
    window = {"start": started, "end": started + seconds, "seconds": round(seconds, 2)}
    return answers, {**window, **engine_rates(before, scrape(url), seconds)}


def run_phases(url: str, args: argparse.Namespace, image_size: int) -> dict[str, Any]:
    count = PICTURES_PER_TENANT
    probe = Bodies(caption_bodies(count, image_size, args.adapter, args.b_tokens, seed=1))
    flood_bodies = {
        tenant: Bodies(
            caption_bodies(count, image_size, args.adapter, args.flood_tokens, seed=2 + i)
        )
        for i, tenant in enumerate(FLOODERS)
    }
    phases: dict[str, Any] = {}

    print(f"phase alone: {args.warmup:g} s warm-up, {args.duration:g} s measured", flush=True)
    sequential(url, PROBE, probe, args.warmup)
    answers, engine = measured(url, lambda: sequential(url, PROBE, probe, args.duration))
    phases["alone"] = {"b": probe_summary(answers), "engine": engine}

    print(f"phase flood: {args.warmup:g} s warm-up, {args.duration:g} s measured", flush=True)
    flood = Flood(url, flood_bodies, args.flood)
    flood.start()
    try:
        time.sleep(args.warmup)  # the batch fills and the backlog builds
        answers, engine = measured(url, lambda: sequential(url, PROBE, probe, args.duration))
    finally:
        flood.stop()
    phases["flood"] = {
        "b": probe_summary(answers),
        **{t: flood_summary(flood.answers[t], engine["start"], engine["end"]) for t in FLOODERS},
        "engine": engine,
    }
    return phases


def ratios(phases: dict[str, Any]) -> dict[str, float]:
    alone, flood = phases["alone"]["b"], phases["flood"]["b"]

    def ratio(a: float, b: float) -> float:
        return round(a / b, 2) if b else float("nan")

    return {
        "queue_p99_flood_over_latency_p99_alone": ratio(
            flood["queue_p99_ms"], alone["latency_p99_ms"]
        ),
        "queue_p99_flood_over_queue_p99_alone": ratio(flood["queue_p99_ms"], alone["queue_p99_ms"]),
        "latency_p99_flood_over_alone": ratio(flood["latency_p99_ms"], alone["latency_p99_ms"]),
    }


# --- reporting --------------------------------------------------------------------------------


def table(phases: dict[str, Any]) -> str:
    lines = [
        "| phase | b requests | b p50 ms | b p99 ms | b queue p50 ms | b queue p99 ms "
        "| b tokens (mean) | a captions/s | c captions/s | a, c tokens (mean) "
        "| rows/step | steps/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, phase in phases.items():
        b, engine = phase["b"], phase["engine"]
        flooders = [phase.get(t) for t in FLOODERS]
        rates = [f"{f['captions_per_s']}" if f else "-" for f in flooders]
        tokens = ", ".join(str(f["mean_tokens"]) for f in flooders if f) or "-"
        lines.append(
            f"| {name} | {b['requests']} | {b['latency_p50_ms']} | {b['latency_p99_ms']} "
            f"| {b['queue_p50_ms']} | {b['queue_p99_ms']} | {b['mean_tokens']} "
            f"| {rates[0]} | {rates[1]} | {tokens} "
            f"| {engine['rows_per_step']} | {engine['steps_per_s']} |"
        )
    return "\n".join(lines)


def eos_notes(phases: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """Where captions ended at EOS before max_new_tokens (the answers' `tokens`)."""
    asked = {PROBE: args.b_tokens, **dict.fromkeys(FLOODERS, args.flood_tokens)}
    notes = []
    for name, phase in phases.items():
        for tenant in TENANTS:
            row = phase.get(tenant)
            if row and row["mean_tokens"] is not None and row["mean_tokens"] < asked[tenant]:
                notes.append(
                    f"{name}: {tenant}'s captions had {row['mean_tokens']} tokens on average "
                    f"(most {row['max_tokens']}) of max_new_tokens {asked[tenant]}: EOS ended them"
                )
    return notes


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        )
    except OSError:
        return None
    return out.stdout.strip() or None


def environment() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "commit": git_commit(),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--duration", type=float, default=20.0, help="measured s per phase")
    parser.add_argument("--warmup", type=float, default=3.0, help="s before each measurement")
    parser.add_argument("--quick", action="store_true", help="5 s phases, 2 s warm-ups")
    parser.add_argument("--adapter", default="describe", help="a public demo adapter")
    parser.add_argument("--b-tokens", type=int, default=24, help="b's max_new_tokens")
    parser.add_argument("--flood-tokens", type=int, default=64, help="a's and c's")
    parser.add_argument("--flood", type=int, default=31, help="requests in flight per flooder")
    parser.add_argument("--runtime-dir", type=Path, default=ROOT / "var", help="the demo's")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--label", default="", help="a note stored with the result")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--save", action="store_true", help=f"write the JSON to {RESULTS}")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.warmup = 5.0, 2.0
    if args.save:
        args.out = RESULTS
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    demo_s = ensure_demo(args.runtime_dir)
    with tempfile.TemporaryDirectory(prefix="ctxpeft-fair-share-") as tmp:
        settings = service_settings(args.runtime_dir, Path(tmp), args.flood)
        image_size = DemoPlan().backbone.image_size
        with running_service(settings) as url:
            phases = run_phases(url, args, image_size)
    load_after = os.getloadavg()
    result = {
        "benchmark": "fair_share",
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "label": args.label,
        "environment": environment(),
        "load_avg_before": [round(x, 2) for x in load_before],
        "load_avg_after": [round(x, 2) for x in load_after],
        "demo_build_s": round(demo_s, 1),
        "workload": {
            "adapter": args.adapter,
            "b_max_new_tokens": args.b_tokens,
            "flood_max_new_tokens": args.flood_tokens,
            "flood_inflight_per_tenant": args.flood,
            "flood_tenants": list(FLOODERS),
            "duration_s": args.duration,
            "warmup_s": args.warmup,
        },
        "settings": {
            "max_batch_size": settings.max_batch_size,
            "tenant_max_inflight": settings.tenant_max_inflight,
            "queue_size": settings.queue_size,
            "max_new_tokens_limit": settings.max_new_tokens_limit,
            "scheduling": settings.scheduling,
            "weights": "equal (1)",
            "priority": "interactive (default)",
            "engine": EngineConfig.from_settings(settings).model_dump(),
        },
        "phases": phases,
        "ratios": ratios(phases),
        "target": f"b's queue p99 under the flood <= {TARGET_RATIO:g} x b's latency p99 alone",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print()
    print(table(phases))
    print()
    for name, value in result["ratios"].items():
        print(f"- {name}: {value}")
    target = result["ratios"]["queue_p99_flood_over_latency_p99_alone"]
    verdict = "met" if target <= TARGET_RATIO else "NOT met"
    print(f"- target ({result['target']}): {verdict}")
    for line in eos_notes(phases, args):
        print(f"- {line}")
    print(f"- load average before {result['load_avg_before']}, after {result['load_avg_after']}")
    print(f"JSON: {args.out}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
