"""Tiny networks shared by the method tests: small enough to compute by hand, shaped like the models
the methods meet (an image model, an image+tabular model with unimodal heads, an identity head)."""

from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput


@dataclass
class TinyOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    features: torch.Tensor | None = None
    image_logits: torch.Tensor | None = None
    tabular_logits: torch.Tensor | None = None


class TinyNet(nn.Module):
    """Image-like model: pixel_values (B, in_dim) -> Linear -> BatchNorm1d -> ReLU -> Linear."""

    def __init__(self, in_dim=4, num_labels=3, hidden=8):
        super().__init__()
        self.body = nn.Linear(in_dim, hidden)
        self.norm = nn.BatchNorm1d(hidden)
        self.head = nn.Linear(hidden, num_labels)

    def forward(self, pixel_values, **unused):
        assert "labels" not in unused and "translation" not in unused, "targets must not reach the model"
        features = F.relu(self.norm(self.body(pixel_values)))
        return TinyOutput(logits=self.head(features), features=features)


class TinyMultimodalNet(nn.Module):
    """Image + tabular with unimodal heads (the co-training/MMatch backbone shape)."""

    def __init__(self, image_dim=4, tabular_dim=3, num_labels=3):
        super().__init__()
        self.image = nn.Linear(image_dim, 6)
        self.tabular = nn.Linear(tabular_dim, 6)
        self.image_head = nn.Linear(6, num_labels)
        self.tabular_head = nn.Linear(6, num_labels)
        self.head = nn.Linear(12, num_labels)

    def forward(self, pixel_values, continuous_values, **unused):
        hi, ht = torch.tanh(self.image(pixel_values)), torch.tanh(self.tabular(continuous_values))
        return TinyOutput(
            logits=self.head(torch.cat([hi, ht], dim=1)),
            image_logits=self.image_head(hi),
            tabular_logits=self.tabular_head(ht),
        )


class Identity(nn.Module):
    """logits = pixel_values @ W^T with W = I at init (no BN): outputs are the inputs."""

    def __init__(self, dim=3):
        super().__init__()
        self.head = nn.Linear(dim, dim, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(torch.eye(dim))
        self.batch_sizes = []

    def forward(self, pixel_values, **unused):
        assert "translation" not in unused and "labels" not in unused
        self.batch_sizes.append(pixel_values.shape[0])
        return TinyOutput(logits=self.head(pixel_values))


class ThreeHeadNet(nn.Module):
    """z_i = W_i x_img, z_t = W_t x_tab, fused x_m = x_img + x_tab, z_m = W_m x_m (identity init:
    the logits are the inputs). The MMatch network's shape without encoders."""

    def __init__(self, num_labels=3):
        super().__init__()
        self.config = SimpleNamespace(num_labels=num_labels, fused_dim=num_labels)
        self.fused_dim = num_labels
        for name in ("classifier_multimodal", "classifier_imaging", "classifier_tabular"):
            layer = nn.Linear(num_labels, num_labels, bias=False)
            with torch.no_grad():
                layer.weight.copy_(torch.eye(num_labels))
            setattr(self, name, layer)

    def forward(self, pixel_values, continuous_values, **unused):
        fused = pixel_values + continuous_values
        return TinyOutput(logits=self.classifier_multimodal(fused), image_logits=self.classifier_imaging(pixel_values),
                          tabular_logits=self.classifier_tabular(continuous_values), features=fused)
