"""Golden tests: our multimodal Match methods against one step of the ORIGINAL siyi-wind/STiL ports
(models/MatchModel/), recorded by scripts/golden/gen_stil_match.py in tests/golden/stil_multimodal_*.

Weights are regenerated from the recorded seeds into our ``multimodal-concat`` network (the original
``MultimodalBackbone``'s tensors; the projection head is ``head.model.N`` here, ``head.N`` there),
float64 (our losses keep float64 with ``common.at_least_float32``; they had cast it to float32 with
``.float()``, which these tests caught).

``multimodal_freematch``: the original updates its EMAN teacher inside the forward (after the student
forward, before the teacher forward), ours after the optimizer step (docs/methods.md "freematch": the
same parameters, BN statistics one forward later); the test applies our ``EMATeacher.update`` at the
original's moment, then runs our step. Every term, the pseudo-labels and SAT mask, every gradient,
the state after the Adam step and the SAT state (time_p, p_model, label_hist) must equal the
original's to rtol 1e-9.

``multimodal_simmatch``: the same teacher-update bridge; the original's bank is (P, K) and ours (K, P)
(compared transposed), its DA queue a plain full buffer (ours: the same buffer marked full). Every
term (L_x, L_u, L_in, total), p_hat and the mask, every gradient (projection head included), the
network and teacher after the step, the bank after the write, its labels, the DA queue and pointer
must equal the original's to rtol 1e-9.

``multimodal_comatch``: the original moves its momentum encoder's parameters (not its BN buffers)
inside the forward, before the teacher forward; the test applies that parameter update to our
teacher first (our ``after_optimizer_step`` is not run). Queues are (P | C, K) there, (K, P | C) here
(compared transposed); the original's DA history is a list of batch means (ours: the same rows in
the DA queue). Every term (L_x, L_u, L_c, total), the smoothed pseudo-labels, the mask and the
pseudo-label graph Q, every gradient, the network and momentum encoder (its BN statistics moved by
its train-mode forward) after the step, the four queues after a truncated and a plain write, and both
pointers must equal the original's to rtol 1e-9.
"""

from __future__ import annotations

import copy
import types

import pytest
import torch

import modeling_stil.methods.freematch as freematch_module
from modeling_stil.methods.base import DataInfo, TrainState
from modeling_stil.methods.comatch import MultimodalCoMatch, MultimodalCoMatchArguments
from modeling_stil.methods.common import ProjectedNet
from modeling_stil.methods.freematch import MultimodalFreeMatch, MultimodalFreeMatchArguments
from modeling_stil.methods.simmatch import MultimodalSimMatch, MultimodalSimMatchArguments
from modeling_stil.training.optim import build_optimizer
from tests._golden import assert_matches_original, assert_terms_match_original, build_concat_network, load_golden, with_prefix
from tests._golden_seeded import compare_recorded, float_shapes, perturbed, seeded_images, seeded_state


def _check(ours, theirs, name):
    assert_matches_original(ours, theirs, name, rtol=1e-9, atol=1e-12)


def original_names(state: dict) -> dict:
    """Our tensor names -> the original MultimodalBackbone's (``head.model.N`` -> ``head.N``)."""
    return {k.replace("head.model.", "head."): v for k, v in state.items()}


def match_network(meta):
    """Our Match-family concat network (``multimodal-concat``) in the fixture's tiny configuration, float64."""
    o = meta["overrides"]
    return build_concat_network(meta, unimodal_heads=False, projection_dim=o["projection_dim"],
                                projection_hidden_dim=o["multimodal_embedding_dim"])


