"""A user table (CSV or parquet) plus image files -> a stil dataset (``scripts/prepare_dataset.py``).

One row per sample: an image path (relative to the table's folder, or absolute), a label, and any
number of tabular columns. Everything is validated before anything is written; the vocabularies
and continuous statistics come from the train split only (`TabularSchema.fit`); missing cells are
kept as nulls; image bytes are embedded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..io import DatasetMetadata
from ..schema import CATEGORICAL, SchemaError, TabularSchema, _natural_key
from ..splits import SplitError, check_labeled_split, select_labeled
from ._common import (
    BuildError,
    category_label,
    check_continuous,
    check_output_free,
    encode_categories,
    is_missing,
    make_features,
    read_image_file,
    stratified_partition,
    take,
    write_dataset,
)

SPLIT_NAMES = {
    "train": "train", "training": "train",
    "validation": "validation", "val": "validation", "valid": "validation", "dev": "validation",
    "test": "test", "testing": "test",
}
RESERVED = ("image", "label", "labeled")
TRUE = {"true", "1", "yes", "y", "t"}
FALSE = {"false", "0", "no", "n", "f"}


def read_table(path: str | os.PathLike):
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise BuildError(f"table {path} does not exist; pass --table with a .csv or .parquet file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            return pd.read_csv(path)
        if suffix in (".parquet", ".pq"):
            return pd.read_parquet(path)
    except Exception as error:  # noqa: BLE001 - reported with the file name
        raise BuildError(f"cannot read table {path}: {error}") from None
    raise BuildError(f"table {path}: unsupported extension {suffix!r}; use .csv or .parquet")


def build_from_table(
    table: str | os.PathLike,
    output: str | os.PathLike,
    *,
    image_column: str,
    label_column: str,
    categorical: Sequence[str] | None = None,
    continuous: Sequence[str] | None = None,
    schema: str | os.PathLike | TabularSchema | None = None,
    split_column: str | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    labeled_column: str | None = None,
    labeled_fraction: float | None = None,
    labeled_per_class: int | None = None,
    task: str = "classification",
    seed: int = 0,
    allow_missing: bool | None = None,
    id_column: str | None = None,
    label_names: Sequence[str] | None = None,
    vocabulary_from: str = "train",
    image_mode: str | None = "RGB",
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Validate ``table`` and its images, then write a stil dataset to ``output`` (atomic)."""
    check_output_free(output, overwrite)
    if task not in ("classification", "regression"):
        raise BuildError(f"--task must be classification or regression, got {task!r}")
    if sum(x is not None for x in (labeled_column, labeled_fraction, labeled_per_class)) > 1:
        raise BuildError("give at most one of --labeled-column, --labeled-fraction, --labeled-per-class")
    if vocabulary_from not in ("train", "all"):
        raise BuildError(f"--vocabulary-from must be train or all, got {vocabulary_from!r}")
    path = Path(table)
    df = read_table(path)
    where = f"table {path}"
    n = len(df)
    if n == 0:
        raise BuildError(f"{where} has no rows")

    # ----------------------------------------------------------------------------- columns
    given_schema: TabularSchema | None = None
    if schema is not None:
        given_schema = schema if isinstance(schema, TabularSchema) else _load_schema(schema)
        schema_cat = [f.name for f in given_schema.categorical_fields]
        schema_con = [f.name for f in given_schema.continuous_fields]
        for name, given, expected in (("--categorical", categorical, schema_cat), ("--continuous", continuous, schema_con)):
            if given is not None and sorted(given) != sorted(expected):
                raise BuildError(f"{name} {list(given)} disagrees with the schema's columns {expected}; drop {name}")
        categorical, continuous = schema_cat, schema_con
        if allow_missing is None:
            allow_missing = given_schema.allow_missing
    allow_missing = True if allow_missing is None else bool(allow_missing)
    special = [c for c in (image_column, label_column, split_column, labeled_column, id_column) if c]
    if categorical is None and continuous is None:
        import pandas as pd

        rest = [c for c in df.columns if c not in special]
        continuous = [c for c in rest if pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c])]
        categorical = [c for c in rest if c not in continuous]
    categorical, continuous = list(categorical or []), list(continuous or [])
    overlap = sorted(set(categorical) & set(continuous))
    if overlap:
        raise BuildError(f"column(s) {overlap} are both --categorical and --continuous; choose one kind for each")
    features_cols = categorical + continuous
    wanted = special + features_cols
    missing = [c for c in dict.fromkeys(wanted) if c not in df.columns]
    if missing:
        raise BuildError(
            f"{where} lacks column(s) {missing}; available columns: {list(map(str, df.columns))}; "
            "fix the column names (options --image-column/--label-column/--categorical/--continuous/--schema)"
        )
    clash = [c for c in features_cols if c in special or c in RESERVED]
    if clash:
        raise BuildError(f"tabular column(s) {clash} clash with the image/label/split/labeled columns; rename them")
    if given_schema is not None:
        extra = [str(c) for c in df.columns if c not in wanted]
        if extra:
            raise BuildError(
                f"{where} has column(s) {extra} that are not in the schema {schema}; drop them from the table "
                "or build without --schema to fit a new schema"
            )

    # ----------------------------------------------------------------------------- ids / images
    if id_column:
        _check_unique(df[id_column].tolist(), where, f"id column {id_column!r}", "every row needs its own id")
    root = path.parent
    image_paths: list[Path] = []
    for i, value in enumerate(df[image_column].tolist()):
        if is_missing(value):
            raise BuildError(f"{where} row {i} column {image_column!r}: no image path; fill it or drop the row")
        p = Path(str(value))
        image_paths.append(p if p.is_absolute() else root / p)
    _check_unique([str(p.resolve()) for p in image_paths], where, f"image column {image_column!r}",
                  "the table and the images do not match: each row needs its own image file")
    for i, p in enumerate(image_paths):
        if not p.is_file():
            raise BuildError(
                f"{where} row {i} column {image_column!r}: image file {p} does not exist (paths are relative to "
                f"{root}); fix the path or drop the row"
            )

    # ----------------------------------------------------------------------------- splits
    raw_labels = df[label_column].tolist()
    label_strings = [category_label(v) for v in raw_labels]
    split_of = _assign_splits(df, split_column, where, val_fraction, test_fraction, seed,
                              label_strings if task == "classification" else None)
    positions = {s: np.flatnonzero(split_of == s) for s in ("train", "validation", "test")}
    if positions["train"].size == 0:
        raise BuildError(f"{where}: the train split is empty; mark rows as train in the split column or lower the fractions")

    # ----------------------------------------------------------------------------- labels
    if task == "classification":
        names, codes = _class_labels(df[label_column], raw_labels, label_strings, positions, where, label_column, label_names)
        has_label = np.array([c is not None for c in codes])
    else:
        values = [None if is_missing(v) else v for v in raw_labels]
        checked = check_continuous(values, label_column, where, allow_missing=True)
        codes = checked
        has_label = np.array([c is not None for c in checked])
        names = None
        for s in ("validation", "test"):
            bad = [int(i) for i in positions[s] if not has_label[i]]
            if bad:
                raise BuildError(f"{where} row {bad[0]} ({s} split) column {label_column!r}: missing target; "
                                 "evaluation rows need a label")

    # ----------------------------------------------------------------------------- labelled split
    train = positions["train"]
    labeled = _labeled_mask(df, train, has_label, codes, task, labeled_column, labeled_fraction, labeled_per_class,
                            seed, where)

    # ----------------------------------------------------------------------------- tabular schema
    columns: dict[str, list] = {}
    if given_schema is not None:
        fit_schema = given_schema
        for f in given_schema.fields:
            if f.kind == CATEGORICAL:
                columns[f.name] = encode_categories(
                    df[f.name].tolist(), f.categories, f.name, where,
                    f"the schema {schema} does not know it: fix the cell or rebuild the schema",
                )
    else:
        source_rows = train if vocabulary_from == "train" else np.arange(n)
        vocab = {}
        for c in categorical:
            labels_c = [category_label(v) for v in take(df[c].tolist(), source_rows)]
            vocab[c] = sorted({v for v in labels_c if v is not None}, key=_natural_key)
            if not vocab[c]:
                raise SchemaError(f"{where} column {c!r} has no non-missing value in the train split; drop the column")
            columns[c] = encode_categories(
                df[c].tolist(), vocab[c], c, where,
                "the category does not occur in the train split: fix the cell, pass --vocabulary-from all, "
                "or give a --schema whose vocabulary has it",
            )
        fit_schema = None
    for c in continuous:
        columns[c] = check_continuous(df[c].tolist(), c, where, allow_missing)
    if not allow_missing:
        for c in categorical:
            missing_rows = [i for i, v in enumerate(columns[c]) if v is None]
            if missing_rows:
                raise SchemaError(
                    f"{where} row {missing_rows[0]} column {c!r}: missing value but missing values are not allowed; "
                    "fill or drop the row, or build with --allow-missing"
                )
    if fit_schema is None:
        train_columns = {c: take(columns[c], train) for c in continuous}
        fit_schema = TabularSchema.fit(
            train_columns, categorical=categorical, continuous=continuous, allow_missing=allow_missing,
            categories=vocab,
        )
    schema_out = fit_schema if fit_schema.fields else None

    # ----------------------------------------------------------------------------- write
    import datasets

    label_feature = datasets.ClassLabel(names=names) if task == "classification" else datasets.Value("float32")
    features = make_features(schema_out, label_feature)
    splits = {}
    for s, rows in positions.items():
        table_s = {"image": take(image_paths, rows), "label": take(codes, rows)}
        for f in fit_schema.fields:
            table_s[f.name] = take(columns[f.name], rows)
        if s == "train":
            table_s["labeled"] = labeled.tolist()
        else:
            table_s["labeled"] = [False] * len(rows)
        splits[s] = table_s
    labeled_indices = np.flatnonzero(labeled).tolist()
    split_info: dict[str, Any] = {"seed": seed, "protocol": "table"}
    if labeled_column:
        split_info["labeled_column"] = labeled_column
    elif labeled_fraction is not None:
        split_info["fraction"] = labeled_fraction
    elif labeled_per_class is not None:
        split_info["per_class"] = labeled_per_class
    else:
        split_info["all_labeled"] = True
    split_info["splits"] = (
        {"split_column": split_column} if split_column
        else {"val_fraction": val_fraction, "test_fraction": test_fraction, "stratified": task == "classification"}
    )
    split_info["sizes"] = {s: int(len(r)) for s, r in positions.items()}
    metadata = DatasetMetadata(
        task=task, label_names=names, num_targets=None if task == "classification" else 1,
        labeled_indices=labeled_indices, split_info=split_info,
        source={"builder": "table", "table": str(path), "image_column": image_column, "label_column": label_column,
                "id_column": id_column, "vocabulary_from": "schema" if given_schema is not None else vocabulary_from,
                "image_mode": image_mode},
    )
    table_row = {path: i for i, path in enumerate(image_paths)}  # unique (checked above)

    def load_image(image_path, _split_row):  # messages name the table's row, as every other check does
        return read_image_file(image_path, f"{where} row {table_row[image_path]}", mode=image_mode)

    return write_dataset(
        splits, features, output, metadata, schema=schema_out, overwrite=overwrite,
        image_loader=load_image, progress=progress,
    )


