"""One-shot baselines: wfisher (IU, influence unlearning), fisher_new (FF, Fisher forgetting) and SSD (selective
synaptic dampening). Each computes gradient statistics once (eval mode, test transform; paper-era: train transform) and
edits the weights in a single pass, so the driver runs one "epoch".
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from dataset import TensorLoader
from unlearn.common import (
    ALPHA,
    BATCH_SIZE,
    MASK_PATH,
    Precision,
    accumulate_gradients,
    load_mask_file,
    require_mask_file,
    statistics_loader,
    trainable_parameters,
)
from unlearn.hparams import HParam, searched, tune
from unlearn.registry import UnlearnMethod, register_alias, register_method
from utils import temporarily_eval

WOODFISHER_N = 1000          # upstream constant of the WoodFisher recursion
FF_BATCH_SIZE = 32           # upstream batch size of FF's Hessian pass
PER_SAMPLE_BYTES = 256 << 20  # memory budget of one chunk of per-sample gradients (IU)

SSD_LAMBDA = HParam("ssd_lambda", float, 1.0, "SSD: dampening constant lambda", low=0.0, low_open=True)
SSD_REFERENCE = HParam("ssd_reference", str, "train",
                       "SSD: reference set of the importances: train = retain + forget (the paper), "
                       "retain = retain only",
                       choices=("train", "retain"))


def _flat(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


# ---------------------------------------------------------------------------------------------------------------------
# IU (wfisher)
# ---------------------------------------------------------------------------------------------------------------------

def summed_gradient(model: nn.Module, loader: Iterable, precision: Precision = contextlib.nullcontext) -> torch.Tensor:
    """Flat sum over the loader of per-sample CE gradients (= batch-mean gradient x batch size), trainable parameters
    in `model.parameters()` order."""
    params = [p for _, p in trainable_parameters(model)]
    totals, _ = accumulate_gradients(model, loader, params, lambda out, y: F.cross_entropy(out, y, reduction="sum"),
                                     precision=precision)
    return _flat(totals)


def per_sample_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(batch, n_params) matrix of per-sample CE gradients (the model's current mode; IU uses eval mode). Always
    float32, whatever --amp says: autocast does not compose with vmap over an eval-mode batch norm (bfloat16 input,
    float32 running statistics), and these gradients only feed two dot products per sample."""
    named = trainable_parameters(model)
    params = {n: p.detach() for n, p in named}
    buffers = dict(model.named_buffers())

    def loss_of_one(p, xi, yi):
        return F.cross_entropy(functional_call(model, (p, buffers), (xi.unsqueeze(0),)), yi.unsqueeze(0))

    grads = vmap(grad(loss_of_one), in_dims=(None, 0, 0))(params, x, y)
    return torch.cat([grads[n].reshape(len(y), -1) for n, _ in named], dim=1)


