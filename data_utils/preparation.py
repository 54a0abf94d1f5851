"""The dataset a run trains on: the given one, or the embedded synthetic one built on first use; loaded
with a one-line explanation when a file is damaged, and its stored images decoded once (``bad_images``).

A run's data arguments (the recipe's data section: ``dataset``, ``synthetic_*``, ``labeled_fraction``,
``dataset_cache_dir``, ``bad_images``) are read here by name; nothing here imports the trainer."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .io import DatasetError

# The fraction of the synthetic dataset's training rows built with a label when a recipe gives none.
DEFAULT_SYNTHETIC_LABELED_FRACTION = 0.1


@dataclass(frozen=True)
class SyntheticBuild:
    """The embedded synthetic dataset a run without ``dataset`` builds; its parameters name its cache folder.

    ``labeled_fraction`` here is a build parameter (the labelled rows written into the dataset), not a
    redraw of an existing dataset's labels (`data_utils.labeled_split`)."""

    task: str
    num_samples: int
    image_size: int
    labeled_fraction: float = DEFAULT_SYNTHETIC_LABELED_FRACTION

    @classmethod
    def from_data_arguments(cls, data) -> "SyntheticBuild":
        fraction = data.labeled_fraction if data.labeled_fraction is not None else DEFAULT_SYNTHETIC_LABELED_FRACTION
        return cls(data.synthetic_task, data.synthetic_num_samples, data.synthetic_image_size, fraction)

    def path(self, cache_dir: str | os.PathLike | None = None) -> Path:
        root = Path(cache_dir) if cache_dir else stil_cache_dir() / "datasets"
        return root / f"synthetic-{self.task}-n{self.num_samples}-s{self.image_size}-l{self.labeled_fraction:g}"


def stil_cache_dir() -> Path:
    return Path(os.environ.get("STIL_CACHE", Path.home() / ".cache" / "stil"))


def dataset_source(data) -> str:
    """The folder or Hub id a run reads: ``dataset``, else the synthetic dataset's cache folder."""
    return data.dataset or str(SyntheticBuild.from_data_arguments(data).path(data.dataset_cache_dir))


def prepare_dataset(data, accelerator) -> tuple[str, Any, Any, Any]:
    """Resolve the dataset argument: build the embedded synthetic dataset when none is given.

    Returns ``(source, DatasetDict, DatasetMetadata, TabularSchema | None)``."""
    source = data.dataset
    if source is None:
        from .io import DatasetExistsError
        from .synthetic import make_synthetic_dataset

        build = SyntheticBuild.from_data_arguments(data)
        path = build.path(data.dataset_cache_dir)

        def build_if_missing(builder: bool) -> None:
            if builder and not path.exists():
                print(f"building the synthetic {build.task} dataset into {path}", flush=True)
                try:
                    make_synthetic_dataset(build.task, path, num_samples=build.num_samples, image_size=build.image_size,
                                           labeled_fraction=build.labeled_fraction)
                except DatasetExistsError:  # another run (same arguments, same data) finished building it first
                    print(f"another run built {path} meanwhile; using it", flush=True)

        # the main process builds it; then the first process of each other machine, if that machine does
        # not see it (a disk of its own; on a shared filesystem it is already there, so nobody races)
        with accelerator.main_process_first():
            build_if_missing(accelerator.is_main_process)
        with accelerator.local_main_process_first():
            build_if_missing(accelerator.is_local_main_process)
        source = str(path)
    dataset_dict, metadata, schema = load_dataset_or_explain(source, synthetic=data.dataset is None)
    dataset_dict = check_images(dataset_dict, metadata, data.bad_images, accelerator)
    return source, dataset_dict, metadata, schema


