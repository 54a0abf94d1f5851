"""`StilProcessor`: raw inputs (PIL images, raw tabular rows) -> the model input contract, for every stil model.

A transformers ``ProcessorMixin`` without sub-processors (no tokenizer or image processor could carry
a tabular schema). ``save_pretrained`` writes ``processor_config.json`` with ``auto_map`` pointing
``AutoProcessor`` at this file and copies the file next to it, as ``save_pretrained`` of a model copies
its modeling code; so where only torch, transformers and timm are installed::

    processor = AutoProcessor.from_pretrained(export_dir_or_hub_id, trust_remote_code=True)
    model = AutoModel.from_pretrained(export_dir_or_hub_id, trust_remote_code=True)

This file therefore imports only numpy, torch, torchvision and PIL (which timm installs) and
transformers. The three rules it shares with training are written here once more for that reason,
and tests/test_processor_presets.py checks they give the tensors data_utils gives:

* images (PIL, file paths, HWC uint8 numpy arrays or CHW uint8 tensors; one or a list): 16-bit
  grayscale scaled to 8 bits (`to_8bit`, the rule of ``data_utils/images.py``), converted to RGB or L,
  resized to ``image_size`` with antialiasing (the ``eval`` view of ``data_utils/views.py``; with
  ``resize_size``, resized to it and centre-cropped first) and normalised ``(x / 255 - mean) / std``
  (its ``normalize_batch``), so inference sees exactly what evaluation saw;
* tabular rows (a dict or a list of dicts with RAW values: category strings, raw numbers or numeric
  text; a missing cell is ``None``, ``""``, NaN or an absent key): `TabularEncoder`, the rule of
  ``TabularSchema.encode_raw_rows`` (codes into the vocabulary, z-scoring with the train statistics,
  a missing mask; an unknown category raises `SchemaError` naming the column and the known categories).

The settings (the schema dict, image size, channels, mean, std, resize size, image column, labels,
problem type) come from the model config (`from_model_config`); ``from_pretrained`` on a model folder
without ``processor_config.json`` reads them from its ``config.json``.
``postprocess(logits, top_k)`` turns model outputs into readable predictions.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from transformers import ProcessorMixin

PROCESSOR_FILENAME = "processor_config.json"  # transformers' PROCESSOR_NAME
CATEGORICAL, CONTINUOUS = "categorical", "continuous"
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


class SchemaError(ValueError):
    """A raw row does not fit the model's tabular schema; the message names the row, the column and the fix."""


class ImageDepthError(ValueError):
    """An image whose pixel values cannot be scaled to 8 bits by a known range."""


# ================================================================================= tabular
@dataclass
class TabularField:
    name: str
    kind: str  # "categorical" | "continuous"
    categories: list[str] | None = None  # vocabulary: code i means categories[i]
    mean: float = 0.0  # train-split statistics of a continuous field
    std: float = 1.0


