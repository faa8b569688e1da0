"""Tenants and names: one definition of what a tenant id and an adapter name are, of the two
built-in tenants, and of the order in which a tenant's request finds an adapter.

    check_tenant("acme"), check_name("news")     # the id, or InvalidId (a ValueError)
    owners("acme")                               # ("acme", "public"): own first, then public

`public` owns the public adapters (no key belongs to it); `default` is everyone when no keys
are configured. Imported by the store, the registry, auth, the engine and the Ray ingress.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

TENANT_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
PUBLIC_TENANT = "public"  # owns the public adapters; no key belongs to it
DEFAULT_TENANT = "default"  # everyone, when no keys are configured


class InvalidId(ValueError):
    """An invalid tenant id or adapter name (the message says which rule it breaks)."""


def check_tenant(tenant: str) -> str:
    return _checked(tenant, TENANT_PATTERN, "tenant name", 32)


def check_name(name: str) -> str:
    return _checked(name, NAME_PATTERN, "adapter name", 64)


def _checked(value: str, pattern: re.Pattern[str], what: str, most: int) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise InvalidId(
            f"invalid {what} {value!r}: use 1-{most} of a-z, 0-9, '_' and '-', starting with a "
            "letter or digit"
        )
    return value


def owners(tenant: str) -> tuple[str, ...]:
    """Whose adapters a tenant's request may use, in lookup order: its own, then public."""
    return (tenant,) if tenant == PUBLIC_TENANT else (tenant, PUBLIC_TENANT)


@dataclass(frozen=True)
class TenantPolicy:
    """What the engine grants one tenant (from the keys file): its weight in the fair share
    of batch rows, and its completion tokens per minute (None: no limit)."""

    weight: float = 1.0
    tokens_per_minute: int | None = None


class TenantPolicies:
    """Each tenant's policy; tenants not named get the default (weight 1, no token limit)."""

    def __init__(self, policies: Mapping[str, TenantPolicy] | None = None) -> None:
        self._policies = dict(policies or {})

    def __getitem__(self, tenant: str) -> TenantPolicy:
        return self._policies.get(tenant, DEFAULT_POLICY)

    def weight(self, tenant: str) -> float:
        return self[tenant].weight

    def tokens_per_minute(self, tenant: str) -> int | None:
        return self[tenant].tokens_per_minute


DEFAULT_POLICY = TenantPolicy()
