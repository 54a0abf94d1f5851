"""Converter tests on fake original checkpoints.

The fake checkpoints are built here from hand-written original key names and shapes (not from our
modules), wrapped like Lightning files ({'state_dict', 'hyper_parameters'} with a pickled object
whose class cannot be imported at load time, as the originals' omegaconf DictConfig). Converted
models are compared with an independent functional re-computation of the original networks that
reads the original state dict directly (torchvision ResNet, TIP Transformer.py with its -1e9
additive mask, STiL's MITransformerLayer with three separate streams).
"""

import json
import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from modeling_stil.configuration_stil import DVM_FIELD_LENGTHS, StilConfig
from modeling_stil.convert_original import (
    METHOD_STATE_FILENAME,
    ConversionError,
    convert_stil_checkpoint,
    convert_tip_checkpoint,
    init_stil_encoders_from_tip,
    load_original_checkpoint,
    main,
    split_stil_state_dict,
)
from modeling_stil.modeling_stil import StilModel
from modeling_stil.modeling_tip import TipModel
from tests.helpers.original_shapes import resnet_shapes, tabular_shapes

# tiny original-shaped setting
LENGTHS = [3, 4, 1, 1, 1]  # 2 categorical + 3 continuous
D = 16  # tabular / hidden width
CH = (8, 16, 32, 64)  # narrow ResNet-18 (torchvision BasicBlock layout)
C = 5  # classes
TAB_HEADS, INTER_HEADS, MM_HEADS = 2, 4, 2
TINY_OVERRIDES = dict(
    image_encoder="resnet18",
    image_encoder_kwargs={"channels": list(CH)},
    image_size=64,
    tabular_num_heads=TAB_HEADS,
)


# ------------------------------------------------------------------------------------------------
# original key lists
def mlp_shapes(prefix, i, h, o, names=("model.0", "model.2")):
    return {f"{prefix}.{names[0]}.weight": (h, i), f"{prefix}.{names[0]}.bias": (h,), f"{prefix}.{names[1]}.weight": (o, h), f"{prefix}.{names[1]}.bias": (o,)}


def stil_backbone_shapes(image_shapes, image_dim, lengths, d, tab_layers, classes):
    s = {f"encoder_imaging.{k}": v for k, v in image_shapes.items()}
    s.update({f"encoder_tabular.{k}": v for k, v in tabular_shapes(lengths, d, tab_layers).items()})
    s.update(mlp_shapes("projection_si", image_dim, d, d))
    s.update(mlp_shapes("projection_ai", image_dim, d, d))
    s.update(mlp_shapes("projection_st", d, d, d))
    s.update(mlp_shapes("projection_at", d, d, d))
    s.update({"reduce.weight": (d, 2 * d), "reduce.bias": (d,)})
    p = "transformer.0"
    s.update({
        f"{p}.norm1.weight": (d,), f"{p}.norm1.bias": (d,),
        f"{p}.attn.qkv.weight": (3 * d, d), f"{p}.attn.qkv.bias": (3 * d,),
        f"{p}.attn.proj.weight": (d, d), f"{p}.attn.proj.bias": (d,),
        f"{p}.norm2.weight": (d,), f"{p}.norm2.bias": (d,),
        f"{p}.mlp.fc1.weight": (d, d), f"{p}.mlp.fc1.bias": (d,),
        f"{p}.mlp.fc2.weight": (d, d), f"{p}.mlp.fc2.bias": (d,),
    })
    s.update({
        "classifier_multimodal.weight": (classes, 3 * d), "classifier_multimodal.bias": (classes,),
        "classifier_imaging.weight": (classes, 2 * d), "classifier_imaging.bias": (classes,),
        "classifier_tabular.weight": (classes, 2 * d), "classifier_tabular.bias": (classes,),
    })
    return s