def seeded_networks(fixture, meta, student_prefix="main.", teacher_prefix="ema."):
    """(our network with the student weights, the teacher's weights in our names)."""
    model = match_network(meta)
    own = model.state_dict()
    to_ours = {original: ours for ours, original in zip(own, original_names(own))}
    shapes = original_names(float_shapes(own))
    student = seeded_state(shapes, meta["seeds"]["student"], meta["scale"])
    teacher = perturbed(student, meta["seeds"]["teacher"])
    biases = with_prefix(fixture, "init.override.")
    student.update(with_prefix(biases, student_prefix))
    teacher.update(with_prefix(biases, teacher_prefix))
    model.load_state_dict({**own, **{to_ours[k]: v for k, v in student.items()}})
    return model, {**own, **{to_ours[k]: v for k, v in teacher.items()}}


def batch_views(fixture, meta):
    o = meta["overrides"]
    n_l, n_u = meta["batch"]["labelled"], meta["batch"]["unlabelled"]
    images = seeded_images(n_l + n_u, o["img_size"], meta["seeds"]["inputs"])
    image_s = seeded_images(n_u, o["img_size"], meta["seeds"]["strong"])
    n_cat = sum(k > 1 for k in meta["field_lengths"])

    def view(image, table):
        return {"pixel_values": image, "categorical_values": table[:, :n_cat].long(), "continuous_values": table[:, n_cat:]}

    labeled = {"labels": fixture["input.y_l"], "labeled": view(images[:n_l], fixture["input.table_l"])}
    unlabeled = {"weak": view(images[n_l:], fixture["input.table_u"]), "strong": view(image_s, fixture["input.table_s"])}
    return labeled, unlabeled


def adam(method, o):
    return build_optimizer(method, types.SimpleNamespace(
        optimizer="adam", learning_rate=o["lr_eval"], weight_decay=o["weight_decay_eval"], weight_decay_scope="all",
        adam_beta1=0.9, adam_beta2=0.999), "cpu")


def post_state(method, student="main.", teacher="ema.") -> dict:
    """Our state after the step in the original's names (``main.*``, ``ema.*`` or CoMatch's)."""
    out = {}
    for k, v in method.state_dict().items():
        if not v.is_floating_point():
            continue
        if k.startswith("model."):
            out[student + k[len("model."):]] = v
        elif k.startswith("ema.module.model."):  # SimMatch / CoMatch: the teacher is a ProjectedNet
            out[teacher + k[len("ema.module.model."):]] = v
        elif k.startswith("ema.module."):
            out[teacher + k[len("ema.module."):]] = v
    return original_names(out)


# ------------------------------------------------------------------------------------------ FreeMatch
@pytest.fixture(scope="module")
def freematch_step():
    fixture, meta = load_golden("stil_multimodal_freematch")
    o = meta["overrides"]
    model, teacher = seeded_networks(fixture, meta)
    method = MultimodalFreeMatch(model, MultimodalFreeMatchArguments(
        lambda_u=meta["lambda_u"], lambda_e=meta["lambda_e"], sat_momentum=meta["sat_momentum"],
        ema_momentum=o["ema_momentum"], start_epoch=meta["start_epoch"])).double().train()
    method.ema.module.load_state_dict(teacher)
    sat = with_prefix(fixture, "init.sat.")
    with torch.no_grad():
        for name in ("time_p", "p_model", "label_hist"):
            getattr(method, name).copy_(sat[name])
    labeled, unlabeled = batch_views(fixture, meta)
    # the original's teacher update: this step's student weights, BN statistics after its forward
    probe = copy.deepcopy(model).train()
    with torch.no_grad():
        probe(**{k: torch.cat([labeled["labeled"][k], unlabeled["strong"][k]]) for k in labeled["labeled"]})
    method.ema.update(probe, o["ema_momentum"])

    seen = {}
    compute_terms, sat_mask = method.compute_terms, freematch_module.sat_mask

    def capture_terms(*a, **k):
        seen["terms"], logs = compute_terms(*a, **k)
        return seen["terms"], logs

    def capture_mask(probs, *a, **k):
        seen["q"], seen["mask"] = probs, sat_mask(probs, *a, **k)
        return seen["mask"]

    method.compute_terms = capture_terms
    optimizer = adam(method, o)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(freematch_module, "sat_mask", capture_mask)
        loss, _ = method.training_step(labeled, unlabeled, TrainState(epoch=meta["epoch"], num_labels=o["num_classes"]))
    loss.backward()
    grads = original_names({n[len("model."):]: p.grad for n, p in method.named_parameters() if p.grad is not None})
    optimizer.step()
    post = post_state(method)
    post.update({f"sat.{k}": getattr(method, k) for k in ("time_p", "p_model", "label_hist")})
    return fixture, seen, loss, grads, post


