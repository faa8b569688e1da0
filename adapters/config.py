"""Typed configurations: the backbone and one adapter set.

A `BackboneConfig` says how to assemble the frozen model (vision encoder, connector kind, causal
LM, tokenizer). An `AdapterConfig` describes one adapter set version: method, contexts, rank,
targets, connector shape and the fingerprint of the backbone it was trained on.

`AdapterConfig` and `ConnectorSpec` are the schema of `adapter_config.json`, the one external
format every adapter version carries: pydantic dataclasses whose every field is typed (strict:
"8" is not a number, true is not an int) and ranged, unknown fields refused, cross-field rules
in one validator. They are checked wherever one is made, in training as at the upload edge.
`AdapterConfig.from_json(raw)` bounds the size and nesting of the bytes before parsing and
raises `AdapterConfigError`, whose message starts with the field at fault ("alpha: ...").
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
from pydantic import (
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
)
from pydantic.dataclasses import dataclass as schema_dataclass

log = logging.getLogger(__name__)

Method = Literal["lora", "ia3", "bitfit"]
ConnectorKind = Literal["linear", "mlp"]

METHODS: tuple[str, ...] = ("lora", "ia3", "bitfit")
# The version of the adapter_config.json schema below. A version's rules never change once
# released: a later build that must refuse something version 1 accepts writes version 2 and
# keeps reading version 1 folders by these rules (see docs/ARCHITECTURE.md, "Adapter config
# schema").
FORMAT_VERSION = 1

# The model's context vocabulary. Every token of the LM input carries one of these ids.
# A context-specific set has one parameter set per context; an agnostic set has one ("all"),
# shared by every token.
CONTEXTS: tuple[str, ...] = ("image", "text")
IMAGE, TEXT = 0, 1
AGNOSTIC: tuple[str, ...] = ("all",)

# Linear modules of a Llama-family decoder layer (Llama, Qwen2, Mistral, SmolLM2 share them).
ATTN_MODULES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
FFN_MODULES: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
LM_MODULES: tuple[str, ...] = ATTN_MODULES + FFN_MODULES
# The paper's fused FFN up projection: gate and up share their input, so LoRA has one A and
# one B of width 2 x intermediate (first half gate, second half up).
FUSED_GATE_UP = "gate_up_proj"

# Default targets per method and group, as the paper places them (setting "AF" = all).
_GROUPS: dict[str, dict[str, tuple[str, ...]]] = {
    "lora": {
        "attn": ATTN_MODULES,
        "ffn": (FUSED_GATE_UP, "down_proj"),
        "all": (*ATTN_MODULES, FUSED_GATE_UP, "down_proj"),
    },
    # IA3 scales keys, values (outputs of k/v) and the FFN intermediate (input of down_proj).
    "ia3": {
        "attn": ("k_proj", "v_proj"),
        "ffn": ("down_proj",),
        "all": ("k_proj", "v_proj", "down_proj"),
    },
    # BitFit adds a bias to every projection.
    "bitfit": {"attn": ATTN_MODULES, "ffn": FFN_MODULES, "all": LM_MODULES},
}
_VALID_TARGETS: dict[str, frozenset[str]] = {
    "lora": frozenset((*LM_MODULES, FUSED_GATE_UP)),
    "ia3": frozenset(("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
    "bitfit": frozenset(LM_MODULES),
}
# IA3 on down_proj scales its *input* (the FFN intermediate activation); elsewhere the output.
IA3_INPUT_SIDE: frozenset[str] = frozenset({"down_proj"})


def resolve_targets(
    method: str, targets: str | list[str] | tuple[str, ...], fuse_gate_up: bool = True
) -> tuple[str, ...]:
    """Turn a group name ("attn", "ffn", "all") or explicit module names into target names."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    if isinstance(targets, str):
        if targets not in _GROUPS[method]:
            raise ValueError(f"unknown target group {targets!r}; expected attn, ffn or all")
        names = _GROUPS[method][targets]
        if method == "lora" and not fuse_gate_up:
            names = tuple(
                n for t in names for n in (("gate_proj", "up_proj") if t == FUSED_GATE_UP else (t,))
            )
        return names
    names = tuple(targets)
    bad = [n for n in names if n not in _VALID_TARGETS[method]]
    if bad:
        raise ValueError(
            f"invalid {method} target(s) {bad}; valid: {sorted(_VALID_TARGETS[method])}"
        )
    if FUSED_GATE_UP in names and ("gate_proj" in names or "up_proj" in names):
        raise ValueError("gate_up_proj (fused) and gate_proj/up_proj cannot be targeted together")
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate targets in {names}")
    return names


