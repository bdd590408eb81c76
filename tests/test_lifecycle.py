"""Create, attach, close, destroy: names, bad segments, permissions, views."""

from __future__ import annotations

import mmap
import os
import pickle
import stat
import struct

import numpy as np
import posix_ipc
import pytest
from conftest import SHM, leftovers
from helpers import snapshot

from shmpool import (
    GFP_ATOMIC,
    InvalidHandleError,
    Mempool,
    PoolBusyError,
    PoolClosedError,
    PoolDestroyedError,
    PoolFormatError,
    ShmpoolError,
)
from shmpool._layout import H_OFF_SLOTS, H_VERSION, HEADER_BYTES, OWNER_MASK, OWNER_SHIFT, P_PID, PROC_WORDS


def shm_path(name: str) -> str:
    return os.path.join(SHM, "shmpool." + name)


def patch_word(name: str, word: int, value: int) -> None:
    """Write one header word of a pool straight into its file."""
    with open(shm_path(name), "r+b") as f, mmap.mmap(f.fileno(), HEADER_BYTES) as mm:
        struct.pack_into("=Q", mm, 8 * word, value)


# ---------------------------------------------------------------- geometry and names


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


@pytest.mark.parametrize("field", ["min_nr", "slot_size", "capacity"])
def test_geometry_of_the_wrong_type_is_typeerror(name: str, field: str) -> None:
    kwargs = dict(min_nr=1, slot_size=8, capacity=4)
    kwargs[field] = 2.0  # type: ignore[assignment]
    with pytest.raises(TypeError):
        Mempool.create(name, **kwargs)
    assert leftovers() == []


@pytest.mark.parametrize("bad", ["", "a/b", "/abs", "x" * 239, "tab\there", "nul\x00"])
def test_unusable_names_are_valueerror(bad: str) -> None:
    with pytest.raises(ValueError):
        Mempool.create(bad, min_nr=1, slot_size=8, capacity=1)
    with pytest.raises(ValueError):
        Mempool.attach(bad)


def test_name_of_the_wrong_type_is_typeerror() -> None:
    with pytest.raises(TypeError):
        Mempool.attach(b"bytes")  # type: ignore[arg-type]


def test_odd_but_valid_names_work(name: str) -> None:
    for suffix in (" spaced", "-ünïcødé-池", ".dots..", "x" * (238 - len(name) - 1)):
        n = name + suffix
        with Mempool.create(n, min_nr=1, slot_size=8, capacity=2) as p, Mempool.attach(n) as q:
            q.free(p.alloc())
            p.destroy()


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


def test_create_replaces_orphan_semaphores(name: str) -> None:
    # An interrupted destroy can leave semaphores without their segment.
    posix_ipc.Semaphore(f"/shmpool.{name}.lock", posix_ipc.O_CREX, initial_value=0).close()
    with Mempool.create(name, min_nr=1, slot_size=8, capacity=2) as p:
        p.free(p.alloc())  # the lock works: the orphan (value 0) was replaced
        p.destroy()


# ---------------------------------------------------------------- bad segments


def make_raw_segment(name: str, content: bytes) -> None:
    shm = posix_ipc.SharedMemory("/shmpool." + name, posix_ipc.O_CREX, size=len(content))
    with mmap.mmap(shm.fd, len(content)) as mm:
        mm[:] = content
    shm.close_fd()


def test_attach_to_a_segment_that_is_not_a_pool(name: str) -> None:
    make_raw_segment(name, b"not a pool at all" * 100)
    with pytest.raises(PoolFormatError, match="magic"):
        Mempool.attach(name)
    assert os.path.getsize(shm_path(name)) == 1700  # untouched


