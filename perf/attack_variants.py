"""How much each deliberate difference between our membership attacks and their papers' reference code moves the result.

    .venv/bin/python perf/attack_variants.py                        # digits_noisy, random 130, seed 1, 9 models
    .venv/bin/python perf/attack_variants.py --epochs 10 --jobs 2   # a quicker, weaker recipe

Protocol (leave one model out). The script trains (or loads from the cache of `evaluation.reference_models`) M
reference models on random halves of the pool of the training split of `--seed`'s split plus the test set. Each model
in turn is the target; the other M - 1 models are its references; the question is which pool examples the target
trained on (its row of the membership matrix). AUC and TPR at 1 % FPR are averaged over the M targets. With the
default M = 9, every example is IN for 3 to 5 of the 8 references, so the K = 8 rows use both sides of every example.

Variants, each next to the rule `evaluation.attacks` implements (see docs/attacks.md):
  (a) offline LiRA: our one-sided log Phi((phi - mu_out)/sigma_out) against the reference code's two-sided
      -log N(phi; mu_out, sigma_out^2), which also calls examples far *below* the OUT mean members;
  (b) fixed variance: our sigma_out (spread of the OUT values around each example's own OUT mean) against sigma_out
      taken from the IN values, centred and, as the reference code does, uncentred (np.std over all IN values);
  (c) per-example means against medians;
  (d) one unaugmented query against two (the image and its horizontal mirror, a Gaussian fit per view, the per-view
      scores averaged);
  (e) SVC-MIA's modified-entropy feature: the Song-Mittal formula (ours) against upstream's expression and the paper
      fork's expression, each fed to the same RBF-SVC, fit on one half of the pool and scored on the other;
  plus a scan over the number of reference models K (the first K of the other models): per-example variance, our
  fixed variance and the reference code's uncentred one. For K < 8, only examples with at least one IN and one OUT
  reference enter (the same examples for every variant of that K). At K = 2 such an example has one value per side,
  so only the uncentred global sigma exists (the others print n/a; the product refuses LiRA below K = 3).

Nothing is written except the reference-model cache. Cost: 43 s to train the 9 default models with --jobs 2 on an
idle 2-core machine (cached afterwards), then about 17 s for signals, attacks and SVC fits.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings
from collections.abc import Callable

import numpy as np
import torch
from scipy.special import log_ndtr
from sklearn.svm import SVC

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dataset import TensorLoader, load_dataset, make_split, recipe_defaults  # noqa: E402
from evaluation.attacks import lira_offline, lira_online, roc_auc, tpr_at_fpr  # noqa: E402
from evaluation.reference_models import ModelSpec, ReferenceConfig, attack_pool_data, ensure_reference_models  # noqa: E402
from training import TrainRecipe, parse_milestones  # noqa: E402
from utils import UserError, cli_main, resolve_device, temporarily_eval  # noqa: E402

LOG_FLOOR = 1e-30  # the clamp upstream and the paper fork put inside their logarithms
K_SCAN = (2, 3, 4, 6, 8)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", default="digits_noisy", choices=["digits", "digits_noisy"])
    p.add_argument("--seed", type=int, default=1, help="split seed (the training split is the same for every seed)")
    p.add_argument("--num_indexes_to_replace", type=int, default=130, help="random forget set size of the split")
    p.add_argument("--num_models", type=int, default=9, help="reference models M; each target uses the other M - 1")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--width", type=int, default=None, help="default: the dataset recipe's")
    p.add_argument("--epochs", type=int, default=None, help="default: the dataset recipe's")
    p.add_argument("--jobs", type=int, default=2, help="worker processes that train missing reference models")
    p.add_argument("--cache_dir", default="results/attack_variants", help="reference-model cache root")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    args = p.parse_args(argv)
    if args.num_models < 3:
        raise UserError(f"--num_models must be >= 3 (a target plus two references); got {args.num_models}")
    if args.epochs is not None and args.epochs < 1:
        raise UserError(f"--epochs must be >= 1; got {args.epochs}")
    if args.width is not None and args.width < 1:
        raise UserError(f"--width must be >= 1; got {args.width}")
    if args.jobs < 1:
        raise UserError(f"--jobs must be >= 1; got {args.jobs}")
    return args


# ---------------------------------------------------------------------------------------------------------------------
# Signals of every reference model on the pool, for the unaugmented and the mirrored view
# ---------------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def pool_logits(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    with temporarily_eval(model):
        return torch.cat([model(x).double() for x, _ in TensorLoader(images, labels, 512)]).cpu()


def logit_scaled(logits: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """phi = z_y - logsumexp_{j != y} z_j (the stable form of log p_y - log(1 - p_y))."""
    index = labels.long().view(-1, 1)
    others = logits.scatter(1, index, float("-inf"))
    return (logits.gather(1, index).squeeze(1) - torch.logsumexp(others, 1)).numpy()


# ---------------------------------------------------------------------------------------------------------------------
# LiRA variants (the script's own Gaussian fits, so centre and sigma rules can be swapped one at a time)
# ---------------------------------------------------------------------------------------------------------------------

def side_fit(values: np.ndarray, used: np.ndarray, centre: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(centre, per-example std around the mean, count) of the used entries of each column."""
    masked = np.where(used, values, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(masked, axis=0)
        middle = mean if centre == "mean" else np.nanmedian(masked, axis=0)
        std = np.sqrt(np.nanmean((masked - mean) ** 2, axis=0))
    return middle, std, used.sum(axis=0)


def pooled_std(values: np.ndarray, used: np.ndarray) -> float:
    """Spread around each example's own mean, pooled over examples with >= 2 values (our fixed-variance sigma)."""
    masked = np.where(used, values, np.nan)
    counts = used.sum(axis=0)
    several = counts >= 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        squared = np.nansum((masked - np.nanmean(masked, axis=0)) ** 2, axis=0)
    return float(np.sqrt(squared[several].sum() / counts[several].sum()))


def sigmas(values, used, std, counts, fixed: str | None, in_values=None, in_used=None) -> np.ndarray:
    """Per-example sigma (the pooled one where a side has a single value), or one global sigma by `fixed`:
    "ours" = pooled centred spread of this side; "in_centred" = the IN side's pooled centred spread;
    "in_uncentred" = np.std over every IN value (the reference code's)."""
    if fixed == "in_centred":
        sigma = np.full(counts.shape, pooled_std(in_values, in_used))
    elif fixed == "in_uncentred":
        sigma = np.full(counts.shape, float(np.std(in_values[in_used])))
    else:
        pooled = pooled_std(values, used)
        sigma = np.full(counts.shape, pooled) if fixed == "ours" else np.where(counts >= 2, std, pooled)
    return np.maximum(sigma, 1e-12)


def log_normal(x, mean, sigma):
    return -0.5 * ((x - mean) / sigma) ** 2 - np.log(sigma)


def online_variant(target, refs, member, fixed: str | None, centre: str = "mean",
                   sigma_in_rule: str | None = None) -> np.ndarray:
    """log N(phi; IN fit) - log N(phi; OUT fit). `fixed` picks sigma_out's global rule (None = per example);
    sigma_in is always the IN side's own (pooled centred when fixed, or uncentred for the reference-code rule)."""
    mean_in, std_in, n_in = side_fit(refs, member, centre)
    mean_out, std_out, n_out = side_fit(refs, ~member, centre)
    in_rule = None if fixed is None else (sigma_in_rule or "ours")
    s_in = sigmas(refs, member, std_in, n_in, in_rule, refs, member)
    s_out = sigmas(refs, ~member, std_out, n_out, fixed, refs, member)
    return log_normal(target, mean_in, s_in) - log_normal(target, mean_out, s_out)


def offline_variant(target, refs, member, fixed: str | None, centre: str = "mean",
                    two_sided: bool = False) -> np.ndarray:
    """One-sided log Phi((phi - mu_out)/sigma_out), or the two-sided -log N(phi; mu_out, sigma_out^2).
    fixed: None, "ours" (pooled centred OUT spread) or "uncentred" (np.std over every OUT value, the reference's)."""
    mean_out, std_out, n_out = side_fit(refs, ~member, centre)
    if fixed == "uncentred":
        s_out = np.full(n_out.shape, max(float(np.std(refs[~member])), 1e-12))
    else:
        s_out = sigmas(refs, ~member, std_out, n_out, fixed)
    if two_sided:
        return -log_normal(target, mean_out, s_out)
    return log_ndtr((target - mean_out) / s_out)


# ---------------------------------------------------------------------------------------------------------------------
# SVC-MIA's modified entropy, three ways
# ---------------------------------------------------------------------------------------------------------------------

def m_entropy_song_mittal(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    """-(1 - p_y) log p_y - sum_{i != y} p_i log(1 - p_i): what evaluation/svc_mia.py computes."""
    rows = np.arange(len(y))
    p_y = p[rows, y]
    others = p * np.log(np.clip(1.0 - p, LOG_FLOOR, None))
    others[rows, y] = 0.0
    return -(1.0 - p_y) * np.log(np.clip(p_y, LOG_FLOOR, None)) - others.sum(1)


def m_entropy_upstream(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Upstream's expression: log p where log(1 - p) is meant, and the label substitution applied to every column
    whose class occurs anywhere in the set passed in (not to each row's own label). With every class present it is
    -sum_j (1 - p_j) log p_j for every example: the true label plays no role."""
    log_p = np.log(np.clip(p, LOG_FLOOR, None))
    weight = p.copy()
    present = np.unique(y)
    weight[:, present] = 1.0 - p[:, present]
    return -(weight * log_p).sum(1)


def m_entropy_fork(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The paper fork's expression: -(1 - p_y) log(1 - p_y) - sum_{i != y} p_i log p_i."""
    rows = np.arange(len(y))
    p_y = p[rows, y]
    others = p * np.log(np.clip(p, LOG_FLOOR, None))
    others[rows, y] = 0.0
    return -(1.0 - p_y) * np.log(np.clip(1.0 - p_y, LOG_FLOOR, None)) - others.sum(1)


def svc_scores(feature: Callable, probs: np.ndarray, labels: np.ndarray, member: np.ndarray,
               fit_half: np.ndarray) -> np.ndarray:
    """SVC-MIA's attacker (RBF, C = 3, gamma = "auto") on one feature: fit on `fit_half`, decision values on the
    rest (higher = member). Each half's feature is computed on that half alone, as upstream computes it per set."""
    fit_x = feature(probs[fit_half], labels[fit_half])[:, None]
    score_x = feature(probs[~fit_half], labels[~fit_half])[:, None]
    clf = SVC(C=3, gamma="auto", kernel="rbf").fit(fit_x, member[fit_half].astype(int))
    return clf.decision_function(score_x)


# ---------------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------------

def summarise(rows: dict[str, list[tuple[float, float, int]]]) -> list[tuple[str, float, float, int]]:
    """Mean over targets; NaN (printed n/a) when some target's references could not give a variance."""
    return [(name, float(np.mean([r[0] for r in vals])), float(np.mean([r[1] for r in vals])),
             int(round(np.mean([r[2] for r in vals])))) for name, vals in rows.items()]


def print_table(title: str, table: list[tuple[str, float, float, int]]) -> None:
    print(f"\n{title}")
    print(f"| {'variant':<62} | AUC   | TPR@1%FPR | examples |")
    print(f"|{'-' * 64}|-------|-----------|----------|")
    for name, auc, tpr, n in table:
        if math.isnan(auc):
            print(f"| {name:<62} | n/a   |       n/a | {n:8d} |")
        else:
            print(f"| {name:<62} | {auc:.3f} | {tpr:9.3f} | {n:8d} |")


def main(argv=None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    data = load_dataset(args.dataset).to(device)
    split = make_split(data, -1, args.num_indexes_to_replace, seed=args.seed)
    defaults = recipe_defaults(args.dataset)
    recipe = TrainRecipe(epochs=args.epochs or defaults["epochs"], lr=defaults["lr"],
                         batch_size=defaults["batch_size"], milestones=parse_milestones(defaults["decreasing_lr"]))
    if args.epochs is not None:  # a shortened recipe keeps its decays inside the run
        recipe = TrainRecipe(epochs=args.epochs, lr=defaults["lr"], batch_size=defaults["batch_size"],
                             milestones=tuple(m for m in recipe.milestones if m < args.epochs))
    width = args.width or defaults["width"]
    spec = ModelSpec(args.arch, data.num_classes, data.in_channels, width, tuple(data.mean), tuple(data.std))
    config = ReferenceConfig(args.dataset, spec, recipe, num_models=args.num_models, augment=True, device=str(device))

    start = time.perf_counter()
    refs = ensure_reference_models(config, data, split, os.path.join(args.cache_dir, "ref_models"), jobs=args.jobs,
                                   batch_size=recipe.batch_size)
    train_seconds = time.perf_counter() - start

    pool = attack_pool_data(data)
    index = torch.as_tensor(refs.pool, device=device)
    images, labels_t = pool.train_images[index], pool.train_labels[index]
    labels = labels_t.cpu().numpy()
    phi, phi_mirror, probs = [], [], []
    for k in range(refs.num_models):
        model = refs.load(k, device)
        logits = pool_logits(model, images, labels_t)
        phi.append(logit_scaled(logits, labels_t.cpu()))
        phi_mirror.append(logit_scaled(pool_logits(model, torch.flip(images, dims=[3]), labels_t), labels_t.cpu()))
        probs.append(torch.softmax(logits, 1).numpy())
    phi, phi_mirror = np.stack(phi), np.stack(phi_mirror)
    if not np.allclose(phi, refs.phi, atol=1e-6):
        raise RuntimeError("recomputed signals differ from the cached ones")

    member_all = refs.in_mask
    m_models = refs.num_models
    full_k = m_models - 1
    main_rows: dict[str, list] = {}
    scan_rows: dict[str, list] = {}
    svc_rows: dict[str, list] = {}

    def record(table, name, scores, truth):
        if np.isnan(scores).any():  # no variance can be estimated from these references
            table.setdefault(name, []).append((math.nan, math.nan, len(truth)))
            return
        table.setdefault(name, []).append((roc_auc(scores, truth), tpr_at_fpr(scores, truth, 0.01), len(truth)))

    fit_half = np.random.default_rng(0).random(len(refs.pool)) < 0.5
    for target in range(m_models):
        others = [(target + j) % m_models for j in range(1, m_models)]
        truth = member_all[target]
        t_phi, t_mirror = phi[target], phi_mirror[target]
        r_phi, r_mirror, r_in = phi[others], phi_mirror[others], member_all[others]

        # sanity: the script's own fits reproduce the library's rules exactly
        for fixed in (False, True):
            ours = lira_online(t_phi, r_phi, r_phi, r_in, fixed_variance=fixed)
            mine = online_variant(t_phi, r_phi, r_in, "ours" if fixed else None)
            if not np.allclose(ours, mine, rtol=1e-9, atol=1e-9):
                raise RuntimeError("online_variant does not reproduce evaluation.attacks.lira_online")
            ours_off = lira_offline(t_phi, r_phi, ~r_in, fixed_variance=fixed)
            if not np.allclose(ours_off, offline_variant(t_phi, r_phi, r_in, "ours" if fixed else None), atol=1e-9):
                raise RuntimeError("offline_variant does not reproduce evaluation.attacks.lira_offline")

        for label, fixed in (("per-example variance", None), ("fixed variance", "ours")):
            record(main_rows, f"online, {label} (ours)", online_variant(t_phi, r_phi, r_in, fixed), truth)
            record(main_rows, f"online, {label}, (c) medians",
                   online_variant(t_phi, r_phi, r_in, fixed, centre="median"), truth)
            two_views = 0.5 * (online_variant(t_phi, r_phi, r_in, fixed) +
                               online_variant(t_mirror, r_mirror, r_in, fixed))
            record(main_rows, f"online, {label}, (d) two mirrored views", two_views, truth)
        record(main_rows, "online, fixed, (b) sigma_out from IN values, centred",
               online_variant(t_phi, r_phi, r_in, "in_centred"), truth)
        record(main_rows, "online, fixed, (b) sigma_in = sigma_out = np.std(IN) (ref.)",
               online_variant(t_phi, r_phi, r_in, "in_uncentred", sigma_in_rule="in_uncentred"), truth)
        reference_online = 0.5 * sum(online_variant(t, r, r_in, "in_uncentred", centre="median",
                                                    sigma_in_rule="in_uncentred")
                                     for t, r in ((t_phi, r_phi), (t_mirror, r_mirror)))
        record(main_rows, "online, fixed, reference code (b)+(c)+(d)", reference_online, truth)
        for label, fixed in (("per-example variance", None), ("fixed variance", "ours")):
            record(main_rows, f"offline, {label}, one-sided (ours)", offline_variant(t_phi, r_phi, r_in, fixed),
                   truth)
            record(main_rows, f"offline, {label}, (a) two-sided density",
                   offline_variant(t_phi, r_phi, r_in, fixed, two_sided=True), truth)
        record(main_rows, "offline, fixed, (b) uncentred np.std(OUT) (ref.)",
               offline_variant(t_phi, r_phi, r_in, "uncentred"), truth)
        reference_offline = 0.5 * sum(offline_variant(t, r, r_in, "uncentred", centre="median", two_sided=True)
                                      for t, r in ((t_phi, r_phi), (t_mirror, r_mirror)))
        record(main_rows, "offline, fixed, reference code (a)+(b)+(c)+(d)", reference_offline, truth)

        for k in K_SCAN:
            if k > full_k:
                continue
            chosen = others[:k]
            sub_in = member_all[chosen]
            both = sub_in.any(axis=0) & (~sub_in).any(axis=0)
            sub_phi, sub_t, sub_truth = phi[chosen][:, both], t_phi[both], truth[both]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # K = 2: no example has two values on a side
                for label, fixed in (("per-example", None), ("fixed (ours)", "ours")):
                    record(scan_rows, f"K={k} online, {label} variance",
                           online_variant(sub_t, sub_phi, sub_in[:, both], fixed), sub_truth)
                    record(scan_rows, f"K={k} offline, {label} variance",
                           offline_variant(sub_t, sub_phi, sub_in[:, both], fixed), sub_truth)
                record(scan_rows, f"K={k} online, fixed variance, uncentred np.std(IN) (ref.)",
                       online_variant(sub_t, sub_phi, sub_in[:, both], "in_uncentred",
                                      sigma_in_rule="in_uncentred"), sub_truth)
                record(scan_rows, f"K={k} offline, fixed variance, uncentred np.std(OUT) (ref.)",
                       offline_variant(sub_t, sub_phi, sub_in[:, both], "uncentred"), sub_truth)

        for name, feature in (("Song-Mittal (ours)", m_entropy_song_mittal), ("upstream", m_entropy_upstream),
                              ("paper fork", m_entropy_fork)):
            scores = svc_scores(feature, probs[target], labels, truth, fit_half)
            record(svc_rows, f"(e) SVC on m_entropy, {name}", scores, truth[~fit_half])
        conf = probs[target][np.arange(len(labels)), labels]
        clf = SVC(C=3, gamma="auto", kernel="rbf").fit(conf[fit_half, None], truth[fit_half].astype(int))
        record(svc_rows, "SVC on confidence (MIA-Efficacy's feature), for scale",
               clf.decision_function(conf[~fit_half, None]), truth[~fit_half])

    print(f"{args.dataset}, {args.arch} width {width}, {recipe.epochs} epochs; split seed {args.seed} "
          f"(random {args.num_indexes_to_replace}); {m_models} reference models on {len(refs.pool)} pool examples, "
          f"each the target once with the other {full_k} as references; mean over the {m_models} targets "
          f"(reference models: {train_seconds:.0f} s this call, {refs.train_seconds_total:.0f} s of training in "
          f"the cache)")
    print_table(f"LiRA with K = {full_k} references", summarise(main_rows))
    print_table("Reference models K, fixed against per-example variance (examples with >= 1 IN and >= 1 OUT)",
                summarise(scan_rows))
    print_table("SVC-MIA feature (fit on one half of the pool, scored on the other)", summarise(svc_rows))
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    cli_main(main)
