"""`/v1/files`: upload, list, get, delete and download training files, as OpenAI's Files API
(`client.files.create(file=..., purpose="fine-tune")` works unchanged).

Only `purpose=fine-tune` is accepted. An upload is checked completely before it is kept
(service.jobs.data): a file with bad examples is refused with 400 `invalid_training_file`
naming the first bad lines (line number and reason) and how many there are; the SDK raises it
as `BadRequestError`. Limits: `files_max_bytes` per file (413), `files_max_examples` per file
(400), `files_tenant_max_files` and `files_tenant_max_bytes` per tenant (413
`quota_exceeded`). Tenant-scoped: another tenant's file id answers 404, as an unknown one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Coroutine
from pathlib import Path as FsPath
from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Form, Path, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool
from starlette.responses import FileResponse, Response

from service.api.deps import ManagePrincipal, ReadyEngine, only_query
from service.api.errors import ApiError, openai_error_responses
from service.api.fine_tuning_schemas import (
    ACCEPTED_PURPOSE,
    FileDeleted,
    FileList,
    FileObject,
    TrainingDataSummary,
)
from service.api.openai_schemas import OPENAI_PREFIX
from service.jobs.data import TrainingFileError, parse_training_file
from service.jobs.files import FileNotFound, FileRecord, FileSummary
from service.jobs.service import FineTuning


def _bad_request(errors: list[Any]) -> ApiError:
    """400 naming the field: the common part of the errors' locations (a union's members
    each add their own tag, e.g. n_epochs.literal['auto'] and n_epochs.constrained-int)."""
    locations = [tuple(str(p) for p in e["loc"]) for e in errors]
    common: list[str] = []
    for parts in zip(*locations, strict=False):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    if common and common[0] in ("body", "query", "path"):
        common = common[1:]
    param = ".".join(common) or None
    reasons = list(dict.fromkeys(str(e["msg"]) for e in errors))
    return ApiError(
        400, "invalid_request", f"{param or 'body'}: {' or '.join(reasons)}", param=param
    )


class BadRequestRoute(APIRoute):
    """A request the schema refuses is 400 here, as OpenAI answers (the SDK raises
    BadRequestError), not the 422 of the other routes."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as error:
                raise _bad_request(list(error.errors())) from None

        return route


router = APIRouter(
    prefix=f"{OPENAI_PREFIX}/files", tags=["fine-tuning"], route_class=BadRequestRoute
)
CHUNK = 1 << 20
FileId = Annotated[str, Path(description="A file id, file-...", max_length=100)]


def fine_tuning(request: Request) -> FineTuning:
    service: FineTuning = request.app.state.fine_tuning
    return service


def file_object(record: FileRecord) -> FileObject:
    return FileObject(
        id=record.id,
        bytes=record.bytes,
        created_at=record.created_at,
        filename=record.filename,
        purpose=record.purpose,  # type: ignore[arg-type]  # stored only after checking
        training_data=TrainingDataSummary(**record.summary.to_json()),
    )


def _not_found(file_id: str) -> ApiError:
    return ApiError(404, "file_not_found", f"no file {file_id!r}", param="file_id")


@router.post(
    "",
    response_model=FileObject,
    summary="Upload a training file (purpose fine-tune)",
    dependencies=[only_query()],
    responses=openai_error_responses(400, 401, 403, 413, 503),
)
async def upload_file(
    request: Request,
    engine: ReadyEngine,
    principal: ManagePrincipal,
    file: Annotated[UploadFile, File(description="JSONL (OpenAI chat or image+caption) or zip")],
    purpose: Annotated[str, Form(description="Must be fine-tune.")],
) -> FileObject:
    service = fine_tuning(request)
    settings = service.settings
    if purpose != ACCEPTED_PURPOSE:
        raise ApiError(
            400,
            "invalid_purpose",
            f"purpose {purpose!r} is not offered: this service keeps files for fine-tuning "
            "only (purpose=fine-tune)",
            param="purpose",
        )
    files = await run_in_threadpool(lambda: service.files)
    temp = files.temp_path()
    try:
        digest = hashlib.sha256()
        size = 0
        with open(temp, "wb") as out:
            while chunk := await file.read(CHUNK):
                size += len(chunk)
                if size > settings.files_max_bytes:
                    raise ApiError(
                        413,
                        "file_too_large",
                        f"the file is larger than {settings.files_max_bytes} bytes "
                        "(files_max_bytes)",
                        param="file",
                    )
                digest.update(chunk)
                out.write(chunk)
        summary = await run_in_threadpool(_check, service, temp)
        count, used = await run_in_threadpool(files.usage, principal.tenant)
        if settings.files_tenant_max_files and count + 1 > settings.files_tenant_max_files:
            raise ApiError(
                413,
                "quota_exceeded",
                f"the tenant already keeps {count} files; the limit is "
                f"{settings.files_tenant_max_files} (files_tenant_max_files): delete one",
                param="file",
            )
        if settings.files_tenant_max_bytes and used + size > settings.files_tenant_max_bytes:
            raise ApiError(
                413,
                "quota_exceeded",
                f"the tenant's files take {used} bytes and this one {size}; the limit is "
                f"{settings.files_tenant_max_bytes} (files_tenant_max_bytes): delete some",
                param="file",
            )
        record = await run_in_threadpool(
            files.add,
            principal.tenant,
            (file.filename or "upload")[:255],
            purpose,
            temp,
            digest.hexdigest(),
            size,
            summary,
        )
    finally:
        temp.unlink(missing_ok=True)
    return file_object(record)


