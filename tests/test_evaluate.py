"""herbray evaluate: figures checked by hand on small label outputs, files, CLI, real runs.

The hand-written case (``HAND_ROWS``) has 8 evaluated images of 3 known
species, 1 image of a species the model does not know and 1 error row, plus
one label row without truth and one truth row without a label row. The
expected values in the tests are worked out by hand in the comments.
"""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from herbray import cli
from herbray.config import ConfigError
from herbray.evaluate import (
    EvaluateConfig,
    evaluate,
    genus_of,
)
from herbray.label import OUTPUT_SCHEMA, LabelConfig, label, read_output
from herbray.metrics import ClassCounts, reliability_bins
from herbray.taxonomy import LabelMap

QA, QR, SN = "Quercus alba", "Quercus rubra", "Salix nigra"
SA = "Salix alba"  # not among the model's species
AR = "Acer rubrum"  # known to the model, in no truth row

MODEL_SPECIES = (QA, QR, SN, AR)

# image, true species, top-k names, top-1 confidence, error reason (None: a prediction).
# Confidences avoid the 0.05 grid: a float32 0.7 is 0.69999999, below a 0.7 threshold.
HAND_ROWS = [
    ("img1.jpg", QA, [QA, QR, SN], 0.92, None),  # right
    ("img2.jpg", QA, [QR, QA, SN], 0.62, None),  # wrong, in top-k, same genus
    ("img3.jpg", QR, [QR, QA, SN], 0.83, None),  # right
    ("img4.jpg", QR, [SN, QA, AR], 0.41, None),  # wrong, not in top-k, other genus
    ("img5.jpg", SN, [SN, QA, QR], 0.72, None),  # right
    ("img6.jpg", SN, [SN, QR, QA], 0.96, None),  # right
    ("img7.jpg", SA, [SN, QA, QR], 0.33, None),  # unseen species, same genus
    ("img8.jpg", QA, None, None, "truncated"),  # error row
]
LABEL_ONLY = ("img9.jpg", [QA, QR, SN], 0.88)  # label row without truth
TRUTH_ONLY = ("img10.jpg", QR)  # truth row without label row


def _label_row(uri: str, names: list[str] | None, confidence: float | None, error: str | None):
    if error:
        status = "error"
    elif confidence >= 0.5:
        status = "ok"
    else:
        status = "uncertain"
    scores = None
    if names is not None:
        rest = 1.0 - confidence
        scores = [confidence, rest * 0.6, rest * 0.3][: len(names)]
    return {
        "image_uri": uri,
        "specimen_id": uri.rsplit("/", 1)[-1],
        "scientificName": names[0] if status == "ok" else None,
        "confidence": confidence,
        "topk_names": names,
        "topk_scores": scores,
        "status": status,
        "error": error,
        "error_message": f"{error}: cut short" if error else None,
        "identifiedBy": "herbray test model",
        "dateIdentified": "2026-12-01T00:00:00Z",
        "identificationVerificationStatus": "unverified",
    }


def write_hand_case(root, bundle: str | None = "bundle", genus: dict | None = None) -> dict:
    """Write a label output, its run.json, a truth manifest and a bundle's labels.json."""
    images = root / "images"
    label_output = root / "label-output"
    (label_output / "labels").mkdir(parents=True)
    rows = [_label_row(str(images / f), names, c, e) for f, _, names, c, e in HAND_ROWS]
    rows.append(_label_row(str(images / LABEL_ONLY[0]), LABEL_ONLY[1], LABEL_ONLY[2], None))
    table = pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA)
    pq.write_table(table, label_output / "labels" / "part-hand.parquet")

    bundle_uri = None
    if bundle:
        bundle_dir = root / bundle
        bundle_dir.mkdir()
        LabelMap(MODEL_SPECIES, (3, 3, 3, 3)).save(str(bundle_dir / "labels.json"))
        bundle_uri = str(bundle_dir)
    run = {"model": bundle_uri or str(root / "moved-bundle"), "identifiedBy": "herbray test model"}
    (label_output / "run.json").write_text(json.dumps(run))

    truth = root / "truth.csv"
    with truth.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        header = ["image_path", "scientific_name", "specimen_id"]
        writer.writerow(header + (["genus"] if genus is not None else []))
        for f, name, *_ in [*HAND_ROWS, (TRUTH_ONLY[0], TRUTH_ONLY[1])]:
            extra = [genus.get(f, "")] if genus is not None else []
            writer.writerow([f"images/{f}", name, f.split(".")[0], *extra])
    return {"labels": str(label_output), "truth": str(truth), "images": images}


