"""The Accelerator a run trains with, and the one collective the loop adds to Accelerate's: averaged
BatchNorm statistics."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .errors import JobError
from .tracking import resolve_trackers


def cpu_engine_message(engine: str) -> str:
    """FSDP or DeepSpeed asked for on the CPU: Accelerate selects them only on an accelerator device
    (its state keeps MULTI_CPU, i.e. DDP over gloo), so the run would not be what was asked."""
    return (f"{engine} was asked for on the CPU, where Accelerate does not run it (the run would silently be DDP): "
            f"on the CPU use accelerate_configs/cpu.yaml with --num_processes N (DDP over gloo); run {engine} on GPUs")


def make_accelerator(args):
    """An Accelerator configured from the training arguments (trackers validated first)."""
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.utils import ProjectConfiguration

    targs = args.training
    trackers = resolve_trackers(targs.report_to)
    kwargs = {}
    if targs.mixed_precision is not None:
        kwargs["mixed_precision"] = targs.mixed_precision
    # torchrun-launched processes on a machine without GPU: gloo on CPU (accelerate needs cpu=True)
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or (world > 1 and not torch.cuda.is_available()):
        kwargs["cpu"] = True
        for engine, name in (("FSDP", "FSDP"), ("DEEPSPEED", "DeepSpeed")):
            if os.environ.get(f"ACCELERATE_USE_{engine}", "").lower() in ("1", "true", "yes"):
                raise JobError(cpu_engine_message(name))
    accelerator = Accelerator(
        gradient_accumulation_steps=targs.gradient_accumulation_steps,
        log_with=trackers or None,
        project_config=ProjectConfiguration(
            project_dir=targs.output_dir, logging_dir=str(Path(targs.output_dir) / "logs"), automatic_checkpoint_naming=False
        ),
        step_scheduler_with_optimizer=False,
        # broadcast_buffers=False: banks, queues and teachers are the method's to keep consistent (through
        # state.gather / reduce_sum); BN statistics are averaged before evaluation and checkpoints.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=targs.find_unused_parameters,
                                                       broadcast_buffers=False)],
        **kwargs,
    )
    return accelerator


def average_batchnorm_statistics(model: nn.Module, accelerator) -> None:
    """Average BatchNorm running statistics over processes (timm's ``distribute_bn``).

    DDP does not broadcast buffers here (``broadcast_buffers=False``: methods keep their banks
    consistent themselves), so each process's BN statistics follow its own shard. Averaging them
    before every evaluation and checkpoint makes evaluation, the checkpoint and the export one model."""
    if accelerator.num_processes == 1:
        return
    buffers = [
        buffer
        for module in model.modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, nn.SyncBatchNorm)
        for buffer in (module.running_mean, module.running_var)
        if buffer is not None
    ]
    if not buffers:
        return
    flat = torch.cat([b.detach().float().reshape(-1) for b in buffers])
    flat = accelerator.reduce(flat, reduction="mean")
    offset = 0
    for buffer in buffers:
        n = buffer.numel()
        buffer.copy_(flat[offset : offset + n].view_as(buffer).to(buffer.dtype))
        offset += n
