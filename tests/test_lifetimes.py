"""Lifetimes of pools and of the objects that use them: create, attach and
open (names, geometry, bad segments, permissions), the creator's
destroying() context and create's word on a name that is taken, close and
destroy, pickling and fork. (The registry of processes, max_processes
included, is test_registry.py's.)"""

from __future__ import annotations

import asyncio
import os
import pickle
import stat
import time
from collections.abc import Callable
from typing import Any

import pytest
from conftest import SHM, leftovers
from helpers import read_word, snapshot, write_word

from shmpool import (
    GFP_ATOMIC,
    Mempool,
    PoolBusyError,
    PoolClosedError,
    PoolDestroyedError,
    PoolFormatError,
    _lifecycle,
)
from shmpool._layout import HEADER_BYTES, OWNER_MASK, OWNER_SHIFT
from shmpool.pool import OPEN_WAIT_SECONDS
from shmpool.testing import entry_offset, header_word_offset, registry_entry, segment_path, slot_word_offset

GEOMETRY: dict[str, Any] = dict(min_nr=2, slot_size=64, capacity=8)
#: The longest name: NAME_MAX (255) bounds the longest file of a pool,
#: its asyncio FIFO "fifo.shmpool.NAME.65534".
LONGEST_NAME = 255 - len("fifo.shmpool.") - len(".65534")


def exists(name: str) -> bool:
    return os.path.exists(segment_path(name))


def creator_pid(name: str) -> int:
    return read_word(name, header_word_offset("H_CREATOR_PID"))


def pool_files(name: str) -> list[str]:
    """Every entry of /dev/shm that names pool ``name`` (its segment, its
    FIFOs, and anything else that should not be there, such as a semaphore)."""
    return sorted(e for e in os.listdir(SHM) if name in e)


def make_raw_segment(name: str, content: bytes) -> None:
    """A segment file of pool ``name`` holding ``content`` (no pool)."""
    with open(segment_path(name), "xb") as f:
        f.write(content)


