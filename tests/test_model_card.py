"""The model card states the settings the run used, as run_config.yaml records them."""

from __future__ import annotations

import re

import pytest
import yaml

from modeling_stil.training.arguments import parse_run_arguments
from modeling_stil.training.model_card import build_model_card, card_recipe


def card_for(args, steps):
    return build_model_card(
        model_name="run", model_type="stil", method=args.training.method, task="classification", dataset="data",
        labeled_description="10 labelled rows", test_metrics={"accuracy": 0.5}, validation_metrics=None,
        recipe=card_recipe(args), versions={}, selection="best accuracy", steps=steps, best_step=steps,
        global_batch=8, unlabeled_batch=None, num_processes=1, plots=[], repo_or_path="run",
    )


def training_line(card) -> str:
    return re.search(r"^- optimizer: .*$", card.text, re.M).group(0)


@pytest.mark.parametrize("flags", [
    # the schedule at its defaults (cosine per step, warm-up 0.05): card_recipe leaves those keys out
    ["--optimizer", "adam", "--max_steps", "40"],
    ["--optimizer", "sgd", "--lr_scheduler", "multistep", "--lr_milestones", "[0.5]", "--warmup_epochs", "2",
     "--lr_scheduler_interval", "epoch", "--max_steps", "40"],
])
def test_card_states_the_resolved_optimizer_and_schedule_of_run_config(tmp_path, flags):
    args = parse_run_arguments(flags)
    config = yaml.safe_load(args.save_yaml(tmp_path / "run_config.yaml").read_text())  # what the run folder holds
    line = training_line(card_for(args, steps=40))
    assert "None" not in line, line
    optimizer = f"{config['optimizer']} (weight decay {config['weight_decay']}"
    if config["optimizer"] == "sgd":
        optimizer += f", momentum {config['momentum']}, nesterov"
    schedule = f"{config['lr_scheduler']} per {config['lr_scheduler_interval']}"
    if config["lr_scheduler"] == "multistep":
        schedule += f" (times {config['lr_gamma']} at {config['lr_milestones']})"
    if config["warmup_epochs"] is not None:
        warmup = f"{config['warmup_epochs']} epochs"
    else:
        warmup = f"{config['warmup']} of the steps ({round(config['warmup'] * config['max_steps'])} steps)"
    assert line == (f"- optimizer: {optimizer}), learning rate {config['learning_rate']}, schedule {schedule}, "
                    f"warm-up {warmup}")
