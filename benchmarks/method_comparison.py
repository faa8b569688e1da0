"""The paper's method comparison, reproduced on the synthetic tasks with the demo backbone.

    python -m benchmarks.method_comparison                  # table on stdout, JSON + plot
    python -m benchmarks.method_comparison --tasks describe --epochs 2 --train-images 500
    python -m benchmarks.method_comparison --seeds 1 2 --append   # more seeds, same file
    python -m benchmarks.method_comparison --replot                # table and plot from JSON

Every configuration trains one adapter set per task with the same budget (epochs, images,
batch size, learning rate and schedule: the demo recipe), is chosen by validation loss as
`ctxpeft train` chooses, and is scored on the validation images (perplexity and exact match
of greedy captions):
  connector only   the connector alone, LM frozen (IA3 tensors held at one: the identity)
  IA3, BitFit, LoRA r=1, LoRA r=8   each context-agnostic and context-specific
  full fine-tuning every LM weight trainable, connector too (on a copy of the backbone)
Trainable parameter counts are the LM's (as the paper's Table 3 counts them) and the
connector's. Results go to benchmarks/results/method_comparison.json and the plot to
docs/method_comparison.png. Needs the demo backbone (`ctxpeft demo`).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from adapters.backbone import Backbone
from adapters.data.synthetic import SyntheticCaptions
from adapters.demo import DemoPlan, backbone_dir
from adapters.evaluation import evaluate
from adapters.model import ContextPEFTModel
from adapters.training import TrainOptions, encode_source, train_adapter
from benchmarks.plotting import save_figure

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks/results/method_comparison.json"


@dataclass(frozen=True)
class Variant:
    label: str
    family: str  # connector, ia3, bitfit, lora-r1, lora-r8, full
    contexts: str  # specific, agnostic, or "-" where contexts do not apply
    options: dict[str, Any]


VARIANTS: tuple[Variant, ...] = (
    Variant("connector only", "connector", "-", {"method": "ia3", "scope": "connector"}),
    Variant("IA3 agnostic", "ia3", "agnostic", {"method": "ia3", "contexts": "agnostic"}),
    Variant("IA3 specific", "ia3", "specific", {"method": "ia3"}),
    Variant("BitFit agnostic", "bitfit", "agnostic", {"method": "bitfit", "contexts": "agnostic"}),
    Variant("BitFit specific", "bitfit", "specific", {"method": "bitfit"}),
    Variant("LoRA r=1 agnostic", "lora-r1", "agnostic", {"rank": 1, "contexts": "agnostic"}),
    Variant("LoRA r=1 specific", "lora-r1", "specific", {"rank": 1}),
    Variant("LoRA r=8 agnostic", "lora-r8", "agnostic", {"rank": 8, "contexts": "agnostic"}),
    Variant("LoRA r=8 specific", "lora-r8", "specific", {"rank": 8}),
    Variant("full fine-tuning", "full", "-", {"method": "ia3", "scope": "full"}),
)


def run_variant(
    model: ContextPEFTModel,
    variant: Variant,
    task: str,
    data: tuple[Any, Any],
    base: TrainOptions,
    seed: int,
) -> dict[str, Any]:
    train, val = data
    options = dataclasses.replace(base, seed=seed, **variant.options)
    # Full fine-tuning changes the LM in place: train a copy, keep the frozen one intact.
    own = ContextPEFTModel(copy.deepcopy(model.backbone)) if options.scope == "full" else model
    started = time.perf_counter()
    result = train_adapter(own, train, val, options)
    report = evaluate(own, result.adapter, val)
    return {
        "variant": variant.label,
        "family": variant.family,
        "contexts": variant.contexts,
        "task": task,
        "seed": seed,
        "val_perplexity": result.best.val_perplexity,
        "val_exact_match": report.exact_match,
        "best_epoch": result.best_epoch,
        "lm_parameters": result.trainable_lm_parameters,
        "connector_parameters": result.trainable_connector_parameters,
        "seconds": time.perf_counter() - started,
    }


def summarise(rows: list[dict[str, Any]], tasks: list[str]) -> list[dict[str, Any]]:
    """One row per variant: per task the mean, min and max over seeds of validation
    perplexity and exact match, and the number of seeds."""
    table = []
    for variant in VARIANTS:
        mine = [r for r in rows if r["variant"] == variant.label]
        if not mine:
            continue
        entry: dict[str, Any] = {
            "variant": variant.label,
            "lm_parameters": mine[0]["lm_parameters"],
            "connector_parameters": mine[0]["connector_parameters"],
        }
        for task in tasks:
            runs = [r for r in mine if r["task"] == task]
            for key, name in (("val_perplexity", "ppl"), ("val_exact_match", "em")):
                values = [r[key] for r in runs]
                entry[f"{name}_{task}"] = statistics.fmean(values)
                entry[f"{name}_{task}_min"] = min(values)
                entry[f"{name}_{task}_max"] = max(values)
            entry[f"seeds_{task}"] = len(runs)
        table.append(entry)
    return table


def _cell(row: dict[str, Any], key: str, percent: bool) -> str:
    mean, low, high = row[key], row[f"{key}_min"], row[f"{key}_max"]
    if percent:
        text = f"{100 * mean:.1f}%"
        return text if low == high else f"{text} ({100 * low:.1f} to {100 * high:.1f})"
    return f"{mean:.3f}" if low == high else f"{mean:.3f} ({low:.3f} to {high:.3f})"


def markdown(table: list[dict[str, Any]], tasks: list[str]) -> str:
    head = ["variant", "LM params", *[f"ppl {t}" for t in tasks], *[f"EM {t}" for t in tasks]]
    head.append("seeds")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in table:
        cells = [row["variant"], f"{row['lm_parameters']:,}"]
        cells += [_cell(row, f"ppl_{t}", False) for t in tasks]
        cells += [_cell(row, f"em_{t}", True) for t in tasks]
        cells.append("/".join(str(row[f"seeds_{t}"]) for t in tasks))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(table: list[dict[str, Any]], tasks: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [row["variant"] for row in table]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    width = 0.8 / len(tasks)
    for i, task in enumerate(tasks):
        xs = [x + (i - (len(tasks) - 1) / 2) * width for x in range(len(table))]
        for ax, key, scale in ((axes[0], "ppl", 1.0), (axes[1], "em", 100.0)):
            means = [scale * row[f"{key}_{task}"] for row in table]
            low = [
                m - scale * row[f"{key}_{task}_min"] for m, row in zip(means, table, strict=True)
            ]
            high = [
                scale * row[f"{key}_{task}_max"] - m for m, row in zip(means, table, strict=True)
            ]
            # Perplexity bars start at 1 (a perfect model), so their heights compare.
            bottom = 1.0 if key == "ppl" else 0.0
            heights = [m - bottom for m in means]
            ax.bar(xs, heights, width, bottom=bottom, label=task, yerr=[low, high], capsize=2)
    axes[0].set_ylabel("validation perplexity (lower is better)")
    axes[1].set_ylabel("validation exact match, % (higher is better)")
    axes[0].set_ylim(bottom=1.0)
    for ax in axes:
        ax.set_xticks(range(len(table)))
        ax.set_xticklabels(labels, rotation=40, ha="right", fontsize=8)
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(
        "Context-PEFT methods on the synthetic tasks (demo backbone, same budget; "
        "bars: mean over seeds, whiskers: min to max)",
        fontsize=10,
    )
    save_figure(fig, path)


def main() -> None:
    plan = DemoPlan()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime-dir", type=Path, default=ROOT / "var")
    parser.add_argument("--tasks", nargs="+", default=["describe", "colors"])
    parser.add_argument("--variants", nargs="+", help="labels to run (default: all)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--train-images", type=int, default=1000)
    parser.add_argument("--val-images", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=plan.adapter.epochs)
    parser.add_argument("--batch-size", type=int, default=plan.adapter.batch_size)
    parser.add_argument("--lr", type=float, default=plan.adapter.lr)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--plot", type=Path, default=ROOT / "docs/method_comparison.png")
    parser.add_argument(
        "--append", action="store_true", help="add these runs to the rows already in --out"
    )
    parser.add_argument(
        "--replot", action="store_true", help="only redraw the table and plot from --out"
    )
    args = parser.parse_args()
    if args.replot:
        saved = json.loads(args.out.read_text())
        report(saved["rows"], saved["setup"]["tasks"], args.plot)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    folder = backbone_dir(args.runtime_dir, "demo")
    if not (folder / "backbone.json").is_file():
        raise SystemExit(f"no demo backbone at {folder}: run `ctxpeft demo` first")
    backbone = Backbone.load(folder)
    model = ContextPEFTModel(backbone)
    base = dataclasses.replace(
        plan.adapter, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, progress=False
    )
    setup = {
        "backbone": str(folder),
        "fingerprint": backbone.fingerprint(),
        "tasks": args.tasks,
        "train_images": args.train_images,
        "val_images": args.val_images,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "schedule": base.schedule,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
    }
    rows: list[dict[str, Any]] = []
    if args.append:
        saved = json.loads(args.out.read_text())
        if saved["setup"]["fingerprint"] != setup["fingerprint"]:
            raise SystemExit(f"{args.out} was measured on another backbone; cannot append")
        rows = saved["rows"]
    variants = [v for v in VARIANTS if args.variants is None or v.label in args.variants]
    started = time.perf_counter()
    for task in args.tasks:
        size = backbone.config.image_size
        train = encode_source(
            backbone, SyntheticCaptions(task, "train", args.train_images, 0, size)
        )
        val = encode_source(backbone, SyntheticCaptions(task, "val", args.val_images, 0, size))
        for seed in args.seeds:
            for variant in variants:
                row = run_variant(model, variant, task, (train, val), base, seed)
                rows.append(row)
                print(
                    f"{task:12s} {variant.label:18s} seed {seed}  ppl "
                    f"{row['val_perplexity']:8.4f}  EM {row['val_exact_match']:6.1%}  "
                    f"LM params {row['lm_parameters']:>9,}  ({row['seconds']:.0f}s)",
                    flush=True,
                )
    setup["seconds"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"setup": setup, "rows": rows}, indent=2) + "\n")
    report(rows, args.tasks, args.plot)
    print(f"\nwrote {args.out} and {args.plot}")


def report(rows: list[dict[str, Any]], tasks: list[str], plot_path: Path) -> None:
    table = summarise(rows, tasks)
    print()
    print(markdown(table, tasks))
    plot(table, tasks, plot_path)


if __name__ == "__main__":
    main()
