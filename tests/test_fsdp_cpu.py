"""FSDP2 on the CPU: `accelerate launch --config_file accelerate_configs/fsdp_cpu.yaml train.py` trains
with two gloo processes through Accelerate's own FSDP2 path (issue 23 item 1).

* stil (teacher, prototypes, three heads), its submodules sharded on their own: a run resumed from its
  step-1 checkpoint ends with the uninterrupted run's whole method state and optimizer state, bit for bit
  (FULL_STATE_DICT, the config's checkpoints); the export reloads with the reported metrics;
* supervised (a head it never trains: parameters without optimizer state) with SHARDED_STATE_DICT:
  the same exact resume, from per-process shards;
* fixmatch: the FSDP run's export equals the 2-process DDP run's on the same command (SGD, so a
  wrongly reduced gradient would show at full size);
* a model method besides forward (TIP's encode_image, ...) gathers its sharded parameters;
* what cannot work stops at start-up with one line: a functional_call method (L2I) with submodules
  sharded on their own, FSDP through Accelerate's --cpu launcher, FSDP1 or DeepSpeed on the CPU."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests._helpers import accelerate_launch, flags

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
_PORTS = itertools.count(30000 + (os.getpid() % 400) * 8)  # one port per launch, apart from the other tests' ranges

# 16 px synthetic image+table rows, 2 steps, a checkpoint after each, the last step exported (each launch
# costs its processes' start-up mostly: few launches, few steps)
TINY = {"synthetic_num_samples": "200", "synthetic_image_size": "16", "labeled_fraction": "0.2", "mu": "2",
        "per_device_train_batch_size": "4", "per_device_eval_batch_size": "64", "max_steps": "2", "eval_steps": "2",
        "save_steps": "1", "logging_steps": "1", "metric_for_best_model": "last", "plots": "false",
        "learning_rate": "0.001", "report_to": "none", "disable_tqdm": "true", "seed": "3"}


def fsdp_launch(cwd: Path, args: list[str], *launcher: str) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file accelerate_configs/fsdp_cpu.yaml [LAUNCHER] train.py ARGS`, GPUs
    hidden; on a timeout the whole process group (launcher, torchrun's workers) is stopped."""
    accelerate = Path(sys.executable).with_name("accelerate")
    command = [str(accelerate), "launch", "--config_file", str(ROOT / "accelerate_configs" / "fsdp_cpu.yaml"),
               "--main_process_port", str(next(_PORTS)), *launcher, str(ROOT / "train.py"), *args]
    process = subprocess.Popen(command, cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        out, err = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def argv(out: Path, cache: Path, method: str, *extra: str) -> list[str]:
    return flags({"method": method, "output_dir": str(out), "dataset_cache_dir": str(cache), **TINY}, *extra)


def checkpoint_state(folder: Path, name: str) -> dict:
    """A FSDP checkpoint's full model ("model") or optimizer ("optimizer") state, flattened to
    ``{"a.b.c": value}``: FULL_STATE_DICT's single file or SHARDED_STATE_DICT's shards merged."""
    if (folder / "optimizer.bin").is_file():
        state = torch.load(folder / ("optimizer.bin" if name == "optimizer" else "pytorch_model_fsdp.bin"), weights_only=True)
    else:
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        merged = folder.parent / f"{folder.name}-{name}.pt"
        dcp_to_torch_save(str(folder / ("optimizer_0" if name == "optimizer" else "pytorch_model_fsdp_0")), str(merged))
        state = torch.load(merged, weights_only=True)[name]

    def flat(value, prefix=""):
        if isinstance(value, dict):
            for key, inner in value.items():
                yield from flat(inner, f"{prefix}{key}.")
        elif isinstance(value, (list, tuple)) and any(isinstance(v, dict) for v in value):
            for index, inner in enumerate(value):  # param_groups
                yield from flat(inner, f"{prefix}{index}.")
        elif isinstance(value, (list, tuple)):
            yield prefix[:-1], list(value)  # Adam's betas: a tuple saved, a list once loaded
        else:
            yield prefix[:-1], value

    return dict(flat(state))


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:5]
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


