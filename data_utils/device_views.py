"""Image views on the accelerator: whole-batch versions of the CPU views, for when CPU workers cannot
feed the GPU (docs/benchmarks.md, "Cores per H200"; docs/data.md, "Views on the device").

With ``--image_views_on_device true`` the loaders emit, for every view key whose image view is ported
here, the *resized* uint8 image (the ``eval`` view: no per-row CPU work) together with the rows'
seeds (``sample_seeds``: run seed, stream, view key, pass, row index) and, for joint recipes
(``hard``), the rows' joint coins. The training loop's batch preparation (`DeviceViewStream` in
modeling_stil/training/data_setup.py) then

1. *plans* each view on the host: every per-row random parameter (coins, jitter factors and order,
   blur sigma, crop boxes, flips) is drawn from the row's seed with the same counter-based hash as the
   tabular views (``views._uniform``), so a row's view depends on (seed, stream, view key, pass, row)
   only: not on the batch it is in, the worker count, the device or a resume. The plan is a few
   numbers per row plus the row indices of each group (no data-dependent shape on the device, hence
   no host synchronisation);
2. moves the batch to the device and *applies* the plan with whole-batch kernels: brightness,
   contrast, saturation and hue with per-row factors (in the rows' own random order, one group of rows
   per (position, operation)), grayscale for the rows whose coin says so, a separable Gaussian blur
   with a per-row sigma as one grouped convolution, and random-resized crop + horizontal flip as one
   ``affine_grid`` / ``grid_sample`` with a per-row box (pad-crop + flip as one gather);
3. normalises with the model's mean/std (float32 out, as the CPU views' batches).

The method and the trainer see the same batch contract as with CPU views.

Ported (``DEVICE_VIEWS``): ``stil``, ``stil_always`` and ``hard`` (STiL/TIP's contrastive view) for the
``default``/``dvm``/``cifar`` presets, ``weak`` (crop/flip or pad-crop/flip) for every preset but
``aflw``, ``strong`` for ``dvm``/``cardiac`` (crop, jitter, grey, blur). Not ported, and kept on the
CPU (the loader makes them as before): ``strong`` for ``default``/``cifar`` (RandAugment + erasing),
the cardiac contrastive view (its reflect-101 rotation), ``translate`` and ``eval``.

Same distributions as the CPU views (torchvision v2 on uint8), with these differences:

* the random numbers are others (the plan's hash, not torch's generator), so a run's views differ
  from the CPU run's row by row, with the same distribution;
* arithmetic is float32 throughout: the CPU views round to uint8 after every operation;
* crop-and-resize is bilinear ``grid_sample`` (``align_corners=False``, the same sample positions as
  torchvision's crop then resize); within half an output pixel of the crop's edge it blends with the
  pixels just outside the crop, where torchvision repeats the crop's edge pixel. The crop is never
  larger than the image, so the resize only enlarges and torchvision's ``antialias`` would change
  nothing;
* the blur kernel is cut at 3 sigma per row, as ``TruncatedGaussianBlur`` does (same weights).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .views import REFERENCE_SIZE, ViewConfig, ViewError, _odd, _uniform, _uses_pad_crop

DEVICE_VIEWS = ("weak", "strong", "stil", "stil_always", "hard")
BATCH_KEY = "device_view"  # the loader's request inside a view's inputs: {"view", "seeds"[, "augment"]}
_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale


def device_view_unsupported(name: str, cfg: ViewConfig) -> str | None:
    """Why image view ``name`` cannot run on the device for ``cfg`` (None: it can)."""
    if name not in DEVICE_VIEWS:
        return f"image view {name!r} has no device version (ported: {DEVICE_VIEWS})"
    if cfg.landmarks:
        return f"the 'aflw' preset's views move landmark targets with the pixels; {name!r} stays on the CPU"
    if name in ("stil", "stil_always", "hard") and cfg.preset == "cardiac":
        return "the cardiac contrastive view rotates with reflect-101 borders, which is not ported"
    if name == "strong" and cfg.preset not in ("dvm", "cardiac"):
        return f"'strong' for the {cfg.preset!r} preset is RandAugment + erasing, which is not ported"
    return None


# ================================================================================= stages
# A stage draws ``draws`` uniforms per row (``plan``: the rows to change and their parameters, on the
# host) and changes those rows of a float batch in place (``apply``, on the batch's device).
@dataclass
class _Jitter:
    """ColorJitter(brightness, contrast, saturation, hue) with probability p, in a random order per row."""

    strength: float
    hue: float
    p: float
    color: bool
    draws = 9  # coin, 4 factors, 4 order keys

    def plan(self, u: np.ndarray, rows: np.ndarray, height: int, width: int) -> dict:
        rows = rows[u[rows, 0] < self.p]
        s = self.strength
        lo, hi = max(0.0, 1.0 - s), 1.0 + s
        factors = np.stack([lo + u[:, 1] * (hi - lo), lo + u[:, 2] * (hi - lo), lo + u[:, 3] * (hi - lo),
                            -self.hue + u[:, 4] * 2 * self.hue], axis=1)
        order = np.argsort(u[:, 5:9], axis=1, kind="stable")  # a uniform random permutation of the 4 ops
        ops = (0, 1, 2, 3) if self.color else (0, 1)  # one channel: no saturation or hue (as torchvision)
        groups = []
        for position in range(4):
            for op in ops:
                picked = rows[order[rows, position] == op]
                if picked.size:
                    groups.append((op, _long(picked), torch.from_numpy(factors[picked, op].astype(np.float32))))
        return {"groups": groups}

    def apply(self, x: torch.Tensor, plan: dict) -> torch.Tensor:
        for op, idx, factor in plan["groups"]:
            x.index_copy_(0, idx, _COLOR_OPS[op](x.index_select(0, idx), factor))
        return x


@dataclass
class _Gray:
    """RandomGrayscale(p): luma in every channel."""

    p: float
    draws = 1

    def plan(self, u: np.ndarray, rows: np.ndarray, height: int, width: int) -> dict:
        return {"idx": _long(rows[u[rows, 0] < self.p])}

    def apply(self, x: torch.Tensor, plan: dict) -> torch.Tensor:
        idx = plan["idx"]
        if idx.numel() == 0:
            return x
        picked = x.index_select(0, idx)
        return x.index_copy_(0, idx, _gray(picked).expand_as(picked))


@dataclass
class _Blur:
    """Gaussian blur with sigma ~ U(sigma range), kernel min(nominal, 2 ceil(3 sigma) + 1), p."""

    kernel: int
    sigma: tuple[float, float]
    p: float
    draws = 2

    @property
    def radius(self) -> int:  # the widest kernel any row can get
        return min(self.kernel // 2, math.ceil(3.0 * self.sigma[1]))

    def plan(self, u: np.ndarray, rows: np.ndarray, height: int, width: int) -> dict:
        rows = rows[u[rows, 0] < self.p]
        sigma = self.sigma[0] + u[rows, 1] * (self.sigma[1] - self.sigma[0])
        radius = np.minimum(self.kernel // 2, np.ceil(3.0 * sigma)).astype(np.int64)
        taps = np.arange(-self.radius, self.radius + 1, dtype=np.float64)
        weights = np.exp(-0.5 * (taps[None, :] / sigma[:, None]) ** 2) * (np.abs(taps)[None, :] <= radius[:, None])
        weights /= weights.sum(axis=1, keepdims=True)
        return {"idx": _long(rows), "weights": torch.from_numpy(weights.astype(np.float32))}

    def apply(self, x: torch.Tensor, plan: dict) -> torch.Tensor:
        idx = plan["idx"]
        if idx.numel() == 0:
            return x
        picked = x.index_select(0, idx)
        n, c, h, w = picked.shape
        r = self.radius
        if r >= min(h, w):
            raise ViewError(f"blur radius {r} needs images larger than {h}x{w}")
        kernel = plan["weights"].repeat_interleave(c, dim=0)  # (n * c, 2r + 1): one per row and channel
        flat = picked.reshape(1, n * c, h, w)
        flat = F.conv2d(F.pad(flat, (r, r, 0, 0), mode="reflect"), kernel.view(n * c, 1, 1, -1), groups=n * c)
        flat = F.conv2d(F.pad(flat, (0, 0, r, r), mode="reflect"), kernel.view(n * c, 1, -1, 1), groups=n * c)
        return x.index_copy_(0, idx, flat.view(n, c, h, w))


@dataclass
class _CropFlip:
    """RandomResizedCrop(scale, ratio) + horizontal flip (p 0.5 when ``flip``): torchvision's draw
    (10 attempts of area x aspect, else the whole image), one ``grid_sample`` for the batch."""

    scale: tuple[float, float]
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    attempts = 10
    draws = 10 * 2 + 3  # area, log-ratio per attempt; top, left, flip

    def plan(self, u: np.ndarray, rows: np.ndarray, height: int, width: int) -> dict:
        u = u[rows]
        area = height * width
        target = area * (self.scale[0] + u[:, 0:self.attempts] * (self.scale[1] - self.scale[0]))
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        aspect = np.exp(log_lo + u[:, self.attempts:2 * self.attempts] * (log_hi - log_lo))
        w = np.round(np.sqrt(target * aspect))  # numpy rounds half to even, as Python's round
        h = np.round(np.sqrt(target / aspect))
        valid = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        first = np.argmax(valid, axis=1)
        found = valid[np.arange(len(rows)), first]
        w = np.where(found, w[np.arange(len(rows)), first], 0.0)
        h = np.where(found, h[np.arange(len(rows)), first], 0.0)
        fw, fh = _fallback_box(height, width, self.ratio)
        w, h = np.where(found, w, fw), np.where(found, h, fh)
        u_top, u_left, u_flip = u[:, 2 * self.attempts], u[:, 2 * self.attempts + 1], u[:, 2 * self.attempts + 2]
        top = np.where(found, np.floor(u_top * (height - h + 1)), (height - h) // 2)
        left = np.where(found, np.floor(u_left * (width - w + 1)), (width - w) // 2)
        flipped = (u_flip < 0.5) if self.flip else np.zeros(len(rows), dtype=bool)
        theta = np.zeros((len(rows), 2, 3), dtype=np.float64)
        theta[:, 0, 0] = np.where(flipped, -1.0, 1.0) * w / width
        theta[:, 0, 2] = (2 * left + w) / width - 1
        theta[:, 1, 1] = h / height
        theta[:, 1, 2] = (2 * top + h) / height - 1
        return {"idx": _long(rows), "theta": torch.from_numpy(theta.astype(np.float32)),
                "boxes": np.stack([top, left, h, w], axis=1).astype(np.int64), "flipped": flipped}

    def apply(self, x: torch.Tensor, plan: dict) -> torch.Tensor:
        idx = plan["idx"]
        if idx.numel() == 0:
            return x
        picked = x.index_select(0, idx)
        grid = F.affine_grid(plan["theta"], list(picked.shape), align_corners=False)
        out = F.grid_sample(picked, grid, mode="bilinear", padding_mode="border", align_corners=False)
        return x.index_copy_(0, idx, out)


@dataclass
class _PadCropFlip:
    """RandomCrop(size, padding=pad, reflect) + horizontal flip: integer shifts, exact."""

    pad: int
    flip: bool = True
    draws = 3

    def plan(self, u: np.ndarray, rows: np.ndarray, height: int, width: int) -> dict:
        u = u[rows]
        top = np.floor(u[:, 0] * (2 * self.pad + 1)).astype(np.int64)
        left = np.floor(u[:, 1] * (2 * self.pad + 1)).astype(np.int64)
        flipped = (u[:, 2] < 0.5) if self.flip else np.zeros(len(rows), dtype=bool)
        ys = top[:, None] + np.arange(height)[None, :]
        xs = left[:, None] + np.arange(width)[None, :]
        xs = np.where(flipped[:, None], xs[:, ::-1], xs)
        return {"idx": _long(rows), "ys": torch.from_numpy(ys), "xs": torch.from_numpy(np.ascontiguousarray(xs)),
                "offsets": np.stack([top, left], axis=1), "flipped": flipped}

    def apply(self, x: torch.Tensor, plan: dict) -> torch.Tensor:
        idx = plan["idx"]
        if idx.numel() == 0:
            return x
        p = self.pad
        padded = F.pad(x.index_select(0, idx), (p, p, p, p), mode="reflect")
        n = idx.numel()
        batch = torch.arange(n, device=x.device)[:, None, None]
        out = padded.permute(0, 2, 3, 1)[batch, plan["ys"][:, :, None], plan["xs"][:, None, :]]  # (n, H, W, C)
        return x.index_copy_(0, idx, out.permute(0, 3, 1, 2).contiguous())


def _fallback_box(height: int, width: int, ratio: tuple[float, float]) -> tuple[float, float]:
    """torchvision's RandomResizedCrop fallback after 10 failed attempts: the central box of clamped ratio."""
    in_ratio = width / height
    if in_ratio < min(ratio):
        return float(width), float(round(width / min(ratio)))
    if in_ratio > max(ratio):
        return float(round(height * max(ratio))), float(height)
    return float(width), float(height)


