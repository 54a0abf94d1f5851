"""The training loop: one Accelerate loop for every method.

`Trainer` receives built components (an `SSLMethod` wrapping its model, a training stream with
``iterate(start_step)`` and ``steps_per_epoch``, evaluation loaders) and owns everything the
methods must not know about: optimizer and schedule, Accelerate preparation, autocast, gradient
accumulation and clipping, evaluation with best-on-validation selection, checkpoints and exact
resume, trackers/JSONL/progress bar/plots, the non-finite-loss guard and the export.

`job.py` assembles the components from a recipe (`build_and_train`, `fit`); `export.py` writes and
re-checks the export.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

import torch
from torch import nn

from ..methods.base import MODEL_INPUT_KEYS, TASK_CLASSIFICATION, TASK_LANDMARKS, SSLMethod, TrainState
from . import checkpointing as ckpt
from . import manifest
from .logging import JSONL_LOG, JsonlLogger, LogAccumulator, format_postfix, resolve_trackers

LOG_WINDOW_KEY = "log_window"  # trainer_state.json: the training-log sums not yet logged
LOWER_IS_BETTER = {"nme", "rmse", "mse", "mae", "loss", "failure_rate", "error"}


class JobError(ValueError):
    """The method, model, data and settings do not fit together; the message names the fix."""


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN/inf: the run stops, naming the step, the loss terms and the last good checkpoint."""


class TrainStream(Protocol):
    steps_per_epoch: int

    def iterate(self, start_step: int = 0) -> Iterable[tuple[dict, dict | None]]: ...


# ----------------------------------------------------------------------------------------- helpers
def default_best_metric(task: str, num_labels: int) -> tuple[str, bool]:
    """(metric name, greater_is_better) used for best-on-validation selection."""
    if task == TASK_CLASSIFICATION:
        return ("auroc", True) if num_labels == 2 else ("accuracy", True)
    if task == TASK_LANDMARKS:
        return "nme", False
    return "rmse", False


def build_optimizer(method: SSLMethod, args, device_type: str) -> torch.optim.Optimizer:
    """The optimizer over ``method.parameter_groups()``: each group is split into decayed and not
    decayed (biases, norm weights: ``ndim <= 1``) parameters; a group's own lr / weight_decay win.
    ``weight_decay_scope="all"`` decays every parameter (the STiL / TIP originals' single group)."""
    names = {id(p): n for n, p in method.named_parameters()}
    decay_all = getattr(args, "weight_decay_scope", "matrices") == "all"
    exempt = lambda p: not decay_all and (p.ndim <= 1 or names.get(id(p), "").endswith(".bias"))  # noqa: E731
    groups = []
    for group in method.parameter_groups():
        params = [p for p in group["params"] if p.requires_grad]
        options = {k: v for k, v in group.items() if k != "params"}
        decay_value = options.pop("weight_decay", args.weight_decay)
        decay = [p for p in params if not exempt(p)]
        no_decay = [p for p in params if exempt(p)]
        groups += [{"params": decay, "weight_decay": decay_value, **options}, {"params": no_decay, "weight_decay": 0.0, **options}]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise JobError(f"method {method.name!r} has no trainable parameters")
    if args.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=args.learning_rate, momentum=args.momentum, nesterov=args.nesterov and args.momentum > 0)
    betas = (args.adam_beta1, args.adam_beta2)
    # fused kernels on CUDA and on the CPU (5x less CPU time than foreach for a ResNet-50's 46M parameters)
    fused = device_type in ("cuda", "cpu")
    if args.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=args.learning_rate, betas=betas, fused=fused)
    # Adam with L2-coupled weight decay (the classic formulation)
    return torch.optim.Adam(groups, lr=args.learning_rate, betas=betas, fused=fused)


