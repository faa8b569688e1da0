"""One fine-tuning job's training process: `python -m service.jobs.worker <job folder>`.

The supervisor (`service.jobs.manager`) writes `spec.json` into the job folder and starts
this process (`service.jobs.runner`); they talk through files in that folder only, so the
same worker runs as a child of the service or inside a Ray task:

    spec.json        what to train (written by the supervisor, read here)
    events.jsonl     what happened, one JSON object a line (appended here, read there)
    control          "cancel" or "pause" (written there, read here before every step)
    checkpoint.pt    the latest resumable state (an epoch's end, or where a pause stopped)
    result/          the trained adapter (adapter_config.json + adapter.safetensors)
    worker.lock      held (flock) while this process lives: a supervisor that restarts
                     finds out whether an old worker is still alive
    worker.log       this process's stderr

Before anything heavy is imported the process bounds itself: nice (jobs_nice) and the idle
scheduling class (jobs_sched_idle), memory
(RLIMIT_DATA = jobs_memory_limit_mb: an allocation beyond it fails, and the job fails with
`memory_limit`), threads (jobs_threads, through the environment and torch), and
PR_SET_PDEATHSIG so that it dies with its parent (a service that is killed never leaves a
trainer behind that a restarted service would race).

Training is `adapters.training.train_adapter`, the function `ctxpeft train` runs, with a step
hook (control file, metrics events every `metrics_every` steps) and a checkpoint at every
epoch's end. A run resumed from `checkpoint.pt` gives the same adapter as one never stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import json
import math
import os
import resource
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import IO, Any

SPEC = "spec.json"
EVENTS = "events.jsonl"
CONTROL = "control"
CHECKPOINT = "checkpoint.pt"
RESULT = "result"
LOCK = "worker.lock"
PID = "worker.pid"

EXIT_OK = 0  # finished, paused or cancelled: the last record of events.jsonl says which
EXIT_FAILED = 3  # failed; the last record is an "error"
_PR_SET_PDEATHSIG = 1


class JobFailed(Exception):
    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.param = code, message, param


class Events:
    """Appends records to events.jsonl (flushed per record: the supervisor tails it)."""

    def __init__(self, path: Path) -> None:
        self._handle: IO[str] = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed by close)

    def write(self, kind: str, **fields: Any) -> None:
        self._handle.write(json.dumps({"kind": kind, "time": time.time(), **fields}) + "\n")
        self._handle.flush()

    def event(
        self,
        message: str,
        level: str = "info",
        data: dict[str, Any] | None = None,
        type: str = "message",
    ) -> None:
        self.write("event", level=level, message=message, type=type, data=data)

    def close(self) -> None:
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()


def bound_process(parent: int) -> None:
    """Priority, memory and parent-death signal, from the environment the runner set."""
    try:  # ask the kernel for SIGKILL when the parent goes (Linux)
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if parent and os.getppid() != parent:  # it went before prctl took effect
        os._exit(EXIT_FAILED)
    nice = int(os.environ.get("CTXPEFT_WORKER_NICE", "0"))
    if nice > 0:
        os.nice(nice)
    if os.environ.get("CTXPEFT_WORKER_SCHED_IDLE") == "1" and hasattr(os, "SCHED_IDLE"):
        # Linux's idle class: the process runs on CPU time nothing else wants, and a waking
        # serving thread preempts it at once (a niceness only lowers its share). Threads
        # torch starts later inherit it.
        with contextlib.suppress(OSError):
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    memory = int(os.environ.get("CTXPEFT_WORKER_MEMORY_BYTES", "0"))
    if memory > 0:
        resource.setrlimit(resource.RLIMIT_DATA, (memory, memory))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.jobs.worker")
    parser.add_argument("job_dir", type=Path)
    parser.add_argument("--parent", type=int, default=0)
    args = parser.parse_args(argv)
    bound_process(args.parent)
    job_dir: Path = args.job_dir
    with open(job_dir / LOCK, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print("another worker holds this job", file=sys.stderr)
            return EXIT_FAILED
        (job_dir / PID).write_text(str(os.getpid()))
        events = Events(job_dir / EVENTS)
        try:
            return _run(job_dir, json.loads((job_dir / SPEC).read_text()), events)
        finally:
            events.close()


def _run(job_dir: Path, spec: dict[str, Any], events: Events) -> int:
    where = os.environ.get("CTXPEFT_WORKER_WHERE", "a child process of the service")
    events.write("started", pid=os.getpid(), where=where)
    try:
        _train(job_dir, spec, events)
    except JobFailed as failed:
        events.write("error", code=failed.code, message=failed.message, param=failed.param)
        return EXIT_FAILED
    except MemoryError:
        events.write("error", code="memory_limit", message=_memory_message(spec), param=None)
        return EXIT_FAILED
    except RuntimeError as error:
        if "can't allocate memory" in str(error) or "out of memory" in str(error).lower():
            events.write("error", code="memory_limit", message=_memory_message(spec), param=None)
        else:
            traceback.print_exc()
            events.write("error", code="training_error", message=_one_line(error), param=None)
        return EXIT_FAILED
    except Exception as error:
        traceback.print_exc()
        events.write("error", code="worker_error", message=_one_line(error), param=None)
        return EXIT_FAILED
    return EXIT_OK


def _memory_message(spec: dict[str, Any]) -> str:
    limit = int(os.environ.get("CTXPEFT_WORKER_MEMORY_BYTES", "0")) >> 20
    return (
        f"the training process ran out of memory under the job memory bound of {limit} MiB "
        "(jobs_memory_limit_mb): use fewer or smaller images, a smaller batch_size, or ask the "
        "operator for a larger bound"
    )


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:500]}"


def control(job_dir: Path) -> str | None:
    """What the supervisor asks ("cancel", "pause"), or None."""
    try:
        return (job_dir / CONTROL).read_text().strip() or None
    except FileNotFoundError:
        return None


def _train(job_dir: Path, spec: dict[str, Any], events: Events) -> None:
    import torch

    threads = int(os.environ.get("CTXPEFT_WORKER_THREADS", "1"))
    torch.set_num_threads(max(1, threads))
    from transformers.utils.logging import disable_progress_bar

    disable_progress_bar()

    from adapters.backbone import Backbone
    from adapters.format import save_adapter
    from adapters.model import ContextPEFTModel
    from adapters.training import (
        EpochStats,
        StepStats,
        TrainCheckpoint,
        TrainingError,
        TrainingStopped,
        TrainOptions,
        mean_loss,
        train_adapter,
    )

    if control(job_dir) == "cancel":
        events.write("stopped", reason="cancel", step=0)
        return
    backbone = Backbone.load(spec["backbone"], device=spec.get("device", "cpu"))
    fingerprint = backbone.fingerprint()
    if spec.get("fingerprint") and fingerprint != spec["fingerprint"]:
        raise JobFailed(
            "backbone_mismatch",
            f"the backbone the job loads ({spec['backbone']}) is not the one the service "
            "serves (their fingerprints differ): set jobs_backbone to the served backbone's "
            "folder",
        )
    train, val, notes = _datasets(backbone, spec)
    for note in notes:
        events.event(note, level="warn")
    values = dict(spec["options"])
    if isinstance(values.get("targets"), list):
        values["targets"] = tuple(values["targets"])
    options = TrainOptions(**values, progress=False, device=spec.get("device", "cpu"))
    resume: TrainCheckpoint | None = None
    checkpoint_path = job_dir / CHECKPOINT
    if checkpoint_path.is_file():
        try:
            resume = TrainCheckpoint.load(checkpoint_path)
        except Exception as error:  # unreadable (a crash while writing cannot: it is atomic)
            events.event(
                f"The checkpoint cannot be read ({error}); training from the start", "warn"
            )
    steps_per_epoch = -(-len(train) // options.batch_size)
    total_steps = steps_per_epoch * options.epochs
    if resume is not None:
        events.event(
            f"Resuming from the checkpoint at step {resume.steps_done}/{total_steps} "
            f"(epoch {resume.epoch})"
        )
    else:
        events.event(
            f"Training {options.contexts} {options.method} on {len(train)} examples of "
            f"{train.num_images} images ({val.num_images} images held for validation): "
            f"{options.epochs} epochs of {steps_per_epoch} steps, batch size "
            f"{options.batch_size}, learning rate {options.lr:g}"
        )
    events.write(
        "plan",
        total_steps=total_steps,
        tokens_per_epoch=_tokens(train),
        start_step=resume.steps_done if resume is not None else 0,
    )
    asked = control(job_dir)
    if asked in ("cancel", "pause"):  # asked while the images were encoded
        if resume is not None:
            resume.save(checkpoint_path)
        events.write("stopped", reason=asked, step=resume.steps_done if resume else 0)
        return
    probe = val.subset_images(list(range(min(8, val.num_images))))
    every = max(1, int(spec.get("metrics_every", 10)))
    window: list[tuple[float, int]] = []
    model = ContextPEFTModel(backbone)

    def on_step(stats: StepStats) -> bool:
        window.append((stats.loss * stats.tokens, stats.tokens))
        if stats.step % every == 0 or stats.step == stats.total_steps:
            weighted, tokens = (sum(x) for x in zip(*window, strict=True))
            window.clear()
            valid = mean_loss(model, stats.adapter, probe)
            data = {
                "step": stats.step,
                "total_steps": stats.total_steps,
                "epoch": stats.epoch,
                "train_loss": weighted / max(tokens, 1),
                "valid_loss": valid,
                "valid_perplexity": math.exp(min(valid, 50.0)),
                "learning_rate": stats.lr,
            }
            events.event(
                f"Step {stats.step}/{stats.total_steps}: training loss={data['train_loss']:.4f}, "
                f"validation loss={valid:.4f}",
                data=data,
                type="metrics",
            )
            events.write("progress", step=stats.step, total_steps=stats.total_steps)
        asked = control(job_dir)
        return asked in ("cancel", "pause")

    def on_epoch(stats: EpochStats) -> None:
        data = {
            "step": stats.epoch * steps_per_epoch,
            "total_steps": total_steps,
            "epoch": stats.epoch,
            "train_loss": stats.train_loss,
            "full_valid_loss": stats.val_loss,
            "full_valid_perplexity": stats.val_perplexity,
        }
        events.event(
            f"Epoch {stats.epoch}/{options.epochs}: training loss={stats.train_loss:.4f}, "
            f"validation loss={stats.val_loss:.4f}, validation perplexity="
            f"{stats.val_perplexity:.4f}",
            data=data,
            type="metrics",
        )
        epoch_metrics[:] = [data]

    def on_checkpoint(checkpoint: TrainCheckpoint) -> None:
        checkpoint.save(checkpoint_path)
        metrics = dict(epoch_metrics[0]) if epoch_metrics else {}
        events.write(
            "checkpoint", step=checkpoint.steps_done, epoch=checkpoint.epoch - 1, metrics=metrics
        )

    epoch_metrics: list[dict[str, Any]] = []
    try:
        result = train_adapter(
            model,
            train,
            val,
            options,
            on_epoch,
            on_step=on_step,
            on_checkpoint=on_checkpoint,
            resume=resume,
        )
    except TrainingStopped as stopped:
        stopped.checkpoint.save(checkpoint_path)
        reason = control(job_dir) or "pause"
        events.write("stopped", reason=reason, step=stopped.checkpoint.steps_done)
        return
    except TrainingError as error:
        raise JobFailed("training_error", str(error)) from None
    if control(job_dir) == "cancel":  # asked during the last step
        events.write("stopped", reason="cancel", step=total_steps)
        return
    target = job_dir / RESULT
    target.mkdir(exist_ok=True)
    save_adapter(result.adapter, target)
    events.write(
        "trained",
        peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
        trained_tokens=_tokens(train) * options.epochs,
        best_epoch=result.best_epoch,
        best_valid_loss=result.best.val_loss,
        best_valid_perplexity=result.best.val_perplexity,
    )


def _tokens(data: Any) -> int:
    return sum(len(t) + 1 for t in data.tokens)


def _datasets(backbone: Any, spec: dict[str, Any]) -> tuple[Any, Any, list[str]]:
    """(train, val, warnings): the training file's images encoded, and the validation file's
    (or images held out of the training file)."""
    import random

    from service.jobs.data import DataLimits, TrainingFileError, parse_training_file

    limits = DataLimits(**spec.get("limits", {}))
    notes: list[str] = []

    def load(path: str, param: str) -> Any:
        try:
            data = parse_training_file(Path(path), limits)
        except TrainingFileError as error:
            raise JobFailed("invalid_file", f"{param}: {error}", param) from None
        try:
            return _encode(backbone, data, param)
        finally:
            data.close()

    train = load(spec["training_file"], "training_file")
    if spec.get("validation_file"):
        val = load(spec["validation_file"], "validation_file")
    else:
        if train.num_images < 2:
            raise JobFailed(
                "invalid_file",
                "the training file holds 1 image: at least 2 are needed (one is held out for "
                "validation), or give a validation_file",
                "training_file",
            )
        images = list(range(train.num_images))
        random.Random(spec["options"]["seed"]).shuffle(images)
        held = min(train.num_images - 1, max(1, round(0.1 * train.num_images)))
        val = train.subset_images(sorted(images[:held]))
        train = train.subset_images(sorted(images[held:]))
    unk = backbone.tokenizer.unk_token_id
    if unk is not None and train.unknown_words:
        notes.append(
            f"{train.unknown_words} of {len(train)} captions hold words the backbone's "
            "tokenizer does not know; they are trained as <unk>"
        )
    if train.truncated:
        notes.append(f"{train.truncated} captions were cut to fit the LM's context")
    return train, val, notes


def _encode(backbone: Any, data: Any, param: str) -> Any:
    import io

    from PIL import Image

    from adapters.training import encode_items

    groups = data.grouped()
    where = {e.image: e.where for e in reversed(data.examples)}

    def item(index: int) -> tuple[Image.Image, list[str]]:
        key, captions = groups[index]
        try:
            with Image.open(io.BytesIO(data.image_bytes(key))) as image:
                return image.convert("RGB"), captions
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
            raise JobFailed(
                "invalid_file", f"{param} {where[key]}: the image does not decode ({error})", param
            ) from None

    return encode_items(backbone, item, len(groups))


if __name__ == "__main__":
    sys.exit(main())
