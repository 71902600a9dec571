"""`--amp bf16`: autocast around the forward passes of training, unlearning and evaluation; with `--amp off` no autocast
context is entered at all (so the numbers are those of a run without the flag, which tests/test_regression.py
checks). channels_last is for CUDA only and is checked by perf/run_gpu_checks.sh on a GPU machine."""
from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dataset  # noqa: E402
from conftest import TINY, run_main, run_script  # noqa: E402
from evaluation.metrics import evaluate_model  # noqa: E402
from models import create_model  # noqa: E402
from training import TrainRecipe, train_model  # noqa: E402
from unlearn import UnlearnContext, declared_flags, resolve_hyperparameters, resolve_method, run_unlearning  # noqa: E402
from utils import (  # noqa: E402
    UserError,
    batch_channels_last,
    forward_precision,
    make_generator,
    to_channels_last,
    uses_channels_last,
)


@pytest.fixture(autouse=True)
def _few_threads(one_thread):
    yield


@pytest.fixture(scope="module")
def split_data(digits):
    split = dataset.make_split(digits, class_to_replace=-1, num_indexes_to_replace=60, seed=1)
    return dataset.SplitData(digits, split, batch_size=64)


def tiny_model():
    torch.manual_seed(0)
    return create_model("resnet20s", 10, in_channels=1, width=4)


class ForwardDtypes:
    """Records the dtype of the first convolution's output at every forward pass of a model."""

    def __init__(self, model: torch.nn.Module):
        conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        self.dtypes: list[torch.dtype] = []
        conv.register_forward_hook(lambda module, args, out: self.dtypes.append(out.dtype))


@pytest.fixture
def autocast_entries(monkeypatch):
    """How often torch.autocast is entered (every --amp context goes through it)."""
    entries = []
    real = torch.autocast

    class Spy(real):
        def __enter__(self):
            entries.append(self.fast_dtype)
            return super().__enter__()

    monkeypatch.setattr(torch, "autocast", Spy)
    return entries


def make_method(name, data, amp, grad_mask=None):
    resolved = resolve_method(name, grad_mask)
    flag_of = {hp.name: flag for flag, hp in declared_flags().items()}
    hp = resolve_hyperparameters(resolved, {flag_of["epochs"]: 1}, recipe={"batch_size": 64, "decreasing_lr": ""})
    device = data.device if data is not None else "cpu"
    ctx = UnlearnContext(model=tiny_model().to(device), data=data, generator=make_generator(1), hp=hp, progress=False,
                         amp=amp)
    method = resolved.cls(ctx)
    method.name = resolved.name
    return method


# ---------------------------------------------------------------------------------------------------------------------
# The helpers


def test_off_is_no_autocast_and_bf16_is_bfloat16_autocast():
    model = tiny_model()
    x = torch.rand(2, 1, 8, 8)
    with forward_precision("off", "cpu"):
        assert not torch.is_autocast_enabled("cpu")
        assert model(x).dtype == torch.float32
    with forward_precision("bf16", "cpu"):
        assert torch.is_autocast_enabled("cpu")
        assert model(x).dtype == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")


def test_unknown_precision_is_a_user_error():
    with pytest.raises(UserError, match="--amp 'fp8'.*off, bf16"):
        forward_precision("fp8", "cpu")
    with pytest.raises(UserError, match="--amp"):
        run_unlearning(make_method("FT", None, "fp8"), 1, progress=False)


def test_channels_last_only_on_cuda_with_bf16():
    assert uses_channels_last("bf16", torch.device("cuda"))
    assert not uses_channels_last("off", torch.device("cuda"))
    assert not uses_channels_last("bf16", "cpu")
    model = to_channels_last(tiny_model(), "bf16")  # CPU: untouched
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous()
    x = torch.rand(4, 3, 8, 8)
    assert batch_channels_last(x, "bf16") is x


# ---------------------------------------------------------------------------------------------------------------------
# Training, unlearning, evaluation


@pytest.mark.parametrize("amp", ["off", "bf16"])
def test_training_forward_passes_follow_amp(split_data, amp, autocast_entries):
    model = tiny_model()
    seen = ForwardDtypes(model)
    result = train_model(model, split_data, TrainRecipe(epochs=1, lr=0.05, batch_size=64, milestones=()), seed=1,
                         part="retain", progress=False, amp=amp)
    expected = torch.bfloat16 if amp == "bf16" else torch.float32
    assert seen.dtypes and set(seen.dtypes) == {expected}  # training steps and the validation pass
    assert bool(autocast_entries) == (amp == "bf16")
    assert all(p.dtype == torch.float32 for p in model.parameters())  # weights stay float32
    assert all(isinstance(v, float) for v in (result.history["train_loss"][0], result.history["val_acc"][0]))


