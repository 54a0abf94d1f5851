"""Import a CLI from scripts/ as a module without putting scripts/ on sys.path.

scripts/ holds files named like libraries (scripts/evaluate.py): on sys.path they would shadow
`import evaluate` for the rest of the test session."""

import importlib.util
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str):
    module_name = f"stil_scripts_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module
