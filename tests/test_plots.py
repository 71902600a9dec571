"""plots.py and the benchmark's plot writer: files are written, families keep one colour across every plot."""
from __future__ import annotations

import math

import pytest
from matplotlib.colors import to_hex

import plots
from sweep.report import write_plots


def _curves(ua: float, epochs: int) -> list[dict]:
    return [{"epoch": e, "UA": ua + e, "RA": 90.0, "TA": 85.0 - e, "MIA_efficacy": 20.0 + e}
            for e in range(1, epochs + 1)]


def _row(method: str, config: str, avg_gap: float, reference: bool = False, epochs: int = 3) -> dict:
    row = {"dataset": "digits", "arch": "resnet18", "scenario": "random", "method": method, "config": config,
           "reference": reference, "seeds": [1, 2], "curves": [] if reference else [_curves(avg_gap, epochs),
                                                                                   _curves(avg_gap + 1, epochs)]}
    for key, value in (("UA", 10.0 + avg_gap), ("RA", 95.0), ("TA", 88.0 - avg_gap), ("MIA_efficacy", 20.0),
                       ("avg_gap", math.nan if reference else avg_gap), ("forget_gap", 0.0 if reference else avg_gap)):
        row[f"{key}_mean"], row[f"{key}_std"] = value, 0.0 if reference else 1.0
    return row


ROWS = [_row("Retrain", "the Retrain reference model", 0.0, reference=True),
        _row("NGradMask = VarGrad", "NGPlus + prob", 2.0), _row("NGSalUn", "NGPlus + saliency", 3.0),
        _row("SRL_OPT", "SRL + opt", 4.0, epochs=2), _row("GA", "GA", 9.0), _row("SSD", "SSD", 80.0)]


def test_families_group_methods_by_what_they_run():
    assert plots.family_of("NGPlus + prob") == plots.family_of("NGPlus + saliency") == plots.family_of("NGPlus")
    assert plots.family_of("SRL + opt") != plots.family_of("NGPlus + prob")
    assert plots.family_of("SalUn") == plots.family_of("RL")
    assert plots.family_of("the Retrain reference model") == plots.RETRAIN_FAMILY
    assert plots.family_of("SomethingNew") == plots.OTHER_FAMILY
    colours = [plots.family_colour(f) for f in set(plots.FAMILY_OF_BASE.values())]
    assert len(set(colours)) == len(colours), "two families share a colour"


def test_confidence_interval_over_seeds():
    assert plots.confidence_half_width(2.0, 1) == 0.0
    # t(0.975, 2) = 4.303: the 95 % interval of three seeds is wide
    assert plots.confidence_half_width(1.0, 3) == pytest.approx(4.303 / math.sqrt(3), rel=1e-3)


def _colours(fig) -> dict[str, set[str]]:
    """Legend entry -> colours of what the entry stands for, over every axes of a figure."""
    found: dict[str, set[str]] = {}
    for ax in fig.axes:
        legend = ax.get_legend()
        if legend is None:
            continue
        for handle, text in zip(legend.legend_handles, legend.get_texts()):
            colour = handle.get_facecolor() if hasattr(handle, "get_facecolor") and not hasattr(handle, "get_xdata") \
                else handle.get_color()
            found.setdefault(text.get_text(), set()).add(to_hex(colour))
    return found


def test_benchmark_plots_are_written_and_families_share_a_colour(tmp_path, monkeypatch):
    figures = {}
    real_save = plots.save_figure

    def keep(fig, path):  # look at each figure before it is written and closed
        figures[path.name] = _colours(fig)
        return real_save(fig, path)

    monkeypatch.setattr(plots, "save_figure", keep)
    written = write_plots(ROWS, tmp_path)
    names = {path.name for path in written}
    assert names == {"avg_gap_digits_resnet18.png", "tradeoff_digits_resnet18.png", "curves_digits_resnet18.png"}
    for path in written:
        assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ng = to_hex(plots.family_colour(plots.family_of("NGPlus + prob")))
    # the family legend of the Avg. Gap and trade-off plots, and the method legend of the curves: NG+ colour everywhere
    for name in ("avg_gap_digits_resnet18.png", "tradeoff_digits_resnet18.png"):
        assert figures[name][plots.family_of("NGPlus + prob")] == {ng}
    curves = figures["curves_digits_resnet18.png"]
    assert curves["NGradMask = VarGrad"] == curves["NGSalUn"] == {ng}
    assert curves["GA"] != {ng} and curves["Retrain"] == {"#000000"}
    assert "SRL_OPT (2 epochs)" in curves  # a shorter history says so


def test_curve_styles_differ_within_a_family():
    styles = plots.member_styles([("NGradMask", "NG+"), ("NGSalUn", "NG+"), ("GA", "GA")])
    assert styles["NGradMask"]["color"] == styles["NGSalUn"]["color"]
    assert (styles["NGradMask"]["linestyle"], styles["NGradMask"]["marker"]) != \
           (styles["NGSalUn"]["linestyle"], styles["NGSalUn"]["marker"])


def test_tradeoff_axes_leave_out_an_outlier():
    low, high = plots._axis_range([1.0, 2.0, 2.5, 3.0, 3.5, 80.0])
    assert high < 80.0 and low < 1.0
    assert plots._axis_range([1.0, 80.0]) [1] > 80.0  # two points: nothing is an outlier


def test_training_curve_marks_the_kept_epoch(tmp_path):
    from training import plot_history

    history = {"train_loss": [1.0, 0.5, 0.4], "train_acc": [50.0, 70.0, 80.0], "val_acc": [40.0, 60.0, 55.0]}
    captured = {}
    import training

    real_save = training.save_figure

    def keep(fig, path):
        captured["title"] = fig._suptitle.get_text()
        captured["labels"] = [t.get_text() for ax in fig.axes for t in ax.get_legend().get_texts()]
        return real_save(fig, path)

    training.save_figure = keep
    try:
        path = plot_history(history, tmp_path / "curve.png", title="Retrain: resnet18, digits, classwise, seed 2",
                            selected_epoch=2, selected_why="best validation accuracy, kept",
                            val_label="val acc (all classes, incl. forgotten class 0)")
    finally:
        training.save_figure = real_save
    assert path.is_file()
    assert "seed 2" in captured["title"]
    assert "epoch 2 (best validation accuracy, kept)" in captured["labels"]
    assert "val acc (all classes, incl. forgotten class 0)" in captured["labels"]


def test_method_curves_leave_out_a_metric_no_run_evaluated(tmp_path):
    """Tuning trials evaluate no test-set metric per epoch: those panels stay empty, with no all-NaN warning."""
    import warnings

    runs = [[{"epoch": e, "UA": 10.0 - e, "RA": 99.0} for e in (1, 2, 3)] for _ in range(2)]
    curves = {"random": {"GA": {"family": "GA", "runs": runs}, "Retrain": {"reference": {"UA": 8.0, "TA": 89.0}}}}
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        path = plots.plot_method_curves(curves, tmp_path / "curves.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
