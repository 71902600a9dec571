"""The cells of a sweep: one mlflow_forget.py command line each, its key, its row label, and whether it is done.

A cell's key is a hash of its resolved arguments, with the method name replaced by what the name resolves to (base
class, gradient mask, hyper-parameters), so aliases of one configuration (VarGrad and NGradMask, FT_prune and FT_l1)
share one cell and run once. Reference models come first: the original model per (dataset, arch, seed) and the Retrain
reference per forget setting and seed; the Retrain row of the table is the Retrain reference evaluated like a method.

This module is the one place that knows the run's flags and file-name rules (imported from the run pipeline below).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from arg_parser import build_parser, parse_config
from dataset import TRAIN_SPLIT_SEED, load_dataset, make_split, num_classes_of, recipe_defaults, training_split
from pipeline import paths
from pipeline.config import RunConfig
from pipeline.stages import find_retrain_checkpoint, prepare
from scenarios import SCENARIOS
from scenarios.classwise import class_pool, forget_class_of
from sweep.settings import default_config_path, load_settings_file, method_combos
from unlearn import ALIASES, match_methods, resolve_method
from unlearn.registry import method_flags
from utils import UserError, to_jsonable

if TYPE_CHECKING:
    from sweep.settings import Settings

__all__ = ["NON_SEMANTIC", "method_flags", "parse_cell", "Cell", "build_cells", "cell_key", "check_classes",
           "class_draw_note", "compute_split_tags", "forget_pool", "is_done", "models_dir", "read_cell_json",
           "read_result", "to_argv", "train_size"]

CELL_SCRIPT = "mlflow_forget.py"  # a cell is one command line of this script


def parse_cell(argv: list[str]) -> RunConfig:
    """A cell's command line as the run pipeline reads it."""
    return parse_config(argv, CELL_SCRIPT)


# Arguments that do not change a cell's numbers (where files are, tracking, display): left out of its key, so an out
# dir can move (or be mounted elsewhere on a cluster) and keep its finished cells. The method's flags are left out too:
# the key holds what they resolve to instead (so aliases of one configuration share a cell).
NON_SEMANTIC = {"result_json", "save_dir", "data", "mask", "experiment", "run_name", "parent_run_id", "track",
                "no_progress", "no_plots", "jobs", "workers", "resume", "retrain", "no_save_model", "no_download",
                "unlearn", "grad_mask"}


@dataclass
class Cell:
    kind: str                 # original | retrain | reference | method
    key: str
    dataset: str
    arch: str
    scenario: str
    seed: int
    argv: list[str]           # mlflow_forget.py arguments, without where-to-write and tracking flags
    names: list[str] = field(default_factory=list)      # method names (aliases of one configuration)
    overrides: dict = field(default_factory=dict)       # hyper-parameter flags given by the config / grid / CLI
    hp: dict = field(default_factory=dict)              # resolved hyper-parameters
    family: bool = False                                # the masking family (bases that take gradient masks)
    config: str = ""                                    # what the names resolve to, e.g. "NGPlus + prob"
    deps: list[str] = field(default_factory=list)
    target: str = ""          # the file whose existence means "done"
    label: str = ""
    setting: str = ""         # the forget setting, e.g. random130 or class0
    split_tag: str = ""       # Retrain cells: the split's tag (file names), filled in by `compute_split_tags`
    edges: dict = field(default_factory=dict)  # flag -> "low" / "high": a --tune choice on the edge of its search

    def result_path(self, out: Path) -> Path:
        return out / "cells" / f"{self.key}.json"

    def failure_path(self, out: Path) -> Path:
        return out / "cells" / f"{self.key}.failed.json"


def to_argv(flags: dict[str, Any]) -> list[str]:
    """{dest: value} -> mlflow_forget.py arguments, spelled as its parser spells them (None = leave to the default)."""
    actions = _parser_actions()
    argv: list[str] = []
    for dest, value in flags.items():
        action = actions[dest]
        if value is None:
            continue
        if isinstance(action, argparse.BooleanOptionalAction):
            argv.append(action.option_strings[0 if value else 1])
        elif isinstance(action, argparse._StoreTrueAction):
            argv += [action.option_strings[0]] if value else []
        else:
            argv += [action.option_strings[0], str(value)]
    return argv


@functools.lru_cache(maxsize=1)
def _parser_actions() -> dict[str, argparse.Action]:
    return {action.dest: action for action in build_parser(CELL_SCRIPT)._actions if action.option_strings}


