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


def requested_cpu_processes() -> int:
    """Processes asked of ``accelerate launch --cpu --num_processes N`` when accelerate started only one.

    Accelerate's CPU launcher starts a single process unless MPI is configured (it only exports
    MASTER_ADDR/PORT); we read N from the launcher's own command line (or its --config_file) and
    start the N gloo workers with torch.distributed.run ourselves."""
    if not _truthy(os.environ.get("ACCELERATE_USE_CPU")) or "MASTER_ADDR" not in os.environ:
        return 1
    if any(os.environ.get(k) for k in ("WORLD_SIZE", "LOCAL_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")):
        return 1
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as handle:
            parent = [a.decode() for a in handle.read().split(b"\0") if a]
    except OSError:
        return 1
    if "launch" not in parent:
        return 1
    value, config = None, None
    for i, arg in enumerate(parent):
        for flag in ("--num_processes", "--num-processes"):
            if arg == flag and i + 1 < len(parent):
                value = parent[i + 1]
            elif arg.startswith(flag + "="):
                value = arg.split("=", 1)[1]
        if arg == "--config_file" and i + 1 < len(parent):
            config = parent[i + 1]
    if value is None and config:
        import yaml

        try:
            value = (yaml.safe_load(open(config)) or {}).get("num_processes")
        except OSError:
            value = None
    try:
        return max(1, int(value)) if value is not None else 1
    except ValueError:
        return 1


ERROR_FILE_ENV = "STIL_WORKER_ERROR_FILE"


def spawn_cpu_workers(n: int, argv: list[str]) -> int:
    """Start ``n`` gloo workers on this machine (the static rendezvous torchrun would set up: RANK,
    WORLD_SIZE, MASTER_ADDR/PORT) and wait for them.

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
                WORLD_SIZE=str(n), LOCAL_WORLD_SIZE=str(n), GROUP_RANK="0")
    workers = []
    for rank in range(n):
        env = dict(base, RANK=str(rank), LOCAL_RANK=str(rank), **{ERROR_FILE_ENV: os.path.join(folder, f"rank{rank}.txt")})
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
    """The one error line: printed by the main process; another rank writes it to the file its launcher
    reads (``spawn_cpu_workers``) so that a multi-process run prints it once."""
    rank = int(os.environ.get("RANK", "0") or 0)
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
    from modeling_stil.training.arguments import ArgumentError, HelpRequested, parse_run_arguments
    from modeling_stil.training.checkpointing import CheckpointWriteError, IncompatibleCheckpointError
    from modeling_stil.training.hub import HubUploadError
    from modeling_stil.training.logging import TrackerUnavailableError
    from modeling_stil.training.job import build_and_train
    from modeling_stil.pretrained_init import InitFromError
    from modeling_stil.training.trainer import JobError, NonFiniteLossError

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
        print(f"train.py: error: {(error.strerror or str(error)).lower()} while writing {error.filename or 'the run files'} "
              f"(--output_dir {args.training.output_dir}); free space there or choose an --output_dir on a larger disk",
              file=sys.stderr)
        return 1
    summary = {k: results.get(k) for k in ("stopped_at_step", "best_step", "metric_for_best_model", "validation", "test", "train_seconds") if k in results}
    if results.get("reload_check"):
        summary["reload_check"] = results["reload_check"]
    print(json.dumps(summary, default=str))
    return 0


def check_arguments(argv: list[str]) -> int | None:
    """Before starting workers: a recipe/argument error (or --help) is answered once, by this process."""
    from modeling_stil.training.arguments import ArgumentError, HelpRequested, parse_run_arguments

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
    workers = requested_cpu_processes()
    if workers > 1:
        answered = check_arguments(sys.argv[1:])
        sys.exit(answered if answered is not None else spawn_cpu_workers(workers, sys.argv[1:]))
    sys.exit(main())
