"""Tests for adapters.training: options, encoding once per image, the training loop (best
epoch kept, scopes, determinism, divergence) on the tiny conftest backbone."""

import copy
from collections.abc import Iterator

import pytest
import torch
from PIL import Image

from adapters.adapter_set import lm_parameter_count
from adapters.data.captions import CaptionRecord
from adapters.data.synthetic import SyntheticCaptions, render, sample_scene
from adapters.model import ContextPEFTModel
from adapters.training import (
    EncodedCaptions,
    StepStats,
    TrainCheckpoint,
    TrainingError,
    TrainingStopped,
    TrainOptions,
    adapter_config,
    encode_records,
    encode_source,
    mean_loss,
    train_adapter,
)

FAST = TrainOptions(epochs=3, batch_size=4, lr=1e-2, progress=False, rank=2)


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread, as `ctxpeft demo` runs: on models this small a second intra-op
    thread only adds synchronisation, and on a busy machine it spins (10x slower measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(model: ContextPEFTModel) -> tuple[EncodedCaptions, EncodedCaptions]:
    train = encode_source(model.backbone, SyntheticCaptions("count", "train", 12, seed=0))
    val = encode_source(model.backbone, SyntheticCaptions("count", "val", 4, seed=0))
    return train, val


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "prefix"}, "unknown method"),
        ({"contexts": "both"}, "contexts must be"),
        ({"rank": 0}, "rank must be"),
        ({"lr": 0.0}, "lr must be"),
        ({"epochs": 0}, "epochs and batch_size"),
        ({"connector_dropout": 1.0}, "connector_dropout"),
        ({"scope": "lm"}, "scope must be"),
        ({"method": "ia3", "targets": ("q_proj", "gate_up_proj")}, "invalid ia3 target"),
    ],
)
def test_options_are_validated(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainOptions(**kwargs)


def test_defaults_are_the_paper_recipe() -> None:
    options = TrainOptions()
    assert (options.method, options.contexts, options.rank, options.targets) == (
        "lora",
        "specific",
        8,
        "all",
    )
    assert (options.lr, options.betas, options.connector_dropout) == (1e-4, (0.9, 0.95), 0.1)
    assert options.schedule == "constant"
    assert options.weight_decay == 0.0


def test_adapter_config_of_agnostic_has_half_the_lm_parameters(model: ContextPEFTModel) -> None:
    backbone = model.backbone
    specific = adapter_config(TrainOptions(rank=2), backbone)
    agnostic = adapter_config(TrainOptions(rank=2, contexts="agnostic"), backbone)
    assert specific.contexts == ("image", "text") and agnostic.contexts == ("all",)
    assert specific.base_fingerprint == backbone.fingerprint()
    assert specific.connector.in_features == backbone.vision_dim
    assert lm_parameter_count(specific, backbone.dims) == 2 * lm_parameter_count(
        agnostic, backbone.dims
    )


def test_records_are_encoded_once_per_image(model: ContextPEFTModel, tmp_path) -> None:
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"{i}.png")
        render(sample_scene(__import__("random").Random(i))).save(paths[-1])
    records = [
        CaptionRecord(paths[0], "one shape"),
        CaptionRecord(paths[1], "two shapes"),
        CaptionRecord(paths[0], "red"),
    ]
    data = encode_records(model.backbone, records)
    assert data.num_images == 2 and len(data) == 3
    assert data.image_index == [0, 0, 1]
    assert data.references == [["one shape", "red"], ["two shapes"]]
    tok = model.backbone.tokenizer
    assert data.tokens[0] == tok("one shape", add_special_tokens=False)["input_ids"]
    assert data.unknown_words == 0
    with Image.open(paths[1]) as image:
        direct = model.backbone.encode_images(model.backbone.preprocess([image]))
    torch.testing.assert_close(data.features[1:2], direct)
    only_second = data.subset_images([1])
    assert only_second.references == [["two shapes"]] and only_second.image_index == [0]


def test_unknown_words_are_counted(model: ContextPEFTModel) -> None:
    class Source:
        def __len__(self) -> int:
            return 2

        def __getitem__(self, i: int) -> tuple[Image.Image, str]:
            return Image.new("RGB", (16, 16)), ["a zebra", "red"][i]

    assert encode_source(model.backbone, Source()).unknown_words == 1


def test_training_lowers_the_loss_and_keeps_the_best_epoch(model, data) -> None:
    train, val = data
    seen = []
    result = train_adapter(model, train, val, FAST, on_epoch=seen.append)
    assert [s.epoch for s in result.history] == [1, 2, 3] == [s.epoch for s in seen]
    losses = [s.val_loss for s in result.history]
    assert result.best_epoch == losses.index(min(losses)) + 1
    assert result.history[-1].train_loss < result.history[0].train_loss
    # The returned set is the best epoch's: its validation loss is the recorded one.
    assert mean_loss(model, result.adapter, val) == pytest.approx(min(losses), rel=1e-4)
    assert not result.adapter.training
    assert result.trainable_lm_parameters == lm_parameter_count(
        result.adapter.config, model.backbone.dims
    )
    assert result.trainable_connector_parameters == (
        model.backbone.vision_dim * model.backbone.dims.hidden_size
        + model.backbone.dims.hidden_size
    )
    assert not any(p.requires_grad for p in model.backbone.parameters())


