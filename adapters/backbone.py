"""The frozen backbone: vision encoder + causal LM + tokenizer, assembled from Hugging Face
configs (random init), local folders or hub ids through the same code.

    images --preprocess--> pixels --vision encoder--> features [N, n_img, d_vis]
    (the per-adapter connector, in the adapter set, maps features to LM embeddings)
    LM input: [BOS] + image embeddings + caption tokens   (the paper's sequence)

The backbone is never trained by adapters: every parameter has requires_grad=False.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from adapters import packaged
from adapters.config import LM_MODULES, BackboneConfig, ConnectorSpec
from adapters.presets import PRESETS
from adapters.vision import register_towers

register_towers()  # our own towers (EfficientNet-Lite) load through AutoModel like any other

BACKBONE_FILE = "backbone.json"
# Encoders whose first output token is a [CLS] summary rather than a patch.
_CLS_TOKEN_MODELS = frozenset({"vit", "clip_vision_model", "deit", "dinov2", "beit"})
# Full two-tower checkpoints whose vision tower we load on its own.
_VISION_TOWERS = {"clip": "CLIPVisionModel", "siglip": "SiglipVisionModel"}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class LMDims:
    """Shapes of the LM's adaptable linear modules (identical in every decoder layer)."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    in_features: dict[str, int]
    out_features: dict[str, int]


def resolve_device(device: str) -> torch.device:
    """`auto` picks CUDA when present, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def decoder_layers(lm: PreTrainedModel) -> nn.ModuleList:
    layers = lm.get_decoder().layers
    assert isinstance(layers, nn.ModuleList)
    return layers


def lm_linear(layer: nn.Module, name: str) -> nn.Linear:
    """The named projection inside one decoder layer (q/k/v/o under self_attn, FFN under mlp)."""
    parent = layer.self_attn if name in ("q_proj", "k_proj", "v_proj", "o_proj") else layer.mlp
    module = getattr(parent, name)
    # A ContextLinear (after injection) stands in for its nn.Linear and exposes the same shape.
    return module


def _vision_dim(config: Any) -> int:
    """Width of the encoder's output tokens: hidden_size (ViT, Swin), else the last stage of
    hierarchical encoders that list hidden_sizes (pvt_v2, ConvNeXt), else embed_dim."""
    if getattr(config, "hidden_size", 0):
        return int(config.hidden_size)
    if getattr(config, "hidden_sizes", None):
        return int(config.hidden_sizes[-1])
    return int(config.embed_dim)


def _config_from_dict(data: dict[str, Any]) -> Any:
    data = dict(data)
    model_type = data.pop("model_type")
    return AutoConfig.for_model(model_type, **data)


def _load_vision(spec: str | dict[str, Any], dtype: torch.dtype) -> PreTrainedModel:
    if isinstance(spec, dict):
        model = AutoModel.from_config(_config_from_dict(spec))
        return model.to(dtype)
    if packaged.is_packaged(spec):
        return packaged.load_efficientnet_lite(spec, dtype)
    config = AutoConfig.from_pretrained(spec)
    tower = _VISION_TOWERS.get(config.model_type)
    if tower is not None:
        import transformers

        cls = getattr(transformers, tower)
        return cls.from_pretrained(spec, dtype=dtype)
    return AutoModel.from_pretrained(spec, dtype=dtype)


def _load_lm(spec: str | dict[str, Any], vocab_size: int, dtype: torch.dtype) -> PreTrainedModel:
    if isinstance(spec, dict):
        data = dict(spec)
        data.setdefault("vocab_size", vocab_size)
        model = AutoModelForCausalLM.from_config(_config_from_dict(data))
        return model.to(dtype)
    if packaged.is_gguf(spec):
        return packaged.load_gguf_lm(spec, dtype)
    return AutoModelForCausalLM.from_pretrained(spec, dtype=dtype)


def _load_tokenizer(config: BackboneConfig) -> PreTrainedTokenizerBase:
    if config.tokenizer is not None:
        if packaged.is_gguf(config.tokenizer):
            return packaged.load_gguf_tokenizer(config.tokenizer)
        return AutoTokenizer.from_pretrained(config.tokenizer)
    from adapters.data.synthetic import vocabulary
    from adapters.data.tokenizer import build_caption_tokenizer

    lm_vocab = config.lm.get("vocab_size", 0) if isinstance(config.lm, dict) else 0
    words = vocabulary()
    extra = max(0, int(lm_vocab) - (len(words) + 4))
    return build_caption_tokenizer(words, extra_vocab_size=extra)


def load_tokenizer(source: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer of a saved backbone folder (or a preset), without its models."""
    path = Path(source)
    if path.is_dir() and (path / BACKBONE_FILE).is_file():
        data = json.loads((path / BACKBONE_FILE).read_text())
        tokenizer = data.get("tokenizer")
        if isinstance(tokenizer, str) and (path / tokenizer).exists():
            data["tokenizer"] = str(path / tokenizer)
        data.pop("fingerprint", None)
        return _load_tokenizer(BackboneConfig.from_dict(data))
    if str(source) in PRESETS:
        return _load_tokenizer(PRESETS[str(source)])
    raise FileNotFoundError(f"backbone {str(source)!r} is not a saved backbone folder or a preset")


