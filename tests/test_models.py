"""Tests of herbray.models: registry builds, packaged ImageNet weights, weights files."""

from __future__ import annotations

import logging
import os
import pickle

import pytest
import safetensors.torch
import torch
import torchvision
from torch import nn

from herbray import models

torch.set_num_threads(2)

NUM_CLASSES = 3


def _eval_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


@pytest.fixture(scope="module")
def image_batch() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(1, 3, 224, 224, generator=generator)


# ---------------------------------------------------------------------------
# Registry


@pytest.mark.parametrize("name", models.model_names())
def test_registry_model_forward_shape(name, image_batch):
    model = models.create_model(name, NUM_CLASSES, weights=None)
    logits = _eval_logits(model, image_batch)
    assert logits.shape == (1, NUM_CLASSES)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", models.model_names())
def test_channels_last_forward_matches(name, image_batch):
    model = models.create_model(name, NUM_CLASSES, weights=None).eval()
    expected = _eval_logits(model, image_batch)
    model = model.to(memory_format=torch.channels_last)
    logits = _eval_logits(model, image_batch.contiguous(memory_format=torch.channels_last))
    assert logits.shape == (1, NUM_CLASSES)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def test_registry_entries_are_complete():
    assert models.DEFAULT_MODEL == "efficientnet_lite0"
    expected = {
        "efficientnet_lite0",
        "mobilenet_v3_large",
        "resnet50",
        "googlenet",
        "googlenet_lrn",
        "test_tiny",
    }
    assert expected <= set(models.MODELS)
    for name, spec in models.MODELS.items():
        assert spec.name == name
        assert spec.description
        assert len(spec.mean) == 3
        assert len(spec.std) == 3
        assert all(s > 0 for s in spec.std)
    with_weights = [n for n, s in models.MODELS.items() if s.has_offline_imagenet_weights]
    assert with_weights == ["efficientnet_lite0"]


def test_unknown_name_lists_choices():
    with pytest.raises(ValueError, match="unknown model 'vgg16'") as info:
        models.create_model("vgg16", NUM_CLASSES, weights=None)
    for name in models.model_names():
        assert name in str(info.value)


def test_preprocessing_of_lite0_and_resnet():
    lite0 = models.preprocessing("efficientnet_lite0")
    assert lite0.mean == (0.5, 0.5, 0.5)
    assert lite0.std == (0.5, 0.5, 0.5)
    assert lite0.input_size == 224
    assert lite0.interpolation == "bicubic"
    resnet = models.preprocessing("resnet50")
    assert resnet.mean == models.IMAGENET_MEAN
    assert resnet.std == models.IMAGENET_STD
    assert resnet.to_dict()["mean"] == list(models.IMAGENET_MEAN)
    with pytest.raises(ValueError, match="unknown model"):
        models.preprocessing("nope")


@pytest.mark.parametrize("num_classes", [0, -2, 2.5, True, "3"])
def test_invalid_num_classes_raises(num_classes):
    with pytest.raises(ValueError, match="num_classes"):
        models.create_model("test_tiny", num_classes, weights=None)


def test_imagenet_without_offline_weights_raises():
    with pytest.raises(ValueError, match="pass weights=") as info:
        models.create_model("resnet50", NUM_CLASSES)
    assert "efficientnet_lite0" in str(info.value)


def test_random_init_logs_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="herbray.models"):
        models.create_model("test_tiny", NUM_CLASSES, weights=None)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "random init" in warnings[0].getMessage()
    assert "test_tiny" in warnings[0].getMessage()


# ---------------------------------------------------------------------------
# Packaged ImageNet weights of EfficientNet-Lite0