# --------------------------------------------------------------------------------------------- helpers
def _load_schema(schema_path) -> TabularSchema:
    import json

    p = Path(schema_path)
    if not p.is_file() and not (p / "tabular_schema.json").is_file():
        raise BuildError(f"--schema {p}: no such file (give a tabular_schema.json or a dataset folder holding one)")
    try:
        return TabularSchema.load(p)
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise BuildError(f"--schema {p} is not a valid tabular_schema.json ({error!r})") from None


def _check_unique(values: list, where: str, what: str, fix: str) -> None:
    first: dict = {}
    for i, v in enumerate(values):
        if v in first:
            raise BuildError(f"{where} rows {first[v]} and {i}: duplicated value {v!r} in {what}; {fix}")
        first[v] = i


def _assign_splits(df, split_column, where, val_fraction, test_fraction, seed, label_strings) -> np.ndarray:
    n = len(df)
    if split_column:
        out = np.empty(n, dtype=object)
        for i, value in enumerate(df[split_column].tolist()):
            key = None if is_missing(value) else SPLIT_NAMES.get(str(value).strip().lower())
            if key is None:
                raise BuildError(
                    f"{where} row {i} column {split_column!r}: split {value!r} is not one of train/validation/test "
                    "(val, valid, dev and testing are accepted too); fix the cell"
                )
            out[i] = key
        return out
    for name, f in (("--val-fraction", val_fraction), ("--test-fraction", test_fraction)):
        if not 0.0 <= f < 1.0:
            raise BuildError(f"{name} must be in [0, 1), got {f}")
    if val_fraction + test_fraction >= 1.0:
        raise BuildError(f"--val-fraction + --test-fraction = {val_fraction + test_fraction} leaves no training rows")
    strat = label_strings is not None
    keys = [("<missing>" if v is None else v) for v in label_strings] if strat else [0] * n
    test, val, train = stratified_partition(keys, [test_fraction, val_fraction], seed=seed, stratify=strat)
    # A row without a label cannot be evaluated: keep unlabelled rows in train.
    out = np.full(n, "train", dtype=object)
    out[test] = "test"
    out[val] = "validation"
    if strat:
        for i in range(n):
            if label_strings[i] is None:
                out[i] = "train"
    return out


