"""Convert original STiL / TIP Lightning checkpoints (siyi-wind/STiL, siyi-wind/TIP) into our models.

Reading the file. The originals' ``hyper_parameters`` is a pickled omegaconf ``DictConfig``, so
``torch.load(weights_only=True)`` refuses the file, and ``weights_only=False`` would need omegaconf
installed and would execute whatever the pickle names. We therefore:

1. try ``torch.load(weights_only=True)`` (works for re-saved or stripped checkpoints);
2. otherwise read it with a *restricted unpickler*: only tensor-rebuilding functions, storages,
   dtypes and plain containers are resolved; every other global (omegaconf, Lightning, numpy...)
   becomes an inert ``OpaqueObject`` that records its arguments and state but runs no code. The
   ``state_dict`` tensors come out exactly; ``hyper_parameters`` stays opaque (never needed: the
   architecture is read from the tensor shapes plus the field-lengths file);
3. ``trust_checkpoint=True`` (CLI ``--trust-checkpoint``) uses plain ``weights_only=False``, for
   files you trust and an environment with omegaconf, if you want the real hyper_parameters.

Mapping (STiL, siyi-wind/STiL models/Disentangle/STiLModel.py): ``model.*`` (student) or ``ema.*``
(teacher) -> ``StilModel`` 1:1 (406 tensors for ResNet-50); ``prototypes*``, ``DA_*``,
``projector_*``, ``CLUB_*`` and the other backbone copy go verbatim to
``stil_method_state.safetensors`` (for resuming the method). Every key must be claimed; leftover or
missing keys, or a tensor whose shape does not fit the model built from the field lengths, stop the
conversion with the list. TIP: all seven modules -> ``TipModel`` 1:1.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path
from typing import Optional, Sequence

import torch

from .configuration_stil import DVM_FIELD_LENGTHS, StilConfig, layout_from_field_lengths, read_field_lengths
from .configuration_tip import TipConfig

METHOD_STATE_FILENAME = "stil_method_state.safetensors"
CONVERSION_REPORT = "conversion.json"

STIL_METHOD_PREFIXES = ("projector_multimodal.", "projector_imaging.", "projector_tabular.", "CLUB_imaging.", "CLUB_tabular.")
STIL_METHOD_BUFFERS = ("prototypes", "prototypes_sum", "prototypes_count_sum", "DA_queue", "DA_ptr")
TIP_PREFIXES = (
    "encoder_imaging.",
    "projector_imaging.",
    "encoder_tabular.",
    "projector_tabular.",
    "encoder_multimodal.",
    "predictor_tabular.",
    "itm_head.",
)


class ConversionError(ValueError):
    """The checkpoint does not convert cleanly; the message lists the offending keys/tensors."""


# ------------------------------------------------------------------------------------------------
# reading
class OpaqueObject:
    """Stand-in for any class the restricted unpickler refuses to import; runs no code."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs, self.state = args, kwargs, None

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f"<opaque {getattr(type(self), 'qualname', '?')}>"


def _opaque_class(module: str, name: str):
    return type(f"Opaque[{module}.{name}]", (OpaqueObject,), {"qualname": f"{module}.{name}"})


_SAFE_BUILTINS = {"set", "frozenset", "tuple", "list", "dict", "slice", "complex", "bytearray", "bytes", "int", "float", "bool", "str"}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if module == "torch._utils" and name.startswith("_rebuild"):
            return getattr(torch._utils, name)
        if module == "torch._tensor" and name == "_rebuild_from_type_v2":
            return torch._tensor._rebuild_from_type_v2
        if module == "torch":
            obj = getattr(torch, name, None)
            if name.endswith("Storage") or name in ("Size", "device", "Tensor") or isinstance(obj, torch.dtype):
                return obj
        if module == "torch.nn.parameter" and name == "Parameter":
            return torch.nn.Parameter
        if module == "torch.storage" and name in ("TypedStorage", "UntypedStorage"):
            return getattr(torch.storage, name)
        if module == "collections" and name in ("OrderedDict", "defaultdict"):
            import collections

            return getattr(collections, name)
        if module == "builtins" and name in _SAFE_BUILTINS:
            import builtins

            return getattr(builtins, name)
        return _opaque_class(module, name)


