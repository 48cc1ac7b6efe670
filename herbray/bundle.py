"""Model bundles: everything needed to use a trained model, in one folder.

Layout (local folder or ``s3://`` prefix)::

    bundle.json         format, model name, classes, input shape, weights hash
    model.safetensors   the weights (no pickle, so loading one cannot run code)
    labels.json         species <-> index map the head was trained with
    preprocessing.json  input shape, normalisation, resize rule
    config.yaml         the resolved training config
    metrics.json        final metrics; metrics.jsonl has one line per epoch
    MODEL_CARD.md       what the model is for and how good it is

Label and evaluate load a bundle with :func:`load_bundle`; the weights hash goes
into ``identifiedBy`` so every identification names the exact model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass

import numpy as np

from herbray import __version__, storage
from herbray.taxonomy import LabelMap
from herbray.transforms import InputShape, to_model_input

logger = logging.getLogger(__name__)

BUNDLE_FORMAT = "herbray-model"
WEIGHTS_FILE = "model.safetensors"


@dataclass
class Bundle:
    """A loaded model bundle, ready for inference on uint8 sheet arrays."""

    root: str
    info: dict
    labels: LabelMap
    model: object  # torch.nn.Module in eval mode; None from open_bundle
    device: str = "cpu"

    @property
    def model_name(self) -> str:
        return self.info["model"]

    @property
    def weights_sha256(self) -> str:
        return self.info["weights_sha256"]

    @property
    def input_shape(self) -> InputShape:
        height, width = self.info["input_shape"]
        return InputShape(height, width)

    @property
    def identified_by(self) -> str:
        """The ``identifiedBy`` value: software, architecture and weights hash."""
        return f"herbray {self.model_name} model sha256:{self.weights_sha256[:12]}"

    def predict_logits(self, images: np.ndarray, *, amp_dtype=None) -> np.ndarray:
        """Logits (N x classes) for a uint8 N x H x W x 3 batch at the input shape."""
        import torch

        pre = self.info["preprocessing"]
        batch = to_model_input(images, pre["mean"], pre["std"], device=self.device)
        with torch.inference_mode():
            if amp_dtype is not None:
                with torch.autocast(device_type=self.device.split(":")[0], dtype=amp_dtype):
                    logits = self.model(batch)
            else:
                logits = self.model(batch)
        return logits.float().cpu().numpy()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_bundle(
    output: str,
    *,
    state_dict: dict,
    model_name: str,
    labels: LabelMap,
    input_shape: InputShape,
    preprocessing: dict,
    config: dict,
    metrics: dict,
    history: list[dict],
) -> str:
    """Write a bundle folder and return its weights hash."""
    import safetensors.torch

    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in state_dict.items()}
    weights = safetensors.torch.save(
        tensors, metadata={"model": model_name, "herbray": __version__}
    )
    digest = sha256_bytes(weights)
    storage.makedirs(output)
    storage.write_bytes(storage.join(output, WEIGHTS_FILE), weights)
    labels.save(storage.join(output, "labels.json"))
    pre = {
        **preprocessing,
        "input_shape": input_shape.to_list(),
        "resize": "whole sheet to input_shape",
    }
    storage.write_text(storage.join(output, "preprocessing.json"), json.dumps(pre, indent=1))
    storage.write_text(storage.join(output, "metrics.json"), json.dumps(metrics, indent=1))
    storage.write_text(
        storage.join(output, "metrics.jsonl"), "".join(json.dumps(row) + "\n" for row in history)
    )
    storage.write_text(storage.join(output, "config.yaml"), _yaml(config))
    info = {
        "format": BUNDLE_FORMAT,
        "version": 1,
        "herbray_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": model_name,
        "num_classes": len(labels),
        "input_shape": input_shape.to_list(),
        "preprocessing": pre,
        "weights": WEIGHTS_FILE,
        "weights_sha256": digest,
    }
    storage.write_text(
        storage.join(output, "MODEL_CARD.md"), model_card(info, labels, config, metrics)
    )
    # bundle.json goes last: a folder without it is not a complete bundle.
    storage.write_text(storage.join(output, "bundle.json"), json.dumps(info, indent=1))
    return digest


def _yaml(config: dict) -> str:
    import yaml

    return "# resolved training config\n" + yaml.safe_dump(
        config, allow_unicode=True, sort_keys=False
    )


def model_card(info: dict, labels: LabelMap, config: dict, metrics: dict) -> str:
    """A short model card: what the model is, what it was trained on, how good it is."""

    def fmt(key: str) -> str:
        value = metrics.get(key)
        return f"{value:.3f}" if isinstance(value, float) else "n/a"

    species = ", ".join(labels.names[:20]) + (" ..." if len(labels) > 20 else "")
    model, version, digest = info["model"], info["herbray_version"], info["weights_sha256"]
    height, width = info["input_shape"]
    return f"""# herbray model card