def _class_labels(series, raw, strings, positions, where, label_column, label_names):
    import pandas as pd

    numeric = pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series)
    integer_ids = numeric and all(s is None or _is_int(s) for s in strings)
    if integer_ids:
        for i, s in enumerate(strings):
            if s is not None and int(s) < 0:
                raise BuildError(f"{where} row {i} column {label_column!r}: label {int(s)} is negative; class ids "
                                 "are 0..K-1 (leave the cell empty for an unlabelled training row)")
    train_set = {strings[i] for i in positions["train"] if strings[i] is not None}
    if label_names is not None:
        names = [str(x) for x in label_names]
        index = {nm: k for k, nm in enumerate(names)}
        if integer_ids:
            for i, s in enumerate(strings):
                if s is not None and int(s) >= len(names):
                    raise BuildError(f"{where} row {i} column {label_column!r}: label {s} is out of range for "
                                     f"{len(names)} label names; fix the label or --label-names")
            codes = [None if s is None else int(s) for s in strings]
        else:
            codes = []
            for i, s in enumerate(strings):
                if s is not None and s not in index:
                    raise BuildError(f"{where} row {i} column {label_column!r}: label {s!r} is not in --label-names "
                                     f"{names[:20]}; fix the label or the names")
                codes.append(None if s is None else index[s])
    elif integer_ids:
        if not train_set:
            raise BuildError(f"{where}: no training row has a label in column {label_column!r}")
        k = max(int(s) for s in train_set) + 1
        names = [str(c) for c in range(k)]
        absent = [c for c in range(k) if str(c) not in train_set]
        if absent:
            raise BuildError(f"{where} column {label_column!r}: class ids {absent[:20]} have no training row; remap the "
                             "labels to contiguous ids 0..K-1 that all occur in the train split")
        codes = [None if s is None else int(s) for s in strings]
    else:
        if not train_set:
            raise BuildError(f"{where}: no training row has a label in column {label_column!r}")
        names = sorted(train_set, key=_natural_key)
        index = {nm: k for k, nm in enumerate(names)}
        codes = [None if s is None else index.get(s, -1) for s in strings]
    for split in ("validation", "test"):
        for i in positions[split]:
            s = strings[i]
            if s is None:
                raise BuildError(f"{where} row {i} ({split} split) column {label_column!r}: missing label; "
                                 "evaluation rows need a label")
            c = codes[i]
            if c == -1 or c >= len(names) or s not in train_set:
                raise BuildError(f"{where} row {i} ({split} split) column {label_column!r}: label {s!r} never occurs in "
                                 "the train split; the model cannot learn it: move such rows to train or drop them")
    return names, codes


