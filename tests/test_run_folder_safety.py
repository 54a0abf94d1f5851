"""Nothing lost, nothing leaked (issue 19, items 1, 2, 14): the run folder's manifest decides what
``--overwrite_output_dir`` removes and what a run may replace; ``push_to_hub`` sends a reviewed
allow-list with no token and no absolute path; the weights' file mode follows the umask."""

from __future__ import annotations

import contextlib
import io
import json
import os
import stat
from argparse import Namespace
from pathlib import Path

import pytest
import yaml

from tests._helpers import one_error_line, tiny_fixmatch_argv
from tests._helpers import train_captured as train

TOKEN = "hf_SECRETtokenNEVERwritten42"


def argv(out: Path, cache: Path, *extra: str) -> list[str]:
    """The tiny fixmatch run of tests/_helpers.py, 2 steps; ``extra`` flags replace defaults."""
    return tiny_fixmatch_argv(out, cache, "--max_steps", "2", *extra)


def files_under(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


# ------------------------------------------------------------------------------------------- item 1
USER_FILES = {"README.md": "# my project\n", "config.json": '{"mine": true}\n', "logs/app.log": "app log\n",
              "plots/figure1.png": "not really a png\n"}


def test_user_files_are_never_called_a_run_replaced_or_removed(tmp_path, synthetic_cache):
    out = tmp_path / "mine"
    for name, text in USER_FILES.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)

    def user_files_intact():
        return all((out / name).read_text() == text for name, text in USER_FILES.items())

    # a folder of the user's files holds no run: the refusal names the files an export would replace
    for flags in ((), ("--overwrite_output_dir", "true"), ("--overwrite_output_dir", "true", "--allow_foreign_files", "true")):
        line = one_error_line(*train(argv(out, synthetic_cache, *flags))[::2])
        assert "README.md" in line and "config.json" in line, line
        assert "holds a run" not in line and "previous run" not in line, line
        assert "app.log" not in line and "figure1.png" not in line, line  # no name of theirs is needed
        assert user_files_intact() and files_under(out) == set(USER_FILES)

    # a run that needs none of their names writes beside them and lists what it wrote
    code, _, err = train(argv(out, synthetic_cache, "--export", "false", "--max_steps", "4"))
    assert code == 0, err[-3000:]
    assert user_files_intact()
    listed = json.loads((out / ".stil_manifest.json").read_text())["entries"]
    assert {"run_config.yaml", "run_info.json", "logs/metrics.jsonl", "plots/losses.png", "checkpoints/checkpoint-4"} <= set(listed)
    assert not set(listed) & set(USER_FILES)
    assert (out / "checkpoints" / "checkpoint-4").is_dir()

    # now it holds a run; overwriting it removes only what the run wrote, after the user's consent
    assert "holds a run" in one_error_line(*train(argv(out, synthetic_cache, "--export", "false"))[::2])
    line = one_error_line(*train(argv(out, synthetic_cache, "--export", "false", "--overwrite_output_dir", "true"))[::2])
    assert "README.md" in line and "--allow_foreign_files" in line
    code, _, err = train(argv(out, synthetic_cache, "--export", "false", "--overwrite_output_dir", "true", "--allow_foreign_files", "true"))
    assert code == 0, err[-3000:]
    assert user_files_intact()
    assert not (out / "checkpoints" / "checkpoint-4").exists()  # the previous run's checkpoint is gone
    assert (out / "checkpoints" / "checkpoint-2").is_dir()


