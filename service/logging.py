"""Logging set-up: one JSON object per line, each carrying the current request id.

Every line the process writes to stderr goes through the one handler installed here: our
loggers, uvicorn's, the loggers of libraries that install their own plain-text handler
(transformers, huggingface_hub, torch), Python warnings (`warnings.warn` from any library,
as `logging.captureWarnings` does, with the category and source as fields), and uncaught
exceptions in the main thread or any other thread (with the traceback as the `exc` field).

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
import threading
import traceback
import warnings
from contextvars import ContextVar
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, TextIO

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
# The logger `logging.captureWarnings` uses; warnings are logged under the same name.
WARNINGS_LOGGER = "py.warnings"
_STD_STREAMS = ("stderr", "stdout", "__stderr__", "__stdout__")


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
            # A leading underscore is another library's private mark on every record (Ray's
            # record factory adds _ray_timestamp_ns), not an `extra` of ours.
            if key not in _RECORD_ATTRS and key not in entry and not key.startswith("_"):
                entry[key] = value
        if record.exc_info and record.exc_info[0] is not None:
            entry["exc"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        if record.stack_info:
            entry["stack"] = record.stack_info
        # default=str: an extra that is not JSON (a Path, a tensor shape) must not lose the line.
        return jsonlib.dumps(entry, ensure_ascii=False, default=str)


class _ServiceHandler(logging.StreamHandler):
    """Writes to the current `sys.stderr` (looked up at each record, as logging's last-resort
    handler does, so a test that swaps stderr sees the lines); marks the handler
    configure_logging installed, so that a second call replaces it."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)

    @property
    def stream(self) -> TextIO:
        return sys.stderr


def configure_logging(level: str | int = "info", json: bool = True) -> None:
    """Send everything the process reports to stderr through one handler, as JSON lines or
    plain text: our logs and uvicorn's, library loggers, warnings, uncaught exceptions."""
    handler = _ServiceHandler()
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
    _route_library_loggers()
    capture_warnings()
    _log_uncaught_exceptions()


def _route_library_loggers() -> None:
    """Libraries that print through a handler of their own reach stderr through ours instead.

    transformers and huggingface_hub add a plain-text StreamHandler to their root logger when
    they are imported (transformers also turns propagation off), and torch does the same on
    its loggers: their lines would bypass the JSON formatter. Imported here, so that their
    handlers exist before the sweep removes them."""
    import huggingface_hub.utils.logging as hub_logging  # noqa: F401  (installs its handler)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()
    console = [getattr(sys, name) for name in _STD_STREAMS]
    for logger in list(logging.Logger.manager.loggerDict.values()):
        if not isinstance(logger, logging.Logger):
            continue  # a PlaceHolder: no handlers
        printing = [
            handler
            for handler in logger.handlers
            if isinstance(handler, logging.StreamHandler)
            and not isinstance(handler, logging.FileHandler | _ServiceHandler)
            and getattr(handler, "stream", None) in console
        ]
        for handler in printing:
            logger.removeHandler(handler)
        if printing:
            logger.propagate = True


def capture_warnings() -> None:
    """`warnings.warn` from anywhere becomes one record of the "py.warnings" logger, as with
    `logging.captureWarnings(True)`, with the category and the source line as fields
    (logging.captureWarnings puts the whole multi-line `formatwarning` text in the message)."""
    logging.captureWarnings(True)  # so that captureWarnings(False) restores the original
    warnings.showwarning = _show_warning


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    if file is not None:  # an explicit destination (not the default stderr): honour it
        file.write(warnings.formatwarning(message, category, filename, lineno, line))
        return
    logging.getLogger(WARNINGS_LOGGER).warning(
        "%s", message, extra={"category": category.__name__, "source": f"{filename}:{lineno}"}
    )


def _log_uncaught_exceptions() -> None:
    """An exception nobody caught, in the main thread or another one, is logged (traceback
    in `exc`) instead of printed as a raw traceback."""
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_uncaught_in_thread
    sys.unraisablehook = _log_unraisable


def _log_uncaught(
    kind: type[BaseException], value: BaseException, tb: TracebackType | None
) -> None:
    log = logging.getLogger("service")
    if issubclass(kind, KeyboardInterrupt):
        log.warning("interrupted")
        return
    log.critical("uncaught exception", exc_info=(kind, value, tb))


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return  # threading's default hook is silent about it too
    thread = args.thread.name if args.thread is not None else None
    logging.getLogger("service").critical(
        "uncaught exception in a thread",
        exc_info=(args.exc_type, args.exc_value or args.exc_type(), args.exc_traceback),
        extra={"thread_name": thread},
    )


def _log_unraisable(unraisable: Any) -> None:
    exc = unraisable.exc_value
    logging.getLogger("service").error(
        "%s",
        unraisable.err_msg or "exception ignored",
        exc_info=(unraisable.exc_type, exc, unraisable.exc_traceback) if exc else None,
        extra={"object": repr(unraisable.object)},
    )
