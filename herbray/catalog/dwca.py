"""Darwin Core Archives (zipped or unpacked) and bare Darwin Core text files.

``meta.xml`` names the core file, its delimiter, quoting, encoding, header lines
and each column's term. Images come from a Simple Multimedia (GBIF) or Audubon
Core extension (``accessURI``, else ``identifier``) or, without one, from the
core's ``associatedMedia``. Records without media stay in the table with a
null ``image_uri``, so they are counted, never dropped silently.
"""

from __future__ import annotations

import io
import logging
import os
import re
import xml.etree.ElementTree as ET
import zipfile
from collections import Counter
from dataclasses import dataclass, field

from herbray import storage
from herbray.catalog.table import Catalog, CatalogError, build_table
from herbray.catalog.text import decode, read_rows, sniff_delimiter

logger = logging.getLogger(__name__)

DWC_TEXT_NS = "http://rs.tdwg.org/dwc/text/"

# Term local name (matched case-insensitively) -> catalog column. "Collector" and
# "CatalogNumber" with capitals are the names of Darwin Core before 2009.
TERM_COLUMNS = {
    "scientificname": "scientific_name",
    "genus": "genus",
    "family": "family",
    "catalognumber": "catalog_number",
    "occurrenceid": "occurrence_id",
    "institutioncode": "institution_code",
    "recordedby": "recorded_by",
    "collector": "recorded_by",
}

MEDIA_ROW_TYPES = (
    "http://rs.gbif.org/terms/1.0/multimedia",
    "http://rs.gbif.org/terms/1.0/image",
    "http://rs.tdwg.org/ac/terms/multimedia",
)
# Header names that identify a record in a bare Darwin Core text file, best first.
ID_TERMS = ("id", "occurrenceid", "gbifid", "catalognumber")
_MEDIA_SPLIT = re.compile(r"\s*[|;]\s*|,\s+(?=[a-z][a-z0-9+.-]*://)", re.IGNORECASE)


def term_name(term: str) -> str:
    """The local name of a term URI (``http://rs.tdwg.org/dwc/terms/genus`` -> ``genus``)."""
    return re.split(r"[/#:]", term.rstrip("/"))[-1]


def column_for_term(term: str) -> str:
    """The catalog column for a term: a core column, else its local name in lowerCamelCase."""
    name = term_name(term)
    mapped = TERM_COLUMNS.get(name.lower())
    if mapped:
        return mapped
    return name[:1].lower() + name[1:]


def split_media(value: str | None) -> list[str]:
    """Split an ``associatedMedia`` value into URIs (DwC recommends ' | ' between them)."""
    if not value or not value.strip():
        return []
    return [part.strip() for part in _MEDIA_SPLIT.split(value.strip()) if part.strip()]


@dataclass
class FileSpec:
    """One data file of an archive as meta.xml describes it."""

    row_type: str
    locations: list[str]
    encoding: str = "utf-8"
    delimiter: str = ","
    quotechar: str | None = '"'
    header_lines: int = 0
    id_index: int | None = None
    fields: list[tuple[int | None, str, str | None]] = field(default_factory=list)


def _unescape(value: str) -> str:
    replacements = {"\\t": "\t", "\\n": "\n", "\\r": "\r", "\\\\": "\\", "\\'": "'", '\\"': '"'}
    for escaped, plain in replacements.items():
        value = value.replace(escaped, plain)
    return value


def parse_meta(data: bytes, source: str) -> tuple[FileSpec, list[FileSpec]]:
    """Parse meta.xml into the core file and its extensions."""
    try:
        root = ET.fromstring(data)
    except ET.ParseError as exc:
        raise CatalogError(
            f"{source}: malformed meta.xml ({exc}); fix the XML or re-export the archive"
        ) from exc

    def find_all(parent: ET.Element, name: str) -> list[ET.Element]:
        return [el for el in parent if el.tag.rsplit("}", 1)[-1] == name]

    def parse_file(element: ET.Element, id_tag: str) -> FileSpec:
        where = f"{source}: <{element.tag.rsplit('}', 1)[-1]} rowType={element.get('rowType')!r}>"
        locations = [
            (loc.text or "").strip()
            for files in find_all(element, "files")
            for loc in find_all(files, "location")
        ]
        locations = [loc for loc in locations if loc]
        if not locations:
            raise CatalogError(f"{where} in meta.xml names no <files><location>")
        enclosure = _unescape(element.get("fieldsEnclosedBy", '"'))
        try:
            header_lines = int(element.get("ignoreHeaderLines", "0") or 0)
        except ValueError as exc:
            raise CatalogError(f"{where}: ignoreHeaderLines is not a number") from exc
        spec = FileSpec(
            row_type=element.get("rowType", ""),
            locations=locations,
            encoding=element.get("encoding", "utf-8") or "utf-8",
            delimiter=_unescape(element.get("fieldsTerminatedBy", ",")) or ",",
            quotechar=enclosure or None,
            header_lines=header_lines,
        )
        if len(spec.delimiter) != 1:
            raise CatalogError(
                f"{where}: fieldsTerminatedBy {spec.delimiter!r} is not one character"
            )
        ids = find_all(element, id_tag)
        if ids and ids[0].get("index") not in (None, ""):
            spec.id_index = int(ids[0].get("index"))
        for field_el in find_all(element, "field"):
            term = field_el.get("term")
            if not term:
                raise CatalogError(f"{where}: a <field> in meta.xml has no term")
            index = field_el.get("index")
            spec.fields.append(
                (int(index) if index not in (None, "") else None, term, field_el.get("default"))
            )
        return spec

    cores = find_all(root, "core")
    if not cores:
        raise CatalogError(
            f"{source}: meta.xml has no <core> element; it is not a Darwin Core Archive"
        )
    core = parse_file(cores[0], "id")
    extensions = [parse_file(el, "coreid") for el in find_all(root, "extension")]
    return core, extensions


