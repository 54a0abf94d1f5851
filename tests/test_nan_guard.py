"""The non-finite-loss guard stops with one line and never names as the last good checkpoint one whose
weights had already exploded."""

from __future__ import annotations

from tests._helpers import one_error_line
from tests._helpers import tiny_fixmatch_argv as argv
from tests._helpers import train_captured as train


def test_nan_guard_does_not_name_a_checkpoint_whose_weights_already_exploded(tmp_path, synthetic_cache):
    out = tmp_path / "run"
    code, _, err = train(argv(out, synthetic_cache, "--learning_rate", "1e9", "--save_steps", "1", "--logging_steps", "1",
                              "--max_steps", "6"))
    line = one_error_line(code, err)
    assert "non-finite loss" in line
    good = line.split("last good checkpoint:", 1)[1]
    assert not good.strip().startswith(str(out / "checkpoints" / "checkpoint-1")), line
    assert "after checkpoint-1" in line and "lower --learning_rate (now 1e+09" in line
