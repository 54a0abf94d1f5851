"""Small pieces shared by several semi-supervised methods.

Everything here is algorithm-agnostic and tested against hand-computed values
(tests/test_methods_common.py):

* model plumbing: `unwrap_model`, `model_inputs`, `view_targets`, `concat_views`, `split_size`;
* losses: `task_loss`, `cross_entropy`, `soft_cross_entropy` (float32 at least whatever autocast does);
* `EMATeacher`: a frozen copy of the student updated in place, either parameter EMA
  (MoCo / CoMatch / Mean Teacher / USB's eval EMA) or state EMA ("EMAN": floating buffers such as BN
  running statistics are averaged too; integer buffers are copied, never averaged). Methods declare
  their EMAs (`base.EMAOption`); the base class builds and updates them;
* schedules: momenta (`ema_momentum`, `mean_teacher_momentum`, ...), ramps, the epoch gate;
* `gather_no_grad`: all-gather for banks and queues that tolerates uneven per-process batch sizes;
* `Queue`: FIFO ring buffer with wrap-around (memory banks, distribution-alignment history);
* `DistributionAlignment` (queue of the last 256 batch means, STiL/SimMatch/MMatch style) and
  `EMADistributionAlignment` (USB's EMA of the unlabelled class distribution);
* pseudo-labelling: `confidence_mask`, `sharpen`, `pseudo_labels`, `pseudo_label_logs`, `head_logits`;
* the Match family's projection network: `ProjectedNet`, `model_projection_head`;
* model checks: `check_num_labels`, `check_unimodal_heads` (MMatch / co-training), `check_image_only_model`.

Consistency-regularisation pieces (Mean Teacher, pseudo-labelling, MixMatch, L2I) are in consistency.py.

Nothing here needs ``torch.distributed``: cross-process communication goes through the
``TrainState.gather`` / ``reduce_sum`` callables, which are identities on one process.
"""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:  # annotations only: base.py imports this module (the EMA lifecycle)
    from .base import TrainState


# ---------------------------------------------------------------------------------------- plumbing
# Keys a geometric view puts next to the model inputs (targets moved with the image); they are
# for the method's losses, never for ``model(**inputs)``.
NON_MODEL_KEYS = ("labels", "monitor_labels", "translation", "masked_fields")  # view extras the model does not take


def unwrap_model(module: nn.Module) -> nn.Module:
    """Strip DistributedDataParallel / DataParallel / FSDP-style ``.module`` wrappers and
    ``torch.compile``'s ``_orig_mod`` so parameter names match the bare model."""
    while True:
        if isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            module = module.module
        elif hasattr(module, "_orig_mod") and isinstance(module._orig_mod, nn.Module):
            module = module._orig_mod
        else:
            return module


def model_inputs(view: dict) -> dict:
    """The part of a view dict that goes to ``model(**inputs)`` (targets stay with the method)."""
    return {key: value for key, value in view.items() if key not in NON_MODEL_KEYS}


def view_targets(view: dict, default: torch.Tensor) -> torch.Tensor:
    """Targets for a view: the view's own ``labels`` when it moved geometry, else the batch's."""
    targets = view.get("labels")
    return default if targets is None else targets


def concat_views(views: list[dict]) -> tuple[dict, list[int]]:
    """Concatenate several model-input dicts along the batch dimension for one forward pass.

    Returns the concatenated inputs and the per-view batch sizes (for ``torch.split``)."""
    if not views:
        raise ValueError("concat_views needs at least one view")
    keys = list(views[0].keys())
    for view in views[1:]:
        if list(view.keys()) != keys and set(view.keys()) != set(keys):
            raise ValueError(f"views have different inputs: {sorted(views[0])} vs {sorted(view)}")
    sizes = [split_size(view) for view in views]
    out = {}
    for key in keys:
        values = [view[key] for view in views]
        if isinstance(values[0], torch.Tensor):
            out[key] = torch.cat(values, dim=0)
        elif all(value == values[0] for value in values[1:]):
            out[key] = values[0]
        else:
            raise ValueError(f"non-tensor input {key!r} differs between views and cannot be concatenated")
    return out, sizes


def split_size(view: dict) -> int:
    for value in view.values():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    raise ValueError("a view needs at least one batched tensor")


