"""`benchmark.py --tune`: an equal-budget hyper-parameter search on tuning cells disjoint from the evaluation cells,
the tuned configuration file it leaves, and the held-out evaluation of that file.

Budget. Every method configuration gets the same number of trials (`--trials N`) per scenario. A trial is one point
of the method's declared search space (`HParam.search`, next to each method's hyper-parameters): the learning rate on
a log scale for the epoch-based methods, the one-shot methods' own strengths (SSD's alpha and lambda, IU's and FF's
alpha). The number of epochs is not a trial dimension: each trial runs the method's maximum (the declared
`("per_epoch", max)`) with evaluation after every epoch, and the best epoch is read off those curves. The masking
family's beta and q stay at their defaults, so a masked alias has exactly its base's trials. The N points are a fixed
design, not random draws: evenly spaced (in log or linear units) for one dimension, a Hammersley set (first coordinate
evenly spaced, the others radical inverses in bases 2, 3, ...) for several.

Cells. Tuning runs on `--tune-seeds` (default 101 102, with their own original and Retrain models) and, for class-wise
forgetting, on `--tune-classes` (default 3 and 7); evaluation uses other seeds (default 1-5 for random forgetting, 1-3
for class-wise forgetting) and other classes (`--forget_classes`, default 0 1 2). Overlap is refused before any work.

Selection (`--select`). `gap`: the lowest mean Avg. Gap to Retrain over the tuning cells (the field's convention).
`retrain_free`: needs no Retrain model, only the run's own accuracies: |forget accuracy - target| + (100 - retain
accuracy), where the target is the validation accuracy for random forgetting (forget samples should look like unseen
ones) and 0 for class-wise forgetting (a model that never saw a class does not predict it); the second term keeps the
retain accuracy from dropping (a trained model fits its training split, about 100 %). Both rules are computed from the
same trials; the held-out evaluation runs the chosen rule's file and, unless `--no-compare-select`, the other rule's
choices too, so the table says how much the Retrain-free rule loses.

Output. `<out>/tune/` holds the trials (cells, their table), `<out>/tuned.json` the chosen values in the format
`--config` reads plus a `provenance` key, `<out>/results.md` the held-out table with its paired comparisons, and
`<out>/select_comparison.md` the comparison of the two selection rules. With tracking, one mlflow parent run holds every
tuning and evaluation cell as a nested child run.
"""
from __future__ import annotations

from arg_parser import POSITIVE_INT as _positive, number

import argparse
import dataclasses
import datetime
import json
import math
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sweep import Sweep
from sweep.grid import Cell, build_cells, method_flags, read_result
from sweep.settings import Settings
from unlearn.registry import match_methods, method_hparams, resolve_method
from utils import UserError, atomic_write_json, atomic_write_text, git_commit

__all__ = ["CRITERIA", "DEFAULT_FORGET_CLASSES", "DEFAULT_TUNE_CLASSES", "DEFAULT_TUNE_SEEDS", "Selection",
           "TunePlan", "add_tune_flags", "check_tune_args", "design", "epoch_scores", "plan_from_args", "run_tune",
           "search_space", "select", "trial_values", "tuned_config"]

CRITERIA = ("gap", "retrain_free")
DEFAULT_TRIALS = 4
DEFAULT_TUNE_SEEDS = (101, 102)
DEFAULT_TUNE_CLASSES = (3, 7)
DEFAULT_FORGET_CLASSES = (0, 1, 2)
# Held-out seeds when --seeds is not given: the 1-5 for random forgetting (one forget set per seed) and 1-3
# for class-wise forgetting (times the forget classes).
DEFAULT_EVAL_SEEDS = {"random": (1, 2, 3, 4, 5), "classwise": (1, 2, 3)}
TUNABLE_SCENARIOS = ("random", "classwise")
SIGNIFICANT_DIGITS = 3  # trial values are rounded, so tuned.json and the table read 0.00316, not 0.0031622776601683794


# ---------------------------------------------------------------------------------------------------------------------
# Flags and checks
# ---------------------------------------------------------------------------------------------------------------------





