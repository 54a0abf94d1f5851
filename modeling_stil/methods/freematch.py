"""`freematch` and `multimodal_freematch`: FreeMatch (Wang et al., ICLR 2023).

``freematch`` defaults to USB's classic-CV FreeMatch (microsoft/Semi-supervised-learning:
semilearn/algorithms/freematch); ``multimodal_freematch`` is the STiL repository's "Multimodal
FreeMatch" (siyi-wind/STiL: models/MatchModel/FreeMatchFolder, docs/methods.md, "freematch"): the same
losses on the concat image+tabular network, with the STiL repository's teacher, gate and values.

Per step, with B_l labelled rows and B_u unlabelled rows (weak view u_w, strong view u_s)::

    q      = softmax(z(u_w)).detach()        z from the student's weak view in the same forward (USB)
                                              or from the EMA teacher (STiL: pseudo_labels_from="teacher")
    Self-adaptive thresholding (SAT), statistics over the GLOBAL batch, updated BEFORE masking:
      tau     <- m tau     + (1 - m) mean_b max_c q_bc                (global threshold, init 1/C)
      p~      <- m p~      + (1 - m) mean_b q_b                       (local class model, init uniform)
      h       <- m h       + (1 - m) hist(argmax q_b) / B_u           (label histogram, init uniform)
      tau_c    = tau * p~_c / max_c' p~_c'                             (class-wise thresholds)
      mask_b   = [max_c q_bc >= tau_{argmax q_b}]
    y^_b   = argmax_c q_bc
    L_x    = CE(z(x_l), y_l)
    L_u    = (1/B_u) sum_b mask_b CE(z(u_s)_b, y^_b)                  (mask_unsup=False: no mask, STiL)
    Self-adaptive fairness (SAF) over the masked-in strong predictions:
      q_bar = mean_{mask_b=1} softmax(z(u_s)_b),  h_bar = hist(argmax softmax(z(u_s)_b)) / #masked
      a = normalise(p~ / h),  d = normalise(q_bar / h_bar)   (1/0 -> 0, the scalers carry no gradient)
      L_e  = sum_c a_c log(d_c + 1e-12)                                 (USB's sign; 0 when nothing is masked in)
    loss   = L_x + [epoch > start_epoch] (lambda_u L_u + lambda_e L_e)

m = ``sat_momentum`` = 0.999. The SAT state (``time_p``, ``p_model``, ``label_hist``, USB's names) lives in
registered buffers, so checkpoints keep it and a resumed run continues exactly (the STiL repository
loses it on resume). Under several processes the batch statistics are summed with
``state.reduce_sum`` (one collective), so every process holds the one-process state of the global
batch; the mask and the losses use each process's own rows, as USB does.

The EMA model (``ema_momentum``) is updated after each optimizer step: parameter EMA evaluated at
the end (USB), or an EMAN teacher (state EMA, eval mode) that also makes the pseudo-labels (STiL).
See docs/methods.md "## freematch" for every decision.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import DataInfo, EMAOption, MethodArguments, SSLMethod, TrainState, register_method
from .common import (
    at_least_float32,
    EMA_MODES,
    check_fraction,
    concat_views,
    cross_entropy,
    model_inputs,
    pseudo_label_logs,
    unwrap_model,
    view_targets,
)

PSEUDO_LABEL_SOURCES = ("student", "teacher")


@dataclass
class FreeMatchArguments(MethodArguments):
    """Defaults = USB's classic-CV FreeMatch (config/classic_cv/freematch/*.yaml)."""

    lambda_u: float = 1.0  # weight of the unlabelled CE (USB ulb_loss_ratio)
    lambda_e: float = 0.001  # weight of the fairness term (USB ent_loss_ratio in its configs)
    sat_momentum: float = 0.999  # m of the SAT statistics (USB ema_p; STiL's hard-coded self.m)
    mask_unsup: bool = True  # SAT mask on L_u (USB, paper); False: every unlabelled row trains (STiL repo)
    # "student": q from the student's weak view in the training forward (USB);
    # "teacher": q from the EMA teacher's eval-mode forward on the weak view (STiL repo)
    pseudo_labels_from: str = "student"
    concat_forward: bool = True  # one student forward over [x_l; (u_w;) u_s] (BN sees the mixed batch)
    labeled_view: str = "weak"  # view recipe of the labelled stream ("hard": the STiL Match family's)
    ema_momentum: float = 0.999  # USB ema_m (STiL 0.996); 0 disables the EMA model (needs "student")
    ema_mode: str = "parameters"  # "parameters" (USB) or "state" (EMAN, STiL)
    ema_warmup: bool = False  # momentum min(m, (1+t)/(10+t)); USB and STiL use a constant momentum
    ema_span_fraction: float | None = None  # relative form of ema_momentum: span 1/(1-m) = this x max_steps
    eval_with_ema: bool = True  # evaluate/export the EMA model (USB); STiL evaluates the student
    start_epoch: int = -1  # L_u and L_e enter the loss from epoch start_epoch + 1 (STiL: 10 DVM / 8 cardiac)
    start_fraction: float | None = None  # relative form of start_epoch: the unlabelled terms join at this x max_steps

    def __post_init__(self):
        if self.pseudo_labels_from not in PSEUDO_LABEL_SOURCES:
            raise ValueError(f"pseudo_labels_from must be one of {PSEUDO_LABEL_SOURCES}, not {self.pseudo_labels_from!r}")
        if not 0.0 <= self.sat_momentum < 1.0:
            raise ValueError("sat_momentum must be in [0, 1)")
        if not 0.0 <= self.ema_momentum < 1.0:
            raise ValueError("ema_momentum must be in [0, 1)")
        check_fraction("ema_span_fraction", self.ema_span_fraction)
        check_fraction("start_fraction", self.start_fraction)
        if self.ema_mode not in EMA_MODES:
            raise ValueError(f"ema_mode must be one of {EMA_MODES}")
        if self.pseudo_labels_from == "teacher" and self.ema_momentum == 0:
            raise ValueError("pseudo_labels_from='teacher' needs ema_momentum > 0 (the teacher is the EMA model)")