@pytest.mark.parametrize("name,grad_mask", [("NGPlus", "prob"), ("SCRUB", "saliency"), ("RL", None),
                                            ("boundary_shrink", None), ("FT_l1", None)])
def test_unlearning_forward_passes_follow_amp(split_data, name, grad_mask, autocast_entries):
    runs = {}
    for amp in ("off", "bf16"):
        method = make_method(name, split_data, amp, grad_mask)
        seen = ForwardDtypes(method.model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            outcome = run_unlearning(method, 1, progress=False)
        runs[amp] = (set(seen.dtypes), len(autocast_entries), outcome.epoch_stats[0])
        autocast_entries.clear()
        assert all(p.dtype == torch.float32 for p in method.model.parameters())
    assert runs["off"][:2] == ({torch.float32}, 0)
    assert runs["bf16"][0] == {torch.bfloat16} and runs["bf16"][1] > 0
    assert all(isinstance(v, float) for v in runs["bf16"][2].values())
    assert runs["bf16"][2]["loss"] != runs["off"][2]["loss"]  # bf16 forward passes round differently


@pytest.mark.parametrize("name", ["SSD", "wfisher", "fisher_new", "SalUn"])
def test_gradient_statistics_follow_amp(split_data, name, autocast_entries, tmp_path):
    """The one-shot methods' statistics (SSD's importances, IU's gradients and WoodFisher samples, FF's Fisher) and
    SalUn's saliency mask run their forward passes under --amp, like every training step."""
    seen_by_amp = {}
    for amp in ("off", "bf16"):
        method = make_method(name, split_data, amp)
        method.ctx.artifacts_dir = tmp_path / amp
        seen = ForwardDtypes(method.model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if name == "SalUn":
                method.build_weight_mask()
            else:
                run_unlearning(method, 1, progress=False)
        seen_by_amp[amp] = (set(seen.dtypes), len(autocast_entries))
        autocast_entries.clear()
        assert all(p.dtype == torch.float32 for p in method.model.parameters())
    assert seen_by_amp["off"] == ({torch.float32}, 0)
    assert torch.bfloat16 in seen_by_amp["bf16"][0] and seen_by_amp["bf16"][1] > 0
    # IU's WoodFisher per-sample gradients stay float32 (unlearn.one_shot.per_sample_gradients says why).
    assert seen_by_amp["bf16"][0] == ({torch.bfloat16, torch.float32} if name == "wfisher" else {torch.bfloat16})


def test_reference_models_train_in_the_run_precision(split_data, autocast_entries, tmp_path):
    """The per-example attacks' reference models (and U-LiRA's and forget quality's retrained models, which share the
    trainer) train under --amp; bf16-trained models have their own cache key, float32 ones keep theirs."""
    import numpy as np

    from evaluation.reference_models import ModelSpec, ReferenceConfig, TrainTask, train_models

    digits = split_data.data
    spec = ModelSpec(arch="resnet20s", num_classes=10, in_channels=1, width=4, mean=tuple(digits.mean),
                     std=tuple(digits.std))
    recipe = TrainRecipe(epochs=1, lr=0.05, batch_size=64, milestones=())
    off = ReferenceConfig(dataset="digits", model=spec, recipe=recipe, num_models=2)
    bf16 = ReferenceConfig(dataset="digits", model=spec, recipe=recipe, num_models=2, amp="bf16")
    assert "amp" not in off.key_fields("pool") and bf16.key_fields("pool")["amp"] == "bf16"
    members = np.asarray(split_data.split.retain[:128], np.int64)
    for config in (off, bf16):
        task = TrainTask(path=str(tmp_path / f"{config.amp}.pth.tar"), members=members, init_seed=1, shuffle_seed=2,
                         metadata={})
        train_models([task], digits, config, batch_size=64, log=lambda message: None)
        assert bool(autocast_entries) == (config.amp == "bf16")
        autocast_entries.clear()


def test_evaluation_forward_passes_follow_amp(split_data, autocast_entries):
    model = tiny_model()
    seen = ForwardDtypes(model)
    plain = evaluate_model(model, split_data)
    assert set(seen.dtypes) == {torch.float32} and not autocast_entries
    seen.dtypes.clear()
    mixed = evaluate_model(model, split_data, amp="bf16")
    assert set(seen.dtypes) == {torch.bfloat16} and autocast_entries
    assert mixed.forget_logits.dtype == torch.float32  # metrics are computed from float32 logits
    assert set(mixed.accuracy) == set(plain.accuracy)
    assert torch.allclose(mixed.test_logits, plain.test_logits, atol=0.1, rtol=0.05)


# ---------------------------------------------------------------------------------------------------------------------
# End to end


@pytest.mark.slow
def test_amp_bf16_end_to_end_is_recorded(tmp_path):
    """mlflow_forget.py trains both references, unlearns and evaluates with --amp bf16; the result, the tracking
    params and the checkpoints record it; main_forget.py then reuses those models with the same flag."""
    save = tmp_path / "out"
    common = [*TINY, "--save_dir", str(save), "--amp", "bf16", "--class_to_replace", "-1",
              "--num_indexes_to_replace", "50"]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = run_main("mlflow_forget.py", *common, "--unlearn", "VarGrad", "--unlearn_epochs", "2",
                    env={"MLFLOW_TRACKING_URI": uri}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((save / "VarGradeval_result.json").read_text())
    assert result["args"]["amp"] == "bf16"
    assert all(v == v for v in (result["UA"], result["RA"], result["TA"]))  # numbers, not NaN

    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.data.params["train.amp"] for r in runs] == ["bf16"]

    (original_file,) = save.glob("*model_SA_best.pth.tar")
    assert torch.load(original_file, weights_only=True)["amp"] == "bf16"

    proc = run_main("main_forget.py", *common, "--unlearn", "FT", "--unlearn_epochs", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "is missing" not in proc.stdout
    assert json.loads((save / "FTeval_result.json").read_text())["args"]["amp"] == "bf16"


@pytest.mark.slow
@pytest.mark.perf
@pytest.mark.integration
def test_gpu_path_script_runs_quick_and_writes_its_numbers(tmp_path):
    """perf/gpu_path.py at --quick size on this machine: it runs both precisions and writes every ratio it prints
    (its targets are for a GPU: perf/run_gpu_checks.sh runs it at full size there)."""
    out = tmp_path / "gpu_path.json"
    proc = run_script("perf/gpu_path.py", "--quick", "--device", "cpu", "--out", str(out), timeout=600,
                      env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["quick"] is True and report["device"] == "cpu"
    assert set(report["epoch_seconds"]) == {"ours_off", "bare_off", "ours_bf16", "bare_bf16"}
    assert set(report["step_ratio_over_ngplus"]) == {f"{label}_{amp}" for label in ("VarGrad", "NGPlus+focus_opt")
                                                     for amp in ("off", "bf16")}
    assert all(v > 0 for v in (*report["epoch_seconds"].values(), *report["step_seconds"].values()))
    assert set(report["targets_met"]) == set(report["targets"])
    assert "ratio" in proc.stdout and "over NGPlus" in proc.stdout


def test_bad_amp_flag_is_refused_before_any_work(tmp_path):
    save = tmp_path / "out"
    proc = run_main("main_forget.py", *TINY, "--save_dir", str(save), "--amp", "fp16")
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "amp" in proc.stderr
    assert not save.exists()


# ---------------------------------------------------------------------------------------------------------------------
# On a GPU (perf/run_gpu_checks.sh)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def first_conv_weight(model: torch.nn.Module) -> torch.Tensor:
    return next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d)).weight


@needs_cuda
@pytest.mark.parametrize("amp", ["off", "bf16"])
def test_cuda_channels_last_with_bf16_only(split_data, amp):
    import dataclasses
    cuda_data = dataclasses.replace(split_data, data=split_data.data.to(torch.device("cuda")))
    model = tiny_model().cuda()
    seen = ForwardDtypes(model)
    train_model(model, cuda_data, TrainRecipe(epochs=1, lr=0.05, batch_size=64, milestones=()), seed=1,
                part="retain", progress=False, amp=amp)
    assert first_conv_weight(model).is_contiguous(memory_format=torch.channels_last) == (amp == "bf16")
    assert set(seen.dtypes) == {torch.bfloat16 if amp == "bf16" else torch.float32}
    method = make_method("NGPlus", cuda_data, amp, "prob")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outcome = run_unlearning(method, 1, progress=False)
    assert first_conv_weight(method.model).is_contiguous(memory_format=torch.channels_last) == (amp == "bf16")
    assert all(isinstance(v, float) for v in outcome.epoch_stats[0].values())
    evaluation = evaluate_model(method.model, cuda_data, amp=amp)
    assert 0.0 <= evaluation.accuracy["test"] <= 100.0
