"""TCDCNN: the facial-landmark regressor of the L2I AFLW experiments (docs/models.md, "Baselines").

Layers (defaults, 1x60x60 input): conv5x5 1->20, hardtanh, maxpool2 -> 20x28x28; conv5x5 20->48,
hardtanh, maxpool2 -> 48x12x12; conv3x3 48->64, hardtanh, maxpool2 -> 64x5x5; conv3x3 64->80,
hardtanh -> flatten 720; ``fc`` 720->256 (no activation; dropout only if ``dropout_rate`` > 0, the
original never enables it); ``linear`` 256->10. PyTorch default initialisation, no BatchNorm.
285,586 parameters. Loss: mean squared error on the (possibly standardised) 10-vector targets.
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

from .configuration_tcdcnn import TCDCNNConfig
from .modeling_common import DataCompatibilityMixin


@dataclass
class TCDCNNOutput(ModelOutput):
    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None  # (B, 10) landmark coordinates (x1, y1, ..., x5, y5)
    features: torch.FloatTensor | None = None  # (B, 256) output of `fc`
    image_features: torch.FloatTensor | None = None  # (B, 720) flattened conv features


class TCDCNNPreTrainedModel(DataCompatibilityMixin, PreTrainedModel):
    config_class = TCDCNNConfig
    base_model_prefix = "tcdcnn"
    main_input_name = "pixel_values"
    input_modalities = ("image",)

    @torch.no_grad()
    def _init_weights(self, module):
        # PyTorch's defaults (kaiming_uniform(a=sqrt(5)) weights, uniform(+-1/sqrt(fan_in)) biases),
        # through the flag-aware transformers.initialization functions.
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                fan_in = module.weight[0].numel()
                bound = 1.0 / math.sqrt(fan_in)
                init.uniform_(module.bias, -bound, bound)


class TCDCNNForLandmarkRegression(TCDCNNPreTrainedModel):
    """``model(pixel_values, labels=None)`` -> `TCDCNNOutput` (logits = predicted coordinates)."""

    def __init__(self, config: TCDCNNConfig):
        super().__init__(config)
        channels = [config.num_channels] + list(config.conv_channels)
        self.convs = nn.ModuleList(
            nn.Conv2d(channels[i], channels[i + 1], k, stride=1, padding=0, bias=True)
            for i, k in enumerate(config.kernel_sizes)
        )
        side = config.feature_map_size()
        self.fc = nn.Linear(channels[-1] * side * side, config.hidden_size)
        self.linear = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = pixel_values
        last = len(self.convs) - 1
        for i, conv in enumerate(self.convs):
            x = F.hardtanh(conv(x))
            if i < last:
                x = F.max_pool2d(x, 2)
        # NCHW flatten order, whatever the memory format (channels_last safe).
        return x.flatten(1) if x.is_contiguous() else x.contiguous().flatten(1)

    def forward(self, pixel_values: torch.Tensor | None = None, labels: torch.Tensor | None = None, return_dict=None, **unused) -> TCDCNNOutput:
        if pixel_values is None:
            raise ValueError("TCDCNNForLandmarkRegression needs pixel_values")
        image_features = self.forward_features(pixel_values)
        features = self.fc(image_features)
        if self.config.dropout_rate > 0:
            features = F.dropout(features, self.config.dropout_rate, self.training)
        logits = self.linear(features)
        return TCDCNNOutput(
            loss=self.compute_loss(logits, labels), logits=logits, features=features, image_features=image_features
        )


TCDCNNConfig.register_for_auto_class()
TCDCNNForLandmarkRegression.register_for_auto_class("AutoModel")
