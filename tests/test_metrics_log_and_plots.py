"""logs/metrics.jsonl writes null (not NaN) for an undefined value; the plots show the masked pseudo-label
accuracy and the total loss (visible around an equal term), with titles that fit."""

from __future__ import annotations

import json


def test_metrics_jsonl_writes_null_for_nan_and_plots_show_masked_accuracy_and_total_loss(tmp_path, monkeypatch):
    import math

    from modeling_stil.training import plots
    from modeling_stil.training.tracking import JsonlLogger

    log = JsonlLogger(tmp_path / "m.jsonl")
    for step, masked in ((1, math.nan), (2, 0.5), (3, 0.75)):
        log.log({"step": step, "split": "train", "loss": 1.0 / step, "sup_loss": 1.0 / step, "mask_ratio": 0.1 * step,
                 "pseudo_label_accuracy": 0.4, "pseudo_label_accuracy_masked": masked})
    first = json.loads((tmp_path / "m.jsonl").read_text().splitlines()[0])
    assert first["pseudo_label_accuracy_masked"] is None and '"nan"' not in (tmp_path / "m.jsonl").read_text()
    figures = {}
    original = plots._save

    def capture(plt, fig, path):
        fig.canvas.draw()
        figures[path.name] = fig
        renderer = fig.canvas.get_renderer()
        ax = fig.axes[0]
        title = ax.title.get_window_extent(renderer)
        box = fig.bbox
        assert title.x0 >= box.x0 - 1 and title.x1 <= box.x1 + 1, f"{path.name}: title cut off"
        return original(plt, fig, path)

    monkeypatch.setattr(plots, "_save", capture)
    plots.write_plots(log.history(), tmp_path / "plots", title="fixmatch")
    labels = [line.get_label() for line in figures["pseudo_labels.png"].axes[0].get_lines()]
    assert any("kept rows" in label for label in labels)
    lines = {line.get_label(): line for line in figures["losses.png"].axes[0].get_lines()}
    total, term = lines["loss (total)"], lines["sup_loss"]
    assert total.get_linewidth() > term.get_linewidth() and total.get_alpha() < 1  # visible around an equal term
