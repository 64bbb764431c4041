"""Every ```python block under the README's "## Use it from Python" runs without error.

The blocks are read from README.md when the test runs (one test per block, in README order), each
executed in a fresh namespace with a temporary folder as the working directory, so an example that
writes files writes them there. The examples are meant to take seconds (a small phantom on CPU).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## Use it from Python"


def python_blocks() -> list[tuple[str, int, str]]:
    """``(subsection, first line number, code)`` of each python block in the section."""
    lines = README.read_text(encoding="utf-8").splitlines()
    blocks, inside, sub, code, start = [], False, "", None, 0
    for number, line in enumerate(lines, start=1):
        if line.startswith("## "):
            inside = line.strip() == SECTION
            continue
        if not inside:
            continue
        if line.startswith("### ") and code is None:
            sub = line[4:].strip()
        if code is None and line.strip() == "```python":
            code, start = [], number + 1
        elif code is not None and line.strip().startswith("```"):
            blocks.append((sub or SECTION, start, "\n".join(code)))
            code = None
        elif code is not None:
            code.append(line)
    return blocks


BLOCKS = python_blocks()


def test_the_section_exists():
    assert SECTION in README.read_text(encoding="utf-8")


@pytest.mark.skipif(not BLOCKS, reason="no python example in the section yet")
@pytest.mark.parametrize("block", BLOCKS, ids=[f"L{b[1]}:{b[0]}" for b in BLOCKS])
def test_python_example_runs(block, tmp_path):
    name, line, code = block
    previous = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile(code, f"README.md:{line} ({name})", "exec"), {"__name__": "__readme__"})
    finally:
        os.chdir(previous)
