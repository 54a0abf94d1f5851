#!/usr/bin/env python
"""Every method on the embedded synthetic benchmarks, several seeds, one command: ``docs/results.md``.

    python scripts/run_benchmark_suite.py                 # the whole table, 3 seeds (measured: 1 h 48 min on 2 CPU cores)
    python scripts/run_benchmark_suite.py --quick         # smoke check: 1 seed, a few dozen steps per run
    python scripts/run_benchmark_suite.py --methods stil,supervised_multimodal --datasets multimodal_1pct --seeds 0,1
    python scripts/run_benchmark_suite.py --curves --datasets image,digits   # longer-budget curves (seed 0, 3x the steps)
    python scripts/run_benchmark_suite.py --report_only   # the report from the runs finished so far (runs nothing)

What runs is the table ``SUITE`` below: one line per (method, dataset) with the recipe and the
overrides. A recipe that does not exist yet (a method not merged) is skipped with a note in the
report. Every run is ``python train.py RECIPE --key value ...`` in its own folder
``<work_dir>/<dataset>/<entry>/seed<k>``; the data are the embedded synthetic datasets, built by the
first run that needs them into ``<work_dir>/datasets`` (a clean cache of the suite's own). One real
dataset sits next to them: scikit-learn's 1,797 handwritten 8x8 digits (shipped with the package, no
network), which the suite writes out as a CSV + PNG folder and builds with
``scripts/prepare_dataset.py``, the command a user runs on their own images (``digits``, 5 % labelled).

Resumable: a run whose folder holds ``suite_result.json`` written for the same command is skipped
(train.py's own output is in the ``run/`` subfolder);
an interrupted or failed run is started again from scratch (``--overwrite_output_dir``). Runs that
initialise from another run (``init_from: "{tip_pretrain}"``) come after it.

Output: a markdown report (mean +- std over seeds of the test metric of the best-on-validation model,
wall time per run, the exact commands, the skipped entries) and one PNG bar chart with error bars
per dataset in ``<report folder>/results/``. ``--quick`` writes into ``runs/benchmark_suite_quick/``
so a smoke check never overwrites ``docs/results.md``.

Learning curves and time to beat: each dataset's section also plots (``<dataset>_curves.png``) the
validation headline metric (the table's metric: accuracy, or NME where lower is better) of every
baseline and SSL entry at each evaluation, mean over seeds, read from each run's
``run/logs/metrics.jsonl``, the reference entry in black; a small table gives, for every SSL entry, the
first evaluated step from which its mean validation metric beats the reference's at that step and every later one, or
"not within N steps". ``--curves`` runs, for the selected datasets, seed 0 of every baseline and SSL
entry (and the pretraining stage they start from; not the all-labels ceiling) at 3x the dataset's
max_steps, evaluated every 100 steps, in ``<work_dir>/long/`` (resumable like the rest, never sharing a
folder or a command with the 3-seed runs); every later report, plain invocations included, adds a
"longer budget" subsection (``<dataset>_long_curves.png`` and the same table, measured inside each long
run, whose schedules are those of the long run) for each dataset with finished long runs. So
``--curves --datasets image,digits`` then a plain invocation write one report with both; runs already
done are read from their markers and histories, not run again.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

ROOT = Path(__file__).resolve().parents[1]
RESULT_FILE = "suite_result.json"
FAILED_FILE = "suite_failed.json"
DEFAULT_SEEDS = (0, 1, 2)
ANALYSIS_FILE = "results_analysis.md"  # hand-written reading of the report, linked from it when present


# ==================================================================================================
# the table
# ==================================================================================================
@dataclass(frozen=True)
class Dataset:
    """One benchmark dataset: the synthetic data every run on it uses, and its step budget."""

    name: str
    title: str
    data: dict[str, Any]  # synthetic_task, synthetic_num_samples, synthetic_image_size, labeled_fraction
    budget: dict[str, Any] = field(default_factory=dict)  # max_steps / eval_steps for every run (entries may override)
    reference: str = "supervised"  # the baseline entry every row is compared with (the report's delta column)
    # a bring-your-own dataset: the suite writes its source files and builds it with the user's CLI
    # (scripts/prepare_dataset.py) into <work_dir>/datasets/<name>; runs read it with --dataset
    build: str | None = None  # key of BUILDERS


@dataclass(frozen=True)
class Entry:
    """One line of the table: method ``name`` on ``dataset`` with ``recipe`` and ``overrides``.

    ``kind``: ``baseline`` / ``ceiling`` / ``ssl`` (bars of the chart) or ``pretrain`` (a stage other
    entries start from, reported with its linear probe, not charted). ``run_key``: runs with the same
    key share one folder (e.g. the fully labelled ceiling, the same for both multimodal label
    fractions). An override value ``"{entry}"`` is replaced with that entry's run folder (same seed),
    which then runs first.
    """

    name: str
    dataset: str
    recipe: str
    overrides: dict[str, Any] = field(default_factory=dict)
    kind: str = "ssl"
    note: str = ""
    run_key: str | None = None
    data_overrides: dict[str, Any] = field(default_factory=dict)  # replaces the dataset's data values
    requires_cached: tuple[str, str] | None = None  # (hub repo, file) that must be in the local HF cache, else skipped

    @property
    def key(self) -> str:
        return self.run_key or f"{self.dataset}/{self.name}"


MM = dict(synthetic_task="multimodal", synthetic_num_samples=6000, synthetic_image_size=32)
# The step budget is the same for every method on a dataset (recipes of other sizes are overridden), so
# the comparison is at equal optimisation steps; the whole table is meant to fit 2 hours on 2 CPU cores
# (measured per-step costs x 177 runs: 500 steps came to about 2 h 20 min, 400 steps to about 1 h 45 min).
BUDGET = dict(max_steps=400, eval_steps=100)
# The paper's 1 % setting runs at the default job's budget (`make train`: 600 steps), so the suite's
# 3-seed comparison of STiL, TIP fine-tuning and the supervised model is the default job's setting
# with other seeds (issue 21: "in the suite, at the same setting"), not a shorter variant of it.
DEFAULT_JOB_BUDGET = dict(max_steps=600, eval_steps=100)
# Runs shared by both label rates (run_key: TIP pretraining, the fully labelled ceiling) state their own
# budget, so their command, and so their folder's result, is the same whichever table a selection plans
# first (with --datasets multimodal_10pct alone they would otherwise take its 400 steps and overwrite the
# 600-step run the 1 % table's runs start from).
SHARED_MULTIMODAL_BUDGET = DEFAULT_JOB_BUDGET
DATASETS = {
    d.name: d for d in [
        Dataset("multimodal_1pct", "synthetic multimodal (image + table), 1 % labelled", dict(MM, labeled_fraction=0.01), DEFAULT_JOB_BUDGET,
                "supervised_multimodal"),
        Dataset("multimodal_10pct", "synthetic multimodal (image + table), 10 % labelled", dict(MM, labeled_fraction=0.1), BUDGET,
                "supervised_multimodal"),
        Dataset("image", "synthetic image (CIFAR-like, 10 classes), 5 % labelled",
                dict(synthetic_task="image", synthetic_num_samples=4000, synthetic_image_size=32, labeled_fraction=0.05), BUDGET),
        Dataset("digits", "real handwritten digits (scikit-learn, 1,797 8x8 images, 10 classes), 5 % labelled",
                dict(labeled_fraction=0.05), BUDGET, build="digits"),
        Dataset("landmarks", "synthetic landmarks (AFLW-like faces, 5 keypoints), 10 % labelled",
                dict(synthetic_task="landmarks", synthetic_num_samples=2000, synthetic_image_size=60, labeled_fraction=0.1), BUDGET),
    ]
}
MULTIMODAL = ("multimodal_1pct", "multimodal_10pct")
IMAGE_ONLY = {"model": "image-tiny"}
TIP_INIT = {"init_from": "{tip_pretrain}"}
STIL_NET = {"model": "stil-tiny", "model_overrides": {"image_size": 32}}  # the network tip_pretrain initialises
# Every Match-family method sees 16 labelled + 48 unlabelled rows per step, as STiL, MMatch and co-training
# do in their synthetic recipes (the image FixMatch/FreeMatch recipes use USB's mu 7, which would make
# them see more unlabelled rows, and cost twice the time, of the others).
MU = {"mu": 3}
# Methods whose unlabelled terms switch on after `start_epoch` passes over the unlabelled rows: their
# recipes set it for 1,200-2,000-row datasets (25 steps an epoch); the multimodal benchmark has 3,600
# train rows (75 steps an epoch at 48 rows), so the same value would leave the terms on for only 100 of
# the 400 steps. Epoch 1 opens the gate at step 150, the same share of training as in the recipes.
# STiL's recipe states its gate relative to the run (start_fraction 0.07, which takes precedence over
# start_epoch), so its entries take the recipe's gate.
EARLY_GATE = {"start_epoch": 1}
# The multimodal SimMatch, CoMatch and FreeMatch recipes train their labelled rows on the weak view, and MMatch
# and co-training both streams, chosen on validation at their 10 % label rate; at 1 % the STiL repository's
# views (hard: crop 0.6-1, colour jitter, blur, 30 % corrupted; stil: crop down to 8 %, the same jitter and blur)
# were ahead on validation (seed 0: SimMatch 0.246 against 0.149, CoMatch 0.204 against 0.152, FreeMatch 0.149
# against 0.115, MMatch 0.247 against 0.167, co-training 0.261 against 0.228), so the 1 % table keeps them
# (recipe comments; docs/results_analysis.md).
HARD_LABELED_VIEW = {"labeled_view": "hard"}
ORIGINAL_SHARED_VIEW = {"view": "stil"}
# STiL's recipe (the default job's, 1 %) keeps its original view; at 10 % the weak view was ahead on validation
# (seed 0: 0.383 against 0.292, and 0.328 with the original view's image half off), so the 10 % table passes it.
WEAK_SHARED_VIEW = {"view": "weak"}
# The pretrained-backbone baseline: timm's ImageNet weights for the tiny presets' backbone (test_resnet),
# used only when already in the local Hugging Face cache (the suite never downloads).
PRETRAINED_TIMM = ("timm/test_resnet.r160_in1k", "model.safetensors")
PRETRAINED_IMAGE = {"model_overrides": {"image_pretrained": "test_resnet.r160_in1k"}}
# the SSL methods of the image-only and landmark tables (their entries and their expected orderings)
IMAGE_SSL = ("fixmatch", "simmatch", "comatch", "freematch", "mean_teacher", "mixmatch", "pseudo_label", "l2i_o", "l2i_l")
LANDMARK_SSL = ("pseudo_label", "mean_teacher", "l2i_o", "l2i_l")
# method -> (image-only recipe, multimodal recipe): the recipe names the method helpers use
MATCH_RECIPES = {
    "fixmatch": ("fixmatch_synthetic_image.yaml", "fixmatch_synthetic_multimodal.yaml"),
    "simmatch": ("simmatch_synthetic.yaml", "multimodal_simmatch_synthetic.yaml"),
    "comatch": ("comatch_synthetic.yaml", "multimodal_comatch_synthetic.yaml"),
    "freematch": ("freematch_synthetic_image.yaml", "multimodal_freematch_synthetic.yaml"),
}


def _multimodal_entries() -> list[Entry]:
    out = []
    for ds in MULTIMODAL:
        sup = "recipes/supervised_synthetic_multimodal.yaml"

        def one_percent(overrides: dict[str, Any]) -> dict[str, Any]:
            return dict(overrides) if ds == "multimodal_1pct" else {}

        def ten_percent(overrides: dict[str, Any]) -> dict[str, Any]:
            return dict(overrides) if ds == "multimodal_10pct" else {}

        out += [
            Entry("supervised_image", ds, sup, IMAGE_ONLY, "baseline", "image-only model (image-tiny), labelled rows only"),
            Entry("supervised_tabular", ds, "recipes/supervised_synthetic_tabular.yaml", {}, "baseline",
                  "tabular-only model (tabular-tiny), labelled rows only"),
            Entry("supervised_multimodal", ds, sup, {}, "baseline", "concat multimodal model, labelled rows only"),
            Entry("supervised_multimodal_all_labels", ds, sup, dict(SHARED_MULTIMODAL_BUDGET), "ceiling",
                  "every train row labelled: the ceiling of the supervised model", run_key="multimodal/supervised_all_labels",
                  data_overrides={"labeled_fraction": 1.0}),
            Entry("tip_pretrain", ds, "recipes/tip_synthetic.yaml", {"export": True, **SHARED_MULTIMODAL_BUDGET}, "pretrain",
                  "TIP self-supervised pretraining on every train row (no label); metric = linear probe on 10 % labels",
                  run_key="multimodal/tip_pretrain", data_overrides={"labeled_fraction": 0.1}),
            Entry("supervised_stil_net", ds, sup, STIL_NET, "baseline",
                  "STiL's network (stil-tiny), multimodal head trained on the labelled rows only, random init"),
            Entry("supervised_tip_init", ds, sup, {**STIL_NET, **TIP_INIT}, "baseline",
                  "the same, initialised from tip_pretrain on the same rows (TIP pretraining + fine-tuning)"),
            Entry("supervised_image_pretrained", ds, sup, {**IMAGE_ONLY, **PRETRAINED_IMAGE}, "baseline",
                  "image-only model with timm's ImageNet-pretrained backbone, fine-tuned on the labelled rows",
                  requires_cached=PRETRAINED_TIMM),
            Entry("supervised_multimodal_pretrained", ds, sup, PRETRAINED_IMAGE, "baseline",
                  "concat model with timm's ImageNet-pretrained image backbone, fine-tuned on the labelled rows",
                  requires_cached=PRETRAINED_TIMM),
            Entry("stil", ds, "recipes/stil_synthetic.yaml", {**TIP_INIT, **ten_percent(WEAK_SHARED_VIEW)}, "ssl",
                  "STiL started from tip_pretrain"),
            Entry("stil_no_tip", ds, "recipes/stil_synthetic.yaml", {"init_from": None, **ten_percent(WEAK_SHARED_VIEW)}, "ssl",
                  "STiL from random initialisation"),
            Entry("mmatch", ds, "recipes/mmatch_synthetic.yaml", {**EARLY_GATE, **one_percent(ORIGINAL_SHARED_VIEW)}, "ssl"),
            Entry("co_training", ds, "recipes/co_training_synthetic.yaml", {**EARLY_GATE, **one_percent(ORIGINAL_SHARED_VIEW)}, "ssl"),
        ]
        for method, (image_recipe, mm_recipe) in MATCH_RECIPES.items():
            gate = EARLY_GATE if method == "freematch" else {}  # the multimodal FreeMatch recipe gates at epoch 3
            view = one_percent(HARD_LABELED_VIEW) if method != "fixmatch" else {}
            out += [
                Entry(f"{method}_image", ds, f"recipes/{image_recipe}", {**IMAGE_ONLY, **MU}, "ssl", f"{method}, image-only model"),
                Entry(f"{method}_multimodal", ds, f"recipes/{mm_recipe}", {**MU, **gate, **view}, "ssl", f"Multimodal {method} (concat model)"),
            ]
        for method in ("mean_teacher", "pseudo_label", "l2i_l"):
            out.append(Entry(f"{method}_multimodal", ds, f"recipes/{method}_synthetic_multimodal.yaml", {}, "ssl"))
    return out


def _image_entries() -> list[Entry]:
    out = [
        Entry("supervised", "image", "recipes/supervised_synthetic_image.yaml", {}, "baseline", "labelled rows only"),
        Entry("supervised_all_labels", "image", "recipes/supervised_synthetic_image.yaml", {}, "ceiling",
              "every train row labelled", data_overrides={"labeled_fraction": 1.0}),
    ]
    recipes = {m: image for m, (image, _) in MATCH_RECIPES.items()}
    out.append(Entry("supervised_pretrained", "image", "recipes/supervised_synthetic_image.yaml", PRETRAINED_IMAGE, "baseline",
                     "timm's ImageNet-pretrained backbone fine-tuned on the labelled rows", requires_cached=PRETRAINED_TIMM))
    for method in IMAGE_SSL:
        overrides = MU if method in recipes else {}
        out.append(Entry(method, "image", f"recipes/{recipes.get(method, f'{method}_synthetic_image.yaml')}", overrides, "ssl"))
    return out


def _digits_entries() -> list[Entry]:
    """The image table's entries on the real digits: each method's synthetic image recipe, only the
    data changed (what a user does with their own images)."""
    return [Entry(e.name, "digits", e.recipe, e.overrides, e.kind, e.note, data_overrides=e.data_overrides,
                  requires_cached=e.requires_cached) for e in _image_entries()]


def _landmark_entries() -> list[Entry]:
    sup = "recipes/supervised_synthetic_landmarks.yaml"
    out = [
        Entry("supervised", "landmarks", sup, {}, "baseline", "labelled rows only"),
        Entry("supervised_all_labels", "landmarks", sup, {}, "ceiling", "every train row labelled",
              data_overrides={"labeled_fraction": 1.0}),
    ]
    for method in LANDMARK_SSL:
        out.append(Entry(method, "landmarks", f"recipes/{method}_synthetic_landmarks.yaml", {}, "ssl"))
    return out


SUITE: list[Entry] = _multimodal_entries() + _image_entries() + _digits_entries() + _landmark_entries()


@dataclass(frozen=True)
class Check:
    """An ordering the literature leads users to expect: ``better`` beats ``worse`` on ``dataset``.
    The report states whether the measured numbers show it; nothing is tuned to make it hold."""

    dataset: str
    better: str
    worse: str
    why: str


def _expected_orderings() -> list[Check]:
    out = []
    for ds in MULTIMODAL:
        out += [
            Check(ds, "supervised_multimodal_all_labels", "supervised_multimodal", "the fully labelled ceiling is above the few-label baseline"),
            Check(ds, "supervised_multimodal", "supervised_image", "the label depends on image and table jointly"),
            Check(ds, "supervised_multimodal", "supervised_tabular", "the label depends on image and table jointly"),
            Check(ds, "supervised_tip_init", "supervised_stil_net", "TIP pretraining on the unlabelled rows helps fine-tuning"),
            Check(ds, "stil", "supervised_multimodal", "STiL (CVPR 2025) beats the supervised multimodal baseline"),
            Check(ds, "stil", "supervised_tip_init", "STiL beats TIP fine-tuning on the labels alone"),
        ]
        out += [Check(ds, f"{m}_multimodal", f"{m}_image", "the multimodal variant beats the image-only one") for m in MATCH_RECIPES]
    out += [Check(ds, m, "supervised", "SSL beats the supervised baseline") for ds in ("image", "digits") for m in IMAGE_SSL]
    out += [Check("landmarks", m, "supervised", "SSL beats the supervised baseline") for m in LANDMARK_SSL]
    out += [Check("landmarks", "l2i_o", "mean_teacher", "L2I improves on its Mean Teacher base"),
            Check("landmarks", "l2i_l", "mean_teacher", "L2I improves on its Mean Teacher base")]
    return out


EXPECTED: list[Check] = _expected_orderings()

# --quick: every run short (a smoke check of the whole pipeline, numbers meaningless)
QUICK_OVERRIDES = {"max_steps": 40, "eval_steps": 20}
# every run: no trackers, no per-run plots, no export (unless the entry asks, e.g. a pretraining stage)
COMMON_OVERRIDES = {"report_to": "none", "plots": False, "export": False, "disable_tqdm": True, "overwrite_output_dir": True}

# --curves: the longer-budget learning curves. One seed of every baseline and SSL entry (and the stages
# they start from) at LONG_FACTOR x the dataset's max_steps, evaluated every LONG_EVAL_STEPS, in
# <work_dir>/long/ so they never share a folder with the 3-seed runs.
LONG_FACTOR = 3
LONG_EVAL_STEPS = 100
LONG_SEED = 0
LONG_FOLDER = "long"
CURVE_KINDS = ("baseline", "ssl")  # the entries drawn as learning curves (not the ceiling, not pretraining stages)
# train.py's evaluation history inside a run folder (its output_dir run/, modeling_stil.training.tracking.JSONL_LOG)
HISTORY_FILE = "run/logs/metrics.jsonl"


# ==================================================================================================
# planning
# ==================================================================================================
@dataclass
class Run:
    entry: Entry
    seed: int
    run_dir: Path
    command: list[str]
    depends: list[str]  # ids of the runs this run starts from
    prefix: str = ""  # "long/" for a longer-budget run (--curves), so its id never equals a 3-seed run's

    @property
    def id(self) -> str:
        return f"{self.prefix}{self.entry.key}/seed{self.seed}"


def is_cached(repo_id: str, filename: str) -> bool:
    """True when ``filename`` of Hub repo ``repo_id`` is in the local Hugging Face cache (no network)."""
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, filename), str)


def _placeholders(value: Any) -> list[str]:
    if isinstance(value, str) and value.startswith("{") and value.endswith("}"):
        return [value[1:-1]]
    return []


def _cli(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(", ", ": "))
    if value is None:
        return "null"
    return str(value)


def _shown(path: Path, root: Path) -> str:
    """A path as the command shows it: relative to the repository root (where train.py runs) when inside it."""
    path = Path(path).absolute()
    try:
        return str(path.relative_to(Path(root).absolute()))
    except ValueError:
        return str(path)


def select_entries(entries: Iterable[Entry], methods: list[str] | None, datasets: list[str] | None) -> list[Entry]:
    """Filter by method name (an entry's name or its prefix before ``_image``/``_multimodal``) and
    dataset; the entries a chosen one starts from (``"{name}"`` overrides) come along."""
    entries = list(entries)
    chosen = []
    for e in entries:
        if datasets and e.dataset not in datasets:
            continue
        if methods and not any(e.name == m or e.name.startswith(m + "_") or e.name.split("_")[0] == m for m in methods):
            continue
        chosen.append(e)
    return _with_dependencies(chosen, entries)


def _with_dependencies(chosen: list[Entry], entries: list[Entry]) -> list[Entry]:
    """``chosen`` and the entries they start from (``"{name}"`` overrides, transitively), in table order."""
    chosen = list(chosen)
    pending = list(chosen)
    while pending:
        e = pending.pop()
        for dep_name in (p for v in e.overrides.values() for p in _placeholders(v)):
            dep = next((x for x in entries if x.dataset == e.dataset and x.name == dep_name), None)
            if dep is not None and dep not in chosen:
                chosen.append(dep)
                pending.append(dep)
    order = {id(e): i for i, e in enumerate(entries)}
    return sorted(chosen, key=lambda e: order[id(e)])


def curve_entries(entries: Iterable[Entry], methods: list[str] | None, datasets: list[str] | None,
                  catalogue: dict[str, Dataset] | None = None) -> list[Entry]:
    """The entries of the longer-budget curve runs: every selected baseline and SSL entry, each dataset's
    reference entry (time to beat needs it, whatever --methods says), and the pretraining stages they
    start from (a stage nobody starts from and the all-labels ceiling are left out)."""
    entries = list(entries)
    catalogue = catalogue or DATASETS
    drawn = [e for e in select_entries(entries, methods, datasets) if e.kind in CURVE_KINDS]
    wanted = {e.dataset for e in drawn}
    drawn += [e for e in entries if e.dataset in wanted and e.name == catalogue[e.dataset].reference and e not in drawn]
    return _with_dependencies(drawn, entries)


def long_budget(max_steps: int | None, dataset: str) -> dict[str, int]:
    """The longer budget of a run whose suite budget is ``max_steps``: LONG_FACTOR x, evaluated every LONG_EVAL_STEPS."""
    if max_steps is None:
        raise ValueError(f"dataset {dataset!r} states no max_steps in its budget, so --curves cannot scale it; "
                         "add max_steps to its Dataset budget")
    return {"max_steps": LONG_FACTOR * max_steps, "eval_steps": LONG_EVAL_STEPS}


def plan_runs(entries: list[Entry], seeds: Iterable[int], work_dir: Path, quick: bool = False, root: Path = ROOT,
              datasets: dict[str, Dataset] | None = None, python: str = sys.executable,
              long: bool = False) -> tuple[list[Run], list[tuple[Entry, str]]]:
    """The runs to do, dependencies first, and the entries skipped with the reason. ``long``: the
    longer-budget runs of --curves (``long_budget`` steps, folders under ``<work_dir>/long/``)."""
    datasets = datasets or DATASETS
    by_key_name = {}
    for e in entries:
        by_key_name.setdefault((e.dataset, e.name), e)
    skipped: list[tuple[Entry, str]] = []
    usable: list[Entry] = []
    for e in entries:
        if not (root / e.recipe).is_file():
            skipped.append((e, f"{e.recipe} does not exist (method not merged yet)"))
        elif e.requires_cached and not is_cached(*e.requires_cached):
            repo, file = e.requires_cached
            skipped.append((e, f"{repo}/{file} is not in the local Hugging Face cache (the suite never downloads; "
                               f"fetch it once with `huggingface-cli download {repo} {file}` to include this baseline)"))
        else:
            usable.append(e)
    # an entry whose dependency is skipped or not selected is skipped too
    changed = True
    while changed:
        changed = False
        names = {(e.dataset, e.name) for e in usable}
        for e in list(usable):
            missing = [p for v in e.overrides.values() for p in _placeholders(v) if (e.dataset, p) not in names]
            if missing:
                usable.remove(e)
                skipped.append((e, f"needs {', '.join(missing)}, which is skipped or not selected"))
                changed = True
    runs: dict[str, Run] = {}
    order: list[str] = []
    prefix = f"{LONG_FOLDER}/" if long else ""
    for seed in seeds:
        def add(e: Entry) -> str:
            rid = f"{prefix}{e.key}/seed{seed}"
            if rid in runs:
                return rid
            deps = []
            values = dict(COMMON_OVERRIDES)
            if datasets[e.dataset].build:
                values["dataset"] = _shown(dataset_folder(work_dir, datasets[e.dataset]), root)
            values.update(datasets[e.dataset].data)
            values.update(e.data_overrides)
            values.update(datasets[e.dataset].budget)
            values.update(e.overrides)
            if long:
                values.update(long_budget(values.get("max_steps"), e.dataset))
            if quick:
                values.update(QUICK_OVERRIDES)
            run_dir = work_dir / prefix / e.key / f"seed{seed}"
            for k, v in list(values.items()):
                for dep_name in _placeholders(v):
                    dep = next(x for x in usable if x.dataset == e.dataset and x.name == dep_name)
                    deps.append(add(dep))
                    values[k] = _shown(runs[deps[-1]].run_dir / "run", root)
            # train.py writes into run/; the suite's own files (marker, log) sit beside it, so that
            # --overwrite_output_dir never meets files a run does not write
            values.update(seed=seed, output_dir=_shown(run_dir / "run", root), dataset_cache_dir=_shown(work_dir / "datasets", root))
            command = [python, "train.py", e.recipe] + [item for k, v in values.items() for item in (f"--{k}", _cli(v))]
            runs[rid] = Run(e, seed, run_dir, command, deps, prefix)
            order.append(rid)
            return rid

        for e in usable:
            add(e)
    return [runs[r] for r in order], skipped


# ==================================================================================================
# bring-your-own datasets
# ==================================================================================================
def dataset_folder(work_dir: Path, dataset: Dataset) -> Path:
    return Path(work_dir) / "datasets" / dataset.name


def write_digits_source(folder: Path) -> tuple[Path, list[str]]:
    """scikit-learn's 1,797 real 8x8 handwritten digits (shipped with the package, no network) as a
    user brings images: one grayscale PNG per row (intensities 0..16 scaled to 0..255) and a CSV
    ``path,label``. Returns the CSV and the ``scripts/prepare_dataset.py`` flags that build it:
    stratified 60/20/20 train/validation/test, 5 % of the train rows labelled."""
    import csv

    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    table = folder / "digits.csv"
    with open(table, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        for row, (pixels, label) in enumerate(zip(images, digits.target)):
            name = f"images/{row:04d}.png"
            Image.fromarray(pixels, mode="L").save(folder / name)
            writer.writerow([name, int(label)])
    flags = ["--image-column", "path", "--label-column", "label", "--val-fraction", "0.2", "--test-fraction", "0.2",
             "--labeled-fraction", "0.05", "--seed", "0"]
    return table, flags


BUILDERS: dict[str, Callable[[Path], tuple[Path, list[str]]]] = {"digits": write_digits_source}


def prepare_command(dataset: Dataset, work_dir: Path, python: str = sys.executable, root: Path = ROOT) -> list[str]:
    """Write the dataset's source files and return the user's command that builds it (run from ``root``)."""
    output = dataset_folder(work_dir, dataset)
    table, flags = BUILDERS[dataset.build](output.parent / f"{dataset.name}_source")
    return [python, "scripts/prepare_dataset.py", "--table", _shown(table, root), *flags,
            "--output", _shown(output, root), "--no-progress"]


def prepare_datasets(runs: list[Run], work_dir: Path, datasets: dict[str, Dataset] | None = None,
                     run_command: Callable[[list[str]], None] | None = None, log=print, root: Path = ROOT) -> list[str]:
    """Build every bring-your-own dataset the runs read and that is not built yet (a folder with
    ``dataset_dict.json``); returns the names built. ``run_command`` runs the CLI (default: a subprocess)."""
    datasets = datasets or DATASETS
    built = []
    for name in dict.fromkeys(run.entry.dataset for run in runs):
        dataset = datasets[name]
        if not dataset.build or (dataset_folder(work_dir, dataset) / "dataset_dict.json").is_file():
            continue
        command = prepare_command(dataset, work_dir, root=root)
        log(f"building {name}: {shlex.join(['python'] + command[1:])}")
        (run_command or _run_prepare)(command)
        built.append(name)
    return built


def _run_prepare(command: list[str]) -> None:
    proc = subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"building a dataset failed: {proc.stderr.strip()[-500:]}")


# ==================================================================================================
# running
# ==================================================================================================
def parse_metrics(stdout: str) -> dict[str, Any]:
    """Merge the JSON objects train.py prints (the summary last; the probe line before it)."""
    merged: dict[str, Any] = {}
    for line in stdout.splitlines():
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                merged.update(value)
    return merged


def subprocess_runner(run: Run, log_path: Path) -> dict[str, Any]:
    """Run train.py; returns its parsed results. Raises RuntimeError with the log's tail on failure."""
    env = dict(os.environ, HF_HUB_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "1"),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    with open(log_path, "w") as log:
        proc = subprocess.run(run.command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
        log.write(proc.stdout)
    if proc.returncode != 0:
        tail = log_path.read_text().strip().splitlines()[-3:]
        raise RuntimeError(f"exit status {proc.returncode}: {' | '.join(tail)}")
    metrics = parse_metrics(proc.stdout)
    if "test" not in metrics and "validation" not in metrics:
        raise RuntimeError("train.py printed no results")
    return metrics


def is_done(run: Run) -> bool:
    marker = run.run_dir / RESULT_FILE
    if not marker.is_file():
        return False
    try:
        stored = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return stored.get("command") == display_command(run)


def display_command(run: Run) -> str:
    """The command as a user types it (``python train.py ...`` from the repository root)."""
    return shlex.join(["python"] + run.command[1:])


def execute(runs: list[Run], runner: Callable[[Run, Path], dict[str, Any]] = subprocess_runner,
            progress: bool = True, log=print) -> dict[str, dict[str, Any]]:
    """Do every run not already done; returns run id -> stored result (``status`` ok / failed)."""
    from tqdm.auto import tqdm

    results: dict[str, dict[str, Any]] = {}
    failed: set[str] = set()
    bar = tqdm(runs, desc="benchmark suite", unit="run", disable=not progress)
    for run in bar:
        bar.set_postfix_str(run.id)
        if is_done(run):
            results[run.id] = json.loads((run.run_dir / RESULT_FILE).read_text())
            continue
        blocked = [d for d in run.depends if d in failed or d not in results]
        if blocked:
            failed.add(run.id)
            results[run.id] = {"status": "failed", "error": f"dependency {', '.join(blocked)} failed"}
            continue
        run.run_dir.mkdir(parents=True, exist_ok=True)
        (run.run_dir / RESULT_FILE).unlink(missing_ok=True)
        started = time.perf_counter()
        try:
            metrics = runner(run, run.run_dir / "suite.log")
        except Exception as error:  # a failed run is reported and retried next time, the suite goes on
            failed.add(run.id)
            record = {"status": "failed", "error": str(error)[:500], "command": display_command(run)}
            (run.run_dir / FAILED_FILE).write_text(json.dumps(record, indent=2))
            results[run.id] = record
            log(f"FAILED {run.id}: {record['error']}")
            continue
        record = {"status": "ok", "command": display_command(run), "wall_seconds": round(time.perf_counter() - started, 1),
                  "metrics": metrics, "entry": run.entry.name, "dataset": run.entry.dataset, "seed": run.seed}
        tmp = run.run_dir / (RESULT_FILE + ".tmp")
        tmp.write_text(json.dumps(record, indent=2, default=str))
        os.replace(tmp, run.run_dir / RESULT_FILE)  # the completed marker appears only whole
        (run.run_dir / FAILED_FILE).unlink(missing_ok=True)
        results[run.id] = record
    bar.close()
    return results


# ==================================================================================================
# aggregation and report
# ==================================================================================================
LOWER_IS_BETTER = {"nme", "rmse", "mae", "loss"}


def headline(metrics: dict[str, Any], kind: str) -> tuple[str, float] | None:
    """(metric name, value) reported for a run: the test value of metric_for_best_model (accuracy for
    classification, nme for landmarks); for a pretraining stage the linear probe accuracy."""
    if kind == "pretrain":
        probe = metrics.get("probe") or {}
        value = probe.get("probe_accuracy", probe.get("accuracy"))
        return ("probe_accuracy", float(value)) if isinstance(value, (int, float)) else None
    split = metrics.get("test") or metrics.get("validation") or {}
    name = metrics.get("metric_for_best_model")
    if not name or name not in split:
        name = next((k for k in ("accuracy", "nme", "rmse") if k in split), None)
    if name is None or not isinstance(split.get(name), (int, float)):
        return None
    return name, float(split[name])


@dataclass
class Row:
    entry: Entry
    metric: str | None
    values: list[float]
    walls: list[float]
    failures: list[str]
    command: str

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values) if self.values else math.nan

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0

    @property
    def wall(self) -> float:
        return statistics.fmean(self.walls) if self.walls else math.nan


def aggregate(runs: list[Run], results: dict[str, dict[str, Any]], entries: list[Entry]) -> dict[str, list[Row]]:
    """dataset -> one Row per entry (in table order) over its seeds."""
    by_key: dict[str, list[Run]] = {}
    for run in runs:  # a run shared by several entries (same run_key) is planned once, reported for each
        by_key.setdefault(run.entry.key, []).append(run)
    table: dict[str, list[Row]] = {}
    for e in entries:
        group = by_key.get(e.key, [])
        if not group:
            continue
        values, walls, failures, metric = [], [], [], None
        for r in group:
            record = results.get(r.id, {})
            if record.get("status") != "ok":
                failures.append(f"seed {r.seed}: {record.get('error', 'not run')}")
                continue
            found = headline(record.get("metrics", {}), e.kind)
            if found is None:
                failures.append(f"seed {r.seed}: no metric in the results")
                continue
            metric = found[0]
            values.append(found[1])
            walls.append(float(record.get("wall_seconds", math.nan)))
        command = display_command(group[0]).replace(f"--seed {group[0].seed}", "--seed {seed}").replace(
            f"/seed{group[0].seed}", "/seed{seed}")
        table.setdefault(e.dataset, []).append(Row(e, metric, values, walls, failures, command))
    return table


ONE_SEED = "one seed: no verdict"


def compare(better: Row, worse: Row) -> tuple[float, float, str]:
    """(difference in the metric's good direction, its standard error, verdict). The ordering holds when
    the difference exceeds two standard errors of the difference of the two seed means, fails when it is
    below minus two, and is "not separated" in between. A row with one seed has no noise estimate, so
    no verdict is drawn from it (``ONE_SEED``; the standard error is nan)."""
    sign = -1.0 if (better.metric or "") in LOWER_IS_BETTER else 1.0
    diff = sign * (better.mean - worse.mean)
    if min(len(better.values), len(worse.values)) < 2:
        return diff, math.nan, ONE_SEED
    se = math.sqrt(better.std ** 2 / len(better.values) + worse.std ** 2 / len(worse.values))
    if diff > 2 * se:
        verdict = "holds"
    elif diff < -2 * se:
        verdict = "does not hold"
    else:
        verdict = "not separated"
    return diff, se, verdict


# ==================================================================================================
# learning curves and time to beat the reference
# ==================================================================================================
def read_validation_history(path: Path, metric: str) -> dict[int, float]:
    """step -> validation ``metric`` from a run's ``logs/metrics.jsonl`` ({} when the file or the metric is
    absent). A step logged twice (a resumed run) keeps its last value; unreadable lines are skipped."""
    history: dict[int, float] = {}
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return history
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict) or record.get("split") != "validation":
            continue
        step, value = record.get("step"), record.get(metric)
        if isinstance(step, int) and isinstance(value, (int, float)) and not math.isnan(value):
            history[step] = float(value)
    return history


