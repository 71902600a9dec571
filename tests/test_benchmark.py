"""benchmark.py on a tiny grid: the table against its result JSONs, resuming, mlflow nesting, --emit-commands."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, run_main

TINY_GRID = ["--datasets", "digits", "--seeds", "1", "2", "--scenarios", "random", "--epochs", "2", "--width", "4",
             "--unlearn_epochs", "1", "--out", "out", "--no-progress"]
METRICS = ("UA", "RA", "TA", "MIA_efficacy", "avg_gap", "RTE_seconds")


def benchmark(*args: str, cwd: Path, tracking_uri: str | None = None, timeout: int = 400):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update({"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    return subprocess.run([sys.executable, str(ROOT / "benchmark.py"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def benchmark_here(*args: str, cwd: Path):
    """`benchmark` in this process (`run_main`): for runs with --jobs 1, whose cells run in the submitting process."""
    return run_main("benchmark.py", *args, cwd=cwd, env={"MLFLOW_TRACKING_URI": None, "OMP_NUM_THREADS": "1"})


def snapshot(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    """Two method configurations (GA; VarGrad = NGradMask, one alias pair), two seeds, tracked in ./mlflow.db."""
    cwd = tmp_path_factory.mktemp("sweep")
    first = benchmark(*TINY_GRID, "--methods", "GA", "VarGrad", "NGradMask", "--jobs", "2", "--epoch-eval", "all",
                      cwd=cwd)
    return cwd, first


@pytest.mark.integration
def test_table_has_retrain_first_and_means_of_the_result_jsons(tiny_sweep):
    cwd, proc = tiny_sweep
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = cwd / "out"
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["method"] for r in rows][0] == "Retrain"
    assert {r["method"] for r in rows} == {"Retrain", "GA", "NGradMask = VarGrad"}
    gaps = [float(r["avg_gap_mean"]) for r in rows[1:]]
    assert gaps == sorted(gaps), "methods sorted by Avg. Gap"

    # Independently of the CSV's own cell list: every result JSON in the out dir, grouped by what it ran.
    results = [json.loads(p.read_text()) for p in (out / "cells").glob("*.json")]
    assert len(results) == 6, "2 seeds x (Retrain row, GA, one run for the alias pair)"
    row_of = {"retrain": "Retrain", "GA": "GA", "NGradMask": "NGradMask = VarGrad"}
    for row in rows:
        members = [r for r in results if row_of[r["args"]["unlearn"]] == row["method"]]
        assert sorted(r["args"]["seed"] for r in members) == [1, 2]
        for key in METRICS:
            values = [r[key] for r in members]
            assert float(row[f"{key}_mean"]) == pytest.approx(np.mean(values), abs=1e-9), (row["method"], key)
            assert float(row[f"{key}_std"]) == pytest.approx(np.std(values, ddof=1), abs=1e-9), (row["method"], key)

    retrain = [r for r in results if r["args"]["unlearn"] == "retrain"]
    assert all(r["avg_gap"] == 0 and r["RTE_seconds"] > 0 for r in retrain), "Retrain row: its training time as RTE"
    table = (out / "results.md").read_text()
    first_row = [line for line in table.splitlines() if line.startswith("| ") and "Method" not in line][0]
    assert first_row.startswith("| Retrain |")
    assert "NGradMask = VarGrad: same configuration (NGPlus + prob), run once." in table
    assert "| Retrain |" in proc.stdout, "the table is printed"
    assert (out / "tradeoff_digits_resnet18.png").stat().st_size > 0
    assert (out / "curves_digits_resnet18.png").stat().st_size > 0, "masking family curves (VarGrad has curves)"


@pytest.mark.integration
def test_nested_mlflow_runs(tiny_sweep):
    from mlflow.tracking import MlflowClient

    cwd, proc = tiny_sweep
    assert proc.returncode == 0
    client = MlflowClient(tracking_uri=f"sqlite:///{cwd / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("benchmark-digits")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) >= 1 and len(children) == 6
    parent_ids = {r.info.run_id for r in parents}
    assert all(r.data.tags["mlflow.parentRunId"] in parent_ids for r in children)
    ga = [r for r in children if r.data.params.get("method") == "GA"]
    assert len(ga) == 2 and all(len(client.get_metric_history(r.info.run_id, "UA")) == 1 for r in ga)
    artifacts = {a.path for a in client.list_artifacts(parents[-1].info.run_id)}
    assert {"results.md", "results.csv", "plots"} <= artifacts
    plots = {a.path for a in client.list_artifacts(parents[-1].info.run_id, "plots")}
    assert "plots/tradeoff_digits_resnet18.png" in plots


@pytest.mark.integration
def test_second_invocation_recomputes_nothing(tiny_sweep):
    from mlflow.tracking import MlflowClient

    cwd, first = tiny_sweep
    assert first.returncode == 0
    assert "computed 10 cell(s), reused 0" in first.stdout  # 2 originals, 2 Retrain, 2 Retrain rows, 4 method cells
    before = snapshot(cwd / "out" / "cells") | snapshot(cwd / "out" / "models")
    second = benchmark(*TINY_GRID, "--methods", "GA", "VarGrad", "NGradMask", "--jobs", "2", "--epoch-eval", "all",
                       cwd=cwd)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "computed 0 cell(s), reused 10" in second.stdout
    assert json.loads((cwd / "out" / "sweep.json").read_text())["computed"] == 0
    assert snapshot(cwd / "out" / "cells") | snapshot(cwd / "out" / "models") == before
    client = MlflowClient(tracking_uri=f"sqlite:///{cwd / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("benchmark-digits").experiment_id])
    assert sum("mlflow.parentRunId" in r.data.tags for r in runs) == 6, "finished cells are not logged twice"


@pytest.mark.integration
def test_rerun_recomputes_only_what_it_is_asked_to(tiny_sweep, tmp_path):
    import shutil

    cwd, first = tiny_sweep
    assert first.returncode == 0
    shutil.copytree(cwd / "out", tmp_path / "out")  # a moved out dir keeps its finished cells
    before = snapshot(tmp_path / "out" / "cells")
    proc = benchmark_here(*TINY_GRID, "--seeds", "1", "--methods", "GA", "--rerun", "--no-track", "--jobs", "1",
                          "--epoch-eval", "all", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "computed 2 cell(s), reused 2" in proc.stdout  # GA and the Retrain row again; the models are kept
    after = snapshot(tmp_path / "out" / "cells")
    changed = sorted(name for name in before if after[name] != before[name])
    assert len(changed) == 2 and sorted(after) == sorted(before)
    assert {json.loads((tmp_path / "out" / "cells" / name).read_text())["args"]["unlearn"] for name in changed} == \
        {"GA", "retrain"}


@pytest.mark.slow
@pytest.mark.integration
def test_emit_commands_then_run_one(tmp_path, monkeypatch):
    import benchmark as entry

    monkeypatch.chdir(tmp_path)
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({"GA": {"unlearn_lr": [1e-4, 1e-3]}}))
    args = [*TINY_GRID, "--scenarios", "random", "classwise", "--methods", "GA", "FT_l1", "FT_prune", "--grid",
            str(grid), "--no-track"]
    assert entry.main([*args, "--emit-commands", "cells.txt"]) == 0
    lines = (tmp_path / "cells.txt").read_text().splitlines()
    assert len(lines) == (2 + 1) * 2 * 2, "(GA x 2 learning rates + FT_l1 = FT_prune) x 2 scenarios x 2 seeds"
    assert all("mlflow_forget.py" in line and "--no-track" in line and "--result_json" in line for line in lines)
    assert sum("--unlearn_lr 0.001" in line for line in lines) == 4
    for line in lines:  # each seed is its own replication: its models are initialised from the seed
        words = line.split()
        assert words[words.index("--train_seed") + 1] == words[words.index("--seed") + 1], line
    assert not (tmp_path / "out").exists(), "emitting runs nothing"

    # Self-contained: runs from any directory, trains its own references, writes into the sweep's cell store.
    done = subprocess.run(["bash", "-c", lines[0]], cwd="/", capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    result_file = Path(lines[0].split("--result_json ")[1].split()[0])
    assert json.loads(result_file.read_text())["args"]["unlearn"] in ("GA", "FT_l1")
    assert entry.main([*args, "--emit-commands", "rest.txt"]) == 0
    assert len((tmp_path / "rest.txt").read_text().splitlines()) == len(lines) - 1, "finished cells are not emitted"


def test_bad_input_is_one_line(tmp_path):
    import benchmark as entry
    from utils import UserError

    proc = benchmark_here("--methods", "NoSuchMethod*", "--no-track", cwd=tmp_path)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "no method matches" in proc.stderr
    bad_grid = tmp_path / "grid.json"
    bad_grid.write_text(json.dumps({"GA": {"learning_rate": [0.1]}}))
    with pytest.raises(UserError, match="not a method hyper-parameter flag"):
        entry.main(["--grid", str(bad_grid), "--no-track", "--out", str(tmp_path / "out")])
    bad_grid.write_text(json.dumps({"NoSuch": {"unlearn_lr": 0.1}}))
    with pytest.raises(UserError, match="no method matches 'NoSuch'"):
        entry.main(["--grid", str(bad_grid), "--no-track", "--out", str(tmp_path / "out")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.json"]


def test_grid_expansion_and_alias_cells(tmp_path):
    import sweep
    from scenarios import forget_count

    sources = [{"GA": {"unlearn_lr": [1e-4, 1e-3], "unlearn_epochs": 3}},
               {"G*": {"unlearn_epochs": [1, 2], "scenarios": {"classwise": {"unlearn_lr": 0.01}}}}]
    combos = sweep.method_combos("GA", "random", sources)
    assert len(combos) == 4 and {c["unlearn_epochs"] for c in combos} == {1, 2}
    assert sweep.method_combos("GA", "classwise", sources) == [{"unlearn_epochs": 1, "unlearn_lr": 0.01},
                                                              {"unlearn_epochs": 2, "unlearn_lr": 0.01}]
    assert sweep.method_combos("FT", "random", sources) == [{}]

    settings = sweep.Settings(datasets=["digits"], archs=["resnet18"], scenarios=["random", "classwise"],
                              methods=["FT_l1", "FT_prune", "VarGrad", "NGradMask", "NGPlus"], seeds=[1],
                              out=tmp_path, epochs=2, width=4, config=None)
    cells, notes = sweep.build_cells(settings)
    methods = [c for c in cells if c.kind == "method"]
    assert sorted(c.label for c in methods if c.scenario == "random") == ["FT_l1 = FT_prune", "NGPlus",
                                                                          "NGradMask = VarGrad"]
    assert len({c.key for c in methods}) == 6 and len([c for c in cells if c.kind == "original"]) == 1
    assert any("FT_l1 = FT_prune" in note for note in notes)
    random_ga = [c for c in methods if c.scenario == "random"][0]
    assert f"--num_indexes_to_replace {forget_count(settings, sweep.train_size('digits', settings))}" in \
        " ".join(random_ga.argv)
    assert "--class_to_replace 0" in " ".join([c for c in methods if c.scenario == "classwise"][0].argv)
    assert not tmp_path.exists() or not any(tmp_path.iterdir()), "building the grid writes nothing"


@pytest.mark.integration
def test_damaged_cell_files_are_computed_again(tiny_sweep, tmp_path):
    """A truncated result (`{"UA": 1`) and an empty object are no finished cells: recomputed, and the table is built."""
    import shutil

    cwd, first = tiny_sweep
    assert first.returncode == 0
    shutil.copytree(cwd / "out", tmp_path / "out")
    cells = {json.loads(p.read_text())["args"]["unlearn"]: p for p in (tmp_path / "out" / "cells").glob("*.json")
             if json.loads(p.read_text())["args"]["seed"] == 1}
    cells["GA"].write_text('{"UA": 1')
    cells["retrain"].write_text("{}")
    proc = benchmark_here(*TINY_GRID, "--seeds", "1", "--methods", "GA", "--no-track", "--jobs", "1", "--epoch-eval",
                          "all", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "computed 2 cell(s), reused 2" in proc.stdout  # the Retrain row and GA; the models are kept
    assert json.loads(cells["GA"].read_text())["args"]["unlearn"] == "GA"
    assert json.loads(cells["retrain"].read_text())["avg_gap"] == 0
    rows = {r["method"]: r for r in csv.DictReader((tmp_path / "out" / "results.csv").open())}
    assert rows["GA"]["seeds"] == "1" and rows["Retrain"]["seeds"] == "1"


@pytest.mark.integration
def test_exit_1_when_every_method_cell_failed(tiny_sweep, tmp_path):
    """GA with a learning rate that blows the weights up diverges (a remembered failure): no method has a result."""
    import shutil

    cwd, first = tiny_sweep
    assert first.returncode == 0
    shutil.copytree(cwd / "out", tmp_path / "out")
    (tmp_path / "grid.json").write_text(json.dumps({"GA": {"unlearn_lr": 1e30}}))
    args = [*TINY_GRID, "--seeds", "1", "--methods", "GA", "--grid", str(tmp_path / "grid.json"), "--no-track",
            "--jobs", "1"]
    proc = benchmark_here(*args, cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "computed 1 cell(s), reused 3" in proc.stdout and "1 failed, 0 errors" in proc.stdout
    assert "no method cell has a result" in proc.stderr
    assert "| GA | n/a |" in (tmp_path / "out" / "results.md").read_text()
    again = benchmark_here(*args, cwd=tmp_path)  # the failure is remembered, and still nothing to compare
    assert again.returncode == 1 and "computed 0 cell(s), reused 4" in again.stdout
