"""The offline demo end to end: a reduced demo (small budgets, two tasks) built by
`adapters.demo.build_demo` into the store the way `ctxpeft demo` writes it, its adapters
captioning held-out images, two task adapters on one image, a second run that does nothing,
and `ctxpeft eval` on the result. The full `ctxpeft demo` (>= 90% exact match per task on 200
held-out images) is the slow-marked test at the end.

Chance levels the reduced demo is compared to: a model that ignores the image can do no better
than always giving the most frequent caption. On the 200 test images used here that is
"one shape" for `count` (73 of 200 = 36.5%; 1/3 in expectation) and "red" for `colors`
(21 of 200 = 10.5%; 1/15 in expectation).
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from adapters.backbone import Backbone
from adapters.data.synthetic import SyntheticCaptions, caption, render
from adapters.demo import DemoPlan, backbone_dir, build_demo
from adapters.evaluation import evaluate, generate_captions
from adapters.format import load_adapter
from adapters.model import ContextPEFTModel
from adapters.pretrain import StageOptions
from adapters.training import encode_source
from service.cli import main
from service.commands.demo import StoreSink
from service.store import AdapterStore

TASKS = ("count", "colors")
# The demo preset with half-size budgets: about a minute of CPU on 2 cores.
TINY_PLAN = dataclasses.replace(
    DemoPlan(),
    tasks=TASKS,
    encoder=StageOptions(samples_per_epoch=2000, epochs=4, batch_size=32, lr=3e-3),
    lm=StageOptions(samples_per_epoch=500, epochs=2, batch_size=32, lr=3e-3),
    adapter=dataclasses.replace(DemoPlan().adapter, epochs=3, progress=False),
    train_images=1000,
    val_images=100,
)
TEST_IMAGES = 200


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread, as `ctxpeft demo` runs: on models this small a second intra-op
    thread only adds synchronisation, and on a busy machine it spins (10x slower measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclasses.dataclass
class Built:
    runtime: Path
    store: AdapterStore
    log: list[str]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Built:
    runtime = tmp_path_factory.mktemp("runtime")
    store = AdapterStore(runtime / "adapters")
    log: list[str] = []
    with torch.random.fork_rng():
        report = build_demo(runtime, StoreSink(store), TINY_PLAN, progress=False, log=log.append)
    assert report.backbone_built
    assert report.adapters == {"count": "public/count@v1", "colors": "public/colors@v1"}
    return Built(runtime, store, log)


def _load(built: Built, task: str) -> tuple[ContextPEFTModel, object]:
    backbone = Backbone.load(backbone_dir(built.runtime, "demo"))
    ref = built.store.latest("public", task)
    assert ref is not None
    adapter = load_adapter(built.store.path(ref), backbone.dims, backbone.fingerprint())
    return ContextPEFTModel(backbone), adapter


def test_chance_levels_stated_in_the_docstring_hold() -> None:
    for task, (text, share) in (("count", ("one shape", 0.365)), ("colors", ("red", 0.105))):
        source = SyntheticCaptions(task, "test", TEST_IMAGES, 0)
        counts = Counter(source[i][1] for i in range(TEST_IMAGES))
        assert counts.most_common(1)[0] == (text, round(share * TEST_IMAGES))


def test_backbone_is_saved_in_hugging_face_format(demo: Built) -> None:
    folder = backbone_dir(demo.runtime, "demo")
    for part in ("vision", "lm"):
        assert (folder / part / "config.json").is_file()
        assert (folder / part / "model.safetensors").is_file()
    assert (folder / "tokenizer" / "tokenizer.json").is_file()
    saved = json.loads((folder / "backbone.json").read_text())
    assert saved["fingerprint"] == Backbone.load(folder).fingerprint()
    assert any("encoder epoch 4" in line for line in demo.log)


@pytest.mark.parametrize(("task", "floor"), [("count", 0.80), ("colors", 0.40)])
def test_adapters_caption_held_out_images_well_above_chance(
    demo: Built, task: str, floor: float
) -> None:
    model, adapter = _load(demo, task)
    data = encode_source(model.backbone, SyntheticCaptions(task, "test", TEST_IMAGES, 0))
    report = evaluate(model, adapter, data)  # type: ignore[arg-type]
    assert report.exact_match >= floor, report


def test_one_image_two_adapters_two_tasks(demo: Built) -> None:
    # The first held-out image with two shapes: count and colors must each give their caption.
    source = SyntheticCaptions("count", "test", TEST_IMAGES, 0)
    index = next(i for i in range(TEST_IMAGES) if len(source.scene(i).shapes) == 2)
    scene = source.scene(index)
    expected = {task: caption(scene, task) for task in TASKS}
    assert expected["count"] == "two shapes" and len(expected["colors"].split()) == 2
    model, count = _load(demo, "count")
    _, colors = _load(demo, "colors")
    features = model.backbone.encode_images(model.backbone.preprocess([render(scene)]))
    said = {
        "count": generate_captions(model, count, features),  # type: ignore[arg-type]
        "colors": generate_captions(model, colors, features),  # type: ignore[arg-type]
    }
    assert said == {task: [text] for task, text in expected.items()}


def test_second_run_does_nothing(demo: Built) -> None:
    log: list[str] = []
    report = build_demo(
        demo.runtime, StoreSink(demo.store), TINY_PLAN, progress=False, log=log.append
    )
    assert report.up_to_date
    assert report.trained == {}
    assert log == []
    assert demo.store.versions("public", "count") == [1]


def test_ctxpeft_eval_reports_the_demo_adapter(demo: Built, capsys) -> None:
    args = ["eval", "--synthetic", "count", "--name", "count", "--runtime-dir", str(demo.runtime)]
    assert main([*args, "--size", "50", "--json", "--no-progress"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["adapter"] == "public/count@v1"
    assert metrics["images"] == 50
    assert metrics["exact_match"] >= 0.8


@pytest.mark.slow
@pytest.mark.timeout(1800)  # about 5 minutes on two idle cores; far more on a busy machine
def test_full_demo_reaches_90_percent_exact_match_per_task(tmp_path: Path, capsys) -> None:
    runtime = tmp_path / "var"
    assert main(["demo", "--runtime-dir", str(runtime), "--no-progress"]) == 0
    assert "demo built in" in capsys.readouterr().out
    assert main(["demo", "--runtime-dir", str(runtime), "--no-progress"]) == 0
    assert "demo is up to date" in capsys.readouterr().out
    for task in ("describe", "colors", "count", "describe_fr"):
        args = ["eval", "--synthetic", task, "--name", task, "--runtime-dir", str(runtime)]
        assert main([*args, "--size", "200", "--json", "--no-progress"]) == 0
        metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert metrics["images"] == 200
        assert metrics["exact_match"] >= 0.9, (task, metrics)
