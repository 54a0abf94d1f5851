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
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
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
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)

    import torch
    from accelerate.utils import send_to_device, set_seed

    from modeling_stil.methods.base import TrainState
    from modeling_stil.training.arguments import parse_run_arguments
    from modeling_stil.training.job import assemble
    from modeling_stil.training.trainer import _to_channels_last, build_optimizer, make_accelerator

    argv_run = [
        "--method", args.method, "--model", args.model_config, "--per_device_train_batch_size", str(args.batch),
        "--mu", str(args.mu), "--synthetic_task", args.synthetic_task, "--synthetic_num_samples", str(args.num_samples),
        "--synthetic_image_size", str(args.image_size), "--dataloader_num_workers", str(args.workers),
        "--mixed_precision", args.mixed_precision, "--report_to", "none", "--output_dir", "/tmp/stil-benchmark",
    ]
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
    method, optimizer = accelerator.prepare(method, optimizer)
    unwrapped = accelerator.unwrap_model(method)
    state = TrainState(steps_per_epoch=stream.steps_per_epoch, max_steps=args.steps + args.warmup, task=metadata.task,
                       num_labels=metadata.num_labels, num_processes=accelerator.num_processes)
    cuda = accelerator.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    iterator = iter(stream.iterate(0))
    data_times, step_times, samples = [], [], 0
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        labeled_batch, unlabeled_batch = next(iterator)
        labeled_batch = send_to_device(labeled_batch, accelerator.device, non_blocking=True) if labeled_batch is not None else None
        unlabeled_batch = send_to_device(unlabeled_batch, accelerator.device, non_blocking=True) if unlabeled_batch is not None else None
        if args.channels_last:
            labeled_batch, unlabeled_batch = _to_channels_last(labeled_batch), _to_channels_last(unlabeled_batch)
        t1 = time.perf_counter()
        state.step = step
        state.learning_rate = float(optimizer.param_groups[0]["lr"])
        for phase in range(unwrapped.num_phases):  # meta-learning methods (L2I): several steps per iteration
            state.phase = phase
            with accelerator.autocast():
                loss, _ = method(labeled_batch, unlabeled_batch, state)
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        state.phase = 0
        unwrapped.after_optimizer_step(state)
        if cuda:
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        if step >= args.warmup:
            data_times.append(t1 - t0)
            step_times.append(t2 - t0)
            samples += (int(labeled_batch["index"].shape[0]) if labeled_batch else 0) + (int(unlabeled_batch["index"].shape[0]) if unlabeled_batch else 0)
    total = sum(step_times)
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {
        "method": args.method, "model": args.model_config, "batch": args.batch,
        "mu": args.mu if unwrapped.unlabeled_views is not None else 0,
        "device": torch.cuda.get_device_name(0) if cuda else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "mixed_precision": args.mixed_precision, "channels_last": args.channels_last, "compile": args.compile,
        "steps": args.steps, "step_ms": round(1000 * total / len(step_times), 1),
        "data_ms": round(1000 * sum(data_times) / len(data_times), 1),
        "compute_ms": round(1000 * (total - sum(data_times)) / len(step_times), 1),
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


if __name__ == "__main__":
    sys.exit(main())
