"""Named model presets and `create_model`.

``create_model(name_or_path, *, schema=None, metadata=None, **overrides)``:

* a preset name (``list_presets()``) builds a fresh model; ``schema`` (TabularSchema or dict) and
  ``metadata`` (DatasetMetadata or dict) fill ``tabular_schema``, ``num_labels``/``id2label``/
  ``label2id``, ``problem_type`` and ``num_channels``; ``overrides`` set any config field last
  (e.g. ``image_size=64``). ``image_pretrained="path/or/timm-hub-name"`` loads backbone weights into
  the model's ``encoder_imaging`` after construction (so ``post_init`` cannot overwrite them);
* a local folder or a Hub id loads with ``AutoModel.from_pretrained`` (``overrides`` are passed to it,
  e.g. ``dtype=torch.float32``) and, when schema/metadata are given, checks
  ``model.check_data_compatibility(schema, metadata)``;
* an unknown name raises listing the available presets and the close matches.

The model follows the data: ``default_preset_for(schema, metadata, required_modalities=..., task=...)``
names the preset to use when none is given (image+tabular -> ``multimodal-concat-tiny``, image-only ->
``image-tiny``, tabular-only -> ``tabular-tiny``, landmarks -> ``tcdcnn``), and
``check_preset_fits(name, schema, metadata, required_modalities)`` raises a one-line ValueError that
names the presets which DO fit (``use --model image-tiny or --model ...``).

Presets reproducing the papers (``stil-dvm``, ``tip-dvm``, ``multimodal-concat``, ``mmatch``,
``image-resnet50``...) use the originals' pixel scaling (images in [0, 1], mean 0 / std 1) and 128 px;
``wrn-28-2`` uses CIFAR-10 statistics at 32 px; ``tcdcnn`` 60 px grayscale in [0, 1]. ``*-tiny``
presets are for tests (forward + backward of a few 32 px samples in milliseconds on CPU).
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .configuration_common import config_overrides_from_data

ZERO_ONE = dict(image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 1.0, 1.0])
# A tiny tabular layout for schema-less tiny presets (2 categorical fields of 3 and 4 values, 3 continuous).
TINY_FIELD_LENGTHS = [3, 4, 1, 1, 1]
TINY_TABULAR = dict(tabular_embedding_dim=32, tabular_num_layers=1, tabular_num_heads=4, projection_hidden_dim=32, projection_dim=16)


@dataclass(frozen=True)
class Preset:
    name: str
    family: str  # stil | tip | image | tabular | multimodal | wrn | tcdcnn
    config_module: str
    config_class: str
    model_module: str
    model_class: str
    defaults: Mapping[str, Any]
    description: str
    classmethod_name: str | None = None  # e.g. StilConfig.dvm(**kw)

    @property
    def uses_tabular(self) -> bool:
        return self.family in ("stil", "tip", "tabular", "multimodal")

    @property
    def uses_images(self) -> bool:
        return self.family != "tabular"

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(m for m, used in (("image", self.uses_images), ("tabular", self.uses_tabular)) if used)

    @property
    def tasks(self) -> tuple[str, ...]:
        """Dataset tasks (DatasetMetadata.task) the family's network is built for."""
        return FAMILY_TASKS.get(self.family, ("classification", "regression", "landmarks"))


def _baseline(name, family, config_class, model_class, defaults, description, module="baselines"):
    return Preset(name, family, f"configuration_{module}", config_class, f"modeling_{module}", model_class, defaults, description)


# families restricted to some tasks (the others handle classification, regression and landmarks)
FAMILY_TASKS = {
    "stil": ("classification",),
    "tip": ("classification",),
    "wrn": ("classification",),
    "tcdcnn": ("landmarks", "regression"),
}

_IMG = ("ImageClassifierConfig", "ImageClassifier")
_TAB = ("TabularClassifierConfig", "TabularClassifier")
_MM = ("MultimodalClassifierConfig", "MultimodalClassifier")
_TINY_IMG = dict(backbone="test_resnet", image_size=32)
_TINY_HEAD = dict(projection_hidden_dim=32, projection_dim=16)

