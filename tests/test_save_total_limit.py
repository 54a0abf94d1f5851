"""--save_total_limit counts the best checkpoint among the kept ones when it is one of the newest."""

from __future__ import annotations


def test_save_total_limit_counts_the_best_when_it_is_among_the_newest(tmp_path):
    from modeling_stil.training import checkpointing as ckpt
    from tests.helpers.toy_trainer import make_trainer

    trainer = make_trainer(tmp_path, max_steps=12, eval_steps=2, save_total_limit=2, metric_for_best_model="last")
    trainer.train()
    names = [p.name for p in ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")]
    assert names == ["checkpoint-10", "checkpoint-12"]
