"""Processes killed at the worst moment: inside a locked transition (SIGKILL
at chosen points of the core), holding elements, asleep. The others go on,
the next holder of the lock repairs the pool from its slot words,
``reclaim_dead`` (or the next process to attach) takes back what the dead
held, and the audit passes.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Callable, Iterator

import pytest
from helpers import assert_settled, check_whole, wait_for
from procs import ATTACH_CODE, Child, header_word, start_child

from shmpool import GFP_ATOMIC, GFP_KERNEL, Mempool, _layout
from shmpool.testing import CRASH_POINTS


def start_plain(popen: Callable[..., subprocess.Popen[str]], code: str, name: str) -> tuple[subprocess.Popen[str], str]:
    """A ``python -c`` child that runs ``code``, prints 'ready' and the value
    of ``out`` (if the code set it), then blocks until killed or its stdin is
    closed. Returns (process, out)."""
    p = popen(ATTACH_CODE + "out = ''\n" + code + "\nprint('ready', out, flush=True)\nsys.stdin.read()\n", name)
    line = p.stdout.readline().split(maxsplit=1)  # type: ignore[union-attr]
    if line[:1] != ["ready"]:
        p.kill()
        raise AssertionError(f"child failed: {p.communicate(timeout=10)[1]}")
    return p, (line[1].strip() if len(line) > 1 else "")


def kill(p: subprocess.Popen[str]) -> None:
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=10)


# ----------------------------------------------------------------------
# SIGKILL at chosen points inside the locked transitions


CRASH_CAPACITY = 48
CRASH_MIN_NR = 4
KEEP = 2  # elements the idle keeper holds throughout

#: A victim's setup that makes it live on the reserve: every arena attempt
#: fails, and 10 alloc+free pairs go to the reserve under the lock, after
#: which the reserve's places are lent to it (assert_places checks it).
ON_THE_RESERVE = (
    "pool.set_fail_rate(1.0)\n"
    "for _ in range(10): pool.free(pool.alloc(GFP_ATOMIC))\n"
    "from shmpool.testing import entry_offset, registry_entry\n"
    "def assert_places():\n"
    "    with open(shmpool.testing.segment_path(pool), 'rb') as f:\n"
    "        f.seek(entry_offset(pool, registry_entry(pool), 'P_PLACE_Q'))\n"
    "        assert int.from_bytes(f.read(8), 'little') > 0, 'no reserve places lent'"
)

#: point -> (setup in the victim, the action that reaches the point).
#: "dead" in the setup: a process that allocated is SIGKILLed first;
#: "dead-locked": one that took the lock is SIGKILLed first.
CRASHES: dict[str, tuple[str, str]] = {
    "alloc-reserve": ("pool.set_fail_rate(1.0)", "pool.alloc(GFP_ATOMIC)"),
    "free-reserve": ("pool.set_fail_rate(1.0); h = pool.alloc(GFP_ATOMIC); assert h is not None", "pool.free(h)"),
    "refill": ("", "pool.alloc(GFP_KERNEL, timeout=10)"),
    "drain": ("xs = [pool.alloc(GFP_KERNEL, timeout=10) for _ in range(4)]\nfor x in xs: pool.free(x)", "pool.close()"),
    "steal": ("", f"for _ in range({CRASH_CAPACITY}): pool.alloc(GFP_KERNEL, timeout=10)"),
    "retire": ("dead", "pool.reclaim_dead()"),
    "rebuild": ("dead-locked", "pool.alloc(GFP_KERNEL, timeout=10)"),
    "queue-put": ("q = pool.queue('q', depth=4); h = pool.alloc(GFP_KERNEL, timeout=10)", "q.put(h)"),
    "queue-get": ("q = pool.queue('q', depth=4); q.put(pool.alloc(GFP_KERNEL, timeout=10))", "q.get()"),
    # a free parked because another live process holds the lock: killed
    # between the park and its hint, the element comes back by retire
    "park": ("locked-by-other", "pool.free(h)"),
    # a publish killed in every ring before its commit: still the victim's
    # (reclaimed); a last release killed before its free: repair frees it
    "publish": ("t = pool.topic('t', depth=4); s = t.subscribe(); h = pool.alloc(GFP_KERNEL, timeout=10)",
                "t.publish(h)"),
    "topic-release": ("t = pool.topic('t', depth=4); s = t.subscribe(); t.publish(pool.alloc(GFP_KERNEL, timeout=10));"
                      " h = s.get()", "s.release(h)"),
    # the reserve places lent to a victim that lives on the reserve (16
    # locked reserve operations first): emptied and filled without the lock
    # (so no takeover follows), and its first lend killed half way
    "place-pop": (f"{ON_THE_RESERVE}\nh = pool.alloc(GFP_ATOMIC); assert h is not None\nassert_places()",
                  "pool.alloc(GFP_ATOMIC)"),
    "place-push": (f"{ON_THE_RESERVE}\nh = pool.alloc(GFP_ATOMIC); assert h is not None\nassert_places()", "pool.free(h)"),
    "lend": ("pool.set_fail_rate(1.0)\nfor _ in range(8): pool.free(pool.alloc(GFP_ATOMIC))", "pool.alloc(GFP_ATOMIC)"),
}
LOCK_FREE = {"place-pop", "place-push"}  # points outside the lock


@pytest.fixture
def keeper_pool(name: str, popen) -> Iterator[tuple[Mempool, Child]]:
    """A pool and an idle process that holds KEEP elements and whose cache
    holds free arena slots (so that the shared free list is not the whole
    arena)."""
    with Mempool.create(name, min_nr=CRASH_MIN_NR, slot_size=16, capacity=CRASH_CAPACITY) as pool:
        keeper = start_child(popen, name)
        keeper.call(
            "xs = [pool.alloc(GFP_KERNEL, timeout=10) for _ in range(20)]\n"
            f"held = xs[:{KEEP}]\n"
            f"for x in xs[{KEEP}:]: pool.free(x)"
        )
        yield pool, keeper


#: Run the action, and exit 5 if the process survived it.
SURVIVE = """
import traceback
try:
    exec({action!r})
