#!/usr/bin/env python
"""Time forward and forward+backward passes of a stil model and record peak memory.

    python scripts/benchmark_models.py [--model stil-dvm] [--batch 512] [--image-size 128]
        [--dtype fp32|bf16] [--channels-last] [--compile] [--device auto|cpu|cuda]
        [--warmup 2] [--iters 5] [--threads N] [--json out.jsonl]

Defaults are STiL at the paper's DVM setting (batch 512, 128 px, 17 fields, 286 classes). Any preset
of ``modeling_stil.presets`` (``--model multimodal-concat``, ``wrn-28-2``, ``tcdcnn``...) or a saved
folder works; tabular presets without a schema get DVM's layout (4 categorical fields of 22/13/3/12
values + 13 continuous). Inputs are random tensors of the model input contract.

Measured: ``forward`` = eval mode under ``torch.no_grad`` (inference); ``train step`` = train mode
forward + loss + backward (no optimizer step). Times are the median of ``--iters`` after ``--warmup``
runs (compilation happens during warm-up). Peak memory: on CUDA ``torch.cuda.max_memory_allocated``
per phase; on CPU the process's peak resident set size (monotonic over the run, so the train-step
figure includes everything before it). ``--dtype bf16`` runs under ``torch.autocast`` (weights stay
fp32). ``--device auto`` uses the GPU whenever one is available.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DVM_FIELD_LENGTHS = [22, 13, 3, 12] + [1] * 13
DVM_NUM_CLASSES = 286


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="stil-dvm", help="preset name or saved folder")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--image-size", type=int, default=None, help="default: 128 for DVM-like presets, else the preset's")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--device", default="auto")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--skip-backward", action="store_true")
    p.add_argument("--json", type=Path, default=None, help="append the result as one JSON line")
    return p.parse_args(argv)


def build_model(name: str, image_size: int | None):
    from modeling_stil.configuration_stil import placeholder_schema
    from modeling_stil.presets import ALIASES, PRESETS, create_model

    key = ALIASES.get(name, name)
    overrides = {}
    if key in PRESETS:
        preset = PRESETS[key]
        if preset.family in ("image", "tabular", "multimodal"):
            overrides["num_labels"] = DVM_NUM_CLASSES
            if preset.uses_tabular and not key.endswith("-tiny"):
                overrides["tabular_schema"] = placeholder_schema(DVM_FIELD_LENGTHS[:4], 13)
        if image_size is not None and preset.uses_images:
            overrides["image_size"] = image_size
    model = create_model(name, **overrides)
    return model


def make_inputs(config, batch: int, device, channels_last: bool):
    import torch

    g = torch.Generator().manual_seed(0)
    inputs = {}
    uses_images = getattr(config, "uses_images", getattr(config, "image_size", None) is not None)
    if uses_images:
        s = config.image_size
        x = torch.randn(batch, config.num_channels, s, s, generator=g)
        x = x.to(device)
        inputs["pixel_values"] = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    schema = getattr(config, "tabular_schema", None)
    if schema:
        cat = [len(f["categories"]) for f in schema["fields"] if f["kind"] == "categorical"]
        n_con = sum(1 for f in schema["fields"] if f["kind"] == "continuous")
        if cat:
            codes = torch.stack([torch.randint(0, c, (batch,), generator=g) for c in cat], dim=1)
            inputs["categorical_values"] = codes.to(device)
        if n_con:
            inputs["continuous_values"] = torch.randn(batch, n_con, generator=g).to(device)
        inputs["missing_mask"] = torch.zeros(batch, len(cat) + n_con, dtype=torch.bool, device=device)
    if config.problem_type == "regression":
        inputs["labels"] = torch.randn(batch, config.num_labels, generator=g).to(device)
    else:
        inputs["labels"] = torch.randint(0, config.num_labels, (batch,), generator=g).to(device)
    return inputs


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def run(args) -> dict:
    import contextlib

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device))
    model = build_model(args.model, args.image_size).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    n_params = sum(p.numel() for p in model.parameters())
    config = model.config
    inputs = make_inputs(config, args.batch, device, args.channels_last)
    labels = inputs.pop("labels")
    runner = torch.compile(model) if args.compile else model

    def autocast():
        if args.dtype == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def forward():
        with torch.no_grad(), autocast():
            out = runner(**inputs)
        sync()
        return out

    def train_step():
        with autocast():
            out = runner(**inputs, labels=labels)
        loss = out.loss if out.loss is not None else out[0]
        loss.backward()
        sync()
        model.zero_grad(set_to_none=True)

    def timed(fn, phase: str):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(args.warmup):
            fn()
        times = []
        for _ in range(args.iters):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else _peak_rss_mib()
        return {f"{phase}_s": statistics.median(times), f"{phase}_min_s": min(times), f"{phase}_peak_mib": peak}

    model.eval()
    result = {
        "model": args.model, "class": type(model).__name__, "params": n_params, "batch": args.batch,
        "image_size": getattr(config, "image_size", None), "dtype": args.dtype, "channels_last": args.channels_last,
        "compile": args.compile, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
    }
    result.update(timed(forward, "forward"))
    if not args.skip_backward:
        model.train()
        result.update(timed(train_step, "train_step"))
    result["forward_samples_per_s"] = args.batch / result["forward_s"]
    if "train_step_s" in result:
        result["train_samples_per_s"] = args.batch / result["train_step_s"]
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    import modeling_stil  # noqa: F401

    result = run(args)
    mem = "peak MiB (cuda alloc)" if result["device"].startswith("cuda") else "peak RSS MiB"
    print(
        f"{result['model']} ({result['class']}, {result['params'] / 1e6:.2f} M params) on {result['device']} "
        f"[{result['device_name']}], batch {result['batch']}, {result['image_size']} px, {result['dtype']}"
        f"{', channels_last' if result['channels_last'] else ''}{', compiled' if result['compile'] else ''}"
    )
    print(f"  forward      {result['forward_s'] * 1000:9.1f} ms  ({result['forward_samples_per_s']:8.1f} samples/s)  {mem} {result['forward_peak_mib']:.0f}")
    if "train_step_s" in result:
        print(f"  fwd+backward {result['train_step_s'] * 1000:9.1f} ms  ({result['train_samples_per_s']:8.1f} samples/s)  {mem} {result['train_step_peak_mib']:.0f}")
    if args.json:
        with args.json.open("a") as handle:
            handle.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
