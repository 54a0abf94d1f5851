"""Golden test: our `tip_pretrain` step against one step of the ORIGINAL siyi-wind/TIP ``TIP3Loss``.

Fixture ``tests/golden/tip`` (scripts/golden/gen_tip.py; its JSON says how it was made). Weights
are regenerated from the recorded seed (tests/_golden_seeded.py) and put through our converter as
an original checkpoint would be; the original's hard-negative draws are replayed. Float64.

The one known divergence: the categorical reconstruction is -log(softmax + 1e-8) in the original and
an exact log-softmax cross entropy in ours (docs/methods.md "tip_pretrain"). The step runs with our
``reconstruction_loss`` given the original's +1e-8 (the only change), and then every term, gradient
and post-step entry must equal the original's to rtol 1e-9 (rounding) — so the +1e-8 is the whole
difference; our unchanged categorical term, computed on the same logits, is within 1e-6 relative.
"""

from __future__ import annotations

import types

import pytest
import torch

import modeling_stil.methods.tip_pretrain as tip_module
from modeling_stil.convert_original import convert_tip_state_dict
from modeling_stil.methods.base import TrainState
from modeling_stil.methods.tip_pretrain import TipPretrain, TipPretrainArguments
from modeling_stil.training.optim import build_optimizer
from tests._golden import assert_matches_original, load_golden, with_prefix
from tests._golden_seeded import compare_recorded, float64_default, float_shapes, record, seeded_images, seeded_state

EXACT = dict(rtol=1e-9, atol=1e-12)


def reconstruction_loss_with_log_eps(cat_logits, con_predictions, categorical, continuous, masked_fields, offsets, reduction="mean"):
    """Ours with the original's -log(softmax + 1e-8) for the categorical cells; also returns (via
    ``exact``) our unchanged categorical term on the same logits."""
    n_cat = categorical.shape[1]
    targets = categorical.long() + offsets[None, :]
    probs = cat_logits.softmax(dim=-1).gather(-1, targets[..., None]).squeeze(-1)
    mask_cat = masked_fields[:, :n_cat].to(probs.dtype)
    exact_cat, loss_con = RECONSTRUCTION(cat_logits, con_predictions, categorical, continuous, masked_fields, offsets, reduction)
    reconstruction_loss_with_log_eps.exact = exact_cat.detach()
    loss_cat = (-torch.log(probs + 1e-8) * mask_cat).sum() / mask_cat.sum()
    return loss_cat, loss_con


RECONSTRUCTION = tip_module.reconstruction_loss


@pytest.fixture(scope="module")
def golden_step(monkeypatch_module):
    fixture, meta = load_golden("tip")
    o = meta["overrides"]
    overrides = dict(image_encoder=o["model"], image_size=o["img_size"], tabular_num_heads=8, multimodal_num_heads=8)  # Block's default
    with float64_default():  # built in float64 so the float64 weights load exactly
        from modeling_stil.configuration_tip import TipConfig
        from modeling_stil.modeling_tip import TipModel

        shell = TipModel(TipConfig(field_lengths=meta["field_lengths"], tabular_embedding_dim=o["tabular_embedding_dim"],
                                   tabular_num_layers=o["tabular_transformer_num_layers"], hidden_size=o["multimodal_embedding_dim"],
                                   multimodal_num_layers=o["multimodal_transformer_num_layers"], projection_dim=o["projection_dim"],
                                   image_projector_hidden_dim=o["embedding_dim"], tabular_projector_hidden_dim=o["tabular_embedding_dim"],
                                   **overrides))
        own = shell.state_dict()
        state = {**own, **seeded_state(float_shapes(own), meta["seeds"]["weights"])}
        model = convert_tip_state_dict(state, meta["field_lengths"], **overrides)
    method = TipPretrain(model, TipPretrainArguments()).double().train()

    negatives = (fixture["input.negative_tables"], fixture["input.negative_images"])
    monkeypatch_module.setattr(tip_module, "hard_negatives", lambda similarity, sample=True: negatives)
    monkeypatch_module.setattr(tip_module, "reconstruction_loss", reconstruction_loss_with_log_eps)
    terms_seen = {}
    losses = method.losses

    def capture(*a, **k):
        terms, logs = losses(*a, **k)
        terms_seen.update(terms)
        return terms, logs

    method.losses = capture
    n_cat = sum(k > 1 for k in meta["field_lengths"])
    image = seeded_images(meta["batch"], o["img_size"], meta["seeds"]["inputs"])
    mask = fixture["input.mask"]

    def view(table, **extra):
        return {"categorical_values": table[:, :n_cat].long(), "continuous_values": table[:, n_cat:], **extra}

    clean = fixture["input.clean"]
    unlabeled = {"image": {"pixel_values": image}, "corrupted": view(fixture["input.corrupted"]),
                 "masked": view(clean, missing_mask=mask, masked_fields=mask), "clean": view(clean)}
    optimizer = build_optimizer(method, types.SimpleNamespace(
        optimizer="adam", learning_rate=o["lr"], weight_decay=o["weight_decay"], weight_decay_scope="all",
        adam_beta1=0.9, adam_beta2=0.999), "cpu")
    loss, _ = method.training_step(None, unlabeled, TrainState())
    loss.backward()
    grads = {n[len("model."):]: p.grad for n, p in method.named_parameters() if p.grad is not None}
    optimizer.step()
    post = {k[len("model."):]: v for k, v in method.state_dict().items() if k.startswith("model.") and v.is_floating_point()}
    return fixture, image, terms_seen, loss, grads, post


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_inputs_regenerate_as_recorded(golden_step):
    fixture, image, *_ = golden_step
    ours = record("input.", {"image": image})
    for key in (k for k in fixture if k.startswith("input.image")):
        assert_matches_original(ours[key], fixture[key], key, **EXACT)


def test_every_loss_term_matches_original(golden_step):
    fixture, _, terms, loss, *_ = golden_step
    loss = loss.detach()
    recorded = with_prefix(fixture, "term.")
    for name in ("loss_itc", "loss_itm", "loss_mtr_con", "loss_mtr_cat", "loss_mtr"):
        assert_matches_original(terms[name], recorded[name], f"term {name}", **EXACT)
    assert_matches_original(loss, recorded["loss"], "term loss", **EXACT)
    # our own categorical term (exact log-softmax) on the same logits: the +1e-8 apart, no more
    ours = reconstruction_loss_with_log_eps.exact
    assert_matches_original(ours, recorded["loss_mtr_cat"], "term loss_mtr_cat (ours, no +1e-8)", rtol=1e-6, atol=1e-9)
    assert float(ours) != float(recorded["loss_mtr_cat"])


def test_every_gradient_matches_original(golden_step):
    fixture, _, _, _, grads, _ = golden_step
    check = lambda ours, theirs, name: assert_matches_original(ours, theirs, name, **EXACT)  # noqa: E731
    assert compare_recorded(fixture, "grad.", grads, check, "gradients") > 100


def test_state_after_adam_step_matches_original(golden_step):
    """Every parameter and BatchNorm statistic after one Adam step with weight decay on every
    parameter (weight_decay_scope='all', the original's single group)."""
    fixture, *_, post = golden_step
    check = lambda ours, theirs, name: assert_matches_original(ours, theirs, name, **EXACT)  # noqa: E731
    assert compare_recorded(fixture, "post.", post, check, "state after the step") > 100
