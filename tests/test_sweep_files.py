"""What the sweep reads and where it writes: damaged cell files are not finished cells; output paths are checked
before any work."""
from __future__ import annotations

import json
import os

import pytest

from conftest import run_main


@pytest.fixture(scope="module")
def cells_and_settings(tmp_path_factory):
    from sweep import Settings, build_cells

    out = tmp_path_factory.mktemp("sweep") / "out"
    settings = Settings(datasets=["digits"], archs=["resnet18"], scenarios=["random"], methods=["GA"], seeds=[1, 2],
                        out=out, epochs=2, width=4)
    cells, _ = build_cells(settings)
    return cells, settings


def fake_result(cell, ua: float) -> dict:
    return {"args": {"seed": cell.seed}, "UA": ua, "RA": 99.0, "TA": 95.0, "MIA_efficacy": 10.0, "avg_gap": 1.0,
            "RTE_seconds": 0.5}


@pytest.mark.parametrize("damaged", ['{"UA": 1', "{}", "", "[1, 2]", '{"UA": 1, "RTE_seconds": 2}', "\xff"])
def test_a_damaged_cell_file_is_not_a_finished_cell(cells_and_settings, damaged):
    from sweep import aggregate, is_done

    cells, settings = cells_and_settings
    out = settings.out
    ga = [c for c in cells if c.kind == "method"]
    (out / "cells").mkdir(parents=True, exist_ok=True)
    good, bad = ga
    good.result_path(out).write_text(json.dumps(fake_result(good, 40.0)))
    bad.result_path(out).write_text(damaged)
    try:
        assert is_done(good, out) and not is_done(bad, out)
        (row,) = [r for r in aggregate(cells, out) if r["method"] == "GA"]
        assert row["seeds"] == [good.seed] and row["failed_seeds"] == [bad.seed] and row["UA_mean"] == 40.0
    finally:
        good.result_path(out).unlink()
        bad.result_path(out).unlink()


def test_a_damaged_failure_record_is_not_a_finished_cell(cells_and_settings):
    from sweep import is_done

    cells, settings = cells_and_settings
    out = settings.out
    cell = [c for c in cells if c.kind == "method"][0]
    (out / "cells").mkdir(parents=True, exist_ok=True)
    cell.failure_path(out).write_text('{"error": "Diverg')
    try:
        assert not is_done(cell, out)
        cell.failure_path(out).write_text(json.dumps({"error": "DivergenceError: diverged", "argv": []}))
        assert is_done(cell, out), "a complete failure record: deterministic, not retried"
    finally:
        cell.failure_path(out).unlink()


def test_check_output_path(tmp_path):
    from sweep import check_output_path
    from utils import UserError

    a_file = tmp_path / "results.md"
    a_file.write_text("x")
    check_output_path(tmp_path / "new" / "deeper", "--out", directory=True)
    check_output_path(tmp_path, "--out", directory=True)
    check_output_path(a_file, "--emit-commands", directory=False)
    check_output_path(tmp_path / "new" / "cells.txt", "--emit-commands", directory=False)
    with pytest.raises(UserError, match="is a file; pass a directory path"):
        check_output_path(a_file, "--out", directory=True)
    with pytest.raises(UserError, match="is a file, so the directory cannot be created"):
        check_output_path(a_file / "sub" / "out", "--out", directory=True)
    with pytest.raises(UserError, match="is a file, so the file cannot be created"):
        check_output_path(a_file / "cells.txt", "--emit-commands", directory=False)
    with pytest.raises(UserError, match="is a directory; pass a file path"):
        check_output_path(tmp_path, "--emit-commands", directory=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.md"], "checks create nothing"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_check_output_path_unwritable(tmp_path):
    from sweep import check_output_path
    from utils import UserError

    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(UserError, match="is not writable"):
        check_output_path(locked / "out", "--out", directory=True)


@pytest.mark.parametrize("flags", [["--out", "{file}/out"], ["--out", "{file}"],
                                   ["--emit-commands", "{file}/cells.txt"], ["--emit-commands", "{dir}"]])
def test_benchmark_rejects_an_output_path_through_a_file(tmp_path, flags):
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    (tmp_path / "folder").mkdir()
    args = [f.format(file=a_file, dir=tmp_path / "folder") for f in flags]
    proc = run_main("benchmark.py", "--datasets", "digits", "--methods", "GA", "--seeds", "1", *args, cwd=tmp_path,
                    env={"MLFLOW_TRACKING_URI": None, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("error: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "taken"], "nothing written (not even mlflow.db)"
    assert list((tmp_path / "folder").iterdir()) == []
