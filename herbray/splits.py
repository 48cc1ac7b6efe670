"""Deterministic train / validation / test splits, stratified by species and grouped.

Whole groups go to one side: with the collector as the group, one collector's
sheets never sit on both sides, as in the Herbaria255 study (Carranza-Rojas et
al. 2017), so the test set measures sheets from collectors the model has not
seen. Without a group column each specimen is its own group.

The assignment depends only on the group and species values and the seed, not
on row order, so the same collection splits the same way every time.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import pyarrow as pa

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.7, 0.15, 0.15)


@dataclass
class SplitReport:
    """What a split did: sizes, the species kept in training only, and why."""

    group_column: str
    fractions: tuple[float, float, float]
    images: dict[str, int] = field(default_factory=dict)
    groups: dict[str, int] = field(default_factory=dict)
    species_images: dict[str, dict[str, int]] = field(default_factory=dict)
    train_only_species: list[str] = field(default_factory=list)
    species_without_train: list[str] = field(default_factory=list)
    unlabelled: int = 0

    def to_json(self) -> dict:
        return {
            "group_column": self.group_column,
            "fractions": dict(zip(SPLITS, self.fractions, strict=True)),
            "images": self.images,
            "groups": self.groups,
            "train_only_species": self.train_only_species,
            "species_without_train": self.species_without_train,
            "unlabelled": self.unlabelled,
            "species_images": self.species_images,
        }


def _stable_hash(seed: int, value: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}\x00{value}".encode()).digest()[:8], "big")


def _check_fractions(fractions: tuple[float, float, float]) -> tuple[float, float, float]:
    if len(fractions) != 3 or any(f < 0 for f in fractions) or fractions[0] <= 0:
        raise ValueError(
            f"split fractions must be three non-negative numbers for train, val and test "
            f"with train > 0, got {fractions!r}"
        )
    total = sum(fractions)
    return tuple(f / total for f in fractions)  # type: ignore[return-value]


def assign_splits(
    table: pa.Table,
    *,
    group_column: str | None = None,
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
    seed: int = 0,
) -> tuple[pa.Table, SplitReport]:
    """Add a ``split`` column (train / val / test; null for unlabelled rows).

    Args:
        table: catalog table with ``specimen_id`` and ``scientific_name``.
        group_column: column whose value keeps rows together (null values fall
            back to the specimen); None groups by specimen, a plain stratified split.
        fractions: target shares of train, val and test images per species.
        seed: changes which groups go where, nothing else.

    A species needs one group for training plus one for each non-empty held-out
    split; species with fewer groups are kept in training only and reported.
    """
    fractions = _check_fractions(fractions)
    group_column = group_column or "specimen_id"
    if group_column not in table.column_names:
        raise ValueError(
            f"group column {group_column!r} is not in the catalog; columns are "
            f"{', '.join(table.column_names)}"
        )
    species = table.column("scientific_name").to_pylist()
    ids = table.column("specimen_id").to_pylist()
    raw_groups = table.column(group_column).to_pylist()
    groups = [
        g if g not in (None, "") else f"specimen:{i}" for g, i in zip(raw_groups, ids, strict=True)
    ]

    species_groups: dict[str, set[str]] = defaultdict(set)
    for sp, g in zip(species, groups, strict=True):
        if sp is not None:
            species_groups[sp].add(g)
    held_out = [s for s, f in zip(SPLITS[1:], fractions[1:], strict=True) if f > 0]
    min_groups = 1 + len(held_out)
    rare = {sp for sp, gs in species_groups.items() if len(gs) < min_groups}

    # Image counts per group and species, without the species kept in training only.
    group_counts: dict[str, Counter] = defaultdict(Counter)
    totals: Counter = Counter()
    for sp, g in zip(species, groups, strict=True):
        if sp is not None and sp not in rare:
            group_counts[g][sp] += 1
            totals[sp] += 1
    targets = {
        split: {sp: frac * n for sp, n in totals.items()}
        for split, frac in zip(SPLITS, fractions, strict=True)
    }
    allocated = {split: Counter() for split in SPLITS}
    assignment: dict[str, str] = {}

    def assign(group: str, split: str) -> None:
        assignment[group] = split
        allocated[split].update(group_counts[group])

    order = sorted(group_counts, key=lambda g: _stable_hash(seed, g))

    # Largest groups first, each to the split that brings the per-species shares
    # closest to the targets (sum of squared relative errors).
    for group in sorted(
        (g for g in order if g not in assignment),
        key=lambda g: -sum(group_counts[g].values()),
    ):
        best_split, best_cost = "train", None
        for split in SPLITS:
            if split != "train" and split not in held_out:
                continue
            cost = 0.0
            for sp, n in group_counts[group].items():
                before = allocated[split][sp] - targets[split][sp]
                cost += ((before + n) ** 2 - before**2) / totals[sp] ** 2
            if best_cost is None or cost < best_cost - 1e-12:
                best_split, best_cost = split, cost
        assign(group, best_split)

    column = []
    for sp, g in zip(species, groups, strict=True):
        if sp is None:
            column.append(None)
        elif sp in rare:
            column.append("train")
        else:
            column.append(assignment[g])

    report = _report(species, groups, column, group_column, fractions, rare)
    if report.train_only_species:
        logger.warning(
            "%d species have fewer than %d %s groups and are kept in training only: %s",
            len(report.train_only_species),
            min_groups,
            group_column,
            ", ".join(report.train_only_species[:10]),
        )
    if report.species_without_train:
        logger.warning(
            "%d species have no training images because all their %s groups were held out: %s",
            len(report.species_without_train),
            group_column,
            ", ".join(report.species_without_train[:10]),
        )
    if "split" in table.column_names:
        table = table.drop_columns(["split"])
    return table.append_column("split", pa.array(column, pa.string())), report


def _report(species, groups, column, group_column, fractions, rare) -> SplitReport:
    report = SplitReport(group_column=group_column, fractions=fractions)
    report.images = {s: column.count(s) for s in SPLITS}
    report.groups = {
        s: len({g for g, c in zip(groups, column, strict=True) if c == s}) for s in SPLITS
    }
    report.unlabelled = column.count(None)
    per_species: dict[str, Counter] = defaultdict(Counter)
    for sp, split in zip(species, column, strict=True):
        if sp is not None:
            per_species[sp][split] += 1
    report.species_images = {
        sp: {s: per_species[sp][s] for s in SPLITS} for sp in sorted(per_species)
    }
    report.train_only_species = sorted(rare)
    report.species_without_train = sorted(sp for sp, c in per_species.items() if c["train"] == 0)
    return report
