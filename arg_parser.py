"""The command line of every entry script, parsed once into a typed, validated `pipeline.config.RunConfig`.

Flag names and defaults follow Unlearn-Sparse / SalUn and the paper's fork, so the original commands work unchanged.
The unlearning hyper-parameter flags are not written here: they are generated from the declarations of the registered
methods (`unlearn.registry.declared_flags`), with their types and choices; their ranges are checked per method when the
configuration is resolved. Every check runs before any data is loaded, model trained or file written.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from dataset import check_train_subset, list_datasets, num_classes_of, recipe_defaults
from evaluation.forget_quality import check_num_models
from evaluation.per_example_mia import check_num_ref_models
from models import list_models
from pipeline.config import (
    DataConfig,
    EvalConfig,
    MethodConfig,
    ModelConfig,
    OutputConfig,
    RunConfig,
    TrackingConfig,
    frozen,
)
from training import parse_milestones
from unlearn import ALIASES, METHODS, list_methods, resolve_hyperparameters, resolve_method
from unlearn.masks import MASK_MODES
from unlearn.registry import declared_flags
from utils import UserError, check_output_path, resolve_device

FORGET_SCRIPTS = ("mlflow_forget.py", "main_backdoor.py")  # scripts with the output and tracking flags
EPOCH_EVAL_METRICS = ("all", "selection")  # mlflow_forget.py --epoch-eval-metrics (pipeline.stages.unlearn)
SCRIPTS = ("main_baseline.py", "main_forget.py", *FORGET_SCRIPTS)


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (what is wrong, what is allowed) and exit status 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message}\n")


# ---------------------------------------------------------------------------------------------------------------------
# Typed values: argparse reports a failed conversion in one line with the flag's name
# ---------------------------------------------------------------------------------------------------------------------

def number(kind: type, low: float | None = None, high: float | None = None, low_open: bool = False,
           high_open: bool = False) -> Callable[[str], Any]:
    """A converter for argparse: `kind` (int or float) within the interval, else a one-line error saying what is
    allowed."""
    what = "an integer" if kind is int else "a number"
    if low is not None and high is None:
        allowed = ("a positive integer" if kind is int and low == 1 and not low_open else
                   f"{what} {'>' if low_open else '>='} {low:g}")
    elif low is None and high is None:
        allowed = what
    else:
        allowed = (f"{what} in {'(' if low_open else '['}{'-inf' if low is None else f'{low:g}'}, "
                   f"{'inf' if high is None else f'{high:g}'}{')' if high_open else ']'}")

    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not {what}") from None
        if kind is float and value != value:  # NaN
            raise argparse.ArgumentTypeError(f"'{text}' is not allowed; allowed: {allowed}")
        below = low is not None and (value <= low if low_open else value < low)
        above = high is not None and (value >= high if high_open else value > high)
        if below or above:
            raise argparse.ArgumentTypeError(f"{text} is out of range; allowed: {allowed}")
        return value

    convert.__name__ = kind.__name__  # argparse names the type in its messages
    return convert


POSITIVE_INT = number(int, 1)
POSITIVE = number(float, 0, low_open=True)
NON_NEGATIVE = number(float, 0)
NON_NEGATIVE_INT = number(int, 0)
SCORE_POINTS = number(float, 0, 100)  # a difference of selection scores, in accuracy points


def forget_quality_models(text: str) -> int:
    """--forget_quality N (run scripts and benchmark): 0 (off) or a model count the score accepts."""
    value = NON_NEGATIVE_INT(text)
    if value:
        try:
            check_num_models(value)
        except UserError as exc:
            raise argparse.ArgumentTypeError(f"{exc}; allowed: 0 (off) or N >= 3") from None
    return value


def _milestones(text: str) -> str:
    try:
        parse_milestones(text)
    except UserError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--decreasing_lr ")) from None
    return text


# ---------------------------------------------------------------------------------------------------------------------
# The parser
# ---------------------------------------------------------------------------------------------------------------------

def add_method_flags(group: argparse._ArgumentGroup) -> None:
    """One flag per declared hyper-parameter (recipe-shared ones are the training flags above)."""
    for flag, hp in sorted(declared_flags().items()):
        if hp.recipe:
            continue
        group.add_argument(*hp.options, dest=flag, type=number(hp.kind) if hp.kind in (int, float) else hp.kind,
                           choices=hp.choices, default=None, help=f"{hp.help} (default: the method's own)")


class ListMethods(argparse.Action):
    """`--list-methods`: like --help, print and exit before anything else is checked."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, nargs=0, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(method_listing())
        parser.exit(0)


