"""Service configuration: one typed `Settings`, read from `CTXPEFT_*` environment variables.

Field names are the `ctxpeft serve` flag names with underscores (`--max-batch-size` is
`max_batch_size`, env `CTXPEFT_MAX_BATCH_SIZE`). Values are validated once here, at the edge,
and trusted afterwards.

    settings = Settings()                      # env + defaults
    settings = Settings(port=9000, keys=...)   # explicit values win over the environment
    assert_safe_binding(settings, has_keys=not key_store.empty)
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Annotated, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

MiB = 1024 * 1024

PositiveInt = Annotated[int, Field(gt=0)]
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")
LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})
# How the end of a drain is spent once `drain_timeout_s` ran out with requests unfinished
# (`ctxpeft serve` and `ctxpeft serve --ray` keep both inside drain_timeout_s):
ANSWER_GRACE_S = 0.5  # waiting handlers notice the expired drain (within a poll), answer 503
CLOSE_GRACE_S = 0.5  # then the engine's close is waited for this long (ServiceState.close)


class EngineConfig(BaseModel):
    """The serving engine's knobs: batching, the adapter tiers, admission control.

    `Settings` inherits these fields (each is defined once, here, with its default, bounds and
    description); the engine takes only this part: `EngineConfig.from_settings(settings)`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    # --- batching --------------------------------------------------------------------------
    scheduling: Literal["continuous", "static"] = Field(
        default="continuous",
        description="continuous: rows join and leave the running batch between decode steps; "
        "static: a batch runs to its end before the next one starts (the baseline).",
    )
    max_batch_size: PositiveInt = Field(
        default=32, description="Most rows running together (one forward pass per step)."
    )
    max_prefill_rows: PositiveInt = Field(
        default=32,
        description="Most rows that join a running batch in one step (continuous): the "
        "longest a burst of arrivals can stall the running rows is one prefill of this many "
        "rows (lower it where streaming latency matters more than throughput). An empty "
        "batch takes up to max_batch_size.",
    )
    prefill_min_rows: PositiveInt = Field(
        default=4,
        description="Continuous: while rows run, waiting rows join once this many of them have "
        "room (fewer, larger prefills cost less per row); when more wait than there is room, "
        "they wait for this many free places instead of filling each one as it frees.",
    )
    prefill_max_wait_steps: int = Field(
        default=4,
        ge=0,
        description="Continuous: ...or, when fewer are waiting and all of them fit, once the "
        "first has waited this many decode steps (bounds the time to first token; 0: at once).",
    )
    overlap: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="Overlap scheduling: a decode step is launched before the previous "
        "step's tokens are read, so the host's work of a step runs while the device computes "
        "the next (auto: on for CUDA, off for CPU, where a forward runs on the calling thread "
        "and a row's extra step past its end is pure cost). The tokens are the same.",
    )
    max_wait_ms: float = Field(
        default=5.0,
        ge=0,
        le=10_000,
        description="Static scheduling: longest a batch waits to fill before it runs (ms).",
    )
    max_adapters_per_batch: PositiveInt | None = Field(
        default=None,
        description="Most distinct adapters running together (empty: up to device_slots; "
        "1: grouping only).",
    )

    # --- adapter and encoder caches --------------------------------------------------------
    device_slots: PositiveInt = Field(
        default=16, description="Adapter sets resident on the device at once (bank slots)."
    )
    max_rank: PositiveInt = Field(default=64, description="Largest adapter rank the bank accepts.")
    cpu_cache_bytes: int = Field(
        default=268_435_456, ge=0, description="Byte budget of the CPU LRU tier of adapter weights."
    )
    encoder_cache_entries: int = Field(
        default=512, ge=0, description="Vision-encoder outputs cached by image content (0: off)."
    )
    encoder_cache_shared: bool = Field(
        default=False,
        description="Share encoder-cache entries across tenants (single-tenant deployments); "
        "by default each tenant has its own, so no tenant can learn another's images.",
    )
    refresh_s: float = Field(
        default=2.0,
        gt=0,
        description="How often the adapter store is rescanned for changes by other processes (s).",
    )
    preprocess_threads: PositiveInt = Field(
        default=2, description="Threads that decode and resize uploaded images."
    )

    # --- sharing between tenants ---------------------------------------------------------------
    batch_aging_steps: PositiveInt = Field(
        default=64,
        description="A batch-class row that has waited this many decode steps counts as "
        "interactive from then on (no batch row starves).",
    )
    batch_queue_share: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="Batch-class requests are refused (429 batch_shed) once the rows waiting "
        "reach this share of queue_size: under overload, batch requests are refused first.",
    )

    # --- trust between tenants ---------------------------------------------------------------
    adapter_probe: bool = Field(
        default=True,
        description="Run the servability probe (one small forward on a fixed image) on every "
        "upload and before a version found in the store is first served: a version that "
        "raises or gives NaN/infinity is refused (422). Off only for trusted stores.",
    )
    quarantine_after: PositiveInt = Field(
        default=3,
        description="Quarantine an adapter version (422 adapter_quarantined until replaced) "
        "after this many of its rows in a row ended with non-finite values.",
    )

    # --- admission control -----------------------------------------------------------------
    queue_size: PositiveInt = Field(
        default=256, description="Waiting requests before 503 queue_full."
    )
    tenant_max_inflight: PositiveInt = Field(
        default=32, description="Requests one tenant may have queued or running before 429."
    )
    request_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="Deadline of one request from admission to answer (504 after).",
    )
    default_max_new_tokens: PositiveInt = Field(
        default=32, description="Caption length in tokens when the request does not say."
    )
    max_new_tokens_limit: PositiveInt = Field(
        default=64, description="Largest max_new_tokens a request may ask for (422 above)."
    )

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.default_max_new_tokens > self.max_new_tokens_limit:
            raise ValueError(
                f"default_max_new_tokens ({self.default_max_new_tokens}) must not exceed "
                f"max_new_tokens_limit ({self.max_new_tokens_limit}); raise the limit or lower "
                "the default"
            )
        return self

    @classmethod
    def from_settings(cls, settings: EngineConfig) -> EngineConfig:
        """The engine's part of the service settings (a `Settings` is an `EngineConfig`)."""
        return cls.model_validate(settings.model_dump(include=set(cls.model_fields)))


