"""Catalog readers on real collections and on generated hard cases."""

from __future__ import annotations

import csv
import io
import json
import os
import zipfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from herbray.catalog import CatalogError, ColumnMapping, read_catalog, skip_reason
from herbray.cli import main


def write_jpeg(path, color=(120, 140, 90), size=(40, 60)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, color).save(path, "JPEG")


def column(catalog, name):
    return catalog.table.column(name).to_pylist()


# Real collections -----------------------------------------------------------


def test_violaceae_folder_summary(shared_data):
    catalog = read_catalog(str(shared_data / "violaceae"))
    summary = catalog.summary()
    assert summary["images"] == 167
    assert summary["species"] == 17
    assert summary["images_per_species"] == {"min": 7, "median": 10, "max": 10}
    assert summary["skipped"] == {"not_an_image": 1}  # labels.csv
    assert catalog.skipped["not_an_image"] == ["labels.csv"]
    assert set(summary["species_counts"]) == {f"V{n:02d}" for n in range(1, 20)} - {"V09", "V15"}


def test_violaceae_manifest_groups_by_sub_code(shared_data):
    mapping = ColumnMapping(image="path", label="species_code", group="sub_code")
    catalog = read_catalog(str(shared_data / "violaceae" / "labels.csv"), mapping=mapping)
    summary = catalog.summary()
    assert summary["format"] == "manifest"
    assert summary["images"] == 167
    assert summary["species"] == 17
    assert summary["groups"] == 6
    assert catalog.group_column == "sub_code"
    # Relative paths resolve against the manifest's folder and exist.
    uris = column(catalog, "image_uri")
    assert all(os.path.isfile(uri) for uri in uris)
    assert uris[0] == str(shared_data / "violaceae" / "images" / "V01" / "V01_01_004.jpg")


def test_bu_spark_odd_names_kept_exactly(shared_data):
    folder = shared_data / "sheets" / "bu-spark"
    catalog = read_catalog(str(folder))
    on_disk = sorted(os.listdir(folder))
    assert catalog.summary()["images"] == 118
    assert sorted(column(catalog, "specimen_id")) == on_disk
    assert sorted(column(catalog, "image_uri")) == sorted(str(folder / name) for name in on_disk)
    assert catalog.summary()["species"] == 0  # flat folder: an unlabelled archive
    assert any("(" in name and "." in name for name in on_disk)  # the odd names are there


def _dwca_core_rows(zip_path):
    """Independent reading of archive-occ.zip's core file, for cross-checking."""
    with zipfile.ZipFile(zip_path) as archive:
        text = archive.read("archive-occ/DarwinCore.txt").decode("utf-8")
    rows = list(csv.reader(io.StringIO(text, newline="")))
    return [row for row in rows[1:] if row]


def test_dwca_archive_occ_rows_and_names(shared_data):
    path = shared_data / "dwca" / "archive-occ.zip"
    catalog = read_catalog(str(path))
    expected = _dwca_core_rows(path)
    assert catalog.format == "dwca"
    assert catalog.num_rows == len(expected) == 1534
    assert column(catalog, "scientific_name") == [row[4] or None for row in expected]
    assert column(catalog, "specimen_id") == [row[0] for row in expected]
    assert column(catalog, "scientific_name")[0] == "Ballota acetabulosa (L.) Benth."
    # Old-style capitalised terms map onto the catalog columns.
    assert column(catalog, "recorded_by")[0] == "Markus Döring"
    assert column(catalog, "catalog_number")[0] == "1"
    # No media in this archive: every record is counted, none dropped.
    summary = catalog.summary()
    assert summary["images"] == 0
    assert summary["records_without_media"] == 1534
    assert summary["species_in_all_records"] == len({row[4] for row in expected if row[4]})


