"""Response models: what clients see, and nothing of the internals."""

from __future__ import annotations

from pydantic import BaseModel, Field


class Timings(BaseModel):
    queue: float = Field(description="Admission to the start of the request's batch (ms).")
    encode: float = Field(description="Vision encoder for the batch (ms; 0 when cached).")
    generate: float = Field(description="Connector, prefill and decoding of the batch (ms).")
    total: float = Field(description="Admission to answer (ms).")


class CaptionUsage(BaseModel):
    """What one adapter's caption used (the figures the usage ledger records)."""

    prompt_tokens: int = Field(description="LM positions before the caption: BOS + image.")
    image_tokens: int = Field(description="Of the prompt tokens, the image's.")
    completion_tokens: int = Field(description="Generated tokens (EOS excluded).")
    total_tokens: int
    image_cached: bool = Field(
        description="The image's encoding came from the encoder cache (or another adapter of "
        "this request): no encoder pass was spent on it for this caption."
    )
    compute_ms: float = Field(
        description="Engine compute time attributed to this caption: its share (the step's "
        "time divided by the rows in it) of every step it took part in."
    )


class CaptionOut(BaseModel):
    caption: str
    adapter: str = Field(description="The adapter name as requested.")
    adapter_version: int = Field(description="The version that produced this caption.")
    tokens: int = Field(description="Generated tokens (EOS excluded).")
    request_id: str
    timings_ms: Timings
    usage: CaptionUsage


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
