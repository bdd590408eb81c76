"""The awaitable twins (pool.alloc_async, q.get_async, q.put_async) on a
real event loop, woken by another process, cancelled without losing an
element (where asyncio.to_thread(pool.alloc) loses one)."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import queue
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import pytest
from helpers import queue_sleepers, wait_for

from shmpool import GFP_ATOMIC, GFP_KERNEL, InvalidHandleError, Mempool, PoolClosedError, PoolDestroyedError, _aio
from shmpool.testing import registry_entry

pytestmark = pytest.mark.timeout(60)

# A process that does what it is told on stdin, one line at a time, and
# says so on stdout.
HELPER = """
import sys
import numpy as np
from shmpool import Mempool
pool = Mempool.attach(sys.argv[1])
q = pool.queue("q")
print("ready", flush=True)
for line in sys.stdin:
    cmd, *args = line.split()
    if cmd == "free":                      # free an element (anybody may)
        pool.free(int(args[0]))
        print("freed", flush=True)
    elif cmd == "put":                     # an element of ours, stamped, into the queue
        h = pool.alloc()
        pool.ndarray(h, np.int64, 1)[0] = int(args[0])
        q.put(h)
        print(h, flush=True)
    elif cmd == "get":                     # the oldest element out of the queue, freed
        h = q.get(timeout=10)
        pool.free(h)
        print(h, flush=True)
    elif cmd == "destroy":
        pool.destroy(force=True)
        print("destroyed", flush=True)
        break
"""


class Helper:
    def __init__(self, popen: Callable[..., Any], name: str) -> None:
        self.p = popen(HELPER, name)
        assert self.p.stdout.readline() == "ready\n", self.p.stderr.read()

    def tell(self, command: str) -> None:
        self.p.stdin.write(command + "\n")
        self.p.stdin.flush()

    def answer(self) -> str:
        line: str = self.p.stdout.readline()
        assert line, self.p.stderr.read()
        return line.strip()


@pytest.fixture
def pool(name: str) -> Any:
    """min_nr 1 of capacity 2, with queue "q" of depth 1."""
    with Mempool.create(name, min_nr=1, slot_size=64, capacity=2).destroying(force=True) as p:
        p.queue("q", depth=1)
        yield p


@pytest.fixture
def helper(pool: Mempool, popen: Callable[..., Any]) -> Helper:
    return Helper(popen, pool.name)


async def until(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Poll a condition, letting the loop run, until it holds (else fail)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.001)


def getters(pool: Mempool) -> int:
    """Threads asleep in a blocked get of queue "q"."""
    return queue_sleepers(pool, pool.queue("q"))[0]


def putters(pool: Mempool) -> int:
    """Threads asleep in a blocked put into queue "q"."""
    return queue_sleepers(pool, pool.queue("q"))[1]


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(coro)  # type: ignore[arg-type]


def asleep_before_any_timer(monkeypatch: pytest.MonkeyPatch, target: Any, attr: str, asleep: Callable[[], bool]) -> None:
    """Make ``target.attr`` (what hands a wait to a thread) block the loop
    until that thread sleeps in the pool, so that a wait_for timer cannot
    cancel the wait before then, however loaded the machine."""
    real = getattr(target, attr)

    def hand_and_block(*args: Any) -> Any:
        result = real(*args)
        wait_for(asleep, what="the waiting thread asleep")
        return result

    monkeypatch.setattr(target, attr, hand_and_block)


class _HandAndBlock:
    """Stands in for _aio's pool of waiting threads: hands each wait to the
    real one, then blocks the loop until the thread sleeps in the pool."""

    def __init__(self, real: Any, asleep: Callable[[], bool]) -> None:
        self.real, self.asleep = real, asleep

    def run(self, job: Any) -> None:
        self.real.run(job)
        wait_for(self.asleep, what="the waiting thread asleep")


def threads_asleep_before_any_timer(monkeypatch: pytest.MonkeyPatch, asleep: Callable[[], bool]) -> None:
    """asleep_before_any_timer for alloc_async's and the queue twins' own
    waiting threads."""
    monkeypatch.setattr(_aio, "_threads", _HandAndBlock(_aio._threads, asleep))


class _NoThreads:
    def run(self, job: Any) -> None:
        pytest.fail("waited in a thread")


@pytest.fixture
def no_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """A wait handed to a thread fails the test."""
    monkeypatch.setattr(_aio, "_threads", _NoThreads())


def spy_handover(loop: asyncio.AbstractEventLoop) -> threading.Event:
    """An event set when a waiting thread has handed its result to the loop
    (it calls call_soon_threadsafe then)."""
    handed = threading.Event()
    real = loop.call_soon_threadsafe

    def spy(*args: Any, **kwargs: Any) -> Any:
        handle = real(*args, **kwargs)
        handed.set()
        return handle

    loop.call_soon_threadsafe = spy  # type: ignore[method-assign,assignment]
    return handed


@pytest.fixture
def via_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """alloc_async waits in a thread, as it does when another event loop of
    the process has the pool's FIFO (the race of two loops, made certain)."""
    monkeypatch.setattr(_aio, "_fifo_for", lambda pool, loop: None)