def test_manifest_claims_refuse_foreign_files_and_removal_stays_inside(tmp_path):
    from modeling_stil.training import manifest

    out = tmp_path / "run"
    (out / "logs").mkdir(parents=True)
    (out / "logs" / "app.log").write_text("mine")
    (tmp_path / "outside.txt").write_text("outside")
    with pytest.raises(manifest.ForeignFileError, match="app.log"):
        manifest.claim(out, "logs/app.log")
    manifest.claim(out, "logs/metrics.jsonl").write_text("{}\n")
    manifest.claim(out, "checkpoints/checkpoint-2", kind="tree").mkdir()
    (out / "checkpoints" / "checkpoint-2" / "model.safetensors").write_bytes(b"x")
    assert manifest.claim(out, "logs/metrics.jsonl") == out / "logs" / "metrics.jsonl"  # listed: may be replaced
    # a hand-edited manifest cannot reach outside the folder
    data = json.loads((out / manifest.MANIFEST_FILENAME).read_text())
    data["entries"].update({"../outside.txt": "file", str(tmp_path / "outside.txt"): "file"})
    (out / manifest.MANIFEST_FILENAME).write_text(json.dumps(data))
    assert manifest.unlisted_files(out) == ["logs/app.log"]
    manifest.remove_listed(out)
    assert (tmp_path / "outside.txt").read_text() == "outside"
    assert files_under(out) == {"logs/app.log"} and not (out / "checkpoints").exists()


