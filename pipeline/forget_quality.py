"""The forgetting-quality stage (`--forget_quality N`): the NeurIPS 2023 unlearning competition's score of the method
under test, computed by `evaluation.forget_quality` from 2N models.

* **Unlearned side.** The method runs N more times on the same original model (the model the main run unlearned), run
  i with the seeds `unlearning_seeds(--unlearn_seed, i)`: one for the run's generator and the global RNG (data order,
  random labels, masks, any sampling) and, for methods that train from scratch (`retrain`), one for the
  initialisation and one for the shuffles. The main run's own model is not one of the N (its seed is not derived).
  Runs train with one intra-op thread on CPU (tiny models run several times faster so, and a worker's numbers equal
  the main process's), in `--jobs` worker processes when asked.
* **Retrained side.** N models trained on the retain set with the original recipe (architecture, width, epochs,
  augmentation; final weights, as Retrain), model k from the fixed seeds `retrained_seeds(k)`, so every run, method
  and sweep on the same retain set and recipe shares them. They live in the per-example attacks' cache root
  (`{save_dir}/ref_models/`), in `fq_<dataset>_<arch>_w<width>_<hash>/retrain_<k>.pth.tar`, the hash covering the
  dataset, architecture, width, class count, recipe, augmentation and the retain indices (not N: a run with a larger N
  adds models, a smaller one reads the first N). They are trained by the attacks' machinery
  (`evaluation.reference_models.train_models`: only what is missing, in `--jobs` worker processes, on the run's
  device), and their confidences and accuracies are cached next to them (`signals_<hash>.npz`, per forget and test
  set), so a later run reads numbers, not models. Models and signals are read and written under one lock on the
  folder, so runs of one split that ask at the same time train each model once and never interleave their writes.
  U-LiRA's retrained shadows cannot stand in for these: each is trained on half of the attack pool minus a shadow
  forget set, not on this split's retain set.
* **Score.** Per forget example, the logit-scaled confidences of the N unlearned and the N retrained models give an ε
  (`example_epsilons`), ε gives points, the mean is F, and F times the retain and test accuracy ratios (mean over the
  N unlearned models / mean over the N retrained models) is the competition's final score.
* **Reference rows.** `--unlearn retrain` retrains N more times with seeds of its own (a sanity row near the top
  score); `--unlearn raw` leaves the original N times, so both samples of every example have no spread on the
  unlearned side and the score is 0 by the spike rule. A method that is deterministic (`UnlearnMethod.deterministic`:
  raw, SSD, wfisher) gives N identical models: `constant_method_note` says so in one line before any work, and the
  runs are still made and checked (`identical_runs` in the result).

Files next to the result JSON: `{save_dir}/{unlearn}forget_quality.npz` (per-example ε and points, the confidences of
both sides, the per-model accuracies and seeds) and `{save_dir}/{unlearn}forget_quality.png` (histogram of ε).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dataset import ImageData, Split, SplitData, TensorLoader
from evaluation.forget_quality import (
    BUCKET_WIDTH,
    EPSILON_CAP,
    bucket_scores,
    check_num_models,
    example_epsilons,
    final_score,
    forget_score_from_epsilons,
    logit_scaled_confidence,
    num_buckets,
)
from evaluation.metrics import predict
from evaluation.reference_models import (
    DEFAULT_DESIGN_SEED,
    ModelSpec,
    ReferenceConfig,
    TrainTask,
    checkpoint_matches,
    derived_seed,
    npz_bytes,
    single_thread,
    train_models,
)
from pipeline import paths
from pipeline.config import RunConfig
from pipeline.mia import reference_config
from pipeline.stages import Prepared, Unlearned, load_model
from unlearn import UnlearnContext, resolve_method, run_unlearning
from utils import (
    DivergenceError,
    UserError,
    atomic_write_bytes,
    atomic_write_json,
    file_lock,
    load_checkpoint,
    make_generator,
    pyplot,
    save_figure,
    set_seed,
    sha256_of_array,
)

CACHE_VERSION = 1
# Seed stream of this stage, so its derived seeds never coincide with those of the per-example attacks.
SEED_STREAM = 7
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9, 0.99)


# ---------------------------------------------------------------------------------------------------------------------
# Seeds
# ---------------------------------------------------------------------------------------------------------------------

def retrained_seeds(index: int, design_seed: int = DEFAULT_DESIGN_SEED) -> tuple[int, int]:
    """(initialisation, shuffle) seeds of cached retrained model `index`: fixed, so every run shares the models."""
    return derived_seed(design_seed, SEED_STREAM, index, 0), derived_seed(design_seed, SEED_STREAM, index, 1)


def unlearning_seeds(unlearn_seed: int, index: int) -> tuple[int, int, int]:
    """(run, initialisation, shuffle) seeds of unlearning run `index`; never equal to `retrained_seeds` (other last
    element), so `--unlearn retrain` draws models other than the cached ones."""
    return tuple(derived_seed(unlearn_seed, SEED_STREAM, index, part) for part in (2, 3, 4))  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------------------------------
# Before any work
# ---------------------------------------------------------------------------------------------------------------------

def constant_method_note(config: RunConfig) -> str | None:
    """One line when --forget_quality is asked of a method whose N runs are identical (score 0 by construction)."""
    if not config.eval.forget_quality:
        return None
    method = resolve_method(config.method.name, config.method.grad_mask)
    if not method.cls.deterministic:
        return None
    return (f"warning: --forget_quality with {method.label}: the method is deterministic, so its "
            f"{config.eval.forget_quality} runs give the same model and the forgetting quality is 0 by construction "
            f"(no spread on the unlearned side)")


def warn_constant_method(config: RunConfig) -> None:
    note = constant_method_note(config)
    if note:
        print(note, flush=True)


# ---------------------------------------------------------------------------------------------------------------------
# Model outcomes: forget confidences, retain and test accuracy
# ---------------------------------------------------------------------------------------------------------------------

@dataclass
class Outcomes:
    """Per model: logit-scaled confidence on each forget example, retain and test accuracy (fractions)."""

    phi: np.ndarray          # (models, forget examples), float64
    retain_acc: np.ndarray   # (models,)
    test_acc: np.ndarray     # (models,)

    @classmethod
    def empty(cls, num_forget: int) -> Outcomes:
        return cls(np.zeros((0, num_forget)), np.zeros(0), np.zeros(0))

    def __len__(self) -> int:
        return int(self.retain_acc.shape[0])


def _accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int) -> float:
    if len(labels) == 0:
        return float("nan")
    logits, targets = predict(model, TensorLoader(images, labels, batch_size))
    return float((logits.argmax(1) == targets).double().mean())


def model_outcome(model: torch.nn.Module, splits: SplitData) -> tuple[np.ndarray, float, float]:
    """(forget confidences, retain accuracy, test accuracy) of one model, in eval mode, on unaugmented images."""
    batch = max(splits.batch_size, 512)
    logits, targets = predict(model, splits.eval_loader("forget", batch_size=batch))
    phi = logit_scaled_confidence(logits, targets)
    return (phi, _accuracy(model, *splits.tensors("retain"), batch),
            _accuracy(model, *splits.tensors("test"), batch))


# ---------------------------------------------------------------------------------------------------------------------
# The cached retrained models
# ---------------------------------------------------------------------------------------------------------------------

def retrained_directory(cache_root: str | Path, config: ReferenceConfig, split: Split) -> tuple[Path, dict]:
    spec = config.model
    fields = {"version": CACHE_VERSION, "kind": "forget_quality_retrained", "dataset": config.dataset,
              "arch": spec.arch, "num_classes": spec.num_classes, "in_channels": spec.in_channels,
              "width": spec.width, "recipe": dataclasses.asdict(config.recipe), "augment": bool(config.augment),
              "design_seed": config.design_seed, "retain_hash": sha256_of_array(np.asarray(split.retain, np.int64)),
              **config.precision_fields()}
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]
    width = "default" if spec.width is None else spec.width
    return Path(cache_root) / f"fq_{config.dataset}_{spec.arch}_w{width}_{digest}", {**fields, "key": digest}


def retrained_path(directory: Path, index: int) -> Path:
    return directory / f"retrain_{index:03d}.pth.tar"


@dataclass
class RetrainedModels:
    directory: Path
    outcomes: Outcomes
    trained_now: list[int]
    seconds: float


def ensure_retrained(config: ReferenceConfig, data: ImageData, splits: SplitData, cache_root: str | Path,
                     num_models: int, jobs: int = 1, log: Callable[[str], None] = print) -> RetrainedModels:
    """The first `num_models` retrained models of this retain set and recipe (training the missing ones, once even
    when several runs ask at the same time) and their outcomes on this split (read from the cache when known)."""
    start = time.perf_counter()
    split = splits.split
    directory, fields = retrained_directory(cache_root, config, split)
    key = fields["key"]
    with file_lock(directory):
        if not (directory / "config.json").is_file():
            atomic_write_json(directory / "config.json", fields)
        missing = [k for k in range(num_models) if not checkpoint_matches(retrained_path(directory, k), key, k)]
        if missing:
            log(f"forget quality: training {len(missing)} of {num_models} models retrained on the retain set into "
                f"{directory} (jobs={jobs})")
            tasks = []
            for k in missing:
                init_seed, shuffle_seed = retrained_seeds(k, config.design_seed)
                tasks.append(TrainTask(path=str(retrained_path(directory, k)),
                                       members=np.asarray(split.retain, np.int64), init_seed=init_seed,
                                       shuffle_seed=shuffle_seed,
                                       metadata={"kind": "forget_quality_retrained", "cache_key": key, "index": k,
                                                 "arch": config.model.arch, "dataset": config.dataset,
                                                 "width": config.model.width,
                                                 "num_classes": config.model.num_classes,
                                                 "init_seed": init_seed, "shuffle_seed": shuffle_seed}))
            train_models(tasks, data, config, jobs=jobs, batch_size=splits.batch_size, log=log)
        # Under the same lock: another run may be adding its rows to the signals file right now.
        outcomes = _retrained_outcomes(directory, config, splits, num_models, set(missing))
    return RetrainedModels(directory=directory, outcomes=outcomes, trained_now=missing,
                           seconds=time.perf_counter() - start)


def retrained_models_of_run(p: Prepared, width: int | None, log: Callable[[str], None] = print) -> RetrainedModels:
    """The run's `--forget_quality` retrained models (its retain set, its recipe, `width`), trained with `--jobs`
    where missing. The benchmark's Retrain-row cell calls this before the method cells of its forget set run."""
    num_models = p.config.eval.forget_quality
    config = dataclasses.replace(reference_config(p, width), num_models=num_models)
    return ensure_retrained(config, p.data, p.splits, p.save_dir / paths.REFERENCE_CACHE, num_models,
                            jobs=p.config.eval.jobs, log=log)


