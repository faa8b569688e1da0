"""Logging set-up: one JSON object per line, each carrying the current request id.

`RequestIdMiddleware` puts the id of the request being served into `request_id_var`; every
record logged while it is set (in the request's task, or a thread started with a copy of its
context) gets it. Code running elsewhere (the engine's worker thread) passes it explicitly:
`log.info("batch done", extra={"request_id": rid, "rows": 4})`.

    configure_logging("info", json=True)   # once, at start-up
"""

from __future__ import annotations

import json as jsonlib
import logging
import sys
import traceback
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

request_id_var: ContextVar[str | None] = ContextVar("ctxpeft_request_id", default=None)

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_RECORD_ATTRS = frozenset(
    vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None)).keys()
    | {"message", "asctime", "taskName"}
    # uvicorn's terminal copy of msg with ANSI colour codes: noise in a JSON line.
    | {"color_message"}
)
# uvicorn installs its own handlers on these unless told otherwise; route them through root.
_SERVER_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")


def current_request_id() -> str | None:
    """The id of the request served in this context, if any."""
    return request_id_var.get()


class RequestIdFilter(logging.Filter):
    """Sets `record.request_id` (explicit `extra` wins over the context) for any formatter."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = request_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON line: ts, level, logger, msg, request_id, extras, exc."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "request_id": getattr(record, "request_id", None) or request_id_var.get(),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRS and key not in entry:
                entry[key] = value
        if record.exc_info and record.exc_info[0] is not None:
            entry["exc"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        if record.stack_info:
            entry["stack"] = record.stack_info
        # default=str: an extra that is not JSON (a Path, a tensor shape) must not lose the line.
        return jsonlib.dumps(entry, ensure_ascii=False, default=str)


class _ServiceHandler(logging.StreamHandler):
    """Marks the handler configure_logging installed, so a second call replaces it."""


def configure_logging(level: str | int = "info", json: bool = True) -> None:
    """Send all logs (ours and uvicorn's) to stderr, as JSON lines or plain text."""
    handler = _ServiceHandler(sys.stderr)
    handler.addFilter(RequestIdFilter())
    if json:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")
        )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _ServiceHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    for name in _SERVER_LOGGERS:
        server_logger = logging.getLogger(name)
        server_logger.handlers.clear()
        server_logger.propagate = True
