"""shmpool-demo: the kernel's mempool guarantee, shown across processes.

Producers allocate with GFP_KERNEL from a pool whose arena fails 30% of the
time (seeded), fill each element with a payload and its CRC-32, and put it on
the pool's queue "work", which moves the element's ownership: while it is
queued it belongs to the queue, not to its producer (a producer that died
would lose nothing). Consumers, in other processes, get it (now they hold
it), check the CRC and free it. Each process prints a kernel-style trace of what the pool
did for it, and the closing summary shows with figures that no sleeping
allocation failed although the arena did, and that the pool is whole again.

If a run is interrupted hard (SIGKILL), ``make clean-shm`` (tools/cleanup.py)
removes what it left in /dev/shm.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import queue as stdqueue
import random
import signal
import sys
import time
import zlib
from typing import Any

from . import GFP_KERNEL, Mempool, _seedrun
from .testing import audit

_HEADER = 8  # bytes of CRC-32 + payload length at the start of each element


class _Quiet:
    """Tells the parent, once, that this process prints no more trace
    lines (its last one is flushed before): the start-up is over for it."""

    def __init__(self, quiet: Any) -> None:
        self._quiet, self._said = quiet, False

    def __call__(self) -> None:
        if not self._said:
            self._said = True
            self._quiet.put(os.getpid())


def _say(line: str) -> None:
    """Print ``line`` in one write (``print`` writes its end separately), so
    that lines from the processes sharing one pipe never interleave."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _tracer(tag: str, counts: dict[str, int], limit: int, done: _Quiet) -> Any:
    """A trace callback printing kernel-style lines (the first ``limit``;
    then ``done()``)."""
    prefix = f"[{tag} pid {os.getpid()}]"
    if limit <= 0:
        done()

    def trace(event: str, handle: int | None, curr_nr: int) -> None:
        counts[event] = counts.get(event, 0) + 1
        if sum(counts.values()) > limit:
            return
        slot = "" if handle is None else f" (slot {handle & 0xFFFFFF})"
        text = {
            "alloc-arena": "mempool_alloc: served by the arena",
            "alloc-reserve": f"mempool_alloc: arena allocation failed; served from the reserve with {curr_nr} remaining",
            "sleep": "mempool_alloc: arena allocation failed and the reserve is empty; sleeping until a free",
            "alloc-failed": "mempool_alloc: failed",
            "free-reserve": f"mempool_free: returned to the reserve with count {curr_nr}",
            "free-arena": "mempool_free: given back to the arena",
        }[event]
        _say(f"{prefix} {text}{slot}")
        if sum(counts.values()) == limit:
            done()

    return trace


#: The pool's queue that carries elements from producers to consumers.
QUEUE = "work"
#: How often a consumer with nothing to do looks whether the run is over.
IDLE_POLL_SECONDS = 0.05


