"""Forget scenarios of the benchmark: one registry; each module of this package registers its own scenario.

A scenario says which mlflow_forget.py flags select its forget set, whether its cells need the original and Retrain
reference models, which entry script runs its cells, and which columns its table shows. Importing the package imports
every module in it, so adding a scenario is adding a module that calls `register_scenario`.
"""
from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

# The columns of a scenario's table unless it declares its own: ((result key, title), ...).
TABLE_METRICS: tuple[tuple[str, str], ...] = (
    ("UA", "UA"), ("RA", "RA"), ("TA", "TA"), ("MIA_efficacy", "MIA-Efficacy"), ("avg_gap", "Avg. Gap"),
    ("RTE_seconds", "RTE (s)"))


class ForgetSettings(Protocol):
    """What a scenario reads from the sweep's settings to choose its forget set."""

    forget_fraction: float
    forget_class: int


@dataclass(frozen=True)
class Scenario:
    """A forget scenario. `forget_flags(settings, train_size)` returns mlflow_forget.py flags ({flag dest: value})
    selecting the forget set. A scenario whose cells need another entry script sets `script` (used by --emit-commands)
    and `run_cell(argv) -> result dict` (which must write the result JSON at --result_json). `references=False`: no
    original / Retrain cells (the scenario's cells train what they need themselves); `metrics`: the table columns,
    default `TABLE_METRICS`; `note`: a line under the tables."""

    name: str
    summary: str
    forget_flags: Callable[[ForgetSettings, int], dict[str, Any]]
    script: str = "mlflow_forget.py"
    run_cell: Callable[[list[str]], dict] | None = None
    references: bool = True
    metrics: tuple[tuple[str, str], ...] | None = None
    note: str = ""


SCENARIOS: dict[str, Scenario] = {}


def register_scenario(scenario: Scenario) -> Scenario:
    if scenario.name in SCENARIOS:
        raise ValueError(f"scenario '{scenario.name}' registered twice")
    SCENARIOS[scenario.name] = scenario
    return scenario


def forget_count(settings: ForgetSettings, train_size: int) -> int:
    """How many training samples forget_fraction is (at least one)."""
    return max(1, int(round(settings.forget_fraction * train_size)))


def table_metrics(scenario: str) -> tuple[tuple[str, str], ...]:
    entry = SCENARIOS.get(scenario)
    return entry.metrics if entry is not None and entry.metrics else TABLE_METRICS


def extra_metric_keys() -> list[str]:
    """Result keys that some registered scenario shows besides `TABLE_METRICS` (the extra CSV columns)."""
    common = dict(TABLE_METRICS)
    keys: dict[str, None] = {}
    for scenario in SCENARIOS.values():
        keys.update({key: None for key, _ in scenario.metrics or () if key not in common})
    return list(keys)


for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["SCENARIOS", "Scenario", "TABLE_METRICS", "extra_metric_keys", "forget_count", "register_scenario",
           "table_metrics"]
