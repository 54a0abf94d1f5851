"""MMatch (STiL repository version): drop-overflow queue writes, DA + memory-smoothed pseudo-labels
against hand-computed values, gradient routing (fused head teaches the unimodal heads only), the
gate, exact resume of the queues through train.py, and a short run where the unlabelled terms train."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from modeling_stil.methods.base import TrainState, get_method_class
from modeling_stil.methods.co_training import CoTraining
from modeling_stil.methods.mmatch import MMatch, MMatchArguments, write_columns
from tests.helpers.multimodal_match import hand_inputs, mm_batches, multimodal_argv, resume_export_reload
from tests.helpers.nets import ThreeHeadNet, TinyNet


def test_queue_writes_drop_the_overflow_and_restart_at_zero():
    buffer = torch.zeros(2, 5)
    probs = torch.zeros(1, 5)
    ptr = torch.tensor([3])
    items = torch.arange(8.0).reshape(4, 2)
    write_columns([buffer, probs], [items, items[:, :1] * 10], ptr)
    # columns 3, 4 take items 0, 1; items 2, 3 are dropped; the pointer restarts at 0
    assert buffer.T.tolist() == [[0, 0], [0, 0], [0, 0], [0, 1], [2, 3]]
    assert probs.tolist() == [[0, 0, 0, 0, 20]] and ptr.item() == 0
    write_columns([buffer, probs], [items[:2] + 100, items[:2, :1]], ptr)
    assert buffer.T.tolist()[:3] == [[100, 101], [102, 103], [0, 0]] and ptr.item() == 2
    big = torch.arange(14.0).reshape(7, 2)
    ptr.fill_(0)
    write_columns([buffer, probs], [big, big[:, :1]], ptr)  # more items than columns: the first K
    assert buffer.T.tolist() == big[:5].tolist() and ptr.item() == 0


def test_pseudo_labels_distribution_alignment_and_memory_smoothing_by_hand():
    method = MMatch(ThreeHeadNet(), MMatchArguments(temperature=0.5, queue_size=4))
    with torch.no_grad():
        method.embed_queue.copy_(F.normalize(torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]]), dim=0))
        method.probs_queue.copy_(torch.tensor([[1.0, 0.0, 0.5, 0.0], [0.0, 1.0, 0.5, 0.0], [0.0, 0.0, 0.0, 1.0]]))
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    features = F.normalize(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]]), dim=1)
    # epoch 0: DA only. The DA queue holds one batch mean and 255 zeros: p / mean(queue), renormalised
    p0 = method.pseudo_labels(logits, features, TrainState(epoch=0))
    probs = logits.softmax(1)
    expected = probs / probs.mean(0)
    expected = expected / expected.sum(1, keepdim=True)
    torch.testing.assert_close(p0, expected)
    # epoch 1: the second batch mean enters the DA queue, then 0.9 p + 0.1 softmax(e E / T) P^T
    p1 = method.pseudo_labels(logits, features, TrainState(epoch=1))
    aligned = probs / probs.mean(0)  # both queue rows are this batch's mean
    aligned = aligned / aligned.sum(1, keepdim=True)
    affinity = (features @ method.embed_queue / 0.5).softmax(1)
    torch.testing.assert_close(p1, 0.9 * aligned + 0.1 * affinity @ method.probs_queue.T)


def test_terms_routing_gate_and_enqueue():
    method = MMatch(ThreeHeadNet(), MMatchArguments(distribution_alignment=False, start_epoch=1, queue_size=8))
    labeled, unlabeled = hand_inputs()
    img_l, tab_l = labeled["stil"]["pixel_values"], labeled["stil"]["continuous_values"]
    img_u, tab_u = unlabeled["stil"]["pixel_values"], unlabeled["stil"]["continuous_values"]
    terms, logs = method.compute_terms(labeled, unlabeled, TrainState(epoch=0))
    fused_u = (img_u + tab_u).detach()
    p = fused_u.softmax(1)
    mask = (p.max(1).values >= 0.6).float()
    assert mask.tolist() == [1.0, 0.0, 1.0]
    pseudo = torch.tensor([1, 0, 2])
    torch.testing.assert_close(terms["unsup_loss_image"].detach(), (F.cross_entropy(img_u.detach(), pseudo, reduction="none") * mask).mean())
    torch.testing.assert_close(terms["unsup_loss_tabular"].detach(), (F.cross_entropy(tab_u.detach(), pseudo, reduction="none") * mask).mean())
    y = labeled["labels"]
    torch.testing.assert_close(terms["sup_loss_multimodal"].detach(), F.cross_entropy((img_l + tab_l).detach(), y))
    assert logs["pseudo_label_accuracy"].item() == pytest.approx(2 / 3) and logs["pseudo_label_accuracy_masked"].item() == 1.0
    # queue: all 5 rows of the step, normalised fused features and [one_hot(y); p]
    fused = torch.cat([img_l + tab_l, img_u + tab_u]).detach()
    torch.testing.assert_close(method.embed_queue[:, :5].T, F.normalize(fused, dim=1))
    torch.testing.assert_close(method.probs_queue[:, :5].T, torch.cat([F.one_hot(y, 3).float(), p]))
    assert method.embed_queue_ptr.item() == 5

    model = method.model
    for name, grads in (
        ("sup_loss_multimodal", {"img_l", "tab_l", "classifier_multimodal"}),
        ("sup_loss_image", {"img_l", "classifier_imaging"}),
        ("unsup_loss_image", {"img_u0", "img_u2", "classifier_imaging"}),
        ("unsup_loss_tabular", {"tab_u0", "tab_u2", "classifier_tabular"}),
    ):
        for tensor in (img_l, tab_l, img_u, tab_u, *model.parameters()):
            tensor.grad = None
        terms, _ = method.compute_terms(labeled, unlabeled, TrainState(epoch=0))
        terms[name].backward()
        got = set()
        for key, tensor in (("img_l", img_l), ("tab_l", tab_l)):
            if tensor.grad is not None and torch.count_nonzero(tensor.grad):
                got.add(key)
        for key, tensor in (("img_u", img_u), ("tab_u", tab_u)):
            if tensor.grad is not None:
                got |= {f"{key}{i}" for i in range(3) if torch.count_nonzero(tensor.grad[i])}
        for head in ("classifier_multimodal", "classifier_imaging", "classifier_tabular"):
            weight = getattr(model, head).weight
            if weight.grad is not None and torch.count_nonzero(weight.grad):
                got.add(head)
        assert got == grads, f"{name}: gradient reached {sorted(got)}, expected {sorted(grads)}"

    loss, logs = method.training_step(labeled, unlabeled, TrainState(epoch=1))
    torch.testing.assert_close(loss.detach(), logs["sup_loss"])  # alpha 1, gate closed at epoch <= start_epoch
    loss, logs = method.training_step(labeled, unlabeled, TrainState(epoch=2))
    torch.testing.assert_close(loss.detach(), logs["sup_loss"] + 5.0 * logs["unsup_loss"])


def test_short_run_lowers_the_loss_with_the_unlabelled_terms_on():
    """Blobs seen through two noisy modalities; the fused head's confident pseudo-labels train the
    unimodal heads: the unlabelled loss is non-zero from the start and falls with the total."""
    torch.manual_seed(0)
    centres = 2.0 * torch.eye(3)
    y_u = torch.arange(3).repeat(40)
    img_u, tab_u = centres[y_u] + torch.randn(120, 3), centres[y_u] + torch.randn(120, 3)
    y_l = torch.arange(3).repeat(2)
    img_l, tab_l = centres[y_l] + torch.randn(6, 3), centres[y_l] + torch.randn(6, 3)
    model = ThreeHeadNet()
    method = MMatch(model, MMatchArguments(start_epoch=-1, queue_size=64))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    losses, unsup = [], []
    for step in range(30):
        idx = torch.randint(0, 120, (30,))
        labeled, unlabeled = mm_batches(img_l, tab_l, y_l, img_u[idx], tab_u[idx])
        loss, logs = method.training_step(labeled, unlabeled, TrainState(step=step, epoch=step // 10))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        unsup.append(logs["unsup_loss"].item())
    assert min(unsup[:3]) > 0, "the unlabelled terms never trained anything"
    assert sum(losses[-5:]) < sum(losses[:5])
    assert sum(unsup[-5:]) < sum(unsup[:5])


def test_registration_defaults_and_a_model_without_unimodal_heads_is_refused():
    assert get_method_class("mmatch") is MMatch
    a = MMatchArguments()
    assert (a.alpha, a.mmatch_lambda, a.th1, a.temperature, a.queue_size, a.smoothing, a.distribution_alignment, a.start_epoch) == (
        1.0, 5.0, 0.6, 0.1, 640, 0.9, True, 10)
    with pytest.raises(ValueError, match="--model mmatch"):
        MMatch(TinyNet())



@pytest.mark.parametrize("method_class", [MMatch, CoTraining])
def test_view_option_chooses_the_one_shared_view(method_class):
    """MMatch and co-training share STiL's one-view design and its option: the original's "stil" view by
    default, another view for both streams when named, an unknown name refused."""
    arguments_class = method_class.arguments_class
    assert method_class(ThreeHeadNet()).labeled_views == {"stil": "stil"}
    method = method_class(ThreeHeadNet(), arguments_class(view="weak"))
    assert method.labeled_views == {"stil": "weak"} and method.unlabeled_views == {"stil": "weak"}
    assert method_class.labeled_views == {"stil": "stil"}
    with pytest.raises(ValueError, match="view must be one of"):
        arguments_class(view="crop")


# ------------------------------------------------------------------------------------------ through train.py
def test_train_py_resumes_the_queues_exactly_and_exports(tmp_path, synthetic_cache):
    history = resume_export_reload("mmatch", tmp_path, synthetic_cache, ("embed_queue", "probs_queue", "DA.queue.buffer"), "--th1", "0.0")
    train = [r for r in history if "unsup_loss" in r]
    assert train and any(r["unsup_loss"] > 0 for r in train)


def test_train_py_refuses_a_model_without_unimodal_heads_in_one_line(tmp_path, synthetic_cache, capsys):
    from tests._helpers import run_train

    assert run_train(multimodal_argv("mmatch", tmp_path / "run", synthetic_cache, "--model", "multimodal-concat-tiny")) != 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert "mmatch needs a multimodal model with fused, image and tabular heads" in lines[-1]
    assert "--model mmatch" in lines[-1]
