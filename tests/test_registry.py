"""Every registered method (aliases included) runs for real on tiny digits settings and writes a valid result
(timm style: the test enumerates the registry, so a new method is tested the moment it is registered)."""
import json
import math

import pytest

from arg_parser import parse_config
from pipeline import paths
from pipeline.runs import forget
from pipeline.stages import prepare, train_reference
from unlearn import ALIASES, list_methods, resolve_method
from utils import UserError

ARGS = ["--dataset", "digits", "--epochs", "2", "--width", "4", "--batch_size", "64", "--no-progress", "--seed", "1",
        "--class_to_replace", "-1", "--num_indexes_to_replace", "40", "--unlearn_epochs", "1"]


@pytest.fixture(scope="module")
def save_dir(tmp_path_factory):
    save = tmp_path_factory.mktemp("registry")
    for retrain in (False, True):
        config = parse_config([*ARGS, "--save_dir", str(save)] + (["--retrain"] if retrain else []), "main_baseline.py")
        train_reference(prepare(config, need_forget=retrain), retrain=retrain)
    return save


def configurations() -> dict[str, list[str]]:
    """Registered names grouped by what they run (class, gradient mask, hyper-parameters), keyed by the first name:
    an alias that runs exactly what another name runs (FF = fisher_new, VarGrad = NGradMask, ...) is one
    configuration, as the benchmark runs it once."""
    groups: dict[str, list[str]] = {}
    for name in list_methods():
        method = resolve_method(name)
        hp = parse_config([*ARGS, "--save_dir", "unused", "--unlearn", name]).method.hp
        groups.setdefault(json.dumps([method.cls.name, method.grad_mask, dict(hp)], sort_keys=True, default=str),
                          []).append(name)
    return {names[0]: names for names in groups.values()}


CONFIGURATIONS = configurations()


def test_aliases_that_run_the_same_configuration_are_grouped():
    grouped = {tuple(sorted(names)) for names in CONFIGURATIONS.values() if len(names) > 1}
    assert {("FF", "fisher_new"), ("NGradMask", "VarGrad"), ("IU", "wfisher")} <= grouped
    assert sorted(n for names in CONFIGURATIONS.values() for n in names) == sorted(list_methods())
    assert ("NGPlus", "NGradMask") not in grouped and ("RL", "SalUn") not in grouped  # a mask or an hp differs


@pytest.mark.parametrize("name", CONFIGURATIONS)
def test_every_registered_method_runs_and_writes_a_valid_result(name, save_dir):
    """Every registered configuration, run under its first name (the other names of its group run the same code)."""
    config = parse_config([*ARGS, "--save_dir", str(save_dir), "--unlearn", name])
    forget(config)
    written = json.loads(paths.forget_result(config).read_text())
    assert written["args"]["unlearn"] == name
    for key in ("UA", "RA", "TA", "MIA_efficacy", "RTE_seconds", "rUA", "agreement", "avg_gap"):
        assert isinstance(written[key], float) and math.isfinite(written[key]), key
    assert set(written["accuracy"]) == {"retain", "forget", "val", "test"}
    assert 0.0 <= written["UA"] <= 100.0 and written["RTE_seconds"] >= 0.0
    assert paths.forget_checkpoint(config).is_file()


def test_registry_names_and_errors():
    names = list_methods()
    for required in ("raw", "retrain", "FT", "GA", "RL", "FT_l1", "FT_prune", "wfisher", "fisher_new",
                     "boundary_expanding", "boundary_shrink", "SalUn", "SalUn_soft", "NGPlus", "SRL", "SCRUB", "SSD",
                     "VarGrad", "NGradMask", "NGradFocus", "NGPlus_OPT", "NGradFocusOPT", "NGSalUn", "SRGradMask",
                     "SRGradFocus", "SRL_OPT", "SRGradFocusOPT", "SCRUBGradMask", "SCRUBFocus", "SCRUBSalUn"):
        assert required in names, required
    assert (ALIASES["VarGrad"].base, ALIASES["VarGrad"].grad_mask) == ("NGPlus", "prob")
    with pytest.raises(UserError, match="registered: .*VarGrad"):
        resolve_method("NoSuchMethod")
    for base in ("FT", "GA"):
        with pytest.raises(UserError, match=f"cannot be applied to {base}"):
            resolve_method(base, "prob")
    assert resolve_method("SRL", "focus").label == "SRL+focus"


def test_classwise_retrain_forgets_the_class(tmp_path):
    """Exact unlearning of a whole class: the retrained model never saw it, so forget accuracy is about 0."""
    base = [a for a in ARGS if a not in ("-1", "40", "--num_indexes_to_replace")]
    base[base.index("--class_to_replace") + 1:base.index("--class_to_replace") + 1] = ["3"]
    argv = [*base, "--save_dir", str(tmp_path), "--epochs", "5", "--width", "8"]
    train_reference(prepare(parse_config(argv, "main_baseline.py"), need_forget=False), retrain=False)
    result = forget(parse_config([*argv, "--unlearn", "retrain"]))
    assert result["scenario"] == "classwise"
    assert result["accuracy"]["forget"] < 5.0 and result["accuracy"]["retain"] > 50.0


def test_diverging_method_stops_keeps_finite_weights_and_exits_non_zero(save_dir):
    import torch

    from conftest import run_main
    args = [*ARGS, "--save_dir", str(save_dir), "--unlearn", "GA", "--unlearn_lr", "1e30", "--unlearn_epochs", "3"]
    proc = run_main("main_forget.py", *args)
    assert proc.returncode == 3
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "diverged at epoch" in lines[0] and "last finite weights saved" in lines[0]
    payload = torch.load(save_dir / "GAcheckpoint.pth.tar", weights_only=True)
    assert payload["diverged_at_epoch"] >= 1
    assert all(torch.isfinite(v).all() for v in payload["state_dict"].values() if v.is_floating_point())
