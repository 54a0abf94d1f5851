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


def _module_level_imports(path: Path, package_root: Path) -> set[str]:
    """The project modules a file imports at module level (imports inside functions are deferred on purpose
    and cannot form an import-time cycle)."""
    import ast

    module = ".".join(path.relative_to(package_root).with_suffix("").parts)
    if module.endswith(".__init__"):
        module = module[: -len(".__init__")]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return {name for name in found if name.split(".")[0] in ("modeling_stil", "data_utils")}


def test_no_import_cycle_between_project_modules():
    files = {}
    for top in ("modeling_stil", "data_utils"):
        for path in (ROOT / top).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            files[name.removesuffix(".__init__")] = path
    graph = {name: {m for m in _module_level_imports(path, ROOT) if m in files and m != name} for name, path in files.items()}
    # a package's __init__ importing its own submodules is how packages expose names, not a cycle
    graph = {name: {m for m in deps if not (files[name].name == "__init__.py" and m.startswith(name + "."))}
             for name, deps in graph.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(trail[trail.index(nxt):] + [nxt] if nxt in trail else [node, nxt])
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, f"module-level import cycles: {cycles[:5]}"


def test_no_training_module_over_500_lines():
    long = {p.name: n for p in (ROOT / "modeling_stil" / "training").glob("*.py")
            if (n := len(p.read_text().splitlines())) > 500}
    assert not long, f"split these: {long}"