def _expected_timm_key(source_key: str) -> str:
    """Independent re-statement of the renaming, written out block by block."""
    # flat block index -> "stage.index" for stage depths 1, 2, 2, 3, 3, 4, 1
    positions = [
        f"{stage}.{index}"
        for stage, depth in enumerate((1, 2, 2, 3, 3, 4, 1))
        for index in range(depth)
    ]
    top = {
        "_conv_stem": "conv_stem",
        "_bn0": "bn1",
        "_conv_head": "conv_head",
        "_bn1": "bn2",
        "_fc": "classifier",
    }
    parts = source_key.split(".")
    if parts[0] != "_blocks":
        return ".".join([top[parts[0]], *parts[1:]])
    flat, module, tensor = int(parts[1]), parts[2], parts[3]
    if flat == 0:
        renames = {
            "_depthwise_conv": "conv_dw",
            "_bn1": "bn1",
            "_project_conv": "conv_pw",
            "_bn2": "bn2",
        }
    else:
        renames = {
            "_expand_conv": "conv_pw",
            "_bn0": "bn1",
            "_depthwise_conv": "conv_dw",
            "_bn1": "bn2",
            "_project_conv": "conv_pwl",
            "_bn2": "bn3",
        }
    return f"blocks.{positions[flat]}.{renames[module]}.{tensor}"


def test_lite0_imagenet_tensors_equal_source():
    source = torch.load(models.lite0_weights_path(), map_location="cpu", weights_only=True)
    model = models.create_model("efficientnet_lite0", 5)
    loaded = model.state_dict()

    checked = 0
    for key, tensor in source.items():
        target = _expected_timm_key(key)
        assert models.lite0_timm_key(key) == target
        if target.startswith("classifier."):
            continue
        assert torch.equal(loaded[target], tensor), target
        checked += 1
    # The source has 296 tensors, 49 of them batch-norm counters. All are compared
    # except the 2 of the ImageNet classifier, which the 5-class model replaces.
    assert len(source) == 296
    assert checked == 294
    assert loaded["classifier.weight"].shape == (5, 1280)


def test_lite0_imagenet_state_dict_covers_timm_model():
    import timm

    state = models.lite0_imagenet_state_dict()
    reference = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    result = reference.load_state_dict(state, strict=True)
    assert not result.missing_keys
    assert not result.unexpected_keys


def test_lite0_timm_key_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unexpected key"):
        models.lite0_timm_key("_blocks.3._se_reduce.weight")
    with pytest.raises(ValueError, match="out of range"):
        models.lite0_timm_key("_blocks.16._bn0.weight")


# ---------------------------------------------------------------------------
# User weights files


def test_safetensors_roundtrip_same_outputs(tmp_path, image_batch):
    source = models.create_model("efficientnet_lite0", NUM_CLASSES)
    path = tmp_path / "model.safetensors"
    models.save_weights(source, path, metadata={"model": "efficientnet_lite0"})

    loaded = models.create_model("efficientnet_lite0", NUM_CLASSES, weights=path)
    torch.testing.assert_close(
        _eval_logits(loaded, image_batch), _eval_logits(source, image_batch), rtol=0, atol=0
    )
    with safetensors.safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == {"model": "efficientnet_lite0"}


def test_pt_wrapper_and_module_prefix_load(tmp_path, image_batch):
    source = models.create_model("googlenet_lrn", NUM_CLASSES, weights=None)
    wrapped = {
        "epoch": 4,
        "state_dict": {f"module.{k}": v for k, v in source.state_dict().items()},
    }
    path = tmp_path / "checkpoint.pth"
    torch.save(wrapped, path)

    loaded = models.create_model("googlenet_lrn", NUM_CLASSES, weights=str(path))
    torch.testing.assert_close(
        _eval_logits(loaded, image_batch), _eval_logits(source, image_batch), rtol=0, atol=0
    )


def test_model_wrapper_key_loads(tmp_path):
    source = models.create_model("test_tiny", NUM_CLASSES, weights=None)
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": source.state_dict(), "optimizer_step": 10}, path)
    state = models.load_state_dict_file(path)
    assert state.keys() == source.state_dict().keys()


def test_other_class_count_drops_head(tmp_path, caplog):
    source = models.create_model("test_tiny", NUM_CLASSES, weights=None)
    path = tmp_path / "three.safetensors"
    models.save_weights(source, path)

    with caplog.at_level(logging.WARNING, logger="herbray.models"):
        model = models.create_model("test_tiny", 7, weights=path)
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "classifier.weight" in messages
    assert "classifier.bias" in messages

    loaded = model.state_dict()
    assert loaded["classifier.weight"].shape == (7, source.classifier.in_features)
    for key, tensor in source.state_dict().items():
        if not key.startswith("classifier."):
            assert torch.equal(loaded[key], tensor), key