class TabularEncoder:
    """A model config's ``tabular_schema`` dict -> raw rows to ``categorical_values`` (N, n_cat) int64,
    ``continuous_values`` (N, n_con) float32 z-scored, ``missing_mask`` (N, F) bool, in model field
    order (categorical fields first). Missing cells become 0 with the mask set."""

    def __init__(self, schema: Mapping[str, Any]):
        fields = []
        for f in schema["fields"]:
            if f["kind"] == CONTINUOUS:
                std = 1.0 if f.get("std") is None else float(f["std"])
                mean = 0.0 if f.get("mean") is None else float(f["mean"])
                fields.append(TabularField(f["name"], CONTINUOUS, None, mean, std if math.isfinite(std) and std > 0 else 1.0))
            else:
                fields.append(TabularField(f["name"], CATEGORICAL, list(f["categories"])))
        self.categorical_fields = [f for f in fields if f.kind == CATEGORICAL]
        self.continuous_fields = [f for f in fields if f.kind == CONTINUOUS]
        self.fields = self.categorical_fields + self.continuous_fields
        self.names = [f.name for f in self.fields]
        self.allow_missing = bool(schema.get("allow_missing", True))

    def encode(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
        n, n_cat = len(rows), len(self.categorical_fields)
        categorical = np.zeros((n, n_cat), dtype=np.int64)
        continuous = np.zeros((n, len(self.continuous_fields)), dtype=np.float32)
        missing = np.zeros((n, len(self.fields)), dtype=bool)
        codes = {f.name: [self._code(row.get(f.name), f, i) for i, row in enumerate(rows)] for f in self.categorical_fields}
        for j, f in enumerate(self.categorical_fields):
            mask = np.asarray([c is None for c in codes[f.name]], dtype=bool)
            self._check_missing(mask, f, "missing value")
            categorical[:, j] = [0 if c is None else c for c in codes[f.name]]
            missing[:, j] = mask
        for j, f in enumerate(self.continuous_fields):
            values = np.asarray([np.nan if _is_missing(row.get(f.name)) else row.get(f.name) for row in rows], dtype=np.float64)
            if np.isinf(values).any():
                raise SchemaError(f"column {f.name!r} row {int(np.flatnonzero(np.isinf(values))[0])}: infinite value; fix or drop the row")
            mask = np.isnan(values)
            self._check_missing(mask, f, "missing/NaN value")
            continuous[:, j] = np.where(mask, 0.0, (values - f.mean) / f.std)
            missing[:, n_cat + j] = mask
        return {"categorical_values": categorical, "continuous_values": continuous, "missing_mask": missing}

    @staticmethod
    def _code(value: Any, f: TabularField, row: int) -> int | None:
        if _is_missing(value):
            return None
        label = str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)
        if label not in f.categories:
            raise SchemaError(
                f"row {row}: unknown category {value!r} for column {f.name!r}; "
                f"known categories: {f.categories[:20]}{' ...' if len(f.categories) > 20 else ''}"
            )
        return f.categories.index(label)

    def _check_missing(self, mask: np.ndarray, f: TabularField, what: str) -> None:
        if mask.any() and not self.allow_missing:
            raise SchemaError(
                f"column {f.name!r} row {int(np.flatnonzero(mask)[0])}: {what} but the schema has allow_missing=False; "
                "impute it or rebuild the dataset with missing values allowed"
            )


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or (isinstance(value, str) and value == "")


# ================================================================================= images
def to_8bit(image):
    """``(image, scaled)``: a 16-bit / 32-bit integer grayscale PIL image as an 8-bit ``L`` image scaled by
    1/257 (the type's range, not the image's), any other image unchanged. Float images and integer images
    outside 0..65535 have no range to scale by: `ImageDepthError`."""
    from PIL import Image

    if image.mode not in SIXTEEN_BIT_MODES and image.mode not in ("I", "F"):
        return image, False
    if image.mode == "F":
        raise ImageDepthError("32-bit float pixels have no fixed range to scale to 8 bits; save the image as "
                              "8-bit or 16-bit (values 0..65535) first")
    values = np.asarray(image).astype(np.int64)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise ImageDepthError(f"32-bit integer pixels in {int(values.min())}..{int(values.max())}, outside the 16-bit "
                              "range 0..65535; rescale the image to 8 or 16 bits first")
    return Image.fromarray(np.rint(values / 257.0).astype(np.uint8), mode="L"), True


