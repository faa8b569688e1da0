"""Tests for adapters.evaluation: exact match, BLEU-4/CIDEr, perplexity and greedy captions."""

import math
from collections.abc import Iterator

import pytest
import torch

from adapters.adapter_set import AdapterSet
from adapters.data.synthetic import SyntheticCaptions
from adapters.decoding import generate
from adapters.evaluation import bleu4_cider, evaluate, exact_match, generate_captions, normalise
from adapters.model import ContextPEFTModel
from adapters.training import (
    EncodedCaptions,
    TrainOptions,
    adapter_config,
    encode_source,
    mean_loss,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread, as `ctxpeft demo` runs: on models this small a second intra-op
    thread only adds synchronisation, and on a busy machine it spins (10x slower measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_model(model: ContextPEFTModel) -> tuple[ContextPEFTModel, AdapterSet]:
    """The shared tiny model (conftest) and a freshly initialised LoRA set for it."""
    config = adapter_config(TrainOptions(rank=2), model.backbone)
    return model, AdapterSet.initialise(config, model.backbone.dims, seed=0).eval()


@pytest.fixture(scope="module")
def tiny_data(model: ContextPEFTModel) -> EncodedCaptions:
    return encode_source(model.backbone, SyntheticCaptions("count", "test", 6, seed=0))


def test_normalise_collapses_whitespace_and_case() -> None:
    assert normalise("  Two   SHAPES \n") == "two shapes"


def test_exact_match_counts_any_reference_after_normalising() -> None:
    predictions = ["Red  blue", "two shapes", "a small red circle", ""]
    references = [["red blue"], ["one shape"], ["a large red circle", "a small red circle"], ["x"]]
    assert exact_match(predictions, references) == pytest.approx(0.5)
    assert exact_match([], []) == 0.0
    with pytest.raises(ValueError, match="2 predictions for 1"):
        exact_match(["a", "b"], [["a"]])


def test_bleu4_and_cider_are_pycocoevalcap_scores() -> None:
    refs = [["a large red circle left of a small blue square"], ["a small green triangle"]]
    perfect = bleu4_cider([r[0] for r in refs], refs)
    assert perfect[0] == pytest.approx(1.0, abs=1e-6)
    assert perfect[1] > 1.0
    wrong = bleu4_cider(["a small blue square left of a large red circle", "three shapes"], refs)
    assert wrong[0] < perfect[0]
    assert wrong[1] < perfect[1]
    assert bleu4_cider([], []) == (0.0, 0.0)


def test_perplexity_of_an_untrained_adapter_is_near_uniform(tiny_model, tiny_data) -> None:
    """A fresh LoRA set is the identity and the tiny LM is random: the loss is close to
    log(vocab) and the report's perplexity is exp(loss)."""
    model, adapter = tiny_model
    loss = mean_loss(model, adapter, tiny_data)
    vocab = model.backbone.dims.vocab_size
    assert abs(loss - math.log(vocab)) < 1.0
    report = evaluate(model, adapter, tiny_data, max_new_tokens=3, examples=2)
    assert report.perplexity == pytest.approx(math.exp(report.loss))
    assert report.loss == pytest.approx(loss, rel=1e-5)
    assert report.images == tiny_data.num_images == 6
    assert report.captions == 6
    assert 0.0 <= report.exact_match <= 1.0
    assert len(report.examples) == 2


def test_generated_captions_match_the_models_greedy_ids(tiny_model, tiny_data) -> None:
    model, adapter = tiny_model
    captions = generate_captions(model, adapter, tiny_data.features, batch_size=4, max_new_tokens=3)
    slots = torch.zeros(tiny_data.num_images, dtype=torch.long)
    ids = generate(model, tiny_data.features, adapter, slots, 3)
    assert captions == [model.decode(row) for row in ids]
    assert all(len(c.split()) <= 3 for c in captions)