def test_strict_head_rejects_other_class_count(tmp_path):
    path = tmp_path / "three.safetensors"
    models.save_weights(models.create_model("test_tiny", NUM_CLASSES, weights=None), path)
    with pytest.raises(ValueError, match="classifier head does not match"):
        models.create_model("test_tiny", 7, weights=path, strict_head=True)


def test_wrong_architecture_file_raises(tmp_path):
    path = tmp_path / "tiny.safetensors"
    models.save_weights(models.create_model("test_tiny", NUM_CLASSES, weights=None), path)
    with pytest.raises(ValueError, match="do not fit model resnet50") as info:
        models.create_model("resnet50", NUM_CLASSES, weights=path)
    assert "missing keys" in str(info.value)
    assert "unexpected keys" in str(info.value)


def test_extra_and_misshaped_keys_raise(tmp_path):
    state = models.create_model("test_tiny", NUM_CLASSES, weights=None).state_dict()
    extra = dict(state, **{"extra.weight": torch.zeros(2)})
    extra_path = tmp_path / "extra.safetensors"
    safetensors.torch.save_file(extra, str(extra_path))
    with pytest.raises(ValueError, match=r"unexpected keys \(1\): extra.weight"):
        models.create_model("test_tiny", NUM_CLASSES, weights=extra_path)

    misshaped = dict(state)
    misshaped["conv_stem.weight"] = torch.zeros(1, 1, 1, 1)
    misshaped_path = tmp_path / "misshaped.safetensors"
    safetensors.torch.save_file(misshaped, str(misshaped_path))
    with pytest.raises(ValueError, match="shape mismatches .*conv_stem.weight"):
        models.create_model("test_tiny", NUM_CLASSES, weights=misshaped_path)


def test_missing_batchnorm_counters_tolerated(tmp_path):
    source = models.create_model("test_tiny", NUM_CLASSES, weights=None)
    state = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "no-counters.pt"
    torch.save(state, path)
    model = models.create_model("test_tiny", NUM_CLASSES, weights=path)
    assert torch.equal(model.state_dict()["conv_stem.weight"], state["conv_stem.weight"])


def test_googlenet_file_with_aux_classifiers_loads(tmp_path, image_batch):
    # torchvision's ImageNet GoogLeNet file keeps aux1/aux2; the registry model has none.
    torch.manual_seed(0)
    source = torchvision.models.googlenet(
        weights=None, num_classes=1000, aux_logits=True, transform_input=True, init_weights=True
    )
    path = tmp_path / "googlenet.pth"
    torch.save(source.state_dict(), path)

    model = models.create_model("googlenet", 1000, weights=path)
    assert model.aux1 is None
    torch.testing.assert_close(
        _eval_logits(model, image_batch), _eval_logits(source, image_batch), rtol=0, atol=0
    )


# ---------------------------------------------------------------------------
# load_state_dict_file safety


class _RunsShellOnUnpickle:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_rejected(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pth"
    torch.save({"conv.weight": torch.zeros(1), "payload": _RunsShellOnUnpickle(str(marker))}, path)

    with pytest.raises(ValueError, match="rejected") as info:
        models.load_state_dict_file(path)
    assert "system" in str(info.value)
    assert "weights_only=False" not in str(info.value)
    assert not marker.exists()

    with pytest.raises(ValueError, match="rejected"):
        models.create_model("test_tiny", NUM_CLASSES, weights=path)
    assert not marker.exists()


# torch warns that the plain pickle uses a newer protocol than torch.save writes.
@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_plain_pickle_rejected(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as handle:
        pickle.dump(_RunsShellOnUnpickle(str(marker)), handle)
    with pytest.raises(ValueError, match="rejected"):
        models.load_state_dict_file(path)
    assert not marker.exists()


def test_whole_module_pickle_rejected(tmp_path):
    path = tmp_path / "module.pt"
    torch.save(nn.Linear(2, 2), path)
    with pytest.raises(ValueError, match="rejected.*Linear"):
        models.load_state_dict_file(path)


def test_load_state_dict_file_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.pt"):
        models.load_state_dict_file(tmp_path / "absent.pt")

    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"onnx")
    with pytest.raises(ValueError, match=r"unsupported weights file suffix '.onnx'"):
        models.load_state_dict_file(onnx)

    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        models.load_state_dict_file(broken)

    not_a_dict = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), not_a_dict)
    with pytest.raises(ValueError, match="does not contain a state dict"):
        models.load_state_dict_file(not_a_dict)

    mixed = tmp_path / "mixed.pt"
    torch.save({"weight": torch.zeros(1), "note": "hello"}, mixed)
    with pytest.raises(ValueError, match="not tensors: note"):
        models.load_state_dict_file(mixed)


