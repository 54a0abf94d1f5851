"""The tabular schema: what each tabular column is, and how its values become model inputs.

A `TabularSchema` travels with every dataset (``tabular_schema.json`` next to the saved
``DatasetDict``) and is copied into every model config, so a model can check that the data it meets
is the data it was trained for, and a processor can turn a raw row into inputs.

Storage convention (the data contract in ``docs/architecture.md``):

* categorical columns hold integer codes into ``field.categories`` (a ``datasets.ClassLabel``),
  ``None`` when missing;
* continuous columns hold raw float values (``None``/NaN when missing); they are z-scored on the fly
  with the train-split statistics kept here (``mean``/``std``), so the stored table stays readable
  and the statistics can never silently disagree with the data.

Model order is always categorical fields first, then continuous ones (the original TIP/STiL
tabular encoder slices the row that way, and its checkpoints depend on it).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Sequence

import numpy as np

SCHEMA_FILENAME = "tabular_schema.json"
CATEGORICAL = "categorical"
CONTINUOUS = "continuous"


class SchemaError(ValueError):
    """Data does not fit its schema; the message names the column/row and the fix."""


@dataclass
class TabularField:
    name: str
    kind: Literal["categorical", "continuous"]
    categories: list[str] | None = None  # vocabulary: code i means categories[i]
    mean: float | None = None  # train-split statistics for continuous fields
    std: float | None = None

    def __post_init__(self):
        if self.kind not in (CATEGORICAL, CONTINUOUS):
            raise SchemaError(f"field {self.name!r}: kind must be 'categorical' or 'continuous', got {self.kind!r}")
        if self.kind == CATEGORICAL and not self.categories:
            raise SchemaError(f"categorical field {self.name!r} needs a non-empty vocabulary (categories)")
        if self.kind == CONTINUOUS:
            self.mean = 0.0 if self.mean is None else float(self.mean)
            std = 1.0 if self.std is None else float(self.std)
            # A constant column would divide by zero; leave it centred instead.
            self.std = std if math.isfinite(std) and std > 0 else 1.0

    @property
    def cardinality(self) -> int:
        return len(self.categories) if self.kind == CATEGORICAL else 1


@dataclass
class TabularSchema:
    fields: list[TabularField] = field(default_factory=list)
    allow_missing: bool = True  # False: a null or NaN value is an error rather than a masked token

    def __post_init__(self):
        self.fields = [f if isinstance(f, TabularField) else TabularField(**f) for f in self.fields]
        names = [f.name for f in self.fields]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise SchemaError(f"duplicate tabular column names: {duplicates}")
        # Model order: categorical first, then continuous (stable within each kind).
        self.fields = [f for f in self.fields if f.kind == CATEGORICAL] + [
            f for f in self.fields if f.kind == CONTINUOUS
        ]

    # ----------------------------------------------------------------------------- properties
    @property
    def names(self) -> list[str]:
        return [f.name for f in self.fields]

    @property
    def categorical_fields(self) -> list[TabularField]:
        return [f for f in self.fields if f.kind == CATEGORICAL]

    @property
    def continuous_fields(self) -> list[TabularField]:
        return [f for f in self.fields if f.kind == CONTINUOUS]

    @property
    def num_categorical(self) -> int:
        return len(self.categorical_fields)

    @property
    def num_continuous(self) -> int:
        return len(self.continuous_fields)

    @property
    def num_fields(self) -> int:
        return len(self.fields)

    @property
    def cardinalities(self) -> list[int]:
        return [f.cardinality for f in self.categorical_fields]

    @property
    def field_lengths(self) -> list[int]:
        """TIP's ``field_lengths_tabular``: cardinality per categorical field, then 1 per continuous."""
        return [f.cardinality for f in self.fields]

    def __len__(self) -> int:
        return self.num_fields

    # ----------------------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return {"allow_missing": self.allow_missing, "fields": [asdict(f) for f in self.fields]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TabularSchema":
        return cls(fields=[TabularField(**f) for f in data["fields"]], allow_missing=data.get("allow_missing", True))

    def save(self, directory_or_file: str | Path) -> Path:
        path = Path(directory_or_file)
        if path.suffix != ".json":
            path = path / SCHEMA_FILENAME
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path

    @classmethod
    def load(cls, directory_or_file: str | Path) -> "TabularSchema":
        path = Path(directory_or_file)
        if path.is_dir():
            path = path / SCHEMA_FILENAME
        if not path.is_file():
            raise FileNotFoundError(
                f"no tabular schema at {path}; datasets written by scripts/prepare_dataset.py or "
                "scripts/make_synthetic.py carry one (tabular_schema.json in the dataset folder)"
            )
        return cls.from_dict(json.loads(path.read_text()))

    # ----------------------------------------------------------------------------- fitting
    @classmethod
    def fit(
        cls,
        columns: Mapping[str, Sequence[Any]],
        categorical: Iterable[str] = (),
        continuous: Iterable[str] = (),
        allow_missing: bool = True,
        categories: Mapping[str, Sequence[str]] | None = None,
    ) -> "TabularSchema":
        """Build a schema from the *training* split's raw columns.

        Vocabularies are the sorted distinct non-missing values (as strings; 2.0 reads as "2", the
        same rule `encode_raw_rows` applies) unless given in
        ``categories``; continuous statistics are the mean and population std of the finite values.
        """
        categories = dict(categories or {})
        fields: list[TabularField] = []
        for name in categorical:
            if name in categories:
                vocab = [_category_label(v) for v in categories[name]]
            else:
                values = {_category_label(v) for v in columns[name] if not _is_missing(v)}
                vocab = sorted(values, key=_natural_key)
            if not vocab:
                raise SchemaError(f"categorical column {name!r} has no non-missing value in the training split")
            fields.append(TabularField(name=name, kind=CATEGORICAL, categories=vocab))
        for name in continuous:
            values = np.asarray([np.nan if _is_missing(v) else float(v) for v in columns[name]], dtype=np.float64)
            if np.isinf(values).any():
                row = int(np.flatnonzero(np.isinf(values))[0])
                raise SchemaError(f"continuous column {name!r} has an infinite value at row {row}; fix or drop it")
            finite = values[np.isfinite(values)]
            if finite.size == 0:
                raise SchemaError(f"continuous column {name!r} has no finite value in the training split")
            fields.append(TabularField(name=name, kind=CONTINUOUS, mean=float(finite.mean()), std=float(finite.std())))
        return cls(fields=fields, allow_missing=allow_missing)

    # ----------------------------------------------------------------------------- checks
    def check_columns(self, column_names: Iterable[str], where: str = "the dataset") -> None:
        """Every schema column must be present."""
        present = set(column_names)
        missing = [n for n in self.names if n not in present]
        if missing:
            raise SchemaError(
                f"{where} lacks tabular column(s) {missing} required by the schema; "
                f"available columns: {sorted(present)}"
            )

    def differences(self, other: "TabularSchema") -> list[str]:
        """Human-readable differences that would make a model trained on ``self`` misread ``other``."""
        diffs: list[str] = []
        if self.names != other.names:
            diffs.append(f"column names/order differ: {self.names} vs {other.names}")
        if self.num_categorical != other.num_categorical or self.num_continuous != other.num_continuous:
            diffs.append(
                f"field counts differ: {self.num_categorical} categorical + {self.num_continuous} continuous "
                f"vs {other.num_categorical} + {other.num_continuous}"
            )
        for a, b in zip(self.categorical_fields, other.categorical_fields):
            if a.cardinality != b.cardinality:
                diffs.append(f"column {a.name!r}: cardinality {a.cardinality} vs {b.cardinality}")
        return diffs

    # ----------------------------------------------------------------------------- encoding
    def encode_columns(self, columns: Mapping[str, Sequence[Any]], row_offset: int = 0) -> dict[str, np.ndarray]:
        """Stored columns (categorical codes, raw continuous) -> model arrays.

        Returns ``categorical_values`` (N, n_cat) int64, ``continuous_values`` (N, n_con) float32
        (z-scored) and ``missing_mask`` (N, F) bool in model field order. Missing cells become 0 with
        the mask set; the model replaces them with its learned mask token.
        """
        self.check_columns(columns.keys())
        n = len(columns[self.names[0]]) if self.fields else 0
        categorical = np.zeros((n, self.num_categorical), dtype=np.int64)
        continuous = np.zeros((n, self.num_continuous), dtype=np.float32)
        missing = np.zeros((n, self.num_fields), dtype=bool)
        for j, f in enumerate(self.categorical_fields):
            codes, mask = _to_codes(columns[f.name], f, row_offset, allow_missing=self.allow_missing)
            categorical[:, j] = codes
            missing[:, j] = mask
        for j, f in enumerate(self.continuous_fields):
            values = np.asarray([np.nan if v is None else v for v in columns[f.name]], dtype=np.float64)
            bad = np.isinf(values)
            if bad.any():
                row = row_offset + int(np.flatnonzero(bad)[0])
                raise SchemaError(f"column {f.name!r} row {row}: infinite value; fix or drop the row")
            mask = np.isnan(values)
            if mask.any() and not self.allow_missing:
                row = row_offset + int(np.flatnonzero(mask)[0])
                raise SchemaError(
                    f"column {f.name!r} row {row}: missing/NaN value but the schema has allow_missing=False; "
                    "impute it or rebuild the dataset with missing values allowed"
                )
            continuous[:, j] = np.where(mask, 0.0, (values - f.mean) / f.std)
            missing[:, self.num_categorical + j] = mask
        return {"categorical_values": categorical, "continuous_values": continuous, "missing_mask": missing}

    def encode_raw_rows(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
        """Raw rows (category *strings*, raw numbers; absent key or None = missing) -> model arrays."""
        columns: dict[str, list[Any]] = {}
        for f in self.fields:
            values = []
            for i, row in enumerate(rows):
                value = row.get(f.name)
                if f.kind == CATEGORICAL and not _is_missing(value):
                    label = _category_label(value)
                    if label not in f.categories:
                        raise SchemaError(
                            f"row {i}: unknown category {value!r} for column {f.name!r}; "
                            f"known categories: {f.categories[:20]}{' ...' if len(f.categories) > 20 else ''}"
                        )
                    value = f.categories.index(label)
                values.append(None if _is_missing(value) else value)
            columns[f.name] = values
        return self.encode_columns(columns)


def _natural_key(value: str):
    """Sort numbers numerically and strings lexicographically ('2' before '10')."""
    try:
        return (0, float(value), value)
    except ValueError:
        return (1, 0.0, value)


def _category_label(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value == ""


def _to_codes(values: Sequence[Any], f: TabularField, row_offset: int, allow_missing: bool):
    mask = np.asarray([_is_missing(v) for v in values], dtype=bool)
    if mask.any() and not allow_missing:
        row = row_offset + int(np.flatnonzero(mask)[0])
        raise SchemaError(
            f"column {f.name!r} row {row}: missing value but the schema has allow_missing=False; "
            "impute it or rebuild the dataset with missing values allowed"
        )
    codes = np.asarray([0 if m else v for v, m in zip(values, mask)], dtype=np.float64)
    if not np.all(np.equal(np.mod(codes, 1), 0)):
        row = row_offset + int(np.flatnonzero(np.mod(codes, 1) != 0)[0])
        raise SchemaError(f"column {f.name!r} row {row}: categorical code {codes[row - row_offset]} is not an integer")
    codes = codes.astype(np.int64)
    bad = (codes < 0) | (codes >= f.cardinality)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise SchemaError(
            f"column {f.name!r} row {row_offset + row}: category code {codes[row]} is outside the vocabulary "
            f"of {f.cardinality} categories; rebuild the dataset so codes match tabular_schema.json"
        )
    return codes, mask
