"""Per-example membership inference: the numerics of LiRA, RMIA and U-LiRA, and the ROC metrics they are reported with.

Pure functions on arrays. Nothing here trains a model: callers pass signals (logit-scaled confidences, true-label
probabilities) computed from a target model and from K reference (shadow) models, plus boolean membership matrices.

Conventions shared by every function:

* A **score** is "higher = more likely member" (for U-LiRA: more likely *unlearned*, i.e. trained on the example).
* A decision at threshold t calls an example member iff ``score >= t``.
* Reference signals are (K, n) matrices: row k = reference model k, column i = example i. A membership matrix of the
  same shape says, with True, that example i was IN the training set of reference model k. Entries a mask leaves out
  may hold anything (NaN padding is fine); the entries used must be finite.
* Array inputs may be numpy arrays, lists or torch tensors (any device); outputs are float64 numpy arrays or plain
  floats, except `logit_confidence`, which stays in torch.
* Bad input raises `utils.UserError` with what is wrong and what is allowed.

References:
  [LiRA]   N. Carlini, S. Chien, M. Nasr, S. Song, A. Terzis, F. Tramèr. "Membership Inference Attacks From First
           Principles." IEEE S&P 2022, arXiv:2112.03570. Reference code: tensorflow/privacy, research/mi_lira_2021.
  [RMIA]   S. Zarifzadeh, P. Liu, R. Shokri. "Low-Cost High-Power Membership Inference Attacks." ICML 2024,
           arXiv:2312.03262. Reference code: privacytrustlab/ml_privacy_meter (modules/mia/attacks/rmia.py).
  [U-LiRA] J. Hayes, I. Shumailov, E. Triantafillou, A. Khalifa, N. Papernot. "Inexact Unlearning Needs More Careful
           Evaluations to Avoid a False Sense of Privacy." arXiv:2403.01218, 2024.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from scipy.special import log_ndtr
from scipy.stats import rankdata

from utils import UserError

# The low-FPR operating points LiRA argues attacks should be judged by; keys of `attack_summary`.
SUMMARY_FPRS = {"tpr@1%fpr": 0.01, "tpr@0.1%fpr": 0.001}
# Relative floor on fitted standard deviations: a zero-spread fit (identical reference signals) must not divide by 0.
SIGMA_FLOOR_RELATIVE = 1e-6
# Grid for RMIA's offline coefficient a, as in [RMIA] / ML Privacy Meter: {0, 0.1, ..., 1}.
RMIA_A_GRID = tuple(round(0.1 * i, 1) for i in range(11))
# ML Privacy Meter's default offline coefficient (rmia.py, get_out_ref_signals(offline_a=0.3)).
RMIA_DEFAULT_A = 0.3


# --------------------------------------------------------------------------------------------------------------------
# Input handling
# --------------------------------------------------------------------------------------------------------------------

def _to_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _float_array(x, name: str, ndim: int) -> np.ndarray:
    try:
        arr = _to_numpy(x).astype(np.float64, copy=False)
    except (TypeError, ValueError) as exc:
        raise UserError(f"{name} must be numeric; got {type(x).__name__} ({exc})") from None
    if arr.ndim != ndim:
        shape = "(n,)" if ndim == 1 else "(K, n)"
        raise UserError(f"{name} must have shape {shape}; got shape {arr.shape}")
    return arr


def _bool_array(x, name: str, shape: tuple[int, ...]) -> np.ndarray:
    arr = _to_numpy(x)
    if arr.dtype != np.bool_:
        if arr.size and not np.isin(arr, (0, 1)).all():
            raise UserError(f"{name} must be boolean (or 0/1); got values other than 0 and 1")
        arr = arr.astype(bool)
    if arr.shape != shape:
        raise UserError(f"{name} must have shape {shape}; got {arr.shape}")
    return arr


def _require_finite(values: np.ndarray, name: str) -> None:
    if not np.isfinite(values).all():
        raise UserError(f"{name} must be finite where used; found {int((~np.isfinite(values)).sum())} NaN/inf values")


def _scores_and_labels(scores, is_member) -> tuple[np.ndarray, np.ndarray]:
    s = _float_array(scores, "scores", 1)
    if np.isnan(s).any():
        raise UserError("scores must not contain NaN (±inf is allowed)")
    y = _bool_array(is_member, "is_member", s.shape)
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        raise UserError(f"is_member needs both members and non-members; got {n_pos} members of {y.size}")
    return s, y


# --------------------------------------------------------------------------------------------------------------------
# Signal
# --------------------------------------------------------------------------------------------------------------------

def logit_confidence(logits, labels) -> torch.Tensor:
    """Logit-scaled confidence of the true label [LiRA]: φ = log p_y − log(1 − p_y), p = softmax(z).

    Since p_y = e^{z_y}/Σ_j e^{z_j} and 1 − p_y = Σ_{j≠y} e^{z_j}/Σ_j e^{z_j}, the normaliser cancels:

        φ = z_y − logsumexp_{j≠y} z_j,

    which is finite for any finite logits (z_y = 1000 with the rest 0 gives 1000 − log(C−1); z_y = −1000 gives
    −1000 − log(C−1)), while the naive formula saturates p_y to 0 or 1.

    Args: logits (n, C) with C >= 2, finite; labels (n,) integers in [0, C). Tensors or arrays; labels are moved to the
    logits' device.
    Returns: float tensor (n,) on the logits' device; float64 logits stay float64, anything else is computed in float32.
    """
    logits = torch.as_tensor(logits)
    labels = torch.as_tensor(labels, device=logits.device)
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise UserError(f"logits must have shape (n, C) with C >= 2 classes; got {tuple(logits.shape)}")
    if labels.shape != (logits.shape[0],):
        raise UserError(f"labels must have shape ({logits.shape[0]},) to match logits; got {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise UserError(f"labels must be integer class indices; got dtype {labels.dtype}")
    if logits.dtype != torch.float64:
        logits = logits.float()
    if labels.numel():
        if int(labels.min()) < 0 or int(labels.max()) >= logits.shape[1]:
            raise UserError(f"labels must lie in [0, {logits.shape[1]}); got range "
                            f"[{int(labels.min())}, {int(labels.max())}]")
        if not bool(torch.isfinite(logits).all()):
            raise UserError("logits must be finite; found NaN or inf")
    index = labels.long().unsqueeze(1)
    true_logit = logits.gather(1, index).squeeze(1)
    others = logits.scatter(1, index, float("-inf"))  # out of place: the caller's tensor is untouched
    return true_logit - torch.logsumexp(others, dim=1)


# --------------------------------------------------------------------------------------------------------------------
# ROC metrics
# --------------------------------------------------------------------------------------------------------------------

def _roc_counts(s: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """True/false positive counts at every distinct threshold (descending), starting from (0, 0) at t = +inf."""
    order = np.argsort(-s, kind="stable")
    s_sorted, y_sorted = s[order], y[order]
    # last position of each run of equal scores: everything tied with t is on the member side of `score >= t`
    group_end = np.flatnonzero(np.r_[s_sorted[1:] != s_sorted[:-1], True])
    tp = np.cumsum(y_sorted)[group_end]
    fp = np.cumsum(~y_sorted)[group_end]
    thresholds = s_sorted[group_end]
    return np.r_[0, tp], np.r_[0, fp], np.r_[np.inf, thresholds]


def roc_curve_points(scores, is_member) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every point of the empirical ROC curve of the rule "member iff score >= t".

    Returns (fpr, tpr, thresholds), float64 arrays of equal length: one point per distinct score in decreasing order,
    preceded by (0, 0) at threshold +inf and ending at (1, 1) at the smallest score. No point is dropped, so the arrays
    can be plotted on log-log axes (LiRA's presentation) or searched for low-FPR operating points.
    """
    s, y = _scores_and_labels(scores, is_member)
    tp, fp, thresholds = _roc_counts(s, y)
    return fp / (~y).sum(), tp / y.sum(), thresholds.astype(np.float64)


