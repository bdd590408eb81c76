"""shmpool-inspect, run as the installed console script against live pools."""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing as mp
import os
import pathlib
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import children
import numpy as np
import psutil
import pytest
from helpers import run_python, wait_for

from shmpool import GFP_ATOMIC, InvalidHandleError, Mempool, PoolDestroyedError, cli
from shmpool._layout import (
    COUNTERS,
    H_CURR_NR,
    H_NR_WAITERS,
    H_VERSION,
    INDEX_MASK,
    LAYOUT_VERSION,
    MAGIC,
    OWNER_MASK,
    OWNER_SHIFT,
    P_PID,
    P_START,
    PROC_WORDS,
    Q_COUNT,
    Q_GETTERS,
    Q_PUTTERS,
    QUEUE_WORDS,
    ST_CACHED,
    ST_HELD,
    ST_PARKED,
    ST_QUEUED,
    STATE_MASK,
)
from shmpool.testing import header_word_offset, hold_lock, registry_entry, segment_path, views

INSPECT = os.path.join(os.path.dirname(sys.executable), "shmpool-inspect")
ATTACH = "import sys, shmpool\npool = shmpool.Mempool.attach(sys.argv[1])\n"
#: Holds the pool lock (a recorded holder) until its stdin ends, or it is killed.
LOCKER = ATTACH + (
    "from shmpool.testing import hold_lock\n"
    "with hold_lock(pool):\n"
    "    print('ready', flush=True)\n"
    "    sys.stdin.read()\n"
)
#: Views of the pool's segment: what a damage function (``harm``) writes into.
Views = Any
#: Keys of the JSON documents (shmpool/cli.py): tested so that none is lost.
POOL_KEYS = {
    "name", "layout_version", "path", "status", "consistent", "geometry", "min_nr", "curr_nr", "arena_free",
    "arena_shared", "arena_cached", "in_use", "parked", "nr_waiters", "fail_rate", "seed", "rng", "poison",
    "counters", "reserve_stack", "holders", "slot_counts", "slot_map", "slot_map_group", "lock", "creator", "queued", "queues",
    "schema", "reserve_low_water", "longest_sleep", "total_sleep", "attached", "sizing", "oldest_held", "topics",
    "published",
}
LIST_KEYS = {"schema", "name", "slot_size", "capacity", "min_nr", "curr_nr", "in_use", "nr_waiters", "creator_pid",
             "creator_alive", "consistent", "queued", "stale", "damaged"}
CHECK_KEYS = {"schema", "name", "consistent", "ok", "findings"}
LOCK_KEYS = {"held", "pid", "alive", "held_for_s", "waited_s", "error", "entry", "epoch", "seq", "waiters",
             "held_throughout"}
HOLDER_KEYS = {"pid", "name", "command", "alive", "held", "cached", "sleeping", "entry", "epoch", "queue_sleeping",
               "oldest_age"}
QUEUE_KEYS = {"name", "index", "depth", "count", "waiters", "getters", "putters", "puts", "gets"}
SLOT_COUNT_KEYS = {"reserve", "arena", "cached", "queued", "shared", "held", "parked", "held_dead", "invalid"}
NO_PID = (1 << 22) + 12345  # beyond PID_MAX_LIMIT: no process has it, in any pid namespace