def mean_curve(histories: list[dict[int, float]]) -> dict[int, float]:
    """step -> mean over the histories (seeds) that evaluated that step, steps in increasing order."""
    steps = sorted({step for history in histories for step in history})
    return {step: statistics.fmean(h[step] for h in histories if step in h) for step in steps}


def first_step_beating(curve: dict[int, float], reference: dict[int, float],
                       lower_is_better: bool = False) -> tuple[int | None, int | None]:
    """(first step from which ``curve`` is strictly better than ``reference`` at that step and at every
    later step both evaluated, last step both evaluated). A method ahead early that falls behind again
    has not beaten the reference (None). Steps only one of them evaluated are not compared; (None, None)
    when they share none."""
    common = sorted(set(curve) & set(reference))
    sign = -1.0 if lower_is_better else 1.0
    first = None
    for step in reversed(common):  # walk back from the end while the method stays ahead
        if sign * (curve[step] - reference[step]) <= 0:
            break
        first = step
    return first, (common[-1] if common else None)


def time_to_beat(curve: dict[int, float], reference: dict[int, float], lower_is_better: bool = False) -> str:
    """The report's cell: ``step N``, ``not within N steps`` or why there is nothing to compare."""
    if not curve:
        return "no validation history"
    first, last = first_step_beating(curve, reference, lower_is_better)
    if last is None:
        return "no validation step in common with the reference"
    return f"step {first}" if first is not None else f"not within {last} steps"


