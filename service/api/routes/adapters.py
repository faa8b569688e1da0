"""/adapters: list, get, upload a new version, delete. Scoped by tenant: a key sees its
tenant's adapters and the public ones; it can only change its own tenant's.

An upload is refused with 422 invalid_adapter (the message names the config field or the
tensor at fault) before anything is stored, and with 413 quota_exceeded when it would take the
tenant over tenant_max_adapters or tenant_max_adapter_bytes."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Path, UploadFile
from starlette.concurrency import run_in_threadpool

from adapters.config import MAX_CONFIG_BYTES
from adapters.format import PICKLE_SUFFIXES, AdapterFormatError
from service.api.deps import AnyPrincipal, ManagePrincipal, ReadyEngine, State
from service.api.errors import ApiError, checked_name, error_responses
from service.api.schemas import AdapterList, AdapterOut, Deleted, VersionCreated
from service.registry import AdapterInfo
from service.store import QuotaExceeded, StoreQuota
from service.tenancy import NAME_PATTERN

router = APIRouter(prefix="/adapters", tags=["adapters"])

# The pattern is documented (clients and generated tests see it) but checked by `_valid`,
# whose message says what a name may hold; max_length only bounds what is echoed back.
AdapterName = Annotated[
    str,
    Path(
        description="Adapter name: 1-64 of a-z, 0-9, '_', '-', starting with a letter or digit.",
        max_length=200,
        json_schema_extra={"pattern": NAME_PATTERN.pattern},
    ),
]
# Pickle payloads start with the protocol opcode; torch.save archives are zip files.
_PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")


def _out(info: AdapterInfo) -> AdapterOut:
    cfg = info.config
    return AdapterOut(
        name=info.name,
        public=info.public,
        latest_version=info.latest.version,
        versions=list(info.versions),
        method=cfg.method if cfg else None,
        contexts=list(cfg.contexts) if cfg else None,
        rank=cfg.rank if cfg and cfg.method == "lora" else None,
        targets=list(cfg.targets) if cfg else None,
        description=cfg.description if cfg else None,
    )


@router.get(
    "",
    response_model=AdapterList,
    summary="Adapters visible to this key",
    responses=error_responses(401, 503),
)
async def list_adapters(engine: ReadyEngine, principal: AnyPrincipal) -> AdapterList:
    infos = await run_in_threadpool(engine.registry.list_adapters, principal.tenant)
    return AdapterList(adapters=[_out(i) for i in infos])


@router.get(
    "/{name}",
    response_model=AdapterOut,
    summary="One adapter",
    responses=error_responses(401, 404, 422, 503),
)
async def get_adapter(
    name: AdapterName, engine: ReadyEngine, principal: AnyPrincipal
) -> AdapterOut:
    checked_name(name)
    info = await run_in_threadpool(engine.registry.describe, principal.tenant, name)
    return _out(info)


def _is_safetensors(data: bytes) -> bool:
    """A safetensors file: a little-endian u64 header length, then that many bytes of JSON.
    Checked before the pickle sniff because a header length of 128 + 256k starts with the
    pickle opcode byte 0x80 (one valid file in 32 would be refused as a pickle)."""
    header = int.from_bytes(data[:8], "little")
    return len(data) > 8 and data[8:9] == b"{" and 8 + header <= len(data)


async def _read_upload(upload: UploadFile, what: str) -> bytes:
    filename = upload.filename or ""
    if filename.lower().endswith(PICKLE_SUFFIXES):
        raise ApiError(
            422, "invalid_adapter", f"refusing pickle file {filename!r}: {what} must be safetensors"
        )
    if what == "config":
        # Bounded before it is parsed (the body limit alone allows megabytes of nesting).
        data = await upload.read(MAX_CONFIG_BYTES + 1)
        if len(data) > MAX_CONFIG_BYTES:
            raise ApiError(
                422,
                "invalid_adapter",
                f"adapter_config.json is larger than {MAX_CONFIG_BYTES} bytes",
            )
        return data
    data = await upload.read()
    if what == "weights" and data.startswith(_PICKLE_MAGIC) and not _is_safetensors(data):
        raise ApiError(
            422,
            "invalid_adapter",
            "refusing a pickle/torch.save payload: weights must be safetensors",
        )
    return data


@router.post(
    "/{name}/versions",
    response_model=VersionCreated,
    status_code=201,
    summary="Upload a new version (validated before it becomes visible)",
    responses=error_responses(400, 401, 403, 413, 422, 503),
)
async def upload_version(
    name: AdapterName,
    engine: ReadyEngine,
    principal: ManagePrincipal,
    state: State,
    config: Annotated[UploadFile, File(description="adapter_config.json")],
    weights: Annotated[UploadFile, File(description="adapter.safetensors")],
) -> VersionCreated:
    checked_name(name)
    config_bytes = await _read_upload(config, "config")
    weights_bytes = await _read_upload(weights, "weights")
    settings = state.settings
    quota = StoreQuota(settings.tenant_max_adapters, settings.tenant_max_adapter_bytes)
    try:
        ref = await run_in_threadpool(
            engine.registry.add_version,
            principal.tenant,
            name,
            config_bytes,
            weights_bytes,
            quota,
        )
    except AdapterFormatError as exc:
        raise ApiError(422, "invalid_adapter", str(exc)) from None
    except QuotaExceeded as exc:
        raise ApiError(413, "quota_exceeded", str(exc)) from None
    return VersionCreated(name=name, version=ref.version)


@router.delete(
    "/{name}",
    response_model=Deleted,
    summary="Delete every version of an own adapter",
    responses=error_responses(401, 403, 404, 422, 503),
)
async def delete_adapter(
    name: AdapterName, engine: ReadyEngine, principal: ManagePrincipal
) -> Deleted:
    checked_name(name)
    removed = await run_in_threadpool(engine.registry.delete, principal.tenant, name)
    return Deleted(name=name, deleted_versions=removed)