def build_parser(script: str = "main_forget.py", description: str = "") -> OneLineErrorParser:
    if script not in SCRIPTS:
        raise ValueError(f"unknown script {script}")
    p = OneLineErrorParser(description=description, prog=script, formatter_class=argparse.RawDescriptionHelpFormatter)

    g = p.add_argument_group("data")
    g.add_argument("--data", default="../data",
                   help="dataset root (torchvision layout; CIFAR/SVHN/Fashion-MNIST downloaded when online; "
                        "fashion_mnist also reads a flat folder of its four .gz files)")
    g.add_argument("--dataset", default="cifar10", choices=list_datasets(), help="dataset (default cifar10)")
    g.add_argument("--num_classes", type=int, default=None,
                   help="derived from the dataset; an explicit value must agree with it")
    g.add_argument("--batch_size", type=POSITIVE_INT, default=None, help="batch size of every loader (256; digits 64)")
    g.add_argument("--no-aug", dest="no_aug", action="store_true", help="no train-time augmentation (crop/flip)")
    g.add_argument("--no-download", dest="no_download", action="store_true", help="never try to download data")
    g.add_argument("--train_subset", type=POSITIVE_INT, default=None, metavar="N",
                   help="train and validate on a stratified subset of N training images, the same for every seed "
                        "(fashion_mnist, cifar10, cifar100, svhn; recorded in the split file and its tag)")
    g.add_argument("--split", default=None, choices=["consistent", "upstream"],
                   help="consistent (default): forget/retain always inside the original model's training set; "
                        "upstream: the Unlearn-Sparse split-seed quirk (the default under --paper_era)")
    g.add_argument("--workers", "--num_workers", dest="workers", type=int, default=0,
                   help="accepted for compatibility; data is served from memory without worker processes")

    g = p.add_argument_group("forget set")
    g.add_argument("--class_to_replace", type=number(int), default=0,
                   help="class to forget from; -1 = random across classes (default 0 as in the paper's fork)")
    g.add_argument("--num_indexes_to_replace", type=POSITIVE_INT, default=None,
                   help="forget-set size; omitted with a class = the whole class (class-wise forgetting)")

    g = p.add_argument_group("model and training")
    g.add_argument("--arch", default="resnet18", choices=list_models(), help="architecture (default resnet18)")
    g.add_argument("--width", type=POSITIVE_INT, default=None,
                   help="base width (default: the architecture's own; 16 on digits)")
    g.add_argument("--seed", type=POSITIVE_INT, default=2, help="global seed (default 2); the forget set is drawn with "
                                                                "seed - 1")
    g.add_argument("--train_seed", type=number(int), default=1, help="seed of the model initialisation, shared by "
                                                                     "Retrain (default 1)")
    g.add_argument("--epochs", type=POSITIVE_INT, default=None, help="training epochs (182; digits 30)")
    g.add_argument("--lr", type=POSITIVE, default=None, help="training learning rate (0.1; digits 0.05)")
    g.add_argument("--momentum", type=number(float, 0, 1, high_open=True), default=0.9,
                   help="SGD momentum of training and of the SGD unlearning methods (default 0.9)")
    g.add_argument("--weight_decay", type=NON_NEGATIVE, default=5e-4,
                   help="SGD weight decay of training and of the SGD unlearning methods (default 5e-4)")
    g.add_argument("--decreasing_lr", type=_milestones, default=None,
                   help="MultiStepLR milestones, gamma 0.1 (91,136; digits 20,25)")
    g.add_argument("--warmup", type=number(int, 0), default=0, help="linear warm-up epochs (default 0)")
    g.add_argument("--save_dir", default="./results", help="output directory (default ./results)")
    g.add_argument("--resume", action="store_true",
                   help="continue an interrupted training run (refused when its recorded settings differ)")
    g.add_argument("--retrain", action="store_true",
                   help="main_baseline.py: train the Retrain reference on the retain set")
    g.add_argument("--device", default="auto", help="auto (CUDA when available, else CPU), cpu, cuda, cuda:N")
    g.add_argument("--gpu", type=number(int, 0), default=None, help="CUDA device index (upstream flag); same as "
                                                                    "--device cuda:N")
    g.add_argument("--threads", type=POSITIVE_INT, default=None,
                   help="CPU threads of this run (torch.set_num_threads; default: torch's own choice). The thread "
                        "count changes the order of floating-point sums, hence the numbers: benchmark.py runs every "
                        "cell with --threads 1, wherever it runs")
    g.add_argument("--amp", default="off", choices=["off", "bf16"],
                   help="mixed precision: bf16 autocast for training, unlearning and evaluation (default off)")
    g.add_argument("--no-progress", dest="no_progress", action="store_true", help="hide tqdm progress bars")

    g = p.add_argument_group("unlearning (hyper-parameter flags left unset take the method's default; "
                             "see docs/methods.md)")
    g.add_argument("--mask", "--model_path", dest="mask", default=None,
                   help="checkpoint of the model to unlearn (upstream name --mask; SalUn's --model_path)")
    g.add_argument("--unlearn", default="retrain", help="unlearning method (see --list-methods)")
    g.add_argument("--grad_mask", default=None, choices=list(MASK_MODES),
                   help="gradient-mask add-on applied to a bi-objective base")
    g.add_argument("--unlearn_seed", type=number(int), default=None,
                   help="seed of the unlearning run (default: --seed)")
    g.add_argument("--paper_era", action="store_true",
                   help="paper-era (upstream bug-compatible) behaviour: the values of --split and of the method's "
                        "switches that reproduce upstream, unless given explicitly")
    g.add_argument("--list-methods", action=ListMethods, help="print the registered methods and exit")
    add_method_flags(g)

    g = p.add_argument_group("evaluation")
    g.add_argument("--mia", default="svc", choices=["svc", "lira", "rmia", "ulira", "all"],
                   help="membership inference attacks to run in addition to upstream's SVC (default svc)")
    g.add_argument("--num_ref_models", type=POSITIVE_INT, default=8, help="reference models of the per-example attacks")
    g.add_argument("--jobs", type=POSITIVE_INT, default=1, help="parallel worker processes (default 1)")
    g.add_argument("--forget_quality", type=forget_quality_models, default=0, metavar="N",
                   help="forgetting quality as the NeurIPS 2023 unlearning competition scores it: N unlearning runs "
                        "against N retrained models (N >= 3; 0 = off, the default)")

    if script in FORGET_SCRIPTS:
        g = p.add_argument_group("tracking and outputs")
        g.add_argument("--track", action=argparse.BooleanOptionalAction,
                       default=None if script == "main_backdoor.py" else True,
                       help="log to mlflow (MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory)"
                            + ("; default: only when MLFLOW_TRACKING_URI is set"
                               if script == "main_backdoor.py" else ""))
        g.add_argument("--experiment", default=None, help="mlflow experiment (default: '<dataset>-<scenario>')")
        g.add_argument("--run_name", default=None,
                       help="mlflow run name (default: '<method>-<forget setting>-seed<seed>')")
        g.add_argument("--parent_run_id", default=None, help="nest the run under this mlflow run (a benchmark sweep)")
        g.add_argument("--result_json", default=None,
                       help="where to write the result JSON (default: a name in --save_dir)")
        g.add_argument("--no-save-model", dest="no_save_model", action="store_true",
                       help="do not write the unlearned checkpoint (benchmark cells keep only their result JSON)")
        g.add_argument("--no-epoch-eval", dest="no_epoch_eval", action="store_true",
                       help="evaluate only after the last unlearning epoch (no per-epoch curves)")
        if script == "mlflow_forget.py":
            g.add_argument("--epoch-eval-metrics", dest="epoch_eval_metrics", default="all",
                           choices=EPOCH_EVAL_METRICS,
                           help="what each per-epoch evaluation computes: all = every metric of the result (default); "
                                "selection = only what benchmark.py --tune selects by, from the training pool (UA, RA, "
                                "VA, MIA_efficacy_val, val_gap; no test-set output, and faster)")
            g.add_argument("--stop-patience", dest="stop_patience", type=NON_NEGATIVE_INT, default=0,
                           help="end the run once no selection score (validation gap to Retrain, Retrain-free "
                                "score; evaluation/selection.py) has improved by more than --stop-tolerance for this "
                                "many epochs (default 0: run every epoch; benchmark.py --tune's trials use it)")
            g.add_argument("--stop-tolerance", dest="stop_tolerance", type=SCORE_POINTS, default=0.0,
                           help="improvement, in accuracy points, that restarts --stop-patience's count (default 0)")
        g.add_argument("--no-plots", dest="no_plots", action="store_true", help="do not draw plots")
    if script == "main_backdoor.py":
        g = p.add_argument_group("backdoor")
        g.add_argument("--trigger_size", type=POSITIVE_INT, default=None,
                       help="side of the black trigger square (default: 4 on 32x32, 2 on 8x8)")
    return p


