"""Pseudo-labelling: the regression original (the student labels view 2, moved into view 1's frame) and
the classification counterpart (hard labels, confidence mask) by hand; gradient only through the
student view; no ground truth of unlabelled rows in the loss; the evaluation EMA; image+tabular."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from modeling_stil.methods.base import TrainState, get_method_class
from modeling_stil.methods.pseudo_label import PseudoLabel, PseudoLabelArguments
from tests.helpers.nets import Identity, TinyMultimodalNet


def batches(x_l, y_l, u1, u2, monitor, t1=None, t2=None):
    labeled = {"labels": y_l, "index": torch.arange(len(y_l)), "weak": {"pixel_values": x_l}}
    student, labeller = {"pixel_values": u1}, {"pixel_values": u2}
    if t1 is not None:
        student["translation"], labeller["translation"] = t1, t2
    return labeled, {"monitor_labels": monitor, "index": torch.arange(len(u1)), "student": student, "labeller": labeller}


def test_landmark_loss_by_hand_with_view_transfer():
    model = Identity(4)
    method = PseudoLabel(model, PseudoLabelArguments())
    method.target_std = torch.tensor([2.0, 4.0, 2.0, 4.0])
    x_l = torch.tensor([[1.0, 2.0, 3.0, 4.0]], requires_grad=True)
    y_l = torch.tensor([[0.0, 2.0, 3.0, 5.0]])
    u1 = torch.tensor([[1.0, 1.0, 1.0, 1.0]], requires_grad=True)
    u2 = torch.tensor([[10.0, 20.0, 30.0, 40.0]], requires_grad=True)
    t1, t2 = torch.tensor([[3.0, 0.0]]), torch.tensor([[1.0, -2.0]])
    labeled, unlabeled = batches(x_l, y_l, u1, u2, torch.full((1, 4), float("nan")), t1, t2)
    loss, logs = method(labeled, unlabeled, TrainState(step=20, max_steps=100, task="landmarks", num_labels=4))
    z_hat = torch.tensor([[11.0, 20.5, 31.0, 40.5]])  # u2 + (t1 - t2) / sigma
    sup = F.mse_loss(x_l.detach(), y_l)
    unsup = F.mse_loss(u1.detach(), z_hat)
    torch.testing.assert_close(logs["sup_loss"], sup)
    torch.testing.assert_close(logs["unsup_loss"], unsup)
    assert logs["unsup_weight"].item() == pytest.approx(75.0 * 20 / 40)  # lambda_u 75, ramp 0.4 of max_steps
    torch.testing.assert_close(loss, sup + 37.5 * unsup)
    loss.backward()
    assert torch.count_nonzero(u1.grad) > 0, "no gradient from the pseudo-label term into the student"
    assert u2.grad is None or torch.count_nonzero(u2.grad) == 0, "gradient through the pseudo-labels"
    assert torch.count_nonzero(model.head.weight.grad) > 0


def test_classification_hard_labels_and_mask_by_hand():
    model = Identity(3)
    method = PseudoLabel(model, PseudoLabelArguments(threshold=0.95))
    x_l = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    u1 = torch.tensor([[0.5, 1.0, -1.0], [2.0, 0.0, 1.0]], requires_grad=True)
    u2 = torch.tensor([[10.0, 0.0, 0.0], [0.1, 0.0, 0.0]])  # row 0 confident (class 0), row 1 masked
    labeled, unlabeled = batches(x_l, torch.tensor([0, 2]), u1, u2, torch.tensor([0, 1]))
    loss, logs = method(labeled, unlabeled, TrainState(step=100, max_steps=100, task="classification", num_labels=3))
    unsup = F.cross_entropy(u1.detach()[:1], torch.tensor([0])) / 2  # normalised by B_u
    torch.testing.assert_close(logs["unsup_loss"], unsup)
    assert logs["unsup_weight"].item() == 1.0 and logs["mask_ratio"].item() == 0.5
    assert logs["pseudo_label_accuracy"].item() == 0.5 and logs["pseudo_label_accuracy_masked"].item() == 1.0
    loss.backward()
    assert torch.count_nonzero(u1.grad[0]) > 0 and torch.count_nonzero(u1.grad[1]) == 0


def test_monitor_labels_never_reach_the_loss():
    torch.manual_seed(0)
    method = PseudoLabel(Identity(4), PseudoLabelArguments())
    data = [torch.randn(2, 4), torch.randn(2, 4), torch.randn(2, 4), torch.randn(2, 4)]
    state = TrainState(step=5, max_steps=10, task="landmarks")
    a = method(*batches(*data, torch.randn(2, 4)), state)
    b = method(*batches(*data, torch.randn(2, 4)), state)
    assert torch.equal(a[0], b[0])


def test_eval_ema_without_decay_for_regression():
    model = Identity(2)
    method = PseudoLabel(model)
    with torch.no_grad():
        model.head.weight.fill_(1.0)
    method.after_optimizer_step(TrainState(step=1, learning_rate=0.03, task="landmarks"))
    torch.testing.assert_close(method.eval_ema.module.head.weight, 0.999 * torch.eye(2) + 0.001)
    torch.testing.assert_close(model.head.weight.detach(), torch.ones(2, 2))  # no decoupled decay
    assert method.eval_model() is method.eval_ema.module
    assert PseudoLabelArguments().resolved_lambda_u("landmarks") == 75.0
    assert PseudoLabelArguments().resolved_lambda_u("classification") == 1.0


def test_image_tabular_model_trains_with_pseudo_labels():
    torch.manual_seed(0)
    base = TinyMultimodalNet()

    def view(n):
        return {"pixel_values": torch.randn(n, 4), "continuous_values": torch.randn(n, 3)}

    labeled = {"labels": torch.tensor([0, 1, 2, 0]), "index": torch.arange(4), "weak": view(4)}
    unlabeled = {"monitor_labels": torch.full((4,), -1), "index": torch.arange(4), "student": view(4), "labeller": view(4)}
    grads = {}
    for lambda_u in (0.0, 1.0):
        method = PseudoLabel(copy.deepcopy(base), PseudoLabelArguments(threshold=0.0, lambda_u=lambda_u))
        loss, logs = method(labeled, unlabeled, TrainState(step=10, max_steps=10, task="classification", num_labels=3))
        loss.backward()
        grads[lambda_u] = torch.cat([p.grad.flatten() for p in method.model.parameters() if p.grad is not None])
    assert (grads[1.0] - grads[0.0]).abs().max() > 1e-7


def test_registration_and_argument_checks():
    assert get_method_class("pseudo_label") is PseudoLabel
    for bad in ({"threshold": 2.0}, {"lambda_u": -1.0}, {"rampup": "x"}, {"eval_ema_decay": 1.0}):
        with pytest.raises(ValueError):
            PseudoLabelArguments(**bad)
