"""Decode one specimen scan from bytes into an 8-bit RGB array at a requested size.

Archives contain every kind of file that scanners and copy jobs produce. Among
them are baseline and progressive JPEG, CMYK JPEG, 16-bit and multi-page TIFF
and PNG with alpha, but also files cut off by an interrupted copy and web pages
saved with an image name.
:func:`decode_image` turns each input into either a :class:`DecodedImage` or an
:class:`ImageDecodeError` whose ``reason`` is one short code, so a Ray Data
stage can write one row per input and never fail a whole block for one file.

Speed comes from not decoding pixels that the resize would throw away. A JPEG
is decoded with libjpeg's DCT scaling (:meth:`PIL.Image.Image.draft`) at the
smallest 1/2, 1/4 or 1/8 scale that is still at least the target size, and a
JPEG 2000 file at a reduced resolution level. A Lanczos resize then gives the
exact size.

Pillow rejects images above twice ``PIL.Image.MAX_IMAGE_PIXELS`` (about 179
megapixels by default) as decompression bombs, but archives hold larger scans.
:func:`configure_worker` therefore sets Pillow's limit to :data:`MAX_PIXELS` in
each process, and :func:`decode_image` enforces :data:`MAX_PIXELS` itself from
the header, before any pixel is decoded.
"""

from __future__ import annotations

import functools
import io
import logging
import os
import struct
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, TiffImagePlugin

logger = logging.getLogger(__name__)

MAX_PIXELS_ENV = "HERBRAY_MAX_PIXELS"
DEFAULT_MAX_PIXELS = 600_000_000

# Reason codes of ImageDecodeError, one per way an input can fail.
REASONS = (
    "empty_file",  # 0 bytes
    "truncated",  # the file ends early, for example after an interrupted copy
    "unidentified_image",  # not an image: random bytes, HTML, text
    "too_small",  # a side is below min_side
    "pixel_limit",  # more than MAX_PIXELS pixels
    "unsupported_compression",  # a real image whose codec this Pillow/libtiff build lacks
    "decode_failed",  # any other decoder error, with the decoder's message
)

# The lossless and hierarchical JPEG processes (SOF3, SOF5-7, SOF11, SOF13-15).
# libjpeg builds differ in which of them they decode, so a failed decode of one
# is reported as unsupported_compression.
_JPEG_SOF_UNSUPPORTED = frozenset({0xC3, 0xC5, 0xC6, 0xC7, 0xCB, 0xCD, 0xCE, 0xCF})
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}

# EXIF orientation value -> the transpose that makes the image upright.
_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_EXIF_ORIENTATION = 0x0112

