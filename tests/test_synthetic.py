"""Tests of the synthetic herbarium sheets and the offline demo collection."""

from __future__ import annotations

import csv
import datetime
import importlib.util
import io
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from herbray import synthetic

REPO = Path(__file__).resolve().parent.parent
SIDECAR_FIELDS = (
    "Species",
    "Genus",
    "Family",
    "Author",
    "Date",
    "Location",
    "Country",
    "InstitutionCode",
    "URL",
)


def plant_mask(image: Image.Image) -> np.ndarray:
    """Pixels of dried green-brown plant tissue.

    Paper is too bright, the scanner bed and barcode have no green cast, and
    the saturated colour-chart patches are too colourful to pass.
    """
    pixels = np.asarray(image, dtype=np.int16)
    red, green, blue = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    spread = pixels.max(axis=2) - pixels.min(axis=2)
    return (green >= blue + 12) & (pixels.mean(axis=2) < 175) & (spread < 100) & (red - green < 50)


def plant_features(image: Image.Image) -> np.ndarray:
    """Return (plant share of the sheet, outline pixels per plant pixel).

    A broad-leaved plant covers much and has little outline; a grass-like one
    covers little and is nearly all outline.
    """
    mask = plant_mask(image)
    core = mask[1:-1, 1:-1]
    interior = core & mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
    outline = (core & ~interior).sum() / max(1, mask.sum())
    return np.array([mask.mean(), outline])


def load_script(name: str):
    path = REPO / "data" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"data_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_species_names_are_unique_demo_names():
    names = [s.scientific_name for s in synthetic.SPECIES]
    assert len(synthetic.SPECIES) == 12
    assert len(set(names)) == len(names)
    for species in synthetic.SPECIES:
        assert species.authorship == "Herbray"
        assert species.scientific_name.startswith(f"{species.genus} {species.epithet}")
    assert len({(s.leaf_shape, s.arrangement, s.habit) for s in synthetic.SPECIES}) == 12


def test_demo_species_rejects_bad_count():
    assert len(synthetic.demo_species(6)) == 6
    with pytest.raises(ValueError, match="n_species=13"):
        synthetic.demo_species(13)
    with pytest.raises(ValueError, match="n_species=0"):
        synthetic.demo_species(0)


def test_find_species_by_name_forms():
    quercus = synthetic.SPECIES[0]
    assert synthetic.find_species("Quercus demoensis Herbray") is quercus
    assert synthetic.find_species("quercus demoensis") is quercus
    assert synthetic.find_species("Quercus") is quercus
    with pytest.raises(ValueError, match="Quercus robur"):
        synthetic.find_species("Quercus robur")


def test_parse_size_valid_and_invalid():
    assert synthetic.parse_size("1200x1800") == (1200, 1800)
    assert synthetic.parse_size("4000X6000") == (4000, 6000)
    with pytest.raises(ValueError, match="WIDTHxHEIGHT"):
        synthetic.parse_size("1200")
    with pytest.raises(ValueError, match="too small"):
        synthetic.parse_size("32x48")


def test_render_sheet_deterministic_for_seed():
    first = synthetic.render_sheet("Salix synthetica Herbray", 42, 600, 900)
    again = synthetic.render_sheet("Salix synthetica Herbray", np.random.default_rng(42), 600, 900)
    other = synthetic.render_sheet("Salix synthetica Herbray", 43, 600, 900)
    assert first.tobytes() == again.tobytes()
    assert first.tobytes() != other.tobytes()


@pytest.mark.parametrize("size", [(600, 900), (333, 517), (800, 800), (1700, 2550)])
def test_render_sheet_exact_size(size):
    # 1700 px is wider than MAX_WORK_WIDTH, so that case takes the upscale path.
    image = synthetic.render_sheet(synthetic.SPECIES[3], 5, *size)
    assert image.mode == "RGB"
    assert image.size == size
    assert plant_features(image)[0] > 0.01, "no plant pixels found on the sheet"


