"""`supervised`: labelled data only, the model's task loss, optional unimodal-head terms."""

import pytest
import torch
import torch.nn.functional as F

from modeling_stil.methods.base import TrainState, get_method_class
from modeling_stil.methods.supervised import Supervised, SupervisedArguments
from tests.helpers.nets import TinyMultimodalNet, TinyNet


def labeled_batch(x, y, key="weak", **extra):
    return {"labels": y, "index": torch.arange(len(y)), key: {"pixel_values": x, **extra}}


def test_classification_loss_is_cross_entropy_and_trains_every_parameter():
    torch.manual_seed(0)
    model = TinyNet()
    method = Supervised(model)
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    loss, logs = method(labeled_batch(x, y), None, TrainState())
    reference = F.cross_entropy(model(x).logits, y)  # same batch statistics in train mode
    torch.testing.assert_close(loss, reference)
    assert set(logs) == {"loss", "sup_loss", "train_accuracy"}
    assert all(not v.requires_grad for v in logs.values())
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_eval_view_and_declared_views():
    assert Supervised.unlabeled_views is None
    method = Supervised(TinyNet(), SupervisedArguments(labeled_view="eval"))
    assert method.labeled_views == {"eval": "eval"}
    x, y = torch.randn(3, 4), torch.tensor([0, 1, 2])
    method(labeled_batch(x, y, key="eval"), None, TrainState())
    with pytest.raises(KeyError):
        method(labeled_batch(x, y, key="weak"), None, TrainState())
    assert Supervised(TinyNet()).labeled_views == {"weak": "weak"}


def test_regression_mse_and_landmarks_use_the_views_moved_targets():
    torch.manual_seed(0)
    model = TinyNet(num_labels=1)
    method = Supervised(model)
    x, y = torch.randn(5, 4), torch.randn(5)
    loss, logs = method(labeled_batch(x, y), None, TrainState(task="regression", num_labels=1))
    torch.testing.assert_close(loss, F.mse_loss(model(x).logits.squeeze(1), y))
    assert "train_accuracy" not in logs
    landmarks = TinyNet(num_labels=4)
    method = Supervised(landmarks)
    moved = torch.randn(5, 4)  # a "translate" view shifted the landmarks with the image
    batch = labeled_batch(x, torch.zeros(5, 4), labels=moved, translation=torch.ones(5, 2))
    loss, _ = method(batch, None, TrainState(task="landmarks", num_labels=4))  # TinyNet rejects labels/translation
    torch.testing.assert_close(loss, F.mse_loss(landmarks(x).logits, moved))


def test_unimodal_heads_weight():
    torch.manual_seed(0)
    model = TinyMultimodalNet()
    x_i, x_t, y = torch.randn(4, 4), torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    batch = {"labels": y, "index": torch.arange(4), "weak": {"pixel_values": x_i, "continuous_values": x_t}}
    loss, logs = Supervised(model)(batch, None, TrainState())
    loss.backward()
    assert model.image_head.weight.grad is None and model.tabular_head.weight.grad is None  # off by default
    model.zero_grad()
    loss, logs = Supervised(model, SupervisedArguments(unimodal_loss_weight=0.5))(batch, None, TrainState())
    out = model(x_i, x_t)
    expected = F.cross_entropy(out.logits, y) + 0.5 * (F.cross_entropy(out.image_logits, y) + F.cross_entropy(out.tabular_logits, y))
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(logs["image_loss"], F.cross_entropy(out.image_logits, y))
    loss.backward()
    assert model.image_head.weight.grad.abs().sum() > 0 and model.tabular_head.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="image_logits"):
        Supervised(TinyNet(), SupervisedArguments(unimodal_loss_weight=1.0))(labeled_batch(x_i, y), None, TrainState())
    with pytest.raises(ValueError):
        SupervisedArguments(unimodal_loss_weight=-1.0)


def test_registration_tasks_and_eval_model():
    assert get_method_class("supervised") is Supervised
    for task in ("classification", "regression", "landmarks"):
        Supervised.check_task(task)
    model = TinyNet()
    method = Supervised(model)
    assert method.eval_model() is model
    assert method.after_optimizer_step(TrainState()) is None
