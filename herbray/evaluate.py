"""herbray evaluate: how good a model is on labelled specimens, and which threshold to use.

Two ways in:

- ``--model BUNDLE --input SOURCE``: run the label job on a labelled source
  into ``OUTPUT/labels`` with threshold 0, so every row keeps its top-1. Its
  rows are then evaluated against the source's ``scientific_name``, or
  against ``--truth`` when the truth is a separate source (the demo's
  ``archive/`` folder has its truth in ``archive-truth.csv``).
- ``--labels LABEL_OUTPUT --truth SOURCE``: evaluate an existing label output,
  without running a model.

Rules behind the figures:

- The prediction of a row is the first of its ``topk_names``, whatever
  threshold the label run used. Top-5 counts an image as right when the true
  species is among its first five names. A row with ``status = error`` has no prediction: it counts
  as wrong everywhere and its reason is counted separately.
- Label rows join truth rows on ``image_uri``, compared as exact strings. Both
  sides come from the catalog readers, which resolve local paths to absolute
  ones, so labelling ``archive/`` and reading ``archive-truth.csv`` beside it
  give equal URIs. Truth rows without a label row and label rows without a
  truth species are counted and listed, never evaluated.
- The model's species (its known classes) come from the bundle's
  ``labels.json``: ``--model``, else the bundle named in the label output's
  ``run.json``. When that bundle cannot be read, they are estimated as every
  name in any row's ``topk_names``, which misses a species the model never
  suggested.
  Images of species outside that set are "unseen species": wrong in top-1 by
  construction, and the open-set question is how many of them the threshold
  turns into ``uncertain``.
- Genus: the truth's ``genus`` column where it has a value, else the first word
  of its scientific name; the predicted genus is the first word of the
  predicted name. A leading hybrid sign (``×``) is dropped and case is ignored.
- Thresholds: a row is kept at threshold ``t`` when it has a prediction with
  ``confidence >= t`` (the label job's rule); coverage = kept / evaluated
  images, accuracy = correct kept rows / kept rows.
- Calibration: expected calibration error over the rows with a prediction, in
  equal-width confidence bins (see :class:`herbray.metrics.ReliabilityBins`).

Output folder::

    report.md          the figures, pictures and per-species table for people
    evaluation.json    every number, for comparing models
    per_species.csv    precision, recall, F1 and support per species
    rows.parquet       one row per evaluated image: truth, prediction, correctness
    confusion.png, reliability.png, thresholds.png
    evaluate.yaml      the resolved settings
    labels/            the label job's output (--model runs only)
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from herbray import __version__, storage
from herbray import config as cfg
from herbray.catalog import SourceOptions
from herbray.config import option
from herbray.evaluation_report import (
    CONFUSION_PNG,
    PER_SPECIES_FILE,
    RELIABILITY_PNG,
    REPORT_FILE,
    THRESHOLDS_PNG,
    per_species_csv,
    plot_confusion,
    plot_reliability,
    plot_thresholds,
    render_report,
)
from herbray.label import LabelConfig, read_output
from herbray.metrics import ClassCounts, ReliabilityBins, reliability_bins
from herbray.taxonomy import LabelMap, natural_key

logger = logging.getLogger(__name__)

LABELS_SUBDIR = "labels"
EVALUATION_FILE = "evaluation.json"
ROWS_FILE = "rows.parquet"

TOP5 = 5  # suggestions that count for the top-5 figure
EXAMPLES = 10  # unmatched URIs listed per side in the report and evaluation.json
NO_REASON = "unknown"  # error reason of an error row whose reason column is empty
# The label output columns that evaluation reads.
LABEL_COLUMNS = ("image_uri", "topk_names", "topk_scores", "confidence", "status", "error")

LABEL_DEFAULT_THRESHOLD = LabelConfig.__dataclass_fields__["threshold"].default


@dataclass
class EvaluateConfig(SourceOptions):
    """Settings of ``herbray evaluate``.

    The collection-reading options (format, columns, encoding) apply to
    ``--input`` and ``--truth`` alike.
    """

    model: str = option(
        "",
        "model bundle: with --input, label that source with it first; with --labels, "
        "the bundle whose labels.json lists the species the model knows",
    )
    input: str = option(
        "", "labelled collection to label with --model and evaluate (local path or s3://)"
    )
    labels: str = option(
        "", "existing herbray label output folder to evaluate, without running a model"
    )
    truth: str = option(
        "",
        "labelled collection whose scientific_name is the truth (default: --input); "
        "rows join the label rows on image_uri",
    )
    output: str = option("", "folder (local or s3://) for the report, figures and pictures")
    threshold: float = option(
        LABEL_DEFAULT_THRESHOLD,
        "label job threshold to report coverage, accuracy and unseen-species rejections at",
    )
    threshold_step: float = option(0.05, "spacing of the thresholds evaluated from 0 up to 1")
    target_accuracy: float = option(
        0.9,
        "accuracy that the suggested threshold must reach on the rows it keeps",
    )
    calibration_bins: int = option(15, "equal-width confidence bins of the calibration figures")
    confusion_species: int = option(
        20, "species in the confusion matrix picture: those with the most errors"
    )
    top_k: int = option(5, "species suggestions per image in the label run (--model)")
    batch_size: int = option(32, "images per inference batch in the label run (--model)")
    num_actors: int = option(1, "maximum inference actors in the label run (--model)")
    cpus_per_actor: float = option(1.0, "CPUs reserved per inference actor (--model)")
    gpus_per_actor: float = option(0.0, "GPUs per inference actor (--model; 0: run on CPU)")
    torch_threads: int | None = option(
        None, "torch threads per inference actor (--model; default: cpus-per-actor)"
    )
    precision: str = option(
        "auto",
        "inference precision of the label run (--model), as in herbray label",
        choices=("auto", "fp32", "bf16", "fp16"),
    )
    ray_address: str | None = option(
        None, "Ray cluster to join for the label run (default: RAY_ADDRESS, else a local Ray)"
    )
    num_cpus: int | None = option(None, "CPUs of a local Ray (default: all)")

    def __post_init__(self) -> None:
        super().__post_init__()
        usage = (
            "use --model and --input to label and evaluate a labelled collection, or "
            "--labels and --truth to evaluate an existing label output"
        )
        cfg.require(bool(self.output), "evaluate needs --output: the folder for the report")
        if self.labels:
            cfg.require(
                not self.input,
                f"--input {self.input!r} is for labelling with --model; with --labels, give "
                "the labelled collection as --truth",
            )
            cfg.require(bool(self.truth), f"evaluate --labels needs --truth; {usage}")
        else:
            cfg.require(bool(self.model) and bool(self.input), f"evaluate: {usage}")
        cfg.require(
            0.0 <= self.threshold <= 1.0, f"threshold must be in [0, 1], got {self.threshold}"
        )
        cfg.require(
            0.0 < self.threshold_step <= 0.5,
            f"threshold_step must be in (0, 0.5], got {self.threshold_step}",
        )
        cfg.require(
            0.0 < self.target_accuracy <= 1.0,
            f"target_accuracy must be in (0, 1], got {self.target_accuracy}",
        )
        cfg.require(
            self.calibration_bins >= 1,
            f"calibration_bins must be >= 1, got {self.calibration_bins}",
        )
        cfg.require(
            self.confusion_species >= 2,
            f"confusion_species must be >= 2, got {self.confusion_species}",
        )
        cfg.require(self.top_k >= 1, f"top_k must be >= 1, got {self.top_k}")

    def thresholds(self) -> list[float]:
        """0, step, 2 x step, ... below 1, plus ``threshold``, in increasing order."""
        count = math.floor(1.0 / self.threshold_step - 1e-9) + 1
        values = {round(i * self.threshold_step, 6) for i in range(count)}
        values.add(self.threshold)
        return sorted(values)


# ---------------------------------------------------------------------------
# Rows: label rows joined to the truth


@dataclass
class JoinedRows:
    """The evaluated images: one entry per truth row with a species and a label row.

    ``predicted`` is None and ``confidence`` NaN for a row without a
    prediction (an error row).
    """

    image_uri: list[str]
    specimen_id: list[str | None]
    truth: list[str]
    truth_genus: list[str | None]
    predicted: list[str | None]
    topk: list[list[str]]
    confidence: np.ndarray
    status: list[str]
    error: list[str | None]

    def __len__(self) -> int:
        return len(self.truth)

    # The cached properties are computed once, after join_rows has filled the lists.
    @functools.cached_property
    def has_prediction(self) -> np.ndarray:
        return np.array([p is not None for p in self.predicted], dtype=bool)

    @functools.cached_property
    def correct(self) -> np.ndarray:
        return np.array([p == t for p, t in zip(self.predicted, self.truth, strict=True)], bool)

    @functools.cached_property
    def top5_hit(self) -> np.ndarray:
        return np.array(
            [t in names[:TOP5] for t, names in zip(self.truth, self.topk, strict=True)], bool
        )


def genus_of(scientific_name: str | None) -> str | None:
    """Return the genus of a scientific name: its first word, without a hybrid sign ``×``."""
    if not scientific_name:
        return None
    words = scientific_name.replace("×", " ").split()
    return words[0] if words else None


def _same_genus(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and a.casefold() == b.casefold()


def join_rows(label_rows: pa.Table, truth: pa.Table) -> tuple[JoinedRows, dict]:
    """Join label rows to truth rows on ``image_uri`` and report what did not match.

    Returns the evaluated rows, in truth order, and a report of the counts with
    up to ``EXAMPLES`` unmatched URIs per side. A URI that occurs twice on one
    side is evaluated once (its first row) and counted as a duplicate.
    """
    labels_by_uri: dict[str, dict] = {}
    label_duplicates = 0
    for row in label_rows.to_pylist():
        uri = row["image_uri"]
        if uri in labels_by_uri:
            label_duplicates += 1
            continue
        labels_by_uri[uri] = row

    has_genus = "genus" in truth.column_names
    truth_uris: set[str] = set()
    truth_duplicates = 0
    without_species = 0
    without_label: list[str] = []
    out = JoinedRows([], [], [], [], [], [], np.zeros(0), [], [])
    confidence: list[float] = []
    for row in truth.to_pylist():
        uri = row["image_uri"]
        if uri in truth_uris:
            truth_duplicates += 1
            continue
        truth_uris.add(uri)
        name = (row.get("scientific_name") or "").strip()
        if not name:
            without_species += 1
            continue
        label_row = labels_by_uri.get(uri)
        if label_row is None:
            without_label.append(uri)
            continue

        names = [n for n in (label_row.get("topk_names") or []) if n is not None]
        scores = label_row.get("topk_scores") or [None]
        score = label_row.get("confidence")
        score = scores[0] if score is None else score
        predicted, error = None, None
        if label_row.get("status") == "error":
            error = label_row.get("error") or NO_REASON
        elif not names:
            error = "no_suggestions"
        elif score is None:
            error = "no_confidence"
        else:
            predicted = names[0]
        out.image_uri.append(uri)
        out.specimen_id.append(row.get("specimen_id"))
        out.truth.append(name)
        genus = (row.get("genus") or "").strip() if has_genus else ""
        out.truth_genus.append(genus or genus_of(name))
        out.predicted.append(predicted)
        out.topk.append(names if predicted is not None else [])
        confidence.append(float(score) if predicted is not None else math.nan)
        out.status.append(label_row.get("status") or "")
        out.error.append(error)
    out.confidence = np.array(confidence, dtype=np.float64)

    # A label row of a truth row without a species has no truth either.
    evaluated = set(out.image_uri)
    without_truth = [uri for uri in labels_by_uri if uri not in evaluated]
    report = {
        "label_rows": label_rows.num_rows,
        "label_duplicate_uris": label_duplicates,
        "truth_rows": truth.num_rows,
        "truth_duplicate_uris": truth_duplicates,
        "truth_without_species": without_species,
        "evaluated": len(out),
        "truth_without_label": len(without_label),
        "truth_without_label_examples": without_label[:EXAMPLES],
        "labels_without_truth": len(without_truth),
        "labels_without_truth_examples": without_truth[:EXAMPLES],
    }
    return out, report


# ---------------------------------------------------------------------------
# Figures


@dataclass
class SpeciesResults:
    """Per-species counts over the species that are true or predicted in the rows."""

    names: list[str]
    counts: ClassCounts
    # confusion[i, j]: images of species i predicted as j. The last column counts
    # images without a prediction.
    confusion: np.ndarray


def species_results(rows: JoinedRows) -> SpeciesResults:
    """Count true positives, errors and confusions per species."""
    names = sorted(set(rows.truth) | {p for p in rows.predicted if p is not None}, key=natural_key)
    index = {name: i for i, name in enumerate(names)}
    labels = np.array([index[t] for t in rows.truth], dtype=np.int64)
    predicted = np.array(
        [index[p] if p is not None else -1 for p in rows.predicted], dtype=np.int64
    )
    counts = ClassCounts(len(names))
    counts.update_predictions(labels, predicted, rows.top5_hit)
    confusion = np.zeros((len(names), len(names) + 1), dtype=np.int64)
    np.add.at(confusion, (labels, np.where(predicted >= 0, predicted, len(names))), 1)
    return SpeciesResults(names, counts, confusion)


def per_species_table(results: SpeciesResults, known: set[str]) -> list[dict]:
    """Build one dict per species: support, precision, recall, F1 and its top confusion."""
    counts = results.counts
    precision, recall, f1 = counts.precision(), counts.recall(), counts.f1()
    table = []
    for i, name in enumerate(results.names):
        errors = results.confusion[i, :-1].copy()
        errors[i] = 0
        confused = int(errors.argmax()) if errors.any() else None
        table.append(
            {
                "species": name,
                "support": int(counts.support()[i]),
                "predicted": int(counts.true_positives[i] + counts.false_positives[i]),
                "correct": int(counts.true_positives[i]),
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "no_prediction": int(results.confusion[i, -1]),
                "known_to_model": name in known,
                "most_confused_with": results.names[confused] if confused is not None else None,
                "most_confused_count": int(errors[confused]) if confused is not None else 0,
            }
        )
    table.sort(key=lambda r: (-r["support"], natural_key(r["species"])))
    return table


def confusion_pairs(results: SpeciesResults, limit: int = 20) -> list[dict]:
    """List the most frequent (true species, predicted species) errors, most frequent first."""
    matrix = results.confusion[:, :-1].copy()
    np.fill_diagonal(matrix, 0)
    pairs = [
        {"truth": results.names[i], "predicted": results.names[j], "images": int(matrix[i, j])}
        for i, j in zip(*np.nonzero(matrix), strict=True)
    ]
    pairs.sort(key=lambda p: (-p["images"], natural_key(p["truth"]), natural_key(p["predicted"])))
    return pairs[:limit]


def threshold_sweep(rows: JoinedRows, thresholds: list[float], known: set[str]) -> list[dict]:
    """Compute coverage and accuracy of the rows that each threshold keeps.

    A row is kept when it has a prediction with ``confidence >= threshold``,
    the label job's rule for ``status = ok``; ``accuracy`` is None when no row
    is kept.
    """
    total = len(rows)
    has_prediction = rows.has_prediction
    correct = rows.correct
    unseen = np.array([t not in known for t in rows.truth], dtype=bool)
    confidence = np.where(has_prediction, rows.confidence, -1.0)
    sweep = []
    for threshold in thresholds:
        kept = has_prediction & (confidence >= threshold)
        count = int(kept.sum())
        sweep.append(
            {
                "threshold": threshold,
                "kept": count,
                "coverage": count / total if total else 0.0,
                "accuracy": float(correct[kept].mean()) if count else None,
                "correct_kept": int(correct[kept].sum()),
                "unseen_kept": int((kept & unseen).sum()),
            }
        )
    return sweep


def suggest_threshold(sweep: list[dict], target_accuracy: float) -> dict | None:
    """Find the lowest threshold whose kept rows reach ``target_accuracy``.

    Coverage falls as the threshold rises, so the lowest such threshold keeps
    the most images. Returns its sweep row, or None when no threshold reaches
    the target.
    """
    for row in sweep:
        if row["accuracy"] is not None and row["accuracy"] >= target_accuracy - 1e-12:
            return row
    return None


def genus_accuracy(rows: JoinedRows) -> dict:
    """Compute accuracy at genus level over the rows whose true genus is known."""
    known = [g is not None for g in rows.truth_genus]
    hits = [
        _same_genus(genus, genus_of(predicted))
        for genus, predicted in zip(rows.truth_genus, rows.predicted, strict=True)
    ]
    images = sum(known)
    correct = sum(h for h, k in zip(hits, known, strict=True) if k)
    return {
        "images": images,
        "correct": correct,
        "accuracy": correct / images if images else None,
    }


def unseen_species(rows: JoinedRows, known: set[str], threshold: float) -> dict:
    """Count images of species outside the model's, and what the threshold does with them."""
    per_species: Counter[str] = Counter()
    uncertain = kept = errors = 0
    for name, predicted, confidence in zip(
        rows.truth, rows.predicted, rows.confidence, strict=True
    ):
        if name in known:
            continue
        per_species[name] += 1
        if predicted is None:
            errors += 1
        elif confidence >= threshold:
            kept += 1
        else:
            uncertain += 1
    images = sum(per_species.values())
    return {
        "images": images,
        "species": len(per_species),
        "images_per_species": dict(sorted(per_species.items(), key=lambda i: natural_key(i[0]))),
        "threshold": threshold,
        "uncertain_at_threshold": uncertain,
        "kept_at_threshold": kept,
        "errors": errors,
        "rejected_share": uncertain / images if images else None,
    }


