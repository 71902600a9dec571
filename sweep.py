"""The benchmark sweep behind benchmark.py: the grid, its cells, their execution, and the results table.

A *cell* is one mlflow_forget.py command line (dataset, architecture, forget scenario, seed, method, hyper-parameters).
Its key is a hash of its resolved arguments, with the method name replaced by what the name resolves to (base class,
gradient mask, hyper-parameters), so aliases of one configuration (VarGrad and NGradMask, FT_prune and FT_l1) share one
cell and run once. Each finished cell leaves `<out>/cells/<key>.json` (its result JSON, written atomically), so a sweep
resumes after an interruption without computing anything twice; `rerun=True` recomputes.

Reference models come first: the original model per (dataset, arch, seed) and the Retrain reference per forget setting
and seed, stored in `<out>/models/<dataset>_w<width>/`. The Retrain row of the table is the Retrain reference evaluated
like a method, with its training time as RTE (no second identical training).

Scenarios are a small registry (`SCENARIOS`): an entry gives the mlflow_forget.py flags that select its forget set.
"""
from __future__ import annotations

import argparse
import concurrent.futures as futures
import contextlib
import csv
import fnmatch
import functools
import hashlib
import io
import itertools
import json
import math
import multiprocessing
import shlex
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from dataset import TRAIN_SPLIT_SEED, load_dataset, recipe_defaults, train_val_split
from experiment import METHOD_HP_FLAGS, original_checkpoint_path, setup_run
from pipeline import (absolute, ensure_original, ensure_retrain, forget_setting, parse_forget_args,
                      resolved_hyperparameters, retrain_reference_result, run_forget, run_tags)
from unlearn import ALIASES, list_methods, match_methods, resolve_method
from utils import DivergenceError, UserError, atomic_write_json, atomic_write_text, git_commit, to_jsonable

ROOT = Path(__file__).resolve().parent
CONFIG_DIR = ROOT / "configs"
CLASSWISE_CLASS = 0  # class-wise forgetting forgets class 0: upstream's default --class_to_replace, same every seed
TABLE_METRICS = (("UA", "UA"), ("RA", "RA"), ("TA", "TA"), ("MIA_efficacy", "MIA-Efficacy"), ("avg_gap", "Avg. Gap"),
                 ("RTE_seconds", "RTE (s)"))
# Arguments that do not change a cell's numbers (where files are, tracking, display): left out of its key, so an out
# dir can move (or be mounted elsewhere on a cluster) and keep its finished cells.
NON_SEMANTIC = {"result_json", "save_dir", "data", "mask", "experiment", "run_name", "parent_run_id", "track",
                "no_progress", "no_plots",
                "list_methods", "jobs", "workers", "resume", "retrain", "no_save_model", "no_download", "unlearn",
                "grad_mask", *METHOD_HP_FLAGS}


# ---------------------------------------------------------------------------------------------------------------------
# Scenarios
# ---------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Scenario:
    """A forget scenario of the benchmark. `forget_flags(settings, train_size)` returns mlflow_forget.py flags
    ({flag dest: value}) selecting the forget set. A scenario whose cells need another entry script sets `script`
    (used by --emit-commands) and `run_cell(argv) -> result dict` (which must write the result JSON at --result_json).
    `references=False`: no original / Retrain cells (the scenario's cells train what they need themselves); `metrics`:
    the table columns ((result key, title), ...), default `TABLE_METRICS`; `note`: a line under the tables."""

    name: str
    summary: str
    forget_flags: Callable[["Settings", int], dict[str, Any]]
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


def forget_count(settings: "Settings", train_size: int) -> int:
    return max(1, int(round(settings.forget_fraction * train_size)))


register_scenario(Scenario(
    "random", "random forgetting: forget_fraction of the training split, drawn across all classes",
    lambda settings, train_size: {"class_to_replace": -1, "num_indexes_to_replace": forget_count(settings, train_size)}))
register_scenario(Scenario(
    "classwise", f"class-wise forgetting: the whole of class {CLASSWISE_CLASS} (it also leaves the test set)",
    lambda settings, train_size: {"class_to_replace": settings.forget_class}))


BACKDOOR_TARGET = 0  # upstream's default target label (--class_to_replace 0)
BACKDOOR_METRICS = (("clean_acc", "clean acc before"), ("asr", "ASR before"), ("clean_acc_unlearn", "clean acc after"),
                    ("asr_unlearn", "ASR after"), ("RTE_seconds", "RTE (s)"))