class _RestrictedPickleModule:
    Unpickler = _RestrictedUnpickler
    load = staticmethod(lambda f, **kw: _RestrictedUnpickler(f, **kw).load())
    __name__ = "stil_restricted_pickle"


def load_original_checkpoint(path: str | os.PathLike, trust_checkpoint: bool = False) -> tuple[dict, str]:
    """Return (state_dict, how) from an original Lightning checkpoint (or a bare state dict)."""
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    if trust_checkpoint:
        obj = torch.load(path, map_location="cpu", weights_only=False)
        how = "torch.load(weights_only=False) (--trust-checkpoint)"
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
            how = "torch.load(weights_only=True)"
        except Exception as err:  # pickled DictConfig / Lightning objects
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_RestrictedPickleModule)
            how = (
                "restricted unpickler (weights_only=True refused the file: "
                f"{first[:160]}); only tensors/containers were resolved, other objects left opaque"
            )
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConversionError(f"{path}: no state_dict of tensors found (top-level keys: {list(obj)[:10] if isinstance(obj, dict) else type(obj)})")
    return dict(state), how


def resolve_field_lengths(field_lengths) -> list[int]:
    if field_lengths is None:
        raise ConversionError(
            "the categorical field lengths cannot be recovered from the weights; pass the original "
            "field_lengths_tabular file (--field-lengths FILE.pt) or 'dvm'"
        )
    if isinstance(field_lengths, str):
        if field_lengths.lower() == "dvm":
            return list(DVM_FIELD_LENGTHS)
        return read_field_lengths(field_lengths)
    return [int(x) for x in field_lengths]


