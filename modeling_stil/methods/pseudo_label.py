"""`pseudo_label`: pseudo-labelling as Learning-to-Impute's Regression/train-PL.py runs it
(docs/methods.md, "pseudo_label"), with a classification counterpart (not in the original, see there).

Per step, with a labelled batch (x, y) and an unlabelled batch in two views (u1 student, u2 labeller)::

    regression / landmarks:
      z_hat  = transfer_{u2 -> u1}( sg(f(u2)) )      the STUDENT itself labels (no teacher), moved
                                                     into u1's frame: z_hat = p + (t1 - t2) / sigma
      L_u    = mean_{i,k} (f(u1)_ik - z_hat_ik)^2
    classification (Lee 2013 / USB's PseudoLabel, two views):
      p      = softmax(sg(f(u2))),  y_hat = argmax p,  m = [max p >= threshold]
      L_u    = 1/B_u sum_i m_i CE(f(u1)_i, y_hat_i)
    z_l, z_u = f([x; u1])                            interleaved per-chunk forwards (as the original)
    loss     = L_x + lambda_u * clip(t / (rampup_fraction * max_steps), 0, 1) * L_u

The labelling forward on u2 runs without gradient in the model's current mode (train mode in
training). After each optimizer step the evaluation EMA (0.999, no decoupled decay for regression)
is updated; it is evaluated and exported (the original PL evaluates its EMA).
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
from .common import at_least_float32, check_fraction, confidence_mask, cross_entropy, model_inputs, pseudo_label_logs, task_loss, view_targets
from .consistency import (
    RAMPUPS,
    consistency_loss,
    consistency_weight,
    decay_student_weights,
    default_student_weight_decay,
    evaluation_ema_option,
    interleaved_logits,
    regression_pseudo_label_logs,
    resolve_view,
    transfer_to_view,
)


@dataclass
class PseudoLabelArguments(MethodArguments):
    """Defaults = Learning-to-impute Regression/train-PL.py; classification values (None) follow USB."""

    lambda_u: float | None = None  # None: 75 (regression / landmarks, original), 1.0 (classification)
    rampup: str = "linear"  # linear (original) or sigmoid
    rampup_fraction: float = 0.4  # ramp over 0.4 x max_steps (9000 of 22500 iterations)
    threshold: float = 0.95  # classification only: confidence mask on the labeller's softmax (inclusive)
    eval_ema_decay: float = 0.999  # evaluation EMA; 0 disables it (the student is evaluated)
    eval_ema_warmup: bool = False  # True: decay min(d, (1+t)/(10+t)) for short runs
    eval_ema_span_fraction: float | None = None  # relative form of eval_ema_decay: span 1/(1-d) = this x max_steps
    student_weight_decay: float | None = None  # decoupled decay coef * lr; None: 0.02 classification / 0 regression
    interleave: bool = True
    view: str | None = None  # view recipe of every stream; None: translate (image-only regression) or weak

    def __post_init__(self):
        if self.lambda_u is not None and self.lambda_u < 0:
            raise ValueError("lambda_u must be >= 0")
        if self.rampup not in RAMPUPS:
            raise ValueError(f"rampup must be one of {RAMPUPS}, not {self.rampup!r}")
        if not 0.0 <= self.rampup_fraction <= 1.0:
            raise ValueError("rampup_fraction must be in [0, 1]")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError("threshold must be in [0, 1]")
        if not 0.0 <= self.eval_ema_decay < 1.0:
            raise ValueError("eval_ema_decay must be in [0, 1)")
        check_fraction("eval_ema_span_fraction", self.eval_ema_span_fraction)
        if self.student_weight_decay is not None and self.student_weight_decay < 0:
            raise ValueError("student_weight_decay must be >= 0")

    def resolved_lambda_u(self, task: str) -> float:
        if self.lambda_u is not None:
            return float(self.lambda_u)
        return 1.0 if task == TASK_CLASSIFICATION else 75.0

    def resolved_student_weight_decay(self, task: str) -> float:
        return default_student_weight_decay(self.student_weight_decay, task)


@register_method
class PseudoLabel(SSLMethod):
    name = "pseudo_label"
    arguments_class = PseudoLabelArguments
    labeled_views = {"weak": "weak"}
    unlabeled_views = {"student": "weak", "labeller": "weak"}
    supported_tasks = (TASK_CLASSIFICATION, TASK_REGRESSION, TASK_LANDMARKS)

    def __init__(self, model, args: PseudoLabelArguments | None = None):
        super().__init__(model, args)
        view = resolve_view(model, self.args.view)
        self.labeled_views, self.unlabeled_views = {"weak": view}, {"student": view, "labeller": view}
        self.register_buffer("target_std", None, persistent=False)

    def ema_options(self) -> list[EMAOption]:
        return [evaluation_ema_option(self.args)]  # evaluated and exported

    def setup(self, info: DataInfo) -> None:
        if info.target_std is not None:
            self.target_std = torch.as_tensor(info.target_std, dtype=torch.float32)

    def training_step(self, labeled: dict, unlabeled: dict, state: TrainState):
        task = state.task
        labeled_view = labeled["weak"]
        targets_l = view_targets(labeled_view, labeled["labels"])
        student_view, labeller_view = unlabeled["student"], unlabeled["labeller"]
        with torch.no_grad():
            labeller_logits = at_least_float32(self.model(**model_inputs(labeller_view)).logits.detach())
        logits_l, logits_u = interleaved_logits(self.model, [model_inputs(labeled_view), model_inputs(student_view)],
                                                self.args.interleave)
        sup_loss = task_loss(logits_l, targets_l, task)
        logs: dict[str, torch.Tensor] = {}
        if task == TASK_CLASSIFICATION:
            probs = labeller_logits.softmax(dim=-1)
            hard = probs.argmax(dim=-1)
            mask = confidence_mask(probs, self.args.threshold)
            unsup_loss = (cross_entropy(logits_u, hard, reduction="none") * mask).mean()
            logs.update(pseudo_label_logs(hard, mask, unlabeled.get("monitor_labels")))
        else:
            std = self.target_std.to(labeller_logits.device) if self.target_std is not None else None
            z_hat = transfer_to_view(labeller_logits, labeller_view.get("translation"), student_view.get("translation"), std)
            unsup_loss = consistency_loss(logits_u, z_hat, task)
            logs.update(regression_pseudo_label_logs(z_hat, student_view.get("monitor_labels", unlabeled.get("monitor_labels"))))
        weight = consistency_weight(state.step, state.max_steps, self.args.resolved_lambda_u(task),
                                    self.args.rampup_fraction, self.args.rampup)
        loss = sup_loss + weight * unsup_loss
        logs.update({"loss": loss.detach(), "sup_loss": sup_loss.detach(), "unsup_loss": unsup_loss.detach(),
                     "unsup_weight": torch.full((), weight, device=loss.device)})
        return loss, logs

    @torch.no_grad()
    def after_optimizer_step(self, state: TrainState) -> None:
        super().after_optimizer_step(state)  # the evaluation EMA, then WeightEMA's decoupled weight decay
        decay_student_weights(self.model, self.args.resolved_student_weight_decay(state.task) * state.learning_rate)
