"""Supervised / SSL baseline networks: image-only, tabular-only and multimodal classifiers.

All three follow the model input contract (docs/architecture.md) and return `BaselineOutput`.
Sub-module names follow the originals so their checkpoints map 1:1:

* `ImageClassifier` (docs/methods.md, "supervised", the Match family's image-only wrapper):
  ``encoder_imaging`` (timm) -> pooled feature -> ``classifier`` Linear(C_img -> classes);
  ``head`` Linear(C_img -> projection_hidden_dim)-ReLU-Linear(-> projection_dim), L2-normalised into
  ``projections``.
* `TabularClassifier`: ``encoder_tabular`` (TIP's tabular transformer) -> CLS -> ``classifier``;
  ``head`` MLP on the CLS as above.
* `MultimodalClassifier`:
  - ``fusion="concat"`` (Multimodal SimMatch/CoMatch/FreeMatch): h = [``image_proj``(pooled);
    ``tabular_proj``(CLS)] (``tabular_proj`` is Identity when widths match), ``classifier_multimodal``
    Linear(h), ``head`` MLP(h) -> normalised ``projections``; ``features`` = h.
  - ``fusion="concat", unimodal_heads=True`` (the MMatch / co-training network):
    x_m = ``multimodal_proj``(h) (Linear to ``fused_dim``, no nonlinearity), ``classifier_multimodal``
    on x_m (z_m), ``classifier_imaging`` on the pooled image feature (z_i), ``classifier_tabular`` on
    the tabular CLS (z_t); ``features`` = x_m. No projection head.
  - ``fusion="tip"`` (docs/models.md, "Baselines", TIP downstream): ``encoder_multimodal`` (TIP's cross-attention
    encoder from modeling_stil.encoders: tabular tokens attend to projected image tokens) -> fused CLS
    -> ``classifier_multimodal``; ``unimodal_heads=True`` adds the TIPBackboneEnsemble image/tabular heads.

Weight initialisation (modeling_common.StilPreTrainedModel) goes through ``encoders.init_module_weights``: timm modules keep timm's
initialisation (and any pretrained weights loaded afterwards), TIP modules get TIP's, our heads
PyTorch's defaults (as in the originals).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from .configuration_baselines import (
    ImageClassifierConfig,
    MultimodalClassifierConfig,
    TabularClassifierConfig,
)
from .encoders import LinearHead, MultimodalCrossEncoder, TwoLayerMLP
from .modeling_common import StilPreTrainedModel


@dataclass
class BaselineOutput(ModelOutput):
    """Outputs of the baseline classifiers (pieces a model does not have stay None)."""

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None  # main (fused, for multimodal) prediction
    image_logits: torch.FloatTensor | None = None  # unimodal heads (multimodal with unimodal_heads)
    tabular_logits: torch.FloatTensor | None = None
    features: torch.FloatTensor | None = None  # representation the classifier reads (fused for multimodal)
    projections: torch.FloatTensor | None = None  # L2-normalised projection-head embedding (Match family)
    image_features: torch.FloatTensor | None = None  # pooled image feature
    tabular_features: torch.FloatTensor | None = None  # tabular CLS


def _projection_head(config, in_dim: int):
    if not config.projection_dim:
        return None
    hidden = config.projection_hidden_dim or in_dim
    return TwoLayerMLP(in_dim, hidden, config.projection_dim)


class BaselinePreTrainedModel(StilPreTrainedModel):
    """Weight init, data check, loss and encoder builders come from modeling_common.StilPreTrainedModel."""

    base_model_prefix = "stil_baseline"

    def _loss(self, logits, labels):
        return self.compute_loss(logits, labels)

    def _dropout(self, x):
        p = self.config.classifier_dropout
        return F.dropout(x, p, self.training) if p > 0 else x


class ImageClassifier(BaselinePreTrainedModel):
    config_class = ImageClassifierConfig
    input_modalities = ("image",)
    _extra_auto_classes = ("AutoModelForImageClassification",)

    def __init__(self, config: ImageClassifierConfig):
        super().__init__(config)
        self.encoder_imaging = self._build_image_encoder()
        dim = self.encoder_imaging.feature_dim
        self.classifier = LinearHead(dim, config.num_labels)
        self.head = _projection_head(config, dim)
        self.post_init()

    def forward(self, pixel_values=None, labels=None, return_dict=None, **unused) -> BaselineOutput:
        if pixel_values is None:
            raise ValueError("ImageClassifier needs pixel_values")
        _, pooled = self.encoder_imaging(pixel_values)
        logits = self.classifier(self._dropout(pooled))
        projections = F.normalize(self.head(pooled), dim=-1) if self.head is not None else None
        return BaselineOutput(
            loss=self._loss(logits, labels), logits=logits, features=pooled, projections=projections,
            image_features=pooled,
        )


class TabularClassifier(BaselinePreTrainedModel):
    config_class = TabularClassifierConfig
    main_input_name = "continuous_values"
    input_modalities = ("tabular",)

    def __init__(self, config: TabularClassifierConfig):
        super().__init__(config)
        self.encoder_tabular = self._build_tabular_encoder()
        dim = config.tabular_embedding_dim
        self.classifier = LinearHead(dim, config.num_labels)
        self.head = _projection_head(config, dim)
        self.post_init()

    def forward(self, categorical_values=None, continuous_values=None, missing_mask=None, labels=None, return_dict=None, **unused) -> BaselineOutput:
        cls = self.encoder_tabular(categorical_values, continuous_values, missing_mask)[:, 0]
        logits = self.classifier(self._dropout(cls))
        projections = F.normalize(self.head(cls), dim=-1) if self.head is not None else None
        return BaselineOutput(
            loss=self._loss(logits, labels), logits=logits, features=cls, projections=projections,
            tabular_features=cls,
        )


class MultimodalClassifier(BaselinePreTrainedModel):
    config_class = MultimodalClassifierConfig
    input_modalities = ("image", "tabular")

    def __init__(self, config: MultimodalClassifierConfig):
        super().__init__(config)
        c = config
        self.encoder_imaging = self._build_image_encoder()
        self.encoder_tabular = self._build_tabular_encoder()
        image_dim = self.encoder_imaging.feature_dim
        tab_dim = c.tabular_embedding_dim
        self.head = None
        if c.fusion == "concat":
            # Match family: image_proj to the tabular width, tabular_proj Identity (widths equal).
            self.image_proj = nn.Linear(image_dim, tab_dim)
            self.tabular_proj = nn.Identity()
            concat_dim = 2 * tab_dim
            if c.unimodal_heads:
                self.multimodal_proj = nn.Linear(concat_dim, c.fused_dim)
                fused_dim = c.fused_dim
            else:
                fused_dim = concat_dim
                self.head = _projection_head(c, concat_dim)
        else:
            self.encoder_multimodal = MultimodalCrossEncoder(
                image_dim, tab_dim, dim=c.multimodal_embedding_dim, num_layers=c.fusion_num_layers,
                num_heads=c.fusion_num_heads, mlp_ratio=c.tabular_mlp_ratio,
            )
            fused_dim = c.multimodal_embedding_dim
            self.head = None if c.unimodal_heads else _projection_head(c, fused_dim)
        self.fused_dim = fused_dim
        self.classifier_multimodal = LinearHead(fused_dim, c.num_labels)
        if c.unimodal_heads:
            self.classifier_imaging = LinearHead(image_dim, c.num_labels)
            self.classifier_tabular = LinearHead(tab_dim, c.num_labels)
        self.post_init()

    def forward(
        self, pixel_values=None, categorical_values=None, continuous_values=None, missing_mask=None, labels=None,
        return_dict=None, **unused,
    ) -> BaselineOutput:
        if pixel_values is None:
            raise ValueError("MultimodalClassifier needs pixel_values and the tabular inputs")
        image_tokens, image_pooled = self.encoder_imaging(pixel_values)
        tabular_tokens = self.encoder_tabular(categorical_values, continuous_values, missing_mask)
        tabular_cls = tabular_tokens[:, 0]
        if self.config.fusion == "concat":
            h = torch.cat([self.image_proj(image_pooled), self.tabular_proj(tabular_cls)], dim=-1)
            fused = self.multimodal_proj(h) if self.config.unimodal_heads else h
        else:
            fused = self.encoder_multimodal(tabular_tokens, image_tokens)[:, 0]
        logits = self.classifier_multimodal(self._dropout(fused))
        image_logits = tabular_logits = None
        if self.config.unimodal_heads:
            image_logits = self.classifier_imaging(self._dropout(image_pooled))
            tabular_logits = self.classifier_tabular(self._dropout(tabular_cls))
        loss = self._loss(logits, labels)
        if loss is not None and image_logits is not None and self.config.unimodal_loss_weight:
            w = self.config.unimodal_loss_weight
            loss = loss + w * (self._loss(image_logits, labels) + self._loss(tabular_logits, labels))
        projections = F.normalize(self.head(fused), dim=-1) if self.head is not None else None
        return BaselineOutput(
            loss=loss, logits=logits, image_logits=image_logits, tabular_logits=tabular_logits, features=fused,
            projections=projections, image_features=image_pooled, tabular_features=tabular_cls,
        )


ImageClassifierConfig.register_for_auto_class()
TabularClassifierConfig.register_for_auto_class()
MultimodalClassifierConfig.register_for_auto_class()
ImageClassifier.register_for_auto_class("AutoModel")
TabularClassifier.register_for_auto_class("AutoModel")
MultimodalClassifier.register_for_auto_class("AutoModel")
