"""``--init_from``: initialise a model's encoders from a pretrained run or export.

A source is a folder written by ``save_pretrained`` (a ``tip_pretrain`` run, any stil export, or an
original TIP/STiL checkpoint converted with ``scripts/convert_original_checkpoint.py``). What loads:

* same model family (``model_type``): every tensor (continuation, e.g. a converted STiL checkpoint);
  a class-count or schema difference is an error, since the heads would not fit;
* another family (TIP -> STiL, TIP -> multimodal baseline, STiL -> image baseline, ...): the
  encoders the two models share (``encoder_imaging``, ``encoder_tabular``, ``encoder_multimodal``),
  tensor by tensor; the rest of the target keeps its initialisation.

Tables must have the same schema (field names, kinds, categories), or the tabular embeddings would
mean other things: a mismatch is a one-line error naming both. The returned report lists loaded and
skipped tensors; the method may then restore its own state (``SSLMethod.init_from_pretrained``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

ENCODER_MODULES = ("encoder_imaging.", "encoder_tabular.", "encoder_multimodal.")


class InitFromError(ValueError):
    """The pretrained source cannot initialise this model; the message says why and what to do."""


def _read_source(source: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    path = Path(source)
    if not path.exists():
        raise InitFromError(
            f"--init_from {source}: no such folder; give a run or export folder with config.json and "
            "model.safetensors (original .ckpt files: convert them first with scripts/convert_original_checkpoint.py)"
        )
    if path.is_file():
        raise InitFromError(
            f"--init_from {source} is a file; give the folder written by save_pretrained (for an original "
            "Lightning .ckpt, run scripts/convert_original_checkpoint.py first)"
        )
    config_file = path / "config.json"
    weights = sorted(path.glob("model*.safetensors"))
    if not config_file.is_file() or not weights:
        raise InitFromError(
            f"--init_from {source}: expected config.json and model.safetensors (a finished run's export or a "
            "converted checkpoint); found none. Did the run finish with export: true?"
        )
    config = json.loads(config_file.read_text())
    state: dict[str, torch.Tensor] = {}
    for file in weights:
        state.update(load_file(str(file)))
    return config, state


def _schema_fields(config: dict) -> list | None:
    """(name, kind, number of categories) per field; None where the config states no real schema
    (an image model, or a converted original checkpoint whose column names are unknown)."""
    schema = config.get("tabular_schema")
    if not isinstance(schema, dict) or schema.get("placeholder") or schema.get("fields") is None:
        return None
    return [(f.get("name"), f.get("kind"), len(f.get("categories") or [])) for f in schema["fields"]]


def _class_names(config: dict) -> list[str] | None:
    """Class names in id order; None where they are the generic LABEL_i (nothing to compare)."""
    id2label = config.get("id2label") or {}
    names = [str(id2label.get(i, id2label.get(str(i)))) for i in range(len(id2label))]
    return None if not names or all(n.startswith("LABEL_") for n in names) else names


def _field_names(config: dict) -> list[str]:
    schema = config.get("tabular_schema") or {}
    return [f.get("name", "?") if isinstance(f, dict) else str(f) for f in schema.get("fields", [])]


def init_from_pretrained(model: nn.Module, source: str | Path) -> dict[str, list[str]]:
    """Load the matching tensors of ``source`` into ``model`` (see the module docstring)."""
    config, state = _read_source(source)
    own_config = model.config.to_dict()
    same_family = config.get("model_type") == own_config.get("model_type")

    theirs, ours = _schema_fields(config), _schema_fields(own_config)
    if theirs is not None and ours is not None and theirs != ours:
        raise InitFromError(
            f"--init_from {source} was trained on another table schema ({len(theirs)} fields: "
            f"{_field_names(config)[:6]}...) than this data ({len(ours)} fields: {_field_names(own_config)[:6]}...); "
            "pretrain on this dataset (method tip_pretrain) or use a matching dataset"
        )
    if theirs is not None and ours is not None:
        from .configuration_common import vocabulary_differences

        renamed = vocabulary_differences(config.get("tabular_schema"), own_config.get("tabular_schema"),
                                         model=f"--init_from {source}", data="this data")
        if renamed:
            raise InitFromError(renamed[0])
    theirs_classes, ours_classes = len(config.get("id2label") or {}), len(own_config.get("id2label") or {})
    if same_family and theirs_classes != ours_classes:
        raise InitFromError(
            f"--init_from {source} has {theirs_classes} classes but this model has {ours_classes}; "
            "initialise from a model of the same class count, or from a pretraining (tip_pretrain) run"
        )
    theirs_names, ours_names = _class_names(config), _class_names(own_config)
    if same_family and theirs_names and ours_names and theirs_names != ours_names:
        raise InitFromError(
            f"--init_from {source} has the classes {theirs_names[:10]} but this data has {ours_names[:10]}: its head "
            "would predict the wrong class names; initialise from a model with the same classes in the same order, "
            "or from a pretraining (tip_pretrain) run"
        )

    own = model.state_dict()
    loaded, skipped, wrong = [], [], []
    for key, value in state.items():
        if "projection_head" in key or "prototypes" in key:
            skipped.append(key)
            continue
        wanted = same_family or key.startswith(ENCODER_MODULES)
        if not wanted or key not in own:
            skipped.append(key)
            continue
        if tuple(own[key].shape) != tuple(value.shape):
            wrong.append(f"{key}: pretrained {tuple(value.shape)} vs model {tuple(own[key].shape)}")
            continue
        loaded.append(key)
    if wrong:
        raise InitFromError(
            f"--init_from {source}: {len(wrong)} tensors do not fit this model (another schema, image size or "
            f"width?), e.g. {wrong[0]}; build the model with the pretrained run's settings (--model_overrides)"
        )
    if not loaded:
        raise InitFromError(
            f"--init_from {source} ({config.get('model_type')}) shares no encoder with this model "
            f"({own_config.get('model_type')}); initialise from a run whose model has encoder_imaging/encoder_tabular"
        )
    with torch.no_grad():
        for key in loaded:
            own[key].copy_(state[key].to(dtype=own[key].dtype))
    not_initialised = sorted(k for k in own if k not in set(loaded))
    return {"loaded": sorted(loaded), "skipped": sorted(skipped), "not_initialised": not_initialised}
