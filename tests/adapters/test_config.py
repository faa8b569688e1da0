"""Tests for adapters.config and adapters.presets: target groups, validation, JSON round trips,
and the `paper` preset's trainable LM-adapter parameter counts, which must equal PAPER.md's
Table 3 exactly (counted from the parameters of real `AdapterSet`s injected into the paper
LM, built on the meta device so no 150M-parameter model is allocated).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from adapters import backbone as backbone_module
from adapters.adapter_set import AdapterSet, lm_parameter_count
from adapters.backbone import Backbone, decoder_layers
from adapters.config import (
    AGNOSTIC,
    CONTEXTS,
    FUSED_GATE_UP,
    LM_MODULES,
    AdapterConfig,
    AdapterConfigError,
    BackboneConfig,
    ConnectorSpec,
    resolve_targets,
)
from adapters.layers import ContextLinear
from adapters.model import ContextPEFTModel
from adapters.presets import PRESETS, get_preset

# PAPER.md Table 3 (setting AF): (method, rank) -> (agnostic, context-specific).
TABLE_3: dict[tuple[str, int], tuple[int, int]] = {
    ("ia3", 0): (55_296, 110_592),
    ("bitfit", 0): (119_808, 239_616),
    ("lora", 1): (202_752, 405_504),
    ("lora", 8): (1_622_016, 3_244_032),
    ("lora", 64): (12_976_128, 25_952_256),
}


@pytest.fixture(scope="module")
def paper_model() -> ContextPEFTModel:
    """The paper preset's backbone with context layers injected, on the meta device."""
    config = get_preset("paper")
    tokenizer = backbone_module._load_tokenizer(config)
    with torch.device("meta"):
        vision = backbone_module._load_vision(config.vision, torch.float32)
        lm = backbone_module._load_lm(config.lm, len(tokenizer), torch.float32)
    return ContextPEFTModel(Backbone(config, vision, lm, tokenizer))


def _paper_config(
    method: str, rank: int, contexts: tuple[str, ...], fuse: bool = True
) -> AdapterConfig:
    return AdapterConfig(
        method=method,  # type: ignore[arg-type]
        connector=ConnectorSpec("linear", 768, 768),
        base_fingerprint="paper",
        contexts=contexts,
        rank=max(rank, 1),
        targets=resolve_targets(method, "all", fuse_gate_up=fuse),
        num_layers=12,
    )


def test_paper_preset_lm_dims(paper_model: ContextPEFTModel) -> None:
    dims = paper_model.backbone.dims
    assert (dims.num_layers, dims.hidden_size, dims.intermediate_size, dims.vocab_size) == (
        12,
        768,
        3072,
        50_272,
    )
    assert paper_model.backbone.vision_dim == 768
    assert paper_model.backbone.lm.config.num_attention_heads == 12
    assert dims.out_features["gate_proj"] + dims.out_features["up_proj"] == 6144


@pytest.mark.parametrize(("method", "rank"), list(TABLE_3))
@pytest.mark.parametrize("contexts", [AGNOSTIC, CONTEXTS], ids=["agnostic", "context-specific"])
def test_paper_parameter_counts_equal_table_3(
    paper_model: ContextPEFTModel, method: str, rank: int, contexts: tuple[str, ...]
) -> None:
    expected = TABLE_3[(method, rank)][0 if contexts == AGNOSTIC else 1]
    dims = paper_model.backbone.dims
    config = _paper_config(method, rank, contexts)
    with torch.device("meta"):
        adapter = AdapterSet(config, dims)
    counted = sum(
        p.numel() for name, p in adapter.params.items() if not name.startswith("connector")
    )
    assert counted == expected
    assert lm_parameter_count(config, dims) == expected
    assert all(p.requires_grad for p in adapter.parameters())
    # Every injected LM linear that the method targets draws its weights from this set.
    served = set()
    for index, layer in enumerate(decoder_layers(paper_model.backbone.lm)):
        for module in layer.modules():
            if isinstance(module, ContextLinear):
                weights = adapter.stacked(index, module.name)
                if weights is not None:
                    served.add(module.name)
                    assert weights.lora_A is None or weights.lora_A.shape[2] == module.in_features
                    assert weights.lora_B is None or weights.lora_B.shape[3] == module.out_features
                    assert weights.bias is None or weights.bias.shape[2] == module.out_features
    assert (
        served
        == {
            "lora": set(LM_MODULES),
            "bitfit": set(LM_MODULES),
            "ia3": {"k_proj", "v_proj", "down_proj"},
        }[method]
    )


@pytest.mark.parametrize("rank", [1, 8, 64])
def test_separate_gate_and_up_give_more_lora_parameters(
    paper_model: ContextPEFTModel, rank: int
) -> None:
    dims = paper_model.backbone.dims
    fused = lm_parameter_count(_paper_config("lora", rank, AGNOSTIC), dims)
    separate = lm_parameter_count(_paper_config("lora", rank, AGNOSTIC, fuse=False), dims)
    # Fused: one A (768 x r) for gate+up; separate: two As, same total B width.
    assert fused == 16_896 * 12 * rank
    assert separate == 17_664 * 12 * rank
    assert separate - fused == 768 * rank * 12


# --- target groups -----------------------------------------------------------------------
def test_target_groups_follow_the_paper() -> None:
    assert resolve_targets("lora", "all") == (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        FUSED_GATE_UP,
        "down_proj",
    )
    assert resolve_targets("lora", "ffn", fuse_gate_up=False) == (
        "gate_proj",
        "up_proj",
        "down_proj",
    )
    assert resolve_targets("lora", "attn") == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert resolve_targets("ia3", "all") == ("k_proj", "v_proj", "down_proj")
    assert resolve_targets("bitfit", "all") == LM_MODULES
    assert resolve_targets("lora", ["v_proj", "q_proj"]) == ("v_proj", "q_proj")


