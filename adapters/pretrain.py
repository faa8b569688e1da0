"""Brief pre-training of the demo backbone on the synthetic shapes domain, before it is frozen.

A randomly initialised backbone would leave the adapters nothing to adapt, so `ctxpeft demo`
first teaches each half of the backbone its side of the domain, separately:

- the vision encoder learns to *see* scenes: linear heads over all its output tokens predict,
  for each of the three bands of the image and for each of the first three shapes from the
  left, whether a shape is there and its colour, kind and size, plus the number of shapes.
  The heads are thrown away afterwards; what stays is an encoder whose tokens carry those
  attributes. Every epoch draws fresh scenes (the generator is unlimited).
- the LM learns the *language* of every task: next-token prediction on the captions of all
  tasks, text only (as the paper's LM was pre-trained on text), with no image.

Neither sees an adapter, and the LM never sees an image: grounding captions in images is left
to the per-task adapter sets, as in the paper.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from adapters.backbone import Backbone
from adapters.data.synthetic import (
    COLORS,
    KINDS,
    MAX_SHAPES,
    SIZES,
    Scene,
    Shape,
    SyntheticCaptions,
    caption,
    render,
)

# Per band and per left-to-right slot: present?, colour, kind, size (class counts).
_ATTRIBUTES: tuple[int, ...] = (2, len(COLORS), len(KINDS), len(SIZES))
_GROUPS = 2 * MAX_SHAPES  # three bands, then three slots
_IGNORE = -100


@dataclass(frozen=True)
class StageOptions:
    """One pre-training stage: fresh samples per epoch, AdamW with a one-cycle schedule."""

    samples_per_epoch: int
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float = 0.01

    def __post_init__(self) -> None:
        if min(self.samples_per_epoch, self.epochs, self.batch_size) < 1:
            raise ValueError("samples_per_epoch, epochs and batch_size must be >= 1")
        if self.samples_per_epoch < self.batch_size:
            raise ValueError("samples_per_epoch must be at least batch_size")


def scene_labels(scene: Scene) -> list[int]:
    """Targets of the encoder heads for one scene (`_IGNORE` where no shape is)."""
    bands: list[Shape | None] = [None] * MAX_SHAPES
    for drawn in scene.shapes:
        bands[min(MAX_SHAPES - 1, int(drawn.x * MAX_SHAPES))] = drawn
    ordered: list[Shape | None] = [*scene.left_to_right()]
    ordered += [None] * (MAX_SHAPES - len(ordered))
    labels: list[int] = []
    for shape in [*bands, *ordered]:
        if shape is None:
            labels += [0, _IGNORE, _IGNORE, _IGNORE]
        else:
            colour = list(COLORS).index(shape.color)
            labels += [1, colour, KINDS.index(shape.kind), SIZES.index(shape.size)]
    return [*labels, len(scene.shapes) - 1]


def _scenes(split: str, size: int, seed: int) -> list[Scene]:
    source = SyntheticCaptions("describe", split, size, seed)
    return [source.scene(i) for i in range(size)]


def _attribute_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    loss = logits.new_zeros(())
    offset = 0
    for group in range(_GROUPS):
        for attribute, classes in enumerate(_ATTRIBUTES):
            target = labels[:, group * len(_ATTRIBUTES) + attribute]
            if bool((target != _IGNORE).any()):
                part = logits[:, offset : offset + classes]
                loss = loss + nn.functional.cross_entropy(part, target, ignore_index=_IGNORE)
            offset += classes
    return loss + nn.functional.cross_entropy(logits[:, offset:], labels[:, -1])


def scene_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of scenes whose every left-to-right slot attribute and count is right."""
    correct = torch.ones(labels.shape[0], dtype=torch.bool)
    offset = 0
    for group in range(_GROUPS):
        for attribute, classes in enumerate(_ATTRIBUTES):
            target = labels[:, group * len(_ATTRIBUTES) + attribute]
            predicted = logits[:, offset : offset + classes].argmax(-1)
            if group >= MAX_SHAPES:  # the slots are what the captions need
                correct &= (target == _IGNORE) | (predicted == target)
            offset += classes
    correct &= logits[:, offset:].argmax(-1) == labels[:, -1]
    return float(correct.float().mean())


def _schedule(
    optimizer: torch.optim.Optimizer, options: StageOptions
) -> torch.optim.lr_scheduler.LRScheduler:
    steps = options.epochs * (options.samples_per_epoch // options.batch_size)
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=options.lr, total_steps=max(steps, 1), pct_start=0.1
    )


