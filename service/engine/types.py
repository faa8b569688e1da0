"""The engine's public types: what the HTTP layer builds (CaptionRequest) and gets back
(CaptionResult with Timings), and the engine's counters (EngineStats). Re-exported by
`service.engine`; the engine's knobs are `service.settings.EngineConfig`."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from PIL import Image

from service.adapter_cache import TierStats
from service.store import AdapterRef

DEFAULT_TENANT = "default"
FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class CaptionRequest:
    """One image and one or more adapter names (one encoder pass, one result per name)."""

    # A decoded image, encoded bytes, or a function that decodes (called after admission, in
    # the engine's preprocessing pool, so that a refused request never decodes its image;
    # whatever it raises reaches the caller of caption() unchanged).
    image: Image.Image | bytes | Callable[[], Image.Image]
    adapters: tuple[str, ...]
    tenant: str = DEFAULT_TENANT
    max_new_tokens: int | None = None  # None: EngineConfig.default_max_new_tokens
    timeout_s: float | None = None  # deadline from admission; None: request_timeout_s
    # A correlation id for logs and answers only (clients may choose it: X-Request-ID); the
    # engine never looks requests up by it. Cancel a request by cancelling its caption() task.
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    # Token streaming: called on the caller's event loop with (index of the adapter in
    # `adapters`, token id) for every generated token, in order, before that adapter's result
    # is delivered (EOS is never passed). Must not raise or block.
    on_token: Callable[[int, int], None] | None = None


@dataclass(frozen=True)
class Timings:
    queue_ms: float  # admission to joining the running batch
    encode_ms: float  # vision encoder for the rows that joined with it (0 when cached)
    generate_ms: float  # connector + prefill + decode steps, until the row ended
    total_ms: float  # admission to answer
    first_token_ms: float = 0.0  # admission to the first generated token


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
class EngineStats:
    """The engine's counters (one counting system feeds these and the Prometheus families).

    A *batch* is a group of rows that joined the running batch together (one prefill); with
    static scheduling it is the whole batch. A *step* is one decode step of every running row.
    """

    batches: int  # prefills: groups of rows admitted together
    rows: int  # rows that joined the running batch
    adapters_in_batches: int  # sum over batches of distinct adapters
    steps: int  # decode steps
    step_rows: int  # sum over steps of the rows running in it
    step_adapters: int  # sum over steps of the distinct adapters running in it
    completed: int  # rows answered with a caption
    failed: int  # rows answered with an error after admission (load errors, drops, ...)
    generated_tokens: int
    encoder_runs: int
    encoder_hits: int
    encoder_misses: int
    dropped: dict[str, int]  # rows dropped before or during compute: deadline, cancelled
    rejected: dict[str, int]  # admissions refused: queue_full, tenant_limit, draining
    faults: dict[str, int]  # exceptions contained, by stage (encode, prefill, decode, ...)
    non_finite: int  # rows stopped because their logits were NaN or infinite
    quarantined: int  # adapter versions quarantined for that
    running: int  # rows in the running batch now
    tiers: TierStats

    @property
    def mean_batch_size(self) -> float:
        """Rows per decode step."""
        return self.step_rows / self.steps if self.steps else 0.0

    @property
    def mean_adapters_per_batch(self) -> float:
        """Distinct adapters per decode step (how much adapters mix)."""
        return self.step_adapters / self.steps if self.steps else 0.0
