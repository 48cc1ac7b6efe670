"""CSV, TSV and Parquet manifests: one row per image, with a column mapping.

Columns are found by the mapping (image path or URI, label, id, group) or, when
a role is not mapped, by common names, Darwin Core terms included. Relative
image paths resolve against the manifest's folder.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass

import pyarrow.parquet as pq

from herbray import storage
from herbray.catalog.dwca import TERM_COLUMNS, split_media
from herbray.catalog.table import Catalog, CatalogError, build_table, check_unique_ids, skip_reason
from herbray.catalog.text import decode, read_rows, sniff_delimiter

# Column names tried, in order, for each role that the mapping leaves open.
IMAGE_NAMES = (
    "image_uri",
    "image_path",
    "path",
    "filepath",
    "file_path",
    "file_name",
    "filename",
    "file",
    "image",
    "uri",
    "url",
    "accessURI",
    "identifier",
    "associatedMedia",
)
LABEL_NAMES = ("scientific_name", "scientificName", "species", "label", "taxon", "class")
ID_NAMES = ("specimen_id", "id", "occurrenceID", "catalogNumber", "gbifID", "image_id")


class NoImageColumnError(CatalogError):
    """The manifest has no column that holds image paths or URIs."""


@dataclass(frozen=True)
class ColumnMapping:
    """Which manifest columns hold the image, the label, the id and the group.

    None means: look for a column with a common name (``path``,
    ``scientificName``, ``id``...). Without an id column, the image path as
    written in the manifest is the specimen id. ``group`` names the column that
    keeps related sheets on one side of a split (collector, source herbarium).
    """

    image: str | None = None
    label: str | None = None
    id: str | None = None
    group: str | None = None


def _load(source: str, encoding: str | None) -> tuple[list[str], list[list]]:
    data = storage.read_bytes(source)
    if source.lower().endswith(".parquet"):
        try:
            table = pq.read_table(io.BytesIO(data))
        except Exception as exc:  # pyarrow raises several types for a bad file
            raise CatalogError(f"{source}: unreadable Parquet file ({exc})") from exc
        columns = table.column_names
        values = [table.column(name).to_pylist() for name in columns]
        rows = []
        for row in zip(*values, strict=True):
            rows.append([None if v is None else str(v) for v in row])
        return columns, rows
    text = decode(data, source, encoding)
    delimiter = "\t" if source.lower().endswith(".tsv") else sniff_delimiter(text)
    rows = read_rows(text, delimiter=delimiter)
    if not rows:
        raise CatalogError(
            f"{source}: the manifest is empty; expected a header row and one row per image"
        )
    header = [name.strip() for name in rows[0]]
    return header, rows[1:]


def _pick(
    header: list[str],
    requested: str | None,
    candidates: tuple[str, ...],
    role: str,
    source: str,
    option: str,
) -> int | None:
    if requested is not None:
        if requested not in header:
            raise CatalogError(
                f"{source}: no column {requested!r} for the {role}; the manifest has columns "
                f"{', '.join(header)}; set {option} to one of them"
            )
        return header.index(requested)
    lowered = [name.lower() for name in header]
    for name in candidates:
        if name.lower() in lowered:
            return lowered.index(name.lower())
    return None


def read_manifest(
    source: str, mapping: ColumnMapping | None = None, encoding: str | None = None
) -> Catalog:
    """Read a CSV, TSV or Parquet manifest (local path or ``s3://`` URI)."""
    mapping = mapping or ColumnMapping()
    if not storage.is_remote(source) and not os.path.isfile(source):
        raise CatalogError(f"manifest not found: {source}")
    header, rows = _load(source, encoding)
    image_at = _pick(header, mapping.image, IMAGE_NAMES, "image path", source, "--image-column")
    label_at = _pick(header, mapping.label, LABEL_NAMES, "label", source, "--label-column")
    id_at = _pick(header, mapping.id, ID_NAMES, "specimen id", source, "--id-column")
    group_at = _pick(header, mapping.group, (), "group", source, "--group-column")
    if image_at is None:
        raise NoImageColumnError(
            f"{source}: no image column found (tried {', '.join(IMAGE_NAMES)}); the manifest has "
            f"columns {', '.join(header)}; set --image-column"
        )

    base_dir = storage.parent(source)
    mapped = {i for i in (image_at, label_at, id_at) if i is not None}
    # Darwin Core names of core columns (scientificName, recordedBy...) become catalog
    # columns; every other column keeps its name.
    extra_names = [TERM_COLUMNS.get(name.lower(), name) for name in header]
    skipped: dict[str, list[str]] = {}
    out = []
    for number, row in enumerate(rows, start=1):
        row = list(row) + [None] * (len(header) - len(row))
        raw_images = row[image_at]
        uris = (
            split_media(raw_images)
            if header[image_at] == "associatedMedia"
            else ([raw_images] if raw_images not in (None, "") else [])
        )
        extras = {}
        for i, value in enumerate(row[: len(header)]):
            if i in mapped or value in (None, ""):
                continue
            name = extra_names[i]
            extras[name if name not in ("specimen_id", "image_uri") else f"source_{name}"] = value
        record_id = row[id_at] if id_at is not None and row[id_at] not in (None, "") else None
        if not uris:
            out.append(
                {
                    **extras,
                    "specimen_id": record_id or f"row-{number}",
                    "image_uri": None,
                    "scientific_name": row[label_at] if label_at is not None else None,
                }
            )
            continue
        for k, raw in enumerate(uris, start=1):
            if not storage.is_http(raw):
                # Only the file name decides: a manifest may list images under any
                # folder, hidden ones such as ~/.cache included.
                reason = skip_reason(raw.replace("\\", "/").rsplit("/", 1)[-1])
                if reason is not None:
                    skipped.setdefault(reason, []).append(raw)
                    continue
            specimen_id = record_id or raw
            if record_id and len(uris) > 1:
                specimen_id = f"{record_id}#{k}"
            out.append(
                {
                    **extras,
                    "specimen_id": specimen_id,
                    "image_uri": storage.resolve(raw, base_dir),
                    "scientific_name": row[label_at] if label_at is not None else None,
                }
            )

    if not out:
        raise CatalogError(f"{source}: the manifest has no rows with an image")
    table = build_table(out)
    check_unique_ids(table, source, "set --id-column to a column with one unique value per image")
    group_column = None
    if group_at is not None:
        group_column = extra_names[group_at] if group_at not in mapped else None
        if group_column is None:
            raise CatalogError(
                f"{source}: the group column must differ from the image, label and id columns"
            )
    elif (
        "recorded_by" in table.column_names
        and table.column("recorded_by").null_count < table.num_rows
    ):
        group_column = "recorded_by"
    without = table.column("image_uri").null_count
    notes = (
        [f"{without} of {table.num_rows} rows have no image (image_uri is empty)"]
        if without
        else []
    )
    return Catalog(
        table=table,
        source=source,
        format="manifest",
        group_column=group_column,
        skipped=skipped,
        notes=notes,
    )