def test_dwc_text_csv_utf8_bom_and_utf16(shared_data):
    plain = read_catalog(str(shared_data / "dwca" / "MOBOTDarwinCore.csv"))
    quoted = read_catalog(str(shared_data / "dwca" / "quoted_headers_MOBOTDarwinCore.csv"))
    assert plain.num_rows == 3
    assert quoted.num_rows == 2
    names = column(plain, "scientific_name")
    assert names[:2] == [
        "Thelypteris minutula C.V. Morton",
        "Polypodium polypodioides subsp. ecklonii (Kunze) Schelpe",
    ]
    assert column(quoted, "scientific_name") == names[:2]
    assert column(plain, "specimen_id")[0] == "MO:Tropicos:1"
    assert column(plain, "recorded_by")[1] == "J.D. & E.G. Chapman"


def test_gbif_download_archive(shared_data):
    path = shared_data / "dwca" / "gbif-download" / "gbif-results.zip"
    catalog = read_catalog(str(path))
    with zipfile.ZipFile(path) as archive:
        lines = [ln for ln in archive.read("occurrence.txt").decode().split("\n") if ln.strip()]
    assert catalog.num_rows == len(lines)  # ignoreHeaderLines="0": no header
    first = lines[0].split("\t")
    assert column(catalog, "specimen_id")[0] == first[0]
    assert column(catalog, "scientific_name")[0] == first[6]


def test_train_taxa_junk_skipped_names_exact(shared_data):
    catalog = read_catalog(str(shared_data / "bad-inputs" / "train_taxa"))
    assert sorted(set(column(catalog, "scientific_name"))) == [
        "Acer × freemanii",
        "Carex sp. 1",
        "Quercus robur",
    ]
    assert catalog.num_images == 3
    assert catalog.skipped == {
        "apple_double": ["Quercus robur/._IMG_0001.jpg"],
        "hidden_folder": [".ipynb_checkpoints/IMG_0001-checkpoint.jpg"],
        "not_an_image": ["Quercus robur/notes.txt"],
        "os_metadata": [".DS_Store", "Quercus robur/Thumbs.db"],
    }


def test_numeric_folders_keep_identity(shared_data):
    from herbray.taxonomy import LabelMap

    train = read_catalog(str(shared_data / "bad-inputs" / "train_numeric"))
    val = read_catalog(str(shared_data / "bad-inputs" / "val_numeric_missing_2"))
    labels = LabelMap.from_names(column(train, "scientific_name"))
    assert labels.names == ("1", "2", "10")
    assert val.summary()["species_counts"] == {"1": 1, "10": 1}
    assert labels.encode(column(val, "scientific_name")) == [0, 2]