@pytest.fixture(params=["fifo", "thread"])
def wait_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """alloc_async's two ways to wait: woken in its loop through the
    process's FIFO, or in a thread (another loop has the FIFO)."""
    if request.param == "thread":
        monkeypatch.setattr(_aio, "_fifo_for", lambda pool, loop: None)
    return str(request.param)


# ---------------------------------------------------------------- alloc_async


def test_alloc_async_with_an_element_free_needs_no_thread(pool: Mempool, no_threads: None) -> None:
    async def main() -> None:
        a = await pool.alloc_async()
        b = await pool.alloc_async(GFP_KERNEL, timeout=1)
        assert await pool.alloc_async(GFP_ATOMIC) is None  # may not sleep: None at once
        with pytest.raises(TimeoutError):
            await pool.alloc_async(timeout=0)
        pool.free(a)
        pool.free(b)

    run(main())
    assert pool.stats().in_use == 0


def test_alloc_async_checks_its_arguments_before_waiting(pool: Mempool) -> None:
    async def main() -> None:
        with pytest.raises(ValueError):
            await pool.alloc_async(0x2000)
        with pytest.raises(TypeError):
            await pool.alloc_async("GFP_KERNEL")  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            await pool.alloc_async(timeout=-1)

    run(main())


def test_alloc_async_is_woken_by_a_free_in_another_process(pool: Mempool, helper: Helper, wait_path: str) -> None:
    held = [pool.alloc(), pool.alloc()]  # the pool is empty

    async def main() -> int:
        task = asyncio.create_task(pool.alloc_async())
        await until(lambda: pool.stats().nr_waiters == 1, "alloc_async to sleep")
        for _ in range(100):  # the loop runs other work meanwhile
            await asyncio.sleep(0)
        assert not task.done()
        helper.tell(f"free {held[0]}")
        h = await task
        assert h is not None
        return h

    h = run(main())
    assert helper.answer() == "freed"
    s = pool.stats()
    assert (s.in_use, s.nr_waiters) == (2, 0)
    pool.free(h)
    pool.free(held[1])


def test_alloc_async_times_out_and_holds_nothing(pool: Mempool, wait_path: str) -> None:
    held = [pool.alloc(), pool.alloc()]

    async def main() -> float:
        start = time.monotonic()
        with pytest.raises(TimeoutError, match="no element within 0.2 s"):
            await pool.alloc_async(timeout=0.2)
        return time.monotonic() - start

    assert 0.2 <= run(main()) < 20
    s = pool.stats()
    assert (s.in_use, s.nr_waiters) == (2, 0)
    pool.free_bulk(held)


def test_alloc_async_raises_the_waits_error(pool: Mempool, helper: Helper, wait_path: str) -> None:
    pool.alloc()
    pool.alloc()

    async def main() -> None:
        task = asyncio.create_task(pool.alloc_async())
        await until(lambda: pool.stats().nr_waiters == 1, "alloc_async to sleep")
        helper.tell("destroy")
        with pytest.raises(PoolDestroyedError):
            await task

    run(main())
    assert helper.answer() == "destroyed"