def roc_auc(scores, is_member) -> float:
    """Area under the ROC curve = the Mann–Whitney statistic P(S_member > S_non) + ½·P(S_member = S_non).

    Computed from average ranks: AUC = (Σ rank(members) − n₁(n₁+1)/2) / (n₁·n₀), so each tied member/non-member pair
    counts ½ (the same value as the trapezoidal area under `roc_curve_points`).
    """
    s, y = _scores_and_labels(scores, is_member)
    ranks = rankdata(s)  # average ranks for ties
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def tpr_at_fpr(scores, is_member, fpr: float) -> float:
    """The largest TPR of the rule "member iff score >= t" over thresholds t whose FPR does not exceed `fpr`.

    Convention (explicit because libraries differ): only thresholds that are actually achievable are considered — no
    interpolation between ROC points and no randomised tie-breaking — and the FPR constraint is inclusive, checked on
    counts: at most floor(fpr · n_non-members) false positives (a 1e-9 slack absorbs decimal round-off, so 1 false
    positive in 1000 non-members meets fpr = 0.001). With fewer than 1/fpr non-members this means zero false
    positives. The threshold t = +inf (nobody called member) always qualifies, so the result is >= 0.
    """
    if not 0.0 <= fpr <= 1.0:
        raise UserError(f"fpr must lie in [0, 1]; got {fpr}")
    s, y = _scores_and_labels(scores, is_member)
    tp, fp, _ = _roc_counts(s, y)
    allowed_false_positives = math.floor(fpr * int((~y).sum()) + 1e-9)
    # tp and fp are non-decreasing along the curve, so the last admissible point has the largest TPR
    last = np.searchsorted(fp, allowed_false_positives, side="right") - 1
    return float(tp[last] / y.sum())


