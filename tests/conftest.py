"""Suite-wide settings and the fixtures several test modules share.

Under pytest-xdist each worker gets one intra-op thread: two workers with torch's default of one
thread per core oversubscribe a 2-core machine, and tiny ops then spend most of their time waiting
for each other (a tiny TIP step measured 3 s instead of 0.02 s). Subprocesses inherit the setting, so
a result they recompute matches bit for bit.

Plain helpers (tiny networks, hand-made batches, trainer doubles) are in tests/helpers/; running
train.py and the scripts in-process is tests/_helpers.py."""

import os

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"  # subprocesses (CLI runs, remote-code loads) compute alike
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def synthetic_cache(tmp_path_factory):
    """The `--dataset_cache_dir` of the session's train.py runs: each synthetic dataset (task, rows,
    image size, labelled fraction) is built once, by the first run that asks for it, and read by every
    later one. A test that damages or moves a dataset works on a copy (or a cache of its own)."""
    return tmp_path_factory.mktemp("synthetic_cache")


@pytest.fixture(scope="session")
def loader_data():
    """(DatasetDict, metadata, schema) of tests/helpers/loader_data.py: 40 image+tabular training rows
    (4 labelled per class) and 10 validation rows. Tests read it, never change it."""
    from tests.helpers.loader_data import make_multimodal

    return make_multimodal()
