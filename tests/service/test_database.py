"""The embedded database: migrations per component, in order, once; transactions."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from service.database import Database, DatabaseError


def test_each_component_migrates_in_order_once(tmp_path: Path) -> None:
    db = Database(tmp_path / "x.db")
    applied: list[str] = []

    def second(conn: sqlite3.Connection) -> None:
        applied.append("second")
        conn.execute("ALTER TABLE things ADD COLUMN size INTEGER NOT NULL DEFAULT 0")

    steps = [
        "CREATE TABLE things (name TEXT PRIMARY KEY);\nCREATE INDEX t ON things (name);",
        second,
    ]
    assert db.migrate("things", steps) == 2
    assert db.migrate("things", steps) == 2  # nothing again
    assert applied == ["second"]
    assert db.migrate("other", ["CREATE TABLE other (x INTEGER)"]) == 1
    assert (db.version("things"), db.version("other")) == (2, 1)
    db.execute("INSERT INTO things (name, size) VALUES (?, ?)", ("a", 3))
    db.close()

    # A later build adds a third migration: only it runs, on the data already there.
    again = Database(tmp_path / "x.db")
    assert again.migrate("things", [*steps, "ALTER TABLE things ADD COLUMN color TEXT"]) == 3
    row = again.query_one("SELECT name, size, color FROM things")
    assert row is not None and tuple(row) == ("a", 3, None)


def test_a_failed_migration_leaves_the_previous_version(tmp_path: Path) -> None:
    db = Database(tmp_path / "x.db")
    with pytest.raises(sqlite3.OperationalError):
        db.migrate("c", ["CREATE TABLE a (x INTEGER)", "CREATE TABLE a (x INTEGER)"])
    assert db.version("c") == 1
    assert db.migrate("c", ["CREATE TABLE a (x INTEGER)", "CREATE TABLE b (x INTEGER)"]) == 2


def test_a_database_of_a_newer_build_is_refused(tmp_path: Path) -> None:
    db = Database(tmp_path / "x.db")
    db.migrate("jobs", ["CREATE TABLE a (x INTEGER)", "CREATE TABLE b (x INTEGER)"])
    with pytest.raises(DatabaseError, match="newer than this build knows"):
        db.migrate("jobs", ["CREATE TABLE a (x INTEGER)"])


def test_transactions_roll_back_and_threads_share_the_connection(tmp_path: Path) -> None:
    db = Database(tmp_path / "x.db")
    db.migrate("n", ["CREATE TABLE n (v INTEGER)"])
    with pytest.raises(RuntimeError), db.transaction() as conn:
        conn.execute("INSERT INTO n VALUES (1)")
        raise RuntimeError("abort")
    assert db.query("SELECT * FROM n") == []

    def add() -> None:
        for value in range(50):
            db.execute("INSERT INTO n VALUES (?)", (value,))

    threads = [threading.Thread(target=add) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    row = db.query_one("SELECT COUNT(*) AS c FROM n")
    assert row is not None and row["c"] == 200
    mode = db.query_one("PRAGMA journal_mode")
    assert mode is not None and mode[0] == "wal"