def test_same_seed_same_adapter(model, data) -> None:
    train, val = data
    options = TrainOptions(epochs=1, batch_size=4, lr=1e-2, progress=False, rank=2, seed=3)
    first = train_adapter(model, train, val, options).adapter.tensors()
    second = train_adapter(model, train, val, options).adapter.tensors()
    for name, tensor in first.items():
        torch.testing.assert_close(tensor, second[name])


def test_connector_scope_leaves_the_lm_adapter_neutral(model, data) -> None:
    train, val = data
    options = TrainOptions(
        method="ia3", scope="connector", epochs=1, batch_size=4, lr=1e-2, progress=False
    )
    result = train_adapter(model, train, val, options)
    tensors = result.adapter.tensors()
    ia3 = [t for n, t in tensors.items() if n.endswith(".ia3")]
    assert ia3 and all(bool((t == 1.0).all()) for t in ia3)
    assert result.trainable_lm_parameters == 0
    assert result.trainable_connector_parameters > 0


def test_full_scope_trains_every_lm_weight(model, data) -> None:
    train, val = data
    own = ContextPEFTModel(copy.deepcopy(model.backbone))
    before = {n: p.detach().clone() for n, p in own.backbone.lm.named_parameters()}
    options = TrainOptions(method="ia3", scope="full", epochs=1, batch_size=4, lr=1e-3)
    result = train_adapter(own, train, val, dataclass_replace(options, progress=False))
    lm_total = sum(p.numel() for p in own.backbone.lm.parameters())
    assert result.trainable_lm_parameters == lm_total
    changed = [n for n, p in own.backbone.lm.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) == len(before)
    assert not any(p.requires_grad for p in own.backbone.parameters())
    # The shared model was not touched.
    assert torch.equal(
        model.backbone.lm.get_input_embeddings().weight, before["model.embed_tokens.weight"]
    )


def test_divergence_stops_with_a_message(model, data) -> None:
    train, val = data
    options = TrainOptions(epochs=1, batch_size=4, lr=1e30, progress=False, rank=2)
    with pytest.raises(TrainingError, match="lower the learning rate"):
        train_adapter(model, train, val, options)


def test_empty_data_is_refused(model, data) -> None:
    train, _ = data
    with pytest.raises(TrainingError, match="at least one"):
        train_adapter(model, train, train.subset_images([]), FAST)


# 12 captions at batch 4: 3 steps per epoch; stops mid-epoch (2, 7), at an epoch's last step
# (6: the run goes on to that epoch's end) and at an epoch boundary through the checkpoint.
@pytest.mark.parametrize("stops", [[2], [7], [6], [2, 3, 7, 8]])
def test_a_run_stopped_and_resumed_is_the_run_that_never_stopped(
    model, data, tmp_path, stops: list[int]
) -> None:
    train, val = data
    options = dataclass_replace(FAST, epochs=4, connector_dropout=0.3, schedule="cosine")
    whole_steps: list[StepStats] = []
    whole = train_adapter(model, train, val, options, on_step=whole_steps.append)
    assert [s.step for s in whole_steps] == list(range(1, 13))

    pieces: list[StepStats] = []
    resume: TrainCheckpoint | None = None
    pending = list(stops)
    while True:

        def step(stats: StepStats) -> bool:
            pieces.append(stats)
            return bool(pending) and stats.step == pending[0]

        try:
            result = train_adapter(model, train, val, options, on_step=step, resume=resume)
            break
        except TrainingStopped as stopped:
            pending.pop(0)
            path = tmp_path / "checkpoint.pt"
            stopped.checkpoint.save(path)  # through the file, as a job's worker does
            resume = TrainCheckpoint.load(path)
            assert resume.steps_done == pieces[-1].step
    assert not pending
    assert [s.step for s in pieces] == list(range(1, 13))
    assert [s.loss for s in pieces] == [s.loss for s in whole_steps]
    assert [(h.epoch, h.train_loss, h.val_loss) for h in result.history] == [
        (h.epoch, h.train_loss, h.val_loss) for h in whole.history
    ]
    assert result.best_epoch == whole.best_epoch
    for name, tensor in whole.adapter.tensors().items():
        assert torch.equal(tensor, result.adapter.tensors()[name]), name


def test_epoch_checkpoints_resume_the_run(model, data, tmp_path) -> None:
    train, val = data
    options = dataclass_replace(FAST, epochs=3)
    checkpoints: list[TrainCheckpoint] = []
    whole = train_adapter(model, train, val, options, on_checkpoint=checkpoints.append)
    assert [(c.epoch, c.epoch_step, c.steps_done) for c in checkpoints] == [(2, 0, 3), (3, 0, 6)]
    resumed = train_adapter(model, train, val, options, resume=checkpoints[0])
    for name, tensor in whole.adapter.tensors().items():
        assert torch.equal(tensor, resumed.adapter.tensors()[name]), name
    other = dataclass_replace(options, epochs=5)
    with pytest.raises(TrainingError, match="same data and options"):
        train_adapter(model, train, val, other, resume=checkpoints[0])


def dataclass_replace(options: TrainOptions, **changes) -> TrainOptions:
    import dataclasses

    return dataclasses.replace(options, **changes)
