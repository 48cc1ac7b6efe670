"""The ``herbray`` command: one subcommand per pipeline stage.

Each subcommand parses its options here and calls the library; ``jobs/*.py``
call :func:`main` so that ``ray job submit`` and the console share one parser.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from herbray import __version__
from herbray.catalog import SourceOptions
from herbray.config import ConfigError, add_arguments, resolve


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
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_catalog(commands)
    _add_job(
        commands,
        "prepare",
        "decode, resize and shard a labelled collection for training",
        "herbray.prepare:PrepareConfig",
        _run_prepare,
    )
    _add_job(
        commands,
        "train",
        "fine-tune a species classifier on prepared shards with Ray Train",
        "herbray.train:TrainConfig",
        _run_train,
    )
    _add_job(
        commands,
        "label",
        "label a digitized archive with species suggestions, into Parquet",
        "herbray.label:LabelConfig",
        _run_label,
    )
    _add_job(
        commands,
        "evaluate",
        "measure a model on labelled specimens and choose the label threshold",
        "herbray.evaluate:EvaluateConfig",
        _run_evaluate,
    )
    _add_job(
        commands,
        "demo",
        "run the whole pipeline on a generated offline demo collection",
        "herbray.demo:DemoConfig",
        _run_demo,
    )
    _add_export(commands)
    return parser


def _add_export(commands) -> None:
    parser = commands.add_parser(
        "export",
        help="export label rows as a Darwin Core Archive or CSV",
        description="Export the rows of a herbray label output folder for a collection "
        "database: a Darwin Core Archive (occurrences with the current identification, "
        "Identification History with the top-k) or one CSV.",
    )
    parser.add_argument("labels", help="output folder of herbray label")
    parser.add_argument(
        "--format",
        choices=("dwca", "csv"),
        default="dwca",
        help="dwca: zipped Darwin Core Archive; csv: one flat CSV (default: dwca)",
    )
    parser.add_argument("--output", required=True, help="file to write (.zip or .csv)")
    parser.set_defaults(run=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from herbray.export import export_csv, export_dwca

    if args.format == "dwca":
        count = export_dwca(args.labels, args.output)
    else:
        count = export_csv(args.labels, args.output)
    print(f"herbray export: {count} rows -> {args.output}")
    return 0


def _import(path: str):
    import importlib

    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def _add_job(commands, name: str, help_text: str, config_path: str, run) -> None:
    """Add a job subcommand whose options are the fields of its config dataclass."""
    config_class = _import(config_path)
    parser = commands.add_parser(name, help=help_text, description=config_class.__doc__)
    parser.add_argument(
        "--config",
        help="YAML file of settings; command-line options override it",
    )
    add_arguments(parser, config_class)
    parser.set_defaults(run=run, config_class=config_class)


def _run_train(args: argparse.Namespace) -> int:
    from herbray.train import train

    result = train(resolve(args.config_class, args, args.config))
    print(result.summary_line())
    return 0


def _run_label(args: argparse.Namespace) -> int:
    from herbray.label import label

    result = label(resolve(args.config_class, args, args.config))
    print(result.summary_line())
    return 0


def _run_evaluate(args: argparse.Namespace) -> int:
    from herbray.evaluate import evaluate

    result = evaluate(resolve(args.config_class, args, args.config))
    print(result.summary_line())
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    from herbray.demo import run_demo

    outputs = run_demo(resolve(args.config_class, args, args.config))
    print(f"herbray demo finished in {outputs.pop('seconds')} s")
    summary = outputs.pop("evaluation summary")
    for name, path in outputs.items():
        print(f"  {name:16} {path}")
    if summary:
        print(summary)
    return 0


def _run_prepare(args: argparse.Namespace) -> int:
    from herbray.prepare import prepare

    result = prepare(resolve(args.config_class, args, args.config))
    print(result.summary_line())
    return 0


def _add_catalog(commands) -> None:
    parser = commands.add_parser(
        "catalog",
        help="read a collection and summarise it",
        description="Read a collection (folder tree, manifest, Darwin Core Archive or FGVC "
        "metadata; local or s3://) and print images, species, groups and skipped files.",
    )
    parser.add_argument("source", help="collection folder, manifest, archive or metadata file")
    add_arguments(parser.add_argument_group("reading the collection"), SourceOptions)
    parser.add_argument("--output", help="write the catalog table to this Parquet file")
    parser.add_argument("--labels", help="write the species <-> index map to this labels.json")
    parser.add_argument(
        "--split",
        action="store_true",
        help="add a train/val/test split column (grouped by --group-column) and summarise it",
    )
    parser.add_argument(
        "--split-fractions",
        default="0.7,0.15,0.15",
        type=_fractions,
        help="train,val,test shares per species (default: 0.7,0.15,0.15)",
    )
    parser.add_argument("--seed", type=int, default=0, help="split seed (default: 0)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.set_defaults(run=_run_catalog)


def _fractions(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected three numbers like 0.7,0.15,0.15, got {text!r}")
    return values  # type: ignore[return-value]


def _run_catalog(args: argparse.Namespace) -> int:
    from herbray.splits import assign_splits
    from herbray.taxonomy import LabelMap

    catalog = resolve(SourceOptions, args).read_source(args.source)
    summary = catalog.summary()
    if args.split:
        table, report = assign_splits(
            catalog.images(),
            group_column=catalog.group_column,
            fractions=args.split_fractions,
            seed=args.seed,
        )
        catalog.table = table
        summary["split"] = report.to_json()
    if args.output:
        catalog.write_parquet(args.output)
    if args.labels:
        LabelMap.from_names(catalog.images().column("scientific_name").to_pylist()).save(
            args.labels
        )
    if args.json:
        print(json.dumps(summary, ensure_ascii=False, indent=1))
    else:
        print(format_summary(summary))
        if args.output:
            print(f"table      {args.output}")
        if args.labels:
            print(f"labels     {args.labels}")
    return 0


def format_summary(summary: dict) -> str:
    """Format the catalog summary as aligned text lines."""
    per = summary["images_per_species"]
    skipped = summary["skipped"]
    lines = [
        f"source     {summary['source']} ({summary['format']})",
        f"records    {summary['records']} ({summary['records_without_media']} without an image)",
        f"images     {summary['images']} ({summary['labelled_images']} with a species)",
        f"species    {summary['species']}"
        + (
            f"; images per species min {per['min']} / median {per['median']} / max {per['max']}"
            if summary["species"]
            else ""
        ),
        f"groups     {summary['groups']} (by {summary['group_column']})",
        "skipped    "
        + (
            f"{sum(skipped.values())}: " + ", ".join(f"{k} {v}" for k, v in skipped.items())
            if skipped
            else "0"
        ),
    ]
    if "species_in_all_records" in summary:
        lines.append(f"species    {summary['species_in_all_records']} in all records")
    lines += [f"note       {note}" for note in summary["notes"]]
    split = summary.get("split")
    if split:
        images, groups = split["images"], split["groups"]
        lines.append(
            "split      "
            + ", ".join(f"{s} {images[s]} images / {groups[s]} groups" for s in images)
        )
        if split["train_only_species"]:
            lines.append(
                f"           {len(split['train_only_species'])} species in training only "
                f"(too few groups): {', '.join(split['train_only_species'][:10])}"
            )
        if split["species_without_train"]:
            lines.append(
                f"           {len(split['species_without_train'])} species without training "
                f"images: {', '.join(split['species_without_train'][:10])}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from herbray.catalog import CatalogError
    from herbray.storage import StorageError

    parser = build_parser()
    args = parser.parse_args(argv)
    # The level applies to herbray's loggers only: other libraries stay at WARNING,
    # because botocore at DEBUG would log request headers with the access key id.
    logging.basicConfig(level="WARNING", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("herbray").setLevel(args.log_level)
    try:
        return int(args.run(args) or 0)
    except (CatalogError, ConfigError, StorageError, FileNotFoundError, ValueError) as exc:
        # Input problems (herbray raises ValueError for invalid inputs and outputs)
        # get one clear line; --log-level DEBUG shows the traceback too.
        logging.getLogger("herbray").debug("traceback", exc_info=exc)
        print(f"herbray {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