@dataclass
class Curve:
    """One entry's validation curve: mean over its seeds of the headline metric at each evaluated step."""

    entry: Entry
    metric: str
    points: dict[int, float]
    seeds: int  # runs whose history was found
    test: float  # mean test value of the headline metric (the model selected on validation)


def collect_curves(runs: list[Run], results: dict[str, dict[str, Any]], entries: list[Entry]) -> dict[str, list[Curve]]:
    """dataset -> one Curve per baseline / SSL entry with a finished run (table order), read from each
    finished run's ``HISTORY_FILE``; the metric is the one the table reports for the entry."""
    by_key: dict[str, list[Run]] = {}
    for run in runs:
        by_key.setdefault(run.entry.key, []).append(run)
    curves: dict[str, list[Curve]] = {}
    for e in entries:
        if e.kind not in CURVE_KINDS or e.key not in by_key:
            continue
        metric, tests, histories = None, [], []
        for run in by_key[e.key]:
            record = results.get(run.id, {})
            found = headline(record.get("metrics", {}), e.kind) if record.get("status") == "ok" else None
            if found is None:
                continue
            metric = found[0]
            tests.append(found[1])
            history = read_validation_history(run.run_dir / HISTORY_FILE, metric)
            if history:
                histories.append(history)
        if metric is not None:
            curves.setdefault(e.dataset, []).append(Curve(e, metric, mean_curve(histories), len(histories), statistics.fmean(tests)))
    return curves


