"""Classification metrics from counts that add up across batches and workers.

:class:`ClassCounts` keeps per-species true positives, false positives and
false negatives plus top-1 / top-5 hit counts. Counts from several workers are
summed (``merge``, or one all-reduce of :meth:`to_tensor`), so a metric over a
sharded validation set equals the metric over the whole set.
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
