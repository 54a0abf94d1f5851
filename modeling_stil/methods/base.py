"""The method contract: what every semi-supervised algorithm provides to the trainer.

An `SSLMethod` wraps a model (a ``PreTrainedModel`` that knows nothing of SSL) and owns everything
else the algorithm needs: EMA teachers, memory banks, queues, prototypes, adaptive thresholds, as
sub-modules and buffers, so ``accelerator.save_state`` captures them and DDP moves them.

The trainer calls, per optimisation step::

    loss, logs = method(labeled, unlabeled, state)     # forward == training_step (DDP-friendly)
    accelerator.backward(loss); clip; optimizer.step(); scheduler.step()
    state.step += 1                                    # the step is now completed
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

What every method shares lives here, once: the EMAs of the student (`EMAOption`, built after the
method's ``__init__``, updated after each optimizer step, checkpointed as sub-modules, evaluated by
`SSLMethod.eval_model`), the epoch gate of the unlabelled terms (`SSLMethod.unlabeled_terms_on`,
`SSLMethod.gated_loss`) and the check that a method with ``unlabeled_views`` gets an unlabelled batch.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from .common import EMA_MODES, EMATeacher, mean_teacher_momentum, scheduled_momentum, unlabeled_gate_open, warmup_momentum

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
    """What a method may know about the run. Passed to every hook; never stored by the method.

    ``step`` has one meaning everywhere: the number of optimisation steps completed when the hook
    runs. In ``training_step`` that is the steps before the one being computed (0 on the first); in
    ``after_optimizer_step`` and ``on_epoch_end`` the step just taken is completed and counted (1
    after the first). A formula indexed by the step just taken (Mean Teacher's ``t``, 0 after the
    first step) uses ``step - 1`` there (`EMAOption.warmup_counts`)."""

    step: int = 0  # optimisation steps completed when the hook runs (see above)
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


EMA_WARMUPS = (None, "tf", "mean_teacher")
EMA_WARMUP_COUNTS = ("completed", "before")
EMA_UPDATES = ("after_optimizer_step", "by_method")


@dataclass(frozen=True)
class EMAOption:
    """An exponential moving average of the student a method keeps (a teacher, the evaluation model),
    declared by `SSLMethod.ema_options`. The base class builds it as the attribute ``name`` (None when
    not ``enabled``; checkpoints hold it as ``<name>.module.*``), updates it with
    ``theta_ema <- m theta_ema + (1 - m) theta`` and evaluates it when ``evaluate``."""

    name: str = "ema"  # the method's attribute (and state-dict prefix)
    momentum: float = 0.999  # m (absolute)
    span_fraction: float | None = None  # relative form of momentum: span 1/(1-m) = this x max_steps
    # None: constant m; "tf": min(m, (1+t)/(10+t)) (TensorFlow's num_updates warm-up);
    # "mean_teacher": min(m, 1 - 1/(t+1)) (Mean Teacher's teacher; t = 0 copies the student)
    warmup: str | None = None
    # what t counts: "completed" = state.step (steps completed, the one just taken included);
    # "before" = the steps before the one just taken (state.step - 1, floored at 0)
    warmup_counts: str = "completed"
    mode: str = "parameters"  # "parameters" (buffers copied from the student) or "state" (EMAN: buffers averaged too)
    eval_mode: bool = True  # forwards in eval mode; False: a teacher that labels with batch statistics
    enabled: bool = True
    evaluate: bool = False  # eval_model() is this EMA (the first enabled one that says so)
    evaluated_part: str | None = None  # evaluate this attribute of the averaged network (e.g. "model")
    # "after_optimizer_step": the base class updates it after each optimizer step, in declaration order;
    # "by_method": the method calls update_ema itself (STiL: at the start of its step)
    updated: str = "after_optimizer_step"
    averaged: str = "model"  # the method's attribute holding the averaged network, or a method returning it

    def __post_init__(self):
        if self.mode not in EMA_MODES:
            raise ValueError(f"EMA mode must be one of {EMA_MODES}, not {self.mode!r}")
        if self.warmup not in EMA_WARMUPS or self.warmup_counts not in EMA_WARMUP_COUNTS or self.updated not in EMA_UPDATES:
            raise ValueError(f"EMAOption {self.name!r}: warmup in {EMA_WARMUPS}, warmup_counts in {EMA_WARMUP_COUNTS}, "
                             f"updated in {EMA_UPDATES}")

    def momentum_at(self, state: TrainState) -> float:
        """The momentum of the update after the optimizer step that completed ``state.step`` steps."""
        momentum = scheduled_momentum(self.momentum, self.span_fraction, state.max_steps)
        if self.warmup is None:
            return momentum
        t = state.step if self.warmup_counts == "completed" else max(0, state.step - 1)
        if self.warmup == "tf":
            return warmup_momentum(momentum, t)
        return mean_teacher_momentum(t, momentum)


def _then_build_emas(init):
    """Wrap a method's ``__init__`` so that the declared EMAs are built when the outermost
    constructor returns: every network they average (a method-owned projection head) exists then."""

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if type(self).__init__ is __init__:
            self._build_emas()

    __init__.builds_emas = True
    return __init__


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
      after a synchronised optimizer step, never inside an accumulation window;
    * EMAs of the student: ``ema_options()`` declares them (`EMAOption`); the base class builds,
      updates (``after_optimizer_step``, or ``update_ema`` from the method) and evaluates them;
    * the unlabelled terms' epoch gate: arguments ``start_epoch`` / ``start_fraction`` read by
      ``unlabeled_terms_on``; ``gated_loss`` adds the terms and logs ``unsup_active`` and ``loss``;
    * pretraining: ``linear_probe`` + ``probe_features`` (a linear probe on the representation after training);
    * ``functional_parameter_use()``: why the method calls a module with parameters of its own choosing
      (FSDP2 then needs the whole method as one sharded unit).
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
    # True: after training, a linear probe is fitted on ``probe_features`` (pretraining methods)
    linear_probe: ClassVar[bool] = False
    # methods of ``self.model`` besides forward that training_step calls (TIP's encode_image, ...): under
    # FSDP2 they gather the model's sharded parameters as its forward does
    model_forward_methods: ClassVar[tuple[str, ...]] = ()

    @_then_build_emas
    def __init__(self, model: nn.Module, args: MethodArguments | None = None):
        super().__init__()
        self.model = model
        self.args = args if args is not None else self.arguments_class()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is not None and not getattr(init, "builds_emas", False):
            cls.__init__ = _then_build_emas(init)

    def functional_parameter_use(self) -> str | None:
        """How this method evaluates a module with parameters it supplies itself (``torch.func.
        functional_call``), or None. Under FSDP2 with submodules sharded on their own that cannot work:
        their parameters are whole only inside their own forward (`accelerator.check_sharding_fits`)."""
        return None

    # ------------------------------------------------------------------ EMAs of the student
    def ema_options(self) -> list[EMAOption]:
        """The EMAs of the student this method keeps, from its arguments (none by default)."""
        return []

    def _build_emas(self) -> None:
        self._ema_options: dict[str, EMAOption] = {}
        for option in self.ema_options():
            ema = EMATeacher(self._averaged(option), mode=option.mode, eval_mode=option.eval_mode) if option.enabled else None
            setattr(self, option.name, ema)
            self._ema_options[option.name] = option

    def _averaged(self, option: EMAOption) -> nn.Module:
        network = getattr(self, option.averaged)
        return network if isinstance(network, nn.Module) else network()

    @torch.no_grad()
    def update_ema(self, name: str, state: TrainState) -> None:
        """One EMA update of ``name`` towards the student (nothing when it is not enabled)."""
        ema = getattr(self, name)
        if ema is not None:
            option = self._ema_options[name]
            ema.update(self._averaged(option), option.momentum_at(state))

    # ------------------------------------------------------------------ the unlabelled terms' gate
    def unlabeled_terms_on(self, state: TrainState) -> bool:
        """Whether the unlabelled terms are in the loss: after epoch ``args.start_epoch`` (-1: always),
        or from step ``args.start_fraction * max_steps`` when that is set; always when the arguments
        have no ``start_epoch``. Python numbers only: no device sync."""
        start_epoch = getattr(self.args, "start_epoch", None)
        if start_epoch is None:
            return True
        return unlabeled_gate_open(state, start_epoch, getattr(self.args, "start_fraction", None))

    def gated_loss(self, loss: torch.Tensor, unlabeled_terms: list[torch.Tensor], state: TrainState,
                   logs: dict[str, torch.Tensor]) -> torch.Tensor:
        """``loss`` plus each (weighted) unlabelled term in order once the gate is open; logs
        ``unsup_active`` and the total ``loss``."""
        active = self.unlabeled_terms_on(state)
        if active:
            for term in unlabeled_terms:
                loss = loss + term
        logs["unsup_active"] = torch.tensor(float(active))
        logs["loss"] = loss.detach()
        return loss

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
        if self.unlabeled_views is not None and unlabeled is None:
            raise ValueError(f"{self.name} needs an unlabelled batch (the method declares unlabeled_views)")
        return self.training_step(labeled, unlabeled, state)

    @torch.no_grad()
    def after_optimizer_step(self, state: TrainState) -> None:
        """Called after each *synchronised* optimizer step: updates the EMAs declared
        ``updated="after_optimizer_step"`` in declaration order. Methods with more to do (queue
        pointers, a decoupled weight decay) override it and call `update_ema` where their paper says."""
        for name, option in self._ema_options.items():
            if option.updated == "after_optimizer_step":
                self.update_ema(name, state)

    @torch.no_grad()
    def on_epoch_end(self, state: TrainState) -> dict[str, torch.Tensor]:
        """Called after the optimizer step that completes an epoch (prototype recomputation,
        threshold resets). May return logs."""
        return {}

    def eval_model(self) -> nn.Module:
        """The network used for evaluation and export: the first enabled EMA declared ``evaluate``
        (its ``evaluated_part`` when set), else the student."""
        for name, option in self._ema_options.items():
            ema = getattr(self, name)
            if option.evaluate and ema is not None:
                return getattr(ema.module, option.evaluated_part) if option.evaluated_part else ema.module
        return self.model

    def probe_features(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """Pretraining methods (``linear_probe = True``): the (B, D) representation of an eval batch
        that the linear probe is fitted on, computed with ``model`` (the eval model)."""
        raise NotImplementedError(f"{self.name} has no linear probe (linear_probe = False)")

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
