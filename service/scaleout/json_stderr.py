"""Every line `ctxpeft serve --ray` writes to stderr is one JSON object, whoever writes it.

Two kinds of writer would break that:
- Ray's Python loggers ("ray", "ray.serve", ...) print through plain-text handlers of their
  own, installed when Ray is imported. `route_ray_loggers()` removes those handlers, so their
  records reach the service's JSON handler, and keeps only WARNING and above: Ray's INFO lines
  on the driver ("Started a local Ray instance", "Deployed app ...") repeat what our own
  lines say ("Ray cluster started", "serving on Ray").
- Code that writes to file descriptor 2 itself: the C++ core worker that `ray.init` loads
  into this process logs its errors there ("Failed to connect to GCS within 60 seconds"), and
  so would a raw print. `JsonStderr` points fd 2 at a pipe; a reader thread passes the lines
  that are already JSON objects through unchanged and writes every other line as one JSON
  record of the logger "stderr" (its level read from the line's Ray or glog prefix when it
  has one, else "warning"; the root logger's level applies) on the real stderr.

    with JsonStderr():      # before Ray is imported
        ...
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
from types import TracebackType

from service.logging import JsonFormatter

# Ray's Python lines ("2026-01-01 10:00:00,000\tINFO worker.py:1 -- ...", "INFO 2026-...
# serve 12 -- ...") and glog-style C++ lines ("[2026-01-01 10:00:00,000 E 12 34] file.cc:5:").
_PY_LEVEL = re.compile(r"\b(DEBUG|INFO|WARNING|ERROR|CRITICAL)\b")
_GLOG_LEVEL = re.compile(r"^\[[^\]]*? ([DIWEF]) \d+ \d+\]")
_GLOG = {"D": logging.DEBUG, "I": logging.INFO, "W": logging.WARNING, "E": logging.ERROR}
_END = b"\x00ctxpeft-stderr-end\n"  # written by stop(): everything before it was written out
STDERR_LOGGER = "stderr"
RAY_LOG_LEVEL = logging.WARNING


def route_ray_loggers() -> None:
    """Ray's loggers print through the service's handler, WARNING and above. Call after each
    Ray import that configures loggers (ray, ray.serve) and after ray.init: idempotent."""
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if not isinstance(logger, logging.Logger) or not (name == "ray" or name.startswith("ray.")):
            continue
        for handler in list(logger.handlers):
            if isinstance(handler, logging.StreamHandler) and not isinstance(
                handler, logging.FileHandler
            ):
                logger.removeHandler(handler)
        logger.propagate = True
        if logger.level < RAY_LOG_LEVEL:
            logger.setLevel(RAY_LOG_LEVEL)


def level_of(line: str) -> int:
    """The level a plain stderr line announces, else WARNING (unknown output is worth a look)."""
    glog = _GLOG_LEVEL.match(line)
    if glog:
        return _GLOG.get(glog.group(1), logging.CRITICAL)
    python = _PY_LEVEL.search(line[:48])
    if python:
        return logging.getLevelNamesMapping()[python.group(1)]
    return logging.WARNING


def is_json_object(line: str) -> bool:
    if not line.startswith("{"):
        return False
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


class JsonStderr:
    """Fd 2 through a pipe whose reader writes JSON lines only (see the module docstring)."""

    def __init__(self) -> None:
        self._real: int | None = None
        self._end: int | None = None
        self._thread: threading.Thread | None = None
        self._formatter = JsonFormatter()

    def __enter__(self) -> JsonStderr:
        self.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        sys.stderr.flush()
        self._real = os.dup(2)
        read, write = os.pipe()
        os.dup2(write, 2)  # sys.stderr (fd 2) and every native writer now feed the pipe
        self._end = write  # kept to write the end mark: fd 2 itself goes back in stop()
        self._thread = threading.Thread(
            target=self._pump, args=(read, self._real), name="ctxpeft-stderr", daemon=True
        )
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Put fd 2 back and wait until every line written before was written out."""
        if self._real is None or self._end is None or self._thread is None:
            return
        sys.stderr.flush()
        os.dup2(self._real, 2)
        os.write(self._end, b"\n" + _END)  # the newline ends a line left unfinished
        os.close(self._end)
        self._thread.join(timeout_s)
        self._real = self._end = self._thread = None

    def _pump(self, read: int, real: int) -> None:
        with os.fdopen(read, "rb") as lines:
            for raw in lines:
                if raw == _END:
                    break
                text = raw.decode("utf-8", "replace").rstrip("\r\n")
                if not text.strip():
                    continue
                if not is_json_object(text):
                    level = level_of(text)
                    if not logging.getLogger(STDERR_LOGGER).isEnabledFor(level):
                        continue
                    record = logging.LogRecord(STDERR_LOGGER, level, "", 0, text, None, None)
                    text = self._formatter.format(record)
                _write_all(real, (text + "\n").encode())
        os.close(real)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
