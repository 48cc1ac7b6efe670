"""The pictures and the Markdown report of ``herbray evaluate``.

Everything here renders figures that :mod:`herbray.evaluate` has already
computed: PNG pictures drawn on matplotlib's Agg canvas (no display and no
pyplot state, so it is safe in Ray workers and threads), the per-species CSV
and ``report.md``.
"""

from __future__ import annotations

import csv
import io
import math

import numpy as np

from herbray import storage
from herbray.metrics import ReliabilityBins
from herbray.taxonomy import natural_key

REPORT_FILE = "report.md"
PER_SPECIES_FILE = "per_species.csv"
CONFUSION_PNG = "confusion.png"
RELIABILITY_PNG = "reliability.png"
THRESHOLDS_PNG = "thresholds.png"

# Columns of per_species.csv: the keys of each row of evaluation.json's per_species.
PER_SPECIES_COLUMNS = (
    "species",
    "support",
    "predicted",
    "correct",
    "precision",
    "recall",
    "f1",
    "no_prediction",
    "known_to_model",
    "most_confused_with",
    "most_confused_count",
)


# ---------------------------------------------------------------------------
# Pictures


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def _short(name: str, length: int = 34) -> str:
    return name if len(name) <= length else name[: length - 1] + "…"


def plot_confusion(names: list[str], confusion: np.ndarray, max_species: int) -> bytes:
    """Draw the confusion matrix of the species with the most errors, as truth or prediction.

    ``confusion`` is species x (species + 1), with images without a prediction
    in the last column. Cells show counts and are coloured by the share of the
    true species' images. Two extra columns count predictions of species
    outside the picture and images without a prediction, so that every row
    adds up to its support.
    """
    matrix = confusion
    count = len(names)
    off_diagonal = matrix[:, :count].copy()
    np.fill_diagonal(off_diagonal, 0)
    errors = off_diagonal.sum(axis=1) + off_diagonal.sum(axis=0) + matrix[:, count]
    support = matrix.sum(axis=1)
    order = sorted(range(count), key=lambda i: (-errors[i], -support[i], natural_key(names[i])))
    selected = sorted(order[:max_species], key=lambda i: natural_key(names[i]))

    rows = matrix[np.ix_(selected, selected)]
    other = matrix[selected, :count].sum(axis=1) - rows.sum(axis=1)
    cells = np.column_stack([rows, other, matrix[selected, count]])
    column_names = [_short(names[i]) for i in selected] + ["other species", "no prediction"]
    row_names = [_short(names[i]) for i in selected]
    share = cells / np.maximum(cells.sum(axis=1, keepdims=True), 1)

    side = max(4.0, 0.42 * len(column_names) + 3.0)
    figure = _new_figure(side + 1.0, max(3.5, 0.42 * len(row_names) + 3.0))
    axes = figure.add_subplot()
    if not selected:
        axes.text(0.5, 0.5, "no evaluated images", ha="center", va="center")
        axes.set_axis_off()
        return _png(figure)
    image = axes.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto")
    font = 9 if len(column_names) <= 12 else 7
    for (i, j), value in np.ndenumerate(cells):
        if value:
            axes.text(
                j,
                i,
                str(value),
                ha="center",
                va="center",
                fontsize=font,
                color="white" if share[i, j] > 0.5 else "black",
            )
    axes.set_xticks(range(len(column_names)), column_names, rotation=55, ha="right", fontsize=font)
    axes.set_yticks(range(len(row_names)), row_names, fontsize=font)
    axes.set_xlabel("predicted species (top-1)")
    axes.set_ylabel("true species")
    axes.set_title(
        f"Confusions of the {len(selected)} species with the most errors (of {count})\n"
        "colour: share of the true species' images",
        fontsize=10,
    )
    figure.colorbar(image, ax=axes, shrink=0.6, label="share of row")
    return _png(figure)


