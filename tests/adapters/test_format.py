"""Tests for adapters.format: a bit-exact save/load round trip, and each invalid adapter folder
rejected with its own message (AdapterFormatError) before it can be served.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapters.adapter_set import AdapterSet
from adapters.backbone import Backbone
from adapters.format import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    AdapterFormatError,
    import_peft_lora,
    load_adapter,
    save_adapter,
)
from adapters.model import ContextPEFTModel


@pytest.fixture
def backbone(model: ContextPEFTModel) -> Backbone:
    return model.backbone


def _load(folder: Path, backbone: Backbone, **kwargs: object) -> AdapterSet:
    return load_adapter(
        folder,
        backbone.dims,
        fingerprint=kwargs.get("fingerprint", backbone.fingerprint()),  # type: ignore[arg-type]
        max_rank=kwargs.get("max_rank", 16),  # type: ignore[arg-type]
        vision_dim=backbone.vision_dim,
    )


def _rewrite_tensors(folder: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(str(folder / WEIGHTS_FILE))
    change(tensors)
    save_file(tensors, str(folder / WEIGHTS_FILE))


def _drop_lm_head(tensors: dict[str, torch.Tensor]) -> None:
    for key in [k for k in tensors if "lm_head" in k]:
        del tensors[key]


def _rewrite_config(folder: Path, **changes: object) -> None:
    data = json.loads((folder / CONFIG_FILE).read_text())
    data.update(changes)
    (folder / CONFIG_FILE).write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("method", "kwargs"),
    [("lora", {"rank": 5, "fuse_gate_up": False}), ("ia3", {}), ("bitfit", {"agnostic": True})],
)
def test_round_trip_is_bit_exact(
    tmp_path: Path,
    backbone: Backbone,
    adapter_factory: Callable[..., AdapterSet],
    method: str,
    kwargs: dict[str, object],
) -> None:
    adapter = adapter_factory(method, seed=4, **kwargs)
    save_adapter(adapter, tmp_path / "v1")
    assert sorted(p.name for p in (tmp_path / "v1").iterdir()) == sorted(
        [CONFIG_FILE, WEIGHTS_FILE]
    )
    loaded = _load(tmp_path / "v1", backbone)
    assert loaded.config == adapter.config
    before, after = adapter.tensors(), loaded.tensors()
    assert before.keys() == after.keys()
    for name in before:
        assert after[name].dtype == before[name].dtype == torch.float32
        assert torch.equal(after[name], before[name]), name
    # A second save writes the same config text and the same tensors. (Not the same file bytes:
    # safetensors writes its metadata map in hash order.)
    save_adapter(loaded, tmp_path / "v2")
    again = load_file(str(tmp_path / "v2" / WEIGHTS_FILE))
    assert all(torch.equal(again[n], before[n]) for n in before)
    assert (tmp_path / "v2" / CONFIG_FILE).read_text() == (
        tmp_path / "v1" / CONFIG_FILE
    ).read_text()


def test_shapes_that_do_not_match_the_backbone(
    saved: tuple[Path, AdapterSet], backbone: Backbone
) -> None:
    folder, _ = saved
    # A backbone with a wider FFN: same layer count and hidden size, other down_proj shapes.
    wider = dataclasses.replace(
        backbone.dims,
        intermediate_size=64,
        in_features={**backbone.dims.in_features, "down_proj": 64},
        out_features={**backbone.dims.out_features, "gate_proj": 64, "up_proj": 64},
    )
    with pytest.raises(
        AdapterFormatError,
        match=re.escape(
            "shape mismatch for lm.layers.0.gate_up_proj.lora_B: file has (2, 4, 96), backbone needs (2, 4, 128)"
        ),
    ):
        load_adapter(folder, wider, backbone.fingerprint())
    # A tensor edited to another shape in an otherwise valid folder.
    _rewrite_tensors(
        folder, lambda t: t.update({"lm.layers.1.v_proj.lora_A": torch.zeros(2, 32, 3)})
    )
    with pytest.raises(
        AdapterFormatError, match=r"shape mismatch for lm\.layers\.1\.v_proj\.lora_A"
    ):
        _load(folder, backbone)


def test_layer_count_and_connector_that_do_not_match(
    saved: tuple[Path, AdapterSet], backbone: Backbone
) -> None:
    folder, _ = saved
    deeper = dataclasses.replace(backbone.dims, num_layers=3)
    with pytest.raises(AdapterFormatError, match="adapter has 2 layers, the backbone has 3"):
        load_adapter(folder, deeper)
    with pytest.raises(
        AdapterFormatError, match="connector takes 16 features, the vision encoder gives 24"
    ):
        load_adapter(folder, backbone.dims, vision_dim=24)


def test_target_modules_that_do_not_match(
    saved: tuple[Path, AdapterSet], backbone: Backbone
) -> None:
    folder, _ = saved
    # Tensors for a module the config does not target.
    _rewrite_tensors(
        folder,
        lambda t: t.update(
            {
                "lm.layers.0.lm_head.lora_A": torch.zeros(2, 32, 4),
                "lm.layers.0.lm_head.lora_B": torch.zeros(2, 4, 37),
            }
        ),
    )
    with pytest.raises(
        AdapterFormatError, match=r"unexpected tensors \(target modules that do not match"
    ):
        _load(folder, backbone)
    # A config that targets modules the file has no tensors for.
    _rewrite_tensors(folder, _drop_lm_head)
    _rewrite_config(
        folder,
        targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    with pytest.raises(AdapterFormatError, match=r"unexpected tensors.*gate_up_proj"):
        _load(folder, backbone)
    # A target name no Llama-family layer has.
    _rewrite_config(folder, targets=["q_proj", "c_attn"])
    with pytest.raises(
        AdapterFormatError,
        match=r"invalid adapter_config.json: targets: invalid lora target\(s\) \['c_attn'\]",
    ):
        _load(folder, backbone)


def test_missing_tensors(saved: tuple[Path, AdapterSet], backbone: Backbone) -> None:
    folder, _ = saved
    _rewrite_tensors(folder, lambda t: t.__delitem__("lm.layers.1.down_proj.lora_B"))
    with pytest.raises(
        AdapterFormatError, match=re.escape("missing tensors: ['lm.layers.1.down_proj.lora_B']")
    ):
        _load(folder, backbone)


def test_base_fingerprint_mismatch(saved: tuple[Path, AdapterSet], backbone: Backbone) -> None:
    folder, adapter = saved
    other = "f" * 32
    with pytest.raises(
        AdapterFormatError,
        match=f"base fingerprint mismatch: the adapter was trained on backbone {adapter.config.base_fingerprint[:12]}, this service runs ffffffffffff",
    ):
        _load(folder, backbone, fingerprint=other)


def test_rank_above_max_rank(saved: tuple[Path, AdapterSet], backbone: Backbone) -> None:
    folder, _ = saved
    with pytest.raises(
        AdapterFormatError,
        match=re.escape("rank 4 is greater than max_rank 2; raise max_rank (CTXPEFT_MAX_RANK)"),
    ):
        _load(folder, backbone, max_rank=2)
    assert _load(folder, backbone, max_rank=4).config.rank == 4


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values(
    saved: tuple[Path, AdapterSet], backbone: Backbone, value: float
) -> None:
    folder, _ = saved

    def poison(tensors: dict[str, torch.Tensor]) -> None:
        tensors["lm.layers.1.o_proj.lora_B"][1, 2, 3] = value

    _rewrite_tensors(folder, poison)
    with pytest.raises(
        AdapterFormatError,
        match=re.escape("non-finite values (NaN or Inf) in lm.layers.1.o_proj.lora_B"),
    ):
        _load(folder, backbone)


def test_finite_check_names_the_first_bad_tensor_and_accepts_sums_that_overflow(
    saved: tuple[Path, AdapterSet], backbone: Backbone
) -> None:
    """The one-pass check sums each tensor: a NaN or an infinity always makes the sum
    non-finite; finite values near the float32 limit overflow the sum too, and are then
    confirmed finite element by element and accepted."""
    from adapters.format import non_finite

    big = torch.tensor([3.0e38, 3.0e38, -1.0])
    assert not bool(torch.isfinite(big.sum())) and bool(torch.isfinite(big).all())
    named = [("a", torch.ones(3)), ("big", big), ("nan", torch.tensor([1.0, float("nan")]))]
    named += [("inf", torch.tensor([float("inf"), float("-inf")])), ("half", big.half())]
    assert non_finite(named) == ["nan", "inf", "half"]  # 3e38 is infinite in float16
    assert non_finite([]) == []

    folder, _ = saved

    def overflow_and_poison(tensors: dict[str, torch.Tensor]) -> None:
        tensors["lm.layers.0.q_proj.lora_A"][0, :2, 0] = 3.0e38
        tensors["lm.layers.1.k_proj.lora_B"][0, 0, 0] = float("nan")
        tensors["lm.layers.1.down_proj.lora_A"][1, 0, 0] = float("inf")

    _rewrite_tensors(folder, overflow_and_poison)
    with pytest.raises(
        AdapterFormatError,
        match=re.escape("non-finite values (NaN or Inf) in lm.layers.1.k_proj.lora_B"),
    ):
        _load(folder, backbone)

    def heal(tensors: dict[str, torch.Tensor]) -> None:
        tensors["lm.layers.1.k_proj.lora_B"][0, 0, 0] = 0.5
        tensors["lm.layers.1.down_proj.lora_A"][1, 0, 0] = 0.5

    _rewrite_tensors(folder, heal)
    loaded = _load(folder, backbone)
    assert float(loaded.tensors()["lm.layers.0.q_proj.lora_A"][0, 1, 0]) == pytest.approx(3.0e38)


def test_loading_adopts_the_read_tensors(
    saved: tuple[Path, AdapterSet], backbone: Backbone
) -> None:
    """A freshly read set owns the tensors it was read into (no copy); a set built from
    someone else's tensors copies them."""
    from adapters.format import read_tensors

    folder, adapter = saved
    tensors = read_tensors(folder / WEIGHTS_FILE)
    adopted = AdapterSet.adopt(adapter.config, backbone.dims, tensors)
    copied = AdapterSet(adapter.config, backbone.dims, tensors)
    for name, tensor in tensors.items():
        assert adopted.tensors()[name].data_ptr() == tensor.data_ptr()
        assert copied.tensors()[name].data_ptr() != tensor.data_ptr()
        assert torch.equal(copied.tensors()[name], tensor)
    loaded = _load(folder, backbone)
    assert all(torch.equal(loaded.tensors()[n], t) for n, t in adapter.tensors().items())


