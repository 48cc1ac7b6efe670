"""Read a specimen collection, in whatever form a herbarium keeps it, into one table.

Sources: a folder tree with one folder per species, a CSV/TSV/Parquet manifest,
a Darwin Core Archive (zipped or unpacked) or a bare Darwin Core text file, and
FGVC Herbarium challenge metadata JSON; each as a local path or an ``s3://``
URI. See :class:`~herbray.catalog.table.Catalog` for the table's columns.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from herbray import storage
from herbray.catalog.dwca import read_dwc_text_bytes, read_dwca
from herbray.catalog.fgvc import read_fgvc
from herbray.catalog.folder import read_folder
from herbray.catalog.manifest import ColumnMapping, NoImageColumnError, read_manifest
from herbray.catalog.table import (
    CORE_COLUMNS,
    IMAGE_EXTENSIONS,
    Catalog,
    CatalogError,
    skip_reason,
)
from herbray.config import ConfigError, option

FORMATS = ("auto", "folder", "manifest", "dwca", "fgvc")

__all__ = [
    "CORE_COLUMNS",
    "FORMATS",
    "IMAGE_EXTENSIONS",
    "Catalog",
    "CatalogError",
    "ColumnMapping",
    "SourceOptions",
    "detect_format",
    "read_catalog",
    "skip_reason",
]


def detect_format(source: str) -> str:
    """Guess the reader for a source from its name and, for folders, its contents."""
    lower = source.lower().rstrip("/")
    if lower.endswith(".zip"):
        return "dwca"
    if lower.endswith(".json"):
        return "fgvc"
    if lower.endswith((".csv", ".tsv", ".txt", ".parquet")):
        return "manifest"
    if storage.is_s3(source) or os.path.isdir(source):
        if storage.exists(storage.join(source, "meta.xml")):
            return "dwca"
        return "folder"
    if not os.path.exists(source):
        raise CatalogError(f"collection not found: {source}")
    raise CatalogError(
        f"cannot tell the format of {source}; pass --format with one of {', '.join(FORMATS[1:])}"
    )


def _looks_like_dwc_text(source: str) -> bool:
    """A manifest whose header is Darwin Core terms but has no image column (e.g. a GBIF CSV)."""
    if source.lower().endswith(".parquet"):
        return False
    head = storage.read_bytes(source)[:8192]
    for encoding in ("utf-8-sig", "utf-16", "latin-1"):
        try:
            text = head.decode(encoding)
        except UnicodeDecodeError:
            continue
        if "scientificName" in text.splitlines()[0] if text else False:
            return True
    return False


def read_catalog(
    source: str,
    *,
    format: str = "auto",
    mapping: ColumnMapping | None = None,
    encoding: str | None = None,
) -> Catalog:
    """Read a collection into a :class:`Catalog`.

    Args:
        source: folder, manifest, archive or metadata file; local path or s3:// URI.
        format: one of ``FORMATS``; ``auto`` guesses from the name and contents.
        mapping: manifest columns for image, label, id and group (manifests only).
        encoding: text encoding of a manifest when it is not UTF-8 and has no BOM.
    """
    if format not in FORMATS:
        raise CatalogError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    if format == "auto":
        format = detect_format(source)
    if format == "folder":
        return read_folder(source)
    if format == "dwca":
        if storage.is_s3(source) or os.path.isdir(source) or source.lower().endswith(".zip"):
            return read_dwca(source)
        return read_dwc_text_bytes(
            storage.read_bytes(source), source, storage.parent(source), encoding
        )
    if format == "fgvc":
        return read_fgvc(source)
    try:
        return read_manifest(source, mapping, encoding)
    except NoImageColumnError:
        # A Darwin Core text file without any media column is a set of records
        # without images, not a broken manifest.
        if mapping is None and _looks_like_dwc_text(source):
            return read_dwc_text_bytes(
                storage.read_bytes(source), source, storage.parent(source), encoding
            )
        raise


@dataclass
class SourceOptions:
    """How to read a collection; every job config that reads one inherits these fields."""

    format: str = option(
        "auto", "collection format, guessed from the name and contents when auto", choices=FORMATS
    )
    image_column: str | None = option(None, "manifest column with image paths or URIs")
    label_column: str | None = option(None, "manifest column with the species name")
    id_column: str | None = option(None, "manifest column with a unique specimen id")
    group_column: str | None = option(
        None,
        "column that keeps related sheets on one side of a split "
        "(default: the collector where the source has one, else the specimen)",
    )
    encoding: str | None = option(
        None, "text encoding of a manifest without a BOM (default: UTF-8)"
    )

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ConfigError(f"format {self.format!r} is not one of {', '.join(FORMATS)}")

    def read_source(self, source: str) -> Catalog:
        """Read ``source`` with these options; ``group_column`` overrides the reader's choice."""
        mapping = ColumnMapping(
            image=self.image_column,
            label=self.label_column,
            id=self.id_column,
            group=self.group_column,
        )
        catalog = read_catalog(source, format=self.format, mapping=mapping, encoding=self.encoding)
        if self.group_column:
            if self.group_column not in catalog.table.column_names:
                raise CatalogError(
                    f"{source}: no column {self.group_column!r} to group by; columns are "
                    f"{', '.join(catalog.table.column_names)}"
                )
            catalog.group_column = self.group_column
        return catalog