- **Model**: {model} (herbray {version}), weights sha256 `{digest}`
- **Task**: species identification of whole digitized herbarium sheets, {len(labels)} species
- **Input**: RGB sheet resized to {height} x {width} px (height x width)
- **Start**: {config.get("weights", "imagenet")} weights, {config.get("epochs")} epochs
- **Training data**: {config.get("shards")} ({sum(labels.counts)} labelled images)
- **Created**: {info["created"]}

## Results

| split | top-1 | top-5 | macro-F1 |
|---|---|---|---|
| validation | {fmt("val_top1")} | {fmt("val_top5")} | {fmt("val_macro_f1")} |
| test | {fmt("test_top1")} | {fmt("test_top5")} | {fmt("test_macro_f1")} |

## Species

{species}

## Intended use and limits

Suggestions for curators, to be verified: identifications go into
`identificationVerificationStatus` as unverified. The model only knows the
species above; a sheet of any other species still gets one of them, which a
confidence threshold (see `herbray evaluate`) turns into `uncertain`. Accuracy
on sheets from collectors or herbaria absent from the training data is usually
lower than on the validation split.
"""


def open_bundle(root: str) -> Bundle:
    """Read a bundle's description and species (cheap: no weights, no model)."""
    root = root.rstrip("/")
    marker = storage.join(root, "bundle.json")
    if not storage.exists(marker):
        raise FileNotFoundError(
            f"{marker} not found: {root} is not a herbray model bundle (train writes one with "
            "herbray train --output)"
        )
    info = json.loads(storage.read_text(marker))
    if info.get("format") != BUNDLE_FORMAT:
        raise ValueError(f"{marker} is not a herbray model bundle (format {info.get('format')!r})")
    labels = LabelMap.load(storage.join(root, "labels.json"))
    if len(labels) != info["num_classes"]:
        raise ValueError(
            f"{root}: labels.json has {len(labels)} species but the model has {info['num_classes']}"
        )
    return Bundle(root=root, info=info, labels=labels, model=None)


def load_bundle(root: str, device: str = "cpu") -> Bundle:
    """Load a bundle folder (local or ``s3://``) and build its model in eval mode."""
    import torch

    from herbray import models

    bundle = open_bundle(root)
    root, info, labels = bundle.root, bundle.info, bundle.labels
    weights_uri = storage.join(root, info.get("weights", WEIGHTS_FILE))
    data = storage.read_bytes(weights_uri)
    digest = sha256_bytes(data)
    if digest != info["weights_sha256"]:
        raise ValueError(
            f"{weights_uri}: sha256 {digest[:12]}... does not match bundle.json "
            f"({info['weights_sha256'][:12]}...); the weights file was changed or is incomplete"
        )
    import safetensors.torch

    try:
        state = safetensors.torch.load(data)
    except Exception as exc:  # safetensors raises its own error types for a bad header
        raise ValueError(
            f"{storage.redact(weights_uri)} is not a valid safetensors file: {exc}"
        ) from exc
    # The architecture alone: the bundle's weights replace every tensor below.
    model = models.get_spec(info["model"]).builder(len(labels))
    missing, unexpected = model.load_state_dict(state, strict=False)
    problems = [k for k in missing if not k.endswith("num_batches_tracked")] + list(unexpected)
    if problems:
        raise ValueError(f"{weights_uri}: weights do not fit {info['model']}: {problems[:10]}")
    model = model.to(device).eval().to(memory_format=torch.channels_last)
    return Bundle(root=root, info=info, labels=labels, model=model, device=device)
