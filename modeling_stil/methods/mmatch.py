"""`mmatch`: MMatch as implemented in the STiL repository (siyi-wind/STiL: models/SemiMultimodal/
MMatch.py; docs/methods.md, "mmatch").

One network with three heads (preset ``mmatch``: fused z_m, image z_i, tabular z_t and the fused
feature x_m), no teacher. One forward over the labelled and unlabelled rows (one view each,
recipe ``stil``: the contrastive image augmentation w.p. 0.95 and a 30 %-corrupted row)::

    L_sup = CE(z_m,l, y) + CE(z_i,l, y) + CE(z_t,l, y)
    p     = DA(softmax(z_m,u))                                    (queue of the last 256 batch means; detached)
    e     = normalise(x_m).detach()
    from epoch smoothing_start_epoch + 1 (original: epoch > 0), memory smoothing with the queue:
      A   = softmax_k(e_u . E_k / T),   p <- s p + (1 - s) A P^T        (s = 0.9, T = 0.1)
    mask_b = [max_c p_bc >= th1],  y^_b = argmax_c p_bc
    L_i^u = (1/B_u) sum_b mask_b CE(z_i,u,b, y^_b),   L_t^u likewise on the tabular head
    loss  = alpha L_sup + [epoch > start_epoch] lambda (L_i^u + L_t^u)
    enqueue (gathered over processes) all B_l + B_u rows: E <- e, P <- [one_hot(y_l); p]

The fused head receives no unlabelled loss: the fused prediction teaches the two unimodal heads.
Queues (``embed_queue`` D x K with random unit columns, ``probs_queue`` C x K zeros, K = 640,
``embed_queue_ptr``) keep the original's semantics: a batch that would run past the end is truncated
(the overflow is dropped) and the pointer restarts at 0. See docs/methods.md "## mmatch".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import DataInfo, MethodArguments, SSLMethod, TrainState, register_method
from .common import (
    DistributionAlignment,
    at_least_float32,
    check_fraction,
    check_shared_view,
    check_unimodal_heads,
    concat_views,
    cross_entropy,
    gather_no_grad,
    head_logits,
    model_inputs,
    pseudo_label_logs,
    unlabeled_gate_open,
    use_shared_view,
)


@torch.no_grad()
def write_columns(buffers: list[torch.Tensor], items: list[torch.Tensor], ptr: torch.Tensor) -> None:
    """Circular write that drops the overflow (the STiL repository's ``_dequeue_and_enqueue``):
    ``buffer[:, ptr:ptr+n'] = items[:n'].T`` with n' = min(n, K - ptr), then ptr = (ptr + n') % K.
    Vectorised (no host sync): every column k takes item k - ptr where 0 <= k - ptr < n."""
    size = buffers[0].shape[1]
    n = items[0].shape[0]
    if n == 0:
        return
    offset = torch.arange(size, device=ptr.device) - ptr.reshape(())
    written = (offset >= 0) & (offset < n)
    index = offset.clamp(0, n - 1)
    for buffer, item in zip(buffers, items):
        item = item.detach().to(dtype=buffer.dtype, device=buffer.device)
        buffer.copy_(torch.where(written[None, :], item[index].T, buffer))
    ptr.copy_((ptr + torch.clamp(size - ptr, max=n)) % size)


@dataclass
class MMatchArguments(MethodArguments):
    """Defaults = siyi-wind/STiL configs/config_dvm_MMatch.yaml (cardiac: start_epoch 8)."""

    alpha: float = 1.0  # weight of L_sup (three heads)
    mmatch_lambda: float = 5.0  # weight of the unimodal heads' pseudo-label CE
    th1: float = 0.6  # confidence threshold on the (aligned, smoothed) fused pseudo-label, inclusive
    temperature: float = 0.1  # T of the memory smoothing
    smoothing: float = 0.9  # s: weight of the aligned prediction against the queue's labels (a literal in the original)
    smoothing_start_epoch: int = 0  # memory smoothing from epoch smoothing_start_epoch + 1 (original: epoch > 0)
    smoothing_start_fraction: float | None = None  # relative form of smoothing_start_epoch: from this x max_steps
    queue_size: int = 640  # K (hard-coded in the original)
    distribution_alignment: bool = True  # the original requires DA (no DA-off path)
    da_queue_size: int = 256
    start_epoch: int = 10  # the unlabelled terms enter the loss from epoch start_epoch + 1 (DVM 10, cardiac 8)
    start_fraction: float | None = None  # relative form of start_epoch: the unlabelled terms join at this x max_steps
    # the one view student and teacher share: the original's "stil" or another (common.SHARED_VIEWS)
    view: str = "stil"

    def __post_init__(self):
        check_shared_view(self.view)
        if not 0.0 <= self.smoothing <= 1.0:
            raise ValueError("smoothing must be in [0, 1]")
        if self.temperature <= 0:
            raise ValueError("temperature must be positive")
        if self.queue_size <= 0 or self.da_queue_size <= 0:
            raise ValueError("queue sizes must be positive")
        check_fraction("start_fraction", self.start_fraction)
        check_fraction("smoothing_start_fraction", self.smoothing_start_fraction)


@register_method
class MMatch(SSLMethod):
    name = "mmatch"
    arguments_class = MMatchArguments
    labeled_views = {"stil": "stil"}  # the contrastive view 1 of image and row, labelled and unlabelled alike
    unlabeled_views = {"stil": "stil"}
    stream_defaults = {
        "unlabeled_includes_labeled": False,
        "corruption_pool": "stream",
        "augmentation_rate": None,  # the view preset's 0.95
        "epoch": "unlabeled",
    }
    required_modalities = ("image", "tabular")
    preferred_model = "mmatch-tiny"  # real data: --model mmatch (ResNet-50 + TIP transformer)

    def __init__(self, model, args: MMatchArguments | None = None):
        super().__init__(model, args)
        bare = check_unimodal_heads(model, self.name)
        use_shared_view(self, self.args.view)
        self.feature_dim = int(getattr(bare, "fused_dim", 0) or bare.config.fused_dim)
        self.DA = None
        num_labels = int(getattr(bare.config, "num_labels", 0) or 0)
        if num_labels:
            self._make_buffers(num_labels)

    def _make_buffers(self, num_classes: int) -> None:
        k = self.args.queue_size
        self.register_buffer("embed_queue", F.normalize(torch.randn(self.feature_dim, k), dim=0))
        self.register_buffer("embed_queue_ptr", torch.zeros(1, dtype=torch.long))
        self.register_buffer("probs_queue", torch.zeros(num_classes, k))
        if self.args.distribution_alignment:
            self.DA = DistributionAlignment(num_classes, self.args.da_queue_size)

    def setup(self, info: DataInfo) -> None:
        if info.num_labels and (not hasattr(self, "probs_queue") or self.probs_queue.shape[0] != info.num_labels):
            self._make_buffers(int(info.num_labels))

    @torch.no_grad()
    def pseudo_labels(self, logits_u: torch.Tensor, features_u: torch.Tensor, state: TrainState) -> torch.Tensor:
        """p = DA(softmax(z_m,u)), smoothed with the queue after ``smoothing_start_epoch``."""
        a = self.args
        p = at_least_float32(logits_u.detach()).softmax(dim=1)
        if self.DA is not None:
            p = self.DA(p, state)
        if unlabeled_gate_open(state, a.smoothing_start_epoch, a.smoothing_start_fraction):
            affinity = (features_u @ self.embed_queue / a.temperature).softmax(dim=1)
            p = a.smoothing * p + (1 - a.smoothing) * affinity @ self.probs_queue.T
        return p

    def compute_terms(self, labeled: dict, unlabeled: dict, state: TrainState):
        key = next(iter(self.labeled_views))
        inputs, (n_l, _) = concat_views([model_inputs(labeled[key]), model_inputs(unlabeled[key])])
        y = labeled["labels"]
        out = self.model(**inputs)
        zm, zi, zt = out.logits, out.image_logits, out.tabular_logits
        with torch.no_grad():
            features = F.normalize(at_least_float32(out.features.detach()), dim=1)
            p = self.pseudo_labels(zm[n_l:], features[n_l:], state)
            max_probs, pseudo = p.max(dim=1)
            mask = (max_probs >= self.args.th1).float()
        terms = {
            "sup_loss_multimodal": cross_entropy(zm[:n_l], y, reduction="mean"),
            "sup_loss_image": cross_entropy(zi[:n_l], y, reduction="mean"),
            "sup_loss_tabular": cross_entropy(zt[:n_l], y, reduction="mean"),
            "unsup_loss_image": (cross_entropy(zi[n_l:], pseudo, reduction="none") * mask).mean(),
            "unsup_loss_tabular": (cross_entropy(zt[n_l:], pseudo, reduction="none") * mask).mean(),
        }
        # enqueue every row of the step (features of all processes), labelled rows with their one-hot label
        with torch.no_grad():
            targets = torch.cat([F.one_hot(y, p.shape[1]).to(p.dtype), p])
            write_columns([self.embed_queue, self.probs_queue],
                          [gather_no_grad(features, state), gather_no_grad(targets, state)], self.embed_queue_ptr)
        logs = {k: v.detach() for k, v in terms.items()}
        logs["sup_loss"] = logs["sup_loss_multimodal"] + logs["sup_loss_image"] + logs["sup_loss_tabular"]
        logs["unsup_loss"] = logs["unsup_loss_image"] + logs["unsup_loss_tabular"]
        logs["pseudo_label_confidence"] = max_probs.mean()  # mean max p: how far th1 is
        logs.update(pseudo_label_logs(pseudo, mask, unlabeled.get("monitor_labels")))
        return terms, logs

    def training_step(self, labeled: dict, unlabeled: dict, state: TrainState):
        a = self.args
        terms, logs = self.compute_terms(labeled, unlabeled, state)
        loss = a.alpha * (terms["sup_loss_multimodal"] + terms["sup_loss_image"] + terms["sup_loss_tabular"])
        loss = self.gated_loss(loss, [a.mmatch_lambda * (terms["unsup_loss_image"] + terms["unsup_loss_tabular"])], state, logs)
        return loss, logs

    @torch.no_grad()
    def evaluation_step(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        return head_logits(model(**self.eval_inputs(batch)))
