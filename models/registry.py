"""Model registry (timm style): factories register under their function name; `create_model` builds by name.

Kept separate from `models/__init__.py` so that the architecture modules can import `register_model` without a cycle.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch.nn as nn

from utils import UserError

ModelFactory = Callable[..., nn.Module]

MODEL_REGISTRY: dict[str, ModelFactory] = {}


class ModelConfigError(UserError, ValueError):
    """Bad model arguments. A UserError so entry scripts report it as one line (exit 2); a ValueError for callers
    that treat it as an ordinary bad-value error."""


def register_model(factory: ModelFactory) -> ModelFactory:
    """Register `factory` under its `__name__`. It is called as
    `factory(num_classes=, in_channels=, width=, mean=, std=)` with already validated values (width may be None)."""
    name = factory.__name__
    if name in MODEL_REGISTRY:
        raise ModelConfigError(f"model '{name}' is already registered; choose another name")
    MODEL_REGISTRY[name] = factory
    return factory


def list_models() -> list[str]:
    """Sorted names of every registered architecture."""
    return sorted(MODEL_REGISTRY)


def _is_int(value) -> bool:
    # bool is an int subclass, but `width=True` is certainly a mistake.
    return isinstance(value, int) and not isinstance(value, bool)


def create_model(
    arch: str,
    num_classes: int,
    in_channels: int = 3,
    width: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> nn.Module:
    """Build a registered model. Initialisation draws from the global torch RNG, so it is reproducible under
    `torch.manual_seed`. `mean`/`std` (length `in_channels`) are the dataset's normalisation constants; the model
    normalises its [0, 1] input itself (defaults: mean 0, std 1)."""
    if arch not in MODEL_REGISTRY:
        raise ModelConfigError(f"unknown arch '{arch}'; available: {', '.join(list_models())}")
    if not _is_int(num_classes) or num_classes < 2:
        raise ModelConfigError(f"num_classes must be an int >= 2; got {num_classes!r}")
    if not _is_int(in_channels) or in_channels < 1:
        raise ModelConfigError(f"in_channels must be an int >= 1; got {in_channels!r}")
    if width is not None and (not _is_int(width) or width < 1):
        raise ModelConfigError(f"width must be a positive int (or omitted for the architecture's default); "
                               f"got {width!r}")
    return MODEL_REGISTRY[arch](num_classes=num_classes, in_channels=in_channels, width=width, mean=mean, std=std)
