"""Fine-tuning jobs, their events and checkpoints: rows in the service database.

The job row is the one source of truth the API answers from; the supervisor
(`service.jobs.manager`) is the only writer of `status` after creation, except for the
transitions a request makes directly (cancel or pause of a job that is not running).

Status (exactly the six of OpenAI's `FineTuningJob.status`):

    validating_files -> queued -> running -> succeeded | failed | cancelled
                          ^          |
                          +----------+  paused (the `paused_at` extension field is set),
                                        or interrupted by a service restart

A paused job is `queued` with `paused_at` set: it holds no training process and is not
started until resumed (docs/ARCHITECTURE.md says why it is not a seventh status).
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from service.database import Database

Status = Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled"]
FINAL: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
ACTIVE: frozenset[str] = frozenset({"validating_files", "queued", "running"})
Level = Literal["info", "warn", "error"]

JOBS_MIGRATIONS = [
    """
    CREATE TABLE jobs (
        id TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        seq INTEGER NOT NULL,
        model TEXT NOT NULL,
        training_file TEXT NOT NULL,
        validation_file TEXT,
        training_sha256 TEXT NOT NULL,
        validation_sha256 TEXT,
        status TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        started_at INTEGER,
        finished_at INTEGER,
        error TEXT,
        adapter_name TEXT NOT NULL,
        fine_tuned_model TEXT,
        suffix TEXT,
        seed INTEGER NOT NULL,
        metadata TEXT,
        hyperparameters TEXT NOT NULL,
        requested TEXT NOT NULL,
        adapter TEXT NOT NULL,
        estimated_tokens INTEGER NOT NULL,
        trained_tokens INTEGER,
        tokens_so_far INTEGER NOT NULL DEFAULT 0,
        control TEXT,
        paused_at INTEGER,
        attempts INTEGER NOT NULL DEFAULT 0,
        events_offset INTEGER NOT NULL DEFAULT 0,
        estimated_finish INTEGER
    );
    CREATE INDEX jobs_by_tenant ON jobs (tenant, seq);
    CREATE INDEX jobs_by_status ON jobs (status, seq);
    CREATE TABLE job_events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        job_id TEXT NOT NULL REFERENCES jobs (id),
        created_at INTEGER NOT NULL,
        level TEXT NOT NULL,
        message TEXT NOT NULL,
        type TEXT NOT NULL,
        data TEXT
    );
    CREATE INDEX job_events_by_job ON job_events (job_id, seq);
    CREATE TABLE job_checkpoints (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        job_id TEXT NOT NULL REFERENCES jobs (id),
        created_at INTEGER NOT NULL,
        step INTEGER NOT NULL,
        epoch INTEGER NOT NULL,
        metrics TEXT NOT NULL
    );
    CREATE INDEX job_checkpoints_by_job ON job_checkpoints (job_id, seq);
    """,
]


class JobNotFound(LookupError):
    """No such job for this tenant (another tenant's job is not found either)."""


@dataclass(frozen=True)
class JobError:
    code: str
    message: str
    param: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "param": self.param}


@dataclass(frozen=True)
class Job:
    id: str
    tenant: str
    seq: int
    model: str
    training_file: str
    validation_file: str | None
    training_sha256: str
    validation_sha256: str | None
    status: Status
    created_at: int
    started_at: int | None
    finished_at: int | None
    error: JobError | None
    adapter_name: str  # the name the adapter is published under (fine_tuned_model)
    fine_tuned_model: str | None  # set once it is published
    suffix: str | None
    seed: int
    metadata: dict[str, str] | None
    hyperparameters: dict[str, Any]  # resolved: n_epochs, batch_size, learning_rate_multiplier
    requested: dict[str, Any]  # as asked ("auto" or a value)
    adapter: dict[str, Any]  # method, contexts, rank, alpha, targets (the extension field)
    estimated_tokens: int
    trained_tokens: int | None
    tokens_so_far: int
    control: str | None  # "cancel" or "pause", asked and not yet done by the worker
    paused_at: int | None
    attempts: int  # restarts of the service it was interrupted by (jobs_max_restarts)
    events_offset: int
    estimated_finish: int | None

    @property
    def final(self) -> bool:
        return self.status in FINAL

    @property
    def short_id(self) -> str:
        return self.id.removeprefix("ftjob-")[:8]


@dataclass(frozen=True)
class Event:
    id: str
    created_at: int
    level: Level
    message: str
    type: Literal["message", "metrics"]
    data: dict[str, Any] | None


