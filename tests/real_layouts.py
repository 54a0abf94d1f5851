"""Tiny fixtures written in the REAL file layouts of the public downloads (for the builder tests).

Each writer produces a handful of rows and 16-32 px images in exactly the format the real files use:
header-less CSVs, ``torch.save``'d Python lists (and numpy arrays where TIP saved arrays), ``.npy``
siblings, ``scipy.io.savemat`` files, and pickled CIFAR batches inside a ``.tar.gz``.
"""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

DVM_LENGTHS = [22, 13, 3, 12] + [1] * 13


def _jpg(path: Path, rng, size=16):
    path.parent.mkdir(parents=True, exist_ok=True)
    array = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    Image.fromarray(array).save(path, format="JPEG")
    return array


def write_dvm_prepared(root: Path, sizes=(12, 6, 6), num_classes: int = 3, seed: int = 0, npy: bool = True) -> dict:
    """TIP's ``features/`` folder + ``resized_DVM`` images (absolute .jpg paths, .npy siblings)."""
    rng = np.random.default_rng(seed)
    features = root / "features"
    features.mkdir(parents=True, exist_ok=True)
    torch.save(DVM_LENGTHS, features / "tabular_lengths_all_views_physical_reordered.pt")
    info = {}
    for split, n in zip(("train", "val", "test"), sizes):
        labels = [i % num_classes for i in range(n)]
        cats = np.stack([rng.integers(0, k, n) for k in DVM_LENGTHS[:4]], axis=1)
        cons = rng.normal(size=(n, 13)).round(6)
        table = pd.DataFrame(np.concatenate([cats.astype(object), cons.astype(object)], axis=1))
        table.to_csv(features / f"dvm_features_{split}_noOH_all_views_physical_jittered_50_reordered.csv",
                     header=False, index=False)
        ids = [f"{c}_1$${split}{i}" for i, c in enumerate(labels)]
        paths = []
        for i, c in enumerate(labels):
            path = root / "resized_DVM" / "Maker" / f"Model{c}" / "2018" / "Red" / f"Maker$$Model{c}$$2018$$Red$${c}_1$${split}{i}$$image_0.jpg"
            array = _jpg(path, rng)
            if npy:
                np.save(str(path)[:-4] + ".npy", np.asarray(Image.open(path)))
            paths.append(str(path))
        torch.save(labels, features / f"labels_model_all_{split}_all_views.pt")
        torch.save(paths, features / f"{split}_paths_all_views.pt")
        torch.save(ids, features / f"{split}_ids_all_views.pt")
        info[split] = {"labels": labels, "cats": cats, "cons": cons, "paths": paths, "ids": ids}
    return info


def write_dvm_subset_files(root: Path, info: dict, subset: str, rows: list[int], kind: str) -> None:
    """Low-data subset files as TIP wrote them: ids list, numpy array of paths, or STiL flags."""
    features = root / "features"
    train = info["train"]
    if kind == "ids":
        torch.save([train["ids"][i] for i in rows], features / f"train_ids_all_views_{subset}.pt")
    elif kind == "paths":
        torch.save(np.array([train["paths"][i] for i in rows]), features / f"train_paths_all_views_{subset}.pt")
    elif kind == "identification":
        flags = [i in set(rows) for i in range(len(train["ids"]))]
        torch.save(flags, features / f"train_labelled_identification_{subset}.pt")
    torch.save([train["labels"][i] for i in rows], features / f"labels_model_all_train_all_views_{subset}.pt")


# ------------------------------------------------------------------------------------------ raw DVM
MODELS = [("Audi", "A3", "7_1"), ("Ford", "Fiesta", "29_5"), ("BMW", "X5", "8_12"), ("Kia", "Rio", "43_9")]


