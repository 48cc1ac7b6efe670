"""herbray label under a real local Ray: one row per image, resume after SIGKILL, exports."""

from __future__ import annotations

import csv
import io
import os
import sys
import zipfile
from datetime import datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from processes import kill_when_ready

from herbray.catalog import read_catalog
from herbray.label import LABELS_DIR, OUTPUT_SCHEMA, LabelConfig, label, read_output

REPO = Path(__file__).resolve().parent.parent


def files_on_disk(root: Path) -> list[str]:
    return sorted(str(p) for p in root.rglob("*") if p.is_file())


def test_label_sheets_and_bad_inputs_one_row_per_file(shared_data, tiny_bundle, tmp_path):
    for source in ("sheets", "bad-inputs"):
        root = shared_data / source
        output = tmp_path / source
        result = label(LabelConfig(model=str(tiny_bundle), input=str(root), output=str(output)))
        table = read_output(str(output))
        uris = table.column("image_uri").to_pylist()
        catalog = read_catalog(str(root))
        skipped = {str(root / rel) for paths in catalog.skipped.values() for rel in paths}

        # Every file is either exactly one row or a reported skip; nothing else.
        assert len(uris) == len(set(uris))
        assert sorted(set(uris) | skipped) == files_on_disk(root)
        assert not set(uris) & skipped
        assert result.images == table.num_rows == catalog.num_images
        if source == "sheets":
            assert table.num_rows == 196
            assert set(table.column("status").to_pylist()) <= {"ok", "uncertain"}

    bad = {
        os.path.relpath(r["image_uri"], shared_data / "bad-inputs"): r
        for r in read_output(str(tmp_path / "bad-inputs")).to_pylist()
    }
    errors = {name: r["error"] for name, r in bad.items() if r["status"] == "error"}
    assert errors == {
        "images/truncated_baseline.jpg": "truncated",
        "images/garbage_bytes.jpg": "unidentified_image",
        "images/empty_0_bytes.jpg": "empty_file",
    }
    for name in errors:
        assert bad[name]["scientificName"] is None
        assert bad[name]["topk_names"] is None
    assert bad["images/huge_pixel_limit_13400x13400.jpg"]["width"] == 13400
    assert bad["images/exif_orientation_6.jpg"]["height"] == 1350
    assert bad["unicode/Quercus_robur_🌳.jpg"]["image_uri"].endswith("Quercus_robur_🌳.jpg")


def test_label_output_schema_and_terms(tiny_bundle, tiny_collection, tmp_path):
    output = tmp_path / "out"
    label(
        LabelConfig(
            model=str(tiny_bundle),
            input=str(tiny_collection / "archive"),
            output=str(output),
            threshold=0.0,
            top_k=3,
        )
    )
    files = sorted((output / LABELS_DIR).glob("part-*.parquet"))
    assert files
    for path in files:
        schema = pq.read_schema(path)
        assert schema.remove_metadata() == OUTPUT_SCHEMA
        for field in schema:
            assert not isinstance(field.type, pa.ExtensionType), field
    rows = read_output(str(output)).to_pylist()
    assert len(rows) == 6
    for row in rows:
        assert row["status"] == "ok"
        assert row["scientificName"] == row["topk_names"][0]
        assert len(row["topk_names"]) == len(row["topk_scores"]) == 3
        assert row["topk_scores"] == sorted(row["topk_scores"], reverse=True)
        assert row["confidence"] == pytest.approx(row["topk_scores"][0])
        assert row["identifiedBy"].startswith("herbray test_tiny model sha256:")
        assert datetime.fromisoformat(row["dateIdentified"].replace("Z", "+00:00")).tzinfo
        assert row["identificationVerificationStatus"] == "unverified"
        assert (row["width"], row["height"]) == (300, 450)


def test_label_threshold_makes_uncertain(tiny_bundle, tiny_collection, tmp_path):
    output = tmp_path / "strict"
    result = label(
        LabelConfig(
            model=str(tiny_bundle),
            input=str(tiny_collection / "archive"),
            output=str(output),
            threshold=1.0,
        )
    )
    assert result.counts == {"ok": 0, "uncertain": 6, "error": 0}
    for row in read_output(str(output)).to_pylist():
        assert row["scientificName"] is None
        assert row["topk_names"]
        assert "below threshold" in row["identificationRemarks"]