def balanced_accuracy_best_threshold(scores, is_member) -> tuple[float, float]:
    """Best balanced accuracy ½(TPR + TNR) = ½(1 + TPR − FPR) over thresholds of "member iff score >= t".

    Returns (balanced_accuracy, threshold). The direction is fixed (higher score = member), so the value is >= 0.5
    (t = +inf gives exactly 0.5); on ties the highest threshold wins. Maximising on the evaluated set is optimistic:
    for indistinguishable classes it exceeds 0.5 by O(1/√n).
    """
    s, y = _scores_and_labels(scores, is_member)
    tp, fp, thresholds = _roc_counts(s, y)
    balanced = 0.5 * (1.0 + tp / y.sum() - fp / (~y).sum())
    best = int(np.argmax(balanced))
    return float(balanced[best]), float(thresholds[best])


def attack_summary(scores, is_member) -> dict[str, float]:
    """The numbers every attack reports (docs/attacks.md), as plain floats:
    {"auc", "tpr@1%fpr", "tpr@0.1%fpr", "balanced_accuracy"} — see `roc_auc`, `tpr_at_fpr`,
    `balanced_accuracy_best_threshold`."""
    s, y = _scores_and_labels(scores, is_member)
    summary = {"auc": roc_auc(s, y)}
    for key, fpr in SUMMARY_FPRS.items():
        summary[key] = tpr_at_fpr(s, y, fpr)
    summary["balanced_accuracy"] = balanced_accuracy_best_threshold(s, y)[0]
    return summary


# --------------------------------------------------------------------------------------------------------------------
# Gaussian fits shared by LiRA and U-LiRA
# --------------------------------------------------------------------------------------------------------------------

