"""Suite-wide settings. Under pytest-xdist each worker gets one intra-op thread: two workers with
torch's default of one thread per core oversubscribe a 2-core machine, and tiny ops then spend most of
their time waiting for each other (a tiny TIP step measured 3 s instead of 0.02 s). Subprocesses
inherit the setting, so a result they recompute matches bit for bit."""

import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"  # subprocesses (CLI runs, remote-code loads) compute alike
    import torch

    torch.set_num_threads(1)
