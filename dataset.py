"""Datasets, train/val/forget/retain splits and device-resident tensor loaders.

Every dataset is held in memory as tensors (N, C, H, W): uint8 for the photographic datasets, float32 in [0, 1] for
`digits`. Normalisation lives inside the model, so loaders only scale to [0, 1] and augment. Splits are index-based
(no label surgery): indices always refer to the dataset's own train or test arrays.

The one consistent split (docs/evaluation.md): the train/val split is always drawn with split seed 1, the set every
original model is trained on, and the forget set is drawn from *that* training set with RandomState(seed - 1). So forget
and retain are always subsets of the original model's training set, which fixes the upstream quirk where, for seeds
other than 1, about 10 % of "forget" samples were never trained on. `split_mode="upstream"` reproduces the quirk.
"""
from __future__ import annotations

import io
import pickle
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from utils import UserError, atomic_write_json, sha256_of_array

# ---------------------------------------------------------------------------------------------------------------------
# Dataset registry
# ---------------------------------------------------------------------------------------------------------------------

DIGITS_NOISE_SIGMA = 0.3  # pixel noise of `digits_noisy`: enough to make the model memorise (see README)
DIGITS_NOISE_SEED = 20251104  # fixed: the noisy images are one dataset, not a random draw per run
DIGITS_TEST_FRACTION = 0.2
VAL_FRACTION = 0.1
TRAIN_SPLIT_SEED = 1  # the split every upstream original model was trained on


@dataclass
class ImageData:
    """A dataset in memory. Images are (N, C, H, W), uint8 (0..255) or float32 (0..1)."""

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: str  # "crop_flip" (CIFAR recipe) or "none"

    @property
    def in_channels(self) -> int:
        return int(self.train_images.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.train_images.shape[-1])

    def to(self, device: torch.device) -> "ImageData":
        """Move the arrays to a device once; loaders then never copy from host memory."""
        moved = {k: getattr(self, k).to(device) for k in ("train_images", "train_labels", "test_images", "test_labels")}
        return ImageData(self.name, **moved, num_classes=self.num_classes, mean=self.mean, std=self.std,
                         augment=self.augment)


DatasetLoader = Callable[[Path, bool], ImageData]
DATASETS: dict[str, DatasetLoader] = {}


def register_dataset(name: str):
    def decorator(fn: DatasetLoader) -> DatasetLoader:
        DATASETS[name] = fn
        return fn
    return decorator


def list_datasets() -> list[str]:
    return sorted(DATASETS)


def load_dataset(name: str, data_dir: str | Path = "../data", download: bool = True) -> ImageData:
    if name not in DATASETS:
        raise UserError(f"unknown dataset '{name}'; available: {', '.join(list_datasets())}")
    return DATASETS[name](Path(data_dir), download)


# Training recipe per dataset, used for every flag the user leaves unset. CIFAR/SVHN: the upstream recipe. digits:
# a small-width ResNet-18 recipe that reaches >= 97 % test accuracy on plain digits in well under 2 minutes on 2 cores.
UPSTREAM_RECIPE = {"epochs": 182, "lr": 0.1, "decreasing_lr": "91,136", "batch_size": 256, "width": None}
DIGITS_RECIPE = {"epochs": 30, "lr": 0.05, "decreasing_lr": "20,25", "batch_size": 64, "width": 16}
DATASET_RECIPES = {"digits": DIGITS_RECIPE, "digits_noisy": DIGITS_RECIPE}


def recipe_defaults(name: str) -> dict:
    return dict(DATASET_RECIPES.get(name, UPSTREAM_RECIPE))


def num_classes_of(name: str) -> int:
    """Class count without loading the files (used to validate --num_classes and --class_to_replace early)."""
    return {"cifar100": 100}.get(name, 10)


def _channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    scaled = images.float() / (255.0 if images.dtype == torch.uint8 else 1.0)
    return tuple(scaled.mean(dim=(0, 2, 3)).tolist()), tuple(scaled.std(dim=(0, 2, 3)).tolist())


