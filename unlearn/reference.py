"""The two reference points of every table: `raw` (the original model, untouched) and `retrain` (exact unlearning)."""
from __future__ import annotations

from training import train_model
from unlearn.registry import UnlearnMethod, register_method


@register_method
class Raw(UnlearnMethod):
    name = "raw"
    summary = "evaluate the original model (no unlearning)"
    one_shot = True  # no hyper-parameters: nothing to tune
    deterministic = True

    def run_epoch(self, epoch: int) -> dict[str, float]:
        return {}


@register_method
class Retrain(UnlearnMethod):
    """Train from the fixed `train_seed` initialisation on the retain set with the original model's recipe; the final
    weights are kept (as the paper's 'ideal' models)."""

    name = "retrain"
    summary = "exact unlearning: train from scratch on the retain set with the original recipe"
    one_shot = True  # the recipe's own epochs run inside one driver step; the recipe is the original model's

    def run_epoch(self, epoch: int) -> dict[str, float]:
        if self.ctx.model_factory is None or self.ctx.train_recipe is None:
            raise ValueError("retrain needs the model factory and the training recipe of the original model")
        fresh = self.ctx.model_factory().to(self.ctx.device)
        result = train_model(fresh, self.ctx.data, self.ctx.train_recipe, seed=self.ctx.retrain_seed, part="retain",
                             progress=self.ctx.progress, desc="retrain", amp=self.ctx.amp)
        self.model.load_state_dict(result.model.state_dict())
        return {"loss": result.history["train_loss"][-1] if result.history["train_loss"] else 0.0}
