"""FreeMatch / Multimodal FreeMatch: SAT thresholds and SAF fairness against hand-computed values,
gradient routing of every term, the supervised warm-up gate, the EMA teacher, exact resume of the
threshold state, one- vs two-process SAT state, and a short run where the unlabelled term trains."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modeling_stil.methods.base import TrainState, get_method_class
from modeling_stil.methods.freematch import (
    FreeMatch,
    FreeMatchArguments,
    MultimodalFreeMatch,
    MultimodalFreeMatchArguments,
    fairness_loss,
    sat_batch_statistics,
    sat_mask,
)
from tests.helpers.freematch import batches, hand_inputs
from tests.helpers.nets import TinyNet, TinyOutput


class LinearNet(nn.Module):
    """logits = x @ W^T with W = identity at init: the logits ARE the inputs."""

    def __init__(self, num_labels=3):
        super().__init__()
        self.config = type("Config", (), {"num_labels": num_labels})()
        self.head = nn.Linear(num_labels, num_labels, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(torch.eye(num_labels))

    def forward(self, pixel_values, **unused):
        return TinyOutput(logits=self.head(pixel_values))


# ------------------------------------------------------------------------------------------ SAT by hand
def test_sat_statistics_thresholds_and_mask_by_hand():
    method = FreeMatch(LinearNet(), FreeMatchArguments(sat_momentum=0.5, ema_momentum=0.0))
    torch.testing.assert_close(method.time_p, torch.tensor(1 / 3))
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.3, 0.4, 0.3], [0.1, 0.1, 0.8], [0.6, 0.3, 0.1]])
    method.update_sat(probs)
    # batch: mean max = (0.7+0.4+0.8+0.6)/4 = 0.625; mean p = (0.425, 0.25, 0.325); argmax hist = (2, 1, 1)/4
    torch.testing.assert_close(method.time_p, torch.tensor(0.5 / 3 + 0.5 * 0.625))
    torch.testing.assert_close(method.p_model, 0.5 / 3 + 0.5 * torch.tensor([0.425, 0.25, 0.325]))
    torch.testing.assert_close(method.label_hist, 0.5 / 3 + 0.5 * torch.tensor([0.5, 0.25, 0.25]))
    # class thresholds tau * p~_c / max p~: tau = 0.479167, p~ = (0.379167, 0.291667, 0.329167)
    tau, p = 0.5 / 3 + 0.3125, [0.5 / 3 + 0.2125, 0.5 / 3 + 0.125, 0.5 / 3 + 0.1625]
    thresholds = [tau * v / max(p) for v in p]
    expected = [float(row.max() >= thresholds[int(row.argmax())]) for row in probs]
    assert expected == [1.0, 1.0, 1.0, 1.0]
    torch.testing.assert_close(sat_mask(probs, method.time_p, method.p_model), torch.tensor(expected))
    # a row just under its class threshold is masked out, one exactly at it is kept (inclusive)
    t1 = thresholds[1]
    edge = torch.tensor([[(1 - t1 + 1e-4) / 2, t1 - 1e-4, (1 - t1 + 1e-4) / 2]])
    assert sat_mask(edge, method.time_p, method.p_model).item() == 0.0
    t1 = (method.time_p.double() * method.p_model.double()[1] / method.p_model.double().max()).item()
    at = torch.tensor([[(1 - t1) / 2, t1, (1 - t1) / 2]], dtype=torch.float64)
    assert sat_mask(at, method.time_p.double(), method.p_model.double()).item() == 1.0


def test_sat_statistics_are_the_global_batch_under_a_sum_reduction():
    torch.manual_seed(0)
    probs = torch.randn(8, 5).softmax(dim=1)
    whole = sat_batch_statistics(probs)
    halves = [probs[:4], probs[4:]]

    class TwoRanks:  # reduce_sum over two "processes": this one holds half 0, the other half 1
        num_processes = 2

        @staticmethod
        def reduce_sum(stats):
            other = torch.cat([halves[1].max(1).values.sum()[None], halves[1].sum(0),
                               F.one_hot(halves[1].argmax(1), 5).float().sum(0), torch.tensor([4.0])])
            return stats + other

    split = sat_batch_statistics(halves[0], TwoRanks())
    for a, b in zip(whole, split):
        torch.testing.assert_close(a, b)


def test_fairness_term_by_hand_and_zero_without_confident_rows():
    p_model = torch.tensor([0.5, 0.3, 0.2])
    label_hist = torch.tensor([0.4, 0.4, 0.2])
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0]], requires_grad=True)
    mask = torch.tensor([1.0, 1.0, 0.0])
    loss = fairness_loss(logits, mask, p_model, label_hist)
    probs = logits.detach().softmax(1)[:2]
    q_bar = probs.mean(0)
    h_bar = torch.tensor([0.5, 0.5, 0.0])  # argmax of the two masked rows: 0 and 1
    a = p_model / label_hist
    a = a / a.sum()
    d = q_bar * torch.tensor([2.0, 2.0, 0.0])  # 1/h_bar with 1/0 -> 0
    d = d / d.sum()
    expected = (a * torch.log(d + 1e-12)).sum()
    torch.testing.assert_close(loss.detach(), expected)
    loss.backward()
    assert torch.count_nonzero(logits.grad[:2]) > 0, "masked-in strong rows get the fairness gradient"
    assert torch.count_nonzero(logits.grad[2]) == 0, "a masked-out row got fairness gradient"

    logits.grad = None
    none = fairness_loss(logits, torch.zeros(3), p_model, label_hist)
    none.backward()
    assert none.item() == 0.0 and torch.isfinite(logits.grad).all() and torch.count_nonzero(logits.grad) == 0


# ------------------------------------------------------------------------------------ gradient routing
@pytest.mark.parametrize("mask_unsup", [True, False])
def test_terms_and_gradients_student_pseudo_labels(mask_unsup):
    args = FreeMatchArguments(mask_unsup=mask_unsup, lambda_u=2.0, lambda_e=0.5, ema_momentum=0.0, sat_momentum=0.0)
    method = FreeMatch(LinearNet(), args)
    labeled, unlabeled = hand_inputs()
    x_l, x_w, x_s = labeled["labeled"]["pixel_values"], unlabeled["weak"]["pixel_values"], unlabeled["strong"]["pixel_values"]
    terms, logs = method.compute_terms(labeled, unlabeled, TrainState())
    # m = 0: the SAT state is this batch's; the unsure row (max 0.41) is under tau * p~_0 / max p~
    q = x_w.detach().softmax(1)
    torch.testing.assert_close(method.time_p, q.max(1).values.mean())
    mask = sat_mask(q, method.time_p, method.p_model)
    assert mask.tolist() == [1.0, 0.0, 1.0]
    ce = F.cross_entropy(x_s.detach(), torch.tensor([0, 0, 1]), reduction="none")
    torch.testing.assert_close(terms["unsup_loss"].detach(), (ce * mask).mean() if mask_unsup else ce.mean())
    torch.testing.assert_close(terms["sup_loss"].detach(), F.cross_entropy(x_l.detach(), labeled["labels"]))
    torch.testing.assert_close(logs["mask_ratio"], torch.tensor(2 / 3))
    assert logs["pseudo_label_accuracy"].item() == pytest.approx(2 / 3)  # (0, 0, 1) vs monitor (0, 1, 1)

    # each term's routing
    for name, rows_s, grad_l in (("sup_loss", [], True), ("unsup_loss", [0, 2] if mask_unsup else [0, 1, 2], False),
                                 ("fairness_loss", [0, 2], False)):
        for x in (x_l, x_w, x_s):
            x.grad = None
        terms, _ = method.compute_terms(labeled, unlabeled, TrainState())
        terms[name].backward()
        assert x_w.grad is None or torch.count_nonzero(x_w.grad) == 0, f"{name}: gradient through the pseudo-label branch"
        assert (x_l.grad is not None and torch.count_nonzero(x_l.grad) > 0) == grad_l, name
        got = [] if x_s.grad is None else [i for i in range(3) if torch.count_nonzero(x_s.grad[i]) > 0]
        assert got == rows_s, f"{name}: strong rows with gradient {got}, expected {rows_s}"


def test_teacher_pseudo_labels_warm_up_gate_and_ema_rule():
    torch.manual_seed(0)
    model = TinyNet(in_dim=3)
    args = MultimodalFreeMatchArguments(start_epoch=2, ema_momentum=0.9)
    method = MultimodalFreeMatch(model, args)
    method.setup(type("Info", (), {"num_labels": 3})())
    labeled, unlabeled = hand_inputs()
    x_w = unlabeled["weak"]["pixel_values"]
    # the teacher (EMAN, eval mode) makes q: change the student and q is unchanged
    before = method.time_p.clone()
    terms, _ = method.compute_terms(labeled, unlabeled, TrainState(epoch=0))
    teacher_q = method.ema(pixel_values=x_w.detach()).logits.softmax(1)
    torch.testing.assert_close(method.time_p, 0.999 * before + 0.001 * teacher_q.max(1).values.mean())
    assert not any(p.requires_grad for p in method.ema.parameters())
    assert x_w.grad is None
    # the gate: loss = L_x while epoch <= start_epoch, then the full loss
    loss, logs = method.training_step(labeled, unlabeled, TrainState(epoch=2))
    torch.testing.assert_close(loss.detach(), logs["sup_loss"])
    assert logs["unsup_active"].item() == 0.0
    loss, logs = method.training_step(labeled, unlabeled, TrainState(epoch=3))
    torch.testing.assert_close(loss.detach(), logs["sup_loss"] + logs["unsup_loss"] + 0.001 * logs["fairness_loss"])
    assert logs["unsup_active"].item() == 1.0 and logs["unsup_loss"].item() > 0
    # EMAN: parameters AND BN running statistics averaged with m = 0.9, num_batches_tracked copied
    teacher_before = copy.deepcopy(method.ema.module.state_dict())
    with torch.no_grad():
        model.body.weight.add_(1.0)
    method.after_optimizer_step(TrainState(step=5))
    student = model.state_dict()
    for key, value in method.ema.module.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(value, 0.9 * teacher_before[key] + 0.1 * student[key], msg=key)
        else:
            assert torch.equal(value, student[key]), key
    assert method.eval_model() is model  # STiL evaluates the student


def test_usb_defaults_and_registration():
    assert get_method_class("freematch") is FreeMatch
    assert get_method_class("multimodal_freematch") is MultimodalFreeMatch
    usb, stil = FreeMatchArguments(), MultimodalFreeMatchArguments()
    assert (usb.mask_unsup, usb.pseudo_labels_from, usb.ema_mode, usb.eval_with_ema, usb.start_epoch) == (True, "student", "parameters", True, -1)
    assert (usb.lambda_u, usb.lambda_e, usb.sat_momentum, usb.ema_momentum) == (1.0, 0.001, 0.999, 0.999)
    assert (stil.mask_unsup, stil.pseudo_labels_from, stil.ema_mode, stil.eval_with_ema, stil.start_epoch) == (False, "teacher", "state", False, 10)
    assert stil.ema_momentum == 0.996 and stil.labeled_view == "hard"
    assert MultimodalFreeMatch.required_modalities == ("image", "tabular")
    assert (FreeMatch.preferred_model, MultimodalFreeMatch.preferred_model) == ("image-tiny", "multimodal-concat-tiny")
    with pytest.raises(ValueError, match="pseudo_labels_from"):
        FreeMatchArguments(pseudo_labels_from="ema")
    method = FreeMatch(LinearNet(), FreeMatchArguments())
    assert method.eval_model() is method.ema.module  # USB evaluates the EMA model


def test_state_dict_round_trip_continues_exactly():
    torch.manual_seed(0)
    method = FreeMatch(TinyNet(in_dim=3), FreeMatchArguments(sat_momentum=0.9))
    method.setup(type("Info", (), {"num_labels": 3})())
    labeled, unlabeled = hand_inputs()
    for _ in range(3):
        method.training_step(labeled, unlabeled, TrainState())
    state = {k: v.clone() for k, v in method.state_dict().items()}
    assert {"time_p", "p_model", "label_hist"} <= set(state)
    fresh = FreeMatch(TinyNet(in_dim=3), FreeMatchArguments(sat_momentum=0.9))
    fresh.setup(type("Info", (), {"num_labels": 3})())
    fresh.load_state_dict(state)
    for name in ("time_p", "p_model", "label_hist"):
        assert torch.equal(getattr(fresh, name), getattr(method, name)), name
    a, _ = method.training_step(labeled, unlabeled, TrainState())
    b, _ = fresh.training_step(labeled, unlabeled, TrainState())
    assert torch.equal(a, b)
    for name in ("time_p", "p_model", "label_hist"):
        assert torch.equal(getattr(fresh, name), getattr(method, name)), name


# --------------------------------------------------------------------------------- the unlabelled term trains
def test_short_run_lowers_the_loss_with_the_unlabelled_term_on():
    """Two Gaussian blobs per class, 2 labelled rows per class: the unlabelled CE is active and
    falls, the SAT threshold rises from 1/C, and the total loss falls."""
    torch.manual_seed(0)
    centres = torch.tensor([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 3.0]])
    y_u = torch.arange(3).repeat(30)
    x_u = centres[y_u] + torch.randn(90, 3)
    y_l = torch.arange(3).repeat(2)
    x_l = centres[y_l] + torch.randn(6, 3)
    model = TinyNet(in_dim=3)
    method = FreeMatch(model, FreeMatchArguments(ema_momentum=0.9))
    method.setup(type("Info", (), {"num_labels": 3})())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    losses, unsup = [], []
    for step in range(30):
        idx = torch.randint(0, 90, (30,))
        weak = x_u[idx] + 0.1 * torch.randn(30, 3)
        strong = x_u[idx] + 0.5 * torch.randn(30, 3)
        labeled, unlabeled = batches(x_l, y_l, weak, strong, y_u[idx])
        loss, logs = method.training_step(labeled, unlabeled, TrainState(step=step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        method.after_optimizer_step(TrainState(step=step))
        losses.append(loss.item())
        unsup.append(logs["unsup_loss"].item())
    assert min(unsup[:5]) > 0, "the unlabelled term never trained anything"
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10
    assert sum(unsup[-10:]) < sum(unsup[:10])
    assert method.time_p.item() > 1 / 3


# ------------------------------------------------------------------------------------------ through train.py
def _argv(out: Path, cache: Path, *extra: str):
    from tests._helpers import flags

    values = {
        "method": "freematch", "model": "image-tiny", "synthetic_task": "image", "output_dir": str(out),
        "dataset_cache_dir": str(cache), "synthetic_num_samples": "120", "synthetic_image_size": "32",
        "labeled_fraction": "0.2", "mu": "2", "per_device_train_batch_size": "4",
        "per_device_eval_batch_size": "64", "max_eval_samples": "32", "max_steps": "4", "eval_steps": "4", "save_steps": "2",
        "logging_steps": "1", "learning_rate": "0.01", "report_to": "none", "disable_tqdm": "true", "seed": "5",
        "ema_warmup": "true", "sat_momentum": "0.5",
    }
    return flags(values, *extra)


def test_train_py_resumes_the_threshold_state_exactly_and_exports(tmp_path, synthetic_cache):
    from safetensors.torch import load_file
    from transformers import AutoModel

    import modeling_stil  # noqa: F401
    from tests._helpers import run_train

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run_train(_argv(straight, synthetic_cache)) == 0
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / "checkpoint-2", resumed / "checkpoints" / "checkpoint-2")
    assert run_train(_argv(resumed, synthetic_cache, "--resume_from_checkpoint", "latest")) == 0
    a = load_file(straight / "checkpoints" / "checkpoint-4" / "model.safetensors")
    b = load_file(resumed / "checkpoints" / "checkpoint-4" / "model.safetensors")
    start = load_file(straight / "checkpoints" / "checkpoint-2" / "model.safetensors")
    assert a.keys() == b.keys() and {"time_p", "p_model", "label_hist"} <= set(a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert not torch.equal(a["time_p"], start["time_p"]), "the SAT state did not move"
    exported, reloaded = load_file(straight / "model.safetensors"), AutoModel.from_pretrained(straight)
    for name, tensor in reloaded.state_dict().items():
        if name in exported:
            assert torch.equal(tensor, exported[name]), name
    results = json.loads((straight / "eval_results.json").read_text())
    assert results["reload_check"]["matches"]
    history = [json.loads(l) for l in (straight / "logs" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in history if "sat_threshold" in r]
    assert train and any(r["unsup_loss"] > 0 for r in train)


def test_multimodal_freematch_refuses_an_image_only_model(tmp_path, synthetic_cache, capsys):
    from tests._helpers import run_train

    code = run_train(_argv(tmp_path / "run", synthetic_cache, "--method", "multimodal_freematch"))
    assert code != 0
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "multimodal_freematch" in err and "no tabular input" in err and "use a dataset with it" in err


def test_two_gloo_processes_hold_the_one_process_threshold_state(tmp_path, synthetic_cache):
    """accelerate launch --num_processes 2 (batch 4 each) == one process (batch 8): the SAT state is
    the global batch's. tabular-tiny has no BatchNorm, so the two runs train the same model."""
    from safetensors.torch import load_file

    from tests._helpers import accelerate_launch, run_train

    def argv(out, batch):
        return _argv(out, synthetic_cache, "--model", "tabular-tiny", "--synthetic_task", "multimodal",
                     "--per_device_train_batch_size", str(batch), "--optimizer", "sgd", "--learning_rate", "0.1",
                     "--warmup", "0", "--save_steps", "4", "--synthetic_num_samples", "200",
                     "--pseudo_labels_from", "teacher", "--ema_momentum", "0.5")

    assert run_train(argv(tmp_path / "one", 8)) == 0
    double = accelerate_launch(["train.py", *argv(tmp_path / "two", 4)], 2, Path(__file__).resolve().parents[1])
    assert double.returncode == 0, double.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "run_info.json").read_text())["num_processes"] == 2
    a = load_file(tmp_path / "one" / "checkpoints" / "checkpoint-4" / "model.safetensors")
    b = load_file(tmp_path / "two" / "checkpoints" / "checkpoint-4" / "model.safetensors")
    for key in ("time_p", "p_model", "label_hist"):
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    assert not torch.allclose(a["label_hist"], torch.full_like(a["label_hist"], 1 / a["label_hist"].numel()))
