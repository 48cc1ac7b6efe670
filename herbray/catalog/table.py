"""The catalog table every collection reader returns, and its report."""

from __future__ import annotations

import json
import os
import statistics
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from herbray import storage

# Core columns, in this order, always present (nullable strings). Readers add any
# further columns the source carries after them.
CORE_COLUMNS = (
    "specimen_id",
    "image_uri",
    "scientific_name",
    "genus",
    "family",
    "catalog_number",
    "occurrence_id",
    "institution_code",
    "recorded_by",
)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff"})

# File names that operating systems and tools leave in folders; never inputs.
OS_METADATA_NAMES = frozenset({"thumbs.db", "desktop.ini", "ehthumbs.db", ".ds_store"})
HIDDEN_FOLDER_NAMES = frozenset({"__macosx"})


class CatalogError(ValueError):
    """A collection could not be read; the message names the file or column and the fix."""


def skip_reason(relative_path: str) -> str | None:
    """Return why a file in a collection is not an input, or None for an image.

    ``relative_path`` uses '/' separators. The reasons are the keys of
    :attr:`Catalog.skipped`.
    """
    parts = relative_path.split("/")
    for folder in parts[:-1]:
        if folder.startswith(".") or folder.lower() in HIDDEN_FOLDER_NAMES:
            return "hidden_folder"
    name = parts[-1]
    if name.startswith("._"):
        return "apple_double"
    if name.lower() in OS_METADATA_NAMES:
        return "os_metadata"
    if name.startswith("."):
        return "hidden_file"
    if os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
        return "not_an_image"
    return None


@dataclass
class Catalog:
    """A collection read into one table, with what was skipped and why.

    Attributes:
        table: one row per image (or per record without media, whose
            ``image_uri`` is null); all columns are strings.
        source: the path or URI that was read.
        format: ``folder``, ``manifest``, ``dwca`` or ``fgvc``.
        group_column: the column that keeps related sheets on one side of a
            split (the collector when the source has one), or None.
        skipped: reason -> source-relative paths of files that are not inputs.
        notes: other things a user should know (e.g. unreadable sidecars).
    """

    table: pa.Table
    source: str
    format: str
    group_column: str | None = None
    skipped: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def num_rows(self) -> int:
        return self.table.num_rows

    @property
    def num_images(self) -> int:
        return self.table.num_rows - self.table.column("image_uri").null_count

    @property
    def records_without_media(self) -> int:
        return self.table.column("image_uri").null_count

    def images(self) -> pa.Table:
        """Return the rows that have an image, without the records that have none."""
        import pyarrow.compute as pc

        return self.table.filter(pc.is_valid(self.table.column("image_uri")))

    def summary(self) -> dict:
        """Counts a data team checks before preparing: images, species, groups, skips."""
        images = self.images()
        names = [n for n in images.column("scientific_name").to_pylist() if n is not None]
        per_species = Counter(names)
        counts = sorted(per_species.values())
        group_column = self.group_column or "specimen_id"
        groups = {g for g in images.column(group_column).to_pylist() if g is not None}
        summary = {
            "source": self.source,
            "format": self.format,
            "records": self.num_rows,
            "images": images.num_rows,
            "records_without_media": self.records_without_media,
            "labelled_images": len(names),
            "species": len(per_species),
            "images_per_species": {
                "min": counts[0] if counts else 0,
                "median": _number(statistics.median(counts)) if counts else 0,
                "max": counts[-1] if counts else 0,
            },
            "group_column": group_column,
            "groups": len(groups),
            "skipped": {reason: len(paths) for reason, paths in sorted(self.skipped.items())},
            "notes": list(self.notes),
            "species_counts": dict(sorted(per_species.items())),
        }
        if self.records_without_media:
            # Records without images still carry identifications worth counting.
            all_names = {n for n in self.table.column("scientific_name").to_pylist() if n}
            summary["species_in_all_records"] = len(all_names)
        return summary

    def write_parquet(self, uri: str) -> None:
        """Write the table to one Parquet file (local path or s3:// URI)."""
        fs, path = storage.filesystem_and_path(uri)
        if not storage.is_s3(uri):
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        metadata = {
            b"herbray.catalog": json.dumps(
                {"source": self.source, "format": self.format, "group_column": self.group_column}
            ).encode()
        }
        table = self.table.replace_schema_metadata(
            {**(self.table.schema.metadata or {}), **metadata}
        )
        pq.write_table(table, path, filesystem=fs)


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def build_table(rows: list[dict], extra_columns: list[str] | None = None) -> pa.Table:
    """Build the catalog table from row dicts, core columns first, all strings."""
    extras = []
    seen = set(CORE_COLUMNS)
    for name in extra_columns or []:
        if name not in seen:
            extras.append(name)
            seen.add(name)
    for row in rows:
        for name in row:
            if name not in seen:
                extras.append(name)
                seen.add(name)
    columns = {}
    for name in (*CORE_COLUMNS, *extras):
        values = [row.get(name) for row in rows]
        columns[name] = pa.array([None if v is None else str(v) for v in values], pa.string())
    return pa.table(columns)


def check_unique_ids(table: pa.Table, source: str, hint: str) -> None:
    ids = table.column("specimen_id").to_pylist()
    counts = Counter(ids)
    duplicates = [(value, n) for value, n in counts.items() if n > 1]
    if None in counts:
        raise CatalogError(f"{source}: {counts[None]} rows have no specimen id; {hint}")
    if duplicates:
        examples = ", ".join(f"{value!r} ({n} times)" for value, n in duplicates[:5])
        raise CatalogError(
            f"{source}: specimen ids must be unique, but {len(duplicates)} repeat: {examples}; "
            f"{hint}"
        )
