"""The tiers below the registry: device slots in the `AdapterBank` <- a CPU LRU bounded in
bytes <- disk, with a loader thread that keeps disk reads off the critical path.

    want(v)       a queued request needs version v (pins its CPU copy; starts a disk load)
    is_ready(v)   v is in a device slot or on the CPU tier (else a load is started)
    bind(vs)      worker thread, between steps: copy CPU sets into free slots, pin slots
    release(...)  worker thread, when rows leave: unpin
    unwant(v)     the request left the queue (bound into a batch, dropped or failed)
    failure(v)    why v cannot be served now (None while it loads or retries)

Invariants:
- A slot pinned by running rows is never given to another version; a new version of an
  adapter is a different key, so it loads into another slot while the old one finishes.
- Binding is atomic per version: a slot is mapped to a version only after its weights are
  completely in place. The previous occupant is unmapped before the copy starts, and a copy
  that raises (anything, not only BankError) leaves the slot unmapped and cleared: that
  version's rows fail, every other key of the same call binds as if it had not happened.
- The CPU tier never holds more than `budget_bytes`: the loader starts a disk read only when
  the set fits beside the CPU copies pinned by waiting requests, evicting unpinned ones least
  recently used first (every use touches an entry: want, a ready check, a bind, also of a
  version already in a slot), so an upload evicts another tenant's hot entry only after every
  colder one, and never a pinned one. The upload's own set enters at the cold end: it has
  served nobody yet, so it is the next to go. (One exception keeps
  progress possible: a set larger than the whole budget is loaded when nothing else is
  pinned, and evicted as soon as its requests have been bound.)
- Load failures: a version that fails validation (or does not fit the bank) is failed for
  good, versions being immutable; one that was deleted meanwhile is "gone" (the engine
  resolves again). An OSError (EIO, EMFILE, ...) or MemoryError is retried with exponential
  backoff (`load_retries` times from `retry_base_s`); after that, and after an unexpected
  exception, the failure is reported for `cool_down_s` only, then the next request retries.
  Every failed attempt counts in ctxpeft_adapter_load_failures_total{tier, reason}.
- Disk reads and validation run on the loader thread only; the bank is written on the caller
  of `bind` (the engine's worker) only.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

from adapters.adapter_set import AdapterSet
from adapters.bank import AdapterBank, BankError
from service.events import EngineEvents
from service.exceptions import AdapterLoadError, EngineError

log = logging.getLogger(__name__)
K = TypeVar("K", bound=Hashable)
_FAILURES_KEPT = 1024
# Transient load failures: retries, first delay (doubling), cap of one delay, and how long a
# failure is reported once the retries are spent (it is then forgotten: the next request
# tries again). About 1.5 s of retrying in all with the defaults.
LOAD_RETRIES = 4
RETRY_BASE_S = 0.1
RETRY_MAX_S = 2.0
COOL_DOWN_S = 5.0
# OSErrors that mean "out of a resource" rather than "the disk failed".
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOSPC})


def set_nbytes(adapter: AdapterSet) -> int:
    """Bytes of an adapter set's tensors (what it costs on the CPU tier)."""
    return sum(t.numel() * t.element_size() for t in adapter.tensors().values())


@dataclass(frozen=True)
class TierStats:
    """A snapshot of the tiers, for tests, the benchmarks and the metrics gauges."""

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


@dataclass
class _Failure:
    error: EngineError
    until: float | None  # monotonic time it is forgotten; None: final


def failure_reason(exc: BaseException) -> str:
    """The ctxpeft_adapter_load_failures_total reason of an exception raised by a load."""
    if isinstance(exc, EngineError):
        return str(getattr(exc, "load_failure", "invalid"))
    if isinstance(exc, BankError):
        return "invalid"
    if isinstance(exc, MemoryError | torch.OutOfMemoryError):
        return "resource"
    if isinstance(exc, OSError):
        return "resource" if exc.errno in _RESOURCE_ERRNOS else "io"
    return "other"


