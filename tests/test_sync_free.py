"""No host synchronisation per step: the training loop and every epoch-based unlearning loop keep their statistics
(losses, accuracies, the masks' kept fraction) on the device and read them once per epoch.

On a GPU every read of a device value on the host (`.item()`, `bool(t)`, `float(t)`, `.tolist()`, `.cpu()`, ...) waits
for all queued kernels; one such read per step keeps the GPU idle between steps. The machine running the tests has no
GPU, so the tests count those calls instead: Tensor methods that read a value on the host are patched with counters,
and an epoch with n batches must make exactly as many of them as an epoch with 2n batches (reads per epoch are fine,
reads per step are not).

Excluded: calls made by `torch.optim` itself. Adam keeps its step counters as host tensors unless it is `capturable`,
so its `.item()` on them reads host memory and never waits for the GPU.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dataset  # noqa: E402
import unlearn.masks as masks  # noqa: E402
from evaluation.metrics import predict  # noqa: E402
from models import create_model  # noqa: E402
from training import TrainRecipe, accuracy_of, make_optimizer, train_one_epoch  # noqa: E402
from unlearn import METHODS, UnlearnContext, declared_flags, resolve_hyperparameters, resolve_method, run_unlearning  # noqa: E402
from unlearn.masks import MASK_MODES  # noqa: E402
from utils import make_generator  # noqa: E402

#: Tensor methods that hand a device value to the host (each one waits for the device's queue on a GPU).
HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")
#: Batch sizes giving n and 2n steps per epoch (forget set of 120 samples: 3 and 6 steps of the bi-objective loop).
BATCH_SIZES = (40, 20)


class HostReadCounter:
    """Counts the calls of :data:`HOST_READS` while active, by calling site (for a readable failure message)."""

    def __init__(self):
        self.sites: collections.Counter[str] = collections.Counter()

    @property
    def total(self) -> int:
        return sum(self.sites.values())

    def _wrap(self, name, original):
        def counted(tensor, *args, **kwargs):
            caller = sys._getframe(1)
            if not caller.f_globals.get("__name__", "").startswith("torch.optim"):
                self.sites[f"{name} at {Path(caller.f_code.co_filename).name}:{caller.f_lineno}"] += 1
            return original(tensor, *args, **kwargs)
        return counted

    @contextlib.contextmanager
    def active(self):
        with pytest.MonkeyPatch.context() as patch:
            for name in HOST_READS:
                patch.setattr(torch.Tensor, name, self._wrap(name, getattr(torch.Tensor, name)))
            yield self


def host_reads(work) -> HostReadCounter:
    counter = HostReadCounter()
    with counter.active(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        work()
    return counter


def assert_same_reads(small: HostReadCounter, large: HostReadCounter, what: str) -> None:
    grown = {site: (small.sites[site], n) for site, n in large.sites.items() if n != small.sites[site]}
    assert small.total == large.total, f"{what}: host reads grow with the number of steps: {grown}"


@pytest.fixture(autouse=True)
def _few_threads(one_thread):
    yield


@pytest.fixture(autouse=True)
def _accelerator_opt_search(monkeypatch):
    """OPT masks search their cut-off on the host for CPU tensors only (a CPU has no queue to wait for); the tests run
    the search that accelerators use, which is the one that must not read device values."""
    monkeypatch.setattr(masks, "HOST_SEARCH_DEVICE_TYPES", ())


@pytest.fixture(scope="module")
def split_data(digits):
    split = dataset.make_split(digits, class_to_replace=-1, num_indexes_to_replace=120, seed=1)
    # the SGD loops pass over the retain set: keep it short
    split = dataclasses.replace(split, retain=split.retain[:240])
    return dataset.SplitData(digits, split, batch_size=BATCH_SIZES[0])


def tiny_model(device="cpu"):
    torch.manual_seed(0)
    return create_model("resnet20s", 10, in_channels=1, width=4).to(device)


def make_method(name, data, batch_size, grad_mask=None):
    resolved = resolve_method(name, grad_mask)
    flag_of = {hp.name: flag for flag, hp in declared_flags().items()}
    hp = resolve_hyperparameters(resolved, {flag_of["batch_size"]: batch_size},
                                 recipe={"batch_size": batch_size, "decreasing_lr": ""})
    ctx = UnlearnContext(model=tiny_model(data.device), data=data, generator=make_generator(3), hp=hp,
                         progress=False)
    method = resolved.cls(ctx)
    method.name = resolved.name
    return method


def epoch_based_cases():
    """Every registered epoch-based method; the bi-objective bases with their own loop once, and NGPlus with every
    add-on mode (each mode is a different per-step computation)."""
    cases = []
    for name, cls in METHODS.items():
        if cls.one_shot:
            continue
        cases.append((name, None))
        if cls.supports_grad_mask and name == "NGPlus":
            cases += [(name, mode) for mode in MASK_MODES if mode != "none"]
    return cases


def test_the_counter_sees_a_read_per_step(split_data):
    """The counter works: a loop that reads its loss every step is caught."""
    def loader(batch_size):
        return split_data.train_loader("forget", make_generator(1), batch_size=batch_size)

    def loop(batch_size):
        model = tiny_model()
        for x, y in loader(batch_size):
            F.cross_entropy(model(x), y).item()
    small, large = (host_reads(lambda b=b: loop(b)) for b in BATCH_SIZES)
    extra_steps = len(loader(BATCH_SIZES[1])) - len(loader(BATCH_SIZES[0]))
    assert extra_steps > 0 and large.total - small.total == extra_steps


def test_training_epoch_reads_once_per_epoch(split_data):
    def epoch(batch_size):
        model = tiny_model()
        optimizer = make_optimizer(model, TrainRecipe(lr=0.01, batch_size=batch_size))
        loader = split_data.train_loader("forget", make_generator(1), batch_size=batch_size)
        train_one_epoch(model, loader, optimizer)
    small, large = (host_reads(lambda b=b: epoch(b)) for b in BATCH_SIZES)
    assert_same_reads(small, large, "train_one_epoch")


def test_evaluation_passes_read_once(split_data):
    model = tiny_model()

    def evaluate(batch_size):
        accuracy_of(model, split_data.eval_loader("forget", batch_size=batch_size))
        predict(model, split_data.eval_loader("forget", batch_size=batch_size))
    small, large = (host_reads(lambda b=b: evaluate(b)) for b in BATCH_SIZES)
    assert_same_reads(small, large, "accuracy_of / predict")


@pytest.mark.parametrize("name,grad_mask", epoch_based_cases(),
                         ids=lambda v: "" if v is None else str(v))
def test_unlearning_epoch_reads_once_per_epoch(split_data, name, grad_mask):
    def epoch(batch_size):
        run_unlearning(make_method(name, split_data, batch_size, grad_mask), 1, progress=False)
    small, large = (host_reads(lambda b=b: epoch(b)) for b in BATCH_SIZES)
    assert_same_reads(small, large, f"{name} {grad_mask or ''}")


@pytest.mark.parametrize("mode", MASK_MODES)
def test_kept_fraction_mean_equals_the_mean_of_per_step_reads(mode):
    """The epoch statistic read once equals, float for float, the mean of `kept_fraction` read after every step."""
    torch.manual_seed(0)
    shapes = [(7, 5), (3,), (4, 2, 3)]
    steps = [([torch.randn(s) for s in shapes], [torch.randn(s) for s in shapes]) for _ in range(4)]
    deferred = masks.GradientMask(mode, beta=0.9, generator=1)
    per_step = masks.GradientMask(mode, beta=0.9, generator=1)
    mean, reads = masks.KeptFractionMean(), []
    assert mean.value() == 1.0  # no step: nothing was masked
    for g_u, g_c in steps:
        deferred.direction(g_u, g_c)
        count = deferred.kept_count
        if mode in ("none", "focus"):
            assert isinstance(count, int)
        else:
            assert count.dim() == 0 and count.dtype == torch.int64
        mean.add(deferred)
        per_step.direction(g_u, g_c)
        reads.append(per_step.kept_fraction)
    assert len(mean) == len(steps)
    assert mean.value() == sum(reads) / len(reads)
    assert deferred.kept_fraction == reads[-1]  # reading the count first leaves the fraction as it was
    with pytest.raises(ValueError, match="computed a direction"):
        masks.KeptFractionMean().add(masks.GradientMask(mode, beta=0.9))


def test_every_epoch_based_method_is_covered():
    covered = {name for name, _ in epoch_based_cases()}
    assert covered == {name for name, cls in METHODS.items() if not cls.one_shot}
    assert {mode for name, mode in epoch_based_cases() if name == "NGPlus"} == set(MASK_MODES) - {"none"} | {None}


# ---------------------------------------------------------------------------------------------------------------------
# On a GPU (perf/run_gpu_checks.sh): PyTorch's own detector of synchronising CUDA calls, which also sees what the
# patched methods cannot (blocking host-to-device copies, synchronising kernels such as nonzero).

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def cuda_synchronisations(work) -> int:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            work()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing" in str(w.message) for w in caught)


@pytest.fixture(scope="module")
def cuda_split_data(split_data):
    return dataclasses.replace(split_data, data=split_data.data.to(torch.device("cuda")))


@needs_cuda
def test_cuda_training_epoch_synchronises_once_per_epoch(cuda_split_data):
    def epoch(batch_size):
        model = tiny_model("cuda")
        optimizer = make_optimizer(model, TrainRecipe(lr=0.01, batch_size=batch_size))
        loader = cuda_split_data.train_loader("forget", make_generator(1), batch_size=batch_size)
        torch.cuda.synchronize()
        return cuda_synchronisations(lambda: train_one_epoch(model, loader, optimizer))
    small, large = (epoch(b) for b in BATCH_SIZES)
    assert small == large, (small, large)


@needs_cuda
@pytest.mark.parametrize("name,grad_mask", epoch_based_cases(), ids=lambda v: "" if v is None else str(v))
def test_cuda_unlearning_epoch_synchronises_once_per_epoch(cuda_split_data, name, grad_mask):
    def epoch(batch_size):
        method = make_method(name, cuda_split_data, batch_size, grad_mask)
        torch.cuda.synchronize()
        return cuda_synchronisations(lambda: run_unlearning(method, 1, progress=False))
    small, large = (epoch(b) for b in BATCH_SIZES)
    assert small == large, (name, grad_mask, small, large)
