"""Configuration of TIP's pretraining network (``TipConfig``, model_type ``tip``; siyi-wind/TIP,
ECCV 2024). Shares the image/tabular fields and the dvm / cardiac / tiny presets with STiL
(``TabularImageConfig``)."""

from __future__ import annotations

from typing import Optional

from .configuration_stil import TabularImageConfig


class TipConfig(TabularImageConfig):
    """encoder_imaging (timm), projector_imaging, encoder_tabular, projector_tabular,
    encoder_multimodal (cross-attention), predictor_tabular (masked reconstruction), itm_head."""

    model_type = "tip"

    hidden_size: int = 512  # the original multimodal_embedding_dim
    multimodal_num_layers: int = 4
    multimodal_num_heads: int = 8
    multimodal_mlp_ratio: float = 4.0
    projection_dim: int = 128
    # hidden width of the SimCLR heads; None = input width (the original: embedding_dim for the image
    # head, which equals the ResNet-50 feature width 2048, and tabular_embedding_dim for the table)
    image_projector_hidden_dim: Optional[int] = None
    tabular_projector_hidden_dim: Optional[int] = None

    _preset_overrides = {"tiny": {"multimodal_num_layers": 2, "multimodal_num_heads": 4, "projection_dim": 16}}
