"""What identifies a dataset for a checkpoint: its content (not its path), split sizes, labelled rows and
schema. A resumed run is compared with it (modeling_stil.training.resume)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def json_digest(obj: Any) -> str:
    """16 hex digits of the SHA-256 of ``obj`` as sorted JSON (the digest checkpoint fingerprints use)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def dataset_content_digest(source: str) -> str:
    """A digest of a dataset folder's content, not its path: a moved or copied dataset has the same one.

    Each data/metadata file contributes its path inside the folder, its size and a hash of its first
    and last MiB (cheap on large datasets; a rebuilt or edited dataset differs). A Hub id is its own name."""
    root = Path(source)
    if not root.is_dir():
        return str(source)
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        name = path.name
        if not path.is_file() or name.startswith((".", "cache-")) or path.suffix not in (".arrow", ".json", ".parquet"):
            continue
        size = path.stat().st_size
        h.update(f"{path.relative_to(root).as_posix()}\0{size}\0".encode())
        with path.open("rb") as handle:
            h.update(handle.read(1 << 20))
            if size > 2 << 20:
                handle.seek(size - (1 << 20))
                h.update(handle.read(1 << 20))
    return h.hexdigest()[:16]


def dataset_fingerprint(source: str, dataset_dict, metadata, schema, labeled: list[int]) -> dict[str, Any]:
    return {
        "content": dataset_content_digest(source),
        "task": metadata.task,
        "num_labels": metadata.num_labels,
        "split_sizes": {k: len(v) for k, v in dataset_dict.items()},
        "labeled": json_digest(labeled),
        "num_labeled": len(labeled),
        "schema": json_digest(schema.to_dict()) if schema is not None else None,
    }
