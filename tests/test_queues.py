"""Queues of elements inside a pool: multiprocessing.Queue's interface, and
ownership that moves with the element."""

from __future__ import annotations

import queue
import signal
import time

import numpy as np
import pytest
from helpers import check_whole, in_thread, queue_sleepers, snapshot, wait_for

from shmpool import GFP_ATOMIC, InvalidHandleError, Mempool, PoolBusyError, PoolClosedError
from shmpool._layout import MAX_QUEUES

ATTACH = "import sys, time, numpy as np, shmpool\npool = shmpool.Mempool.attach(sys.argv[1])\n"


def child(popen, code: str, name: str):
    """A separate interpreter running ``code``; returns it once it printed
    its first line (the line is returned too)."""
    p = popen(ATTACH + code, name)
    line = p.stdout.readline().strip()
    if not line:
        p.kill()
        raise AssertionError(f"child failed: {p.communicate(timeout=10)[1]}")
    return p, line


def kill(p) -> None:
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=10)


@pytest.fixture
def pool(name: str):
    with Mempool.create(name, min_nr=2, slot_size=32, capacity=16) as p:
        yield p
        p.destroy(force=True)


def test_fifo_full_empty_and_nowait(pool: Mempool) -> None:
    q = pool.queue("frames", depth=3)
    hs = [pool.alloc() for _ in range(4)]
    for h in hs[:3]:
        q.put(h)
    assert (q.qsize(), len(q), q.full(), q.empty()) == (3, 3, True, False)
    with pytest.raises(queue.Full):
        q.put_nowait(hs[3])
    with pytest.raises(queue.Full):
        q.put(hs[3], timeout=0.05)
    assert [q.get() for _ in range(3)] == hs[:3]  # first in, first out; the same handles
    with pytest.raises(queue.Empty):
        q.get_nowait()
    with pytest.raises(queue.Empty):
        q.get(timeout=0.05)
    assert q.empty()
    pool.free_bulk(hs)
    check_whole(pool)


def test_a_queued_element_belongs_to_the_queue(pool: Mempool) -> None:
    q = pool.queue("q", depth=4)
    h = pool.alloc()
    q.put(h)
    with pytest.raises(InvalidHandleError, match="in a queue"):
        pool.free(h)  # no longer the caller's to free
    with pytest.raises(InvalidHandleError):
        pool.buffer(h)
    s = pool.stats()
    assert (s.queued, s.in_use) == (1, 0)
    assert s.curr_nr + s.arena_free + s.in_use + s.queued == s.capacity
    with pytest.raises(PoolBusyError, match="held or queued"):
        pool.destroy()
    assert q.get() == h
    pool.buffer(h)[:2] = b"ok"  # ours again
    pool.free(h)


def test_put_many_is_all_or_nothing_and_get_many_takes_what_is_there(pool: Mempool) -> None:
    q = pool.queue("q", depth=4)
    hs = [pool.alloc() for _ in range(5)]
    q.put(hs[0])
    before = snapshot(pool)
    with pytest.raises(queue.Full):
        q.put_many(hs[1:5], block=False)  # room for 3, not 4: none goes in
    assert snapshot(pool) == before
    with pytest.raises(ValueError, match="never fit"):
        q.put_many(hs[:5])
    q.put_many(hs[1:4])
    got = q.get_many(10)
    assert got.dtype == np.int64 and got.tolist() == hs[:4]
    q.put_many(np.array(hs[:2]))
    assert q.get_many(1).tolist() == hs[:1]
    assert q.get_many(5, timeout=1).tolist() == hs[1:2]
    with pytest.raises(queue.Empty):
        q.get_many(3, block=False)
    pool.free_bulk(hs)


def test_refused_puts_change_nothing(pool: Mempool, name: str) -> None:
    q = pool.queue("q", depth=4)
    h = pool.alloc()
    gone = pool.alloc()
    pool.free(gone)
    before = snapshot(pool)
    with pytest.raises(InvalidHandleError):
        q.put(gone)  # not held: freed already
    with pytest.raises(TypeError):
        q.put("7")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        q.put(-1)
    with pytest.raises(TypeError):
        q.put(True)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        q.put(1 << 70)
    with pytest.raises(InvalidHandleError, match="given twice"):
        q.put_many([h, h])
    with pytest.raises(InvalidHandleError):
        q.put_many([h, gone])  # one bad handle refuses the whole batch
    assert snapshot(pool) == before
    pool.free(h)


