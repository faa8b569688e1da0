"""The adapter store on disk: tenants, adapter names and immutable versions.

    <store>/<tenant>/<name>/v<N>/adapter_config.json
                                 adapter.safetensors

Tenant and adapter names are opaque ids checked against strict patterns and only ever come
from this module's own directory listing or a validated argument: a request string is never
joined into a path unchecked. Versions are immutable: a new version is written into a
temporary folder inside the adapter's folder and renamed into place, so a crash never leaves
a half-written version visible and readers never see one appear partially; the files, the
temporary folder and, after the rename, the adapter's folder are fsynced, so a version that
was reported written survives a power cut. Public adapters belong to the reserved tenant
`public`.

Several processes may share a store (replicas, `ctxpeft train`): start-up cleanup removes only
temporary folders old enough to be abandoned (`ABANDONED_AFTER_S`), never one that another
process may still be writing. `usage(tenant)` counts a tenant's adapters and bytes, for the
per-tenant quotas (`StoreQuota`) that uploads are held to. A tenant's versions are written
one at a time under its lock (`tenant_lock`: a thread lock in the process and an advisory
`flock` on `<store>/.locks/<tenant>` across processes), and the quota is checked under that
lock, so that two uploads racing for a tenant's last place, in one process or in two replicas
sharing the store, cannot both take it.

This module only touches disk. Caching, slots and hot-swap are the registry's business.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
TENANT_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
VERSION_PATTERN = re.compile(r"^v([1-9][0-9]{0,8})$")
PUBLIC_TENANT = "public"
_TMP_PREFIX = ".tmp-"
_TRASH_PREFIX = f"{_TMP_PREFIX}deleted-"
# Lock files, one per tenant; a dot folder, so that no listing takes it for a tenant.
_LOCKS_DIR = ".locks"
# A writer's temporary folder untouched (itself and its files) for this long is abandoned: its
# writer crashed. Writers finish in seconds (two files, then validation), so an hour is far
# beyond any live writer, even on a slow shared disk.
ABANDONED_AFTER_S = 3600.0


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


@dataclass(frozen=True)
class TenantUsage:
    """What a tenant holds in the store: adapters (names) and bytes of all their versions."""

    adapters: int
    bytes: int


@dataclass(frozen=True)
class StoreQuota:
    """Per-tenant limits on uploads (settings tenant_max_adapters, tenant_max_adapter_bytes);
    0 means no limit."""

    max_adapters: int = 0
    max_bytes: int = 0

    def check(self, usage: TenantUsage, new_adapter: bool, new_bytes: int) -> None:
        """Raise QuotaExceeded if adding `new_bytes` (and a new adapter name, if
        `new_adapter`) to `usage` goes over a limit; the message names the limit."""
        if self.max_adapters and new_adapter and usage.adapters + 1 > self.max_adapters:
            raise QuotaExceeded(
                f"the tenant already has {usage.adapters} adapters; the limit is "
                f"{self.max_adapters} (tenant_max_adapters): delete one or upload a new "
                "version of an existing adapter"
            )
        if self.max_bytes and usage.bytes + new_bytes > self.max_bytes:
            raise QuotaExceeded(
                f"the tenant's adapters take {usage.bytes} bytes and this upload {new_bytes}; "
                f"the limit is {self.max_bytes} bytes (tenant_max_adapter_bytes)"
            )


class QuotaExceeded(StoreError):
    """An upload would take a tenant over its quota."""


@dataclass(frozen=True, order=True)
class AdapterRef:
    """One adapter version: (tenant, name, version number)."""

    tenant: str
    name: str
    version: int

    @property
    def label(self) -> str:
        return f"{self.tenant}/{self.name}@v{self.version}"


# The thread half of a tenant's lock, per (store folder, tenant), shared by every AdapterStore
# of the process: `flock` excludes other processes, but on some file systems (NFS emulates it
# with POSIX record locks, which belong to the process) not the other threads of this one.
_THREAD_LOCKS: dict[tuple[str, str], threading.Lock] = {}
_THREAD_LOCKS_GUARD = threading.Lock()


class AdapterStore:
    """Directory-backed store. Safe for several processes: writes are atomic renames, and a
    tenant's writes (with their quota check) take the tenant's lock."""

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

    def usage(self, tenant: str) -> TenantUsage:
        """The tenant's adapter count and the bytes of every version's files (a deleted
        adapter's folder may vanish while counting: it then counts as gone)."""
        names = self.names(tenant)
        total = 0
        for name in names:
            folder = self.root / tenant / name
            for entry in self._dirs(folder):
                if VERSION_PATTERN.fullmatch(entry.name):
                    total += _folder_bytes(entry)
        return TenantUsage(len(names), total)

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
    @contextmanager
    def tenant_lock(self, tenant: str) -> Iterator[None]:
        """Hold the tenant's write lock: exclusive against every thread of this process and
        every process that shares the store. `flock` is released by the kernel when its holder
        dies, so a crashed writer never leaves the tenant locked."""
        check_tenant(tenant)
        key = (str(self.root.resolve()), tenant)
        with _THREAD_LOCKS_GUARD:
            thread_lock = _THREAD_LOCKS.setdefault(key, threading.Lock())
        with thread_lock:
            folder = self.root / _LOCKS_DIR
            folder.mkdir(exist_ok=True)
            fd = os.open(folder / tenant, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # releases the flock

    def write_version(
        self,
        tenant: str,
        name: str,
        write: Callable[[Path], None],
        quota: StoreQuota | None = None,
        new_bytes: int = 0,
    ) -> AdapterRef:
        """Create the next version of tenant/name: `write(folder)` fills a temporary folder,
        which is then renamed to v<N+1>. Never overwrites an existing version; if another
        writer takes N+1 first, the rename moves on to the next number. With a `quota`, the
        tenant's usage plus `new_bytes` (and the new name, for a first version) is checked
        first (QuotaExceeded, nothing written). All under the tenant's lock, so the usage
        checked is the usage the version is added to."""
        check_name(name)
        with self.tenant_lock(tenant):
            if quota is not None:
                new_adapter = not self.versions(tenant, name)
                quota.check(self.usage(tenant), new_adapter, new_bytes)
            return self._write_version(tenant, name, write)

    def _write_version(self, tenant: str, name: str, write: Callable[[Path], None]) -> AdapterRef:
        adapter_dir = self.root / check_tenant(tenant) / check_name(name)
        if not adapter_dir.is_dir():
            adapter_dir.mkdir(parents=True, exist_ok=True)
            _fsync_dir(adapter_dir.parent)  # the new adapter (and tenant) entries
            _fsync_dir(self.root)
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
        # The rename is durable only once the folder that holds the new name is synced.
        _fsync_dir(adapter_dir)
        return AdapterRef(tenant, name, version)

    def delete(self, tenant: str, name: str) -> int:
        """Remove every version of tenant/name; returns how many were removed. The folder is
        first renamed aside (atomic: readers see all versions or none), then deleted."""
        adapter_dir = self.root / check_tenant(tenant) / check_name(name)
        if not adapter_dir.is_dir():
            return 0
        count = len(self.versions(tenant, name))
        trash = adapter_dir.parent / f"{_TRASH_PREFIX}{name}-{uuid.uuid4().hex}"
        os.rename(adapter_dir, trash)
        shutil.rmtree(trash, ignore_errors=True)
        return count

    def clean_temporaries(self, older_than_s: float = ABANDONED_AFTER_S) -> int:
        """Remove what crashed writers left (call at start-up): a delete's renamed-aside
        folder always (nobody writes into it), a writer's temporary folder only when neither
        it nor its files changed for `older_than_s` seconds, since another process sharing
        the store may be writing it right now. Returns how many were removed."""
        removed = 0
        now = time.time()
        for tenant_dir in [self.root, *self._dirs(self.root)]:
            for entry in [tenant_dir, *self._dirs(tenant_dir)]:
                for tmp in entry.glob(f"{_TMP_PREFIX}*"):
                    if not tmp.name.startswith(_TRASH_PREFIX):
                        touched = _last_change(tmp)
                        if touched is None or now - touched < older_than_s:
                            continue
                    shutil.rmtree(tmp, ignore_errors=True)
                    removed += 1
        return removed


def _last_change(folder: Path) -> float | None:
    """The newest mtime of `folder` and the entries in it; None if it vanished."""
    try:
        newest = folder.stat().st_mtime
        for entry in folder.iterdir():
            try:
                newest = max(newest, entry.lstat().st_mtime)
            except FileNotFoundError:
                continue
    except FileNotFoundError:
        return None
    return newest


def _folder_bytes(folder: Path) -> int:
    """Bytes of the regular files directly in `folder` (symlinks are not followed)."""
    total = 0
    try:
        entries = list(folder.iterdir())
    except FileNotFoundError:
        return 0
    for entry in entries:
        try:
            st = entry.lstat()
        except FileNotFoundError:
            continue
        if stat.S_ISREG(st.st_mode):
            total += st.st_size
    return total


def _fsync_dir(folder: Path) -> None:
    """Make the entries of `folder` (created, renamed) durable."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    """The files a writer put in `folder`, then the folder's own entries."""
    for path in folder.iterdir():
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(folder)
