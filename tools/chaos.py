#!/usr/bin/env python3
"""chaos: kill workers at random while they hammer one pool.

Several worker processes allocate and free as fast as they can (fail_rate
0.3; GFP_KERNEL with a timeout while holding nothing, GFP_ATOMIC while
holding some), stamping every element they hold and checking the stamp
before freeing it. Every few tens of milliseconds the tool SIGKILLs a random
worker (wherever it is: inside a critical section, asleep, holding
elements), reclaims the dead worker's elements as a supervisor would, and
starts a replacement. At the end it stops the workers, reclaims once more,
audits the pool and prints one line:

    chaos: 5.0 s, kills 140, operations 91234, reclaimed 260, lock recoveries 12: OK

Exit 0 for OK, 1 with the first failure. Workers report through lock-free
shared counters and one file per failure (a killed process must not be able
to wedge the tool, as it would if it died holding a multiprocessing lock).

    python tools/chaos.py --seconds 600      # a long run
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import signal
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np

from shmpool import GFP_ATOMIC, GFP_KERNEL, Mempool
from shmpool._debug import audit


def worker(name: str, slot: int, ops: Any, stop: Any, faildir: str, seed: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    rng = random.Random(seed)
    pid = os.getpid()
    held: list[tuple[int, int]] = []

    def fail(text: str) -> None:
        with open(os.path.join(faildir, f"{pid}-{len(os.listdir(faildir))}"), "w") as f:
            f.write(text)

    def check_and_free(pool: Mempool, h: int, serial: int) -> None:
        stamp = tuple(pool.ndarray(h, np.int64, 2).tolist())
        if stamp != (pid, serial):
            fail(f"worker {pid}: slot {h & 0xFFFFFF} should carry ({pid}, {serial}) but has {stamp}")
        pool.free(h)

    try:
        with Mempool.attach(name) as pool:
            serial = 0
            while not stop.value:
                if held and (len(held) >= 4 or rng.random() < 0.5):
                    check_and_free(pool, *held.pop(rng.randrange(len(held))))
                else:
                    try:
                        h = pool.alloc(GFP_ATOMIC) if held else pool.alloc(GFP_KERNEL, timeout=1.0)
                    except TimeoutError:
                        h = None
                    if h is not None:
                        serial += 1
                        pool.ndarray(h, np.int64, 2)[:] = (pid, serial)
                        held.append((h, serial))
                ops[slot] += 1
            for h, s in held:
                check_and_free(pool, h, s)
    except Exception as exc:
        fail(f"worker {pid}: {type(exc).__name__}: {exc}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--capacity", type=int, default=32)
    parser.add_argument("--min-nr", type=int, default=4)
    parser.add_argument("--fail-rate", type=float, default=0.3)
    parser.add_argument("--kill-ms", type=float, nargs=2, default=(20.0, 60.0), metavar=("MIN", "MAX"),
                        help="pause between kills, drawn from [MIN, MAX] ms (default: 20 60)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--name", default=f"chaos-{os.getpid()}")
    args = parser.parse_args(argv)

    rng = random.Random(args.seed)
    ctx = mp.get_context("spawn")
    pool = Mempool.create(args.name, min_nr=args.min_nr, slot_size=16, capacity=args.capacity,
                          fail_rate=args.fail_rate, seed=args.seed)
    ops = ctx.RawArray("q", args.workers)
    stop = ctx.RawValue("b", 0)
    kills = reclaimed = 0
    failure = ""
    with tempfile.TemporaryDirectory(prefix="shmpool-chaos-") as faildir:
        procs: list[Any] = []
        try:
            def start(slot: int) -> Any:
                p = ctx.Process(target=worker, args=(args.name, slot, ops, stop, faildir, rng.getrandbits(32)))
                p.start()
                return p

            procs = [start(i) for i in range(args.workers)]
            deadline = time.monotonic() + args.seconds
            while time.monotonic() < deadline and not os.listdir(faildir):
                time.sleep(rng.uniform(*args.kill_ms) / 1000)  # the pace of the chaos, not a synchronisation
                victim = rng.randrange(args.workers)
                procs[victim].kill()
                procs[victim].join()
                kills += 1
                reclaimed += pool.reclaim_dead()
                procs[victim] = start(victim)
            stop.value = 1
            for p in procs:
                p.join(30)
                if p.is_alive():
                    p.kill()
                    p.join()
                    failure = failure or f"worker {p.pid} did not stop within 30 s"
            reclaimed += pool.reclaim_dead()
            with pool._core[1]:  # type: ignore[index]
                findings = audit(pool._core[0])  # type: ignore[index]
            s = pool.stats()
            failures = sorted(os.listdir(faildir))
            if failures:
                with open(os.path.join(faildir, failures[0])) as f:
                    failure = failure or f.read()
            failure = failure or (findings[0] if findings else "")
            if not failure and (s.in_use or s.nr_waiters or s.curr_nr != s.min_nr):
                failure = f"pool not whole: in_use {s.in_use}, nr_waiters {s.nr_waiters}, reserve {s.curr_nr}/{s.min_nr}"
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join()
            pool.destroy(force=True)
    print(
        f"chaos: {args.seconds:.1f} s, kills {kills}, operations {sum(ops)}, reclaimed {reclaimed}, "
        f"lock recoveries {s.lock_recoveries}: {'OK' if not failure else 'FAILED: ' + failure}"
    )
    return 1 if failure else 0


if __name__ == "__main__":
    sys.exit(main())
