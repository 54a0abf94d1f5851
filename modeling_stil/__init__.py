"""stil models: configs + PreTrainedModels, SSL methods and the Accelerate training loop.

Importing this package registers every model with the transformers Auto classes. The public
classes and functions import from the package, as in transformers::

    from modeling_stil import StilModel, StilConfig, StilProcessor, create_model, list_presets

They are resolved lazily (module ``__getattr__``): naming one imports only its own module.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .auto import MODEL_REGISTRY, register_auto_classes

register_auto_classes()

# public name -> module under modeling_stil that defines it
_EXPORTS: dict[str, str] = {}
for _module, _config, _model, _autos in MODEL_REGISTRY:
    _EXPORTS[_config] = "configuration_" + _module[len("modeling_"):]
    _EXPORTS[_model] = _module
_EXPORTS.update(
    {
        "StilProcessor": "processing_stil",
        "create_model": "presets",
        "list_presets": "presets",
        "preset_config": "presets",
        "default_preset_for": "presets",
        "check_preset_fits": "presets",
        "DataCompatibilityError": "configuration_common",
    }
)
del _module, _config, _model, _autos

__all__ = sorted(_EXPORTS) + ["register_auto_classes"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # static analysers and IDEs see the real names
    from .configuration_baselines import ImageClassifierConfig, MultimodalClassifierConfig, TabularClassifierConfig
    from .configuration_common import DataCompatibilityError
    from .configuration_stil import StilConfig
    from .configuration_tcdcnn import TCDCNNConfig
    from .configuration_tip import TipConfig
    from .configuration_wide_resnet import WideResNetConfig
    from .modeling_baselines import ImageClassifier, MultimodalClassifier, TabularClassifier
    from .modeling_stil import StilModel
    from .modeling_tcdcnn import TCDCNNForLandmarkRegression
    from .modeling_tip import TipModel
    from .modeling_wide_resnet import WideResNetForImageClassification
    from .presets import check_preset_fits, create_model, default_preset_for, list_presets, preset_config
    from .processing_stil import StilProcessor