def test_label_refuses_output_of_other_model(tiny_bundle, tiny_collection, tmp_path):
    output = tmp_path / "out"
    label(
        LabelConfig(
            model=str(tiny_bundle), input=str(tiny_collection / "archive"), output=str(output)
        )
    )
    (output / "run.json").write_text(
        (output / "run.json").read_text().replace('"weights_sha256": "', '"weights_sha256": "x'),
        encoding="utf-8",
    )
    with pytest.raises(ValueError, match="holds labels from another model"):
        label(
            LabelConfig(
                model=str(tiny_bundle), input=str(tiny_collection / "archive"), output=str(output)
            )
        )
    result = label(
        LabelConfig(
            model=str(tiny_bundle),
            input=str(tiny_collection / "archive"),
            output=str(output),
            overwrite=True,
        )
    )
    assert result.labelled_now == 6


def _label_command(bundle, source, output) -> list[str]:
    return [
        sys.executable,
        "-m",
        "herbray",
        "label",
        "--model",
        str(bundle),
        "--input",
        str(source),
        "--output",
        str(output),
        "--rows-per-file",
        "4",
        "--batch-size",
        "4",
        "--num-cpus",
        "2",
    ]


def test_label_killed_driver_resumes_exactly_once(shared_data, tiny_bundle, tmp_path):
    source = shared_data / "sheets" / "bu-spark"
    output = tmp_path / "out"
    parts = output / LABELS_DIR
    env = dict(os.environ, RAY_ADDRESS="")
    env.pop("RAY_ADDRESS")
    kill_when_ready(
        _label_command(tiny_bundle, source, output),
        env,
        lambda: len(list(parts.glob("part-*.parquet"))) >= 2,
    )
    assert list(parts.glob("part-*.parquet")), "no part file appeared"

    before = {p.name for p in parts.glob("part-*.parquet")}
    rows_before = read_output(str(output)).num_rows
    assert 0 < rows_before < 118
    # What a crash mid-write leaves: a temporary file, never read as output.
    (parts / ".tmp-crashed").write_bytes(b"PAR1 partial")

    result = label(LabelConfig(model=str(tiny_bundle), input=str(source), output=str(output)))
    table = read_output(str(output))
    ids = table.column("specimen_id").to_pylist()
    assert len(ids) == len(set(ids)) == 118
    assert sorted(table.column("image_uri").to_pylist()) == sorted(str(p) for p in source.iterdir())
    assert before <= {p.name for p in parts.glob("part-*.parquet")}  # finished files were kept
    assert result.labelled_now == 118 - rows_before
    assert not (parts / ".tmp-crashed").exists()


def test_export_dwca_and_csv_round_trip(tiny_bundle, tiny_collection, tmp_path):
    from herbray.export import export_csv, export_dwca

    output = tmp_path / "out"
    label(
        LabelConfig(
            model=str(tiny_bundle),
            input=str(tiny_collection / "archive"),
            output=str(output),
            threshold=0.0,
            top_k=3,
        )
    )
    rows = {r["specimen_id"]: r for r in read_output(str(output)).to_pylist()}

    archive = tmp_path / "labels-dwca.zip"
    assert export_dwca(str(output), str(archive)) == 6
    catalog = read_catalog(str(archive))  # our own Darwin Core Archive reader
    for record in catalog.table.to_pylist():
        row = rows[record["specimen_id"]]
        assert record["scientific_name"] == row["scientificName"]
        assert record["image_uri"] == row["image_uri"]
    with zipfile.ZipFile(archive) as handle:
        history = list(
            csv.DictReader(io.StringIO(handle.read("identification.txt").decode()), delimiter="\t")
        )
    assert len(history) == 6 * 3
    first = [h for h in history if h["coreid"] == next(iter(rows))]
    assert [h["scientificName"] for h in first] == rows[next(iter(rows))]["topk_names"]

    table = tmp_path / "labels.csv"
    assert export_csv(str(output), str(table)) == 6
    exported = list(csv.DictReader(table.open(encoding="utf-8")))
    assert {r["specimen_id"] for r in exported} == set(rows)
    assert all(r["suggestions"].count(" | ") == 2 for r in exported)
