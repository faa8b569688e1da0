"""Scaling out on Ray Serve (issue 15): adapter-affinity routing against adapter-oblivious
routing, and the Ray path's overhead against the single-process service.

    python -m benchmarks.scaleout                       # N=512, 2 replicas, Zipf(1.0)
    python -m benchmarks.scaleout --adapters 64 --requests 400   # a quick look

One local Ray cluster (loopback) runs two applications side by side, each 2 engine replicas
of the same backbone over the same store of N rank-8 context-specific LoRA adapters:
`affinity` (rows carry the tenant-qualified adapter id: Ray Serve model multiplexing) and
`oblivious` (no id: Ray's default power-of-two-choices by queue length, which ignores the
adapter like round-robin does). Both get the same Zipf sequence of (adapter, image) requests
over HTTP, in interleaved rounds, from `--concurrency` clients. After a warm-up of
`--warmup` requests each, we count adapter loads (disk -> CPU tier, CPU -> device slot, summed
over the replicas, from their `stats()`) per 1,000 requests and the throughput.

Each replica's CPU tier holds `--cache-adapters` adapter sets (by default N / replicas: the
cluster's memory could hold every adapter once) and Ray's multiplexing keeps as many ids per
replica. With affinity every adapter lives on one replica, so the caches add up; without it
each replica caches the same hot adapters and the tail misses everywhere.

Then the overhead: a third application with 1 replica against the single-process service
(uvicorn in this process, same settings), sequential requests alternating between the two:
latency p50 and p90.

Writes benchmarks/results/scaleout.json; docs/BENCHMARKS.md, "Scaling out on Ray Serve".
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import torch
from PIL import Image

from adapters.format import save_adapter
from benchmarks.serving import build_backbone, images, make_adapter
from benchmarks.workload import Picker
from service.adapter_cache import set_nbytes
from service.engine import Engine, EngineConfig
from service.settings import Settings
from service.store import AdapterStore

ROOT = Path(__file__).resolve().parents[1]
TENANT = "bench"


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def post(client: httpx.Client, url: str, adapter: str, image: bytes) -> tuple[int, float]:
    started = time.perf_counter()
    response = client.post(
        f"{url}/caption",
        files={"image": ("i.png", image, "image/png")},
        data={"adapter": adapter},
        timeout=120,
    )
    return response.status_code, time.perf_counter() - started


def replica_stats(handle: Any, replicas: int) -> dict[str, dict[str, Any]]:
    """Every replica's stats() (a plain call lands on a random replica)."""
    seen: dict[str, dict[str, Any]] = {}
    for _ in range(200):
        stats = handle.stats.remote().result(timeout_s=60)
        seen[stats["replica"]] = stats
        if len(seen) == replicas:
            return seen
    raise RuntimeError(f"only {len(seen)} of {replicas} replicas answered")


def loads(stats: dict[str, dict[str, Any]]) -> dict[str, int]:
    return {
        "cpu": sum(s["tiers"]["cpu_loads"] for s in stats.values()),
        "device": sum(s["tiers"]["device_loads"] for s in stats.values()),
        "hits": sum(s["hits"] for s in stats.values()),
        "misses": sum(s["misses"] for s in stats.values()),
    }


