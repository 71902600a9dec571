"""What one tuning trial of `benchmark.py --tune` costs, part by part, with the per-epoch evaluation of before and after
the selection-only mode, side by side in one process; and the whole protocol's time estimated from it.

    .venv/bin/python perf/tune_trial_cost.py                          # GA SRL SalUn SCRUB SSD on digits_noisy
    .venv/bin/python perf/tune_trial_cost.py --methods '*' --repeats 1   # every tuned configuration (a fuller estimate)

A trial is one tuning cell: `mlflow_forget.py` run in this process exactly as a sweep worker runs it (`sweep.execute`,
one CPU thread), on the tuning seed's own original and Retrain models (trained first, once, outside the timings).
Two ways of running the same cell alternate in every round, so a busy machine slows both alike:

  before  every epoch evaluated with every metric (`--epoch-eval-metrics all`: retain, forget, val and test forward
          passes, five SVC attacks on the test set), and the final evaluation computed again from scratch;
  after   what the tuning runs now: every epoch evaluated on the training pool only (`--epoch-eval-metrics
          selection`: no test forward pass, one SVC attack on the validation split), and the final evaluation reusing
          the last epoch's predictions (only the test set is predicted).

Parts, in CPU seconds of this process (`time.process_time`, robust to other jobs on a shared machine): unlearning (the
driver's epochs without the evaluation hooks), per-epoch evaluation, final evaluation, setup (data, split, loading the
models, evaluating Retrain, writing the result; `retrain_eval`, its evaluation of the Retrain model, is shown apart
too). The median over rounds is printed. The script also checks that both
ways give the same final result and the same values of the selection metrics on every epoch.

The protocol estimate multiplies the mean "after" cell cost by the number of tuning cells (configurations x trials x
tuning seeds x 2: a random and a class-wise cell per seed), the mean "before" cost (every metric at every epoch, each
epoch up to the maximum: an upper bound for a held-out cell) by the held-out cells (evaluation seeds x 2 scenarios x
configurations x 2 selection rules), adds the reference models' training, and divides by --jobs.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pipeline.runs as runs  # noqa: E402
import pipeline.stages as stages  # noqa: E402
from sweep.settings import Settings  # noqa: E402
from sweep.tune import plan_from_args, tuning_cells  # noqa: E402
from utils import atomic_write_json  # noqa: E402

execute_module = sys.modules.get("sweep.execute") or __import__("sweep.execute", fromlist=["execute"])

PARTS = ("unlearning", "epoch_eval", "final_eval", "setup", "retrain_eval", "total")  # retrain_eval: part of setup
SELECTION_FLAG = "--epoch-eval-metrics"


class Clock:
    """CPU seconds spent inside wrapped functions of the run pipeline, per name (nested calls counted once each)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.recompute_final = False

    def wrap(self, module, name: str, key: str) -> None:
        original = getattr(module, name)

        def timed(*args, **kwargs):
            start = time.process_time()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[key] = self.seconds.get(key, 0.0) + time.process_time() - start

        setattr(module, name, timed)


def install(clock: Clock) -> None:
    clock.wrap(stages, "run_unlearning", "unlearn_total")
    clock.wrap(stages, "epoch_metrics", "epoch_eval")
    clock.wrap(runs if hasattr(runs, "retrain_evaluation") else stages, "retrain_evaluation", "retrain_eval")
    original_evaluate = runs.evaluate

    def evaluate(p, unl, *args, **kwargs):
        if clock.recompute_final:  # "before": the final evaluation did not reuse the last epoch's
            unl = dataclasses.replace(unl, last_evaluation=None)
        return original_evaluate(p, unl, *args, **kwargs)

    runs.evaluate = evaluate
    clock.wrap(runs, "evaluate", "final_eval")


def without_selection(argv: list[str]) -> list[str]:
    if SELECTION_FLAG not in argv:
        return list(argv)
    at = argv.index(SELECTION_FLAG)
    return argv[:at] + argv[at + 2:]


def run_cell(task: dict, clock: Clock, before: bool) -> tuple[dict[str, float], dict]:
    clock.seconds = {}
    clock.recompute_final = before
    task = {**task, "argv": without_selection(task["argv"]) if before else task["argv"]}
    start = time.process_time()
    report = execute_module.execute(task)
    total = time.process_time() - start
    if report["status"] != "ok":
        raise SystemExit(f"{task['key']}: {report['status']}: {report['error']}")
    s = clock.seconds
    parts = {"unlearning": s.get("unlearn_total", 0.0) - s.get("epoch_eval", 0.0),
             "epoch_eval": s.get("epoch_eval", 0.0), "final_eval": s.get("final_eval", 0.0),
             "retrain_eval": s.get("retrain_eval", 0.0), "total": total}
    parts["setup"] = total - s.get("unlearn_total", 0.0) - parts["final_eval"]
    return parts, report["result"]


