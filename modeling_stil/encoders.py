"""Shared network blocks: timm image encoder, TIP's tabular transformer, STiL's interaction layer,
TIP's multimodal cross-attention encoder, MLP/projection helpers and prediction heads.

Self-contained on purpose (torch, timm, transformers only): ``save_pretrained`` copies this file
next to the weights for ``trust_remote_code`` loading, so it must not import our data or training
code. Parameter and buffer names follow the original TIP/STiL checkpoints exactly
(see docs/models.md), so original weights load without renaming.
"""

from __future__ import annotations

import difflib
import os
from typing import Optional, Sequence

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "ImageEncoder",
    "build_image_encoder",
    "TabularTransformerEncoder",
    "Attention",
    "CrossAttention",
    "TransformerBlock",
    "Mlp",
    "DropPath",
    "InteractionLayer",
    "MultimodalCrossEncoder",
    "TwoLayerMLP",
    "SimCLRProjectionHead",
    "TabularPredictor",
    "LinearHead",
    "compute_loss",
    "init_module_weights",
    "check_categorical_codes",
]

# ------------------------------------------------------------------------------------------------
# initialisation tags
#
# transformers 5 runs ``_init_weights`` over every sub-module in ``post_init`` (and over modules with
# missing keys after ``from_pretrained``). Our models delegate to ``init_module_weights`` which reads
# a tag set on each sub-module at construction:
#   "timm": leave alone (timm's own init at construction, loaded weights afterwards)
#   "tip":  TIP's init (normal(0, 0.02) for Linear/Embedding, zero bias, LayerNorm 1/0)
#   absent: PyTorch's default init (``reset_parameters``), which is what STiL uses for its heads.
# Non-persistent buffers are rebuilt by ``reset_buffers`` (from_pretrained leaves them empty).
_INIT_TAG = "_stil_init"


_INIT_STD = "_stil_init_std"
TIP_INIT_STD = 0.02  # TIP's normal(0, 0.02) (BERT/ViT's value, chosen for widths of 512 and more)


def _tag_modules(module: nn.Module, tag: str, init_std: float = TIP_INIT_STD) -> None:
    for m in module.modules():
        setattr(m, _INIT_TAG, tag)
        setattr(m, _INIT_STD, float(init_std))


@torch.no_grad()
def init_module_weights(module: nn.Module) -> None:
    """Initialise one module (not recursive) following its tag; used by our ``_init_weights``."""
    if hasattr(module, "reset_buffers"):
        module.reset_buffers()
    tag = getattr(module, _INIT_TAG, None)
    if tag == "timm":
        return
    if tag == "tip":
        std = getattr(module, _INIT_STD, TIP_INIT_STD)
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, TabularTransformerEncoder):
            nn.init.trunc_normal_(module.cls_token, std=std)
            nn.init.trunc_normal_(module.mask_special_token, std=std)
        return
    if isinstance(module, (nn.Linear, nn.Embedding, nn.LayerNorm, nn.Conv2d)):
        module.reset_parameters()


