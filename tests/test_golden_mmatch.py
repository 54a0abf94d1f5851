"""Golden test: our `mmatch` step against one step of the ORIGINAL siyi-wind/STiL ``MMatch``.

Fixture ``tests/golden/mmatch`` (scripts/golden/gen_stil.py, ``generate_mmatch``): DA on, memory
smoothing and both unimodal terms active, the embedding / label queues, the DA queue and their
pointers seeded (the enqueue is truncated at the end of the 640-column queue). Weights regenerated
from the recorded seeds into our ``mmatch``-family network, float64. Every term, the pseudo-labels and
mask, every gradient and the state after the Adam step (network, queues, pointers, DA queue) must
equal the original's to rtol 1e-9.
"""

from __future__ import annotations

import types

import pytest
import torch

from modeling_stil.methods.base import TrainState
from modeling_stil.methods.mmatch import MMatch, MMatchArguments
from modeling_stil.training.optim import build_optimizer
from tests._golden import assert_matches_original, assert_terms_match_original, build_network, load_golden, with_prefix
from tests._golden_seeded import compare_recorded, float_shapes, seeded_images, seeded_state


def _check(ours, theirs, name):
    assert_matches_original(ours, theirs, name, rtol=1e-9, atol=1e-12)


# original buffer -> ours
STATE_NAMES = {"embed_queue": "embed_queue", "probs_queue": "probs_queue", "embed_queue_ptr": "embed_queue_ptr",
               "DA_queue": "DA.queue.buffer", "DA_ptr": "DA.queue.ptr"}


@pytest.fixture(scope="module")
def golden_step():
    fixture, meta = load_golden("mmatch")
    o = meta["overrides"]
    n_l, n_u = meta["batch"]["labelled"], meta["batch"]["unlabelled"]
    model = build_network(meta)
    own = model.state_dict()
    student = seeded_state(float_shapes(own), meta["seeds"]["student"], meta["scale"])
    student.update(with_prefix(with_prefix(fixture, "init.override."), "model."))
    model.load_state_dict({**own, **student})
    method = MMatch(model, MMatchArguments(th1=o["th1"])).double().train()
    initial = with_prefix(fixture, "init.state.")
    with torch.no_grad():
        for theirs, ours in STATE_NAMES.items():
            method.get_buffer(ours).copy_(initial[theirs].reshape(method.get_buffer(ours).shape))
        method.DA.queue.count.fill_(method.DA.queue.size)  # the original's DA queue is a plain full buffer
    images = seeded_images(n_l + n_u, o["img_size"], meta["seeds"]["inputs"])
    n_cat = sum(k > 1 for k in meta["field_lengths"])

    def view(image, table):
        return {"pixel_values": image, "categorical_values": table[:, :n_cat].long(), "continuous_values": table[:, n_cat:]}

    labeled = {"labels": fixture["input.y_l"], "stil": view(images[:n_l], fixture["input.table_l"])}
    unlabeled = {"stil": view(images[n_l:], fixture["input.table_u"])}
    seen = {}
    pseudo_labels, compute_terms = method.pseudo_labels, method.compute_terms

    def capture_pseudo(*a, **k):
        seen["p"] = pseudo_labels(*a, **k)
        return seen["p"]

    def capture_terms(*a, **k):
        seen["terms"], logs = compute_terms(*a, **k)
        return seen["terms"], logs

    method.pseudo_labels, method.compute_terms = capture_pseudo, capture_terms
    optimizer = build_optimizer(method, types.SimpleNamespace(
        optimizer="adam", learning_rate=o["lr_eval"], weight_decay=o["weight_decay_eval"], weight_decay_scope="all",
        adam_beta1=0.9, adam_beta2=0.999), "cpu")
    loss, _ = method.training_step(labeled, unlabeled, TrainState(epoch=meta["epoch"], num_labels=o["num_classes"]))
    loss.backward()
    grads = {n: p.grad for n, p in method.named_parameters() if p.grad is not None}
    optimizer.step()
    state = method.state_dict()
    post = {k: v for k, v in state.items() if k.startswith("model.") and v.is_floating_point()}
    post.update({theirs: state[ours].reshape(fixture[f"post.{theirs}"].shape) if f"post.{theirs}" in fixture else state[ours]
                 for theirs, ours in STATE_NAMES.items()})
    return fixture, seen, loss, grads, post


def test_every_loss_term_matches_original(golden_step):
    fixture, seen, loss, *_ = golden_step
    assert_terms_match_original(fixture, seen["terms"], loss, count=6)


def test_pseudo_labels_and_mask_match_original(golden_step):
    fixture, seen, *_ = golden_step
    _check(seen["p"], fixture["step.pseudo_label"], "step pseudo_label")
    ours_mask = (seen["p"].max(dim=1).values >= load_golden("mmatch")[1]["overrides"]["th1"]).double()
    _check(ours_mask, fixture["step.mask"], "step mask")
    assert 0 < int(fixture["step.mask"].sum()) < fixture["step.mask"].numel()


def test_every_gradient_matches_original(golden_step):
    fixture, _, _, grads, _ = golden_step
    assert compare_recorded(fixture, "grad.", grads, _check, "gradients") > 50


def test_state_after_the_step_matches_original(golden_step):
    """Network after Adam, the queues after the (truncated) enqueue, the pointers, the DA queue."""
    fixture, *_, post = golden_step
    for name in ("embed_queue_ptr", "DA_ptr"):
        assert int(post[name]) == int(fixture[f"post.{name}"]), name
    floats = {k: v for k, v in post.items() if k not in ("embed_queue_ptr", "DA_ptr")}
    fixture_floats = {k: v for k, v in fixture.items() if not k.endswith(("embed_queue_ptr", "DA_ptr"))}
    assert compare_recorded(fixture_floats, "post.", floats, _check, "state after the step") > 100
