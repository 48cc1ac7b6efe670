"""Image transforms for training, validation and inference, on numpy batches.

Sheets are portrait (about 2:3), so the network input keeps that shape by
default: ``height = round(input_size * aspect)`` by ``width = input_size``. The
CNNs of the registry end in global pooling, so any input shape works. Evaluation
resizes the whole sheet to the input shape (no crop, so the label block and the
plant's edges stay in view); training takes random crops of 50-100 % of the
sheet's area around the same aspect, flips them, and jitters colour a little.

The functions here run in Ray Data map stages (``train_batch``, ``eval_batch``)
and in the labeling actors (``resize_to_input``), so every stage resizes the
same way.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageEnhance

RESAMPLE = Image.Resampling.BILINEAR


@dataclass(frozen=True)
class InputShape:
    """The network's input in pixels: height and width."""

    height: int
    width: int

    @classmethod
    def from_size(cls, input_size: int, aspect: float) -> InputShape:
        return cls(height=int(round(input_size * aspect)), width=int(input_size))

    def to_list(self) -> list[int]:
        return [self.height, self.width]


def resize_to_input(image: Image.Image, shape: InputShape) -> np.ndarray:
    """Resize a whole sheet to the input shape (evaluation and labeling)."""
    if image.size != (shape.width, shape.height):
        image = image.resize((shape.width, shape.height), RESAMPLE, reducing_gap=2.0)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def random_crop_box(
    width: int, height: int, shape: InputShape, rng: np.random.Generator, scale: tuple[float, float]
) -> tuple[int, int, int, int]:
    """A crop box of ``scale`` of the area, with an aspect near the input's (+-25 %)."""
    target_ratio = shape.width / shape.height
    area = width * height
    for _ in range(10):
        crop_area = area * rng.uniform(*scale)
        ratio = target_ratio * math.exp(rng.uniform(math.log(0.8), math.log(1.25)))
        crop_w = int(round(math.sqrt(crop_area * ratio)))
        crop_h = int(round(math.sqrt(crop_area / ratio)))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            left = int(rng.integers(0, width - crop_w + 1))
            top = int(rng.integers(0, height - crop_h + 1))
            return left, top, left + crop_w, top + crop_h
    return 0, 0, width, height  # the whole sheet, when no crop fits


def augment(
    image: Image.Image,
    shape: InputShape,
    rng: np.random.Generator,
    *,
    crop_scale: tuple[float, float] = (0.5, 1.0),
    flip: bool = True,
    color_jitter: float = 0.15,
) -> np.ndarray:
    """Random crop, horizontal flip and mild brightness/contrast/saturation jitter."""
    box = random_crop_box(image.width, image.height, shape, rng, crop_scale)
    image = image.resize((shape.width, shape.height), RESAMPLE, box=box, reducing_gap=2.0)
    if flip and rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if color_jitter > 0:
        for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
            factor = float(rng.uniform(1 - color_jitter, 1 + color_jitter))
            image = enhancer(image).enhance(factor)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _open(jpeg: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(jpeg))
    image.load()
    return image


def train_batch(
    batch: dict, height: int, width: int, crop_scale: tuple[float, float], color_jitter: float
) -> dict:
    """Ray Data map stage: decode each stored JPEG and augment it.

    A new generator per batch, seeded from the OS, gives every epoch new crops,
    because Ray Data runs the map again for each pass over the dataset.
    """
    rng = np.random.default_rng()
    shape = InputShape(height, width)
    images = [
        augment(_open(data), shape, rng, crop_scale=tuple(crop_scale), color_jitter=color_jitter)
        for data in batch["image"]
    ]
    return {"image": np.stack(images), "label": np.asarray(batch["label"], dtype=np.int64)}


def eval_batch(batch: dict, height: int, width: int) -> dict:
    """Ray Data map stage: decode each stored JPEG and resize the whole sheet."""
    shape = InputShape(height, width)
    images = [resize_to_input(_open(data), shape) for data in batch["image"]]
    return {"image": np.stack(images), "label": np.asarray(batch["label"], dtype=np.int64)}


def to_model_input(images, mean, std, *, channels_last: bool = True, device=None, dtype=None):
    """Turn a uint8 N x H x W x 3 batch (numpy or torch) into a normalised float tensor."""
    import torch

    tensor = torch.as_tensor(images)
    if device is not None:
        tensor = tensor.to(device, non_blocking=True)
    tensor = tensor.permute(0, 3, 1, 2).float().div_(255.0)
    mean_t = torch.tensor(mean, dtype=tensor.dtype, device=tensor.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=tensor.dtype, device=tensor.device).view(1, 3, 1, 1)
    tensor = (tensor - mean_t) / std_t
    if dtype is not None:
        tensor = tensor.to(dtype)
    if channels_last:
        tensor = tensor.contiguous(memory_format=torch.channels_last)
    return tensor
