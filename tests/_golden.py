"""Reading golden fixtures (scripts/golden/golden_io.py writes them), building our side of a golden step,
and comparing our step with them."""

from __future__ import annotations

import json
from pathlib import Path

import torch

GOLDEN = Path(__file__).resolve().parent / "golden"


def load_golden(name: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, meta) of ``tests/golden/<name>``; tensors by key, meta the generator's record."""
    from safetensors.torch import load_file

    return load_file(str(GOLDEN / f"{name}.safetensors")), json.loads((GOLDEN / f"{name}.json").read_text())


def with_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The fixture's tensors under ``prefix`` (e.g. "grad."), with the prefix removed."""
    return {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)}


def assert_matches_original(ours, theirs, name: str, rtol: float = 1e-9, atol: float = 1e-12) -> None:
    """Our value equals the original's recorded one: both float64 computations of the same formula on
    the same numbers, so they agree to rounding (rtol 1e-9: summation order and fused kernels move a
    float64 result by ~1e-15 relative per operation; a real difference in a formula moves it by far
    more). Shape and finiteness are checked first, with the term named."""
    ours = torch.as_tensor(ours).detach().to(torch.float64)
    theirs = torch.as_tensor(theirs).detach().to(torch.float64)
    assert ours.shape == theirs.shape, f"{name}: shape {tuple(ours.shape)} vs original {tuple(theirs.shape)}"
    torch.testing.assert_close(ours, theirs, rtol=rtol, atol=atol, msg=lambda m: f"{name} vs original: {m}")


def assert_terms_match_original(fixture: dict, terms: dict, loss, count: int, rtol: float = 1e-9, atol: float = 1e-12) -> None:
    """Every loss term the original recorded (``term.*``, ``term.loss`` being the total) equals ours, and
    the fixture holds ``count`` of them, so a term dropped from the recording fails too."""
    recorded = with_prefix(fixture, "term.")
    for name, value in recorded.items():
        assert_matches_original(loss if name == "loss" else terms[name], value, f"term {name}", rtol=rtol, atol=atol)
    assert len(recorded) == count


def build_concat_network(meta, **heads):
    """Our concat multimodal network in the fixture's tiny configuration, float64; ``heads`` are the
    head fields that differ between the method families (see `build_network` and the Match ports)."""
    from modeling_stil.configuration_baselines import MultimodalClassifierConfig
    from modeling_stil.configuration_stil import layout_from_field_lengths, placeholder_schema
    from modeling_stil.modeling_baselines import MultimodalClassifier
    from tests._golden_seeded import float64_default

    o = meta["overrides"]
    with float64_default():
        return MultimodalClassifier(MultimodalClassifierConfig(
            backbone=o["model"], image_size=o["img_size"], num_labels=o["num_classes"],
            tabular_schema=placeholder_schema(*layout_from_field_lengths(meta["field_lengths"])),
            tabular_embedding_dim=o["tabular_embedding_dim"], tabular_num_layers=o["tabular_transformer_num_layers"],
            tabular_num_heads=8, fusion="concat", image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 1.0, 1.0], **heads))


def build_network(meta):
    """Our mmatch-family network (concat fusion, three heads) in the fixture's tiny configuration, float64."""
    return build_concat_network(meta, unimodal_heads=True, fused_dim=meta["overrides"]["projection_dim"])
