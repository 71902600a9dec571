"""The per-example attack stage (LiRA, RMIA, U-LiRA; `evaluation.per_example_mia`), run when --mia asks for more
than SVC. Files next to the result JSON: `{save_dir}/{unlearn}mia_scores.npz` (per-example scores and signals) and
`{save_dir}/{unlearn}mia_roc.png` (log-scale ROC curves: original vs Retrain vs the method). Reference models are
cached under `{save_dir}/ref_models/`.
"""
from __future__ import annotations

from typing import Any

from evaluation.per_example_mia import UliraRequest, evaluate_per_example_mia, selected_attacks
from evaluation.reference_models import ModelSpec, ReferenceConfig
from pipeline import paths
from pipeline.stages import Prepared, Unlearned, load_model


def reference_config(p: Prepared, width: int | None) -> ReferenceConfig:
    """The reference models of this run: the original model's architecture, width and recipe."""
    c = p.config
    spec = ModelSpec(arch=c.model.arch, num_classes=p.data.num_classes, in_channels=p.data.in_channels,
                     width=width, mean=tuple(p.data.mean), std=tuple(p.data.std))
    return ReferenceConfig(dataset=c.data.dataset, model=spec, recipe=c.model.recipe, num_models=c.eval.num_ref_models,
                           augment=p.splits.augment, device=str(p.device), amp=c.model.amp)


def per_example_mia(p: Prepared, unl: Unlearned, write_files: bool = True) -> dict[str, Any]:
    """LiRA / RMIA / U-LiRA (as --mia asks) on the unlearned model, the original (reloaded) and the Retrain model
    (when there is one). Returns {} when --mia is svc."""
    c = p.config
    attacks = selected_attacks(c.eval.mia)
    if not attacks:
        return {}
    original, _ = load_model(unl.model_path, p)
    retrain = load_model(unl.retrain_path, p)[0] if unl.retrain_path else None
    if retrain is None:
        print("note: no Retrain model; per-example attacks report the method and the original only")
    request = UliraRequest(method=unl.method, hp=unl.hp, unlearn_seed=c.method.unlearn_seed,
                           paper_era=c.method.paper_era) if "ulira" in attacks else None
    return evaluate_per_example_mia(
        c.eval.mia, data=p.data, split=p.split, splits=p.splits, config=reference_config(p, unl.width),
        cache_root=p.save_dir / paths.REFERENCE_CACHE, method_model=unl.model, original_model=original,
        retrain_model=retrain, method_label=unl.method.label, ulira=request, jobs=c.eval.jobs,
        scores_path=paths.mia_scores(c) if write_files else None, roc_path=paths.mia_roc(c) if write_files else None,
        log=print)
