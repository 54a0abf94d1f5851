#!/usr/bin/env python
"""One prepared GPU check: every figure docs/benchmarks.md needs from one accelerator, in one run.

    python scripts/gpu_check.py --out gpu_check/            # on the GPU machine, < 8 minutes on one H200
    python scripts/gpu_check.py --out gpu_check_dry/ --dry-run   # the same code paths on the CPU, tiny sizes

Each part runs as its own subprocess (so a crash or an out-of-memory in one does not stop the others)
with its own time limit, and writes ``<out>/<part>.json``: the command, status (``ok``, ``failed`` with
the last lines of its output, ``skipped`` with the reason, ``timeout``), wall seconds and the part's
own JSON result. ``<out>/summary.json`` collects them with the machine (device name, torch/CUDA
versions) and, for the STiL steps, samples/s and model FLOPs utilisation. Parts, in order:

1. ``stil_step_{fp32,bf16,bf16_cl,bf16_cl_compile}``: our STiL step at the paper batch (64 + 448 rows,
   128 px, ResNet-50, DVM's 286 classes and 4 + 13 fields; scripts/benchmark_train.py).
2. ``original_step_{fp32,bf16}``: the original code's step on the same batch, when STIL_ORIGINAL_SRC
   names a checkout of siyi-wind/STiL (scripts/benchmark_original.py; TF32 on, as its torch 1.11 ran).
3. ``data_stil``: STiL's views at 128 px, rows/s for several worker counts (scripts/benchmark_data.py),
   and made on the GPU (``--on-device cuda``: data_utils.device_views).
4. ``ddp_stil``: ``accelerate launch`` with the multi-GPU config on one process, 20 steps of ``stil``.
5. ``{fsdp,deepspeed}_{stil,fixmatch}``: 20 steps with accelerate_configs/fsdp.yaml and
   deepspeed_zero2.yaml (DeepSpeed skipped when the package is not installed).

``--dry-run`` uses the CPU, tiny presets, 32 px, 2 timed steps and the CPU launch config (accelerate
then runs FSDP/DeepSpeed configs as plain CPU processes: the command lines and the training path are
exercised, not the engines); the suite runs it (tests/test_gpu_check.py). MFU uses 5.4 GFLOP per row
for a STiL step at 128 px (docs/benchmarks.md: student forward + backward = 3 x 1.35, teacher
forward 1.35) against the device's dense peak for the precision (H200: 989 TFLOP/s bf16, 494 TF32).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STIL_GFLOP_PER_ROW = 5.4
PEAK_TFLOPS = {"H200": {"bf16": 989.0, "fp32": 494.0}, "H100": {"bf16": 989.0, "fp32": 494.0}}


def step_part(name: str, dry: bool, extra: list[str], timeout: int) -> dict:
    if dry:
        size = ["--model-config", "stil-tiny", "--batch", "4", "--mu", "2", "--image-size", "32", "--steps", "2",
                "--warmup", "1", "--num-samples", "200", "--threads", "1"]
    else:
        size = ["--model-config", "stil-dvm", "--batch", "64", "--mu", "7", "--image-size", "128", "--steps", "20",
                "--warmup", "5", "--num-samples", "1200", "--workers", "8"]
    argv = [sys.executable, "scripts/benchmark_train.py", "--method", "stil", *size, "--optimizer", "adam",
            "--max-grad-norm", "0", *extra]
    return {"name": name, "argv": argv, "timeout": timeout, "kind": "step"}


def original_part(name: str, dry: bool, extra: list[str], timeout: int) -> dict:
    argv = [sys.executable, "scripts/benchmark_original.py", "--labelled-batch", "2" if dry else "64",
            "--steps", "2" if dry else "10", "--warmup", "1" if dry else "3",
            "--device", "cpu" if dry else "cuda", *([] if dry else ["--tf32"]), *extra]
    skip = None if os.environ.get("STIL_ORIGINAL_SRC") else "STIL_ORIGINAL_SRC names no checkout of siyi-wind/STiL"
    return {"name": name, "argv": argv, "timeout": timeout, "kind": "original", "skip": skip}


def launch_part(name: str, dry: bool, config: str, method_args: list[str], timeout: int, out: Path) -> dict:
    config_file = "accelerate_configs/cpu.yaml" if dry else f"accelerate_configs/{config}"
    steps = "2" if dry else "20"
    argv = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config_file, "--num_processes", "1",
            "train.py", *method_args, "--max_steps", steps, "--eval_steps", steps, "--save_steps", steps,
            "--report_to", "none", "--plots", "false", "--export", "false", "--disable_tqdm", "true",
            "--output_dir", str(out / f"run-{name}"), "--dataset_cache_dir", str(out / "datasets")]
    skip = None
    if config.startswith("deepspeed") and not dry:
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            skip = "deepspeed is not installed (pip install deepspeed)"
    return {"name": name, "argv": argv, "timeout": timeout, "kind": "launch", "skip": skip}


def plan(dry: bool, out: Path) -> list[dict]:
    # Synthetic data, no --init_from (the check must not depend on an earlier run); the real check
    # trains the paper's ResNet-50 STiL at 128 px so FSDP's size-based wrapping has layers to shard.
    if dry:
        size = ["--synthetic_num_samples", "200", "--per_device_train_batch_size", "4", "--mu", "2"]
        stil = ["--method", "stil", "--model", "stil-tiny", "--synthetic_task", "multimodal", *size]
        fixmatch = ["recipes/fixmatch_synthetic_image.yaml", *size]
    else:
        stil = ["--method", "stil", "--model", "stil-dvm", "--synthetic_task", "multimodal", "--synthetic_image_size",
                "128", "--per_device_train_batch_size", "64", "--mu", "7", "--dataloader_num_workers", "8"]
        fixmatch = ["recipes/fixmatch_synthetic_image.yaml", "--dataloader_num_workers", "8"]
    parts = [
        step_part("stil_step_fp32", dry, [], 150),
        step_part("stil_step_bf16", dry, ["--mixed-precision", "bf16"], 120),
        step_part("stil_step_bf16_cl", dry, ["--mixed-precision", "bf16", "--channels-last"], 120),
        step_part("stil_step_bf16_cl_compile", dry, ["--mixed-precision", "bf16", "--channels-last", "--compile"], 200),
        original_part("original_step_fp32", dry, [], 150),
        original_part("original_step_bf16", dry, ["--bf16"], 120),
    ]
    data = ["--views", "stil", "--presets", "dvm"]
    data += (["--num-samples", "200", "--image-size", "32", "--batch-size", "4", "--mu", "2", "--steps", "1"] if dry
             else ["--num-samples", "3000", "--batch-size", "64", "--mu", "7", "--steps", "4", "--workers", "4", "8", "16"])
    data += ["--on-device", "cpu" if dry else "cuda"]  # the same views made by data_utils.device_views
    parts.append({"name": "data_stil", "argv": [sys.executable, "scripts/benchmark_data.py", *data,
                                                "--json", str(out / "data_stil.result.json")],
                  "timeout": 150, "kind": "data", "result_file": out / "data_stil.result.json"})
    parts.append(launch_part("ddp_stil", dry, "multi_gpu.yaml", stil, 120, out))
    for engine, config in (("fsdp", "fsdp.yaml"), ("deepspeed", "deepspeed_zero2.yaml")):
        parts.append(launch_part(f"{engine}_stil", dry, config, stil, 120, out))
        parts.append(launch_part(f"{engine}_fixmatch", dry, config, fixmatch, 120, out))
    if dry:  # compiling takes about a minute on two cores: the flag's path is the bf16_cl step's plus one line
        parts[3]["skip"] = "dry run: torch.compile is exercised on the GPU only"
    return parts


def last_json_line(text: str):
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def run_part(part: dict, out: Path, deadline: float, env: dict) -> dict:
    record = {"part": part["name"], "command": " ".join(part["argv"])}
    remaining = deadline - time.monotonic()
    if part.get("skip"):
        record.update(status="skipped", reason=part["skip"])
    elif remaining < 20:
        record.update(status="skipped", reason="the check's time budget is spent")
    else:
        start = time.monotonic()
        try:
            proc = subprocess.run(part["argv"], cwd=ROOT, env=env, capture_output=True, text=True,
                                  timeout=min(part["timeout"], remaining), check=False)
            record["wall_s"] = round(time.monotonic() - start, 1)
            if proc.returncode == 0:
                record.update(status="ok", result=last_json_line(proc.stdout))
                if "result_file" in part:
                    record["result"] = json.loads(part["result_file"].read_text()) if part["result_file"].exists() else None
            else:
                tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
                record.update(status="failed", returncode=proc.returncode, output_tail=tail)
        except subprocess.TimeoutExpired:
            record.update(status="timeout", wall_s=round(time.monotonic() - start, 1))
    (out / f"{part['name']}.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def machine() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "host_cpus": os.cpu_count()}
    if torch.cuda.is_available():
        info.update(device=torch.cuda.get_device_name(0), cuda=torch.version.cuda,
                    memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
    else:
        info["device"] = "cpu"
    return info


def mfu(record: dict, device: str) -> float | None:
    """Model FLOPs utilisation of a STiL step record, None without a known peak."""
    result = record.get("result") or {}
    peak = next((p for name, p in PEAK_TFLOPS.items() if name in device), None)
    if record.get("status") != "ok" or not peak or "samples_per_s" not in result:
        return None
    precision = "bf16" if result.get("mixed_precision") == "bf16" or "bf16" in record["part"] else "fp32"
    return round(result["samples_per_s"] * STIL_GFLOP_PER_ROW * 1e9 / (peak[precision] * 1e12), 4)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the JSON results (created)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: the same code paths")
    parser.add_argument("--budget-s", type=float, default=450.0, help="stop starting parts after this (default 7.5 min)")
    parser.add_argument("--only", nargs="*", default=None, help="part names to run")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    if args.dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""
    info = machine() if not args.dry_run else {"device": "cpu (dry run)", "python": platform.python_version()}
    deadline = time.monotonic() + args.budget_s
    records = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        for part in plan(args.dry_run, Path(scratch)):
            if args.only and part["name"] not in args.only:
                continue
            record = run_part(part, args.out, deadline, env)
            if part["kind"] == "step":
                record["mfu"] = mfu(record, info.get("device", ""))
            records.append(record)
            print(f"{record['part']:28s} {record['status']:8s} {record.get('wall_s', '-')} s  "
                  f"{record.get('reason', '') or (record.get('result') or {}).get('samples_per_s', '')}", flush=True)
    summary = {"machine": info, "dry_run": args.dry_run, "parts": records}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    failed = [r["part"] for r in records if r["status"] in ("failed", "timeout")]
    print(f"summary: {args.out / 'summary.json'}" + (f"; failed: {', '.join(failed)}" if failed else "; nothing failed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
