"""`tip_pretrain`: TIP's self-supervised pretraining (Du et al., ECCV 2024; siyi-wind/TIP ``TIP3Loss``),
the stage STiL starts from. Reference: docs/methods.md, "tip_pretrain".

No label is read: the stream iterates over every train row (``label_free``). Per row, one augmented
image x (augmented with probability ``augmentation_rate``), the row with 30 % of its fields replaced
from the column marginals (t~), the row with 50 % of its fields masked (t^m), and the clean row t::

    z_I = norm(g_I(pool(f_I(x))))      z_T = norm(g_T(CLS(f_T(t~))))          S = z_I z_T^T / tau
    L_itc = lambda_0 CE(S, diag) + (1 - lambda_0) CE(S^T, diag)
    hard negatives (no gradient): table j ~ softmax(S[b]) + 1e-4 with j != b; image i ~ softmax(S^T[b]) + 1e-4
    L_itm = CE(itm(M(f_T(t~), f_I(x))), 1) over the B positives and 2B negatives (mean over 3B pairs)
    L_mtr = (mean over masked categorical cells of CE(cat logits, t) + mean over masked continuous
             cells of (prediction - t)^2) / 2,  predictions from M(f_T(t^m), f_I(x))
    loss  = (L_itc + L_itm + L_mtr) / 3

Decisions (docs/methods.md "## tip_pretrain"):

* Negatives come from this process's batch (the original trains on one GPU); under DDP each process
  samples among its own rows. Gathering would change the negatives' distribution with the number of
  processes.
* The multinomial draws use the global torch RNG (checkpointed, so a resumed run draws the same).
* Validation (deterministic): the clean image and row for ITC / ITM, the masked row for MTR, and the
  hardest negative (argmax instead of a draw) for ITM. Per-sample losses are averaged over the split;
  ``loss`` selects the best checkpoint (lower is better).
* The probe (``probe_features``) uses the multimodal CLS of the clean inputs, the representation TIP
  fine-tunes and STiL starts from; after training the job fits ``training.probe.linear_probe_accuracy`` a logistic regression on labelled
  train rows and scores held-out rows, so a user sees whether the encoders are useful.

Logs: ``loss_itc``, ``loss_itm``, ``loss_mtr`` (= mean of ``loss_mtr_cat`` and ``loss_mtr_con``),
``itm_accuracy`` (positives and negatives), ``itc_accuracy`` (image->table top-1), ``mtr_cat_accuracy``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .base import MethodArguments, SSLMethod, TrainState, register_method
from .common import at_least_float32


@dataclass
class TipPretrainArguments(MethodArguments):
    temperature: float = 0.1  # tau of the contrastive logits
    lambda_0: float = 0.5  # weight of the image->table direction of L_itc
    weight_itc: float = 1.0  # the original averages the three losses: (L_itc + L_itm + L_mtr) / 3
    weight_itm: float = 1.0
    weight_mtr: float = 1.0

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError("temperature must be positive")
        if not 0.0 <= self.lambda_0 <= 1.0:
            raise ValueError("lambda_0 must be in [0, 1]")


def contrastive_loss(z_i: torch.Tensor, z_t: torch.Tensor, temperature: float, lambda_0: float,
                     reduction: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP loss of normalised embeddings; returns (loss, similarity logits S)."""
    logits = F.normalize(z_i, dim=1) @ F.normalize(z_t, dim=1).T / temperature
    target = torch.arange(logits.shape[0], device=logits.device)
    loss = lambda_0 * F.cross_entropy(logits, target, reduction=reduction) + (1 - lambda_0) * F.cross_entropy(
        logits.T, target, reduction=reduction)
    return loss, logits


