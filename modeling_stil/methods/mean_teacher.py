"""`mean_teacher`: Mean Teacher (Tarvainen & Valpola, NeurIPS 2017) as the Learning-to-Impute code runs it.

Reference: docs/methods.md, "mean_teacher" (classification and regression).
Per step, with a labelled batch (x, y) and an unlabelled batch in two independent views
u1 (the student's) and u2 (the teacher's)::

    q      = T(f_teacher(u2))                        no gradient; T = softmax (classification),
                                                     identity + view transfer (regression / landmarks)
    z_l, z_u = f_student([x; u1])                    one forward per interleaved chunk (BN sees
                                                     labelled and unlabelled rows together)
    L_x    = CE(z_l, y)            | MSE(z_l, y)     (classification | regression)
    L_u    = mean_{i,c} (softmax(z_u)_ic - q_ic)^2   | mean_{i,k} (z_u_ik - q_ik)^2
    w(t)   = lambda_u * ramp(t / (rampup_fraction * max_steps))      linear (original) or sigmoid
    loss   = L_x + w(t) * L_u

After each optimizer step (order of the original):

    eval EMA:  theta_eval <- 0.999 theta_eval + 0.001 theta              (evaluated and exported)
    decoupled weight decay on the student: theta <- (1 - student_weight_decay * lr) theta
    teacher:   theta_bar <- a_t theta_bar + (1 - a_t) theta, a_t = min(1 - 1/(t + 1), ema_decay)

with t = optimisation steps completed before this one (t = 0 copies the student). The teacher labels
in **train mode** (batch statistics of the u2 batch) as in the original; only its weights are averaged.

Landmarks: the teacher's prediction on u2 is moved into u1's frame before the loss, with the two
views' translations (pixels) and the targets' standard deviation (``--standardize_targets``):
``q = p + (t1 - t2) / sigma`` per coordinate. Without translations (plain regression,
image+tabular data) ``q = p``.

Reusable pieces (L2I imports them): `consistency_loss`, `consistency_targets`, `transfer_to_view`,
`mean_teacher_momentum`, `interleave`, `interleaved_logits`, `consistency_weight`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import (
    TASK_CLASSIFICATION,
    TASK_LANDMARKS,
    TASK_REGRESSION,
    DataInfo,
    MethodArguments,
    SSLMethod,
    TrainState,
    register_method,
)
from .common import (
    EMATeacher,
    at_least_float32,
    check_fraction,
    linear_rampup,
    model_inputs,
    pseudo_label_logs,
    scheduled_momentum,
    sigmoid_rampup,
    task_loss,
    unwrap_model,
    view_targets,
)

RAMPUPS = ("linear", "sigmoid")
EVAL_MODELS = ("ema", "teacher", "student")


# ---------------------------------------------------------------------------------------- reusable pieces
def mean_teacher_momentum(step: int, decay: float) -> float:
    """The original teacher's EMA decay ``min(1 - 1/(step + 1), decay)``: step 0 copies the student,
    the decay reaches ``decay`` (0.999) at step 999."""
    return min(1.0 - 1.0 / (step + 1.0), decay)


def consistency_weight(step: int, max_steps: int, lambda_u: float, rampup_fraction: float, rampup: str = "linear") -> float:
    """``lambda_u * ramp(step / (rampup_fraction * max_steps))``: the original's linear ramp
    (``clip(t, 0, 1)``) or Laine & Aila's sigmoid ``exp(-5 (1 - t)^2)``."""
    length = rampup_fraction * max_steps
    ramp = linear_rampup(step, length) if rampup == "linear" else sigmoid_rampup(step, length)
    return float(lambda_u) * ramp


def consistency_targets(teacher_logits: torch.Tensor, task: str) -> torch.Tensor:
    """What the student is pulled towards: softmax probabilities (classification) or the outputs
    themselves (regression, landmarks). Not detached: callers decide (L2I differentiates through it)."""
    if task == TASK_CLASSIFICATION:
        return at_least_float32(teacher_logits).softmax(dim=-1)
    return at_least_float32(teacher_logits)


