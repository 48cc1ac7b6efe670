"""Folder trees with one folder per species (Herbaria255 style), local or on S3.

Layout: ``ROOT/<species>/<image>``. The species is the name of the folder that
directly holds an image, so wrapper folders (``ROOT/images/<species>/``,
``ROOT/train/<species>/``) need no option. Images directly in ROOT have no
species (an unlabelled archive). An
optional sidecar ``<name>.xml`` beside an image (Herbaria255: Species, Genus,
Family, Author = the collector, Date, Location, Country, InstitutionCode, URL)
is read into columns.
"""

from __future__ import annotations

import logging
import os
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor

from herbray import storage
from herbray.catalog.table import Catalog, CatalogError, build_table, skip_reason

logger = logging.getLogger(__name__)

# Herbaria255 sidecar element -> catalog column. Element names match case-insensitively.
SIDECAR_FIELDS = {
    "species": "species",
    "genus": "genus",
    "family": "family",
    "author": "recorded_by",
    "date": "event_date",
    "location": "locality",
    "country": "country",
    "institutioncode": "institution_code",
    "catalognumber": "catalog_number",
    "url": "references",
}

# Parallel reads of sidecars on S3, where each one is a request.
SIDECAR_READ_THREADS = 16


def parse_sidecar(data: bytes) -> dict[str, str]:
    """Parse a Herbaria255 sidecar XML into catalog columns (unknown elements ignored)."""
    root = ET.fromstring(data)
    values: dict[str, str] = {}
    for element in root.iter():
        tag = element.tag.rsplit("}", 1)[-1].lower()
        column = SIDECAR_FIELDS.get(tag)
        text = (element.text or "").strip()
        if column and text and column not in values:
            values[column] = text
    return values


def read_folder(root: str) -> Catalog:
    """Read a folder tree (local path or ``s3://`` prefix) into a catalog."""
    if storage.is_s3(root):
        base = root.rstrip("/")
    else:
        if not os.path.exists(root):
            raise CatalogError(f"collection folder not found: {root}")
        if not os.path.isdir(root):
            raise CatalogError(f"{root} is a file, not a folder; pass a folder tree or a manifest")
        base = os.path.abspath(root)

    files = list(storage.walk_files(base))
    skipped: dict[str, list[str]] = {}
    images: list[str] = []
    xml_files: list[str] = []
    for rel, _size in files:
        reason = skip_reason(rel)
        if reason == "not_an_image" and rel.lower().endswith(".xml"):
            xml_files.append(rel)
        elif reason is not None:
            skipped.setdefault(reason, []).append(rel)
        else:
            images.append(rel)

    # A sidecar shares its image's name up to the extension; other XML files are not inputs.
    image_by_stem = {os.path.splitext(rel)[0]: rel for rel in images}
    sidecars: dict[str, str] = {}
    for rel in xml_files:
        image = image_by_stem.get(os.path.splitext(rel)[0])
        if image is None:
            skipped.setdefault("not_an_image", []).append(rel)
        else:
            sidecars[image] = rel

    if not images:
        found = f"{len(files)} files, none of them images" if files else "no files"
        raise CatalogError(
            f"no images found under {root} ({found}); expected jpg, jpeg, png, tif or tiff files "
            "in one folder per species"
        )

    sidecar_values, notes = _read_sidecars(base, sidecars, skipped)
    rows = []
    for rel in images:
        parts = rel.split("/")
        row = {
            "specimen_id": rel,
            "image_uri": storage.join(base, *parts)
            if storage.is_s3(base)
            else os.path.join(base, *parts),
            "scientific_name": parts[-2] if len(parts) > 1 else None,
        }
        row.update(sidecar_values.get(rel, {}))
        rows.append(row)

    has_collector = any(row.get("recorded_by") for row in rows)
    return Catalog(
        table=build_table(rows),
        source=root,
        format="folder",
        group_column="recorded_by" if has_collector else None,
        skipped=skipped,
        notes=notes,
    )


def _read_sidecars(
    base: str, sidecars: dict[str, str], skipped: dict[str, list[str]]
) -> tuple[dict[str, dict[str, str]], list[str]]:
    """Read every sidecar; an unreadable one is reported and its image kept without it."""

    def read_one(item: tuple[str, str]) -> tuple[str, str, dict | None, str | None]:
        image, rel = item
        uri = (
            storage.join(base, *rel.split("/")) if storage.is_s3(base) else os.path.join(base, rel)
        )
        try:
            return image, rel, parse_sidecar(storage.read_bytes(uri)), None
        except (ET.ParseError, OSError) as exc:
            return image, rel, None, str(exc)

    values: dict[str, dict[str, str]] = {}
    notes: list[str] = []
    threads = SIDECAR_READ_THREADS if storage.is_s3(base) else 1
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for image, rel, parsed, error in pool.map(read_one, sorted(sidecars.items())):
            if parsed is None:
                logger.warning("unreadable sidecar %s, image kept without it: %s", rel, error)
                skipped.setdefault("unreadable_sidecar", []).append(rel)
                notes.append(f"unreadable sidecar {rel}: {error}")
            else:
                values[image] = parsed
    return values, notes
