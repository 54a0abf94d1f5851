"""--overwrite_output_dir removes only the previous run's files and refuses, removing nothing, while the
folder holds files of the user's (unless --allow_foreign_files)."""

from __future__ import annotations

from tests._helpers import one_error_line
from tests._helpers import tiny_fixmatch_argv as argv
from tests._helpers import train_captured as train


def test_overwrite_removes_only_run_files_and_refuses_with_foreign_files(tmp_path, synthetic_cache):
    out = tmp_path / "run"
    assert train(argv(out, synthetic_cache, "--max_steps", "2", "--export", "false"))[0] == 0
    (out / "notes.txt").write_text("mine")
    line = one_error_line(*train(argv(out, synthetic_cache, "--max_steps", "2", "--overwrite_output_dir", "true"))[::2])
    assert "notes.txt" in line and "--allow_foreign_files" in line
    assert (out / "checkpoints" / "checkpoint-2").is_dir()  # nothing removed on refusal
    code, _, err = train(argv(out, synthetic_cache, "--max_steps", "2", "--overwrite_output_dir", "true", "--allow_foreign_files", "true"))
    assert code == 0, err[-3000:]
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "checkpoints" / "checkpoint-2").is_dir() and (out / "config.json").is_file()