_PRESET_LIST = [
    Preset("stil-dvm", "stil", "configuration_stil", "StilConfig", "modeling_stil", "StilModel", {}, "STiL, paper DVM setting (ResNet-50, d=512, 286 classes, 128 px)", "dvm"),
    Preset("stil-cardiac", "stil", "configuration_stil", "StilConfig", "modeling_stil", "StilModel", {}, "STiL, UK Biobank cardiac setting (needs schema or field_lengths)", "cardiac"),
    Preset("stil-tiny", "stil", "configuration_stil", "StilConfig", "modeling_stil", "StilModel", {}, "STiL, tiny (tests)", "tiny"),
    Preset("tip-dvm", "tip", "configuration_tip", "TipConfig", "modeling_tip", "TipModel", {}, "TIP fine-tuning network, DVM setting", "dvm"),
    Preset("tip-tiny", "tip", "configuration_tip", "TipConfig", "modeling_tip", "TipModel", {}, "TIP fine-tuning network, tiny (tests)", "tiny"),
    _baseline("image-resnet50", "image", *_IMG, dict(backbone="resnet50", image_size=128, projection_hidden_dim=2048, **ZERO_ONE), "image-only ResNet-50 + linear head + SimMatch projection head (Match family image wrapper)"),
    _baseline("image-resnet18", "image", *_IMG, dict(backbone="resnet18", image_size=128, projection_hidden_dim=512, **ZERO_ONE), "image-only ResNet-18 classifier"),
    _baseline("image-tiny", "image", *_IMG, dict(**_TINY_IMG, **_TINY_HEAD), "image-only, timm test_resnet (tests)"),
    _baseline("tabular-transformer", "tabular", *_TAB, dict(), "tabular-only TIP transformer (d=512, 4 layers) + linear head"),
    _baseline("tabular-tiny", "tabular", *_TAB, dict(TINY_TABULAR), "tabular-only transformer, d=32, 1 layer (tests)"),
    _baseline("multimodal-concat", "multimodal", *_MM, dict(backbone="resnet50", image_size=128, fusion="concat", **ZERO_ONE), "Match-family concat backbone (Multimodal SimMatch/CoMatch/FreeMatch)"),
    _baseline("multimodal-concat-tiny", "multimodal", *_MM, dict(fusion="concat", **_TINY_IMG, **TINY_TABULAR), "concat multimodal, tiny (tests)"),
    _baseline("multimodal-tip", "multimodal", *_MM, dict(backbone="resnet50", image_size=128, fusion="tip", **ZERO_ONE), "TIP-style cross-attention fusion classifier (4+4 layers, d=512)"),
    _baseline("multimodal-tip-tiny", "multimodal", *_MM, dict(fusion="tip", multimodal_embedding_dim=32, fusion_num_layers=1, fusion_num_heads=4, **_TINY_IMG, **TINY_TABULAR), "TIP-style fusion, tiny (tests)"),
    _baseline("mmatch", "multimodal", *_MM, dict(backbone="resnet50", image_size=128, fusion="concat", unimodal_heads=True, **ZERO_ONE), "MMatch / co-training shared network: z_m, z_i, z_t heads, 128-d fused feature"),
    _baseline("mmatch-tiny", "multimodal", *_MM, dict(fusion="concat", unimodal_heads=True, fused_dim=16, **_TINY_IMG, **TINY_TABULAR), "MMatch / co-training network, tiny (tests)"),
    _baseline("wrn-28-2", "wrn", "WideResNetConfig", "WideResNetForImageClassification", dict(), "WRN-28-2 for CIFAR-10 (L2I/MixMatch), 1.47 M parameters", module="wide_resnet"),
    _baseline("wrn-tiny", "wrn", "WideResNetConfig", "WideResNetForImageClassification", dict(depth=10, widen_factor=2, base_channels=8, batch_norm_momentum=0.1),
              "WRN-10-2 with 8 base channels (tests, CPU runs; BN momentum 0.1: the 0.001 of wrn-28-2 is for 2^20 steps)", module="wide_resnet"),
    _baseline("tcdcnn", "tcdcnn", "TCDCNNConfig", "TCDCNNForLandmarkRegression", dict(), "TCDCNN, 60 px grayscale, 10 landmark coordinates (L2I AFLW)", module="tcdcnn"),
]
PRESETS: dict[str, Preset] = {p.name: p for p in _PRESET_LIST}
ALIASES = {"multimodal-heads": "mmatch", "cotrain": "mmatch", "co-training": "mmatch", "wrn": "wrn-28-2", "wideresnet": "wrn-28-2"}


