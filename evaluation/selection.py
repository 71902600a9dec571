"""The tuning criteria: one evaluation's score under each selection rule, read from the training pool only, and the
plateau rule that ends a tuning trial once its scores stop improving.

Scores are in accuracy points (lower is better):

- `gap`: the validation gap to Retrain (`val_gap`: mean |method - Retrain| over UA, RA, VA and MIA_efficacy_val).
- `retrain_free`: |forget accuracy - target| + (100 - retain accuracy), where the target is the validation accuracy
  for random forgetting (forget samples should look like unseen ones) and 0 for class-wise forgetting (a model that
  never saw a class does not predict it).

Neither reads TA, MIA_efficacy or avg_gap: the held-out table reports those on the test set.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

CRITERIA = ("gap", "retrain_free")


def selection_score(entry: dict, scenario: str, criterion: str) -> float:
    """The criterion's score of one evaluation (a curve entry or a final result)."""
    if criterion == "gap":
        if "val_gap" not in entry:
            raise ValueError("a tuning cell's evaluation has no val_gap (the validation gap to Retrain): it ran "
                             "without a Retrain reference or before the gap rule read the validation split; rerun it")
        return float(entry["val_gap"])
    if criterion != "retrain_free":
        raise ValueError(f"unknown selection criterion {criterion!r}; known: {', '.join(CRITERIA)}")
    accuracy = entry["accuracy"]
    target = accuracy["val"] if scenario == "random" else 0.0
    return abs(accuracy["forget"] - target) + max(0.0, 100.0 - accuracy["retain"])


def available_scores(entry: dict, scenario: str) -> dict[str, float]:
    """Criterion -> score for every criterion the entry can be scored by (`gap` needs a Retrain reference)."""
    return {criterion: selection_score(entry, scenario, criterion) for criterion in CRITERIA
            if criterion != "gap" or "val_gap" in entry}


@dataclass
class PlateauStop:
    """Ends a run once no selection score has improved by more than `tolerance` points for `patience` epochs.

    Each criterion keeps its best score and the epoch of its last improvement larger than the tolerance; a smaller
    improvement lowers the best score without restarting the count, so a curve that drifts down by noise-sized steps
    still ends. `update` returns True when every criterion the entries carry has waited `patience` epochs. A tuning
    trial stops there: its later epochs would be candidates only if a score came back down by more than the tolerance
    after `patience` epochs without doing so (docs/tuning.md measures how rarely that changed a choice)."""

    patience: int
    tolerance: float
    scenario: str
    best: dict[str, tuple[float, int]] = field(default_factory=dict)  # criterion -> (best score, improved at epoch)

    def update(self, epoch: int, entry: dict) -> bool:
        for criterion, score in available_scores(entry, self.scenario).items():
            if not math.isfinite(score):
                continue
            best = self.best.get(criterion)
            if best is None or score < best[0] - self.tolerance:
                self.best[criterion] = (score, epoch)
            elif score < best[0]:
                self.best[criterion] = (score, best[1])
        return bool(self.best) and all(epoch - since >= self.patience for _, since in self.best.values())