# --- the adapter_config.json schema (format_version 1) -------------------------------------
# Bounds of the raw bytes, checked before any parsing: a hostile upload cannot make the parser
# allocate or recurse much (a legitimate config is under 2 KB and nests 2 levels deep).
MAX_CONFIG_BYTES = 64 * 1024
MAX_CONFIG_DEPTH = 8
# Ranges of the fields. Generous: the serving limits (max_rank, the backbone's shapes) are
# checked against the backbone later; these only keep absurd values out of every code path.
MAX_RANK = 4096
MAX_LAYERS = 1024
MAX_FEATURES = 1 << 20
MAX_TARGETS = 64
MAX_DESCRIPTION = 2000
MAX_INIT_ENTRIES = 32
_SHORT_TEXT = 200
# A backbone fingerprint is a hex digest; names such as "paper" appear in tests and presets.
FINGERPRINT_PATTERN = r"^[0-9A-Za-z][0-9A-Za-z._:-]{0,127}$"

# validate_default: a field left at an invalid default (num_layers=0) is an error, as if missing.
_SCHEMA = ConfigDict(extra="forbid", validate_default=True)
Features = Annotated[int, Field(strict=True, ge=1, le=MAX_FEATURES)]
ShortText = Annotated[str, StringConstraints(strict=True, min_length=1, max_length=_SHORT_TEXT)]
Fingerprint = Annotated[str, StringConstraints(strict=True, pattern=FINGERPRINT_PATTERN)]
Rank = Annotated[int, Field(strict=True, ge=0, le=MAX_RANK)]
Alpha = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=-1e6, le=1e6)]
Probability = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=0.0, lt=1.0)]
Layers = Annotated[int, Field(strict=True, ge=1, le=MAX_LAYERS)]
Description = Annotated[str, StringConstraints(strict=True, max_length=MAX_DESCRIPTION)]
InitTable = Annotated[
    dict[ShortText, Annotated[str, StringConstraints(strict=True, max_length=_SHORT_TEXT)]],
    Field(max_length=MAX_INIT_ENTRIES),
]


class AdapterConfigError(ValueError):
    """adapter_config.json is invalid. `field` names the field at fault ("" for the whole
    file); the message starts with it."""

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field


@schema_dataclass(frozen=True, config=_SCHEMA)
class ConnectorSpec:
    """Shape of the per-adapter connector: vision features -> LM embeddings."""

    kind: ConnectorKind
    in_features: Features
    out_features: Features
    hidden_features: Annotated[int, Field(strict=True, ge=0, le=MAX_FEATURES)] = 0  # mlp only

    @pydantic.model_validator(mode="after")
    def _consistent(self) -> ConnectorSpec:
        if self.kind == "mlp" and self.hidden_features <= 0:
            raise ValueError("an mlp connector needs hidden_features > 0")
        return self


def _default_init() -> dict[str, str]:
    return {
        "lora_A": "kaiming_uniform(a=sqrt(5))",
        "lora_B": "zeros",
        "ia3": "ones",
        "bias": "zeros",
        "connector": "torch.nn.Linear default",
    }


