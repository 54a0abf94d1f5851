"""Configurations of the baseline models.

They subclass `StilBaseConfig` (configuration_common.py: the fields of the model input contract,
docs/architecture.md, and the model/data compatibility check, re-exported here under their old names):

* `ImageClassifierConfig`     image-only classifier over a timm backbone (the Match family's
                              image-only wrapper, docs/methods.md, "supervised");
* `TabularClassifierConfig`   tabular-only transformer classifier (TIP's tabular encoder + linear head);
* `MultimodalClassifierConfig` image + tabular: ``fusion="concat"`` (Match-family multimodal
                              backbone) or ``fusion="tip"`` (TIP-style cross-attention fusion,
                              docs/models.md, "Baselines"), optionally with unimodal heads (``unimodal_heads=True``:
                              the MMatch / co-training shared network of).

This file imports only transformers and configuration_common (no torch at import time) so that it runs
as remote code next to saved weights (``register_for_auto_class`` copies it and its relative imports).
"""

from __future__ import annotations

from typing import Any, Mapping

from .configuration_common import (  # noqa: F401  (re-exported: the names used to live here)
    IMAGENET_MEAN,
    IMAGENET_STD,
    PROBLEM_TYPES,
    TASK_TO_PROBLEM_TYPE,
    DataCompatibilityError,
    StilBaseConfig,
    check_data_compatibility,
    config_overrides_from_data,
    data_differences,
    schema_summary,
    schema_to_dict,
)

data_compatibility_differences = data_differences  # the old name


class ImageClassifierConfig(StilBaseConfig):
    """Image-only classifier: timm backbone -> pooled feature -> linear classifier (+ projection head)."""

    model_type = "stil_image_classifier"

    def __init__(
        self,
        backbone: str = "resnet50",
        backbone_kwargs: Mapping[str, Any] | None = None,
        projection_hidden_dim: int | None = 2048,  # the original's head Linear(2048,2048)-ReLU-Linear(2048,128)
        projection_dim: int = 128,
        classifier_dropout: float = 0.0,
        **kwargs,
    ):
        self.backbone = backbone
        self.backbone_kwargs = dict(backbone_kwargs or {})
        self.projection_hidden_dim = projection_hidden_dim
        self.projection_dim = int(projection_dim)
        self.classifier_dropout = float(classifier_dropout)
        super().__init__(**kwargs)


class TabularClassifierConfig(StilBaseConfig):
    """Tabular-only classifier: TIP tabular transformer -> CLS -> linear classifier (+ projection head)."""

    model_type = "stil_tabular_classifier"
    uses_images = False
    uses_tabular = True

    def __init__(
        self,
        tabular_embedding_dim: int = 512,
        tabular_num_layers: int = 4,
        tabular_num_heads: int = 8,
        tabular_mlp_ratio: float = 4.0,
        tabular_dropout: float = 0.0,
        projection_hidden_dim: int | None = 512,
        projection_dim: int = 128,
        classifier_dropout: float = 0.0,
        **kwargs,
    ):
        self.tabular_embedding_dim = int(tabular_embedding_dim)
        self.tabular_num_layers = int(tabular_num_layers)
        self.tabular_num_heads = int(tabular_num_heads)
        self.tabular_mlp_ratio = float(tabular_mlp_ratio)
        self.tabular_dropout = float(tabular_dropout)
        self.projection_hidden_dim = projection_hidden_dim
        self.projection_dim = int(projection_dim)
        self.classifier_dropout = float(classifier_dropout)
        kwargs.setdefault("image_size", None)
        super().__init__(**kwargs)


class MultimodalClassifierConfig(StilBaseConfig):
    """Image + tabular classifier.

    fusion="concat": h = [image_proj(pooled image); tabular_proj(tabular CLS)] (Match-family backbone).
      * unimodal_heads=False: logits = Linear(h), projection head MLP(h) -> projection_dim;
      * unimodal_heads=True:  x_m = multimodal_proj(h) (Linear to ``fused_dim`` = 128, no nonlinearity),
        logits = Linear(x_m), image_logits = Linear(pooled image), tabular_logits = Linear(tabular CLS)
        (the MMatch / co-training shared network).
    fusion="tip": the tabular tokens cross-attend to projected image tokens through ``fusion_num_layers``
      blocks (TIP's multimodal encoder); logits = Linear(fused CLS) (docs/models.md, "Baselines"). With
      unimodal_heads=True the image and tabular heads are added (TIPBackboneEnsemble-style pieces).
    """

    model_type = "stil_multimodal_classifier"
    uses_tabular = True

    def __init__(
        self,
        backbone: str = "resnet50",
        backbone_kwargs: Mapping[str, Any] | None = None,
        tabular_embedding_dim: int = 512,
        tabular_num_layers: int = 4,
        tabular_num_heads: int = 8,
        tabular_mlp_ratio: float = 4.0,
        tabular_dropout: float = 0.0,
        fusion: str = "concat",
        unimodal_heads: bool = False,
        multimodal_embedding_dim: int = 512,
        fusion_num_layers: int = 4,
        fusion_num_heads: int = 8,
        fused_dim: int = 128,
        unimodal_loss_weight: float = 1.0,
        projection_hidden_dim: int | None = 512,
        projection_dim: int = 128,
        classifier_dropout: float = 0.0,
        **kwargs,
    ):
        if fusion not in ("concat", "tip"):
            raise ValueError(f"fusion must be 'concat' or 'tip', got {fusion!r}")
        self.backbone = backbone
        self.backbone_kwargs = dict(backbone_kwargs or {})
        self.tabular_embedding_dim = int(tabular_embedding_dim)
        self.tabular_num_layers = int(tabular_num_layers)
        self.tabular_num_heads = int(tabular_num_heads)
        self.tabular_mlp_ratio = float(tabular_mlp_ratio)
        self.tabular_dropout = float(tabular_dropout)
        self.fusion = fusion
        self.unimodal_heads = bool(unimodal_heads)
        self.multimodal_embedding_dim = int(multimodal_embedding_dim)
        self.fusion_num_layers = int(fusion_num_layers)
        self.fusion_num_heads = int(fusion_num_heads)
        self.fused_dim = int(fused_dim)
        # loss = CE(z_m) + w * (CE(z_i) + CE(z_t)) when unimodal_heads (the STiL repository's supervised recipe with w = 1)
        self.unimodal_loss_weight = float(unimodal_loss_weight)
        self.projection_hidden_dim = projection_hidden_dim
        self.projection_dim = int(projection_dim)
        self.classifier_dropout = float(classifier_dropout)
        super().__init__(**kwargs)


def __getattr__(name):
    # DataCompatibilityMixin moved to modeling_common (it needs torch); kept importable from here lazily
    # so this module stays torch-free at import time.
    if name == "DataCompatibilityMixin":
        from .modeling_common import DataCompatibilityMixin

        return DataCompatibilityMixin
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
