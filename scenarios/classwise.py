"""Class-wise forgetting: a whole class leaves the training split (and the test set)."""
from __future__ import annotations

from scenarios import Scenario, register_scenario

CLASSWISE_CLASS = 0  # upstream's default --class_to_replace; the same class for every seed

register_scenario(Scenario(
    "classwise", f"class-wise forgetting: the whole of class {CLASSWISE_CLASS} (it also leaves the test set)",
    lambda settings, train_size: {"class_to_replace": settings.forget_class}))
