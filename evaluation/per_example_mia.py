"""Per-example membership inference on unlearned models: LiRA (online, offline), RMIA and U-LiRA, with cached
reference models (`evaluation.reference_models`) and the pure numerics of `evaluation.attacks`.

Hayes et al. (2024) showed that per-example attacks see far more than population attacks such as SVC-MIA. Everything
here takes plain values (models, datasets, splits, a `ReferenceConfig`) and returns a nested dict; nothing knows of
argparse or mlflow.

**The question asked (LiRA, RMIA).** Candidates = the forget set (members of the original model) and the test samples
the split keeps (non-members of every model), labelled forget = 1, test = 0. Each attack scores every candidate
under a *target* model; the ROC of forget vs test is summarised by ROC-AUC, TPR at 1 % and at 0.1 % FPR and the best
balanced accuracy (`attacks.attack_summary`). Targets: the original model, the Retrain model and the unlearned model.
The goal of unlearning is Retrain's numbers, not 0.5 (forget samples that the model generalises to still look a bit
like members), so every number of the method is reported next to Retrain's with the signed gap (method − Retrain;
positive = the attack still sees more of the forget set than in Retrain).

* Signal: logit-scaled confidence φ = log p_y − log(1 − p_y) (`attacks.logit_confidence`) for LiRA and U-LiRA; the
  true-label probability for RMIA.
* LiRA online: per-candidate Gaussians over the reference models trained with (IN) and without (OUT) the candidate.
  Every candidate has both, because the reference pool includes the test samples (see `reference_models`).
* LiRA offline: the OUT models only (one-sided test).
* Fixed variance: with fewer than `FIXED_VARIANCE_BELOW` (16) reference models, per-example standard deviations
  from K/2 values are too noisy, so one shared σ per side is used (LiRA's recommendation; on digits_noisy, fixed
  variance beat per-example variance at every K from 3 to 8 in AUC and in TPR at 1 % FPR, see docs/attacks.md and
  perf/attack_variants.py). Pass `fixed_variance` to override.
* RMIA (offline): Pr(x) = ((1 + a)/2)·mean_OUT(x) + (1 − a)/2 with `a` tuned by `attacks.tune_rmia_a`, attacking every
  reference model with the others (candidates x = the training split, population z = the test samples); with K = 2
  tuning is impossible (each example is IN for one of the two) and ML Privacy Meter's a = 0.3 is used. The
  population z of the real attack is the test set, i.e. the non-member candidates themselves: with γ = 1 the score
  is the empirical CDF of the population's ratios evaluated at ratio(x), a monotone map of ratio(x), so the choice
  of z only sets the resolution (1/|z|), not the ranking.

**U-LiRA** (`--mia ulira`; the question: was this model obtained by unlearning or by retraining?). Per forget example
x, a Gaussian over φ_x under shadow models trained with x and then unlearned by the method under test ("unlearned")
against one over φ_x under shadow models retrained without x ("retrained"); see `attacks.ulira_scores`.

* Shadow pairs reuse the K reference models as the "trained with" models. Pair k's shadow forget set F_k is drawn
  from model k's training half, with the real forget set's scenario and size: it contains every real forget example
  that model k trained on (F ∩ IN_k, about |F|/2 of them), topped up to |F| with random other training-split members
  of model k (random forgetting: any; sub-class forgetting: of the same class; class-wise: none, F_k is the whole
  class as model k saw it). Including F ∩ IN_k is what gives every real forget example K/2 unlearned values (a
  uniform F_k would cover an example about once in 10 pairs at 10 % forgetting).
* Unlearned shadow k = the method under test (same hyper-parameters; unlearning seed derived from the run's and k; a
  user-given SalUn mask is not reused, each shadow computes its own) applied to reference model k over a `SplitData`
  whose train/forget/retain are model k's half / F_k / the rest.
* Retrained shadow k = the original recipe on model k's half minus F_k, from model k's initialisation and shuffle
  seeds (so a perfect method, e.g. `retrain` itself, gives unlearned = retrained). It does not depend on the method,
  so it is cached next to the reference models under a hash of the F_k's (one set per forget set, shared by every
  method and sweep). No real forget example is in any retrained shadow's training set, so all K are OUT values.
* Targets: (a) "ulira": the real unlearned model against the real Retrain model on the real forget set, using all K
  pairs — a balanced set of one unlearned and one retrained target model, |F| examples each; (b) "ulira_shadow":
  leave-one-pair-out — each shadow pair's unlearned and retrained models attacked on the forget examples of F_k ∩ F
  with the other K − 1 pairs (needs K ≥ 4), which uses K target models of each kind drawn from the same distribution
  as the shadows. For both, 0.5 (AUC and accuracy) is ideal. Cost: K unlearning runs per method plus K trainings per
  forget set (cached).
"""
from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dataset import ImageData, Split, SplitData
from evaluation.attacks import (
    RMIA_DEFAULT_A,
    attack_summary,
    lira_offline,
    lira_online,
    rmia_scores,
    roc_curve_points,
    tune_rmia_a,
    ulira_accuracy,
    ulira_scores,
)
from evaluation.reference_models import (
    ReferenceConfig,
    ReferenceModels,
    TrainTask,
    attack_pool_data,
    checkpoint_matches,
    derived_seed,
    ensure_reference_models,
    model_seeds,
    model_signals,
    npz_bytes,
    single_thread,
    train_models,
    training_split,
)
from unlearn import UnlearnContext, run_unlearning
from utils import (
    DivergenceError,
    UserError,
    atomic_write_bytes,
    file_lock,
    load_checkpoint,
    make_generator,
    pyplot,
    save_figure,
    set_seed,
    sha256_of_array,
)

