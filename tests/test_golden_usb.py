"""Golden tests: our `fixmatch`, `freematch`, `simmatch` and `comatch` against one step of USB's own
code (microsoft/Semi-supervised-learning), recorded by scripts/golden/gen_usb.py in tests/golden/usb_*.

Each test loads the fixture's initial weights (student and a different EMA teacher), state (SAT
thresholds, bank, queue, distribution-alignment queue) and batch into our method, runs our
``training_step``, backward, the trainer's SGD (``build_optimizer``, USB's classic-CV values) and
``after_optimizer_step``, and compares every loss term, gradient and post-step tensor with the
original's, in float64 at ``assert_matches_original``'s tolerance (rtol 1e-9, atol 1e-12).

Our losses upcast their inputs with ``.float()`` (float32 under autocast); inside these tests
``Tensor.float`` keeps float64 tensors float64 so the comparison is not rounded to float32 (every
other dtype still goes to float32).

Where docs/methods.md records a decision that departs from USB, the test checks the decision
itself: the step with the departure removed equals USB to rounding, and the departure's own effect
is measured and bounded (SimMatch/CoMatch distribution alignment without USB's +1e-6; SimMatch's
bank renormalised per row; CoMatch's queue order within a write).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from modeling_stil.configuration_wide_resnet import WideResNetConfig
from modeling_stil.methods.base import DataInfo, TrainState
from modeling_stil.methods.comatch import CoMatch, CoMatchArguments
from modeling_stil.methods.common import DistributionAlignment
from modeling_stil.methods.fixmatch import FixMatch, FixMatchArguments
from modeling_stil.methods.freematch import FreeMatch, FreeMatchArguments
from modeling_stil.methods.simmatch import SimMatch, SimMatchArguments
from modeling_stil.modeling_wide_resnet import WideResNetForImageClassification
from modeling_stil.training.trainer import build_optimizer

from ._golden import assert_matches_original, load_golden, with_prefix


@pytest.fixture(autouse=True)
def float64_upcasts(monkeypatch):
    """``.float()`` leaves float64 tensors as they are (see the module docstring)."""
    original = torch.Tensor.float
    monkeypatch.setattr(torch.Tensor, "float", lambda self, *a, **k: self if self.dtype == torch.float64 else original(self, *a, **k))


def _pixels(x):
    return {"pixel_values": x}


def _build(method_class, args_class, name):
    """(method, fixture tensors, meta) with the fixture's initial student/teacher weights loaded."""
    tensors, meta = load_golden(name)
    model = WideResNetForImageClassification(WideResNetConfig(**meta["model_config"])).double()
    method = method_class(model, args_class(**meta["ours_args"]))
    return method, tensors, meta


def _load_initial(method, tensors, projected: bool):
    """Student state (params + buffers; ``projected``: model.* and projector.*) and the teacher's
    parameters from the fixture (its buffers are copied from the student at every EMA update)."""
    target = method if projected else method.model
    missing, unexpected = target.load_state_dict(with_prefix(tensors, "init."), strict=False)
    assert not unexpected, unexpected
    assert projected or not missing, missing
    teacher = with_prefix(tensors, "teacher_init.")
    missing, unexpected = method.ema.module.load_state_dict(teacher, strict=False)
    assert not unexpected and all("running" in k or "num_batches" in k for k in missing), (missing, unexpected)


def _step_and_compare(method, tensors, labeled, unlabeled, state, terms: dict, projected: bool = False):
    """Our step; compare terms (ours -> fixture key), gradients, SGD step and EMA with the fixture.
    Fixture names: the bare model's (FixMatch, FreeMatch) or model.* / projector.* (``projected``)."""
    param_prefix = "" if projected else "model."
    loss, logs = method.training_step(labeled, unlabeled, state)
    for ours, theirs in terms.items():
        assert_matches_original(logs[ours], tensors[f"term.{theirs}"], ours)
    assert_matches_original(loss, tensors["term.total_loss"], "loss")
    assert_matches_original(logs["mask_ratio"], tensors["mask"].mean(), "mask_ratio")
    loss.backward()
    params = dict(method.named_parameters())
    grads = with_prefix(tensors, "grad.")
    for name, param in params.items():
        key = name[len(param_prefix):] if param_prefix else name
        if key in grads:
            assert_matches_original(param.grad, grads[key], f"grad {key}")
        elif not name.startswith("ema."):
            assert param.grad is None or not param.grad.any(), f"{key}: a gradient where the original has none"
    assert set(grads) <= {n[len(param_prefix):] if param_prefix else n for n in params}
    optimizer = build_optimizer(
        method, SimpleNamespace(optimizer="sgd", learning_rate=0.03, momentum=0.9, nesterov=True, weight_decay=5e-4), "cpu"
    )
    optimizer.step()
    method.after_optimizer_step(state)
    student = method.model.state_dict()
    if projected:
        student = {**{f"model.{k}": v for k, v in student.items()},
                   **{f"projector.{k}": v for k, v in method.projector.state_dict().items()}}
    after = with_prefix(tensors, "after.")
    assert set(after) == set(student), set(after) ^ set(student)
    for key, value in after.items():
        assert_matches_original(student[key], value, f"after the step: {key}")
    teacher = method.ema.module.state_dict()
    teacher_after = with_prefix(tensors, "teacher_after.")
    assert set(teacher_after) == set(teacher), set(teacher_after) ^ set(teacher)
    for key, value in teacher_after.items():
        assert_matches_original(teacher[key], value, f"EMA after the step: {key}")
    return logs


