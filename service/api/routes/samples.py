"""GET /samples/random: a fresh synthetic scene, the kind of picture the demo adapters learned.

A newcomer rarely has a picture of coloured shapes at hand, and the demo adapters know nothing
else, so the service hands one out. Offered only while the engine runs the demo backbone (the
one `ctxpeft demo` builds): on any other backbone the pictures mean nothing and the answer is
404 `samples_unavailable`. The route asks the engine (its port's `samples`, drawn by
`adapters.data.samples` at the backbone's image size) and knows nothing of the demo itself;
a scene's true caption for every demo task travels in the `X-Sample-Captions` header, so a
page can show what a right answer looks like.

Cost and bound: one scene is a Pillow drawing of at most three shapes and a PNG of a few
hundred bytes (well under a millisecond), done inline. Each tenant has a token bucket
(`SAMPLE_BURST` at once, `SAMPLE_RATE_PER_S` a second after that); beyond it the answer is 429
`rate_limited` with `Retry-After`. Both outcomes are counted in `ctxpeft_samples_total`.
"""

from __future__ import annotations

import json
import math

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field

from adapters.data.samples import DEMO_BACKBONE
from service.api.deps import AnyPrincipal, ReadyEngine, State
from service.api.engine_port import EnginePort
from service.api.errors import ApiError, error_responses
from service.api.rate_limit import TokenBuckets

router = APIRouter(tags=["samples"])

SAMPLE_RATE_PER_S = 2.0
SAMPLE_BURST = 10
CAPTIONS_HEADER = "X-Sample-Captions"
LIMITER_STATE = "sample_limiter"  # app.state attribute holding the TokenBuckets


class SamplesAbout(BaseModel):
    """What GET /samples/random hands out, and what the demo adapters were trained on."""

    image_size: int = Field(description="Width and height of a sample, in pixels.")
    tasks: list[str] = Field(description="The demo tasks; a sample's true caption for each.")
    trained_on: str = Field(description="What the demo adapters learned from, in one sentence.")


def samples_about(engine: EnginePort) -> SamplesAbout | None:
    """None unless the engine offers samples (it runs the demo backbone)."""
    samples = engine.samples
    if samples is None:
        return None
    return SamplesAbout(
        image_size=samples.image_size, tasks=list(samples.tasks), trained_on=samples.trained_on
    )


def _limiter(request: Request) -> TokenBuckets:
    # One per app, made on first use; a test may set its own (e.g. with a manual clock).
    limiter = getattr(request.app.state, LIMITER_STATE, None)
    if limiter is None:
        limiter = TokenBuckets(SAMPLE_RATE_PER_S, SAMPLE_BURST)
        setattr(request.app.state, LIMITER_STATE, limiter)
    assert isinstance(limiter, TokenBuckets)
    return limiter


@router.get(
    "/samples/random",
    summary="A fresh synthetic scene (demo backbone only)",
    response_class=Response,
    responses={
        200: {
            "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
            "description": "A PNG of the backbone's image size. The `X-Sample-Captions` header "
            'holds its true caption per demo task as JSON, e.g. {"count": "two shapes", ...}.',
            "headers": {
                CAPTIONS_HEADER: {
                    "description": "JSON object: demo task -> the scene's true caption.",
                    "schema": {"type": "string"},
                }
            },
        },
        **error_responses(401, 404, 429, 503),
    },
)
async def random_sample(
    request: Request, state: State, engine: ReadyEngine, principal: AnyPrincipal
) -> Response:
    samples = engine.samples
    if samples is None:
        raise ApiError(
            404,
            "samples_unavailable",
            f"sample images are offered only with the {DEMO_BACKBONE!r} backbone, whose "
            f"adapters were trained on them; this service runs {engine.backbone.config.name!r}: "
            "upload an image of your own",
        )
    wait_s = _limiter(request).take(principal.tenant)
    if wait_s > 0:
        state.metrics.samples.labels(outcome="rate_limited").inc()
        raise ApiError(
            429,
            "rate_limited",
            f"at most {SAMPLE_BURST} sample images at once and {SAMPLE_RATE_PER_S:g} a second "
            "after that, per tenant; retry later",
            headers={"Retry-After": str(max(1, math.ceil(wait_s)))},
        )
    sample = samples.draw()
    state.metrics.samples.labels(outcome="served").inc()
    return Response(
        content=sample.png,
        media_type="image/png",
        headers={
            CAPTIONS_HEADER: json.dumps(sample.captions),
            "Cache-Control": "no-store",  # "random": a cached copy would not be fresh
        },
    )
