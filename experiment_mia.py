"""Glue between an experiment `Run` and the per-example attacks (`evaluation.per_example_mia`).

`experiment.unlearn_and_evaluate` calls `run_per_example_mia` once when `--mia` is lira, rmia, ulira or all; the
returned dict goes under "per_example_mia" in the result JSON. Files written next to the result JSON:
`{save_dir}/{unlearn}mia_scores.npz` (per-example scores and signals) and `{save_dir}/{unlearn}mia_roc.png`
(log-scale ROC curves: original vs Retrain vs the method). Reference models are cached under
`{save_dir}/ref_models/`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from evaluation.per_example_mia import UliraRequest, evaluate_per_example_mia, selected_attacks
from evaluation.reference_models import CACHE_SUBDIR, ModelSpec, ReferenceConfig
from experiment import Run, load_model


def mia_paths(args) -> dict[str, Path]:
    base = Path(args.save_dir)
    return {"scores": base / f"{args.unlearn}mia_scores.npz", "roc": base / f"{args.unlearn}mia_roc.png"}


def reference_config(run: Run, width: int | None) -> ReferenceConfig:
    """The reference models of this run: the original model's architecture, width and recipe."""
    spec = ModelSpec(arch=run.args.arch, num_classes=run.data.num_classes, in_channels=run.data.in_channels,
                     width=width, mean=tuple(run.data.mean), std=tuple(run.data.std))
    return ReferenceConfig(dataset=run.args.dataset, model=spec, recipe=run.recipe, num_models=run.args.num_ref_models,
                           augment=run.splits.augment, device=str(run.device))


def run_per_example_mia(run: Run, final_model: torch.nn.Module, model_path: str | Path, retrain_path: Path | None,
                        method: Any, hp: dict, write_files: bool = True) -> dict[str, Any]:
    """LiRA / RMIA / U-LiRA (as `--mia` asks) on the unlearned model, the original (reloaded from `model_path`) and the
    Retrain model (`retrain_path`, when there is one)."""
    args = run.args
    attacks = selected_attacks(args.mia)
    if not attacks:
        return {}
    original, payload = load_model(model_path, run)
    retrain = load_model(retrain_path, run)[0] if retrain_path else None
    if retrain is None:
        print("note: no Retrain model; per-example attacks report the method and the original only")
    paths = mia_paths(args) if write_files else {"scores": None, "roc": None}
    request = UliraRequest(method=method, hp=hp, unlearn_seed=args.unlearn_seed) if "ulira" in attacks else None
    return evaluate_per_example_mia(
        args.mia, data=run.data, split=run.split, splits=run.splits,
        config=reference_config(run, payload.get("width") or args.width), cache_root=run.save_dir / CACHE_SUBDIR,
        method_model=final_model, original_model=original, retrain_model=retrain, method_label=method.label,
        ulira=request, jobs=args.jobs, scores_path=paths["scores"], roc_path=paths["roc"],
        log=print)
