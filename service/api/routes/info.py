"""GET /info: what a client needs to know before its first caption request.

The web page reads it to preselect the service's default adapter and to offer sample images
(with a plain sentence on what the demo adapters were trained on) when the backbone is the
demo's. No key needed: it names nothing that /metrics does not already show to anyone.
"""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, Field

from service import __version__
from service.api.deps import ReadyEngine, State
from service.api.errors import error_responses
from service.api.routes.samples import SamplesAbout, samples_about

router = APIRouter(tags=["health"])


class ServiceInfo(BaseModel):
    version: str
    backbone: str = Field(description="Name of the loaded backbone's configuration, e.g. demo.")
    image_size: int = Field(description="Images are resized to this square size (pixels).")
    default_adapter: str | None = Field(
        description="Used by POST /caption when the request names no adapter; null: none."
    )
    default_max_new_tokens: int
    max_new_tokens_limit: int
    samples: SamplesAbout | None = Field(
        description="GET /samples/random is offered (demo backbone only); null: it is not."
    )
    fine_tuning: bool = Field(
        default=False,
        description="/v1/files and /v1/fine_tuning/jobs are offered (setting jobs_enabled).",
    )


@router.get(
    "/info",
    response_model=ServiceInfo,
    summary="The backbone, the default adapter, whether sample images are offered",
    responses=error_responses(503),
)
async def info(state: State, engine: ReadyEngine) -> ServiceInfo:
    settings = state.settings
    return ServiceInfo(
        version=__version__,
        backbone=engine.backbone.config.name,
        image_size=engine.backbone.config.image_size,
        default_adapter=settings.default_adapter,
        default_max_new_tokens=settings.default_max_new_tokens,
        max_new_tokens_limit=settings.max_new_tokens_limit,
        samples=samples_about(engine),
        fine_tuning=settings.jobs_enabled,
    )
