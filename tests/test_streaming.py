"""--streaming (data_utils.streaming): prepare_dataset writes Parquet shards; a streamed run trains on one
and on two processes (ranks read disjoint shards); a stopped run resumes exactly from the streams' state."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests._helpers import flags, load_script, one_error_line, run_train, train_captured

ROOT = Path(__file__).resolve().parents[1]
prepare_dataset = load_script("prepare_dataset")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """A tiny synthetic image+tabular dataset (160 train rows, 40 labelled) as 4 shards per group."""
    from data_utils.builders._common import run_cli
    from data_utils.synthetic import make_synthetic_dataset

    root = tmp_path_factory.mktemp("streaming")
    make_synthetic_dataset("multimodal", root / "dataset", num_samples=240, image_size=16, labeled_fraction=0.25)
    code = run_cli(prepare_dataset.main, ["--convert", str(root / "dataset"), "--streaming-shards", "4",
                                          "--output", str(root / "shards")])
    assert code == 0
    return root / "shards"


def _stream(shards: Path | str, rank: int = 0, replicas: int = 1, workers: int = 0, window: int = 1024):
    from data_utils.streaming import StreamingTrainStream, open_streaming_dataset
    from data_utils.views import ViewConfig

    return StreamingTrainStream(open_streaming_dataset(str(shards)), labeled_views={"weak": "weak"},
                                unlabeled_views={"weak": "weak", "strong": "strong"}, view_config=ViewConfig(image_size=16),
                                batch_size=4, mu=2, num_workers=workers, num_replicas=replicas, rank=rank,
                                shuffle_window=window)


# ------------------------------------------------------------------------------------------ writing
def test_prepare_dataset_writes_sharded_parquet_from_a_table(tmp_path):
    import pyarrow.parquet as pq

    from data_utils.builders._common import run_cli
    from tests.helpers.user_table import BASE, make_table

    table = make_table(tmp_path / "raw", n=40)
    out = tmp_path / "shards"
    code = run_cli(prepare_dataset.main, ["--table", str(table), *BASE, "--labeled-fraction", "0.5",
                                          "--val-fraction", "0.2", "--test-fraction", "0.2",
                                          "--streaming-shards", "2", "--output", str(out)])
    assert code == 0
    layout = json.loads((out / "stil_streaming.json").read_text())
    assert (out / "stil_dataset.json").is_file() and (out / "tabular_schema.json").is_file()
    train = layout["splits"]["train"]
    assert [len(train[g]["files"]) for g in ("labeled", "unlabeled")] == [2, 2]
    ids = {}
    for group in ("labeled", "unlabeled"):
        tables = [pq.read_table(out / f) for f in train[group]["files"]]
        assert sum(t.num_rows for t in tables) == train[group]["num_rows"] > 0
        assert all(t.num_rows > 0 for t in tables)
        flags_ = [v for t in tables for v in t.column("labeled").to_pylist()]
        assert set(flags_) == {group == "labeled"}  # the labelled rows are those of the labeled shards
        ids[group] = {v for t in tables for v in t.column("row_id").to_pylist()}
        positions = sorted(v for t in tables for v in t.column("stream_position").to_pylist())
        assert positions == list(range(train[group]["num_rows"]))
    assert not ids["labeled"] & ids["unlabeled"]
    assert ids["labeled"] | ids["unlabeled"] == set(range(train["labeled"]["num_rows"] + train["unlabeled"]["num_rows"]))
    assert {"validation", "test"} <= set(layout["splits"])


def test_convert_refuses_too_many_shards_and_an_existing_output_in_one_line(shards, tmp_path, capsys):
    from data_utils.builders._common import run_cli

    source = shards.parent / "dataset"
    assert run_cli(prepare_dataset.main, ["--convert", str(source), "--streaming-shards", "41",
                                          "--output", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fewer than --streaming-shards 41" in err[0]
    assert run_cli(prepare_dataset.main, ["--convert", str(source), "--streaming-shards", "2",
                                          "--output", str(shards)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err


def test_shards_at_an_fsspec_url_are_written_and_streamed(shards):
    """Any fsspec URL, not only a local folder: fsspec's in-memory filesystem stands for s3:// or gs://."""
    import fsspec

    from data_utils.io import load_dataset
    from data_utils.streaming import open_streaming_dataset, write_streaming_shards

    url = "memory://stil-test/shards"
    try:
        write_streaming_shards(*load_dataset(str(shards.parent / "dataset")), url, 2)
        data = open_streaming_dataset(url)
        assert all(u.startswith("memory://") for u in data.urls(data.group("unlabeled")["files"]))
        assert len(data.labeled_row_ids()) == 40 and len(data.eval_split("validation")) == 40
        stream = _stream(url)
        labeled, unlabeled = next(stream.iterate(0))
        stream.close()
        assert labeled["index"].shape == (4,) and unlabeled["weak"]["pixel_values"].shape == (8, 3, 16, 16)
    finally:
        fsspec.filesystem("memory").rm("/stil-test", recursive=True)