def stil_full_shapes(backbone, d, classes, proj=128, dvm=True):
    s = {"prototypes": (classes, proj), "prototypes_sum": (classes, proj), "prototypes_count_sum": (classes, 1)}
    s.update({f"model.{k}": v for k, v in backbone.items()})
    s.update(mlp_shapes("projector_multimodal", 3 * d, 3 * d, proj, ("layers.0", "layers.2")))
    for name in ("projector_imaging", "projector_tabular"):
        if dvm:
            s.update({f"{name}.weight": (proj, d), f"{name}.bias": (proj,)})
        else:
            s.update(mlp_shapes(name, d, d, proj, ("layers.0", "layers.2")))
    # the original's CLUBMean(d, d) keeps its default hidden_size=512 at any d
    s.update(mlp_shapes("CLUB_imaging", d, 512, d, ("p_mu.0", "p_mu.2")))
    s.update(mlp_shapes("CLUB_tabular", d, 512, d, ("p_mu.0", "p_mu.2")))
    s.update({f"ema.{k}": v for k, v in backbone.items()})
    return s


def tip_shapes(image_shapes, image_dim, lengths, d, tab_layers, mm_layers, proj):
    s = {f"encoder_imaging.{k}": v for k, v in image_shapes.items()}
    s.update(mlp_shapes("projector_imaging", image_dim, image_dim, proj, ("layers.0", "layers.2")))
    s.update({f"encoder_tabular.{k}": v for k, v in tabular_shapes(lengths, d, tab_layers).items()})
    s.update(mlp_shapes("projector_tabular", d, d, proj, ("layers.0", "layers.2")))
    m = {"image_proj.weight": (d, image_dim), "image_proj.bias": (d,), "image_norm.weight": (d,), "image_norm.bias": (d,), "norm.weight": (d,), "norm.bias": (d,)}
    for i in range(mm_layers):
        p = f"transformer_blocks.{i}"
        m.update({
            f"{p}.norm1.weight": (d,), f"{p}.norm1.bias": (d,), f"{p}.attn.qkv.weight": (3 * d, d),
            f"{p}.attn.proj.weight": (d, d), f"{p}.attn.proj.bias": (d,),
            f"{p}.cross_attn.kv_proj.weight": (2 * d, d), f"{p}.cross_attn.q_proj.weight": (d, d), f"{p}.cross_attn.q_proj.bias": (d,),
            f"{p}.cross_attn.proj.weight": (d, d), f"{p}.cross_attn.proj.bias": (d,),
            f"{p}.cross_norm.weight": (d,), f"{p}.cross_norm.bias": (d,),
            f"{p}.norm2.weight": (d,), f"{p}.norm2.bias": (d,),
            f"{p}.mlp.fc1.weight": (4 * d, d), f"{p}.mlp.fc1.bias": (4 * d,), f"{p}.mlp.fc2.weight": (d, 4 * d), f"{p}.mlp.fc2.bias": (d,),
        })
    s.update({f"encoder_multimodal.{k}": v for k, v in m.items()})
    n_cat = sum(x for x in lengths if x != 1)
    s.update({"predictor_tabular.cat_classifier.weight": (n_cat, d), "predictor_tabular.cat_classifier.bias": (n_cat,),
              "predictor_tabular.con_regressor.weight": (1, d), "predictor_tabular.con_regressor.bias": (1,),
              "itm_head.weight": (2, d), "itm_head.bias": (2,)})
    return s