@pytest.fixture(scope="module")
def hand(tmp_path_factory):
    root = tmp_path_factory.mktemp("hand")
    paths = write_hand_case(root)
    output = root / "evaluation"
    result = evaluate(
        EvaluateConfig(labels=paths["labels"], truth=paths["truth"], output=str(output))
    )
    return {**paths, "output": output, "result": result, "e": result.evaluation}


# ---------------------------------------------------------------------------
# Figures by hand


def test_headline_figures_by_hand(hand):
    e = hand["e"]
    assert e["images"] == 8
    assert e["correct"] == 4  # img1, img3, img5, img6
    assert e["top1"] == pytest.approx(4 / 8)
    assert e["top5"] == pytest.approx(5 / 8)  # img2 adds a top-k hit
    # F1: QA 0.5 (P 1, R 1/3), QR 0.5 (P 1/2, R 1/2), SN 2/3 (P 1/2, R 1), SA 0.
    assert e["macro_f1"] == pytest.approx((0.5 + 0.5 + 2 / 3 + 0) / 4)
    # Recall: QA 1/3, QR 1/2, SN 1, SA 0.
    assert e["balanced_accuracy"] == pytest.approx((1 / 3 + 1 / 2 + 1 + 0) / 4)
    assert e["suggestions_per_image"] == 3


def test_per_species_precision_recall(hand):
    table = {row["species"]: row for row in hand["e"]["per_species"]}
    assert set(table) == {QA, QR, SN, SA}
    expected = {
        # species: support, predicted, precision, recall, f1
        QA: (3, 1, 1.0, 1 / 3, 0.5),
        QR: (2, 2, 0.5, 0.5, 0.5),
        SN: (2, 4, 0.5, 1.0, 2 / 3),
        SA: (1, 0, 0.0, 0.0, 0.0),
    }
    for name, (support, predicted, precision, recall, f1) in expected.items():
        row = table[name]
        assert row["support"] == support, name
        assert row["predicted"] == predicted, name
        assert row["precision"] == pytest.approx(precision), name
        assert row["recall"] == pytest.approx(recall), name
        assert row["f1"] == pytest.approx(f1), name
    assert table[QA]["no_prediction"] == 1
    assert table[SA]["known_to_model"] is False
    assert table[QR]["most_confused_with"] == SN
    assert sum(row["support"] for row in table.values()) == hand["e"]["images"]


def test_confusion_pairs_listed(hand):
    pairs = {(p["truth"], p["predicted"]): p["images"] for p in hand["e"]["confusion_pairs"]}
    assert pairs == {(QA, QR): 1, (QR, SN): 1, (SA, SN): 1}


def test_thresholds_coverage_and_accuracy(hand):
    sweep = {round(r["threshold"], 6): r for r in hand["e"]["thresholds"]}
    assert sorted(sweep)[:3] == [0.0, 0.05, 0.1]
    assert max(sweep) == 0.95
    assert len(sweep) == 20  # 0.00..0.95; the label threshold 0.5 is one of them
    # t = 0: all 7 rows with a prediction, 4 right; the error row is never kept.
    assert sweep[0.0]["kept"] == 7
    assert sweep[0.0]["coverage"] == pytest.approx(7 / 8)
    assert sweep[0.0]["accuracy"] == pytest.approx(4 / 7)
    # t = 0.5: 0.92, 0.62, 0.83, 0.72, 0.96 kept; only img2 (0.62) is wrong.
    assert sweep[0.5]["kept"] == 5
    assert sweep[0.5]["coverage"] == pytest.approx(5 / 8)
    assert sweep[0.5]["accuracy"] == pytest.approx(4 / 5)
    # t = 0.75: 0.92, 0.83, 0.96, all right.
    assert sweep[0.75]["coverage"] == pytest.approx(3 / 8)
    assert sweep[0.75]["accuracy"] == pytest.approx(1.0)
    assert sweep[0.3]["unseen_kept"] == 1  # img7 at 0.33
    assert sweep[0.35]["unseen_kept"] == 0
    assert hand["e"]["at_threshold"]["threshold"] == 0.5
    assert hand["e"]["at_threshold"]["kept"] == 5


