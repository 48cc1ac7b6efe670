"""Generate the offline demo collection: labelled sheets plus a held-out archive.

Usage::

    python data/generate_demo.py demo-data
    python data/generate_demo.py demo-data --species 12 --sheets 40 --archive 10 --size 1024x1536

Writes ``demo-data/collection/<scientific name>/<uuid>.jpg`` with Herbaria255-style
sidecar XML, ``demo-data/archive/box-NN/*.jpg`` and ``demo-data/archive-truth.csv``.
The species are fictional (see ``herbray.synthetic``); the output is the same for
the same options and seed.
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
    parser.add_argument("out_dir", metavar="OUT_DIR", help="folder to write the demo into")
    parser.add_argument(
        "--species",
        type=int,
        default=6,
        help=f"number of demo species, 1 to {len(synthetic.SPECIES)} (default: 6)",
    )
    parser.add_argument(
        "--sheets", type=int, default=20, help="labelled sheets per species (default: 20)"
    )
    parser.add_argument(
        "--archive",
        type=int,
        default=5,
        help="held-out unlabelled archive sheets per species (default: 5)",
    )
    parser.add_argument(
        "--size",
        type=sheet_size,
        default=synthetic.DEFAULT_SIZE,
        help="sheet size in pixels as WIDTHxHEIGHT (default: 1200x1800)",
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
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a demo already in OUT_DIR"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        summary = synthetic.generate_collection(
            args.out_dir,
            n_species=args.species,
            sheets_per_species=args.sheets,
            archive_per_species=args.archive,
            size=args.size,
            seed=args.seed,
            quality=args.quality,
            workers=args.workers,
            overwrite=args.overwrite,
        )
    except (ValueError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
