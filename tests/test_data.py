"""Datasets, splits and loaders: sizes, disjointness, determinism, class-wise filtering, CIFAR/SVHN file formats."""
import pickle

import numpy as np
import pytest
import torch

from dataset import SplitData, TensorLoader, crop_flip, load_dataset, make_split, train_val_split
from utils import UserError, make_generator


def test_digits_shapes_and_range(digits):
    assert digits.train_images.shape[1:] == (1, 8, 8)
    assert digits.train_images.dtype == torch.float32
    assert 0.0 <= float(digits.train_images.min()) and float(digits.train_images.max()) <= 1.0
    assert len(digits.train_labels) + len(digits.test_labels) == 1797
    # stratified test split: every class about 20 %
    counts = torch.bincount(digits.test_labels, minlength=10)
    assert int(counts.min()) >= 35 and int(counts.max()) <= 37


def test_digits_noisy_is_fixed_and_noisy(digits):
    a, b = load_dataset("digits_noisy"), load_dataset("digits_noisy")
    assert torch.equal(a.train_images, b.train_images)  # the noise is part of the dataset, not a per-run draw
    assert torch.equal(a.train_labels, digits.train_labels)
    diff = (a.train_images - digits.train_images)
    assert 0.15 < float(diff.std()) < 0.35
    assert 0.0 <= float(a.train_images.min()) and float(a.train_images.max()) <= 1.0


def test_random_split_sizes_disjoint_and_inside_training_set(digits):
    s = make_split(digits, -1, 130, seed=2)
    assert s.scenario == "random"
    assert len(s.forget) == 130 and len(s.forget) + len(s.retain) == len(s.train)
    assert not set(s.forget) & set(s.retain)
    assert set(s.forget) <= set(s.train) and set(s.retain) <= set(s.train)  # the consistent split
    assert not set(s.val) & set(s.train)
    assert len(s.test) == len(digits.test_labels)
    # per-class 10 % validation
    val_counts = np.bincount(digits.train_labels.numpy()[s.val], minlength=10)
    class_counts = np.bincount(digits.train_labels.numpy(), minlength=10)
    assert np.array_equal(val_counts, (0.1 * class_counts).astype(int))


def test_same_arguments_same_indices_other_seed_other_indices(digits):
    a, b, c = make_split(digits, -1, 50, seed=3), make_split(digits, -1, 50, seed=3), make_split(digits, -1, 50, seed=4)
    assert np.array_equal(a.forget, b.forget) and a.hash == b.hash
    assert not np.array_equal(a.forget, c.forget) and a.hash != c.hash
    assert np.array_equal(a.train, c.train)  # the training set never depends on the forget seed


def test_forget_selection_matches_upstream_rule(digits):
    """Positions in the train split drawn with RandomState(seed - 1).choice, as Unlearn-Sparse does."""
    s = make_split(digits, -1, 20, seed=5)
    train, _ = train_val_split(digits.train_labels.numpy(), 10, 1)
    positions = np.random.RandomState(4).choice(np.arange(len(train)), size=20, replace=False)
    assert np.array_equal(np.sort(s.forget), np.sort(train[positions]))


def test_subclass_and_classwise(digits):
    sub = make_split(digits, 3, 10, seed=1)
    assert sub.scenario == "subclass" and (digits.train_labels[sub.forget] == 3).all()
    assert len(sub.test) == len(digits.test_labels)
    whole = make_split(digits, 3, None, seed=1)
    assert whole.scenario == "classwise"
    assert (digits.train_labels[whole.forget] == 3).all()
    assert not (digits.train_labels[whole.retain] == 3).any()
    assert not (digits.test_labels[whole.test] == 3).any()
    assert len(whole.test) == int((digits.test_labels != 3).sum())
    # asking for the class's full count is class-wise too (count computed, not hard-coded)
    full = make_split(digits, 3, len(whole.forget), seed=1)
    assert full.scenario == "classwise" and len(full.test) == len(whole.test)


def test_upstream_split_mode_reproduces_the_quirk(digits):
    s = make_split(digits, -1, 100, seed=2, split_mode="upstream")
    train, _ = train_val_split(digits.train_labels.numpy(), 10, 1)
    outside = set(s.forget) - set(train)
    assert outside, "with seed != 1 the upstream split draws some forget samples from the original model's val set"
    assert np.array_equal(make_split(digits, -1, 100, seed=1, split_mode="upstream").forget,
                          make_split(digits, -1, 100, seed=1).forget)


