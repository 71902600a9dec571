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

import gzip
import hashlib
import os
import pickle
import shutil
import tempfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy.io import loadmat
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from utils import EnvironmentUserError, UserError, atomic_write_json, current_umask, sha256_of_array

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

    def to(self, device: torch.device) -> ImageData:
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
# fashion_mnist: the GPU recipe (ResNet-18 at full width with the CIFAR stem, on all 54,000 training images) and, for a
# --train_subset run, the CPU tier (width 16, epochs measured to fit a 10,000-image subset; see docs/datasets.md).
FASHION_MNIST_GPU_RECIPE = {"epochs": 30, "lr": 0.1, "decreasing_lr": "15,25", "batch_size": 256, "width": None}
FASHION_MNIST_CPU_RECIPE = {"epochs": 15, "lr": 0.05, "decreasing_lr": "10,13", "batch_size": 64, "width": 16}
DATASET_RECIPES = {"digits": DIGITS_RECIPE, "digits_noisy": DIGITS_RECIPE, "fashion_mnist": FASHION_MNIST_GPU_RECIPE}
SUBSET_RECIPES = {"fashion_mnist": FASHION_MNIST_CPU_RECIPE}  # the recipe of a --train_subset run, where it differs


def recipe_defaults(name: str, train_subset: int | None = None) -> dict:
    if train_subset is not None and name in SUBSET_RECIPES:
        return dict(SUBSET_RECIPES[name])
    return dict(DATASET_RECIPES.get(name, UPSTREAM_RECIPE))


# --train_subset: the datasets large enough for a training subset to make sense, with their training-set size (known
# without reading the files, so the flag is checked before any work). digits has 1,437 training images: no subset.
SUBSET_TRAIN_SIZES = {"fashion_mnist": 60_000, "cifar10": 50_000, "cifar100": 50_000, "svhn": 73_257}
SUBSET_MIN_PER_CLASS = 10  # so that the per-class 10 % validation split keeps at least one image of every class


def check_train_subset(name: str, train_subset: int | None, available: int | None = None) -> None:
    """One-line UserError unless `train_subset` (None = no subset) fits the dataset: `available` is the training-set
    size of the loaded data (default: the dataset's known size)."""
    if train_subset is None:
        return
    if name not in SUBSET_TRAIN_SIZES:
        raise UserError(f"--train_subset is not available for {name} (its training set is small enough to use whole); "
                        f"allowed with: {', '.join(sorted(SUBSET_TRAIN_SIZES))}")
    size = SUBSET_TRAIN_SIZES[name] if available is None else available
    low = SUBSET_MIN_PER_CLASS * num_classes_of(name)
    if not low <= train_subset < size:
        raise UserError(f"--train_subset {train_subset} is out of range for {name}; allowed: {low}..{size - 1} "
                        f"(at least {SUBSET_MIN_PER_CLASS} per class, fewer than its {size} training images; omit the "
                        f"flag to use them all)")


def num_classes_of(name: str) -> int:
    """Class count without loading the files (used to validate --num_classes and --class_to_replace early)."""
    return {"cifar100": 100}.get(name, 10)


def _channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    scaled = images.float() / (255.0 if images.dtype == torch.uint8 else 1.0)
    return tuple(scaled.mean(dim=(0, 2, 3)).tolist()), tuple(scaled.std(dim=(0, 2, 3)).tolist())


def _digits(noise_sigma: float) -> ImageData:
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