def test_put_and_get_take_their_arguments_as_multiprocessing_queues_do(pool: Mempool) -> None:
    """put(handle, block=True, timeout=None) and get(block=True,
    timeout=None), by position or by keyword; a call with wrong arguments
    is refused with TypeError and changes nothing."""
    import inspect

    q = pool.queue("q", depth=2)
    assert str(inspect.signature(q.put)) == "(handle, block=True, timeout=None)"
    assert str(inspect.signature(q.get)) == "(block=True, timeout=None)"
    h, k, extra = pool.alloc(), pool.alloc(), pool.alloc()
    assert q.put(handle=h, timeout=1.0) is None
    q.put(k, True, None)
    with pytest.raises(queue.Full):
        q.put(extra, block=False)
    pool.free(extra)  # still ours: the refused put left it with us
    assert q.get(timeout=1.0) == h
    assert q.get(True, 1) == k
    with pytest.raises(queue.Empty):
        q.get(block=False)
    with pytest.raises(queue.Empty):
        q.get(False, 5.0)  # not blocking: the timeout is ignored, as queue.Queue's
    q.put(h)
    before = snapshot(pool)
    for call, why in (
        (lambda: q.put(), "missing required argument 'handle'"),
        (lambda: q.put(k, True, None, 1), "at most 3 arguments"),
        (lambda: q.put(k, item=k), "unexpected keyword argument 'item'"),
        (lambda: q.put(k, handle=k), "multiple values for argument 'handle'"),
        (lambda: q.get(True, None, 1), "at most 2 arguments"),
        (lambda: q.get(True, block=False), "multiple values for argument 'block'"),
        (lambda: q.get(timeout="1"), "timeout must be a number"),
    ):
        with pytest.raises(TypeError, match=why):
            call()
    with pytest.raises(ValueError, match="timeout must be a finite number"):
        q.get(timeout=-1.0)
    assert snapshot(pool) == before
    assert q.get_nowait() == h
    pool.free_bulk([h, k])
    assert pool.stats().in_use == 0
    check_whole(pool)


def test_a_numpy_integer_handle_is_a_handle(pool: Mempool) -> None:
    q = pool.queue("q", depth=4)
    hs = pool.alloc_bulk(2)
    q.put(hs[0])  # a numpy int64, as get_many and alloc_bulk give them
    q.put(np.uint64(hs[1]))
    assert q.get() == hs[0] and q.get() == hs[1]
    pool.free_bulk(hs)


def test_only_the_holder_may_put(pool: Mempool, name: str, popen) -> None:
    q = pool.queue("q", depth=4)
    h = pool.alloc()
    code = (
        "q = pool.queue('q')\n"
        "h = int(sys.stdin.readline())\n"
        "try:\n    q.put(h)\n    print('put', flush=True)\n"
        "except shmpool.InvalidHandleError as e:\n    print('refused', e, flush=True)\n"
    )
    p = popen(ATTACH + code, name)
    p.stdin.write(f"{h}\n")
    p.stdin.flush()
    line = p.stdout.readline()
    assert line.startswith("refused") and "another process" in line
    p.wait(timeout=10)
    assert q.qsize() == 0
    pool.free(h)


def test_opening_queues(pool: Mempool) -> None:
    with pytest.raises(FileNotFoundError):
        pool.queue("nope")
    a = pool.queue("a", depth=5)
    assert pool.queue("a").depth == 5 and pool.queue("a", depth=5).depth == 5
    with pytest.raises(ValueError, match="depth 5"):
        pool.queue("a", depth=6)
    with pytest.raises(ValueError):
        pool.queue("b", depth=0)
    with pytest.raises(ValueError):
        pool.queue("b", depth=17)  # beyond the capacity
    with pytest.raises(ValueError):
        pool.queue("x" * 48, depth=1)
    with pytest.raises(TypeError):
        pool.queue(3, depth=1)  # type: ignore[arg-type]
    for i in range(MAX_QUEUES - 1):
        pool.queue(f"q{i}", depth=1)
    with pytest.raises(OSError, match="queues already"):
        pool.queue("one-too-many", depth=1)
    a.close()
    with pytest.raises(PoolClosedError):
        a.get_nowait()


@pytest.mark.timeout(60)
def test_a_blocked_get_is_woken_by_a_put_in_another_process(pool: Mempool, name: str, popen) -> None:
    q = pool.queue("q", depth=2)
    p, line = child(popen, "q = pool.queue('q')\nprint('waiting', flush=True)\nprint(q.get(timeout=30), flush=True)\n", name)
    assert line == "waiting"
    wait_for(lambda: queue_sleepers(pool, q) == (1, 0), what="the child to sleep in get")
    assert pool.stats().nr_waiters == 1  # counted among the pool's sleepers
    h = pool.alloc()
    q.put(h)
    assert int(p.stdout.readline()) == h  # the same handle, now the child's
    p.wait(timeout=10)
    assert pool.reclaim_dead() == 1  # the child held it when it exited
    assert pool.stats().nr_waiters == 0


