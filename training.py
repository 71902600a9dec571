"""The training loop shared by the original model, the Retrain reference and the attack reference models.

SGD with momentum and weight decay, step decay (MultiStepLR semantics: lr * 0.1^(milestones passed), stepped per epoch),
optional linear warm-up, best-by-validation copy, and an exact resume: the last checkpoint holds the model, the optimiser
state, the epoch, the history and the state of the run-owned shuffling generator, so a resumed run ends with the same
weights as an uninterrupted one.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dataset import SplitData, TensorLoader
from utils import (DivergenceError, Stopwatch, UserError, atomic_torch_save, load_checkpoint, make_generator,
                   pyplot, save_figure, temporarily_eval)


@dataclass
class TrainRecipe:
    epochs: int = 182
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 256
    milestones: tuple[int, ...] = (91, 136)
    gamma: float = 0.1
    warmup: int = 0

    def lr_at(self, epoch: int) -> float:
        """Learning rate of a 0-based epoch."""
        if self.warmup and epoch < self.warmup:
            return self.lr * (epoch + 1) / self.warmup
        return self.lr * self.gamma ** sum(epoch >= m for m in self.milestones)


def parse_milestones(text: str | None) -> tuple[int, ...]:
    if text is None or str(text).strip() == "":
        return ()
    try:
        values = tuple(int(v) for v in str(text).split(",") if v.strip())
    except ValueError as exc:
        raise UserError(f"--decreasing_lr '{text}' is not a comma-separated list of epochs (e.g. 91,136)") from exc
    if any(v < 0 for v in values):
        raise UserError(f"--decreasing_lr '{text}' has a negative epoch; epochs are >= 0")
    return values


@dataclass
class TrainResult:
    model: torch.nn.Module          # final weights
    best_state: dict                # state_dict of the best-by-validation epoch
    best_epoch: int
    best_val: float
    history: dict = field(default_factory=dict)  # lists per epoch: train_loss, train_acc, val_acc, lr
    seconds: float = 0.0


def make_optimizer(model: torch.nn.Module, recipe: TrainRecipe) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)


@torch.no_grad()
def accuracy_of(model: torch.nn.Module, loader: TensorLoader) -> float:
    """Top-1 accuracy in % (eval mode, mode restored)."""
    correct = total = 0
    with temporarily_eval(model):
        for x, y in loader:
            correct += (model(x).argmax(1) == y).sum().item()
            total += len(y)
    return 100.0 * correct / max(total, 1)


def train_one_epoch(model: torch.nn.Module, loader: TensorLoader, optimizer: torch.optim.Optimizer) -> tuple[float, float]:
    """One pass of cross-entropy SGD; returns (mean loss, accuracy %)."""
    model.train()
    loss_sum = torch.zeros((), device=loader.labels.device)
    correct = torch.zeros((), device=loader.labels.device, dtype=torch.long)
    for x, y in loader:
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach() * len(y)
        correct += (logits.detach().argmax(1) == y).sum()
    n = max(loader.num_samples, 1)
    return loss_sum.item() / n, 100.0 * correct.item() / n


def train_model(model: torch.nn.Module, data: SplitData, recipe: TrainRecipe, seed: int, part: str = "train",
                last_checkpoint: str | Path | None = None, resume: bool = False, metadata: dict | None = None,
                on_epoch: Callable[[int, dict], None] | None = None, progress: bool = True,
                desc: str = "train") -> TrainResult:
    """Train `model` on `data.<part>` with `recipe`; shuffles and augmentation draw from a generator seeded by `seed`.

    When `last_checkpoint` is given it is rewritten (atomically) after every epoch, and `resume=True` continues from it.
    `on_epoch(epoch, stats)` receives 1-based epochs and the stats of that epoch.
    """
    generator = make_generator(seed)
    optimizer = make_optimizer(model, recipe)
    history = {"train_loss": [], "train_acc": [], "val_acc": [], "lr": []}
    best_state, best_val, best_epoch, start_epoch = copy.deepcopy(model.state_dict()), -1.0, 0, 0
    if resume and last_checkpoint and Path(last_checkpoint).is_file():
        state = load_checkpoint(last_checkpoint)
        if "optimizer" not in state or "generator" not in state:
            raise UserError(f"'{last_checkpoint}' is not a resumable training checkpoint (no optimizer/generator state)")
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        history = {k: list(v) for k, v in state["history"].items()}
        best_state, best_val, best_epoch = state["best_state_dict"], state["best_val"], state["best_epoch"]
        start_epoch = int(state["epoch"])
        print(f"resuming {desc} from epoch {start_epoch} of {recipe.epochs} ({last_checkpoint})")

    train_loader = data.train_loader(part, generator, batch_size=recipe.batch_size)
    val_loader = data.eval_loader("val") if len(data.split.val) else None
    watch = Stopwatch(data.device)
    bar = tqdm(range(start_epoch, recipe.epochs), desc=desc, disable=None if progress else True, leave=False,
               dynamic_ncols=True)
    for epoch in bar:
        for group in optimizer.param_groups:
            group["lr"] = recipe.lr_at(epoch)
        with watch:
            loss, acc = train_one_epoch(model, train_loader, optimizer)
        if not math.isfinite(loss):
            raise DivergenceError(f"training diverged at epoch {epoch + 1} (loss {loss})", epoch + 1)
        val_acc = accuracy_of(model, val_loader) if val_loader is not None else acc
        for key, value in zip(history, (loss, acc, val_acc, recipe.lr_at(epoch))):
            history[key].append(value)
        if val_acc >= best_val:  # ties: the later epoch, after more LR decay
            best_val, best_epoch, best_state = val_acc, epoch + 1, copy.deepcopy(model.state_dict())
        bar.set_postfix(loss=f"{loss:.3f}", acc=f"{acc:.1f}", val=f"{val_acc:.1f}")
        if last_checkpoint:
            atomic_torch_save(last_checkpoint, {
                **(metadata or {}), "state_dict": model.state_dict(), "optimizer": optimizer.state_dict(),
                "generator": generator.get_state(), "epoch": epoch + 1, "history": history,
                "best_state_dict": best_state, "best_val": best_val, "best_epoch": best_epoch,
            })
        if on_epoch:
            on_epoch(epoch + 1, {"train_loss": loss, "train_acc": acc, "val_acc": val_acc, "lr": recipe.lr_at(epoch)})
    return TrainResult(model=model, best_state=best_state, best_epoch=best_epoch, best_val=best_val, history=history,
                       seconds=watch.seconds)


def plot_history(history: dict, path: str | Path, title: str = "") -> Path:
    """Training curve (loss and accuracies per epoch), written atomically as PNG."""
    epochs = range(1, len(history["train_loss"]) + 1)
    fig, (ax_loss, ax_acc) = pyplot().subplots(1, 2, figsize=(9, 3.5))
    ax_loss.plot(epochs, history["train_loss"], label="train loss")
    ax_loss.set_xlabel("epoch"), ax_loss.set_ylabel("cross-entropy"), ax_loss.legend()
    ax_acc.plot(epochs, history["train_acc"], label="train acc")
    ax_acc.plot(epochs, history["val_acc"], label="val acc")
    ax_acc.set_xlabel("epoch"), ax_acc.set_ylabel("accuracy (%)"), ax_acc.legend()
    fig.suptitle(title)
    return save_figure(fig, path)
