"""Embedded synthetic datasets in the stil data layout (see ``docs/synthetic.md``).

Three generators, all numpy-vectorised, deterministic per seed and written with
`data_utils.io.save_dataset`:

* ``multimodal`` (synth-DVM): car pictures plus a table with DVM's exact schema (4 categorical +
  13 continuous fields). Classes come from a factorised latent ``(a, b, g)``: ``a`` is seen only by
  the image (body motif), ``b`` only by the table (price tier: Entry_price, Engine_size, Fuel_type,
  Gearbox), and the group ``g = (a + b) mod G`` by both (body shape: Length/Height/Bodytype in the
  table, drawn body proportions in the image). Colour and the row's own Length/Height are drawn in
  the picture, so image and row also share *instance-level* information. Either modality alone has
  a Bayes ceiling well below 1; together they identify the class.
* ``image``: a CIFAR-like 10-class RGB set (shape x texture x preferred hue, with clutter).
* ``landmarks``: grayscale faces with 5 keypoints in AFLW order (eyes, nose, mouth corners).

Public entry points: `make_multimodal`, `make_image`, `make_landmarks` (each returns
``(DatasetDict, DatasetMetadata, TabularSchema | None)``), `make_synthetic_dataset` (generate +
save) and `information_budget` (what quick sklearn models reach from each modality).
"""

from __future__ import annotations

import io as _io
import math
import struct
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from .io import DatasetMetadata, save_dataset
from .schema import TabularSchema
from .splits import select_labeled, stratified_split

GENERATOR_VERSION = "1.0.0"
TASKS = ("multimodal", "image", "landmarks")
MIN_IMAGE_SIZE = 16
MAX_IMAGE_SIZE = 512