# ------------------------------------------------------------------------------------------------
# image encoder
class ImageEncoder(nn.Module):
    """A timm backbone that returns the last stage's tokens (B, N, C) and a pooled vector (B, C).

    ``ImageEncoder("resnet50")`` *is* the timm model (its class is extended with this mixin), so its
    ``state_dict`` keys are timm's own; for the ResNet family they equal torchvision/pl_bolts names
    (``conv1``, ``bn1``, ``layer1.0.conv1``, ..., ``layer1.0.downsample.0``), which is the layout of
    TIP/STiL's ``encoder_imaging.*`` keys, so original weights load 1:1.

    Tokens: a 4-D feature map (B, C, H, W) becomes (B, H*W, C) in row-major order; pooled = mean
    over tokens (global average pooling). Transformer backbones (3-D output) give their full token
    sequence and the first prefix (CLS) token as pooled vector (mean when there is none).
    """

    _classes: dict = {}

    def __new__(cls, model_name: str = "resnet50", num_channels: int = 3, timm_kwargs: Optional[dict] = None, **_):
        if cls is not ImageEncoder:  # copy.deepcopy / unpickling of an already-built encoder
            return super().__new__(cls)
        backbone = _create_timm_backbone(model_name, num_channels, timm_kwargs or {})
        base = type(backbone)
        dyn = ImageEncoder._classes.get(base)
        if dyn is None:
            dyn = type(f"ImageEncoder_{base.__name__}", (ImageEncoder, base), {"__module__": __name__})
            ImageEncoder._classes[base] = dyn
        backbone.__class__ = dyn
        backbone.model_name = model_name
        backbone.num_channels = num_channels
        _tag_modules(backbone, "timm")
        return backbone

    def __init__(self, *args, **kwargs):  # everything happens in __new__ (the timm model is built there)
        pass

    @property
    def feature_dim(self) -> int:
        return int(self.num_features)

    def forward(self, pixel_values: torch.Tensor):
        feats = self.forward_features(pixel_values)
        if feats.ndim == 4:
            tokens = feats.flatten(2).transpose(1, 2)
            pooled = tokens.mean(dim=1)
        elif feats.ndim == 3:
            tokens = feats
            n_prefix = int(getattr(self, "num_prefix_tokens", 0) or 0)
            pooled = feats[:, 0] if n_prefix > 0 else feats.mean(dim=1)
        else:
            raise ValueError(f"unsupported timm feature shape {tuple(feats.shape)} for {self.model_name}")
        return tokens, pooled

    # -------------------------------------------------------------------------------------- weights
    def load_pretrained_weights(self, source: str, strict: bool = True) -> None:
        """Load backbone weights after construction (so ``post_init`` cannot overwrite them).

        ``source``: a local file (.safetensors, .pth/.pt/.bin/.ckpt; a ``state_dict``/``model`` entry
        is unwrapped, ``module.`` / ``encoder_imaging.`` prefixes stripped) or a timm hub name
        (``hf-hub:timm/resnet50.a1_in1k`` or ``resnet50.a1_in1k``), which needs the Hub or its cache.
        Classifier keys (``fc.*``, ``head.*``...) are ignored since the encoder has no classifier.
        """
        if os.path.isfile(source):
            state = _read_state_file(source)
        else:
            try:
                ref = timm.create_model(
                    source, pretrained=True, num_classes=0, global_pool="", in_chans=self.num_channels
                )
            except Exception as err:  # offline, unknown tag, missing cache...
                raise RuntimeError(
                    f"could not fetch pretrained timm weights {source!r} ({type(err).__name__}: {err}). "
                    "Without network access, download the weights elsewhere and pass the local file path "
                    "(safetensors or torch state dict), or set HF_HUB_OFFLINE=0 when the Hub is reachable."
                ) from err
            state = ref.state_dict()
        own = self.state_dict()
        state = {k: v for k, v in state.items() if k in own or not _is_classifier_key(k)}
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        bad_shape = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
        if strict and (missing or unexpected or bad_shape):
            raise RuntimeError(
                f"pretrained weights {source!r} do not fit {self.model_name}: "
                f"missing {missing[:10]}{'...' if len(missing) > 10 else ''} ({len(missing)}), "
                f"unexpected {unexpected[:10]} ({len(unexpected)}), wrong shape {bad_shape[:10]}"
            )
        self.load_state_dict({k: v for k, v in state.items() if k in own and k not in bad_shape}, strict=False)


def build_image_encoder(model_name: str = "resnet50", num_channels: int = 3, timm_kwargs: Optional[dict] = None):
    return ImageEncoder(model_name, num_channels, timm_kwargs)


def _is_classifier_key(key: str) -> bool:
    return key.split(".")[0] in {"fc", "head", "classifier", "last_linear", "head_dist"}


def _read_state_file(path: str) -> dict:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "model_state"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    out = {}
    for k, v in state.items():
        for prefix in ("module.", "encoder_imaging.", "model.encoder_imaging."):
            if k.startswith(prefix):
                k = k[len(prefix) :]
        out[k] = v
    return out


