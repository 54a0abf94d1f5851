"""The Accelerator a run trains with, and the one collective the loop adds to Accelerate's: averaged
BatchNorm statistics."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from torch import nn

from .errors import JobError
from .tracking import resolve_trackers


def cpu_engine_message(engine: str) -> str:
    """FSDP or DeepSpeed asked for through Accelerate's CPU launcher (``--cpu``), which passes no engine
    setting on, so the run would silently be DDP over gloo; DeepSpeed needs a GPU in any case."""
    if engine == "FSDP":
        return ("FSDP was asked for with --cpu, whose launcher passes no FSDP setting on (the run would silently be DDP): "
                "on the CPU launch with --config_file accelerate_configs/fsdp_cpu.yaml (FSDP2 over gloo), without --cpu")
    return (f"{engine} was asked for on the CPU, where it does not run (the run would silently be DDP): "
            f"on the CPU use accelerate_configs/fsdp_cpu.yaml (FSDP2) or cpu.yaml with --num_processes N (DDP); "
            f"run {engine} on GPUs")


def fsdp_plugin_on_cpu():
    """The FSDP plugin of an FSDP launch that trains on the CPU (``accelerate_configs/fsdp_cpu.yaml``), read
    from the launcher's FSDP_* variables; FSDP2 only (FSDP1 needs an accelerator device)."""
    from accelerate import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()
    if plugin.fsdp_version != 2:
        raise JobError(f"fsdp_version {plugin.fsdp_version} was asked for on the CPU, where only FSDP2 (fully_shard over "
                       "gloo) runs: set fsdp_version: 2 (accelerate_configs/fsdp_cpu.yaml) or run FSDP1 on GPUs")
    return plugin


def run_fsdp_on_cpu(accelerator, plugin) -> None:
    """Make a CPU Accelerator run its FSDP2 path.

    Accelerate 1.15 selects FSDP only on accelerator devices (a CPU process stays MULTI_CPU and
    ``prepare`` would wrap the model in DDP), although everything its FSDP2 path calls (``fully_shard``
    on a CPU mesh, DTensor state dicts, clipping, checkpoints) runs over gloo. Setting the state's
    engine and plugin after it is built is all its GPU branch would have done (besides the mixed
    precision below), and every later decision reads them."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    AcceleratorState._shared_state["fsdp_plugin"] = plugin
    AcceleratorState._shared_state["distributed_type"] = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


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
    fsdp_on_cpu = None
    if _truthy(os.environ.get("ACCELERATE_USE_CPU")) or (world > 1 and not torch.cuda.is_available()):
        kwargs["cpu"] = True
        if _truthy(os.environ.get("ACCELERATE_USE_DEEPSPEED")):
            raise JobError(cpu_engine_message("DeepSpeed"))
        if _truthy(os.environ.get("ACCELERATE_USE_FSDP")):
            fsdp_on_cpu = kwargs["fsdp_plugin"] = fsdp_plugin_on_cpu()
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
    if fsdp_on_cpu is not None:
        run_fsdp_on_cpu(accelerator, fsdp_on_cpu)
    if accelerator.is_fsdp2:
        wrap_only_modules_with_forward()
    return accelerator


def _truthy(value: str | None) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes")


def wrap_only_modules_with_forward() -> None:
    """Accelerate's FSDP2 size-based wrap policy without the containers torch refuses to shard.

    Accelerate 1.15 calls ``fully_shard`` on every submodule above ``fsdp_min_num_params``, a
    ``ModuleList`` of transformer blocks included (the tabular encoders' blocks), which torch >= 2.13
    refuses ("fully_shard does not support containers that do not implement forward"), so a model with
    such a list above the threshold stopped in ``prepare``. The blocks inside are still wrapped when
    large enough; the list's own leftovers belong to the unit above it."""
    from accelerate.utils import fsdp_utils

    choose = fsdp_utils.fsdp2_prepare_auto_wrap_policy
    if getattr(choose, "skips_containers", False):
        return

    def policy_without_containers(plugin, model):
        policy = choose(plugin, model)
        if policy is None:
            return None

        def wrap(module: nn.Module) -> bool:
            container = isinstance(module, (nn.ModuleList, nn.ModuleDict)) and type(module).forward is nn.Module.forward
            return not container and policy(module)

        return wrap

    policy_without_containers.skips_containers = True
    fsdp_utils.fsdp2_prepare_auto_wrap_policy = policy_without_containers


@contextlib.contextmanager
def whole_parameters(module: nn.Module):
    """``module``'s parameters whole (not sharded) for code that calls its parts outside the prepared
    module's forward: evaluation runs the eval model (a submodule) directly.

    Under FSDP2 every ``fully_shard``-ed module holds 1/N of each parameter between forwards and gathers
    them only in its own forward hooks; here each is gathered (``unshard``, a collective: every process
    enters) and sharded again on exit. Anything else: nothing to do."""
    from torch.distributed.fsdp import FSDPModule

    sharded = [m for m in module.modules() if isinstance(m, FSDPModule)]
    for part in sharded:
        part.unshard()
    try:
        yield
    finally:
        for part in sharded:
            part.reshard()


def check_sharding_fits(prepared: nn.Module, method) -> None:
    """Fit the method to FSDP2's units: the model methods it calls besides forward (TIP's
    ``encode_image``, ...) gather the model's parameters as forward does (``register_fsdp_forward_method``;
    nothing without FSDP), and a method that calls a module with parameters of its own choosing stops
    when submodules are sharded on their own (``fsdp_min_num_params`` below their size).

    Such a submodule's parameters are whole only inside its own forward; ``functional_call`` reads
    them outside it (sharded) and the submodule's forward hook then puts its own whole parameters back
    in place of the supplied ones, so gradients reach what was meant to be frozen. Measured: CLUB
    weights 3e-3 off DDP after 2 steps. With the whole method one unit every parameter is whole for
    the whole forward (L2I measured equal to DDP within 1e-10)."""
    from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method

    for name in method.model_forward_methods:
        register_fsdp_forward_method(method.model, name)
    why = method.functional_parameter_use()
    if why is None:
        return
    separate = [name for name, module in prepared.named_modules() if name and isinstance(module, FSDPModule)]
    if separate:
        count = sum(p.numel() for p in prepared.parameters())  # a DTensor counts its whole shape
        raise JobError(
            f"method {method.name!r} {why}, which FSDP2 cannot serve with submodules sharded on their own "
            f"({len(separate)}, e.g. {separate[0]}): their parameters are whole only inside their own forward, so the "
            f"result would silently differ; set fsdp_min_num_params to at least {count} (the method's parameters: one "
            f"FSDP unit) or train it with DDP")


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