MIA_CHOICES = ("svc", "lira", "rmia", "ulira", "all")
ATTACKS_OF = {"svc": (), "lira": ("lira_online", "lira_offline"), "rmia": ("rmia",), "ulira": ("ulira",),
              "all": ("lira_online", "lira_offline", "rmia", "ulira")}
FIXED_VARIANCE_BELOW = 16
# attack_summary's keys -> result keys that tracking tools accept as metric names ('@' and '%' are not allowed)
METRIC_KEYS = {"auc": "auc", "tpr@1%fpr": "tpr_at_1pct_fpr", "tpr@0.1%fpr": "tpr_at_0.1pct_fpr",
               "balanced_accuracy": "balanced_accuracy"}
TARGETS = ("original", "retrain", "method")


def selected_attacks(mia: str) -> tuple[str, ...]:
    if mia not in ATTACKS_OF:
        raise UserError(f"unknown --mia '{mia}'; allowed: {', '.join(MIA_CHOICES)}")
    return ATTACKS_OF[mia]


def check_num_ref_models(mia: str, num_models: int) -> None:
    """The reference-model count the attacks of `mia` need, checked once here (the command line calls it before any
    work): LiRA and U-LiRA estimate a variance from two IN or two OUT values per example (K >= 3), and every attack
    needs each example both in and out of some model (K >= 2)."""
    attacks = selected_attacks(mia)
    if any(a.startswith("lira") or a == "ulira" for a in attacks) and num_models < 3:
        raise UserError(f"--mia {mia} needs --num_ref_models >= 3 (LiRA's variance needs two IN or two OUT values per "
                        f"example); got {num_models}")
    if attacks and num_models < 2:
        raise UserError(f"--mia {mia} needs --num_ref_models >= 2 (every example needs IN and OUT reference models); "
                        f"got {num_models}")


def check_forget_inside_training(mia: str, split: Split) -> None:
    """The per-example attacks ask about forget samples as members of the original model: every one must be in its
    training split (not so under `--split upstream`). Checked as soon as the split is known, before any training."""
    outside = int((~np.isin(split.forget, split.train)).sum()) if selected_attacks(mia) else 0
    if outside:
        raise UserError(f"per-example attacks need the forget set inside the original model's training split; "
                        f"{outside} forget samples are outside it (use --split consistent)")


def summary(scores: np.ndarray, is_member: np.ndarray) -> dict[str, float]:
    """`attacks.attack_summary` under metric-safe key names."""
    return {METRIC_KEYS[k]: v for k, v in attack_summary(scores, is_member).items()}


