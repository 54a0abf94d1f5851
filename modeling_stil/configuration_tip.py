"""Configuration of TIP's pretraining network (``TipConfig``, model_type ``tip``; siyi-wind/TIP,
ECCV 2024). Shares the image/tabular fields with STiL (``TabularImageConfig``)."""

from __future__ import annotations

from typing import Optional

from .configuration_stil import (
    CARDIAC_NUM_CATEGORICAL,
    CARDIAC_NUM_CONTINUOUS,
    DVM_FIELD_LENGTHS,
    TabularImageConfig,
    layout_from_field_lengths,
    read_field_lengths,
)


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

    @classmethod
    def dvm(cls, **overrides) -> "TipConfig":
        kw = dict(field_lengths=list(DVM_FIELD_LENGTHS), image_size=128)
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def cardiac(cls, field_lengths=None, **overrides) -> "TipConfig":
        if field_lengths is None and overrides.get("tabular_schema") is None:
            raise ValueError("cardiac: pass field_lengths (list or the original .pt file) or tabular_schema")
        if isinstance(field_lengths, str):
            field_lengths = read_field_lengths(field_lengths)
        if field_lengths is not None:
            cat, n_con = layout_from_field_lengths(field_lengths)
            if (len(cat), n_con) != (CARDIAC_NUM_CATEGORICAL, CARDIAC_NUM_CONTINUOUS):
                raise ValueError(f"cardiac expects 26 categorical + 49 continuous fields, got {len(cat)} + {n_con}")
        kw = dict(field_lengths=field_lengths, image_size=128)
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def tiny(cls, **overrides) -> "TipConfig":
        kw = dict(
            image_encoder="resnet18",
            image_encoder_kwargs={"channels": [8, 16, 32, 64]},
            image_size=64,
            field_lengths=[3, 4, 1, 1, 1],
            tabular_embedding_dim=32,
            tabular_num_layers=2,
            tabular_num_heads=4,
            hidden_size=32,
            multimodal_num_layers=2,
            multimodal_num_heads=4,
            projection_dim=16,
        )
        kw.update(overrides)
        return cls(**kw)