# ---------------------------------------------------------------------------------------- FixMatch
def test_fixmatch_step_equals_usb():
    method, t, meta = _build(FixMatch, FixMatchArguments, "usb_fixmatch")
    _load_initial(method, t, projected=False)
    labeled = {"weak": _pixels(t["input.x_lb"]), "labels": t["input.y_lb"]}
    unlabeled = {"weak": _pixels(t["input.x_ulb_w"]), "strong": _pixels(t["input.x_ulb_s"])}
    _step_and_compare(method, t, labeled, unlabeled, TrainState(**meta["train_state"]),
                      {"sup_loss": "sup_loss", "unsup_loss": "unsup_loss"})


# ---------------------------------------------------------------------------------------- FreeMatch
def test_freematch_step_equals_usb():
    method, t, meta = _build(FreeMatch, FreeMatchArguments, "usb_freematch")
    method.double()  # the SAT buffers are built in float32
    _load_initial(method, t, projected=False)
    for name in ("time_p", "p_model", "label_hist"):
        getattr(method, name).copy_(t[f"state_init.{name}"])
    labeled = {"labeled": _pixels(t["input.x_lb"]), "labels": t["input.y_lb"]}
    unlabeled = {"weak": _pixels(t["input.x_ulb_w"]), "strong": _pixels(t["input.x_ulb_s"])}
    _step_and_compare(method, t, labeled, unlabeled, TrainState(**meta["train_state"]),
                      {"sup_loss": "sup_loss", "unsup_loss": "unsup_loss", "fairness_loss": "ent_loss"})
    for name in ("time_p", "p_model", "label_hist"):
        assert_matches_original(getattr(method, name), t[f"state_after.{name}"], f"SAT {name}")


# ---------------------------------------------------------------------------------------- DA with USB's eps
def _usb_eps_alignment(monkeypatch):
    """Our DistributionAlignment with USB's ``(p_target + 1e-6) / (p_model + 1e-6)`` (uniform target):
    the decision (no eps) removed, to show everything else equals USB to rounding."""
    def forward(self, probs, state=None, target=None):
        probs = probs.detach()
        self.queue.enqueue(probs.mean(dim=0)[None])
        uniform = torch.full_like(probs[0], 1.0 / probs.shape[1])
        aligned = probs * (uniform + 1e-6) / (self.queue.buffer.mean(dim=0) + 1e-6)
        return aligned / aligned.sum(dim=1, keepdim=True)

    monkeypatch.setattr(DistributionAlignment, "forward", forward)


def _set_da(method, t):
    queue = method.DA.queue
    queue.buffer.copy_(t["state_init.da_queue"])
    queue.ptr.fill_(int(t["state_init.da_ptr"]))
    queue.count.fill_(queue.size if bool(t["state_init.da_queue"].abs().sum(dim=1).all()) else int(t["state_init.da_ptr"]))


# ---------------------------------------------------------------------------------------- SimMatch
def _simmatch_run(monkeypatch, usb_eps: bool):
    if usb_eps:
        _usb_eps_alignment(monkeypatch)
    method, t, meta = _build(SimMatch, SimMatchArguments, "usb_simmatch")
    bank = t["state_init.bank"]
    method.setup(DataInfo(num_labeled=bank.shape[0], num_labels=meta["model_config"]["num_labels"]))
    method.double()  # the projector and the queues are built in float32
    _load_initial(method, t, projected=True)
    method.bank.copy_(bank)
    method.bank_labels.copy_(t["state_init.bank_labels"])
    _set_da(method, t)
    labeled = {"labeled": _pixels(t["input.x_lb"]), "labels": t["input.y_lb"], "position": t["input.idx_lb"]}
    unlabeled = {"weak": _pixels(t["input.x_ulb_w"]), "strong": _pixels(t["input.x_ulb_s"])}
    return method, t, meta, labeled, unlabeled