def error_rows(rows: JoinedRows) -> dict:
    """Count the rows without a prediction by reason."""
    reasons = Counter(e for e in rows.error if e is not None)
    return {"images": sum(reasons.values()), "by_reason": dict(sorted(reasons.items()))}


def calibration(rows: JoinedRows, num_bins: int) -> tuple[ReliabilityBins, dict]:
    """Compute reliability bins and ECE over the rows that have a prediction."""
    has_prediction = rows.has_prediction
    bins = reliability_bins(rows.confidence[has_prediction], rows.correct[has_prediction], num_bins)
    return bins, {
        "bins": num_bins,
        "images": bins.total,
        "ece": bins.expected_calibration_error(),
        "edges": [float(e) for e in bins.edges],
        "counts": [int(c) for c in bins.counts],
        "mean_confidence": [_number(v) for v in bins.mean_confidence],
        "accuracy": [_number(v) for v in bins.accuracy],
    }


def _number(value: float) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


def summarise(
    rows: JoinedRows, known: set[str], config: EvaluateConfig
) -> tuple[dict, SpeciesResults, ReliabilityBins]:
    """Compute all figures of an evaluation as one JSON-ready dict."""
    results = species_results(rows)
    headline = results.counts.summary()
    known_rows = np.array([t in known for t in rows.truth], dtype=bool)
    known_images = int(known_rows.sum())
    bins, calibration_figures = calibration(rows, config.calibration_bins)
    sweep = threshold_sweep(rows, config.thresholds(), known)
    at_threshold = next(r for r in sweep if r["threshold"] == config.threshold)
    suggested = suggest_threshold(sweep, config.target_accuracy)
    evaluation = {
        "images": len(rows),
        "correct": int(results.counts.top1),
        "top1": headline["top1"],
        "top5": headline["top5"],
        "macro_f1": headline["macro_f1"],
        "balanced_accuracy": headline["balanced_accuracy"],
        "suggestions_per_image": max((len(t) for t in rows.topk), default=0),
        "species_in_truth": len(set(rows.truth)),
        "known_species_only": {
            "images": known_images,
            "top1": float(rows.correct[known_rows].mean()) if known_images else None,
            "top5": float(rows.top5_hit[known_rows].mean()) if known_images else None,
        },
        "genus": genus_accuracy(rows),
        "calibration": calibration_figures,
        "threshold": config.threshold,
        "at_threshold": at_threshold,
        "target_accuracy": config.target_accuracy,
        "suggested_threshold": suggested,
        "thresholds": sweep,
        "errors": error_rows(rows),
        "unseen_species": unseen_species(rows, known, config.threshold),
        "confusion_pairs": confusion_pairs(results),
        "per_species": per_species_table(results, known),
    }
    return evaluation, results, bins