def _ulira_summary(scores_unlearned: np.ndarray, scores_retrained: np.ndarray) -> dict[str, float]:
    return {METRIC_KEYS[k]: v for k, v in ulira_accuracy(scores_unlearned, scores_retrained).items()}


@dataclass(frozen=True)
class UliraRequest:
    """The method under test as the unlearning driver runs it (`unlearn.resolve_method`, `resolve_hyperparameters`)."""

    method: Any            # unlearn.ResolvedMethod
    hp: dict
    unlearn_seed: int
    paper_era: bool = False  # the run-level switch the real run had (unlearn.UnlearnContext.paper_era)


# ---------------------------------------------------------------------------------------------------------------------
# Candidates and target signals
# ---------------------------------------------------------------------------------------------------------------------

@dataclass
class Candidates:
    forget: np.ndarray      # indices into the train arrays
    test: np.ndarray        # indices into the test arrays
    combined: np.ndarray    # pool (combined) indices: forget, then len(train) + test
    is_forget: np.ndarray   # bool, True for the forget candidates

    @classmethod
    def of(cls, split: Split, num_train: int) -> Candidates:
        forget, test = np.asarray(split.forget, np.int64), np.asarray(split.test, np.int64)
        if len(forget) == 0 or len(test) == 0:
            raise UserError("per-example attacks need a non-empty forget set and test set")
        return cls(forget=forget, test=test, combined=np.concatenate([forget, num_train + test]),
                   is_forget=np.r_[np.ones(len(forget), bool), np.zeros(len(test), bool)])


def candidate_signals(model: torch.nn.Module, data: ImageData, candidates: Candidates) -> tuple[np.ndarray, np.ndarray]:
    """(φ, true-label probability) of the target on the candidates (forget first, then test)."""
    device = data.train_images.device
    forget = torch.as_tensor(candidates.forget, device=device)
    test = torch.as_tensor(candidates.test, device=device)
    images = torch.cat([data.train_images[forget], data.test_images[test]])
    labels = torch.cat([data.train_labels[forget], data.test_labels[test]])
    return model_signals(model, images, labels)


# ---------------------------------------------------------------------------------------------------------------------
# LiRA and RMIA on one target
# ---------------------------------------------------------------------------------------------------------------------

@dataclass
class ReferenceView:
    """The reference signals restricted to the candidates, plus what RMIA needs."""

    phi: np.ndarray          # (K, n_candidates)
    prob: np.ndarray
    in_mask: np.ndarray      # (K, n_candidates)
    population_prob: np.ndarray  # (K, m) reference probabilities of the population z (test samples)
    population_mask: np.ndarray


def reference_view(refs: ReferenceModels, candidates: Candidates, num_train: int) -> ReferenceView:
    cols = refs.columns(candidates.combined)
    z = refs.columns(num_train + candidates.test)
    return ReferenceView(phi=refs.phi[:, cols], prob=refs.prob[:, cols], in_mask=refs.in_mask[:, cols],
                         population_prob=refs.prob[:, z], population_mask=refs.in_mask[:, z])


def tune_rmia(refs: ReferenceModels, num_train: int, population: np.ndarray) -> tuple[float, list]:
    """RMIA's a on the reference models: candidates = the training-split part of the pool, z = the population."""
    train_cols = np.flatnonzero(refs.pool < num_train)
    z = refs.columns(num_train + population)
    best, aucs = tune_rmia_a(refs.prob[:, train_cols], refs.in_mask[:, train_cols], refs.prob[:, z],
                             refs.in_mask[:, z])
    return best, [float(v) for v in aucs]


def attack_scores(attack: str, phi: np.ndarray, prob: np.ndarray, view: ReferenceView, fixed_variance: bool,
                  rmia_a: float, population_target_prob: np.ndarray) -> np.ndarray:
    if attack == "lira_online":
        return lira_online(phi, view.phi, view.phi, view.in_mask, fixed_variance=fixed_variance)
    if attack == "lira_offline":
        return lira_offline(phi, view.phi, ~view.in_mask, fixed_variance=fixed_variance)
    if attack == "rmia":
        return rmia_scores(prob, view.prob, view.in_mask, population_target_prob, view.population_prob,
                           view.population_mask, a=rmia_a, offline=True)
    raise ValueError(f"unknown attack '{attack}'")


