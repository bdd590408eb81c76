#!/usr/bin/env python3
"""bench: shmpool's figures, measured in one run, side by side.

    python tools/bench.py              # every section, a table
    python tools/bench.py --json       # the same as JSON
    python tools/bench.py --quick      # fewer repetitions (the test suite's run)
    python tools/bench.py recovery     # one section

Sections:
  pipeline  4 KiB messages from a producer process to 1 and to 2 consumer
            processes through a pool queue (depth 256, capacity 512, min_nr
            8): the README's idiom, one element at a time (alloc, write
            through pool.ndarray, q.put(h); q.get(), read, pool.free(h)),
            and the batched form (get_many, free_bulk); messages/s of every
            repetition (min, median, max; 5 rounds, the contenders in turn),
            voluntary context switches per message (a sleep and a wake-up
            each), and p50/p99 latency from put to get with the producer
            paced at 10,000 messages/s (in rounds, in turn, too: the
            medians, and each round's p50); beside them the README's old idiom
            (alloc + a multiprocessing.Queue of handles),
            multiprocessing.Pipe copying the 4 KiB, and iceoryx2's Python
            binding (loaned samples + an event), installed for the benchmark
            only (never in --quick) or reported as "peer unavailable: why"
  fanout    4 KiB messages from a publisher process to 3 subscriber
            processes, each seeing every message: a pool topic (depth 64),
            one element at a time as the README writes it (alloc, write,
            t.publish(h); s.get(), read, s.release(h)), against iceoryx2
            publish/subscribe to 3 subscribers (same depth, an event to wake
            them); messages/s delivered per subscriber, every repetition
  pairs     alloc(GFP_ATOMIC)+free pairs in one process, arena path and
            reserve path, against the floor (a bare posix_ipc semaphore
            acquire+release pair) and two peers: a multiprocessing.Queue of
            free slot indexes, and a 20-line free list in shared memory under
            one semaphore
  procs     pairs per second with two processes on one pool against one
            process alone, shmpool and the hand-rolled peer
  reserve2  the same with every alloc a reserve pop (the arena dry): two
            processes against one
  views     buffer(h), ndarray(h) and ndarray(h, float32, (32, 32)), each
            call against one alloc+free pair
  bulk      alloc_bulk and free_bulk, elements per second each way
  churn     the same, 10,000 at a time, from a free list scrambled by random
            alloc/free order beforehand
  wakeup    from a free in one process to the return of a sleeping alloc in
            another (median, p99)
  asyncwake the same wake-up for alloc() in a thread started for it, in a
            thread kept for every call, and for await alloc_async(), one
            after the other; the ratios of their medians
  floor     the wake-up's floor: a bare posix_ipc semaphore ping-pong between
            two processes (one round trip), and one such wake-up timed like
            the wake-up section; the wake-up's median against both
  scale     per-pair cost at 1,000 / 100,000 / 1,000,000 slots; create and
            attach of a 1,000,000 x 64-byte pool; metadata bytes per slot
  inspect   shmpool-inspect's list, show and --check of a 1,000,000-slot pool
  recovery  time from SIGKILL of the lock holder to another process holding
            the lock (every hold is recorded: there is no orphan case)
  dask      a 1 MiB array from a task on one Dask worker process to a task on
            another of the same host: shmpool.dask (by reference) against
            Dask's own transfer (tools/bench_dask.py)

Figures are ratios or medians taken in the same run, on a noisy machine:
compare them with each other, not with another machine's. Nothing is written
into the repository. A section that did no work (a count that does not add
up, a peer that never answered) reports an error instead of a figure, and
the run exits 1. Every section cleans up after itself, on error too: pools
destroyed, children reaped, nothing left in /dev/shm.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import importlib
import importlib.metadata
import json
import mmap
import multiprocessing as mp
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# One BLAS thread in this process and its children (they inherit the
# environment): OpenBLAS's idle worker threads otherwise spin for a while
# after numpy starts, and on a 2-core machine they take CPU from every
# contender alike. Nothing measured here calls BLAS.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np
import posix_ipc
from bench_dask import bench_dask  # (this directory is on sys.path: bench.py runs as a script)

from shmpool import GFP_ATOMIC, GFP_KERNEL, Mempool
from shmpool._layout import Geometry

#: Children fork from a server that has numpy and shmpool imported: a spawned
#: child imports them anew, which on a loaded 2-core machine costs seconds a
#: child. The server attaches to no pool; it ends with this process.
CTX = mp.get_context("forkserver")
CTX.set_forkserver_preload(["numpy", "posix_ipc", "shmpool"])
#: Every name this run makes (pools, semaphores, iceoryx2's files) carries
#: the pid of the bench's main process: ``bench-<what>-<TAG>``. (Children
#: get names from their parent: TAG is their own pid.)
TAG = os.getpid()
#: A child that waits this long for its peer has lost it: an error.
WAIT_S = 30.0


class Kids:
    """Child processes that are reaped on leaving the block: joined if it
    ended normally, killed (by pid, SIGKILL) if it raised or if they are
    still running after ``grace`` seconds."""

    def __init__(self, grace: float = 30.0) -> None:
        self.procs: list[Any] = []
        self.grace = grace

    def start(self, target: Callable[..., None], *args: Any) -> Any:
        p = CTX.Process(target=target, args=args, daemon=True)
        p.start()
        self.procs.append(p)
        return p

    def __enter__(self) -> Kids:
        return self

    def __exit__(self, exc_type: Any, *exc: object) -> None:
        deadline = time.monotonic() + (self.grace if exc_type is None else 0)
        for p in self.procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
            p.join(timeout=10)


def collect(results: Any, want: str, count: int, timeout: float) -> list[Any]:
    """``count`` messages ``(want, role, payload)`` from children; a child's
    ("error", role, traceback) raises here, and so does silence."""
    out = []
    deadline = time.monotonic() + timeout
    while len(out) < count:
        try:
            kind, role, payload = results.get(timeout=max(0.01, deadline - time.monotonic()))
        except Exception:
            missing = count - len(out)
            raise RuntimeError(f"{missing} of {count} children never said {want!r} within {timeout:.0f} s") from None
        if kind == "error":
            raise RuntimeError(f"the {role} failed:\n{payload}")
        if kind != want:
            raise RuntimeError(f"the {role} reported {kind!r}, not {want!r}")
        out.append((role, payload))
    return out


def percentile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def ratio(a: float, b: float) -> float:
    """a / b to three significant digits (a ratio far from 1 keeps them)."""
    return float(f"{a / b:.3g}")


def interleaved(fns: dict[str, Callable[[int], None]], n: int, rounds: int = 5) -> dict[str, float]:
    """Like per_op for several functions at once, timed in turns (round by
    round) so that a noisy moment does not land on one of them only: best
    microseconds per iteration of each."""
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for key, fn in fns.items():
            t0 = time.perf_counter()
            fn(n)
            best[key] = min(best[key], time.perf_counter() - t0)
    return {key: t / n * 1e6 for key, t in best.items()}


def per_op(fn: Callable[[int], None], n: int, rounds: int = 5) -> float:
    """Best of ``rounds`` timings of fn(n), in microseconds per iteration."""
    return interleaved({"fn": fn}, n, rounds)["fn"]


class HandRolled:
    """The peer: a free list of slot indexes in shared memory, under one
    semaphore (what people write by hand; no reserve, no checks)."""

    def __init__(self, name: str, capacity: int, create: bool) -> None:
        flags = posix_ipc.O_CREX if create else 0
        self.shm = posix_ipc.SharedMemory(name, flags, size=8 + 4 * capacity if create else 0)
        self.sem = posix_ipc.Semaphore(name, flags, initial_value=1)
        self.mm = mmap.mmap(self.shm.fd, self.shm.size)
        self.shm.close_fd()
        self.top = memoryview(self.mm)[:8].cast("q")
        self.stack = memoryview(self.mm)[8:].cast("i")
        if create:
            for i in range(capacity):
                self.stack[i] = i
            self.top[0] = capacity

    def alloc(self) -> int:
        self.sem.acquire()
        n = self.top[0]
        if n == 0:
            self.sem.release()
            return -1
        n -= 1
        self.top[0] = n
        i = self.stack[n]
        self.sem.release()
        return i

    def free(self, i: int) -> None:
        self.sem.acquire()
        n = self.top[0]
        self.stack[n] = i
        self.top[0] = n + 1
        self.sem.release()

    def close(self, unlink: bool = False) -> None:
        self.top.release()
        self.stack.release()
        self.mm.close()
        self.sem.close()
        if unlink:
            posix_ipc.unlink_shared_memory(self.shm.name)
            posix_ipc.unlink_semaphore(self.sem.name)


# ----------------------------------------------------------------------
# pipeline: 4 KiB messages from one producer process to consumer processes

PAYLOAD = 4096
WORDS = PAYLOAD // 8
STOP = (1 << 64) - 1  # the counter word of the producer's "no more"
BATCH = 64  # get_many's max_n, and the most a consumer takes at once from any contender
DEPTH = 256  # the pool queue's depth, and iceoryx2's subscriber buffer
#: Fan-out: each subscriber's buffer, the topic's and iceoryx2's (iceoryx2
#: 0.10 with three subscribers of 256 lost message 256 here: 64 works for both)
FANOUT_DEPTH = 64
CAPACITY = 512  # the pipeline pool's slots (min_nr 8)
PACED_RATE = 10_000  # messages/s of the paced (latency) runs
#: The "busy" runs: each consumer spends this much CPU on every message (as a
#: consumer that computes something from it does), so that the consumers, not
#: the hand-off, are the bottleneck: a second consumer should then add nearly
#: a core's worth, unless the hand-off wastes CPU (a producer spinning or
#: woken for every message).
BUSY_US = 20
ICEORYX2 = "iceoryx2>=0.10,<0.11"
_now = time.monotonic_ns  # CLOCK_MONOTONIC: one clock in every process


def _stamp(a: np.ndarray, i: int) -> None:
    """The producer's payload: the counter in every 8-byte word of the
    4 KiB, then the send time in word 1. (``fill`` is what a user writing
    4 KiB would reach for: 0.7 µs here where ``a[:] = i`` takes 1.6, the same
    saving for every contender.)"""
    a.fill(i)
    a[1] = _now()


class Reader:
    """A consumer's reading of each message: counter and last word agree,
    counters arrive in order (increasing with several consumers, each one
    exactly once: checked by the parent from counts and sums), latency from
    the producer's stamp to the take."""

    __slots__ = ("ordered", "busy_ns", "last", "count", "total", "latencies", "stopped", "longest")

    def __init__(self, ordered: bool, busy_ns: int = 0) -> None:
        self.ordered = ordered
        self.busy_ns = busy_ns
        self.last = -1
        self.count = self.total = 0
        self.latencies: list[int] = []
        self.stopped = False
        self.longest = 0  # the longest take (ns): a stall shows here

    def read(self, a: np.ndarray, taken_ns: int) -> bool:
        """False for the producer's STOP."""
        i = int(a[0])
        if i == STOP:
            return False
        if int(a[WORDS - 1]) != i or (i != self.last + 1 if self.ordered else i <= self.last):
            raise RuntimeError(f"message {i} (last word {int(a[WORDS - 1])}) after {self.last}: lost, reordered, torn")
        self.last = i
        self.count += 1
        self.total += i
        self.latencies.append(taken_ns - int(a[1]))
        if self.busy_ns:  # the consumer's own work on the message: CPU, as computing would take
            until = _now() + self.busy_ns
            while _now() < until:
                pass
        return True