def inspect(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([INSPECT, *args], capture_output=True, text=True, timeout=timeout)


def shown(name: str, *args: str) -> dict[str, Any]:
    out = inspect(name, "--json", *args)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def raw(name: str) -> bytes:
    with open(segment_path(name), "rb") as f:
        return f.read()


def pool_files(name: str) -> list[str]:
    """What /dev/shm holds of pool ``name``: its segment, asyncio FIFOs,
    anything else named after it."""
    return sorted(e for e in os.listdir("/dev/shm") if f"shmpool.{name}" in e)


def holder(popen: Callable[..., subprocess.Popen[str]], name: str, n: int) -> subprocess.Popen[str]:
    """A separate interpreter holding n elements; returns it once it does."""
    p = popen(ATTACH + f"hs = [pool.alloc() for _ in range({n})]\nprint('ready', flush=True)\nsys.stdin.read()", name)
    assert p.stdout.readline().strip() == "ready"
    return p


#: A separate interpreter that puts N elements into queue Q (created with
#: depth D if need be) and then holds one more: prints 'ready', the queued
#: handles and the held one.
PUTTER = ATTACH + (
    "q = pool.queue(sys.argv[2], depth=int(sys.argv[3]))\n"
    "hs = [pool.alloc() for _ in range(int(sys.argv[4]))]\n"
    "q.put_many(hs)\n"
    "held = pool.alloc()\n"
    "print('ready', *hs, held, flush=True)\n"
    "sys.stdin.read()"
)
#: A separate interpreter that allocates, prints the handle, blocks in put
#: on queue Q (no timeout) until there is room, then prints 'put'.
BLOCKED_PUTTER = ATTACH + (
    "q = pool.queue(sys.argv[2])\nh = pool.alloc()\nprint(h, flush=True)\nq.put(h)\nprint('put', flush=True)")
#: A separate interpreter that blocks in get on queue Q (no timeout), then
#: prints what it got.
GETTER = ATTACH + "q = pool.queue(sys.argv[2])\nprint('ready', flush=True)\nprint(q.get(), flush=True)"


def putter(popen: Callable[..., subprocess.Popen[str]], name: str, queue: str, depth: int,
           n: int) -> tuple[subprocess.Popen[str], list[int], int]:
    """A separate interpreter that put n elements into ``queue`` and holds
    one more: (it, the queued handles, the held handle), once it has."""
    p = popen(PUTTER, name, queue, str(depth), str(n))
    word, *handles = p.stdout.readline().split()
    assert word == "ready", p.stderr.read()
    return p, [int(h) for h in handles[:-1]], int(handles[-1])


def queue_lines(text: str) -> dict[str, list[str]]:
    """The rows of the text view's queues section, by queue name."""
    lines = text.splitlines()
    start = lines.index(next(line for line in lines if line.startswith("queues (")))
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("  "):
            break
        rows[line.split()[0]] = line.split()[1:]
    return rows


def summary_rows(text: str) -> dict[str, str]:
    """The '  label      text' rows at the top of the text view."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("  ") and len(line) > 13 and line[12] == " " and line[2] != " ":
            rows[line[2:12].strip()] = line[13:]
    return rows


def _readline_within(p: subprocess.Popen[str], deadline: float) -> str:
    assert time.monotonic() < deadline, "no frame in time"
    line = p.stdout.readline()
    assert line, p.stderr.read()
    return line


def as_in_a_terminal() -> None:
    """In the child before exec: SIGINT as a terminal's foreground command
    has it (a test run from a non-interactive shell's background job would
    otherwise hand it on ignored, and no Ctrl-C could reach the CLI)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@contextlib.contextmanager
def watching(*args: str) -> Iterator[subprocess.Popen[str]]:
    p = subprocess.Popen([INSPECT, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=as_in_a_terminal)
    try:
        yield p
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()
        p.stdout.close()
        p.stderr.close()


def process_state(pid: int) -> str:
    """What /proc says of a process that does not end: its signal masks,
    and each thread's state and kernel wait channel (for a failure's
    message)."""
    out = []
    try:
        status = pathlib.Path(f"/proc/{pid}/status").read_text().splitlines()
        out += [line for line in status if line.startswith(("State", "Threads", "SigPnd", "ShdPnd", "SigBlk",
                                                             "SigIgn", "SigCgt"))]
        for task in sorted(pathlib.Path(f"/proc/{pid}/task").iterdir()):
            stat = (task / "stat").read_text().rpartition(")")[2].split()
            out.append(f"task {task.name}: {stat[0]} wchan={(task / 'wchan').read_text()} "
                       f"syscall={(task / 'syscall').read_text().split()[0]}")
    except OSError as exc:
        out.append(f"({exc})")
    return "; ".join(out)


def lock_holder(popen: Callable[..., subprocess.Popen[str]], name: str) -> subprocess.Popen[str]:
    """A separate interpreter that holds the pool lock (recorded as its own,
    in C) until it is killed; returns it once it does."""
    p = popen(LOCKER, name)
    assert p.stdout.readline().strip() == "ready"
    return p


def dead(p: subprocess.Popen[str]) -> subprocess.Popen[str]:
    p.kill()
    p.wait(timeout=10)
    return p


def entry_of(d: dict[str, Any], pid: int) -> dict[str, Any]:
    return next(h for h in d["holders"] if h["pid"] == pid)


@contextlib.contextmanager
def damaged(pool: Mempool, harm: Callable[[Views], None]) -> Iterator[None]:
    """Damage the pool on purpose (``harm`` writes into its header, slot
    words, stacks, registry or slots, under the lock); every byte but the
    lock's own words is put back after."""
    v = views(pool)
    lock_words = [header_word_offset(w)
                  for w in ("H_LOCK_OWNER", "H_LOCK_SINCE_NS", "H_LOCK_WAITERS", "H_LOCK_SEQ", "H_LOCK_WAKING")]
    with hold_lock(pool):
        saved = bytes(v.mm[:])
        harm(v)
    try:
        yield
    finally:
        with hold_lock(pool):
            restored = bytearray(saved)
            for at in lock_words:  # these say who holds the lock now
                restored[at : at + 8] = v.mm[at : at + 8]
            v.mm[:] = bytes(restored)


@pytest.fixture
def pool(name: str) -> Iterator[Mempool]:
    p = Mempool.create(name, min_nr=3, slot_size=64, capacity=16, fail_rate=0.25, seed=7)
    yield p
    if not p.closed:
        p.destroy(force=True)


# ----------------------------------------------------------------------
# What it shows agrees with the pool


@pytest.mark.timeout(60)
def test_json_agrees_with_stats_and_attributes_holders(pool: Mempool, name: str, popen) -> None:
    mine = [pool.alloc(GFP_ATOMIC) for _ in range(2)]
    four, one = holder(popen, name, 4), holder(popen, name, 1)
    d = shown(name)
    s = pool.stats()
    assert set(d) == POOL_KEYS and set(d["lock"]) == LOCK_KEYS and set(d["slot_counts"]) == SLOT_COUNT_KEYS
    assert all(set(h) == HOLDER_KEYS for h in d["holders"]) and d["queues"] == [] and d["queued"] == 0
    for key in ("min_nr", "curr_nr", "arena_free", "in_use", "queued", "nr_waiters", "fail_rate", "seed", "poison",
                "reserve_low_water", "longest_sleep", "total_sleep", "attached"):
        assert d[key] == getattr(s, key), key
    assert d["counters"] == {k: getattr(s, k) for k in d["counters"]} and d["rng"] == pool.rng == "splitmix64"
    assert d["geometry"] == {"slot_size": 64, "capacity": 16, "stride": 64, "total_bytes": len(raw(name))}
    assert d["consistent"] is True and d["lock"]["held"] is False and d["status"] == "live"
    assert d["lock"]["pid"] is None and d["lock"]["error"] is None and d["lock"]["held_throughout"] is False
    assert d["layout_version"] == LAYOUT_VERSION and d["creator"] == {**d["creator"], "pid": os.getpid(), "alive": True}
    holders = {h["pid"]: h for h in d["holders"]}
    assert holders[os.getpid()]["held"] == 2 and holders[os.getpid()]["alive"]
    assert holders[four.pid]["held"] == 4 and holders[one.pid]["held"] == 1
    assert holders[four.pid]["name"] == psutil.Process(four.pid).name() and holders[four.pid]["alive"]
    assert holders[os.getpid()]["entry"] == registry_entry(pool) and holders[os.getpid()]["epoch"] > 0
    assert len({h["entry"] for h in d["holders"]}) == 3
    assert d["arena_cached"] == sum(h["cached"] for h in d["holders"])
    counts = d["slot_counts"]
    assert counts["held"] == s.in_use == 7 and counts["reserve"] == s.curr_nr and counts["held_dead"] == 0
    assert d["slot_map"].count("H") == 7 and "X" not in d["slot_map"] and d["slot_map_group"] == 1
    assert d["reserve_stack"] == [int(x) for x in np.frombuffer(views(pool).stack, np.uint32)[: s.curr_nr][::-1]]
    for h in mine:
        pool.free(h)


@pytest.mark.timeout(60)
def test_text_shows_the_same_numbers_in_80_columns(pool: Mempool, name: str, popen) -> None:
    held = [pool.alloc(GFP_ATOMIC) for _ in range(3)]
    child = holder(popen, name, 5)
    out = inspect(name)
    assert out.returncode == 0 and out.stderr == ""
    s = pool.stats()
    rows = summary_rows(out.stdout)
    assert rows["reserve"].split()[1] == f"{s.curr_nr}/{s.min_nr}"
    assert rows["in use"].split()[0] == str(s.in_use)
    assert rows["arena"].split()[0] == str(s.arena_free)
    assert rows["waiters"] == f"{s.nr_waiters} sleeping" and rows["lock"].startswith("free")  # (maybe after a wait)
    assert rows["faults"] == "fail_rate 0.25, seed 7 (splitmix64)" and rows["poison"] == "off"
    lines = out.stdout.splitlines()
    names = [counter for counter, _ in COUNTERS]
    counters = {line.split()[0]: int(line.split()[1]) for line in lines if line.split()[:1] in ([n] for n in names)}
    assert counters == {k: s.as_dict()[k] for k in names}
    row = next(line.split() for line in lines if line.split()[:1] == [str(child.pid)])
    assert row[1:5] == ["python", "-c", "alive", "5"]  # what it runs: python -c CODE
    assert row[-1] == str(entry_of(shown(name), child.pid)["entry"])
    assert max(len(line) for line in lines) <= 80
    for h in held:
        pool.free(h)


@pytest.mark.timeout(60)
def test_a_dead_holder_shows_as_dead_fails_the_check_and_reclaim_dead_takes_it_back(
    pool: Mempool, name: str, popen
) -> None:
    child = dead(holder(popen, name, 3))
    d = shown(name)
    row = entry_of(d, child.pid)
    assert row["alive"] is False and row["held"] == 3 and row["name"] == "" and row["epoch"] > 0
    assert d["slot_map"].count("X") == 3 and d["slot_counts"]["held_dead"] == 3
    text = inspect(name).stdout
    assert next(line.split() for line in text.splitlines() if line.split()[:1] == [str(child.pid)])[1:4] == [
        "-", "DEAD", "3"]
    assert "3 held by dead processes" in summary_rows(text)["in use"]
    check = inspect(name, "--check")  # issue 9: not "all checks pass"
    assert check.returncode == 1 and check.stderr == ""
    assert f"3 element(s) held by dead processes (3 held of entry {row['entry']} (pid {child.pid}))" in check.stdout
    assert f"run `shmpool-inspect --reclaim-dead {name}` (or pool.reclaim_dead())" in check.stdout
    assert json.loads(inspect(name, "--check", "--json").stdout)["ok"] is False
    out = inspect("--reclaim-dead", name)  # as the hint says it
    assert out.returncode == 0 and "reclaimed 3 element(s)" in out.stdout, out.stdout + out.stderr
    assert f"pid {child.pid} (dead): 3 held element(s)" in out.stdout
    assert f"(registry entry {row['entry']})" in out.stdout
    assert pool.stats().in_use == 0 and pool.stats().reclaimed == 3
    assert inspect(name, "--check").returncode == 0
    assert inspect(name, "--reclaim-dead").stdout.endswith(f"reclaimed 0 element(s) from dead processes in pool {name!r}\n")


@contextlib.contextmanager
def a_dead_sleeper(name: str, spawn) -> Iterator[tuple[Mempool, Any]]:
    """A pool whose only element this process holds, and a child that was
    killed while it slept in alloc (still counted in nr_waiters)."""
    pool = Mempool.create(name, min_nr=1, slot_size=8, capacity=1)
    try:
        h = pool.alloc(GFP_ATOMIC)  # the only element: the next alloc sleeps
        results = mp.get_context("spawn").Queue()  # kept: the child unpickles it
        child = spawn(children.sleeping_alloc, name, results)
        wait_for(lambda: pool.stats().nr_waiters == 1, what="the child to sleep")
        child.kill()
        child.join(10)
        yield pool, child
        pool.free(h)
    finally:
        pool.destroy(force=True)


@pytest.mark.timeout(60)
def test_a_dead_sleeper_fails_the_check_until_reclaimed(name: str, spawn) -> None:
    with a_dead_sleeper(name, spawn) as (_pool, child):
        d = shown(name)
        row = entry_of(d, child.pid)
        assert row["alive"] is False and row["sleeping"] == 1 and d["nr_waiters"] == 1
        check = inspect(name, "--check")
        assert check.returncode == 1, check.stdout
        assert (f"1 sleeping allocation(s) of dead processes still counted (1 sleeping of entry {row['entry']} "
                f"(pid {child.pid})): run `shmpool-inspect --reclaim-dead {name}`") in check.stdout
        out = inspect(name, "--reclaim-dead")
        assert out.returncode == 0 and f"pid {child.pid} (dead): 0 held element(s), 0 cached slot(s), 1 sleeping" in (
            out.stdout)
        assert "of dead processes" not in inspect(name, "--check").stdout
        assert all(h["pid"] != child.pid for h in shown(name)["holders"])


@pytest.mark.timeout(60)
def test_reclaiming_a_dead_sleeper_uncounts_it(name: str, spawn) -> None:
    with a_dead_sleeper(name, spawn) as (pool, _):
        pool.reclaim_dead()
        out = inspect(name, "--check")
        assert out.returncode == 0, out.stdout  # not "nr_waiters 1 is more than the 0 sleeping allocation(s) ..."
        assert pool.stats().nr_waiters == 0


@pytest.mark.timeout(60)
def test_liveness_is_the_registry_entrys_ofd_lock_not_the_pid(pool: Mempool, name: str, popen) -> None:
    """Pids may be another pid namespace's: a live holder whose recorded pid
    names nobody here is alive; a dead one whose pid (and start time) names
    a live process here is dead."""
    live, gone = holder(popen, name, 2), dead(holder(popen, name, 1))
    d = shown(name)
    live_entry, gone_entry = entry_of(d, live.pid)["entry"], entry_of(d, gone.pid)["entry"]
    me_pid, me_start = os.getpid(), int(views(pool).procs[registry_entry(pool) * PROC_WORDS + P_START])

    def swap_identities(v: Views) -> None:
        v.procs[live_entry * PROC_WORDS + P_PID] = NO_PID
        v.procs[gone_entry * PROC_WORDS + P_PID] = me_pid
        v.procs[gone_entry * PROC_WORDS + P_START] = me_start

    with damaged(pool, swap_identities):
        d = shown(name)
        rows = {h["entry"]: h for h in d["holders"]}
        assert rows[live_entry] == {**rows[live_entry], "pid": NO_PID, "alive": True, "held": 2, "name": ""}
        assert rows[gone_entry] == {**rows[gone_entry], "pid": me_pid, "alive": False, "held": 1, "name": ""}
        assert d["slot_counts"]["held"] == 2 and d["slot_counts"]["held_dead"] == 1
        check = inspect(name, "--check")
        assert check.returncode == 1 and f"1 held of entry {gone_entry} (pid {me_pid})" in check.stdout
        assert str(NO_PID) not in check.stdout


@pytest.mark.timeout(60)
def test_the_creator_gone_is_shown_as_gone(name: str) -> None:
    code = "import sys, shmpool\nshmpool.Mempool.create(sys.argv[1], min_nr=1, slot_size=8, capacity=4)"
    made = run_python(code, name)  # the creator exits without destroying it
    assert made.returncode == 0, made.stderr
    d = shown(name)
    assert d["creator"]["alive"] is False and d["creator"]["pid"] != os.getpid()
    assert "(gone)" in summary_rows(inspect(name).stdout)["creator"]
    mine = [p for p in json.loads(inspect("--json").stdout) if p["name"] == name]
    assert mine and mine[0]["creator_alive"] is False


@pytest.mark.timeout(60)
def test_sleepers_are_shown_and_a_waiter_count_below_them_is_damage(name: str, spawn) -> None:
    pool = Mempool.create(name, min_nr=1, slot_size=8, capacity=1)
    try:
        h = pool.alloc(GFP_ATOMIC)  # the only element: the next alloc sleeps
        results = mp.get_context("spawn").Queue()
        child = spawn(children.sleeping_alloc, name, results)
        wait_for(lambda: pool.stats().nr_waiters == 1, what="the child to sleep")
        d = shown(name)
        assert d["nr_waiters"] == 1 and {"pid": child.pid, "sleeping": 1}.items() <= next(
            x for x in d["holders"] if x["pid"] == child.pid).items()
        assert summary_rows(inspect(name).stdout)["waiters"] == "1 sleeping"
        assert inspect(name, "--check").returncode == 0  # a real sleeper is no damage

        def lose_the_waiter(v: Views) -> None:
            v.hdr[H_NR_WAITERS] = 0

        with damaged(pool, lose_the_waiter):
            out = inspect(name, "--check")
            assert out.returncode == 1
            assert "nr_waiters 0 is less than the 1 sleeping allocation(s) of live processes" in out.stdout
        pool.free(h)  # wakes the child
        assert results.get(timeout=20)[0] == "ok"
    finally:
        pool.destroy(force=True)


# ----------------------------------------------------------------------
# Queues (issue 10)


@pytest.mark.timeout(60)
def test_queued_elements_show_in_json_text_and_the_slot_map(pool: Mempool, name: str, popen) -> None:
    pool.set_fail_rate(0.0)  # every allocation below succeeds
    child, queued, held = putter(popen, name, "frames", 8, 3)
    frames = pool.queue("frames")
    mine = [pool.alloc(GFP_ATOMIC) for _ in range(3)]
    frames.put_many(mine[:2])  # 5 in frames, from two processes
    pool.queue("a-queue-name-longer-than-its-column", depth=4)  # empty
    frames.put(frames.get())  # a get and a put more: puts 6, gets 1
    queued = queued[1:] + mine[:2] + queued[:1]
    d = shown(name)
    s = pool.stats()
    assert s.queued == 5 and s.in_use == 2  # one held by the child, one by this process
    for key in ("curr_nr", "arena_free", "in_use", "queued", "nr_waiters"):
        assert d[key] == getattr(s, key), key
    assert d["curr_nr"] + d["arena_free"] + d["in_use"] + d["queued"] == 16
    assert all(set(q) == QUEUE_KEYS for q in d["queues"])
    assert d["queues"] == [
        {"name": "frames", "index": 0, "depth": 8, "count": 5, "waiters": 0, "getters": 0, "putters": 0, "puts": 6,
         "gets": 1},
        {"name": "a-queue-name-longer-than-its-column", "index": 1, "depth": 4, "count": 0, "waiters": 0,
         "getters": 0, "putters": 0, "puts": 0, "gets": 0},
    ]
    assert d["slot_counts"]["queued"] == 5 and d["slot_counts"]["held"] == 2 and d["slot_counts"]["held_dead"] == 0
    assert d["slot_map"].count("Q") == 5 and d["slot_map"].count("H") == 2
    assert [d["slot_map"][h & INDEX_MASK] for h in queued] == ["Q"] * 5
    assert d["slot_map"][held & INDEX_MASK] == "H" == d["slot_map"][mine[2] & INDEX_MASK]
    assert entry_of(d, child.pid)["held"] == 1 and entry_of(d, os.getpid())["held"] == 1  # queued: nobody's
    assert all(h["queue_sleeping"] == 0 for h in d["holders"])
    out = inspect(name)
    assert out.returncode == 0 and out.stderr == ""
    rows = summary_rows(out.stdout)
    assert rows["in use"] == "2" and rows["queued"] == "5 in 2 queue(s)" and rows["waiters"] == "0 sleeping"
    table = queue_lines(out.stdout)
    assert table["frames"] == ["[########----]", "5/8", "0", "6", "1"]
    assert "a-queue-name-longer-than-its-column" in table  # on a line of its own, the numbers below it
    assert next(line for line in out.stdout.splitlines() if line.startswith("slot map:")).count("Q queued") == 1
    assert max(len(line) for line in out.stdout.splitlines()) <= 80
    listing = next(p for p in json.loads(inspect("--json").stdout) if p["name"] == name)
    assert listing["queued"] == 5 and listing["in_use"] == 2
    ok = inspect(name, "--check")  # a healthy pool with queued elements
    assert ok.returncode == 0 and "all checks pass" in ok.stdout, ok.stdout
    for h in frames.get_many(5):
        pool.free(h)
    pool.free(mine[2])
    d = shown(name)
    assert d["queued"] == 0 and d["queues"][0]["count"] == 0 and d["queues"][0]["gets"] == 6
    assert "Q" not in d["slot_map"]
    child.kill()


@pytest.mark.timeout(60)
def test_queue_sleepers_are_shown_per_side_and_pass_the_check_alive(pool: Mempool, name: str, popen) -> None:
    _, queued, _ = putter(popen, name, "full", 2, 2)
    pool.queue("in", depth=4)
    getter = popen(GETTER, name, "in")
    assert getter.stdout.readline().strip() == "ready"
    wait_for(lambda: pool.stats().nr_waiters == 1, what="the getter to sleep")
    blocked = popen(BLOCKED_PUTTER, name, "full")  # the queue is full: it sleeps in put
    extra = int(blocked.stdout.readline())
    wait_for(lambda: pool.stats().nr_waiters == 2, what="the putter to sleep")
    d = shown(name)
    assert d["nr_waiters"] == 2
    assert [(q["name"], q["waiters"], q["getters"], q["putters"]) for q in d["queues"]] == [
        ("full", 1, 0, 1), ("in", 1, 1, 0)]
    assert entry_of(d, getter.pid)["queue_sleeping"] == 1 and entry_of(d, getter.pid)["sleeping"] == 0
    assert entry_of(d, blocked.pid)["queue_sleeping"] == 1 and entry_of(d, blocked.pid)["held"] == 1
    out = inspect(name)
    assert summary_rows(out.stdout)["waiters"] == "2 sleeping (0 in alloc, 2 on queues)"
    row = next(line.split() for line in out.stdout.splitlines() if line.split()[:1] == [str(getter.pid)])
    assert row[4:8] == ["0", "0", "0", "1"]  # held, cached, in alloc, on queues
    assert queue_lines(out.stdout)["in"][1:3] == ["0/4", "1"] and queue_lines(out.stdout)["full"][1:3] == ["2/2", "1"]
    check = inspect(name, "--check")  # 2 queued elements, two live sleepers: healthy
    assert check.returncode == 0, check.stdout
    pool.queue("in").put(pool.queue("full").get())  # makes room for the putter, feeds the getter
    assert int(getter.stdout.readline()) == queued[0]  # woken with it
    assert blocked.stdout.readline().strip() == "put" and blocked.wait(timeout=20) == 0
    assert getter.wait(timeout=20) == 0
    d = shown(name)
    assert d["nr_waiters"] == 0 and [q["count"] for q in d["queues"]] == [2, 0]
    assert pool.queue("full").get_many(2).tolist() == [queued[1], extra]


@pytest.mark.timeout(60)
def test_a_queued_element_whose_putter_died_is_no_finding(pool: Mempool, name: str, popen) -> None:
    child, queued, held = putter(popen, name, "frames", 8, 3)
    dead(child)
    d = shown(name)
    assert d["queued"] == 3 and d["slot_counts"]["queued"] == 3 and d["slot_counts"]["held_dead"] == 1
    assert [d["slot_map"][h & INDEX_MASK] for h in queued] == ["Q"] * 3 and d["slot_map"][held & INDEX_MASK] == "X"
    assert entry_of(d, child.pid)["held"] == 1  # its queued elements are the queue's
    check = json.loads(inspect(name, "--check", "--json").stdout)
    assert check["ok"] is False and len(check["findings"]) == 1, check["findings"]  # only the held one
    assert check["findings"][0].startswith("1 element(s) held by dead processes")
    out = inspect(name, "--reclaim-dead")
    assert out.returncode == 0 and "reclaimed 1 element(s)" in out.stdout, out.stdout
    ok = inspect(name, "--check")  # three elements put by a dead process, still in the queue
    assert ok.returncode == 0 and "all checks pass" in ok.stdout, ok.stdout
    d = shown(name)
    assert d["queues"][0]["count"] == 3 and d["slot_map"].count("Q") == 3 and "X" not in d["slot_map"]
    got = pool.queue("frames").get_many(3)
    assert got.tolist() == queued  # they come out, in order, to the receiver
    for h in got:
        pool.free(h)


@pytest.mark.timeout(60)
def test_a_dead_queue_sleeper_fails_the_check_until_reclaimed(pool: Mempool, name: str, popen) -> None:
    pool.queue("in", depth=4)
    getter = popen(GETTER, name, "in")
    assert getter.stdout.readline().strip() == "ready"
    wait_for(lambda: pool.stats().nr_waiters == 1, what="the getter to sleep")
    dead(getter)
    d = shown(name)
    row = entry_of(d, getter.pid)
    assert row["alive"] is False and row["queue_sleeping"] == 1 and d["queues"][0]["waiters"] == 1
    check = inspect(name, "--check")
    assert check.returncode == 1
    assert (f"1 queue sleeper(s) of dead processes still counted (1 asleep on queues of entry {row['entry']} "
            f"(pid {getter.pid})): run `shmpool-inspect --reclaim-dead {name}`") in check.stdout
    out = inspect(name, "--reclaim-dead")
    assert out.returncode == 0 and f"pid {getter.pid} (dead): 0 held element(s), 0 cached slot(s), 0 sleeping, " \
        "1 asleep on queues" in out.stdout, out.stdout
    assert inspect(name, "--check").returncode == 0
    assert pool.stats().nr_waiters == 0 and shown(name)["queues"][0]["waiters"] == 0


# ----------------------------------------------------------------------
# Parked frees, and the numbers stats() gives


@pytest.mark.timeout(60)
def test_a_free_parked_behind_a_live_lock_holder_shows_until_it_is_completed(name: str, popen) -> None:
    pool = Mempool.create(name, min_nr=2, slot_size=64, capacity=4)
    try:
        held = [pool.alloc(GFP_ATOMIC) for _ in range(4)]  # the reserve below min_nr: a free takes the lock
        locker = lock_holder(popen, name)
        pool.free(held[0])  # the lock does not come: parked, for the next holder to complete
        d = shown(name, "--lock-timeout", "0")
        idx = held[0] & INDEX_MASK
        assert d["parked"] == 1 and d["slot_counts"]["parked"] == 1 and d["in_use"] == 4
        assert d["slot_map"][idx] == "P" and d["slot_map"].count("H") == 3
        assert entry_of(d, os.getpid())["held"] == 3
        text = inspect(name, "--lock-timeout", "0").stdout
        assert summary_rows(text)["in use"] == "4 (1 parked)"
        assert "P parked" in next(line for line in text.splitlines() if line.startswith("slot map:"))
        with pytest.raises(InvalidHandleError):
            pool.free(held[0])  # no longer held: a second free is refused
        locker.stdin.close()  # it lets go, and completes the parked free first
        assert locker.wait(timeout=20) == 0
        d, s = shown(name), pool.stats()
        assert d["parked"] == 0 and "P" not in d["slot_map"] and d["slot_map"][idx] == "R"
        assert (d["in_use"], d["curr_nr"]) == (s.in_use, s.curr_nr) == (3, 1)
        assert summary_rows(inspect(name).stdout)["in use"] == "3"
        for h in held[1:]:
            pool.free(h)
    finally:
        pool.destroy(force=True)


@pytest.mark.timeout(60)
def test_a_parked_free_whose_hint_was_lost_fails_the_check_until_reclaimed(name: str) -> None:
    pool = Mempool.create(name, min_nr=2, slot_size=64, capacity=4)
    try:
        h = pool.alloc(GFP_ATOMIC)
        idx = h & INDEX_MASK
        with hold_lock(pool):  # as a freeing process killed between parking and raising H_PARKED leaves it
            v = views(pool)
            v.words[idx] = v.words[idx] & ~STATE_MASK | ST_PARKED
        d = shown(name)
        assert d["slot_map"][idx] == "P" and d["slot_counts"]["parked"] == 1 and d["in_use"] == 1
        assert d["parked"] == 0  # as stats() counts them: by the hint
        check = inspect(name, "--check")
        assert check.returncode == 1
        assert (f"1 parked element(s) (freed while the lock was busy), first slot {idx}, but the hint H_PARKED is 0"
                in check.stdout and f"run `shmpool-inspect --reclaim-dead {name}`" in check.stdout), check.stdout
        out = inspect(name, "--reclaim-dead")
        assert out.returncode == 0, out.stderr
        assert inspect(name, "--check").returncode == 0
        d = shown(name)
        assert "P" not in d["slot_map"] and d["in_use"] == pool.stats().in_use == 0
        with pytest.raises(InvalidHandleError):
            pool.free(h)  # its free was completed
    finally:
        pool.destroy(force=True)


def _absurd_queue(v: Views) -> None:
    v.queues[0 * QUEUE_WORDS + Q_COUNT] = 1 << 40
    v.queues[0 * QUEUE_WORDS + Q_PUTTERS] = 1 << 30  # beyond the core's bound on sleepers: damage, not sleepers
    v.queues[0 * QUEUE_WORDS + Q_GETTERS] = 2


@pytest.mark.timeout(60)
def test_the_numbers_are_stats_own_even_for_a_damaged_pool(pool: Mempool, name: str) -> None:
    """One derivation: the inspector's numbers are those stats() gives,
    with the same clamps, whatever the segment says."""
    pool.queue("q", depth=4).put(pool.alloc(GFP_ATOMIC))
    keys = ("min_nr", "curr_nr", "arena_free", "in_use", "queued", "nr_waiters")
    with damaged(pool, _absurd_queue):
        d, s = shown(name), pool.stats()
        assert {k: d[k] for k in keys} == {k: getattr(s, k) for k in keys}
        assert d["queued"] == 16 and d["in_use"] == 0 and d["nr_waiters"] == 2  # clamped, and counted out
        assert summary_rows(inspect(name).stdout)["waiters"] == "2 sleeping (0 in alloc, 2 on queues)"
        listed = next(p for p in json.loads(inspect("--json").stdout) if p["name"] == name)
        assert listed["damaged"] is True and (listed["queued"], listed["in_use"]) == (d["queued"], d["in_use"])
    d, s = shown(name), pool.stats()
    assert {k: d[k] for k in keys} == {k: getattr(s, k) for k in keys} and d["queued"] == 1


# ----------------------------------------------------------------------
# Read-only, and never hangs


@pytest.mark.timeout(60)
def test_inspecting_never_changes_the_pool(name: str, popen) -> None:
    pool = Mempool.create(name, min_nr=3, slot_size=64, capacity=16, poison=True)
    try:
        h = pool.alloc(GFP_ATOMIC)
        dead(holder(popen, name, 2))
        before, files_before = raw(name), pool_files(name)
        for args, status in (([name], 0), ([name, "--json"], 0), ([name, "--check"], 1), ([name, "--all"], 0),
                             ([name, "--check", "--json"], 1), ([name, "--lock-timeout", "0"], 0), ([], 0)):
            assert inspect(*args).returncode == status, args
        p = subprocess.Popen([INSPECT, name, "--watch", "0.05", "--json"], stdout=subprocess.PIPE, text=True)
        try:
            for _ in range(3):
                json.loads(p.stdout.readline())
            p.send_signal(signal.SIGINT)
            assert p.wait(timeout=10) == 0
        finally:
            p.kill()
            p.wait()
            p.stdout.close()
        assert raw(name) == before  # every byte, the lock's words and the dead holder's included
        assert pool_files(name) == files_before  # nothing made, nothing removed
        pool.free(h)
    finally:
        pool.destroy(force=True)


@pytest.mark.timeout(60)
def test_a_stuck_lock_holder_does_not_hang_it(pool: Mempool, name: str, popen) -> None:
    child = lock_holder(popen, name)
    before, files_before = raw(name), pool_files(name)
    t0 = time.monotonic()
    out = inspect(name, "--lock-timeout", "0.2", timeout=20)
    assert time.monotonic() - t0 < 5  # the bound, an interpreter start and some slack
    assert out.returncode == 0
    entry = entry_of(shown(name, "--lock-timeout", "0"), child.pid)["entry"]
    assert f"held by pid {child.pid} (alive, registry entry {entry})" in out.stdout
    assert "may be inconsistent" in out.stdout
    assert max(len(line) for line in out.stdout.splitlines()) <= 80
    d = shown(name, "--lock-timeout", "0.2")
    assert d["consistent"] is False and d["lock"]["pid"] == child.pid and d["lock"]["alive"] is True
    assert d["lock"]["held"] is True and d["lock"]["held_for_s"] >= 0.2 and d["lock"]["held_throughout"] is True
    assert d["lock"]["entry"] == entry and d["lock"]["waited_s"] >= 0.2 and d["lock"]["waiters"] == 0
    assert d["curr_nr"] == views(pool).hdr[H_CURR_NR]  # a snapshot all the same
    check = inspect(name, "--check", "--lock-timeout", "0.2")
    assert check.returncode == 1
    assert f"the lock was held by pid {child.pid} (alive, registry entry {entry})" in check.stdout
    assert "this audit ran on a copy that a critical section may have left half done" in check.stdout
    listing = [p for p in json.loads(inspect("--json").stdout) if p["name"] == name]
    assert listing and listing[0]["consistent"] is False
    assert raw(name) == before and pool_files(name) == files_before  # it waited without taking anything
    dead(child)
    after = shown(name, "--lock-timeout", "0.1")["lock"]
    assert after == {**d["lock"], "alive": False, "held_for_s": after["held_for_s"], "waited_s": after["waited_s"]}
    assert f"held by pid {child.pid} (dead, registry entry {entry})" in inspect(name, "--lock-timeout", "0.1").stdout
    assert pool.stats().lock_recoveries == 1  # taken over from the dead holder
    assert shown(name)["lock"]["held"] is False and inspect(name, "--check").returncode == 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("args", "status"), [((), 130), (("--watch", "0.1"), 0)])
def test_ctrl_c_gets_through_a_long_wait_for_a_stuck_lock(
    pool: Mempool, name: str, popen, args: tuple[str, ...], status: int
) -> None:
    lock_holder(popen, name)
    with watching(name, "--lock-timeout", "30", *args) as p:
        segment = f"/dev/shm/shmpool.{name}"  # mapped just before the wait for a quiet copy
        maps = pathlib.Path(f"/proc/{p.pid}/maps")
        wait_for(lambda: segment in maps.read_text(), what="the CLI to map the pool")
        mapped = [line.split()[1] for line in maps.read_text().splitlines() if line.endswith(segment)]
        assert mapped and all("w" not in perms for perms in mapped), mapped  # read-only, every mapping
        t0 = time.monotonic()
        p.send_signal(signal.SIGINT)
        try:
            code = p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the CLI did not end after SIGINT: {process_state(p.pid)}")
        assert code == status
        assert time.monotonic() - t0 < 5  # not the 30 s of the wait
        assert "Traceback" not in p.stderr.read()


# ----------------------------------------------------------------------
# --check


@pytest.mark.timeout(60)
def test_check_passes_on_a_healthy_pool_in_use(pool: Mempool, name: str, spawn) -> None:
    ok = inspect(name, "--check")
    assert ok.returncode == 0 and "all checks pass" in ok.stdout
    results = mp.get_context("spawn").Queue()
    for seed in range(2):
        spawn(children.hammer, name, 10**8, seed, results)
    start = pool.stats()
    wait_for(lambda: pool.stats().alloc_arena + pool.stats().alloc_reserve > start.alloc_arena + 100,
             what="the hammers to start")
    for _ in range(3):  # every process busy allocating and freeing meanwhile
        out = inspect(name, "--check")
        assert out.returncode == 0, out.stdout
    # A quiet copy comes soon even now (the bound is only a bound).
    d = json.loads(inspect(name, "--check", "--json", "--lock-timeout", "10").stdout)
    assert d == {"schema": cli.SCHEMA, "name": name, "consistent": True, "ok": True, "findings": []}


def _curr_nr_beyond_min_nr(v: Views) -> None:
    v.hdr[H_CURR_NR] = 4


def _duplicate_stack_entry(v: Views) -> None:
    v.stack[1] = v.stack[0]


def _invalid_state(v: Views) -> None:
    v.words[5] = v.words[5] & ~STATE_MASK | 9


def _owned(state: int, owner: int) -> Callable[[Views], None]:
    """A harm: slot 6 + owner % 5 put in ``state`` under owner field ``owner``."""
    def harm(v: Views) -> None:
        at = 6 + owner % 5
        v.words[at] = v.words[at] & ~(STATE_MASK | OWNER_MASK << OWNER_SHIFT) | state | owner << OWNER_SHIFT
    harm.__name__ = f"_{'held' if state == ST_HELD else 'cached'}_by_owner_{owner}"
    return harm


# The pool has 2 registry entries used: 0 (this process) and 1 (vacant: its
# process closed the pool). Owner fields name entry + 1.
_held_by_nobody = _owned(ST_HELD, 0)
_held_by_a_vacant_entry = _owned(ST_HELD, 2)
_held_beyond_the_entries_used = _owned(ST_HELD, 201)
_held_beyond_the_registry = _owned(ST_HELD, OWNER_MASK)
_cached_by_a_vacant_entry = _owned(ST_CACHED, 2)
NOBODY = "whose owner names no process ever attached, first slot"
NAMES_NOBODY = (_held_by_nobody, _held_by_a_vacant_entry, _held_beyond_the_entries_used, _held_beyond_the_registry,
                _cached_by_a_vacant_entry)


def _phantom_waiter(v: Views) -> None:
    v.hdr[H_NR_WAITERS] = 1


def _reserve_written_after_free(v: Views) -> None:
    v.data[v.stack[0] * v.geo.stride + 3] = 0


def _queued_in_no_queue(v: Views) -> None:
    v.words[9] = v.words[9] & ~(STATE_MASK | OWNER_MASK << OWNER_SHIFT) | ST_QUEUED


def _queued_in_a_vacant_queue(v: Views) -> None:
    v.words[10] = v.words[10] & ~(STATE_MASK | OWNER_MASK << OWNER_SHIFT) | ST_QUEUED | 5 << OWNER_SHIFT


def _phantom_queue_waiter(v: Views) -> None:
    v.queues[0 * QUEUE_WORDS + Q_GETTERS] = 1


def _phantom_queue_putter(v: Views) -> None:
    v.queues[0 * QUEUE_WORDS + Q_PUTTERS] = 1


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("harm", "finding"), [
    (_curr_nr_beyond_min_nr, "curr_nr 4 exceeds min_nr 3"),
    (_duplicate_stack_entry, "reserve stack holds a slot more than once"),
    (_invalid_state, "1 slot(s) have no valid state, first slot 5 (state 9)"),
    (_held_by_nobody, f"1 held or cached slot(s) {NOBODY} 6 (owner field 0): damage"),
    (_held_by_a_vacant_entry, f"1 held or cached slot(s) {NOBODY} 8 (registry entry 1, vacant): damage"),
    (_held_beyond_the_entries_used, f"1 held or cached slot(s) {NOBODY} 7 (registry entry 200, beyond the 2 "
                                    "entries ever used): damage"),
    (_held_beyond_the_registry, f"1 held or cached slot(s) {NOBODY} 6 (registry entry 65534, beyond the 2 "
                                "entries ever used): damage"),
    (_cached_by_a_vacant_entry, f"1 held or cached slot(s) {NOBODY} 8 (registry entry 1, vacant): damage"),
    (_phantom_waiter, "nr_waiters 1 is more than the 0 sleeping allocation(s) recorded in the registry"),
    (_reserve_written_after_free, "1 reserved element(s) lost their poison (written after free)"),
    (_queued_in_no_queue, "1 queued slot(s) name no queue of the table's 64 (owner field 0), first slot 9"),
    (_queued_in_a_vacant_queue, "1 slot(s) are queued in queue 4, which does not exist"),
    (_phantom_queue_waiter, "queue 0 ('q') counts 1 waiter(s) in get, more than the 0 recorded in the registry"),
    (_phantom_queue_putter, "queue 0 ('q') counts 1 waiter(s) in put, more than the 0 recorded in the registry"),
])
def test_check_names_the_damage(name: str, harm: Callable[[Views], None], finding: str) -> None:
    pool = Mempool.create(name, min_nr=3, slot_size=64, capacity=16, poison=True)
    try:
        pool.queue("q", depth=4).put(pool.alloc(GFP_ATOMIC))  # a queue holding an element
        closed = run_python(ATTACH + "pool.close()", name)  # registry entry 1: used, now vacant
        assert closed.returncode == 0, closed.stderr
        assert inspect(name, "--check").returncode == 0
        with damaged(pool, harm):
            out = inspect(name, "--check")
            assert out.returncode == 1 and out.stderr == ""
            assert finding in out.stdout, out.stdout
            d = json.loads(inspect(name, "--check", "--json").stdout)
            assert d["ok"] is False and any(finding in f for f in d["findings"])
            if harm is _invalid_state:
                assert shown(name)["slot_map"][5] == "?"
            if harm in (_queued_in_no_queue, _queued_in_a_vacant_queue):
                d = shown(name)
                assert d["slot_counts"]["invalid"] == 1 and d["slot_map"].count("?") == 1 and d["queued"] == 1
            if harm in NAMES_NOBODY:  # damage, not a dead process's element: nothing to reclaim
                line = next(f for f in d["findings"] if finding in f)
                assert "--reclaim-dead" not in line and not any("held by dead processes" in f for f in d["findings"])
                d = shown(name)
                assert d["slot_counts"]["invalid"] == 1 and d["slot_map"].count("?") == 1
                assert d["slot_counts"]["held_dead"] == 0 and "X" not in d["slot_map"]
                orphans = [(h["pid"], h["held"]) for h in d["holders"] if h["entry"] is None]
                assert orphans == ([] if harm is _cached_by_a_vacant_entry else [(0, 1)]), d["holders"]
                refused = inspect(name, "--reclaim-dead")
                assert refused.returncode == 2 and "names no process that was ever attached" in refused.stderr, (
                    refused.stdout + refused.stderr)
                assert shown(name)["slot_map"].count("?") == 1
        assert inspect(name, "--check").returncode == 0  # and whole again
    finally:
        pool.destroy(force=True)


