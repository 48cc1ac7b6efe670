"""Synthetic herbarium sheets and the offline demo collection built from them.

The demo species are fictional: each name joins a real genus to an invented
epithet and the authorship "Herbray" (for example *Quercus demoensis* Herbray),
so no demo output can be mistaken for a real identification. Each species has
its own morphology (leaf shape, margin, venation, arrangement, habit and
fertile parts), so a CNN can learn to tell them apart from the drawn plant
alone, as it would on real sheets.

A sheet is drawn at a working width of at most :data:`MAX_WORK_WIDTH` pixels,
resized to the requested size, and then given per-pixel scanner noise at the
final size. So a 4000x6000 sheet costs little more to draw than a small one,
and its JPEG is about as large as a real scan of that size.

Everything is deterministic for a seed: all randomness comes from one
``numpy.random.Generator`` per sheet.

Quick use::

    from herbray import synthetic
    summary = synthetic.generate_collection("demo-data", n_species=6)
    synthetic.write_sheet("big.jpg", "Quercus demoensis Herbray", seed=1, size=(4000, 6000))
"""

from __future__ import annotations

import csv
import datetime
import functools
import logging
import math
import multiprocessing
import os
import shutil
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter, ImageFont

logger = logging.getLogger(__name__)

RGB = tuple[int, int, int]

# Defaults of the offline demo, sized so that generating, preparing, training
# and labeling it together fit in minutes on a 2-core CPU machine.
DEFAULT_SIZE = (1200, 1800)  # sheet width x height in pixels, 2:3 portrait
DEFAULT_JPEG_QUALITY = 90
# Sheets wider than this are drawn at this width and resized up, so drawing
# cost stays flat while the noise, added after the resize, keeps JPEG sizes real.
MAX_WORK_WIDTH = 1600
# A standard herbarium mounting sheet is about 29 x 42 cm (11.5 x 16.5 inches).
SHEET_WIDTH_CM = 29.0
# Side of the square noise tile repeated over the sheet. Tiling keeps noise at
# 24 megapixels cheap, and a repeat every 512 pixels is not visible in the grain.
NOISE_TILE = 512


# ---------------------------------------------------------------------------
# Species


@dataclass(frozen=True)
class DemoSpecies:
    """A fictional demo species and the morphology its sheets are drawn with.

    ``habit`` selects the drawing routine: ``branch`` (a cut woody shoot),
    ``herb`` (stems with roots), ``rosette`` (basal leaves with roots), ``tuft``
    (grass-like blades) or ``fronds`` (fern). ``leaf_shape`` is a simple blade
    shape (ovate, lanceolate, elliptic, linear, cordate, oak-lobed, palmate) or
    a compound leaf (pinnate, trifoliate, frond). ``venation`` describes the
    species only, because the drawn veins follow from the blade shape.
    """

    genus: str
    epithet: str
    family: str
    habit: str
    leaf_shape: str
    margin: str  # entire, serrate, crenate or lobed
    venation: str
    arrangement: str  # alternate, opposite or whorled on stems; basal otherwise
    leaf_length_cm: float  # typical blade length (whole leaf for compound leaves)
    leaf_width_ratio: float  # blade width / blade length
    petiole_ratio: float  # petiole length / blade length (stipe share for fronds)
    leaf_colour: RGB  # dried-leaf colour before per-leaf variation
    stem_colour: RGB
    fertile_parts: str  # flowers or fruits drawn, "none" for a sterile specimen
    authorship: str = "Herbray"

    @property
    def scientific_name(self) -> str:
        """The full scientific name with authorship, as labels and folders show it."""
        return f"{self.genus} {self.epithet} {self.authorship}"


# The first six are the most distinct and form the default demo. Fields in order:
# genus, epithet, family, habit, leaf_shape, margin, venation, arrangement,
# leaf_length_cm, leaf_width_ratio, petiole_ratio, leaf_colour, stem_colour, fertile_parts.
SPECIES: tuple[DemoSpecies, ...] = (
    DemoSpecies(
        "Quercus", "demoensis", "Fagaceae", "branch", "oak", "lobed", "pinnate",
        "alternate", 10.0, 0.55, 0.08, (92, 96, 52), (105, 85, 60), "acorns",
    ),
    DemoSpecies(
        "Salix", "synthetica", "Salicaceae", "branch", "lanceolate", "serrate", "pinnate",
        "alternate", 9.0, 0.2, 0.06, (112, 120, 78), (120, 95, 70), "catkins",
    ),
    DemoSpecies(
        "Carex", "fictiva", "Cyperaceae", "tuft", "linear", "entire", "parallel",
        "basal", 30.0, 0.03, 0.0, (128, 128, 78), (140, 125, 85), "spikes",
    ),
    DemoSpecies(
        "Viola", "demonstrata", "Violaceae", "rosette", "cordate", "crenate", "palmate",
        "basal rosette", 4.5, 0.9, 1.6, (70, 88, 48), (95, 110, 65), "violet flowers",
    ),
    DemoSpecies(
        "Acer", "artificiale", "Sapindaceae", "branch", "palmate", "serrate", "palmate",
        "opposite", 9.5, 1.0, 0.7, (98, 112, 56), (110, 80, 60), "samaras",
    ),
    DemoSpecies(
        "Fraxinus", "exemplaris", "Oleaceae", "branch", "pinnate", "serrate", "pinnate",
        "opposite", 17.0, 0.3, 0.12, (80, 90, 58), (125, 110, 85), "none",
    ),
    DemoSpecies(
        "Galium", "simulatum", "Rubiaceae", "herb", "linear", "entire", "single midrib",
        "whorled", 2.2, 0.12, 0.0, (88, 104, 60), (105, 115, 70), "white flowers",
    ),
    DemoSpecies(
        "Plantago", "pseudodemo", "Plantaginaceae", "rosette", "elliptic", "entire",
        "parallel", "basal rosette", 12.0, 0.42, 0.35, (84, 96, 56), (110, 105, 70),
        "flower spikes",
    ),
    DemoSpecies(
        "Trifolium", "imaginarium", "Fabaceae", "herb", "trifoliate", "entire", "pinnate",
        "alternate", 2.6, 0.6, 1.4, (76, 98, 56), (110, 115, 70), "clover heads",
    ),
    DemoSpecies(
        "Polypodium", "demonstrans", "Polypodiaceae", "fronds", "frond", "entire",
        "pinnate", "basal", 24.0, 0.45, 0.3, (88, 100, 50), (95, 75, 50), "sori",
    ),
    DemoSpecies(
        "Ficus", "fabricata", "Moraceae", "branch", "elliptic", "entire", "pinnate",
        "alternate", 16.0, 0.45, 0.2, (70, 72, 42), (115, 100, 80), "figs",
    ),
    DemoSpecies(
        "Solidago", "generata", "Asteraceae", "herb", "lanceolate", "serrate", "pinnate",
        "alternate", 8.0, 0.18, 0.0, (96, 106, 60), (100, 100, 62), "yellow panicle",
    ),
)  # fmt: skip


def demo_species(n: int = 6) -> list[DemoSpecies]:
    """Return the first ``n`` demo species (at most ``len(SPECIES)``)."""
    if not 1 <= n <= len(SPECIES):
        raise ValueError(f"n_species={n} is out of range: the demo has 1 to {len(SPECIES)} species")
    return list(SPECIES[:n])


def find_species(name: str | DemoSpecies) -> DemoSpecies:
    """Look a demo species up by scientific name, binomial or genus (case-insensitive)."""
    if isinstance(name, DemoSpecies):
        return name
    wanted = name.strip().lower()
    for species in SPECIES:
        binomial = f"{species.genus} {species.epithet}".lower()
        if wanted in (species.scientific_name.lower(), binomial, species.genus.lower()):
            return species
    choices = ", ".join(s.scientific_name for s in SPECIES)
    raise ValueError(f"unknown demo species {name!r}; choose one of: {choices}")


# ---------------------------------------------------------------------------
# Label data: institutions, collectors, localities (all fictional)


@dataclass(frozen=True)
class Institution:
    """A fictional herbarium; its scanning habits differ, as real herbaria's do."""

    code: str
    name: str
    stamp_colour: RGB
    framed_share: float  # share of its sheets scanned on a dark bed with a margin


INSTITUTIONS: tuple[Institution, ...] = (
    Institution("HDH", "Herbray Demonstration Herbarium", (60, 70, 150), 0.8),
    Institution("DBI", "Demo Botanical Institute", (120, 50, 110), 0.2),
    Institution("SFH", "Synthetic Flora Herbarium", (40, 40, 40), 0.5),
)

