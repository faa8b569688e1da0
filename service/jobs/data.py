"""Training files: what a fine-tuning upload may hold, checked line by line.

Three shapes are accepted (docs/API.md, "Training files"); each example is one image and its
caption:

- **OpenAI's vision fine-tuning JSONL**: one chat per line, a `user` message holding one
  `image_url` part (a `data:` URL) and one `assistant` message whose content is the caption.
  `system` messages and `text` parts of the user message are accepted and ignored (captioning
  adapters take no prompt), with a warning.
- **Our JSONL with inline images**: `{"image": "data:image/png;base64,...", "caption": "..."}`
  per line (the `ctxpeft train` JSONL, with the image as a data URL instead of a path).
- **A zip** holding one COCO captions JSON or one `{"image", "caption"}` JSONL (exactly what
  `ctxpeft train` reads) and the images it names, resolved as `ctxpeft train` resolves them:
  relative to the caption file's folder, else its `images/` sub-folder.

`parse_training_file` reads the file once, streaming (a JSONL line at a time, zip members on
demand), and either returns the examples or raises `TrainingFileError` naming the first
`MAX_LISTED` bad lines (line number and reason) and how many there are in all. Images are
checked by their header (format by content, width and height within the service's image
limits) and Pillow's `verify`, not decoded: decoding every image of a large upload would take
the serving process's CPU; the training process decodes them and fails the job naming the line
if one still does not decode.

Zips are read without extracting anything to disk; member names are normalised and may not
leave the archive (`..`, absolute paths), and the uncompressed size and member count are
bounded before anything is read (zip bombs).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import posixpath
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

from PIL import Image, UnidentifiedImageError

MAX_LISTED = 10  # bad lines named in an error message
MAX_CAPTION_CHARS = 2000
ZIP_MAGIC = b"PK\x03\x04"

Format = Literal["openai_chat", "jsonl", "zip_coco", "zip_jsonl"]


@dataclass(frozen=True)
class DataLimits:
    """What an upload may hold (from the service settings)."""

    max_examples: int = 50_000
    max_image_pixels: int = 16_000_000
    max_image_side: int = 8192
    formats: frozenset[str] = frozenset({"PNG", "JPEG", "WEBP", "BMP", "GIF"})
    max_unzipped_bytes: int = 1 << 30
    max_zip_members: int = 100_000


@dataclass(frozen=True)
class Problem:
    where: str  # "line 3", "captions.json annotations[4]"
    reason: str

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


class TrainingFileError(ValueError):
    """The file cannot be trained on. `problems` are the first MAX_LISTED; `total` counts all
    of them; the message lists them."""

    def __init__(
        self, problems: list[Problem], total: int | None = None, summary: str = ""
    ) -> None:
        self.problems = problems[:MAX_LISTED]
        self.total = len(problems) if total is None else total
        if summary:
            message = summary
        else:
            listed = "; ".join(str(p) for p in self.problems)
            more = self.total - len(self.problems)
            tail = f"; and {more} more" if more > 0 else ""
            plural = "s" if self.total != 1 else ""
            message = f"{self.total} invalid example{plural}: {listed}{tail}"
        super().__init__(message)


@dataclass(frozen=True)
class Example:
    """One training pair. `image` is the image's key in `TrainingData.images`."""

    image: str
    caption: str
    where: str


