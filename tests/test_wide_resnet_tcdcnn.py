"""WRN-28-2 and TCDCNN: sizes, layer shapes, documented quirks, init, losses, round trips, checks."""

import math
import os

import pytest
import torch
import torch.nn.functional as F

import modeling_stil  # noqa: F401  (registers the Auto classes)
from modeling_stil.configuration_baselines import DataCompatibilityError
from modeling_stil.configuration_tcdcnn import TCDCNNConfig
from modeling_stil.configuration_wide_resnet import WideResNetConfig
from modeling_stil.modeling_tcdcnn import TCDCNNForLandmarkRegression
from modeling_stil.modeling_wide_resnet import WideResNetForImageClassification

TINY_WRN = dict(depth=10, widen_factor=2, base_channels=8)


def _count(model):
    return sum(p.numel() for p in model.parameters())


def test_parameter_counts_match_the_reference():
    assert _count(WideResNetForImageClassification(WideResNetConfig())) == 1_469_626
    assert _count(TCDCNNForLandmarkRegression(TCDCNNConfig())) == 285_586


def test_wrn_28_2_layer_shapes_and_init():
    torch.manual_seed(0)
    model = WideResNetForImageClassification(WideResNetConfig()).eval()
    assert len(model.block1.layer) == 4 and model.config.channels == [16, 32, 64, 128]
    shapes = {}
    for name in ("conv1", "block1", "block2", "block3"):
        getattr(model, name).register_forward_hook(lambda m, i, o, name=name: shapes.__setitem__(name, tuple(o.shape[1:])))
    out = model(torch.randn(2, 3, 32, 32))
    assert shapes == {"conv1": (16, 32, 32), "block1": (32, 32, 32), "block2": (64, 16, 16), "block3": (128, 8, 8)}
    assert out.logits.shape == (2, 10) and out.features.shape == (2, 128)
    assert model.conv1.bias is None and model.block1.layer[0].conv1.bias is not None
    assert model.block1.layer[1].convShortcut is None and model.block2.layer[0].convShortcut.kernel_size == (1, 1)
    bn = model.block3.layer[1].bn2
    assert bn.momentum == 0.001 and bn.eps == 1e-5
    # He fan-out: std sqrt(2 / (9 * 128)) for a 128 -> 128 3x3 conv (147k samples)
    w = model.block3.layer[1].conv2.weight
    assert abs(w.std().item() / math.sqrt(2 / (9 * 128)) - 1) < 0.02
    bias = model.block3.layer[1].conv2.bias  # PyTorch default: uniform(+-1/sqrt(fan_in))
    assert bias.abs().max() <= 1 / math.sqrt(128 * 9) and bias.abs().max() > 0
    assert torch.all(model.fc.bias == 0) and torch.all(model.bn1.weight == 1)
    assert abs(model.fc.weight.std().item() / math.sqrt(2 / (128 + 10)) - 1) < 0.15  # xavier normal


def test_wrn_quirk_activate_before_residual_feeds_the_shortcut():
    torch.manual_seed(0)
    model = WideResNetForImageClassification(WideResNetConfig(**TINY_WRN)).eval()
    block = model.block1.layer[0]
    for bn in (block.bn1, block.bn2):  # non-trivial statistics so a wrong branch shows
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 8, 8, 8)  # block1 maps 8 -> 16 channels
    act = F.leaky_relu(block.bn1(x), 0.1)
    expected = block.convShortcut(act) + block.conv2(F.leaky_relu(block.bn2(block.conv1(act)), 0.1))
    torch.testing.assert_close(block(x), expected)
    wrong = block.convShortcut(x) + block.conv2(F.leaky_relu(block.bn2(block.conv1(act)), 0.1))
    assert not torch.allclose(block(x), wrong)


