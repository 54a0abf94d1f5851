"""`StilProcessor`: raw inputs (PIL images, raw tabular rows) -> the model input contract.

A deliberately simple class rather than a transformers ``ProcessorMixin``: in transformers 5 a
ProcessorMixin must be assembled from registered sub-processors (image processor, tokenizer...)
and none of them would carry a tabular schema, so we keep one JSON file of our own,
``processor_config.json``, written next to the model by ``save_pretrained`` and read back by
``from_pretrained(folder or Hub id)``.

It holds the `TabularSchema` dict and the image settings (size, channels, mean, std, resize size):

* images (PIL, file paths, HWC uint8 numpy arrays or CHW uint8 tensors; one or a list) are converted
  to RGB or L, turned into uint8 CHW tensors and passed through the ``eval`` view of
  ``data_utils/views.py`` (resize to ``image_size`` with antialiasing) and its ``normalize_batch``
  (``(x / 255 - mean) / std``), so inference sees exactly what evaluation saw;
* tabular rows (a dict or a list of dicts with RAW values: category strings, raw numbers; a missing
  cell is ``None``, ``""``, NaN or an absent key) go through ``TabularSchema.encode_raw_rows``
  (z-scoring with the train statistics; an unknown category raises naming the column and the known
  categories).

``postprocess(logits, id2label, problem_type, top_k)`` turns model outputs into readable predictions.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

PROCESSOR_FILENAME = "processor_config.json"


class StilProcessor:
    def __init__(
        self,
        tabular_schema: Mapping[str, Any] | None = None,
        image_size: int | None = 128,
        num_channels: int = 3,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        resize_size: int | None = None,
        image_column: str | None = "image",
        id2label: Mapping[Any, str] | None = None,
        problem_type: str | None = None,
    ):
        if tabular_schema is not None and hasattr(tabular_schema, "to_dict"):
            tabular_schema = tabular_schema.to_dict()
        self.tabular_schema = dict(tabular_schema) if tabular_schema is not None else None
        self.image_size = None if image_size is None else int(image_size)
        self.num_channels = int(num_channels)
        self.image_mean = [float(v) for v in (image_mean if image_mean is not None else [0.0] * self.num_channels)]
        self.image_std = [float(v) for v in (image_std if image_std is not None else [1.0] * self.num_channels)]
        if len(self.image_mean) != self.num_channels or len(self.image_std) != self.num_channels:
            raise ValueError(f"image_mean/image_std need {self.num_channels} values, got {self.image_mean}/{self.image_std}")
        self.resize_size = None if resize_size is None else int(resize_size)
        self.image_column = image_column
        self.id2label = {int(k): str(v) for k, v in id2label.items()} if id2label else None
        self.problem_type = problem_type
        self._schema = None
        self._view = None

    # ----------------------------------------------------------------------------- construction
    @classmethod
    def from_model_config(cls, config, image_column: str | None = "image") -> "StilProcessor":
        get = lambda k, d=None: getattr(config, k, d)  # noqa: E731
        uses_images = get("uses_images", get("image_size") is not None)
        return cls(
            tabular_schema=get("tabular_schema"),
            image_size=get("image_size") if uses_images else None,
            num_channels=get("num_channels", 3) or 3,
            image_mean=get("image_mean"),
            image_std=get("image_std"),
            resize_size=get("resize_size"),
            image_column=image_column if uses_images else None,
            id2label=get("id2label"),
            problem_type=get("problem_type"),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "processor_class": type(self).__name__,
            "tabular_schema": self.tabular_schema,
            "image_size": self.image_size,
            "num_channels": self.num_channels,
            "image_mean": self.image_mean,
            "image_std": self.image_std,
            "resize_size": self.resize_size,
            "image_column": self.image_column,
            "id2label": {str(k): v for k, v in self.id2label.items()} if self.id2label else None,
            "problem_type": self.problem_type,
        }

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        path = Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        target = path / PROCESSOR_FILENAME
        tmp = target.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2))
        os.replace(tmp, target)
        return target

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, revision: str | None = None) -> "StilProcessor":
        path = Path(name_or_path)
        if path.is_dir():
            file = path / PROCESSOR_FILENAME
            if not file.is_file():
                config_file = path / "config.json"
                if config_file.is_file():  # a model saved without processor: derive it from the config
                    from transformers import AutoConfig

                    import modeling_stil  # noqa: F401  (registers our configs)

                    return cls.from_model_config(AutoConfig.from_pretrained(str(path)))
                raise FileNotFoundError(f"no {PROCESSOR_FILENAME} (nor config.json) in {path}")
        else:
            from huggingface_hub import hf_hub_download

            try:
                file = Path(hf_hub_download(str(name_or_path), PROCESSOR_FILENAME, revision=revision))
            except Exception as error:  # offline / not found
                raise FileNotFoundError(
                    f"{name_or_path!r} is neither a local folder nor a reachable Hub repository with "
                    f"{PROCESSOR_FILENAME} ({type(error).__name__}: {error})"
                ) from error
        data = json.loads(file.read_text())
        data.pop("processor_class", None)
        return cls(**data)

    # ----------------------------------------------------------------------------- properties
    @property
    def schema(self):
        if self.tabular_schema is None:
            return None
        if self._schema is None:
            from data_utils.schema import TabularSchema

            fields = [{k: v for k, v in f.items() if k in ("name", "kind", "categories", "mean", "std")} for f in self.tabular_schema["fields"]]
            self._schema = TabularSchema(fields=fields, allow_missing=self.tabular_schema.get("allow_missing", True))
        return self._schema

    def _view_config(self):
        from data_utils.views import ViewConfig

        return ViewConfig(
            image_size=self.image_size, num_channels=self.num_channels, image_mean=self.image_mean,
            image_std=self.image_std,
        )

    # ----------------------------------------------------------------------------- images
    def _to_uint8_chw(self, image) -> torch.Tensor:
        from PIL import Image
        from torchvision.transforms.v2 import functional as TF

        if isinstance(image, (str, os.PathLike)):
            with Image.open(image) as handle:
                image = handle.copy()
        if isinstance(image, Image.Image):
            from data_utils.images import scaled_notice, to_8bit

            image, scaled = to_8bit(image)  # convert() would clip 16-bit pixels at 255
            if scaled:
                scaled_notice("StilProcessor")
            image = image.convert("RGB" if self.num_channels == 3 else "L")
            return TF.pil_to_tensor(image)
        if isinstance(image, np.ndarray):
            array = image
            if array.ndim == 2:
                array = array[:, :, None]
            tensor = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)
        elif isinstance(image, torch.Tensor):
            tensor = image if image.ndim == 3 else image.unsqueeze(0)
        else:
            raise TypeError(f"unsupported image type {type(image).__name__}; give PIL images, paths, arrays or tensors")
        if tensor.dtype != torch.uint8:
            raise TypeError(f"array/tensor images must be uint8 (0-255), got {tensor.dtype}")
        if tensor.shape[0] != self.num_channels:
            if tensor.shape[0] == 1 and self.num_channels == 3:
                tensor = tensor.expand(3, -1, -1)
            elif tensor.shape[0] == 3 and self.num_channels == 1:
                tensor = TF.rgb_to_grayscale(tensor)
            else:
                raise ValueError(f"image has {tensor.shape[0]} channels, the model expects {self.num_channels}")
        return tensor

    def preprocess_images(self, images) -> torch.Tensor:
        """One image or a list -> float (B, C, S, S) normalised like the evaluation view."""
        from data_utils.views import build_image_view, normalize_batch

        if self.image_size is None:
            raise ValueError("this processor has no image settings (a tabular-only model); do not pass images")
        if not isinstance(images, (list, tuple)):
            images = [images]
        cfg = self._view_config()
        view = build_image_view("eval", cfg)
        resize = self.resize_size
        batch = []
        for image in images:
            tensor = self._to_uint8_chw(image)
            if resize is not None and resize != self.image_size:  # resize then centre-crop (resize_size > image_size)
                from torchvision.transforms.v2 import functional as TF

                tensor = TF.center_crop(TF.resize(tensor, [resize, resize], antialias=True), [self.image_size] * 2)
            out, _ = view(tensor)
            batch.append(out)
        return normalize_batch(torch.stack(batch), cfg)

    # ----------------------------------------------------------------------------- tabular
    def preprocess_tabular(self, rows) -> dict[str, torch.Tensor]:
        """A raw row (dict) or a list of rows -> categorical_values / continuous_values / missing_mask."""
        if self.schema is None:
            raise ValueError("this processor has no tabular schema (an image-only model); do not pass tabular rows")
        if isinstance(rows, Mapping):
            rows = [rows]
        rows = [self._parse_numbers(row, i) for i, row in enumerate(rows)]
        arrays = self.schema.encode_raw_rows(rows)
        return {key: torch.from_numpy(value) for key, value in arrays.items()}

    def _parse_numbers(self, row: Mapping[str, Any], index: int) -> dict[str, Any]:
        """Continuous cells given as text (CSV) -> float, with an error naming the row and column."""
        row = dict(row)
        for f in self.schema.continuous_fields:
            value = row.get(f.name)
            if isinstance(value, str):
                text = value.strip()
                if text == "" or text.lower() in ("nan", "na", "none", "null"):
                    row[f.name] = None
                    continue
                try:
                    row[f.name] = float(text)
                except ValueError:
                    raise ValueError(
                        f"row {index}: continuous column {f.name!r} has the non-numeric value {value!r}"
                    ) from None
        return row

    def __call__(self, images=None, tabular=None, labels=None, return_tensors: str = "pt") -> dict[str, torch.Tensor]:
        if return_tensors not in ("pt", None):
            raise ValueError("StilProcessor returns torch tensors only (return_tensors='pt')")
        if images is None and tabular is None:
            raise ValueError("give images=..., tabular=... or both")
        out: dict[str, torch.Tensor] = {}
        if images is not None:
            out["pixel_values"] = self.preprocess_images(images)
        if tabular is not None:
            out.update(self.preprocess_tabular(tabular))
        sizes = {k: v.shape[0] for k, v in out.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"images and tabular rows disagree on the batch size: {sizes}")
        if labels is not None:
            out["labels"] = torch.as_tensor(labels)
        return out

    # ----------------------------------------------------------------------------- outputs
    def postprocess(self, logits: torch.Tensor, top_k: int = 1, id2label=None, problem_type=None) -> list:
        """Logits -> per-row predictions: [{"label", "score"}...] (top_k), or a list of values (regression)."""
        id2label = id2label or self.id2label or {}
        id2label = {int(k): v for k, v in id2label.items()}
        problem_type = problem_type or self.problem_type or "single_label_classification"
        logits = logits.detach().float().cpu()
        if problem_type == "regression":
            return [row.tolist() for row in logits]
        probs = torch.sigmoid(logits) if problem_type == "multi_label_classification" else logits.softmax(-1)
        k = max(1, min(int(top_k), probs.shape[-1]))
        values, indices = probs.topk(k, dim=-1)
        return [
            [{"label": id2label.get(int(i), str(int(i))), "id": int(i), "score": float(v)} for v, i in zip(vs, ids)]
            for vs, ids in zip(values, indices)
        ]

    def __repr__(self) -> str:
        n = len(self.tabular_schema["fields"]) if self.tabular_schema else 0
        return (
            f"StilProcessor(image_size={self.image_size}, num_channels={self.num_channels}, "
            f"mean={self.image_mean}, std={self.image_std}, tabular_fields={n})"
        )
