"""`/v1/fine_tuning/jobs`: create, list, get, cancel, pause and resume fine-tuning jobs, and
read their events and checkpoints, as OpenAI's fine-tuning API (`client.fine_tuning.jobs`).

Creating, cancelling, pausing and resuming need the `manage` right; reading needs any key of
the tenant. Another tenant's job id answers 404, as an unknown one. A request the service
refuses answers 400 naming the `param` (a bad body too, so the SDK raises `BadRequestError`),
409 for a transition the job's state does not allow, and 429 with `Retry-After` when the
tenant is over its jobs or training-token limits (docs/API.md, "Fine-tuning").
"""

from __future__ import annotations

import math
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from starlette.concurrency import run_in_threadpool

from service.api.deps import AnyPrincipal, ManagePrincipal, ReadyEngine, only_query
from service.api.errors import ApiError, openai_error_responses
from service.api.fine_tuning_schemas import (
    AdapterChoice,
    CheckpointMetrics,
    FineTuningJob,
    FineTuningJobCheckpoint,
    FineTuningJobCheckpointList,
    FineTuningJobEvent,
    FineTuningJobEventList,
    FineTuningJobList,
    HyperparametersOut,
    JobCreate,
    JobErrorOut,
    MethodOut,
    SupervisedOut,
)
from service.api.openai_schemas import OPENAI_PREFIX
from service.api.routes.files import BadRequestRoute, fine_tuning
from service.jobs.manager import CreateJob, JobRequestError
from service.jobs.store import Job, JobNotFound

JobId = Annotated[str, Path(description="A job id, ftjob-...", max_length=100)]


def job_object(job: Job) -> FineTuningJob:
    hp = HyperparametersOut(**job.hyperparameters)
    return FineTuningJob(
        id=job.id,
        created_at=job.created_at,
        error=JobErrorOut(**job.error.to_json()) if job.error else None,
        fine_tuned_model=job.fine_tuned_model,
        finished_at=job.finished_at,
        hyperparameters=hp,
        model=job.model,
        organization_id=job.tenant,
        seed=job.seed,
        status=job.status,
        trained_tokens=job.trained_tokens,
        training_file=job.training_file,
        validation_file=job.validation_file,
        estimated_finish=job.estimated_finish if job.status == "running" else None,
        metadata=job.metadata,
        method=MethodOut(supervised=SupervisedOut(hyperparameters=hp)),
        adapter=AdapterChoice(**job.adapter),
        paused_at=job.paused_at,
    )


def _refused(error: JobRequestError) -> ApiError:
    headers = {}
    if error.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(error.retry_after_s)))
    return ApiError(error.status, error.code, error.message, param=error.param, headers=headers)


def _job_not_found(job_id: str) -> ApiError:
    return ApiError(
        404, "job_not_found", f"no fine-tuning job {job_id!r}", param="fine_tuning_job_id"
    )


router = APIRouter(
    prefix=f"{OPENAI_PREFIX}/fine_tuning/jobs", tags=["fine-tuning"], route_class=BadRequestRoute
)


@router.post(
    "",
    response_model=FineTuningJob,
    summary="Create a fine-tuning job",
    dependencies=[only_query()],
    responses=openai_error_responses(400, 401, 403, 409, 429, 503),
)
async def create_job(
    request: Request, body: JobCreate, engine: ReadyEngine, principal: ManagePrincipal
) -> FineTuningJob:
    hp = body.hyperparameters
    if body.method is not None and body.method.supervised is not None:
        hp = body.method.supervised.hyperparameters or hp
    adapter = (body.adapter or AdapterChoice()).model_dump()
    create = CreateJob(
        model=body.model,
        training_file=body.training_file,
        validation_file=body.validation_file,
        suffix=body.suffix,
        seed=body.seed,
        metadata=body.metadata,
        n_epochs=hp.n_epochs if hp else "auto",
        batch_size=hp.batch_size if hp else "auto",
        learning_rate_multiplier=hp.learning_rate_multiplier if hp else "auto",
        adapter=adapter,
    )
    service = fine_tuning(request)
    try:
        job = await run_in_threadpool(lambda: service.manager.create(principal.tenant, create))
    except JobRequestError as error:
        raise _refused(error) from None
    return job_object(job)