# ---------------------------------------------------------------------------
# Files


def rows_table(rows: JoinedRows, known: set[str]) -> pa.Table:
    return pa.table(
        {
            "image_uri": pa.array(rows.image_uri, pa.string()),
            "specimen_id": pa.array(rows.specimen_id, pa.string()),
            "truth": pa.array(rows.truth, pa.string()),
            "predicted": pa.array(rows.predicted, pa.string()),
            "confidence": pa.array(
                [None if math.isnan(c) else c for c in rows.confidence], pa.float32()
            ),
            "correct": pa.array(rows.correct, pa.bool_()),
            "top5_hit": pa.array(rows.top5_hit, pa.bool_()),
            "known_to_model": pa.array([t in known for t in rows.truth], pa.bool_()),
            "status": pa.array(rows.status, pa.string()),
            "error": pa.array(rows.error, pa.string()),
        }
    )


# ---------------------------------------------------------------------------
# The job


@dataclass
class EvaluateResult:
    """Output folder, figures and run time of an evaluation."""

    output: str
    evaluation: dict
    seconds: float

    def summary_line(self) -> str:
        e = self.evaluation
        at = e["at_threshold"]
        accuracy = "n/a" if at["accuracy"] is None else f"{at['accuracy']:.3f}"
        suggested = e["suggested_threshold"]
        suggestion = "none" if suggested is None else f"{suggested['threshold']:.2f}"
        return (
            f"herbray evaluate: {e['images']} images, top-1 {e['top1']:.3f}, "
            f"top-5 {e['top5']:.3f}, macro-F1 {e['macro_f1']:.3f}, "
            f"ECE {e['calibration']['ece']:.3f}; at threshold {e['threshold']:.2f} coverage "
            f"{at['coverage']:.3f}, accuracy {accuracy}; suggested threshold {suggestion}; "
            f"{e['unseen_species']['images']} unseen-species and {e['errors']['images']} error "
            f"images; {self.seconds:.1f} s -> {storage.join(self.output, REPORT_FILE)}"
        )