def add_tune_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("tuning (--tune: equal-budget search on held-out seeds and classes; see sweep/tune.py)")
    g.add_argument("--tune", action="store_true",
                   help="search each method's declared space on the tuning cells, write <out>/tuned.json, then "
                        "evaluate it on the evaluation cells")
    g.add_argument("--trials", type=_positive, default=None,
                   help=f"trials per method configuration and scenario, the same for every method (default "
                        f"{DEFAULT_TRIALS}; epochs are read off per-epoch evaluation and cost no trials)")
    g.add_argument("--tune-seeds", dest="tune_seeds", nargs="+", type=_positive, default=None,
                   help="seeds of the tuning cells, none of them an evaluation seed (default 101 102)")
    g.add_argument("--tune-classes", dest="tune_classes", nargs="+", type=_class, default=None,
                   help="class-wise tuning classes, none of them an evaluation class (default 3 7)")
    g.add_argument("--forget_classes", nargs="+", type=_class, default=None,
                   help="class-wise evaluation classes with --tune (default 0 1 2)")
    g.add_argument("--select", default=None, choices=CRITERIA,
                   help="selection rule: gap = mean Avg. Gap to Retrain; retrain_free = forget accuracy closest to the "
                        "validation accuracy (random) or 0 (class-wise) while retain accuracy stays (default gap)")
    g.add_argument("--compare-select", dest="compare_select", action=argparse.BooleanOptionalAction, default=None,
                   help="also evaluate the other selection rule's choices on the held-out cells (default: yes)")


# Flags that only mean something with --tune (all default to None, so giving one without --tune is detected).
TUNE_ONLY = (("--trials", "trials"), ("--tune-seeds", "tune_seeds"), ("--tune-classes", "tune_classes"),
             ("--forget_classes", "forget_classes"), ("--select", "select"), ("--compare-select", "compare_select"))


def _fill_defaults(args: argparse.Namespace) -> None:
    defaults = {"trials": DEFAULT_TRIALS, "tune_seeds": list(DEFAULT_TUNE_SEEDS),
                "tune_classes": list(DEFAULT_TUNE_CLASSES), "forget_classes": list(DEFAULT_FORGET_CLASSES),
                "select": "gap", "compare_select": True}
    for dest, value in defaults.items():
        if getattr(args, dest) is None:
            setattr(args, dest, value)


@dataclass(frozen=True)
class TunePlan:
    trials: int
    tune_seeds: tuple[int, ...]
    tune_classes: tuple[int, ...]
    eval_seeds: dict[str, tuple[int, ...]]
    forget_classes: tuple[int, ...]
    criterion: str
    compare_select: bool
    methods: tuple[str, ...]            # tuned (non-empty search space)
    untuned: tuple[str, ...]            # evaluated with their defaults (nothing to search: raw)

    @property
    def other_criterion(self) -> str:
        """The selection rule not chosen by --select (its choices are evaluated too, for the comparison)."""
        return next(c for c in CRITERIA if c != self.criterion)

    @property
    def all_eval_seeds(self) -> list[int]:
        return sorted({s for seeds in self.eval_seeds.values() for s in seeds})


def check_tune_args(args: argparse.Namespace, num_classes: dict[str, int]) -> None:
    """One-line UserError for flag combinations --tune cannot run; `num_classes` per selected dataset."""
    if not args.tune:
        for flag, dest in TUNE_ONLY:
            if getattr(args, dest) is not None:
                extra = " (without it, --forget_class picks the one class-wise class)" if dest == "forget_classes" else ""
                raise UserError(f"{flag} needs --tune{extra}")
        return
    _fill_defaults(args)
    if args.emit_commands:
        raise UserError("--tune runs its trials itself and cannot be combined with --emit-commands")
    if args.grid:
        raise UserError("--tune searches the declared spaces; --grid cannot be combined with it")
    if args.config:
        raise UserError("--tune starts from each method's declared defaults; --config cannot be combined with it")
    if args.unlearn_epochs is not None:
        raise UserError("--tune reads the epochs off per-epoch evaluation; --unlearn_epochs cannot be combined with it")
    other = [s for s in args.scenarios if s not in TUNABLE_SCENARIOS]
    if other:
        raise UserError(f"--tune supports the scenarios {', '.join(TUNABLE_SCENARIOS)}; not {', '.join(other)}")
    eval_seeds = set(args.seeds) if args.seeds else {s for seeds in DEFAULT_EVAL_SEEDS.values() for s in seeds}
    shared = sorted(set(args.tune_seeds) & eval_seeds)
    if shared:
        raise UserError(f"--tune-seeds {' '.join(map(str, shared))}: also an evaluation seed; tuning seeds must be "
                        f"disjoint from --seeds ({' '.join(map(str, sorted(eval_seeds)))})")
    forget_classes = args.forget_classes
    shared = sorted(set(args.tune_classes) & set(forget_classes))
    if shared:
        raise UserError(f"--tune-classes {' '.join(map(str, shared))}: also an evaluation class; tuning classes must "
                        f"be disjoint from --forget_classes ({' '.join(map(str, forget_classes))})")
    for dataset, count in num_classes.items():
        for flag, classes in (("--tune-classes", args.tune_classes), ("--forget_classes", forget_classes)):
            outside = sorted(c for c in classes if not 0 <= c < count)
            if outside:
                raise UserError(f"{flag} {' '.join(map(str, outside))}: {dataset} has classes 0-{count - 1}")
    for flag, values in (("--tune-seeds", args.tune_seeds), ("--tune-classes", args.tune_classes),
                         ("--forget_classes", forget_classes)):
        if len(set(values)) != len(values):
            raise UserError(f"{flag}: a value is given twice ({' '.join(map(str, values))})")


