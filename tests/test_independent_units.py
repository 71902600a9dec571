"""Each benchmark seed is one independent replication: its models start from their own initialisation (--train_seed =
the seed, recorded in the result and the tuned file) and, class-wise, it forgets its own class, drawn by a fixed rule
from the classes nobody tuned on. The single-run scripts keep upstream's --train_seed 1 and file names."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from arg_parser import parse_config
from pipeline import paths
from scenarios.classwise import RESERVED_CLASSES, class_pool, forget_class_of
from sweep import Settings, build_cells
from sweep.grid import cell_key, parse_cell
from sweep.tune import DEFAULT_EVAL_SEEDS, DEFAULT_TUNE_CLASSES, evaluation_cells, provenance, replication_units
from utils import UserError

POOL = (0, 1, 2, 4, 5, 6, 7, 8, 9)  # a 10-class dataset without the tuning class 3


def _settings(tmp_path: Path, **changes) -> Settings:
    values = {"datasets": ["digits"], "archs": ["resnet18"], "scenarios": ["random", "classwise"], "methods": ["GA"],
              "seeds": [1, 2, 3], "out": tmp_path / "out", "epochs": 2, "width": 4, **changes}
    return Settings(**values)


def _flag(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


# ---------------------------------------------------------------------------------------------------------------------
# The draw rule, by hand
# ---------------------------------------------------------------------------------------------------------------------

def test_class_pool_leaves_out_the_tuning_classes():
    assert RESERVED_CLASSES == DEFAULT_TUNE_CLASSES == (3,)
    assert class_pool(10) == POOL
    assert class_pool(4, (0, 9)) == (1, 2, 3)
    assert class_pool(2, (0, 1)) == ()


def test_seed_s_forgets_the_s_th_pool_class_in_rotation():
    assert [forget_class_of(seed, POOL) for seed in range(1, 11)] == [0, 1, 2, 4, 5, 6, 7, 8, 9, 0]
    assert forget_class_of(101, POOL) == POOL[100 % 9] == 1
    assert forget_class_of(2, (9, 4, 4)) == 9  # the pool's order and repeats do not matter: sorted, distinct
    with pytest.raises(ValueError, match="empty"):
        forget_class_of(1, ())


# ---------------------------------------------------------------------------------------------------------------------
# The plain benchmark's cells
# ---------------------------------------------------------------------------------------------------------------------

def test_every_cell_initialises_its_models_from_its_seed(tmp_path):
    cells, _ = build_cells(_settings(tmp_path))
    assert cells
    for cell in cells:
        assert _flag(cell.argv, "--train_seed") == str(cell.seed), cell.argv
        run = parse_cell(cell.argv)
        assert run.model.train_seed == cell.seed and run.args_record()["train_seed"] == cell.seed  # the result's args
    originals = [c for c in cells if c.kind == "original"]
    assert [c.seed for c in originals] == [1, 2, 3]
    assert len({c.key for c in originals}) == 3 and len({c.target for c in originals}) == 3
    assert [Path(c.target).name for c in originals] == ["1resnet18_ep2model_SA_best.pth.tar",
                                                        "2resnet18_init2_ep2model_SA_best.pth.tar",
                                                        "3resnet18_init3_ep2model_SA_best.pth.tar"]


def test_class_wise_cells_forget_one_drawn_class_per_seed_and_the_table_says_which(tmp_path):
    cells, notes = build_cells(_settings(tmp_path, seeds=[1, 2, 3, 10]))
    classwise = {c.seed: int(_flag(c.argv, "--class_to_replace")) for c in cells if c.scenario == "classwise"
                 and c.kind == "method"}
    assert classwise == {1: 0, 2: 1, 3: 2, 10: 0}
    assert {c.setting for c in cells if c.scenario == "classwise" and c.seed == 2} == {"class1"}
    assert ("class-wise: one forgotten class per seed, seed s forgets the ((s - 1) mod 9)-th class of the pool "
            "0 1 2 4 5 6 7 8 9: seed 1 -> class 0, seed 2 -> class 1, seed 3 -> class 2, seed 10 -> class 0.") in notes
    again, _ = build_cells(_settings(tmp_path, seeds=[1, 2, 3, 10]))
    assert [c.key for c in again] == [c.key for c in cells], "the draw is deterministic"


def test_a_fixed_class_or_an_explicit_pool(tmp_path):
    cells, notes = build_cells(_settings(tmp_path, forget_class=5))
    assert {_flag(c.argv, "--class_to_replace") for c in cells if c.scenario == "classwise"} == {"5"}
    assert not any(n.startswith("class-wise:") for n in notes)
    cells, _ = build_cells(_settings(tmp_path, forget_classes=(8, 3)))
    drawn = {c.seed: _flag(c.argv, "--class_to_replace") for c in cells if c.scenario == "classwise"}
    assert drawn == {1: "3", 2: "8", 3: "3"}
    # Only random forgetting: the pool is neither needed nor checked.
    cells, notes = build_cells(_settings(tmp_path, scenarios=["random"], forget_classes=(), reserved_classes=tuple(
        range(10))))
    assert cells and not notes


@pytest.mark.parametrize("changes, message", [
    ({"forget_classes": (10,)}, "--forget_classes 10: digits has classes 0-9"),
    ({"forget_classes": (1, 1)}, "given twice"),
    ({"forget_classes": ()}, "at least one class"),
    ({"forget_class": 12}, "--forget_class 12"),
    ({"reserved_classes": tuple(range(10))}, "no class is left"),
])
def test_bad_class_settings_are_one_line_errors(tmp_path, changes, message):
    with pytest.raises(UserError, match=message) as info:
        build_cells(_settings(tmp_path, **changes))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("argv, message", [
    (["--forget_class", "1", "--forget_classes", "2", "3"], "pass one of them"),
    (["--forget_classes", "10"], "has classes 0-9"),
    (["--forget_class", "10"], "has classes 0-9"),
    (["--tune", "--forget_class", "1"], "--tune draws one held-out class per seed"),
    (["--tune", "--tune-classes", *map(str, range(10))], "no class is left"),
    (["--tune", "--tune-classes", "2", "--forget_classes", "1", "2"], "also an evaluation class"),
    (["--tune", "--seeds", "1", "2", "3", "4", "5", "6", "--tune-seeds", "6"], "also an evaluation seed"),
])
def test_bad_class_flags_stop_the_benchmark_before_any_work(tmp_path, argv, message):
    import benchmark

    out = tmp_path / "out"
    with pytest.raises(UserError, match=message) as info:
        benchmark.main([*argv, "--no-track", "--out", str(out)])
    assert "\n" not in str(info.value) and not out.exists()


# ---------------------------------------------------------------------------------------------------------------------
# A model of one initialisation is never taken for another's
# ---------------------------------------------------------------------------------------------------------------------

def test_file_names_and_cell_keys_tell_initialisations_apart(tmp_path):
    base = ["--dataset", "digits", "--arch", "resnet18", "--seed", "2", "--epochs", "30", "--save_dir", str(tmp_path),
            "--class_to_replace", "0"]
    upstream = parse_config(base, "mlflow_forget.py")
    own = parse_config([*base, "--train_seed", "2"], "mlflow_forget.py")
    assert upstream.model.train_seed == 1  # the single-run default stays upstream's
    assert paths.original_model(tmp_path, upstream.data, upstream.model).name == "2resnet18_ep30model_SA_best.pth.tar"
    assert paths.original_model(tmp_path, own.data, own.model).name == "2resnet18_init2_ep30model_SA_best.pth.tar"
    assert cell_key("original", upstream) != cell_key("original", own)
    tag = "classwise_c0_s2_abc"
    upstream_retrain = paths.retrain_model(tmp_path, upstream.data, upstream.model, tag).name
    own_retrain = paths.retrain_model(tmp_path, own.data, own.model, tag).name
    assert upstream_retrain == f"2resnet18_ep30_retrain_{tag}model.pth.tar"
    assert own_retrain == f"2resnet18_init2_ep30_retrain_{tag}model.pth.tar"


# ---------------------------------------------------------------------------------------------------------------------
# The held-out evaluation of --tune and the tuned file's provenance
# ---------------------------------------------------------------------------------------------------------------------

def _plan(*argv: str):
    from benchmark import build_parser
    from sweep.tune import check_tune_args, plan_from_args

    args = build_parser().parse_args(["--tune", *argv])
    check_tune_args(args, {"digits": 10})
    return args, plan_from_args(args)


def test_held_out_defaults_are_eleven_independent_units_per_scenario(tmp_path):
    assert DEFAULT_EVAL_SEEDS == {"random": tuple(range(1, 12)), "classwise": tuple(range(1, 12))}
    args, plan = _plan("--methods", "GA", "--datasets", "digits")
    assert plan.forget_classes == POOL
    assert plan.eval_classes == dict(zip(range(1, 12), (0, 1, 2, 4, 5, 6, 7, 8, 9, 0, 1), strict=True))
    empty = tmp_path / "empty.json"
    empty.write_text("{}")
    cells, notes = evaluation_cells(_settings(tmp_path, methods=args.methods, seeds=[1]), plan, empty)
    units = replication_units(cells)
    assert set(units) == {"random", "classwise"}
    assert units["random"] == {str(s): {"train_seed": s} for s in range(1, 12)}
    assert units["classwise"] == {str(s): {"train_seed": s, "forget_classes": [plan.eval_classes[s]]}
                                  for s in range(1, 12)}
    methods = [c for c in cells if c.kind == "method" and c.scenario == "classwise"]
    assert sorted(c.seed for c in methods) == list(range(1, 12)), "one class-wise cell per seed"
    assert not {int(_flag(c.argv, "--class_to_replace")) for c in methods} & set(plan.tune_classes)
    assert len({c.key for c in cells if c.kind == "original"}) == 11
    assert any("seed 10 -> class 0" in n for n in notes)
    again, _ = evaluation_cells(_settings(tmp_path, methods=args.methods, seeds=[1]), plan, empty)
    assert [c.key for c in again] == [c.key for c in cells]

    record = provenance(plan, [], [], ["benchmark.py", "--tune"], 1.0, 1.0, {"evaluation": units})
    assert record["eval_seeds"] == {"random": list(range(1, 12)), "classwise": list(range(1, 12))}
    assert record["forget_classes"] == list(POOL) and record["tune_classes"] == [3]
    assert record["eval_classes"]["10"] == 0 and record["eval_classes"]["11"] == 1
    assert record["units"]["evaluation"]["classwise"]["4"] == {"train_seed": 4, "forget_classes": [4]}
    assert "--train_seed s" in record["init_seed"]


def test_tuning_cells_give_each_tuning_seed_its_own_initialisation(tmp_path):
    from sweep.tune import tuning_cells

    args, plan = _plan("--methods", "GA", "--trials", "2", "--datasets", "digits")
    empty = tmp_path / "empty.json"
    empty.write_text("{}")
    cells, _, _ = tuning_cells(_settings(tmp_path, methods=args.methods), plan, empty)
    assert all(_flag(c.argv, "--train_seed") == str(c.seed) for c in cells)
    units = replication_units(cells)
    assert units["classwise"] == {"101": {"train_seed": 101, "forget_classes": [3]}}
    assert units["random"] == {"101": {"train_seed": 101}}
    # Two tuning seeds, two tuning classes: each seed its own initialisation and class.
    args, plan = _plan("--methods", "GA", "--trials", "2", "--datasets", "digits", "--tune-seeds", "101", "102",
                       "--tune-classes", "3", "7")
    cells, _, _ = tuning_cells(_settings(tmp_path, methods=args.methods), plan, empty)
    units = replication_units(cells)
    assert units["classwise"] == {"101": {"train_seed": 101, "forget_classes": [3]},
                                  "102": {"train_seed": 102, "forget_classes": [7]}}
    assert units["random"] == {"101": {"train_seed": 101}, "102": {"train_seed": 102}}


def test_default_seeds_let_every_family_reach_significance_after_holm():
    """With every registered configuration, the largest family (each configuration vs SalUn) can still give a verdict
    with the default held-out seeds: Holm's smallest adjusted p-value is below alpha."""
    from sweep.stats import ALPHA, comparison_pairs, min_p
    from unlearn import list_methods, resolve_method

    configs: dict[str, list[str]] = {}
    for name in list_methods():
        if name == "retrain":
            continue
        method = resolve_method(name)
        key = json.dumps({"class": method.cls.name, "mask": method.grad_mask}, sort_keys=True)
        configs.setdefault(key, []).append(name)
    pairs = comparison_pairs(configs)
    for scenario, seeds in DEFAULT_EVAL_SEEDS.items():
        for family in {f for _, _, f in pairs}:
            size = sum(1 for _, _, f in pairs if f == family)
            assert size * min_p(len(seeds)) < ALPHA, (scenario, family, size, len(seeds))
    assert 26 * min_p(10) > ALPHA, "10 seeds would leave the vs SalUn family without a possible verdict"
