"""Shared pieces of the dataset builders: errors, image reading, features, writing, CLI exit codes.

Every builder validates its whole input *before* anything reaches the output folder; images are read
(and checked) while the Arrow tables are generated in a private temporary cache, and the dataset is
then written with `data_utils.io.save_dataset` (atomic). A failure therefore never leaves a partial
dataset behind.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from ..io import DatasetExistsError, DatasetMetadata, save_dataset
from ..schema import CATEGORICAL, SchemaError, TabularSchema
from ..splits import SplitError, stratified_split

SPLITS = ("train", "validation", "test")


class BuildError(ValueError):
    """The input cannot become a stil dataset; the message names file/row/column and the fix."""


USER_ERRORS = (BuildError, SchemaError, SplitError, DatasetExistsError)


# --------------------------------------------------------------------------------------------- CLI
def run_cli(main: Callable[[Sequence[str] | None], Any], argv: Sequence[str] | None = None) -> int:
    """Run a builder's ``main``; user errors become one ``error: ...`` line on stderr and exit code 2."""
    try:
        main(argv)
    except USER_ERRORS as error:
        message = " ".join(str(error).split())  # one line, whatever the message held
        print(f"error: {message}", file=sys.stderr)
        return 2
    return 0


def add_output_arguments(parser) -> None:
    """The flags every builder CLI ends with: --output (required), --overwrite, --no-progress."""
    parser.add_argument("--output", required=True)
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--no-progress", action="store_true")


def split_list(text: str | None) -> list[str] | None:
    if text is None:
        return None
    return [part.strip() for part in text.split(",") if part.strip()]


def check_output_free(output: str | os.PathLike, overwrite: bool) -> None:
    """Fail early (before reading thousands of images) when the output folder is taken."""
    path = Path(output)
    if path.exists() and not overwrite:
        raise DatasetExistsError(f"output folder {path.resolve()} already exists; pass --overwrite to replace it")


# ------------------------------------------------------------------------------------------ values
def is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, (float, np.floating)) and math.isnan(value):
        return True
    if isinstance(value, str) and value.strip() == "":
        return True
    try:
        import pandas as pd

        return value is pd.NA or value is pd.NaT
    except ImportError:  # pragma: no cover - pandas is a dependency
        return False


def category_label(value: Any) -> str | None:
    """A categorical cell as its vocabulary string: 2.0 -> '2', ' red ' -> 'red', missing -> None."""
    if is_missing(value):
        return None
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    if isinstance(value, np.integer):
        return str(int(value))
    return str(value).strip()


def encode_categories(
    values: Sequence[Any], categories: Sequence[str], column: str, where: str, fix: str
) -> list[int | None]:
    """Category strings -> codes into ``categories``; an unknown value is an error naming its row."""
    index = {c: i for i, c in enumerate(categories)}
    codes: list[int | None] = []
    for row, value in enumerate(values):
        label = category_label(value)
        if label is None:
            codes.append(None)
            continue
        if label not in index:
            shown = list(categories[:20]) + (["..."] if len(categories) > 20 else [])
            raise SchemaError(
                f"{where} row {row} column {column!r}: unknown category {label!r} (vocabulary: {shown}); {fix}"
            )
        codes.append(index[label])
    return codes


def check_codes(values: Sequence[Any], cardinality: int, column: str, where: str, fix: str) -> list[int | None]:
    """Integer category codes (TIP's prepared files) -> validated codes in [0, cardinality)."""
    out: list[int | None] = []
    for row, value in enumerate(values):
        if is_missing(value):
            out.append(None)
            continue
        number = float(value)
        if not number.is_integer() or not 0 <= number < cardinality:
            raise SchemaError(
                f"{where} row {row} column {column!r}: category code {value!r} is outside 0..{cardinality - 1} "
                f"(the field length is {cardinality}); {fix}"
            )
        out.append(int(number))
    return out


