"""Numerics of the per-example membership inference attacks (evaluation/attacks.py)."""
import math

import numpy as np
import pytest
import torch
from scipy.stats import norm
from sklearn.metrics import roc_auc_score, roc_curve

from evaluation.attacks import (
    RMIA_A_GRID,
    attack_summary,
    balanced_accuracy_best_threshold,
    lira_offline,
    lira_online,
    logit_confidence,
    rmia_scores,
    roc_auc,
    roc_curve_points,
    tpr_at_fpr,
    tune_rmia_a,
    ulira_accuracy,
    ulira_scores,
)
from utils import UserError

# The hand case: members [3, 4, 5, 6] vs non-members [0, 1, 2, 3.5].
HAND_SCORES = np.array([3.0, 4.0, 5.0, 6.0, 0.0, 1.0, 2.0, 3.5])
HAND_MEMBER = np.array([True, True, True, True, False, False, False, False])


# ---------------------------------------------------------------------------------------------------------------- ROC

def pair_count_auc(member_scores, non_scores):
    wins = sum((m > n) + 0.5 * (m == n) for m in member_scores for n in non_scores)
    return wins / (len(member_scores) * len(non_scores))


def test_auc_hand_case_pair_count_and_literal():
    # member 3 beats 0, 1, 2 but not 3.5 (3 pairs); 4, 5, 6 beat all four (12 pairs): 15 of 16 pairs.
    assert pair_count_auc([3, 4, 5, 6], [0, 1, 2, 3.5]) == 15 / 16
    assert roc_auc(HAND_SCORES, HAND_MEMBER) == pytest.approx(15 / 16, abs=1e-15)
    assert roc_auc(HAND_SCORES, HAND_MEMBER) == pytest.approx(0.9375, abs=1e-15)


def test_auc_ties_count_half():
    # wins (2>1), (3>1), (3>2) = 3 pairs, ties (1,1), (2,2), (3,3) = 3 halves: 4.5 / 9.
    assert pair_count_auc([1, 2, 3], [1, 2, 3]) == 0.5
    assert roc_auc([1, 2, 3, 1, 2, 3], [1, 1, 1, 0, 0, 0]) == 0.5
    assert roc_auc(np.zeros(10), np.arange(10) < 5) == 0.5
    # one tie among otherwise won pairs: members [2, 2], non-members [1, 2] -> (1 + 0.5 + 1 + 0.5) / 4
    assert roc_auc([2, 2, 1, 2], [1, 1, 0, 0]) == 0.75


def test_auc_matches_pair_count_and_sklearn_on_random_ties():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 6, size=60).astype(float)  # many ties
    member = rng.random(60) < 0.4
    expected = pair_count_auc(scores[member], scores[~member])
    assert roc_auc(scores, member) == pytest.approx(expected, abs=1e-12)
    assert roc_auc(scores, member) == pytest.approx(roc_auc_score(member, scores), abs=1e-12)


def test_roc_curve_points_hand_case():
    fpr, tpr, thresholds = roc_curve_points(HAND_SCORES, HAND_MEMBER)
    np.testing.assert_array_equal(thresholds, [np.inf, 6, 5, 4, 3.5, 3, 2, 1, 0])
    np.testing.assert_allclose(tpr, [0, .25, .5, .75, .75, 1, 1, 1, 1])
    np.testing.assert_allclose(fpr, [0, 0, 0, 0, .25, .25, .5, .75, 1])
    # trapezoidal area under these points is the Mann-Whitney AUC
    assert np.trapezoid(tpr, fpr) == pytest.approx(15 / 16)