SELECTION_KEYS = ("UA", "RA", "VA", "MIA_efficacy_val", "val_gap")
FINAL_KEYS = ("UA", "RA", "TA", "MIA_efficacy", "avg_gap", "VA", "MIA_efficacy_val", "val_gap")


def same_numbers(before: dict, after: dict) -> bool:
    """The final result and every epoch's selection metrics agree exactly between the two ways."""
    if any(before.get(k) != after.get(k) for k in FINAL_KEYS) or before.get("accuracy") != after.get("accuracy"):
        return False
    curves_b, curves_a = before.get("curves") or [], after.get("curves") or []
    return len(curves_b) == len(curves_a) and all(
        b.get(k) == a.get(k) for b, a in zip(curves_b, curves_a, strict=True) for k in SELECTION_KEYS)


def trial_cells(dataset: str, methods: list[str], out: Path):
    """The tuning cells of two trials of `methods` on seed 101, random forgetting, and cell key -> (config, trial)."""
    # The plan `benchmark.py --tune --trials 2 --tune-seeds 101 --tune-classes 3 --scenarios random` makes.
    ns = argparse.Namespace(datasets=[dataset], methods=methods, scenarios=["random"], seeds=None, trials=2,
                            tune_seeds=[101], tune_classes=[3], forget_classes=None, select=None, compare_select=None)
    settings = Settings(datasets=[dataset], archs=["resnet18"], scenarios=["random"], methods=methods, seeds=[101],
                        out=out)
    cells, _, trial_of = tuning_cells(settings, plan_from_args(ns), atomic_write_json(out / "no_config.json", {}))
    return cells, trial_of


