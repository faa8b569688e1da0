"""The adapter_config.json schema (`AdapterConfig`, pydantic) as read from bytes: every bad
field refused with its name, size and nesting bounded before parsing, tensor dtypes limited to
the served ones, and folders already in a store judged by the rules they were stored under.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapters.adapter_set import AdapterSet
from adapters.backbone import Backbone
from adapters.config import (
    MAX_CONFIG_BYTES,
    MAX_CONFIG_DEPTH,
    AdapterConfig,
    AdapterConfigError,
    ConnectorSpec,
    json_depth,
)
from adapters.format import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    AdapterFormatError,
    import_peft_lora,
    parse_config,
    read_config,
    validate_folder,
)
from adapters.model import ContextPEFTModel

# adapter_config.json exactly as the builds before this schema wrote it (sorted keys, indent 2),
# for a LoRA set on a 2-layer backbone. Such files are in users' stores: they must keep loading.
LEGACY_V1 = """{
  "alpha": 16.0,
  "base_fingerprint": "5d41402abc4b2a76b9719d911017c592",
  "connector": {
    "hidden_features": 0,
    "in_features": 32,
    "kind": "linear",
    "out_features": 64
  },
  "connector_dropout": 0.1,
  "contexts": [
    "image",
    "text"
  ],
  "description": "news captions, trained 2024-05-01",
  "format_version": 1,
  "init": {
    "bias": "zeros",
    "connector": "torch.nn.Linear default",
    "ia3": "ones",
    "lora_A": "kaiming_uniform(a=sqrt(5))",
    "lora_B": "zeros"
  },
  "method": "lora",
  "num_layers": 2,
  "rank": 8,
  "targets": [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_up_proj",
    "down_proj"
  ]
}
"""


def legacy(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(LEGACY_V1)
    data.update(changes)
    return data


def as_bytes(data: dict[str, Any]) -> bytes:
    return json.dumps(data).encode()


def refused(raw: bytes, stored: bool = False) -> AdapterConfigError:
    with pytest.raises(AdapterConfigError) as error:
        AdapterConfig.from_json(raw, stored=stored)
    return error.value


def test_a_legacy_v1_file_loads_unchanged_and_round_trips() -> None:
    config = AdapterConfig.from_json(LEGACY_V1.encode())
    assert config.alpha == 16.0 and config.rank == 8 and config.scaling == 2.0
    assert config.connector == ConnectorSpec("linear", 32, 64)
    assert config.targets[-2:] == ("gate_up_proj", "down_proj")
    assert json.loads(json.dumps(config.to_dict())) == json.loads(LEGACY_V1)
    assert AdapterConfig.from_json(LEGACY_V1.encode(), stored=True) == config


# (changed fields, the field the error names, words of the message)
BAD_FIELDS: list[tuple[dict[str, Any], str, str]] = [
    ({"alpha": "x"}, "alpha", "valid number"),
    ({"alpha": "16"}, "alpha", "valid number"),  # strict: a numeric string is not a number
    ({"alpha": True}, "alpha", "valid number"),
    ({"alpha": 1e300 * 10}, "alpha", "less than or equal to"),  # json.dumps writes Infinity
    ({"alpha": 2e6}, "alpha", "less than or equal to 1000000"),
    ({"connector_dropout": 5}, "connector_dropout", "less than 1"),
    ({"connector_dropout": -0.1}, "connector_dropout", "greater than or equal to 0"),
    ({"base_fingerprint": 1}, "base_fingerprint", "valid string"),
    ({"base_fingerprint": ""}, "base_fingerprint", "should match pattern"),
    ({"base_fingerprint": "../../etc"}, "base_fingerprint", "should match pattern"),
    ({"description": 5}, "description", "valid string"),
    ({"description": {"html": "<b>"}}, "description", "valid string"),
    ({"description": "x" * 2001}, "description", "at most 2000 characters"),
    ({"rank": "8"}, "rank", "valid integer"),
    ({"rank": 8.0}, "rank", "valid integer"),
    ({"rank": 100_000}, "rank", "less than or equal to 4096"),
    ({"rank": 0}, "rank", "LoRA rank must be >= 1"),
    ({"num_layers": 0}, "num_layers", "greater than or equal to 1"),
    ({"method": "prefix"}, "method", "'lora', 'ia3' or 'bitfit'"),
    ({"contexts": ["image"]}, "contexts", "contexts must be"),
    ({"targets": "all"}, "targets", "valid tuple"),
    ({"targets": ["q_proj", 3]}, "targets.1", "valid string"),
    ({"targets": ["c_attn"]}, "targets", "invalid lora target"),
    ({"init": {"lora_A": 1}}, "init.lora_A", "valid string"),
    ({"init": [1]}, "init", "valid dictionary"),
    ({"format_version": 2}, "format_version", "this build reads 1"),
    ({"format_version": "1"}, "format_version", "valid integer"),
    ({"lora_dropout": 0.1}, "lora_dropout", "unknown field"),
    ({"connector": {"kind": "linear", "in_features": 32}}, "connector.out_features", "missing"),
    ({"connector": {**legacy()["connector"], "bias": True}}, "connector.bias", "unknown field"),
    ({"connector": {**legacy()["connector"], "in_features": -1}}, "connector.in_features", ">"),
    ({"connector": {**legacy()["connector"], "kind": "mlp"}}, "connector", "hidden_features > 0"),
]


@pytest.mark.parametrize(("changes", "field", "words"), BAD_FIELDS)
def test_each_bad_field_is_refused_with_its_name(
    changes: dict[str, Any], field: str, words: str
) -> None:
    error = refused(as_bytes(legacy(**changes)))
    assert error.field == field
    assert str(error).startswith(f"{field}: ")
    if words != ">":
        assert words in str(error)
    else:
        assert "greater than or equal to 1" in str(error)


def test_nan_written_by_hand_is_refused() -> None:
    raw = LEGACY_V1.replace('"alpha": 16.0', '"alpha": NaN').encode()
    assert str(refused(raw)) == "alpha: Input should be a finite number"


def test_a_missing_required_field_is_named() -> None:
    data = legacy()
    del data["method"]
    assert str(refused(as_bytes(data))) == "method: required field is missing"


def test_duplicate_keys_are_refused() -> None:
    raw = LEGACY_V1.replace('"alpha": 16.0', '"alpha": 16.0, "alpha": "x"').encode()
    error = refused(raw)
    assert (error.field, str(error)) == ("alpha", "alpha: the key appears twice")


def test_not_an_object_and_not_json() -> None:
    assert "must hold a JSON object" in str(refused(b"[1, 2]"))
    assert "not valid JSON" in str(refused(b"{not json"))
    assert "not valid JSON" in str(refused(b"\xff\xfe\x00garbage"))
    assert "not valid JSON" in str(refused(b""))


# --- bounded before parsing -------------------------------------------------------------------
@pytest.fixture
def no_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fails the test if json.loads runs."""

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("json.loads ran on input that should be refused before parsing")

    monkeypatch.setattr("adapters.config.json.loads", forbidden)


