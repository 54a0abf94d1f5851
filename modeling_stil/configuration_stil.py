"""Configuration of STiL's network (``StilConfig``, model_type ``stil``) and the shared base for
image + tabular models (``TabularImageConfig``, also used by ``TipConfig``).

Self-contained (transformers only) so ``save_pretrained`` can ship it as remote code.

The tabular layout has one source of truth, ``tabular_schema`` (the dict of
``data_utils.schema.TabularSchema.to_dict()``): categorical fields first, then continuous ones.
``field_lengths`` (TIP's ``field_lengths_tabular``: cardinality per categorical field, 1 per
continuous field) is derived from it and kept in config.json for readability; giving only
``field_lengths`` builds a placeholder schema (names ``cat_0``.., ``con_0``..) as the originals have
no names.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from transformers import PretrainedConfig

# DVM (siyi-wind/TIP data prep, "reordered" files): 4 categorical fields then 13 continuous ones.
DVM_FIELD_LENGTHS = [22, 13, 3, 12] + [1] * 13
DVM_NUM_CLASSES = 286
CARDIAC_NUM_CATEGORICAL = 26
CARDIAC_NUM_CONTINUOUS = 49


def placeholder_schema(cat_cardinalities: Sequence[int], num_continuous: int, names: Optional[Sequence[str]] = None) -> dict:
    """A TabularSchema dict for a layout known only by its field lengths."""
    cat = [int(c) for c in cat_cardinalities]
    is_placeholder = names is None
    names = list(names) if names is not None else [f"cat_{i}" for i in range(len(cat))] + [
        f"con_{i}" for i in range(num_continuous)
    ]
    if len(names) != len(cat) + num_continuous:
        raise ValueError(f"{len(names)} names for {len(cat) + num_continuous} fields")
    fields = [
        {"name": names[i], "kind": "categorical", "categories": [str(j) for j in range(c)], "mean": None, "std": None}
        for i, c in enumerate(cat)
    ]
    fields += [
        {"name": names[len(cat) + i], "kind": "continuous", "categories": None, "mean": 0.0, "std": 1.0}
        for i in range(num_continuous)
    ]
    return {"allow_missing": True, "fields": fields, "placeholder": is_placeholder}


def layout_from_field_lengths(field_lengths: Sequence[int]) -> tuple[list[int], int]:
    """TIP's rule: length 1 = continuous, otherwise categorical; categorical fields must come first."""
    lengths = [int(x) for x in field_lengths]
    cat = [x for x in lengths if x != 1]
    n_con = sum(1 for x in lengths if x == 1)
    if lengths != cat + [1] * n_con:
        raise ValueError(
            "field lengths must list categorical fields first, then continuous ones (length 1), as the "
            f"original 'reordered' files do; got {lengths}"
        )
    if any(x < 1 for x in lengths):
        raise ValueError(f"field lengths must be >= 1, got {lengths}")
    return cat, n_con


def schema_layout(schema: dict) -> tuple[list[int], int, list[str]]:
    fields = schema["fields"]
    cat = [f for f in fields if f["kind"] == "categorical"]
    con = [f for f in fields if f["kind"] == "continuous"]
    if [f["name"] for f in fields] != [f["name"] for f in cat + con]:
        raise ValueError("tabular_schema must list categorical fields before continuous ones (model order)")
    return [len(f["categories"]) for f in cat], len(con), [f["name"] for f in fields]


