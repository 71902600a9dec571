"""Tests for the model registry (`models/`). Every registered architecture is exercised through `list_models()`."""
import os
import sys

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import models  # noqa: E402
from models import (  # noqa: E402
    MODEL_REGISTRY,
    ModelConfigError,
    Normalize,
    count_parameters,
    create_model,
    get_classifier,
    list_models,
    register_model,
    set_classifier,
)

SMALL_WIDTH = 8
ALL_ARCHS = list_models()
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def _small(arch, num_classes=10, in_channels=3, **kwargs):
    torch.manual_seed(0)
    return create_model(arch, num_classes, in_channels=in_channels, width=SMALL_WIDTH, **kwargs)


def test_registry_lists_expected_archs_sorted():
    assert ALL_ARCHS == sorted(ALL_ARCHS)
    assert {"resnet18", "resnet50", "resnet20s", "vgg16_bn"} <= set(ALL_ARCHS)
    assert set(ALL_ARCHS) == set(MODEL_REGISTRY)


@pytest.mark.parametrize("arch", ALL_ARCHS)
@pytest.mark.parametrize(
    "in_channels,size,num_classes",
    [(1, 8, 10), (3, 32, 100)],
    ids=["digits-1x8x8-10", "cifar-3x32x32-100"],
)
def test_forward_backward_shapes_and_finite_grads(arch, in_channels, size, num_classes):
    model = _small(arch, num_classes, in_channels)
    model.train()
    x = torch.rand(2, in_channels, size, size)
    logits = model(x)
    assert logits.shape == (2, num_classes)
    assert torch.isfinite(logits).all()
    loss = nn.functional.cross_entropy(logits, torch.tensor([0, num_classes - 1]))
    loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, f"{arch}: no gradient for {name}"
        assert torch.isfinite(parameter.grad).all(), f"{arch}: non-finite gradient for {name}"
    # Eval mode (running BN statistics) must work on the same sizes too.
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (2, num_classes)


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_odd_spatial_size_is_accepted(arch):
    model = _small(arch, 10, 3).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 3, 11, 13)).shape == (1, 10)


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_normalize_is_first_module_and_in_state_dict(arch):
    model = _small(arch, 10, 3, mean=CIFAR10_MEAN, std=CIFAR10_STD)
    first_name, first_module = next(iter(model.named_children()))
    assert first_name == "normalize"
    assert isinstance(first_module, Normalize)
    state = model.state_dict()
    assert torch.allclose(state["normalize.mean"], torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1))
    assert torch.allclose(state["normalize.std"], torch.tensor(CIFAR10_STD).view(1, 3, 1, 1))
    # Buffers, not parameters: unlearning masks and optimisers must never touch them.
    assert not any(name.startswith("normalize.") for name, _ in model.named_parameters())


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_normalize_defaults_are_identity(arch):
    model = _small(arch, 10, 2)
    assert torch.equal(model.normalize.mean, torch.zeros(1, 2, 1, 1))
    assert torch.equal(model.normalize.std, torch.ones(1, 2, 1, 1))


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_normalize_is_applied_first_in_forward(arch):
    plain = _small(arch, 10, 3).eval()
    normalised = _small(arch, 10, 3, mean=CIFAR10_MEAN, std=CIFAR10_STD).eval()
    # Same seed, so the weights are identical; only the normalisation buffers differ.
    for key, value in plain.state_dict().items():
        if not key.startswith("normalize."):
            assert torch.equal(value, normalised.state_dict()[key])
    x = torch.rand(2, 3, 16, 16)
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        out = normalised(x)
        scale = out.abs().max()  # VGG's N(0, 0.01) head gives tiny logits: compare relative to their size
        assert (out - plain(x)).abs().max() > 1e-2 * scale, "changing mean/std must change the output"
        assert (out - plain((x - mean) / std)).abs().max() <= 1e-4 * scale