def consistency_loss(student_logits: torch.Tensor, targets: torch.Tensor, task: str, reduction: str = "mean") -> torch.Tensor:
    """Squared error between the student and the targets, in float32 (float64 stays float64).

    classification: ``(softmax(student) - targets)^2`` with ``targets`` probabilities (B, C);
    regression / landmarks: ``(student - targets)^2``.
    ``reduction``: ``"mean"`` over all B x C entries (the original MT loss), ``"sum"`` over all entries
    (the classification L2I inner loss), ``"none"``: per-row mean (B,).
    Gradient flows into ``student_logits`` and, if they require it, into ``targets``."""
    student = at_least_float32(student_logits)
    if task == TASK_CLASSIFICATION:
        student = student.softmax(dim=-1)
    targets = targets.to(student.dtype).reshape(student.shape)
    squared = (student - targets) ** 2
    if reduction == "mean":
        return squared.mean()
    if reduction == "sum":
        return squared.sum()
    if reduction == "none":
        return squared.reshape(squared.shape[0], -1).mean(dim=1)
    raise ValueError(f"unknown reduction {reduction!r}; use mean, sum or none")


def transfer_to_view(predictions: torch.Tensor, source_translation: torch.Tensor | None,
                     target_translation: torch.Tensor | None, target_std: torch.Tensor | None = None) -> torch.Tensor:
    """Move landmark predictions made on one translated view into another view's frame.

    ``predictions`` (B, 2K) flat x1, y1, ..., (standardised when ``target_std`` is given);
    translations (B, 2) = (tx, ty) pixels by which each view moved the image. Since de-standardise,
    shift, re-standardise is affine, this is ``p + (t_target - t_source) / sigma`` per coordinate.
    No translation on either side: the predictions unchanged."""
    if source_translation is None or target_translation is None:
        return predictions
    delta = (target_translation - source_translation).to(predictions.dtype)
    delta = delta.repeat(1, predictions.shape[1] // 2)
    if target_std is not None:
        delta = delta / target_std.to(predictions.dtype)
    return predictions + delta


def interleave(chunks: list[torch.Tensor]) -> list[torch.Tensor]:
    """MixMatch's interleave: ``n`` equally sized chunks are each cut into ``n`` groups (sizes
    ``size // n``, the remainder going to the last groups); group ``i`` of chunk 0 trades places with
    group ``i`` of chunk ``i``. Each output chunk then holds rows of every input chunk, so BatchNorm
    in a per-chunk forward sees a mixed batch. The operation is its own inverse."""
    n = len(chunks)
    if n <= 1:
        return list(chunks)
    size = chunks[0].shape[0]
    if any(chunk.shape[0] != size for chunk in chunks):
        raise ValueError(f"interleave needs chunks of equal size, got {[c.shape[0] for c in chunks]}")
    groups = [size // n] * n
    for i in range(size - sum(groups)):
        groups[-i - 1] += 1
    parts = [list(torch.split(chunk, groups, dim=0)) for chunk in chunks]
    for i in range(1, n):
        parts[0][i], parts[i][i] = parts[i][i], parts[0][i]
    return [torch.cat(part, dim=0) for part in parts]


def _batch_size(inputs: dict) -> int:
    for value in inputs.values():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    raise ValueError("model inputs need at least one batched tensor")


def interleaved_logits(model, views: list[dict], use_interleave: bool = True) -> list[torch.Tensor]:
    """Logits of several model-input dicts.

    With ``use_interleave`` and equal batch sizes: one forward per view after `interleave` (the
    original's scheme: each forward mixes rows of every view), un-interleaved afterwards. Otherwise
    (unequal sizes, or ``use_interleave=False``): one forward over the concatenation, whose BatchNorm
    statistics also cover every view."""
    sizes = [_batch_size(view) for view in views]
    keys = list(views[0])
    if use_interleave and len(views) > 1 and len(set(sizes)) == 1:
        columns = {key: interleave([view[key] for view in views]) if isinstance(views[0][key], torch.Tensor) else None
                   for key in keys}
        logits = []
        for i in range(len(views)):
            inputs = {key: (columns[key][i] if columns[key] is not None else views[0][key]) for key in keys}
            logits.append(model(**inputs).logits)
        return interleave(logits)
    inputs = {key: (torch.cat([view[key] for view in views], dim=0) if isinstance(views[0][key], torch.Tensor) else views[0][key])
              for key in keys}
    return list(torch.split(model(**inputs).logits, sizes, dim=0))


def resolve_view(model, view: str | None) -> str:
    """The view recipe of every stream: ``view`` when given; else ``translate`` for an image-only
    regression model (landmarks: the only augmentation that keeps targets on the pixels, the
    original's ±4 px reflect translation) and ``weak`` otherwise (pad-crop + flip for CIFAR; with the
    ``aflw`` view preset ``weak`` is ``translate`` as well)."""
    if view is not None:
        return view
    config = getattr(unwrap_model(model), "config", None)
    if config is not None and getattr(config, "problem_type", None) == "regression" and getattr(config, "tabular_schema", None) is None:
        return "translate"
    return "weak"


@torch.no_grad()
def evaluation_ema_step(eval_ema: EMATeacher | None, model, state: TrainState, decay: float, warmup: bool,
                        student_weight_decay: float, span_fraction: float | None = None) -> None:
    """The MixMatch-pytorch ``WeightEMA.step`` the L2I scripts share: the evaluation EMA
    ``theta_eval <- d theta_eval + (1 - d) theta`` (parameters; BN buffers copied from the student),
    then the decoupled weight decay ``theta <- (1 - student_weight_decay * lr) theta`` on every
    floating parameter of the student (biases and BN affine included, as the original)."""
    t = max(0, state.step - 1)
    if eval_ema is not None:
        decay = scheduled_momentum(decay, span_fraction, state.max_steps)  # relative form: a span of the run
        if warmup:
            decay = min(decay, (1.0 + t) / (10.0 + t))
        eval_ema.update(model, decay)
    coefficient = student_weight_decay * state.learning_rate
    if coefficient > 0:
        params = [p for p in unwrap_model(model).parameters() if p.is_floating_point()]
        torch._foreach_mul_(params, 1.0 - coefficient)


@torch.no_grad()
def regression_pseudo_label_logs(targets: torch.Tensor, monitor: torch.Tensor | None, prefix: str = "pseudo_label") -> dict[str, torch.Tensor]:
    """Monitoring only: MSE of regression pseudo-targets against the unlabelled rows' hidden ground
    truth in the same frame and units (NaN where none is known)."""
    if monitor is None or not monitor.is_floating_point():
        return {}
    monitor = monitor.to(targets.dtype).reshape(targets.shape)
    valid = torch.isfinite(monitor).all(dim=-1, keepdim=True) if monitor.dim() > 1 else torch.isfinite(monitor)
    error = torch.where(valid, (targets - torch.nan_to_num(monitor)) ** 2, torch.zeros_like(targets))
    count = valid.expand_as(targets).float().sum()
    return {f"{prefix}_mse": error.sum() / count}


# ---------------------------------------------------------------------------------------- the method
def resolved_student_weight_decay(value: float | None, task: str) -> float:
    """The student's decoupled weight-decay coefficient: ``value``, or the originals' default
    (0.02 in the classification scripts; the regression scripts have the line commented out)."""
    if value is not None:
        return float(value)
    return 0.02 if task == TASK_CLASSIFICATION else 0.0


@dataclass
class MeanTeacherArguments(MethodArguments):
    """Defaults = WeiHongLee/Learning-to-impute Classification/train-MT.py; the regression script's
    values apply where a default is None (lambda_u 75, no decoupled student weight decay)."""

    lambda_u: float | None = None  # None: 50 (classification), 75 (regression / landmarks)
    rampup: str = "linear"  # "linear" (original: clip(t, 0, 1)) or "sigmoid" (Laine & Aila / Tarvainen)
    rampup_fraction: float = 0.4  # ramp length as a fraction of max_steps (0.4 x epochs in the original)
    ema_decay: float = 0.999  # teacher: a_t = min(1 - 1/(t+1), ema_decay)
    ema_span_fraction: float | None = None  # relative form of ema_decay: span 1/(1-d) = this x max_steps
    teacher_train_mode: bool = True  # the teacher labels with batch statistics (original); False: eval mode
    eval_ema_decay: float = 0.999  # evaluation EMA (constant decay); 0 disables it
    eval_ema_warmup: bool = False  # True: decay min(d, (1+t)/(10+t)) (short runs); original: constant
    eval_ema_span_fraction: float | None = None  # relative form of eval_ema_decay: span 1/(1-d) = this x max_steps
    # decoupled weight decay on the student after the eval-EMA update: theta *= 1 - coef * lr.
    # None: 0.02 (classification, the original WeightEMA) / 0 (regression: its line is commented out)
    student_weight_decay: float | None = None
    evaluate: str = "ema"  # network evaluated and exported: "ema" (original), "teacher" or "student"
    interleave: bool = True  # per-chunk forwards over interleaved [x; u1] (original) or one forward
    # view recipe of the labelled and both unlabelled views; None: translate (image-only regression,
    # landmarks) or weak (see `resolve_view`)
    view: str | None = None

    def __post_init__(self):
        if self.lambda_u is not None and self.lambda_u < 0:
            raise ValueError("lambda_u must be >= 0")
        if self.rampup not in RAMPUPS:
            raise ValueError(f"rampup must be one of {RAMPUPS}, not {self.rampup!r}")
        if not 0.0 <= self.rampup_fraction <= 1.0:
            raise ValueError("rampup_fraction must be in [0, 1]")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError("ema_decay must be in [0, 1)")
        if not 0.0 <= self.eval_ema_decay < 1.0:
            raise ValueError("eval_ema_decay must be in [0, 1)")
        check_fraction("eval_ema_span_fraction", self.eval_ema_span_fraction)
        check_fraction("ema_span_fraction", self.ema_span_fraction)
        if self.student_weight_decay is not None and self.student_weight_decay < 0:
            raise ValueError("student_weight_decay must be >= 0")
        if self.evaluate not in EVAL_MODELS:
            raise ValueError(f"evaluate must be one of {EVAL_MODELS}, not {self.evaluate!r}")
        if self.evaluate == "ema" and self.eval_ema_decay == 0:
            raise ValueError("evaluate='ema' needs eval_ema_decay > 0; set evaluate: student or teacher")

    def resolved_lambda_u(self, task: str) -> float:
        if self.lambda_u is not None:
            return float(self.lambda_u)
        return 50.0 if task == TASK_CLASSIFICATION else 75.0

    def resolved_student_weight_decay(self, task: str) -> float:
        return resolved_student_weight_decay(self.student_weight_decay, task)


@register_method
class MeanTeacher(SSLMethod):
    name = "mean_teacher"
    arguments_class = MeanTeacherArguments
    labeled_views = {"weak": "weak"}
    # two independent augmentations of each unlabelled row ("weak" = translate for landmarks)
    unlabeled_views = {"student": "weak", "teacher": "weak"}
    supported_tasks = (TASK_CLASSIFICATION, TASK_REGRESSION, TASK_LANDMARKS)

    def __init__(self, model, args: MeanTeacherArguments | None = None):
        super().__init__(model, args)
        view = resolve_view(model, self.args.view)  # instance attributes: the trainer reads them
        self.labeled_views, self.unlabeled_views = {"weak": view}, {"student": view, "teacher": view}
        self.teacher = EMATeacher(model, mode="parameters", eval_mode=not self.args.teacher_train_mode)
        self.eval_ema = EMATeacher(model, mode="parameters") if self.args.eval_ema_decay > 0 else None
        # targets' std of the labelled rows (standardised training): moves landmarks between views
        self.register_buffer("target_std", None, persistent=False)

    def setup(self, info: DataInfo) -> None:
        if info.target_std is not None:
            self.target_std = torch.as_tensor(info.target_std, dtype=torch.float32)

    # ------------------------------------------------------------------ pieces the step is made of
    def teacher_targets(self, unlabeled: dict, task: str) -> torch.Tensor:
        """q: the teacher's targets on u2, moved into u1's frame (landmarks). No gradient."""
        teacher_view = unlabeled["teacher"]
        with torch.no_grad():
            logits = self.teacher(**model_inputs(teacher_view)).logits
            targets = consistency_targets(logits, task)
            if task != TASK_CLASSIFICATION:
                std = self.target_std.to(targets.device) if self.target_std is not None else None
                targets = transfer_to_view(targets, teacher_view.get("translation"),
                                           unlabeled["student"].get("translation"), std)
        return targets.detach()

    def student_logits(self, labeled_view: dict, student_view: dict) -> tuple[torch.Tensor, torch.Tensor]:
        logits_l, logits_u = interleaved_logits(self.model, [model_inputs(labeled_view), model_inputs(student_view)],
                                                self.args.interleave)
        return logits_l, logits_u

    def training_step(self, labeled: dict, unlabeled: dict | None, state: TrainState):
        if unlabeled is None:
            raise ValueError("mean_teacher needs an unlabelled batch (the method declares unlabeled_views)")
        task = state.task
        labeled_view = labeled["weak"]
        targets_l = view_targets(labeled_view, labeled["labels"])
        q = self.teacher_targets(unlabeled, task)
        logits_l, logits_u = self.student_logits(labeled_view, unlabeled["student"])

        sup_loss = task_loss(logits_l, targets_l, task)
        unsup_loss = consistency_loss(logits_u, q, task)
        weight = consistency_weight(state.step, state.max_steps, self.args.resolved_lambda_u(task),
                                    self.args.rampup_fraction, self.args.rampup)
        loss = sup_loss + weight * unsup_loss

        logs = {"loss": loss.detach(), "sup_loss": sup_loss.detach(), "unsup_loss": unsup_loss.detach(),
                "unsup_weight": torch.full((), weight, device=loss.device)}
        if task == TASK_CLASSIFICATION:
            logs.update(pseudo_label_logs(q.argmax(dim=-1), torch.ones(q.shape[0], device=q.device),
                                          unlabeled.get("monitor_labels")))
            logs.pop("mask_ratio", None)  # no mask in Mean Teacher
        else:
            monitor = unlabeled["student"].get("monitor_labels", unlabeled.get("monitor_labels"))
            logs.update(regression_pseudo_label_logs(q, monitor))
        return loss, logs

    # ------------------------------------------------------------------ hooks
    @torch.no_grad()
    def after_optimizer_step(self, state: TrainState) -> None:
        """eval EMA, then decoupled weight decay on the student, then the teacher (original order)."""
        t = max(0, state.step - 1)  # steps completed before the one that just finished
        evaluation_ema_step(self.eval_ema, self.model, state, self.args.eval_ema_decay, self.args.eval_ema_warmup,
                            self.args.resolved_student_weight_decay(state.task), span_fraction=self.args.eval_ema_span_fraction)
        decay = scheduled_momentum(self.args.ema_decay, self.args.ema_span_fraction, state.max_steps)
        self.teacher.update(self.model, mean_teacher_momentum(t, decay))

    def eval_model(self):
        if self.args.evaluate == "ema" and self.eval_ema is not None:
            return self.eval_ema.module
        if self.args.evaluate == "teacher":
            return self.teacher.module
        return self.model
