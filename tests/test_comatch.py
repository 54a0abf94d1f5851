"""CoMatch / Multimodal CoMatch (modeling_stil/methods/comatch.py) against docs/methods.md
("comatch", USB's comatch): queue writes with both overflow rules
and the pseudo-label graph by hand, every term re-computed independently from the network outputs,
gradient routing per term and per teacher flavour, the contrastive-weight ramp, the momentum encoder,
save/resume of the queues, bad input, a short run whose loss falls with the unlabelled terms on, one
tiny train.py run that resumes bit-exactly, exports and reloads, and (one accelerate launch) the
bank/queue/DA state of all four Match methods under 2 gloo processes == 1 process."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from modeling_stil.methods.base import DataInfo, TrainState
from modeling_stil.methods.comatch import CoMatch, CoMatchArguments, MultimodalCoMatch, MultimodalCoMatchArguments, enqueue_rows
from modeling_stil.presets import create_model
from tests._helpers import TOY_METADATA, TOY_SCHEMA, flags, run_train
from tests.helpers.comatch import K, N_L, N_U, batches, make

ROOT = Path(__file__).resolve().parents[1]
STATE = TrainState(step=100, epoch=50, max_steps=1000, num_labels=3)


# ------------------------------------------------------------------------------ pieces by hand
@pytest.mark.parametrize(
    "ptr, n, rule, positions, new_ptr",
    [
        (3, 4, "truncate", {3: 0, 4: 1}, 0),  # the originals: rows past the end dropped, restart at 0
        (3, 4, "wrap", {3: 0, 4: 1, 0: 2, 1: 3}, 2),
        (2, 3, "truncate", {2: 0, 3: 1, 4: 2}, 0),  # exactly fills: pointer back to 0
        (1, 2, "truncate", {1: 0, 2: 1}, 3),
        (0, 7, "truncate", {0: 0, 1: 1, 2: 2, 3: 3, 4: 4}, 0),
        (0, 7, "wrap", {2: 2, 3: 3, 4: 4, 0: 5, 1: 6}, 2),  # the newest 5 kept
    ],
)
def test_queue_writes_by_hand(ptr, n, rule, positions, new_ptr):
    queue = -torch.ones(5, 2)
    pointer = torch.tensor(ptr)
    items = torch.arange(n, dtype=torch.float32)[:, None].repeat(1, 2)
    enqueue_rows(queue, pointer, items, rule)
    expected = -torch.ones(5, 2)
    for slot, item in positions.items():
        expected[slot] = item
    assert torch.equal(queue, expected) and int(pointer) == new_ptr


def test_pseudo_label_graph_and_contrastive_loss_by_hand():
    p = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    s = torch.tensor([[2.0, 0.5, 1.0], [0.3, 1.5, -1.0]])
    # Q = p p^T = [[.82, .26], [.26, .68]], diagonal 1; threshold 0.5 keeps the self-loops only
    loss, q_hat = CoMatch.graph_loss(p, s[:, :2], 0.5)
    assert torch.equal(q_hat, torch.eye(2))
    expected = -(torch.log(torch.softmax(s[0, :2], 0)[0] + 1e-7) + torch.log(torch.softmax(s[1, :2], 0)[1] + 1e-7)) / 2
    torch.testing.assert_close(loss, expected)
    # threshold 0.2 keeps the 0.26 edges: rows [1, .26] / 1.26 and [.26, 1] / 1.26
    _, q_hat = CoMatch.graph_loss(p, s[:, :2], 0.2)
    torch.testing.assert_close(q_hat, torch.tensor([[1, 0.26], [0.26, 1]]) / 1.26)
    # memory block: one past pseudo-label [1, 0] -> p @ past^T = [.9, .2]
    loss, q_hat = CoMatch.graph_loss(p, s, 0.5, past_probs=torch.tensor([[1.0, 0.0]]))
    torch.testing.assert_close(q_hat, torch.tensor([[1, 0, 0.9], [0, 1, 0]]) / torch.tensor([[1.9], [1.0]]))
    ls0 = torch.log_softmax(s[0], 0)
    expected = (-(ls0[0] + 0.9 * ls0[2]) / 1.9 - torch.log(torch.softmax(s[1], 0)[1] + 1e-7)) / 2
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_queue_sizes_follow_usb_and_stil():
    usb = CoMatch(create_model("image-tiny", metadata=TOY_METADATA), CoMatchArguments())
    usb.setup(DataInfo(num_labeled=20, num_labels=3, labeled_batch_size=64, unlabeled_batch_size=448))
    assert usb.queue_w.shape == (5 * 512, 16) and usb.probs_xu.shape == (2560, 3)  # queue_batch (uratio + 1) B
    stil = MultimodalCoMatch(create_model("multimodal-concat-tiny", schema=TOY_SCHEMA, metadata=TOY_METADATA))
    stil.setup(DataInfo(num_labeled=20, num_labels=3, labeled_batch_size=64, unlabeled_batch_size=448))
    assert stil.queue_size == 2560
    torch.testing.assert_close(stil.queue_s.norm(dim=1), torch.ones(2560))  # unit rows; queue_w is not normalised


# ------------------------------------------------------------------------------ the step, independently
def expected_terms(method, labeled, unlabeled, state):
    a = method.args
    probe = copy.deepcopy(method)
    with torch.no_grad():
        z_l, z_s0, g_s0, g_s1, z_w, g_l, g_w = (t.double() for t in probe.forward_views(labeled, unlabeled))
    p = z_w.softmax(1)
    history = method.DA.queue.buffer.double().clone()
    history[int(method.DA.queue.ptr)] = p.mean(0)  # the ring buffer's next slot
    p = p / history.mean(0)
    p = p / p.sum(1, keepdim=True)
    qw, pxu = method.queue_w.double(), method.probs_xu.double()
    rows = []
    for b in range(N_U):
        w = torch.exp(g_w[b] @ qw.T / a.temperature)
        rows.append(a.alpha * p[b] + (1 - a.alpha) * (w / w.sum()) @ pxu)
    p = torch.stack(rows)
    unsup = sum(-(p[b] * torch.log_softmax(z_s0[b], 0)).sum() for b in range(N_U) if p[b].max() >= a.threshold) / N_U
    qs, pu = method.queue_s.double(), method.probs_u.double()
    contrast = 0.0
    for i in range(N_U):
        q = [1.0 if i == j else float(p[i] @ p[j]) for j in range(N_U)] + [float(p[i] @ pu[k]) for k in range(K)]
        sims = [float(g_s0[i] @ g_s1[j]) / a.temperature for j in range(N_U)] + [float(g_s0[i] @ qs[k]) / a.temperature for k in range(K)]
        q = torch.tensor([v if v >= a.contrast_threshold else 0.0 for v in q], dtype=torch.float64)
        e = torch.exp(torch.tensor(sims, dtype=torch.float64))
        contrast += -(q / q.sum() * torch.log(e / e.sum() + 1e-7)).sum() / N_U
    return F.cross_entropy(z_l, labeled["labels"]), unsup, contrast


@pytest.mark.parametrize("multimodal", [False, True])
def test_every_term_matches_an_independent_computation(multimodal):
    method = make(multimodal, threshold=0.3, contrast_threshold=0.3, start_epoch=-1, smoothing_start_epoch=0,
                  smoothing_start_step=0, memory_graph=True)
    for seed in (1, 2):  # filled queues with real pseudo-labels
        method.compute_terms(*batches(multimodal, seed), STATE)
    labeled, unlabeled = batches(multimodal)
    sup, unsup, contrast = expected_terms(method, labeled, unlabeled, STATE)
    terms, logs = method.compute_terms(labeled, unlabeled, STATE)
    torch.testing.assert_close(terms["sup_loss"].double(), sup, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(terms["unsup_loss"].double(), torch.as_tensor(unsup, dtype=torch.float64), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(terms["contrast_loss"].double(), torch.as_tensor(contrast, dtype=torch.float64), rtol=1e-4, atol=1e-5)
    assert terms["unsup_loss"] > 0 and logs["graph_edges"] > 1, "the test needs confident rows and graph edges"


def test_enqueue_writes_labelled_then_weak_rows_and_the_strong_queue():
    method = make(multimodal=True, start_epoch=-1)
    labeled, unlabeled = batches(True)
    probe = copy.deepcopy(method)
    with torch.no_grad():
        _, _, _, g_s1, _, g_l, g_w = probe.forward_views(labeled, unlabeled)
    method.compute_terms(labeled, unlabeled, STATE)
    # 4 labelled + 6 weak rows at 0..9, pointer 10; the strong queue 6 rows, pointer 6
    torch.testing.assert_close(method.queue_w[:N_L], g_l)
    torch.testing.assert_close(method.queue_w[N_L:N_L + N_U], g_w)
    assert torch.equal(method.probs_xu[:N_L], F.one_hot(labeled["labels"], 3).float())
    torch.testing.assert_close(method.probs_xu[N_L:N_L + N_U].sum(1), torch.ones(N_U))
    torch.testing.assert_close(method.queue_s[:N_U], g_s1)
    assert int(method.queue_ptr_w) == 10 and int(method.queue_ptr_s) == 6
    method.compute_terms(labeled, unlabeled, STATE)  # 10 more rows in a 12-row queue: 2 fit, restart at 0
    assert int(method.queue_ptr_w) == 0 and int(method.queue_ptr_s) == 0
    torch.testing.assert_close(method.queue_w[10:12], g_l[:2])


def test_smoothing_and_contrast_weight_follow_the_gates():
    method = make(multimodal=True)  # STiL: smoothing from epoch 11, weight min(epoch + 1, 10)
    assert method.contrast_weight(11) == 10.0 and method.contrast_weight(2) == 3.0
    assert make(lambda_c=2.0).contrast_weight(0) == 2.0  # USB: constant
    labeled, unlabeled = batches(True)
    with torch.no_grad():
        method.probs_xu.copy_(F.one_hot(torch.arange(K) % 3, 3).float())  # smoothing would move p
    before, after = copy.deepcopy(method), copy.deepcopy(method)
    terms, _ = before.compute_terms(labeled, unlabeled, TrainState(step=0, epoch=10, max_steps=100, num_labels=3))
    after.compute_terms(labeled, unlabeled, TrainState(step=0, epoch=11, max_steps=100, num_labels=3))
    # the strong queue stores the (smoothed) pseudo-label, the weak queue the un-smoothed one
    weak_rows = slice(N_L, N_L + N_U)
    torch.testing.assert_close(before.probs_u[:N_U], before.probs_xu[weak_rows])  # epoch 10: no smoothing
    torch.testing.assert_close(after.probs_xu[weak_rows], before.probs_xu[weak_rows])
    smoothed = 0.9 * after.probs_xu[weak_rows] + 0.1 * torch.softmax(
        before.queue_w[weak_rows] @ method.queue_w.T / 0.1, dim=1) @ method.probs_xu
    torch.testing.assert_close(after.probs_u[:N_U], smoothed, rtol=1e-4, atol=1e-5)  # epoch 11: alpha p + (1 - alpha) A probs_xu
    a = (terms,)
    loss, _ = copy.deepcopy(method).training_step(labeled, unlabeled, TrainState(step=0, epoch=10, max_steps=100, num_labels=3))
    torch.testing.assert_close(loss, a[0]["sup_loss"])  # only L_x while epoch <= start_epoch


# ------------------------------------------------------------------------------ gradient routing
def _grads(method, term, labeled, unlabeled):
    views = {"labeled": labeled["labeled"], "weak": unlabeled["weak"], "strong_0": unlabeled["strong_0"], "strong_1": unlabeled["strong_1"]}
    for v in views.values():
        v["pixel_values"].requires_grad_(True)
    method.zero_grad()
    terms, _ = method.compute_terms(labeled, unlabeled, STATE)
    terms[term].backward()
    assert all(p.grad is None for p in method.ema.parameters()), "the momentum encoder never gets gradient"
    named = dict(method.named_parameters())
    has = lambda prefix: any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in named.items() if n.startswith(prefix))  # noqa: E731
    got = {k: v["pixel_values"].grad is not None and v["pixel_values"].grad.abs().sum() > 0 for k, v in views.items()}
    return got, has


@pytest.mark.parametrize("teacher", ["online", "momentum"])
def test_gradient_routing_of_each_term(teacher):
    base = make(teacher=teacher, threshold=0.0, contrast_threshold=0.0, start_epoch=-1, memory_graph=True)
    got, has = _grads(copy.deepcopy(base), "sup_loss", *batches())
    assert got == {"labeled": True, "weak": False, "strong_0": False, "strong_1": False}
    assert has("model.classifier") and not has("model.head")
    got, has = _grads(copy.deepcopy(base), "unsup_loss", *batches())
    assert got == {"labeled": False, "weak": False, "strong_0": True, "strong_1": False}
    assert has("model.classifier") and not has("model.head")
    got, has = _grads(copy.deepcopy(base), "contrast_loss", *batches())
    # USB: both strong embeddings carry gradient; STiL/salesforce: u_s1 is the momentum encoder's
    assert got == {"labeled": False, "weak": False, "strong_0": True, "strong_1": teacher == "online"}
    assert has("model.head") and has("model.encoder_imaging") and not has("model.classifier")


def test_momentum_encoder_is_a_parameter_ema_in_train_mode():
    method = make(multimodal=True)
    assert method.ema.mode == "parameters" and method.ema.module.training and method.eval_model() is method.model
    before = {k: v.clone() for k, v in method.ema.module.named_parameters()}
    with torch.no_grad():
        for p in method.model.parameters():
            p.add_(0.1)
    method.after_optimizer_step(STATE)
    student = dict(method._net().named_parameters())
    for key, value in method.ema.module.named_parameters():
        torch.testing.assert_close(value, 0.996 * before[key] + 0.004 * student[key])
    usb = make()
    assert not usb.ema.module.training and usb.eval_model() is usb.ema.module.model


def test_queue_and_da_state_survive_save_and_resume_bit_exactly(tmp_path):
    from safetensors.torch import load_file, save_file

    method = make(multimodal=True, start_epoch=-1, smoothing_start_epoch=0)
    for seed in range(2):
        method.training_step(*batches(True, seed), STATE)
    save_file({k: v.contiguous() for k, v in method.state_dict().items()}, tmp_path / "s.safetensors")
    resumed = make(multimodal=True, start_epoch=-1, smoothing_start_epoch=0)
    resumed.load_state_dict(load_file(tmp_path / "s.safetensors"))
    la = method.training_step(*batches(True, 7), STATE)[0]
    lb = resumed.training_step(*batches(True, 7), STATE)[0]
    assert torch.equal(la, lb)
    for key in ("queue_w", "probs_xu", "queue_ptr_w", "queue_s", "probs_u", "queue_ptr_s", "DA.queue.buffer", "DA.queue.ptr"):
        assert torch.equal(method.state_dict()[key], resumed.state_dict()[key]), key


# ------------------------------------------------------------------------------ bad input
def test_bad_input_stops_with_one_line():
    mm = create_model("multimodal-concat-tiny", schema=TOY_SCHEMA, metadata=TOY_METADATA)
    with pytest.raises(ValueError, match="multimodal_comatch"):
        CoMatch(mm, CoMatchArguments())
    method = CoMatch(create_model("image-tiny", metadata=TOY_METADATA), CoMatchArguments(queue_size=10**9))
    with pytest.raises(ValueError, match="GiB.*max_queue_gib"):
        method.setup(DataInfo(num_labeled=10, num_labels=3))
    with pytest.raises(ValueError, match="predicts 3 classes but the data has 5"):
        CoMatch(create_model("image-tiny", metadata=TOY_METADATA), CoMatchArguments()).setup(DataInfo(num_labeled=10, num_labels=5))
    with pytest.raises(ValueError, match="queue_overflow"):
        CoMatchArguments(queue_overflow="spill")
    mmatch = create_model("mmatch-tiny", schema=TOY_SCHEMA, metadata=TOY_METADATA)
    with pytest.raises(ValueError, match="projection head"):
        MultimodalCoMatch(mmatch, MultimodalCoMatchArguments())


# ------------------------------------------------------------------------------ the loss falls
@pytest.mark.parametrize("name", ["simmatch", "comatch"])
def test_short_synthetic_run_lowers_the_loss_with_the_unlabelled_terms_on(name):
    """12 Adam steps on 3 fixed batches of a separable synthetic task (class = colour channel): the total
    loss falls while the unlabelled terms are in it and non-zero from the first step."""
    from modeling_stil.methods.simmatch import SimMatch, SimMatchArguments

    torch.manual_seed(0)
    model = create_model("image-tiny", metadata=TOY_METADATA, backbone="test_vit")
    common = dict(threshold=0.0, start_epoch=-1, distribution_alignment=False)
    if name == "simmatch":
        method = SimMatch(model, SimMatchArguments(instance_start_epoch=0, **common))
        unsup_terms = ("unsup_loss", "in_loss")
    else:
        method = CoMatch(model, CoMatchArguments(queue_size=K, contrast_threshold=0.5, **common))
        unsup_terms = ("unsup_loss", "contrast_loss")
    method.setup(DataInfo(num_labeled=8, num_labels=3, labeled_batch_size=N_L, unlabeled_batch_size=N_U))
    method.train()

    def coloured(labels, g):
        x = 0.2 * torch.rand(len(labels), 3, 32, 32, generator=g)
        x[torch.arange(len(labels)), labels] += 0.8
        return {"pixel_values": x}

    data = []
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        y, yu = torch.randint(0, 3, (N_L,), generator=g), torch.randint(0, 3, (N_U,), generator=g)
        labeled = {"labels": y, "position": torch.arange(N_L) + N_L * (seed % 2), "labeled": coloured(y, g)}
        unlabeled = {"weak": coloured(yu, g), "strong": coloured(yu, g), "strong_0": coloured(yu, g), "strong_1": coloured(yu, g)}
        data.append((labeled, unlabeled))
    optimizer = torch.optim.Adam([p for p in method.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for step in range(12):
        state = TrainState(step=step, epoch=1, max_steps=12, num_labels=3)
        loss, logs = method.training_step(*data[step % 3], state)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        method.after_optimizer_step(state)
        assert all(logs[t] > 0 for t in unsup_terms), logs
        losses.append(float(loss.detach()))
    assert sum(losses[-3:]) < 0.7 * sum(losses[:3]), losses


# ------------------------------------------------------------------------------ through train.py
def _argv(out, cache, *extra):
    values = {
        "method": "multimodal_comatch", "model": "multimodal-concat-tiny", "start_epoch": "-1", "smoothing_start_epoch": "0",
        "threshold": "0.3", "contrast_threshold": "0.3", "queue_size": "20",
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
    for key in ("queue_w", "probs_xu", "queue_ptr_w", "queue_s", "probs_u", "queue_ptr_s", "DA.queue.buffer"):
        assert torch.equal(ca[key], cb[key]), key
    # 4 steps x 8 unlabelled rows into 20 slots, the originals' overflow: 8, 16, (24: 4 rows dropped) 0, 8
    assert int(ca["queue_ptr_s"]) == 8 and ca["probs_u"].abs().sum() > 0
    assert json.loads((straight / "eval_results.json").read_text())["reload_check"]["matches"]
    records = [json.loads(line) for line in (straight / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("contrast_loss", 0) > 0 for r in records) and any("pseudo_label_accuracy" in r for r in records)


# ------------------------------------------------------------------------------ 2 gloo processes
def test_two_gloo_processes_keep_the_same_bank_queue_and_da_state_as_one(tmp_path):
    """One 2-process gloo launch (torch.distributed.run, as train.py under ``accelerate launch --cpu``) runs tests/match_state_worker.py: every rank
    steps the four methods on its half of each global batch (state.gather / reduce_sum over gloo) and
    rank 0 steps a copy on the whole global batch with identity gathers; their state must agree."""
    # what train.py's CPU launcher does under `accelerate launch --cpu --num_processes 2`: torch.distributed.run
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1", "--master_addr=127.0.0.1",
               f"--master_port={29900 + os.getpid() % 90}", str(ROOT / "tests" / "match_state_worker.py"), str(tmp_path / "out.json")]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", ACCELERATE_USE_CPU="True")
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "out.json").read_text())
    assert sorted(result) == ["comatch", "multimodal_comatch", "multimodal_simmatch", "simmatch"]
    for name, keys in result.items():
        assert keys, name
        for key, (max_diff, written) in keys.items():
            assert max_diff <= 1e-5, f"{name}.{key} differs between 1 and 2 processes by {max_diff}"
            # pointers may legitimately be back at 0 (the originals restart after an overflow)
            assert written or "ptr" in key, f"{name}.{key} was never written (the comparison would be vacuous)"
    assert not math.isnan(sum(d for keys in result.values() for d, _ in keys.values()))