# ---------------------------------------------------------------------------------------------------------------------
# Namespace -> RunConfig, with every check that needs several flags together
# ---------------------------------------------------------------------------------------------------------------------

def _checked(path: str, flag: str, directory: bool) -> Path:
    """The path, once utils.check_output_path found it writable (nothing is created before the work starts)."""
    check_output_path(path, flag, directory)
    return Path(path).expanduser()


def _method_flags() -> list[str]:
    return [flag for flag, hp in declared_flags().items() if not hp.recipe]


def build_config(ns: argparse.Namespace, script: str) -> RunConfig:
    """Resolve and validate everything the namespace asks for; the namespace goes no further than this function."""
    values = dict(vars(ns))
    derived = num_classes_of(values["dataset"])
    if values["num_classes"] is not None and values["num_classes"] != derived:
        raise UserError(f"--num_classes {values['num_classes']} disagrees with --dataset {values['dataset']}, "
                        f"which has {derived} classes (omit --num_classes)")
    values["num_classes"] = derived
    check_train_subset(values["dataset"], values["train_subset"])
    for key, value in recipe_defaults(values["dataset"], values["train_subset"]).items():  # fills what was left unset
        if values.get(key) is None:
            values[key] = value
    lowest_class = 0 if script == "main_backdoor.py" else -1  # the backdoor's class is the target label
    if not lowest_class <= values["class_to_replace"] < derived:
        what = "" if lowest_class == -1 else " (the backdoor target label)"
        allowed = "-1 (any class) or " if lowest_class == -1 else ""
        raise UserError(f"--class_to_replace {values['class_to_replace']}{what} is out of range; allowed: {allowed}"
                        f"0..{derived - 1} for {values['dataset']}")
    if script == "main_backdoor.py" and values["num_indexes_to_replace"] is None:
        raise UserError("--num_indexes_to_replace (the number of poisoned training samples) is required, e.g. 10 % of "
                        "the training set (4500 on CIFAR-10)")
    if values["class_to_replace"] == -1 and values["num_indexes_to_replace"] is None and \
            not (script == "main_baseline.py" and not values["retrain"]):
        raise UserError("--num_indexes_to_replace is required with --class_to_replace -1 (random forgetting)")
    if values["unlearn_seed"] is None:
        values["unlearn_seed"] = values["seed"]
    if values["gpu"] is not None and values["device"] == "auto":
        values["device"] = f"cuda:{values['gpu']}"
    resolve_device(values["device"])
    paper_era = bool(values["paper_era"])
    if values["split"] is None:
        values["split"] = "upstream" if paper_era else "consistent"
    if script == "main_backdoor.py" and values["split"] != "consistent":
        print("note: the backdoor experiment always uses the consistent split (the poisoned model is trained here on "
              "exactly retain + poisoned samples); --split upstream is ignored")
        values["split"] = "consistent"

    model = ModelConfig(arch=values["arch"], width=values["width"], train_seed=values["train_seed"],
                        epochs=values["epochs"], lr=values["lr"], momentum=values["momentum"],
                        weight_decay=values["weight_decay"], decreasing_lr=values["decreasing_lr"],
                        warmup=values["warmup"], batch_size=values["batch_size"], amp=values["amp"])
    resolved = resolve_method(values["unlearn"], values["grad_mask"])
    explicit = {flag: values.get(flag) for flag in _method_flags() if values.get(flag) is not None}
    hp = resolve_hyperparameters(resolved, explicit, dataset=values["dataset"], paper_era=paper_era,
                                 recipe=model.recipe_values())
    method = MethodConfig(name=values["unlearn"], label=resolved.label, base=resolved.cls.name,
                          grad_mask=resolved.grad_mask, hp=frozen(hp), explicit=frozen(explicit),
                          unlearn_seed=values["unlearn_seed"], paper_era=paper_era, model_path=values["mask"])
    data = DataConfig(dataset=values["dataset"], root=values["data"], num_classes=derived,
                      batch_size=values["batch_size"], augment=not values["no_aug"], download=not values["no_download"],
                      split_mode=values["split"], class_to_replace=values["class_to_replace"],
                      num_indexes_to_replace=values["num_indexes_to_replace"], seed=values["seed"],
                      train_subset=values["train_subset"])
    forget_script = script in FORGET_SCRIPTS
    save_dir = _checked(values["save_dir"], "--save_dir", directory=True)
    result_json = values.get("result_json")
    if result_json is not None:
        result_json = _checked(result_json, "--result_json", directory=False)
    if script == "main_forget.py":
        target = Path(values["mask"]) if values["mask"] else None
        if target is not None and target.is_dir():
            raise UserError(f"--mask '{target}' is a directory; pass the original model's checkpoint file")
        if target is not None and not target.is_file():
            raise UserError(f"--mask '{target}' does not exist; allowed: an original model checkpoint "
                            f"(main_baseline.py writes one; mlflow_forget.py trains it when missing)")
    elif forget_script and values["mask"] and not Path(values["mask"]).is_file():
        # trained into --mask when missing: the path must take a file, known now rather than after the training
        check_output_path(values["mask"], "--mask", directory=False)
    mask_path = hp.get("mask_path")
    if mask_path and getattr(resolved.cls, "computes_missing_mask", False) and not Path(mask_path).is_file():
        # the method computes the missing mask file and writes it there after its Retrain and original models
        check_output_path(mask_path, "--mask_path", directory=False)
    check_num_ref_models(values["mia"], values["num_ref_models"])
    output = OutputConfig(save_dir=save_dir, result_json=result_json,
                          save_model=not values.get("no_save_model", False), plots=not values.get("no_plots", False),
                          progress=not values["no_progress"], resume=values["resume"])
    track = values.get("track")
    if track is None:  # main_backdoor.py: tracked only when a tracking server is configured
        track = bool(os.environ.get("MLFLOW_TRACKING_URI")) if forget_script else False
    tracking = TrackingConfig(enabled=bool(track), experiment=values.get("experiment"),
                              run_name=values.get("run_name"), parent_run_id=values.get("parent_run_id"))
    epoch_eval_metrics = values.get("epoch_eval_metrics", "all")
    if epoch_eval_metrics != "all" and values.get("no_epoch_eval"):
        raise UserError(f"--epoch-eval-metrics {epoch_eval_metrics} sets what the per-epoch evaluation computes; "
                        f"it cannot be combined with --no-epoch-eval")
    stop_patience, stop_tolerance = values.get("stop_patience", 0), values.get("stop_tolerance", 0.0)
    if stop_patience and values.get("no_epoch_eval"):
        raise UserError(f"--stop-patience {stop_patience} reads the per-epoch evaluation; it cannot be combined with "
                        f"--no-epoch-eval")
    if stop_patience and resolved.cls.horizon_dependent:
        raise UserError(f"--stop-patience: {resolved.name} is horizon-dependent (its updates depend on the total "
                        f"number of epochs), so a run stopped early is not the run of that length; give it "
                        f"--unlearn_epochs")
    if stop_tolerance and not stop_patience:
        raise UserError(f"--stop-tolerance {stop_tolerance:g} needs --stop-patience N (N >= 1)")
    evaluation = EvalConfig(mia=values["mia"], num_ref_models=values["num_ref_models"], jobs=values["jobs"],
                            epoch_eval=forget_script and not values.get("no_epoch_eval", False),
                            epoch_eval_metrics=epoch_eval_metrics, stop_patience=stop_patience,
                            stop_tolerance=stop_tolerance, forget_quality=values["forget_quality"])
    extras = {"retrain": values["retrain"]}
    if script == "main_backdoor.py":
        extras["trigger_size"] = values["trigger_size"]
    return RunConfig(script=script, device=values["device"], data=data, model=model, method=method, eval=evaluation,
                     output=output, tracking=tracking, flags=frozen(values), extras=frozen(extras))


def parse_config(argv: Sequence[str] | None = None, script: str = "main_forget.py", description: str = "") -> RunConfig:
    """Parse and resolve one command line. Usage errors exit 2 with one line (argparse); a bad combination raises
    UserError (one line, exit 2 through `utils.cli_main`)."""
    parser = build_parser(script, description)
    ns = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    return build_config(ns, script)


def method_listing() -> str:
    """`--list-methods`: every registered name; an alias shows what it stands for."""
    lines = []
    for name in list_methods():
        if name in ALIASES:
            alias = ALIASES[name]
            target = alias.base + (f" + {alias.grad_mask}" if alias.grad_mask else "")
            lines.append(f"{name:18s} = {target}  {alias.summary}")
        else:
            lines.append(f"{name:18s} {METHODS[name].summary}")
    return "\n".join(lines)
