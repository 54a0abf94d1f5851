"""`simmatch` and `multimodal_simmatch`: SimMatch (Zheng et al., CVPR 2022).

Reference: docs/methods.md, "simmatch" (the STiL repository's port) and USB's
``semilearn/algorithms/simmatch``. One step, B_l labelled rows (bank positions ``k_l``), B_u
unlabelled rows with a weak and a strong view, a labelled memory bank ``bank`` (K x P unit rows) with
labels ``y_bank`` (K = number of labelled rows)::

    student:  z_l, z_s, g_s = net([x_l; u_s])          (teacher="eman", STiL; "online" adds u_w, USB)
    teacher:  g_l, z_w, g_w = teacher([x_l; u_w])       (EMAN copy in eval mode; "online": the same
                                                        student forward, detached)
    p      = DA(softmax(z_w))                           (queue of the last ``da_len`` batch means)
    s      = softmax(g_w bank^T / t_t)                  (B_u, K) instance similarities, teacher side
    unfold:    s_hat_bk = s_bk p_{b, y_bank[k]} / sum_k' s_bk' p_{b, y_bank[k']}
    aggregate: a_bc     = sum_{k: y_bank[k] = c} s_bk
    p_hat  = c p + (1 - c) a                            (c = smoothing_alpha)
    t      = softmax(g_s bank^T / t_s)                  student instance distribution
    L_x    = CE(z_l, y)
    L_u    = 1/B_u sum_b [max p_hat_b >= tau] CE(z_s_b, p_hat_b)          (soft target)
    L_in   = 1/B_u sum_b sum_k -s_hat_bk log t_bk
    loss   = L_x + lambda_u L_u + lambda_in L_in        (only L_x while epoch <= start_epoch)
    bank[k_l] <- g_l (overwrite; bank_momentum m > 0: normalize(m bank[k_l] + (1 - m) g_l)), y_bank[k_l] <- y

All gathered over processes (``state.gather``) before the bank write; the DA batch mean is averaged
with ``state.reduce_sum``. Before ``instance_start_epoch`` (USB: epoch 0) L_in is multiplied by 0 and
p_hat = p. The bank the losses read is the bank before this step's write.

``simmatch`` (image-only) defaults to USB's classic-CV values (CIFAR-10: online teacher, T 0.1,
tau 0.95, lambda_u = lambda_in = 1, c 0.9, DA over 32 batches, bank EMA 0.7, parameter EMA 0.999
evaluated); ``multimodal_simmatch`` to the STiL repository's DVM config (EMAN teacher 0.996, tau 0.9,
lambda_u 10, lambda_in 5, DA 256, bank overwritten, 10 supervised warm-up epochs, student
evaluated). The image-only STiL settings are in recipes/simmatch_{dvm,ukbb}_*.yaml. Every decision is
in docs/methods.md, "## simmatch".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import DataInfo, EMAOption, MethodArguments, SSLMethod, TrainState, register_method
from .common import (
    at_least_float32,
    DistributionAlignment,
    ProjectedNet,
    check_fraction,
    check_image_only_model,
    check_num_labels,
    concat_views,
    cross_entropy,
    gather_no_grad,
    model_inputs,
    model_projection_head,
    pseudo_label_logs,
    soft_cross_entropy,
    unlabeled_gate_open,
    unwrap_model,
)

TEACHERS = ("online", "eman")
LABELED_VIEWS = ("weak", "hard", "eval", "strong")


@dataclass
class SimMatchArguments(MethodArguments):
    """Defaults: USB classic-CV (config/classic_cv/simmatch/simmatch_cifar10_*.yaml)."""

    threshold: float = 0.95  # tau on max p_hat (inclusive) [STiL: sim_threshold 0.8 DVM / 0.6 cardiac]
    lambda_u: float = 1.0  # weight of L_u [STiL 10]
    lambda_in: float = 1.0  # weight of L_in [STiL 5]
    temperature_teacher: float = 0.1  # t_t of the teacher similarities (USB: one T) [STiL tt 0.1]
    temperature_student: float = 0.1  # t_s of the student similarities [STiL st 0.1]
    smoothing_alpha: float = 0.9  # c: weight of the class pseudo-label against the aggregated one [c_smooth 0.9]
    distribution_alignment: bool = True
    da_len: int = 32  # batch means kept by DA [STiL 256]
    # "online": weak logits/embeddings and labelled embeddings from the student's one forward over
    # [x_l; u_w; u_s], detached (USB); "eman": a separate EMAN teacher in eval mode on [x_l; u_w] (STiL)
    teacher: str = "online"
    ema_momentum: float = 0.999  # EMA (evaluation model for "online", pseudo-label teacher for "eman") [0.996]
    ema_warmup: bool = False  # momentum min(m, (1+t)/(10+t)) (neither original)
    ema_span_fraction: float | None = None  # relative form of ema_momentum: span 1/(1-m) = this x max_steps
    eval_with_ema: bool = True  # evaluate/export the EMA model (USB) [STiL: the student]
    bank_momentum: float = 0.7  # >0: bank rows EMA-smoothed and renormalised (USB, CIFAR-like); 0: overwritten [STiL]
    start_epoch: int = -1  # only L_x while epoch <= start_epoch [STiL 10 DVM / 8 cardiac]
    start_fraction: float | None = None  # relative form of start_epoch: the unlabelled terms join at this x max_steps
    instance_start_epoch: int = 1  # L_in * 0 and p_hat = p before this epoch (USB: epoch 0) [STiL 0]
    instance_start_fraction: float | None = None  # relative form of instance_start_epoch: from this x max_steps
    labeled_view: str = "weak"  # view recipe of the labelled stream [STiL "hard" w.p. augmentation_rate]
    projection_dim: int = 128  # only for a model without a projection head (WRN): USB proj_size
    max_bank_gib: float = 4.0  # refuse a bank (K x P float32) larger than this

    def __post_init__(self):
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError("threshold must be in [0, 1]")
        if not 0.0 <= self.smoothing_alpha <= 1.0:
            raise ValueError("smoothing_alpha must be in [0, 1]")
        if self.temperature_teacher <= 0 or self.temperature_student <= 0:
            raise ValueError("temperatures must be positive")
        if self.teacher not in TEACHERS:
            raise ValueError(f"teacher must be one of {TEACHERS}, not {self.teacher!r}")
        if not 0.0 <= self.ema_momentum < 1.0:
            raise ValueError("ema_momentum must be in [0, 1)")
        check_fraction("ema_span_fraction", self.ema_span_fraction)
        check_fraction("start_fraction", self.start_fraction)
        check_fraction("instance_start_fraction", self.instance_start_fraction)
        if not 0.0 <= self.bank_momentum < 1.0:
            raise ValueError("bank_momentum must be in [0, 1)")
        if self.da_len < 1:
            raise ValueError("da_len must be >= 1")
        if self.labeled_view not in LABELED_VIEWS:
            raise ValueError(f"labeled_view must be one of {LABELED_VIEWS}")


@dataclass
class MultimodalSimMatchArguments(SimMatchArguments):
    """Defaults: siyi-wind/STiL configs/config_dvm_MultiSimMatch.yaml (cardiac: threshold 0.85, start_epoch 8)."""

    threshold: float = 0.90
    lambda_u: float = 10.0
    lambda_in: float = 5.0
    da_len: int = 256
    teacher: str = "eman"
    ema_momentum: float = 0.996
    eval_with_ema: bool = False
    bank_momentum: float = 0.0
    start_epoch: int = 10
    instance_start_epoch: int = 0
    labeled_view: str = "hard"


@register_method
class SimMatch(SSLMethod):
    name = "simmatch"
    arguments_class = SimMatchArguments
    labeled_views = {"labeled": "weak"}
    unlabeled_views = {"weak": "weak", "strong": "strong"}
    required_modalities = ("image",)
    preferred_model = "image-tiny"  # without --model (synthetic data); CIFAR-10: wrn-28-2; DVM/UKBB: image-resnet50
    image_only = True

    def __init__(self, model, args: SimMatchArguments | None = None):
        super().__init__(model, args)
        a = self.args
        if self.image_only:
            check_image_only_model(model, self.name)
        self.labeled_views = {"labeled": a.labeled_view}  # the instance's (the loaders read it)
        self.projector = model_projection_head(model, a.projection_dim, self.name)
        num_labels = int(getattr(unwrap_model(model).config, "num_labels", 0) or 0)
        self.DA = DistributionAlignment(num_labels, a.da_len) if a.distribution_alignment and num_labels else None
        self.bank_size = 0

    def _net(self) -> ProjectedNet:
        return ProjectedNet(self.model, self.projector)

    def ema_options(self) -> list[EMAOption]:
        a = self.args  # the EMA of the projected network: USB's evaluation model, or STiL's EMAN teacher
        return [EMAOption("ema", a.ema_momentum, a.ema_span_fraction, warmup="tf" if a.ema_warmup else None,
                          mode="state" if a.teacher == "eman" else "parameters", evaluate=a.eval_with_ema,
                          evaluated_part="model", averaged="_net")]

    # ------------------------------------------------------------------ set-up
    def setup(self, info: DataInfo) -> None:
        """The labelled bank: K = number of labelled rows, random unit rows, labels 0 (as the originals)."""
        check_num_labels(self.name, self.model, info.num_labels)
        k = int(info.num_labeled)
        if k <= 0:
            raise ValueError(f"{self.name} needs labelled rows for its memory bank (num_labeled = {k})")
        dim = self._projection_width()
        gib = k * dim * 4 / 2**30
        if gib > self.args.max_bank_gib:
            raise ValueError(
                f"{self.name}: a labelled bank of {k} x {dim} floats needs {gib:.1f} GiB (> max_bank_gib "
                f"{self.args.max_bank_gib}); use fewer labelled rows, a smaller projection_dim, or raise max_bank_gib"
            )
        if self.DA is None and self.args.distribution_alignment and info.num_labels:
            self.DA = DistributionAlignment(int(info.num_labels), self.args.da_len)
        generator = torch.Generator().manual_seed(0)  # same bank on every process, whatever ran before
        self.register_buffer("bank", F.normalize(torch.randn(k, dim, generator=generator), dim=1))
        self.register_buffer("bank_labels", torch.zeros(k, dtype=torch.long))
        self.bank_size = k

    def _projection_width(self) -> int:
        if self.projector is not None:
            return int(self.projector[-1].out_features)
        return int(unwrap_model(self.model).config.projection_dim)

    # ------------------------------------------------------------------ pieces (tested by hand)
    @staticmethod
    @torch.no_grad()
    def unfold_aggregate(similarity: torch.Tensor, probs: torch.Tensor, bank_labels: torch.Tensor):
        """(s_hat, a): instance targets re-weighted by the class pseudo-label of each bank row's class
        (unfolding) and the similarities summed per class (aggregation)."""
        expanded = bank_labels.expand(similarity.shape[0], -1)
        unfolded = similarity * probs.gather(1, expanded)
        unfolded = unfolded / unfolded.sum(dim=1, keepdim=True)
        aggregated = torch.zeros_like(probs).scatter_add_(1, expanded, similarity)
        return unfolded, aggregated

    @torch.no_grad()
    def update_bank(self, features: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor, state: TrainState) -> None:
        """bank[k] <- g (or normalize(m bank[k] + (1 - m) g)); labels[k] <- y; gathered over processes."""
        features = gather_no_grad(at_least_float32(features), state).to(self.bank.dtype)
        labels = gather_no_grad(labels, state)
        positions = gather_no_grad(positions, state).long()
        m = self.args.bank_momentum
        if m > 0:
            features = F.normalize(m * self.bank[positions] + (1 - m) * features, dim=1)
        self.bank.index_copy_(0, positions, features)
        self.bank_labels.index_copy_(0, positions, labels.long())

    # ------------------------------------------------------------------ the step
    def forward_views(self, labeled: dict, unlabeled: dict):
        """-> z_l, z_s, g_s (student, with gradient) and g_l, z_w, g_w (teacher side, no gradient)."""
        x_l = model_inputs(labeled["labeled"])
        u_w, u_s = model_inputs(unlabeled["weak"]), model_inputs(unlabeled["strong"])
        if self.args.teacher == "online":
            inputs, sizes = concat_views([x_l, u_w, u_s])
            logits, proj = self._net()(**inputs)
            z_l, z_w, z_s = torch.split(logits, sizes)
            g_l, g_w, g_s = torch.split(proj, sizes)
            return z_l, z_s, g_s, g_l.detach(), z_w.detach(), g_w.detach()
        inputs, sizes = concat_views([x_l, u_s])
        logits, proj = self._net()(**inputs)
        z_l, z_s = torch.split(logits, sizes)
        g_s = proj[sizes[0]:]
        with torch.no_grad():
            t_inputs, t_sizes = concat_views([x_l, u_w])
            t_logits, t_proj = self.ema(**t_inputs)
            g_l, g_w = torch.split(t_proj, t_sizes)
            z_w = t_logits[t_sizes[0]:]
        return z_l, z_s, g_s, g_l, z_w, g_w

    def compute_terms(self, labeled: dict, unlabeled: dict | None, state: TrainState):
        """-> ({"sup_loss", "unsup_loss", "in_loss"} live tensors, logs). Writes the bank and DA queue."""
        if not hasattr(self, "bank"):
            raise RuntimeError(f"{self.name}: setup(info) was not called (the bank is sized from the labelled rows)")
        a = self.args
        y = labeled["labels"]
        z_l, z_s, g_s, g_l, z_w, g_w = self.forward_views(labeled, unlabeled)
        bank = self.bank.clone()  # this step's losses read the bank before the write below
        # "from epoch k" is the gate "after epoch k - 1"
        instance_on = unlabeled_gate_open(state, a.instance_start_epoch - 1, a.instance_start_fraction)
        with torch.no_grad():
            probs = at_least_float32(z_w).softmax(dim=1)
            if self.DA is not None:
                probs = self.DA(probs, state)
            similarity = (at_least_float32(g_w) @ bank.T / a.temperature_teacher).softmax(dim=1)
            unfolded, aggregated = self.unfold_aggregate(similarity, probs, self.bank_labels)
            smoothed = a.smoothing_alpha * probs + (1 - a.smoothing_alpha) * aggregated
            p_hat = smoothed if (instance_on and a.smoothing_alpha < 1) else probs
            mask = (p_hat.max(dim=1).values >= a.threshold).float()
        log_t = F.log_softmax(at_least_float32(g_s) @ bank.T / a.temperature_student, dim=1)
        in_loss = (-(unfolded * log_t).sum(dim=1)).mean()
        if not instance_on:
            in_loss = in_loss * 0.0
        terms = {
            "sup_loss": cross_entropy(z_l, y, reduction="mean"),
            "unsup_loss": (soft_cross_entropy(z_s, p_hat) * mask).mean(),
            "in_loss": in_loss,
        }
        self.update_bank(g_l, y, labeled["position"], state)
        logs = {k: v.detach() for k, v in terms.items()}
        logs["unsup_active"] = torch.tensor(float(self.unlabeled_terms_on(state)))
        logs.update(pseudo_label_logs(p_hat.argmax(dim=1), mask, unlabeled.get("monitor_labels")))
        return terms, logs

    def training_step(self, labeled: dict, unlabeled: dict | None, state: TrainState):
        a = self.args
        terms, logs = self.compute_terms(labeled, unlabeled, state)
        loss = self.gated_loss(terms["sup_loss"], [a.lambda_u * terms["unsup_loss"], a.lambda_in * terms["in_loss"]], state, logs)
        return loss, logs


@register_method
class MultimodalSimMatch(SimMatch):
    """The STiL repository's Multimodal SimMatch: the same algorithm on (image, row) pairs with the concat
    backbone (multimodal-concat: h = [W x_img; x_tab_CLS], head MLP(h) -> 128) and STiL's values."""

    name = "multimodal_simmatch"
    arguments_class = MultimodalSimMatchArguments
    labeled_views = {"labeled": "hard"}
    required_modalities = ("image", "tabular")
    preferred_model = "multimodal-concat-tiny"  # real data: multimodal-concat (ResNet-50 + TIP tabular)
    image_only = False

