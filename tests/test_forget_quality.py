"""Forgetting quality of the NeurIPS 2023 unlearning competition (evaluation/forget_quality.py), checked by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import evaluation.forget_quality as fq
from evaluation.forget_quality import (
    DELTA,
    EPSILON_CAP,
    bucket_scores,
    example_epsilons,
    final_score,
    forget_score,
    forget_score_from_epsilons,
    logit_scaled_confidence,
    num_buckets,
)
from utils import UserError


def columns(*samples) -> np.ndarray:
    """One forget example per sample: [N models, n examples]."""
    return np.array(samples, dtype=np.float64).T


# ------------------------------------------------------------------------------------------------ logit confidence

def test_logit_scaled_confidence_matches_direct_float64_softmax():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, size=(50, 7))
    targets = rng.integers(0, 7, size=50)
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    p_true = probs[np.arange(50), targets]
    direct = np.log(p_true) - np.log(probs.sum(axis=1) - p_true)
    got = logit_scaled_confidence(logits, targets)
    assert got.dtype == np.float64 and got.shape == (50,)
    np.testing.assert_allclose(got, direct, rtol=0, atol=1e-12)
    # float32 tensors are computed in float64 too
    from_torch = logit_scaled_confidence(torch.tensor(logits, dtype=torch.float32), torch.tensor(targets))
    np.testing.assert_allclose(from_torch, logit_scaled_confidence(logits.astype(np.float32), targets), atol=0)


def test_logit_scaled_confidence_extreme_logits_stay_exact_and_finite():
    logits = np.array([[1e4, 0.0, 0.0],
                       [1e4, 0.0, 0.0],
                       [-1e4, 1e4, 0.0],
                       [5e3, 5e3 + 1e4, -1e4]])
    targets = np.array([0, 1, 0, 0])
    got = logit_scaled_confidence(logits, targets)
    assert np.isfinite(got).all()
    # row 0: 1e4 − log(e^0 + e^0); row 1: 0 − log(e^1e4 + e^0) = −1e4 − log(1 + e^−1e4) = −1e4 in float64;
    # row 2: −1e4 − log(e^1e4 + 1) = −2e4; row 3: 5e3 − (1.5e4 + log(1 + e^−2.5e4)) = −1e4.
    expected = np.array([1e4 - math.log(2.0), -1e4, -2e4, -1e4])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9)


def test_logit_scaled_confidence_rejects_bad_input():
    with pytest.raises(UserError, match="finite"):
        logit_scaled_confidence(np.array([[np.nan, 0.0]]), np.array([0]))
    with pytest.raises(UserError, match=r"\[0, 2\)"):
        logit_scaled_confidence(np.zeros((1, 2)), np.array([2]))
    with pytest.raises(UserError, match="C >= 2"):
        logit_scaled_confidence(np.zeros((3, 1)), np.zeros(3, dtype=int))


# ---------------------------------------------------------------------------------------------------- per-example ε

def test_perfect_separation_is_infinite_and_capped_at_50():
    # Every unlearned confidence above every retrained one: the threshold at the top of the pooled range has
    # FPR = FNR = 0, i.e. ε = ∞, capped at 50.
    assert example_epsilons(columns([10.0, 11.0, 12.0]), columns([0.0, 1.0, 2.0])).tolist() == [EPSILON_CAP]
    rng = np.random.default_rng(1)
    far = example_epsilons(rng.normal(100, 1, (32, 20)), rng.normal(0, 1, (32, 20)))
    assert far.tolist() == [EPSILON_CAP] * 20


def test_identical_distributions_give_zero():
    # Every rule calls the same fraction of each sample positive (FPR = TPR = 1 − FNR), so
    # log(1 − δ − FPR) − log FNR = log(1 − δ − FPR) − log(1 − FPR) < 0 and the other term likewise: clipped to 0.
    samples = np.random.default_rng(2).normal(0, 2, (32, 10))
    assert example_epsilons(samples, samples.copy()).tolist() == [0.0] * 10


def test_hand_cases_with_known_rates_at_the_best_rule():
    # N = 4. Example 0: unlearned P = {3, 4, 6, 7} (median 5, positive), retrained Q = {0, 1, 2, 5} (median 1.5).
    #   Single threshold t in (3, 4]: P below t = {3} -> FNR = 1/4; Q at or above t = {5} -> FPR = 1/4;
    #   ε = max(log(1 − δ − 1/4) − log(1/4), same) = log(3 − 4δ) = ln(N − 1) up to δ, the most a finite rule can
    #   certify with 4 models. No rule separates perfectly: every threshold below 3 or interval holding all of P also
    #   holds 5, and an interval around P (P is peakier: spread 4 < 5) that drops 5 keeps at most {3, 4} or {6, 7}
    #   (FPR = 0, FNR = 1/2: discarded, exactly one rate is 0).
    # Example 1: P = {3, 4, 6, 7}, Q = {0, 1, 4.5, 5}.
    #   t in (3, 4]: FNR = 1/4 ({3}), FPR = 2/4 ({4.5, 5}): ε = max(log(1/2 − δ) − log(1/4), log(3/4 − δ) − log(2/4))
    #   = log(2 − 4δ). Three of P with one of Q would need an interval around {3, 4} plus 6 or 7, which holds both
    #   4.5 and 5; two of P with no Q gives FPR = 0 (discarded). So FPR = 1/2, FNR = 1/4 is the best rule.
    unlearned = columns([3.0, 4.0, 6.0, 7.0], [3.0, 4.0, 6.0, 7.0])
    retrained = columns([0.0, 1.0, 2.0, 5.0], [0.0, 1.0, 4.5, 5.0])
    expected = [math.log(0.75 - DELTA) - math.log(0.25), math.log(0.5 - DELTA) - math.log(0.25)]
    np.testing.assert_allclose(example_epsilons(unlearned, retrained), expected, rtol=1e-13)
    # Which side is "positive" follows the medians, not the argument order.
    np.testing.assert_allclose(example_epsilons(retrained, unlearned), expected, rtol=1e-13)
    # δ enters as stated: with δ = 0 the values are exactly ln 3 and ln 2.
    np.testing.assert_allclose(example_epsilons(unlearned, retrained, delta=0.0), [math.log(3), math.log(2)],
                               rtol=1e-13)


def test_double_threshold_catches_a_sample_sandwiched_inside_the_other():
    # Q = {4.9, 5.0, 5.1, 5.2} (spread 0.3, 3 % of P's) sits between P's {0, 1} and {9, 10}. A single threshold
    # at best has FNR = 1/4, FPR = 2/4 (ln 2), but the interval [4.9, 5.2] around the peakier Q holds all of Q and
    # none of P: FPR = FNR = 0, ε = ∞ -> 50.
    got = example_epsilons(columns([0.0, 1.0, 9.0, 10.0]), columns([4.9, 5.0, 5.1, 5.2]))
    assert got.tolist() == [EPSILON_CAP]


def test_spread_rule_spike_under_one_percent_is_fifty():
    # P = {0.5, 0.5, 0.5, 1.0} has spread 0.5. Q = {0.5, 0.5, 0.5, 0.504}: spread 0.004 < 1 % of 0.5 -> ε = 50
    # without searching. Q' = {0.5, 0.5, 0.5, 0.506} (0.006 >= 0.005) is searched instead, and no rule sees a
    # difference: {0.5} alone has FPR = FNR... = 3/4 inside each (ε < 0), {0.506, 1} one of each (ε ≈ 0), and the
    # rules that keep all of one sample drop none of the other or none of the first (a single zero rate: discarded).
    p = [0.5, 0.5, 0.5, 1.0]
    assert example_epsilons(columns(p), columns([0.5, 0.5, 0.5, 0.504])).tolist() == [EPSILON_CAP]
    assert example_epsilons(columns(p), columns([0.5, 0.5, 0.5, 0.506])).tolist() == [0.0]


def test_two_constant_samples():
    # Both spreads 0: equal constants cannot be told apart (0); different ones are separated by a threshold (50).
    twos = np.full((5, 1), 2.0)
    assert example_epsilons(twos, twos.copy()).tolist() == [0.0]
    assert example_epsilons(twos, np.full((5, 1), 2.001)).tolist() == [EPSILON_CAP]
    # One constant against a spread sample is a spike: 50.
    assert example_epsilons(twos, columns([1.0, 2.0, 3.0, 4.0, 5.0])).tolist() == [EPSILON_CAP]


def literal_epsilon(pos: np.ndarray, neg: np.ndarray, delta: float = DELTA) -> float:
    """One example, every rule built and compared one at a time (the reading of the module docstring, written
    without sorting, counting tricks or tables)."""
    spreads = (pos.max() - pos.min(), neg.max() - neg.min())
    if min(spreads) < 0.01 * max(spreads):
        return EPSILON_CAP
    rules = []  # (fpr, fnr)
    low, high = min(pos.min(), neg.min()), max(pos.max(), neg.max())
    for t in np.linspace(low, high, int(np.ceil((high - low) * 100))):
        rules.append((np.mean(neg >= t), np.mean(pos < t)))
    peaky, other = (neg, pos) if spreads[0] >= spreads[1] else (pos, neg)
    width = min(spreads)
    start, stop = peaky.min() + width - 2.0, peaky.max() + 2.0
    for right in np.linspace(start, stop, int(np.ceil((stop - start) * 100))):
        lefts = np.linspace(right - width - 2.0, right - width + 2.0, 400)
        inside_peaky = (lefts[:, None] <= peaky) & (peaky <= right)
        inside_other = (lefts[:, None] <= other) & (other <= right)
        rules.extend(zip(inside_other.mean(axis=1), 1.0 - inside_peaky.mean(axis=1)))
    best = 0.0
    for fpr, fnr in rules:
        if fpr == 0 and fnr == 0:
            return EPSILON_CAP
        if fpr == 0 or fnr == 0:
            continue
        terms = [math.log(1 - delta - a) - math.log(b) for a, b in ((fpr, fnr), (fnr, fpr)) if 1 - delta - a > 0]
        best = max([best, *terms])
    return min(best, EPSILON_CAP)


def test_vectorised_search_equals_the_literal_rule_by_rule_search():
    rng = np.random.default_rng(3)
    n = 6
    unlearned = rng.normal(0.4, 1.0, (5, n)) * rng.choice([0.2, 1.0, 3.0], size=n)
    retrained = rng.normal(0.0, 1.0, (5, n))
    unlearned[:, 0] = np.round(unlearned[:, 0], 1)  # ties between the samples
    retrained[:, 0] = np.round(retrained[:, 0], 1)
    retrained[:, 1] = unlearned[:, 1]  # indistinguishable: 0
    retrained[:, 2] = unlearned[:, 2] - 30.0  # separated: 50
    got = example_epsilons(unlearned, retrained)
    expected = []
    for i in range(n):
        u, r = unlearned[:, i], retrained[:, i]
        pos, neg = (r, u) if np.median(r) > np.median(u) else (u, r)
        expected.append(literal_epsilon(pos, neg))
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
    assert {0.0, EPSILON_CAP} < set(np.round(expected, 6))  # 0, 50 and values in between


def test_chunking_and_inputs_do_not_change_the_numbers(monkeypatch):
    rng = np.random.default_rng(4)
    # Different ranges per example, so the padded grids of a chunk differ from each example's own.
    unlearned = rng.normal(0, 1, (8, 9)) * np.linspace(0.3, 8, 9)
    retrained = rng.normal(0.5, 1, (8, 9)) * np.linspace(0.3, 8, 9)[::-1]
    together = example_epsilons(unlearned, retrained)
    monkeypatch.setattr(fq, "_CHUNK_ELEMENTS", 1)  # one example per chunk
    alone = example_epsilons(unlearned, retrained)
    np.testing.assert_array_equal(together, alone)
    as_tensors = example_epsilons(torch.from_numpy(unlearned), torch.from_numpy(retrained), device="cpu")
    np.testing.assert_array_equal(together, as_tensors)
    assert together.dtype == np.float64 and ((together >= 0) & (together <= EPSILON_CAP)).all()


def test_example_epsilons_rejects_bad_input():
    ok = np.zeros((4, 3)) + np.arange(4)[:, None]
    with pytest.raises(UserError, match="same shape"):
        example_epsilons(ok, ok[:, :2])
    with pytest.raises(UserError, match="finite"):
        example_epsilons(ok, np.where(ok == 0, np.nan, ok))
    with pytest.raises(UserError, match="matrix"):
        example_epsilons(ok[0], ok[0])
    with pytest.raises(UserError, match="at least 2 models"):
        example_epsilons(ok[:1], ok[:1])
    with pytest.raises(UserError, match="delta"):
        example_epsilons(ok, ok, delta=1.0)
    with pytest.raises(UserError, match="empty"):
        example_epsilons(ok[:, :0], ok[:, :0])


# ------------------------------------------------------------------------------------------------------- scoring

def test_bucket_count_for_32_and_512_models():
    # ceil(ln 31) = ceil(3.434) = 4 -> buckets [0, 0.5), ..., [3.5, 4): k = 0..7.
    # ceil(ln 511) = ceil(6.236) = 7 -> buckets up to [6.5, 7): k = 0..13. ceil(ln 2) = 1 -> k = 0, 1.
    assert math.ceil(math.log(31)) == 4 and math.ceil(math.log(511)) == 7
    assert num_buckets(32) == 8
    assert num_buckets(512) == 14
    assert num_buckets(3) == 2


def test_bucket_scores_n32():
    eps = [0.0, 0.49, 0.5, 0.99, 1.0, 3.49, 3.5, 3.99, 4.0, 50.0, math.inf]
    expected = [1, 1, 0.5, 0.5, 0.25, 2 ** -6, 2 ** -7, 2 ** -7, 0, 0, 0]
    np.testing.assert_array_equal(bucket_scores(eps, 32), expected)
    assert forget_score_from_epsilons(eps, 32) == pytest.approx(sum(expected) / len(expected), abs=1e-15)


def test_bucket_scores_n512():
    eps = [3.99, 4.0, 6.49, 6.5, 6.99, 7.0, 50.0]
    expected = [2 ** -7, 2 ** -8, 2 ** -12, 2 ** -13, 2 ** -13, 0, 0]
    np.testing.assert_array_equal(bucket_scores(eps, 512), expected)


def test_fewer_than_three_models_is_refused():
    message = r"needs N >= 3: below that ceil\(ln\(N - 1\)\) leaves no bucket"
    with pytest.raises(UserError, match=message):
        bucket_scores([0.0], 2)
    with pytest.raises(UserError, match=message):
        num_buckets(1)
    with pytest.raises(UserError, match=message):
        forget_score(np.zeros((2, 3)), np.ones((2, 3)))
    with pytest.raises(UserError, match="integer"):
        num_buckets(3.0)
    with pytest.raises(UserError, match=">= 0"):
        bucket_scores([-0.1], 32)


def test_forget_score_of_the_hand_cases():
    # N = 4: ceil(ln 3) = 2 -> 4 buckets. ε = ln(3 − 4δ) ≈ 1.0986 falls in [1, 1.5) (k = 2: 1/4 point) and
    # ε = ln(2 − 4δ) ≈ 0.6931 in [0.5, 1) (k = 1: 1/2 point); F = (1/4 + 1/2) / 2 = 0.375.
    unlearned = columns([3.0, 4.0, 6.0, 7.0], [3.0, 4.0, 6.0, 7.0])
    retrained = columns([0.0, 1.0, 2.0, 5.0], [0.0, 1.0, 4.5, 5.0])
    assert forget_score(unlearned, retrained) == 0.375
    # Perfect forgetting (identical samples) scores 1, perfect separation 0.
    same = np.random.default_rng(5).normal(size=(8, 4))
    assert forget_score(same, same.copy()) == 1.0
    assert forget_score(same + 100, same) == 0.0


def test_final_score_by_hand():
    # F = 0.5; retain: (0.9 + 0.8)/2 = 0.85 over (1.0 + 0.7)/2 = 0.85 -> 1; test: 0.6 / 0.8 = 0.75 -> 0.375.
    assert final_score(0.5, [0.9, 0.8], [0.6], [1.0, 0.7], [0.8]) == pytest.approx(0.375, abs=1e-15)
    # F = 1; retain 0.5 / 1.0; test (0.4 + 0.6)/2 = 0.5 over 0.25 -> 1 · 0.5 · 2 = 1.
    assert final_score(1.0, [0.5], [0.4, 0.6], [1.0], [0.25]) == pytest.approx(1.0, abs=1e-15)
    with pytest.raises(UserError, match="> 0"):
        final_score(0.5, [0.9], [0.6], [0.0], [0.8])
    with pytest.raises(UserError, match=r"in \[0, 1\]"):
        final_score(0.5, [], [0.6], [0.9], [0.8])
    with pytest.raises(UserError, match="forget_score"):
        final_score(1.5, [0.9], [0.6], [0.9], [0.8])
