"""Liveness, readiness, Prometheus metrics and the try-it web page."""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, Response

from service.api.deps import State
from service.api.errors import ApiError, error_responses
from service.api.schemas import Health

router = APIRouter(tags=["health"])


@router.get(
    "/healthz",
    response_model=Health,
    summary="Liveness: the process answers and its engine's worker runs",
    responses=error_responses(503),
)
async def healthz(state: State) -> Health:
    # 503 only when restarting the process is the cure: the engine's worker stopped.
    if state.engine is not None and not state.engine.alive:
        raise ApiError(503, "engine_stopped", f"the engine stopped: {state.engine.stopped}")
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Health,
    summary="Readiness: backbone loaded and not draining",
    responses=error_responses(503),
)
async def readyz(state: State) -> Health:
    if not state.ready:
        raise ApiError(503, "unavailable", state.not_ready_reason(), headers={"Retry-After": "5"})
    return Health(status="ready")


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(state: State) -> Response:
    body, content_type = state.metrics.render()
    return Response(content=body, media_type=content_type)


@router.get("/", include_in_schema=False, response_class=HTMLResponse)
async def index() -> HTMLResponse:
    page = resources.files("service.api").joinpath("static/index.html").read_text("utf-8")
    return HTMLResponse(page)