def load_dataset_or_explain(source: str, synthetic: bool = False):
    """``data_utils.io.load_dataset`` with a one-line error naming the unreadable split/file and how
    to rebuild it, instead of a pyarrow traceback."""
    from .io import load_dataset

    fix = (f"delete {source} and run again: the synthetic dataset is rebuilt" if synthetic else
           "rebuild it with the script that made it (scripts/prepare_dataset.py, scripts/build_*.py, "
           "scripts/make_synthetic.py) or copy it again from its origin")
    try:
        return load_dataset(source)
    except FileNotFoundError as error:  # data_utils.io.DatasetError: missing path, not a dataset, unreadable
        bad = unreadable_dataset_files(source) if Path(source).is_dir() else []
        if not bad:
            raise
        reason = str(error).strip().splitlines()[0]
        raise DatasetError(f"dataset {source} is damaged: cannot read {', '.join(bad[:5])} ({reason[:200]}); {fix}") from None
    except Exception as error:  # pyarrow.lib.ArrowInvalid / ArrowIOError, OSError, a damaged JSON file
        import pyarrow as pa

        if not isinstance(error, (pa.ArrowException, OSError, ValueError)):
            raise
        bad = unreadable_dataset_files(source)
        where = ", ".join(bad[:5]) if bad else "one of its files"
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DatasetError(f"dataset {source} is damaged: cannot read {where} ({type(error).__name__}: {reason}); {fix}") from None


def unreadable_dataset_files(source: str) -> list[str]:
    """Files of a ``save_to_disk`` folder that do not parse (arrow streams, JSON), as 'split/file' paths."""
    import pyarrow as pa

    root = Path(source)
    if not root.is_dir():
        return []
    bad = []
    for path in sorted(root.rglob("*")):
        if not path.is_file():
            continue
        try:
            if path.suffix == ".arrow":
                with pa.memory_map(str(path)) as handle:
                    pa.ipc.open_stream(handle).read_all()
            elif path.suffix == ".json":
                json.loads(path.read_text())
        except Exception:  # noqa: BLE001 -- any failure means this file is the damaged one
            bad.append(str(path.relative_to(root)))
    return bad


def check_images(dataset_dict, metadata, mode: str, accelerator=None):
    """Decode every stored image once before training (``--bad_images``): 'error' refuses the run
    listing the unreadable rows (split, row, reason); 'skip' drops them with a warning.

    Returns the dataset dict (without the bad rows in 'skip' mode)."""
    import numpy as np

    from .loaders import open_stored_image

    column = getattr(metadata, "image_column", None)
    if column is None:
        return dataset_dict
    problems: dict[str, list[tuple[int, str]]] = {}
    for split, ds in dataset_dict.items():
        if column not in ds.column_names:
            continue
        raw = ds.select_columns([column])
        feature = raw.features[column]
        if hasattr(feature, "decode"):
            import datasets

            raw = raw.cast_column(column, datasets.Image(decode=False))
        for row, value in enumerate(raw[column]):
            try:
                with open_stored_image(value) as handle:
                    handle.load()
            except Exception as error:  # noqa: BLE001 -- PIL raises many types for a damaged image
                reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                problems.setdefault(split, []).append((row, f"{type(error).__name__}: {reason}"))
    if not problems:
        return dataset_dict
    total = sum(len(v) for v in problems.values())
    listing = "; ".join(f"{split} row {row}: {reason}" for split, rows in problems.items() for row, reason in rows[:5])
    if mode != "skip":
        raise DatasetError(
            f"{total} stored image(s) cannot be decoded ({listing}{' ...' if total > 5 else ''}); repair or rebuild the "
            "dataset, or pass --bad_images skip to drop those rows"
        )
    dataset_dict = dataset_dict.copy() if hasattr(dataset_dict, "copy") else dict(dataset_dict)
    for split, rows in problems.items():
        ds = dataset_dict[split]
        if split == "train" and metadata.labeled_column not in ds.column_names and metadata.labeled_indices is not None:
            mask = np.zeros(len(ds), dtype=bool)
            mask[np.asarray(metadata.labeled_indices, dtype=np.int64)] = True
            ds = ds.add_column(metadata.labeled_column, mask.tolist())  # positions change below
        bad = {row for row, _ in rows}
        dataset_dict[split] = ds.select([i for i in range(len(ds)) if i not in bad])
    message = f"warning: --bad_images skip: dropped {total} row(s) whose image cannot be decoded ({listing})"
    (accelerator.print if accelerator is not None else print)(message)
    return dataset_dict