class TabularImageConfig(PretrainedConfig):
    """Fields shared by our image + tabular models (not registered itself)."""

    # image
    image_encoder: str = "resnet50"
    image_encoder_kwargs: Optional[dict] = None
    image_pretrained: Optional[str] = None  # provenance only; weights are loaded explicitly after init
    image_size: int = 128
    num_channels: int = 3
    image_mean: Optional[list] = None
    image_std: Optional[list] = None
    # tabular
    tabular_schema: Optional[dict] = None
    field_lengths: Optional[list] = None
    tabular_embedding_dim: int = 512
    tabular_num_layers: int = 4
    tabular_num_heads: int = 8
    tabular_mlp_ratio: float = 4.0
    tabular_drop_rate: float = 0.0
    embedding_dropout: float = 0.0
    check_categorical_codes: bool = True

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        # STiL/TIP feed images in [0, 1] without ImageNet normalisation.
        if self.image_mean is None:
            self.image_mean = [0.0] * self.num_channels
        if self.image_std is None:
            self.image_std = [1.0] * self.num_channels
        if len(self.image_mean) != self.num_channels or len(self.image_std) != self.num_channels:
            raise ValueError(f"image_mean/image_std need {self.num_channels} values (num_channels)")
        if self.tabular_schema is None and self.field_lengths is not None:
            cat, n_con = layout_from_field_lengths(self.field_lengths)
            self.tabular_schema = placeholder_schema(cat, n_con)
        if self.tabular_schema is not None:
            if hasattr(self.tabular_schema, "to_dict"):  # a TabularSchema object
                self.tabular_schema = self.tabular_schema.to_dict()
            cat, n_con, _ = schema_layout(self.tabular_schema)
            lengths = cat + [1] * n_con
            if self.field_lengths is not None and [int(x) for x in self.field_lengths] != lengths:
                raise ValueError(
                    f"field_lengths {list(self.field_lengths)} disagree with tabular_schema's layout {lengths}"
                )
            self.field_lengths = lengths

    # ---------------------------------------------------------------------------- tabular layout
    @property
    def cat_cardinalities(self) -> list[int]:
        return schema_layout(self.tabular_schema)[0] if self.tabular_schema else []

    @property
    def num_continuous(self) -> int:
        return schema_layout(self.tabular_schema)[1] if self.tabular_schema else 0

    @property
    def num_fields(self) -> int:
        return len(self.cat_cardinalities) + self.num_continuous

    # ---------------------------------------------------------------------------- compatibility
    def data_differences(self, schema: Any = None, metadata: Any = None, num_channels: Optional[int] = None, need_labels: bool = True) -> list[str]:
        """What would make this model misread the given data (empty list: compatible).

        ``schema``: a TabularSchema or its dict; ``metadata``: a DatasetMetadata or its dict;
        ``num_channels``: channels of the dataset's images (when known)."""
        diffs: list[str] = []
        if schema is not None:
            other = schema.to_dict() if hasattr(schema, "to_dict") else dict(schema)
            if self.tabular_schema is None:
                diffs.append("the data has a tabular schema but the model has no tabular input")
            else:
                mine = self.tabular_schema
                cat_a, con_a, names_a = schema_layout(mine)
                cat_b, con_b, names_b = schema_layout(other)
                if (len(cat_a), con_a) != (len(cat_b), con_b):
                    diffs.append(
                        f"field counts differ: model {len(cat_a)} categorical + {con_a} continuous, "
                        f"data {len(cat_b)} + {con_b}"
                    )
                for i, (a, b) in enumerate(zip(cat_a, cat_b)):
                    if a != b:
                        diffs.append(f"categorical field {i} ({names_b[i]!r}): model cardinality {a}, data {b}")
                if not mine.get("placeholder") and names_a != names_b:
                    diffs.append(f"column names/order differ: model {names_a} vs data {names_b}")
        if metadata is not None:
            meta = metadata.to_dict() if hasattr(metadata, "to_dict") else dict(metadata)
            task = meta.get("task", "classification")
            if task == "classification":
                n = len(meta.get("label_names") or [])
            else:
                n = int(meta.get("num_targets") or 1)
            if need_labels and n != self.num_labels:
                diffs.append(f"label count differs: model {self.num_labels}, data {n} ({task})")
            if need_labels and task == "classification" and meta.get("label_names"):
                mine = [self.id2label[i] for i in range(self.num_labels)] if self.id2label else None
                generic = mine is not None and all(str(v).startswith("LABEL_") for v in mine)
                if mine is not None and not generic and len(mine) == n and list(mine) != list(meta["label_names"]):
                    diffs.append("label names differ from the model's id2label")
            channels = meta.get("num_channels")
            if channels is not None and num_channels is None:
                num_channels = channels
        if num_channels is not None and int(num_channels) != self.num_channels:
            diffs.append(f"image channels differ: model {self.num_channels}, data {num_channels}")
        return diffs