def plan_from_args(args: argparse.Namespace) -> TunePlan:
    _fill_defaults(args)
    names = [n for n in match_methods(args.methods) if n not in ("retrain",)]
    tuned = tuple(n for n in names if search_space(n))
    untuned = tuple(n for n in names if not search_space(n))
    if not tuned:
        raise UserError(f"--tune: none of the selected methods ({', '.join(names)}) declares a search space")
    eval_seeds = {s: tuple(args.seeds) if args.seeds else DEFAULT_EVAL_SEEDS[s] for s in args.scenarios}
    forget_classes = tuple(args.forget_classes)
    return TunePlan(args.trials, tuple(args.tune_seeds), tuple(args.tune_classes), eval_seeds, forget_classes,
                    args.select, args.compare_select, tuned, untuned)


# ---------------------------------------------------------------------------------------------------------------------
# Search space and design
# ---------------------------------------------------------------------------------------------------------------------

def search_space(name: str) -> dict[str, tuple]:
    """Flag (config-file key) -> declared search space of the configuration `name` stands for (alias: its base's)."""
    return {hp.flag: hp.search for hp in method_hparams(resolve_method(name)) if hp.search}


def _radical_inverse(index: int, base: int) -> float:
    result, fraction = 0.0, 1.0 / base
    while index > 0:
        index, digit = divmod(index, base)
        result += digit * fraction
        fraction /= base
    return result


PRIMES = (2, 3, 5, 7, 11, 13)


def design(n: int, dimensions: int) -> list[tuple[float, ...]]:
    """`n` points in the open unit cube: the first coordinate (i + 0.5) / n, coordinate k >= 2 the radical inverse of
    i + 1 in the (k-1)-th prime (a Hammersley set): evenly spread, fixed, and the same for every method."""
    if dimensions > len(PRIMES) + 1:
        raise ValueError(f"design: at most {len(PRIMES) + 1} dimensions")
    return [((i + 0.5) / n,) + tuple(_radical_inverse(i + 1, PRIMES[k]) for k in range(dimensions - 1))
            for i in range(n)]


def _round(value: float) -> float:
    return float(f"{value:.{SIGNIFICANT_DIGITS}g}")


def _value(space: tuple, u: float) -> Any:
    kind, *rest = space
    if kind == "log":
        low, high = rest
        return _round(math.exp(math.log(low) + u * (math.log(high) - math.log(low))))
    if kind == "linear":
        low, high = rest
        return _round(low + u * (high - low))
    if kind == "choice":
        return rest[min(int(u * len(rest)), len(rest) - 1)]
    raise ValueError(f"no design value for search kind {kind!r}")


def trial_values(name: str, trials: int) -> list[dict[str, Any]]:
    """The `trials` flag settings of the configuration `name`: the design over its searched dimensions, plus each
    per-epoch dimension at its maximum (the epoch is chosen afterwards from the curves)."""
    space = search_space(name)
    searched = sorted(flag for flag, s in space.items() if s[0] != "per_epoch")
    per_epoch = {flag: s[1] for flag, s in space.items() if s[0] == "per_epoch"}
    if not searched:  # only epochs to choose: the trials would all be the same run
        raise ValueError(f"{name}: a search space needs a dimension besides the epochs")
    return [{**{flag: _value(space[flag], u) for flag, u in zip(searched, point)}, **per_epoch}
            for point in design(trials, len(searched))]