def _run_backdoor_cell(argv: list[str]) -> dict:
    from backdoor import run_backdoor_argv  # main_backdoor.py's code, imported only where backdoor cells run

    return run_backdoor_argv(argv)


register_scenario(Scenario(
    "backdoor", f"backdoor cleanse: forget_fraction of the training split poisoned with the trigger, target class "
                f"{BACKDOOR_TARGET}; the poisoned samples are the forget set",
    lambda settings, train_size: {"class_to_replace": BACKDOOR_TARGET,
                                  "num_indexes_to_replace": forget_count(settings, train_size)},
    script="main_backdoor.py", run_cell=_run_backdoor_cell, references=False, metrics=BACKDOOR_METRICS,
    note=f"backdoor: target class {BACKDOOR_TARGET}, forget_fraction of the training split poisoned; each cell trains "
         f"(once per seed, shared by the methods) or loads the backdoored model; clean acc = test accuracy on clean "
         f"images; ASR = % of triggered test images of the other classes classified as the target (main_backdoor.py)."))


def table_metrics(scenario: str) -> tuple[tuple[str, str], ...]:
    entry = SCENARIOS.get(scenario)
    return entry.metrics if entry is not None and entry.metrics else TABLE_METRICS


# ---------------------------------------------------------------------------------------------------------------------
# Settings, per-method hyper-parameters
# ---------------------------------------------------------------------------------------------------------------------

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
    forget_class: int = CLASSWISE_CLASS
    epoch_eval: str = "masked"  # all | masked | none
    grid: dict = field(default_factory=dict)
    config: Path | None = None  # per-method hyper-parameters; default configs/benchmark_<dataset>.json when present
    jobs: int = 1
    rerun: bool = False
    no_download: bool = False


def load_settings_file(path: Path, what: str) -> dict[str, dict]:
    """{"<method or glob>": {"<flag>": value or [values], "scenarios": {"<scenario>": {...}}}}, validated."""
    try:
        payload = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{what} '{path}' does not exist") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{what} '{path}' is not readable JSON ({exc})") from None
    if not isinstance(payload, dict):
        raise UserError(f"{what} '{path}' must be a JSON object {{method: {{flag: [values]}}}}")
    names = list_methods()
    for pattern, entry in payload.items():
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
        if flag not in METHOD_HP_FLAGS:
            raise UserError(f"{where}: '{flag}' is not a method hyper-parameter flag; allowed: "
                            f"{', '.join(sorted(METHOD_HP_FLAGS))}")
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
    return [dict(zip(keys, values)) for values in itertools.product(*(merged[k] for k in keys))]


def default_config_path(dataset: str) -> Path:
    return CONFIG_DIR / f"benchmark_{dataset}.json"


# ---------------------------------------------------------------------------------------------------------------------
# Cells
# ---------------------------------------------------------------------------------------------------------------------

@dataclass
class Cell:
    kind: str                 # original | retrain | reference | method
    key: str
    dataset: str
    arch: str
    scenario: str
    seed: int
    argv: list[str]           # mlflow_forget.py arguments, without where-to-write and tracking flags
    names: list[str] = field(default_factory=list)      # method names (aliases of one configuration)
    overrides: dict = field(default_factory=dict)       # hyper-parameter flags given by the config / grid / CLI
    hp: dict = field(default_factory=dict)              # resolved hyper-parameters
    family: bool = False                                # the masking family (bases that take gradient masks)
    config: str = ""                                    # what the names resolve to, e.g. "NGPlus + prob"
    deps: list[str] = field(default_factory=list)
    target: str = ""          # the file whose existence means "done"
    label: str = ""
    setting: str = ""         # the forget setting, e.g. random130 or class0
    split_tag: str = ""       # Retrain cells: the split's tag (file names), filled in by `compute_split_tags`

    def result_path(self, out: Path) -> Path:
        return out / "cells" / f"{self.key}.json"

    def failure_path(self, out: Path) -> Path:
        return out / "cells" / f"{self.key}.failed.json"


def to_argv(flags: dict[str, Any]) -> list[str]:
    """{dest: value} -> mlflow_forget.py arguments, spelled as its parser spells them (None = leave to the default)."""
    actions = _parser_actions()
    argv: list[str] = []
    for dest, value in flags.items():
        action = actions[dest]
        if value is None:
            continue
        if isinstance(action, argparse.BooleanOptionalAction):
            argv.append(action.option_strings[0 if value else 1])
        elif isinstance(action, argparse._StoreTrueAction):
            argv += [action.option_strings[0]] if value else []
        else:
            argv += [action.option_strings[0], str(value)]
    return argv


