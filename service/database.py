"""The service's embedded database: one SQLite file in the runtime folder, shared by the
components that keep state across restarts (files and fine-tuning jobs now; the usage ledger
later), each owning its tables and its own ordered list of migrations.

    db = Database(settings.runtime_dir / DATABASE_FILE)
    db.migrate("jobs", JOBS_MIGRATIONS)          # applies the ones this file has not seen yet
    with db.transaction() as conn:               # BEGIN IMMEDIATE ... COMMIT (or ROLLBACK)
        conn.execute("INSERT INTO ...", (...))
    rows = db.query("SELECT ... WHERE tenant = ?", (tenant,))

Why SQLite (stdlib `sqlite3`, no server): the state is small (rows per file, job, event), is
written by one process (the service; a training process never writes it, it reports through
files its supervisor reads) and must survive a restart or a power cut. WAL mode lets readers
(the routes) go on while the supervisor writes; `synchronous=NORMAL` in WAL mode keeps every
committed transaction across a process crash and loses at most the last ones on a power cut,
never corrupts. One connection is shared by the process behind a lock: every statement is
short (no statement waits on anything but the disk), so a pool would only add contention.

Migrations: `schema_migrations(component, version)` records what has been applied. A
component's migrations are a list of SQL scripts (or callables taking the connection); the
n-th entry is version n. `migrate` applies the missing ones in order, each in its own
transaction together with its row in `schema_migrations`, so a crash between two leaves the
database at a version it can resume from. A database written by a newer build (a version this
build does not know) is refused rather than misread.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

DATABASE_FILE = "ctxpeft.db"
BUSY_TIMEOUT_MS = 10_000

Migration = str | Callable[[sqlite3.Connection], None]


class DatabaseError(RuntimeError):
    """The database cannot be used (a schema from a newer build, an unreadable file)."""


class Database:
    """One SQLite database file; thread-safe (one shared connection behind a lock)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(
            self.path, check_same_thread=False, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000
        )
        self._conn.row_factory = sqlite3.Row
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            self._conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " component TEXT NOT NULL, version INTEGER NOT NULL, applied_at REAL NOT NULL,"
                " PRIMARY KEY (component, version))"
            )

    # --- migrations ------------------------------------------------------------------------
    def version(self, component: str) -> int:
        row = self.query_one(
            "SELECT MAX(version) AS v FROM schema_migrations WHERE component = ?", (component,)
        )
        return int(row["v"]) if row is not None and row["v"] is not None else 0

    def migrate(self, component: str, migrations: Sequence[Migration]) -> int:
        """Apply `component`'s migrations this database has not seen, in order; returns the
        version it is at. Raises DatabaseError for a version newer than `migrations` knows."""
        with self._lock:
            current = self.version(component)
            if current > len(migrations):
                raise DatabaseError(
                    f"{self.path}: {component!r} is at schema version {current}, newer than "
                    f"this build knows ({len(migrations)}); run the newer build or restore a "
                    "backup"
                )
            for number, migration in enumerate(migrations[current:], start=current + 1):
                with self.transaction() as conn:
                    if isinstance(migration, str):
                        for statement in _statements(migration):
                            conn.execute(statement)
                    else:
                        migration(conn)
                    conn.execute(
                        "INSERT INTO schema_migrations (component, version, applied_at) "
                        "VALUES (?, ?, ?)",
                        (component, number, time.time()),
                    )
            return len(migrations)

    # --- statements ------------------------------------------------------------------------
    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE (the write lock is taken at once: no deadlock between two
        upgrading readers) ... COMMIT, or ROLLBACK on any exception."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """One write statement in its own transaction; returns the rows it changed."""
        with self.transaction() as conn:
            return conn.execute(sql, params).rowcount

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return list(self._conn.execute(sql, params).fetchall())

    def query_one(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Row | None:
        with self._lock:
            row: sqlite3.Row | None = self._conn.execute(sql, params).fetchone()
            return row

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def _statements(script: str) -> list[str]:
    """The statements of a migration script (split on `;` at line ends; no triggers)."""
    return [part.strip() for part in script.split(";\n") if part.strip().strip(";")]
