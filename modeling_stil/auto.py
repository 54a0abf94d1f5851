"""Registration of our configs/models/processor with the transformers Auto classes.

Each entry: (module, config class, model class, Auto task classes). Models are also registered
for remote code in their own modeling files (``register_for_auto_class``) so ``save_pretrained``
writes ``auto_map``. `StilProcessor` serves every model: ``AutoProcessor`` finds it by config type and
by the ``processor_class`` name in ``processor_config.json`` (exports written before it shipped as
remote code load through this registration).
"""

import importlib

# (module under modeling_stil, config class name, model class name, extra Auto classes)
MODEL_REGISTRY: list[tuple[str, str, str, tuple[str, ...]]] = [
    ("modeling_stil", "StilConfig", "StilModel", ()),
    ("modeling_tip", "TipConfig", "TipModel", ()),
    ("modeling_wide_resnet", "WideResNetConfig", "WideResNetForImageClassification", ("AutoModelForImageClassification",)),
    ("modeling_tcdcnn", "TCDCNNConfig", "TCDCNNForLandmarkRegression", ()),
    ("modeling_baselines", "ImageClassifierConfig", "ImageClassifier", ("AutoModelForImageClassification",)),
    ("modeling_baselines", "TabularClassifierConfig", "TabularClassifier", ()),
    ("modeling_baselines", "MultimodalClassifierConfig", "MultimodalClassifier", ()),
]

_registered = False


def register_auto_classes() -> None:
    global _registered
    if _registered:
        return
    import transformers

    from .processing_stil import StilProcessor

    for module_name, config_name, model_name, auto_names in MODEL_REGISTRY:
        module = importlib.import_module(f"{__package__}.{module_name}")
        config_cls = getattr(module, config_name)
        model_cls = getattr(module, model_name)
        transformers.AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        for auto_name in ("AutoModel",) + tuple(auto_names):
            getattr(transformers, auto_name).register(config_cls, model_cls, exist_ok=True)
        transformers.AutoProcessor.register(config_cls, StilProcessor, exist_ok=True)
    _registered = True
