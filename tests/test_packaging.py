"""The distribution, as a user installs it: build the sdist and the wheel
(python -m build: the wheel is built from the sdist, so a file missing from
the sdist fails here), install the wheel into a fresh virtualenv (not
editable), and run the demo and a multiprocess smoke test from it."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import venv

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SMOKE = """
import multiprocessing as mp, sys
import shmpool
assert shmpool.__file__.startswith(sys.prefix), shmpool.__file__  # the installed copy, not the checkout

def child(name):
    with shmpool.Mempool.attach(name) as pool:
        q = pool.queue("q")
        h = pool.alloc(timeout=10)
        pool.buffer(h)[:2] = b"ok"
        q.put(h)

if __name__ == "__main__":
    name = sys.argv[1]
    with shmpool.Mempool.create(name, min_nr=1, slot_size=16, capacity=4) as pool:
        with pool.destroying():
            q = pool.queue("q", depth=2)
            p = mp.get_context("spawn").Process(target=child, args=(name,))
            p.start()
            h = q.get(timeout=30)
            p.join(30)
            assert bytes(pool.buffer(h)[:2]) == b"ok" and p.exitcode == 0
            pool.free(h)
    print("smoke: OK")
"""


@pytest.mark.timeout(900)
def test_the_wheel_builds_installs_and_runs(tmp_path, name: str) -> None:
    dist = tmp_path / "dist"
    built = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(dist), ROOT], capture_output=True, text=True, timeout=600
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    wheels = glob.glob(str(dist / "shmpool-*.whl"))
    assert len(wheels) == 1 and glob.glob(str(dist / "shmpool-*.tar.gz")), os.listdir(dist)
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    bin_dir = env_dir / "bin"
    installed = subprocess.run(
        [str(bin_dir / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", wheels[0]],
        capture_output=True, text=True, timeout=600,
    )
    assert installed.returncode == 0, installed.stderr[-3000:]
    demo = subprocess.run(
        [str(bin_dir / "shmpool-demo"), "--name", name, "--iterations", "5", "--trace", "0"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert demo.returncode == 0 and "result:  OK" in demo.stdout, demo.stdout + demo.stderr
    smoke = tmp_path / "smoke.py"
    smoke.write_text(SMOKE)
    ran = subprocess.run(
        [str(bin_dir / "python"), str(smoke), name + "s"], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert ran.returncode == 0 and "smoke: OK" in ran.stdout, ran.stdout + ran.stderr
    typed = subprocess.run(
        [str(bin_dir / "python"), "-c", "import importlib.resources as r; f = r.files('shmpool');"
         "print((f / 'py.typed').is_file(), (f / '_core.pyi').is_file())"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    assert typed.stdout.split() == ["True", "True"], typed.stdout + typed.stderr
