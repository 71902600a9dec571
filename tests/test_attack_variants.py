"""perf/attack_variants.py: its variant rules (each differs from ours exactly where docs/attacks.md says), and the
script itself on a tiny budget."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from conftest import ROOT, run_main
from evaluation.attacks import lira_offline, lira_online
from evaluation.svc_mia import mia_features


def _load_script():
    spec = importlib.util.spec_from_file_location("attack_variants", ROOT / "perf" / "attack_variants.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


av = _load_script()


def _probs(n: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 3.0, size=(n, classes))
    p = np.exp(logits - logits.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True), rng.integers(0, classes, n)


def test_song_mittal_variant_is_what_svc_mia_computes():
    p, y = _probs(200, 10, 0)
    np.testing.assert_allclose(av.m_entropy_song_mittal(p, y), mia_features(p, y)["m_entropy"][:, 0], rtol=1e-12)


def test_upstream_m_entropy_ignores_the_label_when_every_class_is_present():
    p, y = _probs(300, 10, 1)
    assert len(np.unique(y)) == 10
    expected = -((1.0 - p) * np.log(p)).sum(1)
    np.testing.assert_allclose(av.m_entropy_upstream(p, y), expected, rtol=1e-12)
    np.testing.assert_allclose(av.m_entropy_upstream(p, (y + 1) % 10), expected, rtol=1e-12)
    # with only some classes present, only their columns are substituted: then the label set matters
    few = np.zeros(300, dtype=np.int64)
    assert not np.allclose(av.m_entropy_upstream(p, few), expected)
    assert not np.allclose(av.m_entropy_upstream(p, y), av.m_entropy_song_mittal(p, y))


def test_fork_m_entropy_formula():
    p = np.array([[0.7, 0.2, 0.1]])
    y = np.array([0])
    expected = -(0.3 * np.log(0.3)) - (0.2 * np.log(0.2) + 0.1 * np.log(0.1))
    assert av.m_entropy_fork(p, y)[0] == pytest.approx(expected, rel=1e-12)


def _reference(k: int, n: int, seed: int):
    rng = np.random.default_rng(seed)
    refs = rng.normal(0.0, 1.0, size=(k, n)) + rng.normal(0.0, 2.0, size=(1, n))
    member = np.zeros((k, n), bool)
    for i in range(n):
        member[rng.permutation(k)[: k // 2], i] = True
    refs = refs + 1.5 * member
    return rng.normal(0.0, 2.0, size=n), refs, member


@pytest.mark.parametrize("fixed", [False, True])
def test_own_fits_reproduce_the_library(fixed):
    target, refs, member = _reference(8, 60, 2)
    rule = "ours" if fixed else None
    np.testing.assert_allclose(av.online_variant(target, refs, member, rule),
                               lira_online(target, refs, refs, member, fixed_variance=fixed), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(av.offline_variant(target, refs, member, rule),
                               lira_offline(target, refs, ~member, fixed_variance=fixed), rtol=1e-9, atol=1e-9)


def test_two_sided_offline_calls_low_outliers_members():
    target, refs, member = _reference(8, 3, 3)
    mean_out = np.array([refs[~member[:, i], i].mean() for i in range(3)])
    target = mean_out + np.array([-6.0, 0.0, 6.0])  # far below, at, far above the OUT mean
    one_sided = av.offline_variant(target, refs, member, "ours")
    two_sided = av.offline_variant(target, refs, member, "ours", two_sided=True)
    assert one_sided[0] < one_sided[1] < one_sided[2]
    assert two_sided[0] > two_sided[1] and two_sided[2] > two_sided[1]


def test_shared_sigma_ranks_alike_whatever_its_value():
    target, refs, member = _reference(8, 80, 4)
    centred = av.online_variant(target, refs, member, "in_centred")
    uncentred = av.online_variant(target, refs, member, "in_uncentred", sigma_in_rule="in_uncentred")
    assert np.array_equal(np.argsort(centred), np.argsort(uncentred))
    assert not np.allclose(centred, uncentred)


def test_medians_differ_from_means_under_an_outlying_reference():
    target, refs, member = _reference(7, 40, 5)
    refs[0, :] += 50.0  # one outlying reference model: the median resists it, the mean does not
    mean_scores = av.online_variant(target, refs, member, None)
    median_scores = av.online_variant(target, refs, member, None, centre="median")
    assert not np.allclose(mean_scores, median_scores)


def test_bad_input_is_one_line_and_writes_nothing(tmp_path):
    cache = tmp_path / "cache"
    proc = run_main("perf/attack_variants.py", "--num_models", "2", "--cache_dir", str(cache))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "--num_models" in proc.stderr
    assert not cache.exists()


@pytest.mark.perf
@pytest.mark.integration
def test_tiny_run_prints_every_table(run, tmp_path):
    cache = tmp_path / "cache"
    args = ["--dataset", "digits", "--epochs", "1", "--width", "4", "--num_models", "5", "--jobs", "1",
            "--cache_dir", str(cache)]
    proc = run("perf/attack_variants.py", *args, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for row in ("online, fixed variance (ours)", "(a) two-sided density", "(d) two mirrored views",
                "K=2 online, per-example variance", "K=4 offline, fixed (ours) variance",
                "(e) SVC on m_entropy, upstream"):
        assert row in out, row
    assert "K=8" not in out  # only 4 references per target here
    k2 = next(line for line in out.splitlines() if line.startswith("| K=2 online, per-example variance"))
    assert "n/a" in k2  # one value per side: no variance can be estimated
    auc = [float(line.split("|")[2]) for line in out.splitlines()
           if line.startswith("| online, fixed variance (ours)")]
    assert len(auc) == 1 and 0.0 <= auc[0] <= 1.0
    assert any(cache.rglob("model_004.pth.tar"))
