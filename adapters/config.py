"""Typed configurations: the backbone and one adapter set.

A `BackboneConfig` says how to assemble the frozen model (vision encoder, connector kind, causal
LM, tokenizer). An `AdapterConfig` describes one adapter set version: method, contexts, rank,
targets, connector shape and the fingerprint of the backbone it was trained on. Both are plain
frozen dataclasses, validated once in `__post_init__`, serialised as JSON.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Method = Literal["lora", "ia3", "bitfit"]
ConnectorKind = Literal["linear", "mlp"]

METHODS: tuple[str, ...] = ("lora", "ia3", "bitfit")
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


@dataclass(frozen=True)
class ConnectorSpec:
    """Shape of the per-adapter connector: vision features -> LM embeddings."""

    kind: ConnectorKind
    in_features: int
    out_features: int
    hidden_features: int = 0  # mlp only

    def __post_init__(self) -> None:
        if self.kind not in ("linear", "mlp"):
            raise ValueError(f"connector kind must be 'linear' or 'mlp', got {self.kind!r}")
        if self.kind == "mlp" and self.hidden_features <= 0:
            raise ValueError("an mlp connector needs hidden_features > 0")


@dataclass(frozen=True)
class AdapterConfig:
    """One adapter set version: self-describing, stored as adapter_config.json."""

    method: Method
    connector: ConnectorSpec
    base_fingerprint: str
    contexts: tuple[str, ...] = CONTEXTS
    rank: int = 8
    alpha: float | None = None  # LoRA scaling = alpha / rank; None means alpha = rank
    targets: tuple[str, ...] = ()
    num_layers: int = 0
    connector_dropout: float = 0.1
    init: dict[str, str] = field(
        default_factory=lambda: {
            "lora_A": "kaiming_uniform(a=sqrt(5))",
            "lora_B": "zeros",
            "ia3": "ones",
            "bias": "zeros",
            "connector": "torch.nn.Linear default",
        }
    )
    format_version: int = FORMAT_VERSION
    description: str = ""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(
                f"unknown method {self.method!r}; expected one of {', '.join(METHODS)}"
            )
        if self.contexts not in (CONTEXTS, AGNOSTIC):
            raise ValueError(
                f"contexts must be {list(CONTEXTS)} (context-specific) or {list(AGNOSTIC)} (agnostic), got {list(self.contexts)}"
            )
        if self.method == "lora" and self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if not self.targets:
            raise ValueError("an adapter set needs at least one target module")
        resolve_targets(self.method, list(self.targets))
        if self.num_layers < 1:
            raise ValueError("num_layers must be >= 1")
        if self.format_version != FORMAT_VERSION:
            raise ValueError(
                f"unsupported adapter format_version {self.format_version}; this build reads {FORMAT_VERSION}"
            )

    @property
    def agnostic(self) -> bool:
        return self.contexts == AGNOSTIC

    @property
    def scaling(self) -> float:
        return (self.alpha if self.alpha is not None else self.rank) / self.rank

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["contexts"] = list(self.contexts)
        data["targets"] = list(self.targets)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown adapter_config keys: {sorted(unknown)}")
        kwargs = dict(data)
        kwargs["connector"] = ConnectorSpec(**data["connector"])
        kwargs["contexts"] = tuple(data.get("contexts", CONTEXTS))
        kwargs["targets"] = tuple(data.get("targets", ()))
        return cls(**kwargs)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: Path) -> AdapterConfig:
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path.name} is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ValueError(f"{path.name} must hold a JSON object")
        return cls.from_dict(data)


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