def training_seconds(out: Path, measured: dict[str, float]) -> float:
    """CPU seconds to train one reference model: measured now when this run trained them (kept in
    `<out>/reference_cpu.json` for later runs), else what an earlier run measured, else NaN."""
    record = out / "reference_cpu.json"
    trained = [v for k, v in measured.items() if k in ("original", "retrain") and v > 1.0]
    if trained:
        atomic_write_json(record, {"cpu_seconds_per_model": statistics.mean(trained)})
    try:
        return float(json.loads(record.read_text())["cpu_seconds_per_model"])
    except (OSError, ValueError, KeyError):
        return math.nan


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=["GA", "SRL", "SalUn", "SCRUB", "SSD"])
    p.add_argument("--dataset", default="digits_noisy")
    p.add_argument("--repeats", type=int, default=2, help="rounds (each runs every cell both ways)")
    p.add_argument("--out", default="perf_out/tune_trial_cost", help="where the models and cells go (reused)")
    p.add_argument("--trials", type=int, default=8, help="protocol estimate: trials per configuration")
    p.add_argument("--tune-seeds", type=int, default=1, help="protocol estimate: tuning seeds")
    p.add_argument("--eval-seeds", type=int, default=11, help="protocol estimate: evaluation seeds per scenario")
    p.add_argument("--jobs", type=int, default=2, help="protocol estimate: parallel cells")
    args = p.parse_args()
    torch.set_num_threads(1)  # as a sweep worker
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    cells, trial_of = trial_cells(args.dataset, args.methods, out)
    references = [c for c in cells if c.kind != "method"]
    trials = [c for c in cells if c.kind == "method" and trial_of[c.key][1] == 1]  # the second design point
    reference_cpu = {}
    for cell in references:
        start = time.process_time()
        report = execute_module.execute(execute_module.task_of(cell, out))
        reference_cpu[cell.kind] = time.process_time() - start
        if report["status"] != "ok":
            raise SystemExit(f"{cell.kind} model: {report['error']}")
    print(f"{args.dataset}: {len(trials)} tuning cells ({', '.join(' = '.join(c.names) for c in trials)}), "
          f"{args.repeats} round(s), CPU seconds, one thread; references (0 s when found in {out}): "
          + ", ".join(f"{k} {v:.1f}" for k, v in reference_cpu.items()))

    clock = Clock()
    install(clock)
    execute_module.execute(execute_module.task_of(trials[0], out))  # warm-up: imports, first-call costs
    measured: dict[str, dict[str, list[dict[str, float]]]] = {}
    identical: dict[str, bool] = {}
    for _ in range(args.repeats):
        for cell in trials:
            task = execute_module.task_of(cell, out)
            label = " = ".join(cell.names)
            runs_of = measured.setdefault(label, {"before": [], "after": []})
            before, result_before = run_cell(task, clock, before=True)
            after, result_after = run_cell(task, clock, before=False)
            runs_of["before"].append(before)
            runs_of["after"].append(after)
            identical[label] = identical.get(label, True) and same_numbers(result_before, result_after)

    def median(samples: list[dict[str, float]], part: str) -> float:
        return statistics.median(s[part] for s in samples)

    header = f"{'cell':24s} {'way':7s} " + " ".join(f"{part:>11s}" for part in PARTS) + "  same numbers"
    print(header)
    print("-" * len(header))
    sums = {"before": {part: 0.0 for part in PARTS}, "after": {part: 0.0 for part in PARTS}}
    for label, ways in measured.items():
        for way in ("before", "after"):
            values = {part: median(ways[way], part) for part in PARTS}
            for part in PARTS:
                sums[way][part] += values[part]
            print(f"{label[:24]:24s} {way:7s} " + " ".join(f"{values[part]:11.2f}" for part in PARTS)
                  + (f"  {'yes' if identical[label] else 'NO'}" if way == "after" else ""))
    n = len(measured)
    print("-" * len(header))
    for way in ("before", "after"):
        total = sums[way]["total"]
        print(f"{'mean per cell':24s} {way:7s} " + " ".join(f"{sums[way][part] / n:11.2f}" for part in PARTS))
        print(f"{'  share of total':24s} {way:7s} "
              + " ".join(f"{100 * sums[way][part] / total:10.0f}%" for part in PARTS))
    ratio = sums["after"]["total"] / sums["before"]["total"]
    eval_ratio = sums["after"]["epoch_eval"] / sums["before"]["epoch_eval"]
    print(f"after / before: whole cell {ratio:.2f}, per-epoch evaluation {eval_ratio:.2f}, final evaluation "
          f"{sums['after']['final_eval'] / sums['before']['final_eval']:.2f}")

    # The protocol: a configuration is one distinct tuning cell of a trial (aliases of one configuration share it).
    every, every_trial = trial_cells(args.dataset, ["*"], out)
    configurations = sum(1 for c in every if c.kind == "method" and every_trial[c.key][1] == 0)
    tuning_cells_count = configurations * args.trials * args.tune_seeds * 2  # a random and a class-wise cell per seed
    held_out = args.eval_seeds * 2 * (configurations + 1) * 2  # + raw (untuned); both rules (an upper bound)
    # Original and Retrain per tuning seed and forget setting, and per evaluation seed and scenario (upper bound).
    reference_count = 2 * 2 * args.tune_seeds + 2 * 2 * args.eval_seeds
    per_model = training_seconds(out, reference_cpu)
    per_trial_after = sums["after"]["total"] / n
    per_trial_before = sums["before"]["total"] / n
    tuning = tuning_cells_count * per_trial_after
    evaluation = held_out * per_trial_before
    refs = reference_count * per_model
    total = (tuning + evaluation + refs) / args.jobs
    print(f"\nprotocol estimate ({configurations} configurations, their cost taken from the {n} measured here; "
          f"--trials {args.trials}, {args.tune_seeds} tuning seeds x (1 random + 1 class-wise cell), "
          f"{args.eval_seeds} evaluation seeds x 2 scenarios x 2 rules, --jobs {args.jobs}):")
    print(f"  tuning     {tuning_cells_count:5d} cells x {per_trial_after:5.2f} CPU s = {tuning:7.0f} CPU s "
          f"(before: {tuning_cells_count * per_trial_before:7.0f})")
    print(f"  held-out   {held_out:5d} cells x {per_trial_before:5.2f} CPU s <= {evaluation:7.0f} CPU s "
          f"(every metric at every epoch up to the maximum: an upper bound)")
    print(f"  references {reference_count:5d} models x {per_model:5.1f} CPU s = {refs:7.0f} CPU s (original and "
          f"Retrain, training time measured by this script)")
    print(f"  total / {args.jobs} jobs: about {total / 60:.0f} min (before: "
          f"{(tuning_cells_count * per_trial_before + evaluation + refs) / args.jobs / 60:.0f} min)")


if __name__ == "__main__":
    main()
