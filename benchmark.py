"""Benchmark every registered unlearning method against Retrain: the project's main job.

    python benchmark.py                      # digits_noisy, random 10 % + class-wise, seeds 1 2 3
    python benchmark.py --methods 'NG*' FT --seeds 1 --jobs 2 --out benchmark_out/ng
    python benchmark.py --emit-commands cells.txt   # one mlflow_forget.py line per cell, for SLURM / GNU parallel
    python benchmark.py --executor submitit --cluster slurm --slurm-partition gpu   # one SLURM job per cell
    python benchmark.py --devices cuda:0 cuda:1     # one worker per GPU (default: every visible GPU)
    python benchmark.py --tune --trials 4 --jobs 2 --out benchmark_out/tuned  # equal-budget search, held-out table

Trains what is missing (the original model per seed, the Retrain reference per forget setting and seed), runs each
method configuration once per cell (aliases of one configuration run once), and writes <out>/results.md and
results.csv (mean ± std over seeds; the Retrain row first, then methods by Avg. Gap), the trade-off plot and the
masking family's per-epoch curves. Finished cells are kept in <out>/cells/, so a second invocation computes nothing
new (--rerun recomputes). Tracked as one mlflow parent run with one nested child run per cell.
Per-method hyper-parameters: configs/tuned_<dataset>.json (made by --tune; shipped for digits_noisy), else
configs/benchmark_<dataset>.json (the hand-chosen values), when present, and --grid FILE, all
{"method or glob": {"unlearn_lr": [..], "unlearn_epochs": [..], "scenarios": {"classwise": {...}}}} (lists are
expanded as a cartesian product).

Exit status: 0 when the table holds a result for at least one method cell and no cell hit an unexpected error; 1 when a
cell raised an unexpected error (a bug, a dead worker: see <out>/logs/) or when every method cell failed (nothing to
compare); 2 for bad input (one line on stderr, before anything is trained or written), for an --out that another
benchmark holds (<out>/benchmark.lock says which), or for an --out that stops being writable. A killed tracked
benchmark leaves its parent mlflow run RUNNING; the next invocation on the same --out marks it KILLED. Failures, the
lock and the cells' thread count: docs/sweep.md.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from arg_parser import POSITIVE_INT as _positive
from arg_parser import OneLineErrorParser, forget_quality_models, number
from dataset import check_train_subset, list_datasets, num_classes_of
from models import list_models
from scenarios import SCENARIOS
from scenarios.classwise import RESERVED_CLASSES
from sweep import Settings, Sweep, check_output_path, default_config_path, load_settings_file
from sweep.executors import add_execution_flags, execution_settings
from sweep.grid import check_classes
from sweep.lock import OutDirLock
from sweep.tune import add_tune_flags, check_tune_args, plan_from_args, run_tune
from tracking import how_to_browse, open_tracker
from unlearn import match_methods
from utils import UserError, cli_main

_fraction = number(float, 0, 1, low_open=True, high_open=True)
_class = number(int, 0)  # a class index






def _default_jobs() -> int:
    return 1 if torch.cuda.is_available() else max(1, min(os.cpu_count() or 1, 8))


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("grid")
    g.add_argument("--datasets", nargs="+", default=["digits_noisy"], choices=list_datasets(), metavar="DATASET",
                   help=f"datasets ({', '.join(list_datasets())}; default digits_noisy)")
    g.add_argument("--archs", nargs="+", default=["resnet18"], choices=list_models(), metavar="ARCH",
                   help="architectures (default resnet18)")
    g.add_argument("--scenarios", nargs="+", default=["random", "classwise"], choices=list(SCENARIOS),
                   metavar="SCENARIO", help=f"forget scenarios ({', '.join(SCENARIOS)}; default random classwise)")
    g.add_argument("--methods", nargs="+", default=["*"], metavar="NAME",
                   help="method names or glob patterns (default: every registered method; "
                        "retrain is the reference row)")
    g.add_argument("--seeds", nargs="+", type=_positive, default=None,
                   help="seeds, one independent replication each: seed s also initialises its models (--train_seed "
                        "s) and picks its class-wise class (default 1 2 3; with --tune: 1-11)")
    g.add_argument("--grid", default=None, metavar="FILE",
                   help='per-method hyper-parameter grid, '
                        'JSON {"method": {"unlearn_lr": [..], "unlearn_epochs": [..]}}')
    g.add_argument("--config", default=None, metavar="FILE",
                   help="per-method hyper-parameters (default: configs/benchmark_<dataset>.json when present)")
    g.add_argument("--forget_fraction", type=_fraction, default=0.1,
                   help="random forgetting: fraction of the training split to forget (default 0.1)")
    g.add_argument("--forget_classes", nargs="+", type=_class, default=None, metavar="CLASS",
                   help=f"class-wise forgetting: the pool each seed draws its class from, seed s forgetting the "
                        f"((s - 1) mod n)-th of the n classes (default: every class except the tuning classes "
                        f"{' '.join(map(str, RESERVED_CLASSES))}, or --tune-classes with --tune)")
    g.add_argument("--forget_class", type=_class, default=None, metavar="CLASS",
                   help="class-wise forgetting: forget this one class for every seed instead (no --tune)")
    g = p.add_argument_group("budget (defaults: the dataset's recipe and each method's own)")
    g.add_argument("--epochs", type=_positive, default=None, help="training epochs of the original and Retrain models")
    g.add_argument("--unlearn_epochs", type=_positive, default=None, help="unlearning epochs of every method")
    g.add_argument("--width", type=_positive, default=None, help="model width")
    g.add_argument("--epoch-eval", dest="epoch_eval", default="all", choices=["all", "masked", "none"],
                   help="evaluate after every unlearning epoch (outside the RTE timer) for all methods (default), the "
                        "masking family only, or none (fastest)")
    g.add_argument("--forget_quality", type=forget_quality_models, default=0, metavar="N",
                   help="add the NeurIPS 2023 competition's forgetting quality (columns F and Final): every method "
                        "cell runs N times against N models retrained per forget set (trained once, by the Retrain "
                        "row's cell); N >= 3, 0 = off (default)")
    g = p.add_argument_group("execution")
    g.add_argument("--jobs", type=_positive, default=None,
                   help="parallel worker processes, one thread each (default: CPU cores up to 8; 1 with CUDA)")
    g.add_argument("--out", default="benchmark_out", help="output directory (default benchmark_out/)")
    g.add_argument("--rerun", action="store_true", help="recompute cells that already have a result")
    g.add_argument("--emit-commands", dest="emit_commands", default=None, metavar="FILE",
                   help="write one self-contained mlflow_forget.py command line per cell to FILE instead of running")
    g.add_argument("--track", action=argparse.BooleanOptionalAction, default=True,
                   help="track with mlflow (MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)")
    g.add_argument("--experiment", default=None, help="mlflow experiment (default: benchmark-<datasets>)")
    g.add_argument("--data", default="../data", help="dataset root")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    g.add_argument("--no-download", dest="no_download", action="store_true", help="never try to download data")
    g.add_argument("--train_subset", type=_positive, default=None, metavar="N",
                   help="every cell trains on a stratified subset of N training images (fashion_mnist, cifar10, "
                        "cifar100, svhn); forget fractions are of the subset's training split")
    g.add_argument("--no-progress", dest="no_progress", action="store_true", help="hide the progress bar")
    add_tune_flags(p)
    add_execution_flags(p)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    check_output_path(args.out, "--out", directory=True)
    if args.emit_commands:
        check_output_path(args.emit_commands, "--emit-commands", directory=False)
    match_methods(args.methods)  # an unknown name or pattern stops here, before the out dir is locked (created)
    grid = load_settings_file(Path(args.grid), "--grid file") if args.grid else {}
    for dataset in args.datasets:
        check_train_subset(dataset, args.train_subset)
    execution = execution_settings(args)
    check_tune_args(args, _num_classes(args) if args.tune else {})
    if not args.tune:
        _check_class_flags(args)
    plan = plan_from_args(args) if args.tune else None
    settings = Settings(
        datasets=args.datasets, archs=args.archs, scenarios=args.scenarios, methods=args.methods,
        seeds=args.seeds or [1, 2, 3],
        out=Path(args.out), data=args.data, device=args.device, epochs=args.epochs, unlearn_epochs=args.unlearn_epochs,
        width=args.width, forget_fraction=args.forget_fraction, forget_class=args.forget_class,
        forget_classes=tuple(args.forget_classes) if args.forget_classes is not None else None,
        epoch_eval=args.epoch_eval, forget_quality=args.forget_quality, grid=grid,
        config=Path(args.config) if args.config else None,
        jobs=args.jobs or _default_jobs(), rerun=args.rerun, **execution, no_download=args.no_download,
        train_subset=args.train_subset,
        test=args.test)
    experiment = args.experiment or f"benchmark-{'+'.join(args.datasets)}"
    tracker = experiment_id = None
    if args.track:  # an unreachable store is one line, before the out dir is locked (created) or anything trained
        tracker, experiment_id = open_tracker(experiment)
    if args.emit_commands:  # writes one file and runs nothing: no out dir to hold
        return _run(args, argv, settings, plan, tracker, experiment_id)
    command = ["benchmark.py", *(sys.argv[1:] if argv is None else argv)]
    with OutDirLock(settings.out, command):  # one benchmark per --out: a second one stops here, exit 2
        return _run(args, argv, settings, plan, tracker, experiment_id)


def _shown(path: Path) -> str:
    """`path` relative to the working directory when it lies inside it, else absolute (never "../../...")."""
    absolute = Path(path).absolute()
    try:
        return str(absolute.relative_to(Path.cwd()))
    except ValueError:
        return str(absolute)


def _run(args, argv, settings: Settings, plan, tracker, experiment_id) -> int:
    """Everything after the checks of the command line, with the out dir held."""
    experiment = args.experiment or f"benchmark-{'+'.join(args.datasets)}"
    if plan is not None:
        return _run_tune(settings, plan, tracker, experiment_id, args, argv)
    for dataset in settings.datasets:  # say where the hyper-parameters come from
        path = settings.config or default_config_path(dataset)
        if path.is_file():
            origin = "tuned by `benchmark.py --tune`, see its provenance key" if path.name.startswith("tuned_") \
                else "hand-chosen"
            hint = "; --config configs/benchmark_digits_noisy.json for the hand-chosen ones" \
                if path.name == "tuned_digits_noisy.json" else ""
            print(f"{dataset}: hyper-parameters from {_shown(path)} ({origin}{hint})")
        else:
            print(f"{dataset}: the methods' declared defaults (no {_shown(path)})")
    sweep = Sweep(settings, tracker, experiment_id, progress=not args.no_progress)

    if args.emit_commands:
        tracking = None
        if tracker is not None:
            parent = tracker.start_run(experiment_id, f"benchmark-{'+'.join(args.datasets)}-commands",
                                       params={"commands_file": os.path.abspath(args.emit_commands),
                                               "cells": len(sweep.cells)}, tags={"sweep": "emitted commands"})
            parent.end("FINISHED")
            tracking = {"uri": tracker.uri, "experiment": experiment, "parent_run_id": parent.run_id}
        count = sweep.emit_commands(Path(args.emit_commands), tracking)
        print(f"wrote {count} command line(s) to {args.emit_commands}; afterwards `python benchmark.py` with the same "
              f"arguments aggregates their results without recomputing them")
        return 0

    outcome = sweep.run()
    print(outcome.table)
    print(f"computed {outcome.computed} cell(s), reused {outcome.reused}; {len(outcome.failed)} failed, "
          f"{len(outcome.errors)} errors; {outcome.seconds:.0f} s -> {settings.out / 'results.md'}, "
          f"{settings.out / 'results.csv'}")
    if tracker is not None and not getattr(tracker, "broken", None):
        print(how_to_browse(tracker.uri, experiment_id))
    for message in outcome.failed + outcome.errors:
        print(f"failed: {message}")
    if outcome.errors:
        return 1
    if not outcome.method_rows_with_results:
        print(f"failed: no method cell has a result; see {settings.out / 'logs'}", file=sys.stderr)
        return 1
    return 0


def _check_class_flags(args) -> None:
    """The class-wise flags of a plain benchmark, before any work (the cells check them again per dataset)."""
    if args.forget_class is not None and args.forget_classes is not None:
        raise UserError("--forget_class fixes one class for every seed, --forget_classes is the pool each seed draws "
                        "its class from; pass one of them")
    for dataset in args.datasets:
        if args.forget_class is not None:
            check_classes(dataset, [args.forget_class], "--forget_class")
        elif args.forget_classes is not None:
            check_classes(dataset, args.forget_classes, "--forget_classes")


def _num_classes(args) -> dict[str, int]:
    return {name: num_classes_of(name) for name in args.datasets}


def _run_tune(settings: Settings, plan, tracker, experiment_id, args, argv) -> int:
    command = ["benchmark.py"] + (list(argv) if argv is not None else sys.argv[1:])
    result = run_tune(settings, plan, tracker, experiment_id, progress=not args.no_progress, argv=command)
    print(result["table"])
    if result["comparison"]:
        print(result["comparison"])
    print(f"tuning: {result['tune_seconds']:.0f} s ({result['tune_cpu_seconds']:.0f} CPU s in cells); held-out "
          f"evaluation: {result['eval_seconds']:.0f} s ({result['eval_cpu_seconds']:.0f} CPU s); computed "
          f"{result['computed']} cell(s), reused {result['reused']}; {len(result['failed'])} failed, "
          f"{len(result['errors'])} errors -> {result['tuned']}, {settings.out / 'results.md'}")
    for message in result["failed"] + result["errors"]:
        print(f"failed: {message}")
    if result["errors"]:
        return 1
    if not result["method_rows"]:
        print(f"failed: no method cell has a result; see {settings.out / 'logs'}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    cli_main(main)
