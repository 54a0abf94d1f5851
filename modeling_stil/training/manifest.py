"""What a run wrote into its output_dir: ``.stil_manifest.json``, the only basis for replacing or removing
a file there.

Every path a run writes is claimed here before it is written (`claim`): a path that exists and is not
listed was not written by stil and is refused (`ForeignFileError`, one line naming it), so a user's
``README.md`` or ``config.json`` is never overwritten. ``--overwrite_output_dir`` removes exactly the
listed paths (`remove_listed`); ``push_to_hub`` sends only listed files (hub.py). File names never
decide ownership.

Entries (paths relative to the output_dir, '/'-separated) are of three kinds:

* ``file``: one file;
* ``tree``: a folder stil created whole (a checkpoint, the TensorBoard run folder): removed whole;
* ``dir``: a folder stil created to hold its files (``logs/``, ``plots/``): removed only when empty,
  so a file someone put there keeps it.

The manifest is rewritten atomically (temporary file + ``os.replace``) at every claim, before the
claimed path is written: a crash can leave a listed path missing, never an unlisted file of the run.
Only the main process claims. Entries that would point outside the folder (``..``, absolute paths,
e.g. from a hand-edited manifest) are ignored.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path, PurePosixPath
from typing import Iterable, Iterator

MANIFEST_FILENAME = ".stil_manifest.json"
KINDS = ("file", "tree", "dir")


class ForeignFileError(FileExistsError):
    """A path the run would write holds a file stil did not write."""

    def __init__(self, out: Path, names: list[str], what: str = "this run writes files of those names"):
        self.names = names
        shown = ", ".join(names[:10]) + (" ..." if len(names) > 10 else "")
        super().__init__(
            f"output_dir {out} holds {shown}, not written by stil ({MANIFEST_FILENAME} does not list "
            f"{'it' if len(names) == 1 else 'them'}), and {what}; stil never replaces or deletes such a file: "
            f"move {'it' if len(names) == 1 else 'them'} or choose another --output_dir"
        )


def _valid(rel: str) -> bool:
    path = PurePosixPath(rel)
    return bool(rel) and not path.is_absolute() and ".." not in path.parts and not rel.startswith("\\") and ":" not in path.parts[0]


def read(out: str | os.PathLike) -> dict[str, str] | None:
    """The listed entries (relative path -> kind), or None when the folder has no manifest."""
    path = Path(out) / MANIFEST_FILENAME
    if not path.is_file():
        return None
    try:
        entries = json.loads(path.read_text()).get("entries", {})
    except (ValueError, AttributeError):
        raise FileExistsError(f"{path} is damaged (not the JSON stil writes); stil cannot tell its files from yours: "
                              "delete the run folder yourself or choose another --output_dir") from None
    return {rel: kind for rel, kind in entries.items() if kind in KINDS and _valid(rel)}


def _write(out: Path, entries: dict[str, str]) -> None:
    tmp = out / (MANIFEST_FILENAME + ".tmp")
    tmp.write_text(json.dumps({"written_by": "stil", "format": 1, "entries": dict(sorted(entries.items()))}, indent=1))
    os.replace(tmp, out / MANIFEST_FILENAME)


def owns(entries: dict[str, str] | None, rel: str) -> bool:
    """Whether ``rel`` (a file or folder) was written by stil: listed as a file or tree, or inside a tree."""
    if not entries:
        return False
    if entries.get(rel) in ("file", "tree"):
        return True
    parts = PurePosixPath(rel).parts
    return any(entries.get("/".join(parts[:i])) == "tree" for i in range(1, len(parts)))


def claim_all(out: str | os.PathLike, rels: Iterable[str], kind: str = "file", adopt: bool = False) -> list[Path]:
    """List ``rels`` as written by this run (creating missing parent folders) before they are written.

    Raises `ForeignFileError` naming every one that exists without being listed; nothing is listed then.
    ``adopt``: list existing paths as well (only for the files of a run folder written before manifests)."""
    out = Path(out)
    rels = [PurePosixPath(rel).as_posix() for rel in rels]
    outside = [rel for rel in rels if not _valid(rel)]
    if outside:
        raise ValueError(f"{', '.join(outside)} would be written outside output_dir {out} (a run name or path with '..' "
                         "or an absolute path); choose a plain name")
    out.mkdir(parents=True, exist_ok=True)
    entries = read(out) or {}
    foreign = [] if adopt else [rel for rel in rels if not owns(entries, rel) and _exists(out / rel)]
    blocked = [rel for rel in rels for parent in _parents(rel) if (out / parent).exists() and not (out / parent).is_dir()]
    if foreign or blocked:
        raise ForeignFileError(out, sorted(set(foreign + blocked)))
    changed = False
    for rel in rels:
        for parent in _parents(rel):
            if not (out / parent).exists():
                (out / parent).mkdir()
                if not owns(entries, parent):
                    entries[parent] = "dir"
                    changed = True
        if entries.get(rel) != kind and not (rel not in entries and owns(entries, rel)):  # inside a listed tree: no entry
            entries[rel] = kind
            changed = True
    if changed:
        _write(out, entries)
    return [out / rel for rel in rels]


def claim(out: str | os.PathLike, rel: str, kind: str = "file") -> Path:
    return claim_all(out, [rel], kind)[0]


def forget(out: str | os.PathLike, rels: Iterable[str]) -> None:
    """Drop entries whose paths are gone (a rotated checkpoint, a renamed partial folder)."""
    out = Path(out)
    entries = read(out)
    if entries is None:
        return
    removed = [rel for rel in rels if entries.pop(PurePosixPath(rel).as_posix(), None) is not None]
    if removed:
        _write(out, entries)


def _parents(rel: str) -> list[str]:
    parts = PurePosixPath(rel).parts
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def unlisted_files(out: str | os.PathLike) -> list[str]:
    """Files in ``out`` that stil did not write (relative paths, sorted)."""
    out = Path(out)
    entries = read(out)
    found = []
    for path in sorted(out.rglob("*")):
        rel = path.relative_to(out).as_posix()
        if rel in (MANIFEST_FILENAME, MANIFEST_FILENAME + ".tmp") or path.is_dir() and not path.is_symlink():
            continue
        if not owns(entries, rel):
            found.append(rel)
    return found


def remove_listed(out: str | os.PathLike) -> list[str]:
    """Remove every listed path (the deepest first), then the manifest; nothing else is touched."""
    out = Path(out)
    entries = read(out) or {}
    removed = []
    for rel, kind in sorted(entries.items(), key=lambda item: -len(PurePosixPath(item[0]).parts)):
        path = out / rel
        if path.is_symlink() or path.is_file():
            if kind != "dir":
                path.unlink()
                removed.append(rel)
        elif path.is_dir():
            if kind == "tree":
                shutil.rmtree(path)
                removed.append(rel)
            else:
                with contextlib.suppress(OSError):  # not empty: it holds someone else's files
                    path.rmdir()
                    removed.append(rel)
    for name in (MANIFEST_FILENAME, MANIFEST_FILENAME + ".tmp"):
        with contextlib.suppress(FileNotFoundError):
            (out / name).unlink()
    return removed


def begin_staging(out: str | os.PathLike, into: str = "", name: str = ".stil-staging") -> Path:
    """An empty folder ``out/into/name`` (listed, so a leftover of an interrupted run is replaced) to
    write a group of files whose names are known only once written (``save_pretrained``, plots);
    `finish_staging` moves them into ``out/into``."""
    stage = claim(out, _join(into, name), kind="tree")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    return stage


def finish_staging(out: str | os.PathLike, stage: Path, into: str = "") -> list[Path]:
    """Claim every file written into ``stage``, give it the umask's mode and move it into ``out/into``;
    then remove ``stage``. When one would replace a file stil did not write, nothing is moved and
    `ForeignFileError` names them all."""
    from data_utils.permissions import files_like_umask

    out = Path(out)
    try:
        written = sorted(p.relative_to(stage).as_posix() for p in stage.rglob("*") if p.is_file())
        targets = claim_all(out, [_join(into, rel) for rel in written])
        files_like_umask(stage / rel for rel in written)  # safetensors writes 0600 whatever the umask
        for rel, target in zip(written, targets):
            os.replace(stage / rel, target)
        return targets
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        forget(out, [stage.relative_to(out).as_posix()])


@contextlib.contextmanager
def staged(out: str | os.PathLike, into: str = "", name: str = ".stil-staging") -> Iterator[Path]:
    """`begin_staging` ... `finish_staging` around a block (the staging folder is removed on error too)."""
    stage = begin_staging(out, into, name)
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        forget(out, [_join(into, name)])
        raise
    finish_staging(out, stage, into)


def _join(into: str, rel: str) -> str:
    into = into.strip("/")
    return f"{into}/{rel}" if into else rel