def _digits(noise_sigma: float) -> ImageData:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = (bunch.images.astype(np.float32) / 16.0)[:, None]  # (1797, 1, 8, 8) in [0, 1]
    labels = bunch.target.astype(np.int64)
    if noise_sigma > 0:
        noise = np.random.RandomState(DIGITS_NOISE_SEED).normal(0.0, noise_sigma, size=images.shape)
        images = np.clip(images + noise.astype(np.float32), 0.0, 1.0).astype(np.float32)
    positions = np.arange(len(labels))
    train_pos, test_pos = train_test_split(positions, test_size=DIGITS_TEST_FRACTION, stratify=labels, random_state=0)
    train_pos, test_pos = np.sort(train_pos), np.sort(test_pos)
    train_images = torch.from_numpy(images[train_pos])
    mean, std = _channel_stats(train_images)
    return ImageData(
        name="digits_noisy" if noise_sigma > 0 else "digits",
        train_images=train_images, train_labels=torch.from_numpy(labels[train_pos]),
        test_images=torch.from_numpy(images[test_pos]), test_labels=torch.from_numpy(labels[test_pos]),
        num_classes=10, mean=mean, std=std, augment="none",
    )


@register_dataset("digits")
def _load_digits(data_dir: Path, download: bool) -> ImageData:
    """scikit-learn's handwritten digits (8x8, one channel), shipped inside scikit-learn: always available offline."""
    return _digits(0.0)


@register_dataset("digits_noisy")
def _load_digits_noisy(data_dir: Path, download: bool) -> ImageData:
    """`digits` with fixed Gaussian pixel noise (sigma 0.3, clipped to [0, 1]): hard enough to show memorisation."""
    return _digits(DIGITS_NOISE_SIGMA)


# --- CIFAR (the official "python version" files, as torchvision lays them out) ------------------------------------------

class _ArrayOnlyUnpickler(pickle.Unpickler):
    """The CIFAR batches are pickles; accept only what they contain (dicts, lists, numpy arrays), never code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"forbidden object {module}.{name} in a dataset file")


CIFAR_IMAGE_BYTES = 3 * 32 * 32  # one row of a batch's "data": the R, G and B planes of a 32x32 image


def _read_cifar_batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One batch file of the CIFAR python version: a pickled dict with "data" (N x 3072 uint8, CHW row-major) and
    `label_key` (N class ids). Anything else (truncated, garbage, other keys or shapes) is a one-line UserError naming
    the file, because a traceback from deep inside pickle or numpy does not say which file to replace."""
    expected = (f"expected a pickled dict with 'data' (N x {CIFAR_IMAGE_BYTES} uint8 pixels) and '{label_key}' (N class "
                f"ids in 0..{num_classes - 1})")

    def refuse(reason: str) -> UserError:
        return UserError(f"'{path}' is not in the CIFAR python format ({reason}); {expected}; re-extract the official "
                         f"archive")

    try:
        with open(path, "rb") as handle:
            entry = _ArrayOnlyUnpickler(handle, encoding="latin1").load()
    except pickle.UnpicklingError as exc:
        detail = " ".join(str(exc).split())[:120]
        raise refuse(detail if detail.startswith("forbidden object") else f"unreadable pickle: {detail}") from exc
    except EOFError as exc:
        raise refuse("the file ends early: truncated") from exc
    except Exception as exc:  # garbage bytes surface as many types (ValueError, IndexError, struct.error, ...)
        raise refuse(f"unreadable pickle: {type(exc).__name__}") from exc
    if not isinstance(entry, dict):
        raise refuse(f"it holds a {type(entry).__name__}, not a dict")
    entry = {k.decode() if isinstance(k, bytes) else k: v for k, v in entry.items()}
    missing = [k for k in ("data", label_key) if k not in entry]
    if missing:
        found = ", ".join(sorted(map(str, entry))) or "none"
        raise refuse(f"no {' or '.join(repr(k) for k in missing)} entry; keys found: {found}"[:200])
    try:
        images = np.asarray(entry["data"])
        labels = np.asarray(entry[label_key])
    except Exception as exc:
        raise refuse(f"'data' or '{label_key}' is not an array") from exc
    if images.ndim != 2 or images.shape[1] != CIFAR_IMAGE_BYTES or not np.issubdtype(images.dtype, np.integer):
        raise refuse(f"'data' has shape {images.shape} and dtype {images.dtype}")
    if images.size and (images.min() < 0 or images.max() > 255):
        raise refuse("'data' has values outside 0..255")
    if labels.ndim != 1 or len(labels) != len(images) or (labels.size and not np.issubdtype(labels.dtype, np.integer)):
        raise refuse(f"'{label_key}' has shape {labels.shape} and dtype {labels.dtype} for {len(images)} images")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise refuse(f"'{label_key}' has class ids outside 0..{num_classes - 1}")
    return images.astype(np.uint8).reshape(-1, 3, 32, 32), labels.astype(np.int64)


