"""Fine-tuning under `ctxpeft serve --ray`: the ingress's supervisor runs each job's worker in
a Ray task (jobs_ray_cpus of the cluster's CPUs), publishes through the replicas
(registry.add_version on a replica, as an upload), and the replicas serve the new model.

One local cluster (loopback) with one engine replica of the tiny test backbone, started once
for this module (about a minute on 2 loaded cores).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from service.settings import Settings
from service.store import AdapterStore
from tests.e2e.conftest import ACME_ADMIN, KEYS_JSON, TINY_SETTINGS
from tests.e2e.fine_tuning_helpers import chat_jsonl, events, examples, wait_status, wait_until
from tests.e2e.openai_helpers import image_message
from tests.e2e.serve_process import free_port
from tests.scaleout.conftest import ROOT
from tests.service.adapter_fixtures import put, random_adapter, tiny_backbone


@pytest.fixture(scope="module")
def ray_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    pytest.importorskip("ray")
    from ray import serve

    from service.scaleout import cluster
    from service.scaleout.application import APP_NAME, build_app
    from service.scaleout.replica import ReplicaOptions

    root = tmp_path_factory.mktemp("ray-jobs")
    backbone = tiny_backbone()
    backbone.save(root / "backbone")
    put(AdapterStore(root / "adapters"), "public", "p0", random_adapter(backbone, 1))
    port = free_port()
    settings = Settings(
        **{**TINY_SETTINGS, "backbone": str(root / "backbone")},
        runtime_dir=root,
        store_dir=root / "adapters",
        keys=KEYS_JSON,
        port=port,
        jobs_ray_cpus=0.5,
    )
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    cluster.start_local(num_cpus=2, http_port=port)
    try:
        options = ReplicaOptions(adapters_per_replica=4, torch_threads=1)
        app = build_app(settings, 1, cpus_per_replica=0.5, ingress_cpus=0.25, options=options)
        serve.run(app, name=APP_NAME, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def client(ray_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{ray_url}/v1", api_key=ACME_ADMIN, max_retries=0, timeout=120)


def _create(client: openai.OpenAI, epochs: int, examples: int = 24) -> Any:
    url = str(client.base_url).removesuffix("/").removesuffix("/v1")
    upload = client.files.create(
        file=("t.jsonl", chat_jsonl("count", "train", examples, seed=5)), purpose="fine-tune"
    )
    summary = upload.model_extra["training_data"]  # type: ignore[index]
    assert summary["tokens_per_epoch"] == 3 * examples  # counted with the replicas' tokenizer
    method = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": epochs}}}
    model = httpx.get(f"{url}/info", timeout=30).json()["backbone"]
    return client.fine_tuning.jobs.create(model=model, training_file=upload.id, method=method)


def test_a_job_trains_in_a_ray_task_and_the_replicas_serve_it(client: openai.OpenAI) -> None:
    job = wait_status(client, _create(client, 3).id, {"succeeded"})
    started = next(e.message for e in events(client, job.id) if "job started" in e.message)
    assert "in a Ray task with 0.5 CPUs" in started
    image, _ = examples("count", "test", 1)[0]
    completion = client.chat.completions.create(
        model=job.fine_tuned_model, messages=image_message(image)
    )
    assert completion.system_fingerprint == f"{job.fine_tuned_model}@v1"
    assert job.fine_tuned_model in [m.id for m in client.models.list()]


def test_a_ray_job_can_be_cancelled(client: openai.OpenAI) -> None:
    job = _create(client, 100, examples=200)  # 2,300 steps: cancelled long before
    wait_until(lambda: any(e.type == "metrics" for e in events(client, job.id)), "a metrics event")
    client.fine_tuning.jobs.cancel(job.id)
    done = wait_status(client, job.id, {"cancelled"})
    assert done.fine_tuned_model is None