def test_roc_curve_points_groups_ties_and_matches_sklearn():
    rng = np.random.default_rng(1)
    scores = np.round(rng.normal(size=200), 1)
    member = rng.random(200) < 0.5
    fpr, tpr, thresholds = roc_curve_points(scores, member)
    sk_fpr, sk_tpr, _ = roc_curve(member, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    assert len(thresholds) == len(np.unique(scores)) + 1


def test_tpr_at_fpr_hand_case_convention():
    # 0 false positives allowed: threshold above 3.5 -> members 4, 5, 6
    assert tpr_at_fpr(HAND_SCORES, HAND_MEMBER, 0.0) == 0.75
    assert tpr_at_fpr(HAND_SCORES, HAND_MEMBER, 0.2) == 0.75  # floor(0.2 * 4) = 0 false positives
    # exactly 1 of 4 false positives is allowed at 25 % (inclusive): threshold 3 -> all members
    assert tpr_at_fpr(HAND_SCORES, HAND_MEMBER, 0.25) == 1.0
    assert tpr_at_fpr(HAND_SCORES, HAND_MEMBER, 1.0) == 1.0


def test_tpr_at_fpr_thousand_non_members():
    non = np.arange(1000, dtype=float)                       # 0, 1, ..., 999
    members = np.r_[np.full(50, 1000.5), np.full(30, 998.5), np.full(20, 500.5)]
    scores = np.r_[members, non]
    member = np.r_[np.ones(100, bool), np.zeros(1000, bool)]
    # 0.1 % of 1000 = 1 false positive: threshold 998.5 admits non-member 999 and 80 members
    assert tpr_at_fpr(scores, member, 0.001) == 0.8
    assert tpr_at_fpr(scores, member, 0.0) == 0.5             # only the 50 above every non-member
    assert tpr_at_fpr(scores, member, 0.0009) == 0.5          # floor(0.9) = 0 false positives
    assert tpr_at_fpr(scores, member, 0.01) == 0.8            # 10 false positives: threshold 990
    assert tpr_at_fpr(scores, member, 0.5) == 1.0             # 500 false positives: threshold 500 (500..999)
    assert tpr_at_fpr(scores, member, 0.499) == 1.0           # 499: threshold 500.5 (non-members 501..999)
    assert tpr_at_fpr(scores, member, 0.498) == 0.8           # 498: threshold 502 misses the members at 500.5
    # same as the best sklearn ROC point with FPR <= target
    sk_fpr, sk_tpr, _ = roc_curve(member, scores, drop_intermediate=False)
    for target in (0.0, 0.001, 0.01, 0.3, 0.5):
        assert tpr_at_fpr(scores, member, target) == pytest.approx(sk_tpr[sk_fpr <= target + 1e-12].max())
    summary = attack_summary(scores, member)
    assert summary["tpr@0.1%fpr"] == 0.8 and summary["tpr@1%fpr"] == 0.8


def test_perfectly_separable():
    scores = np.r_[np.linspace(10, 20, 50), np.linspace(0, 9, 2000)]
    member = np.r_[np.ones(50, bool), np.zeros(2000, bool)]
    summary = attack_summary(scores, member)
    assert summary == {"auc": 1.0, "tpr@1%fpr": 1.0, "tpr@0.1%fpr": 1.0, "balanced_accuracy": 1.0}
    assert all(type(v) is float for v in summary.values())


def test_identical_scores_are_chance():
    summary = attack_summary(np.ones(100), np.arange(100) % 2 == 0)
    assert summary == {"auc": 0.5, "tpr@1%fpr": 0.0, "tpr@0.1%fpr": 0.0, "balanced_accuracy": 0.5}


def test_balanced_accuracy_hand_case():
    # threshold 4: TPR 3/4, FPR 0 -> 0.875; threshold 3: TPR 1, FPR 1/4 -> 0.875; the higher threshold wins the tie
    assert balanced_accuracy_best_threshold(HAND_SCORES, HAND_MEMBER) == (0.875, 4.0)
    # direction is fixed: reversed scores cannot do better than calling nobody a member
    assert balanced_accuracy_best_threshold(-HAND_SCORES, HAND_MEMBER)[0] == 0.5


def test_metrics_accept_torch_and_reject_bad_input():
    assert roc_auc(torch.tensor(HAND_SCORES), torch.tensor(HAND_MEMBER)) == 15 / 16
    with pytest.raises(UserError, match="both members and non-members"):
        roc_auc([1.0, 2.0], [True, True])
    with pytest.raises(UserError, match="NaN"):
        roc_auc([1.0, float("nan")], [True, False])
    with pytest.raises(UserError, match="shape"):
        roc_auc([1.0, 2.0, 3.0], [True, False])
    with pytest.raises(UserError, match="0 and 1"):
        roc_auc([1.0, 2.0], [2, 0])
    with pytest.raises(UserError, match=r"\[0, 1\]"):
        tpr_at_fpr(HAND_SCORES, HAND_MEMBER, 1.5)


# ------------------------------------------------------------------------------------------------- logit confidence

def test_logit_confidence_matches_naive_formula():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 10, generator=gen, dtype=torch.float64) * 3
    labels = torch.randint(0, 10, (64,), generator=gen)
    p = torch.softmax(logits, dim=1).gather(1, labels[:, None]).squeeze(1)
    naive = torch.log(p) - torch.log1p(-p)
    phi = logit_confidence(logits, labels)
    assert phi.dtype == torch.float64 and phi.shape == (64,)
    torch.testing.assert_close(phi, naive, rtol=1e-10, atol=1e-10)
    # float32 input stays float32 and agrees to float32 precision
    torch.testing.assert_close(logit_confidence(logits.float(), labels), naive.float(), rtol=1e-4, atol=1e-4)