@pytest.mark.parametrize("kwargs, message", [
    (dict(class_to_replace=-1, num_indexes_to_replace=0), "allowed: 1.."),
    (dict(class_to_replace=-1, num_indexes_to_replace=100000), "the training set"),
    (dict(class_to_replace=2, num_indexes_to_replace=1000), "class 2"),
    (dict(class_to_replace=10, num_indexes_to_replace=5), "0..9"),
    (dict(class_to_replace=-1, num_indexes_to_replace=None), "required"),
    (dict(class_to_replace=-1, num_indexes_to_replace=5, seed=0), ">= 1"),
])
def test_bad_split_arguments_are_one_line_errors(digits, kwargs, message):
    with pytest.raises(UserError) as info:
        make_split(digits, **kwargs)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_pool_size_is_named_in_the_error(digits):
    s = make_split(digits, -1, 1, seed=1)
    with pytest.raises(UserError, match=f"1..{len(s.train)}"):
        make_split(digits, -1, len(s.train) + 1, seed=1)


def test_split_save_roundtrip(tmp_path, digits):
    import json
    s = make_split(digits, -1, 30, seed=2)
    saved = json.loads(s.save(tmp_path / "split.json").read_text())
    assert saved["hash"] == s.hash and saved["forget"] == s.forget.tolist() and saved["sizes"]["forget"] == 30


def test_loader_batches_shuffle_determinism_and_augmentation():
    images = torch.arange(10 * 3 * 4 * 4, dtype=torch.uint8).reshape(10, 3, 4, 4)
    labels = torch.arange(10)
    plain = list(TensorLoader(images, labels, batch_size=4))
    assert [len(y) for _, y in plain] == [4, 4, 2]
    assert torch.allclose(plain[0][0], images[:4].float() / 255)
    a = [y for _, y in TensorLoader(images, labels, 4, shuffle=True, generator=make_generator(1))]
    b = [y for _, y in TensorLoader(images, labels, 4, shuffle=True, generator=make_generator(1))]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert sorted(torch.cat(a).tolist()) == list(range(10))
    with pytest.raises(ValueError):
        TensorLoader(images, labels, 4, shuffle=True)
    # a training pass never ends on a one-sample batch (BatchNorm needs two); evaluation keeps every sample
    odd = TensorLoader(images[:9], labels[:9], 4, shuffle=True, generator=make_generator(1))
    assert len(odd) == 2 and [len(y) for _, y in odd] == [4, 4]
    assert [len(y) for _, y in TensorLoader(images[:9], labels[:9], 4)] == [4, 4, 1]


def test_crop_flip_is_a_padded_translation_and_flip():
    x = torch.rand(64, 3, 8, 8)
    out = crop_flip(x, make_generator(0), padding=2)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(64):  # every output is one of the 5x5 crops of the padded image, possibly mirrored
        found = any(torch.equal(out[i], c) or torch.equal(out[i], c.flip(-1))
                    for dy in range(5) for dx in range(5) for c in [padded[i, :, dy:dy + 8, dx:dx + 8]])
        assert found


def test_split_data_parts(digits):
    s = make_split(digits, -1, 40, seed=1)
    sd = SplitData(digits, s, batch_size=32)
    x, y = sd.tensors("forget")
    assert torch.equal(y, digits.train_labels[torch.as_tensor(s.forget)])
    assert sum(len(b[1]) for b in sd.eval_loader("test")) == len(s.test)


# --- file formats (written by the test in the real layouts; no download) ---------------------------------------------

