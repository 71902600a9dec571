"""The settings of a sweep, its per-method hyper-parameter files, and the checks of where it writes."""
from __future__ import annotations

import fnmatch
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scenarios import SCENARIOS
from scenarios.classwise import RESERVED_CLASSES
from unlearn import list_methods
from unlearn.registry import method_flags
from utils import UserError, check_output_path  # noqa: F401  (re-exported for the sweep)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
PROVENANCE_KEY = "provenance"


@dataclass
class Settings:
    datasets: list[str]
    archs: list[str]
    scenarios: list[str]
    methods: list[str]
    seeds: list[int]
    out: Path
    data: str = "../data"
    device: str = "auto"
    epochs: int | None = None
    unlearn_epochs: int | None = None
    width: int | None = None
    forget_fraction: float = 0.1
    # Class-wise forgetting: one class for every seed (`forget_class`), or, when None, one class per seed drawn from
    # `forget_classes` (default: every class not in `reserved_classes`, the tuning classes); see scenarios/classwise.py.
    forget_class: int | None = None
    forget_classes: tuple[int, ...] | None = None
    reserved_classes: tuple[int, ...] = RESERVED_CLASSES
    epoch_eval: str = "all"  # all | masked | none: which methods get per-epoch history
    # all | selection: what each per-epoch evaluation computes (selection: the training pool only, the tuning trials)
    epoch_eval_metrics: str = "all"
    # A method cell with per-epoch evaluation ends once its selection scores have not improved by more than
    # `stop_tolerance` points for `stop_patience` epochs (0: every epoch runs; evaluation.selection.PlateauStop).
    stop_patience: int = 0
    stop_tolerance: float = 0.0
    forget_quality: int = 0  # N: the competition's forgetting quality per method cell (0 = off)
    grid: dict = field(default_factory=dict)
    config: Path | None = None  # per-method hyper-parameters; default configs/benchmark_<dataset>.json when present
    jobs: int = 1
    # Where cells run (sweep.executors): local workers (pinned to `devices`, `jobs_per_device` each) or submitit jobs.
    executor: str = "local"
    devices: list[str] | None = None
    jobs_per_device: int | None = None
    cluster: str = "slurm"
    slurm: dict = field(default_factory=dict)
    rerun: bool = False
    no_download: bool = False
    train_subset: int | None = None  # every cell trains on this stratified training subset (None: all the data)
    test: str = "sign_flip"  # paired comparisons' test (sweep.stats.TESTS)


def load_settings_file(path: Path, what: str) -> dict[str, dict]:
    """{"<method or glob>": {"<flag>": value or [values], "scenarios": {"<scenario>": {...}}}}, validated."""
    try:
        payload = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{what} '{path}' does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{what} '{path}' is not readable JSON ({exc})") from None
    if not isinstance(payload, dict):
        raise UserError(f"{what} '{path}' must be a JSON object {{method: {{flag: [values]}}}}")
    names = list_methods()
    for pattern, entry in payload.items():
        if pattern == PROVENANCE_KEY:  # how a tuned file was made (benchmark.py --tune): a record, not a method
            if not isinstance(entry, dict):
                raise UserError(f"{what} '{path}': '{PROVENANCE_KEY}' must be a JSON object")
            continue
        if not fnmatch.filter(names, pattern):
            raise UserError(f"{what} '{path}': no method matches '{pattern}'; registered: {', '.join(names)}")
        if not isinstance(entry, dict):
            raise UserError(f"{what} '{path}': '{pattern}' must map flags to values")
        _check_flags(entry, f"{what} '{path}', method '{pattern}'")
        for scenario, sub in (entry.get("scenarios") or {}).items():
            if scenario not in SCENARIOS or not isinstance(sub, dict):
                raise UserError(f"{what} '{path}', method '{pattern}': unknown scenario '{scenario}'; "
                                f"allowed: {', '.join(SCENARIOS)}")
            _check_flags(sub, f"{what} '{path}', method '{pattern}', scenario '{scenario}'")
    return payload


def _check_flags(entry: dict, where: str) -> None:
    for flag, values in entry.items():
        if flag == "scenarios":
            continue
        if flag not in method_flags():
            raise UserError(f"{where}: '{flag}' is not a method hyper-parameter flag; allowed: "
                            f"{', '.join(sorted(method_flags()))}")
        values = values if isinstance(values, list) else [values]
        if not values or any(isinstance(v, (dict, list)) for v in values):
            raise UserError(f"{where}: '{flag}' needs a value or a non-empty list of values")


def method_combos(name: str, scenario: str, sources: list[dict]) -> list[dict[str, Any]]:
    """The hyper-parameter combinations of one method in one scenario: entries matching the name (later sources and
    scenario-specific values win), expanded as a cartesian product."""
    merged: dict[str, list] = {}
    for source in sources:
        for pattern, entry in source.items():
            if fnmatch.fnmatchcase(name, pattern):
                for part in (entry, (entry.get("scenarios") or {}).get(scenario, {})):
                    merged.update({k: v if isinstance(v, list) else [v] for k, v in part.items() if k != "scenarios"})
    keys = sorted(merged)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*(merged[k] for k in keys))]


def default_config_path(dataset: str) -> Path:
    """configs/tuned_<dataset>.json (made by `benchmark.py --tune`) when shipped, else the hand-chosen
    configs/benchmark_<dataset>.json (whether or not it exists)."""
    tuned = CONFIG_DIR / f"tuned_{dataset}.json"
    return tuned if tuned.is_file() else CONFIG_DIR / f"benchmark_{dataset}.json"
