"""Helpers shared by the test modules: CLIs as modules, in-process and launched training runs, train.py
argument lists, a toy schema."""

import contextlib
import importlib.util
import io
import os
import subprocess
import sys
from pathlib import Path

from data_utils.io import DatasetMetadata
from data_utils.schema import TabularField, TabularSchema

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"

# A small mixed table (2 categorical + 3 continuous fields) and its 3-class label set.
TOY_SCHEMA = TabularSchema(
    [
        TabularField("color", "categorical", ["red", "blue", "green"]),
        TabularField("make", "categorical", ["a", "b", "c", "d"]),
        TabularField("age", "continuous", mean=5.0, std=2.0),
        TabularField("km", "continuous", mean=100.0, std=50.0),
        TabularField("price", "continuous", mean=10.0, std=3.0),
    ]
)
TOY_METADATA = DatasetMetadata(label_names=["cat", "dog", "bird"])


def assert_same_up_to_kernel_choice(actual, expected, ulps: int = 16, msg: str = "") -> None:
    """Equal up to a few ulps of the output's scale.

    For the same weights on the same input computed where CPU kernels may legitimately differ: a
    reloaded model in another process, another thread count, another vectorised path. Those sum in
    another order, and float results then differ by a few roundings of the largest term (measured:
    1.5e-8 on logits of order 1 in float32, under one ulp), never bitwise-equal by promise. The
    tolerance, ulps * eps(dtype) * max(1, max|expected|), is 2e-6 for float32 logits of order 1:
    far below what a single wrong weight, a missing layer or a swapped input moves (>1e-3).
    """
    import torch

    expected = torch.as_tensor(expected).detach()
    actual = torch.as_tensor(actual).detach()
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    atol = ulps * torch.finfo(expected.dtype).eps * scale
    torch.testing.assert_close(actual, expected, rtol=0, atol=atol, msg=msg or None)


def load_script(name: str):
    """Import a CLI from scripts/ as a module without putting scripts/ on sys.path.

    On sys.path, scripts/ would stay there for the rest of the test session, where a script named like
    a library would shadow it (test_export_hub checks none is)."""
    module_name = f"stil_scripts_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def fresh_accelerate_state():
    """Accelerate keeps process-wide singletons; each in-process run or Accelerator starts clean
    and leaves nothing behind for the next test."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        yield
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


def run_train(argv: list[str]) -> int:
    """`train.py ARGV` in this process; returns its exit status."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import train

    with fresh_accelerate_state():
        return train.main(argv)


def accelerate_launch(args: list[str], processes: int, cwd: Path) -> subprocess.CompletedProcess:
    """`accelerate launch --cpu --num_processes PROCESSES ARGS` in a subprocess (gloo); ARGS start with
    the script, e.g. ``["train.py", "--max_steps", "4"]``."""
    accelerate = Path(sys.executable).with_name("accelerate")
    # exactly the documented command: accelerate launch --num_processes 2 --cpu train.py ...
    # (accelerate starts one process; train.py starts the gloo workers)
    command = [str(accelerate), "launch", "--cpu", "--main_process_port", str(29600 + os.getpid() % 300),
               "--num_processes", str(processes), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    return subprocess.run(command + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)


def flags(defaults: dict, *extra: str) -> list[str]:
    """``--key value`` arguments from ``defaults`` with ``extra`` flag/value pairs replacing (or adding)
    keys: train.py refuses a flag given twice, so test variants override instead of appending."""
    values = {key.lstrip("-"): str(value) for key, value in defaults.items()}
    for flag, value in zip(extra[::2], extra[1::2]):
        values[flag.lstrip("-")] = value
    return [item for key, value in values.items() for item in (f"--{key}", value)]


# A tiny fixmatch run on the synthetic multimodal data (the CLI, resume, run-folder and model-card tests' job).
TINY_FIXMATCH = {
    "synthetic_num_samples": "300", "labeled_fraction": "0.2", "mu": "2", "method": "fixmatch",
    "per_device_train_batch_size": "4", "per_device_eval_batch_size": "64", "max_steps": "4", "eval_steps": "2",
    "logging_steps": "2", "learning_rate": "0.01", "report_to": "none", "disable_tqdm": "true", "seed": "3",
}


def tiny_fixmatch_argv(out: Path, cache: Path, *extra: str) -> list[str]:
    """train.py arguments of `TINY_FIXMATCH` into ``out``; ``extra`` flags replace defaults."""
    return flags({"output_dir": str(out), "dataset_cache_dir": str(cache), **TINY_FIXMATCH}, *extra)


def copy_synthetic_dataset(cache: Path, target: Path) -> Path:
    """A copy of the synthetic dataset the `TINY_FIXMATCH` runs use (built into the cache when absent),
    for a test that damages, edits or moves it."""
    import shutil

    from data_utils.synthetic import make_synthetic_dataset

    source = cache / "synthetic-multimodal-n300-s32-l0.2"
    if not source.exists():
        make_synthetic_dataset("multimodal", source, num_samples=300, image_size=32, labeled_fraction=0.2)
    shutil.copytree(source, target)
    return target


def train_captured(args: list[str]) -> tuple[int, str, str]:
    """`run_train` with stdout and stderr captured: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run_train(args)
    return code, out.getvalue(), err.getvalue()


def one_error_line(code: int, stderr: str) -> str:
    """The run failed with exactly one ``train.py: error:`` line and no traceback; that line."""
    assert code == 1, stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [l for l in stderr.splitlines() if l.startswith("train.py: error:")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]