# ------------------------------------------------------------------------------------------------
# checks
def _layer_count(keys, prefix: str) -> int:
    idx = {int(m.group(1)) for k in keys if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(idx) + 1 if idx else 0


def _shape_errors(model_state: dict, checkpoint: dict, field_lengths: Sequence[int], key_map=lambda k: k) -> list[str]:
    cat, n_con = layout_from_field_lengths(field_lengths)
    hints = {
        "encoder_tabular.cat_embedding.weight": f"rows = sum of categorical field lengths ({sum(cat)} from the lengths given)",
        "encoder_tabular.column_embedding.weight": f"rows = number of fields + 1 ({len(cat) + n_con + 1} from the lengths given)",
        "predictor_tabular.cat_classifier.weight": f"rows = sum of categorical field lengths ({sum(cat)})",
        "predictor_tabular.cat_classifier.bias": f"length = sum of categorical field lengths ({sum(cat)})",
    }
    errors = []
    for ours, tensor in model_state.items():
        src = key_map(ours)
        if src in checkpoint and tuple(checkpoint[src].shape) != tuple(tensor.shape):
            hint = hints.get(ours, "")
            errors.append(
                f"{src}: checkpoint {tuple(checkpoint[src].shape)} vs model {tuple(tensor.shape)}" + (f" ({hint})" if hint else "")
            )
    return errors


def _check_keys(expected: set, got: set, what: str) -> None:
    missing, leftover = sorted(expected - got), sorted(got - expected)
    if missing or leftover:
        raise ConversionError(
            f"{what}: keys do not match the model.\n  missing ({len(missing)}): {missing[:30]}"
            f"{' ...' if len(missing) > 30 else ''}\n  left over ({len(leftover)}): {leftover[:30]}"
            f"{' ...' if len(leftover) > 30 else ''}"
        )


def _persistent_keys(model) -> set:
    return set(model.state_dict().keys())


def _load_exact(model, state: dict) -> None:
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for m in model.modules():
        if hasattr(m, "reset_buffers"):
            m.reset_buffers()  # non-persistent buffers rebuilt from the field lengths


# ------------------------------------------------------------------------------------------------
# STiL

def _fill(model, state: dict, field_lengths, what: str):
    """Load ``state`` into a freshly built ``model``: every tensor must fit (shapes named otherwise),
    every key must be claimed both ways, then the tensors are copied exactly. Returns the model in eval mode."""
    own = model.state_dict()
    errors = _shape_errors(own, state, field_lengths)
    if errors:
        raise ConversionError(
            "tensors that do not fit the model built from the given field lengths/config:\n  " + "\n  ".join(errors)
        )
    _check_keys(set(own), set(state), what)
    _load_exact(model, state)
    return model.eval()

def split_stil_state_dict(state: dict, weights: str = "student") -> tuple[dict, dict]:
    """-> (backbone state without prefix, method-side state with original keys). Refuses leftovers."""
    if weights not in ("student", "teacher"):
        raise ValueError("weights must be 'student' (model.*) or 'teacher' (ema.*)")
    chosen = "model." if weights == "student" else "ema."
    other = "ema." if weights == "student" else "model."
    backbone, method, leftover = {}, {}, []
    for k, v in state.items():
        if k.startswith(chosen):
            backbone[k[len(chosen) :]] = v
        elif k.startswith(other) or k.startswith(STIL_METHOD_PREFIXES) or k in STIL_METHOD_BUFFERS:
            method[k] = v
        else:
            leftover.append(k)
    if not backbone:
        raise ConversionError(f"no {chosen}* keys: not a STiL checkpoint (or pass --weights {'teacher' if weights == 'student' else 'student'})")
    if leftover:
        raise ConversionError(f"keys not claimed by the STiL mapping ({len(leftover)}): {sorted(leftover)[:30]}")
    return backbone, method


def stil_method_state_entry(key: str, value: torch.Tensor, has_teacher: bool, has_distribution_alignment: bool):
    """Where an entry of the method-side file (`METHOD_STATE_FILENAME`, original keys, see
    `split_stil_state_dict`) goes in the ``stil`` method's state dict: ``(target key or None, value)``.

    ``ema.*`` -> the teacher ``ema.module.*``; ``DA_queue`` / ``DA_ptr`` -> ``DA.queue.buffer`` /
    ``DA.queue.ptr`` (a scalar); ``model.*`` (converted with ``--weights teacher``: the loaded model IS
    the teacher, the student copy is not put back) -> None; projectors, CLUB estimators and prototype
    buffers keep their names. None also where the method has no place (no teacher, no DA)."""
    if key.startswith("ema."):
        return ("ema.module." + key[len("ema.") :] if has_teacher else None), value
    if key == "DA_queue":
        return ("DA.queue.buffer" if has_distribution_alignment else None), value
    if key == "DA_ptr":
        return ("DA.queue.ptr" if has_distribution_alignment else None), value.reshape(())
    if key.startswith("model."):
        return None, value
    return key, value


def stil_config_from_state(backbone: dict, field_lengths: Sequence[int], num_classes: Optional[int] = None, **overrides) -> StilConfig:
    keys = backbone.keys()
    if "classifier_multimodal.weight" not in backbone or "encoder_tabular.cls_token" not in backbone:
        raise ConversionError("missing classifier_multimodal.weight or encoder_tabular.cls_token: not a STiL backbone")
    found_classes = int(backbone["classifier_multimodal.weight"].shape[0])
    if num_classes is not None and int(num_classes) != found_classes:
        raise ConversionError(f"--num-classes {num_classes} but the checkpoint's classifiers have {found_classes} outputs")
    kw = dict(
        field_lengths=list(field_lengths),
        num_labels=found_classes,
        tabular_embedding_dim=int(backbone["encoder_tabular.cls_token"].shape[-1]),
        tabular_num_layers=_layer_count(keys, "encoder_tabular.transformer_blocks."),
        hidden_size=int(backbone["reduce.weight"].shape[0]),
        interaction_num_layers=_layer_count(keys, "transformer."),
        image_size=128,
    )
    if "encoder_tabular.transformer_blocks.0.mlp.fc1.weight" in backbone:
        kw["tabular_mlp_ratio"] = backbone["encoder_tabular.transformer_blocks.0.mlp.fc1.weight"].shape[0] / kw["tabular_embedding_dim"]
    kw.update(overrides)
    return StilConfig(**kw)


def convert_stil_state_dict(state: dict, field_lengths, num_classes: Optional[int] = None, weights: str = "student", **config_overrides):
    """-> (StilModel with the original weights, method-side state dict)."""
    from .modeling_stil import StilModel

    field_lengths = resolve_field_lengths(field_lengths)
    backbone, method = split_stil_state_dict(state, weights)
    config = stil_config_from_state(backbone, field_lengths, num_classes, **config_overrides)
    return _fill(StilModel(config), backbone, field_lengths, "STiL backbone"), method


def convert_stil_checkpoint(checkpoint, field_lengths, output_dir=None, num_classes=None, weights="student", trust_checkpoint=False, **config_overrides):
    state, how = load_original_checkpoint(checkpoint, trust_checkpoint)
    model, method = convert_stil_state_dict(state, field_lengths, num_classes, weights, **config_overrides)
    report = {
        "kind": "stil",
        "source": str(checkpoint),
        "read_with": how,
        "weights": weights,
        "tensors_in_checkpoint": len(state),
        "tensors_in_model": len(model.state_dict()),
        "tensors_in_method_state": len(method),
        "field_lengths": model.config.field_lengths,
    }
    if output_dir is not None:
        _save(model, output_dir, report, method)
    return model, method, report


# ------------------------------------------------------------------------------------------------
# TIP
def tip_config_from_state(state: dict, field_lengths: Sequence[int], **overrides) -> TipConfig:
    keys = state.keys()
    bn_keys = [k for k in keys if re.match(r"projector_(imaging|tabular)\.layers\.1\.", k)]
    if bn_keys:
        raise ConversionError(
            f"projector heads contain BatchNorm ({bn_keys[:3]}): written by lightly >= 1.4; TIP/STiL pin "
            "lightly 1.2.22 (Linear-ReLU-Linear, keys layers.0/layers.2), which is what TipModel implements"
        )
    for k in ("encoder_tabular.cls_token", "encoder_multimodal.norm.weight", "projector_imaging.layers.2.weight"):
        if k not in state:
            raise ConversionError(f"missing {k}: not a TIP checkpoint (or a different TIP variant)")
    tab = int(state["encoder_tabular.cls_token"].shape[-1])
    kw = dict(
        field_lengths=list(field_lengths),
        tabular_embedding_dim=tab,
        tabular_num_layers=_layer_count(keys, "encoder_tabular.transformer_blocks."),
        hidden_size=int(state["encoder_multimodal.norm.weight"].shape[0]),
        multimodal_num_layers=_layer_count(keys, "encoder_multimodal.transformer_blocks."),
        projection_dim=int(state["projector_imaging.layers.2.weight"].shape[0]),
        image_projector_hidden_dim=int(state["projector_imaging.layers.0.weight"].shape[0]),
        tabular_projector_hidden_dim=int(state["projector_tabular.layers.0.weight"].shape[0]),
        image_size=128,
    )
    kw.update(overrides)
    return TipConfig(**kw)


def convert_tip_state_dict(state: dict, field_lengths, **config_overrides):
    from .modeling_tip import TipModel

    field_lengths = resolve_field_lengths(field_lengths)
    leftover = sorted(k for k in state if not k.startswith(TIP_PREFIXES))
    if leftover:
        raise ConversionError(f"keys not claimed by the TIP mapping ({len(leftover)}): {leftover[:30]}")
    config = tip_config_from_state(state, field_lengths, **config_overrides)
    return _fill(TipModel(config), state, field_lengths, "TIP")


def convert_tip_checkpoint(checkpoint, field_lengths, output_dir=None, trust_checkpoint=False, **config_overrides):
    state, how = load_original_checkpoint(checkpoint, trust_checkpoint)
    model = convert_tip_state_dict(state, field_lengths, **config_overrides)
    report = {
        "kind": "tip",
        "source": str(checkpoint),
        "read_with": how,
        "tensors_in_checkpoint": len(state),
        "tensors_in_model": len(model.state_dict()),
        "field_lengths": model.config.field_lengths,
    }
    if output_dir is not None:
        _save(model, output_dir, report)
    return model, report


def init_stil_encoders_from_tip(model, tip_checkpoint, trust_checkpoint: bool = False) -> None:
    """What STiL does before training: load TIP's encoder_imaging.* and encoder_tabular.* strictly
    into a ``StilModel`` (everything else of TIP is discarded). ``tip_checkpoint``: path or state dict."""
    state = tip_checkpoint if isinstance(tip_checkpoint, dict) else load_original_checkpoint(tip_checkpoint, trust_checkpoint)[0]
    try:
        model.load_tip_encoders(state)
    except (RuntimeError, ValueError, KeyError) as err:
        raise ConversionError(f"TIP encoders do not fit this StilModel: {err}") from err


# ------------------------------------------------------------------------------------------------
def _save(model, output_dir, report: dict, method_state: Optional[dict] = None) -> None:
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    if method_state:
        from safetensors.torch import save_file

        save_file({k: v.detach().contiguous().clone() for k, v in method_state.items()}, str(out / METHOD_STATE_FILENAME))
        report["method_state_file"] = METHOD_STATE_FILENAME
    (out / CONVERSION_REPORT).write_text(json.dumps(report, indent=2))
    from data_utils.permissions import files_like_umask

    written = [*out.glob("model*.safetensors"), *([out / METHOD_STATE_FILENAME] if method_state else [])]
    files_like_umask(written)  # safetensors writes 0600 whatever the umask


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="Convert an original STiL/TIP Lightning checkpoint into a stil model folder")
    p.add_argument("--kind", choices=("stil", "tip"), required=True)
    p.add_argument("--checkpoint", required=True, help="the original .ckpt file")
    p.add_argument("--field-lengths", required=True, help="the original field_lengths_tabular .pt file, or 'dvm'")
    p.add_argument("--num-classes", type=int, default=None, help="checked against the classifier shapes (stil)")
    p.add_argument("--weights", choices=("student", "teacher"), default="student", help="stil: model.* or ema.*")
    p.add_argument("--output", required=True, help="output folder (save_pretrained)")
    p.add_argument("--image-encoder", default="resnet50", help="timm name of the image backbone (resnet50 in the originals)")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--config-json", default=None, help="extra config fields as JSON, e.g. non-default head counts or timm kwargs")
    p.add_argument("--trust-checkpoint", action="store_true", help="unpickle everything (needs omegaconf; runs pickled code)")
    args = p.parse_args(argv)
    overrides = dict(image_encoder=args.image_encoder, image_size=args.image_size)
    if args.config_json:
        overrides.update(json.loads(args.config_json))
    try:
        if args.kind == "stil":
            _, _, report = convert_stil_checkpoint(
                args.checkpoint, args.field_lengths, args.output, args.num_classes, args.weights, args.trust_checkpoint, **overrides
            )
        else:
            _, report = convert_tip_checkpoint(args.checkpoint, args.field_lengths, args.output, args.trust_checkpoint, **overrides)
    except ConversionError as err:
        print(f"conversion refused: {err}")
        return 2
    print(json.dumps(report, indent=2))
    return 0
