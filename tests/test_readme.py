"""The README's Python section runs as written."""
from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks(section: str) -> list[str]:
    text = README.read_text()
    start = text.index(f"## {section}")
    end = text.find("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start:end if end > 0 else None], re.S)


def test_use_it_from_python_section_runs(capsys):
    blocks = python_blocks("Use it from Python")
    assert len(blocks) == 3
    ns: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), ns)
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) >= 6
    assert ns["acc"] > 0.6  # adapted predictions on severe noise beat chance by far
    assert ns["res"].predictions.shape == (1,) and len(ns["pipe"].classes) == 3
    assert ns["per_stream"].batch_index == 1 and ns["template"].batch_index == 0