# ----------------------------------------------------------------------
# Errors and odd segments


def test_missing_pool_and_usage_errors_exit_2(name: str) -> None:
    out = inspect(name)
    assert out.returncode == 2 and "no pool named" in out.stderr and out.stdout == ""
    assert out.stderr.startswith("shmpool-inspect: ")
    for args in ([name, "--check"], [name, "--watch", "0.1"], [name, "--reclaim-dead"], [name, "--json"]):
        out = inspect(*args)
        assert out.returncode == 2 and "no pool named" in out.stderr and "Traceback" not in out.stderr, args
    for args in (["--check"], ["--watch"], [name, "--watch", "-1"], [name, "--watch", "0.1", "--check"],
                 [name, "--lock-timeout", "-1"], ["a/b"], [name, "--bogus"]):
        out = inspect(*args)
        assert out.returncode == 2 and out.stdout == "" and "Traceback" not in out.stderr, args
        assert "shmpool-inspect" in out.stderr, args


def test_help_has_examples_and_exit_codes_in_80_columns() -> None:
    out = inspect("--help")
    assert out.returncode == 0 and "examples:" in out.stdout and "exit status" in out.stdout
    assert max(len(line) for line in out.stdout.splitlines()) <= 80


def test_segments_that_are_not_pools_are_refused_and_not_listed(name: str) -> None:
    odd = {"junk": name, "empty": f"{name}-empty", "old": f"{name}-old"}
    fifo = f"/dev/shm/shmpool.{name}-fifo"
    try:
        for kind, head in (("junk", b"definitely not a pool"), ("empty", b""),
                           ("old", struct.pack("=QQ", MAGIC, 99))):  # a pool of another layout version
            with open(segment_path(odd[kind]), "xb") as f:
                f.write(head)
                f.truncate(4096 if head else 0)
        os.mkfifo(fifo)  # opening it for reading would block
        out = inspect(odd["junk"])
        assert out.returncode == 2 and "not a usable shmpool pool" in out.stderr and "magic" in out.stderr
        out = inspect(odd["empty"])
        assert out.returncode == 2 and "empty segment" in out.stderr
        out = inspect(odd["old"])
        assert out.returncode == 2 and "layout version 99" in out.stderr
        listing = json.loads(inspect("--json", timeout=20).stdout)
        names = [p["name"] for p in listing]
        assert odd["junk"] not in names and odd["empty"] not in names and f"{name}-fifo" not in names
        assert next(p for p in listing if p["name"] == odd["old"])["error"].endswith(
            f"this shmpool reads version {LAYOUT_VERSION}")
        text = inspect(timeout=20).stdout  # an error too long for a line is wrapped
        assert f"reads version {LAYOUT_VERSION})" in " ".join(text.split())  # (wherever the wrap falls)
        assert max(len(line) for line in text.splitlines()) <= 80
    finally:
        for n in odd.values():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(segment_path(n))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(fifo)