class _SideFit:
    """Per-example Gaussian fit of the selected entries of a (K, n) matrix (one 'side': IN, OUT, unlearned, ...).

    mean_i = average of the selected values of column i; std_i = their population standard deviation (ddof 0, as
    np.std in the LiRA reference code); pooled = sqrt(Σ_i Σ_k (v_ki − mean_i)² / Σ_i count_i) over columns with at
    least two values, i.e. the spread left after centring every example on its own mean (one shared variance).
    """

    def __init__(self, values: np.ndarray, selected: np.ndarray, name: str):
        _require_finite(values[selected], name)
        self.values = values[selected]
        self.counts = selected.sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            kept = np.where(selected, values, 0.0)
            self.mean = kept.sum(axis=0) / self.counts  # NaN where count == 0; callers branch on counts
            squared = np.where(selected, (values - self.mean) ** 2, 0.0).sum(axis=0)
            self.std = np.sqrt(squared / self.counts)
        several = self.counts >= 2
        self.pooled = float(np.sqrt(squared[several].sum() / self.counts[several].sum())) if several.any() else math.nan


def _sigma_floor(*fits: _SideFit) -> float:
    """1e-6 × the spread of all reference values used (1e-6 absolute when they are all equal)."""
    spread = float(np.std(np.concatenate([f.values for f in fits])))
    return SIGMA_FLOOR_RELATIVE * (spread if spread > 0 else 1.0)


def _sigmas(fit: _SideFit, fallback: float, fixed_variance: bool, floor: float, what: str) -> np.ndarray:
    """Per-example σ; the shared (pooled) σ where fixed_variance or where an example has a single value."""
    global_sigma = fit.pooled if math.isfinite(fit.pooled) else fallback
    needs_global = fixed_variance or bool((fit.counts == 1).any())
    if needs_global and not math.isfinite(global_sigma):
        raise UserError(f"cannot estimate a variance for {what}: no example has >= 2 reference values on either side; "
                        "use more reference models")
    if fixed_variance:
        sigma = np.full(fit.counts.shape, global_sigma)
    else:
        sigma = np.where(fit.counts >= 2, fit.std, global_sigma)
    return np.maximum(sigma, floor)


def _gaussian_log_ratio(x: np.ndarray, mean_a, sigma_a, mean_b, sigma_b) -> np.ndarray:
    """log N(x; μ_a, σ_a²) − log N(x; μ_b, σ_b²) (the 2π terms cancel)."""
    za = (x - mean_a) / sigma_a
    zb = (x - mean_b) / sigma_b
    return -0.5 * za ** 2 - np.log(sigma_a) + 0.5 * zb ** 2 + np.log(sigma_b)


def _reference_matrices(target_phi, named: Sequence[tuple[str, object]]) -> tuple[np.ndarray, list[np.ndarray]]:
    target = _float_array(target_phi, "target_phi", 1)
    if target.shape[0] == 0:
        raise UserError("target_phi must hold at least one example; got none")
    _require_finite(target, "target_phi")
    matrices = []
    for name, value in named:
        m = _float_array(value, name, 2)
        if m.shape[1] != target.shape[0]:
            raise UserError(f"{name} must have one column per example ({target.shape[0]}); got shape {m.shape}")
        if m.shape[0] == 0:
            raise UserError(f"{name} needs at least one reference model (row); got shape {m.shape}")
        matrices.append(m)
    return target, matrices


# --------------------------------------------------------------------------------------------------------------------
# LiRA
# --------------------------------------------------------------------------------------------------------------------