@functools.lru_cache(maxsize=1)
def _parser_actions() -> dict[str, argparse.Action]:
    from arg_parser import build_parser
    from pipeline import add_forget_flags

    return {action.dest: action for action in build_parser(extra=add_forget_flags)._actions if action.option_strings}


def cell_key(kind: str, args: argparse.Namespace, config: dict | None = None) -> str:
    semantic = {k: v for k, v in sorted(vars(args).items()) if k not in NON_SEMANTIC}
    if kind in ("original",):  # the original model does not depend on the forget set
        for k in ("class_to_replace", "num_indexes_to_replace", "unlearn_seed", "no_epoch_eval", "mia",
                  "num_ref_models", "split"):
            semantic.pop(k, None)
    payload = json.dumps({"kind": kind, "args": to_jsonable(semantic), "method": to_jsonable(config)}, sort_keys=True,
                         default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def models_dir(settings: Settings, dataset: str, width: int | None) -> Path:
    return settings.out / "models" / f"{dataset}_w{width if width is not None else 'default'}"


def train_size(dataset: str, settings: Settings) -> int:
    data = load_dataset(dataset, settings.data, download=not settings.no_download)
    train, _ = train_val_split(data.train_labels.cpu().numpy(), data.num_classes, TRAIN_SPLIT_SEED)
    return len(train)


def build_cells(settings: Settings) -> tuple[list[Cell], list[str]]:
    """All cells of the sweep in dependency order (references first), and notes for the table footnote."""
    out = settings.out
    notes: list[str] = []
    names = [n for n in match_methods(settings.methods) if n != "retrain"]
    if "retrain" in match_methods(settings.methods) and settings.methods != ["*"]:
        notes.append("retrain is not run as a method: the Retrain row is the Retrain reference model.")
    if not names:
        raise UserError("no method to run (the Retrain row comes with every table); pass --methods")
    grid_sources = [settings.grid] if settings.grid else []
    by_key: dict[str, Cell] = {}
    order: list[Cell] = []

    def add(cell: Cell) -> Cell:
        if cell.key in by_key:
            return by_key[cell.key]
        by_key[cell.key] = cell
        order.append(cell)
        return cell

    for dataset in settings.datasets:
        sources = []
        config_path = settings.config or default_config_path(dataset)
        if settings.config is not None or config_path.is_file():
            sources.append(load_settings_file(config_path, "hyper-parameter file"))
        sources += grid_sources
        size = train_size(dataset, settings)
        for arch, seed, scenario_name in itertools.product(settings.archs, settings.seeds, settings.scenarios):
            scenario = SCENARIOS[scenario_name]
            width = settings.width if settings.width is not None else recipe_defaults(dataset).get("width")
            base = {"dataset": dataset, "arch": arch, "seed": seed, "data": absolute(settings.data),
                    "save_dir": absolute(models_dir(settings, dataset, width)), "epochs": settings.epochs,
                    "width": settings.width, "device": settings.device, "no_download": settings.no_download,
                    **scenario.forget_flags(settings, size)}
            ref_args = parse_forget_args(to_argv({**base, "unlearn": "raw"}))
            setting = forget_setting(ref_args)
            deps: list[str] = []
            if scenario.references:
                original = add(Cell("original", cell_key("original", ref_args), dataset, arch, scenario_name, seed,
                                    to_argv({**base, "unlearn": "raw"}),
                                    target=str(original_checkpoint_path(ref_args))))
                retrain = add(Cell("retrain", cell_key("retrain", ref_args), dataset, arch, scenario_name, seed,
                                   to_argv({**base, "unlearn": "retrain"}), setting=setting))
                reference = add(Cell("reference", cell_key("reference", ref_args), dataset, arch, scenario_name, seed,
                                     to_argv({**base, "unlearn": "retrain"}), names=["Retrain"], deps=[retrain.key],
                                     config="the Retrain reference model", label="Retrain", setting=setting))
                reference.target = str(reference.result_path(out))
                deps = [original.key, retrain.key]
            for name in names:
                method = resolve_method(name)
                family = method.cls.supports_grad_mask  # the masking family: bases that take gradient masks
                epoch_eval = settings.epoch_eval == "all" or (settings.epoch_eval == "masked" and family)
                for combo in method_combos(name, scenario_name, sources) or [{}]:
                    overrides = dict(combo)
                    if settings.unlearn_epochs is not None:
                        overrides["unlearn_epochs"] = settings.unlearn_epochs
                    flags = {**base, "unlearn": name, **overrides, "no_epoch_eval": not epoch_eval}
                    args = parse_forget_args(to_argv(flags))
                    hp = resolved_hyperparameters(args)
                    config = {"class": method.cls.name, "grad_mask": method.grad_mask, "hp": hp}
                    cell = add(Cell("method", cell_key("method", args, config), dataset, arch, scenario_name, seed,
                                    to_argv(flags), overrides=overrides, hp=hp, family=family,
                                    config=method.cls.name + (f" + {method.grad_mask}" if method.grad_mask else ""),
                                    deps=list(deps), setting=setting))
                    if name not in cell.names:
                        cell.names.append(name)
                    cell.target = str(cell.result_path(out))
    for cell in order:
        if cell.kind == "method":
            cell.names.sort(key=lambda n: (n in ALIASES, n.lower()))  # a registered method's own name first
            cell.argv[cell.argv.index("--unlearn") + 1] = cell.names[0]  # runs under the first name of its row
    _label_cells(order)
    for cell in order:
        if cell.kind == "method" and len(cell.names) > 1:
            note = f"{' = '.join(cell.names)}: same configuration ({cell.config}), run once."
            if note not in notes:
                notes.append(note)
    return order, notes


def _label_cells(cells: list[Cell]) -> None:
    """Row labels: the method name(s); hyper-parameters are added only where one method has several combinations."""
    combos: dict[tuple, set] = {}
    for cell in cells:
        if cell.kind == "method":
            combos.setdefault((cell.dataset, cell.arch, cell.scenario, cell.names[0]), set()).add(
                json.dumps(cell.overrides, sort_keys=True))
    for cell in cells:
        if cell.kind != "method":
            continue
        label = " = ".join(cell.names)
        if len(combos[(cell.dataset, cell.arch, cell.scenario, cell.names[0])]) > 1:
            label += " [" + ", ".join(f"{k}={v}" for k, v in sorted(cell.overrides.items())) + "]"
        cell.label = label


def is_done(cell: Cell, out: Path) -> bool:
    """Finished earlier: the reference model exists, or the cell's result (or its remembered failure) does."""
    if cell.kind == "retrain":
        if not cell.split_tag:
            return False
        args = parse_forget_args(cell.argv)
        # The rule of experiment.find_retrain_checkpoint (any recipe of this split), as a file check.
        pattern = f"{args.seed}{args.arch}_ep*_retrain_{cell.split_tag}model.pth.tar"
        return any(Path(args.save_dir).glob(pattern))
    if cell.kind == "method" and cell.failure_path(out).is_file():
        return True
    return Path(cell.target).is_file()


def compute_split_tags(cells: list[Cell], settings: Settings) -> None:
    """The split tag of each Retrain cell (needs the data; cheap), so 'is it trained?' is a file check."""
    from dataset import make_split

    data_cache: dict[str, Any] = {}
    for cell in cells:
        if cell.kind != "retrain":
            continue
        args = parse_forget_args(cell.argv)
        if args.dataset not in data_cache:
            data_cache[args.dataset] = load_dataset(args.dataset, args.data, download=not args.no_download)
        split = make_split(data_cache[args.dataset], args.class_to_replace, args.num_indexes_to_replace, seed=args.seed,
                           split_mode=args.split)
        cell.split_tag = split.tag


# ---------------------------------------------------------------------------------------------------------------------
# Running cells (in worker processes or in this one)
# ---------------------------------------------------------------------------------------------------------------------

_DATA: dict[tuple, Any] = {}


def _dataset(args: argparse.Namespace):
    key = (args.dataset, args.data)
    if key not in _DATA:
        _DATA[key] = load_dataset(args.dataset, args.data, download=not args.no_download)
    return _DATA[key]


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)  # small models: one thread per worker beats threads fighting over the cores


