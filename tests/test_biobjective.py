"""Tests of unlearn/biobjective.py: the bi-objective bases (NGPlus, SRL, SCRUB), their shared loop and its composition
with every mask add-on; the bases' losses and the cloning of g_U inside the real step."""
import copy
import math
import os
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dataset  # noqa: E402
from models import create_model  # noqa: E402
from unlearn import (  # noqa: E402
    ALIASES,
    METHODS,
    UnlearnContext,
    declared_flags,
    resolve_hyperparameters,
    resolve_method,
    run_unlearning,
)
from unlearn.biobjective import DIGITS_DEFAULTS, BiObjectiveMethod, kl_authors_code, kl_teacher_student, wrong_labels  # noqa: E402
from unlearn.masks import MASK_MODES, QUANTILE_MODES  # noqa: E402
from utils import UserError, make_generator  # noqa: E402

BASES = ("NGPlus", "SRL", "SCRUB")
EXPECTED_ALIASES = {
    "VarGrad": ("NGPlus", "prob"), "NGradMask": ("NGPlus", "prob"), "NGradFocus": ("NGPlus", "focus"),
    "NGPlus_OPT": ("NGPlus", "opt"), "NGradFocusOPT": ("NGPlus", "focus_opt"), "NGSalUn": ("NGPlus", "saliency"),
    "SRGradMask": ("SRL", "prob"), "SRGradFocus": ("SRL", "focus"), "SRL_OPT": ("SRL", "opt"),
    "SRGradFocusOPT": ("SRL", "focus_opt"), "SRLSalUn": ("SRL", "saliency"),
    "SCRUBGradMask": ("SCRUB", "prob"), "SCRUBFocus": ("SCRUB", "focus"), "SCRUBSalUn": ("SCRUB", "saliency"),
}


@pytest.fixture(autouse=True)
def _few_threads(one_thread):
    # Tiny models: threading only adds overhead (and noise on a shared machine).
    yield


@pytest.fixture(scope="module")
def split_data(digits):
    split = dataset.make_split(digits, class_to_replace=-1, num_indexes_to_replace=40, seed=1)
    return dataset.SplitData(digits, split, batch_size=32)  # 2 steps per epoch


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return create_model("resnet20s", 10, in_channels=1, width=4)


def as_flags(values):
    """{hp name: value} -> {flag: value} (one flag per name across the registry)."""
    flag_of = {hp.name: flag for flag, hp in declared_flags().items()}
    return {flag_of[name]: value for name, value in values.items()}


def make_method(name, data, grad_mask=None, seed=0, model=None, **hp):
    resolved = resolve_method(name, grad_mask)
    hp = resolve_hyperparameters(resolved, as_flags(hp), recipe={"batch_size": data.batch_size})
    ctx = UnlearnContext(model=model if model is not None else tiny_model(), data=data,
                         generator=make_generator(seed), hp=hp, progress=False)
    method = resolved.cls(ctx)
    method.name = resolved.name
    return method


def quiet_setup(method):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        method.setup()


def fixed_batches(data, n_forget=16, n_retain=16):
    xf, yf = data.tensors("forget")
    xr, yr = data.tensors("retain")
    return xf[:n_forget].float(), yf[:n_forget], xr[:n_retain].float(), yr[:n_retain]


