"""Consistency-regularisation pieces shared by Mean Teacher, pseudo-labelling, MixMatch and L2I
(the Learning-to-Impute code base and MixMatch-pytorch, which it adapts).

* `consistency_targets`, `consistency_loss`: what the student is pulled towards and the squared error;
* `consistency_weight`: ``lambda_u`` times a linear or sigmoid ramp over a fraction of the run;
* `transfer_to_view`: landmark predictions moved from one translated view into another's frame;
* `interleave`, `interleaved_logits`: MixMatch's interleaved per-chunk forwards (BN sees mixed batches);
* `resolve_view`: the view recipe of every stream (``translate`` for image-only regression);
* the evaluation EMA of these scripts (MixMatch-pytorch's ``WeightEMA``): `evaluation_ema_option`
  declares the EMA, `decay_student_weights` is the decoupled weight decay on the student that
  follows its update, `default_student_weight_decay` its per-task default;
* `regression_pseudo_label_logs`: monitoring of regression pseudo-targets.
"""

from __future__ import annotations

import torch

from .base import TASK_CLASSIFICATION, EMAOption
from .common import at_least_float32, linear_rampup, sigmoid_rampup, split_size, unwrap_model

RAMPUPS = ("linear", "sigmoid")


# ---------------------------------------------------------------------------------------- the consistency term
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


def consistency_loss(student_logits: torch.Tensor, targets: torch.Tensor, task: str, reduction: str = "mean",
                     squash: bool = False) -> torch.Tensor:
    """Squared error between the student and the targets, in float32 (float64 stays float64).

    classification: ``(softmax(student) - targets)^2`` with ``targets`` probabilities (B, C);
    regression / landmarks: ``(student - targets)^2``; ``squash``: tanh on both sides first
    (L2I-O's regression inner loss).
    ``reduction``: ``"mean"`` over all B x C entries (the original MT loss), ``"sum"`` over all entries
    (the classification L2I inner loss), ``"none"``: per-row mean (B,).
    Gradient flows into ``student_logits`` and, if they require it, into ``targets``."""
    student = at_least_float32(student_logits)
    if task == TASK_CLASSIFICATION:
        student = student.softmax(dim=-1)
    targets = targets.to(student.dtype).reshape(student.shape)
    if squash:
        student, targets = torch.tanh(student), torch.tanh(targets)
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


# ---------------------------------------------------------------------------------------- interleaved forwards
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


def interleaved_logits(model, views: list[dict], use_interleave: bool = True) -> list[torch.Tensor]:
    """Logits of several model-input dicts.

    With ``use_interleave`` and equal batch sizes: one forward per view after `interleave` (the
    original's scheme: each forward mixes rows of every view), un-interleaved afterwards. Otherwise
    (unequal sizes, or ``use_interleave=False``): one forward over the concatenation, whose BatchNorm
    statistics also cover every view."""
    sizes = [split_size(view) for view in views]
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


# ---------------------------------------------------------------------------------------- evaluation EMA
def evaluation_ema_option(args, evaluate: bool = True, updated: str = "after_optimizer_step") -> EMAOption:
    """The evaluation EMA of the MixMatch-pytorch ``WeightEMA`` the L2I scripts share, from the
    arguments ``eval_ema_decay`` (0: none), ``eval_ema_warmup``, ``eval_ema_span_fraction``:
    ``theta_eval <- d theta_eval + (1 - d) theta`` over the parameters (BN buffers copied from the
    student); the warm-up ``min(d, (1+t)/(10+t))`` counts t from the step just taken (0 after the first)."""
    return EMAOption(name="eval_ema", momentum=args.eval_ema_decay, span_fraction=args.eval_ema_span_fraction,
                     warmup="tf" if args.eval_ema_warmup else None, warmup_counts="before",
                     enabled=args.eval_ema_decay > 0, evaluate=evaluate, updated=updated)


def default_student_weight_decay(value: float | None, task: str) -> float:
    """The student's decoupled weight-decay coefficient: ``value``, or the originals' default
    (0.02 in the classification scripts; the regression scripts have the line commented out)."""
    if value is not None:
        return float(value)
    return 0.02 if task == TASK_CLASSIFICATION else 0.0


@torch.no_grad()
def decay_student_weights(model, coefficient: float) -> None:
    """``WeightEMA``'s decoupled weight decay after the evaluation-EMA update:
    ``theta <- (1 - coefficient) theta`` on every floating parameter of the student (biases and BN
    affine included, as the original); ``coefficient = student_weight_decay * lr``."""
    if coefficient > 0:
        params = [p for p in unwrap_model(model).parameters() if p.is_floating_point()]
        torch._foreach_mul_(params, 1.0 - coefficient)


# ---------------------------------------------------------------------------------------- monitoring
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