def _read_run(label_output: str) -> dict:
    uri = storage.join(label_output, "run.json")
    if not storage.exists(uri):
        logger.warning("%s not found; the model behind these labels is unknown", uri)
        return {}
    return json.loads(storage.read_text(uri))


def known_species(config: EvaluateConfig, run: dict, label_rows: pa.Table) -> tuple[set[str], dict]:
    """Return the model's species and a description of where that list came from.

    ``--model`` must be readable. The bundle named in ``run.json`` may have
    moved since labelling, so when it is unreadable the list is estimated from
    the suggestions.
    """
    if config.model:
        labels = LabelMap.load(storage.join(config.model, "labels.json"))
        _check_same_model(config.model, run)
        return set(labels.names), {"bundle": config.model, "source": "labels.json of --model"}
    bundle = run.get("model")
    if bundle:
        uri = storage.join(bundle, "labels.json")
        try:
            labels = LabelMap.load(uri)
        except (OSError, ValueError) as exc:
            logger.warning(
                "failed to read %s (%s); estimating the model's species from the top-k names",
                uri,
                exc,
            )
        else:
            return set(labels.names), {"bundle": bundle, "source": f"labels.json of {bundle}"}
    names = {
        name
        for row in label_rows.column("topk_names").to_pylist()
        for name in (row or [])
        if name is not None
    }
    return names, {
        "bundle": bundle,
        "source": "estimated: every name in the rows' topk_names (labels.json not readable)",
    }


