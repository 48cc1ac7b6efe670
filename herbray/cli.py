"""The ``herbray`` command: one subcommand per pipeline stage.

Each subcommand parses its options here and calls the library; ``jobs/*.py``
call :func:`main` so that ``ray job submit`` and the console share one parser.
"""

from __future__ import annotations

import argparse
import logging
import sys

from herbray import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="herbray",
        description="Identify plant species on digitized herbarium specimens, on Ray.",
    )
    parser.add_argument("--version", action="version", version=f"herbray {__version__}")
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging level of herbray's own messages (default: INFO)",
    )
    parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
