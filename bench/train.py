"""Time training with Ray Train (herbray.train) against a plain PyTorch loop, side by side.

    .venv/bin/python bench/train.py                       # prepares ../shared/data/violaceae
    .venv/bin/python bench/train.py --shards prepared/ --rounds 3 --epochs 4
    .venv/bin/python bench/train.py --synthetic 40        # 6 species x 40 generated sheets

Both sides train the same model (default EfficientNet-Lite0 from ImageNet weights)
on the training split of the same shards, with the same decode and augmentation
(``herbray.transforms.train_batch``), batch size, optimizer, loss, channels_last
input and torch threads. They differ only in what Ray adds:

- Ray Train: ``herbray.train.train`` with one worker on a local Ray of
  ``--num-cpus`` CPUs. Ray Data reads the Parquet shards and decodes and
  augments in its own tasks, and the worker takes batches from its dataset
  shard with ``iter_torch_batches``. Validation runs after every epoch.
- Plain PyTorch: the shards are read once with pyarrow, and a ``DataLoader``
  with ``--loader-workers`` processes (spawned once, kept between epochs)
  decodes and augments batches of shuffled rows. No validation.

Priority: Ray starts its worker processes at niceness 15 (``RAY_worker_niceness``).
On a shared machine any other busy process then slows the Ray side far more than
a plain loop at niceness 0: Ray epochs ran 2.2x slower than plain ones while
other jobs ran. This script therefore runs at the Ray workers' niceness
(``--nice``), and its DataLoader processes inherit it, so other load slows both
sides alike.

Memory allocator: herbray train starts its workers with the glibc malloc settings
of ``herbray.runtime.CPU_TRAINING_MALLOC_ENV`` (``--no-tune-malloc`` turns them
off). This script then runs itself again with the same settings, so the plain
loop has them too; ``--no-tune-malloc`` compares both sides without them.

Resources: the Ray worker reserves ``--cpus-per-worker`` CPUs (default 1) and
each Ray Data task ``--data-cpus`` (default 1), so on 2 CPUs one decode task
runs beside the training worker. That matches the plain loop's one DataLoader
process. Both train with ``--torch-threads`` threads (default 2, all cores),
because a worker's CPU reservation does not limit its threads.

What counts: images per second of training epochs only, from the start of an
epoch's first batch request to the end of its last optimizer step (Ray Train's
``train_images_per_second``, measured the same way in the plain loop). Ray
start-up, worker-group start, validation, checkpoints and each run's first
epoch (warm-up: worker processes, imports, allocator) are excluded. Rounds
alternate which side goes first; the median and range over rounds are printed
with the overhead, ``plain images/s / Ray images/s - 1``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import torch

REPO = Path(__file__).resolve().parent.parent
VIOLACEAE = REPO.parent / "shared" / "data" / "violaceae"
# Ray 2.60 starts worker processes at this niceness unless RAY_worker_niceness is set.
RAY_WORKER_NICENESS = int(os.environ.get("RAY_worker_niceness", 15))  # noqa: SIM112

logger = logging.getLogger("bench.train")


def prepare_shards(args: argparse.Namespace, scratch: Path) -> str:
    """Prepare the Violaceae set (or generated sheets) into ``scratch`` and return the folder."""
    from herbray.prepare import PrepareConfig, prepare

    if args.synthetic:
        from herbray.synthetic import generate_collection

        generate_collection(
            scratch / "demo",
            n_species=6,
            sheets_per_species=args.synthetic,
            archive_per_species=0,
            size=(1000, 1500),
        )
        source = {"input": str(scratch / "demo" / "collection")}
    else:
        if not VIOLACEAE.is_dir():
            sys.exit(f"{VIOLACEAE} not found: pass --shards or --synthetic N")
        source = {
            "input": str(VIOLACEAE / "labels.csv"),
            "image_column": "path",
            "label_column": "species_code",
            "group_column": "sub_code",
        }
    output = scratch / "prepared"
    prepare(PrepareConfig(**source, output=str(output), short_side=args.short_side))
    return str(output)


def train_config(args: argparse.Namespace, shards: str, output: str, name: str):
    from herbray.train import TrainConfig

    return TrainConfig(
        shards=shards,
        output=output,
        name=name,
        model=args.model,
        weights=args.weights,
        epochs=args.epochs,
        batch_size=args.batch_size,
        input_size=args.input_size,
        num_workers=1,
        cpus_per_worker=args.cpus_per_worker,
        torch_threads=args.torch_threads,
        data_cpus=args.data_cpus,
        num_cpus=args.num_cpus,
        checkpoints_to_keep=1,
        tune_malloc=args.tune_malloc,
    )


def run_ray(args: argparse.Namespace, shards: str, scratch: Path, index: int) -> list[dict]:
    """Train with herbray.train; return the per-epoch rows of its history."""
    from herbray.train import train

    output = scratch / f"ray-{index}"
    result = train(train_config(args, shards, str(output), f"bench-{index}"))
    return [
        {
            "epoch": row["epoch"],
            "images": row["train_images"],
            "seconds": row["train_seconds"],
            "data_seconds": row["train_data_seconds"],
        }
        for row in result.history
    ]


class TrainingSheets(torch.utils.data.Dataset):
    """Training rows in memory; an item is a decoded, augmented batch of row indices."""

    def __init__(self, images: list[bytes], labels: np.ndarray, config, shape):
        self.images = images
        self.labels = labels
        self.kwargs = {
            "height": shape.height,
            "width": shape.width,
            "crop_scale": list(config.crop_scale),
            "color_jitter": config.color_jitter,
        }

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, indices: list[int]):
        from herbray.transforms import train_batch

        batch = train_batch(
            {"image": [self.images[i] for i in indices], "label": self.labels[indices]},
            **self.kwargs,
        )
        return torch.from_numpy(batch["image"]), torch.from_numpy(batch["label"])


class PlainLoop:
    """The training step of herbray.train without Ray: same model, loss, optimizer, schedule."""

    def __init__(self, args: argparse.Namespace, shards: str):
        from herbray import models, storage
        from herbray.prepare import load_prepared
        from herbray.train import _split_counts, class_weights
        from herbray.transforms import InputShape

        self.config = train_config(args, shards, "unused", "plain")
        prepared = load_prepared(shards)
        fs, path = storage.filesystem_and_path(prepared.split_path("train"))
        table = pads.dataset(path, filesystem=fs, format="parquet").to_table(
            columns=["image", "label"]
        )
        self.spec = models.get_spec(self.config.model)
        self.shape = InputShape.from_size(
            self.config.input_size or self.spec.input_size, self.config.aspect
        )
        self.dataset = TrainingSheets(
            table.column("image").to_pylist(),
            np.asarray(table.column("label").to_pylist(), dtype=np.int64),
            self.config,
            self.shape,
        )
        counts = _split_counts(prepared, len(prepared.labels))
        self.num_classes = len(prepared.labels)
        self.weights = class_weights(counts, self.config.class_weighting)
        self.loader_workers = args.loader_workers

    def run(self) -> list[dict]:
        from herbray import models
        from herbray.train import lr_factor, torch_threads
        from herbray.transforms import to_model_input

        c = self.config
        torch.set_num_threads(torch_threads(c.torch_threads, c.cpus_per_worker))
        torch.manual_seed(c.seed)
        weights = None if c.weights == "none" else c.weights
        model = models.create_model(c.model, self.num_classes, weights=weights)
        model = model.to(memory_format=torch.channels_last)
        lr = c.lr * c.batch_size / 32
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=c.weight_decay)
        steps_per_epoch = math.ceil(len(self.dataset) / c.batch_size)
        total_steps = steps_per_epoch * c.epochs
        warmup_steps = int(round(c.warmup_epochs * steps_per_epoch))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, total_steps, warmup_steps)
        )
        criterion = torch.nn.CrossEntropyLoss(
            weight=torch.tensor(self.weights, dtype=torch.float32),
            label_smoothing=c.label_smoothing,
        )
        sampler = torch.utils.data.BatchSampler(
            torch.utils.data.RandomSampler(self.dataset), c.batch_size, drop_last=False
        )
        workers = self.loader_workers
        loader = torch.utils.data.DataLoader(
            self.dataset,
            sampler=sampler,
            batch_size=None,
            num_workers=workers,
            multiprocessing_context="spawn" if workers else None,
            persistent_workers=workers > 0,
            prefetch_factor=2 if workers else None,
        )

        rows = []
        for epoch in range(c.epochs):
            model.train()
            started = time.time()
            seen, data_seconds, requested = 0, 0.0, started
            for images, labels in loader:
                data_seconds += time.time() - requested
                x = to_model_input(images, self.spec.mean, self.spec.std, channels_last=True)
                loss = criterion(model(x).float(), labels)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss {loss.item()} in epoch {epoch + 1}")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                loss.item()
                seen += len(labels)
                requested = time.time()
            rows.append(
                {
                    "epoch": epoch + 1,
                    "images": seen,
                    "seconds": time.time() - started,
                    "data_seconds": data_seconds,
                }
            )
        return rows


def steady_rate(rows: list[dict]) -> float:
    """Images per second over every epoch but the first."""
    measured = [row for row in rows if row["epoch"] > 1]
    return sum(row["images"] for row in measured) / sum(row["seconds"] for row in measured)


def spread(values: list[float]) -> str:
    return f"median {statistics.median(values):.2f} (range {min(values):.2f}-{max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", help="herbray prepare output (default: prepare Violaceae)")
    parser.add_argument(
        "--synthetic",
        type=int,
        metavar="N",
        help="prepare N generated sheets per species (6 species) instead of Violaceae",
    )
    parser.add_argument("--short-side", type=int, default=384, help="prepare's short side, px")
    parser.add_argument("--model", default="efficientnet_lite0", help="registry model name")
    parser.add_argument("--weights", default="imagenet", help="imagenet, none or a file")
    parser.add_argument("--input-size", type=int, default=224, help="input width in pixels")
    parser.add_argument("--batch-size", type=int, default=16, help="images per batch")
    parser.add_argument(
        "--epochs", type=int, default=3, help="epochs per run; the first is warm-up"
    )
    parser.add_argument("--rounds", type=int, default=3, help="Ray/plain pairs, order alternated")
    parser.add_argument("--torch-threads", type=int, default=2, help="torch threads, both sides")
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray")
    parser.add_argument(
        "--cpus-per-worker", type=float, default=1.0, help="CPUs the Ray Train worker reserves"
    )
    parser.add_argument(
        "--data-cpus", type=float, default=1.0, help="CPUs per Ray Data read/decode task"
    )
    parser.add_argument(
        "--loader-workers", type=int, default=1, help="DataLoader processes of the plain loop"
    )
    parser.add_argument(
        "--nice",
        type=int,
        default=RAY_WORKER_NICENESS,
        help="niceness of this process and its DataLoader workers (default: Ray's for workers)",
    )
    parser.add_argument(
        "--tune-malloc",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="glibc malloc settings of herbray train (herbray.runtime) on both sides",
    )
    parser.add_argument("--json", type=Path, help="also write all per-epoch rows to this file")
    args = parser.parse_args()
    from herbray.runtime import CPU_TRAINING_MALLOC_ENV, malloc_env

    if args.tune_malloc and malloc_env():
        # glibc reads these variables only at process start, so run this script again.
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **malloc_env()})
    # This process, which runs the plain loop, now has the settings. Ray must not
    # inherit them, because herbray train sets them on its training workers only.
    if args.tune_malloc:
        for name in CPU_TRAINING_MALLOC_ENV:
            os.environ.pop(name, None)
    if args.epochs < 2:
        parser.error("--epochs must be >= 2: the first epoch of each run is not measured")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    from herbray.runtime import init_ray

    with tempfile.TemporaryDirectory(prefix="herbray-bench-train-") as folder:
        scratch = Path(folder)
        init_ray(num_cpus=args.num_cpus)
        # After Ray's start: processes started from here inherit this niceness, and Ray
        # would add its worker niceness on top of it.
        os.nice(max(0, args.nice - os.nice(0)))
        shards = args.shards or prepare_shards(args, scratch)
        plain = PlainLoop(args, shards)
        logger.info(
            "%s, %d training images, batch %d, input %dx%d, %d torch threads",
            args.model,
            len(plain.dataset),
            args.batch_size,
            plain.shape.height,
            plain.shape.width,
            args.torch_threads,
        )

        results = []
        for index in range(args.rounds):
            order = ("ray", "plain") if index % 2 == 0 else ("plain", "ray")
            rates = {}
            for side in order:
                rows = run_ray(args, shards, scratch, index) if side == "ray" else plain.run()
                rates[side] = steady_rate(rows)
                results.append({"round": index + 1, "side": side, "epochs": rows})
                per_epoch = ", ".join(
                    f"{r['images'] / r['seconds']:.2f} ({r['data_seconds']:.1f} s data wait)"
                    for r in rows
                )
                logger.info(
                    "round %d %s: %.2f images/s (epochs: %s)",
                    index + 1,
                    side,
                    rates[side],
                    per_epoch,
                )
            results[-1]["overhead"] = rates["plain"] / rates["ray"] - 1

    ray_rates = [steady_rate(r["epochs"]) for r in results if r["side"] == "ray"]
    plain_rates = [steady_rate(r["epochs"]) for r in results if r["side"] == "plain"]
    overheads = [r["overhead"] for r in results if "overhead" in r]
    print(f"Ray Train    images/s {spread(ray_rates)}")
    print(f"plain loop   images/s {spread(plain_rates)}")
    print(
        f"overhead of Ray Train: {100 * statistics.median(overheads):+.1f} % median "
        f"(rounds: {', '.join(f'{100 * o:+.1f} %' for o in overheads)})"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
