"""`ctxpeft usage`: a running service's usage ledger (GET /v1/usage) as a table or JSON.

Usage:
    ctxpeft usage                                   # this key's tenant, today, by adapter
    ctxpeft usage --since 7d --width 1d --by adapter --by key
    ctxpeft usage --tenant acme --tenant beta --by tenant     # a key with the operator right

The service and key are `--url`/CTXPEFT_URL and `--api-key`/CTXPEFT_API_KEY, as for
`ctxpeft adapters` (same exit codes).
"""

from __future__ import annotations

import argparse
import json
import re
import time
import urllib.parse
from typing import Any

from service.commands.adapters import DEFAULT_URL, KEY_ENV, URL_ENV, Service
from service.commands.common import CommandError

_SPAN = re.compile(r"^(\d+)([mhd])$")
_SECONDS = {"m": 60, "h": 3600, "d": 86400}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help=f"the service (default: ${URL_ENV}, else {DEFAULT_URL})")
    parser.add_argument("--api-key", help=f"API key (default: ${KEY_ENV}; none without keys)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait (60)")
    parser.add_argument("--since", default="1d", help="how far back: 30m, 12h, 7d (1d)")
    parser.add_argument("--width", choices=("1m", "1h", "1d"), default="1d", help="bucket width")
    parser.add_argument(
        "--by",
        action="append",
        choices=("adapter", "key", "tenant"),
        default=None,
        help="group by (repeatable; default: adapter)",
    )
    parser.add_argument(
        "--tenant", action="append", help="operator keys: the tenants to read (repeatable)"
    )
    parser.add_argument("--json", action="store_true", help="print the service's JSON")


def run(args: argparse.Namespace) -> int:
    span = _SPAN.match(args.since)
    if span is None:
        raise CommandError(f"--since must look like 30m, 12h or 7d, got {args.since!r}")
    since = int(span.group(1)) * _SECONDS[span.group(2)]
    params: list[tuple[str, str]] = [
        ("start_time", str(int(time.time()) - since)),
        ("bucket_width", args.width),
    ]
    params += [("group_by", group) for group in args.by or ["adapter"]]
    params += [("tenant", tenant) for tenant in args.tenant or []]
    page = Service.from_args(args).call("GET", "/v1/usage?" + urllib.parse.urlencode(params))
    if args.json:
        print(json.dumps(page, indent=2))
    else:
        print(_table(page))
    return 0


def _table(page: dict[str, Any]) -> str:
    header = ("bucket", "tenant", "adapter", "key", "captions", "in", "out", "cached", "compute s")
    rows = [header]
    for bucket in page["data"]:
        start = time.strftime("%Y-%m-%d %H:%M", time.gmtime(bucket["start_time"]))
        for r in bucket["results"]:
            rows.append(
                (
                    start,
                    r["project_id"] or "-",
                    r["model"] or "-",
                    r["api_key_id"] or "-",
                    str(r["num_model_requests"]),
                    str(r["input_tokens"]),
                    str(r["output_tokens"]),
                    str(r["cached_images"]),
                    f"{r['compute_seconds']:.3f}",
                )
            )
    if len(rows) == 1:
        return "no usage in that time"
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows
    )
