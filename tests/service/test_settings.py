"""Settings: defaults, CTXPEFT_ environment, validation, and the safe-binding rule."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from service.settings import Settings, assert_safe_binding, is_loopback_host


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("CTXPEFT_"):
            monkeypatch.delenv(name)


def test_defaults() -> None:
    s = Settings()
    assert (s.host, s.port, s.backbone, s.device, s.dtype) == (
        "127.0.0.1",
        8000,
        "demo",
        "auto",
        "float32",
    )
    assert (s.max_batch_size, s.max_wait_ms, s.device_slots, s.max_rank) == (32, 5.0, 16, 64)
    assert (s.queue_size, s.tenant_max_inflight, s.request_timeout_s) == (256, 32, 30.0)
    assert (s.default_max_new_tokens, s.max_new_tokens_limit) == (32, 64)
    assert (s.max_body_bytes, s.max_image_pixels, s.max_image_side) == (
        10 * 2**20,
        16_000_000,
        8192,
    )
    assert s.cpu_cache_bytes == 256 * 2**20
    assert s.allowed_image_formats == ["PNG", "JPEG", "WEBP", "BMP", "GIF"]
    assert (s.keys_file, s.keys, s.allow_unauthenticated, s.default_adapter) == (
        None,
        None,
        False,
        None,
    )
    assert (s.drain_timeout_s, s.encoder_cache_entries, s.metrics_adapter_labels) == (20.0, 512, 20)
    assert (s.log_level, s.log_json) == ("info", True)
    assert s.runtime_dir == Path("var")
    assert s.resolved_store_dir() == Path("var/adapters")


def test_every_field_is_described() -> None:
    missing = [name for name, f in Settings.model_fields.items() if not f.description]
    assert missing == []


def test_store_dir_override(tmp_path: Path) -> None:
    assert Settings(runtime_dir=tmp_path).resolved_store_dir() == tmp_path / "adapters"
    assert Settings(store_dir=tmp_path / "s").resolved_store_dir() == tmp_path / "s"


def test_environment_with_prefix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CTXPEFT_PORT", "9001")
    monkeypatch.setenv("CTXPEFT_MAX_BATCH_SIZE", "8")
    monkeypatch.setenv("CTXPEFT_KEYS_FILE", str(tmp_path / "keys.json"))
    monkeypatch.setenv("CTXPEFT_ALLOW_UNAUTHENTICATED", "true")
    monkeypatch.setenv("CTXPEFT_LOG_JSON", "0")
    monkeypatch.setenv("CTXPEFT_LOG_LEVEL", "DEBUG")
    monkeypatch.setenv("CTXPEFT_ALLOWED_IMAGE_FORMATS", "png, jpg")
    s = Settings()
    assert (s.port, s.max_batch_size, s.keys_file) == (9001, 8, tmp_path / "keys.json")
    assert (s.allow_unauthenticated, s.log_json, s.log_level) == (True, False, "debug")
    assert s.allowed_image_formats == ["PNG", "JPEG"]
    monkeypatch.setenv("CTXPEFT_ALLOWED_IMAGE_FORMATS", '["webp", "GIF"]')
    assert Settings().allowed_image_formats == ["WEBP", "GIF"]
    # explicit values (CLI flags) win over the environment
    assert Settings(port=7000).port == 7000


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_batch_size", 0),
        ("device_slots", -1),
        ("max_rank", 0),
        ("queue_size", 0),
        ("tenant_max_inflight", 0),
        ("max_body_bytes", 0),
        ("max_image_pixels", 0),
        ("port", 70000),
        ("max_wait_ms", -1.0),
        ("request_timeout_s", 0),
        ("metrics_adapter_labels", -1),
        ("cpu_cache_bytes", -5),
        ("dtype", "float64"),
        ("log_level", "loud"),
        ("allowed_image_formats", ["PNG", "TIFF"]),
        ("allowed_image_formats", []),
        ("backbone", ""),
    ],
)
def test_out_of_range_values_are_rejected(field: str, value: Any) -> None:
    with pytest.raises(ValidationError) as info:
        Settings(**{field: value})
    assert info.value.errors()[0]["loc"][0] == field


def test_default_tokens_within_limit() -> None:
    with pytest.raises(ValidationError, match="max_new_tokens_limit"):
        Settings(default_max_new_tokens=100, max_new_tokens_limit=64)
    assert Settings(default_max_new_tokens=64, max_new_tokens_limit=64).max_new_tokens_limit == 64


def test_unknown_setting_is_an_error() -> None:
    with pytest.raises(ValidationError, match="max_batch"):
        Settings(max_batch=4)  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("LOCALHOST", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.5", False),
        ("example.com", False),
        ("localhost.evil.com", False),
    ],
)
def test_is_loopback_host(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback


def test_assert_safe_binding() -> None:
    assert_safe_binding(Settings(), has_keys=False)  # loopback, no keys: fine
    assert_safe_binding(Settings(host="0.0.0.0"), has_keys=True)
    assert_safe_binding(Settings(host="0.0.0.0", allow_unauthenticated=True), has_keys=False)
    with pytest.raises(ValueError, match="allow_unauthenticated") as info:
        assert_safe_binding(Settings(host="0.0.0.0"), has_keys=False)
    assert "'0.0.0.0'" in str(info.value) and "keys_file" in str(info.value)
