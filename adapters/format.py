"""On-disk format of one adapter set version, validation, and import of PEFT LoRA folders.

    <version folder>/
        adapter_config.json      AdapterConfig (self-describing: method, contexts, rank, ...)
        adapter.safetensors      tensors named as in `adapters.adapter_set` (weights only)

Loading validates everything before a set can be served and rejects with a message that says
what is wrong: pickle files, an adapter_config.json outside its schema (`AdapterConfig`,
naming the field), unknown/missing tensors, shapes or targets that do not match the backbone,
a different base fingerprint, a rank above the bank's maximum, tensor dtypes the service does
not serve, non-finite values.

    adapter = validate_folder(folder, backbone.dims, fingerprint=..., max_rank=...)  # or raises
    config = read_config(folder)                                  # the config alone

Validation failures raise `AdapterFormatError`; an OSError (the disk, not the folder's
content) propagates as it is, so that a caller can tell "invalid" (final) from "could not be
read now" (worth a retry). `stored=True` reads a folder already in a store by the rules it was
accepted under (see `AdapterConfig.from_dict`); uploads and offline checks use the default.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Annotated

import torch
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from adapters.adapter_set import AdapterSet, tensor_shapes
from adapters.backbone import LMDims
from adapters.config import (
    AGNOSTIC,
    MAX_CONFIG_BYTES,
    MAX_CONFIG_DEPTH,
    MAX_RANK,
    AdapterConfig,
    AdapterConfigError,
    ConnectorSpec,
    json_depth,
    resolve_targets,
)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter.safetensors"
# Anything that unpickles on load is refused outright, whatever its name says.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".npy", ".npz", ".joblib")


# The tensor dtypes the service computes in (Settings.dtype); anything else is refused at
# upload. Folders already stored were accepted by older builds with any floating dtype: those
# that could serve (float64 too; float8 never passed the finite check) still load.
SERVED_DTYPES: frozenset[torch.dtype] = frozenset({torch.float32, torch.float16, torch.bfloat16})
STORED_DTYPES: frozenset[torch.dtype] = SERVED_DTYPES | {torch.float64}


class AdapterFormatError(ValueError):
    """An adapter folder is invalid; the message says why. `field` names the config field at
    fault when there is one (e.g. "alpha", "connector.in_features")."""

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.field = field


def save_adapter(adapter: AdapterSet, folder: Path) -> None:
    """Write `adapter` into `folder` (created; must be empty or absent)."""
    folder.mkdir(parents=True, exist_ok=True)
    adapter.config.save(folder / CONFIG_FILE)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in adapter.tensors().items()}
    save_file(
        tensors,
        str(folder / WEIGHTS_FILE),
        metadata={"format": "ctxpeft", "version": str(adapter.config.format_version)},
    )


def validate_folder(
    folder: Path,
    dims: LMDims,
    fingerprint: str | None = None,
    max_rank: int | None = None,
    vision_dim: int | None = None,
    connector: ConnectorSpec | None = None,
    stored: bool = False,
) -> AdapterSet:
    """Read and validate an adapter folder against a backbone (`dims`, and when given its
    `fingerprint`, the bank's `max_rank`, the encoder's `vision_dim`, the bank's `connector`).
    The check an upload gets; raises AdapterFormatError (OSError when the disk fails)."""
    config = read_config(folder, stored=stored)
    check_compatible(config, dims, fingerprint, max_rank, vision_dim, connector)
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        raise AdapterFormatError(f"missing {WEIGHTS_FILE} in {folder.name}")
    tensors = read_tensors(path)
    check_tensors(config, dims, tensors, stored=stored)
    # The tensors were just read for this set and nothing else holds them: adopt, not copy.
    return AdapterSet.adopt(config, dims, tensors)


load_adapter = validate_folder  # the older name


def parse_config(raw: bytes, stored: bool = False) -> AdapterConfig:
    """adapter_config.json bytes as an AdapterConfig (size and nesting bounded before
    parsing); raises AdapterFormatError naming the field."""
    try:
        return AdapterConfig.from_json(raw, stored=stored)
    except AdapterConfigError as exc:
        raise AdapterFormatError(f"invalid {CONFIG_FILE}: {exc}", exc.field) from None


def read_config(folder: Path, stored: bool = False) -> AdapterConfig:
    if not folder.is_dir():
        raise AdapterFormatError(f"adapter folder {folder} does not exist")
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise AdapterFormatError(
            f"refusing pickle file(s) {pickles}: adapter weights must be safetensors only"
        )
    if not (folder / CONFIG_FILE).is_file():
        raise AdapterFormatError(f"missing {CONFIG_FILE} in {folder.name}")
    try:
        return AdapterConfig.load(folder / CONFIG_FILE, stored=stored)
    except AdapterConfigError as exc:
        raise AdapterFormatError(f"invalid {CONFIG_FILE}: {exc}", exc.field) from None


def check_compatible(
    config: AdapterConfig,
    dims: LMDims,
    fingerprint: str | None,
    max_rank: int | None,
    vision_dim: int | None = None,
    connector: ConnectorSpec | None = None,
) -> None:
    if fingerprint is not None and config.base_fingerprint != fingerprint:
        raise AdapterFormatError(
            f"base fingerprint mismatch: the adapter was trained on backbone {config.base_fingerprint[:12]}, "
            f"this service runs {fingerprint[:12]}"
        )
    if config.num_layers != dims.num_layers:
        raise AdapterFormatError(
            f"adapter has {config.num_layers} layers, the backbone has {dims.num_layers}"
        )
    if max_rank is not None and config.method == "lora" and config.rank > max_rank:
        raise AdapterFormatError(
            f"rank {config.rank} is greater than max_rank {max_rank}; raise max_rank (CTXPEFT_MAX_RANK) to load it"
        )
    if config.connector.out_features != dims.hidden_size:
        raise AdapterFormatError(
            f"connector outputs {config.connector.out_features} features, the LM expects {dims.hidden_size}"
        )
    if vision_dim is not None and config.connector.in_features != vision_dim:
        raise AdapterFormatError(
            f"connector takes {config.connector.in_features} features, the vision encoder gives {vision_dim}"
        )
    if connector is not None and config.connector != connector:
        raise AdapterFormatError(
            f"connector {config.connector} does not match this backbone's {connector}"
        )


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, in memory (not mapped: the tensors do not change
    if the file does). The safetensors reader checks the header, dtypes and offsets."""
    try:
        return load_file(str(path))
    except (SafetensorError, ValueError) as exc:  # an OSError is the disk's: not wrapped
        raise AdapterFormatError(f"{path.name} is not a valid safetensors file: {exc}") from exc


def check_dtype(name: str, tensor: torch.Tensor, stored: bool = False) -> None:
    """Refuse dtypes the service does not serve (a stored folder: also float64)."""
    if tensor.dtype not in (STORED_DTYPES if stored else SERVED_DTYPES):
        served = ", ".join(sorted(str(d).removeprefix("torch.") for d in SERVED_DTYPES))
        raise AdapterFormatError(f"{name} has dtype {tensor.dtype}; expected one of {served}")


def check_tensors(
    config: AdapterConfig, dims: LMDims, tensors: dict[str, torch.Tensor], stored: bool = False
) -> None:
    expected = tensor_shapes(config, dims)
    unknown = sorted(set(tensors) - set(expected))
    if unknown:
        raise AdapterFormatError(
            f"unexpected tensors (target modules that do not match the config or backbone): {unknown[:5]}"
            + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        )
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise AdapterFormatError(
            f"missing tensors: {missing[:5]}"
            + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        )
    for name, shape in expected.items():
        tensor = tensors[name]
        if tuple(tensor.shape) != shape:
            raise AdapterFormatError(
                f"shape mismatch for {name}: file has {tuple(tensor.shape)}, backbone needs {shape}"
            )
        check_dtype(name, tensor, stored)
    bad = non_finite([(name, tensors[name]) for name in expected])
    if bad:
        raise AdapterFormatError(f"non-finite values (NaN or Inf) in {bad[0]}")


def non_finite(named: list[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the tensors holding a NaN or an infinity, in order.

    One float32 sum per tensor and one host read for all of them: a NaN or an infinity
    anywhere makes the sum non-finite, so a finite sum proves the tensor finite. A non-finite
    sum is confirmed element by element, since finite values near the float32 limit can
    overflow the sum (such a tensor is accepted). About 40x faster than `isfinite().all()` per
    tensor on a 3.8M-value set (docs/BENCHMARKS.md, cold load)."""
    if not named:
        return []
    sums = torch.stack([t.sum(dtype=torch.float32) for _, t in named])
    suspects = (~torch.isfinite(sums)).nonzero().flatten().tolist()
    return [named[i][0] for i in suspects if not bool(torch.isfinite(named[i][1]).all())]


# --- PEFT import ----------------------------------------------------------------------
class PeftLoraConfig(BaseModel):
    """The fields of a PEFT adapter_config.json that the import reads, typed and ranged
    (PEFT writes many more; they are ignored)."""

    model_config = ConfigDict(extra="ignore")

    peft_type: StrictStr = "LORA"
    r: Annotated[int, Field(strict=True, ge=1, le=MAX_RANK)]
    lora_alpha: Annotated[float, Field(strict=True, allow_inf_nan=False, gt=0, le=1e6)] | None = (
        None
    )
    use_rslora: StrictBool = False
    fan_in_fan_out: StrictBool = False
    base_model_name_or_path: Annotated[str, Field(max_length=500)] | None = None


def read_peft_config(path: Path) -> PeftLoraConfig:
    """A PEFT LoRA adapter_config.json, bounded like ours before parsing; raises
    AdapterFormatError naming the field."""
    with open(path, "rb") as handle:
        raw = handle.read(MAX_CONFIG_BYTES + 1)
    if len(raw) > MAX_CONFIG_BYTES:
        raise AdapterFormatError(f"the PEFT {path.name} is larger than {MAX_CONFIG_BYTES} bytes")
    if json_depth(raw, stop_above=MAX_CONFIG_DEPTH) > MAX_CONFIG_DEPTH:
        raise AdapterFormatError(f"the PEFT {path.name} nests deeper than {MAX_CONFIG_DEPTH}")
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise AdapterFormatError(f"the PEFT {path.name} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise AdapterFormatError(f"the PEFT {path.name} must hold a JSON object")
    if data.get("peft_type", "LORA") != "LORA":
        raise AdapterFormatError(f"only PEFT LoRA can be imported, got {data.get('peft_type')}")
    try:
        return PeftLoraConfig.model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(part) for part in first["loc"])
        raise AdapterFormatError(
            f"invalid PEFT {path.name}: {where}: {first['msg']}", where
        ) from None


_PEFT_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


def import_peft_lora(
    peft_folder: Path,
    dims: LMDims,
    fingerprint: str,
    vision_dim: int,
    connector: ConnectorSpec | None = None,
    connector_from: AdapterSet | None = None,
    seed: int = 0,
) -> AdapterSet:
    """A standard PEFT LoRA folder (adapter_config.json + adapter_model.safetensors) as a
    context-agnostic adapter set. PEFT folders have no connector: take it from
    `connector_from` (e.g. a set trained on this backbone) or start a fresh one."""
    cfg_path = peft_folder / "adapter_config.json"
    weights = peft_folder / "adapter_model.safetensors"
    pickles = sorted(p.name for p in peft_folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise AdapterFormatError(
            f"refusing pickle file(s) {pickles}: only adapter_model.safetensors is read"
        )
    if not cfg_path.is_file() or not weights.is_file():
        raise AdapterFormatError(
            "a PEFT LoRA folder needs adapter_config.json and adapter_model.safetensors"
        )
    peft = read_peft_config(cfg_path)
    if peft.fan_in_fan_out:
        raise AdapterFormatError("fan_in_fan_out LoRA (Conv1D models) is not a Llama-family layout")
    rank = peft.r
    alpha = float(peft.lora_alpha if peft.lora_alpha is not None else rank)
    if peft.use_rslora:
        # rsLoRA scales by alpha / sqrt(r); ours is alpha / r, so the equivalent alpha is alpha * sqrt(r).
        alpha = alpha * math.sqrt(rank)
    raw = load_file(str(weights))
    found: dict[str, torch.Tensor] = {}
    targets: set[str] = set()
    for key, tensor in raw.items():
        match = _PEFT_KEY.search(key)
        if match is None:
            raise AdapterFormatError(
                f"unsupported PEFT tensor {key!r} (only LoRA A/B of Llama-family linears)"
            )
        layer, module, which = int(match.group(1)), match.group(2), match.group(3)
        targets.add(module)
        # PEFT: lora_A.weight [r, d_in], lora_B.weight [d_out, r]; ours: A [C, d_in, r], B [C, r, d_out].
        found[f"lm.layers.{layer}.{module}.lora_{which}"] = tensor.t().unsqueeze(0).float()
    conn = connector or ConnectorSpec("linear", vision_dim, dims.hidden_size)
    config = AdapterConfig(
        method="lora",
        connector=conn,
        base_fingerprint=fingerprint,
        contexts=AGNOSTIC,
        rank=rank,
        alpha=alpha,
        targets=resolve_targets("lora", sorted(targets)),
        num_layers=dims.num_layers,
        description=f"imported from PEFT LoRA ({peft.base_model_name_or_path or 'unknown base'})",
    )
    fresh = AdapterSet.initialise(config, dims, seed=seed).tensors()
    source = connector_from.tensors() if connector_from is not None else fresh
    tensors = {n: t for n, t in fresh.items() if n.startswith("connector.")}
    tensors.update({n: source[n] for n in tensors})
    tensors.update(found)
    check_tensors(config, dims, tensors)
    return AdapterSet(config, dims, tensors)