def test_render_sheet_looks_like_paper_with_plant():
    image = synthetic.render_sheet(synthetic.SPECIES[0], 11, 600, 900)
    pixels = np.asarray(image, dtype=np.float64)
    # Most of a sheet is bright cream paper: red >= green >= blue on average.
    bright = pixels[pixels.mean(axis=2) > 200]
    assert len(bright) > 0.4 * 600 * 900
    mean = bright.mean(axis=0)
    assert mean[0] >= mean[1] >= mean[2]
    # Scanner grain: flat paper is not one flat colour.
    assert bright.std(axis=0).max() > 1.5


def test_species_differ_more_than_sheets():
    species = synthetic.SPECIES[:3]  # oak-lobed branch, willow branch, sedge tuft
    features = np.array(
        [
            [plant_features(synthetic.render_sheet(s, 100 * i + k, 600, 900)) for k in range(3)]
            for i, s in enumerate(species)
        ]
    )
    scale = features.reshape(-1, 2).std(axis=0)
    normalised = features / scale
    centroids = normalised.mean(axis=1)
    # Leave-one-out nearest centroid: every sheet is closest to its own species.
    for i in range(len(species)):
        for k in range(3):
            own = np.delete(normalised[i], k, axis=0).mean(axis=0)
            distances = [
                np.linalg.norm(normalised[i, k] - (own if j == i else centroids[j]))
                for j in range(len(species))
            ]
            assert int(np.argmin(distances)) == i, (
                f"sheet {k} of {species[i].genus} looks more like "
                f"{species[int(np.argmin(distances))].genus}: features {features[i, k]}"
            )


def test_write_sheet_valid_jpeg(tmp_path):
    path = tmp_path / "nested" / "sheet.jpg"
    size = synthetic.write_sheet(path, "Acer", seed=3, size=(600, 900))
    assert path.stat().st_size == size
    with Image.open(path) as image:
        assert image.format == "JPEG"
        assert image.size == (600, 900)
        image.verify()


def test_write_sheet_24_megapixels(tmp_path):
    path = tmp_path / "big.jpg"
    size = synthetic.write_sheet(path, synthetic.SPECIES[1], seed=1, size=(4000, 6000))
    with Image.open(path) as image:
        assert image.size == (4000, 6000)
    # Grain added at full size keeps a 24 MP sheet in the megabytes, as scans are;
    # the same drawing without grain compresses to under 1 MB.
    assert size > 1_500_000


def test_write_sheet_rejects_bad_quality(tmp_path):
    with pytest.raises(ValueError, match="quality 0"):
        synthetic.write_sheet(tmp_path / "x.jpg", "Acer", seed=0, size=(200, 300), quality=0)


def test_sidecar_xml_fields():
    species = synthetic.SPECIES[2]
    label = synthetic.random_label(np.random.default_rng(0), "M. Chen")
    root = ET.fromstring(synthetic.sidecar_xml(species, label, "abc"))
    assert root.tag == "Image"
    values = {child.tag: child.text for child in root}
    assert values["Species"] == "Carex fictiva Herbray"
    assert values["Genus"] == "Carex"
    assert values["Family"] == "Cyperaceae"
    assert values["Author"] == "M. Chen"
    assert values["InstitutionCode"] == "SFH"
    assert values["URL"].endswith("/abc")


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo")
    summary = synthetic.generate_collection(
        out,
        n_species=3,
        sheets_per_species=4,
        archive_per_species=2,
        size=(300, 450),
        seed=7,
        archive_box_size=4,
        workers=1,
    )
    return out, summary


def test_generate_collection_summary(demo):
    out, summary = demo
    assert summary["species"] == [s.scientific_name for s in synthetic.SPECIES[:3]]
    assert summary["collection_sheets"] == 12
    assert summary["archive_sheets"] == 6
    on_disk = sum(p.stat().st_size for p in out.rglob("*.jpg"))
    assert summary["bytes"] == on_disk


