"""Co-training (STiL repository): each unimodal head learns from the OTHER modality's confident
teacher prediction (soft targets), nothing else; the EMAN teacher rule; the gate; exact resume,
export and reload through train.py; a short run where the cross-modal terms train."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from modeling_stil.methods.base import TrainState, get_method_class
from modeling_stil.methods.co_training import CoTraining, CoTrainingArguments
from tests.helpers.multimodal_match import hand_inputs, mm_batches, resume_export_reload
from tests.helpers.nets import ThreeHeadNet, TinyNet


def test_cross_modal_soft_targets_masks_and_routing_by_hand():
    method = CoTraining(ThreeHeadNet(), CoTrainingArguments(use_ema=False, co_threshold=0.8))
    labeled, unlabeled = hand_inputs()
    img_l, tab_l = labeled["stil"]["pixel_values"], labeled["stil"]["continuous_values"]
    img_u, tab_u = unlabeled["stil"]["pixel_values"], unlabeled["stil"]["continuous_values"]
    terms, logs = method.compute_terms(labeled, unlabeled, TrainState())
    q_i, q_t = img_u.detach().softmax(1), tab_u.detach().softmax(1)
    mask_i = (q_i.max(1).values >= 0.8).float()
    mask_t = (q_t.max(1).values >= 0.8).float()
    assert mask_i.tolist() == [1.0, 0.0, 0.0] and mask_t.tolist() == [0.0, 0.0, 1.0]
    soft_ce = lambda z, q: -(q * z.log_softmax(1)).sum(1)  # noqa: E731
    torch.testing.assert_close(terms["unsup_loss_image"].detach(), (soft_ce(img_u.detach(), q_t) * mask_t).mean())
    torch.testing.assert_close(terms["unsup_loss_tabular"].detach(), (soft_ce(tab_u.detach(), q_i) * mask_i).mean())
    y = labeled["labels"]
    torch.testing.assert_close(terms["sup_loss_tabular"].detach(), F.cross_entropy(tab_l.detach(), y))
    torch.testing.assert_close(logs["mask_ratio_image_teacher"], torch.tensor(1 / 3))

    model = method.model
    for name, grads in (
        ("sup_loss_multimodal", {"img_l", "tab_l", "classifier_multimodal"}),
        ("sup_loss_tabular", {"tab_l", "classifier_tabular"}),
        # the image head learns on the rows where the TABULAR teacher is confident (row 2), and back
        ("unsup_loss_image", {"img_u2", "classifier_imaging"}),
        ("unsup_loss_tabular", {"tab_u0", "classifier_tabular"}),
    ):
        for tensor in (img_l, tab_l, img_u, tab_u, *model.parameters()):
            tensor.grad = None
        terms, _ = method.compute_terms(labeled, unlabeled, TrainState())
        terms[name].backward()
        got = {key for key, t in (("img_l", img_l), ("tab_l", tab_l)) if t.grad is not None and torch.count_nonzero(t.grad)}
        for key, tensor in (("img_u", img_u), ("tab_u", tab_u)):
            if tensor.grad is not None:
                got |= {f"{key}{i}" for i in range(3) if torch.count_nonzero(tensor.grad[i])}
        got |= {h for h in ("classifier_multimodal", "classifier_imaging", "classifier_tabular")
                if getattr(model, h).weight.grad is not None and torch.count_nonzero(getattr(model, h).weight.grad)}
        assert got == grads, f"{name}: gradient reached {sorted(got)}, expected {sorted(grads)}"


def test_teacher_makes_the_targets_gate_and_eman_rule():
    model = ThreeHeadNet()
    method = CoTraining(model, CoTrainingArguments(co_threshold=0.0, start_epoch=0, ema_momentum=0.5))
    assert all(not p.requires_grad for p in method.ema.parameters())
    with torch.no_grad():  # the student drifts away from the teacher: targets stay the teacher's
        model.classifier_tabular.weight.mul_(-1.0)
    labeled, unlabeled = hand_inputs()
    img_u, tab_u = unlabeled["stil"]["pixel_values"], unlabeled["stil"]["continuous_values"]
    terms, _ = method.compute_terms(labeled, unlabeled, TrainState())
    q_t = tab_u.detach().softmax(1)  # teacher = identity heads
    expected = -(q_t * (img_u.detach()).log_softmax(1)).sum(1).mean()
    torch.testing.assert_close(terms["unsup_loss_image"].detach(), expected)
    loss, logs = method.training_step(labeled, unlabeled, TrainState(epoch=0))
    torch.testing.assert_close(loss.detach(), 0.2 * logs["sup_loss"])
    loss, logs = method.training_step(labeled, unlabeled, TrainState(epoch=1))
    torch.testing.assert_close(loss.detach(), 0.2 * logs["sup_loss"] + 0.2 * logs["unsup_loss"])
    before = copy.deepcopy(method.ema.module.state_dict())
    method.after_optimizer_step(TrainState(step=1))
    for key, value in method.ema.module.state_dict().items():
        torch.testing.assert_close(value, 0.5 * before[key] + 0.5 * model.state_dict()[key], msg=key)
    assert method.eval_model() is model


def test_registration_defaults_and_a_model_without_unimodal_heads_is_refused():
    assert get_method_class("co_training") is CoTraining
    a = CoTrainingArguments()
    assert (a.alpha, a.rate_uce, a.co_threshold, a.use_ema, a.eman, a.ema_momentum, a.start_epoch) == (0.2, 0.2, 0.9, True, True, 0.996, 10)
    with pytest.raises(ValueError, match="co_training needs a multimodal model"):
        CoTraining(TinyNet())


def test_short_run_lowers_the_loss_with_the_cross_modal_terms_on():
    torch.manual_seed(0)
    centres = 3.0 * torch.eye(3)
    y_u = torch.arange(3).repeat(40)
    img_u, tab_u = centres[y_u] + torch.randn(120, 3), centres[y_u] + torch.randn(120, 3)
    y_l = torch.arange(3).repeat(2)
    img_l, tab_l = centres[y_l] + torch.randn(6, 3), centres[y_l] + torch.randn(6, 3)
    model = ThreeHeadNet()
    method = CoTraining(model, CoTrainingArguments(start_epoch=-1, co_threshold=0.6, rate_uce=1.0, alpha=1.0, ema_momentum=0.9))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    losses, unsup = [], []
    for step in range(30):
        idx = torch.randint(0, 120, (30,))
        labeled, unlabeled = mm_batches(img_l, tab_l, y_l, img_u[idx], tab_u[idx])
        loss, logs = method.training_step(labeled, unlabeled, TrainState(step=step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        method.after_optimizer_step(TrainState(step=step))
        losses.append(loss.item())
        unsup.append(logs["unsup_loss"].item())
    assert min(unsup[:3]) > 0, "the cross-modal terms never trained anything"
    assert sum(losses[-5:]) < sum(losses[:5])


def test_train_py_resumes_the_teacher_exactly_and_exports(tmp_path, synthetic_cache):
    history = resume_export_reload("co_training", tmp_path, synthetic_cache, ("ema.module.classifier_imaging.weight",), "--co_threshold", "0.0")
    train = [r for r in history if "unsup_loss" in r]
    assert train and any(r["unsup_loss"] > 0 for r in train)
