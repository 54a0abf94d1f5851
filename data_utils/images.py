"""High-bit-depth images (16-bit grayscale PNG/TIFF, common for medical scans) -> 8 bits, one rule everywhere.

PIL's ``convert("RGB")`` / ``convert("L")`` clips a 16-bit image at 255 instead of scaling it: a scan
with values 134-65496 became 99.7 % white. Every place that reads images (the dataset builders, the
training loaders) goes through `to_8bit` first; ``StilProcessor`` (shipped with exports, without
data_utils) writes the same rule out again, tested to agree.

The rule (docs/data.md): pixels are scaled by the range of their type, not per image, so intensities
stay comparable across images: 16-bit (PIL modes ``I;16``, ``I;16L``, ``I;16B``, ``I;16N``) and 32-bit
integer (``I``) values in 0..65535 become ``round(value / 257)`` (65535 -> 255). Data that uses fewer
bits (12-bit scans stored in 16-bit files) comes out dark: rescale such files before building. ``I``
values outside 0..65535 and 32-bit float images (``F``) have no range to scale by and are refused.
PIL already reads 16-bit RGB PNGs as 8-bit RGB (the high byte of each value).
"""

from __future__ import annotations

import warnings

import numpy as np

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
SCALE = 257.0  # 65535 / 255


class ImageDepthError(ValueError):
    """An image whose pixel values cannot be scaled to 8 bits by a known range."""


def to_8bit(image):
    """``(image, scaled)``: a 16-bit / 32-bit integer grayscale PIL image as an 8-bit ``L`` image scaled by
    1/257 (``scaled`` True), any other image unchanged (``scaled`` False). Raises `ImageDepthError` for
    float images and integer images outside 0..65535."""
    from PIL import Image

    mode = image.mode
    if mode not in SIXTEEN_BIT_MODES and mode not in ("I", "F"):
        return image, False
    if mode == "F":
        raise ImageDepthError(
            "32-bit float pixels have no fixed range to scale to 8 bits; save the image as 8-bit or 16-bit "
            "(values 0..65535) first"
        )
    values = np.asarray(image).astype(np.int64)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise ImageDepthError(
            f"32-bit integer pixels in {int(values.min())}..{int(values.max())}, outside the 16-bit range 0..65535; "
            "rescale the image to 8 or 16 bits first"
        )
    scaled = np.rint(values / SCALE).astype(np.uint8)
    return Image.fromarray(scaled, mode="L"), True


def scaled_notice(where: str) -> None:
    """Say once per process that 16-bit images are being scaled (training loaders, predict)."""
    warnings.warn(
        f"{where}: 16-bit images are scaled to 8 bits (value / 257, the full 16-bit range; see docs/data.md)",
        stacklevel=3,
    )
