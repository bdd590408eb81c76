"""Functions run in spawned child processes (importable by name)."""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np

import shmpool.pool
from shmpool import GFP_ATOMIC, GFP_KERNEL, Mempool, ShmpoolError


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
    shmpool.pool.SLEEP_RETRY_SECONDS = 600.0
    with Mempool.attach(name) as pool:
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