def test_suggested_threshold_reaches_target(hand):
    # 0.60 still keeps img2 (0.62, wrong): 4/5; 0.65 keeps the 4 right rows only.
    suggested = hand["e"]["suggested_threshold"]
    assert suggested["threshold"] == pytest.approx(0.65)
    assert suggested["accuracy"] == pytest.approx(1.0)
    assert suggested["coverage"] == pytest.approx(4 / 8)


def test_ece_by_hand(hand):
    calibration = hand["e"]["calibration"]
    # Each of the 7 confidences falls into its own of the 15 bins, so the ECE is the
    # mean |correct - confidence|: .08 + .62 + .17 + .41 + .28 + .04 + .33 = 1.93.
    assert calibration["images"] == 7
    assert calibration["bins"] == 15
    assert calibration["ece"] == pytest.approx(1.93 / 7, abs=1e-6)
    assert sum(calibration["counts"]) == 7
    filled = [i for i, c in enumerate(calibration["counts"]) if c]
    # 0.33 * 15 = 4.95 -> bin 4; 0.41 -> 6; 0.62 -> 9; 0.72 -> 10; 0.83 -> 12; 0.92 -> 13;
    # 0.96 -> 14.
    assert filled == [4, 6, 9, 10, 12, 13, 14]
    assert calibration["accuracy"][9] == 0.0
    assert calibration["accuracy"][14] == 1.0
    assert calibration["mean_confidence"][0] is None  # empty bin


def test_genus_accuracy_first_word(hand):
    genus = hand["e"]["genus"]
    # Wrong genus: img4 (Quercus predicted Salix) and the error row img8.
    assert genus["images"] == 8
    assert genus["correct"] == 6
    assert genus["accuracy"] == pytest.approx(6 / 8)


def test_unseen_species_counted(hand):
    unseen = hand["e"]["unseen_species"]
    assert unseen["images"] == 1
    assert unseen["species"] == 1
    assert unseen["images_per_species"] == {SA: 1}
    assert unseen["uncertain_at_threshold"] == 1  # 0.33 < 0.5
    assert unseen["kept_at_threshold"] == 0
    assert unseen["errors"] == 0
    known_only = hand["e"]["known_species_only"]
    assert known_only["images"] == 7
    assert known_only["top1"] == pytest.approx(4 / 7)
    assert hand["e"]["model"]["known_species"] == 4
    assert "labels.json" in hand["e"]["model"]["known_species_source"]


def test_error_rows_by_reason(hand):
    assert hand["e"]["errors"] == {"images": 1, "by_reason": {"truncated": 1}}


def test_join_mismatches_reported(hand):
    join = hand["e"]["join"]
    images = hand["images"]
    assert join["label_rows"] == 9
    assert join["truth_rows"] == 9
    assert join["evaluated"] == 8
    assert join["truth_without_label"] == 1
    assert join["truth_without_label_examples"] == [str(images / TRUTH_ONLY[0])]
    assert join["labels_without_truth"] == 1
    assert join["labels_without_truth_examples"] == [str(images / LABEL_ONLY[0])]


# ---------------------------------------------------------------------------
# Files


def test_pictures_are_png(hand):
    for name in ("confusion.png", "reliability.png", "thresholds.png"):
        with Image.open(hand["output"] / name) as image:
            assert image.format == "PNG", name
            assert image.width >= 400, name
            assert image.height >= 300, name


def test_report_links_pictures_and_table(hand):
    report = (hand["output"] / "report.md").read_text()
    for name in ("confusion.png", "reliability.png", "thresholds.png"):
        assert f"]({name})" in report
    assert "| top-1 accuracy | 0.500 (4 of 8) |" in report
    assert f"| {SN} | 2 | 4 | 0.500 | 1.000 | 0.667 | yes |" in report
    assert "| truncated | 1 |" in report
    assert "**0.65**" in report
    assert str(hand["images"] / TRUTH_ONLY[0]) in report


