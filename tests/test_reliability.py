"""Reliability of the lower layers: divergence guard over buffers, file modes under the umask, the file lock, guarded
resume from the command line, and concurrent first use of a fresh SQLite tracking database."""
import hashlib
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import dataset
from conftest import ROOT, TINY, run_main
from models import create_model
from unlearn import UnlearnContext, resolve_hyperparameters, resolve_method, run_unlearning
from unlearn.driver import copy_state, output_probe, outputs_are_finite, state_is_finite
from unlearn.registry import UnlearnMethod
from utils import (
    DivergenceError,
    UserError,
    atomic_torch_save,
    atomic_write_json,
    atomic_write_text,
    file_lock,
    make_generator,
)

# ---------------------------------------------------------------------------------------------------------------------
# Divergence guard: parameters AND buffers
# ---------------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_data():
    full = dataset.load_dataset("digits")
    subset = dataset.ImageData(full.name, full.train_images[:320], full.train_labels[:320], full.test_images[:120],
                               full.test_labels[:120], full.num_classes, full.mean, full.std, full.augment)
    return dataset.SplitData(subset, dataset.make_split(subset, -1, 30, seed=1), batch_size=32)


def _resnet(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model("resnet20s", 10, in_channels=1, width=4)


def _context(model, data, hp=None) -> UnlearnContext:
    return UnlearnContext(model=model, data=data, generator=make_generator(0), hp=dict(hp or {}), progress=False,
                          log=lambda message: None)


class _PoisonsRunningVar(UnlearnMethod):
    """Epoch 1 nudges a weight (finite); epoch 2 leaves every parameter finite but sets a BatchNorm running_var to
    inf."""

    name = "test-poison"

    def __init__(self, ctx):
        super().__init__(ctx)
        self.setup_called = False

    def setup(self):
        self.setup_called = True

    def run_epoch(self, epoch):
        with torch.no_grad():
            first_param = next(self.model.parameters())
            first_param.add_(0.5)
            if epoch == 2:
                bn = next(m for m in self.model.modules() if isinstance(m, torch.nn.BatchNorm2d))
                bn.running_var[0] = float("inf")
        return {"loss": 1.0}


def test_state_is_finite_looks_at_buffers_and_ignores_integer_ones():
    model = _resnet()
    assert state_is_finite(model)
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    bn.num_batches_tracked.fill_(2**62)  # an integer buffer can't be inf: never the reason to refuse
    assert state_is_finite(model)
    bn.running_mean[1] = float("nan")
    assert not state_is_finite(model)
    bn.running_mean[1] = 0.0
    with torch.no_grad():
        next(model.parameters())[0].fill_(float("-inf"))
    assert not state_is_finite(model)


def test_state_is_finite_on_mixed_dtypes_empty_tensors_and_huge_finite_values():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2).to(torch.bfloat16),
                                torch.nn.Linear(2, 2).to(torch.float64))
    model.register_buffer("empty", torch.empty(0))  # nothing in it can be non-finite
    assert state_is_finite(model)
    with torch.no_grad():
        model[2].weight.fill_(1e300)  # finite in float64, though beyond float32's range
        assert state_is_finite(model)
        model[1].bias[1] = float("nan")
        assert not state_is_finite(model)
        model[1].bias[1] = 0.0
        model[0].weight[0, 2] = float("inf")
        assert not state_is_finite(model)


def test_copy_state_is_a_deep_copy_that_reuses_its_tensors():
    model = _resnet()
    first = copy_state(model)
    tensors = [t.data_ptr() for t in first.values()]
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    bn.num_batches_tracked.add_(3)
    second = copy_state(model, into=first)
    assert second is first and [t.data_ptr() for t in second.values()] == tensors, "written in place"
    for key, value in model.state_dict().items():
        assert torch.equal(second[key], value) and second[key].data_ptr() != value.data_ptr(), key
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    assert not torch.equal(second[next(iter(second))], next(model.parameters())), "a copy, not a view"
    model.fc = torch.nn.Linear(model.fc.in_features, 3)  # another shape: a fresh copy
    third = copy_state(model, into=second)
    assert third is not second and third["fc.weight"].shape == (3, model.fc.in_features)


