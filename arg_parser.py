"""The one argument parser shared by every entry script.

Flag names and defaults follow Unlearn-Sparse / SalUn and the paper's fork (UPSTREAM.md §2, VARGRAD.md §11), so the
commands of the original README work unchanged. Method-specific hyper-parameters default to None, meaning "the
method's own documented default" (e.g. lr 0.01 for the SGD baselines, 1e-4 with Adam for the masking family).
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from dataset import list_datasets, num_classes_of, recipe_defaults
from models import list_models


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (what is wrong, what is allowed) and exit status 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"must be an integer, got '{text}'") from exc


def build_parser(description: str = "", extra: Callable[[argparse.ArgumentParser], None] | None = None,
                 prog: str | None = None) -> argparse.ArgumentParser:
    p = OneLineErrorParser(description=description, prog=prog,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    g = p.add_argument_group("data")
    g.add_argument("--data", default="../data", help="dataset root (torchvision layout; CIFAR/SVHN downloaded when online)")
    g.add_argument("--dataset", default="cifar10", choices=list_datasets(), help="dataset")
    g.add_argument("--num_classes", type=int, default=None,
                   help="derived from the dataset; an explicit value must agree with it")
    g.add_argument("--batch_size", type=_positive_int, default=None, help="batch size of every loader (256; digits 64)")
    g.add_argument("--no-aug", dest="no_aug", action="store_true", help="no train-time augmentation (crop/flip)")
    g.add_argument("--no-download", dest="no_download", action="store_true", help="never try to download data")
    g.add_argument("--split", default="consistent", choices=["consistent", "upstream"],
                   help="consistent: forget/retain always inside the original model's training set; "
                        "upstream: the Unlearn-Sparse split-seed quirk (paper-era replication)")
    g.add_argument("--workers", "--num_workers", dest="workers", type=int, default=0,
                   help="accepted for compatibility; data is served from memory without worker processes")

    g = p.add_argument_group("forget set")
    g.add_argument("--class_to_replace", type=_int, default=0,
                   help="class to forget from; -1 = random across classes (default 0 as in the paper's fork)")
    g.add_argument("--num_indexes_to_replace", type=_int, default=None,
                   help="forget-set size; omitted with a class = the whole class (class-wise forgetting)")

    g = p.add_argument_group("model and training")
    g.add_argument("--arch", default="resnet18", choices=list_models(), help="architecture")
    g.add_argument("--width", type=_positive_int, default=None,
                   help="base width (default: the architecture's own; 16 on digits)")
    g.add_argument("--seed", type=_int, default=2, help="global seed; forget selection uses seed - 1 (>= 1)")
    g.add_argument("--train_seed", type=_int, default=1, help="seed of the model initialisation (shared by Retrain)")
    g.add_argument("--epochs", type=_positive_int, default=None, help="training epochs (182; digits 30)")
    g.add_argument("--lr", type=float, default=None, help="training learning rate (0.1; digits 0.05)")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--weight_decay", type=float, default=5e-4, help="SGD weight decay")
    g.add_argument("--decreasing_lr", default=None, help="MultiStepLR milestones, gamma 0.1 (91,136; digits 20,25)")
    g.add_argument("--warmup", type=int, default=0, help="linear warm-up epochs")
    g.add_argument("--save_dir", default="./results", help="output directory")
    g.add_argument("--resume", action="store_true", help="continue an interrupted training run")
    g.add_argument("--retrain", action="store_true", help="main_baseline.py: train the Retrain reference on the retain set")
    g.add_argument("--device", default="auto", help="auto (CUDA when available, else CPU), cpu, cuda, cuda:N")
    g.add_argument("--gpu", type=int, default=None, help="CUDA device index (upstream flag); same as --device cuda:N")
    g.add_argument("--no-progress", dest="no_progress", action="store_true", help="hide tqdm progress bars")

    g = p.add_argument_group("unlearning")
    g.add_argument("--mask", "--model_path", dest="mask", default=None,
                   help="checkpoint of the model to unlearn (upstream name --mask; SalUn's --model_path)")
    g.add_argument("--unlearn", default="retrain", help="unlearning method (see --list-methods)")
    g.add_argument("--grad_mask", default=None,
                   help="gradient-mask add-on applied to a bi-objective base: none, and, prob, focus, opt, focus_opt, "
                        "saliency, bernoulli")
    g.add_argument("--unlearn_epochs", type=_positive_int, default=None, help="unlearning epochs (method default)")
    g.add_argument("--unlearn_lr", type=float, default=None, help="unlearning learning rate (method default)")
    g.add_argument("--unlearn_seed", type=_int, default=None, help="seed of the unlearning run (default: --seed)")
    g.add_argument("--alpha", type=float, default=None, help="method strength (l1 coefficient, IU scale, FF noise, SSD alpha)")
    g.add_argument("--beta", type=float, default=None, help="mixture weight on the retain gradient (method default, 0.9)")
    g.add_argument("--quantile", type=float, default=None,
                   help="mask threshold q (prob) / saliency quantile (method default, 0.5)")
    g.add_argument("--rho", type=float, default=None, help="noise-model EMA weight (method default, 0.9)")
    g.add_argument("--ema", default="code", choices=["code", "standard"],
                   help="noise-model update: code = the authors' exactly; standard = conventional EMA")
    g.add_argument("--scrub_kl", default="kl", choices=["kl", "code"], help="SCRUB divergence: correct KL or the authors'")
    g.add_argument("--augment", default=None, choices=["always", "first_epoch", "never"],
                   help="train-time augmentation during unlearning (default always; the authors used first_epoch)")
    g.add_argument("--mask_path", default=None, help="SalUn saliency mask file to reuse (computed and saved when absent)")
    g.add_argument("--salun_ratio", type=float, default=0.5, help="SalUn: fraction of weights kept by the saliency mask")
    g.add_argument("--mask_ratio", type=float, default=0.5, help="SalUn_soft: fraction of soft-thresholded coordinates")
    g.add_argument("--mask_semantics", default="freeze", choices=["freeze", "grad_only"],
                   help="masked-out weights: freeze = keep original values; grad_only = paper-era (decay still moves them)")
    g.add_argument("--rl_schedule", default="mixed", choices=["mixed", "sequential"], help="RL / SalUn schedule")
    g.add_argument("--rl_labels", default="wrong", choices=["wrong", "uniform"], help="RL random labels: y' != y, or uniform")
    g.add_argument("--no-l1-epochs", dest="no_l1_epochs", type=int, default=0, help="FT_l1: trailing epochs without l1")
    g.add_argument("--ssd_lambda", type=float, default=None, help="SSD dampening constant lambda (default 1)")
    g.add_argument("--paper_era", action="store_true", help="turn on every paper-era (upstream bug-compatible) behaviour")
    g.add_argument("--list-methods", dest="list_methods", action="store_true", help="print the registered methods and exit")

    g = p.add_argument_group("backdoor")
    g.add_argument("--trigger_size", type=int, default=None, help="side of the black trigger square (default: 4 on 32x32, 2 on 8x8)")

    g = p.add_argument_group("evaluation")
    g.add_argument("--mia", default="svc", choices=["svc", "lira", "rmia", "ulira", "all"],
                   help="membership inference attacks to run in addition to upstream's SVC")
    g.add_argument("--num_ref_models", type=_positive_int, default=8, help="reference models of the per-example attacks")
    g.add_argument("--jobs", type=_positive_int, default=1, help="parallel worker processes")
    if extra:
        extra(p)
    return p


def resolve_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Checks that need several flags together; derived values (num_classes, device)."""
    derived = num_classes_of(args.dataset)
    if args.num_classes is not None and args.num_classes != derived:
        parser.error(f"--num_classes {args.num_classes} disagrees with --dataset {args.dataset}, which has {derived} classes "
                     f"(omit --num_classes)")
    args.num_classes = derived
    for key, value in recipe_defaults(args.dataset).items():  # the dataset's recipe fills what was left unset
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.seed < 1:
        parser.error(f"--seed must be >= 1 (the forget selection uses seed - 1), got {args.seed}")
    if args.unlearn_seed is None:
        args.unlearn_seed = args.seed
    if not -1 <= args.class_to_replace < derived:
        parser.error(f"--class_to_replace {args.class_to_replace} is out of range; allowed: -1 (any class) or "
                     f"0..{derived - 1} for {args.dataset}")
    if args.num_indexes_to_replace is not None and args.num_indexes_to_replace <= 0:
        parser.error(f"--num_indexes_to_replace must be a positive count, got {args.num_indexes_to_replace}")
    if args.quantile is not None and not 0.0 < args.quantile < 1.0:
        parser.error(f"--quantile must be in the open interval (0, 1), got {args.quantile}")
    if args.beta is not None and not 0.0 <= args.beta <= 1.0:
        parser.error(f"--beta must be in [0, 1], got {args.beta}")
    if args.rho is not None and not 0.0 < args.rho < 1.0:
        parser.error(f"--rho must be in the open interval (0, 1), got {args.rho}")
    if args.gpu is not None and args.device == "auto":
        args.device = f"cuda:{args.gpu}"
    if args.paper_era:
        if args.split == "consistent":
            args.split = "upstream"
        if args.rl_labels == "wrong":
            args.rl_labels = "uniform"
        if args.mask_semantics == "freeze":
            args.mask_semantics = "grad_only"
        if args.augment is None:
            args.augment = "first_epoch"
    return args


def parse_args(argv: Sequence[str] | None = None, description: str = "",
               extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    parser = build_parser(description, extra)
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    return resolve_args(args, parser)
