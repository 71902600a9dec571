"""The typed configuration of one run: frozen dataclasses built once from the command line (arg_parser.py) and validated
before any data is loaded, model trained or file written.

Stages below this module (data, models, methods, evaluation, files, tracking) receive these objects or plain values
taken from them, never an argparse namespace.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from training import TrainRecipe, parse_milestones


def frozen(mapping: Mapping[str, Any]) -> Mapping[str, Any]:
    """A read-only view of a copy: a frozen dataclass should not hold a dict that can change under it."""
    return MappingProxyType(dict(mapping))


@dataclass(frozen=True)
class DataConfig:
    """Which data, and which forget set: `class_to_replace` -1 = random across classes, `num_indexes_to_replace` None
    with a class = the whole class (class-wise forgetting)."""

    dataset: str
    root: str
    num_classes: int
    batch_size: int
    augment: bool
    download: bool
    split_mode: str                       # consistent | upstream
    class_to_replace: int
    num_indexes_to_replace: int | None
    seed: int                             # the run's seed: the forget set is drawn with seed - 1
    train_subset: int | None = None       # train and val from a stratified subset of this many images (None: all)

    @property
    def scenario(self) -> str:
        """random / classwise / subclass, as `dataset.make_split` names them (known before the data is loaded)."""
        if self.class_to_replace == -1:
            return "random"
        return "classwise" if self.num_indexes_to_replace is None else "subclass"

    @property
    def forget_setting(self) -> str:
        if self.scenario == "random":
            return f"random{self.num_indexes_to_replace}"
        if self.scenario == "classwise":
            return f"class{self.class_to_replace}"
        return f"class{self.class_to_replace}n{self.num_indexes_to_replace}"


@dataclass(frozen=True)
class ModelConfig:
    """The architecture and the recipe that trains the original model and Retrain (and the reference models)."""

    arch: str
    width: int | None                     # None: the architecture's own (a checkpoint's recorded width wins on load)
    train_seed: int                       # initialisation seed, shared by the original model and Retrain
    epochs: int
    lr: float
    momentum: float
    weight_decay: float
    decreasing_lr: str | None             # MultiStepLR milestones as typed, e.g. "91,136"
    warmup: int
    batch_size: int
    amp: str = "off"                      # off | bf16: autocast for training, unlearning and evaluation

    @property
    def recipe(self) -> TrainRecipe:
        return TrainRecipe(epochs=self.epochs, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay,
                           batch_size=self.batch_size, milestones=parse_milestones(self.decreasing_lr),
                           warmup=self.warmup)

    def recipe_values(self) -> dict[str, Any]:
        """The recipe fields that methods share with training (see `unlearn.hparams.HParam.recipe`)."""
        return {"batch_size": self.batch_size, "momentum": self.momentum, "weight_decay": self.weight_decay,
                "decreasing_lr": self.decreasing_lr}


@dataclass(frozen=True)
class MethodConfig:
    """The unlearning method as asked (`name`, an alias or a registered method), what it resolved to, and its
    hyper-parameters after the precedence rules (`hp`: exactly what the configuration uses)."""

    name: str
    label: str                            # what it runs, e.g. "NGPlus+prob"
    base: str                             # the registered class's name, e.g. "NGPlus"
    grad_mask: str | None
    hp: Mapping[str, Any]
    explicit: Mapping[str, Any]           # the hyper-parameter flags given on the command line (flag -> value)
    unlearn_seed: int
    paper_era: bool
    model_path: str | None                # --mask: the model to unlearn (default: the original model's file name)


@dataclass(frozen=True)
class EvalConfig:
    mia: str                              # svc | lira | rmia | ulira | all
    num_ref_models: int
    jobs: int
    epoch_eval: bool                      # evaluate after every unlearning epoch (curves)
    epoch_eval_metrics: str = "all"       # all | selection (the training-pool metrics only: benchmark.py --tune)
    stop_patience: int = 0                # end after this many epochs without a selection-score improvement (0: off)
    stop_tolerance: float = 0.0           # the improvement, in points, that counts (evaluation.selection.PlateauStop)
    forget_quality: int = 0               # N unlearned vs N retrained models (0 = off)


@dataclass(frozen=True)
class OutputConfig:
    save_dir: Path
    result_json: Path | None              # None: the script's default name in save_dir
    save_model: bool
    plots: bool
    progress: bool
    resume: bool


@dataclass(frozen=True)
class TrackingConfig:
    enabled: bool
    experiment: str | None
    run_name: str | None
    parent_run_id: str | None


@dataclass(frozen=True)
class RunConfig:
    """Everything one command line asks for, resolved and validated. `flags` is the flat record of the resolved
    command-line values (what the result JSON keeps under "args", so a result says exactly how to rerun it)."""

    script: str
    device: str
    data: DataConfig
    model: ModelConfig
    method: MethodConfig
    eval: EvalConfig
    output: OutputConfig
    tracking: TrackingConfig
    flags: Mapping[str, Any] = field(default_factory=dict)
    extras: Mapping[str, Any] = field(default_factory=dict)   # script-specific settings (backdoor: trigger_size)

    @property
    def seed(self) -> int:
        return self.data.seed

    def args_record(self) -> dict[str, Any]:
        return dict(self.flags)

    def describe(self) -> dict[str, Any]:
        """Nested plain values, for logs and tests."""
        return {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in asdict(self).items()}
