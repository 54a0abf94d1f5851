"""scripts/compare_runs.py, the last step of `make train`: runs side by side, same data and rows checked."""

from __future__ import annotations

import json
import math

import pytest

from tests._helpers import load_script

compare = load_script("compare_runs")


def _run(path, method, test, labelled=(1, 2, 3), dataset="data/synth", validation=None):
    path.mkdir()
    (path / "eval_results.json").write_text(json.dumps({
        "dataset": dataset, "method": method, "best_step": 100,
        "validation": validation or {"accuracy": test - 0.01}, "test": {"accuracy": test}}))
    (path / "run_info.json").write_text(json.dumps({"labeled_indices": list(labelled)}))
    return path


def test_prints_each_run_and_the_pretraining_contrastive_loss(tmp_path, capsys):
    a = _run(tmp_path / "a", "supervised", 0.25)
    b = _run(tmp_path / "b", "stil", 0.5)
    tip = _run(tmp_path / "tip", "tip_pretrain", 0.0, labelled=(), validation={"loss_itc": 4.8, "loss_itm": 0.6,
                                                                           "loss_mtr": 1.0, "num_samples": 300})
    (tip / "run_config.yaml").write_text("per_device_eval_batch_size: 256\n")
    assert compare.main([f"sup={a}", f"STiL={b}", "--pretrain", str(tip)]) == 0
    out = capsys.readouterr().out
    assert "sup" in out and "0.250" in out and "0.500" in out and "best on test: STiL (0.500)" in out
    assert "same 3 labelled rows" in out
    chance = (256 * math.log(256) + 44 * math.log(44)) / 300
    assert f"validation contrastive loss 4.800 (chance, log of the batch size: {chance:.3f})" in out


def test_refuses_runs_on_other_rows_or_data(tmp_path):
    a = _run(tmp_path / "a", "supervised", 0.25)
    with pytest.raises(SystemExit, match="different labelled rows"):
        compare.main([f"a={a}", f"b={_run(tmp_path / 'b', 'stil', 0.5, labelled=(1, 2, 4))}"])
    with pytest.raises(SystemExit, match="different datasets"):
        compare.main([f"a={a}", f"c={_run(tmp_path / 'c', 'stil', 0.5, dataset='other')}"])
    with pytest.raises(SystemExit, match="does not exist"):
        compare.main([f"a={tmp_path / 'missing'}"])
