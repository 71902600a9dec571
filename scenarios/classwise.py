"""Class-wise forgetting: a whole class leaves the training split (and the test set).

Which class. A single run forgets `--class_to_replace` (upstream's default 0). The benchmark forgets one class per
seed, so that each seed is an independent replication (its own initialisation, its own class): seed s forgets
`pool[(s - 1) mod len(pool)]` of the ascending class pool (`forget_class_of`), a rotation that visits every class of the
pool once before any class comes back. The pool is `benchmark.py --forget_classes`, by default every class that is not
a tuning class (`RESERVED_CLASSES`, the default `--tune-classes`: class 3), so that no reported cell forgets a class its
hyper-parameters were tuned on. `benchmark.py --forget_class N` forgets class N for every seed instead.
"""
from __future__ import annotations

from collections.abc import Iterable

from scenarios import Scenario, register_scenario

RESERVED_CLASSES = (3,)  # the default tuning class of `benchmark.py --tune`: never drawn by default


def class_pool(num_classes: int, reserved: Iterable[int] = RESERVED_CLASSES) -> tuple[int, ...]:
    """Every class of a `num_classes`-class dataset that is not reserved, ascending (the default draw pool)."""
    excluded = set(reserved)
    return tuple(c for c in range(num_classes) if c not in excluded)


def forget_class_of(seed: int, pool: Iterable[int]) -> int:
    """The class seed `seed` forgets: the ((seed - 1) mod n)-th smallest of the n pool classes (seeds 1..n get n
    different classes; the order the pool was given in does not matter)."""
    ordered = sorted(set(pool))
    if not ordered:
        raise ValueError("the class pool is empty")
    return ordered[(seed - 1) % len(ordered)]


register_scenario(Scenario(
    "classwise", "class-wise forgetting: a whole class (it also leaves the test set); the benchmark forgets one class "
                 "per seed, drawn from the classes nobody tuned on",
    lambda settings, train_size: {"class_to_replace": settings.forget_class}))
