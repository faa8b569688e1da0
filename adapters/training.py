"""Training one adapter set on a frozen `ContextPEFTModel`, through the layers that serve.

    images --frozen vision encoder (once per image, cached)--> features
    features --AdapterSet.connect--> image embeddings --LM with the set's context layers--> loss

The adapter set is a one-slot `WeightSource`, so the forward pass in training is exactly the
serving forward pass (`ContextPEFTModel.caption_loss`). Defaults are the paper's recipe: Adam,
lr 1e-4, betas (0.9, 0.95), no schedule, connector dropout 0.1, loss on caption tokens (+EOS)
only, the best epoch chosen by validation loss. The vision encoder is frozen and there is no
augmentation, so each image is encoded once before training (`encode_source`,
`encode_records`): on a CPU that removes most of the work of every epoch.

Usage::

    model = ContextPEFTModel(Backbone.load("var/backbones/demo"))
    train = encode_source(model.backbone, SyntheticCaptions("count", "train", 2000))
    val = encode_source(model.backbone, SyntheticCaptions("count", "val", 200))
    result = train_adapter(model, train, val, TrainOptions(epochs=4, lr=3e-3))
    save_adapter(result.adapter, folder)
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image
from tqdm.auto import tqdm

from adapters.adapter_set import AdapterSet
from adapters.backbone import Backbone, resolve_device
from adapters.config import (
    AGNOSTIC,
    CONTEXTS,
    METHODS,
    AdapterConfig,
    ConnectorSpec,
    Method,
    resolve_targets,
)
from adapters.data.captions import CaptionRecord
from adapters.data.synthetic import CaptionSource
from adapters.model import ContextPEFTModel

Contexts = Literal["specific", "agnostic"]
# What trains: the adapter set (connector + LM adapter tensors), the connector alone (the LM
# tensors stay at their neutral init: a frozen LM), or everything (connector + every LM
# weight: full fine-tuning, which changes the model's backbone in place).
Scope = Literal["adapter", "connector", "full"]
Schedule = Literal["constant", "cosine"]
SCOPES: tuple[str, ...] = ("adapter", "connector", "full")


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss diverged); the message says what to change."""


@dataclass(frozen=True)
class TrainOptions:
    """How to train one adapter set. Defaults follow the paper (PAPER.md, training setup)."""

    method: Method = "lora"
    contexts: Contexts = "specific"
    rank: int = 8
    alpha: float | None = None
    targets: str | tuple[str, ...] = "all"
    scope: Scope = "adapter"
    epochs: int = 8
    batch_size: int = 32
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    # The paper trains at a constant rate; "cosine" (5% linear warm-up, then cosine decay to
    # zero) is ours, for short high-rate runs such as the demo's.
    schedule: Schedule = "constant"
    connector_dropout: float = 0.1
    seed: int = 0
    device: str = "auto"
    progress: bool = True
    description: str = ""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; expected one of {METHODS}")
        if self.contexts not in ("specific", "agnostic"):
            raise ValueError(f"contexts must be 'specific' or 'agnostic', got {self.contexts!r}")
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {self.scope!r}")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule must be 'constant' or 'cosine', got {self.schedule!r}")
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be >= 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if not 0.0 <= self.connector_dropout < 1.0:
            raise ValueError(f"connector_dropout must be in [0, 1), got {self.connector_dropout}")
        resolve_targets(self.method, self.targets)


