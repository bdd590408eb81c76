"""A process killed at the worst moment: the others go on, reclaim makes the
pool whole, and the audit passes."""

from __future__ import annotations

import signal

import posix_ipc
import pytest
from helpers import check_whole, wait_for

from shmpool import GFP_ATOMIC, Mempool
from shmpool._layout import H_CURR_NR, H_LOCK_OWNER, OWNER_MASK, P_PID, P_START, PROC_WORDS

ATTACH = "import sys, time, shmpool\npool = shmpool.Mempool.attach(sys.argv[1])\n"


def start_child(popen, code: str, name: str, *args: str):
    """A separate interpreter that runs ``code``, prints 'ready' and the
    value of ``out`` (if the code set it), then blocks until killed or its
    stdin is closed. Returns (process, out)."""
    p = popen(ATTACH + "out = ''\n" + code + "\nprint('ready', out, flush=True)\nsys.stdin.read()\n", name, *args)
    line = p.stdout.readline().split(maxsplit=1)
    if line[:1] != ["ready"]:
        p.kill()
        raise AssertionError(f"child failed: {p.communicate(timeout=10)[1]}")
    return p, (line[1].strip() if len(line) > 1 else "")


def kill(p) -> None:
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=10)


def holder_pid(pool: Mempool) -> int:
    """The pid of the lock's holder, from its token's registry entry."""
    v = pool._core[0]
    token = v.hdr[H_LOCK_OWNER]
    return 0 if not token else v.procs[((token & OWNER_MASK) - 1) * PROC_WORDS + P_PID]


@pytest.mark.timeout(30)
def test_lock_held_by_a_killed_process_is_recovered(name: str, popen) -> None:
    with Mempool.create(name, min_nr=2, slot_size=16, capacity=4) as pool:
        child, _ = start_child(popen, "pool._fast._test_lock()", name)
        assert holder_pid(pool) == child.pid  # recorded by the step that took it
        kill(child)
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
        child, _ = start_child(popen, "pool._fast._test_lock(); pool._core[0].hdr[%d] -= 1" % H_CURR_NR, name)
        kill(child)
        s = pool.stats()  # recovers, repairs
        assert (s.curr_nr, s.arena_free, s.in_use) == (3, 3, 0)
        check_whole(pool)
        pool.destroy()


@pytest.mark.timeout(30)
def test_a_lock_word_naming_nobody_is_recovered(name: str) -> None:
    with Mempool.create(name, min_nr=1, slot_size=16, capacity=2) as pool:
        pool._core[0].hdr[H_LOCK_OWNER] = 0xFFFF | 12345 << 16  # damage: an entry beyond the registry
        pool.free(pool.alloc(timeout=10))
        assert pool.recoveries == 1
        check_whole(pool)
        pool.destroy()


@pytest.mark.timeout(30)
def test_a_live_slow_holder_is_not_robbed(name: str, popen) -> None:
    with Mempool.create(name, min_nr=1, slot_size=16, capacity=2) as pool:
        child, _ = start_child(popen, "pool._fast._test_lock()", name)
        with pytest.raises(TimeoutError):
            pool.alloc(timeout=1.0)  # far past the contenders' 20 ms liveness checks: still its
        assert pool.alloc(GFP_ATOMIC) is None  # bounded, and nothing taken over
        assert pool.recoveries == 0
        child.stdin.close()  # let it exit normally... holding the lock
        child.wait(timeout=10)
        pool.free(pool.alloc(timeout=10))  # its death frees the lock for us
        assert pool.recoveries == 1
        pool.destroy()


@pytest.mark.timeout(30)
def test_reclaim_dead_takes_back_a_dead_holders_elements_reserve_first(name: str, popen) -> None:
    with Mempool.create(name, min_nr=2, slot_size=16, capacity=6) as pool:
        mine = pool.alloc()
        child, _ = start_child(popen, "hs = [pool.alloc() for _ in range(4)]", name)  # 3 arena + 1 reserve
        s = pool.stats()
        assert (s.in_use, s.curr_nr) == (5, 1)
        assert pool.reclaim_dead() == 0  # the child is alive: nothing taken
        kill(child)
        assert pool.reclaim_dead() == 4
        s = pool.stats()
        assert (s.in_use, s.curr_nr, s.arena_free, s.free_reserve, s.free_arena) == (1, 2, 3, 1, 3)
        assert pool.reclaim_dead() == 0
        pool.free(mine)  # ours was never touched
        check_whole(pool)
        pool.destroy()


