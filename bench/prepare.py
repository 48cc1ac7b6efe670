"""Time ``herbray prepare`` against a naive decode-resize-encode loop, side by side.

    .venv/bin/python bench/prepare.py --scans ../shared/data/sheets/vouchervision
    .venv/bin/python bench/prepare.py --generated 48 --repeats 5
    .venv/bin/python bench/prepare.py --generated 0 --scans /data/masters --species 4

Input sets, each prepared by every variant:

- ``--scans DIR``: the JPEG files in a folder of real scans, each linked
  ``--scans-copies`` times. Prepare only takes labelled collections, so the
  links go into a folder tree with one folder per fake species (``--species``
  of them, assigned in turn).
- ``--generated N``: N synthetic sheets from ``herbray.synthetic.generate_sheets``
  (4000x6000 by default, 24 megapixels), linked into a folder per demo
  species. They are written once into ``--cache-dir`` and reused by later runs.

Variants:

- ``herbray``: :func:`herbray.prepare.prepare` end to end (catalog, Ray Data
  decode stage, Parquet shards, report) on a local Ray with ``--num-cpus`` CPUs.
  Ray starts once before any timing, so its start-up is not in the figures.
- ``naive-1`` and ``naive-2``: the same catalog and splits, then
  ``Image.open(path).convert("RGB")`` (a full decode), a Lanczos resize to the
  same size, ``encode_jpeg`` at the same quality, and Parquet shards with the
  same columns. The loop runs in a pool of 1 or of ``--num-cpus`` worker
  processes, and the driver writes the shards. The 2-process pool uses the
  same cores as Ray, so it is the fair baseline. The 1-process loop shows what
  a plain script gets.

Ray and the pools start before timing. One untimed warm-up run of each variant
fills the page cache and starts Ray's worker processes, and the table lists its
time, because a fresh ``herbray prepare`` command pays that start. The variants
then run in turn (A B C, B C A, ...) so they share the machine's noise. The table
gives the median images/s with the range over the repetitions, and the ratios
herbray/naive are taken per repetition.

"CPU s/image" is the CPU time (user + system, from /proc) that the driver and
the variant's processes used during a run, per image. Other programs on the
machine change it much less than the wall time, so its ratio shows what the
variants cost apart from the machine's load.

Peak memory is the largest sum of RSS over a variant's worker processes, sampled
from /proc every 20 ms (Linux only). For herbray these are the raylet's worker
processes, Ray Data's own actors included. The "all Ray" figure adds the GCS,
the raylet, the agents and the dashboard. RSS counts a shared page, the Ray
object store's included, in every process that maps it, so the sums are upper
bounds.

Small runs understate herbray. Ray Data 2.60 learns the cluster's CPUs about a
second into each run and until then runs at most one decode task, so every run
loses up to a second, whatever the number of images. Ray Data's progress bars
are off, so the table stays readable. Run on a quiet machine where possible and
repeat, because a shared machine moves absolute figures by up to 2x.
"""

from __future__ import annotations

import argparse
import csv
import functools
import io
import logging
import multiprocessing
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

# Lets the script run from a plain clone, before `pip install -e .`.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from procstats import ProcessSampler, descendants, process_table

from herbray import synthetic
from herbray.imaging import encode_jpeg, target_size
from herbray.prepare import ERROR_PART, PrepareConfig, build_training_table, prepare
from herbray.splits import SPLITS

logger = logging.getLogger("bench.prepare")

IMAGE_SUFFIXES = (".jpg", ".jpeg")
MIB = 1024 * 1024


# --- Inputs --------------------------------------------------------------------


@dataclass
class InputSet:
    """A collection that every variant prepares: a tree of links, one folder per species."""

    name: str
    folder: Path
    images: int
    megapixels: float  # median over the images
    megabytes: float  # median file size


