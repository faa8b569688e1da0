"""Loading user caption datasets for training: COCO captions JSON or JSONL.

Two file shapes are accepted:

- COCO captions (an annotations file): ``{"images": [{"id", "file_name"}, ...],
  "annotations": [{"image_id", "caption", ...}, ...]}``; one record per annotation.
- JSONL: one ``{"image": "path.png", "caption": "text"}`` object per line.

Relative image paths are resolved against ``image_root`` when given; otherwise, for JSONL,
against the JSONL's folder, and for COCO, per image, against the first of the JSON's folder,
its ``images/`` sub-folder and an ``images/`` folder beside it that holds the file.

Bad items are skipped and reported (missing or undecodable image, empty caption, malformed
line, missing keys), never fatal: a real dataset of 100k images with three broken files should
still train, and the operator should see which three. Problems with the whole file (not found,
not JSON, neither shape, nothing usable) raise CaptionDataError naming the file.

Usage::

    report = load_caption_records("data/train.jsonl")
    print(report.summary())
    dataset = CaptionImageDataset(report.records)
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import Dataset

# Reasons an item is skipped (stable strings: tests and summaries use them).
MISSING_IMAGE = "missing image"
CORRUPT_IMAGE = "corrupt image"
EMPTY_CAPTION = "empty caption"
MALFORMED_JSON = "malformed JSON"
MISSING_KEYS = "missing keys"
UNKNOWN_IMAGE_ID = "unknown image id"

_SHOWN_PER_REASON = 3  # how many names a summary lists for each reason


class CaptionDataError(ValueError):
    """The caption file as a whole cannot be used; the message names the file and the fault."""


@dataclass(frozen=True)
class CaptionRecord:
    """One training pair: an image file and its caption (stripped of outer whitespace)."""

    image: Path
    caption: str


@dataclass(frozen=True)
class SkippedItem:
    """An item left out: why, which one (a file name or "line N"), and any detail."""

    reason: str
    item: str
    detail: str = ""


@dataclass
class LoadReport:
    """What load_caption_records found: usable records and what was skipped, with reasons."""

    source: Path
    records: list[CaptionRecord] = field(default_factory=list)
    skipped: list[SkippedItem] = field(default_factory=list)

    def skipped_counts(self) -> dict[str, int]:
        return dict(Counter(item.reason for item in self.skipped))

    def summary(self) -> str:
        """One line for the operator, e.g.
        ``loaded 98 records from a.jsonl; skipped 2: 1 missing image (x.png), 1 empty caption
        (line 7)``."""
        text = f"loaded {len(self.records)} records from {self.source.name}"
        if not self.skipped:
            return text
        parts = []
        for reason, count in self.skipped_counts().items():
            names = [s.item for s in self.skipped if s.reason == reason]
            shown = ", ".join(names[:_SHOWN_PER_REASON])
            more = f", ... {count - _SHOWN_PER_REASON} more" if count > _SHOWN_PER_REASON else ""
            parts.append(f"{count} {reason} ({shown}{more})")
        return f"{text}; skipped {len(self.skipped)}: " + ", ".join(parts)


def _image_problem(path: Path, cache: dict[Path, SkippedItem | None]) -> SkippedItem | None:
    """None if path decodes as an image; otherwise why not. Each file is checked once."""
    if path not in cache:
        if not path.is_file():
            cache[path] = SkippedItem(MISSING_IMAGE, path.name, str(path))
        else:
            try:
                # load() decodes the pixels: open() alone reads only the header and would let
                # truncated files through to crash a training step later.
                with Image.open(path) as image:
                    image.load()
                cache[path] = None
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
                cache[path] = SkippedItem(CORRUPT_IMAGE, path.name, str(error))
    return cache[path]


def _caption_text(value: Any) -> str | None:
    return value.strip() if isinstance(value, str) and value.strip() else None


def _read_jsonl(path: Path, text: str, root: Path, verify: bool, report: LoadReport) -> None:
    checked: dict[Path, SkippedItem | None] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"line {number}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as error:
            report.skipped.append(SkippedItem(MALFORMED_JSON, where, error.msg))
            continue
        missing = [k for k in ("image", "caption") if not isinstance(item, dict) or k not in item]
        if missing:
            detail = f"needs 'image' and 'caption'; missing {', '.join(missing)}"
            report.skipped.append(SkippedItem(MISSING_KEYS, where, detail))
            continue
        if not isinstance(item["image"], str) or not item["image"].strip():
            detail = "'image' must be a non-empty path string"
            report.skipped.append(SkippedItem(MISSING_KEYS, where, detail))
            continue
        image_path = root / item["image"]
        caption = _caption_text(item["caption"])
        if caption is None:
            report.skipped.append(SkippedItem(EMPTY_CAPTION, where, image_path.name))
            continue
        problem = _image_problem(image_path, checked) if verify else None
        if problem is not None:
            report.skipped.append(problem)
            continue
        report.records.append(CaptionRecord(image_path, caption))


def _coco_image_path(file_name: str, json_dir: Path, image_root: Path | None) -> Path:
    if image_root is not None:
        return image_root / file_name
    candidates = [json_dir, json_dir / "images", json_dir.parent / "images"]
    for folder in candidates:
        if (folder / file_name).is_file():
            return folder / file_name
    return json_dir / file_name  # missing everywhere: reported as a missing image


def _read_coco(
    data: dict[str, Any], json_dir: Path, image_root: Path | None, verify: bool, report: LoadReport
) -> None:
    files: dict[Any, Path] = {}
    for number, entry in enumerate(data["images"]):
        if not isinstance(entry, dict) or "id" not in entry or "file_name" not in entry:
            detail = "an image entry needs 'id' and 'file_name'"
            report.skipped.append(SkippedItem(MISSING_KEYS, f"images[{number}]", detail))
            continue
        files[entry["id"]] = _coco_image_path(str(entry["file_name"]), json_dir, image_root)
    checked: dict[Path, SkippedItem | None] = {}
    for number, note in enumerate(data["annotations"]):
        where = f"annotations[{number}]"
        if not isinstance(note, dict) or "image_id" not in note or "caption" not in note:
            detail = "an annotation needs 'image_id' and 'caption'"
            report.skipped.append(SkippedItem(MISSING_KEYS, where, detail))
            continue
        if note["image_id"] not in files:
            detail = f"image_id {note['image_id']!r} is not in 'images'"
            report.skipped.append(SkippedItem(UNKNOWN_IMAGE_ID, where, detail))
            continue
        image_path = files[note["image_id"]]
        caption = _caption_text(note["caption"])
        if caption is None:
            report.skipped.append(SkippedItem(EMPTY_CAPTION, image_path.name, where))
            continue
        problem = _image_problem(image_path, checked) if verify else None
        if problem is not None:
            report.skipped.append(problem)
            continue
        report.records.append(CaptionRecord(image_path, caption))


def _is_coco(data: Any) -> bool:
    return (
        isinstance(data, dict)
        and isinstance(data.get("images"), list)
        and isinstance(data.get("annotations"), list)
    )


def load_caption_records(
    path: str | Path, image_root: str | Path | None = None, *, verify_images: bool = True
) -> LoadReport:
    """Read a COCO captions JSON or a JSONL caption file into records plus a skip report.

    verify_images (default on) opens and decodes every image file once, so missing and corrupt
    files are reported here instead of failing mid-training; turning it off skips every image
    check (for very large sets already known to be clean).
    """
    path = Path(path)
    root = Path(image_root) if image_root is not None else None
    if not path.exists():
        raise CaptionDataError(f"{path}: file not found")
    if path.is_dir():
        raise CaptionDataError(f"{path}: is a folder; pass the COCO JSON or JSONL file inside it")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise CaptionDataError(f"{path}: cannot be read as UTF-8 text ({error})") from error
    report = LoadReport(source=path)

    data: Any = None
    whole_json = path.suffix.lower() != ".jsonl"
    if whole_json:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            first = next((line for line in text.splitlines() if line.strip()), "")
            if not first.lstrip().startswith("{"):
                raise CaptionDataError(
                    f"{path}: not valid JSON ({error.msg} at line {error.lineno} column "
                    f"{error.colno}); expected a COCO captions JSON or a JSONL file"
                ) from error
            whole_json = False  # several JSON objects, one per line: JSONL named .json

    if not whole_json or (isinstance(data, dict) and {"image", "caption"} <= data.keys()):
        # A one-line JSONL file also parses as a single JSON object: treat it as JSONL.
        _read_jsonl(path, text, root if root is not None else path.parent, verify_images, report)
    elif _is_coco(data):
        _read_coco(data, path.parent, root, verify_images, report)
    else:
        shape = type(data).__name__
        keys = f" with keys {sorted(data)[:5]}" if isinstance(data, dict) else ""
        raise CaptionDataError(
            f"{path}: JSON {shape}{keys} is neither a COCO captions file (an object with "
            "'images' and 'annotations' lists) nor JSONL ({'image': ..., 'caption': ...} "
            "per line)"
        )

    if not report.records:
        raise CaptionDataError(f"{path}: no usable records; {report.summary()}")
    return report


class CaptionImageDataset(Dataset[tuple[Image.Image, str]]):
    """(RGB image, caption) pairs from records; each image is read from disk when indexed."""

    def __init__(self, records: Sequence[CaptionRecord]) -> None:
        self.records = list(records)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[Image.Image, str]:
        record = self.records[index]
        with Image.open(record.image) as image:
            return image.convert("RGB"), record.caption

    def __iter__(self) -> Iterator[tuple[Image.Image, str]]:
        return (self[i] for i in range(len(self)))