# --- CIFAR (the official "python version" files, as torchvision lays them out) ----------------------------------------

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
    expected = (f"expected a pickled dict with 'data' (N x {CIFAR_IMAGE_BYTES} uint8 pixels) and '{label_key}' "
                f"(N class ids in 0..{num_classes - 1})")

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
    import torchvision.datasets as tvd  # noqa: PLC0415  (torchvision adds ~1 s to startup; only this data set needs it)

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
        raise EnvironmentUserError(
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
    """SVHN cropped digits in torchvision's layout: `svhn/{train,test}_32x32.mat` (X is H x W x C x N,
    label 10 = digit 0)."""
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
        raise EnvironmentUserError(f"svhn files missing under '{folder}' ({', '.join(missing)}); download them from "
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


# --- Fashion-MNIST (the four original idx files, read by torchvision) -------------------------------------------------

FASHION_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                       "t10k-labels-idx1-ubyte")
FASHION_MNIST_PACKAGE_DIR = "/usr/share/datasets/fashion-mnist"  # where Debian's dataset-fashion-mnist puts them
DATA_CACHE_ENV = "UNLEARN_DATA_CACHE"


def data_cache_dir() -> Path:
    """Where decompressed copies of compressed dataset files go: $UNLEARN_DATA_CACHE, else
    $XDG_CACHE_HOME/unlearn-toolkit, else ~/.cache/unlearn-toolkit. Outside the data folder, which may be read-only."""
    if os.environ.get(DATA_CACHE_ENV):
        return Path(os.environ[DATA_CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "unlearn-toolkit"


def _decompressed_copy(folder: Path) -> Path:
    """A torchvision root holding `FashionMNIST/raw/` with the four idx files decompressed from `folder`'s `.gz` ones.

    The copy lives in `data_cache_dir()` under a name derived from the compressed files' contents, so two folders with
    different files never share it and a second run decompresses nothing. It is built in a temporary folder and renamed
    into place, so a crash or a concurrent run never leaves (or sees) a half-written copy."""
    from torchvision.datasets.utils import extract_archive  # noqa: PLC0415  (torchvision adds ~1 s to startup; only this data set needs it)

    digest = hashlib.sha256()
    for name in FASHION_MNIST_FILES:
        digest.update(hashlib.sha256((folder / f"{name}.gz").read_bytes()).digest())
    cache = data_cache_dir()
    root = cache / f"fashion_mnist-{digest.hexdigest()[:16]}"
    if all((root / "FashionMNIST" / "raw" / name).is_file() for name in FASHION_MNIST_FILES):
        return root
    try:
        cache.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=cache, prefix=f".{root.name}."))
    except OSError as exc:
        raise EnvironmentUserError(f"cannot write the decompressed Fashion-MNIST files to '{cache}' "
                                   f"({exc.strerror or exc}); set {DATA_CACHE_ENV} to a writable folder") from exc
    try:
        os.chmod(staging, 0o777 & ~current_umask())  # mkdtemp makes it 0700; the cache is as shared as any new folder
        raw = staging / "FashionMNIST" / "raw"
        raw.mkdir(parents=True)
        for name in FASHION_MNIST_FILES:
            extract_archive(str(folder / f"{name}.gz"), str(raw))
        try:
            os.rename(staging, root)
        except OSError:  # another run put its copy there first: theirs holds the same bytes
            if not root.is_dir():
                raise
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:  # before OSError: BadGzipFile is one
        raise UserError(f"the Fashion-MNIST files in '{folder}' are not intact gzip files ({type(exc).__name__}); "
                        f"re-copy the four .gz files") from exc
    except OSError as exc:  # a full disk, a cache that stopped being writable
        raise EnvironmentUserError(f"cannot decompress the Fashion-MNIST files of '{folder}' into '{cache}' "
                                   f"({exc.strerror or exc}); set {DATA_CACHE_ENV} to a writable folder") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


def _fashion_mnist_root(data_dir: Path, download: bool) -> Path:
    """The torchvision root to read: `data_dir` itself when `data_dir/FashionMNIST/raw/` holds the decompressed files
    (torchvision's layout), else a decompressed copy of the `.gz` files found in that raw folder or directly in
    `data_dir` (Debian's flat folder), else what torchvision downloads into `data_dir`."""
    raw = data_dir / "FashionMNIST" / "raw"
    if all((raw / name).is_file() for name in FASHION_MNIST_FILES):
        return data_dir
    for folder in (raw, data_dir):
        if all((folder / f"{name}.gz").is_file() for name in FASHION_MNIST_FILES):
            return _decompressed_copy(folder)
    if download:
        try:
            _download_torchvision("FashionMNIST", data_dir, train=True)  # fetches all four files
        except Exception as exc:  # offline, DNS failure, checksum mismatch, read-only folder...
            print(f"note: could not download fashion_mnist ({type(exc).__name__})")
        if all((raw / name).is_file() for name in FASHION_MNIST_FILES):
            return data_dir
    raise EnvironmentUserError(
        f"fashion_mnist files missing: neither '{raw}' nor '{data_dir}' holds the four idx files "
        f"({FASHION_MNIST_FILES[0]}.gz, ...); let torchvision download them (online, without --no-download) or "
        f"`apt-get install dataset-fashion-mnist` and pass --data {FASHION_MNIST_PACKAGE_DIR}")


@register_dataset("fashion_mnist")
def _load_fashion_mnist(data_dir: Path, download: bool) -> ImageData:
    """Zalando's Fashion-MNIST: 60,000 training and 10,000 test images, 28x28, one channel, 10 classes; uint8 in memory,
    normalised inside the model with the training set's mean and std; no augmentation."""
    import torchvision.datasets as tvd  # noqa: PLC0415  (torchvision adds ~1 s to startup; only this data set needs it)

    root = _fashion_mnist_root(data_dir, download)
    arrays = {}
    for train in (True, False):
        try:
            part = tvd.FashionMNIST(root=str(root), train=train, download=False)
            images, labels = part.data, part.targets
        except Exception as exc:  # torchvision's idx reader fails with many types on a damaged file
            raise UserError(f"the Fashion-MNIST files under '{root / 'FashionMNIST' / 'raw'}' are not readable idx "
                            f"files ({type(exc).__name__}); replace them") from exc
        if images.dtype != torch.uint8 or images.ndim != 3 or tuple(images.shape[1:]) != (28, 28) or \
                len(labels) != len(images) or (len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < 10):
            raise UserError(f"the Fashion-MNIST {'training' if train else 'test'} files under '{root}' hold "
                            f"{tuple(images.shape)} images and {len(labels)} labels; expected N x 28 x 28 uint8 images "
                            f"and N labels in 0..9")
        arrays[train] = (images[:, None].contiguous(), labels.to(torch.int64))
    mean, std = _channel_stats(arrays[True][0])
    return ImageData(
        name="fashion_mnist", train_images=arrays[True][0], train_labels=arrays[True][1],
        test_images=arrays[False][0], test_labels=arrays[False][1], num_classes=10, mean=mean, std=std,
        augment="none",
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
    train_subset: int | None = None  # the size of the stratified training subset train and val come from (None: all)
    hash: str = field(default="")

    def __post_init__(self):
        if not self.hash:
            # A subset adds its size and validation indices (a split of the whole training set hashes as before).
            subset = np.asarray([] if self.train_subset is None else [self.train_subset, len(self.val), *self.val],
                                dtype=np.int64)
            self.hash = sha256_of_array(np.concatenate([
                [len(self.forget), len(self.retain), len(self.test)], self.forget, self.retain, self.test, subset,
            ]).astype(np.int64))

    @property
    def tag(self) -> str:
        """Short, readable identifier of the forget setting, used in file names."""
        count = "all" if self.num_indexes_to_replace is None else self.num_indexes_to_replace
        subset = "" if self.train_subset is None else f"_sub{self.train_subset}"
        return f"{self.scenario}_c{self.class_to_replace}_n{count}_s{self.seed}{subset}_{self.hash[:8]}"

    def to_json(self) -> dict:
        return {
            "dataset": self.dataset, "scenario": self.scenario, "class_to_replace": self.class_to_replace,
            "num_indexes_to_replace": self.num_indexes_to_replace, "seed": self.seed, "split_mode": self.split_mode,
            "train_subset": self.train_subset, "hash": self.hash,
            "sizes": {k: int(len(getattr(self, k))) for k in ("train", "val", "forget", "retain", "test")},
            **{k: getattr(self, k).tolist() for k in ("forget", "retain", "val", "test")},
        }

    def save(self, path: str | Path) -> Path:
        return atomic_write_json(path, self.to_json())


def train_subset_indices(labels: np.ndarray, num_classes: int, size: int, seed: int = TRAIN_SPLIT_SEED) -> np.ndarray:
    """`size` training-array indices, stratified: class c gets its share size * n_c / N, rounded by largest remainder
    (ties to the lower class) so the shares sum to `size`; drawn per class with RandomState(seed), ascending. The seed
    is fixed like the train/val split's: a subset is one dataset for every run seed, not a draw per run."""
    counts = np.bincount(labels, minlength=num_classes)
    exact = size * counts / counts.sum()
    quota = np.floor(exact).astype(np.int64)
    order = sorted(range(num_classes), key=lambda c: (-(exact[c] - quota[c]), c))
    quota[order[:size - int(quota.sum())]] += 1
    rng = np.random.RandomState(seed)
    chosen = [rng.choice(np.flatnonzero(labels == c), quota[c], replace=False) for c in range(num_classes)]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def training_split(labels: np.ndarray, num_classes: int, split_seed: int,
                   train_subset: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`train_val_split` of the whole training array, or of its stratified subset of `train_subset` images (indices
    still into the whole array)."""
    if train_subset is None:
        return train_val_split(labels, num_classes, split_seed)
    pool = train_subset_indices(labels, num_classes, train_subset)
    train, val = train_val_split(labels[pool], num_classes, split_seed)
    return pool[train], pool[val]


def train_val_split(labels: np.ndarray, num_classes: int, split_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per class, draw int(10 % of its samples) for validation, as upstream does; train = the rest, ascending."""
    rng = np.random.RandomState(split_seed)
    val = [rng.choice(np.flatnonzero(labels == c), int(VAL_FRACTION * np.sum(labels == c)), replace=False)
           for c in range(num_classes)]
    val = np.concatenate(val).astype(np.int64)
    train = np.setdiff1d(np.arange(len(labels)), val).astype(np.int64)
    return train, val


def make_split(data: ImageData, class_to_replace: int = -1, num_indexes_to_replace: int | None = None,
               seed: int = 1, split_mode: str = "consistent", train_subset: int | None = None) -> Split:
    """Carve forget/retain out of the original model's training set (see the module docstring). With `train_subset`,
    train and val come from that stratified subset of the training array (`train_subset_indices`) instead of all of
    it; the rest of the training array is never used."""
    if seed < 1:
        raise UserError(f"--seed must be >= 1 (the forget selection uses seed - 1), got {seed}")
    if not -1 <= class_to_replace < data.num_classes:
        raise UserError(f"--class_to_replace {class_to_replace} is out of range; "
                        f"allowed: -1 (any class) or 0..{data.num_classes - 1}")
    if split_mode not in ("consistent", "upstream"):
        raise UserError(f"unknown split mode '{split_mode}'; allowed: consistent, upstream")
    check_train_subset(data.name, train_subset, len(data.train_labels))
    labels = data.train_labels.cpu().numpy()
    test_labels = data.test_labels.cpu().numpy()
    train, val = training_split(labels, data.num_classes, TRAIN_SPLIT_SEED, train_subset)
    marked = train if split_mode == "consistent" else training_split(labels, data.num_classes, seed, train_subset)[0]

    pool = np.arange(len(marked)) if class_to_replace == -1 else np.flatnonzero(labels[marked] == class_to_replace)
    if num_indexes_to_replace is None:
        if class_to_replace == -1:
            raise UserError("--num_indexes_to_replace is required with --class_to_replace -1 (random forgetting)")
        chosen = pool
    else:
        if not 0 < num_indexes_to_replace <= len(pool):
            where = "the training set" if class_to_replace == -1 else f"class {class_to_replace} of the training set"
            raise UserError(f"--num_indexes_to_replace {num_indexes_to_replace} is out of range; "
                            f"allowed: 1..{len(pool)} (the size of {where})")
        chosen = np.random.RandomState(seed - 1).choice(pool, size=num_indexes_to_replace, replace=False)
    is_forget = np.zeros(len(marked), dtype=bool)
    is_forget[chosen] = True
    forget, retain = marked[is_forget], marked[~is_forget]

    whole_class = class_to_replace >= 0 and len(chosen) == len(pool)
    scenario = "classwise" if whole_class else ("random" if class_to_replace == -1 else "subclass")
    test = np.arange(len(test_labels), dtype=np.int64)
    if whole_class:  # class-wise forgetting: the forgotten class is not part of the test set any more
        test = test[test_labels != class_to_replace]
    return Split(dataset=data.name, train=train, val=val, forget=forget.astype(np.int64),
                 retain=retain.astype(np.int64), test=test, scenario=scenario, class_to_replace=class_to_replace,
                 num_indexes_to_replace=num_indexes_to_replace, seed=seed, split_mode=split_mode,
                 train_subset=train_subset)


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
        return (n + self.batch_size - 1) // self.batch_size  # ceil(n / batch_size) in integers

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
