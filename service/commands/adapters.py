"""`ctxpeft adapters`: list, show, push and delete the adapters of a running service, and
validate an adapter folder offline against a backbone.

Usage:
    ctxpeft adapters list                                   # what this key sees
    ctxpeft adapters show count --json
    ctxpeft adapters push var/adapters/default/my-count/v1 --name my-count
    ctxpeft adapters delete my-count
    ctxpeft adapters validate path/to/folder --backbone var/backbones/demo   # offline

The service is `--url` or CTXPEFT_URL (default http://127.0.0.1:8000), the key `--api-key` or
CTXPEFT_API_KEY (none: a service without keys). `--json` prints what the service answered
(errors included) instead of text. `validate` needs no service: it runs the checks an upload
gets (safetensors only, tensor names and shapes, targets, layer count, base fingerprint, rank,
connector, finite values) against the backbone folder, or the backbone `ctxpeft serve` would
load (CTXPEFT_BACKBONE under CTXPEFT_RUNTIME_DIR).

Exit codes: 0 done; 1 refused (the service answered another 4xx, or the folder is invalid);
2 usage (bad arguments, a missing folder, no backbone); 3 not found (no such adapter for this
key); 4 the key is missing, unknown or lacks the right (401, 403); 5 the service is
unreachable or failing (connection refused, timeout, 5xx such as 503 while it loads).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.commands.common import CommandError, load_backbone

if TYPE_CHECKING:
    from adapters.adapter_set import AdapterSet
    from adapters.backbone import Backbone

DEFAULT_URL = "http://127.0.0.1:8000"
URL_ENV = "CTXPEFT_URL"
KEY_ENV = "CTXPEFT_API_KEY"

# 2, usage, is CommandError's default (service.commands.common.USAGE)
OK, REFUSED, NOT_FOUND, AUTH, UNAVAILABLE = 0, 1, 3, 4, 5
_VERSION_FOLDER = re.compile(r"^v\d+$")


# --- arguments ---------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "exit codes: 0 done, 1 refused or invalid, 2 usage, 3 not found, 4 key missing, "
        "unknown or lacking the right, 5 service unreachable or failing"
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print JSON instead of text")
    remote = argparse.ArgumentParser(add_help=False, parents=[common])
    remote.add_argument("--url", help=f"the service (default: ${URL_ENV}, else {DEFAULT_URL})")
    remote.add_argument("--api-key", help=f"API key (default: ${KEY_ENV}; none without keys)")
    remote.add_argument(
        "--timeout", type=float, default=60.0, help="seconds to wait for an answer (60)"
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    actions.add_parser("list", parents=[remote], help="the adapters this key sees")
    show = actions.add_parser("show", parents=[remote], help="one adapter")
    show.add_argument("name")
    push = actions.add_parser(
        "push",
        parents=[remote],
        help="upload a folder (adapter_config.json + adapter.safetensors) as a new version",
    )
    push.add_argument("folder", type=Path)
    push.add_argument(
        "--name",
        help="adapter name (default: the folder's name, or its parent's for a store version "
        "folder such as my-count/v1)",
    )
    delete = actions.add_parser(
        "delete", parents=[remote], help="delete every version of an own adapter"
    )
    delete.add_argument("name")
    validate = actions.add_parser(
        "validate", parents=[common], help="check a folder against a backbone, offline"
    )
    validate.add_argument("folder", type=Path)
    validate.add_argument(
        "--backbone",
        help="a saved backbone folder, or the name of one built under the runtime folder "
        "(default: CTXPEFT_BACKBONE, i.e. what `ctxpeft serve` loads)",
    )
    validate.add_argument("--runtime-dir", type=Path, help="runtime folder (CTXPEFT_RUNTIME_DIR)")
    validate.add_argument(
        "--max-rank", type=int, help="largest rank accepted (default: CTXPEFT_MAX_RANK, 64)"
    )


def run(args: argparse.Namespace) -> int:
    return _ACTIONS[args.action](args)


# --- talking to the service ------------------------------------------------------------------
@dataclass(frozen=True)
class Service:
    url: str
    key: str | None
    timeout: float

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Service:
        url = (args.url or os.environ.get(URL_ENV) or DEFAULT_URL).rstrip("/")
        if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
            raise CommandError(f"--url must be an http(s) URL, got {url!r}")
        if args.timeout <= 0:
            raise CommandError(f"--timeout must be > 0, got {args.timeout}")
        return cls(url, args.api_key or os.environ.get(KEY_ENV) or None, args.timeout)

    def call(
        self, method: str, path: str, body: bytes | None = None, content_type: str | None = None
    ) -> Any:
        """The JSON answer of one request; raises CommandError (with the exit code for the
        status) when it fails."""
        headers = {"Accept": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        if content_type:
            headers["Content-Type"] = content_type
        request = urllib.request.Request(self.url + path, data=body, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            raise _http_error(error) from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
            reason = getattr(error, "reason", error)
            raise CommandError(
                f"cannot reach the service at {self.url}: {reason} (is it running? set --url "
                f"or {URL_ENV})",
                UNAVAILABLE,
            ) from None
        except json.JSONDecodeError:
            raise CommandError(
                f"{self.url} answered something that is not JSON: is it a ctxpeft service?",
                UNAVAILABLE,
            ) from None


def _http_error(error: urllib.error.HTTPError) -> CommandError:
    status = error.code
    try:
        body = json.loads(error.read())
        detail = body["error"]
        kind, message = detail["type"], detail["message"]
    except (ValueError, KeyError, TypeError):
        body, kind, message = None, "http_error", error.reason
    if status == 404:
        code = NOT_FOUND
    elif status in (401, 403):
        code = AUTH
        if status == 401:
            message = f"{message} (give --api-key or set {KEY_ENV})"
    elif status >= 500:
        code = UNAVAILABLE
    else:
        code = REFUSED
    return CommandError(f"{status} {kind}: {message}", code, body)


def _quoted(name: str) -> str:
    return urllib.parse.quote(name, safe="")


def _multipart(files: Sequence[tuple[str, str, bytes]]) -> tuple[bytes, str]:
    """A multipart/form-data body of (field, file name, bytes) parts, and its content type."""
    boundary = f"ctxpeft-{uuid.uuid4().hex}"
    chunks: list[bytes] = []
    for field, filename, data in files:
        chunks += [
            f"--{boundary}\r\n".encode(),
            f'Content-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'.encode(),
            b"Content-Type: application/octet-stream\r\n\r\n",
            data,
            b"\r\n",
        ]
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f"multipart/form-data; boundary={boundary}"


# --- actions -----------------------------------------------------------------------------------
def _print(args: argparse.Namespace, data: Any, text: str) -> int:
    print(json.dumps(data, indent=2) if args.json else text)
    return OK


def _list(args: argparse.Namespace) -> int:
    answer = Service.from_args(args).call("GET", "/adapters")
    rows = [
        (
            a["name"],
            "public" if a["public"] else "own",
            f"v{a['latest_version']}",
            a.get("method") or "?",
            ",".join(a.get("contexts") or []) or "?",
            "" if a.get("rank") is None else str(a["rank"]),
            a.get("description") or "",
        )
        for a in answer["adapters"]
    ]
    header = ("NAME", "OWNER", "LATEST", "METHOD", "CONTEXTS", "RANK", "DESCRIPTION")
    return _print(args, answer, _table(header, rows) if rows else "no adapters for this key")


def _table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))
        for row in [header, *rows]
    ]
    return "\n".join(line.rstrip() for line in lines)


def _show(args: argparse.Namespace) -> int:
    a = Service.from_args(args).call("GET", f"/adapters/{_quoted(args.name)}")
    fields = [
        ("name", a["name"]),
        ("owner", "public" if a["public"] else "own"),
        (
            "versions",
            ", ".join(f"v{v}" for v in a["versions"]) + f" (latest v{a['latest_version']})",
        ),
        ("method", a.get("method") or "? (its config is unreadable)"),
        ("contexts", ", ".join(a.get("contexts") or [])),
        ("rank", "" if a.get("rank") is None else str(a["rank"])),
        ("targets", ", ".join(a.get("targets") or [])),
        ("description", a.get("description") or ""),
    ]
    text = "\n".join(f"{key + ':':<13}{value}" for key, value in fields if value)
    return _print(args, a, text)


def push_name(folder: Path, name: str | None) -> str:
    """--name, else the folder's name (its parent's for a store version folder, v<N>)."""
    if name:
        return name
    resolved = folder.resolve()
    return resolved.parent.name if _VERSION_FOLDER.match(resolved.name) else resolved.name


def _push(args: argparse.Namespace) -> int:
    from adapters.format import CONFIG_FILE, WEIGHTS_FILE

    service = Service.from_args(args)
    folder: Path = args.folder
    if not folder.is_dir():
        raise CommandError(f"{folder} is not a folder")
    parts = []
    for field, filename in (("config", CONFIG_FILE), ("weights", WEIGHTS_FILE)):
        path = folder / filename
        if not path.is_file():
            raise CommandError(f"{folder} has no {filename}", REFUSED)
        parts.append((field, filename, path.read_bytes()))
    name = push_name(folder, args.name)
    body, content_type = _multipart(parts)
    answer = service.call("POST", f"/adapters/{_quoted(name)}/versions", body, content_type)
    return _print(args, answer, f"{answer['name']}: uploaded version {answer['version']}")


def _delete(args: argparse.Namespace) -> int:
    answer = Service.from_args(args).call("DELETE", f"/adapters/{_quoted(args.name)}")
    count = answer["deleted_versions"]
    versions = "version" if count == 1 else "versions"
    return _print(args, answer, f"{answer['name']}: deleted {count} {versions}")


# --- validate (offline) --------------------------------------------------------------------------
def check_adapter_folder(folder: Path, backbone: Backbone, max_rank: int) -> AdapterSet:
    """The checks `POST /adapters/{name}/versions` runs on an upload (AdapterRegistry.validate),
    without a service. Raises adapters.format.AdapterFormatError with the reason."""
    from adapters.backbone import connector_spec
    from adapters.format import AdapterFormatError, load_adapter

    adapter = load_adapter(
        folder, backbone.dims, backbone.fingerprint(), max_rank, vision_dim=backbone.vision_dim
    )
    connector = connector_spec(backbone)
    if adapter.config.connector != connector:
        raise AdapterFormatError(
            f"connector {adapter.config.connector} does not match this backbone's {connector}"
        )
    return adapter


def _validate(args: argparse.Namespace) -> int:
    from transformers.utils.logging import disable_progress_bar

    from adapters.format import AdapterFormatError
    from service.settings import Settings

    disable_progress_bar()  # the backbone's loading bars would bury the one-line verdict
    settings = Settings()
    folder: Path = args.folder
    if not folder.is_dir():
        raise CommandError(f"{folder} is not a folder")
    max_rank = args.max_rank if args.max_rank is not None else settings.max_rank
    if max_rank < 1:
        raise CommandError(f"--max-rank must be >= 1, got {max_rank}")
    spec = args.backbone or settings.backbone
    runtime = args.runtime_dir or settings.runtime_dir
    backbone = load_backbone(spec, runtime, "cpu")
    report: dict[str, Any] = {"folder": str(folder), "backbone": backbone.fingerprint()}
    try:
        adapter = check_adapter_folder(folder, backbone, max_rank)
    except AdapterFormatError as error:
        report |= {"valid": False, "error": str(error)}
        raise CommandError(f"{folder} is not a valid adapter: {error}", REFUSED, report) from None
    config = adapter.config
    report |= {"valid": True, "method": config.method, "contexts": list(config.contexts)}
    if config.method == "lora":
        report["rank"] = config.rank
    shape = f"{config.method}, contexts {'+'.join(config.contexts)}"
    if config.method == "lora":
        shape += f", rank {config.rank}"
    text = f"ok: {folder} is a valid adapter ({shape}) for backbone {report['backbone'][:12]}"
    return _print(args, report, text)


_ACTIONS = {
    "list": _list,
    "show": _show,
    "push": _push,
    "delete": _delete,
    "validate": _validate,
}
