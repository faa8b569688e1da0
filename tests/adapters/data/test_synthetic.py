"""Tests for adapters.data.synthetic: exact captions, pixels, determinism, disjoint splits."""

import itertools
import json
import random

import numpy as np
import pytest

from adapters.data.synthetic import (
    COLORS,
    RADIUS,
    TASKS,
    Scene,
    Shape,
    SyntheticCaptions,
    caption,
    render,
    sample_scene,
    vocabulary,
    write_coco,
    write_jsonl,
)

ONE = Scene((Shape("triangle", "yellow", "small", 0.5, 0.5),))
# Given right-to-left on purpose: captions must still list shapes left to right.
TWO = Scene((Shape("square", "blue", "small", 0.8, 0.3), Shape("circle", "red", "large", 0.2, 0.6)))
THREE = Scene(
    (
        Shape("circle", "red", "large", 0.17, 0.5),
        Shape("square", "blue", "small", 0.5, 0.4),
        Shape("triangle", "green", "small", 0.83, 0.6),
    )
)

EXPECTED = [
    (ONE, "describe", "a small yellow triangle"),
    (TWO, "describe", "a large red circle left of a small blue square"),
    (THREE, "describe", "a large red circle , a small blue square and a small green triangle"),
    (ONE, "colors", "yellow"),
    (TWO, "colors", "red blue"),
    (THREE, "colors", "red blue green"),
    (ONE, "count", "one shape"),
    (TWO, "count", "two shapes"),
    (THREE, "count", "three shapes"),
    (ONE, "describe_fr", "un petit triangle jaune"),
    (TWO, "describe_fr", "un grand cercle rouge a gauche d'un petit carre bleu"),
    (
        THREE,
        "describe_fr",
        "un grand cercle rouge , un petit carre bleu et un petit triangle vert",
    ),
]


@pytest.mark.parametrize(("scene", "task", "expected"), EXPECTED)
def test_caption_exact_strings(scene: Scene, task: str, expected: str) -> None:
    assert caption(scene, task) == expected


def test_tasks_and_vocabulary() -> None:
    assert TASKS == ("describe", "colors", "count", "describe_fr")
    words = vocabulary()
    assert words == sorted(words) and len(words) == len(set(words)) == 33
    assert {",", "d'un", "circle", "carre", "purple", "violet", "shapes"} <= set(words)


def test_unknown_task_and_bad_shapes_rejected() -> None:
    with pytest.raises(ValueError, match="unknown task"):
        caption(ONE, "poetry")
    with pytest.raises(ValueError, match="unknown colour"):
        Shape("circle", "pink", "small", 0.5, 0.5)
    with pytest.raises(ValueError, match="1 to 3 shapes"):
        Scene(())
    with pytest.raises(ValueError, match="unknown split"):
        SyntheticCaptions("describe", split="dev")


def test_render_puts_shape_colour_at_centre() -> None:
    image = render(THREE, image_size=64)
    assert image.mode == "RGB" and image.size == (64, 64)
    for shape in THREE.shapes:
        centre = (round(shape.x * 64), round(shape.y * 64))
        assert image.getpixel(centre) == COLORS[shape.color]
    assert image.getpixel((0, 0)) == (255, 255, 255)


def test_render_sizes_differ() -> None:
    small = np.asarray(render(Scene((Shape("square", "red", "small", 0.5, 0.5),)), 64))
    large = np.asarray(render(Scene((Shape("square", "red", "large", 0.5, 0.5),)), 64))
    painted = [int((a != 255).any(axis=-1).sum()) for a in (small, large)]
    assert painted == [(2 * round(RADIUS[s] * 64) + 1) ** 2 for s in ("small", "large")]


def test_sampled_scenes_are_valid() -> None:
    rng = random.Random(0)
    for _ in range(300):
        scene = sample_scene(rng)
        assert 1 <= len(scene.shapes) <= 3
        xs = [s.x for s in scene.left_to_right()]
        # Extents along x never touch: each shape stays inside its own third.
        spans = [(s.x - RADIUS[s.size], s.x + RADIUS[s.size]) for s in scene.left_to_right()]
        assert all(a[1] < b[0] for a, b in itertools.pairwise(spans))
        assert all(lo > 0 and hi < 1 for lo, hi in spans) and xs == sorted(xs)
        number = ["one", "two", "three"][len(scene.shapes) - 1]
        assert caption(scene, "count").split()[0] == number
        assert len(caption(scene, "colors").split()) == len(scene.shapes)
        for task in TASKS:
            assert set(caption(scene, task).split()) <= set(vocabulary())


def test_same_arguments_give_identical_items() -> None:
    a = SyntheticCaptions("describe", "train", size=20, seed=3)
    b = SyntheticCaptions("describe", "train", size=20, seed=3)
    for i in range(20):
        (image_a, text_a), (image_b, text_b) = a[i], b[i]
        assert text_a == text_b
        assert image_a.tobytes() == image_b.tobytes()
    other_seed = SyntheticCaptions("describe", "train", size=20, seed=4)
    assert [a.scene(i) for i in range(20)] != [other_seed.scene(i) for i in range(20)]


def test_tasks_share_images() -> None:
    describe = SyntheticCaptions("describe", "val", size=10)
    count = SyntheticCaptions("count", "val", size=10)
    for i in range(10):
        assert describe[i][0].tobytes() == count[i][0].tobytes()
        assert count[i][1] == caption(describe.scene(i), "count")


def test_splits_are_disjoint() -> None:
    def scenes(split: str, seed: int) -> set[Scene]:
        ds = SyntheticCaptions("describe", split, size=300, seed=seed)
        return {ds.scene(i) for i in range(len(ds))}

    train, val, test = scenes("train", 0), scenes("val", 0), scenes("test", 0)
    assert len(train) == len(test) == 300
    assert not train & test and not train & val and not val & test
    assert not scenes("train", 1) & test  # disjoint across seeds too: split is by content
    images = {SyntheticCaptions("describe", "train", 100)[i][0].tobytes() for i in range(100)}
    assert not images & {
        SyntheticCaptions("describe", "test", 100)[i][0].tobytes() for i in range(100)
    }


def test_indexing() -> None:
    ds = SyntheticCaptions("colors", "test", size=3, image_size=32)
    assert len(ds) == 3 and ds[-1][1] == ds[2][1] and ds[0][0].size == (32, 32)
    with pytest.raises(IndexError):
        ds[3]
    assert len(list(ds)) == 3  # the legacy iteration protocol stops at IndexError


def test_write_jsonl_and_coco(tmp_path) -> None:
    ds = SyntheticCaptions("count", "val", size=4)
    path = write_jsonl(ds, tmp_path / "j")
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0] == {"image": "images/000000.png", "caption": ds[0][1]}
    assert len(lines) == 4 and (tmp_path / "j" / "images" / "000003.png").is_file()

    coco = json.loads(write_coco(ds, tmp_path / "c").read_text())
    assert coco["images"][1] == {"id": 1, "file_name": "000001.png"}
    assert coco["annotations"][1] == {"id": 1, "image_id": 1, "caption": ds[1][1]}
