"""The run pipeline: the typed configuration (validated before any work), hyper-parameters from the method
declarations, the stages composed by the entry scripts, and the shape of the import graph."""
import ast
import json
from pathlib import Path

import pytest

import mlflow_forget
from conftest import ROOT, TINY, run_main
from dataset import make_split
from utils import UserError, cli_main

ENTRY_SCRIPTS = ("main_baseline.py", "main_forget.py", "mlflow_forget.py", "main_backdoor.py", "benchmark.py")


# ---------------------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------------------

def config_of(*argv, script="main_forget.py"):
    from arg_parser import parse_config

    return parse_config(list(argv), script)


def test_config_is_typed_and_frozen(tmp_path):
    import dataclasses

    config = config_of("--dataset", "digits", "--save_dir", str(tmp_path), "--unlearn", "VarGrad",
                       "--class_to_replace", "-1", "--num_indexes_to_replace", "50", script="mlflow_forget.py")
    assert config.method.base == "NGPlus" and config.method.grad_mask == "prob" and config.method.label == "NGPlus+prob"
    assert config.data.scenario == "random" and config.data.forget_setting == "random50"
    assert config.model.epochs == 30 and config.model.width == 16  # the digits recipe fills what was left unset
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.data.seed = 3
    with pytest.raises(TypeError):
        config.method.hp["lr"] = 1.0
    assert not any(tmp_path.iterdir()), "validation must not write anything"


def test_paper_era_never_overrides_an_explicit_value(tmp_path):
    base = ("--dataset", "digits", "--save_dir", str(tmp_path), "--unlearn", "RL", "--paper_era")
    era = config_of(*base)
    assert era.data.split_mode == "upstream" and era.method.hp["rl_labels"] == "uniform"
    explicit = config_of(*base, "--rl_labels", "wrong", "--split", "consistent")
    assert explicit.data.split_mode == "consistent" and explicit.method.hp["rl_labels"] == "wrong"


def test_hyper_parameters_are_only_those_the_method_uses(tmp_path):
    from unlearn.registry import method_hparams, resolve_method

    for name in ("FT", "VarGrad", "SSD", "SalUn"):
        config = config_of("--dataset", "digits", "--save_dir", str(tmp_path), "--unlearn", name)
        declared = {hp.name for hp in method_hparams(resolve_method(name))}
        assert set(config.method.hp) - {"grad_mask"} == declared, name
    vargrad = config_of("--dataset", "digits", "--save_dir", str(tmp_path), "--unlearn", "VarGrad")
    assert "salun_ratio" not in vargrad.method.hp


BAD_INPUT = [
    (["--lr", "-0.1"], "--lr"), (["--lr", "0"], "--lr"), (["--momentum", "-1"], "--momentum"),
    (["--weight_decay", "-1"], "--weight_decay"), (["--warmup", "-1"], "--warmup"),
    (["--unlearn", "FT", "--unlearn_lr", "-1"], "unlearn_lr"), (["--unlearn", "FT", "--unlearn_lr", "0"], "unlearn_lr"),
    (["--unlearn", "SSD", "--ssd_lambda", "-1"], "ssd_lambda"),
    (["--unlearn", "SalUn", "--salun_ratio", "0"], "salun_ratio"),
    (["--unlearn", "NoSuch"], "NoSuch"), (["--class_to_replace", "10"], "class_to_replace"),
    (["--unlearn", "VarGrad", "--quantile", "1.5"], "quantile"),
    # The plateau stop (evaluation.selection.PlateauStop, tests/test_plateau.py)
    (["--unlearn", "NGPlus", "--stop-patience", "-1"], "--stop-patience"),
    (["--unlearn", "NGPlus", "--stop-patience", "2", "--stop-tolerance", "-0.5"], "--stop-tolerance"),
    (["--unlearn", "NGPlus", "--stop-patience", "2", "--stop-tolerance", "101"], "--stop-tolerance"),
    (["--unlearn", "NGPlus", "--stop-tolerance", "0.5"], "--stop-patience"),
    (["--unlearn", "NGPlus", "--stop-patience", "2", "--no-epoch-eval"], "--no-epoch-eval"),
    (["--unlearn", "FT_l1", "--stop-patience", "2"], "horizon-dependent"),
]


@pytest.mark.parametrize("extra,named", BAD_INPUT, ids=[" ".join(a) for a, _ in BAD_INPUT])
def test_bad_input_is_one_line_exit_2_before_any_work(tmp_path, extra, named):
    save = tmp_path / "out"
    result = run_main("mlflow_forget.py", *TINY, "--save_dir", str(save), "--no-track", *extra)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0], result.stderr
    assert not save.exists(), "nothing may be written before the input is checked"