class _ArchiveFiles:
    """Files of an archive, zipped (local or S3) or unpacked in a folder."""

    def __init__(self, source: str):
        self.source = source
        self.zip: zipfile.ZipFile | None = None
        self.prefix = ""
        if source.lower().endswith(".zip"):
            try:
                data = storage.read_bytes(source)
                self.zip = zipfile.ZipFile(io.BytesIO(data))
            except zipfile.BadZipFile as exc:
                raise CatalogError(f"{source}: not a readable zip file ({exc})") from exc
            names = [n for n in self.zip.namelist() if not n.startswith("__MACOSX/")]
            metas = sorted((n for n in names if n.rsplit("/", 1)[-1] == "meta.xml"), key=len)
            self.names = names
            self.meta = metas[0] if metas else None
            if self.meta:
                self.prefix = self.meta[: -len("meta.xml")]
        else:
            self.meta = "meta.xml" if storage.exists(storage.join(source, "meta.xml")) else None
            self.names = [rel for rel, _ in storage.walk_files(source)]

    def read(self, name: str) -> bytes:
        path = self.prefix + name
        if self.zip is not None:
            try:
                return self.zip.read(path)
            except KeyError as exc:
                raise CatalogError(
                    f"{self.source}: meta.xml names {name!r}, which is not in the archive"
                ) from exc
        try:
            return storage.read_bytes(storage.join(self.source, *path.split("/")))
        except FileNotFoundError as exc:
            raise CatalogError(
                f"{self.source}: meta.xml names {name!r}, which is not in the archive"
            ) from exc

    def base_dir(self) -> str:
        """The folder that relative media paths resolve against."""
        return storage.parent(self.source) if self.zip is not None else self.source


def _read_records(files: _ArchiveFiles, spec: FileSpec, notes: list[str]) -> list[dict[str, str]]:
    """Read one data file into dicts keyed by column, plus ``_id`` for the row's id."""
    records: list[dict[str, str]] = []
    max_index = max([i for i, _, _ in spec.fields if i is not None] + [spec.id_index or 0])
    short_rows = 0
    for location in spec.locations:
        text = decode(files.read(location), f"{files.source}:{location}", spec.encoding)
        rows = read_rows(
            text, delimiter=spec.delimiter, quotechar=spec.quotechar, skip_lines=spec.header_lines
        )
        for number, row in enumerate(rows):
            if len(row) <= max_index:
                short_rows += 1
                row = row + [""] * (max_index + 1 - len(row))
            record: dict[str, str] = {}
            for index, term, default in spec.fields:
                value = row[index] if index is not None else None
                if value is None or value == "":
                    value = default
                if value not in (None, ""):
                    record[column_for_term(term)] = value
            record["_id"] = row[spec.id_index] if spec.id_index is not None else str(number)
            records.append(record)
    if short_rows:
        notes.append(
            f"{short_rows} rows of {spec.locations[0]} had fewer fields than meta.xml names"
        )
    return records


def _is_image_media(record: dict[str, str]) -> bool:
    media_type = (record.get("type") or "").lower()
    media_format = (record.get("format") or "").lower()
    if media_format and not media_format.startswith("image/"):
        return False
    return not media_type or "image" in media_type