def epochs_flag(name: str) -> str | None:
    return next((flag for flag, s in search_space(name).items() if s[0] == "per_epoch"), None)


# ---------------------------------------------------------------------------------------------------------------------
# Scores and selection
# ---------------------------------------------------------------------------------------------------------------------

def _score(entry: dict, scenario: str, criterion: str) -> float:
    if criterion == "gap":
        return float(entry["avg_gap"])
    accuracy = entry["accuracy"]
    target = accuracy["val"] if scenario == "random" else 0.0
    return abs(accuracy["forget"] - target) + max(0.0, 100.0 - accuracy["retain"])


def epoch_scores(result: dict, scenario: str, criterion: str) -> dict[int, float]:
    """Epoch -> score of one cell: from its per-epoch curves, else (no curves) its final result at `epochs_run`."""
    curves = result.get("curves") or [{**result, "epoch": int(result.get("epochs_run") or 1)}]
    return {int(entry["epoch"]): _score(entry, scenario, criterion) for entry in curves}


@dataclass(frozen=True)
class Selection:
    config: str                    # row label of the configuration (its names joined)
    names: tuple[str, ...]
    scenario: str
    trial: int                     # 0-based; -1 when no trial finished on every tuning cell
    epoch: int | None
    score: float
    values: dict[str, Any]         # the flags to ship
    trials: int                    # trials run (the budget)
    cells_per_trial: int


def select(trials: list[list[dict | None]], scenario: str, criterion: str) -> tuple[int, int | None, float]:
    """(trial, epoch, score) with the lowest mean score over the tuning cells. `trials[i]` holds the result of each
    tuning cell of trial i (None: failed, e.g. diverged); a trial needs every cell, an epoch needs every cell's
    evaluation at that epoch. Ties go to the earlier trial, then the fewer epochs. (-1, None, inf) when nothing ran."""
    best = (-1, None, math.inf)
    for index, results in enumerate(trials):
        if not results or any(r is None for r in results):
            continue
        per_cell = [epoch_scores(r, scenario, criterion) for r in results]
        for epoch in sorted(set.intersection(*(set(s) for s in per_cell))):
            score = float(np.mean([s[epoch] for s in per_cell]))
            if score < best[2]:
                best = (index, epoch, score)
    return best


# ---------------------------------------------------------------------------------------------------------------------
# Cells of the two phases
# ---------------------------------------------------------------------------------------------------------------------

def _phase_settings(base: Settings, **changes: Any) -> Settings:
    return dataclasses.replace(base, **changes)


def _merge(builds: list[tuple[list[Cell], list[str]]]) -> tuple[list[Cell], list[str]]:
    by_key: dict[str, Cell] = {}
    notes: list[str] = []
    for cells, build_notes in builds:
        for cell in cells:
            if cell.key not in by_key:
                by_key[cell.key] = cell
            else:
                for name in cell.names:
                    if name not in by_key[cell.key].names:
                        by_key[cell.key].names.append(name)
        notes += [n for n in build_notes if n not in notes]
    # References first, as build_cells orders them within one build.
    cells = sorted(by_key.values(), key=lambda c: c.kind not in ("original", "retrain", "reference"))
    return cells, notes


def _scenario_builds(settings: Settings, seeds_of: dict[str, tuple[int, ...]], classes: tuple[int, ...]) \
        -> list[tuple[list[Cell], list[str]]]:
    builds = []
    for scenario in settings.scenarios:
        for forget_class in (classes if scenario == "classwise" else (settings.forget_class,)):
            builds.append(build_cells(_phase_settings(settings, scenarios=[scenario], seeds=list(seeds_of[scenario]),
                                                      forget_class=forget_class)))
    return builds


def tuning_cells(settings: Settings, plan: TunePlan, empty_config: Path) \
        -> tuple[list[Cell], list[str], dict[str, tuple[str, int]]]:
    """The trial cells (per-epoch evaluation on every method) and cell key -> (configuration, trial index)."""
    seeds_of = {s: plan.tune_seeds for s in settings.scenarios}
    builds = []
    trial_of: dict[str, tuple[str, int]] = {}
    values = {name: trial_values(name, plan.trials) for name in plan.methods}
    for index in range(plan.trials):
        grid = {name: values[name][index] for name in plan.methods}
        trial_settings = _phase_settings(settings, methods=list(plan.methods), grid=grid, config=empty_config,
                                         epoch_eval="all", unlearn_epochs=None, forget_quality=0)
        trial_builds = _scenario_builds(trial_settings, seeds_of, plan.tune_classes)
        for cells, _ in trial_builds:
            for cell in cells:
                if cell.kind == "method":
                    trial_of.setdefault(cell.key, (cell.names[0], index))
        builds += trial_builds
    cells, notes = _merge(builds)
    for cell in cells:
        if cell.kind == "method":
            cell.label = f"{' = '.join(cell.names)} trial {trial_of[cell.key][1] + 1}"
    return cells, notes, trial_of


