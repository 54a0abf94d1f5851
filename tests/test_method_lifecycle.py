"""The lifecycle every method shares, written once in the base class: declared EMAs (built after the
method's ``__init__``, updated after the optimizer step, checkpointed, evaluated), the unlabelled
terms' gate, the missing-unlabelled-batch check, and ``TrainState.step``'s one meaning."""

import pathlib
import subprocess
import sys

import pytest
import torch
from torch import nn

from modeling_stil.methods.base import EMAOption, SSLMethod, TrainState
from modeling_stil.methods.common import EMATeacher

METHODS_DIR = pathlib.Path(__file__).resolve().parents[1] / "modeling_stil" / "methods"


class Linear(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(2, 2)

    def forward(self, x):
        return self.layer(x)


class HeadAndTeacher(SSLMethod):
    """A toy method whose teacher averages the model plus a head built after ``super().__init__``."""

    name = "toy_head_and_teacher"
    unlabeled_views = {"weak": "weak"}

    def __init__(self, model, evaluate=True):
        super().__init__(model)
        self.head = nn.Linear(2, 2)
        self.evaluate = evaluate

    def network(self):
        return nn.Sequential(self.model, self.head)

    def ema_options(self):
        return [EMAOption("teacher", 0.5, warmup="tf", evaluate=self.evaluate, evaluated_part="0", averaged="network"),
                EMAOption("unused", enabled=False)]

    def training_step(self, labeled, unlabeled, state):
        return torch.zeros(()), {}


def test_declared_emas_are_built_after_init_updated_checkpointed_and_evaluated():
    method = HeadAndTeacher(Linear())
    assert isinstance(method.teacher, EMATeacher) and method.unused is None
    assert any(key.startswith("teacher.module.1.") for key in method.state_dict())  # the late head is averaged
    before = {k: v.clone() for k, v in method.teacher.module.state_dict().items()}
    with torch.no_grad():
        for p in method.parameters():
            if p.requires_grad:
                p.add_(1.0)
    method.after_optimizer_step(TrainState(step=0))  # warm-up momentum min(0.5, 1/10) = 0.1
    student = method.network().state_dict()
    for key, value in method.teacher.module.state_dict().items():
        torch.testing.assert_close(value, 0.1 * before[key] + 0.9 * student[key])
    assert method.eval_model() is method.teacher.module[0]
    student_evaluated = HeadAndTeacher(Linear(), evaluate=False)
    assert student_evaluated.eval_model() is student_evaluated.model


def test_ema_warmups_count_the_steps_they_say():
    state = TrainState(step=3, max_steps=100)
    assert EMAOption(momentum=0.99).momentum_at(state) == 0.99
    assert EMAOption(momentum=0.99, warmup="tf").momentum_at(state) == pytest.approx(4 / 13)
    assert EMAOption(momentum=0.99, warmup="tf", warmup_counts="before").momentum_at(state) == pytest.approx(3 / 12)
    assert EMAOption(momentum=0.99, warmup="mean_teacher", warmup_counts="before").momentum_at(state) == pytest.approx(2 / 3)
    assert EMAOption(momentum=0.99, span_fraction=0.1).momentum_at(state) == pytest.approx(0.9)
    with pytest.raises(ValueError, match="warmup"):
        EMAOption(warmup="cosine")
    with pytest.raises(ValueError, match="mode"):
        EMAOption(mode="buffers")


def test_a_missing_unlabelled_batch_stops_with_one_line():
    with pytest.raises(ValueError, match="toy_head_and_teacher needs an unlabelled batch"):
        HeadAndTeacher(Linear())({"labels": torch.zeros(1)}, None, TrainState())


def test_the_gate_reads_start_epoch_and_logs_unsup_active():
    class Gated(HeadAndTeacher):
        name = "toy_gated"

        def __init__(self, model):
            super().__init__(model)
            self.args = type("Args", (), {"start_epoch": 1, "start_fraction": None})()

    method, logs = Gated(Linear()), {}
    one = torch.ones(())
    assert method.gated_loss(one, [one, one], TrainState(epoch=1), logs) == 1 and logs["unsup_active"] == 0
    assert method.gated_loss(one, [one, one], TrainState(epoch=2), logs) == 3 and logs["unsup_active"] == 1
    assert logs["loss"] == 3


def test_no_method_file_builds_its_own_ema():
    """EMAs are declared (EMAOption) and built by the base class, nowhere else."""
    offenders = [path.name for path in METHODS_DIR.glob("*.py")
                 if path.name not in ("base.py", "common.py") and "EMATeacher(" in path.read_text()]
    assert offenders == []


def test_importing_the_views_alone_knows_tip_recipes():
    """TIP's view recipes live with the others in data_utils/views.py (no registration at method import)."""
    code = ("import sys, data_utils.views as v; assert 'modeling_stil.methods.tip_pretrain' not in sys.modules; "
            "print(sorted(k for k in v.RECIPES if k.startswith('tip_')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=pathlib.Path(__file__).resolve().parents[1]).stdout
    assert out.strip() == "['tip_clean_table', 'tip_corrupted_table', 'tip_image', 'tip_masked_table']"
