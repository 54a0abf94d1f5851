"""Views: the image augmentations and tabular corruptions a method asks for, seeded per sample.

A *view recipe* pairs an image view and a tabular view under a name (``docs/architecture.md``,
"Views and batches"); a method declares ``{view key: recipe name}`` for its labelled and unlabelled
batches and the loaders (``data_utils/loaders.py``) apply them.

Image views are built from ``torchvision.transforms.v2`` and run on uint8 ``(C, H, W)`` tensors
(one decode per sample, shared by every view of that sample); the loaders stack the uint8 results and
convert a whole batch to float and normalise it at once (`normalize_batch`). Tabular views run on
the *model arrays* of a whole batch (``TabularSchema.encode_columns`` output), vectorised in numpy.

Determinism. Every random decision for a sample comes from a 64-bit seed derived from
``(run seed, stream, pass number, row index, view key)`` (`sample_seeds`): image views reseed torch's
default CPU generator with it right before the v2 transform runs (the loaders save and restore the
generator around a batch, so training RNG is untouched when ``num_workers=0``), and tabular views
hash it into their field/row choices. A batch is therefore identical whatever the worker count and
after a resume. ``stream`` separates the labelled and unlabelled streams, so a row that is in both
(when the unlabelled pool includes labelled rows) gets independent augmentations in each.

Decisions (deliberate; the architecture table in docs/architecture.md summarises the recipes):

* ``ColorJitter`` hue = 0.2 in ``stil``/``hard``: the original code ran albumentations 1.3.1, whose
  hidden default hue is 0.2 (docs/methods.md, "stil"); the torchvision fallback of the originals
  used hue 0, which nobody ran. Cardiac's jitter has p = 0.5 (albumentations' default), DVM's 0.8.
* Gaussian blur kernels are given at the originals' 128 px (29 for ``stil``/``hard``, 19 for the
  DVM ``strong``) and scaled with ``image_size / 128`` (kept odd, >= 3); sigma's range (0.1, 2.0) is
  scaled the same way, so the blur is the same fraction of the image at any size. The kernel is cut
  at 3 sigma when that is smaller than the nominal kernel (the weights beyond 3 sigma sum to < 0.3 %);
  this makes the blur several times faster and visually identical.
* Rotation (cardiac) pads with reflection (torch ``reflect`` == OpenCV ``BORDER_REFLECT_101``, the
  albumentations default) before rotating and crops back, as albumentations' ``Rotate`` does.
* CIFAR pad-crop uses ``RandomCrop(padding=size/8, reflect)``: offsets 0..8 (symmetric), fixing the
  L2I code's 0..7 off-by-one (docs/data.md).
* ``strong`` for the ``default``/``cifar`` presets is weak + ``RandAugment(2 ops, magnitude 15/31)``
  + a square cutout (``RandomErasing`` p=1, 2-25 % of the area, grey 127), which is FixMatch's
  RandAugmentMC (random magnitude in 1..10 of 10, i.e. half strength on average) + Cutout.
  For ``dvm``/``cardiac`` it is the STiL comparison methods' strong view (docs/methods.md, "supervised":
  RRC(0.2-1), flip, ColorJitter(0.4, 0.4, 0.4, 0.1) p 0.8, grayscale p 0.2 (not cardiac), blur 19
  p 0.5), because those are the numbers the STiL tables were produced with.
* ``hard`` is applied with probability ``augmentation_rate`` jointly with its 0.3 corruption (else
  resize + clean row), as the multimodal Match family's labelled stream does.
* Tabular corruption replaces ``k = floor(rate * F)`` distinct fields, each with the value of a
  uniformly drawn row of the pool (the train split by default; see loaders) among the rows where
  that field is *not missing*; the replaced cell takes the donor's value and hence is no longer
  missing. A field with no non-missing value in the pool is left as is. The draw may hit the row
  itself (as in the originals).
* Masking (TIP's masked view) flags ``round(rate * F)`` distinct fields with Python's rounding (banker's:
  17 * 0.5 = 8.5 -> 8, as TIP), zeroes their values and sets ``missing_mask``; the view also carries
  ``masked_fields`` (B, F) bool: which cells the view masked (truly missing cells are not in it), the
  targets of TIP's masked reconstruction.
* Every view that flips does so horizontally with p 0.5; ``hflip=False`` (recipe key ``hflip: false``)
  removes the flip from every view of every preset (digits, text, many medical images).
* Landmarks (``aflw`` preset or task ``landmarks``) only allow views that keep geometry (``eval``)
  or move it with their targets (``translate``; ``weak`` is ``translate`` in the ``aflw`` preset).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

PRESETS = ("default", "dvm", "cardiac", "cifar", "aflw")
REFERENCE_SIZE = 128  # the originals' image size: kernel sizes below are given at this size
IMAGE_VIEWS = ("eval", "weak", "strong", "stil", "stil_always", "hard", "translate")
TABULAR_KINDS = ("clean", "corrupt", "mask")


class ViewError(ValueError):
    """A view cannot be built or applied; the message names the view and the fix."""


# ================================================================================= configuration
@dataclass
class ViewConfig:
    """What the views need to know about the model and the dataset."""

    image_size: int = 128
    num_channels: int = 3
    image_mean: Sequence[float] | None = None  # None: 0 per channel (the originals only divide by 255)
    image_std: Sequence[float] | None = None  # None: 1 per channel
    preset: str = "default"  # default | dvm | cardiac | cifar | aflw: augmentation strengths
    augmentation_rate: float = 0.95  # p of augmenting in stil/masked (image) and hard (joint)
    translate_pixels: int = 4  # translate view: max |shift| in pixels (AFLW: 4 at 60 px)
    # False: no view flips horizontally (digits, text, many medical images: a mirror image is another class)
    hflip: bool = True
    # Resize every image to image_size right after decoding (as the originals' .npy pipeline did:
    # DVM/cardiac arrays were stored at 128 px). None keeps the stored size until a view resizes it.
    decode_to_image_size: bool = True
    seed: int = 0  # run seed: every augmentation derives from it
    # True: batches carry float pixel_values, normalised in the loader (the batch contract).
    # False: they carry uint8 pixel_values (4x less worker->main traffic and pinned memory) and the
    # trainer calls `normalize_pixels(batch, view_config, device)` after moving them (on the GPU).
    normalize_in_loader: bool = True
    # True: the views data_utils.device_views ports are made on the accelerator (the loader ships the
    # resized uint8 image and the rows' seeds); the others stay here. See docs/data.md.
    views_on_device: bool = False

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ViewError(f"unknown view preset {self.preset!r}; choose one of {PRESETS}")
        if self.num_channels not in (1, 3):
            raise ViewError(f"num_channels must be 1 (grayscale) or 3 (RGB), got {self.num_channels}")
        self.image_size = int(self.image_size)
        if self.image_size < 8:
            raise ViewError(f"image_size must be at least 8 pixels, got {self.image_size}")
        mean = 0.0 if self.image_mean is None else self.image_mean
        std = 1.0 if self.image_std is None else self.image_std
        self.image_mean = tuple(float(v) for v in _per_channel(mean, self.num_channels, "image_mean"))
        self.image_std = tuple(float(v) for v in _per_channel(std, self.num_channels, "image_std"))
        if any(s <= 0 for s in self.image_std):
            raise ViewError(f"image_std must be positive, got {self.image_std}")
        if not 0.0 <= self.augmentation_rate <= 1.0:
            raise ViewError(f"augmentation_rate must be in [0, 1], got {self.augmentation_rate}")

    @classmethod
    def from_model_config(cls, config: Any, preset: str = "default", **overrides) -> "ViewConfig":
        """Read image_size/num_channels/image_mean/image_std from a model config (object or dict)."""
        get = config.get if isinstance(config, Mapping) else (lambda k, d=None: getattr(config, k, d))
        channels = int(get("num_channels", 3) or 3)
        values = dict(
            image_size=get("image_size", 128) or 128,
            num_channels=channels,
            image_mean=get("image_mean", None),
            image_std=get("image_std", None),
            preset=preset,
        )
        values.update(overrides)
        return cls(**values)

    @property
    def landmarks(self) -> bool:
        return self.preset == "aflw"


def preset_for_task(preset: str, task: str) -> str:
    """Views follow the task as the model follows the data: on landmark data the ``default`` preset
    becomes ``aflw`` (``weak`` = ``translate``, the one augmentation that moves the targets with the
    pixels), whatever the method; a preset named explicitly is kept."""
    return "aflw" if task == "landmarks" and preset == "default" else preset


def _per_channel(values, channels: int, name: str):
    values = [values] if isinstance(values, (int, float)) else list(values)
    if len(values) == 1:
        values = values * channels
    if len(values) != channels:
        raise ViewError(f"{name} has {len(values)} values but the images have {channels} channel(s)")
    return values


# ================================================================================= seeds
_MASK64 = (1 << 64) - 1


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on a uint64 array (wrapping arithmetic): a cheap, well-mixed hash."""
    x = np.asarray(x, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def base_seed(seed: int, stream: str, view_key: str) -> int:
    """A 64-bit key for (run seed, stream, view key), stable across processes and Python versions."""
    digest = hashlib.blake2b(f"{int(seed)}|{stream}|{view_key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def sample_seeds(seed: int, stream: str, view_key: str, passes, indices) -> np.ndarray:
    """uint64 seed per sample from (run seed, stream, view key, pass number, row index)."""
    passes = np.atleast_1d(np.asarray(passes, dtype=np.int64)).astype(np.uint64)
    indices = np.atleast_1d(np.asarray(indices, dtype=np.int64)).astype(np.uint64)
    key = np.uint64(base_seed(seed, stream, view_key))
    return _mix64(_mix64(key ^ _mix64(passes)) ^ indices)


def _uniform(seeds: np.ndarray, salt: int, width: int | None = None) -> np.ndarray:
    """Uniform [0, 1) floats from per-sample seeds: (B,) or (B, width) with one draw per column."""
    seeds = np.asarray(seeds, dtype=np.uint64)
    salted = _mix64(seeds ^ np.uint64(salt * 0x2545F4914F6CDD1D & _MASK64))
    if width is not None:
        salted = _mix64(salted[:, None] + np.arange(width, dtype=np.uint64)[None, :])
    return (salted >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def torch_seed(seed) -> int:
    """A per-sample uint64 seed as the int torch.Generator.manual_seed accepts."""
    return int(seed) & ((1 << 63) - 1)


# ================================================================================= image views
def _odd(value: float, minimum: int = 3) -> int:
    k = max(minimum, int(round(value)))
    return k if k % 2 == 1 else k + 1


class TruncatedGaussianBlur(v2.Transform):
    """Gaussian blur with sigma ~ U(sigma range) and kernel min(nominal, 2*ceil(3 sigma) + 1)."""

    def __init__(self, kernel_size: int, sigma: tuple[float, float]):
        super().__init__()
        self.kernel_size = int(kernel_size)
        self.sigma = (float(sigma[0]), float(sigma[1]))

    def make_params(self, flat_inputs):
        sigma = torch.empty(1).uniform_(self.sigma[0], self.sigma[1]).item()
        kernel = min(self.kernel_size, 2 * math.ceil(3.0 * sigma) + 1)
        return {"sigma": sigma, "kernel": kernel}

    def transform(self, inpt, params):
        return self._call_kernel(TF.gaussian_blur, inpt, [params["kernel"]] * 2, [params["sigma"]] * 2)


class RandomRotateReflect(v2.Transform):
    """Rotate by U(-degrees, degrees) with reflect-101 borders: pad by reflection, rotate, crop back."""

    def __init__(self, degrees: float):
        super().__init__()
        self.degrees = float(degrees)

    def make_params(self, flat_inputs):
        return {"angle": torch.empty(1).uniform_(-self.degrees, self.degrees).item()}

    def transform(self, inpt, params):
        height, width = inpt.shape[-2:]
        # The rotated frame's corners reach (sqrt(2) - 1) / 2 of the side beyond the image at 45 deg.
        pad = int(math.ceil(max(height, width) * 0.21)) + 1
        padded = self._call_kernel(TF.pad, inpt, [pad], padding_mode="reflect")
        rotated = self._call_kernel(TF.rotate, padded, params["angle"], interpolation=InterpolationMode.BILINEAR)
        return self._call_kernel(TF.center_crop, rotated, [height, width])


class ImageView:
    """One image view: ``view(image_uint8_chw) -> (image_uint8 (C, S, S), translation or None)``.

    With probability ``1 - p`` the sample is only resized (the originals' ``augmentation_rate``).
    The caller seeds torch's default generator per sample before calling (see `apply_image_view`).
    """

    def __init__(self, name: str, transform: Callable | None, size: int, p: float = 1.0,
                 moves_geometry: bool = False, translate_pixels: int = 0):
        self.name = name
        self.transform = transform
        self.size = int(size)
        self.p = float(p)
        self.moves_geometry = moves_geometry  # flips/crops/rotations: targets would no longer match
        self.translate_pixels = int(translate_pixels)

    def _resize(self, image: torch.Tensor) -> torch.Tensor:
        if tuple(image.shape[-2:]) != (self.size, self.size):
            image = TF.resize(image, [self.size, self.size], antialias=True)
        return image

    def __call__(self, image: torch.Tensor):
        if self.translate_pixels:
            return self._translate(self._resize(image))
        if self.transform is None or (self.p < 1.0 and torch.rand(1).item() >= self.p):
            return self._resize(image), None
        return self._resize(self.transform(image)), None

    def _translate(self, image: torch.Tensor):
        m = self.translate_pixels
        shift = torch.randint(-m, m + 1, (2,))  # (tx, ty): content moves right/down by tx/ty
        tx, ty = int(shift[0]), int(shift[1])
        padded = TF.pad(image, [m], padding_mode="reflect")
        moved = TF.crop(padded, m - ty, m - tx, self.size, self.size)
        return moved, torch.tensor([tx, ty], dtype=torch.float32)

    def __repr__(self) -> str:
        return f"ImageView({self.name!r}, p={self.p}, transform={self.transform})"


def _scaled_blur(cfg: ViewConfig, kernel_at_128: int, p: float):
    scale = cfg.image_size / REFERENCE_SIZE
    kernel = _odd(kernel_at_128 * scale)
    blur = TruncatedGaussianBlur(kernel, (0.1 * scale, 2.0 * scale))
    return v2.RandomApply([blur], p=p)


def _jitter(cfg: ViewConfig, strength: float, hue: float, p: float):
    color = cfg.num_channels == 3
    jitter = v2.ColorJitter(brightness=strength, contrast=strength,
                            saturation=strength if color else None, hue=hue if color else None)
    return v2.RandomApply([jitter], p=p)


def _gray(cfg: ViewConfig, p: float) -> list:
    return [v2.RandomGrayscale(p=p)] if cfg.num_channels == 3 else []


def _flip(cfg: ViewConfig) -> list:
    return [v2.RandomHorizontalFlip()] if cfg.hflip else []


def _crop_flip(cfg: ViewConfig, scale: tuple[float, float]) -> list:
    return [v2.RandomResizedCrop(cfg.image_size, scale=scale, ratio=(3 / 4, 4 / 3), antialias=True), *_flip(cfg)]


def _pad_crop_flip(cfg: ViewConfig) -> list:
    size = cfg.image_size
    return [v2.Resize((size, size), antialias=True),
            v2.RandomCrop(size, padding=max(1, round(size / 8)), padding_mode="reflect"), *_flip(cfg)]


def _uses_pad_crop(cfg: ViewConfig) -> bool:
    return cfg.preset == "cifar" or (cfg.preset == "default" and cfg.image_size <= 64)


def _weak(cfg: ViewConfig) -> list:
    return _pad_crop_flip(cfg) if _uses_pad_crop(cfg) else _crop_flip(cfg, (0.2, 1.0))


def _contrastive(cfg: ViewConfig, crop_scale: tuple[float, float]) -> list:
    """STiL/TIP's contrastive augmentation (docs/methods.md, "stil"); ``hard`` uses crop scale 0.6-1."""
    if cfg.preset == "cardiac":
        return [*_flip(cfg), v2.RandomApply([RandomRotateReflect(45)], p=0.5),
                _jitter(cfg, 0.5, 0.2, p=0.5),
                v2.RandomResizedCrop(cfg.image_size, scale=(max(crop_scale[0], 0.2), 1.0), antialias=True)]
    return [_jitter(cfg, 0.8, 0.2, p=0.8), *_gray(cfg, 0.2), _scaled_blur(cfg, 29, p=0.5),
            *_crop_flip(cfg, crop_scale)]


def _strong(cfg: ViewConfig) -> list:
    if cfg.preset in ("dvm", "cardiac"):
        gray = _gray(cfg, 0.2) if cfg.preset == "dvm" else []
        return [*_crop_flip(cfg, (0.2, 1.0)), _jitter(cfg, 0.4, 0.1, p=0.8), *gray, _scaled_blur(cfg, 19, p=0.5)]
    grey = (127,) * cfg.num_channels
    return [*_weak(cfg), v2.RandAugment(num_ops=2, magnitude=15, num_magnitude_bins=31, fill=grey),
            v2.RandomErasing(p=1.0, scale=(0.02, 0.25), ratio=(1.0, 1.0), value=127)]


def build_image_view(name: str, cfg: ViewConfig) -> ImageView:
    """The image view called ``name`` (one of IMAGE_VIEWS) for ``cfg``'s size and preset."""
    size = cfg.image_size
    if name == "translate" or (name == "weak" and cfg.landmarks):
        return ImageView(name, None, size, translate_pixels=max(1, cfg.translate_pixels))
    if name == "eval":
        return ImageView(name, None, size)
    if cfg.landmarks:
        raise ViewError(
            f"image view {name!r} flips/crops the image but the 'aflw' preset is for landmarks, whose "
            "targets would no longer match; use the 'translate' (or 'weak') and 'eval' views"
        )
    builders = {
        "weak": lambda: (_weak(cfg), 1.0),
        "strong": lambda: (_strong(cfg), 1.0),
        "stil": lambda: (_contrastive(cfg, (0.08, 1.0)), cfg.augmentation_rate),
        "stil_always": lambda: (_contrastive(cfg, (0.08, 1.0)), 1.0),
        # hard's probability is applied jointly with its tabular corruption (ViewRecipe.joint_p)
        "hard": lambda: (_contrastive(cfg, (0.6, 1.0)), 1.0),
    }
    if name not in builders:
        raise ViewError(f"unknown image view {name!r}; available: {IMAGE_VIEWS}")
    transforms, p = builders[name]()
    return ImageView(name, v2.Compose(transforms), size, p=p, moves_geometry=True)


@contextlib.contextmanager
def single_threaded():
    """Run per-sample tensor ops on one intra-op thread: small images gain nothing from threads, and
    on a busy machine (or with num_workers=0 beside training) OpenMP spinning makes them 10-50x slower."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def apply_image_view(view: ImageView, images: Sequence[torch.Tensor], seeds: np.ndarray,
                     augment: np.ndarray | None = None, out: torch.Tensor | None = None):
    """Run ``view`` on each uint8 image with its own seed; returns (stacked uint8, translations|None).

    ``augment`` (bool per sample) forces the plain resize where False (joint coins of a recipe);
    ``out`` receives the stacked batch (a shared-memory buffer in DataLoader workers).
    Torch's default CPU generator is saved and restored, so callers' randomness is untouched.
    """
    generator = torch.default_generator
    state = generator.get_state()
    outputs, shifts = [], []
    with single_threaded():
        try:
            for i, image in enumerate(images):
                generator.manual_seed(torch_seed(seeds[i]))
                if augment is not None and not augment[i] and not view.translate_pixels:
                    result, shift = view._resize(image), None
                else:
                    result, shift = view(image)
                outputs.append(result)
                shifts.append(shift)
        finally:
            generator.set_state(state)
    if not outputs:
        stacked = torch.empty(0, dtype=torch.uint8)
    else:
        stacked = torch.stack(outputs) if out is None else torch.stack(outputs, out=out)
    translations = torch.stack(shifts) if shifts and shifts[0] is not None else None
    return stacked, translations


def normalize_batch(images_uint8: torch.Tensor, cfg: ViewConfig, out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 ((x / 255) - mean) / std, in one vectorised pass (into ``out``)."""
    mean = torch.tensor(cfg.image_mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(cfg.image_std, dtype=torch.float32).view(1, -1, 1, 1)
    scale = 1.0 / (255.0 * std)
    if out is None:
        return torch.addcmul(-mean / std, images_uint8.to(torch.float32), scale)
    return torch.addcmul(-mean / std, images_uint8, scale, out=out)


def normalize_pixels(batch: Any, cfg: ViewConfig, device: torch.device | str | None = None,
                     non_blocking: bool = True) -> Any:
    """Walk a (nested) batch; move it to ``device`` and normalise every uint8 ``pixel_values``.

    Use with ``ViewConfig(normalize_in_loader=False)``: normalising on the accelerator is nearly free
    and the loader then ships a quarter of the bytes. Float pixel values are left as they are.
    """
    if isinstance(batch, Mapping):
        out = {}
        for key, value in batch.items():
            if key == "pixel_values" and isinstance(value, torch.Tensor) and value.dtype == torch.uint8:
                value = value.to(device, non_blocking=non_blocking) if device is not None else value
                mean = torch.tensor(cfg.image_mean, dtype=torch.float32, device=value.device).view(1, -1, 1, 1)
                std = torch.tensor(cfg.image_std, dtype=torch.float32, device=value.device).view(1, -1, 1, 1)
                out[key] = torch.addcmul(-mean / std, value.to(torch.float32), 1.0 / (255.0 * std))
            else:
                out[key] = normalize_pixels(value, cfg, device, non_blocking)
        return out
    if isinstance(batch, torch.Tensor) and device is not None:
        return batch.to(device, non_blocking=non_blocking)
    return batch


# ================================================================================= tabular views
@dataclass
class TabularPool:
    """Pre-encoded model arrays of the rows corruption draws replacement values from."""

    categorical: np.ndarray  # (N, n_cat) int64
    continuous: np.ndarray  # (N, n_con) float32
    missing: np.ndarray  # (N, F) bool
    donors: list[np.ndarray] = field(default_factory=list)  # per field: pool rows where it is present

    def __post_init__(self):
        self.donors = [np.flatnonzero(~self.missing[:, j]) for j in range(self.missing.shape[1])]

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], rows: np.ndarray | None = None) -> "TabularPool":
        pick = (lambda a: a) if rows is None else (lambda a: a[rows])
        return cls(pick(arrays["categorical_values"]), pick(arrays["continuous_values"]), pick(arrays["missing_mask"]))

    @property
    def num_fields(self) -> int:
        return self.missing.shape[1]


@dataclass(frozen=True)
class TabularView:
    kind: str = "clean"  # clean | corrupt | mask
    rate: float = 0.0

    def __post_init__(self):
        if self.kind not in TABULAR_KINDS:
            raise ViewError(f"unknown tabular view kind {self.kind!r}; choose one of {TABULAR_KINDS}")
        if not 0.0 <= self.rate <= 1.0:
            raise ViewError(f"tabular view rate must be in [0, 1], got {self.rate}")

    def num_selected(self, num_fields: int) -> int:
        if self.kind == "corrupt":
            return int(math.floor(self.rate * num_fields + 1e-9))
        if self.kind == "mask":
            return int(round(self.rate * num_fields))  # banker's rounding, as TIP
        return 0

    def __call__(self, batch: Mapping[str, np.ndarray], seeds: np.ndarray, pool: TabularPool | None = None,
                 augment: np.ndarray | None = None) -> dict[str, np.ndarray]:
        if self.kind == "corrupt":
            if pool is None:
                raise ViewError("tabular corruption needs a TabularPool to draw replacement values from")
            return corrupt_fields(batch, seeds, self.rate, pool, augment)
        if self.kind == "mask":
            return mask_fields(batch, seeds, self.rate, augment)
        return {k: np.array(batch[k], copy=True) for k in ("categorical_values", "continuous_values", "missing_mask")}


def choose_fields(seeds: np.ndarray, num_fields: int, k: int, salt: int) -> np.ndarray:
    """(B, F) bool: exactly k distinct fields per sample, uniformly, from the sample's seed."""
    seeds = np.asarray(seeds, dtype=np.uint64)
    chosen = np.zeros((seeds.shape[0], num_fields), dtype=bool)
    if k <= 0 or num_fields == 0:
        return chosen
    keys = _uniform(seeds, salt, num_fields)
    order = np.argsort(keys, axis=1, kind="stable")[:, :k]
    np.put_along_axis(chosen, order, True, axis=1)
    return chosen


def corrupt_fields(batch: Mapping[str, np.ndarray], seeds: np.ndarray, rate: float, pool: TabularPool,
                   augment: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Replace floor(rate * F) fields per row by values of random pool rows (empirical marginals).

    Only non-missing pool values are drawn; a replaced cell is therefore present. Rows where
    ``augment`` is False stay clean.
    """
    categorical = np.array(batch["categorical_values"], copy=True)
    continuous = np.array(batch["continuous_values"], copy=True)
    missing = np.array(batch["missing_mask"], copy=True)
    num_cat = categorical.shape[1]
    num_fields = missing.shape[1]
    k = int(math.floor(rate * num_fields + 1e-9))
    chosen = choose_fields(seeds, num_fields, k, salt=1)
    if augment is not None:
        chosen &= np.asarray(augment, dtype=bool)[:, None]
    if not chosen.any():
        return {"categorical_values": categorical, "continuous_values": continuous, "missing_mask": missing}
    draws = _uniform(seeds, 2, num_fields)
    for j in np.flatnonzero(chosen.any(axis=0)):
        donors = pool.donors[j]
        if donors.size == 0:
            continue
        rows = np.flatnonzero(chosen[:, j])
        picked = donors[np.minimum((draws[rows, j] * donors.size).astype(np.int64), donors.size - 1)]
        if j < num_cat:
            categorical[rows, j] = pool.categorical[picked, j]
        else:
            continuous[rows, j - num_cat] = pool.continuous[picked, j - num_cat]
        missing[rows, j] = False
    return {"categorical_values": categorical, "continuous_values": continuous, "missing_mask": missing}


def mask_fields(batch: Mapping[str, np.ndarray], seeds: np.ndarray, rate: float,
                augment: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """TIP's masked view: round(rate * F) fields per row zeroed and flagged in ``missing_mask``."""
    categorical = np.array(batch["categorical_values"], copy=True)
    continuous = np.array(batch["continuous_values"], copy=True)
    missing = np.array(batch["missing_mask"], copy=True)
    num_cat = categorical.shape[1]
    num_fields = missing.shape[1]
    chosen = choose_fields(seeds, num_fields, int(round(rate * num_fields)), salt=3)
    if augment is not None:
        chosen &= np.asarray(augment, dtype=bool)[:, None]
    categorical[chosen[:, :num_cat]] = 0
    continuous[chosen[:, num_cat:]] = 0.0
    masked_fields = chosen & ~missing
    missing |= chosen
    return {"categorical_values": categorical, "continuous_values": continuous, "missing_mask": missing,
            "masked_fields": masked_fields}


# ================================================================================= recipes
@dataclass(frozen=True)
class ViewRecipe:
    """An image view and a tabular view under one name.

    ``joint_p``: when set, one coin per sample decides whether *both* views augment (else plain
    resize + clean row), as the Match family's labelled ``hard`` stream does.
    """

    name: str
    image: str | None
    tabular: TabularView = TabularView()
    joint_p: float | None = None

    def with_rate(self, rate: float) -> "ViewRecipe":
        return replace(self, tabular=replace(self.tabular, rate=rate))


RECIPES: dict[str, ViewRecipe] = {}


def register_recipe(recipe: ViewRecipe, overwrite: bool = False) -> ViewRecipe:
    if recipe.image is not None and recipe.image not in IMAGE_VIEWS:
        raise ViewError(f"recipe {recipe.name!r}: unknown image view {recipe.image!r}; available {IMAGE_VIEWS}")
    if recipe.name in RECIPES and not overwrite and RECIPES[recipe.name] != recipe:
        raise ViewError(f"view recipe {recipe.name!r} is already registered")
    RECIPES[recipe.name] = recipe
    return recipe


for _recipe in (
    ViewRecipe("eval", "eval", TabularView("clean")),
    ViewRecipe("weak", "weak", TabularView("corrupt", 0.1)),
    ViewRecipe("strong", "strong", TabularView("corrupt", 0.3)),
    ViewRecipe("stil", "stil", TabularView("corrupt", 0.3)),
    ViewRecipe("hard", "hard", TabularView("corrupt", 0.3), joint_p=-1.0),  # -1: use augmentation_rate
    ViewRecipe("masked", "stil", TabularView("mask", 0.5)),
    ViewRecipe("translate", "translate", TabularView("clean")),
    # TIP pretraining's view 0: always-augmented image + corrupted row (docs/methods.md, "tip_pretrain").
    ViewRecipe("tip", "stil_always", TabularView("corrupt", 0.3)),
    # TIP pretraining (tip_pretrain): the augmented image, and views that carry a table only (they
    # share the image of the "image" view of the same row)
    ViewRecipe("tip_image", "stil", TabularView("clean")),
    ViewRecipe("tip_masked_table", None, TabularView("mask", 0.5)),
    ViewRecipe("tip_clean_table", None, TabularView("clean")),
    ViewRecipe("tip_corrupted_table", None, TabularView("corrupt", 0.3)),
):
    register_recipe(_recipe)


def get_recipe(recipe: str | ViewRecipe) -> ViewRecipe:
    if isinstance(recipe, ViewRecipe):
        return recipe
    if recipe not in RECIPES:
        raise ViewError(f"unknown view recipe {recipe!r}; available: {sorted(RECIPES)}")
    return RECIPES[recipe]


def resolve_views(views: Mapping[str, str | ViewRecipe] | None) -> dict[str, ViewRecipe]:
    """{view key: recipe name or ViewRecipe} -> {view key: ViewRecipe}, with clear errors."""
    if views is None:
        return {}
    if not isinstance(views, Mapping):
        raise ViewError(f"views must be a mapping {{view key: recipe name}}, got {type(views).__name__}")
    reserved = {"labels", "index", "position", "monitor_labels"}
    bad = sorted(set(views) & reserved)
    if bad:
        raise ViewError(f"view keys {bad} clash with batch keys {sorted(reserved)}; rename them")
    return {key: get_recipe(recipe) for key, recipe in views.items()}


def joint_probability(recipe: ViewRecipe, cfg: ViewConfig) -> float | None:
    if recipe.joint_p is None:
        return None
    return cfg.augmentation_rate if recipe.joint_p < 0 else float(recipe.joint_p)


def joint_coins(seeds: np.ndarray, p: float | None) -> np.ndarray | None:
    """Per-sample bool: augment this sample (p) or not, from its seed; None when no joint coin."""
    if p is None:
        return None
    return _uniform(seeds, 4) < p
