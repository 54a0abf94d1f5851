#!/usr/bin/env python
"""Training-step benchmark: step time, samples/s and peak memory of one method + model config.

    python scripts/benchmark_train.py --method supervised --model-config multimodal-concat-tiny --batch 32
    python scripts/benchmark_train.py --method fixmatch --model-config image-tiny --batch 16 --mu 7 \\
        --synthetic-task image --mixed-precision bf16 --channels-last

It runs the real pieces of a training job (synthetic dataset, loaders with their views, the method,
Accelerate preparation, autocast, backward, clipping, optimizer) on the machine it is started on
(GPU when available), times ``--steps`` steps after ``--warmup`` steps, and prints one JSON line:
data time and compute time per step, samples/s (labelled + unlabelled rows), peak memory (process
RSS; CUDA max allocated on GPU). ``--markdown`` prints a table row for docs/benchmarks.md.

Side by side with the original STiL (docs/benchmarks.md; scripts/benchmark_original.py):

    python scripts/benchmark_train.py --method stil --model-config stil-dvm --batch 8 --mu 7 --image-size 128 \
        --optimizer adam --max-grad-norm 0 [--mixed-precision bf16 --channels-last]

``compute_ms`` is the step without data (forward, backward, optimizer); ``compute_cpu_ms`` the CPU time
the process spent in it (all threads): on a shared machine the wall time moves with other people's
load, the CPU time much less. ``--epoch`` sets ``TrainState.epoch`` (default: the method's
``start_epoch + 1`` when it has one, so STiL's L_pt and L_uce are in the loss as in the original's
timed steps). ``--profile N`` prints torch.profiler's top-N ops of one extra step; ``--all-methods``
runs every registered method (one subprocess each, same batch) and prints step times relative to
``supervised``.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="supervised")
    parser.add_argument("--model-config", default="multimodal-concat-tiny", help="preset name or model folder")
    parser.add_argument("--batch", type=int, default=32, help="labelled batch per process")
    parser.add_argument("--mu", type=int, default=7)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--synthetic-task", default="multimodal", choices=["multimodal", "image", "landmarks"])
    parser.add_argument("--num-samples", type=int, default=3000)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--optimizer", default=None, choices=["adamw", "adam", "sgd"], help="default: the trainer's")
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="0: no clipping (the original STiL)")
    parser.add_argument("--epoch", type=int, default=None, help="TrainState.epoch (default: method start_epoch + 1, else 0)")
    parser.add_argument("--profile", type=int, default=0, help="print torch.profiler's top-N ops of one extra step")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--all-methods", action="store_true", help="every registered method, table relative to supervised")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    if args.all_methods:
        return all_methods(args, argv if argv is not None else sys.argv[1:])

    import torch
    from accelerate.utils import send_to_device, set_seed

    output_dir = tempfile.mkdtemp(prefix="stil-benchmark-")  # a fresh folder per run, removed at exit
    atexit.register(shutil.rmtree, output_dir, ignore_errors=True)
    if args.threads:
        torch.set_num_threads(args.threads)

    from modeling_stil.methods.base import TrainState
    from modeling_stil.training.accelerator import make_accelerator
    from modeling_stil.training.arguments import parse_run_arguments
    from modeling_stil.training.batches import to_channels_last
    from modeling_stil.training.job import assemble
    from modeling_stil.training.optim import build_optimizer
    from modeling_stil.training.trainer import compile_model

    argv_run = [
        "--method", args.method, "--model", args.model_config, "--per_device_train_batch_size", str(args.batch),
        "--mu", str(args.mu), "--synthetic_task", args.synthetic_task, "--synthetic_num_samples", str(args.num_samples),
        "--synthetic_image_size", str(args.image_size), "--dataloader_num_workers", str(args.workers),
        "--mixed_precision", args.mixed_precision, "--report_to", "none", "--output_dir", output_dir,
        "--learning_rate", str(args.learning_rate),
    ]
    if args.optimizer:
        argv_run += ["--optimizer", args.optimizer]
    if args.cache_dir:
        argv_run += ["--dataset_cache_dir", args.cache_dir]
    if args.compile:
        argv_run += ["--torch_compile", "true"]
    run = parse_run_arguments(argv_run)
    accelerator = make_accelerator(run)
    set_seed(0)
    job = assemble(run, accelerator)  # the same data, model, method (+ setup) and loaders as train.py
    method, stream, metadata = job["method"], job["train_stream"], job["metadata"]
    if args.channels_last:
        method.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(method, run.training, accelerator.device.type)
    if args.compile:
        compile_model(method)
    method, optimizer = accelerator.prepare(method, optimizer)
    unwrapped = accelerator.unwrap_model(method)
    epoch = args.epoch
    if epoch is None:
        start_epoch = getattr(getattr(unwrapped, "args", None), "start_epoch", None)
        epoch = int(start_epoch) + 1 if isinstance(start_epoch, int) else 0
    state = TrainState(steps_per_epoch=stream.steps_per_epoch, max_steps=args.steps + args.warmup, task=metadata.task,
                       num_labels=metadata.num_labels, num_processes=accelerator.num_processes, epoch=epoch)
    rss_setup_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    load_before = os.getloadavg()[0]
    cuda = accelerator.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    iterator = iter(stream.iterate(0))
    data_times, step_times, cpu_times, samples = [], [], [], 0
    params = [p for group in optimizer.param_groups for p in group["params"]]

    def compute(labeled_batch, unlabeled_batch):
        state.learning_rate = float(optimizer.param_groups[0]["lr"])
        for phase in range(unwrapped.num_phases):  # meta-learning methods (L2I): several steps per iteration
            state.phase = phase
            with accelerator.autocast():
                loss, _ = method(labeled_batch, unlabeled_batch, state)
            accelerator.backward(loss)
            if args.max_grad_norm:
                accelerator.clip_grad_norm_(params, args.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        state.phase = 0
        state.step += 1  # the step is completed when the hooks run (TrainState.step)
        unwrapped.after_optimizer_step(state)
        if cuda:
            torch.cuda.synchronize()

    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        labeled_batch, unlabeled_batch = next(iterator)
        labeled_batch = send_to_device(labeled_batch, accelerator.device, non_blocking=True) if labeled_batch is not None else None
        unlabeled_batch = send_to_device(unlabeled_batch, accelerator.device, non_blocking=True) if unlabeled_batch is not None else None
        if args.channels_last:
            labeled_batch, unlabeled_batch = to_channels_last(labeled_batch), to_channels_last(unlabeled_batch)
        t1, c1 = time.perf_counter(), time.process_time()
        state.step = step
        compute(labeled_batch, unlabeled_batch)
        t2, c2 = time.perf_counter(), time.process_time()
        if step >= args.warmup:
            data_times.append(t1 - t0)
            step_times.append(t2 - t0)
            cpu_times.append(c2 - c1)
            samples += (int(labeled_batch["index"].shape[0]) if labeled_batch else 0) + (int(unlabeled_batch["index"].shape[0]) if unlabeled_batch else 0)
    total = sum(step_times)
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    load_after = os.getloadavg()[0]
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        state.step = args.warmup + args.steps
        batches = next(iterator)
        batches = [send_to_device(b, accelerator.device) if b is not None else None for b in batches]
        if args.channels_last:
            batches = [to_channels_last(b) for b in batches]
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            compute(*batches)
        sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=args.profile), file=sys.stderr)
    result = {
        "method": args.method, "model": args.model_config, "batch": args.batch,
        "mu": args.mu if unwrapped.unlabeled_views is not None else 0,
        "device": torch.cuda.get_device_name(0) if cuda else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "mixed_precision": args.mixed_precision, "channels_last": args.channels_last, "compile": args.compile,
        "steps": args.steps, "step_ms": round(1000 * total / len(step_times), 1),
        "data_ms": round(1000 * sum(data_times) / len(data_times), 1),
        "compute_ms": round(1000 * (total - sum(data_times)) / len(step_times), 1),
        "compute_ms_each": [round(1000 * (s - d), 1) for s, d in zip(step_times, data_times)],
        "compute_cpu_ms": round(1000 * sum(cpu_times) / len(cpu_times), 1),
        "threads": torch.get_num_threads(), "epoch": epoch, "optimizer": type(optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer).__name__,
        "max_grad_norm": args.max_grad_norm, "peak_rss_after_setup_mb": round(rss_setup_mb, 1),
        "load_average_1min": [round(load_before, 2), round(load_after, 2)],
        "samples_per_s": round(samples / total, 1), "peak_rss_mb": round(peak_rss_mb, 1),
        "peak_cuda_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None,
        "num_parameters": sum(p.numel() for p in unwrapped.eval_model().parameters()),
    }
    print(json.dumps(result))
    if args.markdown:
        print(f"| {result['method']} | {result['model']} | {result['batch']} | {result['mu']} | {result['device']} | "
              f"{result['mixed_precision']} | {result['step_ms']} | {result['data_ms']} | {result['samples_per_s']} | "
              f"{result['peak_rss_mb']} | {result['peak_cuda_mb'] or '-'} |")
    return 0


def all_methods(args, argv) -> int:
    """Every registered method on the same batch and data, one fresh process each (peak RSS is per
    process); step times relative to ``supervised``. A method that refuses ``--model-config`` runs
    with its preferred model (marked in the table)."""
    from modeling_stil.methods import _import_all  # noqa: F401
    from modeling_stil.methods.base import METHODS

    base = [a for a in argv if a != "--all-methods"]
    drop = {"--method", "--model-config"}
    cleaned, skip = [], False
    for a in base:
        if skip:
            skip = False
            continue
        if a in drop:
            skip = True
            continue
        if a.split("=")[0] in drop:
            continue
        cleaned.append(a)
    names = sorted(METHODS, key=lambda n: (n != "supervised", n))
    rows = []
    for name in names:
        result, note = None, ""
        for model in (args.model_config, METHODS[name].preferred_model):
            if model is None:
                continue
            cmd = [sys.executable, __file__, *cleaned, "--method", name, "--model-config", model]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
            if proc.returncode == 0 and lines:
                result = json.loads(lines[-1])
                note = "" if model == args.model_config else "(its own preferred model)"
                break
            note = (proc.stderr.strip().splitlines() or ["failed"])[-1][:120]
        rows.append((name, result, note))
        print(f"{name}: {result['compute_ms'] if result else 'failed'} ms {note}", file=sys.stderr, flush=True)
    ref = next((r for n, r, _ in rows if n == "supervised" and r), None)
    teacher = next((r for n, r, _ in rows if n == "mean_teacher" and r), None)  # the L2I family's reference

    def ratio(r, reference, key):
        return f"{r[key] / reference[key]:.2f}" if reference else "-"

    print("\n| method | model | rows/step | compute ms/step | CPU ms/step | x supervised | x mean_teacher | "
          "peak RSS MB | RSS x mean_teacher | load 1 min |\n|---|---|---|---|---|---|---|---|---|---|")
    for name, r, note in rows:
        if r is None:
            print(f"| {name} | - | - | failed: {note} | - | - | - | - | - | - |")
            continue
        rows_per_step = r["batch"] * (1 + r["mu"]) if METHODS[name].unlabeled_views else r["batch"]
        print(f"| {name} | {r['model']} {note} | {rows_per_step} | {r['compute_ms']} | {r['compute_cpu_ms']} | "
              f"{ratio(r, ref, 'compute_ms')} | {ratio(r, teacher, 'compute_ms')} | {r['peak_rss_mb']} | "
              f"{ratio(r, teacher, 'peak_rss_mb')} | {r['load_average_1min'][1]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
