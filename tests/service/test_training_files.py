"""Training-file parsing (service.jobs.data): the three accepted shapes, and every bad line
named with its number and reason."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from service.jobs.data import (
    MAX_LISTED,
    DataLimits,
    TrainingFileError,
    parse_training_file,
)
from tests.e2e.fine_tuning_helpers import chat_line, coco_zip, png
from tests.e2e.openai_helpers import data_url


def image(color: str = "red", size: int = 16) -> bytes:
    return png(Image.new("RGB", (size, size), color))


def write(tmp_path: Path, content: bytes | str, name: str = "f.jsonl") -> Path:
    path = tmp_path / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def refused(path: Path, limits: DataLimits | None = None) -> TrainingFileError:
    with pytest.raises(TrainingFileError) as error:
        parse_training_file(path, limits or DataLimits())
    return error.value


def test_openai_chat_lines_group_captions_by_image(tmp_path: Path) -> None:
    lines = [
        chat_line(image("red"), "red"),
        chat_line(image("red"), "a red one"),
        chat_line(image("blue"), "blue"),
    ]
    data = parse_training_file(write(tmp_path, "\n".join(lines) + "\n\n"))
    assert data.format == "openai_chat"
    assert [e.caption for e in data.examples] == ["red", "a red one", "blue"]
    assert [(len(c), c[0]) for _, c in data.grouped()] == [(2, "red"), (1, "blue")]
    assert data.tokens(lambda text: len(text.split())) == 1 + 1 + 3 + 1 + 1 + 1
    assert data.warnings == []


def test_a_prompt_is_accepted_and_ignored_with_a_warning(tmp_path: Path) -> None:
    line = {
        "messages": [
            {"role": "system", "content": "You caption images."},
            {"role": "user", "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": data_url(image()), "detail": "low"}},
            ]},
            {"role": "assistant", "content": [{"type": "text", "text": "a square"}]},
        ]
    }  # fmt: skip
    data = parse_training_file(write(tmp_path, json.dumps(line)))
    assert [e.caption for e in data.examples] == ["a square"]
    assert len(data.warnings) == 1 and "prompt" in data.warnings[0]


def test_image_and_caption_lines_take_data_urls(tmp_path: Path) -> None:
    line = json.dumps({"image": data_url(image()), "caption": " two shapes "})
    data = parse_training_file(write(tmp_path, line))
    assert data.format == "jsonl" and data.examples[0].caption == "two shapes"
    path_line = json.dumps({"image": "a.png", "caption": "x"})
    error = refused(write(tmp_path, path_line, "p.jsonl"))
    assert "line 1: 'image' is a path" in str(error) and "zip" in str(error)


def test_every_bad_line_is_named_with_its_reason(tmp_path: Path) -> None:
    good = chat_line(image(), "ok")
    two_images = json.loads(good)
    two_images["messages"][0]["content"] *= 2
    lines = [
        good,
        "[1, 2]",
        json.dumps({"messages": [{"role": "assistant", "content": "x"}]}),
        json.dumps(two_images),
        json.dumps({"messages": [{"role": "tool", "content": "x"}]}),
        chat_line(image(), "   "),
        json.dumps({"image": "data:image/png;base64,@@@", "caption": "x"}),
        json.dumps({"caption": "x"}),
    ]
    error = refused(write(tmp_path, "\n".join(lines)))
    reasons = {p.where: p.reason for p in error.problems}
    assert error.total == 7 and "line 1" not in reasons
    assert "expected a JSON object" in reasons["line 2"]
    assert "holds 0 images" in reasons["line 3"]
    assert "holds 2 images" in reasons["line 4"]
    assert "role 'tool'" in reasons["line 5"]
    assert reasons["line 6"] == "the caption is empty"
    assert "not valid base64" in reasons["line 7"]
    assert "missing 'image'" in reasons["line 8"]
    assert str(error).startswith("7 invalid examples: line 2: ")


def test_the_message_lists_the_first_lines_and_counts_the_rest(tmp_path: Path) -> None:
    error = refused(write(tmp_path, "\n".join(["{"] * 25)))
    assert error.total == 25 and len(error.problems) == MAX_LISTED
    assert str(error).endswith(f"and {25 - MAX_LISTED} more")


def test_images_are_checked_against_the_image_limits(tmp_path: Path) -> None:
    big = chat_line(image(size=64), "big")
    limits = DataLimits(max_image_side=32)
    assert "largest side allowed is 32" in str(refused(write(tmp_path, big), limits))
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="BMP")
    bmp_only = DataLimits(formats=frozenset({"PNG"}))
    line = chat_line(buffer.getvalue(), "bmp")
    assert "image format BMP is not accepted" in str(
        refused(write(tmp_path, line, "b.jsonl"), bmp_only)
    )
    truncated = chat_line(image(size=64)[:60], "cut")
    assert "line 1: not a readable image" in str(refused(write(tmp_path, truncated, "t.jsonl")))


def test_the_example_limit(tmp_path: Path) -> None:
    lines = [chat_line(image(), "x")] * 4
    error = refused(write(tmp_path, "\n".join(lines)), DataLimits(max_examples=3))
    assert "more than 3 examples (files_max_examples)" in str(error)


def test_a_coco_zip_and_a_jsonl_zip(tmp_path: Path) -> None:
    pairs = [(image("red"), "red"), (image("blue"), "blue")]
    data = parse_training_file(write(tmp_path, coco_zip(pairs), "c.zip"))
    assert data.format == "zip_coco" and [e.caption for e in data.examples] == ["red", "blue"]
    assert data.image_bytes(data.examples[0].image) == pairs[0][0]
    data.close()

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("set/pics/a.png", image())
        archive.writestr("set/train.jsonl", json.dumps({"image": "pics/a.png", "caption": "a"}))
    data = parse_training_file(write(tmp_path, buffer.getvalue(), "j.zip"))
    assert data.format == "zip_jsonl" and data.examples[0].caption == "a"
    data.close()


def test_zips_that_escape_lack_images_or_captions_are_refused(tmp_path: Path) -> None:
    def zipped(files: dict[str, bytes | str]) -> Path:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            for name, content in files.items():
                archive.writestr(name, content)
        return write(tmp_path, buffer.getvalue(), f"{len(list(tmp_path.iterdir()))}.zip")

    lines = "\n".join(
        json.dumps({"image": name, "caption": "x"})
        for name in ("../a.png", "/etc/passwd", "gone.png")
    )
    error = refused(zipped({"t.jsonl": lines, "a.png": image()}))
    reasons = [p.reason for p in error.problems]
    assert "leaves the archive" in reasons[0] and "relative path" in reasons[1]
    assert reasons[2] == "the zip has no image 'gone.png'"
    assert "exactly one caption file" in str(refused(zipped({"a.json": "{}", "b.jsonl": ""})))
    assert "exactly one caption file" in str(refused(zipped({"a.png": image()})))
    coco = json.dumps(
        {
            "images": [{"id": 1, "file_name": "a.png"}],
            "annotations": [{"image_id": 2, "caption": "x"}],
        }
    )
    assert "image_id 2 is not in 'images'" in str(
        refused(zipped({"c.json": coco, "a.png": image()}))
    )
    bomb = DataLimits(max_unzipped_bytes=100)
    assert "unpacks to" in str(refused(zipped({"c.json": coco, "a.png": image()}), bomb))


def test_a_whole_coco_json_says_to_zip_it(tmp_path: Path) -> None:
    document = json.dumps({"images": [], "annotations": []}, indent=2)
    assert "upload it as a zip" in str(refused(write(tmp_path, document, "c.json")))
    assert "the file is empty" in str(refused(write(tmp_path, "\n\n", "e.jsonl")))
