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
    from modeling_stil.training.trainer import JobError, make_accelerator

    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    monkeypatch.setenv(f"ACCELERATE_USE_{engine}", "true")
    args = parse_run_arguments(["--output_dir", str(tmp_path / "run"), "--report_to", "none"])
    with pytest.raises(JobError, match=f"^{name} was asked for on the CPU"):
        make_accelerator(args)
