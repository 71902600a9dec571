"""Tests of the hyper-parameter declarations (`unlearn/hparams.py`) and their resolution (`unlearn/registry.py`):
precedence, validation, consistency across methods, and SalUn's `--mask_path` (computed when absent, then reused)."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dataset
from unlearn import (
    ALIASES,
    METHODS,
    UNSET,
    HParam,
    UnlearnContext,
    UnlearnMethod,
    declared_flags,
    method_hparams,
    register_alias,
    register_method,
    resolve_hyperparameters,
    resolve_method,
    run_unlearning,
)
from unlearn.common import save_mask
from unlearn.masks import MASK_MODES
from utils import UserError, make_generator


@pytest.fixture
def registry():
    """Methods and aliases registered inside a test are removed afterwards."""
    methods, aliases = dict(METHODS), dict(ALIASES)
    yield
    METHODS.clear()
    METHODS.update(methods)
    ALIASES.clear()
    ALIASES.update(aliases)


STRENGTH = HParam("toy_strength", float, 1.0, "toy: strength", low=0.0, high=10.0, low_open=True,
                  dataset_defaults={"digits": 2.0}, paper_era=4.0)


def register_toy(name="Toy", hparams=(STRENGTH,)):
    return register_method(type(name, (UnlearnMethod,), {"name": name, "summary": "toy", "hparams": tuple(hparams),
                                                          "run_epoch": lambda self, epoch: {}}))


# ---------------------------------------------------------------------------------------------------------------------
# Precedence
# ---------------------------------------------------------------------------------------------------------------------

def test_each_level_beats_the_previous_one(registry):
    register_toy()
    register_alias("ToyAlias", "Toy", toy_strength=3.0)
    plain, alias = resolve_method("Toy"), resolve_method("ToyAlias")
    assert resolve_hyperparameters(plain, {}) == {"toy_strength": 1.0}                        # method default
    assert resolve_hyperparameters(plain, {}, dataset="cifar10")["toy_strength"] == 1.0       # no dataset value there
    assert resolve_hyperparameters(plain, {}, dataset="digits")["toy_strength"] == 2.0        # dataset default
    assert resolve_hyperparameters(alias, {}, dataset="digits")["toy_strength"] == 3.0        # alias override
    assert resolve_hyperparameters(alias, {}, dataset="digits", paper_era=True)["toy_strength"] == 4.0  # paper era
    explicit = {"toy_strength": 5.0}
    assert resolve_hyperparameters(alias, explicit, dataset="digits", paper_era=True)["toy_strength"] == 5.0
    assert resolve_hyperparameters(alias, {"toy_strength": None}, dataset="digits")["toy_strength"] == 3.0  # not given


def test_paper_era_does_not_override_an_explicit_value():
    rl = resolve_method("RL")
    assert resolve_hyperparameters(rl, {}, paper_era=True)["rl_labels"] == "uniform"
    assert resolve_hyperparameters(rl, {"rl_labels": "wrong"}, paper_era=True)["rl_labels"] == "wrong"
    paper = resolve_hyperparameters(resolve_method("SalUn"), {}, paper_era=True)
    assert (paper["mask_semantics"], paper["augment"], paper["rl_labels"]) == ("grad_only", "first_epoch", "uniform")
    explicit = resolve_hyperparameters(resolve_method("SalUn"), {"mask_semantics": "freeze", "augment": "always"},
                                       paper_era=True)
    assert (explicit["mask_semantics"], explicit["augment"]) == ("freeze", "always")
    assert resolve_hyperparameters(resolve_method("NGPlus"), {}, paper_era=True)["augment"] == "first_epoch"
    assert resolve_hyperparameters(resolve_method("NGPlus"), {})["augment"] == "always"


def test_recipe_values_stand_in_for_the_defaults_and_explicit_values_beat_them():
    ft = resolve_method("FT")
    recipe = {"batch_size": 48, "momentum": 0.5, "weight_decay": 0.0, "decreasing_lr": "3"}
    hp = resolve_hyperparameters(ft, {}, dataset="digits", recipe=recipe)
    assert {k: hp[k] for k in recipe} == recipe  # the recipe also beats the dataset's default (batch 64 on digits)
    without_recipe = resolve_hyperparameters(ft, {}, dataset="digits")
    assert (without_recipe["batch_size"], without_recipe["decreasing_lr"]) == (64, "20,25")  # the digits recipe
    assert resolve_hyperparameters(ft, {})["batch_size"] == 256
    assert resolve_hyperparameters(ft, {"batch_size": 8}, recipe=recipe)["batch_size"] == 8
    assert resolve_hyperparameters(resolve_method("NGPlus"), {}, recipe=recipe)["batch_size"] == 48


# ---------------------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method, explicit, message", [
    ("SalUn", {"salun_ratio": 0.0}, "--salun_ratio 0.0: must be a number in (0, 1] for SalUn"),
    ("SalUn_soft", {"mask_ratio": 1.5}, "--mask_ratio 1.5: must be a number in (0, 1]"),
    ("GA", {"unlearn_lr": -1.0}, "--unlearn_lr -1.0: must be a number > 0"),
    ("GA", {"unlearn_lr": float("inf")}, "--unlearn_lr inf: must be a number > 0"),
    ("FT", {"unlearn_epochs": 0}, "--unlearn_epochs 0: must be an integer >= 1"),
    ("FT", {"unlearn_epochs": 2.5}, "--unlearn_epochs 2.5: must be an integer >= 1"),
    ("FT", {"momentum": 1.0}, "--momentum 1.0: must be a number in [0, 1)"),
    ("FT", {"weight_decay": -1e-4}, "--weight_decay -0.0001: must be a number >= 0"),
    ("FT", {"batch_size": 0}, "--batch_size 0: must be an integer >= 1"),
    ("FT", {"decreasing_lr": "3,x"}, "--decreasing_lr '3,x' is not a comma-separated list"),
    ("FT", {"augment": "sometimes"}, "--augment sometimes: must be one of: always, first_epoch, never"),
    ("FT_l1", {"no_l1_epochs": -1}, "--no-l1-epochs -1: must be an integer >= 0"),
    ("FT_l1", {"no_l1_epochs": 3, "unlearn_epochs": 3}, "--no-l1-epochs 3: must be in [0, 2]"),
    ("FT_l1", {"alpha": -1.0}, "--alpha -1.0: must be a number >= 0 for FT_l1"),
    ("IU", {"alpha": 0.0}, "--alpha 0.0: must be a number > 0 for wfisher"),
    ("SSD", {"ssd_lambda": 0.0}, "--ssd_lambda 0.0: must be a number > 0"),
    ("SSD", {"ssd_reference": "test"}, "--ssd_reference test: must be one of: train, retain"),
    ("VarGrad", {"quantile": 1.0}, "--quantile 1.0: must be a number in (0, 1) for NGPlus+prob"),
    ("NGradFocus", {"rho": 0.0}, "--rho 0.0: must be a number in (0, 1)"),
    ("NGPlus", {"beta": 1.5}, "--beta 1.5: must be a number in [0, 1]"),
    ("NGPlus_OPT", {"beta": 1.0}, "--beta 1.0: must be strictly between 0 and 1 for --grad_mask opt"),
    ("SCRUB", {"scrub_kl": "kld"}, "--scrub_kl kld: must be one of: kl, code"),
    ("BE", {"mask_path": "m.pt"}, "--mask_path cannot be used with boundary_expanding"),
    ("FF", {"mask_path": "m.pt"}, "--mask_path cannot be used with fisher_new"),
])
def test_bad_values_are_one_line_errors_naming_the_flag(method, explicit, message):
    with pytest.raises(UserError) as info:
        resolve_hyperparameters(resolve_method(method), explicit)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_flags_of_other_methods_are_ignored_and_undeclared_flags_are_a_bug():
    hp = resolve_hyperparameters(resolve_method("FT"), {"quantile": 0.3, "ssd_lambda": 2.0, "scrub_kl": "code"})
    assert not {"quantile", "ssd_lambda", "scrub_kl"} & set(hp)
    with pytest.raises(ValueError, match="undeclared hyper-parameter flags lr"):
        resolve_hyperparameters(resolve_method("FT"), {"lr": 0.1})  # the flag is unlearn_lr


def test_validate_coerces_config_file_values_and_describes_what_is_allowed():
    lr = next(hp for hp in METHODS["FT"].hparams if hp.name == "lr")
    assert lr.validate("0.5") == 0.5 and lr.validate(1) == 1.0 and isinstance(lr.validate(1), float)
    epochs = next(hp for hp in METHODS["FT"].hparams if hp.name == "epochs")
    assert epochs.validate(3.0) == 3 and epochs.validate("4") == 4
    for bad in (True, "many", [3]):
        with pytest.raises(UserError, match="--unlearn_epochs"):
            epochs.validate(bad)
    assert lr.allowed() == "a number > 0" and epochs.allowed() == "an integer >= 1"
    assert STRENGTH.allowed() == "a number in (0, 10]"
    mask_path = next(hp for hp in METHODS["FT"].hparams if hp.name == "mask_path")
    assert mask_path.validate(None) is None and mask_path.allowed().endswith("or nothing")
    with pytest.raises(UserError, match="--toy_strength"):
        STRENGTH.validate(None)  # not nullable


def test_hparam_fields_derive_and_replace():
    assert (STRENGTH.flag, STRENGTH.options, STRENGTH.paper_era) == ("toy_strength", ("--toy_strength",), 4.0)
    assert HParam("x", int, 0, "x").paper_era is UNSET
    renamed = STRENGTH.replace(flag="toy_power")
    assert renamed.options == ("--toy_power",) and STRENGTH.options == ("--toy_strength",)
    assert STRENGTH.replace(default=9.0).default == 9.0 and STRENGTH.default == 1.0
    with pytest.raises(ValueError, match="invalid declaration"):
        STRENGTH.replace(default=0.0)  # outside its own range
    with pytest.raises(ValueError, match="kind"):
        HParam("x", list, [], "x")


# ---------------------------------------------------------------------------------------------------------------------
# Declarations of every registered method
# ---------------------------------------------------------------------------------------------------------------------

def _configurations():
    for name, cls in METHODS.items():
        modes = MASK_MODES if cls.supports_grad_mask else (None,)
        for mode in modes:
            yield name, mode


@pytest.mark.parametrize("name, mode", list(_configurations()))
def test_every_method_resolves_exactly_its_declared_names(name, mode):
    resolved = resolve_method(name, mode)
    declared = method_hparams(resolved)
    flags = declared_flags()
    for hp in declared:
        assert flags[hp.flag].name == hp.name and flags[hp.flag].kind is hp.kind
        assert hp.validate(hp.default) == hp.default
        for value in hp.dataset_defaults.values():
            hp.validate(value)
    for dataset_name in (None, "digits", "digits_noisy", "cifar10"):
        for paper_era in (False, True):
            hp = resolve_hyperparameters(resolved, {}, dataset=dataset_name, paper_era=paper_era)
            extra = {"grad_mask"} if resolved.cls.supports_grad_mask else set()
            assert set(hp) == {h.name for h in declared} | extra


def test_every_current_flag_keeps_its_spelling():
    flags = declared_flags()
    for flag in ("unlearn_lr", "unlearn_epochs", "alpha", "beta", "quantile", "rho", "ema", "scrub_kl", "augment",
                 "mask_path", "salun_ratio", "mask_ratio", "mask_semantics", "rl_schedule", "rl_labels", "no_l1_epochs",
                 "ssd_lambda", "ssd_reference", "batch_size", "momentum", "weight_decay", "decreasing_lr"):
        assert flag in flags, flag
    assert flags["no_l1_epochs"].options == ("--no-l1-epochs",)
    assert flags["unlearn_lr"].name == "lr" and flags["unlearn_epochs"].name == "epochs"
    assert {flags[f].recipe for f in ("batch_size", "momentum", "weight_decay", "decreasing_lr")} == \
        {"batch_size", "momentum", "weight_decay", "decreasing_lr"}
    assert "wfisher" in flags["alpha"].help or "IU" in flags["alpha"].help  # helps of all declarations joined
    assert "FT_l1" in flags["alpha"].help


def test_a_new_method_with_a_new_hyperparameter_is_declared_and_resolved(registry):
    assert "toy_strength" not in declared_flags()
    register_toy()
    assert declared_flags()["toy_strength"].name == "toy_strength"
    assert resolve_hyperparameters(resolve_method("Toy"), {"toy_strength": 7.0}) == {"toy_strength": 7.0}
    # Other methods ignore it.
    assert "toy_strength" not in resolve_hyperparameters(resolve_method("FT"), {"toy_strength": 7.0})


def test_conflicting_declarations_of_one_flag_are_refused_at_registration(registry):
    before = dict(METHODS)
    with pytest.raises(ValueError, match="one flag has one meaning"):
        register_toy("ToyInt", (HParam("lr", int, 1, "conflicting kind", flag="unlearn_lr"),))
    with pytest.raises(ValueError, match="one flag has one meaning"):
        register_toy("ToyChoices", (HParam("augment", str, "always", "other choices", choices=("always",)),))
    with pytest.raises(ValueError, match="already belongs to"):
        register_toy("ToyOption", (HParam("toy_x", float, 1.0, "steals an option", options=("--beta",)),))
    with pytest.raises(ValueError, match="twice"):
        register_toy("ToyTwice", (STRENGTH, STRENGTH.replace(help="again")))
    assert METHODS == before
    # Defaults and ranges may differ per method.
    register_toy("ToyOwnDefault", (HParam("lr", float, 0.5, "own default", flag="unlearn_lr", low=0.0, high=1.0),))
    assert resolve_hyperparameters(resolve_method("ToyOwnDefault"), {}) == {"lr": 0.5}


# ---------------------------------------------------------------------------------------------------------------------
# --mask_path: SalUn computes the mask when the file is absent, then reuses it
# ---------------------------------------------------------------------------------------------------------------------

class TinyNet(nn.Module):
    def __init__(self, hidden: int = 12):
        super().__init__()
        self.hidden = nn.Linear(64, hidden)
        self.fc = nn.Linear(hidden, 10)

    def forward(self, x):
        return self.fc(F.relu(self.hidden(x.flatten(1))))


@pytest.fixture(scope="module")
def split_data(digits):
    return dataset.SplitData(digits, dataset.make_split(digits, -1, 30, seed=1), batch_size=32)


def _salun(model, data, explicit, artifacts):
    resolved = resolve_method("SalUn")
    hp = resolve_hyperparameters(resolved, {"unlearn_epochs": 1, **explicit}, recipe={"batch_size": 32})
    ctx = UnlearnContext(model=model, data=data, generator=make_generator(0), hp=hp, artifacts_dir=artifacts,
                         progress=False, log=lambda message: None)
    return resolved.cls(ctx)


def test_salun_computes_the_mask_at_an_absent_mask_path_then_reuses_it(split_data, tmp_path, one_thread):
    torch.manual_seed(0)
    model = TinyNet()
    target = tmp_path / "masks" / "mine.pt"
    first = _salun(copy.deepcopy(model), split_data, {"mask_path": str(target), "salun_ratio": 0.3}, tmp_path / "a")
    run_unlearning(first, 1, progress=False)
    assert target.is_file() and not (tmp_path / "a").exists()  # saved where asked, nowhere else
    saved = torch.load(target, weights_only=True)
    total = sum(p.numel() for p in model.parameters())
    assert sum(int(m.sum()) for m in saved.values()) == int(0.3 * total)
    written = target.stat().st_mtime_ns
    # Reused: the file is not rewritten, and a different ratio does not recompute it (the file holds its own ratio).
    second = _salun(copy.deepcopy(model), split_data, {"mask_path": str(target), "salun_ratio": 0.9}, tmp_path / "b")
    run_unlearning(second, 1, progress=False)
    assert target.stat().st_mtime_ns == written and not (tmp_path / "b").exists()
    for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values()):
        assert torch.equal(a, b)


def test_a_mask_file_for_another_model_shape_is_refused(split_data, tmp_path):
    path = save_mask(tmp_path / "small.pt", {n: torch.ones(p.shape, dtype=torch.bool)
                                             for n, p in TinyNet(hidden=5).named_parameters()})
    method = _salun(TinyNet(), split_data, {"mask_path": str(path)}, tmp_path)
    with pytest.raises(UserError) as info:
        run_unlearning(method, 1, progress=False)
    assert "\n" not in str(info.value) and "has shape" in str(info.value) and "--mask_path" in str(info.value)


def test_methods_that_only_read_masks_refuse_an_absent_file_before_any_work(tmp_path):
    for name in ("FT", "GA", "RL", "BS", "IU"):
        with pytest.raises(UserError) as info:
            resolve_hyperparameters(resolve_method(name), {"mask_path": str(tmp_path / "absent.pt")})
        assert "does not exist" in str(info.value) and "--unlearn SalUn" in str(info.value)
    with pytest.raises(UserError, match="is not a file"):
        resolve_hyperparameters(resolve_method("SalUn"), {"mask_path": str(tmp_path)})
    assert resolve_hyperparameters(resolve_method("SalUn"), {"mask_path": str(tmp_path / "new.pt")})["mask_path"]


def test_ssd_reference_is_settable_and_changes_the_importances(split_data, one_thread):
    torch.manual_seed(0)
    model = TinyNet()
    weights = []
    for reference in ("train", "retain"):
        resolved = resolve_method("SSD")
        hp = resolve_hyperparameters(resolved, {"ssd_reference": reference, "alpha": 1.0}, recipe={"batch_size": 32})
        assert hp["ssd_reference"] == reference
        ctx = UnlearnContext(model=copy.deepcopy(model), data=split_data, generator=make_generator(0), hp=hp,
                             progress=False)
        run_unlearning(resolved.cls(ctx), 1, progress=False)
        weights.append(torch.cat([p.detach().reshape(-1) for p in ctx.model.parameters()]))
    assert not torch.equal(weights[0], weights[1])
