"""The engine's public types: what the HTTP layer builds (CaptionRequest) and gets back
(CaptionResult with Timings), the engine's knobs (EngineConfig) and its counters
(EngineStats). Re-exported by `service.engine`."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from PIL import Image

from service.adapter_cache import TierStats
from service.settings import Settings
from service.store import AdapterRef

DEFAULT_TENANT = "default"
FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class CaptionRequest:
    """One image and one or more adapter names (one encoder pass, one result per name)."""

    image: Image.Image | bytes
    adapters: tuple[str, ...]
    tenant: str = DEFAULT_TENANT
    max_new_tokens: int | None = None  # None: EngineConfig.default_max_new_tokens
    timeout_s: float | None = None  # deadline from admission; None: request_timeout_s
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    # Token streaming: called on the caller's event loop with (index of the adapter in
    # `adapters`, token id) for every generated token, in order, before that adapter's result
    # is delivered (EOS is never passed). Must not raise or block.
    on_token: Callable[[int, int], None] | None = None


@dataclass(frozen=True)
class Timings:
    queue_ms: float  # admission to the start of the row's batch
    encode_ms: float  # vision encoder of the batch (0 when every image was cached)
    generate_ms: float  # connector + prefill + decoding of the batch
    total_ms: float  # admission to answer


@dataclass(frozen=True)
class CaptionResult:
    caption: str
    token_ids: tuple[int, ...]
    adapter: str  # the name as requested
    ref: AdapterRef  # the version that produced it (tenant may be "public")
    timings: Timings
    request_id: str
    # "stop": the model ended the caption (EOS); "length": it reached max_new_tokens.
    finish_reason: FinishReason = "stop"
    prompt_tokens: int = 0  # LM positions before the caption: BOS + image tokens

    @property
    def tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class EngineConfig:
    """Engine knobs; `from_settings` maps the service settings of the same names."""

    max_batch_size: int = 32
    max_wait_ms: float = 5.0
    device_slots: int = 16
    max_rank: int = 64
    cpu_cache_bytes: int = 256 << 20
    encoder_cache_entries: int = 512
    queue_size: int = 256
    tenant_max_inflight: int = 32
    request_timeout_s: float = 30.0
    default_max_new_tokens: int = 32
    max_new_tokens_limit: int = 64
    max_adapters_per_batch: int | None = None  # None: up to device_slots (1: grouping only)
    refresh_s: float = 2.0  # store rescan period
    preprocess_threads: int = 2

    def __post_init__(self) -> None:
        for name in (
            "max_batch_size",
            "device_slots",
            "max_rank",
            "queue_size",
            "tenant_max_inflight",
            "default_max_new_tokens",
            "preprocess_threads",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"EngineConfig.{name} must be >= 1")
        if self.max_adapters_per_batch is not None and self.max_adapters_per_batch < 1:
            raise ValueError("EngineConfig.max_adapters_per_batch must be >= 1 or None")

    @classmethod
    def from_settings(cls, settings: Settings) -> EngineConfig:
        return cls(
            max_batch_size=settings.max_batch_size,
            max_wait_ms=settings.max_wait_ms,
            device_slots=settings.device_slots,
            max_rank=settings.max_rank,
            cpu_cache_bytes=settings.cpu_cache_bytes,
            encoder_cache_entries=settings.encoder_cache_entries,
            queue_size=settings.queue_size,
            tenant_max_inflight=settings.tenant_max_inflight,
            request_timeout_s=settings.request_timeout_s,
            default_max_new_tokens=settings.default_max_new_tokens,
            max_new_tokens_limit=settings.max_new_tokens_limit,
        )


@dataclass(frozen=True)
class EngineStats:
    batches: int
    rows: int  # rows run in batches
    adapters_in_batches: int  # sum over batches of distinct adapters
    completed: int  # rows answered with a caption
    failed: int  # rows answered with an error after admission (load errors, drops, ...)
    generated_tokens: int
    encoder_runs: int
    encoder_hits: int
    encoder_misses: int
    dropped: dict[str, int]  # rows dropped before compute or abandoned: deadline, cancelled
    rejected: dict[str, int]  # admissions refused: queue_full, tenant_limit, draining
    tiers: TierStats

    @property
    def mean_batch_size(self) -> float:
        return self.rows / self.batches if self.batches else 0.0

    @property
    def mean_adapters_per_batch(self) -> float:
        return self.adapters_in_batches / self.batches if self.batches else 0.0
