#!/usr/bin/env python
"""Data-loading benchmark: build time of a synthetic DVM-shaped dataset, loader throughput, profile.

    python scripts/benchmark_data.py                      # 20k samples, 128 px, workers 0 1 2
    python scripts/benchmark_data.py --workers 4 --num-samples 5000 --steps 4
    python scripts/benchmark_data.py --views stil --batch-size 8 --mu 7 --num-samples 2000 --presets dvm \
        --step-seconds 9.5       # STiL's views (one "stil" view per row) vs a training step of 9.5 s

``--on-device cpu`` (or ``cuda``) adds, per preset, the views made by data_utils.device_views: the
loader's rate when it only decodes and resizes (the CPU work left per row) and the device views' rate.

``--views stil`` times STiL's stream instead (one ``stil`` view per row: random-resized crop,
colour jitter, grey, flip at 128 px, table corrupted at 0.3; labelled rows get the same view, so the
unlabelled rate stands for both). ``--step-seconds S`` prints, per worker count, whether the loader
produces ``batch-size x (1 + mu)`` rows faster than one step of S seconds consumes them.

Throughput is measured on the *unlabelled* stream of a FixMatch-style multimodal method: per sample,
one decode, a ``weak`` and a ``strong`` image view at ``--image-size`` and their tabular corruptions
(0.1 and 0.3), batches of ``--batch-size`` x ``--mu`` rows. ``samples/s/core`` divides by the cores
the loading used (1 for num_workers=0, else min(workers, CPUs)); on a shared machine that wall-clock rate
moves with other people's load, so each batch also carries the CPU time its producing process spent on
it (``time.process_time``), giving ``samples per CPU-second``: the per-core rate, independent of load. The profile splits one batch's
single-threaded time into row fetch, decode, each view and tabular work. Results go to stdout as a
markdown table (and to ``--json``); the load average is printed because shared machines skew timings.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from data_utils.loaders import build_train_loaders, decode_image  # noqa: E402
from data_utils.views import (  # noqa: E402
    ViewConfig,
    apply_image_view,
    build_image_view,
    get_recipe,
    normalize_batch,
    sample_seeds,
    single_threaded,
)


def build_dataset(num_samples: int, image_size: int, seed: int):
    """synth-DVM from data_utils.synthetic when available, else a numpy stand-in with DVM's shape."""
    try:
        from data_utils.synthetic import make_multimodal
    except ImportError:
        return _numpy_dvm(num_samples, image_size, seed), "numpy stand-in (data_utils.synthetic missing)"
    return make_multimodal(num_samples=num_samples, image_size=image_size, seed=seed), "data_utils.synthetic.make_multimodal"


def _numpy_dvm(num_samples: int, image_size: int, seed: int):
    import io

    import datasets
    from PIL import Image

    from data_utils.io import DatasetMetadata
    from data_utils.schema import TabularSchema
    from data_utils.splits import labeled_mask, select_labeled

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 20, num_samples)
    grid = np.linspace(0, 1, image_size, dtype=np.float32)
    images = []
    for y in labels:
        base = np.stack([np.outer(grid, grid) * (y + 1) / 20, np.add.outer(grid, -grid) ** 2, rng.random() * grid[None, :].repeat(image_size, 0)], -1)
        noise = rng.normal(0, 0.05, base.shape)
        buffer = io.BytesIO()
        Image.fromarray((np.clip(base + noise, 0, 1) * 255).astype(np.uint8)).save(buffer, format="PNG")
        images.append({"bytes": buffer.getvalue(), "path": None})
    cat = {f"c{j}": rng.integers(0, 5, num_samples).tolist() for j in range(4)}
    con = {f"x{j}": rng.normal(size=num_samples).astype(np.float32).tolist() for j in range(13)}
    features = {"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=20), **{k: datasets.ClassLabel(num_classes=5) for k in cat},
                **{k: datasets.Value("float32") for k in con}, "labeled": datasets.Value("bool")}
    mask = labeled_mask(num_samples, select_labeled(labels, fraction=0.01, seed=seed))
    train = datasets.Dataset.from_dict({"image": images, "label": labels.tolist(), **cat, **con, "labeled": mask.tolist()},
                                       features=datasets.Features(features))
    schema = TabularSchema.fit({**cat, **con}, categorical=list(cat), continuous=list(con),
                               categories={k: [str(i) for i in range(5)] for k in cat})
    meta = DatasetMetadata(image_column="image", label_names=[str(i) for i in range(20)])
    return datasets.DatasetDict(train=train), meta, schema