def test_wrn_quirk_dead_bn_in_later_channel_changing_blocks():
    torch.manual_seed(0)
    model = WideResNetForImageClassification(WideResNetConfig(**TINY_WRN))
    dead = model.block2.layer[0].bn1
    live = model.block2.layer[0].bn2
    model.train()
    out = model(torch.randn(4, 3, 32, 32), labels=torch.tensor([0, 1, 2, 3]))
    out.loss.backward()
    assert dead.weight.grad is None and dead.bias.grad is None  # never gets gradients
    assert live.weight.grad is not None and model.block1.layer[0].bn1.weight.grad is not None
    assert dead.num_batches_tracked.item() == 1 and dead.running_mean.abs().sum() > 0  # stats still updated
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    before = model(x).logits
    with torch.no_grad():
        dead.weight.mul_(3.0).add_(1.0)
        dead.running_mean.add_(5.0)
    torch.testing.assert_close(model(x).logits, before, rtol=0, atol=0)


def test_tcdcnn_layers_hardtanh_and_mse_loss():
    torch.manual_seed(0)
    model = TCDCNNForLandmarkRegression(TCDCNNConfig())
    assert model.config.problem_type == "regression" and model.config.num_channels == 1
    assert model.config.image_mean == [0.0] and model.config.image_std == [1.0]
    shapes = []
    for conv in model.convs:
        conv.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape[1:])))
    x = torch.rand(3, 1, 60, 60) * 50  # large inputs: conv outputs saturate the clamp
    labels = torch.randn(3, 10)
    out = model(x, labels=labels)
    assert shapes == [(20, 56, 56), (48, 24, 24), (64, 10, 10), (80, 3, 3)]
    assert out.image_features.shape == (3, 720) and out.features.shape == (3, 256) and out.logits.shape == (3, 10)
    torch.testing.assert_close(out.loss, F.mse_loss(out.logits, labels))
    torch.testing.assert_close(out.logits, model.linear(model.fc(out.image_features)))  # fc has no activation
    # no BatchNorm/dropout: train and eval mode agree
    torch.testing.assert_close(model.eval()(x).logits, out.logits)
    bound = 1 / math.sqrt(25)
    assert model.convs[0].weight.abs().max() <= bound and model.convs[0].bias.abs().max() <= bound
    with torch.no_grad():  # saturate the last conv: hardtanh clamps the features to [-1, 1]
        model.convs[-1].weight.mul_(1000)
    features = model(x).image_features
    assert features.abs().max() == 1.0 and (features.abs() == 1.0).float().mean() > 0.5


@pytest.mark.parametrize("kind", ["wrn", "tcdcnn"])
def test_round_trip_is_bit_exact(tmp_path, kind):
    from transformers import AutoModel, AutoModelForImageClassification

    torch.manual_seed(0)
    if kind == "wrn":
        model = WideResNetForImageClassification(WideResNetConfig(**TINY_WRN, id2label={0: "a", 1: "b", 2: "c"}))
        x = torch.randn(4, 3, 32, 32)
    else:
        model = TCDCNNForLandmarkRegression(TCDCNNConfig())
        x = torch.rand(4, 1, 60, 60)
    model.train()
    model(x)  # move BN running statistics away from their initial values
    model.save_pretrained(tmp_path)
    files = sorted(os.listdir(tmp_path))
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt", ".pth")) for f in files)
    loaded = AutoModel.from_pretrained(tmp_path)
    assert type(loaded) is type(model)
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    for key in original:
        assert torch.equal(original[key], restored[key]), key
    model.eval(), loaded.eval()
    assert torch.equal(model(x).logits, loaded(x).logits)
    if kind == "wrn":
        assert type(AutoModelForImageClassification.from_pretrained(tmp_path)) is WideResNetForImageClassification
        assert loaded.config.id2label == {0: "a", 1: "b", 2: "c"}


