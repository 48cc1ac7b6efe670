"""Export label rows for collection-management systems: Darwin Core Archive or CSV.

The Darwin Core Archive has an occurrence core with the current identification
(the top-1 species when its confidence passed the threshold) and the
Identification History extension with every top-k suggestion as a
determination, ranked in ``identificationRemarks``. GBIF's IPT, Specify and
Symbiota import both. The CSV has one row per image with the suggestions
flattened into one column.
"""

from __future__ import annotations

import csv
import io
import logging
import zipfile
from xml.sax.saxutils import escape

from herbray import storage
from herbray.label import read_output

logger = logging.getLogger(__name__)

DWC = "http://rs.tdwg.org/dwc/terms/"
DC = "http://purl.org/dc/terms/"

# Occurrence core columns: (header, term URI, function of a label row).
OCCURRENCE_COLUMNS = [
    ("id", None, lambda r: r["specimen_id"]),
    ("occurrenceID", DWC + "occurrenceID", lambda r: r["occurrenceID"]),
    ("catalogNumber", DWC + "catalogNumber", lambda r: r["catalogNumber"]),
    ("basisOfRecord", DWC + "basisOfRecord", lambda r: "PreservedSpecimen"),
    ("scientificName", DWC + "scientificName", lambda r: r["scientificName"]),
    (
        "identifiedBy",
        DWC + "identifiedBy",
        lambda r: r["identifiedBy"] if r["status"] == "ok" else None,
    ),
    (
        "dateIdentified",
        DWC + "dateIdentified",
        lambda r: r["dateIdentified"] if r["status"] == "ok" else None,
    ),
    (
        "identificationVerificationStatus",
        DWC + "identificationVerificationStatus",
        lambda r: r["identificationVerificationStatus"],
    ),
    ("identificationRemarks", DWC + "identificationRemarks", lambda r: r["identificationRemarks"]),
    ("associatedMedia", DWC + "associatedMedia", lambda r: r["image_uri"]),
]

IDENTIFICATION_COLUMNS = [
    "coreid",
    "identificationID",
    "scientificName",
    "identifiedBy",
    "dateIdentified",
    "identificationVerificationStatus",
    "identificationRemarks",
]
IDENTIFICATION_TERMS = {
    "identificationID": DWC + "identificationID",
    "scientificName": DWC + "scientificName",
    "identifiedBy": DWC + "identifiedBy",
    "dateIdentified": DWC + "dateIdentified",
    "identificationVerificationStatus": DWC + "identificationVerificationStatus",
    "identificationRemarks": DWC + "identificationRemarks",
}


def _text(rows: list[list]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter="\t", quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
    for row in rows:
        writer.writerow(["" if v is None else str(v) for v in row])
    return buffer.getvalue()


def _meta_xml() -> str:
    core_fields = "\n".join(
        f'    <field index="{i}" term="{term}"/>'
        for i, (_, term, _) in enumerate(OCCURRENCE_COLUMNS)
        if term
    )
    ext_fields = "\n".join(
        f'    <field index="{i}" term="{IDENTIFICATION_TERMS[name]}"/>'
        for i, name in enumerate(IDENTIFICATION_COLUMNS)
        if name in IDENTIFICATION_TERMS
    )
    attributes = (
        'encoding="UTF-8" fieldsTerminatedBy="\\t" linesTerminatedBy="\\n" '
        'fieldsEnclosedBy="&quot;" ignoreHeaderLines="1"'
    )
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<archive xmlns="http://rs.tdwg.org/dwc/text/" metadata="eml.xml">
  <core {attributes} rowType="{DWC}Occurrence">
    <files><location>occurrence.txt</location></files>
    <id index="0"/>
{core_fields}
  </core>
  <extension {attributes} rowType="http://rs.tdwg.org/dwc/terms/Identification">
    <files><location>identification.txt</location></files>
    <coreid index="0"/>
{ext_fields}
  </extension>
</archive>
"""


def _eml(title: str, identified_by: str) -> str:
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<eml:eml xmlns:eml="eml://ecoinformatics.org/eml-2.1.1" packageId="herbray-labels" system="herbray"
  scope="system">
  <dataset>
    <title>{escape(title)}</title>
    <abstract><para>Machine species identifications of digitized herbarium sheets by
{escape(identified_by)}; unverified suggestions for curators.</para></abstract>
  </dataset>
</eml:eml>
"""


def export_dwca(labels_output: str, target: str, title: str = "herbray identifications") -> int:
    """Write the label rows of a label output folder as a zipped Darwin Core Archive."""
    rows = sorted(read_output(labels_output).to_pylist(), key=lambda r: r["specimen_id"])
    occurrences = [[name for name, _, _ in OCCURRENCE_COLUMNS]]
    identifications = [IDENTIFICATION_COLUMNS]
    for row in rows:
        occurrences.append([get(row) for _, _, get in OCCURRENCE_COLUMNS])
        names, scores = row["topk_names"] or [], row["topk_scores"] or []
        for rank, (name, score) in enumerate(zip(names, scores, strict=True), start=1):
            identifications.append(
                [
                    row["specimen_id"],
                    f"{row['specimen_id']}#herbray-{rank}",
                    name,
                    row["identifiedBy"],
                    row["dateIdentified"],
                    row["identificationVerificationStatus"],
                    f"machine suggestion {rank} of {len(names)}, score {score:.4f}",
                ]
            )
    identified_by = rows[0]["identifiedBy"] if rows else "herbray"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("meta.xml", _meta_xml())
        archive.writestr("eml.xml", _eml(title, identified_by))
        archive.writestr("occurrence.txt", _text(occurrences))
        archive.writestr("identification.txt", _text(identifications))
    storage.write_bytes(target, buffer.getvalue())
    logger.info(
        "wrote %d occurrences and %d identifications to %s",
        len(rows),
        len(identifications) - 1,
        target,
    )
    return len(rows)


CSV_COLUMNS = [
    "image_uri",
    "specimen_id",
    "catalogNumber",
    "occurrenceID",
    "scientificName",
    "confidence",
    "status",
    "error",
    "suggestions",
    "identifiedBy",
    "dateIdentified",
    "identificationVerificationStatus",
    "identificationRemarks",
    "width",
    "height",
]


def export_csv(labels_output: str, target: str) -> int:
    """Write the label rows as one CSV (UTF-8); suggestions as 'name (score) | ...'."""
    rows = sorted(read_output(labels_output).to_pylist(), key=lambda r: r["specimen_id"])
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        pairs = zip(row["topk_names"] or [], row["topk_scores"] or [], strict=True)
        row = dict(row, suggestions=" | ".join(f"{n} ({s:.4f})" for n, s in pairs))
        if row["confidence"] is not None:
            row["confidence"] = f"{row['confidence']:.4f}"
        writer.writerow(["" if row.get(c) is None else row[c] for c in CSV_COLUMNS])
    storage.write_text(target, buffer.getvalue())
    return len(rows)