class StilConfig(TabularImageConfig):
    """STiL's backbone (siyi-wind/STiL ``DisCoAttentionBackbone``): image encoder, TIP tabular
    encoder, disentangling MLPs, fusion ``reduce``, interaction layer(s), three classifiers."""

    model_type = "stil"

    hidden_size: int = 512  # the original multimodal_embedding_dim
    interaction_num_layers: int = 1
    interaction_num_heads: int = 4
    interaction_mlp_ratio: float = 1.0
    interaction_qkv_bias: bool = True
    interaction_attn_drop: float = 0.1
    interaction_proj_drop: float = 0.1
    interaction_drop_path: float = 0.1

    # ---------------------------------------------------------------------------- presets
    @classmethod
    def dvm(cls, **overrides) -> "StilConfig":
        """The paper's DVM setting: ResNet-50, d=512, 4 tabular layers, 1 interaction layer, 286 classes."""
        kw = dict(field_lengths=list(DVM_FIELD_LENGTHS), num_labels=DVM_NUM_CLASSES, image_size=128)
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def cardiac(cls, field_lengths=None, **overrides) -> "StilConfig":
        """UK Biobank cardiac: 26 categorical + 49 continuous fields, 2 classes. The categorical
        cardinalities are not published: pass the original ``field_lengths_tabular`` (a list or a
        path to the .pt file) or a ``tabular_schema``."""
        if field_lengths is None and overrides.get("tabular_schema") is None:
            raise ValueError(
                "cardiac: the categorical field lengths are not public; pass field_lengths (list or the "
                "original tabular_lengths*.pt file) or tabular_schema"
            )
        if isinstance(field_lengths, str):
            field_lengths = read_field_lengths(field_lengths)
        if field_lengths is not None:
            cat, n_con = layout_from_field_lengths(field_lengths)
            if (len(cat), n_con) != (CARDIAC_NUM_CATEGORICAL, CARDIAC_NUM_CONTINUOUS):
                raise ValueError(
                    f"cardiac expects {CARDIAC_NUM_CATEGORICAL} categorical + {CARDIAC_NUM_CONTINUOUS} continuous "
                    f"fields, the lengths give {len(cat)} + {n_con}"
                )
        kw = dict(field_lengths=field_lengths, num_labels=2, image_size=128)
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def tiny(cls, **overrides) -> "StilConfig":
        """A few-hundred-thousand-parameter model for tests: a narrow ResNet-18, d=32."""
        kw = dict(
            image_encoder="resnet18",
            image_encoder_kwargs={"channels": [8, 16, 32, 64]},
            image_size=64,
            field_lengths=[3, 4, 1, 1, 1],
            tabular_embedding_dim=32,
            tabular_num_layers=2,
            tabular_num_heads=4,
            hidden_size=32,
            interaction_num_heads=4,
            num_labels=3,
        )
        kw.update(overrides)
        return cls(**kw)


def read_field_lengths(path: str) -> list[int]:
    """Read an original ``field_lengths_tabular`` file (a torch-saved tensor/list, or text)."""
    if str(path).endswith((".txt", ".csv", ".json")):
        import json
        import re

        text = open(path).read()
        try:
            values = json.loads(text)
        except ValueError:
            values = [float(v) for v in re.split(r"[\s,]+", text.strip()) if v]
    else:
        import torch

        values = torch.load(path, map_location="cpu", weights_only=True)
        if hasattr(values, "tolist"):
            values = values.tolist()
    return [int(v) for v in values]
