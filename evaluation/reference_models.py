"""Reference (shadow) models for the per-example membership-inference attacks, trained once and cached on disk.

Design (LiRA's, Carlini et al. 2022, adapted to unlearning; docs/attacks.md):

* **Candidate pool.** The examples the attacks ask about are the forget set (members of the original model, a subset
  of its training split `split.train`) and held-out test samples (non-members). Online LiRA needs, for *every*
  candidate, reference models trained with it and without it, so the pool the reference models are drawn from is
  `split.train` plus the whole test set (all test indices, so that class-wise splits, whose `split.test` drops a class,
  share the cache). Without the test samples in the pool, test candidates would have no IN model and online LiRA
  would have to score them with the offline formula, on another scale than the forget candidates. The validation
  split is never trained on by any reference model. Pool entries are addressed in a *combined* array: train-array
  index i stays i, test-array index j becomes `len(train) + j` (see `attack_pool_data`).
* **Balanced membership.** K models; for every pool example an independent random permutation of the K models
  decides which of them train on it: with K even, exactly K/2 (the first K/2 of the permutation); with K odd,
  (K−1)/2 or (K+1)/2 with probability ½ each, so every model still trains on about half of the pool. The K × n
  membership matrix comes from `numpy.random.default_rng(design_seed)` alone.
* **Training.** The original recipe (`training.train_model`, same `TrainRecipe`, augmentation and architecture),
  on the model's half of the pool, without a validation set; the final weights are kept (like Retrain). Model k draws
  its initialisation and its shuffles from seeds derived from (design_seed, k).
* **Cache.** `{cache_root}/<dataset>_<arch>_w<width>_K<K>_<hash>/` holds `config.json` (what the hash covers),
  `membership.npz` (pool indices and the K × n membership), `model_000.pth.tar` … (weights-only checkpoints) and
  `signals.npz` (logit-scaled confidence and true-label probability of every model on every pool example). The hash
  covers dataset, architecture, width, class count, recipe, augmentation, K, the design seed and a hash of the pool
  indices (so a cache built for another training split or recipe is never reused); the forget set is not part of it,
  so one cache serves every forget set, method, run and sweep on the same training split. Every file is written
  atomically; models already present are reused, so an interrupted build resumes where it stopped. The whole
  build (membership, training, signals) runs under one lock per cache folder (`utils.file_lock`), so two runs on
  one training split train each model once: the later one waits and then reads what the first one wrote.
* **Parallelism.** With `jobs > 1`, models train in `jobs` worker processes (multiprocessing, spawn), each with
  `torch.set_num_threads(1)`. On CPU the sequential path also trains with one thread (restored afterwards): thread
  count changes float reduction order, and one thread is what makes parallel and sequential builds bit-identical.

The same machinery trains the "retrained without" shadow models of U-LiRA (`train_models`), see
`evaluation.per_example_mia`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import multiprocessing
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dataset import ImageData, Split, SplitData, TensorLoader
from evaluation.attacks import logit_confidence
from models import create_model
from training import TrainRecipe, train_model
from utils import (
    UserError,
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_json,
    file_lock,
    load_checkpoint,
    sha256_of_array,
    temporarily_eval,
)

CACHE_SUBDIR = "ref_models"
CACHE_VERSION = 1
DEFAULT_DESIGN_SEED = 0  # fixed, so every run on the same training split shares one cache


# ---------------------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to build the architecture in any process (plain values only)."""

    arch: str
    num_classes: int
    in_channels: int
    width: int | None
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def build(self, init_seed: int) -> torch.nn.Module:
        """A fresh model initialised from `init_seed`; the caller's global RNG state is left untouched."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            return create_model(self.arch, num_classes=self.num_classes, in_channels=self.in_channels,
                                width=self.width, mean=self.mean, std=self.std)


@dataclass(frozen=True)
class ReferenceConfig:
    """What the reference models are: the original model's architecture and recipe, K, and the design seed."""

    dataset: str
    model: ModelSpec
    recipe: TrainRecipe
    num_models: int
    augment: bool = True
    design_seed: int = DEFAULT_DESIGN_SEED
    device: str = "cpu"
    amp: str = "off"  # --amp of the run: the precision the models train in (utils.forward_precision)

    def key_fields(self, pool_hash: str) -> dict[str, Any]:
        """The values the cache key hashes (device excluded: a CPU and a GPU build are interchangeable)."""
        spec = self.model
        return {"version": CACHE_VERSION, "dataset": self.dataset, "arch": spec.arch, "num_classes": spec.num_classes,
                "in_channels": spec.in_channels, "width": spec.width, "recipe": dataclasses.asdict(self.recipe),
                "augment": bool(self.augment), "num_models": self.num_models, "design_seed": self.design_seed,
                "pool_hash": pool_hash, **self.precision_fields()}

    def precision_fields(self) -> dict[str, str]:
        """What a cache key adds for the training precision: nothing for float32 (keys made before --amp existed stay
        valid), {"amp": ...} otherwise, so bf16-trained models never stand in for float32 ones or the reverse."""
        return {} if self.amp == "off" else {"amp": self.amp}


