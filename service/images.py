"""Checks an uploaded image by its content and decodes it to RGB, or says why not. Below the
HTTP layer: the engine calls the decoder after admission, in one process or in a Ray replica,
and its typed errors (`service.exceptions.ImageError`: 400 / 413 / 415) are mapped to HTTP
answers in one place with every other engine error.

    limits = ImageLimits.from_settings(settings)
    image = decode_image(raw_bytes, limits)   # raises InvalidImage / ImageTooLarge / UnsupportedImage
    image.rgb, image.format, image.width, image.height, image.sha256
    decoder = ImageDecoder(raw_bytes, limits, param="image")   # what a CaptionRequest carries

The client's Content-Type and file name are ignored: the format is sniffed from magic bytes.
Sizes are checked from the header before any pixel is decoded (Pillow's `Image.open` reads
only the header), with this call's limits rather than Pillow's process-wide
`Image.MAX_IMAGE_PIXELS`. CPU-bound: call it off the event loop.

Decoding memory is bounded twice over:
- at most `max_concurrent_decodes` images decode at once in the process (one gate per value
  of that limit; callers beyond it wait in `decode_image`);
  the engine's preprocessing pool (`preprocess_threads`) bounds the threads that wait;
- an image is reduced to what the encoder needs while it decodes: a JPEG by DCT scaling
  (`draft`), every format by an integer box reduction per axis (`reduce`) before any mode
  conversion or alpha flattening, so that no full-size RGB copy is ever made. Each axis keeps
  at least `decode_side` pixels (the encoder resizes to its square image_size afterwards; set
  decode_side >= that size). The decoded image is therefore under 2*decode_side per side.

Peak memory of one decode, for an image of P pixels (P <= max_image_pixels), by the mode the
decoder yields (Pillow keeps RGB in 4 bytes a pixel): RGB 4P bytes; RGBA 8P (4 decoded plus
Pillow's premultiplied copy, which reducing an alpha image needs); palette 5P (1 decoded plus
its RGB conversion: transparency is flattened onto white in the palette, not per pixel); L,
LA, 1-bit, 16-bit grey at most 4P; I, F 4P; a JPEG is scaled while it decodes. Plus the
reduced working images, at most 16 * (2 * decode_side)^2 bytes. So one decode takes at most
8 * P + 16 * (2 * decode_side)^2 bytes (measured: 64 MiB for a 16 MP RGB PNG, 124 MiB for
RGBA, 78 MiB for a palette PNG), and the process-wide bound is max_concurrent_decodes times
that (`ImageLimits.decode_bound_bytes`, docs/OPERATIONS.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import io
import threading
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from PIL import Image

from service.exceptions import ImageTooLarge, InvalidImage, UnsupportedImage
from service.settings import IMAGE_FORMATS, Settings

# The most bytes per pixel one decode holds at once (an RGBA image: decoded plus premultiplied).
BYTES_PER_PIXEL = 8


@dataclass(frozen=True)
class ImageLimits:
    max_pixels: int = 16_000_000
    max_side: int = 8192
    formats: frozenset[str] = field(default_factory=lambda: frozenset(IMAGE_FORMATS))
    max_concurrent_decodes: int = 2
    decode_side: int = 512

    @classmethod
    def from_settings(cls, settings: Settings) -> ImageLimits:
        return cls(
            max_pixels=settings.max_image_pixels,
            max_side=settings.max_image_side,
            formats=frozenset(settings.allowed_image_formats),
            max_concurrent_decodes=settings.max_concurrent_decodes,
            decode_side=settings.image_decode_side,
        )

    def decode_bound_bytes(self) -> int:
        """The most memory decoding may take at once in this process (module docstring)."""
        working = 16 * (2 * self.decode_side) ** 2
        return self.max_concurrent_decodes * (BYTES_PER_PIXEL * self.max_pixels + working)


# After decoding an image this large, freed memory is handed back to the OS (see below).
TRIM_AFTER_PIXELS = 1_000_000


def _find_malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim: Callable[[int], int] = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to do
        return None
    return trim


_MALLOC_TRIM = _find_malloc_trim()


def return_freed_memory() -> None:
    """Give the pages of freed heap memory back to the OS (glibc's malloc_trim).

    Pillow frees a decoded image, but glibc keeps large freed blocks in the arena of the
    thread that freed them, and decodes run on whichever worker thread the caller used: under
    a flood, every thread's arena would hold a decoded image's worth of dead memory (measured:
    peak RSS +753 MB for 24 maximum-size PNGs with 2 decodes at a time, against +314 MB with
    this). A no-op where the C library has no malloc_trim."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


# One gate per concurrency limit, shared by every caller in the process: decoding memory is
# the process's, and several apps with the same settings (tests) share one bound.
_GATES: dict[int, threading.BoundedSemaphore] = {}
_GATES_LOCK = threading.Lock()


def decode_gate(limit: int) -> threading.BoundedSemaphore:
    """The process-wide semaphore that admits `limit` decodes at once."""
    with _GATES_LOCK:
        gate = _GATES.get(limit)
        if gate is None:
            gate = _GATES[limit] = threading.BoundedSemaphore(limit)
        return gate


@dataclass(frozen=True)
class DecodedImage:
    rgb: Image.Image
    format: str  # one of IMAGE_FORMATS, as sniffed
    width: int
    height: int
    sha256: str  # hex digest of the uploaded bytes: the encoder-cache key


def sniff_format(data: bytes) -> str | None:
    """The image format named by the leading magic bytes, or None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    # "BM" alone is too weak a signature; also require a known DIB header size.
    if data.startswith(b"BM") and len(data) >= 18:
        dib_size = int.from_bytes(data[14:18], "little")
        if dib_size in (12, 16, 40, 52, 56, 64, 108, 124):
            return "BMP"
    return None


def decode_image(data: bytes, limits: ImageLimits | None = None) -> DecodedImage:
    """Validate and decode `data`, reduced for the encoder (see the module docstring). Waits
    while `limits.max_concurrent_decodes` other decodes run."""
    limits = limits or ImageLimits()
    if not data:
        raise InvalidImage("the image is empty")
    image_format = sniff_format(data)
    if image_format is None or image_format not in limits.formats:
        raise UnsupportedImage(
            f"the upload is not an image in an accepted format ({_formats(limits.formats)})"
        )
    try:
        # formats=[...]: only the sniffed plugin may parse it. Reads the header, no pixels.
        image = Image.open(io.BytesIO(data), formats=[image_format])
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's process-wide guard tripped first (only for sizes far above our limits
        # unless a warnings filter turns its warning into an error).
        raise _too_large(f"the image is a decompression bomb ({exc})") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidImage(f"the {image_format} image is unreadable") from exc
    with image:
        _check_size(image.width, image.height, limits)
        with decode_gate(limits.max_concurrent_decodes):
            try:
                rgb = _decode_reduced(image, limits.decode_side)
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
                raise _too_large(f"the image is a decompression bomb ({exc})") from exc
            except (OSError, SyntaxError, ValueError, EOFError) as exc:
                raise InvalidImage(f"the {image_format} image is truncated or corrupt") from exc
            finally:
                image.close()  # frees the full-size pixels before the next decode starts
                if image.width * image.height >= TRIM_AFTER_PIXELS:
                    return_freed_memory()
    return DecodedImage(
        rgb=rgb,
        format=image_format,
        width=rgb.width,
        height=rgb.height,
        sha256=hashlib.sha256(data).hexdigest(),
    )


# Modes Image.reduce cannot box-average correctly (palette indices, 1-bit, 16-bit ints): they
# are converted first, to the mode _to_rgb would have converted them through.
_REDUCIBLE_VIA = {"1": "L", "I;16": "L", "I;16L": "L", "I;16B": "L", "I;16N": "L", "PA": "RGBA"}
# EXIF orientation -> the transpose that makes the image upright (as ImageOps.exif_transpose).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def reduction(width: int, height: int, side: int) -> tuple[int, int]:
    """Integer box factors per axis that keep each axis at least `side` pixels long."""
    return max(1, width // side), max(1, height // side)


def _decode_reduced(image: Image.Image, side: int) -> Image.Image:
    """Decode `image` (header already read) to an upright RGB image whose sides are under
    2 * side where the original's were larger, without a full-size RGB copy."""
    orientation = image.getexif().get(0x0112)
    if image.format == "JPEG":  # DCT scaling while decoding: 1/2, 1/4 or 1/8 of each side
        image.draft(None, (side, side))
    image.load()
    source: Image.Image = image
    if source.mode == "P":
        source = _flatten_palette(source)
    elif source.mode in _REDUCIBLE_VIA:
        source = source.convert(_REDUCIBLE_VIA[source.mode])
    factors = reduction(source.width, source.height, side)
    small = source.reduce(factors) if factors != (1, 1) else source
    del source
    upright = small.transpose(_UPRIGHT[orientation]) if orientation in _UPRIGHT else small
    return _to_rgb(upright)


def _flatten_palette(image: Image.Image) -> Image.Image:
    """A palette image as RGB, its transparency flattened onto white by blending the palette
    entries (256 colours) instead of every pixel: no full-size RGBA copy is made."""
    transparency = image.info.get("transparency")
    palette = image.getpalette("RGB")
    if transparency is None or palette is None:
        return image.convert("RGB")
    entries = len(palette) // 3
    if isinstance(transparency, int):
        alphas = [0 if i == transparency else 255 for i in range(entries)]
    elif isinstance(transparency, bytes):
        alphas = [*transparency[:entries], *[255] * (entries - len(transparency))]
    else:  # not a palette transparency Pillow documents: the per-pixel way
        return image.convert("RGBA")
    flat = [
        (value * alphas[i // 3] + 255 * (255 - alphas[i // 3]) + 127) // 255
        for i, value in enumerate(palette[: 3 * entries])
    ]
    image.putpalette(flat, "RGB")
    del image.info["transparency"]
    return image.convert("RGB")


def _check_size(width: int, height: int, limits: ImageLimits) -> None:
    if width <= 0 or height <= 0:
        raise InvalidImage(f"the image has no pixels ({width}x{height})")
    if width > limits.max_side or height > limits.max_side:
        raise _too_large(
            f"the image is {width}x{height}; each side must be at most {limits.max_side} "
            "pixels (max_image_side)"
        )
    if width * height > limits.max_pixels:
        raise _too_large(
            f"the image has {width * height} pixels ({width}x{height}); the limit is "
            f"{limits.max_pixels} (max_image_pixels)"
        )


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB with transparency flattened onto white (always a new image)."""
    has_alpha = image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
        image.mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _too_large(message: str) -> ImageTooLarge:
    return ImageTooLarge(message)


def _formats(formats: Collection[str]) -> str:
    return ", ".join(fmt for fmt in IMAGE_FORMATS if fmt in formats)


@dataclass(frozen=True)
class ImageDecoder:
    """Checks and decodes an uploaded image (ImageError 400 / 413 / 415, with `param` naming
    the request field); the engine calls it after admission. A plain picklable object (the
    bytes, the limits, the field), so that it can travel to an engine replica of the Ray
    Serve deployment and be called there exactly as here."""

    data: bytes = field(repr=False)
    limits: ImageLimits
    param: str | None = None

    def __call__(self) -> Image.Image:
        try:
            return decode_image(self.data, self.limits).rgb
        except (InvalidImage, ImageTooLarge, UnsupportedImage) as exc:
            exc.param = exc.param or self.param
            raise


def image_decoder(settings: Settings, data: bytes, param: str | None = None) -> ImageDecoder:
    """The decoder of one uploaded image under the service's image limits."""
    return ImageDecoder(data, ImageLimits.from_settings(settings), param)