def lira_online(target_phi, in_phis, out_phis, in_mask, fixed_variance: bool = False) -> np.ndarray:
    """Online LiRA [LiRA, Algorithm 1]: per-example Gaussian likelihood ratio between IN and OUT reference models.

    Inputs: target_phi (n,) = φ of each example under the target model; in_phis, out_phis (K, n) = φ under the K
    reference models; in_mask (K, n), True where example i was IN reference model k. The IN values of example i are
    in_phis[in_mask[:, i], i] and its OUT values out_phis[~in_mask[:, i], i]; usually in_phis and out_phis are the
    same matrix (pass it twice), but separate matrices padded with NaN where unused also work.

        μ_in, σ_in = mean, std of the IN values;  μ_out, σ_out = mean, std of the OUT values
        score = log N(φ; μ_in, σ_in²) − log N(φ; μ_out, σ_out²)

    σ: with fixed_variance, one global σ_in and one global σ_out for all examples — the standard deviation of all IN
    (resp. OUT) values after centring each example on its own mean ([LiRA] recommends a fixed variance with few
    models; the reference code takes np.std over the uncentred matrix, which would add the spread of the example means).
    Otherwise per-example standard deviations (ddof 0); an example with a single IN (resp. OUT) value uses the global
    σ_in (resp. σ_out); a side with no example of >= 2 values borrows the other side's global σ. Every σ is floored at
    1e-6 × the spread of all reference values.

    Examples with no IN model get the offline score log Φ((φ − μ_out)/σ_out) (see `lira_offline`); with no OUT model,
    the mirror one-sided score log Φ((φ − μ_in)/σ_in). Both are increasing in φ like the ratio but on a different
    scale, so keep such examples rare (with K models on random halves a given example lacks a side with
    probability 2^(1−K)).

    Returns: float64 array (n,), higher = more likely member. The mean is used where the reference code takes a
    median; medians differ only under outliers. The measured effect of each such difference is in docs/attacks.md.
    """
    target, (ins, outs) = _reference_matrices(target_phi, [("in_phis", in_phis), ("out_phis", out_phis)])
    if ins.shape != outs.shape:
        raise UserError(f"in_phis and out_phis must have the same shape (K, n); got {ins.shape} and {outs.shape}")
    member = _bool_array(in_mask, "in_mask", ins.shape)
    fit_in = _SideFit(ins, member, "in_phis")
    fit_out = _SideFit(outs, ~member, "out_phis")
    floor = _sigma_floor(fit_in, fit_out)
    sigma_in = _sigmas(fit_in, fit_out.pooled, fixed_variance, floor, "IN reference models")
    sigma_out = _sigmas(fit_out, fit_in.pooled, fixed_variance, floor, "OUT reference models")
    no_in, no_out = fit_in.counts == 0, fit_out.counts == 0
    mean_in = np.where(no_in, 0.0, fit_in.mean)
    mean_out = np.where(no_out, 0.0, fit_out.mean)
    scores = _gaussian_log_ratio(target, mean_in, sigma_in, mean_out, sigma_out)
    scores = np.where(no_in, log_ndtr((target - mean_out) / sigma_out), scores)
    scores = np.where(no_out, log_ndtr((target - mean_in) / sigma_in), scores)
    return scores


def lira_offline(target_phi, out_phis, out_mask, fixed_variance: bool = False) -> np.ndarray:
    """Offline LiRA [LiRA]: a one-sided test against the OUT reference models only.

    Inputs: target_phi (n,); out_phis (K, n) = φ under the reference models; out_mask (K, n), True where example i
    was OUT of reference model k (i.e. the entry is used). Every example needs at least one OUT value.

        score = log Φ((φ − μ_out)/σ_out)

    The paper's score is Φ(·) itself; its logarithm (scipy's log_ndtr) ranks identically (same ROC) but does not
    saturate at 1.0 for z > 8, where Φ would turn strong members into ties. σ_out follows the rules of `lira_online`
    (per example, or one global σ with fixed_variance; examples with one OUT value use the global σ; floor 1e-6 ×
    spread).

    The reference code instead scores the two-sided −log N(φ; μ_out, σ_out²), which also calls examples far below the
    OUT mean members; docs/attacks.md measures the difference.

    Returns: float64 array (n,) of values <= 0, higher = more likely member.
    """
    target, (outs,) = _reference_matrices(target_phi, [("out_phis", out_phis)])
    used = _bool_array(out_mask, "out_mask", outs.shape)
    fit = _SideFit(outs, used, "out_phis")
    missing = int((fit.counts == 0).sum())
    if missing:
        raise UserError(f"offline LiRA needs at least one OUT reference model per example; "
                        f"{missing} examples have none")
    sigma = _sigmas(fit, math.nan, fixed_variance, _sigma_floor(fit), "OUT reference models")
    return log_ndtr((target - fit.mean) / sigma)