# Each collector deposits at one institution, so the institution (and with it
# the label style) follows the collector, as on real sheets.
COLLECTORS: tuple[tuple[str, str], ...] = (
    ("A. Alvarez", "HDH"),
    ("K. Berg", "DBI"),
    ("M. Chen", "SFH"),
    ("J. Dubois", "HDH"),
    ("R. Eze", "DBI"),
    ("S. Fischer", "SFH"),
    ("L. Garcia", "HDH"),
    ("T. Haas", "DBI"),
    ("N. Ito", "SFH"),
    ("P. Jones", "HDH"),
)

DEMO_COUNTRY = "Demoland"  # a fictional country
LOCALITIES: tuple[str, ...] = (
    "Valle Demo, along the river",
    "Cerro Ejemplo, north slope",
    "Lago Ficticio, shore meadow",
    "Sierra Prueba, oak woodland",
    "Llano Sintetico, roadside",
    "Bosque Imaginario, forest edge",
)


@dataclass(frozen=True)
class SheetLabel:
    """The printed label text of one sheet, which its sidecar XML repeats."""

    institution: Institution
    collector: str
    collector_number: int
    date: str  # ISO 8601, YYYY-MM-DD
    locality: str
    elevation_m: int
    catalog_number: str


def random_label(rng: np.random.Generator, collector: str | None = None) -> SheetLabel:
    """Draw label data for one sheet. ``collector`` fixes the collector and so the institution."""
    if collector is None:
        collector = COLLECTORS[int(rng.integers(len(COLLECTORS)))][0]
    codes = dict(COLLECTORS)
    if collector not in codes:
        raise ValueError(f"unknown demo collector {collector!r}; choose one of: {', '.join(codes)}")
    institution = next(i for i in INSTITUTIONS if i.code == codes[collector])
    day = datetime.date(1950, 1, 1) + datetime.timedelta(days=int(rng.integers(0, 70 * 365)))
    return SheetLabel(
        institution=institution,
        collector=collector,
        collector_number=int(rng.integers(100, 9000)),
        date=day.isoformat(),
        locality=LOCALITIES[int(rng.integers(len(LOCALITIES)))],
        elevation_m=int(rng.integers(2, 60)) * 50,
        catalog_number=f"{institution.code}{int(rng.integers(10**6, 10**7))}",
    )


# ---------------------------------------------------------------------------
# Drawing helpers


def _jitter(colour: RGB, rng: np.random.Generator, amount: float) -> RGB:
    shift = rng.normal(0.0, amount)  # shared brightness shift
    return tuple(  # type: ignore[return-value]
        int(np.clip(c + shift + rng.normal(0.0, amount / 2), 0, 255)) for c in colour
    )


def _shade(colour: RGB, delta: float) -> RGB:
    return tuple(int(np.clip(c + delta, 0, 255)) for c in colour)  # type: ignore[return-value]


def _rotate(points: np.ndarray, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return points @ np.array([[c, s], [-s, c]])


def _place(points: np.ndarray, origin: np.ndarray, angle: float) -> np.ndarray:
    """Map local leaf coordinates (base at 0, tip along +x) to plant coordinates."""
    return _rotate(points, angle) + origin


@functools.lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=max(6, size))


class _Canvas:
    """Records plant shapes in plant coordinates (cm, y up, origin at the plant base).

    Shapes are kept as a display list and rasterised later by :meth:`render`,
    so the whole plant's extent is known before it is placed and scaled to fit
    the free part of the sheet.
    """

    def __init__(self) -> None:
        self.ops: list[tuple[str, np.ndarray, RGB, RGB | float | None]] = []
        self.anchors: list[np.ndarray] = []  # stem points where mounting tape may go

    def polygon(self, points: np.ndarray, fill: RGB, outline: RGB | None = None) -> None:
        self.ops.append(("polygon", np.asarray(points, dtype=np.float64), fill, outline))

    def line(self, points: np.ndarray, colour: RGB, width_cm: float) -> None:
        self.ops.append(("line", np.asarray(points, dtype=np.float64), colour, width_cm))

    def tapered_line(self, points: np.ndarray, colour: RGB, start_cm: float, end_cm: float) -> None:
        """Add a stem, root or blade that thins from ``start_cm`` to ``end_cm`` wide."""
        points = np.asarray(points, dtype=np.float64)
        widths = np.linspace(start_cm, end_cm, len(points))
        self.ops.append(("ribbon", points, colour, widths))

    def ellipse(
        self,
        centre: np.ndarray,
        rx: float,
        ry: float,
        angle: float,
        fill: RGB,
        outline: RGB | None = None,
    ) -> None:
        t = np.linspace(0, 2 * np.pi, 20, endpoint=False)
        points = np.stack([rx * np.cos(t), ry * np.sin(t)], axis=1)
        self.polygon(_place(points, centre, angle), fill, outline)

    def bounds(self, rotation: float) -> tuple[np.ndarray, np.ndarray]:
        """Return the (min, max) corners of the plant, rotated and y-flipped, in cm."""
        points = np.vstack([op[1] for op in self.ops]) @ _sheet_matrix(rotation).T
        return points.min(axis=0), points.max(axis=0)

    def render(
        self, image: Image.Image, rotation: float, px_per_cm: float, offset: np.ndarray
    ) -> None:
        """Rasterise the display list: rotate, flip y, scale to pixels, then shift."""
        matrix = _sheet_matrix(rotation).T * px_per_cm
        draw = ImageDraw.Draw(image)
        for kind, points, colour, extra in self.ops:
            xy = points @ matrix + offset
            if kind == "polygon":
                draw.polygon(_pixels(xy), fill=colour, outline=extra)  # type: ignore[arg-type]
            elif kind == "line":
                width = max(1, round(float(extra) * px_per_cm))  # type: ignore[arg-type]
                draw.line(_pixels(xy), fill=colour, width=width, joint="curve")
            else:
                _draw_ribbon(draw, xy, np.asarray(extra) * px_per_cm, colour)


def _pixels(xy: np.ndarray) -> list[tuple[float, float]]:
    return [tuple(p) for p in xy.tolist()]


def _draw_ribbon(
    draw: ImageDraw.ImageDraw, xy: np.ndarray, widths: np.ndarray, colour: RGB
) -> None:
    """Draw a polyline whose width changes smoothly along it (``widths`` in pixels).

    Wide ribbons are filled polygons offset along the path normals, so a taper
    has no steps at any resolution. Ribbons under 3 pixels are plain lines.
    """
    if len(xy) < 2:
        return
    if widths.max() < 3.0:
        draw.line(_pixels(xy), fill=colour, width=max(1, round(float(widths.mean()))))
        return
    tangent = np.gradient(xy, axis=0)
    tangent /= np.maximum(np.linalg.norm(tangent, axis=1, keepdims=True), 1e-9)
    normal = np.stack([-tangent[:, 1], tangent[:, 0]], axis=1) * (widths[:, None] / 2)
    outline = np.vstack([xy + normal, (xy - normal)[::-1]])
    draw.polygon(_pixels(outline), fill=colour, outline=colour)


def _sheet_matrix(rotation: float) -> np.ndarray:
    """Rotate by ``rotation`` radians and flip y, because image rows grow downwards."""
    c, s = math.cos(rotation), math.sin(rotation)
    return np.array([[c, s], [-s, c]]) @ np.array([[1.0, 0.0], [0.0, -1.0]])


def _path(
    rng: np.random.Generator,
    start: np.ndarray,
    angle: float,
    length: float,
    wiggle: float,
    pull: float = 0.0,
    step: float = 0.4,
) -> np.ndarray:
    """Return a gently curving polyline (cm) from ``start`` heading ``angle`` (radians).

    ``wiggle`` is the per-step random turn and ``pull`` draws the heading back
    towards the start angle, so stems bend without curling up.
    """
    n = max(2, int(length / step))
    heading = np.empty(n)
    current = angle
    for i in range(n):
        current += rng.normal(0.0, wiggle) + pull * (angle - current)
        heading[i] = current
    steps = np.stack([np.cos(heading), np.sin(heading)], axis=1) * (length / n)
    return np.vstack([start, start + np.cumsum(steps, axis=0)])


def _direction(path: np.ndarray, i: int) -> float:
    a = path[max(0, i - 1)]
    b = path[min(len(path) - 1, i + 1)]
    return math.atan2(b[1] - a[1], b[0] - a[0])