def list_presets() -> dict[str, str]:
    """Preset name -> description (aliases not included)."""
    return {name: p.description for name, p in PRESETS.items()}


def _import(module: str, name: str):
    try:
        return getattr(importlib.import_module(f"{__package__}.{module}"), name)
    except (ImportError, AttributeError) as error:
        raise ImportError(
            f"{__package__}.{module}.{name} is not available ({error}); this preset's model family is not "
            "installed in this version of stil"
        ) from error


def _fit_channels(values: dict[str, Any]) -> None:
    """num_channels overridden (e.g. grayscale data) -> per-channel mean/std of the right length."""
    channels = values.get("num_channels")
    if channels is None:
        return
    for key in ("image_mean", "image_std"):
        stats = values.get(key)
        if stats is not None and len(stats) != channels:
            average = sum(stats) / len(stats)
            values[key] = [average] * int(channels)


def preset_config(name: str, *, schema=None, metadata=None, num_channels: int | None = None, **overrides):
    """The config a preset would build (no weights are created)."""
    preset = _resolve(name)
    config_cls = _import(preset.config_module, preset.config_class)
    values: dict[str, Any] = dict(preset.defaults)
    data = config_overrides_from_data(schema if preset.uses_tabular else None, metadata, num_channels)
    if not preset.uses_images:
        data.pop("num_channels", None)
    if preset.family in ("stil", "tip") and "tabular_schema" in data:
        data["field_lengths"] = None  # the schema is the single source of truth
    if preset.family in ("image", "tabular", "multimodal") and preset.name.endswith("-tiny") and preset.uses_tabular:
        if "tabular_schema" not in data and "tabular_schema" not in overrides:
            from .configuration_common import placeholder_schema  # noqa: PLC0415

            values["tabular_schema"] = placeholder_schema(TINY_FIELD_LENGTHS[:2], 3)
    if preset.family in ("image", "tabular", "multimodal") and preset.name.endswith("-tiny") and "num_labels" not in data:
        values.setdefault("num_labels", 3)
    values.update(data)
    values.update(overrides)
    _fit_channels(values)
    if preset.classmethod_name and hasattr(config_cls, preset.classmethod_name):
        return getattr(config_cls, preset.classmethod_name)(**values)
    return config_cls(**values)


def _resolve(name: str) -> Preset:
    key = ALIASES.get(name, name)
    if key in PRESETS:
        return PRESETS[key]
    known = sorted(PRESETS) + sorted(ALIASES)
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
    raise ValueError(
        f"unknown model {name!r}: not a preset, a local folder or a reachable Hub model. "
        f"Close matches: {close or 'none'}. Available presets: {', '.join(sorted(PRESETS))} "
        f"(aliases: {', '.join(sorted(ALIASES))})"
    )


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/"))


def create_model(name_or_path, *, schema=None, metadata=None, **overrides):
    """A preset name, a saved folder or a Hub id -> a PreTrainedModel (see the module docstring)."""
    import modeling_stil  # noqa: F401  (registers our Auto classes)

    image_pretrained = overrides.pop("image_pretrained", None)
    num_channels = overrides.pop("data_num_channels", None)
    name = str(name_or_path)
    path = Path(name)
    if path.is_dir() or (name not in PRESETS and name not in ALIASES and _looks_like_hub_id(name) and not path.exists()):
        from transformers import AutoModel

        if path.is_dir() and not (path / "config.json").is_file():
            raise ValueError(f"{path} is a folder but has no config.json (not a saved model)")
        try:
            model = AutoModel.from_pretrained(str(name), **overrides)
        except OSError as error:
            raise ValueError(
                f"could not load {name!r} as a local folder or a Hub model ({error}); "
                f"presets are: {', '.join(sorted(PRESETS))}"
            ) from error
        if schema is not None or metadata is not None:
            model.check_data_compatibility(schema, metadata)
    else:
        preset = _resolve(name)
        config = preset_config(name, schema=schema, metadata=metadata, num_channels=num_channels, **overrides)
        model_cls = _import(preset.model_module, preset.model_class)
        model = model_cls(config)
    if image_pretrained:
        encoder = getattr(model, "encoder_imaging", None)
        if encoder is None or not hasattr(encoder, "load_pretrained_weights"):
            raise ValueError(f"{type(model).__name__} has no timm image encoder to load {image_pretrained!r} into")
        encoder.load_pretrained_weights(image_pretrained)
        if hasattr(model.config, "image_pretrained"):
            model.config.image_pretrained = str(image_pretrained)
    return model


