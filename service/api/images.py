"""Checks an uploaded image by its content and decodes it to RGB, or says why not.

    limits = ImageLimits.from_settings(settings)
    image = decode_image(raw_bytes, limits)   # raises ApiError 400 / 413 / 415
    image.rgb, image.format, image.width, image.height, image.sha256

The client's Content-Type and file name are ignored: the format is sniffed from magic bytes.
Sizes are checked from the header before any pixel is decoded (Pillow's `Image.open` reads
only the header), with this call's limits rather than Pillow's process-wide
`Image.MAX_IMAGE_PIXELS`. CPU-bound: call it off the event loop.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Collection
from dataclasses import dataclass, field

from PIL import Image, ImageOps

from service.api.errors import ApiError
from service.settings import IMAGE_FORMATS, Settings


@dataclass(frozen=True)
class ImageLimits:
    max_pixels: int = 16_000_000
    max_side: int = 8192
    formats: frozenset[str] = field(default_factory=lambda: frozenset(IMAGE_FORMATS))

    @classmethod
    def from_settings(cls, settings: Settings) -> ImageLimits:
        return cls(
            max_pixels=settings.max_image_pixels,
            max_side=settings.max_image_side,
            formats=frozenset(settings.allowed_image_formats),
        )


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
    """Validate and decode `data`; see the module docstring for the order of checks."""
    limits = limits or ImageLimits()
    if not data:
        raise ApiError(400, "invalid_image", "the image is empty")
    image_format = sniff_format(data)
    if image_format is None or image_format not in limits.formats:
        raise ApiError(
            415,
            "unsupported_media_type",
            f"the upload is not an image in an accepted format ({_formats(limits.formats)})",
        )
    try:
        # formats=[...]: only the sniffed plugin may parse it. Reads the header, no pixels.
        image = Image.open(io.BytesIO(data), formats=[image_format])
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's process-wide guard tripped first (only for sizes far above our limits
        # unless a warnings filter turns its warning into an error).
        raise _too_large(f"the image is a decompression bomb ({exc})") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ApiError(400, "invalid_image", f"the {image_format} image is unreadable") from exc
    with image:
        _check_size(image.width, image.height, limits)
        try:
            image.load()
            rgb = _to_rgb(image)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise _too_large(f"the image is a decompression bomb ({exc})") from exc
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise ApiError(
                400, "invalid_image", f"the {image_format} image is truncated or corrupt"
            ) from exc
    return DecodedImage(
        rgb=rgb,
        format=image_format,
        width=rgb.width,
        height=rgb.height,
        sha256=hashlib.sha256(data).hexdigest(),
    )


def _check_size(width: int, height: int, limits: ImageLimits) -> None:
    if width <= 0 or height <= 0:
        raise ApiError(400, "invalid_image", f"the image has no pixels ({width}x{height})")
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
    """RGB, upright (EXIF orientation applied), transparency flattened onto white."""
    upright = ImageOps.exif_transpose(image)
    has_alpha = upright.mode in ("RGBA", "LA", "PA") or (
        upright.mode == "P" and "transparency" in upright.info
    )
    if has_alpha:
        rgba = upright.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return upright.convert("RGB")


def _too_large(message: str) -> ApiError:
    return ApiError(413, "image_too_large", message)


def _formats(formats: Collection[str]) -> str:
    return ", ".join(fmt for fmt in IMAGE_FORMATS if fmt in formats)