def _retrained_outcomes(directory: Path, config: ReferenceConfig, splits: SplitData, num_models: int,
                        retrained_now: set[int]) -> Outcomes:
    """Outcomes of retrained models 0..num_models-1 on this split's forget and test sets; rows already in the signals
    file (and not retrained by this call) are read, the others computed from the checkpoints and added."""
    split = splits.split
    forget, test = np.asarray(split.forget, np.int64), np.asarray(split.test, np.int64)
    digest = sha256_of_array(np.concatenate([[len(forget)], forget, [len(test)], test]))[:12]
    signals_file = directory / f"signals_{digest}.npz"
    stored = Outcomes.empty(len(forget))
    if signals_file.is_file():
        with np.load(signals_file) as saved:
            stored = Outcomes(saved["phi"], saved["retain_acc"], saved["test_acc"])
    known = [k for k in range(min(len(stored), num_models)) if k not in retrained_now]
    if len(known) == num_models:
        return Outcomes(stored.phi[:num_models], stored.retain_acc[:num_models], stored.test_acc[:num_models])
    size = max(len(stored), num_models)
    phi = np.zeros((size, len(forget)))
    retain_acc, test_acc = np.zeros(size), np.zeros(size)
    phi[:len(stored)], retain_acc[:len(stored)], test_acc[:len(stored)] = stored.phi, stored.retain_acc, stored.test_acc
    device = splits.device
    for k in sorted(set(range(num_models)) - set(known)):
        model = config.model.build(0).to(device)
        model.load_state_dict(load_checkpoint(retrained_path(directory, k))["state_dict"])
        phi[k], retain_acc[k], test_acc[k] = model_outcome(model, splits)
    atomic_write_bytes(signals_file, npz_bytes(phi=phi, retain_acc=retain_acc, test_acc=test_acc, forget=forget,
                                               test=test))
    return Outcomes(phi[:num_models], retain_acc[:num_models], test_acc[:num_models])