def woodfisher_direction(model: nn.Module, v: torch.Tensor, retain_samples: Iterable[tuple[torch.Tensor, torch.Tensor]],
                         n_max: int = WOODFISHER_N) -> torch.Tensor:
    """Upstream's WoodFisher recursion, vectorised.

    Upstream: k <- v; the first retain sample sets o <- g; each later sample (t = o.g) does k <- k - (k.g/(N + t)) o
    and o <- o - (t/(N + t)) o; it stops after the sample with index N + 1. Since o only ever rescales the first
    gradient g0, o = c g0 and k = v - s g0 for scalars c, s that need only v.g and g0.g per sample: per-sample
    gradients are computed in chunks (vmap) and reduced to these two dot products, then the scalar recursion runs in
    float64. Equal to the sample-by-sample loop up to rounding.
    """
    g0 = None
    c, s = 1.0, 0.0
    processed = 0
    n_params = v.numel()
    for x, y in retain_samples:
        x, y = x[: n_max + 2 - processed], y[: n_max + 2 - processed]
        chunk = max(1, min(len(y), PER_SAMPLE_BYTES // (4 * n_params)))
        for start in range(0, len(y), chunk):
            G = per_sample_gradients(model, x[start:start + chunk], y[start:start + chunk])
            if g0 is None:
                g0, G = G[0].clone(), G[1:]
                processed += 1
            if len(G) == 0:
                continue
            vg = (G @ v).double().tolist()
            g0g = (G @ g0).double().tolist()
            for dot_v, dot_0 in zip(vg, g0g):
                tmp = c * dot_0
                a = (dot_v - s * dot_0) / (n_max + tmp)
                s += a * c
                c *= n_max / (n_max + tmp)
            processed += len(G)
        if processed >= n_max + 2:
            break
    return v if g0 is None else v - s * g0


@register_method
class WFisher(UnlearnMethod):
    """IU / influence unlearning with upstream's WoodFisher approximation: v = g_f/n - n_f/(n n_r) g_r
    (summed gradients, n = n_f + n_r), k = WoodFisher(v) over the first N + 2 retain samples in stored order (N = 1000),
    theta <- theta + alpha k. Eval mode, test transform (paper-era: train transform). `mask_path` restricts the update
    (alpha k * m). alpha: README unspecified; third-party scripts use 10."""

    name = "wfisher"
    summary = "influence unlearning (IU) with the WoodFisher inverse-Hessian approximation"
    hparams = tune((ALPHA.replace(help="IU: scale of the influence update", low_open=True), BATCH_SIZE, MASK_PATH),
                   alpha=10.0, digits={"alpha": 30.0})
    hparams = searched(hparams, alpha=("log", 0.1, 300.0))
    one_shot = True
    deterministic = True

    @classmethod
    def check_hparams(cls, hp: Mapping[str, Any]) -> None:
        require_mask_file(hp["mask_path"])

    def run_epoch(self, epoch: int) -> dict[str, float]:
        data, gen, paper = self.ctx.data, self.ctx.generator, self.ctx.paper_era
        batch = self.hp["batch_size"]
        mask = load_mask_file(self.hp["mask_path"], self.model) if self.hp["mask_path"] else None
        with temporarily_eval(self.model):
            n_f, n_r = len(data.split.forget), len(data.split.retain)
            n = n_f + n_r
            g_f = summed_gradient(self.model, statistics_loader(data, "forget", paper, batch, gen), self.autocast)
            g_r = summed_gradient(self.model, statistics_loader(data, "retain", paper, batch, gen), self.autocast)
            v = g_f / n - (n_f / (n * n_r)) * g_r
            k = woodfisher_direction(self.model, v, statistics_loader(data, "retain", paper, batch, gen))
        update = self.hp["alpha"] * k
        start = 0
        with torch.no_grad():
            for name, p in trainable_parameters(self.model):
                step = update[start:start + p.numel()].view_as(p)
                p.add_(step * mask[name] if mask is not None else step)
                start += p.numel()
        return {"update_norm": float(update.norm())}


# ---------------------------------------------------------------------------------------------------------------------
# FF (fisher_new)
# ---------------------------------------------------------------------------------------------------------------------

def fisher_class_branch(split, num_classes: int, train_labels: torch.Tensor, paper_era: bool) -> int | None:
    """Row of the classifier that FF zeroes, or None.

    Project: only for class-wise forgetting (row = the forgotten class). Paper-era keeps upstream's bug in general
    form: upstream enters the branch when |D_f| equals the hard-coded size of one CIFAR class (4,500 / 450), whatever
    the scenario, and indexes row `class_to_replace` (-1 = the last class in random forgetting); here the branch is
    entered when |D_f| equals the training count of that class."""
    if split.scenario == "classwise":
        return int(split.class_to_replace)
    if not paper_era:
        return None
    row = split.class_to_replace if split.class_to_replace >= 0 else num_classes - 1
    class_count = int((train_labels[torch.as_tensor(split.train, device=train_labels.device)] == row).sum())
    return int(split.class_to_replace) if len(split.forget) == class_count else None


def fisher_diagonal(model: nn.Module, loader: Iterable, num_classes: int,
                    precision: Precision = contextlib.nullcontext) -> list[torch.Tensor]:
    """A = mean over batches of sum_y mean_batch(p_y) * (grad of CE(output, y))^2, eval mode (FF's Fisher diagonal;
    one backward per class, so it does not share `accumulate_gradients`)."""
    params = [p for _, p in trainable_parameters(model)]
    totals = [torch.zeros_like(p) for p in params]
    batches = 0
    for x, _ in loader:
        with precision():
            output = model(x)
        prob = torch.softmax(output.detach().float(), dim=-1)
        for y in range(num_classes):
            target = torch.full((len(x),), y, dtype=torch.long, device=x.device)
            with precision():
                loss = F.cross_entropy(output, target)
            grads = torch.autograd.grad(loss, params, retain_graph=y < num_classes - 1, allow_unused=True)
            weight = prob[:, y].mean()
            for total, g in zip(totals, grads):
                if g is not None:
                    total += weight * g.pow(2)
        batches += 1
    return [t / max(batches, 1) for t in totals]


def fisher_noise_parameters(theta: torch.Tensor, fisher: torch.Tensor, alpha: float, num_classes: int,
                            forget_row: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, variance) of FF's Gaussian for one parameter."""
    is_class_dim = theta.dim() >= 1 and theta.shape[0] == num_classes
    var = (1.0 / (fisher + 1e-8)).clamp(max=1e3)
    if is_class_dim:
        var = var.clamp(max=1e2)
    var = alpha * var
    if theta.dim() > 1:
        var = var.mean(dim=1, keepdim=True).expand_as(theta).clone()
    mu = theta.detach().clone()
    if is_class_dim and forget_row is not None:
        mu[forget_row] = 0
        var[forget_row] = 1e-4
    if is_class_dim or theta.dim() == 1:  # last layer, BN and biases
        var = var * 10
    return mu, var


@register_method
class FisherForgetting(UnlearnMethod):
    """FF / Fisher forgetting (upstream `fisher_new`): theta <- mu + sqrt(var) N(0, 1) with var from the
    inverse retain-set Fisher diagonal scaled by alpha; class-wise forgetting also zeroes the forgotten class's row.
    alpha: README unspecified; maintainers suggest about 1e-9 when TA collapses (issue Sparse#5)."""

    name = "fisher_new"
    summary = "Fisher forgetting (FF): Gaussian noise shaped by the inverse retain-set Fisher"
    hparams = tune((ALPHA.replace(help="FF: scale of the noise variance", low_open=True),), alpha=1e-9,
                   digits={"alpha": 3e-6})
    hparams = searched(hparams, alpha=("log", 1e-10, 1e-4))
    refused_flags = {"mask_path": "its update is noise on every weight"}
    one_shot = True

    def run_epoch(self, epoch: int) -> dict[str, float]:
        data, C, paper = self.ctx.data, self.ctx.num_classes, self.ctx.paper_era
        loader = statistics_loader(data, "retain", paper, FF_BATCH_SIZE, self.ctx.generator)
        with temporarily_eval(self.model):
            fisher = fisher_diagonal(self.model, loader, C, self.autocast)
        row = fisher_class_branch(data.split, C, data.data.train_labels, paper)
        alpha = self.hp["alpha"]
        with torch.no_grad():
            for (_, p), f in zip(trainable_parameters(self.model), fisher):
                mu, var = fisher_noise_parameters(p, f, alpha, C, row)
                noise = torch.randn(p.shape, generator=self.ctx.generator).to(p.device, p.dtype)
                p.copy_(mu + var.sqrt() * noise)
        return {"class_row": float(-1 if row is None else row)}


# ---------------------------------------------------------------------------------------------------------------------
# SSD
# ---------------------------------------------------------------------------------------------------------------------

def diagonal_importance(model: nn.Module, loader: Iterable,
                        precision: Precision = contextlib.nullcontext) -> list[torch.Tensor]:
    """Mean over batches of the squared batch-mean CE gradient (SSD's diagonal Fisher), trainable parameters."""
    params = [p for _, p in trainable_parameters(model)]
    totals, batches = accumulate_gradients(model, loader, params, F.cross_entropy, transform=lambda g: g.pow(2),
                                           precision=precision)
    return [t / max(batches, 1) for t in totals]


def ssd_dampen_(params: Iterable[torch.Tensor], forget_importance: Iterable[torch.Tensor],
                reference_importance: Iterable[torch.Tensor], alpha: float, lam: float) -> float:
    """Where imp_f > alpha * imp_r, multiply the weight by min(lambda * imp_r / imp_f, 1). Returns the dampened
    fraction."""
    selected = total = 0
    with torch.no_grad():
        for p, imp_f, imp_r in zip(params, forget_importance, reference_importance):
            where = imp_f > alpha * imp_r
            safe_imp_f = torch.where(where, imp_f, torch.ones_like(imp_f))  # no division by zero outside `where`
            factor = torch.where(where, (lam * imp_r / safe_imp_f).clamp(max=1.0), torch.ones_like(p))
            p.mul_(factor)
            selected += int(where.sum())
            total += p.numel()
    return selected / max(total, 1)


@register_method
class SSD(UnlearnMethod):
    """Selective Synaptic Dampening (Foster et al., AAAI'24): diagonal Fisher importances (mean squared CE gradients)
    on the forget set and on a reference set; parameters far more important to the forget set (imp_f > alpha imp_r)
    are scaled by min(lambda imp_r / imp_f, 1). Reference = the full training set D_r + D_f, as in the paper
    (`--ssd_reference retain` uses D_r only). Eval mode, test transform. Paper defaults lambda = 1, alpha = 10."""

    name = "SSD"
    summary = "selective synaptic dampening of forget-specific weights (Fisher importances)"
    hparams = tune((ALPHA.replace(help="SSD: selection threshold (imp_f > alpha imp_r)"), SSD_LAMBDA, SSD_REFERENCE,
                    BATCH_SIZE), alpha=10.0, digits={"alpha": 5.0, "ssd_lambda": 1.0})
    hparams = searched(hparams, alpha=("log", 0.1, 100.0), ssd_lambda=("linear", 0.1, 2.0))
    refused_flags = {"mask_path": "it selects its own parameters"}
    one_shot = True
    deterministic = True

    def run_epoch(self, epoch: int) -> dict[str, float]:
        data = self.ctx.data
        batch = self.hp["batch_size"]
        if self.hp["ssd_reference"] == "train":
            images, labels = (torch.cat(t) for t in zip(data.tensors("retain"), data.tensors("forget")))
            reference_loader = TensorLoader(images, labels, batch)
        else:
            reference_loader = data.eval_loader("retain", batch_size=batch)
        with temporarily_eval(self.model):
            imp_f = diagonal_importance(self.model, data.eval_loader("forget", batch_size=batch), self.autocast)
            imp_r = diagonal_importance(self.model, reference_loader, self.autocast)
        fraction = ssd_dampen_([p for _, p in trainable_parameters(self.model)], imp_f, imp_r, self.hp["alpha"],
                               self.hp["ssd_lambda"])
        return {"dampened_fraction": fraction}


register_alias("IU", "wfisher", summary="influence unlearning (upstream wfisher)")
register_alias("FF", "fisher_new", summary="Fisher forgetting (upstream fisher_new)")