@dataclass
class MultimodalFreeMatchArguments(FreeMatchArguments):
    """Defaults = siyi-wind/STiL configs/config_dvm_MultiFreeMatch.yaml (docs/methods.md, "freematch")."""

    mask_unsup: bool = False
    pseudo_labels_from: str = "teacher"
    labeled_view: str = "hard"
    ema_momentum: float = 0.996
    ema_mode: str = "state"
    eval_with_ema: bool = False
    start_epoch: int = 10  # DVM; cardiac 8


# ------------------------------------------------------------------------------------ pure pieces
@torch.no_grad()
def sat_batch_statistics(probs: torch.Tensor, state: TrainState | None = None):
    """(mean max-probability, mean probability (C,), normalised argmax histogram (C,)) of the batch,
    summed over processes with ``state.reduce_sum`` (one collective): the global batch's values."""
    probs = at_least_float32(probs.detach())
    num_classes = probs.shape[1]
    max_probs, max_idx = probs.max(dim=1)
    counts = F.one_hot(max_idx, num_classes).to(probs.dtype).sum(dim=0)
    stats = torch.cat([max_probs.sum()[None], probs.sum(dim=0), counts, probs.new_tensor([probs.shape[0]])])
    if state is not None and state.num_processes > 1:
        stats = state.reduce_sum(stats)
    n = stats[-1].clamp_min(1.0)
    counts = stats[1 + num_classes : 1 + 2 * num_classes]
    return stats[0] / n, stats[1 : 1 + num_classes] / n, counts / counts.sum().clamp_min(1.0)


def sat_mask(probs: torch.Tensor, time_p: torch.Tensor, p_model: torch.Tensor) -> torch.Tensor:
    """Float mask (B,): max_c q_bc >= tau * p~_{argmax} / max p~ (inclusive, as USB's ``ge``)."""
    max_probs, max_idx = probs.detach().max(dim=1)
    class_threshold = time_p * p_model / p_model.max()
    return (max_probs >= class_threshold[max_idx]).to(torch.float32)