def _check_same_model(bundle: str, run: dict) -> None:
    """Warn when --model is not the bundle that wrote the label rows."""
    if not run.get("weights_sha256"):
        return
    try:
        info = json.loads(storage.read_text(storage.join(bundle, "bundle.json")))
    except (OSError, ValueError):
        return
    if info.get("weights_sha256") != run["weights_sha256"]:
        logger.warning(
            "the label rows come from %s, not from %s; its labels.json is used as the species "
            "list all the same",
            run.get("identifiedBy"),
            bundle,
        )


def _run_label_job(config: EvaluateConfig, label_output: str) -> None:
    from herbray.label import label

    source_options = {f.name: getattr(config, f.name) for f in dataclasses.fields(SourceOptions)}
    result = label(
        LabelConfig(
            **source_options,
            model=config.model,
            input=config.input,
            output=label_output,
            # Threshold 0: every row keeps its top-1, and the sweep applies thresholds later.
            threshold=0.0,
            top_k=config.top_k,
            batch_size=config.batch_size,
            num_actors=config.num_actors,
            cpus_per_actor=config.cpus_per_actor,
            gpus_per_actor=config.gpus_per_actor,
            torch_threads=config.torch_threads,
            precision=config.precision,
            ray_address=config.ray_address,
            num_cpus=config.num_cpus,
        )
    )
    logger.info(result.summary_line())


