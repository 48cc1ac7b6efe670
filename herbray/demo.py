"""herbray demo: the whole pipeline on a generated offline collection.

Generates synthetic herbarium sheets (``herbray.synthetic``), prepares them,
fine-tunes EfficientNet-Lite0 from its packaged ImageNet weights, labels a
held-out archive of other sheets and evaluates the labels against the archive's
truth. Everything runs offline; the defaults finish in a few minutes on a
2-core laptop without a GPU.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

from herbray import config as cfg
from herbray import models
from herbray.config import option

logger = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    """Settings of ``herbray demo``."""

    output: str = option("demo-output", "folder for the demo data and every stage's output")
    species: int = option(6, "demo species (up to 12)")
    sheets: int = option(20, "labelled sheets per species")
    archive: int = option(5, "unlabelled archive sheets per species")
    size: str = option("1200x1800", "sheet size in pixels, WIDTHxHEIGHT")
    model: str = option(
        models.DEFAULT_MODEL, "architecture to fine-tune", choices=tuple(models.model_names())
    )
    epochs: int = option(4, "fine-tuning epochs")
    batch_size: int = option(16, "images per training batch")
    seed: int = option(0, "seed of the generated collection and the split")
    num_cpus: int | None = option(None, "CPUs of the local Ray (default: all)")
    fresh: bool = option(False, "delete an earlier demo in the output folder first")

    def __post_init__(self) -> None:
        cfg.require(1 <= self.species <= 12, f"species must be 1-12, got {self.species}")
        cfg.require(self.sheets >= 4, f"sheets must be >= 4 per species, got {self.sheets}")
        cfg.require(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")


def run_demo(config: DemoConfig) -> dict:
    """Run every stage and return where each output is."""
    from herbray import synthetic
    from herbray.label import LabelConfig, label
    from herbray.prepare import PrepareConfig, prepare
    from herbray.runtime import init_ray
    from herbray.train import TrainConfig, train

    started = time.time()
    out = os.path.abspath(config.output)
    data = os.path.join(out, "demo-data")
    cpus = config.num_cpus or os.cpu_count() or 1
    paths = {
        "demo data": data,
        "prepared shards": os.path.join(out, "prepared"),
        "model bundle": os.path.join(out, "model"),
        "labels": os.path.join(out, "labels"),
        "evaluation": os.path.join(out, "evaluation"),
    }

    # 1. A labelled collection and a held-out unlabelled archive of synthetic sheets.
    if config.fresh or not os.path.exists(os.path.join(data, "archive-truth.csv")):
        logger.info("generating %d species x %d sheets in %s", config.species, config.sheets, data)
        synthetic.generate_collection(
            data,
            n_species=config.species,
            sheets_per_species=config.sheets,
            archive_per_species=config.archive,
            size=synthetic.parse_size(config.size),
            seed=config.seed,
            overwrite=True,
        )
    else:
        logger.info("reusing the demo collection in %s (--fresh makes a new one)", data)

    init_ray(num_cpus=cpus)

    # 2. Shards, split by collector (the sidecars name one per sheet).
    prepare(
        PrepareConfig(
            input=os.path.join(data, "collection"),
            output=paths["prepared shards"],
            seed=config.seed,
            num_cpus=cpus,
        )
    )

    # 3. Fine-tuning from ImageNet weights; a fresh run name each time, so a
    # rerun of the demo trains again instead of resuming a finished run.
    train(
        TrainConfig(
            shards=paths["prepared shards"],
            output=paths["model bundle"],
            model=config.model,
            epochs=config.epochs,
            batch_size=config.batch_size,
            num_workers=1,
            cpus_per_worker=1,
            torch_threads=cpus,
            name=f"demo-{time.strftime('%Y%m%d-%H%M%S')}",
            seed=config.seed,
        )
    )

    # 4. Labeling the held-out archive.
    label(
        LabelConfig(
            model=paths["model bundle"],
            input=os.path.join(data, "archive"),
            output=paths["labels"],
            torch_threads=cpus,
            overwrite=True,
        )
    )

    # 5. Evaluation of those labels against the archive's truth.
    evaluation = _evaluate(paths, data)
    paths["seconds"] = round(time.time() - started, 1)
    paths["evaluation summary"] = evaluation
    return paths


def _evaluate(paths: dict, data: str) -> str | None:
    try:
        from herbray.evaluate import EvaluateConfig, evaluate
    except ImportError:  # NOTE: until herbray.evaluate exists the demo stops after labeling
        return None
    result = evaluate(
        EvaluateConfig(
            labels=paths["labels"],
            truth=os.path.join(data, "archive-truth.csv"),
            model=paths["model bundle"],
            output=paths["evaluation"],
        )
    )
    return result.summary_line()
