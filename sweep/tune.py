"""`benchmark.py --tune`: an equal-budget hyper-parameter search on tuning cells disjoint from the evaluation cells,
the tuned configuration file it leaves, and the held-out evaluation of that file.

Budget. Every method configuration gets the same number of trials (`--trials N`, default 8) per scenario. A trial is
one point of the method's declared search space (`HParam.search`, next to each method's hyper-parameters): the learning
rate on a log scale (3 decades or more) for the epoch-based methods, the one-shot methods' own strengths (SSD's alpha
and lambda, IU's and FF's alpha). The number of epochs is not a trial dimension where the horizon property holds
(epoch e of a longer run is exactly a fresh e-epoch run, tests/test_horizon.py): each trial runs the common maximum
(`unlearn.common.MAX_TUNED_EPOCHS`, declared `("per_epoch", max)`) with evaluation after every epoch, and the best
epoch is read off those curves. A horizon-dependent method (FT_l1, SalUn_soft: a schedule over the run's length) has
its epoch count as the design's last coordinate instead, and only each trial's last epoch is a candidate. A trial that
diverged keeps the epochs before its divergence as candidates. A trial of the other iterative methods ends once no
selection score has improved by more than `--select-tolerance` for `--trial-patience` epochs (default 8; the epochs
that ran are its candidates). Among all candidates, those within `--select-tolerance` points (default 0.5, the
epoch-to-epoch noise of the curves) of the lowest score are equally good, and the fewest epochs win (`select`).
The masking family's beta and q stay at their defaults, so a masked alias has exactly its base's trials. The N points
are a fixed design, not random draws: evenly spaced (in log or linear units) for one dimension, a Hammersley set
(first coordinate evenly spaced, the others radical inverses in bases 2, 3, ...) for several. A choice on the edge of
what its dimension tried is flagged (provenance `on_edge`, and "[high edge]" / "[low edge]" in the table's settings
column); `tune/sensitivity_<scenario>.png` plots each trial's best score against its learning rate. docs/tuning.md
has the details.

Cells. A seed is one independent replication: every model of seed s (original, Retrain) is initialised from
`--train_seed s` (the single-run scripts keep upstream's 1). Both phases lay out their cells the same way: one cell per
seed and scenario, and class-wise, one class per seed, seed s forgetting the ((s - 1) mod n)-th of n pool classes
(scenarios/classwise.py), so each class-wise cell has its own original model and its own class. Tuning runs on
`--tune-seeds` (default 101) with the pool `--tune-classes` (default 3: seed 101 forgets 3; every tuning class must
be drawn by some tuning seed). The held-out evaluation uses other seeds (default 1-11 for both
scenarios) and the pool `--forget_classes` (default: every class that is not a tuning class). Overlap
of seeds or classes is refused before any work; the provenance records every unit's seed, class and initialisation.

Selection (`--select`). Both rules read the training pool only (forget, retain and validation samples), never the
test set whose TA and MIA-Efficacy the held-out table reports: a trial evaluates each epoch with `mlflow_forget.py
--epoch-eval-metrics selection`, which runs no forward pass on the test set at all. `gap`: the lowest mean
validation gap to Retrain over the tuning cells: mean |method - Retrain| over UA, RA, VA and MIA_efficacy_val (the
field's Avg. Gap with the validation split in the test set's place: VA = accuracy on the validation split, the
forgotten class left out in class-wise forgetting as the test set leaves it out; MIA_efficacy_val = upstream's SVC
attack on the confidence feature with those validation samples as shadow non-members and as many first retain samples
as shadow members, applied to the forget set; Retrain's values are computed the same way on its own model).
`retrain_free`: needs no Retrain model, only the run's own accuracies: |forget accuracy - target| + (100 - retain
accuracy), where the target is the validation accuracy for random forgetting (forget samples should look like unseen
ones) and 0 for class-wise forgetting (a model that never saw a class does not predict it); the second term keeps the
retain accuracy from dropping (a trained model fits its training split, about 100 %). Both rules are computed from the
same trials; the held-out evaluation runs the chosen rule's file and, unless `--no-compare-select`, the other rule's
choices too, so the table says how much the Retrain-free rule loses. The held-out table keeps the field's conventions
(TA and MIA-Efficacy on the test set, Avg. Gap over UA, RA, TA, MIA-Efficacy).

Output. `<out>/tune/` holds the trials (cells, their table), `<out>/tuned.json` the chosen values in the format
`--config` reads plus a `provenance` key, `<out>/results.md` the held-out table with its paired comparisons, and
`<out>/select_comparison.md` the comparison of the two selection rules. With tracking, one mlflow parent run holds every
tuning and evaluation cell as a nested child run.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from arg_parser import NON_NEGATIVE_INT, SCORE_POINTS, number
from arg_parser import POSITIVE_INT as _positive
from dataset import num_classes_of
from evaluation.selection import CRITERIA, selection_score
from plots import plot_sensitivity
from scenarios.classwise import RESERVED_CLASSES, class_pool, forget_class_of
from sweep import Sweep
from sweep.grid import Cell, build_cells, parse_cell, read_cell_json, read_result
from sweep.settings import Settings
from sweep.stats import ALPHA, TESTS, compare, holm, min_p, min_units, sentence
from unlearn.registry import METHODS, match_methods, method_hparams, resolve_method
from utils import UserError, atomic_write_json, atomic_write_text, git_commit

__all__ = ["CRITERIA", "DEFAULT_TUNE_CLASSES", "DEFAULT_TUNE_SEEDS", "Selection",
           "TunePlan", "add_tune_flags", "check_tune_args", "design", "epoch_scores", "plan_from_args", "run_tune",
           "search_space", "select", "trial_values", "tuned_config"]

# 8 trials: the learning rate (or a one-shot method's strength) at 8 points of a 3-decade range, about 0.4 decades
# apart; the same number for every configuration and scenario.
DEFAULT_TRIALS = 8
# One tuning replication per scenario by default: the search then costs half of what two cost (432 trial cells with
# every registered configuration, about 34 minutes on 2 CPU cores with --jobs 2). The held-out cells
# judge the choices either way; `--tune-seeds 101 102 --tune-classes 3 7` averages each trial over two replications.
DEFAULT_TUNE_SEEDS = (101,)
DEFAULT_TUNE_CLASSES = RESERVED_CLASSES  # (3,): the class the default class pool leaves out
# Held-out seeds when --seeds is not given: 11 independent replications per scenario (each its own initialisation and,
# class-wise, its own class). 11, not 10: with every registered configuration the "vs SalUn" family holds 26
# comparisons, and Holm multiplies the smallest p-value the sign-flip test can give (2 / 2^n) by 26: 0.051 with 10
# seeds (no verdict possible), 0.025 with 11 (tests/test_independent_units.py checks this against the registry).
DEFAULT_EVAL_SEEDS = {"random": tuple(range(1, 12)), "classwise": tuple(range(1, 12))}
TUNABLE_SCENARIOS = ("random", "classwise")
# Selection scores closer than this (accuracy points) are noise: on the plateau of the search's validation-gap curves,
# consecutive epochs differ by a median 0.54 points (docs/tuning.md). Among such candidates the fewest epochs win.
DEFAULT_SELECT_TOLERANCE = 0.5
# A trial ends once no selection score has improved by more than the tolerance for this many epochs. Replayed on the
# curves of a full search (commit d8408ec, every trial run to 30 epochs), patience 8 cut the search's cell time by
# 30 % and moved 13 of its 108 choices (both rules) off a later epoch that was better by more than the tolerance;
# patience 10 cut 22 % and moved 8 (docs/tuning.md).
DEFAULT_TRIAL_PATIENCE = 8
SIGNIFICANT_DIGITS = 3  # trial values are rounded, so tuned.json and the table read 0.00316, not 0.0031622776601683794


# ---------------------------------------------------------------------------------------------------------------------
# Flags and checks
# ---------------------------------------------------------------------------------------------------------------------





def add_tune_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("tuning (--tune: equal-budget search on held-out seeds and classes; "
                                  "see sweep/tune.py)")
    g.add_argument("--tune", action="store_true",
                   help="search each method's declared space on the tuning cells, write <out>/tuned.json, then "
                        "evaluate it on the evaluation cells")
    g.add_argument("--trials", type=_positive, default=None,
                   help=f"trials per method configuration and scenario, the same for every method (default "
                        f"{DEFAULT_TRIALS}; epochs are read off per-epoch evaluation and cost no trials, except for "
                        f"horizon-dependent methods ({', '.join(n for n, c in METHODS.items() if c.horizon_dependent)}"
                        f"), whose epochs are a design dimension)")
    g.add_argument("--tune-seeds", dest="tune_seeds", nargs="+", type=_positive, default=None,
                   help="seeds of the tuning cells, none of them an evaluation seed (default 101; each seed adds "
                        "a random and a class-wise cell to every trial)")
    g.add_argument("--tune-classes", dest="tune_classes", nargs="+", type=_class, default=None,
                   help="class-wise tuning classes, none of them an evaluation class; tuning seed s forgets the "
                        "((s - 1) mod n)-th of the n classes (default 3)")
    g.add_argument("--select-tolerance", dest="select_tolerance", type=SCORE_POINTS, default=None,
                   help=f"scores within this many points of the best are equally good, and the fewest epochs among "
                        f"them win (default {DEFAULT_SELECT_TOLERANCE}; 0 = the plain lowest score)")
    g.add_argument("--trial-patience", dest="trial_patience", type=NON_NEGATIVE_INT, default=None,
                   help=f"end a trial once no selection score has improved by more than --select-tolerance for this "
                        f"many epochs (default {DEFAULT_TRIAL_PATIENCE}; 0 = every trial runs every epoch)")
    g.add_argument("--select", default=None, choices=CRITERIA,
                   help="selection rule, from the training pool only: gap = mean validation gap to Retrain (UA, RA, "
                        "VA, validation MIA-Efficacy); retrain_free = forget accuracy closest to the validation "
                        "accuracy (random) or 0 (class-wise) while retain accuracy stays (default gap)")
    g.add_argument("--compare-select", dest="compare_select", action=argparse.BooleanOptionalAction, default=None,
                   help="also evaluate the other selection rule's choices on the held-out cells (default: yes)")
    g = parser.add_argument_group("statistics (results.md '## Paired comparisons'; see sweep/stats.py)")
    g.add_argument("--test", default="sign_flip", choices=TESTS,
                   help="paired test per scenario, unit = seed, Holm-corrected within each family: sign_flip = exact "
                        "permutation test of the mean difference (default); wilcoxon = exact signed-rank test")


# Flags that only mean something with --tune (all default to None, so giving one without --tune is detected).
TUNE_ONLY = (("--trials", "trials"), ("--tune-seeds", "tune_seeds"), ("--tune-classes", "tune_classes"),
             ("--select", "select"), ("--compare-select", "compare_select"),
             ("--select-tolerance", "select_tolerance"), ("--trial-patience", "trial_patience"))


def _fill_defaults(args: argparse.Namespace) -> None:
    defaults = {"trials": DEFAULT_TRIALS, "tune_seeds": list(DEFAULT_TUNE_SEEDS),
                "tune_classes": list(DEFAULT_TUNE_CLASSES),
                "select": "gap", "compare_select": True, "select_tolerance": DEFAULT_SELECT_TOLERANCE,
                "trial_patience": DEFAULT_TRIAL_PATIENCE}
    for dest, value in defaults.items():
        if getattr(args, dest) is None:
            setattr(args, dest, value)


def classes_of(seeds, pool) -> dict[int, int]:
    """Seed -> the class it forgets when class-wise cells draw one class per seed from `pool` (both phases)."""
    return {seed: forget_class_of(seed, pool) for seed in seeds}


@dataclass(frozen=True)
class TunePlan:
    trials: int
    tune_seeds: tuple[int, ...]
    tune_classes: tuple[int, ...]
    eval_seeds: dict[str, tuple[int, ...]]
    forget_classes: tuple[int, ...]     # the class-wise evaluation pool (resolved, ascending)
    criterion: str
    compare_select: bool
    methods: tuple[str, ...]            # tuned (non-empty search space)
    untuned: tuple[str, ...]            # evaluated with their defaults (nothing to search: raw)
    tolerance: float = DEFAULT_SELECT_TOLERANCE  # score points within which candidates are equally good (`select`)
    patience: int = DEFAULT_TRIAL_PATIENCE       # epochs without an improvement after which a trial ends (0: never)

    @property
    def other_criterion(self) -> str:
        """The selection rule not chosen by --select (its choices are evaluated too, for the comparison)."""
        return next(c for c in CRITERIA if c != self.criterion)

    @property
    def all_eval_seeds(self) -> list[int]:
        return sorted({s for seeds in self.eval_seeds.values() for s in seeds})

    @property
    def tune_classes_of(self) -> dict[int, int]:
        """Class-wise tuning seed -> the class it forgets (the same rotation over `tune_classes`)."""
        return classes_of(self.tune_seeds, self.tune_classes)

    @property
    def eval_classes(self) -> dict[int, int]:
        """Class-wise evaluation seed -> the class it forgets (scenarios/classwise.py `forget_class_of`)."""
        return classes_of(self.eval_seeds.get("classwise", ()), self.forget_classes)


def default_forget_classes(tune_classes, num_classes: dict[str, int]) -> tuple[int, ...]:
    """The default class-wise evaluation pool: every class that each selected dataset has and nobody tuned on."""
    return class_pool(min(num_classes.values()), tune_classes) if num_classes else ()


def check_tune_args(args: argparse.Namespace, num_classes: dict[str, int]) -> None:
    """One-line UserError for flag combinations --tune cannot run; `num_classes` per selected dataset."""
    if not args.tune:
        for flag, dest in TUNE_ONLY:
            if getattr(args, dest) is not None:
                raise UserError(f"{flag} needs --tune")
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
    if args.trials < 2:
        raise UserError(f"--trials {args.trials}: a choice needs at least 2 trials per method")
    eval_seeds = set(args.seeds) if args.seeds else {s for seeds in DEFAULT_EVAL_SEEDS.values() for s in seeds}
    shared = sorted(set(args.tune_seeds) & eval_seeds)
    if shared:
        raise UserError(f"--tune-seeds {' '.join(map(str, shared))}: also an evaluation seed; tuning seeds must be "
                        f"disjoint from --seeds ({' '.join(map(str, sorted(eval_seeds)))})")
    if args.forget_class is not None:
        raise UserError(f"--forget_class {args.forget_class}: --tune draws one held-out class per seed from "
                        f"--forget_classes (default: every class that is not a tuning class); pass that instead")
    forget_classes = args.forget_classes
    if forget_classes is None:
        forget_classes = list(default_forget_classes(args.tune_classes, num_classes))
        if "classwise" in args.scenarios and num_classes and not forget_classes:
            raise UserError(f"--tune-classes {' '.join(map(str, args.tune_classes))}: no class is left for the "
                            f"class-wise evaluation; pass fewer tuning classes or --forget_classes")
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
    if "classwise" in args.scenarios:
        drawn = classes_of(args.tune_seeds, args.tune_classes).values()
        unused = [c for c in args.tune_classes if c not in drawn]
        if unused:
            raise UserError(f"--tune-classes {' '.join(map(str, unused))}: no tuning seed forgets it (seed s forgets "
                            f"the ((s - 1) mod n)-th of the n tuning classes); give as many --tune-seeds as classes, "
                            f"consecutive ones draw every class")
    # Checked last: the held-out comparison is the point of --tune, and its seeds must be able to give a verdict.
    needed = min_units(args.test)
    for scenario in args.scenarios:
        count = len(set(args.seeds or DEFAULT_EVAL_SEEDS[scenario]))
        if count < needed:
            raise UserError(f"--seeds: {count} evaluation seed(s) for {scenario}; the {args.test} test needs at least "
                            f"{needed} to reach p < {ALPHA} (smallest p with {count}: {min_p(count, args.test):.3g})")


def plan_from_args(args: argparse.Namespace) -> TunePlan:
    _fill_defaults(args)
    num_classes = {name: num_classes_of(name) for name in args.datasets}
    names = [n for n in match_methods(args.methods) if n not in ("retrain",)]
    tuned = tuple(n for n in names if search_space(n))
    untuned = tuple(n for n in names if not search_space(n))
    if not tuned:
        raise UserError(f"--tune: none of the selected methods ({', '.join(names)}) declares a search space")
    eval_seeds = {s: tuple(args.seeds) if args.seeds else DEFAULT_EVAL_SEEDS[s] for s in args.scenarios}
    forget_classes = tuple(sorted(args.forget_classes)) if args.forget_classes is not None \
        else default_forget_classes(args.tune_classes, num_classes)
    return TunePlan(args.trials, tuple(args.tune_seeds), tuple(args.tune_classes), eval_seeds, forget_classes,
                    args.select, args.compare_select, tuned, untuned, args.select_tolerance, args.trial_patience)


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


def horizon_dependent(name: str) -> bool:
    """True when the configuration's updates depend on its total number of epochs (`UnlearnMethod.horizon_dependent`):
    epoch e of a longer run is then not the model a fresh e-epoch run ships, so the epochs are a design dimension."""
    return resolve_method(name).cls.horizon_dependent


def _epoch_value(maximum: int, u: float) -> int:
    """An epoch count in 1..maximum for the design coordinate u in (0, 1): the unit interval cut into equal parts."""
    return 1 + min(int(u * maximum), maximum - 1)


def design_values(space: dict[str, tuple], trials: int, epochs_in_design: bool = False) -> list[dict[str, Any]]:
    """The `trials` flag settings of a search space: the design over its searched dimensions (sorted by flag), and
    each per-epoch dimension either at its maximum (the epoch is read off the curves afterwards) or, with
    `epochs_in_design` (a horizon-dependent method), as the design's last coordinate over 1..maximum, so that the
    other dimensions keep the evenly spaced first coordinate of every other method."""
    searched = sorted(flag for flag, s in space.items() if s[0] != "per_epoch")
    per_epoch = {flag: s[1] for flag, s in space.items() if s[0] == "per_epoch"}
    if not searched:  # only epochs to choose: the trials would all be the same run
        raise ValueError("a search space needs a dimension besides the epochs")
    designed = searched + (sorted(per_epoch) if epochs_in_design else [])
    values = []
    for point in design(trials, len(designed)):
        trial = {flag: _value(space[flag], u) for flag, u in zip(searched, point)}
        if epochs_in_design:
            trial.update({flag: _epoch_value(per_epoch[flag], u) for flag, u in zip(designed[len(searched):],
                                                                                    point[len(searched):])})
        else:
            trial.update(per_epoch)
        values.append(trial)
    return values


def trial_values(name: str, trials: int) -> list[dict[str, Any]]:
    """The `trials` flag settings of the configuration `name` (`design_values` of its declared space; the epochs are a
    design dimension when the method is horizon-dependent)."""
    try:
        return design_values(search_space(name), trials, horizon_dependent(name))
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None


def epochs_flag(name: str) -> str | None:
    return next((flag for flag, s in search_space(name).items() if s[0] == "per_epoch"), None)


# ---------------------------------------------------------------------------------------------------------------------
# Scores and selection
# ---------------------------------------------------------------------------------------------------------------------

def epoch_scores(result: dict, scenario: str, criterion: str) -> dict[int, float]:
    """Epoch -> score of one cell: from its per-epoch curves, else (no curves) its final result at `epochs_run`.
    Tuning cells evaluate each epoch with `--epoch-eval-metrics selection`: their curves hold no test-set output."""
    curves = result.get("curves") or [{**result, "epoch": int(result.get("epochs_run") or 1)}]
    return {int(entry["epoch"]): selection_score(entry, scenario, criterion) for entry in curves}


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
    #: flag -> "low" / "high": a shipped value that is the lowest or highest value its dimension took in the search
    #: (`edge_flags`); the optimum may lie outside the searched range.
    edges: dict[str, str] = field(default_factory=dict)


def trial_candidates(results: list[dict | None], scenario: str, criterion: str,
                     horizon: int | None = None) -> dict[int, float] | None:
    """Epoch -> mean score over the trial's tuning cells, for every epoch that can be shipped, or None.

    `results` holds, per tuning cell, its result or a diverged cell's record of its finite epochs ({"curves": ...},
    see `trial_results`); None (failed without curves, or missing) rules the trial out. An epoch needs every cell's
    evaluation at that epoch, so a diverged cell keeps the epochs before its divergence as candidates, and a cell that
    stopped on a plateau (`evaluation.selection.PlateauStop`) the epochs it ran. `horizon` (horizon-dependent
    methods): the only candidate is the run's own epoch count, since an earlier epoch of the run is not what a run of
    that length ships."""
    if not results or any(r is None for r in results):
        return None
    per_cell = [epoch_scores(r, scenario, criterion) for r in results]
    epochs = set.intersection(*(set(s) for s in per_cell))
    if horizon is not None:
        epochs &= {horizon}
    means = {epoch: float(np.mean([s[epoch] for s in per_cell])) for epoch in sorted(epochs)}
    return {epoch: score for epoch, score in means.items() if math.isfinite(score)}


def trial_score(results: list[dict | None], scenario: str, criterion: str,
                horizon: int | None = None) -> tuple[int, float] | None:
    """(epoch, score) of one trial: its candidate (`trial_candidates`) with the lowest score, ties to the fewer
    epochs; None when it has none."""
    candidates = trial_candidates(results, scenario, criterion, horizon)
    if not candidates:
        return None
    epoch = min(candidates, key=lambda e: (candidates[e], e))
    return epoch, candidates[epoch]


def select(trials: list[list[dict | None]], scenario: str, criterion: str,
           horizons: list[int | None] | None = None, tolerance: float = 0.0) -> tuple[int, int | None, float]:
    """(trial, epoch, score) chosen among every candidate (`trial_candidates`; trial i's only candidate epoch is
    `horizons[i]` when given and not None) of every trial:

    1. the candidates whose score is within `tolerance` points of the lowest score are equally good: differences
       that small are noise (docs/tuning.md measures it), and the argmin among them would be a draw;
    2. of those, the fewest epochs (the least unlearning that does as well), then the lowest score;
    3. an exact tie (a plateau: e.g. a one-shot strength below which nothing changes) goes to the trial farthest
       from the ends of the searched design, so that a flat region is not reported as an edge; then the earlier trial.

    With tolerance 0 this is the plain argmin. (-1, None, inf) when nothing ran."""
    scored = [(index, epoch, score) for index, results in enumerate(trials)
              for epoch, score in (trial_candidates(results, scenario, criterion,
                                                    horizons[index] if horizons else None) or {}).items()]
    if not scored:
        return -1, None, math.inf
    lowest = min(score for _, _, score in scored)
    equal = [c for c in scored if c[2] <= lowest + tolerance]
    fewest = min(epoch for _, epoch, _ in equal)
    best_score = min(score for _, epoch, score in equal if epoch == fewest)
    tied = [c for c in equal if c[1] == fewest and c[2] == best_score]
    last = len(trials) - 1
    return min(tied, key=lambda c: (-min(c[0], last - c[0]), c[0]))


def edge_flags(values: dict[str, Any], design_points: list[dict[str, Any]], space: dict[str, tuple],
          epochs_in_design: bool = False) -> dict[str, str]:
    """flag -> "low" / "high" for each ordered dimension whose chosen value (`values`) is the lowest or highest value
    that dimension took in the search: a design dimension's smallest or largest design value; an epoch count read off
    the curves, the declared maximum. A dimension with a single value, and an unordered choice, has no edge.

    An epoch count of 1 is not a low edge: no shorter run exists, so no widening could move it, and a run that wants
    less unlearning than one epoch gives gets it from a smaller learning rate, a dimension that is flagged on its own
    when its lowest value wins."""
    flagged: dict[str, str] = {}
    for flag, declared in sorted(space.items()):
        if flag not in values or declared[0] == "choice":
            continue
        if declared[0] == "per_epoch" and not epochs_in_design:
            low, high = 1, declared[1]
        else:
            tried = [point[flag] for point in design_points]
            low, high = min(tried), max(tried)
        if low == high:
            continue
        if values[flag] <= low and not (declared[0] == "per_epoch" and low <= 1):
            flagged[flag] = "low"
        elif values[flag] >= high:
            flagged[flag] = "high"
    return flagged


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


def _scenario_builds(settings: Settings, seeds_of: dict[str, tuple[int, ...]],
                     pool: tuple[int, ...]) -> list[tuple[list[Cell], list[str]]]:
    """The cells of each scenario on its seeds; class-wise, one class per seed drawn from `pool` (both phases: a seed
    is one unit, its own initialisation and its own class)."""
    return [build_cells(_phase_settings(settings, scenarios=[scenario], seeds=list(seeds_of[scenario]),
                                        forget_class=None, forget_classes=tuple(pool) or None))
            for scenario in settings.scenarios]


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
                                         epoch_eval="all", epoch_eval_metrics="selection", unlearn_epochs=None,
                                         stop_patience=plan.patience, stop_tolerance=plan.tolerance,
                                         forget_quality=0)
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
    phase = _phase_settings(settings, methods=methods, config=config, reserved_classes=plan.tune_classes)
    cells, notes = _merge(_scenario_builds(phase, plan.eval_seeds, plan.forget_classes))
    for cell in cells:
        if cell.kind == "method":
            cell.label = " = ".join(cell.names) + label_suffix
    return cells, notes


# ---------------------------------------------------------------------------------------------------------------------
# Selection over the trial cells, and the tuned file
# ---------------------------------------------------------------------------------------------------------------------

def trial_result(cell: Cell, out: Path) -> dict | None:
    """A tuning cell's result; for a cell that diverged, {"curves": its finite epochs, "diverged": True} from its
    failure record (the driver stops before evaluating a non-finite model, so every recorded epoch is finite); None
    when the cell has neither (failed before its first evaluation, or never ran)."""
    result = read_result(cell, out)
    if result is not None:
        return result
    failure = read_cell_json(cell.failure_path(out), ("error",))
    if failure and isinstance(failure.get("curves"), list) and failure["curves"]:
        return {"curves": failure["curves"], "diverged": True}
    return None


def trial_results(cells: list[Cell], out: Path, trial_of: dict[str, tuple[str, int]]) \
        -> tuple[dict[tuple[str, str], dict[int, list[dict | None]]], dict[str, tuple[str, ...]], dict[str, Cell]]:
    """(configuration, scenario) -> trial index -> `trial_result` of each tuning cell; configuration -> its names;
    configuration -> one of its cells (what it runs: `config`, `family`)."""
    grouped: dict[tuple[str, str], dict[int, list[dict | None]]] = {}
    names_of: dict[str, tuple[str, ...]] = {}
    cell_of: dict[str, Cell] = {}
    for cell in cells:
        if cell.kind != "method":
            continue
        config, index = trial_of[cell.key]
        names_of[config] = tuple(cell.names)
        cell_of.setdefault(config, cell)
        grouped.setdefault((config, cell.scenario), {}).setdefault(index, []).append(trial_result(cell, out))
    return grouped, names_of, cell_of


def _horizons(config: str, trials: int) -> list[int | None] | None:
    """Per trial, its only candidate epoch (a horizon-dependent configuration's own epoch count), else None."""
    flag = epochs_flag(config)
    if flag is None or not horizon_dependent(config):
        return None
    return [values[flag] for values in trial_values(config, trials)]


def selections(cells: list[Cell], out: Path, plan: TunePlan, trial_of: dict[str, tuple[str, int]],
               criterion: str) -> list[Selection]:
    """The best trial and epoch of each configuration and scenario under `criterion`, with the dimensions whose choice
    sits on an edge of the search."""
    grouped, names_of, _ = trial_results(cells, out, trial_of)
    chosen = []
    for (config, scenario), by_trial in grouped.items():
        ordered = [by_trial.get(i, []) for i in range(plan.trials)]
        index, epoch, score = select(ordered, scenario, criterion, _horizons(config, plan.trials), plan.tolerance)
        values: dict[str, Any] = {}
        flagged: dict[str, str] = {}
        if index >= 0:
            design_points = trial_values(config, plan.trials)
            values = dict(design_points[index])
            flag = epochs_flag(config)
            if flag is not None and epoch is not None:
                values[flag] = epoch
            flagged = edge_flags(values, design_points, search_space(config), horizon_dependent(config))
        chosen.append(Selection(" = ".join(names_of[config]), names_of[config], scenario, index, epoch, score, values,
                                plan.trials, max((len(v) for v in by_trial.values()), default=0), flagged))
    return chosen


def sensitivity(cells: list[Cell], out: Path, plan: TunePlan, trial_of: dict[str, tuple[str, int]],
                criterion: str) -> dict[str, dict[str, dict]]:
    """scenario -> configuration -> {"runs", "masking_family", "horizon_dependent", "points": [(learning rate, best
    score), ...]} ("runs": what the configuration runs, e.g. "NGPlus + prob"):
    each trial's best mean tuning-cell score (its best epoch, `trial_score`) against its learning rate, for every
    configuration that searches one (the one-shot methods search strengths, not step sizes). A trial with no finite
    candidate has no point."""
    grouped, _, cell_of = trial_results(cells, out, trial_of)
    panels: dict[str, dict[str, dict]] = {}
    for (config, scenario), by_trial in sorted(grouped.items(), key=lambda item: (item[0][1], item[0][0].lower())):
        if "unlearn_lr" not in search_space(config):
            continue
        design_points = trial_values(config, plan.trials)
        horizons = _horizons(config, plan.trials)
        points = []
        for index, values in enumerate(design_points):
            scored = trial_score(by_trial.get(index, []), scenario, criterion, horizons[index] if horizons else None)
            if scored is not None:
                points.append((float(values["unlearn_lr"]), scored[1]))
        panels.setdefault(scenario, {})[config] = {"runs": cell_of[config].config or config,
                                                   "masking_family": cell_of[config].family, "points": points,
                                                   "horizon_dependent": horizons is not None}
    return panels


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


def replication_units(cells: list[Cell]) -> dict[str, dict[str, dict]]:
    """Scenario -> seed -> the seed's model initialisation (`train_seed`) and, class-wise, its forgotten classes, read
    off the command lines of the Retrain cells (what runs, not what was meant to)."""
    units: dict[str, dict[str, dict]] = {}
    for cell in cells:
        if cell.kind != "retrain":
            continue
        run = parse_cell(cell.argv)
        entry = units.setdefault(cell.scenario, {}).setdefault(str(cell.seed), {"train_seed": run.model.train_seed})
        if cell.scenario == "classwise":
            entry.setdefault("forget_classes", []).append(run.data.class_to_replace)
    for seeds in units.values():
        for entry in seeds.values():
            entry.get("forget_classes", []).sort()
    return {scenario: dict(sorted(seeds.items(), key=lambda item: int(item[0]))) for scenario, seeds in units.items()}


def provenance(plan: TunePlan, chosen: list[Selection], other: list[Selection], argv: list[str],
               seconds: float, cpu_seconds: float, units: dict[str, dict] | None = None) -> dict:
    """How the tuned file was made. `units`: {"tuning": ..., "evaluation": ...} of `replication_units`."""
    spaces = {}
    for name in plan.methods:
        spaces[name] = {flag: list(space) for flag, space in sorted(search_space(name).items())}
    per_method: dict[str, dict] = {}
    for selection in chosen:
        entry = per_method.setdefault(selection.config, {"names": list(selection.names), "trials": selection.trials,
                                                          "tuning_cells_per_trial": {}, "best_score": {},
                                                          "best_trial": {}, "on_edge": {}})
        entry["tuning_cells_per_trial"][selection.scenario] = selection.cells_per_trial
        entry["on_edge"][selection.scenario] = dict(selection.edges)  # flag -> "low" / "high"; {} = inside
        entry["best_score"][selection.scenario] = None if math.isinf(selection.score) else round(selection.score, 4)
        entry["best_trial"][selection.scenario] = selection.trial + 1 if selection.trial >= 0 else None
    return {
        "command": "python " + " ".join(shlex.quote(a) for a in argv),
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "tune_seeds": list(plan.tune_seeds), "tune_classes": list(plan.tune_classes),
        "eval_seeds": {k: list(v) for k, v in plan.eval_seeds.items()}, "forget_classes": list(plan.forget_classes),
        "tune_classes_of": {str(seed): forget_class for seed, forget_class in plan.tune_classes_of.items()},
        "eval_classes": {str(seed): forget_class for seed, forget_class in plan.eval_classes.items()},
        "init_seed": "every model of seed s (original, Retrain) is initialised from --train_seed s",
        "units": units or {},
        "criterion": plan.criterion, "trials_per_method": plan.trials,
        "select_tolerance": plan.tolerance, "trial_patience": plan.patience,
        "search_space": spaces, "methods": per_method,
        "epochs_in_design": {name: resolve_method(name).cls.horizon_reason for name in plan.methods
                             if horizon_dependent(name)},
        "on_edge": {f"{s.config} | {s.scenario}": dict(s.edges) for s in chosen if s.edges},
        "not_tuned": {name: "no search space declared (nothing to tune)" for name in plan.untuned},
        f"choices_under_{plan.other_criterion}": {f"{s.config} | {s.scenario}": s.values for s in other},
        "tuning_seconds": round(seconds, 1), "tuning_cpu_seconds": round(cpu_seconds, 1),
    }


def mark_edges(cells: list[Cell], chosen: list[Selection]) -> list[str]:
    """Give each held-out cell the edge flags of its configuration's choice (the table's settings column marks them);
    returns the table note that explains the marker, when any cell has one."""
    by_name = {(name, s.scenario): s.edges for s in chosen for name in s.names}
    for cell in cells:
        if cell.kind == "method" and cell.names:
            cell.edges = dict(by_name.get((cell.names[0], cell.scenario), {}))
    if not any(cell.edges for cell in cells):
        return []
    return ["[low edge] / [high edge] after a setting: the tuned value is the lowest / highest value its search tried "
            "(provenance `on_edge` in the tuned file); the best value may lie outside the searched range."]


SCORE_LABELS = {"gap": "best mean validation gap to Retrain over the tuning cells",
                "retrain_free": "best mean Retrain-free score over the tuning cells"}


def sensitivity_figures(panels: dict[str, dict[str, dict]], directory: Path, plan: TunePlan) -> list[Path]:
    """One PNG per scenario, `<directory>/sensitivity_<scenario>.png` (`plots.plot_sensitivity`)."""
    return [plot_sensitivity(panel, directory / f"sensitivity_{scenario}.png",
                             title=f"Sensitivity to the learning rate, {scenario} forgetting: each trial's best epoch, "
                                   f"{plan.trials} trials per method (lower is better)",
                             score_label=SCORE_LABELS[plan.criterion])
            for scenario, panel in panels.items() if any(entry["points"] for entry in panel.values())]


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
                       other_cells: list[Cell], out: Path, test: str = "sign_flip") -> str:
    """Held-out Avg. Gap of each configuration under the two rules, and how much the Retrain-free rule loses.

    The comparison is made on the rows, per scenario: one value per configuration and rule (its mean over the held-out
    cells both rules ran), so a row counts once however many cells it has; the units are the configurations, and the
    question is whether the Retrain-free rule loses on a typical configuration. The same test as the paired
    comparisons, Holm-corrected over the scenarios (sweep.stats)."""
    def values(cells: list[Cell]) -> dict[tuple, dict[tuple, float]]:
        table: dict[tuple, dict[tuple, float]] = {}
        for cell in cells:
            result = read_result(cell, out) if cell.kind == "method" else None
            if result is not None and "avg_gap" in result:
                table.setdefault((tuple(cell.names), (cell.dataset, cell.arch, cell.scenario)), {})[
                    (cell.setting, cell.seed)] = float(result["avg_gap"])
        return table

    by_rule = {plan.criterion: values(main_cells), plan.other_criterion: values(other_cells)}
    gap, free = by_rule["gap"], by_rule["retrain_free"]
    several = len({scope[:2] for _, scope in set(gap) | set(free)}) > 1
    lines = ["## Selection rules on the held-out cells", "",
             "Held-out Avg. Gap (mean over the evaluation cells) of each configuration as chosen by `--select gap` "
             "(needs Retrain) and by `--select retrain_free` (needs none); 'loss' = retrain_free minus gap.", "",
             "| Configuration | scenario | gap rule | retrain-free rule | loss | same choice |",
             "|---|---|---|---|---|---|"]
    rule_values = {(plan.criterion, s.names, s.scenario): s.values for s in chosen}
    rule_values.update({(plan.other_criterion, s.names, s.scenario): s.values
                        for s in other})
    rows: dict[str, list[tuple[float, float]]] = {}  # scenario -> (retrain-free, gap) per configuration row
    for key in sorted(set(gap) & set(free), key=lambda k: (k[1], " = ".join(k[0]).lower())):
        names, scope = key
        shared = sorted(set(gap[key]) & set(free[key]))
        if not shared:
            continue
        g = float(np.mean([gap[key][k] for k in shared]))
        f = float(np.mean([free[key][k] for k in shared]))
        same = rule_values.get(("gap", names, scope[2])) == rule_values.get(("retrain_free", names, scope[2]))
        label = "/".join(scope) if several else scope[2]
        rows.setdefault(label, []).append((f, g))
        lines.append(f"| {' = '.join(names)} | {label} | {g:.2f} | {f:.2f} | {f - g:+.2f} | "
                     f"{'yes' if same else 'no'} |")
    comparisons = [compare("retrain_free rule", "gap rule", label, pairs, test) for label, pairs in rows.items()]
    adjusted = holm([c.p_value for c in comparisons])
    reachable = bool(comparisons) and len(comparisons) * min(min_p(c.n, test) for c in comparisons) < ALPHA
    comparisons = [dataclasses.replace(c, p_adjusted=p, reachable=reachable)
                   for c, p in zip(comparisons, adjusted, strict=True)]
    if comparisons:
        lines += ["", f"Per scenario, one unit per configuration row (its held-out mean), {test.replace('_', '-')} "
                      f"test, Holm over the {len(comparisons)} scenario(s), 95 % t interval of the mean loss:"]
    for c in comparisons:
        losses = [f - g for f, g in rows[c.scope]]
        interval = "n/a" if math.isnan(c.ci_low) else f"[{c.ci_low:+.2f}, {c.ci_high:+.2f}]"
        lines.append(f"- {c.scope}: over {c.n} configuration rows the Retrain-free rule's held-out Avg. Gap is "
                     f"{c.mean:+.2f} points relative to the gap rule (median {np.median(losses):+.2f}, 95 % CI "
                     f"{interval}, p = {c.p_value:.3g}, Holm p = {c.p_adjusted:.3g}): {sentence(c)}")
    return "\n".join(lines) + "\n"


