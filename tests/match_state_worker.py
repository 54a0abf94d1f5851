"""Worker of tests/test_comatch.py::test_two_gloo_processes_keep_the_same_bank_queue_and_da_state_as_one.

Run in 2 gloo processes (``python -m torch.distributed.run --nproc_per_node=2``). For each of simmatch, multimodal_simmatch,
comatch and multimodal_comatch: every rank builds the same method (seeded; a LayerNorm-only test_vit
image encoder, so a row's embedding does not depend on the other rows of its batch), and for 3 steps
takes its contiguous half of the same global batch, stepping with ``state.gather`` / ``reduce_sum``
over gloo. Rank 0 also steps a copy on the whole global batch with identity gathers (one process).
Writes ``{method: {buffer: [max |1-process - 2-process| over both ranks, written]}}`` to argv[1].
"""

from __future__ import annotations

import copy
import json
import sys

import torch
from accelerate import Accelerator

from modeling_stil.methods.base import DataInfo, TrainState, get_method_class
from modeling_stil.presets import create_model
from tests._helpers import TOY_METADATA, TOY_SCHEMA

B_L, B_U = 4, 6  # per process
STATE_KEYS = {
    "simmatch": ("bank", "bank_labels", "DA.queue.buffer", "DA.queue.ptr"),
    "comatch": ("queue_w", "probs_xu", "queue_ptr_w", "queue_s", "probs_u", "queue_ptr_s", "DA.queue.buffer", "DA.queue.ptr"),
}
OPTIONS = {
    "simmatch": dict(bank_momentum=0.7, da_len=4),  # USB: EMA-smoothed bank rows
    "multimodal_simmatch": dict(),  # STiL: overwritten rows, EMAN teacher
    "comatch": dict(queue_size=30, memory_graph=True, smoothing_start_epoch=0, smoothing_start_step=0, da_len=4),
    "multimodal_comatch": dict(queue_size=30, smoothing_start_epoch=0),  # 20 + 20 rows: the second write overflows
}


def view(multimodal: bool, n: int, g: torch.Generator) -> dict:
    out = {"pixel_values": torch.rand(n, 3, 32, 32, generator=g)}
    if multimodal:
        out["categorical_values"] = torch.stack([torch.randint(0, 3, (n,), generator=g), torch.randint(0, 4, (n,), generator=g)], 1)
        out["continuous_values"] = torch.randn(n, 3, generator=g)
    return out


def global_batch(multimodal: bool, step: int, processes: int):
    g = torch.Generator().manual_seed(100 + step)
    n_l, n_u = B_L * processes, B_U * processes
    labeled = {"labels": torch.randint(0, 3, (n_l,), generator=g), "position": torch.randperm(16, generator=g)[:n_l],
               "labeled": view(multimodal, n_l, g)}
    unlabeled = {"monitor_labels": torch.randint(0, 3, (n_u,), generator=g)}
    for key in ("weak", "strong", "strong_0", "strong_1"):
        unlabeled[key] = view(multimodal, n_u, g)
    return labeled, unlabeled


def shard(batch, rank: int, size: int):
    if isinstance(batch, dict):
        return {k: shard(v, rank, size) for k, v in batch.items()}
    return batch[rank * size:(rank + 1) * size]


def main(out_path: str) -> None:
    accelerator = Accelerator(cpu=True)
    rank, processes = accelerator.process_index, accelerator.num_processes
    assert processes == 2, f"the worker must run in 2 processes, got {processes}"
    result = {}
    for name, options in OPTIONS.items():
        cls = get_method_class(name)
        multimodal = name.startswith("multimodal")
        torch.manual_seed(0)
        if multimodal:
            model = create_model("multimodal-concat-tiny", schema=TOY_SCHEMA, metadata=TOY_METADATA, backbone="test_vit")
        else:
            model = create_model("image-tiny", metadata=TOY_METADATA, backbone="test_vit")
        method = cls(model, cls.arguments_class(threshold=0.0, start_epoch=-1, **options))
        method.setup(DataInfo(num_labeled=16, num_labels=3, labeled_batch_size=B_L, unlabeled_batch_size=B_U, num_processes=processes))
        method.train()
        single = copy.deepcopy(method) if rank == 0 else None
        keys = STATE_KEYS["simmatch" if "simmatch" in name else "comatch"]
        initial = {k: method.state_dict()[k].clone() for k in keys}
        for step in range(3):
            labeled, unlabeled = global_batch(multimodal, step, processes)
            state = TrainState(step=step, epoch=5, max_steps=10, num_labels=3, num_processes=processes,
                               gather=lambda t: accelerator.gather(t.contiguous()),
                               reduce_sum=lambda t: accelerator.reduce(t.clone(), reduction="sum"))
            with torch.no_grad():
                method.training_step(shard(labeled, rank, B_L), {k: shard(v, rank, B_U) for k, v in unlabeled.items()}, state)
                if single is not None:
                    single.training_step(labeled, unlabeled, TrainState(step=step, epoch=5, max_steps=10, num_labels=3))
        report = {}
        for key in keys:
            mine = method.state_dict()[key]
            both = accelerator.gather(mine[None].contiguous())  # (processes, ...): every rank's copy
            if rank == 0:
                reference = single.state_dict()[key].double()
                diff = max(float((both[r].double() - reference).abs().max()) for r in range(processes))
                report[key] = [diff, bool(not torch.equal(reference.to(initial[key].dtype), initial[key]))]
        result[name] = report
    if rank == 0:
        with open(out_path, "w") as handle:
            json.dump(result, handle)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1])
