"""Training/eval loaders: batch contract, mu and epochs, cycling, exact resume, sharding, errors."""

from __future__ import annotations

import io

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from data_utils.io import DatasetMetadata
from data_utils.loaders import (
    LoaderError,
    ShardedBatchSampler,
    build_eval_loader,
    build_train_loaders,
    decode_image,
)
from data_utils.schema import SchemaError
from data_utils.splits import SplitError
from data_utils.views import ViewConfig, ViewError, normalize_pixels
from tests.helpers.loader_data import CFG, make_multimodal, random_image


def _loaders(loader_data, **kw):
    dd, meta, schema = loader_data
    options = dict(labeled_views={"weak": "weak"}, unlabeled_views={"weak": "weak", "strong": "strong"},
                   view_config=CFG, batch_size=2, mu=3)
    options.update(kw)
    return build_train_loaders(dd, meta, schema, **options)


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _assert_equal(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_equal(a[k], b[k])
    elif a is None:
        assert b is None
    else:
        assert torch.equal(a, b)


def test_batch_contract_shapes_and_dtypes(loader_data):
    loaders = _loaders(loader_data)
    labeled, unlabeled = next(loaders.iterate(0))
    assert set(labeled) == {"labels", "index", "position", "weak"}
    assert set(unlabeled) == {"monitor_labels", "index", "position", "weak", "strong"}
    assert labeled["labels"].dtype == torch.long and labeled["labels"].shape == (2,)
    assert unlabeled["monitor_labels"].shape == (6,) and unlabeled["index"].dtype == torch.long
    for batch, b in ((labeled, 2), (unlabeled, 6)):
        for key in [k for k in batch if isinstance(batch[k], dict)]:
            inputs = batch[key]
            assert set(inputs) == {"pixel_values", "categorical_values", "continuous_values", "missing_mask"}
            assert inputs["pixel_values"].shape == (b, 3, 16, 16) and inputs["pixel_values"].dtype == torch.float32
            assert inputs["categorical_values"].shape == (b, 2) and inputs["categorical_values"].dtype == torch.long
            assert inputs["continuous_values"].shape == (b, 2) and inputs["continuous_values"].dtype == torch.float32
            assert inputs["missing_mask"].shape == (b, 4) and inputs["missing_mask"].dtype == torch.bool
    train = loader_data[0]["train"]
    assert all(train[int(i)]["labeled"] for i in labeled["index"])
    assert not any(train[int(i)]["labeled"] for i in unlabeled["index"])
    assert labeled["labels"].tolist() == [train[int(i)]["label"] for i in labeled["index"]]
    assert unlabeled["monitor_labels"].tolist() == [train[int(i)]["label"] for i in unlabeled["index"]]
    # positions index the labelled stream: rows = labeled_rows[position]
    assert np.array_equal(loaders.labeled_rows[labeled["position"].numpy()], labeled["index"].numpy())


def test_eval_batches_are_clean_sequential_and_deterministic(loader_data):
    dd, meta, schema = loader_data
    loader = build_eval_loader(dd, meta, schema, "validation", batch_size=4, view_config=CFG)
    batches = list(loader)
    assert len(loader) == 3 and [len(b["index"]) for b in batches] == [4, 4, 2]
    assert torch.cat([b["index"] for b in batches]).tolist() == list(range(10))
    assert set(batches[0]) == {"labels", "index", "eval"}
    again = list(loader)
    for a, b in zip(batches, again):
        _assert_equal(a, b)
    encoded = schema.encode_columns(dd["validation"][0:4])
    assert np.array_equal(batches[0]["eval"]["continuous_values"].numpy(), encoded["continuous_values"])
    assert np.array_equal(batches[0]["eval"]["missing_mask"].numpy(), encoded["missing_mask"])
    # pixels: the stored image resized to 16 px, divided by 255
    stored = np.asarray(dd["validation"][0]["image"].resize((16, 16), Image.BILINEAR), dtype=np.float32) / 255
    assert np.allclose(batches[0]["eval"]["pixel_values"][0].permute(1, 2, 0).numpy(), stored, atol=1e-6)
    # uint8 batches (normalised later, on the device) hold the same pixels
    raw_cfg = ViewConfig(image_size=16, preset="dvm", seed=5, normalize_in_loader=False)
    raw = next(iter(build_eval_loader(dd, meta, schema, "validation", batch_size=4, view_config=raw_cfg)))
    assert raw["eval"]["pixel_values"].dtype == torch.uint8
    assert torch.allclose(normalize_pixels(raw, raw_cfg)["eval"]["pixel_values"], batches[0]["eval"]["pixel_values"])


def test_mu_ratio_epoch_length_and_unlabelled_pass(loader_data):
    loaders = _loaders(loader_data)
    assert (loaders.num_labeled, loaders.num_unlabeled) == (12, 28)
    assert loaders.steps_per_epoch == 28 // 6 == 4 and loaders.labeled_batches_per_pass == 6
    seen = []
    for labeled, unlabeled in _take(loaders.iterate(0), loaders.steps_per_epoch):
        assert len(unlabeled["index"]) == 3 * len(labeled["index"])
        seen += unlabeled["index"].tolist()
    assert len(set(seen)) == len(seen) == 24  # one pass, drop_last drops the 4-row remainder
    only_labeled = _loaders(loader_data, unlabeled_views=None)
    assert only_labeled.steps_per_epoch == 6 and next(only_labeled.iterate(0))[1] is None
    assert _loaders(loader_data, unlabeled_includes_labeled=True).num_unlabeled == 40


def test_labelled_stream_cycles_with_a_fresh_shuffle(loader_data):
    loaders = _loaders(loader_data)
    batches = _take(loaders.iterate(0), 12)  # two labelled passes
    first = [i for lab, _ in batches[:6] for i in lab["index"].tolist()]
    second = [i for lab, _ in batches[6:] for i in lab["index"].tolist()]
    assert sorted(first) == sorted(second) == loaders.labeled_rows.tolist()
    assert first != second
    # augmentations differ between passes for the same row (pass number is in the seed)
    row = first[0]
    pix = {}
    for step, (lab, _) in enumerate(batches):
        for j, i in enumerate(lab["index"].tolist()):
            if i == row:
                pix[step // 6] = lab["weak"]["pixel_values"][j]
    assert not torch.equal(pix[0], pix[1])


def test_exact_resume_without_loading_skipped_batches(loader_data):
    loaders = _loaders(loader_data)
    reference = _take(loaders.iterate(0), 10)
    calls = {"n": 0}
    original = loaders.unlabeled_dataset.__getitems__

    def counting(keys):
        calls["n"] += 1
        return original(keys)

    loaders.unlabeled_dataset.__getitems__ = counting
    resumed = _take(loaders.iterate(6), 4)
    assert calls["n"] == 4
    for (la, ua), (lb, ub) in zip(reference[6:], resumed):
        _assert_equal(la, lb)
        _assert_equal(ua, ub)
    # a fresh object (new process after a crash) gives the same batches too
    fresh = _loaders(loader_data)
    _assert_equal(next(fresh.iterate(7))[1], reference[7][1])


def test_batches_independent_of_worker_count(loader_data):
    serial = _take(_loaders(loader_data, num_workers=0).iterate(3), 3)
    parallel_loaders = _loaders(loader_data, num_workers=2, persistent_workers=True)
    parallel = _take(parallel_loaders.iterate(3), 3)
    for (la, ua), (lb, ub) in zip(serial, parallel):
        _assert_equal(la, lb)
        _assert_equal(ua, ub)
    # persistent workers: a second iterate() restarts cleanly at the requested step
    _assert_equal(next(parallel_loaders.iterate(4))[1], serial[1][1])
    # uint8 batches written into shared memory by the workers hold the same pixels
    raw_cfg = ViewConfig(image_size=16, preset="dvm", seed=5, normalize_in_loader=False)
    raw = next(_loaders(loader_data, num_workers=1, view_config=raw_cfg).iterate(3))[1]
    assert raw["strong"]["pixel_values"].dtype == torch.uint8
    _assert_equal(normalize_pixels(raw, raw_cfg), serial[0][1])


def test_loading_does_not_touch_the_global_rng(loader_data):
    loaders = _loaders(loader_data)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    next(loaders.iterate(0))
    assert torch.equal(torch.rand(3), expected)


def test_rank_sharding_covers_without_overlap(loader_data):
    for n, b in ((28, 3), (29, 2), (12, 5)):
        for p in range(3):
            shards = [ShardedBatchSampler(n, b, seed=1, stream="u", num_replicas=2, rank=r) for r in range(2)]
            nb = shards[0].batches_per_pass
            assert nb == n // (2 * b)
            per_rank = [[k[0] for j in range(nb) for k in s.batch(p * nb + j)] for s in shards]
            assert not set(per_rank[0]) & set(per_rank[1])
            assert len(per_rank[0]) == len(per_rank[1]) == nb * b
            assert len(set(per_rank[0]) | set(per_rank[1])) == 2 * nb * b
    # without drop_last every element of the pass is covered (padded by wrapping)
    s = [ShardedBatchSampler(11, 2, num_replicas=2, rank=r, drop_last=False, infinite=False) for r in range(2)]
    covered = {k[0] for sampler in s for batch in sampler for k in batch}
    assert covered == set(range(11)) and len(s[0]) == len(s[1]) == 3
    # through the loaders: two ranks see disjoint unlabelled rows in each step
    r0, r1 = _loaders(loader_data, num_replicas=2, rank=0), _loaders(loader_data, num_replicas=2, rank=1)
    assert r0.steps_per_epoch == r1.steps_per_epoch == 28 // 12
    for (la, ua), (lb, ub) in zip(_take(r0.iterate(0), 2), _take(r1.iterate(0), 2)):
        assert not set(ua["index"].tolist()) & set(ub["index"].tolist())
        assert not set(la["index"].tolist()) & set(lb["index"].tolist())


def test_image_only_and_tabular_only_datasets():
    dd, meta, schema = make_multimodal(tabular=False)
    lab, unl = next(build_train_loaders(dd, meta, None, labeled_views={"weak": "weak"}, unlabeled_views={"s": "stil"},
                                        view_config=CFG, batch_size=2, mu=2).iterate(0))
    assert set(lab["weak"]) == {"pixel_values"} and set(unl["s"]) == {"pixel_values"}
    dd, meta, schema = make_multimodal(image=False)
    lab, unl = next(build_train_loaders(dd, meta, schema, labeled_views={"weak": "weak"},
                                        unlabeled_views={"m": "masked"}, view_config=CFG, batch_size=2, mu=2).iterate(0))
    assert set(lab["weak"]) == {"categorical_values", "continuous_values", "missing_mask"}
    assert set(unl["m"]) == {"categorical_values", "continuous_values", "missing_mask", "masked_fields"}
    assert (unl["m"]["masked_fields"].sum(dim=1) <= 2).all()  # round(0.5 * 4) = 2 fields masked per row


def test_landmarks_translate_view_moves_targets_and_scales_to_model_frame():
    rng = np.random.default_rng(0)
    images, labels = [], []
    for _ in range(12):
        img = np.zeros((20, 20), dtype=np.uint8)
        x, y = (int(v) for v in rng.integers(5, 15, 2))
        img[y, x] = 255
        images.append(Image.fromarray(img, mode="L"))
        labels.append([float(x), float(y)])
    features = datasets.Features(image=datasets.Image(), label=datasets.List(datasets.Value("float32")),
                                 labeled=datasets.Value("bool"))
    train = datasets.Dataset.from_dict({"image": images, "label": labels, "labeled": [True] * 12}, features=features)
    dd = datasets.DatasetDict(train=train)
    meta = DatasetMetadata(task="landmarks", image_column="image", num_targets=2)
    cfg = ViewConfig(image_size=20, num_channels=1, preset="aflw")
    loaders = build_train_loaders(dd, meta, None, labeled_views={"t": "translate"},
                                  unlabeled_views={"t1": "translate", "t2": "translate"}, view_config=cfg,
                                  batch_size=4, mu=1, unlabeled_includes_labeled=True)
    labeled, unlabeled = next(loaders.iterate(0))
    view = labeled["t"]
    assert view["translation"].shape == (4, 2) and view["labels"].shape == (4, 2)
    assert torch.equal(view["labels"], labeled["labels"] + view["translation"])
    for img, (x, y) in zip(view["pixel_values"], view["labels"].long().tolist()):
        assert img[0, y, x] == 1.0 and img.sum() == 1.0
    assert not torch.equal(unlabeled["t1"]["translation"], unlabeled["t2"]["translation"])
    # targets are rescaled to the model input size
    big = ViewConfig(image_size=40, num_channels=1, preset="aflw")
    scaled = build_eval_loader(dd, meta, None, "train", batch_size=12, view_config=big)
    assert torch.allclose(next(iter(scaled))["labels"], torch.tensor(labels) * 2)
    with pytest.raises(ViewError, match="landmark"):
        build_train_loaders(dd, meta, None, labeled_views={"w": "weak"}, view_config=ViewConfig(image_size=20,
                            num_channels=1), batch_size=4, mu=1)


def test_clear_errors(loader_data):
    dd, meta, schema = loader_data
    with pytest.raises(SchemaError, match=r"lacks tabular column\(s\) \['price'\]"):
        build_train_loaders(datasets.DatasetDict(train=dd["train"].remove_columns("price")), meta, schema,
                            labeled_views={"weak": "weak"}, view_config=CFG, batch_size=2)
    no_labels = datasets.DatasetDict(train=dd["train"].map(lambda r: {"labeled": False}))
    with pytest.raises(SplitError, match="labelled set is empty"):
        build_train_loaders(no_labels, meta, schema, labeled_views={"weak": "weak"}, view_config=CFG, batch_size=2)
    missing_class = datasets.DatasetDict(train=dd["train"].map(lambda r: {"labeled": r["labeled"] and r["label"] != 2}))
    with pytest.raises(SplitError, match=r"classes \[2\] have no labelled"):
        build_train_loaders(missing_class, meta, schema, labeled_views={"weak": "weak"}, view_config=CFG, batch_size=2)
    with pytest.raises(LoaderError, match="exceeds the 12 labelled rows"):
        _loaders(loader_data, batch_size=7, num_replicas=2)
    with pytest.raises(LoaderError, match="unlabelled rows"):
        _loaders(loader_data, batch_size=4, mu=8)
    with pytest.raises(LoaderError, match="no 'test' split"):
        build_eval_loader(dd, meta, schema, "test", batch_size=2, view_config=CFG)
    with pytest.raises(LoaderError, match="rank"):
        ShardedBatchSampler(10, 2, num_replicas=2, rank=2)


def test_decode_image_formats_and_resize():
    rng = np.random.default_rng(0)
    pil = random_image(rng, size=(64, 48))
    buf = io.BytesIO()
    pil.save(buf, format="JPEG", quality=95)
    tensor, stored = decode_image({"bytes": buf.getvalue(), "path": None}, 3, 16)
    assert tensor.shape == (3, 16, 16) and tensor.dtype == torch.uint8 and stored == (64, 48)
    gray, _ = decode_image(pil, 1, None)
    assert gray.shape == (1, 48, 64)
    with pytest.raises(LoaderError, match="cannot decode"):
        decode_image(None, 3, 16)