def lr_lambda_factory(kind: str, max_steps: int, warmup_steps: int, interval: str, steps_per_epoch: int,
                      milestones: Iterable[float] = (), gamma: float = 0.1, warmup_from_zero: bool = False) -> Callable[[int], float]:
    """Multiplier of the peak learning rate after ``step`` optimisation steps.

    Warm-up: ``(step + 1) / (warmup_steps + 1)`` (ours: never 0, the peak right after the warm-up), or
    with ``warmup_from_zero`` the originals' (pl_bolts ``LinearWarmupCosineAnnealingLR``) ``k / (n - 1)``
    over the ``n`` warm-up units (epochs with ``interval="epoch"``, else steps): 0 in the first one,
    the peak in the last. ``multistep``: times ``gamma`` at each milestone (a fraction of max_steps if
    < 1, else a step)."""
    steps = sorted(int(round(m * max_steps)) if m < 1 else int(m) for m in milestones)

    def factor(step: int) -> float:
        if interval == "epoch":
            step = (step // max(1, steps_per_epoch)) * max(1, steps_per_epoch)
        if warmup_steps > 0 and step < warmup_steps:
            if warmup_from_zero:
                unit = max(1, steps_per_epoch) if interval == "epoch" else 1
                units = math.ceil(warmup_steps / unit)
                return (step // unit) / (units - 1) if units > 1 else 1.0
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if kind == "fixmatch_cosine":
            return math.cos(7.0 * math.pi * progress / 16.0)
        if kind == "linear":
            return 1.0 - progress
        if kind == "multistep":
            return gamma ** sum(step >= m for m in steps)
        return 1.0

    return factor


def _model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k in MODEL_INPUT_KEYS}


def split_eval_batch(batch: dict) -> tuple[dict, torch.Tensor]:
    """An eval batch -> (model inputs, labels). Accepts flat batches or a single nested view."""
    labels = batch["labels"]
    inputs = _model_inputs(batch)
    if not inputs:
        nested = [v for k, v in batch.items() if isinstance(v, dict)]
        if len(nested) != 1:
            raise KeyError(f"eval batch has no model inputs: keys {sorted(batch)}")
        inputs = _model_inputs(nested[0])
    return inputs, labels


def _to_channels_last(obj):
    if isinstance(obj, dict):
        return {k: (v.contiguous(memory_format=torch.channels_last) if k == "pixel_values" and isinstance(v, torch.Tensor) and v.ndim == 4 else _to_channels_last(v)) for k, v in obj.items()}
    return obj


def _display_images(pixels: torch.Tensor | None, config, limit: int = 16):
    """Up to ``limit`` images of an eval batch in [0, 1] (normalisation undone) as a CPU numpy array."""
    if pixels is None or pixels.ndim != 4:
        return None
    if pixels.dtype == torch.uint8:
        return (pixels[:limit].detach().float().cpu() / 255.0).numpy()
    pixels = pixels[:limit].detach().float().cpu()
    channels = pixels.shape[1]
    mean = torch.tensor(getattr(config, "image_mean", None) or [0.0] * channels, dtype=torch.float32).reshape(1, -1, 1, 1)
    std = torch.tensor(getattr(config, "image_std", None) or [1.0] * channels, dtype=torch.float32).reshape(1, -1, 1, 1)
    return (pixels * std + mean).numpy()


def _batch_size(batch: dict | None) -> int:
    if not batch:
        return 0
    for key in ("index", "labels", "monitor_labels"):
        value = batch.get(key)
        if isinstance(value, torch.Tensor):
            return int(value.shape[0])
    return 0


class Trainer:
    """The Accelerate loop for every method (see the module docstring)."""

    def __init__(
        self,
        args,  # RunArguments
        method: SSLMethod,
        train_stream: TrainStream,
        eval_loaders: dict[str, Any],
        *,
        task: str,
        num_labels: int,
        fingerprint: dict[str, Any],
        compute_metrics: Callable[..., dict[str, float]],
        accelerator=None,
        run_info: dict[str, Any] | None = None,
        target_stats: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        self.args = args
        self.targs = args.training
        self.task = task
        self.num_labels = num_labels
        self.compute_metrics = compute_metrics
        self.run_info = run_info or {}
        self.output_dir = Path(self.targs.output_dir)
        self.accelerator = accelerator if accelerator is not None else make_accelerator(args)
        acc = self.accelerator
        self.progress = ckpt.TrainerProgress(fingerprint=fingerprint)
        self.train_stream = train_stream
        check_method_options(method, self.targs)

        self.steps_per_epoch, self.max_steps = schedule_lengths(self.targs, train_stream.steps_per_epoch)
        self.eval_steps = self.targs.eval_steps or self.steps_per_epoch
        self.save_steps = self.targs.save_steps
        self.best_metric_name, self.greater_is_better = selection_rule(method, self.targs, task, num_labels)
        # regression targets standardised on the labelled rows: (mean, std) on the device, or None
        self.target_stats = None if target_stats is None else tuple(t.to(acc.device) for t in target_stats)

        if self.targs.channels_last:
            method.to(memory_format=torch.channels_last)
        if self.targs.sync_batchnorm and acc.num_processes > 1:
            method = nn.SyncBatchNorm.convert_sync_batchnorm(method)
        optimizer = build_optimizer(method, self.targs, acc.device.type)
        warmup = self.targs.warmup
        warmup_steps = int(round(warmup * self.max_steps)) if warmup < 1 else int(warmup)
        if self.targs.warmup_epochs is not None:
            warmup_steps = int(round(self.targs.warmup_epochs * self.steps_per_epoch))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lr_lambda_factory(self.targs.lr_scheduler, self.max_steps, warmup_steps, self.targs.lr_scheduler_interval,
                              self.steps_per_epoch, self.targs.lr_milestones, self.targs.lr_gamma, self.targs.warmup_from_zero),
        )
        if self.targs.torch_compile:
            compile_model(method)
        self.method, self.optimizer, self.scheduler = acc.prepare(method, optimizer, scheduler)
        # clipping sees exactly what the optimizer updates
        self.clip_parameters = [p for group in self.optimizer.param_groups for p in group["params"]]
        acc.register_for_checkpointing(self.progress)
        if hasattr(train_stream, "state_dict"):  # streamed data: the readers' positions travel with the checkpoint
            acc.register_for_checkpointing(train_stream)
        self.eval_loaders = {}
        for split, loader in eval_loaders.items():
            self.eval_loaders[split] = acc.prepare_data_loader(loader) if isinstance(loader, torch.utils.data.DataLoader) else loader

        self.train_state = TrainState(
            step=0,
            epoch=0,
            steps_per_epoch=self.steps_per_epoch,
            max_steps=self.max_steps,
            num_processes=acc.num_processes,
            task=task,
            num_labels=num_labels,
            learning_rate=float(self.scheduler.get_last_lr()[0]),
            gather=self._gather,
            reduce_sum=self._reduce_sum,
        )
        self.logs = LogAccumulator()
        if acc.is_main_process:  # listed in the run's manifest before it is written (and its truncation's temporary file)
            manifest.claim_all(self.output_dir, [JSONL_LOG, JSONL_LOG + ".tmp"])
        self.jsonl = JsonlLogger(self.output_dir / JSONL_LOG, enabled=acc.is_main_process)
        self.last_checkpoint: Path | None = None
        self.results: dict[str, Any] = {}
        # divergence diagnosis: the loss / gradient norm of the first step, and of the step right after each
        # checkpoint (computed with its weights): a checkpoint is "good" when that step was still sane
        self.reference_probe: dict[str, torch.Tensor] | None = None
        self.checkpoint_probes: list[tuple[Path, dict[str, torch.Tensor]]] = []
        self._probe_next: Path | None = None
        self.nan_step = torch.tensor(-1, device=acc.device)
        self.nan_terms: dict[str, torch.Tensor] = {}
        self.step_counter = torch.tensor(0, device=acc.device)

    # ------------------------------------------------------------------ collectives for methods
    def _gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.accelerator.num_processes == 1:
            return tensor
        return self.accelerator.gather(tensor.contiguous())

    def _reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.accelerator.num_processes == 1:
            return tensor
        return self.accelerator.reduce(tensor.clone(), reduction="sum")

    @property
    def unwrapped(self) -> SSLMethod:
        return self.accelerator.unwrap_model(self.method)

    # ------------------------------------------------------------------ resume
    def resume(self, spec: str) -> Path:
        path = ckpt.resolve_checkpoint(spec, self.output_dir)
        ckpt.check_compatible(path, self.progress.fingerprint)
        fingerprint = dict(self.progress.fingerprint)
        ckpt.load_checkpoint(self.accelerator, path, self.progress)
        self.progress.fingerprint = fingerprint
        self._restore_log_window(ckpt.read_checkpoint_state(path).get(LOG_WINDOW_KEY))
        self.last_checkpoint = path
        self.jsonl.truncate_after(self.progress.step)
        self.accelerator.print(f"resumed from {path} at step {self.progress.step}")
        return path

    # ------------------------------------------------------------------ the training-log window
    # A checkpoint between two logging steps holds the window's running sums (every process's), so the
    # first line a resumed run logs averages the whole window, as the uninterrupted run's does.
    def _log_window_state(self) -> dict[str, Any] | None:
        """Every process's unlogged sums and counts (collective: call on every process)."""
        if not self.logs:  # every process logs the same keys at the same steps: empty everywhere
            return None
        keys, stacked = self.logs.stacked(self.accelerator.device)
        if self.accelerator.num_processes > 1:
            stacked = self.accelerator.gather(stacked.contiguous())
        return {"keys": keys, "values": stacked.reshape(self.accelerator.num_processes, -1).cpu().tolist()}

    def _restore_log_window(self, window: dict[str, Any] | None) -> None:
        if not window:
            return
        acc = self.accelerator
        rows = window["values"]
        if len(rows) == acc.num_processes:
            row = rows[acc.process_index]
        else:  # another process count: the main process carries the whole window (same means)
            row = [sum(column) if acc.is_main_process else 0.0 for column in zip(*rows)]
        self.logs.restore(window["keys"], row, acc.device)

    # ------------------------------------------------------------------ non-finite guard
    def _track_nonfinite(self, loss: torch.Tensor, logs: dict[str, torch.Tensor]) -> None:
        bad = ~torch.isfinite(loss.detach().float())
        first = bad & (self.nan_step < 0)
        self.nan_step = torch.where(first, self.step_counter, self.nan_step)
        terms = {"loss": loss.detach().float().reshape(())}
        terms.update({k: v.detach().float().reshape(-1)[0] for k, v in logs.items() if v.numel() >= 1})
        for key, value in terms.items():
            value = value.to(self.nan_step.device)
            previous = self.nan_terms.get(key, torch.zeros_like(value))
            self.nan_terms[key] = torch.where(first, value, previous)

    def _check_nonfinite(self) -> None:
        flag = self.nan_step.clone()
        if self.accelerator.num_processes > 1:
            flag = self.accelerator.reduce(flag, reduction="max")
        step = int(flag.item())
        if step < 0:
            return
        terms = {k: float(v.item()) for k, v in self.nan_terms.items()}
        good, diverged = self._last_sane_checkpoint()
        if good is not None:
            where = f"{good} (the step after it still had a sane loss and gradient norm)"
        elif self.last_checkpoint is not None:
            where = "none: the loss or gradient norm had already exploded after every checkpoint written"
        else:
            where = "none (no checkpoint was written before it)"
        message = (
            f"non-finite loss at step {step + 1} (optimisation step {step // self.targs.gradient_accumulation_steps + 1}); "
            f"loss terms: {json.dumps(terms)}; last good checkpoint: {where}"
        )
        if diverged:
            message += f"; {diverged}"
        message += (
            f"; the training diverged: lower --learning_rate (now {self.targs.learning_rate:g}; try 10x lower)"
            + ("" if self.targs.max_grad_norm else " and clip gradients with --max_grad_norm 1.0")
            + (", then resume from the good checkpoint or start again" if good is not None else ", then start again")
        )
        self.jsonl.log({"step": self.progress.step, "split": "error", "message": message})
        raise NonFiniteLossError(message)

    def _record_probe(self, loss: torch.Tensor, logs: dict[str, torch.Tensor]) -> None:
        """Keep (on the device, no sync) the loss and gradient norm of the first step and of the step after
        each checkpoint."""
        if self.reference_probe is not None and self._probe_next is None:
            return
        probe = {"loss": loss.detach().float().reshape(())}
        if isinstance(logs.get("grad_norm"), torch.Tensor):
            probe["grad_norm"] = logs["grad_norm"].detach().float().reshape(())
        if self.reference_probe is None:
            self.reference_probe = probe
        if self._probe_next is not None:
            self.checkpoint_probes.append((self._probe_next, probe))
            self._probe_next = None

    def _sane(self, probe: dict[str, float], reference: dict[str, float]) -> bool:
        loss, ref_loss = probe["loss"], reference.get("loss", float("nan"))
        if not math.isfinite(loss):
            return False
        if math.isfinite(ref_loss) and abs(loss) > max(10.0 * abs(ref_loss), abs(ref_loss) + 10.0):
            return False
        grad, ref_grad = probe.get("grad_norm"), reference.get("grad_norm")
        if grad is not None:
            if not math.isfinite(grad):
                return False
            if ref_grad is not None and math.isfinite(ref_grad) and grad > 100.0 * max(ref_grad, 1e-3):
                return False
        return True

    def _last_sane_checkpoint(self) -> tuple[Path | None, str]:
        """(the newest checkpoint whose next step had a sane loss and gradient norm, a sentence on where the
        values exploded). Sane: finite, loss within 10x (or +10) of the first step's, gradient norm within 100x."""
        if self.reference_probe is None:
            return None, ""
        reference = {k: float(v.item()) for k, v in self.reference_probe.items()}
        good = None
        for path, probe_t in self.checkpoint_probes:
            probe = {k: float(v.item()) for k, v in probe_t.items()}
            if not self._sane(probe, reference):
                shown = ", ".join(f"{k} {v:.3g}" for k, v in probe.items())
                first = ", ".join(f"{k} {v:.3g}" for k, v in reference.items())
                return good, f"after {path.name} the step had {shown} (first step: {first}), so its weights are already unusable"
            if path.is_dir():
                good = path
        return good, ""

    # ------------------------------------------------------------------ evaluation
    def sync_batchnorm_statistics(self) -> None:
        """Average BatchNorm running statistics over processes (timm's ``distribute_bn``).

        DDP does not broadcast buffers here (``broadcast_buffers=False``: methods keep their banks
        consistent themselves), so each process's BN statistics follow its own shard. Averaging them
        before every evaluation and checkpoint makes evaluation, the checkpoint and the export one model."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return
        buffers = [
            buffer
            for module in self.unwrapped.modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, nn.SyncBatchNorm)
            for buffer in (module.running_mean, module.running_var)
            if buffer is not None
        ]
        if not buffers:
            return
        flat = torch.cat([b.detach().float().reshape(-1) for b in buffers])
        flat = acc.reduce(flat, reduction="mean")
        offset = 0
        for buffer in buffers:
            n = buffer.numel()
            buffer.copy_(flat[offset : offset + n].view_as(buffer).to(buffer.dtype))
            offset += n

    def _destandardize(self, predictions: torch.Tensor) -> torch.Tensor:
        if self.target_stats is None:
            return predictions
        mean, std = self.target_stats
        return predictions * std + mean

    @torch.no_grad()
    def evaluate(self, split: str = "validation", model: nn.Module | None = None) -> dict[str, float]:
        """Metrics of ``model`` (default: the method's eval model) on a split, through the method's
        ``evaluation_step`` / ``compute_eval_metrics`` (per-head metrics, losses, ...)."""
        self.sync_batchnorm_statistics()
        loader = self.eval_loaders[split]
        method = self.unwrapped
        model = model if model is not None else method.eval_model()
        was_training = model.training
        model.eval()
        outputs: dict[str, list[torch.Tensor]] = {}
        references = []
        acc = self.accelerator
        sample_images = None  # first rows of this process's first batch, for the prediction plots
        with torch.random.fork_rng(devices=[acc.device] if acc.device.type == "cuda" else []):
            for batch in loader:
                batch = _move(batch, acc.device)
                if self.targs.channels_last:
                    batch = _to_channels_last(batch)
                if sample_images is None and self.task == "landmarks":
                    sample_images = _display_images(method.eval_inputs(batch).get("pixel_values"), getattr(model, "config", None))
                with acc.autocast():
                    step_outputs = method.evaluation_step(model, batch)
                names = sorted(step_outputs)
                gathered = acc.gather_for_metrics(tuple(step_outputs[k].float().contiguous() for k in names) + (batch["labels"].contiguous(),))
                for name, value in zip(names, gathered[:-1]):
                    if name.endswith("logits") and self.task != TASK_CLASSIFICATION:
                        value = self._destandardize(value)
                    outputs.setdefault(name, []).append(value.cpu())
                references.append(gathered[-1].cpu())
        model.train(was_training)
        stacked = {k: torch.cat(v) for k, v in outputs.items()}
        references_t = torch.cat(references) if references else torch.empty(0)

        def score(predictions: torch.Tensor, refs: torch.Tensor) -> dict[str, float]:
            return self.compute_metrics(self.task, predictions, refs, self.num_labels)

        metrics = method.compute_eval_metrics(stacked, references_t, score)
        if "logits" in stacked:  # what the prediction plots draw (plots.write_prediction_plots)
            self.last_predictions = {"split": split, "logits": stacked["logits"], "references": references_t,
                                     "images": sample_images}
        metrics = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) or (isinstance(v, torch.Tensor) and v.numel() == 1)}
        metrics["num_samples"] = int(references_t.shape[0])
        return metrics

    def _is_better(self, value: float) -> bool:
        if self.best_metric_name == "last":
            return True
        best = self.progress.best_metric
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return False
        if best is None:
            return True
        return value > best if self.greater_is_better else value < best

    def _early_stopping(self, value: float | None) -> bool:
        """Lightning's EarlyStopping rule: True once ``early_stopping_patience`` evaluations in a row
        failed to beat the best value by more than ``early_stopping_min_delta``."""
        patience, progress = self.targs.early_stopping_patience, self.progress
        if not patience or self.best_metric_name == "last":
            return False
        delta, best = self.targs.early_stopping_min_delta, progress.early_stopping_best
        if value is None or math.isnan(value):
            improved = False
        elif best is None:
            improved = True
        else:
            improved = value - delta > best if self.greater_is_better else value + delta < best
        if improved:
            progress.early_stopping_best, progress.early_stopping_wait = float(value), 0
        else:
            progress.early_stopping_wait += 1
        return progress.early_stopping_wait >= patience

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        self._check_nonfinite()  # never keep a checkpoint with NaN weights as "good"
        self.sync_batchnorm_statistics()  # every process continues from the state that is saved
        extra = {"metric_for_best_model": self.best_metric_name, "max_steps": self.max_steps}
        window = self._log_window_state()
        if window is not None:
            extra[LOG_WINDOW_KEY] = window
        path = ckpt.save_checkpoint(self.accelerator, self.output_dir, self.progress, extra=extra)
        self.last_checkpoint = path
        self._probe_next = path
        if self.accelerator.is_main_process:
            ckpt.rotate_checkpoints(self.output_dir, self.targs.save_total_limit, self._protected_checkpoints())
        self.accelerator.wait_for_everyone()
        return path

    def _protected_checkpoints(self) -> set[str]:
        """save_total_limit K keeps the newest K checkpoints; the best is kept on top of them only when it
        is older (then K + 1 folders): a best among the newest K counts towards the K."""
        best = self.progress.best_checkpoint
        limit = self.targs.save_total_limit
        if not best or limit is None:
            return set()
        newest = [p.name for p in ckpt.list_checkpoints(ckpt.checkpoints_root(self.output_dir))][-limit:]
        return set() if best in newest else {best}

    # ------------------------------------------------------------------ plots
    def write_plots(self) -> list[Path]:
        if not (self.targs.plots and self.accelerator.is_main_process):
            return []
        import warnings

        from .plots import write_plots

        try:  # drawn into a staging folder, then moved into plots/: never over a picture stil did not draw
            with manifest.staged(self.output_dir, "plots") as stage:
                written = write_plots(self.jsonl.history(), stage, title=self.targs.method)
                last = getattr(self, "last_predictions", None)
                if last is not None and last["split"] == "validation":
                    from .plots import write_prediction_plots

                    config = getattr(self.unwrapped.eval_model(), "config", None)
                    id2label = getattr(config, "id2label", None) or {}
                    names = [id2label.get(i, id2label.get(str(i), str(i))) for i in range(self.num_labels)] if id2label else None
                    try:  # a picture must never end a long run
                        written += write_prediction_plots(self.task, last["logits"].numpy(), last["references"].numpy(),
                                                          stage, num_labels=self.num_labels, label_names=names,
                                                          images=last["images"], title=self.targs.method)
                    except Exception as error:  # noqa: BLE001
                        warnings.warn(f"prediction plots skipped: {type(error).__name__}: {error}")
        except manifest.ForeignFileError as error:
            warnings.warn(f"plots not written: {error}")
            return []
        return [self.output_dir / "plots" / path.name for path in written]

    # ------------------------------------------------------------------ the loop
    def _prepare_batch(self, batch: dict | None) -> dict | None:
        if batch is None:
            return None
        batch = _move(batch, self.accelerator.device)
        if self.targs.channels_last:
            batch = _to_channels_last(batch)
        if self.target_stats is not None:
            batch = _standardize_targets(batch, *self.target_stats)
        return batch

    def _optimisation_step(self, labeled, unlabeled, logs_out: dict) -> torch.Tensor:
        """One micro-step: ``num_phases`` forward/backward/step rounds with the same optimizer.

        Each phase runs through the DDP-wrapped method (gradients are all-reduced) and gets the
        clipping, the fp16 scaler and the optimizer step; phase p > 0 sees the weights phase p - 1 set."""
        acc, targs = self.accelerator, self.targs
        method = self.method
        phases = self.unwrapped.num_phases
        total = None
        for phase in range(phases):
            self.train_state.phase = phase
            with acc.accumulate(method):
                with acc.autocast():
                    loss, logs = method(labeled, unlabeled, self.train_state)
                acc.backward(loss)
                if acc.sync_gradients and targs.max_grad_norm:
                    grad_norm = acc.clip_grad_norm_(self.clip_parameters, targs.max_grad_norm)
                    if isinstance(grad_norm, torch.Tensor):
                        logs = {**logs, "grad_norm": grad_norm.detach()}
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            if phases > 1:
                logs = {(k if phase == phases - 1 else f"phase{phase}/{k}"): v for k, v in logs.items()}
            logs_out.update(logs)
            total = loss.detach() if total is None else total + loss.detach()
        self.train_state.phase = 0
        return total

    def train(self) -> dict[str, Any]:
        acc = self.accelerator
        targs = self.targs
        gas = targs.gradient_accumulation_steps
        if targs.resume_from_checkpoint:
            self.resume(targs.resume_from_checkpoint)
        stop_at = min(self.max_steps, targs.stop_after_steps) if targs.stop_after_steps else self.max_steps
        progress = self.progress
        self.step_counter.fill_(progress.micro_step)
        stream = iter(self.train_stream.iterate(progress.micro_step))
        method = self.method
        method.train()
        bar = None
        if acc.is_main_process and not targs.disable_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.max_steps, initial=progress.step, desc=f"{targs.method}", dynamic_ncols=True)
        samples_since_log = 0
        t_log = time.perf_counter()
        spe_micro = max(1, self.train_stream.steps_per_epoch)
        while progress.step < stop_at:
            epoch_before = progress.micro_step // spe_micro
            self.train_state.learning_rate = float(self.scheduler.get_last_lr()[0])
            for _ in range(gas):
                labeled, unlabeled = next(stream)
                labeled, unlabeled = self._prepare_batch(labeled), self._prepare_batch(unlabeled)
                samples_since_log += _batch_size(labeled) + _batch_size(unlabeled)
                self.train_state.step = progress.step
                self.train_state.epoch = progress.micro_step // spe_micro
                logs: dict[str, torch.Tensor] = {}
                loss = self._optimisation_step(labeled, unlabeled, logs)
                self._track_nonfinite(loss, logs)
                self._record_probe(loss, logs)
                self.logs.add({"loss": loss, **logs})
                progress.micro_step += 1
                self.step_counter += 1
            # the optimizer stepped (sync): schedule, then the method's hooks, never inside the window
            self.scheduler.step()
            self.train_state.step = progress.step + 1
            self.unwrapped.after_optimizer_step(self.train_state)
            epoch_after = progress.micro_step // spe_micro
            for finished in range(epoch_before, epoch_after):
                self.train_state.epoch = finished
                epoch_logs = self.unwrapped.on_epoch_end(self.train_state) or {}
                if epoch_logs:
                    self.logs.add(epoch_logs)
            progress.step += 1
            progress.epoch = epoch_after
            if bar is not None:
                bar.update(1)
            last = progress.step >= stop_at
            # a stop before max_steps logs no part-window: the checkpoint carries it to the resumed run
            if progress.step % targs.logging_steps == 0 or progress.step >= self.max_steps:
                values = self.logs.reduce(lambda t: acc.reduce(t, reduction="sum") if acc.num_processes > 1 else t, acc.device)
                self._check_nonfinite()
                elapsed = time.perf_counter() - t_log
                values["lr"] = float(self.scheduler.get_last_lr()[0])
                values["samples_per_second"] = samples_since_log * acc.num_processes / max(elapsed, 1e-9)
                values["epoch"] = progress.micro_step / spe_micro
                samples_since_log, t_log = 0, time.perf_counter()
                self._log("train", values)
                if bar is not None:
                    bar.set_postfix(format_postfix(values))
            improved = False
            if progress.step % self.eval_steps == 0 or progress.step >= self.max_steps:
                self._check_nonfinite()
                metrics = self.evaluate("validation")
                self._log("validation", metrics)
                if self.best_metric_name == "last":
                    value = float(progress.step)
                else:
                    value = metrics.get(self.best_metric_name)
                    if value is None:
                        raise KeyError(
                            f"metric_for_best_model={self.best_metric_name!r} is not among the validation metrics {sorted(metrics)}"
                        )
                if self._is_better(value):
                    improved = True
                    progress.best_metric = float(value)
                    progress.best_step = progress.step
                    progress.best_checkpoint = f"checkpoint-{progress.step}"
                self.write_plots()
                if self._early_stopping(value):
                    self.results["early_stopped_at_step"] = progress.step
                    last = True
            due = self.save_steps is not None and progress.step % self.save_steps == 0
            if self.save_steps is None and progress.step % self.eval_steps == 0:
                due = True
            if improved or due or last:
                self.save_checkpoint()
            if "early_stopped_at_step" in self.results:
                break
        if bar is not None:
            bar.close()
        self._check_nonfinite()
        self.results["stopped_at_step"] = progress.step
        self.results["finished"] = progress.step >= self.max_steps or "early_stopped_at_step" in self.results
        return self.results

    def _log(self, split: str, values: dict[str, Any]) -> None:
        record = {"step": self.progress.step, "split": split, **values}
        self.jsonl.log(record)
        scalars = {f"{split}/{k}": v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.accelerator.trackers:
            self.accelerator.log(scalars, step=self.progress.step)

    # ------------------------------------------------------------------ selection + test
    def load_best(self) -> int | None:
        """Load the best-on-validation checkpoint's weights into the method (keeps the progress)."""
        if not self.progress.best_checkpoint:
            return None
        path = ckpt.checkpoints_root(self.output_dir) / self.progress.best_checkpoint
        if not path.is_dir():
            raise FileNotFoundError(f"best checkpoint {path} is missing")
        if self.progress.best_step != self.progress.step:
            snapshot = self.progress.state_dict()
            ckpt.load_checkpoint(self.accelerator, path, self.progress)
            self.progress.load_state_dict(snapshot)
        return self.progress.best_step

    def test(self, split: str = "test") -> dict[str, float]:
        metrics = self.evaluate(split)
        self._log(split, metrics)
        return metrics

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """Full state dict of the eval model (works for DDP/FSDP via accelerator.get_state_dict)."""
        unwrapped = self.unwrapped
        eval_model = unwrapped.eval_model()
        prefix = None
        for name, module in unwrapped.named_modules():
            if module is eval_model:
                prefix = name
                break
        if prefix is None:
            return eval_model.state_dict()
        full = self.accelerator.get_state_dict(self.method)
        if prefix == "":
            return full
        cut = len(prefix) + 1
        return {k[cut:]: v for k, v in full.items() if k.startswith(prefix + ".")}


def schedule_lengths(targs, micro_steps_per_epoch: int) -> tuple[int, int]:
    """(optimisation steps per epoch, max_steps) from the stream's micro-steps per epoch, the gradient
    accumulation and ``max_steps`` / ``num_train_epochs``. The trainer and a method's ``setup``
    (``DataInfo``) both read these, so they are computed here only."""
    gas = targs.gradient_accumulation_steps
    steps_per_epoch = max(1, micro_steps_per_epoch // gas)
    if targs.max_steps > 0:
        return steps_per_epoch, targs.max_steps
    return steps_per_epoch, max(1, math.ceil(targs.num_train_epochs * micro_steps_per_epoch / gas))


def selection_rule(method: SSLMethod, targs, task: str, num_labels: int) -> tuple[str, bool]:
    """(validation metric, greater_is_better) selecting the best model; ("last", True) keeps the last
    step. Precedence: --metric_for_best_model, then the method's ``selection``, then the task default."""
    if targs.metric_for_best_model:
        name = targs.metric_for_best_model
        if name == "last":
            return "last", True
        greater = targs.greater_is_better
        if greater is None:
            greater = name.split("/")[-1] not in LOWER_IS_BETTER
        return name, greater
    if method.selection == "last":
        return "last", True
    if method.selection is not None:
        name, greater = method.selection
        return name, greater if targs.greater_is_better is None else targs.greater_is_better
    name, greater = default_best_metric(task, num_labels)
    return name, greater if targs.greater_is_better is None else targs.greater_is_better


def check_method_options(method: SSLMethod, targs) -> None:
    """Refuse the combinations the loop cannot run correctly, before anything is prepared."""
    if method.num_phases > 1:
        if targs.gradient_accumulation_steps > 1:
            raise JobError(
                f"method {method.name!r} takes {method.num_phases} optimisation steps per iteration (meta-learning), "
                "which gradient accumulation would mix; use gradient_accumulation_steps 1 and a larger batch"
            )
        if targs.torch_compile:
            raise JobError(
                f"method {method.name!r} differentiates through an optimisation step (double backward), which "
                "torch.compile does not support; drop --torch_compile"
            )


def compile_model(method, backend: str = "inductor") -> None:
    """``torch.compile`` the method's model in place (its forward only; parameter names, checkpoints
    and exports are unchanged). Not the method: its Python-side state (step, epoch, EMA momentum)
    would be specialised by dynamo and recompile every step (measured: 15x slower on the CPU)."""
    method.model.compile(backend=backend)


def _standardize_targets(batch: dict, mean: torch.Tensor, std: torch.Tensor) -> dict:
    """Regression: ``labels`` / ``monitor_labels`` (top level and inside views) -> (y - mean) / std."""
    out = {}
    for key, value in batch.items():
        if key in ("labels", "monitor_labels") and isinstance(value, torch.Tensor) and value.is_floating_point():
            out[key] = (value - mean) / std
        elif isinstance(value, dict):
            out[key] = _standardize_targets(value, mean, std)
        else:
            out[key] = value
    return out


def _move(batch, device):
    from accelerate.utils import send_to_device

    return send_to_device(batch, device, non_blocking=True)


def cpu_engine_message(engine: str) -> str:
    """FSDP or DeepSpeed asked for on the CPU: Accelerate selects them only on an accelerator device
    (its state keeps MULTI_CPU, i.e. DDP over gloo), so the run would not be what was asked."""
    return (f"{engine} was asked for on the CPU, where Accelerate does not run it (the run would silently be DDP): "
            f"on the CPU use accelerate_configs/cpu.yaml with --num_processes N (DDP over gloo); run {engine} on GPUs")


def make_accelerator(args):
    """An Accelerator configured from the training arguments (trackers validated first)."""
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.utils import ProjectConfiguration

    targs = args.training
    trackers = resolve_trackers(targs.report_to)
    kwargs = {}
    if targs.mixed_precision is not None:
        kwargs["mixed_precision"] = targs.mixed_precision
    # torchrun-launched processes on a machine without GPU: gloo on CPU (accelerate needs cpu=True)
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or (world > 1 and not torch.cuda.is_available()):
        kwargs["cpu"] = True
        for engine, name in (("FSDP", "FSDP"), ("DEEPSPEED", "DeepSpeed")):
            if os.environ.get(f"ACCELERATE_USE_{engine}", "").lower() in ("1", "true", "yes"):
                raise JobError(cpu_engine_message(name))
    accelerator = Accelerator(
        gradient_accumulation_steps=targs.gradient_accumulation_steps,
        log_with=trackers or None,
        project_config=ProjectConfiguration(
            project_dir=targs.output_dir, logging_dir=str(Path(targs.output_dir) / "logs"), automatic_checkpoint_naming=False
        ),
        step_scheduler_with_optimizer=False,
        # broadcast_buffers=False: banks, queues and teachers are the method's to keep consistent (through
        # state.gather / reduce_sum); BN statistics are averaged before evaluation and checkpoints.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=targs.find_unused_parameters,
                                                       broadcast_buffers=False)],
        **kwargs,
    )
    return accelerator


