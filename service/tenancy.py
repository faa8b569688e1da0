"""Tenants and names: one definition of what a tenant id and an adapter name are, of the two
built-in tenants, and of the order in which a tenant's request finds an adapter.

    check_tenant("acme"), check_name("news")     # the id, or InvalidId (a ValueError)
    owners("acme")                               # ("acme", "public"): own first, then public

`public` owns the public adapters (no key belongs to it); `default` is everyone when no keys
are configured. Imported by the store, the registry, auth, the engine and the Ray ingress.
"""

from __future__ import annotations

import re

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