def test_the_cell_overheads_script_checks_both_ways_and_prints_their_ratios(capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("cell_overheads", ROOT / "perf" / "cell_overheads.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    threads = torch.get_num_threads()
    try:
        assert script.main(["--repeats", "2", "--rounds", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    rows = {line.split()[0] for line in capsys.readouterr().out.splitlines()[2:]}
    assert rows == {"copy", "finite", "checkpoint"}


def test_state_is_finite_syncs_with_the_host_once(monkeypatch):
    """One stacked reduction: a single Tensor.__bool__ per check, however many tensors the model has."""
    model = _resnet()
    calls = []
    original = torch.Tensor.__bool__

    def counting_bool(self):
        calls.append(1)
        return original(self)

    monkeypatch.setattr(torch.Tensor, "__bool__", counting_bool)
    monkeypatch.setattr(torch.Tensor, "item", lambda self: pytest.fail("no .item() expected"))
    assert state_is_finite(model)
    assert len(calls) == 1 and len(list(model.parameters())) > 10


def test_infinite_buffer_stops_the_run_and_keeps_the_last_finite_state(small_data):
    model = _resnet()
    method = _PoisonsRunningVar(_context(model, small_data))
    after_epoch_one = {}

    def remember(epoch, eval_model, stats, seconds):
        if epoch == 1:
            after_epoch_one.update({k: v.clone() for k, v in eval_model.state_dict().items()})

    with pytest.raises(DivergenceError) as info:
        run_unlearning(method, 3, on_epoch=remember, progress=False)
    assert info.value.epoch == 2 and "epoch 1" in str(info.value)
    assert state_is_finite(model)
    for key, value in model.state_dict().items():
        assert torch.equal(value, after_epoch_one[key]), key


def test_huge_ga_step_never_leaves_an_infinite_running_var(small_data):
    """The reported case: GA with --unlearn_lr 1e6 kept finite parameters but inf BatchNorm statistics."""
    torch.set_num_threads(1)
    model = _resnet()
    resolved = resolve_method("GA")
    hp = resolve_hyperparameters(resolved, {"unlearn_lr": 1e6, "unlearn_epochs": 5})
    method = resolved.cls(_context(model, small_data, hp))
    with pytest.raises(DivergenceError):
        run_unlearning(method, 5, progress=False)
    for name, buffer in model.named_buffers():
        assert torch.isfinite(buffer.float()).all(), name
    for name, param in model.named_parameters():
        assert torch.isfinite(param).all(), name


def test_a_non_finite_input_model_is_refused_before_any_work(small_data):
    model = _resnet()
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    bn.running_var[0] = float("inf")
    method = _PoisonsRunningVar(_context(model, small_data))
    with pytest.raises(UserError) as info:
        run_unlearning(method, 2, progress=False)
    assert "non-finite" in str(info.value) and "\n" not in str(info.value)
    assert not method.setup_called


# ---------------------------------------------------------------------------------------------------------------------
# Files honour the umask
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mask,expected", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_writes_honour_the_umask(tmp_path, mask, expected):
    previous = os.umask(mask)
    try:
        files = [atomic_write_json(tmp_path / "r.json", {"a": 1}), atomic_write_text(tmp_path / "t.txt", "x"),
                 atomic_torch_save(tmp_path / "m.pth.tar", {"state_dict": {}})]
        atomic_write_json(tmp_path / "r.json", {"a": 2})  # a rewrite gets the same mode
    finally:
        os.umask(previous)
    for file in files:
        assert stat.S_IMODE(file.stat().st_mode) == expected, file.name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left behind


# ---------------------------------------------------------------------------------------------------------------------
# utils.file_lock
# ---------------------------------------------------------------------------------------------------------------------

HOLDER = """
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from utils import file_lock
target, marker = Path(sys.argv[2]), Path(sys.argv[3])
with file_lock(target):
    marker.write_text("held")
    time.sleep(1.5)
    marker.write_text(repr(time.time()))
"""


def test_file_lock_is_exclusive_across_processes(tmp_path):
    target, marker = tmp_path / "model.pth.tar", tmp_path / "marker"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(ROOT), str(target), str(marker)])
    try:
        deadline = time.time() + 60
        while not marker.exists() or marker.read_text() != "held":
            assert holder.poll() is None and time.time() < deadline, "the holder never took the lock"
            time.sleep(0.01)
        assert (tmp_path / ".model.pth.tar.lock").exists()
        with file_lock(target):
            acquired = time.time()
            released = float(marker.read_text())  # written by the holder just before it released
        assert acquired >= released
    finally:
        holder.wait(timeout=60)
    assert holder.returncode == 0
    assert not (tmp_path / ".model.pth.tar.lock").exists()


# ---------------------------------------------------------------------------------------------------------------------
# --resume from the command line refuses another run's checkpoint
# ---------------------------------------------------------------------------------------------------------------------

def _digests(folder: Path) -> dict[str, tuple[str, int]]:
    return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.iterdir()) if p.is_file()}


