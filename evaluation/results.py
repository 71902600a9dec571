"""The result JSON every evaluating script writes (its keys are described in docs/evaluation.md), written atomically."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from evaluation.metrics import Evaluation, compare_to_retrain
from evaluation.svc_mia import FEATURES
from utils import atomic_write_json

REQUIRED_KEYS = ("accuracy", "UA", "RA", "TA", "MIA_efficacy", "SVC_MIA_forget_efficacy", "RTE_seconds", "args",
                 "split_hash")


def build_result(evaluation: Evaluation, args: dict[str, Any], split_hash: str, rte_seconds: float,
                 retrain: Evaluation | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Assemble the result dict: accuracies, UA/RA/TA, MIA-Efficacy, the five SVC features (in %), the selection
    metrics VA and MIA_efficacy_val, RTE, and the Retrain comparison (rUA, agreement, avg_gap, val_gap) when a Retrain
    evaluation is given."""
    result: dict[str, Any] = {
        "accuracy": dict(evaluation.accuracy),
        **evaluation.metrics,
        "SVC_MIA_forget_efficacy": {f: 100.0 * evaluation.svc[f] for f in FEATURES} if evaluation.svc else {},
        **evaluation.selection,
        "RTE_seconds": float(rte_seconds),
    }
    if retrain is not None:
        result.update(compare_to_retrain(evaluation, retrain))
    result.update(extra or {})
    result["args"] = dict(args)
    result["split_hash"] = split_hash
    return result


def write_result(path: str | Path, result: dict[str, Any]) -> Path:
    missing = [k for k in REQUIRED_KEYS if k not in result]
    if missing:
        raise ValueError(f"result is missing keys: {', '.join(missing)}")
    return atomic_write_json(path, result)


def selection_entry(evaluation: Evaluation, rte_seconds: float, retrain: Evaluation | None = None) -> dict[str, Any]:
    """One point of a selection-only curve (`evaluate_model(parts=SELECTION_PARTS)`): accuracies on the training pool,
    UA, RA, VA, MIA_efficacy_val, RTE, and against Retrain rUA, agreement and val_gap. No key reads the test set."""
    if evaluation.has_test:
        raise ValueError("selection_entry: the evaluation holds the test set; build_result keeps it")
    entry: dict[str, Any] = {"accuracy": dict(evaluation.accuracy), **evaluation.selection_metrics,
                             "RTE_seconds": float(rte_seconds)}
    if retrain is not None:
        entry.update(compare_to_retrain(evaluation, retrain))
    return entry
