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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import (
    TASK_CLASSIFICATION,
    TASK_LANDMARKS,
    TASK_REGRESSION,
    DataInfo,
    EMAOption,
    MethodArguments,
    SSLMethod,
    TrainState,
    register_method,
)
from .common import check_fraction, model_inputs, pseudo_label_logs, task_loss, view_targets
from .consistency import (
    RAMPUPS,
    consistency_loss,
    consistency_targets,
    consistency_weight,
    decay_student_weights,
    default_student_weight_decay,
    evaluation_ema_option,
    interleaved_logits,
    regression_pseudo_label_logs,
    resolve_view,
    transfer_to_view,
)

EVAL_MODELS = ("ema", "teacher", "student")


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
        return default_student_weight_decay(self.student_weight_decay, task)


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
        # targets' std of the labelled rows (standardised training): moves landmarks between views
        self.register_buffer("target_std", None, persistent=False)

    def ema_options(self) -> list[EMAOption]:
        """The evaluation EMA and the teacher (a_t = min(1 - 1/(t+1), ema_decay)), both parameter EMAs,
        updated by `after_optimizer_step` in the original's order."""
        a = self.args
        return [evaluation_ema_option(a, evaluate=a.evaluate == "ema", updated="by_method"),
                EMAOption("teacher", a.ema_decay, a.ema_span_fraction, warmup="mean_teacher", warmup_counts="before",
                          eval_mode=not a.teacher_train_mode, evaluate=a.evaluate == "teacher", updated="by_method")]

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

    def training_step(self, labeled: dict, unlabeled: dict, state: TrainState):
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
    def weight_ema_step(self, state: TrainState) -> None:
        """MixMatch-pytorch's ``WeightEMA.step``, which the L2I scripts share: the evaluation EMA, then
        the decoupled weight decay on the student."""
        self.update_ema("eval_ema", state)
        decay_student_weights(self.model, self.args.resolved_student_weight_decay(state.task) * state.learning_rate)

    @torch.no_grad()
    def after_optimizer_step(self, state: TrainState) -> None:
        """eval EMA, then decoupled weight decay on the student, then the teacher (original order)."""
        self.weight_ema_step(state)
        self.update_ema("teacher", state)