def _is_int(s: str) -> bool:
    try:
        return float(s).is_integer()
    except ValueError:
        return False


def _labeled_mask(df, train, has_label, codes, task, labeled_column, fraction, per_class, seed, where) -> np.ndarray:
    n_train = len(train)
    train_has = has_label[train]
    mask = np.zeros(n_train, dtype=bool)
    if labeled_column:
        for j, i in enumerate(train):
            value = df[labeled_column].iloc[i]
            text = None if is_missing(value) else str(value).strip().lower()
            if isinstance(value, (float, np.floating)) and not is_missing(value) and float(value).is_integer():
                text = str(int(value))
            if text in TRUE:
                mask[j] = True
            elif text in FALSE:
                mask[j] = False
            else:
                raise BuildError(f"{where} row {i} column {labeled_column!r}: {value!r} is not a boolean "
                                 "(true/false, 1/0, yes/no); fix the cell")
            if mask[j] and not train_has[j]:
                raise BuildError(f"{where} row {i}: marked labeled in {labeled_column!r} but has no label; "
                                 "give it a label or mark it unlabeled")
    elif fraction is not None or per_class is not None:
        candidates = np.flatnonzero(train_has)
        if candidates.size == 0:
            raise BuildError(f"{where}: the labelled set is empty (no training row has a label)")
        if task == "classification":
            chosen = select_labeled([codes[train[j]] for j in candidates], fraction=fraction, per_class=per_class,
                                    seed=seed)
            mask[candidates[chosen]] = True
        else:
            if per_class is not None:
                raise BuildError("--labeled-per-class needs --task classification; use --labeled-fraction")
            if not 0.0 < fraction <= 1.0:
                raise BuildError(f"--labeled-fraction must be in (0, 1], got {fraction}")
            drawn, _ = stratified_partition([0] * candidates.size, [fraction], seed=seed, stratify=False)
            mask[candidates[drawn]] = True
    else:
        mask = train_has.copy()
    if task == "classification":
        labels_train = np.array([codes[i] if codes[i] is not None else -1 for i in train])
        keep = train_has
        try:
            check_labeled_split(labels_train[keep], mask[keep])
        except SplitError as error:
            raise BuildError(f"{where} (train split): {str(error).replace('_', '-')}") from None
    elif not mask.any():
        raise BuildError(f"{where}: the labelled set is empty; mark some training rows as labeled or raise the fraction")
    return mask