# --------------------------------------------------------------------------------------------------
# DVM schema with synthetic vocabularies (cardinalities 22 / 13 / 3 / 12, reordered column order)
# --------------------------------------------------------------------------------------------------
COLORS = [
    "Black", "Silver", "White", "Grey", "Blue", "Red", "Green", "Beige", "Bronze", "Brown", "Burgundy",
    "Gold", "Indigo", "Magenta", "Maroon", "Multicolour", "Navy", "Orange", "Pink", "Purple", "Turquoise",
    "Yellow",
]
# RGB in [0, 1], one per colour above (what the body is painted with).
COLOR_RGB = np.array([
    [0.08, 0.08, 0.09], [0.72, 0.74, 0.76], [0.95, 0.95, 0.93], [0.45, 0.46, 0.48], [0.15, 0.30, 0.75],
    [0.80, 0.10, 0.10], [0.15, 0.55, 0.20], [0.85, 0.78, 0.60], [0.70, 0.45, 0.20], [0.45, 0.28, 0.12],
    [0.50, 0.05, 0.15], [0.85, 0.70, 0.15], [0.25, 0.10, 0.50], [0.85, 0.15, 0.65], [0.45, 0.05, 0.05],
    [0.55, 0.35, 0.65], [0.05, 0.10, 0.35], [0.95, 0.50, 0.05], [0.95, 0.60, 0.75], [0.50, 0.20, 0.60],
    [0.10, 0.70, 0.70], [0.95, 0.90, 0.10],
], dtype=np.float32)
COLOR_PRIOR = np.array([0.18, 0.16, 0.15, 0.13, 0.11] + [0.27 / 17] * 17)
BODYTYPES = [
    "Hatchback", "Saloon", "Estate", "SUV", "MPV", "Pickup", "Convertible", "Coupe", "Limousine",
    "Minibus", "Panel Van", "Window Van", "Camper",
]
# (seats, doors) typical of each body type
BODY_SEATS_DOORS = np.array([
    [5, 5], [5, 4], [5, 5], [5, 5], [7, 5], [5, 4], [4, 2], [4, 2], [5, 4], [9, 4], [3, 4], [8, 4], [4, 3],
], dtype=np.float64)
# body types typical of each shape group (group g draws 90 % of its rows from row g % 4)
GROUP_BODYTYPES = [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
GEARBOXES = ["Manual", "Automatic", "Semi-Automatic"]
FUEL_TYPES = [
    "Petrol", "Diesel", "Hybrid Petrol/Electric", "Petrol Plug-in Hybrid", "Electric", "Hybrid Diesel/Electric",
    "Diesel Plug-in Hybrid", "Bi Fuel", "Petrol Ethanol", "LPG", "CNG", "Hydrogen",
]
CATEGORICAL_FIELDS = {"Color": COLORS, "Bodytype": BODYTYPES, "Gearbox": GEARBOXES, "Fuel_type": FUEL_TYPES}
CONTINUOUS_FIELDS = [
    "Wheelbase", "Height", "Width", "Length", "Adv_year", "Adv_month", "Reg_year", "Runned_Miles", "Price",
    "Seat_num", "Door_num", "Entry_price", "Engine_size",
]
# Body motifs (image-only factor a): kind = a % 5, level = a // 5 (finer period at higher levels;
# kind 4 is a plain body at level 0 and a checker board above). All survive a horizontal flip.
MOTIF_KINDS = ["horizontal stripes", "vertical stripes", "diagonal hatch", "dots", "plain"]
LANDMARK_NAMES = ["left_eye", "right_eye", "nose", "mouth_left", "mouth_right"]
SHAPES = ["disc", "square", "triangle", "cross", "ring"]
TEXTURES = ["solid", "stripes", "dots"]

DEFAULTS = {
    "multimodal": {"num_samples": 20000, "num_classes": 20, "image_size": 64},
    "image": {"num_samples": 20000, "num_classes": 10, "image_size": 32},
    "landmarks": {"num_samples": 10000, "num_classes": None, "image_size": 60},
}


class SyntheticConfigError(ValueError):
    """Invalid generator arguments; the message names the fix."""


@dataclass
class MultimodalKnobs:
    """Difficulty knobs of the synth-DVM generator (docs/synthetic.md, docs/synthetic.md)."""

    image_factors: int = 5  # A: image-only factor (body motif); grown with table_factors when K > A*B
    table_factors: int = 4  # B: table-only factor (price tier)
    groups: int = 2  # G: shared body group, g = (a + b) mod G
    motif_confusion: float = 0.03  # probability the drawn motif is another one
    tab_noise: float = 1.0  # scale on every within-tier / within-group spread of the table
    group_spread_mm: float = 120.0  # per-sample sd of Length within a group
    pixel_noise: float = 0.03  # Gaussian pixel noise sd (images in [0, 1])
    color_in_image: bool = True  # paint the body with the row's Color (the colour shortcut)
    class_leak_tab: float = 0.0  # class-specific Entry_price offset: raises table-only accuracy
    imbalance: float = 0.0  # class prior proportional to rank ** -imbalance


# ==================================================================================================
# argument checks
# ==================================================================================================
def check_arguments(
    task: str,
    num_samples: int | None = None,
    num_classes: int | None = None,
    image_size: int | None = None,
    labeled_fraction: float = 0.01,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
) -> dict[str, Any]:
    """Fill task defaults and refuse bad values with a one-line message that names the fix."""
    if task not in TASKS:
        raise SyntheticConfigError(f"unknown task {task!r}; choose one of {', '.join(TASKS)} (--task)")
    defaults = DEFAULTS[task]
    num_samples = defaults["num_samples"] if num_samples is None else num_samples
    image_size = defaults["image_size"] if image_size is None else image_size
    if task == "landmarks":
        if num_classes is not None:
            raise SyntheticConfigError("the landmarks task has no classes; drop --num-classes")
    else:
        num_classes = defaults["num_classes"] if num_classes is None else num_classes
        if int(num_classes) != num_classes or num_classes < 2:
            raise SyntheticConfigError(f"--num-classes must be an integer >= 2, got {num_classes}")
        if task == "image" and num_classes > 60:
            raise SyntheticConfigError(f"the image task supports at most 60 classes, got {num_classes}; lower --num-classes")
        if task == "multimodal" and num_classes > 400:
            raise SyntheticConfigError(f"the multimodal task supports at most 400 classes, got {num_classes}; lower --num-classes")
    if int(image_size) != image_size or not MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE:
        raise SyntheticConfigError(
            f"--image-size must be an integer in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}], got {image_size}"
        )
    if not (0.0 < labeled_fraction <= 1.0):
        raise SyntheticConfigError(f"--labeled-fraction must be in (0, 1], got {labeled_fraction}")
    for name, value in (("--val-fraction", val_fraction), ("--test-fraction", test_fraction)):
        if not (0.0 < value < 1.0):
            raise SyntheticConfigError(f"{name} must be in (0, 1), got {value}")
    if val_fraction + test_fraction >= 0.9:
        raise SyntheticConfigError(
            f"--val-fraction + --test-fraction = {val_fraction + test_fraction:g} leaves under 10 % for training; "
            "lower them"
        )
    per_split = 1 if num_classes is None else int(num_classes)
    smallest = min(val_fraction, test_fraction, 1 - val_fraction - test_fraction)
    minimum = int(math.ceil(2 * per_split / smallest))
    if int(num_samples) != num_samples or num_samples < max(minimum, 10):
        raise SyntheticConfigError(
            f"--num-samples must be an integer >= {max(minimum, 10)} so every split holds every class "
            f"at least twice, got {num_samples}; raise --num-samples"
        )
    return {
        "num_samples": int(num_samples), "num_classes": None if num_classes is None else int(num_classes),
        "image_size": int(image_size), "labeled_fraction": float(labeled_fraction),
        "val_fraction": float(val_fraction), "test_fraction": float(test_fraction),
    }


# ==================================================================================================
# small numpy helpers
# ==================================================================================================
def _streams(seed: int, names: Iterable[str]) -> dict[str, np.random.Generator]:
    """Independent, named random streams derived from one seed (adding a stream changes no other)."""
    out = {}
    for name in names:
        key = [int(seed)] + [ord(ch) for ch in name]
        out[name] = np.random.default_rng(np.random.SeedSequence(key))
    return out


def _coverage(sdf: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage of a shape from its signed distance in pixels (negative inside)."""
    return np.clip(0.5 - sdf, 0.0, 1.0)


def _box_sdf(u, v, half_u, half_v, radius):
    """Signed distance to a rounded box centred at the origin (all in pixels, broadcastable)."""
    qu = np.abs(u) - half_u + radius
    qv = np.abs(v) - half_v + radius
    outside = np.sqrt(np.maximum(qu, 0.0) ** 2 + np.maximum(qv, 0.0) ** 2)
    return outside + np.minimum(np.maximum(qu, qv), 0.0) - radius


def _upsample_matrix(source: int, target: int) -> np.ndarray:
    """(target, source) bilinear interpolation matrix (pixel centres aligned)."""
    position = (np.arange(target) + 0.5) * source / target - 0.5
    position = np.clip(position, 0, source - 1)
    low = np.floor(position).astype(int)
    high = np.minimum(low + 1, source - 1)
    frac = position - low
    matrix = np.zeros((target, source), dtype=np.float32)
    matrix[np.arange(target), low] += 1 - frac
    matrix[np.arange(target), high] += frac
    return matrix


def _smooth_field(rng: np.random.Generator, n: int, size: int, channels: int, cells: int = 4) -> np.ndarray:
    """(n, size, size, channels) smooth random field in [-1, 1] (cells x cells noise, bilinear)."""
    noise = rng.uniform(-1, 1, size=(n, cells, cells, channels)).astype(np.float32)
    m = _upsample_matrix(cells, size)
    return np.einsum("ik,nklc,jl->nijc", m, noise, m, optimize=True)


def _hsv_to_rgb(h, s, v):
    """Vectorised HSV -> RGB (all arrays in [0, 1]); returns (..., 3)."""
    h6 = (np.asarray(h) % 1.0) * 6.0
    c = v * s
    x = c * (1 - np.abs(h6 % 2 - 1))
    m = v - c
    sector = np.floor(h6).astype(int) % 6
    zeros = np.zeros_like(c)
    r = np.choose(sector, [c, x, zeros, zeros, x, c])
    g = np.choose(sector, [x, c, c, x, zeros, zeros])
    b = np.choose(sector, [zeros, zeros, x, c, c, x])
    return np.stack([r + m, g + m, b + m], axis=-1)


def _composite(background: np.ndarray, layers, m: int) -> np.ndarray:
    """Paint ``layers`` (top first) over ``background`` (m, S, S, C) in one pass per channel.

    Each layer is ``(coverage (m, S, S), colour)`` with colour a scalar, a C-tuple or an (m, C)
    array. The weight of a layer is its coverage times what the layers above leave visible, so the
    result equals sequential alpha blending but costs one weighted sum instead of a blend per layer.
    """
    channels = background.shape[-1]
    remaining = np.ones(background.shape[:3], dtype=np.float32)
    planes = np.empty((channels,) + background.shape[:3], dtype=np.float32)  # channel-first accumulator
    planes[:] = 0.0
    for coverage, colour in layers:
        weight = coverage * remaining
        remaining *= 1.0 - coverage
        colour = np.asarray(colour, dtype=np.float32)
        colour = np.broadcast_to(colour if colour.ndim == 2 else colour.reshape(1, -1), (m, channels))
        for c in range(channels):
            planes[c] += weight * colour[:, c, None, None]
    for c in range(channels):
        planes[c] += background[..., c] * remaining
    return np.ascontiguousarray(np.moveaxis(planes, 0, -1))


def _png_batch(pixels: np.ndarray) -> list[bytes]:
    """Encode (m, H, W[, 3]) uint8 images as PNG (8-bit RGB or L, filter 0, zlib level 1).

    A minimal encoder following the PNG specification: much faster than PIL for many small images,
    whose per-call overhead dominates. Any PNG reader (PIL included) decodes the result.
    """
    m, height, width = pixels.shape[:3]
    colour_type = 2 if pixels.ndim == 4 else 0
    rows = pixels.reshape(m, height, -1)
    filtered = np.concatenate([np.zeros((m, height, 1), dtype=np.uint8), rows], axis=2).reshape(m, -1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    head = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0))
    tail = chunk(b"IEND", b"")
    return [head + chunk(b"IDAT", zlib.compress(row.tobytes(), 1)) + tail for row in filtered]


def _chunks(n: int, image_size: int, channels: int):
    """Sample ranges whose float32 canvases stay around 16 MB each."""
    step = int(np.clip(4_000_000 // (image_size * image_size * channels), 8, 1024))
    return [(start, min(n, start + step)) for start in range(0, n, step)]


def _render_all(
    n: int, image_size: int, channels: int, render: Callable[[int, int, np.random.Generator], np.ndarray],
    seed: int, progress: bool, description: str, pixel_noise: float,
) -> list[bytes]:
    """Render every chunk, add Gaussian pixel noise (seeded per chunk start), PNG-encode."""
    chunks = _chunks(n, image_size, channels)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc=description, unit="img")
    encoded: list[bytes] = []
    for start, stop in chunks:
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x1A6E, start]))
        pixels = render(start, stop, rng)  # float in [0, 1]: (m, S, S, C) or (m, S, S)
        pixels *= 255.0
        pixels += rng.standard_normal(pixels.shape, dtype=np.float32) * np.float32(255.0 * pixel_noise) + 0.5
        np.clip(pixels, 0, 255, out=pixels)
        encoded.extend(_png_batch(pixels.astype(np.uint8)))
        if bar is not None:
            bar.update(stop - start)
    if bar is not None:
        bar.close()
    return encoded


def _labeled_rows(train_labels: np.ndarray, fraction: float, seed: int, stratified: bool):
    """Labelled train rows via select_labeled: stratified with >= 1 per class (or plain random)."""
    n = train_labels.size
    num_classes = np.unique(train_labels).size if stratified else 1
    requested = int(round(fraction * n))
    count = min(n, max(requested, num_classes))
    labels = train_labels if stratified else np.zeros(n, dtype=np.int64)
    indices = select_labeled(labels, num_labeled=count, seed=seed, min_per_class=1)
    info = {
        "protocol": ("stratified by class, at least one labelled row per class" if stratified
                     else "uniformly random rows (no classes)") + " (data_utils.splits.select_labeled)",
        "fraction": fraction, "requested": requested, "num_labeled": int(indices.size), "seed": seed,
    }
    if count != requested:
        info["note"] = f"raised from {requested} to {count} so every class has a labelled row"
    return indices, info


def _split_and_label(args: dict[str, Any], seed: int, rng: np.random.Generator, labels: np.ndarray | None = None):
    """Split the rows and pick the labelled train rows: ``(splits, labelled train positions, split_info)``.

    With class ``labels`` both are stratified by class; without (landmarks) both are uniformly random.
    """
    val_fraction, test_fraction = args["val_fraction"], args["test_fraction"]
    if labels is None:  # rows in one shuffled pool: test, then validation, rest train
        test, validation, train = stratified_split(None, [test_fraction, val_fraction], rounding="overall_share", rng=rng,
                                                   num_rows=args["num_samples"])
        train_labels, protocol = np.zeros(train.size, dtype=np.int64), "uniformly random"
    else:
        # each class rounds its own share, at least one row per class in validation and test
        test, validation, train = stratified_split(labels, [test_fraction, val_fraction], rounding="class_share", rng=rng)
        train_labels, protocol = labels[train], "stratified by class"
    splits = {"train": train, "validation": validation, "test": test}
    labeled, split_info = _labeled_rows(train_labels, args["labeled_fraction"], seed + 1, stratified=labels is not None)
    split_info.update({
        "split_seed": seed, "val_fraction": val_fraction, "test_fraction": test_fraction,
        "split_protocol": f"{protocol}: test, then validation, rest train",
        "split_sizes": {k: int(v.size) for k, v in splits.items()},
    })
    return splits, labeled, split_info


def _build_splits(encoded: list[bytes], columns: dict[str, Any], features: dict[str, Any],
                  splits: dict[str, np.ndarray], labeled_indices):
    """DatasetDict of the PNG ``encoded`` images (first column) plus ``columns``; train gets ``labeled``."""
    import datasets

    columns = {"image": [{"bytes": b, "path": None} for b in encoded], **columns}
    features = {"image": datasets.Image(), **features}
    out = {}
    for name, idx in splits.items():
        data = {}
        for key, values in columns.items():
            if isinstance(values, np.ndarray):
                data[key] = values[idx]
            else:
                data[key] = [values[i] for i in idx]
        split_features = features
        if name == "train":
            mask = np.zeros(idx.size, dtype=bool)
            mask[labeled_indices] = True
            data["labeled"] = mask
            split_features = {**features, "labeled": datasets.Value("bool")}
        out[name] = datasets.Dataset.from_dict(data, features=datasets.Features(split_features))
    return datasets.DatasetDict(out)


def _metadata(generator: str, labeled, split_info: dict[str, Any], label_names: list[str] | None = None,
              **source: Any) -> DatasetMetadata:
    """The stil metadata every generator writes; ``source`` follows the builder/task/version keys."""
    return DatasetMetadata(
        task="landmarks" if generator == "landmarks" else "classification", image_column="image",
        label_column="label", label_names=label_names, num_targets=10 if generator == "landmarks" else None,
        labeled_column="labeled", labeled_indices=[int(i) for i in labeled], split_info=split_info,
        source={"builder": "synthetic", "task": generator, "generator_version": GENERATOR_VERSION, **source},
    )


# ==================================================================================================
# multimodal: synth-DVM
# ==================================================================================================
def factor_grid(num_classes: int, image_factors: int, table_factors: int, groups: int, seed: int):
    """Assign each class a distinct (a, b) cell and its group g = (a + b) mod G.

    When K > A*B the grid grows (the smaller side first, keeping A close to B). When K < A*B the
    first K cells of a seeded permutation are used, then classes are ordered by (a, b).
    """
    A, B = int(image_factors), int(table_factors)
    while A * B < num_classes:
        if A <= B:
            A += 1
        else:
            B += 1
    cells = np.array([(a, b) for a in range(A) for b in range(B)])
    if num_classes < A * B:
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xFAC7]))
        cells = cells[np.sort(rng.permutation(A * B)[:num_classes])]
    a, b = cells[:, 0], cells[:, 1]
    g = (a + b) % groups
    return a.astype(np.int64), b.astype(np.int64), g.astype(np.int64), A, B


def bayes_ceilings(a, b, g, prior=None) -> dict[str, float]:
    """Noise-free Bayes accuracies: each modality sees its factors exactly, nothing else.

    For an observation o the best guess is the most probable class among those that produce o, so
    accuracy = sum over distinct observations of the largest class prior among them.
    """
    a, b, g = map(np.asarray, (a, b, g))
    prior = np.full(a.size, 1.0 / a.size) if prior is None else np.asarray(prior, dtype=np.float64)

    def ceiling(keys):
        best: dict[tuple, float] = {}
        for c, key in enumerate(zip(*keys)):
            best[key] = max(best.get(key, 0.0), prior[c])
        return round(float(sum(best.values())), 6)

    return {
        "image_only": ceiling((a, g)),
        "table_only": ceiling((b, g)),
        "joint": ceiling((a, b, g)),
        "chance": round(float(prior.max()), 6),
    }


def _class_prior(num_classes: int, imbalance: float) -> np.ndarray:
    weights = np.arange(1, num_classes + 1, dtype=np.float64) ** (-float(imbalance))
    return weights / weights.sum()


def _draw_labels(n: int, prior: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Class labels with counts as close as possible to n * prior (largest remainders), shuffled."""
    quota = n * prior
    counts = np.floor(quota).astype(int)
    order = np.argsort(-(quota - counts), kind="stable")
    counts[order[: n - counts.sum()]] += 1
    return rng.permutation(np.repeat(np.arange(prior.size), counts))


def _make_table(y, a_c, b_c, g_c, A, B, G, knobs: MultimodalKnobs, rng: np.random.Generator):
    """Raw DVM-like columns (codes for categorical, physical units for continuous)."""
    n = y.size
    b, g = b_c[y], g_c[y]
    tier = b / max(B - 1, 1)
    shape = g / max(G - 1, 1)
    noise = float(knobs.tab_noise)
    cols: dict[str, np.ndarray] = {}

    # Bodytype: 90 % from the group's three typical body types, 10 % anywhere.
    home = np.array([GROUP_BODYTYPES[k % len(GROUP_BODYTYPES)] for k in range(G)])
    typical = home[g, rng.integers(0, 3, n)]
    anywhere = rng.integers(0, len(BODYTYPES), n)
    cols["Bodytype"] = np.where(rng.random(n) < 0.9, typical, anywhere)
    seats, doors = BODY_SEATS_DOORS[cols["Bodytype"]].T
    seats = seats + np.where(rng.random(n) < 0.1, rng.choice([-1.0, 2.0], n), 0.0)
    doors = np.where(rng.random(n) < 0.12, np.maximum(doors - 2, 2), doors)

    # Physical dimensions (mm): group means, a shared size latent, per-dimension spread, DVM jitter.
    size = rng.standard_normal(n)
    spread = knobs.group_spread_mm * noise / 120.0
    dims = {
        "Length": 4250 + 500 * shape + spread * 120 * (0.8 * size + 0.6 * rng.standard_normal(n)),
        "Height": 1450 + 280 * shape + spread * 55 * (0.5 * size + 0.87 * rng.standard_normal(n)),
        "Width": 1770 + 130 * shape + spread * 45 * (0.7 * size + 0.71 * rng.standard_normal(n)),
        "Wheelbase": 2600 + 250 * shape + spread * 80 * (0.8 * size + 0.6 * rng.standard_normal(n)),
    }
    for name, value in dims.items():
        cols[name] = np.round(value) + rng.integers(-50, 51, n)  # "jittered_50"

    # Tier: Entry_price, Engine_size, Fuel_type, Gearbox.
    log_price = np.log(14000) + tier * (np.log(60000) - np.log(14000))
    if knobs.class_leak_tab:
        offsets = np.linspace(-0.5, 0.5, y.max() + 1)[np.random.default_rng(len(a_c)).permutation(y.max() + 1)]
        log_price = log_price + knobs.class_leak_tab * offsets[y]
    cols["Entry_price"] = np.round(np.exp(log_price + 0.15 * noise * rng.standard_normal(n)), -1)
    engine = 1.2 + 1.8 * tier + 0.2 * noise * rng.standard_normal(n)
    cols["Engine_size"] = np.round(np.clip(engine, 0.8, 6.5), 1)
    fuel_weights = np.full((n, len(FUEL_TYPES)), 0.004)
    for code, low, high in ((0, 0.70, 0.20), (1, 0.25, 0.40), (2, 0.02, 0.20), (3, 0.01, 0.15), (4, 0.01, 0.06)):
        fuel_weights[:, code] = low + (high - low) * tier
    cumulative = np.cumsum(fuel_weights / fuel_weights.sum(1, keepdims=True), axis=1)
    cols["Fuel_type"] = np.minimum((rng.random(n)[:, None] > cumulative).sum(1), len(FUEL_TYPES) - 1)
    p_auto = 0.2 + 0.65 * tier
    r = rng.random(n)
    cols["Gearbox"] = np.where(r < p_auto, 1, np.where(r < p_auto + 0.05, 2, 0))

    # Nuisance columns (label-independent apart from Price's confounded path through the tier).
    cols["Color"] = rng.choice(len(COLORS), size=n, p=COLOR_PRIOR)
    cols["Adv_year"] = np.where(rng.random(n) < 0.1, 2017.0, 2018.0)
    cols["Adv_month"] = rng.integers(1, 13, n).astype(np.float64)
    cols["Reg_year"] = np.floor(2005 + rng.random(n) * (cols["Adv_year"] - 2005 + 1))
    age = np.maximum(cols["Adv_year"] - cols["Reg_year"] + (cols["Adv_month"] - 6) / 12, 0.1)
    cols["Runned_Miles"] = np.round(np.maximum(age * rng.normal(8000, 2000, n), 0))
    wear = np.maximum(1 - cols["Runned_Miles"] / 400_000, 0.2)
    price = cols["Entry_price"] * 0.85 ** age * wear * np.exp(0.1 * rng.standard_normal(n))
    cols["Price"] = np.round(price, -1)
    cols["Seat_num"], cols["Door_num"] = seats, doors
    return cols


def _motif_name(motif: int) -> str:
    kind, level = motif % len(MOTIF_KINDS), motif // len(MOTIF_KINDS)
    name = "checker" if (kind == 4 and level > 0) else MOTIF_KINDS[kind]
    return name if level == 0 else f"{name} (level {level})"


def _render_cars(params: dict[str, np.ndarray], size: int):
    """Vectorised car renderer; ``params`` holds per-sample arrays, returns a chunk renderer."""
    centres = np.arange(size, dtype=np.float32) + 0.5

    def render(start: int, stop: int, rng: np.random.Generator) -> np.ndarray:
        p = {k: v[start:stop, None, None].astype(np.float32) for k, v in params.items() if v.ndim == 1}
        m = stop - start
        x = centres[None, None, :] - p["cx"]
        y = centres[None, :, None] - p["ground"]
        cos, sin = np.cos(p["theta"]), np.sin(p["theta"])
        u = (cos * x + sin * y) * p["flip"]  # along the car, + = front
        w = sin * x - cos * y  # height above the ground line
        L, H, R = p["length_px"], p["height_px"], p["wheel_px"]

        lower = _box_sdf(u, w - 0.36 * H, L / 2, 0.22 * H, np.minimum(0.1 * H, L / 4))
        # cabin: trapezoid between the waist (0.55 H) and the roof (H); SUVs have steeper pillars
        rear_b, front_b = -0.40 * L, 0.22 * L
        rear_t, front_t = rear_b + p["pillar"] * L, front_b - 1.6 * p["pillar"] * L
        waist, roof = 0.55 * H, H

        def edge(u0, w0, u1, w1, sign):
            nu, nw = (w1 - w0), -(u1 - u0)
            norm = np.sqrt(nu ** 2 + nw ** 2)
            return sign * ((u - u0) * nu + (w - w0) * nw) / norm

        cabin = np.maximum.reduce([
            waist - w, w - roof,
            edge(rear_b, waist, rear_t, roof, -1.0),
            edge(front_b, waist, front_t, roof, 1.0),
        ])
        inset = 0.13 * H
        window = np.maximum(cabin + inset, waist + 0.05 * H - w)
        wheels = np.minimum(
            np.sqrt((u - p["axle_px"]) ** 2 + (w - R) ** 2), np.sqrt((u + p["axle_px"]) ** 2 + (w - R) ** 2)
        ) - R
        hubs = wheels + 0.55 * R

        # body motif in body coordinates (pixels), random phase
        period = p["period"]
        su = 2 * np.pi * (u / period + p["phase_u"])
        sw = 2 * np.pi * (w / period + p["phase_w"])
        kind = params["motif"][start:stop]
        pattern = np.empty((m, size, size), dtype=np.float32)
        for k in range(len(MOTIF_KINDS)):
            sel = np.flatnonzero(kind == k)
            if sel.size == 0:
                continue
            a, b = su[sel], sw[sel]
            if k == 0:
                wave = np.sin(b)
            elif k == 1:
                wave = np.sin(a)
            elif k == 2:
                wave = np.maximum(np.sin((a + b) / np.sqrt(2)), np.sin((a - b) / np.sqrt(2))) * 2.0 - 1.0
            elif k == 3:
                wave = (np.cos(a) + np.cos(b)) * 1.5 - 1.5
            else:
                checker = params["level"][start:stop][sel, None, None] > 0
                wave = np.where(checker, np.sign(np.sin(a) * np.sin(b)), -10.0)
            pattern[sel] = np.clip(0.5 + 1.5 * wave, 0.0, 1.0)

        body_rgb = params["body_rgb"][start:stop]
        luminance = body_rgb @ np.array([0.3, 0.59, 0.11], dtype=np.float32)
        contrast = np.where(luminance < 0.5, 0.92, 0.06).astype(np.float32)[:, None] * np.ones(3, np.float32)
        body = np.maximum(_coverage(lower), _coverage(cabin))
        stripe = 0.6 * pattern
        background = p["bg_level"][..., None] + 0.1 * _smooth_field(rng, m, size, 3)
        # layers from the top: (coverage, colour (m, 3)); the painted body is two layers mixed by the motif
        return _composite(background, [
            (_coverage(hubs), 0.6), (_coverage(wheels), 0.1), (_coverage(window), (0.18, 0.22, 0.28)),
            (body * stripe, contrast), (body, body_rgb), (np.clip(0.5 - w, 0, 1) * 0.5, 0.25),
        ], m)

    return render


def car_image_params(table: dict[str, np.ndarray], motif: np.ndarray, group_shape: np.ndarray, image_size: int,
                     rng: np.random.Generator, color_in_image: bool = True) -> dict[str, np.ndarray]:
    """Per-sample drawing parameters of the car pictures.

    The body is drawn from the row's own raw ``Length``, ``Height`` and ``Wheelbase`` (instance-level
    shared geometry) and painted with its ``Color``; ``motif`` is the image-only factor and
    ``group_shape`` in [0, 1] the body group (steeper pillars and bigger wheels towards 1).
    Nuisances: zoom, centre and ground-line jitter, small roll, horizontal flip, background.
    """
    S, n, r = image_size, motif.size, rng
    zoom = r.uniform(0.9, 1.0, n)
    mm_to_px = 0.80 * S / 5000.0 * zoom
    level = motif // len(MOTIF_KINDS)
    colour_code = table["Color"] if color_in_image else r.choice(len(COLORS), size=n, p=COLOR_PRIOR)
    return {
        "cx": S / 2 + r.uniform(-0.06, 0.06, n) * S,
        "ground": S * (0.74 + r.uniform(-0.04, 0.04, n)),
        "theta": np.deg2rad(r.uniform(-5, 5, n)),
        "flip": np.where(r.random(n) < 0.5, -1.0, 1.0),
        "length_px": table["Length"] * mm_to_px,
        "height_px": table["Height"] * mm_to_px * 1.5,  # cartoon: exaggerated height
        "axle_px": table["Wheelbase"] * mm_to_px / 2,
        "wheel_px": 330 * mm_to_px * 1.5 * (1 + 0.15 * group_shape),
        "pillar": 0.16 - 0.11 * group_shape + r.uniform(-0.02, 0.02, n),
        "period": np.maximum(2.5, S * 0.15 * 0.6 ** level),
        "phase_u": r.random(n), "phase_w": r.random(n),
        "motif": motif % len(MOTIF_KINDS), "level": level,
        "bg_level": r.uniform(0.3, 0.7, n),
        "body_rgb": np.clip(COLOR_RGB[colour_code] * r.uniform(0.9, 1.1, n)[:, None], 0, 1),
    }


def make_multimodal(
    num_samples: int | None = None,
    num_classes: int | None = None,
    image_size: int | None = None,
    seed: int = 2022,
    labeled_fraction: float = 0.01,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    progress: bool = False,
    knobs: MultimodalKnobs | None = None,
):
    """synth-DVM: ``(DatasetDict, DatasetMetadata, TabularSchema)`` (see the module docstring)."""
    import datasets

    args = check_arguments("multimodal", num_samples, num_classes, image_size, labeled_fraction, val_fraction,
                           test_fraction)
    knobs = knobs or MultimodalKnobs()
    if not 1 <= knobs.groups <= 4:
        raise SyntheticConfigError(f"groups must be in [1, 4], got {knobs.groups}")
    n, K, S = args["num_samples"], args["num_classes"], args["image_size"]
    rngs = _streams(seed, ["labels", "table", "image", "split", "motif"])
    a_c, b_c, g_c, A, B = factor_grid(K, knobs.image_factors, knobs.table_factors, knobs.groups, seed)
    G = knobs.groups
    prior = _class_prior(K, knobs.imbalance)
    y = _draw_labels(n, prior, rngs["labels"])
    table = _make_table(y, a_c, b_c, g_c, A, B, G, knobs, rngs["table"])

    # ---- per-sample image parameters (all drawn up front: results do not depend on chunking)
    motif = a_c[y].copy()
    confused = rngs["motif"].random(n) < knobs.motif_confusion
    if A > 1:
        motif[confused] = (motif[confused] + rngs["motif"].integers(1, A, confused.sum())) % A
    params = car_image_params(table, motif, g_c[y] / max(G - 1, 1), S, rngs["image"], knobs.color_in_image)
    encoded = _render_all(n, S, 3, _render_cars(params, S), seed, progress, "rendering cars",
                           knobs.pixel_noise)

    splits, labeled, split_info = _split_and_label(args, seed, rngs["split"], labels=y)
    train = splits["train"]
    schema = TabularSchema.fit(
        {k: table[k][train] for k in list(CATEGORICAL_FIELDS) + CONTINUOUS_FIELDS},
        categorical=list(CATEGORICAL_FIELDS), continuous=CONTINUOUS_FIELDS, allow_missing=True,
        categories=CATEGORICAL_FIELDS,
    )
    label_names = [f"model_{c:03d}" if K > 100 else f"model_{c:02d}" for c in range(K)]
    features = {
        **{name: datasets.ClassLabel(names=vocab) for name, vocab in CATEGORICAL_FIELDS.items()},
        **{name: datasets.Value("float32") for name in CONTINUOUS_FIELDS},
        "label": datasets.ClassLabel(names=label_names),
    }
    columns: dict[str, Any] = {name: table[name].astype(np.int64) for name in CATEGORICAL_FIELDS}
    columns.update({name: table[name].astype(np.float32) for name in CONTINUOUS_FIELDS})
    columns["label"] = y
    dataset_dict = _build_splits(encoded, columns, features, splits, labeled)

    ceilings = bayes_ceilings(a_c, b_c, g_c, prior)
    metadata = _metadata(
        "multimodal", labeled, split_info, label_names,
        args={**args, "seed": seed}, knobs=asdict(knobs),
        factor_sizes={"image_factors_A": A, "table_factors_B": B, "groups_G": G},
        factor_assignments=[
            {"class": c, "name": label_names[c], "a_image_motif": int(a_c[c]),
             "motif": _motif_name(int(a_c[c])),
             "b_table_tier": int(b_c[c]), "g_shared_group": int(g_c[c])}
            for c in range(K)
        ],
        class_prior=[float(v) for v in prior],
        bayes_ceilings_noise_free=ceilings,
        image={"mode": "RGB", "size": S, "format": "PNG"},
        notes="Continuous columns are raw physical units; z-score with tabular_schema.json (train stats).",
    )
    return dataset_dict, metadata, schema


# ==================================================================================================
# image: CIFAR-like shapes
# ==================================================================================================
def _render_objects(params: dict[str, np.ndarray], size: int):
    centres = np.arange(size, dtype=np.float32) + 0.5

    def shape_sdf(kind: int, u, v, r):
        if kind == 0:
            return np.sqrt(u ** 2 + v ** 2) - r
        if kind == 1:
            return _box_sdf(u, v, 0.8 * r, 0.8 * r, 0.1 * r)
        if kind == 2:
            planes = [np.cos(t) * u + np.sin(t) * v for t in (np.pi / 2, np.pi / 2 + 2 * np.pi / 3,
                                                              np.pi / 2 + 4 * np.pi / 3)]
            return np.maximum.reduce(planes) - 0.55 * r
        if kind == 3:
            return np.minimum(_box_sdf(u, v, r, 0.32 * r, 0.05 * r), _box_sdf(u, v, 0.32 * r, r, 0.05 * r))
        return np.abs(np.sqrt(u ** 2 + v ** 2) - 0.72 * r) - 0.26 * r

    def render(start: int, stop: int, rng: np.random.Generator) -> np.ndarray:
        m = stop - start
        p = {k: v[start:stop, None, None].astype(np.float32) for k, v in params.items() if v.ndim == 1}
        x = centres[None, None, :] - p["cx"]
        y = centres[None, :, None] - p["cy"]
        cos, sin = np.cos(p["theta"]), np.sin(p["theta"])
        u, v = cos * x + sin * y, -sin * x + cos * y
        sdf = np.empty((m, size, size), dtype=np.float32)
        for k in range(len(SHAPES)):
            sel = np.flatnonzero(params["shape"][start:stop] == k)
            if sel.size:
                sdf[sel] = shape_sdf(k, u[sel], v[sel], p["radius"][sel])
        period = p["period"]
        stripes = np.clip(0.5 + 2.0 * np.sin(2 * np.pi * u / period), 0, 1)
        dots = np.clip(0.5 + 2.0 * (np.cos(2 * np.pi * u / period) + np.cos(2 * np.pi * v / period) - 1.0), 0, 1)
        texture = params["texture"][start:stop, None, None]
        pattern = np.where(texture == 1, stripes, np.where(texture == 2, dots, 0.0)).astype(np.float32)
        colour = params["rgb"][start:stop, None, None, :]
        second = params["rgb2"][start:stop, None, None, :]
        painted = colour + pattern[..., None] * (second - colour)

        image = params["bg_rgb"][start:stop, None, None, :] + 0.18 * _smooth_field(rng, m, size, 3)
        for j in range(params["clutter_rgb"].shape[1]):  # distractor blobs
            dx = centres[None, None, :] - params["clutter_xy"][start:stop, j, 0, None, None]
            dy = centres[None, :, None] - params["clutter_xy"][start:stop, j, 1, None, None]
            blob = _coverage(np.sqrt(dx ** 2 + dy ** 2) - params["clutter_r"][start:stop, j, None, None])
            blob = blob * params["clutter_on"][start:stop, j, None, None]
            image = image * (1 - blob[..., None]) + params["clutter_rgb"][start:stop, j, None, None, :] * blob[..., None]
        cover = _coverage(sdf)[..., None]
        image = image * (1 - cover) + painted * cover
        return image

    return render


def image_class_design(num_classes: int) -> list[dict[str, Any]]:
    """Class c -> (shape, texture, preferred hue): shape varies fastest, then texture, then hue family."""
    design = []
    for c in range(num_classes):
        design.append({
            "class": c, "shape": SHAPES[c % 5], "texture": TEXTURES[(c // 5) % 3],
            "hue": float((0.618034 * c) % 1.0),
        })
    return design


def make_image(
    num_samples: int | None = None,
    num_classes: int | None = None,
    image_size: int | None = None,
    seed: int = 2022,
    labeled_fraction: float = 0.01,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    progress: bool = False,
    pixel_noise: float = 0.03,
    hue_spread: float = 0.25,
):
    """CIFAR-like image classification: ``(DatasetDict, DatasetMetadata, None)``."""
    import datasets

    args = check_arguments("image", num_samples, num_classes, image_size, labeled_fraction, val_fraction,
                           test_fraction)
    n, K, S = args["num_samples"], args["num_classes"], args["image_size"]
    rngs = _streams(seed, ["labels", "image", "split"])
    y = _draw_labels(n, _class_prior(K, 0.0), rngs["labels"])
    design = image_class_design(K)
    r = rngs["image"]
    hue_c = np.array([d["hue"] for d in design])
    hue = hue_c[y] + r.uniform(-hue_spread, hue_spread, n)
    rgb = _hsv_to_rgb(hue, r.uniform(0.55, 1.0, n), r.uniform(0.5, 1.0, n))
    rgb2 = np.where((rgb.mean(1, keepdims=True) > 0.5), rgb * 0.35, np.clip(rgb * 0.4 + 0.6, 0, 1))
    bg_hue = r.random(n)
    bg = _hsv_to_rgb(bg_hue, r.uniform(0.0, 0.35, n), r.uniform(0.25, 0.85, n))
    slots = 2
    radius = S * r.uniform(0.2, 0.32, n)
    params = {
        "cx": S / 2 + r.uniform(-0.12, 0.12, n) * S, "cy": S / 2 + r.uniform(-0.12, 0.12, n) * S,
        "theta": r.uniform(0, 2 * np.pi, n), "radius": radius,
        "period": np.maximum(2.5, radius * r.uniform(0.45, 0.6, n)),
        "shape": (y % 5).astype(np.int64), "texture": ((y // 5) % 3).astype(np.int64),
        "rgb": rgb.astype(np.float32), "rgb2": rgb2.astype(np.float32), "bg_rgb": bg.astype(np.float32),
        "clutter_xy": (r.random((n, slots, 2)) * S).astype(np.float32),
        "clutter_r": (S * r.uniform(0.04, 0.1, (n, slots))).astype(np.float32),
        "clutter_on": (r.random((n, slots)) < 0.5).astype(np.float32),
        "clutter_rgb": _hsv_to_rgb(r.random((n, slots)), r.uniform(0.2, 0.9, (n, slots)),
                                   r.uniform(0.2, 0.9, (n, slots))).astype(np.float32),
    }
    encoded = _render_all(n, S, 3, _render_objects(params, S), seed, progress, "rendering shapes",
                           pixel_noise)
    splits, labeled, split_info = _split_and_label(args, seed, rngs["split"], labels=y)
    label_names = [f"{d['texture']}_{d['shape']}_{c:02d}" for c, d in enumerate(design)]
    dataset_dict = _build_splits(encoded, {"label": y}, {"label": datasets.ClassLabel(names=label_names)}, splits,
                                 labeled)
    metadata = _metadata(
        "image", labeled, split_info, label_names,
        args={**args, "seed": seed}, knobs={"pixel_noise": pixel_noise, "hue_spread": hue_spread},
        class_design=design, image={"mode": "RGB", "size": S, "format": "PNG"},
    )
    return dataset_dict, metadata, None


# ==================================================================================================
# landmarks: AFLW-like faces
# ==================================================================================================
def _face_geometry(n: int, size: int, r: np.random.Generator) -> dict[str, np.ndarray]:
    S = size
    rx = S * r.uniform(0.26, 0.32, n)
    geometry = {
        "cx": S / 2 + np.clip(r.normal(0, 0.04, n), -0.08, 0.08) * S,
        "cy": S / 2 + np.clip(r.normal(0, 0.04, n), -0.08, 0.08) * S,
        "theta": np.deg2rad(np.clip(r.normal(0, 10, n), -25, 25)),
        "rx": rx, "ry": rx * r.uniform(1.15, 1.3, n),
        "shift": r.uniform(-0.15, 0.15, n) * rx,  # yaw-like shift of the inner features
        "eye_dx": r.uniform(0.36, 0.44, n) * rx,
        "mouth_dx": r.uniform(0.26, 0.36, n) * rx,
        "smile": r.uniform(-0.6, 1.0, n),
        "skin": r.uniform(0.55, 0.85, n),
        "hair": np.where(r.random(n) < 0.8, r.uniform(0.05, 0.35, n), -1.0),
        "bg": r.uniform(0.15, 0.85, n),
    }
    geometry["eye_y"] = -0.22 * geometry["ry"]
    geometry["nose_y"] = 0.12 * geometry["ry"]
    geometry["mouth_y"] = 0.45 * geometry["ry"]
    return geometry


def _face_keypoints(geo: dict[str, np.ndarray]) -> np.ndarray:
    """(n, 10) keypoints x1,y1..x5,y5 in pixel coordinates (pixel j spans [j, j+1))."""
    s = geo["shift"]
    local_x = np.stack([s - geo["eye_dx"], s + geo["eye_dx"], 1.3 * s, s - geo["mouth_dx"], s + geo["mouth_dx"]], 1)
    local_y = np.stack([geo["eye_y"], geo["eye_y"], geo["nose_y"], geo["mouth_y"], geo["mouth_y"]], 1)
    cos, sin = np.cos(geo["theta"])[:, None], np.sin(geo["theta"])[:, None]
    x = geo["cx"][:, None] + cos * local_x - sin * local_y
    y = geo["cy"][:, None] + sin * local_x + cos * local_y
    return np.stack([x, y], axis=2).reshape(len(x), 10)


def _render_faces(geo: dict[str, np.ndarray], size: int):
    centres = np.arange(size, dtype=np.float32) + 0.5

    def render(start: int, stop: int, rng: np.random.Generator) -> np.ndarray:
        m = stop - start
        p = {k: v[start:stop, None, None].astype(np.float32) for k, v in geo.items()}
        x = centres[None, None, :] - p["cx"]
        y = centres[None, :, None] - p["cy"]
        cos, sin = np.cos(p["theta"]), np.sin(p["theta"])
        u, v = cos * x + sin * y, -sin * x + cos * y  # face frame (v downwards)
        rx, ry, s, skin = p["rx"], p["ry"], p["shift"], p["skin"]

        def ellipse(cu, cv, au, av):
            radius = np.sqrt(((u - cu) / au) ** 2 + ((v - cv) / av) ** 2)
            return (radius - 1.0) * np.minimum(au, av)

        image = p["bg"] + 0.15 * _smooth_field(rng, m, size, 1)[..., 0]
        hair = _coverage(ellipse(0, -0.08 * ry, 1.08 * rx, 1.05 * ry)) * (p["hair"] >= 0)
        image = image * (1 - hair) + p["hair"] * hair
        face = _coverage(ellipse(0, 0, rx, ry))
        shading = skin - 0.08 * (u / rx)  # soft side lighting
        hairline = _coverage(v + 0.55 * ry) * (p["hair"] >= 0)  # fringe over the forehead
        image = image * (1 - face) + shading * face
        image = image * (1 - hairline * face) + p["hair"] * hairline * face
        for side in (-1.0, 1.0):
            ecx = s + side * p["eye_dx"]
            brow = _coverage(_box_sdf(u - ecx, v - (p["eye_y"] - 0.14 * ry), 0.2 * rx, 0.025 * ry + 0.4, 0.3))
            image = image * (1 - brow) + (skin - 0.35) * brow
            eye = _coverage(ellipse(ecx, p["eye_y"], 0.17 * rx, 0.075 * ry + 0.5))
            image = image * (1 - eye) + np.minimum(skin + 0.1, 0.95) * eye  # sclera
            iris = _coverage(np.sqrt((u - ecx) ** 2 + (v - p["eye_y"]) ** 2) - (0.07 * rx + 0.4))
            image = image * (1 - iris) + 0.06 * iris
        nose = _coverage(ellipse(1.3 * s, p["nose_y"], 0.1 * rx + 0.3, 0.06 * ry + 0.3))
        image = image * (1 - nose) + (skin - 0.3) * nose
        half = p["mouth_dx"]
        bend = p["smile"] * 0.05 * ry * (1 - np.clip(((u - s) / half) ** 2, 0, 1))
        mouth = _coverage(
            (np.sqrt(((u - s) / half) ** 2 + ((v + bend - p["mouth_y"]) / (0.06 * ry + 0.5)) ** 2) - 1.0)
            * np.minimum(half, 0.06 * ry + 0.5)
        )
        image = image * (1 - mouth) + (skin - 0.42) * mouth
        return image

    return render


def make_landmarks(
    num_samples: int | None = None,
    image_size: int | None = None,
    seed: int = 2022,
    labeled_fraction: float = 0.01,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    progress: bool = False,
    pixel_noise: float = 0.03,
    num_classes: int | None = None,
):
    """AFLW-like faces (mode L) with 5 keypoints: ``(DatasetDict, DatasetMetadata, None)``."""
    import datasets

    args = check_arguments("landmarks", num_samples, num_classes, image_size, labeled_fraction, val_fraction,
                           test_fraction)
    n, S = args["num_samples"], args["image_size"]
    rngs = _streams(seed, ["image", "split"])
    geometry = _face_geometry(n, S, rngs["image"])
    keypoints = _face_keypoints(geometry).astype(np.float32)
    encoded = _render_all(n, S, 1, _render_faces(geometry, S), seed, progress, "rendering faces",
                           pixel_noise)
    splits, labeled, split_info = _split_and_label(args, seed, rngs["split"])
    dataset_dict = _build_splits(encoded, {"label": list(keypoints)},
                                 {"label": datasets.List(datasets.Value("float32"))}, splits, labeled)
    metadata = _metadata(
        "landmarks", labeled, split_info,
        args={k: v for k, v in {**args, "seed": seed}.items() if k != "num_classes"},
        knobs={"pixel_noise": pixel_noise},
        landmarks=LANDMARK_NAMES,
        coordinates="x1,y1,...,x5,y5 in pixels of the stored image; pixel column j spans [j, j+1)",
        image={"mode": "L", "size": S, "format": "PNG"},
    )
    return dataset_dict, metadata, None


# ==================================================================================================
# generate + save
# ==================================================================================================
def make_synthetic_dataset(
    task: str,
    output_dir: str | Path,
    *,
    num_samples: int | None = None,
    num_classes: int | None = None,
    image_size: int | None = None,
    seed: int = 2022,
    labeled_fraction: float = 0.01,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    overwrite: bool = False,
    measure_budget: bool = False,
    progress: bool = False,
    knobs: MultimodalKnobs | None = None,
) -> Path:
    """Generate one synthetic dataset and write it atomically with `save_dataset`.

    Arguments and the output folder are checked before any work, so a bad call writes nothing.
    ``measure_budget`` (classification tasks) stores `information_budget` results in the metadata.
    """
    check_arguments(task, num_samples, num_classes, image_size, labeled_fraction, val_fraction, test_fraction)
    output = Path(output_dir)
    if output.exists() and not overwrite:
        from .io import DatasetExistsError

        raise DatasetExistsError(f"output folder {output} already exists; pass --overwrite to replace it")
    common = dict(num_samples=num_samples, image_size=image_size, seed=seed, labeled_fraction=labeled_fraction,
                  val_fraction=val_fraction, test_fraction=test_fraction, progress=progress)
    started = time.perf_counter()
    if task == "multimodal":
        result = make_multimodal(num_classes=num_classes, knobs=knobs, **common)
    elif task == "image":
        result = make_image(num_classes=num_classes, **common)
    else:
        result = make_landmarks(num_classes=num_classes, **common)
    dataset_dict, metadata, schema = result
    if measure_budget and metadata.task == "classification":
        metadata.source["information_budget"] = information_budget(dataset_dict, metadata, schema, seed=seed)
    metadata.source["generation_seconds"] = round(time.perf_counter() - started, 2)
    from .permissions import share_like_umask

    return share_like_umask(save_dataset(dataset_dict, output, metadata, schema, overwrite=overwrite))


def make_synthetic(task: str, **kwargs):
    """In-memory counterpart of `make_synthetic_dataset`: ``(DatasetDict, DatasetMetadata, schema)``."""
    builders = {"multimodal": make_multimodal, "image": make_image, "landmarks": make_landmarks}
    if task not in builders:
        raise SyntheticConfigError(f"unknown task {task!r}; choose one of {', '.join(TASKS)} (--task)")
    return builders[task](**kwargs)


# ==================================================================================================
# information budget
# ==================================================================================================
def _decode_images(dataset, column: str, size: int = 32) -> np.ndarray:
    """(N, size, size, 3) float32 in [0, 1], box-resized, RGB."""
    import datasets
    from PIL import Image

    raw = dataset.cast_column(column, datasets.Image(decode=False))[column]
    out = np.empty((len(raw), size, size, 3), dtype=np.float32)
    for i, item in enumerate(raw):
        with Image.open(_io.BytesIO(item["bytes"])) as picture:
            picture = picture.convert("RGB")
            if picture.size != (size, size):
                picture = picture.resize((size, size), Image.BOX)
            out[i] = np.asarray(picture, dtype=np.float32) / 255.0
    return out


def image_features(images: np.ndarray, pixel_grid: int = 8, cells: int = 4, bins: int = 8, spectrum_pool: int = 4):
    """Cheap hand-made image features: ``(pixels, orientation, spectrum)`` blocks.

    ``images`` (N, S, S, 3) in [0, 1] with S divisible by ``pixel_grid``, ``cells`` and
    ``spectrum_pool``. ``pixels``: RGB box-downsampled to pixel_grid x pixel_grid. ``orientation``:
    HOG-like unsigned gradient-orientation histograms (magnitude weighted, square-rooted) on a
    cells x cells grid plus a global histogram at full and half resolution. ``spectrum``: log
    magnitude of the grayscale 2-D Fourier transform, block-averaged (translation invariant, so it
    sees periodic textures wherever they are).
    """
    n, S = images.shape[0], images.shape[1]
    f = S // pixel_grid
    pixels = images.reshape(n, pixel_grid, f, pixel_grid, f, 3).mean((2, 4)).reshape(n, -1)

    def histograms(gray, grid):
        gy, gx = np.gradient(gray, axis=(1, 2))
        magnitude = np.hypot(gx, gy)
        index = np.minimum((np.mod(np.arctan2(gy, gx), np.pi) / np.pi * bins).astype(int), bins - 1)
        size = gray.shape[1]
        cell = np.arange(size) // (size // grid)
        flat = ((cell[None, :, None] * grid + cell[None, None, :]) * bins + index).reshape(n, -1)
        flat = flat + (np.arange(n) * grid * grid * bins)[:, None]
        out = np.bincount(flat.ravel(), weights=magnitude.ravel(), minlength=n * grid * grid * bins)
        return np.sqrt(out.reshape(n, -1))

    gray = images @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    half = gray.reshape(n, S // 2, 2, S // 2, 2).mean((2, 4))
    orientation = np.concatenate([histograms(gray, cells), histograms(gray, 1), histograms(half, 1)], axis=1)
    centred = gray - gray.mean((1, 2), keepdims=True)
    spectrum = np.abs(np.fft.fftshift(np.fft.fft2(centred), axes=(1, 2)))
    k = S // spectrum_pool
    spectrum = np.log1p(spectrum.reshape(n, k, spectrum_pool, k, spectrum_pool).mean((2, 4))).reshape(n, -1)
    return pixels.astype(np.float32), orientation.astype(np.float32), spectrum.astype(np.float32)


def _table_features(dataset, schema: TabularSchema) -> np.ndarray:
    encoded = schema.encode_columns({name: dataset[name] for name in schema.names})
    blocks = [np.eye(card, dtype=np.float32)[encoded["categorical_values"][:, j]]
              for j, card in enumerate(schema.cardinalities)]
    return np.concatenate(blocks + [encoded["continuous_values"]], axis=1)


def information_budget(dataset_dict, metadata: DatasetMetadata, schema: TabularSchema | None = None, *,
                       seed: int = 0, random_forest: bool = True, max_train: int | None = None,
                       image_resolution: int = 32, C: float = 0.05) -> dict[str, Any]:
    """Test accuracy of quick sklearn models fitted on train with ALL labels, per modality.

    * table: logistic regression and a random forest on the one-hot + z-scored table;
    * image: logistic regression on 8x8 downsampled pixels, and on `image_features` (pixels +
      HOG-like histograms + pooled Fourier magnitude);
    * joint: logistic regression on table + image features (all labels, and the labelled rows
      only, i.e. the supervised baseline a semi-supervised method has to beat);
    plus the generator's noise-free Bayes ceilings when the metadata carries them.
    """
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    if metadata.task != "classification":
        raise ValueError("information_budget needs a classification dataset (labels are class ids)")
    started = time.perf_counter()
    train, test = dataset_dict["train"], dataset_dict["test"]
    if max_train is not None and len(train) > max_train:
        train = train.select(range(max_train))
    y_train = np.asarray(train[metadata.label_column])
    y_test = np.asarray(test[metadata.label_column])
    features: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if metadata.image_column:
        parts = [image_features(_decode_images(d, metadata.image_column, image_resolution)) for d in (train, test)]
        for j, name in enumerate(("pixels", "orientation", "spectrum")):
            features[name] = (parts[0][j], parts[1][j])
    if schema is not None:
        features["table"] = (_table_features(train, schema), _table_features(test, schema))

    def stack(names, which):
        return np.concatenate([features[k][which] for k in names], axis=1)

    image_blocks = ["pixels", "orientation", "spectrum"]

    def logistic(names, rows=None):
        x_train, x_test = stack(names, 0), stack(names, 1)
        y = y_train
        if rows is not None:
            x_train, y = x_train[rows], y[rows]
        model = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=3000))
        with threadpool_limits(1):  # BLAS threads fight over small machines and slow lbfgs 50x
            model.fit(x_train, y)
        return float((model.predict(x_test) == y_test).mean())

    results: dict[str, float] = {}
    if "table" in features:
        results["table_logreg"] = logistic(["table"])
        if random_forest:
            forest = RandomForestClassifier(n_estimators=150, min_samples_leaf=2, random_state=seed, n_jobs=1)
            with threadpool_limits(1):
                forest.fit(features["table"][0], y_train)
            results["table_random_forest"] = float((forest.predict(features["table"][1]) == y_test).mean())
    if "pixels" in features:
        results["image_logreg_pixels"] = logistic(["pixels"])
        results["image_logreg_features"] = logistic(image_blocks)
    if "table" in features and "pixels" in features:
        results["joint_logreg"] = logistic(["table"] + image_blocks)
        labeled_column = metadata.labeled_column
        if labeled_column in train.column_names:
            rows = np.flatnonzero(np.asarray(train[labeled_column]))
            if np.unique(y_train[rows]).size >= 2:
                results["joint_logreg_labeled_only"] = logistic(["table"] + image_blocks, rows)
                results["num_labeled"] = int(rows.size)
    budget = {
        "test_accuracy": results,
        "chance": float(np.bincount(y_test).max() / y_test.size),
        "num_train": int(len(train)), "num_test": int(len(test)),
        "image_features": (f"at {image_resolution}px: 8x8 RGB pixels; 4x4-cell + global 8-bin orientation "
                           "histograms; 4x4-pooled log Fourier magnitude"),
        "logistic_regression_C": C,
        "seconds": round(time.perf_counter() - started, 1),
    }
    ceilings = metadata.source.get("bayes_ceilings_noise_free")
    if ceilings:
        budget["bayes_ceilings_noise_free"] = ceilings
    return budget


def format_budget(budget: dict[str, Any]) -> str:
    """Markdown table of an `information_budget` result."""
    rows = ["| model | test accuracy |", "|---|---|"]
    for name, value in budget["test_accuracy"].items():
        rows.append(f"| {name} | {value} |" if name == "num_labeled" else f"| {name} | {value:.3f} |")
    rows.append(f"| chance (largest class) | {budget['chance']:.3f} |")
    for name, value in budget.get("bayes_ceilings_noise_free", {}).items():
        if name != "chance":
            rows.append(f"| Bayes ceiling, noise-free: {name} | {value:.3f} |")
    return "\n".join(rows)
