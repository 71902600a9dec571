"""The epoch-wise SGD baselines of Unlearn-Sparse / SalUn: FT, GA, RL, FT_l1 (alias FT_prune), boundary_expanding
(BE), boundary_shrink (BS), SalUn and SalUn_soft (alias RL_proximal). docs/methods.md describes each; docs/upstream.md
lists where this project departs from upstream's code.

Shared machinery (:class:`SGDMethod`): SGD(lr, momentum, weight decay) with a MultiStepLR-equivalent schedule on
`decreasing_lr` (gamma 0.1, stepped per epoch), the model in train mode, shuffled loaders from the run's generator,
train-time augmentation per `augment` (always / first_epoch / never), and optional weight masks (SalUn's saliency
mask, or any mask file given with `mask_path`) with two semantics:

* ``freeze`` (default): masked-out weights keep the original model's values bit for bit. Their gradient is zeroed, and
  after every optimiser step their values are restored and their momentum entries zeroed, so neither weight decay
  nor momentum moves them (upstream after its PR #33).
* ``grad_only`` (paper-era): only the gradient is masked; weight decay and momentum still move masked-out weights.

Defaults are the upstream READMEs' CIFAR values (sources in each class). The digits defaults (`tune(..., digits=...)`)
were chosen on digits_noisy (ResNet-18 width 16, the 30-epoch digits recipe, random forgetting of 130 samples): a grid
on seed 1, its best settings re-run on seeds 2 and 3, and the smallest mean Avg. Gap to Retrain kept; for GA, RL and
SalUn only among settings that lower forget accuracy on all three seeds. Plain `digits` shares them. The upstream CIFAR
values barely move this model (GA at lr 1e-4 leaves forget accuracy at 100 %), and GA is chaotic here (lr 2e-3
collapses on 2 of 3 seeds).
"""
from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from dataset import TensorLoader
from models import get_classifier, set_classifier
from training import parse_milestones
from unlearn.common import (
    ALPHA,
    AUGMENT,
    BATCH_SIZE,
    DECREASING_LR,
    EPOCHS,
    LR,
    MASK_PATH,
    MAX_TUNED_EPOCHS,
    MOMENTUM,
    RANDOM_LABELS,
    WEIGHT_DECAY,
    Precision,
    accumulate_gradients,
    augment_for_epoch,
    load_mask_file,
    require_mask_file,
    save_mask,
    statistics_loader,
)
from unlearn.hparams import HParam, searched, tune, without
from unlearn.registry import UnlearnMethod, register_alias, register_method
from utils import UserError, temporarily_eval

MASK_SEMANTICS = ("freeze", "grad_only")
RL_SCHEDULES = ("mixed", "sequential")
LR_DECAY = 0.1            # MultiStepLR gamma (upstream)
FGSM_STEP = 0.1           # BS: FGSM step on [0, 1] images (upstream)

MASK_SEMANTICS_HP = HParam("mask_semantics", str, "freeze",
                           "masked-out weights: freeze = keep the original values; grad_only = paper-era (weight decay "
                           "and momentum still move them)", choices=MASK_SEMANTICS, paper_era="grad_only")
RL_SCHEDULE = HParam("rl_schedule", str, "mixed",
                     "RL / SalUn schedule: mixed = forget (random labels) and retain shuffled together; sequential = "
                     "a forget pass, then a retain pass", choices=RL_SCHEDULES)
NO_L1_EPOCHS = HParam("no_l1_epochs", int, 0, "FT_l1: trailing epochs without the l1 penalty",
                      options=("--no-l1-epochs",), low=0)
SALUN_RATIO = HParam("salun_ratio", float, 0.5, "SalUn: fraction of the weights kept by the saliency mask", low=0.0,
                     high=1.0, low_open=True)
MASK_RATIO = HParam("mask_ratio", float, 0.5, "SalUn_soft: fraction of the coordinates soft-thresholded at the start",
                    low=0.0, high=1.0, low_open=True)
SALUN_MASK_PATH_HELP = ("SalUn: saliency mask file, reused when it exists, otherwise computed and saved there "
                        "(default: <save_dir>/salun_mask_<ratio>.pt)")