@dataclass
class CurveSection:
    """What a dataset's curves subsection shows: the curves, their plot, and how the runs were made."""

    curves: list[Curve]
    plot: Path | None = None
    max_steps: int | None = None  # the longer budget's steps (None: the table's own runs)
    eval_steps: int | None = None  # and its evaluation interval
    seed: int | None = None  # the longer budget's seed
    commands: list[str] = field(default_factory=list)
    wall_seconds: float = 0.0


def _curve_lines(section: CurveSection, ds: Dataset, report: Path, title: str, long: bool) -> list[str]:
    """The plot and the time-to-beat table of one dataset's curves (the table's runs or the longer budget)."""
    reference = next((c for c in section.curves if c.entry.name == ds.reference and c.points), None)
    lines = []
    if section.plot is not None:
        lines += [f"![{title}]({os.path.relpath(section.plot, report.parent)})", ""]
    if reference is None:
        return lines + [f"No validation history of the reference entry {ds.reference}: no time to beat.", ""]
    ssl = [c for c in section.curves if c.entry.kind == "ssl" and c is not reference]
    if not ssl:
        return lines + ["No SSL entry of this dataset has finished: no time to beat yet.", ""]
    lower = reference.metric in LOWER_IS_BETTER
    metric = f"validation {reference.metric}" + (" (lower is better)" if lower else "")
    head = f"| method | {metric} ahead of {ds.reference} from | at the last common step: method / {ds.reference} |"
    if long:
        head += f" test {reference.metric} (best on validation) |"
    lines += [head, "|---|---|---|" + ("---|" if long else "")]
    for c in ssl + ([reference] if long else []):
        _, last = first_step_beating(c.points, reference.points, lower)
        if c is reference:
            cell, at_last = "(reference)", f"{_fmt(c.points[last])} (step {last})"
        else:
            cell = time_to_beat(c.points, reference.points, lower)
            at_last = f"{_fmt(c.points[last])} / {_fmt(reference.points[last])} (step {last})" if last is not None else ""
        lines.append(f"| {c.entry.name} | {cell} | {at_last} |" + (f" {_fmt(c.test)} |" if long else ""))
    return lines + [""]


