"""The tiers below the registry: device slots in the `AdapterBank` <- a CPU LRU bounded in
bytes <- disk, with a loader thread that keeps disk reads off the critical path.

    want(v)       a queued request needs version v (pins its CPU copy; starts a disk load)
    is_ready(v)   v is in a device slot or on the CPU tier (else a load is started)
    bind(vs)      worker thread, between batches: copy CPU sets into free slots, pin slots
    release(...)  worker thread, after the batch: unpin
    unwant(v)     the request left the queue (bound into a batch, dropped or failed)

Invariants:
- A slot pinned by rows of the running batch is never given to another version (bind raises
  if asked to); a new version of an adapter is a different key, so it loads into another slot
  while the old one finishes.
- The CPU tier never holds more than `budget_bytes`: the loader starts a disk read only when
  the set fits beside the CPU copies pinned by waiting requests, evicting unpinned ones LRU
  first. (One exception keeps progress possible: a set larger than the whole budget is loaded
  when nothing else is pinned, and evicted as soon as its requests have been bound.)
- Disk reads and validation run on the loader thread only; the bank is written on the caller
  of `bind` (the engine's worker) only.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from adapters.adapter_set import AdapterSet
from adapters.bank import AdapterBank, BankError
from service.exceptions import AdapterLoadError, EngineError
from service.metrics import ServiceMetrics

log = logging.getLogger(__name__)
K = TypeVar("K", bound=Hashable)
_FAILURES_KEPT = 1024


def set_nbytes(adapter: AdapterSet) -> int:
    """Bytes of an adapter set's tensors (what it costs on the CPU tier)."""
    return sum(t.numel() * t.element_size() for t in adapter.tensors().values())


@dataclass(frozen=True)
class TierStats:
    """A snapshot of the tiers, for tests, `ctxpeft bench` and the metrics gauges."""

    device_resident: int
    cpu_resident: int
    cpu_bytes: int
    cpu_budget_bytes: int
    cpu_peak_bytes: int
    cpu_loads: int
    device_loads: int
    failed: int


@dataclass
class _CpuEntry:
    adapter: AdapterSet
    nbytes: int