def _consume(take: Callable[[], list[Any]], view: Callable[[Any], np.ndarray],
             release: Callable[[list[Any], list[Any]], None], reader: Reader) -> None:
    """The consumers' loop, one for every contender: take a batch, read
    each, release the batch (a STOP beyond this consumer's own goes back)."""
    while not reader.stopped:
        before = _now()
        items = take()
        taken = _now()
        reader.longest = max(reader.longest, taken - before)
        back = []
        for item in items:
            if not reader.read(view(item), taken):
                if reader.stopped:
                    back.append(item)
                reader.stopped = True
        release(items, back)


def _produce(send: Callable[[int], None], n: int, rate: int, stops: int, budget_s: float) -> tuple[int, int, int]:
    """The producers' loop: up to n messages, at ``rate`` a second if given,
    for at most ``budget_s`` seconds; then one STOP per consumer. Returns
    when it started, how many it sent and its longest send (ns). Pacing
    sleeps while the next due time is far (releasing the GIL, as a producer
    waiting for its input does) and spins the last stretch."""
    step = 1e9 / rate if rate else 0.0
    t0 = _now()
    end = t0 + int(budget_s * 1e9)
    sent = longest = 0
    for i in range(n):
        if step:
            due = t0 + int(i * step)
            while (left := due - _now()) > 0:
                if left > 60_000:
                    time.sleep((left - 50_000) / 1e9)
        elif i % 256 == 0 and _now() > end:
            break
        before = _now()
        send(i)
        longest = max(longest, _now() - before)
        sent += 1
    for _ in range(stops):
        send(STOP)
    return t0, sent, longest


# Each contender: a producer's send(i) and a consumer's (take, view,
# release), from the spec its parent-side setup made; plus what to close.

def _shmpool_producer(spec: dict[str, Any]) -> tuple[Callable[[int], None], Callable[[], None]]:
    pool = Mempool.attach(spec["pool"])
    alloc, view = pool.alloc, pool.ndarray
    # the pool's queue, a topic (fan-out: alloc, write, publish), or the README's old idiom: a
    # multiprocessing.Queue of handles
    if spec["kind"] == "topic":
        put = pool.topic(spec["topic"]).publish
    else:
        put = pool.queue(spec["queue"]).put if spec["kind"] in ("idiom", "batched") else spec["mpq"].put

    def send(i: int) -> None:
        h = alloc()
        _stamp(view(h, np.uint64), i)
        put(h)

    return send, pool.close


def _shmpool_consumer(spec: dict[str, Any]) -> tuple[Any, Any, Any, Callable[[], None]]:
    pool = Mempool.attach(spec["pool"])
    ndarray, free, u64 = pool.ndarray, pool.free, np.uint64
    if spec["kind"] == "idiom":  # the README's: one element at a time
        q = pool.queue(spec["queue"])
        get, put = q.get, q.put

        def take() -> list[Any]:
            return [get(timeout=WAIT_S)]

        def release(items: list[Any], back: list[Any]) -> None:
            if back:
                put(items[0])
            else:
                free(items[0])
    elif spec["kind"] == "batched":
        q = pool.queue(spec["queue"])
        get_many, put, free_bulk = q.get_many, q.put, pool.free_bulk

        def take() -> list[Any]:
            return get_many(BATCH, timeout=WAIT_S).tolist()

        def release(items: list[Any], back: list[Any]) -> None:
            for h in back:
                put(h)
            free_bulk([h for h in items if h not in back] if back else items)
    else:
        get = spec["mpq"].get

        def take() -> list[Any]:
            return [get(timeout=WAIT_S)]

        def release(items: list[Any], back: list[Any]) -> None:
            free(items[0])

    return take, lambda h: ndarray(h, u64), release, pool.close


def _pipe_producer(spec: dict[str, Any]) -> tuple[Callable[[int], None], Callable[[], None]]:
    conn = spec["send"]
    buf = bytearray(PAYLOAD)
    a = np.frombuffer(buf, np.uint64)
    send_bytes = conn.send_bytes

    def send(i: int) -> None:
        _stamp(a, i)
        send_bytes(buf)  # copied into the pipe, and out again by recv_bytes

    return send, conn.close


def _pipe_consumer(spec: dict[str, Any]) -> tuple[Any, Any, Any, Callable[[], None]]:
    conn = spec["recv"]
    recv_bytes, u64 = conn.recv_bytes, np.uint64
    return (lambda: [recv_bytes()]), (lambda b: np.frombuffer(b, u64)), (lambda items, back: None), conn.close


