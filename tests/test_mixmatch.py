"""MixMatch on small tensors by hand: label guessing + sharpening, mixup across labelled and unlabelled
rows, interleaving (group sizes, involution, per-chunk forwards), the loss terms and their gradients,
no ground truth of unlabelled rows in the loss, the evaluation EMA and the decoupled decay."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from modeling_stil.methods.base import TrainState, get_method_class
from modeling_stil.methods.consistency import interleave
from modeling_stil.methods.mixmatch import (
    MixMatch,
    MixMatchArguments,
    chunked_interleaved_logits,
    guess_labels,
    mixup,
)
from tests.helpers.nets import Identity, TinyNet


def batches(x_l, y_l, u1, u2, monitor):
    labeled = {"labels": y_l, "index": torch.arange(len(y_l)), "weak": {"pixel_values": x_l}}
    unlabeled = {"monitor_labels": monitor, "index": torch.arange(len(u1)),
                 "weak": {"pixel_values": u1}, "weak2": {"pixel_values": u2}}
    return labeled, unlabeled


def test_guess_and_sharpen_by_hand():
    u1 = torch.log(torch.tensor([[0.6, 0.3, 0.1]]))
    u2 = torch.log(torch.tensor([[0.2, 0.5, 0.3]]))
    q = guess_labels(Identity(3), [{"pixel_values": u1}, {"pixel_values": u2}], temperature=0.5)
    mean = torch.tensor([0.4, 0.4, 0.2])
    expected = mean**2 / (mean**2).sum()  # (0.16, 0.16, 0.04) / 0.36
    torch.testing.assert_close(q[0], expected)
    torch.testing.assert_close(q[0], torch.tensor([4 / 9, 4 / 9, 1 / 9]))
    assert not q.requires_grad


def test_mixup_by_hand():
    inputs = {"pixel_values": torch.tensor([[0.0], [10.0], [20.0]]), "categorical_values": torch.tensor([[1], [2], [3]])}
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    perm = torch.tensor([2, 0, 1])
    mixed, mixed_t = mixup(inputs, targets, 0.75, perm)
    torch.testing.assert_close(mixed["pixel_values"], torch.tensor([[5.0], [7.5], [17.5]]))
    torch.testing.assert_close(mixed_t, torch.tensor([[0.875, 0.125], [0.25, 0.75], [0.375, 0.625]]))
    assert torch.equal(mixed["categorical_values"], inputs["categorical_values"])  # codes: the dominant row's


def test_interleave_by_hand():
    chunks = [torch.arange(6) + 10 * i for i in range(3)]
    out = interleave(chunks)
    assert [o.tolist() for o in out] == [[0, 1, 12, 13, 24, 25], [10, 11, 2, 3, 14, 15], [20, 21, 22, 23, 4, 5]]
    assert all(torch.equal(a, b) for a, b in zip(interleave(out), chunks))  # its own inverse
    # B = 64, 3 chunks: groups 21 / 21 / 22 (the remainder goes to the last group)
    big = interleave([torch.full((64,), float(i)) for i in range(3)])
    assert [(big[0] == i).sum().item() for i in range(3)] == [21, 21, 22]
    with pytest.raises(ValueError):
        interleave([torch.zeros(2), torch.zeros(3)])


def test_chunked_forward_sees_mixed_chunks_and_restores_order():
    model = Identity(2)
    inputs = {"pixel_values": torch.arange(12.0).reshape(6, 2)}
    logits = chunked_interleaved_logits(model, inputs, 2)
    assert model.batch_sizes == [2, 2, 2]
    torch.testing.assert_close(logits, inputs["pixel_values"])
    model.batch_sizes.clear()
    chunked_interleaved_logits(model, {"pixel_values": torch.zeros(5, 2)}, 2)  # not a multiple: one forward
    assert model.batch_sizes == [5]


def test_loss_by_hand_and_gradients(monkeypatch):
    model = Identity(3)
    method = MixMatch(model, MixMatchArguments(lambda_u=75.0, rampup_fraction=0.5, eval_ema_decay=0.0))
    monkeypatch.setattr(method, "sample_lambda", lambda: 0.7)
    perm = torch.tensor([4, 5, 0, 1, 2, 3])
    monkeypatch.setattr(method, "sample_permutation", lambda n, device: perm)
    x_l = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.5]], requires_grad=True)
    u1 = torch.tensor([[0.5, 1.0, -1.0], [2.0, 0.0, 1.0]], requires_grad=True)
    u2 = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 3.0]], requires_grad=True)
    y = torch.tensor([0, 2])
    labeled, unlabeled = batches(x_l, y, u1, u2, torch.tensor([0, 2]))
    loss, logs = method(labeled, unlabeled, TrainState(step=25, max_steps=100))  # ramp 25 / 50
    q = ((u1.detach().softmax(-1) + u2.detach().softmax(-1)) / 2) ** 2
    q = q / q.sum(-1, keepdim=True)
    w = torch.cat([x_l.detach(), u1.detach(), u2.detach()])
    t = torch.cat([F.one_hot(y, 3).float(), q, q])
    mw, mt = 0.7 * w + 0.3 * w[perm], 0.7 * t + 0.3 * t[perm]
    sup = -(mt[:2] * F.log_softmax(mw[:2], -1)).sum(-1).mean()
    unsup = ((mw[2:].softmax(-1) - mt[2:]) ** 2).mean()
    torch.testing.assert_close(logs["sup_loss"], sup)
    torch.testing.assert_close(logs["unsup_loss"], unsup)
    assert logs["unsup_weight"].item() == pytest.approx(37.5)
    torch.testing.assert_close(loss, sup + 37.5 * unsup)
    assert model.batch_sizes[-3:] == [2, 2, 2]  # three interleaved forwards of B rows
    loss.backward()
    for tensor in (x_l, u1, u2):
        assert torch.count_nonzero(tensor.grad) > 0


def test_each_term_gives_parameter_gradient():
    torch.manual_seed(0)
    base = TinyNet(in_dim=3)
    data = batches(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), torch.randn(4, 3), torch.randn(4, 3), torch.full((4,), -1))
    grads = {}
    for lambda_u in (0.0, 1.0):
        method = MixMatch(copy.deepcopy(base), MixMatchArguments(lambda_u=lambda_u))
        torch.manual_seed(1)  # same lambda and permutation
        loss, logs = method(*data, TrainState(step=10, max_steps=10))
        loss.backward()
        grads[lambda_u] = torch.cat([p.grad.flatten() for p in method.model.parameters()])
        assert logs["unsup_loss"].item() > 0 and logs["sup_loss"].item() > 0
        assert all(p.grad is None for p in method.eval_ema.parameters())
    assert grads[0.0].abs().max() > 0, "supervised term gives no gradient"
    assert (grads[1.0] - grads[0.0]).abs().max() > 1e-7, "unsupervised term gives no gradient"


def test_monitor_labels_never_reach_the_loss():
    torch.manual_seed(0)
    method = MixMatch(TinyNet(in_dim=3))
    data = [torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), torch.randn(4, 3), torch.randn(4, 3)]
    torch.manual_seed(3)
    a = copy.deepcopy(method)(*batches(*data, torch.tensor([0, 1, 2, 0])), TrainState(step=5, max_steps=10))
    torch.manual_seed(3)
    b = copy.deepcopy(method)(*batches(*data, torch.tensor([1, 1, -1, 2])), TrainState(step=5, max_steps=10))
    assert torch.equal(a[0], b[0])


def test_eval_ema_and_decoupled_decay_by_hand():
    model = Identity(2)
    method = MixMatch(model)
    with torch.no_grad():
        model.head.weight.fill_(1.0)
    method.after_optimizer_step(TrainState(step=1, learning_rate=0.002))
    torch.testing.assert_close(method.eval_ema.module.head.weight, 0.999 * torch.eye(2) + 0.001)
    torch.testing.assert_close(model.head.weight.detach(), torch.full((2, 2), 1 - 0.02 * 0.002))
    assert method.eval_model() is method.eval_ema.module
    assert any(k.startswith("eval_ema.module.") for k in method.state_dict())


def test_registration_and_argument_checks():
    assert get_method_class("mixmatch") is MixMatch
    assert MixMatch.supported_tasks == ("classification",)  # the original has no regression MixMatch
    for bad in ({"temperature": 0.0}, {"alpha": 0.0}, {"lambda_u": -1.0}, {"eval_ema_decay": 1.0}):
        with pytest.raises(ValueError):
            MixMatchArguments(**bad)
