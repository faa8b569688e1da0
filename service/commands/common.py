"""What the sub-commands share: the one error that stops a command, the options of train,
eval and demo, and loading the backbone they name.

    raise CommandError("--rank must be >= 1")          # `error: ...` on stderr, exit status 2
    raise CommandError(message, code=4, body=answer)    # another status; --json prints `body`

`service.cli.main` catches CommandError, once for every command.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from adapters.adapter_set import AdapterSet
    from adapters.backbone import Backbone
    from service.store import AdapterRef, AdapterStore

USAGE = 2  # exit status of a command stopped before it did its work


class CommandError(Exception):
    """Stops a command: the message goes to stderr as `error: ...` and the command exits with
    `code`; `body` (the service's JSON answer, a report) is printed on stdout under --json."""

    def __init__(self, message: str, code: int = USAGE, body: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.body = body


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by train, eval and demo (defaults come from CTXPEFT_* settings)."""
    parser.add_argument("--runtime-dir", type=Path, help="runtime folder (default: var)")
    parser.add_argument(
        "--store",
        type=Path,
        help="adapter store folder (default: <runtime-dir>/adapters for the demo backbone, "
        "<runtime-dir>/adapters-<name> for another backbone named by name)",
    )
    parser.add_argument(
        "--backbone",
        help="a saved backbone folder, or the name of one built under <runtime-dir>/backbones "
        "(default: demo, built by `ctxpeft demo`)",
    )
    parser.add_argument("--device", help="torch device: auto (default), cpu, cuda, cuda:1")
    parser.add_argument(
        "--threads", type=int, help="CPU threads for torch (default: torch's choice)"
    )


def resolve_common(args: argparse.Namespace) -> tuple[Path, Path, str, str]:
    """(runtime dir, store dir, backbone spec, device) from flags, else CTXPEFT_* settings.
    Applies --threads."""
    from service.logging import configure_logging
    from service.settings import Settings, default_store_dir

    if args.threads is not None:
        import torch

        if args.threads < 1:
            raise CommandError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)

    settings = Settings()
    # Library warnings and log records as JSON lines on stderr, as in `ctxpeft serve`; the
    # command's own report (stdout) and progress bars (--no-progress) are for a person.
    configure_logging(settings.log_level, settings.log_json)
    if getattr(args, "no_progress", False):
        # No progress bars at all, Hugging Face's (weight loading and saving) included.
        from huggingface_hub.utils import disable_progress_bars
        from transformers.utils.logging import disable_progress_bar

        disable_progress_bar()
        disable_progress_bars()
    runtime = args.runtime_dir or settings.runtime_dir
    backbone = args.backbone or settings.backbone
    store = args.store or (
        settings.store_dir
        if settings.store_dir is not None
        else default_store_dir(runtime, backbone)
    )
    return runtime, store, backbone, args.device or settings.device


def load_backbone(spec: str, runtime_dir: Path, device: str) -> Backbone:
    """The backbone `spec` names (`adapters.backbone_build.resolve_backbone`: a saved folder,
    a config JSON, one built under the runtime folder, a pretrained preset)."""
    from adapters.backbone import Backbone
    from adapters.backbone_build import BackboneNotFound, resolve_backbone
    from adapters.packaged import PackagedWeightsError

    try:
        return Backbone.load(resolve_backbone(spec, runtime_dir).source, device)
    except (BackboneNotFound, PackagedWeightsError) as error:
        raise CommandError(str(error)) from None


def write_adapter_version(
    store: AdapterStore, tenant: str, name: str, adapter: AdapterSet
) -> AdapterRef:
    """A new version of tenant/name holding `adapter` (atomic, never overwrites)."""
    from adapters.format import save_adapter

    return store.write_version(tenant, name, lambda folder: save_adapter(adapter, folder))
