"""The training loop: one Accelerate loop for every method.

`Trainer` receives built components (an `SSLMethod` wrapping its model, a training stream with
``iterate(start_step)`` and ``steps_per_epoch``, evaluation loaders) and owns everything the
methods must not know about: optimizer and schedule, Accelerate preparation, autocast, gradient
accumulation and clipping, evaluation with best-on-validation selection, checkpoints and exact
resume, trackers/JSONL/progress bar/plots, the non-finite-loss guard and the export.

`train.py` assembles the components from a recipe (`build_and_train`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

import torch
from torch import nn

from ..methods.base import TASK_CLASSIFICATION, TASK_LANDMARKS, TASK_REGRESSION, SSLMethod, TrainState
from . import checkpointing as ckpt
from .logging import JsonlLogger, LogAccumulator, format_postfix, resolve_trackers, tracker_config

MODEL_INPUT_KEYS = ("pixel_values", "categorical_values", "continuous_values", "missing_mask")
LOWER_IS_BETTER = {"nme", "rmse", "mse", "mae", "loss", "failure_rate", "error"}


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


def build_optimizer(params_module: SSLMethod, args, device_type: str) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, param in params_module.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name.endswith(".bias") else decay).append(param)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if args.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=args.learning_rate, momentum=args.momentum, nesterov=args.nesterov and args.momentum > 0)
    betas = (args.adam_beta1, args.adam_beta2)
    if args.optimizer == "adamw":
        fused = device_type == "cuda"
        return torch.optim.AdamW(groups, lr=args.learning_rate, betas=betas, fused=fused)
    # Adam with L2-coupled weight decay (the classic formulation)
    return torch.optim.Adam(groups, lr=args.learning_rate, betas=betas, fused=device_type == "cuda")


def lr_lambda_factory(kind: str, max_steps: int, warmup_steps: int, interval: str, steps_per_epoch: int) -> Callable[[int], float]:
    """Multiplier of the peak learning rate after ``step`` optimisation steps."""

    def factor(step: int) -> float:
        if interval == "epoch":
            step = (step // max(1, steps_per_epoch)) * max(1, steps_per_epoch)
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if kind == "fixmatch_cosine":
            return math.cos(7.0 * math.pi * progress / 16.0)
        if kind == "linear":
            return 1.0 - progress
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


def _batch_size(batch: dict | None) -> int:
    if not batch:
        return 0
    for key in ("index", "labels", "monitor_labels"):
        value = batch.get(key)
        if isinstance(value, torch.Tensor):
            return int(value.shape[0])
    return 0


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    versions = {}
    for name in ("stil", "torch", "accelerate", "transformers", "huggingface_hub", "datasets", "timm", "numpy"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    import platform

    versions["python"] = platform.python_version()
    return versions


def git_commit(path: str | os.PathLike = ".") -> str | None:
    import subprocess

    try:
        out = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            dirty = subprocess.run(["git", "-C", str(path), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10)
            return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return None


# ----------------------------------------------------------------------------------------- trainer
class Trainer:
    """Accelerate loop. ``evaluate_fn(model, split) -> metrics`` is built from ``eval_loaders``."""

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

        gas = self.targs.gradient_accumulation_steps
        self.steps_per_epoch = max(1, train_stream.steps_per_epoch // gas)
        if self.targs.max_steps > 0:
            self.max_steps = self.targs.max_steps
        else:
            self.max_steps = max(1, math.ceil(self.targs.num_train_epochs * train_stream.steps_per_epoch / gas))
        self.eval_steps = self.targs.eval_steps or self.steps_per_epoch
        self.save_steps = self.targs.save_steps
        metric, greater = default_best_metric(task, num_labels)
        self.best_metric_name = self.targs.metric_for_best_model or metric
        if self.targs.greater_is_better is not None:
            self.greater_is_better = self.targs.greater_is_better
        else:
            self.greater_is_better = self.best_metric_name.split("/")[-1] not in LOWER_IS_BETTER and (self.targs.metric_for_best_model is not None or greater)

        if self.targs.channels_last:
            method.to(memory_format=torch.channels_last)
        optimizer = build_optimizer(method, self.targs, acc.device.type)
        warmup = self.targs.warmup
        warmup_steps = int(round(warmup * self.max_steps)) if warmup < 1 else int(warmup)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lr_lambda_factory(self.targs.lr_scheduler, self.max_steps, warmup_steps, self.targs.lr_scheduler_interval, self.steps_per_epoch),
        )
        self.method, self.optimizer, self.scheduler = acc.prepare(method, optimizer, scheduler)
        acc.register_for_checkpointing(self.progress)
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
            gather=self._gather,
            reduce_sum=self._reduce_sum,
        )
        self.logs = LogAccumulator()
        self.jsonl = JsonlLogger(self.output_dir / "logs" / "metrics.jsonl", enabled=acc.is_main_process)
        self.last_checkpoint: Path | None = None
        self.results: dict[str, Any] = {}
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
        self.accelerator.load_state(str(path))
        self.progress.fingerprint = fingerprint
        self.last_checkpoint = path
        self.jsonl.truncate_after(self.progress.step)
        self.accelerator.print(f"resumed from {path} at step {self.progress.step}")
        return path

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
        where = str(self.last_checkpoint) if self.last_checkpoint else "none (no checkpoint was written before it)"
        message = (
            f"non-finite loss at step {step + 1} (optimisation step {step // self.targs.gradient_accumulation_steps + 1}); "
            f"loss terms: {json.dumps(terms)}; last good checkpoint: {where}"
        )
        self.jsonl.log({"step": self.progress.step, "split": "error", "message": message})
        raise NonFiniteLossError(message)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, split: str = "validation", model: nn.Module | None = None) -> dict[str, float]:
        loader = self.eval_loaders[split]
        model = model if model is not None else self.unwrapped.eval_model()
        was_training = model.training
        model.eval()
        predictions, references = [], []
        acc = self.accelerator
        with torch.random.fork_rng(devices=[acc.device] if acc.device.type == "cuda" else []):
            for batch in loader:
                batch = _move(batch, acc.device)
                inputs, labels = split_eval_batch(batch)
                if self.targs.channels_last:
                    inputs = _to_channels_last(inputs)
                with acc.autocast():
                    outputs = model(**inputs)
                logits = outputs["logits"] if isinstance(outputs, dict) or hasattr(outputs, "keys") else outputs[0]
                logits, labels = acc.gather_for_metrics((logits.float().contiguous(), labels.contiguous()))
                predictions.append(logits.cpu())
                references.append(labels.cpu())
        model.train(was_training)
        predictions_t = torch.cat(predictions) if predictions else torch.empty(0)
        references_t = torch.cat(references) if references else torch.empty(0)
        metrics = self.compute_metrics(self.task, predictions_t, references_t, self.num_labels)
        metrics = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) or (isinstance(v, torch.Tensor) and v.numel() == 1)}
        metrics["num_samples"] = int(references_t.shape[0])
        return metrics

    def _is_better(self, value: float) -> bool:
        best = self.progress.best_metric
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return False
        if best is None:
            return True
        return value > best if self.greater_is_better else value < best

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        self._check_nonfinite()  # never keep a checkpoint with NaN weights as "good"
        path = ckpt.save_checkpoint(
            self.accelerator,
            self.output_dir,
            self.progress,
            extra={"metric_for_best_model": self.best_metric_name, "max_steps": self.max_steps},
        )
        self.last_checkpoint = path
        if self.accelerator.is_main_process:
            protect = {self.progress.best_checkpoint} if self.progress.best_checkpoint else set()
            ckpt.rotate_checkpoints(self.output_dir, self.targs.save_total_limit, protect)
        self.accelerator.wait_for_everyone()
        return path

    # ------------------------------------------------------------------ plots
    def write_plots(self) -> list[Path]:
        if not (self.targs.plots and self.accelerator.is_main_process):
            return []
        from .plots import write_plots

        return write_plots(self.jsonl.history(), self.output_dir / "plots", title=self.targs.method)

    # ------------------------------------------------------------------ the loop
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
        params = [p for p in method.parameters() if p.requires_grad]
        spe_micro = max(1, self.train_stream.steps_per_epoch)
        while progress.step < stop_at:
            for _ in range(gas):
                labeled, unlabeled = next(stream)
                labeled = _move(labeled, acc.device)
                unlabeled = _move(unlabeled, acc.device) if unlabeled is not None else None
                if targs.channels_last:
                    labeled, unlabeled = _to_channels_last(labeled), _to_channels_last(unlabeled)
                samples_since_log += _batch_size(labeled) + _batch_size(unlabeled)
                self.train_state.step = progress.step
                self.train_state.epoch = progress.micro_step // spe_micro
                with acc.accumulate(method):
                    with acc.autocast():
                        loss, logs = method(labeled, unlabeled, self.train_state)
                    acc.backward(loss)
                    if acc.sync_gradients and targs.max_grad_norm:
                        grad_norm = acc.clip_grad_norm_(params, targs.max_grad_norm)
                        if isinstance(grad_norm, torch.Tensor):
                            logs = {**logs, "grad_norm": grad_norm.detach()}
                    self.optimizer.step()
                    if acc.sync_gradients:
                        self.scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                self._track_nonfinite(loss, logs)
                self.logs.add({"loss": loss.detach(), **logs})
                progress.micro_step += 1
                self.step_counter += 1
                if acc.sync_gradients:
                    self.train_state.step = progress.step + 1
                    self.unwrapped.after_optimizer_step(self.train_state)
                if progress.micro_step % spe_micro == 0:
                    self.train_state.epoch = progress.micro_step // spe_micro - 1
                    epoch_logs = self.unwrapped.on_epoch_end(self.train_state) or {}
                    if epoch_logs:
                        self.logs.add(epoch_logs)
            progress.step += 1
            progress.epoch = progress.micro_step // spe_micro
            if bar is not None:
                bar.update(1)
            last = progress.step >= stop_at
            if progress.step % targs.logging_steps == 0 or last:
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
                value = metrics.get(self.best_metric_name.split("/")[-1])
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
            due = self.save_steps is not None and progress.step % self.save_steps == 0
            if self.save_steps is None and progress.step % self.eval_steps == 0:
                due = True
            if improved or due or last:
                self.save_checkpoint()
        if bar is not None:
            bar.close()
        self._check_nonfinite()
        self.results["stopped_at_step"] = progress.step
        self.results["finished"] = progress.step >= self.max_steps
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
            self.accelerator.load_state(str(path))
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


def _move(batch, device):
    from accelerate.utils import send_to_device

    return send_to_device(batch, device, non_blocking=True)


def make_accelerator(args):
    """An Accelerator configured from the training arguments (trackers validated first)."""
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.utils import ProjectConfiguration

    targs = args.training
    trackers = resolve_trackers(targs.report_to)
    kwargs = {}
    if targs.mixed_precision is not None:
        kwargs["mixed_precision"] = targs.mixed_precision
    if targs.torch_compile:
        kwargs["dynamo_backend"] = "inductor"
    # torchrun-launched processes on a machine without GPU: gloo on CPU (accelerate needs cpu=True)
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or (world > 1 and not torch.cuda.is_available()):
        kwargs["cpu"] = True
    accelerator = Accelerator(
        gradient_accumulation_steps=targs.gradient_accumulation_steps,
        log_with=trackers or None,
        project_config=ProjectConfiguration(
            project_dir=targs.output_dir, logging_dir=str(Path(targs.output_dir) / "logs"), automatic_checkpoint_naming=False
        ),
        step_scheduler_with_optimizer=False,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=targs.find_unused_parameters)],
        **kwargs,
    )
    return accelerator


# ========================================================================================= assembly
def stil_cache_dir() -> Path:
    return Path(os.environ.get("STIL_CACHE", Path.home() / ".cache" / "stil"))


def synthetic_dataset_path(data_args) -> Path:
    root = Path(data_args.dataset_cache_dir) if data_args.dataset_cache_dir else stil_cache_dir() / "datasets"
    fraction = data_args.labeled_fraction if data_args.labeled_fraction is not None else 0.1
    name = f"synthetic-{data_args.synthetic_task}-n{data_args.synthetic_num_samples}-s{data_args.synthetic_image_size}-l{fraction:g}"
    return root / name


def prepare_dataset(args, accelerator) -> tuple[str, Any, Any, Any]:
    """Resolve the dataset argument: build the embedded synthetic dataset when none is given.

    Returns ``(source, DatasetDict, DatasetMetadata, TabularSchema | None)``."""
    from data_utils.io import load_dataset

    data = args.data
    source = data.dataset
    if source is None:
        from data_utils.synthetic import make_synthetic_dataset

        path = synthetic_dataset_path(data)
        with accelerator.main_process_first():
            if accelerator.is_main_process and not path.exists():
                accelerator.print(f"building the synthetic {data.synthetic_task} dataset into {path}")
                make_synthetic_dataset(
                    data.synthetic_task, path, num_samples=data.synthetic_num_samples,
                    image_size=data.synthetic_image_size,
                    labeled_fraction=data.labeled_fraction if data.labeled_fraction is not None else 0.1,
                )
        source = str(path)
    dataset_dict, metadata, schema = load_dataset(source)
    return source, dataset_dict, metadata, schema


def labeled_indices_for(args, dataset_dict, metadata) -> list[int]:
    """Training rows that keep their label: re-drawn when asked, else the dataset's own split."""
    import numpy as np
    from data_utils.splits import check_labeled_split, select_labeled

    train = dataset_dict["train"]
    data = args.data
    redraw = data.dataset is not None and (data.labeled_fraction is not None or data.labeled_per_class is not None)
    labels = np.asarray(train[metadata.label_column]) if metadata.task == "classification" else None
    if redraw:
        if metadata.task != "classification":
            n = len(train)
            if data.labeled_per_class is not None:
                raise ValueError("labeled_per_class needs a classification dataset; use labeled_fraction")
            rng = np.random.default_rng(args.training.seed)
            indices = np.sort(rng.choice(n, size=max(1, int(round(data.labeled_fraction * n))), replace=False))
        else:
            indices = select_labeled(labels, fraction=data.labeled_fraction, per_class=data.labeled_per_class, seed=args.training.seed)
    elif metadata.labeled_column in train.column_names:
        indices = np.flatnonzero(np.asarray(train[metadata.labeled_column], dtype=bool))
    elif metadata.labeled_indices is not None:
        indices = np.asarray(metadata.labeled_indices)
    else:
        indices = np.arange(len(train))  # fully labelled dataset
    if labels is not None:
        mask = np.zeros(len(train), dtype=bool)
        mask[indices] = True
        check_labeled_split(labels, mask, num_classes=metadata.num_labels)
    return [int(i) for i in indices]