# ------------------------------------------------------------------------------------------ reading
def test_two_ranks_read_disjoint_rows_covering_the_pass(shards):
    """4 shards per group over 2 ranks: each rank reads 2 whole shards; within one pass no row twice."""
    seen = []
    for rank in (0, 1):
        stream = _stream(shards, rank=rank, replicas=2)
        steps = stream.iterate(0)
        batches = [next(steps) for _ in range(7)]  # 7 x 8 = 56 of the rank's 60 unlabelled rows
        stream.close()
        unlabeled = [i for _, u in batches for i in u["index"].tolist()]
        labeled = [i for l, _ in batches[:5] for i in l["index"].tolist()]  # 5 x 4 = the rank's 20 labelled rows
        assert len(set(unlabeled)) == len(unlabeled) and len(set(labeled)) == len(labeled) == 20
        seen.append((set(labeled), set(unlabeled)))
    assert not seen[0][0] & seen[1][0] and not seen[0][1] & seen[1][1]
    assert len(seen[0][0] | seen[1][0]) == 40  # every labelled row in one pass
    assert batches[0][0]["weak"]["pixel_values"].shape == (4, 3, 16, 16) and batches[0][1]["index"].shape == (8,)


def test_a_shard_count_that_does_not_divide_by_the_ranks_still_gives_disjoint_rows(shards):
    """4 shards over 3 ranks: every rank reads every shard and keeps every third row (split_dataset_by_node)."""
    seen = []
    for rank in range(3):
        stream = _stream(shards, rank=rank, replicas=3)
        steps = stream.iterate(0)
        seen.append([i for _ in range(5) for i in next(steps)[1]["index"].tolist()])  # 5 x 8 = 40 = 120 / 3
        stream.close()
    assert sorted(i for rows in seen for i in rows) == sorted(set(i for rows in seen for i in rows))
    assert len(set().union(*map(set, seen))) == 120


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_from_the_stream_state_continues_exactly(shards, workers):
    """Stop inside a shuffle window of the second pass, save the state as a checkpoint does (weights_only
    load), rebuild the stream: the next batches (rows, order and augmentations) are the uninterrupted ones."""
    import io

    stream = _stream(shards, workers=workers, window=7)
    steps = stream.iterate(0)
    for _ in range(13):  # the labelled stream (40 rows, batch 4) is in its second pass
        next(steps)
    buffer = io.BytesIO()
    torch.save(stream.state_dict(), buffer)
    expected = [next(steps) for _ in range(5)]
    stream.close()
    buffer.seek(0)
    resumed = _stream(shards, workers=workers, window=7)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    with pytest.raises(ValueError, match="cannot start at step 0"):
        next(resumed.iterate(0))
    again = resumed.iterate(13)
    got = [next(again) for _ in range(5)]
    resumed.close()
    for (l1, u1), (l2, u2) in zip(expected, got):
        assert l1["index"].tolist() == l2["index"].tolist()
        assert u1["index"].tolist() == u2["index"].tolist()
        assert torch.equal(u1["strong"]["pixel_values"], u2["strong"]["pixel_values"])
        assert torch.equal(u1["strong"]["continuous_values"], u2["strong"]["continuous_values"])
    if workers:
        other = _stream(shards, workers=1)
        buffer.seek(0)
        with pytest.raises(ValueError, match="same --num_processes and --dataloader_num_workers"):
            other.load_state_dict(torch.load(buffer, weights_only=True))