def throughput(dd, meta, schema, cfg, workers: int, batch_size: int, mu: int, steps: int, views: dict) -> dict:
    loaders = build_train_loaders(dd, meta, schema, labeled_views={"weak": "weak"}, unlabeled_views=views,
                                  view_config=cfg, batch_size=batch_size, mu=mu, num_workers=workers,
                                  persistent_workers=True, prefetch_factor=2)
    loader = loaders.unlabeled_loader
    dataset = loaders.unlabeled_dataset
    build = dataset.__getitems__

    def timed(keys):  # CPU seconds the producing process spent on this batch (travels with it)
        start = time.process_time()
        batch = build(keys)
        batch["_cpu_s"] = time.process_time() - start
        return batch

    dataset.__getitems__ = timed  # set before the workers fork, so they run it too
    loaders.unlabeled_sampler.start_step = 0
    iterator = iter(loader)
    t0 = time.perf_counter()
    next(iterator)  # warm-up (worker start, first decode)
    warm = time.perf_counter() - t0
    start, main_cpu = time.perf_counter(), time.process_time()
    samples, cpu = 0, 0.0
    for _ in range(steps):
        batch = next(iterator)
        samples += len(batch["index"])
        cpu += batch["_cpu_s"]
    elapsed, main_cpu = time.perf_counter() - start, time.process_time() - main_cpu
    cores = 1 if workers == 0 else min(workers, os.cpu_count() or 1)
    del iterator, loader, loaders
    return {"workers": workers, "samples": samples, "seconds": elapsed, "samples_per_s": samples / elapsed,
            "samples_per_s_per_core": samples / elapsed / cores, "cores": cores, "warmup_s": warm,
            # load-independent per-core rate: samples per CPU-second of batch building
            "samples_per_cpu_s": samples / cpu,
            # consumer side (unpickling, touching shared memory) per sample, workers > 0 only
            "main_cpu_ms_per_sample": main_cpu / samples * 1e3 if workers else None}


def profile(dd, meta, schema, cfg, rows: int, views: dict) -> dict:
    """Single-threaded split of one batch's time (ms per sample)."""
    from data_utils.loaders import encode_split_tabular
    from data_utils.views import TabularPool

    train = dd["train"]
    import datasets

    images_ds = train.select_columns([meta.image_column]).cast_column(meta.image_column, datasets.Image(decode=False))
    index = list(range(rows))
    out = {}
    with single_threaded():
        t = time.perf_counter()
        values = images_ds[index][meta.image_column]
        out["fetch bytes (arrow)"] = time.perf_counter() - t
        t = time.perf_counter()
        images = [decode_image(v, cfg.num_channels, cfg.image_size)[0] for v in values]
        out["decode + resize"] = time.perf_counter() - t
        tab = encode_split_tabular(train, schema, "train")
        pool = TabularPool.from_arrays(tab)
        clean = {k: v[np.asarray(index)] for k, v in tab.items()}
        for key, name in views.items():
            recipe = get_recipe(name)
            view = build_image_view(recipe.image, cfg)
            seeds = sample_seeds(0, "unlabeled", key, np.zeros(rows), np.asarray(index))
            apply_image_view(view, images[:4], seeds[:4])
            t = time.perf_counter()
            pixels, _ = apply_image_view(view, images, seeds)
            out[f"image view {key!r}"] = time.perf_counter() - t
            t = time.perf_counter()
            normalize_batch(pixels, cfg)
            out[f"normalise {key!r}"] = time.perf_counter() - t
            t = time.perf_counter()
            recipe.tabular(clean, seeds, pool)
            out[f"tabular {key!r}"] = time.perf_counter() - t
    return {k: v / rows * 1e3 for k, v in out.items()}


