"""SVC-MIA, the five features, Avg. Gap and the result JSON, against hand-computed cases."""
import json
import math

import numpy as np
import pytest
import torch

from evaluation import Evaluation, avg_gap, build_result, compare_to_retrain, mia_features, svc_mia, write_result
from evaluation.metrics import mia_against_test_set
from evaluation.svc_mia import svc_attack


def test_features_by_hand():
    p = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], dtype=torch.float64)
    y = torch.tensor([0, 1])
    f = mia_features(p, y)
    assert f["correctness"].ravel().tolist() == [1.0, 0.0]
    assert f["confidence"].ravel().tolist() == pytest.approx([0.7, 0.1])
    ent0 = -(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1))
    assert f["entropy"][0, 0] == pytest.approx(ent0)
    # Song-Mittal: -(1 - p_y) log p_y - sum_{i != y} p_i log(1 - p_i)
    m0 = -(0.3 * math.log(0.7)) - (0.2 * math.log(0.8) + 0.1 * math.log(0.9))
    m1 = -(0.9 * math.log(0.1)) - (0.1 * math.log(0.9) + 0.8 * math.log(0.2))
    assert f["m_entropy"].ravel().tolist() == pytest.approx([m0, m1])
    assert f["prob"].shape == (2, 3)


def test_entropy_zero_probabilities_count_zero():
    f = mia_features(torch.tensor([[1.0, 0.0]], dtype=torch.float64), torch.tensor([0]))
    assert f["entropy"][0, 0] == 0.0 and np.isfinite(f["m_entropy"]).all()


def _probs(confidences, num_classes=10):
    """Probability vectors whose true-label probability is `c`, rest spread evenly; label 0."""
    c = torch.as_tensor(confidences, dtype=torch.float64)
    p = ((1 - c) / (num_classes - 1))[:, None].repeat(1, num_classes)
    p[:, 0] = c
    return p, torch.zeros(len(c), dtype=torch.long)


def test_svc_mia_separable_members_are_found():
    rng = np.random.RandomState(0)
    members = _probs(rng.uniform(0.95, 1.0, 300))
    non_members = _probs(rng.uniform(0.05, 0.4, 300))
    target_in = _probs(rng.uniform(0.95, 1.0, 100))
    target_out = _probs(rng.uniform(0.05, 0.4, 100))
    out = svc_mia(members, non_members, target_in, target_out)
    assert out["confidence"] > 0.99 and out["entropy"] > 0.95 and out["prob"] > 0.95
    # MIA-Efficacy style: forget samples that look like non-members are called non-members
    eff = svc_mia(members, non_members, None, target_out)
    assert eff["confidence"] > 0.99


def test_svc_mia_indistinguishable_is_near_chance():
    rng = np.random.RandomState(1)

    def draw(n):
        return _probs(rng.uniform(0.1, 1.0, n))

    out = svc_mia(draw(400), draw(400), draw(400), draw(400))
    assert abs(out["confidence"] - 0.5) < 0.08


def test_svc_attack_needs_both_classes():
    with pytest.raises(ValueError):
        svc_attack(np.ones((3, 1)), np.ones((0, 1)), np.ones((2, 1)), None)


def _evaluation(forget, retain, test, conf, preds):
    return Evaluation(accuracy={"forget": forget, "retain": retain, "test": test, "val": 0.0},
                      svc={f: conf for f in ("correctness", "confidence", "entropy", "m_entropy", "prob")},
                      forget_predictions=np.asarray(preds))


def test_avg_gap_and_retrain_comparison_by_hand():
    method = _evaluation(forget=90.0, retain=99.0, test=88.0, conf=0.20, preds=[0, 1, 2, 3])
    retrain = _evaluation(forget=85.0, retain=100.0, test=87.0, conf=0.12, preds=[0, 1, 5, 5])
    # gaps: UA |10 - 15| = 5, RA 1, TA 1, MIA |20 - 12| = 8  -> mean 3.75
    assert avg_gap(method.metrics, retrain.metrics) == pytest.approx(3.75)
    cmp = compare_to_retrain(method, retrain)
    assert cmp == pytest.approx({"rUA": 5.0, "agreement": 50.0, "avg_gap": 3.75})


def test_result_schema_and_atomic_write(tmp_path):
    method = _evaluation(90.0, 99.0, 88.0, 0.2, [0, 1])
    retrain = _evaluation(85.0, 100.0, 87.0, 0.12, [0, 1])
    result = build_result(method, {"unlearn": "FT"}, "abc", 1.5, retrain)
    for key in ("accuracy", "UA", "RA", "TA", "MIA_efficacy", "SVC_MIA_forget_efficacy", "RTE_seconds", "rUA",
                "agreement", "avg_gap", "args", "split_hash"):
        assert key in result
    assert result["UA"] == 10.0 and result["MIA_efficacy"] == pytest.approx(20.0)
    assert result["SVC_MIA_forget_efficacy"]["entropy"] == pytest.approx(20.0)
    path = write_result(tmp_path / "r.json", result)
    assert json.loads(path.read_text())["avg_gap"] == pytest.approx(result["avg_gap"])
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary file left behind
    with pytest.raises(ValueError, match="missing"):
        write_result(tmp_path / "bad.json", {"UA": 1})
    assert not (tmp_path / "bad.json").exists()
    no_ref = build_result(method, {}, "abc", 0.0)
    assert "avg_gap" not in no_ref


def test_mia_against_test_set_balances_shadow_sets_when_retain_is_smaller():
    """Members (retain, forget) are confident; most non-members (test) are confident too. With 100 members against 300
    non-members an SVC on the confidence calls every confident sample a non-member (efficacy 100 % on a forget set of
    members); balanced shadow sets (the first 100 test samples) call the forget set members, as they are."""
    rng = np.random.RandomState(0)
    retain = _probs(rng.uniform(0.97, 1.0, 100))
    forget = _probs(rng.uniform(0.97, 1.0, 50))
    test = _probs(np.concatenate([rng.uniform(0.9, 1.0, 240), rng.uniform(0.1, 0.6, 60)])[rng.permutation(300)])
    probs = {"retain": retain, "forget": forget, "test": test}
    out = mia_against_test_set(probs)
    assert out["confidence"] < 0.2
    first = (test[0][:100], test[1][:100])
    assert out == svc_mia(retain, first, None, forget)
    unbalanced = svc_mia(retain, test, None, forget)
    assert unbalanced["confidence"] > 0.8  # what the unbalanced fit gave


def test_mia_against_test_set_is_upstreams_when_retain_outnumbers_test():
    rng = np.random.RandomState(2)
    retain = _probs(rng.uniform(0.5, 1.0, 200))
    forget = _probs(rng.uniform(0.5, 1.0, 30))
    test = _probs(rng.uniform(0.1, 0.9, 80))
    probs = {"retain": retain, "forget": forget, "test": test}
    assert mia_against_test_set(probs) == svc_mia((retain[0][:80], retain[1][:80]), test, None, forget)