def random_state(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in shapes.items():
        if k.endswith("num_batches_tracked"):
            out[k] = torch.tensor(7)
        elif k.endswith("running_var"):
            out[k] = torch.rand(shape, generator=g) + 0.5
        elif k.endswith(".weight") and len(shape) == 1:  # LayerNorm / BatchNorm scales
            out[k] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
            out[k] = torch.randn(shape, generator=g) / math.sqrt(max(fan_in, 1))
    return out


TINY_IMAGE = resnet_shapes("basic", (2, 2, 2, 2), CH, stem=64)
TINY_IMAGE_DIM = CH[-1]


def save_lightning(path, state):
    """Save like Lightning: hyper_parameters is a pickled object whose class is gone at load time."""
    mod = types.ModuleType("fake_omegaconf_for_test")

    class DictConfig:
        def __init__(self, content):
            self._content = content

    DictConfig.__module__ = mod.__name__
    DictConfig.__qualname__ = "DictConfig"
    mod.DictConfig = DictConfig
    sys.modules[mod.__name__] = mod
    try:
        torch.save({"epoch": 3, "state_dict": state, "hyper_parameters": DictConfig({"num_classes": C}), "pytorch-lightning_version": "1.6.4"}, path)
    finally:
        del sys.modules[mod.__name__]


# ------------------------------------------------------------------------------------------------
# functional reference of the original networks
def ref_bn(x, sd, p):
    return F.batch_norm(x, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"], sd[f"{p}.bias"], False, 0.0, 1e-5)


def ref_resnet_basic(x, sd, p="encoder_imaging."):
    x = F.relu(ref_bn(F.conv2d(x, sd[p + "conv1.weight"], stride=2, padding=3), sd, p + "bn1"))
    x = F.max_pool2d(x, 3, 2, 1)
    for li in range(1, 5):
        for b in range(2):
            q = f"{p}layer{li}.{b}"
            stride = 2 if (li > 1 and b == 0) else 1
            out = F.relu(ref_bn(F.conv2d(x, sd[q + ".conv1.weight"], stride=stride, padding=1), sd, q + ".bn1"))
            out = ref_bn(F.conv2d(out, sd[q + ".conv2.weight"], padding=1), sd, q + ".bn2")
            if q + ".downsample.0.weight" in sd:
                x = ref_bn(F.conv2d(x, sd[q + ".downsample.0.weight"], stride=stride), sd, q + ".downsample.1")
            x = F.relu(out + x)
    return x  # (B, C, H, W)


def ref_ln(x, sd, p):
    return F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], 1e-5)


def ref_lin(x, sd, p):
    return F.linear(x, sd[p + ".weight"], sd.get(p + ".bias"))