@pytest.mark.timeout(60)
def test_the_listing_finds_pools_by_magic(pool: Mempool, name: str, popen) -> None:
    child = holder(popen, name, 2)
    s = pool.stats()
    listing = json.loads(inspect("--json").stdout)
    mine = [p for p in listing if p["name"] == name]
    assert mine == [{
        "name": name, "slot_size": 64, "capacity": 16, "min_nr": s.min_nr, "curr_nr": s.curr_nr, "in_use": 2,
        "nr_waiters": 0, "creator_pid": os.getpid(), "creator_alive": True, "consistent": True, "queued": 0,
        "schema": cli.SCHEMA, "stale": False, "damaged": False,
    }]
    text = inspect().stdout
    line = next(line for line in text.splitlines() if line.startswith(name))
    assert line.split()[1:8] == ["64", "16", str(s.min_nr), str(s.curr_nr), "2", "0", "0"] and line.endswith("alive")
    assert max(len(line) for line in text.splitlines()) <= 80
    child.kill()


def test_a_pool_this_user_may_not_read_is_listed_as_such(pool: Mempool, name: str, monkeypatch) -> None:
    # In-process: the suite runs as root, which may read anything.
    path = f"/dev/shm/shmpool.{name}"
    real_open = os.open

    def denying_open(p: str, *args: Any, **kwargs: Any) -> int:
        if p == path:
            raise PermissionError(13, "Permission denied", p)
        return real_open(p, *args, **kwargs)

    monkeypatch.setattr(os, "open", denying_open)
    pools = cli.list_pools()
    assert {"schema": cli.SCHEMA, "name": name, "error": "no permission"} in pools
    assert f"{name} (no permission)" in " ".join(cli.render_list(pools).split())


