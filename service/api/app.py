"""The FastAPI app factory.

    app = create_app(Settings())                 # loads the engine in the background
    app = create_app(settings, engine=engine)    # tests: an engine built in-process

Middlewares (outermost first): request id, body size limit. Routers: caption, adapters,
health (with /metrics and the web page), info and samples (what the page reads), openai
(/v1). One error shape for every 4xx/5xx; OpenAI's under /v1.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from service import __version__
from service.api.contract import install_contract
from service.api.engine_port import EnginePort
from service.api.errors import add_error_shape, install_error_handlers
from service.api.middleware import BodySizeLimitMiddleware, RequestIdMiddleware
from service.api.openai_schemas import OPENAI_PREFIX, openai_error_content
from service.api.routes import adapters, caption, health, info, openai, samples, usage
from service.api.routes import files as files_routes
from service.api.routes import fine_tuning as fine_tuning_routes
from service.api.state import ServiceState
from service.auth import KeyStore, metrics_token
from service.database import DATABASE_FILE, Database
from service.engine import Engine
from service.jobs.service import FineTuning, RunnerFactory
from service.metrics import ServiceMetrics, private_labels_allowed
from service.settings import Settings
from service.usage import UsageLedger

_DESCRIPTION = """\
**Try it:** *Authorize* with your API key (not needed when the service runs without keys),
list the adapters your key sees with `GET /adapters`, then `POST /caption` an image with one
of them, e.g. `curl -H "Authorization: Bearer $KEY" -F image=@photo.png -F adapter=describe
http://127.0.0.1:8000/caption`.

**Errors** all have one shape: `{"error": {"type", "message"}, "request_id"}`; the request id
is also in the `X-Request-ID` header (send your own to trace a request). 429 and 503 carry
`Retry-After`. The try-it page is at `/`, Prometheus metrics at `/metrics`.

**OpenAI-compatible:** `POST /v1/chat/completions` (the adapter is the `model`, the image a
`data:` URL) and `GET /v1/models`, for the official SDKs and tools; errors there use OpenAI's
shape `{"error": {"message", "type", "param", "code"}}` with the same statuses.
"""


def create_app(
    settings: Settings,
    engine: EnginePort | None = None,
    keys: KeyStore | None = None,
    metrics: ServiceMetrics | None = None,
    engine_factory: Callable[[ServiceMetrics], EnginePort] | None = None,
    job_runner: RunnerFactory | None = None,
) -> FastAPI:
    """Build the app. With no `engine`, the lifespan loads one from `settings` (or
    `engine_factory`) in a background thread; the app answers /healthz meanwhile.
    `job_runner` starts fine-tuning workers (default: child processes; the Ray ingress
    passes Ray tasks)."""
    metrics = metrics or ServiceMetrics(
        adapter_labels=settings.metrics_adapter_labels, backbone=settings.backbone
    )
    state = ServiceState(
        settings=settings,
        keys=keys if keys is not None else KeyStore.from_settings(settings),
        metrics=metrics,
        engine=engine,
        metrics_token=metrics_token(settings),
    )
    metrics.private_labels = private_labels_allowed(
        has_keys=not state.keys.empty, scrape_token=state.metrics_token is not None
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if state.engine is None:
            factory: Callable[[ServiceMetrics], EnginePort] = engine_factory or (
                lambda m: Engine.from_settings(settings, metrics=m)
            )
            state.load_in_background(lambda: factory(metrics))
        if settings.usage_ledger:  # who used what, across restarts (service.usage)
            state.usage = UsageLedger(
                Database(settings.runtime_dir / DATABASE_FILE), settings.usage_flush_s
            )
        if fine_tuning is not None:
            fine_tuning.start()
        yield
        if fine_tuning is not None:  # running jobs pause at their next step, resumable
            fine_tuning.close()
        state.close()
        if state.usage is not None:  # after the drain: every answered request is recorded
            state.usage.close()

    # FastAPIOffline: /docs (Swagger UI) and /redoc load their scripts from this server, not
    # from a CDN, so they work offline and the browser contacts nobody else.
    app = FastAPIOffline(
        title="ctxpeft",
        version=__version__,
        summary="Image captioning with many Context-PEFT adapters over one frozen backbone.",
        description=_DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.service = state
    # Fine-tuning (issue 22): /v1/files and /v1/fine_tuning/jobs, training in other processes.
    fine_tuning = FineTuning(settings, state, job_runner) if settings.jobs_enabled else None
    app.state.fine_tuning = fine_tuning
    install_error_handlers(app)
    install_contract(app, settings)
    add_error_shape(app, f"{OPENAI_PREFIX}/", openai_error_content)
    app.include_router(caption.router)
    app.include_router(adapters.router)
    app.include_router(health.router)
    app.include_router(openai.router)
    app.include_router(info.router)
    app.include_router(samples.router)
    app.include_router(usage.router)
    if fine_tuning is not None:
        app.include_router(files_routes.router)
        app.include_router(fine_tuning_routes.router)
    # add_middleware wraps: the last added is outermost, so the request id covers the 413.
    app.add_middleware(
        BodySizeLimitMiddleware,
        max_bytes=settings.max_body_bytes,
        on_reject=lambda: metrics.reject("too_large"),
        # A training file's upload may be larger than a caption request (+1 MiB of form).
        path_limits={files_routes.router.prefix: settings.files_max_bytes + (1 << 20)}
        if fine_tuning is not None
        else None,
    )
    app.add_middleware(RequestIdMiddleware)
    state.publish_build_info()
    return app