def derived_seed(*parts: int) -> int:
    """A 31-bit seed from integers (numpy's SeedSequence: distinct tuples give independent streams)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] & 0x7FFFFFFF)


def model_seeds(design_seed: int, index: int) -> tuple[int, int]:
    """(initialisation seed, shuffle seed) of reference model `index`."""
    return derived_seed(design_seed, index, 0), derived_seed(design_seed, index, 1)


# ---------------------------------------------------------------------------------------------------------------------
# Pool and membership
# ---------------------------------------------------------------------------------------------------------------------

def attack_pool_data(data: ImageData) -> ImageData:
    """The dataset with the test samples appended to the train arrays (test index j -> len(train) + j), so one `Split`
    can address training and test samples together. The test arrays are kept as they are."""
    return ImageData(
        name=data.name, train_images=torch.cat([data.train_images, data.test_images]),
        train_labels=torch.cat([data.train_labels, data.test_labels]), test_images=data.test_images,
        test_labels=data.test_labels, num_classes=data.num_classes, mean=data.mean, std=data.std, augment=data.augment)


def pool_indices(split: Split, num_train: int, num_test: int) -> np.ndarray:
    """Combined indices of the candidate pool: the training split, then every test sample."""
    return np.concatenate([np.asarray(split.train, dtype=np.int64), num_train + np.arange(num_test, dtype=np.int64)])


def balanced_membership(num_examples: int, num_models: int, seed: int) -> np.ndarray:
    """(K, n) boolean: True where example i is in model k's training half (see the module docstring)."""
    if num_models < 2:
        raise UserError(f"--num_ref_models must be >= 2 (every example needs IN and OUT reference models); "
                        f"got {num_models}")
    rng = np.random.default_rng(seed)
    rank = np.argsort(rng.random((num_models, num_examples)), axis=0)  # per column: a uniform random permutation
    count = np.full(num_examples, num_models // 2)
    if num_models % 2:
        count += rng.random(num_examples) < 0.5
    return rank < count[None, :]


def training_split(dataset: str, members: np.ndarray, forget: np.ndarray | None = None,
                   val: np.ndarray | None = None, test: np.ndarray | None = None) -> Split:
    """A `Split` over combined pool indices: train = members, forget ⊂ members, retain = members minus forget."""
    members = np.asarray(members, dtype=np.int64)
    forget = np.empty(0, np.int64) if forget is None else np.asarray(forget, dtype=np.int64)
    empty = np.empty(0, np.int64)
    return Split(dataset=dataset, train=members, val=empty if val is None else np.asarray(val, np.int64),
                 forget=forget, retain=np.setdiff1d(members, forget), test=empty if test is None else
                 np.asarray(test, np.int64), scenario="shadow", class_to_replace=-1,
                 num_indexes_to_replace=len(forget), seed=0)


# ---------------------------------------------------------------------------------------------------------------------
# Training (sequential or in spawned workers)
# ---------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrainTask:
    """One model to train on `members` (combined pool indices) and save to `path`."""

    path: str
    members: np.ndarray
    init_seed: int
    shuffle_seed: int
    metadata: dict


@contextlib.contextmanager
def single_thread(device: torch.device) -> Iterator[None]:
    """One intra-op thread on CPU for the duration (bit-identical to the spawned workers); no-op on GPU."""
    if device.type != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _train_and_save(task: TrainTask, pool: ImageData, config: ReferenceConfig, batch_size: int) -> float:
    model = config.model.build(task.init_seed).to(pool.train_images.device)
    splits = SplitData(pool, training_split(config.dataset, task.members), batch_size=batch_size,
                       augment=config.augment)
    result = train_model(model, splits, config.recipe, seed=task.shuffle_seed, part="train", progress=False,
                         desc=Path(task.path).stem, amp=config.amp)
    atomic_torch_save(task.path, {**task.metadata, "state_dict": result.model.state_dict(),
                                  "train_seconds": result.seconds, "train_acc": result.history["train_acc"][-1],
                                  "torch_version": str(torch.__version__)})
    return result.seconds


_WORKER: dict[str, Any] = {}


def _init_worker(pool_cpu: ImageData, config: ReferenceConfig, batch_size: int) -> None:
    torch.set_num_threads(1)
    _WORKER.update(pool=pool_cpu.to(torch.device(config.device)), config=config, batch_size=batch_size)


def _worker_train(task: TrainTask) -> tuple[str, float]:
    return task.path, _train_and_save(task, _WORKER["pool"], _WORKER["config"], _WORKER["batch_size"])


def train_models(tasks: Sequence[TrainTask], pool: ImageData, config: ReferenceConfig, jobs: int = 1,
                 batch_size: int = 256, log: Callable[[str], None] = print) -> float:
    """Train every task (sequentially, or in `jobs` spawned workers); returns the summed training seconds."""
    if not tasks:
        return 0.0
    total = 0.0
    jobs = max(1, min(int(jobs), len(tasks)))
    if jobs == 1:
        with single_thread(pool.train_images.device):
            for done, task in enumerate(tasks, 1):
                total += _train_and_save(task, pool, config, batch_size)
                log(f"  trained {Path(task.path).name} ({done}/{len(tasks)})")
        return total
    pool_cpu = pool.to(torch.device("cpu"))
    context = multiprocessing.get_context("spawn")
    with context.Pool(jobs, initializer=_init_worker, initargs=(pool_cpu, config, batch_size)) as workers:
        for done, (path, seconds) in enumerate(workers.imap_unordered(_worker_train, tasks), 1):
            total += seconds
            log(f"  trained {Path(path).name} ({done}/{len(tasks)}, {jobs} workers)")
        workers.close()  # a clean shutdown (the context manager alone terminates the workers)
        workers.join()
    return total


# ---------------------------------------------------------------------------------------------------------------------
# Signals
# ---------------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def model_signals(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                  batch_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """(logit-scaled confidence φ, true-label probability) of every example, in eval mode (float64 numpy)."""
    with temporarily_eval(model):
        logits = [model(x).double() for x, _ in TensorLoader(images, labels, batch_size)]
    logits = torch.cat(logits) if logits else torch.empty(0, 2, dtype=torch.float64)
    phi = logit_confidence(logits, labels)
    prob = torch.softmax(logits, dim=1).gather(1, labels.long().view(-1, 1)).squeeze(1)
    return phi.cpu().numpy(), prob.cpu().numpy()


def load_weights(path: str | Path, spec: ModelSpec, device: torch.device) -> torch.nn.Module:
    model = spec.build(0).to(device)
    model.load_state_dict(load_checkpoint(path)["state_dict"])
    return model


# ---------------------------------------------------------------------------------------------------------------------
# The cache
# ---------------------------------------------------------------------------------------------------------------------

@dataclass
class ReferenceModels:
    """A complete set of K cached reference models and their signals on the pool."""

    directory: Path
    config: ReferenceConfig
    pool: np.ndarray               # (n,) combined indices
    in_mask: np.ndarray            # (K, n) bool
    phi: np.ndarray                # (K, n) logit-scaled confidence of model k on pool example i
    prob: np.ndarray               # (K, n) true-label probability
    trained_now: list[int]         # indices trained by this call (empty = everything came from the cache)
    seconds_now: float             # wall time of this call (training, loading, signals)
    train_seconds_total: float     # summed training time stored in the K checkpoints (the cost of the cache)

    @property
    def num_models(self) -> int:
        return int(self.in_mask.shape[0])

    def model_path(self, index: int) -> Path:
        return self.directory / f"model_{index:03d}.pth.tar"

    def columns(self, combined_indices: np.ndarray) -> np.ndarray:
        """Positions in the pool of the given combined indices (each must be a pool member)."""
        combined_indices = np.asarray(combined_indices, dtype=np.int64)
        order = np.argsort(self.pool, kind="stable")
        found = np.searchsorted(self.pool[order], combined_indices)
        found = np.minimum(found, len(self.pool) - 1)
        position = order[found]
        missing = self.pool[position] != combined_indices
        if missing.any():
            raise UserError(f"{int(missing.sum())} examples are not in the reference models' pool (the training "
                            "split plus the test set); per-example attacks need forget ⊂ training split "
                            "(use --split consistent)")
        return position

    def load(self, index: int, device: torch.device) -> torch.nn.Module:
        return load_weights(self.model_path(index), self.config.model, device)


def cache_directory(cache_root: str | Path, config: ReferenceConfig, pool: np.ndarray) -> tuple[Path, dict]:
    fields = config.key_fields(sha256_of_array(pool))
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]
    width = "default" if config.model.width is None else config.model.width
    name = f"{config.dataset}_{config.model.arch}_w{width}_K{config.num_models}_{digest}"
    return Path(cache_root) / name, {**fields, "key": digest}