# ------------------------------------------------------------------------------------------ runs
RUN = {"streaming": "true", "method": "fixmatch", "mu": "2", "per_device_train_batch_size": "4",
       "per_device_eval_batch_size": "64", "max_steps": "4", "eval_steps": "2", "logging_steps": "2",
       "learning_rate": "0.01", "report_to": "none", "disable_tqdm": "true", "seed": "3",
       "dataloader_num_workers": "0", "model": "multimodal-concat-tiny", "plots": "false"}


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run / "model.safetensors")


def test_streamed_run_stopped_and_resumed_equals_the_uninterrupted_run(shards, tmp_path):
    whole, parted = tmp_path / "whole", tmp_path / "parted"
    assert run_train(flags({"dataset": str(shards), "output_dir": str(whole), **RUN})) == 0
    assert run_train(flags({"dataset": str(shards), "output_dir": str(parted), **RUN}, "--stop_after_steps", "2")) == 0
    state = parted / "checkpoints" / "checkpoint-2" / "custom_checkpoint_1.pkl"
    assert state.is_file()  # the streams' positions, next to the trainer's own state
    assert run_train(flags({"dataset": str(shards), "output_dir": str(parted), **RUN},
                           "--resume_from_checkpoint", "latest")) == 0
    a, b = _weights(whole), _weights(parted)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    log = lambda run: [json.loads(l) for l in (run / "logs" / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert [r for r in log(whole) if r["split"] != "train"] == [r for r in log(parted) if r["split"] != "train"]
    results = json.loads((whole / "eval_results.json").read_text())
    assert results["test"]["num_samples"] == 40


@pytest.mark.parametrize("extra, expected", [
    (("--max_steps", "-1"), "--streaming needs --max_steps"),
    (("--labeled_fraction", "0.5"), "reads the labelled split written into the shards"),
])
def test_streaming_refuses_what_cannot_work_in_one_line(shards, tmp_path, extra, expected):
    code, _, err = train_captured(flags({"dataset": str(shards), "output_dir": str(tmp_path / "r"), **RUN}, *extra))
    assert expected in one_error_line(code, err)


def test_streaming_needs_a_shard_folder(shards, tmp_path):
    code, _, err = train_captured(flags({"dataset": str(shards.parent / "dataset"), "output_dir": str(tmp_path / "r"),
                                         **RUN}))
    assert "is not a streaming dataset folder" in one_error_line(code, err)


def _launch(args: list[str], processes: int, cwd: Path) -> subprocess.CompletedProcess:
    accelerate = Path(sys.executable).with_name("accelerate")
    command = [str(accelerate), "launch", "--cpu", "--main_process_port", str(29900 + os.getpid() % 90),
               "--num_processes", str(processes), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    return subprocess.run(command + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_two_process_streamed_run_resumes_exactly(shards, tmp_path):
    """accelerate launch --num_processes 2 --cpu: each rank reads 2 of the 4 shards of each group; a run
    stopped at step 2 and resumed (both ranks' positions in one checkpoint) ends as the uninterrupted one."""
    def argv(out, *extra):  # 3 steps, one evaluation, no export: three 2-process launches stay short; both runs
        # checkpoint at step 2 (a checkpoint averages BatchNorm statistics over the processes)
        return [str(ROOT / "train.py"), *flags({"dataset": str(shards), "output_dir": str(out), **RUN}, "--max_steps", "3",
                                               "--eval_steps", "3", "--save_steps", "2", "--export", "false", *extra)]

    whole = _launch(argv(tmp_path / "whole"), 2, tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]
    first = _launch(argv(tmp_path / "parted", "--stop_after_steps", "2"), 2, tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    second = _launch(argv(tmp_path / "parted", "--resume_from_checkpoint", "latest"), 2, tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert json.loads((tmp_path / "whole" / "run_info.json").read_text())["num_processes"] == 2
    checkpoint = lambda run: _weights(run / "checkpoints" / "checkpoint-3")  # noqa: E731
    a, b = checkpoint(tmp_path / "whole"), checkpoint(tmp_path / "parted")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    for result in (whole, first, second):
        assert "Exception ignored" not in result.stderr, result.stderr[-2000:]
