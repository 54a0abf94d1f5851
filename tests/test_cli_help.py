"""train.py --help: on stdout, with each option's choices, grouped, and the chosen method's own arguments."""

from __future__ import annotations

from tests._helpers import train_captured as train


def test_help_goes_to_stdout_with_choices_and_the_method_arguments():
    code, out, err = train(["--method", "fixmatch", "--help"])
    assert code == 0 and err == ""
    assert "--optimizer {adamw,adam,sgd}" in out and "--mixed_precision {no,fp16,bf16} or None" in out
    assert "training arguments:" in out and "data arguments:" in out
    assert "method arguments (fixmatch):" in out and "--threshold" in out
    code, out, _ = train(["-h"])
    assert code == 0 and "--method fixmatch --help" in out and "fixmatch" in out