def check_continuous(values: Sequence[Any], column: str, where: str, allow_missing: bool) -> list[float | None]:
    """Raw continuous cells -> floats (None = missing). inf is always an error, NaN unless allowed."""
    out: list[float | None] = []
    for row, value in enumerate(values):
        if is_missing(value):
            if not allow_missing:
                raise SchemaError(
                    f"{where} row {row} column {column!r}: missing/NaN value but missing values are not allowed; "
                    "fill or drop the row, or build with --allow-missing (the value is then stored as null)"
                )
            out.append(None)
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise SchemaError(
                f"{where} row {row} column {column!r}: {value!r} is not a number; fix the cell or declare the "
                "column categorical (--categorical)"
            ) from None
        if math.isnan(number):
            if not allow_missing:
                raise SchemaError(
                    f"{where} row {row} column {column!r}: NaN value but missing values are not allowed; "
                    "fill or drop the row, or build with --allow-missing"
                )
            out.append(None)
            continue
        if math.isinf(number):
            raise SchemaError(f"{where} row {row} column {column!r}: infinite value {value!r}; fix or drop the row")
        out.append(number)
    return out


def check_tip_columns(
    df, column_names: Sequence[str], lengths: Sequence[int], where: str, lengths_file: str
) -> dict[str, list]:
    """The columns of one of TIP's headerless ``*_reordered.csv`` tables, validated, by name.

    ``lengths`` (read from ``lengths_file``) gives each field's length: a categorical field (length > 1)
    holds integer codes below its length, a continuous one (length 1) numbers, missing cells allowed.
    """
    columns = {}
    for j, name in enumerate(column_names):
        values = df[j].tolist()
        if lengths[j] > 1:
            columns[name] = check_codes(values, lengths[j], name, where, f"the codes must match {lengths_file}")
        else:
            columns[name] = check_continuous(values, name, where, allow_missing=True)
    return columns


