"""scripts/gpu_check.py: the plan names every part the GPU check must measure, each command points at
files that exist, and its dry run executes a step, the data pipeline and a launch through an engine's
command line on the CPU, writing one JSON per part and a summary."""

import json
import sys
from pathlib import Path

import pytest

from tests._helpers import ROOT, load_script

PARTS = {"stil_step_fp32", "stil_step_bf16", "stil_step_bf16_cl", "stil_step_bf16_cl_compile", "original_step_fp32",
         "original_step_bf16", "data_stil", "ddp_stil", "fsdp_stil", "fsdp_fixmatch", "deepspeed_stil",
         "deepspeed_fixmatch"}


@pytest.mark.parametrize("dry", [False, True])
def test_plan_covers_every_part_with_existing_files(tmp_path, dry, monkeypatch):
    monkeypatch.delenv("STIL_ORIGINAL_SRC", raising=False)
    gpu_check = load_script("gpu_check")
    parts = gpu_check.plan(dry, tmp_path)
    assert {p["name"] for p in parts} == PARTS
    for part in parts:
        argv = part["argv"]
        assert argv[0] == sys.executable
        for arg in argv[1:]:
            if arg.endswith((".py", ".yaml")):
                assert (ROOT / arg).exists(), f"{part['name']}: {arg} does not exist"
        if dry:
            assert "stil-dvm" not in argv and "cuda" not in argv, part["name"]
    original = [p for p in parts if p["name"].startswith("original")]
    assert all(p["skip"] and "STIL_ORIGINAL_SRC" in p["skip"] for p in original)


def test_mfu_from_samples_per_second():
    gpu_check = load_script("gpu_check")
    record = {"part": "stil_step_bf16", "status": "ok", "result": {"samples_per_s": 1000.0, "mixed_precision": "bf16"}}
    assert gpu_check.mfu(record, "NVIDIA H200") == pytest.approx(1000 * 5.4e9 / 989e12, abs=1e-4)
    assert gpu_check.mfu(record, "cpu") is None
    assert gpu_check.mfu({**record, "status": "failed"}, "NVIDIA H200") is None


@pytest.mark.slow
def test_dry_run_writes_results_for_a_step_the_data_and_an_engine_launch(tmp_path):
    gpu_check = load_script("gpu_check")
    out = tmp_path / "check"
    code = gpu_check.main(["--dry-run", "--out", str(out), "--only", "stil_step_bf16_cl", "data_stil", "fsdp_stil"])
    summary = json.loads((out / "summary.json").read_text())
    statuses = {r["part"]: r for r in summary["parts"]}
    assert code == 0, {k: r.get("output_tail") for k, r in statuses.items()}
    assert set(statuses) == {"stil_step_bf16_cl", "data_stil", "fsdp_stil"}
    assert all(r["status"] == "ok" for r in statuses.values())
    step = json.loads((out / "stil_step_bf16_cl.json").read_text())["result"]
    assert step["method"] == "stil" and step["mixed_precision"] == "bf16" and step["samples_per_s"] > 0
    assert statuses["data_stil"]["result"]["throughput"][0]["samples_per_s"] > 0
    assert Path(out / "fsdp_stil.json").exists()
