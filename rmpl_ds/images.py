"""Safe image loading and deterministic encoding.

Every image that enters a shard set or a batch goes through :func:`load_image`: it refuses decompression bombs
before any pixel is decoded, only accepts raster formats we expect in the source datasets (no EPS/PDF, whose
Pillow plugins shell out to Ghostscript), applies the EXIF orientation, and returns a fully decoded RGB image.
Converters catch :class:`ImageError` to skip a record with a reason; everything else about the record is fine.

:func:`encode_image` writes pixels only (no EXIF, ICC profile, text chunks or timestamps), so a rebuilt shard
set is byte-identical to the previous one.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageOps

from rmpl_ds.errors import UserError

# 40 megapixels (e.g. 8000 x 5000) is far above anything a VLM preprocessor keeps, and an RGB copy of it is
# 120 MB; anything larger in a news/situation dataset is a scan gone wrong or a bomb.
DEFAULT_MAX_PIXELS = 40_000_000

# Raster formats of the source datasets (imSitu/SWiG, MNRE, M2E2 are JPEG with some PNG/GIF/WebP strays). Pillow's
# JPEG opener also covers MPO (JPEG with a multi-picture extension, from phones); MPO has no opener of its own.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")

ImageFormat = Literal["png", "jpeg"]

# Fixed encoder settings: changing them changes every rebuilt shard's sha256.
JPEG_QUALITY = 90
PNG_COMPRESS_LEVEL = 6

_ALPHA_MODES = frozenset({"LA", "La", "RGBA", "RGBa", "PA", "P"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_BACKGROUND = (255, 255, 255)


class ImageError(UserError):
    """An image that is missing, unreadable, of an unexpected format, or too large to decode safely."""


def load_image(
    data: bytes | str | Path,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    name: str | None = None,
) -> Image.Image:
    """Decode image bytes (or the file at a path) into a fully loaded RGB image.

    Args:
        data: the encoded image, or a path to it.
        max_pixels: width * height above which the image is refused before its pixels are decoded.
        name: what to call the image in error messages (defaults to the path, or "image bytes").

    Returns:
        A loaded ``RGB`` image, upright according to its EXIF orientation. Transparent pixels are composited
        onto white; 16-bit images are scaled to 8 bits; CMYK, palette, grey and bilevel images are converted.

    Raises:
        ImageError: the file is missing or unreadable, the format is not one of :data:`ALLOWED_FORMATS`, the
            image is larger than ``max_pixels`` (or Pillow's own bomb guard), or the pixel data is corrupt.
    """
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    if isinstance(data, str | Path):
        label = name or str(data)
        try:
            data = Path(data).read_bytes()
        except OSError as exc:
            raise ImageError(f"{label}: cannot read image file: {exc.strerror or exc}") from None
    else:
        label = name or "image bytes"
    if not data:
        raise ImageError(f"{label}: empty image data")
    try:
        with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as image:
            # Image.open has only parsed the header: refuse huge images before any pixel is decoded.
            width, height = image.size
            if width * height > max_pixels:
                raise ImageError(
                    f"{label}: {width}x{height} = {width * height} pixels exceeds the limit of {max_pixels} "
                    "(possible decompression bomb)"
                )
            image.load()
            upright = ImageOps.exif_transpose(image)
            return to_rgb(upright)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{label}: refused as a possible decompression bomb: {exc}") from None
    except Image.UnidentifiedImageError:
        raise ImageError(f"{label}: not a recognised image (expected one of {', '.join(ALLOWED_FORMATS)})") from None
    # Pillow's decoders report corrupt input with many exception types (OSError, ValueError, SyntaxError,
    # struct.error, IndexError, ...); all of them mean "this file is unusable", which is the caller's data problem.
    except Exception as exc:
        raise ImageError(f"{label}: cannot decode image: {type(exc).__name__}: {exc}") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Return ``image`` as an ``RGB`` image (a new object unless it already is one).

    Alpha is composited onto white, because converting straight to RGB exposes whatever colour the transparent
    pixels happen to hold (often black). 16-bit and 32-bit integer grey images are taken to use the 16-bit range
    and scaled down by 256; float images are clipped to [0, 255].
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in _SIXTEEN_BIT_MODES:
        pixels = np.asarray(image).astype(np.int64)
        grey = (np.clip(pixels, 0, 65535) >> 8).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if mode == "F":
        grey = np.clip(np.asarray(image), 0.0, 255.0).round().astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as exc:
        raise ImageError(f"unsupported image mode {mode!r}: {exc}") from None


def encode_image(image: Image.Image, format: ImageFormat = "png") -> bytes:
    """Encode an image to PNG or JPEG bytes that depend only on its pixels.

    The pixels are copied into a fresh image first, so no metadata of the original (EXIF, ICC profile, DPI, text
    chunks) reaches the encoder; encoder settings are fixed (:data:`JPEG_QUALITY`, 4:2:0 subsampling, baseline;
    PNG compression level :data:`PNG_COMPRESS_LEVEL`). Non-RGB images are converted with :func:`to_rgb`, except
    ``L`` which both formats store natively.

    Raises:
        ValueError: ``format`` is neither "png" nor "jpeg".
    """
    if format not in ("png", "jpeg"):
        raise ValueError(f"format must be 'png' or 'jpeg', got {format!r}")
    if image.mode not in ("RGB", "L"):
        image = to_rgb(image)
    bare = Image.frombytes(image.mode, image.size, image.tobytes())
    buffer = io.BytesIO()
    if format == "png":
        bare.save(buffer, format="PNG", optimize=False, compress_level=PNG_COMPRESS_LEVEL)
    else:
        bare.save(buffer, format="JPEG", quality=JPEG_QUALITY, subsampling=2, optimize=False, progressive=False)
    return buffer.getvalue()
