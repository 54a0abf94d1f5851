"""Image views, tabular corruption/masking, per-sample seeding (data_utils/views.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from data_utils.views import (
    IMAGE_VIEWS,
    RECIPES,
    TabularPool,
    TabularView,
    ViewConfig,
    ViewError,
    apply_image_view,
    build_image_view,
    choose_fields,
    corrupt_fields,
    get_recipe,
    joint_coins,
    mask_fields,
    normalize_batch,
    normalize_pixels,
    resolve_views,
    sample_seeds,
)


def _images(n=6, size=(40, 48), channels=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (channels, *size), dtype=torch.uint8, generator=g) for _ in range(n)]


@pytest.mark.parametrize("preset,size", [("default", 32), ("default", 72), ("dvm", 64), ("cardiac", 64), ("cifar", 32)])
def test_image_views_shape_dtype_range(preset, size):
    cfg = ViewConfig(image_size=size, preset=preset, image_mean=(0.5, 0.4, 0.3), image_std=(0.2, 0.25, 0.3))
    images = _images()
    seeds = sample_seeds(0, "s", "k", np.zeros(6), np.arange(6))
    for name in IMAGE_VIEWS:
        view = build_image_view(name, cfg)
        out, shift = apply_image_view(view, images, seeds)
        assert out.shape == (6, 3, size, size) and out.dtype == torch.uint8, name
        assert (shift is not None) == (name == "translate"), name
        pixels = normalize_batch(out, cfg)
        assert pixels.dtype == torch.float32 and pixels.shape == out.shape
        expected = (out.float() / 255 - torch.tensor(cfg.image_mean).view(1, 3, 1, 1)) / torch.tensor(
            cfg.image_std).view(1, 3, 1, 1)
        assert torch.allclose(pixels, expected, atol=1e-5)
        lo = (0 - max(cfg.image_mean)) / min(cfg.image_std)
        hi = (1 - min(cfg.image_mean)) / min(cfg.image_std)
        assert pixels.min() >= lo - 1e-5 and pixels.max() <= hi + 1e-5


def test_eval_view_is_a_plain_resize_and_augmenting_views_change_pixels():
    cfg = ViewConfig(image_size=32, preset="dvm")
    images = _images(8, size=(32, 32))
    seeds = sample_seeds(1, "s", "k", np.zeros(8), np.arange(8))
    out, _ = apply_image_view(build_image_view("eval", cfg), images, seeds)
    assert torch.equal(out, torch.stack(images))
    for name in ("weak", "strong", "stil", "hard"):
        aug, _ = apply_image_view(build_image_view(name, cfg), images, seeds)
        assert not torch.equal(aug, out), name


def test_grayscale_views_and_landmark_preset_refuses_geometric_views():
    cfg = ViewConfig(image_size=24, num_channels=1, image_mean=0.5, image_std=0.5, preset="default")
    images = _images(3, size=(24, 24), channels=1)
    seeds = sample_seeds(0, "s", "k", np.zeros(3), np.arange(3))
    for name in IMAGE_VIEWS:
        out, _ = apply_image_view(build_image_view(name, cfg), images, seeds)
        assert out.shape == (3, 1, 24, 24)
    aflw = ViewConfig(image_size=24, num_channels=1, preset="aflw")
    assert build_image_view("weak", aflw).translate_pixels == 4
    with pytest.raises(ViewError, match="landmarks"):
        build_image_view("strong", aflw)
    with pytest.raises(ViewError, match="unknown image view"):
        build_image_view("nope", cfg)
    with pytest.raises(ViewError, match="preset"):
        ViewConfig(preset="imagenet")


def test_blur_kernel_scales_with_image_size():
    small = build_image_view("stil", ViewConfig(image_size=32, preset="dvm"))
    large = build_image_view("stil", ViewConfig(image_size=128, preset="dvm"))

    def kernel(view):
        blur = [t for t in view.transform.transforms if type(t).__name__ == "RandomApply"
                and type(t.transforms[0]).__name__ == "TruncatedGaussianBlur"][0].transforms[0]
        return blur.kernel_size, blur.sigma

    assert kernel(large) == (29, (0.1, 2.0))
    k, sigma = kernel(small)
    assert k == 7 and sigma == pytest.approx((0.025, 0.5))


def test_translate_moves_keypoints_with_pixels():
    size = 20
    cfg = ViewConfig(image_size=size, num_channels=1, preset="aflw")
    view = build_image_view("translate", cfg)
    points = [(5, 7), (10, 10), (14, 6), (8, 14)] * 5
    images = []
    for x, y in points:
        img = torch.zeros(1, size, size, dtype=torch.uint8)
        img[0, y, x] = 255
        images.append(img)
    seeds = sample_seeds(3, "u", "translate", np.zeros(len(points)), np.arange(len(points)))
    out, shifts = apply_image_view(view, images, seeds)
    assert shifts.shape == (len(points), 2) and shifts.abs().max() <= 4
    assert len({tuple(s.tolist()) for s in shifts}) > 3  # shifts vary per sample
    for (x, y), img, (tx, ty) in zip(points, out, shifts.long().tolist()):
        ys, xs = torch.nonzero(img[0] == 255, as_tuple=True)
        # the bright pixel sits 5+ px from every border, so reflection cannot add a copy
        assert (xs.tolist(), ys.tolist()) == ([x + tx], [y + ty])


def test_image_view_is_deterministic_per_seed_and_restores_global_rng():
    cfg = ViewConfig(image_size=32, preset="default")
    view = build_image_view("strong", cfg)
    images = _images(4, size=(32, 32))
    seeds = sample_seeds(7, "unlabeled", "strong", np.zeros(4), np.arange(4))
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a, _ = apply_image_view(view, images, seeds)
    assert torch.equal(torch.get_rng_state(), state)
    b, _ = apply_image_view(view, images[::-1], seeds[::-1])  # order in the batch does not matter
    assert torch.equal(a, b.flip(0))
    other_pass = sample_seeds(7, "unlabeled", "strong", np.ones(4), np.arange(4))
    c, _ = apply_image_view(view, images, other_pass)
    assert not torch.equal(a, c)


def test_sample_seeds_depend_on_every_component():
    ref = sample_seeds(0, "labeled", "weak", [0, 0], [1, 2])
    assert ref.dtype == np.uint64 and ref[0] != ref[1]
    assert np.array_equal(ref, sample_seeds(0, "labeled", "weak", [0, 0], [1, 2]))
    for other in (sample_seeds(1, "labeled", "weak", [0, 0], [1, 2]), sample_seeds(0, "unlabeled", "weak", [0, 0], [1, 2]),
                  sample_seeds(0, "labeled", "strong", [0, 0], [1, 2]), sample_seeds(0, "labeled", "weak", [1, 1], [1, 2])):
        assert not np.any(other == ref)


def _table(n=64, n_cat=4, n_con=13, offset=0, seed=0, missing_every=0):
    rng = np.random.default_rng(seed)
    cat = rng.integers(0, 5, (n, n_cat)) + offset  # codes
    con = rng.normal(size=(n, n_con)).astype(np.float32) + offset
    miss = np.zeros((n, n_cat + n_con), dtype=bool)
    if missing_every:
        miss[::missing_every, :] = True
    return {"categorical_values": cat, "continuous_values": con, "missing_mask": miss}


def test_corruption_replaces_exactly_k_fields_with_marginal_values_never_missing_ones():
    batch = _table(n=50, offset=0, seed=1)  # batch values: codes 0..4, continuous around 0
    pool_arrays = _table(n=30, offset=100, seed=2)  # pool values: codes 100..104, continuous around 100
    pool_arrays["missing_mask"][::3, :] = True  # rows 0, 3, 6, ... are missing everywhere ...
    pool_arrays["categorical_values"][::3, :] = 999  # ... with a sentinel that must never be drawn
    pool_arrays["continuous_values"][::3, :] = 999.0
    pool = TabularPool.from_arrays(pool_arrays)
    seeds = sample_seeds(0, "s", "weak", np.zeros(50), np.arange(50))
    for rate, k in ((0.1, 1), (0.3, 5), (0.5, 8), (1.0, 17)):
        out = corrupt_fields(batch, seeds, rate, pool)
        assert k == math.floor(rate * 17)
        changed = np.concatenate([out["categorical_values"] != batch["categorical_values"],
                                  out["continuous_values"] != batch["continuous_values"]], axis=1)
        assert (changed.sum(axis=1) == k).all(), rate
        valid = ~pool_arrays["missing_mask"]
        for j in range(4):
            rows = changed[:, j]
            assert set(out["categorical_values"][rows, j]) <= set(pool_arrays["categorical_values"][valid[:, j], j])
        for j in range(13):
            rows = changed[:, 4 + j]
            assert set(out["continuous_values"][rows, j]) <= set(pool_arrays["continuous_values"][valid[:, 4 + j], j])
        assert not out["missing_mask"].any()
    # the choice of fields is uniform: every field is hit in a large batch
    big = _table(n=400, seed=3)
    seeds = sample_seeds(0, "s", "weak", np.zeros(400), np.arange(400))
    hits = (corrupt_fields(big, seeds, 0.3, pool)["continuous_values"] != big["continuous_values"]).sum(axis=0)
    assert (hits > 400 * 5 / 17 * 0.5).all()
    # clean rows where the joint coin says no
    augment = np.zeros(400, dtype=bool)
    same = corrupt_fields(big, seeds, 0.3, pool, augment)
    assert np.array_equal(same["continuous_values"], big["continuous_values"])


def test_corruption_fills_missing_cells_and_is_deterministic():
    batch = _table(n=20, missing_every=2, seed=4)
    pool = TabularPool.from_arrays(_table(n=20, offset=50, seed=5))
    seeds = sample_seeds(0, "s", "strong", np.zeros(20), np.arange(20))
    a = corrupt_fields(batch, seeds, 0.3, pool)
    b = corrupt_fields(batch, seeds, 0.3, pool)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    filled = batch["missing_mask"] & ~a["missing_mask"]
    assert (filled.sum(axis=1)[::2] == 5).all()  # the 5 corrupted fields of fully missing rows became present


def test_masking_rate_and_values():
    batch = _table(n=30, seed=6)
    batch["missing_mask"][0, :3] = True  # truly missing cells
    seeds = sample_seeds(0, "s", "masked", np.zeros(30), np.arange(30))
    out = mask_fields(batch, seeds, 0.5)
    chosen = choose_fields(seeds, 17, round(0.5 * 17), salt=3)
    assert round(0.5 * 17) == 8  # banker's rounding, as TIP
    assert (chosen.sum(axis=1) == 8).all()
    assert np.array_equal(out["missing_mask"], chosen | batch["missing_mask"])
    assert np.array_equal(out["masked_fields"], chosen & ~batch["missing_mask"])
    assert (out["categorical_values"][chosen[:, :4]] == 0).all()
    assert (out["continuous_values"][chosen[:, 4:]] == 0).all()
    keep = ~chosen
    assert np.array_equal(out["continuous_values"][keep[:, 4:]], batch["continuous_values"][keep[:, 4:]])
    assert TabularView("mask", 0.5).num_selected(75) == 38 and TabularView("corrupt", 0.3).num_selected(75) == 22


def test_recipe_registry_matches_architecture_table():
    expected = {"eval": ("eval", "clean", 0.0), "weak": ("weak", "corrupt", 0.1), "strong": ("strong", "corrupt", 0.3),
                "stil": ("stil", "corrupt", 0.3), "hard": ("hard", "corrupt", 0.3), "masked": ("stil", "mask", 0.5),
                "translate": ("translate", "clean", 0.0), "tip": ("stil_always", "corrupt", 0.3)}
    for name, (image, kind, rate) in expected.items():
        recipe = RECIPES[name]
        assert (recipe.image, recipe.tabular.kind, recipe.tabular.rate) == (image, kind, rate), name
    assert get_recipe("hard").joint_p is not None and get_recipe("stil").joint_p is None
    with pytest.raises(ViewError, match="unknown view recipe"):
        resolve_views({"x": "nope"})
    with pytest.raises(ViewError, match="clash"):
        resolve_views({"labels": "weak"})
    coins = joint_coins(sample_seeds(0, "s", "hard", np.zeros(2000), np.arange(2000)), 0.95)
    assert 0.93 < coins.mean() < 0.97


def test_view_config_from_model_config():
    cfg = ViewConfig.from_model_config({"image_size": 64, "num_channels": 3, "image_mean": [0.5] * 3,
                                        "image_std": [0.25] * 3}, preset="dvm", seed=3)
    assert (cfg.image_size, cfg.image_mean, cfg.image_std, cfg.preset, cfg.seed) == (64, (0.5,) * 3, (0.25,) * 3, "dvm", 3)
    with pytest.raises(ViewError, match="channel"):
        ViewConfig(image_mean=(0.5, 0.5))


def test_uint8_batches_normalised_later_match_loader_normalisation():
    cfg = ViewConfig(image_size=16, image_mean=(0.5, 0.4, 0.3), image_std=(0.2, 0.25, 0.3), normalize_in_loader=False)
    images = _images(3, size=(16, 16))
    pixels, _ = apply_image_view(build_image_view("eval", cfg), images, sample_seeds(0, "s", "k", np.zeros(3), np.arange(3)))
    batch = {"labels": torch.tensor([1, 2, 3]), "v": {"pixel_values": pixels, "missing_mask": torch.zeros(3, 2, dtype=torch.bool)}}
    out = normalize_pixels(batch, cfg, device="cpu")
    assert torch.allclose(out["v"]["pixel_values"], normalize_batch(pixels, cfg))
    assert out["v"]["missing_mask"].dtype == torch.bool and torch.equal(out["labels"], batch["labels"])
