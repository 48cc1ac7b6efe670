"""Reading and decoding one scan by URI, with every failure turned into a reason code.

Prepare and label call :func:`load_scan` inside their Ray Data map stages, so a
bad input becomes one error row and the rest of the batch goes on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from herbray import storage
from herbray.imaging import DecodedImage, ImageDecodeError, decode_image

logger = logging.getLogger(__name__)

# Reasons for failures before decoding; decoding adds herbray.imaging.REASONS.
READ_REASONS = (
    "no_media",  # the record names no image
    "not_found",  # the path or object does not exist (deleted since listing, for example)
    "read_failed",  # permission, network or storage error while reading
    "internal_error",  # an unexpected exception in herbray; the message has its type
)


@dataclass
class ScanResult:
    """A decoded scan, or the reason it could not be decoded."""

    image: DecodedImage | None
    error: str | None = None  # reason code
    message: str | None = None  # human-readable detail

    @property
    def ok(self) -> bool:
        return self.image is not None


def load_scan(
    uri: str | None,
    short_side: int | None,
    *,
    max_side: int | None = None,
    min_side: int = 32,
) -> ScanResult:
    """Read the bytes at ``uri`` and decode them to RGB with decode-time downscaling."""
    if not uri:
        return ScanResult(None, "no_media", "the record has no image URI")
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError as exc:
        return ScanResult(None, "not_found", str(exc))
    except OSError as exc:
        return ScanResult(None, "read_failed", storage.redact(str(exc)))
    try:
        return ScanResult(decode_image(data, short_side, max_side=max_side, min_side=min_side))
    except ImageDecodeError as exc:
        return ScanResult(None, exc.reason, exc.message)
    except MemoryError:
        return ScanResult(
            None, "pixel_limit", "out of memory while decoding; lower HERBRAY_MAX_PIXELS"
        )
    except Exception as exc:  # one broken scan must not stop a million-image job
        logger.exception("unexpected error decoding %s", storage.redact(uri))
        return ScanResult(None, "internal_error", f"{type(exc).__name__}: {exc}")