def load_saved_model(name_or_path, **kwargs):
    """``AutoModel.from_pretrained`` for the scripts (evaluate, predict): a missing folder, a folder that
    is not a saved model, or an unreachable Hub id is a one-line ValueError saying which, not the Hub
    client's repo-id rules."""
    import modeling_stil  # noqa: F401  (registers our Auto classes)
    from transformers import AutoModel

    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.is_file():
        raise ValueError(f"{name} is a file; give the folder written by save_pretrained (config.json, model.safetensors)")
    if path.is_dir() and not (path / "config.json").is_file():
        raise ValueError(f"{name} is a folder but not a saved model (no config.json); give a finished run's folder "
                         "(export: true writes config.json and model.safetensors there) or a Hub model id")
    if not path.exists() and not _looks_like_hub_id(name):
        raise ValueError(f"no such folder {name} (and not a Hub model id 'owner/name'); check the path")
    try:
        return AutoModel.from_pretrained(str(path) if path.is_dir() else name, **kwargs)
    except OSError as error:
        if path.is_dir():
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ValueError(f"cannot load the saved model in {name}: {first}") from None
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            reason = "the Hub is offline (HF_HUB_OFFLINE=1) and the model is not in the Hub cache"
        else:
            reason = "the Hub could not be reached or has no such model"
        raise ValueError(f"no such folder {name}, and {reason}; give an exported run folder or a reachable Hub id") from None


# --------------------------------------------------------------------------------- model follows data
# The preset `default_preset_for` picks per kind of data, in order of preference; tiny presets first, as
# for the CLI default (multimodal-concat-tiny). Any other preset that fits comes after these.
_DEFAULTS = {
    ("image", "tabular"): ("multimodal-concat-tiny", "mmatch-tiny", "multimodal-tip-tiny", "stil-tiny"),
    ("image",): ("image-tiny", "wrn-tiny"),
    ("tabular",): ("tabular-tiny",),
}
_LANDMARK_DEFAULTS = ("tcdcnn", "image-tiny")
MODALITIES = ("image", "tabular")


def _as_dict(metadata) -> dict[str, Any]:
    if metadata is None:
        return {}
    return dict(metadata) if isinstance(metadata, Mapping) else metadata.to_dict()


def data_modalities(schema, metadata) -> tuple[str, ...]:
    """The modalities a dataset holds: ``image`` (an image column) and/or ``tabular`` (a schema)."""
    meta = _as_dict(metadata)
    has_images = meta.get("image_column", "image") is not None if meta else False
    return tuple(m for m, held in (("image", has_images), ("tabular", schema is not None)) if held)


def _describe(modalities: tuple[str, ...], task: str) -> str:
    kind = {("image", "tabular"): "image+tabular", ("image",): "image-only", ("tabular",): "tabular-only"}
    return f"{kind.get(tuple(modalities), 'no image and no tabular')} {task} data"


def _check_modalities(required_modalities) -> tuple[str, ...]:
    required = tuple(required_modalities or ())
    unknown = [m for m in required if m not in MODALITIES]
    if unknown:
        raise ValueError(f"unknown modalities {unknown}: required_modalities may name {MODALITIES}")
    return required


def preset_misfit(name: str, schema=None, metadata=None, required_modalities=(), task: str | None = None) -> list[str]:
    """Why preset ``name`` does not fit the data (empty: it fits). Builds only the config."""
    from .configuration_common import data_differences  # noqa: PLC0415

    preset = _resolve(name)
    meta = _as_dict(metadata)
    task = task or meta.get("task", "classification")
    reasons = []
    missing = [m for m in _check_modalities(required_modalities) if m not in preset.modalities]
    if missing:
        reasons.append(f"the method needs {' and '.join(missing)} input, which {preset.name} does not read")
    if task not in preset.tasks:
        reasons.append(f"{preset.name} is built for {'/'.join(preset.tasks)}, not {task}")
    held = data_modalities(schema, meta)
    if preset.uses_tabular and "tabular" not in held:
        reasons.append(f"{preset.name} reads tabular fields but the data has no tabular schema")
    if preset.uses_images and meta and "image" not in held:
        reasons.append(f"{preset.name} needs images but the data has no image column")
    if reasons:
        return reasons
    if meta and meta.get("task", task) != task:
        meta = dict(meta, task=task)
    try:
        config = preset_config(name, schema=schema, metadata=meta or None)
    except (ValueError, TypeError, KeyError) as error:
        return [f"{preset.name} cannot be built for this data ({error})"]
    return data_differences(config, schema, meta or None)


