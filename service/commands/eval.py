"""`ctxpeft eval`: perplexity, exact match, BLEU-4 and CIDEr of one adapter version.

Usage:
    ctxpeft eval --name count --synthetic count              # 200 held-out test images
    ctxpeft eval --name my-captions data/test.json --json    # a COCO / JSONL dataset
    ctxpeft eval --adapter path/to/version/folder --synthetic colors

The adapter is the newest version of --tenant/--name in the store (or --version N), or a
version folder given with --adapter; it is validated against the backbone before use.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from service.commands.common import (
    CommandError,
    add_common_arguments,
    load_backbone,
    resolve_common,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", nargs="?", type=Path, help="COCO captions JSON or JSONL file")
    parser.add_argument("--images", type=Path, help="image folder (default: beside the data file)")
    parser.add_argument("--synthetic", metavar="TASK", help="evaluate on a synthetic shapes task")
    parser.add_argument("--split", choices=("train", "val", "test"), default="test")
    parser.add_argument("--size", type=int, default=200, help="synthetic images (default 200)")
    parser.add_argument("--seed", type=int, default=0, help="synthetic data seed")
    parser.add_argument("--name", help="adapter name in the store")
    parser.add_argument("--tenant", default="public", help="owning tenant (default: public)")
    parser.add_argument("--version", type=int, help="adapter version (default: the newest)")
    parser.add_argument("--adapter", type=Path, help="an adapter version folder instead of --name")
    add_common_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, help="default: longest reference + 4")
    parser.add_argument("--examples", type=int, default=3, help="example captions to print")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _adapter_folder(args: argparse.Namespace, store_dir: Path) -> tuple[Path, str]:
    from service.store import AdapterRef, AdapterStore
    from service.tenancy import InvalidId

    if args.adapter is not None:
        if args.name is not None:
            raise CommandError("give either --adapter or --name, not both")
        return args.adapter, str(args.adapter)
    if args.name is None:
        raise CommandError("name the adapter: --name NAME (or --adapter FOLDER)")
    try:
        store = AdapterStore(store_dir)
        ref = (
            AdapterRef(args.tenant, args.name, args.version)
            if args.version is not None
            else store.latest(args.tenant, args.name)
        )
    except InvalidId as error:
        raise CommandError(str(error)) from error
    if ref is None or not store.exists(ref):
        what = f"{args.tenant}/{args.name}" + (f"@v{args.version}" if args.version else "")
        raise CommandError(f"adapter {what} not found in {store_dir}")
    return store.path(ref), ref.label


def run(args: argparse.Namespace) -> int:
    from adapters.data.captions import CaptionDataError, load_caption_records
    from adapters.data.synthetic import TASKS, SyntheticCaptions
    from adapters.evaluation import evaluate
    from adapters.format import AdapterFormatError, load_adapter
    from adapters.model import ContextPEFTModel
    from adapters.training import encode_records, encode_source

    runtime, store_dir, backbone_spec, device = resolve_common(args)
    folder, label = _adapter_folder(args, store_dir)
    if (args.data is None) == (args.synthetic is None):
        raise CommandError("give a data file (COCO captions JSON or JSONL) or --synthetic TASK")
    if args.synthetic is not None and args.synthetic not in TASKS:
        raise CommandError(f"unknown synthetic task {args.synthetic!r}; choose from {TASKS}")
    backbone = load_backbone(backbone_spec, runtime, device)
    try:
        adapter = load_adapter(
            folder, backbone.dims, backbone.fingerprint(), vision_dim=backbone.vision_dim
        )
    except AdapterFormatError as error:
        raise CommandError(f"{label}: {error}") from error
    progress = not args.no_progress
    if args.synthetic is not None:
        source = SyntheticCaptions(
            args.synthetic, args.split, args.size, args.seed, backbone.config.image_size
        )
        data = encode_source(backbone, source, progress=progress)
        what = f"{args.size} synthetic '{args.synthetic}' {args.split} images"
    else:
        try:
            report = load_caption_records(args.data, args.images)
        except CaptionDataError as error:
            raise CommandError(str(error)) from error
        if not args.json:
            print(report.summary())
        data = encode_records(backbone, report.records, progress=progress)
        what = f"{data.num_images} images of {args.data}"
    result = evaluate(
        ContextPEFTModel(backbone),
        adapter,
        data,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        progress=progress,
        examples=args.examples,
    )
    if args.json:
        print(json.dumps({"adapter": label, **result.as_dict()}))
        return 0
    print(f"{label} on {what}:")
    print(f"  perplexity   {result.perplexity:.4f}")
    print(f"  exact match  {result.exact_match:.1%}")
    print(f"  BLEU-4       {result.bleu4:.4f}")
    print(f"  CIDEr        {result.cider:.4f}")
    for predicted, reference in result.examples:
        print(
            f"  {'ok ' if predicted == reference else 'bad'} {predicted!r} (reference {reference!r})"
        )
    return 0
