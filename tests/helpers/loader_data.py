"""A tiny image+tabular dataset in the stil layout, built in memory, and the view settings the loader
tests read it with (tests/test_loaders.py, test_loader_workers.py; the `loader_data` fixture)."""

import datasets
import numpy as np
from PIL import Image

from data_utils.io import DatasetMetadata
from data_utils.schema import TabularSchema
from data_utils.views import ViewConfig

CLASSES = ["a", "b", "c"]


def random_image(rng, size=(24, 20), mode="RGB"):
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode)


def make_multimodal(n_train=40, n_labeled_per_class=4, n_val=10, image=True, tabular=True, seed=0):
    """A tiny image+tabular DatasetDict in the stil layout, with its metadata and schema."""
    rng = np.random.default_rng(seed)

    def split(n, train):
        labels = [i % 3 for i in range(n)]
        data = {"label": labels}
        features = {"label": datasets.ClassLabel(names=CLASSES)}
        if image:
            data["image"] = [random_image(rng) for _ in range(n)]
            features["image"] = datasets.Image()
        if tabular:
            data["colour"] = [None if i % 7 == 0 else int(rng.integers(0, 3)) for i in range(n)]
            data["body"] = [int(rng.integers(0, 2)) for _ in range(n)]
            data["price"] = [None if i % 5 == 0 else float(rng.normal(100, 10)) for i in range(n)]
            data["mileage"] = [float(rng.normal(5e4, 1e4)) for _ in range(n)]
            features.update(colour=datasets.ClassLabel(names=["red", "blue", "grey"]),
                            body=datasets.ClassLabel(names=["suv", "van"]),
                            price=datasets.Value("float32"), mileage=datasets.Value("float32"))
        if train:
            labeled = np.zeros(n, dtype=bool)
            for c in range(3):
                labeled[[i for i in range(n) if labels[i] == c][:n_labeled_per_class]] = True
            data["labeled"] = labeled.tolist()
            features["labeled"] = datasets.Value("bool")
        return datasets.Dataset.from_dict(data, features=datasets.Features(features))

    dd = datasets.DatasetDict(train=split(n_train, True), validation=split(n_val, False))
    schema = None
    if tabular:
        tr = dd["train"]
        schema = TabularSchema.fit({k: tr[k] for k in ("colour", "body", "price", "mileage")},
                                   categorical=["colour", "body"], continuous=["price", "mileage"],
                                   categories={"colour": ["red", "blue", "grey"], "body": ["suv", "van"]})
    metadata = DatasetMetadata(task="classification", image_column="image" if image else None, label_names=CLASSES)
    return dd, metadata, schema


CFG = ViewConfig(image_size=16, preset="dvm", seed=5)