def pretrain_encoder(
    backbone: Backbone,
    options: StageOptions,
    seed: int = 0,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> float:
    """Train the vision encoder on scene attributes; returns validation scene accuracy."""
    vision = backbone.vision
    tokens, dim = backbone.num_image_tokens, backbone.vision_dim
    heads = nn.Linear(dim, _GROUPS * sum(_ATTRIBUTES) + MAX_SHAPES).to(backbone.device)

    def logits(pixels: torch.Tensor) -> torch.Tensor:
        hidden = vision(pixel_values=pixels.to(backbone.device)).last_hidden_state
        if hidden.dim() == 4:  # convolutional encoders: [N, C, H, W] -> [N, H*W, C]
            hidden = hidden.flatten(2).transpose(1, 2)
        # The heads read the mean of the tokens the LM sees (the last `tokens`; [CLS], if
        # any, comes first): one shared linear map for every token, as an attention layer
        # reads its values. A map per token position would let the encoder hide attributes
        # in position-specific codes that a frozen LM can hardly read.
        return heads(hidden[:, -tokens:].mean(dim=1))

    def batch(split: str, size: int, batch_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        scenes = _scenes(split, size, batch_seed)
        pixels = backbone.preprocess([render(s, backbone.config.image_size) for s in scenes])
        return pixels, torch.tensor([scene_labels(s) for s in scenes])

    val_pixels, val_labels = batch("val", 256, seed)
    params = [*vision.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(params, lr=options.lr, weight_decay=options.weight_decay)
    scheduler = _schedule(optimizer, options)
    generator = torch.Generator().manual_seed(seed)
    vision.requires_grad_(True)
    accuracy = 0.0
    try:
        for epoch in range(options.epochs):
            pixels, labels = batch("train", options.samples_per_epoch, seed * 1000 + epoch)
            vision.train()
            order = torch.randperm(len(labels), generator=generator)
            steps = range(0, len(order) - options.batch_size + 1, options.batch_size)
            bar = tqdm(
                steps,
                desc=f"encoder {epoch + 1}/{options.epochs}",
                leave=False,
                disable=not progress,
            )
            for start in bar:
                index = order[start : start + options.batch_size]
                loss = _attribute_loss(logits(pixels[index]), labels[index].to(backbone.device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}", refresh=False)
            vision.eval()
            with torch.no_grad():
                accuracy = scene_accuracy(logits(val_pixels).cpu(), val_labels)
            if log is not None:
                log(
                    f"encoder epoch {epoch + 1}: loss {float(loss.detach()):.3f}, val scene accuracy {accuracy:.3f}"
                )
    finally:
        vision.requires_grad_(False)
        vision.eval()
    return accuracy


def caption_texts(tasks: Sequence[str], size: int, seed: int) -> list[str]:
    """Captions of `size` fresh training scenes for every task (task-major order)."""
    scenes = _scenes("train", size, seed)
    return [caption(scene, task) for task in tasks for scene in scenes]


def pretrain_lm(
    backbone: Backbone,
    tasks: Sequence[str],
    options: StageOptions,
    seed: int = 0,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> float:
    """Next-token training of the LM on caption text of all tasks; returns validation loss.
    `samples_per_epoch` counts scenes: each gives one caption per task.

    The output head (lm_head) is set to orthogonal unit rows and not trained. In caption text
    alone, words of one kind are interchangeable ("a large red circle" and "a large blue
    circle" are equally likely), so a trained head gives them near-identical rows (cosine 0.93
    for the colours when we tried), and a frozen head with such rows caps how sure any adapter
    can make the LM between "red" and "blue" (validation perplexity stalled near 1.6 on the
    colours task while exact match was 99%). Orthogonal rows keep every word reachable.
    """
    lm = backbone.lm
    tokenizer = backbone.tokenizer
    device = backbone.device
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id

    def encode(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [[bos, *tokenizer(t, add_special_tokens=False)["input_ids"], eos] for t in texts]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
        lengths = torch.tensor([len(r) for r in rows])
        mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
        return ids, mask

    def loss_of(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        labels = ids.masked_fill(mask == 0, _IGNORE)
        out = lm(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device))
        return out.loss

    val_ids, val_mask = encode(caption_texts(tasks, 64, seed + 7919))
    head = lm.get_output_embeddings()
    frozen: set[int] = set()
    if head is not None:
        with torch.no_grad():
            nn.init.orthogonal_(head.weight)  # unit rows, pairwise orthogonal (vocab <= width)
        frozen = {id(p) for p in head.parameters()}
    params = [p for p in lm.parameters() if id(p) not in frozen]
    per_epoch = dataclasses.replace(
        options, samples_per_epoch=options.samples_per_epoch * len(tasks)
    )
    optimizer = torch.optim.AdamW(params, lr=options.lr, weight_decay=options.weight_decay)
    scheduler = _schedule(optimizer, per_epoch)
    generator = torch.Generator().manual_seed(seed)
    for param in params:
        param.requires_grad_(True)
    val_loss = math.inf
    try:
        for epoch in range(options.epochs):
            ids, mask = encode(caption_texts(tasks, options.samples_per_epoch, seed * 1000 + epoch))
            lm.train()
            order = torch.randperm(len(ids), generator=generator)
            steps = range(0, len(order) - options.batch_size + 1, options.batch_size)
            bar = tqdm(
                steps, desc=f"LM {epoch + 1}/{options.epochs}", leave=False, disable=not progress
            )
            for start in bar:
                index = order[start : start + options.batch_size]
                loss = loss_of(ids[index], mask[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}", refresh=False)
            lm.eval()
            with torch.no_grad():
                val_loss = float(loss_of(val_ids, val_mask))
            if log is not None:
                log(f"LM epoch {epoch + 1}: val loss {val_loss:.3f}")
    finally:
        lm.requires_grad_(False)
        lm.eval()
    return val_loss
