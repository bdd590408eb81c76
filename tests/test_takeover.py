"""The pool lock: taken over only from a holder proven dead, never from a
live one however long it is stopped, starved or slow; recovered within a
bound when its holder dies, and the pool repaired from its slot words.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import children
import numpy as np
import pytest
from helpers import assert_settled, check_whole, wait_for
from procs import (
    SERVER,
    SLACK,
    TESTS,
    Child,
    header_word,
    holder_pid,
    start_child,
    stop_process,
    timed,
    timed_raises,
)

import shmpool.pool
from shmpool import GFP_ATOMIC, GFP_KERNEL, GFP_NOWAIT, InvalidHandleError, Mempool, _layout, _procs
from shmpool.testing import views

ctx = mp.get_context("spawn")
#: The contract recovers a lock from a SIGKILLed owner in ~100 ms.
RECOVERY_BOUND = 2.0


def report(q: Any, timeout: float, who: str = "a child") -> Any:
    try:
        return q.get(timeout=timeout)
    except queue.Empty:
        pytest.fail(f"no report from {who} within {timeout} s: wedged?")


def stamp(pool: Mempool, h: int, value: tuple[int, int]) -> None:
    pool.ndarray(h, np.int64, 2)[:] = value


def stamp_of(pool: Mempool, h: int) -> tuple[int, ...]:
    return tuple(pool.ndarray(h, np.int64, 2).tolist())


@pytest.mark.timeout(120)
def test_a_stopped_lock_holder_is_never_taken_over_and_waits_stay_bounded(name: str, popen) -> None:
    # min_nr == capacity: every element is in the reserve, so every alloc
    # needs the lock (no cache to serve it without).
    with Mempool.create(name, min_nr=4, slot_size=16, capacity=4) as pool:
        before = pool.stats()
        child = start_child(popen, name)
        child.call("take_lock()")
        owner = header_word(name, _layout.H_LOCK_OWNER)
        assert owner != 0  # the hold is recorded with the lock itself
        child.stop()
        start = time.monotonic()
        rounds = 0
        while time.monotonic() - start < 2.0 or rounds < 3:  # far past any "orphan" presumption
            took = timed_raises(TimeoutError, lambda: pool.alloc(GFP_KERNEL, timeout=0.3))
            assert 0.28 <= took < 0.3 + SLACK
            for gfp in (GFP_ATOMIC, GFP_NOWAIT):
                got, took = timed(lambda gfp=gfp: pool.alloc(gfp))
                assert got is None
                assert took < shmpool.pool.ATOMIC_LOCK_WAIT_SECONDS + SLACK
            rounds += 1
        assert child.state() in ("T", "t")
        assert header_word(name, _layout.H_LOCK_OWNER) == owner  # still the stopped child's
        child.cont()
        child.call("give_lock()")  # it still holds the lock to give back
        assert header_word(name, _layout.H_LOCK_OWNER) == 0
        after = pool.stats()
        assert after.lock_recoveries == before.lock_recoveries
        assert (after.curr_nr, after.in_use) == (4, 0)
        h = pool.alloc(GFP_KERNEL, timeout=5)
        assert child.call("pool.free(pool.alloc(GFP_KERNEL, timeout=5))") is None
        pool.free(h)
        check_whole(pool)
        assert child.finish() == 0
        pool.destroy()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("contender", ["after the death", "waiting already"])
def test_a_killed_lock_holder_is_recovered_within_a_bound(name: str, popen, contender: str) -> None:
    with Mempool.create(name, min_nr=4, slot_size=16, capacity=4) as pool:
        before = pool.stats().lock_recoveries
        child = start_child(popen, name)
        child.call("take_lock()")
        done: dict[str, Any] = {}
        waiter = None
        if contender == "waiting already":

            def contend() -> None:
                try:
                    done["handle"] = pool.alloc(GFP_KERNEL, timeout=30)
                except BaseException as exc:
                    done["error"] = exc
                done["at"] = time.monotonic()

            waiter = threading.Thread(target=contend)
            waiter.start()
            assert pool.alloc(GFP_ATOMIC) is None  # the lock is held: the waiter waits
            assert waiter.is_alive()
        child.kill()
        killed = time.monotonic()
        if waiter is None:
            h = pool.alloc(GFP_KERNEL, timeout=30)
            recovery = time.monotonic() - killed
        else:
            waiter.join(30)
            assert "error" not in done, done
            h, recovery = done["handle"], done["at"] - killed
        assert recovery < RECOVERY_BOUND, f"recovery took {recovery:.3f} s"
        assert pool.stats().lock_recoveries == before + 1
        pool.free(h)
        check_whole(pool)
        pool.destroy()



@pytest.mark.timeout(30)
def test_lock_held_by_a_killed_process_is_recovered(name: str, popen) -> None:
    with Mempool.create(name, min_nr=2, slot_size=16, capacity=4) as pool:
        child = start_child(popen, name)
        child.call("take_lock()")
        assert holder_pid(name) == child.pid  # recorded by the step that took it
        child.kill()
        h = pool.alloc(timeout=10)  # would block forever without recovery
        assert h is not None and pool.recoveries == 1 and pool.stats().lock_recoveries == 1
        pool.free(h)
        check_whole(pool)
        pool.destroy()


@pytest.mark.timeout(30)
def test_half_done_operation_of_a_killed_holder_is_repaired(name: str, popen) -> None:
    with Mempool.create(name, min_nr=3, slot_size=16, capacity=6) as pool:
        # The child dies inside a critical section, after popping the reserve
        # stack but before marking the slot held: curr_nr is one short.
        child = start_child(popen, name)
        child.call("take_lock(); shmpool.testing.views(pool).hdr[%d] -= 1" % _layout.H_CURR_NR)
        child.kill()
        s = pool.stats()  # recovers, repairs
        assert (s.curr_nr, s.arena_free, s.in_use) == (3, 3, 0)
        check_whole(pool)
        pool.destroy()


@pytest.mark.timeout(30)
def test_a_lock_word_naming_nobody_is_recovered(name: str) -> None:
    with Mempool.create(name, min_nr=1, slot_size=16, capacity=2) as pool:
        # damage: a token naming an entry beyond the registry
        views(pool).hdr[_layout.H_LOCK_OWNER] = 0xFFFF | 12345 << 16
        pool.free(pool.alloc(timeout=10))
        assert pool.recoveries == 1
        check_whole(pool)
        pool.destroy()


@pytest.mark.timeout(30)
def test_a_live_slow_holder_is_not_robbed(name: str, popen) -> None:
    with Mempool.create(name, min_nr=1, slot_size=16, capacity=2) as pool:
        child = start_child(popen, name)
        child.call("take_lock()")
        with pytest.raises(TimeoutError):
            pool.alloc(timeout=1.0)  # far past the contenders' 20 ms liveness checks: still its
        assert pool.alloc(GFP_ATOMIC) is None  # bounded, and nothing taken over
        assert pool.recoveries == 0
        assert child.finish() == 0  # it exits normally... holding the lock
        pool.free(pool.alloc(timeout=10))  # its death frees the lock for us
        assert pool.recoveries == 1
        pool.destroy()


# ----------------------------------------------------------------------
# A process stopped anywhere in its operations


STOPS = 30


@pytest.mark.timeout(300)
def test_a_process_stopped_anywhere_in_its_operations_wedges_nobody(name: str, spawn) -> None:
    # fail_rate=1.0: every allocation comes from the reserve, under the lock.
    with Mempool.create(name, min_nr=6, slot_size=16, capacity=8, fail_rate=1.0) as pool:
        progress, stop, results = ctx.RawValue("q", 0), ctx.RawValue("b", 0), ctx.Queue()
        child = spawn(children.reserve_hammer, name, progress, stop, results)
        wait_for(lambda: progress.value > 0, timeout=60, what="the child to start")
        me = os.getpid()
        bad = served = 0
        worst = 0.0
        for i in range(STOPS):
            stop_process(child.pid)  # wherever it is
            held = []
            for gfp in (GFP_KERNEL, GFP_ATOMIC):
                t0 = time.monotonic()
                try:
                    h = pool.alloc(gfp, timeout=0.2) if gfp == GFP_KERNEL else pool.alloc(gfp)
                except TimeoutError:  # the child stopped holding the lock
                    h = None
                took = time.monotonic() - t0
                worst = max(worst, took)
                assert took < 0.2 + SLACK, f"alloc waited {took:.3f} s behind a stopped process"
                if h is not None:
                    stamp(pool, h, (me, 2 * i + len(held)))
                    held.append((h, 2 * i + len(held)))
            mark = progress.value
            os.kill(child.pid, signal.SIGCONT)
            # Hold ours while it makes two more rounds: a shared element
            # would get its stamp.
            wait_for(lambda mark=mark: progress.value >= mark + 2, timeout=60, what="the child to go on")
            for h, serial in held:
                if stamp_of(pool, h) != (me, serial):
                    bad += 1
                pool.free(h)
                served += 1
        stop.value = 1
        rounds, child_bad, errors = report(results, 60, "the stopped hammer")
        child.join(30)
        assert errors == [] and child.exitcode == 0
        assert (bad, child_bad) == (0, 0)
        assert rounds >= 2 * STOPS and served > 0
        # A stopped process is never taken for dead.
        assert_settled(pool, lock_recoveries=0, in_use=0, curr_nr=6, nr_waiters=0)
        pool.destroy()



# ----------------------------------------------------------------------
# Pid namespaces


def _unshare_or_skip() -> list[str]:
    argv = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"]
    if shutil.which("unshare") is None:
        pytest.skip("unshare(1) is not installed")
    probe = subprocess.run([*argv, "true"], capture_output=True, text=True, timeout=30, check=False)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a pid namespace here: {probe.stderr.strip()}")
    return argv


#: Run as ``python -c EXEC argv...``: becomes argv (same pid, so that the
#: popen fixture reaps it).
EXEC = "import os, sys; os.execvp(sys.argv[1], sys.argv[1:])"


@pytest.mark.timeout(120)
def test_processes_in_different_pid_namespaces_see_each_other_alive(name: str, popen) -> None:
    argv = _unshare_or_skip()  # --kill-child: killing unshare kills the namespace
    with Mempool.create(name, min_nr=1, slot_size=16, capacity=8) as pool:
        ours = pool.alloc(GFP_KERNEL, timeout=5)
        stamp(pool, ours, (1, 2))
        child = Child(popen(EXEC, *argv, sys.executable, "-c", SERVER, name, TESTS))
        assert child.inner_pid == 1  # the first process of its own pid namespace
        child.call("h = pool.alloc(GFP_KERNEL, timeout=5); pool.buffer(h)[:2] = b'ns'")
        theirs = child.call("h")
        # Neither can see the other's pid in its /proc; neither is dead.
        assert child.call("pool.reclaim_dead()") == 0
        assert pool.reclaim_dead() == 0
        assert stamp_of(pool, ours) == (1, 2)
        assert bytes(pool.buffer(theirs)[:2]) == b"ns"
        assert pool.stats().in_use == 2
        live = {pid for pid, _ in _procs.live_pids(name)}
        assert {child.inner_pid, os.getpid()} <= live
        # Nor is its lock taken over from it.
        child.call("take_lock()")
        assert timed_raises(TimeoutError, lambda: pool.alloc(GFP_KERNEL, timeout=0.3)) < 0.3 + SLACK
        child.call("give_lock()")
        assert pool.stats().lock_recoveries == 0
        # Once it is gone (without freeing), its element comes back.
        assert child.finish() == 0
        assert pool.reclaim_dead() == 1
        with pytest.raises(InvalidHandleError):
            pool.buffer(theirs)
        assert stamp_of(pool, ours) == (1, 2)
        pool.free(ours)
        assert_settled(pool, in_use=0)
        pool.destroy()
