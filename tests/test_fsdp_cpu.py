"""FSDP (or DeepSpeed) asked for on the CPU stops at start-up with one line: Accelerate runs neither
on the CPU and silently trained with DDP instead (issue 23 item 1)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_fsdp_config_with_use_cpu_stops_at_start_up(tmp_path):
    config = yaml.safe_load((ROOT / "accelerate_configs" / "fsdp.yaml").read_text())
    config.update(use_cpu=True, num_processes=2, main_process_port=29000 + os.getpid() % 500)
    (tmp_path / "fsdp_cpu.yaml").write_text(yaml.safe_dump(config))
    accelerate = Path(sys.executable).with_name("accelerate")
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    done = subprocess.run([str(accelerate), "launch", "--config_file", str(tmp_path / "fsdp_cpu.yaml"), str(ROOT / "train.py"),
                           "--output_dir", str(tmp_path / "run"), "--dataset_cache_dir", str(tmp_path / "cache"),
                           "--max_steps", "2", "--report_to", "none"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    lines = [l for l in done.stderr.splitlines() if l.startswith("train.py:")]
    assert len(lines) == 1 and "FSDP" in lines[0] and "silently be DDP" in lines[0], done.stderr[-2000:]
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()  # nothing started


@pytest.mark.parametrize("engine, name", [("FSDP", "FSDP"), ("DEEPSPEED", "DeepSpeed")])
def test_process_told_to_use_an_engine_on_the_cpu_is_refused(monkeypatch, tmp_path, engine, name):
    from modeling_stil.training.arguments import parse_run_arguments
    from modeling_stil.training.accelerator import make_accelerator
    from modeling_stil.training.errors import JobError

    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    monkeypatch.setenv(f"ACCELERATE_USE_{engine}", "true")
    args = parse_run_arguments(["--output_dir", str(tmp_path / "run"), "--report_to", "none"])
    with pytest.raises(JobError, match=f"^{name} was asked for on the CPU"):
        make_accelerator(args)


def _ema_under_fully_shard(rank: int, world: int, store: str, out: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from modeling_stil.methods.common import EMATeacher

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6))
    holder = torch.nn.Module()
    holder.model, holder.ema = student, EMATeacher(student)
    expected = {k: v.clone() for k, v in holder.ema.module.state_dict().items()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
        student[1].running_mean.add_(2.0)
    after = {k: v.detach().clone() for k, v in student.state_dict().items()}
    fully_shard(holder, mesh=init_device_mesh("cpu", (world,)))  # the root, as Accelerate's size policy does for small modules
    holder.ema.update(holder.model, 0.5)
    result = {}
    for name, value in holder.ema.module.state_dict().items():
        full = value.full_tensor() if hasattr(value, "full_tensor") else value
        result[name] = (type(value).__name__, full)
        if expected[name].is_floating_point():
            expected[name] = 0.5 * expected[name] + 0.5 * after[name]
        else:
            expected[name] = after[name]
    if rank == 0:
        torch.save({"result": result, "expected": expected}, out)
    # both ranks leave together: a rank that tears gloo down while its peer is still writing can abort
    # (SIGABRT) in the peer's connection teardown
    dist.barrier()
    dist.destroy_process_group()


def test_ema_teacher_updates_under_fsdp2_fully_shard(tmp_path):
    """Under FSDP2 the teacher's parameters are sharded DTensors and its buffers plain tensors; the EMA
    update averaged them in one foreach group, which torch refuses (mixed Tensor and DTensor)."""
    import torch
    import torch.multiprocessing as mp

    out = tmp_path / "ema.pt"
    mp.start_processes(_ema_under_fully_shard, args=(2, str(tmp_path / "store"), str(out)), nprocs=2, start_method="spawn")
    saved = torch.load(out, weights_only=False)
    kinds = {name: kind for name, (kind, _) in saved["result"].items()}
    assert kinds["0.weight"] == "DTensor" and kinds["1.running_mean"] == "Tensor"  # parameters sharded, buffers replicated
    for name, (_, value) in saved["result"].items():
        torch.testing.assert_close(value, saved["expected"][name], msg=name)