def _check(service: FineTuning, temp: FsPath) -> FileSummary:
    try:
        data = parse_training_file(temp, service.limits)
    except TrainingFileError as error:
        raise ApiError(400, "invalid_training_file", str(error), param="file") from None
    try:
        count = service.count_tokens()
        tokens = data.tokens(count) if count is not None else None
        return FileSummary(
            data.format, len(data.examples), len(data.images), tokens, list(data.warnings)
        )
    finally:
        data.close()


@router.get(
    "",
    response_model=FileList,
    summary="This tenant's files",
    dependencies=[only_query("after", "limit", "order", "purpose")],
    responses=openai_error_responses(400, 401, 403, 404),
)
async def list_files(
    request: Request,
    principal: ManagePrincipal,
    after: Annotated[str | None, Query(max_length=100)] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    order: Annotated[Literal["asc", "desc"], Query()] = "desc",
    purpose: Annotated[str | None, Query(max_length=40)] = None,
) -> FileList:
    service = fine_tuning(request)
    try:
        records, more = await run_in_threadpool(
            lambda: service.files.page(principal.tenant, after, limit, order, purpose)
        )
    except FileNotFound as error:
        raise ApiError(404, "file_not_found", str(error), param="after") from None
    data = [file_object(r) for r in records]
    return FileList(
        data=data,
        has_more=more,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
    )


async def _record(request: Request, tenant: str, file_id: str) -> FileRecord:
    service = fine_tuning(request)
    try:
        return await run_in_threadpool(lambda: service.files.get(tenant, file_id))
    except FileNotFound:
        raise _not_found(file_id) from None


@router.get(
    "/{file_id}",
    response_model=FileObject,
    summary="One file",
    dependencies=[only_query()],
    responses=openai_error_responses(400, 401, 403, 404),
)
async def get_file(request: Request, file_id: FileId, principal: ManagePrincipal) -> FileObject:
    return file_object(await _record(request, principal.tenant, file_id))


@router.delete(
    "/{file_id}",
    response_model=FileDeleted,
    summary="Delete a file (jobs already created keep their copy until they end)",
    dependencies=[only_query()],
    responses=openai_error_responses(400, 401, 403, 404),
)
async def delete_file(request: Request, file_id: FileId, principal: ManagePrincipal) -> FileDeleted:
    service = fine_tuning(request)
    try:
        await run_in_threadpool(lambda: service.files.delete(principal.tenant, file_id))
    except FileNotFound:
        raise _not_found(file_id) from None
    await run_in_threadpool(service.collect_files)
    return FileDeleted(id=file_id)


@router.get(
    "/{file_id}/content",
    summary="The file's bytes, as uploaded",
    dependencies=[only_query()],
    response_class=FileResponse,
    responses={
        200: {"content": {"application/octet-stream": {}}},
        **openai_error_responses(400, 401, 403, 404),
    },
)
async def file_content(
    request: Request, file_id: FileId, principal: ManagePrincipal
) -> FileResponse:
    record = await _record(request, principal.tenant, file_id)
    path = fine_tuning(request).files.path(record)
    if not path.is_file():
        raise _not_found(file_id)
    return FileResponse(
        path,
        media_type="application/octet-stream",
        filename=record.filename,
        headers={"Cache-Control": "private, max-age=0"},
    )
