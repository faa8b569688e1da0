"""Tenants and API keys: who is calling, and what they may do.

Keys come from `keys_file` and/or `keys` (inline JSON), both shaped

    {"keys": [{"key": "<plaintext>", "tenant": "acme", "rights": ["caption", "manage"]},
              {"sha256": "<hex of the key>", "tenant": "beta", "rights": ["caption"]}]}

Only SHA-256 digests are kept in memory; `python -m service.auth` prints the digest of a key
(read from stdin) for the `sha256` form, so plaintext never has to sit in a file. With no key
configured at all, every request is the built-in tenant "default" with all rights; the server
refuses that on a non-loopback host unless told otherwise (settings.assert_safe_binding).

    store = KeyStore.from_settings(settings)
    principal = store.authenticate(bearer_token(request.headers.get("authorization")))
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.settings import Settings

CAPTION = "caption"
MANAGE = "manage"
ALL_RIGHTS = frozenset({CAPTION, MANAGE})

TENANT_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
PUBLIC_TENANT = "public"  # owns the public adapters; no key belongs to it
DEFAULT_TENANT = "default"  # everyone, when no keys are configured
MIN_KEY_LENGTH = 16
_HEX_DIGEST = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Principal:
    """The authenticated caller: a tenant and the rights its key grants."""

    tenant: str
    rights: frozenset[str]

    def can(self, right: str) -> bool:
        return right in self.rights


DEFAULT_PRINCIPAL = Principal(DEFAULT_TENANT, ALL_RIGHTS)


def metrics_token(settings: Settings) -> str | None:
    """The bearer token GET /metrics requires (`metrics_token`, or the first line of
    `metrics_token_file`), or None when /metrics is open."""
    if settings.metrics_token is not None:
        return settings.metrics_token
    if settings.metrics_token_file is None:
        return None
    token = settings.metrics_token_file.read_text("utf-8").strip()
    if len(token) < MIN_KEY_LENGTH:
        raise ValueError(
            f"metrics token file {settings.metrics_token_file} holds {len(token)} characters; "
            f"a scrape token needs at least {MIN_KEY_LENGTH}"
        )
    return token


def token_matches(expected: str, bearer: str | None) -> bool:
    """Constant-time comparison of a presented bearer token with the expected one."""
    return bearer is not None and hmac.compare_digest(
        expected.encode("utf-8"), bearer.encode("utf-8")
    )


def hash_key(plaintext: str) -> str:
    """Hex SHA-256 of an API key, the form stored in memory and accepted as `sha256`."""
    if not plaintext:
        raise ValueError("an API key must not be empty")
    return hashlib.sha256(plaintext.encode("utf-8")).hexdigest()


def validate_tenant(name: str) -> str:
    """Return `name` if it is a valid tenant that may own keys, else raise ValueError."""
    if not TENANT_PATTERN.match(name):
        raise ValueError(
            f"invalid tenant name {name!r}: use 1-32 characters of a-z, 0-9, '_' and '-', "
            "starting with a letter or digit"
        )
    if name == PUBLIC_TENANT:
        raise ValueError(
            f"tenant {PUBLIC_TENANT!r} is reserved for public adapters; no key can belong to it"
        )
    return name


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header value; None when absent."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


class KeyStore:
    """API key digests -> principals. Immutable after construction."""

    def __init__(self, entries: Iterable[tuple[str, Principal]] = ()) -> None:
        self._entries: list[tuple[bytes, Principal]] = []
        seen: set[str] = set()
        for digest, principal in entries:
            if digest in seen:
                raise ValueError("the same API key is configured twice")
            seen.add(digest)
            self._entries.append((bytes.fromhex(digest), principal))

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyStore:
        """Keys from `settings.keys_file` and `settings.keys` together (either may be unset)."""
        entries: list[tuple[str, Principal]] = []
        if settings.keys_file is not None:
            entries += parse_keys(_read_keys_file(settings.keys_file), f"{settings.keys_file}")
        if settings.keys is not None:
            try:
                document = json.loads(settings.keys)
            except json.JSONDecodeError as exc:
                raise ValueError(f"keys setting (CTXPEFT_KEYS) is not valid JSON: {exc}") from None
            entries += parse_keys(document, "keys setting")
        return cls(entries)

    @property
    def empty(self) -> bool:
        """True when no key is configured: everyone is the "default" tenant."""
        return not self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def authenticate(self, bearer: str | None) -> Principal | None:
        """The principal of an API key (the bearer token), or None when it is not known."""
        if self.empty:
            return DEFAULT_PRINCIPAL
        if not bearer:
            return None
        candidate = hashlib.sha256(bearer.encode("utf-8")).digest()
        found: Principal | None = None
        # Compare against every digest, with no early exit, so the time taken does not tell
        # which entry (or whether an early one) matched. Digests are unique: one match at most.
        for digest, principal in self._entries:
            if hmac.compare_digest(digest, candidate):
                found = principal
        return found


def parse_keys(document: Any, source: str) -> list[tuple[str, Principal]]:
    """Validate a keys document; returns (hex digest, principal) pairs. Errors name `source`."""
    if not isinstance(document, Mapping) or not isinstance(document.get("keys"), list):
        raise ValueError(f'{source}: expected a JSON object {{"keys": [...]}}')
    return [_parse_entry(entry, f"{source}: keys[{i}]") for i, entry in enumerate(document["keys"])]


def _parse_entry(entry: Any, where: str) -> tuple[str, Principal]:
    if not isinstance(entry, Mapping):
        raise ValueError(f"{where}: expected an object with key|sha256, tenant, rights")
    unknown = set(entry) - {"key", "sha256", "tenant", "rights", "comment"}
    if unknown:
        raise ValueError(f"{where}: unknown fields {sorted(unknown)}")
    if ("key" in entry) == ("sha256" in entry):
        raise ValueError(f"{where}: give exactly one of 'key' (plaintext) or 'sha256'")
    if "key" in entry:
        key = entry["key"]
        if not isinstance(key, str) or len(key) < MIN_KEY_LENGTH:
            # Never echo the key itself into an error message (it ends up in logs).
            raise ValueError(f"{where}: 'key' must be a string of at least {MIN_KEY_LENGTH} chars")
        digest = hash_key(key)
    else:
        digest = entry["sha256"]
        if not isinstance(digest, str) or not _HEX_DIGEST.match(digest.lower()):
            raise ValueError(f"{where}: 'sha256' must be 64 hex digits (see `hash_key`)")
        digest = digest.lower()
    tenant = entry.get("tenant")
    if not isinstance(tenant, str):
        raise ValueError(f"{where}: 'tenant' must be a string")
    try:
        validate_tenant(tenant)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    rights = entry.get("rights")
    if not isinstance(rights, list) or not rights or not all(isinstance(r, str) for r in rights):
        raise ValueError(f"{where}: 'rights' must be a non-empty list, e.g. [\"caption\"]")
    unknown_rights = set(rights) - ALL_RIGHTS
    if unknown_rights:
        raise ValueError(
            f"{where}: unknown rights {sorted(unknown_rights)}; known: {sorted(ALL_RIGHTS)}"
        )
    return digest, Principal(tenant, frozenset(rights))


def _read_keys_file(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"keys_file {path} cannot be read: {exc.strerror or exc}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"keys_file {path} is not valid JSON: {exc}") from None


def main() -> int:
    """`python -m service.auth`: print the sha256 of each key read from stdin, one a line."""
    for line in sys.stdin:
        key = line.rstrip("\r\n")
        if key:
            print(hash_key(key))
    return 0


if __name__ == "__main__":
    sys.exit(main())
