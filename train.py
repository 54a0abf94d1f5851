#!/usr/bin/env python
"""Train, select, test and export a stil model.

    accelerate launch [--config_file accelerate_configs/X.yaml] train.py [RECIPE.yaml] [--key value ...]

With no arguments: the default job (recipes/default.yaml's values are the argument defaults):
the supervised multimodal baseline on the embedded synthetic image+tabular dataset, evaluated on
validation, best model tested, exported to runs/default and reloaded with AutoModel.from_pretrained.
`python train.py --help` lists every key. Exit status: 0 done, 1 run failed, 2 bad arguments.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _truthy(value: str | None) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes")


def requested_cpu_layout() -> tuple[int, int, int]:
    """``(processes on this machine, machines, this machine's rank)`` asked of ``accelerate launch --cpu
    --num_processes N [--num_machines M --machine_rank R]``; (1, 1, 0) when nothing is left for us to start.

    Accelerate's CPU launcher starts a single process per machine unless MPI is configured (it only
    exports MASTER_ADDR/PORT); we read N (all machines together, as accelerate counts it), M and R from
    the launcher's own command line (or its --config_file) and start this machine's N / M gloo workers
    ourselves (`spawn_cpu_workers`)."""
    if not _truthy(os.environ.get("ACCELERATE_USE_CPU")) or "MASTER_ADDR" not in os.environ:
        return 1, 1, 0
    if any(os.environ.get(k) for k in ("WORLD_SIZE", "LOCAL_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")):
        return 1, 1, 0
    parent = _launcher_argv()
    if parent is None:
        return 1, 1, 0
    config = _launcher_config(parent)

    def value(key: str, default: int) -> int:
        given = _flag_value(parent, key)
        given = config.get(key) if given is None else given
        try:
            return int(given) if given is not None else default
        except ValueError:
            return default

    machines = max(1, value("num_machines", 1))
    rank = min(max(0, value("machine_rank", 0)), machines - 1)
    return max(1, value("num_processes", 1) // machines), machines, rank


def _launcher_argv() -> list[str] | None:
    """The command line of ``accelerate launch`` when it started this process, else None."""
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as handle:
            parent = [a.decode() for a in handle.read().split(b"\0") if a]
    except OSError:
        return None
    return parent if "launch" in parent else None


def _launcher_config(parent: list[str]) -> dict:
    path = _flag_value(parent, "config_file")
    if not path:
        return {}
    import yaml

    try:
        with open(path) as handle:
            return yaml.safe_load(handle) or {}
    except (OSError, yaml.YAMLError):
        return {}


def cpu_engine_refusal() -> str | None:
    """Why this CPU launch, which asks for FSDP or DeepSpeed, cannot run as asked; None when it can.

    ``accelerate launch --cpu`` starts Accelerate's plain launcher, which passes no FSDP/DeepSpeed
    setting on, so the run would silently train with DDP over gloo. FSDP on the CPU is launched
    without ``--cpu`` (``accelerate_configs/fsdp_cpu.yaml``: Accelerate's FSDP launcher, and
    `make_accelerator` runs FSDP2 on the CPU); DeepSpeed there is refused by `make_accelerator`."""
    if not _truthy(os.environ.get("ACCELERATE_USE_CPU")):
        return None
    parent = _launcher_argv()
    if parent is None:
        return None
    asked = str(_launcher_config(parent).get("distributed_type", "")).upper()
    if "--use_fsdp" in parent or asked == "FSDP":
        engine = "FSDP"
    elif "--use_deepspeed" in parent or asked == "DEEPSPEED":
        engine = "DeepSpeed"
    else:
        return None
    from modeling_stil.training.accelerator import cpu_engine_message

    return cpu_engine_message(engine)


def _flag_value(argv: list[str], name: str) -> str | None:
    """The value of ``--name`` (or ``--name-with-dashes``) in a launcher's argv, ``--flag value`` or ``--flag=value``."""
    value = None
    for i, arg in enumerate(argv):
        for flag in (f"--{name}", f"--{name.replace('_', '-')}"):
            if arg == flag and i + 1 < len(argv):
                value = argv[i + 1]
            elif arg.startswith(flag + "="):
                value = arg.split("=", 1)[1]
    return value


ERROR_FILE_ENV = "STIL_WORKER_ERROR_FILE"


