"""Permissions of written datasets and run files: what a plain ``mkdir`` / ``open`` would have given.

``data_utils.io.atomic_directory`` stages a dataset in ``tempfile.mkdtemp`` (mode 0700, whatever the
umask) and renames it into place, so a dataset folder would be readable by its owner only (a cluster
group could not read it). `share_like_umask` gives the folder and its sub-folders the mode a plain
``mkdir`` would have given them (0777 minus the umask), as the files inside already have.
`files_like_umask` does the same for files written through a temporary file (safetensors weights).
"""

from __future__ import annotations

import os
from pathlib import Path


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def share_like_umask(folder: str | os.PathLike) -> Path:
    folder = Path(folder)
    mode = 0o777 & ~current_umask()
    for path in [folder, *(p for p in folder.rglob("*") if p.is_dir())]:
        os.chmod(path, mode)
    return folder


def files_like_umask(paths) -> None:
    """Give files the mode a plain ``open(path, 'w')`` would have given them (0666 minus the umask).

    safetensors writes through a temporary file (mode 0600 whatever the umask), so without this the
    weights of an export or checkpoint would be readable by their owner only while every other file
    of the run follows the umask."""
    mode = 0o666 & ~current_umask()
    for path in paths:
        os.chmod(path, mode)
