"""Reading delimited text (CSV, TSV, Darwin Core text) with its encoding and quoting."""

from __future__ import annotations

import codecs
import csv
import io
import sys

from herbray.catalog.table import CatalogError

# Darwin Core records can hold long free-text fields (remarks, locality).
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))

_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


def decode(data: bytes, source: str, encoding: str | None = None) -> str:
    """Decode text bytes: the given encoding, else a byte-order mark, else UTF-8.

    A byte-order mark wins over a declared UTF-8 (exports from spreadsheet
    programs often carry one). Undecodable text raises with the fix.
    """
    detected = next((name for bom, name in _BOMS if data.startswith(bom)), None)
    if detected and (encoding is None or encoding.lower().replace("_", "-") in {"utf-8", "utf8"}):
        encoding = detected
    encoding = encoding or "utf-8"
    try:
        return data.decode(encoding)
    except LookupError as exc:
        raise CatalogError(f"{source}: unknown text encoding {encoding!r}") from exc
    except UnicodeDecodeError as exc:
        raise CatalogError(
            f"{source}: not valid {encoding} text at byte {exc.start}; "
            "pass the file's encoding (e.g. --encoding cp1252)"
        ) from exc


def sniff_delimiter(text: str, default: str = ",") -> str:
    sample = text[:65536]
    try:
        return csv.Sniffer().sniff(sample, delimiters=",\t;|").delimiter
    except csv.Error:
        first = sample.splitlines()[0] if sample else ""
        return "\t" if first.count("\t") > first.count(default) else default


def read_rows(
    text: str,
    *,
    delimiter: str,
    quotechar: str | None = '"',
    skip_lines: int = 0,
) -> list[list[str]]:
    """Split delimited text into rows of fields.

    ``quotechar=None`` reads every character literally (Darwin Core text with an
    empty ``fieldsEnclosedBy``). Quoted fields may contain delimiters and newlines.
    """
    if quotechar:
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quotechar=quotechar)
    else:
        reader = csv.reader(
            io.StringIO(text, newline=""), delimiter=delimiter, quoting=csv.QUOTE_NONE
        )
    rows = []
    for number, row in enumerate(reader):
        if number < skip_lines:
            continue
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        rows.append(row)
    return rows
