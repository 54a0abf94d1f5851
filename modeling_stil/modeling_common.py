"""What every stil model shares (the model side of configuration_common.py).

* `DataCompatibilityMixin`: ``check_data_compatibility`` (raises `DataCompatibilityError`, a
  ``ValueError``), the task loss ``compute_loss`` following ``config.problem_type``, extra
  ``auto_map`` entries on ``save_pretrained``, and a ``from_pretrained`` that hands back weights in
  memory the model owns (`own_aligned_memory`; docs/models.md, "Loading"). Used by every model (WRN and TCDCNN mix it into their
  own PreTrainedModel with their own initialisation).
* `StilPreTrainedModel`: the mixin + PreTrainedModel with ``encoders.init_module_weights`` (timm
  modules keep timm's initialisation, TIP modules TIP's) and the encoder builders; the base of STiL,
  TIP and the baselines.
* `build_image_encoder` / `build_tabular_encoder`: the timm image encoder and TIP's tabular transformer
  from a config (STiL/TIP and the baselines name a few fields differently; both spellings are read here).

Relative imports only: copied as remote code next to saved models.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from transformers import PreTrainedModel

from .configuration_common import check_data_compatibility
from .encoders import TIP_INIT_STD, ImageEncoder, TabularTransformerEncoder, compute_loss, init_module_weights


def build_image_encoder(config) -> ImageEncoder:
    """timm backbone named by ``image_encoder`` (STiL/TIP) or ``backbone`` (baselines)."""
    name = getattr(config, "image_encoder", None) or config.backbone
    kwargs = getattr(config, "image_encoder_kwargs", None) if hasattr(config, "image_encoder") else config.backbone_kwargs
    return ImageEncoder(name, config.num_channels, kwargs)


def build_tabular_encoder(config) -> TabularTransformerEncoder:
    """TIP's tabular transformer over ``config.tabular_schema``'s layout."""
    if not config.tabular_schema:
        raise ValueError(
            f"{type(config).__name__} needs tabular_schema (the dataset's TabularSchema dict, or field_lengths for "
            "STiL/TIP); build the model with create_model(name, schema=..., metadata=...) or pass "
            "tabular_schema=schema.to_dict()"
        )
    drop_rate = getattr(config, "tabular_drop_rate", None)
    if drop_rate is None:
        drop_rate = getattr(config, "tabular_dropout", 0.0)
    return TabularTransformerEncoder(
        config.cardinalities,
        config.num_continuous,
        dim=config.tabular_embedding_dim,
        num_layers=config.tabular_num_layers,
        num_heads=config.tabular_num_heads,
        mlp_ratio=config.tabular_mlp_ratio,
        drop_rate=drop_rate,
        embedding_dropout=getattr(config, "embedding_dropout", 0.0),
        check_codes=getattr(config, "check_categorical_codes", True),
        init_std=getattr(config, "initializer_range", None) or TIP_INIT_STD,
    )


def own_aligned_memory(model: nn.Module) -> nn.Module:
    """Copy every CPU parameter and buffer into fresh memory the model owns, in place.

    transformers assigns tensors that point into the memory-mapped safetensors file, at the file's
    byte offsets (e.g. 4 mod 64). CPU kernels then take unaligned vectorised paths: slower, and with
    one thread not bit-equal to the same weights in allocator memory (64-byte aligned). A copy also
    detaches the model from the file, which may be overwritten or deleted while the model lives.
    Parameter objects are kept (``.data`` is replaced), so tied weights stay tied.
    """
    copies: dict[int, torch.Tensor] = {}  # by id: a tied parameter or shared buffer is copied once
    with torch.no_grad():
        for module in model.modules():
            for name, param in module._parameters.items():
                if param is not None and param.device.type == "cpu" and id(param) not in copies:
                    param.data = copies[id(param)] = param.data.clone(memory_format=torch.contiguous_format)
            for name, buffer in module._buffers.items():
                if buffer is not None and buffer.device.type == "cpu":
                    if id(buffer) not in copies:
                        copies[id(buffer)] = buffer.clone(memory_format=torch.contiguous_format)
                    module._buffers[name] = copies[id(buffer)]
    return model


class DataCompatibilityMixin:
    """Adds ``check_data_compatibility``, the task loss and extra ``auto_map`` entries to a PreTrainedModel.

    ``register_for_auto_class`` keeps a single Auto class per model, so a model that is also an
    image classifier lists the others in ``_extra_auto_classes``; ``save_pretrained`` adds them to
    ``auto_map`` so ``AutoModel`` and ``AutoModelForImageClassification`` both load it as remote code.
    ``_needs_labels = False``: the data check ignores labels (pretraining models).
    ``_strict_data_check = False``: only what the data states is compared (see
    configuration_common.data_differences).
    """

    _extra_auto_classes: tuple = ()
    _needs_labels = True
    _strict_data_check = True

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """``PreTrainedModel.from_pretrained``, then `own_aligned_memory` (see there for why)."""
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info=True
        own_aligned_memory(model)
        return loaded

    def save_pretrained(self, save_directory, *args, **kwargs):
        if self._extra_auto_classes:
            auto_map = dict(getattr(self.config, "auto_map", None) or {})
            name = f"{type(self).__module__.split('.')[-1]}.{type(self).__name__}"
            for auto_class in self._extra_auto_classes:
                auto_map.setdefault(auto_class, name)
            self.config.auto_map = auto_map
        return super().save_pretrained(save_directory, *args, **kwargs)

    def check_data_compatibility(self, schema=None, metadata=None, num_channels: Optional[int] = None) -> None:
        """Raise `DataCompatibilityError` (a ``ValueError``) listing every difference between the model
        and the data (column names, field counts, cardinalities, labels, problem type, image channels)."""
        check_data_compatibility(
            self.config, schema, metadata, num_channels, need_labels=self._needs_labels, strict=self._strict_data_check
        )

    def compute_loss(self, logits, labels):
        """The supervised loss of one head (None without labels), following ``config.problem_type``."""
        if labels is None:
            return None
        return compute_loss(logits, labels, self.config.problem_type, self.config.num_labels)


class StilPreTrainedModel(DataCompatibilityMixin, PreTrainedModel):
    """Base of STiL, TIP and the baseline classifiers."""

    main_input_name = "pixel_values"
    supports_gradient_checkpointing = False
    _supports_sdpa = True

    def _init_weights(self, module) -> None:
        # post_init would otherwise re-initialise the timm backbone and TIP's normal(0.02) layers
        # with transformers' defaults; see encoders.init_module_weights for the rules.
        init_module_weights(module)

    def _build_image_encoder(self, config=None) -> ImageEncoder:
        return build_image_encoder(config if config is not None else self.config)

    def _build_tabular_encoder(self, config=None) -> TabularTransformerEncoder:
        return build_tabular_encoder(config if config is not None else self.config)