@schema_dataclass(frozen=True, config=_SCHEMA)
class AdapterConfig:
    """One adapter set version: self-describing, stored as adapter_config.json."""

    method: Method
    connector: ConnectorSpec
    base_fingerprint: Fingerprint
    contexts: Annotated[tuple[ShortText, ...], Field(max_length=4)] = CONTEXTS
    # LoRA rank (>= 1). IA3 and BitFit have no rank: theirs is carried (any value in range,
    # 0 included) and means nothing; `scaling` is 1 for them.
    rank: Rank = 8
    alpha: Alpha | None = None  # LoRA scaling = alpha / rank; None means alpha = rank
    targets: Annotated[tuple[ShortText, ...], Field(max_length=MAX_TARGETS)] = ()
    num_layers: Layers = 0  # 0 (the default) is refused: it must be given
    connector_dropout: Probability = 0.1
    init: InitTable = field(default_factory=_default_init)
    format_version: Annotated[int, Field(strict=True)] = FORMAT_VERSION
    description: Description = ""

    # Field validators (not one model validator) so that an error names its field; a field
    # declared earlier (method) is in `info.data` once it is valid.
    @pydantic.field_validator("contexts")
    @classmethod
    def _check_contexts(cls, contexts: tuple[str, ...]) -> tuple[str, ...]:
        if contexts not in (CONTEXTS, AGNOSTIC):
            raise ValueError(
                f"contexts must be {list(CONTEXTS)} (context-specific) or {list(AGNOSTIC)} (agnostic), got {list(contexts)}"
            )
        return contexts

    @pydantic.field_validator("rank")
    @classmethod
    def _check_rank(cls, rank: int, info: ValidationInfo) -> int:
        if info.data.get("method") == "lora" and rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        return rank

    @pydantic.field_validator("targets")
    @classmethod
    def _check_targets(cls, targets: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        if not targets:
            raise ValueError("an adapter set needs at least one target module")
        method = info.data.get("method")
        if method is not None:
            resolve_targets(method, list(targets))
        return targets

    @pydantic.field_validator("format_version")
    @classmethod
    def _check_version(cls, version: int) -> int:
        if version != FORMAT_VERSION:
            raise ValueError(
                f"unsupported adapter format_version {version}; this build reads {FORMAT_VERSION}"
            )
        return version

    @property
    def agnostic(self) -> bool:
        return self.contexts == AGNOSTIC

    @property
    def scaling(self) -> float:
        """LoRA's alpha / rank (rank >= 1 is enforced for LoRA); 1 for IA3 and BitFit, which
        have no rank (a BitFit set saying `"rank": 0` once divided by zero here)."""
        if self.method != "lora":
            return 1.0
        return (self.alpha if self.alpha is not None else self.rank) / self.rank

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["contexts"] = list(self.contexts)
        data["targets"] = list(self.targets)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], stored: bool = False) -> AdapterConfig:
        """Validate parsed JSON. `stored`: the folder is already in a store (see
        `_relax_stored_metadata`). Raises AdapterConfigError naming the field."""
        if not isinstance(data, dict):
            raise AdapterConfigError("adapter_config.json must hold a JSON object")
        try:
            return _ADAPTER_CONFIG.validate_python(data)
        except ValidationError as exc:
            if stored:
                relaxed = _relax_stored_metadata(data, exc)
                if relaxed is not None:
                    return cls.from_dict(relaxed)
            raise _config_error(exc) from None

    @classmethod
    def from_json(cls, raw: bytes, stored: bool = False) -> AdapterConfig:
        """Parse adapter_config.json bytes: size and nesting are bounded before parsing,
        duplicate keys refused, then the schema applies. Raises AdapterConfigError."""
        limit = STORED_MAX_CONFIG_BYTES if stored else MAX_CONFIG_BYTES
        if len(raw) > limit:
            raise AdapterConfigError(
                f"adapter_config.json is {len(raw)} bytes; the limit is {limit}"
            )
        depth_limit = STORED_MAX_CONFIG_DEPTH if stored else MAX_CONFIG_DEPTH
        depth = json_depth(raw, stop_above=depth_limit)
        if depth > depth_limit:
            raise AdapterConfigError(f"adapter_config.json nests deeper than {depth_limit} levels")
        try:
            data = json.loads(raw, object_pairs_hook=_unique_keys)
        except AdapterConfigError:  # a duplicate key
            raise
        except RecursionError:  # unreachable below the depth limit; kept as a backstop
            raise AdapterConfigError("adapter_config.json nests too deeply") from None
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, int digit limits
            raise AdapterConfigError(f"adapter_config.json is not valid JSON: {exc}") from None
        return cls.from_dict(data, stored=stored)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: Path, stored: bool = False) -> AdapterConfig:
        """Read adapter_config.json (at most the size limit plus one byte is read)."""
        limit = STORED_MAX_CONFIG_BYTES if stored else MAX_CONFIG_BYTES
        with open(path, "rb") as handle:
            raw = handle.read(limit + 1)
        return cls.from_json(raw, stored=stored)


_ADAPTER_CONFIG: TypeAdapter[AdapterConfig] = TypeAdapter(AdapterConfig)