def test_logit_confidence_extreme_logits_are_finite():
    logits = torch.zeros(2, 10)
    logits[0, 3] = 1000.0
    logits[1, 3] = -1000.0
    labels = torch.tensor([3, 3])
    phi = logit_confidence(logits, labels)
    assert torch.isfinite(phi).all()
    torch.testing.assert_close(phi, torch.tensor([1000.0 - math.log(9), -1000.0 - math.log(9)]))
    # half precision is promoted; integer logits too
    assert logit_confidence(logits.half(), labels).dtype == torch.float32
    assert logit_confidence(torch.tensor([[2, 0]]), torch.tensor([0])).item() == pytest.approx(2.0)
    # the caller's tensor is not modified
    assert logits[0, 3] == 1000.0


def test_logit_confidence_rejects_bad_input():
    with pytest.raises(UserError, match="labels must lie"):
        logit_confidence(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(UserError, match="C >= 2"):
        logit_confidence(torch.zeros(2, 1), torch.tensor([0, 0]))
    with pytest.raises(UserError, match="integer"):
        logit_confidence(torch.zeros(2, 3), torch.tensor([0.0, 1.0]))
    with pytest.raises(UserError, match="finite"):
        logit_confidence(torch.tensor([[0.0, float("inf")]]), torch.tensor([0]))


# --------------------------------------------------------------------------------------------------------------- LiRA

def gaussian_population(rng, n=2000, k=64, delta=2.0, sigma=1.0, difficulty=3.0):
    """Per-example φ ~ N(d_i + δ·IN, σ²), d_i ~ N(0, difficulty²); reference models on random halves."""
    d = rng.normal(0.0, difficulty, n)
    in_mask = rng.random((k, n)) < 0.5
    ref = d + delta * in_mask + rng.normal(0.0, sigma, (k, n))
    member = rng.random(n) < 0.5
    target = d + delta * member + rng.normal(0.0, sigma, n)
    return target, ref, in_mask, member


def test_lira_gaussian_reference_models_reach_analytic_auc():
    rng = np.random.default_rng(0)
    target, ref, in_mask, member = gaussian_population(rng)
    analytic = norm.cdf(2.0 / (1.0 * math.sqrt(2)))  # AUC of the optimal per-example test, ≈ 0.921
    online = roc_auc(lira_online(target, ref, ref, in_mask), member)
    online_fixed = roc_auc(lira_online(target, ref, ref, in_mask, fixed_variance=True), member)
    offline = roc_auc(lira_offline(target, ref, ~in_mask), member)
    offline_fixed = roc_auc(lira_offline(target, ref, ~in_mask, fixed_variance=True), member)
    assert online > 0.9 and offline > 0.8
    for auc in (online, online_fixed, offline, offline_fixed):
        assert auc == pytest.approx(analytic, abs=0.03)
    # a global threshold on φ ignores per-example difficulty and is far weaker (analytic Φ(2/√(2·10)) ≈ 0.67)
    assert roc_auc(target, member) < 0.75


def test_lira_fixed_variance_hand_case():
    # example 0: IN {1, 3}, OUT {0, 4}; example 1: IN {10, 14}, OUT {8, 8}
    phis = np.array([[1.0, 10.0], [3.0, 14.0], [0.0, 8.0], [4.0, 8.0]])
    in_mask = np.array([[True, True], [True, True], [False, False], [False, False]])
    target = np.array([2.5, 9.0])
    # centred IN deviations -1, 1, -2, 2 -> σ_in² = 10/4; OUT deviations -2, 2, 0, 0 -> σ_out² = 8/4
    s_in, s_out = math.sqrt(2.5), math.sqrt(2.0)
    mu_in, mu_out = np.array([2.0, 12.0]), np.array([2.0, 8.0])
    expected = norm.logpdf(target, mu_in, s_in) - norm.logpdf(target, mu_out, s_out)
    np.testing.assert_allclose(lira_online(target, phis, phis, in_mask, fixed_variance=True), expected, rtol=1e-12)
    # per-example: σ_in = [1, 2], σ_out = [2, floor] -> example 1's OUT fit is a spike at 8
    per_example = lira_online(target, phis, phis, in_mask)
    assert per_example[0] == pytest.approx(norm.logpdf(2.5, 2, 1) - norm.logpdf(2.5, 2, 2), rel=1e-12)
    assert per_example[1] > 1e6  # φ = 9 is 1 away from a zero-width OUT spike: overwhelmingly IN, but finite
    assert np.isfinite(per_example).all()
    # offline with the same σ_out rules: log Φ((φ − μ_out)/σ_out)
    out_fixed = lira_offline(target, phis, ~in_mask, fixed_variance=True)
    np.testing.assert_allclose(out_fixed, norm.logcdf((target - mu_out) / s_out), rtol=1e-12)


def test_lira_online_handles_zero_and_one_in_models():
    rng = np.random.default_rng(3)
    target, ref, in_mask, _ = gaussian_population(rng, n=50, k=8)
    in_mask[:, 0] = False                          # example 0: no IN model
    in_mask[:, 1] = False
    in_mask[2, 1] = True                           # example 1: a single IN model
    in_mask[:, 2] = True                           # example 2: no OUT model
    scores = lira_online(target, ref, ref, in_mask)
    assert np.isfinite(scores).all()
    # no IN model: the offline score of that example (its OUT σ is per-example, so offline agrees exactly)
    assert scores[0] == pytest.approx(lira_offline(target[:1], ref[:, :1], ~in_mask[:, :1])[0], rel=1e-12)
    # one IN model: μ_in = that value, σ_in = the pooled centred σ over examples with >= 2 IN values
    several = in_mask.sum(0) >= 2
    dev = [ref[in_mask[:, i], i] - ref[in_mask[:, i], i].mean() for i in np.flatnonzero(several)]
    pooled_in = math.sqrt(sum((d ** 2).sum() for d in dev) / sum(len(d) for d in dev))
    out1 = ref[~in_mask[:, 1], 1]
    expected1 = norm.logpdf(target[1], ref[2, 1], pooled_in) - norm.logpdf(target[1], out1.mean(), out1.std())
    assert scores[1] == pytest.approx(expected1, rel=1e-10)
    # no OUT model: one-sided test against the IN fit
    in2 = ref[:, 2]
    assert scores[2] == pytest.approx(norm.logcdf((target[2] - in2.mean()) / in2.std()), rel=1e-10)


def test_lira_constant_reference_values_stay_finite():
    ref = np.ones((4, 3))
    in_mask = np.array([[1, 0, 1], [1, 0, 0], [0, 1, 0], [0, 1, 1]], bool)
    for fixed in (False, True):
        assert np.isfinite(lira_online(np.array([1.0, 1.5, 0.5]), ref, ref, in_mask, fixed)).all()
        assert np.isfinite(lira_offline(np.array([1.0, 1.5, 0.5]), ref, ~in_mask, fixed)).all()


def test_lira_separate_in_and_out_matrices_with_padding():
    rng = np.random.default_rng(4)
    target, ref, in_mask, _ = gaussian_population(rng, n=30, k=10)
    ins = np.where(in_mask, ref, np.nan)
    outs = np.where(in_mask, np.nan, ref)
    np.testing.assert_allclose(lira_online(target, ins, outs, in_mask), lira_online(target, ref, ref, in_mask))


def test_lira_rejects_bad_input():
    ref = np.zeros((4, 3))
    mask = np.zeros((4, 3), bool)
    with pytest.raises(UserError, match="at least one OUT"):
        lira_offline(np.zeros(3), ref, mask)
    with pytest.raises(UserError, match="one column per example"):
        lira_online(np.zeros(2), ref, ref, mask)
    with pytest.raises(UserError, match="in_mask must have shape"):
        lira_online(np.zeros(3), ref, ref, mask[:2])
    with pytest.raises(UserError, match="variance"):  # one IN and one OUT value per example: no spread anywhere
        lira_online(np.zeros(3), np.zeros((2, 3)), np.zeros((2, 3)), np.array([[1, 1, 1], [0, 0, 0]], bool))
    with pytest.raises(UserError, match="finite"):
        lira_offline(np.zeros(3), np.full((4, 3), np.nan), ~mask)


# --------------------------------------------------------------------------------------------------------------- RMIA

def rmia_brute_force(tx, rx, mx, tz, rz, mz, a, gamma, offline):
    def marginal(r, m):
        if offline:
            out_mean = np.array([r[~m[:, i], i].mean() for i in range(r.shape[1])])
            return (1 + a) / 2 * out_mean + (1 - a) / 2
        return r.mean(axis=0)
    ratio_x = tx / marginal(rx, mx)
    ratio_z = tz / marginal(rz, mz)
    return np.array([sum(ratio_x[i] / ratio_z[j] > gamma for j in range(len(tz))) / len(tz)
                     for i in range(len(tx))])


def test_rmia_hand_case():
    # offline, a = 0.5: Pr = 0.75 · mean_OUT + 0.25
    rx = np.array([[0.2, 0.6, 0.9],
                   [0.6, 0.2, 0.5]])
    mx = np.array([[False, False, True],
                   [False, True, False]])
    # mean_OUT(x) = [0.4, 0.6, 0.5] -> Pr(x) = [0.55, 0.70, 0.625]
    tx = np.array([0.44, 0.84, 0.125])                 # ratio(x) = [0.8, 1.2, 0.2]
    rz = np.array([[0.4, 0.2, 0.8, 0.6],
                   [0.4, 0.6, 0.4, 1.0]])
    # mean_OUT(z) = [0.4, 0.4, 0.6, 0.8] -> Pr(z) = [0.55, 0.55, 0.70, 0.85]
    tz = np.array([0.165, 0.55, 0.35, 0.85])           # ratio(z) = [0.3, 1.0, 0.5, 1.0]
    # γ = 1: x1 (0.8) dominates z with ratio 0.3, 0.5; x2 (1.2) all four; x3 (0.2) none
    scores = rmia_scores(tx, rx, mx, tz, rz, None, a=0.5, gamma=1.0, offline=True)
    np.testing.assert_array_equal(scores, [0.5, 1.0, 0.0])
    # γ = 2: count ratio(z) < ratio(x)/2 = [0.4, 0.6, 0.1] -> {0.3}, {0.3, 0.5}, {}
    scores = rmia_scores(tx, rx, mx, tz, rz, np.zeros((2, 4), bool), a=0.5, gamma=2.0, offline=True)
    np.testing.assert_array_equal(scores, [0.25, 0.5, 0.0])
    # online ignores the masks and a: Pr(x) = [0.4, 0.4, 0.7], ratio(x) = [1.1, 2.1, 0.179];
    # Pr(z) = [0.4, 0.4, 0.6, 0.8], ratio(z) = [0.4125, 1.375, 0.583, 1.0625]
    scores = rmia_scores(tx, rx, mx, tz, rz, None, a=0.5, gamma=1.0, offline=False)
    np.testing.assert_array_equal(scores, [0.75, 1.0, 0.0])


def test_rmia_sorted_count_equals_double_loop():
    rng = np.random.default_rng(5)
    k, n, m = 4, 60, 80
    rx, rz = rng.uniform(0.01, 1, (k, n)), rng.uniform(0.01, 1, (k, m))
    mx = rng.random((k, n)) < 0.5
    mx[0] = False                                      # every x keeps an OUT model
    mz = rng.random((k, m)) < 0.3
    mz[1] = False
    tx, tz = rng.uniform(0, 1, n), rng.uniform(0, 1, m)
    for a in (0.0, 0.3, 1.0):
        for gamma in (1.0, 2.0, 0.5):
            for offline in (True, False):
                fast = rmia_scores(tx, rx, mx, tz, rz, mz, a=a, gamma=gamma, offline=offline)
                slow = rmia_brute_force(tx, rx, mx, tz, rz, mz, a, gamma, offline)
                np.testing.assert_array_equal(fast, slow)


def rmia_population(rng, k, n, m):
    """Per-example difficulty: OUT probability q_i ~ U(0, 1), IN probability q_i + 0.3 (1 − q_i), noise 0.02."""
    def probs(q, inside):
        return np.clip(np.where(inside, q + 0.3 * (1 - q), q) + rng.normal(0, 0.02, inside.shape), 1e-4, 1)
    qx, qz = rng.uniform(0, 1, n), rng.uniform(0, 1, m)
    mx = rng.random((k, n)) < 0.5
    member = rng.random(n) < 0.5
    return probs(qx, member), probs(qx, mx), mx, probs(qz, np.zeros(m, bool)), probs(qz, np.zeros((k, m), bool)), member


def test_rmia_detects_members():
    rng = np.random.default_rng(6)
    tx, rx, mx, tz, rz, member = rmia_population(rng, k=4, n=600, m=400)
    mx[0] = False  # offline: every x has at least one OUT model
    offline = roc_auc(rmia_scores(tx, rx, mx, tz, rz, offline=True), member)
    online = roc_auc(rmia_scores(tx, rx, mx, tz, rz, offline=False), member)
    raw = roc_auc(tx, member)  # raw confidence, without per-example calibration
    assert online > 0.95 and offline > 0.75 and raw < 0.7
    # tuning a on the reference models themselves improves the offline attack on the real target
    best_a, _ = tune_rmia_a(rx, mx, rz, pseudo_targets=[1, 2, 3])  # model 0 holds no IN candidate
    tuned = roc_auc(rmia_scores(tx, rx, mx, tz, rz, a=best_a, offline=True), member)
    assert best_a > 0.0 and tuned > roc_auc(rmia_scores(tx, rx, mx, tz, rz, a=0.0, offline=True), member) + 0.05


def test_tune_rmia_a_picks_the_grid_maximum_of_pseudo_target_auc():
    rng = np.random.default_rng(7)
    _, rx, mx, _, rz, _ = rmia_population(rng, k=4, n=300, m=200)
    best_a, aucs = tune_rmia_a(rx, mx, rz, None, pseudo_targets=[1])
    assert aucs.shape == (len(RMIA_A_GRID),)
    assert best_a == RMIA_A_GRID[int(np.argmax(aucs))]
    # each entry is the AUC of offline RMIA against model 1 with models 0, 2, 3 as references
    others = [0, 2, 3]
    scorable = (~mx[others]).any(axis=0)
    for a, auc in zip(RMIA_A_GRID, aucs):
        scores = rmia_scores(rx[1, scorable], rx[others][:, scorable], mx[others][:, scorable], rz[1], rz[others],
                             None, a=a)
        assert auc == pytest.approx(roc_auc(scores, mx[1, scorable]), abs=1e-12)
    assert aucs.max() > 0.75
    # averaging over all pseudo-targets
    best_all, aucs_all = tune_rmia_a(rx, mx, rz)
    assert best_all in RMIA_A_GRID and aucs_all.shape == aucs.shape


def test_rmia_rejects_bad_input():
    rx, mx, tz, rz = np.full((2, 3), 0.5), np.ones((2, 3), bool), np.full(4, 0.5), np.full((2, 4), 0.5)
    with pytest.raises(UserError, match="OUT reference model"):
        rmia_scores(np.full(3, 0.5), rx, mx, tz, rz, offline=True)
    assert rmia_scores(np.full(3, 0.5), rx, mx, tz, rz, offline=False).shape == (3,)
    with pytest.raises(UserError, match="probabilities"):
        rmia_scores(np.full(3, 1.5), rx, mx, tz, rz, offline=False)
    with pytest.raises(UserError, match="a must lie"):
        rmia_scores(np.full(3, 0.5), rx, None, tz, rz, a=2.0)
    with pytest.raises(UserError, match="gamma"):
        rmia_scores(np.full(3, 0.5), rx, None, tz, rz, gamma=0.0)
    with pytest.raises(UserError, match="same K"):
        rmia_scores(np.full(3, 0.5), rx, None, tz, rz[:1])
    with pytest.raises(UserError, match="K >= 2"):
        tune_rmia_a(rx[:1], mx[:1], rz[:1])


# ------------------------------------------------------------------------------------------------------------- U-LiRA

def ulira_population(rng, n, k, shift):
    """φ under unlearned models ~ N(d_i + shift, 1), under retrained models ~ N(d_i, 1)."""
    d = rng.normal(0, 3, n)
    unlearned = d + shift + rng.normal(0, 1, (k, n))
    retrained = d + rng.normal(0, 1, (k, n))
    target_unlearned = d + shift + rng.normal(0, 1, n)
    target_retrained = d + rng.normal(0, 1, n)
    return unlearned, retrained, target_unlearned, target_retrained


@pytest.mark.parametrize("fixed", [False, True])
def test_ulira_identical_distributions_give_chance(fixed):
    rng = np.random.default_rng(8)
    unl, ret, t_unl, t_ret = ulira_population(rng, n=3000, k=16, shift=0.0)
    result = ulira_accuracy(ulira_scores(t_unl, unl, ret, fixed), ulira_scores(t_ret, unl, ret, fixed))
    assert set(result) == {"auc", "tpr@1%fpr", "tpr@0.1%fpr", "balanced_accuracy"}
    assert result["auc"] == pytest.approx(0.5, abs=0.03)
    assert 0.5 <= result["balanced_accuracy"] < 0.54


def test_ulira_detects_a_trace_and_matches_hand_formula():
    rng = np.random.default_rng(9)
    unl, ret, t_unl, t_ret = ulira_population(rng, n=2000, k=16, shift=2.0)
    result = ulira_accuracy(ulira_scores(t_unl, unl, ret, True), ulira_scores(t_ret, unl, ret, True))
    assert result["auc"] == pytest.approx(norm.cdf(2 / math.sqrt(2)), abs=0.03)
    assert result["balanced_accuracy"] > 0.8
    # per-example formula on one column
    scores = ulira_scores(t_unl, unl, ret)
    expected = norm.logpdf(t_unl[5], unl[:, 5].mean(), unl[:, 5].std()) - \
        norm.logpdf(t_unl[5], ret[:, 5].mean(), ret[:, 5].std())
    assert scores[5] == pytest.approx(expected, rel=1e-10)


def test_ulira_masks_and_errors():
    rng = np.random.default_rng(10)
    unl, ret, t_unl, _ = ulira_population(rng, n=20, k=6, shift=1.0)
    mask = np.ones(unl.shape, bool)
    mask[3:, 0] = False  # example 0 uses only the first three unlearned shadows
    scores = ulira_scores(t_unl, unl, ret, unlearned_mask=mask)
    expected0 = norm.logpdf(t_unl[0], unl[:3, 0].mean(), unl[:3, 0].std()) - \
        norm.logpdf(t_unl[0], ret[:, 0].mean(), ret[:, 0].std())
    assert scores[0] == pytest.approx(expected0, rel=1e-10)
    np.testing.assert_allclose(scores[1:], ulira_scores(t_unl, unl, ret)[1:])
    mask[:, 1] = False
    with pytest.raises(UserError, match="at least one unlearned"):
        ulira_scores(t_unl, unl, ret, unlearned_mask=mask)
