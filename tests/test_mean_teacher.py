"""Mean Teacher: the consistency term must train the student (a toolkit's Mean Teacher trained with a
zero consistency gradient for years, microsoft/Semi-supervised-learning #102/#226), never the teacher;
the teacher EMA, the evaluation EMA and the decoupled decay against hand-computed values; the ramp;
the landmark view transfer (by hand, and against the real loader's moved ground truth); no ground
truth of unlabelled rows in the loss; the image+tabular model with a regression head."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from modeling_stil.methods.base import TrainState, get_method_class
from modeling_stil.methods.common import mean_teacher_momentum
from modeling_stil.methods.consistency import consistency_loss, consistency_weight, interleaved_logits, transfer_to_view
from modeling_stil.methods.mean_teacher import MeanTeacher, MeanTeacherArguments
from tests.helpers.nets import Identity, TinyNet


def batches(x_l, y_l, u1, u2, monitor, t1=None, t2=None):
    labeled = {"labels": y_l, "index": torch.arange(len(y_l)), "weak": {"pixel_values": x_l}}
    student, teacher = {"pixel_values": u1}, {"pixel_values": u2}
    if t1 is not None:
        student["translation"], teacher["translation"] = t1, t2
    unlabeled = {"monitor_labels": monitor, "index": torch.arange(len(u1)), "student": student, "teacher": teacher}
    return labeled, unlabeled


def test_classification_loss_by_hand_and_gradients_student_only():
    model = Identity()
    method = MeanTeacher(model, MeanTeacherArguments(lambda_u=50.0))
    x_l = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.5]], requires_grad=True)
    u1 = torch.tensor([[0.5, 1.0, -1.0], [2.0, 0.0, 1.0]], requires_grad=True)
    u2 = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 3.0]], requires_grad=True)
    labeled, unlabeled = batches(x_l, torch.tensor([0, 2]), u1, u2, torch.tensor([0, 2]))
    state = TrainState(step=20, max_steps=100, task="classification", num_labels=3)  # ramp 20 / 40
    loss, logs = method(labeled, unlabeled, state)
    sup = F.cross_entropy(x_l.detach(), torch.tensor([0, 2]))
    unsup = ((u1.detach().softmax(-1) - u2.detach().softmax(-1)) ** 2).mean()  # mean over B x C
    torch.testing.assert_close(logs["sup_loss"], sup)
    torch.testing.assert_close(logs["unsup_loss"], unsup)
    assert logs["unsup_weight"].item() == pytest.approx(25.0)
    torch.testing.assert_close(loss, sup + 25.0 * unsup)
    assert logs["pseudo_label_accuracy"].item() == 1.0  # teacher argmax (0, 2) vs monitor (0, 2)
    loss.backward()
    assert torch.count_nonzero(u1.grad) > 0, "the consistency term gives the student no gradient"
    assert u2.grad is None or torch.count_nonzero(u2.grad) == 0, "gradient reached the teacher's input"
    assert all(p.grad is None and not p.requires_grad for p in method.teacher.parameters())
    assert model.batch_sizes == [2, 2]  # interleaved: one forward per chunk, labelled and unlabelled mixed


def test_consistency_term_gives_parameter_gradient_and_fails_if_zero():
    """The test a zero-gradient Mean Teacher (student logits swapped for the teacher's) fails."""
    torch.manual_seed(0)
    base = TinyNet(in_dim=3)
    x_l, u1, u2 = torch.randn(4, 3), torch.randn(4, 3), torch.randn(4, 3)
    data = batches(x_l, torch.tensor([0, 1, 2, 0]), u1, u2, torch.full((4,), -1))
    grads = {}
    for lambda_u in (0.0, 1.0):
        model = copy.deepcopy(base)
        method = MeanTeacher(model, MeanTeacherArguments(lambda_u=lambda_u))
        with torch.no_grad():  # a teacher that disagrees with the student (as after a few steps)
            for p in method.teacher.module.parameters():
                p.add_(0.5 * torch.randn_like(p))
        loss, logs = method(*data, TrainState(step=10**6, max_steps=10**6))
        loss.backward()
        grads[lambda_u] = torch.cat([p.grad.flatten() for p in model.parameters()])
        assert logs["unsup_loss"].item() > 0
        assert all(p.grad is None for p in method.teacher.parameters())
    assert (grads[1.0] - grads[0.0]).abs().max() > 1e-6, "consistency term has zero gradient into the student"


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_consistency_loss_pieces(reduction):
    s = torch.tensor([[1.0, 2.0], [0.0, -1.0]], requires_grad=True)
    t = torch.tensor([[0.5, 1.0], [1.0, 1.0]], requires_grad=True)
    reg = consistency_loss(s, t, "landmarks", reduction)
    sq = (s.detach() - t.detach()) ** 2
    expected = {"mean": sq.mean(), "sum": sq.sum(), "none": sq.mean(1)}[reduction]
    torch.testing.assert_close(reg.detach(), expected)
    reg.sum().backward()
    assert torch.count_nonzero(s.grad) > 0 and torch.count_nonzero(t.grad) > 0  # L2I differentiates targets
    cls = consistency_loss(s.detach(), torch.tensor([[1.0, 0.0], [0.0, 1.0]]), "classification", "sum")
    torch.testing.assert_close(cls, ((s.detach().softmax(-1) - torch.eye(2)) ** 2).sum())


def test_rampups_and_teacher_momentum_by_hand():
    assert consistency_weight(0, 1000, 50.0, 0.4) == 0.0
    assert consistency_weight(200, 1000, 50.0, 0.4) == pytest.approx(25.0)
    assert consistency_weight(400, 1000, 50.0, 0.4) == pytest.approx(50.0)
    assert consistency_weight(900, 1000, 50.0, 0.4) == pytest.approx(50.0)
    assert consistency_weight(200, 1000, 50.0, 0.4, "sigmoid") == pytest.approx(50.0 * math.exp(-5 * 0.25))
    assert [mean_teacher_momentum(t, 0.999) for t in (0, 1, 3)] == [0.0, 0.5, 0.75]
    assert mean_teacher_momentum(998, 0.999) < 0.999 and mean_teacher_momentum(999, 0.999) == pytest.approx(0.999)
    assert mean_teacher_momentum(5000, 0.999) == 0.999
    assert MeanTeacherArguments().resolved_lambda_u("classification") == 50.0
    assert MeanTeacherArguments().resolved_lambda_u("landmarks") == 75.0


def test_ema_order_and_values_by_hand():
    """After step t (state.step = t + 1): eval EMA (0.999), then student *= 1 - 0.02 lr, then the teacher
    with a_t = min(1 - 1/(t+1), 0.999) sees the decayed student."""
    model = Identity(2)
    method = MeanTeacher(model, MeanTeacherArguments())
    w0 = torch.eye(2)
    lr = 0.5
    with torch.no_grad():
        model.head.weight.fill_(2.0)
    method.after_optimizer_step(TrainState(step=1, learning_rate=lr, task="classification"))  # t = 0
    decayed = torch.full((2, 2), 2.0 * (1 - 0.02 * lr))
    torch.testing.assert_close(method.eval_ema.module.head.weight, 0.999 * w0 + 0.001 * 2.0)
    torch.testing.assert_close(model.head.weight.detach(), decayed)
    torch.testing.assert_close(method.teacher.module.head.weight, decayed)  # a_0 = 0: a copy
    with torch.no_grad():
        model.head.weight.fill_(4.0)
    method.after_optimizer_step(TrainState(step=2, learning_rate=lr, task="classification"))  # t = 1: a = 0.5
    decayed2 = torch.full((2, 2), 4.0 * (1 - 0.02 * lr))
    torch.testing.assert_close(method.teacher.module.head.weight, 0.5 * decayed + 0.5 * decayed2)
    # regression: no decoupled decay (the original comments it out)
    reg = MeanTeacher(Identity(2), MeanTeacherArguments())
    with torch.no_grad():
        reg.model.head.weight.fill_(3.0)
    reg.after_optimizer_step(TrainState(step=1, learning_rate=lr, task="landmarks"))
    torch.testing.assert_close(reg.model.head.weight.detach(), torch.full((2, 2), 3.0))
    # evaluation model choices; teacher/eval EMA live in the state dict (checkpointed)
    keys = method.state_dict().keys()
    assert any(k.startswith("teacher.module.") for k in keys) and any(k.startswith("eval_ema.module.") for k in keys)
    assert method.eval_model() is method.eval_ema.module
    assert MeanTeacher(Identity(), MeanTeacherArguments(evaluate="teacher")).eval_model().__class__ is Identity
    with pytest.raises(ValueError):
        MeanTeacherArguments(evaluate="ema", eval_ema_decay=0.0)


def test_teacher_labels_with_batch_statistics_like_the_original():
    method = MeanTeacher(TinyNet(in_dim=3), MeanTeacherArguments())
    method.train()
    assert method.teacher.module.training and not method.eval_ema.module.training
    eval_teacher = MeanTeacher(TinyNet(in_dim=3), MeanTeacherArguments(teacher_train_mode=False))
    eval_teacher.train()
    assert not eval_teacher.teacher.module.training


def test_landmark_view_transfer_by_hand():
    p = torch.tensor([[10.0, 20.0, 30.0, 40.0]])
    t2, t1 = torch.tensor([[1.0, -2.0]]), torch.tensor([[3.0, 0.0]])
    torch.testing.assert_close(transfer_to_view(p, t2, t1), torch.tensor([[12.0, 22.0, 32.0, 42.0]]))
    std = torch.tensor([2.0, 4.0, 2.0, 4.0])
    torch.testing.assert_close(transfer_to_view(p, t2, t1, std), torch.tensor([[11.0, 20.5, 31.0, 40.5]]))
    assert transfer_to_view(p, None, t1) is p
    # through the method: the teacher's prediction on u2 moved into u1's frame
    method = MeanTeacher(Identity(4), MeanTeacherArguments())
    method.target_std = std
    _, unlabeled = batches(torch.zeros(1, 4), torch.zeros(1, 4), torch.zeros(1, 4), p, torch.zeros(1, 4), t1, t2)
    torch.testing.assert_close(method.teacher_targets(unlabeled, "landmarks"), torch.tensor([[11.0, 20.5, 31.0, 40.5]]))


def test_real_loader_views_transfer_onto_the_moved_ground_truth(tmp_path, synthetic_cache):
    """The teacher view's (standardised) ground truth moved with the translations
    equals the student view's ground truth: sign, order (x, y) and the 1/sigma factor are right."""
    from tests._helpers import fresh_accelerate_state, flags
    from modeling_stil.training.arguments import parse_run_arguments
    from modeling_stil.training.job import assemble
    from modeling_stil.training.accelerator import make_accelerator
    from modeling_stil.training.batches import standardize_targets

    argv = flags({"output_dir": str(tmp_path / "run"), "dataset_cache_dir": str(synthetic_cache), "synthetic_task": "landmarks",
                  "synthetic_num_samples": "200", "synthetic_image_size": "60", "labeled_fraction": "0.2", "mu": "1",
                  "per_device_train_batch_size": "8", "method": "mean_teacher", "model": "tcdcnn",
                  "standardize_targets": "true", "report_to": "none"})
    with fresh_accelerate_state():
        args = parse_run_arguments(argv)
        job = assemble(args, make_accelerator(args))
    method = job["method"]
    _, unlabeled = next(job["train_stream"].iterate(0))
    mean, std = (torch.as_tensor(t, dtype=torch.float32) for t in job["target_stats"])
    unlabeled = standardize_targets(unlabeled, mean, std)
    student, teacher = unlabeled["student"], unlabeled["teacher"]
    assert not torch.equal(student["translation"], teacher["translation"])
    moved = transfer_to_view(teacher["monitor_labels"], teacher["translation"], student["translation"], method.target_std)
    torch.testing.assert_close(moved, student["monitor_labels"], rtol=1e-5, atol=1e-5)


def test_monitor_labels_never_reach_the_loss():
    torch.manual_seed(0)
    method = MeanTeacher(TinyNet(in_dim=3), MeanTeacherArguments())
    x_l, u1, u2 = torch.randn(4, 3), torch.randn(4, 3), torch.randn(4, 3)
    y = torch.tensor([0, 1, 2, 0])
    state = TrainState(step=50, max_steps=100)
    a = copy.deepcopy(method)(*batches(x_l, y, u1, u2, torch.tensor([0, 1, 2, 0])), state)
    b = copy.deepcopy(method)(*batches(x_l, y, u1, u2, torch.tensor([2, 2, -1, 1])), state)
    assert torch.equal(a[0], b[0])
    assert not torch.equal(a[1]["pseudo_label_accuracy"], b[1]["pseudo_label_accuracy"])


def test_interleaved_forward_equals_one_forward_without_batchnorm():
    torch.manual_seed(0)
    model = Identity(3)
    views = [{"pixel_values": torch.randn(5, 3)}, {"pixel_values": torch.randn(5, 3)}]
    a = interleaved_logits(model, views, True)
    b = interleaved_logits(model, views, False)
    assert model.batch_sizes == [5, 5, 10]
    for x, y, v in zip(a, b, views):
        torch.testing.assert_close(x, v["pixel_values"])
        torch.testing.assert_close(y, v["pixel_values"])
    uneven = interleaved_logits(model, [views[0], {"pixel_values": torch.randn(7, 3)}], True)
    assert [u.shape[0] for u in uneven] == [5, 7] and model.batch_sizes[-1] == 12  # one concatenated forward


def test_multimodal_regression_head_trains_with_mean_teacher():
    """Beyond the paper: the image+tabular model with a regression head (problem_type regression,
    num_targets outputs) under Mean Teacher; the consistency term reaches the student."""
    from data_utils.io import DatasetMetadata
    from modeling_stil.presets import create_model
    from tests._helpers import TOY_SCHEMA

    torch.manual_seed(0)
    model = create_model("multimodal-concat-tiny", schema=TOY_SCHEMA, metadata=DatasetMetadata(task="regression", num_targets=2),
                         image_size=16)
    assert model.config.problem_type == "regression" and model.config.num_labels == 2
    size = model.config.image_size

    def inputs(n):
        return {"pixel_values": torch.randn(n, 3, size, size), "categorical_values": torch.randint(0, 3, (n, 2)),
                "continuous_values": torch.randn(n, 3)}

    method = MeanTeacher(model, MeanTeacherArguments(lambda_u=1.0))
    assert method.labeled_views == {"weak": "weak"}  # multimodal regression keeps the weak (image + table) view
    with torch.no_grad():
        for p in method.teacher.module.parameters():
            p.add_(0.1 * torch.randn_like(p))
    labeled = {"labels": torch.randn(2, 2), "index": torch.arange(2), "weak": inputs(2)}
    unlabeled = {"monitor_labels": torch.randn(2, 2), "index": torch.arange(2), "student": inputs(2), "teacher": inputs(2)}
    state = TrainState(step=100, max_steps=100, task="regression", num_labels=2)
    method.train()
    with torch.no_grad():
        loss, logs = method(labeled, unlabeled, state)  # the whole step runs on the real model
    assert torch.isfinite(loss) and logs["unsup_loss"].item() > 0 and math.isfinite(logs["pseudo_label_mse"].item())
    # the consistency term alone gives the student's weights gradient, the teacher none
    q = method.teacher_targets(unlabeled, "regression")
    _, logits_u = method.student_logits(labeled["weak"], unlabeled["student"])
    unsup = consistency_loss(logits_u, q, "regression")
    grads = torch.autograd.grad(unsup, [p for p in model.parameters()], allow_unused=True)
    assert any(g is not None and torch.count_nonzero(g) > 0 for g in grads)
    assert not q.requires_grad and all(not p.requires_grad for p in method.teacher.parameters())


def test_registration_and_argument_checks():
    assert get_method_class("mean_teacher") is MeanTeacher
    for bad in ({"rampup": "cosine"}, {"ema_decay": 1.0}, {"lambda_u": -1.0}, {"evaluate": "x"}, {"rampup_fraction": 2.0}):
        with pytest.raises(ValueError):
            MeanTeacherArguments(**bad)
    with pytest.raises(ValueError, match="unlabelled"):
        MeanTeacher(Identity())(batches(torch.zeros(1, 3), torch.zeros(1).long(), torch.zeros(1, 3), torch.zeros(1, 3), torch.zeros(1))[0], None, TrainState())
