"""The training loop: one Accelerate loop for every method.

`Trainer` receives built components (an `SSLMethod` wrapping its model, a training stream with
``iterate(start_step)`` and ``steps_per_epoch``, evaluation loaders) and owns everything the
methods must not know about: Accelerate preparation, autocast, gradient accumulation and clipping,
evaluation with best-on-validation selection, checkpoints and exact resume, logs and plots.

Its pieces live beside it: optimizer and schedule (optim.py), the Accelerator (accelerator.py),
selection and early stopping (selection.py), the non-finite-loss guard (divergence.py), log
reduction and the JSONL record (tracking.py), checkpoint folders and rotation (checkpointing.py),
pictures (plots.py). `job.py` assembles the components from a recipe (`build_and_train`, `fit`);
`export.py` writes and re-checks the export.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

import torch
from torch import nn

from ..methods.base import TASK_CLASSIFICATION, SSLMethod, TrainState
from . import checkpointing as ckpt
from . import manifest
from .accelerator import average_batchnorm_statistics, check_sharding_fits, make_accelerator, whole_parameters
from .batches import batch_size, display_images, move_to_device, standardize_targets, to_channels_last
from .divergence import DivergenceGuard, NonFiniteLossError
from .errors import JobError
from .optim import build_optimizer, build_scheduler, schedule_lengths
from .selection import early_stopping_update, is_better, selection_rule, selection_value
from .tracking import (JSONL_LOG, LOG_WINDOW_KEY, JsonlLogger, LogAccumulator, format_postfix, log_window_state,
                       restore_log_window)


class TrainStream(Protocol):
    """What the loop draws from: (labelled, unlabelled or None) batches from micro-step ``start_step`` on."""

    steps_per_epoch: int  # micro-steps (batches) per epoch

    def iterate(self, start_step: int = 0) -> Iterable[tuple[dict, dict | None]]: ...


@dataclass
class Predictions:
    """One evaluation's outputs, what the prediction plots draw (plots.write_prediction_plots)."""

    split: str
    logits: torch.Tensor  # CPU, every row of the split (de-standardised for regression and landmarks)
    references: torch.Tensor
    images: Any = None  # landmarks: the first rows' images in [0, 1] (numpy), else None