def link_tree(folder: Path, images: list[tuple[Path, str, str]], name: str) -> InputSet:
    """Link each (image, species, link name) into ``folder/<species>/``, the folder-tree layout.

    Links keep the inputs where they are, and a tree needs no manifest paths.
    """
    shutil.rmtree(folder, ignore_errors=True)
    pixels, sizes = [], []
    for path, species, link_name in images:
        target = folder / species / link_name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(path.resolve())
        with Image.open(path) as img:
            pixels.append(img.width * img.height / 1e6)
        sizes.append(path.stat().st_size / 1e6)
    return InputSet(
        name=name,
        folder=folder,
        images=len(images),
        megapixels=statistics.median(pixels),
        megabytes=statistics.median(sizes),
    )


def scans_input(scans: Path, species: int, copies: int, work_dir: Path) -> InputSet:
    """Take the JPEG scans in ``scans``, ``copies`` times each, and give them fake species."""
    if not scans.is_dir():
        raise SystemExit(f"--scans {scans}: folder not found; pass a folder of JPEG scans")
    paths = sorted(p for p in scans.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise SystemExit(f"--scans {scans}: no .jpg or .jpeg files in it")
    images = []
    for copy in range(copies):
        for path in paths:
            species_name = f"Benchmark species {len(images) % species + 1}"
            images.append((path, species_name, f"{path.stem}-{copy}{path.suffix}"))
    name = f"scans in {scans} ({len(paths)} files x {copies})"
    return link_tree(work_dir / "inputs" / "scans", images, name)


def generated_input(
    count: int, size: tuple[int, int], quality: int, cache_dir: Path, work_dir: Path
) -> InputSet:
    """Generate ``count`` synthetic sheets into the cache once, and take the first ``count``.

    Sheet k depends only on the seed and k, so a cache that has more sheets
    than requested contains the same first sheets that a smaller run would write.
    """
    folder = cache_dir / f"sheets-{size[0]}x{size[1]}-q{quality}-seed0"
    manifest = folder / "manifest.csv"
    rows: list[dict[str, str]] = []
    if manifest.is_file():
        with manifest.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    if len(rows) < count or not all((folder / r["image_path"]).is_file() for r in rows):
        logger.info("writing %d sheets of %dx%d into %s", count, *size, folder)
        synthetic.generate_sheets(folder, count, size=size, quality=quality)
        with manifest.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))

    images = [
        (folder / r["image_path"], r["scientific_name"], r["image_path"]) for r in rows[:count]
    ]
    name = f"generated {size[0]}x{size[1]} sheets"
    return link_tree(work_dir / "inputs" / "generated", images, name)


# --- Naive baseline ------------------------------------------------------------


def naive_convert(path: str, short_side: int, quality: int) -> dict:
    """Decode every pixel, resize with Lanczos and encode: what a plain script does.

    ``target_size`` is herbray's size arithmetic, used so both outputs have the
    same size. EXIF orientation is not applied.
    """
    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB")
        small = rgb.resize(target_size(*rgb.size, short_side, None), Image.Resampling.LANCZOS)
        return {
            "image": encode_jpeg(np.asarray(small), quality=quality),
            "width": small.width,
            "height": small.height,
            "original_width": rgb.width,
            "original_height": rgb.height,
            "error": None,
            "error_message": None,
        }
    except (OSError, ValueError) as exc:
        return {"error": "decode_failed", "error_message": f"{type(exc).__name__}: {exc}"}


NAIVE_TYPES = {
    "image": pa.binary(),
    "width": pa.int32(),
    "height": pa.int32(),
    "original_width": pa.int32(),
    "original_height": pa.int32(),
    "error": pa.string(),
    "error_message": pa.string(),
}


