#!/usr/bin/env python
"""Time one optimisation step of the ORIGINAL STiL training code (siyi-wind/STiL, CVPR 2025), side by
side with ours (scripts/benchmark_train.py; figures in docs/benchmarks.md).

The original code is imported, never copied: STIL_ORIGINAL_SRC must name a checkout (or a `git
archive`) of siyi-wind/STiL. The harness builds `models.Disentangle.STiLModel.STiLModel` in the DVM
configuration read from that checkout's own Hydra files, with random weights (checkpoint=None),
feeds it synthetic batches in the exact format of `ContrastiveImagingAndTabularDataset` after the
default collate, and times a full step the way Lightning's automatic optimisation runs it:
batch to device -> training_step -> loss.backward() -> optimizer.step() -> optimizer.zero_grad(),
with the optimizer that the module's own `configure_optimizers` returns (Adam, lr 1e-4).

    STIL_ORIGINAL_SRC=<checkout> python scripts/benchmark_original.py                      # CPU, 8+56
    STIL_ORIGINAL_SRC=<checkout> python scripts/benchmark_original.py --labelled-batch 16  # 16+112
    STIL_ORIGINAL_SRC=<checkout> python scripts/benchmark_original.py --labelled-batch 64 --device cuda
    add --bf16 for bf16 autocast (the original trains in fp32; for information only)

Printed last, as one JSON line: per-step wall and CPU ms (`time.process_time`, all threads: the
load-independent figure that scripts/benchmark_train.py reports as ``compute_cpu_ms``) and the
1-minute load average before and after.

Needs torch, torchvision, timm, einops, omegaconf, pytorch_lightning and torchmetrics >= 0.11
(`task=` argument). No Trainer is built, so a current Lightning 2.x works although the module
still defines the 1.x hook `training_epoch_end`.

Everything the harness changes lives in this process; no file of the checkout is written
(bytecode writing is switched off before the import):
  1. `lightly.models.modules.SimCLRProjectionHead` is a stand-in with the semantics of the pinned
     lightly 1.2.22: Linear(in, hidden) -> ReLU -> Linear(hidden, out), both with bias, no
     BatchNorm (newer lightly adds BatchNorm, i.e. different compute). Module path `layers.0/2`
     as in lightly, so parameter names match.
  2. `pl_bolts.optimizers.lr_scheduler.LinearWarmupCosineAnnealingLR` is a stand-in that only
     records its arguments. The original uses it only in `configure_optimizers`; Lightning steps
     it once per epoch, never inside a training step, so it changes no per-step work.
  3. `current_epoch`: LightningModule's property returns `trainer.current_epoch`, or 0 without a
     Trainer. `training_step` adds L_pt and L_uce to the loss only when
     `current_epoch > start_epoch` (35 for DVM). A subclass (`_STiLAtEpoch`) overrides that one
     property to return `bench_epoch`, set to start_epoch + 1 for the timed steps, so every loss
     term enters the loss and the backward pass. Nothing else of the class is overridden.
  4. `prototypes` (a buffer, zeros until the first epoch end) is filled with unit vectors, as
     after some epochs; this changes values, not the amount of work.
  5. `use_ddp` is forced to False (single-process benchmark; the original sets it from
     torch.cuda.device_count() and would all_reduce without a process group on a multi-GPU host).

Timed as the original does it: the torchmetrics updates inside `training_step` and its
`torch.cuda.empty_cache()` at the end of every step (on a GPU this returns the allocator's cache,
so the next step allocates again). `optimizer.zero_grad()` uses the installed torch's default.
Not timed: data loading and augmentation (batches are pre-built), validation, epoch-end hooks.
Without a Trainer `self.log` returns at once, so Lightning's logging bookkeeping (about 15 scalar
`self.log` calls per step, on_epoch accumulation) is not included; the torchmetrics updates that
`training_step` performs itself are.
"""
import argparse
import contextlib
import io
import json
import os
import resource
import statistics
import sys
import tempfile
import time
import types
import warnings

import pytorch_lightning
import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn

# DVM in the paper's setting: the main config plus the Hydra defaults it pulls in (later files win).
CONFIG_FILES = ("config_dvm_STiL.yaml", "models/resnet50.yaml",
                "dataset/dvm_all_server_reordered_SemiPseudo_0.01.yaml")