def test_normalize_rejects_bad_constants_and_inputs():
    with pytest.raises(ValueError, match="mean needs 3 values"):
        create_model("resnet20s", 10, in_channels=3, width=4, mean=(0.5, 0.5))
    with pytest.raises(ValueError, match="std values must be > 0"):
        create_model("resnet20s", 10, in_channels=1, width=4, std=(0.0,))
    with pytest.raises(ValueError, match="finite"):
        Normalize(1, mean=(float("nan"),))
    model = _small("resnet20s", 10, 3)
    with pytest.raises(ValueError, match=r"expected input shaped \(N, 3, H, W\)"):
        model(torch.rand(2, 1, 8, 8))


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_get_set_classifier_round_trip(arch):
    num_classes = 5
    model = _small(arch, num_classes, 3).eval()
    x = torch.rand(3, 3, 8, 8)
    with torch.no_grad():
        before = model(x)
    original = get_classifier(model)
    assert isinstance(original, nn.Linear)
    assert original.out_features == num_classes
    # It really is the layer that produces the logits: the last Linear in module order.
    last_linear = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    assert original is last_linear

    # Boundary expanding: one extra "shadow" class, old rows copied.
    expanded = nn.Linear(original.in_features, num_classes + 1)
    with torch.no_grad():
        expanded.weight[:num_classes] = original.weight
        expanded.bias[:num_classes] = original.bias
    replaced = set_classifier(model, expanded)
    assert replaced is original
    assert get_classifier(model) is expanded
    assert any(m is expanded for m in model.modules())
    assert not any(m is original for m in model.modules())
    with torch.no_grad():
        widened = model(x)
    assert widened.shape == (3, num_classes + 1)
    assert torch.allclose(widened[:, :num_classes], before, atol=1e-6)
    assert any(name.endswith("weight") and p is expanded.weight for name, p in model.named_parameters())

    assert set_classifier(model, original) is expanded
    with torch.no_grad():
        assert torch.equal(model(x), before)


def test_set_classifier_rejects_mismatch():
    model = _small("resnet18", 10, 3)
    in_features = get_classifier(model).in_features
    with pytest.raises(ValueError, match="in_features"):
        set_classifier(model, nn.Linear(in_features + 1, 11))
    with pytest.raises(ValueError, match="nn.Linear"):
        set_classifier(model, nn.Conv2d(in_features, 11, 1))
    with pytest.raises(ValueError, match="neither an `fc`"):
        get_classifier(nn.Sequential(nn.Linear(2, 2)))


def test_unknown_arch_error_lists_available_names():
    from utils import UserError

    with pytest.raises(ValueError) as info:
        create_model("resnet9000", 10)
    # Entry scripts turn UserError into one line on stderr + exit 2.
    assert isinstance(info.value, UserError) and isinstance(info.value, ModelConfigError)
    message = str(info.value)
    assert "\n" not in message
    assert message == f"unknown arch 'resnet9000'; available: {', '.join(list_models())}"
    for name in list_models():
        assert name in message


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_classes=1), "num_classes must be an int >= 2"),
        (dict(num_classes=2.0), "num_classes must be an int >= 2"),
        (dict(num_classes=10, in_channels=0), "in_channels must be an int >= 1"),
        (dict(num_classes=10, width=0), "width must be a positive int"),
        (dict(num_classes=10, width=-8), "width must be a positive int"),
        (dict(num_classes=10, width=2.5), "width must be a positive int"),
        (dict(num_classes=10, width=True), "width must be a positive int"),
    ],
)
def test_invalid_arguments_raise_one_line_errors(kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        create_model("resnet20s", **kwargs)
    assert "\n" not in str(info.value)


def test_register_model_rejects_duplicate_names_and_registers_new_ones():
    with pytest.raises(ValueError, match="already registered"):

        @register_model
        def resnet18(num_classes, in_channels=3, width=None, mean=None, std=None):  # noqa: F811
            raise AssertionError("must not be called")

    @register_model
    def _test_tiny_linear(num_classes, in_channels=3, width=None, mean=None, std=None):
        return nn.Sequential(Normalize(in_channels, mean, std), nn.Flatten(), nn.LazyLinear(num_classes))

    try:
        assert "_test_tiny_linear" in list_models()
        assert isinstance(create_model("_test_tiny_linear", 3, in_channels=1)[0], Normalize)
    finally:
        del MODEL_REGISTRY["_test_tiny_linear"]
    assert "_test_tiny_linear" not in list_models()


def test_resnet18_default_parameter_count_and_cifar_stem():
    model = create_model("resnet18", 10)
    # Reference: torchvision-style CIFAR ResNet-18, 11,173,962 parameters for 10 classes.
    assert abs(count_parameters(model) - 11_173_962) <= 0.005 * 11_173_962
    assert count_parameters(model) == 11_173_962
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1) and model.conv1.bias is None
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert model.fc.in_features == 512 and model.fc.bias is not None