def test_per_species_csv_and_json(hand):
    with (hand["output"] / "per_species.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["species"] for r in rows] == [QA, QR, SN, SA]  # by support, then name
    assert sum(int(r["support"]) for r in rows) == 8
    assert float(rows[0]["recall"]) == pytest.approx(1 / 3, abs=1e-6)
    saved = json.loads((hand["output"] / "evaluation.json").read_text())
    assert saved["top1"] == hand["e"]["top1"]
    assert saved["calibration"]["ece"] == pytest.approx(hand["e"]["calibration"]["ece"])
    rows_table = pq.read_table(hand["output"] / "rows.parquet")
    assert rows_table.num_rows == 8
    assert rows_table.column("correct").to_pylist().count(True) == 4
    assert (hand["output"] / "evaluate.yaml").exists()


def test_summary_line(hand):
    line = hand["result"].summary_line()
    assert line.startswith("herbray evaluate: 8 images, top-1 0.500, top-5 0.625")
    assert "suggested threshold 0.65" in line


# ---------------------------------------------------------------------------
# Other cases


def test_known_species_estimated_without_bundle(tmp_path):
    paths = write_hand_case(tmp_path, bundle=None)
    result = evaluate(
        EvaluateConfig(labels=paths["labels"], truth=paths["truth"], output=str(tmp_path / "out"))
    )
    model = result.evaluation["model"]
    assert model["known_species_source"].startswith("estimated")
    # Every model species occurs in some top-k list, Salix alba in none.
    assert model["known_species"] == 4
    assert result.evaluation["unseen_species"]["images"] == 1


def test_model_option_sets_species_list(tmp_path):
    # --model with --labels names the species list, here without Acer rubrum.
    paths = write_hand_case(tmp_path)
    bundle = tmp_path / "other-bundle"
    bundle.mkdir()
    LabelMap((QA, QR, SN), (3, 3, 3)).save(str(bundle / "labels.json"))
    result = evaluate(
        EvaluateConfig(
            labels=paths["labels"],
            truth=paths["truth"],
            model=str(bundle),
            output=str(tmp_path / "out"),
        )
    )
    model = result.evaluation["model"]
    assert model["known_species"] == 3
    assert model["known_species_source"] == "labels.json of --model"
    assert model["bundle"] == str(bundle)
    with pytest.raises(FileNotFoundError):
        evaluate(
            EvaluateConfig(
                labels=paths["labels"],
                truth=paths["truth"],
                model=str(tmp_path / "missing"),
                output=str(tmp_path / "out2"),
            )
        )


def test_output_to_s3(tmp_path, s3_bucket):
    from herbray import storage

    paths = write_hand_case(tmp_path)
    output = f"s3://{s3_bucket}/evaluations/hand"
    result = evaluate(EvaluateConfig(labels=paths["labels"], truth=paths["truth"], output=output))
    assert result.evaluation["top1"] == pytest.approx(0.5)
    for name in ("report.md", "evaluation.json", "per_species.csv", "rows.parquet"):
        assert storage.exists(f"{output}/{name}"), name
    png = storage.read_bytes(f"{output}/confusion.png")
    assert png.startswith(b"\x89PNG")
    saved = json.loads(storage.read_text(f"{output}/evaluation.json"))
    assert saved["images"] == 8


def test_genus_column_overrides_first_word(tmp_path):
    # img4's truth genus is set to Salix, so its Salix prediction is right at genus level.
    # Rows with an empty genus cell fall back to the first word.
    paths = write_hand_case(tmp_path, genus={"img4.jpg": "Salix", "img1.jpg": "Quercus"})
    result = evaluate(
        EvaluateConfig(labels=paths["labels"], truth=paths["truth"], output=str(tmp_path / "out"))
    )
    assert result.evaluation["genus"]["correct"] == 7
    assert result.evaluation["top1"] == pytest.approx(0.5)


def test_no_matching_rows_still_reports(tmp_path):
    paths = write_hand_case(tmp_path)
    other = tmp_path / "other.csv"
    other.write_text("image_path,scientific_name\nelsewhere/a.jpg,Quercus alba\n")
    result = evaluate(
        EvaluateConfig(labels=paths["labels"], truth=str(other), output=str(tmp_path / "out"))
    )
    e = result.evaluation
    assert e["images"] == 0
    assert e["join"]["truth_without_label"] == 1
    assert e["join"]["labels_without_truth"] == 9
    assert e["at_threshold"]["accuracy"] is None
    assert e["suggested_threshold"] is None
    assert (tmp_path / "out" / "report.md").exists()
    assert (tmp_path / "out" / "confusion.png").exists()


def test_cli_evaluates_label_output(tmp_path, capsys):
    paths = write_hand_case(tmp_path)
    output = tmp_path / "cli-out"
    code = cli.main(
        [
            "evaluate",
            "--labels",
            paths["labels"],
            "--truth",
            paths["truth"],
            "--output",
            str(output),
            "--threshold",
            "0.75",
        ]
    )
    assert code == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("herbray evaluate: 8 images, top-1 0.500")
    assert "at threshold 0.75 coverage 0.375, accuracy 1.000" in line
    saved = json.loads((output / "evaluation.json").read_text())
    assert saved["unseen_species"]["uncertain_at_threshold"] == 1


def test_cli_rejects_labels_with_input(tmp_path, capsys):
    code = cli.main(
        ["evaluate", "--labels", "x", "--input", "y", "--truth", "z", "--output", str(tmp_path)]
    )
    assert code == 2
    assert "--input 'y' is for labelling with --model" in capsys.readouterr().err


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"labels": "l", "truth": "t"}, "needs --output"),
        ({"labels": "l", "output": "o"}, "needs --truth"),
        ({"model": "m", "output": "o"}, "use --model and --input"),
        ({"labels": "l", "truth": "t", "output": "o", "threshold": 1.5}, "threshold must be"),
        ({"labels": "l", "truth": "t", "output": "o", "threshold_step": 0}, "threshold_step"),
    ],
)
def test_config_rejects_invalid(settings, message):
    with pytest.raises(ConfigError, match=message):
        EvaluateConfig(**settings)


