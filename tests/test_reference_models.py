"""Reference models of the per-example attacks: balanced design, cache (reuse, resume, keys), parallel = sequential,
and the U-LiRA shadow machinery. Tiny budgets on plain digits; the attack itself is tested in test_mia_integration."""
import json
import multiprocessing
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dataset import Split, SplitData, load_dataset, make_split
from evaluation.per_example_mia import (
    UliraRequest,
    ensure_retrained_shadows,
    evaluate_per_example_mia,
    shadow_forget_sets,
    unlearn_shadow,
)
from evaluation.reference_models import (
    ModelSpec,
    ReferenceConfig,
    ReferenceModels,
    attack_pool_data,
    balanced_membership,
    ensure_reference_models,
    load_weights,
)
from training import TrainRecipe
from unlearn import resolve_hyperparameters, resolve_method
from utils import UserError

K = 2


@pytest.fixture(scope="module")
def digits():
    data = load_dataset("digits")
    return data, make_split(data, -1, 40, seed=1)


def _config(data, epochs=1, num_models=K):
    spec = ModelSpec("resnet20s", data.num_classes, data.in_channels, 4, data.mean, data.std)
    return ReferenceConfig("digits", spec, TrainRecipe(epochs=epochs, lr=0.05, batch_size=128, milestones=()),
                           num_models=num_models, augment=False)


def _states_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _quiet(message):
    pass


@pytest.fixture(scope="module")
def built(digits, tmp_path_factory):
    """K tiny models built in parallel (2 workers) and the same ones sequentially, in two cache roots."""
    data, split = digits
    root_parallel, root_sequential = tmp_path_factory.mktemp("par"), tmp_path_factory.mktemp("seq")
    parallel = ensure_reference_models(_config(data), data, split, root_parallel, jobs=2, log=_quiet)
    sequential = ensure_reference_models(_config(data), data, split, root_sequential, jobs=1, log=_quiet)
    return parallel, sequential, root_parallel


def test_balanced_membership_design():
    even = balanced_membership(500, 8, seed=3)
    assert even.shape == (8, 500) and (even.sum(axis=0) == 4).all()
    assert np.array_equal(even, balanced_membership(500, 8, seed=3))
    assert not np.array_equal(even, balanced_membership(500, 8, seed=4))
    assert (np.abs(even.sum(axis=1) - 250) < 60).all()  # every model trains on about half of the pool
    odd = balanced_membership(2000, 5, seed=0)
    counts = odd.sum(axis=0)
    assert set(np.unique(counts)) == {2, 3} and abs(counts.mean() - 2.5) < 0.1
    assert (np.abs(odd.sum(axis=1) - 1000) < 120).all()
    with pytest.raises(UserError):
        balanced_membership(10, 1, seed=0)


