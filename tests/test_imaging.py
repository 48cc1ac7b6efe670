"""Tests of herbray.imaging on real bad inputs and on generated variants of each fault kind."""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import subprocess
import sys
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from herbray import imaging
from herbray.imaging import (
    MAX_PIXELS,
    DecodedImage,
    ImageDecodeError,
    configure_worker,
    decode_image,
    encode_jpeg,
    pil_to_rgb_array,
    scale_to_uint8,
    sniff_format,
    target_size,
)

PAPER = (236, 230, 212)
RED = (220, 20, 20)


# --- Generators -----------------------------------------------------------------


def encode(img: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **params)
    return buffer.getvalue()


def make_sheet(width: int = 200, height: int = 300, seed: int = 0) -> Image.Image:
    """A small sheet: noisy paper, a red patch at the top left, a dark block lower down."""
    rng = np.random.default_rng(seed)
    pixels = np.empty((height, width, 3), np.int16)
    pixels[:] = PAPER
    pixels += rng.integers(-6, 7, (height, width, 1), dtype=np.int16)
    pixels[: height // 8, : width // 6] = RED
    pixels[height // 2 : height // 2 + height // 6, width // 3 : 2 * width // 3] = (40, 90, 40)
    return Image.fromarray(np.uint8(np.clip(pixels, 0, 255)))


def make_noisy_jpeg(width: int, height: int, *, progressive: bool = False) -> bytes:
    rng = np.random.default_rng(1)
    gradient = np.linspace(30, 220, width, dtype=np.float64)[None, :, None]
    pixels = gradient + rng.normal(0, 20, (height, width, 3))
    img = Image.fromarray(np.uint8(np.clip(pixels, 0, 255)))
    return encode(img, "JPEG", quality=90, progressive=progressive)


def png_chunk(chunk_type: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(chunk_type + payload)
    return struct.pack(">I", len(payload)) + chunk_type + payload + struct.pack(">I", crc)


def make_png(samples: np.ndarray) -> bytes:
    """Write a PNG from (H, W) or (H, W, C) uint8/uint16 samples, which may be 48-bit RGB."""
    height, width = samples.shape[:2]
    channels = 1 if samples.ndim == 2 else samples.shape[2]
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    bit_depth = samples.dtype.itemsize * 8
    rows = samples.astype(samples.dtype.newbyteorder(">")).reshape(height, -1).view(np.uint8)
    raw = np.hstack([np.zeros((height, 1), np.uint8), rows]).tobytes()  # filter type 0
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(raw))
        + png_chunk(b"IEND", b"")
    )


def make_uniform_png(width: int, height: int) -> bytes:
    """A grey 8-bit PNG with a dark lower-right quarter, compressed row by row.

    The file is a few hundred KB however large the image, and building it keeps
    only one row in memory.
    """
    compressor = zlib.compressobj(1)
    light = b"\x00" + bytes([200]) * width
    dark = b"\x00" + bytes([200]) * (width // 2) + bytes([20]) * (width - width // 2)
    parts = [compressor.compress(light * (height // 2))]
    for _ in range(height - height // 2):
        parts.append(compressor.compress(dark))
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", b"".join(parts))
        + png_chunk(b"IEND", b"")
    )


def make_tiff(
    pages: list[np.ndarray],
    *,
    compression: int = 1,
    tile: int | None = None,
    byteorder: str = "<",
) -> bytes:
    """Write a TIFF from (H, W) or (H, W, C) uint8/uint16 arrays, one page each.

    Pillow cannot write 48-bit RGB or tiled TIFFs, which scanners produce, and
    here the byte order can be chosen too. Each page's pixels come before its
    IFD. ``compression`` 8 is deflate. Any other value is written as the tag,
    with uncompressed data.
    """
    out = bytearray(b"II*\x00" if byteorder == "<" else b"MM\x00*") + bytes(4)
    next_pointer_at = 4
    for page in pages:
        height, width = page.shape[:2]
        channels = 1 if page.ndim == 2 else page.shape[2]
        samples = page.astype(page.dtype.newbyteorder(byteorder))
        if tile:
            padded_shape = (-(-height // tile) * tile, -(-width // tile) * tile, *page.shape[2:])
            padded = np.zeros(padded_shape, samples.dtype)
            padded[:height, :width] = samples
            blocks = [
                padded[y : y + tile, x : x + tile].tobytes()
                for y in range(0, padded.shape[0], tile)
                for x in range(0, padded.shape[1], tile)
            ]
        else:
            blocks = [samples.tobytes()]
        if compression == 8:
            blocks = [zlib.compress(block) for block in blocks]
        offsets = []
        for block in blocks:
            offsets.append(len(out))
            out += block + bytes(len(block) % 2)

        entries = [
            (256, 4, [width]),
            (257, 4, [height]),
            (258, 3, [page.dtype.itemsize * 8] * channels),
            (259, 3, [compression]),
            (262, 3, [2 if channels >= 3 else 1]),
            (277, 3, [channels]),
            (284, 3, [1]),
        ]
        if channels == 4:
            entries.append((338, 3, [2]))  # unassociated alpha
        counts = [len(block) for block in blocks]
        if tile:
            entries += [(322, 4, [tile]), (323, 4, [tile]), (324, 4, offsets), (325, 4, counts)]
        else:
            entries += [(273, 4, offsets), (278, 4, [height]), (279, 4, counts)]
        entries.sort()

        ifd_at = len(out)
        struct.pack_into(byteorder + "I", out, next_pointer_at, ifd_at)
        extra_at = ifd_at + 2 + 12 * len(entries) + 4
        ifd = bytearray(struct.pack(byteorder + "H", len(entries)))
        extra = bytearray()
        for tag, field_type, values in entries:
            code = "H" if field_type == 3 else "I"
            payload = struct.pack(byteorder + code * len(values), *values)
            if len(payload) <= 4:
                field = payload.ljust(4, b"\x00")
            else:
                field = struct.pack(byteorder + "I", extra_at + len(extra))
                extra += payload
            ifd += struct.pack(byteorder + "HHI", tag, field_type, len(values)) + field
        next_pointer_at = ifd_at + len(ifd)
        out += ifd + bytes(4) + extra
    return bytes(out)


def red_patch_box(array: np.ndarray) -> tuple[int, int, int, int, int]:
    """Return (pixels, top, bottom, left, right) of the pixels that are clearly red."""
    red = (array[..., 0] > 150) & (array[..., 1] < 90) & (array[..., 2] < 90)
    ys, xs = np.nonzero(red)
    if len(ys) == 0:
        return 0, -1, -1, -1, -1
    return int(red.sum()), int(ys.min()), int(ys.max()), int(xs.min()), int(xs.max())


def assert_red_patch_top_left(array: np.ndarray) -> None:
    height, width = array.shape[:2]
    pixels, top, bottom, left, right = red_patch_box(array)
    assert pixels > 0.005 * height * width, "no red patch found"
    assert top == 0
    assert bottom < 0.15 * height
    assert left == 0
    assert right < 0.2 * width


def decode_error(data: bytes, *args, **kwargs) -> ImageDecodeError:
    with pytest.raises(ImageDecodeError) as caught:
        decode_image(data, *args, **kwargs)
    return caught.value


# --- Output contract ----------------------------------------------------------------


def test_decode_returns_contract_fields():
    data = encode(make_sheet(400, 600), "JPEG", quality=92)
    result = decode_image(data, 100)
    assert isinstance(result, DecodedImage)
    assert result.array.shape == (150, 100, 3)
    assert result.array.dtype == np.uint8
    assert result.array.flags.c_contiguous
    assert result.array.flags.writeable
    assert (result.width, result.height) == (100, 150)
    assert (result.original_width, result.original_height) == (400, 600)
    assert result.format == "JPEG"
    assert result.mode == "RGB"
    assert result.bit_depth == 8
    assert result.orientation == 1
    assert_red_patch_top_left(result.array)


def test_decode_full_size_when_short_side_none():
    sheet = make_sheet(120, 90)
    result = decode_image(encode(sheet, "PNG"))
    assert result.array.shape == (90, 120, 3)
    assert np.array_equal(result.array, np.asarray(sheet))


def test_decode_never_upscales():
    result = decode_image(encode(make_sheet(100, 150), "PNG"), 384)
    assert (result.width, result.height) == (100, 150)


def test_decode_max_side_caps_long_side():
    data = encode(make_sheet(200, 600), "PNG")
    result = decode_image(data, 150, max_side=300)
    assert (result.width, result.height) == (100, 300)
    result = decode_image(data, max_side=120)
    assert (result.width, result.height) == (40, 120)


@pytest.mark.parametrize(
    ("size", "short_side", "max_side", "expected"),
    [
        ((4000, 6000), 384, None, (384, 576)),
        ((6000, 4000), 384, None, (576, 384)),
        ((3753, 5634), 384, None, (384, 576)),
        ((1000, 1000), 384, None, (384, 384)),
        ((4000, 6000), 384, 500, (333, 500)),
        ((4000, 6000), None, 500, (333, 500)),
        ((300, 200), 384, None, (300, 200)),
        ((13400, 13400), 224, 224, (224, 224)),
        ((10, 100000), 5, None, (5, 50000)),
    ],
)
def test_target_size_cases(size, short_side, max_side, expected):
    assert target_size(*size, short_side, max_side) == expected


@pytest.mark.parametrize("bad", [0, -5, 1.5, "384"])
def test_decode_rejects_invalid_short_side(bad):
    with pytest.raises(ValueError, match="short_side"):
        decode_image(encode(make_sheet(), "PNG"), bad)


def test_decode_rejects_invalid_min_side():
    with pytest.raises(ValueError, match="min_side"):
        decode_image(encode(make_sheet(), "PNG"), min_side=0)


def test_draft_decode_close_to_full_decode():
    data = make_noisy_jpeg(1600, 2400)
    result = decode_image(data, 200)
    with Image.open(io.BytesIO(data)) as img:
        reference = np.asarray(img.convert("RGB").resize((200, 300), Image.Resampling.LANCZOS))
    assert result.array.shape == reference.shape
    assert np.abs(result.array.astype(np.int16) - reference).mean() < 2.0


def test_decode_accepts_bytes_like():
    data = encode(make_sheet(), "JPEG")
    assert decode_image(bytearray(data), 64).array.shape == (96, 64, 3)
    assert decode_image(memoryview(data), 64).array.shape == (96, 64, 3)


# --- Format sniffing and non-images ------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "expected"),
    [("JPEG", "JPEG"), ("PNG", "PNG"), ("TIFF", "TIFF"), ("GIF", "GIF"), ("WEBP", "WEBP")],
)
def test_sniff_format_pillow_output(fmt, expected):
    assert sniff_format(encode(make_sheet(), fmt)) == expected


def test_sniff_format_other_signatures():
    assert sniff_format(b"BM" + bytes(12) + b"\x28" + bytes(60)) == "BMP"
    assert sniff_format(b"BMW is a car maker" + bytes(60)) is None
    assert sniff_format(b"\x00\x00\x00\x0cjP  \r\n\x87\n" + bytes(20)) == "JPEG2000"
    assert sniff_format(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic") == "HEIF"
    assert sniff_format(b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1miaf") == "AVIF"
    assert sniff_format(b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2") is None
    assert sniff_format(b"\xff\x0a\xfa\x7f") == "JXL"
    assert sniff_format(b"<!DOCTYPE html>") is None


def test_png_named_jpg_decodes_as_png(tmp_path):
    path = tmp_path / "sheet.jpg"
    path.write_bytes(encode(make_sheet(), "PNG"))
    result = decode_image(path.read_bytes(), 100)
    assert result.format == "PNG"
    assert_red_patch_top_left(result.array)


def test_html_named_jpg_is_unidentified(tmp_path):
    path = tmp_path / "IMG_0001.jpg"
    html = "<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head><body></body></html>"
    path.write_text(html)
    error = decode_error(path.read_bytes())
    assert error.reason == "unidentified_image"
    assert "HTML" in str(error)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_bytes_are_unidentified(seed):
    data = np.random.default_rng(seed).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    assert decode_error(data).reason == "unidentified_image"


def test_bmp_signature_with_junk_is_unidentified():
    data = b"BM" + np.random.default_rng(3).integers(0, 256, 500, dtype=np.uint8).tobytes()
    assert decode_error(data).reason == "unidentified_image"


def test_empty_bytes_is_empty_file():
    assert decode_error(b"").reason == "empty_file"


@pytest.mark.parametrize(
    ("fmt", "header"),
    [
        ("HEIF", b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(200)),
        ("JXL", b"\xff\x0a\xfa\x7f" + bytes(200)),
    ],
)
def test_format_without_plugin_is_unsupported(fmt, header):
    Image.init()
    if fmt in Image.OPEN:
        pytest.skip(f"this Pillow has a {fmt} plugin")
    error = decode_error(header)
    assert error.reason == "unsupported_compression"
    assert fmt in str(error)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "BMP"])
def test_other_formats_decode(fmt):
    params = {"lossless": True} if fmt == "WEBP" else {}
    result = decode_image(encode(make_sheet(), fmt, **params))
    assert result.format == fmt
    assert_red_patch_top_left(result.array)


def test_jpeg2000_reduced_decode_matches_full():
    sheet = make_sheet(1024, 768)
    for params in ({}, {"num_resolutions": 2}, {"no_jp2": True}):
        data = encode(sheet, "JPEG2000", **params)
        result = decode_image(data, 96)
        assert result.format == "JPEG2000"
        assert (result.width, result.height) == (128, 96)
        reference = np.asarray(sheet.resize((128, 96), Image.Resampling.LANCZOS))
        assert np.abs(result.array.astype(np.int16) - reference).mean() < 4.0


# --- Truncated files -------------------------------------------------------------


@pytest.mark.parametrize("progressive", [False, True])
@pytest.mark.parametrize("short_side", [None, 100])
def test_truncated_jpeg_every_offset_kind(progressive, short_side):
    data = make_noisy_jpeg(480, 640, progressive=progressive)
    scans = [i for i in range(len(data) - 1) if data[i : i + 2] == b"\xff\xda"]
    cuts = {10, 100, scans[0] + 8, len(data) // 4, len(data) // 2, len(data) - 2, len(data) - 1}
    cuts.update(scans[1:])  # progressive: cut exactly at a later scan
    for cut in sorted(cuts):
        error = decode_error(data[:cut], short_side)
        assert error.reason == "truncated", (cut, str(error))


def test_truncated_jpeg_despite_load_truncated_images(monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    data = make_noisy_jpeg(480, 640)
    for cut in (len(data) // 2, len(data) - 2):
        assert decode_error(data[:cut], 100).reason == "truncated"


def test_module_leaves_load_truncated_images_off():
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_truncated_png_offsets():
    data = encode(make_sheet(300, 400), "PNG")
    for cut in (12, 30, 60, len(data) // 3, len(data) - 20, len(data) - 12, len(data) - 1):
        error = decode_error(data[:cut])
        assert error.reason == "truncated", (cut, str(error))


# Pillow warns about the cut-off tag data before it fails.
@pytest.mark.filterwarnings("ignore:Corrupt EXIF data", "ignore:Truncated File Read")
@pytest.mark.parametrize(
    "compression", ["raw", "tiff_lzw", "tiff_adobe_deflate", "jpeg", "hand_written"]
)
def test_truncated_tiff_offsets(compression):
    sheet = make_sheet(300, 400)
    if compression == "hand_written":
        data = make_tiff([np.asarray(sheet)])  # pixels first, IFD at the end
    else:
        data = encode(sheet, "TIFF", compression=compression)
    for cut in (20, len(data) // 3, len(data) // 2, len(data) - 3):
        error = decode_error(data[:cut])
        assert error.reason == "truncated", (cut, str(error))


# --- Size checks ---------------------------------------------------------------------


@pytest.mark.parametrize(("width", "height"), [(1, 1), (10, 500), (500, 31)])
def test_small_images_are_too_small(width, height):
    data = encode(Image.new("RGB", (width, height), PAPER), "PNG")
    error = decode_error(data)
    assert error.reason == "too_small"
    assert f"{width}x{height}" in str(error)


def test_min_side_boundary_and_override():
    data = encode(Image.new("RGB", (32, 40), PAPER), "PNG")
    assert decode_image(data).width == 32
    assert decode_error(data, min_side=33).reason == "too_small"
    assert decode_image(encode(Image.new("RGB", (8, 8)), "PNG"), min_side=1).width == 8


def test_above_max_pixels_is_pixel_limit(monkeypatch):
    monkeypatch.setattr(imaging, "MAX_PIXELS", 200 * 300 - 1)
    error = decode_error(encode(make_sheet(200, 300), "JPEG"), 100)
    assert error.reason == "pixel_limit"
    assert "60000" in str(error)
    monkeypatch.setattr(imaging, "MAX_PIXELS", 200 * 300)
    assert decode_image(encode(make_sheet(200, 300), "JPEG"), 100).width == 100


@pytest.mark.parametrize("pillow_limit_factor", [0.7, 0.4])
def test_pillow_bomb_check_becomes_pixel_limit(monkeypatch, pillow_limit_factor):
    # At 0.7 Pillow only warns, which the "error" filter turns into an exception.
    # At 0.4 Pillow raises DecompressionBombError.
    pixels = 300 * 300
    monkeypatch.setattr(imaging, "MAX_PIXELS", pixels - 1)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", int(pixels * pillow_limit_factor))
    data = encode(Image.new("RGB", (300, 300), PAPER), "PNG")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert decode_error(data).reason == "pixel_limit"


def test_above_pillow_default_limit_decodes(monkeypatch):
    # 14000 x 14000 = 196 MP, above Pillow's 179 MP error threshold. The limit is
    # set back to Pillow's default to show decode_image restores its own.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 89_478_485)
    data = make_uniform_png(14000, 14000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = decode_image(data, 256)
    assert (result.width, result.height) == (256, 256)
    assert (result.original_width, result.original_height) == (14000, 14000)
    assert abs(int(result.array[10, 10, 0]) - 200) <= 2
    assert abs(int(result.array[-10, -10, 0]) - 20) <= 2
    assert abs(int(result.array[-10, 10, 0]) - 200) <= 2


def test_configure_worker_sets_pillow_limit(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    configure_worker()
    assert Image.MAX_IMAGE_PIXELS == MAX_PIXELS


def test_max_pixels_from_environment():
    code = (
        "from PIL import Image; import herbray.imaging as m; "
        "print(m.MAX_PIXELS, Image.MAX_IMAGE_PIXELS)"
    )
    env_run = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "HERBRAY_MAX_PIXELS": "250000000"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert env_run.stdout.split() == ["250000000", "250000000"]


@pytest.mark.parametrize("value", ["lots", "-3", "0"])
def test_max_pixels_environment_invalid(monkeypatch, value):
    monkeypatch.setenv("HERBRAY_MAX_PIXELS", value)
    with pytest.raises(ValueError, match="HERBRAY_MAX_PIXELS"):
        imaging._max_pixels_from_env()


def test_default_max_pixels():
    assert imaging.DEFAULT_MAX_PIXELS == 600_000_000


# --- EXIF orientation ----------------------------------------------------------------

# The transpose that turns an upright image into the stored one for each tag value.
STORED_FROM_UPRIGHT = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}
QUADRANTS = {"top_left": (220, 20, 20), "top_right": (20, 160, 20), "bottom_left": (20, 20, 200)}


def make_upright_quadrants(width: int = 160, height: int = 240) -> Image.Image:
    img = Image.new("RGB", (width, height), (240, 240, 240))
    img.paste(QUADRANTS["top_left"], (0, 0, width // 2, height // 2))
    img.paste(QUADRANTS["top_right"], (width // 2, 0, width, height // 2))
    img.paste(QUADRANTS["bottom_left"], (0, height // 2, width // 2, height))
    return img


def assert_upright_quadrants(array: np.ndarray) -> None:
    height, width = array.shape[:2]
    points = {
        "top_left": (height // 4, width // 4),
        "top_right": (height // 4, 3 * width // 4),
        "bottom_left": (3 * height // 4, width // 4),
    }
    for name, (y, x) in points.items():
        difference = np.abs(array[y, x].astype(int) - QUADRANTS[name]).max()
        assert difference < 25, (name, array[y, x])


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("short_side", [None, 60])
def test_exif_orientation_jpeg(orientation, short_side):
    upright = make_upright_quadrants()
    transpose = STORED_FROM_UPRIGHT[orientation]
    stored = upright if transpose is None else upright.transpose(transpose)
    exif = Image.Exif()
    exif[0x0112] = orientation
    result = decode_image(encode(stored, "JPEG", quality=95, exif=exif.tobytes()), short_side)
    assert result.orientation == orientation
    assert (result.original_width, result.original_height) == (160, 240)
    expected = (160, 240) if short_side is None else (60, 90)
    assert (result.width, result.height) == expected
    assert_upright_quadrants(result.array)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_exif_orientation_png_tiff(fmt):
    upright = make_upright_quadrants()
    stored = upright.transpose(STORED_FROM_UPRIGHT[6])
    if fmt == "TIFF":
        data = encode(stored, "TIFF", tiffinfo={0x0112: 6})
    else:
        exif = Image.Exif()
        exif[0x0112] = 6
        data = encode(stored, "PNG", exif=exif.tobytes())
    result = decode_image(data, 80)
    assert result.orientation == 6
    assert (result.width, result.height) == (80, 120)
    assert_upright_quadrants(result.array)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_corrupt_exif_is_read_as_upright():
    jpeg = encode(make_sheet(), "JPEG")
    junk = np.random.default_rng(1).integers(0, 256, 200, dtype=np.uint8).tobytes()
    segment = b"Exif\x00\x00II*\x00\x08\x00\x00\x00" + junk
    data = jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(segment) + 2) + segment + jpeg[2:]
    result = decode_image(data, 100)
    assert result.orientation == 1
    assert_red_patch_top_left(result.array)


# --- Colour modes -------------------------------------------------------------------


def test_cmyk_jpeg_decodes_with_correct_colours():
    data = encode(make_sheet(400, 600).convert("CMYK"), "JPEG", quality=95)
    with Image.open(io.BytesIO(data)) as img:
        assert img.mode == "CMYK"
        assert "adobe" in img.info  # Pillow writes Adobe's inverted CMYK
    result = decode_image(data, 200)
    assert result.mode == "CMYK"
    assert_red_patch_top_left(result.array)


def test_cmyk_tiff_decodes_with_correct_colours():
    result = decode_image(encode(make_sheet().convert("CMYK"), "TIFF"))
    assert result.mode == "CMYK"
    assert_red_patch_top_left(result.array)


def transparent_pixels() -> np.ndarray:
    """RGBA 64x96: left half fully transparent black, right half opaque red, one 50 % black row."""
    pixels = np.zeros((96, 64, 4), np.uint8)
    pixels[:, 32:] = (*RED, 255)
    pixels[90:, :] = (0, 0, 0, 128)
    return pixels


def check_composited(array: np.ndarray) -> None:
    assert array[40, 5].min() >= 250, "transparent pixel is not white"
    assert np.abs(array[40, 50].astype(int) - RED).max() <= 3, "opaque pixel changed"
    assert abs(int(array[93, 5, 0]) - 127) <= 3, "half-transparent black is not mid grey"


def test_rgba_png_composited_on_white():
    result = decode_image(encode(Image.fromarray(transparent_pixels()), "PNG"))
    assert result.mode == "RGBA"
    check_composited(result.array)


def test_rgba_resize_has_no_dark_fringe():
    pixels = np.zeros((400, 400, 4), np.uint8)  # transparent black
    pixels[:, 200:] = (255, 255, 255, 255)
    result = decode_image(encode(Image.fromarray(pixels), "PNG"), 50)
    assert result.array.min() >= 250


def test_la_png_composited_on_white():
    pixels = transparent_pixels()
    grey = np.stack([pixels[..., 0], pixels[..., 3]], axis=-1)
    result = decode_image(encode(Image.fromarray(grey), "PNG"))
    assert result.mode == "LA"
    assert result.array[40, 5].min() >= 250
    assert np.all(result.array[40, 50] == RED[0])
    assert np.array_equal(result.array[..., 0], result.array[..., 2])


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_with_transparency_composited_on_white(fmt):
    img = Image.new("P", (64, 96), 0)
    img.putpalette([0, 0, 0, *RED] + [0] * 762)
    img.paste(1, (32, 0, 64, 96))
    result = decode_image(encode(img, fmt, transparency=0))
    assert result.mode == "P"
    assert result.array[40, 5].min() >= 250
    assert np.abs(result.array[40, 50].astype(int) - RED).max() <= 3


def test_palette_without_transparency():
    img = make_sheet().convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    result = decode_image(encode(img, "PNG"))
    assert result.mode == "P"
    assert_red_patch_top_left(result.array)


def test_png_colour_key_composited_on_white():
    img = Image.new("RGB", (64, 96), (0, 0, 0))
    img.paste(RED, (32, 0, 64, 96))
    result = decode_image(encode(img, "PNG", transparency=(0, 0, 0)))
    assert result.array[40, 5].min() >= 250
    assert np.abs(result.array[40, 50].astype(int) - RED).max() <= 3


def test_bilevel_tiff_decodes():
    img = Image.new("1", (64, 96), 1)
    img.paste(0, (0, 0, 32, 96))
    result = decode_image(encode(img, "TIFF", compression="group4"))
    assert result.mode == "1"
    assert result.array[40, 5].max() == 0
    assert result.array[40, 50].min() == 255


def test_grayscale_jpeg_expands_to_three_channels():
    result = decode_image(encode(make_sheet().convert("L"), "JPEG"), 100)
    assert result.mode == "L"
    assert result.array.shape == (150, 100, 3)
    assert np.array_equal(result.array[..., 0], result.array[..., 1])


# --- High bit depth ----------------------------------------------------------------


def sixteen_bit_levels(width: int = 96, height: int = 64) -> np.ndarray:
    """16-bit grey: columns of 0, 32768 and 65535 (expected 8-bit values 0, 128, 255)."""
    samples = np.zeros((height, width), np.uint16)
    samples[:, width // 3 : 2 * width // 3] = 32768
    samples[:, 2 * width // 3 :] = 65535
    return samples


def check_levels(array: np.ndarray) -> None:
    width = array.shape[1]
    assert array[10, width // 6].max() == 0
    assert np.all(array[10, width // 2] == 128)
    assert array[10, 5 * width // 6].min() == 255


@pytest.mark.parametrize("maker", ["pillow_png", "hand_png", "pillow_tiff", "big_endian_tiff"])
def test_gray16_scaled_by_value(maker):
    samples = sixteen_bit_levels()
    if maker == "pillow_png":
        data = encode(Image.fromarray(samples), "PNG")
    elif maker == "hand_png":
        data = make_png(samples)
    elif maker == "pillow_tiff":
        data = encode(Image.fromarray(samples), "TIFF")
    else:
        data = make_tiff([samples], byteorder=">")
    result = decode_image(data)
    assert result.mode.startswith("I")
    assert result.bit_depth == 16
    check_levels(result.array)


def test_gray16_resized_keeps_mid_grey():
    samples = np.full((400, 300), 32768, np.uint16)
    result = decode_image(make_png(samples), 60)
    assert (result.width, result.height) == (60, 80)
    assert np.abs(result.array.astype(int) - 128).max() <= 1


@pytest.mark.parametrize("container", ["tiff", "png"])
def test_rgb48_scaled_by_value(container):
    samples = np.zeros((64, 96, 3), np.uint16)
    samples[:, :32] = (65535, 0, 0)
    samples[:, 32:64] = 32768
    samples[:, 64:] = (0, 0, 65535)
    data = make_tiff([samples]) if container == "tiff" else make_png(samples)
    result = decode_image(data)
    assert result.bit_depth == 16
    assert result.array[10, 10].tolist() == [255, 0, 0]
    assert result.array[10, 48].tolist() == [128, 128, 128]
    assert result.array[10, 80].tolist() == [0, 0, 255]


@pytest.mark.parametrize("container", ["tiff", "png"])
def test_rgba64_composited_and_scaled(container):
    samples = np.zeros((64, 96, 4), np.uint16)
    samples[:, :48] = (65535, 0, 0, 65535)
    samples[:, 48:] = (0, 0, 0, 0)
    data = make_tiff([samples]) if container == "tiff" else make_png(samples)
    result = decode_image(data)
    assert result.bit_depth == 16
    assert result.array[10, 10].tolist() == [255, 0, 0]
    assert result.array[10, 80].tolist() == [255, 255, 255]


def test_float_tiff_scaled():
    samples = np.tile(np.linspace(0.0, 1.0, 101, dtype=np.float32), (40, 1))
    result = decode_image(encode(Image.fromarray(samples), "TIFF"))
    assert result.mode == "F"
    assert result.bit_depth == 32
    assert result.array[0, 0, 0] == 0
    assert result.array[0, 50, 0] == 128
    assert result.array[0, 100, 0] == 255


def test_int32_tiff_holding_16_bit_values():
    samples = np.zeros((40, 60), np.int32)
    samples[:, 30:] = 32768
    result = decode_image(encode(Image.fromarray(samples), "TIFF"))
    assert result.mode == "I"
    assert result.array[0, 0, 0] == 0
    assert result.array[0, 40, 0] == 128


def test_scale_to_uint8_rules():
    assert scale_to_uint8(np.array([0, 255, 256, 65535], np.uint16), 16).tolist() == [0, 0, 1, 255]
    assert scale_to_uint8(np.array([-5, 100], np.int32), 16).tolist() == [0, 0]
    assert scale_to_uint8(np.array([0.0, 0.5, 1.0], np.float32), 32).tolist() == [0, 128, 255]
    assert scale_to_uint8(np.array([-1.0, 1.0, np.nan], np.float32), 32).tolist() == [0, 255, 0]
    assert scale_to_uint8(np.array([0, 200], np.int32), 32).tolist() == [0, 200]


def test_pil_to_rgb_array_modes():
    assert pil_to_rgb_array(Image.fromarray(sixteen_bit_levels()))[10, 48].tolist() == [128] * 3
    rgba = pil_to_rgb_array(Image.fromarray(transparent_pixels()))
    check_composited(rgba)
    assert pil_to_rgb_array(Image.new("L", (4, 4), 7)).shape == (4, 4, 3)
    assert_red_patch_top_left(pil_to_rgb_array(make_sheet().convert("CMYK")))


# --- TIFF layouts -------------------------------------------------------------------


@pytest.mark.parametrize("compression", ["raw", "tiff_lzw", "tiff_adobe_deflate", "packbits"])
def test_lossless_tiff_same_pixels(compression):
    sheet = make_sheet(150, 200)
    result = decode_image(encode(sheet, "TIFF", compression=compression))
    assert result.format == "TIFF"
    assert np.array_equal(result.array, np.asarray(sheet))


def test_jpeg_tiff_within_jpeg_tolerance():
    sheet = make_sheet(160, 240)
    result = decode_image(encode(sheet, "TIFF", compression="jpeg", quality=90))
    assert np.abs(result.array.astype(int) - np.asarray(sheet)).mean() < 3.0
    assert_red_patch_top_left(result.array)


@pytest.mark.parametrize("compression", [1, 8])
def test_tiled_tiff_same_pixels(compression):
    sheet = np.asarray(make_sheet(150, 200))
    result = decode_image(make_tiff([sheet], compression=compression, tile=64))
    assert np.array_equal(result.array, sheet)


@pytest.mark.parametrize("big_first", [False, True])
def test_multipage_tiff_returns_largest_page(big_first):
    big = make_sheet(300, 450)
    thumbnail = Image.new("RGB", (60, 90), (0, 0, 255))
    first, rest = (big, [thumbnail]) if big_first else (thumbnail, [big])
    data = encode(first, "TIFF", compression="tiff_lzw", save_all=True, append_images=rest)
    result = decode_image(data, 100)
    assert (result.original_width, result.original_height) == (300, 450)
    assert_red_patch_top_left(result.array)


def test_tiff_unknown_compression_is_unsupported():
    data = make_tiff([np.asarray(make_sheet(64, 64))], compression=34712)  # JPEG 2000 in TIFF
    error = decode_error(data)
    assert error.reason == "unsupported_compression"
    assert "34712" in str(error)


def test_tiff_codec_missing_from_libtiff_is_unsupported():
    if imaging._tiff_codec_available("webp"):
        pytest.skip("this libtiff decodes WebP-compressed TIFF")
    data = make_tiff([np.asarray(make_sheet(64, 64))], compression=50001)  # WebP
    error = decode_error(data)
    assert error.reason == "unsupported_compression"
    assert "webp" in str(error)


def test_jpeg_12_bit_is_unsupported():
    data = bytearray(encode(make_sheet(), "JPEG"))
    start_of_frame = data.find(b"\xff\xc0")
    data[start_of_frame + 4] = 12  # sample precision
    error = decode_error(bytes(data))
    assert error.reason == "unsupported_compression"
    assert "12-bit" in str(error)


def test_corrupt_scan_data_is_decode_failed():
    sheet = make_sheet(150, 200)
    data = bytearray(encode(sheet, "TIFF", compression="tiff_adobe_deflate"))
    with Image.open(io.BytesIO(bytes(data))) as img:
        start = img.tag_v2[273][0]
    data[start : start + 64] = bytes(range(64))  # destroy the zlib stream header
    error = decode_error(bytes(data))
    assert error.reason == "decode_failed"
    assert "OSError" in str(error)


# --- Errors and encoding ----------------------------------------------------------


def test_decode_error_pickles_with_reason():
    error = ImageDecodeError("truncated", "the JPEG file is cut off")
    restored = pickle.loads(pickle.dumps(error))
    assert isinstance(restored, ValueError)
    assert restored.reason == "truncated"
    assert str(restored) == "the JPEG file is cut off"


def test_decode_error_rejects_unknown_reason():
    with pytest.raises(ValueError, match="unknown decode failure reason"):
        ImageDecodeError("broken", "x")


def test_encode_jpeg_round_trip():
    array = np.asarray(make_sheet(200, 300))
    data = encode_jpeg(array)
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == "JPEG"
        assert img.mode == "RGB"
        assert img.size == (200, 300)
    decoded = decode_image(data).array
    assert np.abs(decoded.astype(int) - array).mean() < 3.0
    assert len(encode_jpeg(array, quality=50)) < len(data)


@pytest.mark.parametrize(
    ("array", "match"),
    [
        (np.zeros((10, 10), np.uint8), "H x W x 3"),
        (np.zeros((10, 10, 4), np.uint8), "H x W x 3"),
        (np.zeros((10, 10, 3), np.float32), "uint8"),
    ],
)
def test_encode_jpeg_rejects_bad_arrays(array, match):
    with pytest.raises(ValueError, match=match):
        encode_jpeg(array)


def test_encode_jpeg_rejects_bad_quality():
    with pytest.raises(ValueError, match="quality"):
        encode_jpeg(np.zeros((8, 8, 3), np.uint8), quality=0)


# --- The real bad inputs ------------------------------------------------------------


def bad_input(shared_data, name: str) -> bytes:
    return (shared_data / "bad-inputs" / "images" / name).read_bytes()


def test_bad_inputs_manifest_covered(shared_data):
    manifest = json.loads((shared_data / "bad-inputs" / "manifest.json").read_text())
    images = {key.split("/", 1)[1] for key in manifest["files"] if key.startswith("images/")}
    assert images <= set(BAD_INPUT_CASES)


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_real_exif_orientation(shared_data, orientation):
    result = decode_image(bad_input(shared_data, f"exif_orientation_{orientation}.jpg"))
    assert result.orientation == orientation
    assert (result.width, result.height) == (900, 1350)
    assert_red_patch_top_left(result.array)


def test_real_cmyk_adobe_red_patch(shared_data):
    result = decode_image(bad_input(shared_data, "cmyk_adobe.jpg"), 384)
    assert result.mode == "CMYK"
    red = result.array[: result.height // 20, : result.width // 20].reshape(-1, 3).mean(axis=0)
    assert red[0] > 150
    assert red[1] < 90
    assert red[2] < 90
    assert_red_patch_top_left(result.array)


@pytest.mark.parametrize("name", ["gray16_gradient.png", "gray16_gradient.tif"])
def test_real_gray16_middle_column(shared_data, name):
    result = decode_image(bad_input(shared_data, name))
    assert result.bit_depth == 16
    middle = result.array[:, result.width // 2, 0].astype(int)
    assert np.abs(middle - 128).max() <= 2


def test_real_rgb48_red_patch(shared_data):
    result = decode_image(bad_input(shared_data, "rgb48_16bit_per_channel.tif"))
    assert result.bit_depth == 16
    assert_red_patch_top_left(result.array)


def test_real_lzw_tiff(shared_data):
    result = decode_image(bad_input(shared_data, "tiff_tiff_lzw.tif"), 384)
    assert result.format == "TIFF"
    assert (result.original_width, result.original_height) == (1000, 1500)
    assert_red_patch_top_left(result.array)


@pytest.mark.parametrize("name", ["grayscale_L.jpg", "gray_alpha_LA.png"])
def test_real_grey_becomes_three_channels(shared_data, name):
    result = decode_image(bad_input(shared_data, name), 224)
    assert result.array.shape == (336, 224, 3)
    assert np.array_equal(result.array[..., 0], result.array[..., 2])


@pytest.mark.parametrize(
    "name",
    [
        "huge_pixel_limit_13400x13400.jpg",
        "huge_pixel_limit_13400x13400.png",
        "large_bomb_warning_9600x9600.png",
    ],
)
def test_real_huge_images_downscaled(shared_data, name):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = decode_image(bad_input(shared_data, name), 384)
    assert (result.width, result.height) == (384, 384)
    side = 13400 if "13400" in name else 9600
    assert (result.original_width, result.original_height) == (side, side)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("truncated_baseline.jpg", "truncated"),
        ("garbage_bytes.jpg", "unidentified_image"),
        ("empty_0_bytes.jpg", "empty_file"),
    ],
)
def test_real_failures_reason(shared_data, name, reason):
    assert decode_error(bad_input(shared_data, name), 384).reason == reason


BAD_INPUT_CASES = {
    "huge_pixel_limit_13400x13400.png",
    "huge_pixel_limit_13400x13400.jpg",
    "large_bomb_warning_9600x9600.png",
    "cmyk_adobe.jpg",
    "exif_orientation_3.jpg",
    "exif_orientation_6.jpg",
    "exif_orientation_8.jpg",
    "truncated_baseline.jpg",
    "garbage_bytes.jpg",
    "empty_0_bytes.jpg",
    "grayscale_L.jpg",
    "gray_alpha_LA.png",
    "gray16_gradient.png",
    "gray16_gradient.tif",
    "rgb48_16bit_per_channel.tif",
    "tiff_tiff_lzw.tif",
}


def test_real_names_decode(shared_data):
    folder = shared_data / "bad-inputs"
    paths = [*sorted((folder / "names").iterdir()), *sorted((folder / "unicode").iterdir())]
    assert len(paths) >= 3
    for path in paths:
        assert decode_image(path.read_bytes(), 128).array.shape[2] == 3


def test_real_vouchervision_sheets(shared_data):
    for path in sorted((shared_data / "sheets" / "vouchervision").glob("*_3753x5634.jpg"))[:2]:
        result = decode_image(path.read_bytes(), 384)
        assert (result.original_width, result.original_height) == (3753, 5634)
        assert (result.width, result.height) == (384, 576)


def test_worker_setup_hook_in_ray_worker(ray_local):
    @ray_local.remote
    def pillow_limit() -> int | None:
        # Imports only Pillow: the limit comes from the setup hook.
        from PIL import Image as WorkerImage

        return WorkerImage.MAX_IMAGE_PIXELS

    assert ray_local.get(pillow_limit.remote()) == MAX_PIXELS