# ------------------------------------------------------------------------------------------ .pt files
def load_pt(path: str | os.PathLike) -> Any:
    """``torch.load(weights_only=True)`` of TIP's list files (lists of ints/str, or numpy arrays).

    Numpy arrays (TIP saves some subset path lists and UKBB labels as arrays) need numpy's array
    reconstruction allow-listed; nothing else is.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise BuildError(f"missing file {path}")
    try:
        obj = torch.load(path, weights_only=True)
    except pickle.UnpicklingError:
        allowed = _numpy_safe_globals()
        try:
            with torch.serialization.safe_globals(allowed):
                obj = torch.load(path, weights_only=True)
        except Exception as error:  # noqa: BLE001 - reported with the file name
            raise BuildError(f"cannot read {path} with torch.load(weights_only=True): {error}") from None
    except Exception as error:  # noqa: BLE001
        raise BuildError(f"cannot read {path} with torch.load(weights_only=True): {error}") from None
    if hasattr(obj, "tolist"):
        obj = obj.tolist()
    return list(obj) if isinstance(obj, tuple) else obj


def _numpy_safe_globals() -> list:
    allowed: list = [np.ndarray, np.dtype]
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover
        from numpy.core.multiarray import _reconstruct
    allowed.append(_reconstruct)
    for kind in (np.dtypes.StrDType, np.dtypes.Int64DType, np.dtypes.Int32DType, np.dtypes.Float64DType,
                 np.dtypes.Float32DType, np.dtypes.BoolDType, np.dtypes.ObjectDType, np.dtypes.UInt8DType):
        allowed.append(kind)
    return allowed


# ------------------------------------------------------------------------------------------- images
# Image files a build scaled from 16 to 8 bits (`read_image_file`); `write_dataset` says how many, once.
SCALED_IMAGES: list[Path] = []


def read_image_file(path: str | os.PathLike, where: str, mode: str | None = "RGB") -> dict:
    """Check an image file and return the ``datasets.Image`` cell ``{"bytes", "path"}``.

    The original bytes are embedded unchanged when the file is a JPEG/PNG already in ``mode``
    (``None``: keep RGB or L as stored); anything else is converted and re-encoded as PNG. 16-bit
    images are scaled to 8 bits first (`data_utils.images.to_8bit`; recorded in `SCALED_IMAGES`).
    """
    from PIL import Image, UnidentifiedImageError

    from ..images import ImageDepthError, to_8bit

    path = Path(path)
    if not path.is_file():
        raise BuildError(f"{where}: image file {path} does not exist; fix the path or remove the row")
    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            fmt, stored_mode = image.format, image.mode
            image, scaled = to_8bit(image)
            if scaled:
                SCALED_IMAGES.append(path)
            target = mode or (image.mode if image.mode in ("RGB", "L") else "RGB")
            if fmt in ("JPEG", "PNG") and stored_mode == target:
                return {"bytes": data, "path": path.name}
            converted = image.convert(target)
    except UnidentifiedImageError:
        # PIL's own message names its in-memory buffer (<_io.BytesIO object at 0x...>), not the file
        raise BuildError(
            f"{where}: image file {path} is unreadable or corrupt: not an image file PIL can read (PNG, JPEG, TIFF, "
            "BMP...); replace the file or remove the row"
        ) from None
    except ImageDepthError as error:
        raise BuildError(f"{where}: image file {path}: {error}") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise BuildError(
            f"{where}: image file {path} is unreadable or corrupt ({error}); replace the file or remove the row"
        ) from None
    return {"bytes": png_bytes(converted), "path": path.with_suffix(".png").name}


def png_bytes(image_or_array: Any, mode: str | None = None) -> bytes:
    from PIL import Image

    image = image_or_array if isinstance(image_or_array, Image.Image) else Image.fromarray(image_or_array, mode=mode)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def read_npy_image(path: str | os.PathLike, where: str, scale: float | None = None) -> dict:
    """An ``.npy`` image (H, W, 3) -> PNG cell. uint8 is stored as is; floats are ``round(x*scale)``."""
    path = Path(path)
    if not path.is_file():
        raise BuildError(f"{where}: image file {path} does not exist; fix the path or remove the row")
    try:
        array = np.load(path, allow_pickle=False)
    except Exception as error:  # noqa: BLE001
        raise BuildError(f"{where}: {path} is not a readable .npy array ({error}); regenerate it") from None
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] != 3):
        raise BuildError(f"{where}: {path} holds an array of shape {array.shape}; expected H x W x 3 (or H x W)")
    if array.dtype != np.uint8:
        if scale is None:
            raise BuildError(f"{where}: {path} has dtype {array.dtype}; expected uint8 pixels")
        array = array.astype(np.float64)
        if not np.isfinite(array).all():
            raise BuildError(f"{where}: {path} contains NaN/inf pixels; regenerate the image")
        array = np.clip(np.rint(array * scale), 0, 255).astype(np.uint8)
    return {"bytes": png_bytes(array), "path": path.with_suffix(".png").name}


# ----------------------------------------------------------------------------------------- features
def tabular_features(schema: TabularSchema | None) -> dict:
    import datasets

    if schema is None:
        return {}
    return {
        f.name: datasets.ClassLabel(names=list(f.categories)) if f.kind == CATEGORICAL else datasets.Value("float32")
        for f in schema.fields
    }


def make_features(
    schema: TabularSchema | None,
    label_feature: Any,
    with_image: bool = True,
    image_column: str = "image",
    label_column: str = "label",
    labeled_column: str | None = "labeled",
):
    import datasets

    features: dict[str, Any] = {}
    if with_image:
        features[image_column] = datasets.Image()
    features.update(tabular_features(schema))
    features[label_column] = label_feature
    if labeled_column:
        features[labeled_column] = datasets.Value("bool")
    return datasets.Features(features)


def write_dataset(
    splits: Mapping[str, Mapping[str, Sequence[Any]]],
    features,
    output: str | os.PathLike,
    metadata: DatasetMetadata,
    schema: TabularSchema | None = None,
    overwrite: bool = False,
    image_column: str = "image",
    image_loader: Callable[[Any, str], dict] | None = None,
    progress: bool = True,
) -> Path:
    """Build each split (reading images through ``image_loader`` with a progress bar) and save atomically.

    ``splits[name]`` maps column -> list of cell values; the image column holds *sources* (paths,
    arrays, ...) that ``image_loader(source, where)`` turns into ``{"bytes", "path"}`` cells. Arrow
    files are generated in a private temporary cache, so nothing is written under ``output`` unless
    every split is complete.
    """
    import datasets
    from tqdm.auto import tqdm

    check_output_free(output, overwrite)
    columns = list(features)
    for name, table in splits.items():
        lengths = {c: len(table[c]) for c in columns if c in table}
        absent = [c for c in columns if c not in table]
        if absent:
            raise BuildError(f"internal: split {name!r} lacks columns {absent}")
        if len(set(lengths.values())) > 1:
            raise BuildError(f"split {name!r}: columns have different lengths {lengths}")

    def generate(split_name):
        table = splits[split_name]
        n = len(table[columns[0]]) if columns else 0
        bar = tqdm(range(n), desc=f"reading {split_name} images", disable=not progress or image_loader is None,
                   unit="img", leave=False)
        for i in bar:
            row = {c: table[c][i] for c in columns}
            if image_loader is not None and image_column in row:
                row[image_column] = image_loader(row[image_column], f"{split_name} row {i}")
            yield row

    previous = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    SCALED_IMAGES.clear()
    try:
        with tempfile.TemporaryDirectory(prefix="stil-build-") as cache:
            built = {}
            for name in splits:
                try:
                    built[name] = datasets.Dataset.from_generator(
                        generate, features=features, cache_dir=cache, gen_kwargs={"split_name": name},
                        split=datasets.NamedSplit(name), fingerprint=f"stil-build-{name}-{os.getpid()}-{id(splits)}",
                    )
                except Exception as error:  # noqa: BLE001 - surface our own error, not the wrapper
                    cause = error
                    while cause is not None and not isinstance(cause, USER_ERRORS):
                        cause = cause.__cause__ or cause.__context__
                    if cause is not None:
                        raise cause from None
                    raise
            dataset_dict = datasets.DatasetDict(built)
            from ..permissions import share_like_umask

            written = share_like_umask(save_dataset(dataset_dict, output, metadata, schema=schema, overwrite=overwrite))
        if SCALED_IMAGES:
            print(f"note: {len(set(SCALED_IMAGES))} 16-bit image(s) (first: {SCALED_IMAGES[0]}) were scaled to 8 bits "
                  "(value / 257, the full 16-bit range; see docs/data.md)")
        return written
    finally:
        SCALED_IMAGES.clear()
        if previous:
            datasets.enable_progress_bars()


# ---------------------------------------------------------------------------------------- splitting
def stratified_partition(
    labels: Sequence[Any], fractions: Sequence[float], seed: int, stratify: bool = True
) -> list[np.ndarray]:
    """Split row positions into ``len(fractions) + 1`` parts: one per fraction, the rest last.

    The builders' rule for `splits.stratified_split`: per class (or globally when ``stratify`` is False,
    classes in the order met) rows are shuffled with ``seed`` and cut so each part gets
    ``round(fraction * N)`` rows overall (largest-remainder allocation across classes).
    Returned positions are sorted (table order).
    """
    labels = np.asarray(labels, dtype=object)
    return stratified_split(labels if stratify else None, fractions, rounding="overall_share",
                            rng=np.random.default_rng(seed), num_rows=len(labels), class_order="first_seen")


def take(values: Sequence[Any], indices: Iterable[int]) -> list:
    return [values[int(i)] for i in indices]