# ---------------------------------------------------------------- create: geometry and names


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(min_nr=0, slot_size=8, capacity=4),
        dict(min_nr=5, slot_size=8, capacity=4),
        dict(min_nr=1, slot_size=8, capacity=0),
        dict(min_nr=1, slot_size=0, capacity=4),
        dict(min_nr=1, slot_size=8, capacity=1 << 30),
        dict(min_nr=1, slot_size=8, capacity=4, mode=0o1777),
    ],
)
def test_impossible_geometry_is_valueerror_and_leaves_nothing(name: str, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        Mempool.create(name, **kwargs)
    assert leftovers() == []


@pytest.mark.parametrize("field", ["min_nr", "slot_size", "capacity", "max_processes"])
def test_geometry_of_the_wrong_type_is_typeerror(name: str, field: str) -> None:
    kwargs = dict(min_nr=1, slot_size=8, capacity=4)
    kwargs[field] = 2.0  # type: ignore[assignment]
    with pytest.raises(TypeError):
        Mempool.create(name, **kwargs)
    assert leftovers() == []


@pytest.mark.parametrize("bad", ["", "a/b", "/abs", "x" * (LONGEST_NAME + 1), "tab\there", "nul\x00"])
def test_unusable_names_are_valueerror(bad: str) -> None:
    with pytest.raises(ValueError):
        Mempool.create(bad, min_nr=1, slot_size=8, capacity=1)
    with pytest.raises(ValueError):
        Mempool.attach(bad)


def test_name_of_the_wrong_type_is_typeerror() -> None:
    with pytest.raises(TypeError):
        Mempool.attach(b"bytes")  # type: ignore[arg-type]


def test_odd_but_valid_names_work(name: str) -> None:
    for suffix in (" spaced", "-ünïcødé-池", ".dots..", "x" * (LONGEST_NAME - len(name))):
        n = name + suffix
        with Mempool.create(n, min_nr=1, slot_size=8, capacity=2) as p, Mempool.attach(n) as q:
            held = [p.alloc(), q.alloc()]
            with pytest.raises(TimeoutError):  # a wait makes this process's asyncio FIFO: its name fits too
                asyncio.run(q.alloc_async(timeout=0.01))
            assert pool_files(n) == sorted([f"shmpool.{n}", f"fifo.shmpool.{n}.{registry_entry(q)}"])
            q.free_bulk(held)
            p.destroy()
        assert pool_files(n) == []


def test_create_of_an_existing_name_is_fileexistserror_and_changes_nothing(name: str) -> None:
    with Mempool.create(name, min_nr=2, slot_size=8, capacity=4) as p:
        h = p.alloc()
        before = snapshot(p)
        with pytest.raises(FileExistsError):
            Mempool.create(name, min_nr=1, slot_size=16, capacity=2)
        assert snapshot(p) == before
        p.free(h)
        p.destroy()


def test_attach_of_a_missing_pool_is_filenotfounderror(name: str) -> None:
    with pytest.raises(FileNotFoundError):
        Mempool.attach(name)


# ---------------------------------------------------------------- attach: bad segments


def test_attach_to_a_segment_that_is_not_a_pool(name: str) -> None:
    make_raw_segment(name, b"not a pool at all" * 100)
    with pytest.raises(PoolFormatError, match="magic"):
        Mempool.attach(name)
    assert os.path.getsize(segment_path(name)) == 1700  # untouched


@pytest.mark.timeout(60)
def test_attach_to_a_segment_never_finished_waits_then_says_so(name: str) -> None:
    make_raw_segment(name, bytes(4096))  # the magic is written last: a creator still at work, or dead
    t0 = time.monotonic()
    with pytest.raises(PoolFormatError, match="never finished"):
        Mempool.attach(name)
    assert time.monotonic() - t0 >= OPEN_WAIT_SECONDS  # it gave the creator that long


@pytest.fixture
def closed_pool(name: str) -> str:
    p = Mempool.create(name, min_nr=1, slot_size=64, capacity=16)
    p.close()
    return name


def test_attach_refuses_another_layout_version(closed_pool: str) -> None:
    write_word(closed_pool, header_word_offset("H_VERSION"), 99)
    with pytest.raises(PoolFormatError, match="layout version 99"):
        Mempool.attach(closed_pool)


def test_attach_refuses_a_header_that_disagrees_with_itself(closed_pool: str) -> None:
    write_word(closed_pool, header_word_offset("H_OFF_SLOTS"), 12345)
    with pytest.raises(PoolFormatError, match="disagree"):
        Mempool.attach(closed_pool)


@pytest.mark.parametrize("size", [100, HEADER_BYTES + 8, 4096 + 64])
def test_attach_to_a_truncated_segment_raises_instead_of_sigbus(closed_pool: str, size: int) -> None:
    os.truncate(segment_path(closed_pool), size)
    with pytest.raises(PoolFormatError, match="shorter|truncated"):
        Mempool.attach(closed_pool)


# ---------------------------------------------------------------- permissions


@pytest.mark.parametrize("mode", [0o600, 0o640])
def test_a_pool_is_its_segment_and_fifos_each_exactly_of_its_mode(name: str, mode: int) -> None:
    """No semaphore or other object: the lock and the wait channels are
    words of the segment; an asyncio wait adds its process's FIFO."""
    old_umask = os.umask(0o077)  # the mode must not depend on the umask
    try:
        p = Mempool.create(name, min_nr=1, slot_size=8, capacity=1, mode=mode)
    finally:
        os.umask(old_umask)
    assert pool_files(name) == [f"shmpool.{name}"]
    h = p.alloc()
    with pytest.raises(TimeoutError):
        asyncio.run(p.alloc_async(timeout=0.01))
    fifo = f"fifo.shmpool.{name}.{registry_entry(p)}"
    assert pool_files(name) == sorted([f"shmpool.{name}", fifo])
    assert stat.S_ISFIFO(os.stat(os.path.join(SHM, fifo)).st_mode)
    assert [stat.S_IMODE(os.stat(os.path.join(SHM, e)).st_mode) for e in pool_files(name)] == [mode, mode]
    p.free(h)
    p.destroy()
    assert pool_files(name) == []


# ---------------------------------------------------------------- close and destroy


@pytest.mark.parametrize(
    "call",
    [
        lambda p: p.alloc(),
        lambda p: p.alloc_preallocated(),
        lambda p: p.free(1),
        lambda p: p.resize(1),
        lambda p: p.stats(),
        lambda p: p.buffer(1),
        lambda p: p.ndarray(1),
        lambda p: p.set_fail_rate(0.1),
        lambda p: p.destroy(),
        lambda p: p.queue("q", depth=1),
        lambda p: p.reclaim_dead(),
        lambda p: p.adopt(1),
        lambda p: p.free_bulk([1]),
        lambda p: p.alloc_bulk(1),
    ],
)
def test_a_closed_pool_refuses_calls_clearly(name: str, call) -> None:
    p = Mempool.create(name, min_nr=1, slot_size=8, capacity=2)
    p.close()
    with pytest.raises(PoolClosedError, match="closed"):
        call(p)
    assert p.closed


def test_close_and_attach_never_unlink(name: str) -> None:
    with Mempool.create(name, min_nr=1, slot_size=8, capacity=2):
        pass
    for _ in range(3):
        with Mempool.attach(name):
            pass
    with Mempool.attach(name) as p:
        assert p.stats().capacity == 2
        p.destroy()


def test_other_objects_see_destroy(name: str) -> None:
    p = Mempool.create(name, min_nr=1, slot_size=8, capacity=2)
    q = Mempool.attach(name)
    h = q.alloc()
    p.destroy(force=True)
    with pytest.raises(PoolDestroyedError):
        q.free(h)
    with pytest.raises(PoolDestroyedError):
        q.alloc()
    q.close()


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
    real_attach = _lifecycle._attach_once
    calls = []

    def attach_late(cls: type[Mempool], pool_name: str) -> Mempool:
        calls.append(pool_name)
        if len(calls) == 1:
            raise FileNotFoundError(2, "not there yet")
        return real_attach(cls, pool_name)

    # The one way to lose that race on purpose: attach's attempt, made to
    # miss the pool once (no public call can make it).
    monkeypatch.setattr(_lifecycle, "_attach_once", attach_late)
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
    make_raw_segment(name, b"\x01" * 4096)
    message = create_error(name)
    assert "no pool this shmpool can use" in message and "--destroy" in message


# ---------------------------------------------------------------- pickling and fork


def test_pool_pickles_by_name(name: str) -> None:
    with Mempool.create(name, min_nr=1, slot_size=8, capacity=2) as p:
        data = pickle.dumps(p)
        assert len(data) < 200  # a name, not a copy of the segment
        with pickle.loads(data) as q:
            h = q.alloc()
            p.free(h)
        p.destroy()


def test_after_fork_the_child_is_the_holder(name: str) -> None:
    with Mempool.create(name, min_nr=1, slot_size=8, capacity=2) as p:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: allocate through the inherited mapping
            try:
                os.write(w, p.alloc(GFP_ATOMIC).to_bytes(8, "little"))
            finally:
                os._exit(0)
        os.close(w)
        h = int.from_bytes(os.read(r, 8), "little")
        os.close(r)
        os.waitpid(pid, 0)
        entry = ((read_word(p, slot_word_offset(p, h)) >> OWNER_SHIFT) & OWNER_MASK) - 1
        assert entry != registry_entry(p)
        assert read_word(p, entry_offset(p, entry, "P_PID")) == pid != os.getpid()
        p.free(h)
        p.destroy()