def test_resume_with_another_dataset_is_refused_and_touches_nothing(tiny_models):
    env = {"OMP_NUM_THREADS": "1"}
    save_dir = tiny_models(*TINY, "--seed", "1")  # a finished main_baseline.py run
    base = [*TINY, "--seed", "1", "--save_dir", str(save_dir)]
    before = _digests(save_dir)
    noisy = [*base[:base.index("--dataset")], "--dataset", "digits_noisy", *base[base.index("--dataset") + 2:]]
    proc = run_main("main_baseline.py", *noisy, "--resume", env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot resume" in lines[0], proc.stderr
    assert "dataset='digits'" in lines[0] and "dataset='digits_noisy'" in lines[0]
    assert _digests(save_dir) == before


def test_resume_with_another_width_is_a_one_line_error(tiny_models):
    env = {"OMP_NUM_THREADS": "1"}
    save_dir = tiny_models(*TINY, "--seed", "1")
    base = [*TINY, "--seed", "1", "--save_dir", str(save_dir)]
    before = _digests(save_dir)
    wider = [*base[:base.index("--width")], "--width", "8", *base[base.index("--width") + 2:]]
    proc = run_main("main_baseline.py", *wider, "--resume", env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "width=4" in lines[0] and "width=8" in lines[0], proc.stderr
    assert _digests(save_dir) == before


# ---------------------------------------------------------------------------------------------------------------------
# Tracking: a fresh SQLite database opened by two processes at once
# ---------------------------------------------------------------------------------------------------------------------

OPENER = """
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import mlflow.tracking  # imported before the start signal, so both processes reach the database together
from tracking import open_tracker
go = Path(sys.argv[3])
while not go.exists():
    time.sleep(0.005)
tracker, experiment_id = open_tracker("concurrent", sys.argv[2])
handle = tracker.start_run(experiment_id, "run-" + sys.argv[4])
handle.log_metrics({"UA": 1.0}, step=1)
handle.end()
print("tracked", handle.run_id)
"""


@pytest.mark.integration  # two interpreters open the database at once
def test_two_first_users_of_a_fresh_sqlite_database_both_succeed(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    go = tmp_path / "go"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", OPENER, str(ROOT), uri, str(go), str(i)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    time.sleep(6)  # both have imported mlflow and wait for the signal (importing takes seconds)
    go.touch()
    outputs = [proc.communicate(timeout=240) for proc in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0 and "tracked" in out, err[-3000:]

    from tracking import open_tracker  # a later user finds a working database with both runs
    tracker, experiment_id = open_tracker("concurrent", uri)
    runs = tracker.client.search_runs([experiment_id])
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    later = tracker.start_run(experiment_id, "later")
    later.end()
    assert tracker.broken is None and later.record is not None
    assert not (tmp_path / ".mlflow.db.lock").exists()


def test_end_stale_runs_marks_only_running_runs_with_the_tag(tmp_path):
    from tracking import open_tracker

    tracker, experiment_id = open_tracker("stale", f"sqlite:///{tmp_path / 'mlflow.db'}")
    stale = [tracker.start_run(experiment_id, f"parent-{i}", tags={"sweep_parent": "grid A"}) for i in range(2)]
    other_tag = tracker.start_run(experiment_id, "other", tags={"sweep_parent": "grid B"})
    untagged = tracker.start_run(experiment_id, "child")
    finished = tracker.start_run(experiment_id, "done", tags={"sweep_parent": "grid A"})
    finished.end("FINISHED")

    assert tracker.end_stale_runs(experiment_id, "sweep_parent", "grid A") == 2
    status = {r.info.run_id: r.info.status for r in tracker.client.search_runs([experiment_id])}
    assert [status[h.run_id] for h in stale] == ["KILLED", "KILLED"]
    assert status[other_tag.run_id] == "RUNNING" and status[untagged.run_id] == "RUNNING"
    assert status[finished.run_id] == "FINISHED"
    assert tracker.end_stale_runs(experiment_id, "sweep_parent", "grid A") == 0
    assert tracker.end_stale_runs(experiment_id, "sweep_parent", "grid B", status="FAILED") == 1
    assert tracker.client.get_run(other_tag.run_id).info.status == "FAILED"


class _RunsAway(UnlearnMethod):
    """Epoch 1 nudges a weight; epoch 2 scales every convolution by 1e15: each weight stays finite (the guard over the
    state passes), but the logits overflow to inf/NaN, as in a GA run whose weights reached 4.8e20."""

    name = "test-runs-away"

    def run_epoch(self, epoch):
        with torch.no_grad():
            next(self.model.parameters()).add_(0.5)
            if epoch == 2:
                for module in self.model.modules():
                    if isinstance(module, torch.nn.Conv2d):
                        module.weight.mul_(1e15)
        return {"loss": 1.0}


def test_finite_weights_with_non_finite_outputs_count_as_divergence(small_data):
    model = _resnet()
    method = _RunsAway(_context(model, small_data))
    probe = output_probe(small_data)
    assert probe.shape[0] == 30 + 64 and outputs_are_finite(model, probe)  # 30 forget, 64 of the retain set
    after_epoch_one, at_epoch_two = {}, {}

    def remember(epoch, eval_model, stats, seconds):
        after_epoch_one.update({k: v.clone() for k, v in eval_model.state_dict().items()})

    original_load = model.load_state_dict

    def spy_load(state, *args, **kwargs):  # the state the guard rejected, seen just before it is replaced
        at_epoch_two.update({k: v.clone() for k, v in model.state_dict().items()})
        return original_load(state, *args, **kwargs)

    model.load_state_dict = spy_load
    with pytest.raises(DivergenceError) as info:
        run_unlearning(method, 3, on_epoch=remember, progress=False)
    assert info.value.epoch == 2 and "non-finite outputs" in str(info.value) and "epoch 1" in str(info.value)
    rejected = _resnet()
    rejected.load_state_dict(at_epoch_two)
    assert state_is_finite(rejected) and not outputs_are_finite(rejected, probe)  # finite, but useless
    for key, value in model.state_dict().items():
        assert torch.equal(value, after_epoch_one[key]), key
    assert outputs_are_finite(model, probe)