def _write_cifar10(root, n_per_batch=20):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.RandomState(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = {b"batch_label": name.encode(), b"labels": list(rng.randint(0, 10, n_per_batch)),
                 b"data": rng.randint(0, 256, (n_per_batch, 3072)).astype(np.uint8),
                 b"filenames": [b"x.png"] * n_per_batch}
        with open(folder / name, "wb") as handle:
            pickle.dump(entry, handle, protocol=2)
    return folder


def test_cifar10_loader_reads_the_python_format(tmp_path):
    folder = _write_cifar10(tmp_path)
    data = load_dataset("cifar10", tmp_path, download=False)
    assert data.train_images.shape == (100, 3, 32, 32) and data.test_images.shape == (20, 3, 32, 32)
    assert data.train_images.dtype == torch.uint8 and data.num_classes == 10 and data.augment == "crop_flip"
    with open(folder / "data_batch_1", "rb") as handle:
        first = pickle.load(handle, encoding="latin1")
    assert torch.equal(data.train_images[0].reshape(-1), torch.from_numpy(first[b"data"][0]))
    assert data.train_labels[:20].tolist() == [int(v) for v in first[b"labels"]]


def test_cifar_files_with_code_are_refused(tmp_path):
    folder = _write_cifar10(tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    with open(folder / "test_batch", "wb") as handle:
        pickle.dump({b"data": Evil(), b"labels": [0]}, handle)
    with pytest.raises(UserError, match="not in the CIFAR python format"):
        load_dataset("cifar10", tmp_path, download=False)


def _pickled(entry) -> bytes:
    return pickle.dumps(entry, protocol=2)


def _official_entry(changes=None, n=20):
    rng = np.random.RandomState(1)
    entry = {b"batch_label": b"data_batch_1", b"labels": list(rng.randint(0, 10, n)),
             b"data": rng.randint(0, 256, (n, 3072)).astype(np.uint8), b"filenames": [b"x.png"] * n}
    entry.update(changes or {})
    return entry


@pytest.mark.parametrize("content,reason", [
    (lambda: _pickled(_official_entry())[:500], "truncated"),
    (lambda: b"", "truncated"),
    (lambda: bytes(range(256)) * 40, "unreadable pickle"),
    (lambda: _pickled([1, 2, 3]), "holds a list"),
    (lambda: _pickled({k: v for k, v in _official_entry().items() if k != b"labels"}), "no 'labels' entry"),
    (lambda: _pickled(_official_entry({b"data": np.zeros((20, 1024), np.uint8)})), "'data' has shape (20, 1024)"),
    (lambda: _pickled(_official_entry({b"data": np.zeros((20, 3072), np.float32)})), "dtype float32"),
    (lambda: _pickled(_official_entry({b"labels": [0] * 19})), "'labels' has shape (19,)"),
    (lambda: _pickled(_official_entry({b"labels": [10] * 20})), "class ids outside 0..9"),
])
def test_malformed_cifar_batch_is_a_one_line_error_naming_the_file(tmp_path, content, reason):
    folder = _write_cifar10(tmp_path)
    (folder / "data_batch_1").write_bytes(content())
    with pytest.raises(UserError) as info:
        load_dataset("cifar10", tmp_path, download=False)
    message = str(info.value)
    assert "\n" not in message and str(folder / "data_batch_1") in message, message
    assert reason in message and "expected a pickled dict with 'data' (N x 3072 uint8" in message, message


def test_cifar100_batches_need_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.RandomState(0)
    for name in ("train", "test"):
        entry = {b"fine_labels": list(rng.randint(0, 100, 10)), b"coarse_labels": list(rng.randint(0, 20, 10)),
                 b"data": rng.randint(0, 256, (10, 3072)).astype(np.uint8)}
        (folder / name).write_bytes(_pickled(entry))
    data = load_dataset("cifar100", tmp_path, download=False)
    assert data.num_classes == 100 and data.train_images.shape == (10, 3, 32, 32)
    (folder / "test").write_bytes(_pickled({b"labels": [0] * 10, b"data": np.zeros((10, 3072), np.uint8)}))
    with pytest.raises(UserError, match="no 'fine_labels' entry"):
        load_dataset("cifar100", tmp_path, download=False)


def test_missing_cifar_offline_is_a_one_line_error(tmp_path):
    with pytest.raises(UserError) as info:
        load_dataset("cifar100", tmp_path, download=False)
    assert "cifar-100-python" in str(info.value) and "\n" not in str(info.value)


def test_svhn_loader_reads_the_mat_format(tmp_path):
    from scipy.io import savemat
    folder = tmp_path / "svhn"
    folder.mkdir()
    rng = np.random.RandomState(0)
    for split, n in (("train", 12), ("test", 5)):
        x = rng.randint(0, 256, (32, 32, 3, n)).astype(np.uint8)
        y = rng.randint(1, 11, (n, 1))
        savemat(folder / f"{split}_32x32.mat", {"X": x, "y": y})
        if split == "train":
            x_train, y_train = x, y
    data = load_dataset("svhn", tmp_path, download=False)
    assert data.train_images.shape == (12, 3, 32, 32)
    assert torch.equal(data.train_images[3].permute(1, 2, 0), torch.from_numpy(x_train[..., 3]))
    assert data.train_labels.tolist() == [int(v) % 10 for v in y_train.ravel()]


def test_unknown_dataset():
    with pytest.raises(UserError, match="available: .*digits"):
        load_dataset("mnist")