DVM_CAT_LENGTHS = [22, 13, 3, 12]
DVM_NUM_CON = 13
# What the brief fixes; checked against the checkout's config so a drifted checkout fails loudly.
EXPECTED = dict(model="resnet50", img_size=128, num_classes=286, num_cat=4, num_con=13,
                tabular_embedding_dim=512, multimodal_embedding_dim=512,
                tabular_transformer_num_layers=4, multimodal_transformer_num_layers=1,
                projection_dim=128, temperature=0.1, use_ema=True, eman=True, lr_eval=1e-4)
# evaluate.py sets repeat_ratio = max(u_N // (ratio * l_N) - 1, 1), about 13 for DVM 1%; it only
# scales the labelled prototype sums.
REPEAT_RATIO = 13


# ----------------------------------------------------------------------------- stand-ins

class _SimCLRProjectionHead(nn.Module):
    """lightly 1.2.22 SimCLRProjectionHead: Linear -> ReLU -> Linear, no BatchNorm."""

    def __init__(self, input_dim=2048, hidden_dim=2048, output_dim=128):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(input_dim, hidden_dim), nn.ReLU(),
                                    nn.Linear(hidden_dim, output_dim))

    def forward(self, x):
        return self.layers(x)


class _LinearWarmupCosineAnnealingLR:
    """Records its arguments; see point 2 of the module docstring."""

    def __init__(self, optimizer, warmup_epochs, max_epochs, warmup_start_lr=0.0, eta_min=0.0,
                 last_epoch=-1):
        self.optimizer, self.warmup_epochs, self.max_epochs = optimizer, warmup_epochs, max_epochs


def install_stand_ins():
    def module(name, **attrs):
        m = types.ModuleType(name)
        m.__dict__.update(attrs)
        sys.modules[name] = m
        return m

    module("lightly", models=module("lightly.models", modules=module(
        "lightly.models.modules", SimCLRProjectionHead=_SimCLRProjectionHead)))
    module("pl_bolts", optimizers=module("pl_bolts.optimizers", lr_scheduler=module(
        "pl_bolts.optimizers.lr_scheduler",
        LinearWarmupCosineAnnealingLR=_LinearWarmupCosineAnnealingLR)))


def import_original(src):
    sys.dont_write_bytecode = True  # keep the checkout untouched (no __pycache__)
    sys.path.insert(0, src)
    install_stand_ins()
    warnings.filterwarnings("ignore", category=FutureWarning)  # timm.models.layers is deprecated
    from models.Disentangle.STiLModel import STiLModel

    class _STiLAtEpoch(STiLModel):
        """STiLModel with `current_epoch` pinned (point 3 of the module docstring)."""
        bench_epoch = 0

        @property
        def current_epoch(self):
            return self.bench_epoch

    return _STiLAtEpoch


# ----------------------------------------------------------------------------- model and data

def dvm_hparams(src, lengths_path, n_labelled, n_unlabelled):
    from omegaconf import OmegaConf
    parts = []
    for name in CONFIG_FILES:
        part = OmegaConf.load(os.path.join(src, "configs", name))
        part.pop("defaults", None)
        parts.append(part)
    hp = OmegaConf.merge(*parts)
    for key, want in EXPECTED.items():
        if hp[key] != want:
            sys.exit(f"checkout config has {key}={hp[key]}, expected {want}")
    hp.merge_with(dict(
        checkpoint=None,                      # random init: no TIP checkpoint to load
        field_lengths_tabular=lengths_path,
        batch_size=n_labelled + n_unlabelled,  # evaluate.py splits it as l = bs // (1 + ratio)
        unlabelled_ratio=n_unlabelled // n_labelled,
        repeat_ratio=REPEAT_RATIO, logdir=None))
    return hp


def build(model_cls, hp, device):
    # The constructors print the whole module tree; keep the output to figures.
    with contextlib.redirect_stdout(io.StringIO()):
        model = model_cls(hp)
    model.use_ddp = False
    with torch.no_grad():
        model.prototypes.copy_(F.normalize(torch.randn_like(model.prototypes), dim=1))
    model.to(device).train()
    optimizer = model.configure_optimizers()["optimizer"]
    return model, optimizer


