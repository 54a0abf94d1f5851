"""Image views made on the device (data_utils/device_views.py, ``--image_views_on_device``), on the CPU:
each stage against torchvision's own function, per-row parameters against hand-computed boxes, the
seeding (a row's view is a function of its seed only), the loader's requests, and short training runs."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torchvision.transforms.v2 import functional as TF

from data_utils.device_views import (
    BATCH_KEY,
    DeviceViews,
    _Blur,
    _brightness,
    _contrast,
    _CropFlip,
    _Gray,
    _hue,
    _PadCropFlip,
    _saturation,
    build_device_view,
    device_view_unsupported,
)
from data_utils.loaders import build_train_loaders
from data_utils.views import (
    ViewConfig,
    ViewError,
    _uniform,
    get_recipe,
    joint_coins,
    joint_probability,
    sample_seeds,
)
from tests._helpers import tiny_fixmatch_argv, train_captured

S = 32


def _images(n=8, size=S, channels=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=g)


def _seeds(n=8, start=0, key="k"):
    return sample_seeds(3, "unlabeled", key, np.zeros(n), np.arange(start, start + n))


def _plan_stage(stage, u):
    return stage.plan(u, np.arange(len(u)), S, S)


# ------------------------------------------------------------------ stages against torchvision
@pytest.mark.parametrize("op,reference,factors", [
    (_brightness, TF.adjust_brightness, [0.2, 1.0, 1.7, 0.9]),
    (_contrast, TF.adjust_contrast, [0.2, 1.0, 1.7, 0.9]),
    (_saturation, TF.adjust_saturation, [0.2, 1.0, 1.7, 0.9]),
    (_hue, TF.adjust_hue, [-0.2, 0.0, 0.13, 0.2]),
])
def test_colour_operations_equal_torchvision_per_row(op, reference, factors):
    x = _images(4).float() / 255
    out = op(x.clone(), torch.tensor(factors))
    expected = torch.stack([reference(x[i], factors[i]) for i in range(4)])
    assert torch.allclose(out, expected, atol=2e-6)


def test_blur_equals_torchvision_with_the_truncated_kernel_per_row():
    stage = _Blur(kernel=29, sigma=(0.1, 2.0), p=0.5)
    x = _images(6).float() / 255
    u = np.array([[0.1, 0.0], [0.9, 0.3], [0.2, 1.0], [0.4, 0.5], [0.6, 0.7], [0.0, 0.05]])
    out = stage.apply(x.clone(), _plan_stage(stage, u))
    for i in range(6):
        if u[i, 0] >= 0.5:  # coin says no blur: untouched
            assert torch.equal(out[i], x[i])
            continue
        sigma = 0.1 + u[i, 1] * 1.9
        kernel = min(29, 2 * math.ceil(3 * sigma) + 1)
        assert torch.allclose(out[i], TF.gaussian_blur(x[i], [kernel, kernel], [sigma, sigma]), atol=1e-5)


def test_crop_box_maps_the_right_pixels_and_flip_flips():
    stage = _CropFlip(scale=(0.08, 1.0))
    x = _images(4).float() / 255
    u = np.random.default_rng(0).random((4, stage.draws))
    u[:, 22] = [0.1, 0.9, 0.2, 0.8]  # rows 0 and 2 flip
    plan = _plan_stage(stage, u)
    out = stage.apply(x.clone(), plan)
    for i, (top, left, h, w) in enumerate(plan["boxes"]):
        assert 0 <= top and top + h <= S and 0 <= left and left + w <= S
        expected = TF.resized_crop(x[i], int(top), int(left), int(h), int(w), [S, S], antialias=True)
        if plan["flipped"][i]:
            expected = expected.flip(-1)
        # same sample positions; only the outer ring differs (grid_sample blends with the pixels beyond
        # the crop's edge, torchvision repeats the edge pixel: docs/data.md)
        assert torch.allclose(out[i, :, 1:-1, 1:-1], expected[:, 1:-1, 1:-1], atol=1e-5), i
    # the whole image unflipped is the identity; flipped, the mirror image
    whole = _CropFlip(scale=(1.0, 1.0), ratio=(1.0, 1.0))
    u = np.zeros((2, whole.draws))
    u[:, 22] = [0.9, 0.1]
    out = whole.apply(x[:2].clone(), _plan_stage(whole, u))
    assert torch.allclose(out[0], x[0], atol=1e-5) and torch.allclose(out[1], x[1].flip(-1), atol=1e-5)


def test_pad_crop_flip_equals_reflect_padding_and_crop_exactly():
    stage = _PadCropFlip(pad=4)
    x = _images(5).float()
    u = np.random.default_rng(1).random((5, 3))
    plan = _plan_stage(stage, u)
    out = stage.apply(x.clone(), plan)
    for i, (top, left) in enumerate(plan["offsets"]):
        assert 0 <= top <= 8 and 0 <= left <= 8
        expected = TF.crop(TF.pad(x[i], [4], padding_mode="reflect"), int(top), int(left), S, S)
        assert torch.equal(out[i], expected.flip(-1) if plan["flipped"][i] else expected)


def test_grayscale_rows_have_equal_channels_and_others_are_untouched():
    stage = _Gray(p=0.5)
    x = _images(4).float() / 255
    u = np.array([[0.1], [0.9], [0.3], [0.7]])
    out = stage.apply(x.clone(), _plan_stage(stage, u))
    for i in (0, 2):
        assert torch.equal(out[i, 0], out[i, 1]) and torch.equal(out[i, 1], out[i, 2])
        assert torch.allclose(out[i, 0], TF.rgb_to_grayscale(x[i])[0], atol=1e-6)
    assert torch.equal(out[1], x[1]) and torch.equal(out[3], x[3])


def test_crop_scales_and_aspects_follow_torchvision_distribution():
    n = 4000
    for scale in ((0.08, 1.0), (0.6, 1.0)):
        stage = _CropFlip(scale=scale)
        seeds = _seeds(n)
        boxes = stage.plan(_uniform(seeds, 7, stage.draws), np.arange(n), S, S)["boxes"]
        area = boxes[:, 2] * boxes[:, 3] / (S * S)
        aspect = boxes[:, 3] / boxes[:, 2]
        # rounding a side to whole pixels moves the area and aspect a little beyond the drawn bounds
        slack = 2.5 / S
        assert area.min() >= scale[0] - slack and area.max() <= 1.0
        assert aspect.min() >= 3 / 4 - 3 * slack and aspect.max() <= 4 / 3 + 3 * slack
        torch.manual_seed(0)
        reference = np.array([_torchvision_area(scale) for _ in range(n)])
        assert abs(area.mean() - reference.mean()) < 0.02, (scale, area.mean(), reference.mean())


def _torchvision_area(scale) -> float:
    from torchvision.transforms import RandomResizedCrop

    _, _, h, w = RandomResizedCrop.get_params(torch.zeros(3, S, S), list(scale), [3 / 4, 4 / 3])
    return h * w / (S * S)


# ------------------------------------------------------------------ views and seeding
def test_p_zero_and_no_joint_coin_leave_the_image_resized_only():
    cfg = ViewConfig(image_size=S, preset="dvm", augmentation_rate=0.0)
    x = _images()
    assert torch.equal(build_device_view("stil", cfg)(x, _seeds()), x.float() / 255)
    hard = build_device_view("hard", cfg)
    augment = np.array([True, False] * 4)
    out = hard(x, _seeds(), augment)
    assert all(torch.equal(out[i], x[i].float() / 255) for i in range(8) if not augment[i])
    assert all(not torch.equal(out[i], x[i].float() / 255) for i in range(8) if augment[i])


@pytest.mark.parametrize("name,preset", [("stil", "dvm"), ("stil_always", "default"), ("hard", "dvm"),
                                         ("weak", "dvm"), ("weak", "cifar"), ("strong", "dvm"), ("strong", "cardiac")])
def test_a_rows_view_depends_on_its_seed_only(name, preset):
    view = build_device_view(name, ViewConfig(image_size=S, preset=preset))
    x = _images(8)
    seeds = _seeds(8)
    out = view(x, seeds)
    assert out.shape == (8, 3, S, S) and out.dtype == torch.float32 and 0 <= out.min() and out.max() <= 1
    assert torch.equal(view(x, seeds), out)  # a fixed seed repeats
    assert torch.equal(view(x[4:], seeds[4:]), out[4:])  # whatever else is in the batch
    again = view(x[:1].repeat(8, 1, 1, 1), seeds)  # one image, eight rows: eight different views
    assert len({again[i].sum().item() for i in range(8)}) >= 6
    other = view(x, _seeds(8, key="other"))
    assert not torch.equal(other, out)


def test_unported_views_are_named_and_refused():
    assert device_view_unsupported("strong", ViewConfig(preset="default")) is not None
    assert "RandAugment" in device_view_unsupported("strong", ViewConfig(preset="cifar"))
    assert "rotat" in device_view_unsupported("stil", ViewConfig(preset="cardiac"))
    assert device_view_unsupported("translate", ViewConfig()) is not None
    assert device_view_unsupported("weak", ViewConfig(preset="aflw")) is not None
    assert device_view_unsupported("weak", ViewConfig(preset="cardiac")) is None
    with pytest.raises(ViewError, match="RandAugment"):
        build_device_view("strong", ViewConfig(preset="default"))


def test_grayscale_images_get_no_colour_stages():
    cfg = ViewConfig(image_size=S, preset="dvm", num_channels=1)
    view = build_device_view("stil_always", cfg)
    out = view(_images(4, channels=1), _seeds(4))
    assert out.shape == (4, 1, S, S)


# ------------------------------------------------------------------ the loader's requests
def _loaders(loader_data, cfg, labeled_views, unlabeled_views):
    dd, meta, schema = loader_data
    return build_train_loaders(dd, meta, schema, labeled_views=labeled_views, unlabeled_views=unlabeled_views,
                               view_config=cfg, batch_size=2, mu=3)


def test_loader_ships_resized_uint8_and_seeds_and_device_views_make_the_batch(loader_data):
    cfg = ViewConfig(image_size=16, preset="default", seed=5, image_mean=(0.5, 0.4, 0.3), image_std=(0.2, 0.3, 0.4))
    on = replace(cfg, views_on_device=True)
    labeled_views, unlabeled_views = {"hard": "hard"}, {"weak": "weak", "strong": "strong"}
    labeled, unlabeled = next(_loaders(loader_data, on, labeled_views, unlabeled_views).iterate(0))
    plain_l, plain_u = next(_loaders(loader_data, cfg, labeled_views, unlabeled_views).iterate(0))
    # ported: resized uint8 + the rows' seeds (and the joint coins the tabular view used)
    request = labeled["hard"][BATCH_KEY]
    assert labeled["hard"]["pixel_values"].dtype == torch.uint8 and request["view"] == "hard"
    seeds = sample_seeds(5, "labeled", "hard", np.zeros(2), labeled["index"].numpy())
    assert np.array_equal(request["seeds"].numpy().view(np.uint64), seeds)
    assert np.array_equal(request["augment"].numpy(), joint_coins(seeds, joint_probability(get_recipe("hard"), on)))
    assert torch.equal(labeled["hard"]["continuous_values"], plain_l["hard"]["continuous_values"])
    # not ported (RandAugment): made and normalised by the loader exactly as without the option
    assert BATCH_KEY not in unlabeled["strong"]
    assert torch.equal(unlabeled["strong"]["pixel_values"], plain_u["strong"]["pixel_values"])
    views = DeviceViews(on)
    out_l, out_u = views.prepare(labeled, "cpu"), views.prepare(unlabeled, "cpu")
    for batch, plain in ((out_l, plain_l), (out_u, plain_u)):
        for key in ("hard", "weak", "strong"):
            if key not in batch:
                continue
            assert BATCH_KEY not in batch[key]
            assert set(batch[key]) == set(plain[key])
            pixels = batch[key]["pixel_values"]
            assert pixels.dtype == torch.float32 and pixels.shape == plain[key]["pixel_values"].shape
            lo = (0 - 0.5) / 0.2
            assert pixels.min() >= lo - 1e-5
    assert torch.equal(out_u["strong"]["pixel_values"], plain_u["strong"]["pixel_values"])
    # a row the joint coin leaves clean is the plain resize, normalised
    mean, std = torch.tensor(on.image_mean).view(3, 1, 1), torch.tensor(on.image_std).view(3, 1, 1)
    for i, coin in enumerate(request["augment"].tolist()):
        resized = (labeled["hard"]["pixel_values"][i].float() / 255 - mean) / std
        assert torch.allclose(out_l["hard"]["pixel_values"][i], resized, atol=1e-6) != coin


def test_streaming_refuses_the_option_in_one_line():
    from modeling_stil.training.errors import JobError
    from modeling_stil.training.streaming_setup import check_streaming_arguments

    data = SimpleNamespace(dataset="shards", labeled_fraction=None, labeled_per_class=None, standardize_targets=False,
                           bad_images="error", image_views_on_device=True)
    args = SimpleNamespace(data=data, training=SimpleNamespace(max_steps=5, method="stil"))
    with pytest.raises(JobError, match="image_views_on_device"):
        check_streaming_arguments(args, SimpleNamespace(linear_probe=False))


# ------------------------------------------------------------------ training with the option on (CPU)
def _trains(out):
    lines = [json.loads(l) for l in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    losses = [l["loss"] for l in lines if l.get("split") == "train" and "loss" in l]
    assert losses and all(math.isfinite(v) for v in losses)
    first = load_file(out / "checkpoints" / "checkpoint-1" / "model.safetensors")
    last = load_file(out / "checkpoints" / "checkpoint-2" / "model.safetensors")
    assert any(not torch.equal(first[k], last[k]) for k in first)


def test_stil_trains_with_views_on_the_device(tmp_path, synthetic_cache):
    from tests.test_end_to_end_stil import stil_argv

    out = tmp_path / "stil"
    code, stdout, stderr = train_captured(stil_argv(out, synthetic_cache, "--max_steps", "2", "--eval_steps", "1",
                                                    "--image_views_on_device", "true"))
    assert code == 0, stderr[-2000:]
    assert "image views on the device: stil (stil)" in stdout
    _trains(out)


def test_fixmatch_trains_with_weak_on_the_device_and_strong_kept_on_the_cpu(tmp_path, synthetic_cache):
    out = tmp_path / "fixmatch"
    code, stdout, stderr = train_captured(tiny_fixmatch_argv(out, synthetic_cache, "--max_steps", "2", "--eval_steps",
                                                             "1", "--image_views_on_device", "true"))
    assert code == 0, stderr[-2000:]
    line = next(l for l in stdout.splitlines() if l.startswith("image views on the device"))
    assert "weak (weak)" in line and "kept on the CPU: strong (strong)" in line and "RandAugment" in line
    _trains(out)


def test_applying_a_plan_never_waits_for_the_device():
    """Everything data-dependent is decided on the host (the plan); on a GPU the views then queue
    behind the training step without a host synchronisation (counted as tests/test_no_host_sync.py does)."""
    from tests.test_no_host_sync import count_host_syncs

    for name, preset in (("stil", "dvm"), ("weak", "cifar"), ("strong", "dvm")):
        view = build_device_view(name, ViewConfig(image_size=S, preset=preset))
        x = _images(8)
        plan = view.plan(_seeds(8), np.array([True] * 6 + [False] * 2), (S, S)).to("cpu")
        with count_host_syncs() as calls:
            view.apply(x, plan)
        assert calls == [], (name, calls)


def test_the_device_stream_resumes_onto_the_same_views(loader_data):
    from modeling_stil.training.data_setup import DeviceViewStream

    on = ViewConfig(image_size=16, preset="dvm", seed=5, views_on_device=True)
    stream = DeviceViewStream(_loaders(loader_data, on, {"stil": "stil"}, {"stil": "stil", "weak": "weak"}),
                              DeviceViews(on), "cpu")
    assert stream.steps_per_epoch == stream.stream.steps_per_epoch and not hasattr(stream, "state_dict")
    straight = stream.iterate(0)
    next(straight)
    labeled, unlabeled = next(straight)
    resumed_l, resumed_u = next(stream.iterate(1))
    for a, b in ((labeled, resumed_l), (unlabeled, resumed_u)):
        assert torch.equal(a["index"], b["index"])
        for key in ("stil", "weak"):
            if key in a:
                assert a[key]["pixel_values"].dtype == torch.float32
                assert torch.equal(a[key]["pixel_values"], b[key]["pixel_values"])


def test_requests_travel_through_loader_workers(loader_data):
    dd, meta, schema = loader_data
    on = ViewConfig(image_size=16, preset="dvm", seed=5, views_on_device=True)
    views = DeviceViews(on)
    batches = []
    for workers in (0, 1):
        loaders = build_train_loaders(dd, meta, schema, labeled_views={"hard": "hard"}, unlabeled_views={"stil": "stil"},
                                      view_config=on, batch_size=2, mu=3, num_workers=workers)
        labeled, unlabeled = next(loaders.iterate(0))
        batches.append((views.prepare(labeled, "cpu"), views.prepare(unlabeled, "cpu")))
    (l0, u0), (l1, u1) = batches
    assert torch.equal(l0["hard"]["pixel_values"], l1["hard"]["pixel_values"])
    assert torch.equal(u0["stil"]["pixel_values"], u1["stil"]["pixel_values"])
