"""Serving while a fine-tuning job trains: caption latency with a job running against idle,
in one run, on one machine, black-box over HTTP.

    python -m benchmarks.serving_while_training --backbone var/backbones/demo \
        --store var/adapters --adapter count

One real service (create_app on uvicorn, the engine in-process, fine-tuning on, the default
job settings: one worker process at nice 10 with one torch thread) over a copy of the store.
Closed-loop load: `--clients` clients each send POST /caption of a synthetic scene (a fresh
one per request, so the encoder cache never answers) with `--adapter`, one after the other,
`--requests` per phase. Phases, in this order: idle, training (a job of `--examples` `count`
examples and `--epochs` epochs is created and the phase starts once its first metrics event
is in: the worker is past loading and encoding, it trains), idle again (after the job is
cancelled and its worker has exited). The two idle phases are pooled as "idle".

Rows (per phase: p50, p90, p99 and mean of the end-to-end latency, throughput, the 1-minute
load average at its end) go to benchmarks/results/serving_while_training.json; docs/BENCHMARKS.md
has the table. Target: p99 with a job training <= 1.5 x idle p99.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import shutil
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from adapters.backbone import Backbone
from adapters.data.synthetic import SyntheticCaptions
from service.api.app import create_app
from service.engine import Engine, EngineConfig
from service.settings import Settings
from service.store import AdapterStore

RESULTS = Path(__file__).parent / "results" / "serving_while_training.json"


@contextmanager
def serve(app: Any) -> Iterator[str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        sock.close()


def png(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def training_file(examples: int) -> bytes:
    lines = []
    source = SyntheticCaptions("count", "train", examples, seed=11)
    for index in range(len(source)):
        image, text = source[index]
        url = "data:image/png;base64," + base64.b64encode(png(image)).decode()
        user = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}
        lines.append(json.dumps({"messages": [user, {"role": "assistant", "content": text}]}))
    return ("\n".join(lines) + "\n").encode()


class Load:
    """Closed-loop caption clients; every request a different image."""

    def __init__(self, url: str, adapter: str, clients: int) -> None:
        self.url, self.adapter, self.clients = url, adapter, clients
        self.source = SyntheticCaptions("count", "test", 100_000, seed=3)
        self.next = 0
        self.lock = threading.Lock()

    def image(self) -> bytes:
        with self.lock:
            index, self.next = self.next, self.next + 1
        return png(self.source[index][0])

    def phase(self, requests: int) -> dict[str, Any]:
        latencies: list[float] = []
        per_client = requests // self.clients

        def client() -> None:
            with httpx.Client(timeout=120) as http:
                for _ in range(per_client):
                    image = self.image()
                    started = time.perf_counter()
                    answer = http.post(
                        f"{self.url}/caption",
                        files={"image": ("i.png", image, "image/png")},
                        data={"adapter": self.adapter},
                    )
                    elapsed = time.perf_counter() - started
                    answer.raise_for_status()
                    latencies.append(elapsed * 1000)

        started = time.perf_counter()
        with ThreadPoolExecutor(self.clients) as pool:
            for future in [pool.submit(client) for _ in range(self.clients)]:
                future.result()
        wall = time.perf_counter() - started
        return {"latencies_ms": latencies, "wall_s": wall, "load_1m": os.getloadavg()[0]}


def summary(latencies: list[float], wall_s: float) -> dict[str, float]:
    ordered = sorted(latencies)

    def q(p: float) -> float:
        return ordered[min(len(ordered) - 1, round(p * (len(ordered) - 1)))]

    return {
        "requests": len(ordered),
        "p50_ms": round(q(0.50), 1),
        "p90_ms": round(q(0.90), 1),
        "p99_ms": round(q(0.99), 1),
        "mean_ms": round(statistics.fmean(ordered), 1),
        "throughput_rps": round(len(ordered) / wall_s, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="var/backbones/demo")
    parser.add_argument("--store", default="var/adapters")
    parser.add_argument("--adapter", default="count")
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--requests", type=int, default=400, help="per phase")
    parser.add_argument("--examples", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--label", default="", help="a note stored with the rows")
    parser.add_argument("--no-save", action="store_true", help="do not append to the results")
    parser.add_argument(
        "--setting",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a service setting for the run (e.g. jobs_sched_idle=false); repeatable",
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        runtime = Path(tmp)
        shutil.copytree(args.store, runtime / "adapters")
        settings = Settings(
            runtime_dir=runtime,
            store_dir=runtime / "adapters",
            backbone="demo",
            jobs_backbone=str(Path(args.backbone).resolve()),
            log_level="warning",
            **dict(item.split("=", 1) for item in args.setting),
        )
        backbone = Backbone.load(args.backbone)
        engine = Engine(
            backbone, AdapterStore(runtime / "adapters"), EngineConfig.from_settings(settings)
        )
        app = create_app(settings, engine=engine)
        with serve(app) as url:
            load = Load(url, args.adapter, args.clients)
            load.phase(20)  # warm-up: the adapter's first load, allocator, caches
            phases: dict[str, list[dict[str, Any]]] = {"idle": [], "training": []}
            phases["idle"].append(load.phase(args.requests))

            http = httpx.Client(base_url=f"{url}/v1", timeout=120)
            upload = http.post(
                "/files",
                files={"file": ("train.jsonl", training_file(args.examples))},
                data={"purpose": "fine-tune"},
            ).json()
            job = http.post(
                "/fine_tuning/jobs",
                json={
                    "model": "demo",
                    "training_file": upload["id"],
                    "method": {
                        "type": "supervised",
                        "supervised": {"hyperparameters": {"n_epochs": args.epochs}},
                    },
                },
            ).json()

            def metrics() -> list[dict[str, Any]]:
                page = http.get(f"/fine_tuning/jobs/{job['id']}/events?limit=100").json()
                return [e["data"] for e in page["data"] if e.get("type") == "metrics"]

            while not metrics():
                time.sleep(0.2)
            first_step = max(m["step"] for m in metrics())
            phases["training"].append(load.phase(args.requests))
            steps = max(m["step"] for m in metrics()) - first_step
            status = http.get(f"/fine_tuning/jobs/{job['id']}").json()["status"]
            assert status == "running", f"the job ended during the phase ({status})"
            http.post(f"/fine_tuning/jobs/{job['id']}/cancel")
            while http.get(f"/fine_tuning/jobs/{job['id']}").json()["status"] != "cancelled":
                time.sleep(0.2)
            phases["idle"].append(load.phase(args.requests))

    rows: list[dict[str, Any]] = []
    for name, runs in phases.items():
        latencies = [x for run in runs for x in run["latencies_ms"]]
        row = {
            "phase": name,
            **summary(latencies, sum(r["wall_s"] for r in runs)),
            "load_1m": [round(r["load_1m"], 2) for r in runs],
        }
        if name == "training":
            row["training_steps_during_phase"] = steps
        rows.append(row)
    idle, training = rows
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
        "label": args.label,
        "clients": args.clients,
        "adapter": args.adapter,
        "job": {"examples": args.examples, "epochs": args.epochs},
        "rows": rows,
        "p50_ratio": round(float(training["p50_ms"]) / float(idle["p50_ms"]), 2),
        "p99_ratio": round(float(training["p99_ms"]) / float(idle["p99_ms"]), 2),
        "when": time.strftime("%Y-%m-%d %H:%M"),
    }
    result["settings"] = args.setting
    if not args.no_save:
        previous = json.loads(RESULTS.read_text()) if RESULTS.is_file() else []
        RESULTS.write_text(json.dumps([*previous, result], indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