def _safe_reciprocal(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0, 1.0 / x.clamp_min(1e-30), torch.zeros_like(x))


def fairness_loss(logits_s: torch.Tensor, mask: torch.Tensor, p_model: torch.Tensor, label_hist: torch.Tensor) -> torch.Tensor:
    """SAF: sum_c a_c log(d_c + 1e-12) with a = normalise(p~/h), d = normalise(q_bar/h_bar) over the
    masked-in rows (USB ``entropy_loss``; gradient only through q_bar). 0 when no row is masked in,
    computed without a host sync."""
    probs_s = F.softmax(at_least_float32(logits_s), dim=1)
    weights = mask.detach().to(probs_s.dtype)[:, None]
    n = weights.sum()
    q_bar = (weights * probs_s).sum(dim=0) / n.clamp_min(1.0)
    hist_s = (weights * F.one_hot(probs_s.detach().argmax(dim=1), probs_s.shape[1]).to(probs_s.dtype)).sum(dim=0)
    hist_s = hist_s / hist_s.sum().clamp_min(1.0)
    a = at_least_float32(p_model) * _safe_reciprocal(at_least_float32(label_hist))
    a = a / a.sum().clamp_min(1e-30)
    d = q_bar * _safe_reciprocal(hist_s)
    d = d / d.sum().clamp_min(1e-30)
    return (a * torch.log(d + 1e-12)).sum() * (n > 0).float()


