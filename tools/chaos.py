#!/usr/bin/env python3
"""chaos: kill workers at random while they hammer one pool.

Several worker processes allocate and free as fast as they can (fail_rate
0.3; GFP_KERNEL with a timeout while holding nothing, GFP_ATOMIC while
holding some), stamping every element they hold and checking the stamp
before freeing it. Each worker tells the tool through a pipe once it has
attached and completed an operation (an allocation or a free); only such
running workers are killed. Once every worker runs, the tool waits a few
tens of milliseconds, SIGKILLs a random worker (wherever it is: inside a
critical section, asleep, holding elements), reclaims the dead worker's
elements as a supervisor would, starts a replacement and waits for it to
run before the next kill, so that the workers do real work however loaded
the machine is. At the end it stops the workers, reclaims once more, audits
the pool and prints one line:

    chaos: 5.0 s, kills 140, operations 91234, reclaimed 260, lock recoveries 12: OK

Exit 0 for OK, 1 with the first failure. A run in which no operation
completed, or no kill hit a running worker, tested nothing: FAILED too, as
is a worker that does not complete an operation within --ready-timeout
seconds of its start (a wedged pool). Workers report through lock-free
shared counters, their pipe and one file per failure (a killed process must
not be able to wedge the tool, as it would if it died holding a
multiprocessing lock). The run takes about --seconds, plus the workers'
start, and at most --ready-timeout (and 30 s to stop) more.

    python tools/chaos.py --seconds 600      # a long run
    python tools/chaos.py --busy 2           # beside two busy loops: a loaded machine

A damaged pool found by the tool's own calls (reclaim_dead, stats, the
audit) is a failure like any other: one line, FAILED and the error.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import signal
import sys
import tempfile
import threading
import time
from multiprocessing.connection import wait
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np

from shmpool import GFP_ATOMIC, GFP_KERNEL, Mempool
from shmpool.testing import audit


def _die_with_tool(lifeline: Any) -> None:
    """End this process when the tool ends, however it ends: the tool holds
    the only write end of ``lifeline``, so EOF means it is gone."""

    def watch() -> None:
        try:
            lifeline.recv_bytes()
        except EOFError:
            pass
        os._exit(3)

    threading.Thread(target=watch, daemon=True).start()


def worker(name: str, slot: int, ops: Any, stop: Any, ready: Any, lifeline: Any, faildir: str, seed: int) -> None:
    """Allocate and free until ``stop``; write to ``ready`` (a pipe) once
    attached and one operation (a successful alloc or free) completed."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_tool(lifeline)
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
                    if h is None:
                        continue
                    serial += 1
                    pool.ndarray(h, np.int64, 2)[:] = (pid, serial)
                    held.append((h, serial))
                ops[slot] += 1
                if ready is not None:
                    ready.send_bytes(b"running")
                    ready.close()
                    ready = None
            for h, s in held:
                check_and_free(pool, h, s)
    except Exception as exc:
        fail(f"worker {pid}: {type(exc).__name__}: {exc}")


