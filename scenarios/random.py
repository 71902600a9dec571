"""Random forgetting: forget_fraction of the training split, drawn across all classes."""
from __future__ import annotations

from scenarios import Scenario, forget_count, register_scenario

register_scenario(Scenario(
    "random", "random forgetting: forget_fraction of the training split, drawn across all classes",
    lambda settings, train_size: {"class_to_replace": -1,
                                  "num_indexes_to_replace": forget_count(settings, train_size)}))
