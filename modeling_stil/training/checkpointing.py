"""Checkpoints: atomic ``accelerator.save_state`` folders, rotation (last K + best), compatibility.

Layout: ``<output_dir>/checkpoints/checkpoint-<step>/`` holds what ``save_state`` writes (the method
module = model + teachers/banks/buffers as ``model.safetensors``, optimizer and scheduler state dicts,
every rank's RNG states) plus ``trainer_state.json``: the `TrainerProgress` (loop position, best
checkpoint, run fingerprint) as JSON. A checkpoint is first written to ``.checkpoint-<step>.partial``
and renamed into place only when every rank has finished, so a crash never leaves a half checkpoint
that ``--resume_from_checkpoint latest`` would pick up; a write that fails (a full disk) removes the
partial folder and raises one `CheckpointWriteError` line naming the reason, the file and the folder.
Each checkpoint folder is listed in the run's manifest (manifest.py) before it is written; its files
get the umask's mode (safetensors writes 0600).

Loading is safe (`load_checkpoint`): no file is unpickled with ``weights_only=False``, so a
checkpoint folder from elsewhere cannot run code. Weights come from safetensors; optimizer,
scheduler and RNG states through ``torch.load(weights_only=True)`` (tensors, numbers, strings,
numpy arrays only); the progress from ``trainer_state.json``. Accelerate also writes the registered
progress as ``custom_checkpoint_0.pkl`` (so a plain ``accelerator.load_state`` still works); stil
never reads it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from data_utils.fingerprint import json_digest

CHECKPOINTS_DIRNAME = "checkpoints"
STATE_FILENAME = "trainer_state.json"
RNG_STATE_PATTERN = "random_states_{}.pkl"  # accelerate's name; a torch.save zip read with weights_only=True
_PATTERN = re.compile(r"^checkpoint-(\d+)$")


class IncompatibleCheckpointError(RuntimeError):
    pass


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, a quota); its partial folder was removed."""


@dataclass
class TrainerProgress:
    """Everything about the loop position that a resumed run needs (registered for checkpointing)."""

    step: int = 0  # optimisation steps done
    micro_step: int = 0  # micro-batches consumed (data position: loaders.iterate(micro_step))
    epoch: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    best_checkpoint: str | None = None  # folder name under checkpoints/
    early_stopping_best: float | None = None  # best value by more than early_stopping_min_delta
    early_stopping_wait: int = 0  # evaluations since it last improved
    fingerprint: dict[str, Any] = field(default_factory=dict)

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            if hasattr(self, key):
                setattr(self, key, value)


def make_fingerprint(method: str, model_config: dict[str, Any], dataset: dict[str, Any]) -> dict[str, Any]:
    """What must not change between a checkpoint and the run resuming it.

    ``model_config`` is the architecture (config dict without volatile keys); ``dataset`` a small
    description (source, split sizes, labelled indices digest, schema digest)."""
    volatile = {"transformers_version", "_name_or_path", "architectures", "dtype", "torch_dtype", "auto_map", "_commit_hash"}
    arch = {k: v for k, v in model_config.items() if k not in volatile}
    return {
        "method": method,
        "model_type": model_config.get("model_type"),
        "model": json_digest(arch),
        "dataset": json_digest(dataset),
        "dataset_description": dataset,
    }


def fingerprint_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    diffs = []
    if saved.get("method") != current.get("method"):
        diffs.append(f"method: checkpoint {saved.get('method')!r}, this run {current.get('method')!r}")
    if saved.get("model") != current.get("model"):
        diffs.append(
            f"model architecture: checkpoint {saved.get('model_type')!r} config {saved.get('model')}, "
            f"this run {current.get('model_type')!r} config {current.get('model')}"
        )
    if saved.get("dataset") != current.get("dataset"):
        a, b = saved.get("dataset_description") or {}, current.get("dataset_description") or {}
        keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        detail = "; ".join(f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in keys[:6])
        diffs.append(f"dataset: {detail or 'fingerprints differ'}")
    return diffs