@dataclass
class TrainingData:
    """A parsed training file: examples, their distinct images (by content), warnings."""

    format: Format
    examples: list[Example] = field(default_factory=list)
    # image key -> the bytes (inline images) or the zip member name (zip uploads)
    images: dict[str, bytes | str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    archive: zipfile.ZipFile | None = None  # the zip (open), for member images

    def image_bytes(self, key: str) -> bytes:
        source = self.images[key]
        if isinstance(source, bytes):
            return source
        assert self.archive is not None
        return self.archive.read(source)

    def close(self) -> None:
        if self.archive is not None:
            self.archive.close()

    def grouped(self) -> list[tuple[str, list[str]]]:
        """(image key, its captions) per distinct image, in first-seen order."""
        by_image: dict[str, list[str]] = {}
        for example in self.examples:
            by_image.setdefault(example.image, []).append(example.caption)
        return list(by_image.items())

    def tokens(self, count: Callable[[str], int]) -> int:
        """Caption tokens + 1 (the end token) summed over the examples: what one epoch trains
        on (the loss is computed on exactly these positions)."""
        return sum(count(e.caption) + 1 for e in self.examples)


# --- entry point ------------------------------------------------------------------------------
def parse_training_file(path: Path, limits: DataLimits = DataLimits()) -> TrainingData:
    """Parse and check an uploaded training file; raises TrainingFileError. A zip's data
    keeps the archive open for `image_bytes`: `close()` it when done."""
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic == ZIP_MAGIC:
        return _parse_zip(path, limits)
    with open(path, "rb") as handle:
        return _parse_jsonl(handle, limits, None, "")


# --- JSONL (inline images, or paths inside a zip) ----------------------------------------------
class _Collector:
    def __init__(self, data: TrainingData, limits: DataLimits) -> None:
        self.data = data
        self.limits = limits
        self.problems: list[Problem] = []
        self.total = 0
        self.prompt_lines = 0
        self.checked: dict[str, str | None] = {}  # image key -> problem (None: fine)

    def fail(self, where: str, reason: str) -> None:
        self.total += 1
        if len(self.problems) < MAX_LISTED:
            self.problems.append(Problem(where, reason))

    def add(self, where: str, image: bytes | str, caption: str) -> None:
        if len(self.data.examples) >= self.limits.max_examples:
            raise TrainingFileError(
                [],
                summary=f"more than {self.limits.max_examples} examples (files_max_examples): "
                "split the file, or ask the operator to raise the limit",
            )
        key = _image_key(image)
        if key not in self.checked:
            raw = image if isinstance(image, bytes) else self._member(image)
            self.checked[key] = None if raw is None else check_image(raw, self.limits)
            if raw is None:
                self.checked[key] = f"the zip has no image {image!r}"
        problem = self.checked[key]
        if problem is not None:
            self.fail(where, problem)
            return
        self.data.images.setdefault(key, image)
        self.data.examples.append(Example(key, caption, where))

    def _member(self, name: str) -> bytes | None:
        assert self.data.archive is not None
        try:
            return self.data.archive.read(name)
        except KeyError:
            return None

    def finish(self) -> TrainingData:
        if self.total:
            raise TrainingFileError(self.problems, self.total)
        if not self.data.examples:
            raise TrainingFileError([], summary="the file holds no example")
        if self.prompt_lines:
            self.data.warnings.append(
                f"{self.prompt_lines} examples have a prompt (system message or user text): "
                "ignored, captioning adapters take the image alone; at inference send the image "
                "without text"
            )
        return self.data


def _parse_jsonl(
    handle: IO[bytes], limits: DataLimits, data: TrainingData | None, prefix: str
) -> TrainingData:
    """Lines of OpenAI chat examples or {"image", "caption"} objects. With `data` (a zip's
    JSONL), images are member paths relative to `prefix`."""
    collector: _Collector | None = (
        _Collector(data, limits) if data is not None else None
    )  # the format is known from the first example when not in a zip
    for number, raw in enumerate(handle, start=1):
        where = f"line {number}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            collector = collector or _Collector(TrainingData("jsonl"), limits)
            collector.fail(where, "not UTF-8 text")
            continue
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as error:
            if number == 1 and collector is None and line.lstrip().startswith("{"):
                _refuse_whole_json(handle, raw)
            collector = collector or _Collector(TrainingData("jsonl"), limits)
            collector.fail(where, f"not valid JSON ({error.msg} at column {error.colno})")
            continue
        if not isinstance(item, dict):
            collector = collector or _Collector(TrainingData("jsonl"), limits)
            collector.fail(where, f"expected a JSON object, got {type(item).__name__}")
            continue
        kind: Format = "openai_chat" if "messages" in item else "jsonl"
        if collector is None:
            collector = _Collector(TrainingData(kind), limits)
        elif data is None and not collector.data.examples:
            collector.data.format = kind  # the first lines were bad: the first good one says
        if "messages" in item and data is None:
            parsed: tuple[bytes | str, str] | str = _chat_example(item, collector)
        elif "messages" in item:
            collector.fail(where, "chat examples are read from a .jsonl upload, not from a zip")
            continue
        else:
            parsed = _caption_example(item, data is not None, prefix)
        if isinstance(parsed, str):
            collector.fail(where, parsed)
            continue
        image, caption = parsed
        collector.add(where, image, caption)
    if collector is None:
        raise TrainingFileError([], summary="the file is empty")
    return collector.finish()


def _refuse_whole_json(handle: IO[bytes], first: bytes) -> None:
    """A file whose first line is an unfinished object: a pretty-printed JSON document (a COCO
    captions file, say) rather than JSONL. Say what to upload instead."""
    position = handle.tell()
    rest = handle.read()
    try:
        document = json.loads(first + rest)
    except (json.JSONDecodeError, UnicodeDecodeError):
        handle.seek(position)  # JSONL after all, with a bad first line: go on reading it
        return
    if isinstance(document, dict) and "annotations" in document:
        raise TrainingFileError(
            [],
            summary="this is a COCO captions JSON: upload it as a zip together with its images "
            "(the images are resolved inside the zip), or as JSONL with one example per line",
        )
    raise TrainingFileError(
        [], summary="this is one JSON document, not JSONL: write one example per line"
    )


def _caption_example(
    item: dict[str, Any], in_zip: bool, prefix: str
) -> tuple[bytes | str, str] | str:
    missing = [k for k in ("image", "caption") if k not in item]
    if missing:
        return (
            f"missing {' and '.join(repr(m) for m in missing)}: an example is "
            '{"image": ..., "caption": ...} or an OpenAI chat with "messages"'
        )
    caption = _caption(item["caption"])
    if isinstance(caption, tuple):
        return caption[0]
    image = item["image"]
    if not isinstance(image, str) or not image.strip():
        return "'image' must be a non-empty string"
    if image.startswith("data:"):
        decoded = data_url_bytes(image)
        return decoded if isinstance(decoded, str) else (decoded, caption)
    if not in_zip:
        return (
            "'image' is a path, and a .jsonl upload carries no files: give the image as a "
            "data: URL, or upload a zip holding this JSONL and its images"
        )
    member = _member_name(prefix, image)
    return member if isinstance(member, _BadPath) else (member, caption)


def _caption(value: Any) -> str | tuple[str]:
    """The stripped caption, or (reason,) when unusable."""
    if not isinstance(value, str) or not value.strip():
        return ("the caption is empty",)
    if len(value) > MAX_CAPTION_CHARS:
        return (f"the caption is longer than {MAX_CAPTION_CHARS} characters",)
    return value.strip()


def _chat_example(item: dict[str, Any], collector: _Collector) -> tuple[bytes, str] | str:
    messages = item["messages"]
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty list"
    images: list[str] = []
    captions: list[Any] = []
    prompt = False
    for index, message in enumerate(messages):
        at = f"messages[{index}]"
        if not isinstance(message, dict) or "role" not in message:
            return f"{at} must be an object with a 'role'"
        role, content = message["role"], message.get("content")
        if role in ("system", "developer"):
            prompt = True
            continue
        if role == "assistant":
            captions.append(_assistant_text(content))
            continue
        if role != "user":
            return f"{at} has role {role!r}; an example has user and assistant messages only"
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts, list):
            return f"{at}.content must be a string or a list of parts"
        for number, part in enumerate(parts):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "image_url":
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else None
                if not isinstance(url, str):
                    return f"{at}.content[{number}].image_url.url is missing"
                images.append(url)
            elif kind == "text":
                prompt = prompt or bool(str(part.get("text") or "").strip())
            else:
                return f"{at}.content[{number}] has type {kind!r}; use image_url or text parts"
    if len(images) != 1:
        return f"the user message holds {len(images)} images; an example has exactly one"
    if len(captions) != 1:
        return f"{len(captions)} assistant messages; an example has exactly one (the caption)"
    caption = captions[0]
    if isinstance(caption, tuple):
        return caption[0]
    decoded = data_url_bytes(images[0])
    if isinstance(decoded, str):
        return decoded
    if prompt:
        collector.prompt_lines += 1
    return decoded, caption