_CIFAR = {
    "cifar10": dict(folder="cifar-10-batches-py", train=[f"data_batch_{i}" for i in range(1, 6)], test=["test_batch"],
                    classes=10, label_key="labels", mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
                    archive="cifar-10-python.tar.gz", tv="CIFAR10"),
    "cifar100": dict(folder="cifar-100-python", train=["train"], test=["test"], classes=100, label_key="fine_labels",
                     mean=(0.5071, 0.4866, 0.4409), std=(0.2673, 0.2564, 0.2762),
                     archive="cifar-100-python.tar.gz", tv="CIFAR100"),
}


def _download_torchvision(kind: str, data_dir: Path, **kwargs) -> None:
    import torchvision.datasets as tvd

    getattr(tvd, kind)(root=str(data_dir), download=True, **kwargs)


def _load_cifar(name: str, data_dir: Path, download: bool) -> ImageData:
    spec = _CIFAR[name]
    folder = data_dir / spec["folder"]
    files = [folder / f for f in spec["train"] + spec["test"]]
    if not all(f.is_file() for f in files) and download:
        try:
            _download_torchvision(spec["tv"], data_dir, train=True)
        except Exception as exc:  # offline, DNS failure, checksum mismatch...
            print(f"note: could not download {name} ({type(exc).__name__})")
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise UserError(
            f"{name} files missing under '{folder}' ({', '.join(missing)}); extract {spec['archive']} "
            f"(https://www.cs.toronto.edu/~kriz/cifar.html) into '{data_dir}' or pass --data DIR"
        )
    train = [_read_cifar_batch(folder / f, spec["label_key"], spec["classes"]) for f in spec["train"]]
    test = [_read_cifar_batch(folder / f, spec["label_key"], spec["classes"]) for f in spec["test"]]
    return ImageData(
        name=name,
        train_images=torch.from_numpy(np.concatenate([t[0] for t in train])),
        train_labels=torch.from_numpy(np.concatenate([t[1] for t in train])),
        test_images=torch.from_numpy(np.concatenate([t[0] for t in test])),
        test_labels=torch.from_numpy(np.concatenate([t[1] for t in test])),
        num_classes=spec["classes"], mean=spec["mean"], std=spec["std"], augment="crop_flip",
    )


@register_dataset("cifar10")
def _load_cifar10(data_dir: Path, download: bool) -> ImageData:
    return _load_cifar("cifar10", data_dir, download)


@register_dataset("cifar100")
def _load_cifar100(data_dir: Path, download: bool) -> ImageData:
    return _load_cifar("cifar100", data_dir, download)


@register_dataset("svhn")
def _load_svhn(data_dir: Path, download: bool) -> ImageData:
    """SVHN cropped digits in torchvision's layout: `svhn/{train,test}_32x32.mat` (X is H x W x C x N, label 10 = digit 0)."""
    from scipy.io import loadmat

    folder = data_dir / "svhn"
    files = {split: folder / f"{split}_32x32.mat" for split in ("train", "test")}
    for split, file in files.items():
        if not file.is_file() and download:
            try:
                _download_torchvision("SVHN", folder, split=split)
            except Exception as exc:
                print(f"note: could not download svhn {split} ({type(exc).__name__})")
    missing = [f.name for f in files.values() if not f.is_file()]
    if missing:
        raise UserError(f"svhn files missing under '{folder}' ({', '.join(missing)}); download them from "
                        f"http://ufldl.stanford.edu/housenumbers/ into that folder or pass --data DIR")
    arrays = {}
    for split, file in files.items():
        mat = loadmat(str(file))
        images = np.ascontiguousarray(np.transpose(mat["X"], (3, 2, 0, 1))).astype(np.uint8)  # HWCN -> NCHW
        labels = mat["y"].astype(np.int64).reshape(-1) % 10
        arrays[split] = (torch.from_numpy(images), torch.from_numpy(labels))
    return ImageData(
        name="svhn", train_images=arrays["train"][0], train_labels=arrays["train"][1],
        test_images=arrays["test"][0], test_labels=arrays["test"][1], num_classes=10,
        mean=(0.4377, 0.4438, 0.4728), std=(0.1980, 0.2010, 0.1970), augment="none",
    )