def test_catalog_cli_prints_summary(shared_data, capsys, tmp_path):
    out = tmp_path / "catalog.parquet"
    code = main(["catalog", str(shared_data / "bad-inputs" / "train_taxa"), "--output", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    assert "images     3 (3 with a species)" in printed
    assert "species    3; images per species min 1 / median 1 / max 1" in printed
    assert "skipped    5: apple_double 1, hidden_folder 1, not_an_image 1, os_metadata 2" in printed
    table = pq.read_table(out)
    assert sorted(table.column("scientific_name").to_pylist()) == [
        "Acer × freemanii",
        "Carex sp. 1",
        "Quercus robur",
    ]


def test_catalog_cli_json_and_split(shared_data, capsys, tmp_path):
    labels = tmp_path / "labels.json"
    code = main(
        [
            "catalog",
            str(shared_data / "violaceae" / "labels.csv"),
            "--image-column",
            "path",
            "--label-column",
            "species_code",
            "--group-column",
            "sub_code",
            "--split",
            "--json",
            "--labels",
            str(labels),
        ]
    )
    summary = json.loads(capsys.readouterr().out)
    assert code == 0
    assert summary["species"] == 17
    assert sum(summary["split"]["images"].values()) == 167
    assert json.loads(labels.read_text())["num_classes"] == 17


# Generated folder trees -----------------------------------------------------

ODD_NAMES = [
    "Big Spider.jpg",
    "E+P-003_D.JPG",
    "100% sheet #2.jpeg",
    "Quercus (Fagaceae) robur.Tiff",
    "Ærø ñandú 🌳.png",
    "caf\u0065\u0301.jpg",  # decomposed é stays decomposed
]


def test_folder_odd_names_any_case_extension(tmp_path):
    species = "Acer × freemanii E.Murray"
    for name in ODD_NAMES:
        path = tmp_path / species / name
        os.makedirs(path.parent, exist_ok=True)
        fmt = {".png": "PNG", ".tiff": "TIFF"}.get(os.path.splitext(name)[1].lower(), "JPEG")
        Image.new("RGB", (8, 8)).save(path, fmt)
    catalog = read_catalog(str(tmp_path))
    assert sorted(column(catalog, "specimen_id")) == sorted(f"{species}/{n}" for n in ODD_NAMES)
    assert set(column(catalog, "scientific_name")) == {species}
    for uri in column(catalog, "image_uri"):
        assert os.path.isfile(uri), uri


def test_folder_sidecar_xml_read_into_columns(tmp_path):
    species = "Miconia argentea (Sw.) DC."
    write_jpeg(str(tmp_path / species / "a1.jpg"))
    write_jpeg(str(tmp_path / species / "a2.JPG"))
    (tmp_path / species / "a1.xml").write_text(
        "<?xml version='1.0' encoding='utf-8'?><Specimen><Species>Miconia argentea</Species>"
        "<Genus>Miconia</Genus><Family>Melastomataceae</Family><Author>Luis J. Poveda</Author>"
        "<Date>1998-03-14</Date><Location>Parque Nacional Braulio Carrillo</Location>"
        "<Country>Costa Rica</Country><InstitutionCode>CR</InstitutionCode>"
        "<URL>http://example.org/specimen/1</URL></Specimen>",
        encoding="utf-8",
    )
    (tmp_path / species / "a2.xml").write_text("<Specimen><Author>broken", encoding="utf-8")
    catalog = read_catalog(str(tmp_path))
    rows = {row["specimen_id"]: row for row in catalog.table.to_pylist()}
    first = rows[f"{species}/a1.jpg"]
    assert first["recorded_by"] == "Luis J. Poveda"
    assert first["genus"] == "Miconia"
    assert first["family"] == "Melastomataceae"
    assert first["institution_code"] == "CR"
    assert first["country"] == "Costa Rica"
    assert first["event_date"] == "1998-03-14"
    assert first["references"] == "http://example.org/specimen/1"
    assert first["scientific_name"] == species  # the folder name, exactly
    # The unreadable sidecar is reported; its image stays.
    assert rows[f"{species}/a2.JPG"]["recorded_by"] is None
    assert catalog.skipped["unreadable_sidecar"] == [f"{species}/a2.xml"]
    assert catalog.group_column == "recorded_by"


def test_folder_wrapper_and_unlabelled_root(tmp_path):
    write_jpeg(str(tmp_path / "images" / "V01" / "x.jpg"))
    write_jpeg(str(tmp_path / "images" / "V02" / "y.jpg"))
    write_jpeg(str(tmp_path / "loose.jpg"))
    catalog = read_catalog(str(tmp_path))
    names = dict(
        zip(column(catalog, "specimen_id"), column(catalog, "scientific_name"), strict=True)
    )
    assert names == {"images/V01/x.jpg": "V01", "images/V02/y.jpg": "V02", "loose.jpg": None}


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        (".DS_Store", "os_metadata"),
        ("sp/Thumbs.db", "os_metadata"),
        ("sp/desktop.ini", "os_metadata"),
        ("sp/._scan.jpg", "apple_double"),
        ("__MACOSX/sp/scan.jpg", "hidden_folder"),
        (".ipynb_checkpoints/scan-checkpoint.jpg", "hidden_folder"),
        ("sp/.hidden.jpg", "hidden_file"),
        ("sp/notes.txt", "not_an_image"),
        ("sp/scan.pdf", "not_an_image"),
        ("sp/scan.JPEG", None),
        ("sp/scan.tif", None),
    ],
)
def test_skip_reason_cases(path, reason):
    assert skip_reason(path) == reason