def test_save_weights_requires_safetensors_suffix(tmp_path):
    model = models.create_model("test_tiny", NUM_CLASSES, weights=None)
    with pytest.raises(ValueError, match=".safetensors"):
        models.save_weights(model, tmp_path / "model.pt")


def test_save_weights_of_channels_last_model(tmp_path, image_batch):
    model = models.create_model("test_tiny", NUM_CLASSES, weights=None)
    model = model.to(memory_format=torch.channels_last)
    path = tmp_path / "cl.safetensors"
    models.save_weights(model, path)
    loaded = models.create_model("test_tiny", NUM_CLASSES, weights=path)
    torch.testing.assert_close(
        _eval_logits(loaded, image_batch), _eval_logits(model, image_batch), rtol=1e-5, atol=1e-5
    )


# ---------------------------------------------------------------------------
# Parameter groups


@pytest.mark.parametrize("name", models.model_names())
def test_classifier_and_backbone_partition(name):
    model = models.create_model(name, NUM_CLASSES, weights=None)
    head = models.classifier_parameters(model)
    backbone = models.backbone_parameters(model)

    assert [tuple(p.shape)[0] for p in head] == [NUM_CLASSES, NUM_CLASSES]
    head_ids = {id(p) for p in head}
    backbone_ids = {id(p) for p in backbone}
    assert not head_ids & backbone_ids
    assert head_ids | backbone_ids == {id(p) for p in model.parameters()}


def test_parameter_groups_through_compile_wrapper():
    model = models.create_model("test_tiny", NUM_CLASSES, weights=None)
    compiled = torch.compile(model)
    assert models.classifier_parameters(compiled)[0] is model.classifier.weight
    assert len(models.backbone_parameters(compiled)) == len(list(model.parameters())) - 2


def test_parameter_groups_need_registry_model():
    with pytest.raises(ValueError, match="not built by herbray.models.create_model"):
        models.classifier_parameters(nn.Linear(2, 2))


# ---------------------------------------------------------------------------
# The original GoogLeNet


def test_googlenet_lrn_layers_match_bvlc():
    model = models.create_model("googlenet_lrn", NUM_CLASSES, weights=None)
    norms = [m for m in model.modules() if isinstance(m, nn.LocalResponseNorm)]
    assert [(m.size, m.alpha, m.beta, m.k) for m in norms] == [(5, 1e-4, 0.75, 1.0)] * 2
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert model.dropout.p == 0.4
    assert model.inception_3a.branch5x5[1][0].kernel_size == (5, 5)
    assert model.conv1[0].bias.detach().eq(0.2).all()

    # Spatial sizes as in the BVLC model at 224 px: 56 after pool1, 28, 14, 7.
    sizes = {}
    for name in ("norm1", "pool2", "pool3", "pool4", "inception_5b"):
        getattr(model, name).register_forward_hook(
            lambda module, args, output, name=name: sizes.__setitem__(name, tuple(output.shape))
        )
    _eval_logits(model, torch.zeros(1, 3, 224, 224))
    assert sizes == {
        "norm1": (1, 64, 56, 56),
        "pool2": (1, 192, 28, 28),
        "pool3": (1, 480, 14, 14),
        "pool4": (1, 832, 7, 7),
        "inception_5b": (1, 1024, 7, 7),
    }