def _producer(name: str, tag: str, n: int, hold: Any, results: Any, trace_limit: int, quiet: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us
    counts: dict[str, int] = {}
    rng = random.Random(os.getpid())
    done_tracing = _Quiet(quiet)
    with Mempool.attach(name) as pool:
        queue = pool.queue(QUEUE)
        pool.trace = _tracer(tag, counts, trace_limit, done_tracing)
        done = 0
        parent = os.getppid()
        while (done < n or hold.is_set()) and os.getppid() == parent:  # --hold: until cleared, or the demo dies
            handle = pool.alloc(GFP_KERNEL)  # sleeps, never fails
            if done == n:
                pool.trace = None  # --hold: go on quietly
                done_tracing()
            payload = rng.randbytes(rng.randint(1, pool.slot_size - _HEADER))
            buf = pool.buffer(handle)
            buf[:_HEADER] = zlib.crc32(payload).to_bytes(4, "little") + len(payload).to_bytes(4, "little")
            buf[_HEADER : _HEADER + len(payload)] = payload
            del buf
            queue.put(handle)  # the element is the queue's now
            done += 1
    results.put(("producer", counts))


def _consumer(
    name: str, tag: str, finished: Any, results: Any, trace_limit: int, work_s: float, quiet: Any
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    counts: dict[str, int] = {}
    checked = bad = 0
    done_tracing = _Quiet(quiet)
    with Mempool.attach(name) as pool:
        parent = os.getppid()  # a demo killed hard must not leave us running
        queue = pool.queue(QUEUE)
        pool.trace = _tracer(tag, counts, trace_limit, done_tracing)
        while True:
            try:
                handle = queue.get(timeout=IDLE_POLL_SECONDS)  # ours now
            except stdqueue.Empty:
                if (finished.is_set() and queue.empty()) or os.getppid() != parent:
                    break  # every producer is done and nothing is left
                continue
            buf = pool.buffer(handle)
            crc, size = int.from_bytes(buf[:4], "little"), int.from_bytes(buf[4:8], "little")
            ok = size <= pool.slot_size - _HEADER and zlib.crc32(buf[_HEADER : _HEADER + size]) == crc
            del buf
            checked += 1
            bad += not ok
            time.sleep(work_s)  # the "I/O" that keeps the element busy
            pool.free(handle)
            if checked == trace_limit:
                pool.trace = None
                done_tracing()
    results.put(("consumer", {"checked": checked, "bad": bad, **counts}))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shmpool-demo",
        description="Producers and consumers in separate processes share one pool whose arena fails on purpose.",
    )
    add = parser.add_argument
    add("--name", default="demo", help="pool name (default: %(default)s)")
    add("--min-nr", type=int, default=3, metavar="N",
        help="elements the pool keeps in reserve for when the arena fails (default: %(default)s)")
    add("--slot-size", type=int, default=64, metavar="BYTES",
        help=f"bytes per element, more than {_HEADER} (default: %(default)s)")
    add("--capacity", type=int, default=8, metavar="N", help="elements in the pool (default: %(default)s)")
    add("--fail-rate", type=float, default=0.3, metavar="P",
        help="probability that an arena allocation fails on purpose (default: %(default)s)")
    add("--seed", type=int, default=42, help="seed of the arena's failures (default: %(default)s)")
    add("--producers", type=int, default=3, metavar="N", help="producer processes (default: %(default)s)")
    add("--consumers", type=int, default=2, metavar="N", help="consumer processes (default: %(default)s)")
    add("--iterations", type=int, default=40, metavar="N", help="elements each producer sends (default: %(default)s)")
    add("--trace", type=int, default=12, metavar="LINES", help="trace lines printed per process (default: %(default)s)")
    add("--work-ms", type=float, default=1.0, metavar="MS",
        help="milliseconds a consumer keeps an element (default: %(default)s)")
    add("--hold", action="store_true",
        help="after the run, keep the traffic going until Ctrl-C, to inspect the pool (default: off)")
    add("--seed-run", action="store_true",
        help="instead: the seed's C simulation (min_nr 3, 64 B, rand() %% 100 < 30 after srand(SEED)) run on a real "
             "pool, printing its decisions in the program's words; then the same spread over --processes")
    add("--processes", type=int, default=3, metavar="N",
        help="processes of --seed-run's second run (default: %(default)s)")
    return parser


def _await_quiet(quiet: Any, procs: list[Any]) -> None:
    """Until every process has printed its last trace line (or died)."""
    waiting = {p.pid for p in procs}
    while waiting:
        try:
            waiting.discard(quiet.get(timeout=0.5))
        except stdqueue.Empty:
            waiting &= {p.pid for p in procs if p.is_alive()}


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.seed_run:
        if not 0 <= args.seed < 1 << 32 or args.processes < 1:
            parser.error("--seed-run takes a --seed from 0 to 2**32-1 (srand's unsigned int) and --processes >= 1")
        return _seedrun.main(args.name, args.seed, args.processes)
    if args.slot_size <= _HEADER:
        parser.error(f"--slot-size must be more than {_HEADER} (a CRC and a length head each element)")
    if args.producers < 1 or args.consumers < 1 or args.iterations < 0:
        parser.error("--producers and --consumers must be at least 1, --iterations at least 0")

    try:
        pool = Mempool.create(
            args.name,
            min_nr=args.min_nr,
            slot_size=args.slot_size,
            capacity=args.capacity,
            fail_rate=args.fail_rate,
            seed=args.seed,
            mode=0o600,
        )
    except FileExistsError as exc:  # create's message says whether it is stale and how to remove it
        print(f"shmpool-demo: {exc.strerror} (or give the demo another --name)", file=sys.stderr)
        return 2
    except (ValueError, TypeError) as exc:
        parser.error(str(exc))
    print(
        f"pool {args.name!r}: min_nr={args.min_nr}, {args.slot_size}-byte slots, capacity {args.capacity}, "
        f"arena failing {args.fail_rate:.0%} (seed {args.seed}); {args.producers} producers x {args.iterations} "
        f"elements, {args.consumers} consumers",
        flush=True,
    )
    pool.queue(QUEUE, depth=args.capacity)
    ctx = mp.get_context("spawn")
    results, hold, finished, quiet = ctx.Queue(), ctx.Event(), ctx.Event(), ctx.Queue()
    if args.hold:
        hold.set()
    procs = [
        ctx.Process(target=_producer, args=(args.name, f"p{i}", args.iterations, hold, results, args.trace, quiet))
        for i in range(args.producers)
    ]
    consumers = [
        ctx.Process(target=_consumer, args=(args.name, f"c{i}", finished, results, args.trace, args.work_ms / 1000,
                                              quiet))
        for i in range(args.consumers)
    ]
    reports: list[tuple[str, dict[str, int]]] = []
    try:
        for p in procs + consumers:
            p.start()
        if args.hold:
            # Explicitly: a shell may start a background job with SIGINT ignored.
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, signal.default_int_handler)
            banner = f"\n--hold: traffic goes on; look at it with `shmpool-inspect {args.name}`; Ctrl-C ends it"
            _say(banner)
            try:
                _await_quiet(quiet, procs + consumers)
                _say(banner + " (start-up over: no more trace)")  # the first scrolled away
                while True:  # not signal.pause(): a signal that comes just before it would be waited for forever
                    time.sleep(0.25)  # (a signal interrupts the sleep, and its handler raises at once)
            except KeyboardInterrupt:
                _say("\nstopping")
            hold.clear()
        for p in procs:
            p.join()
        finished.set()
        for p in consumers:
            p.join()
        reports = [results.get(timeout=10) for _ in procs + consumers]
        stats = pool.stats()
        findings = audit(pool)
    finally:
        for p in procs + consumers:
            if p.is_alive():
                p.kill()
                p.join()
        pool.destroy(force=True)
    return _summary(args, stats, reports, findings, procs + consumers)


