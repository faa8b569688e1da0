"""The adapter store on disk: tenants, adapter names and immutable versions.

    <store>/<tenant>/<name>/v<N>/adapter_config.json
                                 adapter.safetensors

Tenant and adapter names are opaque ids checked against strict patterns and only ever come
from this module's own directory listing or a validated argument: a request string is never
joined into a path unchecked. Versions are immutable: a new version is written into a
temporary folder inside the adapter's folder and renamed into place, so a crash never leaves
a half-written version visible and readers never see one appear partially. Public adapters
belong to the reserved tenant `public`.

This module only touches disk. Caching, slots and hot-swap are the registry's business.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
TENANT_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
VERSION_PATTERN = re.compile(r"^v([1-9][0-9]{0,8})$")
PUBLIC_TENANT = "public"
_TMP_PREFIX = ".tmp-"


class StoreError(ValueError):
    """An invalid id or a store operation that cannot be done."""


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise StoreError(
            f"invalid adapter name {name!r}: use 1-64 of a-z, 0-9, '_' and '-', starting with a letter or digit"
        )
    return name


def check_tenant(tenant: str) -> str:
    if not isinstance(tenant, str) or not TENANT_PATTERN.fullmatch(tenant):
        raise StoreError(
            f"invalid tenant {tenant!r}: use 1-32 of a-z, 0-9, '_' and '-', starting with a letter or digit"
        )
    return tenant


@dataclass(frozen=True, order=True)
class AdapterRef:
    """One adapter version: (tenant, name, version number)."""

    tenant: str
    name: str
    version: int

    @property
    def label(self) -> str:
        return f"{self.tenant}/{self.name}@v{self.version}"


class AdapterStore:
    """Directory-backed store. Safe for several processes: writes are atomic renames."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    # --- reading ---------------------------------------------------------------------
    def tenants(self) -> list[str]:
        return sorted(p.name for p in self._dirs(self.root) if TENANT_PATTERN.fullmatch(p.name))

    def names(self, tenant: str) -> list[str]:
        folder = self.root / check_tenant(tenant)
        return sorted(p.name for p in self._dirs(folder) if NAME_PATTERN.fullmatch(p.name))

    def versions(self, tenant: str, name: str) -> list[int]:
        folder = self.root / check_tenant(tenant) / check_name(name)
        found = []
        for p in self._dirs(folder):
            match = VERSION_PATTERN.fullmatch(p.name)
            if match:
                found.append(int(match.group(1)))
        return sorted(found)

    def latest(self, tenant: str, name: str) -> AdapterRef | None:
        versions = self.versions(tenant, name)
        return AdapterRef(tenant, name, versions[-1]) if versions else None

    def path(self, ref: AdapterRef) -> Path:
        return self.root / check_tenant(ref.tenant) / check_name(ref.name) / f"v{ref.version}"

    def exists(self, ref: AdapterRef) -> bool:
        return self.path(ref).is_dir()

    def all_latest(self) -> Iterator[AdapterRef]:
        for tenant in self.tenants():
            for name in self.names(tenant):
                ref = self.latest(tenant, name)
                if ref is not None:
                    yield ref

    @staticmethod
    def _dirs(folder: Path) -> list[Path]:
        if not folder.is_dir():
            return []
        return [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]

    # --- writing ---------------------------------------------------------------------
    def write_version(self, tenant: str, name: str, write: Callable[[Path], None]) -> AdapterRef:
        """Create the next version of tenant/name: `write(folder)` fills a temporary folder,
        which is then renamed to v<N+1>. Never overwrites an existing version; if another
        writer takes N+1 first, the rename moves on to the next number."""
        adapter_dir = self.root / check_tenant(tenant) / check_name(name)
        adapter_dir.mkdir(parents=True, exist_ok=True)
        tmp = adapter_dir / f"{_TMP_PREFIX}{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            write(tmp)
            _fsync_tree(tmp)
            version = (self.versions(tenant, name) or [0])[-1] + 1
            while True:
                target = adapter_dir / f"v{version}"
                try:
                    # os.rename onto an existing non-empty folder fails: no overwrite.
                    os.rename(tmp, target)
                    break
                except OSError:
                    if not target.exists():
                        raise
                    version += 1
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return AdapterRef(tenant, name, version)

    def delete(self, tenant: str, name: str) -> int:
        """Remove every version of tenant/name; returns how many were removed. The folder is
        first renamed aside (atomic: readers see all versions or none), then deleted."""
        adapter_dir = self.root / check_tenant(tenant) / check_name(name)
        if not adapter_dir.is_dir():
            return 0
        count = len(self.versions(tenant, name))
        trash = adapter_dir.parent / f"{_TMP_PREFIX}deleted-{name}-{uuid.uuid4().hex}"
        os.rename(adapter_dir, trash)
        shutil.rmtree(trash, ignore_errors=True)
        return count

    def clean_temporaries(self) -> int:
        """Remove temporary folders left by writers that crashed (call at start-up)."""
        removed = 0
        for tenant_dir in [self.root, *self._dirs(self.root)]:
            for entry in [tenant_dir, *self._dirs(tenant_dir)]:
                for tmp in entry.glob(f"{_TMP_PREFIX}*"):
                    shutil.rmtree(tmp, ignore_errors=True)
                    removed += 1
        return removed


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