@dataclass
class Evaluation:
    """What `Trainer.evaluate` computed: the metrics and, when the method's evaluation step returns
    ``logits``, the predictions."""

    metrics: dict[str, float]
    predictions: Predictions | None = None


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

        # epochs are counted in the stream's micro-steps (batches); the schedule in optimisation steps
        self.micro_steps_per_epoch = max(1, train_stream.steps_per_epoch)
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
        scheduler = build_scheduler(optimizer, self.targs, self.steps_per_epoch, self.max_steps)
        if self.targs.torch_compile:
            compile_model(method)
        self.method, self.optimizer, self.scheduler = acc.prepare(method, optimizer, scheduler)
        check_sharding_fits(self.method, method)
        # clipping sees exactly what the optimizer updates; under FSDP in the module's order (Accelerate compares
        # this list with the model's parameters, which for another order of equal length compares tensors),
        # otherwise in the optimizer's, so the norm is summed in the order every earlier run summed it
        self.clip_parameters = [p for group in self.optimizer.param_groups for p in group["params"]]
        if acc.is_fsdp2:
            updated = {id(p) for p in self.clip_parameters}
            self.clip_parameters = [p for p in self.method.parameters() if id(p) in updated]
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
        self.divergence = DivergenceGuard(
            acc.device, gradient_accumulation_steps=self.targs.gradient_accumulation_steps,
            learning_rate=self.targs.learning_rate, max_grad_norm=self.targs.max_grad_norm,
            reduce_max=(lambda t: acc.reduce(t, reduction="max")) if acc.num_processes > 1 else None,
        )

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

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict[str, Any]:
        """Optimisation steps until max_steps (or stop_after_steps, or early stopping). After each: the
        method's hooks, then what is due at that step: a log line, an evaluation, a checkpoint."""
        acc, targs, progress = self.accelerator, self.targs, self.progress
        if targs.resume_from_checkpoint:
            self.resume(targs.resume_from_checkpoint)
        stop_at = min(self.max_steps, targs.stop_after_steps) if targs.stop_after_steps else self.max_steps
        self.divergence.start(progress.micro_step)
        stream = iter(self.train_stream.iterate(progress.micro_step))
        self.method.train()
        bar = None
        if acc.is_main_process and not targs.disable_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.max_steps, initial=progress.step, desc=f"{targs.method}", dynamic_ncols=True)
        samples_since_log, t_log = 0, time.perf_counter()
        spe_micro = self.micro_steps_per_epoch
        while progress.step < stop_at:
            # one optimisation step: gradient_accumulation_steps micro-steps (batches)
            epoch_before = progress.micro_step // spe_micro
            self.train_state.learning_rate = float(self.scheduler.get_last_lr()[0])
            for _ in range(targs.gradient_accumulation_steps):
                labeled, unlabeled = next(stream)
                labeled, unlabeled = self._prepare_batch(labeled), self._prepare_batch(unlabeled)
                samples_since_log += batch_size(labeled) + batch_size(unlabeled)
                self.train_state.step = progress.step
                self.train_state.epoch = progress.micro_step // spe_micro
                loss, logs = self._micro_step(labeled, unlabeled)
                self.divergence.observe(loss, logs)
                self.logs.add({"loss": loss, **logs})
                progress.micro_step += 1
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

            # what is due after this step
            step, at_end = progress.step, progress.step >= self.max_steps
            last = step >= stop_at
            # a stop before max_steps logs no part-window: the checkpoint carries it to the resumed run
            log_due = step % targs.logging_steps == 0 or at_end
            eval_due = step % self.eval_steps == 0 or at_end
            save_due = ckpt.checkpoint_due(step, self.save_steps, self.eval_steps)
            if log_due or eval_due or save_due or last:
                self._stop_if_diverged()  # before a non-finite loss reaches a log line, a selection or a checkpoint
            if log_due:
                values = self._log_training_window(samples_since_log, time.perf_counter() - t_log)
                samples_since_log, t_log = 0, time.perf_counter()
                if bar is not None:
                    bar.set_postfix(format_postfix(values))
            improved = stop_early = False
            if eval_due:
                improved, stop_early = self._validate_and_select()
            if improved or save_due or last or stop_early:
                self.save_checkpoint()
            if stop_early:
                break
        if bar is not None:
            bar.close()
        self.results["stopped_at_step"] = progress.step
        self.results["finished"] = progress.step >= self.max_steps or "early_stopped_at_step" in self.results
        return self.results

    def _prepare_batch(self, batch: dict | None) -> dict | None:
        if batch is None:
            return None
        batch = move_to_device(batch, self.accelerator.device)
        if self.targs.channels_last:
            batch = to_channels_last(batch)
        if self.target_stats is not None:
            batch = standardize_targets(batch, *self.target_stats)
        return batch

    def _micro_step(self, labeled, unlabeled) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One micro-step (one batch): the method's ``num_phases`` rounds of `_forward_backward_update`
        on it. A meta-learning method (``num_phases`` > 1, no gradient accumulation) thus takes several
        optimizer steps per batch, phase p > 0 seeing the weights phase p - 1 set. Returns the summed
        loss and the logged terms (an earlier phase's under ``phase{p}/``)."""
        phases = self.unwrapped.num_phases
        total, logs_out = None, {}
        for phase in range(phases):
            self.train_state.phase = phase
            loss, logs = self._forward_backward_update(labeled, unlabeled)
            if phases > 1:
                logs = {(k if phase == phases - 1 else f"phase{phase}/{k}"): v for k, v in logs.items()}
            logs_out.update(logs)
            total = loss.detach() if total is None else total + loss.detach()
        self.train_state.phase = 0
        return total, logs_out

    def _forward_backward_update(self, labeled, unlabeled) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Forward and backward through the DDP-wrapped method; on the last micro-step of an accumulation
        window (gradients synchronised) also clipping, the fp16 scaler and the optimizer step (Accelerate
        skips the step and zero_grad inside the window)."""
        acc, targs = self.accelerator, self.targs
        with acc.accumulate(self.method):
            with acc.autocast():
                loss, logs = self.method(labeled, unlabeled, self.train_state)
            acc.backward(loss)
            if acc.sync_gradients and targs.max_grad_norm:
                grad_norm = acc.clip_grad_norm_(self.clip_parameters, targs.max_grad_norm)
                if isinstance(grad_norm, torch.Tensor):
                    logs = {**logs, "grad_norm": full_tensor(grad_norm).detach()}
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss, logs

    def _stop_if_diverged(self) -> None:
        """Raise `NonFiniteLossError` (and record it in the JSONL log) once a loss was non-finite: the one
        place the loop checks (collective: every process calls it at the same steps)."""
        message = self.divergence.failure_message(self.last_checkpoint)
        if message is None:
            return
        self.jsonl.log({"step": self.progress.step, "split": "error", "message": message})
        raise NonFiniteLossError(message)

    def _log_training_window(self, samples: int, seconds: float) -> dict[str, float]:
        """Log the training window's means (one collective) with the learning rate, throughput and epoch."""
        acc = self.accelerator
        values = self.logs.reduce(lambda t: acc.reduce(t, reduction="sum") if acc.num_processes > 1 else t, acc.device)
        values["lr"] = float(self.scheduler.get_last_lr()[0])
        values["samples_per_second"] = samples * acc.num_processes / max(seconds, 1e-9)
        values["epoch"] = self.progress.micro_step / self.micro_steps_per_epoch
        self.log_metrics("train", values)
        return values

    def _validate_and_select(self) -> tuple[bool, bool]:
        """Evaluate on validation, log, keep the best, draw the plots: (improved, stop early)."""
        progress, targs = self.progress, self.targs
        evaluation = self.evaluate("validation")
        self.log_metrics("validation", evaluation.metrics)
        value = selection_value(self.best_metric_name, evaluation.metrics, progress.step)
        improved = is_better(value, progress.best_metric, self.best_metric_name, self.greater_is_better)
        if improved:
            progress.best_metric = float(value)
            progress.best_step = progress.step
            progress.best_checkpoint = f"checkpoint-{progress.step}"
        self.write_plots(evaluation.predictions)
        stop_early = early_stopping_update(progress, value, targs.early_stopping_patience, targs.early_stopping_min_delta,
                                           self.best_metric_name, self.greater_is_better)
        if stop_early:
            self.results["early_stopped_at_step"] = progress.step
        return improved, stop_early

    def log_metrics(self, split: str, values: dict[str, Any]) -> None:
        """One record ``{"step", "split", **values}`` in the JSONL log and its numbers in the trackers."""
        record = {"step": self.progress.step, "split": split, **values}
        self.jsonl.log(record)
        scalars = {f"{split}/{k}": v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.accelerator.trackers:
            self.accelerator.log(scalars, step=self.progress.step)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, split: str = "validation", model: nn.Module | None = None) -> Evaluation:
        """Metrics and predictions of ``model`` (default: the method's eval model) on a split, through the
        method's ``evaluation_step`` / ``compute_eval_metrics`` (per-head metrics, losses, ...)."""
        average_batchnorm_statistics(self.unwrapped, self.accelerator)
        loader = self.eval_loaders[split]
        method = self.unwrapped
        model = model if model is not None else method.eval_model()
        was_training = model.training
        model.eval()
        outputs: dict[str, list[torch.Tensor]] = {}
        references = []
        acc = self.accelerator
        sample_images = None  # first rows of this process's first batch, for the prediction plots
        with torch.random.fork_rng(devices=[acc.device] if acc.device.type == "cuda" else []), whole_parameters(self.method):
            for batch in loader:
                batch = move_to_device(batch, acc.device)
                if self.targs.channels_last:
                    batch = to_channels_last(batch)
                if sample_images is None and self.task == "landmarks":
                    sample_images = display_images(method.eval_inputs(batch).get("pixel_values"), getattr(model, "config", None))
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
        metrics = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) or (isinstance(v, torch.Tensor) and v.numel() == 1)}
        metrics["num_samples"] = int(references_t.shape[0])
        predictions = None
        if "logits" in stacked:
            predictions = Predictions(split, stacked["logits"], references_t, sample_images)
        return Evaluation(metrics, predictions)

    def _destandardize(self, predictions: torch.Tensor) -> torch.Tensor:
        if self.target_stats is None:
            return predictions
        mean, std = self.target_stats
        return predictions * std + mean

    def test(self, split: str = "test") -> dict[str, float]:
        """Evaluate on ``split`` and log the metrics."""
        metrics = self.evaluate(split).metrics
        self.log_metrics(split, metrics)
        return metrics

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

    def write_plots(self, predictions: Predictions | None = None) -> list[Path]:
        """The run's curves and, given a validation pass's ``predictions``, its prediction pictures
        (main process, unless ``--plots false``)."""
        if not (self.targs.plots and self.accelerator.is_main_process):
            return []
        from .plots import write_run_plots

        drawn = {}
        if predictions is not None:
            config = getattr(self.unwrapped.eval_model(), "config", None)
            id2label = getattr(config, "id2label", None) or {}
            names = [id2label.get(i, id2label.get(str(i), str(i))) for i in range(self.num_labels)] if id2label else None
            drawn = dict(task=self.task, logits=predictions.logits.numpy(), references=predictions.references.numpy(),
                         images=predictions.images, num_labels=self.num_labels, label_names=names)
        return write_run_plots(self.output_dir, self.jsonl.history(), title=self.targs.method, **drawn)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        """A checkpoint of the current step, then rotation (the loop checks for divergence first, so no
        checkpoint holds NaN weights)."""
        average_batchnorm_statistics(self.unwrapped, self.accelerator)  # every process continues from the state that is saved
        extra = {"metric_for_best_model": self.best_metric_name, "max_steps": self.max_steps}
        window = log_window_state(self.logs, self.accelerator)
        if window is not None:
            extra[LOG_WINDOW_KEY] = window
        path = ckpt.save_checkpoint(self.accelerator, self.output_dir, self.progress, extra=extra)
        self.last_checkpoint = path
        self.divergence.checkpoint_written(path)
        if self.accelerator.is_main_process:
            protect = ckpt.protected_checkpoints(self.output_dir, self.progress.best_checkpoint, self.targs.save_total_limit)
            ckpt.rotate_checkpoints(self.output_dir, self.targs.save_total_limit, protect)
        self.accelerator.wait_for_everyone()
        return path

    def resume(self, spec: str) -> Path:
        """Continue from a checkpoint (a path or "latest"): weights, optimizer, schedule, RNG, progress and
        the unlogged part of the logging window; the JSONL log is cut back to its step."""
        path = ckpt.resolve_checkpoint(spec, self.output_dir)
        ckpt.check_compatible(path, self.progress.fingerprint)
        fingerprint = dict(self.progress.fingerprint)
        ckpt.load_checkpoint(self.accelerator, path, self.progress)
        self.progress.fingerprint = fingerprint
        restore_log_window(self.logs, ckpt.read_checkpoint_state(path).get(LOG_WINDOW_KEY), self.accelerator)
        self.last_checkpoint = path
        self.jsonl.truncate_after(self.progress.step)
        self.accelerator.print(f"resumed from {path} at step {self.progress.step}")
        return path

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


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A plain tensor of a value FSDP2 may return as a DTensor (a replicated gradient norm)."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def compile_model(method, backend: str = "inductor") -> None:
    """``torch.compile`` the method's model in place (its forward only; parameter names, checkpoints
    and exports are unchanged). Not the method: its Python-side state (step, epoch, EMA momentum)
    would be specialised by dynamo and recompile every step (measured: 15x slower on the CPU)."""
    method.model.compile(backend=backend)
