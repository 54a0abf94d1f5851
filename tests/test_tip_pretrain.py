"""tip_pretrain: each loss against an independent float64 re-computation from the spec, gradient
routing, hard negatives, label-free batches, deterministic evaluation, the probe, and the CLI path."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from modeling_stil.methods.base import TrainState
from modeling_stil.methods.tip_pretrain import TipPretrain, TipPretrainArguments, hard_negatives
from modeling_stil.presets import create_model
from modeling_stil.training.probe import linear_probe_accuracy
from tests._helpers import TOY_METADATA, TOY_SCHEMA, run_train

B = 6


def tiny_method(dtype=torch.float64):
    torch.manual_seed(0)
    model = create_model("tip-tiny", schema=TOY_SCHEMA, metadata=TOY_METADATA).to(dtype)
    model.eval()  # no dropout: the re-computation must see the same network
    return TipPretrain(model, TipPretrainArguments())


def batch(dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    size = 64
    image = {"pixel_values": torch.randn(B, 3, size, size, generator=g, dtype=dtype)}
    cat = torch.stack([torch.randint(0, 3, (B,), generator=g), torch.randint(0, 4, (B,), generator=g)], 1)
    con = torch.randn(B, 3, generator=g, dtype=dtype)
    none = torch.zeros(B, 5, dtype=torch.bool)
    clean = {"categorical_values": cat, "continuous_values": con, "missing_mask": none}
    corrupted = {"categorical_values": cat.roll(1, 0), "continuous_values": con * 0.5, "missing_mask": none}
    masked_fields = torch.zeros(B, 5, dtype=torch.bool)
    masked_fields[:, [0, 3]] = True
    masked_fields[::2, 4] = True
    masked = {"categorical_values": cat.masked_fill(masked_fields[:, :2], 0),
              "continuous_values": con.masked_fill(masked_fields[:, 2:], 0.0),
              "missing_mask": masked_fields.clone(), "masked_fields": masked_fields}
    return {"index": torch.arange(B), "image": image, "corrupted": corrupted, "masked": masked, "clean": clean}


def reference_losses(model, views, neg_table, neg_image, tau=0.1, lam=0.5):
    """Written from docs/methods.md, "tip_pretrain" with the model's building blocks, in float64."""
    img, tab, masked, clean = views["image"], views["corrupted"], views["masked"], views["clean"]
    tokens_i, pooled, _ = model.encode_image(img["pixel_values"])
    z_i = model.projector_imaging(pooled)
    tokens_t = model.encoder_tabular(tab["categorical_values"], tab["continuous_values"], tab["missing_mask"])
    z_t = model.projector_tabular(tokens_t[:, 0])
    z_i, z_t = z_i / z_i.norm(dim=1, keepdim=True), z_t / z_t.norm(dim=1, keepdim=True)
    s = z_i @ z_t.T / tau
    n = s.shape[0]
    log_rows = s - s.logsumexp(1, keepdim=True)
    log_cols = s.T - s.T.logsumexp(1, keepdim=True)
    itc = -(lam * log_rows.diag().mean() + (1 - lam) * log_cols.diag().mean())
    logits = []
    for tabs, imgs, label in ((tokens_t, tokens_i, 1), (tokens_t[neg_table], tokens_i, 0), (tokens_t, tokens_i[neg_image], 0)):
        out = model.itm_head(model.encoder_multimodal(tabs, imgs)[:, 0])
        logits.append((out, torch.full((n,), label)))
    itm = torch.stack([-(o.log_softmax(1)[torch.arange(n), y]) for o, y in logits]).mean()
    tokens_m = model.encoder_tabular(masked["categorical_values"], masked["continuous_values"], masked["missing_mask"])
    fused = model.encoder_multimodal(tokens_m, tokens_i)[:, 1:]
    cat_logits = model.predictor_tabular.cat_classifier(fused[:, :2])
    con_pred = model.predictor_tabular.con_regressor(fused[:, 2:]).squeeze(-1)
    offsets = torch.tensor([0, 3])
    m = masked["masked_fields"]
    cat_terms, con_terms = [], []
    for r in range(n):
        for j in range(2):
            if m[r, j]:
                cat_terms.append(-cat_logits[r, j].log_softmax(0)[clean["categorical_values"][r, j] + offsets[j]])
        for j in range(3):
            if m[r, 2 + j]:
                con_terms.append((con_pred[r, j] - clean["continuous_values"][r, j]) ** 2)
    mtr = (torch.stack(cat_terms).mean() + torch.stack(con_terms).mean()) / 2
    return {"loss_itc": itc, "loss_itm": itm, "loss_mtr": mtr}