def dataset_fingerprint(source: str, dataset_dict, metadata, schema, labeled: list[int]) -> dict[str, Any]:
    return {
        "source": str(Path(source).resolve()) if Path(source).exists() else source,
        "task": metadata.task,
        "num_labels": metadata.num_labels,
        "split_sizes": {k: len(v) for k, v in dataset_dict.items()},
        "labeled": ckpt.digest(labeled),
        "num_labeled": len(labeled),
        "schema": ckpt.digest(schema.to_dict()) if schema is not None else None,
    }


def apply_labeled_split(dataset_dict, metadata, labeled: list[int]):
    """Write the chosen labelled rows into the train split's labeled column (what the loaders read)."""
    import numpy as np

    train = dataset_dict["train"]
    mask = np.zeros(len(train), dtype=bool)
    mask[np.asarray(labeled, dtype=np.int64)] = True
    column = metadata.labeled_column
    if column in train.column_names:
        if np.array_equal(np.asarray(train[column], dtype=bool), mask):
            return dataset_dict
        train = train.remove_columns(column)
    dataset_dict = dataset_dict.copy() if hasattr(dataset_dict, "copy") else dict(dataset_dict)
    dataset_dict["train"] = train.add_column(column, mask.tolist())
    return dataset_dict


def build_loaders(args, method, model_config, dataset_dict, metadata, schema, accelerator):
    """Training stream (labelled + unlabelled, exact resume) and eval loaders (data_utils.loaders)."""
    from data_utils.loaders import build_train_loaders
    from data_utils.views import ViewConfig

    view_config = ViewConfig.from_model_config(model_config, preset=args.data.view_preset, seed=args.training.seed)
    data = args.data
    train_stream = build_train_loaders(
        dataset_dict, metadata, schema,
        labeled_views=dict(method.labeled_views),
        unlabeled_views=dict(method.unlabeled_views) if method.unlabeled_views is not None else None,
        view_config=view_config,
        batch_size=args.training.per_device_train_batch_size,
        mu=data.mu,
        seed=args.training.seed,
        num_workers=data.dataloader_num_workers,
        pin_memory=accelerator.device.type == "cuda",
        num_replicas=accelerator.num_processes,
        rank=accelerator.process_index,
    )
    eval_loaders = {}
    for split in ("validation", "test"):
        if split not in dataset_dict:
            continue
        if data.max_eval_samples is not None and len(dataset_dict[split]) > data.max_eval_samples:
            dataset_dict = dataset_dict.copy()
            dataset_dict[split] = dataset_dict[split].select(range(data.max_eval_samples))
        from data_utils.loaders import build_eval_loader

        eval_loaders[split] = build_eval_loader(
            dataset_dict, metadata, schema, split, args.training.per_device_eval_batch_size, view_config,
            num_workers=data.dataloader_num_workers, pin_memory=accelerator.device.type == "cuda",
        )
    if "validation" not in eval_loaders:
        raise ValueError("the dataset has no validation split: best-model selection needs one")
    return train_stream, eval_loaders


