"""Upload checks: format by content, size limits before decoding, decode errors, RGB output."""

from __future__ import annotations

import hashlib
import io
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from typing import Annotated

import httpx
import pytest
from fastapi import FastAPI, File, UploadFile
from PIL import Image, ImageFile

from benchmarks.live_server import live_server
from service.api.errors import install_error_handlers, to_api_error
from service.exceptions import ImageError
from service.images import DecodedImage, ImageLimits, decode_image, sniff_format
from service.settings import Settings


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def sample(size: tuple[int, int] = (48, 32), mode: str = "RGB") -> Image.Image:
    # Noise-free but not flat: two coloured halves, so lossy formats keep the colours.
    image = Image.new(mode, size, (200, 30, 30) if mode == "RGB" else 128)
    image.paste((30, 30, 200) if mode == "RGB" else 20, (size[0] // 2, 0, size[0], size[1]))
    return image


def noisy_png(size: tuple[int, int] = (64, 64)) -> bytes:
    return encode(
        Image.frombytes("RGB", size, bytes(range(256)) * (size[0] * size[1] * 3 // 256)), "PNG"
    )


def png_bomb(width: int, height: int, bit_depth: int, color_type: int, row_bytes: int) -> bytes:
    """A valid PNG of all-zero pixels: tiny on disk, huge once decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    compressor = zlib.compressobj(9)
    row = b"\x00" * (1 + row_bytes)  # filter byte + pixels
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def bomb_20k() -> bytes:
    data = png_bomb(20000, 20000, bit_depth=1, color_type=0, row_bytes=2500)
    assert len(data) < 100_000  # 400 megapixels in under 100 kB
    return data


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records every pixel decode (ImageFile.load) during the test."""
    calls: list[str] = []
    original = ImageFile.ImageFile.load

    def spy(self: ImageFile.ImageFile) -> object:
        calls.append(f"{self.format} {self.size}")
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    return calls


def expect_error(
    data: bytes, status: int, error_type: str, limits: ImageLimits | None = None
) -> str:
    """`data` is refused with a typed image error that answers `status` / `error_type`."""
    with pytest.raises(ImageError) as info:
        decode_image(data, limits)
    answer = to_api_error(info.value)
    assert (answer.status, answer.type) == (status, error_type)
    return info.value.message


# --- accepted formats ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "params"),
    [
        ("PNG", {}),
        ("JPEG", {"quality": 95}),
        ("WEBP", {"lossless": True}),
        ("BMP", {}),
        ("GIF", {}),
    ],
)
def test_real_images_decode_to_rgb(fmt: str, params: dict[str, object]) -> None:
    data = encode(sample(), fmt, **params)
    image = decode_image(data)
    assert isinstance(image, DecodedImage)
    assert (image.format, image.width, image.height) == (fmt, 48, 32)
    assert image.rgb.mode == "RGB" and image.rgb.size == (48, 32)
    assert image.sha256 == hashlib.sha256(data).hexdigest()
    left, right = image.rgb.getpixel((5, 16)), image.rgb.getpixel((40, 16))
    assert isinstance(left, tuple) and isinstance(right, tuple)
    assert left[0] > 150 and left[2] < 80  # red half stays red
    assert right[2] > 150 and right[0] < 80  # blue half stays blue


def test_grayscale_and_palette_become_rgb() -> None:
    gray = decode_image(encode(sample(mode="L"), "PNG"))
    assert gray.rgb.mode == "RGB" and gray.rgb.getpixel((0, 0)) == (128, 128, 128)
    palette = decode_image(encode(sample().convert("P", palette=Image.Palette.ADAPTIVE), "PNG"))
    assert palette.rgb.getpixel((0, 0)) == (200, 30, 30)


def test_transparency_is_flattened_onto_white() -> None:
    image = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    image.putpixel((1, 1), (10, 20, 30, 255))
    decoded = decode_image(encode(image, "PNG"))
    assert decoded.rgb.getpixel((0, 0)) == (255, 255, 255)
    assert decoded.rgb.getpixel((1, 1)) == (10, 20, 30)


def test_exif_orientation_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    data = encode(sample((40, 20)), "JPEG", exif=exif.tobytes())
    decoded = decode_image(data)
    assert (decoded.width, decoded.height) == (20, 40)


def test_sha256_depends_on_bytes_only() -> None:
    data = encode(sample(), "PNG")
    assert decode_image(data).sha256 == decode_image(bytes(data)).sha256
    assert decode_image(data).sha256 != decode_image(encode(sample((48, 33)), "PNG")).sha256


# --- format by content --------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"hello, this is text",
        b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n",
        b"<svg xmlns='http://www.w3.org/2000/svg'/>",
        b"BM-but-not-a-bitmap-at-all",
        b"RIFF\x00\x00\x00\x00WAVEfmt ",
        b"II*\x00\x08\x00\x00\x00",  # TIFF: a real image format, but not accepted
    ],
)
def test_non_images_are_415(data: bytes) -> None:
    message = expect_error(data, 415, "unsupported_media_type")
    assert "PNG, JPEG, WEBP, BMP, GIF" in message


def test_format_outside_the_allowed_set_is_415() -> None:
    limits = ImageLimits(formats=frozenset({"PNG"}))
    assert decode_image(encode(sample(), "PNG"), limits).format == "PNG"
    message = expect_error(encode(sample(), "GIF"), 415, "unsupported_media_type", limits)
    assert message.endswith("(PNG)")


def test_sniff_format() -> None:
    assert sniff_format(encode(sample(), "WEBP")) == "WEBP"
    assert sniff_format(encode(sample(), "BMP")) == "BMP"
    assert sniff_format(b"\xff\xd8\xff\xe0") == "JPEG"
    assert sniff_format(b"GIF89a") == "GIF"
    assert sniff_format(b"") is None


# --- broken images ------------------------------------------------------------------------


def test_empty_upload_is_400() -> None:
    expect_error(b"", 400, "invalid_image")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_image_is_400(fmt: str) -> None:
    data = noisy_png() if fmt == "PNG" else encode(Image.open(io.BytesIO(noisy_png())), "JPEG")
    message = expect_error(data[: len(data) // 2], 400, "invalid_image")
    assert "truncated or corrupt" in message


def test_magic_bytes_followed_by_garbage_is_400() -> None:
    message = expect_error(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 8, 400, "invalid_image")
    assert message == "the PNG image is unreadable"


# --- size limits, checked before decoding -------------------------------------------------


def test_decompression_bomb_is_413_without_decoding(bomb_20k: bytes, loads: list[str]) -> None:
    message = expect_error(bomb_20k, 413, "image_too_large")
    assert "20000x20000" in message or "decompression bomb" in message
    assert loads == []


def test_limits_hold_with_pillows_global_guard_off(
    bomb_20k: bytes, loads: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    message = expect_error(bomb_20k, 413, "image_too_large")
    assert "max_image_side" in message
    limits = ImageLimits(max_pixels=1_000_000, max_side=100_000)
    message = expect_error(bomb_20k, 413, "image_too_large", limits)
    assert "400000000 pixels" in message and "max_image_pixels" in message
    assert loads == []


def test_header_over_max_pixels_is_413_before_load(loads: list[str]) -> None:
    # 6000x6000 RGB: 108 MB of pixels once decoded, below Pillow's own bomb threshold.
    data = png_bomb(6000, 6000, bit_depth=8, color_type=2, row_bytes=18000)
    message = expect_error(data, 413, "image_too_large")
    assert message == (
        "the image has 36000000 pixels (6000x6000); the limit is 16000000 (max_image_pixels)"
    )
    assert loads == []


def test_side_over_max_image_side_is_413(loads: list[str]) -> None:
    data = encode(Image.new("RGB", (9000, 4)), "PNG")
    message = expect_error(data, 413, "image_too_large")
    assert "9000x4" in message and "8192" in message
    limits = ImageLimits(max_pixels=100, max_side=10)
    expect_error(encode(sample((11, 2)), "PNG"), 413, "image_too_large", limits)
    assert decode_image(encode(sample((10, 10)), "PNG"), limits).width == 10
    assert set(loads) == {"PNG (10, 10)"}  # only the image within the limits was decoded


def test_limits_from_settings() -> None:
    settings = Settings(max_image_pixels=1000, max_image_side=50, allowed_image_formats=["png"])
    assert ImageLimits.from_settings(settings) == ImageLimits(1000, 50, frozenset({"PNG"}))
    settings = Settings(max_concurrent_decodes=3, image_decode_side=256)
    limits = ImageLimits.from_settings(settings)
    assert (limits.max_concurrent_decodes, limits.decode_side) == (3, 256)
    # 3 decodes of at most 8 bytes a pixel of 16 MP, plus their reduced working images.
    assert limits.decode_bound_bytes() == 3 * (8 * 16_000_000 + 16 * 512**2)


# --- decoding is reduced to what the encoder needs ------------------------------------------


def halves(size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    return sample(size, mode)


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((4000, 3000), (572, 600)),  # factors 7 x 5 (rounding up): each side stays >= 512
        ((8000, 1024), (534, 512)),  # 15 x 2
        ((600, 6000), (600, 546)),  # 1 x 10
        ((511, 300), (511, 300)),  # smaller than decode_side: untouched
    ],
)
def test_large_images_are_reduced_per_axis(
    size: tuple[int, int], expected: tuple[int, int], loads: list[str]
) -> None:
    decoded = decode_image(encode(halves(size), "PNG"), ImageLimits(max_pixels=40_000_000))
    assert (decoded.width, decoded.height) == expected
    assert all(side < 2 * 512 or side == full for side, full in zip(expected, size, strict=True))
    left = decoded.rgb.getpixel((2, decoded.height // 2))
    right = decoded.rgb.getpixel((decoded.width - 3, decoded.height // 2))
    assert left == (200, 30, 30) and right == (30, 30, 200)  # the content, not a crop
    assert set(loads) == {f"PNG {size}"}  # at full size (PNG has no DCT scaling)


def test_a_large_jpeg_is_scaled_while_it_decodes(loads: list[str]) -> None:
    data = encode(halves((4096, 3072)), "JPEG", quality=90)
    decoded = decode_image(data, ImageLimits(decode_side=512))
    assert set(loads) == {"JPEG (1024, 768)"}  # DCT scaling 1/4: 12 MP never existed
    assert (decoded.width, decoded.height) == (512, 768)  # then box-reduced 2 x 1
    red = decoded.rgb.getpixel((10, 300))
    assert isinstance(red, tuple) and red[0] > 150 and red[2] < 80


def test_exif_orientation_is_applied_after_reduction() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    data = encode(halves((4000, 1200)), "JPEG", exif=exif.tobytes())
    decoded = decode_image(data, ImageLimits(decode_side=512))
    assert (decoded.width, decoded.height) == (600, 667)  # drafted 1/2, reduced 3 x 1, rotated
    top = decoded.rgb.getpixel((300, 20))
    bottom = decoded.rgb.getpixel((300, 640))
    assert isinstance(top, tuple) and isinstance(bottom, tuple)
    assert top[0] > 150 and bottom[2] > 150  # the left (red) half is now on top


def test_alpha_and_palette_transparency_are_flattened_like_before() -> None:
    """Reduced images flatten transparency onto white exactly as full-size ones did."""
    rgba = Image.new("RGBA", (1200, 1200), (255, 0, 0, 0))
    rgba.paste((0, 0, 255, 128), (0, 0, 1200, 600))
    decoded = decode_image(encode(rgba, "PNG")).rgb
    assert decoded.size == (600, 600)
    assert decoded.getpixel((10, 10)) == (127, 127, 255)  # half-transparent blue on white
    assert decoded.getpixel((10, 500)) == (255, 255, 255)  # fully transparent red: white
    palette = Image.new("P", (1100, 1100))
    palette.putpalette([0, 0, 0, 10, 20, 30, 200, 100, 0] + [0] * 759)
    palette.paste(1, (0, 0, 1100, 550))
    palette.paste(2, (0, 550, 550, 1100))
    for alphas in (0, bytes([0, 128, 255])):
        data = encode(palette, "PNG", transparency=alphas)
        reference = Image.open(io.BytesIO(data)).convert("RGBA")
        white = Image.new("RGBA", reference.size, (255, 255, 255, 255))
        expected = Image.alpha_composite(white, reference).convert("RGB")
        got = decode_image(data).rgb
        for x, y in ((10, 10), (10, 1000), (1000, 1000)):
            assert got.getpixel((x // 2, y // 2)) == expected.getpixel((x, y))


# --- the number of decodes at once is bounded ----------------------------------------------------


def test_at_most_max_concurrent_decodes_run_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Eight threads decode at once with a limit of 3: three decode, the others wait; every
    decode finishes once they are let go. Counted, not timed."""
    import service.images as images

    release = threading.Event()
    lock = threading.Lock()
    running: list[int] = []
    peak: list[int] = [0]
    real = images._decode_reduced

    def slow(image: Image.Image, side: int) -> Image.Image:
        with lock:
            running.append(1)
            peak[0] = max(peak[0], len(running))
        release.wait(timeout=30)
        with lock:
            running.pop()
        return real(image, side)

    monkeypatch.setattr(images, "_decode_reduced", slow)
    limits = ImageLimits(max_concurrent_decodes=3)
    data = encode(sample(), "PNG")
    results: list[DecodedImage] = []
    threads = [
        threading.Thread(target=lambda: results.append(decode_image(data, limits)))
        for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30
    while len(running) < 3 and time.monotonic() < deadline:
        time.sleep(0.001)
    time.sleep(0.05)  # give a fourth decode every chance to start (it must not)
    assert (len(running), peak[0]) == (3, 3)
    release.set()
    for thread in threads:
        thread.join(timeout=30)
    assert len(results) == 8 and peak[0] == 3
    assert all(r.rgb.size == (48, 32) for r in results)


def test_a_failed_decode_gives_its_place_back() -> None:
    limits = ImageLimits(max_concurrent_decodes=1)
    data = noisy_png()
    truncated = data[: len(data) // 2]
    for _ in range(3):  # would block forever if a failure kept the only place
        expect_error(truncated, 400, "invalid_image", limits)
    assert decode_image(encode(sample(), "PNG"), limits).width == 48


# --- over HTTP: the client's content type and file name do not matter ----------------------


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/inspect")
    async def inspect(image: Annotated[UploadFile, File()]) -> dict[str, object]:
        decoded = decode_image(await image.read())
        return {"format": decoded.format, "size": [decoded.width, decoded.height]}

    with live_server(app) as url:
        yield url


def test_content_decides_not_the_declared_type(base_url: str) -> None:
    png = encode(sample(), "PNG")
    jpeg = encode(sample(), "JPEG")
    with httpx.Client(base_url=base_url) as client:
        as_text = client.post("/inspect", files={"image": ("notes.txt", png, "text/plain")})
        assert as_text.status_code == 200
        assert as_text.json() == {"format": "PNG", "size": [48, 32]}
        disguised = client.post("/inspect", files={"image": ("photo.png", jpeg, "image/png")})
        assert disguised.json()["format"] == "JPEG"
        fake = client.post("/inspect", files={"image": ("cat.png", b"<html>", "image/png")})
        assert fake.status_code == 415
        assert fake.json()["error"]["type"] == "unsupported_media_type"
        assert fake.json()["request_id"]
