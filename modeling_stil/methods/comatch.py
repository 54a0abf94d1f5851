"""`comatch` and `multimodal_comatch`: CoMatch (Li, Xiong, Hoi, ICCV 2021).

Reference: docs/methods.md, "comatch" (the STiL repository's port of
salesforce/CoMatch's ImageNet code) and USB's ``semilearn/algorithms/comatch``. One step, B_l
labelled rows, B_u unlabelled rows with a weak view u_w and two strong views u_s0, u_s1::

    student:  z_l, z_s0, g_s0 = net([x_l; u_s0])
    momentum: z_w, g_l, g_w, g_s1 = m_net([x_l; u_w; u_s1])       (teacher="momentum", STiL/salesforce:
              parameter EMA, train mode, no gradient; "online", USB: one student forward over
              [x_l; u_w; u_s0; u_s1], z_w/g_l/g_w detached, g_s1 WITH gradient)
    p      = DA(softmax(z_w));  p_orig = p                       (queue of the last da_len batch means)
    memory smoothing (epoch >= smoothing_start_epoch and step >= smoothing_start_step):
           A = softmax(g_w queue_w^T / T);  p <- alpha p + (1 - alpha) A probs_xu
    L_x    = CE(z_l, y)
    L_u    = 1/B_u sum_b [max p_b >= tau] CE(z_s0_b, p_b)          (soft target)
    graph  Q = [p p^T (diagonal 1) | p probs_u^T]                 (second block: memory_graph, STiL)
    embed  S = [g_s0 g_s1^T / T    | g_s0 queue_s^T / T]
    M = [Q >= contrast_th];  Q_hat = Q M / rowsum;  L_c = 1/B_u sum_i -sum_j Q_hat_ij log(softmax(S)_ij + 1e-7)
    loss   = L_x + lambda_u L_u + w_c L_c,  w_c = lambda_c (or min(epoch + 1, lambda_c), lambda_c_ramp)
             (only L_x while epoch <= start_epoch)
    enqueue (gathered over processes): queue_w/probs_xu <- [g_l; g_w], [onehot(y); p_orig];
             queue_s/probs_u <- g_s1, p   (memory_graph)

Queues are rows (K, P) / (K, C) with a pointer. Overflow (``queue_overflow="truncate"``, the
originals): when a batch would run past the end, the rows that fit are written, the rest dropped, and
the pointer restarts at 0. ``"wrap"`` writes the rest at the start instead. STiL's masked-numerator
loss (P = exp(S) M / sum exp(S)) equals the softmax form above wherever Q_hat != 0.

``comatch`` (image-only) defaults to USB's classic-CV values (CIFAR-10: online, T 0.2, tau 0.95,
contrast_th 0.8, lambda_u = lambda_c = 1, alpha 0.9, K = 5 (B_l + B_u) global rows, DA 32, parameter
EMA 0.999 evaluated, batch-only graph); ``multimodal_comatch`` to the STiL repository's DVM config
(momentum encoder 0.996, T 0.1, tau 0.9, contrast_th 0.8, lambda_u = lambda_c 10 (ramped), alpha 0.9,
K 2560, DA 128, memory graph, smoothing after start_epoch = 10, student evaluated). Decisions:
docs/methods.md, "## comatch".
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
    linear_rampup,
    model_inputs,
    model_projection_head,
    pseudo_label_logs,
    soft_cross_entropy,
    unlabeled_gate_open,
    unwrap_model,
)

TEACHERS = ("online", "momentum")
OVERFLOW = ("truncate", "wrap")
LABELED_VIEWS = ("weak", "hard", "eval", "strong")


@dataclass
class CoMatchArguments(MethodArguments):
    """Defaults: USB classic-CV (config/classic_cv/comatch/comatch_cifar10_*.yaml)."""

    threshold: float = 0.95  # tau on max p (inclusive) [STiL co_threshold 0.8 DVM / 0.6 cardiac]
    contrast_threshold: float = 0.8  # graph edge threshold [STiL contrast_th 0.6 / 0.3]
    temperature: float = 0.2  # T of the embedding graph and the smoothing [STiL co_temperature 0.1]
    alpha: float = 0.9  # memory-smoothing weight of the model's own pseudo-label
    lambda_u: float = 1.0  # [STiL lam_u 10]
    lambda_c: float = 1.0  # [STiL lam_c 10]
    lambda_c_ramp: bool = False  # weight min(epoch + 1, lambda_c) (STiL/salesforce)
    lambda_c_rampup_fraction: float | None = None  # relative form of the ramp: lambda_c clip(t / (this x max_steps), 0, 1)
    queue_size: int | None = None  # K; None = queue_batch * global (B_l + B_u) (USB) [STiL 2560]
    queue_batch: int = 5  # USB: batches the queue holds (only when queue_size is None)
    queue_overflow: str = "truncate"  # "truncate": the originals (drop the rest, restart at 0); "wrap"
    memory_graph: bool = False  # add the past-sample blocks (queue_s, probs_u) to both graphs (STiL)
    distribution_alignment: bool = True
    da_len: int = 32  # [STiL 128]
    # "online": USB (one student forward, both strong embeddings with gradient);
    # "momentum": a parameter-EMA momentum encoder in train mode embeds x_l, u_w, u_s1 (STiL, salesforce)
    teacher: str = "online"
    ema_momentum: float = 0.999  # [STiL 0.996]
    ema_warmup: bool = False
    ema_span_fraction: float | None = None  # relative form of ema_momentum: span 1/(1-m) = this x max_steps
    eval_with_ema: bool = True  # evaluate/export the EMA model (USB) [STiL: the student]
    start_epoch: int = -1  # only L_x while epoch <= start_epoch [STiL 10 DVM / 8 cardiac]
    smoothing_start_epoch: int = 1  # memory smoothing from this epoch (USB: epoch > 0) [STiL start_epoch + 1]
    start_fraction: float | None = None  # relative form of start_epoch: the unlabelled terms join at this x max_steps
    smoothing_start_step: int = 6  # ... and this optimisation step (USB: it > queue_batch) [STiL 0]
    smoothing_start_fraction: float | None = None  # relative form of both smoothing gates: from this x max_steps
    labeled_view: str = "weak"  # [STiL "hard" w.p. augmentation_rate]
    projection_dim: int = 64  # only for a model without a projection head (WRN): USB proj_size
    max_queue_gib: float = 4.0  # refuse queues (2 K (P + C) float32) larger than this

    def __post_init__(self):
        for name in ("threshold", "contrast_threshold", "alpha"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]")
        if self.temperature <= 0:
            raise ValueError("temperature must be positive")
        if self.teacher not in TEACHERS:
            raise ValueError(f"teacher must be one of {TEACHERS}, not {self.teacher!r}")
        if self.queue_overflow not in OVERFLOW:
            raise ValueError(f"queue_overflow must be one of {OVERFLOW}")
        if self.queue_size is not None and self.queue_size < 1:
            raise ValueError("queue_size must be >= 1 (or null: queue_batch global batches)")
        if self.queue_batch < 1 or self.da_len < 1:
            raise ValueError("queue_batch and da_len must be >= 1")
        if not 0.0 <= self.ema_momentum < 1.0:
            raise ValueError("ema_momentum must be in [0, 1)")
        check_fraction("ema_span_fraction", self.ema_span_fraction)
        check_fraction("start_fraction", self.start_fraction)
        for name in ("lambda_c_rampup_fraction", "smoothing_start_fraction"):
            check_fraction(name, getattr(self, name))
        if self.labeled_view not in LABELED_VIEWS:
            raise ValueError(f"labeled_view must be one of {LABELED_VIEWS}")


@dataclass
class MultimodalCoMatchArguments(CoMatchArguments):
    """Defaults: siyi-wind/STiL configs/config_dvm_MultiCoMatch.yaml (cardiac: 0.85 / 0.70, start_epoch 8)."""

    threshold: float = 0.90
    contrast_threshold: float = 0.80
    temperature: float = 0.1
    lambda_u: float = 10.0
    lambda_c: float = 10.0
    lambda_c_ramp: bool = True
    queue_size: int | None = 2560
    memory_graph: bool = True
    da_len: int = 128
    teacher: str = "momentum"
    ema_momentum: float = 0.996
    eval_with_ema: bool = False
    start_epoch: int = 10
    smoothing_start_epoch: int = 11
    smoothing_start_step: int = 0
    labeled_view: str = "hard"


@torch.no_grad()
def enqueue_rows(queue: torch.Tensor, ptr: torch.Tensor, items: torch.Tensor, overflow: str = "truncate") -> None:
    """Write ``items`` (n, D) into ``queue`` (K, D) at ``ptr`` (a 0-d long buffer), without host syncs.

    ``truncate`` (salesforce/STiL): rows past the end are dropped and the pointer restarts at 0 when
    the end is reached; ``wrap``: they continue at the start. n > K keeps the last K rows ("wrap") or
    the first K - ptr ("truncate")."""
    k, n = queue.shape[0], items.shape[0]
    if n == 0:
        return
    items = items.detach().to(queue.dtype)
    offsets = torch.arange(n, device=queue.device)
    if overflow == "wrap":
        if n > k:
            items, offsets = items[-k:], offsets[-k:]
        queue.index_copy_(0, (ptr + offsets) % k, items)
        ptr.copy_((ptr + n) % k)
        return
    fits = ptr + offsets < k  # rows that land before the end
    positions = torch.where(fits, ptr + offsets, torch.full_like(offsets, k))  # k: a scratch row
    scratch = torch.cat([queue, queue.new_zeros((1,) + tuple(queue.shape[1:]))])
    scratch.index_copy_(0, positions, items)
    queue.copy_(scratch[:k])
    end = ptr + n
    ptr.copy_(torch.where(end >= k, torch.zeros_like(ptr), end))


@register_method
class CoMatch(SSLMethod):
    name = "comatch"
    arguments_class = CoMatchArguments
    labeled_views = {"labeled": "weak"}
    unlabeled_views = {"weak": "weak", "strong_0": "strong", "strong_1": "strong"}
    required_modalities = ("image",)
    preferred_model = "image-tiny"
    image_only = True

    def __init__(self, model, args: CoMatchArguments | None = None):
        super().__init__(model, args)
        a = self.args
        if self.image_only:
            check_image_only_model(model, self.name)
        self.labeled_views = {"labeled": a.labeled_view}
        self.projector = model_projection_head(model, a.projection_dim, self.name)
        self.num_classes = int(getattr(unwrap_model(model).config, "num_labels", 0) or 0)
        self.DA = DistributionAlignment(self.num_classes, a.da_len) if a.distribution_alignment and self.num_classes else None
        self.queue_size = 0

    def _net(self) -> ProjectedNet:
        return ProjectedNet(self.model, self.projector)

    def ema_options(self) -> list[EMAOption]:
        a = self.args  # the momentum encoder forwards in train mode (own batch statistics), as salesforce/STiL
        return [EMAOption("ema", a.ema_momentum, a.ema_span_fraction, warmup="tf" if a.ema_warmup else None,
                          eval_mode=a.teacher != "momentum", evaluate=a.eval_with_ema, evaluated_part="model",
                          averaged="_net")]

    def _projection_width(self) -> int:
        if self.projector is not None:
            return int(self.projector[-1].out_features)
        return int(unwrap_model(self.model).config.projection_dim)

    # ------------------------------------------------------------------ set-up
    def setup(self, info: DataInfo) -> None:
        check_num_labels(self.name, self.model, info.num_labels)
        a = self.args
        if info.num_labels and not self.num_classes:
            self.num_classes = int(info.num_labels)
        if self.DA is None and a.distribution_alignment and self.num_classes:
            self.DA = DistributionAlignment(self.num_classes, a.da_len)
        k = a.queue_size
        if k is None:
            k = a.queue_batch * (info.global_labeled_batch_size + info.global_unlabeled_batch_size)
        k, p, c = int(k), self._projection_width(), self.num_classes
        gib = 2 * k * (p + c) * 4 / 2**30
        if gib > a.max_queue_gib:
            raise ValueError(
                f"{self.name}: queues of {k} rows x ({p} + {c}) floats need {gib:.1f} GiB (> max_queue_gib "
                f"{a.max_queue_gib}); lower queue_size, or raise max_queue_gib"
            )
        generator = torch.Generator().manual_seed(0)  # same queues on every process
        # queue_w: random, not normalised (salesforce/STiL; USB: zeros); queue_s: random unit rows
        self.register_buffer("queue_w", torch.randn(k, p, generator=generator))
        self.register_buffer("probs_xu", torch.zeros(k, c))
        self.register_buffer("queue_ptr_w", torch.zeros((), dtype=torch.long))
        self.register_buffer("queue_s", F.normalize(torch.randn(k, p, generator=generator), dim=1))
        self.register_buffer("probs_u", torch.zeros(k, c))
        self.register_buffer("queue_ptr_s", torch.zeros((), dtype=torch.long))
        self.queue_size = k

    # ------------------------------------------------------------------ pieces (tested by hand)
    @staticmethod
    def graph_loss(probs: torch.Tensor, emb_logits: torch.Tensor, contrast_threshold: float,
                   past_probs: torch.Tensor | None = None):
        """L_c from pseudo-label rows ``probs`` (B, C) (+ ``past_probs`` (K, C): memory block) and the
        embedding-similarity logits (B, B [+ K]) (already divided by T). Returns (loss, Q_hat)."""
        with torch.no_grad():
            q = probs @ probs.T
            q.fill_diagonal_(1.0)
            if past_probs is not None:
                q = torch.cat([q, probs @ past_probs.T], dim=1)
            q = q * (q >= contrast_threshold).to(q.dtype)
            q_hat = q / q.sum(dim=1, keepdim=True)
        log_p = torch.log(at_least_float32(emb_logits).softmax(dim=1) + 1e-7)
        return (-(q_hat * log_p).sum(dim=1)).mean(), q_hat

    @torch.no_grad()
    def enqueue(self, g_l, y, g_w, p_orig, g_s1, p, state: TrainState) -> None:
        a = self.args
        onehot = F.one_hot(y.long(), self.num_classes).to(self.probs_xu.dtype)
        # gathered piece by piece: [labelled of all ranks; weak of all ranks] = one process's global batch
        feats_w = torch.cat([gather_no_grad(at_least_float32(g_l), state), gather_no_grad(at_least_float32(g_w), state)])
        probs_w = torch.cat([gather_no_grad(onehot, state), gather_no_grad(at_least_float32(p_orig), state)])
        ptr = self.queue_ptr_w.clone()
        enqueue_rows(self.queue_w, self.queue_ptr_w, feats_w, a.queue_overflow)
        enqueue_rows(self.probs_xu, ptr, probs_w, a.queue_overflow)
        if a.memory_graph:
            ptr = self.queue_ptr_s.clone()
            enqueue_rows(self.queue_s, self.queue_ptr_s, gather_no_grad(at_least_float32(g_s1), state), a.queue_overflow)
            enqueue_rows(self.probs_u, ptr, gather_no_grad(at_least_float32(p), state), a.queue_overflow)

    # ------------------------------------------------------------------ the step
    def forward_views(self, labeled: dict, unlabeled: dict):
        """-> z_l, z_s0, g_s0, g_s1 (student side) and z_w, g_l, g_w (no gradient)."""
        x_l = model_inputs(labeled["labeled"])
        u_w = model_inputs(unlabeled["weak"])
        u_s0, u_s1 = model_inputs(unlabeled["strong_0"]), model_inputs(unlabeled["strong_1"])
        if self.args.teacher == "online":
            inputs, sizes = concat_views([x_l, u_w, u_s0, u_s1])
            logits, proj = self._net()(**inputs)
            z_l, z_w, z_s0, _ = torch.split(logits, sizes)
            g_l, g_w, g_s0, g_s1 = torch.split(proj, sizes)
            return z_l, z_s0, g_s0, g_s1, z_w.detach(), g_l.detach(), g_w.detach()
        inputs, sizes = concat_views([x_l, u_s0])
        logits, proj = self._net()(**inputs)
        z_l, z_s0 = torch.split(logits, sizes)
        g_s0 = proj[sizes[0]:]
        with torch.no_grad():
            t_inputs, t_sizes = concat_views([x_l, u_w, u_s1])
            t_logits, t_proj = self.ema(**t_inputs)
            g_l, g_w, g_s1 = torch.split(t_proj, t_sizes)
            z_w = t_logits[t_sizes[0]: t_sizes[0] + t_sizes[1]]
        return z_l, z_s0, g_s0, g_s1, z_w, g_l, g_w

    def compute_terms(self, labeled: dict, unlabeled: dict | None, state: TrainState):
        if not hasattr(self, "queue_w"):
            raise RuntimeError(f"{self.name}: setup(info) was not called (the queues are sized there)")
        a = self.args
        y = labeled["labels"]
        z_l, z_s0, g_s0, g_s1, z_w, g_l, g_w = self.forward_views(labeled, unlabeled)
        if a.smoothing_start_fraction is not None:
            smoothing = unlabeled_gate_open(state, -1, a.smoothing_start_fraction)
        else:
            smoothing = state.epoch >= a.smoothing_start_epoch and state.step >= a.smoothing_start_step
        with torch.no_grad():
            probs = at_least_float32(z_w).softmax(dim=1)
            if self.DA is not None:
                probs = self.DA(probs, state)
            p_orig = probs
            if smoothing:
                affinity = (at_least_float32(g_w) @ self.queue_w.T / a.temperature).softmax(dim=1)
                probs = a.alpha * probs + (1 - a.alpha) * affinity @ self.probs_xu
            mask = (probs.max(dim=1).values >= a.threshold).float()
        emb_logits = at_least_float32(g_s0) @ at_least_float32(g_s1).T / a.temperature
        past = None
        if a.memory_graph:
            queue_s = self.queue_s.clone()  # read before this step's write (kept for backward)
            emb_logits = torch.cat([emb_logits, at_least_float32(g_s0) @ queue_s.T / a.temperature], dim=1)
            past = self.probs_u.clone()
        contrast_loss, q_hat = self.graph_loss(probs, emb_logits, a.contrast_threshold, past)
        terms = {
            "sup_loss": cross_entropy(z_l, y, reduction="mean"),
            "unsup_loss": (soft_cross_entropy(z_s0, probs) * mask).mean(),
            "contrast_loss": contrast_loss,
        }
        self.enqueue(g_l, y, g_w, p_orig, g_s1, probs, state)
        logs = {k: v.detach() for k, v in terms.items()}
        logs["unsup_active"] = torch.tensor(float(self.unlabeled_terms_on(state)))
        logs["graph_edges"] = (q_hat > 0).float().sum(dim=1).mean()
        logs.update(pseudo_label_logs(probs.argmax(dim=1), mask, unlabeled.get("monitor_labels")))
        return terms, logs

    def contrast_weight(self, epoch: int, state: TrainState | None = None) -> float:
        """lambda_c: constant (USB), ``min(epoch + 1, lambda_c)`` (STiL/salesforce), or ramped
        linearly over ``lambda_c_rampup_fraction`` of the run (needs ``state``)."""
        a = self.args
        if a.lambda_c_rampup_fraction is not None and state is not None:
            return float(a.lambda_c) * linear_rampup(state.step, a.lambda_c_rampup_fraction * state.max_steps)
        return float(min(epoch + 1, a.lambda_c)) if a.lambda_c_ramp else float(a.lambda_c)

    def training_step(self, labeled: dict, unlabeled: dict | None, state: TrainState):
        a = self.args
        terms, logs = self.compute_terms(labeled, unlabeled, state)
        loss = self.gated_loss(terms["sup_loss"], [a.lambda_u * terms["unsup_loss"],
                                                   self.contrast_weight(state.epoch, state) * terms["contrast_loss"]], state, logs)
        return loss, logs


@register_method
class MultimodalCoMatch(CoMatch):
    """The STiL repository's Multimodal CoMatch: (image, row) pairs in every view (two independent
    strong image augmentations and 30 % corruptions), the concat backbone for both encoders."""

    name = "multimodal_comatch"
    arguments_class = MultimodalCoMatchArguments
    labeled_views = {"labeled": "hard"}
    required_modalities = ("image", "tabular")
    preferred_model = "multimodal-concat-tiny"
    image_only = False
