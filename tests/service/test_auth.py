"""API keys: hashed storage, constant-time look-up, tenant rules, configuration errors."""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from service import auth
from service.auth import (
    ALL_RIGHTS,
    DEFAULT_PRINCIPAL,
    KeyStore,
    Principal,
    bearer_token,
    hash_key,
    validate_tenant,
)
from service.settings import Settings

ACME_KEY = "acme-secret-key-0001"
BETA_KEY = "beta-secret-key-0002"


def keys_doc() -> dict[str, object]:
    return {
        "keys": [
            {"key": ACME_KEY, "tenant": "acme", "rights": ["caption", "manage"]},
            {"sha256": hash_key(BETA_KEY).upper(), "tenant": "beta", "rights": ["caption"]},
        ]
    }


@pytest.fixture
def store() -> KeyStore:
    return KeyStore.from_settings(Settings(keys=json.dumps(keys_doc())))


def test_hash_key_is_sha256_hex() -> None:
    assert hash_key("abc") == hashlib.sha256(b"abc").hexdigest()
    assert hash_key("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    with pytest.raises(ValueError):
        hash_key("")


def test_authenticate_maps_keys_to_principals(store: KeyStore) -> None:
    assert not store.empty and len(store) == 2
    assert store.authenticate(ACME_KEY) == Principal("acme", frozenset({"caption", "manage"}))
    beta = store.authenticate(BETA_KEY)
    assert beta == Principal("beta", frozenset({"caption"}))
    assert beta.can("caption") and not beta.can("manage")


@pytest.mark.parametrize("bearer", [None, "", "wrong-key-wrong-key", ACME_KEY + " ", ACME_KEY[:-1]])
def test_unknown_or_missing_key_is_none(store: KeyStore, bearer: str | None) -> None:
    assert store.authenticate(bearer) is None


def test_only_digests_are_stored(store: KeyStore) -> None:
    state = repr(vars(store))
    assert ACME_KEY not in state and BETA_KEY not in state
    assert all(len(digest) == 32 for digest, _ in store._entries)


def test_every_entry_is_compared_in_constant_time(
    store: KeyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[bytes, bytes]] = []
    compare = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return compare(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    # The first entry matches, and the second is still compared: no early exit.
    assert store.authenticate(ACME_KEY) is not None
    assert len(calls) == 2
    assert {b for _, b in calls} == {hashlib.sha256(ACME_KEY.encode()).digest()}
    calls.clear()
    assert store.authenticate("nobody-nobody-nobody") is None
    assert len(calls) == 2


def test_no_keys_means_default_principal_for_everyone() -> None:
    store = KeyStore.from_settings(Settings())
    assert store.empty
    assert store.authenticate(None) == DEFAULT_PRINCIPAL
    assert store.authenticate("anything") == DEFAULT_PRINCIPAL
    assert DEFAULT_PRINCIPAL.tenant == "default" and DEFAULT_PRINCIPAL.rights == ALL_RIGHTS


def test_keys_file_and_inline_keys_combine(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": [keys_doc()["keys"][0]]}))  # type: ignore[index]
    inline = json.dumps({"keys": [keys_doc()["keys"][1]]})  # type: ignore[index]
    store = KeyStore.from_settings(Settings(keys_file=path, keys=inline))
    assert store.authenticate(ACME_KEY).tenant == "acme"  # type: ignore[union-attr]
    assert store.authenticate(BETA_KEY).tenant == "beta"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("name", "valid"),
    [
        ("acme", True),
        ("a", True),
        ("0team_x-1", True),
        ("a" * 32, True),
        ("a" * 33, False),
        ("Acme", False),
        ("-acme", False),
        ("_acme", False),
        ("ac me", False),
        ("acme/../x", False),
        ("", False),
        ("public", False),
    ],
)
def test_tenant_names(name: str, valid: bool) -> None:
    if valid:
        assert validate_tenant(name) == name
    else:
        with pytest.raises(ValueError):
            validate_tenant(name)


def test_public_is_reserved() -> None:
    doc = {"keys": [{"key": ACME_KEY, "tenant": "public", "rights": ["caption"]}]}
    with pytest.raises(ValueError, match="reserved for public adapters"):
        KeyStore.from_settings(Settings(keys=json.dumps(doc)))


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        ({"tenant": "acme", "rights": ["caption"]}, "exactly one of 'key'"),
        (
            {
                "key": ACME_KEY,
                "sha256": hash_key(ACME_KEY),
                "tenant": "acme",
                "rights": ["caption"],
            },
            "exactly one of 'key'",
        ),
        ({"key": "short", "tenant": "acme", "rights": ["caption"]}, "at least 16"),
        ({"sha256": "abc", "tenant": "acme", "rights": ["caption"]}, "64 hex digits"),
        ({"key": ACME_KEY, "tenant": "ACME", "rights": ["caption"]}, "invalid tenant name"),
        ({"key": ACME_KEY, "rights": ["caption"]}, "'tenant' must be a string"),
        ({"key": ACME_KEY, "tenant": "acme", "rights": []}, "non-empty list"),
        ({"key": ACME_KEY, "tenant": "acme", "rights": ["admin"]}, r"unknown rights \['admin'\]"),
        ({"key": ACME_KEY, "tenant": "acme", "rights": ["caption"], "x": 1}, "unknown fields"),
    ],
)
def test_bad_entries_are_rejected_with_their_position(entry: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match) as info:
        KeyStore.from_settings(Settings(keys=json.dumps({"keys": [entry]})))
    assert "keys setting: keys[0]" in str(info.value)
    assert ACME_KEY not in str(info.value)  # a key never ends up in an error message


def test_bad_documents(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not valid JSON"):
        KeyStore.from_settings(Settings(keys="{nope"))
    with pytest.raises(ValueError, match=re.escape('expected a JSON object {"keys"')):
        KeyStore.from_settings(Settings(keys="[]"))
    with pytest.raises(ValueError, match="cannot be read"):
        KeyStore.from_settings(Settings(keys_file=tmp_path / "missing.json"))
    twice = {"keys": [keys_doc()["keys"][0]] * 2}  # type: ignore[index]
    with pytest.raises(ValueError, match="configured twice"):
        KeyStore.from_settings(Settings(keys=json.dumps(twice)))


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer abc", "abc"),
        ("bearer   abc ", "abc"),
        ("Basic abc", None),
        ("Bearer", None),
        ("Bearer ", None),
        ("", None),
        (None, None),
    ],
)
def test_bearer_token(header: str | None, token: str | None) -> None:
    assert bearer_token(header) == token


def test_hashing_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{ACME_KEY}\n\n{BETA_KEY}\n"))
    assert auth.main() == 0
    assert capsys.readouterr().out.split() == [hash_key(ACME_KEY), hash_key(BETA_KEY)]


def test_hashing_cli_as_module() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "service.auth"],
        input=ACME_KEY,
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert result.stdout.strip() == hash_key(ACME_KEY)