# Brands in the ISO base media "ftyp" box. AVIF is HEIF with AV1 inside.
_AVIF_BRANDS = frozenset({b"avif", b"avis"})
_HEIF_BRANDS = frozenset({b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"})

_BMP_HEADER_SIZES = frozenset({12, 16, 40, 52, 56, 64, 108, 124})

# The final resize first shrinks by an integer factor with a box filter while
# the remaining scale stays above this gap, then applies Lanczos. Pillow's
# Image.resize documentation calls the result "indistinguishable from fair
# resampling in most cases" from 3.0 up. It is much faster for large reductions
# (PNG and TIFF, which have no decode-time scaling).
_REDUCING_GAP = 3.0


def _max_pixels_from_env() -> int:
    raw = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(raw)
    except ValueError:
        msg = (
            f"{MAX_PIXELS_ENV}={raw!r} is not an integer: set it to a pixel count "
            f"such as {DEFAULT_MAX_PIXELS}, or unset it for that default"
        )
        raise ValueError(msg) from None
    if value <= 0:
        msg = f"{MAX_PIXELS_ENV}={raw!r} must be a positive pixel count"
        raise ValueError(msg)
    return value


# Largest image, in pixels (width x height of the page decoded), that
# decode_image accepts. Larger ones raise ImageDecodeError(reason="pixel_limit").
# Set HERBRAY_MAX_PIXELS to change it. An RGBA page takes 4 bytes per pixel, so
# the default admits 2.4 GB of pixels for one image, and conversions add
# temporary copies. Lower it where workers have little memory.
MAX_PIXELS: int = _max_pixels_from_env()


class ImageDecodeError(ValueError):
    """An input that cannot be decoded, with ``reason`` set to one of :data:`REASONS`."""

    def __init__(self, reason: str, message: str) -> None:
        if reason not in REASONS:
            msg = f"unknown decode failure reason {reason!r}; expected one of {REASONS}"
            raise ValueError(msg)
        super().__init__(message)
        self.reason = reason
        self.message = message

    def __reduce__(self):
        # Ray pickles exceptions between processes, and the default reduction
        # would call __init__ with the message alone.
        return (type(self), (self.reason, self.message))


@dataclass
class DecodedImage:
    """One decoded scan and the facts about its source that a catalog records."""

    array: np.ndarray  # height x width x 3, uint8, C-contiguous, writable
    width: int  # of ``array``
    height: int  # of ``array``
    original_width: int  # of the full-resolution page, after EXIF orientation
    original_height: int
    format: str  # sniffed from the bytes: JPEG, PNG, TIFF, WEBP, JPEG2000, GIF, BMP, ...
    mode: str  # the Pillow mode of the source (CMYK, I;16, P, RGBA, ...)
    bit_depth: int  # bits per sample of the source: 8, 16, or 32 for integer/float samples
    orientation: int  # EXIF orientation tag 1-8 of the source, 1 when absent or invalid


def configure_worker() -> None:
    """Set this process's Pillow pixel limit to :data:`MAX_PIXELS`.

    Pillow's limit is a per-process global, so each Ray worker must set it:
    ``herbray.runtime`` names this function as Ray's
    ``worker_process_setup_hook``, and importing this module calls it too.
    ``DecompressionBombWarning`` is ignored because :func:`decode_image` checks
    the limit itself and raises ``pixel_limit``. Without this filter, a
    process that runs with ``-W error`` would turn the warning into an exception.
    """
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


configure_worker()


def sniff_format(data: bytes) -> str | None:
    """Return the image format that the leading bytes show, or None.

    Names follow Pillow's format ids (JPEG, PNG, TIFF, GIF, WEBP, BMP, JPEG2000,
    AVIF), plus HEIF and JXL, which need plugins. File names are never
    consulted, because archives hold PNGs and web pages saved as ``.jpg``.
    """
    head = bytes(data[:32])
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "TIFF"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head.startswith((b"\x00\x00\x00\x0cjP  \r\n\x87\n", b"\xff\x4f\xff\x51")):
        return "JPEG2000"
    if head.startswith((b"\xff\x0a", b"\x00\x00\x00\x0cJXL \r\n\x87\n")):
        return "JXL"
    if head[4:8] == b"ftyp":
        return _sniff_ftyp(data)
    # "BM" alone is too common at the start of text, so the DIB header size
    # must be one of the BMP versions' sizes too.
    if head[:2] == b"BM" and int.from_bytes(head[14:18], "little") in _BMP_HEADER_SIZES:
        return "BMP"
    return None


def _sniff_ftyp(data: bytes) -> str | None:
    box_size = int.from_bytes(data[0:4], "big")
    end = min(len(data), max(box_size, 16), 256)
    # Major brand at 8, then minor version, then the compatible brands.
    brands = {bytes(data[8:12])}
    brands.update(bytes(data[i : i + 4]) for i in range(16, end - 3, 4))
    if brands & _AVIF_BRANDS:
        return "AVIF"
    if brands & _HEIF_BRANDS:
        return "HEIF"
    return None


def decode_image(
    data: bytes,
    short_side: int | None = None,
    *,
    max_side: int | None = None,
    min_side: int = 32,
) -> DecodedImage:
    """Decode an encoded image into an upright RGB array, downscaled on request.

    Args:
        data: the file's bytes (or a bytearray or memoryview, which is copied).
            The format is sniffed from them.
        short_side: the shorter side of the result in pixels. None keeps the
            full size. Images are never upscaled.
        max_side: optional cap in pixels on the longer side of the result,
            applied together with ``short_side``. The tighter of the two wins.
        min_side: inputs with a side below this many pixels raise ``too_small``.

    The result is upright (EXIF orientation applied) and 8-bit RGB. 16-bit
    samples keep their top 8 bits. Alpha is composited onto white paper. CMYK,
    palette and grey images are converted. A multi-page TIFF gives its largest
    page, which is the full-resolution scan when the file also contains thumbnails.

    Raises:
        ImageDecodeError: the input is not a usable image; ``reason`` says why.
        ValueError: an argument is out of range.
    """
    _check_size_arguments(short_side, max_side, min_side)
    if not isinstance(data, bytes):
        data = bytes(data)  # bytearray or memoryview: the checks below need bytes methods
    if len(data) == 0:
        raise ImageDecodeError("empty_file", "the file is empty (0 bytes)")
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < MAX_PIXELS:
        # Something reset Pillow's global limit after import: restore it, or
        # scans between Pillow's default and MAX_PIXELS would fail to open.
        configure_worker()

    image_format = sniff_format(data)
    if image_format is None:
        raise ImageDecodeError("unidentified_image", _describe_non_image(data))
    Image.init()
    if image_format not in Image.OPEN:
        msg = (
            f"{image_format} images cannot be decoded by this Pillow build; "
            f"install the Pillow plugin for {image_format} or convert the file"
        )
        raise ImageDecodeError("unsupported_compression", msg)

    source = _load_source(data, image_format, short_side, max_side, min_side)
    img = _to_8bit(source.image, source.bit_depth)

    # Resize in the stored orientation, then transpose the small result.
    if img.size != source.resize_target:
        img = img.resize(
            source.resize_target,
            Image.Resampling.LANCZOS,
            box=source.box,
            reducing_gap=_REDUCING_GAP,
        )
    if source.transpose is not None:
        img = img.transpose(source.transpose)

    array = pil_to_rgb_array(img)
    return DecodedImage(
        array=array,
        width=array.shape[1],
        height=array.shape[0],
        original_width=source.original_size[0],
        original_height=source.original_size[1],
        format=image_format,
        mode=source.mode,
        bit_depth=source.bit_depth,
        orientation=source.orientation,
    )


def _check_size_arguments(short_side: int | None, max_side: int | None, min_side: int) -> None:
    for name, value in (("short_side", short_side), ("max_side", max_side)):
        if value is not None and (not isinstance(value, int) or value < 1):
            msg = f"{name} must be a positive number of pixels or None, got {value!r}"
            raise ValueError(msg)
    if not isinstance(min_side, int) or min_side < 1:
        msg = f"min_side must be a positive number of pixels, got {min_side!r}"
        raise ValueError(msg)


def _describe_non_image(data: bytes) -> str:
    head = bytes(data[:256]).lstrip()
    if head[:1] == b"<":
        kind = "HTML or XML text"
    elif head[:1] in (b"{", b"["):
        kind = "JSON text"
    else:
        kind = "no known image signature"
    return (
        f"not an image ({kind}; first bytes {bytes(data[:16])!r}); "
        "expected JPEG, PNG, TIFF, WebP, JPEG 2000, GIF or BMP"
    )


def target_size(
    width: int, height: int, short_side: int | None, max_side: int | None
) -> tuple[int, int]:
    """Return the (width, height) that :func:`decode_image` resizes an image to.

    The shorter side becomes ``short_side`` and the longer side at most
    ``max_side``, keeping the aspect ratio. The side that limits the scale is
    exact and the other is rounded. Sizes never grow.
    """
    scale = 1.0
    if short_side is not None:
        scale = min(scale, short_side / min(width, height))
    if max_side is not None:
        scale = min(scale, max_side / max(width, height))
    if scale >= 1.0:
        return width, height

    # Compute the limiting side exactly so that rounding cannot make it 383 or 385.
    if max_side is not None and scale == max_side / max(width, height):
        limit, limiting_width = max_side, width >= height
    else:
        limit, limiting_width = short_side, width <= height
    if limiting_width:
        return limit, max(1, round(height * limit / width))
    return max(1, round(width * limit / height)), limit


@dataclass
class _Source:
    """A loaded page and the facts about it that the conversion steps need."""

    image: Image.Image  # decoded, possibly at a reduced scale
    mode: str
    bit_depth: int
    orientation: int
    original_size: tuple[int, int]  # full resolution, upright
    resize_target: tuple[int, int]  # in the orientation that ``image`` is in
    box: tuple[float, float, float, float] | None  # region of ``image`` to resize from
    transpose: Image.Transpose | None  # still to apply after the resize


def _load_source(
    data: bytes,
    image_format: str,
    short_side: int | None,
    max_side: int | None,
    min_side: int,
) -> _Source:
    """Open the bytes, check the header, and decode the pixels at a reduced scale if possible."""
    try:
        img = Image.open(io.BytesIO(data), formats=[image_format])
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError("pixel_limit", f"{exc}; raise {MAX_PIXELS_ENV}") from exc
    except Exception as exc:
        # Pillow's plugins raise a wide, undocumented set of exception types on
        # corrupt input. Each becomes a reason code with the original message.
        raise _classify_open_error(exc, data, image_format) from exc

    with img:
        try:
            _select_largest_page(img)
        except Exception as exc:
            raise _classify_load_error(exc, data, image_format, img) from exc
        stored_size = _stored_size(img)
        _check_header_size(stored_size, min_side)
        mode = img.mode
        bit_depth = _source_bit_depth(img, data, image_format)
        try:
            if image_format == "PNG":
                # A PNG may store its EXIF chunk after the pixels, and Pillow's
                # getexif() loads them to find it.
                img.load()
            orientation = _read_orientation(img)
        except Exception as exc:
            raise _classify_load_error(exc, data, image_format, img) from exc

        # Sizes in the stored orientation let the decoder scale before rotation.
        rotated = orientation in (5, 6, 7, 8)
        original_size = stored_size[::-1] if rotated else stored_size
        target = target_size(*original_size, short_side, max_side)
        stored_target = target[::-1] if rotated else target
        box = None
        if stored_target != stored_size:
            box = _reduce_while_decoding(img, data, image_format, stored_target)
        _load_pixels(img, data, image_format)

    transpose = _ORIENTATION_TRANSPOSE.get(orientation)
    resize_target = stored_target
    if transpose is not None and image_format == "TIFF" and _EXIF_ORIENTATION not in img.tag_v2:
        # Pillow 13 applies a TIFF's orientation while loading it and then
        # deletes the tag. While the tag is still there, the transpose is ours.
        transpose, resize_target = None, target
    return _Source(
        image=img,
        mode=mode,
        bit_depth=bit_depth,
        orientation=orientation,
        original_size=original_size,
        resize_target=resize_target,
        box=box,
        transpose=transpose,
    )


def _stored_size(img: Image.Image) -> tuple[int, int]:
    """Return (width, height) of the page as stored, before any orientation."""
    if img.format == "TIFF":
        # Pillow 13 reports a TIFF's size after its orientation tag is applied.
        width = img.tag_v2.get(TiffImagePlugin.IMAGEWIDTH, img.size[0])
        height = img.tag_v2.get(TiffImagePlugin.IMAGELENGTH, img.size[1])
        return int(width), int(height)
    return img.size


def _check_header_size(size: tuple[int, int], min_side: int) -> None:
    width, height = size
    if width * height > MAX_PIXELS:
        msg = (
            f"{width}x{height} = {width * height} pixels is above the limit of "
            f"{MAX_PIXELS}; set {MAX_PIXELS_ENV} higher if the workers have the memory"
        )
        raise ImageDecodeError("pixel_limit", msg)
    if min(width, height) < min_side:
        msg = f"{width}x{height} pixels has a side below min_side={min_side}"
        raise ImageDecodeError("too_small", msg)


def _load_pixels(img: Image.Image, data: bytes, image_format: str) -> None:
    """Run the decoder and turn its failure, or a silently cut-off file, into a reason."""
    try:
        img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError("pixel_limit", f"{exc}; raise {MAX_PIXELS_ENV}") from exc
    except Exception as exc:
        raise _classify_load_error(exc, data, image_format, img) from exc
    if ImageFile.LOAD_TRUNCATED_IMAGES and _is_cut_off(data, image_format):
        # Another library switched on Pillow's global "load what is there"
        # mode, but a cut-off file must still not pass as a whole image.
        raise ImageDecodeError("truncated", _truncated_message(image_format))
    if image_format == "PNG" and _png_is_cut_off(data, fast=True):
        # Pillow decodes a PNG whose end chunk is missing without error.
        raise ImageDecodeError("truncated", _truncated_message(image_format))


def _select_largest_page(img: Image.Image) -> None:
    """Seek a multi-page TIFF to its page with the most pixels.

    Scanning software stores thumbnails and label crops as extra pages, in any
    order. Other multi-frame formats (GIF, MPO, animated WebP) keep the
    first frame, which is their primary image.
    """
    if img.format != "TIFF" or getattr(img, "n_frames", 1) <= 1:
        return
    best_page, best_pixels = 0, -1
    for page in range(img.n_frames):
        img.seek(page)
        pixels = img.size[0] * img.size[1]
        if pixels > best_pixels:
            best_page, best_pixels = page, pixels
    img.seek(best_page)


def _reduce_while_decoding(
    img: Image.Image, data: bytes, image_format: str, size: tuple[int, int]
) -> tuple[float, float, float, float] | None:
    """Ask the decoder for a reduced image still at least ``size``, and return its source box.

    JPEG: libjpeg's DCT scaling to 1/2, 1/4 or 1/8. JPEG 2000: a lower
    resolution level. Other formats decode at full size.
    """
    if image_format == "JPEG":
        drafted = img.draft("RGB", size)
        return None if drafted is None else drafted[1]
    if image_format == "JPEG2000":
        width, height = img.size
        # OpenJPEG fails on a reduction beyond the codestream's decomposition
        # levels, so the count is read from the main header first.
        available = _j2k_decomposition_levels(data)
        levels = 0
        while (
            levels < available
            and width >> (levels + 1) >= size[0]
            and height >> (levels + 1) >= size[1]
        ):
            levels += 1
        if levels:
            img.reduce = levels
            scale = 1 << levels
            return (0.0, 0.0, width / scale, height / scale)
    return None


def _j2k_decomposition_levels(data: bytes) -> int:
    """Return the wavelet decomposition levels of a JPEG 2000 codestream, 0 if unknown.

    The count is in the COD segment of the main header, which follows the SIZ
    segment. A JP2 file wraps the codestream in boxes, so the codestream is
    searched for.
    """
    start = data.find(b"\xff\x4f\xff\x51")  # SOC then SIZ
    if start < 0:
        return 0
    pos = start + 2
    while pos + 4 <= len(data):
        marker = data[pos + 1]
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if data[pos] != 0xFF or length < 2:
            return 0
        if marker == 0x52:  # COD: Lcod, Scod, progression, layers (2), MCT, levels
            levels_at = pos + 9
            return data[levels_at] if levels_at < len(data) else 0
        if marker in (0x90, 0x93):  # SOT or SOD: the main header ended without COD
            return 0
        pos += 2 + length
    return 0


def _read_orientation(img: Image.Image) -> int:
    try:
        value = img.getexif().get(_EXIF_ORIENTATION, 1)
    except (SyntaxError, ValueError, TypeError, KeyError, IndexError, struct.error) as exc:
        # A broken EXIF block must not cost the scan, so it is read as upright.
        logger.warning("ignoring unreadable EXIF data: %s: %s", type(exc).__name__, exc)
        return 1
    if isinstance(value, int) and value in _ORIENTATION_TRANSPOSE:
        return value
    return 1


def _source_bit_depth(img: Image.Image, data: bytes, image_format: str) -> int:
    """Return the bits per sample of the page, 8 for sources of 8 bits or fewer."""
    if img.mode.startswith("I;16"):
        return 16
    if img.mode == "F":
        return 32
    bits = 8
    if image_format == "PNG" and len(data) > 24:
        # IHDR is the first chunk, and its bit depth byte is at offset 24.
        bits = data[24]
    elif image_format == "TIFF":
        value = img.tag_v2.get(TiffImagePlugin.BITSPERSAMPLE, 8)
        bits = max(value) if isinstance(value, tuple) else int(value)
    elif img.mode == "I":
        bits = 32
    return 8 if bits <= 8 else bits


def _to_8bit(img: Image.Image, bit_depth: int) -> Image.Image:
    """Convert any Pillow mode to L, LA, RGB or RGBA with 8 bits per sample.

    16-bit samples keep their top 8 bits (value >> 8), so mid grey stays mid
    grey. Pillow's own conversion clips them, which turns most of a 16-bit
    scan white.
    """
    mode = img.mode
    if mode in ("L", "RGB"):
        if "transparency" in img.info:
            # A PNG colour key (tRNS chunk) marks one grey level or colour as transparent.
            return img.convert("RGBA")
        return img
    if mode in ("LA", "RGBA"):
        return img
    if mode == "1":
        return img.convert("L")
    if mode in ("P", "PA"):
        palette_alpha = img.palette is not None and img.palette.mode.endswith("A")
        has_alpha = mode == "PA" or palette_alpha or "transparency" in img.info
        return img.convert("RGBA" if has_alpha else "RGB")
    if mode == "La":
        return img.convert("LA")
    if mode == "RGBa":
        return img.convert("RGBA")
    if mode.startswith("I;16") or mode in ("I", "F"):
        return Image.fromarray(scale_to_uint8(np.asarray(img), bit_depth))
    try:
        # CMYK, YCbCr, LAB, HSV and RGBX. Pillow's JPEG reader undoes Adobe's
        # inverted CMYK.
        # NOTE: Pillow reads every 4-channel JPEG with Adobe's polarity, so a
        # CMYK JPEG from a writer that does not invert comes out as a negative.
        return img.convert("RGB")
    except ValueError as exc:
        msg = f"cannot convert Pillow mode {mode!r} to RGB: {exc}"
        raise ImageDecodeError("decode_failed", msg) from exc


def scale_to_uint8(samples: np.ndarray, bit_depth: int) -> np.ndarray:
    """Scale integer or float samples to uint8 by value, never by clipping.

    Integers of ``bit_depth`` bits keep their top 8 bits, and negative values
    become 0. For 32-bit integers the smallest of the 8-, 16- and 31-bit ranges
    that contains the largest sample is used. Floats in [0, 1] are multiplied by
    255. Other floats are stretched from their finite minimum and maximum to
    0-255, and NaN or infinity becomes 0.
    """
    if samples.dtype.kind == "f":
        values = samples.astype(np.float64)
        finite = np.isfinite(values)
        if not finite.any():
            return np.zeros(samples.shape, np.uint8)
        low, high = float(values[finite].min()), float(values[finite].max())
        if low < 0.0 or high > 1.0:
            values = (values - low) / (high - low) if high > low else values - low
        values = np.where(finite, values, 0.0)
        return np.rint(np.clip(values, 0.0, 1.0) * 255.0).astype(np.uint8)

    values = samples.astype(np.int64)
    if bit_depth >= 32:
        # 32-bit integer pages (Pillow mode "I") rarely use their full range
        # and often hold 8- or 16-bit data.
        largest = int(values.max()) if values.size else 0
        bit_depth = next(bits for bits in (8, 16, 31) if largest < (1 << bits))
    values = np.clip(values, 0, (1 << bit_depth) - 1)
    return (values >> max(bit_depth - 8, 0)).astype(np.uint8)


def pil_to_rgb_array(img: Image.Image) -> np.ndarray:
    """Convert a Pillow image of any mode to an H x W x 3 uint8 array.

    Alpha is composited onto white, as scans are of paper. 16-bit, 32-bit and
    float samples are scaled by value (see :func:`scale_to_uint8`). The array
    is C-contiguous and writable, so ``torch.from_numpy`` can share it.
    """
    if img.mode not in ("L", "LA", "RGB", "RGBA") or "transparency" in img.info:
        img = _to_8bit(img, _bit_depth_of_mode(img.mode))
    if img.mode in ("LA", "RGBA"):
        paper = Image.new("RGB", img.size, (255, 255, 255))
        paper.paste(img.convert("RGB"), mask=img.getchannel("A"))
        img = paper
    elif img.mode == "L":
        img = img.convert("RGB")
    return np.array(img, dtype=np.uint8, order="C")


def _bit_depth_of_mode(mode: str) -> int:
    if mode.startswith("I;16"):
        return 16
    if mode in ("I", "F"):
        return 32
    return 8


def encode_jpeg(array: np.ndarray, quality: int = 90) -> bytes:
    """Encode an H x W x 3 uint8 array as a baseline RGB JPEG with 4:2:0 chroma.

    Huffman optimisation is off because it costs another pass over the data
    and saved only 3-4 % of the bytes on 384-px herbarium sheets (six MICH
    sheets, measured with Pillow 13).
    """
    if not isinstance(array, np.ndarray) or array.ndim != 3 or array.shape[2] != 3:
        shape = getattr(array, "shape", type(array).__name__)
        msg = f"expected an H x W x 3 array, got shape {shape}"
        raise ValueError(msg)
    if array.dtype != np.uint8:
        msg = f"expected a uint8 array, got dtype {array.dtype}; scale it to 0-255 first"
        raise ValueError(msg)
    if not 1 <= quality <= 100:
        msg = f"quality must be in 1-100, got {quality}"
        raise ValueError(msg)
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(
        buffer, "JPEG", quality=quality, optimize=False, subsampling="4:2:0"
    )
    return buffer.getvalue()


# --- Telling a cut-off file from a corrupt or unsupported one -----------------
#
# Pillow reports these cases with the same few exception types, so the
# classifiers below look at the file's structure when a decode fails.


def _truncated_message(image_format: str) -> str:
    return f"the {image_format} file is cut off before its end; copy it again from the source"


def _classify_open_error(exc: Exception, data: bytes, image_format: str) -> ImageDecodeError:
    detail = f"{type(exc).__name__}: {exc}"
    if "truncated" in str(exc).lower() or _is_cut_off(data, image_format):
        return ImageDecodeError("truncated", f"{_truncated_message(image_format)} ({detail})")
    if image_format == "JPEG":
        unsupported = _jpeg_unsupported_process(data)
        if unsupported:
            return ImageDecodeError("unsupported_compression", f"{unsupported} ({detail})")
    if image_format == "TIFF":
        compression = _tiff_first_compression(data)
        if compression is not None and compression not in TiffImagePlugin.COMPRESSION_INFO:
            msg = f"TIFF compression {compression} is not supported by Pillow ({detail})"
            return ImageDecodeError("unsupported_compression", msg)
    if isinstance(exc, Image.UnidentifiedImageError):
        msg = f"the bytes start like a {image_format} file but Pillow cannot read it ({detail})"
        return ImageDecodeError("unidentified_image", msg)
    return ImageDecodeError("decode_failed", detail)


def _classify_load_error(
    exc: Exception, data: bytes, image_format: str, img: Image.Image
) -> ImageDecodeError:
    detail = f"{type(exc).__name__}: {exc}"
    if "truncated" in str(exc).lower() or _is_cut_off(data, image_format, img):
        return ImageDecodeError("truncated", f"{_truncated_message(image_format)} ({detail})")
    if image_format == "JPEG":
        unsupported = _jpeg_unsupported_process(data)
        if unsupported:
            return ImageDecodeError("unsupported_compression", f"{unsupported} ({detail})")
    if image_format == "TIFF":
        name = img.info.get("compression")
        if isinstance(name, str) and not _tiff_codec_available(name):
            msg = f"TIFF compression {name!r} is not available in this Pillow/libtiff build"
            return ImageDecodeError("unsupported_compression", f"{msg} ({detail})")
    return ImageDecodeError("decode_failed", detail)


def _is_cut_off(data: bytes, image_format: str, img: Image.Image | None = None) -> bool:
    if image_format == "JPEG":
        return _jpeg_is_cut_off(data)
    if image_format == "PNG":
        return _png_is_cut_off(data)
    if image_format == "TIFF":
        return _tiff_is_cut_off(data, img)
    return False


def _jpeg_markers(data: bytes):
    """Yield (marker, segment start, segment end) for each JPEG marker segment.

    Entropy-coded data after each SOS is skipped. Yields ``(None, n, n)`` when
    the data ends before the end-of-image marker, and stops early on a byte
    that is not a marker (a corrupt file rather than a short one).
    """
    n = len(data)
    pos = 2
    while pos < n:
        if data[pos] != 0xFF:
            return
        while pos < n and data[pos] == 0xFF:
            pos += 1  # fill bytes
        if pos >= n:
            break
        marker = data[pos]
        pos += 1
        if marker == 0xD9:
            yield marker, pos, pos
            return
        if 0xD0 <= marker <= 0xD7 or marker in (0x01, 0xD8):
            continue
        if pos + 2 > n:
            break
        length = int.from_bytes(data[pos : pos + 2], "big")
        if length < 2:
            return
        end = pos + length
        if end > n:
            break
        yield marker, pos + 2, end
        pos = end
        if marker == 0xDA:
            # Skip the scan data: 0xFF is followed by 0x00 (a stuffed byte),
            # a restart marker, or the next marker.
            while True:
                pos = data.find(b"\xff", pos)
                if pos < 0 or pos + 1 >= n:
                    yield None, n, n
                    return
                following = data[pos + 1]
                if following == 0x00 or 0xD0 <= following <= 0xD7:
                    pos += 2
                elif following == 0xFF:
                    pos += 1
                else:
                    break
    yield None, n, n


def _jpeg_is_cut_off(data: bytes) -> bool:
    return any(marker is None for marker, _, _ in _jpeg_markers(data))


def _jpeg_unsupported_process(data: bytes) -> str | None:
    """Describe the JPEG's coding process if Pillow cannot decode it, else None."""
    for marker, start, end in _jpeg_markers(data):
        if marker in _JPEG_SOF and end > start:
            precision = data[start]
            if precision != 8:
                return f"{precision}-bit JPEG is not supported by Pillow (only 8-bit)"
            if marker in _JPEG_SOF_UNSUPPORTED:
                return f"lossless or hierarchical JPEG (SOF{marker - 0xC0}) is not supported"
            return None
    return None


_PNG_IEND_CHUNK = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # length 0, type, CRC


def _png_is_cut_off(data: bytes, *, fast: bool = False) -> bool:
    """Return True when the PNG's chunk list ends before its IEND chunk.

    ``fast`` first looks for IEND in the last 4 KiB, which settles the common
    complete file without walking every chunk.
    """
    if fast and data.rfind(_PNG_IEND_CHUNK, max(0, len(data) - 4096)) >= 0:
        return False
    n = len(data)
    pos = 8
    while pos + 8 <= n:
        length = int.from_bytes(data[pos : pos + 4], "big")
        chunk_type = data[pos + 4 : pos + 8]
        pos += 12 + length  # length, type, data, CRC
        if pos > n:
            return True
        if chunk_type == b"IEND":
            return False
    return True


def _tiff_header(data: bytes) -> tuple[str, bool, int] | None:
    """Return (byte order, is BigTIFF, first IFD offset), or None if the header is short."""
    order = "<" if data[:2] == b"II" else ">"
    big = data[2:4] in (b"+\x00", b"\x00+")
    if big:
        if len(data) < 16:
            return None
        return order, True, struct.unpack(order + "Q", data[8:16])[0]
    if len(data) < 8:
        return None
    return order, False, struct.unpack(order + "I", data[4:8])[0]


# Bytes per value of each TIFF field type (TIFF 6.0 and BigTIFF).
_TIFF_TYPE_SIZES = {
    1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4,
    16: 8, 17: 8, 18: 8,
}  # fmt: skip


@dataclass
class _TiffEntry:
    tag: int
    field_type: int
    count: int
    value_at: int  # file offset of the value, inline in the entry or out of line


def _tiff_first_ifd(data: bytes) -> list[_TiffEntry] | None:
    """Parse the entries of the first IFD, or return None if the file ends inside them."""
    header = _tiff_header(data)
    if header is None:
        return None
    order, big, offset = header
    count_code, count_size, entry_size, inline_size = ("Q", 8, 20, 8) if big else ("H", 2, 12, 4)
    value_code = "Q" if big else "I"
    if offset + count_size > len(data):
        return None
    count = struct.unpack(order + count_code, data[offset : offset + count_size])[0]
    table = offset + count_size
    if table + count * entry_size > len(data):
        return None

    entries = []
    for index in range(count):
        entry = table + index * entry_size
        tag, field_type = struct.unpack(order + "HH", data[entry : entry + 4])
        value_count = struct.unpack(order + value_code, data[entry + 4 : entry + 4 + inline_size])[
            0
        ]
        value_field = entry + 4 + inline_size
        size = value_count * _TIFF_TYPE_SIZES.get(field_type, 1)
        if size <= inline_size:
            value_at = value_field
        else:
            value_at = struct.unpack(
                order + value_code, data[value_field : value_field + inline_size]
            )[0]
        entries.append(_TiffEntry(tag, field_type, value_count, value_at))
    return entries


def _tiff_is_cut_off(data: bytes, img: Image.Image | None) -> bool:
    n = len(data)
    entries = _tiff_first_ifd(data)
    if entries is None:
        return True
    for entry in entries:
        size = entry.count * _TIFF_TYPE_SIZES.get(entry.field_type, 1)
        if entry.value_at + size > n:
            return True
    if img is None:
        return False

    # The current page's strips or tiles must lie inside the file.
    tags = img.tag_v2
    for offsets_tag, counts_tag in ((273, 279), (324, 325)):
        offsets, counts = tags.get(offsets_tag), tags.get(counts_tag)
        if offsets is None or counts is None:
            continue
        offsets = offsets if isinstance(offsets, tuple) else (offsets,)
        counts = counts if isinstance(counts, tuple) else (counts,)
        if any(start + length > n for start, length in zip(offsets, counts, strict=False)):
            return True
    return False


def _tiff_first_compression(data: bytes) -> int | None:
    """Read the Compression tag (259) of the first IFD, or return None if it is unreadable."""
    entries = _tiff_first_ifd(data)
    if entries is None:
        return None
    order = "<" if data[:2] == b"II" else ">"
    for entry in entries:
        if entry.tag != 259:
            continue
        code = {3: "H", 4: "I"}.get(entry.field_type)
        size = _TIFF_TYPE_SIZES.get(entry.field_type, 0)
        if code is None or entry.value_at + size > len(data):
            return None
        return struct.unpack(order + code, data[entry.value_at : entry.value_at + size])[0]
    return 1  # no tag: uncompressed


# Pillow's save() names for TIFF compressions and the mode each one encodes.
_TIFF_PROBE_MODES = {
    "tiff_lzw": "RGB",
    "tiff_adobe_deflate": "RGB",
    "tiff_deflate": "RGB",
    "jpeg": "RGB",
    "packbits": "RGB",
    "lzma": "RGB",
    "zstd": "RGB",
    "webp": "RGB",
    "group3": "1",
    "group4": "1",
    "tiff_ccitt": "1",
}


@functools.cache
def _tiff_codec_available(name: str) -> bool:
    """Return whether this libtiff build decodes TIFF compression ``name``.

    libtiff reports a missing codec only on stderr, so a small image is
    encoded and decoded with it once per process. Compressions that Pillow
    cannot write are assumed present.
    """
    mode = _TIFF_PROBE_MODES.get(name)
    if mode is None:
        return True
    buffer = io.BytesIO()
    try:
        Image.new(mode, (16, 16)).save(buffer, "TIFF", compression=name)
        with Image.open(io.BytesIO(buffer.getvalue())) as probe:
            probe.load()
    except (OSError, ValueError, KeyError) as exc:
        logger.info("TIFF compression %r is not available: %s", name, exc)
        return False
    return True