class Backbone(nn.Module):
    """Frozen vision encoder + causal LM + tokenizer + image preprocessing."""

    def __init__(
        self,
        config: BackboneConfig,
        vision: PreTrainedModel,
        lm: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
    ) -> None:
        super().__init__()
        self.config = config
        self.vision = vision
        self.lm = lm
        self.tokenizer = tokenizer
        self.requires_grad_(False)
        self.eval()
        self.vision_dim = _vision_dim(vision.config)
        self.dims = self._lm_dims()
        self._fingerprint: str | None = None

    # --- construction -------------------------------------------------------------------
    @classmethod
    def build(cls, config: BackboneConfig | str, device: str = "cpu") -> Backbone:
        """Assemble from a config (or a preset name). Sources load with `from_pretrained`."""
        if isinstance(config, str):
            config = PRESETS[config]
        dtype = DTYPES[config.dtype]
        tokenizer = _load_tokenizer(config)
        vision = _load_vision(config.vision, dtype)
        lm = _load_lm(config.lm, len(tokenizer), dtype)
        return cls(config, vision, lm, tokenizer).to(resolve_device(device))

    @classmethod
    def load(cls, source: str | Path, device: str = "cpu") -> Backbone:
        """Load a saved backbone folder, a preset name, or a folder/JSON file with a config."""
        path = Path(source)
        if path.is_dir() and (path / BACKBONE_FILE).is_file():
            data = json.loads((path / BACKBONE_FILE).read_text())
            # Sources inside a saved folder are relative to it.
            for key in ("vision", "lm", "tokenizer"):
                value = data.get(key)
                if isinstance(value, str) and (path / value).exists():
                    data[key] = str(path / value)
            data.pop("fingerprint", None)
            return cls.build(BackboneConfig.from_dict(data), device)
        if path.is_file() and path.suffix == ".json":
            return cls.build(BackboneConfig.from_dict(json.loads(path.read_text())), device)
        if str(source) in PRESETS:
            return cls.build(str(source), device)
        raise FileNotFoundError(
            f"backbone {str(source)!r} is neither a saved backbone folder (with {BACKBONE_FILE}), "
            f"a backbone config JSON, nor a preset ({', '.join(PRESETS)})"
        )

    def save(self, folder: Path) -> None:
        """Save in the ordinary Hugging Face format, plus our backbone.json."""
        folder.mkdir(parents=True, exist_ok=True)
        self.vision.save_pretrained(folder / "vision")
        self.lm.save_pretrained(folder / "lm")
        self.tokenizer.save_pretrained(folder / "tokenizer")
        data = self.config.to_dict() | {"vision": "vision", "lm": "lm", "tokenizer": "tokenizer"}
        data["fingerprint"] = self.fingerprint()
        (folder / BACKBONE_FILE).write_text(json.dumps(data, indent=2) + "\n")

    # --- shapes and identity -----------------------------------------------------------
    def _lm_dims(self) -> LMDims:
        layer = decoder_layers(self.lm)[0]
        ins, outs = {}, {}
        for name in LM_MODULES:
            module = lm_linear(layer, name)
            ins[name] = int(module.in_features)
            outs[name] = int(module.out_features)
        cfg = self.lm.config
        return LMDims(
            num_layers=len(decoder_layers(self.lm)),
            hidden_size=int(cfg.hidden_size),
            intermediate_size=int(cfg.intermediate_size),
            vocab_size=int(cfg.vocab_size),
            in_features=ins,
            out_features=outs,
        )

    def fingerprint(self) -> str:
        """Identity of the frozen weights: adapters trained on one backbone are refused by
        another. A hash of the architecture and of every parameter's bytes, so two random
        inits of the same preset differ."""
        if self._fingerprint is None:
            digest = hashlib.blake2b(digest_size=16)
            for part in (self.vision, self.lm):
                cfg = part.config.to_dict()
                for volatile in (
                    "transformers_version",
                    "_name_or_path",
                    "dtype",
                    "torch_dtype",
                    "architectures",
                ):
                    cfg.pop(volatile, None)
                digest.update(json.dumps(cfg, sort_keys=True, default=str).encode())
                for name, tensor in sorted(part.state_dict().items()):
                    digest.update(name.encode())
                    data = tensor.detach().to("cpu").contiguous().view(-1).view(torch.uint8)
                    digest.update(memoryview(data.numpy()))
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    @property
    def device(self) -> torch.device:
        return next(self.lm.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.lm.parameters()).dtype

    # --- images ----------------------------------------------------------------------
    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images -> normalised pixels [N, 3, S, S] (resized to the encoder's size)."""
        size = self.config.image_size
        mean = np.asarray(self.config.image_mean, dtype=np.float32)
        std = np.asarray(self.config.image_std, dtype=np.float32)
        arrays = []
        for image in images:
            rgb = image.convert("RGB")
            if rgb.size != (size, size):
                rgb = rgb.resize((size, size), Image.Resampling.BICUBIC)
            pixels = np.asarray(rgb, dtype=np.float32) / 255.0
            arrays.append(((pixels - mean) / std).transpose(2, 0, 1))
        return torch.from_numpy(np.stack(arrays))

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Vision features per image: [N, n_img, d_vis] (patch tokens, [CLS] dropped)."""
        pixel_values = pixel_values.to(device=self.device, dtype=self.dtype)
        hidden = self.vision(pixel_values=pixel_values).last_hidden_state
        if hidden.dim() == 4:  # feature maps (CNNs, pvt_v2): [N, C, H, W] -> [N, H*W, C]
            if self.config.image_pool:
                # Fewer, coarser image tokens: the LM's cost grows with the sequence.
                hidden = nn.functional.adaptive_avg_pool2d(hidden, self.config.image_pool)
            hidden = hidden.flatten(2).transpose(1, 2)
        if self.vision.config.model_type in _CLS_TOKEN_MODELS:
            hidden = hidden[:, 1:]
        return hidden

    @property
    def num_image_tokens(self) -> int:
        probe = torch.zeros(1, 3, self.config.image_size, self.config.image_size)
        return int(self.encode_images(probe).shape[1])


def connector_spec(backbone: Backbone) -> ConnectorSpec:
    """The connector every adapter set of this backbone has (the bank's shape)."""
    cfg = backbone.config
    return ConnectorSpec(
        cfg.connector, backbone.vision_dim, backbone.dims.hidden_size, cfg.connector_hidden
    )
