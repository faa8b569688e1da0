"""The usage ledger: who used what, per tenant x adapter x API key x minute, in the service's
embedded database (`service.database`, component "usage"), so that it survives restarts.

    ledger = UsageLedger(Database(runtime / DATABASE_FILE))
    ledger.record(UsageRecord(tenant, adapter, key_id, "completed", prompt_tokens=17, ...))
    ledger.flush()                  # the flusher thread does this every `flush_s`, and close()
    buckets = ledger.query(UsageQuery(tenants=("acme",), start=t0, end=t1, width=3600,
                                      group_by=("adapter",)))

Records are added to an in-memory table on the caller's thread (a dict update under a lock:
nothing on the hot path touches the disk) and written in batches by a flusher thread: one
transaction adds each bucket's counts to its row (INSERT ... ON CONFLICT DO UPDATE SET
n = n + excluded.n). The pending table is swapped out before the write and merged back if the
write fails, so every record is added exactly once: a crash loses at most the last `flush_s`
seconds (a drain flushes them first), a restart never counts anything twice.

What one record carries: the request's outcome (`completed`, `failed`, `rejected`,
`cancelled`, `deadline`), and for a completed caption its prompt, image and completion
tokens, whether its image encoding came from the cache (an encoder pass saved), and the engine
compute time attributed to it; fine-tuning jobs add their trained tokens.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from service.database import Database

log = logging.getLogger(__name__)
COMPONENT = "usage"
MINUTE = 60
Outcome = Literal["completed", "failed", "rejected", "cancelled", "deadline"]
OUTCOMES: tuple[Outcome, ...] = ("completed", "failed", "rejected", "cancelled", "deadline")
GROUPS = ("adapter", "key", "tenant")  # what a query may group by
# The counted columns, in this order everywhere (table, record, bucket result).
COUNTS = (
    "requests",
    "prompt_tokens",
    "image_tokens",
    "completion_tokens",
    "cached_images",
    "compute_ms",
    "training_tokens",
)

MIGRATIONS = [
    """
    CREATE TABLE usage_buckets (
        tenant TEXT NOT NULL,
        adapter TEXT NOT NULL,
        key_id TEXT NOT NULL,
        minute INTEGER NOT NULL,
        outcome TEXT NOT NULL,
        requests INTEGER NOT NULL DEFAULT 0,
        prompt_tokens INTEGER NOT NULL DEFAULT 0,
        image_tokens INTEGER NOT NULL DEFAULT 0,
        completion_tokens INTEGER NOT NULL DEFAULT 0,
        cached_images INTEGER NOT NULL DEFAULT 0,
        compute_ms REAL NOT NULL DEFAULT 0,
        training_tokens INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (tenant, adapter, key_id, minute, outcome)
    );
    CREATE INDEX usage_by_time ON usage_buckets (minute, tenant)
    """
]


@dataclass(frozen=True)
class UsageRecord:
    """One request's use of one adapter (or one training job's tokens)."""

    tenant: str
    adapter: str  # "owner/name" of the adapter version served (the tenant's own or public)
    key_id: str  # which of the tenant's API keys (service.auth.Principal.key_id)
    outcome: Outcome
    prompt_tokens: int = 0
    image_tokens: int = 0
    completion_tokens: int = 0
    cached_image: bool = False
    compute_s: float = 0.0
    training_tokens: int = 0
    at: float = field(default_factory=time.time)


_Key = tuple[str, str, str, int, str]


@dataclass
class _Counts:
    requests: int = 0
    prompt_tokens: int = 0
    image_tokens: int = 0
    completion_tokens: int = 0
    cached_images: int = 0
    compute_ms: float = 0.0
    training_tokens: int = 0

    def add(self, other: _Counts) -> None:
        for name in COUNTS:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def values(self) -> tuple[float, ...]:
        return tuple(getattr(self, name) for name in COUNTS)


@dataclass(frozen=True)
class UsageQuery:
    tenants: tuple[str, ...] | None  # None: every tenant (an operator's query)
    start: int  # unix seconds, inclusive
    end: int  # unix seconds, exclusive
    width: int  # bucket width in seconds (60, 3600 or 86400)
    group_by: tuple[str, ...] = ()


@dataclass(frozen=True)
class UsageBucket:
    start: int
    end: int
    results: list[dict[str, object]]


class UsageLedger:
    def __init__(self, db: Database, flush_s: float = 5.0) -> None:
        self.db = db
        self.flush_s = flush_s
        db.migrate(COMPONENT, MIGRATIONS)
        self._lock = threading.Lock()
        self._pending: dict[_Key, _Counts] = {}
        self._flushing = threading.Lock()  # one write at a time (the flusher, close)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._flusher, name="ctxpeft-usage", daemon=True)
        self._thread.start()

    # --- recording (any thread) --------------------------------------------------------------
    def record(self, record: UsageRecord) -> None:
        minute = int(record.at) // MINUTE * MINUTE
        key = (record.tenant, record.adapter, record.key_id, minute, record.outcome)
        counts = _Counts(
            requests=1 if record.training_tokens == 0 else 0,
            prompt_tokens=record.prompt_tokens,
            image_tokens=record.image_tokens,
            completion_tokens=record.completion_tokens,
            cached_images=1 if record.cached_image else 0,
            compute_ms=record.compute_s * 1000,
            training_tokens=record.training_tokens,
        )
        with self._lock:
            self._pending.setdefault(key, _Counts()).add(counts)

    # --- writing -------------------------------------------------------------------------------
    def flush(self) -> int:
        """Write what is pending in one transaction; returns the buckets written."""
        with self._flushing:
            with self._lock:
                pending, self._pending = self._pending, {}
            if not pending:
                return 0
            columns = ", ".join(COUNTS)
            updates = ", ".join(f"{c} = {c} + excluded.{c}" for c in COUNTS)
            sql = (
                f"INSERT INTO usage_buckets (tenant, adapter, key_id, minute, outcome, {columns})"
                f" VALUES (?, ?, ?, ?, ?, {', '.join('?' * len(COUNTS))})"
                f" ON CONFLICT (tenant, adapter, key_id, minute, outcome) DO UPDATE SET {updates}"
            )
            try:
                with self.db.transaction() as conn:
                    conn.executemany(sql, [(*key, *c.values()) for key, c in pending.items()])
            except Exception:
                with self._lock:  # nothing was written: keep it for the next flush
                    for key, counts in pending.items():
                        self._pending.setdefault(key, _Counts()).add(counts)
                raise
            return len(pending)

    def _flusher(self) -> None:
        while not self._stop.wait(self.flush_s):
            try:
                self.flush()
            except Exception:  # kept pending: retried at the next period
                log.exception("writing the usage ledger failed; retrying")

    def close(self) -> None:
        """Stop the flusher and write what is pending."""
        self._stop.set()
        self._thread.join(timeout=10)
        self.flush()

    # --- reading -------------------------------------------------------------------------------
    def query(self, q: UsageQuery) -> list[UsageBucket]:
        """Buckets of `q.width` seconds from `q.start` to `q.end`, each with one result per
        group (`group_by` of adapter, key, tenant): the sums of every count, and the requests
        by outcome. Buckets with nothing in them are left out."""
        self.flush()
        groups = [g for g in GROUPS if g in q.group_by]
        columns = {"adapter": "adapter", "key": "key_id", "tenant": "tenant"}
        select = ", ".join(columns[g] for g in groups)
        where = ["minute >= ?", "minute < ?"]
        params: list[object] = [q.start - q.start % MINUTE, q.end]
        if q.tenants is not None:
            where.append(f"tenant IN ({', '.join('?' * len(q.tenants))})")
            params += list(q.tenants)
        bucket = f"(minute - {q.start}) / {q.width}"
        sums = ", ".join(f"SUM({c}) AS {c}" for c in COUNTS)
        sql = (
            f"SELECT {bucket} AS bucket, outcome, {select + ', ' if select else ''}{sums}"
            f" FROM usage_buckets WHERE {' AND '.join(where)}"
            f" GROUP BY bucket, outcome{', ' + select if select else ''}"
            f" ORDER BY bucket{', ' + select if select else ''}"
        )
        buckets: dict[int, dict[tuple[object, ...], dict[str, object]]] = {}
        for row in self.db.query(sql, params):
            index = int(row["bucket"])
            group = tuple(row[columns[g]] for g in groups)
            result = buckets.setdefault(index, {}).setdefault(group, _empty_result(groups, group))
            by_outcome = result["requests_by_outcome"]
            assert isinstance(by_outcome, dict)
            by_outcome[row["outcome"]] = int(row["requests"])
            for name in COUNTS:
                if name != "requests":
                    value = row[name] or 0
                    result[name] = result[name] + value  # type: ignore[operator]
        return [
            UsageBucket(
                q.start + index * q.width,
                q.start + (index + 1) * q.width,
                list(results.values()),
            )
            for index, results in sorted(buckets.items())
        ]


def _empty_result(groups: Sequence[str], group: tuple[object, ...]) -> dict[str, object]:
    result: dict[str, object] = dict.fromkeys(GROUPS)
    result.update(zip(groups, group, strict=True))
    result.update({name: 0 for name in COUNTS if name != "requests"})
    result["compute_ms"] = 0.0
    result["requests_by_outcome"] = {}
    return result
