"""FixMatch: the classic silent failures (no unsupervised gradient, gradient through the pseudo-label
branch, masked rows leaking, ground truth of unlabelled rows reaching the loss, EMA not updated)."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modeling_stil.methods.base import TrainState, get_method_class
from modeling_stil.methods.fixmatch import FixMatch, FixMatchArguments
from tests.helpers.nets import TinyNet, TinyOutput


class LinearNet(nn.Module):
    """logits = x @ W^T with W = identity at init: the logits ARE the inputs (no BN, no mixing)."""

    def __init__(self, num_labels=3):
        super().__init__()
        self.head = nn.Linear(num_labels, num_labels, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(torch.eye(num_labels))
        self.batch_sizes = []

    def forward(self, pixel_values, **unused):
        self.batch_sizes.append(pixel_values.shape[0])
        return TinyOutput(logits=self.head(pixel_values))


def make_batches(x_l, y_l, x_w, x_s, monitor):
    labeled = {"labels": y_l, "index": torch.arange(len(y_l)), "weak": {"pixel_values": x_l}}
    unlabeled = {
        "monitor_labels": monitor,
        "index": torch.arange(len(monitor)),
        "weak": {"pixel_values": x_w},
        "strong": {"pixel_values": x_s},
    }
    return labeled, unlabeled


def hand_batches():
    x_l = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]], requires_grad=True)
    y_l = torch.tensor([0, 2])
    # row 0: softmax(10, 0, 0) = 0.99991 >= 0.95 -> pseudo-label 0; row 1: softmax(0.1, 0, 0) -> masked out
    x_w = torch.tensor([[10.0, 0.0, 0.0], [0.1, 0.0, 0.0]], requires_grad=True)
    x_s = torch.tensor([[0.5, 1.0, -1.0], [2.0, 0.0, 1.0]], requires_grad=True)
    return make_batches(x_l, y_l, x_w, x_s, torch.tensor([0, 1]))


@pytest.mark.parametrize("concat_forward", [True, False])
def test_loss_mask_and_gradients_by_hand(concat_forward):
    model = LinearNet()
    method = FixMatch(model, FixMatchArguments(concat_forward=concat_forward, lambda_u=2.0))
    labeled, unlabeled = hand_batches()
    loss, logs = method(labeled, unlabeled, TrainState())
    x_l, x_w, x_s = labeled["weak"]["pixel_values"], unlabeled["weak"]["pixel_values"], unlabeled["strong"]["pixel_values"]
    sup = F.cross_entropy(x_l.detach(), labeled["labels"])
    unsup = F.cross_entropy(x_s.detach()[:1], torch.tensor([0])) * 1.0 / 2  # normalised by B_u = 2
    torch.testing.assert_close(logs["sup_loss"], sup)
    torch.testing.assert_close(logs["unsup_loss"], unsup)
    torch.testing.assert_close(loss, sup + 2.0 * unsup)
    assert logs["mask_ratio"].item() == 0.5
    assert logs["pseudo_label_accuracy"].item() == 0.5  # pseudo-labels (0, 0) vs monitor (0, 1)
    assert logs["pseudo_label_accuracy_masked"].item() == 1.0
    assert all(not v.requires_grad for v in logs.values())
    loss.backward()
    assert x_w.grad is None or torch.count_nonzero(x_w.grad) == 0, "gradient flowed through the pseudo-label branch"
    assert torch.count_nonzero(x_s.grad[0]) > 0, "confident row gives no gradient"
    assert torch.count_nonzero(x_s.grad[1]) == 0, "masked-out row leaked gradient"
    assert torch.count_nonzero(x_l.grad) > 0
    assert torch.count_nonzero(model.head.weight.grad) > 0
    expected_sizes = [6] if concat_forward else [2, 2, 2]
    assert model.batch_sizes == expected_sizes


def test_pseudo_label_accuracy_uses_all_and_masked_rows():
    model = LinearNet()
    method = FixMatch(model, FixMatchArguments())
    labeled, unlabeled = hand_batches()
    unlabeled["monitor_labels"] = torch.tensor([0, 2])  # row 1's pseudo-label (0) is wrong
    _, logs = method(labeled, unlabeled, TrainState())
    assert logs["pseudo_label_accuracy"].item() == 0.5
    assert logs["pseudo_label_accuracy_masked"].item() == 1.0


def test_monitor_labels_never_reach_the_loss():
    torch.manual_seed(0)
    model = TinyNet(in_dim=3)
    method = FixMatch(model, FixMatchArguments(threshold=0.0))  # every row contributes
    x_l, x_w, x_s = torch.randn(4, 3), torch.randn(8, 3), torch.randn(8, 3)
    y = torch.tensor([0, 1, 2, 0])
    a = method(*make_batches(x_l, y, x_w, x_s, torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])), TrainState())
    b = method(*make_batches(x_l, y, x_w, x_s, torch.tensor([2, 2, 2, 2, -1, -1, 1, 0])), TrainState())
    assert torch.equal(a[0], b[0])
    assert torch.equal(a[1]["unsup_loss"], b[1]["unsup_loss"])
    assert not torch.equal(a[1]["pseudo_label_accuracy"], b[1]["pseudo_label_accuracy"])


def test_unsupervised_term_produces_parameter_gradient():
    torch.manual_seed(0)
    base = TinyNet(in_dim=3)
    x_l, x_w, x_s = torch.randn(4, 3), torch.randn(8, 3), torch.randn(8, 3)
    batches = make_batches(x_l, torch.tensor([0, 1, 2, 0]), x_w, x_s, torch.full((8,), -1))
    grads = {}
    for lambda_u in (0.0, 1.0):
        model = copy.deepcopy(base)
        loss, logs = FixMatch(model, FixMatchArguments(threshold=0.0, lambda_u=lambda_u, ema_momentum=0.0))(*batches, TrainState())
        loss.backward()
        grads[lambda_u] = torch.cat([p.grad.flatten() for p in model.parameters()])
        assert logs["unsup_loss"].item() > 0
        assert math.isnan(logs["pseudo_label_accuracy"].item())  # no monitor labels: undefined, not 0
    assert (grads[1.0] - grads[0.0]).abs().max() > 1e-6


@pytest.mark.parametrize("concat_forward", [True, False])
def test_soft_pseudo_labels_by_hand(concat_forward):
    model = LinearNet()
    args = FixMatchArguments(use_hard_labels=False, temperature=0.5, threshold=0.0, concat_forward=concat_forward)
    labeled, unlabeled = hand_batches()
    loss, logs = FixMatch(model, args)(labeled, unlabeled, TrainState())
    loss.backward()
    x_w = unlabeled["weak"]["pixel_values"]
    assert x_w.grad is None or torch.count_nonzero(x_w.grad) == 0, "soft targets carried gradient"
    x_w, x_s = unlabeled["weak"]["pixel_values"].detach(), unlabeled["strong"]["pixel_values"].detach()
    targets = (x_w / 0.5).softmax(-1)
    expected = -(targets * x_s.log_softmax(-1)).sum(-1).mean()
    torch.testing.assert_close(logs["unsup_loss"], expected)


def test_ema_teacher_pseudo_labels_no_grad_and_eval_model():
    model = LinearNet()
    method = FixMatch(model, FixMatchArguments(use_ema_teacher=True))
    with torch.no_grad():
        method.ema.module.head.weight.copy_(torch.eye(3).roll(1, dims=0))  # teacher predicts class (c + 1) % 3
    labeled, unlabeled = hand_batches()
    unlabeled["monitor_labels"] = torch.tensor([1, 1])  # teacher's argmax of both weak rows
    model.batch_sizes.clear()
    loss, logs = method(labeled, unlabeled, TrainState())
    assert logs["pseudo_label_accuracy"].item() == 1.0
    assert model.batch_sizes == [4]  # student sees labelled weak + unlabelled strong only
    loss.backward()
    assert method.ema.module.head.weight.grad is None
    assert all(not p.requires_grad for p in method.ema.parameters())
    assert all(p.requires_grad for p in method.trainable_parameters())
    assert len(method.trainable_parameters()) == len(list(model.parameters()))
    assert method.eval_model() is method.ema.module


def test_after_optimizer_step_updates_ema_with_warmup():
    model = LinearNet()
    method = FixMatch(model, FixMatchArguments(ema_momentum=0.999))
    with torch.no_grad():
        model.head.weight.add_(1.0)
    method.after_optimizer_step(TrainState(step=0))  # warm-up momentum 0.1
    torch.testing.assert_close(method.ema.module.head.weight, 0.1 * torch.eye(3) + 0.9 * (torch.eye(3) + 1))
    no_warmup = FixMatch(LinearNet(), FixMatchArguments(ema_momentum=0.9, ema_warmup=False))
    with torch.no_grad():
        no_warmup.model.head.weight.fill_(1.0)
    no_warmup.after_optimizer_step(TrainState(step=0))
    torch.testing.assert_close(no_warmup.ema.module.head.weight, 0.9 * torch.eye(3) + 0.1)
    assert FixMatch(LinearNet(), FixMatchArguments(eval_with_ema=False)).eval_model().__class__ is LinearNet
    plain = FixMatch(LinearNet(), FixMatchArguments(ema_momentum=0.0))
    assert plain.ema is None and plain.eval_model() is plain.model
    plain.after_optimizer_step(TrainState())  # no-op, no crash


def test_contract_registration_and_argument_checks():
    assert get_method_class("fixmatch") is FixMatch
    assert FixMatch.unlabeled_views == {"weak": "weak", "strong": "strong"}
    assert FixMatch.labeled_views == {"weak": "weak"}
    for bad in ({"threshold": 1.5}, {"ema_momentum": 1.0}, {"ema_mode": "x"}, {"use_ema_teacher": True, "ema_momentum": 0.0}):
        with pytest.raises(ValueError):
            FixMatchArguments(**bad)
    with pytest.raises(ValueError):
        FixMatch(LinearNet())(hand_batches()[0], None, TrainState())
    # the EMA copy is part of the checkpointed state
    assert any(key.startswith("ema.module.") for key in FixMatch(LinearNet()).state_dict())


def test_overfits_a_tiny_separable_problem():
    torch.manual_seed(0)
    centers = torch.tensor([[3.0, 0.0], [-3.0, 0.0], [0.0, 3.0]])
    y_l = torch.arange(3).repeat(2)
    y_u = torch.arange(3).repeat(8)
    x_l, x_u = centers[y_l] + 0.3 * torch.randn(6, 2), centers[y_u] + 0.3 * torch.randn(24, 2)
    model = TinyNet(in_dim=2, num_labels=3, hidden=16)
    method = FixMatch(model, FixMatchArguments(threshold=0.8))
    optimizer = torch.optim.Adam(method.trainable_parameters(), lr=0.03)
    losses, unsup = [], []
    for step in range(30):
        labeled, unlabeled = make_batches(
            x_l + 0.05 * torch.randn_like(x_l), y_l, x_u + 0.05 * torch.randn_like(x_u), x_u + 0.5 * torch.randn_like(x_u), y_u
        )
        method.train()
        loss, logs = method(labeled, unlabeled, TrainState(step=step, max_steps=30))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        method.after_optimizer_step(TrainState(step=step))
        losses.append(loss.item())
        unsup.append(logs["unsup_loss"].item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    assert max(unsup) > 0, "the unlabelled term never switched on"
    assert logs["mask_ratio"].item() > 0.5 and logs["pseudo_label_accuracy"].item() > 0.9
    evaluator = method.eval_model().eval()
    with torch.no_grad():
        accuracy = (evaluator(pixel_values=x_u).logits.argmax(-1) == y_u).float().mean()
    assert accuracy > 0.9
