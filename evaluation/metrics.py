"""Accuracies on retain / forget / val / test, SVC MIA-Efficacy, and the comparison with a Retrain model.

All numbers are in %. UA = 100 - forget accuracy (SalUn's convention); `accuracy.forget` keeps the paper's raw forget
accuracy. Avg. Gap (SalUn) = mean absolute gap to Retrain over UA, RA, TA and MIA-Efficacy. The validation gap
(`val_gap`, what `benchmark.py --tune` selects by) = the same mean over UA, RA, VA and MIA_efficacy_val, which read the
training pool only (retain, forget and validation samples), never the test set the tables report.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from evaluation.svc_mia import svc_mia
from utils import batch_channels_last, forward_precision, temporarily_eval

PARTS = ("retain", "forget", "val", "test")
# The parts the tuning criterion reads: the training pool only (docs/evaluation.md, "Selection metrics").
SELECTION_PARTS = ("retain", "forget", "val")
GAP_METRICS = ("UA", "RA", "TA", "MIA_efficacy")
VAL_GAP_METRICS = ("UA", "RA", "VA", "MIA_efficacy_val")


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
    accuracy: dict[str, float]             # per evaluated part (no "test" in a selection-only evaluation)
    svc: dict[str, float]                  # five SVC fractions of forget samples called non-member ({} without test)
    forget_predictions: np.ndarray         # argmax on the forget set, aligned with split.forget
    forget_logits: torch.Tensor | None = field(default=None, repr=False)
    test_logits: torch.Tensor | None = field(default=None, repr=False)
    selection: dict[str, float] = field(default_factory=dict)   # VA, MIA_efficacy_val: from the training pool only
    outputs: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)

    @property
    def metrics(self) -> dict[str, float]:
        return {
            "UA": 100.0 - self.accuracy["forget"], "RA": self.accuracy["retain"], "TA": self.accuracy["test"],
            "MIA_efficacy": 100.0 * self.svc["confidence"],
        }

    @property
    def has_test(self) -> bool:
        return "test" in self.accuracy

    @property
    def selection_metrics(self) -> dict[str, float]:
        """UA, RA, VA and (when the attack ran) MIA_efficacy_val: the metrics the tuning criterion reads."""
        return {"UA": 100.0 - self.accuracy["forget"], "RA": self.accuracy["retain"], **self.selection}


def selection_val_mask(labels: torch.Tensor, split) -> torch.Tensor:
    """The validation samples behind VA and MIA_efficacy_val: all of them, except the forgotten class in class-wise
    forgetting, which the test set drops too (VA then plays TA's part on samples the table never reports)."""
    if split is not None and getattr(split, "scenario", None) == "classwise":
        return labels != split.class_to_replace
    return torch.ones(len(labels), dtype=torch.bool)


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * float((logits.argmax(1) == labels).double().mean()) if len(labels) else float("nan")


def evaluate_model(model: torch.nn.Module, data, with_mia: bool = True, amp: str = "off",
                   parts: tuple[str, ...] = PARTS,
                   known: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> Evaluation:
    """Evaluate on every part of a `SplitData`. MIA-Efficacy follows upstream (`mia_against_test_set`): shadow
    members = the first |test| retain samples in stored order, shadow non-members = the test set, targets = the forget
    set (all unaugmented).
    `amp`: precision of the forward passes (`--amp`); the metrics themselves are computed in float64 on the CPU.

    Always computed too, from the training pool alone: VA (accuracy on the validation samples of
    `selection_val_mask`) and MIA_efficacy_val (the same attack on the `confidence` feature with those validation
    samples as shadow non-members and as many first retain samples as shadow members). `parts=SELECTION_PARTS` leaves
    the test set out entirely (no TA, no MIA-Efficacy: the tuning's per-epoch curves). `known`: logits and labels
    of some parts already computed for this very model (the last epoch's evaluation); only the others are predicted."""
    missing = [part for part in SELECTION_PARTS if part not in parts]
    if missing or any(part not in PARTS for part in parts):
        raise ValueError(f"evaluate_model: parts must hold {', '.join(SELECTION_PARTS)} (and optionally test); "
                         f"got {', '.join(parts)}")
    known = known or {}
    outputs = {part: known[part] if part in known else predict(model, data.eval_loader(part), amp) for part in parts}
    accuracy = {part: _accuracy(logits, labels) for part, (logits, labels) in outputs.items()}
    val_logits, val_labels = outputs["val"]
    keep = selection_val_mask(val_labels, getattr(data, "split", None))
    selection = {"VA": _accuracy(val_logits[keep], val_labels[keep])}
    svc = {}
    if with_mia:
        probs = {part: (torch.softmax(logits.double(), 1), labels) for part, (logits, labels) in outputs.items()}
        if "test" in outputs:
            svc = mia_against_test_set(probs)
        selection["MIA_efficacy_val"] = validation_mia(probs, keep)
    return Evaluation(accuracy=accuracy, svc=svc, forget_predictions=outputs["forget"][0].argmax(1).numpy(),
                      forget_logits=outputs["forget"][0], test_logits=outputs["test"][0] if "test" in outputs else None,
                      selection=selection, outputs=outputs)


def mia_against_test_set(probs: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """Upstream's SVC attack (every feature, fractions in [0, 1]): shadow members = the first n retain samples in stored
    order, shadow non-members = the first n test samples, targets = the forget set, n = min(|test|, |retain|).
    Upstream's n is |test|, which its retain sets (40,000+ CIFAR images against 10,000 test ones) always exceed, and on
    the embedded data sets too; the min only matters for a small retain set (a --train_subset run), where more
    non-members than members would make the SVC call every confident sample a non-member: MIA-Efficacy 100 for the
    original model as for Retrain."""
    n_shadow = min(len(probs["test"][1]), len(probs["retain"][1]))
    shadow_in = (probs["retain"][0][:n_shadow], probs["retain"][1][:n_shadow])
    shadow_out = (probs["test"][0][:n_shadow], probs["test"][1][:n_shadow])
    return svc_mia(shadow_train=shadow_in, shadow_test=shadow_out, target_train=None, target_test=probs["forget"])


def validation_mia(probs: dict[str, tuple[torch.Tensor, torch.Tensor]], keep: torch.Tensor) -> float:
    """MIA-Efficacy with the validation split as non-members, in %: upstream's attack on the `confidence` feature (the
    one MIA-Efficacy reads), fit on the first n retain samples (members) and the n kept validation samples
    (non-members), applied to the forget set. NaN when no validation sample is kept or the forget set is empty."""
    val_probs, val_labels = probs["val"][0][keep], probs["val"][1][keep]
    n_shadow = len(val_labels)
    if n_shadow == 0 or len(probs["forget"][1]) == 0 or len(probs["retain"][1]) == 0:
        return float("nan")
    shadow_in = (probs["retain"][0][:n_shadow], probs["retain"][1][:n_shadow])
    fraction = svc_mia(shadow_train=shadow_in, shadow_test=(val_probs, val_labels), target_train=None,
                       target_test=probs["forget"], features=("confidence",))["confidence"]
    return 100.0 * fraction


def avg_gap(method: dict[str, float], retrain: dict[str, float], keys: tuple[str, ...] = GAP_METRICS) -> float:
    """Mean absolute gap over `keys` (default UA, RA, TA and MIA-Efficacy; RTE excluded), in %."""
    return float(np.mean([abs(method[k] - retrain[k]) for k in keys]))


def val_gap(method: dict[str, float], retrain: dict[str, float]) -> float:
    """The validation gap the tuning criterion minimises: mean |method - Retrain| over UA, RA, VA and
    MIA_efficacy_val, in % (Avg. Gap with the validation split in place of the test set)."""
    return avg_gap(method, retrain, VAL_GAP_METRICS)


def compare_to_retrain(method: Evaluation, retrain: Evaluation) -> dict[str, float]:
    """rUA = forget accuracy minus Retrain's; agreement = % of forget samples with Retrain's prediction; Avg. Gap (when
    both evaluations hold the test set); val_gap (when both ran the validation attack)."""
    if len(method.forget_predictions) != len(retrain.forget_predictions):
        raise ValueError("the Retrain reference was evaluated on another forget set")
    agreement = 100.0 * float(np.mean(method.forget_predictions == retrain.forget_predictions))
    comparison = {"rUA": method.accuracy["forget"] - retrain.accuracy["forget"], "agreement": agreement}
    if method.has_test and retrain.has_test:
        comparison["avg_gap"] = avg_gap(method.metrics, retrain.metrics)
    ours, theirs = method.selection_metrics, retrain.selection_metrics
    if all(k in ours and k in theirs for k in VAL_GAP_METRICS):
        comparison["val_gap"] = val_gap(ours, theirs)
    return comparison
