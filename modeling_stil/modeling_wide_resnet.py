"""Wide ResNet (WRN-28-2 by default) as used by the CIFAR-10 experiments of L2I / MixMatch.

Faithful to docs/models.md, "Baselines", including the two documented quirks of the MixMatch-pytorch WRN:

* ``activate_before_residual`` is set for every block of the first group, but only matters in the one
  block that changes channels (``block1.layer.0``): there ``x <- LReLU(BN(x))`` feeds both the conv
  path and the 1x1 shortcut.
* In the other channel-changing blocks (``block2.layer.0``, ``block3.layer.0``) ``bn1``/LReLU are
  computed and thrown away; conv1 and the shortcut read the raw input. Their ``bn1`` affine
  parameters never get gradients, but their running statistics are updated in training mode
  (we compute the discarded BN in training mode only; in eval mode it is a pure no-op).

Block convolutions and the shortcut have biases, the stem does not. He fan-out initialisation
(N(0, 2/(k*k*C_out))) for conv weights, PyTorch's default uniform for conv biases, BN 1/0, Xavier-normal
classifier with zero bias. With 10 classes WRN-28-2 has 1,469,626 parameters.

One generalisation: the head's ``avg_pool2d(8)`` is a global average pool, which is identical at
32x32 input and lets other input sizes work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .configuration_wide_resnet import WideResNetConfig
from .modeling_common import DataCompatibilityMixin


@dataclass
class WideResNetOutput(ModelOutput):
    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    features: torch.FloatTensor | None = None  # pooled 4*16*k feature (128-d for WRN-28-2)
    image_features: torch.FloatTensor | None = None  # same tensor (image-only model)


class WideResNetBasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, config: WideResNetConfig, activate_before_residual: bool):
        super().__init__()
        momentum, eps, slope = config.batch_norm_momentum, config.batch_norm_eps, config.leaky_relu_slope
        self.bn1 = nn.BatchNorm2d(in_channels, momentum=momentum, eps=eps)
        self.relu1 = nn.LeakyReLU(slope, inplace=False)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=True)
        self.bn2 = nn.BatchNorm2d(out_channels, momentum=momentum, eps=eps)
        self.relu2 = nn.LeakyReLU(slope, inplace=False)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=True)
        self.dropout_rate = config.dropout_rate
        self.equal_in_out = in_channels == out_channels
        self.activate_before_residual = activate_before_residual
        self.convShortcut = (
            None if self.equal_in_out else nn.Conv2d(in_channels, out_channels, 1, stride=stride, padding=0, bias=True)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.equal_in_out:
            out = self.relu1(self.bn1(x))
            shortcut = x
            conv_input = out
        elif self.activate_before_residual:
            x = self.relu1(self.bn1(x))  # quirk 1: pre-activation feeds conv path and shortcut
            shortcut = self.convShortcut(x)
            conv_input = x
        else:
            if self.training:
                self.relu1(self.bn1(x))  # quirk 2: computed and discarded (only updates running stats)
            shortcut = self.convShortcut(x)
            conv_input = x
        out = self.relu2(self.bn2(self.conv1(conv_input)))
        if self.dropout_rate > 0:
            out = F.dropout(out, p=self.dropout_rate, training=self.training)
        return shortcut + self.conv2(out)


class WideResNetGroup(nn.Module):
    def __init__(self, blocks: int, in_channels: int, out_channels: int, stride: int, config, activate_before_residual: bool):
        super().__init__()
        self.layer = nn.Sequential(
            *[
                WideResNetBasicBlock(
                    in_channels if i == 0 else out_channels, out_channels, stride if i == 0 else 1, config,
                    activate_before_residual,
                )
                for i in range(blocks)
            ]
        )

    def forward(self, x):
        return self.layer(x)


class WideResNetPreTrainedModel(DataCompatibilityMixin, PreTrainedModel):
    config_class = WideResNetConfig
    base_model_prefix = "wide_resnet"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = False

    @torch.no_grad()
    def _init_weights(self, module):
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            init.normal_(module.weight, 0.0, math.sqrt(2.0 / (k * module.out_channels)))
            if module.bias is not None:  # PyTorch's default conv bias init
                fan_in = module.in_channels // module.groups * k
                bound = 1.0 / math.sqrt(fan_in)
                init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, nn.BatchNorm2d):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            init.zeros_(module.running_mean)
            init.ones_(module.running_var)
            init.zeros_(module.num_batches_tracked)
        elif isinstance(module, nn.Linear):
            init.xavier_normal_(module.weight)
            init.zeros_(module.bias)


class WideResNetForImageClassification(WideResNetPreTrainedModel):
    """WRN-d-k classifier. ``model(pixel_values, labels=None)`` -> `WideResNetOutput`."""

    _extra_auto_classes = ("AutoModelForImageClassification",)

    def __init__(self, config: WideResNetConfig):
        super().__init__(config)
        c = config.channels
        n = config.blocks_per_group
        self.conv1 = nn.Conv2d(config.num_channels, c[0], 3, stride=1, padding=1, bias=False)
        self.block1 = WideResNetGroup(n, c[0], c[1], 1, config, activate_before_residual=True)
        self.block2 = WideResNetGroup(n, c[1], c[2], 2, config, activate_before_residual=False)
        self.block3 = WideResNetGroup(n, c[2], c[3], 2, config, activate_before_residual=False)
        self.bn1 = nn.BatchNorm2d(c[3], momentum=config.batch_norm_momentum, eps=config.batch_norm_eps)
        self.relu = nn.LeakyReLU(config.leaky_relu_slope, inplace=False)
        self.fc = nn.Linear(c[3], config.num_labels)
        self.post_init()

    def forward_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.conv1(pixel_values)
        x = self.block3(self.block2(self.block1(x)))
        x = self.relu(self.bn1(x))
        return x.mean(dim=(2, 3))

    def forward(self, pixel_values: torch.Tensor | None = None, labels: torch.Tensor | None = None, return_dict=None, **unused) -> WideResNetOutput:
        if pixel_values is None:
            raise ValueError("WideResNetForImageClassification needs pixel_values")
        features = self.forward_features(pixel_values)
        logits = self.fc(features)
        return WideResNetOutput(
            loss=self.compute_loss(logits, labels), logits=logits, features=features, image_features=features
        )


WideResNetConfig.register_for_auto_class()
WideResNetForImageClassification.register_for_auto_class("AutoModel")
