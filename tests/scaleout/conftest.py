"""One real local Ray cluster (loopback) serving the scaled-out service for every test in
tests/scaleout/test_ray_serve.py: 2 engine replicas of the tiny test backbone (saved to a
folder, as a replica loads it) behind one ingress, the test keys, and a store of 6 public
adapters p0..p5. The replicas are `GatedEngineReplica`s (EngineReplica with a test gate on
the vision encoder, gated_replica.py); each tenant may have TENANT_MAX_INFLIGHT rows in flight
and store TENANT_MAX_ADAPTERS adapters.

Starting the cluster and the application takes about a minute on 2 loaded cores, so it happens
once per module. Each test still stands alone, in any order: `ray_service` hands every test a
running application, deploying it again first when a test before it drained it or deleted it
(the shutdown test does), and `replica_targets()` names only live replicas (a killed one's
file stays behind, as Prometheus would see it).

    service.url, service.store, service.settings, service.replica_pids()
    service.replica_targets()      # the Prometheus file_sd targets the replicas wrote
    service.replicas.resolve.remote("acme", "news").result()   # a handle to the replicas
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from service.settings import Settings
from service.store import AdapterStore
from tests.e2e.conftest import KEYS_JSON, TINY_SETTINGS
from tests.e2e.serve_process import free_port
from tests.scaleout.gated_replica import GatedEngineReplica
from tests.service.adapter_fixtures import put, random_adapter, tiny_backbone

ROOT = Path(__file__).resolve().parents[2]
ADAPTERS = tuple(f"p{i}" for i in range(6))
REPLICAS = 2
TENANT_MAX_INFLIGHT = 8  # above the load tests' 6 clients; reached on purpose by the 429 test
TENANT_MAX_ADAPTERS = 2


@dataclass
class RayService:
    url: str
    root: Path
    settings: Settings
    store: AdapterStore
    replicas: Any  # DeploymentHandle of the EngineReplica deployment
    ingress: Any  # DeploymentHandle of the Ingress deployment
    token_file_before: bool
    tree_before: set[str]
    app: Any = None  # the bound application, to deploy it again

    def replica_pids(self) -> list[int]:
        """The engine replicas' processes (Ray names them after the deployment)."""
        return [
            p.pid
            for p in psutil.Process().children(recursive=True)
            if "EngineReplica" in " ".join(_cmdline(p))
        ]

    def replica_targets(self, live_only: bool = True) -> list[dict[str, Any]]:
        """The file_sd target groups the replicas wrote (one file each); with `live_only`,
        those of replicas whose process is alive (a SIGKILLed replica leaves its file)."""
        groups: list[dict[str, Any]] = []
        for path in sorted((self.root / "targets").glob("*.json")):
            groups += json.loads(path.read_text())
        if live_only:
            groups = [g for g in groups if psutil.pid_exists(int(g["labels"]["pid"]))]
        return groups

    def running(self) -> bool:
        """The application is deployed, running and admitting (not drained)."""
        from ray import serve

        from service.scaleout.application import APP_NAME

        app = serve.status().applications.get(APP_NAME)
        if app is None or app.status != "RUNNING":
            return False
        try:
            return httpx.get(f"{self.url}/readyz", timeout=30).status_code == 200
        except httpx.TransportError:
            return False

    def deploy(self) -> None:
        """Deploy the application (again), blocking until it serves, and take new handles."""
        from ray import serve

        from service.scaleout.application import APP_NAME

        serve.run(self.app, name=APP_NAME, route_prefix="/")
        self.replicas = serve.get_deployment_handle("EngineReplica", APP_NAME)
        self.ingress = serve.get_deployment_handle("Ingress", APP_NAME)


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []


def untracked_paths() -> set[str]:
    """Every untracked or ignored path of the working tree (what a run may have left)."""
    out = subprocess.run(
        ["git", "status", "--porcelain", "--ignored", "--untracked-files=all"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {line[3:] for line in out.splitlines()}


@pytest.fixture
def ray_service(ray_cluster: RayService) -> RayService:
    """The module's service, running: deployed again if a test before drained or deleted it."""
    if not ray_cluster.running():
        ray_cluster.deploy()
    return ray_cluster


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayService]:
    pytest.importorskip("ray")

    from service.scaleout import cluster
    from service.scaleout.application import build_app
    from service.scaleout.replica import ReplicaOptions

    root = tmp_path_factory.mktemp("scaleout")
    backbone = tiny_backbone()
    backbone.save(root / "backbone")
    store = AdapterStore(root / "adapters")
    for seed, name in enumerate(ADAPTERS, start=1):
        put(store, "public", name, random_adapter(backbone, seed))
    port = free_port()
    settings = Settings(
        **{**TINY_SETTINGS, "backbone": str(root / "backbone")},
        runtime_dir=root,
        store_dir=root / "adapters",
        keys=KEYS_JSON,
        port=port,
        drain_timeout_s=20.0,
        tenant_max_inflight=TENANT_MAX_INFLIGHT,
        tenant_max_adapters=TENANT_MAX_ADAPTERS,
    )
    token_file_before = (Path.home() / ".ray" / "auth_token").exists()
    tree_before = untracked_paths()
    # Ray's workers inherit this environment: they import this checkout's packages.
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    cluster.start_local(num_cpus=2, http_port=port)
    try:
        options = ReplicaOptions(
            adapters_per_replica=16, torch_threads=1, metrics_dir=str(root / "targets")
        )
        app = build_app(
            settings,
            REPLICAS,
            cpus_per_replica=0.5,
            ingress_cpus=0.25,
            options=options,
            replica_class=GatedEngineReplica,
        )
        service = RayService(
            url=f"http://127.0.0.1:{port}",
            root=root,
            settings=settings,
            store=store,
            replicas=None,
            ingress=None,
            token_file_before=token_file_before,
            tree_before=tree_before,
            app=app,
        )
        service.deploy()
        yield service
    finally:
        cluster.stop()
