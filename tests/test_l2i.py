"""L2I-O / L2I-L (modeling_stil/methods/l2i.py): the exact meta-gradient against a float64 hand-written
double backward, the closed form and finite differences; gradient routing of every loss term;
BatchNorm buffers in the virtual step; no ground truth of unlabelled rows in phase 1; the label
memory's save/resume; one tiny run per task through train.py (resume, export, reload)."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modeling_stil.methods.base import TrainState
from modeling_stil.methods.consistency import consistency_loss as inner_consistency_loss
from modeling_stil.methods.l2i import (
    L2IL,
    L2IO,
    L2ILArguments,
    L2IOArguments,
    imputation_meta_gradient,
    trainable_parameters,
)
from tests._helpers import flags, run_train
from tests.helpers.l2i import EPS, make_batch, make_method, to_float


def reference_forward(w, x):
    """The same network written by hand as a function of its weights (train-mode BN)."""
    h = x @ w["fc1.weight"].T + w["fc1.bias"]
    mean, var = h.mean(0), h.var(0, unbiased=False)
    h = (h - mean) / torch.sqrt(var + EPS) * w["bn.weight"] + w["bn.bias"]
    return torch.tanh(h) @ w["fc2.weight"].T + w["fc2.bias"]


def state_for(task, lr=0.01, phase=1):
    return TrainState(step=5, max_steps=100, task=task, num_labels=3, learning_rate=lr, phase=phase)


def reference_targets(p, unlabeled, task, std):
    """Hand-written T(p): softmax, or the u2 -> u1 view transfer p + (t1 - t2) / sigma."""
    if task == "classification":
        return p.softmax(-1)
    delta = (unlabeled["student"]["translation"] - unlabeled["teacher"]["translation"]).repeat(1, p.shape[1] // 2)
    return p + delta / std


def reference_hypergradient(weights, p_or_phi, variant, task, labeled, unlabeled, eta, std, squash=False):
    """Plain autograd double backward, float64, no functional_call and no helper of l2i.py."""
    u1, u2 = unlabeled["student"]["pixel_values"], unlabeled["teacher"]["pixel_values"]
    if variant == "O":
        p = reference_forward(p_or_phi, u2)
    else:
        p = p_or_phi
    y_hat = reference_targets(p, unlabeled, task, std)
    z_u = reference_forward(weights, u1)
    if task == "classification":
        inner = ((z_u.softmax(-1) - y_hat) ** 2).sum()  # SUM reduction
    elif squash:
        inner = ((torch.tanh(z_u) - torch.tanh(y_hat)) ** 2).mean()
    else:
        inner = ((z_u - y_hat) ** 2).mean()
    names = list(weights)
    g = torch.autograd.grad(inner, [weights[n] for n in names], create_graph=True)
    fast = {n: weights[n].detach() - eta * gn for n, gn in zip(names, g)}
    out = reference_forward(fast, labeled["meta"]["weak"]["pixel_values"])
    y_v = labeled["meta"]["labels"]
    outer = F.cross_entropy(out, y_v) if task == "classification" else ((out - y_v) ** 2).mean()
    wrt = [p_or_phi[n] for n in names] if variant == "O" else [p_or_phi]
    return torch.autograd.grad(outer, wrt), outer


def _weights(method):
    return {n: p.detach().clone().requires_grad_(True) for n, p in trainable_parameters(method.model).items()}


# ------------------------------------------------------------------------------ exact hypergradient
@pytest.mark.parametrize("task", ["classification", "landmarks"])
def test_l2i_o_meta_gradient_equals_float64_double_backward_reference(task):
    method = make_method(L2IO, task)
    labeled, unlabeled = make_batch(task, d_out=3 if task == "classification" else 4)
    state = state_for(task)
    eta = method.inner_lr(state)
    assert eta == pytest.approx((50.0 if task == "classification" else 10.0) * 0.01)
    std = method.target_std
    (h_ref), outer_ref = reference_hypergradient(_weights(method), _weights(method), "O", task, labeled, unlabeled, eta,
                                                 std, squash=(task != "classification"))
    loss, logs = method.training_step(labeled, unlabeled, state)
    assert float(loss.detach()) == 0.0  # a zero-valued surrogate that carries h
    loss.backward()
    names = list(trainable_parameters(method.model))
    for name, ref in zip(names, h_ref):
        got = dict(method.model.named_parameters())[name].grad
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-12, msg=name)
    assert sum(float(r.abs().sum()) for r in h_ref) > 1e-6  # the meta-gradient is not trivially zero
    torch.testing.assert_close(logs["meta_loss"], outer_ref.detach(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("task", ["classification", "landmarks"])
def test_l2i_l_label_gradient_equals_reference_closed_form_and_finite_differences(task):
    method = make_method(L2IL, task)
    d_out = 3 if task == "classification" else 4
    labeled, unlabeled = make_batch(task, d_out=d_out)
    state = state_for(task)
    eta = method.inner_lr(state)
    std = method.target_std
    p0 = method.initial_labels(unlabeled, task)
    with torch.no_grad():  # p0 = the student's own prediction on u2 (batch statistics)
        torch.testing.assert_close(p0, reference_forward(_weights(method), unlabeled["teacher"]["pixel_values"]))

    # 1. float64 hand-written double backward vs the shared helper
    (ref,), _ = reference_hypergradient(_weights(method), p0.detach().clone().requires_grad_(True), "L", task, labeled,
                                        unlabeled, eta, std)
    params = trainable_parameters(method.model)
    p = p0.detach().clone().requires_grad_(True)
    z_u = method.student_view_logits(unlabeled)
    inner = inner_consistency_loss(z_u, method.imputed_targets(p, unlabeled, task), task,
                                   method.args.resolved_reduction(task))
    (got,), _ = imputation_meta_gradient(params, inner, eta, method.meta_loss_fn(labeled, task), [p])
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-13)
    assert float(ref.abs().max()) > 1e-8

    # 2. closed form: dL/dy_hat_i = 2 c eta (J_i v); classification a = softmax, c = 1 (sum)
    w = _weights(method)
    u1 = unlabeled["student"]["pixel_values"]
    fast = {n: (t - 0).detach().requires_grad_(True) for n, t in w.items()}
    with torch.enable_grad():
        y_hat_ref = reference_targets(p0.detach(), unlabeled, task, std)
        a = (lambda out: out.softmax(-1)) if task == "classification" else (lambda out: out)
        inner_w = ((a(reference_forward(w, u1)) - y_hat_ref) ** 2)
        inner_w = inner_w.sum() if task == "classification" else inner_w.mean()
        g = torch.autograd.grad(inner_w, list(w.values()))
        fast = {n: (w[n] - eta * gn).detach().requires_grad_(True) for n, gn in zip(w, g)}
        out = reference_forward(fast, labeled["meta"]["weak"]["pixel_values"])
        y_v = labeled["meta"]["labels"]
        outer = F.cross_entropy(out, y_v) if task == "classification" else ((out - y_v) ** 2).mean()
        v = torch.autograd.grad(outer, list(fast.values()))
    names = list(w)
    primal = tuple(w[n].detach() for n in names)
    _, jv = torch.autograd.functional.jvp(lambda *ws: a(reference_forward(dict(zip(names, ws)), u1)), primal, v)
    c = 1.0 if task == "classification" else 1.0 / p0.numel()
    d_yhat = 2 * c * eta * jv
    if task == "classification":
        s = p0.detach().softmax(-1)
        closed = s * (d_yhat - (s * d_yhat).sum(-1, keepdim=True))  # (diag(s) - s s^T) d_yhat
    else:
        closed = d_yhat  # the view transfer has identity Jacobian
    torch.testing.assert_close(got, closed, rtol=1e-8, atol=1e-13)

    # 3. central finite differences along a random direction
    direction = torch.randn_like(p0)

    def meta_loss_at(labels):
        q = labels.detach().clone().requires_grad_(True)
        fresh = make_method(L2IL, task)
        zz = fresh.student_view_logits(unlabeled)
        inn = inner_consistency_loss(zz, fresh.imputed_targets(q, unlabeled, task), task,
                                     fresh.args.resolved_reduction(task))
        _, value = imputation_meta_gradient(trainable_parameters(fresh.model), inn, eta,
                                            fresh.meta_loss_fn(labeled, task), [q])
        return float(value.detach())

    h = 1e-5
    numeric = (meta_loss_at(p0 + h * direction) - meta_loss_at(p0 - h * direction)) / (2 * h)
    assert numeric == pytest.approx(float((got * direction).sum()), rel=1e-5, abs=1e-11)


# ------------------------------------------------------------------------------ the methods' phase 1
def test_l2i_l_phase_one_updates_labels_and_trains_the_student_only():
    task = "classification"
    method = make_method(L2IL, task)
    labeled, unlabeled = make_batch(task)
    state = state_for(task)
    loss, logs = method.training_step(labeled, unlabeled, state)
    assert loss.requires_grad and float(loss.detach()) > 0
    loss.backward()
    student = [p.grad for p in method.model.parameters()]
    assert all(g is not None for g in student) and sum(float(g.abs().sum()) for g in student) > 0
    assert all(p.grad is None for p in method.teacher.parameters())
    assert method.eval_ema is None or all(p.grad is None for p in method.eval_ema.parameters())
    assert float(logs["label_update_norm"]) > 0  # the label step moved the labels

    # L_u* equals the hand computation with p* = p - dL/dp
    fresh = make_method(L2IL, task)
    p0 = fresh.initial_labels(unlabeled, task)
    (ref,), _ = reference_hypergradient(_weights(fresh), p0.detach().clone().requires_grad_(True), "L", task, labeled,
                                        unlabeled, fresh.inner_lr(state), None)
    z_u = reference_forward(_weights(fresh), unlabeled["student"]["pixel_values"])
    expected = ((z_u.softmax(-1) - (p0 - ref).softmax(-1)) ** 2).mean()
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-10, atol=0)


@pytest.mark.parametrize("cls", [L2IO, L2IL])
def test_phase_zero_is_mean_teacher_and_phase_one_ignores_monitor_labels(cls):
    from modeling_stil.methods.mean_teacher import MeanTeacher, MeanTeacherArguments

    task = "landmarks"
    method = make_method(cls, task)
    labeled, unlabeled = make_batch(task, d_out=4)
    unlabeled["student"]["monitor_labels"] = unlabeled["monitor_labels"] + 1.0
    mt = MeanTeacher(copy.deepcopy(method.model), MeanTeacherArguments()).double()
    mt.teacher.load_state_dict(method.teacher.state_dict())
    mt.target_std = method.target_std
    a, _ = copy.deepcopy(method).training_step(labeled, unlabeled, state_for(task, phase=0))
    b, _ = mt.training_step(labeled, unlabeled, state_for(task, phase=0))
    torch.testing.assert_close(a, b, rtol=0, atol=0)

    def phase_one(unl):
        m = copy.deepcopy(method)
        loss, _ = m.training_step(labeled, unl, state_for(task))
        loss.backward()
        return [p.grad.clone() for p in m.model.parameters()]

    perturbed = copy.deepcopy(unlabeled)
    perturbed["monitor_labels"] = perturbed["monitor_labels"] * -3 + 7
    perturbed["student"]["monitor_labels"] = perturbed["student"]["monitor_labels"] * -3 + 7
    for x, y in zip(phase_one(unlabeled), phase_one(perturbed)):
        assert torch.equal(x, y)


@pytest.mark.parametrize("updates", [True, False])
def test_virtual_forwards_never_touch_real_bn_stats(updates):
    task = "classification"
    method = make_method(L2IO, task, meta_updates_bn_stats=updates)
    labeled, unlabeled = make_batch(task)
    before = {k: v.clone() for k, v in method.model.named_buffers()}
    loss, _ = method.training_step(labeled, unlabeled, state_for(task))
    after = dict(method.model.named_buffers())
    # the real stats change exactly by the one u1 forward (or not at all)
    expected = copy.deepcopy(method.model)
    expected.load_state_dict({**expected.state_dict(), **before})
    if updates:
        expected(**unlabeled["student"])
    for name, value in expected.named_buffers():
        assert torch.equal(after[name], value), name
    assert int(after["bn.num_batches_tracked"]) == (1 if updates else 0)


def test_eval_ema_each_phase_for_landmarks_only_by_default():
    for task, expected in (("classification", False), ("landmarks", True)):
        method = make_method(L2IL, task)
        assert method.args.resolved_eval_ema_each_phase(task) is expected
        labeled, unlabeled = make_batch(task, d_out=3 if task == "classification" else 4)
        ema_before = [p.clone() for p in method.eval_ema.parameters()]
        with torch.no_grad():
            for p in method.model.parameters():
                p.add_(1.0)  # student moved by phase 0
        method.training_step(labeled, unlabeled, state_for(task))
        moved = any(not torch.equal(a, b) for a, b in zip(ema_before, method.eval_ema.parameters()))
        assert moved is expected


def test_label_memory_round_trip_and_frames():
    from modeling_stil.methods.base import DataInfo

    task = "landmarks"
    method = make_method(L2IL, task, label_memory=True)
    method.setup(DataInfo(num_train=20, num_labels=4, task=task, target_std=[2.0, 0.5, 1.0, 4.0]))
    method.double()
    labeled, unlabeled = make_batch(task, d_out=4)
    method.training_step(labeled, unlabeled, state_for(task))
    rows = unlabeled["index"]
    assert bool(method.label_seen[rows].all()) and int(method.label_seen.sum()) == len(rows)
    # the stored labels come back in view 2's frame: the next p0 of these rows is the stored p*
    p0 = method.initial_labels(unlabeled, task)
    stored = method._canonical(method.label_table[rows].double(), unlabeled, task, to_view=True)
    torch.testing.assert_close(p0.detach(), stored)
    # a state_dict round trip is bit-exact
    clone = make_method(L2IL, task, label_memory=True)
    clone.setup(DataInfo(num_train=20, num_labels=4, task=task, target_std=[2.0, 0.5, 1.0, 4.0]))
    clone.double()
    clone.load_state_dict(method.state_dict())
    assert torch.equal(clone.label_table, method.label_table) and torch.equal(clone.label_seen, method.label_seen)


# ------------------------------------------------------------------------------ end to end (train.py)
def _argv(out, cache, method, task, *extra):
    values = {
        "method": method, "output_dir": str(out), "dataset_cache_dir": str(cache), "synthetic_task": task,
        "synthetic_num_samples": "160", "labeled_fraction": "0.2", "mu": "1",
        "per_device_train_batch_size": "8", "per_device_eval_batch_size": "64", "max_steps": "4",
        "eval_steps": "2", "save_steps": "2", "logging_steps": "2", "learning_rate": "0.002", "report_to": "none",
        "disable_tqdm": "true", "seed": "3", "optimizer": "adam", "weight_decay": "0", "max_grad_norm": "0",
        "lr_scheduler": "constant", "warmup": "0", "plots": "false", "save_total_limit": "3",
    }
    if task == "image":
        values.update({"model": "wrn-tiny", "synthetic_image_size": "32"})
    else:
        values.update({"model": "tcdcnn", "synthetic_image_size": "60", "standardize_targets": "true", "optimizer": "sgd", "learning_rate": "0.003",
                       "nesterov": "false", "lambda_u": "1"})
    return flags(values, *extra)


@pytest.mark.parametrize("method, task, memory", [("l2i_o", "image", False), ("l2i_l", "landmarks", True)])
def test_end_to_end_resumes_exports_and_reloads(tmp_path, synthetic_cache, method, task, memory):
    from safetensors.torch import load_file

    extra = ("--label_memory", "true") if memory else ()
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert run_train(_argv(full, synthetic_cache, method, task, *extra)) == 0  # checkpoints at steps 2 and 4, export
    # a second run resumes from the first run's step-2 checkpoint and must reach the same step-4 state
    shutil.copytree(full / "checkpoints" / "checkpoint-2", resumed / "checkpoints" / "checkpoint-2")
    assert run_train(_argv(resumed, synthetic_cache, method, task, *extra, "--export", "false",
                           "--resume_from_checkpoint", "latest")) == 0
    a = load_file(full / "checkpoints" / "checkpoint-4" / "model.safetensors")
    b = load_file(resumed / "checkpoints" / "checkpoint-4" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    if memory:
        assert int(a["label_seen"].sum()) > 0
    results = json.loads((full / "eval_results.json").read_text())
    assert results["reload_check"]["matches"]
    rows = [json.loads(line) for line in (full / "logs" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["split"] == "train"]
    assert all("meta_loss" in r and "phase0/sup_loss" in r for r in train_rows)
    key = "meta_grad_norm" if method == "l2i_o" else "label_update_norm"
    assert all(r[key] > 0 for r in train_rows)


# ------------------------------------------------------------------------------ two processes (gloo)
def test_two_processes_average_the_meta_gradient_and_share_the_label_memory(tmp_path):
    """Two gloo processes (torch.distributed.run, what train.py starts under `accelerate launch --cpu
    --num_processes 2`) running tests/_l2i_ddp_worker.py (see its docstring)."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(29900 + os.getpid() % 90), str(root / "tests" / "_l2i_ddp_worker.py"), str(tmp_path)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(root), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2) if (tmp_path / f"rank{r}.json").exists()]
    assert done.returncode == 0, (reports, done.stderr[-3000:])
    assert len(reports) == 2
    for report in reports:
        for entry in report.values():
            assert entry["max_deviation"] < 1e-5  # DDP's gradient == mean of the per-rank meta-gradients
            assert entry["local_vs_mean"] > 1e-7  # and the ranks' gradients really differed
        assert report["l2i_l"]["rows_seen"] == 12 and report["l2i_l"]["tables_equal"]


class TinyAttention(nn.Module):
    """One self-attention layer through scaled_dot_product_attention (fused kernels lack double backward)."""

    def __init__(self, d=8, d_out=3):
        super().__init__()
        self.qkv = nn.Linear(1, 3 * d)
        self.head = nn.Linear(d, d_out)

    def forward(self, pixel_values=None, **unused):
        q, k, v = self.qkv(pixel_values.float().unsqueeze(-1)).chunk(3, dim=-1)
        out = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)).squeeze(1)
        return SimpleNamespace(logits=self.head(out.mean(dim=1)))


@pytest.mark.parametrize("cls", [L2IO, L2IL])
def test_meta_step_runs_through_attention(cls):
    torch.manual_seed(0)
    args = (L2IOArguments if cls is L2IO else L2ILArguments)()
    method = cls(TinyAttention(), args).train()
    labeled, unlabeled = (to_float(b) for b in make_batch("classification", d_in=5))
    loss, logs = method.training_step(labeled, unlabeled, state_for("classification"))
    loss.backward()
    grads = [p.grad for p in method.model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