def run_naive(config: PrepareConfig, pool) -> int:
    """Prepare ``config.input`` with ``naive_convert`` in ``pool``; return rows written.

    Catalog, labels and splits come from herbray's own driver code, so only the
    image work and the Parquet writing differ from :func:`prepare`. Shards go to
    ``OUTPUT/shards/<split>/part-00000.parquet`` with the same columns.
    """
    catalog = config.read_source(config.input)
    table, _labels, _extra = build_training_table(catalog, config)
    convert = functools.partial(
        naive_convert, short_side=config.short_side, quality=config.jpeg_quality
    )
    results = list(pool.imap(convert, table.column("image_uri").to_pylist(), chunksize=1))

    for name, value_type in NAIVE_TYPES.items():
        table = table.append_column(name, pa.array([r.get(name) for r in results], value_type))
    parts = [
        ERROR_PART if r["error"] else split
        for r, split in zip(results, table.column("split").to_pylist(), strict=True)
    ]
    table = table.append_column("part", pa.array(parts, pa.string()))

    output = Path(config.output)
    shutil.rmtree(output, ignore_errors=True)
    for part in (*SPLITS, ERROR_PART):
        rows = table.filter(pc.equal(table.column("part"), part))
        if rows.num_rows:
            folder = output / "shards" / part
            folder.mkdir(parents=True)
            pq.write_table(rows, folder / "part-00000.parquet")
    return table.num_rows


# --- Process sampling ----------------------------------------------------------


def ray_process_groups() -> dict[str, set[int]]:
    """Split this driver's Ray processes into workers (raylet children, agents aside) and all."""
    table = process_table()
    everything = {
        pid
        for pid in descendants(table, os.getpid())
        if "multiprocessing" not in table[pid][2]  # the naive pools and their resource tracker
    }
    workers = set()
    for pid in everything:
        if table[pid][1] == "raylet":
            workers |= {
                child
                for child in descendants(table, pid)
                if not table[child][2].strip().endswith("Agent")
            }
    return {"workers": workers, "all Ray": everything}


# --- Runs ----------------------------------------------------------------------


@dataclass
class Run:
    """One timed run of a variant."""

    seconds: float
    cpu_seconds: float  # of the driver and the variant's processes
    peaks: dict[str, int]  # peak summed RSS in bytes, per process group
    rows: int


@dataclass
class Variant:
    name: str
    description: str
    run: object  # callable(PrepareConfig) -> rows prepared
    groups: object  # callable() -> {process group name: pids}
    runs: list[Run] = field(default_factory=list)
    warmup_seconds: list[float] = field(default_factory=list)

    @property
    def seconds(self) -> list[float]:
        return [run.seconds for run in self.runs]


def make_pool(processes: int):
    """Start a pool of spawned processes, and return it with its worker pids."""
    before = {p.pid for p in multiprocessing.active_children()}
    pool = multiprocessing.get_context("spawn").Pool(processes)
    pids = {p.pid for p in multiprocessing.active_children()} - before
    # Wait for every worker to start and import this module (and with it the
    # image stack), so no timed run pays for that.
    pool.map(time.sleep, [0.2] * processes, chunksize=1)
    return pool, pids


def timed_run(variant: Variant, config: PrepareConfig) -> Run:
    with ProcessSampler(variant.groups) as sampler:
        start = time.perf_counter()
        rows = variant.run(config)
        seconds = time.perf_counter() - start
    return Run(seconds, sampler.cpu_seconds, dict(sampler.peaks), rows)


def read_images(output: Path) -> dict[str, dict]:
    table = pq.read_table(output / "shards", columns=["specimen_id", "image", "width", "height"])
    return {row["specimen_id"]: row for row in table.to_pylist()}


def compare_outputs(herbray_output: Path, naive_output: Path) -> str:
    """Check that both variants wrote the same rows at the same sizes; give the pixel difference."""
    herbray_rows = read_images(herbray_output)
    naive_rows = read_images(naive_output)
    if herbray_rows.keys() != naive_rows.keys():
        return f"MISMATCH: herbray wrote {len(herbray_rows)} rows, naive {len(naive_rows)}"
    differences = []
    for specimen_id, row in herbray_rows.items():
        other = naive_rows[specimen_id]
        size, other_size = (row["width"], row["height"]), (other["width"], other["height"])
        if size != other_size:
            return f"MISMATCH: {specimen_id} is {size} from herbray, {other_size} from naive"
        pixels = np.asarray(Image.open(io.BytesIO(row["image"])), dtype=np.int16)
        other_pixels = np.asarray(Image.open(io.BytesIO(other["image"])), dtype=np.int16)
        differences.append(float(np.abs(pixels - other_pixels).mean()))
    return (
        f"both wrote the same {len(herbray_rows)} rows at the same sizes; "
        f"mean |pixel difference| {statistics.mean(differences):.2f} of 255"
    )