def _config_error(exc: ValidationError) -> AdapterConfigError:
    """The first schema violation as an error that names its field."""
    first = exc.errors(include_url=False)[0]
    where = ".".join(str(part) for part in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "unexpected_keyword_argument":
        message = "unknown field (this build reads format_version 1)"
    elif first["type"] in ("missing", "missing_argument"):
        message = "required field is missing"
    more = len(exc.errors()) - 1
    if more:
        message += f" (and {more} more problem{'s' if more > 1 else ''})"
    return AdapterConfigError(message, where)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for key, value in pairs:
        if key in data:
            raise AdapterConfigError("the key appears twice", key)
        data[key] = value
    return data


# Bytes that open or close a JSON container; everything else is deleted before counting.
_BRACKETS = b"[]{}"
_NOT_BRACKETS = bytes(b for b in range(256) if b not in _BRACKETS)
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')


def json_depth(raw: bytes, stop_above: int | None = None) -> int:
    """How deeply JSON `raw` nests arrays and objects, found without parsing it (strings are
    skipped, so brackets inside them do not count). Linear time; stops counting once the
    depth exceeds `stop_above`."""
    brackets = _JSON_STRING.sub(b'""', raw).translate(None, _NOT_BRACKETS)
    depth = deepest = 0
    for byte in brackets:
        if byte in b"[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if stop_above is not None and deepest > stop_above:
                    break
        else:
            depth -= 1
    return deepest


# --- folders already in a store: never judged differently from when they were stored --------
# Before this schema, adapter_config.json was checked by hand: the fields that decide the
# computation (method, contexts, rank of LoRA, targets, layers, connector, fingerprint) had
# the same rules as now; metadata the service never computes with (description, dropout, init,
# the rank IA3/BitFit ignore) was not checked. A stored folder whose only fault is such
# metadata keeps loading (the value is replaced and a warning logged), so that an upgrade never
# makes a version that served yesterday unavailable. Uploads get no such leniency.
STORED_MAX_CONFIG_BYTES = 16 * 1024 * 1024
STORED_MAX_CONFIG_DEPTH = 256
_METADATA_DEFAULTS: dict[str, Any] = {
    "description": "",
    "connector_dropout": 0.1,
    "init": _default_init(),
}


def _relax_stored_metadata(data: dict[str, Any], exc: ValidationError) -> dict[str, Any] | None:
    """`data` with its invalid metadata fields replaced, or None if anything else is wrong."""
    metadata = set(_METADATA_DEFAULTS)
    if data.get("method") in ("ia3", "bitfit"):
        metadata.add("rank")
    fields = {str(e["loc"][0]) if e["loc"] else "" for e in exc.errors()}
    if not fields or not fields <= metadata:
        return None
    relaxed = dict(data)
    for name in sorted(fields):
        value = data[name]
        if name == "description":
            text = value if isinstance(value, str) else json.dumps(value)
            relaxed[name] = text[:MAX_DESCRIPTION]
        elif name == "rank":
            relaxed[name] = 8
        else:
            relaxed[name] = _METADATA_DEFAULTS[name]
        log.warning("stored adapter_config.json: invalid %s replaced (%r)", name, value)
    return relaxed


@dataclass(frozen=True)
class BackboneConfig:
    """How to assemble the frozen backbone.

    `vision` and `lm` are either a source (local folder or Hugging Face hub id, loaded with
    `from_pretrained`) or an inline Hugging Face config dict (random init, no download).
    `tokenizer` is a source, or None to build the local caption tokenizer.
    """

    name: str
    vision: str | dict[str, Any]
    lm: str | dict[str, Any]
    tokenizer: str | None = None
    connector: ConnectorKind = "linear"
    connector_hidden: int = 0
    image_size: int = 224
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    dtype: str = "float32"
    # Encoders that output a feature map [N, C, H, W] (CNNs): 0 keeps all H*W positions as
    # image tokens; k > 0 average-pools the map to k x k tokens first (a shorter LM sequence).
    image_pool: int = 0

    def __post_init__(self) -> None:
        if self.connector not in ("linear", "mlp"):
            raise ValueError(f"connector must be 'linear' or 'mlp', got {self.connector!r}")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {self.dtype!r}")
        if self.image_size < 8:
            raise ValueError("image_size must be >= 8")
        if self.image_pool < 0:
            raise ValueError(f"image_pool must be >= 0 (0: no pooling), got {self.image_pool}")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["image_mean"] = list(self.image_mean)
        data["image_std"] = list(self.image_std)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BackboneConfig:
        kwargs = dict(data)
        for key in ("image_mean", "image_std"):
            if key in kwargs:
                kwargs[key] = tuple(kwargs[key])
        return cls(**kwargs)

    def replace(self, **changes: Any) -> BackboneConfig:
        return dataclasses.replace(self, **changes)
