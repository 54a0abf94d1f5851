"""NME (inter-ocular: GT landmarks 0 and 1) and failure rate (NME > 0.1) against a hand computation, as
Learning-to-impute's Regression/train-*.py `evaluate` computes them; the prediction pictures (confusion
matrix, landmark grid, regression scatter)."""

from __future__ import annotations

import numpy as np
import pytest

from modeling_stil.training.metrics import compute_metrics
from modeling_stil.training import plots
from modeling_stil.training.plots import confusion_matrix, row_normalised, series_styles, write_prediction_plots


def landmarks_by_hand():
    # image 0: eyes (0,0), (10,0): IOD 10; only landmark 0 is off by 1 px -> NME = (1/5) / 10 = 0.02
    gt0 = np.array([[0, 0], [10, 0], [5, 5], [2, 8], [8, 8]], dtype=float)
    pred0 = gt0.copy()
    pred0[0] += [1.0, 0.0]
    # image 1: eyes (0,0), (0,4): IOD 4; every landmark off by (3, 4) = 5 px -> NME = 5 / 4 = 1.25 (fails)
    gt1 = np.array([[0, 0], [0, 4], [2, 2], [1, 3], [3, 3]], dtype=float)
    pred1 = gt1 + [3.0, 4.0]
    # image 2: IOD 10, every landmark off by 1 px -> NME exactly 0.1: NOT a failure (strictly > 0.1)
    gt2 = gt0.copy()
    pred2 = gt2 + [0.0, 1.0]
    references = np.stack([gt0, gt1, gt2]).reshape(3, 10)
    predictions = np.stack([pred0, pred1, pred2]).reshape(3, 10)
    return predictions, references


def test_nme_and_failure_rate_by_hand():
    predictions, references = landmarks_by_hand()
    metrics = compute_metrics("landmarks", predictions, references, num_labels=10)
    assert metrics["nme"] == pytest.approx((0.02 + 1.25 + 0.1) / 3)
    assert metrics["failure_rate"] == pytest.approx(1 / 3)
    assert metrics["mse"] == pytest.approx(np.mean((predictions - references) ** 2))
    # the normaliser is the GROUND TRUTH eye distance: moving the predicted eyes does not change it
    moved = predictions.copy()
    moved[0, 2:4] += [100.0, 0.0]
    assert compute_metrics("landmarks", moved, references, 10)["nme"] > metrics["nme"]
    # sample-weighted mean over batches == mean over all images (the original's AverageMeter)
    first = compute_metrics("landmarks", predictions[:2], references[:2], 10)["nme"]
    last = compute_metrics("landmarks", predictions[2:], references[2:], 10)["nme"]
    assert metrics["nme"] == pytest.approx((2 * first + 1 * last) / 3)


def test_confusion_matrix_by_hand():
    matrix = confusion_matrix([0, 1, 1, 2, 0], [0, 1, 2, 2, -1], 3)
    assert matrix.tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]  # rows true, columns predicted; -1 ignored


