"""Configuration of the Wide ResNet used by the CIFAR-10 experiments of L2I / MixMatch (WRN-28-2).

Defaults reproduce WRN-28-2 for 32x32 CIFAR-10 (docs/models.md, "Baselines"): depth 28, widen factor 2,
LeakyReLU(0.1), BatchNorm momentum 0.001 / eps 1e-5, no dropout, 10 classes, CIFAR-10
normalisation statistics.
"""

from __future__ import annotations

from .configuration_common import StilBaseConfig

CIFAR10_MEAN = [0.4914, 0.4822, 0.4465]
CIFAR10_STD = [0.2471, 0.2435, 0.2616]


class WideResNetConfig(StilBaseConfig):
    model_type = "stil_wide_resnet"

    def __init__(
        self,
        depth: int = 28,
        widen_factor: int = 2,
        dropout_rate: float = 0.0,
        leaky_relu_slope: float = 0.1,
        batch_norm_momentum: float = 0.001,
        batch_norm_eps: float = 1e-5,
        base_channels: int = 16,
        **kwargs,
    ):
        if (int(depth) - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n + 4 (e.g. 28), got {depth}")
        self.depth = int(depth)
        self.widen_factor = int(widen_factor)
        self.dropout_rate = float(dropout_rate)
        self.leaky_relu_slope = float(leaky_relu_slope)
        self.batch_norm_momentum = float(batch_norm_momentum)
        self.batch_norm_eps = float(batch_norm_eps)
        self.base_channels = int(base_channels)
        kwargs.setdefault("image_size", 32)
        kwargs.setdefault("image_mean", CIFAR10_MEAN)
        kwargs.setdefault("image_std", CIFAR10_STD)
        if "id2label" not in kwargs:
            kwargs.setdefault("num_labels", 10)
        super().__init__(**kwargs)

    @property
    def blocks_per_group(self) -> int:
        return (self.depth - 4) // 6

    @property
    def channels(self) -> list[int]:
        c, w = self.base_channels, self.widen_factor
        return [c, c * w, 2 * c * w, 4 * c * w]