# ---------------------------------------------------------------------------------------------------------------------
# U-LiRA
# ---------------------------------------------------------------------------------------------------------------------

def shadow_forget_sets(refs: ReferenceModels, forget: np.ndarray, train_labels: np.ndarray, num_train: int,
                       class_to_replace: int) -> list[np.ndarray]:
    """F_k for every reference model k (see the module docstring); sorted train indices."""
    forget = np.asarray(forget, np.int64)
    sets = []
    for k in range(refs.num_models):
        members = refs.pool[refs.in_mask[k]]
        members = members[members < num_train]
        kept = np.intersect1d(forget, members)
        eligible = np.setdiff1d(members, forget)
        if class_to_replace >= 0:
            eligible = eligible[train_labels[eligible] == class_to_replace]
        need = min(max(len(forget) - len(kept), 0), len(eligible))
        rng = np.random.default_rng(derived_seed(refs.config.design_seed, k, 2))
        fill = rng.choice(eligible, size=need, replace=False) if need else np.empty(0, np.int64)
        sets.append(np.sort(np.concatenate([kept, fill]).astype(np.int64)))
    return sets


def ensure_retrained_shadows(refs: ReferenceModels, shadow_forgets: list[np.ndarray], data: ImageData, jobs: int,
                             batch_size: int, log: Callable[[str], None]) -> tuple[list[Path], list[int], float]:
    """The K retrained-without shadows, cached under a hash of the shadow forget sets. Returns (paths, trained now,
    wall seconds)."""
    start = time.perf_counter()
    digest = sha256_of_array(np.concatenate([np.r_[len(f), f] for f in shadow_forgets]))[:12]
    directory = refs.directory / f"ulira_retrained_{digest}"
    paths = [directory / f"retrain_{k:03d}.pth.tar" for k in range(refs.num_models)]
    with file_lock(directory):  # one holder per folder: concurrent runs train each shadow once
        if not (directory / "shadow_forget.npz").is_file():
            atomic_write_bytes(directory / "shadow_forget.npz",
                               npz_bytes(**{f"forget_{k:03d}": f for k, f in enumerate(shadow_forgets)}))
        missing = [k for k, path in enumerate(paths) if not checkpoint_matches(path, digest, k)]
        if missing:
            log(f"U-LiRA: training {len(missing)} of {refs.num_models} retrained shadow models into {directory}")
            tasks = []
            for k in missing:
                init_seed, shuffle_seed = model_seeds(refs.config.design_seed, k)
                members = np.setdiff1d(refs.pool[refs.in_mask[k]], shadow_forgets[k])
                tasks.append(TrainTask(path=str(paths[k]), members=members, init_seed=init_seed,
                                       shuffle_seed=shuffle_seed,
                                       metadata={"kind": "ulira_retrained", "cache_key": digest, "index": k,
                                                 "reference_key": refs.directory.name}))
            train_models(tasks, attack_pool_data(data), refs.config, jobs=jobs, batch_size=batch_size, log=log)
    return paths, missing, time.perf_counter() - start


def unlearn_shadow(refs: ReferenceModels, k: int, shadow_forget: np.ndarray, pool_data: ImageData, split: Split,
                   request: UliraRequest, batch_size: int, augment: bool) -> tuple[torch.nn.Module, bool]:
    """Reference model k unlearned by the method under test on F_k. Returns (model, diverged)."""
    device = pool_data.train_images.device
    config = refs.config
    init_seed, shuffle_seed = model_seeds(config.design_seed, k)
    members = refs.pool[refs.in_mask[k]]
    shadow = SplitData(pool_data, training_split(config.dataset, members, shadow_forget, val=split.val,
                                                 test=split.test), batch_size=batch_size, augment=augment)
    hp = dict(request.hp)
    if hp.get("mask_path") is not None:
        hp["mask_path"] = None  # the user's mask belongs to the real model; each shadow computes its own
    seed = derived_seed(request.unlearn_seed, k, 3)
    diverged = False
    with tempfile.TemporaryDirectory(prefix="ulira-shadow-") as scratch, single_thread(device):
        set_seed(seed)
        ctx = UnlearnContext(model=refs.load(k, device), data=shadow, generator=make_generator(seed), hp=hp,
                             model_factory=lambda: config.model.build(init_seed), train_recipe=config.recipe,
                             retrain_seed=shuffle_seed, artifacts_dir=Path(scratch), progress=False,
                             log=lambda message: None, paper_era=request.paper_era, amp=config.amp)
        instance = request.method.cls(ctx)
        instance.name = request.method.name
        try:
            run_unlearning(instance, hp.get("epochs", 1), progress=False)
        except DivergenceError:
            diverged = True  # the driver restored the last finite weights; attack those
        return instance.evaluation_model(), diverged