def make_batch(n, labelled, img_size, num_classes, gen):
    """One collated `ContrastiveImagingAndTabularDataset` batch:
    (im_views, tab_views, y, unaugmented_image, is_labelled) with im_views = [placeholder 0,
    augmented image in [0,1]] and tab_views = [clean table, corrupted table]; the table holds the
    categorical codes first (as floats), then z-scored continuous values."""
    image = lambda: torch.rand(n, 3, img_size, img_size, generator=gen)
    cat = torch.stack([torch.randint(0, k, (n,), generator=gen) for k in DVM_CAT_LENGTHS], 1)
    clean = torch.cat([cat.float(), torch.randn(n, DVM_NUM_CON, generator=gen)], 1)
    # Corruption as in the dataset: floor(0.3 F) fields per row take another row's value.
    n_fields = clean.shape[1]
    cols = torch.rand(n, n_fields, generator=gen).argsort(1)[:, :int(0.3 * n_fields)]
    donors = torch.randint(0, n, cols.shape, generator=gen)
    corrupted = clean.clone()
    corrupted[torch.arange(n)[:, None], cols] = clean[donors, cols]
    return ([torch.zeros(n), image()], [clean, corrupted],
            torch.randint(0, num_classes, (n,), generator=gen), image(),
            torch.full((n,), labelled, dtype=torch.bool))


def tensor_map(fn, obj):
    """Apply fn to every tensor of a (nested) batch, keeping its structure."""
    if torch.is_tensor(obj):
        return fn(obj)
    if isinstance(obj, (list, tuple)):
        return type(obj)(tensor_map(fn, o) for o in obj)
    if isinstance(obj, dict):
        return {k: tensor_map(fn, v) for k, v in obj.items()}
    return obj


def to_device(obj, device):
    """Lightning's batch transfer: every tensor, non_blocking on an accelerator."""
    return tensor_map(lambda t: t.to(device, non_blocking=device.type != "cpu"), obj)


# ----------------------------------------------------------------------------- timing

