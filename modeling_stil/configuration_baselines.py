"""Configurations of the baseline models, and what every stil model config shares.

`StilBaseConfig` holds the fields of the model input contract (docs/architecture.md): the tabular
schema (a plain dict, so the config stays JSON), image size/channels/normalisation, labels and
problem type. The baseline families subclass it:

* `ImageClassifierConfig`     image-only classifier over a timm backbone (the Match family's
                              image-only wrapper, stil_baselines.md §1.4c');
* `TabularClassifierConfig`   tabular-only transformer classifier (TIP's tabular encoder + linear head);
* `MultimodalClassifierConfig` image + tabular: ``fusion="concat"`` (Match-family multimodal
                              backbone, §1.4c) or ``fusion="tip"`` (TIP-style cross-attention fusion,
                              tip_and_data.md §3), optionally with unimodal heads (``unimodal_heads=True``:
                              the MMatch / co-training shared network of §1.4d).

This file is deliberately free of imports from the rest of the library (and of torch at import time)
so that it runs as remote code next to saved weights (``register_for_auto_class`` copies it).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from transformers import PretrainedConfig

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
PROBLEM_TYPES = ("single_label_classification", "multi_label_classification", "regression")
TASK_TO_PROBLEM_TYPE = {
    "classification": "single_label_classification",
    "regression": "regression",
    "landmarks": "regression",
}


class DataCompatibilityError(ValueError):
    """A model met data it was not built for; the message lists every difference."""


def schema_to_dict(schema: Any) -> dict | None:
    """TabularSchema, dict or None -> plain JSON dict (or None)."""
    if schema is None:
        return None
    if hasattr(schema, "to_dict"):
        return schema.to_dict()
    if isinstance(schema, Mapping):
        return {"allow_missing": schema.get("allow_missing", True), "fields": [dict(f) for f in schema["fields"]]}
    raise TypeError(f"tabular_schema must be a TabularSchema, a dict or None, got {type(schema).__name__}")


def schema_summary(schema: Mapping[str, Any] | None) -> dict[str, Any]:
    """Names, categorical cardinalities and continuous count of a schema dict, in model order."""
    if not schema:
        return {"names": [], "cardinalities": [], "num_categorical": 0, "num_continuous": 0}
    fields = list(schema["fields"])
    categorical = [f for f in fields if f["kind"] == "categorical"]
    continuous = [f for f in fields if f["kind"] == "continuous"]
    return {
        "names": [f["name"] for f in categorical + continuous],
        "cardinalities": [len(f["categories"]) for f in categorical],
        "num_categorical": len(categorical),
        "num_continuous": len(continuous),
    }


def _as_list(values: Sequence[float] | float | None, channels: int, default: Sequence[float]) -> list[float]:
    if values is None:
        values = default if len(default) == channels else [float(default[0])] * channels
    if isinstance(values, (int, float)):
        values = [float(values)] * channels
    return [float(v) for v in values]


class StilBaseConfig(PretrainedConfig):
    """Fields every stil model carries (the model input contract). Not registered on its own."""

    model_type = "stil_base"
    uses_images = True
    uses_tabular = False
    default_problem_type = "single_label_classification"

    def __init__(
        self,
        tabular_schema: Mapping[str, Any] | None = None,
        image_size: int | None = 224,
        num_channels: int = 3,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        resize_size: int | None = None,
        **kwargs,
    ):
        self.tabular_schema = schema_to_dict(tabular_schema)
        self.image_size = None if image_size is None else int(image_size)
        self.num_channels = int(num_channels)
        self.image_mean = _as_list(image_mean, self.num_channels, IMAGENET_MEAN)
        self.image_std = _as_list(image_std, self.num_channels, IMAGENET_STD)
        # Eval transform resizes to `resize_size` (default: image_size); kept for processors.
        self.resize_size = None if resize_size is None else int(resize_size)
        if kwargs.get("problem_type") is None:
            kwargs["problem_type"] = self.default_problem_type
        if kwargs["problem_type"] == "single_label_classification" and kwargs.get("num_labels", 2) == 1 and "id2label" not in kwargs:
            kwargs["problem_type"] = "regression"
        super().__init__(**kwargs)
        if self.problem_type not in PROBLEM_TYPES:
            raise ValueError(f"problem_type must be one of {PROBLEM_TYPES}, got {self.problem_type!r}")
        if len(self.image_mean) != self.num_channels or len(self.image_std) != self.num_channels:
            raise ValueError(
                f"image_mean/image_std need {self.num_channels} values (num_channels), got "
                f"{self.image_mean} / {self.image_std}"
            )

    # ----------------------------------------------------------------------------- tabular helpers
    @property
    def schema_info(self) -> dict[str, Any]:
        return schema_summary(self.tabular_schema)

    @property
    def cardinalities(self) -> list[int]:
        return self.schema_info["cardinalities"]

    @property
    def num_categorical(self) -> int:
        return self.schema_info["num_categorical"]

    @property
    def num_continuous(self) -> int:
        return self.schema_info["num_continuous"]


class ImageClassifierConfig(StilBaseConfig):
    """Image-only classifier: timm backbone -> pooled feature -> linear classifier (+ projection head)."""

    model_type = "stil_image_classifier"

    def __init__(
        self,
        backbone: str = "resnet50",
        backbone_kwargs: Mapping[str, Any] | None = None,
        projection_hidden_dim: int | None = 2048,  # §1.4c': head Linear(2048,2048)-ReLU-Linear(2048,128)
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
      * unimodal_heads=False: logits = Linear(h), projection head MLP(h) -> projection_dim (§1.4c);
      * unimodal_heads=True:  x_m = multimodal_proj(h) (Linear to ``fused_dim`` = 128, no nonlinearity),
        logits = Linear(x_m), image_logits = Linear(pooled image), tabular_logits = Linear(tabular CLS)
        (the MMatch / co-training shared network, §1.4d).
    fusion="tip": the tabular tokens cross-attend to projected image tokens through ``fusion_num_layers``
      blocks (TIP's multimodal encoder); logits = Linear(fused CLS) (tip_and_data.md §3). With
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
        # loss = CE(z_m) + w * (CE(z_i) + CE(z_t)) when unimodal_heads (the §1.2 supervised recipe with w = 1)
        self.unimodal_loss_weight = float(unimodal_loss_weight)
        self.projection_hidden_dim = projection_hidden_dim
        self.projection_dim = int(projection_dim)
        self.classifier_dropout = float(classifier_dropout)
        super().__init__(**kwargs)


# --------------------------------------------------------------------------------- compatibility
def data_compatibility_differences(config, schema=None, metadata=None, num_channels: int | None = None) -> list[str]:
    """Every way ``config`` disagrees with a dataset's schema/metadata (empty list: compatible).

    ``schema``: TabularSchema, its dict, or None. ``metadata``: DatasetMetadata, its dict, or None.
    ``num_channels``: the data's image channels when known; otherwise taken from ``metadata.source``
    ("num_channels") or inferred from the task (landmark datasets are grayscale, others RGB).
    """
    diffs: list[str] = []
    uses_images = getattr(config, "uses_images", True)
    uses_tabular = getattr(config, "uses_tabular", False)
    if metadata is not None and not isinstance(metadata, Mapping):
        metadata = metadata.to_dict()
    schema = schema_to_dict(schema)

    if uses_tabular:
        mine = schema_summary(config.tabular_schema)
        if schema is None:
            diffs.append(
                f"the model reads {len(mine['names'])} tabular fields but the data has no tabular schema"
            )
        else:
            theirs = schema_summary(schema)
            if mine["names"] != theirs["names"]:
                diffs.append(f"tabular column names/order: model {mine['names']} vs data {theirs['names']}")
            if (mine["num_categorical"], mine["num_continuous"]) != (theirs["num_categorical"], theirs["num_continuous"]):
                diffs.append(
                    f"tabular field count: model {mine['num_categorical']} categorical + {mine['num_continuous']} "
                    f"continuous vs data {theirs['num_categorical']} + {theirs['num_continuous']}"
                )
            if mine["cardinalities"] != theirs["cardinalities"]:
                diffs.append(f"categorical cardinalities: model {mine['cardinalities']} vs data {theirs['cardinalities']}")

    if metadata is not None:
        task = metadata.get("task", "classification")
        if uses_images and metadata.get("image_column", "image") is None:
            diffs.append("the model needs images but the data has no image column")
        channels = num_channels
        if channels is None:
            channels = (metadata.get("source") or {}).get("num_channels")
        if channels is None and uses_images and metadata.get("image_column", "image") is not None:
            channels = 1 if task == "landmarks" else 3
        if uses_images and channels is not None and int(channels) != config.num_channels:
            diffs.append(f"image channels: model {config.num_channels} vs data {channels}")
        if task == "classification":
            names = list(metadata.get("label_names") or [])
            if len(names) != config.num_labels:
                diffs.append(f"label count: model {config.num_labels} classes vs data {len(names)}")
            else:
                mine = [config.id2label[i] for i in range(config.num_labels)]
                generic = all(str(n).startswith("LABEL_") for n in mine)
                if not generic and [str(n) for n in mine] != [str(n) for n in names]:
                    diffs.append(f"class names: model {mine[:10]} vs data {names[:10]}")
        else:
            targets = int(metadata.get("num_targets") or 1)
            if targets != config.num_labels:
                diffs.append(f"label count: model {config.num_labels} outputs vs data {targets} targets")
        expected = TASK_TO_PROBLEM_TYPE.get(task)
        if expected is not None and config.problem_type != expected:
            diffs.append(f"problem type: model {config.problem_type!r} vs data task {task!r} ({expected!r})")
    elif num_channels is not None and uses_images and int(num_channels) != config.num_channels:
        diffs.append(f"image channels: model {config.num_channels} vs data {num_channels}")
    return diffs


def check_data_compatibility(config, schema=None, metadata=None, num_channels: int | None = None) -> None:
    diffs = data_compatibility_differences(config, schema, metadata, num_channels)
    if diffs:
        raise DataCompatibilityError(
            f"{type(config).__name__} ({config.model_type}) does not fit this data:\n  - "
            + "\n  - ".join(diffs)
            + "\nbuild the model from the dataset (create_model(..., schema=..., metadata=...)) or use matching data"
        )


def config_overrides_from_data(schema=None, metadata=None, num_channels: int | None = None) -> dict[str, Any]:
    """Config fields implied by a dataset: tabular_schema, labels, problem_type, num_channels."""
    out: dict[str, Any] = {}
    if schema is not None:
        out["tabular_schema"] = schema_to_dict(schema)
    if metadata is not None:
        if not isinstance(metadata, Mapping):
            metadata = metadata.to_dict()
        task = metadata.get("task", "classification")
        out["problem_type"] = TASK_TO_PROBLEM_TYPE[task]
        if task == "classification":
            names = [str(n) for n in (metadata.get("label_names") or [])]
            out["id2label"] = {i: n for i, n in enumerate(names)}
            out["label2id"] = {n: i for i, n in enumerate(names)}
            out["num_labels"] = len(names)
        else:
            out["num_labels"] = int(metadata.get("num_targets") or 1)
        channels = num_channels if num_channels is not None else (metadata.get("source") or {}).get("num_channels")
        if channels is None and metadata.get("image_column", "image") is not None:
            channels = 1 if task == "landmarks" else None
        if channels is not None:
            out["num_channels"] = int(channels)
    elif num_channels is not None:
        out["num_channels"] = int(num_channels)
    return out


class DataCompatibilityMixin:
    """Adds ``check_data_compatibility``, the shared loss and extra ``auto_map`` entries to a PreTrainedModel.

    ``register_for_auto_class`` keeps a single Auto class per model, so a model that is also an
    image classifier lists the others in ``_extra_auto_classes``; ``save_pretrained`` adds them to
    ``auto_map`` so ``AutoModel`` and ``AutoModelForImageClassification`` both load it as remote code.
    """

    _extra_auto_classes: tuple = ()

    def save_pretrained(self, save_directory, *args, **kwargs):
        if self._extra_auto_classes:
            auto_map = dict(getattr(self.config, "auto_map", None) or {})
            name = f"{type(self).__module__.split('.')[-1]}.{type(self).__name__}"
            for auto_class in self._extra_auto_classes:
                auto_map.setdefault(auto_class, name)
            self.config.auto_map = auto_map
        return super().save_pretrained(save_directory, *args, **kwargs)

    def check_data_compatibility(self, schema=None, metadata=None, num_channels: int | None = None) -> None:
        check_data_compatibility(self.config, schema, metadata, num_channels)

    def compute_loss(self, logits, labels):
        import torch.nn.functional as F

        if labels is None:
            return None
        problem = self.config.problem_type
        if problem == "regression":
            target = labels.to(logits.dtype).reshape(logits.shape)
            return F.mse_loss(logits.float(), target.float())
        if problem == "multi_label_classification":
            return F.binary_cross_entropy_with_logits(logits.float(), labels.float())
        return F.cross_entropy(logits.float(), labels.long())
