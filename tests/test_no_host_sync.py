"""No host synchronisation inside a training step (STiL and FixMatch), counted on the CPU.

A GPU step is fast only if the host never waits for the device. On the CPU nothing waits, so we
count the calls that WOULD wait on a GPU:

* every aten op that copies a device value to the host or whose output size depends on data:
  ``_local_scalar_dense`` (what ``.item()``, ``bool(t)`` / ``if t:``, ``int(t)``, ``float(t)`` run),
  ``nonzero``, ``masked_select``, ``unique``, indexing with a boolean mask (a ``TorchDispatchMode`` sees forward, backward and
  optimizer ops alike);
* the Python calls ``Tensor.cpu``, ``.tolist``, ``.numpy`` and ``torch.cuda.synchronize``.

The step: method forward, backward, fused Adam step (the optimizer ``build_optimizer`` makes on CUDA;
the foreach/single-tensor Adam reads its CPU step counters with ``.item()``, which is host memory on a
GPU as well), ``zero_grad`` and ``after_optimizer_step``, after two warm-up steps (first-step work
such as the teacher's one-time read of ``ema_step`` is allowed there). ``test_the_counter_can_fail``
shows the counter catches an injected ``.item()`` and a Python ``if tensor``.
"""

from __future__ import annotations

import contextlib
import os
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from modeling_stil.methods.base import TrainState
from modeling_stil.methods.fixmatch import FixMatch, FixMatchArguments
from modeling_stil.methods.stil import Stil, StilArguments
from tests.helpers.stil import N_L, N_U, batches, random_prototypes, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
aten = torch.ops.aten
SYNC_OPS = {
    aten._local_scalar_dense.default,
    aten.nonzero.default,
    aten.masked_select.default,
    aten._unique.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
}

# indexing with a boolean mask has a data-dependent size (an implicit nonzero)
BOOL_INDEX_OPS = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}


def _has_bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())


def _where() -> str:
    """The innermost frame of this repository (not this file) that led to the call."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if frame.filename.startswith(ROOT) and not frame.filename.endswith("test_no_host_sync.py"):
            return f"{os.path.relpath(frame.filename, ROOT)}:{frame.lineno} {frame.line}"
    return "(torch internals)"


class _SyncOps(TorchDispatchMode):
    def __init__(self, calls):
        super().__init__()
        self.calls = calls

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in SYNC_OPS or (func in BOOL_INDEX_OPS and _has_bool_index(args)):
            self.calls.append(f"{func} at {_where()}")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_host_syncs():
    """Yields a list that collects one entry per would-be host sync made inside the block."""
    calls: list[str] = []
    patched = {}

    def wrap(owner, name):
        original = getattr(owner, name)

        def counted(*args, **kwargs):
            calls.append(f"{getattr(owner, '__name__', owner)}.{name} at {_where()}")
            return original(*args, **kwargs)

        patched[(owner, name)] = original
        setattr(owner, name, counted)

    for name in ("cpu", "tolist", "numpy"):
        wrap(torch.Tensor, name)
    wrap(torch.cuda, "synchronize")
    try:
        with _SyncOps(calls):
            yield calls
    finally:
        for (owner, name), original in patched.items():
            setattr(owner, name, original)


def fused_adam(method):
    # what build_optimizer returns on CUDA (fused kernels; torch also runs them on the CPU)
    return torch.optim.Adam([p for p in method.parameters() if p.requires_grad], lr=1e-4, fused=True)


def one_step(method, optimizer, labeled, unlabeled, state):
    loss, logs = method(labeled, unlabeled, state)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    method.after_optimizer_step(state)
    return loss, logs


def stil_setup():
    from modeling_stil.modeling_stil import StilModel

    torch.manual_seed(0)
    cfg = tiny_config()
    method = Stil(StilModel(cfg), StilArguments(projection_dim=8, start_epoch=0)).train()
    random_prototypes(method)
    labeled, unlabeled = batches(cfg)
    return method, labeled, unlabeled, TrainState(epoch=1, steps_per_epoch=10, max_steps=10)  # every term active


def fixmatch_setup():
    from modeling_stil.presets import create_model

    torch.manual_seed(0)
    model = create_model("image-tiny", num_labels=3)
    method = FixMatch(model, FixMatchArguments(threshold=0.0)).train()
    g = torch.Generator().manual_seed(0)
    image = lambda n: {"pixel_values": torch.rand(n, 3, 16, 16, generator=g)}
    labeled = {"labels": torch.tensor([0, 1, 2, 0]), "index": torch.arange(N_L), "weak": image(N_L)}
    unlabeled = {"index": torch.arange(N_U), "monitor_labels": torch.arange(N_U) % 3, "weak": image(N_U), "strong": image(N_U)}
    return method, labeled, unlabeled, TrainState(steps_per_epoch=10, max_steps=10)


def counted_step(setup, inject=None):
    method, labeled, unlabeled, state = setup()
    optimizer = fused_adam(method)
    for step in range(2):  # warm-up
        state.step = step
        one_step(method, optimizer, labeled, unlabeled, state)
    if inject is not None:
        inject(method)
    state.step = 2
    with count_host_syncs() as calls:
        loss, logs = one_step(method, optimizer, labeled, unlabeled, state)
    return calls, loss, logs


@pytest.mark.parametrize("setup", [stil_setup, fixmatch_setup], ids=["stil", "fixmatch"])
def test_a_training_step_makes_no_host_sync(setup):
    calls, loss, logs = counted_step(setup)
    assert not calls, "host syncs in the step:\n  " + "\n  ".join(calls)
    assert torch.isfinite(loss) and "loss" in logs or logs  # the step did run


def test_the_counter_can_fail():
    def item_in_cgpl(method):
        original = method.cgpl

        def cgpl(*args):
            out = original(*args)
            out[0].max().item()  # an injected host read
            return out

        method.cgpl = cgpl

    calls, _, _ = counted_step(stil_setup, item_in_cgpl)
    assert any("_local_scalar_dense" in c for c in calls), calls

    def python_if_on_a_tensor(method):
        original = method._project

        def project(out):
            if out.features.sum() > 0:  # Python branching on a device value
                pass
            return original(out)

        method._project = project

    calls, _, _ = counted_step(stil_setup, python_if_on_a_tensor)
    assert calls and any("_local_scalar_dense" in c for c in calls), calls

    with count_host_syncs() as calls:
        torch.ones(3).cpu().tolist()
        torch.ones(3)[torch.tensor([True, False, True])]  # boolean-mask indexing: nonzero
    assert sum("Tensor.cpu" in c for c in calls) == 1 and sum("tolist" in c for c in calls) == 1, calls
    assert any("aten.index.Tensor" in c for c in calls), calls


def test_stil_model_traces_without_graph_breaks():
    """`--torch_compile true`: the StilModel forward (train mode, categorical-code check included
    outside compilation only) is one graph for TorchDynamo."""
    from modeling_stil.modeling_stil import StilModel

    torch.manual_seed(0)
    cfg = tiny_config()
    model = StilModel(cfg).train()
    labeled, _ = batches(cfg)
    explanation = torch._dynamo.explain(model)(**labeled["stil"])
    reasons = [str(b.reason) for b in explanation.break_reasons]
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, reasons