def read_dwca(source: str) -> Catalog:
    """Read a Darwin Core Archive: a .zip (local or S3) or an unpacked folder."""
    if not storage.is_remote(source) and not os.path.exists(source):
        raise CatalogError(f"Darwin Core Archive not found: {source}")
    files = _ArchiveFiles(source)
    if files.meta is None:
        data_files = [n for n in files.names if n.lower().endswith((".txt", ".csv", ".tsv"))]
        if len(data_files) == 1:
            # A "simple" download: one Darwin Core text file without meta.xml.
            catalog = read_dwc_text_bytes(
                files.read(data_files[0]), f"{source}:{data_files[0]}", files.base_dir()
            )
            catalog.source = source
            return catalog
        raise CatalogError(
            f"{source}: no meta.xml found, so the core file and its columns are unknown; "
            "a Darwin Core Archive needs meta.xml at its top level"
        )

    core, extensions = parse_meta(files.read("meta.xml"), f"{source}:meta.xml")
    notes: list[str] = []
    records = _read_records(files, core, notes)

    # Media from extensions, keyed by the core id.
    media: dict[str, list[str]] = {}
    media_extensions = [e for e in extensions if e.row_type.lower().rstrip("/") in MEDIA_ROW_TYPES]
    non_image_media = 0
    for extension in media_extensions:
        for record in _read_records(files, extension, notes):
            uri = next((record[t] for t in ("accessURI", "identifier") if record.get(t)), None)
            if not uri:
                continue
            if not _is_image_media(record):
                non_image_media += 1
                continue
            media.setdefault(record["_id"], []).append(uri)
    if non_image_media:
        notes.append(
            f"{non_image_media} media rows are not still images (sound, video) and were not used"
        )

    base_dir = files.base_dir()
    rows, ids = _rows_from_records(records, media, bool(media_extensions), base_dir)
    orphans = len(set(media) - ids)
    if orphans:
        notes.append(f"{orphans} media rows refer to core ids that are not in the core file")
    return _finish(rows, source, "dwca", notes)


def _rows_from_records(
    records: list[dict[str, str]],
    media: dict[str, list[str]],
    use_extension: bool,
    base_dir: str,
) -> tuple[list[dict], set[str]]:
    rows: list[dict] = []
    ids: set[str] = set()
    for record in records:
        record_id = record.pop("_id")
        ids.add(record_id)
        uris = (
            media.get(record_id, [])
            if use_extension
            else split_media(record.get("associatedMedia"))
        )
        base = dict(record)
        if not uris:
            rows.append({**base, "specimen_id": record_id, "image_uri": None})
            continue
        for number, uri in enumerate(uris, start=1):
            specimen_id = record_id if len(uris) == 1 else f"{record_id}#{number}"
            rows.append(
                {**base, "specimen_id": specimen_id, "image_uri": storage.resolve(uri, base_dir)}
            )
    return rows, ids


def _finish(rows: list[dict], source: str, fmt: str, notes: list[str]) -> Catalog:
    if not rows:
        raise CatalogError(f"{source}: the core file has no records")
    counts = Counter(row["specimen_id"] for row in rows)
    repeated = [value for value, n in counts.items() if n > 1]
    if repeated:
        # Repeated record ids happen in hand-made exports; number the repeats so no
        # record is lost, and say so.
        notes.append(
            f"{len(repeated)} record ids repeat (e.g. {repeated[0]!r}); repeats numbered '~2', '~3'"
        )
        seen: Counter = Counter()
        for row in rows:
            value = row["specimen_id"]
            seen[value] += 1
            if counts[value] > 1 and seen[value] > 1:
                row["specimen_id"] = f"{value}~{seen[value]}"
    without_media = sum(1 for row in rows if row["image_uri"] is None)
    if without_media:
        notes.append(f"{without_media} of {len(rows)} records have no image (image_uri is empty)")
        logger.info("%s: %d of %d records have no image", source, without_media, len(rows))
    has_collector = any(row.get("recorded_by") for row in rows)
    return Catalog(
        table=build_table(rows),
        source=source,
        format=fmt,
        group_column="recorded_by" if has_collector else None,
        notes=notes,
    )


def read_dwc_text_bytes(
    data: bytes, source: str, base_dir: str, encoding: str | None = None
) -> Catalog:
    """Read a bare Darwin Core text file (header row of terms, no meta.xml)."""
    text = decode(data, source, encoding)
    rows = read_rows(text, delimiter=sniff_delimiter(text))
    if not rows:
        raise CatalogError(f"{source}: empty file")
    header = [name.strip() for name in rows[0]]
    columns = [column_for_term(name) for name in header]
    lowered = [name.lower() for name in header]
    id_column = next(
        (lowered.index(name) for name in ID_TERMS if name in lowered),
        None,
    )
    records = []
    for number, row in enumerate(rows[1:], start=1):
        record = {col: value for col, value in zip(columns, row, strict=False) if value != ""}
        record_id = row[id_column] if id_column is not None and id_column < len(row) else ""
        record["_id"] = record_id or f"row-{number}"
        records.append(record)
    out, _ = _rows_from_records(records, {}, False, base_dir)
    return _finish(out, source, "dwca", [])