@pytest.mark.parametrize(
    ("method", "targets", "message"),
    [
        ("dora", "all", "unknown method 'dora'"),
        ("lora", "mlp", "unknown target group 'mlp'"),
        ("lora", ["qkv_proj"], "invalid lora target(s) ['qkv_proj']"),
        ("bitfit", [FUSED_GATE_UP], "invalid bitfit target(s)"),
        ("lora", [FUSED_GATE_UP, "up_proj"], "cannot be targeted together"),
        ("lora", ["q_proj", "q_proj"], "duplicate targets"),
    ],
)
def test_invalid_targets_are_rejected(method: str, targets: str | list[str], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        resolve_targets(method, targets)


# --- AdapterConfig ---------------------------------------------------------------------------
def _config(**changes: object) -> AdapterConfig:
    base: dict[str, object] = {
        "method": "lora",
        "connector": ConnectorSpec("linear", 64, 128),
        "base_fingerprint": "abc",
        "rank": 8,
        "alpha": 16.0,
        "targets": ("q_proj", "v_proj"),
        "num_layers": 4,
    }
    return AdapterConfig(**{**base, **changes})  # type: ignore[arg-type]


def test_adapter_config_json_round_trip(tmp_path: Path) -> None:
    config = _config(connector=ConnectorSpec("mlp", 64, 128, 96), description="a set")
    config.save(tmp_path / "adapter_config.json")
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["contexts"] == ["image", "text"] and data["format_version"] == 1
    assert data["connector"] == {
        "kind": "mlp",
        "in_features": 64,
        "out_features": 128,
        "hidden_features": 96,
    }
    assert AdapterConfig.load(tmp_path / "adapter_config.json") == config
    assert config.scaling == 2.0 and not config.agnostic
    assert _config(alpha=None).scaling == 1.0
    assert _config(contexts=AGNOSTIC).agnostic


@pytest.mark.parametrize(
    ("changes", "field", "message"),
    [
        ({"method": "prefix"}, "method", "Input should be 'lora', 'ia3' or 'bitfit'"),
        ({"contexts": ("image",)}, "contexts", "contexts must be"),
        ({"rank": 0}, "rank", "LoRA rank must be >= 1"),
        ({"targets": ()}, "targets", "at least one target"),
        ({"targets": ("c_attn",)}, "targets", "invalid lora target"),
        ({"num_layers": 0}, "num_layers", "greater than or equal to 1"),
        ({"format_version": 2}, "format_version", "unsupported adapter format_version 2"),
        (
            {"connector": {"kind": "linear", "in_features": 1, "out_features": 1},
             "method": "ia3", "targets": ("up",)},
            "targets",
            "invalid ia3 target",
        ),
    ],
)  # fmt: skip
def test_adapter_config_validation(changes: dict[str, object], field: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):  # constructed in code: pydantic's error
        _config(**changes)
    with pytest.raises(AdapterConfigError, match=f"^{field}: .*{re.escape(message)}") as error:
        AdapterConfig.from_dict({**_config().to_dict(), **changes})  # read from a file
    assert error.value.field == field


def test_adapter_config_rejects_unknown_keys_and_bad_json(tmp_path: Path) -> None:
    with pytest.raises(AdapterConfigError, match=r"^lora_dropout: unknown field"):
        AdapterConfig.from_dict({**_config().to_dict(), "lora_dropout": 0.1})
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"adapter_config\.json is not valid JSON"):
        AdapterConfig.load(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object"):
        AdapterConfig.load(tmp_path / "list.json")


def test_connector_spec_validation() -> None:
    with pytest.raises(ValueError, match="Input should be 'linear' or 'mlp'"):
        ConnectorSpec("conv", 1, 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs hidden_features > 0"):
        ConnectorSpec("mlp", 8, 8)


# --- BackboneConfig and presets --------------------------------------------------------------
def test_backbone_config_round_trip_and_validation() -> None:
    for preset in PRESETS.values():
        data = json.loads(json.dumps(preset.to_dict()))
        assert BackboneConfig.from_dict(data) == preset
    with pytest.raises(ValueError, match="dtype must be"):
        PRESETS["demo"].replace(dtype="int8")
    with pytest.raises(ValueError, match="connector must be"):
        PRESETS["demo"].replace(connector="conv")
    with pytest.raises(ValueError, match="image_size must be >= 8"):
        PRESETS["demo"].replace(image_size=4)


def test_presets() -> None:
    assert set(PRESETS) == {"demo", "small", "paper", "smol"}
    with pytest.raises(
        ValueError, match="unknown backbone preset 'huge'; known: demo, small, paper, smol"
    ):
        get_preset("huge")
    paper = get_preset("paper")
    assert isinstance(paper.lm, dict) and isinstance(paper.vision, dict)
    assert paper.vision["model_type"] == "swinv2" and paper.image_size == 256
    lm = paper.lm
    assert (lm["hidden_size"], lm["num_hidden_layers"], lm["num_attention_heads"]) == (768, 12, 12)
    assert (lm["intermediate_size"], lm["vocab_size"]) == (3072, 50_272)
    # SwinV2-Tiny: the last stage is (256 / 4) / 2^3 = 8 patches a side, 96 * 2^3 = 768 wide.
    side = paper.image_size // paper.vision["patch_size"] // 2 ** (len(paper.vision["depths"]) - 1)
    assert side * side == 64 and paper.vision["embed_dim"] * 8 == 768