@dataclass(frozen=True)
class Checkpoint:
    id: str
    job_id: str
    created_at: int
    step: int
    epoch: int
    metrics: dict[str, Any] = field(default_factory=dict)


def new_job_id() -> str:
    return f"ftjob-{secrets.token_hex(12)}"


class JobStore:
    """Reads and writes of the job tables (thread-safe through the database's lock)."""

    def __init__(self, db: Database) -> None:
        self.db = db
        db.migrate("jobs", JOBS_MIGRATIONS)

    # --- jobs ---------------------------------------------------------------------------------
    def insert(self, job: Job) -> Job:
        with self.db.transaction() as conn:
            seq = conn.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs").fetchone()[0]
            values = _row_values(job)
            values["seq"] = seq
            columns = ", ".join(values)
            marks = ", ".join("?" for _ in values)
            conn.execute(f"INSERT INTO jobs ({columns}) VALUES ({marks})", list(values.values()))
        return self.get_any(job.id)

    def get(self, tenant: str, job_id: str) -> Job:
        row = self.db.query_one("SELECT * FROM jobs WHERE tenant = ? AND id = ?", (tenant, job_id))
        if row is None:
            raise JobNotFound(f"no fine-tuning job {job_id!r}")
        return _job(row)

    def get_any(self, job_id: str) -> Job:
        row = self.db.query_one("SELECT * FROM jobs WHERE id = ?", (job_id,))
        if row is None:
            raise JobNotFound(f"no fine-tuning job {job_id!r}")
        return _job(row)

    def page(
        self,
        tenant: str,
        after: str | None = None,
        limit: int = 20,
        metadata: dict[str, str] | None = None,
    ) -> tuple[list[Job], bool]:
        """A page of the tenant's jobs, newest first; (jobs, has_more)."""
        sql = "SELECT * FROM jobs WHERE tenant = ?"
        params: list[Any] = [tenant]
        if after is not None:
            sql += " AND seq < ?"
            params.append(self.get(tenant, after).seq)
        rows = self.db.query(sql + " ORDER BY seq DESC", params)
        jobs = [_job(r) for r in rows]
        if metadata:
            jobs = [
                j for j in jobs if all((j.metadata or {}).get(k) == v for k, v in metadata.items())
            ]
        return jobs[:limit], len(jobs) > limit

    def with_status(self, *statuses: str) -> list[Job]:
        marks = ", ".join("?" for _ in statuses)
        rows = self.db.query(f"SELECT * FROM jobs WHERE status IN ({marks}) ORDER BY seq", statuses)
        return [_job(r) for r in rows]

    def update(self, job_id: str, **changes: Any) -> Job:
        """Change fields of a job (JSON fields are encoded here)."""
        values = _encode(changes)
        assignments = ", ".join(f"{name} = ?" for name in values)
        self.db.execute(f"UPDATE jobs SET {assignments} WHERE id = ?", [*values.values(), job_id])
        return self.get_any(job_id)

    def update_if(self, job_id: str, statuses: set[str], **changes: Any) -> Job | None:
        """`update` only while the job's status is one of `statuses` (checked in the same
        transaction); None when it was not."""
        values = _encode(changes)
        assignments = ", ".join(f"{name} = ?" for name in values)
        marks = ", ".join("?" for _ in statuses)
        changed = self.db.execute(
            f"UPDATE jobs SET {assignments} WHERE id = ? AND status IN ({marks})",
            [*values.values(), job_id, *statuses],
        )
        return self.get_any(job_id) if changed else None

    def names_in_use(self, tenant: str) -> set[str]:
        rows = self.db.query("SELECT adapter_name FROM jobs WHERE tenant = ?", (tenant,))
        return {r["adapter_name"] for r in rows}

    def active_shas(self) -> set[str]:
        rows = self.db.query(
            "SELECT training_sha256, validation_sha256 FROM jobs WHERE status IN (?, ?, ?)",
            tuple(ACTIVE),
        )
        found = {r["training_sha256"] for r in rows}
        found |= {r["validation_sha256"] for r in rows if r["validation_sha256"]}
        return found

    def tokens_since(self, tenant: str, since: int) -> list[tuple[int, int]]:
        """(created_at, tokens) of the tenant's jobs created since `since`: the estimate for
        jobs still to run, what was trained for the others."""
        rows = self.db.query(
            "SELECT created_at, status, estimated_tokens, tokens_so_far, trained_tokens "
            "FROM jobs WHERE tenant = ? AND created_at >= ? ORDER BY created_at",
            (tenant, since),
        )
        out = []
        for r in rows:
            if r["status"] in ACTIVE:
                tokens = r["estimated_tokens"]
            elif r["trained_tokens"] is not None:
                tokens = r["trained_tokens"]
            else:
                tokens = r["tokens_so_far"]
            out.append((int(r["created_at"]), int(tokens)))
        return out

    # --- events and checkpoints ---------------------------------------------------------------
    def add_events(
        self,
        job_id: str,
        events: list[tuple[Level, str, str, dict[str, Any] | None]],
        **job_changes: Any,
    ) -> None:
        """Append (level, message, type, data) events, and change the job in the same
        transaction (e.g. the events file offset they were read up to)."""
        now = int(time.time())
        with self.db.transaction() as conn:
            for level, message, kind, data in events:
                conn.execute(
                    "INSERT INTO job_events (id, job_id, created_at, level, message, type, data) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        f"ftevent-{secrets.token_hex(12)}",
                        job_id,
                        now,
                        level,
                        message,
                        kind,
                        None if data is None else json.dumps(data),
                    ),
                )
            if job_changes:
                values = _encode(job_changes)
                assignments = ", ".join(f"{name} = ?" for name in values)
                conn.execute(
                    f"UPDATE jobs SET {assignments} WHERE id = ?", [*values.values(), job_id]
                )

    def event(
        self, job_id: str, message: str, level: Level = "info", data: dict[str, Any] | None = None
    ) -> None:
        self.add_events(job_id, [(level, message, "message", data)])

    def events(self, job_id: str, after: str | None, limit: int) -> tuple[list[Event], bool]:
        """A page of a job's events, newest first (as OpenAI lists them)."""
        sql = "SELECT * FROM job_events WHERE job_id = ?"
        params: list[Any] = [job_id]
        if after is not None:
            cursor = self.db.query_one(
                "SELECT seq FROM job_events WHERE job_id = ? AND id = ?", (job_id, after)
            )
            if cursor is None:
                raise JobNotFound(f"no event {after!r} of this job (the `after` cursor)")
            sql += " AND seq < ?"
            params.append(cursor["seq"])
        rows = self.db.query(sql + " ORDER BY seq DESC LIMIT ?", [*params, limit + 1])
        events = [
            Event(
                r["id"],
                int(r["created_at"]),
                r["level"],
                r["message"],
                r["type"],
                None if r["data"] is None else json.loads(r["data"]),
            )
            for r in rows[:limit]
        ]
        return events, len(rows) > limit

    def add_checkpoint(self, job_id: str, step: int, epoch: int, metrics: dict[str, Any]) -> None:
        self.db.execute(
            "INSERT INTO job_checkpoints (id, job_id, created_at, step, epoch, metrics) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (f"ftckpt-{secrets.token_hex(12)}", job_id, int(time.time()), step, epoch,
             json.dumps(metrics)),
        )  # fmt: skip

    def checkpoints(
        self, job_id: str, after: str | None, limit: int
    ) -> tuple[list[Checkpoint], bool]:
        sql = "SELECT * FROM job_checkpoints WHERE job_id = ?"
        params: list[Any] = [job_id]
        if after is not None:
            cursor = self.db.query_one(
                "SELECT seq FROM job_checkpoints WHERE job_id = ? AND id = ?", (job_id, after)
            )
            if cursor is None:
                raise JobNotFound(f"no checkpoint {after!r} of this job (the `after` cursor)")
            sql += " AND seq < ?"
            params.append(cursor["seq"])
        rows = self.db.query(sql + " ORDER BY seq DESC LIMIT ?", [*params, limit + 1])
        found = [
            Checkpoint(
                r["id"],
                r["job_id"],
                int(r["created_at"]),
                int(r["step"]),
                int(r["epoch"]),
                json.loads(r["metrics"]),
            )
            for r in rows[:limit]
        ]
        return found, len(rows) > limit


_JSON_FIELDS = ("error", "metadata", "hyperparameters", "requested", "adapter")


def _encode(changes: dict[str, Any]) -> dict[str, Any]:
    values = {}
    for name, value in changes.items():
        if name == "error" and isinstance(value, JobError):
            value = value.to_json()
        if name in _JSON_FIELDS and value is not None:
            value = json.dumps(value)
        values[name] = value
    return values


def _row_values(job: Job) -> dict[str, Any]:
    values = {name: getattr(job, name) for name in Job.__dataclass_fields__}
    return _encode(values)


def _job(row: Any) -> Job:
    values = dict(row)
    for name in _JSON_FIELDS:
        if values[name] is not None:
            values[name] = json.loads(values[name])
    if values["error"] is not None:
        values["error"] = JobError(**values["error"])
    return Job(**values)
