"""Every file-name rule of a run, in one place. The names of the original README are kept: users pass them to --mask."""
from __future__ import annotations

from pathlib import Path

from evaluation.reference_models import CACHE_SUBDIR
from pipeline.config import DataConfig, ModelConfig, RunConfig

CHECKPOINT_SUFFIX = ".pth.tar"
REFERENCE_CACHE = CACHE_SUBDIR  # under --save_dir: the attacks' reference models, forget quality's retrained models
UPSTREAM_TRAIN_SEED = 1  # --train_seed default: models initialised from it keep upstream's file names


def init_tag(model: ModelConfig) -> str:
    """'' for upstream's initialisation seed, else `_init<train_seed>`: a model initialised from another seed (the
    benchmark's, whose --train_seed follows --seed) never takes, or is taken for, a file of another initialisation."""
    return "" if model.train_seed == UPSTREAM_TRAIN_SEED else f"_init{model.train_seed}"


def _prefix(data: DataConfig, model: ModelConfig) -> str:
    return f"{data.seed}{model.arch}{init_tag(model)}_ep{model.epochs}"


def original_model(save_dir: Path, data: DataConfig, model: ModelConfig) -> Path:
    """{save_dir}/{seed}{arch}_ep{epochs}model_SA_best.pth.tar: the best-by-validation original model (with
    `_init<train_seed>` after the arch when --train_seed is not upstream's 1, and `_sub<N>` before `model_SA_best` for
    a --train_subset model, so it never takes a full-data model's place; Retrain models carry it in their split tag)."""
    subset = "" if data.train_subset is None else f"_sub{data.train_subset}"
    return Path(save_dir) / f"{_prefix(data, model)}{subset}model_SA_best{CHECKPOINT_SUFFIX}"


def original_rolling(best: Path, default_best: Path) -> Path:
    """The rolling checkpoint that --resume continues: upstream's name next to the default model,
    else `resume_<name>`."""
    if Path(best) == Path(default_best):
        return Path(best).with_name(Path(best).name.replace(f"model_SA_best{CHECKPOINT_SUFFIX}",
                                                            f"checkpoint{CHECKPOINT_SUFFIX}"))
    return Path(best).with_name(f"resume_{Path(best).name}")


def retrain_model(save_dir: Path, data: DataConfig, model: ModelConfig, split_tag: str) -> Path:
    return Path(save_dir) / f"{_prefix(data, model)}_retrain_{split_tag}model{CHECKPOINT_SUFFIX}"


def retrain_rolling(best: Path) -> Path:
    return Path(best).with_name(Path(best).name.replace(f"model{CHECKPOINT_SUFFIX}", f"checkpoint{CHECKPOINT_SUFFIX}"))


def companion(checkpoint: Path, suffix: str) -> Path:
    """`X.pth.tar` -> `X<suffix>` (the training summary `.json` and curve `.png` of a model)."""
    return Path(checkpoint).with_suffix("").with_suffix(suffix)


def split_file(save_dir: Path, split_tag: str) -> Path:
    return Path(save_dir) / f"split_{split_tag}.json"


def forget_result(config: RunConfig, default_name: str = "eval_result.json") -> Path:
    """--result_json, else {save_dir}/{unlearn}eval_result.json."""
    if config.output.result_json is not None:
        return Path(config.output.result_json)
    return config.output.save_dir / f"{config.method.name}{default_name}"


def forget_checkpoint(config: RunConfig, default_name: str = "checkpoint.pth.tar") -> Path:
    return config.output.save_dir / f"{config.method.name}{default_name}"


def curves_plot(result: Path) -> Path:
    return Path(result).with_name(Path(result).name.removesuffix(".json") + "_curves.png")


def mia_scores(config: RunConfig) -> Path:
    return config.output.save_dir / f"{config.method.name}mia_scores.npz"


def mia_roc(config: RunConfig) -> Path:
    return config.output.save_dir / f"{config.method.name}mia_roc.png"


def forget_quality_scores(config: RunConfig) -> Path:
    """--forget_quality: per-example ε, points and the confidences of the N unlearned and N retrained models."""
    return config.output.save_dir / f"{config.method.name}forget_quality.npz"


def forget_quality_plot(config: RunConfig) -> Path:
    return config.output.save_dir / f"{config.method.name}forget_quality.png"


def model_to_unlearn(config: RunConfig) -> Path:
    """--mask, else the original model's default name in --save_dir."""
    if config.method.model_path:
        return Path(config.method.model_path)
    return original_model(config.output.save_dir, config.data, config.model)
