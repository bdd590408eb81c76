"""Functions run in spawned child processes (importable by name)."""

from __future__ import annotations

import gc
import os
import random
import signal
import threading
import time
from typing import Any

import numpy as np

from shmpool import GFP_ATOMIC, GFP_KERNEL, Mempool, ShmpoolError
from shmpool.testing import sleep_retry


def read_and_reply(name: str, handle: int, queue: Any) -> None:
    with Mempool.attach(name) as pool:
        arr = pool.ndarray(handle, np.int64, 4)
        seen = arr.tolist()
        arr[:] = [x * 2 for x in seen]
        del arr
        queue.put(seen)


def sleeping_alloc(name: str, queue: Any, gfp: int = GFP_KERNEL) -> None:
    """Allocate once and report the result. The 5 s retry is pushed out of
    reach, so only a wake-up (or the pool's destruction) can end the sleep."""
    sleep_retry(alloc=600.0)
    with Mempool.attach(name) as pool:
        pool.long_sleep = None  # (its report would end the sleep after 5 s too)
        try:
            queue.put(("ok", pool.alloc(gfp)))
        except ShmpoolError as exc:
            queue.put(("error", type(exc).__name__))


def producer(name: str, n: int, queue: Any) -> None:
    with Mempool.attach(name) as pool:
        for i in range(n):
            h = pool.alloc(GFP_KERNEL, timeout=30)
            pool.ndarray(h, np.int64, 2)[:] = (os.getpid(), i)
            queue.put(h)
        queue.put(None)


def consumer(name: str, queue: Any, results: Any) -> None:
    seen = []
    with Mempool.attach(name) as pool:
        while (h := queue.get()) is not None:
            seen.append(tuple(pool.ndarray(h, np.int64, 2).tolist()))
            pool.free(h)
    results.put(seen)


def hammer(name: str, iterations: int, seed: int, results: Any) -> None:
    """Allocate (GFP_KERNEL with a timeout while holding nothing, GFP_ATOMIC
    while holding some), stamp each element with (pid, serial), check the
    stamp before freeing. Reports (ops, bad stamps, errors)."""
    rng = random.Random(seed)
    pid = os.getpid()
    held: list[tuple[int, int]] = []
    ops = bad = 0
    errors: list[str] = []
    try:
        with Mempool.attach(name) as pool:
            for serial in range(iterations):
                if held and (len(held) >= 3 or rng.random() < 0.5):
                    h, stamp = held.pop(rng.randrange(len(held)))
                    if tuple(pool.ndarray(h, np.int64, 2)) != (pid, stamp):
                        bad += 1
                    pool.free(h)
                else:
                    h = pool.alloc(GFP_ATOMIC) if held else pool.alloc(GFP_KERNEL, timeout=20)
                    if h is None:
                        continue
                    pool.ndarray(h, np.int64, 2)[:] = (pid, serial)
                    held.append((h, serial))
                ops += 1
            for h, stamp in held:
                if tuple(pool.ndarray(h, np.int64, 2)) != (pid, stamp):
                    bad += 1
                pool.free(h)
    except Exception as exc:  # reported to the parent, which fails the test
        errors.append(repr(exc))
    results.put((ops, bad, errors))


def free_at_once(name: str, handle: int, barrier: Any, results: Any) -> None:
    """Wait for every racer, then free the same handle; report the outcome."""
    with Mempool.attach(name) as pool:
        barrier.wait(timeout=30)
        try:
            pool.free(handle)
            results.put("freed")
        except ValueError as exc:
            results.put(type(exc).__name__)


def bulk_sleeper(name: str, n: int, results: Any) -> None:
    """alloc_bulk(n, GFP_KERNEL); report the number of handles, hold them
    briefly (checking they are ours), free them."""
    with Mempool.attach(name) as pool:
        hs = pool.alloc_bulk(n, GFP_KERNEL, timeout=30)
        for h in hs.tolist():
            pool.ndarray(h, np.int64, 1)[0] = os.getpid()
        ok = all(pool.ndarray(h, np.int64, 1)[0] == os.getpid() for h in hs.tolist())
        pool.free_bulk(hs)
        results.put((len(hs), ok))


# ----------------------------------------------------------------------
# Adversaries: stops, interrupts, collections and GIL hogs in the middle of
# the pool's calls


