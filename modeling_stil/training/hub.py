"""Upload of an exported run folder to the Hugging Face Hub (``HfApi.upload_folder``).

Everything is saved locally before this is called; a failure here (offline, no token, no rights)
becomes one `HubUploadError` line that says what was not uploaded and where the files are.
"""

from __future__ import annotations

import os
from pathlib import Path

# never sent: resumable training state, partial files, caches
DEFAULT_IGNORE_PATTERNS = ["checkpoints/*", "checkpoints/**", ".*", "**/.*", "*.partial*", "data/**"]


class HubUploadError(RuntimeError):
    pass


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    commit_message: str = "Upload stil model",
    ignore_patterns: list[str] | None = None,
):
    """Create ``repo_id`` if needed and upload ``folder``; returns the commit info."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise HubUploadError(f"{folder} holds no exported model (config.json); nothing to upload")
    name_repo_in_card(folder / "README.md", repo_id)
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
        return api.upload_folder(
            repo_id=repo_id,
            repo_type="model",
            folder_path=str(folder),
            commit_message=commit_message,
            ignore_patterns=ignore_patterns if ignore_patterns is not None else DEFAULT_IGNORE_PATTERNS,
        )
    except Exception as error:  # offline, auth, permissions: one clear line, files stay local
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
        hint = " (HF_HUB_OFFLINE is set)" if offline else ""
        raise HubUploadError(
            f"push to https://huggingface.co/{repo_id} failed{hint}: {type(error).__name__}: {reason}. "
            f"Everything is saved in {folder}; upload it later with `python scripts/push_to_hub.py --folder {folder} --repo-id {repo_id}`"
        ) from error


def name_repo_in_card(card: Path, repo_id: str) -> None:
    """The model card's snippets load the repository they are uploaded to (the card records the id it
    was written with in ``<!-- stil:repo_id=... -->``)."""
    import re

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