# --------------------------------------------------------------------------------------------------------------------
# RMIA
# --------------------------------------------------------------------------------------------------------------------

def _probabilities(x, name: str, ndim: int) -> np.ndarray:
    p = _float_array(x, name, ndim)
    _require_finite(p, name)
    if p.size and (p.min() < 0.0 or p.max() > 1.0):
        raise UserError(f"{name} must hold probabilities in [0, 1]; got range [{p.min()}, {p.max()}]")
    return p


def _rmia_marginal(ref_probs: np.ndarray, in_mask: np.ndarray, a: float, offline: bool, name: str) -> np.ndarray:
    """Pr(·) over reference models; offline: ((1 + a)/2)·mean_OUT + (1 − a)/2 (floored at the tiniest float)."""
    if offline:
        out = ~in_mask
        counts = out.sum(axis=0)
        missing = int((counts == 0).sum())
        if missing:
            raise UserError(f"offline RMIA needs at least one OUT reference model for every {name} example; "
                            f"{missing} have none (use offline=False, or more reference models)")
        mean_out = np.where(out, ref_probs, 0.0).sum(axis=0) / counts
        marginal = 0.5 * (1.0 + a) * mean_out + 0.5 * (1.0 - a)
    else:
        marginal = ref_probs.mean(axis=0)
    return np.maximum(marginal, np.finfo(np.float64).tiny)


def rmia_scores(target_probs_x, ref_probs_x, ref_in_mask_x, target_probs_z, ref_probs_z, ref_in_mask_z=None,
                a: float = RMIA_DEFAULT_A, gamma: float = 1.0, offline: bool = True) -> np.ndarray:
    """RMIA [RMIA]: fraction of population samples z that candidate x dominates in likelihood ratio.

    Inputs (probabilities of the true label):
      target_probs_x (n,)   under the target model, for the candidates x;
      ref_probs_x (K, n)    under K reference models; ref_in_mask_x (K, n) True where x was IN reference model k
                            (None = OUT of all);
      target_probs_z (m,), ref_probs_z (K, m), ref_in_mask_z (K, m) or None: the same for population samples z.

        Pr(x) = mean over all K reference models                     (online, offline=False; `a` unused)
        Pr(x) = ((1 + a)/2) · mean_OUT(x) + (1 − a)/2               (offline: OUT models only, linear correction
                                                                       for the missing IN models; same for z)
        ratio(x) = Pr(x | θ) / Pr(x),   LR(x, z) = ratio(x) / ratio(z)
        score(x) = |{z : LR(x, z) > γ}| / m

    Counted as |{z : ratio(z) < ratio(x)/γ}| with one sort of the z ratios and a binary search per x, O((n + m) log m)
    instead of the n × m comparison matrix (identical except at float round-off ties when γ != 1). Pr is floored at the
    smallest positive float so a zero marginal cannot divide by zero. `a` defaults to ML Privacy Meter's 0.3; tune it
    with `tune_rmia_a`.

    Returns: float64 array (n,) in [0, 1], higher = more likely member.
    """
    tx = _probabilities(target_probs_x, "target_probs_x", 1)
    tz = _probabilities(target_probs_z, "target_probs_z", 1)
    rx = _probabilities(ref_probs_x, "ref_probs_x", 2)
    rz = _probabilities(ref_probs_z, "ref_probs_z", 2)
    if rx.shape[1] != tx.shape[0] or rz.shape[1] != tz.shape[0] or rx.shape[0] != rz.shape[0] or rx.shape[0] == 0:
        raise UserError("ref_probs_x must be (K, n) and ref_probs_z (K, m) with the same K >= 1, "
                        f"n = len(target_probs_x), m = len(target_probs_z); got {rx.shape}, {rz.shape}, "
                        f"n={tx.shape[0]}, m={tz.shape[0]}")
    if tz.shape[0] == 0:
        raise UserError("RMIA needs at least one population sample z")
    if not 0.0 <= a <= 1.0:
        raise UserError(f"a must lie in [0, 1]; got {a}")
    if not gamma > 0.0:
        raise UserError(f"gamma must be > 0; got {gamma}")
    mx = np.zeros(rx.shape, bool) if ref_in_mask_x is None else _bool_array(ref_in_mask_x, "ref_in_mask_x", rx.shape)
    mz = np.zeros(rz.shape, bool) if ref_in_mask_z is None else _bool_array(ref_in_mask_z, "ref_in_mask_z", rz.shape)
    ratio_x = tx / _rmia_marginal(rx, mx, a, offline, "x")
    ratio_z = tz / _rmia_marginal(rz, mz, a, offline, "z")
    bound = ratio_x if gamma == 1.0 else ratio_x / gamma
    dominated = np.searchsorted(np.sort(ratio_z), bound, side="left")  # strict: ratio_z < bound
    return dominated / tz.shape[0]