def run_ulira(refs: ReferenceModels, data: ImageData, split: Split, splits: SplitData, request: UliraRequest,
              method_model: torch.nn.Module, retrain_model: torch.nn.Module | None, fixed_variance: bool, jobs: int,
              log: Callable[[str], None]) -> tuple[dict, dict[str, np.ndarray]]:
    num_train = len(data.train_labels)
    forget = np.asarray(split.forget, np.int64)
    refs.columns(forget)  # forget must lie in the pool
    shadow_forgets = shadow_forget_sets(refs, forget, data.train_labels.cpu().numpy(), num_train,
                                        split.class_to_replace)
    retrained_paths, trained_now, retrain_seconds = ensure_retrained_shadows(
        refs, shadow_forgets, data, jobs, splits.batch_size, log)

    device = data.train_images.device
    forget_images = data.train_images[torch.as_tensor(forget, device=device)]
    forget_labels = data.train_labels[torch.as_tensor(forget, device=device)]
    pool_data = attack_pool_data(data)
    k_models = refs.num_models
    unlearned_phi = np.zeros((k_models, len(forget)))
    retrained_phi = np.zeros((k_models, len(forget)))
    unlearned_mask = np.stack([np.isin(forget, f) for f in shadow_forgets])
    start = time.perf_counter()
    diverged = 0
    for k in range(k_models):
        model, failed = unlearn_shadow(refs, k, shadow_forgets[k], pool_data, split, request, splits.batch_size,
                                       splits.augment)
        diverged += failed
        retrained = refs.config.model.build(0).to(device)
        retrained.load_state_dict(load_checkpoint(retrained_paths[k])["state_dict"])
        with single_thread(device):  # as the reference signals
            unlearned_phi[k] = model_signals(model, forget_images, forget_labels)[0]
            retrained_phi[k] = model_signals(retrained, forget_images, forget_labels)[0]
        log(f"  U-LiRA shadow pair {k + 1}/{k_models} unlearned")
    unlearn_seconds = time.perf_counter() - start

    result: dict[str, Any] = {"shadow_pairs": k_models, "shadow_forget_size": [int(len(f)) for f in shadow_forgets],
                              "unlearned_values_per_example_min": int(unlearned_mask.sum(0).min()),
                              "diverged_shadows": int(diverged), "retrained_shadows_trained_now": len(trained_now),
                              "retrained_shadows_dir": str(retrained_paths[0].parent)}
    arrays = {"ulira_unlearned_phi": unlearned_phi, "ulira_retrained_phi": retrained_phi,
              "ulira_unlearned_mask": unlearned_mask}
    if not unlearned_mask.any(axis=0).all():
        raise UserError("U-LiRA: some forget examples were unlearned by no shadow pair; use more reference models")
    start = time.perf_counter()
    method_phi = model_signals(method_model, forget_images, forget_labels)[0]
    score_method = ulira_scores(method_phi, unlearned_phi, retrained_phi, fixed_variance, unlearned_mask)
    arrays.update(ulira_target_phi_method=method_phi, ulira_scores_method=score_method)
    if retrain_model is not None:
        retrain_phi = model_signals(retrain_model, forget_images, forget_labels)[0]
        score_retrain = ulira_scores(retrain_phi, unlearned_phi, retrained_phi, fixed_variance, unlearned_mask)
        result["ulira"] = _ulira_summary(score_method, score_retrain)
        arrays.update(ulira_target_phi_retrain=retrain_phi, ulira_scores_retrain=score_retrain)
    else:
        result["ulira"] = None
        result["ulira_note"] = "no Retrain model: the real-target U-LiRA needs one (main_baseline.py --retrain)"
    shadow_u, shadow_r = [], []
    for k in range(k_models):
        others = np.arange(k_models) != k
        examples = unlearned_mask[k] & unlearned_mask[others].any(axis=0)
        if not examples.any():
            continue
        refs_u, refs_r, mask = unlearned_phi[others][:, examples], retrained_phi[others][:, examples], \
            unlearned_mask[others][:, examples]
        shadow_u.append(ulira_scores(unlearned_phi[k, examples], refs_u, refs_r, fixed_variance, mask))
        shadow_r.append(ulira_scores(retrained_phi[k, examples], refs_u, refs_r, fixed_variance, mask))
    if shadow_u:
        result["ulira_shadow"] = _ulira_summary(np.concatenate(shadow_u), np.concatenate(shadow_r))
        arrays.update(ulira_shadow_scores_unlearned=np.concatenate(shadow_u),
                      ulira_shadow_scores_retrained=np.concatenate(shadow_r))
    else:
        result["ulira_shadow"] = None
    result["seconds"] = {"retrained_shadows": retrain_seconds, "shadow_unlearning": unlearn_seconds,
                         "scoring": time.perf_counter() - start}
    return result, arrays