def busy(stop: Any, lifeline: Any) -> None:
    """A busy loop (--busy): a core taken from the workers, as a loaded
    machine's other work would, so that they are descheduled in the middle
    of their steps."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_tool(lifeline)
    while not stop.value:
        pass


def verdict(kills: int, operations: int, failure: str) -> str:
    """'' for a run that passed, else why it failed: a failure seen, or a
    run that tested nothing (no operation, or no kill of a running worker)."""
    if failure:
        return failure
    if operations == 0:
        return "no operation completed"
    if kills == 0:
        return "no kill hit a running worker"
    return ""


class Workers:
    """The worker processes, one per slot, and which of them run."""

    def __init__(self, ctx: Any, args: argparse.Namespace, rng: random.Random, ops: Any, stop: Any, faildir: str) -> None:
        self.ctx, self.args, self.rng, self.ops, self.stop, self.faildir = ctx, args, rng, ops, stop, faildir
        self.procs: list[Any] = [None] * args.workers
        self.pipes: list[Any] = [None] * args.workers  # read end while not yet running
        self.since = [0.0] * args.workers
        self.ops_at_start = [0] * args.workers
        self.lifeline, self._lifeline_w = ctx.Pipe(duplex=False)  # the write end never leaves this process

    def start(self, slot: int) -> None:
        r, w = self.ctx.Pipe(duplex=False)
        p = self.ctx.Process(
            target=worker,
            args=(self.args.name, slot, self.ops, self.stop, w, self.lifeline, self.faildir, self.rng.getrandbits(32)),
        )
        p.start()
        w.close()  # the worker has its copy: EOF on r if it dies before writing
        self.procs[slot], self.pipes[slot], self.since[slot] = p, r, time.monotonic()
        self.ops_at_start[slot] = self.ops[slot]

    def running(self) -> list[int]:
        return [i for i, r in enumerate(self.pipes) if r is None]

    def await_running(self) -> str:
        """Wait until every worker runs; '' or why one never will."""
        while True:
            waiting = {r: i for i, r in enumerate(self.pipes) if r is not None}
            if not waiting:
                return ""
            limit = min(self.since[i] for i in waiting.values()) + self.args.ready_timeout
            for r in wait(list(waiting), max(0.0, limit - time.monotonic())):
                slot = waiting[r]
                try:
                    r.recv_bytes()
                except EOFError:
                    self.procs[slot].join()
                    return f"worker {self.procs[slot].pid} ended (exit code {self.procs[slot].exitcode}) before completing an operation"
                finally:
                    r.close()
                self.pipes[slot] = None
            if time.monotonic() >= limit and any(r is not None for r in self.pipes):
                slot = next(i for i, r in enumerate(self.pipes) if r is not None)
                return f"worker {self.procs[slot].pid} completed no operation within {self.args.ready_timeout:g} s of its start"

    def kill(self, slot: int) -> bool:
        """SIGKILL the worker in ``slot`` and reap it; whether the kill hit a
        running worker (not one that had ended already, nor one that had
        completed no operation)."""
        p = self.procs[slot]
        p.kill()
        p.join()
        return p.exitcode == -signal.SIGKILL and self.ops[slot] > self.ops_at_start[slot]

    def stop_all(self) -> str:
        """Ask every worker to stop and reap it; '' or the first that would not."""
        self.stop.value = 1
        failure = ""
        for p in self.procs:
            if p is None:
                continue
            p.join(30)
            if p.is_alive():
                p.kill()
                p.join()
                failure = failure or f"worker {p.pid} did not stop within 30 s"
        return failure

    def close(self) -> None:
        for p, r in zip(self.procs, self.pipes, strict=True):
            if p is not None and p.is_alive():
                p.kill()
                p.join()
            if r is not None:
                r.close()
        self.lifeline.close()
        self._lifeline_w.close()


def _stop_helpers() -> None:
    """Stop and reap multiprocessing's fork server and resource tracker (else
    they end only after this process, reaped by whoever inherits them)."""
    from multiprocessing import forkserver, resource_tracker

    for helper in (getattr(forkserver, "_forkserver", None), getattr(resource_tracker, "_resource_tracker", None)):
        stop = getattr(helper, "_stop", None)
        if stop is not None:
            stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--capacity", type=int, default=32)
    parser.add_argument("--min-nr", type=int, default=4)
    parser.add_argument("--fail-rate", type=float, default=0.3)
    parser.add_argument("--kill-ms", type=float, nargs=2, default=(20.0, 60.0), metavar=("MIN", "MAX"),
                        help="pause between the moment every worker runs and the next kill, "
                        "drawn from [MIN, MAX] ms (default: 20 60)")
    parser.add_argument("--ready-timeout", type=float, default=30.0,
                        help="seconds a new worker has to complete its first operation (default: 30)")
    parser.add_argument("--min-kills", type=int, default=0,
                        help="go on past --seconds until this many kills hit running workers (a loaded machine "
                             "is slow to start replacements); at most 20 times --seconds more")
    parser.add_argument("--busy", type=int, default=0,
                        help="busy loops to run beside the workers (a loaded machine: try one per core)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--name", default=f"chaos-{os.getpid()}")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if args.busy < 0:
        parser.error("--busy must be 0 or more")

    rng = random.Random(args.seed)
    # Workers fork from a server that imported numpy and shmpool already (a
    # few ms instead of a fresh interpreter's few hundred) and has no pool
    # open, unlike this process.
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["numpy", "shmpool.pool", "shmpool.testing"])
    ops = ctx.RawArray("q", args.workers)
    stop = ctx.RawValue("b", 0)
    pool = Mempool.create(args.name, min_nr=args.min_nr, slot_size=16, capacity=args.capacity,
                          fail_rate=args.fail_rate, seed=args.seed)
    kills = reclaimed = recoveries = 0
    failure = ""
    elapsed = 0.0
    with tempfile.TemporaryDirectory(prefix="shmpool-chaos-") as faildir:
        workers = Workers(ctx, args, rng, ops, stop, faildir)
        loops = [ctx.Process(target=busy, args=(stop, workers.lifeline), daemon=True) for _ in range(args.busy)]
        try:
            for p in loops:
                p.start()
            for i in range(args.workers):
                workers.start(i)
            failure = workers.await_running()
            began = time.monotonic()
            deadline = began + args.seconds
            hard_deadline = deadline + 20 * max(args.seconds, 1.0)
            while (
                not failure
                and (time.monotonic() < deadline or kills < args.min_kills)
                and time.monotonic() < hard_deadline
                and not os.listdir(faildir)
            ):
                time.sleep(rng.uniform(*args.kill_ms) / 1000)  # the pace of the chaos, not a synchronisation
                victim = rng.choice(workers.running())
                kills += workers.kill(victim)
                reclaimed += pool.reclaim_dead()
                workers.start(victim)
                failure = workers.await_running()
            elapsed = time.monotonic() - began
            stopped = workers.stop_all()
            failure = failure or stopped
            reclaimed += pool.reclaim_dead()
            findings = audit(pool)
            s = pool.stats()
            recoveries = s.lock_recoveries
            failures = sorted(os.listdir(faildir))
            if failures:
                with open(os.path.join(faildir, failures[0])) as f:
                    failure = f.read()  # the cause of whatever else went wrong
            failure = failure or (findings[0] if findings else "")
            if not failure and (s.in_use or s.nr_waiters or s.curr_nr != s.min_nr):
                failure = f"pool not whole: in_use {s.in_use}, nr_waiters {s.nr_waiters}, reserve {s.curr_nr}/{s.min_nr}"
        except Exception as exc:  # the tool's own calls (reclaim_dead, stats, audit): damage found, say it
            failure = f"{type(exc).__name__}: {exc}"
        finally:
            stop.value = 1
            for p in loops:
                p.join(10)
                if p.is_alive():
                    p.kill()
                    p.join()
            workers.close()
            pool.destroy(force=True)
            _stop_helpers()
    failure = verdict(kills, sum(ops), failure)
    print(
        f"chaos: {elapsed:.1f} s, kills {kills}, operations {sum(ops)}, reclaimed {reclaimed}, "
        f"lock recoveries {recoveries}: {'OK' if not failure else 'FAILED: ' + failure}"
    )
    return 1 if failure else 0


if __name__ == "__main__":
    sys.exit(main())
