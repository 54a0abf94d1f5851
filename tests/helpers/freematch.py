"""Shared by the FreeMatch and schedule tests: a hand-made weak/strong image batch whose weak rows are
confident class 0, unsure, confident class 1 (logits = inputs under an identity head)."""

import torch


def batches(x_l, y_l, x_w, x_s, monitor=None):
    labeled = {"labels": y_l, "index": torch.arange(len(y_l)), "labeled": {"pixel_values": x_l}}
    unlabeled = {"index": torch.arange(len(x_w)), "weak": {"pixel_values": x_w}, "strong": {"pixel_values": x_s}}
    if monitor is not None:
        unlabeled["monitor_labels"] = monitor
    return labeled, unlabeled


def hand_inputs():
    x_l = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]], requires_grad=True)
    # weak rows: confident class 0, unsure, confident class 1
    x_w = torch.tensor([[6.0, 0.0, 0.0], [0.2, 0.0, 0.1], [0.0, 5.0, 0.0]], requires_grad=True)
    x_s = torch.tensor([[0.5, 1.0, -1.0], [2.0, 0.0, 1.0], [0.0, 0.2, 0.6]], requires_grad=True)
    return batches(x_l, torch.tensor([0, 2]), x_w, x_s, torch.tensor([0, 1, 1]))
