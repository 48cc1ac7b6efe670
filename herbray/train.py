"""herbray train: data-parallel fine-tuning of a species classifier with Ray Train.

The prepared shards come in as Ray Data datasets: a map stage decodes and
augments each stored JPEG (new random crops every epoch), and every training
worker reads its shard with ``iter_torch_batches``. The loop runs on each
worker of a ``TorchTrainer`` (DistributedDataParallel over gloo on CPUs, NCCL
on GPUs). Every epoch ends with validation top-1, top-5 and macro-F1 reported
through ``ray.train.report`` together with a checkpoint.

Resume: run the same command again (same ``--name`` and ``--storage-path``) and
training continues after the newest complete checkpoint, with its optimizer and
schedule. ``--max-failures`` restarts the workers from that checkpoint when one
dies mid-run.

Example::

    herbray train --shards prepared/ --output bundle/ --epochs 10 --num-workers 2
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass

import pyarrow.fs as pafs

from herbray import config as cfg
from herbray import models, storage
from herbray.config import option

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
OPTIMIZERS = ("adamw", "sgd")
CLASS_WEIGHTINGS = ("sqrt_inverse", "inverse", "none")
# Images per Ray Data decode/augment batch.
DECODE_BATCH = 16


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the message names the epoch and step."""


@dataclass
class TrainConfig:
    """Settings of ``herbray train``."""

    shards: str = option("", "prepare output folder (local or s3://) to train on")
    output: str = option("", "folder (local or s3://) for the model bundle")
    model: str = option(
        models.DEFAULT_MODEL,
        "architecture from the model registry",
        choices=tuple(models.model_names()),
    )
    weights: str = option(
        "imagenet", "starting weights: imagenet, none (random), or a .pt/.pth/.safetensors file"
    )
    epochs: int = option(10, "passes over the training split")
    batch_size: int = option(32, "images per batch on each worker")
    input_size: int | None = option(
        None, "input width in pixels (default: the model's, 224 for EfficientNet-Lite0)"
    )
    aspect: float = option(1.5, "input height / width; 1.5 keeps a portrait sheet whole")
    optimizer: str = option("adamw", "optimizer", choices=OPTIMIZERS)
    lr: float = option(
        1e-3,
        "peak learning rate, for a total batch of 32 images (scaled "
        "linearly with workers x batch size)",
    )
    weight_decay: float = option(0.05, "weight decay")
    momentum: float = option(0.9, "SGD momentum")
    warmup_epochs: float = option(
        1.0, "epochs of linear learning-rate warm-up before the cosine decay"
    )
    label_smoothing: float = option(0.1, "label smoothing of the cross-entropy loss")
    class_weighting: str = option(
        "sqrt_inverse",
        "loss weight per species against the long tail: 1/sqrt(count), 1/count or none",
        choices=CLASS_WEIGHTINGS,
    )
    head_epochs: int = option(
        0, "first epochs that train only the classifier head (backbone frozen)"
    )
    crop_scale: tuple = option((0.5, 1.0), "min,max share of the sheet area in a training crop")
    color_jitter: float = option(0.15, "brightness/contrast/saturation jitter, as a fraction")
    precision: str = option(
        "auto", "auto: bf16 or fp16 mixed precision on GPU, fp32 on CPU", choices=PRECISIONS
    )
    channels_last: bool = option(
        True, "use the channels_last memory format (faster on CPUs and tensor cores)"
    )
    num_workers: int = option(
        1, "training workers (data-parallel); 0 runs in this process without checkpoints on storage"
    )
    use_gpu: bool = option(False, "one GPU per worker")
    cpus_per_worker: float = option(
        1.0, "CPUs reserved per worker; fractions such as 0.5 let workers share a CPU"
    )
    torch_threads: int | None = option(
        None, "torch threads per worker (default: cpus-per-worker rounded, at least 1)"
    )
    data_cpus: float = option(1.0, "CPUs per Ray Data read and decode/augment task")
    tune_malloc: bool = option(
        True,
        "start the workers with glibc malloc settings that keep freed memory for reuse "
        "(1.4-1.9x faster CPU training; a worker keeps up to 4 GiB of freed memory)",
    )
    cache_gb: float = option(
        2.0,
        "keep the compressed shards in Ray's object store for the run when they total at "
        "most this many GB (and a quarter of the object store); 0 reads them every epoch",
    )
    name: str = option("herbray-train", "run name; the same name and storage path resume")
    storage_path: str | None = option(
        None, "where runs and checkpoints live, local or s3:// (default: OUTPUT/runs)"
    )
    checkpoints_to_keep: int = option(2, "newest checkpoints kept on storage")
    max_failures: int = option(
        1, "worker-group restarts from the last checkpoint after a worker dies"
    )
    seed: int = option(0, "seed of weight init and data order")
    ray_address: str | None = option(
        None, "Ray cluster to join (default: RAY_ADDRESS, else a local Ray)"
    )
    num_cpus: int | None = option(None, "CPUs of a local Ray (default: all)")

    def __post_init__(self) -> None:
        cfg.require(bool(self.shards), "train needs --shards: a herbray prepare output folder")
        cfg.require(bool(self.output), "train needs --output: the folder for the model bundle")
        cfg.require(
            self.model in models.MODELS,
            f"unknown model {self.model!r}; choose one of {', '.join(models.model_names())}",
        )
        cfg.require(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        cfg.require(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        cfg.require(self.num_workers >= 0, f"num_workers must be >= 0, got {self.num_workers}")
        cfg.require(
            self.cpus_per_worker > 0,
            f"cpus_per_worker must be positive, got {self.cpus_per_worker}",
        )
        cfg.require(self.data_cpus > 0, f"data_cpus must be positive, got {self.data_cpus}")
        cfg.require(self.cache_gb >= 0, f"cache_gb must be >= 0, got {self.cache_gb}")
        cfg.require(
            self.torch_threads is None or self.torch_threads >= 1,
            f"torch_threads must be >= 1, got {self.torch_threads}",
        )
        cfg.require(
            0 <= self.head_epochs <= self.epochs,
            f"head_epochs must be between 0 and epochs ({self.epochs}), got {self.head_epochs}",
        )
        cfg.require(0 <= self.label_smoothing < 1, "label_smoothing must be in [0, 1)")
        cfg.require(self.lr > 0, f"lr must be positive, got {self.lr}")
        cfg.require(self.aspect > 0, f"aspect must be positive, got {self.aspect}")
        self.crop_scale = tuple(float(x) for x in self.crop_scale)
        cfg.require(
            len(self.crop_scale) == 2 and 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1,
            f"crop_scale must be min,max in (0, 1], got {self.crop_scale}",
        )
        cfg.require(self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}")
        cfg.require(self.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}")
        cfg.require(
            self.class_weighting in CLASS_WEIGHTINGS,
            f"class_weighting must be one of {CLASS_WEIGHTINGS}",
        )
        if self.weights.lower() == "none":
            self.weights = "none"


def class_weights(counts: list[int], mode: str) -> list[float]:
    """Loss weight per species, normalised so the average over images is 1."""
    if mode == "none":
        return [1.0] * len(counts)
    power = 0.5 if mode == "sqrt_inverse" else 1.0
    raw = [(1.0 / max(c, 1)) ** power for c in counts]
    total_images = sum(counts) or 1
    mean_over_images = sum(w * c for w, c in zip(raw, counts, strict=True)) / total_images
    return [w / mean_over_images for w in raw]


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warm-up to 1, then cosine decay to 0 at ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def torch_threads(requested: int | None, cpus_per_worker: float) -> int:
    """Threads of torch's intra-op pool on a worker: ``requested``, else its CPUs (at least 1)."""
    return requested or max(1, round(cpus_per_worker))


def _autocast_dtype(precision: str, device_type: str):
    import torch

    if precision == "fp32" or (precision == "auto" and device_type != "cuda"):
        return None
    if precision == "bf16" or (
        precision == "auto" and device_type == "cuda" and torch.cuda.is_bf16_supported()
    ):
        return torch.bfloat16
    return torch.float16


def train_loop_per_worker(loop_config: dict) -> None:
    """The training loop that runs on every Ray Train worker.

    ``loop_config`` holds the resolved :class:`TrainConfig` fields plus what the
    driver derived: species counts, steps per epoch, normalisation.
    """
    import ray.train
    import ray.train.torch
    import torch
    from ray.train import Checkpoint

    from herbray.metrics import ClassCounts
    from herbray.transforms import to_model_input

    c = loop_config
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(torch_threads(c["torch_threads"], c["cpus_per_worker"]))
    torch.manual_seed(c["seed"] + rank)
    device = ray.train.torch.get_device()
    num_classes = len(c["species_counts"])

    # Model, optimizer and schedule.
    weights = None if c["weights"] == "none" else c["weights"]
    model = models.create_model(c["model"], num_classes, weights=weights)
    head_params = {id(p) for p in models.classifier_parameters(model)}
    if c["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)
    backbone = [p for p in model.parameters() if id(p) not in head_params]
    head = [p for p in model.parameters() if id(p) in head_params]
    scaled_lr = c["lr"] * c["batch_size"] * max(world, 1) / 32
    groups = [{"params": backbone, "lr": scaled_lr}, {"params": head, "lr": scaled_lr}]
    if c["optimizer"] == "sgd":
        optimizer = torch.optim.SGD(
            groups,
            lr=scaled_lr,
            momentum=c["momentum"],
            weight_decay=c["weight_decay"],
            nesterov=True,
        )
    else:
        optimizer = torch.optim.AdamW(groups, lr=scaled_lr, weight_decay=c["weight_decay"])
    steps_per_epoch = c["steps_per_epoch"]
    total_steps = steps_per_epoch * c["epochs"]
    warmup_steps = int(round(c["warmup_epochs"] * steps_per_epoch))
    head_steps = c["head_epochs"] * steps_per_epoch

    def backbone_factor(step: int) -> float:
        return 0.0 if step < head_steps else lr_factor(step, total_steps, warmup_steps)

    def head_factor(step: int) -> float:
        return lr_factor(step, total_steps, warmup_steps)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [backbone_factor, head_factor])
    amp_dtype = _autocast_dtype(c["precision"], device.type)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    loss_weights = torch.tensor(c["class_weights"], dtype=torch.float32, device=device)
    criterion = torch.nn.CrossEntropyLoss(weight=loss_weights, label_smoothing=c["label_smoothing"])
    eval_criterion = torch.nn.CrossEntropyLoss(reduction="sum")

    # Resume from the newest checkpoint of this run, if there is one.
    start_epoch = 0
    history: list[dict] = []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = torch.load(
                os.path.join(folder, CHECKPOINT_FILE), map_location="cpu", weights_only=True
            )
        _unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch = state["epoch"] + 1
        history = list(state.get("history", []))
        if rank == 0:
            logger.info("resuming after epoch %d from %s", start_epoch, checkpoint.path)

    def batches(split: str, batch_size: int):
        shard = ray.train.get_dataset_shard(split)
        if shard is None:
            return
        yield from shard.iter_torch_batches(
            batch_size=batch_size,
            prefetch_batches=2,
            local_shuffle_buffer_size=c["shuffle_buffer"] if split == "train" else None,
            local_shuffle_seed=None,
        )

    def evaluate(split: str) -> dict:
        # Evaluate the unwrapped network, because DDP's forward broadcasts buffers on
        # every batch, and that collective hangs when shards differ in batch count.
        network = _unwrap(model)
        network.eval()
        if world > 1:
            # Rank 0's batch-norm statistics, which are also the ones checkpointed.
            for buffer in network.buffers():
                torch.distributed.broadcast(buffer, src=0)
        counts = ClassCounts(num_classes)
        with torch.inference_mode():
            for batch in batches(split, c["batch_size"] * 2):
                x = to_model_input(
                    batch["image"],
                    c["mean"],
                    c["std"],
                    device=device,
                    channels_last=c["channels_last"],
                )
                y = batch["label"].to(device)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    logits = network(x)
                loss = eval_criterion(logits.float(), y).item()
                counts.update(logits.float().cpu().numpy(), y.cpu().numpy(), loss)
        # On the device, because NCCL reduces only GPU tensors.
        vector = torch.tensor(counts.to_vector(), dtype=torch.float64, device=device)
        if world > 1:
            torch.distributed.all_reduce(vector)
        merged = ClassCounts.from_vector(vector.cpu().numpy(), num_classes)
        return merged.summary(prefix=f"{split}_")

    for epoch in range(start_epoch, c["epochs"]):
        # One pass over this worker's shard of the training split.
        model.train()
        started = time.time()
        seen, loss_sum, step = 0, 0.0, 0
        # Time blocked on the input pipeline: high means decoding, not the model, limits speed.
        data_seconds, requested = 0.0, started
        for step, batch in enumerate(batches("train", c["batch_size"])):
            data_seconds += time.time() - requested
            x = to_model_input(
                batch["image"], c["mean"], c["std"], device=device, channels_last=c["channels_last"]
            )
            y = batch["label"].to(device)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss = criterion(model(x).float(), y)
            if not torch.isfinite(loss):
                raise NonFiniteLossError(
                    f"the training loss is {loss.item()} at epoch {epoch + 1}, step {step + 1}; "
                    "lower --lr, or check the shards for broken images"
                )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            seen += len(y)
            loss_sum += loss.item() * len(y)
            requested = time.time()
        train_seconds = time.time() - started

        # Validation (and, after the last epoch, the test split) on every worker's shard.
        totals = torch.tensor(
            [seen, loss_sum, train_seconds, data_seconds], dtype=torch.float64, device=device
        )
        if world > 1:
            torch.distributed.all_reduce(totals)
        totals = totals.cpu()
        metrics = {
            "epoch": epoch + 1,
            "train_loss": float(totals[1] / max(totals[0], 1)),
            "train_images": int(totals[0]),
            "train_images_per_second": float(totals[0] / max(totals[2] / max(world, 1), 1e-9)),
            "train_seconds": float(totals[2] / max(world, 1)),
            "train_data_seconds": float(totals[3] / max(world, 1)),
            "lr": scheduler.get_last_lr()[-1],
        }
        if c["has_val"]:
            metrics.update(evaluate("val"))
        if c["has_test"] and epoch + 1 == c["epochs"]:
            metrics.update(evaluate("test"))
        metrics["epoch_seconds"] = time.time() - started
        if rank == 0:
            logger.info(format_epoch(metrics, c["epochs"]))

        # Every worker reports; rank 0 attaches the checkpoint.
        history.append(metrics)
        with _checkpoint_folder(c["local_checkpoint_dir"]) as folder:
            checkpoint = None
            if rank == 0:
                torch.save(
                    {
                        "model": _unwrap(model).state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict(),
                        "epoch": epoch,
                        "metrics": metrics,
                        "history": history,
                    },
                    os.path.join(folder, CHECKPOINT_FILE),
                )
                checkpoint = Checkpoint.from_directory(folder)
            ray.train.report(metrics, checkpoint=checkpoint)


@contextlib.contextmanager
def _checkpoint_folder(keep: str | None):
    """Yield a folder for one checkpoint: temporary, or ``keep`` when Ray Train does not copy it.

    With workers, ``ray.train.report`` copies the checkpoint to storage, so a
    temporary folder suffices. With ``num_workers=0`` (Ray 2.60 local mode) the
    reported checkpoint is only a reference to the folder, which must outlive the loop.
    """
    if keep is None:
        with tempfile.TemporaryDirectory() as folder:
            yield folder
    else:
        os.makedirs(keep, exist_ok=True)
        yield keep


def _unwrap(model):
    return model.module if hasattr(model, "module") else model


def format_epoch(metrics: dict, epochs: int) -> str:
    """One log line per epoch: loss, validation figures and speed."""
    parts = [f"epoch {metrics['epoch']}/{epochs}", f"loss {metrics['train_loss']:.3f}"]
    for split in ("val", "test"):
        if f"{split}_top1" in metrics:
            top1, top5 = metrics[f"{split}_top1"], metrics[f"{split}_top5"]
            macro_f1 = metrics[f"{split}_macro_f1"]
            parts.append(f"{split} top-1 {top1:.3f} top-5 {top5:.3f} macro-F1 {macro_f1:.3f}")
    parts.append(f"{metrics['train_images_per_second']:.1f} images/s")
    parts.append(f"{metrics['epoch_seconds']:.0f} s")
    return ", ".join(parts)


class MetricsLog:
    """Ray Train callback on the controller: one JSON line per reported epoch.

    The file lives beside the run's checkpoints, so a resumed run extends the
    same history; a repeated epoch (after a restart) replaces its old line.
    """

    def __init__(self, uri: str):
        self.uri = uri

    def after_report(self, run_context, metrics, checkpoint) -> None:
        row = dict(metrics[0]) if metrics else {}
        if not row:
            return
        history = [r for r in read_history(self.uri) if r.get("epoch") != row.get("epoch")]
        history.append(row)
        history.sort(key=lambda r: r.get("epoch", 0))
        storage.write_text(self.uri, "".join(json.dumps(r) + "\n" for r in history))

    def after_exception(self, run_context, worker_exceptions) -> None:
        pass


def read_history(uri: str) -> list[dict]:
    if not storage.exists(uri):
        return []
    return [json.loads(line) for line in storage.read_text(uri).splitlines() if line.strip()]


@dataclass
class TrainResult:
    """Where the bundle went and the final metrics."""

    output: str
    metrics: dict
    seconds: float
    history: list

    def summary_line(self) -> str:
        m = self.metrics
        parts = [f"herbray train: {m.get('epoch', 0)} epochs in {self.seconds:.0f} s"]
        for split in ("val", "test"):
            if f"{split}_top1" in m:
                parts.append(
                    f"{split} top-1 {m[f'{split}_top1']:.3f}, top-5 {m[f'{split}_top5']:.3f}"
                )
        parts.append(f"bundle -> {self.output}")
        return "; ".join(parts)


def _split_counts(prepared, num_classes: int) -> list[int]:
    """Training images per species, from the prepare report (else labels.json counts)."""
    report_uri = storage.join(prepared.root, "report.json")
    if storage.exists(report_uri):
        report = json.loads(storage.read_text(report_uri))
        per_species = report.get("images_by_species_and_split", {})
        return [int(per_species.get(name, {}).get("train", 0)) for name in prepared.labels.names]
    return list(prepared.labels.counts)


def check_data_cpus(config: TrainConfig, cluster_cpus: float, *, local: bool) -> None:
    """Raise (local Ray) or warn (cluster) when the workers leave no CPU for Ray Data.

    Ray Data runs its tasks on the CPUs that Ray Train has not reserved for its
    workers: file listing takes 1 CPU and each read and decode/augment task
    ``data_cpus``. With less free, the first epoch waits forever for its data.
    A cluster may still add nodes, so there this is only a warning.
    """
    worker_cpus = config.num_workers * config.cpus_per_worker
    free = cluster_cpus - worker_cpus
    needed = max(1.0, config.data_cpus)
    if free >= needed:
        return
    message = (
        f"num_workers x cpus_per_worker = {config.num_workers} x {config.cpus_per_worker:g} "
        f"reserves {worker_cpus:g} of the {cluster_cpus:g} CPUs of the Ray cluster, which "
        f"leaves {max(free, 0):g} for the Ray Data read and decode tasks, but they need "
        f"{needed:g} (data_cpus={config.data_cpus:g}, and 1 for file listing); lower "
        "--cpus-per-worker (fractions such as 0.5 are allowed), --num-workers or "
        "--data-cpus, or give Ray more CPUs (--num-cpus)"
    )
    if local:
        raise cfg.ConfigError(message)
    logger.warning("%s; training waits until the cluster has the CPUs", message)


def _shard_bytes(fs, path: str) -> int:
    selector = pafs.FileSelector(path, recursive=True, allow_not_found=True)
    files = [info for info in fs.get_file_info(selector) if info.type == pafs.FileType.File]
    return sum(info.size or 0 for info in files)


def cache_shards(config: TrainConfig, shard_bytes: int, object_store_bytes: float) -> bool:
    """Return whether the compressed shards stay in Ray's object store for the whole run.

    Reading the Parquet shards again delays each epoch's first batch by about
    1.3 s (Ray Data's file listing and read tasks; 134 Violaceae sheets on 2
    CPUs, bench/train.py). Cached shards skip that, but they must fit
    ``cache_gb`` and a quarter of the object store, which leaves the rest to the
    decoded batches.
    """
    return shard_bytes <= min(config.cache_gb * 1e9, object_store_bytes / 4)


def build_datasets(prepared, config: TrainConfig, shape) -> dict:
    """Ray Data datasets of the prepared splits, decoded and (for train) augmented."""
    import ray
    import ray.data

    from herbray.transforms import eval_batch, train_batch

    fs, _ = storage.filesystem_and_path(prepared.root)
    paths = {}
    for split in ("train", "val", "test"):
        uri = prepared.split_path(split)
        if uri is not None:
            paths[split] = storage.filesystem_and_path(uri)[1]
    shard_bytes = sum(_shard_bytes(fs, path) for path in paths.values())
    cache = cache_shards(
        config, shard_bytes, ray.cluster_resources().get("object_store_memory", 0.0)
    )
    logger.info(
        "%.1f MB of shards, %s",
        shard_bytes / 1e6,
        "cached in the object store" if cache else "read again every epoch (over --cache-gb)",
    )
    # One decoded batch per block, so that the workers receive batches as they are
    # decoded rather than a whole file's images at once (Ray's default is 128 MiB).
    block_bytes = DECODE_BATCH * shape.height * shape.width * 3

    datasets = {}
    for split, path in paths.items():
        # A new file order every epoch, without randomize_block_order(), which
        # waits for every block of the split before the first one is decoded.
        shuffle = "files" if split == "train" and not cache else None
        dataset = ray.data.read_parquet(
            path, filesystem=fs, num_cpus=config.data_cpus, shuffle=shuffle
        ).select_columns(["image", "label"])
        if cache:
            dataset = dataset.materialize()
        if split == "train":
            if cache:
                dataset = dataset.randomize_block_order()
            dataset = dataset.map_batches(
                train_batch,
                batch_size=DECODE_BATCH,
                fn_kwargs={
                    "height": shape.height,
                    "width": shape.width,
                    "crop_scale": list(config.crop_scale),
                    "color_jitter": config.color_jitter,
                },
                num_cpus=config.data_cpus,
            )
        else:
            dataset = dataset.map_batches(
                eval_batch,
                batch_size=DECODE_BATCH,
                fn_kwargs={"height": shape.height, "width": shape.width},
                num_cpus=config.data_cpus,
            )
        dataset.context.target_max_block_size = block_bytes
        datasets[split] = dataset
    return datasets


def train(config: TrainConfig) -> TrainResult:
    """Fine-tune on prepared shards with Ray Train and write a model bundle."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from herbray.bundle import write_bundle
    from herbray.prepare import load_prepared
    from herbray.runtime import init_ray, malloc_env
    from herbray.transforms import InputShape

    started = time.time()
    # A missing bucket fails here, before Ray starts, with the URI in the message.
    for uri in (config.output, config.storage_path or config.output):
        storage.check_bucket(uri)
    prepared = load_prepared(config.shards)
    labels = prepared.labels
    spec = models.get_spec(config.model)
    shape = InputShape.from_size(config.input_size or spec.input_size, config.aspect)
    train_images = prepared.manifest["images_by_split"].get("train", 0)
    if train_images == 0:
        raise ValueError(f"{config.shards}: the training split is empty")
    counts = _split_counts(prepared, len(labels))

    init_ray(config.ray_address, config.num_cpus)
    check_data_cpus(
        config,
        ray.cluster_resources().get("CPU", 0.0),
        local=not (config.ray_address or os.environ.get("RAY_ADDRESS")),
    )
    datasets = build_datasets(prepared, config, shape)
    workers = max(config.num_workers, 1)
    loop_config = {
        **cfg.to_dict(config),
        "species_counts": counts,
        "class_weights": class_weights(counts, config.class_weighting),
        "steps_per_epoch": max(1, math.ceil(train_images / (config.batch_size * workers))),
        "mean": list(spec.mean),
        "std": list(spec.std),
        "has_val": "val" in datasets,
        "has_test": "test" in datasets,
        "shuffle_buffer": min(256, max(config.batch_size * 4, 32)),
        "local_checkpoint_dir": None,
    }
    if "val" not in datasets:
        logger.warning(
            "%s has no validation split; epochs report training loss only", config.shards
        )

    # Runs and checkpoints: the same name and storage path resume.
    storage_uri = (config.storage_path or storage.join(config.output, "runs")).rstrip("/")
    storage_fs, storage_dir = storage.filesystem_and_path(storage_uri)
    history_uri = storage.join(storage_uri, config.name, "metrics.jsonl")
    run_config = ray.train.RunConfig(
        name=config.name,
        storage_path=storage_dir,
        storage_filesystem=storage_fs if storage.is_s3(storage_uri) else None,
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.checkpoints_to_keep),
        failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
        callbacks=[_metrics_callback(history_uri)],
        worker_runtime_env={"env_vars": malloc_env()} if config.tune_malloc else None,
    )
    resources = {"CPU": config.cpus_per_worker}
    if config.use_gpu:
        resources["GPU"] = 1
    if config.num_workers == 0:
        loop_config["local_checkpoint_dir"] = tempfile.mkdtemp(prefix="herbray-train-")
        logger.warning(
            "num_workers=0 runs the training loop in this process, where Ray Train keeps no "
            "checkpoints on storage: this run cannot resume and writes no metrics.jsonl to %s; "
            "use --num-workers 1 or more for both",
            storage_uri,
        )
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.num_workers, use_gpu=config.use_gpu, resources_per_worker=resources
        ),
        run_config=run_config,
        datasets=datasets,
        dataset_config=_data_config(),
    )
    logger.info(
        "training %s on %d images of %d species, %d worker(s), input %dx%d, run %s in %s",
        config.model,
        train_images,
        len(labels),
        workers,
        shape.height,
        shape.width,
        config.name,
        storage_uri,
    )
    try:
        state = _fit(trainer, f"run {config.name} in {storage_uri}")
    finally:
        if loop_config["local_checkpoint_dir"] is not None:
            shutil.rmtree(loop_config["local_checkpoint_dir"], ignore_errors=True)

    # The bundle comes from the final checkpoint, with the epochs that led to it.
    metrics = state["metrics"]
    history = state.get("history") or read_history(history_uri) or [metrics]
    write_bundle(
        config.output,
        state_dict=state["model"],
        model_name=config.model,
        labels=labels,
        input_shape=shape,
        preprocessing={"mean": list(spec.mean), "std": list(spec.std), "interpolation": "bilinear"},
        config=cfg.to_dict(config),
        metrics=metrics,
        history=history,
    )
    cfg.save(config, storage.join(storage_uri, config.name, "config.yaml"))
    outcome = TrainResult(
        output=config.output, metrics=metrics, seconds=time.time() - started, history=history
    )
    logger.info(outcome.summary_line())
    return outcome


def _fit(trainer, run: str) -> dict:
    """Run ``trainer`` and return the state saved in its final checkpoint.

    A worker's :class:`NonFiniteLossError` is raised as itself, so its message
    (with the epoch and step) is the error, not a Ray traceback around it.
    """
    import ray.train
    import torch

    try:
        result = trainer.fit()
    except ray.train.WorkerGroupError as exc:
        for failure in exc.worker_failures.values():
            cause = _find_cause(failure, NonFiniteLossError)
            if cause is not None:
                raise NonFiniteLossError(str(cause)) from exc
        raise
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError(f"{run} finished without a checkpoint")
    with result.checkpoint.as_directory() as folder:
        return torch.load(
            os.path.join(folder, CHECKPOINT_FILE), map_location="cpu", weights_only=True
        )


def _find_cause(error: BaseException, kind: type) -> BaseException | None:
    """Return the first ``kind`` exception in the chain of ``error`` (Ray wraps worker errors)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, kind):
            return error
        seen.add(id(error))
        error = getattr(error, "cause", None) or error.__cause__
    return None


def _data_config():
    """Ray Train dataset sharding: equal training shards, complete evaluation shards.

    Every worker must run the same number of training steps, because each step
    all-reduces gradients, so the training split is cut into equal shards (Ray
    drops up to ``num_workers - 1`` rows per epoch for that). Ray Train's default
    cuts validation and test the same way, which leaves images out of the metrics.
    Here they are cut into shards of any size, so every image is evaluated once.
    """
    from ray.train import DataConfig

    class _Config(DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            split = {name: ds for name, ds in datasets.items() if name == "train"}
            output = super().configure(split, world_size, worker_handles, worker_node_ids, **kwargs)
            for name, dataset in datasets.items():
                if name in split:
                    continue
                dataset = dataset.copy(dataset)
                dataset.set_name(name)
                dataset.context.execution_options = self.default_ingest_options()
                shards = dataset.streaming_split(
                    world_size, equal=False, locality_hints=worker_node_ids
                )
                for rank, shard in enumerate(shards):
                    output[rank][name] = shard
            return output

    return _Config()


def _metrics_callback(uri: str):
    """Wrap :class:`MetricsLog` in Ray Train's callback base class."""
    from ray.train import UserCallback

    class _Callback(MetricsLog, UserCallback):
        pass

    return _Callback(uri)
