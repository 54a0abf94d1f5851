"""Where a run came from, recorded in run_info.json and the model card: library versions, the git commit
of this code, and the modeling_stil modules an export ships as remote code."""

from __future__ import annotations

import os
from pathlib import Path


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    versions = {}
    for name in ("stil", "torch", "accelerate", "transformers", "huggingface_hub", "datasets", "timm", "numpy"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    import platform

    versions["python"] = platform.python_version()
    return versions


def git_commit(path: str | os.PathLike = ".") -> str | None:
    import subprocess

    try:
        out = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            dirty = subprocess.run(["git", "-C", str(path), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10)
            return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def source_commit() -> str | None:
    """The git commit of the code running this (``-dirty`` with uncommitted changes), or None outside a checkout."""
    return git_commit(Path(__file__).resolve().parents[2])


def stil_module_files() -> list[str]:
    """The files an export may copy next to its weights (custom code for ``auto_map``): modeling_stil's modules."""
    return sorted(p.name for p in Path(__file__).resolve().parents[1].glob("*.py") if p.name != "__init__.py")