# ----------------------------------------------------------------------
# --watch


@pytest.mark.timeout(60)
def test_watch_shows_rates_and_stops_on_sigint(pool: Mempool, name: str) -> None:
    with watching(name, "--watch", "0.1", "--json") as p:
        deadline = time.monotonic() + 30
        first = json.loads(_readline_within(p, deadline))
        assert "rates" not in first
        pool.free(pool.alloc(GFP_ATOMIC))
        while True:  # frames come every 0.1 s: one of them saw the allocation
            frame = json.loads(_readline_within(p, deadline))
            if frame["rates"]["alloc_arena"] + frame["rates"]["alloc_reserve"] > 0:
                break
        assert set(frame["rates"]) == set(frame["counters"])
        p.send_signal(signal.SIGINT)
        assert p.wait(timeout=10) == 0
        assert "Traceback" not in p.stderr.read()


@pytest.mark.timeout(60)
def test_watch_in_text_redraws_frames_and_stops_on_sigint(pool: Mempool, name: str) -> None:
    with watching(name, "--watch", "0.1") as p:
        deadline = time.monotonic() + 30
        titles = 0
        while True:
            line = _readline_within(p, deadline)
            titles += line.startswith(f"pool {name} ")
            if "per second" in line:  # the second frame has rates
                break
        assert titles == 2
        p.send_signal(signal.SIGINT)
        assert p.wait(timeout=10) == 0
        assert p.stderr.read() == ""