def _fmt(value: float, digits: int = 3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


@dataclass
class CarriedOver:
    """The parts of an earlier report about datasets this invocation has no run of: their sections, their
    rows of the orderings table and their commands, kept verbatim (a run folder lost or never copied to
    this machine does not erase a table the runs of another machine produced)."""

    sections: dict[str, list[str]] = field(default_factory=dict)  # dataset -> its "## " section's lines
    orderings: list[str] = field(default_factory=list)  # table rows, "| dataset | ..."
    commands: dict[str, list[str]] = field(default_factory=dict)  # dataset -> its "### " command blocks


CARRIED_NOTE = ("*Carried over unchanged from the previous report: no finished run of this dataset is in the work "
                "folder of the invocation that wrote this file. `--datasets {name}` runs it again.*")


def _blocks(lines: list[str], prefix: str) -> list[list[str]]:
    """``lines`` cut before every line starting with ``prefix`` (the first block: what precedes the first)."""
    blocks: list[list[str]] = [[]]
    for line in lines:
        if line.startswith(prefix):
            blocks.append([])
        blocks[-1].append(line)
    return blocks


def _ending_blank(block: list[str]) -> list[str]:
    """``block`` ending with one blank line, as the blocks write_markdown makes (the report's last block
    has none: the file ends without a newline)."""
    return block if block and not block[-1].strip() else block + [""]


def carry_over(report: str, names: Iterable[str], datasets: dict[str, Dataset]) -> CarriedOver:
    """What ``report`` (an earlier report's text) says about the datasets ``names``."""
    names = [n for n in names if n in datasets]
    titles = {f"## {datasets[n].title}": n for n in names}
    carried = CarriedOver()
    for block in _blocks(report.splitlines(), "## ")[1:]:
        heading = block[0].rstrip()
        if heading in titles:
            body = [line for line in block[1:] if not line.startswith("*Carried over unchanged")]
            while body and not body[0].strip():
                body = body[1:]
            carried.sections[titles[heading]] = _ending_blank([heading, "", CARRIED_NOTE.format(name=titles[heading]), ""] + body)
        elif heading == "## Expected orderings, checked":
            carried.orderings = [line for line in block if any(line.startswith(f"| {n} | ") for n in names)]
        elif heading == "## Exact commands":
            for sub in _blocks(block, "### ")[1:]:
                name = sub[0][4:].split(",")[0].strip()
                if name in names:
                    carried.commands.setdefault(name, []).extend(_ending_blank(sub))
    return carried


def write_markdown(path: Path, table: dict[str, list[Row]], skipped: list[tuple[Entry, str]], seeds: list[int],
                   quick: bool, total_seconds: float, datasets: dict[str, Dataset] | None = None,
                   plot_files: dict[str, Path] | None = None, checks: list[Check] | None = None,
                   notes: str | None = None, curves: dict[str, CurveSection] | None = None,
                   long_curves: dict[str, CurveSection] | None = None, carried: CarriedOver | None = None) -> None:
    """The report. ``curves``: each dataset's validation curves of the table's runs; ``long_curves``: those
    of the longer-budget runs (--curves), a subsection of the datasets they were run on; ``carried``: an
    earlier report's parts about datasets with no run here, kept as they were."""
    datasets = datasets or DATASETS
    carried = carried or CarriedOver()
    order = {name: i for i, name in enumerate(datasets)}
    plot_files = plot_files or {}
    curves = curves or {}
    long_curves = long_curves or {}
    checks = EXPECTED if checks is None else checks
    # the cost of the whole table: every run once (a run shared by two datasets' tables is counted once)
    counted: dict[str, float] = {}
    for rows in table.values():
        for row in rows:
            counted[row.entry.key] = sum(w for w in row.walls if not math.isnan(w))
    compute = sum(counted.values())
    long_run = [d for d in datasets if d in long_curves or any(line.startswith("### Longer budget")
                                                               for line in carried.sections.get(d, []))]
    lines = ["# Benchmark results", ""]
    lines += [
        "Produced by `python scripts/run_benchmark_suite.py" + (" --quick" if quick else "") + "` (do not edit by hand). "
        f"Seeds {', '.join(map(str, seeds))} (the seeds column says how many finished for each row); each cell is the mean ± standard deviation over seeds of the **test** "
        "metric of the model selected on validation; Δ is the difference of means to the dataset's supervised "
        "baseline; wall time is per run (start-up, training, evaluation), on this machine. "
        f"Sum of the wall times of every run in the table: **{compute / 60:.1f} min** ({compute / 3600:.2f} h); "
        f"this invocation: {total_seconds / 60:.1f} min (runs already done were skipped).", "",
        "Each dataset's section also draws every baseline's and SSL method's **validation** metric at each "
        "evaluation (mean over seeds) and gives the step at which each SSL method first beats the reference "
        "there (*time to beat*). Longer-budget curves (`--curves`: seed "
        f"{LONG_SEED}, {LONG_FACTOR}x the steps) " + (f"were run for: {', '.join(long_run)}." if long_run else
                                                     "have not been run for any dataset."), "",
    ]
    if carried.sections:
        lines += ["Sections carried over from the previous report, not re-run by this invocation (their wall times are "
                  f"not in the sum above): {', '.join(sorted(carried.sections, key=order.get))}.", ""]
    if notes:
        lines += [notes, ""]
    if quick:
        lines += ["**Quick mode: a smoke check with a few dozen steps per run; the numbers are not results.**", ""]
    ran = set(table) | set(long_curves)  # datasets with runs here; every other one shown is carried over
    for ds_name in [d for d in datasets if d in ran or d in carried.sections]:
        if ds_name not in ran:
            lines += carried.sections[ds_name]
            continue
        rows, ds = table.get(ds_name, []), datasets[ds_name]
        lines += [f"## {ds.title}", ""]
        data = ", ".join(f"{k} {v}" for k, v in ds.data.items())
        lines += [f"Data: {data}. Budget: {', '.join(f'{k} {v}' for k, v in ds.budget.items())} unless a line says otherwise.", ""]
        if ds_name in plot_files:
            lines += [f"![{ds.title}]({os.path.relpath(plot_files[ds_name], path.parent)})", ""]
        reference = next((r for r in rows if r.entry.name == ds.reference and r.values), None)
        lower = (reference.metric if reference else "") in LOWER_IS_BETTER
        if rows:
            lines += [f"| method | kind | test metric | mean ± std | seeds | Δ vs {ds.reference}{' (lower is better)' if lower else ''} "
                      "| wall time / run | note |", "|---|---|---|---|---|---|---|---|"]
        else:  # only longer-budget runs so far
            lines.append("No run of this dataset's table has finished yet (only the longer-budget runs below).")
        for row in rows:
            cell = ("failed" if not row.values else f"{_fmt(row.mean)} (one seed)" if len(row.values) == 1
                    else f"{_fmt(row.mean)} ± {_fmt(row.std)}")
            delta = (f"{row.mean - reference.mean:+.3f}" if reference is not None and row.values and row.metric == reference.metric
                     and row is not reference else "")
            note = row.entry.note
            if row.failures:
                note = (note + "; " if note else "") + "failed: " + "; ".join(row.failures)
            lines.append(f"| {row.entry.name} | {row.entry.kind} | {row.metric or 'n/a'} | {cell} | {len(row.values)} | "
                         f"{delta} | {_fmt(row.wall, 0)} s | {note} |")
        lines.append("")
        if ds_name in curves and curves[ds_name].curves:
            how = (f"Validation metric at every evaluation, mean over the seeds, {ds.reference} in black. Time to "
                   f"beat: the first evaluated step from which an SSL method's mean validation metric is better than "
                   f"{ds.reference}'s at that step and at every later one (no noise margin: the verdicts with one are the "
                   f"orderings below).")
            lines += [f"### Learning curves and time to beat {ds.reference}", "", how, ""]
            lines += _curve_lines(curves[ds_name], ds, path, f"{ds.title}: validation curves", long=False)
        if ds_name in long_curves:
            section = long_curves[ds_name]
            budget = "the smoke check's" if quick else f"{LONG_FACTOR}x the table's"
            what = (f"What was run: seed {section.seed} of every baseline and SSL entry of this dataset (and the "
                    f"pretraining stage they start from), at {budget} budget: max_steps {section.max_steps}, evaluated "
                    f"every {section.eval_steps} steps (`--curves`, run folders `<work_dir>/{LONG_FOLDER}/`; commands at "
                    f"the end). Time to beat is measured inside each long run against {ds.reference}'s long run at the "
                    "same step: every learning-rate schedule (and any schedule stated relative to the run's length) is "
                    f"that of the {section.max_steps}-step run, so a point at the table's budget is not the table's "
                    "shorter run. One seed: no noise estimate. Sum of the wall times of these runs: "
                    f"{section.wall_seconds / 60:.1f} min.")
            lines += [f"### Longer budget (seed {section.seed}, {section.max_steps} steps)", "", what, ""]
            lines += _curve_lines(section, ds, path, f"{ds.title}: validation curves, longer budget", long=True)
    by_name = {(ds_name, row.entry.name): row for ds_name, rows in table.items() for row in rows if row.values}
    measured = [(c, by_name[(c.dataset, c.better)], by_name[(c.dataset, c.worse)]) for c in checks
                if (c.dataset, c.better) in by_name and (c.dataset, c.worse) in by_name]
    if measured or carried.orderings:
        lines += ["## Expected orderings, checked", "",
                  "What the papers lead one to expect, against these numbers: an ordering *holds* when the better "
                  "method's mean is ahead by more than two standard errors of the difference (seed noise), *does not "
                  "hold* when it is behind by as much, and is *not separated* in between; with one seed on either side "
                  "there is no noise estimate and no verdict. Nothing was tuned to make an ordering hold.", "",
                  "| dataset | expected | because | difference ± s.e. | verdict |", "|---|---|---|---|---|"]
        ordered: list[tuple[int, str]] = []
        for c, better, worse in measured:
            diff, se, verdict = compare(better, worse)
            spread = f"{diff:+.3f}" if math.isnan(se) else f"{diff:+.3f} ± {se:.3f}"
            ordered.append((order.get(c.dataset, len(order)), f"| {c.dataset} | {c.better} > {c.worse} | {c.why} | {spread} | **{verdict}** |"))
        ordered += [(order.get(row.split(" | ")[0][2:], len(order)), row) for row in carried.orderings]
        lines += [row for _, row in sorted(ordered, key=lambda item: item[0])]  # stable: each dataset's rows keep their order
        lines.append("")
    if skipped:
        lines += ["## Skipped", "", "| dataset | method | why |", "|---|---|---|"]
        for e, why in skipped:
            lines.append(f"| {e.dataset} | {e.name} | {why} |")
        lines.append("")
    lines += ["## Exact commands", "", "From the repository root; `{seed}` is each of the seeds above.", ""]
    for ds_name in [d for d in datasets if d in ran or d in carried.commands]:
        if ds_name not in ran:
            lines += carried.commands[ds_name]
            continue
        if ds_name in table:
            lines += [f"### {ds_name}", "", "```"]
            lines += [row.command for row in table[ds_name]]
            lines += ["```", ""]
        if ds_name in long_curves:
            section = long_curves[ds_name]
            lines += [f"### {ds_name}, longer budget (seed {section.seed}, {section.max_steps} steps)", "", "```"]
            lines += section.commands
            lines += ["```", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines))
    os.replace(tmp, path)


