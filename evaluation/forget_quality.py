"""Forgetting quality as the NeurIPS 2023 Machine Unlearning competition scores it.

Reference: E. Triantafillou, P. Kairouz, F. Pedregosa, J. Hayes, M. Kurmanji, K. Zhao, V. Dumoulin, J. Jacques Junior,
I. Mitliagkas, J. Wan, L. Sun Hosoya, S. Escalera, G. K. Dziugaite, P. Triantafillou, I. Guyon. "Are we making progress
in unlearning? Findings from the first NeurIPS unlearning competition." arXiv:2406.09073, 2024. Where the paper's prose
leaves a detail open, the reading of the competition's published evaluation code (google-deepmind/unlearning_evaluation,
``metric.py``) is used, and every such choice is stated below.

**The question.** N models unlearned by the method under test and N models retrained without the forget set give, for
each forget example, two samples of N logit-scaled confidences. If unlearning worked, the two samples come from the same
distribution. Each example gets the privacy ε that the best of a family of simple decision rules ("which of the two
produced this confidence?") certifies; ε is turned into points by buckets, and the mean over the forget set is the
forgetting quality F in [0, 1] (1 is best). The competition's final score multiplies F by the utility ratios of retain
and test accuracy.

**Per-example ε** (`example_epsilons`). Per example, the *positive* sample is the one with the larger median
(the retrained sample only when its median is strictly larger; on a tie the unlearned sample is positive). For a rule,
FPR is the fraction of the negative sample it calls positive and FNR the fraction of the positive sample it calls
negative, with δ = 1e-5:

    ε(rule) = max(log(1 − δ − FPR) − log FNR,  log(1 − δ − FNR) − log FPR),  clipped at 0.

A term whose logarithm has no real value (a rate of 1) is ignored, and a rule where both are is discarded. A rule with
exactly one of FPR, FNR equal to 0 is discarded too: with N models a zero rate is more likely a sampling accident than
proof. A rule with FPR = FNR = 0 separates the samples perfectly and gives ε = ∞. The example's ε is the largest over
the rules kept, capped at 50 (0 when no rule is kept). Two rule families are searched:

* *Single threshold*: call a confidence positive when it is >= t. With lo, hi the smallest and largest of the 2N pooled
  confidences, the thresholds are ceil(100·(hi − lo)) evenly spaced points from lo to hi, both ends included (so the
  spacing is (hi − lo)/(ceil(100·(hi − lo)) − 1), just over 1/100; one point, lo itself, when hi − lo <= 0.01).
* *Double threshold* (catches a sample that sits inside the other one): the *peakier* sample is the one with the
  smaller spread (max − min); on equal spreads the negative one is taken. Let P be the peakier sample, w its spread
  and s = 2 the shift window. A rule calls a confidence c "from P" when left <= c <= right. The right edges are
  ceil(100·((P_max + s) − (P_min + w − s))) evenly spaced points from P_min + w − s to P_max + s (about 400: the
  interval's right end slides from s below to s above P's top). For each right edge r, the left edges are 400
  (= 2·s·100) evenly spaced points from r − w − s to r − w + s, so the interval's length runs from w − s to w + s
  around P's own width. For these rules FNR is the fraction of P outside the interval, FPR the fraction of the other
  sample inside it.

Before searching, if the smaller spread is under 1 % of the larger one, ε = 50 straight away: one sample is a spike
that the grids (resolution 1/100) might not resolve, and a spike that the other sample lacks is easy to tell apart.
When both spreads are 0 (two constants), ε = 0 for equal constants (no rule can tell them apart) and 50 for different
ones (a threshold between them separates them perfectly); the competition's code has no rule for this case.

**Points** (`bucket_scores`). With N models the smallest non-zero rate is 1/N, so the largest finite ε any rule can
certify is log((N − 1)/N) − log(1/N) = ln(N − 1). Buckets of width 0.5 are laid up to E = ceil(ln(N − 1)): bucket
k = 0, 1, ..., 2E − 1 covers [0.5·k, 0.5·(k + 1)) and is worth 2^-k points; an ε at or beyond E (including the cap
50) earns 0. N = 32: E = ceil(ln 31) = 4, buckets k = 0..7; N = 512: E = ceil(ln 511) = 7, buckets k = 0..13. N < 3
leaves no bucket (ln(1) = 0) and is refused.

**Numerics.** Confidences are float64. Rates come from integer counts, so FPR = FNR = 0 is detected exactly. The
grids are built for a chunk of examples at once and every rule is counted without a loop over thresholds: sorted
samples and `torch.searchsorted` give the single-threshold counts, and for the double threshold each confidence's
number of left edges at or below it, histogrammed per right edge and summed cumulatively, gives the count outside
every interval. A rule's ε depends only on its two error counts, so it is looked up in an (N + 1)² table. Works on
any device (the inputs' device, or ``device=``); results are float64 numpy arrays or floats.

Deliberate differences from the competition's code, none of which moves a well-posed result beyond rounding:
the confidence is computed exactly (that code adds 1e-45 to the probabilities, which saturates confidences near
±103.6); two constant samples and the no-rule-kept case get the values stated above (that code fails an assertion);
rates are exact float64 fractions (that code averages in float32).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from evaluation.attacks import logit_confidence
from utils import UserError

DELTA = 1e-5
EPSILON_CAP = 50.0
THRESHOLDS_PER_UNIT = 100
SHIFT_WINDOW = 2.0
BUCKET_WIDTH = 0.5
SPIKE_SPREAD_RATIO = 0.01
LEFT_EDGES = math.ceil(2 * SHIFT_WINDOW * THRESHOLDS_PER_UNIT)  # 400 left edges per right edge

# Elements of the largest intermediate tensor of one chunk of examples (int64/float64: 8 bytes each). About 128 MiB.
_CHUNK_ELEMENTS = 1 << 24


# --------------------------------------------------------------------------------------------------------------------
# Signal
# --------------------------------------------------------------------------------------------------------------------

def logit_scaled_confidence(logits, targets) -> np.ndarray:
    """log p_y − log Σ_{j≠y} p_j of the target class y, computed in float64 as z_y − logsumexp_{j≠y} z_j.

    The softmax normaliser cancels, and the log-sum-exp subtracts the largest non-target logit before exponentiating,
    so the result is exact and finite for any finite logits (a 1e4 gap gives ±1e4, not a saturated probability).

    Args: logits (n, C) with C >= 2, finite; targets (n,) integer classes in [0, C). Tensors (any device) or arrays.
    Returns: float64 numpy array (n,).
    """
    logits = torch.as_tensor(logits)
    if logits.dtype.is_complex:
        raise UserError(f"logits must be real numbers; got dtype {logits.dtype}")
    return logit_confidence(logits.to(torch.float64), targets).cpu().numpy()


# --------------------------------------------------------------------------------------------------------------------
# Per-example epsilon
# --------------------------------------------------------------------------------------------------------------------

def _confidence_matrix(values, name: str, device: torch.device | None) -> torch.Tensor:
    tensor = torch.as_tensor(values)
    if tensor.dtype.is_complex or tensor.dtype == torch.bool:
        raise UserError(f"{name} must hold real confidences; got dtype {tensor.dtype}")
    tensor = tensor.to(device=device if device is not None else tensor.device, dtype=torch.float64)
    if tensor.ndim != 2:
        raise UserError(f"{name} must be a matrix [models, examples]; got shape {tuple(tensor.shape)}")
    if not bool(torch.isfinite(tensor).all()):
        raise UserError(f"{name} must be finite; found NaN or inf")
    return tensor


def _even_grid(start: torch.Tensor, stop: torch.Tensor, count: torch.Tensor, width: int) -> torch.Tensor:
    """Row i: count[i] evenly spaced points from start[i] to stop[i] (numpy's linspace arithmetic), padded to `width`
    columns by repeating the last point, which adds no new rule and so leaves every maximum unchanged."""
    position = torch.arange(width, device=start.device, dtype=torch.float64).expand(start.shape[0], width)
    last = (count - 1).unsqueeze(1)
    position = torch.minimum(position, last.to(torch.float64))
    step = (stop - start) / (count - 1).clamp_min(1).to(torch.float64)
    grid = start.unsqueeze(1) + position * step.unsqueeze(1)
    pin_stop = (position == last) & (last > 0)  # the last point is `stop` itself, not start + (count − 1)·step
    return torch.where(pin_stop, stop.unsqueeze(1).expand_as(grid), grid)


def _rule_epsilons(false_pos: torch.Tensor, false_neg: torch.Tensor, num_models: int, delta: float) -> torch.Tensor:
    """ε of each rule from its error counts; −inf marks a discarded rule, +inf a perfect one. Not yet clipped at 0:
    clipping the example's maximum instead gives the same result."""
    fpr = false_pos.to(torch.float64) / num_models
    fnr = false_neg.to(torch.float64) / num_models
    keep_fp = 1.0 - delta - fpr
    keep_fn = 1.0 - delta - fnr
    minus_inf = torch.tensor(-math.inf, dtype=torch.float64, device=fpr.device)
    # A rate of 0 here belongs to a rule overwritten below, so its infinite log never survives.
    by_fnr = torch.where(keep_fp > 0, torch.log(keep_fp.clamp_min(1e-300)) - torch.log(fnr), minus_inf)
    by_fpr = torch.where(keep_fn > 0, torch.log(keep_fn.clamp_min(1e-300)) - torch.log(fpr), minus_inf)
    epsilon = torch.maximum(by_fnr, by_fpr)
    fp_zero, fn_zero = false_pos == 0, false_neg == 0
    epsilon = torch.where(fp_zero ^ fn_zero, minus_inf, epsilon)
    return torch.where(fp_zero & fn_zero, torch.tensor(math.inf, dtype=torch.float64, device=fpr.device), epsilon)


def _epsilon_table(num_models: int, delta: float, device: torch.device) -> torch.Tensor:
    """ε of a rule with a false positives and b false negatives at [a·(N + 1) + b]: rules only ever differ by these
    two counts, so one (N + 1)² table replaces the logarithms of millions of rules."""
    counts = torch.arange(num_models + 1, device=device)
    return _rule_epsilons(counts.repeat_interleave(num_models + 1), counts.repeat(num_models + 1), num_models, delta)


def _best_rule(table: torch.Tensor, false_pos: torch.Tensor, false_neg: torch.Tensor, num_models: int,
               dims: int | tuple[int, ...]) -> torch.Tensor:
    """Largest ε over the rules along `dims`, looked up in `_epsilon_table`."""
    return table[false_pos * (num_models + 1) + false_neg].amax(dim=dims)


def _counts_below_interval(values: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """[E, R, L] number of values (per example, [E, N]) NOT in [left[e, r, l], right[e, r]]; left ascending in l."""
    examples, rights, lefts = left.shape
    spread_out = values.unsqueeze(1).expand(examples, rights, values.shape[1]).contiguous()
    # A value lies in interval l iff it is <= right and more than l left edges are at or below it; values above right
    # get 0 edges, so they fall in no interval.
    lefts_below = torch.searchsorted(left, spread_out, right=True)
    lefts_below.masked_fill_(spread_out > right.unsqueeze(2), 0)
    histogram = torch.zeros(examples, rights, lefts + 1, dtype=torch.int64, device=values.device)
    one = torch.ones((), dtype=torch.int64, device=values.device)
    histogram.scatter_add_(2, lefts_below, one.expand_as(lefts_below))
    # Values outside interval l: those with at most l left edges below them.
    return histogram.cumsum_(2)[:, :, :lefts]


def _single_threshold_best(positive: torch.Tensor, negative: torch.Tensor, count: torch.Tensor,
                           table: torch.Tensor) -> torch.Tensor:
    """Best rule "positive iff confidence >= t" per example; positive/negative are [E, N], sorted along dim 1."""
    num_models = positive.shape[1]
    low = torch.minimum(positive[:, 0], negative[:, 0])
    high = torch.maximum(positive[:, -1], negative[:, -1])
    thresholds = _even_grid(low, high, count, int(count.max()))
    false_neg = torch.searchsorted(positive, thresholds, right=False)  # positives below t
    false_pos = num_models - torch.searchsorted(negative, thresholds, right=False)  # negatives at or above t
    return _best_rule(table, false_pos, false_neg, num_models, 1)


def _double_threshold_best(peaky: torch.Tensor, other: torch.Tensor, right_count: torch.Tensor,
                           table: torch.Tensor) -> torch.Tensor:
    """Best rule "from the peakier sample iff left <= confidence <= right" per example; inputs [E, N], sorted."""
    num_models = peaky.shape[1]
    width = peaky[:, -1] - peaky[:, 0]
    right_start = (peaky[:, 0] + width) - SHIFT_WINDOW
    right_stop = peaky[:, -1] + SHIFT_WINDOW
    right = _even_grid(right_start, right_stop, right_count, int(right_count.max()))
    # Left edges: LEFT_EDGES points from r − w − s to r − w + s, with numpy's linspace arithmetic as in _even_grid.
    centre = (right - width.unsqueeze(1)).unsqueeze(2)
    left_start, left_stop = centre - SHIFT_WINDOW, centre + SHIFT_WINDOW
    position = torch.arange(LEFT_EDGES, device=right.device, dtype=torch.float64)
    left = left_start + position * ((left_stop - left_start) / (LEFT_EDGES - 1))
    left[:, :, -1:] = left_stop
    false_neg = _counts_below_interval(peaky, left, right)
    false_pos = num_models - _counts_below_interval(other, left, right)
    return _best_rule(table, false_pos, false_neg, num_models, (1, 2))


def _grid_sizes(positive: torch.Tensor, negative: torch.Tensor, peaky: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Number of single thresholds and of right edges per example (inputs sorted along dim 1)."""
    low = torch.minimum(positive[:, 0], negative[:, 0])
    high = torch.maximum(positive[:, -1], negative[:, -1])
    single = torch.ceil((high - low) * THRESHOLDS_PER_UNIT).to(torch.int64).clamp_min(1)
    width = peaky[:, -1] - peaky[:, 0]
    right_span = (peaky[:, -1] + SHIFT_WINDOW) - ((peaky[:, 0] + width) - SHIFT_WINDOW)
    rights = torch.ceil(right_span * THRESHOLDS_PER_UNIT).to(torch.int64).clamp_min(1)
    return single, rights


def _chunks(single: list[int], rights: list[int], num_models: int) -> list[slice]:
    """Consecutive example ranges whose padded intermediate tensors stay under _CHUNK_ELEMENTS."""
    chunks, start, widest_single, widest_rights = [], 0, 0, 0
    for index, (k, r) in enumerate(zip(single, rights)):
        widest_single, widest_rights = max(widest_single, k), max(widest_rights, r)
        per_example = max(widest_single, widest_rights * (max(num_models, LEFT_EDGES) + 1))
        if index > start and (index - start + 1) * per_example > _CHUNK_ELEMENTS:
            chunks.append(slice(start, index))
            start, widest_single, widest_rights = index, k, r
    chunks.append(slice(start, len(single)))
    return chunks


def example_epsilons(unlearned_confs, retrained_confs, delta: float = DELTA, *,
                     device: torch.device | str | None = None) -> np.ndarray:
    """Privacy ε of every forget example, as the competition defines it (see the module docstring for the rules).

    Args:
        unlearned_confs, retrained_confs: [N models, n examples] logit-scaled confidences of the forget examples
            under N unlearned and N retrained models (arrays or tensors; N >= 2, the same shape for both).
        delta: the δ of (ε, δ); in [0, 1).
        device: where to compute; default the device of `unlearned_confs` (CPU for arrays).
    Returns: float64 numpy array [n], each in [0, 50].
    """
    if not (isinstance(delta, (int, float)) and 0.0 <= delta < 1.0):
        raise UserError(f"delta must be a number in [0, 1); got {delta!r}")
    device = torch.device(device) if device is not None else None
    unlearned = _confidence_matrix(unlearned_confs, "unlearned_confs", device)
    retrained = _confidence_matrix(retrained_confs, "retrained_confs", unlearned.device)
    if unlearned.shape != retrained.shape:
        raise UserError(f"unlearned_confs and retrained_confs must have the same shape [models, examples]; got "
                        f"{tuple(unlearned.shape)} and {tuple(retrained.shape)}")
    num_models, num_examples = unlearned.shape
    if num_models < 2:
        raise UserError(f"needs at least 2 models per side to measure a spread; got {num_models}")
    if num_examples == 0:
        raise UserError("the forget set is empty: confidences have 0 examples; pass at least one")

    # Examples as rows, each sample sorted: medians, spreads and the counting all read sorted rows.
    unlearned = unlearned.T.sort(dim=1).values
    retrained = retrained.T.sort(dim=1).values
    lower_mid, upper_mid = (num_models - 1) // 2, num_models // 2
    median_u = (unlearned[:, lower_mid] + unlearned[:, upper_mid]) / 2
    median_r = (retrained[:, lower_mid] + retrained[:, upper_mid]) / 2
    retrained_positive = (median_r > median_u).unsqueeze(1)
    positive = torch.where(retrained_positive, retrained, unlearned)
    negative = torch.where(retrained_positive, unlearned, retrained)

    spread_pos = positive[:, -1] - positive[:, 0]
    spread_neg = negative[:, -1] - negative[:, 0]
    positive_peakier = (spread_pos < spread_neg).unsqueeze(1)
    peaky = torch.where(positive_peakier, positive, negative)
    other = torch.where(positive_peakier, negative, positive)
    smaller = torch.minimum(spread_pos, spread_neg)
    larger = torch.maximum(spread_pos, spread_neg)

    epsilons = torch.zeros(num_examples, dtype=torch.float64, device=unlearned.device)
    constants = larger == 0
    epsilons[constants & (positive[:, 0] != negative[:, 0])] = EPSILON_CAP
    spike = (smaller < SPIKE_SPREAD_RATIO * larger) & ~constants
    epsilons[spike] = EPSILON_CAP

    searched = torch.nonzero(~(constants | spike)).squeeze(1)
    if searched.numel():
        positive, negative, peaky, other = (t[searched] for t in (positive, negative, peaky, other))
        single_count, right_count = _grid_sizes(positive, negative, peaky)
        table = _epsilon_table(num_models, delta, unlearned.device)
        found = torch.empty(searched.numel(), dtype=torch.float64, device=unlearned.device)
        for part in _chunks(single_count.tolist(), right_count.tolist(), num_models):
            found[part] = torch.maximum(
                _single_threshold_best(positive[part], negative[part], single_count[part], table),
                _double_threshold_best(peaky[part], other[part], right_count[part], table))
        epsilons[searched] = found.clamp(0.0, EPSILON_CAP)
    return epsilons.cpu().numpy()


# --------------------------------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------------------------------

def check_num_models(num_models) -> int:
    """N as an int, or a UserError: the score needs N >= 3 models (the one place this rule is written)."""
    if isinstance(num_models, bool) or not isinstance(num_models, (int, np.integer)):
        raise UserError(f"num_models must be an integer; got {num_models!r}")
    if num_models < 3:
        raise UserError(f"needs N >= 3: below that ceil(ln(N - 1)) leaves no bucket; got N = {num_models}")
    return int(num_models)


def num_buckets(num_models: int) -> int:
    """Buckets of width 0.5 ending at or below ceil(ln(N − 1)): 8 for N = 32, 14 for N = 512."""
    top = math.ceil(math.log(check_num_models(num_models) - 1))
    return int(top // BUCKET_WIDTH)


def bucket_scores(epsilons, num_models: int) -> np.ndarray:
    """Points of each example: 2^-k for the first bucket k with ε < 0.5·(k + 1) among num_buckets(N); 0 beyond."""
    buckets = num_buckets(num_models)
    epsilons = np.asarray(epsilons, dtype=np.float64)
    if epsilons.ndim != 1:
        raise UserError(f"epsilons must be a vector [examples]; got shape {epsilons.shape}")
    if np.isnan(epsilons).any() or (epsilons < 0).any():
        raise UserError("epsilons must be >= 0 (inf allowed); found NaN or a negative value")
    bucket = np.floor(epsilons / BUCKET_WIDTH)  # the first k with ε < 0.5·(k + 1); exact for width 0.5
    in_range = bucket < buckets
    return np.where(in_range, np.exp2(-np.where(in_range, bucket, 0.0)), 0.0)


def forget_score_from_epsilons(epsilons, num_models: int) -> float:
    """Forgetting quality F: the mean of `bucket_scores` over the forget set, in [0, 1] (1 is best)."""
    scores = bucket_scores(epsilons, num_models)
    if scores.size == 0:
        raise UserError("the forget set is empty: no epsilons to score; pass at least one")
    return float(scores.mean())


def forget_score(unlearned_confs, retrained_confs, delta: float = DELTA, *,
                 device: torch.device | str | None = None) -> float:
    """Forgetting quality F from [N, n] confidences of N unlearned and N retrained models (N >= 3)."""
    unlearned = _confidence_matrix(unlearned_confs, "unlearned_confs", torch.device(device) if device else None)
    num_models = check_num_models(unlearned.shape[0])  # before any work: N < 3 cannot be scored
    return forget_score_from_epsilons(example_epsilons(unlearned, retrained_confs, delta), num_models)


def _mean_accuracy(values: Sequence[float], name: str) -> float:
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if array.size == 0 or not np.isfinite(array).all() or (array < 0).any() or (array > 1).any():
        raise UserError(f"{name} must be a non-empty list of accuracies in [0, 1]; got {list(array)}")
    return float(array.mean())


def final_score(forget_score: float, unlearned_retain_accs: Sequence[float], unlearned_test_accs: Sequence[float],
                retrained_retain_accs: Sequence[float], retrained_test_accs: Sequence[float]) -> float:
    """The competition's score: F · (mean RA_unlearned / mean RA_retrained) · (mean TA_unlearned / mean TA_retrained).

    Accuracies are fractions in [0, 1], one per model; the retrained means must be positive.
    """
    if not (isinstance(forget_score, (int, float, np.floating)) and 0.0 <= forget_score <= 1.0):
        raise UserError(f"forget_score must be a number in [0, 1]; got {forget_score!r}")
    retain_u = _mean_accuracy(unlearned_retain_accs, "unlearned_retain_accs")
    test_u = _mean_accuracy(unlearned_test_accs, "unlearned_test_accs")
    retain_r = _mean_accuracy(retrained_retain_accs, "retrained_retain_accs")
    test_r = _mean_accuracy(retrained_test_accs, "retrained_test_accs")
    if retain_r == 0 or test_r == 0:
        raise UserError("the retrained models' mean retain and test accuracies must be > 0 to divide by them")
    return float(forget_score) * (retain_u / retain_r) * (test_u / test_r)