# ---------------------------------------------------------------------------------------------------------------------
# The N unlearning runs
# ---------------------------------------------------------------------------------------------------------------------

@dataclass
class UnlearningRuns:
    outcomes: Outcomes
    seeds: np.ndarray        # (N, 3): run, initialisation, shuffle seed of each run
    diverged: int
    identical: bool          # every run gave the same forget confidences
    seconds: float


@dataclass(frozen=True)
class RunSetting:
    """What one unlearning run needs besides the data, as plain values (sent to worker processes)."""

    method_name: str
    grad_mask: str | None
    hp: dict
    spec: ModelSpec          # builds the architecture; a seeded build equals `stages.build_model`'s
    recipe: Any              # training.TrainRecipe (Retrain's recipe)
    paper_era: bool
    state: dict              # the original model's weights, on CPU
    amp: str = "off"         # --amp: the precision of the method's forward passes


def unlearn_once(setting: RunSetting, splits: SplitData, seeds: tuple[int, int, int]
                 ) -> tuple[np.ndarray, float, float, bool]:
    """One run of the method on a copy of the original model: (forget confidences, retain acc, test acc, diverged).
    One intra-op thread on CPU, as the retrained models: the same numbers in the main process and in a worker."""
    run_seed, init_seed, shuffle_seed = seeds
    method = resolve_method(setting.method_name, setting.grad_mask)
    device = splits.device
    model = setting.spec.build(0).to(device)
    model.load_state_dict(setting.state)
    diverged = False
    # A scratch folder per run: a method's artefacts (SalUn's mask) must not replace the main run's files.
    with tempfile.TemporaryDirectory(prefix="forget-quality-") as scratch, warnings.catch_warnings(), \
            single_thread(device):
        warnings.simplefilter("ignore")  # the main run has shown the method's warnings already
        set_seed(run_seed)
        ctx = UnlearnContext(
            model=model, data=splits, generator=make_generator(run_seed), hp=dict(setting.hp),
            model_factory=lambda: setting.spec.build(init_seed), train_recipe=setting.recipe,
            retrain_seed=shuffle_seed, artifacts_dir=Path(scratch), progress=False, log=lambda message: None,
            paper_era=setting.paper_era, amp=setting.amp)
        instance = method.cls(ctx)
        instance.name = method.name
        try:
            run_unlearning(instance, setting.hp.get("epochs", 1), progress=False)
        except DivergenceError:
            diverged = True  # the driver restored the last finite weights; those are scored
        phi, retain_acc, test_acc = model_outcome(instance.evaluation_model(), splits)
    return phi, retain_acc, test_acc, diverged