class Iceoryx2:
    """iceoryx2's Python binding, set up as its examples do: a node, a
    publish-subscribe service of 4 KiB samples (loaned, written in place)
    and an event service whose notifier wakes the subscriber's listener.
    Local IPC only (ServiceType.Ipc); every file it makes carries this
    run's prefix under a root of its own, so that they can all be removed."""

    def __init__(self, spec: dict[str, Any]) -> None:
        if spec["path"] and spec["path"] not in sys.path:
            sys.path.insert(0, spec["path"])
        import ctypes

        import iceoryx2 as iox2

        self.iox2 = iox2
        iox2.set_log_level(iox2.LogLevel.Error)
        config = iox2.config.default()
        config.global_cfg.prefix = iox2.FileName.new(spec["prefix"])
        config.global_cfg.root_path = iox2.Path.new(spec["root"] + "/")

        class Frame(ctypes.Structure):
            _fields_ = [("words", ctypes.c_uint64 * WORDS)]

        self.words = ctypes.c_uint64 * WORDS
        self.node = (
            iox2.NodeBuilder.new().config(config).signal_handling_mode(iox2.SignalHandlingMode.Disabled)
            .create(iox2.ServiceType.Ipc)
        )
        self.pubsub = (
            self.node.service_builder(iox2.ServiceName.new(f"{spec['service']}/frames")).publish_subscribe(Frame)
            .max_publishers(1).max_subscribers(max(2, spec.get("consumers", 2))).history_size(0)
            .subscriber_max_buffer_size(spec.get("depth", DEPTH))
            .subscriber_max_borrowed_samples(BATCH).enable_safe_overflow(False).open_or_create()
        )
        self.event = (
            self.node.service_builder(iox2.ServiceName.new(f"{spec['service']}/wake")).event()
            .max_listeners(max(2, spec.get("consumers", 2))).open_or_create()
        )
        self.ports: list[Any] = []

    def view(self, sample: Any) -> np.ndarray:
        return np.frombuffer(self.words.from_address(sample.payload_ptr), np.uint64)

    def close(self) -> None:
        for port in self.ports:
            port.delete()
        self.ports.clear()
        self.pubsub = self.event = self.node = None  # type: ignore[assignment]


def _iceoryx2_producer(spec: dict[str, Any]) -> tuple[Callable[[int], None], Callable[[], None]]:
    iox = Iceoryx2(spec)
    publisher = (
        iox.pubsub.publisher_builder().max_loaned_samples(2)
        .backpressure_strategy(iox.iox2.BackpressureStrategy.RetryUntilDelivered).create()
    )
    notifier = iox.event.notifier_builder().create()
    iox.ports += [publisher, notifier]
    loan, view, notify = publisher.loan_uninit, iox.view, notifier.notify

    def send(i: int) -> None:
        sample = loan()
        _stamp(view(sample), i)
        sample.assume_init().send()
        notify()

    return send, iox.close


def _iceoryx2_consumer(spec: dict[str, Any]) -> tuple[Any, Any, Any, Callable[[], None]]:
    iox = Iceoryx2(spec)
    subscriber = iox.pubsub.subscriber_builder().buffer_size(spec.get("depth", DEPTH)).create()
    listener = iox.event.listener_builder().create()
    iox.ports += [subscriber, listener]
    receive, wait, nap = subscriber.receive, listener.timed_wait, iox.iox2.Duration.from_millis(100)

    def take() -> list[Any]:
        deadline = time.monotonic() + WAIT_S
        while True:
            items = []
            while len(items) < BATCH and (sample := receive()) is not None:
                items.append(sample)
            if items:
                return items
            if time.monotonic() > deadline:
                raise TimeoutError(f"no sample in {WAIT_S} s")
            wait(nap)  # until the publisher's notifier wakes us

    def release(items: list[Any], back: list[Any]) -> None:
        for sample in items:
            sample.delete()

    return take, iox.view, release, iox.close


def _topic_consumer(spec: dict[str, Any]) -> tuple[Any, Any, Any, Callable[[], None]]:
    """A subscriber, one element at a time: get, read, release."""
    pool = Mempool.attach(spec["pool"])
    sub = pool.topic(spec["topic"]).subscribe()  # before "ready": it sees every message
    get, release_one, ndarray, u64 = sub.get, sub.release, pool.ndarray, np.uint64

    def release(items: list[Any], back: list[Any]) -> None:
        for h in items:
            release_one(h)

    def close() -> None:
        sub.close()
        pool.close()

    return (lambda: [get(timeout=WAIT_S)]), (lambda h: ndarray(h, u64)), release, close


PRODUCERS = {
    "idiom": _shmpool_producer, "batched": _shmpool_producer, "mpqueue": _shmpool_producer, "pipe": _pipe_producer,
    "iceoryx2": _iceoryx2_producer, "topic": _shmpool_producer,
}
CONSUMERS = {
    "idiom": _shmpool_consumer, "batched": _shmpool_consumer, "mpqueue": _shmpool_consumer, "pipe": _pipe_consumer,
    "iceoryx2": _iceoryx2_consumer, "topic": _topic_consumer,
}


