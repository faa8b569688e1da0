"""Tests for adapters.data.captions: COCO and JSONL loading, and every bad-data case."""

import json
from pathlib import Path

import pytest
from PIL import Image

from adapters.data.captions import (
    CORRUPT_IMAGE,
    EMPTY_CAPTION,
    MALFORMED_JSON,
    MISSING_IMAGE,
    MISSING_KEYS,
    UNKNOWN_IMAGE_ID,
    CaptionDataError,
    CaptionImageDataset,
    load_caption_records,
)
from adapters.data.synthetic import SyntheticCaptions, write_coco, write_jsonl


@pytest.fixture
def synthetic() -> SyntheticCaptions:
    return SyntheticCaptions("describe", "val", size=5)


def _png(path: Path, colour: tuple[int, int, int] = (10, 20, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)
    return path


def _jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_jsonl_round_trip(tmp_path: Path, synthetic: SyntheticCaptions) -> None:
    report = load_caption_records(write_jsonl(synthetic, tmp_path))
    assert report.skipped == [] and len(report.records) == 5
    assert report.records[2].image == tmp_path / "images" / "000002.png"
    assert report.summary() == "loaded 5 records from captions.jsonl"
    dataset = CaptionImageDataset(report.records)
    image, text = dataset[2]
    assert text == synthetic[2][1] and image.mode == "RGB"
    assert image.tobytes() == synthetic[2][0].tobytes()


def test_coco_round_trip_finds_sibling_images(tmp_path: Path, synthetic: SyntheticCaptions) -> None:
    path = write_coco(synthetic, tmp_path)  # file_name "000000.png", files under images/
    report = load_caption_records(path)
    assert [r.caption for r in report.records] == [synthetic[i][1] for i in range(5)]
    assert report.records[0].image == tmp_path / "images" / "000000.png"


def test_coco_several_captions_and_image_root(tmp_path: Path) -> None:
    _png(tmp_path / "pics" / "x.png")
    coco = {
        "images": [{"id": 7, "file_name": "x.png"}, {"file_name": "y.png"}],
        "annotations": [
            {"id": 1, "image_id": 7, "caption": "  a cat  "},
            {"id": 2, "image_id": 7, "caption": "a small cat"},
            {"id": 3, "image_id": 8, "caption": "orphan"},
            {"id": 4, "caption": "no image id"},
        ],
    }
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(coco))
    report = load_caption_records(path, image_root=tmp_path / "pics")
    assert [r.caption for r in report.records] == ["a cat", "a small cat"]
    assert [(s.reason, s.item) for s in report.skipped] == [
        (MISSING_KEYS, "images[1]"),
        (UNKNOWN_IMAGE_ID, "annotations[2]"),
        (MISSING_KEYS, "annotations[3]"),
    ]
    with pytest.raises(CaptionDataError, match="no usable records"):
        load_caption_records(path)  # x.png is not beside ann.json nor in images/


def test_bad_items_are_skipped_and_reported(tmp_path: Path) -> None:
    _png(tmp_path / "good.png")
    (tmp_path / "garbage.png").write_bytes(b"not an image at all")
    full = (tmp_path / "good.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(full[: len(full) // 2])
    path = _jsonl(
        tmp_path / "data.jsonl",
        [
            json.dumps({"image": "good.png", "caption": "a good one"}),
            json.dumps({"image": "missing.png", "caption": "x"}),
            json.dumps({"image": "garbage.png", "caption": "x"}),
            json.dumps({"image": "truncated.png", "caption": "x"}),
            json.dumps({"image": "good.png", "caption": "   "}),
            '{"image": "good.png", "caption": ',
            json.dumps({"image": "good.png"}),
            "",
            json.dumps({"image": "good.png", "caption": "again"}),
        ],
    )
    report = load_caption_records(path)
    assert [r.caption for r in report.records] == ["a good one", "again"]
    got = [(s.reason, s.item) for s in report.skipped]
    assert got == [
        (MISSING_IMAGE, "missing.png"),
        (CORRUPT_IMAGE, "garbage.png"),
        (CORRUPT_IMAGE, "truncated.png"),
        (EMPTY_CAPTION, "line 5"),
        (MALFORMED_JSON, "line 6"),
        (MISSING_KEYS, "line 7"),
    ]
    assert report.skipped_counts() == {
        MISSING_IMAGE: 1,
        CORRUPT_IMAGE: 2,
        EMPTY_CAPTION: 1,
        MALFORMED_JSON: 1,
        MISSING_KEYS: 1,
    }
    assert "truncated" in report.skipped[2].detail
    assert report.summary() == (
        "loaded 2 records from data.jsonl; skipped 6: 1 missing image (missing.png), "
        "2 corrupt image (garbage.png, truncated.png), 1 empty caption (line 5), "
        "1 malformed JSON (line 6), 1 missing keys (line 7)"
    )


def test_summary_lists_only_the_first_few(tmp_path: Path) -> None:
    _png(tmp_path / "ok.png")
    lines = [json.dumps({"image": f"m{i}.png", "caption": "x"}) for i in range(5)]
    lines.append(json.dumps({"image": "ok.png", "caption": "fine"}))
    report = load_caption_records(_jsonl(tmp_path / "d.jsonl", lines))
    assert "5 missing image (m0.png, m1.png, m2.png, ... 2 more)" in report.summary()


def test_unverified_load_trusts_files(tmp_path: Path) -> None:
    (tmp_path / "garbage.png").write_bytes(b"nope")
    path = _jsonl(tmp_path / "d.jsonl", [json.dumps({"image": "garbage.png", "caption": "x"})])
    assert len(load_caption_records(path, verify_images=False).records) == 1


def test_jsonl_named_json_and_single_line(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    one = json.dumps({"image": "a.png", "caption": "one"})
    assert len(load_caption_records(_jsonl(tmp_path / "one.json", [one])).records) == 1
    assert len(load_caption_records(_jsonl(tmp_path / "two.json", [one, one])).records) == 2


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("absent.json", None, "absent.json: file not found"),
        ("text.json", "hello world", "text.json: not valid JSON"),
        ("list.json", "[1, 2]", "list.json: JSON list is neither a COCO"),
        ("dict.json", '{"foo": 1}', "with keys \\['foo'\\] is neither a COCO"),
        ("coco.json", '{"images": [], "annotations": []}', "coco.json: no usable records"),
        ("bad.jsonl", "not json\n{also not\n", "bad.jsonl: no usable records.*2 malformed JSON"),
        ("empty.jsonl", "", "empty.jsonl: no usable records"),
    ],
)
def test_whole_file_errors(tmp_path: Path, name: str, content: str | None, message: str) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(CaptionDataError, match=message):
        load_caption_records(path)


def test_folder_and_binary_file_errors(tmp_path: Path) -> None:
    with pytest.raises(CaptionDataError, match="is a folder"):
        load_caption_records(tmp_path)
    (tmp_path / "b.jsonl").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(CaptionDataError, match="UTF-8"):
        load_caption_records(tmp_path / "b.jsonl")
    assert issubclass(CaptionDataError, ValueError)
