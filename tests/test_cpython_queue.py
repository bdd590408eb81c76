"""CPython's own queue tests, ported to a pool's Queue of handles: the ones
of ``_TestQueue`` (Lib/test/_test_multiprocessing.py) and of the FIFO
mixin of Lib/test/test_queue.py that apply to a queue that carries
elements (not JoinableQueue's task_done, not feeder-thread internals).
Items are elements' handles; processes are real (spawned) ones; timings
are checked from below only (a loaded machine is slower, never faster)."""

from __future__ import annotations

import multiprocessing as mp
import queue as pyqueue
import time

import children
import pytest

from shmpool import Mempool, Queue

ctx = mp.get_context("spawn")
TIMEOUT1, TIMEOUT2, TIMEOUT3 = 0.1, 0.1, 0.1


@pytest.fixture
def pool(name: str):
    with Mempool.create(name, min_nr=2, slot_size=16, capacity=64).destroying(force=True) as p:
        yield p


def timed(fn, *args, **kwargs) -> float:
    """How long fn took to raise the exception the caller expects."""
    t0 = time.monotonic()
    with pytest.raises((pyqueue.Full, pyqueue.Empty)):
        fn(*args, **kwargs)
    return time.monotonic() - t0


@pytest.mark.timeout(120)
def test_put(pool: Mempool, name: str) -> None:
    maxsize = 6
    q = pool.queue("put", depth=maxsize)
    can_start, can_continue, out = ctx.Event(), ctx.Event(), ctx.Queue()
    proc = ctx.Process(target=children.queue_taker, args=(name, "put", maxsize, can_start, can_continue, out))
    proc.daemon = True
    proc.start()
    assert q.empty() and not q.full()
    hs = [pool.alloc() for _ in range(7)]
    q.put(hs[0])
    q.put(hs[1], True)
    q.put(hs[2], True, None)
    q.put(hs[3], False)
    q.put(hs[4], False, None)
    q.put_nowait(hs[5])
    assert not q.empty() and q.full()
    assert timed(q.put, hs[6], False) < 5
    assert timed(q.put, hs[6], False, None) < 5
    assert timed(q.put_nowait, hs[6]) < 5
    assert timed(q.put, hs[6], True, TIMEOUT1) >= TIMEOUT1 * 0.9
    assert timed(q.put, hs[6], False, TIMEOUT2) < 5
    assert timed(q.put, hs[6], timeout=TIMEOUT3) >= TIMEOUT3 * 0.9
    can_start.set()
    assert can_continue.wait(60)
    assert out.get(timeout=60) == hs[:6]
    assert q.empty() and not q.full()
    proc.join(60)
    assert proc.exitcode == 0
    pool.free(hs[6])


@pytest.mark.timeout(120)
def test_get(pool: Mempool, name: str) -> None:
    q = pool.queue("get", depth=8)
    can_start, can_continue, out = ctx.Event(), ctx.Event(), ctx.Queue()
    proc = ctx.Process(target=children.queue_giver, args=(name, "get", 5, can_start, can_continue, out))
    proc.daemon = True
    proc.start()
    assert q.empty()
    can_start.set()
    assert can_continue.wait(60)
    given = out.get(timeout=60)
    assert not q.empty()
    got = [q.get(), q.get(True, None), q.get(False), q.get(timeout=1), q.get_nowait()]
    assert got == given and q.empty()
    assert timed(q.get, False) < 5
    assert timed(q.get, False, None) < 5
    assert timed(q.get_nowait) < 5
    assert timed(q.get, True, TIMEOUT1) >= TIMEOUT1 * 0.9
    assert timed(q.get, False, TIMEOUT2) < 5
    assert timed(q.get, timeout=TIMEOUT3) >= TIMEOUT3 * 0.9
    proc.join(60)
    pool.free_bulk(got)


@pytest.mark.timeout(120)
def test_fork(pool: Mempool, name: str) -> None:
    q = pool.queue("fork", depth=32)
    mine = [pool.alloc() for _ in range(10)]
    for h in mine:
        q.put(h)
    out = ctx.Queue()
    p = ctx.Process(target=children.queue_giver, args=(name, "fork", 10, None, None, out))
    p.daemon = True
    p.start()
    theirs = out.get(timeout=60)
    assert [q.get() for _ in range(20)] == mine + theirs
    with pytest.raises(pyqueue.Empty):
        q.get(False)
    p.join(60)
    pool.free_bulk(mine + theirs)


