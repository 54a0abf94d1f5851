"""`fixmatch`: FixMatch (Sohn et al., NeurIPS 2020).

Per step, with B labelled and B_u = mu * B unlabelled rows::

    logits = model([x_l weak; x_u weak; x_u strong])          # one forward (concat_forward=True)
    q      = softmax(logits_u_weak).detach()                   # or the EMA teacher's (use_ema_teacher)
    mask   = max_c q >= threshold                              # 0.95
    target = argmax q            (hard, default) | softmax(logits_u_weak / T) (soft)
    loss   = CE(logits_l, y) + lambda_u * (1/B_u) sum_b mask_b CE(logits_u_strong_b, target_b)

The unsupervised term is normalised by B_u (all unlabelled rows), not by the number of confident
rows, as in the paper and USB. An EMA of the parameters (momentum 0.999, with a TF-style warm-up
``min(m, (1+t)/(10+t))``) is kept and evaluated by default, as in the paper and USB's classic-CV
protocol. See docs/methods.md for every decision.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import EMAOption, MethodArguments, SSLMethod, TrainState, register_method
from .common import (
    EMA_MODES,
    check_fraction,
    concat_views,
    confidence_mask,
    cross_entropy,
    model_inputs,
    pseudo_label_logs,
    pseudo_labels,
    view_targets,
)


@dataclass
class FixMatchArguments(MethodArguments):
    lambda_u: float = 1.0  # weight of the unlabelled consistency loss
    threshold: float = 0.95  # confidence threshold tau (inclusive)
    use_hard_labels: bool = True  # argmax pseudo-labels (paper); False: soft targets softmax(z/T)
    temperature: float = 1.0  # only for soft pseudo-labels
    # one forward over [labelled weak; unlabelled weak; unlabelled strong] (BN sees the mixed
    # batch, as the paper's implementation). False: separate forwards (BN statistics per stream).
    concat_forward: bool = True
    ema_momentum: float = 0.999  # 0 disables the EMA model entirely
    ema_warmup: bool = True  # momentum min(m, (1+t)/(10+t)): sane EMA for short runs
    ema_span_fraction: float | None = None  # relative form of ema_momentum: span 1/(1-m) = this x max_steps
    ema_mode: str = "parameters"  # "parameters" (paper/USB) or "state" (EMAN: BN statistics averaged too)
    eval_with_ema: bool = True  # evaluate/export the EMA model (paper, USB) when it exists
    use_ema_teacher: bool = False  # pseudo-labels from the EMA model instead of the student's weak view

    def __post_init__(self):
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError("threshold must be in [0, 1]")
        if not 0.0 <= self.ema_momentum < 1.0:
            raise ValueError("ema_momentum must be in [0, 1)")
        check_fraction("ema_span_fraction", self.ema_span_fraction)
        if self.ema_mode not in EMA_MODES:
            raise ValueError(f"ema_mode must be one of {EMA_MODES}")
        if self.temperature <= 0:
            raise ValueError("temperature must be positive")
        if self.use_ema_teacher and self.ema_momentum == 0:
            raise ValueError("use_ema_teacher needs ema_momentum > 0")


@register_method
class FixMatch(SSLMethod):
    name = "fixmatch"
    arguments_class = FixMatchArguments
    labeled_views = {"weak": "weak"}
    unlabeled_views = {"weak": "weak", "strong": "strong"}

    def ema_options(self) -> list[EMAOption]:
        a = self.args
        return [EMAOption("ema", a.ema_momentum, a.ema_span_fraction, warmup="tf" if a.ema_warmup else None,
                          mode=a.ema_mode, enabled=a.ema_momentum > 0, evaluate=a.eval_with_ema)]

    # ------------------------------------------------------------------ forward passes
    def _forward(self, labeled_inputs: dict, weak_inputs: dict | None, strong_inputs: dict):
        """Logits of (labelled weak, unlabelled weak or None, unlabelled strong)."""
        if self.args.concat_forward:
            views = [labeled_inputs] + ([weak_inputs] if weak_inputs is not None else []) + [strong_inputs]
            inputs, sizes = concat_views(views)
            chunks = list(torch.split(self.model(**inputs).logits, sizes, dim=0))
            logits_l, logits_s = chunks[0], chunks[-1]
            logits_w = chunks[1] if weak_inputs is not None else None
            return logits_l, logits_w, logits_s
        logits_l = self.model(**labeled_inputs).logits
        logits_w = None
        if weak_inputs is not None:
            with torch.no_grad():  # only used as a (detached) target
                logits_w = self.model(**weak_inputs).logits
        logits_s = self.model(**strong_inputs).logits
        return logits_l, logits_w, logits_s

    def training_step(self, labeled: dict, unlabeled: dict, state: TrainState):
        labeled_view = labeled["weak"]
        targets_l = view_targets(labeled_view, labeled["labels"])
        weak_inputs = model_inputs(unlabeled["weak"])
        use_teacher = self.args.use_ema_teacher and self.ema is not None
        logits_l, logits_w, logits_s = self._forward(
            model_inputs(labeled_view), None if use_teacher else weak_inputs, model_inputs(unlabeled["strong"])
        )
        if use_teacher:
            logits_w = self.ema(**weak_inputs).logits

        sup_loss = cross_entropy(logits_l, targets_l, reduction="mean")

        targets_u, probs_w = pseudo_labels(logits_w, hard=self.args.use_hard_labels, temperature=self.args.temperature)
        mask = confidence_mask(probs_w, self.args.threshold)
        unsup_loss = (cross_entropy(logits_s, targets_u, reduction="none") * mask).mean()  # / B_u
        loss = sup_loss + self.args.lambda_u * unsup_loss

        logs = {"loss": loss.detach(), "sup_loss": sup_loss.detach(), "unsup_loss": unsup_loss.detach()}
        logs.update(pseudo_label_logs(probs_w.argmax(dim=-1), mask, unlabeled.get("monitor_labels")))
        return loss, logs