def run_tune(settings: Settings, plan: TunePlan, tracker, experiment_id, progress: bool, argv: list[str]) -> dict:
    """Both phases; returns what benchmark.py prints: tables, files, timings, failures."""
    # Every phase's settings carry the plan's class pool (the held-out cells draw from it; the tuning classes stay out).
    settings = _phase_settings(settings, forget_class=None, forget_classes=plan.forget_classes or None,
                               reserved_classes=plan.tune_classes)
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
    units = {"tuning": replication_units(cells),
             "evaluation": replication_units(evaluation_cells(settings, plan, empty_config)[0])}
    payload = {**tuned_config(chosen), "provenance": provenance(plan, chosen, other, argv, tune_seconds, tune_cpu,
                                                                units)}
    tuned_path = atomic_write_json(out / "tuned.json", payload)
    other_path = atomic_write_json(tune_dir / f"tuned_{other_criterion}.json", tuned_config(other))
    figures = sensitivity_figures(sensitivity(cells, tune_dir, plan, trial_of, plan.criterion), tune_dir, plan)
    shared.setdefault("files", []).extend(figures)  # attached to the mlflow parent run by the last phase

    eval_start = time.perf_counter()
    other_cells: list[Cell] = []
    other_outcome = None
    eval_cpu = 0.0
    if plan.compare_select:
        # The other rule's choices first, into the same <out>/cells and <out>/models: the main evaluation below then
        # finds every cell where both rules chose the same values already done, and runs only the rest.
        other_cells, other_notes = evaluation_cells(settings, plan, other_path, f" [{other_criterion}]")
        other_notes = mark_edges(other_cells, other) + other_notes
        other_outcome = PhaseSweep(_phase_settings(settings, seeds=plan.all_eval_seeds), other_cells, other_notes,
                                   tracker, experiment_id, progress, shared, last=False, paired=False).run()
        eval_cpu += _cpu_seconds(out / "sweep.json")
        for name in ("results.md", "results.csv"):  # the other rule's table, kept under its own name
            atomic_write_text(out / name.replace("results", f"results_select_{other_criterion}"),
                              (out / name).read_text())
    main_cells, main_notes = evaluation_cells(settings, plan, tuned_path)
    main_notes = mark_edges(main_cells, chosen) + main_notes
    main_notes = [f"Hyper-parameters: {tuned_path} (selected by `--select {plan.criterion}` from {plan.trials} trials "
                  f"per method on seeds {' '.join(map(str, plan.tune_seeds))}"
                  + (f" and classes {' '.join(map(str, plan.tune_classes))}" if "classwise" in settings.scenarios
                     else "") + ")."] + main_notes
    evaluation = PhaseSweep(_phase_settings(settings, seeds=plan.all_eval_seeds),
                            main_cells, main_notes, tracker, experiment_id, progress, shared, last=True, paired=True)
    eval_outcome = evaluation.run()
    eval_seconds = time.perf_counter() - eval_start
    eval_cpu += _cpu_seconds(out / "sweep.json")
    files = [tuned_path, *figures]
    comparison = ""
    if plan.compare_select:
        comparison = _select_comparison(plan, chosen, other, main_cells, other_cells, out, settings.test)
        files.append(atomic_write_text(out / "select_comparison.md", comparison))
    outcomes = [tune_outcome, eval_outcome] + ([other_outcome] if other_outcome is not None else [])
    return {"tuned": tuned_path, "table": eval_outcome.table, "comparison": comparison, "files": files,
            "tune_seconds": tune_seconds, "tune_cpu_seconds": tune_cpu, "eval_seconds": eval_seconds,
            "eval_cpu_seconds": eval_cpu,
            "computed": sum(o.computed for o in outcomes), "reused": sum(o.reused for o in outcomes),
            "failed": [m for o in outcomes for m in o.failed], "errors": [m for o in outcomes for m in o.errors],
            "method_rows": eval_outcome.method_rows_with_results}

_class = number(int, 0)  # a class index
