"""SimMatch / Multimodal SimMatch (modeling_stil/methods/simmatch.py) against docs/methods.md
("simmatch", USB's simmatch): unfolding / aggregation and the bank
by hand, every loss term re-computed independently from the network outputs, gradient routing of
each term (which views, which sub-modules), warm-up gates, save/resume of the bank, bad input, and
one tiny train.py run that resumes bit-exactly, exports and reloads."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from modeling_stil.methods.base import DataInfo, TrainState
from modeling_stil.methods.simmatch import MultimodalSimMatch, MultimodalSimMatchArguments, SimMatch, SimMatchArguments
from modeling_stil.presets import create_model
from tests._helpers import TOY_METADATA, TOY_SCHEMA, flags, run_train
from tests.helpers.random_views import image_view, mm_view

N_L, N_U, K = 4, 6, 10


def batches(multimodal=False, seed=0, positions=(7, 2, 9, 0)):
    g = torch.Generator().manual_seed(seed)
    view = mm_view if multimodal else image_view
    labeled = {"labels": torch.tensor([0, 1, 2, 1]), "index": torch.arange(N_L), "position": torch.tensor(positions),
               "labeled": view(N_L, g)}
    unlabeled = {"index": torch.arange(N_U), "monitor_labels": torch.arange(N_U) % 3, "weak": view(N_U, g), "strong": view(N_U, g)}
    return labeled, unlabeled


def make(multimodal=False, **kw):
    torch.manual_seed(0)
    if multimodal:
        model = create_model("multimodal-concat-tiny", schema=TOY_SCHEMA, metadata=TOY_METADATA, backbone="test_vit")
        method = MultimodalSimMatch(model, MultimodalSimMatchArguments(**kw))
    else:
        model = create_model("image-tiny", metadata=TOY_METADATA, backbone="test_vit")
        method = SimMatch(model, SimMatchArguments(**kw))
    method.setup(DataInfo(num_labeled=K, num_labels=3, labeled_batch_size=N_L, unlabeled_batch_size=N_U))
    return method.train()


STATE = TrainState(step=100, epoch=50, max_steps=1000, num_labels=3)


# ------------------------------------------------------------------------------ pieces by hand
def test_unfolding_and_aggregation_by_hand():
    s = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    p = torch.tensor([[0.6, 0.4], [0.5, 0.5]])
    labels = torch.tensor([0, 1, 0])
    unfolded, aggregated = SimMatch.unfold_aggregate(s, p, labels)
    torch.testing.assert_close(unfolded[0], torch.tensor([0.30, 0.12, 0.12]) / 0.54)
    torch.testing.assert_close(unfolded[1], s[1])  # uniform class probabilities leave s unchanged
    torch.testing.assert_close(aggregated, torch.tensor([[0.7, 0.3], [0.9, 0.1]]))


@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_bank_write_by_hand(momentum):
    method = make(bank_momentum=momentum)
    old = method.bank.clone()
    feats = F.normalize(torch.randn(2, old.shape[1]), dim=1)
    method.update_bank(feats, torch.tensor([2, 1]), torch.tensor([5, 0]), STATE)
    if momentum == 0:
        expected5, expected0 = feats[0], feats[1]
    else:
        expected5 = F.normalize(0.5 * old[5] + 0.5 * feats[0], dim=0)
        expected0 = F.normalize(0.5 * old[0] + 0.5 * feats[1], dim=0)
    torch.testing.assert_close(method.bank[5], expected5)
    torch.testing.assert_close(method.bank[0], expected0)
    untouched = [i for i in range(K) if i not in (0, 5)]
    assert torch.equal(method.bank[untouched], old[untouched])
    assert method.bank_labels.tolist() == [1, 0, 0, 0, 0, 2, 0, 0, 0, 0]


def test_bank_is_sized_from_the_labelled_rows_and_identical_on_every_process():
    a, b = make(), make()
    assert a.bank.shape == (K, 16) and a.bank_labels.shape == (K,)
    torch.testing.assert_close(a.bank.norm(dim=1), torch.ones(K))
    torch.manual_seed(123)  # the global RNG does not decide the initial bank
    c = SimMatch(copy.deepcopy(a.model), SimMatchArguments())
    c.setup(DataInfo(num_labeled=K, num_labels=3))
    assert torch.equal(a.bank, b.bank) and torch.equal(a.bank, c.bank)


# ------------------------------------------------------------------------------ the step, independently
def expected_terms(method, labeled, unlabeled, state):
    """Every term from the network outputs, float64, loops where the method vectorises."""
    a = method.args
    probe = copy.deepcopy(method)
    with torch.no_grad():
        z_l, z_s, g_s, g_l, z_w, g_w = (t.double() for t in probe.forward_views(labeled, unlabeled))
    bank, labels = method.bank.double().clone(), method.bank_labels.clone()
    p = z_w.softmax(1)
    if method.DA is not None:
        history = torch.cat([method.DA.queue.buffer.double(), p.mean(0, keepdim=True)])[-a.da_len:]
        p = p / history.mean(0)
        p = p / p.sum(1, keepdim=True)
    sup = F.cross_entropy(z_l, labeled["labels"])
    unsup, inst = 0.0, 0.0
    for b in range(N_U):
        s = torch.softmax(g_w[b] @ bank.T / a.temperature_teacher, 0)
        w = torch.stack([s[k] * p[b, labels[k]] for k in range(K)])
        s_hat = w / w.sum()
        agg = torch.stack([sum(s[k] for k in range(K) if labels[k] == c) + 0.0 * s[0] for c in range(3)])
        p_hat = a.smoothing_alpha * p[b] + (1 - a.smoothing_alpha) * agg
        t = torch.log_softmax(g_s[b] @ bank.T / a.temperature_student, 0)
        inst += -(s_hat * t).sum() / N_U
        if p_hat.max() >= a.threshold:
            unsup += -(p_hat * torch.log_softmax(z_s[b], 0)).sum() / N_U
    return sup, torch.as_tensor(unsup, dtype=torch.float64), inst


@pytest.mark.parametrize("multimodal", [False, True])
def test_every_term_matches_an_independent_computation(multimodal):
    method = make(multimodal, threshold=0.3, start_epoch=-1)
    labeled, unlabeled = batches(multimodal)
    # a used bank: a few rows with real labels
    method.update_bank(F.normalize(torch.randn(5, 16), dim=1), torch.tensor([0, 1, 2, 2, 1]), torch.tensor([1, 3, 4, 6, 8]), STATE)
    sup, unsup, inst = expected_terms(method, labeled, unlabeled, STATE)
    terms, logs = method.compute_terms(labeled, unlabeled, STATE)
    torch.testing.assert_close(terms["sup_loss"].double(), sup, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(terms["unsup_loss"].double(), unsup, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(terms["in_loss"].double(), inst, rtol=1e-4, atol=1e-5)
    assert terms["unsup_loss"] > 0, "the test needs confident rows"
    # and the bank now holds the labelled rows' teacher embeddings at their positions
    assert method.bank_labels[[7, 2, 9, 0]].tolist() == [0, 1, 2, 1]
    assert logs["unsup_active"] == 1.0


def test_warm_up_gates():
    method = make(start_epoch=3, instance_start_epoch=1, threshold=0.0, distribution_alignment=False)
    labeled, unlabeled = batches()
    early = TrainState(step=0, epoch=0, max_steps=100, num_labels=3)
    terms, _ = copy.deepcopy(method).compute_terms(labeled, unlabeled, early)
    assert terms["in_loss"] == 0  # USB: L_in * 0 in epoch 0 ...
    loss, logs = copy.deepcopy(method).training_step(labeled, unlabeled, TrainState(step=5, epoch=3, max_steps=100, num_labels=3))
    terms3, _ = copy.deepcopy(method).compute_terms(labeled, unlabeled, TrainState(step=5, epoch=3, max_steps=100, num_labels=3))
    torch.testing.assert_close(loss, terms3["sup_loss"])  # only L_x while epoch <= start_epoch
    assert terms3["in_loss"] > 0 and terms3["unsup_loss"] > 0  # computed (and logged) all the same
    loss4, _ = copy.deepcopy(method).training_step(labeled, unlabeled, TrainState(step=5, epoch=4, max_steps=100, num_labels=3))
    assert loss4 > loss


# ------------------------------------------------------------------------------ gradient routing
def _grads(method, term, labeled, unlabeled):
    for view in (labeled["labeled"], unlabeled["weak"], unlabeled["strong"]):
        view["pixel_values"].requires_grad_(True)
    method.zero_grad()
    terms, _ = method.compute_terms(labeled, unlabeled, STATE)
    terms[term].backward()
    pix = {name: v["pixel_values"].grad for name, v in (("labeled", labeled["labeled"]), ("weak", unlabeled["weak"]), ("strong", unlabeled["strong"]))}
    named = dict(method.named_parameters())
    has = lambda prefix: any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in named.items() if n.startswith(prefix))  # noqa: E731
    assert all(p.grad is None for p in method.ema.parameters()), "the teacher never gets gradient"
    return pix, has


@pytest.mark.parametrize("teacher", ["online", "eman"])
def test_gradient_routing_of_each_term(teacher):
    base = make(teacher=teacher, threshold=0.0, start_epoch=-1)
    base.update_bank(F.normalize(torch.randn(K, 16), dim=1), torch.arange(K) % 3, torch.arange(K), STATE)
    nonzero = lambda t: t is not None and t.abs().sum() > 0  # noqa: E731
    # L_x: labelled view only; classifier and encoder, not the projection head
    pix, has = _grads(copy.deepcopy(base), "sup_loss", *batches())
    assert nonzero(pix["labeled"]) and not nonzero(pix["weak"]) and not nonzero(pix["strong"])
    assert has("model.classifier") and has("model.encoder_imaging") and not has("model.head")
    # L_u: strong view only (the pseudo-label is a constant), through the classifier
    pix, has = _grads(copy.deepcopy(base), "unsup_loss", *batches())
    assert nonzero(pix["strong"]) and not nonzero(pix["weak"]) and not nonzero(pix["labeled"])
    assert has("model.classifier") and not has("model.head")
    # L_in: strong view only, through the projection head and the encoder, not the classifier
    pix, has = _grads(copy.deepcopy(base), "in_loss", *batches())
    assert nonzero(pix["strong"]) and not nonzero(pix["weak"]) and not nonzero(pix["labeled"])
    assert has("model.head") and has("model.encoder_imaging") and not has("model.classifier")


def test_wrn_gets_a_method_owned_projection_head_that_trains_and_is_averaged():
    torch.manual_seed(0)
    model = create_model("wrn-tiny", metadata=TOY_METADATA)
    method = SimMatch(model, SimMatchArguments(projection_dim=8, threshold=0.0, start_epoch=-1, instance_start_epoch=0))
    method.setup(DataInfo(num_labeled=K, num_labels=3))
    assert method.projector is not None and method.bank.shape == (K, 8)
    assert "projector.0.weight" in dict(method.ema.module.named_parameters())
    labeled, unlabeled = batches()
    loss, _ = method.training_step(labeled, unlabeled, STATE)
    loss.backward()
    assert method.projector[0].weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------ EMA, DA, resume
def test_eman_teacher_and_da_queue_follow_their_rules():
    method = make(multimodal=True)
    assert method.ema.mode == "state" and method.args.ema_momentum == 0.996 and method.DA.queue.size == 256
    teacher = {k: v.clone() for k, v in method.ema.module.state_dict().items()}
    with torch.no_grad():
        for p in method.model.parameters():
            p.add_(0.1)
    method.after_optimizer_step(STATE)
    student = method._net().state_dict()
    for key, value in method.ema.module.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(value, 0.996 * teacher[key] + 0.004 * student[key])
    usb = make()
    assert usb.ema.mode == "parameters" and usb.DA.queue.size == 32 and usb.eval_model() is usb.ema.module.model
    assert method.eval_model() is method.model  # STiL evaluates the student


def test_bank_and_da_state_survive_save_and_resume_bit_exactly(tmp_path):
    from safetensors.torch import load_file, save_file

    method = make(multimodal=True, start_epoch=-1, threshold=0.0)
    for seed in range(2):
        method.training_step(*batches(True, seed), STATE)
    save_file({k: v.contiguous() for k, v in method.state_dict().items()}, tmp_path / "s.safetensors")
    resumed = make(multimodal=True, start_epoch=-1, threshold=0.0)
    resumed.load_state_dict(load_file(tmp_path / "s.safetensors"))
    for key in ("bank", "bank_labels", "DA.queue.buffer", "DA.queue.ptr"):
        assert torch.equal(resumed.state_dict()[key], method.state_dict()[key]), key
    la, lb = method.training_step(*batches(True, 5, positions=(1, 3, 5, 7)), STATE)[0], resumed.training_step(*batches(True, 5, positions=(1, 3, 5, 7)), STATE)[0]
    assert torch.equal(la, lb)
    assert torch.equal(method.bank, resumed.bank) and torch.equal(method.DA.queue.buffer, resumed.DA.queue.buffer)


# ------------------------------------------------------------------------------ bad input
def test_bad_input_stops_with_one_line():
    mm = create_model("multimodal-concat-tiny", schema=TOY_SCHEMA, metadata=TOY_METADATA)
    with pytest.raises(ValueError, match="multimodal_simmatch"):
        SimMatch(mm, SimMatchArguments())
    method = SimMatch(create_model("image-tiny", metadata=TOY_METADATA), SimMatchArguments(max_bank_gib=1e-6))
    with pytest.raises(ValueError, match="GiB.*max_bank_gib"):
        method.setup(DataInfo(num_labeled=100_000, num_labels=3))
    with pytest.raises(ValueError, match="labelled rows"):
        method.setup(DataInfo(num_labeled=0, num_labels=3))
    with pytest.raises(ValueError, match="teacher"):
        SimMatchArguments(teacher="bogus")
    with pytest.raises(ValueError, match="predicts 3 classes but the data has 5"):
        SimMatch(create_model("image-tiny", metadata=TOY_METADATA), SimMatchArguments()).setup(DataInfo(num_labeled=10, num_labels=5))


# ------------------------------------------------------------------------------ through train.py
def _argv(out, cache, *extra):
    values = {
        "method": "multimodal_simmatch", "model": "multimodal-concat-tiny", "start_epoch": "-1", "threshold": "0.3",
        "output_dir": str(out), "dataset_cache_dir": str(cache), "synthetic_num_samples": "200",
        "labeled_fraction": "0.2", "mu": "2", "per_device_train_batch_size": "4", "per_device_eval_batch_size": "64",
        "max_steps": "4", "eval_steps": "4", "save_steps": "2", "logging_steps": "1", "learning_rate": "0.01",
        "optimizer": "adam", "report_to": "none", "disable_tqdm": "true", "seed": "5",
    }
    return flags(values, *extra)


def test_train_py_resumes_bit_exactly_exports_and_reloads(tmp_path, synthetic_cache):
    from safetensors.torch import load_file

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run_train(_argv(straight, synthetic_cache)) == 0
    assert run_train(_argv(resumed, synthetic_cache, "--stop_after_steps", "2")) == 0
    assert run_train(_argv(resumed, synthetic_cache, "--resume_from_checkpoint", "latest")) == 0
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ca = load_file(straight / "checkpoints" / "checkpoint-4" / "model.safetensors")
    cb = load_file(resumed / "checkpoints" / "checkpoint-4" / "model.safetensors")
    for key in ("bank", "bank_labels", "DA.queue.buffer"):
        assert torch.equal(ca[key], cb[key]), key
    assert (ca["bank_labels"] != 0).any(), "the bank was written"
    results = json.loads((straight / "eval_results.json").read_text())
    assert results["reload_check"]["matches"]
    records = [json.loads(line) for line in (straight / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("in_loss", 0) > 0 for r in records) and any("pseudo_label_accuracy" in r for r in records)