def execute(task: dict) -> dict:
    """Run one cell; its output goes to `<out>/logs/<kind>_<key>.log`.
    Returns {"key", "status", "error", "seconds", "cpu_seconds"} (CPU time: a cost that survives a busy machine)."""
    start, cpu_start = time.perf_counter(), time.process_time()
    log_path = Path(task["log"])
    log_path.parent.mkdir(parents=True, exist_ok=True)
    status, error = "ok", None
    with open(log_path, "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        try:
            args = parse_forget_args(task["argv"])
            scenario = SCENARIOS.get(task["scenario"])
            if task["kind"] == "method" and scenario is not None and scenario.run_cell is not None:
                scenario.run_cell(task["argv"])
            else:
                run = setup_run(args, data=_dataset(args))
                if task["kind"] == "original":
                    ensure_original(run, original_checkpoint_path(args))
                elif task["kind"] == "retrain":
                    ensure_retrain(run)
                elif task["kind"] == "reference":
                    from evaluation import write_result

                    write_result(args.result_json, retrain_reference_result(run))
                else:
                    from tracking import NullTracker

                    run_forget(args, NullTracker(), data=_dataset(args))
        except (DivergenceError, UserError) as exc:
            status, error = "failed", f"{type(exc).__name__}: {exc}"
            print(f"error: {exc}")
        except Exception as exc:  # a bug: reported, not cached, the sweep goes on
            status, error = "error", f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
    return {"key": task["key"], "status": status, "error": error, "seconds": time.perf_counter() - start,
            "cpu_seconds": time.process_time() - cpu_start}


def task_of(cell: Cell, out: Path) -> dict:
    result_json = str(cell.result_path(out)) if cell.kind in ("method", "reference") else None
    argv = cell.argv + to_argv({"no_progress": True, "track": False, "no_plots": True, "no_save_model": True,
                                "result_json": result_json})
    return {"key": cell.key, "kind": cell.kind, "scenario": cell.scenario, "argv": argv,
            "log": str(out / "logs" / f"{cell.kind}_{cell.key}.log")}


# ---------------------------------------------------------------------------------------------------------------------
# Commands for other schedulers
# ---------------------------------------------------------------------------------------------------------------------

def command_line(cell: Cell, out: Path, tracking: dict | None) -> str:
    """A self-contained shell line: absolute paths, the tracking URI in the environment, the cell's result file in the
    sweep's out dir (so benchmark.py later aggregates it instead of computing it again)."""
    scenario = SCENARIOS[cell.scenario]
    argv = cell.argv + to_argv({"no_save_model": True, "result_json": str(cell.result_path(out).resolve()),
                                "track": bool(tracking), "experiment": (tracking or {}).get("experiment"),
                                "parent_run_id": (tracking or {}).get("parent_run_id")})
    env = f"MLFLOW_TRACKING_URI={shlex.quote(tracking['uri'])} " if tracking else ""
    script = ROOT / scenario.script
    return (f"cd {shlex.quote(str(Path.cwd()))} && {env}{shlex.quote(sys.executable)} -u {shlex.quote(str(script))} "
            + " ".join(shlex.quote(a) for a in argv))


# ---------------------------------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------------------------------

def _mean_std(values: list[float]) -> tuple[float, float]:
    array = np.asarray(values, dtype=float)
    if len(array) == 0:
        return math.nan, math.nan
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def aggregate(cells: list[Cell], out: Path) -> list[dict]:
    """One row per (dataset, arch, scenario, label): mean and sample std over seeds of the result JSONs."""
    groups: dict[tuple, list[tuple[Cell, dict | None]]] = {}
    for cell in cells:
        if cell.kind not in ("method", "reference"):
            continue
        path = cell.result_path(out)
        result = json.loads(path.read_text()) if path.is_file() else None
        groups.setdefault((cell.dataset, cell.arch, cell.scenario, cell.label), []).append((cell, result))
    rows = []
    for (dataset, arch, scenario, label), members in groups.items():
        results = [r for _, r in members if r is not None]
        first = members[0][0]
        row = {"dataset": dataset, "arch": arch, "scenario": scenario, "setting": first.setting, "method": label,
               "names": first.names,
               "config": first.config, "reference": first.kind == "reference", "family": first.family,
               "seeds": [c.seed for c, r in members if r is not None],
               "failed_seeds": [c.seed for c, r in members if r is None],
               "settings": _settings_text(first), "cells": [c.key for c, _ in members],
               "curves": [r["curves"] for r in results if r.get("curves")]}
        for key in dict(TABLE_METRICS + table_metrics(scenario)):
            row[f"{key}_mean"], row[f"{key}_std"] = _mean_std([r[key] for r in results if key in r])
        gaps = [abs(r["rUA"]) for r in results if "rUA" in r]
        row["forget_gap_mean"], row["forget_gap_std"] = _mean_std(gaps)
        rows.append(row)
    rows.sort(key=lambda r: (r["dataset"], r["arch"], r["scenario"], not r["reference"],
                             math.inf if math.isnan(r["avg_gap_mean"]) else r["avg_gap_mean"], r["method"]))
    return rows


def _settings_text(cell: Cell) -> str:
    if cell.kind == "reference":
        return "training time as RTE"
    shown = {"lr": cell.hp.get("lr"), "epochs": cell.hp.get("epochs")}
    shown.update({METHOD_HP_FLAGS.get(k, k): v for k, v in cell.overrides.items()})
    return ", ".join(f"{k}={v}" for k, v in shown.items() if v is not None)


def _cell_text(row: dict, key: str) -> str:
    mean, std = row[f"{key}_mean"], row[f"{key}_std"]
    return "n/a" if math.isnan(mean) else f"{mean:.2f} ± {std:.2f}"


def markdown_table(rows: list[dict], notes: list[str], seeds: list[int]) -> str:
    lines: list[str] = []
    sections: dict[tuple, list[dict]] = {}
    for row in rows:
        sections.setdefault((row["dataset"], row["arch"], row["scenario"]), []).append(row)
    for (dataset, arch, scenario), members in sections.items():
        lines += [f"### {dataset}, {arch}, {scenario} forgetting ({members[0]['setting']})", ""]
        header = ["Method"] + [title for _, title in table_metrics(scenario)] + ["seeds", "settings"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in members:
            seeds_text = str(len(row["seeds"])) + (f" (failed: {row['failed_seeds']})" if row["failed_seeds"] else "")
            cells = [row["method"]] + [_cell_text(row, key) for key, _ in table_metrics(scenario)] + [seeds_text,
                                                                                                       row["settings"]]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines.append(f"Mean ± sample std over seeds {', '.join(map(str, seeds))}. UA = 100 - forget accuracy; "
                 f"MIA-Efficacy = SVC-MIA (confidence) on the forget set; Avg. Gap = mean |gap| to Retrain over UA, RA, "
                 f"TA, MIA-Efficacy; RTE = unlearning wall time (Retrain: its training time). Rows sorted by Avg. Gap.")
    lines += [f"- {SCENARIOS[name].note}" for name in dict.fromkeys(s for _, _, s in sections)
              if name in SCENARIOS and SCENARIOS[name].note]
    lines += [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


CSV_FIELDS = ["dataset", "arch", "scenario", "setting", "method", "names", "config", "seeds", "failed_seeds", "settings"] + [
    f"{key}_{stat}" for key, _ in TABLE_METRICS for stat in ("mean", "std")] + ["forget_gap_mean", "forget_gap_std",
                                                                               "cells"] + [
    f"{key}_{stat}" for key, _ in BACKDOOR_METRICS if key not in dict(TABLE_METRICS) for stat in ("mean", "std")]


def csv_table(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({**row, "names": " ".join(row["names"]), "seeds": " ".join(map(str, row["seeds"])),
                         "failed_seeds": " ".join(map(str, row["failed_seeds"])), "cells": " ".join(row["cells"])})
    return buffer.getvalue()


def write_plots(rows: list[dict], out: Path) -> list[Path]:
    from plots import plot_family_curves, plot_tradeoff

    written = []
    for dataset, arch in sorted({(r["dataset"], r["arch"]) for r in rows}):
        members = [r for r in rows if r["dataset"] == dataset and r["arch"] == arch and r["seeds"]]
        points: dict[str, list[dict]] = {}
        curves: dict[str, dict[str, list]] = {}
        for row in members:
            if not math.isnan(row["forget_gap_mean"]):
                points.setdefault(row["scenario"], []).append({
                    "label": row["method"], "TA": row["TA_mean"], "TA_std": row["TA_std"],
                    "gap": row["forget_gap_mean"], "gap_std": row["forget_gap_std"], "reference": row["reference"]})
            if row["family"] and row["curves"]:
                curves.setdefault(row["scenario"], {})[row["method"]] = row["curves"]
        if points:
            written.append(plot_tradeoff(points, out / f"tradeoff_{dataset}_{arch}.png",
                                         title=f"{dataset}, {arch}: forgetting vs test accuracy"))
        if curves:
            written.append(plot_family_curves(curves, out / f"curves_{dataset}_{arch}.png",
                                              title=f"{dataset}, {arch}: masking family per epoch"))
    return written


# ---------------------------------------------------------------------------------------------------------------------
# The sweep
# ---------------------------------------------------------------------------------------------------------------------

@dataclass
class SweepOutcome:
    rows: list[dict]
    table: str
    computed: int
    reused: int
    failed: list[str]
    errors: list[str]
    seconds: float
    files: list[Path]


class Sweep:
    """Runs the cells (references first, then methods as soon as their references exist), logs each finished cell as a
    nested child of one parent mlflow run (from this process only, so SQLite sees one writer), writes the table."""

    def __init__(self, settings: Settings, tracker=None, experiment_id: str | None = None, progress: bool = True):
        self.settings = settings
        self.out = settings.out
        self.tracker = tracker
        self.experiment_id = experiment_id
        self.progress = progress
        self.cells, self.notes = build_cells(settings)
        self.parent = None

    # -- emit ----------------------------------------------------------------------------------------------------------
    def emit_commands(self, path: Path, tracking: dict | None) -> int:
        todo = [c for c in self.cells if c.kind == "method" and (self.settings.rerun or not is_done(c, self.out))]
        lines = [command_line(cell, self.out, tracking) for cell in todo]
        atomic_write_text(path, "".join(line + "\n" for line in lines))
        return len(lines)

    # -- run -----------------------------------------------------------------------------------------------------------
    def run(self) -> SweepOutcome:
        from tqdm.auto import tqdm

        start = time.perf_counter()
        self.out.mkdir(parents=True, exist_ok=True)
        compute_split_tags(self.cells, self.settings)
        if self.tracker is not None:
            self._start_parent()
        todo = [c for c in self.cells
                if (self.settings.rerun and c.kind in ("method", "reference")) or not is_done(c, self.out)]
        if self.settings.rerun:
            for cell in todo:
                cell.failure_path(self.out).unlink(missing_ok=True)
        todo_keys = {c.key for c in todo}
        reused = sum(1 for c in self.cells if c.key not in todo_keys)
        bar = tqdm(total=len(self.cells), initial=reused, desc="benchmark", unit="cell", disable=None if self.progress
                   else True, dynamic_ncols=True)
        failed: list[str] = []
        errors: list[str] = []
        computed = 0
        finished = {c.key for c in self.cells if c.key not in todo_keys}
        dead: set[str] = set()
        for cell in self.cells:  # cells finished earlier: logged now if this tracking backend has not seen them
            if cell.key in finished:
                self._track(cell)

        timings: dict[str, dict] = {}

        def handle(cell: Cell, report: dict) -> None:
            nonlocal computed
            computed += 1
            timings[cell.key] = {"kind": cell.kind, "label": cell.label, "scenario": cell.scenario, "seed": cell.seed,
                                 "status": report["status"], "seconds": report["seconds"],
                                 "cpu_seconds": report["cpu_seconds"]}
            if report["status"] == "ok":
                finished.add(cell.key)
                self._track(cell)
            else:
                dead.add(cell.key)
                message = f"{cell.kind} {cell.label or ''} ({cell.dataset}, {cell.scenario}, seed {cell.seed}): " \
                          f"{report['error']} (log: {self.out / 'logs'})"
                (failed if report["status"] == "failed" else errors).append(message)
                if report["status"] == "failed" and cell.kind == "method":  # deterministic: remembered, not retried
                    atomic_write_json(cell.failure_path(self.out), {"error": report["error"], "argv": cell.argv})
            bar.update(1)
            bar.set_postfix(computed=computed, reused=reused, failed=len(failed) + len(errors))

        # References first: they unlock everything else.
        pending = sorted(todo, key=lambda c: c.kind not in ("original", "retrain"))
        try:
            if self.settings.jobs <= 1:
                for cell in pending:
                    if any(d in dead for d in cell.deps):
                        dead.add(cell.key)
                        bar.update(1)
                        continue
                    handle(cell, execute(task_of(cell, self.out)))
            else:
                self._run_parallel(pending, finished, dead, handle, bar)
        except KeyboardInterrupt:
            self._end_parent("KILLED")
            raise
        finally:
            bar.close()
        rows = aggregate(self.cells, self.out)
        notes = list(self.notes)
        if failed or errors:
            notes.append(f"{len(failed) + len(errors)} cell(s) failed in this invocation; see {self.out / 'logs'}.")
        table = markdown_table(rows, notes, self.settings.seeds)
        files = [atomic_write_text(self.out / "results.md", table), atomic_write_text(self.out / "results.csv",
                                                                                       csv_table(rows))]
        files += write_plots(rows, self.out)
        seconds = time.perf_counter() - start
        summary = {"computed": computed, "reused": reused, "failed": failed, "errors": errors, "seconds": seconds,
                   "jobs": self.settings.jobs, "timings": timings,
                   "cells": {c.key: {"kind": c.kind, "label": c.label, "names": c.names, "scenario": c.scenario,
                                     "seed": c.seed, "argv": c.argv} for c in self.cells},
                   "settings": to_jsonable(vars(self.settings)), "git_commit": git_commit()}
        files.append(atomic_write_json(self.out / "sweep.json", summary))
        self._finish_parent(rows, files, failed or errors)
        return SweepOutcome(rows, table, computed, reused, failed, errors, seconds, files)

    def _run_parallel(self, pending: list[Cell], finished: set, dead: set, handle, bar) -> None:
        context = multiprocessing.get_context("spawn")  # fresh interpreters: no forked torch thread pools
        by_key = {c.key: c for c in pending}
        running: dict[futures.Future, Cell] = {}
        with futures.ProcessPoolExecutor(max_workers=self.settings.jobs, mp_context=context,
                                         initializer=_worker_init) as pool:
            while pending or running:
                for cell in list(pending):
                    if any(d in dead for d in cell.deps):
                        pending.remove(cell)
                        dead.add(cell.key)
                        bar.update(1)
                    elif len(running) < self.settings.jobs and all(d in finished for d in cell.deps):
                        pending.remove(cell)
                        running[pool.submit(execute, task_of(cell, self.out))] = cell
                if not running:
                    if pending:  # dependencies that are neither finished nor pending: cannot happen, but never hang
                        raise RuntimeError(f"unschedulable cells: {[c.key for c in pending]}")
                    break
                done, _ = futures.wait(running, return_when=futures.FIRST_COMPLETED)
                for future in done:
                    cell = running.pop(future)
                    handle(by_key[cell.key], future.result())

    # -- tracking ------------------------------------------------------------------------------------------------------
    def _start_parent(self) -> None:
        s = self.settings
        params = {"datasets": s.datasets, "archs": s.archs, "scenarios": s.scenarios, "methods": s.methods,
                  "seeds": s.seeds, "epochs": s.epochs, "unlearn_epochs": s.unlearn_epochs, "width": s.width,
                  "forget_fraction": s.forget_fraction, "forget_class": s.forget_class, "epoch_eval": s.epoch_eval,
                  "grid": s.grid, "config": s.config, "jobs": s.jobs, "out": s.out, "cells": len(self.cells)}
        import torch

        from utils import device_name, resolve_device

        tags = {"git_commit": git_commit(), "device": device_name(resolve_device(s.device)),
                "torch_version": str(torch.__version__), "sweep": "benchmark", "out": str(self.out.resolve())}
        name = f"benchmark-{'+'.join(s.datasets)}-{time.strftime('%Y%m%d-%H%M%S')}"
        self.parent = self.tracker.start_run(self.experiment_id, name, params=params, tags=tags)

    def _track(self, cell: Cell) -> None:
        """Log a finished method or Retrain-row cell as a child run, once per tracking backend."""
        if self.tracker is None or self.parent is None or self.parent.run_id is None:
            return
        if cell.kind not in ("method", "reference") or getattr(self.tracker, "broken", None):
            return
        from tracking import log_result_run

        path = cell.result_path(self.out)
        if not path.is_file():
            return
        result = json.loads(path.read_text())
        if (result.get("tracking") or {}).get("tracking_uri") == self.tracker.uri:
            return
        args = argparse.Namespace(**{**result["args"], "unlearn": cell.names[0]})
        tags = {**run_tags(args, split_hash=result.get("split_hash"), device=result.get("device")),
                "cell_key": cell.key, "methods": " ".join(cell.names), "row": cell.label}
        name = f"{cell.names[0]}-{cell.setting}-seed{cell.seed}"  # as mlflow_forget.py names its runs
        handle = log_result_run(self.tracker, self.experiment_id, name, result, path, tags, self.parent.run_id)
        if handle.record:
            result["tracking"] = handle.record
            atomic_write_json(path, result)

    def _finish_parent(self, rows: list[dict], files: list[Path], had_failures: bool) -> None:
        if self.parent is None:
            return
        self.parent.log_files(others=files)
        best = {}
        for row in rows:
            if not row["reference"] and row["seeds"] and not math.isnan(row["avg_gap_mean"]):
                key = f"{row['dataset']}.{row['arch']}.{row['scenario']}"
                if key not in best or row["avg_gap_mean"] < best[key]["avg_gap_mean"]:
                    best[key] = row
        self.parent.set_tags({f"best.{k}": row["method"] for k, row in best.items()})
        self.parent.log_metrics({f"best.{k}.avg_gap": row["avg_gap_mean"] for k, row in best.items()})
        self.parent.end("FAILED" if had_failures else "FINISHED")

    def _end_parent(self, status: str) -> None:
        if self.parent is not None:
            self.parent.end(status)
