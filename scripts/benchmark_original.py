#!/usr/bin/env python
"""Run the ORIGINAL STiL step harness (../shared/bench/original_step_bench.py) and add CPU time per step.

    STIL_ORIGINAL_SRC=<checkout of siyi-wind/STiL> python scripts/benchmark_original.py \\
        --harness ../shared/bench/original_step_bench.py [harness arguments, e.g. --bf16]

The harness is executed unchanged (``runpy``) in this process; its own output is printed as is. The
only addition: every ``time.perf_counter()`` call made *from the harness file* also records
``time.process_time()``, so each timed step gets the CPU time the process spent in it (all threads),
the load-independent figure that ``scripts/benchmark_train.py`` reports as ``compute_cpu_ms``.
Printed last, as one JSON line: the harness's step count, per-step CPU ms, and the 1-minute load
average before and after. Needs the harness's packages (see its docstring); no code of the original
is copied or written.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--harness", required=True, help="path of original_step_bench.py")
    args, rest = parser.parse_known_args()
    harness = os.path.abspath(args.harness)
    steps = 5
    if "--steps" in rest:
        steps = int(rest[rest.index("--steps") + 1])

    calls: list[tuple[float, float]] = []
    wall = time.perf_counter

    def perf_counter():
        now = wall()
        if sys._getframe(1).f_code.co_filename == harness:
            calls.append((now, time.process_time()))
        return now

    load_before = os.getloadavg()[0]
    time.perf_counter = perf_counter
    sys.argv = [harness, *rest]
    try:
        runpy.run_path(harness, run_name="__main__")
    finally:
        time.perf_counter = wall
    # The harness's first 2*steps perf_counter calls are (t0, end) of the timed steps.
    pairs = [(calls[2 * i], calls[2 * i + 1]) for i in range(steps)]
    result = {
        "harness_steps": steps,
        "step_ms_each": [round(1000 * (b[0] - a[0]), 1) for a, b in pairs],
        "step_cpu_ms_each": [round(1000 * (b[1] - a[1]), 1) for a, b in pairs],
        "step_cpu_ms": round(1000 * sum(b[1] - a[1] for a, b in pairs) / steps, 1),
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
