"""Random model inputs for a batch of `b` rows drawn from generator `g`: an image view (32 px) and an
image+tabular view (2 categorical fields of 3 and 4 values, 3 continuous), the toy schema's shapes."""

import torch


def image_view(b, g):
    return {"pixel_values": torch.rand(b, 3, 32, 32, generator=g)}


def mm_view(b, g):
    return {
        "pixel_values": torch.rand(b, 3, 32, 32, generator=g),
        "categorical_values": torch.stack([torch.randint(0, 3, (b,), generator=g), torch.randint(0, 4, (b,), generator=g)], 1),
        "continuous_values": torch.randn(b, 3, generator=g),
    }
