"""Writing golden fixtures: one step of an ORIGINAL code base, recorded for tests/test_golden_*.py.

A fixture is two files in tests/golden/: ``<name>.safetensors`` (every tensor: inputs, initial
weights and state, each loss term, gradients, state after the step; float64 where the original ran
in float64) and ``<name>.json`` (what produced it: the original repository and commit, the file and
class run, the seed, which randomness inside the step was aligned or disabled, and free notes).
The generators in this folder import a checkout of the original (never copied; an environment
variable names it) and are run by hand; the tests need only the fixtures.

    python scripts/golden/generate.py            # every generator whose checkout is named
"""

from __future__ import annotations

import json
from pathlib import Path

FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "golden"


def save_golden(name: str, tensors: dict, meta: dict) -> Path:
    """Write ``tests/golden/<name>.safetensors`` + ``.json``; tensors are made contiguous CPU copies."""
    import torch
    from safetensors.torch import save_file

    FIXTURES.mkdir(parents=True, exist_ok=True)
    flat = {key: value.detach().cpu().contiguous().clone() for key, value in tensors.items() if torch.is_tensor(value)}
    save_file(flat, str(FIXTURES / f"{name}.safetensors"))
    (FIXTURES / f"{name}.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    return FIXTURES / f"{name}.safetensors"