@pytest.mark.usefixtures("no_parsing")
def test_size_is_bounded_before_parsing() -> None:
    one_mb_nested = b"[" * 500_000 + b"]" * 500_000
    error = refused(one_mb_nested)
    assert str(error) == f"adapter_config.json is 1000000 bytes; the limit is {MAX_CONFIG_BYTES}"
    padded = LEGACY_V1.encode() + b" " * MAX_CONFIG_BYTES  # valid JSON, but too large
    assert "the limit is 65536" in str(refused(padded))


@pytest.mark.usefixtures("no_parsing")
def test_nesting_is_bounded_before_parsing() -> None:
    nested = b"[" * 30_000 + b"]" * 30_000  # under the size limit; deep enough to recurse
    assert str(refused(nested)) == "adapter_config.json nests deeper than 8 levels"
    hidden = b'{"description": ' + b"[" * 9 + b"1" + b"]" * 9 + b"}"
    assert "nests deeper than 8" in str(refused(hidden))


def test_brackets_inside_strings_do_not_count() -> None:
    assert json_depth(b'{"a": "[[[[[[[[[[{{{{", "b": [1, {"c": "\\"]]]"}]}') == 3
    assert json_depth(b"[]") == 1 and json_depth(b'"[[["') == 0 and json_depth(b"7") == 0
    assert json_depth(b"[" * 1000, stop_above=MAX_CONFIG_DEPTH) == MAX_CONFIG_DEPTH + 1
    config = AdapterConfig.from_json(as_bytes(legacy(description="[[[[[[[[[[[[ {{{{{{{{{{")))
    assert config.description.startswith("[[[[")


# --- folders already in a store ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("changes", "kept"),
    [
        ({"description": 5}, {"description": "5"}),
        ({"description": ["a", "b"]}, {"description": '["a", "b"]'}),
        ({"connector_dropout": 5}, {"connector_dropout": 0.1}),
        ({"init": {"lora_A": 1}}, {"description": "news captions, trained 2024-05-01"}),
        ({"method": "ia3", "targets": ["k_proj"], "rank": -3}, {"rank": 8}),
    ],
)
def test_stored_folders_are_not_rejudged_on_metadata(
    changes: dict[str, Any], kept: dict[str, Any]
) -> None:
    """Metadata the old builds did not check (and the service never computes with) does not
    make a stored version unavailable; an upload of the same bytes is refused."""
    raw = as_bytes(legacy(**changes))
    refused(raw)
    config = AdapterConfig.from_json(raw, stored=True)
    for name, value in kept.items():
        assert getattr(config, name) == value


@pytest.mark.parametrize(
    "changes",
    [
        {"alpha": "x"},  # never served: the first caption failed
        {"base_fingerprint": 1},
        {"rank": 0},
        {"targets": ["c_attn"]},
        {"extra": 1},
        {"description": 5, "alpha": "x"},  # metadata plus a real fault
    ],
)
def test_stored_folders_still_need_everything_that_is_computed_with(
    changes: dict[str, Any],
) -> None:
    refused(as_bytes(legacy(**changes)), stored=True)


