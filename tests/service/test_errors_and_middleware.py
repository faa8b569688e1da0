"""Error shape, request ids, body-size limit and JSON logs, over a real uvicorn server."""

from __future__ import annotations

import io
import json
import logging
import re
import sys
import threading
import warnings
from collections.abc import Iterator
from typing import Annotated

import httpx
import pytest
from fastapi import FastAPI, File, Form, Query, Request, UploadFile

from benchmarks.live_server import live_server
from service.api.errors import ApiError, ErrorBody, error_responses, install_error_handlers
from service.api.middleware import BodySizeLimitMiddleware, RequestIdMiddleware
from service.logging import JsonFormatter, configure_logging, current_request_id, request_id_var

LIMIT = 1024
HEX32 = re.compile(r"^[0-9a-f]{32}$")


class ListHandler(logging.Handler):
    """Keeps formatted records (the server thread logs; the test reads)."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []
        self.setFormatter(JsonFormatter())

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def build_app(body_seen: list[int]) -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=LIMIT)
    app.add_middleware(RequestIdMiddleware)  # outermost

    @app.get("/id")
    async def show_id(request: Request) -> dict[str, str | None]:
        return {"state": request.state.request_id, "context": current_request_id()}

    @app.post("/echo")
    async def echo(request: Request) -> dict[str, int]:
        total = 0
        async for chunk in request.stream():
            total += len(chunk)
            body_seen.append(total)
        return {"bytes": total}

    @app.post("/swallow")
    async def swallow(request: Request) -> dict[str, bool]:
        try:  # an app that hides the failure must not hide the 413 from the client
            await request.body()
        except Exception:
            return {"ok": False}
        return {"ok": True}

    @app.post("/form")
    async def form(
        image: Annotated[UploadFile, File()], adapter: Annotated[str, Form()]
    ) -> dict[str, object]:
        return {"adapter": adapter, "bytes": len(await image.read())}

    @app.get("/items", responses=error_responses(422))
    async def items(limit: Annotated[int, Query(ge=1, le=10)]) -> dict[str, int]:
        return {"limit": limit}

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("database password is hunter2")

    @app.get("/busy")
    async def busy() -> None:
        raise ApiError(
            429, "tenant_limit", "too many requests in flight", headers={"Retry-After": "3"}
        )

    @app.get("/log")
    async def log_line() -> dict[str, bool]:
        logging.getLogger("tests.request").warning("inside %s", "handler", extra={"rows": 3})
        return {"ok": True}

    return app


@pytest.fixture(scope="module")
def body_seen() -> list[int]:
    return []


@pytest.fixture(scope="module")
def base_url(body_seen: list[int]) -> Iterator[str]:
    with live_server(build_app(body_seen)) as url:
        yield url


@pytest.fixture
def client(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=10.0) as c:
        yield c


def assert_error(response: httpx.Response, status: int, error_type: str) -> dict[str, object]:
    assert response.status_code == status, response.text
    body = response.json()
    ErrorBody.model_validate(body)
    assert set(body) == {"error", "request_id"}
    assert body["error"]["type"] == error_type
    assert body["error"]["message"]
    assert body["request_id"] == response.headers["x-request-id"]
    return body


def chunks(total: int, size: int = 4096) -> Iterator[bytes]:
    sent = 0
    while sent < total:
        piece = min(size, total - sent)
        sent += piece
        yield b"x" * piece


# --- request ids --------------------------------------------------------------------------


def test_request_id_is_echoed_and_visible_to_the_app(client: httpx.Client) -> None:
    response = client.get("/id", headers={"X-Request-ID": "client-id.42_A"})
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "client-id.42_A"
    assert response.json() == {"state": "client-id.42_A", "context": "client-id.42_A"}


@pytest.mark.parametrize("offered", [None, "has space", "x" * 65, "semi;colon", ""])
def test_request_id_is_generated_when_missing_or_malformed(
    client: httpx.Client, offered: str | None
) -> None:
    headers = {} if offered is None else {"X-Request-ID": offered}
    response = client.get("/id", headers=headers)
    request_id = response.headers["x-request-id"]
    assert HEX32.match(request_id)
    assert response.json()["state"] == request_id
    assert client.get("/id", headers=headers).headers["x-request-id"] != request_id


def test_request_id_is_in_log_lines(client: httpx.Client) -> None:
    handler = ListHandler()
    logger = logging.getLogger("tests.request")
    logger.addHandler(handler)
    try:
        response = client.get("/log", headers={"X-Request-ID": "trace-me"})
    finally:
        logger.removeHandler(handler)
    assert response.status_code == 200
    [line] = handler.lines
    entry = json.loads(line)
    assert entry["request_id"] == "trace-me"
    assert entry["msg"] == "inside handler"
    assert entry["level"] == "warning"
    assert entry["logger"] == "tests.request"
    assert entry["rows"] == 3


# --- body-size limit ----------------------------------------------------------------------


def test_small_body_passes(client: httpx.Client) -> None:
    assert client.post("/echo", content=b"a" * 100).json() == {"bytes": 100}
    assert client.post("/echo", content=b"a" * LIMIT).json() == {"bytes": LIMIT}
    # chunked (a generator: no Content-Length) under the limit too
    response = client.post("/echo", content=chunks(LIMIT, size=100))
    assert response.json() == {"bytes": LIMIT}


def test_content_length_over_limit_is_413_before_the_app_reads(
    client: httpx.Client, body_seen: list[int]
) -> None:
    body_seen.clear()
    response = client.post("/echo", content=b"a" * (LIMIT + 1))
    body = assert_error(response, 413, "payload_too_large")
    assert str(LIMIT) in str(body["error"])
    assert body_seen == []  # refused on the header alone


def test_chunked_body_over_limit_is_413_and_reading_stops(
    client: httpx.Client, body_seen: list[int]
) -> None:
    body_seen.clear()
    request = client.build_request("POST", "/echo", content=chunks(2 * 1024 * 1024))
    assert "content-length" not in request.headers
    assert request.headers["transfer-encoding"] == "chunked"
    response = client.send(request)
    assert_error(response, 413, "payload_too_large")
    assert max(body_seen, default=0) <= LIMIT  # the app never got past the limit
    # the connection stays usable for the next request
    assert client.get("/id").status_code == 200


def test_chunked_multipart_over_limit_is_413_through_fastapi_form_parsing(
    client: httpx.Client,
) -> None:
    boundary = "xyzBOUNDARY"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="adapter"\r\n\r\nnews\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()

    def body(payload: int) -> Iterator[bytes]:
        yield head
        yield from chunks(payload)
        yield tail

    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    small = client.post("/form", content=body(100), headers=headers)
    assert small.json() == {"adapter": "news", "bytes": 100}
    large = client.post("/form", content=body(64 * 1024), headers=headers)
    assert_error(large, 413, "payload_too_large")


def test_413_even_when_the_app_swallows_the_error(client: httpx.Client) -> None:
    assert client.post("/swallow", content=b"a" * 10).json() == {"ok": True}
    response = client.post("/swallow", content=chunks(64 * 1024))
    assert_error(response, 413, "payload_too_large")


# --- error shape --------------------------------------------------------------------------


def test_validation_error_is_422_invalid_parameter(client: httpx.Client) -> None:
    body = assert_error(client.get("/items", params={"limit": 0}), 422, "invalid_parameter")
    assert body["error"]["message"].startswith("query.limit: ")  # type: ignore[index]
    body = assert_error(client.get("/items"), 422, "invalid_parameter")
    assert "Field required" in body["error"]["message"]  # type: ignore[index]
    assert client.get("/items", params={"limit": 3}).json() == {"limit": 3}


def test_unknown_route_is_404_not_found(client: httpx.Client) -> None:
    body = assert_error(client.get("/nowhere"), 404, "not_found")
    assert body["error"]["message"] == "no route for GET /nowhere"  # type: ignore[index]


def test_wrong_method_is_405_with_allow(client: httpx.Client) -> None:
    response = client.delete("/id")
    assert_error(response, 405, "method_not_allowed")
    assert response.headers["allow"] == "GET"


def test_api_error_keeps_status_type_and_headers(client: httpx.Client) -> None:
    response = client.get("/busy", headers={"X-Request-ID": "busy-1"})
    body = assert_error(response, 429, "tenant_limit")
    assert body == {
        "error": {"type": "tenant_limit", "message": "too many requests in flight"},
        "request_id": "busy-1",
    }
    assert response.headers["retry-after"] == "3"


def test_unexpected_exception_is_500_without_details(
    client: httpx.Client, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="service.api.errors"):
        response = client.get("/boom", headers={"X-Request-ID": "boom-1"})
    body = assert_error(response, 500, "internal")
    assert "hunter2" not in response.text
    assert "RuntimeError" not in response.text
    assert body["request_id"] == "boom-1"
    [record] = [r for r in caplog.records if r.name == "service.api.errors"]
    assert record.request_id == "boom-1"  # type: ignore[attr-defined]
    assert record.exc_info is not None and "hunter2" in str(record.exc_info[1])


def test_api_error_rejects_non_error_status_and_bad_type() -> None:
    with pytest.raises(ValueError, match="4xx or 5xx"):
        ApiError(200, "ok", "fine")
    with pytest.raises(ValueError, match="snake_case"):
        ApiError(400, "Bad Request", "no")


# --- logging ------------------------------------------------------------------------------


def test_json_formatter_fields_and_exception() -> None:
    logger = logging.getLogger("tests.json")
    record = logger.makeRecord(
        "tests.json", logging.ERROR, __file__, 1, "failed %d", (7,), None, extra={"path": "/x"}
    )
    token = request_id_var.set("rid-1")
    try:
        entry = json.loads(JsonFormatter().format(record))
    finally:
        request_id_var.reset(token)
    assert entry["msg"] == "failed 7"
    assert entry["level"] == "error"
    assert entry["logger"] == "tests.json"
    assert entry["request_id"] == "rid-1"
    assert entry["path"] == "/x"
    assert entry["ts"].endswith("+00:00")

    try:
        raise ValueError("bad")
    except ValueError:
        import sys

        record = logger.makeRecord(
            "tests.json", logging.ERROR, __file__, 1, "x", (), sys.exc_info()
        )
    entry = json.loads(JsonFormatter().format(record))
    assert entry["request_id"] is None
    assert "ValueError: bad" in entry["exc"]


def test_configure_logging_replaces_its_handler(monkeypatch: pytest.MonkeyPatch) -> None:
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    monkeypatch.setattr(root, "level", root.level)
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    # configure_logging also routes warnings and uncaught exceptions: restore them afterwards.
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)
    monkeypatch.setattr(threading, "excepthook", threading.excepthook)
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)
    configure_logging("debug", json=True)
    configure_logging("info", json=True)
    ours = [h for h in root.handlers if type(h).__name__ == "_ServiceHandler"]
    assert len(ours) == 1
    assert root.level == logging.INFO
    logging.getLogger("tests.configured").info("hello", extra={"adapter": "news"})
    entry = json.loads(stream.getvalue().strip().splitlines()[-1])
    assert (entry["msg"], entry["adapter"]) == ("hello", "news")
    configure_logging("warning", json=False)
    logging.getLogger("tests.configured").warning("plain")
    assert stream.getvalue().rstrip().endswith("WARNING tests.configured [None] plain")
