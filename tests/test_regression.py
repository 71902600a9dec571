"""The redesign changes no number: the same commands give the values that commit c407b81 gave on this kind of CPU
(`regression_record.py`: one entry per kind, made by `record_regression.py` from a checkout of c407b81). Metrics must
match exactly; the weights' L1 / L2 sums to 1e-6 relative (robust to summation order). The scripts run in this process
(`run_main`) with the record's thread count, `RECORD_THREADS`, whatever the machine's core count."""
import json
import math

import pytest

from conftest import ROOT, run_main
from regression_record import RECORD_THREADS, case_folder, checksum, values_for_this_machine

RECORD = json.loads((ROOT / "tests" / "data" / "regression_c407b81.json").read_text())
KIND, VALUES = values_for_this_machine(RECORD)
THREADS = {"OMP_NUM_THREADS": str(RECORD_THREADS)}
METRICS = ["UA", "RA", "TA", "MIA_efficacy", "avg_gap", "rUA", "agreement"]
pytestmark = pytest.mark.slow  # three models trained, sixteen methods run on the recorded (not the tiny) settings


def close(a: float, b: float, rel: float = 1e-6) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-9)


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    out = tmp_path_factory.mktemp("regression")
    base = RECORD["base"]
    result = run_main("main_baseline.py", *base, "--save_dir", str(out), env=THREADS)
    assert result.returncode == 0, result.stderr
    for scenario in ("random", "classwise"):
        result = run_main("main_baseline.py", *base, *RECORD[scenario], "--save_dir", str(out), "--retrain",
                          env=THREADS)
        assert result.returncode == 0, result.stderr
    return out


def test_original_model_unchanged(references):
    got = checksum(references / "1resnet18_ep3model_SA_best.pth.tar")
    want = VALUES["original"]
    assert close(got["l1"], want["l1"]) and close(got["l2"], want["l2"]), (KIND, got, want)


def test_every_kind_records_every_case():
    for kind, values in RECORD["kinds"].items():
        assert [(c["scenario"], c["args"]) for c in values["cases"]] == \
            [(c["scenario"], c["args"]) for c in RECORD["cases"]], kind


@pytest.mark.parametrize("case", VALUES["cases"],
                         ids=lambda c: f"{c['scenario']}-{'-'.join(c['args'][1:2] + c['args'][2:4])}")
def test_method_numbers_unchanged(references, case):
    base, name = RECORD["base"], case["args"][1]
    out = case_folder(references, case)
    out.mkdir()
    for f in references.glob("*.pth.tar"):
        (out / f.name).symlink_to(f)
    result = run_main("main_forget.py", *base, *RECORD[case["scenario"]], "--save_dir", str(out),
                      "--mask", str(out / "1resnet18_ep3model_SA_best.pth.tar"), *case["args"], env=THREADS)
    assert result.returncode == 0, result.stderr
    got = json.loads((out / f"{name}eval_result.json").read_text())
    for key in METRICS:
        assert close(got[key], case[key]), (KIND, key, got[key], case[key])
    assert got["accuracy"] == pytest.approx(case["accuracy"], rel=1e-9)
    assert got["SVC_MIA_forget_efficacy"] == pytest.approx(case["SVC_MIA_forget_efficacy"], rel=1e-9)
    weights = checksum(out / f"{name}checkpoint.pth.tar")
    assert close(weights["l1"], case["checksum"]["l1"]) and close(weights["l2"], case["checksum"]["l2"])