def reserve_hammer(name: str, progress: Any, stop: Any, results: Any) -> None:
    """Until ``stop.value`` is set: allocate two elements (GFP_KERNEL with a
    timeout; with fail_rate=1.0 each comes from the reserve), stamp each
    (pid, serial), check both stamps, free both; count the rounds in
    ``progress.value`` (a lock-free shared int, so that a SIGSTOP can land
    anywhere without wedging the parent). Reports (rounds, bad stamps,
    errors)."""
    pid = os.getpid()
    bad = 0
    serial = 0
    errors: list[str] = []
    try:
        with Mempool.attach(name) as pool:
            while not stop.value:
                held = []
                for _ in range(2):
                    h = pool.alloc(GFP_KERNEL, timeout=120)
                    serial += 1
                    pool.ndarray(h, np.int64, 2)[:] = (pid, serial)
                    held.append((h, serial))
                for h, stamp in held:
                    if tuple(pool.ndarray(h, np.int64, 2).tolist()) != (pid, stamp):
                        bad += 1
                    pool.free(h)
                progress.value += 1
    except Exception as exc:  # reported to the parent, which fails the test
        errors.append(repr(exc))
    results.put((progress.value, bad, errors))


def _under_interrupts(body: Any, nr_interrupts: int, interval: float) -> int:
    """Call ``body()`` again and again while an interval timer's SIGALRM
    handler raises KeyboardInterrupt (what Ctrl-C raises, not an Exception)
    every ``interval`` seconds, until ``nr_interrupts`` have been raised or
    body returns False. Stops the timer; returns how many were raised.

    The handler raises only inside ``body`` (armed just before it, and it
    disarms itself when it raises), so that an interrupt never escapes
    through this loop's own bytecode: on a loaded machine two can come
    close enough together for the second to land in the except clause
    that caught the first."""
    raised = [0]
    armed = [False]

    def handler(signum: int, frame: Any) -> None:
        if armed[0]:
            armed[0] = False
            raised[0] += 1
            raise KeyboardInterrupt

    signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, interval, interval)
    going = True
    while going and raised[0] < nr_interrupts:
        try:
            armed[0] = True
            going = body() is not False
        except KeyboardInterrupt:
            pass
        finally:
            armed[0] = False
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, signal.SIG_IGN)
    return raised[0]


def _one_operation(pool: Mempool, rng: random.Random, held: list[int], limit: int = 48) -> None:
    """One random operation. A handle leaves ``held`` before it is freed, so
    an interrupt can leak an element (reclaim_dead takes it back once we
    are gone) but never make us free it twice."""
    r = rng.random()
    if len(held) < limit and r < 0.45:
        if r < 0.1:
            h = pool.alloc(GFP_ATOMIC)
            if h is not None:
                held.append(h)
        elif r < 0.2:
            held.append(pool.alloc(GFP_KERNEL, timeout=60))
        elif r < 0.3:
            hs = pool.alloc_bulk(rng.randint(1, 8), GFP_ATOMIC)
            if hs is not None:
                held.extend(hs.tolist())
        else:
            held.extend(pool.alloc_bulk(rng.randint(1, 8), GFP_KERNEL, timeout=60).tolist())
    elif held and r < 0.65:
        pool.free(held.pop())
    elif held and r < 0.85:
        k = rng.randint(1, len(held))
        batch = held[-k:]
        del held[-k:]
        pool.free_bulk(np.array(batch, dtype=np.int64))
    elif r < 0.95:
        pool.stats()
    else:
        pool.reclaim_dead()


def interrupted_worker(name: str, nr_interrupts: int, interval: float, seed: int, go: Any, results: Any) -> None:
    """Run random alloc/free/alloc_bulk/free_bulk/stats/reclaim_dead under
    raising interrupts (see _under_interrupts). Reports (interrupts,
    operations, errors), then waits for ``go`` (alive and idle, so that the
    parent can see whether it left the lock held), frees what it knows it
    holds and reports the errors of that."""
    rng = random.Random(seed)
    held: list[int] = []
    ops = [0]
    errors: list[str] = []
    with Mempool.attach(name) as pool:

        def body() -> bool:
            try:
                _one_operation(pool, rng, held)
                ops[0] += 1
            except Exception as exc:
                errors.append(repr(exc))
            return not errors

        fired = _under_interrupts(body, nr_interrupts, interval)
        results.put((fired, ops[0], errors))
        go.wait(600)  # the parent's checks come first
        late: list[str] = []
        try:
            if held:
                pool.free_bulk(np.array(held, dtype=np.int64))
        except Exception as exc:
            late.append(repr(exc))
        results.put(late)