def test_freematch_every_loss_term_matches_original(freematch_step):
    fixture, seen, loss, *_ = freematch_step
    assert_terms_match_original(fixture, seen["terms"], loss, count=4)


def test_freematch_pseudo_labels_and_mask_match_original(freematch_step):
    fixture, seen, *_ = freematch_step
    one_hot = torch.nn.functional.one_hot(seen["q"].argmax(1), fixture["step.pseudo_label"].shape[1]).double()
    _check(one_hot, fixture["step.pseudo_label"], "step pseudo_label")
    _check(seen["mask"].double(), fixture["step.mask"], "step mask")
    assert 0 < int(fixture["step.mask"].sum()) < fixture["step.mask"].numel()


def test_freematch_every_gradient_matches_original(freematch_step):
    fixture, _, _, grads, _ = freematch_step
    assert compare_recorded(fixture, "grad.", grads, _check, "gradients") > 50


def test_freematch_state_after_the_step_matches_original(freematch_step):
    """Student after Adam, the teacher after the original's in-step update, the SAT state."""
    fixture, *_, post = freematch_step
    recorded = {k: v for k, v in post.items() if f"post.{k}" in fixture or f"post.{k}#sum" in fixture}
    assert compare_recorded(fixture, "post.", recorded, _check, "state after the step") > 100


# ------------------------------------------------------------------------------------------ SimMatch
@pytest.fixture(scope="module")
def simmatch_step():
    fixture, meta = load_golden("stil_multimodal_simmatch")
    o = meta["overrides"]
    model, teacher = seeded_networks(fixture, meta)
    method = MultimodalSimMatch(model, MultimodalSimMatchArguments(ema_momentum=o["ema_momentum"], start_epoch=meta["start_epoch"],
                                                                  **meta["args"]))
    method.setup(DataInfo(num_labeled=o["K"], num_labels=o["num_classes"]))
    method.double().train()
    method.ema.module.model.load_state_dict(teacher)
    initial = with_prefix(fixture, "init.state.")
    with torch.no_grad():
        method.bank.copy_(initial["bank"].T)
        method.bank_labels.copy_(initial["labels"])
        method.DA.queue.buffer.copy_(initial["DA_queue"])
        method.DA.queue.ptr.fill_(int(initial["DA_ptr"]))
        method.DA.queue.count.fill_(method.DA.queue.size)  # the original's DA queue is a plain full buffer
    labeled, unlabeled = batch_views(fixture, meta)
    labeled["position"] = fixture["input.positions"]
    probe = copy.deepcopy(model).train()
    with torch.no_grad():
        probe(**{k: torch.cat([labeled["labeled"][k], unlabeled["strong"][k]]) for k in labeled["labeled"]})
    method.ema.update(ProjectedNet(probe, None), o["ema_momentum"])

    seen = {}
    compute_terms, unfold_aggregate = method.compute_terms, method.unfold_aggregate

    def capture_terms(*a, **k):
        seen["terms"], logs = compute_terms(*a, **k)
        return seen["terms"], logs

    def capture_unfold(similarity, probs, bank_labels):
        seen["probs"], seen["similarity"] = probs, similarity
        return unfold_aggregate(similarity, probs, bank_labels)

    method.compute_terms, method.unfold_aggregate = capture_terms, capture_unfold
    optimizer = adam(method, o)
    loss, _ = method.training_step(labeled, unlabeled, TrainState(epoch=meta["epoch"], num_labels=o["num_classes"]))
    loss.backward()
    grads = original_names({n[len("model."):]: p.grad for n, p in method.named_parameters()
                            if p.grad is not None and n.startswith("model.")})
    optimizer.step()
    post = post_state(method)
    post["bank"] = method.bank.T
    post["DA_queue"] = method.DA.queue.buffer
    post["labels"], post["DA_ptr"] = method.bank_labels, method.DA.queue.ptr
    return fixture, meta, seen, loss, grads, post


