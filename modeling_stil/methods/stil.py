"""`stil`: STiL (Du, Luo, O'Regan, Qin, CVPR 2025), faithful to siyi-wind/STiL (STiLModel.py).

Reference: docs/methods.md, "stil". One step, with B_l labelled
and B_u unlabelled rows forwarded together (one view per row, recipe ``stil``: the same augmented image
and corrupted table for student and teacher)::

    student(x) -> z_m, z_i, z_t, features, pooled pre-interaction specific u_i, u_t, shared v_i, v_t
    h_m = norm(g_m(features)), h_i = norm(g_i(v_i)), h_t = norm(g_t(v_t))
    EMAN update of the teacher, THEN teacher(x) in eval mode -> z^T, h^T_m = norm(g_m(features^T))
    L_ce  = CE(z_m,l, y) + CE(z_i,l, y) + CE(z_t,l, y)
    L_cc  = 0.5 CE(h_i h_t^T / tau, diag) + 0.5 CE(h_t h_i^T / tau, diag)
    L_ds  = I_i + E_i + I_t + E_t  (CLUB bound I_k and estimator NLL E_k, mu_k = CLUB_k(u_k))
    CGPL: cases from the argmaxes of z^T_{m,i,t} on unlabelled rows -> p (softmax of averaged logits)
    PGLS: q = softmax(h^T_m,u P^T / tau); p_bar = rho p + (1-rho) q; p_hat = rho softmax(z^T_m) + (1-rho) q;
          M = [max p_hat >= th1]
    L_uce = sum_k mean_u[ M * route_k * CE(z_k,u, p_bar) ]   (k = m: case1; i: case1|case2t|case3&r;
                                                              t: case1|case2i|case3&~r)
    L_pt  = mean_B [max y_hat >= th1] * -log(softmax(h_m P^T / tau)[argmax y_hat] + 1e-7),
            y_hat = [one_hot(y_l); p_hat (zeros while epoch <= start_epoch)]
    loss  = alpha L_ce + beta L_cc + gamma L_ds  (+ rate_pt L_pt + rate_uce L_uce once epoch > start_epoch)
    prototype sums += reduce_sum(S_l / R + S_u) from teacher features of confident rows;
    on_epoch_end: P = sums / counts, sums reset.

Where our hooks differ from Lightning's (decisions, see docs/methods.md "## stil"):

* EMA timing: the original updates the teacher after the student forward and before the teacher
  forward of every step. We do the same, inside ``training_step``, once per optimisation step
  (guarded by ``ema_step``, a saved buffer mirrored by a host-side int so the check costs no device
  sync; gradient accumulation therefore does not update it per micro-batch
  and a resumed run continues exactly). ``after_optimizer_step`` therefore does nothing.
* ``repeat_ratio`` R = max(num_unlabeled // (ratio * num_labeled) - 1, 1) with
  ratio = unlabeled_batch_size / labeled_batch_size (the original's ``unlabelled_ratio`` = 7 is the
  batch split 448/64), computed exactly in integers; ``MethodArguments.repeat_ratio`` overrides it.
* The original asserts at epoch end that every class has a prototype count >= 1. We divide
  wherever the count is > 0 (identical whenever the original does not crash) and keep the previous
  prototype of a class with no contribution at all (counted in the ``prototypes_empty`` log).
* The case-3 coin flip uses the global torch RNG (saved and restored by ``accelerator.save_state``).
* Losses are computed in float32 (float64 inputs stay float64: the equivalence tests run in float64).

Logs (detached scalar tensors; the trainer adds ``loss``):

* ``sup_loss`` (L_ce, unweighted), ``sup_loss_multimodal``, ``sup_loss_image``, ``sup_loss_tabular``;
* ``loss_cc`` (L_cc); ``club_bound_image``, ``club_estimator_image``, ``club_bound_tabular``,
  ``club_estimator_tabular`` and their sum ``loss_ds``;
* ``loss_pt``; ``unsup_loss`` (L_uce) and ``unsup_loss_multimodal``/``_image``/``_tabular``
  (computed and logged every step like the original, in the loss only after ``start_epoch``);
* ``unsup_active``: 1.0 once the unlabelled terms are in the loss;
* ``mask_ratio`` (share of unlabelled rows with max p_hat >= th1), ``pseudo_label_accuracy`` and
  ``pseudo_label_accuracy_masked`` (argmax p_bar vs ``monitor_labels``; monitoring only);
* ``cgpl_case1``, ``cgpl_case2_image``, ``cgpl_case2_tabular``, ``cgpl_case3``: share of unlabelled
  rows in each CGPL case (they sum to 1);
* epoch end: ``prototypes_empty`` (classes that kept their previous prototype).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..convert_original import METHOD_STATE_FILENAME, stil_method_state_entry
from ..encoders import SimCLRProjectionHead  # lightly 1.2.22 head, keys layers.{0,2} (the originals')
from .base import DataInfo, EMAOption, MethodArguments, SSLMethod, TrainState, register_method
from .common import (
    DistributionAlignment,
    at_least_float32,
    check_fraction,
    check_shared_view,
    concat_views,
    model_inputs,
    pseudo_label_logs,
    soft_cross_entropy,
    unwrap_model,
    use_shared_view,
)


@dataclass
class StilArguments(MethodArguments):
    """Defaults = siyi-wind/STiL configs/config_dvm_STiL.yaml (cardiac values in brackets)."""

    alpha: float = 0.2  # weight of L_ce (supervised CE of the three heads) [cardiac 0.2]
    beta: float = 3.0  # weight of L_cc (contrastive consistency of the shared features) [1.0]
    gamma: float = 0.5  # weight of L_ds (CLUB bound + estimator NLL, both modalities) [1.0]
    rate_pt: float = 1.0  # weight of L_pt (prototype loss) [1.0]
    rate_uce: float = 0.2  # weight of L_uce (unlabelled CE of the three heads) [0.2]
    th1: float = 0.90  # confidence threshold on p_hat (inclusive) [0.85]
    rate_pseudo: float = 0.9  # rho: weight of the CGPL pseudo-label against the prototype scores q [0.95]
    start_epoch: int = 35  # L_pt, L_uce and unlabelled prototype rows count from epoch start_epoch+1 [8]
    start_fraction: float | None = None  # relative form of start_epoch: from this x max_steps
    temperature: float = 0.1  # tau of L_cc, the prototype scores q and L_pt
    lambda_0: float = 0.5  # weight of the image->table direction of L_cc
    use_ema: bool = True  # EMA teacher; False: the student's own (detached) outputs are the teacher's
    eman: bool = True  # EMAN: BN running statistics are averaged too (EMATeacher "state"); False: "parameters" (buffers copied)
    ema_momentum: float = 0.996  # teacher momentum m [0.4]
    ema_span_fraction: float | None = None  # relative form of ema_momentum: span 1/(1-m) = this x max_steps
    distribution_alignment: bool = False  # the original's DA (256-batch queue on p_tilde); off in both configs
    projection_dim: int = 128  # P: width of the three projection heads and of the prototypes
    # image/tabular projectors: "linear" = nn.Linear(d, P) (DVM), "mlp" = Linear-ReLU-Linear(d, d, P)
    # (cardiac, lightly 1.2.22 SimCLRProjectionHead without BN). The multimodal one is always "mlp".
    unimodal_projector: str = "linear"
    repeat_ratio: int | None = None  # R; None = computed from the data sizes in setup
    # hidden width of the CLUB estimators' mean network: the original's CLUBMean default, 512 at any
    # d (the estimators are built as CLUBMean(d, d) with hidden_size left at 512)
    club_hidden_dim: int = 512
    # The original trains the CLUB estimators and the encoders on bound + estimator NLL in one loss.
    # True = standard CLUB: the estimator NLL sees detached features (trains only the
    # estimators) and the bound is computed with the estimator frozen (trains only the features).
    club_standard: bool = False
    # The one view student and teacher share, for labelled and unlabelled rows: "stil" (the original:
    # contrastive crop down to 8 %, colour jitter, blur, with probability augmentation_rate, and 30 %
    # of the fields corrupted) or another view of data_utils/views.py ("weak": flip and pad-crop, 10 %
    # corrupted; docs/methods.md, "stil").
    view: str = "stil"

    def __post_init__(self):
        if not 0.0 <= self.ema_momentum <= 1.0:
            raise ValueError("ema_momentum must be in [0, 1]")
        check_fraction("start_fraction", self.start_fraction)
        check_fraction("ema_span_fraction", self.ema_span_fraction)
        if not 0.0 <= self.rate_pseudo <= 1.0:
            raise ValueError("rate_pseudo must be in [0, 1]")
        if self.temperature <= 0:
            raise ValueError("temperature must be positive")
        if self.unimodal_projector not in ("linear", "mlp"):
            raise ValueError("unimodal_projector must be 'linear' (DVM) or 'mlp' (cardiac)")
        if self.repeat_ratio is not None and self.repeat_ratio < 1:
            raise ValueError("repeat_ratio must be >= 1")
        if self.club_hidden_dim < 1:
            raise ValueError("club_hidden_dim must be >= 1 (the original's is 512)")
        check_shared_view(self.view)


class CLUBMean(nn.Module):
    """CLUB with a learned mean and unit variance (``p_mu.{0,2}``): mu(x) = Linear-ReLU-Linear."""

    def __init__(self, x_dim: int, y_dim: int, hidden_dim: int):
        super().__init__()
        self.p_mu = nn.Sequential(nn.Linear(x_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, y_dim))

    def forward(self, x):
        return self.p_mu(x)


def one_hot(index: torch.Tensor, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    """``F.one_hot(index, num_classes).to(dtype)`` without its range check, which reads min/max back
    to the host (a sync per call off CUDA); an out-of-range index gives an all-zero row."""
    return (index.unsqueeze(-1) == torch.arange(num_classes, device=index.device)).to(dtype)


def club_terms(mu: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(bound, estimator NLL): bound = mean_n[-0.5|mu_n - v_n|^2 + 0.5 mean_j |mu_n - v_j|^2],
    NLL = mean_n |mu_n - v_n|^2 (CLUBMean, unit variance)."""
    positive = -0.5 * (mu - v).pow(2).sum(dim=1)
    negative = -0.5 * (mu.unsqueeze(1) - v.unsqueeze(0)).pow(2).sum(dim=2).mean(dim=1)
    return (positive - negative).mean(), (mu - v).pow(2).sum(dim=1).mean()


