"""Lifetimes: create-or-attach (Mempool.open), the creator's destroying()
context, and create's word on a name that is taken (stale or in use)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from typing import Any, Callable

import pytest
from conftest import SHM

from shmpool import Mempool, PoolBusyError
from shmpool._layout import H_CREATOR_PID

GEOMETRY: dict[str, Any] = dict(min_nr=2, slot_size=64, capacity=8)


def exists(name: str) -> bool:
    return os.path.exists(os.path.join(SHM, "shmpool." + name))


def creator_pid(name: str) -> int:
    with Mempool.attach(name) as pool:
        return int(pool._core[0].hdr[H_CREATOR_PID])  # type: ignore[index]


# ---------------------------------------------------------------- Mempool.open


def test_open_creates_a_missing_pool_then_attaches_to_it(name: str) -> None:
    with Mempool.open(name, **GEOMETRY) as first, Mempool.open(name, **GEOMETRY) as second:
        h = first.alloc()
        second.free(h)  # one pool
        s = second.stats()
        assert (s.min_nr, s.slot_size, s.capacity) == (2, 64, 8)
        first.destroy()


def test_open_keeps_an_existing_pools_min_nr(name: str) -> None:
    with Mempool.create(name, **GEOMETRY).destroying() as pool:
        pool.resize(5)
        with Mempool.open(name, **GEOMETRY) as again:
            assert again.stats().min_nr == 5  # min_nr is a creation argument, not geometry


@pytest.mark.parametrize("other", [dict(slot_size=128), dict(capacity=16)])
def test_open_refuses_another_geometry_and_leaves_the_pool_alone(name: str, other: dict[str, int]) -> None:
    with Mempool.create(name, **GEOMETRY).destroying() as pool:
        h = pool.alloc()
        before = pool.stats()
        with pytest.raises(ValueError, match="exists with slot_size=64, capacity=8"):
            Mempool.open(name, **{**GEOMETRY, **other})
        assert pool.stats() == before
        pool.free(h)


def test_open_without_create_is_attach_with_a_check(name: str) -> None:
    with pytest.raises(FileNotFoundError):
        Mempool.open(name, create=False)
    assert not exists(name)
    with Mempool.create(name, **GEOMETRY).destroying():
        with Mempool.open(name, create=False) as pool:
            assert pool.capacity == 8
        with pytest.raises(ValueError):
            Mempool.open(name, create=False, capacity=9)


def test_open_needs_the_geometry_to_create(name: str) -> None:
    with pytest.raises(TypeError, match="min_nr, slot_size and capacity"):
        Mempool.open(name, slot_size=64, capacity=8)
    assert not exists(name)


def test_open_that_loses_the_race_to_create_attaches(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The race, forced: attach finds nothing, another process creates the
    pool, then our create finds the name taken (FileExistsError)."""
    other = Mempool.create(name, **GEOMETRY)  # "the other process"
    real_attach = Mempool._attach_once.__func__  # type: ignore[attr-defined]
    calls = []

    def attach_late(cls: type[Mempool], pool_name: str) -> Mempool:
        calls.append(pool_name)
        if len(calls) == 1:
            raise FileNotFoundError(2, "not there yet")
        return real_attach(cls, pool_name)  # type: ignore[no-any-return]

    monkeypatch.setattr(Mempool, "_attach_once", classmethod(attach_late))
    with Mempool.open(name, **GEOMETRY) as pool:
        h = pool.alloc()
        other.free(h)  # the same pool
    assert len(calls) == 2
    other.destroy()


OPENER = """
import sys
from shmpool import Mempool
name = sys.argv[1]
print("ready", flush=True)
sys.stdin.readline()                      # everybody opens at once
pool = Mempool.open(name, min_nr=2, slot_size=64, capacity=8)
h = pool.alloc()
pool.free(h)
print("opened", flush=True)
sys.stdin.readline()                      # stay attached until told
pool.close()
"""


@pytest.mark.timeout(300)  # a dozen interpreters start, on a machine that may be busy
def test_processes_that_open_at_once_share_one_pool(name: str, popen: Callable[..., Any]) -> None:
    for _round in range(3):
        procs = [popen(OPENER, name) for _ in range(4)]
        for p in procs:
            assert p.stdout.readline() == "ready\n"
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        for p in procs:
            line = p.stdout.readline()
            assert line == "opened\n", line + p.stderr.read()
        assert creator_pid(name) in {p.pid for p in procs}  # exactly one created it
        with Mempool.attach(name) as pool:
            assert pool.stats().in_use == 0
            for p in procs:
                p.stdin.write("exit\n")
                p.stdin.flush()
                assert p.wait(timeout=30) == 0
            pool.destroy()


# ---------------------------------------------------------------- destroying()


