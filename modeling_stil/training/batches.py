"""What the loop does to a batch before the model sees it: the device, the memory format, the
standardised regression targets; and what it reads off one (the model inputs, its size, images to draw)."""

from __future__ import annotations

import torch

from ..methods.base import MODEL_INPUT_KEYS


def move_to_device(batch, device):
    """A batch (nested dicts of tensors) on ``device``, copied without blocking the host."""
    from accelerate.utils import send_to_device

    return send_to_device(batch, device, non_blocking=True)


def move_with_device_views(batch, device, device_views):
    """`move_to_device`, making on ``device`` the image views the loader left to it
    (``--image_views_on_device``; data_utils.device_views.DeviceViews plans them on the host first)."""
    if batch is None:
        return None
    return device_views.prepare(batch, device)


def split_eval_batch(batch: dict) -> tuple[dict, torch.Tensor]:
    """An eval batch -> (model inputs, labels). Accepts flat batches or a single nested view."""
    labels = batch["labels"]
    inputs = model_inputs(batch)
    if not inputs:
        nested = [v for k, v in batch.items() if isinstance(v, dict)]
        if len(nested) != 1:
            raise KeyError(f"eval batch has no model inputs: keys {sorted(batch)}")
        inputs = model_inputs(nested[0])
    return inputs, labels


def to_channels_last(obj):
    """Every 4-d ``pixel_values`` of a (nested) batch in channels-last memory format."""
    if isinstance(obj, dict):
        return {k: (v.contiguous(memory_format=torch.channels_last) if k == "pixel_values" and isinstance(v, torch.Tensor) and v.ndim == 4 else to_channels_last(v)) for k, v in obj.items()}
    return obj


def standardize_targets(batch: dict, mean: torch.Tensor, std: torch.Tensor) -> dict:
    """Regression: ``labels`` / ``monitor_labels`` (top level and inside views) -> (y - mean) / std."""
    out = {}
    for key, value in batch.items():
        if key in ("labels", "monitor_labels") and isinstance(value, torch.Tensor) and value.is_floating_point():
            out[key] = (value - mean) / std
        elif isinstance(value, dict):
            out[key] = standardize_targets(value, mean, std)
        else:
            out[key] = value
    return out


def model_inputs(batch: dict) -> dict:
    """The keys of a batch the model's forward takes."""
    return {k: v for k, v in batch.items() if k in MODEL_INPUT_KEYS}


def display_images(pixels: torch.Tensor | None, config, limit: int = 16):
    """Up to ``limit`` images of an eval batch in [0, 1] (normalisation undone) as a CPU numpy array."""
    if pixels is None or pixels.ndim != 4:
        return None
    if pixels.dtype == torch.uint8:
        return (pixels[:limit].detach().float().cpu() / 255.0).numpy()
    pixels = pixels[:limit].detach().float().cpu()
    channels = pixels.shape[1]
    mean = torch.tensor(getattr(config, "image_mean", None) or [0.0] * channels, dtype=torch.float32).reshape(1, -1, 1, 1)
    std = torch.tensor(getattr(config, "image_std", None) or [1.0] * channels, dtype=torch.float32).reshape(1, -1, 1, 1)
    return (pixels * std + mean).numpy()


def batch_size(batch: dict | None) -> int:
    """The number of rows of a training batch (0 for none)."""
    if not batch:
        return 0
    for key in ("index", "labels", "monitor_labels"):
        value = batch.get(key)
        if isinstance(value, torch.Tensor):
            return int(value.shape[0])
    return 0
