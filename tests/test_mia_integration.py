"""Per-example membership inference end to end on digits_noisy (memorisation is visible there; plain digits is too
easy): LiRA sees the original model's memorisation of the forget set, well above Retrain; a second evaluation
reuses the cached reference models; `main_forget.py --mia lira` writes the scores, the ROC plot and the JSON keys.

Budget: resnet20s width 12, 10 epochs, K = 8 reference models (2 workers). While developing, the margin of the
original's LiRA AUC over Retrain's was 0.14-0.18 (online) and 0.14-0.18 (offline) over split seeds 1-3, against the
0.05 asserted."""
import json

import numpy as np
import pytest
import torch

from arg_parser import parse_config
from conftest import run_script
from pipeline.mia import per_example_mia
from pipeline.stages import prepare, train_reference, unlearn


def attacks_of(p):
    """Unlearn (raw) and run the attack stage without writing its files."""
    unl = unlearn(p)
    return per_example_mia(p, unl, write_files=False)


pytestmark = pytest.mark.slow  # ten models of 10 epochs (original, Retrain, eight references)

FLAGS = ["--dataset", "digits_noisy", "--arch", "resnet20s", "--width", "12", "--epochs", "10", "--decreasing_lr",
         "6,8", "--lr", "0.05", "--batch_size", "64", "--class_to_replace", "-1", "--num_indexes_to_replace", "130",
         "--seed", "1", "--num_ref_models", "8", "--jobs", "2", "--no-progress", "--unlearn", "raw"]
ATTACK_KEYS = {"auc", "tpr_at_1pct_fpr", "tpr_at_0.1pct_fpr", "balanced_accuracy"}
MARGIN = 0.05


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Original and Retrain models, then one `--unlearn raw --mia lira` evaluation (which builds the cache)."""
    save_dir = tmp_path_factory.mktemp("mia")
    run = prepare(parse_config(FLAGS + ["--save_dir", str(save_dir), "--mia", "lira"]))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small models on 2 shared cores: one thread is several times faster
    try:
        train_reference(run, retrain=False)
        train_reference(run, retrain=True)
        mia = attacks_of(run)
    finally:
        torch.set_num_threads(threads)
    return save_dir, run, mia


def test_lira_sees_the_original_models_memorisation(workspace):
    _, _, mia = workspace
    assert mia["attacks"] == ["lira_online", "lira_offline"] and mia["num_ref_models"] == 8
    assert mia["fixed_variance"] is True and mia["reference_models_trained_now"] == 8
    assert mia["num_forget"] == 130
    for attack in ("lira_online", "lira_offline"):
        original, retrain = mia[f"original_{attack}"], mia[f"retrain_{attack}"]
        assert set(original) == set(retrain) == ATTACK_KEYS
        assert original["auc"] > retrain["auc"] + MARGIN, (attack, original, retrain)
        assert 0.0 <= original["tpr_at_1pct_fpr"] <= 1.0 and 0.0 <= retrain["tpr_at_1pct_fpr"] <= 1.0
        assert mia[attack] == original  # raw: the method's model is the original
        assert mia[f"gap_{attack}"]["auc"] == pytest.approx(original["auc"] - retrain["auc"])


def test_second_evaluation_reuses_the_reference_models(workspace):
    _, run, first = workspace
    models = sorted(p for p in (run.save_dir / "ref_models").glob("*/model_*.pth.tar"))
    assert len(models) == 8
    mtimes = [p.stat().st_mtime_ns for p in models]
    rmia_run = prepare(parse_config(FLAGS + ["--save_dir", str(run.save_dir), "--mia", "rmia"]), data=run.data)
    mia = attacks_of(rmia_run)
    assert mia["reference_models_trained_now"] == 0 and mia["reference_cache"] == first["reference_cache"]
    assert [p.stat().st_mtime_ns for p in models] == mtimes
    assert mia["original_rmia"]["auc"] > mia["retrain_rmia"]["auc"]


@pytest.mark.integration
def test_main_forget_mia_lira_writes_scores_plot_and_keys(workspace):
    save_dir, _, _ = workspace
    proc = run_script("main_forget.py", *FLAGS, "--save_dir", str(save_dir), "--mia", "lira",
                      env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "training" not in proc.stdout  # the cache of the fixture is reused across processes
    result = json.loads((save_dir / "raweval_result.json").read_text())
    mia = result["per_example_mia"]
    for key in ("lira_online", "retrain_lira_online", "original_lira_online", "gap_lira_online", "lira_offline",
                "retrain_lira_offline"):
        assert set(mia[key]) == ATTACK_KEYS, key
    assert mia["reference_models_trained_now"] == 0
    assert set(mia["seconds"]) >= {"reference_models", "lira_online", "lira_offline"}
    assert "MIA_efficacy" in result  # SVC-MIA still reported
    scores, roc = save_dir / "rawmia_scores.npz", save_dir / "rawmia_roc.png"
    assert mia["scores_file"] == str(scores) and mia["roc_file"] == str(roc)
    assert roc.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with np.load(scores) as stored:
        assert stored["scores_lira_online_method"].shape == (130 + mia["num_test"],)
        assert stored["is_forget"].sum() == 130
        np.testing.assert_allclose(stored["scores_lira_online_method"], stored["scores_lira_online_original"])
