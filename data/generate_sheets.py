"""Write large synthetic herbarium sheets for benchmarks (default 4000x6000, 24 MP).

Usage::

    python data/generate_sheets.py bench-sheets --count 20
    python data/generate_sheets.py bench-sheets --count 100 --size 2000x3000 --seed 7

Writes ``sheet-NNNNN.jpg`` files and a ``manifest.csv`` (image_path,
scientific_name, specimen_id, recorded_by) that the manifest reader takes.
At 24 MP a sheet takes about a second to render and 3 MB on disk.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

# Lets the script run from a plain clone, before `pip install -e .`.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from herbray import synthetic


def sheet_size(text: str) -> tuple[int, int]:
    try:
        return synthetic.parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", metavar="OUT_DIR", help="folder to write the sheets into")
    parser.add_argument("--count", type=int, default=10, help="number of sheets (default: 10)")
    parser.add_argument(
        "--size",
        type=sheet_size,
        default=(4000, 6000),
        help="sheet size in pixels as WIDTHxHEIGHT (default: 4000x6000)",
    )
    parser.add_argument(
        "--species",
        type=int,
        default=6,
        help=f"demo species to cycle through, 1 to {len(synthetic.SPECIES)} (default: 6)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument(
        "--quality",
        type=int,
        default=synthetic.DEFAULT_JPEG_QUALITY,
        help=f"JPEG quality, 1 to 100 (default: {synthetic.DEFAULT_JPEG_QUALITY})",
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="processes to render with (default: one per CPU)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        summary = synthetic.generate_sheets(
            args.out_dir,
            args.count,
            size=args.size,
            n_species=args.species,
            seed=args.seed,
            quality=args.quality,
            workers=args.workers,
        )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