def test_simmatch_every_loss_term_matches_original(simmatch_step):
    fixture, _, seen, loss, *_ = simmatch_step
    assert_terms_match_original(fixture, seen["terms"], loss, count=4)


def test_simmatch_pseudo_labels_and_mask_match_original(simmatch_step):
    fixture, meta, seen, *_ = simmatch_step
    a = meta["args"]
    _, aggregated = MultimodalSimMatch.unfold_aggregate(seen["similarity"], seen["probs"], with_prefix(fixture, "init.state.")["labels"])
    p_hat = a["smoothing_alpha"] * seen["probs"] + (1 - a["smoothing_alpha"]) * aggregated
    _check(p_hat, fixture["step.p_hat"], "step p_hat")
    _check((p_hat.max(1).values >= a["threshold"]).double(), fixture["step.mask"], "step mask")
    assert 0 < int(fixture["step.mask"].sum()) < fixture["step.mask"].numel()


def test_simmatch_every_gradient_matches_original(simmatch_step):
    fixture, _, _, _, grads, _ = simmatch_step
    assert compare_recorded(fixture, "grad.", grads, _check, "gradients") > 50
    assert any(k.startswith("grad.head.") for k in fixture)  # L_in reaches the projection head


def test_simmatch_state_after_the_step_matches_original(simmatch_step):
    """Student after Adam, the teacher after the original's in-step update, bank, labels, DA queue."""
    fixture, *_, post = simmatch_step
    for name in ("labels", "DA_ptr"):
        assert torch.equal(post[name].reshape(-1), fixture[f"post.{name}"].reshape(-1)), name
    floats = {k: v for k, v in post.items() if k not in ("labels", "DA_ptr")
              and (f"post.{k}" in fixture or f"post.{k}#sum" in fixture)}
    fixture_floats = {k: v for k, v in fixture.items() if k not in ("post.labels", "post.DA_ptr")}
    assert compare_recorded(fixture_floats, "post.", floats, _check, "state after the step") > 100