def test_every_loss_matches_a_float64_recomputation():
    method = tiny_method()
    views = batch()
    torch.manual_seed(5)
    terms, _ = method.losses(method.model, views["image"], views["corrupted"], views["masked"], views["clean"])
    # the same draws again, for the reference
    with torch.no_grad():
        _, _, z_i = method.model.encode_image(views["image"]["pixel_values"])
        _, z_t = method.model.encode_tabular(**{k: v for k, v in views["corrupted"].items()})
        s = F.normalize(z_i, dim=1) @ F.normalize(z_t, dim=1).T / 0.1
    torch.manual_seed(5)
    neg_table, neg_image = hard_negatives(s)
    expected = reference_losses(method.model, views, neg_table, neg_image)
    for key, value in expected.items():
        torch.testing.assert_close(terms[key].double(), value.double(), rtol=1e-6, atol=1e-6, msg=key)
    loss, logs = method.training_step(None, views, TrainState())
    assert torch.isfinite(loss) and {"loss_itc", "loss_itm", "loss_mtr", "itm_accuracy"} <= set(logs)


def _grads(method, loss):
    method.zero_grad(set_to_none=True)
    loss.backward(retain_graph=True)
    return {n.split(".")[1] for n, p in method.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


def test_each_loss_trains_what_it_should_and_nothing_else():
    method = tiny_method(torch.float32)
    views = batch(torch.float32)
    terms, _ = method.losses(method.model, views["image"], views["corrupted"], views["masked"], views["clean"])
    assert _grads(method, terms["loss_itc"]) == {"encoder_imaging", "projector_imaging", "encoder_tabular", "projector_tabular"}
    assert _grads(method, terms["loss_itm"]) == {"encoder_imaging", "encoder_tabular", "encoder_multimodal", "itm_head"}
    assert _grads(method, terms["loss_mtr"]) == {"encoder_imaging", "encoder_tabular", "encoder_multimodal", "predictor_tabular"}


def test_hard_negatives_never_pick_the_positive_and_are_reproducible():
    s = torch.tensor([[9.0, 1.0, 0.0], [0.0, 9.0, 8.0], [5.0, 0.0, 9.0]])
    for seed in range(20):
        torch.manual_seed(seed)
        table, image = hard_negatives(s)
        assert (table != torch.arange(3)).all() and (image != torch.arange(3)).all()
    torch.manual_seed(3)
    a = hard_negatives(s)
    torch.manual_seed(3)
    b = hard_negatives(s)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    table, image = hard_negatives(s, sample=False)  # evaluation: the hardest negative
    assert table.tolist() == [1, 2, 0] and image.tolist() == [2, 0, 1]
    with pytest.raises(ValueError):
        hard_negatives(torch.zeros(1, 1))


def test_no_label_is_read_and_evaluation_is_deterministic():
    method = tiny_method(torch.float32)
    views = batch(torch.float32)
    assert "monitor_labels" not in views and "labels" not in views
    method.training_step(None, views, TrainState())
    eval_batch = {"labels": torch.zeros(B, dtype=torch.long), "eval": {**views["clean"], **views["image"]},
                  "masked": views["masked"]}
    a = method.evaluation_step(method.model, eval_batch)
    b = method.evaluation_step(method.model, eval_batch)
    assert a["loss"].shape == (B,) and all(torch.equal(a[k], b[k]) for k in a)
    features = method.probe_features(method.model, eval_batch)
    assert features.shape == (B, method.model.config.hidden_size)


def test_linear_probe_tells_useful_features_from_noise():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    useful = np.eye(3)[y] * 3 + rng.normal(size=(300, 3))
    assert linear_probe_accuracy(useful[:200], y[:200], useful[200:], y[200:])["probe_accuracy"] > 0.9
    noise = rng.normal(size=(300, 3))
    assert linear_probe_accuracy(noise[:200], y[:200], noise[200:], y[200:])["probe_accuracy"] < 0.55


def test_a_few_steps_lower_the_loss():
    method = tiny_method(torch.float32)
    method.train()
    views = batch(torch.float32)
    optimizer = torch.optim.Adam(method.parameters(), lr=1e-3)
    losses = []
    for _ in range(15):
        torch.manual_seed(0)
        loss, _ = method.training_step(None, views, TrainState())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_refuses_a_model_without_tip_heads():
    model = create_model("stil-tiny", schema=TOY_SCHEMA, metadata=TOY_METADATA)
    with pytest.raises(ValueError, match="TipModel"):
        TipPretrain(model)


def test_tip_then_stil_through_train_py(tmp_path, synthetic_cache):
    """TIP pretraining over every row (selected by validation loss, probed, exported), then STiL
    initialised from it with --init_from: the encoders STiL starts with are TIP's."""
    from safetensors.torch import load_file

    tip, stil = tmp_path / "tip", tmp_path / "stil"
    common = ["--dataset_cache_dir", str(synthetic_cache), "--synthetic_num_samples", "300", "--labeled_fraction", "0.2",
              "--per_device_eval_batch_size", "64", "--report_to", "none", "--disable_tqdm", "true", "--seed", "3"]
    assert run_train(["--method", "tip_pretrain", "--output_dir", str(tip), "--per_device_train_batch_size", "16",
                      "--max_steps", "4", "--eval_steps", "2", *common]) == 0
    results = json.loads((tip / "eval_results.json").read_text())
    assert results["metric_for_best_model"] == "loss" and results["reload_check"]["matches"]
    records = [json.loads(line) for line in (tip / "logs" / "metrics.jsonl").read_text().splitlines()]
    probe = [r for r in records if r["split"] == "probe"]
    assert probe and 0.0 <= probe[0]["probe_accuracy"] <= 1.0
    assert json.loads((tip / "config.json").read_text())["model_type"] == "tip"

    assert run_train(["--method", "stil", "--output_dir", str(stil), "--init_from", str(tip), "--per_device_train_batch_size", "4",
                      "--mu", "2", "--max_steps", "1", "--eval_steps", "1", "--learning_rate", "1e-12", *common]) == 0
    info = json.loads((stil / "run_info.json").read_text())
    loaded = info["init_report"]["loaded"]
    assert loaded and all(k.startswith(("encoder_imaging.", "encoder_tabular.")) for k in loaded)
    tip_weights, stil_weights = load_file(tip / "model.safetensors"), load_file(stil / "model.safetensors")
    key = next(k for k in loaded if k.endswith("weight") and "norm" not in k and "bn" not in k)
    torch.testing.assert_close(stil_weights[key], tip_weights[key], rtol=1e-6, atol=1e-8)


def test_tip_resume_is_exact(tmp_path, synthetic_cache):
    """6 steps straight vs stopped at 3 and resumed: identical exported weights (the hard-negative
    draws come from the checkpointed RNG, the label-free stream restarts at the right row)."""
    from safetensors.torch import load_file

    def argv(out, *extra):
        return ["--method", "tip_pretrain", "--output_dir", str(out), "--dataset_cache_dir", str(synthetic_cache),
                "--synthetic_num_samples", "300", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "64",
                "--max_steps", "6", "--eval_steps", "3", "--report_to", "none", "--disable_tqdm", "true", "--seed", "4", *extra]

    assert run_train(argv(tmp_path / "a")) == 0
    assert run_train(argv(tmp_path / "b", "--stop_after_steps", "3")) == 0
    assert run_train(argv(tmp_path / "b", "--resume_from_checkpoint", "latest")) == 0
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