def checkpoints_root(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / CHECKPOINTS_DIRNAME


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``root``, oldest step first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _PATTERN.match(child.name)
        if match and child.is_dir() and (child / STATE_FILENAME).is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def resolve_checkpoint(spec: str, output_dir: str | os.PathLike) -> Path:
    """``'latest'`` -> newest complete checkpoint in ``output_dir``; otherwise a checkpoint folder."""
    if spec == "latest":
        found = list_checkpoints(checkpoints_root(output_dir))
        if not found:
            raise FileNotFoundError(
                f"resume_from_checkpoint=latest but {checkpoints_root(output_dir)} holds no complete checkpoint"
            )
        return found[-1]
    path = Path(spec)
    if path.is_dir() and not (path / STATE_FILENAME).is_file():
        inner = list_checkpoints(path) or list_checkpoints(checkpoints_root(path))
        if inner:
            return inner[-1]
    if not (path / STATE_FILENAME).is_file():
        raise FileNotFoundError(f"{path} is not a stil checkpoint (no {STATE_FILENAME})")
    return path


def read_checkpoint_state(path: str | os.PathLike) -> dict[str, Any]:
    return json.loads((Path(path) / STATE_FILENAME).read_text())


def check_compatible(path: str | os.PathLike, fingerprint: dict[str, Any]) -> dict[str, Any]:
    """Return the checkpoint's saved state or raise `IncompatibleCheckpointError` with the reasons."""
    saved = read_checkpoint_state(path)
    diffs = fingerprint_differences(saved.get("fingerprint", {}), fingerprint)
    if diffs:
        raise IncompatibleCheckpointError(
            f"cannot resume from {path}: it was written by a different run:\n  " + "\n  ".join(diffs)
            + "\nstart a new output_dir, or resume with the original method/model/dataset"
        )
    return saved


def save_checkpoint(accelerator, output_dir: str | os.PathLike, progress: TrainerProgress, extra: dict[str, Any] | None = None) -> Path:
    """Atomically write ``checkpoints/checkpoint-<step>`` with ``accelerator.save_state`` (model as
    safetensors) plus ``trainer_state.json`` (``progress`` and ``extra`` as JSON); read it back with
    `load_checkpoint`.

    Must be called on every process (each rank writes its RNG state)."""
    from data_utils.permissions import files_like_umask

    from . import manifest

    root = checkpoints_root(output_dir)
    final = root / f"checkpoint-{progress.step}"
    partial = root / f".checkpoint-{progress.step}.partial"
    trash = root / f".checkpoint-{progress.step}.old"
    names = [f"{CHECKPOINTS_DIRNAME}/{p.name}" for p in (partial, final, trash)]
    if accelerator.is_main_process:
        manifest.claim_all(output_dir, names, kind="tree")  # refuses a folder of these names stil did not write
        if partial.exists():
            shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    with _failed_write_removes(partial, final):
        accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = dict(extra or {})
        state.update(progress.state_dict())  # the progress is what load_checkpoint restores: it wins
        with _failed_write_removes(partial, final):
            (partial / STATE_FILENAME).write_text(json.dumps(state, indent=2, default=str))
        files_like_umask(p for p in partial.rglob("*") if p.is_file())  # safetensors writes 0600
        if final.exists():  # same step saved twice (e.g. best + periodic): keep the newer
            shutil.rmtree(trash, ignore_errors=True)
            final.rename(trash)
            partial.rename(final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            partial.rename(final)
        manifest.forget(output_dir, [names[0], names[2]])
    accelerator.wait_for_everyone()
    return final


# torch's zip writer reports a short write only as "unexpected pos" (the OS reason is lost); safetensors
# and plain file writes keep it ("No space left on device (os error 28)")
_WRITE_FAILURE_TEXT = ("unexpected pos", "failed writing file", "file write failed")
_NO_SPACE_TEXT = ("no space left on device", "os error 28", "storagefull")
_NEARLY_FULL_BYTES = 4 * 2**20


def _write_failure_reason(error: BaseException, folder: Path) -> str | None:
    """Why writing into ``folder`` failed, in words; None when ``error`` is not a failed write."""
    import errno

    code = getattr(error, "errno", None)
    text = str(error).lower()
    if code == errno.ENOSPC or any(t in text for t in _NO_SPACE_TEXT):
        return "no space left on device"
    if code == errno.EDQUOT or "disk quota exceeded" in text:
        return "disk quota exceeded"
    if isinstance(error, OSError):
        return os.strerror(code) if code else (str(error) or type(error).__name__)
    if any(t in text for t in _WRITE_FAILURE_TEXT):
        try:
            free = shutil.disk_usage(folder).free
        except OSError:
            free = None
        if free is not None and free < _NEARLY_FULL_BYTES:
            return "no space left on device"
        return f"the file could not be written ({str(error).strip().splitlines()[0]})"
    return None


def _file_being_written(folder: Path) -> str | None:
    """The newest file under ``folder`` (the one a failed write left short), relative to it."""
    try:
        files = [p for p in folder.rglob("*") if p.is_file()]
        newest = max(files, key=lambda p: p.stat().st_mtime_ns, default=None)
    except OSError:
        return None
    return None if newest is None else str(newest.relative_to(folder))


@contextlib.contextmanager
def _failed_write_removes(partial: Path, final: Path):
    """A write into the ``partial`` checkpoint that fails removes it and, for a failed write (full disk,
    quota), raises one `CheckpointWriteError` line naming the reason, the file, the folder and the last
    complete checkpoint, which is untouched."""
    try:
        yield
    except BaseException as error:
        reason = _write_failure_reason(error, partial.parent)
        file = getattr(error, "filename", None) or _file_being_written(partial)
        shutil.rmtree(partial, ignore_errors=True)
        if reason is None:
            raise
        if file and Path(file).is_absolute():
            file = Path(file).relative_to(partial) if Path(file).is_relative_to(partial) else Path(file).name
        if file:
            what = f"{final.name}/{file}"
        elif type(error).__name__ == "SafetensorError":  # safetensors deletes the short file and names none
            what = f"the model weights (safetensors) of {final.name}"
        else:
            what = final.name
        complete = list_checkpoints(partial.parent)
        kept = (f"the last complete checkpoint, {complete[-1].name}, is intact; free space there (or choose an "
                "--output_dir on a larger disk) and resume with --resume_from_checkpoint latest") if complete else (
                "no complete checkpoint was written before it; free space there (or choose an --output_dir on a "
                "larger disk) and start again")
        raise CheckpointWriteError(
            f"{reason} while writing {what} in {partial.parent}: the partial checkpoint "
            f"was removed; {kept}"
        ) from None


def _safe_load(file: str | os.PathLike, **kwargs):
    """``torch.load(weights_only=True)`` with accelerate's allow-list (numpy arrays/dtypes for RNG states)."""
    from accelerate.utils import load

    kwargs["weights_only"] = True
    return load(file, **kwargs)


@contextlib.contextmanager
def _safe_custom_states(progress: TrainerProgress | None):
    """During ``accelerator.load_state``: skip the pickled `TrainerProgress` (restored from JSON) and
    read any other registered object with ``weights_only=True`` (accelerate uses ``weights_only=False``)."""
    import accelerate.accelerator as accelerator_module

    if not hasattr(accelerator_module, "load_custom_state"):
        raise RuntimeError(
            "this accelerate version loads registered objects differently; stil cannot guarantee a "
            "checkpoint is read without unpickling code (pin accelerate to the version in pyproject.toml)"
        )
    real = accelerator_module.load_custom_state

    def load_custom_state(obj, path, index=0):
        if obj is progress:
            return
        obj.load_state_dict(_safe_load(Path(path) / f"custom_checkpoint_{index}.pkl", map_location="cpu"))

    accelerator_module.load_custom_state = load_custom_state
    try:
        yield
    finally:
        accelerator_module.load_custom_state = real


@contextlib.contextmanager
def _optimizer_state_as_saved(path: Path):
    """During ``accelerator.load_state`` under FSDP2: the optimizer holds state for exactly the
    parameters it held state for when saved.

    A trainable parameter that has not received a gradient yet (a head the method does not use, a
    branch behind an epoch gate) has no optimizer state. torch's FSDP2 loading assumes every trainable
    parameter has one: it first takes a zero step on all of them (Adam's ``step`` becomes 1), then
    refuses a checkpoint without their state (strict), and a sharded checkpoint's template asks for it.
    So the template is cut to the names the checkpoint holds, loading is not strict, and the states
    torch invented are dropped again (else such a parameter's first real update would use another
    bias correction than in the uninterrupted run). Without FSDP none of this is called."""
    import torch.distributed as dist
    import torch.distributed.checkpoint.state_dict as dcp_state_dict

    real_get, real_set = dcp_state_dict.get_optimizer_state_dict, dcp_state_dict.set_optimizer_state_dict
    sharded = path / "optimizer_0"  # Accelerate's SHARDED_STATE_DICT folder (FULL: optimizer.bin)

    def saved_in_shards() -> set[str]:
        from torch.distributed.checkpoint import FileSystemReader

        prefix = "optimizer.state."  # flattened "optimizer.state.<parameter name>.<state key>"
        keys = FileSystemReader(str(sharded)).read_metadata().state_dict_metadata
        return {k[len(prefix):].rsplit(".", 1)[0] for k in keys if k.startswith(prefix)}

    def get_optimizer_state_dict(model, optimizers, *, options=None):
        template = real_get(model, optimizers, options=options)
        if sharded.is_dir():
            names = saved_in_shards()
            template["state"] = {name: value for name, value in template["state"].items() if name in names}
        return template

    def set_optimizer_state_dict(model, optimizers, optim_state_dict, *, options=None):
        names = [set(optim_state_dict["state"]) if optim_state_dict else None]
        if dist.is_initialized():
            dist.broadcast_object_list(names, src=0)  # a FULL_STATE_DICT is read by the main process only
        options = dataclasses.replace(options or dcp_state_dict.StateDictOptions(), strict=False)
        real_set(model, optimizers, optim_state_dict, options=options)
        name_of = {id(p): name for name, p in model.named_parameters()}
        for optimizer in optimizers if isinstance(optimizers, (list, tuple)) else [optimizers]:
            for group in optimizer.param_groups:
                for parameter in group["params"]:
                    if name_of.get(id(parameter)) not in names[0]:
                        optimizer.state.pop(parameter, None)

    dcp_state_dict.get_optimizer_state_dict = get_optimizer_state_dict
    dcp_state_dict.set_optimizer_state_dict = set_optimizer_state_dict
    try:
        yield
    finally:
        dcp_state_dict.get_optimizer_state_dict = real_get
        dcp_state_dict.set_optimizer_state_dict = real_set


def load_checkpoint(accelerator, path: str | os.PathLike, progress: TrainerProgress) -> None:
    """Restore a `save_checkpoint` folder into the prepared objects, the RNGs and ``progress``
    without unpickling anything that could run code (see the module docstring).

    Must be called on every process. Raises `IncompatibleCheckpointError` when the folder is not a
    checkpoint or a file holds more than tensors/numbers (e.g. a pickled object)."""
    import pickle

    path = Path(path)
    if not (path / STATE_FILENAME).is_file():
        raise IncompatibleCheckpointError(f"{path} is not a stil checkpoint (no {STATE_FILENAME})")
    state = read_checkpoint_state(path)
    rng_file = path / RNG_STATE_PATTERN.format(accelerator.process_index)
    try:
        # accelerate skips RNG states it cannot read with only a log line: an exact resume needs them
        _safe_load(rng_file)
    except (OSError, RuntimeError, pickle.UnpicklingError, EOFError) as error:
        raise IncompatibleCheckpointError(
            f"cannot restore the random states from {rng_file} with weights_only=True ({type(error).__name__}: "
            f"{str(error).strip().splitlines()[0] if str(error).strip() else ''}); an exact resume needs them"
        ) from error
    try:
        with _safe_custom_states(progress), _optimizer_state_as_saved(path):
            accelerator.load_state(str(path), load_kwargs={"weights_only": True})
    except pickle.UnpicklingError as error:
        raise IncompatibleCheckpointError(
            f"{path} holds a file that is not plain tensors/numbers (refused by torch.load(weights_only=True)): "
            f"{str(error).strip().splitlines()[0]}"
        ) from error
    known = {f.name for f in dataclasses.fields(TrainerProgress)}
    progress.load_state_dict({k: v for k, v in state.items() if k in known})


def checkpoint_due(step: int, save_steps: int | None, eval_steps: int) -> bool:
    """The saving schedule: every ``save_steps`` steps, or at every evaluation when it is None (an
    improvement on validation and the last step are saved too: the trainer adds those)."""
    if save_steps is None:
        return step % eval_steps == 0
    return step % save_steps == 0


def protected_checkpoints(output_dir: str | os.PathLike, best: str | None, limit: int | None) -> set[str]:
    """What rotation must keep beside the newest ``limit``: the best checkpoint only when it is older
    (then limit + 1 folders); a best among the newest counts towards the limit."""
    if not best or limit is None:
        return set()
    newest = [p.name for p in list_checkpoints(checkpoints_root(output_dir))][-limit:]
    return set() if best in newest else {best}


def rotate_checkpoints(output_dir: str | os.PathLike, keep_last: int | None, protect: set[str] | None = None) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints, never those named in ``protect``; in a run
    folder with a manifest only the checkpoints it lists (a copied-in checkpoint is not the run's)."""
    from . import manifest

    if keep_last is None:
        return []
    protect = protect or set()
    listed = manifest.read(output_dir)
    found = [p for p in list_checkpoints(checkpoints_root(output_dir))
             if listed is None or manifest.owns(listed, f"{CHECKPOINTS_DIRNAME}/{p.name}")]
    candidates = [p for p in found if p.name not in protect]
    doomed = candidates[: max(0, len(candidates) - keep_last)]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    manifest.forget(output_dir, [f"{CHECKPOINTS_DIRNAME}/{p.name}" for p in doomed])
    return doomed