def test_a_run_folder_without_manifest_is_never_cleaned_by_guessing(tmp_path):
    from modeling_stil.training.run_folder import check_output_dir

    out = tmp_path / "old_run"
    (out / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (out / "checkpoints" / "checkpoint-2" / "trainer_state.json").write_text("{}")
    for name in ("run_info.json", "run_config.yaml", "config.json", "notes.txt"):
        (out / name).write_text("x")
    targs = Namespace(output_dir=str(out), resume_from_checkpoint=None, overwrite_output_dir=True, allow_foreign_files=True,
                      export=True, plots=True, report_to=["none"], run_name=None)
    with pytest.raises(FileExistsError, match="without a manifest") as error:
        check_output_dir(targs)
    assert "\n" not in str(error.value)
    targs.overwrite_output_dir = False
    with pytest.raises(FileExistsError, match="holds a run"):
        check_output_dir(targs)


def test_a_run_folder_written_before_manifests_resumes_and_lists_its_files(tmp_path, synthetic_cache):
    from modeling_stil.training import manifest

    out = tmp_path / "run"
    code, _, err = train(argv(out, synthetic_cache, "--max_steps", "4", "--stop_after_steps", "2", "--export", "false"))
    assert code == 0, err[-3000:]
    (out / manifest.MANIFEST_FILENAME).unlink()  # as an older stil left it
    (out / "notes.txt").write_text("mine")
    code, printed, err = train(argv(out, synthetic_cache, "--max_steps", "4", "--resume_from_checkpoint", "latest"))
    assert code == 0, err[-3000:]
    assert "written without a run manifest" in printed
    listed = manifest.read(out)
    assert {"run_config.yaml", "checkpoints/checkpoint-2", "checkpoints/checkpoint-4", "config.json", "README.md"} <= set(listed)
    assert manifest.unlisted_files(out) == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"


# ------------------------------------------------------------------------------------------- items 2, 14
class FakeHub:
    """HfApi at its boundary, offline: records every file's bytes that would be sent."""

    sent: dict[str, bytes] = {}

    def __init__(self, token=None, **kwargs):
        pass

    def create_repo(self, repo_id, **kwargs):
        return repo_id

    def upload_folder(self, *, repo_id, folder_path, ignore_patterns=None, allow_patterns=None, **kwargs):
        from huggingface_hub.utils import filter_repo_objects

        names = [p.relative_to(folder_path).as_posix() for p in Path(folder_path).rglob("*") if p.is_file()]
        for name in filter_repo_objects(names, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns):
            FakeHub.sent[name] = (Path(folder_path) / name).read_bytes()
        return f"https://huggingface.co/{repo_id}/commit/abc"

    def create_commit(self, repo_id, operations, **kwargs):
        for op in operations:
            data = op.path_or_fileobj
            FakeHub.sent[op.path_in_repo] = data if isinstance(data, bytes) else Path(data).read_bytes()
        return f"https://huggingface.co/{repo_id}/commit/abc"


@pytest.fixture(scope="module")
def pushed_run(tmp_path_factory, synthetic_cache):
    """A run stopped at step 2, resumed with ``--hub_token`` and pushed (Hub mocked), TensorBoard on,
    under umask 022."""
    import huggingface_hub

    out = tmp_path_factory.mktemp("pushed") / "run"
    FakeHub.sent = {}
    old_umask = os.umask(0o022)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(huggingface_hub, "HfApi", FakeHub)
            first = train(argv(out, synthetic_cache, "--max_steps", "4", "--stop_after_steps", "2", "--report_to", "tensorboard"))
            assert first[0] == 0, first[2][-3000:]
            second = train(argv(out, synthetic_cache, "--max_steps", "4", "--report_to", "tensorboard", "--resume_from_checkpoint", "latest",
                                "--push_to_hub", "true", "--hub_model_id", "someone/cars", "--hub_token", TOKEN))
            assert second[0] == 0, second[2][-3000:]
    finally:
        os.umask(old_umask)
    return out, dict(FakeHub.sent), first[1] + first[2] + second[1] + second[2]


def test_the_hub_token_reaches_no_file_and_no_output(pushed_run):
    out, _, printed = pushed_run
    assert any("tfevents" in name for name in files_under(out))  # TensorBoard did write (hparams included)
    leaking = [name for name in files_under(out) if TOKEN.encode() in (out / name).read_bytes()]
    assert not leaking
    assert TOKEN not in printed


def test_push_sends_an_allow_list_without_token_or_absolute_paths(pushed_run, tmp_path_factory):
    out, sent, printed = pushed_run
    assert {"config.json", "model.safetensors", "processor_config.json", "README.md", "eval_results.json", "run_config.yaml",
            "run_info.json", "logs/metrics.jsonl", "plots/losses.png"} <= set(sent)
    assert not [n for n in sent if n.startswith("checkpoints/") or "tfevents" in n or n.endswith("hparams.yml") or "/." in n
                or n.startswith(".")]
    machine_paths = {str(out), str(out.resolve()), str(tmp_path_factory.getbasetemp()), str(tmp_path_factory.getbasetemp().resolve())}
    for name, data in sent.items():
        assert TOKEN.encode() not in data, name
        assert not [p for p in machine_paths if p.encode() in data], name
    recorded = yaml.safe_load(sent["run_config.yaml"])
    assert recorded["output_dir"] == out.name and recorded["method"] == "fixmatch" and not recorded["hub_token"]
    assert json.loads(sent["eval_results.json"])["model"] == out.name
    # the upload says what it sends
    listing = [line for line in printed.splitlines() if "someone/cars" in line and "sending" in line]
    assert listing and all(name in listing[0] for name in sent)


def test_push_never_sends_a_file_the_run_did_not_write(pushed_run, monkeypatch):
    import huggingface_hub

    from modeling_stil.training.hub import push_folder

    out, _, _ = pushed_run
    (out / "plots" / "figure1.png").write_bytes(b"the user's figure")
    (out / "notes.txt").write_text("private notes")
    FakeHub.sent = {}
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    with contextlib.redirect_stdout(io.StringIO()):
        push_folder(out, "someone/cars")
    assert "README.md" in FakeHub.sent
    assert "plots/figure1.png" not in FakeHub.sent and "notes.txt" not in FakeHub.sent


def test_weights_and_every_written_file_follow_the_umask(pushed_run):
    out, _, _ = pushed_run
    modes = {name: stat.S_IMODE((out / name).stat().st_mode) for name in files_under(out)}
    assert "model.safetensors" in modes and "checkpoints/checkpoint-4/model.safetensors" in modes
    assert {name: oct(mode) for name, mode in modes.items() if mode != 0o644} == {}


def test_sent_text_has_relative_paths_and_keeps_urls(tmp_path):
    from modeling_stil.training.hub import public_text

    folder = tmp_path / "my run"
    text = (f"output_dir: {folder}\nresumed: \"{folder}/checkpoints/checkpoint-2\"\ncache: /data/someone/cache\n"
            "see https://huggingface.co/someone/cars, plots/losses.png, 36/180 rows, image/tabular, a / b\n"
            f"home: {Path.home()}/projects/z\nerror: cannot read /srv/data/a.arrow: bad")
    assert public_text(text, folder).splitlines() == [
        "output_dir: my run", 'resumed: "checkpoints/checkpoint-2"', "cache: cache",
        "see https://huggingface.co/someone/cars, plots/losses.png, 36/180 rows, image/tabular, a / b",
        "home: ~/projects/z", "error: cannot read a.arrow: bad",
    ]
