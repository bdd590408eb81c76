"""Every Python code block of the README runs as a script of its own, its
pool names made this run's (the "Lifetimes and asyncio" section's blocks are
run by test_lifetimes.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from typing import Any

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def blocks() -> list[str]:
    with open(README) as f:
        text = f.read()
    head, rest = text.split("\n## Lifetimes and asyncio\n", 1)
    tail = rest.split("\n## ", 1)[1]
    return re.findall(r"```python\n(.*?)```", head + tail, re.S)


def test_the_readme_has_its_examples() -> None:
    assert len(blocks()) >= 2  # the API tour and the two-process example


@pytest.mark.timeout(120)
@pytest.mark.parametrize("index", range(len(blocks())))
def test_a_readme_example_runs(index: int, name: str, tmp_path: Any) -> None:
    code = blocks()[index]
    script = tmp_path / f"block{index}.py"
    script.write_text(re.sub(r'"(frames|jobs)"', lambda m: repr(f"{name}-{m.group(1)}"), code))
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=100, cwd=tmp_path)
    assert run.returncode == 0, f"block {index}:\n{code}\n{run.stdout}\n{run.stderr}"
