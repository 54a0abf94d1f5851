"""Golden test: our `stil` step against one step of the ORIGINAL siyi-wind/STiL ``STiLModel``.

Fixture ``tests/golden/stil`` (scripts/golden/gen_stil.py; its JSON says how it was made). The
weights are regenerated here from the recorded seeds (tests/_golden_seeded.py), put through our
converter exactly as an original checkpoint would be, and our method runs the same step in float64:
every loss term, the pseudo-labels, confidence mask and CGPL cases, every gradient, and the whole
state after the Adam step (student, EMA teacher, projectors, CLUB estimators, prototype sums) must
equal the original's to rtol 1e-9 (float64 rounding; a formula difference moves them by far more).
"""

from __future__ import annotations

import types

import pytest
import torch
from safetensors.torch import save_file

from modeling_stil.convert_original import METHOD_STATE_FILENAME, convert_stil_state_dict
from modeling_stil.methods.base import TrainState
from modeling_stil.methods.stil import Stil, StilArguments
from modeling_stil.training.optim import build_optimizer
from tests._golden import assert_matches_original, assert_terms_match_original, load_golden, with_prefix
from tests._golden_seeded import compare_recorded, float64_default, float_shapes, perturbed, record, seeded_images, seeded_state

RTOL, ATOL = 1e-9, 1e-12


def _check(ours, theirs, name):
    assert_matches_original(ours, theirs, name, rtol=RTOL, atol=ATOL)


def _original_state(meta, fixture, our_model_state, our_method_state):
    """The original module's state dict as the generator set it: seeded student, perturbed teacher,
    seeded projectors / CLUB / prototypes, the recorded classifier biases."""
    seeds, scale = meta["seeds"], meta["scale"]
    student = seeded_state(float_shapes(our_model_state), seeds["student"], scale)
    teacher = perturbed(student, seeds["teacher"])
    method = seeded_state(float_shapes(our_method_state), seeds["method"])
    method["prototypes"] = torch.nn.functional.normalize(method["prototypes"], dim=1)
    method["prototypes_count_sum"] = method["prototypes_count_sum"].abs() + 1.0
    state = {}
    for key, value in our_model_state.items():  # integer counters (num_batches_tracked) as built: 0
        state[f"model.{key}"] = student.get(key, value)
        state[f"ema.{key}"] = teacher.get(key, value)
    state.update(method)
    state.update(with_prefix(fixture, "init.override."))
    return state


