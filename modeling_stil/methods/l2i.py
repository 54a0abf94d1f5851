"""`l2i_o` and `l2i_l`: Learning to Impute (Li, Foo & Bilen, arXiv 1912.10364) on top of Mean Teacher.

Reference: docs/methods.md, "l2i_o / l2i_l" (classification, landmarks, the four meta steps, the
re-implementation). Each iteration has two optimisation phases with the
same optimizer (``num_phases = 2``; the trainer steps after each):

**Phase 0** is exactly the Mean-Teacher step (`mean_teacher.MeanTeacher.training_step`).

**Phase 1** is the meta step, at the weights theta that phase 0's optimizer step wrote. With the
unlabelled views u1 (student) and u2 (teacher / labeller) and a meta batch (x_v, y_v) drawn again
from the *labelled training rows* (``meta_views``: an independently shuffled labelled stream)::

    z_u      = f_theta(u1)                                       student on view 1 (graph to theta)
    y_hat    = T(p)   T = softmax (classification) | view transfer u2 -> u1 (landmarks)
               L2I-O: p = f_phi(u2), phi = a detached copy of theta (labels = Output of a network)
               L2I-L: p = sg(f_theta(u2)) as a leaf tensor         (labels = Learnable values)
    l_u      = c * sum_{i,k} (a(z_u)_ik - b(y_hat)_ik)^2          a = softmax | identity | tanh, b = id | tanh,
                                                                  c = 1 (sum, classification) | 1/(B K) (mean)
    g        = d l_u / d theta                                    (create_graph: differentiable in y_hat)
    theta'   = sg(theta) - eta_in * g                             one virtual SGD step, eta_in = m * lr(t)
    L_meta   = CE(f_theta'(x_v), y_v)  |  MSE(f_theta'(x_v), y_v)
    L2I-O:   h = d L_meta / d phi   (exact second order)  ->  theta.grad = h, optimizer step
    L2I-L:   p* = p - label_step * d L_meta / d p ; y* = sg(T(p*))
             L_u* = mean (a(z_u) - y*)^2 (weight 1, no ramp)  ->  backward, optimizer step

After both phases the Mean-Teacher hooks run once (eval EMA, decoupled student decay, teacher EMA);
on landmarks the original also updates the eval EMA after phase 0 (``eval_ema_each_phase``).

The hypergradient is exact (double backward through the virtual step, `imputation_meta_gradient`);
Its closed form is ``dL_meta/dy_hat_i = 2 c eta_in b'(y_hat_i) * (J_i v)`` with
``J_i = d a_i / d theta`` and ``v = grad L_meta(theta')``; tests/test_l2i.py checks the code against a
float64 hand-written double backward, this closed form and finite differences.

BatchNorm (decided, docs/methods.md): every meta forward uses batch statistics (train mode). The
virtual forwards (at theta' on x_v, and the labeller's on u2) run on *clones* of the buffers, so
they never touch the real running statistics; the student's forward on u1 updates the real ones by
default (the original's module forward; ``meta_updates_bn_stats: false`` uses clones as well).

Several processes: the meta step runs on the bare model with ``functional_call`` inside the
DDP-wrapped method; ``autograd.grad`` fires no DDP hook, so g, theta', L_meta and d/dp are
*per-process* (each process's unlabelled and meta shards). What reaches the parameters goes through
an ordinary backward of the returned loss, which DDP all-reduces: the L2I-O meta-gradient h and the
L2I-L extra loss's gradient are averaged over processes. L2I-L labels are per-row and local.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from .base import TASK_CLASSIFICATION, DataInfo, TrainState, register_method
from .common import at_least_float32, gather_no_grad, model_inputs, task_loss, unwrap_model, view_targets
from .consistency import consistency_loss, transfer_to_view
from .mean_teacher import MeanTeacher, MeanTeacherArguments

HYPERGRADIENTS = ("double_backward",)


# ---------------------------------------------------------------------------------------- the meta step
def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """name -> parameter of the bare model, those that require gradient (the virtual step's theta)."""
    return {name: p for name, p in unwrap_model(model).named_parameters() if p.requires_grad}


def cloned_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every buffer (BN running statistics): a virtual forward writes into these."""
    return {name: b.clone() for name, b in unwrap_model(model).named_buffers()}


def forward_with(model: torch.nn.Module, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor] | None,
                 inputs: dict) -> torch.Tensor:
    """Logits of ``model(**inputs)`` with ``params`` (and ``buffers``) in place of the module's own
    (``torch.func.functional_call``; in-place buffer updates go into the dict given)."""
    values = dict(params) if buffers is None else {**buffers, **params}
    return functional_call(unwrap_model(model), values, args=(), kwargs=inputs).logits


def virtual_step(params: dict[str, torch.Tensor], inner_loss: torch.Tensor, lr: float) -> dict[str, torch.Tensor]:
    """``theta' = sg(theta) - lr * d inner_loss / d theta``, differentiable in whatever ``inner_loss``
    depends on besides theta (create_graph). Parameters without gradient keep their value."""
    names = list(params)
    grads = torch.autograd.grad(inner_loss, [params[n] for n in names], create_graph=True, allow_unused=True)
    return {n: params[n].detach() if g is None else params[n].detach() - lr * g for n, g in zip(names, grads)}


def imputation_meta_gradient(params: dict[str, torch.Tensor], inner_loss: torch.Tensor, inner_lr: float,
                             outer_loss: Callable[[dict[str, torch.Tensor]], torch.Tensor],
                             wrt: list[torch.Tensor], retain_graph: bool = False):
    """The exact hypergradient of L2I: one virtual SGD step on ``inner_loss`` (a function of
    ``params`` and of the imputed labels), the labelled ``outer_loss(theta')`` at the virtual weights,
    and ``d outer_loss / d wrt`` by double backward through the step.

    Returns ``(grads, outer_loss_value)``; a tensor of ``wrt`` the outer loss does not reach gets zeros."""
    fast = virtual_step(params, inner_loss, inner_lr)
    outer = outer_loss(fast)
    grads = torch.autograd.grad(outer, wrt, retain_graph=retain_graph, allow_unused=True)
    grads = tuple(torch.zeros_like(w) if g is None else g for w, g in zip(wrt, grads))
    return grads, outer


# ---------------------------------------------------------------------------------------- arguments
@dataclass
class L2IArguments(MeanTeacherArguments):
    """Mean-Teacher arguments plus the meta step's. ``None`` = the original script's value for the task."""

    # eta_in = inner_lr_multiplier * current lr (the originals hard-code multiples of lr;
    # classification: constant lr, so eta_in is fixed at 0.1 (O) / 0.2 (L); landmarks: decays with lr)
    inner_lr_multiplier: float | None = None
    inner_reduction: str | None = None  # "sum" (classification) | "mean" (landmarks / regression)
    # the student's u1 forward of the meta step updates the real BN running stats (original); False: clones
    meta_updates_bn_stats: bool = True
    # also update the eval EMA after phase 0 (the regression scripts update it after each optimizer step)
    eval_ema_each_phase: bool | None = None  # None: True for landmarks / regression, False for classification
    hypergradient: str = "double_backward"
    # tanh on both sides of l_u; None: the original's (L2I-O on landmarks / regression: True; else False)
    squash: bool | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.inner_lr_multiplier is not None and self.inner_lr_multiplier < 0:
            raise ValueError("inner_lr_multiplier must be >= 0")
        if self.inner_reduction not in (None, "sum", "mean"):
            raise ValueError("inner_reduction must be 'sum' or 'mean'")
        if self.hypergradient not in HYPERGRADIENTS:
            raise ValueError(f"hypergradient must be one of {HYPERGRADIENTS}")

    def resolved_reduction(self, task: str) -> str:
        if self.inner_reduction is not None:
            return self.inner_reduction
        return "sum" if task == TASK_CLASSIFICATION else "mean"

    def resolved_eval_ema_each_phase(self, task: str) -> bool:
        if self.eval_ema_each_phase is not None:
            return self.eval_ema_each_phase
        return task != TASK_CLASSIFICATION


@dataclass
class L2IOArguments(L2IArguments):
    def resolved_multiplier(self, task: str) -> float:
        if self.inner_lr_multiplier is not None:
            return self.inner_lr_multiplier
        return 50.0 if task == TASK_CLASSIFICATION else 10.0

    def resolved_squash(self, task: str) -> bool:
        return self.squash if self.squash is not None else task != TASK_CLASSIFICATION


@dataclass
class L2ILArguments(L2IArguments):
    label_step: float = 1.0  # step size of the label update on the logits / targets p
    extra_weight: float = 1.0  # weight of L_u* (original: 1, no ramp-up)
    # beyond the paper: keep each row's updated labels p* in a table (num_train rows) and start from
    # them the next time the row is drawn (original: labels re-initialised from the student each step)
    label_memory: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.label_step < 0 or self.extra_weight < 0:
            raise ValueError("label_step and extra_weight must be >= 0")

    def resolved_multiplier(self, task: str) -> float:
        if self.inner_lr_multiplier is not None:
            return self.inner_lr_multiplier
        return 100.0 if task == TASK_CLASSIFICATION else 1.0

    def resolved_squash(self, task: str) -> bool:
        return bool(self.squash)  # the L2I-L scripts have no tanh


# ---------------------------------------------------------------------------------------- the methods
class _L2IBase(MeanTeacher):
    """Mean Teacher (phase 0) + a meta step (phase 1) that subclasses define."""

    num_phases = 2

    def __init__(self, model, args: L2IArguments | None = None):
        super().__init__(model, args)
        # the labelled rows again, own shuffle, the labelled stream's augmentation (instance attribute:
        # the trainer reads it; translate for landmarks, as Mean Teacher's views)
        self.meta_views = dict(self.labeled_views)

    def functional_parameter_use(self) -> str | None:
        return "evaluates the student at its virtual step (torch.func.functional_call on theta - lr g)"

    def training_step(self, labeled: dict, unlabeled: dict, state: TrainState):
        if state.phase == 0:
            return super().training_step(labeled, unlabeled, state)
        if "meta" not in labeled:
            raise ValueError(f"{self.name} needs the meta stream (labeled['meta'])")
        if self.args.resolved_eval_ema_each_phase(state.task) and self.eval_ema is not None:
            self.weight_ema_step(state)  # the regression scripts' EMA step after phase 0's optimizer step
        # fused attention kernels (flash / memory-efficient) have no double backward: the meta step's
        # forwards use the math implementation of scaled_dot_product_attention (same values)
        with sdpa_kernel([SDPBackend.MATH]):
            return self.meta_step(labeled, unlabeled, state)

    # ------------------------------------------------------------------ shared pieces of the meta step
    def inner_lr(self, state: TrainState) -> float:
        return self.args.resolved_multiplier(state.task) * state.learning_rate

    def student_view_logits(self, unlabeled: dict) -> torch.Tensor:
        """z_u = f_theta(u1), a real forward (BN running stats updated) unless meta_updates_bn_stats is off."""
        inputs = model_inputs(unlabeled["student"])
        if self.args.meta_updates_bn_stats:
            return self.model(**inputs).logits
        return forward_with(self.model, trainable_parameters(self.model), cloned_buffers(self.model), inputs)

    def imputed_targets(self, p: torch.Tensor, unlabeled: dict, task: str) -> torch.Tensor:
        """y_hat = T(p): softmax (classification) or p moved from u2's frame into u1's (landmarks)."""
        targets = p.softmax(dim=-1) if task == TASK_CLASSIFICATION else p
        if task != TASK_CLASSIFICATION:
            std = self.target_std.to(targets.device) if self.target_std is not None else None
            targets = transfer_to_view(targets, unlabeled["teacher"].get("translation"),
                                       unlabeled["student"].get("translation"), std)
        return targets

    def meta_loss_fn(self, labeled: dict, task: str) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
        """theta' -> L_meta: the supervised loss of the meta batch at the virtual weights (batch
        statistics; running-stat updates go into throw-away buffer clones)."""
        meta = labeled["meta"]
        view = meta["weak"]
        targets = view_targets(view, meta["labels"])
        inputs = model_inputs(view)
        buffers = cloned_buffers(self.model)

        def outer(fast: dict[str, torch.Tensor]) -> torch.Tensor:
            return task_loss(forward_with(self.model, fast, buffers, inputs), targets, task, row_means=False)

        return outer

    def meta_step(self, labeled: dict, unlabeled: dict, state: TrainState):
        raise NotImplementedError


@register_method
class L2IO(_L2IBase):
    """L2I-O: missing labels are the Output of a network (a copy of the student)."""

    name = "l2i_o"
    arguments_class = L2IOArguments

    def meta_step(self, labeled: dict, unlabeled: dict, state: TrainState):
        task = state.task
        params = trainable_parameters(self.model)
        labeller = {name: p.detach().clone().requires_grad_(True) for name, p in params.items()}  # phi = theta
        p = forward_with(self.model, labeller, cloned_buffers(self.model), model_inputs(unlabeled["teacher"]))
        targets = self.imputed_targets(p, unlabeled, task)
        z_u = self.student_view_logits(unlabeled)
        inner = consistency_loss(z_u, targets, task, self.args.resolved_reduction(task),
                                 squash=self.args.resolved_squash(task))
        names = list(labeller)
        grads, meta_loss = imputation_meta_gradient(params, inner, self.inner_lr(state), self.meta_loss_fn(labeled, task),
                                                    [labeller[n] for n in names])
        # theta.grad = h through an ordinary backward (DDP all-reduces it); the loss's value is 0
        surrogate = sum((params[n] * g.detach()).sum() for n, g in zip(names, grads))
        loss = surrogate - surrogate.detach()
        logs = {"meta_loss": meta_loss.detach(), "inner_loss": inner.detach(),
                "meta_grad_norm": torch.sqrt(sum((g.detach().float() ** 2).sum() for g in grads))}
        return loss, logs


@register_method
class L2IL(_L2IBase):
    """L2I-L: missing labels are Learnable values, one exact meta-gradient step per iteration."""

    name = "l2i_l"
    arguments_class = L2ILArguments

    def setup(self, info: DataInfo) -> None:
        super().setup(info)
        if self.args.label_memory:
            self.register_buffer("label_table", torch.zeros(info.num_train, info.num_labels))  # p* per train row
            self.register_buffer("label_seen", torch.zeros(info.num_train, dtype=torch.bool))

    def _canonical(self, p: torch.Tensor, unlabeled: dict, task: str, to_view: bool) -> torch.Tensor:
        """Landmarks in the memory are stored in the untranslated frame (view 2 <-> no translation)."""
        if task == TASK_CLASSIFICATION:
            return p
        translation = unlabeled["teacher"].get("translation")
        if translation is None:
            return p
        std = self.target_std.to(p.device) if self.target_std is not None else None
        zero = torch.zeros_like(translation)
        return transfer_to_view(p, zero, translation, std) if to_view else transfer_to_view(p, translation, zero, std)

    def initial_labels(self, unlabeled: dict, task: str) -> torch.Tensor:
        """p: the student's own prediction on u2 (batch statistics, buffer clones), as a leaf tensor;
        with ``label_memory`` the stored p* of rows seen before."""
        with torch.no_grad():
            p = forward_with(self.model, trainable_parameters(self.model), cloned_buffers(self.model),
                             model_inputs(unlabeled["teacher"]))
            p = at_least_float32(p)
            if self.args.label_memory:
                index = unlabeled["index"]
                stored = self._canonical(self.label_table[index].to(p.dtype), unlabeled, task, to_view=True)
                p = torch.where(self.label_seen[index].unsqueeze(1), stored, p)
        return p.detach().requires_grad_(True)

    @torch.no_grad()
    def remember(self, p: torch.Tensor, unlabeled: dict, task: str, state: TrainState) -> None:
        index = gather_no_grad(unlabeled["index"], state)
        values = gather_no_grad(self._canonical(p.detach(), unlabeled, task, to_view=False), state)
        self.label_table[index] = values.to(self.label_table.dtype)
        self.label_seen[index] = True

    def meta_step(self, labeled: dict, unlabeled: dict, state: TrainState):
        task = state.task
        params = trainable_parameters(self.model)
        p = self.initial_labels(unlabeled, task)
        z_u = self.student_view_logits(unlabeled)
        inner = consistency_loss(z_u, self.imputed_targets(p, unlabeled, task), task,
                                 self.args.resolved_reduction(task), squash=self.args.resolved_squash(task))
        (grad_p,), meta_loss = imputation_meta_gradient(params, inner, self.inner_lr(state),
                                                        self.meta_loss_fn(labeled, task), [p], retain_graph=True)
        with torch.no_grad():
            p_new = p - self.args.label_step * grad_p
            targets = self.imputed_targets(p_new, unlabeled, task)
        if self.args.label_memory:
            self.remember(p_new, unlabeled, task, state)
        extra = consistency_loss(z_u, targets.detach(), task, "mean")  # L_u*, on the retained z_u graph
        loss = self.args.extra_weight * extra
        logs = {"meta_loss": meta_loss.detach(), "inner_loss": inner.detach(), "extra_loss": extra.detach(),
                "label_update_norm": grad_p.detach().float().norm(dim=-1).mean() * self.args.label_step}
        return loss, logs