def test_channels_last_bf16_and_compile_match_eager():
    torch.manual_seed(0)
    model = WideResNetForImageClassification(WideResNetConfig(**TINY_WRN)).eval()
    x = torch.randn(2, 3, 32, 32)
    reference = model(x).logits
    cl = model.to(memory_format=torch.channels_last)
    torch.testing.assert_close(cl(x.contiguous(memory_format=torch.channels_last)).logits, reference, rtol=1e-4, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(x).logits
    assert torch.isfinite(low).all() and torch.allclose(low.float(), reference, atol=0.1, rtol=0.1)
    tcdcnn = TCDCNNForLandmarkRegression(TCDCNNConfig()).eval()
    y = torch.rand(2, 1, 60, 60)
    backend = "inductor" if os.environ.get("STIL_SLOW_TESTS") else "aot_eager"
    compiled = torch.compile(tcdcnn, backend=backend, fullgraph=True)
    torch.testing.assert_close(compiled(y).logits, tcdcnn(y).logits, rtol=1e-5, atol=1e-6)


def test_data_compatibility_lists_every_difference():
    from data_utils.io import DatasetMetadata

    tcdcnn = TCDCNNForLandmarkRegression(TCDCNNConfig())
    tcdcnn.check_data_compatibility(None, DatasetMetadata(task="landmarks", num_targets=10))
    with pytest.raises(DataCompatibilityError) as error:
        tcdcnn.check_data_compatibility(None, DatasetMetadata(task="classification", label_names=["a", "b"]))
    message = str(error.value)
    assert "label count" in message and "problem type" in message and "image channels: model 1 vs data 3" in message
    wrn = WideResNetForImageClassification(WideResNetConfig(**TINY_WRN))
    wrn.check_data_compatibility(None, DatasetMetadata(label_names=[str(i) for i in range(10)]))
    with pytest.raises(DataCompatibilityError, match="label count: model 10 classes vs data 3"):
        wrn.check_data_compatibility(None, DatasetMetadata(label_names=["a", "b", "c"]))
    with pytest.raises(DataCompatibilityError, match="needs images"):
        wrn.check_data_compatibility(None, DatasetMetadata(image_column=None, label_names=[str(i) for i in range(10)]))


REMOTE_LOADER = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('modeling_stil', 'data_utils'):
            raise ImportError('blocked ' + name)
sys.meta_path.insert(0, Block())
import torch
from transformers import AutoModel, AutoModelForImageClassification
for folder, auto in zip(sys.argv[1::2], sys.argv[2::2]):
    cls = AutoModelForImageClassification if auto == 'image' else AutoModel
    model = cls.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__module__.startswith('transformers_modules'), type(model).__module__
    expected = torch.load(folder + '/expected.pt', weights_only=True)
    with torch.no_grad():  # another process may run other kernels: 16 ulps of the logits' scale
        logits = model(**expected['inputs']).logits
    atol = 16 * torch.finfo(logits.dtype).eps * max(1.0, expected['logits'].abs().max().item())
    torch.testing.assert_close(logits, expected['logits'], rtol=0, atol=atol, msg=folder)
print('remote ok')
"""


def test_remote_code_loads_without_the_library(tmp_path):
    """save_pretrained ships the code: a process that cannot import stil still loads the models."""
    import subprocess
    import sys

    from modeling_stil.presets import create_model

    args = []
    cases = [("wrn-tiny", "image", (3, 32)), ("wrn-tiny", "auto", (3, 32)), ("tcdcnn", "auto", (1, 60)),
             ("image-tiny", "image", (3, 32)), ("multimodal-tip-tiny", "auto", (3, 32))]
    for i, (name, auto, (channels, size)) in enumerate(cases):
        model = create_model(name).eval()
        inputs = {"pixel_values": torch.randn(2, channels, size, size)}
        if model.config.tabular_schema:
            inputs.update(categorical_values=torch.tensor([[0, 1], [2, 3]]), continuous_values=torch.randn(2, 3),
                          missing_mask=torch.zeros(2, 5, dtype=torch.bool))
        folder = tmp_path / f"m{i}"
        model.save_pretrained(folder)
        with torch.no_grad():
            torch.save({"inputs": inputs, "logits": model(**inputs).logits}, folder / "expected.pt")
        args += [str(folder), auto]
    result = subprocess.run([sys.executable, "-c", REMOTE_LOADER, *args], capture_output=True, text=True,
                            cwd=tmp_path, timeout=120, env={**os.environ, "PYTHONPATH": ""})
    assert result.returncode == 0 and "remote ok" in result.stdout, result.stderr[-2000:]