def write_plots(folder: Path, table: dict[str, list[Row]], datasets: dict[str, Dataset] | None = None) -> dict[str, Path]:
    """One bar chart with error bars (std over seeds) per dataset; pretraining stages are not charted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = datasets or DATASETS
    colours = {"baseline": "#7f7f7f", "ceiling": "#2ca02c", "ssl": "#1f77b4"}
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for ds_name, rows in table.items():
        rows = [r for r in rows if r.entry.kind != "pretrain" and r.values]
        if not rows:
            continue
        fig, ax = plt.subplots(figsize=(max(4.0, 0.55 * len(rows) + 1.5), 4.2))
        xs = range(len(rows))
        ax.bar(xs, [r.mean for r in rows], yerr=[r.std for r in rows], capsize=3,
               color=[colours.get(r.entry.kind, "#1f77b4") for r in rows])
        ax.set_xticks(list(xs))
        ax.set_xticklabels([r.entry.name for r in rows], rotation=60, ha="right", fontsize=8)
        metric = rows[0].metric or "metric"
        ax.set_ylabel(f"test {metric}" + (" (lower is better)" if metric in LOWER_IS_BETTER else ""))
        ax.set_title(datasets[ds_name].title, fontsize=9)
        from matplotlib.patches import Patch  # noqa: PLC0415

        kinds = [k for k in colours if any(r.entry.kind == k for r in rows)]
        ax.legend(handles=[Patch(color=colours[k], label=k) for k in kinds], fontsize=7, loc="upper left",
                  bbox_to_anchor=(1.0, 1.0))
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        path = folder / f"{ds_name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written[ds_name] = path
    return written


def write_curve_plots(folder: Path, curves: dict[str, list[Curve]], datasets: dict[str, Dataset] | None = None,
                      suffix: str = "_curves", subtitle: str = "", marks: dict[str, int] | None = None) -> dict[str, Path]:
    """One learning-curve plot per dataset (``<dataset><suffix>.png``): validation metric against step, one
    line per baseline (dashed) and SSL entry (solid), the dataset's reference black and thicker, the
    legend outside the axes so ~15 lines stay readable. ``marks``: dataset -> the table's budget, drawn as a
    dotted vertical line on a longer-budget plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    datasets = datasets or DATASETS
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for ds_name, lines in curves.items():
        lines = [c for c in lines if c.points]
        if not lines:
            continue
        reference = datasets[ds_name].reference
        palette = plt.get_cmap("tab20").colors
        fig, ax = plt.subplots(figsize=(8.5, 4.6))
        others = [c for c in lines if c.entry.name != reference]
        for i, c in enumerate(others):
            ax.plot(list(c.points), list(c.points.values()), marker="o", markersize=3, linewidth=1.3,
                    linestyle="--" if c.entry.kind == "baseline" else "-", color=palette[i % len(palette)],
                    label=f"{c.entry.name} ({c.entry.kind})")
        for c in lines:
            if c.entry.name == reference:  # drawn last, on top
                ax.plot(list(c.points), list(c.points.values()), marker="o", markersize=4, linewidth=3.0,
                        color="black", label=f"{c.entry.name} (reference)", zorder=5)
        if marks and ds_name in marks:
            ax.axvline(marks[ds_name], color="grey", linestyle=":", linewidth=1.2, label=f"the table's budget ({marks[ds_name]} steps)")
        metric = lines[0].metric
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 2.5, 5, 10]))
        ax.set_xlabel("step")
        ax.set_ylabel(f"validation {metric}" + (" (lower is better)" if metric in LOWER_IS_BETTER else ""))
        ax.set_title(datasets[ds_name].title + (f"\n{subtitle}" if subtitle else ""), fontsize=9)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = folder / f"{ds_name}{suffix}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written[ds_name] = path
    return written


