"""PNG plots of a run, drawn from its JSONL history with matplotlib's Agg backend (no display).

Written into ``<run>/plots/`` at every evaluation (main process):

* ``losses.png``: every training loss term (keys containing ``loss``); the total ``loss`` is the wide
  translucent black line under the terms, so it stays visible where it equals one of them;
* ``learning_rate.png``;
* ``validation.png``: one panel per validation metric;
* ``pseudo_labels.png``: ``mask_ratio``, ``pseudo_label_accuracy`` (all unlabelled rows) and
  ``pseudo_label_accuracy_masked`` (the confident, kept rows) when the method logs them.

Undefined values (JSON null, e.g. the masked accuracy before any row is confident) are gaps.
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
_SKIP_EVAL_KEYS = {"step", "epoch", "split", "time", "runtime_seconds", "samples", "num_samples", "auroc_skipped_classes"}


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
    fig.savefig(tmp, dpi=90)
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
        ax = axes[0]
        for key in loss_keys:
            xs, ys = _series(train, key)
            if key == "loss":  # wide, translucent, underneath: visible even where it equals a term
                ax.plot(xs, ys, label="loss (total)", color="black", linewidth=4.0, alpha=0.35, zorder=1)
            else:
                ax.plot(xs, ys, label=key, linewidth=1.2, zorder=2)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(f"{title} training losses".strip())
        ax.legend(fontsize=7)
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

    metric_keys = sorted({k for r in validation for k, v in r.items() if k not in _SKIP_EVAL_KEYS and isinstance(v, (int, float)) and not isinstance(v, bool)})
    if metric_keys:
        plt, fig, axes = _figure(len(metric_keys))
        for ax, key in zip(axes, metric_keys):
            xs, ys = _series(validation, key)
            ax.plot(xs, ys, marker="o", markersize=3)
            ax.set_title(f"validation {key}")
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        for ax in axes[len(metric_keys):]:
            ax.axis("off")
        written.append(_save(plt, fig, plot_dir / "validation.png"))

    present = [k for k in PSEUDO_LABEL_KEYS if any(k in r for r in train)]
    if present:
        plt, fig, axes = _figure(1)
        ax = axes[0]
        for key in present:
            xs, ys = _series(train, key)
            ax.plot(xs, ys, label=PSEUDO_LABEL_NAMES.get(key, key), marker="o" if len(xs) < 30 else None, markersize=3)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("step")
        ax.set_title(f"{title} pseudo-labels".strip())
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        written.append(_save(plt, fig, plot_dir / "pseudo_labels.png"))
    return written