def checkpoint_matches(path: Path, key: str, index: int) -> bool:
    """Whether a cached model file is model `index` of the cache `key` (any cache of trained models: reference models,
    U-LiRA's retrained shadows, forget quality's retrained models); a missing or unreadable file is not."""
    if not path.is_file():
        return False
    try:
        payload = load_checkpoint(path)
    except UserError:
        return False  # unreadable: retrain it
    return payload.get("cache_key") == key and payload.get("index") == index


def _build_or_load(config: ReferenceConfig, data: ImageData, directory: Path, fields: dict, pool: np.ndarray,
                   in_mask: np.ndarray, jobs: int, batch_size: int, log: Callable[[str], None]) -> ReferenceModels:
    """The body of `ensure_reference_models`, run under the folder's lock."""
    device, key = data.train_images.device, fields["key"]
    membership_file = directory / "membership.npz"
    if membership_file.is_file():
        with np.load(membership_file) as stored:
            if not (np.array_equal(stored["pool"], pool) and np.array_equal(stored["in_mask"], in_mask)):
                raise UserError(f"reference cache '{directory}' holds another membership design; delete the folder")
    else:
        atomic_write_json(directory / "config.json", fields)
        buffer = npz_bytes(pool=pool, in_mask=in_mask)
        atomic_write_bytes(membership_file, buffer)

    refs = ReferenceModels(directory=directory, config=config, pool=pool, in_mask=in_mask, phi=np.empty(0),
                           prob=np.empty(0), trained_now=[], seconds_now=0.0, train_seconds_total=0.0)
    missing = [k for k in range(config.num_models) if not checkpoint_matches(refs.model_path(k), key, k)]
    if missing:
        log(f"training {len(missing)} of {config.num_models} reference models into {directory} (jobs={jobs})")
        tasks = []
        for k in missing:
            init_seed, shuffle_seed = model_seeds(config.design_seed, k)
            tasks.append(TrainTask(path=str(refs.model_path(k)), members=pool[in_mask[k]], init_seed=init_seed,
                                   shuffle_seed=shuffle_seed,
                                   metadata={"kind": "reference", "cache_key": key, "index": k,
                                             "arch": config.model.arch, "dataset": config.dataset,
                                             "width": config.model.width, "num_classes": config.model.num_classes,
                                             "init_seed": init_seed, "shuffle_seed": shuffle_seed}))
        train_models(tasks, attack_pool_data(data), config, jobs=jobs, batch_size=batch_size, log=log)
        refs.trained_now = missing

    signals_file = directory / "signals.npz"
    if refs.trained_now or not signals_file.is_file():
        pool_data = attack_pool_data(data)
        index = torch.as_tensor(pool, device=device)
        images, labels = pool_data.train_images[index], pool_data.train_labels[index]
        phis, probs, seconds = [], [], []
        with single_thread(device):
            for k in range(config.num_models):
                payload = load_checkpoint(refs.model_path(k))
                model = config.model.build(0).to(device)
                model.load_state_dict(payload["state_dict"])
                phi, prob = model_signals(model, images, labels)
                phis.append(phi), probs.append(prob), seconds.append(float(payload.get("train_seconds", 0.0)))
        atomic_write_bytes(signals_file, npz_bytes(phi=np.stack(phis), prob=np.stack(probs),
                                                    train_seconds=np.asarray(seconds)))
    with np.load(signals_file) as stored:
        refs.phi, refs.prob = stored["phi"], stored["prob"]
        refs.train_seconds_total = float(stored["train_seconds"].sum())
    return refs


def ensure_reference_models(config: ReferenceConfig, data: ImageData, split: Split, cache_root: str | Path,
                            jobs: int = 1, batch_size: int = 256,
                            log: Callable[[str], None] = print) -> ReferenceModels:
    """Load the K reference models of (config, training split) from the cache, training the missing ones."""
    start = time.perf_counter()
    pool = pool_indices(split, len(data.train_labels), len(data.test_labels))
    directory, fields = cache_directory(cache_root, config, pool)
    in_mask = balanced_membership(len(pool), config.num_models, config.design_seed)
    # One holder at a time per cache folder: two runs on one split train each model once (the second waits, then
    # finds every model and the signals on disk), and nobody reads a signals file while another run rewrites it.
    with file_lock(directory):
        refs = _build_or_load(config, data, directory, fields, pool, in_mask, jobs, batch_size, log)
    refs.seconds_now = time.perf_counter() - start
    return refs


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()