def spawn_cpu_workers(n: int, argv: list[str], num_machines: int = 1, machine_rank: int = 0) -> int:
    """Start ``n`` gloo workers on this machine, ranks ``machine_rank * n ...`` of ``n * num_machines``
    (the static rendezvous torchrun would set up: RANK, WORLD_SIZE, MASTER_ADDR/PORT of the main
    machine) and wait for them.

    Started directly rather than through torchrun, so a failed run ends with the error line of the
    main process only, not torchrun's ChildFailedError report. When one worker fails the others are
    stopped (they would wait for it forever); a line that only another rank printed (its error file)
    is printed here, once."""
    import glob
    import shutil
    import subprocess
    import tempfile
    import time

    folder = tempfile.mkdtemp(prefix="stil-workers-")
    base = dict(os.environ, ACCELERATE_USE_CPU="True", MASTER_PORT=os.environ.get("MASTER_PORT", "29500"),
                WORLD_SIZE=str(n * num_machines), LOCAL_WORLD_SIZE=str(n), GROUP_RANK=str(machine_rank))
    workers = []
    for rank in range(n):
        env = dict(base, RANK=str(machine_rank * n + rank), LOCAL_RANK=str(rank),
                   **{ERROR_FILE_ENV: os.path.join(folder, f"rank{rank}.txt")})
        workers.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), *argv], env=env))
    failed_at = None
    try:
        while any(w.poll() is None for w in workers):
            if failed_at is None and any(w.poll() not in (None, 0) for w in workers):
                failed_at = time.monotonic()
            if failed_at is not None and time.monotonic() - failed_at > 10:  # the others are stuck in a collective
                for w in workers:
                    if w.poll() is None:
                        w.terminate()
            time.sleep(0.1)
    except KeyboardInterrupt:
        for w in workers:
            w.terminate()
        raise
    finally:
        for w in workers:
            w.wait()
        codes = [w.returncode for w in workers]
        lines = [open(p).read().strip() for p in sorted(glob.glob(os.path.join(folder, "rank*.txt")))]
        shutil.rmtree(folder, ignore_errors=True)
    if all(c == 0 for c in codes):
        return 0
    if codes[0] <= 0 and lines:  # the main process printed nothing (stopped, or it did not fail): another rank's line
        print(lines[0], file=sys.stderr)
    return next((c for c in codes if c > 0), 1)


def report_error(message: str) -> None:
    """The one error line: printed by the first process of each machine; another rank writes it to the
    file its launcher reads (``spawn_cpu_workers``) so that a multi-process run prints it once per machine."""
    rank = int(os.environ.get("LOCAL_RANK") or os.environ.get("RANK") or 0)  # each machine's first process
    if rank == 0:
        print(message, file=sys.stderr)
    elif os.environ.get(ERROR_FILE_ENV):
        with open(os.environ[ERROR_FILE_ENV], "w") as handle:
            handle.write(message + "\n")


def main(argv: list[str] | None = None) -> int:
    from data_utils.loaders import LoaderError
    from data_utils.schema import SchemaError
    from data_utils.splits import SplitError
    from data_utils.synthetic import SyntheticConfigError
    from data_utils.views import ViewError
    from modeling_stil.configuration_common import DataCompatibilityError
    from modeling_stil.training.arguments import parse_run_arguments
    from modeling_stil.training.recipe_reading import ArgumentError, HelpRequested
    from modeling_stil.training.checkpointing import CheckpointWriteError, IncompatibleCheckpointError
    from modeling_stil.training.hub import HubUploadError
    from modeling_stil.training.tracking import TrackerUnavailableError
    from modeling_stil.training.job import build_and_train
    from modeling_stil.pretrained_init import InitFromError
    from modeling_stil.training.divergence import NonFiniteLossError
    from modeling_stil.training.errors import JobError

    try:
        args = parse_run_arguments(argv)
    except HelpRequested as request:
        print(request.text)  # help is asked for: stdout, exit status 0
        return 0
    except ArgumentError as error:
        report_error(f"train.py: {error}")
        return 2
    try:
        results = build_and_train(args)
    except (NonFiniteLossError, IncompatibleCheckpointError, TrackerUnavailableError, HubUploadError, FileExistsError,
            FileNotFoundError, LoaderError, SchemaError, SplitError, SyntheticConfigError, ViewError,
            DataCompatibilityError, JobError, InitFromError, CheckpointWriteError) as error:
        # Bad input and failed runs end with one line naming the problem and the fix, not a traceback.
        report_error(f"train.py: error: {error}")
        return 1
    except OSError as error:  # a full disk while writing a log, a plot or the export (checkpoints: above)
        import errno

        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        report_error(f"train.py: error: {(error.strerror or str(error)).lower()} while writing "
                     f"{error.filename or 'the run files'} (--output_dir {args.training.output_dir}); free space "
                     "there or choose an --output_dir on a larger disk")
        return 1
    summary = {k: results.get(k) for k in ("stopped_at_step", "best_step", "metric_for_best_model", "validation", "test", "train_seconds") if k in results}
    if results.get("reload_check"):
        summary["reload_check"] = results["reload_check"]
    print(json.dumps(summary, default=str))
    return 0


def check_arguments(argv: list[str]) -> int | None:
    """Before starting workers: a recipe/argument error (or --help) is answered once, by this process."""
    from modeling_stil.training.arguments import parse_run_arguments
    from modeling_stil.training.recipe_reading import ArgumentError, HelpRequested

    try:
        parse_run_arguments(argv)
    except HelpRequested as request:
        print(request.text)
        return 0
    except ArgumentError as error:
        print(f"train.py: {error}", file=sys.stderr)
        return 2
    return None


if __name__ == "__main__":
    refusal = cpu_engine_refusal()
    if refusal:
        print(f"train.py: error: {refusal}", file=sys.stderr)
        sys.exit(1)
    workers, machines, machine_rank = requested_cpu_layout()
    if workers > 1 or machines > 1:
        answered = check_arguments(sys.argv[1:])
        sys.exit(answered if answered is not None else spawn_cpu_workers(workers, sys.argv[1:], machines, machine_rank))
    sys.exit(main())
