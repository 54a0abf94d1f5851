"""TipModel: original sizes and key layout, the pieces a TIP method needs, masking, save/load."""

import torch

from modeling_stil.modeling_tip import TipConfig, TipModel


def _inputs(b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        pixel_values=torch.rand(b, 3, 64, 64, generator=g),
        categorical_values=torch.stack([torch.randint(0, 3, (b,), generator=g), torch.randint(0, 4, (b,), generator=g)], 1),
        continuous_values=torch.randn(b, 3, generator=g),
    )


def test_dvm_sizes_and_prefixes():
    with torch.device("meta"):
        m = TipModel(TipConfig.dvm())
    sd = m.state_dict()
    prefixes = {k.split(".")[0] for k in sd}
    assert prefixes == {"encoder_imaging", "projector_imaging", "encoder_tabular", "projector_tabular", "encoder_multimodal", "predictor_tabular", "itm_head"}
    assert sum(k.startswith("encoder_imaging.") for k in sd) == 318
    assert sum(k.startswith("encoder_tabular.") for k in sd) == 52
    assert sd["projector_imaging.layers.0.weight"].shape == (2048, 2048)
    assert sd["projector_imaging.layers.2.weight"].shape == (128, 2048)
    assert sd["projector_tabular.layers.0.weight"].shape == (512, 512)
    assert sd["encoder_multimodal.image_proj.weight"].shape == (512, 2048)
    assert sd["encoder_multimodal.transformer_blocks.3.cross_attn.kv_proj.weight"].shape == (1024, 512)
    assert "encoder_multimodal.transformer_blocks.0.attn.qkv.bias" not in sd
    assert sd["predictor_tabular.cat_classifier.weight"].shape == (50, 512)
    assert sum(p.numel() for p in m.parameters()) == 58_820_469


def test_outputs_and_building_blocks():
    torch.manual_seed(0)
    m = TipModel(TipConfig.tiny()).eval()
    x = _inputs()
    with torch.no_grad():
        out = m(**x)
        assert out.image_tokens.shape == (3, 4, 64) and out.image_pooled.shape == (3, 64)
        assert out.image_projection.shape == out.tabular_projection.shape == (3, 16)
        assert out.tabular_tokens.shape == out.multimodal_tokens.shape == (3, 6, 32)
        assert out.itm_logits.shape == (3, 2)
        assert out.cat_logits.shape == (3, 2, 7) and out.con_predictions.shape == (3, 3)
        torch.testing.assert_close(out.image_pooled, out.image_tokens.mean(1))
        torch.testing.assert_close(out.multimodal_cls, out.multimodal_tokens[:, 0])
        # a negative pair through the building blocks: shuffled image tokens change the fusion
        neg = m.fuse(out.tabular_tokens, out.image_tokens.roll(1, 0))
        assert not torch.allclose(m.itm_logits(neg), out.itm_logits)
        # unimodal calls give only their own pieces
        only_img = m(pixel_values=x["pixel_values"])
        assert only_img.tabular_tokens is None and only_img.multimodal_tokens is None
        torch.testing.assert_close(only_img.image_projection, out.image_projection)


def test_mask_hides_masked_fields_from_others():
    torch.manual_seed(0)
    m = TipModel(TipConfig.tiny()).eval()
    x = _inputs()
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[:, 0] = True
    with torch.no_grad():
        a = m.encode_tabular(x["categorical_values"], x["continuous_values"], mask)[0]
        cat = x["categorical_values"].clone()
        cat[:, 0] = (cat[:, 0] + 1) % 3
        b = m.encode_tabular(cat, x["continuous_values"], mask)[0]
        c = m.encode_tabular(cat, x["continuous_values"])[0]
    torch.testing.assert_close(a, b)  # masked value irrelevant
    assert not torch.allclose(b, c)


def test_save_load_bit_exact(tmp_path):
    m = TipModel(TipConfig.tiny())
    m.save_pretrained(tmp_path)
    assert all(f.endswith((".json", ".safetensors", ".py")) for f in __import__("os").listdir(tmp_path))
    n = TipModel.from_pretrained(tmp_path)
    a = dict(m.named_parameters()) | dict(m.named_buffers())
    b = dict(n.named_parameters()) | dict(n.named_buffers())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert n.config.projection_dim == 16 and n.config.field_lengths == [3, 4, 1, 1, 1]
    n.check_data_compatibility(metadata={"task": "classification", "label_names": ["a"]})  # labels not needed for TIP
