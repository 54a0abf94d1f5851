"""Configuration of STiL's network (``StilConfig``, model_type ``stil``) and what it shares with TIP
(``TabularImageConfig``: image encoder, tabular transformer, field lengths, presets), on top of the
common config base (``StilBaseConfig``, configuration_common.py).

Imports only transformers and configuration_common so ``save_pretrained`` can ship it as remote code.

The tabular layout has one source of truth, ``tabular_schema`` (the dict of
``data_utils.schema.TabularSchema.to_dict()``): categorical fields first, then continuous ones.
``field_lengths`` (TIP's ``field_lengths_tabular``: cardinality per categorical field, 1 per
continuous field) is derived from it and kept in config.json for readability; giving only
``field_lengths`` builds a placeholder schema (names ``cat_0``.., ``con_0``..) as the originals have
no names.
"""

from __future__ import annotations

from typing import Optional

from .configuration_common import (  # noqa: F401  (re-exported: the schema helpers used to live here)
    StilBaseConfig,
    data_differences,
    layout_from_field_lengths,
    placeholder_schema,
    schema_layout,
)

# DVM (siyi-wind/TIP data prep, "reordered" files): 4 categorical fields then 13 continuous ones.
DVM_FIELD_LENGTHS = [22, 13, 3, 12] + [1] * 13
DVM_NUM_CLASSES = 286
CARDIAC_NUM_CATEGORICAL = 26
CARDIAC_NUM_CONTINUOUS = 49


class TabularImageConfig(StilBaseConfig):
    """Fields shared by STiL and TIP (not registered itself): the timm image encoder, TIP's tabular
    transformer, the ``field_lengths`` view of the schema, and the dvm / cardiac / tiny presets.
    The contract fields (schema, image size/channels/normalisation, labels) come from `StilBaseConfig`."""

    uses_tabular = True
    default_problem_type = None  # STiL/TIP leave problem_type unset (the loss infers it)
    default_image_mean = [0.0]  # STiL/TIP feed images in [0, 1] without ImageNet normalisation
    default_image_std = [1.0]

    # image
    image_encoder: str = "resnet50"
    image_encoder_kwargs: Optional[dict] = None
    image_pretrained: Optional[str] = None  # provenance only; weights are loaded explicitly after init
    image_size: int = 128
    # tabular
    field_lengths: Optional[list] = None
    tabular_embedding_dim: int = 512
    tabular_num_layers: int = 4
    tabular_num_heads: int = 8
    tabular_mlp_ratio: float = 4.0
    tabular_drop_rate: float = 0.0
    embedding_dropout: float = 0.0
    check_categorical_codes: bool = True
    # std of TIP's normal init of the tabular / multimodal transformers (Linear, Embedding, tokens).
    # 0.02 is TIP's; a residual branch's output scales with width x std^2, so at small widths the
    # tiny preset raises it to keep the original's branch-to-stream ratio (see ``tiny``).
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        if self.tabular_schema is None and self.field_lengths is not None:
            cat, n_con = layout_from_field_lengths(self.field_lengths)
            self.tabular_schema = placeholder_schema(cat, n_con)
        super().__post_init__(**kwargs)
        if self.tabular_schema is not None:
            cat, n_con, _ = schema_layout(self.tabular_schema)
            lengths = cat + [1] * n_con
            if self.field_lengths is not None and [int(x) for x in self.field_lengths] != lengths:
                raise ValueError(
                    f"field_lengths {list(self.field_lengths)} disagree with tabular_schema's layout {lengths}"
                )
            self.field_lengths = lengths

    # ---------------------------------------------------------------------------- presets
    # per family: what each preset adds to the shared settings below
    _preset_overrides = {}  # (not annotated: a class attribute, not a config field)

    @classmethod
    def _preset(cls, name: str, base: dict, overrides: dict):
        kw = dict(base)
        kw.update(cls._preset_overrides.get(name, {}))
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def dvm(cls, **overrides):
        """The paper's DVM setting: ResNet-50, d=512, 4 tabular layers (STiL: 286 classes)."""
        return cls._preset("dvm", dict(field_lengths=list(DVM_FIELD_LENGTHS), image_size=128), overrides)

    @classmethod
    def cardiac(cls, field_lengths=None, **overrides):
        """UK Biobank cardiac: 26 categorical + 49 continuous fields (STiL: 2 classes). The categorical
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
        return cls._preset("cardiac", dict(field_lengths=field_lengths, image_size=128), overrides)

    @classmethod
    def tiny(cls, **overrides):
        """A few-hundred-thousand-parameter model for tests: a narrow ResNet-18, d=32."""
        base = dict(
            image_encoder="resnet18",
            image_encoder_kwargs={"channels": [8, 16, 32, 64]},
            image_size=64,
            field_lengths=[3, 4, 1, 1, 1],
            tabular_embedding_dim=32,
            tabular_num_layers=2,
            tabular_num_heads=4,
            hidden_size=32,
            # TIP's 0.02 at d = 512 scaled to d = 32 (x sqrt(512 / 32)): with 0.02 the tabular CLS is
            # nearly the same for every row (relative spread 3e-3 against 7e-2 at d = 512), which left
            # TIP's contrastive loss at log(batch) and its matching head at "no match"
            initializer_range=0.08,
        )
        return cls._preset("tiny", base, overrides)


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

    _preset_overrides = {
        "dvm": {"num_labels": DVM_NUM_CLASSES},
        "cardiac": {"num_labels": 2},
        "tiny": {"interaction_num_heads": 4, "num_labels": 3},
    }


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