@pytest.mark.timeout(30)
def test_adopted_handles_survive_the_senders_death(name: str, popen) -> None:
    with Mempool.create(name, min_nr=1, slot_size=16, capacity=4) as pool:
        child, out = start_child(popen, "out = f'{pool.alloc()} {pool.alloc()}'", name)
        a, b = (int(x) for x in out.split())
        pool.adopt(a)  # b is only received, not adopted
        kill(child)
        assert pool.reclaim_dead() == 1
        pool.buffer(a)[:2] = b"ok"  # still ours
        with pytest.raises(ValueError):
            pool.buffer(b)  # taken back
        pool.free(a)
        check_whole(pool)
        pool.destroy()


@pytest.mark.timeout(30)
def test_sleepers_that_die_are_uncounted(name: str, popen) -> None:
    with Mempool.create(name, min_nr=1, slot_size=16, capacity=1) as pool:
        h = pool.alloc()
        child = popen(ATTACH + "print('sleeping', flush=True); pool.alloc()", name)
        assert child.stdout.readline().strip() == "sleeping"
        wait_for(lambda: pool.stats().nr_waiters == 1, what="the child to sleep")
        kill(child)
        assert pool.stats().nr_waiters == 1  # the count does not know yet
        assert pool.reclaim_dead() == 0
        assert pool.stats().nr_waiters == 0
        pool.free(h)
        sem = posix_ipc.Semaphore(f"/shmpool.{name}.wait")
        assert sem.value == 0  # and no wake-up token is left for the dead
        sem.close()
        pool.destroy()


@pytest.mark.timeout(30)
def test_a_sleeper_that_times_out_uncounts_sleepers_that_died(name: str, popen) -> None:
    with Mempool.create(name, min_nr=1, slot_size=16, capacity=1) as pool:
        h = pool.alloc()
        child = popen(ATTACH + "print('sleeping', flush=True); pool.alloc()", name)
        assert child.stdout.readline().strip() == "sleeping"
        wait_for(lambda: pool.stats().nr_waiters == 1, what="the child to sleep")
        kill(child)
        with pytest.raises(TimeoutError):
            pool.alloc(timeout=0.2)  # sleeps, nobody wakes it, it recounts
        assert pool.stats().nr_waiters == 0
        pool.free(h)
        pool.destroy()


@pytest.mark.timeout(30)
def test_a_pid_is_not_a_holders_identity(name: str, popen) -> None:
    with Mempool.create(name, min_nr=1, slot_size=16, capacity=3) as pool:
        child, _ = start_child(popen, "h = pool.alloc()", name)
        # Rewrite the registry's pid and start time of the child, as a process
        # in another pid namespace would look: it is alive all the same.
        v = pool._core[0]
        procs = v.procs
        entry = next(e for e in range(v.geo.max_procs) if procs[e * PROC_WORDS + P_PID] == child.pid)
        procs[entry * PROC_WORDS + P_PID] = 1
        procs[entry * PROC_WORDS + P_START] += 1
        assert pool.reclaim_dead() == 0
        assert pool.stats().in_use == 1
        kill(child)
        assert pool.reclaim_dead() == 1
        check_whole(pool)
        pool.destroy()


@pytest.mark.timeout(30)
def test_a_newcomer_takes_back_what_the_dead_left(name: str, popen) -> None:
    with Mempool.create(name, min_nr=1, slot_size=16, capacity=3) as pool:
        child, _ = start_child(popen, "hs = [pool.alloc() for _ in range(2)]", name)
        kill(child)
        assert pool.stats().in_use == 2
        other, _ = start_child(popen, "", name)  # registering retires dead entries first
        assert pool.stats().in_use == 0
        kill(other)
        check_whole(pool)
        pool.destroy()


@pytest.mark.timeout(30)
def test_a_signal_handlers_exception_ends_a_sleep_and_uncounts_the_sleeper(name: str, popen) -> None:
    # posix_ipc drops exceptions raised by signal handlers during its waits;
    # shmpool's waits let them through, and the sleeper uncounts itself.
    with Mempool.create(name, min_nr=1, slot_size=16, capacity=1) as pool:
        h = pool.alloc()
        code = (
            "import signal\n"
            "def stop(*args):\n    raise SystemExit(7)\n"
            "signal.signal(signal.SIGTERM, stop)\n" + ATTACH + "print('sleeping', flush=True)\npool.alloc()\n"
        )
        child = popen(code, name)
        assert child.stdout.readline().strip() == "sleeping"
        wait_for(lambda: pool.stats().nr_waiters == 1, what="the child to sleep")
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=10) == 7
        assert pool.stats().nr_waiters == 0
        pool.free(h)
        pool.destroy()