def evaluation_cells(settings: Settings, plan: TunePlan, config: Path, label_suffix: str = "") \
        -> tuple[list[Cell], list[str]]:
    methods = list(plan.methods + plan.untuned)
    cells, notes = _merge(_scenario_builds(_phase_settings(settings, methods=methods, config=config),
                                           plan.eval_seeds, plan.forget_classes))
    for cell in cells:
        if cell.kind == "method":
            cell.label = " = ".join(cell.names) + label_suffix
    return cells, notes


# ---------------------------------------------------------------------------------------------------------------------
# Selection over the trial cells, and the tuned file
# ---------------------------------------------------------------------------------------------------------------------

def selections(cells: list[Cell], out: Path, plan: TunePlan, trial_of: dict[str, tuple[str, int]],
               criterion: str) -> list[Selection]:
    """The best trial and epoch of each configuration and scenario under `criterion`."""
    grouped: dict[tuple[str, str], dict[int, list[dict | None]]] = {}
    names_of: dict[str, tuple[str, ...]] = {}
    for cell in cells:
        if cell.kind != "method":
            continue
        config, index = trial_of[cell.key]
        names_of[config] = tuple(cell.names)
        grouped.setdefault((config, cell.scenario), {}).setdefault(index, []).append(read_result(cell, out))
    chosen = []
    for (config, scenario), by_trial in grouped.items():
        ordered = [by_trial.get(i, []) for i in range(plan.trials)]
        index, epoch, score = select(ordered, scenario, criterion)
        values: dict[str, Any] = {}
        if index >= 0:
            values = dict(trial_values(config, plan.trials)[index])
            flag = epochs_flag(config)
            if flag is not None and epoch is not None:
                values[flag] = epoch
        chosen.append(Selection(" = ".join(names_of[config]), names_of[config], scenario, index, epoch, score, values,
                                plan.trials, max((len(v) for v in by_trial.values()), default=0)))
    return chosen


def tuned_config(chosen: list[Selection]) -> dict[str, dict]:
    """{"<name>": {"scenarios": {"<scenario>": {flag: value}}}} for every name of every tuned configuration; a
    configuration with no finished trial keeps its defaults (no entry for that scenario)."""
    payload: dict[str, dict] = {}
    for selection in chosen:
        if not selection.values:
            continue
        for name in selection.names:
            payload.setdefault(name, {"scenarios": {}})["scenarios"][selection.scenario] = dict(selection.values)
    return dict(sorted(payload.items(), key=lambda item: item[0].lower()))


def provenance(plan: TunePlan, chosen: list[Selection], other: list[Selection], argv: list[str],
               seconds: float, cpu_seconds: float) -> dict:
    spaces = {}
    for name in plan.methods:
        spaces[name] = {flag: list(space) for flag, space in sorted(search_space(name).items())}
    per_method: dict[str, dict] = {}
    for selection in chosen:
        entry = per_method.setdefault(selection.config, {"names": list(selection.names), "trials": selection.trials,
                                                          "tuning_cells_per_trial": {}, "best_score": {},
                                                          "best_trial": {}})
        entry["tuning_cells_per_trial"][selection.scenario] = selection.cells_per_trial
        entry["best_score"][selection.scenario] = None if math.isinf(selection.score) else round(selection.score, 4)
        entry["best_trial"][selection.scenario] = selection.trial + 1 if selection.trial >= 0 else None
    return {
        "command": "python " + " ".join(shlex.quote(a) for a in argv),
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "tune_seeds": list(plan.tune_seeds), "tune_classes": list(plan.tune_classes),
        "eval_seeds": {k: list(v) for k, v in plan.eval_seeds.items()}, "forget_classes": list(plan.forget_classes),
        "criterion": plan.criterion, "trials_per_method": plan.trials,
        "search_space": spaces, "methods": per_method,
        "not_tuned": {name: "no search space declared (nothing to tune)" for name in plan.untuned},
        f"choices_under_{plan.other_criterion}": {f"{s.config} | {s.scenario}": s.values for s in other},
        "tuning_seconds": round(seconds, 1), "tuning_cpu_seconds": round(cpu_seconds, 1),
    }


