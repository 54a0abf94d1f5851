"""scripts/run_benchmark_suite.py bookkeeping on a tiny table with a fake runner (no training).

Covers: missing recipes skipped with a note, dependency order and placeholder substitution, filters,
skip of finished runs (marker written for the same command), retry of failed runs, resume after an
interruption, aggregation (mean, sample std, wall time, failures), the markdown report and the PNGs.
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_suite():
    spec = importlib.util.spec_from_file_location("run_benchmark_suite", ROOT / "scripts" / "run_benchmark_suite.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["run_benchmark_suite"] = module
    spec.loader.exec_module(module)
    return module


suite = _load_suite()
Entry, Dataset = suite.Entry, suite.Dataset


@pytest.fixture()
def repo(tmp_path):
    """A fake repository root with two recipes (a third entry's recipe is missing)."""
    (tmp_path / "recipes").mkdir()
    for name in ("sup.yaml", "pre.yaml", "ssl.yaml"):
        (tmp_path / "recipes" / name).write_text("method: supervised\n")
    return tmp_path


DATASETS = {
    "toy": Dataset("toy", "toy data", {"synthetic_task": "multimodal", "labeled_fraction": 0.1}, {"max_steps": 5}),
    "toy_lm": Dataset("toy_lm", "toy landmarks", {"synthetic_task": "landmarks"}, {"max_steps": 5}),
}
ENTRIES = [
    Entry("supervised", "toy", "recipes/sup.yaml", {}, "baseline"),
    Entry("ceiling", "toy", "recipes/sup.yaml", {}, "ceiling", data_overrides={"labeled_fraction": 1.0}),
    Entry("pretrain", "toy", "recipes/pre.yaml", {"max_steps": 3}, "pretrain", run_key="shared/pretrain"),
    Entry("ssl_image", "toy", "recipes/ssl.yaml", {"model": "image-tiny", "init_from": "{pretrain}"}, "ssl"),
    Entry("absent", "toy", "recipes/absent.yaml", {}, "ssl"),
    Entry("needs_absent", "toy", "recipes/ssl.yaml", {"init_from": "{absent}"}, "ssl"),
    Entry("supervised", "toy_lm", "recipes/sup.yaml", {}, "baseline"),
]


class FakeRunner:
    """Returns made-up metrics; records the order of the runs; can fail chosen runs."""

    def __init__(self, fail=()):
        self.calls: list[str] = []
        self.fail = set(fail)

    def __call__(self, run, log_path):
        self.calls.append(run.id)
        log_path.write_text("log\n")
        if run.id in self.fail:
            raise RuntimeError("boom")
        if run.entry.kind == "pretrain":
            return {"best_step": 3, "probe": {"probe_accuracy": 0.3 + 0.01 * run.seed}}
        if run.entry.dataset == "toy_lm":
            return {"metric_for_best_model": "nme", "test": {"nme": 0.1 + 0.01 * run.seed}}
        return {"metric_for_best_model": "accuracy", "test": {"accuracy": 0.5 + 0.1 * run.seed, "macro_f1": 0.2}}


def _plan(repo, seeds=(0, 1), entries=ENTRIES, quick=False):
    return suite.plan_runs(entries, seeds, repo / "work", quick=quick, root=repo, datasets=DATASETS, python="python")


def test_plan_skips_missing_recipes_orders_dependencies_and_fills_placeholders(repo):
    runs, skipped = _plan(repo)
    assert {(e.name, why.split()[0]) for e, why in skipped} == {("absent", "recipes/absent.yaml"), ("needs_absent", "needs")}
    ids = [r.id for r in runs]
    assert ids.index("shared/pretrain/seed0") < ids.index("toy/ssl_image/seed0")
    assert len(ids) == len(set(ids)) == 2 * 5
    ssl = next(r for r in runs if r.id == "toy/ssl_image/seed1")
    cmd = ssl.command
    assert cmd[:3] == ["python", "train.py", "recipes/ssl.yaml"]
    assert cmd[cmd.index("--init_from") + 1] == "work/shared/pretrain/seed1/run"  # same seed, relative to the root
    assert cmd[cmd.index("--seed") + 1] == "1" and cmd[cmd.index("--model") + 1] == "image-tiny"
    assert cmd[cmd.index("--output_dir") + 1] == "work/toy/ssl_image/seed1/run"
    assert ssl.depends == ["shared/pretrain/seed1"]
    ceiling = next(r for r in runs if r.entry.name == "ceiling").command
    assert ceiling[ceiling.index("--labeled_fraction") + 1] == "1.0"  # data override beats the dataset's value
    pre = next(r for r in runs if r.entry.name == "pretrain").command
    assert pre[pre.index("--max_steps") + 1] == "3"  # entry override beats the dataset budget
    quick, _ = _plan(repo, quick=True)
    pre = next(r for r in quick if r.entry.name == "pretrain").command
    assert pre[pre.index("--max_steps") + 1] == str(suite.QUICK_OVERRIDES["max_steps"])


def test_filters(tmp_path):
    chosen = suite.select_entries(ENTRIES, ["ssl"], None)
    assert [e.name for e in chosen] == ["pretrain", "ssl_image"]  # its dependency comes along, in table order
    assert [e.name for e in suite.select_entries(ENTRIES, None, ["toy_lm"])] == ["supervised"]
    assert {e.name for e in suite.select_entries(ENTRIES, ["supervised", "ceiling"], ["toy"])} == {"supervised", "ceiling"}
    # the real table names a recipe for every method of issue 12 and has no duplicate keys per seed
    names = {e.name.split("_image")[0].split("_multimodal")[0] for e in suite.SUITE}
    for method in ("stil", "fixmatch", "simmatch", "comatch", "freematch", "mmatch", "co_training", "mean_teacher",
                   "mixmatch", "pseudo_label", "l2i_o", "l2i_l", "tip_pretrain", "supervised_tip_init"):
        assert method in names, method
    runs, _ = suite.plan_runs(suite.SUITE, [0], tmp_path / "runs", root=tmp_path / "no-repository")
    assert runs == []  # no recipe found: everything skipped, nothing planned


def test_execute_skips_finished_runs_and_retries_failed_ones(repo):
    runs, _ = _plan(repo)
    first = FakeRunner(fail={"toy/supervised/seed1", "shared/pretrain/seed0"})
    results = suite.execute(runs, first, progress=False, log=lambda *a: None)
    assert "toy/ssl_image/seed0" not in first.calls  # its pretraining failed: not started
    assert results["toy/ssl_image/seed0"]["status"] == "failed"
    assert results["toy/supervised/seed1"]["status"] == "failed"
    assert (repo / "work/toy/supervised/seed1" / suite.FAILED_FILE).is_file()
    marker = json.loads((repo / "work/toy/supervised/seed0" / suite.RESULT_FILE).read_text())
    assert marker["status"] == "ok" and marker["metrics"]["test"]["accuracy"] == 0.5 and "wall_seconds" in marker
    second = FakeRunner()
    results = suite.execute(runs, second, progress=False)
    assert sorted(second.calls) == sorted(["toy/supervised/seed1", "shared/pretrain/seed0", "toy/ssl_image/seed0"])
    assert all(r["status"] == "ok" for r in results.values())
    assert not (repo / "work/toy/supervised/seed1" / suite.FAILED_FILE).exists()
    third = FakeRunner()
    suite.execute(runs, third, progress=False)
    assert third.calls == []  # everything done: nothing runs again


def test_resume_after_interruption_and_changed_command(repo):
    runs, _ = _plan(repo)

    class Interrupt(FakeRunner):
        def __call__(self, run, log_path):
            if len(self.calls) == 3:
                raise KeyboardInterrupt
            return super().__call__(run, log_path)

    with pytest.raises(KeyboardInterrupt):
        suite.execute(runs, Interrupt(), progress=False)
    again = FakeRunner()
    suite.execute(runs, again, progress=False)
    assert again.calls == [r.id for r in runs][3:]  # the three finished runs are not repeated
    # a run whose command changed (other settings) is done again
    marker = runs[0].run_dir / suite.RESULT_FILE
    record = json.loads(marker.read_text())
    marker.write_text(json.dumps({**record, "command": record["command"] + " --max_steps 7"}))
    once_more = FakeRunner()
    suite.execute(runs, once_more, progress=False)
    assert once_more.calls == [runs[0].id]
    marker.write_text("{not json")  # a damaged marker counts as not done
    assert not suite.is_done(runs[0])


def test_aggregate_markdown_and_plots(repo):
    runs, skipped = _plan(repo, seeds=(0, 1, 2))
    results = suite.execute(runs, FakeRunner(fail={"toy/ceiling/seed2"}), progress=False, log=lambda *a: None)
    table = suite.aggregate(runs, results, ENTRIES)
    toy = {row.entry.name: row for row in table["toy"]}
    sup = toy["supervised"]
    assert sup.metric == "accuracy" and sup.values == pytest.approx([0.5, 0.6, 0.7])
    assert sup.mean == pytest.approx(0.6) and sup.std == pytest.approx(statistics.stdev([0.5, 0.6, 0.7]))
    assert len(sup.walls) == 3 and "--seed {seed}" in sup.command and "/seed{seed}" in sup.command
    assert toy["ceiling"].values == pytest.approx([0.5, 0.6]) and toy["ceiling"].failures[0].startswith("seed 2: boom")
    assert toy["pretrain"].metric == "probe_accuracy" and toy["pretrain"].mean == pytest.approx(0.31)
    assert table["toy_lm"][0].metric == "nme"
    # a shared run (run_key) is reported under every dataset whose table lists it
    shared = Entry("pretrain", "toy_lm", "recipes/pre.yaml", {"max_steps": 3}, "pretrain", run_key="shared/pretrain")
    again = suite.aggregate(runs, results, ENTRIES + [shared])
    assert [r.entry.name for r in again["toy_lm"]] == ["supervised", "pretrain"]
    assert again["toy_lm"][1].values == pytest.approx([0.30, 0.31, 0.32])
    plots = suite.write_plots(repo / "docs" / "results", table, DATASETS)
    assert set(plots) == {"toy", "toy_lm"}
    for path in plots.values():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = repo / "docs" / "results.md"
    suite.write_markdown(out, table, skipped, [0, 1, 2], False, 12.0, DATASETS, plots)
    text = out.read_text()
    assert "| supervised | baseline | accuracy | 0.600 ± 0.100 | 3 |" in text
    assert "| ceiling | ceiling | accuracy | 0.550 ± 0.071 | 2 |" in text and "failed: seed 2: boom" in text
    assert "![toy data](results/toy.png)" in text
    assert "| toy | absent | recipes/absent.yaml does not exist" in text
    assert "python train.py recipes/sup.yaml" in text and "Quick mode" not in text


def test_main_end_to_end_with_fake_runner(repo, capsys):
    runner = FakeRunner()
    argv = ["--quick", "--no_progress", "--work_dir", str(repo / "w"), "--datasets", "toy"]
    code = suite.main(argv, runner=runner, entries=ENTRIES, datasets=DATASETS, root=repo)
    assert code == 0
    report = repo / "w" / "results.md"
    assert "Quick mode" in report.read_text() and (repo / "w" / "results" / "toy.png").is_file()
    assert len(runner.calls) == 4  # one seed, four usable entries of toy
    again = FakeRunner()
    assert suite.main(argv, runner=again, entries=ENTRIES, datasets=DATASETS, root=repo) == 0 and again.calls == []
    assert suite.main(argv + ["--list"], runner=again, entries=ENTRIES, datasets=DATASETS, root=repo) == 0
    # a filtered invocation runs only its entries but reports everything already done
    assert suite.main(argv + ["--methods", "ceiling"], runner=again, entries=ENTRIES, datasets=DATASETS, root=repo) == 0
    assert again.calls == [] and "| supervised | baseline |" in report.read_text()
    assert "done  toy/supervised/seed0" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        suite.main(["--datasets", "nope"], runner=again, entries=ENTRIES, datasets=DATASETS, root=repo)
    failing = FakeRunner(fail={"toy/supervised/seed5"})
    assert suite.main(["--seeds", "5", "--no_progress", "--work_dir", str(repo / "w"), "--output", str(repo / "r.md"),
                       "--datasets", "toy"], runner=failing, entries=ENTRIES, datasets=DATASETS, root=repo) == 1


def test_parse_metrics_merges_json_lines():
    out = 'noise\n{"best_step": 3, "probe": {"probe_accuracy": 0.4}}\n{"best_step": 3, "test": {"accuracy": 0.9}}\n{bad\n'
    assert suite.parse_metrics(out) == {"best_step": 3, "probe": {"probe_accuracy": 0.4}, "test": {"accuracy": 0.9}}


def test_entry_needing_uncached_weights_is_skipped_with_the_fix_and_runs_once_cached(repo, tmp_path, monkeypatch):
    gated = Entry("pretrained", "toy", "recipes/sup.yaml", {}, "baseline", requires_cached=("timm/some_model", "model.safetensors"))
    monkeypatch.setattr(suite, "is_cached", lambda repo_id, filename: False)
    runs, skipped = _plan(repo, seeds=(0,), entries=[ENTRIES[0], gated])
    assert [r.entry.name for r in runs] == ["supervised"]
    (entry, why), = skipped
    assert entry is gated and "timm/some_model/model.safetensors" in why and "huggingface-cli download" in why
    monkeypatch.setattr(suite, "is_cached", lambda repo_id, filename: (repo_id, filename) == ("timm/some_model", "model.safetensors"))
    runs, skipped = _plan(repo, seeds=(0,), entries=[ENTRIES[0], gated])
    assert [r.entry.name for r in runs] == ["supervised", "pretrained"] and not skipped


def test_is_cached_reads_the_local_hub_cache_only(tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    assert not suite.is_cached("timm/test_resnet.r160_in1k", "model.safetensors")
    _fake_cache_entry(tmp_path, "timm/test_resnet.r160_in1k", "model.safetensors", b"x")
    assert suite.is_cached("timm/test_resnet.r160_in1k", "model.safetensors")


def _fake_cache_entry(cache: Path, repo_id: str, filename: str, payload: bytes) -> Path:
    """Lay out one file as huggingface_hub's cache does (refs/main -> snapshots/<commit>/<file>)."""
    folder = cache / ("models--" + repo_id.replace("/", "--"))
    commit = "0" * 40
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / filename).write_bytes(payload)
    return snapshot / filename


def test_pretrained_baseline_overrides_load_cached_timm_weights_into_the_image_encoder(tmp_path, monkeypatch):
    """What the suite's pretrained entries pass (--model_overrides image_pretrained) loads the cached weights."""
    import huggingface_hub.constants as constants
    import timm
    import torch
    from safetensors.torch import save_file

    from modeling_stil.presets import create_model

    reference = timm.create_model("test_resnet", pretrained=False, num_classes=0)
    with torch.no_grad():
        for p in reference.parameters():
            p.uniform_(-1, 1)  # far from any initialisation, so a load is unmistakable
    repo_id, filename = suite.PRETRAINED_TIMM
    path = _fake_cache_entry(tmp_path, repo_id, filename, b"")
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert suite.is_cached(repo_id, filename)
    model = create_model("image-tiny", **suite.PRETRAINED_IMAGE["model_overrides"])
    loaded = model.encoder_imaging.state_dict()
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(loaded[name], tensor, msg=name)


def _row(name, values, metric="accuracy", dataset="toy"):
    return suite.Row(Entry(name, dataset, "recipes/sup.yaml"), metric, list(values), [10.0] * len(values), [], "cmd")


def test_compare_verdicts_by_hand():
    worse = _row("supervised", [0.5, 0.6, 0.7])  # mean 0.6, std 0.1
    better = _row("ssl", [0.80, 0.82, 0.84])  # mean 0.82, std 0.02
    se = ((0.02 ** 2) / 3 + (0.1 ** 2) / 3) ** 0.5  # 0.0589
    diff, got_se, verdict = suite.compare(better, worse)
    assert diff == pytest.approx(0.22) and got_se == pytest.approx(se) and verdict == "holds"
    assert suite.compare(worse, better)[2] == "does not hold"
    assert suite.compare(_row("close", [0.62, 0.64, 0.66]), worse)[2] == "not separated"  # 0.04 < 2 x 0.0589
    # lower is better: a smaller NME is the better one
    lm_sup, lm_ssl = _row("supervised", [0.20, 0.21, 0.22], "nme"), _row("ssl", [0.10, 0.11, 0.12], "nme")
    diff, _, verdict = suite.compare(lm_ssl, lm_sup)
    assert diff == pytest.approx(0.10) and verdict == "holds"
    # one seed on either side: no noise estimate, so no verdict however large the difference
    diff, se, verdict = suite.compare(_row("ssl", [0.9]), worse)
    assert diff == pytest.approx(0.3) and se != se and verdict == suite.ONE_SEED


def test_report_has_delta_column_expected_orderings_and_total_cost(repo):
    table = {"toy": [_row("supervised", [0.5, 0.6, 0.7]), _row("ssl", [0.80, 0.82, 0.84]), _row("other", [0.1, 0.2, 0.3])],
             "toy_lm": [_row("supervised", [0.20, 0.21, 0.22], "nme", "toy_lm"), _row("ssl", [0.10, 0.11, 0.12], "nme", "toy_lm")]}
    checks = [suite.Check("toy", "ssl", "supervised", "why 1"), suite.Check("toy", "other", "supervised", "why 2"),
              suite.Check("toy_lm", "ssl", "supervised", "why 3"), suite.Check("toy", "missing", "supervised", "never")]
    out = repo / "results.md"
    suite.write_markdown(out, table, [], [0, 1, 2], False, 60.0, DATASETS, {}, checks, "See [analysis](a.md).")
    text = out.read_text()
    assert "| ssl | ssl | accuracy | 0.820 ± 0.020 | 3 | +0.220 | 10 s |" in text
    assert "| supervised | ssl | accuracy | 0.600 ± 0.100 | 3 |  | 10 s |" in text  # no delta against itself
    assert "Δ vs supervised (lower is better)" in text and "| ssl | ssl | nme | 0.110 ± 0.010 | 3 | -0.100 |" in text
    assert "| toy | ssl > supervised | why 1 | +0.220 ± 0.059 | **holds** |" in text
    assert "| toy | other > supervised | why 2 | -0.400 ± 0.082 | **does not hold** |" in text
    assert "| toy_lm | ssl > supervised | why 3 | +0.100 ± 0.008 | **holds** |" in text
    assert "never" not in text  # a check whose rows were not run is left out
    assert "every run in the table: **2.5 min** (0.04 h)" in text and "See [analysis](a.md)." in text  # 5 runs x 3 seeds x 10 s


def test_real_table_expectations_name_real_entries():
    names = {(e.dataset, e.name) for e in suite.SUITE}
    for check in suite.EXPECTED:
        assert (check.dataset, check.better) in names and (check.dataset, check.worse) in names, check
    assert all(suite.DATASETS[d].reference in {e.name for e in suite.SUITE if e.dataset == d} for d in suite.DATASETS)


def test_every_image_table_entry_trains_the_supervised_baselines_network():
    """The image table (and the digits, which reuse it) compares methods, not networks: every baseline
    and SSL entry resolves to the reference's model. L2I-O and L2I-L trained wrn-tiny until this round,
    a network 0.10 below image-tiny on the digits from labels alone (docs/results_analysis.md)."""
    from modeling_stil.training.arguments import parse_run_arguments

    def network(entry):
        args = [str(ROOT / entry.recipe)] + [f"--{k}={v}" for k, v in entry.overrides.items() if k == "model"]
        return parse_run_arguments(args).model.model

    entries = [e for e in suite.SUITE if e.dataset == "image" and e.kind in ("baseline", "ceiling", "ssl")
               and e.requires_cached is None]
    reference = next(e for e in entries if e.name == suite.DATASETS["image"].reference)
    assert {e.name for e in entries} >= {"fixmatch", "mean_teacher", "l2i_o", "l2i_l"}
    assert {e.name: network(e) for e in entries} == {e.name: network(reference) for e in entries}


def test_multimodal_views_follow_the_label_rate_they_were_chosen_at():
    """The multimodal Match, MMatch and co-training recipes train on the weak view; the 1 % table
    gives SimMatch, CoMatch and FreeMatch back the STiL repository's hard labelled view, and MMatch and
    co-training its stil view, which validation preferred there; STiL's recipe (1 %) keeps its original
    view and the 10 % table gives it the weak one (docs/results_analysis.md)."""
    from modeling_stil.training.arguments import parse_run_arguments

    def view(entry):
        args = [str(ROOT / entry.recipe)] + [f"--{k}={v}" for k, v in entry.overrides.items() if k in ("labeled_view", "view", "model")]
        method = parse_run_arguments(args).method
        return getattr(method, "labeled_view", None) or getattr(method, "view", None)

    entries = {(e.dataset, e.name): e for e in suite.SUITE if e.dataset in suite.MULTIMODAL}
    for name in ("simmatch_multimodal", "comatch_multimodal", "freematch_multimodal"):
        assert view(entries["multimodal_10pct", name]) == "weak"
        assert view(entries["multimodal_1pct", name]) == "hard"
    for name in ("mmatch", "co_training"):
        assert view(entries["multimodal_10pct", name]) == "weak"
        assert view(entries["multimodal_1pct", name]) == "stil"
    for name in ("stil", "stil_no_tip"):
        assert view(entries["multimodal_10pct", name]) == "weak"
        assert view(entries["multimodal_1pct", name]) == "stil"


# ------------------------------------------------------------------------------ the real digits benchmark
def test_digits_is_a_bring_your_own_dataset_with_the_image_table(repo):
    digits = suite.DATASETS["digits"]
    assert digits.build == "digits" and "synthetic_task" not in digits.data and digits.budget == suite.BUDGET
    names = {e.name for e in suite.SUITE if e.dataset == "digits"}
    assert {"supervised", "supervised_all_labels", *suite.IMAGE_SSL} <= names
    assert {(c.better, c.worse) for c in suite.EXPECTED if c.dataset == "digits"} == {(m, "supervised") for m in suite.IMAGE_SSL}
    entries = [Entry("supervised", "digits", "recipes/sup.yaml", {}, "baseline")]
    runs, _ = suite.plan_runs(entries, [1], repo / "work", root=repo, datasets=suite.DATASETS, python="python")
    command = runs[0].command
    assert command[command.index("--dataset") + 1] == "work/datasets/digits"  # the folder the CLI builds
    assert command[command.index("--labeled_fraction") + 1] == "0.05"
    assert "--synthetic_task" not in command


def test_digits_built_once_through_the_users_cli(repo):
    entries = [Entry("supervised", "digits", "recipes/sup.yaml", {}, "baseline")]
    runs, _ = suite.plan_runs(entries, [0, 1], repo / "work", root=repo, datasets=suite.DATASETS, python="python")
    commands = []

    def run_command(command):  # the real CLI, in process
        commands.append(command)
        spec = importlib.util.spec_from_file_location("prepare_dataset", ROOT / "scripts" / "prepare_dataset.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        assert module.run_cli(module.main, [str(repo / a) if a.startswith("work/") else a for a in command[2:]]) == 0

    assert suite.prepare_datasets(runs, repo / "work", run_command=run_command, log=lambda *a: None, root=repo) == ["digits"]
    assert commands[0][1] == "scripts/prepare_dataset.py" and commands[0][commands[0].index("--table") + 1] == (
        "work/datasets/digits_source/digits.csv")
    source = (repo / "work/datasets/digits_source/digits.csv").read_text().splitlines()
    assert source[0] == "path,label" and len(source) == 1 + 1797
    from data_utils.io import load_dataset

    dataset, metadata, _ = load_dataset(repo / "work/datasets/digits")
    sizes = {split: len(dataset[split]) for split in dataset}
    assert sum(sizes.values()) == 1797 and sizes["validation"] > 300 and sizes["test"] > 300
    labelled = sum(dataset["train"]["labeled"])
    assert 0.04 < labelled / sizes["train"] < 0.06 and len(metadata.label_names) == 10
    # built: the next call (a resumed suite) does nothing
    assert suite.prepare_datasets(runs, repo / "work", run_command=run_command, log=lambda *a: None, root=repo) == []
    assert len(commands) == 1


# ------------------------------------------------------------------------------ learning curves, time to beat
def _write_history(path, points, metric="accuracy"):
    """A train.py-like logs/metrics.jsonl: train records between the validation ones, the test record last."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for step, value in points:
        lines.append(json.dumps({"step": step, "split": "train", "loss": 1.0, metric: 0.0}))
        lines.append(json.dumps({"step": step, "split": "validation", metric: value, "num_samples": 10}))
    lines.append(json.dumps({"step": points[-1][0] if points else 0, "split": "test", metric: 0.99}))
    path.write_text("\n".join(lines) + "\n")


def test_validation_history_reads_the_validation_records_of_the_metric(tmp_path):
    path = tmp_path / "run/logs/metrics.jsonl"
    _write_history(path, [(100, 0.3), (200, 0.4), (200, 0.45)])  # step 200 logged twice (a resumed run): the last counts
    with open(path, "a") as handle:
        handle.write('{not json\n{"step": 300, "split": "validation", "macro_f1": 0.2}\n'
                     '{"step": 400, "split": "validation", "accuracy": NaN}\n')
    assert suite.read_validation_history(path, "accuracy") == {100: 0.3, 200: 0.45}  # no test, no train, no NaN
    assert suite.read_validation_history(path, "nme") == {}
    assert suite.read_validation_history(tmp_path / "absent.jsonl", "accuracy") == {}


def test_mean_curve_averages_the_seeds_that_evaluated_each_step():
    curve = suite.mean_curve([{100: 0.2, 200: 0.4}, {100: 0.4, 300: 0.9}, {}])
    assert list(curve) == [100, 200, 300] and curve == pytest.approx({100: 0.3, 200: 0.4, 300: 0.9})
    assert suite.mean_curve([]) == {}


def test_time_to_beat_by_hand():
    reference = {100: 0.40, 200: 0.45, 300: 0.50}
    assert suite.first_step_beating({100: 0.30, 200: 0.50, 300: 0.60}, reference) == (200, 300)
    assert suite.time_to_beat({100: 0.30, 200: 0.50, 300: 0.60}, reference) == "step 200"
    # ahead early, behind at the end: not beaten (a method must stay ahead from the step named on)
    assert suite.time_to_beat({100: 0.50, 200: 0.40, 300: 0.60}, reference) == "step 300"
    assert suite.time_to_beat({100: 0.50, 200: 0.50, 300: 0.45}, reference) == "not within 300 steps"
    # equal is not ahead; never ahead: "not within" the last step both evaluated
    assert suite.time_to_beat({100: 0.40, 200: 0.45, 300: 0.50}, reference) == "not within 300 steps"
    # missing steps: only steps both evaluated are compared (150 has no reference value, 300 none of the method)
    assert suite.first_step_beating({100: 0.1, 150: 0.99, 200: 0.2}, reference) == (None, 200)
    assert suite.time_to_beat({100: 0.1, 150: 0.99, 200: 0.2}, reference) == "not within 200 steps"
    assert suite.time_to_beat({150: 0.99}, reference) == "no validation step in common with the reference"
    # a run without history
    assert suite.time_to_beat({}, reference) == "no validation history"
    assert suite.first_step_beating({}, reference) == (None, None)
    # lower is better (landmark NME): the smaller value beats
    nme_reference = {100: 0.30, 200: 0.20}
    assert suite.time_to_beat({100: 0.35, 200: 0.15}, nme_reference, lower_is_better=True) == "step 200"
    # read as higher-is-better the same numbers are ahead at 100 and behind at 200: not beaten
    assert suite.time_to_beat({100: 0.35, 200: 0.15}, nme_reference) == "not within 200 steps"
    assert suite.time_to_beat({100: 0.25, 200: 0.15}, nme_reference, lower_is_better=True) == "step 100"
    assert suite.time_to_beat({100: 0.25, 200: 0.25}, nme_reference, lower_is_better=True) == "not within 200 steps"


def test_long_runs_plan_baselines_and_ssl_at_three_times_the_steps_in_their_own_folder(repo):
    orphan = Entry("orphan_pretrain", "toy", "recipes/pre.yaml", {}, "pretrain")  # nothing starts from it
    entries = ENTRIES + [orphan]
    chosen = suite.curve_entries(entries, None, ["toy"], DATASETS)
    assert [e.name for e in chosen] == ["supervised", "pretrain", "ssl_image", "absent", "needs_absent"]  # no ceiling
    runs, _ = suite.plan_runs(chosen, [0], repo / "work", root=repo, datasets=DATASETS, python="python", long=True)
    assert [r.id for r in runs] == ["long/toy/supervised/seed0", "long/shared/pretrain/seed0", "long/toy/ssl_image/seed0"]
    ssl = runs[2]
    assert ssl.depends == ["long/shared/pretrain/seed0"] and ssl.run_dir == repo / "work/long/toy/ssl_image/seed0"
    assert suite._option(ssl.command, "--init_from") == "work/long/shared/pretrain/seed0/run"
    assert suite._option(ssl.command, "--max_steps") == "15" and suite._option(ssl.command, "--eval_steps") == "100"
    assert suite._option(runs[1].command, "--max_steps") == "9"  # 3x the entry's own budget
    # the 3-seed runs' commands do not change (a resumed suite keeps its finished runs)
    plain, _ = suite.plan_runs(chosen, [0], repo / "work", root=repo, datasets=DATASETS, python="python")
    assert suite._option(plain[0].command, "--max_steps") == "5" and "long" not in " ".join(plain[0].command)
    assert suite.curve_entries(entries, ["orphan_pretrain"], None, DATASETS) == []
    # the reference comes along whatever --methods says (time to beat needs it)
    assert [e.name for e in suite.curve_entries(entries, ["ssl_image"], None, DATASETS)] == ["supervised", "pretrain", "ssl_image"]
    no_budget = {"toy": Dataset("toy", "toy data", {}, {})}
    with pytest.raises(ValueError, match="states no max_steps"):
        suite.plan_runs(chosen[:1], [0], repo / "work", root=repo, datasets=no_budget, long=True)


def test_real_table_long_runs(tmp_path):
    image = suite.curve_entries(suite.SUITE, None, ["image", "digits"])
    assert {e.kind for e in image} == {"baseline", "ssl"}
    assert {e.name for e in image if e.dataset == "digits"} >= {"supervised", *suite.IMAGE_SSL}
    multimodal = suite.curve_entries(suite.SUITE, None, ["multimodal_1pct"])
    assert "tip_pretrain" in {e.name for e in multimodal}  # stil and supervised_tip_init start from it
    assert not any(e.kind == "ceiling" for e in multimodal)
    short, _ = suite.plan_runs(suite.SUITE, [0, 1, 2], tmp_path / "w", root=ROOT)
    long, _ = suite.plan_runs(suite.curve_entries(suite.SUITE, None, None), [0], tmp_path / "w", root=ROOT, long=True)
    assert long and not {r.run_dir for r in long} & {r.run_dir for r in short}
    digits = next(r for r in long if r.id == "long/digits/fixmatch/seed0")
    assert suite._option(digits.command, "--max_steps") == str(3 * suite.BUDGET["max_steps"])
    assert suite._option(digits.command, "--dataset") == suite._option(short[0].command, "--dataset_cache_dir") + "/digits"


CURVE_DATASETS = {"toy": Dataset("toy", "toy data", {"synthetic_task": "multimodal"}, {"max_steps": 200, "eval_steps": 100})}
CURVE_ENTRIES = [
    Entry("supervised", "toy", "recipes/sup.yaml", {}, "baseline"),
    Entry("ceiling", "toy", "recipes/sup.yaml", {}, "ceiling", data_overrides={"labeled_fraction": 1.0}),
    Entry("ssl", "toy", "recipes/ssl.yaml", {}, "ssl"),
]


class HistoryRunner(FakeRunner):
    """Writes a validation history: supervised 0.5 + 0.0002 x step, ssl 0.3 + 0.001 x step (ahead after step 250)."""

    def __call__(self, run, log_path):
        metrics = super().__call__(run, log_path)
        max_steps, every = int(suite._option(run.command, "--max_steps")), int(suite._option(run.command, "--eval_steps"))
        start, slope = (0.3, 0.001) if run.entry.name == "ssl" else (0.5, 0.0002)
        steps = range(every, max_steps + 1, every)
        _write_history(run.run_dir / suite.HISTORY_FILE, [(s, start + slope * s + 0.01 * run.seed) for s in steps])
        return metrics


def test_curves_then_plain_invocation_write_one_report_with_both(repo):
    work, out = repo / "w", repo / "docs" / "results.md"
    argv = ["--no_progress", "--work_dir", str(work), "--output", str(out)]
    first = HistoryRunner()
    assert suite.main(argv, runner=first, entries=CURVE_ENTRIES, datasets=CURVE_DATASETS, root=repo) == 0
    text = out.read_text()
    assert "have not been run for any dataset" in text and "Longer budget" not in text
    assert "![toy data: validation curves](results/toy_curves.png)" in text
    assert "| ssl | not within 200 steps | 0.510 / 0.550 (step 200) |" in text  # means over seeds 0, 1, 2
    assert (out.parent / "results" / "toy_curves.png").read_bytes()[:4] == b"\x89PNG"
    long = HistoryRunner()
    assert suite.main(argv + ["--curves"], runner=long, entries=CURVE_ENTRIES, datasets=CURVE_DATASETS, root=repo) == 0
    assert long.calls == ["long/toy/supervised/seed0", "long/toy/ssl/seed0"]  # seed 0, no ceiling
    # long runs alone (another work folder): the dataset's section holds them, its 3-seed table says it is empty
    assert suite.main(["--no_progress", "--work_dir", str(repo / "w2"), "--output", str(repo / "r2.md"), "--curves"],
                      runner=HistoryRunner(), entries=CURVE_ENTRIES, datasets=CURVE_DATASETS, root=repo) == 0
    alone = (repo / "r2.md").read_text()
    assert "No run of this dataset's table has finished yet" in alone and "| ssl | step 300 |" in alone
    assert "| method | kind |" not in alone
    plain = HistoryRunner()
    assert suite.main(argv, runner=plain, entries=CURVE_ENTRIES, datasets=CURVE_DATASETS, root=repo) == 0
    assert plain.calls == []  # everything cached: the report is written from the markers and histories
    text = out.read_text()
    assert "were run for: toy." in text and "### Longer budget (seed 0, 600 steps)" in text
    assert "max_steps 600, evaluated every 100 steps" in text
    assert "| ssl | not within 200 steps |" in text  # the table's runs
    assert "| ssl | step 300 | 0.900 / 0.620 (step 600) | 0.500 |" in text  # inside the long runs
    assert "| supervised | (reference) | 0.620 (step 600) | 0.500 |" in text and "![toy data: validation curves, longer budget](results/toy_long_curves.png)" in text
    assert "--max_steps 600 --eval_steps 100 --seed 0 --output_dir w/long/toy/ssl/seed0/run" in text
    assert (out.parent / "results" / "toy_long_curves.png").is_file()
    with pytest.raises(SystemExit):
        suite.main(argv + ["--curves", "--seeds", "1"], runner=plain, entries=CURVE_ENTRIES, datasets=CURVE_DATASETS, root=repo)


def test_report_says_when_the_reference_has_no_history(repo):
    curves = {"toy": suite.CurveSection([suite.Curve(Entry("supervised", "toy", "r", kind="baseline"), "accuracy", {}, 0, 0.5),
                                         suite.Curve(Entry("ssl", "toy", "r"), "accuracy", {100: 0.9}, 1, 0.6)])}
    out = repo / "results.md"
    suite.write_markdown(out, {"toy": [_row("supervised", [0.5])]}, [], [0], False, 1.0, DATASETS, {}, [], None, curves)
    assert "No validation history of the reference entry supervised" in out.read_text()
    curves["toy"].curves[0].points = {100: 0.5}
    del curves["toy"].curves[1]  # the reference alone: no empty table
    suite.write_markdown(out, {"toy": [_row("supervised", [0.5])]}, [], [0], False, 1.0, DATASETS, {}, [], None, curves)
    assert "No SSL entry of this dataset has finished" in out.read_text() and "ahead of supervised from" not in out.read_text()


def test_runs_shared_by_both_label_rates_have_one_command_whatever_the_selection(tmp_path):
    """TIP pretraining and the fully labelled ceiling serve both multimodal tables from one folder; planned
    from the 10 % table alone they took its 400 steps and would overwrite the 1 % table's 600-step run."""
    def shared_commands(datasets):
        runs, _ = suite.plan_runs(suite.select_entries(suite.SUITE, None, datasets), [0], tmp_path / "w", root=ROOT)
        return {r.id: r.command for r in runs if r.entry.run_key}

    both = shared_commands(["multimodal_1pct", "multimodal_10pct"])
    assert set(both) == {"multimodal/tip_pretrain/seed0", "multimodal/supervised_all_labels/seed0"}
    assert shared_commands(["multimodal_10pct"]) == shared_commands(["multimodal_1pct"]) == both
    assert suite.DATASETS["multimodal_10pct"].budget["max_steps"] != suite.SHARED_MULTIMODAL_BUDGET["max_steps"]


def test_report_only_runs_nothing_and_reports_the_finished_runs_with_their_seed_counts(repo):
    work = ["--no_progress", "--work_dir", str(repo / "w"), "--datasets", "toy"]
    first = FakeRunner()
    assert suite.main(work + ["--seeds", "0", "--output", str(repo / "a.md")], runner=first, entries=ENTRIES,
                      datasets=DATASETS, root=repo) == 0 and first.calls
    idle = FakeRunner()
    assert suite.main(work + ["--report_only", "--output", str(repo / "b.md")], runner=idle, entries=ENTRIES,
                      datasets=DATASETS, root=repo) == 0
    assert idle.calls == []  # seeds 1 and 2 are not done, and nothing ran
    rows = [line for line in (repo / "b.md").read_text().splitlines() if line.startswith("| supervised | baseline |")]
    assert rows and "| 1 |" in rows[0]  # the seed column says how many seeds the row has


def test_a_dataset_with_no_run_here_keeps_its_section_and_commands_from_the_previous_report(repo):
    """A partial re-run (or a machine without the other datasets' run folders) rewrites what it ran and
    carries the rest of the report over verbatim, saying so; a dataset run again replaces its carried text."""
    import shutil

    out = repo / "results.md"
    work = ["--no_progress", "--work_dir", str(repo / "w"), "--seeds", "0", "--output", str(out)]
    assert suite.main(work, runner=FakeRunner(), entries=ENTRIES, datasets=DATASETS, root=repo) == 0
    first = out.read_text()
    assert "## toy landmarks" in first and "### toy_lm" in first and "Carried over" not in first
    shutil.rmtree(repo / "w" / "toy_lm")  # its runs are gone from this machine
    assert suite.main(work + ["--report_only"], runner=FakeRunner(), entries=ENTRIES, datasets=DATASETS, root=repo) == 0
    second = out.read_text()
    section = second.split("## toy landmarks")[1].split("\n## ")[0]
    assert "Carried over unchanged" in section and "--datasets toy_lm" in section
    assert section.count("| supervised | baseline |") == 1  # its table, once
    assert "### toy_lm" in second.split("## Exact commands")[1]
    assert second.split("### toy_lm")[1] == first.split("### toy_lm")[1]  # its commands byte for byte (the file's end)
    assert "Sections carried over from the previous report, not re-run by this invocation" in second
    assert second.index("## toy data") < second.index("## toy landmarks")  # the datasets' order
    # carried twice: one note, not two
    assert suite.main(work + ["--report_only"], runner=FakeRunner(), entries=ENTRIES, datasets=DATASETS, root=repo) == 0
    assert out.read_text().count("Carried over unchanged") == 1
    assert out.read_text() == second  # carrying over is stable: the same report, byte for byte
    # run again: the dataset's own section replaces the carried one
    assert suite.main(work + ["--datasets", "toy_lm"], runner=FakeRunner(), entries=ENTRIES, datasets=DATASETS, root=repo) == 0
    assert "Carried over" not in out.read_text()


def test_carry_over_takes_the_orderings_rows_and_long_commands_of_the_datasets_named():
    report = "\n".join([
        "# Benchmark results", "", "intro", "",
        "## toy data", "", "| supervised | baseline | accuracy |", "",
        "## toy landmarks", "", "| supervised | baseline | nme |", "", "### Longer budget (seed 0, 15 steps)", "", "curve", "",
        "## Expected orderings, checked", "", "| dataset | expected |", "|---|---|",
        "| toy | a > b | why | +0.1 | **holds** |", "| toy_lm | c > d | why | -0.1 | **does not hold** |", "",
        "## Exact commands", "", "### toy", "", "```", "python train.py a", "```", "",
        "### toy_lm", "", "```", "python train.py b", "```", "",
        "### toy_lm, longer budget (seed 0, 15 steps)", "", "```", "python train.py c", "```", ""])
    carried = suite.carry_over(report, ["toy_lm"], DATASETS)
    assert list(carried.sections) == ["toy_lm"] and "curve" in carried.sections["toy_lm"]
    assert "| supervised | baseline | nme |" in carried.sections["toy_lm"]
    assert carried.orderings == ["| toy_lm | c > d | why | -0.1 | **does not hold** |"]
    commands = "\n".join(carried.commands["toy_lm"])
    assert "python train.py b" in commands and "python train.py c" in commands and "train.py a" not in commands
    assert suite.carry_over(report, ["toy_lm"], {"toy": DATASETS["toy"]}).sections == {}  # unknown names: nothing