def interrupted_sleeper(name: str, nr_interrupts: int, interval: float, commands: Any, results: Any) -> None:
    """On a pool that the parent has drained dry: sleeping allocations
    (alloc with and without timeout, alloc_bulk) with a 1 ms retry, under
    raising interrupts (see _under_interrupts); reports (interrupts,
    timeouts, errors).

    Then obeys ``commands``: "sleep" (alloc(GFP_KERNEL) until the parent's
    SIGUSR1 makes its handler raise; reports ("interrupted", k)), "alloc"
    (alloc with a timeout; reports ("got", handle)), None (free what it got,
    report ("done", errors) and return)."""
    tally = {"calls": 0, "timeouts": 0}
    errors: list[str] = []
    got: list[int] = []
    with Mempool.attach(name) as pool:
        sleep_retry(alloc=0.001)  # the top of the retry loop, often

        def body() -> bool:
            tally["calls"] += 1
            kind = tally["calls"] % 3
            try:
                if kind == 0:
                    out: Any = pool.alloc(GFP_KERNEL, timeout=0.01)
                elif kind == 1:
                    out = pool.alloc_bulk(2, GFP_KERNEL, timeout=0.01)
                else:
                    out = pool.alloc(GFP_KERNEL)  # only an interrupt ends it
                errors.append(f"a dry pool gave {out!r}")
            except TimeoutError:
                tally["timeouts"] += 1
            except Exception as exc:
                errors.append(repr(exc))
            return not errors

        fired = _under_interrupts(body, nr_interrupts, interval)
        results.put((fired, tally["timeouts"], errors))
        sleep_retry(alloc=600.0)  # from here on only a wake-up or a signal ends a sleep
        pool.long_sleep = None  # (nor the long-sleep report)

        def raise_interrupt(signum: int, frame: Any) -> None:
            raise KeyboardInterrupt

        signal.signal(signal.SIGUSR1, raise_interrupt)
        k = 0
        while (command := commands.get()) is not None:
            if command == "sleep":
                try:
                    out = pool.alloc(GFP_KERNEL)
                    got.append(out)
                    results.put(("not interrupted", out))
                except KeyboardInterrupt:
                    results.put(("interrupted", k))
                k += 1
            elif command == "alloc":
                h = pool.alloc(GFP_KERNEL, timeout=60)
                got.append(h)
                results.put(("got", h))
        try:
            for h in got:
                pool.free(h)
        except Exception as exc:
            errors.append(repr(exc))
        results.put(("done", errors))


class _FreesWhenCollected:
    """Holds an element and frees it (and allocates and frees one more) in
    __del__; it refers to itself, so only the cycle collector frees it."""

    def __init__(self, pool: Mempool, handle: int, tally: dict[str, Any]) -> None:
        self.pool = pool
        self.handle = handle
        self.tally = tally
        self.me = self

    def __del__(self) -> None:
        tally = self.tally
        try:
            self.pool.free(self.handle)
            tally["freed"] += 1
            h = self.pool.alloc(GFP_ATOMIC)
            if h is not None:
                self.pool.free(h)
        except Exception as exc:
            tally["errors"].append(repr(exc))


def collector_frees(name: str, seconds: float, seed: int, results: Any) -> None:
    """Loop: make objects in reference cycles whose __del__ frees an element
    (with the collector off), then arm the collector to run after a random
    few more allocations of Python objects, and call free_bulk, alloc_bulk,
    alloc/free, stats or reclaim_dead, so that the collection (and the
    __del__ calls) lands at every point of those calls in turn. Reports
    (rounds, elements given to such objects, freed by __del__, errors,
    in_use after a last collection)."""
    rng = random.Random(seed)
    tally: dict[str, Any] = {"freed": 0, "errors": []}
    made = rounds = 0
    old = gc.get_threshold()
    with Mempool.attach(name) as pool:
        operations = (
            lambda rest: pool.free_bulk(rest),
            lambda rest: (pool.free_bulk(pool.alloc_bulk(3, GFP_KERNEL, timeout=30)), pool.free_bulk(rest)),
            lambda rest: (pool.free(pool.alloc(GFP_KERNEL, timeout=30)), pool.free_bulk(rest)),
            lambda rest: (pool.stats(), pool.reclaim_dead(), pool.free_bulk(rest)),
        )
        try:
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline and not tally["errors"]:
                hs = pool.alloc_bulk(8, GFP_KERNEL, timeout=30)
                gc.collect(0)
                gc.disable()
                for h in hs[:4].tolist():
                    _FreesWhenCollected(pool, h, tally)  # garbage at once
                    made += 1
                gc.set_threshold(gc.get_count()[0] + rng.randint(0, 30), 1, 1)
                gc.enable()
                operations[rounds % len(operations)](hs[4:])
                rounds += 1
        except Exception as exc:
            tally["errors"].append(repr(exc))
        finally:
            gc.set_threshold(*old)
            gc.enable()
        gc.collect()
        in_use = pool.stats().in_use
    results.put((rounds, made, tally["freed"], tally["errors"], in_use))


