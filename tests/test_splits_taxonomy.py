"""Label vocabulary and grouped, stratified splits."""

from __future__ import annotations

import json
import random
from collections import Counter, defaultdict

import pyarrow as pa
import pytest

from herbray.splits import assign_splits
from herbray.taxonomy import LabelMap, natural_key


def test_label_map_natural_order_and_round_trip(tmp_path):
    labels = LabelMap.from_names(["10", "2", "1", "2", None, "Acer × freemanii", "acer rubrum"])
    assert labels.names == ("1", "2", "10", "acer rubrum", "Acer × freemanii")
    assert labels.counts == (1, 2, 1, 1, 1)
    path = tmp_path / "labels.json"
    labels.save(str(path))
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["classes"][4] == {"index": 4, "name": "Acer × freemanii", "count": 1}
    assert LabelMap.load(str(path)) == labels


def test_label_map_missing_species_never_shifts():
    labels = LabelMap.from_names(["1", "2", "10"])
    assert labels.encode(["1", "10", "unknown", None]) == [0, 2, -1, -1]
    grown = labels.extended(["10", "3", "Viola"])
    assert grown.names[:3] == ("1", "2", "10")
    assert grown.names[3:] == ("3", "Viola")
    with pytest.raises(KeyError, match="'Viola' is not in the label map of 3 species"):
        labels.index("Viola")


def test_label_map_rejects_foreign_json(tmp_path):
    path = tmp_path / "labels.json"
    path.write_text('{"classes": []}')
    with pytest.raises(ValueError, match="not a herbray labels file"):
        LabelMap.load(str(path))


def test_natural_key_orders_numbers():
    assert sorted(["sp 10", "sp 9", "Sp 1"], key=natural_key) == ["Sp 1", "sp 9", "sp 10"]


def _collector_table(seed=1, n=3000, species=60):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        rows.append(
            {
                "specimen_id": f"s{i}",
                "scientific_name": f"sp{rng.randrange(species)}",
                "recorded_by": f"c{min(int(rng.paretovariate(1.2)), 300)}",
            }
        )
    return pa.Table.from_pylist(rows)


def test_split_keeps_each_collector_on_one_side():
    table, report = assign_splits(_collector_table(), group_column="recorded_by")
    sides = defaultdict(set)
    for collector, split in zip(
        table.column("recorded_by").to_pylist(), table.column("split").to_pylist(), strict=True
    ):
        sides[collector].add(split)
    rare = set(report.train_only_species)
    assert not rare  # every species here has many collectors
    assert all(len(s) == 1 for s in sides.values())
    assert sum(report.images.values()) == table.num_rows


def test_split_is_stratified_by_species():
    table, report = assign_splits(_collector_table(n=6000), group_column="specimen_id")
    assert report.images["train"] == pytest.approx(4200, rel=0.05)
    for species, counts in report.species_images.items():
        total = sum(counts.values())
        assert counts["train"] / total == pytest.approx(0.7, abs=0.12), species
        assert counts["test"] > 0, species


def test_split_independent_of_row_order():
    table = _collector_table()
    first, _ = assign_splits(table, group_column="recorded_by", seed=3)
    order = list(range(table.num_rows))
    random.Random(0).shuffle(order)
    shuffled, _ = assign_splits(table.take(order), group_column="recorded_by", seed=3)
    expected = dict(
        zip(first.column("specimen_id").to_pylist(), first.column("split").to_pylist(), strict=True)
    )
    got = dict(
        zip(
            shuffled.column("specimen_id").to_pylist(),
            shuffled.column("split").to_pylist(),
            strict=True,
        )
    )
    assert got == expected
    other_seed, _ = assign_splits(table, group_column="recorded_by", seed=4)
    assert other_seed.column("split").to_pylist() != first.column("split").to_pylist()


def test_split_rare_species_train_only_and_unlabelled_null():
    rows = [
        {"specimen_id": "a", "scientific_name": "Rare one", "recorded_by": "X"},
        {"specimen_id": "b", "scientific_name": "Rare one", "recorded_by": "Y"},
        {"specimen_id": "c", "scientific_name": None, "recorded_by": "Y"},
    ] + [
        {"specimen_id": f"d{i}", "scientific_name": "Common", "recorded_by": f"C{i}"}
        for i in range(20)
    ]
    table, report = assign_splits(pa.Table.from_pylist(rows), group_column="recorded_by")
    splits = dict(
        zip(table.column("specimen_id").to_pylist(), table.column("split").to_pylist(), strict=True)
    )
    assert report.train_only_species == ["Rare one"]
    assert splits["a"] == splits["b"] == "train"
    assert splits["c"] is None
    assert report.unlabelled == 1
    assert Counter(splits[f"d{i}"] for i in range(20))["test"] >= 2


def test_split_bad_arguments():
    table = pa.Table.from_pylist([{"specimen_id": "a", "scientific_name": "x"}])
    with pytest.raises(ValueError, match="group column 'collector' is not in the catalog"):
        assign_splits(table, group_column="collector")
    with pytest.raises(ValueError, match="split fractions"):
        assign_splits(table, fractions=(0, 0.5, 0.5))
