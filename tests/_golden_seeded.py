"""Seeded weights and tensor summaries shared by scripts/golden/gen_stil.py, gen_tip.py and their tests.

The originals' image encoders are full-width ResNets (no narrow option), so their weights are far too
large for a fixture. Instead every weight of a golden step is *regenerated* from a seed by
``seeded_state`` on both sides (the generator fills the original module, the test fills ours; same
names, same shapes, same draw order), and large tensors are recorded as ``summary`` triples (sum,
sum of squares, 64 strided entries) rather than in full.
"""

from __future__ import annotations

import contextlib
import math

import torch

FULL_NUMEL = 256  # tensors up to this size are recorded in full, larger ones as summaries


@contextlib.contextmanager
def float64_default():
    """torch's default dtype is float64 inside the block (modules built there hold float64 weights, and
    tensors an original allocates with the default dtype are float64); restored after, also on error."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def seeded_state(shapes: dict[str, tuple], seed: int, scale: dict[str, float] | None = None) -> dict[str, torch.Tensor]:
    """Float64 values for the floating tensors named in ``shapes``, drawn in sorted-name order from
    one CPU generator: weights ~ N(0, 2/fan_in), norm weights 1 + 0.1 N, biases and running means
    0.1 N, running variances 0.5 + U(0, 1), 1-d embeddings / tokens 0.5 N; then every tensor whose
    name starts with a key of ``scale`` is multiplied by its factor (e.g. wider logits)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(shapes):
        shape = tuple(shapes[name])
        base = torch.randn(shape, generator=g, dtype=torch.float64)
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "running_var":
            value = 0.5 + torch.rand(shape, generator=g, dtype=torch.float64)
        elif leaf in ("running_mean", "bias"):
            value = 0.1 * base
        elif leaf == "weight" and len(shape) == 1:
            value = 1.0 + 0.1 * base
        elif len(shape) >= 2 and leaf == "weight":
            value = base * math.sqrt(2.0 / math.prod(shape[1:]))  # He: activations keep their spread through ReLU stacks
        else:  # tokens, embeddings stored as parameters, prototypes
            value = 0.5 * base
        for prefix, factor in (scale or {}).items():
            if name.startswith(prefix):
                value = value * factor
        out[name] = value
    return out


def perturbed(state: dict[str, torch.Tensor], seed: int, eps: float = 0.05) -> dict[str, torch.Tensor]:
    """``state`` + eps * N(0, 1) * (|value| + 0.01), drawn in sorted-name order: a teacher close to
    the student (so an EMA mix of the two computes much the same function) but not equal to it."""
    g = torch.Generator().manual_seed(seed)
    return {name: state[name] + eps * torch.randn(state[name].shape, generator=g, dtype=torch.float64) * (state[name].abs() + 0.01)
            for name in sorted(state)}


def seeded_images(n: int, size: int, seed: int) -> torch.Tensor:
    """n RGB images with their own contrast and per-channel offset (a N(0, 1) + b, a in [0.25, 2],
    b ~ N(0, 1)), float64: i.i.d. noise alone gives every image the same pooled features."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, 3, size, size, generator=g, dtype=torch.float64)
    contrast = 0.25 + 1.75 * torch.rand(n, 1, 1, 1, generator=g, dtype=torch.float64)
    offset = torch.randn(n, 3, 1, 1, generator=g, dtype=torch.float64)
    return contrast * noise + offset


def float_shapes(state: dict[str, torch.Tensor], skip=()) -> dict[str, tuple]:
    """Shapes of the floating tensors of a state dict (integer counters such as num_batches_tracked are left out)."""
    return {k: tuple(v.shape) for k, v in state.items() if v.is_floating_point() and not k.startswith(tuple(skip))}


def summary(tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """(sum, sum of squares, 64 strided entries) of a tensor, float64."""
    flat = tensor.detach().to(torch.float64).flatten()
    step = max(1, flat.numel() // 64)
    return {"sum": flat.sum(), "sumsq": (flat * flat).sum(), "sample": flat[::step][:64].clone()}


def record(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fixture entries for ``tensors``: ``<prefix><name>`` in full when small, else
    ``<prefix><name>#sum`` / ``#sumsq`` / ``#sample``."""
    out = {}
    for name, value in tensors.items():
        value = value.detach().to(torch.float64) if value.is_floating_point() else value.detach()
        if value.numel() <= FULL_NUMEL:
            out[prefix + name] = value.clone()
        else:
            out.update({f"{prefix}{name}#{part}": v for part, v in summary(value).items()})
    return out


def compare_recorded(fixture: dict[str, torch.Tensor], prefix: str, ours: dict[str, torch.Tensor], check, what: str) -> int:
    """Compare every ``<prefix>`` entry of the fixture with ``ours`` (recorded the same way by
    ``record``) using ``check(ours, theirs, name)``; every recorded name must exist in ours. Returns
    the number of tensors compared."""
    mine = record(prefix, ours)
    names = sorted(k for k in fixture if k.startswith(prefix))
    missing = [k for k in names if k not in mine]
    assert not missing, f"{what}: recorded by the original but not produced by ours: {missing[:10]}"
    for key in names:
        check(mine[key], fixture[key], key)
    return len(names)
