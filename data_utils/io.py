"""Saving and loading stil datasets: a ``DatasetDict`` plus the metadata that travels with it.

A stil dataset folder holds what ``DatasetDict.save_to_disk`` writes plus two JSON files:

* ``tabular_schema.json``: the `TabularSchema` (absent for image-only datasets);
* ``stil_dataset.json``: `DatasetMetadata` (task, column names, labels, split provenance).

Writes are atomic: everything goes to a hidden sibling folder that is renamed into place only when
complete, so a failed preparation leaves no partial dataset behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .schema import SCHEMA_FILENAME, TabularSchema

METADATA_FILENAME = "stil_dataset.json"
TASKS = ("classification", "regression", "landmarks")


@dataclass
class DatasetMetadata:
    task: str = "classification"  # classification | regression | landmarks
    image_column: str | None = "image"  # None: tabular-only dataset
    label_column: str = "label"
    label_names: list[str] | None = None  # classification: class names in id order
    num_targets: int | None = None  # regression/landmarks: target vector length (10 for 5 keypoints)
    labeled_column: str = "labeled"  # boolean column of the train split
    labeled_indices: list[int] | None = None  # train rows that keep their label
    split_info: dict[str, Any] = field(default_factory=dict)  # how the labelled split was drawn
    source: dict[str, Any] = field(default_factory=dict)  # builder name, arguments, version, notes

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")

    @property
    def num_labels(self) -> int:
        if self.task == "classification":
            return len(self.label_names or [])
        return int(self.num_targets or 1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DatasetMetadata":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


class DatasetExistsError(FileExistsError):
    pass


@contextlib.contextmanager
def atomic_directory(output_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that replaces ``output_dir`` only if the block succeeds."""
    output = Path(output_dir).resolve()
    if output.exists() and not overwrite:
        raise DatasetExistsError(f"output folder {output} already exists; pass --overwrite to replace it")
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    try:
        yield staging
        from .permissions import share_like_umask

        share_like_umask(staging)  # mkdtemp is 0700: give the dataset the mode a plain mkdir would
        # another process may have written it while this one was building (two runs filling one cache):
        # theirs stays, readers of it keep their files, and this copy is dropped
        taken = f"output folder {output} was written by another process meanwhile"
        if output.exists() and not overwrite:
            raise DatasetExistsError(taken)
        if output.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
            output.rename(trash / output.name)
            staging.rename(output)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            try:
                staging.rename(output)
            except OSError as error:  # created between the check and the rename: rename refuses a non-empty folder
                if not output.exists():
                    raise
                raise DatasetExistsError(taken) from error
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def save_dataset(
    dataset_dict,
    output_dir: str | os.PathLike,
    metadata: DatasetMetadata,
    schema: TabularSchema | None = None,
    overwrite: bool = False,
    extra_files: dict[str, str] | None = None,
    num_proc: int | None = None,
) -> Path:
    """Atomically write ``dataset_dict`` (a ``datasets.DatasetDict``) with its schema and metadata."""
    with atomic_directory(output_dir, overwrite=overwrite) as staging:
        dataset_dict.save_to_disk(str(staging), num_proc=num_proc)
        (staging / METADATA_FILENAME).write_text(json.dumps(metadata.to_dict(), indent=2))
        if schema is not None:
            schema.save(staging / SCHEMA_FILENAME)
        for name, text in (extra_files or {}).items():
            (staging / name).write_text(text)
    return Path(output_dir)


class DatasetError(ValueError, FileNotFoundError):
    """A dataset argument that cannot be loaded: no such folder or Hub dataset, a folder that is not a
    stil dataset, or an unreadable file in one. The message names the path and what a dataset must
    look like. Also a ``FileNotFoundError`` so callers that catch that (train.py, scripts/evaluate_model.py)
    print the one line instead of a traceback."""


DATASET_LAYOUT = (
    "a dataset is either a local folder written by scripts/prepare_dataset.py, scripts/make_synthetic.py "
    f"or a data_utils builder (scripts/build_*.py) -- a DatasetDict.save_to_disk folder (dataset_dict.json "
    f"and one folder per split) plus {METADATA_FILENAME} (and {SCHEMA_FILENAME} for tabular data) -- "
    "or a Hub dataset id 'owner/name' whose repository holds such a DatasetDict and its metadata files"
)


def _looks_like_hub_id(name: str) -> bool:
    """'owner/name' or 'name' as the Hub spells repository ids (no local-path syntax)."""
    import re

    if name.startswith((".", "/", "~")) or "\\" in name or name.endswith("/"):
        return False
    parts = name.split("/")
    return 1 <= len(parts) <= 2 and all(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}", p) for p in parts) and ".." not in name