def _create_timm_backbone(model_name: str, num_channels: int, timm_kwargs: dict) -> nn.Module:
    base_name = model_name.split(":", 1)[-1].rsplit("/", 1)[-1].split(".")[0]
    if not model_name.startswith("hf-hub:") and not timm.is_model(base_name):
        close = difflib.get_close_matches(base_name, timm.list_models(), n=8, cutoff=0.6)
        raise ValueError(
            f"unknown timm model {model_name!r}; close matches: {close or 'none'} "
            "(timm.list_models('<pattern>*') lists all names)"
        )
    if model_name.startswith("hf-hub:"):
        raise ValueError(
            f"{model_name!r}: give the architecture name as image_encoder (e.g. 'resnet50') and the hub "
            "name as pretrained weights (load_pretrained_weights / config image_pretrained), so the model "
            "can be rebuilt offline from its config"
        )
    # timm zero-initialises the last norm of every residual branch (``zero_init_last=True``);
    # TIP/STiL and the Match family build torchvision ResNets, whose BN weights start at 1. Zeroed
    # branches make the encoder the stem plus the shortcut path at step 0 (93 % of the tiny ResNet's
    # gradient entries from TIP's contrastive loss were exactly 0), so we build like the originals
    # unless ``zero_init_last`` is given in the encoder kwargs.
    kwargs = {"zero_init_last": False, **timm_kwargs}
    try:
        return timm.create_model(
            base_name, pretrained=False, num_classes=0, global_pool="", in_chans=num_channels, **kwargs
        )
    except TypeError as error:  # an architecture without residual-branch zero init (ViT, ...)
        if "zero_init_last" not in str(error) or "zero_init_last" in timm_kwargs:
            raise
    return timm.create_model(
        base_name, pretrained=False, num_classes=0, global_pool="", in_chans=num_channels, **timm_kwargs
    )


# ------------------------------------------------------------------------------------------------
# transformer pieces (TIP naming)
class DropPath(nn.Module):
    """Stochastic depth per sample (identity in eval or with p = 0)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        noise = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * noise / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Mlp(nn.Module):
    """fc1 -> GELU -> dropout -> fc2 -> dropout (keys fc1, fc2)."""

    def __init__(self, dim: int, hidden: int, out: Optional[int] = None, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, out or dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


def _split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    b, n, c = x.shape
    return x.view(b, n, num_heads, c // num_heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


class Attention(nn.Module):
    """Multi-head self-attention (keys qkv, proj) via ``F.scaled_dot_product_attention``.

    ``attn_mask``: boolean, True = the query may attend to that key; broadcastable to (B, H, N, N).
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        q, k, v = (_split_heads(t, self.num_heads) for t in self.qkv(x).chunk(3, dim=-1))
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.attn_drop if self.training else 0.0
        )
        return self.proj_drop(self.proj(_merge_heads(out)))


class CrossAttention(nn.Module):
    """TIP's cross-attention: queries from x (q_proj, with bias), keys/values from the image
    tokens (kv_proj, bias per ``qkv_bias``), output proj."""

    def __init__(self, dim: int, context_dim: int, num_heads: int = 8, qkv_bias: bool = False, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.kv_proj = nn.Linear(context_dim, context_dim * 2, bias=qkv_bias)
        self.q_proj = nn.Linear(dim, context_dim)
        self.proj = nn.Linear(context_dim, context_dim)
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        k, v = (_split_heads(t, self.num_heads) for t in self.kv_proj(context).chunk(2, dim=-1))
        q = _split_heads(self.q_proj(x), self.num_heads)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(_merge_heads(out)))


class TransformerBlock(nn.Module):
    """Pre-LN block: x + attn(norm1(x)) [+ cross_attn(cross_norm(x), context)] + mlp(norm2(x))."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        cross_attention_dim: Optional[int] = None,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, drop)
        if cross_attention_dim is not None:
            self.cross_attn = CrossAttention(dim, cross_attention_dim, num_heads, qkv_bias, attn_drop, drop)
            self.cross_norm = nn.LayerNorm(dim)
        else:
            self.cross_attn = None
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x, attn_mask=None, context=None):
        x = x + self.drop_path(self.attn(self.norm1(x), attn_mask))
        if self.cross_attn is not None:
            if context is None:
                raise ValueError("this block cross-attends and needs the image tokens (context)")
            x = x + self.drop_path(self.cross_attn(self.cross_norm(x), context))
        return x + self.drop_path(self.mlp(self.norm2(x)))


# ------------------------------------------------------------------------------------------------
# tabular encoder
def check_categorical_codes(codes: torch.Tensor, cardinalities: Sequence[int] | torch.Tensor) -> None:
    """Raise a readable error when a categorical code is outside its field's vocabulary.

    No host synchronisation on the happy path: the test is ``torch._assert_async`` (on CUDA it is
    queued with the kernels and a failure surfaces as a device-side assert carrying this message; on
    CPU it raises at once and the row / field / code are named). ``cardinalities`` may be a tensor on
    the codes' device (the encoder keeps one as a buffer, so no host-to-device copy per step)."""
    if codes.numel() == 0:
        return
    card = cardinalities if isinstance(cardinalities, torch.Tensor) else torch.as_tensor(list(cardinalities), device=codes.device)
    bad = (codes < 0) | (codes >= card)
    hint = (
        "The data does not match the model's tabular schema (check_data_compatibility), "
        "or missing cells were not set to 0 with missing_mask=True."
    )
    try:
        torch._assert_async(~bad.any(), "categorical code out of range for its field's vocabulary. " + hint)
    except RuntimeError:  # CPU: the failure is known now; name the first bad cell (error path only)
        row, col = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"categorical code out of range: row {row}, categorical field {col} has code {int(codes[row, col])} "
            f"but the field has {int(card[col])} categories (valid 0..{int(card[col]) - 1}); {int(bad.sum())} bad "
            f"cell(s) in the batch. {hint}"
        ) from None