# --- data: encode images once ---------------------------------------------------------
@dataclass
class EncodedCaptions:
    """Images encoded by the frozen vision encoder, with their tokenized captions.

    One entry of `features` per distinct image; one item per (image, caption) pair, so a COCO
    image with five captions is encoded once and trained on five times. `references` keeps
    every caption of each image for the captioning metrics.
    """

    features: torch.Tensor  # [images, image tokens, vision dim], on the CPU
    image_index: list[int]  # per item: its row in `features`
    tokens: list[list[int]]  # per item: caption token ids (no BOS/EOS)
    references: list[list[str]]  # per image: its captions
    unknown_words: int = 0  # items whose caption has tokens outside the tokenizer's vocabulary
    truncated: int = 0  # items whose caption was cut to fit the LM's context

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def num_images(self) -> int:
        return int(self.features.shape[0])

    def subset_images(self, images: Sequence[int]) -> EncodedCaptions:
        """The items of some images only (a split by image, never by caption)."""
        remap = {old: new for new, old in enumerate(images)}
        keep = [i for i, img in enumerate(self.image_index) if img in remap]
        return EncodedCaptions(
            self.features[list(images)],
            [remap[self.image_index[i]] for i in keep],
            [self.tokens[i] for i in keep],
            [self.references[i] for i in images],
        )


def encode_source(
    backbone: Backbone, source: CaptionSource, batch_size: int = 128, progress: bool = False
) -> EncodedCaptions:
    """Encode an indexable (image, caption) source (e.g. `SyntheticCaptions`): one image per item."""

    def item(index: int) -> tuple[Image.Image, list[str]]:
        image, text = source[index]
        return image, [text]

    return _encode(backbone, item, len(source), batch_size, progress)


def encode_records(
    backbone: Backbone,
    records: Sequence[CaptionRecord],
    batch_size: int = 128,
    progress: bool = False,
) -> EncodedCaptions:
    """Encode caption records (COCO/JSONL), grouping the captions of each image file."""
    by_image: dict[str, list[str]] = {}
    for record in records:
        by_image.setdefault(str(record.image), []).append(record.caption)
    paths = list(by_image)

    def item(index: int) -> tuple[Image.Image, list[str]]:
        with Image.open(paths[index]) as image:
            return image.convert("RGB"), by_image[paths[index]]

    return _encode(backbone, item, len(paths), batch_size, progress)


def encode_items(
    backbone: Backbone,
    item: Callable[[int], tuple[Image.Image, list[str]]],
    n: int,
    batch_size: int = 128,
    progress: bool = False,
) -> EncodedCaptions:
    """Encode `n` items, `item(i)` being one image and its captions (e.g. a fine-tuning
    job's upload, grouped by image)."""
    return _encode(backbone, item, n, batch_size, progress)


def _encode(
    backbone: Backbone,
    item: Callable[[int], tuple[Image.Image, list[str]]],
    n: int,
    batch_size: int,
    progress: bool,
) -> EncodedCaptions:
    chunks, references = [], []
    for start in tqdm(range(0, n, batch_size), desc="encoding images", disable=not progress):
        images = []
        for index in range(start, min(n, start + batch_size)):
            image, texts = item(index)
            images.append(image)
            references.append(texts)
        chunks.append(backbone.encode_images(backbone.preprocess(images)).float().cpu())
    if chunks:
        features = torch.cat(chunks)
    else:
        features = torch.zeros(0, backbone.num_image_tokens, backbone.vision_dim)
    tokenizer = backbone.tokenizer
    # Room for [BOS] + image tokens + caption + EOS inside the LM's positions.
    limit = int(getattr(backbone.lm.config, "max_position_embeddings", 1 << 30))
    room = limit - features.shape[1] - 2
    data = EncodedCaptions(features, [], [], references)
    unk = tokenizer.unk_token_id
    for index, texts in enumerate(references):
        for text in texts:
            ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
            if unk is not None and unk in ids:
                data.unknown_words += 1
            if len(ids) > room:
                ids = ids[:room]
                data.truncated += 1
            data.image_index.append(index)
            data.tokens.append(ids)
    return data


# --- training -----------------------------------------------------------------------
@dataclass(frozen=True)
class EpochStats:
    epoch: int
    train_loss: float
    val_loss: float
    seconds: float

    @property
    def val_perplexity(self) -> float:
        return math.exp(min(self.val_loss, 50.0))