except BaseException:
    traceback.print_exc()
finally:
    sys.stderr.flush()
    os._exit(5)
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("point", list(CRASHES))
def test_sigkill_at_a_point_inside_a_locked_transition_loses_nothing(
    name: str, popen, keeper_pool: tuple[Mempool, Child], point: str
) -> None:
    pool, keeper = keeper_pool
    s = pool.stats()
    assert s.in_use == KEEP
    assert header_word(name, _layout.H_ARENA_FREE) < s.arena_free  # the keeper caches some
    recoveries = s.lock_recoveries
    setup, action = CRASHES[point]
    # Attached before anybody dies: attaching may retire the dead or take
    # a dead owner's lock over, which must be left to the action.
    victim = start_child(popen, name)
    holder = None
    if setup in ("dead", "dead-locked"):
        dead = start_child(popen, name)
        dead.call("hs = [pool.alloc(GFP_KERNEL, timeout=10) for _ in range(3)]" if setup == "dead" else "take_lock()")
        dead.kill()
    elif setup == "locked-by-other":
        victim.call("pool.set_fail_rate(1.0); h = pool.alloc(GFP_ATOMIC); assert h is not None")  # the reserve's
        holder = start_child(popen, name)
        holder.call("take_lock()")
    elif setup:
        victim.call(setup)
    victim.call(f"shmpool.testing.crash_at({point!r})")
    victim.send(SURVIVE.format(action=action))
    code = victim.wait(60)
    assert code == -signal.SIGKILL, f"the victim did not die at {point!r} (exit {code}): {victim.stderr()}"
    if holder is not None:  # it died without the lock, its element parked without the hint
        holder.call("give_lock()")
        assert header_word(name, _layout.H_PARKED) == 0
        assert holder.finish() == 0
        pool.reclaim_dead()
    elif point in LOCK_FREE:  # it died moving its own places, without the lock: retire gives them back
        pool.reclaim_dead()
        assert pool.stats().lock_recoveries == recoveries
    else:  # it died holding the lock, half way through a transition
        pool.reclaim_dead()
        assert pool.stats().lock_recoveries >= recoveries + 1
    pool.set_fail_rate(0.0)
    check_whole(pool)
    s = pool.stats()
    if point in ("queue-put", "queue-get"):  # killed before the commit of a get, after a put's: queued
        assert (s.queued, s.in_use) == (1, KEEP)
        q = pool.queue("q")
        while q.qsize():
            pool.free(q.get_nowait())
        s = pool.stats()
    assert s.in_use == KEEP  # exactly what the live processes hold
    assert s.nr_waiters == 0
    # Every other element can be had, the keeper's idle cache included.
    mine = [pool.alloc(GFP_KERNEL, timeout=5) for _ in range(CRASH_CAPACITY - KEEP)]
    assert len(set(mine)) == len(mine)
    assert pool.alloc(GFP_ATOMIC) is None
    for h in mine:
        pool.free(h)
    keeper.call("for x in held: pool.free(x)")
    assert keeper.finish() == 0
    assert pool.reclaim_dead() == 0
    assert_settled(pool, in_use=0, curr_nr=CRASH_MIN_NR, arena_free=CRASH_CAPACITY - CRASH_MIN_NR)
    pool.destroy()