# ---------------------------------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------------------------------

@dataclass
class Split:
    """Index sets into `ImageData`: train/val/forget/retain index the train arrays, test indexes the test arrays."""

    dataset: str
    train: np.ndarray
    val: np.ndarray
    forget: np.ndarray
    retain: np.ndarray
    test: np.ndarray
    scenario: str  # "random", "subclass", "classwise" or "none"
    class_to_replace: int
    num_indexes_to_replace: int | None
    seed: int
    split_mode: str = "consistent"
    hash: str = field(default="")

    def __post_init__(self):
        if not self.hash:
            self.hash = sha256_of_array(np.concatenate([
                [len(self.forget), len(self.retain), len(self.test)], self.forget, self.retain, self.test,
            ]))

    @property
    def tag(self) -> str:
        """Short, readable identifier of the forget setting, used in file names."""
        count = "all" if self.num_indexes_to_replace is None else self.num_indexes_to_replace
        return f"{self.scenario}_c{self.class_to_replace}_n{count}_s{self.seed}_{self.hash[:8]}"

    def to_json(self) -> dict:
        return {
            "dataset": self.dataset, "scenario": self.scenario, "class_to_replace": self.class_to_replace,
            "num_indexes_to_replace": self.num_indexes_to_replace, "seed": self.seed, "split_mode": self.split_mode,
            "hash": self.hash, "sizes": {k: int(len(getattr(self, k))) for k in ("train", "val", "forget", "retain", "test")},
            **{k: getattr(self, k).tolist() for k in ("forget", "retain", "val", "test")},
        }

    def save(self, path: str | Path) -> Path:
        return atomic_write_json(path, self.to_json())