def tune_rmia_a(ref_probs_x, ref_in_mask_x, ref_probs_z, ref_in_mask_z=None, pseudo_targets=None,
                gamma: float = 1.0, grid: Sequence[float] = RMIA_A_GRID) -> tuple[float, np.ndarray]:
    """Choose RMIA's offline coefficient a by attacking reference models whose membership is known [RMIA].

    Inputs: the reference signals of `rmia_scores` — ref_probs_x (K, n), ref_in_mask_x (K, n), ref_probs_z (K, m),
    ref_in_mask_z (K, m) or None — with K >= 2; pseudo_targets = indices of the reference models to treat as the
    target (default: all K; ML Privacy Meter uses the one model paired with the real target).

    For each a in `grid` and each pseudo-target k: offline RMIA with model k as target and the other K − 1 models as
    references, scored against ref_in_mask_x[k] by ROC-AUC over the candidates that have at least one OUT model among
    the others (the rest cannot be scored offline). The AUC is averaged over pseudo-targets.

    Returns (best_a, aucs): the grid value with the highest mean AUC (the smallest such a on ties) and the mean AUC for
    every grid value, a float64 array aligned with `grid`.
    """
    rx = _probabilities(ref_probs_x, "ref_probs_x", 2)
    rz = _probabilities(ref_probs_z, "ref_probs_z", 2)
    k_models = rx.shape[0]
    if k_models < 2 or rz.shape[0] != k_models:
        raise UserError(f"tuning a needs K >= 2 reference models in both ref_probs_x and ref_probs_z; got {rx.shape} "
                        f"and {rz.shape}")
    mx = _bool_array(ref_in_mask_x, "ref_in_mask_x", rx.shape)
    mz = np.zeros(rz.shape, bool) if ref_in_mask_z is None else _bool_array(ref_in_mask_z, "ref_in_mask_z", rz.shape)
    targets = list(range(k_models)) if pseudo_targets is None else [int(k) for k in pseudo_targets]
    if not targets or any(not 0 <= k < k_models for k in targets):
        raise UserError(f"pseudo_targets must be a non-empty list of model indices in [0, {k_models}); "
                        f"got {pseudo_targets}")
    grid = [float(a) for a in grid]
    if not grid:
        raise UserError("grid must contain at least one value of a")
    aucs = np.zeros((len(targets), len(grid)))
    for row, k in enumerate(targets):
        others = np.arange(k_models) != k
        scorable = (~mx[others]).any(axis=0)
        labels = mx[k, scorable]
        if labels.all() or not labels.any():
            raise UserError(f"pseudo-target model {k} needs both IN and OUT candidates that have an OUT model "
                            "among the other reference models")
        for col, a in enumerate(grid):
            scores = rmia_scores(rx[k, scorable], rx[others][:, scorable], mx[others][:, scorable],
                                 rz[k], rz[others], mz[others], a=a, gamma=gamma, offline=True)
            aucs[row, col] = roc_auc(scores, labels)
    mean_auc = aucs.mean(axis=0)
    return grid[int(np.argmax(mean_auc))], mean_auc