def build_model(args, schema, metadata):
    from modeling_stil.presets import create_model

    overrides = dict(args.model.model_overrides or {})
    model = create_model(args.model.model, schema=schema, metadata=metadata, **overrides)
    model = model.float()
    check = getattr(model, "check_data_compatibility", None)
    if check is not None:
        check(schema, metadata)
    return model


def write_run_files(args, output_dir: Path, info: dict[str, Any]) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    args.save_yaml(output_dir / "run_config.yaml")
    tmp = output_dir / ".run_info.json.tmp"
    tmp.write_text(json.dumps(info, indent=2, default=str))
    os.replace(tmp, output_dir / "run_info.json")


def check_output_dir(targs) -> None:
    from . import checkpointing

    out = Path(targs.output_dir)
    if targs.resume_from_checkpoint or targs.overwrite_output_dir or not out.exists():
        return
    if checkpointing.list_checkpoints(checkpointing.checkpoints_root(out)) or (out / "config.json").exists():
        raise FileExistsError(
            f"output_dir {out} already holds a run; pass --resume_from_checkpoint latest to continue it, "
            "--overwrite_output_dir to start again there, or choose another --output_dir"
        )


def build_and_train(args) -> dict[str, Any]:
    """The whole job: data, model, method, loop, selection, test, export (+ reload check, upload)."""
    import shutil

    from accelerate.utils import set_seed

    from ..methods.base import get_method_class
    from .metrics import compute_metrics

    targs = args.training
    check_output_dir(targs)
    accelerator = make_accelerator(args)
    output_dir = Path(targs.output_dir)
    if targs.overwrite_output_dir and not targs.resume_from_checkpoint and accelerator.is_main_process and output_dir.exists():
        shutil.rmtree(output_dir)
    accelerator.wait_for_everyone()
    set_seed(targs.seed)

    source, dataset_dict, metadata, schema = prepare_dataset(args, accelerator)
    labeled = labeled_indices_for(args, dataset_dict, metadata)
    method_cls = get_method_class(targs.method)
    method_cls.check_task(metadata.task)
    set_seed(targs.seed)
    model = build_model(args, schema, metadata)
    method = method_cls(model, args.method)
    dataset_dict = apply_labeled_split(dataset_dict, metadata, labeled)
    train_stream, eval_loaders = build_loaders(args, method, model.config, dataset_dict, metadata, schema, accelerator)

    fingerprint = ckpt.make_fingerprint(targs.method, model.config.to_dict(), dataset_fingerprint(source, dataset_dict, metadata, schema, labeled))
    info = {
        "seed": targs.seed,
        "dataset": source,
        "task": metadata.task,
        "num_labels": metadata.num_labels,
        "labeled_indices": labeled,
        "split_sizes": {k: len(v) for k, v in dataset_dict.items()},
        "num_processes": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        "device": str(accelerator.device),
        "versions": library_versions(),
        "git_commit": git_commit(Path(__file__).resolve().parents[2]),
        "fingerprint": fingerprint,
    }
    if accelerator.is_main_process:
        write_run_files(args, output_dir, info)
    if accelerator.trackers or resolve_trackers(targs.report_to):
        accelerator.init_trackers(targs.run_name or output_dir.name, config=tracker_config(args.flat_dict()))

    trainer = Trainer(
        args, method, train_stream, eval_loaders, task=metadata.task, num_labels=metadata.num_labels,
        fingerprint=fingerprint, compute_metrics=compute_metrics, accelerator=accelerator, run_info=info,
    )
    started = time.perf_counter()
    results = trainer.train()
    results["train_seconds"] = round(time.perf_counter() - started, 2)
    if not results["finished"]:
        accelerator.print(f"stopped at step {results['stopped_at_step']} (stop_after_steps); resume with --resume_from_checkpoint latest")
        accelerator.end_training()
        return results

    best_step = trainer.load_best()
    validation = trainer.evaluate("validation")
    results["best_step"] = best_step
    results["validation"] = validation
    results["metric_for_best_model"] = trainer.best_metric_name
    if "test" in eval_loaders:
        results["test"] = trainer.test("test")
    if accelerator.is_main_process:
        trainer.write_plots()
        accelerator.print(json.dumps({"best_step": best_step, "validation": validation, "test": results.get("test")}))

    if targs.export:
        export_run(trainer, args, metadata, source, results)
    accelerator.end_training()
    if targs.push_to_hub and accelerator.is_main_process:
        from .hub import push_folder

        commit = push_folder(output_dir, targs.hub_model_id, token=targs.hub_token, private=targs.hub_private,
                             commit_message=f"stil {targs.method} run (seed {targs.seed})")
        results["hub_commit"] = str(getattr(commit, "commit_url", commit))
    return results


