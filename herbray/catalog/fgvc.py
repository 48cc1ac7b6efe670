"""FGVC Herbarium challenge metadata (2019-2022): COCO-like images, annotations, categories.

The variants differ in key names: 2019-2021 use ``id`` on images and categories
and ``name`` for the species; 2022 uses ``image_id``, ``category_id`` and
``scientificName``, with genera and institutions in their own lists. Test
metadata has no annotations (2022's is a bare list of images); its rows have no
species.
"""

from __future__ import annotations

import json
import os

from herbray import storage
from herbray.catalog.table import Catalog, CatalogError, build_table, check_unique_ids


def _index(items: list[dict], *keys: str) -> dict:
    out = {}
    for item in items or []:
        key = next((item[k] for k in keys if k in item), None)
        if key is not None:
            out[key] = item
    return out


def read_fgvc(source: str) -> Catalog:
    """Read FGVC Herbarium metadata JSON (train, validation or test), local or ``s3://``."""
    if not storage.is_remote(source) and not os.path.isfile(source):
        raise CatalogError(f"FGVC metadata file not found: {source}")
    try:
        meta = json.loads(storage.read_bytes(source))
    except json.JSONDecodeError as exc:
        raise CatalogError(f"{source}: unreadable FGVC metadata, not valid JSON ({exc})") from exc

    if isinstance(meta, list):  # 2022 test metadata: a bare list of images
        meta = {"images": meta}
    if not isinstance(meta, dict) or not isinstance(meta.get("images"), list):
        raise CatalogError(
            f"{source}: not FGVC Herbarium metadata; expected a JSON object with an 'images' list "
            "(and 'annotations' and 'categories' for labelled sets)"
        )

    categories = _index(meta.get("categories"), "category_id", "id")
    genera = _index(meta.get("genera"), "genus_id", "id")
    institutions = _index(meta.get("institutions"), "institution_id", "id")
    regions = _index(meta.get("regions"), "region_id", "id")
    annotations = _index(meta.get("annotations"), "image_id")
    base_dir = storage.parent(source)

    rows = []
    for number, image in enumerate(meta["images"]):
        image_id = image.get("image_id", image.get("id"))
        file_name = image.get("file_name")
        if image_id is None or not file_name:
            raise CatalogError(
                f"{source}: image entry {number} has no id or file_name ({json.dumps(image)[:200]})"
            )
        row: dict = {
            "specimen_id": str(image_id),
            "image_uri": storage.resolve(file_name, base_dir),
        }
        for key in ("width", "height", "license"):
            if key in image:
                row[key] = image[key]
        annotation = annotations.get(image_id)
        if annotation is not None:
            category_id = annotation.get("category_id")
            category = categories.get(category_id, {})
            name = category.get("scientificName") or category.get("name")
            row["scientific_name"] = (
                name
                if name not in (None, "")
                else (str(category_id) if category_id is not None else None)
            )
            row["category_id"] = category_id
            genus = category.get("genus") or genera.get(annotation.get("genus_id"), {}).get("genus")
            row["genus"] = genus
            row["family"] = category.get("family")
            institution = institutions.get(annotation.get("institution_id"))
            if institution is not None:
                row["institution_code"] = institution.get("collectionCode") or institution.get(
                    "name"
                )
            region = regions.get(annotation.get("region_id"))
            if region is not None:
                row["region"] = region.get("name")
        rows.append(row)

    if not rows:
        raise CatalogError(f"{source}: the metadata lists no images")
    table = build_table(rows)
    check_unique_ids(table, source, "image ids in FGVC metadata must be unique")
    labelled = sum(1 for row in rows if row.get("scientific_name") is not None)
    notes = [] if labelled else ["test metadata: no annotations, so no species"]
    return Catalog(table=table, source=source, format="fgvc", notes=notes)
