"""herbray prepare under a real local Ray, on real collections and bad inputs."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from herbray.prepare import PrepareConfig, load_prepared, prepare


def read_split(output, split):
    return pq.read_table(os.path.join(output, "shards", split))


def all_rows(output):
    rows = []
    for split in ("train", "val", "test"):
        if os.path.isdir(os.path.join(output, "shards", split)):
            rows += read_split(output, split).to_pylist()
    return rows


def read_json(path):
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def decode(jpeg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))


def red_fraction(array: np.ndarray) -> float:
    red = (array[..., 0] > 150) & (array[..., 1] < 90) & (array[..., 2] < 90)
    return float(red.mean())


@pytest.fixture(scope="module")
def violaceae_prepared(shared_data, ray_local, tmp_path_factory):
    output = str(tmp_path_factory.mktemp("prepared") / "violaceae")
    config = PrepareConfig(
        input=str(shared_data / "violaceae" / "labels.csv"),
        output=output,
        image_column="path",
        label_column="species_code",
        group_column="sub_code",
        short_side=128,
    )
    return output, prepare(config)


def test_prepare_violaceae_shards(violaceae_prepared, shared_data):
    output, result = violaceae_prepared
    rows = all_rows(output)
    assert result.images == 167
    assert result.errors == 0
    assert len(rows) == 167
    assert len({r["specimen_id"] for r in rows}) == 167
    prepared = load_prepared(output)
    assert len(prepared.labels) == 17
    for row in rows[:20]:
        image = decode(row["image"])
        assert min(image.shape[:2]) == 128
        assert (row["width"], row["height"]) == (image.shape[1], image.shape[0])
        assert prepared.labels.names[row["label"]] == row["scientific_name"]
    # A whole sub-code (source herbarium) sits on one side of the split.
    sides = {}
    for row in rows:
        sides.setdefault(row["sub_code"], set()).add(row["split"])
    trained_only = {"V03", "V05"}
    assert all(
        len(
            {
                r["split"]
                for r in rows
                if r["sub_code"] == code and r["scientific_name"] not in trained_only
            }
        )
        <= 1
        for code in sides
    )


def test_prepare_report_and_outputs(violaceae_prepared):
    output, result = violaceae_prepared
    report = read_json(os.path.join(output, "report.json"))
    assert report["images"] == 167
    assert sum(report["images_by_split"].values()) == 167
    assert report["errors_by_reason"] == {}
    assert set(report["images_by_species_and_split"]) == set(load_prepared(output).labels.names)
    assert report["split"]["train_only_species"] == ["V03", "V05"]
    assert os.path.isfile(os.path.join(output, "config.yaml"))
    assert pq.read_table(os.path.join(output, "errors.parquet")).num_rows == 0
    assert "images/s" in result.summary_line()


def test_prepare_split_manifests_read_back(violaceae_prepared):
    from herbray.catalog import read_catalog

    output, result = violaceae_prepared
    for split, count in result.report["images_by_split"].items():
        catalog = read_catalog(os.path.join(output, "splits", f"{split}.parquet"))
        assert catalog.num_images == count
        assert set(catalog.table.column("split").to_pylist()) == {split}
        assert all(os.path.isfile(uri) for uri in catalog.table.column("image_uri").to_pylist())


# Outcome of every file in bad-inputs: a reason code, or a check of the stored pixels.
BAD_INPUT_ERRORS = {
    "images/truncated_baseline.jpg": "truncated",
    "images/garbage_bytes.jpg": "unidentified_image",
    "images/empty_0_bytes.jpg": "empty_file",
}


def check_bad_input_row(name: str, row: dict) -> None:
    image = decode(row["image"])
    assert min(image.shape[:2]) == min(96, row["original_width"], row["original_height"])
    if name.startswith("images/huge_pixel_limit"):
        assert (row["original_width"], row["original_height"]) == (13400, 13400)
    elif name == "images/large_bomb_warning_9600x9600.png":
        assert (row["original_width"], row["original_height"]) == (9600, 9600)
    elif name.startswith("images/exif_orientation_"):
        assert (row["original_width"], row["original_height"]) == (900, 1350)
        top = image[: image.shape[0] // 5]
        bottom = image[-image.shape[0] // 5 :]
        assert red_fraction(top) > 0.01 > red_fraction(bottom), "colour strip not along the top"
    elif name in ("images/cmyk_adobe.jpg", "images/rgb48_16bit_per_channel.tif"):
        corner = image[: image.shape[0] // 4, : image.shape[1] // 4]
        assert red_fraction(corner) > 0.02, "red patch lost"
    elif name.startswith("images/gray16_gradient"):
        middle = image[:, image.shape[1] // 2].astype(int)
        assert abs(int(np.median(middle)) - 128) < 20
    elif name in ("images/grayscale_L.jpg", "images/gray_alpha_LA.png"):
        assert image.ndim == 3 and image.shape[2] == 3


def test_prepare_bad_inputs_outcomes(shared_data, ray_local, tmp_path):
    source = shared_data / "bad-inputs"
    output = str(tmp_path / "bad")
    result = prepare(PrepareConfig(input=str(source), output=output, short_side=96))
    manifest = json.loads((source / "manifest.json").read_text(encoding="utf-8"))

    errors = {
        os.path.relpath(r["image_uri"], source): r
        for r in pq.read_table(os.path.join(output, "errors.parquet")).to_pylist()
    }
    rows = {os.path.relpath(r["image_uri"], source): r for r in all_rows(output)}
    assert {name: row["error"] for name, row in errors.items()} == BAD_INPUT_ERRORS
    assert result.errors == len(BAD_INPUT_ERRORS)

    # Every image file of the manifest has exactly one outcome.
    images = [
        name
        for name in manifest["files"]
        if not name.endswith("/")
        and "/." not in name
        and not name.endswith(("Thumbs.db", "notes.txt", ".DS_Store"))
    ]
    for name in images:
        assert (name in rows) != (name in errors), name
        if name in rows:
            check_bad_input_row(name, rows[name])
    # Paths with spaces, '+', and emoji are stored exactly as on disk.
    for name in ("names/Big Spider.jpg", "names/E+P-003_D.jpg", "unicode/Quercus_robur_🌳.jpg"):
        assert rows[name]["image_uri"] == str(source / name)
    # Junk never becomes an input, and is reported.
    report = read_json(os.path.join(output, "report.json"))
    assert report["skipped"] == {
        "apple_double": 1,
        "hidden_folder": 1,
        "not_an_image": 2,
        "os_metadata": 2,
    }
    assert report["errors_by_reason"] == {"truncated": 1, "unidentified_image": 1, "empty_file": 1}
    assert len(rows) + len(errors) == 30


def test_prepare_rerun_replaces_shards(shared_data, ray_local, tmp_path):
    output = str(tmp_path / "taxa")
    config = PrepareConfig(
        input=str(shared_data / "bad-inputs" / "train_numeric"), output=output, short_side=64
    )
    prepare(config)
    first = sorted(r["specimen_id"] for r in all_rows(output))
    # A run that died part-way left a staging folder and no marker; the next run cleans it.
    os.makedirs(os.path.join(output, ".staging-dead", "part=train"))
    prepare(config)
    second = sorted(r["specimen_id"] for r in all_rows(output))
    assert (
        first
        == second
        == ["1/s0.jpg", "1/s1.jpg", "10/s0.jpg", "10/s1.jpg", "2/s0.jpg", "2/s1.jpg"]
    )
    assert not [name for name in os.listdir(output) if name.startswith(".staging")]
    labels = load_prepared(output).labels
    assert labels.names == ("1", "2", "10")


def test_prepare_keeps_given_label_indices(shared_data, ray_local, tmp_path):
    train_out = str(tmp_path / "train")
    prepare(
        PrepareConfig(
            input=str(shared_data / "bad-inputs" / "train_numeric"), output=train_out, short_side=64
        )
    )
    val_out = str(tmp_path / "val")
    prepare(
        PrepareConfig(
            input=str(shared_data / "bad-inputs" / "val_numeric_missing_2"),
            output=val_out,
            short_side=64,
            labels=os.path.join(train_out, "labels.json"),
        )
    )
    rows = all_rows(val_out)
    assert {r["scientific_name"]: r["label"] for r in rows} == {"1": 0, "10": 2}
    assert load_prepared(val_out).labels.names == ("1", "2", "10")


def test_load_prepared_refuses_incomplete(tmp_path):
    (tmp_path / "shards").mkdir()
    with pytest.raises(FileNotFoundError, match="not a complete prepare output"):
        load_prepared(str(tmp_path))


def test_prepare_config_validation():
    from herbray.config import ConfigError

    with pytest.raises(ConfigError, match="prepare needs --input"):
        PrepareConfig(output="x")
    with pytest.raises(ConfigError, match="jpeg_quality must be 1-100, got 0"):
        PrepareConfig(input="a", output="b", jpeg_quality=0)