def _assistant_text(content: Any) -> str | tuple[str]:
    if isinstance(content, list):
        texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if len(texts) != len(content):
            return ("the assistant message must hold text only",)
        content = "".join(t for t in texts if isinstance(t, str))
    return _caption(content)


def data_url_bytes(url: str) -> bytes | str:
    """The bytes of a base64 data: URL, or the reason it is not one."""
    scheme = url.split(":", 1)[0].strip().lower() if ":" in url else ""
    if scheme in ("http", "https"):
        return "remote image URLs are not fetched: give the image as a data: URL"
    header, comma, payload = url.partition(",")
    if scheme != "data" or not comma:
        return "the image must be a data: URL (data:image/png;base64,...)"
    if "base64" not in [p.strip().lower() for p in header.split(";")[1:]]:
        return "the image data: URL must be base64 (data:image/png;base64,...)"
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        return "the image data: URL's payload is not valid base64"


def check_image(raw: bytes, limits: DataLimits) -> str | None:
    """None when `raw` is an image of an accepted format within the limits (header and
    Pillow's structural check; not decoded), else why not."""
    try:
        with Image.open(io.BytesIO(raw)) as image:
            fmt, (width, height) = image.format or "?", image.size
            if fmt not in limits.formats:
                return f"image format {fmt} is not accepted (allowed: {sorted(limits.formats)})"
            if max(width, height) > limits.max_image_side:
                return f"the image is {width}x{height}; the largest side allowed is {limits.max_image_side}"
            if width * height > limits.max_image_pixels:
                return f"the image has {width * height} pixels; at most {limits.max_image_pixels}"
            image.verify()
    except UnidentifiedImageError:
        return f"not an image of a known format ({', '.join(sorted(limits.formats))})"
    except Exception as error:  # untrusted bytes: Pillow's decoders raise many kinds
        return f"not a readable image ({type(error).__name__}: {error})"
    return None