_WORKER: dict[str, Any] = {}


def _init_worker(data_cpu: ImageData, split: Split, batch_size: int, augment: bool, device: str,
                 setting: RunSetting) -> None:
    torch.set_num_threads(1)
    data = data_cpu.to(torch.device(device))
    _WORKER.update(splits=SplitData(data, split, batch_size=batch_size, augment=augment), setting=setting)


def _worker_run(job: tuple[int, tuple[int, int, int]]) -> tuple[int, tuple[np.ndarray, float, float, bool]]:
    index, seeds = job
    return index, unlearn_once(_WORKER["setting"], _WORKER["splits"], seeds)


def unlearn_repeatedly(p: Prepared, unl: Unlearned, num_runs: int, jobs: int = 1,
                       log: Callable[[str], None] = print) -> UnlearningRuns:
    """The method of the main run, `num_runs` times on the original model, each with its own derived seeds, in
    `jobs` worker processes (spawn) when jobs > 1."""
    c = p.config
    start = time.perf_counter()
    original, _ = load_model(unl.model_path, p)
    spec = reference_config(p, unl.width).model
    setting = RunSetting(method_name=c.method.name, grad_mask=c.method.grad_mask, hp=dict(unl.hp), spec=spec,
                         recipe=c.model.recipe, paper_era=c.method.paper_era,
                         state={k: v.detach().cpu() for k, v in original.state_dict().items()}, amp=c.model.amp)
    seeds = np.array([unlearning_seeds(c.method.unlearn_seed, i) for i in range(num_runs)], dtype=np.int64)
    jobs_list = [(i, tuple(int(v) for v in seeds[i])) for i in range(num_runs)]
    done: dict[int, tuple[np.ndarray, float, float, bool]] = {}
    jobs = max(1, min(int(jobs), num_runs))
    if jobs == 1:
        for index, run_seeds in jobs_list:
            done[index] = unlearn_once(setting, p.splits, run_seeds)
    else:
        context = multiprocessing.get_context("spawn")
        data_cpu = p.data.to(torch.device("cpu"))
        with context.Pool(jobs, initializer=_init_worker,
                          initargs=(data_cpu, p.split, p.splits.batch_size, p.splits.augment, str(p.device),
                                    setting)) as workers:
            for index, outcome in workers.imap_unordered(_worker_run, jobs_list):
                done[index] = outcome
            workers.close()  # a clean shutdown (the context manager alone terminates the workers)
            workers.join()
    outcomes = Outcomes(np.stack([done[i][0] for i in range(num_runs)]),
                        np.array([done[i][1] for i in range(num_runs)]),
                        np.array([done[i][2] for i in range(num_runs)]))
    identical = bool((outcomes.phi == outcomes.phi[0]).all())
    return UnlearningRuns(outcomes=outcomes, seeds=seeds, diverged=sum(done[i][3] for i in range(num_runs)),
                          identical=identical, seconds=time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------------------------------
# Score and files
# ---------------------------------------------------------------------------------------------------------------------

def score(unlearned: Outcomes, retrained: Outcomes, device: torch.device | None = None) -> dict[str, Any]:
    """F, the final score and its ratios, the ε quantiles; plus the per-example arrays under "arrays"."""
    num_models = len(unlearned)
    epsilons = example_epsilons(unlearned.phi, retrained.phi, device=device)
    points = bucket_scores(epsilons, num_models)
    forget = forget_score_from_epsilons(epsilons, num_models)
    final = final_score(forget, unlearned.retain_acc, unlearned.test_acc, retrained.retain_acc, retrained.test_acc)
    quantiles = {f"q{round(q * 100)}": float(np.quantile(epsilons, q)) for q in QUANTILES}
    quantiles["max"] = float(epsilons.max())
    return {
        "num_models": num_models, "forget_score": forget, "final_score": final,
        "retain_acc_ratio": float(unlearned.retain_acc.mean() / retrained.retain_acc.mean()),
        "test_acc_ratio": float(unlearned.test_acc.mean() / retrained.test_acc.mean()),
        "epsilon_quantiles": quantiles,
        "epsilon_at_cap_fraction": float((epsilons >= EPSILON_CAP).mean()),
        "arrays": {"epsilons": epsilons, "points": points},
    }


def plot_epsilons(epsilons: np.ndarray, num_models: int, forget_score: float, path: Path, label: str) -> Path:
    """Histogram of the forget examples' ε on the bucket grid; everything at or beyond the last bucket (no points,
    including the cap) is drawn as one bar past it."""
    plt = pyplot()
    top = num_buckets(num_models) * BUCKET_WIDTH
    edges = np.arange(0.0, top + BUCKET_WIDTH + 1e-9, BUCKET_WIDTH)
    shown = np.minimum(epsilons, top + BUCKET_WIDTH / 2)  # ≥ top lands in the extra bar
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.hist(shown, bins=edges, color="tab:blue", edgecolor="white")
    ax.axvline(top, color="gray", linestyle=":", linewidth=1)
    ax.set_xticks(edges)
    ax.set_xticklabels([f"{e:g}" for e in edges[:-1]] + [f"≥{top:g}"], fontsize=8)
    ax.set_xlabel("per-example ε (buckets of 0.5; the last bar scores 0)")
    ax.set_ylabel("forget examples")
    ax.set_title(f"{label}: forgetting quality F = {forget_score:.3f} (N = {num_models})")
    return save_figure(fig, path)


def forget_quality(p: Prepared, unl: Unlearned, write_files: bool = True,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    """The stage: {} when --forget_quality is 0, else the dict stored under "forget_quality" in the result JSON."""
    c = p.config
    num_models = c.eval.forget_quality
    if not num_models:
        return {}
    check_num_models(num_models)  # before any model is trained
    if len(p.split.forget) == 0:
        raise UserError("--forget_quality needs a non-empty forget set")
    retrained = retrained_models_of_run(p, unl.width, log=log)
    runs = unlearn_repeatedly(p, unl, num_models, jobs=c.eval.jobs, log=log)
    start = time.perf_counter()
    result = score(runs.outcomes, retrained.outcomes, device=p.device)
    arrays = result.pop("arrays")
    result.update({
        "identical_runs": runs.identical, "diverged_runs": runs.diverged,
        "retrained_models_dir": str(retrained.directory), "retrained_trained_now": len(retrained.trained_now),
        "seconds": {"retrained_models": retrained.seconds, "unlearning_runs": runs.seconds,
                    "scoring": time.perf_counter() - start},
    })
    if write_files:
        scores_path, plot_path = paths.forget_quality_scores(c), paths.forget_quality_plot(c)
        atomic_write_bytes(scores_path, npz_bytes(
            forget_indices=np.asarray(p.split.forget, np.int64), epsilons=arrays["epsilons"], points=arrays["points"],
            unlearned_phi=runs.outcomes.phi, retrained_phi=retrained.outcomes.phi,
            unlearned_retain_acc=runs.outcomes.retain_acc, unlearned_test_acc=runs.outcomes.test_acc,
            retrained_retain_acc=retrained.outcomes.retain_acc, retrained_test_acc=retrained.outcomes.test_acc,
            unlearning_seeds=runs.seeds))
        result["scores_file"] = str(scores_path)
        if c.output.plots:
            plot_epsilons(arrays["epsilons"], num_models, result["forget_score"], plot_path, unl.method.label)
            result["plot_file"] = str(plot_path)
    else:
        result["scores_file"] = None
    log(f"forget quality (N = {num_models}): F {result['forget_score']:.4f}, final {result['final_score']:.4f} "
        f"(retain ratio {result['retain_acc_ratio']:.3f}, test ratio {result['test_acc_ratio']:.3f})")
    return result


def with_forget_quality(p: Prepared, unl: Unlearned, result: dict) -> dict:
    """Adds "forget_quality" to the result when --forget_quality asks for it."""
    quality = forget_quality(p, unl)
    if quality:
        result["forget_quality"] = quality
    return result