def train_val_split(labels: np.ndarray, num_classes: int, split_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per class, draw int(10 % of its samples) for validation, as upstream does; train = the rest, ascending."""
    rng = np.random.RandomState(split_seed)
    val = [rng.choice(np.flatnonzero(labels == c), int(VAL_FRACTION * np.sum(labels == c)), replace=False)
           for c in range(num_classes)]
    val = np.concatenate(val).astype(np.int64)
    train = np.setdiff1d(np.arange(len(labels)), val).astype(np.int64)
    return train, val


def make_split(data: ImageData, class_to_replace: int = -1, num_indexes_to_replace: int | None = None,
               seed: int = 1, split_mode: str = "consistent") -> Split:
    """Carve forget/retain out of the original model's training set (see the module docstring)."""
    if seed < 1:
        raise UserError(f"--seed must be >= 1 (the forget selection uses seed - 1), got {seed}")
    if not -1 <= class_to_replace < data.num_classes:
        raise UserError(f"--class_to_replace {class_to_replace} is out of range; allowed: -1 (any class) or 0..{data.num_classes - 1}")
    if split_mode not in ("consistent", "upstream"):
        raise UserError(f"unknown split mode '{split_mode}'; allowed: consistent, upstream")
    labels = data.train_labels.cpu().numpy()
    test_labels = data.test_labels.cpu().numpy()
    train, val = train_val_split(labels, data.num_classes, TRAIN_SPLIT_SEED)
    marked = train if split_mode == "consistent" else train_val_split(labels, data.num_classes, seed)[0]

    pool = np.arange(len(marked)) if class_to_replace == -1 else np.flatnonzero(labels[marked] == class_to_replace)
    if num_indexes_to_replace is None:
        if class_to_replace == -1:
            raise UserError("--num_indexes_to_replace is required with --class_to_replace -1 (random forgetting)")
        chosen = pool
    else:
        if not 0 < num_indexes_to_replace <= len(pool):
            where = "the training set" if class_to_replace == -1 else f"class {class_to_replace} of the training set"
            raise UserError(f"--num_indexes_to_replace {num_indexes_to_replace} is out of range; allowed: 1..{len(pool)} "
                            f"(the size of {where})")
        chosen = np.random.RandomState(seed - 1).choice(pool, size=num_indexes_to_replace, replace=False)
    is_forget = np.zeros(len(marked), dtype=bool)
    is_forget[chosen] = True
    forget, retain = marked[is_forget], marked[~is_forget]

    whole_class = class_to_replace >= 0 and len(chosen) == len(pool)
    scenario = "classwise" if whole_class else ("random" if class_to_replace == -1 else "subclass")
    test = np.arange(len(test_labels), dtype=np.int64)
    if whole_class:  # class-wise forgetting: the forgotten class is not part of the test set any more
        test = test[test_labels != class_to_replace]
    return Split(dataset=data.name, train=train, val=val, forget=forget.astype(np.int64), retain=retain.astype(np.int64),
                 test=test, scenario=scenario, class_to_replace=class_to_replace,
                 num_indexes_to_replace=num_indexes_to_replace, seed=seed, split_mode=split_mode)


# ---------------------------------------------------------------------------------------------------------------------
# Loaders
# ---------------------------------------------------------------------------------------------------------------------

def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()


def crop_flip(images: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """RandomCrop(size, padding) + RandomHorizontalFlip on a batch, vectorised (one random draw per image)."""
    n, _, h, w = images.shape
    # Drawn on the run's CPU generator; copies that do not block, since a blocking copy to a GPU waits for its queue.
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(images.device, non_blocking=True)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(images.device, non_blocking=True)
    flip = (torch.rand(n, generator=generator) < 0.5).to(images.device, non_blocking=True)
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    rows = dy[:, None] + torch.arange(h, device=images.device)
    cols = dx[:, None] + torch.arange(w, device=images.device)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch = torch.arange(n, device=images.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


class TensorLoader:
    """Batches from in-memory tensors (no worker processes): shuffled with a run-owned generator, optionally augmented.

    Iterating yields (x, y) with x float in [0, 1] on the tensors' device. `len()` is the number of batches.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, shuffle: bool = False,
                 augment: str = "none", generator: torch.Generator | None = None, drop_last: bool = False):
        if batch_size < 1:
            raise UserError(f"--batch_size must be >= 1, got {batch_size}")
        if (shuffle or augment != "none") and generator is None:
            raise ValueError("a shuffled or augmented loader needs a generator (determinism)")
        self.images, self.labels = images, labels
        self.batch_size, self.shuffle, self.augment = batch_size, shuffle, augment
        self.generator, self.drop_last = generator, drop_last

    def __len__(self) -> int:
        n = len(self.labels)
        if self.drop_last or (self.shuffle and n > 1 and n % self.batch_size == 1):
            # a shuffled (training) pass drops a trailing batch of one sample: BatchNorm cannot train on it
            return n // self.batch_size
        return -(-n // self.batch_size)

    @property
    def num_samples(self) -> int:
        return len(self.labels)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.labels)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        order = order.to(self.labels.device)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            idx = order[start:start + self.batch_size]
            x = to_unit_float(self.images[idx])
            if self.augment == "crop_flip":
                x = crop_flip(x, self.generator)
            yield x, self.labels[idx]


@dataclass
class SplitData:
    """A dataset, a split and a device: builds the loaders every stage needs."""

    data: ImageData
    split: Split
    batch_size: int = 256
    augment: bool = True  # train-time augmentation as in the dataset's recipe (False = upstream --no-aug)

    @property
    def device(self) -> torch.device:
        return self.data.train_images.device

    @property
    def num_classes(self) -> int:
        return self.data.num_classes

    def tensors(self, part: str) -> tuple[torch.Tensor, torch.Tensor]:
        if part not in ("train", "val", "forget", "retain", "test"):
            raise ValueError(f"unknown part '{part}'")
        idx = torch.as_tensor(getattr(self.split, part), device=self.device)
        if part == "test":
            return self.data.test_images[idx], self.data.test_labels[idx]
        return self.data.train_images[idx], self.data.train_labels[idx]

    def train_loader(self, part: str, generator: torch.Generator, batch_size: int | None = None,
                     augment: bool | None = None, labels: torch.Tensor | None = None) -> TensorLoader:
        """Shuffled, augmented loader (the dataset's recipe) for training or unlearning."""
        images, true_labels = self.tensors(part)
        use_aug = self.augment if augment is None else augment
        return TensorLoader(images, true_labels if labels is None else labels, batch_size or self.batch_size,
                            shuffle=True, augment=self.data.augment if use_aug else "none", generator=generator)

    def eval_loader(self, part: str, batch_size: int | None = None) -> TensorLoader:
        """Ordered, unaugmented loader (test transform), so per-example outputs stay aligned with the indices."""
        images, labels = self.tensors(part)
        return TensorLoader(images, labels, batch_size or max(self.batch_size, 512))