def drive(
    url: str, sequence: list[tuple[str, bytes]], concurrency: int, headers: dict[str, str]
) -> tuple[float, int]:
    """Send the requests with `concurrency` clients; (seconds, non-200 answers)."""
    errors = 0
    lock = threading.Lock()
    local = threading.local()

    def one(item: tuple[str, bytes]) -> None:
        nonlocal errors
        client = getattr(local, "client", None)
        if client is None:
            client = local.client = httpx.Client(headers=headers)
        status, _ = post(client, url, *item)
        if status != 200:
            with lock:
                errors += 1

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, sequence))
    return time.perf_counter() - started, errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=512)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--requests", type=int, default=2000, help="measured, per mode")
    parser.add_argument("--warmup", type=int, default=1000, help="per mode, not measured")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--cache-adapters", type=int, default=0, help="0: adapters / replicas")
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--latency-requests", type=int, default=100)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/scaleout.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="ctxpeft-scaleout-"))

    # --- a backbone folder and a store of N adapters ---------------------------------------
    backbone = build_backbone(args.preset, seed=0)
    backbone.save(work / "backbone")
    store = AdapterStore(work / "adapters")
    names = [f"a{i:03d}" for i in range(args.adapters)]
    adapter_bytes = 0
    for seed, name in enumerate(names):
        adapter = make_adapter(backbone, args.rank, seed)
        adapter_bytes = set_nbytes(adapter)
        store.write_version(TENANT, name, partial(save_adapter, adapter))
    cache_adapters = args.cache_adapters or args.adapters // args.replicas
    settings = Settings(
        backbone=str(work / "backbone"),
        runtime_dir=work,
        store_dir=work / "adapters",
        keys=json.dumps(
            {"keys": [{"key": "bench-key-000000000001", "tenant": TENANT, "rights": ["caption"]}]}
        ),
        default_max_new_tokens=args.max_new_tokens,
        cpu_cache_bytes=cache_adapters * adapter_bytes + adapter_bytes // 2,
        queue_size=512,
        tenant_max_inflight=512,
        log_level="warning",
    )
    pictures = [png(p) for p in images(8, backbone.config.image_size, seed=1)]

    def sequence(count: int, seed: int) -> list[tuple[str, bytes]]:
        picker = Picker(args.adapters, len(pictures), args.alpha, seed)
        return [(names[a], pictures[i]) for a, i in (picker() for _ in range(count))]

    from ray import serve

    from service.scaleout import cluster
    from service.scaleout.application import build_app
    from service.scaleout.replica import ReplicaOptions

    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    port = 18400
    # Logical CPUs: the two applications' 4 replicas and 2 ingresses share the machine's cores.
    cluster.start_local(num_cpus=2 * args.replicas + 2, http_port=port)
    url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": "Bearer bench-key-000000000001"}
    result: dict[str, Any] = {}
    try:
        options = ReplicaOptions(adapters_per_replica=cache_adapters, torch_threads=1)
        handles = {}
        for mode, affinity in (("affinity", True), ("oblivious", False)):
            app = build_app(
                settings,
                args.replicas,
                affinity=affinity,
                cpus_per_replica=1.0,
                ingress_cpus=0.5,
                options=options,
            )
            serve.run(app, name=mode, route_prefix=f"/{mode}")
            handles[mode] = serve.get_deployment_handle("EngineReplica", mode)

        warm = sequence(args.warmup, seed=1)
        measured = sequence(args.requests, seed=2)
        rounds = [measured[i :: args.rounds] for i in range(args.rounds)]
        modes: dict[str, dict[str, Any]] = {m: {"seconds": 0.0, "errors": 0} for m in handles}
        for mode in handles:  # warm-up: the caches and Ray's routing settle
            drive(f"{url}/{mode}", warm, args.concurrency, headers)
            modes[mode]["before"] = loads(replica_stats(handles[mode], args.replicas))
        for chunk in rounds:
            for mode in handles:
                seconds, errors = drive(f"{url}/{mode}", chunk, args.concurrency, headers)
                modes[mode]["seconds"] += seconds
                modes[mode]["errors"] += errors
        for mode in handles:
            after = loads(replica_stats(handles[mode], args.replicas))
            delta = {k: after[k] - modes[mode]["before"][k] for k in after}
            modes[mode].update(
                after=after,
                cpu_loads_per_1000=1000 * delta["cpu"] / args.requests,
                device_loads_per_1000=1000 * delta["device"] / args.requests,
                hit_rate=delta["hits"] / max(1, delta["hits"] + delta["misses"]),
                throughput_rps=args.requests / modes[mode]["seconds"],
            )
        a, o = modes["affinity"], modes["oblivious"]
        result["routing"] = modes
        result["routing"]["cpu_loads_ratio_oblivious_over_affinity"] = (
            o["cpu_loads_per_1000"] / a["cpu_loads_per_1000"] if a["cpu_loads_per_1000"] else None
        )
        result["routing"]["device_loads_ratio_oblivious_over_affinity"] = (
            o["device_loads_per_1000"] / a["device_loads_per_1000"]
            if a["device_loads_per_1000"]
            else None
        )
        result["routing"]["throughput_ratio_affinity_over_oblivious"] = (
            a["throughput_rps"] / o["throughput_rps"]
        )
        for mode in handles:
            serve.delete(mode)

        # --- overhead: Ray at one replica vs one process, sequential, alternating -------------
        serve.run(
            build_app(settings, 1, cpus_per_replica=1.0, ingress_cpus=0.5, options=options),
            name="one",
            route_prefix="/one",
        )
        result["overhead"] = _overhead(
            settings, store, f"{url}/one", headers, names, pictures, args
        )
    finally:
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)
    result["setup"] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch threads 1 per replica",
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "adapters": args.adapters,
        "replicas": args.replicas,
        "preset": args.preset,
        "rank": args.rank,
        "adapter_bytes": adapter_bytes,
        "cache_adapters_per_replica": cache_adapters,
        "device_slots": settings.device_slots,
        "zipf_alpha": args.alpha,
        "requests": args.requests,
        "warmup": args.warmup,
        "concurrency": args.concurrency,
        "max_new_tokens": args.max_new_tokens,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


def _overhead(
    settings: Settings,
    store: AdapterStore,
    ray_url: str,
    headers: dict[str, str],
    names: list[str],
    pictures: list[bytes],
    args: argparse.Namespace,
) -> dict[str, Any]:
    from adapters.backbone import Backbone
    from benchmarks.live_server import live_server
    from service.api.app import create_app

    # The replica's settings and backbone folder, in this process.
    backbone = Backbone.load(settings.backbone)
    engine = Engine(backbone, store, EngineConfig.from_settings(settings))
    app = create_app(settings, engine=engine)
    hot = names[:8]  # resident everywhere after the first round: the path, not the loads
    latencies: dict[str, list[float]] = {"single_process": [], "ray_one_replica": []}
    with live_server(app) as local_url, httpx.Client(headers=headers) as client:
        targets = {"single_process": local_url, "ray_one_replica": ray_url}
        for i in range(16):  # warm-up
            for url in targets.values():
                post(client, url, hot[i % len(hot)], pictures[i % len(pictures)])
        for i in range(args.latency_requests):
            for label, url in targets.items():
                status, seconds = post(client, url, hot[i % len(hot)], pictures[i % len(pictures)])
                if status == 200:
                    latencies[label].append(seconds)
    out: dict[str, Any] = {}
    for label, values in latencies.items():
        ordered = sorted(values)
        out[label] = {
            "n": len(values),
            "p50_ms": 1000 * statistics.median(ordered),
            "p90_ms": 1000 * ordered[int(0.9 * (len(ordered) - 1))],
        }
    out["p50_added_ms"] = out["ray_one_replica"]["p50_ms"] - out["single_process"]["p50_ms"]
    out["p50_ratio"] = out["ray_one_replica"]["p50_ms"] / out["single_process"]["p50_ms"]
    engine.close()
    return out


if __name__ == "__main__":
    main()