def _folder_contents(path: Path, limit: int = 6) -> str:
    try:
        names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    except OSError:
        return "unreadable"
    if not names:
        return "empty"
    return "holds " + ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _read_json(file: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise DatasetError(f"cannot read the {what} {file}: {error}; {DATASET_LAYOUT}") from error
    if not isinstance(data, dict):
        raise DatasetError(f"the {what} {file} does not hold a JSON object; {DATASET_LAYOUT}")
    return data


def _local_dataset(path: Path):
    import datasets

    if not path.is_dir():
        kind = "a file" if path.is_file() else "not a folder"
        hint = (
            "; to train on a table, turn it into a dataset with scripts/prepare_dataset.py --table"
            if path.suffix.lower() in (".csv", ".parquet", ".tsv", ".json", ".jsonl") else ""
        )
        raise DatasetError(f"dataset {str(path)!r} is {kind}, not a dataset folder{hint}; {DATASET_LAYOUT}")
    if not os.access(path, os.R_OK | os.X_OK):
        raise DatasetError(f"dataset folder {path} is not readable (permissions); {DATASET_LAYOUT}")
    if not (path / METADATA_FILENAME).is_file():
        saved = (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()
        contents = _folder_contents(path)
        what = ("is a datasets save_to_disk folder without stil metadata" if saved
                else contents if contents.startswith("holds") else f"is {contents}")
        tables = sorted(p.name for p in path.glob("*") if p.suffix.lower() in (".csv", ".parquet", ".tsv", ".jsonl"))
        hint = (f"; to train on {tables[0]}, turn it into a dataset with scripts/prepare_dataset.py --table "
                f"{path / tables[0]}" if tables and not saved else "")
        raise DatasetError(
            f"{path} is not a stil dataset (no {METADATA_FILENAME}; the folder {what}){hint}; {DATASET_LAYOUT}"
        )
    metadata_dict = _read_json(path / METADATA_FILENAME, "dataset metadata")
    try:
        dataset_dict = datasets.load_from_disk(str(path))
    except (OSError, ValueError, KeyError) as error:
        raise DatasetError(
            f"cannot read the dataset splits in {path} ({type(error).__name__}: {error}); {DATASET_LAYOUT}"
        ) from error
    return dataset_dict, path, metadata_dict


def _hub_dataset(name: str, revision: str | None):
    import datasets
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, HfHubHTTPError, LocalEntryNotFoundError

    if not _looks_like_hub_id(name):
        raise DatasetError(f"dataset {name!r} not found: no such folder, and not a Hub dataset id; {DATASET_LAYOUT}")
    try:
        root = Path(
            snapshot_download(name, repo_type="dataset", revision=revision, allow_patterns=[METADATA_FILENAME, SCHEMA_FILENAME])
        )
    except LocalEntryNotFoundError as error:
        raise DatasetError(
            f"dataset {name!r} is neither a local folder nor a reachable Hub dataset (offline, or not in the "
            f"Hub cache: {type(error).__name__}); {DATASET_LAYOUT}"
        ) from error
    except (HFValidationError, HfHubHTTPError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DatasetError(f"dataset {name!r} is not a local folder and the Hub refused it ({first}); {DATASET_LAYOUT}") from error
    metadata_file = root / METADATA_FILENAME
    metadata_dict = _read_json(metadata_file, "dataset metadata") if metadata_file.is_file() else {}
    try:
        dataset_dict = datasets.load_dataset(name, revision=revision)
    except (OSError, ValueError) as error:
        raise DatasetError(f"cannot load the Hub dataset {name!r} ({type(error).__name__}: {error}); {DATASET_LAYOUT}") from error
    return dataset_dict, root, metadata_dict


def load_dataset(path_or_repo: str | os.PathLike, revision: str | None = None):
    """Load a stil dataset from a local folder or a Hub dataset repository.

    Returns ``(DatasetDict, DatasetMetadata, TabularSchema | None)``. Raises `DatasetError` (one line
    naming the path and what a dataset must look like) for a missing path, a folder that is not a
    stil dataset, or an unreadable file.
    """
    path = Path(path_or_repo).expanduser()
    if path.exists():
        dataset_dict, root, metadata_dict = _local_dataset(path)
    else:
        dataset_dict, root, metadata_dict = _hub_dataset(str(path_or_repo), revision)
    try:
        metadata = DatasetMetadata.from_dict(metadata_dict)
    except (TypeError, ValueError) as error:
        raise DatasetError(f"invalid dataset metadata {root / METADATA_FILENAME}: {error}; {DATASET_LAYOUT}") from error
    schema = None
    if (root / SCHEMA_FILENAME).is_file():
        from .schema import SchemaError

        try:
            schema = TabularSchema.load(root)
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as error:
            if isinstance(error, SchemaError):
                raise
            raise DatasetError(f"cannot read the tabular schema {root / SCHEMA_FILENAME}: {error}; {DATASET_LAYOUT}") from error
    return dataset_dict, metadata, schema
