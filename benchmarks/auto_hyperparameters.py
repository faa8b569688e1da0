"""How good are a fine-tuning job's `auto` hyperparameters? Held-out exact match of adapters
trained on unseen COCO-format captioning tasks, `auto` against fixed recipes, same data.

    python -m benchmarks.auto_hyperparameters --backbone var/backbones/demo --threads 1

Tasks the demo adapters were never trained on, with words the backbone knows: `kinds` (the
shapes' kinds left to right, "circle square") and `sizes` ("large small large"). For each task
and training-set size N, the N examples are written as a COCO captions zip and read back
through the upload parser (`service.jobs.data`), encoded and split as a job's worker does
(10% of the images held out for validation, by the job's seed), trained with
`train_adapter`, and scored by greedy exact match on 200 test images never trained on.

Recipes: `paper` (the paper's and `ctxpeft train`'s defaults: 8 epochs, batch 32, lr 1e-4,
constant), `30ep-1e-3` (30 epochs, batch 32, lr 1e-3, constant: the setting an earlier round
found better by hand), `auto` (service.jobs.auto.resolve: what a job with every
hyperparameter `auto` trains), and variants of `auto` that move one of its constants.
Rows go to benchmarks/results/auto_hyperparameters.json; docs/METHOD.md has the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import random
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from adapters.backbone import Backbone
from adapters.data.synthetic import SyntheticCaptions
from adapters.evaluation import evaluate
from adapters.model import ContextPEFTModel
from adapters.training import EncodedCaptions, TrainOptions, encode_items, train_adapter
from service.jobs import auto
from service.jobs.data import parse_training_file

RESULTS = Path(__file__).parent / "results" / "auto_hyperparameters.json"


def caption(task: str, source: SyntheticCaptions, index: int) -> str:
    shapes = source.scene(index).left_to_right()
    if task == "kinds":
        return " ".join(s.kind for s in shapes)
    if task == "sizes":
        return " ".join(s.size for s in shapes)
    raise ValueError(task)


def coco_zip(task: str, split: str, size: int, seed: int, folder: Path) -> Path:
    """N examples of `task` as the zip a tenant would upload (COCO captions + images)."""
    source = SyntheticCaptions("describe", split, size, seed)
    path = folder / f"{task}-{split}-{size}.zip"
    images, notes = [], []
    with zipfile.ZipFile(path, "w") as archive:
        for index in range(size):
            image, _ = source[index]
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            name = f"images/{index:05d}.png"
            archive.writestr(name, buffer.getvalue())
            images.append({"id": index, "file_name": f"{index:05d}.png"})
            notes.append({"image_id": index, "caption": caption(task, source, index)})
        archive.writestr("captions.json", json.dumps({"images": images, "annotations": notes}))
    return path


def encode_upload(backbone: Backbone, path: Path) -> EncodedCaptions:
    data = parse_training_file(path)
    try:
        groups = data.grouped()

        def item(index: int) -> tuple[Image.Image, list[str]]:
            key, captions = groups[index]
            with Image.open(io.BytesIO(data.image_bytes(key))) as image:
                return image.convert("RGB"), captions

        return encode_items(backbone, item, len(groups))
    finally:
        data.close()


def split(data: EncodedCaptions, seed: int) -> tuple[EncodedCaptions, EncodedCaptions]:
    """As the job's worker: 10% of the images (at least one) held out for validation."""
    images = list(range(data.num_images))
    random.Random(seed).shuffle(images)
    held = min(data.num_images - 1, max(1, round(0.1 * data.num_images)))
    return data.subset_images(sorted(images[held:])), data.subset_images(sorted(images[:held]))


def recipes(examples: int, variants: bool) -> dict[str, TrainOptions]:
    chosen = auto.resolve(examples)
    out = {
        "paper": TrainOptions(),
        "30ep-1e-3": TrainOptions(epochs=30, lr=1e-3),
        "auto": TrainOptions(
            epochs=chosen.n_epochs, batch_size=chosen.batch_size, lr=chosen.lr, schedule="cosine"
        ),
    }
    if variants:
        for target in (200, 800):
            epochs = max(auto.MIN_EPOCHS, min(auto.MAX_EPOCHS, -(-target * 8 // examples)))
            out[f"auto, {target} steps"] = dataclasses.replace(out["auto"], epochs=epochs)
        for multiplier in (1.0, 4.0):
            lr = auto.BASE_LEARNING_RATE * multiplier
            out[f"auto, multiplier {multiplier:g}"] = dataclasses.replace(out["auto"], lr=lr)
        out["auto, constant lr"] = dataclasses.replace(out["auto"], schedule="constant")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="var/backbones/demo")
    parser.add_argument("--tasks", nargs="+", default=["kinds", "sizes"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[100, 300, 1000])
    parser.add_argument("--variants-at", type=int, default=300, help="size with the variants")
    parser.add_argument("--recipes", nargs="+", help="only these recipes")
    parser.add_argument("--test-size", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--append", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    backbone = Backbone.load(args.backbone)
    model = ContextPEFTModel(backbone)
    rows: list[dict[str, Any]] = json.loads(RESULTS.read_text()) if args.append else []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for task in args.tasks:
            test = encode_upload(backbone, coco_zip(task, "test", args.test_size, 0, folder))
            for size in args.sizes:
                data = encode_upload(backbone, coco_zip(task, "train", size, args.seed, folder))
                train, val = split(data, args.seed)
                for name, options in recipes(len(train), size == args.variants_at).items():
                    if args.recipes and name not in args.recipes:
                        continue
                    options = dataclasses.replace(options, progress=False, seed=args.seed)
                    started = time.process_time()
                    result = train_adapter(model, train, val, options)
                    report = evaluate(model, result.adapter, test)
                    row = {
                        "task": task,
                        "examples": size,
                        "recipe": name,
                        "epochs": options.epochs,
                        "batch_size": options.batch_size,
                        "lr": options.lr,
                        "schedule": options.schedule,
                        "steps": options.epochs * -(-len(train) // options.batch_size),
                        "exact_match": report.exact_match,
                        "perplexity": report.perplexity,
                        "best_epoch": result.best_epoch,
                        "cpu_s": round(time.process_time() - started, 1),
                    }
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    RESULTS.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
