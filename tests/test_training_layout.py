"""The rooms of issue 20: job.py is assembly only, the export does not import the job (no cycle), and the
data code that moved down from the job imports nothing of the models, methods or training."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _modules_after(statement: str, prefixes: tuple[str, ...]) -> list[str]:
    code = f"import sys; {statement}; print(sorted(m for m in sys.modules if m.startswith({prefixes!r})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    return eval(out.stdout.strip())  # noqa: S307 -- our own printed list


def test_the_export_does_not_import_the_job():
    assert _modules_after("import modeling_stil.training.export", ("modeling_stil.training.job",)) == []


def test_the_data_code_moved_out_of_the_job_imports_no_model_method_or_training_code():
    statement = ("import data_utils.preparation, data_utils.labeled_split, data_utils.fingerprint, data_utils.splits, "
                 "data_utils.synthetic, data_utils.builders.table")
    assert _modules_after(statement, ("modeling_stil",)) == []


def test_job_is_assembly_sized():
    assert len((ROOT / "modeling_stil" / "training" / "job.py").read_text().splitlines()) <= 350
