"""The shared unlearning driver: setup, epochs, finish; RTE timing; divergence guard; per-epoch callback.

RTE counts only the method's own work (setup, epochs, finish), device-synchronised; the per-epoch callback (used for
evaluation and tracking) runs outside the timer.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from tqdm.auto import tqdm

from unlearn.registry import UnlearnMethod
from utils import DivergenceError, Stopwatch

EpochCallback = Callable[[int, torch.nn.Module, dict, float], None]


@dataclass
class UnlearnOutcome:
    model: torch.nn.Module
    rte_seconds: float
    epochs_run: int
    epoch_stats: list[dict] = field(default_factory=list)


def _all_finite(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def run_unlearning(method: UnlearnMethod, epochs: int, on_epoch: EpochCallback | None = None,
                   progress: bool = True) -> UnlearnOutcome:
    """Run `method` for `epochs` epochs (one pass for one-shot methods).

    `on_epoch(epoch, eval_model, stats, rte_so_far)` is called after every epoch, outside the timer. A non-finite loss or
    non-finite weights stop the run: the last finite weights are restored and DivergenceError(epoch) is raised.
    """
    model = method.model
    watch = Stopwatch(method.ctx.device)
    epochs = 1 if method.one_shot else epochs
    stats_per_epoch: list[dict] = []
    with watch:
        method.setup()
    last_finite = copy.deepcopy(model.state_dict())  # after setup: setup may change the model (BE's shadow class)
    bar = tqdm(range(1, epochs + 1), desc=f"unlearn {method.name}", disable=None if progress else True, leave=False,
               dynamic_ncols=True)
    for epoch in bar:
        with watch:
            stats = dict(method.run_epoch(epoch) or {})
            if epoch == epochs:
                method.finish()
        loss = stats.get("loss")
        if (loss is not None and not math.isfinite(loss)) or not _all_finite(model):
            model.load_state_dict(last_finite)
            raise DivergenceError(
                f"{method.name} diverged at epoch {epoch} (loss {loss}); the last finite weights (epoch {epoch - 1}) "
                f"were kept; lower --unlearn_lr", epoch)
        last_finite = copy.deepcopy(model.state_dict())
        stats_per_epoch.append(stats)
        if stats:
            bar.set_postfix({k: f"{v:.3g}" for k, v in stats.items() if isinstance(v, float)})
        if on_epoch:
            on_epoch(epoch, method.evaluation_model(), stats, watch.seconds)
    return UnlearnOutcome(model=model, rte_seconds=watch.seconds, epochs_run=epochs, epoch_stats=stats_per_epoch)
