"""Command lines the README, docs, recipes and scripts show for the checkpoint converter are ones its CLI accepts."""

import re
import shlex
from pathlib import Path

import pytest

from modeling_stil import convert_original

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = "scripts/convert_original_checkpoint.py"


def shown_converter_command_lines() -> list[tuple[str, str]]:
    """(where, arguments) of every shown `python scripts/convert_original_checkpoint.py ...`: backslash
    continuations joined (a recipe's continue after its comment sign), an inline code span cut at its end,
    `[optional]` brackets dropped and `a|b` choices taken at their first. A bare mention of the file is skipped."""
    found = []
    files = [ROOT / "README.md", ROOT / SCRIPT, *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "recipes").glob("*.yaml"))]
    for path in files:
        lines = path.read_text().splitlines()
        for number, line in enumerate(lines):
            if f"python {SCRIPT}" not in line:
                continue
            text = line.split(f"python {SCRIPT}", 1)[1]
            while text.rstrip().endswith("\\") and number + 1 < len(lines):
                number += 1
                text = text.rstrip()[:-1] + " " + lines[number].lstrip().lstrip("#")
            text = text.split("`", 1)[0].replace("[", " ").replace("]", " ")
            text = re.sub(r"(\S+)\|\S+", r"\1", text)
            found.append((f"{path.relative_to(ROOT)}:{number + 1}", text.strip()))
    return found


def test_every_shown_converter_command_line_parses(monkeypatch):
    shown = shown_converter_command_lines()
    assert len(shown) >= 4  # 7 today: README, the script's docstring (2), docs/models.md (2), the DVM recipes (2)
    converted = []
    monkeypatch.setattr(convert_original, "convert_stil_checkpoint", lambda *a, **k: converted.append(a) or (None, None, {}))
    monkeypatch.setattr(convert_original, "convert_tip_checkpoint", lambda *a, **k: converted.append(a) or (None, {}))
    for where, arguments in shown:
        try:
            assert convert_original.main(shlex.split(arguments)) == 0, where
        except SystemExit as error:  # argparse refused the command line
            pytest.fail(f"{where}: `python {SCRIPT} {arguments}` is refused by the CLI (exit {error.code})")
    assert len(converted) == len(shown)
