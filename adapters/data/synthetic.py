"""A deterministic synthetic multi-task captioning dataset: coloured shapes drawn with Pillow.

Everything in the project must run offline and be checkable, so the demo adapters learn from
scenes whose captions are a pure function of what is drawn. A scene holds 1 to 3 shapes, each
in its own third of the image (a left-to-right "band"), so shapes never overlap and their order
is unambiguous; every caption lists them left to right, so an exact-match check is fair.

Tasks (same images, different captions; names are stable, adapters are trained per task):

=============  =====================================================================
``describe``     1: ``a large red circle``
                 2: ``a large red circle left of a small blue square``
                 3: ``a large red circle , a small blue square and a small green triangle``
``colors``       ``red``, ``red blue``, ``red blue green``
``count``        ``one shape``, ``two shapes``, ``three shapes``
``describe_fr``  1: ``un grand cercle rouge``
                 2: ``un grand cercle rouge a gauche d'un petit carre bleu``
                 3: ``un grand cercle rouge , un petit carre bleu et un petit triangle vert``
=============  =====================================================================

Words are lowercase ASCII separated by single spaces (the comma is a word of its own; French is
written without accents), so a word-level tokenizer round-trips every caption exactly.

Splits are disjoint *by construction*: every scene falls into one of ten buckets by a hash of
its exact content (shapes and positions); buckets 0-7 are "train", 8 "val", 9 "test", and an
item's scene is re-drawn until it lands in its split's buckets. A test image is therefore never
a train image, whatever the seeds (its caption may well occur in train: only positions differ).

Usage::

    ds = SyntheticCaptions("describe", split="train", size=2000, seed=0)
    image, text = ds[0]
    write_jsonl(SyntheticCaptions("colors", "val", 50), "var/data/colors-val")
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Protocol

from PIL import Image, ImageDraw

TASKS: tuple[str, ...] = ("describe", "colors", "count", "describe_fr")
SPLITS: tuple[str, ...] = ("train", "val", "test")

KINDS: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: tuple[str, ...] = ("small", "large")
# Saturated, far-apart colours so a tiny vision encoder separates them at 64x64.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 205, 20),
    "purple": (130, 40, 170),
}
BACKGROUND: tuple[int, int, int] = (255, 255, 255)
MAX_SHAPES = 3

# Half-extent of a shape as a fraction of the image side. A large shape (0.26 wide) fits in a
# band (1/3 wide) with room to spare, so shapes in different bands never touch.
RADIUS: dict[str, float] = {"small": 0.07, "large": 0.13}
_MARGIN = 0.02  # minimum gap between a shape and its band edge / the image border

_FRENCH: dict[str, str] = {
    "circle": "cercle",
    "square": "carre",
    "triangle": "triangle",
    "small": "petit",
    "large": "grand",
    "red": "rouge",
    "green": "vert",
    "blue": "bleu",
    "yellow": "jaune",
    "purple": "violet",
}
_NUMBERS: dict[int, str] = {1: "one", 2: "two", 3: "three"}

# Bucket ranges of the content hash per split (out of _BUCKETS).
_BUCKETS = 10
_SPLIT_BUCKETS: dict[str, range] = {"train": range(0, 8), "val": range(8, 9), "test": range(9, 10)}


@dataclass(frozen=True)
class Shape:
    """One shape: kind, colour and size names, and its centre as fractions of the image side."""

    kind: str
    color: str
    size: str
    x: float
    y: float

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown shape kind {self.kind!r}; expected one of {KINDS}")
        if self.color not in COLORS:
            raise ValueError(f"unknown colour {self.color!r}; expected one of {tuple(COLORS)}")
        if self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}; expected one of {SIZES}")
        if not (0.0 <= self.x <= 1.0 and 0.0 <= self.y <= 1.0):
            raise ValueError(f"shape centre ({self.x}, {self.y}) is outside the unit square")


@dataclass(frozen=True)
class Scene:
    """1 to 3 shapes on a plain white background. Captions list them by increasing x."""

    shapes: tuple[Shape, ...]

    def __post_init__(self) -> None:
        if not 1 <= len(self.shapes) <= MAX_SHAPES:
            raise ValueError(f"a scene holds 1 to {MAX_SHAPES} shapes, got {len(self.shapes)}")

    def left_to_right(self) -> tuple[Shape, ...]:
        return tuple(sorted(self.shapes, key=lambda s: s.x))

    def content_hash(self) -> int:
        """A platform-independent hash of the exact content (repr of floats is exact)."""
        key = repr([(s.kind, s.color, s.size, s.x, s.y) for s in self.left_to_right()])
        return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")


def sample_scene(rng: random.Random) -> Scene:
    """Draw a scene: 1-3 shapes, each in a distinct third of the image, jittered inside it."""
    count = rng.randint(1, MAX_SHAPES)
    bands = sorted(rng.sample(range(MAX_SHAPES), count))
    shapes = []
    for band in bands:
        size = rng.choice(SIZES)
        radius = RADIUS[size]
        slack = 1 / (2 * MAX_SHAPES) - radius - _MARGIN  # how far the centre may move in its band
        x = (band + 0.5) / MAX_SHAPES + rng.uniform(-slack, slack)
        y = rng.uniform(radius + _MARGIN, 1 - radius - _MARGIN)
        # Rounded so that scenes (and their hashes) are short, exact and easy to write by hand.
        shapes.append(
            Shape(rng.choice(KINDS), rng.choice(tuple(COLORS)), size, round(x, 4), round(y, 4))
        )
    return Scene(tuple(shapes))


def render(scene: Scene, image_size: int = 64) -> Image.Image:
    """Draw the scene as an RGB image of image_size x image_size pixels (no anti-aliasing)."""
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16 pixels, got {image_size}")
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for shape in scene.shapes:
        cx, cy = round(shape.x * image_size), round(shape.y * image_size)
        r = max(1, round(RADIUS[shape.size] * image_size))
        fill = COLORS[shape.color]
        if shape.kind == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif shape.kind == "square":
            draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:  # triangle pointing up; its bounding-box centre (cx, cy) lies inside it
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return image


def _describe(shapes: tuple[Shape, ...]) -> str:
    phrases = [f"a {s.size} {s.color} {s.kind}" for s in shapes]
    if len(phrases) == 3:
        return f"{phrases[0]} , {phrases[1]} and {phrases[2]}"
    return " left of ".join(phrases)


def _describe_fr(shapes: tuple[Shape, ...]) -> str:
    phrases = [f"un {_FRENCH[s.size]} {_FRENCH[s.kind]} {_FRENCH[s.color]}" for s in shapes]
    if len(phrases) == 3:
        return f"{phrases[0]} , {phrases[1]} et {phrases[2]}"
    if len(phrases) == 2:
        # "un ..." after "de" contracts to "d'un ...": the contraction is one word.
        return f"{phrases[0]} a gauche d'{phrases[1]}"
    return phrases[0]


def caption(scene: Scene, task: str) -> str:
    """The canonical caption of scene for task (objects listed left to right)."""
    shapes = scene.left_to_right()
    if task == "describe":
        return _describe(shapes)
    if task == "colors":
        return " ".join(s.color for s in shapes)
    if task == "count":
        return f"{_NUMBERS[len(shapes)]} shape{'s' if len(shapes) > 1 else ''}"
    if task == "describe_fr":
        return _describe_fr(shapes)
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


@lru_cache(maxsize=1)
def _all_words() -> tuple[str, ...]:
    # Templates do not depend on which attributes fill them, so every single-shape attribute
    # combination plus one scene per shape count covers every word of every task.
    singles = [Shape(k, c, s, 0.5, 0.5) for k, c, s in itertools.product(KINDS, COLORS, SIZES)]
    scenes = [Scene((shape,)) for shape in singles]
    scenes += [
        Scene(tuple(Shape("circle", "red", "small", (i + 0.5) / n, 0.5) for i in range(n)))
        for n in range(2, MAX_SHAPES + 1)
    ]
    words = {w for scene in scenes for task in TASKS for w in caption(scene, task).split()}
    return tuple(sorted(words))


def vocabulary() -> list[str]:
    """Every word any task can produce, sorted (a deterministic list)."""
    return list(_all_words())


class SyntheticCaptions:
    """An indexable dataset of (image, caption) for one task and split.

    Item i is a pure function of (split, seed, i): its RNG is seeded with that string, so the
    same arguments give identical pixels and captions on any machine, and all tasks with the same
    (split, seed) share the same images. Works as a map-style torch DataLoader dataset.
    """

    def __init__(
        self,
        task: str,
        split: str = "train",
        size: int = 1000,
        seed: int = 0,
        image_size: int = 64,
    ) -> None:
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        self.task, self.split, self.size = task, split, size
        self.seed, self.image_size = seed, image_size

    def __len__(self) -> int:
        return self.size

    def scene(self, index: int) -> Scene:
        """The scene of item index (no rendering; cheap)."""
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for a dataset of {self.size}")
        # random.Random hashes a str seed with SHA-512: stable across runs and platforms.
        rng = random.Random(f"synthetic:{self.split}:{self.seed}:{index}")
        buckets = _SPLIT_BUCKETS[self.split]
        while True:  # rejection: ~1.25 draws for train, ~10 for val/test
            scene = sample_scene(rng)
            if scene.content_hash() % _BUCKETS in buckets:
                return scene

    def __getitem__(self, index: int) -> tuple[Image.Image, str]:
        if index < 0:
            index += self.size
        scene = self.scene(index)
        return render(scene, self.image_size), caption(scene, self.task)

    def __repr__(self) -> str:
        return (
            f"SyntheticCaptions(task={self.task!r}, split={self.split!r}, size={self.size}, "
            f"seed={self.seed}, image_size={self.image_size})"
        )


class CaptionSource(Protocol):
    """Anything indexable that yields (image, caption), e.g. SyntheticCaptions."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[Image.Image, str]: ...


