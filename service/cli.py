"""The `ctxpeft` command line: one entry point, one module per sub-command.

Usage:
    ctxpeft --help
    ctxpeft info                 # versions, device, presets
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence

from service.commands.common import CommandError

# name -> (module under service.commands, one-line help). Each module keeps its heavy imports
# (torch, transformers) inside run(), so `ctxpeft --help` stays fast.
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("info", "print versions, the selected device and the backbone presets"),
    "serve": ("serve", "run the HTTP service (graceful drain on SIGTERM)"),
    "train": ("train", "train an adapter set; its best epoch becomes a new store version"),
    "eval": ("eval", "perplexity, exact match, BLEU-4 and CIDEr of an adapter version"),
    "demo": ("demo", "build the demo backbone and one public adapter per synthetic task"),
    "adapters": (
        "adapters",
        "list, show, push and delete a running service's adapters; validate a folder offline",
    ),
    "backbone": ("backbone", "build a backbone (e.g. smol: real pretrained weights) offline"),
    "usage": ("usage", "a running service's usage ledger: tokens and requests per adapter"),
    "jobs": ("jobs", "create, list, show, follow and cancel a running service's fine-tuning jobs"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ctxpeft", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(f"service.commands.{module_name}")
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(sub_parser)
        sub_parser.set_defaults(_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args._module.run(args)
    except CommandError as error:
        if getattr(args, "json", False) and error.body is not None:
            print(json.dumps(error.body, indent=2))
        print(f"error: {error}", file=sys.stderr)
        return error.code
    return code


if __name__ == "__main__":
    sys.exit(main())