def cell_key(kind: str, run: RunConfig, config: dict | None = None) -> str:
    semantic = {k: v for k, v in sorted(run.flags.items()) if k not in NON_SEMANTIC and k not in method_flags()}
    if not semantic.get("stop_patience"):  # off: the key of a cell that ran every epoch before the flags existed
        semantic.pop("stop_patience", None), semantic.pop("stop_tolerance", None)
    if kind in ("original",):  # the original model does not depend on the forget set
        for k in ("class_to_replace", "num_indexes_to_replace", "unlearn_seed", "no_epoch_eval", "mia",
                  "num_ref_models", "split"):
            semantic.pop(k, None)
    payload = json.dumps({"kind": kind, "args": to_jsonable(semantic), "method": to_jsonable(config)}, sort_keys=True,
                         default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _absolute(path) -> str:
    return str(Path(path).expanduser().resolve())


def models_dir(settings: Settings, dataset: str, width: int | None) -> Path:
    return settings.out / "models" / f"{dataset}_w{width if width is not None else 'default'}"


def train_size(dataset: str, settings: Settings) -> int:
    data = load_dataset(dataset, settings.data, download=not settings.no_download)
    train, _ = training_split(data.train_labels.cpu().numpy(), data.num_classes, TRAIN_SPLIT_SEED,
                              settings.train_subset)
    return len(train)


def forget_pool(settings: Settings, dataset: str) -> tuple[int, ...] | None:
    """The classes the class-wise cells draw from, one per seed (scenarios/classwise.py), or None when
    `settings.forget_class` fixes one class for every seed. UserError when the pool is empty or leaves the dataset."""
    if settings.forget_class is not None:
        check_classes(dataset, [settings.forget_class], "--forget_class")
        return None
    count = num_classes_of(dataset)
    if settings.forget_classes is not None:
        check_classes(dataset, settings.forget_classes, "--forget_classes")
        return tuple(sorted(set(settings.forget_classes)))
    pool = class_pool(count, settings.reserved_classes)
    if not pool:
        raise UserError(f"{dataset}: no class is left for class-wise forgetting once the tuning classes "
                        f"({' '.join(map(str, settings.reserved_classes))}) are set aside; pass --forget_classes")
    return pool


def check_classes(dataset: str, classes, flag: str) -> None:
    """One-line UserError unless `classes` is a non-empty list of distinct classes of `dataset`."""
    classes = list(classes)
    count = num_classes_of(dataset)
    if not classes:
        raise UserError(f"{flag}: give at least one class; {dataset} has classes 0-{count - 1}")
    outside = sorted(c for c in classes if not 0 <= c < count)
    if outside:
        raise UserError(f"{flag} {' '.join(map(str, outside))}: {dataset} has classes 0-{count - 1}")
    if len(set(classes)) != len(classes):
        raise UserError(f"{flag}: a value is given twice ({' '.join(map(str, classes))})")


def _reads_forget_class(scenario, settings: Settings, size: int) -> bool:
    """Whether a scenario's forget set follows the settings' forget class (class-wise forgetting does)."""
    return (scenario.forget_flags(dataclasses.replace(settings, forget_class=0), size)
            != scenario.forget_flags(dataclasses.replace(settings, forget_class=1), size))


def class_draw_note(seeds, pool: tuple[int, ...]) -> str:
    """The table's line saying which class each seed forgot."""
    drawn = ", ".join(f"seed {seed} -> class {forget_class_of(seed, pool)}" for seed in sorted(seeds))
    return (f"class-wise: one forgotten class per seed, seed s forgets the ((s - 1) mod {len(pool)})-th class of the "
            f"pool {' '.join(map(str, pool))}: {drawn}.")


def build_cells(settings: Settings) -> tuple[list[Cell], list[str]]:
    """All cells of the sweep in dependency order (references first), and notes for the table footnote."""
    out = settings.out
    notes: list[str] = []
    names = [n for n in match_methods(settings.methods) if n != "retrain"]
    if "retrain" in match_methods(settings.methods) and settings.methods != ["*"]:
        notes.append("retrain is not run as a method: the Retrain row is the Retrain reference model.")
    if not names:
        raise UserError("no method to run (the Retrain row comes with every table); pass --methods")
    grid_sources = [settings.grid] if settings.grid else []
    by_key: dict[str, Cell] = {}
    order: list[Cell] = []

    def add(cell: Cell) -> Cell:
        if cell.key in by_key:
            return by_key[cell.key]
        by_key[cell.key] = cell
        order.append(cell)
        return cell

    for dataset in settings.datasets:
        sources = []
        config_path = settings.config or default_config_path(dataset)
        if settings.config is not None or config_path.is_file():
            sources.append(load_settings_file(config_path, "hyper-parameter file"))
        sources += grid_sources
        size = train_size(dataset, settings)
        # The class pool matters (and is checked) only where a scenario's forget set is a class.
        pool = forget_pool(settings, dataset) \
            if any(_reads_forget_class(SCENARIOS[name], settings, size) for name in settings.scenarios) else None
        if pool is not None:
            note = class_draw_note(settings.seeds, pool)
            if note not in notes:
                notes.append(note)
        for arch, seed, scenario_name in itertools.product(settings.archs, settings.seeds, settings.scenarios):
            scenario = SCENARIOS[scenario_name]
            # Each seed is one independent replication: its original and Retrain models start from their own
            # initialisation (--train_seed = the seed; the single-run scripts keep upstream's 1) and, unless one class
            # is fixed, it forgets its own class of the pool.
            seed_settings = settings if pool is None else dataclasses.replace(settings,
                                                                              forget_class=forget_class_of(seed, pool))
            width = settings.width if settings.width is not None else \
                recipe_defaults(dataset, settings.train_subset).get("width")
            base = {"dataset": dataset, "arch": arch, "seed": seed, "train_seed": seed,
                    "data": _absolute(settings.data), "save_dir": _absolute(models_dir(settings, dataset, width)),
                    "epochs": settings.epochs,
                    "width": settings.width, "device": settings.device, "no_download": settings.no_download,
                    "train_subset": settings.train_subset, **scenario.forget_flags(seed_settings, size)}
            ref_args = parse_cell(to_argv({**base, "unlearn": "raw"}))
            setting = ref_args.data.forget_setting
            deps: list[str] = []
            # --forget_quality N: the Retrain row's cell also trains the N models retrained on this forget set's
            # retain set (with the sweep's --jobs: every method cell of the set waits for them), then each method
            # cell scores its N runs against them.
            quality = {"forget_quality": settings.forget_quality or None,
                       "jobs": settings.jobs if settings.forget_quality else None}
            if scenario.references:
                original = add(Cell("original", cell_key("original", ref_args), dataset, arch, scenario_name, seed,
                                    to_argv({**base, "unlearn": "raw"}),
                                    target=str(paths.original_model(ref_args.output.save_dir, ref_args.data,
                                                                     ref_args.model))))
                retrain = add(Cell("retrain", cell_key("retrain", ref_args), dataset, arch, scenario_name, seed,
                                   to_argv({**base, "unlearn": "retrain"}), setting=setting))
                reference_argv = to_argv({**base, "unlearn": "retrain", **quality})
                reference = add(Cell("reference", cell_key("reference", parse_cell(reference_argv)), dataset, arch,
                                     scenario_name, seed, reference_argv, names=["Retrain"], deps=[retrain.key],
                                     config="the Retrain reference model", label="Retrain", setting=setting))
                reference.target = str(reference.result_path(out))
                deps = [original.key, retrain.key] + ([reference.key] if settings.forget_quality else [])
            for name in names:
                method = resolve_method(name)
                family = method.cls.supports_grad_mask  # the masking family: bases that take gradient masks
                epoch_eval = settings.epoch_eval == "all" or (settings.epoch_eval == "masked" and family)
                for combo in method_combos(name, scenario_name, sources) or [{}]:
                    overrides = dict(combo)
                    if settings.unlearn_epochs is not None:
                        overrides["unlearn_epochs"] = settings.unlearn_epochs
                    # A trial on a plateau may end early (tuning), unless the method's epochs are a schedule's
                    # length (horizon-dependent) or it has no epochs (one-shot).
                    stops = bool(epoch_eval and settings.stop_patience and not method.cls.horizon_dependent
                                 and not method.cls.one_shot)
                    flags = {**base, "unlearn": name, **overrides, "no_epoch_eval": not epoch_eval,
                             "epoch_eval_metrics": settings.epoch_eval_metrics
                             if epoch_eval and settings.epoch_eval_metrics != "all" else None,
                             "stop_patience": settings.stop_patience if stops else None,
                             "stop_tolerance": settings.stop_tolerance if stops else None,
                             "forget_quality": settings.forget_quality or None}
                    args = parse_cell(to_argv(flags))
                    hp = dict(args.method.hp)
                    config = {"class": method.cls.name, "grad_mask": method.grad_mask, "hp": hp}
                    cell = add(Cell("method", cell_key("method", args, config), dataset, arch, scenario_name, seed,
                                    to_argv(flags), overrides=overrides, hp=hp, family=family,
                                    config=method.cls.name + (f" + {method.grad_mask}" if method.grad_mask else ""),
                                    deps=list(deps), setting=setting))
                    if name not in cell.names:
                        cell.names.append(name)
                    cell.target = str(cell.result_path(out))
    for cell in order:
        if cell.kind == "method":
            cell.names.sort(key=lambda n: (n in ALIASES, n.lower()))  # a registered method's own name first
            cell.argv[cell.argv.index("--unlearn") + 1] = cell.names[0]  # runs under the first name of its row
    _label_cells(order)
    for cell in order:
        if cell.kind == "method" and len(cell.names) > 1:
            note = f"{' = '.join(cell.names)}: same configuration ({cell.config}), run once."
            if note not in notes:
                notes.append(note)
    return order, notes


def _label_cells(cells: list[Cell]) -> None:
    """Row labels: the method name(s); hyper-parameters are added only where one method has several combinations."""
    combos: dict[tuple, set] = {}
    for cell in cells:
        if cell.kind == "method":
            combos.setdefault((cell.dataset, cell.arch, cell.scenario, cell.names[0]), set()).add(
                json.dumps(cell.overrides, sort_keys=True))
    for cell in cells:
        if cell.kind != "method":
            continue
        label = " = ".join(cell.names)
        if len(combos[(cell.dataset, cell.arch, cell.scenario, cell.names[0])]) > 1:
            label += " [" + ", ".join(f"{k}={v}" for k, v in sorted(cell.overrides.items())) + "]"
        cell.label = label


def read_cell_json(path: Path, required: tuple[str, ...] = ()) -> dict | None:
    """The JSON object in a cell file, or None when the file is missing, unreadable, not a JSON object, or lacks a
    required key. Writes are atomic, but a file copied half-way, a full disk outside our writes or a hand edit can
    still leave `{"UA": 1` or `{}` behind: such a file is no finished cell, it is computed again. So is any file that
    cannot be parsed at all: ValueError covers bad UTF-8, bad JSON and numbers too long to convert; RecursionError a
    file nested deeper than the parser's stack."""
    try:
        payload = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(payload, dict) or any(key not in payload for key in required):
        return None
    return payload


# Keys every result JSON has, whatever its scenario: the arguments it ran with and its unlearning time.
RESULT_KEYS = ("args", "RTE_seconds")


def read_result(cell: Cell, out: Path) -> dict | None:
    """The cell's result, or None when it has no complete one."""
    return read_cell_json(cell.result_path(out), RESULT_KEYS)


def is_done(cell: Cell, out: Path) -> bool:
    """Finished earlier: the reference model exists, or the cell's complete result (or its remembered failure) does."""
    if cell.kind == "retrain":
        if not cell.split_tag:
            return False
        run = parse_cell(cell.argv)
        if not paths.retrain_model(run.output.save_dir, run.data, run.model, cell.split_tag).is_file():
            return False
        # The cell's own rule (pipeline.stages.find_retrain_checkpoint): a Retrain file counts only when its recorded
        # training settings are this cell's full recipe; one of another recipe is trained again, never reused. The
        # check reads the data (for the retain set), on the CPU: nothing is trained or evaluated here.
        return find_retrain_checkpoint(prepare(dataclasses.replace(run, device="cpu"), announce=False)) is not None
    if cell.kind == "original":
        return Path(cell.target).is_file()
    if cell.kind == "method" and read_cell_json(cell.failure_path(out), ("error",)) is not None:
        return True
    return read_result(cell, out) is not None


def compute_split_tags(cells: list[Cell], settings: Settings) -> None:
    """The split tag of each Retrain cell (needs the data; cheap), so 'is it trained?' is a file check."""
    data_cache: dict[str, Any] = {}
    for cell in cells:
        if cell.kind != "retrain":
            continue
        d = parse_cell(cell.argv).data
        if d.dataset not in data_cache:
            data_cache[d.dataset] = load_dataset(d.dataset, d.root, download=d.download)
        split = make_split(data_cache[d.dataset], d.class_to_replace, d.num_indexes_to_replace, seed=d.seed,
                           split_mode=d.split_mode, train_subset=d.train_subset)
        cell.split_tag = split.tag
