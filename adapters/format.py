"""On-disk format of one adapter set version, validation, and import of PEFT LoRA folders.

    <version folder>/
        adapter_config.json      AdapterConfig (self-describing: method, contexts, rank, ...)
        adapter.safetensors      tensors named as in `adapters.adapter_set` (weights only)

Loading validates everything before a set can be served and rejects with a message that says
what is wrong: pickle files, unknown/missing tensors, shapes or targets that do not match the
backbone, a different base fingerprint, a rank above the bank's maximum, non-finite values.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from adapters.adapter_set import AdapterSet, tensor_shapes
from adapters.backbone import LMDims
from adapters.config import AGNOSTIC, AdapterConfig, ConnectorSpec, resolve_targets

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter.safetensors"
# Anything that unpickles on load is refused outright, whatever its name says.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".npy", ".npz", ".joblib")


class AdapterFormatError(ValueError):
    """An adapter folder is invalid; the message says why."""


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


def load_adapter(
    folder: Path,
    dims: LMDims,
    fingerprint: str | None = None,
    max_rank: int | None = None,
    vision_dim: int | None = None,
) -> AdapterSet:
    """Read and validate an adapter folder against a backbone (`dims`, `fingerprint`)."""
    config = read_config(folder)
    check_compatible(config, dims, fingerprint, max_rank, vision_dim)
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        raise AdapterFormatError(f"missing {WEIGHTS_FILE} in {folder.name}")
    tensors = read_tensors(path)
    check_tensors(config, dims, tensors)
    # The tensors were just read for this set and nothing else holds them: adopt, not copy.
    return AdapterSet.adopt(config, dims, tensors)


def read_config(folder: Path) -> AdapterConfig:
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
        return AdapterConfig.load(folder / CONFIG_FILE)
    except (ValueError, TypeError, KeyError) as exc:
        raise AdapterFormatError(f"invalid {CONFIG_FILE}: {exc}") from exc


def check_compatible(
    config: AdapterConfig,
    dims: LMDims,
    fingerprint: str | None,
    max_rank: int | None,
    vision_dim: int | None = None,
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


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, in memory (not mapped: the tensors do not change
    if the file does). The safetensors reader checks the header, dtypes and offsets."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterFormatError(f"{path.name} is not a valid safetensors file: {exc}") from exc


def check_tensors(config: AdapterConfig, dims: LMDims, tensors: dict[str, torch.Tensor]) -> None:
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
        if not tensor.is_floating_point():
            raise AdapterFormatError(
                f"{name} has dtype {tensor.dtype}; expected a floating-point tensor"
            )
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
    peft = json.loads(cfg_path.read_text())
    if peft.get("peft_type", "LORA") != "LORA":
        raise AdapterFormatError(f"only PEFT LoRA can be imported, got {peft.get('peft_type')}")
    if peft.get("fan_in_fan_out"):
        raise AdapterFormatError("fan_in_fan_out LoRA (Conv1D models) is not a Llama-family layout")
    rank = int(peft["r"])
    alpha = float(peft.get("lora_alpha", rank))
    if peft.get("use_rslora"):
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
        description=f"imported from PEFT LoRA ({peft.get('base_model_name_or_path') or 'unknown base'})",
    )
    fresh = AdapterSet.initialise(config, dims, seed=seed).tensors()
    source = connector_from.tensors() if connector_from is not None else fresh
    tensors = {n: t for n, t in fresh.items() if n.startswith("connector.")}
    tensors.update({n: source[n] for n in tensors})
    tensors.update(found)
    check_tensors(config, dims, tensors)
    return AdapterSet(config, dims, tensors)