@pytest.mark.timeout(60)
def test_a_blocked_put_is_woken_by_a_get_in_another_process(pool: Mempool, name: str, popen) -> None:
    q = pool.queue("q", depth=1)
    q.put(pool.alloc())
    p, line = child(popen, "q = pool.queue('q')\nh = pool.alloc()\nprint('putting', flush=True)\n"
                    "q.put(h, timeout=30)\nprint('done', flush=True)\nsys.stdin.read()\n", name)
    assert line == "putting"
    wait_for(lambda: queue_sleepers(pool, q) == (0, 1), what="the child to sleep in put")
    first = q.get()
    assert p.stdout.readline().strip() == "done"
    kill(p)
    assert pool.reclaim_dead() == 0  # what it put belongs to the queue
    second = q.get_nowait()
    pool.free_bulk([first, second])
    check_whole(pool)


@pytest.mark.timeout(60)
def test_senders_and_receivers_that_die(pool: Mempool, name: str, popen) -> None:
    q = pool.queue("q", depth=8)
    sender, line = child(popen, "q = pool.queue('q')\nq.put_many([pool.alloc() for _ in range(3)])\n"
                         "print('sent', flush=True)\nsys.stdin.read()\n", name)
    assert line == "sent"
    kill(sender)
    assert pool.reclaim_dead() == 0  # a sender that dies after put loses nothing
    assert q.qsize() == 3
    receiver, line = child(popen, "q = pool.queue('q')\nq.get()\nprint('got', flush=True)\nsys.stdin.read()\n", name)
    assert line == "got"
    kill(receiver)
    assert pool.reclaim_dead() == 1  # the receiver held what it got
    assert q.qsize() == 2
    pool.free_bulk(q.get_many(2))
    s = pool.stats()
    assert (s.in_use, s.queued) == (0, 0)
    check_whole(pool)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("point", ["queue-put", "queue-get"])
def test_killed_inside_put_or_get_the_element_is_in_the_queue(pool: Mempool, name: str, popen, point: str) -> None:
    q = pool.queue("q", depth=8)
    kept = pool.alloc()
    q.put(kept)  # an element queued before, whose place must survive
    code = "from shmpool.testing import crash_at\nq = pool.queue('q')\nh = pool.alloc()\n"
    if point == "queue-get":
        code += "q.put(h)\n"
    code += f"print('ready', flush=True)\nsys.stdin.readline()\ncrash_at({point!r})\n"
    code += "q.put(pool.alloc())\n" if point == "queue-put" else "q.get(); q.get()\n"
    p, line = child(popen, code, name)
    assert line == "ready"
    p.stdin.write("go\n")
    p.stdin.flush()
    assert p.wait(timeout=20) == -signal.SIGKILL
    pool.reclaim_dead()  # takes the lock over from the dead child, repairs, reclaims
    s = pool.stats()
    assert s.curr_nr + s.arena_free + s.in_use + s.queued == s.capacity
    check_whole(pool)
    # In the queue, never both and never neither: the element being put (its
    # word was the commit) or being taken (not yet ours) is in the queue; the
    # child's other element was reclaimed.
    assert (s.queued, s.in_use) == (2, 0)
    got = q.get_many(8)
    assert kept in got.tolist() and len(set(got.tolist())) == 2
    pool.free_bulk(got)