# ------------------------------------------------------------------------------------ the method
@register_method
class FreeMatch(SSLMethod):
    name = "freematch"
    arguments_class = FreeMatchArguments
    labeled_views = {"labeled": "weak"}
    unlabeled_views = {"weak": "weak", "strong": "strong"}
    # image-only FreeMatch: without --model an image classifier is used even on image+tabular data
    # (real data: --model image-resnet50 or wrn-28-2); any model with logits works
    preferred_model = "image-tiny"

    def __init__(self, model, args: FreeMatchArguments | None = None):
        super().__init__(model, args)
        a = self.args
        # instance attribute: the loaders read `method.labeled_views` (labelled recipe from the arguments)
        self.labeled_views = {"labeled": a.labeled_view}
        num_labels = int(getattr(getattr(unwrap_model(model), "config", None), "num_labels", 0) or 0)
        if num_labels:
            self._make_buffers(num_labels)

    def ema_options(self) -> list[EMAOption]:
        a = self.args
        return [EMAOption("ema", a.ema_momentum, a.ema_span_fraction, warmup="tf" if a.ema_warmup else None,
                          mode=a.ema_mode, enabled=a.ema_momentum > 0, evaluate=a.eval_with_ema)]

    def _make_buffers(self, num_classes: int) -> None:
        self.register_buffer("time_p", torch.tensor(1.0 / num_classes))  # global threshold tau
        self.register_buffer("p_model", torch.full((num_classes,), 1.0 / num_classes))  # p~
        self.register_buffer("label_hist", torch.full((num_classes,), 1.0 / num_classes))  # h

    def setup(self, info: DataInfo) -> None:
        if info.num_labels and (not hasattr(self, "p_model") or self.p_model.shape[0] != info.num_labels):
            self._make_buffers(int(info.num_labels))

    # ------------------------------------------------------------------ pieces of the step
    @torch.no_grad()
    def update_sat(self, probs: torch.Tensor, state: TrainState | None = None) -> None:
        """EMA of the global batch's statistics into ``time_p``, ``p_model``, ``label_hist``."""
        mean_max, mean_probs, hist = sat_batch_statistics(probs, state)
        m = self.args.sat_momentum
        self.time_p.mul_(m).add_((1 - m) * mean_max.to(self.time_p.dtype))
        self.p_model.mul_(m).add_((1 - m) * mean_probs.to(self.p_model.dtype))
        self.label_hist.mul_(m).add_((1 - m) * hist.to(self.label_hist.dtype))

    def _forward(self, labeled_inputs: dict, weak_inputs: dict, strong_inputs: dict):
        """Logits of (labelled, unlabelled weak (detached), unlabelled strong)."""
        use_teacher = self.args.pseudo_labels_from == "teacher"
        if self.args.concat_forward:
            views = [labeled_inputs] + ([] if use_teacher else [weak_inputs]) + [strong_inputs]
            inputs, sizes = concat_views(views)
            chunks = torch.split(self.model(**inputs).logits, sizes, dim=0)
            logits_l, logits_s = chunks[0], chunks[-1]
            logits_w = None if use_teacher else chunks[1].detach()
        else:
            logits_l = self.model(**labeled_inputs).logits
            logits_s = self.model(**strong_inputs).logits
            logits_w = None
            if not use_teacher:
                with torch.no_grad():
                    logits_w = self.model(**weak_inputs).logits
        if use_teacher:
            logits_w = self.ema(**weak_inputs).logits  # eval mode, no gradient
        return logits_l, logits_w.detach(), logits_s

    def compute_terms(self, labeled: dict, unlabeled: dict, state: TrainState):
        """-> (terms, logs): every loss term as a live tensor, detached logs; updates the SAT state."""
        a = self.args
        labeled_view = labeled["labeled"]
        targets_l = view_targets(labeled_view, labeled["labels"])
        logits_l, logits_w, logits_s = self._forward(
            model_inputs(labeled_view), model_inputs(unlabeled["weak"]), model_inputs(unlabeled["strong"])
        )
        probs_w = at_least_float32(logits_w).softmax(dim=1)
        self.update_sat(probs_w, state)  # before masking, with this batch (USB, STiL)
        mask = sat_mask(probs_w, self.time_p, self.p_model)
        pseudo = probs_w.argmax(dim=1)
        unsup = cross_entropy(logits_s, pseudo, reduction="none")
        if a.mask_unsup:
            unsup = unsup * mask
        terms = {
            "sup_loss": cross_entropy(logits_l, targets_l, reduction="mean"),
            "unsup_loss": unsup.mean(),  # / B_u
            "fairness_loss": fairness_loss(logits_s, mask, self.p_model, self.label_hist),
        }
        logs = {k: v.detach() for k, v in terms.items()}
        logs["sat_threshold"] = self.time_p.detach().clone()
        class_thresholds = self.time_p * self.p_model / self.p_model.max()
        logs["sat_class_threshold_min"] = class_thresholds.min()
        logs["sat_class_threshold_max"] = class_thresholds.max()
        logs.update(pseudo_label_logs(pseudo, mask, unlabeled.get("monitor_labels")))
        return terms, logs

    def training_step(self, labeled: dict, unlabeled: dict, state: TrainState):
        a = self.args
        terms, logs = self.compute_terms(labeled, unlabeled, state)
        loss = self.gated_loss(terms["sup_loss"], [a.lambda_u * terms["unsup_loss"], a.lambda_e * terms["fairness_loss"]],
                               state, logs)
        return loss, logs


@register_method
class MultimodalFreeMatch(FreeMatch):
    """The STiL repository's Multimodal FreeMatch: (image, row) pairs in every view (labelled: the
    joint ``hard`` view w.p. 0.95; weak rows corrupted at 0.1, strong at 0.3), the concat backbone
    (preset ``multimodal-concat``), an EMAN teacher for the pseudo-labels, no mask on L_u, the
    supervised warm-up gate, the student evaluated."""

    name = "multimodal_freematch"
    arguments_class = MultimodalFreeMatchArguments
    labeled_views = {"labeled": "hard"}
    required_modalities = ("image", "tabular")
    preferred_model = "multimodal-concat-tiny"  # real data: --model multimodal-concat (ResNet-50)
    stream_defaults = {
        "unlabeled_includes_labeled": False,  # separate labelled / unlabelled files (SemiPseudo)
        "corruption_pool": "stream",  # each dataset corrupts from its own file's marginals
        "augmentation_rate": None,  # the view preset's 0.95 (the multimodal labelled stream's rate)
        "epoch": "unlabeled",  # Lightning max_size_cycle: one pass over the longer (unlabelled) loader
    }
