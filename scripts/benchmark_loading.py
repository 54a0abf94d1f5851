#!/usr/bin/env python
"""Forward speed of a reloaded model: weights left in the memory-mapped file vs in memory the model owns.

    python scripts/benchmark_loading.py [--models image-tiny,multimodal-tip-tiny,...] [--batch 64]
        [--threads 1] [--iters 20] [--json out.jsonl]

For each preset: build it, ``save_pretrained`` to a fresh temporary folder, then time the eval-mode
forward (``torch.no_grad``, median of ``--iters`` after 3 warm-ups, the two timed in alternation) of two reloads of the same file:
``mapped``, the safetensors file memory-mapped and assigned as transformers' loader does without our
copy (``load_state_dict(..., assign=True)``: tensors at the file's byte offsets), and ``owned``,
``AutoModel.from_pretrained`` as users call it (`modeling_common.own_aligned_memory`). It also reports
how many parameters sit at addresses that are not 64-byte aligned and whether the two outputs are
bit-equal. Inputs are random tensors of the model contract (scripts/benchmark_models.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_MODELS = "image-tiny,multimodal-tip-tiny,stil-tiny,wrn-tiny,wrn-28-2,tcdcnn,image-resnet18"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated preset names")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--json", type=Path, default=None, help="append one JSON line per model")
    return p.parse_args(argv)


def median_forward_ms(models, inputs, iters: int) -> list[float]:
    """Median forward time of each model, the models timed in alternation so that load changes on a
    shared machine hit both alike."""
    import torch

    times = [[] for _ in models]
    with torch.no_grad():
        for step in range(3 + iters):
            for model, samples in zip(models, times):
                start = time.perf_counter()
                model(**inputs)
                if step >= 3:
                    samples.append(time.perf_counter() - start)
    return [1e3 * statistics.median(samples) for samples in times]


def measure(name: str, batch: int, iters: int) -> dict:
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModel

    from scripts.benchmark_models import build_model, make_inputs

    with tempfile.TemporaryDirectory() as folder:
        build_model(name, None).save_pretrained(folder)
        owned = AutoModel.from_pretrained(folder).eval()
        mapped = type(owned)(owned.config).eval()
        mapped.load_state_dict(load_file(str(Path(folder) / "model.safetensors")), strict=False, assign=True)
        inputs = make_inputs(owned.config, batch, torch.device("cpu"), channels_last=False)
        inputs.pop("labels")
        unaligned = sum(p.data_ptr() % 64 != 0 for p in mapped.parameters())
        with torch.no_grad():
            equal = torch.equal(owned(**inputs).logits, mapped(**inputs).logits)
        mapped_ms, owned_ms = median_forward_ms([mapped, owned], inputs, iters)
    return {"model": name, "batch": batch, "threads": torch.get_num_threads(), "mapped_ms": round(mapped_ms, 2),
            "owned_ms": round(owned_ms, 2), "speedup": round(mapped_ms / owned_ms, 3),
            "unaligned_params_mapped": int(unaligned), "num_params": len(list(owned.parameters())),
            "outputs_bit_equal": bool(equal)}


def main(argv=None) -> None:
    import torch

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"{'model':24s} {'mapped ms':>10s} {'owned ms':>10s} {'speed-up':>9s} {'unaligned':>10s} bit-equal")
    for name in args.models.split(","):
        row = measure(name, args.batch, args.iters)
        print(f"{name:24s} {row['mapped_ms']:10.2f} {row['owned_ms']:10.2f} {row['speedup']:9.3f} "
              f"{row['unaligned_params_mapped']:>4d}/{row['num_params']:<5d} {row['outputs_bit_equal']}")
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