# ==================================================================================================
# command line
# ==================================================================================================
def _split(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def main(argv: list[str] | None = None, runner: Callable[[Run, Path], dict[str, Any]] = subprocess_runner,
         entries: list[Entry] | None = None, datasets: dict[str, Dataset] | None = None, root: Path = ROOT) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke check: first seed only, a few dozen steps per run")
    parser.add_argument("--methods", help="comma-separated entry names or method prefixes (e.g. fixmatch,stil)")
    parser.add_argument("--datasets", help=f"comma-separated, of {', '.join(datasets or DATASETS)}")
    parser.add_argument("--seeds", help="comma-separated seeds (default 0,1,2; --quick: 0)")
    parser.add_argument("--work_dir", help="run folders (default runs/benchmark_suite, --quick: runs/benchmark_suite_quick)")
    parser.add_argument("--output", help="markdown report (default docs/results.md, --quick: <work_dir>/results.md); "
                                         "plots go to <its folder>/results/")
    parser.add_argument("--curves", action="store_true",
                        help=f"run the longer-budget learning curves of the selected datasets: seed {LONG_SEED} of every "
                             f"baseline and SSL entry at {LONG_FACTOR}x the steps, evaluated every {LONG_EVAL_STEPS}, in "
                             f"<work_dir>/{LONG_FOLDER}/; every report (this one and later plain invocations) includes them")
    parser.add_argument("--list", action="store_true", help="print the planned runs and exit")
    parser.add_argument("--report_only", action="store_true",
                        help="run nothing: write the report from the runs already finished (each row states its seed count)")
    parser.add_argument("--no_progress", action="store_true")
    args = parser.parse_args(argv)
    datasets = datasets or DATASETS
    entries = SUITE if entries is None else entries
    wanted = _split(args.datasets)
    unknown = [d for d in wanted or [] if d not in datasets]
    if unknown:
        parser.error(f"unknown dataset(s) {unknown}; choose from {', '.join(datasets)}")
    if args.curves and args.seeds:
        parser.error(f"--curves runs seed {LONG_SEED} only (one long run per entry); drop --seeds")
    try:
        seeds = [int(s) for s in _split(args.seeds)] if args.seeds else ([DEFAULT_SEEDS[0]] if args.quick else list(DEFAULT_SEEDS))
    except ValueError:
        parser.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    chosen = (curve_entries(entries, _split(args.methods), wanted, datasets) if args.curves
              else select_entries(entries, _split(args.methods), wanted))
    if not chosen:
        parser.error("no entry matches --methods/--datasets" + (" (--curves runs baseline and ssl entries)" if args.curves else ""))
    work_dir = Path(args.work_dir or (root / ("runs/benchmark_suite_quick" if args.quick else "runs/benchmark_suite")))
    output = Path(args.output) if args.output else (work_dir / "results.md" if args.quick else root / "docs" / "results.md")
    try:
        runs, skipped = plan_runs(chosen, [LONG_SEED] if args.curves else seeds, work_dir, quick=args.quick, root=root,
                                  datasets=datasets, long=args.curves)
    except ValueError as error:
        parser.error(str(error))
    for e, why in skipped:
        print(f"skip {e.dataset}/{e.name}: {why}")
    if args.list:
        for run in runs:
            print(("done  " if is_done(run) else "to do ") + run.id + "\n    " + display_command(run))
        return 0
    started = time.perf_counter()
    if args.report_only:
        runs, fresh = [], {}
    else:
        prepare_datasets(runs, work_dir, datasets, root=root)
        fresh = execute(runs, runner, progress=not args.no_progress)
    # the report covers the whole table and every longer-budget run: runs not selected this time count
    # when already done (their markers and histories are read, nothing is run again)
    everything, skipped_all = plan_runs(entries, seeds, work_dir, quick=args.quick, root=root, datasets=datasets)
    results = _finished(everything, {} if args.curves else fresh)
    reported = [run for run in everything if run.id in results]
    folder = output.parent / "results"
    table = aggregate(reported, results, entries)
    plots = write_plots(folder, table, datasets)
    found = collect_curves(reported, results, entries)
    curve_plots = write_curve_plots(folder, found, datasets)
    curves = {d: CurveSection(c, curve_plots.get(d)) for d, c in found.items()}
    long_curves = _long_sections(entries, work_dir, args.quick, root, datasets, fresh if args.curves else {}, folder)
    analysis = output.parent / ANALYSIS_FILE
    notes = (f"Why the orderings below come out as they do, with the evidence: [{ANALYSIS_FILE}]({ANALYSIS_FILE})."
             if analysis.is_file() and not args.quick else None)
    # datasets with nothing finished here keep what the report already says of them (unless it is a smoke check)
    absent = [d for d in datasets if d not in table and d not in long_curves]
    carried = (carry_over(output.read_text(), absent, datasets) if absent and output.is_file() and not args.quick
               else CarriedOver())
    write_markdown(output, table, skipped_all, seeds, args.quick, time.perf_counter() - started, datasets, plots,
                   EXPECTED if entries is SUITE else [], notes, curves, long_curves, carried)
    failed = [rid for rid, r in fresh.items() if r.get("status") != "ok"]
    print(f"wrote {output} and {len(plots) + len(curve_plots) + len(long_curves)} plot(s); "
          f"{len(runs) - len(failed)} of {len(runs)} runs ok" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def _finished(runs: list[Run], fresh: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """run id -> result: this invocation's (``fresh``), else the stored marker of a run already done."""
    results = {}
    for run in runs:
        if run.id in fresh:
            results[run.id] = fresh[run.id]
        elif is_done(run):
            results[run.id] = json.loads((run.run_dir / RESULT_FILE).read_text())
    return results


def _option(command: list[str], flag: str) -> str | None:
    return command[command.index(flag) + 1] if flag in command else None


def _long_sections(entries: list[Entry], work_dir: Path, quick: bool, root: Path, datasets: dict[str, Dataset],
                   fresh: dict[str, dict[str, Any]], folder: Path) -> dict[str, CurveSection]:
    """dataset -> its longer-budget subsection, for every dataset with a finished long run (others: none)."""
    scalable = [d for d, ds in datasets.items() if isinstance(ds.budget.get("max_steps"), int)]
    long_entries = curve_entries(entries, None, scalable, datasets)
    planned, _ = plan_runs(long_entries, [LONG_SEED], work_dir, quick=quick, root=root, datasets=datasets, long=True)
    results = _finished(planned, fresh)
    reported = [run for run in planned if run.id in results]
    curves = collect_curves(reported, results, entries)
    table_budget = {d: ds.budget["max_steps"] for d, ds in datasets.items() if d in scalable and not quick}
    plots = write_curve_plots(folder, curves, datasets, "_long_curves", f"longer budget, seed {LONG_SEED}", table_budget)
    sections = {}
    for ds_name, lines in curves.items():
        keys = {e.key for e in long_entries if e.dataset == ds_name}
        runs = [run for run in reported if run.entry.key in keys]
        drawn = [run for run in runs if run.entry.kind in CURVE_KINDS]  # what the curves show (a stage may differ)
        steps = [int(_option(run.command, "--max_steps")) for run in drawn if "--max_steps" in run.command]
        every = [int(_option(run.command, "--eval_steps")) for run in drawn if "--eval_steps" in run.command]
        walls = [float(results[run.id].get("wall_seconds", 0.0)) for run in runs if results[run.id].get("status") == "ok"]
        sections[ds_name] = CurveSection(lines, plots.get(ds_name), max(steps, default=None), min(every, default=None),
                                         LONG_SEED, [display_command(run) for run in runs], sum(walls))
    return sections


if __name__ == "__main__":
    sys.exit(main())