@pytest.mark.timeout(120)
def test_many_producers_and_consumers_count_every_element(name: str, popen) -> None:
    n_each, producers, consumers = 300, 2, 2
    with Mempool.create(name, min_nr=4, slot_size=16, capacity=32, fail_rate=0.3, seed=1) as pool:
        q = pool.queue("work", depth=8)
        prod = (
            "q = pool.queue('work')\nprint('up', flush=True)\n"
            f"for i in range({n_each}):\n"
            "    h = pool.alloc(timeout=30)\n"
            "    pool.ndarray(h, np.int64, 2)[:] = (int(sys.argv[2]), i)\n"
            "    q.put(h, timeout=30)\n"
            "print('done', flush=True)\n"
        )
        cons = (
            "q = pool.queue('work')\nprint('up', flush=True)\nseen = []\n"
            "while True:\n"
            "    h = q.get(timeout=30)\n"
            "    who, i = pool.ndarray(h, np.int64, 2).tolist()\n"
            "    pool.free(h)\n"
            "    if who < 0:\n        break\n"
            "    seen.append(who * 100000 + i)\n"
            "print(' '.join(map(str, seen)), flush=True)\n"
        )
        ps = [popen(ATTACH + prod, name, str(k)) for k in range(producers)]
        cs = [popen(ATTACH + cons, name) for _ in range(consumers)]
        for p in ps + cs:
            assert p.stdout.readline().strip() == "up"
        for p in ps:
            assert p.stdout.readline().strip() == "done"
            p.wait(timeout=30)
        for _ in cs:  # one stop message per consumer
            h = pool.alloc(timeout=30)
            pool.ndarray(h, np.int64, 2)[:] = (-1, 0)
            q.put(h, timeout=30)
        seen: list[int] = []
        for c in cs:
            mine = [int(x) for x in c.stdout.readline().split()]
            for k in range(producers):  # FIFO: each consumer sees each producer's elements in order
                order = [v % 100000 for v in mine if v // 100000 == k]
                assert order == sorted(order)
            seen += mine
            c.wait(timeout=30)
        assert sorted(seen) == sorted(k * 100000 + i for k in range(producers) for i in range(n_each))
        s = pool.stats()
        assert (s.in_use, s.queued, s.nr_waiters) == (0, 0, 0)
        check_whole(pool)
        pool.destroy()


@pytest.mark.timeout(60)
def test_a_signal_handlers_exception_ends_a_blocked_get_and_leaks_nothing(pool: Mempool, name: str, popen) -> None:
    q = pool.queue("q", depth=2)
    code = (
        "import signal\n"
        "def stop(*args):\n    raise KeyboardInterrupt\n"
        "signal.signal(signal.SIGUSR1, stop)\n"
        "q = pool.queue('q')\nprint('waiting', flush=True)\n"
        "try:\n    q.get()\nexcept KeyboardInterrupt:\n    print('interrupted', flush=True)\n"
        "sys.stdin.read()\n"
    )
    p, line = child(popen, code, name)
    assert line == "waiting"
    wait_for(lambda: queue_sleepers(pool, q) == (1, 0), what="the child to sleep in get")
    p.send_signal(signal.SIGUSR1)
    assert p.stdout.readline().strip() == "interrupted"
    assert queue_sleepers(pool, q) == (0, 0) and pool.stats().nr_waiters == 0
    t0 = time.monotonic()
    assert pool.alloc(GFP_ATOMIC) is not None  # nothing wedged
    assert time.monotonic() - t0 < 5
    kill(p)


@pytest.mark.timeout(120)
def test_senders_and_receivers_killed_at_random_points_lose_nothing(name: str, popen) -> None:
    """Producers and consumers hammer one queue while random ones are
    SIGKILLed (only once they have moved elements, so every kill lands in
    running code); afterwards every element is counted back."""
    import random

    rng = random.Random(7)
    worker = (
        "import os, queue\nq = pool.queue('q')\nrole = sys.argv[2]\nk = 0\n"
        "while True:\n"
        "    if role == 'p':\n"
        "        h = pool.alloc(timeout=5)\n"
        "        try:\n            q.put(h, timeout=0.5)\n"
        "        except queue.Full:\n            pool.free(h)\n"
        "    else:\n"
        "        try:\n            pool.free_bulk(q.get_many(4, timeout=0.5))\n"
        "        except queue.Empty:\n            pass\n"
        "    k += 1\n"
        "    if k == 20:\n        print('busy', flush=True)\n"
    )
    with Mempool.create(name, min_nr=4, slot_size=16, capacity=64, fail_rate=0.2, seed=3) as pool:
        pool.queue("q", depth=16)
        procs = []

        def start(role: str):
            p = popen(ATTACH + worker, name, role)
            assert p.stdout.readline().strip() == "busy"
            return p

        for role in "ppcc":
            procs.append((role, start(role)))
        kills = 0
        for _ in range(12):
            i = rng.randrange(len(procs))
            role, p = procs[i]
            kill(p)
            kills += 1
            procs[i] = (role, start(role))
        for _, p in procs:
            kill(p)
        pool.reclaim_dead()
        s = pool.stats()
        assert kills == 12 and s.in_use == 0
        assert s.curr_nr + s.arena_free + s.queued == s.capacity
        check_whole(pool)
        q = pool.queue("q")
        while not q.empty():
            pool.free_bulk(q.get_many(16))
        s = pool.stats()
        assert (s.in_use, s.queued, s.curr_nr + s.arena_free) == (0, 0, 64)
        pool.destroy()


def put_asleep(pool: Mempool, q, put):
    """Run put (a blocking put or put_many on full queue q) in a thread, once
    it sleeps: (done event, result list)."""
    done, out = in_thread(put)
    wait_for(lambda: queue_sleepers(pool, q) == (0, 1), what="the put to sleep")
    return done, out


@pytest.mark.timeout(60)
def test_a_putter_of_a_full_deep_queue_goes_on_after_one_get(name: str, no_retries) -> None:
    """A full queue wakes its putters once a batch is free (its low-water
    mark, a quarter of the depth here), not at every get; a putter left
    below the mark looks again after a nap of milliseconds, so one get is
    still enough, long before any retry."""
    with Mempool.create(name, min_nr=2, slot_size=8, capacity=300) as pool:
        q = pool.queue("deep", depth=256)
        q.put_many(pool.alloc_bulk(256))
        h = pool.alloc()
        done, out = put_asleep(pool, q, lambda: q.put(h, timeout=50))
        first = q.get()
        assert done.wait(10), "the put slept on with room in the queue"
        assert out == [None] and q.qsize() == 256 and queue_sleepers(pool, q) == (0, 0)
        pool.free(first)
        pool.free_bulk(q.get_many(256))
        check_whole(pool)
        pool.destroy()


@pytest.mark.timeout(60)
def test_a_sleeping_put_many_is_woken_when_its_room_is_there(name: str, no_retries) -> None:
    with Mempool.create(name, min_nr=2, slot_size=8, capacity=40) as pool:
        q = pool.queue("q", depth=8)
        first = pool.alloc_bulk(8).tolist()
        q.put_many(first)
        mine = pool.alloc_bulk(6).tolist()
        done, out = put_asleep(pool, q, lambda: q.put_many(mine, timeout=50))
        taken = [q.get() for _ in range(5)]
        assert not done.is_set()  # room for 5 of its 6: all or nothing
        taken.append(q.get())
        assert done.wait(10), "put_many slept on with room for all it puts"
        assert out == [None] and taken == first[:6]
        assert q.get_many(8).tolist() == first[6:] + mine
        pool.free_bulk(first + mine)
        check_whole(pool)
        pool.destroy()


@pytest.mark.timeout(60)
def test_each_put_wakes_one_getter_and_none_is_left_asleep(name: str, no_retries) -> None:
    with Mempool.create(name, min_nr=2, slot_size=8, capacity=8) as pool:
        q = pool.queue("q", depth=4)
        waits = [in_thread(lambda: q.get(timeout=50)) for _ in range(2)]
        wait_for(lambda: queue_sleepers(pool, q) == (2, 0), what="both getters to sleep")
        first = pool.alloc()
        q.put(first)
        wait_for(lambda: sum(done.is_set() for done, _ in waits) == 1, what="one getter to return")
        wait_for(lambda: queue_sleepers(pool, q) == (1, 0), what="the other to sleep on")
        second = pool.alloc()
        q.put(second)
        assert all(done.wait(10) for done, _ in waits), "a getter slept on with an element in the queue"
        assert sorted(out[0] for _, out in waits) == sorted([first, second])
        pool.free_bulk([first, second])
        check_whole(pool)
        pool.destroy()


def test_multiprocessing_queues_surface(name: str) -> None:
    """What shutdown code written for multiprocessing.Queue calls: a closed
    queue's put/get raise ValueError and qsize/empty/full OSError, each
    saying it is closed; join_thread and cancel_join_thread do nothing."""
    import shmpool

    with Mempool.create(name, min_nr=1, slot_size=8, capacity=4) as pool:
        q = pool.queue("q", depth=2)
        assert isinstance(q, shmpool.Queue) and "Queue" in shmpool.__all__
        h = pool.alloc()
        q.put(h)
        assert q.join_thread() is None and q.cancel_join_thread() is None and q.qsize() == 1
        q.close()
        for call in (lambda: q.put(h), lambda: q.get(), lambda: q.get_nowait(), lambda: q.put_nowait(h)):
            with pytest.raises(ValueError, match="is closed"):
                call()
        for call in (q.qsize, q.empty, q.full):
            with pytest.raises(OSError, match="is closed"):
                call()
        q.join_thread()
        q.cancel_join_thread()
        again = pool.queue("q")
        assert again.get_nowait() == h  # closing the object changed nothing in the pool
        again.put(h)
        pool.close()
        for call in (again.qsize, again.empty, again.full):
            with pytest.raises(OSError, match="is closed"):
                call()
        with pytest.raises(ValueError, match="closed"):
            again.get_nowait()
    with Mempool.attach(name) as pool:
        pool.free(pool.queue("q").get_nowait())
        pool.destroy()
