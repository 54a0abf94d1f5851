"""What every stil model config shares: the model input contract and the model/data compatibility check.

* `StilBaseConfig` is the single config base of all our models (STiL, TIP, the baselines, WRN,
  TCDCNN): the tabular schema (a plain dict, so the config stays JSON), image size / channels /
  normalisation, labels and problem type, and the tabular layout helpers (``cardinalities``,
  ``num_continuous``...). Families choose their defaults through class attributes
  (``default_image_mean``, ``default_problem_type``, ``uses_tabular``...).
* `data_differences` is the single model/data comparison (field counts, cardinalities, categorical
  vocabularies and class names by value, column names, problem type, image channels);
  `check_data_compatibility` raises `DataCompatibilityError` (a ``ValueError``) listing them.
* Schema helpers: `schema_to_dict`, `schema_summary`, `schema_layout`, `placeholder_schema`,
  `layout_from_field_lengths`; `config_overrides_from_data` gives the config fields a dataset implies.

Self-contained (transformers and the standard library only, no torch at import time): it is copied
as remote code next to saved models (``register_for_auto_class`` follows the relative imports).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

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


# ------------------------------------------------------------------------------------ schema helpers
def schema_to_dict(schema: Any) -> dict | None:
    """TabularSchema, dict or None -> plain JSON dict (or None). Keeps the ``placeholder`` flag of
    `placeholder_schema` dicts (their names are made up, so they are not compared with the data's)."""
    if schema is None:
        return None
    if hasattr(schema, "to_dict"):
        return schema.to_dict()
    if isinstance(schema, Mapping):
        out = {"allow_missing": schema.get("allow_missing", True), "fields": [dict(f) for f in schema["fields"]]}
        if "placeholder" in schema:
            out["placeholder"] = schema["placeholder"]
        return out
    raise TypeError(f"tabular_schema must be a TabularSchema, a dict or None, got {type(schema).__name__}")


def schema_summary(schema: Mapping[str, Any] | None, model_order: bool = False) -> dict[str, Any]:
    """Names, categorical cardinalities and continuous count of a schema dict, in model order
    (categorical fields first). ``model_order=True``: the schema must already list them that way."""
    if not schema:
        return {"names": [], "cardinalities": [], "num_categorical": 0, "num_continuous": 0}
    fields = list(schema["fields"])
    categorical = [f for f in fields if f["kind"] == "categorical"]
    continuous = [f for f in fields if f["kind"] == "continuous"]
    names = [f["name"] for f in categorical + continuous]
    if model_order and [f["name"] for f in fields] != names:
        raise ValueError("tabular_schema must list categorical fields before continuous ones (model order)")
    return {
        "names": names,
        "cardinalities": [len(f["categories"]) for f in categorical],
        "num_categorical": len(categorical),
        "num_continuous": len(continuous),
    }


def vocabulary_differences(model_schema: Any, data_schema: Any, model: str = "the model", data: str = "the data") -> list[str]:
    """Categorical columns whose vocabularies differ BY VALUE (same size or not): a data code means
    another category to the model. One line per column, naming it, the differing values and the fix.

    Compared by column name; placeholder schemas (made-up names and categories) are skipped."""
    mine, theirs = schema_to_dict(model_schema), schema_to_dict(data_schema)
    if not mine or not theirs or mine.get("placeholder") or theirs.get("placeholder"):
        return []
    theirs_by_name = {f["name"]: f for f in theirs["fields"] if f.get("kind") == "categorical"}
    lines = []
    for field in mine["fields"]:
        other = theirs_by_name.get(field["name"])
        if field.get("kind") != "categorical" or other is None:
            continue
        a, b = [str(c) for c in field.get("categories") or []], [str(c) for c in other.get("categories") or []]
        if a == b:
            continue
        only_a, only_b = [c for c in a if c not in b], [c for c in b if c not in a]
        detail = (f"only in {model}: {only_a[:10]}, only in {data}: {only_b[:10]}" if only_a or only_b
                  else "the same categories in another order")
        lines.append(
            f"categorical column {field['name']!r}: vocabulary of {model} {a[:10]} vs {data} {b[:10]} ({detail}); codes "
            "would mean other categories: rebuild the data with the model's vocabulary (scripts/prepare_dataset.py "
            "--schema with the training dataset's tabular_schema.json)"
        )
    return lines


def schema_layout(schema: Mapping[str, Any]) -> tuple[list[int], int, list[str]]:
    """(categorical cardinalities, continuous count, names) of a schema listed in model order."""
    info = schema_summary(schema, model_order=True)
    return info["cardinalities"], info["num_continuous"], info["names"]


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


def _as_list(values: Sequence[float] | float | None, channels: int, default: Sequence[float]) -> list[float]:
    if values is None:
        values = default if len(default) == channels else [float(default[0])] * channels
    if isinstance(values, (int, float)):
        values = [float(values)] * channels
    return [float(v) for v in values]


# ------------------------------------------------------------------------------------- config base
class StilBaseConfig(PretrainedConfig):
    """Fields every stil model carries (the model input contract). Not registered on its own.

    Family defaults: the field defaults (a subclass may redeclare a field with its own default) and the
    class attributes ``default_image_mean`` /
    ``default_image_std`` (repeated per channel when their length differs), ``default_problem_type``
    (None: leave transformers' None), ``uses_images`` / ``uses_tabular`` (what the data check compares).
    """

    model_type = "stil_base"
    uses_images = True
    uses_tabular = False
    default_problem_type = "single_label_classification"
    default_image_mean = IMAGENET_MEAN
    default_image_std = IMAGENET_STD

    # the contract fields (dataclass fields, like every transformers v5 config field)
    tabular_schema: Optional[dict] = None
    image_size: Optional[int] = 224
    num_channels: int = 3
    image_mean: Optional[list] = None
    image_std: Optional[list] = None
    resize_size: Optional[int] = None  # eval transform resizes to this (default: image_size); for processors

    def __post_init__(self, **kwargs):
        self.tabular_schema = schema_to_dict(self.tabular_schema)
        self.image_size = None if self.image_size is None else int(self.image_size)
        self.num_channels = int(self.num_channels)
        self.image_mean = _as_list(self.image_mean, self.num_channels, self.default_image_mean)
        self.image_std = _as_list(self.image_std, self.num_channels, self.default_image_std)
        self.resize_size = None if self.resize_size is None else int(self.resize_size)
        if self.default_problem_type is not None:
            if self.problem_type is None:
                self.problem_type = self.default_problem_type
            if self.problem_type == "single_label_classification" and kwargs.get("num_labels", 2) == 1 and self.id2label is None:
                self.problem_type = "regression"
        super().__post_init__(**kwargs)
        if self.problem_type is not None and self.problem_type not in PROBLEM_TYPES:
            raise ValueError(f"problem_type must be one of {PROBLEM_TYPES}, got {self.problem_type!r}")
        if len(self.image_mean) != self.num_channels or len(self.image_std) != self.num_channels:
            raise ValueError(
                f"image_mean/image_std need {self.num_channels} values (num_channels), got "
                f"{self.image_mean} / {self.image_std}"
            )

    # ----------------------------------------------------------------------------- tabular layout
    @property
    def schema_info(self) -> dict[str, Any]:
        return schema_summary(self.tabular_schema)

    @property
    def cardinalities(self) -> list[int]:
        return self.schema_info["cardinalities"]

    @property
    def cat_cardinalities(self) -> list[int]:  # TIP's name
        return self.cardinalities

    @property
    def num_categorical(self) -> int:
        return self.schema_info["num_categorical"]

    @property
    def num_continuous(self) -> int:
        return self.schema_info["num_continuous"]

    @property
    def num_fields(self) -> int:
        return self.num_categorical + self.num_continuous

    # ----------------------------------------------------------------------------- compatibility
    def data_differences(self, schema: Any = None, metadata: Any = None, num_channels: Optional[int] = None,
                         need_labels: bool = True, strict: bool = True) -> list[str]:
        """See `data_differences`."""
        return data_differences(self, schema, metadata, num_channels, need_labels=need_labels, strict=strict)


# --------------------------------------------------------------------------------- compatibility
def data_differences(config, schema=None, metadata=None, num_channels: int | None = None,
                     need_labels: bool = True, strict: bool = True) -> list[str]:
    """Every way ``config`` disagrees with a dataset's schema/metadata (empty list: compatible).

    ``schema``: TabularSchema, its dict, or None. ``metadata``: DatasetMetadata, its dict, or None.
    ``num_channels``: the data's image channels when known; otherwise taken from the metadata
    (``num_channels`` or ``source.num_channels``). ``need_labels=False``: labels and problem type are
    not compared (pretraining). ``strict=True``: what the data leaves out counts too (no tabular schema
    for a tabular model; image channels inferred from the task: landmark datasets are grayscale,
    others RGB); ``strict=False`` compares only what the data states.
    """
    diffs: list[str] = []
    uses_images = getattr(config, "uses_images", True)
    uses_tabular = getattr(config, "uses_tabular", False)
    if metadata is not None and not isinstance(metadata, Mapping):
        metadata = metadata.to_dict()
    schema = schema_to_dict(schema)

    if uses_tabular and config.tabular_schema is None:
        if schema is not None:
            diffs.append("the data has a tabular schema but the model has no tabular input")
    elif uses_tabular:
        mine = schema_summary(config.tabular_schema)
        if schema is None:
            if strict:
                diffs.append(f"the model reads {len(mine['names'])} tabular fields but the data has no tabular schema")
        else:
            theirs = schema_summary(schema)
            if not config.tabular_schema.get("placeholder") and mine["names"] != theirs["names"]:
                diffs.append(f"tabular column names/order: model {mine['names']} vs data {theirs['names']}")
            if (mine["num_categorical"], mine["num_continuous"]) != (theirs["num_categorical"], theirs["num_continuous"]):
                diffs.append(
                    f"tabular field count: model {mine['num_categorical']} categorical + {mine['num_continuous']} "
                    f"continuous vs data {theirs['num_categorical']} + {theirs['num_continuous']} (field counts differ)"
                )
            if mine["cardinalities"] != theirs["cardinalities"]:
                fields = [
                    f"{theirs['names'][i]!r}: model cardinality {a}, data {b}"
                    for i, (a, b) in enumerate(zip(mine["cardinalities"], theirs["cardinalities"]))
                    if a != b
                ]
                diffs.append(
                    f"categorical cardinalities: model {mine['cardinalities']} vs data {theirs['cardinalities']}"
                    + (f" ({'; '.join(fields)})" if fields else "")
                )
            elif not config.tabular_schema.get("placeholder"):  # same sizes: the values must agree too
                diffs += vocabulary_differences(config.tabular_schema, schema)

    channels = num_channels
    if metadata is not None:
        task = metadata.get("task", "classification")
        has_images = metadata.get("image_column", "image") is not None
        if uses_images and not has_images:
            diffs.append("the model needs images but the data has no image column")
        if channels is None:
            channels = metadata.get("num_channels")
        if channels is None:
            channels = (metadata.get("source") or {}).get("num_channels")
        if channels is None and strict and uses_images and has_images:
            channels = 1 if task == "landmarks" else 3
        if need_labels:
            if task == "classification":
                names = list(metadata.get("label_names") or [])
                if len(names) != config.num_labels:
                    diffs.append(f"label count: model {config.num_labels} classes vs data {len(names)}")
                elif config.id2label:
                    mine = [config.id2label[i] for i in range(config.num_labels)]
                    generic = all(str(n).startswith("LABEL_") for n in mine)
                    if not generic and [str(n) for n in mine] != [str(n) for n in names]:
                        diffs.append(f"class names: model {mine[:10]} vs data {names[:10]}")
            else:
                targets = int(metadata.get("num_targets") or 1)
                if targets != config.num_labels:
                    diffs.append(f"label count: model {config.num_labels} outputs vs data {targets} targets")
            expected = TASK_TO_PROBLEM_TYPE.get(task)
            if expected is not None and config.problem_type is not None and config.problem_type != expected:
                diffs.append(f"problem type: model {config.problem_type!r} vs data task {task!r} ({expected!r})")
    if uses_images and channels is not None and int(channels) != config.num_channels:
        diffs.append(f"image channels: model {config.num_channels} vs data {channels}")
    return diffs


def check_data_compatibility(config, schema=None, metadata=None, num_channels: int | None = None,
                             need_labels: bool = True, strict: bool = True) -> None:
    """Raise `DataCompatibilityError` listing every difference `data_differences` finds."""
    diffs = data_differences(config, schema, metadata, num_channels, need_labels=need_labels, strict=strict)
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
