"""One registry of unlearning methods (OpenUnlearning style: a method is one small class registered by name, with its
own hyper-parameter declarations), plus named aliases that resolve to (base method, gradient-mask add-on,
hyper-parameter overrides).

Hyper-parameters are declared once, as `unlearn.hparams.HParam` tuples next to each method's code; this module derives
the flag table (`declared_flags`) and the values a run uses (`resolve_hyperparameters`) from them.
"""
from __future__ import annotations

import fnmatch
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from unlearn.hparams import UNSET, HParam
from unlearn.masks import addon_hparams
from utils import UserError, forward_precision

METHODS: dict[str, type[UnlearnMethod]] = {}
ALIASES: dict[str, Alias] = {}


@dataclass
class UnlearnContext:
    """Everything a method may use. Plain values only: no argparse namespace, no tracking client."""

    model: torch.nn.Module                           # the model being unlearned (changed in place)
    data: Any                                        # dataset.SplitData (forget / retain / val / test loaders)
    generator: torch.Generator                       # run-owned randomness (shuffles, random labels)
    hp: dict[str, Any]                               # resolved hyper-parameters (`resolve_hyperparameters`)
    model_factory: Callable[[], torch.nn.Module] | None = None  # fresh, seeded initialisation (Retrain)
    train_recipe: Any = None                         # training.TrainRecipe of the original model (Retrain)
    retrain_seed: int = 1                            # seed of Retrain's shuffles (the original run's --seed)
    artifacts_dir: Any = None                        # where a method may save artefacts (SalUn mask)
    progress: bool = True
    log: Callable[[str], None] = print
    paper_era: bool = False                          # run-level switch: upstream's bug-compatible behaviours
    amp: str = "off"                                 # --amp: precision of forward passes (utils.forward_precision)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def num_classes(self) -> int:
        return self.data.num_classes


class UnlearnMethod:
    """Base class. Subclasses set `name`, `hparams` and implement `run_epoch`; `setup`/`finish` are optional.

    `hparams` declares every hyper-parameter the method reads; after resolution `self.hp` holds each of them (and
    nothing else, apart from "grad_mask" on bi-objective bases), so methods read `self.hp[name]` without fallbacks.
    The shared driver (`unlearn.driver.run_unlearning`) times the calls, checks for divergence and reports per epoch.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    hparams: ClassVar[tuple[HParam, ...]] = ()
    #: flag -> why this method refuses it; giving such a flag is an error (not silently ignored).
    refused_flags: ClassVar[Mapping[str, str]] = {}
    one_shot: ClassVar[bool] = False          # a single pass, not epochs (IU, FF, SSD, raw)
    deterministic: ClassVar[bool] = False     # draws nothing at random: repeated runs give the same model
    supports_grad_mask: ClassVar[bool] = False  # a bi-objective base that the mask add-ons can be applied to
    mask_unsupported_reason: ClassVar[str] = "it is not a bi-objective method"
    #: Horizon property. False (the default) promises that epoch e of a run of E > e epochs leaves exactly the model
    #: that a fresh e-epoch run ships (finish included: `evaluation_model` between epochs is what `finish` would
    #: leave), so `benchmark.py --tune` may read the epoch count off one run's per-epoch curves. True, with a reason
    #: in `horizon_reason`, marks a method whose updates depend on the total number of epochs (a schedule over E):
    #: the tuner then makes the epoch count a dimension of its design (tests/test_horizon.py checks both).
    horizon_dependent: ClassVar[bool] = False
    horizon_reason: ClassVar[str] = ""

    def __init__(self, ctx: UnlearnContext):
        self.ctx = ctx
        self.model = ctx.model
        self.hp = ctx.hp

    @classmethod
    def check_hparams(cls, hp: Mapping[str, Any]) -> None:
        """Rules that involve several resolved values (or the file system); raise UserError. Runs before any work."""

    def setup(self) -> None:
        """Work done once before the first epoch (counted in RTE)."""

    def run_epoch(self, epoch: int) -> dict[str, float]:
        """One epoch (1-based); returns statistics such as {"loss": ...}."""
        raise NotImplementedError(f"{type(self).__name__} must implement run_epoch")

    def finish(self) -> None:
        """Work done once after the last epoch (counted in RTE)."""

    def autocast(self):
        """Context for a forward pass and its loss under the run's `--amp` (a null context when it is off), in the
        training steps and in the forward passes of gradient statistics (`unlearn.common.accumulate_gradients`).

        Backward passes and optimiser steps stay outside it: they work on float32 parameters and gradients, and
        autocast is meant for forward computations only.
        """
        return forward_precision(self.ctx.amp, self.ctx.device)

    def evaluation_model(self) -> torch.nn.Module:
        """The model to evaluate between epochs (BE evaluates without its shadow class)."""
        return self.model


# ---------------------------------------------------------------------------------------------------------------------
# Declarations: consistency across methods
# ---------------------------------------------------------------------------------------------------------------------

def _every_declaration(cls: type[UnlearnMethod]) -> tuple[HParam, ...]:
    """The class's own hyper-parameters plus, for bi-objective bases, those of every add-on mode."""
    return tuple(cls.hparams) + (addon_hparams() if cls.supports_grad_mask else ())


def _signature(hp: HParam) -> tuple:
    """What two declarations of one flag must share (defaults, ranges and help may differ per method)."""
    return (hp.name, hp.kind, hp.choices, hp.options, hp.nullable)


