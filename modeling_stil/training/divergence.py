"""The divergence guard: stop on a non-finite loss, naming the step, the loss terms and the last
checkpoint that is still usable.

The trainer shows the guard every micro-step's loss (`observe`, on the device: no host sync) and each
checkpoint it writes (`checkpoint_written`); at the points where a step's results are consumed (a log
line, an evaluation, a checkpoint) it asks `failure_message` (one collective, one host sync).

A checkpoint is "good" when the step right after it, computed with its weights, was still sane: a
finite loss within 10x (or +10) of the first step's, and a gradient norm within 100x of the first
step's. A loss that turns NaN often exploded a few hundred steps earlier, so the newest checkpoint
is not always the one to resume from.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import torch


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN/inf: the run stops, naming the step, the loss terms and the last good checkpoint."""


class DivergenceGuard:
    """Tracks the first non-finite micro-step and the loss / gradient norm after each checkpoint."""

    def __init__(self, device: torch.device, *, gradient_accumulation_steps: int, learning_rate: float,
                 max_grad_norm: float | None, reduce_max: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.learning_rate = learning_rate
        self.max_grad_norm = max_grad_norm
        self.reduce_max = reduce_max  # max over processes (None: one process)
        self.micro_step = torch.tensor(0, device=device)
        self.nan_step = torch.tensor(-1, device=device)  # the first micro-step with a non-finite loss
        self.nan_terms: dict[str, torch.Tensor] = {}  # that micro-step's loss terms
        # the loss / gradient norm of the first step, and of the step right after each checkpoint
        self.reference_probe: dict[str, torch.Tensor] | None = None
        self.checkpoint_probes: list[tuple[Path, dict[str, torch.Tensor]]] = []
        self._probe_next: Path | None = None

    def start(self, micro_step: int) -> None:
        """Count micro-steps from ``micro_step`` (a resumed run's)."""
        self.micro_step.fill_(micro_step)

    def observe(self, loss: torch.Tensor, logs: dict[str, torch.Tensor]) -> None:
        """One micro-step's loss and logged terms (kept on the device, no sync)."""
        self._track_nonfinite(loss, logs)
        self._record_probe(loss, logs)
        self.micro_step += 1

    def checkpoint_written(self, path: Path) -> None:
        """The next micro-step's loss and gradient norm tell whether ``path`` is usable."""
        self._probe_next = path

    def failure_message(self, last_checkpoint: Path | None) -> str | None:
        """None while every loss was finite; else the sentence the run stops with (collective: call on
        every process)."""
        flag = self.nan_step.clone()
        if self.reduce_max is not None:
            flag = self.reduce_max(flag)
        step = int(flag.item())
        if step < 0:
            return None
        terms = {k: float(v.item()) for k, v in self.nan_terms.items()}
        good, diverged = self.last_sane_checkpoint()
        if good is not None:
            where = f"{good} (the step after it still had a sane loss and gradient norm)"
        elif last_checkpoint is not None:
            where = "none: the loss or gradient norm had already exploded after every checkpoint written"
        else:
            where = "none (no checkpoint was written before it)"
        message = (
            f"non-finite loss at step {step + 1} (optimisation step {step // self.gradient_accumulation_steps + 1}); "
            f"loss terms: {json.dumps(terms)}; last good checkpoint: {where}"
        )
        if diverged:
            message += f"; {diverged}"
        message += (
            f"; the training diverged: lower --learning_rate (now {self.learning_rate:g}; try 10x lower)"
            + ("" if self.max_grad_norm else " and clip gradients with --max_grad_norm 1.0")
            + (", then resume from the good checkpoint or start again" if good is not None else ", then start again")
        )
        return message

    def last_sane_checkpoint(self) -> tuple[Path | None, str]:
        """(the newest checkpoint whose next step had a sane loss and gradient norm, a sentence on where the
        values exploded). Sane: finite, loss within 10x (or +10) of the first step's, gradient norm within 100x."""
        if self.reference_probe is None:
            return None, ""
        reference = {k: float(v.item()) for k, v in self.reference_probe.items()}
        good = None
        for path, probe_t in self.checkpoint_probes:
            probe = {k: float(v.item()) for k, v in probe_t.items()}
            if not is_sane(probe, reference):
                shown = ", ".join(f"{k} {v:.3g}" for k, v in probe.items())
                first = ", ".join(f"{k} {v:.3g}" for k, v in reference.items())
                return good, f"after {path.name} the step had {shown} (first step: {first}), so its weights are already unusable"
            if path.is_dir():
                good = path
        return good, ""

    def _track_nonfinite(self, loss: torch.Tensor, logs: dict[str, torch.Tensor]) -> None:
        bad = ~torch.isfinite(loss.detach().float())
        first = bad & (self.nan_step < 0)
        self.nan_step = torch.where(first, self.micro_step, self.nan_step)
        terms = {"loss": loss.detach().float().reshape(())}
        terms.update({k: v.detach().float().reshape(-1)[0] for k, v in logs.items() if v.numel() >= 1})
        for key, value in terms.items():
            value = value.to(self.nan_step.device)
            previous = self.nan_terms.get(key, torch.zeros_like(value))
            self.nan_terms[key] = torch.where(first, value, previous)

    def _record_probe(self, loss: torch.Tensor, logs: dict[str, torch.Tensor]) -> None:
        """Keep the loss and gradient norm of the first step and of the step after each checkpoint."""
        if self.reference_probe is not None and self._probe_next is None:
            return
        probe = {"loss": loss.detach().float().reshape(())}
        if isinstance(logs.get("grad_norm"), torch.Tensor):
            probe["grad_norm"] = logs["grad_norm"].detach().float().reshape(())
        if self.reference_probe is None:
            self.reference_probe = probe
        if self._probe_next is not None:
            self.checkpoint_probes.append((self._probe_next, probe))
            self._probe_next = None


def is_sane(probe: dict[str, float], reference: dict[str, float]) -> bool:
    """A step's loss / gradient norm against the first step's (see the module docstring)."""
    loss, ref_loss = probe["loss"], reference.get("loss", float("nan"))
    if not math.isfinite(loss):
        return False
    if math.isfinite(ref_loss) and abs(loss) > max(10.0 * abs(ref_loss), abs(ref_loss) + 10.0):
        return False
    grad, ref_grad = probe.get("grad_norm"), reference.get("grad_norm")
    if grad is not None:
        if not math.isfinite(grad):
            return False
        if ref_grad is not None and math.isfinite(ref_grad) and grad > 100.0 * max(ref_grad, 1e-3):
            return False
    return True
