"""Budget-aware schedules (issue 21): every gate, ramp and EMA momentum can be stated relative to
the run (``*_fraction`` of ``max_steps``) next to its absolute form; hand-computed values at given
steps for both forms, methods whose schedules follow ``max_steps``, and the originals' epoch-wise
learning-rate warm-up from 0."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from modeling_stil.methods.base import TrainState
from modeling_stil.methods.common import (
    check_fraction,
    ema_momentum,
    rampup_length,
    scheduled_momentum,
    span_momentum,
    unlabeled_gate_open,
)
from modeling_stil.methods.fixmatch import FixMatch, FixMatchArguments
from modeling_stil.methods.freematch import MultimodalFreeMatch, MultimodalFreeMatchArguments
from modeling_stil.methods.mean_teacher import MeanTeacherArguments
from modeling_stil.training.arguments import parse_run_arguments
from modeling_stil.training.optim import lr_lambda_factory
from modeling_stil.training.recipe_reading import ArgumentError
from tests.helpers.comatch import make as make_comatch
from tests.helpers.freematch import hand_inputs
from tests.helpers.nets import TinyNet


# ------------------------------------------------------------------------------ the shared pieces by hand
def test_gate_absolute_in_epochs_relative_in_steps():
    # absolute: the originals' "epoch > start_epoch"
    assert not unlabeled_gate_open(TrainState(step=500, epoch=10, max_steps=1000), start_epoch=10)
    assert unlabeled_gate_open(TrainState(step=0, epoch=11, max_steps=1000), start_epoch=10)
    assert unlabeled_gate_open(TrainState(step=0, epoch=0), start_epoch=-1)
    # relative: from step 0.3 x max_steps on, whatever the epoch
    assert not unlabeled_gate_open(TrainState(step=299, epoch=99, max_steps=1000), 10, start_fraction=0.3)
    assert unlabeled_gate_open(TrainState(step=300, epoch=0, max_steps=1000), 10, start_fraction=0.3)
    assert unlabeled_gate_open(TrainState(step=30, epoch=0, max_steps=100), 10, start_fraction=0.3)
    assert not unlabeled_gate_open(TrainState(step=29, epoch=0, max_steps=100), 10, start_fraction=0.3)
    assert unlabeled_gate_open(TrainState(step=0, max_steps=100), 10, start_fraction=0.0)


def test_ema_momentum_absolute_and_as_a_span_of_the_run():
    assert span_momentum(0.1, 1000) == pytest.approx(0.99)  # span 100 steps
    assert span_momentum(0.001, 2 ** 20) == pytest.approx(1 - 1 / 1048.576)  # ~ the papers' 0.999
    assert span_momentum(0.001, 500) == 0.0  # a span of half a step: the EMA copies the student
    assert scheduled_momentum(0.996, None, 1000) == 0.996
    assert scheduled_momentum(0.996, 0.05, 1000) == pytest.approx(0.98)
    # warm-up on top of either form: min(m, (1 + t) / (10 + t))
    assert ema_momentum(0.999, 0, warmup=True) == pytest.approx(0.1)
    assert ema_momentum(0.999, 90, warmup=True) == pytest.approx(91 / 100)
    assert ema_momentum(0.999, 90, warmup=True, span_fraction=0.02, max_steps=1000) == pytest.approx(0.91)
    assert ema_momentum(0.999, 5000, warmup=True, span_fraction=0.02, max_steps=1000) == pytest.approx(0.95)
    assert ema_momentum(0.999, 5000, warmup=False, span_fraction=0.02, max_steps=1000) == pytest.approx(0.95)
    assert ema_momentum(0.999, 5000, warmup=False) == 0.999


def test_ramp_length_and_fraction_checks():
    assert rampup_length(16384, None, 1000) == 16384
    assert rampup_length(16384, 0.3, 1000) == pytest.approx(300)
    check_fraction("x", None)
    check_fraction("x", 1.0)
    with pytest.raises(ValueError, match=r"start_fraction must be a fraction of max_steps in \[0, 1\], got 1.5"):
        check_fraction("start_fraction", 1.5)
    with pytest.raises(ArgumentError, match="ema_span_fraction must be a fraction of max_steps"):
        parse_run_arguments(["--method", "fixmatch", "--ema_span_fraction", "3"])


# ------------------------------------------------------------------------------ methods follow max_steps
def test_freematch_gate_follows_max_steps():
    torch.manual_seed(0)
    method = MultimodalFreeMatch(TinyNet(in_dim=3), MultimodalFreeMatchArguments(start_epoch=10, start_fraction=0.3))
    method.setup(type("Info", (), {"num_labels": 3})())
    labeled, unlabeled = hand_inputs()
    for max_steps, closed, opened in ((1000, 299, 300), (100, 29, 30)):
        _, logs = copy.deepcopy(method).training_step(labeled, unlabeled, TrainState(step=closed, epoch=50, max_steps=max_steps))
        assert logs["unsup_active"].item() == 0.0  # epoch 50 > start_epoch, but the relative gate rules
        loss, logs = copy.deepcopy(method).training_step(labeled, unlabeled, TrainState(step=opened, epoch=0, max_steps=max_steps))
        assert logs["unsup_active"].item() == 1.0
        torch.testing.assert_close(loss.detach(), logs["sup_loss"] + logs["unsup_loss"] + 0.001 * logs["fairness_loss"])


def test_comatch_contrast_ramp_follows_max_steps():
    method = make_comatch(lambda_c=10.0, lambda_c_rampup_fraction=0.5)
    assert method.contrast_weight(0, TrainState(step=100, max_steps=1000)) == pytest.approx(2.0)  # 10 x 100 / 500
    assert method.contrast_weight(0, TrainState(step=10, max_steps=100)) == pytest.approx(2.0)  # 10 x 10 / 50
    assert method.contrast_weight(0, TrainState(step=600, max_steps=1000)) == pytest.approx(10.0)
    paper = make_comatch(lambda_c=10.0, lambda_c_ramp=True)
    assert paper.contrast_weight(2, TrainState(step=100, max_steps=1000)) == 3.0  # min(epoch + 1, lambda_c)


@pytest.mark.parametrize("max_steps", [200, 1000])
def test_fixmatch_ema_span_follows_max_steps(max_steps):
    torch.manual_seed(0)
    model = TinyNet(in_dim=3)
    method = FixMatch(model, FixMatchArguments(ema_momentum=0.999, ema_warmup=False, ema_span_fraction=0.1))
    before = {k: v.clone() for k, v in method.ema.module.state_dict().items()}
    with torch.no_grad():
        model.body.weight.add_(1.0)
    method.after_optimizer_step(TrainState(step=50, max_steps=max_steps))
    m = 1 - 1 / (0.1 * max_steps)  # 0.95 for 200 steps, 0.99 for 1000
    torch.testing.assert_close(method.ema.module.body.weight, m * before["body.weight"] + (1 - m) * model.body.weight)


def test_mean_teacher_relative_keys_parse():
    args = MeanTeacherArguments(ema_span_fraction=0.05, eval_ema_span_fraction=0.1, rampup_fraction=0.3)
    assert scheduled_momentum(args.ema_decay, args.ema_span_fraction, 1000) == pytest.approx(0.98)


# ------------------------------------------------------------------------------ learning-rate warm-up
def test_lr_warmup_from_zero_per_epoch_like_the_originals():
    # 3 warm-up epochs of 10 steps, stepped per epoch: epoch 0 at 0, epoch 1 at 0.5, epoch 2 at the peak
    f = lr_lambda_factory("cosine", 100, 30, "epoch", 10, warmup_from_zero=True)
    assert [f(s) for s in (0, 9, 10, 19, 20, 29)] == [0.0, 0.0, 0.5, 0.5, 1.0, 1.0]
    assert f(30) == pytest.approx(1.0)  # the cosine starts at the peak (pl_bolts: epoch W is at base lr too)
    assert f(40) == pytest.approx(0.5 * (1 + math.cos(math.pi * 10 / 70)))
    # per step: k / (n - 1)
    g = lr_lambda_factory("constant", 100, 5, "step", 10, warmup_from_zero=True)
    assert [g(s) for s in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    # ours (default): (step + 1) / (warmup + 1), never 0
    h = lr_lambda_factory("constant", 100, 5, "step", 10)
    assert h(0) == pytest.approx(1 / 6) and h(4) == pytest.approx(5 / 6)


def test_paper_recipes_keep_the_epochwise_warmup_from_zero():
    run = parse_run_arguments(["recipes/stil_dvm_1pct.yaml"])
    assert run.training.warmup_from_zero and run.training.lr_scheduler_interval == "epoch" and run.training.warmup_epochs == 10
    assert run.method.start_fraction is None and run.method.start_epoch > 0  # absolute: the original's epochs


def test_an_absolute_schedule_key_the_recipes_relative_form_would_override_is_refused():
    """stil_synthetic.yaml sets start_fraction and ema_span_fraction: a command-line start_epoch or
    ema_momentum would be silently ignored (the relative form wins), so it is refused with the fix."""
    with pytest.raises(ArgumentError, match=r"--start_epoch 5 would have no effect.*--start_fraction null"):
        parse_run_arguments(["recipes/stil_synthetic.yaml", "--start_epoch", "5"])
    with pytest.raises(ArgumentError, match=r"--ema_momentum 0.99 would have no effect.*--ema_span_fraction null"):
        parse_run_arguments(["recipes/stil_synthetic.yaml", "--ema_momentum", "0.99"])
    cleared = parse_run_arguments(["recipes/stil_synthetic.yaml", "--start_epoch", "5", "--start_fraction", "null"])
    assert (cleared.method.start_epoch, cleared.method.start_fraction) == (5, None)
    assert parse_run_arguments(["recipes/stil_synthetic.yaml", "--start_fraction", "0.2"]).method.start_fraction == 0.2
    # no relative form in the recipe: the absolute key applies as before
    assert parse_run_arguments(["recipes/fixmatch_synthetic_image.yaml", "--ema_momentum", "0.99"]).method.ema_momentum == 0.99
