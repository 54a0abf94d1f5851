"""The divergence guard on its own: which checkpoint it names as the last good one, and when."""

from __future__ import annotations

import torch

from modeling_stil.training.divergence import DivergenceGuard


def guard():
    return DivergenceGuard(torch.device("cpu"), gradient_accumulation_steps=2, learning_rate=0.1, max_grad_norm=None)


def step(g, loss, grad_norm=1.0):
    g.observe(torch.tensor(loss), {"sup_loss": torch.tensor(loss), "grad_norm": torch.tensor(grad_norm)})


def test_finite_losses_never_fail(tmp_path):
    g = guard()
    for loss in (2.0, 1.5, 1.2):
        step(g, loss)
    assert g.failure_message(None) is None


def test_names_the_newest_checkpoint_whose_next_step_was_still_sane(tmp_path):
    good, exploded = tmp_path / "checkpoint-2", tmp_path / "checkpoint-4"
    good.mkdir()
    exploded.mkdir()
    g = guard()
    g.start(10)  # a resumed run counts micro-steps on from its checkpoint's
    step(g, 2.0)  # the first step: the reference
    g.checkpoint_written(good)
    step(g, 1.0)  # sane after checkpoint-2
    g.checkpoint_written(exploded)
    step(g, 1.0, grad_norm=1e6)  # the gradient norm exploded after checkpoint-4
    step(g, float("nan"))  # micro-step 13
    message = g.failure_message(exploded)
    assert message.startswith("non-finite loss at step 14 (optimisation step 7)")
    assert '"sup_loss": NaN' in message
    assert f"last good checkpoint: {good} " in message
    assert "after checkpoint-4 the step had loss 1, grad_norm 1e+06" in message
    assert "lower --learning_rate (now 0.1; try 10x lower) and clip gradients with --max_grad_norm 1.0" in message
    assert message.endswith(", then resume from the good checkpoint or start again")


def test_without_a_checkpoint_it_says_start_again():
    g = guard()
    step(g, float("inf"))
    message = g.failure_message(None)
    assert "last good checkpoint: none (no checkpoint was written before it)" in message
    assert message.endswith(", then start again")