# ---------------------------------------------------------------------------------------------------------------------
# Running the phases under one mlflow parent run
# ---------------------------------------------------------------------------------------------------------------------

class PhaseSweep(Sweep):
    """A Sweep over given cells whose mlflow parent run is shared between phases: the first phase starts it, every
    phase's cells become its nested children, and only the phase with `last=True` ends it."""

    paired_comparisons = True

    def __init__(self, settings: Settings, cells: list[Cell], notes: list[str], tracker, experiment_id,
                 progress: bool, shared: dict, last: bool, paired: bool):
        super().__init__(settings, tracker, experiment_id, progress)
        self.cells, self.notes = cells, notes
        self.shared, self.last = shared, last
        self.paired_comparisons = paired

    def _start_parent(self) -> None:
        if self.shared.get("parent") is None:
            super()._start_parent()
            self.shared["parent"] = self.parent
        self.parent = self.shared["parent"]

    def _finish_parent(self, rows, files, had_failures) -> None:
        self.shared.setdefault("files", []).extend(files)
        self.shared["failed"] = self.shared.get("failed", False) or bool(had_failures)
        if self.last:
            super()._finish_parent(rows, self.shared["files"], self.shared["failed"])


def _cpu_seconds(sweep_json: Path) -> float:
    try:
        timings = json.loads(sweep_json.read_text()).get("timings", {})
    except (OSError, json.JSONDecodeError):
        return math.nan
    return float(sum(t.get("cpu_seconds") or 0.0 for t in timings.values()))


def _select_comparison(plan: TunePlan, chosen: list[Selection], other: list[Selection], main_cells: list[Cell],
                       other_cells: list[Cell], out: Path) -> str:
    """Held-out Avg. Gap of each configuration under the two rules, and how much the Retrain-free rule loses."""
    from sweep.stats import compare, sentence

    def values(cells: list[Cell]) -> dict[tuple, dict[tuple, float]]:
        table: dict[tuple, dict[tuple, float]] = {}
        for cell in cells:
            result = read_result(cell, out) if cell.kind == "method" else None
            if result is not None and "avg_gap" in result:
                table.setdefault((tuple(cell.names), cell.scenario), {})[(cell.setting, cell.seed)] = \
                    float(result["avg_gap"])
        return table

    by_rule = {plan.criterion: values(main_cells), plan.other_criterion: values(other_cells)}
    gap, free = by_rule["gap"], by_rule["retrain_free"]
    lines = ["## Selection rules on the held-out cells", "",
             "Held-out Avg. Gap (mean over the evaluation cells) of each configuration as chosen by `--select gap` "
             "(needs Retrain) and by `--select retrain_free` (needs none); 'loss' = retrain_free minus gap.", "",
             "| Configuration | scenario | gap rule | retrain-free rule | loss | same choice |", "|---|---|---|---|---|---|"]
    pairs_all: list[tuple[float, float]] = []
    rule_values = {(plan.criterion, s.names, s.scenario): s.values for s in chosen}
    rule_values.update({(plan.other_criterion, s.names, s.scenario): s.values
                        for s in other})
    losses = []
    for key in sorted(set(gap) & set(free), key=lambda k: (k[1], " = ".join(k[0]).lower())):
        shared = sorted(set(gap[key]) & set(free[key]))
        if not shared:
            continue
        g = float(np.mean([gap[key][k] for k in shared]))
        f = float(np.mean([free[key][k] for k in shared]))
        same = rule_values.get(("gap",) + key) == rule_values.get(("retrain_free",) + key)
        losses.append(f - g)
        pairs_all += [(free[key][k], gap[key][k]) for k in shared]
        lines.append(f"| {' = '.join(key[0])} | {key[1]} | {g:.2f} | {f:.2f} | {f - g:+.2f} | "
                     f"{'yes' if same else 'no'} |")
    if losses:
        overall = compare("retrain_free rule", "gap rule", "all", pairs_all)
        lines += ["", f"Over {len(losses)} configuration-scenario rows the Retrain-free rule's held-out Avg. Gap is "
                      f"{np.mean(losses):+.2f} points on average relative to the gap rule (median "
                      f"{np.median(losses):+.2f}); paired over all {overall.n} cells: {sentence(overall)}"]
    return "\n".join(lines) + "\n"