class AdapterCache(Generic[K]):
    """Device slots + CPU LRU + a loader thread, keyed by an immutable version key `K`.

    `load(key)` reads and validates one version from disk (raises an `EngineError`);
    `size_hint(key)` estimates its bytes before reading (the weights file size);
    `on_change()` is called from the loader thread after a load finished or failed, so the
    engine can wake up and schedule the requests that waited for it.
    """

    def __init__(
        self,
        bank: AdapterBank,
        load: Callable[[K], AdapterSet],
        size_hint: Callable[[K], int],
        budget_bytes: int,
        metrics: ServiceMetrics | None = None,
        on_change: Callable[[], None] | None = None,
        housekeeping: Callable[[], object] | None = None,
        housekeeping_s: float = 2.0,
    ) -> None:
        self.bank = bank
        self.budget_bytes = budget_bytes
        self._load = load
        self._size_hint = size_hint
        self._metrics = metrics
        self._on_change = on_change
        self._housekeeping = housekeeping
        self._housekeeping_s = housekeeping_s
        self._cond = threading.Condition()
        # CPU tier (loader thread inserts; any thread reads)
        self._cpu: OrderedDict[K, _CpuEntry] = OrderedDict()
        self._cpu_bytes = 0
        self._cpu_peak = 0
        self._wanted: Counter[K] = Counter()
        self._pending: deque[K] = deque()
        self._queued: set[K] = set()
        self._failed: OrderedDict[K, EngineError] = OrderedDict()
        self._cpu_loads = 0
        # device tier (worker thread writes)
        slots = bank.num_slots
        self._slot_of: dict[K, int] = {}
        self._owner: list[K | None] = [None] * slots
        self._pins = [0] * slots
        self._last_used = [0] * slots
        self._tick = 0
        self._device_loads = 0
        self._closed = False
        self._thread = threading.Thread(target=self._loader, name="ctxpeft-loader", daemon=True)
        self._thread.start()

    # --- requests' interest (any thread) -------------------------------------------------
    def want(self, key: K, rows: int = 1) -> None:
        with self._cond:
            self._wanted[key] += rows
            self._request_load(key)

    def unwant(self, key: K, rows: int = 1) -> None:
        with self._cond:
            self._wanted[key] -= rows
            if self._wanted[key] <= 0:
                del self._wanted[key]
            if self._cpu_bytes > self.budget_bytes:
                self._evict(0)
            self._cond.notify_all()  # the loader may be waiting for room

    def is_ready(self, key: K) -> bool:
        """True when `key` can join a batch without touching disk; otherwise a load is
        started (if none is running and it has not failed)."""
        with self._cond:
            if key in self._slot_of or key in self._cpu:
                return True
            self._request_load(key)
            return False

    def failure(self, key: K) -> EngineError | None:
        """Why loading `key` failed, if it did (versions are immutable: failures are final)."""
        with self._cond:
            return self._failed.get(key)

    def insert(self, key: K, adapter: AdapterSet) -> bool:
        """Put an already validated set on the CPU tier (e.g. just uploaded) if it fits."""
        nbytes = set_nbytes(adapter)
        with self._cond:
            if key in self._cpu or not self._evict(nbytes):
                return False
            self._store(key, adapter, nbytes)
        return True

    def forget(self, match: Callable[[K], bool]) -> int:
        """Drop unpinned CPU copies whose key matches (e.g. a deleted adapter's versions)."""
        with self._cond:
            gone = [k for k in self._cpu if match(k) and k not in self._wanted]
            for key in gone:
                self._cpu_bytes -= self._cpu.pop(key).nbytes
            self._publish()
        return len(gone)

    def _request_load(self, key: K) -> None:
        if key in self._cpu or key in self._queued or key in self._failed:
            return
        if key in self._slot_of:
            return
        self._queued.add(key)
        self._pending.append(key)
        self._cond.notify_all()

    # --- CPU tier internals (lock held) -----------------------------------------------------
    def _pinned_bytes(self) -> int:
        return sum(e.nbytes for k, e in self._cpu.items() if k in self._wanted)

    def _evict(self, room: int) -> bool:
        """Evict unpinned entries, least recently used first, until `room` more bytes fit."""
        for key in list(self._cpu):
            if self._cpu_bytes + room <= self.budget_bytes:
                break
            if key not in self._wanted:
                self._cpu_bytes -= self._cpu.pop(key).nbytes
        self._publish()
        return self._cpu_bytes + room <= self.budget_bytes

    def _store(self, key: K, adapter: AdapterSet, nbytes: int) -> None:
        self._cpu[key] = _CpuEntry(adapter, nbytes)
        self._cpu_bytes += nbytes
        self._cpu_peak = max(self._cpu_peak, self._cpu_bytes)
        self._publish()

    def _publish(self) -> None:
        if self._metrics is not None:
            self._metrics.set_resident("cpu", len(self._cpu))
            self._metrics.set_resident("device", len(self._slot_of))

    # --- loader thread ---------------------------------------------------------------------
    def _next_load(self, timeout: float) -> K | None:
        """The next version to read from disk, once it fits; None after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._closed:
                while self._pending:
                    key = self._pending[0]
                    if key in self._wanted and key not in self._cpu and key not in self._slot_of:
                        break
                    self._pending.popleft()  # nobody needs it any more
                    self._queued.discard(key)
                else:
                    key = None
                if key is not None:
                    need = self._size_hint(key)
                    pinned = self._pinned_bytes()
                    if pinned + need <= self.budget_bytes or pinned == 0:
                        self._pending.popleft()
                        return key
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)
        return None

    def _loader(self) -> None:
        last_housekeeping = time.monotonic()
        while not self._closed:
            if time.monotonic() - last_housekeeping >= self._housekeeping_s:
                last_housekeeping = time.monotonic()
                if self._housekeeping is not None:
                    try:
                        self._housekeeping()
                    except Exception:  # a failed rescan is logged and retried next period
                        log.exception("adapter store rescan failed")
            since = time.monotonic() - last_housekeeping
            key = self._next_load(max(0.0, self._housekeeping_s - since))
            if key is not None:
                self._load_one(key)

    def _load_one(self, key: K) -> None:
        started = time.perf_counter()
        try:
            adapter = self._load(key)
        except EngineError as exc:
            self._fail(key, exc)
            return
        except Exception as exc:  # an unexpected read error must not kill the loader
            self._fail(key, AdapterLoadError(f"loading failed: {exc!r}"))
            return
        seconds = time.perf_counter() - started
        nbytes = set_nbytes(adapter)
        with self._cond:
            self._queued.discard(key)
            if key in self._cpu:  # inserted meanwhile (an upload of this very version)
                return
            if not self._evict(nbytes) and self._pinned_bytes() > 0:
                # Pinned sets grew while we read; read it again once room appears.
                self._queued.add(key)
                self._pending.appendleft(key)
                return
            self._store(key, adapter, nbytes)
            self._cpu_loads += 1
            self._cond.notify_all()
        if self._metrics is not None:
            self._metrics.observe_adapter_load("cpu", seconds)
        if self._on_change is not None:
            self._on_change()

    def _fail(self, key: K, error: EngineError) -> None:
        with self._cond:
            self._queued.discard(key)
            self._failed[key] = error
            while len(self._failed) > _FAILURES_KEPT:
                self._failed.popitem(last=False)
        if self._on_change is not None:
            self._on_change()

    # --- device tier (worker thread) -------------------------------------------------------
    def bind(self, keys: Iterable[K]) -> tuple[dict[K, int], dict[K, EngineError], list[K]]:
        """Give every key a bank slot for the next batch and pin it once per row.

        Returns (slot per key, keys that cannot be served with why, keys whose CPU copy is
        not there any more: their rows go back to the queue)."""
        rows = Counter(keys)
        slots: dict[K, int] = {}
        failed: dict[K, EngineError] = {}
        missing: list[K] = []
        copies: list[tuple[K, int, AdapterSet]] = []
        with self._cond:
            self._tick += 1
            for key in rows:
                if key in self._slot_of:
                    slots[key] = self._slot_of[key]
                    self._last_used[slots[key]] = self._tick
                    continue
                entry = self._cpu.get(key)
                if entry is None:
                    missing.append(key)
                    continue
                self._cpu.move_to_end(key)
                slot = self._free_slot()
                old = self._owner[slot]
                if old is not None:
                    del self._slot_of[old]
                self._owner[slot] = key
                self._slot_of[key] = slot
                self._last_used[slot] = self._tick
                slots[key] = slot
                copies.append((key, slot, entry.adapter))
        for key, slot, adapter in copies:
            started = time.perf_counter()
            try:
                self.bank.load(slot, adapter)
            except BankError as exc:
                failed[key] = AdapterLoadError(str(exc))
                with self._cond:
                    self._owner[slot] = None
                    del self._slot_of[key]
                    self._failed[key] = failed[key]
                    del slots[key]
                self.bank.clear(slot)
                continue
            self._device_loads += 1
            if self._metrics is not None:
                self._metrics.observe_adapter_load("device", time.perf_counter() - started)
        with self._cond:
            for key, slot in slots.items():
                self._pins[slot] += rows[key]
            self._publish()
        return slots, failed, missing

    def _free_slot(self) -> int:
        """An empty slot, else the least recently used slot nobody pins (lock held)."""
        for slot, owner in enumerate(self._owner):
            if owner is None:
                return slot
        candidates = [
            s
            for s in range(len(self._owner))
            if self._pins[s] == 0 and self._last_used[s] != self._tick
        ]
        if not candidates:
            raise RuntimeError(
                "no unpinned device slot: a batch may use at most device_slots adapters"
            )
        return min(candidates, key=lambda s: self._last_used[s])

    def release(self, slots: dict[K, int], rows: Sequence[K]) -> None:
        """Unpin the slots of a finished batch (one pin per row)."""
        with self._cond:
            for key in rows:
                self._pins[slots[key]] -= 1

    def placement(self) -> tuple[set[K], int]:
        """(versions whose slot running rows pin, number of slots no row pins): what the
        scheduler may still place on the device (worker thread, between steps)."""
        with self._cond:
            pinned = {k for k, s in self._slot_of.items() if self._pins[s] > 0}
            return pinned, sum(1 for p in self._pins if p == 0)

    def wanted(self) -> int:
        """Rows that want a CPU copy (queued rows not yet bound): 0 when nothing waits."""
        with self._cond:
            return sum(self._wanted.values())

    def pins(self, slot: int) -> int:
        with self._cond:
            return self._pins[slot]

    def slot_of(self, key: K) -> int | None:
        with self._cond:
            return self._slot_of.get(key)

    # --- lifecycle and stats ---------------------------------------------------------------
    def stats(self) -> TierStats:
        with self._cond:
            return TierStats(
                device_resident=len(self._slot_of),
                cpu_resident=len(self._cpu),
                cpu_bytes=self._cpu_bytes,
                cpu_budget_bytes=self.budget_bytes,
                cpu_peak_bytes=self._cpu_peak,
                cpu_loads=self._cpu_loads,
                device_loads=self._device_loads,
                failed=len(self._failed),
            )

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)
