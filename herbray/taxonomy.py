"""The label vocabulary: a stable species <-> index map saved as ``labels.json``.

Indices are given once, when the first ``labels.json`` is written, and then
travel with the shards and every model trained on them. Later stages map names
through the saved file, so a species missing from a later set never shifts the
others, and a new species can only be appended at the end.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from herbray import storage

FORMAT = "herbray-labels"
VERSION = 1


def natural_key(name: str) -> tuple:
    """Sort key that orders '1' < '2' < '10' and compares words case-insensitively.

    The exact name breaks ties, so distinct names never compare equal.
    """
    parts = re.split(r"(\d+)", name)
    key = tuple((0, int(p), "") if p.isdigit() else (1, 0, p.casefold()) for p in parts if p)
    return (key, name)


@dataclass(frozen=True)
class LabelMap:
    """Species names by index, with the number of images each had when made."""

    names: tuple[str, ...]
    counts: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.names) != len(self.counts):
            raise ValueError("LabelMap needs one count per name")
        repeated = [name for name, n in Counter(self.names).items() if n > 1]
        if repeated:
            raise ValueError(f"species names repeat in the label map: {repeated[:5]}")
        object.__setattr__(self, "_index", {name: i for i, name in enumerate(self.names)})

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: object) -> bool:
        return name in self._index

    @classmethod
    def from_names(cls, names: Iterable[str | None]) -> LabelMap:
        """Build a new map from the species of a collection (nulls ignored), naturally sorted."""
        counts = Counter(name for name in names if name is not None)
        ordered = sorted(counts, key=natural_key)
        return cls(tuple(ordered), tuple(counts[name] for name in ordered))

    def index(self, name: str) -> int:
        try:
            return self._index[name]
        except KeyError:
            raise KeyError(
                f"species {name!r} is not in the label map of {len(self)} species"
            ) from None

    def encode(self, names: Iterable[str | None]) -> list[int]:
        """Indices for names; -1 for a null or a species the map does not have."""
        return [self._index.get(name, -1) if name is not None else -1 for name in names]

    def extended(self, names: Iterable[str | None]) -> LabelMap:
        """This map plus any new species appended at the end; old indices never move."""
        counts = Counter(name for name in names if name is not None)
        new = sorted((name for name in counts if name not in self._index), key=natural_key)
        updated = tuple(counts.get(name, 0) for name in self.names)
        return LabelMap(self.names + tuple(new), updated + tuple(counts[name] for name in new))

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "num_classes": len(self),
            "classes": [
                {"index": i, "name": name, "count": count}
                for i, (name, count) in enumerate(zip(self.names, self.counts, strict=True))
            ],
        }

    def save(self, uri: str) -> None:
        storage.write_text(uri, json.dumps(self.to_json(), ensure_ascii=False, indent=1) + "\n")

    @classmethod
    def from_json(cls, data: dict, source: str = "labels.json") -> LabelMap:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{source} is not a herbray labels file (format {FORMAT!r})")
        classes = sorted(data.get("classes", []), key=lambda c: c["index"])
        if [c["index"] for c in classes] != list(range(len(classes))):
            raise ValueError(f"{source}: class indices are not 0..{len(classes) - 1} without gaps")
        return cls(
            tuple(c["name"] for c in classes), tuple(int(c.get("count", 0)) for c in classes)
        )

    @classmethod
    def load(cls, uri: str) -> LabelMap:
        try:
            data = json.loads(storage.read_text(uri))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{uri} is not valid JSON: {exc}") from exc
        return cls.from_json(data, uri)