def test_every_crash_point_is_tested() -> None:
    assert set(CRASHES) == set(CRASH_POINTS)


# ----------------------------------------------------------------------
# Dead holders and dead sleepers


@pytest.mark.timeout(30)
def test_reclaim_dead_takes_back_a_dead_holders_elements_reserve_first(name: str, popen) -> None:
    with Mempool.create(name, min_nr=2, slot_size=16, capacity=6) as pool:
        mine = pool.alloc()
        child, _ = start_plain(popen, "hs = [pool.alloc() for _ in range(4)]", name)  # 3 arena + 1 reserve
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
        child, out = start_plain(popen, "out = f'{pool.alloc()} {pool.alloc()}'", name)
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
        child = popen(ATTACH_CODE + "print('sleeping', flush=True); pool.alloc()", name)
        assert child.stdout.readline().strip() == "sleeping"
        wait_for(lambda: pool.stats().nr_waiters == 1, what="the child to sleep")
        kill(child)
        assert pool.stats().nr_waiters == 1  # the count does not know yet
        assert pool.reclaim_dead() == 0
        assert pool.stats().nr_waiters == 0
        pool.free(h)
        pool.destroy()


@pytest.mark.timeout(30)
def test_a_sleeper_that_times_out_uncounts_sleepers_that_died(name: str, popen) -> None:
    with Mempool.create(name, min_nr=1, slot_size=16, capacity=1) as pool:
        h = pool.alloc()
        child = popen(ATTACH_CODE + "print('sleeping', flush=True); pool.alloc()", name)
        assert child.stdout.readline().strip() == "sleeping"
        wait_for(lambda: pool.stats().nr_waiters == 1, what="the child to sleep")
        kill(child)
        with pytest.raises(TimeoutError):
            pool.alloc(timeout=0.2)  # sleeps, nobody wakes it, it recounts
        assert pool.stats().nr_waiters == 0
        pool.free(h)
        pool.destroy()


@pytest.mark.timeout(30)
def test_a_newcomer_takes_back_what_the_dead_left(name: str, popen) -> None:
    with Mempool.create(name, min_nr=1, slot_size=16, capacity=3) as pool:
        child, _ = start_plain(popen, "hs = [pool.alloc() for _ in range(2)]", name)
        kill(child)
        assert pool.stats().in_use == 2
        other, _ = start_plain(popen, "", name)  # registering retires dead entries first
        assert pool.stats().in_use == 0
        kill(other)
        check_whole(pool)
        pool.destroy()


