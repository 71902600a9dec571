"""Rules shared by several methods, written once: hyper-parameter templates, the augmentation policy, random-label
drawing, the ordered loader and the accumulation loop of gradient statistics, and weight-mask files.

Methods override a template's default with `HParam.replace` or `unlearn.hparams.tune`.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
import torch.nn as nn

from dataset import DATASET_RECIPES, UPSTREAM_RECIPE, TensorLoader
from training import parse_milestones
from unlearn.hparams import HParam
from utils import UserError, atomic_torch_save

# ---------------------------------------------------------------------------------------------------------------------
# Hyper-parameter templates
# ---------------------------------------------------------------------------------------------------------------------

AUGMENT_POLICIES = ("always", "first_epoch", "never")


def _recipe_default(key: str) -> dict:
    """Per-dataset values of a recipe field: what the run's recipe holds when no recipe is handed to the resolution."""
    return {name: recipe[key] for name, recipe in DATASET_RECIPES.items() if recipe.get(key) is not None}


def _check_milestones(value: str) -> None:
    parse_milestones(value)  # raises the one-line UserError naming --decreasing_lr


LR = HParam("lr", float, 0.01, "unlearning learning rate (method default)", flag="unlearn_lr", low=0.0, low_open=True)
EPOCHS = HParam("epochs", int, 10, "unlearning epochs (method default)", flag="unlearn_epochs", low=1)
#: The longest run `benchmark.py --tune` tries, the same for every iterative method (`("per_epoch", MAX)` in each
#: declaration): no method is held to fewer epochs than another. 30 because the search with 20 chose the maximum for
#: five class-wise configurations, and runs of 40 epochs placed their best epoch between 20 and 30 (docs/tuning.md).
MAX_TUNED_EPOCHS = 30
BATCH_SIZE = HParam("batch_size", int, UPSTREAM_RECIPE["batch_size"],
                    "batch size of every loader (the training recipe's: 256; digits 64)", low=1,
                    dataset_defaults=_recipe_default("batch_size"), recipe="batch_size")
MOMENTUM = HParam("momentum", float, 0.9, "SGD momentum (shared with training)", low=0.0, high=1.0, high_open=True,
                  recipe="momentum")
WEIGHT_DECAY = HParam("weight_decay", float, 5e-4, "SGD weight decay (shared with training)", low=0.0,
                      recipe="weight_decay")
DECREASING_LR = HParam("decreasing_lr", str, UPSTREAM_RECIPE["decreasing_lr"],
                       "MultiStepLR milestones, gamma 0.1, stepped per epoch "
                       "(shared with training: 91,136; digits 20,25)",
                       dataset_defaults=_recipe_default("decreasing_lr"), recipe="decreasing_lr",
                       check=_check_milestones, describe="comma-separated epochs such as 91,136 (or empty)")
AUGMENT = HParam("augment", str, "always",
                 "train-time augmentation while unlearning: always, first_epoch (the VarGrad authors' code) or never",
                 choices=AUGMENT_POLICIES, paper_era="first_epoch")
ALPHA = HParam("alpha", float, 1e-4, "method strength (l1 coefficient, IU scale, FF noise, SSD selection)", low=0.0)
MASK_PATH = HParam("mask_path", str, None,
                   "weight-mask file restricting the update (this project's salun_mask_<ratio>.pt or upstream's "
                   "with_<ratio>.pt); create one with --unlearn SalUn --mask_path FILE",
                   nullable=True, describe="a mask file path")


# ---------------------------------------------------------------------------------------------------------------------
# Augmentation policy
# ---------------------------------------------------------------------------------------------------------------------

def augment_for_epoch(policy: str, epoch: int) -> bool | None:
    """Augmentation of 1-based `epoch` under `policy`: None = the run's setting (the dataset recipe, off with --no-aug),
    False = none."""
    if policy == "always" or (policy == "first_epoch" and epoch == 1):
        return None
    return False


# ---------------------------------------------------------------------------------------------------------------------
# Random labels
# ---------------------------------------------------------------------------------------------------------------------