def peak_rss_gib():
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**30 if sys.platform == "darwin" else rss / 2**20  # bytes on macOS, KiB on Linux


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--labelled-batch", type=int, default=8, help="B_l (paper: 64)")
    ap.add_argument("--unlabelled-ratio", type=int, default=7, help="B_u = ratio * B_l (paper: 7)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (the original is fp32)")
    ap.add_argument("--tf32", action="store_true",
                    help="CUDA: TF32 matmuls, the default of the pinned torch 1.11 (off in torch>=1.12)")
    ap.add_argument("--seed", type=int, default=2022)
    args = ap.parse_args()

    src = os.environ.get("STIL_ORIGINAL_SRC")
    if not src or not os.path.isfile(os.path.join(src, "models", "Disentangle", "STiLModel.py")):
        sys.exit("set STIL_ORIGINAL_SRC to a checkout of siyi-wind/STiL")
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if cuda:
        torch.cuda.set_device(device)  # so synchronize() and the memory stats see this device
        torch.backends.cudnn.benchmark = False  # as run.py sets it
        if args.tf32:
            torch.set_float32_matmul_precision("high")
    # Expected warnings, kept out of the figures: Lightning's "self.log without a Trainer" (see
    # docstring) and torchmetrics' per-batch AUROC on a batch that lacks some classes.
    warnings.filterwarnings("ignore", message=".*self.log.*")
    warnings.filterwarnings("ignore", message="No (positive|negative) samples in targets")

    model_cls = import_original(src)
    n_l, n_u = args.labelled_batch, args.labelled_batch * args.unlabelled_ratio
    with tempfile.TemporaryDirectory() as tmp:
        lengths_path = os.path.join(tmp, "tabular_lengths.pt")
        torch.save(DVM_CAT_LENGTHS + [1] * DVM_NUM_CON, lengths_path)
        hp = dvm_hparams(src, lengths_path, n_l, n_u)
        model, optimizer = build(model_cls, hp, device)
    rss_built = peak_rss_gib()

    gen = torch.Generator().manual_seed(args.seed)
    batches = [{"l": make_batch(n_l, True, hp.img_size, hp.num_classes, gen),
                "u": make_batch(n_u, False, hp.img_size, hp.num_classes, gen)} for _ in range(2)]
    if cuda:  # the original's loaders use pin_memory=True
        batches = [tensor_map(torch.Tensor.pin_memory, b) for b in batches]
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)

    # Evidence that L_pt and L_uce are in the loss: the same step (same RNG, no grad) at
    # start_epoch and at start_epoch + 1. The student and hence L_ce, L_cc, L_ds are identical in
    # both calls, so the losses differ only by rate_pt * L_pt + rate_uce * L_uce.
    start = model.start_epoch
    check_batch, losses = to_device(batches[0], device), []
    with torch.no_grad():
        for epoch in (start, start + 1):
            model.bench_epoch = epoch
            with torch.random.fork_rng(devices=[device] if cuda else []), autocast():
                torch.manual_seed(args.seed)
                losses.append(model.training_step(check_batch, 0).float().item())
    del check_batch
    model.bench_epoch = start + 1

    def step(i):
        batch = to_device(batches[i % len(batches)], device)
        with autocast():
            loss = model.training_step(batch, i)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss.detach()

    for i in range(args.warmup):
        step(i)
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times, cpu_times, loss = [], [], None
    load_before = os.getloadavg()[0]
    for i in range(args.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        loss = step(args.warmup + i)
        sync()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    loss = loss.float().item()
    rss_peak = peak_rss_gib()
    gpu_peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None

    # Backbone forward alone, on the step's concatenated inputs: the student as in the step
    # (train mode, graph recorded) and the EMA teacher (eval, no_grad).
    (im_l, tab_l, *_), (im_u, tab_u, *_) = batches[0]["l"], batches[0]["u"]
    x = to_device([torch.cat((im_l[1], im_u[1])), torch.cat((tab_l[1], tab_u[1]))], device)

    def forward_time(net, grad):
        out = []
        for i in range(1 + args.steps):  # first call untimed
            sync()
            t0 = time.perf_counter()
            with torch.set_grad_enabled(grad), autocast():
                y = net.forward_all(x)
            sync()
            out.append(time.perf_counter() - t0)
            del y
        return statistics.mean(out[1:])

    model.model.train()
    fwd_student = forward_time(model.model, True)
    model.ema.eval()
    fwd_teacher = forward_time(model.ema, False)

    B = n_l + n_u
    mean = statistics.mean(times)
    precision = "bf16" if args.bf16 else "fp32"
    n_backbone = sum(p.numel() for p in model.model.parameters())
    n_optim = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    print(f"config: DVM, ResNet-50, img {hp.img_size}, F={hp.num_cat}+{hp.num_con}, "
          f"C={hp.num_classes}, epoch {model.current_epoch} > start_epoch {start}, {precision}")
    print(f"versions: torch {torch.__version__}, pytorch_lightning {pytorch_lightning.__version__}, "
          f"torchmetrics {torchmetrics.__version__}")
    print(f"parameters: backbone {n_backbone:,}, optimised {n_optim:,}, "
          f"lr {optimizer.param_groups[0]['lr']:g}, {len(optimizer.param_groups)} param groups")
    print(f"loss at start_epoch {losses[0]:.4f}, at start_epoch+1 {losses[1]:.4f}: "
          f"rate_pt*L_pt + rate_uce*L_uce = {losses[1] - losses[0]:.4f}")
    print(f"step times (s): {' '.join(f'{t:.3f}' for t in times)}; "
          f"median {statistics.median(times):.3f}; last loss {loss:.4f}")
    print(f"backbone forward_all, B={B}: student train+grad {fwd_student:.3f} s, "
          f"teacher eval no_grad {fwd_teacher:.3f} s")
    print(f"peak RSS {rss_peak:.2f} GiB (after model build {rss_built:.2f} GiB)"
          + (f"; peak GPU memory allocated {gpu_peak:.2f} GiB" if cuda else ""))
    where = f"device={device.type} threads={args.threads} precision={precision}"
    if cuda:
        where += f" tf32={'on' if args.tf32 else 'off'}"
    print(f"original STiL step: B={n_l}+{n_u} img={hp.img_size} {where}: "
          f"{mean:.2f} s/step, {B / mean:.1f} samples/s")
    print(json.dumps({
        "harness_steps": args.steps,
        "step_ms_each": [round(1000 * t, 1) for t in times],
        "step_cpu_ms_each": [round(1000 * t, 1) for t in cpu_times],
        "step_cpu_ms": round(1000 * statistics.mean(cpu_times), 1),
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }))


if __name__ == "__main__":
    main()
