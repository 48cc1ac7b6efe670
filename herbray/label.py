"""herbray label: bulk species suggestions for a digitized archive, into Parquet.

A streaming Ray Data pipeline: the catalog's image URIs -> read and decode in
CPU tasks (JPEG decode-time downscaling, straight to the model's input shape)
-> inference in an actor pool (CPU or GPU per actor) -> top-k -> Parquet files
written by :class:`AtomicParquetSink`. Images flow through in small blocks, so
memory does not grow with the archive.

Exactly one row per input image: an image that cannot be read or decoded is a
row with ``status = error`` and its reason. A run that crashed or was killed is
finished by running the same command again: each output file appears whole or
not at all (written under a temporary name, then renamed; one PUT on S3), its
name derives from the specimen ids it holds, and a rerun skips every specimen
already in a complete file. Leftover temporary files are deleted, never read.

Output folder::

    run.json            model, source and settings of the run (checked on rerun)
    labels/part-*.parquet
    summary.json        counts, written when the run completes
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from herbray import config as cfg
from herbray import storage
from herbray.catalog import SourceOptions
from herbray.config import option

logger = logging.getLogger(__name__)

LABELS_DIR = "labels"
PART_PREFIX = "part-"
TMP_MARK = ".tmp-"
STATUSES = ("ok", "uncertain", "error")

# The output schema: plain Arrow types only, Darwin Core names for the
# identification terms.
OUTPUT_SCHEMA = pa.schema(
    [
        ("image_uri", pa.string()),
        ("specimen_id", pa.string()),
        ("catalogNumber", pa.string()),
        ("occurrenceID", pa.string()),
        ("scientificName", pa.string()),
        ("confidence", pa.float32()),
        ("topk_names", pa.list_(pa.string())),
        ("topk_scores", pa.list_(pa.float32())),
        ("status", pa.string()),
        ("error", pa.string()),
        ("error_message", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("identifiedBy", pa.string()),
        ("dateIdentified", pa.string()),
        ("identificationVerificationStatus", pa.string()),
        ("identificationRemarks", pa.string()),
    ]
)

# Catalog columns carried to the output, under their Darwin Core names.
ID_COLUMNS = {"catalog_number": "catalogNumber", "occurrence_id": "occurrenceID"}


@dataclass
class LabelConfig(SourceOptions):
    """Settings of ``herbray label``."""

    model: str = option("", "model bundle folder (local or s3://) written by herbray train")
    input: str = option(
        "",
        "archive to label: folder tree, manifest, Darwin Core Archive or "
        "FGVC metadata; local path or s3:// URI",
    )
    output: str = option(
        "", "output folder (local or s3://); running again finishes an interrupted run"
    )
    threshold: float = option(
        0.5,
        "confidence below which a row is uncertain and "
        "scientificName stays empty (choose it with herbray evaluate)",
    )
    top_k: int = option(5, "species suggestions kept per image")
    batch_size: int = option(32, "images per inference batch")
    num_actors: int = option(1, "maximum inference actors (the pool grows from 1 to this)")
    cpus_per_actor: float = option(1.0, "CPUs reserved per inference actor")
    gpus_per_actor: float = option(0.0, "GPUs per inference actor (0: run on CPU)")
    torch_threads: int | None = option(
        None, "torch threads per actor (default: cpus-per-actor, at least 1)"
    )
    precision: str = option(
        "auto",
        "auto: bf16 on GPUs that have it, else fp16 on GPU and fp32 on CPU; or fp32, bf16, fp16",
        choices=("auto", "fp32", "bf16", "fp16"),
    )
    decode_cpus: float = option(1.0, "CPUs per decode task")
    decode_memory_mb: int = option(
        1024, "memory each decode task reserves in Ray's scheduler, in MiB"
    )
    rows_per_file: int = option(
        1000,
        "rows per output Parquet file; a crash loses at most "
        "this many rows of work per running task",
    )
    overwrite: bool = option(
        False,
        "delete earlier labels in the output folder and label "
        "everything again (default: finish an earlier run)",
    )
    verification_status: str = option("unverified", "identificationVerificationStatus of every row")
    ray_address: str | None = option(
        None, "Ray cluster to join (default: RAY_ADDRESS, else a local Ray)"
    )
    num_cpus: int | None = option(None, "CPUs of a local Ray (default: all)")

    def __post_init__(self) -> None:
        super().__post_init__()
        cfg.require(bool(self.model), "label needs --model: a model bundle folder")
        cfg.require(bool(self.input), "label needs --input: the archive to label")
        cfg.require(bool(self.output), "label needs --output: the folder for the Parquet rows")
        cfg.require(
            0.0 <= self.threshold <= 1.0, f"threshold must be in [0, 1], got {self.threshold}"
        )
        cfg.require(self.top_k >= 1, f"top_k must be >= 1, got {self.top_k}")
        cfg.require(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        cfg.require(self.num_actors >= 1, f"num_actors must be >= 1, got {self.num_actors}")
        cfg.require(
            self.rows_per_file >= 1, f"rows_per_file must be >= 1, got {self.rows_per_file}"
        )


# ---------------------------------------------------------------------------
# Pipeline stages


def decode_for_model(batch: pa.Table, height: int, width: int, min_side: int) -> dict:
    """Ray Data map stage: read and decode each scan straight to the model's input shape.

    The decode asks for the input's shorter side, so a JPEG is decoded at the
    smallest DCT scale that is still large enough.
    """
    from PIL import Image

    from herbray.scans import load_scan
    from herbray.transforms import InputShape, resize_to_input

    shape = InputShape(height, width)
    images = np.zeros((batch.num_rows, height, width, 3), dtype=np.uint8)
    widths, heights, errors, messages = [], [], [], []
    for i, uri in enumerate(batch.column("image_uri").to_pylist()):
        result = load_scan(uri, min(height, width), min_side=min_side)
        if result.ok:
            decoded = result.image
            images[i] = resize_to_input(Image.fromarray(decoded.array), shape)
            widths.append(decoded.original_width)
            heights.append(decoded.original_height)
            # Empty strings, not nulls: Ray Data turns an all-null column into floats.
            errors.append("")
            messages.append("")
        else:
            widths.append(None)
            heights.append(None)
            errors.append(result.error)
            messages.append(result.message)
            logger.warning(
                "cannot label %s: %s (%s)", storage.redact(uri or ""), result.error, result.message
            )
    out = {name: batch.column(name).to_numpy(zero_copy_only=False) for name in batch.column_names}
    out.update(
        {
            "image": images,
            # -1 marks a size that is unknown because the scan failed.
            "width": np.array([-1 if w is None else w for w in widths], dtype=np.int32),
            "height": np.array([-1 if h is None else h for h in heights], dtype=np.int32),
            "error": np.array(errors, dtype=str),
            "error_message": np.array(messages, dtype=str),
        }
    )
    return out


class Classifier:
    """Ray Data actor: loads the bundle once, then classifies batches of decoded sheets."""

    def __init__(
        self,
        bundle_uri: str,
        top_k: int,
        threshold: float,
        precision: str,
        threads: int,
        date_identified: str,
        verification_status: str,
    ):
        import torch

        from herbray.bundle import load_bundle

        torch.set_num_threads(max(1, threads))
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.bundle = load_bundle(bundle_uri, device=device)
        self.top_k = min(top_k, len(self.bundle.labels))
        self.threshold = threshold
        self.names = np.array(self.bundle.labels.names, dtype=object)
        self.date_identified = date_identified
        self.verification_status = verification_status
        self.amp_dtype = _amp_dtype(precision, device)

    def __call__(self, batch: dict) -> pa.Table:
        import torch

        count = len(batch["image_uri"])
        ok = np.array([_missing(e) for e in batch["error"]], dtype=bool)
        probabilities = np.zeros((count, len(self.names)), dtype=np.float32)
        if ok.any():
            logits = self.bundle.predict_logits(batch["image"][ok], amp_dtype=self.amp_dtype)
            probabilities[ok] = torch.softmax(torch.from_numpy(logits), dim=1).numpy()
        return build_rows(batch, probabilities, ok, self)


def _missing(value) -> bool:
    """True for an empty cell: None, NaN (an all-null column in Ray Data) or ''."""
    return value is None or value == "" or (isinstance(value, float) and value != value)


def _amp_dtype(precision: str, device: str):
    import torch

    if precision == "fp32" or (precision == "auto" and device == "cpu"):
        return None
    if precision == "bf16" or (precision == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def build_rows(batch: dict, probabilities: np.ndarray, ok: np.ndarray, classifier) -> pa.Table:
    """Output rows for one batch: top-k, status and the Darwin Core identification terms."""
    count = len(ok)
    k = classifier.top_k
    top = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    names, scores, best, confidence, status, remarks = [], [], [], [], [], []
    for i in range(count):
        if not ok[i]:
            names.append(None)
            scores.append(None)
            best.append(None)
            confidence.append(None)
            status.append("error")
            remarks.append(f"not identified: {batch['error'][i]}")
            continue
        row_names = [str(n) for n in classifier.names[top[i]]]
        row_scores = [float(s) for s in probabilities[i, top[i]]]
        names.append(row_names)
        scores.append(row_scores)
        confidence.append(row_scores[0])
        if row_scores[0] >= classifier.threshold:
            best.append(row_names[0])
            status.append("ok")
            remarks.append(
                f"machine identification from the whole-sheet image, confidence "
                f"{row_scores[0]:.3f} (threshold {classifier.threshold:.2f}); to be verified"
            )
        else:
            best.append(None)
            status.append("uncertain")
            remarks.append(
                f"confidence {row_scores[0]:.3f} below threshold {classifier.threshold:.2f}; "
                f"best guess {row_names[0]}; the species may be outside the model's "
                f"{len(classifier.names)} species"
            )

    def column(name: str) -> list:
        values = batch.get(name)
        if values is None:
            return [None] * count
        return [None if _missing(v) else str(v) for v in values]

    def ints(name: str) -> list:
        return [None if v < 0 else int(v) for v in batch[name]]

    return pa.table(
        {
            "image_uri": column("image_uri"),
            "specimen_id": column("specimen_id"),
            "catalogNumber": column("catalog_number"),
            "occurrenceID": column("occurrence_id"),
            "scientificName": best,
            "confidence": confidence,
            "topk_names": names,
            "topk_scores": scores,
            "status": status,
            "error": column("error"),
            "error_message": column("error_message"),
            "width": ints("width"),
            "height": ints("height"),
            "identifiedBy": [classifier.bundle.identified_by] * count,
            "dateIdentified": [classifier.date_identified] * count,
            "identificationVerificationStatus": [classifier.verification_status] * count,
            "identificationRemarks": remarks,
        },
        schema=OUTPUT_SCHEMA,
    )


# ---------------------------------------------------------------------------
# Writing: every file appears whole or not at all


class AtomicParquetSink:
    """Ray Data datasink that writes each task's rows as one complete Parquet file.

    The file name is a hash of the specimen ids inside, so a retried task
    rewrites the same file instead of adding a second copy. Local files are
    written under a temporary name and renamed; an S3 object becomes visible
    only when its upload completes.
    """

    def __init__(self, folder: str, rows_per_file: int):
        self.folder = folder.rstrip("/")
        self.rows_per_file = rows_per_file

    # Ray Data calls these; the class is turned into a Datasink by make_sink().
    def write(self, blocks, ctx) -> int:
        tables = [pa.table(block) if not isinstance(block, pa.Table) else block for block in blocks]
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return 0
        table = pa.concat_tables(tables).cast(OUTPUT_SCHEMA)
        write_part(self.folder, table)
        return table.num_rows


def write_part(folder: str, table: pa.Table) -> str:
    """Write one part file atomically and return its URI."""
    ids = "\n".join(sorted(table.column("specimen_id").to_pylist()))
    digest = hashlib.sha256(ids.encode()).hexdigest()[:20]
    uri = storage.join(folder, f"{PART_PREFIX}{digest}.parquet")
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    data = sink.getvalue()
    if storage.is_s3(uri):
        storage.write_bytes(uri, data)  # one PUT: the object appears whole or not at all
        return uri
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f"{TMP_MARK}{uuid.uuid4().hex}")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, uri)
    return uri


def make_sink(folder: str, rows_per_file: int):
    from ray.data import Datasink

    class _Sink(AtomicParquetSink, Datasink):
        @property
        def min_rows_per_write(self) -> int:
            return self.rows_per_file

        def get_name(self) -> str:
            return "WriteLabels"

    return _Sink(folder, rows_per_file)


def complete_parts(folder: str) -> list[str]:
    """URIs of the complete part files; temporary leftovers of a crash are deleted."""
    fs, path = storage.filesystem_and_path(folder)
    selector = pafs.FileSelector(path, recursive=False, allow_not_found=True)
    parts = []
    for info in fs.get_file_info(selector):
        if info.type != pafs.FileType.File:
            continue
        if info.base_name.startswith(TMP_MARK):
            logger.info("deleting %s, left by an interrupted run", info.path)
            fs.delete_file(info.path)
        elif info.base_name.startswith(PART_PREFIX) and info.base_name.endswith(".parquet"):
            parts.append(info.path)
    return sorted(parts)


def read_output(output: str, columns: list[str] | None = None) -> pa.Table:
    """All rows of a label output folder (complete part files only)."""
    folder = storage.join(output, LABELS_DIR)
    fs, _ = storage.filesystem_and_path(folder)
    parts = complete_parts(folder)
    if not parts:
        schema = (
            OUTPUT_SCHEMA
            if columns is None
            else pa.schema([OUTPUT_SCHEMA.field(c) for c in columns])
        )
        return schema.empty_table()
    return pads.dataset(parts, filesystem=fs, format="parquet", schema=OUTPUT_SCHEMA).to_table(
        columns=columns
    )


# ---------------------------------------------------------------------------
# The job


@dataclass
class LabelResult:
    output: str
    images: int
    counts: dict
    seconds: float
    labelled_now: int
    skipped: dict = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        return self.labelled_now / self.seconds if self.seconds > 0 else 0.0

    def summary_line(self) -> str:
        c = self.counts
        return (
            f"herbray label: {self.images} images ({c.get('ok', 0)} ok, "
            f"{c.get('uncertain', 0)} uncertain, {c.get('error', 0)} error), "
            f"{self.labelled_now} labelled in this run, {self.seconds:.1f} s, "
            f"{self.images_per_second:.2f} images/s -> {storage.join(self.output, LABELS_DIR)}"
        )


def _check_run(output: str, run: dict) -> dict:
    """Write run.json, or check that an earlier run into this folder used the same model."""
    uri = storage.join(output, "run.json")
    if storage.exists(uri):
        previous = json.loads(storage.read_text(uri))
        if previous.get("weights_sha256") != run["weights_sha256"]:
            raise ValueError(
                f"{output} holds labels from another model ({previous.get('identifiedBy')}); "
                "use a new output folder, or delete this one to relabel"
            )
        if previous.get("input") != run["input"]:
            raise ValueError(
                f"{output} holds labels of {previous.get('input')}, not {run['input']}; use a new "
                "output folder"
            )
        logger.info("continuing the run started %s in %s", previous.get("started"), output)
        return previous
    storage.makedirs(output)
    storage.write_text(uri, json.dumps(run, indent=1, ensure_ascii=False))
    return run


def label(config: LabelConfig) -> LabelResult:
    """Run the labeling job; running it again on the same output finishes what is missing."""
    from herbray.bundle import open_bundle
    from herbray.prepare import rename_reserved
    from herbray.runtime import init_ray

    started = time.time()
    bundle = open_bundle(config.model)  # the actors load the weights
    catalog = config.read_source(config.input)
    images = rename_reserved(
        catalog.images(), ("image", "width", "height", "error", "error_message")
    )
    skipped = {reason: len(paths) for reason, paths in catalog.skipped.items()}
    if catalog.records_without_media:
        skipped["no_media"] = catalog.records_without_media

    if config.overwrite:
        storage.delete_dir(storage.join(config.output, LABELS_DIR))
        for name in ("run.json", "summary.json"):
            storage.delete_file(storage.join(config.output, name))
    run = _check_run(
        config.output,
        {
            "input": config.input,
            "model": config.model,
            "identifiedBy": bundle.identified_by,
            "weights_sha256": bundle.weights_sha256,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "config": cfg.to_dict(config),
        },
    )
    folder = storage.join(config.output, LABELS_DIR)
    storage.makedirs(folder)

    # Skip every specimen that a complete file already holds.
    done = read_output(config.output, ["specimen_id"]).column("specimen_id")
    todo = (
        images.filter(pc.invert(pc.is_in(images.column("specimen_id"), value_set=done)))
        if len(done)
        else images
    )
    keep = [
        c
        for c in ("specimen_id", "image_uri", "catalog_number", "occurrence_id")
        if c in todo.column_names
    ]
    todo = todo.select(keep)
    logger.info(
        "%d images in %s, %d already labelled, %d to label",
        images.num_rows,
        config.input,
        len(done),
        todo.num_rows,
    )

    if todo.num_rows:
        init_ray(config.ray_address, config.num_cpus)
        _run_pipeline(todo, config, bundle, run["started"])

    # Count what the folder holds now.
    table = read_output(config.output, ["specimen_id", "status"])
    counts = {s: 0 for s in STATUSES}
    for item in pc.value_counts(table.column("status")).to_pylist() if table.num_rows else []:
        counts[item["values"]] = item["counts"]
    unique = len(set(table.column("specimen_id").to_pylist()))
    if unique != table.num_rows:
        raise RuntimeError(f"{folder}: {table.num_rows - unique} specimen ids occur twice")
    missing = images.num_rows - unique
    if missing:
        raise RuntimeError(f"{folder}: {missing} images have no row; run the same command again")
    seconds = time.time() - started
    result = LabelResult(
        output=config.output,
        images=unique,
        counts=counts,
        seconds=seconds,
        labelled_now=todo.num_rows,
        skipped=skipped,
    )
    summary = {
        "images": unique,
        "status": counts,
        "skipped_files": skipped,
        "labelled_in_last_run": todo.num_rows,
        "seconds_last_run": round(seconds, 2),
        "images_per_second_last_run": round(result.images_per_second, 3),
        "identifiedBy": bundle.identified_by,
        "threshold": config.threshold,
        "output": folder,
    }
    storage.write_text(storage.join(config.output, "summary.json"), json.dumps(summary, indent=1))
    logger.info(result.summary_line())
    return result


def _run_pipeline(todo: pa.Table, config: LabelConfig, bundle, date_identified: str) -> None:
    import ray

    shape = bundle.input_shape
    rows_per_block = max(1, min(config.batch_size, 64))
    blocks = [todo.slice(i, rows_per_block) for i in range(0, todo.num_rows, rows_per_block)]
    dataset = ray.data.from_arrow(blocks)
    dataset = dataset.map_batches(
        decode_for_model,
        batch_format="pyarrow",
        batch_size=8,
        fn_kwargs={"height": shape.height, "width": shape.width, "min_side": 32},
        num_cpus=config.decode_cpus,
        memory=config.decode_memory_mb * 1024 * 1024,
    )
    threads = config.torch_threads or max(1, int(config.cpus_per_actor))
    dataset = dataset.map_batches(
        Classifier,
        batch_format="numpy",
        batch_size=config.batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=config.num_actors),
        fn_constructor_kwargs={
            "bundle_uri": config.model,
            "top_k": config.top_k,
            "threshold": config.threshold,
            "precision": config.precision,
            "threads": threads,
            "date_identified": date_identified,
            "verification_status": config.verification_status,
        },
        num_cpus=config.cpus_per_actor,
        num_gpus=config.gpus_per_actor,
    )
    dataset.write_datasink(make_sink(storage.join(config.output, LABELS_DIR), config.rows_per_file))
