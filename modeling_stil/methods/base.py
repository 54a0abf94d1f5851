"""The method contract: what every semi-supervised algorithm provides to the trainer.

An `SSLMethod` wraps a model (a ``PreTrainedModel`` that knows nothing of SSL) and owns everything
else the algorithm needs: EMA teachers, memory banks, queues, prototypes, adaptive thresholds, as
sub-modules and buffers, so ``accelerator.save_state`` captures them and DDP moves them.

The trainer calls, per optimisation step::

    loss, logs = method(labeled, unlabeled, state)     # forward == training_step (DDP-friendly)
    accelerator.backward(loss); clip; optimizer.step(); scheduler.step()
    method.after_optimizer_step(state)                 # EMA, bank pointers (only on sync steps)

and ``method.on_epoch_end(state)`` at each epoch boundary (one pass over the unlabelled data).
The trainer knows nothing of a method's losses; a method knows nothing of files or loops.

Batches (see docs/architecture.md, "Batch contract")::

    labeled   = {"labels": (B,) long | (B, K) float, "index": (B,) long, <view key>: inputs, ...}
    unlabeled = {"monitor_labels": ..., "index": ..., <view key>: inputs, ...}

where ``inputs`` is a dict that can be passed to the model as ``model(**inputs)``
(``pixel_values``, ``categorical_values``, ``continuous_values``, ``missing_mask``; views that move
geometry also carry ``labels``/``translation``). ``monitor_labels`` are ground truth kept only for
pseudo-label quality plots; a method must never put them in a loss.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import nn

MODEL_INPUT_KEYS = ("pixel_values", "categorical_values", "continuous_values", "missing_mask")

TASK_CLASSIFICATION = "classification"
TASK_REGRESSION = "regression"
TASK_LANDMARKS = "landmarks"


@dataclass
class MethodArguments:
    """Hyper-parameters shared by every method. Each method subclasses this dataclass with its own
    fields (defaults = the paper's values); the recipe/CLI layer parses it, so unknown keys fail."""


@dataclass
class DataInfo:
    """What a method may know about the data and the run *before* ``accelerator.prepare`` (given to
    `SSLMethod.setup`): sizes of banks and buffers, ``repeat_ratio``, target statistics.

    Batch sizes are per process (``*_batch_size``) and across processes (``global_*``)."""

    num_labeled: int = 0  # labelled training rows
    num_unlabeled: int = 0  # rows of the unlabelled stream (all train rows if it includes the labelled)
    num_train: int = 0  # rows of the train split
    split_sizes: dict = field(default_factory=dict)
    labeled_batch_size: int = 0  # per process, per micro-step
    unlabeled_batch_size: int = 0
    meta_batch_size: int = 0
    num_processes: int = 1
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"
    task: str = TASK_CLASSIFICATION
    num_labels: int = 1
    steps_per_epoch: int = 1  # optimisation steps per epoch
    max_steps: int = 1
    unlabeled_includes_labeled: bool = False
    # regression: labelled-target statistics (targets reach the method standardised when set)
    target_mean: list | None = None
    target_std: list | None = None

    @property
    def global_labeled_batch_size(self) -> int:
        return self.labeled_batch_size * self.num_processes

    @property
    def global_unlabeled_batch_size(self) -> int:
        return self.unlabeled_batch_size * self.num_processes


@dataclass
class TrainState:
    """What a method may know about the run. Passed to every hook; never stored by the method."""

    step: int = 0  # optimisation steps completed before this one
    epoch: int = 0  # 0-indexed epoch (one epoch = one pass over the unlabelled data)
    steps_per_epoch: int = 1
    max_steps: int = 1
    num_processes: int = 1
    task: str = TASK_CLASSIFICATION
    num_labels: int = 1
    learning_rate: float = 0.0  # the current (scheduled) learning rate of the first parameter group
    phase: int = 0  # optimisation phase within the step (methods with num_phases > 1)
    # all_gather across processes (identity on one process): banks and queues use it
    gather: Callable[[torch.Tensor], torch.Tensor] = field(default=lambda tensor: tensor, repr=False)
    # sum-reduce across processes (identity on one process): prototype sums, threshold statistics
    reduce_sum: Callable[[torch.Tensor], torch.Tensor] = field(default=lambda tensor: tensor, repr=False)

    @property
    def progress(self) -> float:
        """Fraction of training done, in [0, 1] (ramp-ups use it)."""
        return min(1.0, self.step / max(1, self.max_steps))


class SSLMethod(nn.Module):
    """Base class. Subclasses set the class attributes and implement `training_step`.

    Extension points (each optional; see docs/architecture.md "Method contract"):

    * streams: ``labeled_views`` (None: no labelled stream), ``unlabeled_views`` (None: none),
      ``meta_views`` (an extra, independently shuffled labelled stream: ``labeled["meta"]``),
      ``label_free`` (the unlabelled stream iterates every train row and no label column is needed),
      ``stream_defaults`` (unlabeled_includes_labeled, corruption_pool, augmentation_rate, epoch);
    * ``setup(info)``: sizes known before ``prepare`` (register banks as buffers here);
    * ``init_from_pretrained(path)``: restore method state next to a pretrained model (teacher, heads);
    * ``num_phases``: optimisation steps per iteration (meta-learning); ``state.phase`` says which;
    * ``parameter_groups()``: what the optimizer and clipping use, with optional own lr / decay;
    * evaluation: ``eval_views``, ``evaluation_step`` (per-sample outputs to gather),
      ``compute_eval_metrics`` and ``selection`` (metric, loss or last step);
    * hooks: ``after_optimizer_step`` (EMA, pointers), ``on_epoch_end`` (prototypes), both called
      after a synchronised optimizer step, never inside an accumulation window.
    """

    name: ClassVar[str] = ""
    arguments_class: ClassVar[type[MethodArguments]] = MethodArguments
    # view key -> view recipe name (data_utils.views). Keys are what training_step reads.
    labeled_views: ClassVar[dict[str, str] | None] = {"weak": "weak"}
    # None: the method uses no unlabelled data (the trainer builds no unlabelled loader)
    unlabeled_views: ClassVar[dict[str, str] | None] = None
    # an extra labelled stream, shuffled independently of the labelled one (L2I's meta batch);
    # its views arrive as ``labeled["meta"] = {"labels": ..., "index": ..., <view key>: inputs}``
    meta_views: ClassVar[dict[str, str] | None] = None
    # True: no labels are read; the unlabelled stream iterates over every train row (pretraining)
    label_free: ClassVar[bool] = False
    # stream settings a recipe may override (data.unlabeled_includes_labeled, ...; None = these)
    stream_defaults: ClassVar[dict[str, Any]] = {
        "unlabeled_includes_labeled": False,  # unlabelled stream over all train rows
        "corruption_pool": "split",  # tabular corruption draws from the whole split or the stream's rows
        "augmentation_rate": None,  # probability of the joint ("hard") augmentation; None = view config's
        "epoch": "unlabeled",  # "unlabeled": one pass over the unlabelled stream; "longest": the longer stream
    }
    supported_tasks: ClassVar[tuple[str, ...]] = (TASK_CLASSIFICATION,)
    # model families the method needs (checked before training): e.g. ("image", "tabular")
    required_modalities: ClassVar[tuple[str, ...]] = ()
    # preset used when the recipe names no model and it fits the data (e.g. "stil-tiny")
    preferred_model: ClassVar[str | None] = None
    # trains on the images alone (SimMatch, CoMatch): a model that reads the table is refused
    image_only: ClassVar[bool] = False
    # optimisation steps per iteration with the same optimizer; >1 for meta-learning (L2I)
    num_phases: ClassVar[int] = 1
    # view the evaluation loaders produce: {view key: recipe}; evaluation_step reads it
    eval_views: ClassVar[dict[str, str]] = {"eval": "eval"}
    # best-on-validation selection: None = the task's default metric; ("<metric>", greater_is_better)
    # for a named validation metric (e.g. ("loss", False)); "last" = keep the last step
    selection: ClassVar[tuple[str, bool] | str | None] = None

    def __init__(self, model: nn.Module, args: MethodArguments | None = None):
        super().__init__()
        self.model = model
        self.args = args if args is not None else self.arguments_class()

    # ------------------------------------------------------------------ the contract
    def setup(self, info: DataInfo) -> None:
        """Called once after construction and before ``accelerator.prepare`` / ``load_state``, with
        the data sizes. Create size-dependent buffers (banks, per-row labels) here so that
        checkpoints restore into them."""

    def init_from_pretrained(self, path: str) -> dict[str, list[str]]:
        """Restore method-owned state saved next to a pretrained model in ``path`` (``--init_from``)
        after the model's own weights were loaded. Returns ``{"loaded": [...], "skipped": [...]}``."""
        return {"loaded": [], "skipped": []}

    def training_step(self, labeled: dict | None, unlabeled: dict | None, state: TrainState):
        """Return ``(loss, logs)``: a scalar tensor and a dict of *detached* scalar tensors.

        Never call ``.item()`` here: the trainer reduces logs only on logging steps. Banks and queues
        are written here (with ``state.gather``), so they see exactly the batches that were trained on."""
        raise NotImplementedError

    def forward(self, labeled: dict | None, unlabeled: dict | None, state: TrainState):
        # DDP wraps the method, so the step must run through forward for gradient sync.
        return self.training_step(labeled, unlabeled, state)

    @torch.no_grad()
    def after_optimizer_step(self, state: TrainState) -> None:
        """Called after each *synchronised* optimizer step (EMA updates, queue pointers)."""

    @torch.no_grad()
    def on_epoch_end(self, state: TrainState) -> dict[str, torch.Tensor]:
        """Called after the optimizer step that completes an epoch (prototype recomputation,
        threshold resets). May return logs."""
        return {}

    def eval_model(self) -> nn.Module:
        """The network used for evaluation and export (student by default; a teacher if the paper says so)."""
        return self.model

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the optimizer updates and clipping sees (teachers are excluded by requires_grad=False)."""
        return [p for group in self.parameter_groups() for p in group["params"]]

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Optimizer parameter groups: ``[{"params": [...], "lr": optional, "weight_decay": optional}]``.

        The trainer splits each group into decayed / not decayed (biases, norms) parameters and keeps
        a group's own ``lr`` / ``weight_decay`` where given."""
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluation_step(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        """Per-sample outputs of one eval batch, gathered across processes by the trainer.

        Keys ending in ``logits`` are scored with the task metrics (``image_logits`` -> ``image/accuracy``);
        any other key holds per-sample values that are averaged (e.g. ``loss``). ``model`` is the
        eval model or a reloaded export."""
        return {"logits": model(**self.eval_inputs(batch))["logits"]}

    def eval_inputs(self, batch: dict, view_key: str | None = None) -> dict[str, torch.Tensor]:
        """Model inputs of an eval batch: its ``view_key`` view (default: the first of ``eval_views``
        present), or the batch itself when the inputs are at the top level."""
        keys = [view_key] if view_key is not None else list(self.eval_views)
        view = next((batch[key] for key in keys if key in batch), batch)
        return {key: value for key, value in view.items() if key in MODEL_INPUT_KEYS}

    def compute_eval_metrics(self, outputs: dict[str, torch.Tensor], references: torch.Tensor,
                             score: Callable[[torch.Tensor, torch.Tensor], dict[str, float]]) -> dict[str, float]:
        """Metrics from the gathered ``evaluation_step`` outputs; ``score(predictions, references)``
        computes the task metrics of one head."""
        metrics: dict[str, float] = {}
        for key, value in outputs.items():
            if key.endswith("logits"):
                prefix = key[: -len("logits")].rstrip("_")
                for name, number in score(value, references).items():
                    metrics[f"{prefix}/{name}" if prefix else name] = number
            else:
                metrics[key] = float(value.float().mean()) if value.numel() else float("nan")
        return metrics

    @classmethod
    def check_task(cls, task: str) -> None:
        if task not in cls.supported_tasks:
            raise ValueError(f"method {cls.name!r} supports tasks {cls.supported_tasks}, not {task!r}")


METHODS: dict[str, type[SSLMethod]] = {}


def register_method(cls: type[SSLMethod]) -> type[SSLMethod]:
    """Class decorator: make a method available to recipes by its ``name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a non-empty `name`")
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise ValueError(f"method name {cls.name!r} is already registered by {METHODS[cls.name].__name__}")
    if not dataclasses.is_dataclass(cls.arguments_class):
        raise TypeError(f"{cls.__name__}.arguments_class must be a dataclass")
    METHODS[cls.name] = cls
    return cls


def get_method_class(name: str) -> type[SSLMethod]:
    """A registered method by name, or a user's method given as ``package.module:ClassName`` (the
    module is imported, which registers it; the class must subclass `SSLMethod`)."""
    from . import _import_all  # noqa: F401  (registers every built-in method)

    if ":" in name and name not in METHODS:
        import importlib

        module_name, _, class_name = name.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError) as error:
            raise KeyError(f"cannot load method {name!r} ({error}); give package.module:ClassName importable from PYTHONPATH") from None
        if not (isinstance(cls, type) and issubclass(cls, SSLMethod)):
            raise KeyError(f"{name!r} is not an SSLMethod subclass")
        METHODS.setdefault(name, cls)
        return cls
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}; available: {sorted(METHODS)}")
    return METHODS[name]


def detach_logs(logs: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {k: (v.detach() if isinstance(v, torch.Tensor) else torch.as_tensor(v)) for k, v in logs.items()}