@router.get(
    "",
    response_model=FineTuningJobList,
    summary="This tenant's fine-tuning jobs, newest first",
    dependencies=[only_query("after", "limit", prefix="metadata[")],
    responses=openai_error_responses(400, 401, 404),
)
async def list_jobs(
    request: Request,
    principal: AnyPrincipal,
    after: Annotated[str | None, Query(max_length=100)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> FineTuningJobList:
    metadata = {
        key[len("metadata[") : -1]: value
        for key, value in request.query_params.items()
        if key.startswith("metadata[") and key.endswith("]")
    }
    service = fine_tuning(request)
    try:
        jobs, more = await run_in_threadpool(
            lambda: service.manager.jobs.page(principal.tenant, after, limit, metadata or None)
        )
    except JobNotFound:
        raise ApiError(
            404,
            "job_not_found",
            f"no fine-tuning job {after!r} (the `after` cursor)",
            param="after",
        ) from None
    return FineTuningJobList(data=[job_object(j) for j in jobs], has_more=more)


async def _job(request: Request, tenant: str, job_id: str) -> Job:
    service = fine_tuning(request)
    try:
        return await run_in_threadpool(lambda: service.manager.get(tenant, job_id))
    except JobNotFound:
        raise _job_not_found(job_id) from None


@router.get(
    "/{fine_tuning_job_id}",
    response_model=FineTuningJob,
    summary="One fine-tuning job",
    dependencies=[only_query()],
    responses=openai_error_responses(400, 401, 404),
)
async def get_job(
    request: Request, fine_tuning_job_id: JobId, principal: AnyPrincipal
) -> FineTuningJob:
    return job_object(await _job(request, principal.tenant, fine_tuning_job_id))


async def _transition(request: Request, action: str, tenant: str, job_id: str) -> FineTuningJob:
    manager = fine_tuning(request).manager
    call: Any = getattr(manager, action)
    try:
        job = await run_in_threadpool(call, tenant, job_id)
    except JobNotFound:
        raise _job_not_found(job_id) from None
    except JobRequestError as error:
        raise _refused(error) from None
    return job_object(job)


@router.post(
    "/{fine_tuning_job_id}/cancel",
    response_model=FineTuningJob,
    summary="Cancel a job (a running one stops at its next step; nothing is published)",
    dependencies=[only_query()],
    responses=openai_error_responses(400, 401, 403, 404, 409),
)
async def cancel_job(
    request: Request, fine_tuning_job_id: JobId, principal: ManagePrincipal
) -> FineTuningJob:
    return await _transition(request, "cancel", principal.tenant, fine_tuning_job_id)


@router.post(
    "/{fine_tuning_job_id}/pause",
    response_model=FineTuningJob,
    summary="Pause a job at its next step (resumable; status queued, paused_at set)",
    dependencies=[only_query()],
    responses=openai_error_responses(400, 401, 403, 404, 409),
)
async def pause_job(
    request: Request, fine_tuning_job_id: JobId, principal: ManagePrincipal
) -> FineTuningJob:
    return await _transition(request, "pause", principal.tenant, fine_tuning_job_id)


@router.post(
    "/{fine_tuning_job_id}/resume",
    response_model=FineTuningJob,
    summary="Resume a paused job where it paused",
    dependencies=[only_query()],
    responses=openai_error_responses(400, 401, 403, 404, 409),
)
async def resume_job(
    request: Request, fine_tuning_job_id: JobId, principal: ManagePrincipal
) -> FineTuningJob:
    return await _transition(request, "resume", principal.tenant, fine_tuning_job_id)


@router.get(
    "/{fine_tuning_job_id}/events",
    response_model=FineTuningJobEventList,
    summary="A job's events, newest first (type metrics: step, losses, perplexity)",
    dependencies=[only_query("after", "limit")],
    responses=openai_error_responses(400, 401, 404),
)
async def job_events(
    request: Request,
    fine_tuning_job_id: JobId,
    principal: AnyPrincipal,
    after: Annotated[str | None, Query(max_length=100)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
) -> FineTuningJobEventList:
    job = await _job(request, principal.tenant, fine_tuning_job_id)
    store = fine_tuning(request).manager.jobs
    try:
        events, more = await run_in_threadpool(store.events, job.id, after, limit)
    except JobNotFound as error:
        raise ApiError(404, "event_not_found", str(error), param="after") from None
    return FineTuningJobEventList(
        data=[
            FineTuningJobEvent(
                id=e.id,
                created_at=e.created_at,
                level=e.level,
                message=e.message,
                data=e.data,
                type=e.type,
            )
            for e in events
        ],
        has_more=more,
    )


@router.get(
    "/{fine_tuning_job_id}/checkpoints",
    response_model=FineTuningJobCheckpointList,
    summary="A job's epoch checkpoints, newest first",
    dependencies=[only_query("after", "limit")],
    responses=openai_error_responses(400, 401, 404),
)
async def job_checkpoints(
    request: Request,
    fine_tuning_job_id: JobId,
    principal: AnyPrincipal,
    after: Annotated[str | None, Query(max_length=100)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 10,
) -> FineTuningJobCheckpointList:
    job = await _job(request, principal.tenant, fine_tuning_job_id)
    store = fine_tuning(request).manager.jobs
    try:
        found, more = await run_in_threadpool(store.checkpoints, job.id, after, limit)
    except JobNotFound as error:
        raise ApiError(404, "checkpoint_not_found", str(error), param="after") from None
    data = [
        FineTuningJobCheckpoint(
            id=c.id,
            created_at=c.created_at,
            fine_tuned_model_checkpoint=f"{job.adapter_name}:ckpt-step-{c.step}",
            fine_tuning_job_id=job.id,
            metrics=CheckpointMetrics(
                step=c.step,
                train_loss=c.metrics.get("train_loss"),
                full_valid_loss=c.metrics.get("full_valid_loss"),
                valid_loss=c.metrics.get("full_valid_loss"),
            ),
            step_number=c.step,
        )
        for c in found
    ]
    return FineTuningJobCheckpointList(
        data=data,
        has_more=more,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
    )
