"""The usage ledger on a real SQLite file: records are written in batches exactly once (a
failed write keeps them, a reopened ledger adds to what is stored, nothing counts twice), and
queries sum them into time buckets by group."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from service.database import Database
from service.usage import UsageLedger, UsageQuery, UsageRecord

T0 = 1_800_000_000  # a whole minute, well in the future of any test machine's clock


def caption(tenant: str, adapter: str, at: float, tokens: int, cached: bool = False) -> UsageRecord:
    return UsageRecord(
        tenant,
        adapter,
        "key1",
        "completed",
        prompt_tokens=17,
        image_tokens=16,
        completion_tokens=tokens,
        cached_image=cached,
        compute_s=0.25,
        at=at,
    )


def test_records_are_summed_into_buckets_by_group(tmp_path: Path) -> None:
    ledger = UsageLedger(Database(tmp_path / "db"), flush_s=3600)
    try:
        ledger.record(caption("acme", "acme/news", T0 + 5, 4))
        ledger.record(caption("acme", "acme/news", T0 + 70, 6, cached=True))
        ledger.record(caption("acme", "public/describe", T0 + 3700, 2))
        ledger.record(UsageRecord("acme", "acme/news", "key1", "rejected", at=T0 + 3710))
        ledger.record(caption("beta", "beta/x", T0 + 10, 9))
        hourly = ledger.query(UsageQuery(("acme",), T0, T0 + 7200, 3600, ("adapter",)))
    finally:
        ledger.close()
    assert [(b.start, b.end) for b in hourly] == [(T0, T0 + 3600), (T0 + 3600, T0 + 7200)]
    first = {r["adapter"]: r for r in hourly[0].results}
    assert set(first) == {"acme/news"}  # beta's usage is not acme's
    news = first["acme/news"]
    assert news["completion_tokens"] == 10 and news["prompt_tokens"] == 34
    assert news["cached_images"] == 1 and news["compute_ms"] == pytest.approx(500.0)
    assert news["requests_by_outcome"] == {"completed": 2}
    second = {r["adapter"]: r for r in hourly[1].results}
    assert second["public/describe"]["completion_tokens"] == 2
    assert second["acme/news"]["requests_by_outcome"] == {"rejected": 1}


def test_nothing_is_lost_or_counted_twice_across_a_failed_write_and_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "db"
    ledger = UsageLedger(Database(path), flush_s=3600)
    ledger.record(caption("acme", "acme/news", T0, 3))
    real = ledger.db.transaction

    def failing() -> object:
        raise sqlite3.OperationalError("disk I/O error (injected)")

    monkeypatch.setattr(ledger.db, "transaction", failing)
    with pytest.raises(sqlite3.OperationalError):
        ledger.flush()
    monkeypatch.setattr(ledger.db, "transaction", real)
    ledger.record(caption("acme", "acme/news", T0 + 1, 4))
    assert ledger.flush() == 1  # the kept record and the new one, in one bucket
    ledger.close()  # nothing pending: writes nothing more
    reopened = UsageLedger(Database(path), flush_s=3600)  # a restart
    try:
        reopened.record(caption("acme", "acme/news", T0 + 2, 5))
        (bucket,) = reopened.query(UsageQuery(("acme",), T0, T0 + 60, 60))
    finally:
        reopened.close()
    (result,) = bucket.results
    assert result["completion_tokens"] == 3 + 4 + 5
    assert result["requests_by_outcome"] == {"completed": 3}
