"""Time herbray's scan decoder against a naive full decode, side by side.

    .venv/bin/python bench/decode.py                      # a generated 4000x6000 JPEG
    .venv/bin/python bench/decode.py ../shared/data/sheets/vouchervision/*.jpg
    .venv/bin/python bench/decode.py --short-side 256 --repeats 7 scan.tif

The naive way is ``Image.open(...).convert("RGB").resize(size, LANCZOS)``,
which decodes every pixel; ``decode_image`` decodes a JPEG at a DCT-scaled
size first. Both give the same output size. The two are run alternately and
the median of each is printed with their ratio, because absolute times on a
shared machine vary by up to 2x between runs.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image

from herbray.imaging import decode_image, target_size


def make_scan_jpeg(width: int = 4000, height: int = 6000, quality: int = 90) -> bytes:
    """Encode a synthetic sheet: off-white paper with grain, dark blobs and fine noise.

    Sensor noise and texture make the JPEG large (about 8 MB at 4000x6000 and
    quality 90), like a master scan, because decode time grows with the coded data.
    """
    rng = np.random.default_rng(0)
    small = rng.normal(0.0, 1.0, (height // 16, width // 16, 3))
    texture = np.asarray(
        Image.fromarray(np.uint8(np.clip(128 + 40 * small, 0, 255))).resize(
            (width, height), Image.Resampling.BILINEAR
        ),
        dtype=np.int16,
    )
    paper = np.array([236, 230, 212], dtype=np.int16)
    image = paper + (texture - 128) // 2
    image += rng.integers(-12, 13, (height, width, 1), dtype=np.int16)
    for _ in range(60):
        x, y = rng.integers(0, width - 400), rng.integers(0, height - 400)
        image[y : y + rng.integers(40, 400), x : x + rng.integers(40, 400)] -= 120
    buffer = io.BytesIO()
    Image.fromarray(np.uint8(np.clip(image, 0, 255))).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def decode_naive(data: bytes, short_side: int) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        rgb = img.convert("RGB")
    size = target_size(*rgb.size, short_side, None)
    return np.asarray(rgb.resize(size, Image.Resampling.LANCZOS))


def compare(name: str, data: bytes, short_side: int, repeats: int) -> None:
    naive_times, herbray_times = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        naive = decode_naive(data, short_side)
        naive_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        decoded = decode_image(data, short_side)
        herbray_times.append(time.perf_counter() - start)
    assert naive.shape == decoded.array.shape, (naive.shape, decoded.array.shape)
    difference = np.abs(naive.astype(np.int16) - decoded.array).mean()
    naive_ms = 1000 * statistics.median(naive_times)
    herbray_ms = 1000 * statistics.median(herbray_times)
    print(
        f"{name}: {decoded.original_width}x{decoded.original_height} -> "
        f"{decoded.width}x{decoded.height}  naive {naive_ms:.0f} ms  "
        f"decode_image {herbray_ms:.0f} ms  ratio {naive_ms / herbray_ms:.1f}x  "
        f"mean |difference| {difference:.2f} of 255"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="*", type=Path, help="image files (default: generated)")
    parser.add_argument(
        "--short-side", type=int, default=384, help="short side of the output, in pixels"
    )
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed runs of each variant per image"
    )
    args = parser.parse_args()

    if args.images:
        for path in args.images:
            compare(path.name, path.read_bytes(), args.short_side, args.repeats)
    else:
        data = make_scan_jpeg()
        print(f"generated 4000x6000 JPEG, quality 90: {len(data) / 1e6:.1f} MB")
        compare("generated", data, args.short_side, args.repeats)


if __name__ == "__main__":
    main()
