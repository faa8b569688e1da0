"""Store hygiene: per-tenant quotas on uploads (held atomically by the tenant's lock, across
threads and processes), start-up cleanup that spares temporary folders another process may
still be writing, and a directory fsync after the publishing rename."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from safetensors.torch import save as save_safetensors

from adapters.bank import AdapterBank
from adapters.format import CONFIG_FILE, WEIGHTS_FILE, AdapterFormatError
from service.registry import AdapterRegistry, connector_spec
from service.store import (
    ABANDONED_AFTER_S,
    AdapterRef,
    AdapterStore,
    QuotaExceeded,
    StoreQuota,
    TenantUsage,
)
from tests.service import quota_writer
from tests.service.adapter_fixtures import put, random_adapter, tiny_backbone

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def store(tmp_path: Path) -> AdapterStore:
    return AdapterStore(tmp_path / "store")


@pytest.fixture
def registry(store: AdapterStore) -> Iterator[AdapterRegistry]:
    backbone = tiny_backbone()
    bank = AdapterBank(backbone.dims, connector_spec(backbone), 2, max_rank=8)
    reg = AdapterRegistry(store, backbone, bank, 1 << 30, refresh_s=0.2)
    yield reg
    reg.close()


def upload(seed: int, **config_changes: object) -> tuple[bytes, bytes]:
    adapter = random_adapter(tiny_backbone(), seed)
    weights = save_safetensors({k: v.contiguous() for k, v in adapter.tensors().items()})
    return json.dumps(adapter.config.to_dict() | config_changes).encode(), weights


# --- quotas -------------------------------------------------------------------------------------
def test_usage_counts_adapters_and_the_bytes_of_every_version(store: AdapterStore) -> None:
    backbone = tiny_backbone()
    assert store.usage("acme") == TenantUsage(0, 0)
    put(store, "acme", "a", random_adapter(backbone, 1))
    put(store, "acme", "a", random_adapter(backbone, 2))
    put(store, "acme", "b", random_adapter(backbone, 3))
    put(store, "beta", "c", random_adapter(backbone, 4))
    files = [p for p in (store.root / "acme").rglob("*") if p.is_file() and ".tmp-" not in str(p)]
    assert len(files) == 6
    assert store.usage("acme") == TenantUsage(2, sum(p.stat().st_size for p in files))
    (store.root / "acme" / "a" / ".tmp-inflight").mkdir()  # a writer's folder: not counted
    (store.root / "acme" / "a" / ".tmp-inflight" / "big").write_bytes(b"x" * 10_000)
    assert store.usage("acme").bytes == sum(p.stat().st_size for p in files)


def test_quota_check_names_the_limit() -> None:
    usage = TenantUsage(adapters=3, bytes=900)
    StoreQuota(max_adapters=3, max_bytes=1000).check(usage, new_adapter=False, new_bytes=100)
    with pytest.raises(QuotaExceeded, match=r"limit is 3 \(tenant_max_adapters\)"):
        StoreQuota(max_adapters=3).check(usage, new_adapter=True, new_bytes=1)
    with pytest.raises(QuotaExceeded, match=r"limit is 1000 bytes \(tenant_max_adapter_bytes\)"):
        StoreQuota(max_bytes=1000).check(usage, new_adapter=False, new_bytes=101)
    StoreQuota().check(TenantUsage(10**6, 10**15), new_adapter=True, new_bytes=10**9)  # 0: off


def test_uploads_are_held_to_the_tenants_quota(
    registry: AdapterRegistry, store: AdapterStore
) -> None:
    config, weights = upload(1)
    one_version = len(config) + len(weights)
    quota = StoreQuota(max_adapters=2, max_bytes=3 * one_version)
    registry.add_version("acme", "a", config, weights, quota)
    registry.add_version("acme", "b", *upload(2), quota)
    with pytest.raises(QuotaExceeded, match="already has 2 adapters; the limit is 2"):
        registry.add_version("acme", "c", *upload(3), quota)
    registry.add_version("acme", "a", *upload(4), quota)  # a new version of an existing one
    with pytest.raises(QuotaExceeded, match="tenant_max_adapter_bytes"):
        registry.add_version("acme", "b", *upload(5), quota)
    # Another tenant has its own quota; nothing was left behind by the refusals.
    registry.add_version("beta", "c", *upload(6), quota)
    assert store.versions("acme", "a") == [1, 2] and store.versions("acme", "b") == [1]
    assert store.names("acme") == ["a", "b"]
    assert not [p for p in store.root.rglob(".tmp-*")]
    registry.delete("acme", "b")
    registry.add_version("acme", "c", *upload(7), quota)  # room again after a delete


def test_a_bad_config_is_refused_before_the_disk_is_touched(
    registry: AdapterRegistry, store: AdapterStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_write(*args: object, **kwargs: object) -> None:
        raise AssertionError("the store was written for an invalid config")

    monkeypatch.setattr(store, "write_version", no_write)
    with pytest.raises(AdapterFormatError) as error:
        registry.add_version("acme", "a", *upload(1, connector_dropout=5))
    assert error.value.field == "connector_dropout"
    assert str(error.value) == (
        "invalid adapter_config.json: connector_dropout: Input should be less than 1"
    )
    assert not (store.root / "acme").exists()


def test_threads_racing_for_the_last_bytes_get_exactly_the_quota(store: AdapterStore) -> None:
    """Eight uploads at once, room for two more: two accepted, six refused. Each write takes
    a moment (as validation does) and its bytes count once renamed into place: without the
    lock all eight would pass the check before any of them counted."""
    payload = quota_writer.PAYLOAD_BYTES
    assert quota_writer.write(store, "acme", "kept", 0) == "accepted"  # 0: no limit
    start = threading.Barrier(8)

    def one(i: int) -> str:
        start.wait()
        return quota_writer.write(store, "acme", f"n{i % 3}", 3 * payload)

    with ThreadPoolExecutor(8) as pool:
        outcomes = Counter(pool.map(one, range(8)))
    assert outcomes == {"accepted": 2, "refused": 6}
    assert store.usage("acme").bytes == 3 * payload
    assert store.tenants() == ["acme"]  # the lock files are no tenant


def test_processes_sharing_a_store_get_exactly_the_quota(tmp_path: Path) -> None:
    """Six processes (as replicas sharing a store are) race for a tenant's last 2 places."""
    store = AdapterStore(tmp_path / "store")
    payload = quota_writer.PAYLOAD_BYTES
    assert quota_writer.write(store, "acme", "kept", 0) == "accepted"
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "tests.service.quota_writer", str(store.root), "acme"]
    writers = [
        subprocess.Popen(
            [*command, f"n{i}", str(3 * payload), str(go)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(6)
    ]
    for writer in writers:  # every one imported and waiting: released together
        assert writer.stdout is not None and writer.stdout.readline() == "ready\n"
    go.touch()
    outcomes = Counter(w.communicate(timeout=180)[0].strip() for w in writers)
    assert [w.returncode for w in writers] == [0] * 6
    assert outcomes == {"accepted": 2, "refused": 4}
    assert store.usage("acme").bytes == 3 * payload


def test_a_crashed_writer_never_leaves_the_tenant_locked(tmp_path: Path) -> None:
    """flock belongs to the open file: a holder killed mid-write releases it with its death."""
    store = AdapterStore(tmp_path / "store")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from service.store import AdapterStore\n"
            "with AdapterStore(Path(sys.argv[1])).tenant_lock('acme'):\n"
            "    print('held', flush=True); time.sleep(600)",
            str(store.root),
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline() == "held\n"
    holder.kill()
    holder.wait(timeout=30)
    assert quota_writer.write(store, "acme", "after", quota_writer.PAYLOAD_BYTES) == "accepted"
    assert store.versions("acme", "after") == [1]


# --- start-up cleanup ---------------------------------------------------------------------------
def _age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    for entry in [path, *path.iterdir()]:
        os.utime(entry, (then, then))


def test_cleanup_removes_only_abandoned_temporaries(store: AdapterStore) -> None:
    put(store, "acme", "a", random_adapter(tiny_backbone(), 1))
    adapter_dir = store.root / "acme" / "a"
    old = adapter_dir / ".tmp-old-writer"
    young = adapter_dir / ".tmp-live-writer"
    stale_dir_fresh_file = adapter_dir / ".tmp-writing-a-file-now"
    trash = store.root / "acme" / ".tmp-deleted-b-0123"
    for folder in (old, young, stale_dir_fresh_file, trash):
        folder.mkdir()
        (folder / CONFIG_FILE).write_text("{}")
    _age(old, ABANDONED_AFTER_S + 60)
    _age(trash, 10)  # a delete's folder: garbage whatever its age
    _age(stale_dir_fresh_file, ABANDONED_AFTER_S + 60)
    os.utime(stale_dir_fresh_file / CONFIG_FILE)  # a file just written: its writer is alive

    assert store.clean_temporaries() == 2
    assert not old.exists() and not trash.exists()
    assert young.exists() and stale_dir_fresh_file.exists()
    assert store.versions("acme", "a") == [1]  # versions are never touched
    assert store.clean_temporaries(older_than_s=0) == 2  # an operator's explicit sweep


# --- durability ---------------------------------------------------------------------------------
def test_the_publishing_rename_is_followed_by_a_directory_fsync(
    store: AdapterStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[tuple[str, str]] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd: int) -> None:
        st = os.fstat(fd)
        kind = "dir" if stat.S_ISDIR(st.st_mode) else "file"
        path = os.readlink(f"/proc/self/fd/{fd}")
        events.append((f"fsync {kind}", Path(path).name))
        real_fsync(fd)

    def rename(src: str | Path, dst: str | Path) -> None:
        events.append(("rename", Path(dst).name))
        real_rename(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    adapter = random_adapter(tiny_backbone(), 1)
    ref = put(store, "acme", "news", adapter)
    assert ref == AdapterRef("acme", "news", 1)
    renamed = events.index(("rename", "v1"))
    before, after = events[:renamed], events[renamed + 1 :]
    # Files and the temporary folder are synced before the rename, ...
    assert {("fsync file", CONFIG_FILE), ("fsync file", WEIGHTS_FILE)} <= set(before)
    assert any(kind == "fsync dir" and name.startswith(".tmp-") for kind, name in before)
    # ... the new adapter's folder in its tenant's (it was created), and the rename in its
    # folder after it.
    assert ("fsync dir", "acme") in before
    assert after == [("fsync dir", "news")]