def test_attach_to_a_segment_never_finished(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import shmpool.pool

    monkeypatch.setattr(shmpool.pool, "ATTACH_WAIT_SECONDS", 0.5)  # not the 10 s a loaded creator gets
    make_raw_segment(name, bytes(4096))
    with pytest.raises(PoolFormatError, match="never finished"):
        Mempool.attach(name)


@pytest.fixture
def closed_pool(name: str) -> str:
    p = Mempool.create(name, min_nr=1, slot_size=64, capacity=16)
    p.close()
    return name


def test_attach_refuses_another_layout_version(closed_pool: str) -> None:
    patch_word(closed_pool, H_VERSION, 99)
    with pytest.raises(PoolFormatError, match="layout version 99"):
        Mempool.attach(closed_pool)


def test_attach_refuses_a_header_that_disagrees_with_itself(closed_pool: str) -> None:
    patch_word(closed_pool, H_OFF_SLOTS, 12345)
    with pytest.raises(PoolFormatError, match="disagree"):
        Mempool.attach(closed_pool)


@pytest.mark.parametrize("size", [100, HEADER_BYTES + 8, 4096 + 64])
def test_attach_to_a_truncated_segment_raises_instead_of_sigbus(closed_pool: str, size: int) -> None:
    os.truncate(shm_path(closed_pool), size)
    with pytest.raises(PoolFormatError, match="shorter|truncated"):
        Mempool.attach(closed_pool)


def test_format_errors_are_valueerrors_and_shmpoolerrors() -> None:
    assert issubclass(PoolFormatError, ValueError) and issubclass(PoolFormatError, ShmpoolError)


# ---------------------------------------------------------------- permissions


@pytest.mark.parametrize("mode", [0o600, 0o640])
def test_segment_and_semaphores_get_exactly_the_mode(name: str, mode: int) -> None:
    old_umask = os.umask(0o077)  # the mode must not depend on the umask
    try:
        p = Mempool.create(name, min_nr=1, slot_size=8, capacity=1, mode=mode)
    finally:
        os.umask(old_umask)
    paths = [shm_path(name), os.path.join(SHM, f"sem.shmpool.{name}.lock"), os.path.join(SHM, f"sem.shmpool.{name}.wait")]
    assert [stat.S_IMODE(os.stat(path).st_mode) for path in paths] == [mode] * 3
    p.destroy()


# ---------------------------------------------------------------- close


def test_close_never_raises_and_views_outlive_it(name: str) -> None:
    p = Mempool.create(name, min_nr=1, slot_size=32, capacity=4)
    h = p.alloc()
    mv = p.buffer(h)
    arr = p.ndarray(h, np.int32)
    p.close()
    p.close()  # twice is fine
    mv[:4] = b"abcd"  # the mapping is still there
    arr[1] = 77
    assert bytes(mv[:4]) == b"abcd" and bytes(mv[4:8]) == (77).to_bytes(4, "little")
    with Mempool.attach(name) as q:  # and it is the pool's memory, seen by others
        assert bytes(q.buffer(h)[:8]) == b"abcd" + (77).to_bytes(4, "little")
        q.free(h)
        del mv, arr
        q.destroy()


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


# ---------------------------------------------------------------- pickling and fork


def test_pool_pickles_by_name(name: str) -> None:
    with Mempool.create(name, min_nr=1, slot_size=8, capacity=2) as p:
        data = pickle.dumps(p)
        assert len(data) < 200  # a name, not a copy of the segment
        with pickle.loads(data) as q:
            h = q.alloc()
            p.free(h)
        p.destroy()


def test_exceptions_pickle() -> None:
    err = pickle.loads(pickle.dumps(InvalidHandleError(0x1234, "in the arena")))
    assert (err.handle, err.state, str(err)) == (0x1234, "in the arena", "handle 0x1234 is not held: in the arena")
    busy = pickle.loads(pickle.dumps(PoolBusyError("busy")))
    assert isinstance(busy, RuntimeError) and str(busy) == "busy"


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
        v = p._core[0]
        entry = ((v.words[h & 0xFFFFFF] >> OWNER_SHIFT) & OWNER_MASK) - 1
        assert v.procs[entry * PROC_WORDS + P_PID] == pid != os.getpid()
        p.free(h)
        p.destroy()