@pytest.mark.parametrize("name", ["adapter_model.bin", "weights.pt", "extra.PTH"])
def test_any_pickle_file_is_refused(
    saved: tuple[Path, AdapterSet], backbone: Backbone, name: str
) -> None:
    folder, _ = saved
    torch.save({"x": torch.zeros(1)}, folder / name)
    with pytest.raises(
        AdapterFormatError,
        match=re.escape(
            f"refusing pickle file(s) ['{name}']: adapter weights must be safetensors only"
        ),
    ):
        _load(folder, backbone)


def test_missing_config_and_weights(saved: tuple[Path, AdapterSet], backbone: Backbone) -> None:
    folder, _ = saved
    (folder / WEIGHTS_FILE).unlink()
    with pytest.raises(AdapterFormatError, match=f"missing {WEIGHTS_FILE} in v1"):
        _load(folder, backbone)
    (folder / CONFIG_FILE).unlink()
    with pytest.raises(AdapterFormatError, match=f"missing {CONFIG_FILE} in v1"):
        _load(folder, backbone)
    with pytest.raises(AdapterFormatError, match="does not exist"):
        _load(folder.parent / "nope", backbone)


def test_invalid_config_json(saved: tuple[Path, AdapterSet], backbone: Backbone) -> None:
    folder, _ = saved
    (folder / CONFIG_FILE).write_text("{truncated")
    with pytest.raises(AdapterFormatError, match=r"invalid adapter_config\.json: .*not valid JSON"):
        _load(folder, backbone)
    _rewrite_config_raw = {"method": "lora"}
    (folder / CONFIG_FILE).write_text(json.dumps(_rewrite_config_raw))
    with pytest.raises(AdapterFormatError, match=r"invalid adapter_config\.json"):
        _load(folder, backbone)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_safetensors(
    saved: tuple[Path, AdapterSet], backbone: Backbone, damage: str
) -> None:
    folder, _ = saved
    path = folder / WEIGHTS_FILE
    data = path.read_bytes()
    path.write_bytes(
        {
            "garbage": b"\x00\x01not a safetensors file" * 10,
            "truncated": data[: len(data) // 2],
            "empty": b"",
        }[damage]
    )
    with pytest.raises(AdapterFormatError, match=f"{WEIGHTS_FILE} is not a valid safetensors file"):
        _load(folder, backbone)


def test_integer_tensors_are_refused(saved: tuple[Path, AdapterSet], backbone: Backbone) -> None:
    folder, _ = saved
    _rewrite_tensors(
        folder, lambda t: t.update({"connector.bias": torch.zeros(32, dtype=torch.int32)})
    )
    with pytest.raises(AdapterFormatError, match=r"connector\.bias has dtype torch\.int32"):
        _load(folder, backbone)


def test_peft_import_refuses_pickles_and_other_methods(tmp_path: Path, backbone: Backbone) -> None:
    folder = tmp_path / "peft"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3", "r": 4}))
    save_file({"x": torch.zeros(1)}, str(folder / "adapter_model.safetensors"))
    args = (backbone.dims, backbone.fingerprint(), backbone.vision_dim)
    with pytest.raises(AdapterFormatError, match="only PEFT LoRA can be imported, got IA3"):
        import_peft_lora(folder, *args)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    with pytest.raises(AdapterFormatError, match="unsupported PEFT tensor 'x'"):
        import_peft_lora(folder, *args)
    torch.save({}, folder / "adapter_model.bin")
    with pytest.raises(
        AdapterFormatError, match=re.escape("refusing pickle file(s) ['adapter_model.bin']")
    ):
        import_peft_lora(folder, *args)