class Settings(BaseSettings, EngineConfig):
    """Everything `ctxpeft serve` can be told; see each field's description."""

    model_config = SettingsConfigDict(
        env_prefix="CTXPEFT_",
        extra="forbid",
        validate_default=True,
        frozen=False,
    )

    # --- network -------------------------------------------------------------------------
    host: str = Field(
        default="127.0.0.1", description="Interface to bind; non-loopback needs API keys."
    )
    port: int = Field(
        default=8000, ge=0, le=65535, description="TCP port to listen on (0: any free)."
    )

    # --- storage and model -----------------------------------------------------------------
    runtime_dir: Path = Field(
        default=Path("var"),
        description="Runtime data folder (built backbone, adapter store, caches).",
    )
    store_dir: Path | None = Field(
        default=None,
        description="Adapter store folder; defaults to <runtime_dir>/adapters (backbone demo) "
        "or <runtime_dir>/adapters-<backbone> (another backbone named by a plain name).",
    )
    backbone: str = Field(
        default="demo",
        min_length=1,
        description="Backbone: a preset name, a name built under <runtime_dir>/backbones, a "
        "saved backbone folder or a backbone config JSON.",
    )
    device: str = Field(
        default="auto", min_length=1, description="Torch device: auto, cpu, cuda, cuda:1."
    )
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        default="float32", description="Compute dtype of the backbone and adapters."
    )
    drain_timeout_s: float = Field(
        default=20.0,
        ge=0,
        description="On shutdown, how long in-flight requests may take to finish.",
    )

    # --- uploads ---------------------------------------------------------------------------
    max_body_bytes: PositiveInt = Field(
        default=10 * MiB, description="Largest request body (413 above)."
    )
    max_image_pixels: PositiveInt = Field(
        default=16_000_000, description="Largest width*height of an uploaded image (413 above)."
    )
    max_image_side: PositiveInt = Field(
        default=8192, description="Largest width or height of an uploaded image (413 above)."
    )
    max_concurrent_decodes: PositiveInt = Field(
        default=2,
        le=256,
        description="Images decoded at once (the rest wait); bounds decoding memory.",
    )
    image_decode_side: int = Field(
        default=512,
        ge=8,
        le=8192,
        description="Decoded images are reduced (by an integer factor, JPEG while decoding) "
        "until a side would go below this; at least the encoder's image_size.",
    )
    tenant_max_adapters: int = Field(
        default=100, ge=0, description="Adapters one tenant may store (0: no limit; 413 above)."
    )
    tenant_max_adapter_bytes: int = Field(
        default=2 * 1024 * MiB,
        ge=0,
        description="Bytes of all versions one tenant may store (0: no limit; 413 above).",
    )
    # NoDecode: the env value may be "PNG,JPEG" as well as a JSON list; _split_formats parses.
    allowed_image_formats: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(IMAGE_FORMATS),
        min_length=1,
        description=f"Accepted image formats, detected by content; subset of {IMAGE_FORMATS}.",
    )

    # --- auth ------------------------------------------------------------------------------
    keys_file: Path | None = Field(
        default=None,
        description='JSON keys file: {"keys": [{"key"|"sha256", "tenant", "rights"}]}.',
    )
    keys: str | None = Field(
        default=None, description="Inline JSON with the same shape as keys_file."
    )
    allow_unauthenticated: bool = Field(
        default=False,
        description="Allow a non-loopback host without API keys (everyone is 'default').",
    )
    default_adapter: str | None = Field(
        default=None, description="Adapter used by /caption when the request names none."
    )

    # --- fine-tuning: /v1/files and /v1/fine_tuning/jobs (docs/OPERATIONS.md, "Fine-tuning
    # jobs") -----------------------------------------------------------------------------------
    jobs_enabled: bool = Field(
        default=True, description="Offer /v1/files and /v1/fine_tuning/jobs (training jobs)."
    )
    jobs_backbone: str | None = Field(
        default=None,
        description="Saved backbone folder the training processes load (default: the served "
        "backbone's built folder); must be the served backbone (same fingerprint).",
    )
    jobs_device: str = Field(
        default="cpu",
        min_length=1,
        description="Torch device of the training processes (cpu keeps the serving device "
        "for serving).",
    )
    jobs_max_running: PositiveInt = Field(
        default=1, description="Training processes running at once (the others queue)."
    )
    jobs_tenant_max_running: PositiveInt = Field(
        default=1, description="Training processes one tenant may have running at once."
    )
    jobs_tenant_max_queued: int = Field(
        default=4,
        ge=0,
        description="Jobs one tenant may have waiting beyond its running ones (429 above).",
    )
    jobs_tenant_tokens_per_day: int = Field(
        default=50_000_000,
        ge=0,
        description="Training tokens (caption tokens + end token, times epochs) one tenant may "
        "train in 24 hours (0: no limit; 429 above).",
    )
    jobs_threads: PositiveInt = Field(
        default=1, description="Torch threads of one training process."
    )
    jobs_nice: int = Field(
        default=10, ge=0, le=19, description="CPU niceness added to training processes."
    )
    jobs_sched_idle: bool = Field(
        default=False,
        description="Run training processes in Linux's idle scheduling class: only CPU time "
        "nothing else wants (serving first, strictly; a job may starve under full load).",
    )
    jobs_memory_limit_mb: PositiveInt = Field(
        default=6144,
        description="Memory bound of one training process (MiB): its private data "
        "(RLIMIT_DATA) and its resident set; a job over it fails.",
    )
    jobs_max_restarts: int = Field(
        default=3,
        ge=0,
        description="Service restarts a running job survives (resumed from its checkpoint) "
        "before it fails.",
    )
    jobs_metrics_every_steps: PositiveInt = Field(
        default=10, description="A metrics event every this many training steps."
    )
    jobs_ray_cpus: float = Field(
        default=0.5,
        gt=0,
        description="Ray CPUs one training task reserves (ctxpeft serve --ray keeps "
        "jobs_max_running of them free beside the ingress).",
    )
    files_max_bytes: PositiveInt = Field(
        default=64 * MiB, description="Largest uploaded training file (413 above)."
    )
    files_max_examples: PositiveInt = Field(
        default=50_000, description="Most examples (lines) of one training file (400 above)."
    )
    files_tenant_max_bytes: int = Field(
        default=1024 * MiB,
        ge=0,
        description="Bytes of all files one tenant may keep (0: no limit; 413 above).",
    )
    files_tenant_max_files: int = Field(
        default=100, ge=0, description="Files one tenant may keep (0: no limit; 413 above)."
    )

    # --- observability ---------------------------------------------------------------------
    metrics_adapter_labels: int = Field(
        default=20,
        ge=0,
        description='Distinct adapter label values in metrics; the rest are "other".',
    )
    metrics_token: str | None = Field(
        default=None,
        min_length=16,
        description="Bearer token that GET /metrics requires (Prometheus' scrape token); "
        "with one, tenants' own adapter names may appear as labels. Unset: /metrics is open "
        'and, with keys configured, shows tenants\' own adapters as "private".',
    )
    metrics_token_file: Path | None = Field(
        default=None,
        description="File holding the metrics token (instead of metrics_token); Prometheus "
        "reads the same file (credentials_file).",
    )
    usage_ledger: bool = Field(
        default=True,
        description="Record who used what (tenant x adapter x key x minute) in the runtime "
        "folder's database; GET /v1/usage and `ctxpeft usage` read it.",
    )
    usage_flush_s: float = Field(
        default=5.0,
        gt=0,
        le=3600,
        description="How often usage records are written to the database (in batches, off "
        "the request path); a drain writes the rest.",
    )
    log_level: Literal["debug", "info", "warning", "error", "critical"] = Field(
        default="info", description="Log level."
    )
    log_json: bool = Field(
        default=True, description="One JSON object per log line (else plain text)."
    )

    @field_validator("allowed_image_formats", mode="before")
    @classmethod
    def _split_formats(cls, value: object) -> object:
        # Accept "PNG,JPEG" (a CLI flag, an env value) as well as a JSON list.
        if isinstance(value, str):
            if value.lstrip().startswith("["):
                return json.loads(value)
            return [part for part in value.split(",") if part.strip()]
        return value

    @field_validator("allowed_image_formats")
    @classmethod
    def _known_formats(cls, value: list[str]) -> list[str]:
        formats = [part.strip().upper() for part in value]
        formats = ["JPEG" if fmt == "JPG" else fmt for fmt in formats]
        unknown = sorted(set(formats) - set(IMAGE_FORMATS))
        if unknown:
            raise ValueError(f"unknown image formats {unknown}; choose from {list(IMAGE_FORMATS)}")
        return list(dict.fromkeys(formats))

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_level(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    def resolved_store_dir(self) -> Path:
        """The adapter store folder: `store_dir`, or the backbone's default store when unset
        (`default_store_dir`)."""
        if self.store_dir is not None:
            return self.store_dir
        return default_store_dir(self.runtime_dir, self.backbone)


def default_store_dir(runtime_dir: Path, backbone: str) -> Path:
    """Adapters belong to one backbone (its fingerprint), so each named backbone has its own
    store: `<runtime>/adapters` for `demo` (the default), `<runtime>/adapters-<name>` for any
    other backbone named by a plain name (e.g. `smol`, built under <runtime>/backbones/).
    A backbone given as a path or hub id uses `<runtime>/adapters`."""
    plain = "/" not in backbone and "\\" not in backbone and not backbone.endswith(".json")
    if backbone == "demo" or not plain:
        return runtime_dir / "adapters"
    return runtime_dir / f"adapters-{backbone}"


def is_loopback_host(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and the usual localhost names (no DNS lookup)."""
    name = host.strip().strip("[]").lower()
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def assert_safe_binding(settings: Settings, has_keys: bool) -> None:
    """Refuse to expose an unauthenticated service beyond this machine.

    Raises ValueError when `host` is not loopback and no API keys are configured, unless the
    operator said so explicitly with `allow_unauthenticated`.
    """
    if has_keys or settings.allow_unauthenticated or is_loopback_host(settings.host):
        return
    raise ValueError(
        f"refusing to bind host {settings.host!r} without API keys: every client would act as "
        "tenant 'default' with all rights. Configure keys_file / keys (CTXPEFT_KEYS_FILE, "
        "CTXPEFT_KEYS), bind host 127.0.0.1, or set allow_unauthenticated "
        "(--allow-unauthenticated, CTXPEFT_ALLOW_UNAUTHENTICATED=1) to accept the risk."
    )