@dataclass
class TrainResult:
    """The best epoch's adapter set (on the CPU, in eval mode) and what happened per epoch."""

    adapter: AdapterSet
    history: list[EpochStats]
    best_epoch: int
    trainable_lm_parameters: int
    trainable_connector_parameters: int
    seconds: float = 0.0

    @property
    def best(self) -> EpochStats:
        return self.history[self.best_epoch - 1]


def adapter_config(options: TrainOptions, backbone: Backbone) -> AdapterConfig:
    """The AdapterConfig that `options` trains on `backbone`."""
    spec = ConnectorSpec(
        backbone.config.connector,
        backbone.vision_dim,
        backbone.dims.hidden_size,
        backbone.config.connector_hidden,
    )
    return AdapterConfig(
        method=options.method,
        connector=spec,
        base_fingerprint=backbone.fingerprint(),
        contexts=CONTEXTS if options.contexts == "specific" else AGNOSTIC,
        rank=options.rank,
        alpha=options.alpha,
        targets=resolve_targets(options.method, options.targets),
        num_layers=backbone.dims.num_layers,
        connector_dropout=options.connector_dropout,
        description=options.description,
    )


def _batches(n: int, batch_size: int, generator: torch.Generator | None) -> list[list[int]]:
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    return [order[i : i + batch_size].tolist() for i in range(0, n, batch_size)]


def mean_loss(
    model: ContextPEFTModel, adapter: AdapterSet, data: EncodedCaptions, batch_size: int = 64
) -> float:
    """Token-weighted mean caption loss over `data` (no dropout, no gradients)."""
    was_training = adapter.training
    adapter.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in _batches(len(data), batch_size, None):
            loss, tokens = _batch_loss(model, adapter, data, batch)
            total += float(loss) * tokens
            count += tokens
    adapter.train(was_training)
    return total / max(count, 1)


def _batch_loss(
    model: ContextPEFTModel, adapter: AdapterSet, data: EncodedCaptions, batch: list[int]
) -> tuple[torch.Tensor, int]:
    images = torch.tensor([data.image_index[i] for i in batch])
    features = data.features.index_select(0, images)
    return model.caption_loss(features, [data.tokens[i] for i in batch], adapter)


