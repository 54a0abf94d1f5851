"""The tiny TIP / STiL presets learn their task on the built-in data in a few hundred steps.

Before issue 21 they did not: TIP's contrastive loss stayed at log(batch) (the tabular CLS was the
same for every row at d = 32 with TIP's 0.02 init, the timm image encoder zero-initialised its
residual branches, and the 32 px images were cropped to 8 % of the picture) and STiL's image head
stayed at chance. Each run here is short (a 1,000-row synthetic dataset, one thread): both tests together took 47 s of
CPU time (user) on the shared machine.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from modeling_stil.training import fit
from tests._helpers import fresh_accelerate_state

DATA = dict(synthetic_task="multimodal", synthetic_num_samples=1000, synthetic_image_size=32, seed=0,
            report_to=[], plots=False, export=False, disable_tqdm=True, logging_steps=10)


def _fit(recipe, tmp_path, name, **overrides):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with fresh_accelerate_state():
            return fit(recipe, dataset_cache_dir=str(tmp_path / "cache"), output_dir=str(tmp_path / name),
                       **{**DATA, **overrides})
    finally:
        torch.set_num_threads(threads)


def _train_log(tmp_path, name):
    rows = [json.loads(line) for line in (tmp_path / name / "logs" / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("split") == "train"]


@pytest.mark.slow
def test_tip_tiny_contrastive_loss_falls_well_below_log_batch(tmp_path):
    results = _fit("recipes/tip_synthetic.yaml", tmp_path, "tip", max_steps=150, eval_steps=150,
                   per_device_train_batch_size=32, per_device_eval_batch_size=200, warmup=0.0)
    chance = math.log(200)  # the 200 validation rows in one batch
    itc = results["validation"]["loss_itc"]
    print(f"TIP tiny, 150 steps: validation ITC {itc:.3f} (chance {chance:.3f})")
    # measured (seed 0, 1 thread): validation 4.98 against log(200) = 5.30; training batches 2.95
    # against log(32) = 3.47. Before issue 21 the training loss stayed at log(batch).
    assert itc < chance - 0.2, f"validation ITC {itc:.3f} is not below log(batch) = {chance:.3f}"
    train = _train_log(tmp_path, "tip")
    assert train[-1]["loss_itc"] < math.log(32) - 0.3


@pytest.mark.slow
def test_stil_tiny_learns_with_every_head(tmp_path):
    """From scratch, 30 % of 600 rows labelled, labelled cross-entropy of the three heads plus L_cc and
    L_ds (the unlabelled terms gated off): every head's training loss leaves log(20), the image
    head's included, and every head is above chance on validation."""
    results = _fit("recipes/stil_synthetic.yaml", tmp_path, "stil", init_from=None, labeled_fraction=0.3,
                   max_steps=200, eval_steps=200, start_epoch=1000, start_fraction=None,  # the recipe's relative gate off too
                   # the original's view without its image half, so the image head sees the pictures as they are: this
                   # tests that the preset learns; the recipe's full view (crop down to 8 %, jitter, blur) is the suite's
                   # to measure
                   augmentation_rate=0.0,
                   per_device_eval_batch_size=200)
    validation = results["validation"]
    last = _train_log(tmp_path, "stil")[-3:]
    train = {k: sum(r[k] for r in last) / len(last) for k in ("sup_loss_multimodal", "sup_loss_image", "sup_loss_tabular")}
    print("STiL tiny, 200 steps: train", {k: round(v, 3) for k, v in train.items()},
          "validation", {k: round(v, 3) for k, v in validation.items() if "accuracy" in k})
    # measured (seed 0, 1 thread): training CE multimodal 2.33, image 2.52, tabular 2.63 (log 20 = 3.00;
    # before issue 21 the image head stayed at 3.00); validation accuracy 0.11-0.145, image head 0.075-0.115
    # (with the CLUB estimators at the original's width 512 the image head measured 0.075: at 200 steps
    # from scratch on 32 px it generalises only a little, so its validation bar is above chance, not more)
    assert all(v < math.log(20) - 0.25 for v in train.values()), train
    assert validation["accuracy"] > 0.08, validation  # chance 0.05; 200 rows: 0.08 is 2 standard errors above
    assert validation["image/accuracy"] > 0.05, validation