def assert_exact_resume(straight: Path, resumed: Path) -> None:
    """The resumed run's last checkpoint holds the uninterrupted run's: every tensor of the method (model,
    teachers, banks, BN statistics) and the optimizer state, bit for bit."""
    for name in ("model", "optimizer"):
        assert_identical(checkpoint_state(straight / "checkpoints" / "checkpoint-2", name),
                         checkpoint_state(resumed / "checkpoints" / "checkpoint-2", name))


def trained_under_fsdp(run: Path) -> None:
    info = json.loads((run / "run_info.json").read_text())
    assert info["distributed_type"] == "FSDP" and info["num_processes"] == 2 and info["device"].startswith("cpu")
    train = [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert any(r["split"] == "train" and r["grad_norm"] > 0 for r in train)  # it trained


@pytest.mark.slow
def test_stil_under_fsdp_resumes_exactly_and_exports_the_full_model(tmp_path, synthetic_cache):
    from safetensors.torch import load_file

    # fsdp_min_num_params 2000: the encoders, heads, projectors and the teacher's copies are units of their own
    common = ("--start_epoch", "-1", "--th1", "0.0")
    straight = fsdp_launch(tmp_path, argv(tmp_path / "straight", synthetic_cache, "stil", *common), "--fsdp_min_num_params", "2000")
    assert straight.returncode == 0, straight.stderr[-3000:]
    resumed = fsdp_launch(tmp_path, argv(tmp_path / "resumed", synthetic_cache, "stil", *common, "--export", "false",
                                         "--resume_from_checkpoint", str(tmp_path / "straight" / "checkpoints" / "checkpoint-1")),
                          "--fsdp_min_num_params", "2000")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    trained_under_fsdp(tmp_path / "straight")
    assert_exact_resume(tmp_path / "straight", tmp_path / "resumed")
    method_state = checkpoint_state(tmp_path / "straight" / "checkpoints" / "checkpoint-2", "model")
    assert {"prototypes", "ema.module.encoder_imaging.conv1.weight", "model.encoder_imaging.bn1.running_mean"} <= method_state.keys()
    # the export is the whole evaluation model (not a shard), and reproduces the run's test metrics
    exported = load_file(tmp_path / "straight" / "model.safetensors")
    evaluated = [prefix for prefix in ("model.", "ema.module.")
                 if all(torch.equal(value, method_state[prefix + key]) for key, value in exported.items())]
    assert evaluated, "the export is not the method's student or teacher"
    assert json.loads((tmp_path / "straight" / "eval_results.json").read_text())["reload_check"]["matches"]


@pytest.mark.slow
def test_supervised_resumes_exactly_from_sharded_checkpoints(tmp_path, synthetic_cache):
    sharded = ("--fsdp_state_dict_type", "SHARDED_STATE_DICT")
    common = ("--labeled_fraction", "0.5", "--per_device_train_batch_size", "8", "--export", "false")
    straight = fsdp_launch(tmp_path, argv(tmp_path / "straight", synthetic_cache, "supervised", *common), *sharded)
    assert straight.returncode == 0, straight.stderr[-3000:]
    resumed = fsdp_launch(tmp_path, argv(tmp_path / "resumed", synthetic_cache, "supervised", *common,
                                         "--resume_from_checkpoint", str(tmp_path / "straight" / "checkpoints" / "checkpoint-1")),
                          *sharded)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    trained_under_fsdp(tmp_path / "straight")
    checkpoint = tmp_path / "straight" / "checkpoints" / "checkpoint-1"
    assert (checkpoint / "pytorch_model_fsdp_0" / "__1_0.distcp").is_file()  # one shard per process
    assert_exact_resume(tmp_path / "straight", tmp_path / "resumed")
    # the multimodal model's projection head never trains here: no optimizer state, before and after resuming
    optimizer = checkpoint_state(tmp_path / "resumed" / "checkpoints" / "checkpoint-2", "optimizer")
    assert not any(key.startswith("state.model.head.") for key in optimizer)


@pytest.mark.slow
def test_fixmatch_under_fsdp_exports_what_ddp_exports(tmp_path, synthetic_cache):
    """Same command, FSDP2 against DDP (both 2 gloo processes): SGD at lr 0.01, 2 steps. The only
    difference is where float32 sums are cut: FSDP2 takes the clipping norm as per-shard partial sums
    reduced across processes (DDP over the whole tensor), so the clip coefficient may differ in its last
    bit (for 2 processes the gradient reduction itself is one addition either way). Measured: at most
    3e-7 of a tensor's scale (docs/training.md); a gradient reduced wrongly (summed, or one rank's
    only) moves weights by about lr x gradient, orders above the 1e-5 allowed here."""
    from safetensors.torch import load_file

    sgd = ("--optimizer", "sgd", "--learning_rate", "0.01", "--warmup", "0")
    fsdp = fsdp_launch(tmp_path, argv(tmp_path / "fsdp", synthetic_cache, "fixmatch", *sgd))
    assert fsdp.returncode == 0, fsdp.stderr[-3000:]
    ddp = accelerate_launch([str(ROOT / "train.py"), *argv(tmp_path / "ddp", synthetic_cache, "fixmatch", *sgd)], 2, tmp_path)
    assert ddp.returncode == 0, ddp.stderr[-3000:]

    trained_under_fsdp(tmp_path / "fsdp")
    assert json.loads((tmp_path / "ddp" / "run_info.json").read_text())["distributed_type"] == "MULTI_CPU"
    a, b = load_file(tmp_path / "fsdp" / "model.safetensors"), load_file(tmp_path / "ddp" / "model.safetensors")
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) / max(1.0, float(b[k].abs().max())) for k in a if b[k].is_floating_point())
    print(f"FSDP vs DDP export: largest difference {worst:.2e} of a tensor's scale")  # the figure docs/training.md states
    for key in a:
        scale = max(1.0, float(b[key].abs().max())) if b[key].is_floating_point() else 0.0
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-5 * scale, msg=key)
    assert json.loads((tmp_path / "fsdp" / "eval_results.json").read_text())["reload_check"]["matches"]