# --- Report --------------------------------------------------------------------


def spread(values: list[float], unit: str = "", digits: int = 1) -> str:
    """Format the median and the range, e.g. ``14.2 [12.9-15.0]``."""
    return (
        f"{statistics.median(values):.{digits}f}{unit} "
        f"[{min(values):.{digits}f}-{max(values):.{digits}f}]"
    )


def print_results(inputs: InputSet, variants: list[Variant], check: str) -> None:
    print()
    print(
        f"== {inputs.name}: {inputs.images} images, median {inputs.megapixels:.1f} MP, "
        f"{inputs.megabytes:.1f} MB; {len(variants[0].seconds)} timed runs per variant"
    )
    header = (
        f"{'variant':<10} {'images/s median [range]':<24} {'s/run':>6} {'CPU s/image':>11} "
        f"{'warm-up s':>9}   peak RSS, MiB"
    )
    print(header)
    print("-" * (len(header) + 30))
    for variant in variants:
        rates = [inputs.images / s for s in variant.seconds]
        cpu = statistics.median(run.cpu_seconds / inputs.images for run in variant.runs)
        warmup = f"{variant.warmup_seconds[0]:.2f}" if variant.warmup_seconds else "-"
        memory = ", ".join(
            f"{group} {max(run.peaks.get(group, 0) for run in variant.runs) / MIB:.0f}"
            for group in variant.runs[0].peaks
        )
        print(
            f"{variant.name:<10} {spread(rates, digits=2):<24} "
            f"{statistics.median(variant.seconds):>6.2f} {cpu:>11.3f} {warmup:>9}   {memory}"
        )
    herbray = variants[0]
    for naive in variants[1:]:
        ratios = [n / h for h, n in zip(herbray.seconds, naive.seconds, strict=True)]
        cpu_ratios = [
            n.cpu_seconds / h.cpu_seconds for h, n in zip(herbray.runs, naive.runs, strict=True)
        ]
        print(
            f"herbray/{naive.name} throughput {spread(ratios, unit='x')}; {naive.name} uses "
            f"{spread(cpu_ratios, unit='x')} herbray's CPU time per image (paired per repetition)"
        )
    print(f"output check: {check}")


def run_input_set(
    inputs: InputSet, variants: list[Variant], args: argparse.Namespace, work_dir: Path
) -> None:
    configs = {
        v.name: PrepareConfig(
            input=str(inputs.folder),
            output=str(work_dir / "out" / v.name),
            short_side=args.short_side,
            jpeg_quality=args.quality,
            decode_memory_mb=args.decode_memory_mb,
            num_cpus=args.num_cpus,
        )
        for v in variants
    }
    for variant in variants:
        variant.runs.clear()
        variant.warmup_seconds.clear()
        for _ in range(args.warmup):
            run = timed_run(variant, configs[variant.name])
            variant.warmup_seconds.append(run.seconds)
            logger.info("warm-up %s: %d rows in %.2f s", variant.name, run.rows, run.seconds)

    # Rotate the order every repetition so no variant always follows another.
    for repetition in range(args.repeats):
        shift = repetition % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            run = timed_run(variant, configs[variant.name])
            if run.rows != inputs.images:
                raise SystemExit(f"{variant.name} prepared {run.rows} rows of {inputs.images}")
            variant.runs.append(run)
            logger.info(
                "run %d %s: %.2f s, %.1f CPU s",
                repetition + 1,
                variant.name,
                run.seconds,
                run.cpu_seconds,
            )

    check = compare_outputs(Path(configs["herbray"].output), Path(configs[variants[1].name].output))
    print_results(inputs, variants, check)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )

    # Input sets.
    parser.add_argument("--scans", type=Path, help="folder of real JPEG scans to prepare")
    parser.add_argument(
        "--species", type=int, default=2, help="fake species assigned in turn to --scans files"
    )
    parser.add_argument(
        "--scans-copies",
        type=int,
        default=4,
        help="times each --scans file is linked under its own name, for a set large enough "
        "that Ray Data's fixed start-up cost does not dominate",
    )
    parser.add_argument(
        "--generated", type=int, default=24, help="synthetic sheets to prepare; 0 skips them"
    )
    parser.add_argument(
        "--size",
        type=synthetic.parse_size,
        default="4000x6000",
        help="size of the synthetic sheets, WIDTHxHEIGHT pixels",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "herbray-bench",
        help="folder that keeps the synthetic sheets between runs",
    )

    # Timing.
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each variant")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs of each variant first")
    parser.add_argument(
        "--num-cpus", type=int, default=2, help="CPUs of the local Ray and processes of naive-N"
    )

    # Prepare settings, shared by every variant.
    parser.add_argument("--short-side", type=int, default=384, help="short side of the output, px")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality of the output")
    parser.add_argument(
        "--decode-memory-mb",
        type=int,
        default=PrepareConfig.__dataclass_fields__["decode_memory_mb"].default,
        help="memory each herbray decode task reserves in Ray's scheduler, MiB",
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        help="folder for the input links and the outputs; None: a temporary folder, "
        "removed at the end",
    )
    return parser