@torch.no_grad()
def hard_negatives(similarity: torch.Tensor, sample: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """TIP's hard negatives from the (B, B) similarity logits: for each image a table index and for
    each table an image index, drawn from softmax(row) + 1e-4 with the positive excluded (or the
    argmax when ``sample`` is False). Never returns the positive (needs B >= 2)."""
    if similarity.shape[0] < 2:
        raise ValueError("image-table matching needs at least 2 rows per batch for a negative")
    eye = torch.eye(similarity.shape[0], dtype=torch.bool, device=similarity.device)

    def pick(s):
        weights = (at_least_float32(s).softmax(dim=1) + 1e-4).masked_fill(eye, 0.0)
        return torch.multinomial(weights, 1).squeeze(1) if sample else weights.argmax(dim=1)

    return pick(similarity), pick(similarity.T)


def reconstruction_loss(cat_logits, con_predictions, categorical, continuous, masked_fields, offsets,
                        reduction: str = "mean"):
    """(L_cat, L_con) over the masked cells (categorical targets as global slots code + offset).
    ``reduction="none"``: per-row means (rows without a masked cell of a kind give 0)."""
    n_cat = categorical.shape[1]
    dtype = torch.float64 if torch.float64 in (cat_logits.dtype, con_predictions.dtype) else torch.float32
    mask_cat, mask_con = masked_fields[:, :n_cat].to(dtype), masked_fields[:, n_cat:].to(dtype)
    cat_ce = torch.zeros_like(mask_cat)
    if n_cat:
        targets = categorical.long() + offsets[None, :]
        cat_ce = F.cross_entropy(at_least_float32(cat_logits).transpose(1, 2), targets, reduction="none")
    con_se = (at_least_float32(con_predictions) - at_least_float32(continuous)) ** 2 if mask_con.shape[1] else torch.zeros_like(mask_con)
    if reduction == "none":
        per_row = lambda v, m: (v * m).sum(1) / m.sum(1).clamp_min(1.0)  # noqa: E731
        return per_row(cat_ce, mask_cat), per_row(con_se, mask_con)
    return (cat_ce * mask_cat).sum() / mask_cat.sum().clamp_min(1.0), (con_se * mask_con).sum() / mask_con.sum().clamp_min(1.0)


@register_method
class TipPretrain(SSLMethod):
    name = "tip_pretrain"
    model_forward_methods = ("encode_image", "encode_tabular", "fuse", "reconstruct", "itm_logits")
    arguments_class = TipPretrainArguments
    label_free = True
    labeled_views = None
    # view recipes of data_utils/views.py; the table-only ones share the image of the "image" view of the row
    unlabeled_views = {"image": "tip_image", "corrupted": "tip_corrupted_table", "masked": "tip_masked_table",
                       "clean": "tip_clean_table"}
    eval_views = {"eval": "eval", "masked": "tip_masked_table"}
    supported_tasks = ("classification", "regression", "landmarks")
    required_modalities = ("image", "tabular")
    preferred_model = "tip-tiny"
    selection = ("loss", False)
    linear_probe = True

    def __init__(self, model, args: TipPretrainArguments | None = None):
        super().__init__(model, args)
        for piece in ("encode_image", "encode_tabular", "fuse", "itm_logits", "reconstruct"):
            if not hasattr(model, piece):
                raise ValueError(
                    f"tip_pretrain needs a TipModel (image + tabular encoders, multimodal encoder, ITM and "
                    f"reconstruction heads); got {type(model).__name__}. Use --model tip-tiny or tip-dvm"
                )
        cards = list(getattr(model.config, "cat_cardinalities", []) or [])
        offsets = np.concatenate([[0], np.cumsum(cards)[:-1]]) if cards else np.zeros(0)
        self.register_buffer("cat_offsets", torch.as_tensor(offsets, dtype=torch.long), persistent=False)

    # ------------------------------------------------------------------ the losses
    def losses(self, model, image, table, masked, clean, sample_negatives: bool = True, reduction: str = "mean"):
        """Every TIP loss (and logs) for one batch of views (dicts of model inputs)."""
        a = self.args
        image_tokens, _, z_i = model.encode_image(image["pixel_values"])
        tab_tokens, z_t = model.encode_tabular(table["categorical_values"], table["continuous_values"], table.get("missing_mask"))
        loss_itc, similarity = contrastive_loss(at_least_float32(z_i), at_least_float32(z_t), a.temperature, a.lambda_0, reduction=reduction)

        neg_table, neg_image = hard_negatives(similarity.detach(), sample=sample_negatives)
        n = image_tokens.shape[0]
        pairs_tab = torch.cat([tab_tokens, tab_tokens[neg_table], tab_tokens])
        pairs_img = torch.cat([image_tokens, image_tokens, image_tokens[neg_image]])
        itm = at_least_float32(model.itm_logits(model.fuse(pairs_tab, pairs_img)))
        itm_target = torch.cat([torch.ones(n, dtype=torch.long), torch.zeros(2 * n, dtype=torch.long)]).to(itm.device)
        itm_ce = F.cross_entropy(itm, itm_target, reduction="none")
        loss_itm = itm_ce.mean() if reduction == "mean" else itm_ce.view(3, n).mean(0)

        masked_tokens, _ = model.encode_tabular(masked["categorical_values"], masked["continuous_values"], masked["missing_mask"])
        cat_logits, con_pred = model.reconstruct(model.fuse(masked_tokens, image_tokens))
        loss_cat, loss_con = reconstruction_loss(cat_logits, con_pred, clean["categorical_values"], clean["continuous_values"],
                                                 masked["masked_fields"], self.cat_offsets, reduction=reduction)
        loss_mtr = (loss_cat + loss_con) / 2
        with torch.no_grad():
            n_cat = clean["categorical_values"].shape[1]
            mask_cat = masked["masked_fields"][:, :n_cat]
            cat_hits = (cat_logits.argmax(-1) == clean["categorical_values"].long() + self.cat_offsets) & mask_cat
            logs = {
                "itm_accuracy": (itm.argmax(1) == itm_target).float().mean(),
                "itc_accuracy": (similarity.argmax(1) == torch.arange(n, device=similarity.device)).float().mean(),
                "mtr_cat_accuracy": cat_hits.sum().float() / mask_cat.sum().clamp_min(1).float(),
            }
        return {"loss_itc": loss_itc, "loss_itm": loss_itm, "loss_mtr": loss_mtr,
                "loss_mtr_cat": loss_cat, "loss_mtr_con": loss_con}, logs

    def training_step(self, labeled, unlabeled: dict, state: TrainState):
        views = {k: unlabeled[k] for k in ("image", "corrupted", "masked", "clean")}
        terms, logs = self.losses(self.model, **{"image": views["image"], "table": views["corrupted"],
                                                 "masked": views["masked"], "clean": views["clean"]})
        a = self.args
        loss = (a.weight_itc * terms["loss_itc"] + a.weight_itm * terms["loss_itm"] + a.weight_mtr * terms["loss_mtr"]) / 3
        logs.update({k: v.detach() for k, v in terms.items()})
        logs["loss"] = loss.detach()
        return loss, logs

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluation_step(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        clean = batch["eval"]
        terms, _ = self.losses(model, clean, clean, batch["masked"], clean, sample_negatives=False, reduction="none")
        a = self.args
        total = (a.weight_itc * terms["loss_itc"] + a.weight_itm * terms["loss_itm"] + a.weight_mtr * terms["loss_mtr"]) / 3
        return {"loss": total, "loss_itc": terms["loss_itc"], "loss_itm": terms["loss_itm"], "loss_mtr": terms["loss_mtr"]}

    @torch.no_grad()
    def probe_features(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """Multimodal CLS of the clean image and row (what TIP fine-tunes and STiL starts from)."""
        view = batch["eval"]
        image_tokens, _, _ = model.encode_image(view["pixel_values"])
        tab_tokens, _ = model.encode_tabular(view["categorical_values"], view["continuous_values"], view.get("missing_mask"))
        return model.fuse(tab_tokens, image_tokens)[:, 0].float()