def test_qsize(pool: Mempool) -> None:
    q = pool.queue("qsize", depth=4)
    assert q.qsize() == 0
    a, b = pool.alloc(), pool.alloc()
    q.put(a)
    assert q.qsize() == 1
    q.put(b)
    assert q.qsize() == 2
    q.get()
    assert q.qsize() == 1
    q.get()
    assert q.qsize() == 0
    pool.free_bulk([a, b])


def test_timeout(pool: Mempool) -> None:
    q = pool.queue("timeout", depth=1)
    start = time.monotonic()
    with pytest.raises(pyqueue.Empty):
        q.get(True, 0.200)
    assert time.monotonic() - start >= 0.100


def test_closed_queue_empty_exceptions(pool: Mempool) -> None:
    q = pool.queue("closed", depth=2)
    q.close()  # before it was used: as multiprocessing's, empty() still answers
    q.join_thread()
    assert q.empty()
    q = pool.queue("closed")
    h = pool.alloc()
    q.put(h)  # used
    q.close()
    q.join_thread()
    with pytest.raises(OSError, match="is closed"):
        q.empty()
    pool.free(pool.queue("closed").get())


def test_closed_queue_put_get_exceptions(pool: Mempool) -> None:
    q = pool.queue("closed", depth=2)
    q.close()
    h = pool.alloc()
    with pytest.raises(ValueError, match="is closed"):
        q.put(h)
    with pytest.raises(ValueError, match="is closed"):
        q.get()
    pool.free(h)


# ---------------------------------------------------------------- Lib/test/test_queue.py, the FIFO mixin

QUEUE_SIZE = 5


def simple_queue_test(pool: Mempool, q: Queue) -> None:
    assert q.empty() and q.qsize() == 0
    target_order = [pool.alloc() for _ in range(3)]  # FIFO: out in the order put
    for h in target_order:
        q.put(h)
    assert not q.empty() and q.qsize() == 3
    assert [q.get() for _ in range(3)] == target_order
    full = [pool.alloc() for _ in range(QUEUE_SIZE)]
    for i, h in enumerate(full):
        q.put(h)
        assert q.qsize() == i + 1
    assert q.full()
    extra = pool.alloc()
    with pytest.raises(pyqueue.Full):
        q.put(extra, block=False)
    with pytest.raises(pyqueue.Full):
        q.put(extra, timeout=0.01)
    assert [q.get() for _ in range(QUEUE_SIZE)] == full
    assert q.empty()
    with pytest.raises(pyqueue.Empty):
        q.get(block=False)
    with pytest.raises(pyqueue.Empty):
        q.get(timeout=0.01)
    pool.free_bulk(target_order + full + [extra])


def test_basic(pool: Mempool) -> None:
    q = pool.queue("basic", depth=QUEUE_SIZE)
    simple_queue_test(pool, q)
    simple_queue_test(pool, q)


def test_negative_timeout_raises_exception(pool: Mempool) -> None:
    q = pool.queue("negative", depth=QUEUE_SIZE)
    h = pool.alloc()
    with pytest.raises(ValueError):
        q.put(h, timeout=-1)
    with pytest.raises(ValueError):
        q.get(timeout=-1)
    assert q.qsize() == 0
    pool.free(h)


def test_nowait(pool: Mempool) -> None:
    q = pool.queue("nowait", depth=QUEUE_SIZE)
    hs = [pool.alloc() for _ in range(QUEUE_SIZE)]
    for h in hs:
        q.put_nowait(h)
    extra = pool.alloc()
    with pytest.raises(pyqueue.Full):
        q.put_nowait(extra)
    assert [q.get_nowait() for _ in range(QUEUE_SIZE)] == hs
    with pytest.raises(pyqueue.Empty):
        q.get_nowait()
    pool.free_bulk(hs + [extra])


def test_shrinking_queue(pool: Mempool) -> None:
    q = pool.queue("shrinking", depth=3)
    a, b, c, d = (pool.alloc() for _ in range(4))
    q.put(a)
    q.put(b)
    q.put(c)
    with pytest.raises(pyqueue.Full):
        q.put_nowait(d)
    assert q.get() == a
    q.put_nowait(d)
    assert [q.get() for _ in range(3)] == [b, c, d]
    pool.free_bulk([a, b, c, d])
