"""`auto` hyperparameters: epochs, batch size and learning rate chosen from the dataset size.

    chosen = resolve(examples=240, n_epochs="auto", batch_size="auto", multiplier="auto")
    chosen.n_epochs, chosen.batch_size, chosen.learning_rate_multiplier, chosen.lr

The learning rate is `BASE_LEARNING_RATE x learning_rate_multiplier` with a cosine schedule
(5% warm-up); docs/METHOD.md ("auto hyperparameters") has the rule's measurements. In short:
what decides whether a small captioning task is learned is the number of optimizer steps at a
learning rate well above the paper's 1e-4, not the number of epochs. So `auto` aims at
`TARGET_STEPS` steps of a small batch, reached with as many epochs as the data needs
(bounded), and a multiplier of `AUTO_MULTIPLIER`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

BASE_LEARNING_RATE = 1e-3  # learning_rate_multiplier 1.0
AUTO_MULTIPLIER = 2.0
TARGET_STEPS = 400
MIN_EPOCHS, MAX_EPOCHS = 2, 40
SMALL_BATCH, LARGE_BATCH = 8, 16
LARGE_DATASET = 4000  # examples from which the batch doubles

Auto = Literal["auto"]


@dataclass(frozen=True)
class Chosen:
    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float

    @property
    def lr(self) -> float:
        return BASE_LEARNING_RATE * self.learning_rate_multiplier

    def steps(self, examples: int) -> int:
        return self.n_epochs * math.ceil(examples / self.batch_size)


def resolve(
    examples: int,
    n_epochs: int | Auto = "auto",
    batch_size: int | Auto = "auto",
    multiplier: float | Auto = "auto",
) -> Chosen:
    """Fill in every `auto` from the number of training examples."""
    if examples < 1:
        raise ValueError("no training example")
    batch = batch_size if batch_size != "auto" else auto_batch_size(examples)
    batch = min(batch, examples)
    epochs = n_epochs if n_epochs != "auto" else auto_epochs(examples, batch)
    rate = multiplier if multiplier != "auto" else AUTO_MULTIPLIER
    return Chosen(int(epochs), int(batch), float(rate))


def auto_batch_size(examples: int) -> int:
    return SMALL_BATCH if examples < LARGE_DATASET else LARGE_BATCH


def auto_epochs(examples: int, batch_size: int) -> int:
    """Enough epochs for about TARGET_STEPS steps, within [MIN_EPOCHS, MAX_EPOCHS]."""
    steps_per_epoch = math.ceil(examples / batch_size)
    wanted = math.ceil(TARGET_STEPS / steps_per_epoch)
    return max(MIN_EPOCHS, min(MAX_EPOCHS, wanted))
