"""`mixmatch`: MixMatch (Berthelot et al., NeurIPS 2019) as Learning-to-Impute's Classification/train-MM.py
runs it (itself adapted from YU1ut/MixMatch-pytorch). Reference: docs/methods.md, "mixmatch".

Per step, with a labelled batch (x, y) of B rows and an unlabelled batch in K = 2 views (u1, u2)::

    p_bar = 1/K sum_k softmax(f(u_k))                  no gradient, student in TRAIN mode (batch stats)
    q     = sharpen(p_bar, T) = p_bar^(1/T) / sum_c p_bar_c^(1/T)            T = 0.5
    W     = [x; u1; u2],  targets [onehot(y); q; q]
    lam ~ Beta(alpha, alpha), lam' = max(lam, 1 - lam), pi = a random permutation of W's rows
    W'    = lam' W + (1 - lam') W[pi]    (inputs and targets alike, across labelled and unlabelled rows)
    z     = f(W')  as one forward per B-row chunk after `interleave` (BN sees mixed batches)
    L_x   = -1/B sum_{i<B} sum_c t'_ic log softmax(z_i)_c
    L_u   = mean_{i>=B, c} (softmax(z_i)_c - t'_ic)^2       (over 2 B_u x C entries)
    loss  = L_x + lambda_u * clip(t / (rampup_fraction * max_steps), 0, 1) * L_u     lambda_u = 75

After each optimizer step: the evaluation EMA (0.999) and the decoupled student weight decay
``theta *= 1 - 0.02 lr`` (MixMatch-pytorch's ``WeightEMA``); the EMA is evaluated and exported.

Classification only: the original has no regression MixMatch (Regression/ has SL, PL, MT, L2I).
Image+tabular models: continuous values are mixed like pixels; categorical codes and missing masks keep
the dominant row's values (lam' >= 0.5), since codes cannot be interpolated (not in the original).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import TASK_CLASSIFICATION, EMAOption, MethodArguments, SSLMethod, TrainState, register_method
from .common import at_least_float32, check_fraction, linear_rampup, model_inputs, pseudo_label_logs, sharpen, view_targets
from .consistency import decay_student_weights, evaluation_ema_option, interleave


# ---------------------------------------------------------------------------------------- pieces
@torch.no_grad()
def guess_labels(model, views: list[dict], temperature: float) -> torch.Tensor:
    """Sharpened average of the softmax predictions over the K unlabelled views (no gradient).

    The model runs in whatever mode it is in (train mode in training: batch statistics, and BN
    running statistics are updated, as the original)."""
    probs = torch.stack([at_least_float32(model(**view).logits).softmax(dim=-1) for view in views]).mean(dim=0)
    return sharpen(probs, temperature)


def mixup(inputs: dict[str, torch.Tensor], targets: torch.Tensor, lam: float, permutation: torch.Tensor):
    """``lam * a + (1 - lam) * a[permutation]`` for every floating input tensor and the targets.

    Non-floating inputs (categorical table codes, missing masks) cannot be mixed: they keep the
    values of the dominant row (``lam >= 0.5`` after MixMatch's ``max(lam, 1 - lam)``)."""
    mixed = {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            mixed[key] = lam * value + (1.0 - lam) * value[permutation]
        else:
            mixed[key] = value
    return mixed, lam * targets + (1.0 - lam) * targets[permutation]


def chunked_interleaved_logits(model, inputs: dict, chunk_size: int) -> torch.Tensor:
    """Logits of ``inputs`` forwarded as ``n = rows / chunk_size`` chunks after `interleave` (each chunk
    mixes rows of every chunk: BN statistics of a mixed batch, as the original), un-interleaved.
    One forward when the rows are not a multiple of ``chunk_size``."""
    rows = next(v.shape[0] for v in inputs.values() if isinstance(v, torch.Tensor))
    if chunk_size <= 0 or rows % chunk_size or rows == chunk_size:
        return model(**inputs).logits
    n = rows // chunk_size
    columns = {k: (interleave(list(torch.split(v, chunk_size))) if isinstance(v, torch.Tensor) else None)
               for k, v in inputs.items()}
    logits = [model(**{k: (columns[k][i] if columns[k] is not None else inputs[k]) for k in inputs}).logits
              for i in range(n)]
    return torch.cat(interleave(logits), dim=0)


@dataclass
class MixMatchArguments(MethodArguments):
    """Defaults = Learning-to-impute Classification/train-MM.py."""

    lambda_u: float = 75.0  # weight of L_u
    temperature: float = 0.5  # sharpening T
    alpha: float = 0.75  # Beta(alpha, alpha) of the mixup coefficient
    # linear ramp of lambda_u over this fraction of max_steps: the L2I MM script ramps over
    # epochs / batch_size = 16 of 1024 epochs (MixMatch-pytorch itself: all epochs, 1.0)
    rampup_fraction: float = 16 / 1024
    interleave: bool = True  # one forward per B-row chunk after interleaving (original); False: one forward
    eval_ema_decay: float = 0.999  # evaluation EMA; 0 disables it (the student is evaluated)
    eval_ema_warmup: bool = False  # True: decay min(d, (1+t)/(10+t)) for short runs
    eval_ema_span_fraction: float | None = None  # relative form of eval_ema_decay: span 1/(1-d) = this x max_steps
    student_weight_decay: float = 0.02  # decoupled decay theta *= 1 - coef * lr after the EMA update

    def __post_init__(self):
        if self.lambda_u < 0:
            raise ValueError("lambda_u must be >= 0")
        if self.temperature <= 0:
            raise ValueError("temperature must be positive")
        if self.alpha <= 0:
            raise ValueError("alpha (Beta parameter) must be positive")
        if not 0.0 <= self.rampup_fraction <= 1.0:
            raise ValueError("rampup_fraction must be in [0, 1]")
        if not 0.0 <= self.eval_ema_decay < 1.0:
            raise ValueError("eval_ema_decay must be in [0, 1)")
        check_fraction("eval_ema_span_fraction", self.eval_ema_span_fraction)
        if self.student_weight_decay < 0:
            raise ValueError("student_weight_decay must be >= 0")


@register_method
class MixMatch(SSLMethod):
    name = "mixmatch"
    arguments_class = MixMatchArguments
    labeled_views = {"weak": "weak"}
    unlabeled_views = {"weak": "weak", "weak2": "weak"}  # K = 2 independent augmentations
    supported_tasks = (TASK_CLASSIFICATION,)

    def ema_options(self) -> list[EMAOption]:
        return [evaluation_ema_option(self.args)]  # evaluated and exported

    def sample_lambda(self) -> float:
        """lam' = max(lam, 1 - lam), lam ~ Beta(alpha, alpha) (host-side draw from torch's global RNG)."""
        lam = float(torch.distributions.Beta(self.args.alpha, self.args.alpha).sample())
        return max(lam, 1.0 - lam)

    def sample_permutation(self, n: int, device) -> torch.Tensor:
        """pi: one random permutation over all labelled and unlabelled rows (torch's RNG)."""
        return torch.randperm(n, device=device)

    def training_step(self, labeled: dict, unlabeled: dict, state: TrainState):
        labeled_view = labeled["weak"]
        y = view_targets(labeled_view, labeled["labels"])
        x_inputs = model_inputs(labeled_view)
        u_views = [model_inputs(unlabeled[key]) for key in self.unlabeled_views]
        q = guess_labels(self.model, u_views, self.args.temperature)
        batch = y.shape[0]
        targets_x = F.one_hot(y.long(), num_classes=q.shape[-1]).to(q.dtype) if not y.is_floating_point() else y.to(q.dtype)

        all_inputs = {k: (torch.cat([x_inputs[k]] + [view[k] for view in u_views], dim=0)
                          if isinstance(x_inputs[k], torch.Tensor) else x_inputs[k]) for k in x_inputs}
        all_targets = torch.cat([targets_x] + [q] * len(u_views), dim=0)
        lam = self.sample_lambda()
        permutation = self.sample_permutation(all_targets.shape[0], all_targets.device)
        mixed_inputs, mixed_targets = mixup(all_inputs, all_targets, lam, permutation)

        chunk = batch if self.args.interleave else 0
        logits = at_least_float32(chunked_interleaved_logits(self.model, mixed_inputs, chunk))
        logits_x, logits_u = logits[:batch], logits[batch:]
        sup_loss = -(mixed_targets[:batch] * F.log_softmax(logits_x, dim=-1)).sum(dim=-1).mean()
        unsup_loss = ((logits_u.softmax(dim=-1) - mixed_targets[batch:]) ** 2).mean()
        weight = self.args.lambda_u * linear_rampup(state.step, self.args.rampup_fraction * state.max_steps)
        loss = sup_loss + weight * unsup_loss

        logs = {"loss": loss.detach(), "sup_loss": sup_loss.detach(), "unsup_loss": unsup_loss.detach(),
                "unsup_weight": torch.full((), weight, device=loss.device),
                "mixup_lambda": torch.full((), lam, device=loss.device)}
        logs.update(pseudo_label_logs(q.argmax(dim=-1), torch.ones(q.shape[0], device=q.device), unlabeled.get("monitor_labels")))
        logs.pop("mask_ratio", None)
        return loss, logs

    @torch.no_grad()
    def after_optimizer_step(self, state: TrainState) -> None:
        super().after_optimizer_step(state)  # the evaluation EMA, then WeightEMA's decoupled weight decay
        decay_student_weights(self.model, self.args.student_weight_decay * state.learning_rate)
