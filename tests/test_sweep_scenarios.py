"""The scenario registry: each scenario module registers itself; the sweep knows no scenario by name."""
from __future__ import annotations

import pytest

from conftest import ROOT


def test_every_module_of_the_package_registers_its_scenario():
    import scenarios

    modules = sorted(p.stem for p in (ROOT / "scenarios").glob("*.py") if p.stem != "__init__")
    assert modules == ["backdoor", "classwise", "random"]
    assert sorted(scenarios.SCENARIOS) == modules
    for name, scenario in scenarios.SCENARIOS.items():
        assert scenario.forget_flags.__module__ == f"scenarios.{name}", "registered by its own module"


def test_backdoor_is_registered_by_its_module_not_by_the_sweep():
    import scenarios
    import sweep

    backdoor = scenarios.SCENARIOS["backdoor"]
    assert backdoor.run_cell.__module__ == "scenarios.backdoor"
    assert backdoor.script == "main_backdoor.py" and not backdoor.references
    sweep_sources = "\n".join(p.read_text() for p in (ROOT / "sweep").glob("*.py"))
    assert "backdoor" not in sweep_sources.lower(), "no scenario is hard-coded in the sweep"
    assert not hasattr(sweep, "SCENARIOS")


def test_registering_a_name_twice_is_refused():
    from scenarios import SCENARIOS, Scenario, register_scenario

    with pytest.raises(ValueError, match="registered twice"):
        register_scenario(Scenario("random", "again", lambda settings, size: {}))
    assert SCENARIOS["random"].summary.startswith("random forgetting")


def test_forget_flags_follow_the_settings():
    from scenarios import SCENARIOS
    from sweep import Settings

    settings = Settings(datasets=["digits"], archs=["resnet18"], scenarios=["random"], methods=["GA"], seeds=[1],
                        out=ROOT / "unused", forget_fraction=0.25, forget_class=3)
    assert SCENARIOS["random"].forget_flags(settings, 1000) == {"class_to_replace": -1, "num_indexes_to_replace": 250}
    assert SCENARIOS["random"].forget_flags(settings, 1) == {"class_to_replace": -1, "num_indexes_to_replace": 1}
    assert SCENARIOS["classwise"].forget_flags(settings, 1000) == {"class_to_replace": 3}
    assert SCENARIOS["backdoor"].forget_flags(settings, 1000) == {"class_to_replace": 0, "num_indexes_to_replace": 250}


def test_a_new_scenario_needs_only_its_registration(tmp_path, monkeypatch):
    """A scenario registered from outside the package gets cells, its own columns and CSV fields, with no sweep edit."""
    import scenarios
    from scenarios import Scenario, register_scenario
    from sweep import Settings, build_cells
    from sweep.report import csv_fields, markdown_table

    monkeypatch.setattr(scenarios, "SCENARIOS", dict(scenarios.SCENARIOS))
    monkeypatch.setattr("sweep.grid.SCENARIOS", scenarios.SCENARIOS)
    monkeypatch.setattr("sweep.report.SCENARIOS", scenarios.SCENARIOS)
    register_scenario(Scenario("class3", "forget class 3", lambda settings, size: {"class_to_replace": 3},
                               metrics=(("UA", "UA"), ("leak", "Leak")), note="class3: a test scenario."))
    settings = Settings(datasets=["digits"], archs=["resnet18"], scenarios=["class3"], methods=["GA"], seeds=[1],
                        out=tmp_path / "out", epochs=2, width=4)
    cells, _ = build_cells(settings)
    assert [c.kind for c in cells] == ["original", "retrain", "reference", "method"]
    assert all("--class_to_replace 3" in " ".join(c.argv) for c in cells)
    assert "leak_mean" in csv_fields()
    row = {"dataset": "digits", "arch": "resnet18", "scenario": "class3", "setting": "class3", "method": "GA",
           "seeds": [1], "failed_seeds": [], "settings": "", "UA_mean": 1.0, "UA_std": 0.0, "leak_mean": 2.0,
           "leak_std": 0.0}
    table = markdown_table([row], [], [1])
    assert "| Method | UA | Leak | seeds | settings |" in table and "- class3: a test scenario." in table
