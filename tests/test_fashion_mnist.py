"""--dataset fashion_mnist and --train_subset, on small files of Fashion-MNIST's own format written here (idx layout,
gzip-compressed; never the real files): both folder layouts, the decompressed cache, the missing-files error, the
stratified subset and where it is recorded, the benchmark's cells, and one main_baseline / main_forget run end to end.
"""
from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import dataset
import main_forget
from arg_parser import parse_config
from dataset import (
    FASHION_MNIST_FILES,
    Split,
    check_train_subset,
    load_dataset,
    make_split,
    recipe_defaults,
    train_subset_indices,
)
from pipeline import paths
from utils import EnvironmentUserError, UserError, sha256_of_array

TRAIN_PER_CLASS, TEST_PER_CLASS = 30, 10


def idx_bytes(array: np.ndarray) -> bytes:
    """The idx format: magic 0x0000 08 <ndim> (uint8 data), one big-endian uint32 per dimension, then the bytes."""
    header = struct.pack(">I", 0x00000800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def fake_arrays(per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Class c: a bright horizontal bar at rows 2c..2c+2 over noise, so the classes can be learnt."""
    rng = np.random.RandomState(seed)
    labels = np.repeat(np.arange(10), per_class)
    rng.shuffle(labels)
    images = rng.randint(0, 60, size=(len(labels), 28, 28)).astype(np.uint8)
    for i, c in enumerate(labels):
        images[i, 2 * c + 4:2 * c + 7, 3:25] = 200 + rng.randint(0, 50)
    return images, labels.astype(np.uint8)


ARRAYS = {"train": fake_arrays(TRAIN_PER_CLASS, 0), "t10k": fake_arrays(TEST_PER_CLASS, 1)}


def write_files(folder: Path, compressed: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for part, (images, labels) in ARRAYS.items():
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            name = f"{part}-{kind}-ubyte"
            if compressed:
                (folder / f"{name}.gz").write_bytes(gzip.compress(idx_bytes(array)))
            else:
                (folder / name).write_bytes(idx_bytes(array))
    return folder


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch) -> Path:
    """Decompressed copies go to this test's own folder, never to the user's cache."""
    folder = tmp_path / "cache"
    monkeypatch.setenv(dataset.DATA_CACHE_ENV, str(folder))
    return folder


@pytest.fixture
def flat(tmp_path) -> Path:
    """Debian's layout: the four .gz files directly in one folder."""
    return write_files(tmp_path / "fashion-mnist")


def no_download(*args, **kwargs):
    raise AssertionError("no download may be attempted here")


# ---------------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------------

def check_loaded(data) -> None:
    images, labels = ARRAYS["train"]
    assert data.name == "fashion_mnist" and data.num_classes == 10 and data.augment == "none"
    assert data.train_images.dtype == torch.uint8 and tuple(data.train_images.shape) == (300, 1, 28, 28)
    assert data.in_channels == 1 and data.image_size == 28
    assert np.array_equal(data.train_images[:, 0].numpy(), images)
    assert np.array_equal(data.train_labels.numpy(), labels.astype(np.int64))
    assert data.train_labels.dtype == torch.int64
    assert np.array_equal(data.test_images[:, 0].numpy(), ARRAYS["t10k"][0])
    assert np.array_equal(data.test_labels.numpy(), ARRAYS["t10k"][1].astype(np.int64))
    # normalisation constants: the training images' mean and (sample) std, in [0, 1] units
    scaled = images.astype(np.float64) / 255.0
    assert data.mean == pytest.approx((scaled.mean(),), abs=1e-6)
    assert data.std == pytest.approx((scaled.std(ddof=1),), abs=1e-6)


def test_flat_folder_of_gz_files(flat, cache_dir, monkeypatch):
    monkeypatch.setattr(dataset, "_download_torchvision", no_download)
    before = sorted(p.name for p in flat.iterdir())
    check_loaded(load_dataset("fashion_mnist", flat, download=True))
    assert sorted(p.name for p in flat.iterdir()) == before  # the data folder is only read
    copies = [p for p in cache_dir.iterdir()]
    assert len(copies) == 1 and copies[0].name.startswith("fashion_mnist-")
    raw = copies[0] / "FashionMNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted(FASHION_MNIST_FILES)
    stamp = {p.name: p.stat().st_mtime_ns for p in raw.iterdir()}
    check_loaded(load_dataset("fashion_mnist", flat, download=False))  # the second load decompresses nothing
    assert [p for p in cache_dir.iterdir()] == copies
    assert {p.name: p.stat().st_mtime_ns for p in raw.iterdir()} == stamp


def test_other_files_get_their_own_decompressed_copy(flat, tmp_path, cache_dir):
    load_dataset("fashion_mnist", flat, download=False)
    other = write_files(tmp_path / "other")
    (other / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(ARRAYS["train"][1][::-1].copy())))
    data = load_dataset("fashion_mnist", other, download=False)
    assert np.array_equal(data.train_labels.numpy(), ARRAYS["train"][1][::-1].astype(np.int64))
    assert len(list(cache_dir.iterdir())) == 2


def test_torchvision_layout(tmp_path, cache_dir, monkeypatch):
    monkeypatch.setattr(dataset, "_download_torchvision", no_download)
    root = tmp_path / "data"
    write_files(root / "FashionMNIST" / "raw", compressed=False)
    check_loaded(load_dataset("fashion_mnist", root, download=True))
    assert not cache_dir.exists()  # decompressed files are read where they are


def test_torchvision_layout_with_only_the_gz_files(tmp_path, cache_dir):
    root = tmp_path / "data"
    write_files(root / "FashionMNIST" / "raw")
    check_loaded(load_dataset("fashion_mnist", root, download=False))
    assert len(list(cache_dir.iterdir())) == 1


def test_download_goes_through_torchvision(tmp_path, monkeypatch):
    calls = []

    def fake_download(kind, data_dir, **kwargs):  # what torchvision's FashionMNIST(download=True) leaves behind
        calls.append(kind)
        write_files(Path(data_dir) / "FashionMNIST" / "raw", compressed=False)

    monkeypatch.setattr(dataset, "_download_torchvision", fake_download)
    check_loaded(load_dataset("fashion_mnist", tmp_path / "empty", download=True))
    assert calls == ["FashionMNIST"]


@pytest.mark.parametrize("download", [False, True])
def test_missing_files_one_line(tmp_path, monkeypatch, download):
    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(dataset, "_download_torchvision", offline if download else no_download)
    folder = tmp_path / "nothing"
    write_files(folder)
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()  # three of four files are not enough
    with pytest.raises(EnvironmentUserError) as info:
        load_dataset("fashion_mnist", folder, download=download)
    message = str(info.value)
    assert "\n" not in message and "fashion_mnist files missing" in message
    assert "torchvision download" in message and "apt-get install dataset-fashion-mnist" in message
    assert "--data /usr/share/datasets/fashion-mnist" in message


@pytest.mark.integration
def test_missing_files_exit_2_before_any_work(run, tmp_path):
    save_dir = tmp_path / "out"
    proc = run("main_baseline.py", "--dataset", "fashion_mnist", "--data", str(tmp_path / "nothing"),
               "--no-download", "--save_dir", str(save_dir), "--no-progress",
               env={dataset.DATA_CACHE_ENV: str(tmp_path / "cache")})
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "fashion_mnist files missing" in lines[0] and "apt-get install" in lines[0]
    assert not save_dir.exists() or not any(save_dir.iterdir())


def test_damaged_files_are_one_line_errors(flat):
    (flat / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(UserError, match="not intact gzip files") as info:
        load_dataset("fashion_mnist", flat, download=False)
    assert "\n" not in str(info.value)


def test_wrong_image_size_is_refused(tmp_path):
    root = tmp_path / "data"
    raw = write_files(root / "FashionMNIST" / "raw", compressed=False)
    (raw / "train-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros((300, 8, 8), np.uint8)))
    with pytest.raises(UserError, match="expected N x 28 x 28"):
        load_dataset("fashion_mnist", root, download=False)


# ---------------------------------------------------------------------------------------------------------------------
# --train_subset
# ---------------------------------------------------------------------------------------------------------------------

def test_subset_is_stratified_by_largest_remainder():
    labels = np.array([0] * 5 + [1] * 3 + [2] * 2)
    # shares 5 * (5, 3, 2) / 10 = (2.5, 1.5, 1.0): floors (2, 1, 1), the one left over goes to the tie's lower class
    chosen = train_subset_indices(labels, 3, 5)
    assert np.bincount(labels[chosen], minlength=3).tolist() == [3, 1, 1]
    assert np.all(np.diff(chosen) > 0)
    assert np.array_equal(chosen, train_subset_indices(labels, 3, 5))  # deterministic
    # shares 7 * (5, 3, 2) / 10 = (3.5, 2.1, 1.4): floors (3, 2, 1), one left over, to the largest remainder (class 0)
    assert np.bincount(labels[train_subset_indices(labels, 3, 7)], minlength=3).tolist() == [4, 2, 1]


def test_subset_split_is_deterministic_recorded_and_inside_the_subset(flat):
    data = load_dataset("fashion_mnist", flat, download=False)
    labels = data.train_labels.numpy()
    split = make_split(data, -1, 18, seed=1, train_subset=200)
    pool = np.union1d(split.train, split.val)
    assert len(pool) == 200 and np.array_equal(pool, train_subset_indices(labels, 10, 200))
    assert np.bincount(labels[pool], minlength=10).tolist() == [20] * 10  # stratified
    assert np.bincount(labels[split.val], minlength=10).tolist() == [2] * 10  # 10 % per class, as without a subset
    assert set(split.forget) | set(split.retain) == set(split.train) and len(split.forget) == 18
    again = make_split(data, -1, 18, seed=1, train_subset=200)
    assert again.hash == split.hash and np.array_equal(again.forget, split.forget)
    # the subset is one data set for every seed: another seed draws another forget set from the same subset
    other_seed = make_split(data, -1, 18, seed=2, train_subset=200)
    assert np.array_equal(np.union1d(other_seed.train, other_seed.val), pool)
    # recorded: in the split file, in the hash and in the tag (hence in every Retrain file name)
    record = split.to_json()
    assert record["train_subset"] == 200 and record["sizes"]["train"] == 180 and record["sizes"]["val"] == 20
    assert "_sub200_" in split.tag
    other_size = make_split(data, -1, 18, seed=1, train_subset=250)
    full = make_split(data, -1, 18, seed=1)
    assert len({split.hash, other_size.hash, full.hash}) == 3
    assert full.to_json()["train_subset"] is None and "_sub" not in full.tag


def test_split_hash_without_subset_is_unchanged(digits):
    split = make_split(digits, -1, 130, seed=2)
    before = sha256_of_array(np.concatenate([[len(split.forget), len(split.retain), len(split.test)], split.forget,
                                             split.retain, split.test]))
    assert split.hash == before
    rebuilt = Split(dataset="digits", train=split.train, val=split.val, forget=split.forget, retain=split.retain,
                    test=split.test, scenario=split.scenario, class_to_replace=-1, num_indexes_to_replace=130, seed=2)
    assert rebuilt.hash == before


def test_subset_refused_where_it_makes_no_sense(flat, digits):
    with pytest.raises(UserError, match="not available for digits"):
        check_train_subset("digits", 500)
    with pytest.raises(UserError, match=r"allowed: 100\.\.59999"):
        check_train_subset("fashion_mnist", 60_000)
    with pytest.raises(UserError, match=r"allowed: 100\.\.59999"):
        check_train_subset("fashion_mnist", 99)
    with pytest.raises(UserError, match=r"allowed: 1000\.\.49999"):
        check_train_subset("cifar100", 999)
    check_train_subset("fashion_mnist", None)
    check_train_subset("cifar10", 10_000)
    # against the data actually loaded (here 300 training images)
    data = load_dataset("fashion_mnist", flat, download=False)
    with pytest.raises(UserError, match=r"allowed: 100\.\.299"):
        make_split(data, -1, 10, seed=1, train_subset=300)
    with pytest.raises(UserError, match="not available for digits"):
        make_split(digits, -1, 10, seed=1, train_subset=500)


def test_subset_flag_checked_before_any_work(tmp_path):
    with pytest.raises(UserError, match="not available for digits"):
        parse_config(["--dataset", "digits", "--train_subset", "500", "--save_dir", str(tmp_path / "out")],
                     "main_baseline.py")
    with pytest.raises(UserError, match="out of range for fashion_mnist"):
        parse_config(["--dataset", "fashion_mnist", "--train_subset", "60000", "--save_dir", str(tmp_path / "out")],
                     "main_baseline.py")
    assert not (tmp_path / "out").exists()


def test_subset_run_takes_the_cpu_tier_and_its_own_file_names(tmp_path):
    common = ["--dataset", "fashion_mnist", "--save_dir", str(tmp_path), "--seed", "1"]
    full = parse_config(common, "main_baseline.py")
    subset = parse_config(common + ["--train_subset", "10000"], "main_baseline.py")
    assert subset.data.train_subset == 10000 and full.data.train_subset is None
    assert subset.model.width == recipe_defaults("fashion_mnist", 10000)["width"] == 16
    assert full.model.width is None  # the GPU recipe: the architecture's full width
    assert subset.model.epochs == dataset.FASHION_MNIST_CPU_RECIPE["epochs"]
    assert full.model.epochs == dataset.FASHION_MNIST_GPU_RECIPE["epochs"]
    same_recipe = parse_config(common + ["--epochs", "15", "--width", "16"], "main_baseline.py")
    subset_15 = parse_config(common + ["--epochs", "15", "--width", "16", "--train_subset", "10000"],
                             "main_baseline.py")
    full_name = paths.original_model(tmp_path, same_recipe.data, same_recipe.model)
    subset_name = paths.original_model(tmp_path, subset_15.data, subset_15.model)
    assert full_name.name == "1resnet18_ep15model_SA_best.pth.tar"  # unchanged without a subset
    assert subset_name.name == "1resnet18_ep15_sub10000model_SA_best.pth.tar"


def test_tracked_runs_log_the_subset(tmp_path):
    from pipeline.runs import run_params

    common = ["--dataset", "fashion_mnist", "--save_dir", str(tmp_path), "--class_to_replace", "-1",
              "--num_indexes_to_replace", "900", "--unlearn", "NGPlus"]
    assert run_params(parse_config(common + ["--train_subset", "10000"]))["data.train_subset"] == 10000
    assert "data.train_subset" not in run_params(parse_config(common))


# ---------------------------------------------------------------------------------------------------------------------
# The benchmark's cells
# ---------------------------------------------------------------------------------------------------------------------

def test_benchmark_cells_carry_the_subset(flat, tmp_path):
    from sweep.grid import build_cells, compute_split_tags, parse_cell, train_size
    from sweep.settings import Settings

    settings = Settings(datasets=["fashion_mnist"], archs=["resnet18"], scenarios=["random", "classwise"],
                        methods=["NGPlus"], seeds=[1], out=tmp_path / "bench", data=str(flat), device="cpu",
                        epochs=1, width=4, no_download=True, train_subset=200)
    assert train_size("fashion_mnist", settings) == 180
    cells, _ = build_cells(settings)
    for cell in cells:
        run = parse_cell(cell.argv)
        assert run.data.train_subset == 200 and cell.argv[cell.argv.index("--train_subset") + 1] == "200"
    random_cell = next(c for c in cells if c.kind == "method" and c.scenario == "random")
    assert parse_cell(random_cell.argv).data.num_indexes_to_replace == 18  # 10 % of the subset's training split
    compute_split_tags(cells, settings)
    assert all("_sub200_" in c.split_tag for c in cells if c.kind == "retrain")
    full_keys = {c.key for c in build_cells(Settings(**{**settings.__dict__, "train_subset": None}))[0]}
    assert full_keys.isdisjoint(c.key for c in cells)  # a subset cell never reuses a full-data cell


def test_benchmark_refuses_a_subset_for_digits(tmp_path, capsys):
    import benchmark

    with pytest.raises(UserError, match="not available for digits_noisy"):
        benchmark.main(["--datasets", "digits_noisy", "--train_subset", "500", "--out", str(tmp_path / "b"),
                        "--no-track"])
    assert not (tmp_path / "b").exists()


# ---------------------------------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.integration
def test_baseline_and_forget_on_the_fake_files(run, flat, tmp_path, monkeypatch):
    env = {dataset.DATA_CACHE_ENV: str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    save = tmp_path / "results"
    common = ["--dataset", "fashion_mnist", "--data", str(flat), "--no-download", "--train_subset", "200",
              "--epochs", "2", "--width", "4", "--batch_size", "64", "--no-progress", "--save_dir", str(save),
              "--seed", "1"]
    forget = ["--class_to_replace", "-1", "--num_indexes_to_replace", "18"]
    proc = run("main_baseline.py", *common, env=env)
    assert proc.returncode == 0, proc.stderr
    original = save / "1resnet18_ep2_sub200model_SA_best.pth.tar"
    assert original.is_file()
    proc = run("main_baseline.py", *common, *forget, "--retrain", env=env)
    assert proc.returncode == 0, proc.stderr
    proc = run("main_forget.py", *common, *forget, "--unlearn", "NGPlus", "--unlearn_epochs", "1", env=env)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((save / "NGPluseval_result.json").read_text())
    split_file = Path(result["split_file"])
    assert "_sub200_" in split_file.name and "avg_gap" in result  # the subset's Retrain model was found
    recorded = json.loads(split_file.read_text())
    assert recorded["train_subset"] == 200 and recorded["hash"] == result["split_hash"]
    assert recorded["sizes"]["forget"] == 18 and recorded["sizes"]["retain"] == 162
    assert result["args"]["train_subset"] == 200
    # the subset's original model is never taken for a full-data one (in-process: the same check, without a start-up)
    monkeypatch.setenv(dataset.DATA_CACHE_ENV, env[dataset.DATA_CACHE_ENV])
    whole_data = [arg for arg in common if arg not in ("--train_subset", "200")]
    with pytest.raises(UserError, match="trained on a --train_subset of 200; this run asks for all training images"):
        main_forget.main([*whole_data, *forget, "--unlearn", "NGPlus", "--unlearn_epochs", "1",
                          "--mask", str(original)])


@pytest.mark.slow
@pytest.mark.perf
@pytest.mark.integration
def test_gpu_script_quick_mode_on_the_fake_files(run, flat, tmp_path):
    report_file = tmp_path / "report.json"
    proc = run("perf/fashion_mnist_gpu.py", str(flat), "--quick", "--device", "cpu", "--amp", "off", "--out",
               str(tmp_path / "runs"), "--json", str(report_file),
               env={dataset.DATA_CACHE_ENV: str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    report = json.loads(report_file.read_text())
    assert report["train_images"] == 180 and report["forget_images"] == 18 and report["quick"]
    assert set(report["models"]) == {"original", "Retrain"} and set(report["methods"]) == {"NGPlus", "VarGrad", "SalUn"}
    retrain = report["models"]["Retrain"]
    assert retrain["epoch_seconds"] == pytest.approx(retrain["train_seconds"] / report["epochs"])
    for entry in report["methods"].values():
        assert entry["rte_over_retrain"] == pytest.approx(entry["RTE_seconds"] / retrain["train_seconds"])
    assert "of Retrain's" in proc.stdout and "quick mode: targets not checked" in proc.stdout
