"""Evaluation: accuracies, SVC membership inference, Retrain comparison, per-example attacks, result files.

Knows nothing of argparse or mlflow: functions take models, loaders and plain values and return plain values.
"""
from evaluation.metrics import (
                                GAP_METRICS,
                                SELECTION_PARTS,
                                VAL_GAP_METRICS,
                                Evaluation,
                                avg_gap,
                                compare_to_retrain,
                                evaluate_model,
                                predict,
                                val_gap,
)
from evaluation.results import build_result, selection_entry, write_result
from evaluation.svc_mia import FEATURES, mia_features, svc_mia

__all__ = ["GAP_METRICS", "SELECTION_PARTS", "VAL_GAP_METRICS", "Evaluation", "avg_gap", "compare_to_retrain",
           "evaluate_model", "predict", "val_gap", "build_result", "selection_entry",
           "write_result", "FEATURES", "mia_features", "svc_mia"]