def test_cancelled_alloc_async_in_a_thread_leaks_nothing(
    pool: Mempool, helper: Helper, monkeypatch: pytest.MonkeyPatch, via_threads: None
) -> None:
    """Cancelled by wait_for while its thread sleeps; the free comes after:
    the thread gets the element and frees it (the slice is made long so that
    the thread is surely still asleep when the free comes)."""
    monkeypatch.setattr(_aio, "ALLOC_SLICE_SECONDS", 30.0)
    threads_asleep_before_any_timer(monkeypatch, lambda: pool.stats().nr_waiters == 1)
    held = [pool.alloc(), pool.alloc()]
    before = pool.stats().in_use

    async def main() -> None:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(pool.alloc_async(), 0.05)
        assert pool.stats().in_use == before  # nothing held by the cancelled call
        assert pool.stats().nr_waiters == 1  # its thread, still asleep
        helper.tell(f"free {held[0]}")
        await until(lambda: pool.stats().nr_waiters == 0, "the thread to wake")
        await until(lambda: pool.stats().in_use == before - 1, "the element back in the pool")

    run(main())
    assert helper.answer() == "freed"
    assert pool.stats().in_use == before - 1
    h = pool.alloc(GFP_ATOMIC)  # the freed element is there to take
    assert h is not None
    pool.free_bulk([h, held[1]])


