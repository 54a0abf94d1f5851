"""Configuration of TCDCNN, the facial-landmark regressor of the L2I AFLW experiments.

Defaults reproduce docs/models.md, "Baselines": 1x60x60 grayscale input in [0, 1] (no mean/std
normalisation: mean 0, std 1), four conv + hardtanh (+ max-pool) stages with 20/48/64/80 filters and
5/5/3/3 kernels, a 256-unit linear layer without activation, then 10 outputs (x1, y1, ..., x5, y5),
trained with a mean-squared-error loss (``problem_type="regression"``).
"""

from __future__ import annotations

from typing import Sequence

from .configuration_common import StilBaseConfig


class TCDCNNConfig(StilBaseConfig):
    model_type = "stil_tcdcnn"
    default_problem_type = "regression"

    def __init__(
        self,
        conv_channels: Sequence[int] = (20, 48, 64, 80),
        kernel_sizes: Sequence[int] = (5, 5, 3, 3),
        hidden_size: int = 256,
        dropout_rate: float = 0.0,  # the original's 0.5 is only active with IsUnlabeled=True, never passed
        **kwargs,
    ):
        self.conv_channels = [int(c) for c in conv_channels]
        self.kernel_sizes = [int(k) for k in kernel_sizes]
        if len(self.conv_channels) != len(self.kernel_sizes):
            raise ValueError("conv_channels and kernel_sizes need the same length")
        self.hidden_size = int(hidden_size)
        self.dropout_rate = float(dropout_rate)
        kwargs.setdefault("image_size", 60)
        kwargs.setdefault("num_channels", 1)
        kwargs.setdefault("image_mean", [0.0] * int(kwargs["num_channels"]))
        kwargs.setdefault("image_std", [1.0] * int(kwargs["num_channels"]))
        if "id2label" not in kwargs:
            kwargs.setdefault("num_labels", 10)
        super().__init__(**kwargs)

    def feature_map_size(self) -> int:
        """Spatial side after the conv stack (every stage but the last max-pools by 2)."""
        size = self.image_size
        for i, k in enumerate(self.kernel_sizes):
            size = size - k + 1
            if i < len(self.kernel_sizes) - 1:
                size //= 2
        if size < 1:
            raise ValueError(f"image_size {self.image_size} is too small for kernels {self.kernel_sizes}")
        return size
