"""`ctxpeft jobs`: fine-tuning jobs of a running service (its /v1 fine-tuning API).

Usage:
    ctxpeft jobs create train.jsonl --suffix count --wait   # uploads the file, then trains
    ctxpeft jobs create file-abc123 --epochs 10 --json      # a file uploaded before
    ctxpeft jobs list
    ctxpeft jobs show ftjob-abc123
    ctxpeft jobs events ftjob-abc123 --follow               # until the job ends
    ctxpeft jobs cancel ftjob-abc123                        # also: pause, resume

The service is `--url` or CTXPEFT_URL, the key `--api-key` or CTXPEFT_API_KEY, as for
`ctxpeft adapters`; `--json` prints what the service answered. `create` takes a local
training file (OpenAI chat JSONL, image+caption JSONL with data: URLs, or a zip: docs/API.md)
and uploads it first, or the id of a file already uploaded; `--model` defaults to the
service's backbone (GET /info). Exit codes as `ctxpeft adapters`: 0 done (with --wait: the job
succeeded), 1 refused (or, with --wait, the job failed or was cancelled), 2 usage, 3 not
found, 4 key missing or lacking the right, 5 service unreachable or failing.
"""

from __future__ import annotations

import argparse
import json
import time
import urllib.parse
from pathlib import Path
from typing import Any

from service.commands.adapters import OK, REFUSED, Service, _multipart, _table
from service.commands.common import USAGE, CommandError

FINAL = ("succeeded", "failed", "cancelled")
POLL_S = 1.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "exit codes: 0 done, 1 refused (or the waited-for job did not succeed), 2 usage, "
        "3 not found, 4 key missing, unknown or lacking the right, 5 service unreachable"
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print JSON instead of text")
    common.add_argument("--url", help="the service (default: $CTXPEFT_URL, else :8000)")
    common.add_argument("--api-key", help="API key (default: $CTXPEFT_API_KEY)")
    common.add_argument("--timeout", type=float, default=120.0, help="seconds per request (120)")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    create = actions.add_parser("create", parents=[common], help="start a fine-tuning job")
    create.add_argument("training", help="a local training file (uploaded first) or a file id")
    create.add_argument("--validation", help="a local validation file or a file id")
    create.add_argument("--model", help="the backbone (default: the service's, GET /info)")
    create.add_argument("--suffix", help="part of the model's name: ft-<suffix>-<id>")
    create.add_argument("--epochs", type=int, help="n_epochs (default: auto)")
    create.add_argument("--batch-size", type=int, help="batch_size (default: auto)")
    create.add_argument(
        "--lr-multiplier", type=float, help="learning_rate_multiplier (default: auto)"
    )
    create.add_argument("--seed", type=int)
    create.add_argument("--method", choices=("lora", "ia3", "bitfit"), help="(default: lora)")
    create.add_argument("--contexts", choices=("specific", "agnostic"), help="(default: specific)")
    create.add_argument("--rank", type=int, help="LoRA rank (default: 8)")
    create.add_argument("--wait", action="store_true", help="print events until the job ends")

    actions.add_parser("list", parents=[common], help="this key's jobs, newest first").add_argument(
        "--limit", type=int, default=20
    )
    for name, text in (
        ("show", "one job"),
        ("cancel", "cancel a job (a running one stops at its next step)"),
        ("pause", "pause a job at its next step"),
        ("resume", "resume a paused job"),
    ):
        actions.add_parser(name, parents=[common], help=text).add_argument("job")
    events = actions.add_parser("events", parents=[common], help="a job's events, oldest first")
    events.add_argument("job")
    events.add_argument("--follow", action="store_true", help="keep printing until it ends")


def run(args: argparse.Namespace) -> int:
    try:
        return _ACTIONS[args.action](args)
    except CommandError as error:
        body = error.body
        if (
            isinstance(body, dict)
            and isinstance(body.get("error"), dict)
            and "code" in body["error"]
        ):  # OpenAI's error shape: say its code and param (cli.main prints the error)
            detail = body["error"]
            param = f" ({detail['param']})" if detail.get("param") else ""
            message = f"{detail['code']}{param}: {detail['message']}"
            raise CommandError(message, error.code, body) from error
        raise


def _service(args: argparse.Namespace) -> Service:
    return Service.from_args(args)


def _json(service: Service, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    return service.call(method, path, data, "application/json" if data is not None else None)


def _file_id(service: Service, value: str, args: argparse.Namespace) -> str:
    path = Path(value)
    if path.is_file():
        body, content_type = _multipart([("file", path.name, path.read_bytes())])
        # The purpose is a plain form field; add it before the closing boundary.
        boundary = content_type.split("boundary=")[1]
        purpose = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
        ).encode()
        answer = service.call("POST", "/v1/files", purpose + body, content_type)
        if not args.json:
            summary = answer.get("training_data") or {}
            print(
                f"uploaded {path.name} as {answer['id']}: {summary.get('examples')} examples, "
                f"{summary.get('images')} images"
            )
            for warning in summary.get("warnings") or []:
                print(f"warning: {warning}")
        return str(answer["id"])
    if value.startswith("file-"):
        return value
    raise CommandError(f"{value} is neither a local file nor a file id (file-...)", USAGE)