def test_prediction_pictures_are_written(tmp_path):
    logits = np.eye(3)[[0, 1, 1, 2]] * 5.0
    written = write_prediction_plots("classification", logits, np.array([0, 1, 2, 2]), tmp_path, num_labels=3,
                                     label_names=["a", "b", "c"], title="t")
    assert [p.name for p in written] == ["confusion_matrix.png"]
    predictions, references = landmarks_by_hand()
    images = np.random.default_rng(0).random((3, 1, 12, 12))
    written = write_prediction_plots("landmarks", predictions, references, tmp_path, images=images)
    assert [p.name for p in written] == ["landmarks.png"]
    assert write_prediction_plots("landmarks", predictions, references, tmp_path, images=None) == []
    written = write_prediction_plots("regression", np.array([1.0, 2.0]), np.array([1.5, 2.5]), tmp_path)
    assert [p.name for p in written] == ["predictions.png"]
    for name in ("confusion_matrix.png", "landmarks.png", "predictions.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def drawn(monkeypatch):
    """The figures the plot writers save, by file name; ``legend_right_of_axes[name]``: each legend
    starts right of its axes (measured on the drawn figure, before it is closed)."""
    figures = {}
    figures_legends = {}
    original = plots._save

    def capture(plt, fig, path):
        fig.tight_layout()
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        figures[path.name] = fig
        figures_legends[path.name] = [ax.get_legend().get_window_extent(renderer).x0 >= ax.get_window_extent(renderer).x1
                                      for ax in fig.axes if ax.get_legend() is not None]
        return original(plt, fig, path)

    figures["legend_right_of_axes"] = figures_legends

    monkeypatch.setattr(plots, "_save", capture)
    return figures


@pytest.mark.parametrize("n", [1, 3, 10, 12, 20, 21, 64])
def test_every_series_has_its_own_colour(n):
    colours = [colour for colour, _ in series_styles(n)]
    assert len(set(colours)) == n


def test_losses_plot_colours_are_unique_and_the_legend_is_outside_the_curves(tmp_path, drawn):
    """STiL logs 11 loss terms: with matplotlib's 10-colour cycle loss_cc and unsup_loss_tabular were both
    blue, and the legend inside the axes covered the curves."""
    from matplotlib.colors import to_rgba

    terms = ["loss_cc", "loss_ds", "loss_pt", "sup_loss", "sup_loss_image", "sup_loss_multimodal", "sup_loss_tabular",
             "unsup_loss", "unsup_loss_image", "unsup_loss_multimodal", "unsup_loss_tabular"]
    history = [{"step": step, "split": "train", "loss": 10.0 / step, **{t: i + 1.0 / step for i, t in enumerate(terms)}}
               for step in range(1, 6)]
    plots.write_plots(history, tmp_path, title="stil")
    ax = drawn["losses.png"].axes[0]
    colours = {line.get_label(): to_rgba(line.get_color()) for line in ax.get_lines()}
    assert set(colours) == {"loss (total)", *terms}
    assert len(set(colours.values())) == len(colours), colours
    assert drawn["legend_right_of_axes"]["losses.png"] == [True]


def test_validation_panels_skip_counters_and_pseudo_label_lines_stay_visible(tmp_path, drawn):
    history = [{"step": s, "split": "validation", "accuracy": 0.05, "image/accuracy": 0.05 + 0.0001 * s,
                "image/auroc_skipped_classes": 0.0} for s in (2, 4)]
    history += [{"step": s, "split": "train", "loss": 1.0, "mask_ratio": 1.0, "pseudo_label_accuracy": 0.3,
                 "pseudo_label_accuracy_masked": 0.3} for s in (1, 2)]
    plots.write_plots(history, tmp_path)
    panels = {ax.get_title(): ax for ax in drawn["validation.png"].axes if ax.get_title()}
    assert set(panels) == {"validation accuracy", "validation image/accuracy"}  # no counter panel
    low, high = panels["validation image/accuracy"].get_ylim()
    assert high - low >= 0.1  # a change of 0.0002 does not fill the panel
    lines = {line.get_label(): line for line in drawn["pseudo_labels.png"].axes[0].get_lines()}
    # equal accuracies: the kept-rows line is dashed over the all-rows one, so both show
    assert lines["accuracy, kept rows"].get_linestyle() == "--" and lines["accuracy, all rows"].get_linestyle() == "-"
    assert drawn["legend_right_of_axes"]["pseudo_labels.png"] == [True]


def test_confusion_matrix_is_row_normalised_with_the_counts_on_the_rows(tmp_path, drawn):
    matrix = np.array([[25, 5, 0], [0, 5, 0], [0, 0, 0]])
    shown = row_normalised(matrix)
    assert shown[:2].sum(axis=1) == pytest.approx([1.0, 1.0]) and shown[2].tolist() == [0.0, 0.0, 0.0]
    references = np.array([0] * 30 + [1] * 5 + [2] * 2)
    predicted = np.array([0] * 25 + [1] * 5 + [1] * 5 + [2] * 2)
    write_prediction_plots("classification", np.eye(3)[predicted], references, tmp_path, num_labels=3,
                           label_names=["cat", "dog", "fox"], title="t")
    ax = drawn["confusion_matrix.png"].axes[0]
    colours = np.asarray(ax.images[0].get_array())
    assert colours.sum(axis=1) == pytest.approx([1.0, 1.0, 1.0])  # what the picture shows: fractions per true row
    assert sorted(t.get_text() for t in ax.texts) == ["0.17", "0.83", "1.00", "1.00"]  # no raw count in a cell
    assert [t.get_text() for t in ax.get_yticklabels()] == ["cat (n=30)", "dog (n=5)", "fox (n=2)"]
    assert "rows normalised" in ax.get_title()
