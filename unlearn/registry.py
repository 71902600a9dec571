"""One registry of unlearning methods (OpenUnlearning style: a method is one small class registered by name, with its
own defaults), plus named aliases that resolve to (base method, gradient-mask add-on, hyper-parameter overrides)."""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch

from utils import UserError

METHODS: dict[str, type["UnlearnMethod"]] = {}
ALIASES: dict[str, "Alias"] = {}


@dataclass
class UnlearnContext:
    """Everything a method may use. Plain values only: no argparse namespace, no tracking client."""

    model: torch.nn.Module                           # the model being unlearned (changed in place)
    data: Any                                        # dataset.SplitData (forget / retain / val / test loaders)
    generator: torch.Generator                       # run-owned randomness (shuffles, random labels)
    hp: dict[str, Any]                               # resolved hyper-parameters (method defaults + user overrides)
    model_factory: Callable[[], torch.nn.Module] | None = None  # fresh, seeded initialisation (Retrain)
    train_recipe: Any = None                         # training.TrainRecipe of the original model (Retrain)
    retrain_seed: int = 1                            # seed of Retrain's shuffles (the original run's --seed)
    artifacts_dir: Any = None                        # where a method may save artefacts (SalUn mask)
    progress: bool = True
    log: Callable[[str], None] = print

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def num_classes(self) -> int:
        return self.data.num_classes


class UnlearnMethod:
    """Base class. Subclasses set `name`, `defaults` and implement `run_epoch`; `setup`/`finish` are optional.

    The shared driver (`unlearn.driver.run_unlearning`) times the calls, checks for divergence and reports per epoch.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {"lr": 0.01, "epochs": 10}
    dataset_defaults: ClassVar[dict[str, dict[str, Any]]] = {}  # dataset name -> values that replace `defaults` there
    one_shot: ClassVar[bool] = False          # a single pass, not epochs (IU, FF, SSD, raw)
    supports_grad_mask: ClassVar[bool] = False  # a bi-objective base that the mask add-ons can be applied to
    mask_unsupported_reason: ClassVar[str] = "it is not a bi-objective method"

    def __init__(self, ctx: UnlearnContext):
        self.ctx = ctx
        self.model = ctx.model
        self.hp = ctx.hp

    def setup(self) -> None:
        """Work done once before the first epoch (counted in RTE)."""

    def run_epoch(self, epoch: int) -> dict[str, float]:
        """One epoch (1-based); returns statistics such as {"loss": ...}."""
        raise NotImplementedError(f"{type(self).__name__} must implement run_epoch")

    def finish(self) -> None:
        """Work done once after the last epoch (counted in RTE)."""

    def evaluation_model(self) -> torch.nn.Module:
        """The model to evaluate between epochs (BE evaluates without its shadow class)."""
        return self.model


def register_method(cls: type[UnlearnMethod]) -> type[UnlearnMethod]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in METHODS or cls.name in ALIASES:
        raise ValueError(f"method name '{cls.name}' registered twice")
    METHODS[cls.name] = cls
    return cls


@dataclass(frozen=True)
class Alias:
    name: str
    base: str
    grad_mask: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    summary: str = ""


def register_alias(name: str, base: str, grad_mask: str | None = None, summary: str = "", **overrides) -> None:
    if name in METHODS or name in ALIASES:
        raise ValueError(f"method name '{name}' registered twice")
    ALIASES[name] = Alias(name, base, grad_mask, dict(overrides), summary)


def list_methods(include_aliases: bool = True) -> list[str]:
    names = set(METHODS) | (set(ALIASES) if include_aliases else set())
    return sorted(names, key=str.lower)


def match_methods(patterns: list[str]) -> list[str]:
    """Names matching any of the given names or glob patterns, in registry order; unknown patterns are an error."""
    names = list_methods()
    chosen: list[str] = []
    for pattern in patterns:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise UserError(f"no method matches '{pattern}'; registered: {', '.join(names)}")
        chosen += [h for h in hits if h not in chosen]
    return chosen


@dataclass(frozen=True)
class ResolvedMethod:
    name: str                     # what the user asked for (used in file names)
    cls: type[UnlearnMethod]
    grad_mask: str | None
    overrides: dict[str, Any]

    @property
    def label(self) -> str:
        mask = f"+{self.grad_mask}" if self.grad_mask and self.grad_mask != "none" else ""
        return f"{self.cls.name}{mask}"


def resolve_method(name: str, grad_mask: str | None = None) -> ResolvedMethod:
    """Name (or alias) and optional add-on -> the class to run. Errors are one line and list what is allowed."""
    if name in ALIASES:
        alias = ALIASES[name]
        if grad_mask not in (None, alias.grad_mask):
            raise UserError(f"--unlearn {name} already means {alias.base} with --grad_mask {alias.grad_mask}; "
                            f"use --unlearn {alias.base} --grad_mask {grad_mask} instead")
        cls, mask, overrides = METHODS[alias.base], alias.grad_mask, dict(alias.overrides)
    elif name in METHODS:
        cls, mask, overrides = METHODS[name], grad_mask, {}
    else:
        raise UserError(f"unknown method '{name}'; registered: {', '.join(list_methods())}")
    if mask not in (None, "none") and not cls.supports_grad_mask:
        raise UserError(f"--grad_mask {mask} cannot be applied to {cls.name}: {cls.mask_unsupported_reason}; "
                        f"add-ons apply to bi-objective bases ({', '.join(n for n, c in METHODS.items() if c.supports_grad_mask)})")
    return ResolvedMethod(name=name, cls=cls, grad_mask=mask, overrides=overrides)


def resolve_hyperparameters(method: ResolvedMethod, user: dict[str, Any], dataset: str | None = None) -> dict[str, Any]:
    """Method defaults < the method's `dataset_defaults[dataset]` < alias overrides < explicit user values (None means
    'not given')."""
    hp = dict(method.cls.defaults)
    hp.update(getattr(method.cls, "dataset_defaults", {}).get(dataset, {}) if dataset else {})
    hp.update(method.overrides)
    hp.update({k: v for k, v in user.items() if v is not None})
    if method.grad_mask is not None:
        hp["grad_mask"] = method.grad_mask
    return hp