def write_dvm_raw(root: Path, per_class=(14, 12, 10, 3), seed: int = 0) -> dict:
    """``tables_V2.0/*.csv`` (with the download's leading-space headers) and ``resized_DVM/`` images.

    Also plants what the cleaning must handle: an advert with two images, one without a price row,
    one with a missing cell, one with an unparseable mileage, a zero wheelbase to fill from another
    advert of the same model, and a rare model (fewer adverts than the population threshold).
    """
    rng = np.random.default_rng(seed)
    tables = root / "tables_V2.0"
    tables.mkdir(parents=True, exist_ok=True)
    ads, images, extra, prices = [], [], [], []
    colors, bodies, gears, fuels = ["Black", "Blue", "Red", "White"], ["Hatchback", "SUV", "Saloon"], \
        ["Automatic", "Manual"], ["Diesel", "Petrol"]
    for (maker, model, gid), count in zip(MODELS, per_class):
        for year in (2015, 2016, 2017):
            prices.append({"Maker": maker, " Genmodel": model, " Genmodel_ID": gid, " Year": year,
                           " Entry_price": 15000 + 1000 * (year - 2015) + len(gid)})
        for k in range(count):
            adv = f"{gid}$${k + 1}"
            year = 2015 + k % 3
            color = colors[(k + len(model)) % 4]
            ads.append({"Maker": maker, " Genmodel": model, " Genmodel_ID": gid, "Adv_ID": adv, "Adv_year": 2018,
                        "Adv_month": 1 + k % 12, "Color": color, "Reg_year": float(year),
                        "Bodytype": bodies[(k + len(gid)) % 3], "Runned_Miles": str(1000 * (k + 1)),
                        "Engin_size": f"{1.0 + 0.2 * (k % 4):.1f}L", "Gearbox": gears[k % 2],
                        "Fuel_type": fuels[(k // 2) % 2], "Price": str(9000 + 137 * k), "Seat_num": 5.0,
                        "Door_num": float(3 + k % 3)})
            for view in range(2 if k == 0 else 1):  # the first advert of a model has two images
                name = f"{maker}$${model}$${year}$${color}$${adv}$$image_{view}.jpg"
                images.append({"Genmodel_ID": gid, " Image_ID": f"{adv}$${view}", " Image_name": name,
                               " Predicted_viewpoint": 0, " Quality_check": "P"})
                _jpg(root / "resized_DVM" / maker / model / str(year) / color / name, rng)
            extra.append({"Adv_ID": adv, " Genmodel": model, " Genmodel_ID": gid,
                          "Wheelbase": 0.0 if k == 1 else 2500.0 + 10 * len(gid), "Length": 4000.0 + len(model),
                          "Width": 1800.0, "Height": 1450.0 + k % 2})
    ads[2]["Reg_year"] = 1990.0  # no Price_table row for that year -> dropped by the join
    ads[3]["Color"] = None  # missing cell -> dropped
    ads[4]["Runned_Miles"] = "lots"  # unparseable -> dropped
    pd.DataFrame(ads).to_csv(tables / "Ad_table.csv", index=False)
    pd.DataFrame(prices).to_csv(tables / "Price_table.csv", index=False)
    pd.DataFrame(images).to_csv(tables / "Image_table.csv", index=False)
    pd.DataFrame(extra).to_csv(tables / "Ad_table (extra).csv", index=False)
    return {"ads": ads, "extra": extra, "images": images}


# ------------------------------------------------------------------------------------------- UKBB
def write_ukbb(root: Path, target: str = "CAD", sizes=(16, 6, 6), n_cat: int = 3, n_con: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    lengths = [2, 3, 4][:n_cat] + [1] * n_con
    torch.save(lengths, root / "tabular_lengths_reordered.pt")
    info = {"lengths": lengths}
    for split, n in zip(("train", "val", "test"), sizes):
        cats = np.stack([rng.integers(0, k, n) for k in lengths[:n_cat]], axis=1)
        cons = rng.normal(size=(n, n_con)).round(6)
        pd.DataFrame(np.concatenate([cats.astype(object), cons.astype(object)], axis=1)).to_csv(
            root / f"cardiac_features_{split}_imputed_noOH_tabular_imaging_reordered.csv", header=False, index=False)
        labels = np.array([1 if i % 4 == 0 else 0 for i in range(n)])
        paths, images = [], []
        for i in range(n):
            path = root / "images" / f"{1000000 + i}{split}" / "sa_es_ed_mm.npy"
            path.parent.mkdir(parents=True, exist_ok=True)
            image = rng.random((24, 24, 3)).astype(np.float32)
            image /= image.max(axis=(0, 1), keepdims=True)
            np.save(path, image)
            paths.append(str(path))
            images.append(image)
        torch.save(labels, root / f"cardiac_labels_{target}_{split}.pt")  # TIP saved .values: a numpy array
        torch.save(paths, root / f"cardiac_{split}_paths_imaging.pt")
        info[split] = {"labels": labels.tolist(), "cats": cats, "cons": cons, "images": images}
    return info


# ------------------------------------------------------------------------------------------ CIFAR
def write_cifar10_tarball(path: Path, per_class: int = 4, test_per_class: int = 1, seed: int = 0) -> dict:
    """cifar-10-python.tar.gz: five data batches, test_batch, batches.meta (python pickles, bytes keys)."""
    rng = np.random.default_rng(seed)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    n = 10 * per_class
    labels = [i % 10 for i in range(n)]
    data = rng.integers(0, 255, (n, 3072), dtype=np.uint8)
    test_labels = [i % 10 for i in range(10 * test_per_class)]
    test = rng.integers(0, 255, (len(test_labels), 3072), dtype=np.uint8)
    members = {}
    for b, chunk in enumerate(np.array_split(np.arange(n), 5)):
        members[f"data_batch_{b + 1}"] = {b"batch_label": f"training batch {b + 1} of 5".encode(),
                                          b"labels": [labels[i] for i in chunk], b"data": data[chunk],
                                          b"filenames": [f"img_{i}.png".encode() for i in chunk]}
    members["test_batch"] = {b"batch_label": b"testing batch 1 of 1", b"labels": test_labels, b"data": test}
    members["batches.meta"] = {b"num_cases_per_batch": n // 5, b"label_names": [x.encode() for x in names],
                               b"num_vis": 3072}
    with tarfile.open(path, "w:gz") as tar:
        for name, obj in members.items():
            payload = pickle.dumps(obj, protocol=2)
            entry = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            entry.size = len(payload)
            tar.addfile(entry, io.BytesIO(payload))
    return {"data": data, "labels": labels, "test": test, "test_labels": test_labels, "names": names}


# ------------------------------------------------------------------------------------------- AFLW
def write_aflw(root: Path, n_train: int = 20, n_test: int = 5, seed: int = 0) -> dict:
    """IMM release: aflw_{split}_images.txt, aflw_{split}_keypoints.mat (gt N x 5 x 2 as (y, x)), output/."""
    import scipy.io

    rng = np.random.default_rng(seed)
    info = {}
    for split, n in (("train", n_train), ("test", n_test)):
        names, gts = [], []
        for i in range(n):
            name = f"{split}/face_{i:03d}.jpg"
            h, w = 24 + (i % 3) * 4, 20 + (i % 2) * 8
            mode = "L" if i % 2 else "RGB"
            path = root / "output" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            shape = (h, w) if mode == "L" else (h, w, 3)
            Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode=mode).save(path, format="JPEG")
            xy = np.stack([rng.uniform(0, w, 5), rng.uniform(0, h, 5)], axis=1)
            gts.append(xy[:, ::-1])  # stored (y, x)
            names.append(name)
        (root / f"aflw_{split}_images.txt").write_text("\n".join(names) + "\n")
        gt = np.stack(gts)
        scipy.io.savemat(root / f"aflw_{split}_keypoints.mat", {"gt": gt, "hw": np.ones((n, 2))})
        info[split] = {"names": names, "gt": gt}
    return info