def _create(args: argparse.Namespace) -> int:
    service = _service(args)
    model = args.model or service.call("GET", "/info")["backbone"]
    body: dict[str, Any] = {"model": model, "training_file": _file_id(service, args.training, args)}
    if args.validation:
        body["validation_file"] = _file_id(service, args.validation, args)
    hyper = {
        key: value
        for key, value in (
            ("n_epochs", args.epochs),
            ("batch_size", args.batch_size),
            ("learning_rate_multiplier", args.lr_multiplier),
        )
        if value is not None
    }
    body["method"] = {"type": "supervised", "supervised": {"hyperparameters": hyper}}
    for key in ("suffix", "seed"):
        if getattr(args, key) is not None:
            body[key] = getattr(args, key)
    adapter = {k: getattr(args, k) for k in ("method", "contexts", "rank") if getattr(args, k)}
    if adapter:
        body["adapter"] = adapter
    job = _json(service, "POST", "/v1/fine_tuning/jobs", body)
    if args.json and not args.wait:
        print(json.dumps(job, indent=2))
        return OK
    if not args.json:
        hp = job["hyperparameters"]
        print(
            f"created {job['id']} ({job['status']}): {hp['n_epochs']} epochs, batch size "
            f"{hp['batch_size']}, learning rate multiplier {hp['learning_rate_multiplier']}"
        )
    if not args.wait:
        return OK
    return _follow(service, job["id"], args)


def _quoted(value: str) -> str:
    return urllib.parse.quote(value, safe="")


def _job_text(job: dict[str, Any]) -> str:
    hp = job.get("hyperparameters") or {}
    status = job["status"] + (" (paused)" if job.get("paused_at") else "")
    fields = [
        ("id", job["id"]),
        ("status", status),
        ("model", job["model"]),
        ("fine-tuned", job.get("fine_tuned_model") or ""),
        ("training file", job["training_file"]),
        ("validation", job.get("validation_file") or ""),
        ("epochs", str(hp.get("n_epochs", ""))),
        ("batch size", str(hp.get("batch_size", ""))),
        ("lr multiplier", str(hp.get("learning_rate_multiplier", ""))),
        ("trained tokens", "" if job.get("trained_tokens") is None else str(job["trained_tokens"])),
        ("error", f"{job['error']['code']}: {job['error']['message']}" if job.get("error") else ""),
    ]
    return "\n".join(f"{key + ':':<16}{value}" for key, value in fields if value)


def _list(args: argparse.Namespace) -> int:
    answer = _service(args).call("GET", f"/v1/fine_tuning/jobs?limit={args.limit}")
    if args.json:
        print(json.dumps(answer, indent=2))
        return OK
    rows = [
        (
            j["id"],
            j["status"] + (" (paused)" if j.get("paused_at") else ""),
            j.get("fine_tuned_model") or "",
            time.strftime("%Y-%m-%d %H:%M", time.localtime(j["created_at"])),
        )
        for j in answer["data"]
    ]
    header = ("JOB", "STATUS", "MODEL", "CREATED")
    print(_table(header, rows) if rows else "no fine-tuning jobs for this key")
    return OK


def _show(args: argparse.Namespace) -> int:
    job = _service(args).call("GET", f"/v1/fine_tuning/jobs/{_quoted(args.job)}")
    print(json.dumps(job, indent=2) if args.json else _job_text(job))
    return OK


def _transition(args: argparse.Namespace) -> int:
    path = f"/v1/fine_tuning/jobs/{_quoted(args.job)}/{args.action}"
    job = _service(args).call("POST", path)
    print(json.dumps(job, indent=2) if args.json else _job_text(job))
    return OK


def _events_page(service: Service, job: str, after: str | None) -> list[dict[str, Any]]:
    """Every event newer than `after` (the API pages newest first), oldest first."""
    found: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        query = "limit=100" + (f"&after={_quoted(cursor)}" if cursor else "")
        page = service.call("GET", f"/v1/fine_tuning/jobs/{_quoted(job)}/events?{query}")
        for event in page["data"]:
            if event["id"] == after:
                return list(reversed(found))
            found.append(event)
        if not page["has_more"] or not page["data"]:
            return list(reversed(found))
        cursor = page["data"][-1]["id"]


def _print_event(event: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(event), flush=True)
        return
    stamp = time.strftime("%H:%M:%S", time.localtime(event["created_at"]))
    level = "" if event["level"] == "info" else f"{event['level']}: "
    print(f"{stamp}  {level}{event['message']}", flush=True)


def _follow(service: Service, job_id: str, args: argparse.Namespace) -> int:
    last: str | None = None
    while True:
        status = service.call("GET", f"/v1/fine_tuning/jobs/{_quoted(job_id)}")["status"]
        events = _events_page(service, job_id, last)
        for event in events:
            _print_event(event, args.json)
        if events:
            last = events[-1]["id"]
        if status in FINAL:
            return OK if status == "succeeded" else REFUSED
        time.sleep(POLL_S)


def _events(args: argparse.Namespace) -> int:
    service = _service(args)
    if args.follow:
        return _follow(service, args.job, args)
    for event in _events_page(service, args.job, None):
        _print_event(event, args.json)
    return OK


_ACTIONS = {
    "create": _create,
    "list": _list,
    "show": _show,
    "cancel": _transition,
    "pause": _transition,
    "resume": _transition,
    "events": _events,
}