def test_result_json_under_a_file_is_refused_before_training(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    save = tmp_path / "out"
    result = run_main("mlflow_forget.py", *TINY, "--save_dir", str(save), "--no-track", "--unlearn", "FT",
                      "--result_json", str(blocker / "r.json"))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not save.exists()
    result = run_main("main_baseline.py", *TINY, "--save_dir", str(blocker / "sub"))
    assert result.returncode == 2 and "is a file" in result.stderr


def test_a_forget_set_of_the_whole_training_set_is_refused_up_front(tmp_path, digits):
    from dataset import make_split

    train_size = len(make_split(digits, 0, None, seed=1).train)
    save = tmp_path / "out"
    result = run_main("mlflow_forget.py", *TINY, "--save_dir", str(save), "--no-track", "--unlearn", "FT",
                      "--class_to_replace", "-1", "--num_indexes_to_replace", str(train_size))
    assert result.returncode == 2 and "no retain set" in result.stderr, result.stderr
    assert not save.exists()


# ---------------------------------------------------------------------------------------------------------------------
# One source of truth: a new method with a new hyper-parameter touches one file
# ---------------------------------------------------------------------------------------------------------------------

@pytest.fixture
def toy_method():
    """A method registered by the test, with a hyper-parameter no other method has; removed afterwards."""
    import torch

    from unlearn import METHODS
    from unlearn.hparams import HParam
    from unlearn.registry import UnlearnMethod, register_method

    class ShrinkWeights(UnlearnMethod):
        name = "ToyShrink"
        summary = "test method: multiply every weight by --toy_factor once"
        one_shot = True
        hparams = (HParam("toy_factor", float, 0.5, "factor applied to every weight", low=0, high=1,
                          low_open=True),)

        def run_epoch(self, epoch):
            with torch.no_grad():
                for p in self.model.parameters():
                    p.mul_(self.hp["toy_factor"])
            return {}

    register_method(ShrinkWeights)
    yield ShrinkWeights
    del METHODS["ToyShrink"]


def test_a_new_hyper_parameter_reaches_the_cli_and_the_result(tmp_path, toy_method, capsys):
    import main_baseline
    import main_forget
    from arg_parser import build_parser

    assert "--toy_factor" in build_parser("main_forget.py").format_help()
    assert main_baseline.main([*TINY, "--save_dir", str(tmp_path)]) == 0
    model = next(tmp_path.glob("*model_SA_best.pth.tar"))
    assert main_forget.main([*TINY, "--save_dir", str(tmp_path), "--mask", str(model), "--unlearn", "ToyShrink",
                             "--toy_factor", "0.25"]) == 0
    result = json.loads((tmp_path / "ToyShrinkeval_result.json").read_text())
    assert result["hyperparameters"] == {"toy_factor": 0.25}
    assert result["args"]["toy_factor"] == 0.25
    from utils import UserError

    with pytest.raises(UserError, match="toy_factor"):
        main_forget.main([*TINY, "--save_dir", str(tmp_path), "--mask", str(model), "--unlearn", "ToyShrink",
                          "--toy_factor", "2"])


# ---------------------------------------------------------------------------------------------------------------------
# Structure: data flows one way
# ---------------------------------------------------------------------------------------------------------------------

def project_modules() -> dict[str, Path]:
    modules = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in (".venv", "tests", ".git") or rel.parts[0].startswith("."):
            continue
        name = ".".join(rel.with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path
    return modules


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Project modules imported anywhere in the file (also inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def test_no_import_cycles_and_no_entry_script_imports_another():
    modules = project_modules()
    known = set(modules)
    graph = {name: imports_of(path, known) - {name} for name, path in modules.items()}
    for name, deps in graph.items():
        packages = {n for n in deps if name.startswith(n + ".")}  # a submodule importing its own package is fine
        graph[name] = deps - packages
    entry = {s.removesuffix(".py") for s in ENTRY_SCRIPTS}
    for name, deps in graph.items():
        assert not deps & entry, f"{name} imports entry script(s) {deps & entry}"
    # Cycles between top-level units (a package counts as one unit, so its own submodules may import each other).
    unit = {name: name.split(".")[0] for name in graph}
    edges = {u: set() for u in set(unit.values())}
    for name, deps in graph.items():
        edges[unit[name]] |= {unit[d] for d in deps if unit[d] != unit[name]}
    state: dict[str, int] = {}

    def visit(node, trail):
        state[node] = 1
        for nxt in edges[node]:
            assert state.get(nxt) != 1, f"import cycle: {' -> '.join(trail + [node, nxt])}"
            if nxt not in state:
                visit(nxt, trail + [node])
        state[node] = 2

    for node in edges:
        if node not in state:
            visit(node, [])
    # And between modules, inside a package too (imports inside functions count: a function-level import that dodges
    # a circle is still a circle). A package's __init__ importing its submodules is the one allowed direction.
    assert not module_cycles(graph), f"import cycles between modules: {module_cycles(graph)}"


def module_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each a set of modules importing each
    other in a circle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return cycles


def test_the_cycle_check_finds_a_circle_inside_a_package():
    graph = {"sweep": {"sweep.a"}, "sweep.a": {"sweep.b", "utils"}, "sweep.b": {"sweep.c"}, "sweep.c": {"sweep.a"},
             "utils": set()}
    assert module_cycles(graph) == [["sweep.a", "sweep.b", "sweep.c"]]
    graph["sweep.c"] = {"utils"}
    assert module_cycles(graph) == []


def test_lower_layers_know_nothing_of_argparse_or_mlflow():
    modules = project_modules()
    for name, path in modules.items():
        if name.split(".")[0] in ("models", "unlearn", "evaluation", "pipeline", "dataset", "training", "scenarios"):
            tree = ast.parse(path.read_text())
            imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
            imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
            assert "mlflow" not in imported, name
            if name.split(".")[0] != "arg_parser":
                assert "argparse" not in imported, name


# ---------------------------------------------------------------------------------------------------------------------
# Flags that used to fail only after training: one line, exit 2, nothing trained
# ---------------------------------------------------------------------------------------------------------------------

def _refused_before_any_work(tmp_path, capsys, *extra) -> str:
    """mlflow_forget.py in process, as `utils.cli_main` runs it: exit 2, one line on stderr, no model file anywhere."""
    save = tmp_path / "out"
    argv = [*TINY, "--save_dir", str(save), "--no-track", *extra]
    with pytest.raises(SystemExit) as info:
        cli_main(lambda: mlflow_forget.main(argv))
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert not list(tmp_path.rglob("*.pth.tar")) and not list(tmp_path.rglob("*.pt")), "nothing may be trained"
    assert not save.exists() or not any(save.iterdir())
    return lines[0]


def test_salun_mask_path_under_a_regular_file_is_refused_before_training(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    line = _refused_before_any_work(tmp_path, capsys, "--unlearn", "SalUn", "--class_to_replace", "-1",
                                    "--num_indexes_to_replace", "50", "--mask_path", str(blocker / "mask.pt"))
    assert "--mask_path" in line and "is a file" in line


def test_mask_naming_a_directory_is_refused_before_training(tmp_path, capsys):
    folder = tmp_path / "models"
    folder.mkdir()
    line = _refused_before_any_work(tmp_path, capsys, "--unlearn", "FT", "--class_to_replace", "-1",
                                    "--num_indexes_to_replace", "50", "--mask", str(folder))
    assert "--mask" in line and "is a directory" in line
    with pytest.raises(UserError, match="is a directory"):  # main_forget.py reads --mask: the same one line
        config_of(*TINY, "--save_dir", str(tmp_path / "out"), "--unlearn", "FT", "--class_to_replace", "-1",
                  "--num_indexes_to_replace", "50", "--mask", str(folder))


@pytest.mark.parametrize("mia,count,needed", [("lira", 1, 3), ("ulira", 2, 3), ("all", 2, 3), ("rmia", 1, 2)])
def test_too_few_reference_models_are_refused_before_training(tmp_path, capsys, mia, count, needed):
    line = _refused_before_any_work(tmp_path, capsys, "--unlearn", "FT", "--class_to_replace", "-1",
                                    "--num_indexes_to_replace", "50", "--mia", mia, "--num_ref_models", str(count))
    assert f"--num_ref_models >= {needed}" in line and f"got {count}" in line


def test_enough_reference_models_pass_the_check(tmp_path):
    for mia, count in (("lira", 3), ("rmia", 2), ("svc", 1)):
        config = config_of(*TINY, "--save_dir", str(tmp_path), "--mia", mia, "--num_ref_models", str(count),
                           "--class_to_replace", "-1", "--num_indexes_to_replace", "50", script="mlflow_forget.py")
        assert config.eval.num_ref_models == count


def test_a_retain_set_of_one_sample_is_refused_before_training(tmp_path, capsys, digits):
    train_size = len(make_split(digits, 0, None, seed=1).train)
    line = _refused_before_any_work(tmp_path, capsys, "--unlearn", "FT", "--class_to_replace", "-1",
                                    "--num_indexes_to_replace", str(train_size - 1))
    assert "leaves 1 retain sample" in line and f"up to {train_size - 2}" in line


def test_attacks_on_a_forget_set_outside_the_training_split_are_refused_before_training(tmp_path, capsys):
    line = _refused_before_any_work(tmp_path, capsys, "--unlearn", "FT", "--class_to_replace", "-1",
                                    "--num_indexes_to_replace", "50", "--seed", "3", "--split", "upstream",
                                    "--mia", "rmia")
    assert "forget set inside the original model's training split" in line
