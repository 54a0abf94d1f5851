"""Trainer test doubles (tests/test_trainer.py, test_checkpoint_safety.py, test_save_total_limit.py): a
linear/dropout model on a fixed random table, a method with one supervised loss, a deterministic
stream, and a Trainer built from them."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from modeling_stil.methods.base import MethodArguments, SSLMethod
from modeling_stil.training.arguments import DataArguments, ModelArguments, RunArguments, TrainingArguments
from modeling_stil.training.trainer import Trainer

N_FEATURES, N_CLASSES, N_ROWS = 6, 3, 96


def toy_data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N_ROWS, N_FEATURES, generator=g)
    w = torch.randn(N_FEATURES, N_CLASSES, generator=g)
    y = (x @ w).argmax(-1)
    return x, y


class ToyModel(nn.Module):
    def __init__(self, dropout=0.2):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(N_FEATURES, 16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, N_CLASSES))

    def forward(self, continuous_values, **_):
        return {"logits": self.net(continuous_values)}


class ToyMethod(SSLMethod):
    name = "toy"
    nan_at_step: int | None = None

    def __init__(self, model, args=None):
        super().__init__(model, args)
        self.register_buffer("after_steps", torch.zeros((), dtype=torch.long))
        self.epoch_ends = 0

    def training_step(self, labeled, unlabeled, state):
        logits = self.model(**labeled["weak"])["logits"]
        loss = nn.functional.cross_entropy(logits, labeled["labels"])
        if self.nan_at_step is not None and state.step >= self.nan_at_step:
            loss = loss * float("nan")
        return loss, {"sup_loss": loss.detach(), "mask_ratio": torch.tensor(0.5)}

    def after_optimizer_step(self, state):
        self.after_steps += 1

    def on_epoch_end(self, state):
        self.epoch_ends += 1
        return {}


class ToyStream:
    """Deterministic: the batch of micro-step i depends only on (seed, i); shuffled per epoch."""

    def __init__(self, batch_size=8, seed=0):
        self.x, self.y = toy_data(seed)
        self.batch_size = batch_size
        self.seed = seed
        self.steps_per_epoch = N_ROWS // batch_size

    def iterate(self, start_step=0):
        step = start_step
        while True:
            epoch, pos = divmod(step, self.steps_per_epoch)
            order = np.random.default_rng([self.seed, epoch]).permutation(N_ROWS)
            idx = torch.as_tensor(order[pos * self.batch_size : (pos + 1) * self.batch_size])
            yield {"labels": self.y[idx], "index": idx, "weak": {"continuous_values": self.x[idx]}}, None
            step += 1


def eval_loader():
    x, y = toy_data(1)
    data = [{"continuous_values": x[i], "labels": y[i]} for i in range(len(y))]
    return torch.utils.data.DataLoader(data, batch_size=32)


def accuracy_metrics(task, predictions, references, num_labels):
    return {"accuracy": float((predictions.argmax(-1) == references).float().mean())}


def make_args(tmp_path, **overrides):
    training = dict(
        method="toy", output_dir=str(tmp_path / "run"), max_steps=8, eval_steps=4, logging_steps=2,
        learning_rate=0.05, warmup=2, report_to=["none"], disable_tqdm=True, seed=0,
    )
    training.update(overrides)
    return RunArguments(data=DataArguments(), model=ModelArguments(), training=TrainingArguments(**training), method=MethodArguments())


def make_trainer(tmp_path, method_cls=ToyMethod, batch_size=8, fingerprint=None, **overrides):
    torch.manual_seed(0)
    args = make_args(tmp_path, **overrides)
    method = method_cls(ToyModel())
    return Trainer(
        args, method, ToyStream(batch_size), {"validation": eval_loader(), "test": eval_loader()},
        task="classification", num_labels=N_CLASSES, fingerprint=fingerprint or {"method": "toy", "model": "a", "dataset": "d"},
        compute_metrics=accuracy_metrics,
    )


def weights(trainer):
    return {k: v.detach().clone() for k, v in trainer.unwrapped.state_dict().items()}
