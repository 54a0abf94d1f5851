"""Shared SSL pieces (modeling_stil/methods/common.py) against hand-computed values."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modeling_stil.methods.base import TrainState
from modeling_stil.methods.common import (
    DistributionAlignment,
    EMADistributionAlignment,
    EMATeacher,
    Queue,
    concat_views,
    confidence_mask,
    cross_entropy,
    gather_no_grad,
    model_inputs,
    pseudo_label_logs,
    pseudo_labels,
    sharpen,
    soft_cross_entropy,
    task_loss,
    unwrap_model,
    view_targets,
    warmup_momentum,
)
from tests.helpers.nets import TinyNet


class WithIntBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.tensor([1.0, 2.0]))
        self.register_buffer("offset", torch.tensor([3, 7]))  # integer: must be copied
        self.register_buffer("scale", torch.tensor([10.0]))  # floating buffer


# ---------------------------------------------------------------------------------------- EMA
def _perturbed_student(seed=0):
    torch.manual_seed(seed)
    student = TinyNet()
    teacher = EMATeacher(student, mode="state")
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    student.train()
    student(torch.randn(16, 4) * 3 + 1)  # moves running stats, num_batches_tracked 0 -> 1
    student(torch.randn(16, 4) * 3 + 1)  # -> 2
    return student, teacher


@pytest.mark.parametrize("mode", ["state", "parameters"])
def test_ema_update_matches_formula(mode):
    student, teacher = _perturbed_student()
    teacher.mode = mode
    old = {k: v.clone() for k, v in teacher.module.state_dict().items()}
    new = {k: v.clone() for k, v in student.state_dict().items()}
    m = 0.9
    teacher.update(student, m)
    got = teacher.module.state_dict()
    param_names = {name for name, _ in student.named_parameters()}
    for key in old:
        if key in param_names or (mode == "state" and old[key].is_floating_point()):
            torch.testing.assert_close(got[key], m * old[key] + (1 - m) * new[key], rtol=0, atol=1e-6)
            assert not torch.equal(got[key], new[key])
        else:  # parameters mode: buffers copied; any mode: integer buffers copied
            assert torch.equal(got[key], new[key]), key
    assert int(got["norm.num_batches_tracked"]) == 2


def test_ema_integer_buffers_copied_not_averaged():
    student = WithIntBuffer()
    teacher = EMATeacher(student, mode="state")
    with torch.no_grad():
        student.offset.copy_(torch.tensor([5, 100]))
        student.scale.fill_(20.0)
        student.weight.fill_(0.0)
    teacher.update(student, 0.9)
    assert teacher.module.offset.dtype == torch.long
    assert teacher.module.offset.tolist() == [5, 100]  # not int(0.9*3+0.1*5)=3
    assert teacher.module.scale.item() == pytest.approx(0.9 * 10 + 0.1 * 20)
    assert teacher.module.weight.tolist() == pytest.approx([0.9, 1.8])


def test_ema_teacher_is_frozen_eval_and_gets_no_grad():
    student = TinyNet()
    holder = nn.ModuleDict({"student": student, "teacher": EMATeacher(student)})
    holder.train()
    teacher = holder["teacher"]
    assert not teacher.module.training and student.training
    assert all(not p.requires_grad for p in teacher.parameters())
    teacher.module.train()  # someone flips the inner module: forward still runs in eval mode
    x = torch.randn(5, 4)
    out = teacher(pixel_values=x)
    assert not out.logits.requires_grad and not teacher.module.training
    before = teacher.module.norm.running_mean.clone()
    loss = student(x).logits.sum() + teacher(pixel_values=x).logits.sum() * 0
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert torch.equal(teacher.module.norm.running_mean, before)  # eval forward left stats alone
    assert student.head.weight.grad is not None
    # the teacher is a copy, not a view of the student
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(teacher.parameters(), student.parameters()))


def test_ema_update_under_autocast_keeps_float32():
    student, teacher = _perturbed_student(1)
    old = teacher.module.head.weight.clone()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        teacher.update(student, 0.5)
        out = teacher(pixel_values=torch.randn(3, 4))
    assert teacher.module.head.weight.dtype == torch.float32
    torch.testing.assert_close(teacher.module.head.weight, 0.5 * old + 0.5 * student.head.weight, rtol=0, atol=1e-6)
    assert out.logits.shape == (3, 3)


def test_ema_with_ddp_wrapped_student(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        student = TinyNet()
        ddp = nn.parallel.DistributedDataParallel(student)
        teacher = EMATeacher(ddp, mode="state")
        assert unwrap_model(ddp) is student
        assert set(teacher.module.state_dict()) == set(student.state_dict())  # no "module." prefix
        with torch.no_grad():
            student.head.bias.fill_(1.0)
        old = teacher.module.head.bias.clone()
        teacher.update(ddp, 0.75)
        torch.testing.assert_close(teacher.module.head.bias, 0.75 * old + 0.25, rtol=0, atol=1e-6)
        assert torch.equal(gather_no_grad(torch.arange(3.0), TrainState()), torch.arange(3.0))
    finally:
        dist.destroy_process_group()


def test_ema_rejects_mismatched_student_and_bad_momentum():
    teacher = EMATeacher(TinyNet())
    with pytest.raises(ValueError):
        teacher.update(TinyNet(hidden=8, num_labels=3).body, 0.9)
    with pytest.raises(ValueError):
        teacher.update(TinyNet(), 1.5)
    with pytest.raises(ValueError):
        EMATeacher(TinyNet(), mode="buffers")


def test_warmup_momentum():
    assert warmup_momentum(0.999, 0) == pytest.approx(0.1)
    assert warmup_momentum(0.999, 10) == pytest.approx(11 / 20)
    assert warmup_momentum(0.999, 10**6) == 0.999
    assert warmup_momentum(0.5, 100) == 0.5


# ---------------------------------------------------------------------------------------- gather
def test_gather_no_grad_uneven_batches():
    """Simulates rank 1 of 3 processes holding 2, 3 and 1 rows."""
    per_rank = [torch.tensor([[1.0, 1.0], [2.0, 2.0]]), None, torch.tensor([[9.0, 9.0]])]
    local = torch.tensor([[3.0, 3.0], [4.0, 4.0], [5.0, 5.0]], requires_grad=True)
    per_rank[1] = local.detach()
    calls = []

    def fake_gather(tensor):  # what accelerator.gather does: concatenate equal-shaped tensors
        calls.append(tuple(tensor.shape))
        if tensor.dtype == torch.long and tensor.shape == (1,):
            return torch.tensor([len(t) for t in per_rank])
        assert tensor.shape[0] == 3, "every process must send the same (padded) size"
        padded = [torch.cat([t, t.new_full((3 - len(t), 2), -1.0)]) if len(t) < 3 else t for t in per_rank]
        padded[1] = tensor
        return torch.cat(padded)

    out = gather_no_grad(local, fake_gather)
    assert out.tolist() == [[1, 1], [2, 2], [3, 3], [4, 4], [5, 5], [9, 9]]
    assert not out.requires_grad
    assert calls == [(1,), (3, 2)]
    # one process: identity, no padding
    assert torch.equal(gather_no_grad(local, TrainState()), local.detach())


# ---------------------------------------------------------------------------------------- queue + DA
def test_queue_wraps_around():
    q = Queue(4, 2)
    q.enqueue(torch.tensor([[1.0, 1], [2, 2], [3, 3]]))
    assert q.ptr.item() == 3 and q.count.item() == 3
    assert q.ordered().tolist() == [[1, 1], [2, 2], [3, 3]]
    q.enqueue(torch.tensor([[4.0, 4], [5, 5], [6, 6]]))
    assert q.buffer.tolist() == [[5, 5], [6, 6], [3, 3], [4, 4]]
    assert q.ptr.item() == 2 and q.count.item() == 4
    assert q.ordered().tolist() == [[3, 3], [4, 4], [5, 5], [6, 6]]
    q.enqueue(torch.arange(12.0).reshape(6, 2))  # more than the queue holds: keep the newest 4
    assert q.ordered().tolist() == [[4, 5], [6, 7], [8, 9], [10, 11]]
    assert set(q.state_dict()) == {"buffer", "ptr", "count"}
    with pytest.raises(ValueError):
        q.enqueue(torch.zeros(1, 3))


def test_queue_distribution_alignment_by_hand():
    da = DistributionAlignment(num_classes=2, queue_size=4)
    p1 = torch.tensor([[0.9, 0.1], [0.7, 0.3]])  # batch mean (0.8, 0.2)
    out1 = da(p1)
    # queue = [(0.8,0.2), 0, 0, 0] -> mean (0.2, 0.05); p / mean, renormalised
    expected1 = torch.tensor([[0.9 / 0.2, 0.1 / 0.05], [0.7 / 0.2, 0.3 / 0.05]])
    expected1 = expected1 / expected1.sum(1, keepdim=True)
    torch.testing.assert_close(out1, expected1)
    p2 = torch.tensor([[0.5, 0.5], [0.3, 0.7]])  # batch mean (0.4, 0.6)
    out2 = da(p2)
    mean = torch.tensor([(0.8 + 0.4) / 4, (0.2 + 0.6) / 4])
    expected2 = p2 / mean
    torch.testing.assert_close(out2, expected2 / expected2.sum(1, keepdim=True))
    # across processes the pushed mean is the mean of the processes' means
    da2 = DistributionAlignment(num_classes=2, queue_size=4)
    state = TrainState(num_processes=2, reduce_sum=lambda t: t + torch.tensor([0.2, 0.8]))
    da2(p1, state)
    torch.testing.assert_close(da2.queue.buffer[0], torch.tensor([0.5, 0.5]))


def test_ema_distribution_alignment_by_hand():
    da = EMADistributionAlignment(num_classes=2, momentum=0.9)
    p1 = torch.tensor([[0.9, 0.1], [0.7, 0.3]])
    out1 = da(p1)  # first call: p_model = batch mean (0.8, 0.2)
    torch.testing.assert_close(da.p_model, torch.tensor([0.8, 0.2]))
    e1 = p1 * (0.5 + 1e-6) / (torch.tensor([0.8, 0.2]) + 1e-6)
    torch.testing.assert_close(out1, e1 / e1.sum(1, keepdim=True))
    p2 = torch.tensor([[0.2, 0.8], [0.6, 0.4]])  # mean (0.4, 0.6)
    da(p2)
    torch.testing.assert_close(da.p_model, torch.tensor([0.9 * 0.8 + 0.1 * 0.4, 0.9 * 0.2 + 0.1 * 0.6]))
    lab = EMADistributionAlignment(num_classes=2, momentum=0.5, target="labeled")
    lab(p1, probs_lb=torch.tensor([[0.0, 1.0]]))
    lab(p1, probs_lb=torch.tensor([[1.0, 0.0]]))
    torch.testing.assert_close(lab.p_target, torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError):
        lab(p1)


# ---------------------------------------------------------------------------------------- pseudo-labels
def test_confidence_mask_threshold_inclusive_and_float():
    probs = torch.tensor([[0.95, 0.05], [0.94, 0.06], [0.01, 0.99], [0.5, 0.5]])
    mask = confidence_mask(probs, 0.95)
    assert mask.dtype == torch.float32 and mask.tolist() == [1.0, 0.0, 1.0, 0.0]
    assert confidence_mask(probs, 0.0).tolist() == [1.0] * 4


def test_sharpen_and_pseudo_labels():
    p = torch.tensor([[0.6, 0.3, 0.1]])
    s = sharpen(p, 0.5)
    torch.testing.assert_close(s, torch.tensor([[0.36, 0.09, 0.01]]) / 0.46)
    torch.testing.assert_close(sharpen(p, 1.0), p)
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 3.0, 0.0]], requires_grad=True)
    hard, probs = pseudo_labels(logits)
    assert hard.tolist() == [0, 1] and hard.dtype == torch.long
    torch.testing.assert_close(probs, logits.detach().softmax(-1))
    soft, _ = pseudo_labels(logits, hard=False, temperature=0.5)
    torch.testing.assert_close(soft, (logits.detach() * 2).softmax(-1))
    assert not soft.requires_grad and not probs.requires_grad


def test_cross_entropies_by_hand():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    log_z = math.log(math.exp(1) + math.exp(2) + math.exp(3))
    targets = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    expected = torch.tensor([-(0.5 * (1 - log_z) + 0.5 * (2 - log_z)), math.log(3)])
    torch.testing.assert_close(soft_cross_entropy(logits, targets), expected)
    torch.testing.assert_close(cross_entropy(logits, targets, reduction="mean"), expected.mean())
    hard = torch.tensor([2, 0])
    torch.testing.assert_close(cross_entropy(logits, hard), torch.tensor([log_z - 3, math.log(3)]))
    torch.testing.assert_close(cross_entropy(logits, F.one_hot(hard, 3).float()), cross_entropy(logits, hard))
    with pytest.raises(ValueError):
        cross_entropy(logits, torch.rand(2, 4))


def test_task_loss_regression_and_landmarks():
    pred = torch.tensor([[1.0], [3.0]])
    assert task_loss(pred, torch.tensor([0.0, 1.0]), "regression").item() == pytest.approx((1 + 4) / 2)
    pred = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    assert task_loss(pred, torch.tensor([[1.0, 1.0, 2.0, 2.0]]), "landmarks").item() == pytest.approx(0.5)


def test_pseudo_label_logs_by_hand():
    predicted = torch.tensor([0, 1, 2, 1])
    mask = torch.tensor([1.0, 1.0, 0.0, 0.0])
    monitor = torch.tensor([0, 2, 2, -1])  # last row has no ground truth
    logs = pseudo_label_logs(predicted, mask, monitor)
    assert logs["mask_ratio"].item() == 0.5
    assert logs["pseudo_label_accuracy"].item() == pytest.approx(2 / 3)
    assert logs["pseudo_label_accuracy_masked"].item() == pytest.approx(1 / 2)
    none = pseudo_label_logs(predicted, mask, torch.full((4,), -1))
    assert math.isnan(none["pseudo_label_accuracy"].item())
    assert set(pseudo_label_logs(predicted, mask, None)) == {"mask_ratio"}


def test_view_plumbing():
    a = {"pixel_values": torch.zeros(2, 4), "labels": torch.ones(2), "translation": torch.zeros(2, 2)}
    b = {"pixel_values": torch.ones(3, 4)}
    assert set(model_inputs(a)) == {"pixel_values"}
    assert torch.equal(view_targets(a, torch.zeros(2)), torch.ones(2))
    assert torch.equal(view_targets(b, torch.zeros(3)), torch.zeros(3))
    inputs, sizes = concat_views([model_inputs(a), b])
    assert sizes == [2, 3] and inputs["pixel_values"].shape == (5, 4)
    with pytest.raises(ValueError):
        concat_views([a, b])


def test_rampups_by_hand():
    import math

    from modeling_stil.methods.common import linear_rampup, sigmoid_rampup

    assert sigmoid_rampup(0, 10) == pytest.approx(math.exp(-5.0))
    assert sigmoid_rampup(5, 10) == pytest.approx(math.exp(-5.0 * 0.25))
    assert sigmoid_rampup(20, 10) == 1.0 and sigmoid_rampup(3, 0) == 1.0
    assert linear_rampup(2.5, 10) == 0.25 and linear_rampup(-1, 10) == 0.0 and linear_rampup(1, 0) == 1.0
