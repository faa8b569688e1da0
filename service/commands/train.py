"""`ctxpeft train`: train one adapter set and write its best epoch as a new store version.

Usage:
    ctxpeft train data/captions.json --name my-captions            # COCO captions JSON
    ctxpeft train data/train.jsonl --val data/val.jsonl --name x    # JSONL, explicit val set
    ctxpeft train --synthetic count --name my-count --lr 3e-3       # the synthetic shapes data

Defaults are the paper's recipe (Adam lr 1e-4, betas 0.9/0.95, connector dropout 0.1,
context-specific LoRA r=8 on attention + FFN, 8 epochs). Everything is checked before the
first step: bad items are reported (count and file names) and skipped, and a dataset with
nothing usable stops here with a message, so a run never dies mid-epoch on bad data. The best
epoch (lowest validation loss) is written with `AdapterStore.write_version`: a new version,
atomically; an interrupted run leaves every earlier version as it was.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path
from typing import TYPE_CHECKING

from service.commands.common import (
    CommandError,
    add_common_arguments,
    load_backbone,
    resolve_common,
    write_adapter_version,
)

if TYPE_CHECKING:
    from adapters.backbone import Backbone
    from adapters.training import EncodedCaptions


def add_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data")
    data.add_argument("data", nargs="?", type=Path, help="COCO captions JSON or JSONL file")
    data.add_argument("--images", type=Path, help="image folder (default: beside the data file)")
    data.add_argument("--val", type=Path, help="validation file (default: hold out --val-fraction)")
    data.add_argument(
        "--val-fraction", type=float, default=0.1, help="images held out for validation"
    )
    data.add_argument("--synthetic", metavar="TASK", help="train on a synthetic shapes task")
    data.add_argument("--train-size", type=int, default=2000, help="synthetic train images")
    data.add_argument("--val-size", type=int, default=200, help="synthetic validation images")

    out = parser.add_argument_group("output")
    out.add_argument("--name", required=True, help="adapter name in the store")
    out.add_argument("--tenant", default="public", help="owning tenant (default: public)")
    add_common_arguments(parser)

    method = parser.add_argument_group("method and recipe (defaults: the paper's)")
    method.add_argument("--method", choices=("lora", "ia3", "bitfit"), default="lora")
    method.add_argument("--contexts", choices=("specific", "agnostic"), default="specific")
    method.add_argument("--rank", type=int, default=8, help="LoRA rank")
    method.add_argument("--alpha", type=float, help="LoRA alpha (default: = rank, scaling 1)")
    method.add_argument(
        "--targets", default="all", help="attn, ffn, all, or comma-separated module names"
    )
    method.add_argument(
        "--connector-only", action="store_true", help="train the connector alone (frozen LM)"
    )
    method.add_argument("--epochs", type=int, default=8)
    method.add_argument("--batch-size", type=int, default=32)
    method.add_argument("--lr", type=float, default=1e-4)
    method.add_argument("--schedule", choices=("constant", "cosine"), default="constant")
    method.add_argument("--connector-dropout", type=float, default=0.1)
    method.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _split_by_image(
    data: EncodedCaptions, fraction: float, seed: int
) -> tuple[EncodedCaptions, EncodedCaptions]:
    if data.num_images < 2:
        raise CommandError(
            f"need at least 2 usable images to hold one out for validation, found {data.num_images}; "
            "add images or pass --val"
        )
    images = list(range(data.num_images))
    random.Random(seed).shuffle(images)
    held = min(data.num_images - 1, max(1, round(fraction * data.num_images)))
    return data.subset_images(sorted(images[held:])), data.subset_images(sorted(images[:held]))


def _load_file(
    path: Path, images: Path | None, backbone: Backbone, progress: bool
) -> EncodedCaptions:
    from adapters.data.captions import CaptionDataError, load_caption_records
    from adapters.training import encode_records

    try:
        report = load_caption_records(path, images)
    except CaptionDataError as error:
        raise CommandError(str(error)) from error
    print(report.summary())
    data = encode_records(backbone, report.records, progress=progress)
    _check_vocabulary(data, backbone, path.name)
    return data


def _check_vocabulary(data: EncodedCaptions, backbone: Backbone, what: str) -> None:
    unk = backbone.tokenizer.unk_token_id
    if data.unknown_words:
        if unk is not None and all(all(t == unk for t in ids) for ids in data.tokens):
            raise CommandError(
                f"no word of any caption of {what} is in the backbone's vocabulary; "
                "use a backbone whose tokenizer covers this data"
            )
        print(
            f"warning: {data.unknown_words} of {len(data)} captions of {what} contain words "
            "the backbone's tokenizer does not know (trained as <unk>)"
        )
    if data.truncated:
        print(f"warning: {data.truncated} captions of {what} were cut to fit the LM's context")


def load_datasets(
    args: argparse.Namespace, backbone: Backbone, progress: bool
) -> tuple[EncodedCaptions, EncodedCaptions]:
    """(train, val), validated and encoded; raises CommandError before any training."""
    from adapters.data.synthetic import TASKS, SyntheticCaptions
    from adapters.training import encode_source

    if args.synthetic is not None:
        if args.data is not None:
            raise CommandError("give either a data file or --synthetic, not both")
        if args.synthetic not in TASKS:
            raise CommandError(f"unknown synthetic task {args.synthetic!r}; choose from {TASKS}")
        if args.train_size < 1 or args.val_size < 1:
            raise CommandError("--train-size and --val-size must be >= 1")
        size = backbone.config.image_size
        train_src = SyntheticCaptions(args.synthetic, "train", args.train_size, args.seed, size)
        val_src = SyntheticCaptions(args.synthetic, "val", args.val_size, args.seed, size)
        return encode_source(backbone, train_src), encode_source(backbone, val_src)
    if args.data is None:
        raise CommandError("give a data file (COCO captions JSON or JSONL) or --synthetic TASK")
    if not 0.0 < args.val_fraction < 1.0:
        raise CommandError(f"--val-fraction must be between 0 and 1, got {args.val_fraction}")
    train = _load_file(args.data, args.images, backbone, progress)
    if args.val is not None:
        val = _load_file(args.val, args.images, backbone, progress)
    else:
        train, val = _split_by_image(train, args.val_fraction, args.seed)
    return train, val


def run(args: argparse.Namespace) -> int:
    from adapters.training import EpochStats, TrainingError, TrainOptions, train_adapter
    from service.store import AdapterStore
    from service.tenancy import InvalidId, check_name, check_tenant

    try:
        check_name(args.name)
        check_tenant(args.tenant)
    except InvalidId as error:
        raise CommandError(str(error)) from error
    runtime, store_dir, backbone_spec, device = resolve_common(args)
    progress = not args.no_progress
    targets: str | tuple[str, ...] = args.targets
    if "," in args.targets or args.targets not in ("attn", "ffn", "all"):
        targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    try:
        options = TrainOptions(
            method=args.method,
            contexts=args.contexts,
            rank=args.rank,
            alpha=args.alpha,
            targets=targets,
            scope="connector" if args.connector_only else "adapter",
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            schedule=args.schedule,
            connector_dropout=args.connector_dropout,
            seed=args.seed,
            device=device,
            progress=progress,
            description=f"trained by ctxpeft train on {args.synthetic or args.data}",
        )
    except ValueError as error:
        raise CommandError(str(error)) from error

    from adapters.model import ContextPEFTModel

    backbone = load_backbone(backbone_spec, runtime, device)
    train, val = load_datasets(args, backbone, progress)
    print(
        f"training {options.contexts} {options.method} on {len(train)} captions of "
        f"{train.num_images} images (validation: {len(val)} captions of {val.num_images} images)"
    )

    def report(stats: EpochStats) -> None:
        print(
            f"epoch {stats.epoch}/{options.epochs}: train loss {stats.train_loss:.4f}, "
            f"val loss {stats.val_loss:.4f}, val perplexity {stats.val_perplexity:.3f} "
            f"({stats.seconds:.1f}s)",
            flush=True,
        )

    store = AdapterStore(store_dir)
    try:
        result = train_adapter(ContextPEFTModel(backbone), train, val, options, on_epoch=report)
    except TrainingError as error:
        raise CommandError(f"{error}; no version written") from error
    except KeyboardInterrupt:
        print("interrupted: no version written; earlier versions are unchanged")
        return 130
    ref = write_adapter_version(store, args.tenant, args.name, result.adapter)
    print(
        f"best epoch {result.best_epoch} (val perplexity {result.best.val_perplexity:.3f}); "
        f"wrote {ref.label} to {store.path(ref)}"
    )
    return 0