def test_pool_holds_training_split_and_whole_test_set(built, digits):
    data, split = digits
    refs = built[0]
    num_train = len(data.train_labels)
    assert np.array_equal(refs.pool[:len(split.train)], split.train)
    assert np.array_equal(refs.pool[len(split.train):], num_train + np.arange(len(data.test_labels)))
    assert not np.isin(split.val, refs.pool).any()  # validation samples are never trained on
    assert refs.phi.shape == refs.prob.shape == refs.in_mask.shape == (K, len(refs.pool))
    assert (refs.in_mask.sum(axis=0) == K // 2).all()
    pool = attack_pool_data(data)
    assert torch.equal(pool.train_images[num_train + 5], data.test_images[5])
    with pytest.raises(UserError, match="not in the reference models' pool"):
        refs.columns(split.val[:3])


def test_parallel_build_equals_sequential(built):
    parallel, sequential, _ = built
    assert parallel.trained_now == sequential.trained_now == list(range(K))
    for k in range(K):
        assert _states_equal(parallel.load(k, torch.device("cpu")), sequential.load(k, torch.device("cpu"))), k
    np.testing.assert_array_equal(parallel.phi, sequential.phi)


def test_cache_is_reused_and_resumes(built, digits):
    data, split = digits
    refs, _, root = built
    mtimes = {p: p.stat().st_mtime_ns for p in refs.directory.iterdir()}
    again = ensure_reference_models(_config(data), data, split, root, jobs=1, log=_quiet)
    assert again.trained_now == [] and again.directory == refs.directory
    assert {p: p.stat().st_mtime_ns for p in refs.directory.iterdir()} == mtimes  # nothing rewritten
    np.testing.assert_array_equal(again.phi, refs.phi)
    # an interrupted build (one model missing) trains only that one, to the same weights
    before = refs.load(1, torch.device("cpu"))
    refs.model_path(1).unlink()
    resumed = ensure_reference_models(_config(data), data, split, root, jobs=1, log=_quiet)
    assert resumed.trained_now == [1]
    assert _states_equal(before, resumed.load(1, torch.device("cpu")))


def test_cache_of_another_split_or_recipe_is_not_reused(built, digits):
    data, split = digits
    refs, _, root = built
    other_recipe = ensure_reference_models(_config(data, epochs=2), data, split, root, jobs=1, log=_quiet)
    assert other_recipe.directory != refs.directory and other_recipe.trained_now == list(range(K))
    smaller = Split(dataset=split.dataset, train=split.train[:-20], val=split.val, forget=split.forget,
                    retain=np.setdiff1d(split.train[:-20], split.forget), test=split.test, scenario="random",
                    class_to_replace=-1, num_indexes_to_replace=len(split.forget), seed=1)
    other_split = ensure_reference_models(_config(data), data, smaller, root, jobs=1, log=_quiet)
    assert other_split.directory not in (refs.directory, other_recipe.directory)
    assert other_split.trained_now == list(range(K))
    # another forget set on the same training split shares the cache
    other_forget = make_split(data, -1, 60, seed=3)
    assert np.array_equal(other_forget.train, split.train)
    shared = ensure_reference_models(_config(data), data, other_forget, root, jobs=1, log=_quiet)
    assert shared.directory == refs.directory and shared.trained_now == []


def test_shadow_forget_sets_follow_the_scenario(digits):
    data, split = digits
    num_train = len(data.train_labels)
    labels = data.train_labels.numpy()
    pool = np.concatenate([split.train, num_train + np.arange(len(data.test_labels))])
    in_mask = balanced_membership(len(pool), 4, seed=0)
    refs = ReferenceModels(directory=None, config=_config(data, num_models=4), pool=pool, in_mask=in_mask,
                           phi=None, prob=None, trained_now=[], seconds_now=0.0, train_seconds_total=0.0)
    forget = split.forget
    sets = shadow_forget_sets(refs, forget, labels, num_train, class_to_replace=-1)
    for k, shadow in enumerate(sets):
        members = pool[in_mask[k]]
        assert len(shadow) == len(forget) and len(np.unique(shadow)) == len(shadow)
        assert np.isin(shadow, members[members < num_train]).all()
        assert np.isin(np.intersect1d(forget, members), shadow).all()  # every real forget example k trained on
    covered = np.stack([np.isin(forget, s) for s in sets]).sum(axis=0)
    assert (covered == 2).all()  # K/2 unlearned values per forget example
    whole_class = make_split(data, 3, None, seed=1)
    sets = shadow_forget_sets(refs, whole_class.forget, labels, num_train, class_to_replace=3)
    for k, shadow in enumerate(sets):
        members = pool[in_mask[k]]
        expected = members[(members < num_train)]
        assert np.array_equal(shadow, np.sort(expected[labels[expected] == 3]))


def test_ulira_retrain_method_reproduces_the_retrained_shadows(built, digits):
    """A perfect method (Retrain itself) unlearns each shadow into exactly its retrained-without model."""
    data, split = digits
    refs = built[0]
    sets = shadow_forget_sets(refs, split.forget, data.train_labels.numpy(), len(data.train_labels), -1)
    paths, trained, _ = ensure_retrained_shadows(refs, sets, data, jobs=1, batch_size=128, log=_quiet)
    assert trained == list(range(K)) and all(p.is_file() for p in paths)
    assert ensure_retrained_shadows(refs, sets, data, jobs=1, batch_size=128, log=_quiet)[1] == []
    method = resolve_method("retrain")
    request = UliraRequest(method=method, hp=resolve_hyperparameters(method, {}), unlearn_seed=1)
    unlearned, diverged = unlearn_shadow(refs, 0, sets[0], attack_pool_data(data), split, request, 128, False)
    assert not diverged
    assert _states_equal(unlearned, load_weights(paths[0], refs.config.model, torch.device("cpu")))


def test_evaluate_outputs_and_files(built, digits, tmp_path):
    data, split = digits
    refs, _, root = built
    splits = SplitData(data, split, batch_size=128, augment=False)
    model = refs.load(0, torch.device("cpu"))
    other = refs.load(1, torch.device("cpu"))
    scores, roc = tmp_path / "s.npz", tmp_path / "roc.png"
    with pytest.raises(UserError, match="needs --num_ref_models >= 3"):
        evaluate_per_example_mia("lira", data=data, split=split, splits=splits, config=_config(data),
                                 cache_root=root, method_model=model, log=_quiet)
    result = evaluate_per_example_mia("rmia", data=data, split=split, splits=splits, config=_config(data),
                                      cache_root=root, method_model=model, original_model=model, retrain_model=other,
                                      scores_path=scores, roc_path=roc, log=_quiet)
    assert result["attacks"] == ["rmia"] and 0.0 <= result["rmia_a"] <= 1.0
    assert result["reference_models_trained_now"] == 0
    for attack in ("rmia",):
        assert set(result[attack]) == {"auc", "tpr_at_1pct_fpr", "tpr_at_0.1pct_fpr", "balanced_accuracy"}
        assert result[attack] == result[f"original_{attack}"]  # the method's model is the original here
        gap = result[f"gap_{attack}"]
        assert gap["auc"] == pytest.approx(result[attack]["auc"] - result[f"retrain_{attack}"]["auc"])
    assert "lira_online" not in result and roc.stat().st_size > 1000
    with np.load(scores) as stored:
        n = len(split.forget) + len(split.test)
        assert stored["scores_rmia_method"].shape == (n,)
        assert stored["is_forget"].sum() == len(split.forget)
        assert stored["reference_phi"].shape == (K, n)
    assert evaluate_per_example_mia("svc", data=data, split=split, splits=splits, config=_config(data),
                                    cache_root=root, method_model=model) == {}


@pytest.fixture(scope="module")
def ulira_root(tmp_path_factory):
    return tmp_path_factory.mktemp("ulira")


@pytest.mark.parametrize("method_name", ["retrain", "raw"])
def test_ulira_end_to_end(digits, ulira_root, tmp_path, method_name):
    """Retrain as the method: its unlearned shadows are the retrained ones, so U-LiRA is at chance (0.5) exactly.
    raw as the method: its unlearned shadows are the reference models themselves."""
    data, split = digits
    config = _config(data, num_models=4)
    splits = SplitData(data, split, batch_size=128, augment=False)
    refs = ensure_reference_models(config, data, split, ulira_root, log=_quiet)
    target = refs.load(0, torch.device("cpu"))
    method = resolve_method(method_name)
    request = UliraRequest(method=method, hp=resolve_hyperparameters(method, {}), unlearn_seed=1)
    scores = tmp_path / "s.npz"
    result = evaluate_per_example_mia("ulira", data=data, split=split, splits=splits, config=config,
                                      cache_root=ulira_root, method_model=target, retrain_model=target, ulira=request,
                                      scores_path=scores, roc_path=tmp_path / "roc.png", log=_quiet)
    assert result["attacks"] == ["ulira"] and result["shadow_pairs"] == 4
    assert result["unlearned_values_per_example_min"] == 2 and result["diverged_shadows"] == 0
    assert result["ulira"]["auc"] == 0.5  # the same model as unlearned and retrained target
    with np.load(scores) as stored:
        unlearned, retrained = stored["ulira_unlearned_phi"], stored["ulira_retrained_phi"]
        mask = stored["ulira_unlearned_mask"]
    assert (mask.sum(axis=0) == 2).all()
    if method_name == "retrain":
        np.testing.assert_array_equal(unlearned, retrained)
        assert result["ulira_shadow"]["auc"] == 0.5 and result["ulira_shadow"]["balanced_accuracy"] == 0.5
        assert result["retrained_shadows_trained_now"] == 4
    else:
        np.testing.assert_allclose(unlearned, refs.phi[:, refs.columns(split.forget)], rtol=0, atol=1e-5)
        assert not np.array_equal(unlearned, retrained)
        assert result["retrained_shadows_trained_now"] == 0  # cached by the first case (same forget sets)


def _build_when_told(root: str, go: str, result: str) -> None:
    """A second process's request for the reference models: starts when `go` appears, records what it trained."""
    torch.set_num_threads(1)
    data = load_dataset("digits")
    split = make_split(data, -1, 40, seed=1)
    while not Path(go).exists():
        time.sleep(0.005)
    refs = ensure_reference_models(_config(data), data, split, root, jobs=1, log=_quiet)
    Path(result).write_text(json.dumps({"trained_now": refs.trained_now, "phi": refs.phi.tolist()}))


@pytest.mark.slow
def test_two_processes_asking_at_once_train_the_models_once(tmp_path):
    """Both processes start together on an empty cache: one trains the K models, the other waits on the folder's
    lock and then reads them (without the lock both see them missing and both train)."""
    root, go = tmp_path / "cache", tmp_path / "go"
    context = multiprocessing.get_context("spawn")
    results = [tmp_path / f"result_{i}.json" for i in range(2)]
    workers = [context.Process(target=_build_when_told, args=(str(root), str(go), str(r))) for r in results]
    for worker in workers:
        worker.start()
    time.sleep(0.5)  # let both import torch and load the data; each waits for `go`
    go.touch()
    for worker in workers:
        worker.join(timeout=300)
        assert worker.exitcode == 0
    outcomes = [json.loads(r.read_text()) for r in results]
    trained = sorted(len(o["trained_now"]) for o in outcomes)
    assert trained == [0, K]
    assert outcomes[0]["phi"] == outcomes[1]["phi"]
    (directory,) = [p for p in root.iterdir() if p.is_dir()]
    assert sorted(p.name for p in directory.glob("model_*.pth.tar")) == [f"model_{k:03d}.pth.tar" for k in range(K)]
    assert not list(root.glob(".*.lock"))  # released
