"""Upload of an exported run folder to the Hugging Face Hub (``HfApi.create_commit``).

What is sent is a reviewed allow-list (`UPLOAD_FILES`, `UPLOAD_PATTERNS`), never the whole folder:

* the export: ``config.json``, the weights (``model.safetensors`` or its shards and index),
  ``generation_config.json``, ``processor_config.json``, the custom-code copies of modeling_stil's
  modules, the model card ``README.md`` and ``eval_results.json``;
* the run's record: ``run_config.yaml``, ``run_info.json``, ``logs/metrics.jsonl`` and ``plots/*.png``.

Never sent: checkpoints (resumable training state), tracker folders such as TensorBoard's
``logs/<run name>/`` (event-file names carry the host name and process id, and TensorBoard's hparams
carry this machine's paths; ``logs/metrics.jsonl`` holds the same scalars), hidden and partial files,
and any file the run's manifest does not list (a user's own files in the folder). In the run's
record (`RECORD_FILES`: run_config.yaml, run_info.json, eval_results.json, logs/metrics.jsonl) a path
inside the run folder becomes relative to it and any other absolute path is reduced to its last name;
the token is never written to any file (arguments.py), and a last check refuses the upload, naming
the file, if a sent file still holds the token or the folder's absolute path. The upload prints the
list of what it sends.

Everything is saved locally before this is called; a failure here (offline, no token, no rights)
becomes one `HubUploadError` line that says what was not uploaded and where the files are.
"""

from __future__ import annotations

import fnmatch
import os
import re
from pathlib import Path

from . import manifest

UPLOAD_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
                "processor_config.json", "README.md", "eval_results.json", "run_config.yaml", "run_info.json",
                "logs/metrics.jsonl")
UPLOAD_PATTERNS = ("model-*-of-*.safetensors", "plots/*.png")
# the run's record, where this machine's paths are written (output_dir, dataset, cache, resumed_from, ...);
# the model files and the card are sent as written (they record names, not paths: a label such as
# "/m/01g317" must not be rewritten)
RECORD_FILES = ("run_config.yaml", "run_info.json", "eval_results.json", "logs/metrics.jsonl")
# an absolute POSIX path not preceded by a word, a dot, a tilde or a URL's "scheme:" / "//"
_ABSOLUTE_PATH = re.compile(r"(?<![\w.~:/\\-])/(?:[\w.@+-]+/)*[\w.@+-]+")


class HubUploadError(RuntimeError):
    pass


def upload_list(folder: str | os.PathLike) -> list[str]:
    """The files of ``folder`` that push_to_hub sends (relative paths): the allow-list, and of those only
    the files the run's manifest lists (by name alone in a folder written before manifests)."""
    from .provenance import stil_module_files

    folder = Path(folder)
    listed = manifest.read(folder)
    code = set(stil_module_files())
    names = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if not path.is_file() or path.is_symlink() or any(part.startswith(".") for part in rel.split("/")):
            continue
        allowed = rel in UPLOAD_FILES or rel in code or any(fnmatch.fnmatchcase(rel, p) for p in UPLOAD_PATTERNS)
        if allowed and (listed is None or manifest.owns(listed, rel)):
            names.append(rel)
    return names


def public_text(text: str, folder: Path) -> str:
    """``text`` with no absolute path of this machine: paths inside ``folder`` become relative to it (the
    folder itself its name); any other absolute path its last name; the home folder never appears."""
    roots = sorted({str(folder.absolute()), str(folder.resolve())}, key=len, reverse=True)
    for root in roots:
        text = re.sub(re.escape(root) + r"/", "", text)
        text = re.sub(re.escape(root) + r"(?![\w.@+-])", folder.name, text)
    home = str(Path.home())
    if len(home) > 1:
        text = re.sub(re.escape(home) + r"(?![\w.@+-])", "~", text)
    return _ABSOLUTE_PATH.sub(lambda m: m.group(0).rstrip("/").rsplit("/", 1)[-1], text)


def upload_contents(folder: Path, names: list[str], secrets: list[str]) -> dict[str, bytes | str]:
    """What each sent file holds: the run's record with `public_text` applied (bytes), other files by path.

    Raises `HubUploadError` naming a file that still holds a secret or the folder's absolute path."""
    contents: dict[str, bytes | str] = {}
    # a secret shorter than a real token (hf_ + 34 characters) would match ordinary text such as "token"
    private = [s.encode() for s in secrets if s and len(s) >= 8] + [str(folder.absolute()).encode(), str(folder.resolve()).encode()]
    for rel in names:
        path = folder / rel
        if rel in RECORD_FILES:
            data = public_text(path.read_text(errors="replace"), folder).encode()
            contents[rel] = data
        else:
            contents[rel] = str(path)
            data = _safetensors_header(path) if rel.endswith(".safetensors") else path.read_bytes()
        if any(value in data for value in private):
            raise HubUploadError(f"{path} holds the Hub token or this machine's path to the run folder; nothing was "
                                 "uploaded (remove it from that file, or leave that file out)")
    return contents


def _safetensors_header(path: Path) -> bytes:
    """The JSON header of a safetensors file (names, shapes, metadata): the only part that may hold text."""
    with path.open("rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        return handle.read(min(size, 100_000_000))


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    commit_message: str = "Upload stil model",
):
    """Create ``repo_id`` if needed and upload the allow-listed files of ``folder`` (`upload_list`) in
    one commit; returns the commit info."""
    from huggingface_hub import CommitOperationAdd, HfApi

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise HubUploadError(f"{folder} holds no exported model (config.json); nothing to upload")
    name_repo_in_card(folder / "README.md", repo_id)
    names = upload_list(folder)
    contents = upload_contents(folder, names, [token or "", _stored_token()])
    print(f"push_to_hub: sending {len(names)} files to https://huggingface.co/{repo_id}: {', '.join(names)} "
          "(not sent: checkpoints, TensorBoard event files, hidden files, files the run did not write)")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
        return api.create_commit(
            repo_id=repo_id,
            repo_type="model",
            operations=[CommitOperationAdd(path_in_repo=rel, path_or_fileobj=data) for rel, data in contents.items()],
            commit_message=commit_message,
        )
    except Exception as error:  # offline, auth, permissions: one clear line, files stay local
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
        hint = " (HF_HUB_OFFLINE is set)" if offline else ""
        raise HubUploadError(
            f"push to https://huggingface.co/{repo_id} failed{hint}: {type(error).__name__}: {reason}. "
            f"Everything is saved in {folder}; upload it later with `python scripts/push_to_hub.py --folder {folder} --repo-id {repo_id}`"
        ) from error


def _stored_token() -> str:
    """The logged-in token (``huggingface-cli login``), so that it too is checked for."""
    try:
        from huggingface_hub import get_token

        return get_token() or ""
    except Exception:  # noqa: BLE001 -- no token store: nothing to check for
        return ""


def name_repo_in_card(card: Path, repo_id: str) -> None:
    """The model card's snippets load the repository they are uploaded to (the card records the id it
    was written with in ``<!-- stil:repo_id=... -->``)."""
    if not card.is_file():
        return
    text = card.read_text()
    match = re.search(r"<!-- stil:repo_id=(.*?) -->", text)
    if not match or match.group(1) == repo_id:
        return
    old = match.group(1)
    text = text.replace(match.group(0), f"<!-- stil:repo_id={repo_id} -->")
    text = text.replace(f'"{old}"', f'"{repo_id}"').replace(f"--model {old} ", f"--model {repo_id} ")
    card.write_text(text)
