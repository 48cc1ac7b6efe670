"""Time ``herbray label`` against a naive script and this machine's bound, in one run.

    .venv/bin/python bench/label.py --scans ../shared/data/sheets/vouchervision --generated 24
    .venv/bin/python bench/label.py --memory 1000,10000

Throughput (``--scans`` real JPEG scans, ``--generated N`` synthetic 4000x6000
sheets, each set timed separately):

- ``herbray``: :func:`herbray.label.label` end to end on a local Ray with
  ``--num-cpus`` CPUs: decode tasks, an inference actor, Parquet output.
- ``naive``: an ImageFolder-style ``torch.utils.data.Dataset`` that opens each
  file with Pillow (full decode), resizes it to the model input, and a
  ``DataLoader`` with ``--naive-workers`` worker processes feeding the same
  model with the same torch threads; rows are written with pyarrow.
- ``bound``: what this machine allows for the same work, from two measurements
  in the same run: the decode-only time per image on one core (herbray's
  decoder, straight to the input shape) and the model-only time per image
  (forward passes on ready tensors with ``--threads`` threads, so core-seconds
  are wall seconds x threads). bound = cores / (decode + model core-seconds).

The variants run in turn (A B, B A, ...) so they share the machine's noise, and
the ratios herbray/naive and herbray/bound are taken per repetition. The
model is EfficientNet-Lite0 with its packaged ImageNet weights and a random
head sized for the demo species: throughput does not depend on training.

Memory (``--memory 1000,10000``): labels archives of that many small generated
sheets (a pool of distinct sheets, hard-linked to reach the count) and prints
the peak summed RSS of all processes of the run (driver and Ray) for each size;
flat figures across sizes show memory does not grow with the archive.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from procstats import ProcessSampler, all_descendants

from herbray import models
from herbray.bundle import write_bundle
from herbray.taxonomy import LabelMap
from herbray.transforms import InputShape

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")


def make_bundle(folder: Path, model_name: str, species: int) -> Path:
    """A bundle of ImageNet weights with a random head: enough to time inference."""
    spec = models.get_spec(model_name)
    weights = "imagenet" if spec.has_offline_imagenet_weights else None
    model = models.create_model(model_name, species, weights=weights)
    labels = LabelMap(tuple(f"Species {i}" for i in range(species)), (1,) * species)
    write_bundle(
        str(folder),
        state_dict=model.state_dict(),
        model_name=model_name,
        labels=labels,
        input_shape=InputShape.from_size(spec.input_size, 1.5),
        preprocessing={"mean": list(spec.mean), "std": list(spec.std), "interpolation": "bilinear"},
        config={"model": model_name, "epochs": 0, "weights": str(weights)},
        metrics={},
        history=[],
    )
    return folder


def linked_copies(source: Path, copies: int, target: Path) -> Path:
    """A folder with ``copies`` symbolic links to each image of ``source``."""
    if target.exists():
        for link in target.iterdir():
            link.unlink()
    target.mkdir(parents=True, exist_ok=True)
    for path in image_files(source):
        for copy in range(copies):
            (target / f"{path.stem}-{copy}{path.suffix}").symlink_to(path.resolve())
    return target


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


# --- The three measurements ------------------------------------------------------


def run_herbray(bundle: Path, folder: Path, output: Path, args) -> int:
    from herbray.label import LabelConfig, label

    result = label(
        LabelConfig(
            model=str(bundle),
            input=str(folder),
            output=str(output),
            overwrite=True,
            batch_size=args.batch_size,
            cpus_per_actor=args.cpus_per_actor,
            torch_threads=args.threads,
            num_cpus=args.num_cpus,
        )
    )
    return result.images


class SheetFolder:
    """The naive dataset: every file fully decoded by Pillow, then resized."""

    def __init__(self, files: list[Path], shape: InputShape):
        self.files, self.shape = files, shape

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        from PIL import Image

        with Image.open(self.files[index]) as image:
            image = image.convert("RGB").resize((self.shape.width, self.shape.height))
        return np.asarray(image), str(self.files[index])


def run_naive(bundle: Path, files: list[Path], output: Path, args) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from herbray.bundle import load_bundle

    torch.set_num_threads(args.threads)
    model = load_bundle(str(bundle))
    loader = torch.utils.data.DataLoader(
        SheetFolder(files, model.input_shape),
        batch_size=args.batch_size,
        num_workers=args.naive_workers,
        collate_fn=lambda items: items,
    )
    uris, best, scores = [], [], []
    for items in loader:
        batch = np.stack([array for array, _ in items])
        probabilities = torch.softmax(torch.from_numpy(model.predict_logits(batch)), dim=1)
        top = probabilities.max(dim=1)
        uris += [uri for _, uri in items]
        best += [model.labels.names[i] for i in top.indices.tolist()]
        scores += top.values.tolist()
    output.mkdir(parents=True, exist_ok=True)
    pq.write_table(
        pa.table({"image_uri": uris, "scientificName": best, "confidence": scores}),
        output / "labels.parquet",
    )
    return len(uris)


def decode_core_seconds(files: list[Path], shape: InputShape) -> float:
    """Per image: read + herbray decode + resize to the input, on one core."""
    from PIL import Image

    from herbray.imaging import decode_image
    from herbray.transforms import resize_to_input

    start = time.process_time()
    for path in files:
        decoded = decode_image(path.read_bytes(), min(shape.height, shape.width))
        resize_to_input(Image.fromarray(decoded.array), shape)
    return (time.process_time() - start) / len(files)


def model_core_seconds(bundle: Path, batch_size: int, threads: int, batches: int) -> float:
    """Per image: forward passes on ready uint8 batches with ``threads`` threads."""
    import torch

    from herbray.bundle import load_bundle

    torch.set_num_threads(threads)
    model = load_bundle(str(bundle))
    shape = model.input_shape
    batch = np.random.default_rng(0).integers(
        0, 255, (batch_size, shape.height, shape.width, 3), dtype=np.uint8
    )
    model.predict_logits(batch)  # warm-up
    start = time.perf_counter()
    for _ in range(batches):
        model.predict_logits(batch)
    wall = time.perf_counter() - start
    return wall * threads / (batches * batch_size)


# --- Throughput ----------------------------------------------------------------------


def throughput(name: str, folder: Path, bundle: Path, work: Path, args) -> dict:
    files = image_files(folder)
    shape = InputShape(*json.loads((bundle / "bundle.json").read_text())["input_shape"])
    print(
        f"\n== {name}: {len(files)} images, input {shape.height}x{shape.width}, "
        f"{args.num_cpus} cores, {args.threads} torch threads ==",
        flush=True,
    )

    # Untimed warm-up of both variants: page cache, Ray workers, model load paths.
    run_herbray(bundle, folder, work / "warm-herbray", args)
    run_naive(bundle, files[: args.batch_size], work / "warm-naive", args)

    rates = {"herbray": [], "naive": [], "bound": []}
    for repetition in range(args.repeats):
        order = ("herbray", "naive") if repetition % 2 == 0 else ("naive", "herbray")
        for variant in order:
            start = time.perf_counter()
            if variant == "herbray":
                count = run_herbray(bundle, folder, work / "herbray", args)
            else:
                count = run_naive(bundle, files, work / "naive", args)
            rates[variant].append(count / (time.perf_counter() - start))
        decode = decode_core_seconds(files, shape)
        model = model_core_seconds(bundle, args.batch_size, args.threads, args.model_batches)
        rates["bound"].append(args.num_cpus / (decode + model))
        print(
            f"  repetition {repetition + 1}: herbray {rates['herbray'][-1]:.2f}, naive "
            f"{rates['naive'][-1]:.2f}, bound {rates['bound'][-1]:.2f} images/s "
            f"(decode {decode * 1000:.0f} ms, model {model * 1000:.0f} ms core time per image)",
            flush=True,
        )

    vs_naive = [h / n for h, n in zip(rates["herbray"], rates["naive"], strict=True)]
    vs_bound = [h / b for h, b in zip(rates["herbray"], rates["bound"], strict=True)]
    summary = {
        "images": len(files),
        **{f"{k}_images_per_s": round(statistics.median(v), 2) for k, v in rates.items()},
        "herbray_over_naive": round(statistics.median(vs_naive), 2),
        "herbray_over_bound": round(statistics.median(vs_bound), 2),
    }
    print(
        f"  median: herbray {summary['herbray_images_per_s']} images/s, naive "
        f"{summary['naive_images_per_s']}, bound {summary['bound_images_per_s']}; "
        f"herbray/naive {summary['herbray_over_naive']}x (range {min(vs_naive):.2f}-"
        f"{max(vs_naive):.2f}), herbray/bound {summary['herbray_over_bound']:.0%} "
        f"(range {min(vs_bound):.0%}-{max(vs_bound):.0%})"
    )
    return summary


# --- Memory ----------------------------------------------------------------------------


def memory_archive(folder: Path, count: int, pool_size: int, size: tuple[int, int]) -> Path:
    """An archive of ``count`` sheets: ``pool_size`` distinct ones, hard-linked in turn."""
    from herbray import synthetic

    pool = folder / "pool"
    if not (pool / "manifest.csv").exists():
        synthetic.generate_sheets(pool, pool_size, size=size, workers=1)
    distinct = image_files(pool)
    archive = folder / f"archive-{count}"
    if not archive.exists():
        staging = folder / f".staging-{count}"
        for index in range(count):
            box = staging / f"box-{index // 1000:03d}"
            box.mkdir(parents=True, exist_ok=True)
            os.link(distinct[index % len(distinct)], box / f"sheet-{index:06d}.jpg")
        staging.rename(archive)
    return archive


def memory(counts: list[int], bundle: Path, work: Path, args) -> None:
    print("\n== memory: peak summed RSS of the driver and every Ray process ==", flush=True)
    for count in counts:
        archive = memory_archive(work / "memory", count, args.memory_pool, (600, 900))
        with ProcessSampler(lambda: {"all": all_descendants(os.getpid()) | {os.getpid()}}) as s:
            start = time.perf_counter()
            images = run_herbray(bundle, archive, work / f"memory-out-{count}", args)
            seconds = time.perf_counter() - start
        print(
            f"  {images:>6} images: peak {s.peaks['all'] / 2**30:.2f} GiB, "
            f"{images / seconds:.1f} images/s",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scans", type=Path, help="folder of real scans (JPEG)")
    parser.add_argument(
        "--scans-copies",
        type=int,
        default=16,
        help="links to each real scan, so start-up costs are amortised as in a real archive "
        "(default 16)",
    )
    parser.add_argument(
        "--generated",
        type=int,
        default=48,
        help="synthetic 4000x6000 sheets to time (0: none; default 48)",
    )
    parser.add_argument(
        "--memory",
        default="",
        help="comma-separated archive sizes for the "
        "memory run, e.g. 1000,10000 (default: no memory run)",
    )
    parser.add_argument(
        "--memory-pool",
        type=int,
        default=200,
        help="distinct sheets behind the memory archives (default 200)",
    )
    parser.add_argument("--model", default=models.DEFAULT_MODEL, help="architecture to time")
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count(), help="cores to use")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads of the model in every variant (default: cores)",
    )
    parser.add_argument(
        "--cpus-per-actor",
        type=float,
        default=1.0,
        help="CPUs the herbray inference actor reserves (default 1)",
    )
    parser.add_argument(
        "--naive-workers",
        type=int,
        default=1,
        help="DataLoader worker processes of the naive script (default 1)",
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--model-batches",
        type=int,
        default=4,
        help="timed forward batches for the bound's model figure",
    )
    parser.add_argument(
        "--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "herbray-bench"
    )
    args = parser.parse_args()
    args.threads = args.threads or args.num_cpus
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

    from herbray.runtime import init_ray

    work = args.cache_dir
    work.mkdir(parents=True, exist_ok=True)
    bundle = make_bundle(work / f"bundle-{args.model}", args.model, 6)
    init_ray(num_cpus=args.num_cpus)
    results = {}
    if args.scans:
        folder = linked_copies(args.scans, args.scans_copies, work / "scans")
        results["scans"] = throughput(
            f"real scans {args.scans} x {args.scans_copies}", folder, bundle, work, args
        )
    if args.generated:
        from herbray import synthetic

        folder = work / f"generated-{args.generated}"
        if not (folder / "manifest.csv").exists():
            synthetic.generate_sheets(folder, args.generated, size=(4000, 6000))
        results["generated"] = throughput("generated 4000x6000 sheets", folder, bundle, work, args)
    if args.memory:
        memory([int(c) for c in args.memory.split(",")], bundle, work, args)
    print("\n" + json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
