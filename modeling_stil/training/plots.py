"""PNG plots of a run, drawn from its JSONL history with matplotlib's Agg backend (no display).

Written into ``<run>/plots/`` at every evaluation (main process):

* ``losses.png``: every training loss term (keys containing ``loss``), each in its own colour (and,
  past ten terms, line style) whatever their number; the total ``loss`` is the wide translucent black
  line under the terms, so it stays visible where it equals one of them;
* ``learning_rate.png``;
* ``validation.png``: one panel per validation metric (not the ``auroc_skipped_classes`` counters); a
  score in [0, 1] gets a y range of at least 0.1, so noise in the third decimal does not look like a
  trend;
* ``pseudo_labels.png``: ``mask_ratio``, ``pseudo_label_accuracy`` (all unlabelled rows) and
  ``pseudo_label_accuracy_masked`` (the confident, kept rows, dashed: visible where it equals the
  accuracy on all rows) when the method logs them.

Legends sit outside the axes, never over the curves. Undefined values (JSON null, e.g. the masked
accuracy before any row is confident) are gaps. `write_prediction_plots` draws one validation pass's
predictions; `write_run_plots` is what the trainer calls: both, staged into the run's plots/ folder.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

PSEUDO_LABEL_KEYS = ("mask_ratio", "pseudo_label_accuracy", "pseudo_label_accuracy_masked")
PSEUDO_LABEL_NAMES = {
    "mask_ratio": "mask ratio (kept fraction)",
    "pseudo_label_accuracy": "accuracy, all rows",
    "pseudo_label_accuracy_masked": "accuracy, kept rows",
}
# every file name write_plots and write_prediction_plots may write (what a run checks before it starts)
PLOT_FILES = ("losses.png", "learning_rate.png", "validation.png", "pseudo_labels.png", "confusion_matrix.png",
              "landmarks.png", "predictions.png")
_SKIP_EVAL_KEYS = {"step", "epoch", "split", "time", "runtime_seconds", "samples", "num_samples", "auroc_skipped_classes"}
_MIN_SCORE_SPAN = 0.1  # y range of a [0, 1] score panel


def series_styles(n: int) -> list[tuple[tuple[float, float, float], str]]:
    """(colour, line style) for ``n`` series, every colour different: tab10, then tab20's light shades
    (dashed), past twenty evenly spaced hues with alternating brightness (dash-dotted)."""
    import matplotlib
    from matplotlib.colors import hsv_to_rgb, to_rgb

    if n <= 20:
        tab20 = [to_rgb(c) for c in matplotlib.colormaps["tab20"].colors]
        palette = tab20[0::2] + tab20[1::2]  # the ten strong colours first
        return [(palette[i], "-" if i < 10 else "--") for i in range(n)]
    return [(tuple(float(v) for v in hsv_to_rgb((i / n, 0.85, 0.9 if i % 2 == 0 else 0.6))), "-" if i % 2 == 0 else "-.")
            for i in range(n)]


def _legend_outside(ax) -> None:
    """The legend to the right of the axes (``_save`` keeps it in the picture)."""
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, frameon=False)


def _score_range(ax, ys: Sequence[float]) -> None:
    """A score in [0, 1] spans at least `_MIN_SCORE_SPAN` of the y axis (autoscale would blow a change
    of 0.0001 up to the full height)."""
    finite = [y for y in ys if math.isfinite(y)]
    if not finite or min(finite) < 0.0 or max(finite) > 1.0:
        return
    low, high = min(finite), max(finite)
    if high - low >= _MIN_SCORE_SPAN:
        return
    middle = min(max((low + high) / 2, _MIN_SCORE_SPAN / 2), 1.0 - _MIN_SCORE_SPAN / 2)
    ax.set_ylim(middle - _MIN_SCORE_SPAN / 2 - 0.005, middle + _MIN_SCORE_SPAN / 2 + 0.005)


def _series(records: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in records:
        value = r.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            xs.append(int(r["step"]))
            ys.append(float(value))
        elif isinstance(value, str) and value in ("nan", "inf", "-inf"):
            xs.append(int(r["step"]))
            ys.append(float(value))
    return xs, ys


def _figure(n_panels: int):
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    cols = min(3, max(1, n_panels))
    rows = math.ceil(n_panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    return plt, fig, [ax for row in axes for ax in row]


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=90, bbox_inches="tight")  # "tight": legends outside the axes stay in the picture
    plt.close(fig)
    os.replace(tmp, path)
    return path


def write_plots(history: Sequence[dict[str, Any]], plot_dir: str | os.PathLike, title: str = "") -> list[Path]:
    """Draw every plot the history supports; return the written paths."""
    plot_dir = Path(plot_dir)
    plot_dir.mkdir(parents=True, exist_ok=True)
    train = [r for r in history if r.get("split") == "train"]
    validation = [r for r in history if r.get("split") == "validation"]
    written: list[Path] = []

    loss_keys = sorted({k for r in train for k in r if "loss" in k}, key=lambda k: (k != "loss", k))
    if loss_keys:
        plt, fig, axes = _figure(1)
        fig.set_size_inches(5.2, 3.4)  # the axes; the legend is added to the right
        ax = axes[0]
        terms = [k for k in loss_keys if k != "loss"]
        styles = dict(zip(terms, series_styles(len(terms))))
        for key in loss_keys:
            xs, ys = _series(train, key)
            if key == "loss":  # wide, translucent, underneath: visible even where it equals a term
                ax.plot(xs, ys, label="loss (total)", color="black", linewidth=4.0, alpha=0.35, zorder=1)
            else:
                color, style = styles[key]
                ax.plot(xs, ys, label=key, color=color, linestyle=style, linewidth=1.2, zorder=2)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(f"{title} training losses".strip())
        _legend_outside(ax)
        ax.grid(alpha=0.3)
        written.append(_save(plt, fig, plot_dir / "losses.png"))

    xs, ys = _series(train, "lr")
    if xs:
        plt, fig, axes = _figure(1)
        axes[0].plot(xs, ys)
        axes[0].set_xlabel("step")
        axes[0].set_ylabel("learning rate")
        axes[0].set_title("learning rate")
        axes[0].grid(alpha=0.3)
        written.append(_save(plt, fig, plot_dir / "learning_rate.png"))

    metric_keys = sorted({k for r in validation for k, v in r.items()
                          if k.split("/")[-1] not in _SKIP_EVAL_KEYS and isinstance(v, (int, float)) and not isinstance(v, bool)})
    if metric_keys:
        plt, fig, axes = _figure(len(metric_keys))
        for ax, key in zip(axes, metric_keys):
            xs, ys = _series(validation, key)
            ax.plot(xs, ys, marker="o", markersize=3)
            _score_range(ax, ys)
            ax.set_title(f"validation {key}")
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        for ax in axes[len(metric_keys):]:
            ax.axis("off")
        written.append(_save(plt, fig, plot_dir / "validation.png"))

    present = [k for k in PSEUDO_LABEL_KEYS if any(k in r for r in train)]
    if present:
        plt, fig, axes = _figure(1)
        fig.set_size_inches(5.2, 3.2)  # the axes; the legend is added to the right
        ax = axes[0]
        styles = dict(zip(PSEUDO_LABEL_KEYS, series_styles(len(PSEUDO_LABEL_KEYS))))
        for key in present:
            xs, ys = _series(train, key)
            color, _ = styles[key]
            masked = key == "pseudo_label_accuracy_masked"  # dashed on top: the all-rows line shows through
            ax.plot(xs, ys, label=PSEUDO_LABEL_NAMES.get(key, key), color=color, linestyle="--" if masked else "-",
                    linewidth=1.2 if masked else 2.0, marker="o" if len(xs) < 30 else None, markersize=3,
                    zorder=3 if masked else 2)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("step")
        ax.set_title(f"{title} pseudo-labels".strip())
        _legend_outside(ax)
        ax.grid(alpha=0.3)
        written.append(_save(plt, fig, plot_dir / "pseudo_labels.png"))
    return written


# ================================================================ evaluation predictions (per evaluation)
# Drawn from the outputs of the last validation pass (`Trainer.evaluate` keeps them), next to the
# history plots: ``confusion_matrix.png`` (classification), ``landmarks.png`` (a grid of validation
# images with true and predicted points), ``predictions.png`` (scalar regression: predicted vs true).
def confusion_matrix(predicted, references, num_labels: int):
    """Counts (num_labels, num_labels): row = true class, column = predicted class; references < 0 are
    ignored."""
    import numpy as np

    predicted = np.asarray(predicted, dtype=np.int64).reshape(-1)
    references = np.asarray(references, dtype=np.int64).reshape(-1)
    keep = references >= 0
    matrix = np.zeros((num_labels, num_labels), dtype=np.int64)
    np.add.at(matrix, (references[keep], predicted[keep]), 1)
    return matrix


def row_normalised(matrix):
    """Each row of a confusion matrix as fractions of its true class's rows (sums to 1; a class with no
    rows stays all zeros)."""
    import numpy as np

    matrix = np.asarray(matrix, dtype=np.float64)
    rows = matrix.sum(axis=1, keepdims=True)
    return np.divide(matrix, rows, out=np.zeros_like(matrix), where=rows > 0)


def write_prediction_plots(task: str, logits, references, plot_dir: str | os.PathLike, *, num_labels: int = 0,
                           label_names: Sequence[str] | None = None, images=None, title: str = "",
                           max_images: int = 16) -> list[Path]:
    """PNG pictures of one evaluation's predictions. ``logits``/``references`` are arrays (N, C) / (N,)
    (classification), (N, 2K) flat x1, y1, ... in pixels of ``images`` (landmarks), (N,) or (N, T)
    (regression). ``images`` (n, C, H, W) in [0, 1] are the first rows (landmark grid)."""
    import numpy as np

    plot_dir = Path(plot_dir)
    plot_dir.mkdir(parents=True, exist_ok=True)
    logits = np.asarray(logits, dtype=np.float64)
    references = np.asarray(references, dtype=np.float64)
    written: list[Path] = []
    if len(references) == 0:
        return written
    if task == "classification":
        num_labels = num_labels or logits.shape[-1]
        matrix = confusion_matrix(logits.argmax(axis=-1), references, num_labels)
        plt, fig, axes = _figure(1)
        ax = axes[0]
        fig.set_size_inches(max(4.8, 0.45 * num_labels + 3.4), max(3.6, 0.45 * num_labels + 2.0))
        # colour and numbers: the fraction of each true class's rows; the counts are on the row labels
        shown = row_normalised(matrix)
        image = ax.imshow(shown, cmap="Blues", vmin=0.0, vmax=1.0)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04).set_label("fraction of the true class", fontsize=7)
        names = list(label_names) if label_names and len(label_names) == num_labels else [str(i) for i in range(num_labels)]
        counts = matrix.sum(axis=1)
        ax.set_xticks(range(num_labels), names, rotation=90 if num_labels > 6 else 0, fontsize=7)
        ax.set_yticks(range(num_labels), [f"{name} (n={n})" for name, n in zip(names, counts)], fontsize=7)
        if num_labels <= 20:
            for i in range(num_labels):
                for j in range(num_labels):
                    if matrix[i, j]:  # empty cells stay blank
                        ax.text(j, i, f"{shown[i, j]:.2f}", ha="center", va="center", fontsize=6,
                                color="white" if shown[i, j] > 0.5 else "black")
        accuracy = np.trace(matrix) / max(1, matrix.sum())
        ax.set_xlabel("predicted")
        ax.set_ylabel("true (n = its rows)")
        ax.set_title(f"{title} confusion, acc {accuracy:.3f}\nrows normalised: fraction of each true class".strip(), fontsize=8)
        written.append(_save(plt, fig, plot_dir / "confusion_matrix.png"))
    elif task == "landmarks" and images is not None and len(images):
        images = np.asarray(images, dtype=np.float64)
        n = min(max_images, len(images), len(logits))
        cols = min(4, n)
        rows = math.ceil(n / cols)
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.3 * rows), squeeze=False)
        flat = [ax for row in axes for ax in row]
        for i, ax in enumerate(flat):
            ax.axis("off")
            if i >= n:
                continue
            image = np.clip(images[i], 0.0, 1.0)
            image = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
            ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0.0, vmax=1.0)
            truth, predicted = references[i].reshape(-1, 2), logits[i].reshape(-1, 2)
            ax.scatter(truth[:, 0], truth[:, 1], s=14, facecolors="none", edgecolors="lime", linewidths=1.0)
            ax.scatter(predicted[:, 0], predicted[:, 1], s=14, c="red", marker="x", linewidths=1.0)
            iod = max(np.linalg.norm(truth[0] - truth[1]), 1e-12)
            nme = np.linalg.norm(truth - predicted, axis=-1).mean() / iod
            ax.set_title(f"NME {nme:.3f}", fontsize=7)
        fig.suptitle(f"{title} landmarks: true (green o), predicted (red x)".strip(), fontsize=8)
        written.append(_save(plt, fig, plot_dir / "landmarks.png"))
    elif task == "regression":
        plt, fig, axes = _figure(1)
        ax = axes[0]
        predicted, truth = logits.reshape(len(logits), -1), references.reshape(len(references), -1)
        ax.scatter(truth.reshape(-1), predicted.reshape(-1), s=6, alpha=0.5)
        low, high = float(min(truth.min(), predicted.min())), float(max(truth.max(), predicted.max()))
        ax.plot([low, high], [low, high], color="black", linewidth=0.8)
        ax.set_xlabel("true")
        ax.set_ylabel("predicted")
        ax.set_title(f"{title} validation predictions".strip())
        ax.grid(alpha=0.3)
        written.append(_save(plt, fig, plot_dir / "predictions.png"))
    return written


def write_run_plots(output_dir: str | os.PathLike, history: Sequence[dict[str, Any]], *, title: str = "",
                    task: str = "", logits=None, references=None, images=None, num_labels: int = 0,
                    label_names: Sequence[str] | None = None) -> list[Path]:
    """A run's ``plots/`` folder: the curves of its ``history`` and, given a validation pass's
    ``logits``/``references``, its prediction pictures. Drawn into a staging folder, then moved into
    plots/, so never over a picture stil did not draw; a picture never ends a long run (a warning)."""
    import warnings

    from . import manifest

    output_dir = Path(output_dir)
    try:
        with manifest.staged(output_dir, "plots") as stage:
            written = write_plots(history, stage, title=title)
            if logits is not None:
                try:
                    written += write_prediction_plots(task, logits, references, stage, num_labels=num_labels,
                                                      label_names=label_names, images=images, title=title)
                except Exception as error:  # noqa: BLE001
                    warnings.warn(f"prediction plots skipped: {type(error).__name__}: {error}")
    except manifest.ForeignFileError as error:
        warnings.warn(f"plots not written: {error}")
        return []
    return [output_dir / "plots" / path.name for path in written]
