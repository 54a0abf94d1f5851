"""StilModel: exact original sizes, outputs, modality isolation, init, data checks, save/load,
remote code without our package, bf16 autocast, channels_last, torch.compile."""

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import torch.nn.functional as F

from modeling_stil.configuration_stil import StilConfig
from modeling_stil.encoders import ImageEncoder
from modeling_stil.modeling_stil import StilModel
from tests._helpers import assert_same_up_to_kernel_choice


def inputs(cfg, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    cat = torch.stack([torch.randint(0, c, (b,), generator=g) for c in cfg.cat_cardinalities], 1)
    return dict(
        pixel_values=torch.rand(b, cfg.num_channels, cfg.image_size, cfg.image_size, generator=g),
        categorical_values=cat,
        continuous_values=torch.randn(b, cfg.num_continuous, generator=g),
    )


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return StilModel(StilConfig.tiny()).eval()


def test_dvm_parameter_count_and_shapes():
    with torch.device("meta"):
        m = StilModel(StilConfig.dvm())
    assert sum(p.numel() for p in m.parameters()) == 42_952_090
    assert len(m.state_dict()) == 406
    assert sum(p.numel() for p in m.encoder_imaging.parameters()) == 23_508_032
    assert sum(p.numel() for p in m.encoder_tabular.parameters()) == 12_641_280
    assert sum(p.numel() for p in m.transformer.parameters()) == 1_577_984
    assert m.classifier_multimodal.weight.shape == (286, 1536)


def test_cardiac_shapes(tmp_path):
    lengths = [2, 3, 4, 2, 5, 2, 2, 3, 2, 2, 6, 2, 2, 2, 3, 2, 2, 2, 2, 2, 4, 2, 2, 2, 2, 2] + [1] * 49
    f = tmp_path / "lengths.pt"
    torch.save(torch.tensor(lengths), f)
    cfg = StilConfig.cardiac(str(f))
    with torch.device("meta"):
        m = StilModel(cfg)
    sd = m.state_dict()
    assert sd["encoder_tabular.column_embedding.weight"].shape == (76, 512)
    assert sd["encoder_tabular.cat_embedding.weight"].shape == (sum(lengths[:26]), 512)
    assert sd["classifier_imaging.weight"].shape == (2, 1024)
    expected = 42_952_090 - (286 - 2) * (1536 + 1024 + 1024 + 3) + (sum(lengths[:26]) - 50 + 76 - 18) * 512
    assert sum(p.numel() for p in m.parameters()) == expected
    with pytest.raises(ValueError, match="26 categorical"):
        StilConfig.cardiac([3] * 4 + [1] * 13)
    with pytest.raises(ValueError, match="not public"):
        StilConfig.cardiac()


def test_forward_outputs_and_loss(tiny):
    cfg = tiny.config
    x = inputs(cfg)
    labels = torch.tensor([0, 2])
    out = tiny(**x, labels=labels)
    d = cfg.hidden_size
    assert out.logits.shape == out.image_logits.shape == out.tabular_logits.shape == (2, 3)
    assert out.features.shape == (2, 3 * d)
    for k in ("image_specific", "image_specific_pre", "image_shared", "tabular_specific", "tabular_specific_pre", "tabular_shared", "fused_shared"):
        assert out[k].shape == (2, d), k
    torch.testing.assert_close(out.features, torch.cat([out.image_specific, out.fused_shared, out.tabular_specific], 1))
    torch.testing.assert_close(out.logits, tiny.classifier_multimodal(out.features))
    expected = sum(F.cross_entropy(l, labels) for l in (out.logits, out.image_logits, out.tabular_logits))
    torch.testing.assert_close(out.loss, expected)


def test_modality_isolation(tiny):
    cfg = tiny.config
    x = inputs(cfg, seed=1)
    with torch.no_grad():
        a = tiny(**x)
        y = dict(x, continuous_values=x["continuous_values"] + 3.0, categorical_values=(x["categorical_values"] + 1) % 3)
        b = tiny(**y)
        z = dict(x, pixel_values=torch.rand_like(x["pixel_values"]))
        c = tiny(**z)
    torch.testing.assert_close(a.image_logits, b.image_logits)
    torch.testing.assert_close(a.tabular_logits, c.tabular_logits)
    assert not torch.allclose(a.logits, b.logits) and not torch.allclose(a.logits, c.logits)
    assert not torch.allclose(a.tabular_logits, b.tabular_logits)


def test_missing_mask_hides_values(tiny):
    cfg = tiny.config
    x = inputs(cfg, seed=2)
    mask = torch.zeros(2, cfg.num_fields, dtype=torch.bool)
    mask[:, 3] = True  # a continuous field
    with torch.no_grad():
        a = tiny(**x, missing_mask=mask)
        con = x["continuous_values"].clone()
        con[:, 1] = 100.0  # the masked cell's value must not matter
        b = tiny(**dict(x, continuous_values=con), missing_mask=mask)
        c = tiny(**dict(x, continuous_values=con))
    torch.testing.assert_close(a.logits, b.logits)
    assert not torch.allclose(b.logits, c.logits)


def test_post_init_keeps_backbone_and_tip_init():
    torch.manual_seed(123)
    ref = ImageEncoder("resnet18", 3, {"channels": [8, 16, 32, 64]})
    torch.manual_seed(123)
    m = StilModel(StilConfig.tiny())
    for k, v in ref.state_dict().items():
        assert torch.equal(m.encoder_imaging.state_dict()[k], v), k
    w = m.encoder_tabular.transformer_blocks[0].mlp.fc1.weight
    # TIP's normal(0, initializer_range), not transformers' default: 0.08 in the tiny preset (TIP's
    # 0.02 scaled from d = 512 to d = 32, docs/models.md), 0.02 when asked for
    assert abs(w.std().item() - 0.08) < 0.016
    w = StilModel(StilConfig.tiny(initializer_range=0.02)).encoder_tabular.transformer_blocks[0].mlp.fc1.weight
    assert abs(w.std().item() - 0.02) < 0.004
    assert torch.all(m.encoder_tabular.transformer_blocks[0].mlp.fc1.bias == 0)
    # STiL's own layers keep PyTorch's default (uniform in ±1/sqrt(fan_in))
    bound = 1 / (m.reduce.in_features ** 0.5)
    assert m.reduce.weight.abs().max() <= bound and m.reduce.weight.std() > 0.5 * bound / 3 ** 0.5


def test_check_data_compatibility(tiny):
    from data_utils.io import DatasetMetadata
    from data_utils.schema import TabularField, TabularSchema

    good = TabularSchema([
        TabularField("a", "categorical", ["x", "y", "z"]), TabularField("b", "categorical", list("pqrs")),
        TabularField("c", "continuous"), TabularField("d", "continuous"), TabularField("e", "continuous"),
    ])
    meta = DatasetMetadata(task="classification", label_names=["l0", "l1", "l2"])
    tiny.check_data_compatibility(good, meta, num_channels=3)
    bad = TabularSchema([TabularField("a", "categorical", ["x", "y"]), TabularField("c", "continuous")])
    with pytest.raises(ValueError) as err:
        tiny.check_data_compatibility(bad, DatasetMetadata(task="classification", label_names=["a", "b"]), num_channels=1)
    msg = str(err.value)
    assert "field counts" in msg and "cardinality 3, data 2" in msg and "label count" in msg and "channels" in msg
    # a model built from the schema also checks names
    named = StilModel(StilConfig.tiny(tabular_schema=good.to_dict(), field_lengths=None))
    renamed = TabularSchema.from_dict(good.to_dict())
    renamed.fields[0].name = "zz"
    with pytest.raises(ValueError, match="column names"):
        named.check_data_compatibility(renamed)


def test_out_of_range_code_is_clear(tiny):
    x = inputs(tiny.config)
    x["categorical_values"][1, 1] = 4
    with pytest.raises(ValueError, match="row 1, categorical field 1 has code 4 but the field has 4 categories"):
        tiny(**x)


def test_save_load_bit_exact_no_pickle(tiny, tmp_path):
    tiny.save_pretrained(tmp_path)
    files = sorted(os.listdir(tmp_path))
    assert all(f.endswith((".json", ".safetensors", ".py")) for f in files), files
    assert {"configuration_stil.py", "modeling_stil.py", "encoders.py"} <= set(files)
    assert json.loads((tmp_path / "config.json").read_text())["auto_map"]["AutoModel"] == "modeling_stil.StilModel"
    loaded = StilModel.from_pretrained(tmp_path).eval()
    a = dict(tiny.named_parameters()) | dict(tiny.named_buffers())
    b = dict(loaded.named_parameters()) | dict(loaded.named_buffers())
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    x = inputs(tiny.config)
    with torch.no_grad():  # bit-equal weights (above); the outputs may come from another kernel path
        assert_same_up_to_kernel_choice(loaded(**x).logits, tiny(**x).logits)


REMOTE = textwrap.dedent(
    """
    import sys, importlib.abc
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "modeling_stil" or name.startswith("modeling_stil."):
                raise ImportError("blocked for the test: " + name)
    sys.meta_path.insert(0, Block())
    try:
        import modeling_stil
        raise SystemExit("modeling_stil still importable")
    except ImportError:
        pass
    import json, torch
    from transformers import AutoModel
    out = {}
    for name in sys.argv[1:]:
        m = AutoModel.from_pretrained(name, trust_remote_code=True)
        assert "modeling_stil" not in sys.modules
        out[name] = [type(m).__module__, {k: v.double().sum().item() for k, v in m.state_dict().items()}]
    print("RESULT" + json.dumps(out))
    """
)


def test_remote_code_without_package(tmp_path):
    from modeling_stil.modeling_tip import TipConfig, TipModel

    stil = StilModel(StilConfig.tiny())
    tip = TipModel(TipConfig.tiny())
    stil.save_pretrained(tmp_path / "stil")
    tip.save_pretrained(tmp_path / "tip")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    (tmp_path / "run.py").write_text(REMOTE)
    proc = subprocess.run([sys.executable, "-s", "run.py", str(tmp_path / "stil"), str(tmp_path / "tip")], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT", 1)[1])
    for model, name in ((stil, "stil"), (tip, "tip")):
        module, sums = result[str(tmp_path / name)]
        assert module.startswith("transformers_modules")
        assert sums == {k: v.double().sum().item() for k, v in model.state_dict().items()}


def test_bf16_autocast_and_channels_last(tiny):
    x = inputs(tiny.config)
    with torch.no_grad():
        ref = tiny(**x).logits
        m = tiny.to(memory_format=torch.channels_last)
        x_cl = dict(x, pixel_values=x["pixel_values"].to(memory_format=torch.channels_last))
        torch.testing.assert_close(m(**x_cl).logits, ref, atol=1e-5, rtol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(**x_cl)
    assert torch.isfinite(out.logits).all()
    assert (out.logits.float() - ref).abs().max() < 0.25


def test_torch_compile_forward(tiny):
    x = inputs(tiny.config)
    with torch.no_grad():
        ref = tiny(**x).logits
    torch._dynamo.reset()
    compiled = torch.compile(tiny, backend="aot_eager")
    start = time.time()
    with torch.no_grad():
        out = compiled(**x).logits
    if time.time() - start > 60:
        pytest.skip("compile took over 60 s on this machine")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
