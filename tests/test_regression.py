"""The redesign changes no number: the same commands give the values recorded from commit c407b81 on this kind of
machine (CPU). Metrics must match exactly; the weights' L1 / L2 sums to 1e-6 relative (robust to summation order).
The scripts run in this process (`run_main`, with the thread count of a fresh interpreter): the same numbers, without
an interpreter start per case."""
import json
import math
from pathlib import Path

import pytest
import torch

from conftest import ROOT, run_main

RECORD = json.loads((ROOT / "tests" / "data" / "regression_c407b81.json").read_text())
METRICS = ["UA", "RA", "TA", "MIA_efficacy", "avg_gap", "rUA", "agreement"]
pytestmark = pytest.mark.slow  # three models trained, sixteen methods run on the recorded (not the tiny) settings


def checksum(path: Path) -> dict:
    state = torch.load(path, weights_only=True)["state_dict"]
    floats = [v.double() for v in state.values() if v.is_floating_point()]
    return {"l1": float(sum(v.abs().sum() for v in floats)), "l2": float(sum((v ** 2).sum() for v in floats))}


def close(a: float, b: float, rel: float = 1e-6) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-9)


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    out = tmp_path_factory.mktemp("regression")
    base = RECORD["base"]
    result = run_main("main_baseline.py", *base, "--save_dir", str(out))
    assert result.returncode == 0, result.stderr
    for scenario in ("random", "classwise"):
        result = run_main("main_baseline.py", *base, *RECORD[scenario], "--save_dir", str(out), "--retrain")
        assert result.returncode == 0, result.stderr
    return out


def test_original_model_unchanged(references):
    got = checksum(references / "1resnet18_ep3model_SA_best.pth.tar")
    assert close(got["l1"], RECORD["original"]["l1"]) and close(got["l2"], RECORD["original"]["l2"])


@pytest.mark.parametrize("case", RECORD["cases"],
                         ids=lambda c: f"{c['scenario']}-{'-'.join(c['args'][1:2] + c['args'][2:4])}")
def test_method_numbers_unchanged(references, case):
    base, name = RECORD["base"], case["args"][1]
    out = references / f"{case['scenario']}-{'_'.join(case['args'])}".replace("-", "")
    out.mkdir()
    for f in references.glob("*.pth.tar"):  # each case in its own folder: the result files are named by method
        (out / f.name).symlink_to(f)
    result = run_main("main_forget.py", *base, *RECORD[case["scenario"]], "--save_dir", str(out),
                      "--mask", str(out / "1resnet18_ep3model_SA_best.pth.tar"), *case["args"])
    assert result.returncode == 0, result.stderr
    got = json.loads((out / f"{name}eval_result.json").read_text())
    for key in METRICS:
        assert close(got[key], case[key]), (key, got[key], case[key])
    assert got["accuracy"] == pytest.approx(case["accuracy"], rel=1e-9)
    assert got["SVC_MIA_forget_efficacy"] == pytest.approx(case["SVC_MIA_forget_efficacy"], rel=1e-9)
    weights = checksum(out / f"{name}checkpoint.pth.tar")
    assert close(weights["l1"], case["checksum"]["l1"]) and close(weights["l2"], case["checksum"]["l2"])