def run_tune(settings: Settings, plan: TunePlan, tracker, experiment_id, progress: bool, argv: list[str]) -> dict:
    """Both phases; returns what benchmark.py prints: tables, files, timings, failures."""
    out = settings.out
    tune_dir = out / "tune"
    tune_dir.mkdir(parents=True, exist_ok=True)
    # The trials start from the declared defaults: an empty hyper-parameter file stops the shipped one from applying.
    empty_config = atomic_write_json(tune_dir / "no_config.json", {})
    shared: dict = {}
    start = time.perf_counter()
    cells, notes, trial_of = tuning_cells(_phase_settings(settings, out=tune_dir), plan, empty_config)
    tuning = PhaseSweep(_phase_settings(settings, out=tune_dir, seeds=list(plan.tune_seeds)), cells, notes, tracker,
                        experiment_id, progress, shared, last=False, paired=False)
    tune_outcome = tuning.run()
    tune_seconds = time.perf_counter() - start
    tune_cpu = _cpu_seconds(tune_dir / "sweep.json")

    chosen = selections(cells, tune_dir, plan, trial_of, plan.criterion)
    other_criterion = plan.other_criterion
    other = selections(cells, tune_dir, plan, trial_of, other_criterion)
    payload = {**tuned_config(chosen), "provenance": provenance(plan, chosen, other, argv, tune_seconds, tune_cpu)}
    tuned_path = atomic_write_json(out / "tuned.json", payload)
    other_path = atomic_write_json(tune_dir / f"tuned_{other_criterion}.json", tuned_config(other))

    eval_start = time.perf_counter()
    other_cells: list[Cell] = []
    other_outcome = None
    eval_cpu = 0.0
    if plan.compare_select:
        # The other rule's choices first, into the same <out>/cells and <out>/models: the main evaluation below then
        # finds every cell where both rules chose the same values already done, and runs only the rest.
        other_cells, other_notes = evaluation_cells(settings, plan, other_path, f" [{other_criterion}]")
        other_outcome = PhaseSweep(_phase_settings(settings, seeds=plan.all_eval_seeds), other_cells, other_notes,
                                   tracker, experiment_id, progress, shared, last=False, paired=False).run()
        eval_cpu += _cpu_seconds(out / "sweep.json")
        for name in ("results.md", "results.csv"):  # the other rule's table, kept under its own name
            atomic_write_text(out / name.replace("results", f"results_select_{other_criterion}"),
                              (out / name).read_text())
    main_cells, main_notes = evaluation_cells(settings, plan, tuned_path)
    main_notes = [f"Hyper-parameters: {tuned_path} (selected by `--select {plan.criterion}` from {plan.trials} trials "
                  f"per method on seeds {' '.join(map(str, plan.tune_seeds))}"
                  + (f" and classes {' '.join(map(str, plan.tune_classes))}" if "classwise" in settings.scenarios
                     else "") + ")."] + main_notes
    evaluation = PhaseSweep(_phase_settings(settings, seeds=plan.all_eval_seeds),
                            main_cells, main_notes, tracker, experiment_id, progress, shared, last=True, paired=True)
    eval_outcome = evaluation.run()
    eval_seconds = time.perf_counter() - eval_start
    eval_cpu += _cpu_seconds(out / "sweep.json")
    files = [tuned_path]
    comparison = ""
    if plan.compare_select:
        comparison = _select_comparison(plan, chosen, other, main_cells, other_cells, out)
        files.append(atomic_write_text(out / "select_comparison.md", comparison))
    outcomes = [tune_outcome, eval_outcome] + ([other_outcome] if other_outcome is not None else [])
    return {"tuned": tuned_path, "table": eval_outcome.table, "comparison": comparison, "files": files,
            "tune_seconds": tune_seconds, "tune_cpu_seconds": tune_cpu, "eval_seconds": eval_seconds,
            "eval_cpu_seconds": eval_cpu,
            "computed": sum(o.computed for o in outcomes), "reused": sum(o.reused for o in outcomes),
            "failed": [m for o in outcomes for m in o.failed], "errors": [m for o in outcomes for m in o.errors],
            "method_rows": eval_outcome.method_rows_with_results}

_class = number(int, 0)  # a class index