class TabularTransformerEncoder(nn.Module):
    """TIP/STiL's tabular transformer (same parameter names as the original checkpoints).

    Fields are categorical first, then continuous. Categorical codes index one shared embedding
    (per-field offsets ``cat_offsets``), continuous values go through one shared ``Linear(1, d)``;
    a CLS token is prepended, a learned column embedding added, then LayerNorm and pre-LN blocks
    (qkv without bias, GELU MLP, no final norm). Output (B, 1 + F, d); row 0 is CLS.

    ``missing_mask`` (B, F), True = missing/masked: the field's token is replaced by
    ``mask_special_token`` and no other position attends to it (it still attends to itself; CLS is
    never masked), exactly TIP's masking.
    """

    def __init__(
        self,
        cat_cardinalities: Sequence[int],
        num_continuous: int,
        dim: int = 512,
        num_layers: int = 4,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        drop_rate: float = 0.0,
        embedding_dropout: float = 0.0,
        check_codes: bool = True,
        init_std: float = TIP_INIT_STD,
    ):
        super().__init__()
        self.cat_cardinalities = [int(c) for c in cat_cardinalities]
        if any(c < 1 for c in self.cat_cardinalities):
            raise ValueError(f"categorical cardinalities must be >= 1, got {self.cat_cardinalities}")
        self.num_cat = len(self.cat_cardinalities)
        self.num_con = int(num_continuous)
        self.num_fields = self.num_cat + self.num_con
        if self.num_fields == 0:
            raise ValueError("the tabular encoder needs at least one field")
        self.dim = dim
        self.check_codes = check_codes
        self.register_buffer("cat_offsets", torch.zeros(self.num_cat, dtype=torch.long), persistent=False)
        self.register_buffer("pos_ids", torch.zeros(1, self.num_fields + 1, dtype=torch.long), persistent=False)
        self.register_buffer("cat_limits", torch.ones(self.num_cat, dtype=torch.long), persistent=False)
        self.cat_embedding = nn.Embedding(max(sum(self.cat_cardinalities), 1), dim)
        self.con_proj = nn.Linear(1, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.mask_special_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.column_embedding = nn.Embedding(self.num_fields + 1, dim)
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(embedding_dropout)
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(dim, num_heads, mlp_ratio, qkv_bias=False, drop=drop_rate) for _ in range(num_layers)
        )
        _tag_modules(self, "tip", init_std)
        self.reset_buffers()
        for m in self.modules():
            init_module_weights(m)

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Rebuild the non-persistent buffers from the field lengths (never stored in checkpoints)."""
        offsets = [0]
        for c in self.cat_cardinalities[:-1]:
            offsets.append(offsets[-1] + c)
        dev = self.cls_token.device if self.cls_token.device.type != "meta" else self.cat_offsets.device
        self.cat_offsets = torch.tensor(offsets[: self.num_cat], dtype=torch.long, device=dev)
        self.pos_ids = torch.arange(self.num_fields + 1, dtype=torch.long, device=dev).unsqueeze(0)
        self.cat_limits = torch.tensor(self.cat_cardinalities, dtype=torch.long, device=dev)

    def embed(self, categorical_values=None, continuous_values=None, missing_mask=None) -> torch.Tensor:
        parts = []
        batch = None
        if self.num_cat:
            if categorical_values is None:
                raise ValueError(f"the tabular encoder expects categorical_values with {self.num_cat} columns")
            if categorical_values.shape[-1] != self.num_cat:
                raise ValueError(
                    f"categorical_values has {categorical_values.shape[-1]} columns, the model expects {self.num_cat}"
                )
            codes = categorical_values.long()
            if missing_mask is not None:
                codes = codes.masked_fill(missing_mask[:, : self.num_cat], 0)
            if self.check_codes and not torch.compiler.is_compiling():
                check_categorical_codes(codes, self.cat_limits)
            parts.append(self.cat_embedding(codes + self.cat_offsets))
            batch = codes.shape[0]
        if self.num_con:
            if continuous_values is None:
                raise ValueError(f"the tabular encoder expects continuous_values with {self.num_con} columns")
            if continuous_values.shape[-1] != self.num_con:
                raise ValueError(
                    f"continuous_values has {continuous_values.shape[-1]} columns, the model expects {self.num_con}"
                )
            parts.append(self.con_proj(continuous_values.unsqueeze(-1).to(self.con_proj.weight.dtype)))
            batch = continuous_values.shape[0]
        x = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        if missing_mask is not None:
            x = torch.where(missing_mask.unsqueeze(-1), self.mask_special_token.to(x.dtype), x)
        x = torch.cat([self.cls_token.expand(batch, -1, -1).to(x.dtype), x], dim=1)
        x = x + self.column_embedding(self.pos_ids)
        return self.dropout(self.norm(x))

    def attention_mask(self, missing_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """(B, 1, 1+F, 1+F) bool, True = may attend; None when nothing is masked."""
        if missing_mask is None:
            return None
        b, n = missing_mask.shape
        visible = torch.cat([missing_mask.new_ones(b, 1), ~missing_mask], dim=1)  # CLS always visible
        eye = torch.eye(n + 1, dtype=torch.bool, device=missing_mask.device)
        return (visible[:, None, :] | eye[None]).unsqueeze(1)

    def forward(self, categorical_values=None, continuous_values=None, missing_mask=None) -> torch.Tensor:
        if missing_mask is not None:
            missing_mask = missing_mask.bool()
            if missing_mask.shape[-1] != self.num_fields:
                raise ValueError(
                    f"missing_mask has {missing_mask.shape[-1]} columns, the model expects {self.num_fields} "
                    "(categorical first, then continuous)"
                )
        x = self.embed(categorical_values, continuous_values, missing_mask)
        mask = self.attention_mask(missing_mask)
        for block in self.transformer_blocks:
            x = block(x, attn_mask=mask)
        return x


# ------------------------------------------------------------------------------------------------
# STiL interaction layer (MITransformerLayer semantics)
class InteractionLayer(nn.Module):
    """One layer over three streams with shared weights (keys norm1, attn.qkv (bias), attn.proj,
    norm2, mlp.fc1, mlp.fc2): image tokens attend to image tokens only, tabular tokens to tabular
    tokens only, and the fused token(s) to [fused; image; tabular] (the only cross-modal path).
    Dropout after attention/projection, DropPath on every residual, MLP dropout = drop_path (as the
    original passes its drop_path value to the MLP)."""

    def __init__(
        self,
        dim: int = 512,
        num_heads: int = 4,
        mlp_ratio: float = 1.0,
        qkv_bias: bool = True,
        attn_drop: float = 0.1,
        proj_drop: float = 0.1,
        drop_path: float = 0.1,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, proj_drop)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop_path)

    @staticmethod
    def block_mask(n_fused: int, n_image: int, n_tabular: int, device=None) -> torch.Tensor:
        """(N, N) bool over [fused; image; tabular], True = may attend (built on ``device``: no
        host-to-device copy per step)."""
        position = torch.arange(n_fused + n_image + n_tabular, device=device)
        seg = (position >= n_fused).long() + (position >= n_fused + n_image).long()
        same = seg[:, None] == seg[None, :]
        return same | (seg[:, None] == 0)

    def _drop_path_per_stream(self, x: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
        if self.drop_path.p == 0.0 or not self.training:
            return x
        return torch.cat([self.drop_path(s) for s in x.split(list(sizes), dim=1)], dim=1)

    def forward(self, image_tokens: torch.Tensor, tabular_tokens: torch.Tensor, fused_tokens: torch.Tensor):
        sizes = (fused_tokens.shape[1], image_tokens.shape[1], tabular_tokens.shape[1])
        x = torch.cat([fused_tokens, image_tokens, tabular_tokens], dim=1)
        mask = self.block_mask(*sizes, device=x.device)
        x = x + self._drop_path_per_stream(self.attn(self.norm1(x), mask), sizes)
        x = x + self._drop_path_per_stream(self.mlp(self.norm2(x)), sizes)
        fused, image, tabular = x.split(list(sizes), dim=1)
        return image, tabular, fused


# ------------------------------------------------------------------------------------------------
# TIP multimodal encoder and heads
class MultimodalCrossEncoder(nn.Module):
    """TIP's ``encoder_multimodal``: image tokens -> image_proj + image_norm; tabular tokens
    (tabular_proj when widths differ) go through blocks of self-attention + cross-attention to the
    image tokens + MLP; final LayerNorm. Output (B, 1 + F, d); row 0 is the multimodal CLS."""

    def __init__(self, image_dim: int, tabular_dim: int, dim: int = 512, num_layers: int = 4, num_heads: int = 8, mlp_ratio: float = 4.0,
                 init_std: float = TIP_INIT_STD):
        super().__init__()
        self.image_proj = nn.Linear(image_dim, dim)
        self.image_norm = nn.LayerNorm(dim)
        self.tabular_proj = nn.Linear(tabular_dim, dim) if tabular_dim != dim else nn.Identity()
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(dim, num_heads, mlp_ratio, qkv_bias=False, cross_attention_dim=dim) for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(dim)
        _tag_modules(self, "tip", init_std)
        for m in self.modules():
            init_module_weights(m)

    def forward(self, tabular_tokens: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        if image_tokens.ndim == 4:
            image_tokens = image_tokens.flatten(2).transpose(1, 2)
        context = self.image_norm(self.image_proj(image_tokens))
        x = self.tabular_proj(tabular_tokens)
        for block in self.transformer_blocks:
            x = block(x, context=context)
        return self.norm(x)


class TabularPredictor(nn.Module):
    """TIP's reconstruction head: ``cat_classifier`` Linear(d, sum(cat lengths)) on categorical
    positions (one softmax over all slots), ``con_regressor`` Linear(d, 1) on continuous ones
    (CLS dropped)."""

    def __init__(self, dim: int, num_cat: int, num_unique_cat: int, init_std: float = TIP_INIT_STD):
        super().__init__()
        self.num_cat = num_cat
        self.cat_classifier = nn.Linear(dim, max(num_unique_cat, 1))
        self.con_regressor = nn.Linear(dim, 1)
        _tag_modules(self, "tip", init_std)
        for m in self.modules():
            init_module_weights(m)

    def forward(self, tokens: torch.Tensor):
        x = tokens[:, 1:]
        return self.cat_classifier(x[:, : self.num_cat]), self.con_regressor(x[:, self.num_cat :]).squeeze(-1)


class TwoLayerMLP(nn.Module):
    """Linear -> ReLU -> Linear with keys ``model.0`` / ``model.2`` (STiL's projection_* MLPs)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__()
        self.model = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))

    def forward(self, x):
        return self.model(x)


class SimCLRProjectionHead(nn.Module):
    """lightly 1.2.22's SimCLR head: Linear -> ReLU -> Linear (biases, no BatchNorm), keys
    ``layers.0`` / ``layers.2``."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, out_dim))

    def forward(self, x):
        return self.layers(x)


class LinearHead(nn.Linear):
    """A plain linear prediction head (keys weight/bias, as the originals' classifiers)."""


def compute_loss(logits: torch.Tensor, labels: torch.Tensor, problem_type: Optional[str], num_labels: int) -> torch.Tensor:
    """Supervised loss for a head's output, following ``config.problem_type``."""
    if problem_type is None:
        problem_type = "regression" if num_labels == 1 or labels.is_floating_point() else "single_label_classification"
    if problem_type == "single_label_classification":
        if labels.is_floating_point() and labels.ndim == logits.ndim:  # soft targets
            return F.cross_entropy(logits.float(), labels.float())
        return F.cross_entropy(logits.float(), labels.long().view(-1))
    if problem_type == "multi_label_classification":
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float())
    if problem_type == "regression":
        return F.mse_loss(logits.float().view_as(labels) if logits.numel() == labels.numel() else logits.float(), labels.float())
    raise ValueError(f"unknown problem_type {problem_type!r}")