def plot_reliability(bins: ReliabilityBins, ece: float) -> bytes:
    """Draw a reliability diagram: accuracy per confidence bin against the diagonal, with counts."""
    figure = _new_figure(6.0, 6.5)
    top, bottom = figure.subplots(2, 1, height_ratios=[3, 1], sharex=True)
    width = bins.edges[1] - bins.edges[0]
    centres = bins.edges[:-1] + width / 2
    filled = bins.counts > 0

    # Top: accuracy per bin against perfect calibration.
    top.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    top.bar(
        centres[filled],
        bins.accuracy[filled],
        width=width * 0.9,
        color="tab:blue",
        alpha=0.8,
        label="accuracy in bin",
    )
    top.plot(
        bins.mean_confidence[filled],
        bins.accuracy[filled],
        "o",
        color="tab:red",
        markersize=4,
        label="(mean confidence, accuracy)",
    )
    top.set_xlim(0, 1)
    top.set_ylim(0, 1.02)
    top.set_ylabel("accuracy (top-1)")
    top.set_title(
        f"Reliability: ECE {ece:.3f} over {bins.total} images, {len(bins.counts)} bins",
        fontsize=10,
    )
    top.legend(loc="upper left", fontsize=8)

    # Bottom: images per bin.
    bottom.bar(centres, bins.counts, width=width * 0.9, color="tab:grey")
    for x, n in zip(centres[filled], bins.counts[filled], strict=True):
        bottom.text(x, n, str(n), ha="center", va="bottom", fontsize=7)
    bottom.set_ylim(0, max(1, int(bins.counts.max(initial=0))) * 1.25)
    bottom.set_xlabel("confidence (top-1 score)")
    bottom.set_ylabel("images")
    return _png(figure)


def _same_point_groups(sweep: list[dict]) -> list[tuple[dict, dict]]:
    """Group consecutive sweep rows that keep the same images into (first, last) pairs."""
    groups: list[tuple[dict, dict]] = []
    for row in sweep:
        if groups and groups[-1][1]["kept"] == row["kept"]:
            groups[-1] = (groups[-1][0], row)
        else:
            groups.append((row, row))
    return groups


def plot_thresholds(sweep: list[dict], threshold: float, suggested: dict | None) -> bytes:
    """Draw accuracy against coverage over the thresholds, and both against the threshold."""
    figure = _new_figure(11.0, 4.8)
    left, right = figure.subplots(1, 2)
    points = [r for r in sweep if r["accuracy"] is not None]
    coverage = [r["coverage"] for r in points]
    accuracy = [r["accuracy"] for r in points]
    left.plot(coverage, accuracy, "-o", color="tab:blue", markersize=3)
    groups = _same_point_groups(points)
    for first, last in groups[:: max(1, math.ceil(len(groups) / 10))]:
        span = f"{first['threshold']:.2f}"
        if last is not first:
            span += f"-{last['threshold']:.2f}"
        left.annotate(
            span,
            (first["coverage"], first["accuracy"]),
            textcoords="offset points",
            xytext=(4, 4),
            fontsize=7,
        )
    chosen = next(r for r in sweep if r["threshold"] == threshold)
    markers = [(chosen, "*", "tab:red", f"label threshold {threshold:.2f}")]
    if suggested is not None:
        markers.append((suggested, "D", "tab:green", f"suggested {suggested['threshold']:.2f}"))
    for row, marker, colour, text in markers:
        if row["accuracy"] is not None:
            left.plot(
                row["coverage"], row["accuracy"], marker, color=colour, markersize=11, label=text
            )
    left.set_xlim(0, 1.02)
    left.set_ylim(0, 1.1)
    left.set_xlabel("coverage (share of images kept)")
    left.set_ylabel("accuracy of kept images")
    left.set_title("Accuracy against coverage (numbers: thresholds)", fontsize=10)
    if left.get_legend_handles_labels()[0]:
        left.legend(loc="lower left", fontsize=8)

    thresholds = [r["threshold"] for r in sweep]
    right.plot(thresholds, [r["coverage"] for r in sweep], "-o", markersize=3, label="coverage")
    right.plot(
        [r["threshold"] for r in points], accuracy, "-o", markersize=3, label="accuracy of kept"
    )
    right.axvline(
        threshold, color="tab:red", linestyle="--", label=f"label threshold {threshold:.2f}"
    )
    if suggested is not None:
        right.axvline(
            suggested["threshold"],
            color="tab:green",
            linestyle=":",
            label=f"suggested {suggested['threshold']:.2f}",
        )
    right.set_xlim(0, 1)
    right.set_ylim(0, 1.02)
    right.set_xlabel("confidence threshold")
    right.set_title("Coverage and accuracy by threshold", fontsize=10)
    right.legend(loc="lower left", fontsize=8)
    return _png(figure)


