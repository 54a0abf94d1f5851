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
        if output.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
            output.rename(trash / output.name)
            staging.rename(output)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            staging.rename(output)
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


def load_dataset(path_or_repo: str | os.PathLike, revision: str | None = None):
    """Load a stil dataset from a local folder or a Hub dataset repository.

    Returns ``(DatasetDict, DatasetMetadata, TabularSchema | None)``.
    """
    import datasets

    path = Path(path_or_repo)
    if path.exists():
        if not (path / METADATA_FILENAME).is_file():
            raise FileNotFoundError(
                f"{path} is not a stil dataset (no {METADATA_FILENAME}); create one with "
                "scripts/prepare_dataset.py or scripts/make_synthetic.py"
            )
        dataset_dict = datasets.load_from_disk(str(path))
        root = path
    else:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            root = Path(
                snapshot_download(
                    str(path_or_repo), repo_type="dataset", revision=revision,
                    allow_patterns=[METADATA_FILENAME, SCHEMA_FILENAME],
                )
            )
        except LocalEntryNotFoundError as error:
            raise FileNotFoundError(
                f"{path_or_repo!r} is neither a local folder nor a reachable Hub dataset (offline?): {error}"
            ) from error
        dataset_dict = datasets.load_dataset(str(path_or_repo), revision=revision)
    metadata_file = root / METADATA_FILENAME
    metadata = DatasetMetadata.from_dict(json.loads(metadata_file.read_text())) if metadata_file.is_file() else DatasetMetadata()
    schema = TabularSchema.load(root) if (root / SCHEMA_FILENAME).is_file() else None
    return dataset_dict, metadata, schema