def _long(rows: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int64))


# ================================================================================= colour operations
def _gray(x: torch.Tensor) -> torch.Tensor:
    """(n, 3, H, W) -> (n, 1, H, W) luma; one channel is its own grey."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    return (_GRAY_WEIGHTS[0] * r + _GRAY_WEIGHTS[1] * g + _GRAY_WEIGHTS[2] * b).unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    f = factor.view(-1, 1, 1, 1)
    return (f * x + (1 - f) * other).clamp_(0.0, 1.0)


def _brightness(x, factor):
    return (x * factor.view(-1, 1, 1, 1)).clamp_(0.0, 1.0)


def _contrast(x, factor):
    return _blend(x, _gray(x).mean(dim=(1, 2, 3), keepdim=True), factor)


def _saturation(x, factor):
    return _blend(x, _gray(x), factor)


def _hue(x, factor):
    """Shift the hue by a per-row fraction of the circle: torchvision's adjust_hue (RGB -> HSV, shift,
    back), vectorised, with the closed form of HSV -> RGB (channel n in 5, 3, 1 for r, g, b:
    v - v s clamp(min(k, 4 - k), 0, 1), k = (n + 6 h) mod 6), the same values as its six-sector table."""
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(dim=1), x.amin(dim=1)
    chroma = maxc - minc
    grey = chroma == 0
    s = chroma / torch.where(grey, 1.0, maxc)
    chroma = torch.where(grey, 1.0, chroma)
    rc, gc, bc = (maxc - r) / chroma, (maxc - g) / chroma, (maxc - b) / chroma
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h6 = torch.remainder(torch.fmod(h / 6.0 + 1.0, 1.0) + factor.view(-1, 1, 1), 1.0) * 6.0
    vs = maxc * s
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = torch.remainder(h6 + n, 6.0)
        channels.append(maxc - vs * torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0))
    return torch.stack(channels, dim=1)


_COLOR_OPS = (_brightness, _contrast, _saturation, _hue)


# ================================================================================= views
@dataclass
class DevicePlan:
    """Every random decision of one view for one batch: per stage, its rows and parameters."""

    view: DeviceView
    stages: list[dict]
    active: np.ndarray  # bool per row: the row is augmented (else only resized)

    def to(self, device) -> DevicePlan:
        # pinned first on CUDA: a copy from pageable memory would wait for the queued training step
        pin = torch.device(device).type == "cuda"

        def move(value):
            if isinstance(value, torch.Tensor):
                return (value.pin_memory() if pin else value).to(device, non_blocking=True)
            if isinstance(value, list):
                return [move(v) for v in value]
            if isinstance(value, tuple):
                return tuple(move(v) for v in value)
            if isinstance(value, dict):
                return {k: move(v) for k, v in value.items()}
            return value

        return DevicePlan(self.view, [move(s) for s in self.stages], self.active)


@dataclass
class DeviceView:
    """One ported view: a sequence of stages applied with probability ``p`` per row (the CPU
    ImageView's ``augmentation_rate`` coin), or where a joint coin says so."""

    name: str
    stages: list = field(default_factory=list)
    p: float = 1.0

    def plan(self, seeds, augment=None, image_shape: tuple[int, int] | None = None) -> DevicePlan:
        """Draw every per-row parameter from the rows' seeds (uint64, or int64 holding their bits)."""
        seeds = _as_uint64(seeds)
        if image_shape is None:
            raise ViewError("DeviceView.plan needs the images' (height, width)")
        height, width = image_shape
        active = _uniform(seeds, 1000) < self.p
        if augment is not None:
            augment = augment.cpu().numpy() if isinstance(augment, torch.Tensor) else np.asarray(augment)
            active &= augment.astype(bool)
        rows = np.flatnonzero(active)
        stages = []
        for number, stage in enumerate(self.stages):
            u = _uniform(seeds, 1001 + number, stage.draws)
            stages.append(stage.plan(u, rows, height, width))
        return DevicePlan(self, stages, active)

    def apply(self, images: torch.Tensor, plan: DevicePlan) -> torch.Tensor:
        """uint8 (or [0, 1] float) (B, C, H, W) on any device -> float32 in [0, 1], the plan applied."""
        if images.ndim != 4:
            raise ViewError(f"device views take a (B, C, H, W) batch, got shape {tuple(images.shape)}")
        # a fresh float32 batch: the stages write their rows into it in place
        x = images.float().div_(255.0) if images.dtype == torch.uint8 else images.to(torch.float32, copy=True)
        for stage, params in zip(self.stages, plan.stages):
            x = stage.apply(x, params)
        return x

    def __call__(self, images: torch.Tensor, seeds, augment=None) -> torch.Tensor:
        """Plan on the host, then apply on ``images``' device."""
        plan = self.plan(seeds, augment, tuple(images.shape[-2:])).to(images.device)
        return self.apply(images, plan)


def _as_uint64(seeds) -> np.ndarray:
    if isinstance(seeds, torch.Tensor):
        seeds = seeds.cpu().numpy()
    seeds = np.asarray(seeds)
    if seeds.dtype == np.int64:
        return seeds.view(np.uint64)
    return seeds.astype(np.uint64)


def build_device_view(name: str, cfg: ViewConfig) -> DeviceView:
    """The device version of image view ``name`` for ``cfg`` (its preset, size, channels, flips)."""
    reason = device_view_unsupported(name, cfg)
    if reason is not None:
        raise ViewError(reason)
    color = cfg.num_channels == 3
    scale = cfg.image_size / REFERENCE_SIZE

    def jitter(strength, hue, p):
        return _Jitter(strength, hue if color else 0.0, p, color)

    def blur(kernel_at_128, p):
        return _Blur(_odd(kernel_at_128 * scale), (0.1 * scale, 2.0 * scale), p)

    gray = [_Gray(0.2)] if color else []
    if name in ("stil", "stil_always", "hard"):
        crop = (0.6, 1.0) if name == "hard" else (0.08, 1.0)
        stages = [jitter(0.8, 0.2, 0.8), *gray, blur(29, 0.5), _CropFlip(crop, flip=cfg.hflip)]
        return DeviceView(name, stages, cfg.augmentation_rate if name == "stil" else 1.0)
    if name == "weak":
        if _uses_pad_crop(cfg):
            return DeviceView(name, [_PadCropFlip(max(1, round(cfg.image_size / 8)), flip=cfg.hflip)])
        return DeviceView(name, [_CropFlip((0.2, 1.0), flip=cfg.hflip)])
    # strong, dvm / cardiac: the STiL comparison methods' strong view
    gray = gray if cfg.preset == "dvm" else []
    return DeviceView(name, [_CropFlip((0.2, 1.0), flip=cfg.hflip), jitter(0.4, 0.1, 0.8), *gray, blur(19, 0.5)])


# ================================================================================= batches
def device_view_request(name: str, seeds: np.ndarray, augment: np.ndarray | None) -> dict:
    """What the loader puts under ``BATCH_KEY`` in a view's inputs (seeds as int64 bits)."""
    request = {"view": name, "seeds": torch.from_numpy(np.asarray(seeds, dtype=np.uint64).view(np.int64).copy())}
    if augment is not None:
        request["augment"] = torch.from_numpy(np.asarray(augment, dtype=bool).copy())
    return request


class DeviceViews:
    """The run's device views: finds the loader's requests in a (nested) batch, plans them on the host,
    moves the batch and applies them on ``device``, normalised like the CPU views' batches."""

    def __init__(self, cfg: ViewConfig):
        self.config = cfg
        self._views: dict[str, DeviceView] = {}
        self._normalisers: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # per device: (mean, std), made once

    def view(self, name: str) -> DeviceView:
        if name not in self._views:
            self._views[name] = build_device_view(name, self.config)
        return self._views[name]

    def prepare(self, batch: Any, device) -> Any:
        """A host batch -> the same batch on ``device`` with every requested view made there."""
        from accelerate.utils import send_to_device

        plans: list[DevicePlan] = []
        batch = self._plan(batch, plans)
        batch = send_to_device(batch, device, non_blocking=True)
        return self._apply(batch, [p.to(device) for p in plans])

    def _plan(self, batch, plans: list):
        """Replace every request by the number of its plan (planned here, on the host)."""
        if not isinstance(batch, Mapping):
            return batch
        out = {key: self._plan(value, plans) for key, value in batch.items() if key != BATCH_KEY}
        if BATCH_KEY in batch:
            request, pixels = batch[BATCH_KEY], batch["pixel_values"]
            plans.append(self.view(request["view"]).plan(request["seeds"], request.get("augment"),
                                                          tuple(pixels.shape[-2:])))
            out[BATCH_KEY] = len(plans) - 1
        return out

    def _apply(self, batch, plans: list):
        if not isinstance(batch, Mapping):
            return batch
        out = {k: self._apply(v, plans) for k, v in batch.items() if k != BATCH_KEY}
        if BATCH_KEY in batch:
            plan = plans[batch[BATCH_KEY]]
            pixels = plan.view.apply(batch["pixel_values"], plan)
            out["pixel_values"] = normalize_unit(pixels, *self._normaliser(pixels.device))
        return out

    def _normaliser(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        key = str(device)
        if key not in self._normalisers:
            mean = torch.tensor(self.config.image_mean, dtype=torch.float32).view(1, -1, 1, 1)
            std = torch.tensor(self.config.image_std, dtype=torch.float32).view(1, -1, 1, 1)
            self._normalisers[key] = (mean.to(device), std.to(device))
        return self._normalisers[key]


def normalize_unit(pixels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """float [0, 1] -> (x - mean) / std per channel (what views.normalize_batch does from uint8), in place."""
    return pixels.sub_(mean).div_(std)
