"""Tests for adapters.backbone: assembly of ViT, CLIP vision and SwinV2 encoders and of Llama,
Qwen2 and Mistral LMs from configs; save() then load() of a folder (the local-path branch of
`from_pretrained`, the same code that hub ids take) giving identical outputs and fingerprint;
fingerprints that tell random inits apart; the paper preset's SwinV2 giving 64 image tokens of
768 dimensions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPConfig, CLIPModel, CLIPVisionModel

from adapters.backbone import BACKBONE_FILE, Backbone, resolve_device
from adapters.config import IMAGE, TEXT
from adapters.layers import ContextLinear
from adapters.model import ContextPEFTModel
from adapters.presets import get_preset
from adapters.routing import Routing
from tests.adapters.conftest import TINY, TINY_LM, build_tiny, make_set

CLIP_VISION: dict[str, Any] = {
    "model_type": "clip_vision_model",
    "image_size": 16,
    "patch_size": 8,
    "hidden_size": 24,
    "intermediate_size": 48,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "projection_dim": 8,
}
SWINV2: dict[str, Any] = {
    "model_type": "swinv2",
    "image_size": 32,
    "patch_size": 4,
    "embed_dim": 8,
    "depths": [1, 1],
    "num_heads": [1, 2],
    "window_size": 4,
}
QWEN2 = {**TINY_LM, "model_type": "qwen2"}
MISTRAL = {**TINY_LM, "model_type": "mistral", "sliding_window": 64}


def _images(n: int, size: int = 20) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)
    ]


@pytest.mark.parametrize(
    ("vision", "image_size", "tokens", "width", "encoder"),
    [
        (TINY.vision, 16, 4, 16, "ViTModel"),
        (CLIP_VISION, 16, 4, 24, "CLIPVisionModel"),
        (SWINV2, 32, 16, 16, "Swinv2Model"),  # (32 / 4) / 2 = 4 a side, 8 * 2 wide
    ],
)
def test_vision_encoders_from_configs(
    vision: dict[str, Any], image_size: int, tokens: int, width: int, encoder: str
) -> None:
    backbone = build_tiny(0, TINY.replace(vision=vision, image_size=image_size))
    assert type(backbone.vision).__name__ == encoder
    assert backbone.vision_dim == width
    pixels = backbone.preprocess(_images(3))
    assert pixels.shape == (3, 3, image_size, image_size) and pixels.dtype == torch.float32
    assert float(pixels.min()) >= -1.0 and float(pixels.max()) <= 1.0
    features = backbone.encode_images(pixels)
    assert features.shape == (3, tokens, width)
    assert backbone.num_image_tokens == tokens
    assert not any(p.requires_grad for p in backbone.parameters())


@pytest.mark.parametrize(
    ("lm", "cls"),
    [(TINY_LM, "LlamaForCausalLM"), (QWEN2, "Qwen2ForCausalLM"), (MISTRAL, "MistralForCausalLM")],
)
def test_llama_family_lms_from_configs(lm: dict[str, Any], cls: str) -> None:
    backbone = build_tiny(0, TINY.replace(lm=lm))
    assert type(backbone.lm).__name__ == cls
    dims = backbone.dims
    assert (dims.num_layers, dims.hidden_size, dims.intermediate_size, dims.vocab_size) == (
        2,
        32,
        48,
        37,
    )
    assert dims.out_features == {
        "q_proj": 32,
        "k_proj": 16,  # 2 key/value heads of 8
        "v_proj": 16,
        "o_proj": 32,
        "gate_proj": 48,
        "up_proj": 48,
        "down_proj": 32,
    }
    model = ContextPEFTModel(backbone)
    assert isinstance(backbone.lm.model.layers[1].mlp.down_proj, ContextLinear)
    # Every method runs on every family, and the three paths agree.
    x = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(0))
    contexts = torch.tensor([[TEXT, IMAGE, IMAGE, TEXT, TEXT, TEXT]] * 2)
    with torch.no_grad():
        base = model.lm_forward(x, None)
        for method in ("lora", "ia3", "bitfit"):
            adapter = make_set(dims, backbone.vision_dim, method, rank=3)
            outs = [
                model.lm_forward(x, Routing(adapter, torch.zeros(2, dtype=torch.long), contexts, p))
                for p in ("row", "segment", "token")
            ]
            assert float((outs[0] - base).abs().max()) > 1e-3
            assert all(float((o - outs[0]).abs().max()) <= 1e-5 for o in outs[1:])


@pytest.mark.parametrize("lm", [TINY_LM, QWEN2], ids=["llama", "qwen2"])
def test_save_then_load_gives_identical_outputs_and_fingerprint(
    tmp_path: Path, lm: dict[str, Any]
) -> None:
    backbone = build_tiny(3, TINY.replace(lm=lm, vision=CLIP_VISION))
    backbone.save(tmp_path / "bb")
    saved = json.loads((tmp_path / "bb" / BACKBONE_FILE).read_text())
    assert (saved["vision"], saved["lm"], saved["tokenizer"]) == ("vision", "lm", "tokenizer")
    assert saved["fingerprint"] == backbone.fingerprint()
    loaded = Backbone.load(tmp_path / "bb")
    assert loaded.fingerprint() == backbone.fingerprint()
    assert loaded.config.lm == str(tmp_path / "bb" / "lm")  # came through from_pretrained
    assert len(loaded.tokenizer) == len(backbone.tokenizer) == 37
    pixels = backbone.preprocess(_images(2))
    assert torch.equal(loaded.encode_images(pixels), backbone.encode_images(pixels))
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(loaded.lm(ids).logits, backbone.lm(ids).logits)


def test_injected_backbone_saves_plain_hugging_face_weights(tmp_path: Path) -> None:
    """Injection does not change the state dict: the fingerprint stays and the saved folder
    loads into the plain model."""
    reference = build_tiny(4)
    backbone = build_tiny(4)
    ContextPEFTModel(backbone)
    assert backbone.fingerprint() == reference.fingerprint()
    assert "model.layers.0.self_attn.q_proj.weight" in backbone.lm.state_dict()
    backbone.save(tmp_path / "bb")
    loaded = Backbone.load(tmp_path / "bb")
    assert loaded.fingerprint() == reference.fingerprint()
    ids = torch.tensor([[1, 9, 10]])
    with torch.no_grad():
        assert torch.equal(loaded.lm(ids).logits, reference.lm(ids).logits)


def test_clip_two_tower_checkpoint_loads_its_vision_tower(tmp_path: Path) -> None:
    vision = {k: v for k, v in CLIP_VISION.items() if k != "model_type"}
    text = {
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "vocab_size": 50,
    }
    CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=8)).save_pretrained(
        tmp_path / "clip"
    )
    backbone = build_tiny(0, TINY.replace(vision=str(tmp_path / "clip")))
    assert isinstance(backbone.vision, CLIPVisionModel)
    assert backbone.encode_images(torch.zeros(1, 3, 16, 16)).shape == (1, 4, 24)


def test_fingerprint_tells_inits_apart() -> None:
    a, b, c = build_tiny(0), build_tiny(0), build_tiny(1)
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != c.fingerprint()
    assert len(a.fingerprint()) == 32
    wider = build_tiny(0, TINY.replace(lm={**TINY_LM, "intermediate_size": 64}))
    assert wider.fingerprint() != a.fingerprint()


def test_load_sources_and_errors(tmp_path: Path) -> None:
    (tmp_path / "tiny.json").write_text(json.dumps(TINY.to_dict()))
    from_json = Backbone.load(tmp_path / "tiny.json")
    assert from_json.config == TINY and from_json.dims.hidden_size == 32
    assert Backbone.load("demo").config.name == "demo"
    with pytest.raises(FileNotFoundError, match="neither a saved backbone folder"):
        Backbone.load(tmp_path / "missing")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_paper_swinv2_gives_64_tokens_of_768() -> None:
    """The paper preset's SwinV2-Tiny (random init; its LM swapped for a tiny one to stay fast)."""
    config = get_preset("paper").replace(lm=TINY_LM)
    backbone = build_tiny(0, config)
    assert type(backbone.vision).__name__ == "Swinv2Model"
    assert 27e6 < sum(p.numel() for p in backbone.vision.parameters()) < 28e6  # 27.6M, as the paper
    pixels = backbone.preprocess(_images(1, size=300))
    assert pixels.shape == (1, 3, 256, 256)
    assert backbone.encode_images(pixels).shape == (1, 64, 768)
    assert backbone.vision_dim == 768
