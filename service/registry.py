"""The adapter registry: names to immutable versions, and the tiers that serve them.

    registry = AdapterRegistry(store, backbone, bank, cpu_budget_bytes=256 << 20)
    version = registry.resolve("acme", "news")      # acme/news, else public/news; newest version
    registry.list_adapters("acme")                   # own + public, with latest version
    ref = registry.add_version("acme", "news", config_bytes, weights_bytes, quota)  # validated
    registry.delete("acme", "news")
    registry.cache                                   # device slots <- CPU LRU <- disk

Names are checked against the store's patterns and looked up in an in-memory index; the
index entry of one adapter is trusted while its folder's (inode, mtime) is unchanged, so a
version written or deleted by another process (`ctxpeft train`, a second replica) is seen at
the next request without a restart. A periodic rescan on the loader thread prunes entries
of deleted adapters and publishes the number of adapters on disk.

A resolved `AdapterVersion` is a version *and* the identity of its folder on disk: deleting
an adapter and uploading it again restarts numbering at v1 in the store, and the identity
keeps the old v1's cached weights from ever serving the new v1.

Uploads are judged by the current rules (`adapters.format.validate_folder`); versions already
in the store are read with `stored=True`, by the rules they were accepted under, so that an
upgrade never makes a version that served before unavailable (see `AdapterConfig.from_dict`).
With a `probe` (the engine's servability probe), an upload must also serve a fixed image with
finite logits before it becomes visible (AdapterUnservable, 422, otherwise), and a version
that appeared in the store from elsewhere is probed once before it is first served.

Quarantine: the engine quarantines a version whose rows keep producing non-finite values;
resolving it then raises AdapterQuarantined (422) until a new version replaces it (a new
version is another key). Quarantine lives in the process's memory: after a restart the
version is judged afresh.
A disk error while loading is not a validation failure: it propagates as OSError for the
cache to retry.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from adapters.adapter_set import AdapterSet
from adapters.backbone import Backbone
from adapters.bank import AdapterBank
from adapters.config import AdapterConfig, ConnectorSpec
from adapters.format import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    AdapterFormatError,
    parse_config,
    read_config,
    validate_folder,
)
from service.adapter_cache import AdapterCache
from service.exceptions import (
    AdapterLoadError,
    AdapterNotFound,
    AdapterQuarantined,
    InvalidRequest,
)
from service.metrics import ServiceMetrics
from service.store import (
    PUBLIC_TENANT,
    AdapterRef,
    AdapterStore,
    StoreError,
    StoreQuota,
    check_name,
    check_tenant,
)

# A folder changed this recently (wall clock) may change again within the same timestamp
# tick; its listing is not trusted until it is older (the "racy git" problem).
_RACY_NS = 50_000_000
# Versions remembered as probed (so a reload from disk is not probed again) and quarantined;
# both bounded, oldest forgotten first (a forgotten probe only costs one more probe).
_PROBED_KEPT = 65_536
_QUARANTINE_KEPT = 4096
# The servability probe: (set, label) -> None, raising AdapterUnservable.
Probe = Callable[[AdapterSet, str], None]


@dataclass(frozen=True, order=True)
class AdapterVersion:
    """One servable adapter version: its ref and the identity of its folder on disk."""

    ref: AdapterRef
    stamp: tuple[int, int]  # (inode, mtime_ns) of the version folder


@dataclass(frozen=True)
class AdapterInfo:
    """What listing shows about one adapter: its latest version and that version's config."""

    tenant: str
    name: str
    versions: tuple[int, ...]
    config: AdapterConfig | None  # None when the latest version's config is unreadable

    @property
    def public(self) -> bool:
        return self.tenant == PUBLIC_TENANT

    @property
    def latest(self) -> AdapterRef:
        return AdapterRef(self.tenant, self.name, self.versions[-1])


