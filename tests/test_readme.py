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


@pytest.mark.timeout(300)
def test_every_readme_example_passes_mypy_strict(tmp_path: Any) -> None:
    """The README's examples, the typed idioms included, as a user's
    ``mypy --strict`` sees them: ``pool.alloc()`` is an int, no narrowing."""
    with open(README) as f:
        every = re.findall(r"```python\n(.*?)```", f.read(), re.S)
    assert len(every) >= 5
    files = []
    for index, code in enumerate(every):
        script = tmp_path / f"readme_block{index}.py"
        script.write_text(code)
        files.append(str(script))
    run = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", *files],
        capture_output=True, text=True, timeout=280, cwd=os.path.dirname(README),
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"no issues found in {len(files)} source files" in run.stdout


@pytest.mark.timeout(300)
def test_a_type_checker_sees_a_handle_from_a_sleeping_mask_and_maybe_none_otherwise(tmp_path: Any) -> None:
    script = tmp_path / "typed_use.py"
    script.write_text(
        "from shmpool import GFP_ATOMIC, GFP_KERNEL, GFP_NOFS, Mempool\n"
        "from shmpool.gfp import __GFP_NOWARN\n"
        "def use(pool: Mempool) -> int:\n"
        "    a: int = pool.alloc()\n"
        "    b: int = pool.alloc(GFP_KERNEL, timeout=1.0)\n"
        "    c: int = pool.alloc(GFP_NOFS)\n"
        "    d: int = pool.alloc(GFP_ATOMIC)  # line 7: may be None\n"
        "    e: int = pool.alloc(GFP_KERNEL | __GFP_NOWARN)  # line 8: composed at run time\n"
        "    return a + b + c + d + e\n"
    )
    run = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(script)],
        capture_output=True, text=True, timeout=280, cwd=os.path.dirname(README),
    )
    errors = [line for line in run.stdout.splitlines() if ": error:" in line]
    assert [line.split(":")[1] for line in errors] == ["7", "8"], run.stdout + run.stderr
    assert all('"int | None"' in line for line in errors), errors
