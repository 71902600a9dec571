"""SVC membership inference of Unlearn-Sparse / SalUn, with Song and Mittal's modified entropy computed correctly
(upstream's expression differs; docs/evaluation.md and docs/attacks.md).

Five features per sample, one RBF-SVC attacker each (C=3, gamma="auto"), fit on shadow members (label 1) and shadow
non-members (label 0). The output per feature is the mean over the non-empty target sets of (fraction of target
members predicted member, fraction of target non-members predicted non-member).
"""
from __future__ import annotations

import numpy as np
import torch
from sklearn.svm import SVC

FEATURES = ("correctness", "confidence", "entropy", "m_entropy", "prob")
_LOG_FLOOR = 1e-30


def mia_features(probs: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> dict[str, np.ndarray]:
    """Per-sample attack features from softmax probabilities (n, C) and true labels (n,); each value is (n, d)."""
    p = torch.as_tensor(probs, dtype=torch.float64).cpu()
    y = torch.as_tensor(labels, dtype=torch.long).cpu()
    rows = torch.arange(len(y))
    p_y = p[rows, y]
    log_p = torch.log(p.clamp_min(_LOG_FLOOR))
    log_not_p = torch.log((1.0 - p).clamp_min(_LOG_FLOOR))
    entropy = -(torch.where(p > 0, p * log_p, torch.zeros_like(p))).sum(1)
    # Song & Mittal (2021): -(1 - p_y) log p_y - sum_{i != y} p_i log(1 - p_i)
    others = p * log_not_p
    others[rows, y] = 0.0
    m_entropy = -(1.0 - p_y) * log_p[rows, y] - others.sum(1)
    correctness = (p.argmax(1) == y).double()
    return {
        "correctness": correctness[:, None].numpy(),
        "confidence": p_y[:, None].numpy(),
        "entropy": entropy[:, None].numpy(),
        "m_entropy": m_entropy[:, None].numpy(),
        "prob": p.numpy(),
    }


def svc_attack(shadow_in: np.ndarray, shadow_out: np.ndarray, targets_in: np.ndarray | None,
               targets_out: np.ndarray | None) -> float:
    """Fit one SVC on shadow features; score = mean of (TPR on targets_in, TNR on targets_out) over non-empty sets."""
    x = np.concatenate([shadow_in, shadow_out])
    y = np.concatenate([np.ones(len(shadow_in)), np.zeros(len(shadow_out))])
    if len(np.unique(y)) < 2:
        raise ValueError("the SVC attack needs both shadow members and shadow non-members")
    clf = SVC(C=3, gamma="auto", kernel="rbf").fit(x, y)
    parts = []
    if targets_in is not None and len(targets_in):
        parts.append(float(np.mean(clf.predict(targets_in) == 1)))
    if targets_out is not None and len(targets_out):
        parts.append(float(np.mean(clf.predict(targets_out) == 0)))
    if not parts:
        raise ValueError("the SVC attack needs at least one non-empty target set")
    return float(np.mean(parts))


def svc_mia(shadow_train: tuple, shadow_test: tuple, target_train: tuple | None = None,
            target_test: tuple | None = None, features: tuple[str, ...] = FEATURES) -> dict[str, float]:
    """SVC_MIA of upstream on (probs, labels) pairs; returns the fractions in [0, 1] of `features` (default all five).
    Each feature's SVC is fit on its own, so asking for fewer features gives the same values for those it returns."""
    unknown = [f for f in features if f not in FEATURES]
    if unknown or not features:
        raise ValueError(f"svc_mia: unknown feature(s) {unknown}; allowed: {', '.join(FEATURES)}")
    feats = {name: mia_features(*pair) if pair is not None else None
             for name, pair in (("shadow_train", shadow_train), ("shadow_test", shadow_test),
                                ("target_train", target_train), ("target_test", target_test))}
    return {
        f: svc_attack(feats["shadow_train"][f], feats["shadow_test"][f],
                      None if feats["target_train"] is None else feats["target_train"][f],
                      None if feats["target_test"] is None else feats["target_test"][f])
        for f in features
    }
