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

TASK_CLASSIFICATION = "classification"
TASK_REGRESSION = "regression"
TASK_LANDMARKS = "landmarks"


@dataclass
class MethodArguments:
    """Hyper-parameters shared by every method. Each method subclasses this dataclass with its own
    fields (defaults = the paper's values); the recipe/CLI layer parses it, so unknown keys fail."""


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
    # all_gather across processes (identity on one process): banks and queues use it
    gather: Callable[[torch.Tensor], torch.Tensor] = field(default=lambda tensor: tensor, repr=False)
    # sum-reduce across processes (identity on one process): prototype sums, threshold statistics
    reduce_sum: Callable[[torch.Tensor], torch.Tensor] = field(default=lambda tensor: tensor, repr=False)

    @property
    def progress(self) -> float:
        """Fraction of training done, in [0, 1] (ramp-ups use it)."""
        return min(1.0, self.step / max(1, self.max_steps))


class SSLMethod(nn.Module):
    """Base class. Subclasses set the class attributes and implement `training_step`."""

    name: ClassVar[str] = ""
    arguments_class: ClassVar[type[MethodArguments]] = MethodArguments
    # view key -> view recipe name (data_utils.views). Keys are what training_step reads.
    labeled_views: ClassVar[dict[str, str]] = {"weak": "weak"}
    # None: the method uses no unlabelled data (the trainer builds no unlabelled loader)
    unlabeled_views: ClassVar[dict[str, str] | None] = None
    supported_tasks: ClassVar[tuple[str, ...]] = (TASK_CLASSIFICATION,)

    def __init__(self, model: nn.Module, args: MethodArguments | None = None):
        super().__init__()
        self.model = model
        self.args = args if args is not None else self.arguments_class()

    # ------------------------------------------------------------------ the contract
    def training_step(self, labeled: dict, unlabeled: dict | None, state: TrainState):
        """Return ``(loss, logs)``: a scalar tensor and a dict of *detached* scalar tensors.

        Never call ``.item()`` here: the trainer reduces logs only on logging steps."""
        raise NotImplementedError

    def forward(self, labeled: dict, unlabeled: dict | None, state: TrainState):
        # DDP wraps the method, so the step must run through forward for gradient sync.
        return self.training_step(labeled, unlabeled, state)

    @torch.no_grad()
    def after_optimizer_step(self, state: TrainState) -> None:
        """Called after each *synchronised* optimizer step (EMA updates, queue pointers)."""

    @torch.no_grad()
    def on_epoch_end(self, state: TrainState) -> dict[str, torch.Tensor]:
        """Called at each epoch boundary (prototype recomputation, threshold resets). May return logs."""
        return {}

    def eval_model(self) -> nn.Module:
        """The network used for evaluation and export (student by default; a teacher if the paper says so)."""
        return self.model

    def trainable_parameters(self):
        """Parameters the optimizer updates (teachers are excluded by requires_grad=False)."""
        return [p for p in self.parameters() if p.requires_grad]

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
    from . import _import_all  # noqa: F401  (registers every built-in method)

    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}; available: {sorted(METHODS)}")
    return METHODS[name]


def detach_logs(logs: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {k: (v.detach() if isinstance(v, torch.Tensor) else torch.as_tensor(v)) for k, v in logs.items()}