def _image_key(image: bytes | str) -> str:
    if isinstance(image, bytes):
        return hashlib.sha256(image).hexdigest()
    return f"zip:{image}"


class _BadPath(str):
    """Why an image path cannot name a zip member."""


def _member_name(prefix: str, name: str) -> str:
    """The zip member `name` names relative to `prefix`, or a `_BadPath` saying why it cannot
    (it leaves the archive)."""
    if name.startswith("/") or "\\" in name:
        return _BadPath(f"invalid image path {name!r}: use a relative path with '/'")
    joined = posixpath.normpath(posixpath.join(prefix, name))
    if joined.startswith("../") or joined == "..":
        return _BadPath(f"invalid image path {name!r}: it leaves the archive")
    return joined


# --- zip ---------------------------------------------------------------------------------------
def _parse_zip(path: Path, limits: DataLimits) -> TrainingData:
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as error:
        raise TrainingFileError([], summary=f"not a readable zip ({error})") from None
    try:
        return _read_zip(archive, limits)
    except TrainingFileError:
        archive.close()
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, RuntimeError,
            EOFError, OSError, ValueError, zlib.error) as error:  # fmt: skip
        # A damaged member, an unsupported compression or an encrypted entry.
        archive.close()
        raise TrainingFileError([], summary=f"the zip cannot be read ({error})") from None
    except BaseException:
        archive.close()
        raise


def _read_zip(archive: zipfile.ZipFile, limits: DataLimits) -> TrainingData:
    infos = archive.infolist()
    if len(infos) > limits.max_zip_members:
        raise TrainingFileError(
            [], summary=f"the zip holds {len(infos)} entries; at most {limits.max_zip_members}"
        )
    unzipped = sum(info.file_size for info in infos)
    if unzipped > limits.max_unzipped_bytes:
        raise TrainingFileError(
            [],
            summary=f"the zip unpacks to {unzipped} bytes; at most {limits.max_unzipped_bytes}",
        )
    members = {info.filename for info in infos if not info.is_dir()}
    candidates = sorted(
        name
        for name in members
        if name.lower().endswith((".json", ".jsonl"))
        and not name.startswith("__MACOSX/")
        and not posixpath.basename(name).startswith(".")
    )
    if len(candidates) != 1:
        found = ", ".join(candidates) or "none"
        raise TrainingFileError(
            [],
            summary="a zip must hold exactly one caption file (a COCO captions .json or a "
            f".jsonl of image and caption) beside its images; found {found}",
        )
    caption_file = candidates[0]
    prefix = posixpath.dirname(caption_file)
    data = TrainingData("zip_jsonl" if caption_file.lower().endswith(".jsonl") else "zip_coco")
    data.archive = archive
    with archive.open(caption_file) as handle:
        if data.format == "zip_jsonl":
            parsed = _parse_jsonl(handle, limits, data, prefix)
        else:
            parsed = _parse_coco(handle.read(), caption_file, prefix, members, limits, data)
    return parsed


def _parse_coco(
    raw: bytes, name: str, prefix: str, members: set[str], limits: DataLimits, data: TrainingData
) -> TrainingData:
    try:
        document = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise TrainingFileError([], summary=f"{name} is not valid JSON ({error})") from None
    if not (
        isinstance(document, dict)
        and isinstance(document.get("images"), list)
        and isinstance(document.get("annotations"), list)
    ):
        raise TrainingFileError(
            [],
            summary=f"{name} is not a COCO captions file (an object with 'images' and "
            "'annotations' lists)",
        )
    collector = _Collector(data, limits)
    files: dict[Any, str] = {}
    for number, entry in enumerate(document["images"]):
        where = f"{name} images[{number}]"
        if not isinstance(entry, dict) or "id" not in entry or "file_name" not in entry:
            collector.fail(where, "an image entry needs 'id' and 'file_name'")
            continue
        member = _member_name(prefix, str(entry["file_name"]))
        if isinstance(member, _BadPath):
            collector.fail(where, member)
            continue
        if member not in members:  # ctxpeft train also looks in images/ beside the JSON
            alternative = _member_name(prefix, posixpath.join("images", str(entry["file_name"])))
            member = alternative if alternative in members else member
        files[entry["id"]] = member
    for number, note in enumerate(document["annotations"]):
        where = f"{name} annotations[{number}]"
        if not isinstance(note, dict) or "image_id" not in note or "caption" not in note:
            collector.fail(where, "an annotation needs 'image_id' and 'caption'")
            continue
        if note["image_id"] not in files:
            collector.fail(where, f"image_id {note['image_id']!r} is not in 'images'")
            continue
        caption = _caption(note["caption"])
        if isinstance(caption, tuple):
            collector.fail(where, caption[0])
            continue
        collector.add(where, files[note["image_id"]], caption)
    return collector.finish()
