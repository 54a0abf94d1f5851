"""Golden tests: our `fixmatch`, `freematch`, `simmatch`, `comatch` and classification `pseudo_label`
against two steps of USB's own code (microsoft/Semi-supervised-learning; PseudoLabel for
`pseudo_label`), recorded by scripts/golden/gen_usb.py in tests/golden/usb_*.

Each test loads the fixture's initial weights (student and a different EMA teacher), state (SAT
thresholds, bank, queue, distribution-alignment queue) and batch into our method, then for each of
the fixture's steps runs our ``training_step``, backward, the trainer's SGD (``build_optimizer``,
USB's classic-CV values) and ``after_optimizer_step``, and compares every loss term, gradient and
post-step tensor with the original's, in float64 at ``assert_matches_original``'s tolerance (rtol
1e-9, atol 1e-12).

Our losses upcast their inputs with ``.float()`` (float32 under autocast); inside these tests
``Tensor.float`` keeps float64 tensors float64 so the comparison is not rounded to float32 (every
other dtype still goes to float32).

Where docs/methods.md records a decision that departs from USB, the decision is put back to USB's
inside the equality test (the rest then equals USB to rounding) and checked on its own: SimMatch's
and CoMatch's distribution alignment without USB's +1e-6 (effect on the loss terms bounded at
1e-5, measured 7e-7), SimMatch's bank rows normalised per row (USB: across the batch), CoMatch's
queue order within a write (compared slot by slot); pseudo_label's forwards (ours: a labeller
forward plus one interleaved / concatenated student forward over labelled and unlabelled rows;
USB: one forward per batch, BN running statistics frozen around the unlabelled one).
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
from modeling_stil.methods import pseudo_label as pseudo_label_module
from modeling_stil.methods.pseudo_label import PseudoLabel, PseudoLabelArguments
from modeling_stil.methods.simmatch import SimMatch, SimMatchArguments
from modeling_stil.modeling_wide_resnet import WideResNetForImageClassification
from modeling_stil.training.optim import build_optimizer

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


def _ema(method):
    """The EMA the fixture's ``teacher_*`` tensors describe: the teacher, or pseudo_label's evaluation EMA."""
    return method.ema if hasattr(method, "ema") else method.eval_ema


def _load_initial(method, tensors, projected: bool):
    """Student state (params + buffers; ``projected``: model.* and projector.*) and the teacher's
    parameters from the fixture (its buffers are copied from the student at every EMA update)."""
    target = method if projected else method.model
    missing, unexpected = target.load_state_dict(with_prefix(tensors, "init."), strict=False)
    assert not unexpected, unexpected
    assert projected or not missing, missing
    teacher = with_prefix(tensors, "teacher_init.")
    missing, unexpected = _ema(method).module.load_state_dict(teacher, strict=False)
    assert not unexpected and all("running" in k or "num_batches" in k for k in missing), (missing, unexpected)


def _steps_and_compare(method, tensors, meta, labeled, unlabeled, terms: dict, projected: bool = False,
                       check_state=None, terms_tolerance: tuple[float, float] | None = None):
    """Our steps (the fixture's ``train_states``, the same batch each time), each compared with the
    original's: terms (ours -> fixture key), mask ratio, gradients, parameters and buffers after the
    trainer's SGD, the EMA model after ``after_optimizer_step``, and ``check_state(step_tensors)``.
    Fixture names: the bare model's (FixMatch, FreeMatch) or model.* / projector.* (``projected``).
    ``terms_tolerance`` (rtol, atol): compare only the terms, at that tolerance."""
    param_prefix = "" if projected else "model."
    optimizer = build_optimizer(
        method, SimpleNamespace(optimizer="sgd", learning_rate=0.03, momentum=0.9, nesterov=True, weight_decay=5e-4), "cpu"
    )
    for i, state_kwargs in enumerate(meta["train_states"]):
        step = with_prefix(tensors, f"step{i}.")
        state = TrainState(**state_kwargs)
        loss, logs = method.training_step(labeled, unlabeled, state)
        tolerance = dict(zip(("rtol", "atol"), terms_tolerance)) if terms_tolerance else {}
        for ours, theirs in terms.items():
            assert_matches_original(logs[ours], step[f"term.{theirs}"], f"step {i} {ours}", **tolerance)
        assert_matches_original(loss, step["term.total_loss"], f"step {i} loss", **tolerance)
        loss.backward()
        optimizer.step()
        method.after_optimizer_step(state)
        if not terms_tolerance:
            _compare_step(method, step, logs, i, param_prefix, projected)
            if check_state is not None:
                check_state(step)
        method.zero_grad(set_to_none=True)  # USB's model.zero_grad() after its step


def _compare_step(method, step, logs, i, param_prefix, projected):
    assert_matches_original(logs["mask_ratio"], step["mask"].mean(), f"step {i} mask_ratio")
    params = dict(method.named_parameters())
    grads = with_prefix(step, "grad.")
    for name, param in params.items():
        key = name[len(param_prefix):] if param_prefix else name
        if key in grads:
            assert_matches_original(param.grad, grads[key], f"step {i} grad {key}")
        elif not name.startswith(("ema.", "eval_ema.")):
            assert param.grad is None or not param.grad.any(), f"step {i} {key}: a gradient where the original has none"
    assert set(grads) <= {n[len(param_prefix):] if param_prefix else n for n in params}
    student = method.model.state_dict()
    if projected:
        student = {**{f"model.{k}": v for k, v in student.items()},
                   **{f"projector.{k}": v for k, v in method.projector.state_dict().items()}}
    after = with_prefix(step, "after.")
    assert set(after) == set(student), set(after) ^ set(student)
    for key, value in after.items():
        assert_matches_original(student[key], value, f"step {i} after SGD: {key}")
    teacher = _ema(method).module.state_dict()
    teacher_after = with_prefix(step, "teacher_after.")
    assert set(teacher_after) == set(teacher), set(teacher_after) ^ set(teacher)
    for key, value in teacher_after.items():
        assert_matches_original(teacher[key], value, f"step {i} EMA: {key}")


# ---------------------------------------------------------------------------------------- FixMatch
def test_fixmatch_steps_equal_usb():
    method, t, meta = _build(FixMatch, FixMatchArguments, "usb_fixmatch")
    _load_initial(method, t, projected=False)
    labeled = {"weak": _pixels(t["input.x_lb"]), "labels": t["input.y_lb"]}
    unlabeled = {"weak": _pixels(t["input.x_ulb_w"]), "strong": _pixels(t["input.x_ulb_s"])}
    _steps_and_compare(method, t, meta, labeled, unlabeled, {"sup_loss": "sup_loss", "unsup_loss": "unsup_loss"})


# ---------------------------------------------------------------------------------------- FreeMatch
def test_freematch_steps_equal_usb():
    method, t, meta = _build(FreeMatch, FreeMatchArguments, "usb_freematch")
    method.double()  # the SAT buffers are built in float32
    _load_initial(method, t, projected=False)
    for name in ("time_p", "p_model", "label_hist"):
        getattr(method, name).copy_(t[f"state_init.{name}"])
    labeled = {"labeled": _pixels(t["input.x_lb"]), "labels": t["input.y_lb"]}
    unlabeled = {"weak": _pixels(t["input.x_ulb_w"]), "strong": _pixels(t["input.x_ulb_s"])}

    def check_state(step):
        for name in ("time_p", "p_model", "label_hist"):
            assert_matches_original(getattr(method, name), step[f"state_after.{name}"], f"SAT {name}")

    _steps_and_compare(method, t, meta, labeled, unlabeled,
                       {"sup_loss": "sup_loss", "unsup_loss": "unsup_loss", "fairness_loss": "ent_loss"},
                       check_state=check_state)


# ---------------------------------------------------------------------------------------- decisions put back
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


def _usb_bank_write(monkeypatch):
    """SimMatch's bank write with USB's normalisation axis (across the written rows, not per row):
    the decision removed, so the second step reads the bank USB's reads."""
    def update_bank(self, features, labels, positions, state):
        m = self.args.bank_momentum
        mixed = m * self.bank[positions] + (1 - m) * features.detach()
        self.bank.index_copy_(0, positions, F.normalize(mixed, dim=0))
        self.bank_labels.index_copy_(0, positions, labels.long())

    monkeypatch.setattr(SimMatch, "update_bank", update_bank)


def _set_da(method, t):
    queue = method.DA.queue
    queue.buffer.copy_(t["state_init.da_queue"])
    queue.ptr.fill_(int(t["state_init.da_ptr"]))
    queue.count.fill_(queue.size if bool(t["state_init.da_queue"].abs().sum(dim=1).all()) else int(t["state_init.da_ptr"]))


def _check_da(method):
    def check(step):
        assert_matches_original(method.DA.queue.buffer, step["state_after.da_queue"], "DA queue")
        assert int(method.DA.queue.ptr) == int(step["state_after.da_ptr"])

    return check


# ---------------------------------------------------------------------------------------- SimMatch
SIMMATCH_TERMS = {"sup_loss": "sup_loss", "unsup_loss": "unsup_loss", "in_loss": "in_loss"}


def _simmatch_run():
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


def test_simmatch_steps_equal_usb(monkeypatch):
    """Both steps (epoch 0: instance loss zeroed; epoch 1: on) equal USB's with our two decisions
    (DA eps, bank-write axis) put back to USB's."""
    _usb_eps_alignment(monkeypatch)
    _usb_bank_write(monkeypatch)
    method, t, meta, labeled, unlabeled = _simmatch_run()
    check_da = _check_da(method)

    def check_state(step):
        check_da(step)
        assert_matches_original(method.bank, step["state_after.bank"], "bank")
        assert_matches_original(method.bank_labels, step["state_after.bank_labels"], "bank labels")

    _steps_and_compare(method, t, meta, labeled, unlabeled, SIMMATCH_TERMS, projected=True, check_state=check_state)


def test_simmatch_bank_write_is_per_row():
    """The decision (docs/methods.md "## simmatch"): USB normalises the (P, n) slice of its transposed
    bank along dim 1, i.e. across the batch, so its written rows are not unit vectors; ours
    normalises each written row. Checked on the first step, where both read the same bank."""
    method, t, meta, labeled, unlabeled = _simmatch_run()
    method.training_step(labeled, unlabeled, TrainState(**meta["train_states"][0]))
    idx, before, g_l = t["input.idx_lb"], t["state_init.bank"], t["step0.feats_x_lb"]
    mixed = 0.7 * before[idx] + 0.3 * g_l
    untouched = torch.ones(before.shape[0], dtype=torch.bool)
    untouched[idx] = False
    usb_after = t["step0.state_after.bank"]
    assert_matches_original(method.bank[untouched], usb_after[untouched], "bank rows not written")
    assert_matches_original(usb_after[idx], F.normalize(mixed, dim=0), "USB's bank write (across the batch)")
    assert (usb_after[idx].norm(dim=1) - 1).abs().max() > 0.1
    assert_matches_original(method.bank[idx], F.normalize(mixed, dim=1), "our bank write (per row)")
    assert_matches_original(method.bank[idx].norm(dim=1), torch.ones(len(idx), dtype=torch.float64), "unit bank rows")


def test_simmatch_distribution_alignment_eps_effect(monkeypatch):
    """Our DA (no eps) in USB's steps: the decision's whole effect on the loss terms, bounded."""
    _usb_bank_write(monkeypatch)
    method, t, meta, labeled, unlabeled = _simmatch_run()
    _steps_and_compare(method, t, meta, labeled, unlabeled, SIMMATCH_TERMS, projected=True, terms_tolerance=(1e-5, 1e-8))


# ---------------------------------------------------------------------------------------- CoMatch
COMATCH_TERMS = {"sup_loss": "sup_loss", "unsup_loss": "unsup_loss", "contrast_loss": "contrast_loss"}


def _comatch_run():
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


def test_comatch_steps_equal_usb(monkeypatch):
    """Both steps (memory smoothing off, then on; the second write wraps the queue pointer to 0)."""
    _usb_eps_alignment(monkeypatch)
    method, t, meta, labeled, unlabeled = _comatch_run()
    b_l, b_u = t["input.x_lb"].shape[0], t["input.x_ulb_w"].shape[0]
    check_da = _check_da(method)

    def check_state(step):
        check_da(step)
        assert_matches_original(_swap_blocks(method.queue_w, b_l, b_u), step["state_after.queue_feats"], "queue feats")
        assert_matches_original(_swap_blocks(method.probs_xu, b_l, b_u), step["state_after.queue_probs"], "queue probs")
        assert int(method.queue_ptr_w) == int(step["state_after.queue_ptr"])

    _steps_and_compare(method, t, meta, labeled, unlabeled, COMATCH_TERMS, projected=True, check_state=check_state)


def test_comatch_distribution_alignment_eps_effect():
    method, t, meta, labeled, unlabeled = _comatch_run()
    _steps_and_compare(method, t, meta, labeled, unlabeled, COMATCH_TERMS, projected=True, terms_tolerance=(1e-5, 1e-8))


# ---------------------------------------------------------------------------------------- PseudoLabel
def _usb_forwards(monkeypatch, model, unlabelled: torch.Tensor):
    """USB PseudoLabel's forwards put back: one forward per batch (labelled, then unlabelled) instead
    of our interleaved / concatenated student forward, and every forward of the unlabelled batch (our
    labeller forward and the student's) with the BN running statistics restored afterwards, as USB's
    ``bn_controller.freeze_bn`` / ``unfreeze_bn`` do. The decision (docs/methods.md "## pseudo_label")
    removed, so the rest can be compared with USB to rounding."""
    monkeypatch.setattr(pseudo_label_module, "interleaved_logits",
                        lambda model, views, use_interleave=True: [model(**view).logits for view in views])
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    saved = []

    def freeze(module, args, kwargs):
        pixels = kwargs.get("pixel_values")
        if pixels is not None and pixels.shape == unlabelled.shape and torch.equal(pixels, unlabelled):
            saved.append([(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in norms])

    def unfreeze(module, args, kwargs, output):
        if saved:
            for m, (mean, var, count) in zip(norms, saved.pop()):
                # USB swaps the tensors' data (an in-place copy would break the graph's saved buffers)
                m.running_mean.data, m.running_var.data, m.num_batches_tracked.data = mean, var, count

    model.register_forward_pre_hook(freeze, with_kwargs=True)
    model.register_forward_hook(unfreeze, with_kwargs=True)


def _pseudo_label_run(monkeypatch):
    """(method, fixture, meta, labelled, unlabelled, recorded (hard labels, mask) per step): the
    labeller and the student see the same view, USB's single x_ulb_w."""
    method, t, meta = _build(PseudoLabel, PseudoLabelArguments, "usb_pseudolabel")
    _load_initial(method, t, projected=False)
    labeled = {"weak": _pixels(t["input.x_lb"]), "labels": t["input.y_lb"]}
    unlabeled = {"student": _pixels(t["input.x_ulb_w"]), "labeller": _pixels(t["input.x_ulb_w"])}
    recorded = []
    logs = pseudo_label_module.pseudo_label_logs

    def record(hard, mask, *args, **kwargs):
        recorded.append((hard.clone(), mask.clone()))
        return logs(hard, mask, *args, **kwargs)

    monkeypatch.setattr(pseudo_label_module, "pseudo_label_logs", record)
    return method, t, meta, labeled, unlabeled, recorded


def test_pseudo_label_classification_steps_equal_usb(monkeypatch):
    """Both steps (unsupervised warm-up 0.5, then 0.75): terms, hard pseudo-labels, mask, gradients,
    weights and BN statistics after SGD, the evaluation EMA after its update. The test sets
    ``student_weight_decay: 0`` (USB has no decoupled decay) and USB's forwards (``_usb_forwards``)."""
    method, t, meta, labeled, unlabeled, recorded = _pseudo_label_run(monkeypatch)
    _usb_forwards(monkeypatch, method.model, t["input.x_ulb_w"])
    seen = []

    def check_state(step):
        hard, mask = recorded[len(seen)]
        seen.append(True)
        assert torch.equal(hard, step["pseudo_label"]), (hard, step["pseudo_label"])
        assert torch.equal(mask, step["mask"]), (mask, step["mask"])
        assert 0 < mask.sum() < mask.numel()  # rows in and rows out: the mask is tested

    _steps_and_compare(method, t, meta, labeled, unlabeled, {"sup_loss": "sup_loss", "unsup_loss": "unsup_loss"},
                       check_state=check_state)
    assert len(seen) == 2
    weights = [float(TrainState(**s).step) / (0.4 * s["max_steps"]) for s in meta["train_states"]]
    assert weights == [0.5, 0.75]  # the warm-up is inside both steps' totals


def test_pseudo_label_classification_labels_equal_usb_with_our_forwards(monkeypatch):
    """Without the forwards put back, our labeller forward (the unlabelled batch alone, train mode)
    is USB's unlabelled forward: the first step's pseudo-labels, mask and unsupervised loss equal
    USB's; the supervised loss does not (our student forward normalises labelled and unlabelled rows
    together: the documented decision)."""
    method, t, meta, labeled, unlabeled, recorded = _pseudo_label_run(monkeypatch)
    step = with_prefix(t, "step0.")
    loss, logs = method.training_step(labeled, unlabeled, TrainState(**meta["train_states"][0]))
    hard, mask = recorded[0]
    assert torch.equal(hard, step["pseudo_label"]) and torch.equal(mask, step["mask"])
    assert not torch.allclose(logs["sup_loss"], step["term.sup_loss"], rtol=1e-6)