def device_views_rate(dd, meta, schema, cfg, batch_size: int, mu: int, steps: int, views: dict, device: str) -> dict:
    """``--on-device``: the loader with ``views_on_device`` (decode, resize, tabular views, seeds: the CPU
    work left per row) in the main process, and the device views themselves (plan on the host, apply on
    ``device``) on the same batches, each as rows/s."""
    from dataclasses import replace

    from data_utils.device_views import DeviceViews

    on = replace(cfg, views_on_device=True)
    loaders = build_train_loaders(dd, meta, schema, labeled_views={"weak": "weak"}, unlabeled_views=views,
                                  view_config=on, batch_size=batch_size, mu=mu, num_workers=0)
    loaders.unlabeled_sampler.start_step = 0
    iterator = iter(loaders.unlabeled_loader)
    device_views = DeviceViews(on)
    device_views.prepare(next(iterator), device)  # warm-up
    batches, load_s, load_cpu = [], 0.0, 0.0
    for _ in range(steps):
        t, c = time.perf_counter(), time.process_time()
        batches.append(next(iterator))
        load_s, load_cpu = load_s + time.perf_counter() - t, load_cpu + time.process_time() - c
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    t, c = time.perf_counter(), time.process_time()
    for batch in batches:
        device_views.prepare(batch, device)
    sync()
    apply_s, apply_cpu = time.perf_counter() - t, time.process_time() - c
    rows = sum(len(b["index"]) for b in batches)
    on_device = sorted(k for k, v in batches[0].items() if isinstance(v, dict) and "device_view" in v)
    return {"device": device, "rows": rows, "views_on_device": on_device,
            "loader_rows_per_s": rows / load_s, "device_views_rows_per_s": rows / apply_s,
            # load-independent: rows per CPU-second of this (single-threaded) process
            "loader_rows_per_cpu_s": rows / load_cpu, "device_views_rows_per_cpu_s": rows / apply_cpu,
            "threads": torch.get_num_threads()}