@pytest.mark.timeout(60)
def test_watch_exits_when_the_pool_disappears(name: str) -> None:
    pool = Mempool.create(name, min_nr=1, slot_size=16, capacity=2)
    with watching(name, "--watch", "0.1") as p:
        _readline_within(p, time.monotonic() + 30)
        pool.destroy()
        assert p.wait(timeout=20) == 0
        assert "is gone" in p.stderr.read()


@pytest.mark.timeout(60)
def test_watch_exits_when_the_pool_is_replaced(name: str) -> None:
    pool = Mempool.create(name, min_nr=1, slot_size=16, capacity=2)
    with watching(name, "--watch", "0.1", "--json") as p:
        _readline_within(p, time.monotonic() + 30)
        pool.destroy()
        pool = Mempool.create(name, min_nr=1, slot_size=16, capacity=2)
        try:
            assert p.wait(timeout=20) == 0
            assert "is gone" in p.stderr.read()
        finally:
            pool.destroy()


# ----------------------------------------------------------------------
# The slot map's rule, in-process


def test_the_slot_map_is_exact_for_small_pools_and_never_hides_problems_in_groups() -> None:
    codes = np.array([cli.M_RESERVE, cli.M_ARENA, cli.M_CACHED, cli.M_QUEUED, cli.M_HELD, cli.M_PARKED, cli.M_DEAD,
                      cli.M_INVALID], np.uint8)
    assert cli.slot_map(codes) == ("R.cQHPX?", 1)
    n = 1_000_000
    codes = np.full(n, cli.M_ARENA, np.uint8)
    codes[:600_000] = cli.M_HELD
    codes[700_000] = cli.M_DEAD
    codes[800_000] = cli.M_INVALID
    smap, group = cli.slot_map(codes)
    assert group == math.ceil(n / (cli.MAP_ROWS * cli.MAP_WIDTH)) and len(smap) == math.ceil(n / group)
    assert smap[700_000 // group] == "X" and smap[800_000 // group] == "?"
    assert smap.count("X") == 1 and smap.count("?") == 1
    assert set(smap[: 600_000 // group]) == {"H"} and set(smap[600_000 // group + 1 :]) <= {".", "X", "?"}
    tie = np.array([cli.M_ARENA, cli.M_RESERVE] * (cli.MAP_ROWS * cli.MAP_WIDTH), np.uint8)
    assert cli.slot_map(tie) == ("R" * (cli.MAP_ROWS * cli.MAP_WIDTH), 2)  # a tie goes to the busier state
    for pair, wins in (((cli.M_QUEUED, cli.M_RESERVE), "Q"), ((cli.M_HELD, cli.M_QUEUED), "H"),
                       ((cli.M_PARKED, cli.M_HELD), "P")):
        assert cli.slot_map(np.array(pair * (cli.MAP_ROWS * cli.MAP_WIDTH), np.uint8))[0] == wins * (
            cli.MAP_ROWS * cli.MAP_WIDTH)


def _words(state: int, owners: list[int]) -> np.ndarray:
    return np.array([state | o << OWNER_SHIFT | 77 << 24 for o in owners], np.uint64)


def test_held_slots_are_alive_dead_or_damage_by_the_entry_they_name() -> None:
    owners = [1, 2, 3, 0, 4, OWNER_MASK]  # entries 0 (alive), 1 (dead), 2 (not in use), none, beyond, none
    alive, in_use = np.array([True, False, False]), np.array([True, True, False])
    codes = cli.slot_codes(_words(ST_HELD, owners), alive, in_use=in_use)
    assert codes.tolist() == [cli.M_HELD, cli.M_DEAD, cli.M_INVALID, cli.M_INVALID, cli.M_INVALID, cli.M_INVALID]
    codes = cli.slot_codes(_words(ST_CACHED, owners), alive, in_use=in_use)  # a dead one's cache is still a cache
    assert codes.tolist() == [cli.M_CACHED, cli.M_CACHED, cli.M_INVALID, cli.M_INVALID, cli.M_INVALID, cli.M_INVALID]
    codes = cli.slot_codes(_words(ST_PARKED, owners), np.array([False, False, False]))  # whoever freed it
    assert codes.tolist() == [cli.M_PARKED] * len(owners)
    assert H_VERSION == 1  # the header word the JSON's layout_version comes from


def test_queued_slots_are_queued_only_in_a_queue_that_exists_and_never_dead() -> None:
    owners = [1, 2, 0, 3, OWNER_MASK]  # queues 0 (live), 1 (vacant), none, 2 (beyond the table), none
    codes = cli.slot_codes(_words(ST_QUEUED, owners), np.array([False, False]), np.array([True, False]))
    assert codes.tolist() == [cli.M_QUEUED, cli.M_INVALID, cli.M_INVALID, cli.M_INVALID, cli.M_INVALID]


def test_the_creator_is_known_dead_once_it_exits(name: str) -> None:
    code = "import sys, shmpool; shmpool.Mempool.create(sys.argv[1], min_nr=1, slot_size=8, capacity=2).close()"
    assert subprocess.run([sys.executable, "-c", code, name], timeout=30).returncode == 0
    with Mempool.attach(name) as pool:  # its creator is gone; this process is not it
        d = json.loads(inspect(name, "--json").stdout)
        assert d["creator"]["alive"] is False and d["creator"]["pid"] != os.getpid()
        pool.destroy()
    with Mempool.create(name, min_nr=1, slot_size=8, capacity=2) as pool:  # the same name, a live creator
        creator = json.loads(inspect(name, "--json").stdout)["creator"]
        assert creator["pid"] == os.getpid() and creator["alive"] is True
        pool.destroy()


@pytest.mark.timeout(120)
def test_bench_inspect_runs_and_cleans_up() -> None:
    tool = pathlib.Path(__file__).resolve().parent.parent / "tools" / "bench_inspect.py"
    args = ["--slots", "4096", "--held", "1000", "--dead", "100", "--min-nr", "16", "--reps", "1", "--json"]
    with subprocess.Popen([sys.executable, str(tool), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as p:
        try:
            stdout, stderr = p.communicate(timeout=110)
        finally:
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert p.returncode == 0, stderr
    figures = json.loads(stdout)
    assert set(figures["in_process"]) >= {"list", "show", "json", "check"} and "check" in figures["subprocess"]
    assert len(figures["check_findings"]) == 1 and "100 element(s) held by dead processes" in (
        figures["check_findings"][0])
    assert [e for e in os.listdir("/dev/shm") if f"bench-inspect-{p.pid}-" in e] == []  # its pool is gone


# ----------------------------------------------------------------------
# Issue 12: schema, damaged and stale pools, --destroy, COMMAND, help


@pytest.mark.timeout(60)
def test_every_json_document_carries_the_schema_and_its_keys_are_pinned(pool: Mempool, name: str) -> None:
    d = shown(name)
    assert d["schema"] == cli.SCHEMA == 2 and set(d) == POOL_KEYS
    listing = [p for p in json.loads(inspect("--json").stdout) if p["name"] == name]
    assert len(listing) == 1 and set(listing[0]) == LIST_KEYS and listing[0]["schema"] == 2
    check = json.loads(inspect(name, "--check", "--json").stdout)
    assert set(check) == CHECK_KEYS and check["schema"] == 2


def _absurd_reserve(v: Views) -> None:
    v.hdr[H_CURR_NR] = 1 << 40


@pytest.mark.timeout(60)
def test_the_listing_marks_a_damaged_pool_instead_of_its_numbers(pool: Mempool, name: str) -> None:
    with damaged(pool, _absurd_reserve):
        entry = next(p for p in json.loads(inspect("--json").stdout) if p["name"] == name)
        assert entry["damaged"] is True and entry["stale"] is False
        line = next(line for line in inspect().stdout.splitlines() if line.startswith(name))
        assert "DAMAGED" in line and f"{name} --check" in line and str(1 << 40) not in line
        assert not any(tok.lstrip("-").isdigit() for tok in line.split()[1:]), line
    entry = next(p for p in json.loads(inspect("--json").stdout) if p["name"] == name)
    assert entry["damaged"] is False


def _left_behind(name: str) -> None:
    """A pool whose creator exited without destroying it: stale."""
    out = run_python("import sys, shmpool\nshmpool.Mempool.create(sys.argv[1], min_nr=1, slot_size=8, capacity=4)", name)
    assert out.returncode == 0, out.stderr


@pytest.mark.timeout(60)
def test_destroy_removes_a_stale_pool_and_the_listing_marks_it(name: str) -> None:
    _left_behind(name)
    entry = next(p for p in json.loads(inspect("--json").stdout) if p["name"] == name)
    assert entry["stale"] is True and entry["creator_alive"] is False
    line = next(line for line in inspect().stdout.splitlines() if line.startswith(name))
    assert line.endswith("gone STALE")
    out = inspect(name, "--destroy")
    assert out.returncode == 0 and "stale" in out.stdout, out.stderr
    assert not os.path.exists(f"/dev/shm/shmpool.{name}")
    assert inspect(name, "--destroy").returncode == 2  # gone


@pytest.mark.timeout(60)
def test_destroy_refuses_a_live_pool_without_force(pool: Mempool, name: str, popen) -> None:
    entry = next(p for p in json.loads(inspect("--json").stdout) if p["name"] == name)
    assert entry["stale"] is False
    out = inspect(name, "--destroy")  # the creator (this process) lives
    assert out.returncode == 3 and "in use" in out.stderr and f"pid {os.getpid()}" in out.stderr
    assert os.path.exists(f"/dev/shm/shmpool.{name}")
    assert inspect(name, "--force").returncode == 2  # --force alone is a usage error
    out = inspect(name, "--destroy", "--force")
    assert out.returncode == 0, out.stderr
    assert not os.path.exists(f"/dev/shm/shmpool.{name}")
    assert pool.stats  # our object is still there, its pool destroyed
    with pytest.raises(PoolDestroyedError):
        pool.alloc(GFP_ATOMIC)
    pool.close()


@pytest.mark.timeout(60)
def test_destroy_refuses_a_pool_an_attached_process_keeps_alive(name: str, popen) -> None:
    _left_behind(name)  # creator dead
    child = holder(popen, name, 1)
    assert next(p for p in json.loads(inspect("--json").stdout) if p["name"] == name)["stale"] is False
    out = inspect(name, "--destroy")
    assert out.returncode == 3 and str(child.pid) in out.stderr
    child.kill()
    child.wait(timeout=10)
    out = inspect(name, "--destroy")
    assert out.returncode == 0, out.stderr
    assert not os.path.exists(f"/dev/shm/shmpool.{name}")


@pytest.mark.timeout(60)
def test_the_command_column_shows_the_script_or_the_spawning_parent(name: str, spawn, tmp_path) -> None:
    pool = Mempool.create(name, min_nr=1, slot_size=8, capacity=2)
    try:
        h = pool.alloc(GFP_ATOMIC)
        h2 = pool.alloc(GFP_ATOMIC)  # all lent: the spawned child sleeps in alloc
        script = tmp_path / "holding_script.py"
        script.write_text(ATTACH + "print('ready', flush=True)\nsys.stdin.read()")
        with subprocess.Popen([sys.executable, str(script), name], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) as by_script:
            try:
                assert by_script.stdout.readline().strip() == "ready"
                results = mp.get_context("spawn").Queue()
                child = spawn(children.sleeping_alloc, name, results)
                wait_for(lambda: pool.stats().nr_waiters == 1, what="the child to sleep")
                d = shown(name)
                assert entry_of(d, by_script.pid)["command"] == str(script)
                assert entry_of(d, child.pid)["command"] == f"mp child of {os.getpid()}"
                text = inspect(name).stdout
                assert "holding_script.py" in text and f"mp child of {os.getpid()}" in text
                child.kill()
                child.join(10)
            finally:
                by_script.kill()
        pool.free(h)
        pool.free(h2)
    finally:
        pool.destroy(force=True)


def test_the_help_says_watch_ends_with_0_and_lists_destroy() -> None:
    out = inspect("--help")
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    assert "0 fine (and --watch ended by Ctrl-C" in text and "--destroy" in text and "3 --destroy refused" in text
