"""Unlearning methods: one registry, one shared driver, and the gradient-mask add-ons (`unlearn.masks`).

Importing the package imports every module in it, so each method module only has to register its classes.
Knows nothing of argparse or mlflow.
"""
import importlib
import pkgutil

from unlearn.driver import UnlearnOutcome, run_unlearning
from unlearn.hparams import UNSET, HParam
from unlearn.registry import (
    ALIASES,
    METHODS,
    ResolvedMethod,
    UnlearnContext,
    UnlearnMethod,
    declared_flags,
    list_methods,
    match_methods,
    method_hparams,
    register_alias,
    register_method,
    resolve_hyperparameters,
    resolve_method,
)

for _module in pkgutil.iter_modules(__path__):
    if _module.name not in ("registry", "driver", "masks", "hparams", "common"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["ALIASES", "METHODS", "HParam", "ResolvedMethod", "UNSET", "UnlearnContext", "UnlearnMethod",
           "declared_flags", "list_methods", "match_methods", "method_hparams", "register_alias", "register_method",
           "resolve_hyperparameters", "resolve_method", "UnlearnOutcome", "run_unlearning"]