class VersionGone(AdapterLoadError):
    """The resolved version's folder was deleted or replaced before its weights were read."""

    load_failure = "gone"  # the ctxpeft_adapter_load_failures_total reason


@dataclass
class _Entry:
    folder: tuple[int, int]  # (inode, mtime_ns) of <store>/<tenant>/<name>
    latest: AdapterVersion | None
    checked: float  # monotonic time of the listing
    trusted: bool


def connector_spec(backbone: Backbone) -> ConnectorSpec:
    """The connector every adapter set of this backbone has (the bank's shape)."""
    cfg = backbone.config
    return ConnectorSpec(
        cfg.connector, backbone.vision_dim, backbone.dims.hidden_size, cfg.connector_hidden
    )


class AdapterRegistry:
    """Resolution, listing, upload and delete over an `AdapterStore`, plus the tier cache."""

    def __init__(
        self,
        store: AdapterStore,
        backbone: Backbone,
        bank: AdapterBank,
        cpu_budget_bytes: int,
        metrics: ServiceMetrics | None = None,
        refresh_s: float = 2.0,
        on_change: Callable[[], None] | None = None,
        probe: Probe | None = None,
    ) -> None:
        self.store = store
        self.probe = probe
        self._probed: OrderedDict[AdapterVersion, None] = OrderedDict()
        self._quarantined: OrderedDict[AdapterVersion, str] = OrderedDict()
        self.dims = backbone.dims
        self.fingerprint = backbone.fingerprint()
        self.vision_dim = backbone.vision_dim
        self.connector = connector_spec(backbone)
        self.max_rank = bank.max_rank
        self.refresh_s = refresh_s
        self._metrics = metrics
        self._index: dict[tuple[str, str], _Entry] = {}
        self._lock = threading.Lock()
        self.cache: AdapterCache[AdapterVersion] = AdapterCache(
            bank,
            load=self._load,
            size_hint=self._size_hint,
            budget_bytes=cpu_budget_bytes,
            metrics=metrics,
            on_change=on_change,
            housekeeping=self.rescan,
            housekeeping_s=refresh_s,
        )

    # --- resolution ------------------------------------------------------------------------
    def resolve(self, tenant: str, name: str) -> AdapterVersion:
        """The newest version of `name` visible to `tenant`: its own adapter first, then the
        public one. Raises AdapterNotFound."""
        try:
            check_tenant(tenant)
            check_name(name)
        except StoreError as exc:
            raise AdapterNotFound(f"no adapter {name!r}: {exc}") from None
        owners = (tenant,) if tenant == PUBLIC_TENANT else (tenant, PUBLIC_TENANT)
        for owner in owners:
            version = self._lookup(owner, name)
            if version is not None:
                with self._lock:
                    reason = self._quarantined.get(version)
                if reason is not None:
                    raise AdapterQuarantined(_quarantine_message(version, reason))
                return version
        raise AdapterNotFound(f"no adapter named {name!r} for tenant {tenant!r} (own or public)")

    def quarantine(self, version: AdapterVersion, reason: str) -> None:
        """Refuse `version` from now on (AdapterQuarantined) until a new version replaces
        it; rows of it still queued fail with the same error."""
        with self._lock:
            self._quarantined[version] = reason
            while len(self._quarantined) > _QUARANTINE_KEPT:
                self._quarantined.popitem(last=False)
        self.cache.fail(version, AdapterQuarantined(_quarantine_message(version, reason)))

    def quarantined(self, version: AdapterVersion) -> bool:
        with self._lock:
            return version in self._quarantined

    def _lookup(self, tenant: str, name: str) -> AdapterVersion | None:
        folder = self.store.root / tenant / name  # both checked by the caller
        try:
            st = os.stat(folder)
        except FileNotFoundError:
            with self._lock:
                self._index.pop((tenant, name), None)
            return None
        ident = (st.st_ino, st.st_mtime_ns)
        now = time.monotonic()
        with self._lock:
            entry = self._index.get((tenant, name))
        if (
            entry is not None
            and entry.folder == ident
            and entry.trusted
            and now - entry.checked < self.refresh_s
        ):
            return entry.latest
        latest = self._scan(tenant, name)
        trusted = time.time_ns() - st.st_mtime_ns > _RACY_NS
        with self._lock:
            self._index[(tenant, name)] = _Entry(ident, latest, now, trusted)
        return latest

    def _scan(self, tenant: str, name: str) -> AdapterVersion | None:
        """Newest version on disk with its folder identity (re-listed if it vanishes)."""
        for _ in range(3):
            ref = self.store.latest(tenant, name)
            if ref is None:
                return None
            try:
                return AdapterVersion(ref, _stamp(self.store.path(ref)))
            except FileNotFoundError:
                continue  # deleted between listing and stat: list again
        return None

    def rescan(self) -> int:
        """Drop index entries of adapters gone from disk and publish how many adapters the
        store holds (runs periodically on the loader thread). Returns that number."""
        present = {(ref.tenant, ref.name) for ref in self.store.all_latest()}
        with self._lock:
            for key in [k for k in self._index if k not in present]:
                del self._index[key]
        self.cache.forget(lambda v: (v.ref.tenant, v.ref.name) not in present)
        if self._metrics is not None:
            self._metrics.set_resident("disk", len(present))
        return len(present)

    # --- listing and management ---------------------------------------------------------
    def list_adapters(self, tenant: str) -> list[AdapterInfo]:
        """The tenant's own adapters and the public ones, each with its latest version.
        An own adapter shadows a public one of the same name (resolution picks the own)."""
        check_tenant(tenant)
        owners = [tenant] if tenant == PUBLIC_TENANT else [tenant, PUBLIC_TENANT]
        found: list[AdapterInfo] = []
        for owner in owners:
            for name in self.store.names(owner):
                info = self._info(owner, name)
                if info is not None:
                    found.append(info)
        return found

    def describe(self, tenant: str, name: str) -> AdapterInfo:
        """The adapter `name` as `tenant` would resolve it. Raises AdapterNotFound."""
        version = self.resolve(tenant, name)
        info = self._info(version.ref.tenant, version.ref.name)
        if info is None:
            raise AdapterNotFound(f"adapter {name!r} was deleted")
        return info

    def _info(self, tenant: str, name: str) -> AdapterInfo | None:
        versions = tuple(self.store.versions(tenant, name))
        if not versions:
            return None
        try:
            config: AdapterConfig | None = read_config(
                self.store.path(AdapterRef(tenant, name, versions[-1])), stored=True
            )
        except (AdapterFormatError, OSError):
            config = None
        return AdapterInfo(tenant, name, versions, config)

    def delete(self, tenant: str, name: str) -> int:
        """Delete every version of the tenant's own adapter `name`; returns how many.
        Requests already admitted keep the version they resolved if its weights are loaded.
        Raises AdapterNotFound when there is nothing to delete."""
        try:
            removed = self.store.delete(check_tenant(tenant), check_name(name))
        except StoreError as exc:
            raise AdapterNotFound(f"no adapter {name!r}: {exc}") from None
        if removed == 0:
            raise AdapterNotFound(f"tenant {tenant!r} has no adapter named {name!r}")
        with self._lock:
            self._index.pop((tenant, name), None)
        self.cache.forget(lambda v: v.ref.tenant == tenant and v.ref.name == name)
        return removed

    def add_version(
        self,
        tenant: str,
        name: str,
        config_bytes: bytes,
        weights_bytes: bytes,
        quota: StoreQuota | None = None,
    ) -> AdapterRef:
        """Store a new version from uploaded `adapter_config.json` and `adapter.safetensors`
        bytes. The config is checked first (no disk touched for a bad one), then the tenant's
        `quota` (raises QuotaExceeded), then the whole version is validated against this
        backbone inside the store's temporary folder and becomes visible (renamed to v<N+1>)
        only if valid; otherwise AdapterFormatError says why and nothing is left on disk. The
        validated set goes to the CPU tier."""
        try:
            check_tenant(tenant)
            check_name(name)
        except StoreError as exc:
            raise InvalidRequest(str(exc)) from None
        parse_config(config_bytes)
        validated: list[AdapterSet] = []

        def write(folder: Path) -> None:
            (folder / CONFIG_FILE).write_bytes(config_bytes)
            (folder / WEIGHTS_FILE).write_bytes(weights_bytes)
            adapter = self.validate(folder)
            if self.probe is not None:  # before the version becomes visible
                self.probe(adapter, f"{tenant}/{name} (upload)")
            validated.append(adapter)

        # The quota check and the write happen under the tenant's lock in the store, which
        # holds across the replicas and processes sharing it (issue 25).
        ref = self.store.write_version(
            tenant, name, write, quota, new_bytes=len(config_bytes) + len(weights_bytes)
        )
        with self._lock:
            self._index.pop((tenant, name), None)
        try:
            version = AdapterVersion(ref, _stamp(self.store.path(ref)))
        except FileNotFoundError:  # deleted again already
            return ref
        self._remember_probed(version)
        self.cache.insert(version, validated[0])
        return ref

    # --- loading (loader thread) --------------------------------------------------------
    def validate(self, folder: Path, stored: bool = False) -> AdapterSet:
        """Read and check one version folder against this backbone and bank (`stored`: a
        folder already in the store, judged by the rules it was accepted under)."""
        return validate_folder(
            folder,
            self.dims,
            self.fingerprint,
            self.max_rank,
            vision_dim=self.vision_dim,
            connector=self.connector,
            stored=stored,
        )

    def _load(self, version: AdapterVersion) -> AdapterSet:
        folder = self.store.path(version.ref)
        if not _same(folder, version.stamp):
            raise VersionGone(f"{version.ref.label} was deleted or replaced")
        try:
            adapter = self.validate(folder, stored=True)
        except AdapterFormatError as exc:
            if not _same(folder, version.stamp):
                raise VersionGone(f"{version.ref.label} was deleted while loading") from None
            raise AdapterLoadError(f"{version.ref.label} is invalid: {exc}") from None
        except OSError:  # the disk's failure (retried by the cache) unless the folder went
            if not _same(folder, version.stamp):
                raise VersionGone(f"{version.ref.label} was deleted while loading") from None
            raise
        # Deleted while reading: the bytes read may be a mix of two folders; say gone.
        if not _same(folder, version.stamp):
            raise VersionGone(f"{version.ref.label} was deleted while loading")
        if self.probe is not None:
            with self._lock:
                probed = version in self._probed
            if not probed:  # a version from elsewhere (ctxpeft train, a copied folder)
                self.probe(adapter, version.ref.label)
                self._remember_probed(version)
        return adapter

    def _remember_probed(self, version: AdapterVersion) -> None:
        if self.probe is None:
            return
        with self._lock:
            self._probed[version] = None
            while len(self._probed) > _PROBED_KEPT:
                self._probed.popitem(last=False)

    def _size_hint(self, version: AdapterVersion) -> int:
        try:
            return os.stat(self.store.path(version.ref) / WEIGHTS_FILE).st_size
        except OSError:
            return 0

    def close(self) -> None:
        self.cache.close()


def _quarantine_message(version: AdapterVersion, reason: str) -> str:
    return (
        f"adapter {version.ref.label} is quarantined: {reason}; upload a new version to replace it"
    )


def _stamp(folder: Path) -> tuple[int, int]:
    st = os.stat(folder)
    return (st.st_ino, st.st_mtime_ns)


def _same(folder: Path, stamp: tuple[int, int]) -> bool:
    try:
        return _stamp(folder) == stamp
    except FileNotFoundError:
        return False