def export_run(trainer: Trainer, args, metadata, source: str, results: dict[str, Any]) -> Path:
    """save_pretrained (safetensors) + processor + eval_results.json + model card, then reload and
    re-evaluate the export with ``AutoModel.from_pretrained`` to prove it is self-sufficient."""
    from transformers import AutoModel

    from ..processing_stil import StilProcessor
    from .model_card import build_model_card, write_eval_results

    acc = trainer.accelerator
    targs = args.training
    out = Path(targs.output_dir)
    state_dict = trainer.export_state_dict()  # every process (collective under FSDP)
    eval_model = trainer.unwrapped.eval_model()
    if acc.is_main_process:
        eval_model.save_pretrained(out, state_dict={k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, is_main_process=True)
        StilProcessor.from_model_config(eval_model.config, image_column=metadata.image_column).save_pretrained(out)
        labeled_description = f"{results.get('num_labeled', trainer.run_info.get('num_labeled', '?'))} labelled training rows"
        n_labeled = len(trainer.run_info.get("labeled_indices", []))
        n_train = trainer.run_info.get("split_sizes", {}).get("train")
        if n_train:
            labeled_description = f"{n_labeled}/{n_train} training rows labelled ({100.0 * n_labeled / n_train:.1f}%)"
        plots = [f"plots/{name}" for name in ("losses.png", "validation.png", "learning_rate.png", "pseudo_labels.png") if (out / "plots" / name).is_file()]
        dataset_name = Path(source).name if Path(source).exists() else source
        unlabeled_batch = None
        if trainer.unwrapped.unlabeled_views is not None:
            unlabeled_batch = args.data.mu * targs.per_device_train_batch_size * acc.num_processes
        card = build_model_card(
            model_name=targs.hub_model_id or out.name,
            model_type=eval_model.config.model_type,
            method=targs.method,
            task=metadata.task,
            dataset=dataset_name,
            labeled_description=labeled_description,
            test_metrics=results.get("test", {}),
            validation_metrics=results.get("validation"),
            recipe=args.flat_dict(),
            versions=trainer.run_info.get("versions", library_versions()),
            selection=f"best {trainer.best_metric_name} ({'higher' if trainer.greater_is_better else 'lower'} is better) at step {results.get('best_step')}",
            steps=trainer.progress.step,
            best_step=results.get("best_step"),
            global_batch=targs.per_device_train_batch_size * acc.num_processes * targs.gradient_accumulation_steps,
            unlabeled_batch=unlabeled_batch,
            num_processes=acc.num_processes,
            plots=plots,
            repo_or_path=targs.hub_model_id or str(out),
            git_commit=trainer.run_info.get("git_commit"),
            mixed_precision=str(acc.mixed_precision),
            modalities=(["image"] if metadata.image_column else []) + (["tabular"] if eval_model.config.to_dict().get("tabular_schema") else []),
        )
        card.save(str(out / "README.md"))
    acc.wait_for_everyone()

    reloaded = AutoModel.from_pretrained(str(out), dtype=torch.float32).to(acc.device)
    check_split = "test" if "test" in trainer.eval_loaders else "validation"
    reloaded_metrics = trainer.evaluate(check_split, model=reloaded)
    expected = results.get(check_split) or results.get("validation", {})
    mismatched = {k: (expected.get(k), v) for k, v in reloaded_metrics.items() if k in expected and not math.isclose(v, expected[k], rel_tol=1e-4, abs_tol=1e-5)}
    if mismatched:
        raise RuntimeError(f"the exported model in {out} does not reproduce the {check_split} metrics after reloading: {mismatched}")
    results["reload_check"] = {"split": check_split, "metrics": reloaded_metrics, "matches": True}
    if acc.is_main_process:
        write_eval_results(out / "eval_results.json", {
            "model": str(out), "dataset": source, "method": targs.method, "best_step": results.get("best_step"),
            "metric_for_best_model": trainer.best_metric_name, "validation": results.get("validation"),
            "test": results.get("test"), "reload_check": results["reload_check"],
        })
        acc.print(f"exported to {out} and reloaded with AutoModel.from_pretrained: {check_split} metrics match")
    return out
