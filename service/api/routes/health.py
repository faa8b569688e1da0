"""Liveness, readiness, Prometheus metrics and the try-it web page."""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response

from service.api.deps import State
from service.api.errors import ApiError, error_responses
from service.api.schemas import Health
from service.auth import bearer_token, token_matches

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


@router.get(
    "/metrics",
    summary="Prometheus metrics (a bearer scrape token when metrics_token is set)",
    response_class=Response,
    responses=error_responses(401),
)
async def metrics(request: Request, state: State) -> Response:
    if state.metrics_token is not None and not token_matches(
        state.metrics_token, bearer_token(request.headers.get("authorization"))
    ):
        raise ApiError(
            401,
            "unauthorized",
            "GET /metrics needs the scrape token (metrics_token) as a bearer token",
            headers={"WWW-Authenticate": "Bearer"},
        )
    body, content_type = state.metrics.render()
    return Response(content=body, media_type=content_type)


@router.get("/", include_in_schema=False, response_class=HTMLResponse)
async def index() -> HTMLResponse:
    page = resources.files("service.api").joinpath("static/index.html").read_text("utf-8")
    return HTMLResponse(page)