# ---------------------------------------------------------------------------
# Tables and the Markdown report


def per_species_csv(table: list[dict]) -> str:
    """Format the per-species rows as CSV text, floats with 6 decimals."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=PER_SPECIES_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in table:
        writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in row.items()})
    return buffer.getvalue()


def _cell(text: object) -> str:
    """Make a value safe inside a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _images(count: int) -> str:
    return f"{count} image" if count == 1 else f"{count} images"


def _fraction(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def render_report(evaluation: dict) -> str:
    """Render the Markdown report: headline figures, threshold choice, pictures, species."""
    e = evaluation
    n = e["images"]
    model = e["model"]
    genus = e["genus"]
    known_only = e["known_species_only"]
    at = e["at_threshold"]
    suggested = e["suggested_threshold"]
    join = e["join"]
    identified_by = model.get("identifiedBy") or "unknown"
    bundle = model.get("bundle") or "bundle unknown"
    lines = [
        "# herbray evaluation",
        "",
        f"- **Model**: {identified_by} ({bundle})",
        f"- **Species the model knows**: {model['known_species']} "
        f"({model['known_species_source']})",
        f"- **Label rows**: {e['label_output']}",
        f"- **Truth**: {e['truth']}",
        f"- **Evaluated images**: {n} (label rows joined on image_uri to truth rows "
        "with a species)",
        f"- **Created**: {e['created']} by herbray {e['herbray_version']}",
        "",
        "## Results",
        "",
        "| measure | value |",
        "|---|---|",
        f"| top-1 accuracy | {_fraction(e['top1'])} ({e['correct']} of {n}) |",
        f"| top-5 accuracy | {_fraction(e['top5'])} |",
        f"| macro-F1 (over {e['species_in_truth']} true species) | {_fraction(e['macro_f1'])} |",
        f"| balanced accuracy | {_fraction(e['balanced_accuracy'])} |",
        f"| genus accuracy ({genus['images']} images with a known genus) | "
        f"{_fraction(genus['accuracy'])} |",
        f"| expected calibration error ({e['calibration']['bins']} bins) | "
        f"{_fraction(e['calibration']['ece'])} |",
        f"| top-1 on species the model knows ({known_only['images']} images) | "
        f"{_fraction(known_only['top1'])} |",
        f"| images without a prediction (errors) | {e['errors']['images']} |",
        f"| images of species the model does not know | {e['unseen_species']['images']} |",
        "",
        "## Choosing the label threshold",
        "",
        f"At the label job's threshold {e['threshold']:.2f}, {at['kept']} of {n} images keep "
        f"their name (coverage {_fraction(at['coverage'])}) and {_fraction(at['accuracy'])} of "
        "those are right; images below it become `uncertain`.",
    ]
    if suggested is not None:
        lines.append(
            f"The lowest threshold whose kept images reach accuracy {e['target_accuracy']:.2f} is "
            f"**{suggested['threshold']:.2f}** (coverage {_fraction(suggested['coverage'])}, "
            f"accuracy {_fraction(suggested['accuracy'])}): pass it as `herbray label --threshold`."
        )
    else:
        lines.append(
            f"No threshold reaches accuracy {e['target_accuracy']:.2f} on the images it keeps."
        )
    lines += [
        "",
        f"![Accuracy and coverage by threshold]({THRESHOLDS_PNG})",
        "",
        "| threshold | kept | coverage | accuracy of kept | unseen species kept |",
        "|---|---|---|---|---|",
    ]
    for r in e["thresholds"]:
        lines.append(
            f"| {r['threshold']:.2f} | {r['kept']} | {_fraction(r['coverage'])} | "
            f"{_fraction(r['accuracy'])} | {r['unseen_kept']} |"
        )
    lines += [
        "",
        "## Calibration",
        "",
        f"Expected calibration error {_fraction(e['calibration']['ece'])} over "
        f"{e['calibration']['images']} images with a prediction: the mean gap between "
        "confidence and accuracy, weighted by the images in each confidence bin.",
        "",
        f"![Reliability diagram]({RELIABILITY_PNG})",
        "",
        "## Confusions",
        "",
        f"![Confusion matrix]({CONFUSION_PNG})",
        "",
    ]
    if e["confusion_pairs"]:
        lines += ["| true species | predicted as | images |", "|---|---|---|"]
        lines += [
            f"| {_cell(p['truth'])} | {_cell(p['predicted'])} | {p['images']} |"
            for p in e["confusion_pairs"][:10]
        ]
    else:
        lines.append("No image was predicted as another species.")

    unseen = e["unseen_species"]
    lines += ["", "## Species the model does not know", ""]
    if unseen["images"]:
        lines += [
            f"{_images(unseen['images'])} of {unseen['species']} species outside the model's "
            f"species list; all count as wrong in top-1. At threshold {e['threshold']:.2f}, "
            f"{unseen['uncertain_at_threshold']} become `uncertain` (rejected), "
            f"{unseen['kept_at_threshold']} keep a wrong name, {unseen['errors']} are errors.",
            "",
            "| species | images |",
            "|---|---|",
        ]
        lines += [f"| {_cell(s)} | {c} |" for s, c in unseen["images_per_species"].items()]
    else:
        lines.append("Every true species is one the model knows.")

    errors = e["errors"]
    lines += ["", "## Errors", ""]
    if errors["images"]:
        lines.append(
            f"{_images(errors['images'])} without a prediction (`status = error`), counted as "
            "wrong:"
        )
        lines += ["", "| reason | images |", "|---|---|"]
        lines += [f"| {_cell(r)} | {c} |" for r, c in errors["by_reason"].items()]
    else:
        lines.append("No image failed.")

    lines += [
        "",
        "## Matching label rows to the truth",
        "",
        f"- label rows: {join['label_rows']}; truth rows: {join['truth_rows']}",
        f"- evaluated (matched on image_uri): {join['evaluated']}",
        f"- truth rows without a label row: {join['truth_without_label']}",
        f"- label rows without a truth species: {join['labels_without_truth']}",
        f"- truth rows without a scientific_name: {join['truth_without_species']}",
        f"- repeated image_uri: {join['truth_duplicate_uris']} in the truth, "
        f"{join['label_duplicate_uris']} in the label rows (first row used)",
    ]
    for key, title in (
        ("truth_without_label_examples", "Truth rows without a label row"),
        ("labels_without_truth_examples", "Label rows without a truth species"),
    ):
        if join[key]:
            lines += ["", f"{title} (first {len(join[key])}):", ""]
            lines += [f"- `{storage.redact(uri)}`" for uri in join[key]]

    lines += [
        "",
        f"## Per-species results ([{PER_SPECIES_FILE}]({PER_SPECIES_FILE}))",
        "",
        "| species | support | predicted | precision | recall | F1 | known | most confused with |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in e["per_species"]:
        confused = (
            f"{_cell(r['most_confused_with'])} ({r['most_confused_count']})"
            if r["most_confused_with"]
            else ""
        )
        lines.append(
            f"| {_cell(r['species'])} | {r['support']} | {r['predicted']} | "
            f"{r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} | "
            f"{'yes' if r['known_to_model'] else 'no'} | {confused} |"
        )
    lines += [
        "",
        "## How the figures are computed",
        "",
        "- The prediction is the first of each row's `topk_names`; rows with `status = error` "
        "have none and count as wrong.",
        "- Macro-F1 and balanced accuracy average over the species that occur in the truth.",
        "- Genus: the truth's `genus` column where set, else the first word of its scientific "
        "name; the predicted genus is the first word of the predicted name.",
        "- A threshold keeps an image when its confidence is at least the threshold; coverage "
        "and accuracy count all evaluated images, errors included.",
        "- Calibration uses equal-width confidence bins; ECE = sum over bins of "
        "|accuracy - mean confidence| x images in bin / images.",
        "",
    ]
    return "\n".join(lines)