def head_logits(output) -> dict[str, torch.Tensor]:
    """A model output's ``logits`` plus each unimodal head's (``image_logits``, ``tabular_logits``)
    that the model has, for a method's ``evaluation_step``: every head is then scored at evaluation
    (``image/accuracy``, ``tabular/accuracy``)."""
    result = {"logits": output.logits}
    for name in ("image_logits", "tabular_logits"):
        value = getattr(output, name, None)
        if value is not None:
            result[name] = value
    return result


# ---------------------------------------------------------------------------------------- losses
def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 (half precision upcast), or float64 when it already is: losses are computed
    in float32 whatever autocast does, and a float64 run (the golden tests against the original
    code) stays float64."""
    return x if x.dtype == torch.float64 else x.float()


def task_loss(logits: torch.Tensor, targets: torch.Tensor, task: str, reduction: str = "mean",
              row_means: bool = True) -> torch.Tensor:
    """The supervised loss of a task: cross-entropy (classification, hard or soft targets) or
    mean squared error (regression, landmarks). Computed in float32 whatever autocast does.

    Regression with ``row_means=False`` and ``reduction="mean"``: the mean over every entry
    (B x K) in one reduction (L2I's ``L_meta``), equal to the mean of the per-row means in exact
    arithmetic but not in float rounding."""
    if task == "classification":
        return cross_entropy(logits, targets, reduction=reduction)
    logits = at_least_float32(logits)
    targets = targets.to(logits.dtype).reshape(logits.shape)
    if not row_means and reduction == "mean":
        return ((logits - targets) ** 2).mean()
    loss = F.mse_loss(logits, targets, reduction="none")
    loss = loss.reshape(loss.shape[0], -1).mean(dim=1)
    return _reduce(loss, reduction)


def _reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return loss
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    raise ValueError(f"unknown reduction {reduction!r}")


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "none") -> torch.Tensor:
    """Cross-entropy with hard (long, (B,)) or soft (float, (B, C)) targets, in float32 at least."""
    if targets.dtype in (torch.long, torch.int, torch.int16, torch.int8, torch.uint8):
        return F.cross_entropy(at_least_float32(logits), targets.long(), reduction=reduction)
    if targets.shape != logits.shape:
        raise ValueError(f"soft targets must have the logits' shape {tuple(logits.shape)}, got {tuple(targets.shape)}")
    return soft_cross_entropy(logits, targets, reduction=reduction)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "none") -> torch.Tensor:
    """``-sum_c targets_c log softmax(logits)_c`` per sample (float32 at least)."""
    loss = -(at_least_float32(targets) * F.log_softmax(at_least_float32(logits), dim=-1)).sum(dim=-1)
    return _reduce(loss, reduction)


# ---------------------------------------------------------------------------------------- EMA
EMA_MODES = ("parameters", "state")


class EMATeacher(nn.Module):
    """A frozen copy of the student, updated in place by exponential moving average.

    ``mode="parameters"`` (MoCo, CoMatch, Mean Teacher, USB's evaluation EMA): parameters are
    averaged, buffers are copied from the student (so an eval-mode teacher normalises with the
    student's current BN statistics, which is what USB's parameter swap evaluates).

    ``mode="state"`` (EMAN, used by SimMatch/FreeMatch/co-training/STiL): every floating entry of
    the state dict is averaged, parameters and buffers (BN running mean/var) alike; non-floating
    buffers (``num_batches_tracked``, integer offsets) are copied, never averaged.

    The teacher never receives gradients (``requires_grad=False``) and, with ``eval_mode=True``
    (default), always forwards in eval mode under ``torch.no_grad`` whatever ``.train()`` says.
    ``update`` uses in-place ``torch._foreach`` kernels: no model copy per step.
    """

    def __init__(self, student: nn.Module, mode: str = "state", eval_mode: bool = True):
        super().__init__()
        if mode not in EMA_MODES:
            raise ValueError(f"EMA mode must be one of {EMA_MODES}, not {mode!r}")
        self.mode = mode
        self.eval_mode = eval_mode
        self.module = copy.deepcopy(unwrap_model(student))
        self.module.requires_grad_(False)
        if eval_mode:
            self.module.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.eval_mode:
            self.module.eval()
        return self

    @torch.no_grad()
    def forward(self, *args, **kwargs):
        if self.eval_mode and self.module.training:  # someone called .train() on the inner module
            self.module.eval()
        return self.module(*args, **kwargs)

    def _pairs(self, teacher_items: Iterable, student_items: Iterable, kind: str):
        teacher_items, student_items = dict(teacher_items), dict(student_items)
        if teacher_items.keys() != student_items.keys():
            missing = sorted(set(teacher_items) ^ set(student_items))
            raise ValueError(f"teacher and student {kind} differ: {missing[:5]}")
        return [(teacher_items[name], student_items[name]) for name in teacher_items]

    @torch.no_grad()
    def update(self, student: nn.Module, momentum: float) -> None:
        """``teacher = momentum * teacher + (1 - momentum) * student`` (see the class docstring for
        which entries are averaged and which are copied)."""
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"EMA momentum must be in [0, 1], got {momentum}")
        student = unwrap_model(student)
        averaged_t, averaged_s, copied_t, copied_s = [], [], [], []
        for teacher_value, student_value in self._pairs(
            self.module.named_parameters(), student.named_parameters(), "parameters"
        ):
            target = (averaged_t, averaged_s) if teacher_value.is_floating_point() else (copied_t, copied_s)
            target[0].append(teacher_value)
            target[1].append(student_value.detach())
        for teacher_value, student_value in self._pairs(self.module.named_buffers(), student.named_buffers(), "buffers"):
            average = self.mode == "state" and teacher_value.is_floating_point()
            target = (averaged_t, averaged_s) if average else (copied_t, copied_s)
            target[0].append(teacher_value)
            target[1].append(student_value.detach())
        # group by dtype/device (and tensor class: under FSDP2 parameters are sharded DTensors, buffers
        # plain tensors): foreach kernels want homogeneous lists
        groups: dict[tuple, tuple[list, list]] = {}
        for teacher_value, student_value in zip(averaged_t, averaged_s):
            key = (teacher_value.dtype, teacher_value.device, type(teacher_value))
            groups.setdefault(key, ([], []))
            groups[key][0].append(teacher_value)
            groups[key][1].append(student_value.to(dtype=teacher_value.dtype, device=teacher_value.device))
        for teachers, students in groups.values():
            torch._foreach_mul_(teachers, momentum)
            torch._foreach_add_(teachers, students, alpha=1.0 - momentum)
        for teacher_value, student_value in zip(copied_t, copied_s):
            teacher_value.copy_(student_value)


# ---------------------------------------------------------------------------------------- one shared view
# Views a method that trains student and teacher on one shared view per row (STiL, MMatch, co-training)
# may name instead of the original's "stil" (data_utils/views.py; docs/methods.md, "stil").
SHARED_VIEWS = ("stil", "weak", "strong", "hard", "eval")


def check_shared_view(view: str) -> None:
    if view not in SHARED_VIEWS:
        raise ValueError(f"view must be one of {SHARED_VIEWS}, not {view!r}")


def use_shared_view(method, view: str) -> None:
    """Both streams take ``view`` under the key "stil" (the key the step reads); the instance
    attributes are what the loaders read, so the class default stays the original's."""
    method.labeled_views = {"stil": view}
    method.unlabeled_views = {"stil": view}


# ---------------------------------------------------------------------------------------- budget-aware schedules
# One convention for every schedule a method has (docs/methods.md, "Budget-aware schedules"): the
# absolute key keeps the original's unit and value (``start_epoch``, ``ema_momentum``, a ramp in
# steps), and its ``*_fraction`` companion, when set, states the same schedule relative to the run
# (a fraction of ``max_steps``) and replaces it. Paper recipes use the absolute keys; short recipes
# the relative ones, so a 1,000-step run behaves like a compressed paper run.
def check_fraction(name: str, value: float | None, upper_inclusive: bool = True) -> None:
    """Stop on a schedule fraction outside [0, 1] (None = not used)."""
    if value is None:
        return
    if not (0.0 <= value <= 1.0) or (not upper_inclusive and value == 1.0):
        bound = "1]" if upper_inclusive else "1)"
        raise ValueError(f"{name} must be a fraction of max_steps in [0, {bound}, got {value}")


def fraction_of_run(fraction: float, max_steps: int) -> float:
    """A point or length of the schedule stated as ``fraction`` of the run, in optimisation steps."""
    return float(fraction) * max(1, int(max_steps))


def unlabeled_gate_open(state: TrainState, start_epoch: int, start_fraction: float | None = None) -> bool:
    """The epoch gate of the unlabelled terms: open after epoch ``start_epoch`` (the originals' rule,
    ``epoch > start_epoch``; -1 = always), or, when ``start_fraction`` is set, from step
    ``start_fraction * max_steps`` on. Python numbers only: no device sync."""
    if start_fraction is not None:
        return state.step >= fraction_of_run(start_fraction, state.max_steps)
    return state.epoch > start_epoch


def span_momentum(span_fraction: float, max_steps: int) -> float:
    """The EMA momentum whose averaging span ``1 / (1 - m)`` is ``span_fraction`` of the run:
    ``m = 1 - 1 / (span_fraction * max_steps)`` (0 when the span is a step or less: a copy).
    0.999 is a span of 1,000 steps: 0.1 % of a 2^20-step paper run, all of a 1,000-step one."""
    span = fraction_of_run(span_fraction, max_steps)
    return 0.0 if span <= 1.0 else 1.0 - 1.0 / span


def scheduled_momentum(momentum: float, span_fraction: float | None, max_steps: int) -> float:
    """``momentum`` (absolute) or, when ``span_fraction`` is set, `span_momentum` (relative)."""
    return momentum if span_fraction is None else span_momentum(span_fraction, max_steps)


def mean_teacher_momentum(step: int, decay: float) -> float:
    """Mean Teacher's EMA decay ``min(1 - 1/(step + 1), decay)``: step 0 copies the student,
    the decay reaches ``decay`` (0.999) at step 999."""
    return min(1.0 - 1.0 / (step + 1.0), decay)


def warmup_momentum(momentum: float, step: int) -> float:
    """EMA momentum with a warm-up: ``min(momentum, (1 + step) / (10 + step))`` (TensorFlow's
    ``ExponentialMovingAverage(num_updates=step)``), so a short run's EMA is not stuck at the
    initial weights. ``step`` = optimisation steps completed."""
    return min(momentum, (1.0 + step) / (10.0 + step))


def ema_momentum(momentum: float, step: int, warmup: bool, span_fraction: float | None = None, max_steps: int = 1) -> float:
    """The momentum of an EMA update at ``step``: ``momentum``, or the momentum of a span of
    ``span_fraction`` of the run (`scheduled_momentum`), warmed up (``warmup_momentum``) or constant."""
    momentum = scheduled_momentum(momentum, span_fraction, max_steps)
    return warmup_momentum(momentum, step) if warmup else momentum


def rampup_length(steps: float, fraction: float | None, max_steps: int) -> float:
    """The length of a ramp in steps: ``steps`` (absolute), or ``fraction`` of the run when set."""
    return float(steps) if fraction is None else fraction_of_run(fraction, max_steps)


def sigmoid_rampup(current: float, length: float) -> float:
    """Laine & Aila's ramp-up ``exp(-5 (1 - t)^2)`` with ``t = clip(current / length, 0, 1)``
    (Mean Teacher, MixMatch-style consistency weights); 1 when ``length`` is 0."""
    if length <= 0:
        return 1.0
    t = min(max(current / length, 0.0), 1.0)
    return float(math.exp(-5.0 * (1.0 - t) ** 2))


def linear_rampup(current: float, length: float) -> float:
    """``clip(current / length, 0, 1)``; 1 when ``length`` is 0 (MixMatch's lambda_u ramp)."""
    if length <= 0:
        return 1.0
    return float(min(max(current / length, 0.0), 1.0))


# ---------------------------------------------------------------------------------------- gather
@torch.no_grad()
def gather_no_grad(tensor: torch.Tensor, gather: Callable[[torch.Tensor], torch.Tensor] | TrainState) -> torch.Tensor:
    """All-gather ``tensor`` (dim 0 = batch) from every process without gradient.

    Processes may hold different batch sizes (uneven last batch): sizes are gathered first, every
    process pads to the largest, and the padding is dropped after the gather. ``gather`` is
    ``TrainState.gather`` (or a state); on one process it is the identity and no padding happens.
    """
    gather = getattr(gather, "gather", gather)  # a TrainState: its all-gather
    tensor = tensor.detach()
    size = torch.tensor([tensor.shape[0]], device=tensor.device, dtype=torch.long)
    sizes = gather(size).reshape(-1)
    if sizes.numel() == 1:
        return gather(tensor)
    max_size = int(sizes.max())
    if tensor.shape[0] < max_size:
        padding = tensor.new_zeros((max_size - tensor.shape[0],) + tuple(tensor.shape[1:]))
        tensor = torch.cat([tensor, padding], dim=0)
    gathered = gather(tensor).reshape((sizes.numel(), max_size) + tuple(tensor.shape[1:]))
    return torch.cat([gathered[rank, : int(n)] for rank, n in enumerate(sizes.tolist())], dim=0)


# ---------------------------------------------------------------------------------------- queues and distribution alignment
class Queue(nn.Module):
    """FIFO ring buffer of ``size`` entries of shape ``shape`` (buffers, so checkpoints keep it).

    ``enqueue(items)`` writes ``items`` (n, *shape) at the pointer with wrap-around; when
    ``n > size`` only the newest ``size`` items are kept. ``count`` = number of valid entries."""

    def __init__(self, size: int, *shape: int, dtype: torch.dtype = torch.float32, fill_value: float = 0.0):
        super().__init__()
        if size <= 0:
            raise ValueError("queue size must be positive")
        self.size = int(size)
        self.register_buffer("buffer", torch.full((self.size, *shape), fill_value, dtype=dtype))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, items: torch.Tensor) -> None:
        items = items.detach().to(dtype=self.buffer.dtype, device=self.buffer.device)
        if items.shape[1:] != self.buffer.shape[1:]:
            raise ValueError(f"queue holds entries of shape {tuple(self.buffer.shape[1:])}, got {tuple(items.shape[1:])}")
        n = items.shape[0]
        if n == 0:
            return
        start = self.ptr
        if n > self.size:
            start = (start + (n - self.size)) % self.size
            items = items[-self.size :]
            n = self.size
        positions = (start + torch.arange(n, device=self.buffer.device)) % self.size
        self.buffer.index_copy_(0, positions, items)
        self.ptr.copy_((start + n) % self.size)
        self.count.copy_(torch.clamp(self.count + n, max=self.size))

    def ordered(self) -> torch.Tensor:
        """The valid entries, oldest first (synchronises: for logging and tests, not hot paths)."""
        count = int(self.count)
        if count < self.size:
            return self.buffer[:count]
        return torch.roll(self.buffer, shifts=-int(self.ptr), dims=0)


class DistributionAlignment(nn.Module):
    """Queue-based distribution alignment (SimMatch / MMatch / STiL's optional DA).

    Keeps a FIFO of the last ``queue_size`` batch-mean probability vectors (zero-initialised). For
    probabilities ``p`` (B, C): push ``mean_b p_b`` (averaged over processes), then
    ``p_b <- normalise(p_b * target / mean(queue))`` with a uniform target by default. Zero rows
    of a not-yet-full queue only rescale the mean, which the normalisation cancels."""

    def __init__(self, num_classes: int, queue_size: int = 256):
        super().__init__()
        self.queue = Queue(queue_size, num_classes)

    @torch.no_grad()
    def forward(self, probs: torch.Tensor, state: TrainState | None = None, target: torch.Tensor | None = None):
        probs = at_least_float32(probs.detach())
        batch_mean = probs.mean(dim=0)
        if state is not None and state.num_processes > 1:
            batch_mean = state.reduce_sum(batch_mean) / state.num_processes
        self.queue.enqueue(batch_mean[None])
        aligned = probs / self.queue.buffer.mean(dim=0).clamp_min(1e-12)
        if target is not None:
            aligned = aligned * target.to(aligned)
        return aligned / aligned.sum(dim=1, keepdim=True)


class EMADistributionAlignment(nn.Module):
    """EMA-based distribution alignment (USB's ``DistAlignEMAHook``; ReMixMatch/AdaMatch style).

    ``p_model <- m p_model + (1 - m) mean_b p_ulb`` (the first call sets it to the batch mean);
    ``p_target`` is uniform (``target="uniform"``) or an EMA of the labelled-batch predictions
    (``target="labeled"``). Then ``p <- normalise(p * (p_target + eps) / (p_model + eps))``,
    eps = 1e-6."""

    def __init__(self, num_classes: int, momentum: float = 0.999, target: str = "uniform", eps: float = 1e-6):
        super().__init__()
        if target not in ("uniform", "labeled"):
            raise ValueError("target must be 'uniform' or 'labeled'")
        self.momentum = momentum
        self.target = target
        self.eps = eps
        self.register_buffer("p_model", torch.full((num_classes,), 1.0 / num_classes))
        self.register_buffer("p_target", torch.full((num_classes,), 1.0 / num_classes))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    def _mean(self, probs: torch.Tensor, state: TrainState | None) -> torch.Tensor:
        mean = probs.detach().float().mean(dim=0)
        if state is not None and state.num_processes > 1:
            mean = state.reduce_sum(mean) / state.num_processes
        return mean

    @torch.no_grad()
    def forward(self, probs_ulb: torch.Tensor, probs_lb: torch.Tensor | None = None, state: TrainState | None = None):
        mean_ulb = self._mean(probs_ulb, state)
        # first call: p_model = batch mean (a lerp with weight 1); later: EMA
        weight = torch.where(self.initialised, torch.tensor(1.0 - self.momentum, device=mean_ulb.device), torch.tensor(1.0, device=mean_ulb.device))
        self.p_model.lerp_(mean_ulb, weight)
        if self.target == "labeled":
            if probs_lb is None:
                raise ValueError("target='labeled' needs the labelled-batch probabilities")
            self.p_target.lerp_(self._mean(probs_lb, state), weight)
        self.initialised.fill_(True)
        aligned = probs_ulb.detach().float() * (self.p_target + self.eps) / (self.p_model + self.eps)
        return aligned / aligned.sum(dim=1, keepdim=True)


# ---------------------------------------------------------------------------------------- pseudo-labels
def confidence_mask(probs: torch.Tensor, threshold: float) -> torch.Tensor:
    """Float mask (B,): 1.0 where the largest class probability is >= ``threshold`` (FixMatch's
    fixed threshold, inclusive as in the paper's code), else 0.0. Never carries gradient."""
    return (probs.detach().max(dim=-1).values >= threshold).to(probs.dtype if probs.is_floating_point() else torch.float32)


def sharpen(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """MixMatch sharpening: ``p^(1/T) / sum_c p_c^(1/T)`` (T -> 0 gives one-hot)."""
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    powered = probs.pow(1.0 / temperature)
    return powered / powered.sum(dim=-1, keepdim=True)


@torch.no_grad()
def pseudo_labels(logits: torch.Tensor, hard: bool = True, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets from (teacher or weak-view) logits, detached.

    Returns ``(targets, probs)``: ``probs = softmax(logits)`` (what confidence masks use) and
    ``targets`` = ``argmax`` (long, ``hard=True``) or ``softmax(logits / temperature)`` (soft)."""
    logits = logits.detach().float()
    probs = logits.softmax(dim=-1)
    if hard:
        return probs.argmax(dim=-1), probs
    return (logits / temperature).softmax(dim=-1), probs


@torch.no_grad()
def pseudo_label_logs(
    predicted: torch.Tensor, mask: torch.Tensor, monitor_labels: torch.Tensor | None, prefix: str = "pseudo_label"
) -> dict[str, torch.Tensor]:
    """Monitoring only (never a loss): accuracy of hard pseudo-labels against the unlabelled rows'
    hidden ground truth, over all rows with a label (>= 0) and over the masked-in ones.
    NaN when no row qualifies (loggers should use a NaN-aware mean)."""
    logs = {"mask_ratio": mask.detach().float().mean()}
    if monitor_labels is None or monitor_labels.is_floating_point():
        return logs
    valid = (monitor_labels >= 0).float()
    correct = (predicted == monitor_labels).float() * valid
    selected = valid * (mask.detach() > 0).float()
    logs[f"{prefix}_accuracy"] = correct.sum() / valid.sum()
    logs[f"{prefix}_accuracy_masked"] = (correct * selected).sum() / selected.sum()
    return logs


# ---------------------------------------------------------------------------------------- projection network
# SimMatch / CoMatch: the model plus an optional projection head owned by the method.
class ProjectedNet(nn.Module):
    """``(logits, projections)`` of a classifier: the model's own L2-normalised ``projections``
    (Match-family presets: image-*, multimodal-concat*) or, when it has none (WRN-28-2, or
    ``projection_dim=0`` in its config), ``normalize(projector(features))`` with a head the method
    owns (USB's ``mlp_proj``: Linear(d, d)-ReLU-Linear(d, P)). Not registered inside the method
    (the model would appear twice in its state dict): built on the fly around ``model``/``projector``,
    and deep-copied once for an EMA teacher (whose names are then ``model.*`` / ``projector.*``)."""

    def __init__(self, model: nn.Module, projector: nn.Module | None = None):
        super().__init__()
        self.model = model
        self.projector = projector

    def forward(self, **inputs):
        out = self.model(**inputs)
        if self.projector is None:
            projections = getattr(out, "projections", None)
            if projections is None:
                raise ValueError(f"{type(unwrap_model(self.model)).__name__} returned no projections")
            return out.logits, projections
        return out.logits, F.normalize(self.projector(out.features), dim=-1)


def model_projection_head(model: nn.Module, projection_dim: int, method_name: str) -> nn.Module | None:
    """None when the model already returns ``projections``; else a method-owned MLP on its
    ``features`` (width from the config: ``channels[-1]`` for WRN). One-line error otherwise."""
    bare = unwrap_model(model)
    config = getattr(bare, "config", None)
    if int(getattr(config, "projection_dim", 0) or 0) > 0 and getattr(bare, "head", None) is not None:
        return None
    channels = getattr(config, "channels", None)
    if channels:
        dim = int(channels[-1])
    elif getattr(config, "hidden_size", None):
        dim = int(config.hidden_size)
    else:
        raise ValueError(
            f"method {method_name!r} needs a model with a projection head (features -> embedding); "
            f"{type(bare).__name__} has none: use an image-* / multimodal-concat* preset or wrn-28-2"
        )
    if projection_dim <= 0:
        raise ValueError(f"method {method_name!r}: projection_dim must be positive")
    return nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, int(projection_dim)))


# ---------------------------------------------------------------------------------------- model checks
def check_num_labels(method_name: str, model, num_labels) -> None:
    """Stop when the model's classifier does not have the data's number of classes."""
    model_labels = int(getattr(unwrap_model(model).config, "num_labels", 0) or 0)
    if num_labels and model_labels and model_labels != int(num_labels):
        raise ValueError(
            f"{method_name}: the model predicts {model_labels} classes but the data has {num_labels}; "
            "build the model for this dataset (a preset, or --model_overrides num_labels=...)"
        )


UNIMODAL_HEADS = ("classifier_multimodal", "classifier_imaging", "classifier_tabular")


def check_unimodal_heads(model: nn.Module, method_name: str) -> nn.Module:
    """The MMatch / co-training network: a multimodal classifier with image and tabular heads."""
    bare = unwrap_model(model)
    if not all(hasattr(bare, head) for head in UNIMODAL_HEADS):
        raise ValueError(
            f"{method_name} needs a multimodal model with fused, image and tabular heads (z_m, z_i, z_t); "
            f"got {type(bare).__name__} without them: use --model mmatch (paper) or mmatch-tiny"
        )
    return bare


def check_image_only_model(model: nn.Module, method_name: str) -> None:
    """The image-only variant of a method refuses a model that reads tabular input (one line, with the fix)."""
    reads = tuple(getattr(unwrap_model(model), "input_modalities", ()) or ())
    if "tabular" in reads:
        raise ValueError(
            f"method {method_name!r} is the image-only variant but the model reads {'+'.join(reads)} input; "
            f"use --method multimodal_{method_name} for an image+tabular model, or an image model (--model image-tiny)"
        )