def test_generate_collection_folders_and_sidecars(demo):
    out, _ = demo
    folders = sorted(p.name for p in (out / "collection").iterdir())
    assert folders == sorted(s.scientific_name for s in synthetic.SPECIES[:3])
    collectors = []
    for folder in (out / "collection").iterdir():
        species = synthetic.find_species(folder.name)
        images = sorted(folder.glob("*.jpg"))
        assert len(images) == 4
        assert sorted(p.stem for p in folder.glob("*.xml")) == [p.stem for p in images]
        for image_path in images:
            with Image.open(image_path) as image:
                assert image.format == "JPEG"
                assert image.size == (300, 450)
            root = ET.parse(image_path.with_suffix(".xml")).getroot()
            values = {child.tag: child.text for child in root}
            for field in SIDECAR_FIELDS:
                assert values.get(field), f"{image_path.name}: sidecar field {field} is empty"
            assert values["Species"] == species.scientific_name
            assert values["Genus"] == species.genus
            assert values["Family"] == species.family
            assert values["Country"] == synthetic.DEMO_COUNTRY
            assert values["URL"].endswith(image_path.stem)
            datetime.date.fromisoformat(values["Date"])
            collectors.append(values["Author"])
    assert set(collectors) <= {name for name, _ in synthetic.COLLECTORS}
    # A split grouped by collector needs collectors with several sheets.
    assert len(set(collectors)) < len(collectors)


def test_generate_collection_archive_truth(demo):
    out, _ = demo
    with (out / "archive-truth.csv").open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["image_path", "scientific_name", "specimen_id"]
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("archive/*/*"))
    assert sorted(row["image_path"] for row in rows) == files
    assert sorted({p.split("/")[1] for p in files}) == ["box-01", "box-02"]
    assert len({row["specimen_id"] for row in rows}) == len(rows)
    names = [row["scientific_name"] for row in rows]
    for species in synthetic.SPECIES[:3]:
        assert names.count(species.scientific_name) == 2
    for row in rows:
        assert Path(row["image_path"]).stem == row["specimen_id"]
    collection_ids = {p.stem for p in (out / "collection").rglob("*.jpg")}
    assert not collection_ids & {row["specimen_id"] for row in rows}


def test_generate_collection_existing_output(demo, tmp_path):
    out, _ = demo
    with pytest.raises(FileExistsError, match="overwrite"):
        synthetic.generate_collection(out, n_species=1, sheets_per_species=1, size=(200, 300))
    small = tmp_path / "small"
    options = dict(sheets_per_species=1, archive_per_species=1, size=(200, 300), workers=1)
    synthetic.generate_collection(small, n_species=2, **options)
    synthetic.generate_collection(small, n_species=1, overwrite=True, **options)
    assert [p.name for p in (small / "collection").iterdir()] == [
        synthetic.SPECIES[0].scientific_name
    ]
    assert len(list((small / "archive").rglob("*.jpg"))) == 1


def test_generate_collection_same_for_any_workers(tmp_path):
    options = dict(n_species=2, sheets_per_species=1, archive_per_species=1, size=(200, 300))
    synthetic.generate_collection(tmp_path / "one", workers=1, **options)
    synthetic.generate_collection(tmp_path / "two", workers=2, **options)
    one = {p.relative_to(tmp_path / "one"): p.read_bytes() for p in (tmp_path / "one").rglob("*.*")}
    two = {p.relative_to(tmp_path / "two"): p.read_bytes() for p in (tmp_path / "two").rglob("*.*")}
    assert one.keys() == two.keys()
    assert one == two


def test_generate_demo_cli(tmp_path, capsys):
    script = load_script("generate_demo")
    out = tmp_path / "cli"
    argv = [str(out), "--species", "2", "--sheets", "2", "--archive", "1", "--size", "200x300"]
    assert script.main([*argv, "--workers", "1", "--seed", "3"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["collection_sheets"] == 4
    assert len(list((out / "archive").rglob("*.jpg"))) == 2
    # A second run into the same folder fails with a message unless --overwrite is given.
    assert script.main([*argv, "--workers", "1"]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_generate_sheets_cli(tmp_path, capsys):
    script = load_script("generate_sheets")
    out = tmp_path / "sheets"
    assert script.main([str(out), "--count", "3", "--size", "240x360", "--workers", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["sheets"] == 3
    with (out / "manifest.csv").open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [row["image_path"] for row in rows] == [f"sheet-{k:05d}.jpg" for k in range(3)]
    for row in rows:
        data = (out / row["image_path"]).read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            assert image.size == (240, 360)
        synthetic.find_species(row["scientific_name"])
