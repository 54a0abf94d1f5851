"""Run by tests/test_l2i.py as two gloo processes (`python -m torch.distributed.run --nproc_per_node 2`): the L2I meta step
inside the DDP-wrapped method, each rank with its own shard.

Checks, on every rank, for l2i_o and l2i_l (label memory on):
* phase 1 runs through DDP (double backward inside the wrapped forward) without error;
* the gradient DDP leaves on each parameter equals the mean over ranks of the per-rank gradients
  the same step gives without DDP (the documented contract: the meta-gradient h / the extra loss's
  gradient is averaged across processes; the virtual step and the label update are per process);
* the label memory holds every rank's rows (written through state.gather) and is identical on both ranks.
Writes OUT/rank{r}.json with the largest deviations; exits non-zero on failure."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modeling_stil.methods.base import DataInfo, TrainState  # noqa: E402
from modeling_stil.methods.l2i import L2IL, L2IO  # noqa: E402
from tests.helpers.l2i import make_batch, make_method, to_float  # noqa: E402


def main(out: Path) -> int:
    acc = Accelerator(cpu=True, kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True,
                                                                                 broadcast_buffers=False)])
    rank, world = acc.process_index, acc.num_processes
    report = {}
    for cls in (L2IO, L2IL):
        task = "classification"
        kwargs = {"label_memory": True} if cls is L2IL else {}
        method = make_method(cls, task, seed=0, **kwargs).float()  # same initial weights on every rank
        if cls is L2IL:
            method.setup(DataInfo(num_train=64, num_labels=3, task=task))
        labeled, unlabeled = make_batch(task, seed=10 + rank)  # each rank its own shard
        labeled, unlabeled = to_float(labeled), to_float(unlabeled)
        unlabeled["index"] = unlabeled["index"] + 12 * rank  # distinct rows per rank
        state = TrainState(step=5, max_steps=100, task=task, num_labels=3, learning_rate=0.01, phase=1,
                           num_processes=world, gather=acc.gather, reduce_sum=lambda t: acc.reduce(t, "sum"))
        local = copy.deepcopy(method)
        local_state = TrainState(**{**state.__dict__, "gather": lambda t: t, "num_processes": 1})
        loss, _ = local.training_step(labeled, unlabeled, local_state)
        loss.backward()
        local_grads = [p.grad.detach().clone() for p in local.model.parameters()]
        expected = [acc.reduce(g.clone(), "mean") for g in local_grads]

        wrapped = acc.prepare(method)
        loss, logs = wrapped(labeled, unlabeled, state)
        acc.backward(loss)
        bare = acc.unwrap_model(wrapped)
        deviation = max(float((p.grad - e).abs().max()) for p, e in zip(bare.model.parameters(), expected))
        differs = max(float((g - e).abs().max()) for g, e in zip(local_grads, expected))
        entry = {"max_deviation": deviation, "local_vs_mean": differs}
        if cls is L2IL:
            seen = bare.label_seen
            table = acc.gather(bare.label_table[None])
            entry["rows_seen"] = int(seen.sum())
            entry["tables_equal"] = bool(torch.equal(table[0], table[-1]))
        report[cls.name] = entry
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    ok = all(e["max_deviation"] < 1e-5 and e["local_vs_mean"] > 1e-7 for e in report.values())
    ok = ok and report["l2i_l"]["rows_seen"] == 6 * world and report["l2i_l"]["tables_equal"]
    acc.wait_for_everyone()
    # tear gloo down before exit: left to interpreter shutdown, one rank aborted (SIGABRT) once in a
    # loaded full-suite run after both had written their reports
    torch.distributed.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
