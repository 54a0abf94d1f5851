"""The model a run trains: ``--model`` (a preset, folder or Hub id) or the preset that fits the data and the
method, checked against both (modalities, prediction head) with one-line errors naming the fix, then
started from ``--init_from`` encoders."""

from __future__ import annotations

from .errors import JobError


def build_model(args, schema, metadata, method_cls=None, say=print):
    """The model: ``--model`` (a preset, folder or Hub id) or the one `choose_model` picks, in float32,
    checked against the data and the method; a note is said when it ignores the table."""
    from ..configuration_common import DataCompatibilityError
    from ..presets import create_model

    overrides = dict(args.model.model_overrides or {})
    named = args.model.model is not None
    name = choose_model(args, schema, metadata, method_cls)
    try:
        model = create_model(name, schema=schema, metadata=metadata, **overrides)
    except DataCompatibilityError:
        raise
    except (ValueError, KeyError, TypeError) as error:  # unknown preset, bad override: one line, no traceback
        text = error.args[0] if error.args else str(error)
        raise JobError(f"--model {name}: {text}") from None
    model = model.float()
    check = getattr(model, "check_data_compatibility", None)
    if check is not None:
        check(schema, metadata)
    check_data_modalities(model, name, schema, metadata)
    if method_cls is not None:
        check_modalities(model, method_cls, name)
        check_image_only(model, method_cls, name, named)
        check_prediction_head(model, method_cls, name)
    ignored = ignored_columns_note(model, name, named, method_cls, schema)
    if ignored:
        say(ignored)
    return model


def choose_model(args, schema, metadata, method_cls=None) -> str:
    """``--model``, checked against the data; without it, the method's preferred preset when it fits
    the data, else a preset that fits the data and the method's modalities (modeling_stil.presets)."""
    from ..presets import check_preset_fits, default_preset_for, preset_misfit

    required = tuple(method_cls.required_modalities) if method_cls is not None else ()
    name = args.model.model
    try:
        if name is None:
            preferred = getattr(method_cls, "preferred_model", None)
            if preferred and not preset_misfit(preferred, schema, metadata, required):
                name = preferred
            else:
                name = default_preset_for(schema, metadata, required_modalities=required)
            args.model.model = name  # recorded in run_config.yaml as what was really used
        else:
            check_preset_fits(name, schema, metadata, required_modalities=required)
    except ValueError as error:
        method = f"method {method_cls.name!r}: " if method_cls is not None else ""
        raise JobError(f"{method}{error}") from None
    return name


def check_data_modalities(model, model_name: str, schema, metadata) -> None:
    """The model's inputs must exist in the data, also when the data states no schema at all
    (image-only data has none: a tabular model would otherwise fail inside its encoder at step 0)."""
    reads = set(getattr(model, "input_modalities", ()) or ())
    has = set()
    if getattr(metadata, "image_column", "image") is not None:
        has.add("image")
    if schema is not None:
        has.add("tabular")
    missing = sorted(reads - has)
    if missing and reads:
        kind = "+".join(sorted(has)) or "no"
        suggestion = {"image": "an image model (e.g. --model image-tiny)", "tabular": "a tabular model (e.g. --model tabular-tiny)",
                      "image+tabular": "an image+tabular model (e.g. --model multimodal-concat-tiny)"}.get(kind, "a matching model")
        raise JobError(
            f"--model {model_name} reads {'+'.join(sorted(reads))} inputs but the dataset has {kind}-only data "
            f"(no {' and no '.join(missing)} input); choose {suggestion} or an image+tabular dataset"
        )


def check_prediction_head(model, method_cls, model_name: str) -> None:
    """A method that trains on labels needs a model with a prediction head (``logits``); pretraining
    networks (TipModel: ``_needs_labels = False``) have none."""
    if method_cls.label_free or getattr(model, "_needs_labels", True):
        return
    raise JobError(
        f"--model {model_name} is a pretraining network without a prediction head (its outputs have no logits), "
        f"but method {method_cls.name!r} trains on labels; choose a classifier (e.g. --model multimodal-tip-tiny or "
        f"stil-tiny), or pretrain with a label-free method and start a classifier from it with --init_from"
    )


def _multimodal_variant(method_cls) -> str | None:
    from ..methods.base import METHODS

    name = f"multimodal_{method_cls.name}" if method_cls is not None else None
    return name if name in METHODS else None


def check_image_only(model, method_cls, model_name: str, named: bool) -> None:
    """An image-only method (SimMatch, CoMatch) refuses a model that reads the table, in one line with the fix."""
    reads = set(getattr(model, "input_modalities", ()) or ())
    if not getattr(method_cls, "image_only", False) or "tabular" not in reads:
        return
    variant = _multimodal_variant(method_cls)
    raise JobError(
        f"method {method_cls.name!r} trains on the images alone but --model {model_name} reads image+tabular input"
        + (f"; use --method {variant} with this model" if variant else "")
        + (" or an image model (drop --model: an image model is chosen and the table is ignored)" if named
           else " or an image model (--model image-tiny)")
    )


def ignored_columns_note(model, model_name: str, named: bool, method_cls, schema) -> str | None:
    """One line when the model reads only the images of image+tabular data: which model, and which columns
    it ignores (an image-only method's model leaves the table out; the user should know)."""
    reads = set(getattr(model, "input_modalities", ()) or ())
    if schema is None or not schema.names or not reads or "tabular" in reads:
        return None
    why = "named by --model" if named else (f"chosen for method {method_cls.name!r}" if method_cls is not None else "chosen")
    variant = _multimodal_variant(method_cls)
    columns = schema.names
    shown = ", ".join(columns[:12]) + (f" and {len(columns) - 12} more" if len(columns) > 12 else "")
    return (f"model {model_name} ({why}) reads only the images: it ignores the tabular columns {shown}"
            + (f"; --method {variant} uses them" if variant else "; an image+tabular model uses them"))


def check_modalities(model, method_cls, model_name: str) -> None:
    """A method that needs both modalities refuses a unimodal model with a one-line fix."""
    needed = set(method_cls.required_modalities)
    if not needed:
        return
    has = set(getattr(model, "input_modalities", ()) or ())
    missing = sorted(needed - has)
    if missing:
        raise JobError(
            f"method {method_cls.name!r} needs a model reading {sorted(needed)}, but --model {model_name} reads "
            f"{sorted(has) or 'nothing'}; choose an image+tabular model (e.g. --model stil-tiny) and an image+tabular dataset"
        )



def initialise_from(model, init_from: str, say=print) -> dict:
    """``--init_from``: load the encoders of a run, export or converted checkpoint into ``model``; the
    report of loaded / skipped tensors is printed and returned (run_info.json records it)."""
    from ..pretrained_init import init_from_pretrained

    report = init_from_pretrained(model, init_from)
    say(f"--init_from {init_from}: loaded {len(report['loaded'])} tensors, skipped {len(report['skipped'])}, "
        f"{len(report['not_initialised'])} of this model's tensors keep their initialisation")
    return report
