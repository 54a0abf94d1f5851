"""Multi-node launch rehearsed on one machine: two `accelerate launch --cpu --num_machines 2
--machine_rank 0/1` (localhost rendezvous, one gloo process each) train what one machine with two
processes trains, to the bit (same ranks, same batches, same all-reduce)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _argv(out: Path, cache: Path) -> list[str]:
    # tabular-tiny (LayerNorm, no dropout), SGD: a default-like supervised job small enough for the suite
    return [
        str(ROOT / "train.py"), "--output_dir", str(out), "--dataset_cache_dir", str(cache),
        "--synthetic_num_samples", "200", "--labeled_fraction", "0.5", "--model", "tabular-tiny",
        "--max_steps", "4", "--eval_steps", "2", "--logging_steps", "2", "--per_device_train_batch_size", "8",
        "--per_device_eval_batch_size", "50", "--report_to", "none", "--disable_tqdm", "true", "--seed", "5",
        "--optimizer", "sgd", "--learning_rate", "0.1", "--warmup", "0",
    ]


def _command(*launcher: str) -> list[str]:
    accelerate = Path(sys.executable).with_name("accelerate")
    return [str(accelerate), "launch", "--cpu", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--num_cpu_threads_per_process", "1", *launcher]


ENV = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")


def test_two_machines_on_localhost_match_one_machine_with_two_processes(tmp_path):
    from safetensors.torch import load_file

    cache = tmp_path / "cache"
    port = 29000 + os.getpid() % 500
    one = subprocess.run(_command("--main_process_port", str(port), "--num_processes", "2", "--num_machines", "1")
                         + _argv(tmp_path / "one", cache), cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]

    # the documented commands (docs/training.md), one per "machine"; --num_processes counts all machines
    nodes = [subprocess.Popen(_command("--main_process_ip", "127.0.0.1", "--main_process_port", str(port + 1),
                                       "--num_processes", "2", "--num_machines", "2", "--machine_rank", str(rank))
                              + _argv(tmp_path / "two", cache), cwd=tmp_path, env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (1, 0)]
    try:
        outputs = [node.communicate(timeout=300) for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    for node, (_, err) in zip(nodes, outputs):
        assert node.returncode == 0, err[-3000:]

    info = json.loads((tmp_path / "two" / "run_info.json").read_text())
    assert info["num_processes"] == 2
    assert info["dataloader_num_workers"] == 0  # auto on the CPU
    a = load_file(tmp_path / "one" / "model.safetensors")
    b = load_file(tmp_path / "two" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:  # same ranks, same batches, same gloo all-reduce: equal, not merely close
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    r1 = json.loads((tmp_path / "one" / "eval_results.json").read_text())
    r2 = json.loads((tmp_path / "two" / "eval_results.json").read_text())
    assert r1["test"] == r2["test"] and r1["validation"] == r2["validation"]
    # and it trained: the compared weights are not the initialisation
    train = [json.loads(l) for l in (tmp_path / "two" / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert any(r["split"] == "train" and r["grad_norm"] > 0 for r in train)


def test_layout_read_from_the_launcher_flags_or_its_config(monkeypatch, tmp_path):
    import train

    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    for key in ("WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    launcher = ["accelerate", "launch", "--cpu"]
    cases = [
        (["--num_processes", "4"], (4, 1, 0)),
        (["--num_processes=4", "--num_machines", "2", "--machine_rank", "1"], (2, 2, 1)),  # N counts all machines
        (["--num-processes", "2", "--num-machines", "2", "--machine-rank", "0"], (1, 2, 0)),
    ]
    config = tmp_path / "nodes.yaml"
    config.write_text("num_processes: 6\nnum_machines: 3\nmachine_rank: 2\n")
    cases.append((["--config_file", str(config)], (2, 3, 2)))
    cases.append((["--config_file", str(config), "--machine_rank", "1"], (2, 3, 1)))  # a flag beats the file
    for flags, expected in cases:
        monkeypatch.setattr(train, "_launcher_argv", lambda flags=flags: [*launcher, *flags, "train.py"])
        assert train.requested_cpu_layout() == expected, flags
    monkeypatch.setenv("WORLD_SIZE", "2")  # a worker started by us (or torchrun): nothing more to start
    assert train.requested_cpu_layout() == (1, 1, 0)