def _report(r: dict) -> None:
    main = f"; main process {r['main_cpu_ms_per_sample']:.3f} ms/sample" if r["main_cpu_ms_per_sample"] else ""
    print(f"preset {r['preset']:8s} workers {r['workers']:2d}: {r['samples_per_s']:7.0f} samples/s wall "
          f"({r['samples_per_s_per_core']:5.0f}/core over {r['cores']} core(s)); {r['samples_per_cpu_s']:5.0f} samples "
          f"per CPU-second{main}; warm-up {r['warmup_s']:.1f} s; load {r['load_average']:.2f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-samples", type=int, default=20000)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64, help="labelled batch; unlabelled = mu x this")
    parser.add_argument("--mu", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5, help="timed unlabelled batches per setting")
    parser.add_argument("--workers", type=int, nargs="*", default=[], help="extra worker counts beside 0 1 2")
    parser.add_argument("--presets", nargs="+", default=["dvm", "default"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--uint8", action="store_true",
                        help="also time uint8 batches (ViewConfig(normalize_in_loader=False)) at the largest worker count")
    parser.add_argument("--views", default="fixmatch", choices=["fixmatch", "stil"],
                        help="fixmatch: weak + strong per unlabelled row; stil: one 'stil' view per row")
    parser.add_argument("--step-seconds", type=float, default=None,
                        help="compare with a training step of this many seconds (rows = batch-size x (1 + mu))")
    parser.add_argument("--on-device", default=None, metavar="DEVICE",
                        help="also time the views made on DEVICE (cpu, cuda): the loader's remaining CPU work per "
                             "row and data_utils.device_views' rate, on unlabelled batches (docs/benchmarks.md)")
    parser.add_argument("--only-main", action="store_true", help="time workers 0 only (skip 1, 2 and --workers)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    print(f"CPUs: {os.cpu_count()}, torch threads: {torch.get_num_threads()}, load average before: {os.getloadavg()}")
    t = time.perf_counter()
    (dd, meta, schema), how = build_dataset(args.num_samples, args.image_size, args.seed)
    build_s = time.perf_counter() - t
    print(f"built {args.num_samples} samples at {args.image_size} px in {build_s:.1f} s with {how}; splits "
          f"{ {k: len(v) for k, v in dd.items()} }")
    views = {"weak": "weak", "strong": "strong"} if args.views == "fixmatch" else {"stil": "stil"}
    results = {"num_samples": args.num_samples, "image_size": args.image_size, "build_seconds": build_s, "builder": how,
               "cpus": os.cpu_count(), "throughput": [], "profile": {}}
    for preset in args.presets:
        cfg = ViewConfig(image_size=args.image_size, preset=preset, seed=args.seed,
                         image_mean=(0.485, 0.456, 0.406), image_std=(0.229, 0.224, 0.225))
        prof = profile(dd, meta, schema, cfg, rows=args.batch_size * args.mu, views=views)
        results["profile"][preset] = prof
        print(f"\nprofile, preset {preset!r} (ms per sample, one thread):")
        for k, v in prof.items():
            print(f"  {k:28s} {v:7.3f}")
        print(f"  {'total':28s} {sum(prof.values()):7.3f}  -> {1e3 / sum(prof.values()):.0f} samples/s/core")
        for workers in ([0] if args.only_main else sorted({0, 1, 2, *args.workers})):
            r = throughput(dd, meta, schema, cfg, workers, args.batch_size, args.mu, args.steps, views)
            r["preset"] = preset
            r["load_average"] = os.getloadavg()[0]
            results["throughput"].append(r)
            _report(r)
        if args.on_device:
            r = device_views_rate(dd, meta, schema, cfg, args.batch_size, args.mu, args.steps, views, args.on_device)
            r["preset"], r["load_average"] = preset, os.getloadavg()[0]
            results.setdefault("device_views", []).append(r)
            print(f"preset {preset:8s} views on {r['device']} ({', '.join(r['views_on_device']) or 'none'}): loader "
                  f"{r['loader_rows_per_s']:7.0f} rows/s (main process; {r['loader_rows_per_cpu_s']:.0f} per CPU-second), "
                  f"device views {r['device_views_rows_per_s']:7.0f} rows/s ({r['device_views_rows_per_cpu_s']:.0f} per "
                  f"CPU-second, {r['threads']} thread(s)); load {r['load_average']:.2f}")
        if args.uint8:
            raw = ViewConfig(**{**cfg.__dict__, "normalize_in_loader": False})
            r = throughput(dd, meta, schema, raw, max({0, 1, 2, *args.workers}), args.batch_size, args.mu, args.steps, views)
            r["preset"], r["load_average"] = f"{preset} (uint8 out)", os.getloadavg()[0]
            results["throughput"].append(r)
            _report(r)
    print("\n| preset | workers | samples/s (wall) | wall samples/s/core | samples per CPU-second | "
          "main-process ms/sample | load avg |\n|---|---|---|---|---|---|---|")
    for r in results["throughput"]:
        main = f"{r['main_cpu_ms_per_sample']:.3f}" if r["main_cpu_ms_per_sample"] else "-"
        print(f"| {r['preset']} | {r['workers']} | {r['samples_per_s']:.0f} | {r['samples_per_s_per_core']:.0f} | "
              f"{r['samples_per_cpu_s']:.0f} | {main} | {r['load_average']:.2f} |")
    if args.step_seconds:
        rows = args.batch_size * (1 + args.mu)
        need = rows / args.step_seconds
        print(f"\nstep of {args.step_seconds:g} s consumes {rows} rows: {need:.1f} rows/s needed")
        for r in results["throughput"]:
            verdict = "keeps up" if r["samples_per_s"] >= need else "TOO SLOW"
            print(f"  preset {r['preset']} workers {r['workers']}: {r['samples_per_s']:.0f} rows/s -> {verdict} "
                  f"(data {rows / r['samples_per_s']:.2f} s per step)")
        results["step_seconds"], results["rows_per_step_needed_per_s"] = args.step_seconds, need
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
