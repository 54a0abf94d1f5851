"""Training logs: tensor accumulation without host syncs, tracker validation and a JSONL record.

* `LogAccumulator` keeps running sums of the detached scalar tensors a method returns, on the
  device; nothing touches the host until `reduce()` is called on a logging step, which performs one
  cross-process reduction and one device-to-host copy for all keys together.
* `resolve_trackers` turns ``report_to`` into Accelerate tracker names and fails loudly when a
  tracker's package is missing (Accelerate itself only warns and then logs nothing).
* `JsonlLogger` appends every logged value as one JSON object per line (main process only), and
  can truncate the record back to a checkpoint's step on resume.
* `log_window_state` / `restore_log_window` carry the unlogged part of a logging window through a
  checkpoint, so a resumed run's first line averages the same steps as the uninterrupted run's.

(Named ``tracking`` rather than ``logging`` so that it never shadows the standard library's module.)
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

# tracker name -> python package that must be importable
TRACKER_PACKAGES = {
    "tensorboard": "tensorboard",
    "wandb": "wandb",
    "comet_ml": "comet_ml",
    "mlflow": "mlflow",
    "aim": "aim",
    "clearml": "clearml",
    "dvclive": "dvclive",
    "swanlab": "swanlab",
    "trackio": "trackio",
}


JSONL_LOG = "logs/metrics.jsonl"  # the run's JSONL record, inside its output_dir


class TrackerUnavailableError(ImportError):
    pass


def resolve_trackers(report_to: Sequence[str] | str | None) -> list[str]:
    """Validate tracker names; return the list to pass to ``Accelerator(log_with=...)``."""
    if report_to is None:
        return []
    names = [report_to] if isinstance(report_to, str) else list(report_to)
    names = [n.strip().lower() for n in names if n and n.strip()]
    if not names or names == ["none"] or names == ["jsonl"]:
        return []
    if "all" in names:
        return [n for n, pkg in TRACKER_PACKAGES.items() if importlib.util.find_spec(pkg) is not None]
    trackers = []
    for name in names:
        if name in ("none", "jsonl"):
            continue
        if name not in TRACKER_PACKAGES:
            raise ValueError(f"unknown tracker {name!r} in report_to; known: {sorted(TRACKER_PACKAGES)} (or 'none')")
        if importlib.util.find_spec(TRACKER_PACKAGES[name]) is None:
            raise TrackerUnavailableError(
                f"report_to asks for {name!r} but the {TRACKER_PACKAGES[name]!r} package is not installed: "
                f"`pip install {TRACKER_PACKAGES[name]}`, or drop it from report_to (e.g. --report_to none; "
                "the JSONL log is always written)"
            )
        trackers.append(name)
    return trackers


def tracker_config(flat: dict[str, Any]) -> dict[str, Any]:
    """Hyper-parameters in a form every tracker accepts (TensorBoard hparams want scalars/strings);
    secrets (``hub_token``) are left out: trackers write them into files (hparams.yml, event files)."""
    from .arguments import SECRET_SETTINGS

    out = {}
    for key, value in flat.items():
        if key in SECRET_SETTINGS:
            continue
        if value is None:
            out[key] = "None"
        elif isinstance(value, (bool, int, float, str)):
            out[key] = value
        else:
            out[key] = json.dumps(value)
    return out


class LogAccumulator:
    """Running sums of scalar tensors, reduced (mean over steps and processes) on demand.

    Non-finite values are skipped rather than summed: a value that is undefined on some steps
    (pseudo-label accuracy when no monitor label or no confident row exists is NaN) must not turn
    the whole logging window into NaN. A key with no finite value in the window reduces to NaN.
    The loss itself is guarded separately (the trainer stops on a non-finite loss)."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}

    def add(self, logs: dict[str, torch.Tensor]) -> None:
        for key, value in logs.items():
            if not isinstance(value, torch.Tensor):
                value = torch.as_tensor(value)
            value = value.detach().float()
            if value.numel() != 1:
                value = value.mean()
            value = value.reshape(())
            finite = torch.isfinite(value)
            value = torch.where(finite, value, torch.zeros_like(value))
            if key in self.sums:
                self.sums[key] = self.sums[key] + value.to(self.sums[key].device)
                self.counts[key] = self.counts[key] + finite.float().to(self.counts[key].device)
            else:
                self.sums[key] = value.clone()
                self.counts[key] = finite.float()

    def __bool__(self) -> bool:
        return bool(self.sums)

    def stacked(self, device: torch.device | None = None) -> tuple[list[str], torch.Tensor]:
        """(sorted keys, one 1-D tensor: the sums of those keys, then their counts)."""
        keys = sorted(self.sums)
        device = device or self.sums[keys[0]].device
        return keys, torch.stack([self.sums[k].to(device) for k in keys] + [self.counts[k].to(device) for k in keys])

    def restore(self, keys: Sequence[str], values: Sequence[float], device: torch.device | None = None) -> None:
        """Continue a window from `stacked` values (a checkpoint's): the sums then the counts of ``keys``."""
        n = len(keys)
        if len(values) != 2 * n:
            raise ValueError(f"a log window of {n} keys needs {2 * n} values, got {len(values)}")
        self.sums = {k: torch.tensor(float(values[i]), dtype=torch.float32, device=device) for i, k in enumerate(keys)}
        self.counts = {k: torch.tensor(float(values[n + i]), dtype=torch.float32, device=device) for i, k in enumerate(keys)}

    def reduce(self, reduce_fn=None, device: torch.device | None = None) -> dict[str, float]:
        """Mean of every key; ``reduce_fn`` sums a 1-D tensor over processes (one collective call).

        Every process must hold the same keys (methods log the same terms at every step)."""
        if not self.sums:
            return {}
        keys, stacked = self.stacked(device)
        if reduce_fn is not None:
            stacked = reduce_fn(stacked)
        values = stacked.cpu().tolist()
        n = len(keys)
        out = {k: (values[i] / values[n + i] if values[n + i] > 0 else float("nan")) for i, k in enumerate(keys)}
        self.sums.clear()
        self.counts.clear()
        return out