def test_resnet20s_default_parameter_count_and_option_a_shortcuts():
    model = create_model("resnet20s", 10)
    # He et al. report 0.27M for ResNet-20; exactly 269,722 with 10 classes.
    assert count_parameters(model) == 269_722
    # Option A shortcuts carry no parameters: only the 19 convs, their BNs and fc.
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 19 and all(c.kernel_size == (3, 3) for c in convs)
    assert model.fc.in_features == 64


def test_option_a_shortcut_subsamples_and_zero_pads():
    from models.resnet_cifar import SubsampleZeroPadShortcut

    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).view(2, 3, 5, 5)
    out = SubsampleZeroPadShortcut(3, 8, stride=2)(x)
    assert out.shape == (2, 8, 3, 3)
    # 5 new channels: 2 zero channels before the originals, 3 after.
    assert torch.equal(out[:, 2:5], x[:, :, ::2, ::2])
    assert not out[:, :2].any() and not out[:, 5:].any()


def test_resnet50_and_vgg16_bn_default_parameter_counts():
    # ResNet-50 with the CIFAR stem and a 10-class fc: 23,520,842.
    assert count_parameters(create_model("resnet50", 10)) == 23_520_842
    vgg = create_model("vgg16_bn", 10)
    conv_channels = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    inputs = [3] + conv_channels[:-1]
    expected = sum(9 * cin * cout + 2 * cout for cin, cout in zip(inputs, conv_channels))  # bias-free conv + BN
    expected += (2048 * 256 + 256) + (256 * 256 + 256) + (256 * 10 + 10)
    assert count_parameters(vgg) == expected


def test_vgg16_bn_structure():
    vgg = create_model("vgg16_bn", 10, width=16)
    pools = [m for m in vgg.modules() if isinstance(m, nn.MaxPool2d)]
    assert len(pools) == 4 and all(p.ceil_mode for p in pools)
    convs = [m for m in vgg.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 13 and all(c.bias is None for c in convs)
    assert [c.out_channels for c in convs][-1] == 128  # 512 * 16 / 64
    linears = [m for m in vgg.classifier if isinstance(m, nn.Linear)]
    assert [(lin.in_features, lin.out_features) for lin in linears] == [(512, 64), (64, 64), (64, 10)]
    assert not any(isinstance(m, nn.Dropout) for m in vgg.modules())
    for linear in linears:
        assert torch.equal(linear.bias, torch.zeros_like(linear.bias))
    # ceil_mode vs floor mode agree on 32x32 (every pooled size is even).
    floor_features = nn.Sequential(
        *[nn.MaxPool2d(2, 2) if isinstance(m, nn.MaxPool2d) else m for m in vgg.features]
    )
    x = torch.rand(1, 3, 32, 32)
    vgg.eval()
    with torch.no_grad():
        assert torch.equal(vgg.features(vgg.normalize(x)), floor_features(vgg.normalize(x)))


def test_width_scales_resnets():
    small = create_model("resnet18", 10, width=8)
    assert small.conv1.out_channels == 8 and small.fc.in_features == 64
    bottleneck = create_model("resnet50", 10, width=8)
    assert bottleneck.fc.in_features == 8 * 8 * 4
    cifar = create_model("resnet20s", 10, width=4)
    assert cifar.fc.in_features == 16


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_initialisation_is_deterministic_under_seed(arch):
    def build(seed):
        torch.manual_seed(seed)
        return create_model(arch, 10, in_channels=3, width=SMALL_WIDTH).state_dict()

    first, second, other = build(123), build(123), build(124)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_count_parameters_counts_shared_parameters_once():
    shared = nn.Linear(3, 2)
    assert count_parameters(nn.Sequential(shared, shared)) == 8
    assert models.count_parameters is count_parameters
