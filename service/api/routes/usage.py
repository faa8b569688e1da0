"""GET /v1/usage: a tenant's usage from the ledger, in the shape of OpenAI's organization usage
API (`/v1/organization/usage/completions`): pages of time buckets, each with one result per
group. A key sees its own tenant's usage; a key with the `operator` right may name any
tenants (`tenant=`, repeatable) or all of them (no `tenant`), and group by tenant.

    GET /v1/usage?start_time=1733550000&bucket_width=1h&group_by=adapter&group_by=key
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from service.api.deps import AnyPrincipal, State, only_query
from service.api.errors import ApiError, openai_error_responses
from service.api.openai_schemas import OPENAI_PREFIX
from service.auth import OPERATOR
from service.tenancy import InvalidId, check_tenant
from service.usage import UsageQuery

router = APIRouter(prefix=OPENAI_PREFIX, tags=["usage"])

WIDTHS = {"1m": 60, "1h": 3600, "1d": 86400}
# As OpenAI: how many buckets a page holds at most, by width.
MAX_BUCKETS = {"1m": 1440, "1h": 168, "1d": 31}


class UsageResult(BaseModel):
    object: Literal["organization.usage.completions.result"] = (
        "organization.usage.completions.result"
    )
    input_tokens: int = Field(description="Prompt tokens: BOS + image, per caption.")
    output_tokens: int = Field(description="Generated (completion) tokens.")
    input_cached_tokens: int = Field(
        description="Prompt tokens whose image encoding came from the encoder cache."
    )
    num_model_requests: int = Field(description="Captions answered (completed).")
    image_tokens: int = Field(description="Of the input tokens, the images'.")
    cached_images: int = Field(description="Encoder passes saved by the cache.")
    compute_seconds: float = Field(description="Engine compute time attributed to the captions.")
    training_tokens: int = Field(description="Tokens trained on by fine-tuning jobs.")
    requests_by_outcome: dict[str, int] = Field(
        description="Adapter requests by outcome: completed, failed, rejected, cancelled, deadline."
    )
    model: str | None = Field(description="The adapter (owner/name), with group_by=adapter.")
    api_key_id: str | None = Field(description="The API key, with group_by=key.")
    project_id: str | None = Field(description="The tenant, with group_by=tenant (operator).")
    user_id: None = None
    batch: None = None


class UsageBucketOut(BaseModel):
    object: Literal["bucket"] = "bucket"
    start_time: int
    end_time: int
    results: list[UsageResult]


class UsagePage(BaseModel):
    object: Literal["page"] = "page"
    data: list[UsageBucketOut]
    has_more: bool
    next_page: str | None


@router.get(
    "/usage",
    response_model=UsagePage,
    summary="Usage of your tenant (any tenant's with the operator right), in time buckets",
    responses=openai_error_responses(400, 401, 403, 422, 503),
    dependencies=[
        only_query(
            "start_time",
            "end_time",
            "bucket_width",
            "group_by",
            "tenant",
            "limit",
            "page",
            repeatable=("group_by", "tenant"),
        )
    ],
)
async def get_usage(
    state: State,
    principal: AnyPrincipal,
    start_time: Annotated[int, Query(ge=0, description="Unix seconds, inclusive.")],
    end_time: Annotated[int | None, Query(ge=0, description="Unix seconds, exclusive.")] = None,
    bucket_width: Annotated[Literal["1m", "1h", "1d"], Query()] = "1d",
    group_by: Annotated[list[Literal["adapter", "key", "tenant"]] | None, Query()] = None,
    tenant: Annotated[
        list[str] | None, Query(description="Operator keys only: the tenants to read.")
    ] = None,
    limit: Annotated[int | None, Query(ge=1, description="Buckets per page.")] = None,
    page: Annotated[str | None, Query(description="The next_page of an earlier answer.")] = None,
) -> UsagePage:
    ledger = state.usage
    if ledger is None:
        raise ApiError(503, "unavailable", "usage metering is off (usage_ledger)")
    operator = principal.can(OPERATOR)
    groups = tuple(group_by or ())
    if (tenant is not None or "tenant" in groups) and not operator:
        raise ApiError(
            403,
            "forbidden",
            "only a key with the operator right reads other tenants' usage; your own needs "
            "no tenant parameter",
        )
    tenants: tuple[str, ...] | None = (principal.tenant,)
    if operator:
        try:
            tenants = tuple(check_tenant(t) for t in tenant) if tenant else None
        except InvalidId as exc:
            raise ApiError(422, "invalid_parameter", str(exc), param="tenant") from None
    width = WIDTHS[bucket_width]
    end = end_time if end_time is not None else int(time.time())
    start = int(page) if page is not None and page.isdigit() else start_time
    if end <= start:
        raise ApiError(
            400, "invalid_parameter", "end_time must be after start_time", param="end_time"
        )
    per_page = min(limit or MAX_BUCKETS[bucket_width], MAX_BUCKETS[bucket_width])
    page_end = min(end, start + per_page * width)
    buckets = ledger.query(UsageQuery(tenants, start, page_end, width, groups))
    return UsagePage(
        data=[
            UsageBucketOut(
                start_time=b.start,
                end_time=min(b.end, page_end),
                results=[_result(r) for r in b.results],
            )
            for b in buckets
        ],
        has_more=page_end < end,
        next_page=str(page_end) if page_end < end else None,
    )


def _result(r: dict[str, Any]) -> UsageResult:
    by_outcome: dict[str, int] = r["requests_by_outcome"]
    cached = int(r["cached_images"])
    image = int(r["image_tokens"])
    completed = by_outcome.get("completed", 0)
    return UsageResult(
        input_tokens=int(r["prompt_tokens"]),
        output_tokens=int(r["completion_tokens"]),
        # Every image of one backbone has the same number of tokens.
        input_cached_tokens=image * cached // completed if completed else 0,
        num_model_requests=completed,
        image_tokens=image,
        cached_images=cached,
        compute_seconds=round(float(r["compute_ms"]) / 1000, 6),
        training_tokens=int(r["training_tokens"]),
        requests_by_outcome=by_outcome,
        model=r["adapter"],
        api_key_id=r["key"],
        project_id=r["tenant"],
    )