def _summary(args: Any, stats: Any, reports: list[tuple[str, dict[str, int]]], findings: list[str], procs: list[Any]) -> int:
    crashed = [p.exitcode for p in procs if p.exitcode != 0]
    checked = sum(r.get("checked", 0) for kind, r in reports if kind == "consumer")
    bad = sum(r.get("bad", 0) for kind, r in reports if kind == "consumer")
    allocs = stats.alloc_arena + stats.alloc_reserve
    attempts = stats.alloc_arena + stats.faults_injected
    print()
    print("summary")
    print(
        f"  arena:   refused {stats.faults_injected} of {attempts} allocations it could have served "
        f"({stats.faults_injected / max(attempts, 1):.0%}, injected), and ran dry on others"
    )
    print(
        f"  alloc:   {allocs} GFP_KERNEL allocations succeeded, {stats.alloc_failed} failed; "
        f"{stats.alloc_arena} from the arena, {stats.alloc_reserve} from the reserve, {stats.sleeps} slept for a free"
    )
    print(f"  free:    {stats.free_reserve} refilled the reserve, {stats.free_arena} went back to the arena")
    print(f"  data:    {checked} elements passed between processes, {bad} CRC mismatches")
    print(
        f"  pool:    reserve {stats.curr_nr}/{stats.min_nr}, {stats.in_use} in use, {stats.queued} queued, "
        f"{stats.arena_free} free in the arena, audit: {'clean' if not findings else '; '.join(findings)}"
    )
    ok = stats.alloc_failed == 0 and bad == 0 and not findings and not crashed and stats.in_use == stats.queued == 0
    ok = ok and stats.curr_nr == stats.min_nr and checked == allocs
    if ok:
        print("  result:  OK: no sleeping allocation failed while the arena was failing")
    else:
        print(f"  result:  FAILED (worker exit codes {crashed})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