RL_LABELS = HParam("rl_labels", str, "wrong",
                   "RL random labels: wrong = never the true class; uniform = upstream's code",
                   choices=tuple(RANDOM_LABELS), paper_era="uniform")

# ---------------------------------------------------------------------------------------------------------------------
# Helpers (module level so the tests can check them directly)
# ---------------------------------------------------------------------------------------------------------------------

def multistep_lr(base_lr: float, milestones: Iterable[int], epoch: int) -> float:
    """Learning rate of 1-based `epoch` under MultiStepLR(milestones, gamma 0.1) stepped once per epoch."""
    return base_lr * LR_DECAY ** sum((epoch - 1) >= m for m in milestones)


def l1_alpha(alpha: float, epoch: int, epochs: int, no_l1_epochs: int) -> float:
    """FT_l1 coefficient of 1-based `epoch`: alpha * (1 - t / (E - E_no)) for t = epoch - 1 < E - E_no,
    else 0 (the last `no_l1_epochs` epochs are plain FT)."""
    active = epochs - no_l1_epochs
    t = epoch - 1
    return alpha * (1.0 - t / active) if t < active else 0.0


def fgsm_neighbour_labels(frozen: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                          step: float = FGSM_STEP,
                          autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """BS: one FGSM step on the [0, 1] image against the frozen original model, rounded to the 8-bit
    grid; the label is the frozen model's prediction on it ("nearest but incorrect" class, which can equal y).
    `autocast` gives the context of the two forward passes (the run's `--amp`). Returns (labels, adversarial images)."""
    x = images.detach().clone().requires_grad_(True)
    with autocast():
        loss = F.cross_entropy(frozen(x), labels)
    (grad,) = torch.autograd.grad(loss, x)
    adversarial = torch.round(torch.clamp(images + step * grad.sign(), 0.0, 1.0) * 255.0) / 255.0
    with torch.no_grad(), autocast():
        return frozen(adversarial).argmax(1), adversarial


# --- SalUn saliency masks --------------------------------------------------------------------------------------------

def forget_gradient_saliency(model: nn.Module, loader: Iterable,
                             precision: Precision = contextlib.nullcontext) -> dict[str, torch.Tensor]:
    """|sum over forget batches of the gradient of -CE (batch mean)| per parameter, with the model in eval mode and no
    update (SalUn `generate_mask.py` since commit bc74947). Gradients the caller had are cleared."""
    named = list(model.named_parameters())
    with temporarily_eval(model):
        totals, _ = accumulate_gradients(model, loader, [p for _, p in named], lambda out, y: -F.cross_entropy(out, y),
                                         precision=precision)
    return {name: total.abs() for (name, _), total in zip(named, totals)}


def saliency_mask(saliency: dict[str, torch.Tensor], ratio: float) -> dict[str, torch.Tensor]:
    """Keep the int(ratio * total) entries with the largest saliency, ranked globally over all tensors (ties: earlier
    position first, as a stable sort). Returns name -> bool tensor of the parameter's shape."""
    if not 0.0 < ratio <= 1.0:
        raise UserError(f"--salun_ratio must be in (0, 1], got {ratio}")
    flat = torch.cat([s.detach().reshape(-1).float() for s in saliency.values()])
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    keep[torch.argsort(flat, descending=True, stable=True)[: int(ratio * flat.numel())]] = True
    masks, start = {}, 0
    for name, s in saliency.items():
        masks[name] = keep[start:start + s.numel()].reshape(s.shape)
        start += s.numel()
    return masks


# ---------------------------------------------------------------------------------------------------------------------
# Shared SGD machinery
# ---------------------------------------------------------------------------------------------------------------------

class SGDMethod(UnlearnMethod):
    """Base of the epoch-wise baselines. Subclasses implement `train_epoch(epoch)` and call `self.step(loss, n)` per
    batch; `prepare()` runs in `setup` before the optimiser is built (model surgery, frozen copies, masks)."""

    hparams: ClassVar[tuple[HParam, ...]] = (LR, EPOCHS, BATCH_SIZE, MOMENTUM, WEIGHT_DECAY, DECREASING_LR, AUGMENT,
                                             MASK_PATH, MASK_SEMANTICS_HP)
    #: SalUn computes (and saves) the mask when the `mask_path` file is absent; the others only read one.
    computes_missing_mask: ClassVar[bool] = False

    def __init__(self, ctx):
        super().__init__(ctx)
        self.optimizer: torch.optim.SGD | None = None
        self.weight_mask: dict[str, torch.Tensor] | None = None
        self._frozen_values: dict[str, torch.Tensor] = {}
        self._loss_sum = self._count = None
        self.milestones = parse_milestones(self.hp["decreasing_lr"])

    @classmethod
    def check_hparams(cls, hp: Mapping[str, Any]) -> None:
        if "mask_path" in hp and not cls.computes_missing_mask:
            require_mask_file(hp["mask_path"])

    # --- hooks ---------------------------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Work before the optimiser exists (counted in RTE)."""

    def build_weight_mask(self) -> dict[str, torch.Tensor] | None:
        path = self.hp.get("mask_path")  # absent from the hp of methods that refuse masks
        return load_mask_file(path, self.model) if path else None

    def train_epoch(self, epoch: int) -> dict[str, float]:
        raise NotImplementedError

    def after_step(self) -> None:
        """Called after every optimiser step (and the freeze restore)."""

    # --- machinery -----------------------------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.hp["batch_size"]

    @property
    def freezes_masked_weights(self) -> bool:
        return self.weight_mask is not None and self.hp["mask_semantics"] == "freeze"

    def setup(self) -> None:
        self.weight_mask = self.build_weight_mask()
        self.prepare()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=self.hp["lr"], momentum=self.hp["momentum"],
                                         weight_decay=self.hp["weight_decay"])
        if self.freezes_masked_weights:
            params = dict(self.model.named_parameters())
            self._frozen_values = {n: params[n].detach().clone() for n in self.weight_mask}
        self._params_by_name = dict(self.model.named_parameters())

    def learning_rate(self, epoch: int) -> float:
        return multistep_lr(self.hp["lr"], self.milestones, epoch)

    def augment_for(self, epoch: int) -> bool | None:
        """None = the run's setting (the dataset recipe, off with --no-aug); False = no augmentation."""
        return augment_for_epoch(self.hp["augment"], epoch)

    def loader(self, part: str, epoch: int, labels: torch.Tensor | None = None) -> TensorLoader:
        return self.ctx.data.train_loader(part, self.ctx.generator, batch_size=self.batch_size,
                                          augment=self.augment_for(epoch), labels=labels)

    def tensor_loader(self, images: torch.Tensor, labels: torch.Tensor, epoch: int) -> TensorLoader:
        """Shuffled loader over arbitrary tensors (RL's mixed forget + retain set) with the same augmentation rule."""
        data = self.ctx.data
        use = self.augment_for(epoch)
        use = data.augment if use is None else use
        return TensorLoader(images, labels, self.batch_size, shuffle=True,
                            augment=data.data.augment if use else "none", generator=self.ctx.generator)

    def cross_entropy_step(self, x: torch.Tensor, targets: torch.Tensor, ascend: bool = False) -> None:
        """One step on CE(model(x), targets) (on -CE with `ascend`), the forward pass under the run's `--amp`."""
        with self.autocast():
            loss = F.cross_entropy(self.model(x), targets)
        self.step(-loss if ascend else loss, len(targets))

    def step(self, loss: torch.Tensor, n: int) -> None:
        """Backward, mask, SGD step, freeze restore; accumulates the sample-weighted loss of the epoch on the device
        (read once per epoch in `run_epoch`)."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        mask = self.weight_mask
        if mask is not None:
            with torch.no_grad():
                for name, m in mask.items():
                    grad = self._params_by_name[name].grad
                    if grad is not None:
                        grad.mul_(m)
        self.optimizer.step()
        if self.freezes_masked_weights:
            with torch.no_grad():
                for name, m in mask.items():
                    param = self._params_by_name[name]
                    param.copy_(torch.where(m, param, self._frozen_values[name]))
                    buffer = self.optimizer.state.get(param, {}).get("momentum_buffer")
                    if buffer is not None:
                        buffer.mul_(m)
        self.after_step()
        self._loss_sum += loss.detach().double() * n
        self._count += n

    def run_epoch(self, epoch: int) -> dict[str, float]:
        lr = self.learning_rate(epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        device = self.ctx.device
        self._loss_sum, self._count = torch.zeros((), dtype=torch.float64, device=device), 0
        extra = self.train_epoch(epoch) or {}
        loss = float(self._loss_sum.item() / self._count) if self._count else 0.0
        return {"loss": loss, "lr": lr, **extra}


# ---------------------------------------------------------------------------------------------------------------------
# Methods
# ---------------------------------------------------------------------------------------------------------------------

@register_method
class FT(SGDMethod):
    """Fine-tuning on the retain set (catastrophic forgetting of D_f). Upstream README: lr 0.01, 10 epochs."""

    name = "FT"
    summary = "fine-tune on the retain set with cross-entropy (SGD)"
    hparams = tune(SGDMethod.hparams, lr=0.01, epochs=10, digits={"lr": 0.1, "epochs": 10})
    hparams = searched(hparams, lr=("log", 3e-3, 3.0), epochs=("per_epoch", MAX_TUNED_EPOCHS))
    supports_grad_mask = False
    mask_unsupported_reason = ("FT has no forget gradient (it only descends the retain loss), "
                               "so there is no second gradient to mask against")

    def train_epoch(self, epoch: int) -> dict[str, float]:
        for x, y in self.loader("retain", epoch):
            self.cross_entropy_step(x, y)
        return {}


@register_method
class GA(SGDMethod):
    """Gradient ascent on the forget set with the true labels. Sparse README: lr 1e-4, 5 epochs (the class-wise value;
    maintainers advise a grid over [1e-5, 1e-1] for random forgetting, issue Sparse#5)."""

    name = "GA"
    summary = "gradient ascent on the forget-set cross-entropy (SGD)"
    hparams = tune(SGDMethod.hparams, lr=1e-4, epochs=5, digits={"lr": 3e-3, "epochs": 5})
    hparams = searched(hparams, lr=("log", 3e-5, 0.3), epochs=("per_epoch", MAX_TUNED_EPOCHS))
    supports_grad_mask = False
    mask_unsupported_reason = ("GA has no retain gradient (it only ascends the forget loss), "
                               "so there is no second gradient to mask against")

    def train_epoch(self, epoch: int) -> dict[str, float]:
        for x, y in self.loader("forget", epoch):
            self.cross_entropy_step(x, y, ascend=True)
        return {}


@register_method
class RL(SGDMethod):
    """Random labelling: CE on the forget set with random labels plus CE on the retain set.

    `rl_schedule`: `mixed` (default; labels drawn once per epoch, forget and retain shuffled together, one pass) or
    `sequential` (a pass over D_f with fresh labels per batch, then a pass over D_r). `rl_labels`: `wrong` (default,
    y' != y) or `uniform` (upstream code). No README default for RL alone: lr 0.01 (the --unlearn_lr default),
    10 epochs.
    """

    name = "RL"
    summary = "random labels on the forget set + cross-entropy on the retain set (SGD)"
    hparams = tune(SGDMethod.hparams + (RL_SCHEDULE, RL_LABELS), lr=0.01, epochs=10,
                   digits={"lr": 0.003, "epochs": 3})
    hparams = searched(hparams, lr=("log", 1e-4, 1.0), epochs=("per_epoch", MAX_TUNED_EPOCHS))
    supports_grad_mask = False
    mask_unsupported_reason = "RL mixes forget and retain samples in one loss (no separate forget and retain gradients)"

    def __init__(self, ctx):
        super().__init__(ctx)
        self.schedule = self.hp["rl_schedule"]
        self.draw_labels = RANDOM_LABELS[self.hp["rl_labels"]]

    def epoch_started(self, epoch: int, steps: int) -> None:
        """Hook: the number of optimiser steps of this epoch is known (SalUn_soft's threshold schedule)."""

    def train_epoch(self, epoch: int) -> dict[str, float]:
        C, gen = self.ctx.num_classes, self.ctx.generator
        if self.schedule == "mixed":
            forget_x, forget_y = self.ctx.data.tensors("forget")
            retain_x, retain_y = self.ctx.data.tensors("retain")
            fake = self.draw_labels(forget_y, C, gen)
            loader = self.tensor_loader(torch.cat([forget_x, retain_x]), torch.cat([fake, retain_y]), epoch)
            self.epoch_started(epoch, len(loader))
            for x, y in loader:
                self.cross_entropy_step(x, y)
        else:
            forget, retain = self.loader("forget", epoch), self.loader("retain", epoch)
            self.epoch_started(epoch, len(forget) + len(retain))
            for x, y in forget:
                self.cross_entropy_step(x, self.draw_labels(y, C, gen))
            for x, y in retain:
                self.cross_entropy_step(x, y)
        return {}


@register_method
class FTL1(SGDMethod):
    """l1-sparse MU: CE on D_r + alpha_t * ||theta||_1 over all parameters, alpha_t decaying linearly to 0
    over the first E - `no_l1_epochs` epochs. README: lr 0.01, 10 epochs, alpha unspecified (third-party scripts
    1e-4)."""

    name = "FT_l1"
    summary = "l1-sparse fine-tuning on the retain set (linearly decaying l1 penalty)"
    hparams = tune(SGDMethod.hparams + (ALPHA.replace(help="FT_l1: coefficient of the l1 penalty at the first epoch"),
                                        NO_L1_EPOCHS),
                   lr=0.01, epochs=10, alpha=1e-4, digits={"lr": 0.1, "epochs": 10, "alpha": 1e-4})
    # alpha stays at its default: the budget is spent on the step size (and the epochs, see horizon_reason).
    hparams = searched(hparams, lr=("log", 3e-3, 3.0), epochs=("per_epoch", MAX_TUNED_EPOCHS))
    supports_grad_mask = False
    mask_unsupported_reason = "FT_l1 has no forget gradient (it only descends the retain loss plus l1)"
    horizon_dependent = True
    horizon_reason = ("alpha_t decays linearly to 0 over the run's E - no_l1_epochs epochs, so epoch e of a longer run "
                      "used a larger l1 penalty than a fresh e-epoch run")

    @classmethod
    def check_hparams(cls, hp: Mapping[str, Any]) -> None:
        super().check_hparams(hp)
        epochs, no_l1 = hp["epochs"], hp["no_l1_epochs"]
        if not no_l1 < epochs:
            raise UserError(f"--no-l1-epochs {no_l1}: must be in [0, {epochs - 1}] for {epochs} unlearning epochs")

    def train_epoch(self, epoch: int) -> dict[str, float]:
        alpha = l1_alpha(self.hp["alpha"], epoch, self.hp["epochs"], self.hp["no_l1_epochs"])
        params = list(self.model.parameters())
        for x, y in self.loader("retain", epoch):
            with self.autocast():
                loss = F.cross_entropy(self.model(x), y)
            if alpha:
                loss = loss + alpha * torch.stack([p.abs().sum() for p in params]).sum()
            self.step(loss, len(y))
        return {"alpha": alpha}


def without_shadow_class(expanded: nn.Linear, num_classes: int) -> nn.Linear:
    """BE's classifier without its shadow row: the same layer object with its weight and bias cut to `num_classes`
    rows (no new nn.Linear, whose initialisation would draw from the global generator)."""
    with torch.no_grad():
        expanded.weight = nn.Parameter(expanded.weight[:num_classes].clone())
        if expanded.bias is not None:
            expanded.bias = nn.Parameter(expanded.bias[:num_classes].clone())
    expanded.out_features = num_classes
    return expanded


@register_method
class BoundaryExpanding(SGDMethod):
    """Boundary expanding: add a shadow class C to the classifier, train with CE on forget batches labelled C, then
    drop the shadow neuron (Chen et al., CVPR'23). The paper-era switch keeps it (upstream), so evaluation
    takes the argmax over C + 1 logits and the saved checkpoint has C + 1 outputs. Third-party scripts: lr 1e-6 to
    5e-6, 10 epochs."""

    name = "boundary_expanding"
    summary = "boundary expanding: forget samples -> an extra shadow class, then drop it"
    hparams = tune(without(SGDMethod.hparams, "mask_path", "mask_semantics"), lr=5e-6, epochs=10,
                   digits={"lr": 5e-6, "epochs": 10})
    hparams = searched(hparams, lr=("log", 1e-6, 1e-2), epochs=("per_epoch", MAX_TUNED_EPOCHS))
    refused_flags = {"mask_path": "its classifier gains a shadow row that no mask file covers"}

    def prepare(self) -> None:
        old = get_classifier(self.model)
        self.num_original_classes = old.out_features
        expanded = nn.Linear(old.in_features, old.out_features + 1, bias=old.bias is not None)
        bound = 1.0 / math.sqrt(old.in_features)  # nn.Linear's default initialisation, from the run's generator
        with torch.no_grad():
            new_row = (torch.rand(1, old.in_features, generator=self.ctx.generator) * 2 - 1) * bound
            expanded.weight.copy_(torch.cat([old.weight.detach().cpu(), new_row]))
            if old.bias is not None:
                new_bias = (torch.rand(1, generator=self.ctx.generator) * 2 - 1) * bound
                expanded.bias.copy_(torch.cat([old.bias.detach().cpu(), new_bias]))
        set_classifier(self.model, expanded)

    def train_epoch(self, epoch: int) -> dict[str, float]:
        for x, y in self.loader("forget", epoch):
            self.cross_entropy_step(x, torch.full_like(y, self.num_original_classes))
        return {}

    def finish(self) -> None:
        finite = bool(torch.stack([torch.isfinite(p).all() for p in self.model.parameters()]).all())  # one read
        if self.ctx.paper_era or not finite:  # non-finite: the driver restores the last finite (C + 1) weights
            return
        expanded = get_classifier(self.model)
        C = self.num_original_classes
        reduced = nn.Linear(expanded.in_features, C, bias=expanded.bias is not None)
        with torch.no_grad():
            reduced.weight.copy_(expanded.weight[:C])
            if expanded.bias is not None:
                reduced.bias.copy_(expanded.bias[:C])
        set_classifier(self.model, reduced)

    def evaluation_model(self) -> nn.Module:
        """Between epochs: a copy without the shadow row, i.e. exactly the model that `finish` would leave now, so the
        curve at epoch e evaluates (and scores) the model a fresh e-epoch run ships (the horizon property). The copy
        draws no random numbers (`without_shadow_class`), so evaluating does not change the run."""
        if self.ctx.paper_era or get_classifier(self.model).out_features == self.ctx.num_classes:
            return self.model
        reduced = copy.deepcopy(self.model)
        set_classifier(reduced, without_shadow_class(get_classifier(reduced), self.ctx.num_classes))
        return reduced


@register_method
class BoundaryShrink(SGDMethod):
    """Boundary shrinking: label each forget image with the frozen original model's prediction on its
    FGSM(0.1) neighbour and train with CE on the clean image. Third-party scripts: lr 1e-6 to 5e-6, 10 epochs."""

    name = "boundary_shrink"
    summary = "boundary shrinking: forget samples -> the original model's label of their FGSM neighbour"
    hparams = tune(SGDMethod.hparams, lr=5e-6, epochs=10, digits={"lr": 2e-4, "epochs": 10})
    hparams = searched(hparams, lr=("log", 1e-8, 3e-3), epochs=("per_epoch", MAX_TUNED_EPOCHS))

    def prepare(self) -> None:
        self.frozen = copy.deepcopy(self.model).eval()
        for p in self.frozen.parameters():
            p.requires_grad_(False)

    def train_epoch(self, epoch: int) -> dict[str, float]:
        changed = torch.zeros((), dtype=torch.long, device=self.ctx.device)  # on the device: read once per epoch
        total = 0
        for x, y in self.loader("forget", epoch):
            neighbour, _ = fgsm_neighbour_labels(self.frozen, x, y, autocast=self.autocast)
            changed += (neighbour != y).sum()
            total += len(y)
            self.cross_entropy_step(x, neighbour)
        return {"relabelled": changed.item() / max(total, 1)}


@register_method
class SalUn(RL):
    """SalUn: RL restricted to the weights most salient for the forget loss.

    The mask keeps the `salun_ratio` fraction (default 0.5) of all weights with the largest |gradient of the forget
    loss| at the original model (eval mode, unaugmented forget data; paper-era: train transform), ranked globally.
    With `mask_path` the file is reused when it exists (this project's files or upstream's `with_<ratio>.pt`) and
    otherwise computed and saved there; without it the mask is saved as `<save_dir>/salun_mask_<ratio>.pt`. Mask
    generation counts in RTE. README: lr 0.013, 10 epochs."""

    name = "SalUn"
    summary = "random labelling restricted to the forget-salient weights (saliency mask)"
    hparams = tune(RL.hparams + (SALUN_RATIO,), lr=0.013, epochs=10, digits={"lr": 0.003, "epochs": 3})
    hparams = tuple(hp.replace(help=SALUN_MASK_PATH_HELP) if hp.name == "mask_path" else hp for hp in hparams)
    hparams = searched(hparams, lr=("log", 1e-4, 1.0), epochs=("per_epoch", MAX_TUNED_EPOCHS))
    computes_missing_mask = True

    @classmethod
    def check_hparams(cls, hp: Mapping[str, Any]) -> None:
        super().check_hparams(hp)
        path = hp["mask_path"]
        if path and Path(path).exists() and not Path(path).is_file():
            raise UserError(f"--mask_path '{path}' is not a file; pass a mask file to reuse, or a new file name to "
                            f"compute the mask and save it there")

    def build_weight_mask(self) -> dict[str, torch.Tensor]:
        path = self.hp["mask_path"]
        if path and Path(path).is_file():
            return load_mask_file(path, self.model)
        ratio = self.hp["salun_ratio"]
        loader = statistics_loader(self.ctx.data, "forget", self.ctx.paper_era, self.batch_size, self.ctx.generator)
        mask = saliency_mask(forget_gradient_saliency(self.model, loader, self.autocast), ratio)
        target = Path(path) if path else (Path(self.ctx.artifacts_dir) / f"salun_mask_{ratio}.pt"
                                          if self.ctx.artifacts_dir is not None else None)
        if target is not None:
            save_mask(target, mask)
            self.ctx.log(f"SalUn: saliency mask keeping {ratio:.0%} of the weights saved to {target}")
        return mask


@register_method
class SalUnSoft(RL):
    """SalUn-soft (upstream `RL_proximal`): RL without a mask; after every step the change since the start of the
    epoch is soft-thresholded at its k-th smallest magnitude, k = int(mask_ratio * (T - (t*L + 1)) / T * n_params)
    (T = E*L steps, t the 0-based epoch), so coordinates that moved little return to their start values.
    `mask_ratio` default 0.5 (project choice); lr 0.013 and 10 epochs as SalUn."""

    name = "SalUn_soft"
    summary = "random labelling with a proximal soft threshold on the weight change (RL_proximal)"
    hparams = tune(without(RL.hparams, "mask_path", "mask_semantics") + (MASK_RATIO,), lr=0.013, epochs=10,
                   digits={"lr": 0.003, "epochs": 3})
    hparams = searched(hparams, lr=("log", 1e-4, 1.0), epochs=("per_epoch", MAX_TUNED_EPOCHS))
    refused_flags = {"mask_path": "SalUn-soft replaces the hard mask by its proximal threshold"}
    horizon_dependent = True
    horizon_reason = ("the threshold index k shrinks over the run's T = E*L steps, so epoch e of a longer run kept "
                      "more coordinates at their epoch-start values than a fresh e-epoch run")

    def epoch_started(self, epoch: int, steps: int) -> None:
        params = list(self.model.parameters())
        self._start = [p.detach().clone() for p in params]
        n_params = sum(p.numel() for p in params)
        total = self.hp["epochs"] * steps
        ratio = self.hp["mask_ratio"]
        self._k = int(ratio * (total - ((epoch - 1) * steps + 1)) / total * n_params) if total else 0

    def after_step(self) -> None:
        if self._k < 1:
            return
        params = list(self.model.parameters())
        with torch.no_grad():
            deltas = [p - p0 for p, p0 in zip(params, self._start)]
            k = min(self._k, sum(d.numel() for d in deltas))
            tau = torch.cat([d.reshape(-1) for d in deltas]).abs().kthvalue(k).values
            for p, p0, d in zip(params, self._start, deltas):
                p.copy_(p0 + d.sign() * (d.abs() - tau).clamp_min(0))


register_alias("FT_prune", "FT_l1", summary="upstream name of FT_l1 (it never pruned any weight)")
register_alias("BE", "boundary_expanding", summary="boundary expanding")
register_alias("BS", "boundary_shrink", summary="boundary shrinking")
register_alias("RL_proximal", "SalUn_soft", summary="upstream name of SalUn_soft")
