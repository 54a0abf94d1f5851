"""Shared by the CoMatch and schedule tests: CoMatch / Multimodal CoMatch on tiny test_vit models with a
12-column queue, and one random batch of 4 labelled and 6 unlabelled rows (weak + two strong views)."""

import torch

from modeling_stil.methods.base import DataInfo
from modeling_stil.methods.comatch import CoMatch, CoMatchArguments, MultimodalCoMatch, MultimodalCoMatchArguments
from modeling_stil.presets import create_model
from tests._helpers import TOY_METADATA, TOY_SCHEMA
from tests.helpers.random_views import image_view, mm_view

N_L, N_U, K = 4, 6, 12


def batches(multimodal=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    view = mm_view if multimodal else image_view
    labeled = {"labels": torch.tensor([0, 1, 2, 1]), "index": torch.arange(N_L), "position": torch.arange(N_L), "labeled": view(N_L, g)}
    unlabeled = {"index": torch.arange(N_U), "monitor_labels": torch.arange(N_U) % 3,
                 "weak": view(N_U, g), "strong_0": view(N_U, g), "strong_1": view(N_U, g)}
    return labeled, unlabeled


def make(multimodal=False, **kw):
    torch.manual_seed(0)
    kw.setdefault("queue_size", K)
    if multimodal:
        model = create_model("multimodal-concat-tiny", schema=TOY_SCHEMA, metadata=TOY_METADATA, backbone="test_vit")
        method = MultimodalCoMatch(model, MultimodalCoMatchArguments(**kw))
    else:
        model = create_model("image-tiny", metadata=TOY_METADATA, backbone="test_vit")
        method = CoMatch(model, CoMatchArguments(**kw))
    method.setup(DataInfo(num_labeled=20, num_labels=3, labeled_batch_size=N_L, unlabeled_batch_size=N_U))
    return method.train()