def test_to_thread_alloc_cancelled_by_wait_for_leaks_the_element(
    pool: Mempool, helper: Helper, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The leak that alloc_async avoids, shown: the thread gets the element
    after wait_for gave up, and nobody will ever free it."""
    held = [pool.alloc(), pool.alloc()]
    before = pool.stats().in_use

    async def main() -> None:
        loop = asyncio.get_running_loop()
        asleep_before_any_timer(monkeypatch, loop, "run_in_executor", lambda: pool.stats().nr_waiters == 1)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.to_thread(pool.alloc), 0.05)
        helper.tell(f"free {held[0]}")
        await until(lambda: pool.stats().nr_waiters == 0, "the thread to wake")

    run(main())  # (asyncio.run waits for the thread)
    assert helper.answer() == "freed"
    assert pool.stats().in_use == before  # leaked: held by this process, handle lost
    assert pool.alloc(GFP_ATOMIC) is None
    # (the fixture destroys the pool with force)


def test_alloc_async_cancelled_after_its_thread_got_the_element(pool: Mempool, helper: Helper, via_threads: None) -> None:
    """The narrow case: the thread has handed the element over, but the
    task is cancelled before it runs again. The coroutine frees it."""
    held = [pool.alloc(), pool.alloc()]
    before = pool.stats().in_use

    async def main() -> None:
        handed = spy_handover(asyncio.get_running_loop())
        task = asyncio.create_task(pool.alloc_async())
        await until(lambda: pool.stats().nr_waiters == 1, "alloc_async to sleep")
        helper.tell(f"free {held[0]}")
        assert handed.wait(10)  # blocks the loop on purpose: the task cannot run before cancel()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert pool.stats().in_use == before - 1

    run(main())
    assert helper.answer() == "freed"
    pool.free(held[1])
    assert pool.stats().in_use == 0


def left_pending_by_a_closed_loop(pool: Mempool) -> asyncio.Task[Any]:
    """An alloc_async asleep in a loop that is then closed under it."""
    loop = asyncio.new_event_loop()
    try:
        task = loop.create_task(pool.alloc_async())
        loop.run_until_complete(until(lambda: pool.stats().nr_waiters == 1, "alloc_async to sleep"))
        assert not task.done()
    finally:
        loop.close()
    return task


def test_alloc_async_whose_loop_is_closed_while_it_waits_in_a_thread_leaks_nothing(
    pool: Mempool, helper: Helper, monkeypatch: pytest.MonkeyPatch, via_threads: None
) -> None:
    """A loop closed with the call still waiting: the element its thread
    gets afterwards has nobody to go to, and is freed."""
    monkeypatch.setattr(_aio, "ALLOC_SLICE_SECONDS", 30.0)
    held = [pool.alloc(), pool.alloc()]
    task = left_pending_by_a_closed_loop(pool)
    helper.tell(f"free {held[0]}")
    assert helper.answer() == "freed"
    wait_for(lambda: pool.stats().nr_waiters == 0 and pool.stats().in_use == 1, what="the element back in the pool")
    pool.free(held[1])
    del task  # pending (its loop closed) until here


# ------------------------------------------------- alloc_async through the FIFO


def fifos(pool: Mempool) -> list[str]:
    prefix = f"fifo.shmpool.{pool.name}."
    return [e for e in os.listdir("/dev/shm") if e.startswith(prefix)]


def test_alloc_async_sleeps_in_its_loop_and_is_woken_there(pool: Mempool, helper: Helper, no_threads: None) -> None:
    """No thread: the free in the other process writes a byte into this
    process's FIFO, which the loop watches."""
    held = [pool.alloc(), pool.alloc()]

    async def main() -> int:
        task = asyncio.create_task(pool.alloc_async())
        await until(lambda: pool.stats().nr_waiters == 1, "alloc_async to sleep")
        assert fifos(pool) == [f"fifo.shmpool.{pool.name}.{registry_entry(pool)}"]
        helper.tell(f"free {held[0]}")
        return await asyncio.wait_for(task, 20)

    h = run(main())
    assert helper.answer() == "freed"
    assert pool.stats().nr_waiters == 0
    pool.free(h)
    pool.free(held[1])


def test_cancelled_alloc_async_is_no_sleeper_at_once_and_loses_nothing(pool: Mempool, helper: Helper) -> None:
    held = [pool.alloc(), pool.alloc()]
    before = pool.stats()

    async def main() -> None:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(pool.alloc_async(), 0.05)
        s = pool.stats()
        assert (s.nr_waiters, s.in_use) == (0, before.in_use)  # counted out in its finally, nothing taken

    run(main())
    helper.tell(f"free {held[0]}")
    assert helper.answer() == "freed"
    assert pool.stats().curr_nr == 1  # the freed element refilled the reserve: nobody took it
    pool.free(held[1])


def test_two_event_loops_of_one_process_wait_at_once(pool: Mempool, helper: Helper) -> None:
    """The first loop has the FIFO; the second waits in a thread. A free
    each wakes them both in turn."""
    held = [pool.alloc(), pool.alloc()]
    got: list[int] = []
    started = threading.Event()

    def other_loop() -> None:
        async def wait() -> None:
            started.set()
            got.append(await pool.alloc_async(timeout=20))

        asyncio.run(wait())

    t = threading.Thread(target=other_loop)
    t.start()

    async def main() -> None:
        await until(lambda: started.is_set() and pool.stats().nr_waiters == 1, "the other loop to sleep")
        task = asyncio.create_task(pool.alloc_async(timeout=20))
        await until(lambda: pool.stats().nr_waiters == 2, "this loop to sleep too")
        for h in held:
            helper.tell(f"free {h}")
            assert helper.answer() == "freed"
        got.append(await task)

    run(main())
    t.join(20)
    assert not t.is_alive() and sorted(got) == sorted(set(got)) and len(got) == 2
    assert pool.stats().nr_waiters == 0
    pool.free_bulk(got)


WAITER = """
import asyncio, sys
from shmpool import Mempool
pool = Mempool.attach(sys.argv[1])
async def main():
    while True:                                    # keep what it gets, and wait for more
        h = await pool.alloc_async()
        print(h, flush=True)
asyncio.run(main())
"""

FREER = """
import signal, sys
from shmpool import Mempool
signal.signal(signal.SIGPIPE, signal.SIG_DFL)      # as many programs have it: SIGPIPE would kill us
pool = Mempool.attach(sys.argv[1])
print("ready", flush=True)
for line in sys.stdin:
    pool.free(int(line))
    print("freed", flush=True)
"""


def test_a_killed_async_waiter_is_uncounted_and_its_waker_survives_its_gone_fifo(
    pool: Mempool, popen: Callable[..., Any]
) -> None:
    held = [pool.alloc(), pool.alloc()]
    freer = popen(FREER, pool.name)
    assert freer.stdout.readline() == "ready\n", freer.stderr.read()
    waiter = popen(WAITER, pool.name)
    wait_for(lambda: pool.stats().nr_waiters == 1, what="the waiter to sleep")
    freer.stdin.write(f"{held[0]}\n")
    freer.stdin.flush()
    assert freer.stdout.readline() == "freed\n"
    assert int(waiter.stdout.readline()) >= 0  # woken through its FIFO, which the freer now keeps open
    wait_for(lambda: pool.stats().nr_waiters == 1, what="the waiter to sleep again")
    waiter.kill()
    waiter.wait(10)
    freer.stdin.write(f"{held[1]}\n")  # its byte goes to a FIFO nobody reads any more: EPIPE, not SIGPIPE
    freer.stdin.flush()
    assert freer.stdout.readline() == "freed\n", freer.stderr.read()
    assert freer.poll() is None
    assert pool.reclaim_dead() == 1  # what the killed waiter held; its sleeper counted out
    s = pool.stats()
    assert (s.nr_waiters, s.in_use) == (0, 0)


#: An asyncio waiter that says its registry entry, then keeps what it gets
#: and waits for more; only a wake-up through its FIFO can end a wait.
WAITER_IN_ITS_ENTRY = """
import asyncio, sys
from shmpool import Mempool
from shmpool.testing import registry_entry, sleep_retry
sleep_retry(alloc=600.0)
pool = Mempool.attach(sys.argv[1])
pool.long_sleep = None  # (its report would end a wait after 5 s too)
print(registry_entry(pool), flush=True)
async def main():
    while True:
        h = await pool.alloc_async()
        print(h, flush=True)
asyncio.run(main())
"""


def test_a_fifo_left_by_a_killed_process_is_replaced_by_the_next_in_its_entry(
    name: str, popen: Callable[..., Any]
) -> None:
    with Mempool.create(name, min_nr=1, slot_size=16, capacity=2, max_processes=2).destroying(force=True) as pool:
        held = [pool.alloc(), pool.alloc()]
        first = popen(WAITER_IN_ITS_ENTRY, name)
        entry = int(first.stdout.readline())
        fifo = f"fifo.shmpool.{name}.{entry}"
        wait_for(lambda: pool.stats().nr_waiters == 1 and fifos(pool) == [fifo], what="the first waiter to sleep")
        left = os.stat(os.path.join("/dev/shm", fifo)).st_ino
        first.kill()
        first.wait(10)
        assert fifos(pool) == [fifo]  # a killed process removes nothing
        second = popen(WAITER_IN_ITS_ENTRY, name)
        assert int(second.stdout.readline()) == entry  # the dead one's: the only entry left
        wait_for(lambda: os.stat(os.path.join("/dev/shm", fifo)).st_ino != left and pool.stats().nr_waiters == 1,
                 what="the second waiter asleep on a FIFO of its own")
        assert fifos(pool) == [fifo]
        pool.free(held[0])  # its byte goes into the new FIFO: the only way to wake the waiter
        assert int(second.stdout.readline()) >= 0, second.stderr.read()
        wait_for(lambda: pool.stats().nr_waiters == 1, what="the second waiter to sleep again")
        second.kill()
        second.wait(10)
        assert pool.reclaim_dead() == 1  # what it got; its sleeper counted out
        assert pool.stats().nr_waiters == 0
        pool.free(held[1])
    assert fifos(pool) == []


def test_the_fifo_goes_with_the_process_entry_and_with_the_pool(name: str) -> None:
    pool = Mempool.create(name, min_nr=1, slot_size=16, capacity=1)
    h = pool.alloc()
    with pytest.raises(TimeoutError):
        run(pool.alloc_async(timeout=0.01))
    assert len(fifos(pool)) == 1
    pool.free(h)
    pool.close()  # the process lets go of its entry: the FIFO goes
    assert fifos(pool) == []
    other = Mempool.attach(name)
    h = other.alloc()
    with pytest.raises(TimeoutError):
        run(other.alloc_async(timeout=0.01))
    assert len(fifos(other)) == 1
    other.free(h)
    other.destroy()
    assert fifos(other) == []


# ---------------------------------------------------------------- get_async and put_async


def test_queue_twins_without_waiting(pool: Mempool, no_threads: None) -> None:
    q = pool.queue("q")

    async def main() -> None:
        h = pool.alloc()
        await q.put_async(h)
        assert await q.get_async() == h
        with pytest.raises(queue.Empty):
            await q.get_async(timeout=0)
        await q.put_async(h)
        other = pool.alloc()
        with pytest.raises(queue.Full):
            await q.put_async(other, timeout=0)
        assert await q.get_async(timeout=0) == h
        pool.free_bulk([h, other])

    run(main())
    assert pool.stats().in_use == 0


def test_queue_twins_check_their_arguments(pool: Mempool) -> None:
    q = pool.queue("q")

    async def main() -> None:
        h = pool.alloc()
        with pytest.raises(ValueError):
            await q.get_async(timeout=-1)
        with pytest.raises(TypeError):
            await q.put_async("h")  # type: ignore[arg-type]
        pool.free(h)
        with pytest.raises(InvalidHandleError):
            await q.put_async(h)  # freed: not ours any more
        q.close()
        with pytest.raises(PoolClosedError):
            await q.get_async()

    run(main())


def test_get_async_is_woken_by_a_put_in_another_process(pool: Mempool, helper: Helper) -> None:
    q = pool.queue("q")

    async def main() -> int:
        task = asyncio.create_task(q.get_async())
        await until(lambda: getters(pool) == 1, "get_async to sleep")
        helper.tell("put 42")
        return await task

    h = run(main())
    assert int(helper.answer()) == h
    assert pool.ndarray(h, np.int64, 1)[0] == 42
    pool.free(h)  # ours now
    s = pool.stats()
    assert (s.in_use, s.queued) == (0, 0)


def test_put_async_is_woken_by_a_get_in_another_process(pool: Mempool, helper: Helper) -> None:
    q = pool.queue("q")
    first, second = pool.alloc(), pool.alloc()
    q.put(first)  # full

    async def main() -> None:
        task = asyncio.create_task(q.put_async(second))
        await until(lambda: putters(pool) == 1, "put_async to sleep")
        helper.tell("get")
        await task

    run(main())
    assert int(helper.answer()) == first
    assert q.get_nowait() == second
    pool.free(second)


def test_queue_twins_time_out_moving_nothing(pool: Mempool) -> None:
    q = pool.queue("q")

    async def main() -> None:
        with pytest.raises(queue.Empty):
            await q.get_async(timeout=0.1)
        a, b = pool.alloc(), pool.alloc()
        await q.put_async(a)
        with pytest.raises(queue.Full):
            await q.put_async(b, timeout=0.1)
        pool.free(b)  # still ours
        assert await q.get_async() == a
        pool.free(a)

    run(main())
    s = pool.stats()
    assert (s.in_use, s.queued) == (0, 0)


def test_cancelled_get_async_loses_nothing(pool: Mempool, helper: Helper, monkeypatch: pytest.MonkeyPatch) -> None:
    """Cancelled while its thread sleeps; a put comes after: the thread
    takes the element and puts it back (the slice made long so that it is
    surely still asleep then)."""
    monkeypatch.setattr(_aio, "QUEUE_SLICE_SECONDS", 30.0)
    threads_asleep_before_any_timer(monkeypatch, lambda: getters(pool) == 1)
    q = pool.queue("q")

    async def main() -> None:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(q.get_async(), 0.05)
        assert getters(pool) == 1  # its thread, still asleep
        helper.tell("put 7")
        await until(lambda: getters(pool) == 0, "the thread to wake")
        await until(lambda: q.qsize() == 1, "the element back in the queue")

    run(main())
    h = int(helper.answer())
    assert q.get_nowait() == h and pool.ndarray(h, np.int64, 1)[0] == 7
    pool.free(h)
    s = pool.stats()
    assert (s.in_use, s.queued) == (0, 0)


def test_get_async_cancelled_after_its_thread_got_the_element(pool: Mempool, helper: Helper) -> None:
    """The thread has handed the element over, the task is cancelled before
    it runs again: the coroutine puts the element back into the queue."""
    q = pool.queue("q")

    async def main() -> None:
        handed = spy_handover(asyncio.get_running_loop())
        task = asyncio.create_task(q.get_async())
        await until(lambda: getters(pool) == 1, "get_async to sleep")
        helper.tell("put 9")
        assert handed.wait(10)  # blocks the loop on purpose
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert q.qsize() == 1

    run(main())
    h = int(helper.answer())
    assert q.get_nowait() == h
    pool.free(h)


def test_cancelled_put_async_leaves_the_element_with_the_caller(pool: Mempool) -> None:
    q = pool.queue("q")
    first, second = pool.alloc(), pool.alloc()
    q.put(first)

    async def main() -> None:
        task = asyncio.create_task(q.put_async(second))
        await until(lambda: putters(pool) == 1, "put_async to sleep")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert putters(pool) == 0  # its thread has stopped: nothing will move later

    run(main())
    assert q.qsize() == 1 and q.get_nowait() == first
    pool.free_bulk([first, second])  # second is still ours


def test_put_async_that_happened_as_it_was_cancelled_says_so(pool: Mempool, helper: Helper) -> None:
    """The put was made by the thread, the task is cancelled before it runs
    again: a put cannot be undone, so put_async returns normally."""
    q = pool.queue("q")
    first, second = pool.alloc(), pool.alloc()
    q.put(first)

    async def main() -> None:
        handed = spy_handover(asyncio.get_running_loop())
        task = asyncio.create_task(q.put_async(second))
        await until(lambda: putters(pool) == 1, "put_async to sleep")
        helper.tell("get")
        assert handed.wait(10)  # blocks the loop on purpose
        task.cancel()
        await task  # no CancelledError: the element is the queue's

    run(main())
    assert int(helper.answer()) == first
    assert q.get_nowait() == second
    pool.free(second)


# ---------------------------------------------------------------- threads


def _wait_in_a_forked_child(name: str, done: Any) -> None:
    async def main() -> None:
        with Mempool.attach(name) as pool:
            try:
                await pool.alloc_async(timeout=0.1)
            except TimeoutError:
                done.put("timed out")

    asyncio.run(main())


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")  # the fork is the test
def test_a_forked_child_does_not_use_the_parents_threads(pool: Mempool, via_threads: None) -> None:
    held = [pool.alloc(), pool.alloc()]
    with pytest.raises(TimeoutError):
        run(pool.alloc_async(timeout=0.1))  # waited in a thread, which is idle again once it answered
    assert "shmpool waits" in [t.name for t in threading.enumerate()]
    ctx = mp.get_context("fork")
    done = ctx.Queue()
    child = ctx.Process(target=_wait_in_a_forked_child, args=(pool.name, done))
    child.start()
    try:
        assert done.get(timeout=20) == "timed out"
    finally:
        child.join(20)
        if child.is_alive():
            child.kill()
    assert child.exitcode == 0
    pool.free_bulk(held)


def test_alloc_async_whose_loop_is_closed_while_it_waits_counts_itself_out_when_collected(pool: Mempool) -> None:
    import gc

    held = [pool.alloc(), pool.alloc()]
    task = left_pending_by_a_closed_loop(pool)
    assert pool.stats().nr_waiters == 1  # the coroutine is still pending, its sleeper counted
    del task
    gc.collect()  # closes the coroutine: its finally counts it out
    s = pool.stats()
    assert (s.nr_waiters, s.in_use) == (0, 2)
    pool.free_bulk(held)