def _check_declarations(cls: type[UnlearnMethod]) -> None:
    own = tuple(cls.hparams)
    for attribute in ("name", "flag"):
        values = [getattr(hp, attribute) for hp in own]
        twice = sorted({v for v in values if values.count(v) > 1})
        if twice:
            raise ValueError(f"{cls.__name__} declares the hyper-parameter {attribute} {', '.join(twice)} twice")
    known = declared_flags()
    option_owner = {option: flag for flag, hp in known.items() for option in hp.options}
    for hp in _every_declaration(cls):
        if not isinstance(hp, HParam):
            raise ValueError(f"{cls.__name__}.hparams holds {hp!r}, not an HParam")
        other = known.get(hp.flag)
        if other is not None and _signature(other) != _signature(hp):
            raise ValueError(f"{cls.__name__} declares flag '{hp.flag}' as (name, kind, choices, options, nullable) "
                             f"{_signature(hp)}, another method as {_signature(other)}; one flag has one meaning")
        for option in hp.options:
            if option_owner.get(option, hp.flag) != hp.flag:
                raise ValueError(f"{cls.__name__}: option {option} of '{hp.flag}' already belongs to "
                                 f"'{option_owner[option]}'")


def register_method(cls: type[UnlearnMethod]) -> type[UnlearnMethod]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in METHODS or cls.name in ALIASES:
        raise ValueError(f"method name '{cls.name}' registered twice")
    _check_declarations(cls)
    if cls.horizon_dependent and (cls.one_shot or not cls.horizon_reason):
        raise ValueError(f"{cls.__name__}: a horizon-dependent method runs epochs and says why (horizon_reason)")
    METHODS[cls.name] = cls
    return cls


def declared_flags() -> dict[str, HParam]:
    """Flag (argparse dest and config-file key) -> its declaration, over every registered method and the mask add-ons,
    in registration order. Defaults and ranges may differ per method: the returned HParam carries the first
    declaration's, with the help texts of all declarations joined, so the CLI should default to None ("not given")."""
    merged: dict[str, HParam] = {}
    helps: dict[str, list[str]] = {}
    for cls in METHODS.values():
        for hp in _every_declaration(cls):
            merged.setdefault(hp.flag, hp)
            texts = helps.setdefault(hp.flag, [])
            if hp.help not in texts:
                texts.append(hp.help)
    return {flag: hp if len(helps[flag]) == 1 else hp.replace(help="; ".join(helps[flag]))
            for flag, hp in merged.items()}


@functools.lru_cache(maxsize=1)
def method_flags() -> dict[str, str]:
    """The method hyper-parameter flags (config-file keys) -> hyper-parameter names, from the declarations. Cached:
    a sweep asks once per flag of every cell, after every method has been registered (importing `unlearn`)."""
    return {flag: hp.name for flag, hp in declared_flags().items()}


# ---------------------------------------------------------------------------------------------------------------------
# Aliases and resolution
# ---------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Alias:
    name: str
    base: str
    grad_mask: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)   # hp name -> value
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
    overrides: dict[str, Any]     # the alias's hp name -> value

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
                        f"add-ons apply to bi-objective bases "
                        f"({', '.join(n for n, c in METHODS.items() if c.supports_grad_mask)})")
    if cls.supports_grad_mask:
        addon_hparams(mask or "none")  # an unknown mode is a one-line error here, before any work
    return ResolvedMethod(name=name, cls=cls, grad_mask=mask, overrides=overrides)


def method_hparams(method: ResolvedMethod) -> tuple[HParam, ...]:
    """The hyper-parameters this configuration uses: the base's, plus its add-on mode's."""
    extra = addon_hparams(method.grad_mask or "none") if method.cls.supports_grad_mask else ()
    return tuple(method.cls.hparams) + extra


def resolve_hyperparameters(method: ResolvedMethod, explicit: Mapping[str, Any], dataset: str | None = None,
                            paper_era: bool = False, recipe: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """{hp name: value} for exactly the hyper-parameters `method` uses (plus "grad_mask" on bi-objective bases).

    Precedence, lowest first, for each declared hyper-parameter:

    1. the method's default (for a recipe-shared one, such as batch_size or momentum, the run's `recipe` value
       when a recipe is given: it then also replaces any dataset default);
    2. the method's default on `dataset` (e.g. the values tuned on the shipped digits datasets);
    3. the alias's override (e.g. a paper name that fixes a setting);
    4. the value under `paper_era`, where one is declared (e.g. rl_labels uniform);
    5. the explicit flag value: `explicit` maps flag dest -> value, None meaning "not given". Flags of other methods
       are ignored; a flag this method refuses (`refused_flags`) is an error.

    Every value is validated against this method's declaration (one-line UserError naming the flag and what is
    allowed), then the method's cross-value rules run (`check_hparams`). Nothing here loads data or writes files.
    """
    cls, where = method.cls, method.label
    known = declared_flags()
    unknown = sorted(flag for flag in explicit if flag not in known)
    if unknown:
        raise ValueError(f"undeclared hyper-parameter flags {', '.join(unknown)}; declared: {', '.join(sorted(known))}")
    for flag, reason in cls.refused_flags.items():
        if explicit.get(flag) is not None:
            raise UserError(f"{known[flag].option} cannot be used with {where}: {reason}")
    declared = method_hparams(method)
    names = {hp.name for hp in declared}
    stray = sorted(set(method.overrides) - names)
    if stray:
        raise ValueError(f"alias {method.name} overrides {', '.join(stray)}, which {where} does not declare")
    hp: dict[str, Any] = {}
    for declaration in declared:
        value = declaration.default_for(dataset, recipe)
        if declaration.name in method.overrides:
            value = method.overrides[declaration.name]
        if paper_era and declaration.paper_era is not UNSET:
            value = declaration.paper_era
        if explicit.get(declaration.flag) is not None:
            value = explicit[declaration.flag]
        hp[declaration.name] = declaration.validate(value, where)
    if cls.supports_grad_mask:
        hp["grad_mask"] = method.grad_mask or "none"
    cls.check_hparams(hp)
    return hp