def evaluate(config: EvaluateConfig) -> EvaluateResult:
    """Run the evaluation job: label (with --model) or read label rows, join, measure, report."""
    started = time.time()
    output = config.output.rstrip("/")

    # Label rows: from a label run now, or from an existing output.
    if config.labels:
        label_output = config.labels.rstrip("/")
    else:
        label_output = storage.join(output, LABELS_SUBDIR)
        _run_label_job(config, label_output)
    label_rows = read_output(label_output, list(LABEL_COLUMNS))
    if label_rows.num_rows == 0:
        logger.warning("%s contains no label rows", label_output)
    run = _read_run(label_output)

    # Truth and the join.
    truth_source = config.truth or config.input
    truth = config.read_source(truth_source).images()
    known, known_info = known_species(config, run, label_rows)
    rows, join = join_rows(label_rows, truth)
    if join["evaluated"] == 0 and label_rows.num_rows and truth.num_rows:
        logger.warning(
            "no label row matches a truth row on image_uri: label rows have URIs like %s, the "
            "truth like %s; label the same files the truth names, by the same paths",
            storage.redact(label_rows.column("image_uri")[0].as_py() or ""),
            storage.redact(truth.column("image_uri")[0].as_py() or ""),
        )
    elif join["truth_without_label"] or join["labels_without_truth"]:
        logger.warning(
            "%d truth rows have no label row and %d label rows have no truth species; see %s",
            join["truth_without_label"],
            join["labels_without_truth"],
            storage.join(output, REPORT_FILE),
        )

    # Figures.
    evaluation, results, bins = summarise(rows, known, config)
    evaluation = {
        "herbray_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": {
            "identifiedBy": run.get("identifiedBy"),
            "weights_sha256": run.get("weights_sha256"),
            "bundle": known_info["bundle"],
            "known_species": len(known),
            "known_species_source": known_info["source"],
        },
        "label_output": label_output,
        "truth": truth_source,
        "join": join,
        **evaluation,
        "files": {
            "report": REPORT_FILE,
            "per_species": PER_SPECIES_FILE,
            "rows": ROWS_FILE,
            "confusion": CONFUSION_PNG,
            "reliability": RELIABILITY_PNG,
            "thresholds": THRESHOLDS_PNG,
        },
    }

    # Files: pictures, tables, report, settings.
    storage.makedirs(output)
    storage.write_bytes(
        storage.join(output, CONFUSION_PNG),
        plot_confusion(results.names, results.confusion, config.confusion_species),
    )
    storage.write_bytes(
        storage.join(output, RELIABILITY_PNG),
        plot_reliability(bins, evaluation["calibration"]["ece"]),
    )
    storage.write_bytes(
        storage.join(output, THRESHOLDS_PNG),
        plot_thresholds(
            evaluation["thresholds"], config.threshold, evaluation["suggested_threshold"]
        ),
    )
    storage.write_text(
        storage.join(output, PER_SPECIES_FILE), per_species_csv(evaluation["per_species"])
    )
    parquet = io.BytesIO()
    pq.write_table(rows_table(rows, known), parquet)
    storage.write_bytes(storage.join(output, ROWS_FILE), parquet.getvalue())
    storage.write_text(
        storage.join(output, EVALUATION_FILE),
        json.dumps(evaluation, indent=1, ensure_ascii=False) + "\n",
    )
    storage.write_text(storage.join(output, REPORT_FILE), render_report(evaluation))
    cfg.save(config, storage.join(output, "evaluate.yaml"))

    result = EvaluateResult(output=output, evaluation=evaluation, seconds=time.time() - started)
    logger.info(result.summary_line())
    return result
