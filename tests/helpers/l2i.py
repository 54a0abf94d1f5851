"""Shared by the L2I tests and their two-process worker (tests/_l2i_ddp_worker.py): a float64 network
with train-mode BatchNorm, one L2I-O/L2I-L method on it, and a hand-made batch (a meta view on the
labelled side, student/teacher views on the unlabelled side, translations for landmarks)."""

from types import SimpleNamespace

import torch
from torch import nn

from modeling_stil.methods.l2i import L2IO, L2ILArguments, L2IOArguments

EPS = 1e-5


class TanhBatchNormNet(nn.Module):
    """Linear -> BatchNorm1d (batch statistics in train mode) -> tanh -> Linear, float64."""

    def __init__(self, d_in=5, hidden=7, d_out=3):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.bn = nn.BatchNorm1d(hidden, eps=EPS, momentum=0.1)
        self.fc2 = nn.Linear(hidden, d_out)

    def forward(self, pixel_values=None, **unused):
        return SimpleNamespace(logits=self.fc2(torch.tanh(self.bn(self.fc1(pixel_values)))))


def make_batch(task, b=6, d_in=5, d_out=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = lambda: torch.randn(b, d_in, generator=g, dtype=torch.float64)  # noqa: E731
    if task == "classification":
        y_v = torch.randint(0, d_out, (b,), generator=g)
        mon = torch.randint(0, d_out, (b,), generator=g)
        extra1, extra2 = {}, {}
    else:
        y_v = torch.randn(b, d_out, generator=g, dtype=torch.float64)
        mon = torch.randn(b, d_out, generator=g, dtype=torch.float64)
        extra1 = {"translation": torch.randint(-2, 3, (b, 2), generator=g).double()}
        extra2 = {"translation": torch.randint(-2, 3, (b, 2), generator=g).double()}
    labeled = {"labels": y_v, "index": torch.arange(b),
               "weak": {"pixel_values": x()},
               "meta": {"labels": y_v, "index": torch.arange(b), "weak": {"pixel_values": x()}}}
    unlabeled = {"monitor_labels": mon, "index": torch.arange(b) + b,
                 "student": {"pixel_values": x(), **extra1}, "teacher": {"pixel_values": x(), **extra2}}
    return labeled, unlabeled


def make_method(cls, task, seed=0, **kwargs):
    torch.manual_seed(seed)
    d_out = 3 if task == "classification" else 4  # landmarks: 2 points (x1, y1, x2, y2)
    net = TanhBatchNormNet(d_out=d_out).double()
    args_cls = L2IOArguments if cls is L2IO else L2ILArguments
    method = cls(net, args_cls(**kwargs)).double()
    method.train()
    if task != "classification":
        method.target_std = torch.tensor([2.0, 0.5, 1.0, 4.0], dtype=torch.float64)
    return method


def to_float(batch):
    if isinstance(batch, dict):
        return {k: to_float(v) for k, v in batch.items()}
    return batch.float() if isinstance(batch, torch.Tensor) and batch.is_floating_point() else batch
