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
from adapters.reference import GROUPINGS
from adapters.routing import Routing
from tests.adapters.conftest import TINY, TINY_LM, build_tiny, lm_forward, make_set

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
    # Every method runs on every family, and the three groupings agree.
    x = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(0))
    contexts = torch.tensor([[TEXT, IMAGE, IMAGE, TEXT, TEXT, TEXT]] * 2)
    with torch.no_grad():
        base = model.lm_forward(x, None)
        for method in ("lora", "ia3", "bitfit"):
            adapter = make_set(dims, backbone.vision_dim, method, rank=3)
            outs = [
                lm_forward(
                    model, g, x, Routing(adapter, torch.zeros(2, dtype=torch.long), contexts)
                )
                for g in GROUPINGS
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


# --- CNN feature maps (EfficientNet-Lite) and packaged sources ---------------------------
TINY_LITE: dict[str, Any] = {
    "model_type": "ctxpeft_efficientnet_lite",
    "stages": [[1, 3, 1, 1, 8, 8], [1, 3, 2, 2, 8, 16], [1, 5, 2, 2, 16, 16]],
    "stem_channels": 8,
    "hidden_size": 24,
    "image_size": 32,
}


@pytest.mark.parametrize(("pool", "tokens"), [(0, 16), (2, 4), (3, 9)])
def test_cnn_feature_map_gives_image_tokens_pooled_or_not(pool: int, tokens: int) -> None:
    """A tower whose output is a feature map [N, C, H, W] gives H*W tokens of C dimensions,
    or k x k tokens when image_pool = k (32 px / stride 8 = a 4 x 4 map here)."""
    config = TINY.replace(vision=TINY_LITE, image_size=32, image_pool=pool)
    backbone = build_tiny(0, config)
    assert type(backbone.vision).__name__ == "EfficientNetLiteModel"
    pixels = backbone.preprocess(_images(2, size=50))
    hidden = backbone.vision(pixel_values=pixels).last_hidden_state
    assert hidden.shape == (2, 24, 4, 4)
    features = backbone.encode_images(pixels)
    assert features.shape == (2, tokens, 24) and backbone.num_image_tokens == tokens
    if pool == 0:
        assert torch.equal(features, hidden.flatten(2).transpose(1, 2))
    else:
        pooled = torch.nn.functional.adaptive_avg_pool2d(hidden, pool)
        assert torch.equal(features, pooled.flatten(2).transpose(1, 2))
    assert backbone.vision_dim == 24


def test_efficientnet_lite_folder_loads_through_automodel(tmp_path: Path) -> None:
    """Our tower saves as an ordinary Hugging Face folder and comes back through
    AutoModel.from_pretrained, the call a hub id takes; the backbone folder round-trips."""
    from transformers import AutoModel

    backbone = build_tiny(2, TINY.replace(vision=TINY_LITE, image_size=64))
    backbone.save(tmp_path / "bb")
    tower = AutoModel.from_pretrained(tmp_path / "bb" / "vision")
    assert type(tower).__name__ == "EfficientNetLiteModel"
    pixels = backbone.preprocess(_images(1, size=64))
    with torch.no_grad():
        assert torch.equal(
            tower(pixel_values=pixels).last_hidden_state,
            backbone.vision(pixel_values=pixels).last_hidden_state,
        )
    assert Backbone.load(tmp_path / "bb").fingerprint() == backbone.fingerprint()


@pytest.mark.parametrize(("size", "kernel", "stride"), [(224, 3, 2), (112, 5, 2), (7, 5, 1)])
def test_same_padding_is_tensorflows(size: int, kernel: int, stride: int) -> None:
    """TF "SAME": output ceil(size / stride); when the padding is odd the extra row and column
    go at the bottom and right (not symmetric, as nn.Conv2d(padding=k//2) would pad)."""
    from adapters.vision.efficientnet_lite import Conv2dSame

    torch.manual_seed(0)
    conv = Conv2dSame(2, 3, kernel, stride, bias=False)
    x = torch.randn(1, 2, size, size)
    total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
    before, after = total // 2, total - total // 2
    expected = torch.nn.functional.conv2d(
        torch.nn.functional.pad(x, [before, after, before, after]), conv.weight, stride=stride
    )
    assert conv(x).shape[-1] == -(-size // stride)
    assert torch.equal(conv(x), expected)
    if total % 2:  # odd: symmetric padding would be a different result
        assert (before, after) == (total // 2, total // 2 + 1)


def test_lukemelas_weights_that_do_not_fit_are_refused() -> None:
    from adapters.vision.efficientnet_lite import from_lukemelas_state_dict

    with pytest.raises(ValueError, match="do not fit: missing"):
        from_lukemelas_state_dict({"_conv_stem.weight": torch.zeros(32, 3, 3, 3)})
    with pytest.raises(KeyError, match=r"unexpected EfficientNet-Lite tensor .\_se\.weight."):
        from_lukemelas_state_dict({"_se.weight": torch.zeros(1)})


def test_packaged_source_that_is_not_installed_names_the_install_step() -> None:
    from adapters.packaged import PackagedWeightsError, weights_file

    config = TINY.replace(vision="package:ctxpeft-no-such-weights")
    with pytest.raises(PackagedWeightsError, match=r"not installed; install them with `make smol`"):
        Backbone.build(config)
    with pytest.raises(PackagedWeightsError, match="'pytest' holds 0 weight files"):
        weights_file("package:pytest")  # installed, but no .gguf/.pth inside


def test_image_pool_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="image_pool must be >= 0"):
        TINY.replace(image_pool=-1)