def _write_images(dataset: CaptionSource, folder: Path) -> list[tuple[str, str]]:
    """Save every image as folder/images/NNNNNN.png; return (file name, caption) pairs."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    items = []
    for index in range(len(dataset)):
        image, text = dataset[index]
        name = f"{index:06d}.png"
        image.save(folder / "images" / name, format="PNG")
        items.append((name, text))
    return items


def write_jsonl(dataset: CaptionSource, folder: str | Path) -> Path:
    """Write images/NNNNNN.png and captions.jsonl ({"image": "images/...", "caption": ...}).

    Returns the path of the JSONL file; image paths in it are relative to its folder.
    """
    folder = Path(folder)
    items = _write_images(dataset, folder)
    path = folder / "captions.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for name, text in items:
            f.write(json.dumps({"image": f"images/{name}", "caption": text}) + "\n")
    return path


def write_coco(dataset: CaptionSource, folder: str | Path) -> Path:
    """Write images/NNNNNN.png and a COCO captions file captions.json; return its path.

    As in COCO, file_name is the bare image name; the loader finds it in the sibling images/.
    """
    folder = Path(folder)
    items = _write_images(dataset, folder)
    coco = {
        "images": [{"id": i, "file_name": name} for i, (name, _) in enumerate(items)],
        "annotations": [
            {"id": i, "image_id": i, "caption": text} for i, (_, text) in enumerate(items)
        ],
    }
    path = folder / "captions.json"
    path.write_text(json.dumps(coco, indent=1), encoding="utf-8")
    return path