def gil_hog(name: str, seconds: float, results: Any) -> None:
    """One thread calls stats() (which takes the pool lock) in a loop while
    the main thread hogs the GIL with long C calls (sorting a big list), so
    that the stats thread may be descheduled while it holds the lock.
    Reports (stats calls, sorts, errors)."""
    calls = [0]
    errors: list[str] = []
    stop = threading.Event()
    with Mempool.attach(name) as pool:

        def poll() -> None:
            try:
                while not stop.is_set():
                    pool.stats()
                    calls[0] += 1
            except Exception as exc:
                errors.append(repr(exc))

        t = threading.Thread(target=poll)
        t.start()
        big = random.Random(0).sample(range(1 << 40), 1_000_000)
        sorts = 0
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            sorted(big)  # about half a second of C that never lets the GIL go
            sorts += 1
        stop.set()
        t.join(60)
    results.put((calls[0], sorts, errors))


def receive_array(channel: Any, back: Any, go: Any) -> None:
    """Get a pool-backed array through a multiprocessing channel, say what
    arrived, write into it, and drop it when told."""
    import shmpool

    a = channel.get(timeout=60)
    back.put((a.dtype.str, a.shape, a.tolist(), shmpool.handle_of(a)))
    a[0] = 42
    back.put("written")
    if not go.wait(60):
        raise TimeoutError("never told to drop it")
    del a
    gc.collect()
    back.put("dropped")


def scale_in_place(a: Any, by: int = 2) -> Any:
    """A task that writes into the array it was given and returns it (both
    ways by reference)."""
    a *= by
    return a


def queue_taker(name: str, queue: str, n: int, can_start: Any, can_continue: Any, out: Any) -> None:
    """CPython's _TestQueue._test_put: once told, take n elements and free them."""
    with Mempool.attach(name) as pool:
        q = pool.queue(queue)
        if not can_start.wait(60):
            raise TimeoutError("never told to start")
        taken = [q.get(timeout=60) for _ in range(n)]
        out.put(taken)
        pool.free_bulk(taken)
        can_continue.set()


def queue_giver(name: str, queue: str, n: int, can_start: Any, can_continue: Any, out: Any) -> None:
    """CPython's _TestQueue._test_get (and _test_fork): put n new elements,
    saying which."""
    with Mempool.attach(name) as pool:
        q = pool.queue(queue)
        if can_start is not None and not can_start.wait(60):
            raise TimeoutError("never told to start")
        given = [pool.alloc() for _ in range(n)]
        for h in given:
            q.put(h)
        out.put(given)
        if can_continue is not None:
            can_continue.set()


def topic_publisher(name: str, topic: str, n: int, go: Any, results: Any) -> None:
    """Publish n elements stamped (pid, serial); report how many."""
    with Mempool.attach(name) as pool:
        t = pool.topic(topic)
        if not go.wait(60):
            raise TimeoutError("never told to start")
        for i in range(n):
            h = pool.alloc(GFP_KERNEL, timeout=60)
            pool.ndarray(h, np.int64, 2)[:] = (os.getpid(), i)
            t.publish(h, timeout=60)
        results.put(("published", os.getpid(), n))


def topic_subscriber(name: str, topic: str, expect: int, ready: Any, results: Any) -> None:
    """Subscribe, then take ``expect`` elements (releasing each, or keeping
    every third for a while), checking that each publisher's serials arrive
    in order, each once; report what it saw per publisher."""
    with Mempool.attach(name) as pool:
        s = pool.topic(topic).subscribe()
        ready.put(os.getpid())
        last: dict[int, int] = {}
        kept: list[int] = []
        for k in range(expect):
            h = s.get(timeout=60)
            pid, i = pool.ndarray(h, np.int64, 2).tolist()
            if i != last.get(pid, -1) + 1:
                results.put(("error", os.getpid(), f"from {pid}: {i} after {last.get(pid, -1)}"))
                return
            last[pid] = i
            kept.append(h)
            if k % 3 != 2:
                s.release(kept.pop())
            elif len(kept) > 4:
                s.release(kept.pop(0))
        for h in kept:
            s.release(h)
        s.close()
        results.put(("seen", os.getpid(), {pid: i + 1 for pid, i in last.items()}))


def hold_then_leave(name: str, n: int, ready: Any, go: Any, results: Any) -> None:
    """Attach, hold n elements (and a subscription), say ready, and at go
    leave the pool: report whether this process destroyed it."""
    pool = Mempool.attach(name)
    held = [pool.alloc(GFP_ATOMIC) for _ in range(n)]
    sub = pool.topic("leavers", 4).subscribe()
    assert None not in held and not sub.closed
    ready.put(os.getpid())
    go.wait(30)
    results.put(pool.leave())
