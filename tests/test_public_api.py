"""`from modeling_stil import ...` works for every public name, as in transformers."""

from __future__ import annotations

import subprocess
import sys

import modeling_stil
from modeling_stil.auto import MODEL_REGISTRY


def test_every_public_name_imports():
    for name in modeling_stil.__all__:
        assert getattr(modeling_stil, name) is not None, name
    namespace: dict = {}
    exec(f"from modeling_stil import {', '.join(modeling_stil.__all__)}", namespace)
    assert set(modeling_stil.__all__) <= set(namespace)


def test_documented_imports():
    from modeling_stil import StilConfig, StilModel, StilProcessor, TipConfig, TipModel, create_model, list_presets

    assert StilModel.config_class is StilConfig and TipModel.config_class is TipConfig
    assert callable(create_model) and "stil-tiny" in list_presets() and StilProcessor.__name__ == "StilProcessor"


def test_exported_classes_are_what_the_auto_classes_resolve():
    from transformers import AutoConfig, AutoModel

    for _module, config_name, model_name, _autos in MODEL_REGISTRY:
        assert config_name in modeling_stil.__all__ and model_name in modeling_stil.__all__
        config_cls = getattr(modeling_stil, config_name)
        model_cls = getattr(modeling_stil, model_name)
        assert AutoConfig.for_model(config_cls.model_type).__class__ is config_cls
        assert AutoModel._model_mapping[config_cls] is model_cls


def test_unknown_name_is_an_attribute_error():
    try:
        modeling_stil.NoSuchModel  # noqa: B018
    except AttributeError as error:
        assert "NoSuchModel" in str(error)
    else:  # pragma: no cover
        raise AssertionError("expected AttributeError")


def test_naming_one_class_does_not_import_the_others_lazily_added():
    # the lazy exports add no import cost: a fresh interpreter that imports the package and one
    # name does not import the training loop or the SSL methods
    code = (
        "import sys, modeling_stil; from modeling_stil import StilConfig; "
        "print(any(m.startswith(('modeling_stil.training', 'modeling_stil.methods')) for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