def test_thresholds_include_label_threshold():
    config = EvaluateConfig(labels="l", truth="t", output="o", threshold=0.42, threshold_step=0.25)
    assert config.thresholds() == [0.0, 0.25, 0.42, 0.5, 0.75]


@pytest.mark.parametrize(
    "name, genus",
    [
        ("Quercus alba L.", "Quercus"),
        ("× Agropogon littoralis", "Agropogon"),
        ("Salix", "Salix"),
        ("", None),
        (None, None),
    ],
)
def test_genus_of_first_word(name, genus):
    assert genus_of(name) == genus


# ---------------------------------------------------------------------------
# herbray.metrics additions


def test_class_counts_from_predictions():
    counts = ClassCounts(3)
    labels = np.array([0, 0, 1, 2, 2])
    predicted = np.array([0, 1, 1, -1, 0])  # -1: an image without a prediction
    counts.update_predictions(labels, predicted, np.array([True, True, True, False, False]))
    assert counts.top1 == 2
    assert counts.top5 == 3
    assert counts.total == 5
    assert counts.true_positives.tolist() == [1, 1, 0]
    assert counts.false_positives.tolist() == [1, 1, 0]
    assert counts.false_negatives.tolist() == [1, 0, 2]
    with pytest.raises(ValueError, match="predicted labels must be"):
        counts.update_predictions(np.array([0]), np.array([3]), np.array([False]))


def test_reliability_bins_edges():
    # Bins are (lo, hi]: 0.5 belongs to bin 0 of 2, exactly 0 too, 0.51 and 1.0 to bin 1.
    bins = reliability_bins(np.array([0.0, 0.5, 0.51, 1.0]), np.array([0, 1, 1, 0]), 2)
    assert bins.counts.tolist() == [2, 2]
    assert bins.accuracy.tolist() == [0.5, 0.5]
    assert bins.mean_confidence.tolist() == pytest.approx([0.25, 0.755])
    # |0.5 - 0.25| * 2/4 + |0.5 - 0.755| * 2/4
    assert bins.expected_calibration_error() == pytest.approx(0.2525)
    empty = reliability_bins(np.array([]), np.array([]), 15)
    assert empty.expected_calibration_error() == 0.0
    assert math.isnan(empty.accuracy[0])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        reliability_bins(np.array([1.5]), np.array([1]), 15)


# ---------------------------------------------------------------------------
# Real runs: a trained tiny model on the synthetic demo archive, under a real local Ray


@pytest.fixture(scope="module")
def demo_model_run(tiny_bundle, tiny_collection, tmp_path_factory):
    """``herbray evaluate --model`` through the CLI, on the archive's truth manifest."""
    output = tmp_path_factory.mktemp("demo-eval") / "evaluation"
    code = cli.main(
        [
            "evaluate",
            "--model",
            str(tiny_bundle),
            "--input",
            str(tiny_collection / "archive-truth.csv"),
            "--output",
            str(output),
            "--num-cpus",
            "2",
        ]
    )
    assert code == 0
    return output