class _Encoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.encode(x)

    def encode(self, x):  # what TIP's training step calls (encode_image, encode_tabular, fuse, ...)
        return self.linear(x)


class _EncodingMethod(torch.nn.Module):
    name = "encoding"
    model_forward_methods = ("encode",)

    def __init__(self):
        super().__init__()
        self.model = _Encoder()

    def functional_parameter_use(self):
        return None


def _methods_fitted_to_separate_units(rank: int, world: int, store: str, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from modeling_stil.methods.l2i import L2IO
    from modeling_stil.training.accelerator import check_sharding_fits
    from modeling_stil.training.errors import JobError
    from tests.helpers.l2i import make_method

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    # a model method besides forward, its model sharded on its own: it gathers the parameters as forward does
    torch.manual_seed(0)
    method = _EncodingMethod()
    x = torch.ones(2, 4)
    expected = method.model.linear(x).detach()
    fully_shard(method.model, mesh=mesh)
    fully_shard(method, mesh=mesh)
    check_sharding_fits(method, method)
    with torch.no_grad():
        encoded = method.model.encode(x)
    lines = {"encoded_equal": type(encoded) is torch.Tensor and torch.equal(encoded, expected)}
    for separate in (False, True):
        method = make_method(L2IO, "classification", seed=0)
        if separate:
            fully_shard(method.model, mesh=mesh)  # what fsdp_min_num_params below the student's size does
        fully_shard(method, mesh=mesh)
        try:
            check_sharding_fits(method, method)
            lines[str(separate).lower()] = None
        except JobError as error:
            lines[str(separate).lower()] = str(error)
    if rank == 0:
        Path(out).write_text(json.dumps(lines))
    dist.barrier()
    dist.destroy_process_group()


def test_methods_are_fitted_to_submodules_sharded_on_their_own(tmp_path):
    """A model method besides forward (TIP's encode_image, ...) gathers its sharded parameters (it met
    sharded DTensors before: "mixed torch.Tensor and DTensor"). L2I's virtual step calls the student with
    parameters it supplies; FSDP2 would put the student's own gathered parameters back in its forward
    hook (measured on STiL's club_standard: CLUB weights 3e-3 off DDP after 2 steps): refused. One unit
    for the whole method is fine (L2I measured equal to DDP)."""
    import torch.multiprocessing as mp

    out = tmp_path / "lines.json"
    # one process suffices: what matters is which modules fully_shard made units
    mp.start_processes(_methods_fitted_to_separate_units, args=(1, str(tmp_path / "store"), str(out)), nprocs=1,
                       start_method="spawn")
    lines = json.loads(out.read_text())
    assert lines["encoded_equal"] is True
    assert lines["false"] is None
    assert lines["true"].startswith("method 'l2i_o' evaluates the student at its virtual step")
    assert "set fsdp_min_num_params to at least" in lines["true"] and "\n" not in lines["true"]


def test_fsdp_through_the_cpu_launcher_stops_at_start_up(tmp_path):
    """`--cpu` makes Accelerate start its plain launcher, which drops every FSDP setting: the run would be
    DDP. It stops before anything starts, naming the config that runs FSDP on the CPU."""
    accelerate = Path(sys.executable).with_name("accelerate")
    done = subprocess.run([str(accelerate), "launch", "--config_file", str(ROOT / "accelerate_configs" / "fsdp.yaml"), "--cpu",
                           "--num_processes", "2", "--main_process_port", str(next(_PORTS)), str(ROOT / "train.py"),
                           "--output_dir", str(tmp_path / "run"), "--dataset_cache_dir", str(tmp_path / "cache"),
                           "--max_steps", "2", "--report_to", "none"],
                          cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.startswith("train.py:")]
    assert len(lines) == 1 and "silently be DDP" in lines[0] and "accelerate_configs/fsdp_cpu.yaml" in lines[0], done.stderr[-2000:]
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()  # nothing started


@pytest.mark.parametrize("engine, message", [({"ACCELERATE_USE_DEEPSPEED": "true"}, "^DeepSpeed was asked for on the CPU"),
                                             ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"},
                                              "^fsdp_version 1 was asked for on the CPU, where only FSDP2")])