def fitting_presets(schema=None, metadata=None, *, required_modalities=(), task: str | None = None) -> list[str]:
    """Every preset that fits the data, the preferred (`default_preset_for`) first."""
    meta = _as_dict(metadata)
    task = task or meta.get("task", "classification")
    held = data_modalities(schema, meta)
    preferred = list(_LANDMARK_DEFAULTS if task in ("landmarks", "regression") and held == ("image",) else ())
    preferred += list(_DEFAULTS.get(held, ()))
    # presets that read every modality the data holds come before those that ignore one
    rest = sorted(PRESETS, key=lambda n: (set(PRESETS[n].modalities) != set(held), not n.endswith("-tiny")))
    order = list(dict.fromkeys(preferred + rest))
    return [n for n in order if not preset_misfit(n, schema, meta, required_modalities, task)]


def default_preset_for(schema=None, metadata=None, *, required_modalities=(), task: str | None = None) -> str:
    """The preset to use for this data when none is named.

    ``schema``: TabularSchema/dict or None (no tabular data); ``metadata``: DatasetMetadata/dict (task,
    image column, labels); ``required_modalities``: what the method needs, e.g. ``("image", "tabular")``;
    ``task``: overrides ``metadata.task``. image+tabular -> ``multimodal-concat-tiny``, image-only ->
    ``image-tiny``, tabular-only -> ``tabular-tiny``, landmarks (grayscale) -> ``tcdcnn``. Raises
    ValueError when no preset fits (e.g. the method needs tabular input and the data has none)."""
    meta = _as_dict(metadata)
    task = task or meta.get("task", "classification")
    required = _check_modalities(required_modalities)
    held = data_modalities(schema, meta)
    lacking = [m for m in required if m not in held]
    if lacking:
        raise ValueError(
            f"the method needs {' and '.join(required)} input but the dataset is {_describe(held, task)} "
            f"(no {' and no '.join(lacking)}); use a dataset with {' and '.join(lacking)} or a method that does not need it"
        )
    found = fitting_presets(schema, meta, required_modalities=required, task=task)
    if not found:
        raise ValueError(f"no preset fits {_describe(held, task)}; presets: {', '.join(sorted(PRESETS))}")
    return found[0]


def check_preset_fits(name: str, schema=None, metadata=None, required_modalities=()) -> None:
    """Raise a one-line ValueError when preset ``name`` does not fit the data (or the method's
    ``required_modalities``), naming the presets that do as CLI flags. A name that is not a preset (a
    saved folder, a Hub id) is left to ``model.check_data_compatibility``."""
    if str(name) not in PRESETS and str(name) not in ALIASES:
        return
    reasons = preset_misfit(str(name), schema, metadata, required_modalities)
    if not reasons:
        return
    meta = _as_dict(metadata)
    task = meta.get("task", "classification")
    held = data_modalities(schema, meta)
    lacking = [m for m in required_modalities if m not in held]
    if lacking:
        advice = f"and this dataset has no {' and no '.join(lacking)} input: use a dataset with it or another method"
    else:
        fits = fitting_presets(schema, meta, required_modalities=required_modalities)
        advice = "use " + " or ".join(f"--model {n}" for n in fits[:4]) if fits else f"no preset fits {_describe(held, task)}"
    reason = "; ".join(r.replace("\n", " ") for r in reasons)
    raise ValueError(f"model {name!r} does not fit this {_describe(held, task)}: {reason}; {advice}")


__all__ = [
    "PRESETS", "ALIASES", "Preset", "create_model", "list_presets", "preset_config", "default_preset_for",
    "check_preset_fits", "fitting_presets", "preset_misfit", "data_modalities", "load_saved_model",
]