@pytest.fixture(scope="module")
def golden_step(tmp_path_factory):
    fixture, meta = load_golden("stil")
    o = meta["overrides"]
    n_l, n_u = meta["batch"]["labelled"], meta["batch"]["unlabelled"]
    config = dict(image_encoder=o["model"], image_size=o["img_size"], tabular_num_heads=8,  # the original Block's default
                  interaction_attn_drop=0.0, interaction_proj_drop=0.0, interaction_drop_path=0.0)
    # shapes of our model and of the method's own tensors (built once, random), to regenerate the weights
    from modeling_stil.configuration_stil import StilConfig
    from modeling_stil.modeling_stil import StilModel

    shell = StilModel(StilConfig(field_lengths=meta["field_lengths"], num_labels=o["num_classes"], tabular_embedding_dim=o["tabular_embedding_dim"],
                                 tabular_num_layers=o["tabular_transformer_num_layers"], hidden_size=o["multimodal_embedding_dim"],
                                 interaction_num_layers=o["multimodal_transformer_num_layers"], **config))
    args = StilArguments(th1=o["th1"], ema_momentum=o["ema_momentum"], projection_dim=o["projection_dim"], unimodal_projector="linear",
                         repeat_ratio=o["repeat_ratio"])
    method_shell = Stil(shell, args)
    method_own = {k: v for k, v in method_shell.state_dict().items() if not k.startswith(("model.", "ema.")) and k != "ema_step"}
    state = _original_state(meta, fixture, shell.state_dict(), method_own)

    # through the converter, as an original checkpoint; built in float64 so the float64 weights load exactly
    with float64_default():
        model, method_state = convert_stil_state_dict(state, meta["field_lengths"], num_classes=o["num_classes"], weights="student", **config)
    folder = tmp_path_factory.mktemp("converted")
    save_file({k: v.contiguous() for k, v in method_state.items()}, str(folder / METHOD_STATE_FILENAME))
    method = Stil(model.double(), args).double()
    assert method.init_from_pretrained(str(folder))["loaded"]
    method.train()

    coins = fixture["input.coins"]
    method._coin_flips = lambda n, device: coins.clone()  # the original's case-3 draws, replayed
    seen = {}
    for name in ("cgpl", "pgls"):
        original = getattr(method, name)

        def wrapped(*a, _original=original, _name=name, **k):
            seen[_name] = _original(*a, **k)
            return seen[_name]

        setattr(method, name, wrapped)
    compute_terms = method.compute_terms

    def capture_terms(*a, **k):
        seen["terms"], logs = compute_terms(*a, **k)
        return seen["terms"], logs

    method.compute_terms = capture_terms

    images = seeded_images(n_l + n_u, o["img_size"], meta["seeds"]["inputs"])
    n_cat = sum(k > 1 for k in meta["field_lengths"])

    def view(image, table):
        return {"pixel_values": image, "categorical_values": table[:, :n_cat].long(), "continuous_values": table[:, n_cat:]}

    labeled = {"labels": fixture["input.y_l"], "stil": view(images[:n_l], fixture["input.table_l"])}
    unlabeled = {"stil": view(images[n_l:], fixture["input.table_u"])}
    optimizer = build_optimizer(method, types.SimpleNamespace(
        optimizer="adam", learning_rate=o["lr_eval"], weight_decay=o["weight_decay_eval"], weight_decay_scope="all",
        adam_beta1=0.9, adam_beta2=0.999), "cpu")
    state_ = TrainState(step=0, epoch=meta["epoch"], num_labels=o["num_classes"])
    loss, _ = method.training_step(labeled, unlabeled, state_)
    loss.backward()
    grads = {n: p.grad for n, p in method.named_parameters() if p.grad is not None}
    optimizer.step()
    return fixture, meta, images, seen, loss, grads, method


def test_inputs_regenerate_as_recorded(golden_step):
    fixture, meta, images, *_ = golden_step
    n_l = meta["batch"]["labelled"]
    ours = record("input.", {"image_l": images[:n_l], "image_u": images[n_l:]})
    for key in (k for k in fixture if k.startswith("input.image")):
        _check(ours[key], fixture[key], key)


def test_every_loss_term_matches_original(golden_step):
    fixture, _, _, seen, loss, *_ = golden_step
    assert_terms_match_original(fixture, seen["terms"], loss, count=13, rtol=RTOL, atol=ATOL)


def test_pseudo_labels_mask_and_cases_match_original(golden_step):
    fixture, meta, _, seen, *_ = golden_step
    step = with_prefix(fixture, "step.")
    _, case1, case2i, case2t, case3 = seen["cgpl"]
    p_bar, p_hat, mask, q = seen["pgls"]
    ours = {"p_bar": p_bar, "p_hat": p_hat, "q": q, "mask": mask, "case1": case1, "case2_image": case2i,
            "case2_tabular": case2t, "case3": case3}
    for name, value in step.items():
        _check(ours[name].double(), value, f"step {name}")
    # the fixture exercises every branch: all four cases present, the mask neither empty nor full
    assert all(int(step[c].sum()) > 0 for c in ("case1", "case2_image", "case2_tabular", "case3"))
    assert 0 < int(step["mask"].sum()) < meta["batch"]["unlabelled"]


def test_every_gradient_matches_original(golden_step):
    fixture, _, _, _, _, grads, _ = golden_step
    assert compare_recorded(fixture, "grad.", grads, _check, "gradients") > 100


def test_state_after_adam_step_matches_original(golden_step):
    """Student, EMAN teacher, projectors, CLUB, prototypes and their running sums after one step.
    Adam decays every parameter here (weight_decay_scope='all'), as the original does."""
    fixture, _, _, _, _, _, method = golden_step
    ours = {}
    for key, value in method.state_dict().items():
        if value.is_floating_point():
            ours[("ema." + key[len("ema.module."):]) if key.startswith("ema.module.") else key] = value
    assert compare_recorded(fixture, "post.", ours, _check, "state after the step") > 200
