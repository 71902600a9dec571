"""Model registry: `create_model(arch, num_classes, ...)`, `list_models()`, `register_model`, and helpers to find and
replace a model's last Linear layer (`get_classifier`, `set_classifier`)."""
from __future__ import annotations

import torch.nn as nn

# Importing the architecture modules registers their factories.
from . import resnet as _resnet  # noqa: F401  (registers resnet18, resnet50)
from . import resnet_cifar as _resnet_cifar  # noqa: F401  (registers resnet20s)
from . import vgg as _vgg  # noqa: F401  (registers vgg16_bn)
from .normalize import Normalize
from .registry import MODEL_REGISTRY, ModelConfigError, create_model, list_models, register_model

__all__ = [
    "MODEL_REGISTRY",
    "ModelConfigError",
    "Normalize",
    "count_parameters",
    "create_model",
    "get_classifier",
    "list_models",
    "register_model",
    "set_classifier",
]


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements (shared parameters counted once; buffers such as BN statistics excluded)."""
    return sum(parameter.numel() for parameter in model.parameters())


def get_classifier(model: nn.Module) -> nn.Linear:
    """The model's last Linear layer: `model.classifier_layer()` when defined, else `model.fc`."""
    if callable(getattr(model, "classifier_layer", None)):
        layer = model.classifier_layer()
    elif isinstance(getattr(model, "fc", None), nn.Module):
        layer = model.fc
    else:
        raise ModelConfigError(f"{type(model).__name__} has neither an `fc` attribute "
                               "nor a `classifier_layer()` method")
    if not isinstance(layer, nn.Linear):
        raise ModelConfigError(f"{type(model).__name__}'s classifier is a {type(layer).__name__}, expected nn.Linear")
    return layer


def set_classifier(model: nn.Module, linear: nn.Linear) -> nn.Linear:
    """Put `linear` where `get_classifier(model)` is and return the layer it replaces. `in_features` must match;
    `out_features` may differ (boundary expanding adds a class). `linear` is moved in place to the old layer's
    device and dtype."""
    if not isinstance(linear, nn.Linear):
        raise ModelConfigError(f"set_classifier needs an nn.Linear; got {type(linear).__name__}")
    old = get_classifier(model)
    if linear.in_features != old.in_features:
        raise ModelConfigError(
            f"new classifier has in_features={linear.in_features}; the model's features have {old.in_features}"
        )
    qualified_name = next(name for name, module in model.named_modules() if module is old)
    parent_name, _, attribute = qualified_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    linear.to(device=old.weight.device, dtype=old.weight.dtype)
    setattr(parent, attribute, linear)
    return old
