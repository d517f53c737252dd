"""images.py: every mode becomes RGB, EXIF orientation is applied, bombs and junk are refused, encoding is stable."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rmpl_ds.errors import UserError
from rmpl_ds.images import DEFAULT_MAX_PIXELS, ImageError, encode_image, load_image

EXIF_ORIENTATION = 0x0112


def _encoded(image: Image.Image, format: str = "PNG", **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **params)
    return buffer.getvalue()


def _png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` but which carries almost no pixel data."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def test_cmyk_becomes_rgb() -> None:
    image = load_image(_encoded(Image.new("CMYK", (4, 3), (0, 255, 255, 0)), "JPEG", quality=95))
    assert image.mode == "RGB" and image.size == (4, 3)
    red, green, blue = image.getpixel((1, 1))
    assert red > 200 and green < 60 and blue < 60


def test_palette_with_transparency_is_composited_on_white() -> None:
    palette_image = Image.new("P", (4, 4), 0)
    palette_image.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)
    palette_image.putpixel((0, 0), 1)
    palette_image.info["transparency"] = 0  # index 0 (black) is transparent
    image = load_image(_encoded(palette_image, transparency=0))
    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == (200, 30, 30)
    assert image.getpixel((3, 3)) == (255, 255, 255)  # transparent black shows as white, not black


@pytest.mark.parametrize(
    ("mode", "opaque", "transparent"),
    [("LA", (90, 255), (0, 0)), ("RGBA", (10, 20, 30, 255), (10, 20, 30, 0))],
)
def test_alpha_modes_become_rgb_on_white(mode: str, opaque: tuple[int, ...], transparent: tuple[int, ...]) -> None:
    source = Image.new(mode, (2, 1), transparent)
    source.putpixel((0, 0), opaque)
    image = load_image(_encoded(source))
    assert image.mode == "RGB"
    expected_opaque = (90, 90, 90) if mode == "LA" else (10, 20, 30)
    assert image.getpixel((0, 0)) == expected_opaque
    assert image.getpixel((1, 0)) == (255, 255, 255)


def test_sixteen_bit_grey_is_scaled_to_eight_bits() -> None:
    pixels = np.array([[0, 256 * 100, 65535]], dtype=np.uint16)
    source = Image.fromarray(pixels)
    assert source.mode == "I;16"
    encoded = _encoded(source)
    assert Image.open(io.BytesIO(encoded)).mode in ("I;16", "I")  # the PNG really is 16-bit
    image = load_image(encoded)
    assert image.mode == "RGB"
    assert [image.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (100, 100, 100), (255, 255, 255)]


@pytest.mark.parametrize(
    ("mode", "fill", "grey"),
    [("L", 128, 128), ("1", 1, 255), ("I", 256 * 77, 77), ("F", 42.4, 42), ("F", 300.0, 255)],
)
def test_other_modes_become_rgb(mode: str, fill: float, grey: int) -> None:
    # PNG cannot hold 32-bit integer or float pixels; TIFF can.
    data = _encoded(Image.new(mode, (3, 2), fill), "TIFF" if mode in ("I", "F") else "PNG")
    assert Image.open(io.BytesIO(data)).mode == mode
    image = load_image(data)
    assert image.mode == "RGB" and image.getpixel((2, 1)) == (grey, grey, grey)


@pytest.mark.parametrize("format", ["PNG", "JPEG"])
def test_exif_orientation_is_applied(format: str) -> None:
    # 30x20 landscape: the left third red, the rest blue. Orientation 6 means "rotate 90 degrees clockwise to
    # display", after which the red third is on top of a 20x30 portrait image.
    source = Image.new("RGB", (30, 20), (0, 0, 255))
    source.paste((255, 0, 0), (0, 0, 10, 20))
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    image = load_image(_encoded(source, format, exif=exif.tobytes()))
    assert image.size == (20, 30)
    top_red, _, top_blue = image.getpixel((10, 2))
    bottom_red, _, bottom_blue = image.getpixel((10, 27))
    assert top_red > 200 and top_blue < 60
    assert bottom_blue > 200 and bottom_red < 60


def test_max_pixels_refuses_before_decoding() -> None:
    data = _encoded(Image.new("RGB", (20, 20)))
    assert load_image(data, max_pixels=400).size == (20, 20)
    with pytest.raises(ImageError, match=r"20x20 = 400 pixels exceeds the limit of 399.*decompression bomb"):
        load_image(data, max_pixels=399, name="bomb.png")


@pytest.mark.parametrize(
    ("width", "height"),
    [
        (7_000, 7_000),  # 49 Mpx: over our default cap, under Pillow's own
        (100_000, 100_000),  # 10 Gpx: Pillow's own guard fires while opening
    ],
)
def test_png_declaring_a_huge_size_is_a_bomb(width: int, height: int) -> None:
    assert width * height > DEFAULT_MAX_PIXELS
    with pytest.raises(ImageError, match="decompression bomb") as caught:
        load_image(_png_declaring(width, height), name="huge.png")
    assert isinstance(caught.value, UserError)
    assert "huge.png" in str(caught.value)


def test_unreadable_inputs_raise_image_error(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match=r"missing\.jpg: cannot read image file"):
        load_image(tmp_path / "missing.jpg")
    with pytest.raises(ImageError, match="empty image data"):
        load_image(b"")
    with pytest.raises(ImageError, match="not a recognised image"):
        load_image(b"definitely not an image")
    # EPS is refused outright: Pillow would hand it to Ghostscript.
    with pytest.raises(ImageError, match="not a recognised image"):
        load_image(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n")
    jpeg = _encoded(Image.effect_noise((64, 64), 50).convert("RGB"), "JPEG")
    with pytest.raises(ImageError, match="cannot decode image"):
        load_image(jpeg[: len(jpeg) // 2], name="cut.jpg")


def test_load_from_path(tmp_path: Path) -> None:
    path = tmp_path / "photo.png"
    path.write_bytes(_encoded(Image.new("L", (5, 7), 128)))
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (5, 7) and image.getpixel((0, 0)) == (128, 128, 128)


@pytest.mark.parametrize("format", ["png", "jpeg"])
def test_encode_is_deterministic_and_strips_metadata(format: str) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
    bare = Image.fromarray(pixels)
    decorated = Image.open(io.BytesIO(_encoded(bare, "PNG", exif=Image.Exif().tobytes(), dpi=(300, 300))))
    decorated.load()
    decorated.info["icc_profile"] = b"not really a profile"
    first = encode_image(bare, format)
    assert encode_image(Image.fromarray(pixels.copy()), format) == first
    assert encode_image(decorated, format) == first
    decoded = Image.open(io.BytesIO(first))
    assert decoded.format == format.upper() and "icc_profile" not in decoded.info and "exif" not in decoded.info
    if format == "png":
        assert np.array_equal(np.asarray(decoded), pixels)


def test_encode_converts_other_modes_and_rejects_unknown_formats() -> None:
    rgba = Image.new("RGBA", (2, 2), (0, 0, 0, 0))
    assert Image.open(io.BytesIO(encode_image(rgba))).getpixel((0, 0)) == (255, 255, 255)
    with pytest.raises(ValueError, match="format must be"):
        encode_image(rgba, "gif")  # type: ignore[arg-type]