def test_destroying_destroys_at_the_end_of_the_block(name: str) -> None:
    with Mempool.create(name, **GEOMETRY).destroying() as pool:
        h = pool.alloc()
        pool.free(h)
        assert exists(name)
    assert pool.closed
    assert not exists(name)


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_an_exception_destroys_whatever_is_held_or_queued(name: str, exc: type[BaseException]) -> None:
    with pytest.raises(exc), Mempool.create(name, **GEOMETRY).destroying() as pool:
        pool.alloc()
        q = pool.queue("q", depth=2)
        q.put(pool.alloc())
        raise exc
    assert not exists(name)
    # The next run starts afresh: no FileExistsError.
    with Mempool.create(name, **GEOMETRY).destroying():
        pass


def test_a_leak_at_a_normal_end_is_reported_and_the_pool_kept(name: str) -> None:
    with pytest.raises(PoolBusyError, match="still lends 1 element"), Mempool.create(name, **GEOMETRY).destroying() as pool:
        h = pool.alloc()
    assert exists(name) and not pool.closed  # left for shmpool-inspect to show
    pool.free(h)
    pool.destroy()


def test_force_destroys_at_a_normal_end_whatever_is_held(name: str) -> None:
    with Mempool.create(name, **GEOMETRY).destroying(force=True) as pool:
        pool.alloc()
    assert not exists(name)


def test_a_pool_destroyed_or_closed_in_the_block_is_left_alone(name: str) -> None:
    with Mempool.create(name, **GEOMETRY).destroying() as pool:
        pool.destroy()
    assert not exists(name)
    with Mempool.create(name, **GEOMETRY).destroying() as pool:
        pool.close()
    assert exists(name)  # closed, not destroyed: the block does not reattach to destroy it
    Mempool.attach(name).destroy()


def test_a_pool_destroyed_by_another_process_in_the_block_is_fine(name: str) -> None:
    with Mempool.create(name, **GEOMETRY).destroying() as pool:
        Mempool.attach(name).destroy()
    assert pool.closed and not exists(name)


# ---------------------------------------------------------------- create's FileExistsError

CREATOR = """
import sys
from shmpool import Mempool
Mempool.create(sys.argv[1], min_nr=2, slot_size=64, capacity=8).close()   # exits without destroy
"""

ATTACHER = """
import sys
from shmpool import Mempool
pool = Mempool.attach(sys.argv[1])
print("attached", flush=True)
sys.stdin.readline()
"""


def create_error(name: str) -> str:
    with pytest.raises(FileExistsError) as info:
        Mempool.create(name, **GEOMETRY)
    return str(info.value)


def test_a_stale_pool_is_named_stale_with_the_way_to_remove_it(name: str, popen: Callable[..., Any]) -> None:
    creator = popen(CREATOR, name)
    assert creator.wait(timeout=30) == 0, creator.stderr.read()
    attacher = popen(ATTACHER, name)
    assert attacher.stdout.readline() == "attached\n"
    message = create_error(name)  # the creator is dead, but a process is attached
    assert "in use" in message and "stale" not in message and "1 live process" in message
    attacher.stdin.write("exit\n")
    attacher.stdin.flush()
    assert attacher.wait(timeout=30) == 0
    message = create_error(name)
    assert "stale" in message, message
    assert f"pid {creator.pid}" in message
    assert f"shmpool-inspect {name} --destroy" in message and f"tools/cleanup.py {name}" in message
    # And the stale pool can still be reused by whoever wants it.
    with Mempool.open(name, **GEOMETRY) as pool:
        pool.destroy()


def test_a_pool_whose_creator_lives_is_in_use(name: str) -> None:
    with Mempool.create(name, **GEOMETRY).destroying():
        message = create_error(name)
    assert "in use" in message and f"pid {os.getpid()}, is alive" in message
    assert "stale" not in message


def test_a_segment_that_is_no_pool_is_said_so(name: str) -> None:
    path = os.path.join(SHM, "shmpool." + name)
    with open(path, "wb") as f:
        f.write(b"\x01" * 4096)
    message = create_error(name)
    assert "no pool this shmpool can use" in message and "--destroy" in message



def test_the_readme_lifetimes_and_asyncio_examples_run(name: str, tmp_path: Any) -> None:
    """Every code block of the README's "Lifetimes and asyncio" section runs
    (each as a script of its own, its pool names made this run's)."""
    with open(os.path.join(os.path.dirname(__file__), "..", "README.md")) as f:
        readme = f.read()
    section = readme.split("\n## Lifetimes and asyncio\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 3
    for i, code in enumerate(blocks):
        script = tmp_path / f"block{i}.py"
        script.write_text(re.sub(r'"(frames|jobs)"', lambda m: repr(f"{name}-{m.group(1)}"), code))
        run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, f"block {i}:\n{code}\n{run.stderr}"
