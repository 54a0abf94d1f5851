"""STiL's network as a transformers model (``StilModel``), plus the base class of our image + tabular
models (``TabularImagePreTrainedModel``, on modeling_common's ``StilPreTrainedModel``: weight init that
keeps timm/TIP initialisation, data checks, task loss, encoder builders).

The model knows nothing of semi-supervised learning: STiL's projectors, CLUB estimators, prototypes
and EMA teacher belong to the method (modeling_stil/methods), not here. Parameter names follow
siyi-wind/STiL's ``DisCoAttentionBackbone`` so original checkpoints load 1:1
(modeling_stil/convert_original.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
from transformers.utils import ModelOutput

from .configuration_stil import StilConfig, TabularImageConfig
from .encoders import InteractionLayer, LinearHead, TwoLayerMLP
from .modeling_common import StilPreTrainedModel


class TabularImagePreTrainedModel(StilPreTrainedModel):
    """Base of our image + tabular models (STiL, TIP): the shared base (weight init, data check, loss,
    encoder builders; modeling_common.py) plus the shared forward signature and TIP-weight loading."""

    config_class = TabularImageConfig
    base_model_prefix = "stil"
    input_modalities = ("image", "tabular")
    _strict_data_check = False  # compare what the data states (a TIP checkpoint meets data without labels)

    def forward(
        self,
        pixel_values: Optional[torch.Tensor] = None,
        categorical_values: Optional[torch.Tensor] = None,
        continuous_values: Optional[torch.Tensor] = None,
        missing_mask: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        return_dict: Optional[bool] = None,
        **kwargs,
    ) -> ModelOutput:
        out = self._forward(pixel_values, categorical_values, continuous_values, missing_mask, labels)
        return out if return_dict is not False else out.to_tuple()

    def _forward(self, pixel_values, categorical_values, continuous_values, missing_mask, labels) -> ModelOutput:
        raise NotImplementedError

    def load_image_pretrained(self, source: str) -> None:
        """Load pretrained image-backbone weights (local file or timm hub name) after construction."""
        self.encoder_imaging.load_pretrained_weights(source)
        self.config.image_pretrained = source

    def load_tip_encoders(self, state_dict: dict, prefix: str = "") -> None:
        """Initialise ``encoder_imaging`` and ``encoder_tabular`` from a TIP state dict (keys
        ``encoder_imaging.*``/``encoder_tabular.*`` after ``prefix``), strictly, as STiL does
        (keys containing ``projection_head`` or ``prototypes`` are skipped like the original)."""
        for name in ("encoder_imaging", "encoder_tabular"):
            start = f"{prefix}{name}."
            part = {
                k[len(start) :]: v
                for k, v in state_dict.items()
                if k.startswith(start) and "projection_head" not in k and "prototypes" not in k
            }
            if not part:
                raise KeyError(f"no {start}* keys in the TIP state dict")
            module = getattr(self, name)
            own = module.state_dict()
            wrong = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in part.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
            if wrong:
                raise ValueError(f"{name}: tensors that do not fit this model: {wrong[:10]}")
            module.load_state_dict(part, strict=True)


@dataclass
class StilOutput(ModelOutput):
    """Outputs of ``StilModel``. Feature names follow the paper (code names in brackets).

    loss: L_ce = CE(logits) + CE(image_logits) + CE(tabular_logits) when labels are given.
    logits: multimodal head p^m (out_m). image_logits: p^i (out_i). tabular_logits: p^t (out_t).
    features: [ẑ_c^i ; ẑ_s ; ẑ_c^t] (B, 3·hidden), the multimodal head's input.
    image_specific: ẑ_c^i, image-specific tokens after interaction, pooled (x_si_enhance).
    image_specific_pre: pooled image-specific tokens before interaction (CLUB input).
    image_shared: z_s^i (x_ai). tabular_specific / tabular_specific_pre / tabular_shared likewise
    (x_st_enhance, mean(x_st), x_at). fused_shared: ẑ_s (x_c) after interaction.
    """

    loss: Optional[torch.FloatTensor] = None
    logits: Optional[torch.FloatTensor] = None
    image_logits: Optional[torch.FloatTensor] = None
    tabular_logits: Optional[torch.FloatTensor] = None
    features: Optional[torch.FloatTensor] = None
    image_specific: Optional[torch.FloatTensor] = None
    image_specific_pre: Optional[torch.FloatTensor] = None
    image_shared: Optional[torch.FloatTensor] = None
    tabular_specific: Optional[torch.FloatTensor] = None
    tabular_specific_pre: Optional[torch.FloatTensor] = None
    tabular_shared: Optional[torch.FloatTensor] = None
    fused_shared: Optional[torch.FloatTensor] = None


class StilModel(TabularImagePreTrainedModel):
    """STiL's backbone: φ^i (timm), φ^t (TIP tabular transformer), disentangling MLPs
    (projection_si/ai/st/at), fusion ``reduce``, interaction layer(s) ``transformer.{i}`` and the
    three classifiers. Needs both modalities."""

    config_class = StilConfig

    def __init__(self, config: StilConfig):
        super().__init__(config)
        d = config.hidden_size
        self.encoder_imaging = self._build_image_encoder(config)
        self.encoder_tabular = self._build_tabular_encoder(config)
        image_dim = self.encoder_imaging.feature_dim
        tab_dim = config.tabular_embedding_dim
        self.projection_si = TwoLayerMLP(image_dim, d, d)
        self.projection_ai = TwoLayerMLP(image_dim, d, d)
        self.projection_st = TwoLayerMLP(tab_dim, tab_dim, d)
        self.projection_at = TwoLayerMLP(tab_dim, tab_dim, d)
        self.reduce = nn.Linear(2 * d, d)
        self.transformer = nn.ModuleList(
            InteractionLayer(
                d,
                config.interaction_num_heads,
                config.interaction_mlp_ratio,
                config.interaction_qkv_bias,
                config.interaction_attn_drop,
                config.interaction_proj_drop,
                config.interaction_drop_path,
            )
            for _ in range(config.interaction_num_layers)
        )
        self.classifier_multimodal = LinearHead(3 * d, config.num_labels)
        self.classifier_imaging = LinearHead(2 * d, config.num_labels)
        self.classifier_tabular = LinearHead(2 * d, config.num_labels)
        self.post_init()

    def _forward(self, pixel_values, categorical_values, continuous_values, missing_mask, labels) -> StilOutput:
        if pixel_values is None:
            raise ValueError("StilModel needs pixel_values (both modalities)")
        image_tokens, _ = self.encoder_imaging(pixel_values)
        tab_tokens = self.encoder_tabular(categorical_values, continuous_values, missing_mask)

        x_si = self.projection_si(image_tokens)
        x_ai = self.projection_ai(image_tokens.mean(dim=1))
        x_st = self.projection_st(tab_tokens[:, 1:])
        x_at = self.projection_at(tab_tokens[:, 0])
        x_c = self.reduce(torch.cat([x_ai, x_at], dim=1)).unsqueeze(1)
        si_pre, st_pre = x_si.mean(dim=1), x_st.mean(dim=1)
        for layer in self.transformer:
            x_si, x_st, x_c = layer(x_si, x_st, x_c)
        z_i, z_t, z_c = x_si.mean(dim=1), x_st.mean(dim=1), x_c.mean(dim=1)

        features = torch.cat([z_i, z_c, z_t], dim=1)
        logits = self.classifier_multimodal(features)
        image_logits = self.classifier_imaging(torch.cat([z_i, x_ai], dim=1))
        tabular_logits = self.classifier_tabular(torch.cat([z_t, x_at], dim=1))

        loss = None
        if labels is not None:
            loss = (
                self.compute_loss(logits, labels)
                + self.compute_loss(image_logits, labels)
                + self.compute_loss(tabular_logits, labels)
            )
        return StilOutput(
            loss=loss,
            logits=logits,
            image_logits=image_logits,
            tabular_logits=tabular_logits,
            features=features,
            image_specific=z_i,
            image_specific_pre=si_pre,
            image_shared=x_ai,
            tabular_specific=z_t,
            tabular_specific_pre=st_pre,
            tabular_shared=x_at,
            fused_shared=z_c,
        )


StilConfig.register_for_auto_class()
StilModel.register_for_auto_class("AutoModel")