# ------------------------------------------------------------------------------------------ CoMatch
@pytest.fixture(scope="module")
def comatch_step():
    fixture, meta = load_golden("stil_multimodal_comatch")
    o = meta["overrides"]
    model, teacher = seeded_networks(fixture, meta, "encoder.", "m_encoder.")
    method = MultimodalCoMatch(model, MultimodalCoMatchArguments(ema_momentum=o["ema_momentum"], start_epoch=meta["start_epoch"],
                                                                smoothing_start_epoch=meta["start_epoch"] + 1, **meta["args"]))
    method.setup(DataInfo(num_labels=o["num_classes"]))
    method.double().train()
    method.ema.module.model.load_state_dict(teacher)
    initial = with_prefix(fixture, "init.state.")
    hist = initial["hist_prob"]
    with torch.no_grad():
        for name in ("queue_w", "probs_xu", "queue_s", "probs_u"):
            getattr(method, name).copy_(initial[name].T)
        method.queue_ptr_w.fill_(int(initial["queue_ptr_w"]))
        method.queue_ptr_s.fill_(int(initial["queue_ptr_s"]))
        method.DA.queue.buffer[: len(hist)] = hist  # the original's history list, oldest first
        method.DA.queue.ptr.fill_(len(hist))
        method.DA.queue.count.fill_(len(hist))
        # the original's momentum update: parameters only, before the teacher forward
        for t, s in zip(method.ema.module.model.parameters(), model.parameters()):
            t.mul_(o["ema_momentum"]).add_((1 - o["ema_momentum"]) * s)
    labeled, unlabeled = batch_views(fixture, meta)
    n_cat = sum(k > 1 for k in meta["field_lengths"])
    image_s1 = seeded_images(meta["batch"]["unlabelled"], o["img_size"], meta["seeds"]["strong_1"])
    unlabeled = {"weak": unlabeled["weak"], "strong_0": unlabeled["strong"],
                 "strong_1": {"pixel_values": image_s1, "categorical_values": fixture["input.table_s1"][:, :n_cat].long(),
                              "continuous_values": fixture["input.table_s1"][:, n_cat:]}}

    seen = {}
    compute_terms, graph_loss = method.compute_terms, method.graph_loss

    def capture_terms(*a, **k):
        seen["terms"], logs = compute_terms(*a, **k)
        return seen["terms"], logs

    def capture_graph(probs, emb_logits, contrast_threshold, past_probs=None):
        seen["probs"], seen["past"] = probs, past_probs
        return graph_loss(probs, emb_logits, contrast_threshold, past_probs)

    method.compute_terms, method.graph_loss = capture_terms, capture_graph
    optimizer = adam(method, o)
    loss, _ = method.training_step(labeled, unlabeled, TrainState(epoch=meta["epoch"], num_labels=o["num_classes"]))
    loss.backward()
    grads = original_names({n[len("model."):]: p.grad for n, p in method.named_parameters()
                            if p.grad is not None and n.startswith("model.")})
    optimizer.step()
    post = post_state(method, "encoder.", "m_encoder.")
    for name in ("queue_w", "probs_xu", "queue_s", "probs_u"):
        post[name] = getattr(method, name).T
    post["queue_ptr_w"], post["queue_ptr_s"] = method.queue_ptr_w, method.queue_ptr_s
    return fixture, meta, seen, loss, grads, post


def test_comatch_every_loss_term_matches_original(comatch_step):
    fixture, _, seen, loss, *_ = comatch_step
    assert_terms_match_original(fixture, seen["terms"], loss, count=4)


def test_comatch_pseudo_labels_mask_and_graph_match_original(comatch_step):
    fixture, meta, seen, *_ = comatch_step
    p = seen["probs"]
    _check(p, fixture["step.probs"], "step probs (smoothed)")
    _check((p.max(1).values >= meta["args"]["threshold"]).double(), fixture["step.mask"], "step mask")
    q_self = p @ p.T
    q_self.fill_diagonal_(1.0)
    _check(torch.cat([q_self, p @ seen["past"].T], dim=1), fixture["step.Q"], "step Q")
    assert 0 < int(fixture["step.mask"].sum()) < fixture["step.mask"].numel()
    edges = fixture["step.Q"] >= meta["args"]["contrast_threshold"]
    assert 0 < int(edges.sum()) < edges.numel()


def test_comatch_every_gradient_matches_original(comatch_step):
    fixture, _, _, _, grads, _ = comatch_step
    assert compare_recorded(fixture, "grad.", grads, _check, "gradients") > 50
    assert any(k.startswith("grad.head.") for k in fixture)  # L_c reaches the projection head


def test_comatch_state_after_the_step_matches_original(comatch_step):
    """Student after Adam, the momentum encoder, the four queues and both pointers."""
    fixture, *_, post = comatch_step
    for name in ("queue_ptr_w", "queue_ptr_s"):
        assert int(post[name]) == int(fixture[f"post.{name}"]), name
    floats = {k: v for k, v in post.items() if not k.startswith("queue_ptr")
              and (f"post.{k}" in fixture or f"post.{k}#sum" in fixture)}
    fixture_floats = {k: v for k, v in fixture.items() if not k.startswith("post.queue_ptr")}
    assert compare_recorded(fixture_floats, "post.", floats, _check, "state after the step") > 100
