"""Classification metrics from counts that add up across batches and workers.

:class:`ClassCounts` keeps per-species true positives, false positives and
false negatives plus top-1 / top-5 hit counts. Counts from several workers are
summed (``merge``, or one all-reduce of :meth:`to_tensor`), so a metric over a
sharded validation set equals the metric over the whole set.

:func:`reliability_bins` sorts top-1 confidences into equal-width bins for the
reliability diagram and the expected calibration error.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class ClassCounts:
    """Counts for ``num_classes`` species; labels outside 0..num_classes-1 are not counted."""

    num_classes: int
    true_positives: np.ndarray = field(default=None)  # type: ignore[assignment]
    false_positives: np.ndarray = field(default=None)  # type: ignore[assignment]
    false_negatives: np.ndarray = field(default=None)  # type: ignore[assignment]
    top1: int = 0
    top5: int = 0
    total: int = 0
    loss_sum: float = 0.0

    def __post_init__(self) -> None:
        for name in ("true_positives", "false_positives", "false_negatives"):
            if getattr(self, name) is None:
                setattr(self, name, np.zeros(self.num_classes, dtype=np.int64))

    def update(self, logits: np.ndarray, labels: np.ndarray, loss_sum: float = 0.0) -> None:
        """Add a batch of logits (N x C) with their true label indices (N)."""
        logits = np.asarray(logits)
        labels = np.asarray(labels).astype(np.int64)
        if len(labels) == 0:
            return
        k = min(5, logits.shape[1])
        top = np.argpartition(-logits, kth=k - 1, axis=1)[:, :k]
        predicted = np.argmax(logits, axis=1)
        self.top1 += int((predicted == labels).sum())
        self.top5 += int((top == labels[:, None]).any(axis=1).sum())
        self.total += len(labels)
        self.loss_sum += float(loss_sum)
        hit = predicted == labels
        np.add.at(self.true_positives, labels[hit], 1)
        np.add.at(self.false_positives, predicted[~hit], 1)
        np.add.at(self.false_negatives, labels[~hit], 1)

    def update_predictions(
        self, labels: np.ndarray, predicted: np.ndarray, topk_hits: np.ndarray
    ) -> None:
        """Add predicted species indices (N) with their true indices (N) and top-k hits (N).

        This suits predictions already reduced to names, such as label output rows. A
        predicted index of -1 is an image without a prediction (a scan that
        failed): it counts as wrong for its true species and as nobody's false
        positive. ``topk_hits`` is True where the true species is among the
        image's top-5 suggestions.
        """
        labels = np.asarray(labels, dtype=np.int64)
        predicted = np.asarray(predicted, dtype=np.int64)
        topk_hits = np.asarray(topk_hits, dtype=bool)
        if not len(labels) == len(predicted) == len(topk_hits):
            raise ValueError(
                f"labels, predicted and topk_hits differ in length: "
                f"{len(labels)}, {len(predicted)}, {len(topk_hits)}"
            )
        if len(labels) and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(
                f"true labels must be in 0..{self.num_classes - 1}, got values from "
                f"{labels.min()} to {labels.max()}"
            )
        if len(predicted) and (predicted.min() < -1 or predicted.max() >= self.num_classes):
            raise ValueError(
                f"predicted labels must be -1 or in 0..{self.num_classes - 1}, got values from "
                f"{predicted.min()} to {predicted.max()}"
            )
        hit = predicted == labels
        self.top1 += int(hit.sum())
        self.top5 += int(topk_hits.sum())
        self.total += len(labels)
        np.add.at(self.true_positives, labels[hit], 1)
        np.add.at(self.false_positives, predicted[~hit & (predicted >= 0)], 1)
        np.add.at(self.false_negatives, labels[~hit], 1)

    def merge(self, other: ClassCounts) -> ClassCounts:
        if other.num_classes != self.num_classes:
            raise ValueError(
                f"cannot merge counts of {other.num_classes} and {self.num_classes} classes"
            )
        return ClassCounts(
            self.num_classes,
            self.true_positives + other.true_positives,
            self.false_positives + other.false_positives,
            self.false_negatives + other.false_negatives,
            self.top1 + other.top1,
            self.top5 + other.top5,
            self.total + other.total,
            self.loss_sum + other.loss_sum,
        )

    def to_vector(self) -> np.ndarray:
        """All counts in one float64 vector, for a single all-reduce across workers."""
        return np.concatenate(
            [
                self.true_positives,
                self.false_positives,
                self.false_negatives,
                [self.top1, self.top5, self.total, self.loss_sum],
            ]
        ).astype(np.float64)

    @classmethod
    def from_vector(cls, vector: np.ndarray, num_classes: int) -> ClassCounts:
        c = num_classes
        counts = np.rint(vector[: 3 * c]).astype(np.int64)
        top1, top5, total = (int(round(v)) for v in vector[3 * c : 3 * c + 3])
        return cls(
            c, counts[:c], counts[c : 2 * c], counts[2 * c :], top1, top5, total, float(vector[-1])
        )

    def support(self) -> np.ndarray:
        return self.true_positives + self.false_negatives

    def precision(self) -> np.ndarray:
        predicted = self.true_positives + self.false_positives
        return np.divide(
            self.true_positives, predicted, out=np.zeros(self.num_classes), where=predicted > 0
        )

    def recall(self) -> np.ndarray:
        support = self.support()
        return np.divide(
            self.true_positives, support, out=np.zeros(self.num_classes), where=support > 0
        )

    def f1(self) -> np.ndarray:
        p, r = self.precision(), self.recall()
        return np.divide(2 * p * r, p + r, out=np.zeros(self.num_classes), where=(p + r) > 0)

    def summary(self, prefix: str = "") -> dict[str, float]:
        """Top-1, top-5, macro-F1 and balanced accuracy over the species that occur.

        Macro averages are over species with support (at least one true
        example), the convention of scikit-learn's ``labels=`` present classes.
        """
        present = self.support() > 0
        macro_f1 = float(self.f1()[present].mean()) if present.any() else 0.0
        balanced = float(self.recall()[present].mean()) if present.any() else 0.0
        total = max(self.total, 1)
        return {
            f"{prefix}top1": self.top1 / total,
            f"{prefix}top5": self.top5 / total,
            f"{prefix}macro_f1": macro_f1,
            f"{prefix}balanced_accuracy": balanced,
            f"{prefix}loss": self.loss_sum / total,
            f"{prefix}images": self.total,
        }


@dataclass
class ReliabilityBins:
    """Images per confidence bin with their mean confidence and accuracy.

    Bin ``b`` of ``B`` equal-width bins contains the confidences in
    ``(b/B, (b+1)/B]``, and a confidence of exactly 0 goes into bin 0. Empty
    bins have NaN means.
    """

    edges: np.ndarray  # B + 1 bin edges from 0 to 1
    counts: np.ndarray  # images per bin
    mean_confidence: np.ndarray
    accuracy: np.ndarray

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def expected_calibration_error(self) -> float:
        """Compute the expected calibration error (ECE), 0 when there are no images.

        ECE = sum over bins of |accuracy - mean confidence| x images in bin / images.
        """
        if self.total == 0:
            return 0.0
        filled = self.counts > 0
        gaps = np.abs(self.accuracy[filled] - self.mean_confidence[filled])
        return float((gaps * self.counts[filled]).sum() / self.total)


def reliability_bins(
    confidence: np.ndarray, correct: np.ndarray, num_bins: int = 15
) -> ReliabilityBins:
    """Sort top-1 confidences (in [0, 1]) and their correctness into ``num_bins`` bins."""
    if num_bins < 1:
        raise ValueError(f"num_bins must be >= 1, got {num_bins}")
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    if len(confidence) != len(correct):
        raise ValueError(
            f"confidence and correct differ in length: {len(confidence)}, {len(correct)}"
        )
    # A float32 softmax can exceed 1 by a rounding step; anything further out is a bug.
    if len(confidence) and (
        np.isnan(confidence).any() or confidence.min() < -1e-6 or confidence.max() > 1 + 1e-6
    ):
        raise ValueError(
            f"confidences must be numbers in [0, 1], got values from {confidence.min()} to "
            f"{confidence.max()}"
        )
    confidence = np.clip(confidence, 0.0, 1.0)
    index = np.clip(np.ceil(confidence * num_bins).astype(np.int64) - 1, 0, num_bins - 1)
    counts = np.bincount(index, minlength=num_bins)
    confidence_sum = np.bincount(index, weights=confidence, minlength=num_bins)
    correct_sum = np.bincount(index, weights=correct.astype(np.float64), minlength=num_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.where(counts > 0, confidence_sum / counts, np.nan)
        accuracy = np.where(counts > 0, correct_sum / counts, np.nan)
    return ReliabilityBins(np.linspace(0.0, 1.0, num_bins + 1), counts, mean_confidence, accuracy)
