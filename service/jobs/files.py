"""Uploaded files (`/v1/files`): rows in the service database, bytes on disk by content.

    files = FileStore(db, runtime_dir / "files")
    record = files.add(tenant, "train.jsonl", "fine-tune", temp_path, sha256, summary)
    files.get(tenant, record.id)         # FileNotFound for another tenant's id, as for none
    files.path(record)                   # <root>/blobs/ab/abcdef...: the bytes

Bytes are stored once per content (`blobs/<sha256[:2]>/<sha256>`, written by an atomic rename
of a fully written, fsynced temporary file), so two tenants uploading the same file share the
blob but never see each other's row: every query is by (tenant, id). A blob is removed when no
file row and no unfinished job refers to it any more (`collect`). Ids are random (`file-` +
24 hex digits): they reveal nothing and cannot be guessed.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.database import Database

FILES_MIGRATIONS = [
    """
    CREATE TABLE files (
        id TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        filename TEXT NOT NULL,
        purpose TEXT NOT NULL,
        bytes INTEGER NOT NULL,
        sha256 TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        seq INTEGER NOT NULL,
        summary TEXT NOT NULL
    );
    CREATE INDEX files_by_tenant ON files (tenant, seq);
    CREATE INDEX files_by_sha ON files (sha256);
    """,
]


class FileNotFound(LookupError):
    """No such file for this tenant (another tenant's file is not found either)."""


@dataclass(frozen=True)
class FileSummary:
    """What validation found in a training file (shown as `training_data` on the file)."""

    format: str
    examples: int
    images: int
    tokens_per_epoch: int | None  # caption tokens + 1 per example (None: no tokenizer)
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "examples": self.examples,
            "images": self.images,
            "tokens_per_epoch": self.tokens_per_epoch,
            "warnings": list(self.warnings),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FileSummary:
        return cls(
            data["format"],
            int(data["examples"]),
            int(data["images"]),
            None if data.get("tokens_per_epoch") is None else int(data["tokens_per_epoch"]),
            list(data.get("warnings") or []),
        )


@dataclass(frozen=True)
class FileRecord:
    id: str
    tenant: str
    filename: str
    purpose: str
    bytes: int
    sha256: str
    created_at: int
    summary: FileSummary


class FileStore:
    def __init__(self, db: Database, root: Path) -> None:
        self.db = db
        self.root = Path(root)
        db.migrate("files", FILES_MIGRATIONS)
        (self.root / "tmp").mkdir(parents=True, exist_ok=True)

    # --- bytes ------------------------------------------------------------------------------
    def temp_path(self) -> Path:
        """A fresh temporary file name inside the store (same file system as the blobs)."""
        return self.root / "tmp" / f"upload-{secrets.token_hex(8)}"

    def blob(self, sha256: str) -> Path:
        return self.root / "blobs" / sha256[:2] / sha256

    def path(self, record: FileRecord) -> Path:
        return self.blob(record.sha256)

    def _keep(self, temp: Path, sha256: str) -> None:
        target = self.blob(sha256)
        if target.is_file():
            temp.unlink(missing_ok=True)
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(temp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temp, target)
        fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # --- rows -------------------------------------------------------------------------------
    def add(
        self,
        tenant: str,
        filename: str,
        purpose: str,
        temp: Path,
        sha256: str,
        size: int,
        summary: FileSummary,
    ) -> FileRecord:
        """Keep the uploaded bytes (moved from `temp`) and record the file."""
        self._keep(temp, sha256)
        record = FileRecord(
            f"file-{secrets.token_hex(12)}",
            tenant,
            filename,
            purpose,
            size,
            sha256,
            int(time.time()),
            summary,
        )
        with self.db.transaction() as conn:
            seq = conn.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM files").fetchone()[0]
            conn.execute(
                "INSERT INTO files (id, tenant, filename, purpose, bytes, sha256, created_at, "
                "seq, summary) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.id,
                    tenant,
                    filename,
                    purpose,
                    size,
                    sha256,
                    record.created_at,
                    seq,
                    json.dumps(summary.to_json()),
                ),
            )
        return record

    def get(self, tenant: str, file_id: str) -> FileRecord:
        row = self.db.query_one(
            "SELECT * FROM files WHERE tenant = ? AND id = ?", (tenant, file_id)
        )
        if row is None:
            raise FileNotFound(f"no file {file_id!r}")
        return _record(row)

    def page(
        self,
        tenant: str,
        after: str | None = None,
        limit: int = 10_000,
        order: str = "desc",
        purpose: str | None = None,
    ) -> tuple[list[FileRecord], bool]:
        """A page of the tenant's files, newest first (`order="asc"`: oldest first), after the
        file `after` (a file of this tenant, else FileNotFound); (records, has_more)."""
        descending = order != "asc"
        sql = "SELECT * FROM files WHERE tenant = ?"
        params: list[Any] = [tenant]
        if purpose is not None:
            sql += " AND purpose = ?"
            params.append(purpose)
        if after is not None:
            cursor = self.db.query_one(
                "SELECT seq FROM files WHERE tenant = ? AND id = ?", (tenant, after)
            )
            if cursor is None:
                raise FileNotFound(f"no file {after!r} (the `after` cursor)")
            sql += " AND seq < ?" if descending else " AND seq > ?"
            params.append(cursor["seq"])
        sql += f" ORDER BY seq {'DESC' if descending else 'ASC'} LIMIT ?"
        params.append(limit + 1)
        rows = self.db.query(sql, params)
        return [_record(r) for r in rows[:limit]], len(rows) > limit

    def delete(self, tenant: str, file_id: str) -> FileRecord:
        record = self.get(tenant, file_id)
        self.db.execute("DELETE FROM files WHERE tenant = ? AND id = ?", (tenant, file_id))
        return record

    def usage(self, tenant: str) -> tuple[int, int]:
        """(files, bytes) the tenant holds."""
        row = self.db.query_one(
            "SELECT COUNT(*) AS n, COALESCE(SUM(bytes), 0) AS b FROM files WHERE tenant = ?",
            (tenant,),
        )
        assert row is not None
        return int(row["n"]), int(row["b"])

    def collect(self, in_use: set[str]) -> int:
        """Remove blobs no file row and no sha in `in_use` (unfinished jobs) refers to, and
        temporary uploads older than an hour (a crashed upload's); returns blobs removed."""
        referenced = {r["sha256"] for r in self.db.query("SELECT DISTINCT sha256 FROM files")}
        referenced |= in_use
        removed = 0
        for folder in (self.root / "blobs").glob("*"):
            for blob in folder.iterdir():
                if blob.name not in referenced:
                    blob.unlink(missing_ok=True)
                    removed += 1
        now = time.time()
        for temp in (self.root / "tmp").iterdir():
            try:
                if now - temp.stat().st_mtime > 3600:
                    temp.unlink(missing_ok=True)
            except FileNotFoundError:
                continue
        return removed


def _record(row: Any) -> FileRecord:
    return FileRecord(
        row["id"],
        row["tenant"],
        row["filename"],
        row["purpose"],
        int(row["bytes"]),
        row["sha256"],
        int(row["created_at"]),
        FileSummary.from_json(json.loads(row["summary"])),
    )
