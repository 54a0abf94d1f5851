"""TIP's pretraining network as a transformers model (``TipModel``; siyi-wind/TIP
``TIP3Loss``/``Pretraining`` modules). The three losses (ITC, ITM with hard negatives, masked
tabular reconstruction) belong to the TIP method; this model exposes the pieces they need, both
through ``forward`` and through the building-block methods (``encode_image``, ``encode_tabular``,
``fuse``, ``itm_logits``, ``reconstruct``) a method calls for its negative pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from transformers.utils import ModelOutput

from .configuration_tip import TipConfig
from .encoders import LinearHead, MultimodalCrossEncoder, SimCLRProjectionHead, TabularPredictor
from .modeling_stil import TabularImagePreTrainedModel


@dataclass
class TipOutput(ModelOutput):
    """image_tokens (B, N, C_img) last-stage tokens; image_pooled (B, C_img) average-pooled;
    image_projection (B, P) = projector_imaging(image_pooled) (not normalised);
    tabular_tokens (B, 1+F, d) (row 0 = CLS); tabular_projection (B, P) = projector_tabular(CLS);
    multimodal_tokens (B, 1+F, d) from encoder_multimodal; multimodal_cls (B, d) its row 0;
    cat_logits (B, n_cat, Σcat) over all category slots; con_predictions (B, n_con);
    itm_logits (B, 2) image-table matching."""

    loss: Optional[torch.FloatTensor] = None
    image_tokens: Optional[torch.FloatTensor] = None
    image_pooled: Optional[torch.FloatTensor] = None
    image_projection: Optional[torch.FloatTensor] = None
    tabular_tokens: Optional[torch.FloatTensor] = None
    tabular_projection: Optional[torch.FloatTensor] = None
    multimodal_tokens: Optional[torch.FloatTensor] = None
    multimodal_cls: Optional[torch.FloatTensor] = None
    cat_logits: Optional[torch.FloatTensor] = None
    con_predictions: Optional[torch.FloatTensor] = None
    itm_logits: Optional[torch.FloatTensor] = None


class TipModel(TabularImagePreTrainedModel):
    config_class = TipConfig
    _needs_labels = False

    def __init__(self, config: TipConfig):
        super().__init__(config)
        self.encoder_imaging = self._build_image_encoder(config)
        image_dim = self.encoder_imaging.feature_dim
        tab_dim = config.tabular_embedding_dim
        self.projector_imaging = SimCLRProjectionHead(
            image_dim, config.image_projector_hidden_dim or image_dim, config.projection_dim
        )
        self.encoder_tabular = self._build_tabular_encoder(config)
        self.projector_tabular = SimCLRProjectionHead(
            tab_dim, config.tabular_projector_hidden_dim or tab_dim, config.projection_dim
        )
        self.encoder_multimodal = MultimodalCrossEncoder(
            image_dim,
            tab_dim,
            config.hidden_size,
            config.multimodal_num_layers,
            config.multimodal_num_heads,
            config.multimodal_mlp_ratio,
            init_std=config.initializer_range,
        )
        self.predictor_tabular = TabularPredictor(
            config.hidden_size, len(config.cat_cardinalities), sum(config.cat_cardinalities), init_std=config.initializer_range
        )
        self.itm_head = LinearHead(config.hidden_size, 2)
        self.post_init()

    # building blocks ---------------------------------------------------------------------------
    def encode_image(self, pixel_values):
        """-> (tokens (B, N, C), pooled (B, C), projection (B, P))."""
        tokens, pooled = self.encoder_imaging(pixel_values)
        return tokens, pooled, self.projector_imaging(pooled)

    def encode_tabular(self, categorical_values=None, continuous_values=None, missing_mask=None):
        """-> (tokens (B, 1+F, d), projection of CLS (B, P)). ``missing_mask`` = TIP's mask and
        mask_special (masked fields use the mask token and are hidden as attention keys)."""
        tokens = self.encoder_tabular(categorical_values, continuous_values, missing_mask)
        return tokens, self.projector_tabular(tokens[:, 0])

    def fuse(self, tabular_tokens, image_tokens):
        return self.encoder_multimodal(tabular_tokens, image_tokens)

    def itm_logits(self, multimodal_tokens):
        return self.itm_head(multimodal_tokens[:, 0])

    def reconstruct(self, multimodal_tokens):
        return self.predictor_tabular(multimodal_tokens)

    def _forward(self, pixel_values, categorical_values, continuous_values, missing_mask, labels) -> TipOutput:
        out = TipOutput()
        has_tab = categorical_values is not None or continuous_values is not None
        if pixel_values is not None:
            out.image_tokens, out.image_pooled, out.image_projection = self.encode_image(pixel_values)
        if has_tab:
            out.tabular_tokens, out.tabular_projection = self.encode_tabular(
                categorical_values, continuous_values, missing_mask
            )
        if pixel_values is not None and has_tab:
            out.multimodal_tokens = self.fuse(out.tabular_tokens, out.image_tokens)
            out.multimodal_cls = out.multimodal_tokens[:, 0]
            out.itm_logits = self.itm_head(out.multimodal_cls)
            out.cat_logits, out.con_predictions = self.reconstruct(out.multimodal_tokens)
        if pixel_values is None and not has_tab:
            raise ValueError("TipModel needs pixel_values and/or tabular values")
        return out


TipConfig.register_for_auto_class()
TipModel.register_for_auto_class("AutoModel")
