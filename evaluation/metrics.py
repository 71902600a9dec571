"""Accuracies on retain / forget / val / test, SVC MIA-Efficacy, and the comparison with a Retrain model.

All numbers are in %. UA = 100 - forget accuracy (SalUn's convention); `accuracy.forget` keeps the paper's raw forget
accuracy. Avg. Gap (SalUn) = mean absolute gap to Retrain over UA, RA, TA and MIA-Efficacy.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from evaluation.svc_mia import svc_mia
from utils import batch_channels_last, forward_precision, temporarily_eval

PARTS = ("retain", "forget", "val", "test")
GAP_METRICS = ("UA", "RA", "TA", "MIA_efficacy")


@torch.no_grad()
def predict(model: torch.nn.Module, loader, amp: str = "off") -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (float32) and labels over an ordered loader, in eval mode (the model's mode is restored); the forward
    passes under `--amp` (`utils.forward_precision`). Everything stays on the device until one copy at the end."""
    logits, labels = [], []
    with temporarily_eval(model):
        for x, y in loader:
            with forward_precision(amp, x.device):
                out = model(batch_channels_last(x, amp))
            logits.append(out.float())
            labels.append(y)
    if not logits:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long)
    return torch.cat(logits).cpu(), torch.cat(labels).cpu()


@dataclass
class Evaluation:
    accuracy: dict[str, float]
    svc: dict[str, float]                  # five SVC fractions of forget samples called non-member
    forget_predictions: np.ndarray         # argmax on the forget set, aligned with split.forget
    forget_logits: torch.Tensor | None = field(default=None, repr=False)
    test_logits: torch.Tensor | None = field(default=None, repr=False)

    @property
    def metrics(self) -> dict[str, float]:
        return {
            "UA": 100.0 - self.accuracy["forget"], "RA": self.accuracy["retain"], "TA": self.accuracy["test"],
            "MIA_efficacy": 100.0 * self.svc["confidence"],
        }


def evaluate_model(model: torch.nn.Module, data, with_mia: bool = True, amp: str = "off") -> Evaluation:
    """Evaluate on every part of a `SplitData`. MIA-Efficacy follows upstream exactly: shadow members = the first |test|
    retain samples in stored order, shadow non-members = the test set, targets = the forget set (all unaugmented).
    `amp`: precision of the forward passes (`--amp`); the metrics themselves are computed in float64 on the CPU."""
    outputs = {part: predict(model, data.eval_loader(part), amp) for part in PARTS}
    accuracy = {}
    for part, (logits, labels) in outputs.items():
        accuracy[part] = 100.0 * float((logits.argmax(1) == labels).double().mean()) if len(labels) else float("nan")
    svc = {}
    if with_mia:
        probs = {part: (torch.softmax(logits.double(), 1), labels) for part, (logits, labels) in outputs.items()}
        n_shadow = len(outputs["test"][1])
        shadow_in = (probs["retain"][0][:n_shadow], probs["retain"][1][:n_shadow])
        svc = svc_mia(shadow_train=shadow_in, shadow_test=probs["test"], target_train=None, target_test=probs["forget"])
    return Evaluation(accuracy=accuracy, svc=svc, forget_predictions=outputs["forget"][0].argmax(1).numpy(),
                      forget_logits=outputs["forget"][0], test_logits=outputs["test"][0])


def avg_gap(method: dict[str, float], retrain: dict[str, float]) -> float:
    """Mean absolute gap over UA, RA, TA and MIA-Efficacy (RTE excluded), in %."""
    return float(np.mean([abs(method[k] - retrain[k]) for k in GAP_METRICS]))


def compare_to_retrain(method: Evaluation, retrain: Evaluation) -> dict[str, float]:
    """rUA = forget accuracy minus Retrain's; agreement = % of forget samples with Retrain's prediction; Avg. Gap."""
    if len(method.forget_predictions) != len(retrain.forget_predictions):
        raise ValueError("the Retrain reference was evaluated on another forget set")
    agreement = 100.0 * float(np.mean(method.forget_predictions == retrain.forget_predictions))
    return {
        "rUA": method.accuracy["forget"] - retrain.accuracy["forget"],
        "agreement": agreement,
        "avg_gap": avg_gap(method.metrics, retrain.metrics),
    }