def reference_grads(model, loss_fn):
    """Gradients of loss_fn(copy of model) computed independently (autograd.grad, nothing shared with .grad)."""
    clone = copy.deepcopy(model)
    params = list(clone.parameters())
    grads = torch.autograd.grad(loss_fn(clone), params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


class Recorder:
    """Wraps mask.direction and optimizer.step of a method to record what the real step hands them."""

    def __init__(self, method):
        self.calls = []
        self.grads_at_step = []
        direction = method.mask.direction
        step = method.optimizer.step

        def recording_direction(forget, retain, saliency=None):
            out = direction(forget, retain, saliency)
            self.calls.append({"forget": [g.clone() for g in forget], "retain": [g.clone() for g in retain],
                               "saliency": None if saliency is None else [g.clone() for g in saliency],
                               "direction": [d.clone() for d in out]})
            return out

        def recording_step(*args, **kwargs):
            self.grads_at_step.append([p.grad.clone() for p in method.params])
            return step(*args, **kwargs)

        method.mask.direction = recording_direction
        method.optimizer.step = recording_step


def assert_lists_equal(first, second, exact=True, rtol=1e-6, atol=1e-7):
    assert len(first) == len(second)
    for a, b in zip(first, second):
        if exact:
            assert torch.equal(a, b)
        else:
            assert torch.allclose(a, b, rtol=rtol, atol=atol), float((a - b).abs().max())


# ---------------------------------------------------------------------------------------------------------------------
# The bases' losses


@pytest.mark.parametrize("num_classes", [10, 100])
def test_srl_labels_are_never_the_true_label(num_classes):
    generator = make_generator(3)
    labels = torch.arange(num_classes).repeat(200)
    seen_shifts = set()
    for _ in range(5):
        wrong = wrong_labels(labels, num_classes, generator)
        assert wrong.dtype == labels.dtype and wrong.shape == labels.shape
        assert bool((wrong != labels).all())
        assert int(wrong.min()) >= 0 and int(wrong.max()) < num_classes
        seen_shifts |= set(((wrong - labels) % num_classes).tolist())
    assert seen_shifts == set(range(1, num_classes))  # every wrong class is reachable, not just a few


def test_srl_labels_depend_only_on_the_generator():
    labels = torch.randint(0, 10, (64,))
    assert torch.equal(wrong_labels(labels, 10, make_generator(5)), wrong_labels(labels, 10, make_generator(5)))
    assert not torch.equal(wrong_labels(labels, 10, make_generator(5)), wrong_labels(labels, 10, make_generator(6)))


def test_srl_forget_loss_uses_wrong_labels(digits, monkeypatch):
    split = dataset.make_split(digits, class_to_replace=-1, num_indexes_to_replace=40, seed=1)
    data = dataset.SplitData(digits, split, batch_size=32)
    method = make_method("SRL", data)
    assert method.ctx.num_classes == 10
    captured = {}
    original = F.cross_entropy

    def spy(logits, target, *args, **kwargs):
        captured["target"] = target
        return original(logits, target, *args, **kwargs)

    xf, yf, _, _ = fixed_batches(data)
    monkeypatch.setattr(F, "cross_entropy", spy)
    method.forget_loss(method.model, xf, yf)
    assert bool((captured["target"] != yf).all())


def test_scrub_kl_is_a_divergence():
    generator = torch.Generator().manual_seed(0)
    for _ in range(10):
        student = torch.randn(7, 10, generator=generator) * 3
        teacher = torch.randn(7, 10, generator=generator) * 3
        assert float(kl_teacher_student(student, teacher)) >= 0.0
        assert float(kl_teacher_student(teacher, teacher)) == pytest.approx(0.0, abs=1e-6)
    # Against the definition (1/B) sum_b sum_k p_t (log p_t - log p_s).
    p_t, p_s = torch.softmax(teacher, 1), torch.softmax(student, 1)
    expected = float((p_t * (p_t.log() - p_s.log())).sum() / 7)
    assert float(kl_teacher_student(student, teacher)) == pytest.approx(expected, rel=1e-5)


def test_scrub_code_reproduces_the_authors_kappa_by_hand():
    # One sample: student p_s = (1/3, 2/3), teacher p_t = (3/4, 1/4).
    student = torch.tensor([[0.0, math.log(2.0)]])
    teacher = torch.tensor([[math.log(3.0), 0.0]])
    by_hand = (1 / 3) * (math.log(1 / 3) - 3 / 4) + (2 / 3) * (math.log(2 / 3) - 1 / 4)
    assert by_hand == pytest.approx(-1.0532, abs=1e-4)
    assert float(kl_authors_code(student, teacher)) == pytest.approx(by_hand, abs=1e-6)
    # The authors' literal call: KLDivLoss(batchmean)(teacher probabilities, student probabilities).
    authors = torch.nn.KLDivLoss(reduction="batchmean")(torch.softmax(teacher, 1), torch.softmax(student, 1))
    assert float(kl_authors_code(student, teacher)) == pytest.approx(float(authors), abs=1e-6)
    # Not a divergence: negative, and not zero for student = teacher (-H(p) - <p, p>).
    same = float(kl_authors_code(student, student))
    expected_same = -(-(1 / 3) * math.log(1 / 3) - (2 / 3) * math.log(2 / 3)) - (1 / 9 + 4 / 9)
    assert same == pytest.approx(expected_same, abs=1e-6) and same < 0
    # Batch mean over two samples.
    batch_s, batch_t = torch.cat([student, teacher]), torch.cat([teacher, student])
    pairwise = (float(kl_authors_code(student, teacher)) + float(kl_authors_code(teacher, student))) / 2
    assert float(kl_authors_code(batch_s, batch_t)) == pytest.approx(pairwise, abs=1e-6)


@pytest.mark.parametrize("scrub_kl", ["kl", "code"])
def test_scrub_losses_and_frozen_teacher(split_data, scrub_kl):
    method = make_method("SCRUB", split_data, scrub_kl=scrub_kl)
    original = copy.deepcopy(method.model.state_dict())
    quiet_setup(method)
    teacher = method.teacher
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert teacher is not method.model
    xf, yf, xr, yr = fixed_batches(split_data)
    method.model.train()
    # At the start the student is the teacher, but train-mode BN differs from the teacher's eval-mode BN, so compare
    # against the term computed explicitly.
    divergence = kl_teacher_student if scrub_kl == "kl" else kl_authors_code
    with torch.no_grad():
        t_f, t_r = teacher(xf), teacher(xr)
        s_f, s_r = method.model(xf), method.model(xr)
        expected_forget = -divergence(s_f, t_f)
        expected_retain = F.cross_entropy(s_r, yr) + divergence(s_r, t_r)
    assert float(method.forget_loss(method.model, xf, yf).detach()) == pytest.approx(float(expected_forget), rel=1e-5)
    assert float(method.retain_loss(method.model, xr, yr).detach()) == pytest.approx(float(expected_retain), rel=1e-5)
    method.run_epoch(1)
    assert any(not torch.equal(method.model.state_dict()[k], v) for k, v in original.items())
    for key, value in teacher.state_dict().items():  # the teacher never moves (weights nor BN statistics)
        assert torch.equal(value, original[key])


def test_scrub_retain_loss_runs_one_student_forward(split_data):
    method = make_method("SCRUB", split_data)
    quiet_setup(method)
    calls = []
    handle = method.model.register_forward_hook(lambda *args: calls.append(1))
    xf, yf, xr, yr = fixed_batches(split_data)
    method.retain_loss(method.model, xr, yr)
    method.forget_loss(method.model, xf, yf)
    handle.remove()
    assert len(calls) == 2


def test_unknown_scrub_kl_is_a_user_error(split_data):
    with pytest.raises(UserError, match="--scrub_kl kld: must be one of: kl, code"):
        make_method("SCRUB", split_data, scrub_kl="kld")


# ---------------------------------------------------------------------------------------------------------------------
# g_U is cloned inside the real step (whatever zero_grad does)


@pytest.mark.parametrize("to_none", [True, False])
def test_forget_gradient_is_cloned_inside_the_step(split_data, to_none):
    method = make_method("NGPlus", split_data, beta=0.95)
    method.zero_grad_to_none = to_none
    quiet_setup(method)
    recorder = Recorder(method)
    method.model.train()
    xf, yf, xr, yr = fixed_batches(split_data)
    g_u = reference_grads(method.model, lambda m: -F.cross_entropy(m(xf), yf))
    g_c = reference_grads(method.model, lambda m: F.cross_entropy(m(xr), yr))
    method.step(xf, yf, xr, yr)
    call = recorder.calls[0]
    assert_lists_equal(call["forget"], g_u, exact=False)
    assert_lists_equal(call["retain"], g_c, exact=False)
    # g_U and g_C differ, so neither a zeroed nor an accumulated forget gradient could pass the check above.
    assert any(not torch.allclose(a, b) for a, b in zip(g_u, g_c))
    # A second step: the .grad tensors now hold the last direction; the forget gradient must still be clean.
    g_u2 = reference_grads(method.model, lambda m: -F.cross_entropy(m(xf), yf))
    method.step(xf, yf, xr, yr)
    assert_lists_equal(recorder.calls[1]["forget"], g_u2, exact=False)


@pytest.mark.parametrize("base", BASES)
def test_beta_one_without_mask_is_retain_fine_tuning(split_data, base):
    method = make_method(base, split_data, beta=1.0)
    quiet_setup(method)
    recorder = Recorder(method)
    method.model.train()
    xf, yf, xr, yr = fixed_batches(split_data)
    g_c = reference_grads(method.model, lambda m: method.retain_loss(m, xr, yr))
    method.step(xf, yf, xr, yr)
    call = recorder.calls[0]
    assert_lists_equal(call["direction"], call["retain"])       # d~ = g_C exactly
    assert_lists_equal(recorder.grads_at_step[0], call["retain"])  # and that is what Adam sees
    assert_lists_equal(call["retain"], g_c, exact=False)         # the gradient of the retain loss


@pytest.mark.parametrize("base", BASES)
def test_beta_095_without_mask_is_the_mixture_exactly(split_data, base):
    method = make_method(base, split_data, beta=0.95)
    quiet_setup(method)
    recorder = Recorder(method)
    method.model.train()
    xf, yf, xr, yr = fixed_batches(split_data)
    method.step(xf, yf, xr, yr)
    call = recorder.calls[0]
    mixture = [0.95 * c + (1 - 0.95) * u for u, c in zip(call["forget"], call["retain"])]
    assert_lists_equal(call["direction"], mixture)
    assert_lists_equal(recorder.grads_at_step[0], mixture)


def test_ngplus_direction_is_the_gradient_of_the_mixed_loss(split_data):
    """NGPlus (mask none) hands Adam the gradient of beta*CE(retain) - (1-beta)*CE(forget)."""
    method = make_method("NGPlus", split_data, beta=0.9)
    quiet_setup(method)
    recorder = Recorder(method)
    xf, yf, xr, yr = fixed_batches(split_data)
    method.model.train()
    expected = reference_grads(
        method.model, lambda m: 0.9 * F.cross_entropy(m(xr), yr) + 0.1 * -F.cross_entropy(m(xf), yf))
    method.step(xf, yf, xr, yr)
    assert_lists_equal(recorder.grads_at_step[0], expected, exact=False, rtol=1e-5, atol=1e-6)  # summation order


@pytest.mark.parametrize("base", ["SRL", "SCRUB"])
def test_saliency_pass_uses_true_labels_on_the_forget_batch(split_data, base):
    method = make_method(base, split_data, grad_mask="saliency")
    quiet_setup(method)
    recorder = Recorder(method)
    method.model.train()
    xf, yf, xr, yr = fixed_batches(split_data)
    expected = reference_grads(method.model, lambda m: -F.cross_entropy(m(xf), yf))
    method.step(xf, yf, xr, yr)
    call = recorder.calls[0]
    assert call["saliency"] is not None
    assert_lists_equal(call["saliency"], expected, exact=False)
    assert method.mask.kept_fraction == pytest.approx(0.5, abs=0.05)


def test_ngplus_saliency_reuses_the_forget_gradient(split_data):
    method = make_method("NGSalUn", split_data)
    quiet_setup(method)
    recorder = Recorder(method)
    forwards = []
    method.model.register_forward_hook(lambda *args: forwards.append(1))
    method.model.train()
    method.step(*fixed_batches(split_data))
    assert recorder.calls[0]["saliency"] is None  # the mask ranks g_U itself
    assert len(forwards) == 2                    # no extra pass


# ---------------------------------------------------------------------------------------------------------------------
# Names and composition


def test_every_alias_resolves_to_its_base_and_mode():
    for name, (base, mode) in EXPECTED_ALIASES.items():
        assert name in ALIASES, name
        resolved = resolve_method(name)
        assert resolved.cls.name == base and resolved.grad_mask == mode, name
        hp = resolve_hyperparameters(resolved, {})
        assert hp["grad_mask"] == mode and hp["lr"] == 1e-4
    assert "SalUn" not in ALIASES  # reserved for upstream SalUn


def test_bases_are_registered_with_the_family_defaults():
    for base in BASES:
        cls = METHODS[base]
        assert issubclass(cls, BiObjectiveMethod) and cls.supports_grad_mask
        declared = {hp.name: hp for hp in cls.hparams}
        assert declared["lr"].default == 1e-4 and declared["epochs"].default == 10 and declared["beta"].default == 0.9
        assert resolve_hyperparameters(resolve_method(base), {})["grad_mask"] == "none"


def test_digits_defaults_replace_the_family_lr_only_on_digits():
    for name in list(BASES) + list(EXPECTED_ALIASES):
        resolved = resolve_method(name)
        base = resolved.cls.name
        for dataset_name in ("digits", "digits_noisy"):
            hp = resolve_hyperparameters(resolved, {}, dataset=dataset_name)
            assert hp["lr"] == DIGITS_DEFAULTS[base]["lr"] and hp["epochs"] == DIGITS_DEFAULTS[base]["epochs"]
            assert hp["beta"] == 0.9 and hp.get("quantile", 0.5) == 0.5
            assert ("quantile" in hp) == (resolved.grad_mask in QUANTILE_MODES)
            assert hp["grad_mask"] == (resolved.grad_mask or "none")
            explicit = resolve_hyperparameters(resolved, {"unlearn_lr": 1e-4, "unlearn_epochs": 3},
                                              dataset=dataset_name)
            assert explicit["lr"] == 1e-4 and explicit["epochs"] == 3
        for dataset_name in ("cifar10", None):
            hp = resolve_hyperparameters(resolved, {}, dataset=dataset_name)
            assert hp["lr"] == 1e-4 and hp["epochs"] == 10  # the paper's values everywhere else


@pytest.mark.parametrize("base", BASES)
def test_every_mode_resolves_on_every_base(base):
    for mode in MASK_MODES:
        resolved = resolve_method(base, mode)
        assert resolved.cls is METHODS[base]
        assert resolve_hyperparameters(resolved, {})["grad_mask"] == mode


def test_alias_with_another_mask_is_refused():
    with pytest.raises(UserError, match="--unlearn NGPlus --grad_mask focus"):
        resolve_method("VarGrad", "focus")


def test_add_on_on_a_method_without_two_objectives_is_refused():
    plain = [name for name, cls in METHODS.items() if not cls.supports_grad_mask]
    assert plain
    for name in plain:
        with pytest.raises(UserError, match="cannot be applied"):
            resolve_method(name, "prob")


@pytest.mark.parametrize("mode", ["opt", "focus_opt"])
@pytest.mark.parametrize("beta", [0.0, 1.0])
@pytest.mark.parametrize("base", BASES)
def test_opt_modes_need_beta_strictly_inside_the_unit_interval(split_data, base, mode, beta):
    with pytest.raises(UserError) as info:
        make_method(base, split_data, grad_mask=mode, beta=beta)
    message = str(info.value)
    assert "\n" not in message and "between 0 and 1" in message and mode in message


@pytest.mark.parametrize("hp, fragment", [
    ({"grad_mask": "vargrad"}, "allowed: none, and, prob"), ({"beta": 1.5}, "--beta 1.5: must be a number in [0, 1]"),
    ({"grad_mask": "prob", "quantile": 1.0}, "--quantile 1.0: must be a number in (0, 1)"),
    ({"grad_mask": "focus", "rho": 0.0}, "--rho 0.0: must be a number in (0, 1)"),
    ({"grad_mask": "focus", "ema": "adam"}, "one of: code, standard"), ({"augment": "sometimes"}, "first_epoch"),
    ({"lr": 0.0}, "--unlearn_lr 0.0: must be a number > 0"), ({"batch_size": 0}, "--batch_size 0"),
])
def test_bad_hyperparameters_are_one_line_user_errors(split_data, hp, fragment):
    grad_mask = hp.pop("grad_mask", None)
    with pytest.raises(UserError) as info:
        make_method("NGPlus", split_data, grad_mask=grad_mask, **hp)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_unreachable_quantile_warns_once_per_run(split_data):
    method = make_method("VarGrad", split_data, quantile=0.8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_unlearning(method, 2, progress=False)
    messages = [str(w.message) for w in caught if "quantile 0.8" in str(w.message)]
    assert len(messages) == 1 and "0.7507449" in messages[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_unlearning(make_method("VarGrad", split_data, quantile=0.5), 1, progress=False)
    assert not [w for w in caught if "quantile" in str(w.message)]


@pytest.mark.parametrize("base", BASES)
def test_every_mode_runs_an_epoch_on_every_base(split_data, base):
    for mode in MASK_MODES:
        method = make_method(base, split_data, grad_mask=mode, beta=0.9)
        before = [p.detach().clone() for p in method.model.parameters()]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            outcome = run_unlearning(method, 1, progress=False)
        stats = outcome.epoch_stats[0]
        assert set(stats) == {"loss", "forget_loss", "retain_loss", "kept_fraction"}
        assert all(isinstance(v, float) and math.isfinite(v) for v in stats.values()), (base, mode, stats)
        assert 0.0 <= stats["kept_fraction"] <= 1.0
        if mode in ("none", "focus"):
            assert stats["kept_fraction"] == 1.0
        if mode == "saliency":
            assert stats["kept_fraction"] == pytest.approx(0.5, abs=0.05)
        if mode in ("and", "prob"):
            assert stats["kept_fraction"] < 1.0
        assert stats["loss"] == pytest.approx(0.9 * stats["retain_loss"] + 0.1 * stats["forget_loss"], rel=1e-6)
        changed = [not torch.equal(a, b) for a, b in zip(before, method.model.parameters())]
        assert sum(changed) > len(changed) // 2, (base, mode)
        assert all(p.grad is None for p in method.model.parameters())


@pytest.mark.parametrize("name", ["SRGradFocusOPT", "SCRUBGradMask", "NGSalUn"])
def test_same_seed_gives_identical_weights(split_data, name):
    def run(seed):
        method = make_method(name, split_data, seed=seed, grad_mask=None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run_unlearning(method, 1, progress=False)
        return [p.detach().clone() for p in method.model.parameters()]

    first, second, other = run(7), run(7), run(8)
    assert_lists_equal(first, second)
    assert any(not torch.equal(a, b) for a, b in zip(first, other))


def test_bernoulli_and_srl_draws_are_reproducible(split_data):
    def run(seed):
        method = make_method("SRL", split_data, grad_mask="bernoulli", seed=seed)
        run_unlearning(method, 2, progress=False)
        return [p.detach().clone() for p in method.model.parameters()]

    assert_lists_equal(run(3), run(3))


# ---------------------------------------------------------------------------------------------------------------------
# The loop: batches, epochs, augmentation, state


class LoaderSpy:
    """Stands in for SplitData, recording every train_loader request."""

    def __init__(self, data):
        self.data = data
        self.requests = []

    def __getattr__(self, name):
        return getattr(self.data, name)

    def train_loader(self, part, generator, batch_size=None, augment=None, labels=None):
        self.requests.append((part, batch_size, augment))
        return self.data.train_loader(part, generator, batch_size=batch_size, augment=augment, labels=labels)


@pytest.mark.parametrize("augment, expected", [
    ("always", [None, None, None]), ("first_epoch", [None, False, False]), ("never", [False, False, False]),
])
def test_augmentation_option(split_data, augment, expected):
    spy = LoaderSpy(split_data)
    method = make_method("NGPlus", spy, augment=augment)
    run_unlearning(method, 3, progress=False)
    forget = [a for part, _, a in spy.requests if part == "forget"]
    retain = [a for part, _, a in spy.requests if part == "retain"]
    assert forget == expected and retain == expected


def test_one_retain_batch_per_forget_batch_and_retain_restart(digits):
    base = dataset.make_split(digits, class_to_replace=-1, num_indexes_to_replace=50, seed=1)
    # A retain set smaller than one epoch's needs: 50 forget samples at batch 16 = 4 steps, retain 20 = 2 batches.
    split = dataset.Split(dataset="digits", train=base.train, val=base.val, forget=base.forget, retain=base.retain[:20],
                          test=base.test, scenario="random", class_to_replace=-1, num_indexes_to_replace=50, seed=1)
    spy = LoaderSpy(dataset.SplitData(digits, split, batch_size=16))
    method = make_method("NGPlus", spy)
    quiet_setup(method)
    steps = []
    original_step = method.step

    def counting_step(xf, yf, xr, yr):
        steps.append((len(yf), len(yr)))
        return original_step(xf, yf, xr, yr)

    method.step = counting_step
    method.run_epoch(1)
    assert [n for n, _ in steps] == [16, 16, 16, 2]           # ceil(50 / 16) steps, last batch smaller
    assert [n for _, n in steps] == [16, 4, 16, 4]            # one retain batch each; a second retain pass
    assert [part for part, _, _ in spy.requests] == ["forget", "retain", "retain"]


def test_batch_size_comes_from_the_hyperparameters(split_data):
    spy = LoaderSpy(split_data)
    method = make_method("NGPlus", spy, batch_size=8)
    run_unlearning(method, 1, progress=False)
    assert {b for _, b, _ in spy.requests} == {8}


def test_optimizer_and_mask_state_persist_across_epochs(split_data):
    method = make_method("NGradFocus", split_data)
    quiet_setup(method)
    optimizer, mask = method.optimizer, method.mask
    assert optimizer.defaults["lr"] == 1e-4 and optimizer.defaults["weight_decay"] == 0.0
    assert optimizer.defaults["betas"] == (0.9, 0.999) and optimizer.defaults["eps"] == 1e-8
    method.run_epoch(1)
    state_after_one = [v.clone() for v in mask.noise_state[0]]
    method.run_epoch(2)
    assert method.optimizer is optimizer and method.mask is mask
    assert optimizer.state[method.params[0]]["step"] == 4  # 2 epochs x 2 steps, one Adam state for the run
    assert any(not torch.equal(a, b) for a, b in zip(state_after_one, mask.noise_state[0]))
    assert mask.last_focus is not None


def test_model_is_in_train_mode_during_unlearning(split_data):
    method = make_method("SRL", split_data)
    method.model.eval()
    modes = []
    # Forwards that build a graph are the training steps; the divergence guard's probe runs in eval mode, no grad.
    method.model.register_forward_hook(
        lambda module, *args: modes.append(module.training) if torch.is_grad_enabled() else None)
    run_unlearning(method, 1, progress=False)
    assert modes and all(modes)
