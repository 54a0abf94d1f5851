"""Golden test: our `co_training` step against one step of the ORIGINAL siyi-wind/STiL ``CoTraining``.

Fixture ``tests/golden/co_training`` (scripts/golden/gen_stil.py, ``generate_co_training``). Weights
regenerated from the recorded seeds into our ``mmatch``-family network (same tensor names as the
original's ``MultimodalBackbone``), float64. One documented divergence is bridged here: the original
updates its EMAN teacher inside the step (after the student forward, before the teacher forward), ours
after the optimizer step (docs/methods.md "co_training": same parameters, BN statistics one forward
later); the test applies our ``EMATeacher.update`` at the original's moment, then runs our step. Every
term, teacher target, mask, gradient and post-step state entry must equal the original's to rtol 1e-9.
"""

from __future__ import annotations

import copy
import types

import pytest
import torch

import modeling_stil.methods.co_training as co_module
from modeling_stil.methods.base import TrainState
from modeling_stil.methods.co_training import CoTraining, CoTrainingArguments
from modeling_stil.training.optim import build_optimizer
from tests._golden import assert_matches_original, assert_terms_match_original, build_network, load_golden, with_prefix
from tests._golden_seeded import compare_recorded, float_shapes, perturbed, seeded_images, seeded_state


def _check(ours, theirs, name):
    assert_matches_original(ours, theirs, name, rtol=1e-9, atol=1e-12)


@pytest.fixture(scope="module")
def golden_step():
    fixture, meta = load_golden("co_training")
    o = meta["overrides"]
    n_l, n_u = meta["batch"]["labelled"], meta["batch"]["unlabelled"]
    model = build_network(meta)
    own = model.state_dict()
    student = seeded_state(float_shapes(own), meta["seeds"]["student"], meta["scale"])
    teacher = perturbed(student, meta["seeds"]["teacher"])
    biases = with_prefix(fixture, "init.override.")
    student.update(with_prefix(biases, "model."))
    teacher.update(with_prefix(biases, "ema."))
    missing = set(float_shapes(own)) ^ set(student)
    assert not missing, f"our network's tensors differ from the original MultimodalBackbone's: {sorted(missing)[:10]}"
    model.load_state_dict({**own, **student})
    method = CoTraining(model, CoTrainingArguments(co_threshold=o["co_threshold"], ema_momentum=o["ema_momentum"])).train()
    method.ema.module.load_state_dict({**own, **teacher})

    images = seeded_images(n_l + n_u, o["img_size"], meta["seeds"]["inputs"])
    n_cat = sum(k > 1 for k in meta["field_lengths"])

    def view(image, table):
        return {"pixel_values": image, "categorical_values": table[:, :n_cat].long(), "continuous_values": table[:, n_cat:]}

    labeled = {"labels": fixture["input.y_l"], "stil": view(images[:n_l], fixture["input.table_l"])}
    unlabeled = {"stil": view(images[n_l:], fixture["input.table_u"])}
    # the original's teacher update: student weights of this step, BN statistics after its forward
    probe = copy.deepcopy(model).train()
    with torch.no_grad():
        probe(**{k: torch.cat([labeled["stil"][k], unlabeled["stil"][k]]) for k in labeled["stil"]})
    method.ema.update(probe, o["ema_momentum"])

    seen = []
    mask = co_module.confidence_mask

    def recording_mask(q, threshold):
        seen.append((q, mask(q, threshold)))
        return seen[-1][1]

    terms_seen = {}
    compute_terms = method.compute_terms

    def capture(*a, **k):
        terms, logs = compute_terms(*a, **k)
        terms_seen.update(terms)
        return terms, logs

    method.compute_terms = capture
    optimizer = build_optimizer(method, types.SimpleNamespace(
        optimizer="adam", learning_rate=o["lr_eval"], weight_decay=o["weight_decay_eval"], weight_decay_scope="all",
        adam_beta1=0.9, adam_beta2=0.999), "cpu")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(co_module, "confidence_mask", recording_mask)
        loss, _ = method.training_step(labeled, unlabeled, TrainState(epoch=meta["epoch"], num_labels=o["num_classes"]))
    loss.backward()
    grads = {n: p.grad for n, p in method.named_parameters() if p.grad is not None}
    optimizer.step()
    post = {("ema." + k[len("ema.module."):]) if k.startswith("ema.module.") else k: v
            for k, v in method.state_dict().items() if v.is_floating_point()}
    return fixture, terms_seen, loss, seen, grads, post


def test_every_loss_term_matches_original(golden_step):
    fixture, terms, loss, *_ = golden_step
    assert_terms_match_original(fixture, terms, loss, count=6)


def test_teacher_targets_and_masks_match_original(golden_step):
    fixture, _, _, seen, *_ = golden_step
    (q_i, mask_i), (q_t, mask_t) = seen
    for name, ours in (("q_image", q_i), ("q_tabular", q_t), ("mask_image", mask_i), ("mask_tabular", mask_t)):
        _check(ours.double(), fixture[f"step.{name}"], f"step {name}")
    n_u = fixture["step.mask_image"].numel()
    assert 0 < int(fixture["step.mask_image"].sum()) < n_u and 0 < int(fixture["step.mask_tabular"].sum()) < n_u


def test_every_gradient_matches_original(golden_step):
    fixture, _, _, _, grads, _ = golden_step
    assert compare_recorded(fixture, "grad.", grads, _check, "gradients") > 50


def test_state_after_adam_step_matches_original(golden_step):
    fixture, *_, post = golden_step
    assert compare_recorded(fixture, "post.", post, _check, "state after the step") > 100