# ---------------------------------------------------------------------------------------------------------------------
# Everything together
# ---------------------------------------------------------------------------------------------------------------------

def evaluate_per_example_mia(mia: str, *, data: ImageData, split: Split, splits: SplitData, config: ReferenceConfig,
                             cache_root: str | Path, method_model: torch.nn.Module,
                             original_model: torch.nn.Module | None = None,
                             retrain_model: torch.nn.Module | None = None, method_label: str = "method",
                             ulira: UliraRequest | None = None, jobs: int = 1, fixed_variance: bool | None = None,
                             scores_path: str | Path | None = None, roc_path: str | Path | None = None,
                             log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the attacks of `mia` (lira, rmia, ulira, all) on the method's model, the original and Retrain.

    Returns the nested dict stored under "per_example_mia" in the result JSON: per attack `<attack>` (the method),
    `original_<attack>`, `retrain_<attack>`, `gap_<attack>` (method − Retrain), each {auc, tpr_at_1pct_fpr,
    tpr_at_0.1pct_fpr, balanced_accuracy}; U-LiRA under `ulira` / `ulira_shadow`; plus the design (K, fixed variance,
    RMIA's a), timings and file paths. Writes the per-example scores (`scores_path`, .npz) and the log-scale ROC
    curves (`roc_path`, .png) when given.
    """
    attacks = selected_attacks(mia)
    if not attacks:
        return {}
    check_num_ref_models(mia, config.num_models)
    check_forget_inside_training(mia, split)
    num_train = len(data.train_labels)
    candidates = Candidates.of(split, num_train)
    refs = ensure_reference_models(config, data, split, cache_root, jobs=jobs, batch_size=splits.batch_size, log=log)
    fixed = refs.num_models < FIXED_VARIANCE_BELOW if fixed_variance is None else bool(fixed_variance)
    view = reference_view(refs, candidates, num_train)
    result: dict[str, Any] = {
        "attacks": list(attacks), "num_ref_models": refs.num_models, "fixed_variance": fixed,
        "num_forget": int(len(candidates.forget)), "num_test": int(len(candidates.test)),
        "population": "test", "reference_cache": str(refs.directory),
        "reference_models_trained_now": len(refs.trained_now),
    }
    seconds: dict[str, float] = {"reference_models": refs.seconds_now,
                                 "reference_models_train_total": refs.train_seconds_total}
    arrays: dict[str, np.ndarray] = {
        "forget_indices": candidates.forget, "test_indices": candidates.test, "is_forget": candidates.is_forget,
        "reference_phi": view.phi, "reference_prob": view.prob, "reference_in_mask": view.in_mask,
    }
    curves: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}

    score_attacks = [a for a in attacks if a != "ulira"]
    rmia_a = None
    if "rmia" in score_attacks:
        start = time.perf_counter()
        if refs.num_models >= 3:
            rmia_a, aucs = tune_rmia(refs, num_train, candidates.test)
        else:  # with two models, each example is IN for one: no pseudo-target has OUT candidates among the others
            rmia_a, aucs = RMIA_DEFAULT_A, None
        seconds["rmia_tuning"] = time.perf_counter() - start
        result.update(rmia_a=rmia_a, rmia_a_tuning_auc=aucs)
    targets = {"original": original_model, "retrain": retrain_model, "method": method_model}
    signals = {}
    for name, model in targets.items():
        if model is None:
            continue
        phi, prob = candidate_signals(model, data, candidates)
        signals[name] = (phi, prob)
        arrays[f"phi_{name}"], arrays[f"prob_{name}"] = phi, prob
    for attack in score_attacks:
        start = time.perf_counter()
        for name, (phi, prob) in signals.items():
            scores = attack_scores(attack, phi, prob, view, fixed, rmia_a, prob[~candidates.is_forget])
            arrays[f"scores_{attack}_{name}"] = scores
            key = attack if name == "method" else f"{name}_{attack}"
            result[key] = summary(scores, candidates.is_forget)
            fpr, tpr, _ = roc_curve_points(scores, candidates.is_forget)
            curves.setdefault(attack, {})[name] = (fpr, tpr)
        seconds[attack] = time.perf_counter() - start
        if "retrain" in signals:
            result[f"gap_{attack}"] = {m: result[attack][m] - result[f"retrain_{attack}"][m] for m in result[attack]}
    if "ulira" in attacks:
        if ulira is None:
            raise UserError("U-LiRA needs the method under test (its resolved class and hyper-parameters)")
        start = time.perf_counter()
        ulira_result, ulira_arrays = run_ulira(refs, data, split, splits, ulira, method_model, retrain_model, fixed,
                                               jobs, log)
        seconds["ulira"] = time.perf_counter() - start
        seconds.update({f"ulira_{k}": v for k, v in ulira_result.pop("seconds").items()})
        result.update(ulira_result)
        arrays.update(ulira_arrays)
        for key, positives, negatives in (("ulira", "ulira_scores_method", "ulira_scores_retrain"),
                                          ("ulira_shadow", "ulira_shadow_scores_unlearned",
                                           "ulira_shadow_scores_retrained")):
            if positives in arrays and negatives in arrays:
                labels = np.r_[np.ones(len(arrays[positives]), bool), np.zeros(len(arrays[negatives]), bool)]
                fpr, tpr, _ = roc_curve_points(np.r_[arrays[positives], arrays[negatives]], labels)
                curves.setdefault("ulira", {})["real targets" if key == "ulira" else "shadow pairs (leave one out)"] \
                    = (fpr, tpr)
    result["seconds"] = seconds
    if scores_path is not None:
        atomic_write_bytes(scores_path, npz_bytes(**arrays))
        result["scores_file"] = str(scores_path)
    if roc_path is not None and curves:
        plot_roc(curves, roc_path, method_label)
        result["roc_file"] = str(roc_path)
    return result


def plot_roc(curves: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]], path: str | Path,
             method_label: str) -> Path:
    """Log-log ROC curves, one panel per attack (LiRA's presentation), written atomically as PNG."""
    plt = pyplot()
    names = {"original": "original", "retrain": "Retrain", "method": method_label}
    fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 4), squeeze=False)
    for ax, (attack, by_target) in zip(axes[0], curves.items()):
        for target, (fpr, tpr) in by_target.items():
            ax.plot(fpr, tpr, label=names.get(target, target))
        ax.plot([1e-4, 1], [1e-4, 1], color="gray", linestyle=":", linewidth=1)
        ax.set_xscale("log"), ax.set_yscale("log")
        ax.set_xlim(1e-3, 1), ax.set_ylim(1e-3, 1)
        ax.set_xlabel("false positive rate"), ax.set_ylabel("true positive rate")
        ax.set_title("U-LiRA: unlearned vs retrained" if attack == "ulira" else f"{attack}: forget vs test")
        ax.legend(loc="lower right", fontsize=8)
    return save_figure(fig, path)