def _voluntary_switches() -> int:
    """This process's voluntary context switches so far: each is a sleep
    (and the wake-up that ended it)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])
    return 0


def _pipeline_worker(role: str, spec: dict[str, Any], go: Any, finish: Any, results: Any) -> None:
    close: Callable[[], None] | None = None
    try:
        if role == "producer":
            send, close = PRODUCERS[spec["kind"]](spec)
            results.put(("ready", role, None))
            if not go.wait(WAIT_S):
                raise TimeoutError("never told to start")
            switches = _voluntary_switches()
            stops = 1 if spec.get("fanout") else spec["consumers"]  # fan-out: every subscriber sees the one STOP
            produced = _produce(send, spec["n"], spec["rate"], stops, spec["budget_s"])
            results.put(("done", role, (*produced, _voluntary_switches() - switches)))
            finish.wait(WAIT_S * 2)  # everything taken: the producer's ports may go
        else:
            take, view, release, close = CONSUMERS[spec["kind"]](spec)
            reader = Reader(ordered=spec["consumers"] == 1 or spec.get("fanout", False), busy_ns=spec["busy_us"] * 1000)
            results.put(("ready", role, None))
            if not go.wait(WAIT_S):
                raise TimeoutError("never told to start")
            switches = _voluntary_switches()
            _consume(take, view, release, reader)
            end = _now()
            lat = reader.latencies if spec["rate"] else []
            switches = _voluntary_switches() - switches
            results.put(("done", role, (end, reader.count, reader.total, lat, reader.longest, switches)))
    except BaseException:
        results.put(("error", f"{spec['kind']} {role}", traceback.format_exc()))
    finally:
        if close is not None:
            close()


@contextlib.contextmanager
def _contender(kind: str, peer_path: str, consumers: int = 1, depth: int = DEPTH) -> Iterator[dict[str, Any]]:
    """The parent's side of one run: makes what the children open, and
    removes it after, whatever happened."""
    spec: dict[str, Any] = {"kind": kind, "consumers": consumers, "depth": depth}
    if kind in ("idiom", "batched", "mpqueue", "topic"):
        pool = Mempool.create(f"bench-pipeline-{TAG}", min_nr=8, slot_size=PAYLOAD, capacity=CAPACITY)
        mpq = None
        try:
            if kind == "topic":
                pool.topic("frames", depth=depth)
                spec.update(pool=pool.name, topic="frames")
            elif kind != "mpqueue":
                pool.queue("frames", depth=DEPTH)
                spec.update(pool=pool.name, queue="frames")
            else:
                mpq = CTX.Queue()
                spec.update(pool=pool.name, mpq=mpq)
            yield spec
            s = pool.stats()
            if s.in_use or s.queued:  # every element counted back
                raise RuntimeError(f"{kind}: {s.in_use} elements still held and {s.queued} queued after the run")
        finally:
            if mpq is not None:
                mpq.close()
            pool.destroy(force=True)
    elif kind == "pipe":
        recv, send = CTX.Pipe(duplex=False)
        try:
            yield dict(spec, recv=recv, send=send)
        finally:
            recv.close()
            send.close()
    else:
        root = tempfile.mkdtemp(prefix=f"bench-iceoryx2-{TAG}-")
        spec.update(path=peer_path, prefix=f"bench{TAG}iox_", root=root, service=f"bench/{TAG}")
        iox = None
        try:
            iox = Iceoryx2(spec)  # the services exist before any child opens them
            yield spec
        finally:
            if iox is not None:
                iox.close()
            del iox
            for leftover in glob.glob(f"/dev/shm/{spec['prefix']}*"):  # its global segment stays by design
                os.unlink(leftover)
            shutil.rmtree(root, ignore_errors=True)


def run_pipeline(kind: str, consumers: int, n: int, rate: int = 0, peer_path: str = "",
                 budget_s: float = 10.0, busy_us: int = 0, fanout: bool = False) -> dict[str, Any]:
    """One run: 1 producer and ``consumers`` consumer processes, started
    together once all are ready; up to n messages, the producer stopping
    after ``budget_s`` seconds. Messages/s from the producer's first send
    to the last consumer's STOP; latencies (paced runs) from each send to
    its take."""
    go, finish, results = CTX.Event(), CTX.Event(), CTX.Queue()
    try:
        with _contender(kind, peer_path, consumers, FANOUT_DEPTH if fanout else DEPTH) as spec:
            spec.update(n=n, rate=rate, consumers=consumers, budget_s=budget_s, busy_us=busy_us, fanout=fanout)
            with Kids() as kids:
                for role in ["producer"] + ["consumer"] * consumers:
                    kids.start(_pipeline_worker, role, spec, go, finish, results)
                collect(results, "ready", 1 + consumers, 120)
                go.set()
                done = collect(results, "done", 1 + consumers, budget_s + 2 * WAIT_S)
                finish.set()
    finally:
        results.close()
    t0, sent, longest, producer_switches = next(payload for role, payload in done if role == "producer")
    ends = [payload for role, payload in done if role == "consumer"]
    count, total = sum(e[1] for e in ends), sum(e[2] for e in ends)
    copies = consumers if fanout else 1  # fan-out: every subscriber reads every message
    if sent == 0 or count != sent * copies or total != copies * (sent * (sent - 1) // 2):
        want = copies * (sent * (sent - 1) // 2)
        raise RuntimeError(f"{kind}: {count} of {sent} messages sent arrived (counter sum {total}, not {want})")
    out = {
        "msgs_per_s": sent / ((max(e[0] for e in ends) - t0) / 1e9),
        "sent": sent,
        "longest_wait_ms": max(longest, *(e[4] for e in ends)) / 1e6,  # one send or take
        "switches_per_msg": (producer_switches + sum(e[5] for e in ends)) / sent,
    }
    if rate:
        lat = sorted(x / 1e3 for e in ends for x in e[3])
        out.update(p50_us=statistics.median(lat), p99_us=percentile(lat, 0.99))
    return out


def iceoryx2_peer(quick: bool) -> tuple[str | None, str]:
    """Where iceoryx2 0.10 imports from ("" for this interpreter's own
    path), installed for this run only if it must be (into a directory
    removed at exit, never into the environment); or None and why not."""
    try:
        version = importlib.metadata.version("iceoryx2")
        importlib.import_module("iceoryx2")
        return "", f"iceoryx2 {version} (already installed)"
    except Exception:
        pass
    if quick:
        return None, "peer unavailable: iceoryx2 is not installed, and --quick installs nothing"
    target = tempfile.mkdtemp(prefix=f"bench-peers-{TAG}-")
    try:
        out = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-input",
             "--target", target, ICEORYX2],
            capture_output=True, text=True, timeout=300,
        )
    except subprocess.TimeoutExpired:
        shutil.rmtree(target, ignore_errors=True)
        return None, f"peer unavailable: pip install {ICEORYX2!r} took over 300 s"
    if out.returncode != 0:
        shutil.rmtree(target, ignore_errors=True)
        why = (out.stderr.strip().splitlines() or ["no message"])[-1]
        return None, f"peer unavailable: pip install {ICEORYX2!r} failed: {why}"
    import atexit

    atexit.register(shutil.rmtree, target, True)
    sys.path.insert(0, target)
    try:
        importlib.import_module("iceoryx2")
    except Exception as exc:
        return None, f"peer unavailable: iceoryx2 installed but does not import: {type(exc).__name__}: {exc}"
    return target, f"{ICEORYX2} (installed for this run only)"


def bench_pipeline(reps: int) -> dict[str, Any]:
    quick = reps < 10
    n, n_paced, rounds, budget_s = (2_000, 500, 1, 3.0) if quick else (50_000, 10_000, 5, 15.0)
    peer_path, iceoryx2_note = iceoryx2_peer(quick)
    n_busy = n // 2  # at BUSY_US a message, half a second for one consumer
    runs = [("idiom_1to1", "idiom", 1, 0), ("idiom_1to2", "idiom", 2, 0), ("batched_1to1", "batched", 1, 0),
            ("batched_1to2", "batched", 2, 0), ("mpqueue_1to1", "mpqueue", 1, 0), ("pipe_1to1", "pipe", 1, 0),
            ("busy_1to1", "idiom", 1, BUSY_US), ("busy_1to2", "idiom", 2, BUSY_US)]
    if peer_path is not None:
        runs.append(("iceoryx2_1to1", "iceoryx2", 1, 0))
    rates: dict[str, list[float]] = {}
    switches: dict[str, list[float]] = {}
    cut: dict[str, int] = {}
    longest: dict[str, float] = {}
    paced: dict[str, list[dict[str, Any]]] = {}  # every paced round's

    peer_failures: list[str] = []  # the peer's failed runs (iceoryx2 0.10 once lost 83 samples of 50,000)

    def attempt(kind: str, consumers: int, count: int, rate: int, busy_us: int = 0) -> dict[str, Any] | None:
        nonlocal iceoryx2_note
        if kind == "iceoryx2" and (iceoryx2_note.startswith("peer unavailable") or len(peer_failures) >= 2):
            return None  # (not installed, or failed twice: not tried again)
        try:
            return run_pipeline(kind, consumers, count, rate, peer_path or "", budget_s, busy_us)
        except Exception as exc:
            if kind != "iceoryx2":
                raise
            last = str(exc).strip().splitlines()[-1:] or [""]  # (a child's traceback ends with its error)
            peer_failures.append(f"{type(exc).__name__}: {last[0]}")
            if len(peer_failures) >= 2:
                iceoryx2_note = f"peer unavailable: {iceoryx2_note}, but it failed here twice: {peer_failures[-1]}"
            return None  # that run is missing from its repetitions

    for _ in range(rounds):  # the contenders in turn, round after round: every repetition kept
        for key, kind, consumers, busy_us in runs:
            want = n_busy if busy_us else n
            got = attempt(kind, consumers, want, 0, busy_us)
            if got is not None:
                rates.setdefault(key, []).append(got["msgs_per_s"])
                switches.setdefault(key, []).append(got["switches_per_msg"])
                longest[key] = max(longest.get(key, 0.0), got["longest_wait_ms"])
                if got["sent"] < want:
                    cut[key] = max(cut.get(key, 0), got["sent"])
    for _ in range(rounds):  # the paced runs too, in turn: a wake-up's cost swings with where the host runs each vCPU
        for key, kind, consumers, busy_us in runs:
            if consumers == 1 and kind != "batched" and not busy_us and (got := attempt(kind, 1, n_paced, PACED_RATE)):
                paced.setdefault(key, []).append(got)
    out: dict[str, Any] = {"messages": n, "rounds": rounds, "payload_bytes": PAYLOAD, "queue_depth": DEPTH,
                           "pool_capacity": CAPACITY, "get_many": BATCH, "busy_us_per_msg": BUSY_US,
                           "busy_messages": n_busy, "iceoryx2": iceoryx2_note}
    if peer_failures:
        out["iceoryx2_failed_runs"] = peer_failures
    median = {key: statistics.median(v) for key, v in rates.items()}
    for key, _, _, busy_us in runs:
        if key in rates:
            runs_of = rates[key]
            out[f"{key}_msgs_per_s"] = round(median[key])  # the median of the rounds
            out[f"{key}_min_max"] = [round(min(runs_of)), round(max(runs_of))]
            out[f"{key}_runs"] = [round(x) for x in runs_of]
            out[f"{key}_switches_per_msg"] = round(statistics.median(switches[key]), 3)
            out[f"{key}_longest_wait_ms"] = round(longest[key], 1)  # over its rounds: one send or take
        if key in cut:  # never the whole n within the budget, in some round
            out[f"{key}_cut_short"] = f"{cut[key]} of {n_busy if busy_us else n} messages in the {budget_s:.0f} s budget"
    out.update(paced_msgs_per_s=PACED_RATE, paced_messages=n_paced)
    p50 = {key: statistics.median(got["p50_us"] for got in rounds_of) for key, rounds_of in paced.items()}
    for key, rounds_of in paced.items():  # the medians of the rounds' p50 and p99, and every round's p50
        out[f"{key}_paced_p50_us"] = round(p50[key], 1)
        out[f"{key}_paced_p99_us"] = round(statistics.median(got["p99_us"] for got in rounds_of), 1)
        out[f"{key}_paced_p50_runs"] = [round(got["p50_us"], 1) for got in rounds_of]
    for form in ("idiom", "batched", "busy"):
        out[f"{form}_1to2_vs_1to1"] = ratio(median[f"{form}_1to2"], median[f"{form}_1to1"])
    out["batched_vs_idiom"] = ratio(median["batched_1to1"], median["idiom_1to1"])
    for peer in ("iceoryx2", "pipe", "mpqueue"):
        if f"{peer}_1to1" in median:
            out[f"idiom_vs_{peer}"] = ratio(median["idiom_1to1"], median[f"{peer}_1to1"])
            out[f"idiom_worst_vs_{peer}"] = ratio(min(rates["idiom_1to1"]), median[f"{peer}_1to1"])
        if f"{peer}_1to1" in paced:
            out[f"idiom_p50_vs_{peer}"] = ratio(p50["idiom_1to1"], p50[f"{peer}_1to1"])
    return out


def bench_fanout(reps: int) -> dict[str, Any]:
    """One publisher, three subscribers: shmpool's topic against iceoryx2's
    publish/subscribe, interleaved round after round."""
    quick = reps < 10
    n, rounds, budget_s = (2_000, 1, 3.0) if quick else (30_000, 5, 15.0)
    peer_path, note = iceoryx2_peer(quick)
    runs = [("topic_1to3", "topic")] + ([("iceoryx2_1to3", "iceoryx2")] if peer_path is not None else [])
    rates: dict[str, list[float]] = {}
    for _ in range(rounds):
        for key, kind in runs:
            try:
                got = run_pipeline(kind, 3, n, 0, peer_path or "", budget_s, 0, fanout=True)
            except Exception as exc:
                if kind != "iceoryx2":
                    raise
                note = f"peer unavailable: {note}, but it failed here: {type(exc).__name__}: {exc}"
                continue
            rates.setdefault(key, []).append(got["msgs_per_s"])
    out: dict[str, Any] = {"messages": n, "rounds": rounds, "subscribers": 3, "payload_bytes": PAYLOAD,
                           "depth": FANOUT_DEPTH, "iceoryx2": note}
    for key, runs_of in rates.items():
        out[f"{key}_msgs_per_s"] = round(statistics.median(runs_of))
        out[f"{key}_min_max"] = [round(min(runs_of)), round(max(runs_of))]
        out[f"{key}_runs"] = [round(x) for x in runs_of]
    if "iceoryx2_1to3" in rates:
        out["topic_vs_iceoryx2"] = ratio(statistics.median(rates["topic_1to3"]), statistics.median(rates["iceoryx2_1to3"]))
        out["topic_worst_vs_iceoryx2"] = ratio(min(rates["topic_1to3"]), statistics.median(rates["iceoryx2_1to3"]))
    return out


def bench_pairs(reps: int) -> dict[str, Any]:
    n = 20_000 * reps // 4
    tag = TAG
    sem = posix_ipc.Semaphore(f"/bench-floor-{tag}", posix_ipc.O_CREX, initial_value=1)
    queue: Any = mp.get_context("spawn").Queue()
    hand = HandRolled(f"/bench-hand-{tag}", 1024, create=True)
    arena_pool = Mempool.create(f"bench-arena-{tag}", min_nr=4, slot_size=64, capacity=1024)
    reserve_pool = Mempool.create(f"bench-reserve-{tag}", min_nr=1024, slot_size=64, capacity=1024)
    try:
        for i in range(1024):
            queue.put(i)

        def floor(k: int) -> None:
            acquire, release = sem.acquire, sem.release
            for _ in range(k):
                acquire()
                release()

        def pool_pairs(pool: Mempool) -> Callable[[int], None]:
            def run(k: int) -> None:
                alloc, free = pool.alloc, pool.free
                for _ in range(k):
                    free(alloc(GFP_ATOMIC))
            return run

        def queue_pairs(k: int) -> None:
            get, put = queue.get, queue.put
            for _ in range(k):
                put(get())

        def hand_pairs(k: int) -> None:
            alloc, free = hand.alloc, hand.free
            for _ in range(k):
                free(alloc())

        floor_us = per_op(floor, n)
        arena_us = per_op(pool_pairs(arena_pool), n)
        reserve_us = per_op(pool_pairs(reserve_pool), n)
        queue_us = per_op(queue_pairs, max(1000, n // 10), rounds=3)
        hand_us = per_op(hand_pairs, n)
        assert arena_pool.stats().alloc_reserve == 0 and reserve_pool.stats().alloc_arena == 0
    finally:
        sem.close()
        posix_ipc.unlink_semaphore(f"/bench-floor-{tag}")
        hand.close(unlink=True)
        arena_pool.destroy(force=True)
        reserve_pool.destroy(force=True)
        queue.close()
    return {
        "floor_sem_pair_us": round(floor_us, 3),
        "arena_pair_us": round(arena_us, 3),
        "reserve_pair_us": round(reserve_us, 3),
        "queue_idiom_pair_us": round(queue_us, 3),
        "hand_rolled_pair_us": round(hand_us, 3),
        "arena_vs_floor": round(arena_us / floor_us, 2),
        "reserve_vs_floor": round(reserve_us / floor_us, 2),
        "speedup_vs_queue": round(queue_us / arena_us, 1),
        "speedup_vs_hand_rolled": round(hand_us / arena_us, 2),
    }


def _procs_worker(kind: str, name: str, seconds: float, start: Any, results: Any) -> None:
    try:
        if kind == "shmpool":
            pool = Mempool.attach(name)
            alloc, free = pool.alloc, pool.free

            def pair() -> None:
                free(alloc(GFP_ATOMIC))
        else:
            hand = HandRolled(name, 0, create=False)
            h_alloc, h_free = hand.alloc, hand.free

            def pair() -> None:
                h_free(h_alloc())
        results.put(("ready", kind, None))
        if not start.wait(WAIT_S):
            raise TimeoutError("never told to start")
        count = 0
        t0 = time.perf_counter()
        deadline = t0 + seconds
        while time.perf_counter() < deadline:
            for _ in range(200):
                pair()
            count += 200
        results.put(("done", kind, (count, time.perf_counter() - t0)))
    except BaseException:
        results.put(("error", f"{kind} worker", traceback.format_exc()))


def pairs_per_second(kind: str, name: str, nprocs: int, seconds: float) -> tuple[float, int]:
    """Aggregate alloc+free pairs per second of ``nprocs`` processes that
    start together on pool (or hand-rolled list) ``name``; and how many."""
    start, results = CTX.Event(), CTX.Queue()
    try:
        with Kids() as kids:
            for _ in range(nprocs):
                kids.start(_procs_worker, kind, name, seconds, start, results)
            collect(results, "ready", nprocs, 60)
            start.set()
            done = [payload for _, payload in collect(results, "done", nprocs, seconds + 60)]
    finally:
        results.close()
    count = sum(c for c, _ in done)
    if count == 0:
        raise RuntimeError(f"{kind}: {nprocs} process(es) did no alloc+free pair in {seconds} s")
    return sum(c / t for c, t in done), count


def bench_procs(reps: int) -> dict[str, Any]:
    seconds = 0.25 * reps / 4
    pool = Mempool.create(f"bench-procs-{TAG}", min_nr=4, slot_size=64, capacity=1024)
    hand = HandRolled(f"/bench-hand2-{TAG}", 1024, create=True)
    out: dict[str, Any] = {}
    try:
        for kind, name in (("shmpool", pool.name), ("hand_rolled", f"/bench-hand2-{TAG}")):
            rates = [pairs_per_second(kind, name, nprocs, seconds)[0] for nprocs in (1, 2)]
            out[f"{kind}_1proc_pairs_per_s"] = round(rates[0])
            out[f"{kind}_2procs_pairs_per_s"] = round(rates[1])
            out[f"{kind}_2procs_vs_1"] = round(rates[1] / rates[0], 2)
    finally:
        pool.destroy(force=True)
        hand.close(unlink=True)
    return out


def bench_reserve2(reps: int) -> dict[str, Any]:
    """Two (and four) processes on the reserve path at once: min_nr ==
    capacity leaves the arena dry, so every alloc pops the reserve and every
    free pushes it (each process mostly in its own reserve places, without
    the pool lock). Best of a few rounds, one, two and four in turn."""
    seconds = 0.25 * reps / 4
    rounds = 1 if reps < 10 else 3
    pool = Mempool.create(f"bench-reserve2-{TAG}", min_nr=1024, slot_size=64, capacity=1024)
    try:
        best = {1: 0.0, 2: 0.0, 4: 0.0}
        pairs = 0
        for _ in range(rounds):
            for nprocs in best:
                rate, count = pairs_per_second("shmpool", pool.name, nprocs, seconds)
                best[nprocs] = max(best[nprocs], rate)
                pairs += count
        s = pool.stats()
        # Every allocation came from the reserve, but those whose lock did not
        # come within the atomic bound (a holder descheduled on a loaded
        # machine: GFP_ATOMIC returns None then, by design); those are
        # counted as failures and reported, and must stay a sliver.
        if s.alloc_arena != 0 or s.alloc_reserve + s.alloc_failed < pairs or s.alloc_failed > pairs // 1000:
            raise RuntimeError(
                f"not the reserve path: {s.alloc_reserve} reserve pops, {s.alloc_arena} arena allocations and "
                f"{s.alloc_failed} failures for {pairs} pairs"
            )
    finally:
        pool.destroy(force=True)
    return {
        "1proc_pairs_per_s": round(best[1]),
        "2procs_pairs_per_s": round(best[2]),
        "2procs_vs_1": ratio(best[2], best[1]),
        "4procs_pairs_per_s": round(best[4]),
        "4procs_vs_1": ratio(best[4], best[1]),
        "reserve_pops": s.alloc_reserve,
        "lock_timeouts": s.alloc_failed,
    }


def _wakeup_child(name: str, n: int, go: Any, results: Any) -> None:
    pool = Mempool.attach(name)
    for _ in range(n):
        go.get()  # the parent holds the only element now
        h = pool.alloc(GFP_KERNEL)
        results.put(time.perf_counter_ns())  # CLOCK_MONOTONIC: the same clock in every process
        pool.free(h)


def _wake_a_sleeper(pool: Mempool, h: int, go: Any, results: Any) -> tuple[float, int]:
    """Let the child sleep for the element ``h`` we hold, free it, and
    return the wake-up in µs (to the child's stamp) and the element again
    (the child frees it)."""
    go.put(1)
    deadline = time.monotonic() + WAIT_S
    while pool.stats().nr_waiters == 0:  # until the child sleeps
        if time.monotonic() > deadline:
            raise RuntimeError("the child never slept")
    t0 = time.perf_counter_ns()
    pool.free(h)
    latency = (results.get(timeout=WAIT_S) - t0) / 1e3
    return latency, pool.alloc()


def bench_wakeup(reps: int) -> dict[str, Any]:
    n = 25 * reps
    pool = Mempool.create(f"bench-wakeup-{TAG}", min_nr=1, slot_size=16, capacity=1)
    go, results = CTX.Queue(), CTX.Queue()
    try:
        with Kids() as kids:
            kids.start(_wakeup_child, pool.name, n, go, results)
            latencies = []
            h = pool.alloc()
            for _ in range(n):
                latency, h = _wake_a_sleeper(pool, h, go, results)
                latencies.append(latency)
            pool.free(h)
    finally:
        go.close()
        results.close()
        pool.destroy(force=True)
    latencies.sort()
    return {
        "median_us": round(statistics.median(latencies), 1),
        "p99_us": round(percentile(latencies, 0.99), 1),
        "samples": len(latencies),
    }


ASYNCWAKE_KINDS = ("fresh_thread", "kept_thread", "async")


def _asyncwake_child(name: str, n: int, go: Any, results: Any) -> None:
    """Sleeps n times in alloc() in a thread started for it (as
    threading.Thread(target=pool.alloc) or a pool of threads growing does),
    n times in alloc() in one thread kept for all of them, then n times in
    await alloc_async(); stamps each return where it happens."""
    import asyncio
    import threading

    pool = Mempool.attach(name)

    def sleep_and_stamp() -> None:
        h = pool.alloc(GFP_KERNEL)
        results.put(time.perf_counter_ns())
        pool.free(h)

    for _ in range(n):
        go.get()
        t = threading.Thread(target=sleep_and_stamp)
        t.start()
        t.join()

    def kept() -> None:
        for _ in range(n):
            go.get()
            sleep_and_stamp()

    t = threading.Thread(target=kept)
    t.start()
    t.join()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for _ in range(n):
            await loop.run_in_executor(None, go.get)
            h = await pool.alloc_async(GFP_KERNEL)
            results.put(time.perf_counter_ns())
            pool.free(h)

    asyncio.run(main())


def bench_asyncwake(reps: int) -> dict[str, Any]:
    """From a free in one process to the return of a sleeping alloc in
    another: alloc() in a fresh thread, in a kept thread, then await
    alloc_async(), in one run."""
    n = 25 * reps
    pool = Mempool.create(f"bench-asyncwake-{TAG}", min_nr=1, slot_size=16, capacity=1)
    go, results = CTX.Queue(), CTX.Queue()
    out: dict[str, list[float]] = {kind: [] for kind in ASYNCWAKE_KINDS}
    try:
        with Kids() as kids:
            kids.start(_asyncwake_child, pool.name, n, go, results)
            h = pool.alloc()
            for kind in ASYNCWAKE_KINDS:
                for _ in range(n):
                    latency, h = _wake_a_sleeper(pool, h, go, results)
                    out[kind].append(latency)
            pool.free(h)
    finally:
        go.close()
        results.close()
        pool.destroy(force=True)
    med = {kind: statistics.median(v) for kind, v in out.items()}
    return {
        **{f"{kind}_median_us": round(m, 1) for kind, m in med.items()},
        "async_p99_us": round(percentile(sorted(out["async"]), 0.99), 1),
        "async_vs_fresh_thread": ratio(med["async"], med["fresh_thread"]),
        "async_vs_kept_thread": ratio(med["async"], med["kept_thread"]),
        "samples": n,
    }


def _pingpong_child(ping_name: str, pong_name: str, n: int, stamp: Any) -> None:
    ping, pong = posix_ipc.Semaphore(ping_name), posix_ipc.Semaphore(pong_name)
    acquire, release, now = ping.acquire, pong.release, time.perf_counter_ns
    for _ in range(n):
        acquire(WAIT_S)
        stamp.value = now()
        release()


def bench_floor(reps: int) -> dict[str, Any]:
    """The wake-up's floor: two bare posix_ipc semaphores between two
    processes. A round trip (post, the other wakes and posts back, wake)
    back to back; then one wake-up timed as the wake-up section times its
    own (the child asleep on the semaphore, from the post to its return).
    The wake-up section's median (run now if it was not) against both."""
    n = 100 * reps
    warm = 50
    wakeup = RESULTS.get("wakeup")
    if not isinstance(wakeup, dict) or "median_us" not in wakeup:
        wakeup = bench_wakeup(reps)
    names = (f"/bench-ping-{TAG}", f"/bench-pong-{TAG}")
    ping = posix_ipc.Semaphore(names[0], posix_ipc.O_CREX, initial_value=0)
    pong = posix_ipc.Semaphore(names[1], posix_ipc.O_CREX, initial_value=0)
    stamp = CTX.RawValue("q", 0)
    try:
        with Kids() as kids:
            kids.start(_pingpong_child, *names, warm + 2 * n, stamp)
            round_trips, one_way = [], []
            for i in range(warm + n):
                t0 = time.perf_counter_ns()
                ping.release()
                pong.acquire(WAIT_S)
                if i >= warm:
                    round_trips.append((time.perf_counter_ns() - t0) / 1e3)
            for _ in range(n):
                spin = time.perf_counter_ns() + 1_000_000
                while time.perf_counter_ns() < spin:  # the child is asleep on the semaphore by now; we
                    pass  # spin meanwhile, as the wake-up section's parent polls for its sleeper
                t0 = time.perf_counter_ns()
                ping.release()
                pong.acquire(WAIT_S)
                one_way.append((stamp.value - t0) / 1e3)
    finally:
        for sem, name in zip((ping, pong), names, strict=True):
            sem.close()
            posix_ipc.unlink_semaphore(name)
    round_trips.sort()
    one_way.sort()
    rt, ow = statistics.median(round_trips), statistics.median(one_way)
    return {
        "round_trip_median_us": round(rt, 1),
        "round_trip_p99_us": round(percentile(round_trips, 0.99), 1),
        "one_wakeup_median_us": round(ow, 1),
        "one_wakeup_p99_us": round(percentile(one_way, 0.99), 1),
        "samples": n,
        "wakeup_median_us": wakeup["median_us"],
        "wakeup_vs_floor": ratio(wakeup["median_us"], rt),
        "wakeup_vs_one_wakeup": ratio(wakeup["median_us"], ow),
    }


def bench_bulk(reps: int) -> dict[str, Any]:
    pool = Mempool.create(f"bench-bulk-{TAG}", min_nr=16, slot_size=64, capacity=1_000_000)
    batch = 100_000
    try:
        best_alloc = best_free = float("inf")
        for _ in range(max(3, reps)):
            t0 = time.perf_counter()
            hs = pool.alloc_bulk(batch, GFP_ATOMIC)
            t1 = time.perf_counter()
            pool.free_bulk(hs)
            t2 = time.perf_counter()
            best_alloc, best_free = min(best_alloc, t1 - t0), min(best_free, t2 - t1)
    finally:
        pool.destroy(force=True)
    return {
        "batch": batch,
        "alloc_bulk_M_per_s": round(batch / best_alloc / 1e6, 1),
        "free_bulk_M_per_s": round(batch / best_free / 1e6, 1),
    }


def bench_churn(reps: int) -> dict[str, Any]:
    """alloc_bulk and free_bulk of 10,000 from a free list in random order:
    random single allocs and frees first, then before every timed pair the
    previous batch freed in a new random order (not timed)."""
    capacity, batch = 200_000, 10_000
    rng = np.random.default_rng(10)
    pool = Mempool.create(f"bench-churn-{TAG}", min_nr=16, slot_size=64, capacity=capacity)
    try:
        held = pool.alloc_bulk(capacity // 2, GFP_ATOMIC)
        assert held is not None
        pool.free_bulk(rng.permutation(held))
        held_list: list[int] = []
        ops = 20_000 * reps // 4
        for coin, pick in zip(rng.random(ops).tolist(), rng.integers(0, 1 << 30, ops).tolist(), strict=True):
            if coin < 0.5 or not held_list:  # a random walk of single allocs and frees
                held_list.append(pool.alloc(GFP_ATOMIC))
            else:
                i = pick % len(held_list)
                held_list[i], held_list[-1] = held_list[-1], held_list[i]
                pool.free(held_list.pop())
        pool.free_bulk(held_list)
        best_alloc = best_free = float("inf")
        for _ in range(max(5, reps)):
            t0 = time.perf_counter()
            hs = pool.alloc_bulk(batch, GFP_ATOMIC)
            t1 = time.perf_counter()
            if hs is None or len(hs) != batch:
                raise RuntimeError(f"alloc_bulk({batch}) gave {None if hs is None else len(hs)} elements")
            shuffled = rng.permutation(hs)
            t2 = time.perf_counter()
            pool.free_bulk(shuffled)
            t3 = time.perf_counter()
            best_alloc, best_free = min(best_alloc, t1 - t0), min(best_free, t3 - t2)
        s = pool.stats()
        if s.in_use or s.alloc_failed:
            raise RuntimeError(f"{s.in_use} elements still held, {s.alloc_failed} allocations failed")
    finally:
        pool.destroy(force=True)
    return {
        "batch": batch,
        "capacity": capacity,
        "churn_ops": ops,
        "alloc_bulk_M_per_s": round(batch / best_alloc / 1e6, 1),
        "free_bulk_M_per_s": round(batch / best_free / 1e6, 1),
    }


def bench_views(reps: int) -> dict[str, Any]:
    """Per-call cost of the element views against one alloc+free pair
    (arena path), timed in turns."""
    n = 20_000 * reps // 4
    pool = Mempool.create(f"bench-views-{TAG}", min_nr=16, slot_size=4096, capacity=1024)
    try:
        h = pool.alloc(GFP_ATOMIC)
        buffer, ndarray, alloc, free, f32 = pool.buffer, pool.ndarray, pool.alloc, pool.free, np.float32
        if len(buffer(h)) != 4096 or ndarray(h).nbytes != 4096 or ndarray(h, f32, (32, 32)).shape != (32, 32):
            raise RuntimeError("the views are not of the element")

        def pairs(k: int) -> None:
            for _ in range(k):
                free(alloc(GFP_ATOMIC))

        def buffers(k: int) -> None:
            for _ in range(k):
                buffer(h)

        def arrays(k: int) -> None:
            for _ in range(k):
                ndarray(h)

        def typed(k: int) -> None:
            for _ in range(k):
                ndarray(h, f32, (32, 32))

        us = interleaved({"pair": pairs, "buffer": buffers, "ndarray": arrays, "typed": typed}, n)
        pool.free(h)
        s = pool.stats()
        if s.alloc_arena < n or s.in_use:
            raise RuntimeError(f"{s.alloc_arena} arena allocations for {n} pairs, {s.in_use} still held")
    finally:
        pool.destroy(force=True)
    return {
        "pair_us": round(us["pair"], 3),
        "buffer_us": round(us["buffer"], 3),
        "ndarray_us": round(us["ndarray"], 3),
        "ndarray_f32_32x32_us": round(us["typed"], 3),
        "buffer_vs_pair": ratio(us["buffer"], us["pair"]),
        "ndarray_vs_pair": ratio(us["ndarray"], us["pair"]),
        "ndarray_f32_32x32_vs_pair": ratio(us["typed"], us["pair"]),
    }


def bench_inspect(reps: int) -> dict[str, Any]:
    from shmpool import _inspect, cli

    pool = Mempool.create(f"bench-inspect-{TAG}", min_nr=1000, slot_size=64, capacity=1_000_000)
    try:
        held = pool.alloc_bulk(300_000, GFP_ATOMIC)

        def best(fn: Callable[[], object]) -> float:
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            return round(min(times), 3)

        out = {
            "slots": 1_000_000,
            "list_s": best(cli.list_pools),
            "show_s": best(lambda: _inspect.describe(_inspect.take_copy(pool.name, 0.25))),
            "check_s": best(lambda: _inspect.check(_inspect.take_copy(pool.name, 0.25))),
        }
        pool.free_bulk(held)
    finally:
        pool.destroy(force=True)
    return out


def bench_scale(reps: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    tag = TAG
    n = 20_000 * reps // 4
    for capacity in (1_000, 100_000, 1_000_000):
        t0 = time.perf_counter()
        pool = Mempool.create(f"bench-scale-{tag}", min_nr=16, slot_size=64, capacity=capacity)
        created = time.perf_counter() - t0
        try:
            def pairs(k: int, alloc: Callable[..., Any] = pool.alloc, free: Callable[..., Any] = pool.free) -> None:
                for _ in range(k):
                    free(alloc(GFP_ATOMIC))

            out[f"pair_us_{capacity}"] = round(per_op(pairs, n, rounds=3), 3)
            if capacity == 1_000_000:
                out["create_1M_s"] = round(created, 3)
                attach = []
                for _ in range(5):
                    t0 = time.perf_counter()
                    Mempool.attach(pool.name).close()
                    attach.append(time.perf_counter() - t0)
                out["attach_1M_ms"] = round(min(attach) * 1e3, 2)
                geo = Geometry.of(64, capacity)
                out["metadata_bytes_per_slot"] = (geo.off_procs - geo.off_words) / capacity
                out["fixed_header_bytes"] = geo.off_words + (geo.off_slots - geo.off_procs)
        finally:
            pool.destroy(force=True)
    out["pair_1M_vs_1K"] = round(out["pair_us_1000000"] / out["pair_us_1000"], 2)
    return out

HOLD_LOCK = """
import sys, shmpool, shmpool.testing
pool = shmpool.Mempool.attach(sys.argv[1])
with shmpool.testing.hold_lock(pool):  # the lock, its owner recorded by the CAS that took it
    print("ready", flush=True)
    sys.stdin.read()
"""


def bench_recovery(reps: int) -> dict[str, Any]:
    name = f"bench-recovery-{TAG}"
    out: dict[str, Any] = {}
    with Mempool.create(name, min_nr=1, slot_size=16, capacity=4) as pool:
        try:
            times = []
            for _ in range(reps):
                child = subprocess.Popen(
                    [sys.executable, "-c", HOLD_LOCK, name], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                )
                assert child.stdout is not None and child.stdout.readline().strip() == "ready"
                t0 = time.perf_counter()
                child.send_signal(signal.SIGKILL)
                pool.stats()  # takes the lock: blocks until recovered
                times.append(time.perf_counter() - t0)
                child.wait()
                child.stdin.close()  # type: ignore[union-attr]
                child.stdout.close()
            out["killed_holder_median_ms"] = round(statistics.median(times) * 1e3, 1)
            out["killed_holder_max_ms"] = round(max(times) * 1e3, 1)
            out["recoveries"] = pool.stats().lock_recoveries
        finally:
            pool.destroy(force=True)
    return out


#: Every section's figures so far in this run (a section may use another's).
RESULTS: dict[str, Any] = {}

def _byref_receiver(channel: Any, n: int, done: Any) -> None:
    """Take n arrays from a multiprocessing queue and drop each (an owning
    array's element goes back to the pool as it goes)."""
    try:
        for _ in range(n):
            a = channel.get(timeout=WAIT_S)
            del a
        done.put(("done", "receiver", None))
    except BaseException:
        done.put(("error", "byref receiver", traceback.format_exc()))


def bench_byref(reps: int) -> dict[str, Any]:
    """Arrays through a multiprocessing.Queue (bounded at 16), as users send
    them: pool-backed owning arrays (alloc_array) go by reference, so 1 MiB
    should cost what 64 bytes do; plain arrays are pickled and copied."""
    n, rounds = (200, 1) if reps < 10 else (1000, 3)
    pool = Mempool.create(f"bench-byref-{TAG}", min_nr=2, slot_size=1 << 20, capacity=24)
    makers: dict[str, Callable[[], Any]] = {
        "pool_64B": lambda: pool.alloc_array(64, np.uint8),
        "pool_1MiB": lambda: pool.alloc_array(1 << 20, np.uint8),
        "plain_64B": lambda: np.zeros(64, np.uint8),
        "plain_1MiB": lambda: np.zeros(1 << 20, np.uint8),
    }
    per_msg: dict[str, list[float]] = {}
    try:
        for _ in range(rounds):
            for kind, make in makers.items():
                channel, done = CTX.Queue(16), CTX.Queue()
                with Kids() as kids:
                    kids.start(_byref_receiver, channel, n, done)
                    t0 = time.perf_counter()
                    for _ in range(n):
                        channel.put(make())
                    collect(done, "done", 1, WAIT_S * 2)
                    per_msg.setdefault(kind, []).append((time.perf_counter() - t0) / n * 1e6)
                channel.close()
                done.close()
        s = pool.stats()
        if s.in_use or s.alloc_arena + s.alloc_reserve < 2 * n * rounds:
            raise RuntimeError(f"byref: {s.in_use} elements left held, {s.alloc_arena + s.alloc_reserve} allocated")
    finally:
        pool.destroy(force=True)
    med = {k: statistics.median(v) for k, v in per_msg.items()}
    out: dict[str, Any] = {"messages": n, "rounds": rounds}
    for kind in makers:
        out[f"{kind}_us_per_msg"] = round(med[kind], 2)
        out[f"{kind}_runs_us"] = [round(x, 2) for x in per_msg[kind]]
    out["pool_1MiB_vs_pool_64B"] = ratio(med["pool_1MiB"], med["pool_64B"])
    out["plain_1MiB_vs_pool_1MiB"] = ratio(med["plain_1MiB"], med["pool_1MiB"])
    out["pool_64B_vs_plain_64B"] = ratio(med["pool_64B"], med["plain_64B"])
    return out


SECTIONS: dict[str, Callable[[int], dict[str, Any]]] = {
    "pipeline": bench_pipeline,
    "fanout": bench_fanout,
    "byref": bench_byref,
    "pairs": bench_pairs,
    "views": bench_views,
    "procs": bench_procs,
    "reserve2": bench_reserve2,
    "bulk": bench_bulk,
    "churn": bench_churn,
    "wakeup": bench_wakeup,
    "asyncwake": bench_asyncwake,
    "floor": bench_floor,
    "scale": bench_scale,
    "inspect": bench_inspect,
    "recovery": bench_recovery,
    "dask": lambda reps: bench_dask(reps, TAG),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sections", nargs="*", choices=[*SECTIONS, []], help="sections to run (default: all)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions: checks that it runs")
    args = parser.parse_args(argv)
    reps = 4 if args.quick else 20
    results: dict[str, Any] = {
        "machine": {
            "python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform(), "tag": TAG,
        },
    }
    failed = []
    for section in args.sections or SECTIONS:
        try:
            results[section] = RESULTS[section] = SECTIONS[section](reps)
        except Exception as exc:  # the others still run; the run fails
            traceback.print_exc()
            results[section] = {"error": f"{type(exc).__name__}: {exc}"}
            failed.append(section)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        m = results["machine"]
        print(f"shmpool bench on {m['platform']}, Python {m['python']}, {m['cpus']} CPUs")
        for section, figures in results.items():
            if section == "machine":
                continue
            print(f"\n{section}")
            for key, value in figures.items():
                print(f"  {key:<28} {value}")
    if failed:
        print(f"bench: FAILED: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # finally blocks clean up on SIGTERM too
    sys.exit(main())
