"""Hyper-parameter declarations: what a method accepts, its defaults, and the values it allows.

Each method declares a tuple of :class:`HParam` next to its code (`hparams`). Everything else derives from those
declarations: the command-line flags and config-file keys (`unlearn.registry.declared_flags`), the resolved values a
method receives (`unlearn.registry.resolve_hyperparameters`) and the checks that reject bad values before any work.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from utils import UserError


class _Unset:
    """Marks "no value declared" where None is itself a legal value."""

    _instance: _Unset | None = None

    def __new__(cls) -> _Unset:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNSET"

    def __bool__(self) -> bool:
        return False


UNSET: Any = _Unset()

KINDS = (float, int, str)
RECIPE_FIELDS = ("batch_size", "momentum", "weight_decay", "decreasing_lr")


def _number_text(value: float) -> str:
    return f"{value:g}"


@dataclass(frozen=True)
class HParam:
    """One hyper-parameter of a method.

    `default` is the method's value; `dataset_defaults` replace it on the named datasets; `paper_era` is the value
    under ``--paper_era`` when the flag is not given; `recipe` names a field of the training recipe whose value stands
    in for the default (the unlearning loop then uses the run's batch size, momentum, ... unless the flag is given).
    `check` (optional) validates a coerced value further and raises UserError (e.g. a milestone list);
    `describe` (optional) replaces the generated "allowed" text.
    `search` (optional) is where `benchmark.py --tune` looks for a value (see :data:`SEARCH_KINDS`): ("log", low, high)
    and ("linear", low, high) are intervals sampled by a fixed design, ("choice", a, b, ...) a list, and
    ("per_epoch", max) marks the epoch count that is read off per-epoch evaluation of one run of `max` epochs, so it
    costs no trials of its own.
    """

    name: str
    kind: type
    default: Any
    help: str
    flag: str = ""
    options: tuple[str, ...] = ()
    choices: tuple | None = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    dataset_defaults: Mapping[str, Any] = field(default_factory=dict)
    paper_era: Any = UNSET
    recipe: str | None = None
    nullable: bool = False
    check: Callable[[Any], None] | None = field(default=None, compare=False)
    describe: str = ""
    search: tuple = ()

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ValueError(f"hyper-parameter name {self.name!r} is not an identifier")
        if self.kind not in KINDS:
            raise ValueError(f"hyper-parameter {self.name}: kind must be float, int or str, not {self.kind!r}")
        object.__setattr__(self, "flag", self.flag or self.name)
        object.__setattr__(self, "options", tuple(self.options) or (f"--{self.flag}",))
        object.__setattr__(self, "dataset_defaults", MappingProxyType(dict(self.dataset_defaults)))
        if self.choices is not None:
            object.__setattr__(self, "choices", tuple(self.choices))
            if not self.choices:
                raise ValueError(f"hyper-parameter {self.name}: empty choices")
        if self.recipe is not None and self.recipe not in RECIPE_FIELDS:
            raise ValueError(f"hyper-parameter {self.name}: recipe field {self.recipe!r} is not one of "
                             f"{', '.join(RECIPE_FIELDS)}")
        if not self.help:
            raise ValueError(f"hyper-parameter {self.name}: no help text")
        # A declaration whose own defaults break its rules is a programming error, found at import time.
        try:
            self.validate(self.default)
            for _dataset, value in self.dataset_defaults.items():
                self.validate(value)
            if self.paper_era is not UNSET:
                self.validate(self.paper_era)
        except UserError as exc:
            raise ValueError(f"hyper-parameter {self.name}: invalid declaration ({exc})") from exc
        if self.search:
            object.__setattr__(self, "search", tuple(self.search))
            check_search(self)

    @property
    def option(self) -> str:
        """The first command-line spelling (used in messages)."""
        return self.options[0]

    def allowed(self) -> str:
        """What `validate` accepts, in words: "a number in (0, 1]", "one of: always, first_epoch, never", ..."""
        if self.describe:
            text = self.describe
        elif self.choices is not None:
            text = "one of: " + ", ".join(str(c) for c in self.choices)
        elif self.kind is str:
            text = "a text"
        else:
            text = "an integer" if self.kind is int else "a number"
            if self.low is not None and self.high is not None:
                text += (f" in {'(' if self.low_open else '['}{_number_text(self.low)}, "
                         f"{_number_text(self.high)}{')' if self.high_open else ']'}")
            elif self.low is not None:
                text += f" {'>' if self.low_open else '>='} {_number_text(self.low)}"
            elif self.high is not None:
                text += f" {'<' if self.high_open else '<='} {_number_text(self.high)}"
        return f"{text}, or nothing" if self.nullable else text

    def _refuse(self, value: Any, where: str) -> UserError:
        context = f" for {where}" if where else ""
        return UserError(f"{self.option} {value}: must be {self.allowed()}{context}")

    def validate(self, value: Any, where: str = "") -> Any:
        """The value coerced to `kind` (strings from config files are parsed), or a one-line UserError naming the flag
        and what is allowed. `where` (a method name) is added to the message."""
        if value is None:
            if self.nullable:
                return None
            raise self._refuse(value, where)
        if isinstance(value, bool):  # True/False are ints to Python, never a meaningful hyper-parameter value here
            raise self._refuse(value, where)
        if self.kind is str:
            if not isinstance(value, str):
                raise self._refuse(value, where)
            coerced: Any = value
        elif self.kind is int:
            if isinstance(value, int):
                coerced = value
            elif isinstance(value, float) and value.is_integer():
                coerced = int(value)
            elif isinstance(value, str):
                try:
                    coerced = int(value.strip())
                except ValueError:
                    raise self._refuse(value, where) from None
            else:
                raise self._refuse(value, where)
        else:
            if isinstance(value, (int, float)):
                coerced = float(value)
            elif isinstance(value, str):
                try:
                    coerced = float(value.strip())
                except ValueError:
                    raise self._refuse(value, where) from None
            else:
                raise self._refuse(value, where)
            if not math.isfinite(coerced):
                raise self._refuse(value, where)
        if self.choices is not None and coerced not in self.choices:
            raise self._refuse(value, where)
        if self.low is not None and (coerced < self.low or (self.low_open and coerced == self.low)):
            raise self._refuse(value, where)
        if self.high is not None and (coerced > self.high or (self.high_open and coerced == self.high)):
            raise self._refuse(value, where)
        if self.check is not None:
            self.check(coerced)
        return coerced

    def replace(self, **changes: Any) -> HParam:
        """A copy with some fields changed (a method's own default, range or help). Renaming the flag also renames the
        generated option unless `options` is given."""
        if "flag" in changes and "options" not in changes and self.options == (f"--{self.flag}",):
            changes["options"] = ()
        return dataclasses.replace(self, **changes)

    def default_for(self, dataset: str | None, recipe: Mapping[str, Any] | None) -> Any:
        """The default before aliases, --paper_era and explicit values: the run's recipe value for recipe-shared
        hyper-parameters (when the recipe is given), else the dataset's default, else the method's."""
        if self.recipe is not None and recipe is not None and recipe.get(self.recipe) is not None:
            return recipe[self.recipe]
        if dataset is not None and dataset in self.dataset_defaults:
            return self.dataset_defaults[dataset]
        return self.default


SEARCH_KINDS = ("log", "linear", "choice", "per_epoch")


def check_search(hp: HParam) -> None:
    """Raise ValueError unless `hp.search` is a valid search space whose every value `hp.validate` accepts."""
    kind, *rest = hp.search
    if kind not in SEARCH_KINDS:
        raise ValueError(f"hyper-parameter {hp.name}: search kind {kind!r} is not one of {', '.join(SEARCH_KINDS)}")
    try:
        if kind in ("log", "linear"):
            if hp.kind is not float or len(rest) != 2 or not rest[0] < rest[1] or (kind == "log" and rest[0] <= 0):
                raise ValueError(f"hyper-parameter {hp.name}: search ({kind!r}, low, high) needs a float parameter "
                                 f"and 0 < low < high (log) or low < high (linear), got {hp.search}")
            hp.validate(rest[0])
            hp.validate(rest[1])
        elif kind == "choice":
            if not rest:
                raise ValueError(f"hyper-parameter {hp.name}: empty search choice")
            for value in rest:
                hp.validate(value)
        else:
            if hp.kind is not int or len(rest) != 1 or isinstance(rest[0], bool) or not isinstance(rest[0], int):
                raise ValueError(f"hyper-parameter {hp.name}: search ('per_epoch', max) needs an int parameter and an "
                                 f"int maximum, got {hp.search}")
            hp.validate(rest[0])
    except UserError as exc:
        raise ValueError(f"hyper-parameter {hp.name}: search space {hp.search} leaves the allowed range "
                         f"({exc})") from exc


def searched(hparams: Iterable[HParam], **spaces: tuple) -> tuple[HParam, ...]:
    """`hparams` with search spaces (by name) for `benchmark.py --tune`; the others keep theirs (none, or inherited)."""
    hparams = tuple(hparams)
    unknown = sorted(set(spaces) - {hp.name for hp in hparams})
    if unknown:
        raise ValueError(f"searched: {', '.join(unknown)} not declared")
    return tuple(hp.replace(search=spaces[hp.name]) if hp.name in spaces else hp for hp in hparams)


def tune(hparams: Iterable[HParam], digits: Mapping[str, Any] | None = None, **defaults: Any) -> tuple[HParam, ...]:
    """`hparams` with new method defaults (`defaults`, by name) and defaults on the shipped digits datasets
    (`digits`, by name; both `digits` and `digits_noisy`: the noisy variant is where they were chosen, plain digits
    shares them)."""
    hparams = tuple(hparams)
    names = {hp.name for hp in hparams}
    unknown = sorted((set(defaults) | set(digits or {})) - names)
    if unknown:
        raise ValueError(f"tune: {', '.join(unknown)} not declared; declared: {', '.join(sorted(names))}")
    tuned = []
    for hp in hparams:
        changes: dict[str, Any] = {}
        if hp.name in defaults:
            changes["default"] = defaults[hp.name]
        if digits and hp.name in digits:
            changes["dataset_defaults"] = {**hp.dataset_defaults, "digits": digits[hp.name],
                                           "digits_noisy": digits[hp.name]}
        tuned.append(hp.replace(**changes) if changes else hp)
    return tuple(tuned)


def without(hparams: Iterable[HParam], *names: str) -> tuple[HParam, ...]:
    """`hparams` minus the named ones (a subclass that does not use an inherited hyper-parameter)."""
    hparams = tuple(hparams)
    missing = sorted(set(names) - {hp.name for hp in hparams})
    if missing:
        raise ValueError(f"without: {', '.join(missing)} not declared")
    return tuple(hp for hp in hparams if hp.name not in names)