# --- folders: config errors and dtypes ----------------------------------------------------------
@pytest.fixture
def backbone(model: ContextPEFTModel) -> Backbone:
    return model.backbone


def test_folder_errors_name_the_config_field(saved: tuple[Path, AdapterSet]) -> None:
    folder, _ = saved
    data = json.loads((folder / CONFIG_FILE).read_text())
    (folder / CONFIG_FILE).write_text(json.dumps({**data, "alpha": "x"}))
    with pytest.raises(AdapterFormatError) as error:
        read_config(folder)
    assert error.value.field == "alpha"
    assert str(error.value) == "invalid adapter_config.json: alpha: Input should be a valid number"
    with pytest.raises(AdapterFormatError, match=r"^invalid adapter_config\.json: alpha: "):
        parse_config((folder / CONFIG_FILE).read_bytes())


@pytest.mark.parametrize(
    "dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.float64, torch.int8, torch.int32]
)
def test_unserved_tensor_dtypes_are_refused(
    saved: tuple[Path, AdapterSet], backbone: Backbone, dtype: torch.dtype
) -> None:
    folder, _ = saved
    tensors = load_file(str(folder / WEIGHTS_FILE))
    name = "lm.layers.0.q_proj.lora_A"
    tensors[name] = tensors[name].to(dtype)
    save_file(tensors, str(folder / WEIGHTS_FILE))
    with pytest.raises(AdapterFormatError) as error:
        validate_folder(folder, backbone.dims, fingerprint=backbone.fingerprint())
    assert str(error.value) == (
        f"{name} has dtype {dtype}; expected one of bfloat16, float16, float32"
    )
    if dtype == torch.float64:  # stored before this check: still loads (the bank casts)
        adapter = validate_folder(folder, backbone.dims, stored=True)
        assert adapter.tensors()[name].dtype == dtype
    else:
        with pytest.raises(AdapterFormatError):
            validate_folder(folder, backbone.dims, stored=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_served_half_dtypes_are_accepted(
    saved: tuple[Path, AdapterSet], backbone: Backbone, dtype: torch.dtype
) -> None:
    folder, _ = saved
    tensors = {k: v.to(dtype) for k, v in load_file(str(folder / WEIGHTS_FILE)).items()}
    save_file(tensors, str(folder / WEIGHTS_FILE))
    adapter = validate_folder(folder, backbone.dims, fingerprint=backbone.fingerprint())
    assert adapter.config.rank == 4


def test_a_connector_other_than_the_banks_is_refused(
    saved: tuple[Path, AdapterSet], backbone: Backbone
) -> None:
    folder, adapter = saved
    other = ConnectorSpec("mlp", adapter.config.connector.in_features, backbone.dims.hidden_size, 8)
    with pytest.raises(AdapterFormatError, match="does not match this backbone's"):
        validate_folder(folder, backbone.dims, connector=other)
    assert validate_folder(folder, backbone.dims, connector=adapter.config.connector)


def test_an_os_error_is_not_a_validation_error(
    saved: tuple[Path, AdapterSet], backbone: Backbone, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disk failure propagates as OSError (worth a retry), never as 'invalid' (final)."""
    folder, _ = saved

    def failing_read(path: str) -> dict[str, torch.Tensor]:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr("adapters.format.load_file", failing_read)
    with pytest.raises(OSError, match="Input/output error") as error:
        validate_folder(folder, backbone.dims)
    assert not isinstance(error.value, AdapterFormatError)


# --- the other external config: a PEFT LoRA folder's, on import --------------------------------
@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"peft_type": "LORA", "r": "8"}, "invalid PEFT adapter_config.json: r: Input should"),
        ({"peft_type": "LORA", "r": 0}, "r: Input should be greater than or equal to 1"),
        ({"r": 8, "lora_alpha": "16"}, "lora_alpha: Input should be a valid number"),
        ({"r": 8, "use_rslora": "yes"}, "use_rslora: Input should be a valid boolean"),
        ({"lora_alpha": 16}, "r: Field required"),
        ({"peft_type": "IA3", "r": 4}, "only PEFT LoRA can be imported, got IA3"),
        ([1, 2], "must hold a JSON object"),
    ],
)
def test_peft_configs_are_typed_too(
    tmp_path: Path, backbone: Backbone, config: object, message: str
) -> None:
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(AdapterFormatError, match=re.escape(message)):
        import_peft_lora(tmp_path, backbone.dims, backbone.fingerprint(), backbone.vision_dim)
    (tmp_path / "adapter_config.json").write_bytes(b"[" * 100_000)
    with pytest.raises(AdapterFormatError, match="larger than 65536 bytes"):
        import_peft_lora(tmp_path, backbone.dims, backbone.fingerprint(), backbone.vision_dim)