# ---------------------------------------------------------------------------
# Leaves


def _blade(
    shape: str, length: float, width_ratio: float, margin: str, rng: np.random.Generator
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Return a leaf blade outline and its veins in local coordinates (cm).

    The blade's base is at the origin and its tip on +x; the outline is a
    closed polygon and each vein an open polyline.
    """
    if shape == "cordate":
        return _cordate_blade(length, width_ratio, margin, rng)
    if shape == "palmate":
        return _palmate_blade(length, width_ratio, rng)

    # Profile blades: half-width w(t) along the midrib, t in [0, 1].
    exponents = {
        "ovate": (0.5, 0.9),
        "lanceolate": (0.6, 1.3),
        "elliptic": (0.9, 0.9),
        "linear": (0.12, 0.35),
        "oak": (0.9, 0.7),
    }
    a, b = exponents[shape]
    teeth = int(length * 2.2) if margin == "serrate" else 0
    n = max(50, teeth * 5)
    t = np.linspace(0.0, 1.0, n)
    half = t**a * (1.0 - t) ** b
    half = half / half.max() * width_ratio * length / 2.0
    upper, lower = half.copy(), half.copy()

    if shape == "oak":
        lobes = int(rng.integers(4, 6)) + 0.5
        phase = rng.uniform(-0.1, 0.1)
        upper *= 0.38 + 0.62 * np.abs(np.sin(np.pi * lobes * t)) ** 0.7
        lower *= 0.38 + 0.62 * np.abs(np.sin(np.pi * lobes * (t + phase))) ** 0.7
    if teeth:
        saw = (t * teeth) % 1.0
        upper *= 1.0 + 0.1 * saw * (t > 0.05)
        lower *= 1.0 + 0.1 * ((t * teeth + 0.5) % 1.0) * (t > 0.05)
    if margin == "crenate":
        upper *= 1.0 + 0.05 * np.abs(np.sin(np.pi * t * length * 1.5))
        lower *= 1.0 + 0.05 * np.abs(np.sin(np.pi * t * length * 1.5))

    bend = rng.normal(0.0, 0.08) * length
    x = t * length
    midline = bend * t**2
    outline = np.vstack(
        [np.stack([x, midline + upper], axis=1), np.stack([x, midline - lower], axis=1)[::-1]]
    )

    veins = [np.stack([x[: int(n * 0.95)], midline[: int(n * 0.95)]], axis=1)]
    if shape == "linear" or shape == "elliptic" and width_ratio > 0.4 and length > 10:
        # Parallel (or arcuate) venation: lines that keep a fixed fraction of the half-width.
        for frac in (-0.55, 0.55) if shape == "linear" else (-0.7, -0.4, 0.4, 0.7):
            veins.append(np.stack([x, midline + frac * half], axis=1))
        return outline, veins

    if shape == "oak":
        starts = [(j + 0.5) / lobes - 0.08 for j in range(int(lobes))]
    else:
        starts = list(np.linspace(0.1, 0.8, max(3, int(length * 0.8))))
    for t0 in starts:
        i0 = int(np.clip(t0, 0.02, 0.95) * (n - 1))
        i1 = min(n - 1, i0 + int(0.1 * n))
        for side, edge in ((1.0, upper), (-1.0, lower)):
            tip = np.array([x[i1], midline[i1] + side * 0.85 * edge[i1]])
            veins.append(np.array([[x[i0], midline[i0]], tip]))
    return outline, veins


def _cordate_blade(
    length: float, width_ratio: float, margin: str, rng: np.random.Generator
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Return a heart-shaped blade: a cardioid with its cusp (the sinus) at the petiole."""
    phi = np.linspace(-np.pi, np.pi, 120)
    r = (1.0 + np.cos(phi)) / 2.0 * length
    r *= 1.0 + 0.25 * np.exp(-((phi / 0.3) ** 2))  # acute tip
    if margin == "crenate":
        r *= 1.0 + 0.035 * np.abs(np.sin(phi * 9))
    squeeze = width_ratio / 1.3
    outline = np.stack([r * np.cos(phi), r * np.sin(phi) * squeeze], axis=1)
    veins = []
    for angle, frac in ((0.0, 1.1), (0.7, 0.55), (-0.7, 0.55), (1.5, 0.3), (-1.5, 0.3)):
        rr = np.linspace(0, frac * length * 0.85, 8)
        a = angle * (1 - 0.3 * rr / length)  # veins curve towards the tip
        veins.append(np.stack([rr * np.cos(a), rr * np.sin(a) * squeeze], axis=1))
    return outline, veins


def _palmate_blade(
    length: float, width_ratio: float, rng: np.random.Generator
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Return a palmately five-lobed, toothed blade (maple-like) around the petiole tip."""
    lobe_angles = np.array([0.0, 0.85, -0.85, 1.75, -1.75]) + rng.normal(0, 0.05, 5)
    lobe_lengths = np.array([1.0, 0.9, 0.9, 0.55, 0.55]) * rng.uniform(0.9, 1.1, 5)
    phi = np.linspace(-np.pi, np.pi, 360)
    r = np.full_like(phi, 0.28)
    for angle, reach in zip(lobe_angles, lobe_lengths, strict=True):
        d = np.abs(np.angle(np.exp(1j * (phi - angle))))
        r = np.maximum(r, reach * np.clip(1.0 - d / 0.42, 0.0, 1.0) ** 0.6)
    r *= 1.0 + 0.07 * ((phi * 24 / np.pi) % 1.0)  # forward-pointing teeth
    r = np.where(np.abs(phi) > 2.7, r * 0.5, r)  # basal sinus at the petiole
    r *= length * 0.6
    outline = np.stack([r * np.cos(phi), r * np.sin(phi) * width_ratio], axis=1)
    veins = []
    for angle, reach in zip(lobe_angles, lobe_lengths, strict=True):
        end = reach * length * 0.55
        veins.append(np.array([[0.0, 0.0], [end * math.cos(angle), end * math.sin(angle)]]))
    return outline, veins


def _draw_blade(
    canvas: _Canvas,
    species: DemoSpecies,
    rng: np.random.Generator,
    origin: np.ndarray,
    angle: float,
    length: float,
    shape: str | None = None,
    width_ratio: float | None = None,
) -> None:
    outline, veins = _blade(
        shape or species.leaf_shape,
        length,
        width_ratio or species.leaf_width_ratio,
        species.margin,
        rng,
    )
    fill = _leaf_fill(species, rng)
    underside = rng.random() < 0.2  # some pressed leaves show their paler underside
    if underside:
        fill = _shade(fill, 28)
    canvas.polygon(_place(outline, origin, angle), fill, outline=_shade(fill, -25))
    vein_colour = _shade(fill, 30 if underside else 18)
    vein_width = max(0.02, 0.012 * length)
    for i, vein in enumerate(veins):
        canvas.line(_place(vein, origin, angle), vein_colour, vein_width * (1.6 if i == 0 else 1))


def _leaf_fill(species: DemoSpecies, rng: np.random.Generator) -> RGB:
    """Pick a dried-leaf colour: the species' colour, sometimes turned towards brown."""
    brown = np.array([122.0, 98.0, 62.0])
    mix = rng.random() ** 3 * 0.8  # most leaves keep their colour, a few brown strongly
    base = (1.0 - mix) * np.asarray(species.leaf_colour) + mix * brown
    return _jitter(tuple(int(c) for c in base), rng, 8)  # type: ignore[arg-type]


def _draw_leaf(
    canvas: _Canvas,
    species: DemoSpecies,
    rng: np.random.Generator,
    node: np.ndarray,
    angle: float,
    length: float,
) -> None:
    """Draw one whole leaf (petiole, blade or leaflets) attached at ``node``."""
    petiole = species.petiole_ratio * length * rng.uniform(0.8, 1.2)
    tip = node + petiole * np.array([math.cos(angle), math.sin(angle)])
    if petiole > 0:
        canvas.line(np.array([node, tip]), _shade(species.stem_colour, 10), 0.04 + 0.004 * length)

    if species.leaf_shape == "pinnate":
        _draw_pinnate(canvas, species, rng, tip, angle, length)
    elif species.leaf_shape == "trifoliate":
        for offset in (-1.0, 0.0, 1.0):
            leaflet_angle = angle + offset * rng.uniform(0.8, 1.1)
            _draw_blade(
                canvas,
                species,
                rng,
                tip,
                leaflet_angle,
                length * rng.uniform(0.85, 1.05),
                shape="ovate",
            )
    else:
        _draw_blade(canvas, species, rng, tip, angle, length)


def _draw_pinnate(
    canvas: _Canvas,
    species: DemoSpecies,
    rng: np.random.Generator,
    base: np.ndarray,
    angle: float,
    length: float,
) -> None:
    """Draw a pinnately compound leaf: leaflet pairs on a rachis, then a terminal leaflet."""
    pairs = int(rng.integers(3, 5))
    rachis = _path(rng, base, angle, length * 0.75, 0.04, pull=0.2, step=0.5)
    canvas.line(rachis, _shade(species.stem_colour, 15), 0.06)
    leaflet = length * 0.32
    for j in range(pairs):
        i = int((0.15 + 0.8 * j / pairs) * (len(rachis) - 1))
        heading = _direction(rachis, i)
        for side in (1.0, -1.0):
            spread = side * rng.uniform(0.9, 1.3)
            _draw_blade(
                canvas,
                species,
                rng,
                rachis[i],
                heading + spread,
                leaflet * rng.uniform(0.85, 1.1),
                shape="lanceolate",
            )
    _draw_blade(
        canvas,
        species,
        rng,
        rachis[-1],
        _direction(rachis, len(rachis) - 1),
        leaflet * 1.1,
        shape="lanceolate",
    )


# ---------------------------------------------------------------------------
# Fertile parts and roots


def _draw_fertile(
    canvas: _Canvas, species: DemoSpecies, rng: np.random.Generator, point: np.ndarray, angle: float
) -> None:
    kind = species.fertile_parts
    direction = np.array([math.cos(angle), math.sin(angle)])
    if kind == "acorns":
        nut = point + direction * 1.3
        canvas.line(np.array([point, point + direction * 0.6]), species.stem_colour, 0.08)
        canvas.ellipse(nut, 1.0, 0.65, angle, _jitter((140, 100, 45), rng, 10), (80, 60, 30))
        canvas.ellipse(point + direction * 0.75, 0.5, 0.75, angle, (95, 80, 55), (70, 55, 35))
    elif kind == "catkins":
        catkin = _path(rng, point, angle, rng.uniform(2.5, 4.5), 0.08, step=0.3)
        canvas.tapered_line(catkin, _jitter((160, 140, 90), rng, 10), 0.55, 0.3)
        for p in catkin[1::2]:
            canvas.ellipse(p, 0.13, 0.18, angle, (125, 105, 65))
    elif kind == "samaras":
        for side in (1.0, -1.0):
            wing = np.array(
                [
                    [0, 0],
                    [0.8, 0.5 * side],
                    [2.6, 0.9 * side],
                    [3.1, 0.3 * side],
                    [1.2, -0.05 * side],
                ]
            )
            canvas.polygon(
                _place(wing, point, angle - 0.9 * side + math.pi / 2),
                _jitter((185, 160, 110), rng, 8),
                (120, 95, 60),
            )
            canvas.ellipse(
                _place(np.array([[0.5, 0.2 * side]]), point, angle - 0.9 * side + math.pi / 2)[0],
                0.45,
                0.3,
                angle,
                (130, 100, 60),
            )
    elif kind == "figs":
        canvas.ellipse(
            point + direction * 0.9, 0.9, 0.8, angle, _jitter((110, 105, 60), rng, 10), (70, 65, 40)
        )
    elif kind == "violet flowers":
        _draw_flower(canvas, rng, point, 0.9, 5, _jitter((118, 82, 150), rng, 12))
    elif kind == "white flowers":
        for _ in range(int(rng.integers(4, 9))):
            centre = point + rng.normal(0, 0.5, 2)
            _draw_flower(canvas, rng, centre, 0.22, 4, (232, 228, 205))
    elif kind == "clover heads":
        head = point + direction * 0.7
        canvas.ellipse(head, 1.0, 0.85, angle, _jitter((165, 110, 115), rng, 10), (110, 70, 75))
        for _ in range(10):
            canvas.ellipse(
                head + rng.normal(0, 0.4, 2), 0.2, 0.12, rng.uniform(0, 3), (190, 140, 140)
            )
    elif kind == "yellow panicle":
        for _ in range(int(rng.integers(25, 40))):
            offset = direction * rng.uniform(0, 5) + rng.normal(0, 0.9, 2)
            canvas.ellipse(
                point + offset, 0.2, 0.2, 0.0, _jitter((205, 175, 60), rng, 12), (150, 120, 40)
            )


def _draw_flower(
    canvas: _Canvas,
    rng: np.random.Generator,
    centre: np.ndarray,
    size: float,
    petals: int,
    colour: RGB,
) -> None:
    start = rng.uniform(0, 2 * np.pi)
    for k in range(petals):
        a = start + 2 * np.pi * k / petals
        petal_centre = centre + size * 0.55 * np.array([math.cos(a), math.sin(a)])
        canvas.ellipse(petal_centre, size * 0.55, size * 0.32, a, colour, _shade(colour, -30))
    canvas.ellipse(centre, size * 0.18, size * 0.18, 0.0, (200, 180, 90))


def _draw_spike(
    canvas: _Canvas,
    rng: np.random.Generator,
    point: np.ndarray,
    angle: float,
    length: float,
    colour: RGB,
    width: float,
) -> None:
    """Draw a dense spike of small florets (a sedge or plantain inflorescence)."""
    axis = _path(rng, point, angle, length, 0.03, step=0.25)
    for p in axis:
        canvas.ellipse(
            p + rng.normal(0, width * 0.15, 2),
            width * 0.55,
            width * 0.35,
            angle + rng.normal(0, 0.4),
            _jitter(colour, rng, 12),
            _shade(colour, -35),
        )


def _draw_roots(
    canvas: _Canvas, rng: np.random.Generator, base: np.ndarray, spread: float, count: int
) -> None:
    colour = _jitter((92, 72, 52), rng, 8)
    for _ in range(count):
        angle = -math.pi / 2 + rng.normal(0, 0.6)
        root = _path(rng, base, angle, rng.uniform(0.4, 1.0) * spread, 0.18, pull=0.1, step=0.3)
        canvas.tapered_line(root, colour, 0.1, 0.02)
        for i in range(2, len(root) - 2, 3):
            if rng.random() < 0.5:
                side = angle + rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 1.2)
                twig = _path(rng, root[i], side, rng.uniform(0.5, 2.0), 0.25, step=0.25)
                canvas.line(twig, colour, 0.025)


# ---------------------------------------------------------------------------
# Habits


def _draw_shoot(
    canvas: _Canvas,
    species: DemoSpecies,
    rng: np.random.Generator,
    start: np.ndarray,
    angle: float,
    length: float,
    woody: bool,
    leaf_scale: float,
) -> np.ndarray:
    """Draw one stem with its leaves at nodes; return the stem path."""
    stem = _path(rng, start, angle, length, 0.035 if woody else 0.05, pull=0.05)
    stem_width = 0.35 if woody else 0.12
    canvas.tapered_line(stem, species.stem_colour, stem_width, stem_width * 0.35)
    canvas.anchors.append(stem[2:-2:3])

    spacing = {"whorled": 2.2, "opposite": 3.2}.get(species.arrangement, 2.0)
    spacing *= max(0.6, species.leaf_length_cm / 9.0) ** 0.5
    n_nodes = max(3, int(length / spacing))
    side = 1.0 if rng.random() < 0.5 else -1.0
    for k in range(1, n_nodes + 1):
        t = k / (n_nodes + 1)
        i = int(t * (len(stem) - 1))
        heading = _direction(stem, i)
        size = species.leaf_length_cm * leaf_scale * (1.05 - 0.45 * t) * rng.uniform(0.8, 1.15)
        if species.arrangement == "whorled":
            count = int(rng.integers(6, 9))
            offset = rng.uniform(0, np.pi)
            for j in range(count):
                a = offset + 2 * np.pi * j / count + rng.normal(0, 0.1)
                _draw_leaf(canvas, species, rng, stem[i], a, size)
        elif species.arrangement == "opposite":
            for s in (1.0, -1.0):
                _draw_leaf(canvas, species, rng, stem[i], heading + s * rng.uniform(0.6, 1.1), size)
        else:
            _draw_leaf(canvas, species, rng, stem[i], heading + side * rng.uniform(0.5, 1.0), size)
            side = -side
        if species.fertile_parts not in ("none", "white flowers", "yellow panicle") and (
            t > 0.35 and rng.random() < 0.35
        ):
            _draw_fertile(canvas, species, rng, stem[i], heading - side * rng.uniform(0.3, 0.8))

    if species.fertile_parts in ("white flowers", "yellow panicle", "catkins"):
        _draw_fertile(canvas, species, rng, stem[-1], _direction(stem, len(stem) - 1))
    return stem


def _draw_plant(
    canvas: _Canvas, species: DemoSpecies, rng: np.random.Generator, height: float
) -> None:
    """Draw the whole pressed plant of ``species``, about ``height`` cm tall, at the origin."""
    origin = np.zeros(2)
    up = math.pi / 2
    habit = species.habit

    if habit == "branch":
        stem = _draw_shoot(
            canvas,
            species,
            rng,
            origin,
            up + rng.normal(0, 0.1),
            height,
            woody=True,
            leaf_scale=1.0,
        )
        for _ in range(int(rng.integers(0, 3))):
            i = int(rng.uniform(0.25, 0.6) * (len(stem) - 1))
            side = rng.choice([-1.0, 1.0]) * rng.uniform(0.4, 0.8)
            _draw_shoot(
                canvas,
                species,
                rng,
                stem[i],
                _direction(stem, i) + side,
                height * rng.uniform(0.3, 0.5),
                woody=True,
                leaf_scale=0.85,
            )
        # The cut end of the branch, paler where the bark was cut.
        canvas.ellipse(origin, 0.2, 0.12, 0.0, _shade(species.stem_colour, 40))

    elif habit == "herb":
        _draw_roots(canvas, rng, origin, height * 0.22, int(rng.integers(5, 10)))
        n_stems = int(rng.integers(2, 5)) if species.arrangement != "alternate" else 1
        if species.leaf_shape == "trifoliate":
            n_stems = int(rng.integers(2, 4))
        for _ in range(n_stems):
            spread = rng.normal(0, 0.25) if n_stems > 1 else rng.normal(0, 0.06)
            _draw_shoot(
                canvas,
                species,
                rng,
                origin,
                up + spread,
                height * rng.uniform(0.75, 1.0),
                woody=False,
                leaf_scale=1.0,
            )

    elif habit == "rosette":
        _draw_roots(canvas, rng, origin, height * 0.3, int(rng.integers(6, 12)))
        n_leaves = int(rng.integers(5, 10))
        for j in range(n_leaves):
            a = up + (j / max(1, n_leaves - 1) - 0.5) * rng.uniform(2.0, 2.6) + rng.normal(0, 0.1)
            _draw_leaf(
                canvas, species, rng, origin, a, species.leaf_length_cm * rng.uniform(0.7, 1.15)
            )
        for _ in range(int(rng.integers(2, 5))):
            a = up + rng.normal(0, 0.35)
            scape = _path(rng, origin, a, height * rng.uniform(0.45, 0.8), 0.05, pull=0.08)
            canvas.line(scape, species.stem_colour, 0.06)
            canvas.anchors.append(scape[3:-3:4])
            if species.fertile_parts == "flower spikes":
                _draw_spike(
                    canvas,
                    rng,
                    scape[-1],
                    _direction(scape, len(scape) - 1),
                    rng.uniform(4, 8),
                    (110, 90, 60),
                    0.35,
                )
            else:
                _draw_fertile(canvas, species, rng, scape[-1], _direction(scape, len(scape) - 1))

    elif habit == "tuft":
        _draw_roots(canvas, rng, origin, height * 0.2, int(rng.integers(10, 18)))
        for _ in range(int(rng.integers(16, 28))):
            a = up + rng.normal(0, 0.3)
            length = height * rng.uniform(0.45, 0.95)
            blade_path = _path(rng, origin, a, length, 0.045, step=0.6)
            width = species.leaf_width_ratio * species.leaf_length_cm * rng.uniform(0.7, 1.2)
            colour = _leaf_fill(species, rng)
            canvas.tapered_line(blade_path, colour, width, width * 0.25)
            canvas.line(blade_path[:-2], _shade(colour, 18), 0.02)
        for _ in range(int(rng.integers(2, 5))):
            culm = _path(
                rng,
                origin,
                up + rng.normal(0, 0.2),
                height * rng.uniform(0.7, 1.0),
                0.03,
                pull=0.05,
            )
            canvas.line(culm, species.stem_colour, 0.08)
            canvas.anchors.append(culm[5:-5:4])
            heading = _direction(culm, len(culm) - 1)
            for k in range(int(rng.integers(2, 4))):
                _draw_spike(
                    canvas,
                    rng,
                    culm[-1 - 4 * k],
                    heading + rng.normal(0, 0.3),
                    rng.uniform(1.5, 3.0),
                    (115, 90, 55),
                    0.45,
                )

    elif habit == "fronds":
        rhizome = _path(rng, origin + np.array([-4.0, 0]), 0.0, 8.0, 0.08, step=0.4)
        canvas.tapered_line(rhizome, species.stem_colour, 0.35, 0.25)
        _draw_roots(canvas, rng, origin, height * 0.12, 8)
        for _ in range(int(rng.integers(2, 4))):
            start = rhizome[int(rng.integers(2, len(rhizome) - 2))]
            _draw_frond(
                canvas, species, rng, start, up + rng.normal(0, 0.3), height * rng.uniform(0.7, 1.0)
            )
    else:
        raise ValueError(f"unknown habit {habit!r} for {species.scientific_name}")


def _draw_frond(
    canvas: _Canvas,
    species: DemoSpecies,
    rng: np.random.Generator,
    start: np.ndarray,
    angle: float,
    length: float,
) -> None:
    """Draw a pinnatifid fern frond: a stipe, then pinnae that shorten towards the tip."""
    rachis = _path(rng, start, angle, length, 0.03, pull=0.1)
    canvas.tapered_line(rachis, species.stem_colour, 0.12, 0.04)
    canvas.anchors.append(rachis[2 : len(rachis) // 3])
    stipe = int(len(rachis) * species.petiole_ratio)
    n_pinnae = int(rng.integers(11, 16))
    for j in range(n_pinnae):
        t = j / n_pinnae
        i = stipe + int(t * (len(rachis) - 1 - stipe))
        heading = _direction(rachis, i)
        pinna = length * 0.22 * (1.0 - 0.75 * t) * rng.uniform(0.9, 1.1)
        for side in (1.0, -1.0):
            a = heading + side * rng.uniform(1.0, 1.3)
            _draw_blade(canvas, species, rng, rachis[i], a, pinna, shape="linear", width_ratio=0.22)
            if rng.random() < 0.6:
                for k in range(1, 4):
                    dot = rachis[i] + pinna * k / 4.5 * np.array([math.cos(a), math.sin(a)])
                    canvas.ellipse(dot, 0.12, 0.12, 0.0, (150, 100, 40))


# ---------------------------------------------------------------------------
# Sheet furniture: label, barcode, stamp, colour chart and ruler, tape, packet


COLOUR_CHART: tuple[RGB, ...] = (
    (245, 245, 242), (200, 200, 200), (150, 150, 150), (100, 100, 100), (50, 50, 50),
    (18, 18, 18), (200, 35, 40), (40, 150, 60), (35, 60, 170), (30, 160, 200),
    (200, 50, 150), (235, 200, 30),
)  # fmt: skip


def _draw_label(
    draw: ImageDraw.ImageDraw,
    box: tuple[int, int, int, int],
    species: DemoSpecies,
    label: SheetLabel,
    px_per_cm: float,
) -> None:
    x0, y0, x1, y1 = box
    draw.rectangle(
        box, fill=(249, 247, 240), outline=(60, 60, 60), width=max(1, round(px_per_cm * 0.04))
    )
    pad = int(0.35 * px_per_cm)
    big, body = _font(round(0.45 * px_per_cm)), _font(round(0.33 * px_per_cm))
    lines = [
        (label.institution.name.upper(), big),
        (f"Plants of {DEMO_COUNTRY}", body),
        ("", body),
        (species.scientific_name, big),
        (species.family, body),
        (f"{label.locality}, {label.elevation_m} m", body),
        (f"Coll. {label.collector} {label.collector_number}      {label.date}", body),
        (f"Det. {label.collector}", body),
        (f"Catalog no. {label.catalog_number}", body),
    ]
    y = y0 + pad
    for text, font in lines:
        if y + font.size > y1 - pad:  # type: ignore[union-attr]
            break
        draw.text((x0 + pad, y), text, fill=(25, 25, 30), font=font)
        y += int(font.size * 1.45)  # type: ignore[union-attr]


def _draw_barcode(
    draw: ImageDraw.ImageDraw, rng: np.random.Generator, x: int, y: int, px_per_cm: float, text: str
) -> None:
    unit = max(1, round(px_per_cm * 0.03))
    height = round(px_per_cm * 0.9)
    width = round(px_per_cm * 4.2)
    draw.rectangle(
        (x - unit * 4, y - unit * 3, x + width + unit * 4, y + height + unit * 14),
        fill=(250, 250, 250),
    )
    cursor = x
    while cursor < x + width:
        bar = unit * int(rng.integers(1, 4))
        draw.rectangle((cursor, y, cursor + bar - 1, y + height), fill=(15, 15, 15))
        cursor += bar + unit * int(rng.integers(1, 4))
    draw.text((x, y + height + unit), text, fill=(20, 20, 20), font=_font(unit * 9))


def _draw_stamp(
    draw: ImageDraw.ImageDraw,
    centre: tuple[float, float],
    px_per_cm: float,
    institution: Institution,
) -> None:
    r = px_per_cm * 1.5
    cx, cy = centre
    colour = institution.stamp_colour
    w = max(1, round(px_per_cm * 0.05))
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=colour, width=w)
    draw.ellipse(
        (cx - r * 0.78, cy - r * 0.78, cx + r * 0.78, cy + r * 0.78), outline=colour, width=w
    )
    font = _font(round(px_per_cm * 0.45))
    draw.text((cx, cy), institution.code, fill=colour, font=font, anchor="mm")


def _draw_chart_and_ruler(
    draw: ImageDraw.ImageDraw, x: int, y: int, px_per_cm: float, length_cm: int
) -> None:
    """Draw a ruler with cm and mm ticks above a row of colour patches."""
    ruler_h = round(px_per_cm * 1.1)
    x1 = x + round(length_cm * px_per_cm)
    draw.rectangle((x, y, x1, y + ruler_h), fill=(238, 236, 225), outline=(30, 30, 30))
    font = _font(round(px_per_cm * 0.32))
    for mm in range(length_cm * 10 + 1):
        tx = x + round(mm * px_per_cm / 10)
        if mm % 10 == 0:
            tick = ruler_h * 0.5
            draw.text((tx + 2, y + ruler_h * 0.55), str(mm // 10), fill=(20, 20, 20), font=font)
        elif mm % 5 == 0:
            tick = ruler_h * 0.35
        elif px_per_cm >= 30:
            tick = ruler_h * 0.2
        else:
            continue
        draw.line((tx, y, tx, y + tick), fill=(20, 20, 20), width=1)
    patch = round(px_per_cm * 1.0)
    py = y + ruler_h + round(px_per_cm * 0.15)
    for k, colour in enumerate(COLOUR_CHART):
        px = x + k * patch
        draw.rectangle((px, py, px + patch - 1, py + patch), fill=colour, outline=(30, 30, 30))


def _draw_tape(
    image: Image.Image, rng: np.random.Generator, centre: tuple[float, float], px_per_cm: float
) -> None:
    """Lay a strip of slightly translucent mounting tape across the plant at ``centre``."""
    length, width = px_per_cm * rng.uniform(1.6, 2.6), px_per_cm * rng.uniform(0.3, 0.45)
    angle = rng.uniform(0, np.pi)
    corners = _rotate(
        np.array([[-length, -width], [length, -width], [length, width], [-length, width]]) / 2,
        angle,
    ) + np.asarray(centre)
    x0, y0 = np.floor(corners.min(axis=0)).astype(int)
    x1, y1 = np.ceil(corners.max(axis=0)).astype(int)
    x0, y0 = max(0, x0), max(0, y0)
    x1, y1 = min(image.width, x1), min(image.height, y1)
    if x1 - x0 < 2 or y1 - y0 < 2:
        return
    region = image.crop((x0, y0, x1, y1))
    taped = region.copy()
    ImageDraw.Draw(taped).polygon(
        [tuple(p) for p in (corners - (x0, y0)).tolist()], fill=_jitter((238, 236, 226), rng, 4)
    )
    image.paste(Image.blend(region, taped, 0.85), (x0, y0))


def _draw_packet(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int]) -> None:
    """Draw a folded fragment packet: a paler paper rectangle with its flap fold lines."""
    x0, y0, x1, y1 = box
    draw.rectangle(box, fill=(246, 245, 240), outline=(185, 182, 170))
    flap = y0 + (y1 - y0) // 3
    draw.line((x0, flap, x1, flap), fill=(200, 198, 188), width=1)
    draw.line((x0, y0, (x0 + x1) // 2, flap), fill=(210, 208, 198), width=1)
    draw.line((x1, y0, (x0 + x1) // 2, flap), fill=(210, 208, 198), width=1)


# ---------------------------------------------------------------------------
# Sheet rendering


def _paper_tone(rng: np.random.Generator) -> RGB:
    """Pick a cream to off-white paper colour, as aged mounting paper looks on a scan."""
    red = rng.uniform(234, 247)
    return (round(red), round(red - rng.uniform(1, 5)), round(red - rng.uniform(10, 24)))


def _texture(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """A multiply layer (255 = unchanged): lighting gradient, vignette and mottling.

    It is computed on a small grid and resized once, so its cost does not grow
    with the sheet. It shades paper and plant alike, as uneven light and
    wrinkled, unevenly dried tissue do on a scan.
    """
    rows, cols = 96, 64
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float64)
    yy, xx = yy / (rows - 1) - 0.5, xx / (cols - 1) - 0.5
    gx, gy = rng.normal(0.0, 0.04, 2)
    light = 0.97 + gx * xx + gy * yy - rng.uniform(0.02, 0.08) * (xx**2 + yy**2)

    # Mottling at two scales; the coarse grid is upsampled smoothly, not repeated.
    coarse = rng.normal(128.0, 1.3, (rows // 4, cols // 4, 1)) + rng.normal(
        0.0, 0.4, (rows // 4, cols // 4, 3)
    )
    coarse_image = Image.fromarray(np.clip(coarse, 0, 255).astype(np.uint8), "RGB")
    coarse = np.asarray(coarse_image.resize((cols, rows), Image.Resampling.BICUBIC), np.float64)
    mottle = (coarse - 128.0) / 128.0 + rng.normal(0.0, 0.004, (rows, cols, 1))
    gain = np.clip(light[:, :, None] + mottle, 0.0, 1.0)
    small = Image.fromarray((gain * 255).astype(np.uint8), "RGB")
    small = small.resize((cols * 4, rows * 4), Image.Resampling.BICUBIC)
    return small.filter(ImageFilter.BoxBlur(4)).resize(size, Image.Resampling.BILINEAR)


def _add_noise(image: Image.Image, rng: np.random.Generator, sigma: float) -> Image.Image:
    """Add scanner grain (mostly luminance, some chroma) at the final pixel size."""
    lum = rng.normal(0.0, sigma, (NOISE_TILE, NOISE_TILE, 1))
    chroma = rng.normal(0.0, sigma * 0.4, (NOISE_TILE, NOISE_TILE, 3))
    tile = Image.fromarray(np.clip(128 + lum + chroma, 0, 255).astype(np.uint8), "RGB")
    noise = Image.new("RGB", image.size)
    for y in range(0, image.height, NOISE_TILE):
        for x in range(0, image.width, NOISE_TILE):
            noise.paste(tile, (x, y))
    return ImageChops.add(image, noise, scale=1.0, offset=-128)


def _work_size(width: int, height: int) -> tuple[int, int]:
    if width <= MAX_WORK_WIDTH:
        return width, height
    return MAX_WORK_WIDTH, max(1, round(height * MAX_WORK_WIDTH / width))


def render_sheet(
    species: DemoSpecies | str,
    rng: np.random.Generator | int,
    width: int = DEFAULT_SIZE[0],
    height: int = DEFAULT_SIZE[1],
    label: SheetLabel | None = None,
) -> Image.Image:
    """Render one synthetic herbarium sheet of ``species`` as an RGB image.

    ``rng`` is a numpy Generator or an int seed; the same seed, species, size
    and label give the same pixels. ``label`` sets the printed label text
    (drawn from ``rng`` when None). Any size from 64 pixels per side
    upwards works; the layout assumes a portrait sheet of about 2:3.
    """
    species = find_species(species)
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    if width < 64 or height < 64:
        raise ValueError(f"sheet size {width}x{height} is too small: use at least 64x64 pixels")
    if label is None:
        label = random_label(rng)

    work_size = _work_size(width, height)
    # The smoothing replaces anti-aliasing and imitates the softness of scanner optics.
    image = _draw_sheet(species, rng, work_size, label).filter(ImageFilter.SMOOTH)
    if work_size != (width, height):
        image = image.resize((width, height), Image.Resampling.BICUBIC)
    return _add_noise(image, rng, sigma=rng.uniform(2.0, 3.2))


def _draw_sheet(
    species: DemoSpecies, rng: np.random.Generator, size: tuple[int, int], label: SheetLabel
) -> Image.Image:
    """Draw the sheet at working size: paper, plant, tape, label, chart, lighting."""
    w, h = size

    # Framing: either the sheet fills the image, or it lies on a dark scanner bed
    # with the colour chart and ruler in the margin above it.
    framed = rng.random() < label.institution.framed_share
    if framed:
        top = round(h * rng.uniform(0.06, 0.09))
        left, right = (round(w * f) for f in rng.uniform(0.01, 0.04, 2))
        paper_box = (left, top, w - right, h - round(h * 0.015))
        image = Image.new("RGB", size, _jitter((40, 40, 42), rng, 6))
        image.paste(_paper_tone(rng), paper_box)
    else:
        paper_box = (0, 0, w, h)
        image = Image.new("RGB", size, _paper_tone(rng))
    pw, ph = paper_box[2] - paper_box[0], paper_box[3] - paper_box[1]
    ppc = pw / SHEET_WIDTH_CM
    draw = ImageDraw.Draw(image)

    # The label sits bottom right (sometimes bottom left); the plant avoids it.
    label_w, label_h = round(pw * rng.uniform(0.38, 0.46)), round(ph * rng.uniform(0.13, 0.16))
    label_right = rng.random() < 0.8
    lx0 = paper_box[2] - label_w - round(ppc) if label_right else paper_box[0] + round(ppc)
    ly0 = paper_box[3] - label_h - round(ppc * rng.uniform(0.8, 1.4))
    label_box = (lx0, ly0, lx0 + label_w, ly0 + label_h)

    # A fragment packet glued on first, so plant parts may lie over it.
    if rng.random() < 0.4:
        px0 = paper_box[2] - round(ppc * rng.uniform(6.5, 8))
        py0 = paper_box[1] + round(ppc * rng.uniform(7, 10))
        _draw_packet(draw, (px0, py0, px0 + round(ppc * 5), py0 + round(ppc * 6.5)))

    # The pressed plant, placed and if need be shrunk to fit the free paper.
    canvas = _Canvas()
    plant_height = min(36.0, ph / ppc * 0.72) * rng.uniform(0.7, 1.0)
    _draw_plant(canvas, species, rng, plant_height)
    rotation = rng.normal(0.0, 0.25 if species.habit == "branch" else 0.1)
    scale, offset = _fit_plant(canvas, rotation, rng, paper_box, label_box, label_right, ppc)
    canvas.render(image, rotation, scale, offset)

    # Mounting tape across stems, then the label and the rest of the sheet furniture.
    if canvas.anchors:
        anchors = np.vstack(canvas.anchors) @ _sheet_matrix(rotation).T * scale + offset
        for i in rng.choice(len(anchors), size=min(len(anchors), int(rng.integers(2, 6)))):
            _draw_tape(image, rng, tuple(anchors[i]), ppc)
    _draw_label(draw, label_box, species, label, ppc)
    barcode_y = label_box[1] - round(ppc * 1.8)
    _draw_barcode(draw, rng, label_box[0], barcode_y, ppc, label.catalog_number)
    if rng.random() < 0.7:
        centre = (paper_box[2] - ppc * rng.uniform(3, 6), paper_box[1] + ppc * 4.5)
        _draw_stamp(draw, centre, ppc, label.institution)
    if framed:
        x = paper_box[0] + round(ppc * rng.uniform(0.5, 3))
        _draw_chart_and_ruler(draw, x, max(1, round(paper_box[1] * 0.1)), ppc * 0.55, 15)
    else:
        x = round(ppc * rng.uniform(0.8, 2.0))
        _draw_chart_and_ruler(draw, x, round(ph - ppc * 3.6), ppc * 0.8, 12)

    # Uneven lighting and mottling over everything, as on a scan.
    return ImageChops.multiply(image, _texture(rng, size))


def _fit_plant(
    canvas: _Canvas,
    rotation: float,
    rng: np.random.Generator,
    paper_box: tuple[int, int, int, int],
    label_box: tuple[int, int, int, int],
    label_right: bool,
    ppc: float,
) -> tuple[float, np.ndarray]:
    """Choose the plant's pixel scale and offset so it lies on free paper.

    The plant goes either above the label (full width) or beside it (full
    height), whichever lets it keep more of its size. It is drawn life-size
    (``ppc`` pixels per cm) when it fits and shrunk when it does not.
    """
    lo, hi = canvas.bounds(rotation)
    extent = np.maximum(hi - lo, 1e-6)
    margin, gap = 0.8 * ppc, 0.5 * ppc
    x0, y0, x1, y1 = paper_box
    above = (x0 + margin, y0 + margin, x1 - margin, label_box[1] - gap)
    if label_right:
        beside = (x0 + margin, y0 + margin, label_box[0] - gap, y1 - margin)
    else:
        beside = (label_box[2] + gap, y0 + margin, x1 - margin, y1 - margin)

    def fit(region: tuple[float, float, float, float]) -> float:
        return min((region[2] - region[0]) / extent[0], (region[3] - region[1]) / extent[1])

    region = max((above, beside), key=fit)
    scale = min(ppc, fit(region))
    slack = np.array([region[2] - region[0], region[3] - region[1]]) - extent * scale
    # Centred-ish across, low on the sheet: pressed plants are mounted from the bottom.
    shift = slack * np.array([rng.uniform(0.25, 0.75), rng.uniform(0.6, 1.0)])
    offset = np.array(region[:2]) + shift - lo * scale
    return scale, offset


def encode_jpeg(image: Image.Image, quality: int = DEFAULT_JPEG_QUALITY) -> bytes:
    """Encode a sheet as a baseline JPEG with 4:2:0 chroma subsampling.

    The MICH and COLO herbarium scans published with VoucherVision and
    LeafMachine are written this way too, at libjpeg quality 75 to 80.
    """
    import io

    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality, subsampling="4:2:0")
    return buffer.getvalue()


def write_sheet(
    path: str | os.PathLike[str],
    species: DemoSpecies | str,
    seed: int,
    size: tuple[int, int] = DEFAULT_SIZE,
    quality: int = DEFAULT_JPEG_QUALITY,
    label: SheetLabel | None = None,
) -> int:
    """Render one sheet and write it as a JPEG; return the file size in bytes."""
    _check_quality(quality)
    image = render_sheet(species, np.random.default_rng(seed), size[0], size[1], label=label)
    data = encode_jpeg(image, quality)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return len(data)


# ---------------------------------------------------------------------------
# Demo collection


def sidecar_xml(species: DemoSpecies, label: SheetLabel, specimen_id: str) -> bytes:
    """Return a Herbaria255-style sidecar XML document for one sheet.

    ``Species`` contains the full scientific name with authorship and ``Author``
    the collector, which is what the Herbaria255 folders' XML files carry.
    """
    root = ET.Element("Image")
    fields = {
        "Species": species.scientific_name,
        "Genus": species.genus,
        "Family": species.family,
        "Author": label.collector,
        "Date": label.date,
        "Location": f"{label.locality}, {label.elevation_m} m",
        "Country": DEMO_COUNTRY,
        "InstitutionCode": label.institution.code,
        "CatalogNumber": label.catalog_number,
        # example.org is reserved for documentation, so this URL never resolves.
        "URL": f"https://example.org/herbray-demo/{specimen_id}",
    }
    for name, value in fields.items():
        ET.SubElement(root, name).text = value
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n"


@dataclass(frozen=True)
class _SheetJob:
    path: str
    species_index: int
    seed: int
    size: tuple[int, int]
    quality: int
    collector: str
    sidecar_id: str | None  # specimen id for the sidecar XML; None writes no sidecar


def _write_job(job: _SheetJob) -> int:
    species = SPECIES[job.species_index]
    rng = np.random.default_rng(job.seed)
    label = random_label(rng, job.collector)
    image = render_sheet(species, rng, job.size[0], job.size[1], label=label)
    data = encode_jpeg(image, job.quality)
    Path(job.path).write_bytes(data)
    if job.sidecar_id is not None:
        xml_path = Path(job.path).with_suffix(".xml")
        xml_path.write_bytes(sidecar_xml(species, label, job.sidecar_id))
    return len(data)


def generate_collection(
    out_dir: str | os.PathLike[str],
    n_species: int = 6,
    sheets_per_species: int = 20,
    archive_per_species: int = 5,
    size: tuple[int, int] = DEFAULT_SIZE,
    seed: int = 0,
    quality: int = DEFAULT_JPEG_QUALITY,
    archive_box_size: int = 10,
    workers: int | None = None,
    overwrite: bool = False,
) -> dict:
    """Write a labelled demo collection and a held-out unlabelled archive.

    Layout under ``out_dir``:

    - ``collection/<scientific name>/<uuid>.jpg`` with a sidecar ``<uuid>.xml``
      (Herbaria255 style). Collectors come from a pool of ten, so several
      sheets share a collector and a split grouped by collector is possible.
    - ``archive/box-NN/<catalog id>.jpg``: other sheets of the same species,
      shuffled into boxes of ``archive_box_size`` sheets, without sidecars.
    - ``archive-truth.csv``: ``image_path`` (relative to ``out_dir``, so the file
      is a manifest that ``herbray catalog`` reads), ``scientific_name`` and
      ``specimen_id`` of every archive sheet.

    Each sheet's seed derives from ``seed``, its species and its index, so the
    output is the same for any ``workers`` count (None: one process per CPU).
    An existing demo under ``out_dir`` raises ``FileExistsError`` unless
    ``overwrite`` is set, which deletes it first, so no stale sheets remain.
    Returns a summary dict with the paths, counts, bytes written and seconds.
    """
    _check_quality(quality)
    if sheets_per_species < 1 or archive_per_species < 0:
        raise ValueError(
            f"sheets_per_species={sheets_per_species} must be >= 1 and "
            f"archive_per_species={archive_per_species} must be >= 0"
        )
    if archive_box_size < 1:
        raise ValueError(f"archive_box_size={archive_box_size} must be >= 1")
    species_list = demo_species(n_species)
    out = Path(out_dir)
    collection_dir, archive_dir = out / "collection", out / "archive"
    truth_path = out / "archive-truth.csv"
    existing = [p for p in (collection_dir, archive_dir, truth_path) if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{out} already contains a demo ({', '.join(p.name for p in existing)}); "
            "choose another output folder or pass overwrite=True (--overwrite) to replace it"
        )
    for path in existing:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    started = time.perf_counter()

    # Plan every sheet first (ids, collectors, seeds), so rendering order and
    # worker count cannot change the output.
    plan_rng = np.random.default_rng([seed, 0])
    jobs: list[_SheetJob] = []
    for s, species in enumerate(species_list):
        folder = collection_dir / species.scientific_name
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(sheets_per_species):
            specimen_id = str(uuid.UUID(bytes=plan_rng.bytes(16), version=4))
            collector = COLLECTORS[int(plan_rng.integers(len(COLLECTORS)))][0]
            jobs.append(
                _SheetJob(
                    str(folder / f"{specimen_id}.jpg"),
                    s,
                    _sheet_seed(seed, s, k),
                    size,
                    quality,
                    collector,
                    specimen_id,
                )
            )

    archive_plan = [(s, k) for s in range(len(species_list)) for k in range(archive_per_species)]
    order = plan_rng.permutation(len(archive_plan)) if archive_plan else []
    truth_rows = []
    for position, index in enumerate(order):
        s, k = archive_plan[int(index)]
        box = archive_dir / f"box-{position // archive_box_size + 1:02d}"
        box.mkdir(parents=True, exist_ok=True)
        specimen_id = f"DEMO{int(plan_rng.integers(10**7, 10**8))}"
        collector = COLLECTORS[int(plan_rng.integers(len(COLLECTORS)))][0]
        path = box / f"{specimen_id}.jpg"
        jobs.append(
            _SheetJob(
                str(path),
                s,
                _sheet_seed(seed, s, sheets_per_species + k),
                size,
                quality,
                collector,
                None,
            )
        )
        truth_rows.append(
            (path.relative_to(out).as_posix(), species_list[s].scientific_name, specimen_id)
        )

    sizes = _run_jobs(jobs, workers)
    with truth_path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image_path", "scientific_name", "specimen_id"])
        writer.writerows(truth_rows)

    seconds = time.perf_counter() - started
    summary = {
        "out_dir": str(out),
        "collection_dir": str(collection_dir),
        "archive_dir": str(archive_dir),
        "archive_truth": str(truth_path),
        "species": [s.scientific_name for s in species_list],
        "collection_sheets": len(species_list) * sheets_per_species,
        "archive_sheets": len(truth_rows),
        "size": list(size),
        "bytes": int(sum(sizes)),
        "seconds": round(seconds, 2),
        "seed": seed,
    }
    logger.info(
        "wrote %d collection and %d archive sheets (%d species, %dx%d) to %s in %.1f s",
        summary["collection_sheets"],
        summary["archive_sheets"],
        len(species_list),
        size[0],
        size[1],
        out,
        seconds,
    )
    return summary


def generate_sheets(
    out_dir: str | os.PathLike[str],
    count: int,
    size: tuple[int, int] = (4000, 6000),
    n_species: int = 6,
    seed: int = 0,
    quality: int = DEFAULT_JPEG_QUALITY,
    workers: int | None = None,
) -> dict:
    """Write ``count`` sheets (cycling through ``n_species``) for benchmarks.

    Files are ``out_dir/sheet-NNNNN.jpg`` with a ``manifest.csv`` beside them
    (``image_path``, ``scientific_name``, ``specimen_id``, ``recorded_by``),
    which the manifest reader takes as it is. Existing files of the same name
    are replaced. Returns a summary dict like :func:`generate_collection`.
    """
    _check_quality(quality)
    if count < 1:
        raise ValueError(f"count={count} must be >= 1")
    species_list = demo_species(n_species)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    plan_rng = np.random.default_rng([seed, 2])
    jobs, rows = [], []
    for k in range(count):
        s = k % len(species_list)
        collector = COLLECTORS[int(plan_rng.integers(len(COLLECTORS)))][0]
        name = f"sheet-{k:05d}"
        jobs.append(
            _SheetJob(
                str(out / f"{name}.jpg"),
                s,
                _sheet_seed(seed, s, 10**6 + k),
                size,
                quality,
                collector,
                None,
            )
        )
        rows.append((f"{name}.jpg", species_list[s].scientific_name, name, collector))
    sizes = _run_jobs(jobs, workers)

    manifest = out / "manifest.csv"
    with manifest.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image_path", "scientific_name", "specimen_id", "recorded_by"])
        writer.writerows(rows)
    seconds = time.perf_counter() - started
    logger.info("wrote %d sheets of %dx%d to %s in %.1f s", count, size[0], size[1], out, seconds)
    return {
        "out_dir": str(out),
        "manifest": str(manifest),
        "sheets": count,
        "size": list(size),
        "bytes": int(sum(sizes)),
        "seconds": round(seconds, 2),
        "seed": seed,
    }


def _run_jobs(jobs: list[_SheetJob], workers: int | None) -> list[int]:
    """Render and write sheets, in ``workers`` processes (None: one per CPU)."""
    if workers is None:
        workers = min(len(jobs), os.cpu_count() or 1)
    if workers <= 1:
        return [_write_job(job) for job in jobs]
    # Spawned, not forked: the caller may already run threads (Ray, torch)
    # that a fork would copy in the middle of their work.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        return list(pool.map(_write_job, jobs, chunksize=4))


def _check_quality(quality: int) -> None:
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality {quality} is out of range: use 1 to 100")


def _sheet_seed(seed: int, species_index: int, sheet_index: int) -> int:
    """Derive a sheet's seed, independent of the order in which sheets are drawn."""
    return int(np.random.default_rng([seed, 1, species_index, sheet_index]).integers(2**63))


def parse_size(text: str) -> tuple[int, int]:
    """Parse a ``WIDTHxHEIGHT`` size such as ``1200x1800``."""
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"invalid size {text!r}: write WIDTHxHEIGHT, e.g. 1200x1800") from None
    if width < 64 or height < 64:
        raise ValueError(f"size {text!r} is too small: use at least 64x64 pixels")
    return width, height


__all__: Sequence[str] = (
    "DEFAULT_SIZE",
    "SPECIES",
    "DemoSpecies",
    "SheetLabel",
    "demo_species",
    "encode_jpeg",
    "find_species",
    "generate_collection",
    "generate_sheets",
    "parse_size",
    "random_label",
    "render_sheet",
    "sidecar_xml",
    "write_sheet",
)
