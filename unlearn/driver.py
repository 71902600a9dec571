"""The shared unlearning driver: setup, epochs, finish; RTE timing; divergence guard; per-epoch callback.

RTE counts only the method's own work (setup, epochs, finish), device-synchronised; the per-epoch callback (used for
evaluation and tracking) runs outside the timer.

The divergence guard looks at the whole state of the model, parameters and buffers: a huge step can leave finite
weights but an infinite BatchNorm running variance, and such a model predicts garbage in eval mode just the same.
It also looks at what the model computes: weights can all be finite and still so large (1e20) that the logits on a
fixed probe batch of forget and retain images are not; that epoch counts as diverged too.
It runs once per epoch, like every read of a device value: the methods keep their statistics (losses, kept fractions)
on the device during the epoch and return them as floats at its end, so a GPU never waits for the host between steps.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from dataset import SplitData, to_unit_float
from unlearn.registry import UnlearnMethod
from utils import (
    DivergenceError,
    Stopwatch,
    UserError,
    batch_channels_last,
    forward_precision,
    temporarily_eval,
    to_channels_last,
)

# Returns True to end the run after this epoch (a tuning trial on a plateau, evaluation.selection.PlateauStop).
EpochCallback = Callable[[int, torch.nn.Module, dict, float], bool | None]


@dataclass
class UnlearnOutcome:
    model: torch.nn.Module
    rte_seconds: float
    epochs_run: int
    epoch_stats: list[dict] = field(default_factory=list)


def state_is_finite(model: torch.nn.Module) -> bool:
    """True when every floating-point parameter and buffer is finite.

    A single host sync per call, instead of one `bool()` per tensor, which would stall a GPU dozens of times per
    epoch. The largest magnitude of each tensor is inf or NaN exactly when the tensor holds one (both survive `abs`
    and `max`); the grouped (`_foreach`) kernels take a third of the time of one `isfinite` per tensor, which counts
    on small models, where this runs after every epoch of every cell.
    """
    tensors = [t.detach() for t in (*model.parameters(), *model.buffers()) if t.is_floating_point() and t.numel()]
    if not tensors:
        return True
    peaks = torch._foreach_max(torch._foreach_abs(tensors))
    if len({peak.dtype for peak in peaks}) > 1:  # stack needs one dtype; float64 holds every float exactly
        peaks = [peak.double() for peak in peaks]
    return bool(torch.isfinite(torch.stack(peaks)).all())


def copy_state(model: torch.nn.Module, into: dict | None = None) -> dict:
    """A copy of `model.state_dict()`, written into the tensors of `into` (an earlier copy) when its names, shapes,
    dtypes and devices still match: bitwise the same as `copy.deepcopy`, without allocating every epoch."""
    state = model.state_dict()
    if into is None or list(into) != list(state) or any(
            (mine.shape, mine.dtype, mine.device) != (theirs.shape, theirs.dtype, theirs.device)
            for mine, theirs in zip(into.values(), state.values())):
        return copy.deepcopy(state)
    with torch.no_grad():
        for mine, theirs in zip(into.values(), state.values()):
            mine.copy_(theirs)
    return into


def _loss_is_finite(loss: object) -> bool:
    return loss is None or math.isfinite(float(loss))


PROBE_SIZE = 64  # samples per part (forget, retain) whose outputs the guard checks after every epoch


def output_probe(data: SplitData | None) -> torch.Tensor | None:
    """A fixed batch of unaugmented forget and retain images: finite weights can still give inf/NaN logits (GA that
    ran away left weights near 1e20), and such a model is as useless as one with inf weights. None without data."""
    if data is None:
        return None
    parts = [data.tensors(part)[0][:PROBE_SIZE] for part in ("forget", "retain")]
    images = torch.cat([part for part in parts if len(part)])
    return to_unit_float(images) if len(images) else None


@torch.no_grad()
def outputs_are_finite(model: torch.nn.Module, probe: torch.Tensor | None, amp: str = "off") -> bool:
    """True when the model's eval-mode logits on `probe` are all finite (one host sync; the mode is restored)."""
    if probe is None:
        return True
    with temporarily_eval(model), forward_precision(amp, probe.device):
        return bool(torch.isfinite(model(batch_channels_last(probe, amp))).all())


def run_unlearning(method: UnlearnMethod, epochs: int, on_epoch: EpochCallback | None = None,
                   progress: bool = True) -> UnlearnOutcome:
    """Run `method` for `epochs` epochs (one pass for one-shot methods).

    `on_epoch(epoch, eval_model, stats, rte_so_far)` is called after every epoch, outside the timer; when it returns
    True the run ends there, without `finish()` (only a horizon-independent method may be stopped early: its epoch e
    is then the model a fresh e-epoch run gives, tests/test_horizon.py). A non-finite
    loss, a non-finite parameter or buffer, or non-finite logits on the probe batch (`output_probe`) stop the run: the
    last state that passed all three checks is restored and DivergenceError(epoch) is raised. A model that is not
    finite to begin with is a UserError, raised before any work.
    """
    model = to_channels_last(method.model, method.ctx.amp)  # CUDA with --amp bf16 only; also checks --amp
    if not state_is_finite(model):
        raise UserError(f"the model given to {method.name} already has non-finite (inf/NaN) weights or BatchNorm "
                        f"statistics; unlearning needs a finite model: check the --mask checkpoint")
    watch = Stopwatch(method.ctx.device)
    epochs = 1 if method.one_shot else epochs
    stats_per_epoch: list[dict] = []
    epochs_run = 0
    with watch:
        method.setup()
    last_finite = copy_state(model)  # after setup: setup may change the model (BE's shadow class)
    probe = output_probe(method.ctx.data)
    bar = tqdm(range(1, epochs + 1), desc=f"unlearn {method.name}", disable=None if progress else True, leave=False,
               dynamic_ncols=True)
    for epoch in bar:
        with watch:
            stats = dict(method.run_epoch(epoch) or {})
            if epoch == epochs:
                method.finish()
        loss = stats.get("loss")
        if not _loss_is_finite(loss) or not state_is_finite(model):
            model.load_state_dict(last_finite)
            raise DivergenceError(
                f"{method.name} diverged at epoch {epoch} (loss {loss}); the last finite weights and BatchNorm "
                f"statistics (epoch {epoch - 1}) were kept; lower --unlearn_lr", epoch)
        if not outputs_are_finite(method.evaluation_model(), probe, method.ctx.amp):
            model.load_state_dict(last_finite)
            raise DivergenceError(
                f"{method.name} diverged at epoch {epoch}: finite weights but non-finite outputs; the last weights "
                f"with finite outputs (epoch {epoch - 1}) were kept; lower --unlearn_lr", epoch)
        last_finite = copy_state(model, into=last_finite)
        stats_per_epoch.append(stats)
        epochs_run = epoch
        if stats:
            bar.set_postfix({k: f"{v:.3g}" for k, v in stats.items() if isinstance(v, float)})
        if on_epoch and on_epoch(epoch, method.evaluation_model(), stats, watch.seconds):
            break
    bar.close()
    return UnlearnOutcome(model=model, rte_seconds=watch.seconds, epochs_run=epochs_run, epoch_stats=stats_per_epoch)