def wrong_labels(labels: torch.Tensor, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """(y + r) mod K with r uniform in {1, ..., K-1} per sample: uniform over the other classes, never y.

    Drawn on the generator's device (the run's CPU generator) and moved to the labels' device, so the draws do not
    depend on where the model runs. The copy does not block: a blocking copy to a GPU waits for its queue.
    """
    if num_classes < 2:
        raise ValueError(f"wrong labels need at least 2 classes; got {num_classes}")
    shift = torch.randint(1, num_classes, labels.shape, generator=generator, device=generator.device)
    return (labels + shift.to(labels.device, non_blocking=True)) % num_classes


def uniform_labels(labels: torch.Tensor, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """Uniform over all K classes (upstream's RL code; may equal y), drawn like `wrong_labels`."""
    drawn = torch.randint(0, num_classes, labels.shape, generator=generator, device=generator.device)
    return drawn.to(labels.device, non_blocking=True)


RANDOM_LABELS: dict[str, Callable[[torch.Tensor, int, torch.Generator], torch.Tensor]] = {
    "wrong": wrong_labels, "uniform": uniform_labels,
}


# ---------------------------------------------------------------------------------------------------------------------
# Gradient statistics
# ---------------------------------------------------------------------------------------------------------------------

def statistics_loader(data, part: str, paper_era: bool, batch_size: int, generator: torch.Generator) -> TensorLoader:
    """Ordered loader for gradient statistics (SalUn mask, IU, FF). Test transform by default; with `paper_era` the
    train transform (the dataset's augmentation), which upstream's loaders kept (see docs/upstream.md)."""
    if not paper_era:
        return data.eval_loader(part, batch_size=batch_size)
    images, labels = data.tensors(part)
    augment = data.data.augment if data.augment else "none"
    return TensorLoader(images, labels, batch_size, shuffle=False, augment=augment, generator=generator)


def trainable_parameters(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


Precision = Callable[[], contextlib.AbstractContextManager]  # the run's --amp context (UnlearnMethod.autocast)


def accumulate_gradients(model: nn.Module, loader: Iterable, params: Sequence[torch.Tensor],
                         loss_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                         transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                         precision: Precision = contextlib.nullcontext) -> tuple[list[torch.Tensor], int]:
    """Sum over the loader's batches of transform(gradient of loss_of(model(x), y)) per parameter, and the number of
    batches. Parameters without a gradient contribute zeros. The model's mode is the caller's (the statistics of IU,
    SSD and the SalUn mask use eval mode). The forward pass and loss run under `precision()`; gradients are float32."""
    totals = [torch.zeros_like(p) for p in params]
    batches = 0
    for x, y in loader:
        with precision():
            loss = loss_of(model(x), y)
        grads = torch.autograd.grad(loss, list(params), allow_unused=True)
        for total, g in zip(totals, grads):
            if g is not None:
                total += g if transform is None else transform(g)
        batches += 1
    return totals, batches


# ---------------------------------------------------------------------------------------------------------------------
# Weight-mask files
# ---------------------------------------------------------------------------------------------------------------------

MASK_FILE_FORMAT = "a dict parameter name -> 0/1 tensor (salun_mask_<ratio>.pt or upstream with_<ratio>.pt)"


def save_mask(path: str | Path, mask: dict[str, torch.Tensor]) -> Path:
    """Mask file: dict parameter name -> bool tensor on the CPU, written atomically."""
    return atomic_torch_save(path, {n: m.detach().to("cpu", torch.bool) for n, m in mask.items()})


def load_mask_file(path: str | Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """Load a weight mask for `model`: this project's bool/uint8 files or upstream SalUn's `with_{r}.pt` (int64 {0, 1}).
    Every parameter must be covered with its exact shape. Anything else is a one-line UserError."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"--mask_path '{file}' does not exist; pass {MASK_FILE_FORMAT}")
    try:
        payload = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickled objects, corrupt or foreign files: all one line
        raise UserError(f"--mask_path '{file}' is not a readable mask file ({type(exc).__name__}); expected "
                        f"{MASK_FILE_FORMAT}") from exc
    if not isinstance(payload, dict) or not payload or not all(isinstance(v, torch.Tensor) for v in payload.values()):
        raise UserError(f"--mask_path '{file}' is not {MASK_FILE_FORMAT}")
    params = dict(model.named_parameters())
    missing = [n for n in params if n not in payload]
    unexpected = [n for n in payload if n not in params]
    if missing or unexpected:
        raise UserError(f"--mask_path '{file}' does not fit this model (missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]}); generate it for the same --arch/--width/--dataset")
    masks = {}
    for name, tensor in payload.items():
        if tuple(tensor.shape) != tuple(params[name].shape):
            raise UserError(f"--mask_path '{file}': '{name}' has shape {tuple(tensor.shape)}, the model's is "
                            f"{tuple(params[name].shape)}; generate it for the same --arch/--width/--dataset")
        if tensor.dtype == torch.bool:
            masks[name] = tensor
        elif (not tensor.dtype.is_floating_point and not tensor.dtype.is_complex
              and bool(((tensor == 0) | (tensor == 1)).all())):
            masks[name] = tensor.bool()
        else:
            raise UserError(f"--mask_path '{file}': '{name}' is not a 0/1 mask (dtype {tensor.dtype}); expected "
                            f"{MASK_FILE_FORMAT}")
    return {n: m.to(params[n].device) for n, m in masks.items()}


def require_mask_file(path: str | None) -> None:
    """Before any work: a method that only reads masks needs the file to exist."""
    if path and not Path(path).is_file():
        raise UserError(f"--mask_path '{path}' does not exist; only SalUn computes a mask (run --unlearn SalUn "
                        f"--mask_path {path} first), the other methods read {MASK_FILE_FORMAT}")
