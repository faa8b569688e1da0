"""The `auto` hyperparameter rule (service.jobs.auto): about TARGET_STEPS steps at the
auto learning rate, epochs bounded, explicit values kept."""

from __future__ import annotations

import pytest

from service.jobs import auto


@pytest.mark.parametrize("examples", [1, 9, 60, 100, 300, 1_000, 3_999, 4_000, 50_000])
def test_auto_aims_at_the_target_steps_within_the_epoch_bounds(examples: int) -> None:
    chosen = auto.resolve(examples)
    assert chosen.learning_rate_multiplier == auto.AUTO_MULTIPLIER
    assert chosen.lr == pytest.approx(auto.BASE_LEARNING_RATE * auto.AUTO_MULTIPLIER)
    assert auto.MIN_EPOCHS <= chosen.n_epochs <= auto.MAX_EPOCHS
    assert chosen.batch_size == min(examples, 8 if examples < auto.LARGE_DATASET else 16)
    steps = chosen.steps(examples)
    per_epoch = steps // chosen.n_epochs
    if auto.MIN_EPOCHS < chosen.n_epochs < auto.MAX_EPOCHS:
        assert auto.TARGET_STEPS <= steps < auto.TARGET_STEPS + per_epoch
    elif chosen.n_epochs == auto.MIN_EPOCHS:
        assert steps >= auto.TARGET_STEPS or chosen.n_epochs == auto.MIN_EPOCHS


def test_explicit_values_are_kept() -> None:
    chosen = auto.resolve(500, n_epochs=3, batch_size=4, multiplier=0.5)
    assert (chosen.n_epochs, chosen.batch_size, chosen.learning_rate_multiplier) == (3, 4, 0.5)
    assert auto.resolve(5, batch_size=32).batch_size == 5  # never more than the examples
    with pytest.raises(ValueError):
        auto.resolve(0)