# --------------------------------------------------------------------------------------------------------------------
# U-LiRA
# --------------------------------------------------------------------------------------------------------------------

def ulira_scores(target_phi, unlearned_phis, retrained_phis, fixed_variance: bool = False,
                 unlearned_mask=None, retrained_mask=None) -> np.ndarray:
    """Per-example U-LiRA [U-LiRA]: LiRA's likelihood ratio with 'unlearned' in place of IN and 'retrained' in
    place of OUT.

    Inputs: target_phi (n,) = φ of each forget example under the model being attacked (unlearned or retrained);
    unlearned_phis (K_u, n) = φ under shadow models trained with the example and then unlearned; retrained_phis
    (K_r, n) = φ under shadow models retrained without it. The optional masks (same shapes) select the entries that
    apply to each example (when shadow forget sets differ); default all.

        score = log N(φ; μ_unl, σ_unl²) − log N(φ; μ_ret, σ_ret²)

    σ as in `lira_online` (per example, ddof 0; the pooled centred σ with fixed_variance or for an example with a
    single value on a side; floor 1e-6 × spread). Every example needs at least one value on each side.

    Returns: float64 array (n,), higher = more likely the unlearned model (the example left a trace).
    """
    target, (unl, ret) = _reference_matrices(target_phi, [("unlearned_phis", unlearned_phis),
                                                          ("retrained_phis", retrained_phis)])
    mu = np.ones(unl.shape, bool) if unlearned_mask is None else _bool_array(unlearned_mask, "unlearned_mask",
                                                                             unl.shape)
    mr = np.ones(ret.shape, bool) if retrained_mask is None else _bool_array(retrained_mask, "retrained_mask",
                                                                             ret.shape)
    fit_u = _SideFit(unl, mu, "unlearned_phis")
    fit_r = _SideFit(ret, mr, "retrained_phis")
    missing = int(((fit_u.counts == 0) | (fit_r.counts == 0)).sum())
    if missing:
        raise UserError(f"U-LiRA needs at least one unlearned and one retrained shadow value per example; "
                        f"{missing} examples lack one")
    floor = _sigma_floor(fit_u, fit_r)
    sigma_u = _sigmas(fit_u, fit_r.pooled, fixed_variance, floor, "unlearned shadow models")
    sigma_r = _sigmas(fit_r, fit_u.pooled, fixed_variance, floor, "retrained shadow models")
    return _gaussian_log_ratio(target, fit_u.mean, sigma_u, fit_r.mean, sigma_r)


def ulira_accuracy(scores_unlearned_targets, scores_retrained_targets) -> dict[str, float]:
    """How well U-LiRA tells unlearned target models from retrained ones [U-LiRA].

    Inputs: U-LiRA scores (from `ulira_scores`, flattened over target models and forget examples) of unlearned targets
    (the positives) and of retrained targets. Pass equally many of each for the paper's balanced set; balanced accuracy
    also corrects an imbalance.

    Returns `attack_summary` of the pooled scores: {"auc", "tpr@1%fpr", "tpr@0.1%fpr", "balanced_accuracy"}, where
    "balanced_accuracy" is the best over thresholds (the attack accuracy of the paper). 0.5 (AUC and accuracy) is
    ideal: unlearned models indistinguishable from retrained ones.
    """
    unl = _float_array(scores_unlearned_targets, "scores_unlearned_targets", 1)
    ret = _float_array(scores_retrained_targets, "scores_retrained_targets", 1)
    scores = np.concatenate([unl, ret])
    labels = np.concatenate([np.ones(unl.shape[0], bool), np.zeros(ret.shape[0], bool)])
    return attack_summary(scores, labels)