def ref_attn(x, sd, p, heads, mask=None):
    B, N, Cd = x.shape
    qkv = ref_lin(x, sd, p + ".qkv").reshape(B, N, 3, heads, Cd // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    a = (q @ k.transpose(-2, -1)) * (Cd // heads) ** -0.5
    if mask is not None:
        a = a + mask
    return ref_lin((a.softmax(-1) @ v).transpose(1, 2).reshape(B, N, Cd), sd, p + ".proj")


def ref_mlp(x, sd, p):
    return ref_lin(F.gelu(ref_lin(x, sd, p + ".fc1")), sd, p + ".fc2")


def ref_tabular(sd, x, lengths, heads, mask=None, p="encoder_tabular."):
    cat = [v for v in lengths if v != 1]
    n_cat = len(cat)
    offsets = torch.tensor([0] + cat[:-1]).cumsum(0)
    cat_x = F.embedding(x[:, :n_cat].long() + offsets, sd[p + "cat_embedding.weight"])
    con_x = ref_lin(x[:, n_cat:].unsqueeze(-1), sd, p + "con_proj")
    h = torch.cat([cat_x, con_x], 1)
    if mask is not None:
        m = mask.unsqueeze(-1)
        h = m * sd[p + "mask_special_token"].expand(h.shape[0], h.shape[1], -1) + (~m) * h
    h = torch.cat([sd[p + "cls_token"].expand(h.shape[0], -1, -1), h], 1)
    h = ref_ln(h + sd[p + "column_embedding.weight"][None], sd, p + "norm")
    add = None
    if mask is not None:
        B, N = mask.shape
        full = torch.cat([torch.zeros(B, 1, dtype=torch.bool), mask], 1)[:, None, :].repeat(1, N + 1, 1)
        full = full * (~torch.eye(N + 1, dtype=torch.bool))[None]
        add = full[:, None].float() * (-1e9)
    i = 0
    while f"{p}transformer_blocks.{i}.norm1.weight" in sd:
        q = f"{p}transformer_blocks.{i}"
        h = h + ref_attn(ref_ln(h, sd, q + ".norm1"), sd, q + ".attn", heads, add)
        h = h + ref_mlp(ref_ln(h, sd, q + ".norm2"), sd, q + ".mlp")
        i += 1
    return h


def ref_stil(sd, img, tab, lengths, tab_heads, inter_heads, mask=None):
    fmap = ref_resnet_basic(img, sd)
    B, Cc, H, W = fmap.shape
    x_i = fmap.reshape(B, Cc, H * W).permute(0, 2, 1)
    x_t = ref_tabular(sd, tab, lengths, tab_heads, mask)
    mlp2 = lambda x, p: ref_lin(F.relu(ref_lin(x, sd, p + ".model.0")), sd, p + ".model.2")  # noqa: E731
    x_si, x_ai = mlp2(x_i, "projection_si"), mlp2(x_i.mean(1), "projection_ai")
    x_st, x_at = mlp2(x_t[:, 1:], "projection_st"), mlp2(x_t[:, 0], "projection_at")
    x_c = ref_lin(torch.cat([x_ai, x_at], 1), sd, "reduce").unsqueeze(1)
    pre_i, pre_t = x_si.mean(1), x_st.mean(1)
    p = "transformer.0"
    n1 = [ref_ln(s, sd, p + ".norm1") for s in (x_si, x_st, x_c)]

    def qkv(x):
        b, n, c = x.shape
        t = ref_lin(x, sd, p + ".attn.qkv").reshape(b, n, 3, inter_heads, c // inter_heads).permute(2, 0, 3, 1, 4)
        return t[0], t[1], t[2]

    (qh, kh, vh), (qp, kp, vp), (qg, kg, vg) = (qkv(s) for s in n1)
    sc = (x_c.shape[-1] // inter_heads) ** -0.5
    merge = lambda a, v: (a.softmax(-1) @ v).transpose(1, 2).flatten(2)  # noqa: E731
    ah = merge(qh @ kh.transpose(-2, -1) * sc, vh)
    ap = merge(qp @ kp.transpose(-2, -1) * sc, vp)
    ag = merge(qg @ torch.cat([kg, kh, kp], 2).transpose(-2, -1) * sc, torch.cat([vg, vh, vp], 2))
    x_si = x_si + ref_lin(ah, sd, p + ".attn.proj")
    x_st = x_st + ref_lin(ap, sd, p + ".attn.proj")
    x_c = x_c + ref_lin(ag, sd, p + ".attn.proj")
    x_si, x_st, x_c = (s + ref_mlp(ref_ln(s, sd, p + ".norm2"), sd, p + ".mlp") for s in (x_si, x_st, x_c))
    zi, zt, zc = x_si.mean(1), x_st.mean(1), x_c.mean(1)
    return dict(
        logits=ref_lin(torch.cat([zi, zc, zt], 1), sd, "classifier_multimodal"),
        image_logits=ref_lin(torch.cat([zi, x_ai], 1), sd, "classifier_imaging"),
        tabular_logits=ref_lin(torch.cat([zt, x_at], 1), sd, "classifier_tabular"),
        image_specific_pre=pre_i, tabular_specific_pre=pre_t, image_shared=x_ai, tabular_shared=x_at, fused_shared=zc,
    )


def ref_tip(sd, img, tab, lengths, tab_heads, mm_heads, mask=None):
    fmap = ref_resnet_basic(img, sd)
    pooled = fmap.mean((2, 3))
    proj_i = ref_lin(F.relu(ref_lin(pooled, sd, "projector_imaging.layers.0")), sd, "projector_imaging.layers.2")
    x_t = ref_tabular(sd, tab, lengths, tab_heads, mask)
    proj_t = ref_lin(F.relu(ref_lin(x_t[:, 0], sd, "projector_tabular.layers.0")), sd, "projector_tabular.layers.2")
    p = "encoder_multimodal."
    img_tok = ref_ln(ref_lin(fmap.flatten(2).transpose(1, 2), sd, p + "image_proj"), sd, p + "image_norm")
    x = x_t
    for i in range(2):
        q = f"{p}transformer_blocks.{i}"
        x = x + ref_attn(ref_ln(x, sd, q + ".norm1"), sd, q + ".attn", mm_heads)
        y = ref_ln(x, sd, q + ".cross_norm")
        B, Nk, K = img_tok.shape
        kv = F.linear(img_tok, sd[q + ".cross_attn.kv_proj.weight"]).reshape(B, Nk, 2, mm_heads, K // mm_heads).permute(2, 0, 3, 1, 4)
        qq = ref_lin(y, sd, q + ".cross_attn.q_proj").reshape(B, y.shape[1], mm_heads, K // mm_heads).permute(0, 2, 1, 3)
        a = ((qq @ kv[0].transpose(-2, -1)) * (K // mm_heads) ** -0.5).softmax(-1)
        x = x + ref_lin((a @ kv[1]).transpose(1, 2).reshape(B, y.shape[1], K), sd, q + ".cross_attn.proj")
        x = x + ref_mlp(ref_ln(x, sd, q + ".norm2"), sd, q + ".mlp")
    x = ref_ln(x, sd, p + "norm")
    n_cat = len([v for v in lengths if v != 1])
    return dict(
        image_projection=proj_i, tabular_projection=proj_t, multimodal_tokens=x,
        itm_logits=ref_lin(x[:, 0], sd, "itm_head"),
        cat_logits=ref_lin(x[:, 1:][:, :n_cat], sd, "predictor_tabular.cat_classifier"),
        con_predictions=ref_lin(x[:, 1:][:, n_cat:], sd, "predictor_tabular.con_regressor").squeeze(-1),
    )


def tiny_inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    img = torch.rand(3, 3, 64, 64, generator=g)
    cat = torch.stack([torch.randint(0, 3, (3,), generator=g), torch.randint(0, 4, (3,), generator=g)], 1)
    con = torch.randn(3, 3, generator=g)
    mask = torch.tensor([[0, 1, 0, 0, 1], [0, 0, 0, 0, 0], [1, 0, 1, 1, 0]], dtype=torch.bool)
    return img, cat, con, mask


@pytest.fixture(scope="module")
def stil_ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("stil_ckpt")
    backbone = stil_backbone_shapes(TINY_IMAGE, TINY_IMAGE_DIM, LENGTHS, D, 2, C)
    shapes = stil_full_shapes(backbone, D, C, proj=8, dvm=True)
    state = random_state(shapes, seed=0)
    # the teacher differs from the student
    for k in list(state):
        if k.startswith("ema.") and state[k].is_floating_point():
            state[k] = state[k] * 0.9
    path = d / "stil.ckpt"
    save_lightning(path, state)
    lengths_file = d / "lengths.pt"
    torch.save(torch.tensor(LENGTHS, dtype=torch.float), lengths_file)
    return path, lengths_file, state


# ------------------------------------------------------------------------------------------------
def test_dvm_key_list_and_method_split():
    with torch.device("meta"):
        model = StilModel(StilConfig.dvm())
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    backbone = stil_backbone_shapes(resnet_shapes("bottleneck", (3, 4, 6, 3), (64, 128, 256, 512)), 2048, DVM_FIELD_LENGTHS, 512, 4, 286)
    assert ours == backbone  # names and shapes of the original DisCoAttentionBackbone
    full = stil_full_shapes(backbone, 512, 286)
    assert len(full) == 831
    fake = {k: torch.empty(v, device="meta") for k, v in full.items()}
    bb, method = split_stil_state_dict(fake, "student")
    assert len(bb) == 406 and len(method) == 425 and "ema.reduce.weight" in method and "prototypes" in method
    cardiac = stil_full_shapes(stil_backbone_shapes(resnet_shapes("bottleneck", (3, 4, 6, 3), (64, 128, 256, 512)), 2048, [2] * 26 + [1] * 49, 512, 4, 2), 512, 2, dvm=False)
    assert len(cardiac) == 835


def test_restricted_loader_reads_lightning_file(stil_ckpt):
    path, _, state = stil_ckpt
    with pytest.raises(Exception):
        torch.load(path, weights_only=True)
    with pytest.raises(ModuleNotFoundError):
        torch.load(path, weights_only=False)
    loaded, how = load_original_checkpoint(path)
    assert "restricted" in how and set(loaded) == set(state)
    assert all(torch.equal(loaded[k], state[k]) for k in state)


@pytest.mark.parametrize("weights", ["student", "teacher"])
def test_stil_conversion_matches_reference(stil_ckpt, tmp_path, weights):
    path, lengths_file, state = stil_ckpt
    model, method, report = convert_stil_checkpoint(
        path, str(lengths_file), tmp_path / "out", num_classes=C, weights=weights,
        interaction_num_heads=INTER_HEADS, **TINY_OVERRIDES,
    )
    prefix = "model." if weights == "student" else "ema."
    sd = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    img, cat, con, mask = tiny_inputs()
    tab = torch.cat([cat.float(), con], 1)
    with torch.no_grad():
        for m in (None, mask):
            ref = ref_stil(sd, img, tab, LENGTHS, TAB_HEADS, INTER_HEADS, m)
            out = model(img, cat, con, missing_mask=m)
            for k, v in ref.items():
                torch.testing.assert_close(out[k], v, atol=2e-5, rtol=1e-4, msg=k)
    side = tmp_path / "out" / METHOD_STATE_FILENAME
    from safetensors.torch import load_file

    saved = load_file(str(side))
    other = "ema." if weights == "student" else "model."
    assert set(saved) == {k for k in state if not k.startswith(prefix)}
    assert any(k.startswith(other) for k in saved) and torch.equal(saved["prototypes"], state["prototypes"])
    assert report["tensors_in_model"] == len(sd)
    assert json.loads((tmp_path / "out" / "conversion.json").read_text())["weights"] == weights
    reloaded = StilModel.from_pretrained(tmp_path / "out")
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in model.state_dict().items())


def test_leftover_and_missing_keys_refused(stil_ckpt, tmp_path):
    _, lengths_file, state = stil_ckpt
    extra = dict(state, **{"queue_ptr": torch.zeros(1)})
    save_lightning(tmp_path / "extra.ckpt", extra)
    with pytest.raises(ConversionError, match="queue_ptr"):
        convert_stil_checkpoint(tmp_path / "extra.ckpt", str(lengths_file), interaction_num_heads=INTER_HEADS, **TINY_OVERRIDES)
    missing = {k: v for k, v in state.items() if k != "model.reduce.bias"}
    save_lightning(tmp_path / "missing.ckpt", missing)
    with pytest.raises(ConversionError, match=r"missing \(1\).*reduce\.bias"):
        convert_stil_checkpoint(tmp_path / "missing.ckpt", str(lengths_file), interaction_num_heads=INTER_HEADS, **TINY_OVERRIDES)


def test_wrong_field_lengths_named(stil_ckpt, tmp_path):
    path, _, _ = stil_ckpt
    bad = tmp_path / "bad.pt"
    torch.save(torch.tensor([3, 5, 1, 1, 1]), bad)  # 8 category slots instead of 7
    with pytest.raises(ConversionError, match=r"encoder_tabular\.cat_embedding\.weight: checkpoint \(7, 16\) vs model \(8, 16\)"):
        convert_stil_checkpoint(path, str(bad), interaction_num_heads=INTER_HEADS, **TINY_OVERRIDES)
    fewer = tmp_path / "fewer.pt"
    torch.save([3, 4, 1, 1], fewer)
    with pytest.raises(ConversionError, match="column_embedding"):
        convert_stil_checkpoint(path, str(fewer), interaction_num_heads=INTER_HEADS, **TINY_OVERRIDES)
    with pytest.raises(ConversionError, match="--num-classes 7"):
        convert_stil_checkpoint(path, LENGTHS, num_classes=7, interaction_num_heads=INTER_HEADS, **TINY_OVERRIDES)


@pytest.fixture(scope="module")
def tip_ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("tip_ckpt")
    state = random_state(tip_shapes(TINY_IMAGE, TINY_IMAGE_DIM, LENGTHS, D, 2, 2, 8), seed=3)
    path = d / "tip.ckpt"
    save_lightning(path, state)
    return path, state


def test_tip_conversion_matches_reference(tip_ckpt, tmp_path):
    path, state = tip_ckpt
    model, report = convert_tip_checkpoint(path, LENGTHS, tmp_path / "tip", multimodal_num_heads=MM_HEADS, **TINY_OVERRIDES)
    assert report["tensors_in_model"] == len(state)
    img, cat, con, mask = tiny_inputs(2)
    with torch.no_grad():
        out = model(img, cat, con, missing_mask=mask)
        ref = ref_tip(state, img, torch.cat([cat.float(), con], 1), LENGTHS, TAB_HEADS, MM_HEADS, mask)
    for k, v in ref.items():
        torch.testing.assert_close(out[k], v, atol=2e-5, rtol=1e-4, msg=k)
    reloaded = TipModel.from_pretrained(tmp_path / "tip")
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in model.state_dict().items())


def test_stil_encoders_from_tip(tip_ckpt):
    path, state = tip_ckpt
    model = StilModel(StilConfig.tiny(field_lengths=LENGTHS, tabular_embedding_dim=D, hidden_size=D, **TINY_OVERRIDES))
    before = model.reduce.weight.clone()
    init_stil_encoders_from_tip(model, str(path))
    for k, v in model.encoder_imaging.state_dict().items():
        assert torch.equal(v, state["encoder_imaging." + k])
    for k, v in model.encoder_tabular.state_dict().items():
        assert torch.equal(v, state["encoder_tabular." + k])
    assert torch.equal(model.reduce.weight, before)  # nothing else touched
    wrong = StilModel(StilConfig.tiny(field_lengths=[3, 5, 1, 1, 1], tabular_embedding_dim=D, hidden_size=D, **TINY_OVERRIDES))
    with pytest.raises(ConversionError, match="cat_embedding"):
        init_stil_encoders_from_tip(wrong, state)


def test_tip_lightly_batchnorm_refused(tip_ckpt, tmp_path):
    _, state = tip_ckpt
    bad = dict(state)
    bad["projector_imaging.layers.1.running_mean"] = torch.zeros(TINY_IMAGE_DIM)
    save_lightning(tmp_path / "bn.ckpt", bad)
    with pytest.raises(ConversionError, match="lightly"):
        convert_tip_checkpoint(tmp_path / "bn.ckpt", LENGTHS, **TINY_OVERRIDES)


def test_cli_refuses_and_converts(stil_ckpt, tmp_path, capsys):
    path, lengths_file, _ = stil_ckpt
    # the CLI uses the originals' fixed head counts (8 tabular, 4 interaction): our tiny width 16 works with both
    rc = main(["--kind", "stil", "--checkpoint", str(path), "--field-lengths", str(lengths_file), "--output", str(tmp_path / "cli"),
               "--image-encoder", "resnet18", "--num-classes", "9"])
    assert rc == 2 and "conversion refused" in capsys.readouterr().out
    overrides = json.dumps({"image_encoder_kwargs": TINY_OVERRIDES["image_encoder_kwargs"], "tabular_num_heads": TAB_HEADS})
    rc = main(["--kind", "stil", "--checkpoint", str(path), "--field-lengths", str(lengths_file), "--output", str(tmp_path / "cli"),
               "--image-encoder", "resnet18", "--image-size", "64", "--num-classes", str(C), "--config-json", overrides])
    assert rc == 0
    model = StilModel.from_pretrained(tmp_path / "cli")
    assert model.config.field_lengths == LENGTHS and model.config.num_labels == C
    assert (tmp_path / "cli" / METHOD_STATE_FILENAME).is_file()


def test_converted_stil_checkpoint_continues_with_init_from(stil_ckpt, tmp_path):
    """The --init_from path of a run: a freshly built STiL model and method receive the converted
    student (every tensor, same family), EMA teacher, projectors, CLUB estimators and prototypes."""
    from modeling_stil.methods.base import DataInfo
    from modeling_stil.methods.stil import Stil, StilArguments
    from modeling_stil.pretrained_init import init_from_pretrained

    path, lengths_file, state = stil_ckpt
    convert_stil_checkpoint(path, str(lengths_file), tmp_path / "out", num_classes=C, weights="student",
                            interaction_num_heads=INTER_HEADS, **TINY_OVERRIDES)
    torch.manual_seed(0)
    fresh = StilModel(StilModel.from_pretrained(tmp_path / "out").config)  # what build_model makes: random weights
    report = init_from_pretrained(fresh, tmp_path / "out")
    assert not report["not_initialised"]
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, state["model." + key]), key

    method = Stil(fresh, StilArguments(projection_dim=8, unimodal_projector="linear"))
    method.setup(DataInfo(num_labeled=10, num_unlabeled=70, labeled_batch_size=2, unlabeled_batch_size=14, num_labels=C))
    restored = method.init_from_pretrained(str(tmp_path / "out"))
    assert restored["loaded"]
    own = method.state_dict()
    for key, value in state.items():
        if key.startswith("ema."):
            assert torch.equal(own["ema.module." + key[4:]], value), key
        elif key.startswith(("projector_", "CLUB_")) or key in ("prototypes", "prototypes_sum", "prototypes_count_sum"):
            assert torch.equal(own[key].to(value.dtype), value), key
