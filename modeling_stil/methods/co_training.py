"""`co_training`: co-training between the image and the tabular view (Blum & Mitchell style), as
implemented in the STiL repository (siyi-wind/STiL: models/SemiMultimodal/CoTraining.py,
``CoTrain_Pseudo``; docs/methods.md, "co_training").

The MMatch network (preset ``mmatch``: fused z_m, image z_i and tabular z_t heads) and an
EMAN teacher of it (state EMA, momentum 0.996, eval mode). Student and teacher see the same
labelled + unlabelled rows (one view each, recipe ``stil``)::

    L_sup = CE(z_m,l, y) + CE(z_i,l, y) + CE(z_t,l, y)                        (student)
    q^i   = softmax(z^T_i,u),  q^t = softmax(z^T_t,u)                          (teacher; no DA, no sharpening)
    mu^i  = [max q^i >= th],   mu^t = [max q^t >= th]                           (th = co_threshold 0.9)
    L_i^u = (1/B_u) sum_b mu^t_b CE(z_i,u,b, q^t_b)      the image head learns from the tabular teacher
    L_t^u = (1/B_u) sum_b mu^i_b CE(z_t,u,b, q^i_b)      the tabular head learns from the image teacher
    loss  = alpha L_sup + [epoch > start_epoch] rate_uce (L_i^u + L_t^u)

Soft targets. The fused head gets no unlabelled loss (only through the shared encoders). With
``use_ema=False`` the student's own detached logits are the teacher's. See docs/methods.md
"## co_training".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import EMAOption, MethodArguments, SSLMethod, TrainState, register_method
from .common import (
    at_least_float32,
    check_fraction,
    check_shared_view,
    check_unimodal_heads,
    concat_views,
    confidence_mask,
    cross_entropy,
    head_logits,
    model_inputs,
    pseudo_label_logs,
    use_shared_view,
)


@dataclass
class CoTrainingArguments(MethodArguments):
    """Defaults = siyi-wind/STiL configs/config_dvm_CoTrain.yaml (cardiac: rate_uce 5.0, start_epoch 8)."""

    alpha: float = 0.2  # weight of L_sup (three heads)
    rate_uce: float = 0.2  # weight of the cross-modal pseudo-label CE (cardiac 5.0)
    co_threshold: float = 0.9  # confidence threshold of each teacher head, inclusive
    use_ema: bool = True  # EMA teacher; False: the student's own detached predictions
    eman: bool = True  # state EMA (BN statistics averaged too); False: parameter EMA
    ema_momentum: float = 0.996
    ema_span_fraction: float | None = None  # relative form of ema_momentum: span 1/(1-m) = this x max_steps
    start_epoch: int = 10  # the unlabelled terms enter the loss from epoch start_epoch + 1 (DVM 10, cardiac 8)
    start_fraction: float | None = None  # relative form of start_epoch: the unlabelled terms join at this x max_steps
    # the one view student and teacher share: the original's "stil" or another (common.SHARED_VIEWS)
    view: str = "stil"

    def __post_init__(self):
        check_shared_view(self.view)
        if not 0.0 <= self.ema_momentum <= 1.0:
            raise ValueError("ema_momentum must be in [0, 1]")
        check_fraction("ema_span_fraction", self.ema_span_fraction)
        check_fraction("start_fraction", self.start_fraction)
        if not 0.0 <= self.co_threshold <= 1.0:
            raise ValueError("co_threshold must be in [0, 1]")


@register_method
class CoTraining(SSLMethod):
    name = "co_training"
    arguments_class = CoTrainingArguments
    labeled_views = {"stil": "stil"}
    unlabeled_views = {"stil": "stil"}
    stream_defaults = {
        "unlabeled_includes_labeled": False,
        "corruption_pool": "stream",
        "augmentation_rate": None,
        "epoch": "unlabeled",
    }
    required_modalities = ("image", "tabular")
    preferred_model = "mmatch-tiny"  # real data: --model mmatch

    def __init__(self, model, args: CoTrainingArguments | None = None):
        super().__init__(model, args)
        check_unimodal_heads(model, self.name)
        use_shared_view(self, self.args.view)

    def ema_options(self) -> list[EMAOption]:
        a = self.args  # the teacher: constant momentum, evaluation uses the student
        return [EMAOption("ema", a.ema_momentum, a.ema_span_fraction, mode="state" if a.eman else "parameters",
                          enabled=a.use_ema)]

    def compute_terms(self, labeled: dict, unlabeled: dict, state: TrainState):
        key = next(iter(self.labeled_views))
        unlabeled_inputs = model_inputs(unlabeled[key])
        inputs, (n_l, _) = concat_views([model_inputs(labeled[key]), unlabeled_inputs])
        y = labeled["labels"]
        out = self.model(**inputs)
        zm, zi, zt = out.logits, out.image_logits, out.tabular_logits
        with torch.no_grad():
            if self.ema is not None:
                # eval-mode teacher: each row's output is independent of the batch, so the labelled
                # rows (unused by any loss) are not forwarded
                teacher = self.ema(**unlabeled_inputs)
                zi_t, zt_t = teacher.image_logits, teacher.tabular_logits
            else:
                zi_t, zt_t = zi[n_l:], zt[n_l:]
            q_i = at_least_float32(zi_t.detach()).softmax(dim=1)
            q_t = at_least_float32(zt_t.detach()).softmax(dim=1)
            mask_i = confidence_mask(q_i, self.args.co_threshold)
            mask_t = confidence_mask(q_t, self.args.co_threshold)
        terms = {
            "sup_loss_multimodal": cross_entropy(zm[:n_l], y, reduction="mean"),
            "sup_loss_image": cross_entropy(zi[:n_l], y, reduction="mean"),
            "sup_loss_tabular": cross_entropy(zt[:n_l], y, reduction="mean"),
            "unsup_loss_image": (cross_entropy(zi[n_l:], q_t, reduction="none") * mask_t).mean(),
            "unsup_loss_tabular": (cross_entropy(zt[n_l:], q_i, reduction="none") * mask_i).mean(),
        }
        logs = {k: v.detach() for k, v in terms.items()}
        logs["sup_loss"] = logs["sup_loss_multimodal"] + logs["sup_loss_image"] + logs["sup_loss_tabular"]
        logs["unsup_loss"] = logs["unsup_loss_image"] + logs["unsup_loss_tabular"]
        logs["mask_ratio_image_teacher"] = mask_i.mean()
        logs["mask_ratio_tabular_teacher"] = mask_t.mean()
        logs["teacher_confidence_image"] = q_i.max(dim=1).values.mean()  # mean max q: how far co_threshold is
        logs["teacher_confidence_tabular"] = q_t.max(dim=1).values.mean()
        monitor = unlabeled.get("monitor_labels")
        logs.update(pseudo_label_logs(q_i.argmax(dim=1), mask_i, monitor, prefix="image_pseudo_label"))
        image_mask_ratio = logs.pop("mask_ratio")
        logs.update(pseudo_label_logs(q_t.argmax(dim=1), mask_t, monitor, prefix="tabular_pseudo_label"))
        logs["mask_ratio"] = 0.5 * (image_mask_ratio + logs["mask_ratio"])  # share of (row, head) targets used
        return terms, logs

    def training_step(self, labeled: dict, unlabeled: dict, state: TrainState):
        a = self.args
        terms, logs = self.compute_terms(labeled, unlabeled, state)
        loss = a.alpha * (terms["sup_loss_multimodal"] + terms["sup_loss_image"] + terms["sup_loss_tabular"])
        loss = self.gated_loss(loss, [a.rate_uce * (terms["unsup_loss_image"] + terms["unsup_loss_tabular"])], state, logs)
        return loss, logs

    @torch.no_grad()
    def evaluation_step(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        return head_logits(model(**self.eval_inputs(batch)))
