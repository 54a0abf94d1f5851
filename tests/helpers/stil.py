"""Shared by the STiL and no-host-sync tests: the tiny STiL configuration (no dropout) and one random
batch of 4 labelled and 8 unlabelled image+tabular rows in its layout."""

import torch
import torch.nn.functional as F

from modeling_stil.configuration_stil import StilConfig

N_L, N_U = 4, 8


def tiny_config():
    return StilConfig.tiny(image_size=32, interaction_attn_drop=0.0, interaction_proj_drop=0.0, interaction_drop_path=0.0)


def view(cfg, b, g, dtype=torch.float32):
    cat = torch.stack([torch.randint(0, c, (b,), generator=g) for c in cfg.cat_cardinalities], 1)
    return dict(
        pixel_values=torch.rand(b, 3, cfg.image_size, cfg.image_size, generator=g).to(dtype),
        categorical_values=cat,
        continuous_values=torch.randn(b, cfg.num_continuous, generator=g).to(dtype),
    )


def batches(cfg, seed=0, dtype=torch.float32, monitor=None):
    g = torch.Generator().manual_seed(seed)
    labeled = {"labels": torch.tensor([0, 1, 2, 0]), "index": torch.arange(N_L), "stil": view(cfg, N_L, g, dtype)}
    monitor = torch.arange(N_U) % 3 if monitor is None else monitor
    unlabeled = {"index": torch.arange(N_U), "monitor_labels": monitor, "stil": view(cfg, N_U, g, dtype)}
    return labeled, unlabeled


def random_prototypes(method, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        method.prototypes.copy_(F.normalize(torch.randn(method.prototypes.shape, generator=g), dim=1) * 0.8)