def test_model_mode_numbers_consistent(demo_model_run, tiny_collection):
    e = json.loads((demo_model_run / "evaluation.json").read_text())
    with (tiny_collection / "archive-truth.csv").open() as handle:
        truth_rows = list(csv.DictReader(handle))
    assert e["images"] == len(truth_rows) == 6
    assert e["join"]["truth_without_label"] == 0
    assert e["join"]["labels_without_truth"] == 0
    assert sum(r["support"] for r in e["per_species"]) == e["images"]
    assert sum(r["predicted"] for r in e["per_species"]) == e["images"] - e["errors"]["images"]
    assert e["errors"]["images"] == 0
    assert 0.0 <= e["top1"] <= e["top5"] <= 1.0
    assert e["top5"] == 1.0  # 3 species, 3 suggestions per image
    assert e["genus"]["accuracy"] >= e["top1"]
    assert e["correct"] == round(e["top1"] * e["images"])
    assert 0.0 <= e["calibration"]["ece"] <= 1.0
    assert e["calibration"]["images"] == 6
    # Threshold 0 in the label run: every image keeps its top-1, so coverage at 0 is 1.
    assert e["thresholds"][0]["coverage"] == 1.0
    assert e["thresholds"][0]["accuracy"] == pytest.approx(e["top1"])
    coverages = [r["coverage"] for r in e["thresholds"]]
    assert coverages == sorted(coverages, reverse=True)
    assert e["unseen_species"]["images"] == 0
    assert e["model"]["known_species"] == 3
    assert e["model"]["identifiedBy"].startswith("herbray test_tiny model")


def test_model_mode_runs_label_job_at_threshold_zero(demo_model_run):
    run = json.loads((demo_model_run / "labels" / "run.json").read_text())
    assert run["config"]["threshold"] == 0.0
    table = read_output(str(demo_model_run / "labels"))
    assert table.num_rows == 6
    assert set(table.column("status").to_pylist()) == {"ok"}
    for name in ("report.md", "per_species.csv", "confusion.png", "reliability.png"):
        assert (demo_model_run / name).stat().st_size > 0, name


def test_labels_of_archive_folder_join_truth(
    demo_model_run, tiny_bundle, tiny_collection, tmp_path
):
    # Labels of the archive/ folder (as the demo writes them) against archive-truth.csv:
    # the folder and manifest readers give the same absolute paths.
    labels = tmp_path / "labels"
    label(
        LabelConfig(
            model=str(tiny_bundle), input=str(tiny_collection / "archive"), output=str(labels)
        )
    )
    result = evaluate(
        EvaluateConfig(
            labels=str(labels),
            truth=str(tiny_collection / "archive-truth.csv"),
            output=str(tmp_path / "evaluation"),
        )
    )
    e = result.evaluation
    assert e["images"] == 6
    assert e["join"]["truth_without_label"] == 0
    assert e["join"]["labels_without_truth"] == 0
    assert e["model"]["bundle"] == str(tiny_bundle)
    # The same model on the same files: the same predictions as the --model run.
    ours = pq.read_table(tmp_path / "evaluation" / "rows.parquet").to_pylist()
    theirs = pq.read_table(demo_model_run / "rows.parquet").to_pylist()
    by_uri = {r["image_uri"]: r for r in theirs}
    assert {r["image_uri"] for r in ours} == set(by_uri)
    for row in ours:
        assert row["predicted"] == by_uri[row["image_uri"]]["predicted"]
        assert row["confidence"] == pytest.approx(by_uri[row["image_uri"]]["confidence"], abs=1e-5)

    # The same labels against a truth that names one sheet as a species the model lacks.
    # Absolute image paths let this manifest live outside the demo folder.
    with (tiny_collection / "archive-truth.csv").open() as handle:
        truth_rows = list(csv.DictReader(handle))
    for row in truth_rows:
        row["image_path"] = str(tiny_collection / row["image_path"])
    truth_rows[0]["scientific_name"] = "Galium simulatum Herbray"
    changed = tmp_path / "truth-with-unseen.csv"
    with changed.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(truth_rows[0]))
        writer.writeheader()
        writer.writerows(truth_rows)
    unseen_run = evaluate(
        EvaluateConfig(labels=str(labels), truth=str(changed), output=str(tmp_path / "unseen"))
    ).evaluation
    unseen = unseen_run["unseen_species"]
    assert unseen["images"] == 1
    assert unseen["images_per_species"] == {"Galium simulatum Herbray": 1}
    assert unseen["uncertain_at_threshold"] + unseen["kept_at_threshold"] == 1
    assert unseen_run["known_species_only"]["images"] == 5
    assert unseen_run["correct"] <= e["correct"]