def test_engine_that_cannot_run_on_the_cpu_is_refused(monkeypatch, tmp_path, engine, message):
    from modeling_stil.training.accelerator import make_accelerator
    from modeling_stil.training.arguments import parse_run_arguments
    from modeling_stil.training.errors import JobError

    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    for name, value in engine.items():
        monkeypatch.setenv(name, value)
    args = parse_run_arguments(["--output_dir", str(tmp_path / "run"), "--report_to", "none"])
    with pytest.raises(JobError, match=message):
        make_accelerator(args)


def _ema_under_fully_shard(rank: int, world: int, store: str, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from modeling_stil.methods.common import EMATeacher

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6))
    holder = torch.nn.Module()
    holder.model, holder.ema = student, EMATeacher(student)
    expected = {k: v.clone() for k, v in holder.ema.module.state_dict().items()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
        student[1].running_mean.add_(2.0)
    after = {k: v.detach().clone() for k, v in student.state_dict().items()}
    fully_shard(holder, mesh=init_device_mesh("cpu", (world,)))  # the root, as Accelerate's size policy does for small modules
    holder.ema.update(holder.model, 0.5)
    result = {}
    for name, value in holder.ema.module.state_dict().items():
        full = value.full_tensor() if hasattr(value, "full_tensor") else value
        result[name] = (type(value).__name__, full)
        if expected[name].is_floating_point():
            expected[name] = 0.5 * expected[name] + 0.5 * after[name]
        else:
            expected[name] = after[name]
    if rank == 0:
        torch.save({"result": result, "expected": expected}, out)
    # both ranks leave together: a rank that tears gloo down while its peer is still writing can abort
    # (SIGABRT) in the peer's connection teardown
    dist.barrier()
    dist.destroy_process_group()


def test_ema_teacher_updates_under_fsdp2_fully_shard(tmp_path):
    """Under FSDP2 the teacher's parameters are sharded DTensors and its buffers plain tensors; the EMA
    update averaged them in one foreach group, which torch refuses (mixed Tensor and DTensor)."""
    import torch.multiprocessing as mp

    out = tmp_path / "ema.pt"
    mp.start_processes(_ema_under_fully_shard, args=(2, str(tmp_path / "store"), str(out)), nprocs=2, start_method="spawn")
    saved = torch.load(out, weights_only=False)
    kinds = {name: kind for name, (kind, _) in saved["result"].items()}
    assert kinds["0.weight"] == "DTensor" and kinds["1.running_mean"] == "Tensor"  # parameters sharded, buffers replicated
    for name, (_, value) in saved["result"].items():
        torch.testing.assert_close(value, saved["expected"][name], msg=name)