@register_method
class Stil(SSLMethod):
    name = "stil"
    arguments_class = StilArguments
    # one view per row for labelled and unlabelled data, shared by student and teacher
    labeled_views = {"stil": "stil"}
    unlabeled_views = {"stil": "stil"}
    eval_views = {"eval": "eval"}
    stream_defaults = {
        "unlabeled_includes_labeled": False,  # separate labelled / unlabelled files
        "corruption_pool": "stream",  # corruption draws from the same file (labelled or unlabelled)
        "augmentation_rate": None,  # the view config's 0.95
        "epoch": "unlabeled",  # Lightning max_size_cycle: one pass over the unlabelled loader
    }
    required_modalities = ("image", "tabular")
    preferred_model = "stil-tiny"  # without --model (synthetic data); real data: stil-dvm / stil-cardiac

    def __init__(self, model, args: StilArguments | None = None):
        super().__init__(model, args)
        bare = unwrap_model(model)
        heads = ("classifier_multimodal", "classifier_imaging", "classifier_tabular")
        hidden = getattr(getattr(bare, "config", None), "hidden_size", None)
        if not all(hasattr(bare, h) for h in heads) or hidden is None:
            raise ValueError(
                f"stil needs a StilModel (three heads: multimodal, image, tabular); got {type(bare).__name__}. "
                "Use --model stil-tiny / stil-dvm / stil-cardiac or a converted STiL checkpoint."
            )
        a, d, p = self.args, int(hidden), int(self.args.projection_dim)
        self.hidden_size = d
        use_shared_view(self, a.view)
        self.projector_multimodal = SimCLRProjectionHead(3 * d, 3 * d, p)
        if a.unimodal_projector == "linear":
            self.projector_imaging, self.projector_tabular = nn.Linear(d, p), nn.Linear(d, p)
        else:
            self.projector_imaging, self.projector_tabular = SimCLRProjectionHead(d, d, p), SimCLRProjectionHead(d, d, p)
        self.CLUB_imaging = CLUBMean(d, d, a.club_hidden_dim)
        self.CLUB_tabular = CLUBMean(d, d, a.club_hidden_dim)
        self.register_buffer("ema_step", torch.tensor(-1, dtype=torch.long))  # last step the teacher was updated
        self._ema_step_host: int | None = None  # the same on the host (None: read the buffer once)
        self.repeat_ratio = int(a.repeat_ratio or 1)
        self.DA = None
        num_labels = int(getattr(bare.config, "num_labels", 0) or 0)
        if num_labels:
            self._make_buffers(num_labels)

    def ema_options(self) -> list[EMAOption]:
        a = self.args  # the teacher, updated at the start of the step (compute_terms); the student is evaluated
        return [EMAOption("ema", a.ema_momentum, a.ema_span_fraction, mode="state" if a.eman else "parameters",
                          enabled=a.use_ema, updated="by_method")]

    # ------------------------------------------------------------------ set-up
    def _make_buffers(self, num_labels: int) -> None:
        p = self.args.projection_dim
        self.register_buffer("prototypes", torch.zeros(num_labels, p))
        self.register_buffer("prototypes_sum", torch.zeros(num_labels, p))
        self.register_buffer("prototypes_count_sum", torch.zeros(num_labels, 1))
        self.DA = DistributionAlignment(num_labels, 256) if self.args.distribution_alignment else None

    def setup(self, info: DataInfo) -> None:
        if self.args.repeat_ratio is not None:
            self.repeat_ratio = int(self.args.repeat_ratio)
        elif info.num_labeled > 0 and info.labeled_batch_size > 0 and info.unlabeled_batch_size > 0:
            # u_N // (unlabelled_ratio * l_N) with unlabelled_ratio = B_u / B_l, in integers
            ratio_floor = (info.num_unlabeled * info.labeled_batch_size) // (info.unlabeled_batch_size * info.num_labeled)
            self.repeat_ratio = max(ratio_floor - 1, 1)
        if info.num_labels and (not hasattr(self, "prototypes") or self.prototypes.shape[0] != info.num_labels):
            self._make_buffers(int(info.num_labels))

    def init_from_pretrained(self, path: str) -> dict[str, list[str]]:
        """Restore the converter's ``stil_method_state.safetensors``: projectors, CLUB estimators,
        prototype buffers, DA queue and the other backbone copy (``ema.*`` -> teacher)."""
        file = os.path.join(path, METHOD_STATE_FILENAME)
        if not os.path.isfile(file):
            return {"loaded": [], "skipped": []}
        from safetensors.torch import load_file

        state = load_file(file)
        own = dict(self.state_dict())
        targets: dict[str, torch.Tensor] = {}
        loaded, skipped = [], []
        for key, value in state.items():
            target, value = stil_method_state_entry(key, value, self.ema is not None, getattr(self, "DA", None) is not None)
            if target is None:
                skipped.append(key)
                continue
            if target not in own:
                raise ValueError(
                    f"{file}: {key!r} has no place in this stil method (projector type? set "
                    f"unimodal_projector='mlp' for cardiac checkpoints, 'linear' for DVM)"
                )
            if tuple(own[target].shape) != tuple(value.shape):
                raise ValueError(
                    f"{file}: {key!r} has shape {tuple(value.shape)}, this stil method expects "
                    f"{tuple(own[target].shape)} (num_labels / hidden_size / projection_dim / unimodal_projector differ)"
                )
            targets[target] = value
            loaded.append(key)
        with torch.no_grad():
            for target, value in targets.items():
                own[target].copy_(value.to(own[target].dtype))
            if self.ema is not None and not any(k.startswith("ema.") for k in state):
                teacher = self.ema.module.state_dict()
                for k, v in unwrap_model(self.model).state_dict().items():
                    teacher[k].copy_(v)
            if "DA_queue" in targets or "DA.queue.buffer" in targets:
                self.DA.queue.count.fill_(self.DA.queue.size)
        return {"loaded": loaded, "skipped": skipped}

    # ------------------------------------------------------------------ pieces of the step
    def _coin_flips(self, n: int, device) -> torch.Tensor:
        """Case-3 routing r (True: the image head learns; False: the tabular head), global RNG."""
        return torch.rand(n, device=device) >= 0.5

    @staticmethod
    def cgpl(zm: torch.Tensor, zi: torch.Tensor, zt: torch.Tensor):
        """CGPL on teacher logits: (p, case1, case2i, case2t, case3)."""
        am, ai, at = zm.argmax(1), zi.argmax(1), zt.argmax(1)
        case1 = (am == ai) & (am == at)
        case2i = (am == ai) & (am != at)
        case2t = (am == at) & (am != ai)
        case3 = ~(case1 | case2i | case2t)
        combined = torch.where(
            case1[:, None], (zm + zi + zt) / 3,
            torch.where(case2i[:, None], (zm + zi) / 2, torch.where(case2t[:, None], (zm + zt) / 2, zm)),
        )
        return combined.softmax(dim=1), case1, case2i, case2t, case3

    def _project(self, out) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h_m = F.normalize(at_least_float32(self.projector_multimodal(out.features)), dim=1)
        h_i = F.normalize(at_least_float32(self.projector_imaging(out.image_shared)), dim=1)
        h_t = F.normalize(at_least_float32(self.projector_tabular(out.tabular_shared)), dim=1)
        return h_m, h_i, h_t

    def functional_parameter_use(self) -> str | None:
        if self.args.club_standard:
            return "with club_standard evaluates the CLUB estimators on detached weights (torch.func.functional_call)"
        return None

    def _club(self, estimator: CLUBMean, u: torch.Tensor, v: torch.Tensor):
        u, v = at_least_float32(u), at_least_float32(v)
        if not self.args.club_standard:
            return club_terms(at_least_float32(estimator(u)), v)  # original: one loss, gradients everywhere
        _, nll = club_terms(at_least_float32(estimator(u.detach())), v.detach())  # trains only the estimator
        frozen = {name: p.detach() for name, p in estimator.named_parameters()}
        bound, _ = club_terms(at_least_float32(torch.func.functional_call(estimator, frozen, (u,))), v)  # trains only the features
        return bound, nll

    def _contrastive(self, h_i: torch.Tensor, h_t: torch.Tensor) -> torch.Tensor:
        logits = F.normalize(h_i, dim=1) @ F.normalize(h_t, dim=1).T / self.args.temperature
        target = torch.arange(logits.shape[0], device=logits.device)
        lam = self.args.lambda_0
        return lam * F.cross_entropy(logits, target) + (1 - lam) * F.cross_entropy(logits.T, target)

    @staticmethod
    def routes(case1, case2i, case2t, case3, r):
        """Which unlabelled rows train each head: (multimodal, image, tabular)."""
        return case1, case1 | case2t | (case3 & r), case1 | case2i | (case3 & ~r)

    @staticmethod
    def pgls(p, p_tilde, features_u, prototypes, rho: float, temperature: float, threshold: float):
        """PGLS: (p_bar, p_hat, mask, q) with q = softmax(h P^T / tau)."""
        q = (features_u @ prototypes.T / temperature).softmax(dim=1)
        p_bar = rho * p + (1 - rho) * q
        p_hat = rho * p_tilde + (1 - rho) * q
        mask = (p_hat.max(dim=1).values >= threshold).to(p_bar.dtype)
        return p_bar, p_hat, mask, q

    @torch.no_grad()
    def accumulate_prototypes(self, features: torch.Tensor, y_hat: torch.Tensor, num_labeled: int, state: TrainState) -> None:
        """Confident rows (max y_hat >= th1) add their (teacher) feature to their argmax class;
        the first ``num_labeled`` rows count 1/R. Summed over processes with ``state.reduce_sum``."""
        confident = (y_hat.max(dim=1).values >= self.args.th1).to(features.dtype)
        onehot = one_hot(y_hat.argmax(dim=1), y_hat.shape[1], features.dtype) * confident[:, None]
        onehot[:num_labeled] = onehot[:num_labeled] / self.repeat_ratio
        sums = state.reduce_sum(onehot.T @ features)
        counts = state.reduce_sum(onehot.sum(dim=0)[:, None])
        self.prototypes_sum += sums.to(self.prototypes_sum.dtype)
        self.prototypes_count_sum += counts.to(self.prototypes_count_sum.dtype)

    # ------------------------------------------------------------------ the step
    def compute_terms(self, labeled: dict, unlabeled: dict, state: TrainState):
        """-> (terms, logs): every loss term as a live tensor (tests take gradients of each) and the
        detached logs. Also updates the teacher (once per step) and the prototype sums."""
        a = self.args
        key = next(iter(self.labeled_views))
        inputs, (n_l, n_u) = concat_views([model_inputs(labeled[key]), model_inputs(unlabeled[key])])
        y = labeled["labels"]
        active = self.unlabeled_terms_on(state)

        # student (train mode), projections
        out = self.model(**inputs)
        h_m, h_i, h_t = self._project(out)

        # teacher: EMA update first (student weights of the previous optimizer step, BN statistics
        # after this forward), then an eval-mode forward on the same tensors
        with torch.no_grad():
            if self.ema is not None:
                if self._ema_step_host is None:  # first step of this process (fresh or resumed): one read
                    self._ema_step_host = int(self.ema_step)
                if self._ema_step_host != state.step:
                    self.update_ema("ema", state)
                    self.ema_step.fill_(state.step)
                    self._ema_step_host = state.step
                t_out = self.ema(**inputs)
            else:
                t_out = out
            zm_T, zi_T, zt_T = (at_least_float32(t.detach()) for t in (t_out.logits, t_out.image_logits, t_out.tabular_logits))
            hT_m = F.normalize(at_least_float32(self.projector_multimodal(t_out.features.detach())), dim=1)  # student's g_m

        # (a) supervised CE of the three heads on labelled rows
        zm, zi, zt = at_least_float32(out.logits), at_least_float32(out.image_logits), at_least_float32(out.tabular_logits)
        terms = {
            "sup_loss_multimodal": F.cross_entropy(zm[:n_l], y),
            "sup_loss_image": F.cross_entropy(zi[:n_l], y),
            "sup_loss_tabular": F.cross_entropy(zt[:n_l], y),
        }
        # (c) DCC: contrastive consistency of the shared features; (d) CLUB on pre-interaction specific
        terms["loss_cc"] = self._contrastive(h_i, h_t)
        terms["club_bound_image"], terms["club_estimator_image"] = self._club(self.CLUB_imaging, out.image_specific_pre, out.image_shared)
        terms["club_bound_tabular"], terms["club_estimator_tabular"] = self._club(self.CLUB_tabular, out.tabular_specific_pre, out.tabular_shared)

        # CGPL + PGLS on the unlabelled rows (teacher, no gradient)
        with torch.no_grad():
            p, case1, case2i, case2t, case3 = self.cgpl(zm_T[n_l:], zi_T[n_l:], zt_T[n_l:])
            prototypes = self.prototypes.to(hT_m.dtype)
            p_tilde = zm_T[n_l:].softmax(dim=1)
            if self.DA is not None:
                p_tilde = self.DA(p_tilde, state).to(p_tilde.dtype)
            p_bar, p_hat, mask, _ = self.pgls(p, p_tilde, hT_m[n_l:], prototypes, a.rate_pseudo, a.temperature, a.th1)
            route_m, route_i, route_t = self.routes(case1, case2i, case2t, case3, self._coin_flips(n_u, p_bar.device))

        # (b) unlabelled CE, each head's routed rows, normalised by B_u
        terms["unsup_loss_multimodal"] = (mask * route_m * soft_cross_entropy(zm[n_l:], p_bar)).mean()
        terms["unsup_loss_image"] = (mask * route_i * soft_cross_entropy(zi[n_l:], p_bar)).mean()
        terms["unsup_loss_tabular"] = (mask * route_t * soft_cross_entropy(zt[n_l:], p_bar)).mean()

        # (e) prototype loss on student features against the detached prototypes
        with torch.no_grad():
            y_hat = torch.cat([one_hot(y, p_bar.shape[1], p_hat.dtype), p_hat if active else torch.zeros_like(p_hat)])
            confident = y_hat.max(dim=1).values >= a.th1
            hard = y_hat.argmax(dim=1)
        probs_pt = (h_m @ prototypes.T / a.temperature).softmax(dim=1)
        terms["loss_pt"] = (confident * -torch.log(probs_pt.gather(1, hard[:, None]).squeeze(1) + 1e-7)).mean()

        # prototype sums from teacher features, all rows of the step
        self.accumulate_prototypes(hT_m, y_hat, n_l, state)

        logs = {k: v.detach() for k, v in terms.items()}
        logs["sup_loss"] = logs["sup_loss_multimodal"] + logs["sup_loss_image"] + logs["sup_loss_tabular"]
        logs["loss_ds"] = sum(logs[f"club_{part}_{mod}"] for part in ("bound", "estimator") for mod in ("image", "tabular"))
        logs["unsup_loss"] = logs["unsup_loss_multimodal"] + logs["unsup_loss_image"] + logs["unsup_loss_tabular"]
        logs["unsup_active"] = torch.tensor(float(active))
        for name, case in (("cgpl_case1", case1), ("cgpl_case2_image", case2i), ("cgpl_case2_tabular", case2t), ("cgpl_case3", case3)):
            logs[name] = case.float().mean()
        logs.update(pseudo_label_logs(p_bar.argmax(dim=1), mask, unlabeled.get("monitor_labels")))
        return terms, logs

    def training_step(self, labeled: dict, unlabeled: dict, state: TrainState):
        a = self.args
        terms, logs = self.compute_terms(labeled, unlabeled, state)
        loss_ce = terms["sup_loss_multimodal"] + terms["sup_loss_image"] + terms["sup_loss_tabular"]
        loss_ds = terms["club_bound_image"] + terms["club_estimator_image"] + terms["club_bound_tabular"] + terms["club_estimator_tabular"]
        loss_uce = terms["unsup_loss_multimodal"] + terms["unsup_loss_image"] + terms["unsup_loss_tabular"]
        loss = a.alpha * loss_ce + a.beta * terms["loss_cc"] + a.gamma * loss_ds
        # L_pt and L_uce switch on after start_epoch
        loss = self.gated_loss(loss, [a.rate_pt * terms["loss_pt"], a.rate_uce * loss_uce], state, logs)
        return loss, logs

    # ------------------------------------------------------------------ hooks
    @torch.no_grad()
    def on_epoch_end(self, state: TrainState) -> dict[str, torch.Tensor]:
        """P = sums / counts for classes with a contribution; the others keep their prototype."""
        counts = self.prototypes_count_sum
        filled = counts > 0
        self.prototypes.copy_(torch.where(filled, self.prototypes_sum / counts.clamp_min(1e-12), self.prototypes))
        self.prototypes_sum.zero_()
        self.prototypes_count_sum.zero_()
        return {"prototypes_empty": (~filled).sum().float()}

    @torch.no_grad()
    def evaluation_step(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        out = model(**self.eval_inputs(batch))
        return {"logits": out.logits, "image_logits": out.image_logits, "tabular_logits": out.tabular_logits}