def main() -> None:
    args = build_parser().parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if not sys.platform.startswith("linux"):
        raise SystemExit("this benchmark reads process memory from /proc, so it runs on Linux only")
    if args.scans is None and args.generated < 1:
        raise SystemExit("nothing to prepare: pass --scans DIR, --generated N (N >= 1), or both")
    if min(args.repeats, args.num_cpus, args.species, args.scans_copies) < 1:
        raise SystemExit("--repeats, --num-cpus, --species and --scans-copies must be at least 1")
    if args.warmup < 0:
        raise SystemExit(f"--warmup must be 0 or more, got {args.warmup}")

    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="herbray-bench-prepare-"))
    inputs = []
    if args.scans is not None:
        inputs.append(scans_input(args.scans, args.species, args.scans_copies, work_dir))
    if args.generated:
        inputs.append(
            generated_input(args.generated, args.size, args.quality, args.cache_dir, work_dir)
        )

    # Ray and the pools start here, before anything is timed.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # no ~/.ray/auth_token for a local run
    import ray

    from herbray.runtime import init_ray

    init_ray(num_cpus=args.num_cpus)
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # Small input sets leave species with too few groups for val and test, once per run.
    logging.getLogger("herbray.splits").setLevel(logging.ERROR)
    pool_1, pids_1 = make_pool(1)
    pool_n, pids_n = make_pool(args.num_cpus) if args.num_cpus > 1 else (pool_1, pids_1)
    variants = [
        Variant(
            "herbray",
            f"herbray.prepare.prepare on a local Ray with {args.num_cpus} CPUs",
            lambda config: prepare(config).images,
            ray_process_groups,
        ),
        Variant(
            f"naive-{args.num_cpus}",
            f"full decode + Lanczos in {args.num_cpus} processes",
            lambda config: run_naive(config, pool_n),
            lambda: {"workers": pids_n},
        ),
        Variant(
            "naive-1",
            "full decode + Lanczos in 1 process",
            lambda config: run_naive(config, pool_1),
            lambda: {"workers": pids_1},
        ),
    ]
    if args.num_cpus == 1:
        del variants[1]  # naive-1 is already the like-for-like baseline

    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(
        f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start; "
        f"Python {platform.python_version()}, Ray {ray.__version__}, "
        f"Pillow {Image.__version__}, pyarrow {pa.__version__}"
    )
    for variant in variants:
        print(f"  {variant.name:<10} {variant.description}")
    try:
        for input_set in inputs:
            run_input_set(input_set, variants, args, work_dir)
    finally:
        pool_1.terminate()
        pool_n.terminate()
        ray.shutdown()
        if args.work_dir is None:
            shutil.rmtree(work_dir, ignore_errors=True)
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