def _describe(exc: BaseException) -> str:
    """A short, path-free description for the client (the log has the full exception)."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"{type(exc).__name__} {errno.errorcode.get(exc.errno, exc.errno)}"
    return type(exc).__name__


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
        events: EngineEvents | None = None,
        on_change: Callable[[], None] | None = None,
        housekeeping: Callable[[], object] | None = None,
        housekeeping_s: float = 2.0,
        load_retries: int = LOAD_RETRIES,
        retry_base_s: float = RETRY_BASE_S,
        cool_down_s: float = COOL_DOWN_S,
    ) -> None:
        self.bank = bank
        self.load_retries = load_retries
        self.retry_base_s = retry_base_s
        self.cool_down_s = cool_down_s
        self.budget_bytes = budget_bytes
        self._load = load
        self._size_hint = size_hint
        self.events = events if events is not None else EngineEvents()
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
        self._failed: OrderedDict[K, _Failure] = OrderedDict()
        self._attempts: Counter[K] = Counter()  # failed transient attempts of a queued key
        self._retry_at: dict[K, float] = {}  # queued keys waiting for their backoff
        # device tier (worker thread writes)
        slots = bank.num_slots
        self._slot_of: dict[K, int] = {}
        self._owner: list[K | None] = [None] * slots
        self._pins = [0] * slots
        self._last_used = [0] * slots
        self._tick = 0
        self._closed = False
        self._thread = threading.Thread(target=self._loader, name="ctxpeft-loader", daemon=True)
        self._thread.start()

    # --- requests' interest (any thread) -------------------------------------------------
    def want(self, key: K, rows: int = 1) -> None:
        with self._cond:
            self._wanted[key] += rows
            self._touch(key)
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
                self._touch(key)
                return True
            self._request_load(key)
            return False

    def failure(self, key: K) -> EngineError | None:
        """Why `key` cannot be served now, if so: final for an invalid or gone version,
        for `cool_down_s` after transient failures. None while a load or retry is pending."""
        with self._cond:
            return self._current_failure(key)

    def failing(self) -> set[K]:
        """The keys that may be failing now (a superset of those `failure` reports): the
        step loop asks `failure` only for queued rows of these, so an idle failure list
        costs nothing per step."""
        with self._cond:
            return set(self._failed)

    def fail(self, key: K, error: EngineError) -> None:
        """Refuse `key` for good from now on (e.g. quarantined): `failure` reports `error`,
        so queued rows of it are answered with it, and it is never loaded again."""
        self._fail(key, error, until=None)

    def insert(self, key: K, adapter: AdapterSet) -> bool:
        """Put an already validated set on the CPU tier (e.g. just uploaded) if it fits,
        evicting unpinned entries least recently used first. It enters at the cold end: it
        has served nobody yet, so it is the next to go, ahead of entries that have served."""
        nbytes = set_nbytes(adapter)
        with self._cond:
            if key in self._cpu or not self._evict(nbytes):
                return False
            self._store(key, adapter, nbytes)
            self._cpu.move_to_end(key, last=False)
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
        if key in self._cpu or key in self._queued or self._current_failure(key) is not None:
            return
        if key in self._slot_of:
            return
        self._queued.add(key)
        self._pending.append(key)
        self._cond.notify_all()

    def _current_failure(self, key: K) -> EngineError | None:
        """The failure of `key` unless it has expired (lock held)."""
        failure = self._failed.get(key)
        if failure is None:
            return None
        if failure.until is not None and time.monotonic() >= failure.until:
            del self._failed[key]
            return None
        return failure.error

    def _touch(self, key: K) -> None:
        """Mark `key`'s CPU copy as just used (lock held)."""
        if key in self._cpu:
            self._cpu.move_to_end(key)

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
        self.events.resident("cpu", len(self._cpu))
        self.events.resident("device", len(self._slot_of))

    # --- loader thread ---------------------------------------------------------------------
    def _next_load(self, timeout: float) -> K | None:
        """The next version to read from disk, once it fits; None after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._closed:
                wake = self._due_retries()
                while self._pending:
                    key = self._pending[0]
                    if key in self._wanted and key not in self._cpu and key not in self._slot_of:
                        break
                    self._pending.popleft()  # nobody needs it any more
                    self._queued.discard(key)
                    self._attempts.pop(key, None)
                else:
                    key = None
                if key is not None:
                    need = self._size_hint(key)
                    pinned = self._pinned_bytes()
                    if pinned + need <= self.budget_bytes or pinned == 0:
                        self._pending.popleft()
                        return key
                left = min(deadline, wake) - time.monotonic()
                if left <= 0:
                    if time.monotonic() >= deadline:
                        return None
                    continue
                self._cond.wait(left)
        return None

    def _due_retries(self) -> float:
        """Queue the keys whose backoff is over (lock held); returns when the next is due."""
        now = time.monotonic()
        wake = float("inf")
        for key, at in list(self._retry_at.items()):
            if at <= now:
                del self._retry_at[key]
                self._pending.appendleft(key)
            else:
                wake = min(wake, at)
        return wake

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
        except Exception as exc:  # whatever it is, it must not kill the loader
            self._load_failed(key, exc)
            return
        seconds = time.perf_counter() - started
        nbytes = set_nbytes(adapter)
        with self._cond:
            self._queued.discard(key)
            self._attempts.pop(key, None)
            if key in self._cpu:  # inserted meanwhile (an upload of this very version)
                return
            if not self._evict(nbytes) and self._pinned_bytes() > 0:
                # Pinned sets grew while we read; read it again once room appears.
                self._queued.add(key)
                self._pending.appendleft(key)
                return
            self._store(key, adapter, nbytes)
            self._cond.notify_all()
        self.events.loaded("cpu", seconds)
        if self._on_change is not None:
            self._on_change()

    def _load_failed(self, key: K, exc: Exception) -> None:
        """Classify a failed disk load: final, retried after a backoff, or reported for a
        cool-down (see the module docstring)."""
        reason = failure_reason(exc)
        self.events.load_failed("cpu", reason)
        if isinstance(exc, EngineError):  # invalid or gone: versions are immutable
            self._fail(key, exc, until=None)
            return
        if reason in ("io", "resource"):
            with self._cond:
                self._attempts[key] += 1
                attempt = self._attempts[key]
                if attempt <= self.load_retries and not self._closed:
                    delay = min(self.retry_base_s * 2 ** (attempt - 1), RETRY_MAX_S)
                    self._retry_at[key] = time.monotonic() + delay
                    self._cond.notify_all()  # the loader recomputes when to wake up
                    log.warning(
                        "adapter load failed (%s), retry %d of %d in %.2f s: %s",
                        reason,
                        attempt,
                        self.load_retries,
                        delay,
                        exc,
                    )
                    return  # still queued: its requests keep waiting
            log.error("adapter load failed (%s) after %d retries: %s", reason, attempt - 1, exc)
            message = f"the adapter could not be read ({_describe(exc)}); try again later"
        else:
            log.error("adapter load failed unexpectedly", exc_info=exc)
            message = f"loading the adapter failed ({_describe(exc)}); try again later"
        error = AdapterLoadError(message, retry_after_s=self.cool_down_s)
        self._fail(key, error, until=time.monotonic() + self.cool_down_s)

    def _fail(self, key: K, error: EngineError, until: float | None) -> None:
        with self._cond:
            self._queued.discard(key)
            self._attempts.pop(key, None)
            self._retry_at.pop(key, None)
            self._failed[key] = _Failure(error, until)
            self._failed.move_to_end(key)
            while len(self._failed) > _FAILURES_KEPT:
                self._failed.popitem(last=False)
        if self._on_change is not None:
            self._on_change()

    # --- device tier (worker thread) -------------------------------------------------------
    def bind(self, keys: Iterable[K]) -> tuple[dict[K, int], dict[K, EngineError], list[K]]:
        """Give every key a bank slot and pin it once per row (worker thread).

        Returns (slot per key, keys that cannot be served with why, keys to put back in line:
        their CPU copy is not there any more, or no slot is free now). A key is in `slots`
        only once its weights are completely in its slot; a copy that raises fails that key
        alone (see the module docstring)."""
        rows = Counter(keys)
        slots: dict[K, int] = {}
        failed: dict[K, EngineError] = {}
        missing: list[K] = []
        copies: list[tuple[K, int, AdapterSet]] = []
        with self._cond:
            self._tick += 1
            # Resident keys first: their slots are used this call, so no other key of the
            # call takes one of them as its victim.
            for key in rows:
                if key in self._slot_of:
                    slots[key] = self._slot_of[key]
                    self._last_used[slots[key]] = self._tick
                    self._touch(key)
            for key in rows:
                if key in slots:
                    continue
                entry = self._cpu.get(key)
                slot = self._free_slot() if entry is not None else None
                if entry is None or slot is None:
                    missing.append(key)
                    continue
                self._touch(key)
                old = self._owner[slot]
                if old is not None:  # unmapped before its weights are overwritten
                    del self._slot_of[old]
                    self._owner[slot] = None
                self._last_used[slot] = self._tick  # reserved: no other key of this call
                copies.append((key, slot, entry.adapter))
        for key, slot, adapter in copies:
            started = time.perf_counter()
            try:
                self.bank.load(slot, adapter)
            except Exception as exc:  # any failure: this key alone, its slot left empty
                failed[key] = self._bind_failed(key, slot, exc)
                continue
            with self._cond:
                self._owner[slot] = key
                self._slot_of[key] = slot
            slots[key] = slot
            self.events.loaded("device", time.perf_counter() - started)
        with self._cond:
            for key, slot in slots.items():
                self._pins[slot] += rows[key]
            self._publish()
        return slots, failed, missing

    def _bind_failed(self, key: K, slot: int, exc: Exception) -> EngineError:
        """Clean up after a copy into `slot` raised; returns the error for `key`'s rows."""
        try:
            self.bank.clear(slot)
        except Exception:  # the slot is unmapped, so nobody reads it; the next load clears it
            log.exception("clearing device slot %d after a failed copy failed", slot)
        reason = failure_reason(exc)
        self.events.load_failed("device", reason)
        if isinstance(exc, BankError):  # the set does not fit this bank: final
            error = AdapterLoadError(str(exc))
            with self._cond:
                self._failed[key] = _Failure(error, until=None)
            return error
        log.error("copying an adapter into device slot %d failed", slot, exc_info=exc)
        return AdapterLoadError(
            f"the adapter could not be placed on the device ({_describe(exc)}); try again later",
            retry_after_s=1.0,
        )

    def _free_slot(self) -> int | None:
        """An empty slot, else the least recently used slot nobody pins and this bind call
        has not used; None when there is none (lock held)."""
        for slot, owner in enumerate(self._owner):
            if owner is None and self._last_used[slot] != self._tick:
                return slot
        candidates = [
            s
            for s in range(len(self._owner))
            if self._pins[s] == 0 and self._last_used[s] != self._tick
        ]
        if not candidates:
            return None
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
                cpu_loads=self.events.count("loads_cpu"),
                device_loads=self.events.count("loads_device"),
                failed=len(self._failed),
            )

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)