def _lr_lambda(schedule: Schedule, total_steps: int) -> Callable[[int], float]:
    warmup = max(1, total_steps // 20)

    def factor(step: int) -> float:
        if schedule == "constant":
            return 1.0
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


@dataclass(frozen=True)
class StepStats:
    """One optimizer step, as `train_adapter`'s `on_step` sees it (after the update)."""

    epoch: int  # 1-based
    epoch_step: int  # steps done in this epoch, this one included
    steps_per_epoch: int
    step: int  # steps done in the whole run, this one included
    total_steps: int
    loss: float  # this batch's token-weighted mean loss
    tokens: int  # the caption tokens (+EOS) of this batch
    lr: float  # the learning rate this step used
    # The set being trained, e.g. to measure a validation loss (`mean_loss`; leaves it as
    # it was). Read it, never change it.
    adapter: AdapterSet = field(repr=False, compare=False)


_State = dict[str, torch.Tensor]


@dataclass
class TrainCheckpoint:
    """Everything needed to go on with a run exactly where it stopped, between two steps:
    resuming from it gives the same adapter, bit for bit, as a run that never stopped (the
    batch order, the dropout RNG, the optimizer's moments and the schedule are restored).

    `epoch` is the epoch in progress and `epoch_step` the steps of it already done (0 at an
    epoch boundary). Written by `save`, read by `load` (torch's weights-only loader: tensors,
    numbers, strings, lists and dicts only, never arbitrary objects).
    """

    epoch: int
    epoch_step: int
    order_generator: torch.Tensor  # the batch-order generator's state at the epoch's start
    rng: torch.Tensor  # the global CPU RNG (connector dropout) at this point
    adapter: _State
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    epoch_loss: tuple[float, int]  # (sum of loss x tokens, tokens) of the epoch so far
    epoch_seconds: float
    history: list[EpochStats]
    best_loss: float
    best_state: _State
    steps_per_epoch: int
    total_steps: int

    @property
    def steps_done(self) -> int:
        return (self.epoch - 1) * self.steps_per_epoch + self.epoch_step

    def save(self, path: Path) -> None:
        """Write atomically (a temporary file, fsynced, renamed over `path`)."""
        data = {
            "format": 1,
            "epoch": self.epoch,
            "epoch_step": self.epoch_step,
            "order_generator": self.order_generator,
            "rng": self.rng,
            "adapter": self.adapter,
            "optimizer": self.optimizer,
            "scheduler": self.scheduler,
            "epoch_loss": list(self.epoch_loss),
            "epoch_seconds": self.epoch_seconds,
            "history": [dataclasses.asdict(h) for h in self.history],
            "best_loss": self.best_loss,
            "best_state": self.best_state,
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
        }
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as handle:
            torch.save(data, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> TrainCheckpoint:
        data = torch.load(path, map_location="cpu", weights_only=True)
        if data.get("format") != 1:
            raise TrainingError(f"{path}: unknown checkpoint format {data.get('format')!r}")
        return cls(
            epoch=int(data["epoch"]),
            epoch_step=int(data["epoch_step"]),
            order_generator=data["order_generator"],
            rng=data["rng"],
            adapter=data["adapter"],
            optimizer=data["optimizer"],
            scheduler=data["scheduler"],
            epoch_loss=(float(data["epoch_loss"][0]), int(data["epoch_loss"][1])),
            epoch_seconds=float(data["epoch_seconds"]),
            history=[EpochStats(**h) for h in data["history"]],
            best_loss=float(data["best_loss"]),
            best_state=data["best_state"],
            steps_per_epoch=int(data["steps_per_epoch"]),
            total_steps=int(data["total_steps"]),
        )


class TrainingStopped(Exception):
    """`on_step` asked the run to stop; `checkpoint` resumes it (`train_adapter(resume=)`)."""

    def __init__(self, checkpoint: TrainCheckpoint) -> None:
        super().__init__(f"stopped at epoch {checkpoint.epoch}, step {checkpoint.epoch_step}")
        self.checkpoint = checkpoint


def train_adapter(
    model: ContextPEFTModel,
    train: EncodedCaptions,
    val: EncodedCaptions,
    options: TrainOptions = TrainOptions(),
    on_epoch: Callable[[EpochStats], None] | None = None,
    *,
    on_step: Callable[[StepStats], bool | None] | None = None,
    on_checkpoint: Callable[[TrainCheckpoint], None] | None = None,
    resume: TrainCheckpoint | None = None,
) -> TrainResult:
    """Train one adapter set; return the epoch with the lowest validation loss.

    With scope "full" the model's LM is trained too and keeps the best epoch's weights: pass a
    copy of a backbone you want to keep.

    Resumable runs (scope "adapter" or "connector"): `on_step` is called after every
    optimizer step; when it returns True the run stops there and raises `TrainingStopped`,
    whose checkpoint `resume=` takes to go on. `on_checkpoint` receives a checkpoint at the end
    of every epoch but the last. A resumed run must get the same data and options.
    """
    if len(train) == 0 or len(val) == 0:
        raise TrainingError("training needs at least one training and one validation caption")
    if options.scope == "full" and (on_step or on_checkpoint or resume):
        raise TrainingError("scope 'full' runs cannot be checkpointed or resumed")
    started = time.perf_counter()
    device = resolve_device(options.device)
    model.to(device)
    config = adapter_config(options, model.backbone)
    adapter = AdapterSet.initialise(config, model.backbone.dims, seed=options.seed).to(device)
    params = _trainable(model, adapter, options.scope)
    # Connector dropout draws from the global RNG: seed a private copy of it, so the same
    # seed gives the same adapter and the caller's RNG state is left alone.
    devices = [device.index or 0] if device.type == "cuda" else []
    run = _Run(model, adapter, params, train, val, options)
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(options.seed)
            if resume is not None:
                run.restore(resume)
            run.epochs(on_epoch, on_step, on_checkpoint)
    finally:
        model.backbone.requires_grad_(False)
    history, best_state, best_lm = run.history, run.best_state, run.best_lm
    adapter.load_state_dict(best_state)
    if best_lm is not None:
        model.backbone.lm.load_state_dict(best_lm)
    best_epoch = min(range(len(history)), key=lambda i: history[i].val_loss) + 1
    lm_count, conn_count = _count(params, adapter)
    return TrainResult(
        adapter.cpu().eval(),
        history,
        best_epoch,
        trainable_lm_parameters=lm_count,
        trainable_connector_parameters=conn_count,
        seconds=time.perf_counter() - started,
    )


class _Run:
    """The epoch loop of one run and its state (what a checkpoint holds)."""

    def __init__(
        self,
        model: ContextPEFTModel,
        adapter: AdapterSet,
        params: list[torch.nn.Parameter],
        train: EncodedCaptions,
        val: EncodedCaptions,
        options: TrainOptions,
    ) -> None:
        self.model, self.adapter, self.train, self.val, self.options = (
            model,
            adapter,
            train,
            val,
            options,
        )
        self.optimizer = torch.optim.Adam(
            params, lr=options.lr, betas=options.betas, weight_decay=options.weight_decay
        )
        self.steps_per_epoch = math.ceil(len(train) / options.batch_size)
        self.total_steps = options.epochs * self.steps_per_epoch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _lr_lambda(options.schedule, self.total_steps)
        )
        self.generator = torch.Generator().manual_seed(options.seed)
        self.history: list[EpochStats] = []
        self.best_loss = math.inf
        self.best_state: _State = copy.deepcopy(adapter.state_dict())
        self.best_lm: _State | None = None
        # Where the loop starts: (epoch, steps of it done, loss sums, seconds so far).
        self.first_epoch, self.skip_steps = 1, 0
        self.epoch_loss: tuple[float, int] = (0.0, 0)
        self.epoch_seconds = 0.0

    def restore(self, checkpoint: TrainCheckpoint) -> None:
        if checkpoint.total_steps != self.total_steps:
            raise TrainingError(
                f"the checkpoint is of a run of {checkpoint.total_steps} steps, this one has "
                f"{self.total_steps}: resume with the same data and options"
            )
        self.adapter.load_state_dict(checkpoint.adapter)
        self.optimizer.load_state_dict(checkpoint.optimizer)
        self.scheduler.load_state_dict(checkpoint.scheduler)
        self.generator.set_state(checkpoint.order_generator)
        torch.set_rng_state(checkpoint.rng)
        self.history = list(checkpoint.history)
        self.best_loss = checkpoint.best_loss
        self.best_state = checkpoint.best_state
        self.first_epoch, self.skip_steps = checkpoint.epoch, checkpoint.epoch_step
        self.epoch_loss, self.epoch_seconds = checkpoint.epoch_loss, checkpoint.epoch_seconds

    def checkpoint(self, epoch: int, epoch_step: int, order: torch.Tensor) -> TrainCheckpoint:
        return TrainCheckpoint(
            epoch=epoch,
            epoch_step=epoch_step,
            order_generator=order.clone(),
            rng=torch.get_rng_state(),
            adapter=copy.deepcopy(self.adapter.state_dict()),
            optimizer=copy.deepcopy(self.optimizer.state_dict()),
            scheduler=copy.deepcopy(self.scheduler.state_dict()),
            epoch_loss=self.epoch_loss,
            epoch_seconds=self.epoch_seconds,
            history=list(self.history),
            best_loss=self.best_loss,
            best_state=copy.deepcopy(self.best_state),
            steps_per_epoch=self.steps_per_epoch,
            total_steps=self.total_steps,
        )

    def epochs(
        self,
        on_epoch: Callable[[EpochStats], None] | None,
        on_step: Callable[[StepStats], bool | None] | None,
        on_checkpoint: Callable[[TrainCheckpoint], None] | None,
    ) -> None:
        options, train, model, adapter = self.options, self.train, self.model, self.adapter
        stop = False
        for epoch in range(self.first_epoch, options.epochs + 1):
            t0 = time.perf_counter() - self.epoch_seconds
            adapter.train()
            total, count = self.epoch_loss
            order = self.generator.get_state()
            batches = _batches(len(train), options.batch_size, self.generator)
            skip, self.skip_steps = self.skip_steps, 0
            bar = tqdm(
                batches[skip:],
                desc=f"epoch {epoch}/{options.epochs}",
                unit="batch",
                leave=False,
                disable=not options.progress,
            )
            for step, batch in enumerate(bar, start=skip):
                loss, tokens = _batch_loss(model, adapter, train, batch)
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise TrainingError(
                        f"the loss became {value} at epoch {epoch}, step {step + 1}; "
                        f"lower the learning rate (lr={options.lr})"
                    )
                lr = float(self.optimizer.param_groups[0]["lr"])
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                self.scheduler.step()
                total += value * tokens
                count += tokens
                bar.set_postfix(loss=f"{value:.3f}", refresh=False)
                if on_step is not None:
                    done = (epoch - 1) * self.steps_per_epoch + step + 1
                    stats = StepStats(
                        epoch, step + 1, self.steps_per_epoch, done, self.total_steps, value,
                        tokens, lr, adapter,
                    )  # fmt: skip
                    stop = bool(on_step(stats))
                    if stop and step + 1 < len(batches):
                        self.epoch_loss = (total, count)
                        self.epoch_seconds = time.perf_counter() - t0
                        raise TrainingStopped(self.checkpoint(epoch, step + 1, order))
            val_loss = mean_loss(model, adapter, self.val, max(options.batch_size, 64))
            stats_epoch = EpochStats(
                epoch, total / max(count, 1), val_loss, time.perf_counter() - t0
            )
            self.history.append(stats_epoch)
            self.epoch_loss, self.epoch_seconds = (0.0, 0), 0.0
            if on_epoch is not None:
                on_epoch(stats_epoch)
            if val_loss < self.best_loss:
                self.best_loss = val_loss
                self.best_state = copy.deepcopy(adapter.state_dict())
                if options.scope == "full":
                    self.best_lm = copy.deepcopy(model.backbone.lm.state_dict())
            if epoch < options.epochs and (stop or on_checkpoint is not None):
                checkpoint = self.checkpoint(epoch + 1, 0, self.generator.get_state())
                if on_checkpoint is not None:
                    on_checkpoint(checkpoint)
                if stop:  # asked at the epoch's last step: stop at its end
                    raise TrainingStopped(checkpoint)


def _trainable(
    model: ContextPEFTModel, adapter: AdapterSet, scope: Scope
) -> list[torch.nn.Parameter]:
    for name, param in adapter.params.items():
        # Outside scope "adapter" the LM tensors stay at their neutral init: an identity.
        param.requires_grad_(scope == "adapter" or name.startswith("connector"))
    params = [p for p in adapter.parameters() if p.requires_grad]
    if scope == "full":
        model.backbone.lm.requires_grad_(True)
        params += list(model.backbone.lm.parameters())
    return params


def _count(params: list[torch.nn.Parameter], adapter: AdapterSet) -> tuple[int, int]:
    """(trainable LM parameters, trainable connector parameters)."""
    connector = {id(p) for n, p in adapter.params.items() if n.startswith("connector")}
    conn = sum(p.numel() for p in params if id(p) in connector)
    return sum(p.numel() for p in params) - conn, conn
