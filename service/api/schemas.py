"""Response models: what clients see, and nothing of the internals."""

from __future__ import annotations

from pydantic import BaseModel, Field


class Timings(BaseModel):
    queue: float = Field(description="Admission to the start of the request's batch (ms).")
    encode: float = Field(description="Vision encoder for the batch (ms; 0 when cached).")
    generate: float = Field(description="Connector, prefill and decoding of the batch (ms).")
    total: float = Field(description="Admission to answer (ms).")


class CaptionOut(BaseModel):
    caption: str
    adapter: str = Field(description="The adapter name as requested.")
    adapter_version: int = Field(description="The version that produced this caption.")
    tokens: int = Field(description="Generated tokens (EOS excluded).")
    request_id: str
    timings_ms: Timings


class MultiCaptionOut(BaseModel):
    """Answer to `adapters=a,b,...`: one result per adapter, in the order asked."""

    request_id: str
    results: list[CaptionOut]


class AdapterOut(BaseModel):
    name: str
    public: bool = Field(description="Owned by the public tenant (visible to every tenant).")
    latest_version: int
    versions: list[int]
    method: str | None = None
    contexts: list[str] | None = None
    rank: int | None = None
    targets: list[str] | None = None
    description: str | None = None


class AdapterList(BaseModel):
    adapters: list[AdapterOut]


class VersionCreated(BaseModel):
    name: str
    version: int


class Deleted(BaseModel):
    name: str
    deleted_versions: int


class Health(BaseModel):
    status: str