LOG_WINDOW_KEY = "log_window"  # trainer_state.json: the training-log sums not yet logged


def log_window_state(logs: LogAccumulator, accelerator) -> dict[str, Any] | None:
    """Every process's unlogged sums and counts, for a checkpoint taken between two logging steps
    (collective: call on every process)."""
    if not logs:  # every process logs the same keys at the same steps: empty everywhere
        return None
    keys, stacked = logs.stacked(accelerator.device)
    if accelerator.num_processes > 1:
        stacked = accelerator.gather(stacked.contiguous())
    return {"keys": keys, "values": stacked.reshape(accelerator.num_processes, -1).cpu().tolist()}


def restore_log_window(logs: LogAccumulator, window: dict[str, Any] | None, accelerator) -> None:
    """Continue the window `log_window_state` saved; under another process count the main process
    carries the whole window (the means are the same)."""
    if not window:
        return
    rows = window["values"]
    if len(rows) == accelerator.num_processes:
        row = rows[accelerator.process_index]
    else:
        row = [sum(column) if accelerator.is_main_process else 0.0 for column in zip(*rows)]
    logs.restore(window["keys"], row, accelerator.device)


class JsonlLogger:
    """Append-only JSON-lines record of every logged value (``{"step", "split", ...}`` per line)."""

    def __init__(self, path: str | os.PathLike, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (_finite_or_str(v) if isinstance(v, float) else v) for k, v in record.items()}
        with self.path.open("a") as handle:
            handle.write(json.dumps(clean) + "\n")
            handle.flush()

    def truncate_after(self, step: int) -> None:
        """Drop records written after ``step`` (a resumed run replays those steps)."""
        if not self.enabled or not self.path.is_file():
            return
        kept = [r for r in read_jsonl(self.path) if int(r.get("step", 0)) <= step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)

    def history(self) -> list[dict[str, Any]]:
        return read_jsonl(self.path) if self.path.is_file() else []


def _finite_or_str(value: float):
    """NaN/inf (an undefined mean, e.g. pseudo-label accuracy with no confident row) -> JSON null."""
    return value if math.isfinite(value) else None


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    records = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line:
            records.append(json.loads(line))
    return records


def format_postfix(values: dict[str, float], keys: Iterable[str] = ("loss", "samples_per_second")) -> dict[str, str]:
    out = {}
    for key in keys:
        if key in values:
            out[key if key != "samples_per_second" else "samples/s"] = f"{values[key]:.4g}"
    return out