def test_simmatch_step_equals_usb(monkeypatch):
    method, t, meta, labeled, unlabeled = _simmatch_run(monkeypatch, usb_eps=True)
    _step_and_compare(method, t, labeled, unlabeled, TrainState(**meta["train_state"]),
                      {"sup_loss": "sup_loss", "unsup_loss": "unsup_loss", "in_loss": "in_loss"}, projected=True)
    assert_matches_original(method.bank_labels, t["state_after.bank_labels"], "bank labels")
    assert_matches_original(method.DA.queue.buffer, t["state_after.da_queue"], "DA queue")
    assert int(method.DA.queue.ptr) == int(t["state_after.da_ptr"])
    # the bank write, a decision (docs/methods.md "## simmatch"): USB normalises the (P, n) slice of
    # its transposed bank along dim 1, i.e. across the batch; ours normalises each written row
    idx, before, g_l = t["input.idx_lb"], t["state_init.bank"], t["feats_x_lb"]
    mixed = 0.7 * before[idx] + 0.3 * g_l
    untouched = torch.ones(before.shape[0], dtype=torch.bool)
    untouched[idx] = False
    assert_matches_original(method.bank[untouched], t["state_after.bank"][untouched], "bank rows not written")
    assert_matches_original(t["state_after.bank"][idx], F.normalize(mixed, dim=0), "USB's bank write (across the batch)")
    assert_matches_original(method.bank[idx], F.normalize(mixed, dim=1), "our bank write (per row)")
    assert_matches_original(method.bank[idx].norm(dim=1), torch.ones(len(idx), dtype=torch.float64), "unit bank rows")


def test_simmatch_distribution_alignment_eps_effect(monkeypatch):
    """Our DA (no eps) against USB's aligned probabilities: the decision's whole effect, bounded."""
    method, t, meta, labeled, unlabeled = _simmatch_run(monkeypatch, usb_eps=False)
    _, logs = method.training_step(labeled, unlabeled, TrainState(**meta["train_state"]))
    for ours, theirs in {"sup_loss": "sup_loss", "unsup_loss": "unsup_loss", "in_loss": "in_loss"}.items():
        assert_matches_original(logs[ours], t[f"term.{theirs}"], ours, rtol=1e-5, atol=1e-8)


# ---------------------------------------------------------------------------------------- CoMatch
def _comatch_run(monkeypatch, usb_eps: bool):
    if usb_eps:
        _usb_eps_alignment(monkeypatch)
    method, t, meta = _build(CoMatch, CoMatchArguments, "usb_comatch")
    b_l, b_u = t["input.x_lb"].shape[0], t["input.x_ulb_w"].shape[0]
    method.setup(DataInfo(num_labels=meta["model_config"]["num_labels"], labeled_batch_size=b_l,
                          unlabeled_batch_size=b_u))
    assert method.queue_size == t["state_init.queue_feats"].shape[0]
    method.double()  # the projector and the queues are built in float32
    _load_initial(method, t, projected=True)
    # USB writes [weak; labelled] rows, ours [labelled; weak] (a decision): our queue holds the same
    # rows as USB's with each batch slot's two blocks swapped
    method.queue_w.copy_(_swap_blocks(t["state_init.queue_feats"], b_u, b_l))
    method.probs_xu.copy_(_swap_blocks(t["state_init.queue_probs"], b_u, b_l))
    method.queue_ptr_w.fill_(int(t["state_init.queue_ptr"]))
    _set_da(method, t)
    labeled = {"labeled": _pixels(t["input.x_lb"]), "labels": t["input.y_lb"]}
    unlabeled = {"weak": _pixels(t["input.x_ulb_w"]), "strong_0": _pixels(t["input.x_ulb_s_0"]),
                 "strong_1": _pixels(t["input.x_ulb_s_1"])}
    return method, t, meta, labeled, unlabeled


def _swap_blocks(queue: torch.Tensor, first: int, second: int) -> torch.Tensor:
    """Each slot of ``first + second`` rows with its two blocks swapped (USB order <-> ours)."""
    slots = queue.reshape(-1, first + second, *queue.shape[1:])
    return torch.cat([slots[:, first:], slots[:, :first]], dim=1).reshape(queue.shape)


def test_comatch_step_equals_usb(monkeypatch):
    method, t, meta, labeled, unlabeled = _comatch_run(monkeypatch, usb_eps=True)
    _step_and_compare(method, t, labeled, unlabeled, TrainState(**meta["train_state"]),
                      {"sup_loss": "sup_loss", "unsup_loss": "unsup_loss", "contrast_loss": "contrast_loss"}, projected=True)
    b_l, b_u = t["input.x_lb"].shape[0], t["input.x_ulb_w"].shape[0]
    assert_matches_original(_swap_blocks(method.queue_w, b_l, b_u), t["state_after.queue_feats"], "queue feats")
    assert_matches_original(_swap_blocks(method.probs_xu, b_l, b_u), t["state_after.queue_probs"], "queue probs")
    assert int(method.queue_ptr_w) == int(t["state_after.queue_ptr"])
    assert_matches_original(method.DA.queue.buffer, t["state_after.da_queue"], "DA queue")
    assert int(method.DA.queue.ptr) == int(t["state_after.da_ptr"])


def test_comatch_distribution_alignment_eps_effect(monkeypatch):
    method, t, meta, labeled, unlabeled = _comatch_run(monkeypatch, usb_eps=False)
    _, logs = method.training_step(labeled, unlabeled, TrainState(**meta["train_state"]))
    for name in ("sup_loss", "unsup_loss", "contrast_loss"):
        assert_matches_original(logs[name], t[f"term.{name}"], name, rtol=1e-5, atol=1e-8)