def test_missing_and_empty_folder_errors(tmp_path):
    with pytest.raises(CatalogError, match="not found"):
        read_catalog(str(tmp_path / "nope"))
    (tmp_path / "empty" / "sp").mkdir(parents=True)
    (tmp_path / "empty" / "sp" / "notes.txt").write_text("x")
    with pytest.raises(CatalogError, match="no images found under .*1 files, none of them images"):
        read_catalog(str(tmp_path / "empty"))


def test_catalog_cli_error_is_one_line(tmp_path, capsys):
    code = main(["catalog", str(tmp_path / "missing")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip() == f"herbray catalog: error: collection not found: {tmp_path / 'missing'}"


# Manifests ------------------------------------------------------------------


def _manifest_images(tmp_path):
    write_jpeg(str(tmp_path / "img" / "a b+c.jpg"))
    write_jpeg(str(tmp_path / "img" / "d%20e#f.jpg"))
    return [
        {"file": "img/a b+c.jpg", "taxon": "Acer × freemanii", "code": "S1", "who": "Ann"},
        {
            "file": "img/d%20e#f.jpg",
            "taxon": "Viola mandshurica W.Becker",
            "code": "S2",
            "who": "Bo",
        },
        {"file": "/abs/elsewhere.jpg", "taxon": "Viola", "code": "S3", "who": "Ann"},
        {"file": "s3://bucket/key with space.jpg", "taxon": "Viola", "code": "S4", "who": "Cy"},
        {"file": "img/notes.txt", "taxon": "Viola", "code": "S5", "who": "Cy"},
    ]


@pytest.mark.parametrize("kind", ["csv", "tsv", "parquet"])
def test_manifest_with_mapping(tmp_path, kind):
    rows = _manifest_images(tmp_path)
    path = tmp_path / f"manifest.{kind}"
    if kind == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(
                handle, fieldnames=list(rows[0]), delimiter="," if kind == "csv" else "\t"
            )
            writer.writeheader()
            writer.writerows(rows)
    mapping = ColumnMapping(image="file", label="taxon", id="code", group="who")
    catalog = read_catalog(str(path), mapping=mapping)
    assert column(catalog, "specimen_id") == ["S1", "S2", "S3", "S4"]
    assert column(catalog, "image_uri") == [
        str(tmp_path / "img" / "a b+c.jpg"),
        str(tmp_path / "img" / "d%20e#f.jpg"),
        "/abs/elsewhere.jpg",
        "s3://bucket/key with space.jpg",
    ]
    assert column(catalog, "scientific_name")[:2] == [
        "Acer × freemanii",
        "Viola mandshurica W.Becker",
    ]
    assert catalog.group_column == "who"
    assert catalog.skipped == {"not_an_image": ["img/notes.txt"]}


def test_manifest_images_under_hidden_folder_kept(tmp_path):
    write_jpeg(str(tmp_path / ".cache" / "scans" / "a.jpg"))
    path = tmp_path / "m.csv"
    path.write_text(
        f"path,species\n{tmp_path}/.cache/scans/a.jpg,Viola\n.cache/scans/._a.jpg,Viola\n"
    )
    catalog = read_catalog(str(path))
    assert column(catalog, "image_uri") == [str(tmp_path / ".cache" / "scans" / "a.jpg")]
    assert catalog.skipped == {"apple_double": [".cache/scans/._a.jpg"]}


def test_manifest_missing_mapped_column_error(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("file,taxon\na.jpg,X\n")
    with pytest.raises(
        CatalogError, match=r"no column 'species' for the label.*file, taxon.*--label-column"
    ):
        read_catalog(str(path), mapping=ColumnMapping(label="species"))
    path.write_text("name,taxon\na.jpg,X\n")
    with pytest.raises(CatalogError, match="no image column found.*--image-column"):
        read_catalog(str(path))


def test_manifest_duplicate_ids_and_empty(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("path,id\na.jpg,1\nb.jpg,1\n")
    with pytest.raises(CatalogError, match="specimen ids must be unique.*'1' \\(2 times\\)"):
        read_catalog(str(path))
    path.write_text("")
    with pytest.raises(CatalogError, match="manifest is empty"):
        read_catalog(str(path))


def test_manifest_latin1_needs_encoding(tmp_path):
    path = tmp_path / "m.csv"
    path.write_bytes("path,species\na.jpg,Viola séoulensis\n".encode("latin-1"))
    with pytest.raises(CatalogError, match="not valid utf-8.*--encoding"):
        read_catalog(str(path))
    catalog = read_catalog(str(path), encoding="latin-1")
    assert column(catalog, "scientific_name") == ["Viola séoulensis"]


# Darwin Core Archives -------------------------------------------------------

GBIF_MULTIMEDIA = "http://rs.gbif.org/terms/1.0/Multimedia"
AC_MULTIMEDIA = "http://rs.tdwg.org/ac/terms/Multimedia"


def make_dwca(
    folder,
    *,
    media_row_type=GBIF_MULTIMEDIA,
    media_term="http://purl.org/dc/terms/identifier",
    core_text=None,
    meta=None,
    encoding="UTF-8",
):
    """Write an unpacked Darwin Core Archive with an occurrence core and a media extension."""
    os.makedirs(folder, exist_ok=True)
    core = (
        core_text
        if core_text is not None
        else (
            "id,scientificName,recordedBy,catalogNumber\n"
            'occ1,"Viola mandshurica W.Becker","Kim, J.",C-1\n'
            'occ2,"Acer × freemanii E.Murray","Lee\nS.",C-2\n'
            "occ3,Carex sp. 1,Park,C-3\n"
        )
    )
    with open(
        os.path.join(folder, "occurrence.txt"), "w", encoding=encoding.lower(), newline=""
    ) as f:
        f.write(core)
    with open(os.path.join(folder, "multimedia.txt"), "w", encoding="utf-8", newline="") as f:
        f.write("coreid\tlink\ttype\tformat\n")
        f.write("occ1\timages/occ 1+a.jpg\tStillImage\timage/jpeg\n")
        f.write("occ1\thttps://media.example.org/occ1b.jpg\tStillImage\timage/jpeg\n")
        f.write("occ2\ts3://herbarium/scans/occ2.tif\tStillImage\timage/tiff\n")
        f.write("occ2\thttps://media.example.org/occ2.mp3\tSound\taudio/mpeg\n")
    meta = (
        meta
        if meta is not None
        else f"""<?xml version="1.0" encoding="UTF-8"?>
<archive xmlns="http://rs.tdwg.org/dwc/text/">
  <core encoding="{encoding}" fieldsTerminatedBy="," linesTerminatedBy="\\n" fieldsEnclosedBy='"'
        ignoreHeaderLines="1" rowType="http://rs.tdwg.org/dwc/terms/Occurrence">
    <files><location>occurrence.txt</location></files>
    <id index="0"/>
    <field index="1" term="http://rs.tdwg.org/dwc/terms/scientificName"/>
    <field index="2" term="http://rs.tdwg.org/dwc/terms/recordedBy"/>
    <field index="3" term="http://rs.tdwg.org/dwc/terms/catalogNumber"/>
    <field term="http://rs.tdwg.org/dwc/terms/institutionCode" default="HERB"/>
  </core>
  <extension encoding="UTF-8" fieldsTerminatedBy="\\t" linesTerminatedBy="\\n" fieldsEnclosedBy=""
        ignoreHeaderLines="1" rowType="{media_row_type}">
    <files><location>multimedia.txt</location></files>
    <coreid index="0"/>
    <field index="1" term="{media_term}"/>
    <field index="2" term="http://purl.org/dc/terms/type"/>
    <field index="3" term="http://purl.org/dc/terms/format"/>
  </extension>
</archive>
"""
    )
    with open(os.path.join(folder, "meta.xml"), "w", encoding="utf-8") as f:
        f.write(meta)
    return folder


def zip_folder(folder, zip_path, prefix=""):
    with zipfile.ZipFile(zip_path, "w") as archive:
        for name in sorted(os.listdir(folder)):
            archive.write(os.path.join(folder, name), prefix + name)
        archive.writestr("__MACOSX/._meta.xml", b"junk")
    return zip_path


@pytest.mark.parametrize(
    ("row_type", "term"),
    [
        (GBIF_MULTIMEDIA, "http://purl.org/dc/terms/identifier"),
        (AC_MULTIMEDIA, "http://rs.tdwg.org/ac/terms/accessURI"),
    ],
)
@pytest.mark.parametrize("zipped", [False, True])
def test_dwca_media_extension(tmp_path, row_type, term, zipped):
    folder = make_dwca(str(tmp_path / "dwca"), media_row_type=row_type, media_term=term)
    source = zip_folder(folder, str(tmp_path / "dwca.zip"), prefix="export/") if zipped else folder
    catalog = read_catalog(source)
    rows = catalog.table.to_pylist()
    assert [r["specimen_id"] for r in rows] == ["occ1#1", "occ1#2", "occ2", "occ3"]
    base = str(tmp_path) if zipped else folder
    assert rows[0]["image_uri"] == os.path.join(base, "images/occ 1+a.jpg")
    assert rows[1]["image_uri"] == "https://media.example.org/occ1b.jpg"
    assert rows[2]["image_uri"] == "s3://herbarium/scans/occ2.tif"
    assert rows[3]["image_uri"] is None  # a record without media is kept and counted
    assert rows[2]["scientific_name"] == "Acer × freemanii E.Murray"
    assert rows[2]["recorded_by"] == "Lee\nS."  # quoted field with a newline
    assert rows[0]["recorded_by"] == "Kim, J."  # quoted field with the delimiter
    assert rows[0]["institution_code"] == "HERB"  # a default value from meta.xml
    assert catalog.records_without_media == 1
    assert any("not still images" in note for note in catalog.notes)


def test_dwca_associated_media_and_encoding(tmp_path):
    core = (
        "id;scientificName;associatedMedia\n"
        "r1;Viola séoulensis;https://a.example/1.jpg | https://a.example/2.jpg\n"
        "r2;Viola;\n"
    )
    meta = """<archive xmlns="http://rs.tdwg.org/dwc/text/">
  <core encoding="ISO-8859-1" fieldsTerminatedBy=";" fieldsEnclosedBy="" ignoreHeaderLines="1"
        rowType="http://rs.tdwg.org/dwc/terms/Occurrence">
    <files><location>occurrence.txt</location></files>
    <id index="0"/>
    <field index="1" term="http://rs.tdwg.org/dwc/terms/scientificName"/>
    <field index="2" term="http://rs.tdwg.org/dwc/terms/associatedMedia"/>
  </core>
</archive>"""
    folder = make_dwca(str(tmp_path / "d"), core_text=core, meta=meta, encoding="ISO-8859-1")
    catalog = read_catalog(folder)
    assert column(catalog, "specimen_id") == ["r1#1", "r1#2", "r2"]
    assert column(catalog, "image_uri") == [
        "https://a.example/1.jpg",
        "https://a.example/2.jpg",
        None,
    ]
    assert column(catalog, "scientific_name")[0] == "Viola séoulensis"


def test_dwca_malformed_meta_and_missing_core(tmp_path):
    folder = make_dwca(str(tmp_path / "d"), meta="<archive><core rowType='x'>")
    with pytest.raises(CatalogError, match="malformed meta.xml"):
        read_catalog(folder)
    meta = """<archive xmlns="http://rs.tdwg.org/dwc/text/"><core rowType="x">
      <files><location>missing.txt</location></files><id index="0"/></core></archive>"""
    folder = make_dwca(str(tmp_path / "e"), meta=meta)
    with pytest.raises(CatalogError, match="names 'missing.txt', which is not in the archive"):
        read_catalog(folder)
    (tmp_path / "bad.zip").write_bytes(b"not a zip")
    with pytest.raises(CatalogError, match="not a readable zip file"):
        read_catalog(str(tmp_path / "bad.zip"))


# FGVC Herbarium metadata ----------------------------------------------------


def test_fgvc_2020_style(tmp_path):
    meta = {
        "images": [
            {"id": 1, "file_name": "images/000/00/1.jpg", "width": 1000, "height": 1500},
            {"id": 2, "file_name": "images/000/01/2.jpg", "width": 1000, "height": 1500},
        ],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 0, "region_id": 3},
            {"id": 2, "image_id": 2, "category_id": 5, "region_id": 3},
        ],
        "categories": [
            {"id": 0, "name": "Abies alba Mill.", "family": "Pinaceae", "genus": "Abies"},
            {"id": 5, "name": "Acer × freemanii", "family": "Sapindaceae", "genus": "Acer"},
        ],
        "regions": [{"id": 3, "name": "North America"}],
    }
    path = tmp_path / "train" / "metadata.json"
    path.parent.mkdir()
    path.write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")
    rows = read_catalog(str(path)).table.to_pylist()
    assert [r["specimen_id"] for r in rows] == ["1", "2"]
    assert rows[0]["image_uri"] == str(tmp_path / "train" / "images/000/00/1.jpg")
    assert rows[1]["scientific_name"] == "Acer × freemanii"
    assert rows[0]["family"] == "Pinaceae"
    assert rows[0]["region"] == "North America"


def test_fgvc_2022_style_and_test_list(tmp_path):
    meta = {
        "annotations": [
            {"genus_id": 7, "institution_id": 2, "category_id": 10, "image_id": "00000__001"}
        ],
        "images": [{"image_id": "00000__001", "file_name": "000/00/00000__001.jpg", "license": 0}],
        "categories": [
            {
                "category_id": 10,
                "scientificName": "Abies amabilis",
                "family": "Pinaceae",
                "genus": "Abies",
                "species": "amabilis",
                "authors": "(Douglas ex Loudon) J.Forbes",
            }
        ],
        "genera": [{"genus_id": 7, "genus": "Abies"}],
        "institutions": [{"institution_id": 2, "collectionCode": "NY"}],
    }
    train = tmp_path / "train_metadata.json"
    train.write_text(json.dumps(meta))
    row = read_catalog(str(train)).table.to_pylist()[0]
    assert row["specimen_id"] == "00000__001"
    assert row["scientific_name"] == "Abies amabilis"
    assert row["institution_code"] == "NY"
    test = tmp_path / "test_metadata.json"
    test.write_text(json.dumps([{"file_name": "test-000000.jpg", "image_id": "0", "license": 0}]))
    catalog = read_catalog(str(test))
    assert column(catalog, "scientific_name") == [None]
    assert column(catalog, "image_uri") == [str(tmp_path / "test-000000.jpg")]


def test_fgvc_2021_test_dict_and_bad_json(tmp_path):
    path = tmp_path / "test.json"
    path.write_text(json.dumps({"images": [{"id": 5, "file_name": "a.jpg"}], "info": {}}))
    assert read_catalog(str(path)).num_images == 1
    path.write_text("{not json")
    with pytest.raises(CatalogError, match="not valid JSON"):
        read_catalog(str(path))
    path.write_text(json.dumps({"annotations": []}))
    with pytest.raises(CatalogError, match="expected a JSON object with an 'images' list"):
        read_catalog(str(path))
