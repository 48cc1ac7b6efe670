"""herbray prepare: decode each scan once, reduced, and write compact training shards.

Pipeline: catalog -> species indices and splits (driver) -> Ray Data: read the
bytes and decode in one map stage (JPEG decode-time downscaling), resize to a
short side, encode JPEG -> Parquet shards per split, plus an errors table.

Output folder (local or ``s3://``)::

    prepare.json     written last: its presence marks a complete run
    labels.json      species <-> index map
    report.json      counts per species and split, errors per reason, skipped files
    splits/{train,val,test}.parquet  each split's catalog rows without images: manifests
    config.yaml      the resolved settings
    errors.parquet   one row per input that failed, with its reason
    shards/{train,val,test}/*.parquet

Running again into the same folder replaces the shards (overwrite), so rows are
never duplicated. A run first removes ``prepare.json`` and writes the new shards
into a staging folder, so an interrupted run leaves no output that a training
job would accept.
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
import warnings
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from herbray import config as cfg
from herbray import storage
from herbray.catalog import Catalog, SourceOptions
from herbray.config import option
from herbray.splits import DEFAULT_FRACTIONS, SPLITS, assign_splits
from herbray.taxonomy import LabelMap

logger = logging.getLogger(__name__)

PREPARED_FORMAT = "herbray-prepared"
ERROR_PART = "errors"
IMAGE_COLUMN = "image"
# CPUs that each Parquet write task requests from Ray. With 1 CPU, Ray Data 2.60
# reserves CPUs for the write operator for the whole run, although its tasks wait
# for min_rows_per_file rows: only one decode task ran at a time on a 2-CPU Ray,
# and five on an 8-CPU one. With 0, every CPU is free for decoding, and the few
# write tasks of a run, which mostly copy JPEG bytes into Parquet, share the CPUs.
WRITE_TASK_CPUS = 0
# Columns prepare adds to the catalog columns of each row. A source column with
# one of these names is kept as source_<name>.
ADDED_COLUMNS = (
    "image",
    "width",
    "height",
    "original_width",
    "original_height",
    "error",
    "error_message",
    "part",
    "label",
    "split",
)


@dataclass
class PrepareConfig(SourceOptions):
    """Settings of ``herbray prepare``."""

    input: str = option(
        "",
        "collection to prepare: folder, manifest, archive or metadata file; "
        "local path or s3:// URI",
    )
    output: str = option("", "output folder, local or s3://; its shards are replaced on every run")
    labels: str | None = option(
        None, "existing labels.json whose species indices to keep (new species are appended)"
    )
    short_side: int = option(
        384, "shorter side of the stored images in pixels; training crops are taken from these"
    )
    max_side: int | None = option(None, "cap on the longer side in pixels (default: none)")
    min_side: int = option(32, "inputs with a side below this many pixels are errors (too_small)")
    jpeg_quality: int = option(90, "JPEG quality of the stored images, 1-100")
    split_fractions: tuple = option(DEFAULT_FRACTIONS, "train,val,test shares per species")
    seed: int = option(0, "seed of the split")
    rows_per_shard: int = option(1000, "images per Parquet file (about 50 MB at 384 px)")
    decode_memory_mb: int = option(
        1024,
        "memory each decode task reserves in Ray's scheduler, "
        "in MiB; enough for a 100-megapixel TIFF master",
    )
    ray_address: str | None = option(
        None, "Ray cluster to join (default: RAY_ADDRESS, else a local Ray)"
    )
    num_cpus: int | None = option(None, "CPUs of a local Ray (default: all)")

    def __post_init__(self) -> None:
        super().__post_init__()
        cfg.require(bool(self.input), "prepare needs --input: the collection to prepare")
        cfg.require(bool(self.output), "prepare needs --output: the folder for the shards")
        cfg.require(
            self.short_side >= 32, f"short_side must be >= 32 pixels, got {self.short_side}"
        )
        cfg.require(
            1 <= self.jpeg_quality <= 100, f"jpeg_quality must be 1-100, got {self.jpeg_quality}"
        )
        cfg.require(
            self.rows_per_shard >= 1, f"rows_per_shard must be >= 1, got {self.rows_per_shard}"
        )
        cfg.require(self.decode_memory_mb > 0, "decode_memory_mb must be positive")
        self.split_fractions = tuple(float(f) for f in self.split_fractions)


@dataclass
class PrepareResult:
    """What a prepare run produced; ``report`` is also in report.json."""

    output: str
    images: int
    errors: int
    seconds: float
    report: dict = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        return (self.images + self.errors) / self.seconds if self.seconds > 0 else 0.0

    def summary_line(self) -> str:
        return (
            f"herbray prepare: {self.images} images, {self.errors} errors, "
            f"{self.seconds:.1f} s, {self.images_per_second:.2f} images/s -> {self.output}"
        )


def decode_batch(
    batch: pa.Table,
    short_side: int,
    max_side: int | None,
    min_side: int,
    jpeg_quality: int,
) -> pa.Table:
    """Ray Data map stage: read, decode, resize and re-encode each row's scan.

    A row whose scan fails keeps its catalog columns, gets its reason in
    ``error`` and goes to the errors part instead of a split.
    """
    from herbray.imaging import encode_jpeg
    from herbray.scans import load_scan

    images, widths, heights, original_widths, original_heights = [], [], [], [], []
    errors, messages, parts = [], [], []
    for uri, split in zip(
        batch.column("image_uri").to_pylist(), batch.column("split").to_pylist(), strict=True
    ):
        result = load_scan(uri, short_side, max_side=max_side, min_side=min_side)
        if result.ok:
            decoded = result.image
            images.append(encode_jpeg(decoded.array, quality=jpeg_quality))
            widths.append(decoded.width)
            heights.append(decoded.height)
            original_widths.append(decoded.original_width)
            original_heights.append(decoded.original_height)
            errors.append(None)
            messages.append(None)
            parts.append(split)
        else:
            images.append(None)
            widths.append(None)
            heights.append(None)
            original_widths.append(None)
            original_heights.append(None)
            errors.append(result.error)
            messages.append(result.message)
            parts.append(ERROR_PART)
            logger.warning(
                "cannot prepare %s: %s (%s)",
                storage.redact(uri or ""),
                result.error,
                result.message,
            )
    added = {
        "image": pa.array(images, pa.binary()),
        "width": pa.array(widths, pa.int32()),
        "height": pa.array(heights, pa.int32()),
        "original_width": pa.array(original_widths, pa.int32()),
        "original_height": pa.array(original_heights, pa.int32()),
        "error": pa.array(errors, pa.string()),
        "error_message": pa.array(messages, pa.string()),
        "part": pa.array(parts, pa.string()),
    }
    for name, values in added.items():
        batch = batch.append_column(name, values)
    return batch


def build_training_table(
    catalog: Catalog, config: PrepareConfig
) -> tuple[pa.Table, LabelMap, dict]:
    """Attach species indices and splits to the catalog rows that can be trained on."""
    table = catalog.table
    skipped = {reason: len(paths) for reason, paths in catalog.skipped.items()}
    without_media = table.column("image_uri").null_count
    if without_media:
        skipped["no_media"] = without_media
    table = rename_reserved(catalog.images(), ADDED_COLUMNS)
    unlabelled = table.column("scientific_name").null_count
    if unlabelled:
        skipped["no_species"] = unlabelled
        table = table.filter(pc.is_valid(table.column("scientific_name")))
    if table.num_rows == 0:
        raise ValueError(
            f"{config.input}: no images with a species to prepare; prepare is for labelled "
            "collections (use herbray label for unlabelled archives)"
        )

    names = table.column("scientific_name").to_pylist()
    if config.labels:
        labels = LabelMap.load(config.labels)
        new = sorted({n for n in names if n not in labels})
        if new:
            logger.warning(
                "%d species are not in %s and are appended: %s",
                len(new),
                config.labels,
                ", ".join(new[:10]),
            )
        labels = labels.extended(names)
    else:
        labels = LabelMap.from_names(names)

    table, split_report = assign_splits(
        table, group_column=catalog.group_column, fractions=config.split_fractions, seed=config.seed
    )
    table = table.append_column("label", pa.array(labels.encode(names), pa.int32()))
    extra = {"skipped": skipped, "split": split_report.to_json()}
    return table, labels, extra


def rename_reserved(table: pa.Table, reserved: tuple[str, ...]) -> pa.Table:
    """Rename source columns that a stage is about to add, to ``source_<name>``."""
    names = [f"source_{name}" if name in reserved else name for name in table.column_names]
    return table.rename_columns(names)


def _input_blocks(table: pa.Table, num_cpus: float) -> list[pa.Table]:
    """Slice the rows into blocks small enough to keep every CPU busy."""
    rows_per_block = max(1, min(64, math.ceil(table.num_rows / max(4 * num_cpus, 1))))
    return [table.slice(i, rows_per_block) for i in range(0, table.num_rows, rows_per_block)]


def prepare(config: PrepareConfig) -> PrepareResult:
    """Run the prepare job and return its counts; see the module docstring for the output."""
    import ray

    from herbray.runtime import init_ray

    start = time.time()
    # A missing output bucket fails here, before the work, with the URI in the message.
    storage.check_bucket(config.output)
    catalog = config.read_source(config.input)
    table, labels, extra = build_training_table(catalog, config)
    logger.info(
        "preparing %d images of %d species from %s", table.num_rows, len(labels), config.input
    )

    output = config.output.rstrip("/")
    fs, base = storage.filesystem_and_path(output)
    storage.makedirs(output)
    # The marker goes first, so a run that dies from here on leaves an incomplete output.
    storage.delete_file(storage.join(output, "prepare.json"))
    _remove_staging(fs, base)
    run_id = uuid.uuid4().hex[:12]
    staging = f"{base}/.staging-{run_id}"

    init_ray(config.ray_address, config.num_cpus)
    cpus = ray.cluster_resources().get("CPU", 1)
    dataset = ray.data.from_arrow(_input_blocks(table, cpus))
    dataset = dataset.map_batches(
        decode_batch,
        batch_format="pyarrow",
        batch_size=4,
        fn_kwargs={
            "short_side": config.short_side,
            "max_side": config.max_side,
            "min_side": config.min_side,
            "jpeg_quality": config.jpeg_quality,
        },
        num_cpus=1,
        memory=config.decode_memory_mb * 1024 * 1024,
    )
    # NOTE: Ray 2.60 deprecates min_rows_per_file together with partition_cols (removal
    # announced for 2027); without it every small block would become its own file.
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=".*min_rows_per_file.*", category=DeprecationWarning
        )
        dataset.write_parquet(
            staging,
            filesystem=fs,
            partition_cols=["part"],
            min_rows_per_file=config.rows_per_shard,
            ray_remote_args={"num_cpus": WRITE_TASK_CPUS},
        )

    # Swap the new shards in: drop the old ones, move each staged split into place.
    errors = _read_errors(fs, f"{staging}/part={ERROR_PART}")
    shards = f"{base}/shards"
    _delete_dir(fs, shards)
    _delete_dir(fs, f"{base}/splits")
    for split in SPLITS:
        files = _list_files(fs, f"{staging}/part={split}")
        if files:
            fs.create_dir(f"{shards}/{split}", recursive=True)
        for info in files:
            fs.move(info.path, f"{shards}/{split}/{info.base_name}")
    pq.write_table(errors, f"{base}/errors.parquet", filesystem=fs)
    _delete_dir(fs, staging)

    counts = _count_shards(fs, shards)
    manifests = _write_split_manifests(fs, base, shards)
    seconds = time.time() - start
    report = {
        "source": config.input,
        "images": int(sum(sum(c.values()) for c in counts.values())),
        "errors": errors.num_rows,
        "errors_by_reason": _count_values(errors.column("error")),
        "seconds": round(seconds, 2),
        "species": len(labels),
        "images_by_split": {s: int(sum(c.get(s, 0) for c in counts.values())) for s in SPLITS},
        "images_by_species_and_split": {labels.names[i]: c for i, c in sorted(counts.items())},
        **extra,
    }

    labels.save(storage.join(output, "labels.json"))
    storage.write_text(
        storage.join(output, "report.json"), json.dumps(report, indent=1, ensure_ascii=False)
    )
    cfg.save(config, storage.join(output, "config.yaml"))
    manifest = {
        "format": PREPARED_FORMAT,
        "version": 1,
        "run_id": run_id,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": config.input,
        "labels": "labels.json",
        "shards": {s: f"shards/{s}" for s in SPLITS if report["images_by_split"][s]},
        "manifests": manifests,
        "images_by_split": report["images_by_split"],
        "short_side": config.short_side,
        "image_column": IMAGE_COLUMN,
    }
    storage.write_text(storage.join(output, "prepare.json"), json.dumps(manifest, indent=1))
    result = PrepareResult(
        output=output,
        images=report["images"],
        errors=errors.num_rows,
        seconds=seconds,
        report=report,
    )
    logger.info(result.summary_line())
    return result


def _count_values(values: pa.ChunkedArray) -> dict[str, int]:
    counted = pc.value_counts(values).to_pylist() if len(values) else []
    return {item["values"]: item["counts"] for item in sorted(counted, key=lambda x: -x["counts"])}


def _list_files(fs: pafs.FileSystem, path: str) -> list[pafs.FileInfo]:
    selector = pafs.FileSelector(path, recursive=True, allow_not_found=True)
    return sorted(
        (info for info in fs.get_file_info(selector) if info.type == pafs.FileType.File),
        key=lambda info: info.path,
    )


def _delete_dir(fs: pafs.FileSystem, path: str) -> None:
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)


def _remove_staging(fs: pafs.FileSystem, base: str) -> None:
    """Remove staging folders that an interrupted run left behind."""
    selector = pafs.FileSelector(base, recursive=False, allow_not_found=True)
    for info in fs.get_file_info(selector):
        if info.base_name.startswith(".staging-"):
            logger.info("removing %s left by an interrupted run", info.path)
            fs.delete_dir(info.path)


ERROR_COLUMNS = ("specimen_id", "image_uri", "scientific_name", "split", "error", "error_message")


def _read_errors(fs: pafs.FileSystem, path: str) -> pa.Table:
    files = [info.path for info in _list_files(fs, path)]
    schema = pa.schema([(name, pa.string()) for name in ERROR_COLUMNS])
    if not files:
        return schema.empty_table()
    dataset = pads.dataset(files, filesystem=fs, format="parquet")
    return dataset.to_table(columns=list(ERROR_COLUMNS)).cast(schema)


def _write_split_manifests(fs: pafs.FileSystem, base: str, shards: str) -> dict[str, str]:
    """Write ``splits/<split>.parquet``: each split's catalog rows, without the images.

    These are manifests the catalog reader takes as they are, so a split can be
    labelled or evaluated again from the original scans (``herbray evaluate
    --input OUT/splits/test.parquet``).
    """
    written = {}
    for split in SPLITS:
        files = [info.path for info in _list_files(fs, f"{shards}/{split}")]
        if not files:
            continue
        dataset = pads.dataset(files, filesystem=fs, format="parquet")
        columns = [n for n in dataset.schema.names if n not in ("image", "error", "error_message")]
        fs.create_dir(f"{base}/splits", recursive=True)
        pq.write_table(
            dataset.to_table(columns=columns), f"{base}/splits/{split}.parquet", filesystem=fs
        )
        written[split] = f"splits/{split}.parquet"
    return written


def _count_shards(fs: pafs.FileSystem, shards: str) -> dict[int, dict[str, int]]:
    """Images per label index and split, read from the shards' label and split columns."""
    counts: dict[int, dict[str, int]] = {}
    files = [info.path for info in _list_files(fs, shards)]
    if not files:
        return counts
    table = pads.dataset(files, filesystem=fs, format="parquet").to_table(
        columns=["label", "split"]
    )
    for item in pc.value_counts(
        pc.binary_join_element_wise(
            pc.cast(table.column("label"), pa.string()), table.column("split"), ":"
        )
    ).to_pylist():
        label, split = item["values"].split(":", 1)
        counts.setdefault(int(label), {})[split] = item["counts"]
    return counts


@dataclass
class PreparedShards:
    """A complete prepare output, as training and evaluation read it."""

    root: str
    manifest: dict
    labels: LabelMap

    def split_path(self, split: str) -> str | None:
        relative = self.manifest["shards"].get(split)
        return storage.join(self.root, relative) if relative else None


def load_prepared(root: str) -> PreparedShards:
    """Open a prepare output folder; refuse one whose run did not complete."""
    marker = storage.join(root, "prepare.json")
    if not storage.exists(marker):
        raise FileNotFoundError(
            f"{marker} not found: {root} is not a complete prepare output (the run was interrupted "
            "or never ran); run herbray prepare into it again"
        )
    manifest = json.loads(storage.read_text(marker))
    if manifest.get("format") != PREPARED_FORMAT:
        raise ValueError(f"{marker} is not a herbray prepare manifest")
    labels = LabelMap.load(storage.join(root, manifest["labels"]))
    return PreparedShards(root=root.rstrip("/"), manifest=manifest, labels=labels)