# ================================================================================= processor
class StilProcessor(ProcessorMixin):
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
        super().__init__()
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

    # ----------------------------------------------------------------------------- construction
    @classmethod
    def from_model_config(cls, config, image_column: str | None = "image") -> "StilProcessor":
        """From a model config, or its ``config.json`` as a dict."""
        get = config.get if isinstance(config, Mapping) else (lambda k, d=None: getattr(config, k, d))
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

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **unused) -> Path:
        """Write ``processor_config.json`` (with ``auto_map`` for AutoProcessor) and a copy of this file.
        Other transformers save arguments change nothing here."""
        from transformers.dynamic_module_utils import custom_object_save

        if push_to_hub:
            raise ValueError("StilProcessor.save_pretrained saves locally; upload with processor.push_to_hub(repo_id) "
                             "or scripts/push_to_hub.py")
        path = Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        data = self.to_dict()
        if self._auto_class is not None:
            custom_object_save(self, path, config=data)  # copies this file, adds data["auto_map"]
        target = path / PROCESSOR_FILENAME
        tmp = target.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, target)
        return target

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, revision: str | None = None,
                        **hub_kwargs) -> "StilProcessor":
        """A folder or Hub id holding ``processor_config.json``; a model folder without it: its ``config.json``.
        ``AutoProcessor`` passes its Hub arguments (``cache_dir``, ``token``, ...) on to here."""
        path = Path(pretrained_model_name_or_path)
        if path.is_dir():
            file = path / PROCESSOR_FILENAME
            if not file.is_file():
                if (path / "config.json").is_file():  # a model saved without processor: derive it from the config
                    return cls.from_model_config(json.loads((path / "config.json").read_text()))
                raise FileNotFoundError(f"no {PROCESSOR_FILENAME} (nor config.json) in {path}")
        else:
            from huggingface_hub import hf_hub_download

            download = {k: hub_kwargs[k] for k in ("cache_dir", "token", "local_files_only", "force_download", "subfolder") if hub_kwargs.get(k)}
            try:
                file = Path(hf_hub_download(str(pretrained_model_name_or_path), PROCESSOR_FILENAME, revision=revision, **download))
            except Exception as error:  # offline / not found
                raise FileNotFoundError(
                    f"{pretrained_model_name_or_path!r} is neither a local folder nor a reachable Hub repository with "
                    f"{PROCESSOR_FILENAME} ({type(error).__name__}: {error})"
                ) from error
        data = json.loads(file.read_text())
        for key in ("processor_class", "auto_map"):
            data.pop(key, None)
        return cls(**data)

    # ----------------------------------------------------------------------------- properties
    @property
    def schema(self) -> TabularEncoder | None:
        if self.tabular_schema is None:
            return None
        if self._schema is None:
            self._schema = TabularEncoder(self.tabular_schema)
        return self._schema

    # ----------------------------------------------------------------------------- images
    def _to_uint8_chw(self, image) -> torch.Tensor:
        from PIL import Image
        from torchvision.transforms.v2 import functional as TF

        if isinstance(image, (str, os.PathLike)):
            with Image.open(image) as handle:
                image = handle.copy()
        if isinstance(image, Image.Image):
            image, scaled = to_8bit(image)  # convert() would clip 16-bit pixels at 255
            if scaled:
                warnings.warn("StilProcessor: 16-bit images are scaled to 8 bits (value / 257, the full 16-bit range; "
                              "see docs/data.md)", stacklevel=3)
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
        from torchvision.transforms.v2 import functional as TF

        if self.image_size is None:
            raise ValueError("this processor has no image settings (a tabular-only model); do not pass images")
        size = self.image_size
        if self.num_channels not in (1, 3) or size < 8 or any(s <= 0 for s in self.image_std):
            raise ValueError(f"unusable image settings: num_channels {self.num_channels} (1 or 3), image_size {size} "
                             f"(at least 8), image_std {self.image_std} (positive)")
        if not isinstance(images, (list, tuple)):
            images = [images]
        batch = []
        for image in images:
            tensor = self._to_uint8_chw(image)
            if self.resize_size is not None and self.resize_size != size:  # resize then centre-crop (resize_size > image_size)
                tensor = TF.center_crop(TF.resize(tensor, [self.resize_size] * 2, antialias=True), [size] * 2)
            if tuple(tensor.shape[-2:]) != (size, size):
                tensor = TF.resize(tensor, [size, size], antialias=True)
            batch.append(tensor)
        mean = torch.tensor(self.image_mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(self.image_std, dtype=torch.float32).view(1, -1, 1, 1)
        return torch.addcmul(-mean / std, torch.stack(batch).to(torch.float32), 1.0 / (255.0 * std))

    # ----------------------------------------------------------------------------- tabular
    def preprocess_tabular(self, rows) -> dict[str, torch.Tensor]:
        """A raw row (dict) or a list of rows -> categorical_values / continuous_values / missing_mask."""
        if self.schema is None:
            raise ValueError("this processor has no tabular schema (an image-only model); do not pass tabular rows")
        if isinstance(rows, Mapping):
            rows = [rows]
        rows = [self._parse_numbers(row, i) for i, row in enumerate(rows)]
        return {key: torch.from_numpy(value) for key, value in self.schema.encode(rows).items()}

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


StilProcessor.register_for_auto_class()  # save_pretrained ships this file with an AutoProcessor auto_map
