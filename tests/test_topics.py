"""Topics (issue 18): one element published to many subscribers, in order,
each once, freed when the last lets go; subscribers that die lose the
others nothing; drop_oldest keeps a fast subscriber at speed beside a
stalled one. Subscribers and publishers are real processes (procs.SERVER
children, which run the commands they are sent).
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import subprocess
import sys
import threading

import numpy as np
import pytest
from helpers import check_whole, wait_for
from procs import start_child

from shmpool import InvalidHandleError, Mempool, PoolClosedError
from shmpool._layout import S_GETTERS
from shmpool.testing import audit, views


def setup_child(child, topic: str = "t") -> None:
    child.call(f"s = pool.topic({topic!r}).subscribe()")


def received(child, n: int) -> list[int]:
    """n elements got by a child's subscription ``s``: the first int64 of
    each (received, not released)."""
    return child.call(  # type: ignore[no-any-return]
        f"[[int(pool.ndarray(h, np.int64, (1,))[0]) for h in hs] for hs in [[s.get(timeout=30) for _ in range({n})]]][0]"
    )


def killed_subscriber(popen, name: str, pool: Mempool, t, values, gets: int) -> int:
    """A child subscribes, ``values`` are published, it gets ``gets`` of
    them (received, never released), and is SIGKILLed: its pid."""
    victim = start_child(popen, name)
    setup_child(victim, t.name)
    publish_numbers(pool, t, values)
    for _ in range(gets):
        victim.call("s.get()")
    victim.kill()
    return victim.pid


def publish_numbers(pool: Mempool, t, values) -> list[int]:
    handles = []
    for v in values:
        h = pool.alloc(timeout=30)
        pool.ndarray(h, np.int64, (1,))[0] = v
        t.publish(h, timeout=30)
        handles.append(h)
    return handles


@pytest.mark.timeout(120)
def test_three_subscribers_see_every_element_once_in_order_and_the_last_release_frees(name: str, popen) -> None:
    with Mempool.create(name, min_nr=4, slot_size=64, capacity=64).destroying() as pool:
        t = pool.topic("t", depth=64)
        kids = [start_child(popen, name) for _ in range(3)]
        for k in kids:
            setup_child(k)
        assert t.subscribers == 3
        hs = publish_numbers(pool, t, range(40))
        assert pool.stats().published == 40
        for k in kids:
            k.call("got = [s.get(timeout=30) for _ in range(40)]")
            assert k.call("[int(pool.ndarray(h, np.int64, (1,))[0]) for h in got]") == list(range(40))
            assert k.call("got") == hs  # the publisher's handles: the same elements, no copy
            assert k.call("len(s)") == 0
            with pytest.raises(Exception, match="Empty"):
                k.call("s.get_nowait()")
        for i, k in enumerate(kids):
            k.call("[s.release(h) for h in got]")
            s = pool.stats()
            if i < 2:
                assert s.published == 40 and s.in_use == 40, (i, s)  # still shared
        s = pool.stats()
        assert s.published == 0 and s.in_use == 0 and s.curr_nr == 4
        assert audit(pool) == []
        for k in kids:
            k.call("s.close()")
            k.finish()


@pytest.mark.timeout(120)
def test_a_subscriber_killed_midstream_loses_the_others_nothing(name: str, popen) -> None:
    with Mempool.create(name, min_nr=2, slot_size=64, capacity=32).destroying() as pool:
        t = pool.topic("t", depth=16)
        victim, other = start_child(popen, name), start_child(popen, name)
        setup_child(victim)
        setup_child(other)
        publish_numbers(pool, t, range(10))
        victim.call("mine = [s.get(timeout=30) for _ in range(5)]")  # 5 received, 5 pending
        victim.kill()
        assert received(other, 10) == list(range(10))
        other.call("s.close()")  # releases what it received
        assert pool.stats().published == 10  # the dead one still references them all
        assert pool.reclaim_dead() == 10  # its references released: every element back
        s = pool.stats()
        assert s.published == 0 and s.in_use == 0 and t.subscribers == 0
        assert audit(pool) == []
        other.finish()


@pytest.mark.timeout(120)
def test_references_of_a_dead_subscriber_come_back_at_attach_too(name: str, popen) -> None:
    with Mempool.create(name, min_nr=2, slot_size=64, capacity=16).destroying() as pool:
        t = pool.topic("t", depth=8)
        killed_subscriber(popen, name, pool, t, range(3), gets=1)
        newcomer = start_child(popen, name)  # its attach retires the dead
        assert pool.stats().published == 0 and t.subscribers == 0
        newcomer.finish()


@pytest.mark.timeout(120)
def test_a_publisher_that_dies_loses_nothing_it_published(name: str, popen) -> None:
    with Mempool.create(name, min_nr=2, slot_size=64, capacity=16).destroying() as pool:
        t = pool.topic("t", depth=8)
        s = t.subscribe()
        pub = start_child(popen, name)
        pub.call("t = pool.topic('t')")
        pub.call("for v in range(5):\n    h = pool.alloc()\n    pool.ndarray(h, np.int64, (1,))[0] = v\n    t.publish(h)")
        pub.kill()
        assert pool.reclaim_dead() == 0  # nothing was the publisher's any more
        got = s.get_many(10)
        assert [int(pool.ndarray(h, np.int64, (1,))[0]) for h in got] == list(range(5))
        for h in got:
            pool.free(h)  # pool.free of a shared element: this process's subscription lets go
        assert pool.stats().in_use == 0
        s.close()


@pytest.mark.timeout(120)
def test_drop_oldest_keeps_a_fast_subscriber_at_speed_beside_a_stalled_one(name: str, popen) -> None:
    with Mempool.create(name, min_nr=2, slot_size=64, capacity=32).destroying() as pool:
        t = pool.topic("t", depth=4, overflow="drop_oldest")
        stalled = start_child(popen, name)
        setup_child(stalled)
        stalled.stop()  # it subscribed, and will take nothing while stopped
        fast = t.subscribe()
        seen = []
        for v in range(200):
            h = pool.alloc(timeout=30)
            pool.ndarray(h, np.int64, (1,))[0] = v
            t.publish_nowait(h)  # never Full: the stalled ring drops its oldest instead
            got = fast.get_nowait()
            seen.append(int(pool.ndarray(got, np.int64, (1,))[0]))
            fast.release(got)
        assert seen == list(range(200))
        assert pool.stats().published == 4  # the stalled ring's four, nothing more held back
        stalled.cont()
        assert received(stalled, 4) == [196, 197, 198, 199]  # the newest, in order
        assert stalled.call("len(s)") == 0
        stalled.call("s.close()")
        assert pool.stats().in_use == 0 and audit(pool) == []
        fast.close()
        stalled.finish()


@pytest.mark.timeout(120)
def test_block_overflow_waits_for_the_slowest_subscriber(name: str, popen) -> None:
    with Mempool.create(name, min_nr=2, slot_size=64, capacity=16).destroying() as pool:
        t = pool.topic("t", depth=2)
        slow = start_child(popen, name)
        setup_child(slow)
        publish_numbers(pool, t, [1, 2])
        h = pool.alloc()
        pool.ndarray(h, np.int64, (1,))[0] = 3
        with pytest.raises(queue.Full):
            t.publish_nowait(h)
        with pytest.raises(queue.Full):
            t.publish(h, timeout=0.1)
        assert pool.stats().published == 2  # refused: still ours
        done = threading.Event()

        def publisher() -> None:
            t.publish(h, timeout=30)
            done.set()

        thread = threading.Thread(target=publisher)
        thread.start()
        wait_for(lambda: pool.stats().published == 2 and not done.is_set(), what="the publisher to wait")
        assert received(slow, 1) == [1]  # room: the publisher goes on
        assert done.wait(30)
        thread.join(30)
        assert received(slow, 2) == [2, 3]
        slow.call("s.close()")
        assert pool.stats().in_use == 0
        slow.finish()


def test_publish_with_no_subscriber_frees_at_once(name: str) -> None:
    with Mempool.create(name, min_nr=2, slot_size=64, capacity=8).destroying() as pool:
        t = pool.topic("t", depth=4)
        h = pool.alloc()
        before = pool.stats()
        t.publish(h)
        after = pool.stats()
        assert after.in_use == 0 and after.published == 0
        assert after.free_arena + after.free_reserve == before.free_arena + before.free_reserve + 1
        with pytest.raises(InvalidHandleError):
            pool.free(h)  # it went back: nothing of it is ours


def test_views_of_a_shared_element_are_read_only(name: str) -> None:
    with Mempool.create(name, min_nr=2, slot_size=64, capacity=8).destroying() as pool:
        t = pool.topic("t", depth=4)
        s = t.subscribe()
        h = pool.alloc()
        pool.buffer(h)[:3] = b"abc"
        t.publish(h)
        with pytest.raises((ValueError, TypeError)):
            pool.buffer(h)[0] = 1  # the publisher's view of it is gone too: it is shared now
        got = s.get()
        a, mv = pool.ndarray(got), pool.buffer(got)
        assert not a.flags.writeable and mv.readonly and bytes(mv[:3]) == b"abc"
        with pytest.raises(ValueError):
            a[0] = 1
        with pytest.raises(TypeError):
            mv[0] = 1
        del a, mv
        s.release(got)
        with pytest.raises(InvalidHandleError):
            s.release(got)  # twice
        s.close()
        assert pool.stats().in_use == 0


def test_opening_a_topic_by_name(name: str) -> None:
    with Mempool.create(name, min_nr=2, slot_size=64, capacity=8).destroying() as pool:
        with pytest.raises(FileNotFoundError):
            pool.topic("none")
        t = pool.topic("t", depth=4, overflow="drop_oldest")
        again = pool.topic("t")
        assert (again.depth, again.overflow, again.name) == (4, "drop_oldest", "t")
        with pytest.raises(ValueError):
            pool.topic("t", depth=5)
        with pytest.raises(ValueError):
            pool.topic("t", depth=4)  # another overflow
        with pytest.raises(ValueError):
            pool.topic("u", depth=4, overflow="newest")
        with pytest.raises(ValueError):
            pool.topic("u", depth=0)
        with pytest.raises(TypeError):
            pool.topic(3, depth=4)  # type: ignore[arg-type]
        t.close()
        with pytest.raises(PoolClosedError):
            t.subscribe()


def test_close_releases_what_a_subscription_holds_and_has_pending(name: str) -> None:
    with Mempool.create(name, min_nr=2, slot_size=64, capacity=8).destroying() as pool:
        t = pool.topic("t", depth=4)
        s, other = t.subscribe(), t.subscribe()
        publish_numbers(pool, t, range(3))
        s.get()  # one received, two pending
        assert len(s) == 2 and len(other) == 3
        s.close()
        s.close()  # twice: nothing
        with pytest.raises(PoolClosedError):
            s.get_nowait()
        assert pool.stats().published == 3 and t.subscribers == 1
        other.close()
        assert pool.stats().in_use == 0 and audit(pool) == []


def test_owning_arrays_and_get_async(name: str) -> None:
    with Mempool.create(name, min_nr=2, slot_size=64, capacity=8).destroying() as pool:
        t = pool.topic("t", depth=4)
        s = t.subscribe()
        a = pool.alloc_array((8,), np.int64)
        a[:] = np.arange(8)
        t.publish(a)  # an owning array: its element is the topic's now
        del a

        async def main() -> int:
            return await s.get_async(timeout=10)

        h = asyncio.run(main())
        view = pool.array(h)  # owning: releases on its last reference
        assert list(view) == list(range(8)) and not view.flags.writeable
        assert pool.stats().published == 1
        del view
        assert pool.stats().published == 0 and pool.stats().in_use == 0
        with pytest.raises(queue.Empty):
            asyncio.run(s.get_async(timeout=0.05))
        s.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("point", ["publish", "topic-release"])
def test_a_process_killed_inside_publish_or_release_leaves_a_whole_pool(name: str, popen, point: str) -> None:
    with Mempool.create(name, min_nr=2, slot_size=64, capacity=8).destroying() as pool:
        t = pool.topic("t", depth=4)
        s = t.subscribe()
        victim = start_child(popen, name)
        if point == "publish":
            victim.call("t = pool.topic('t'); h = pool.alloc()")
            victim.send(f"shmpool.testing.crash_at({point!r}); t.publish(h)")
        else:
            victim.call("s2 = pool.topic('t').subscribe()")
            s.close()
            h = pool.alloc()
            t.publish(h)
            victim.call("h = s2.get()")
            victim.send(f"shmpool.testing.crash_at({point!r}); s2.release(h)")
        victim.wait(30)
        h2 = pool.alloc(timeout=30)  # takes the lock over from the dead victim: repaired
        pool.free(h2)
        pool.reclaim_dead()
        check_whole(pool)
        st = pool.stats()
        assert st.published == 0 and st.in_use == 0, st
        if point == "publish":  # never half: the subscriber got nothing
            with pytest.raises(queue.Empty):
                s.get_nowait()
            s.close()


def test_inspect_shows_topics_and_the_audit_checks_every_reference(name: str, popen) -> None:
    with Mempool.create(name, min_nr=2, slot_size=64, capacity=16).destroying() as pool:
        t = pool.topic("frames", depth=8, overflow="drop_oldest")
        mine = t.subscribe()
        child = start_child(popen, name)
        setup_child(child, "frames")
        hs = publish_numbers(pool, t, range(5))
        got = [mine.get() for _ in range(2)]  # 2 received, 3 pending here; 5 pending in the child's
        out = subprocess.run([sys.executable, "-m", "shmpool.cli", name, "--json"], capture_output=True, text=True,
                             timeout=60)
        d = json.loads(out.stdout)
        (row,) = d["topics"]
        assert (row["name"], row["depth"], row["overflow"], row["published"], row["shared"]) == ("frames", 8,
                                                                                                  "drop_oldest", 5, 5)
        subs = {s["pid"]: s for s in row["subscribers"]}
        assert (subs[child.pid]["pending"], subs[child.pid]["received"], subs[child.pid]["alive"]) == (5, 0, True)
        assert (subs[os.getpid()]["pending"], subs[os.getpid()]["received"]) == (3, 2)
        assert d["published"] == pool.stats().published == 5 and d["slot_counts"]["shared"] == 5
        assert d["slot_map"].count("S") == 5
        text = subprocess.run([sys.executable, "-m", "shmpool.cli", name], capture_output=True, text=True,
                              timeout=60).stdout
        assert "topics (1):" in text and "3/8 pending, 2 received" in text
        assert audit(pool) == []
        v = views(pool)
        slot = hs[4] & 0xFFFFFF
        saved = v.refs[slot]
        v.refs[slot] = saved & ~1  # a subscription's pending reference lost: its ring still names the slot
        found = audit(pool)
        assert found and any("pending" in f or "references" in f for f in found), found
        v.refs[slot] = saved
        assert audit(pool) == []
        for h in got:
            mine.release(h)
        mine.close()
        child.call("s.close()")
        child.finish()
        assert pool.stats().in_use == 0


def test_closing_the_pool_object_closes_its_subscriptions(name: str) -> None:
    with Mempool.create(name, min_nr=2, slot_size=64, capacity=8).destroying() as pool:
        t = pool.topic("t", depth=2)
        other = Mempool.attach(name)
        s = other.topic("t").subscribe()
        publish_numbers(pool, t, [1, 2])
        s.get()
        assert pool.stats().published == 2 and t.subscribers == 1
        other.close()  # a subscription nobody can use any more: released, never blocking a publisher
        assert s.closed and t.subscribers == 0 and pool.stats().published == 0
        publish_numbers(pool, t, [3, 4, 5])  # (no subscriber: freed at once)
        assert pool.stats().in_use == 0


@pytest.mark.timeout(60)
def test_a_publisher_never_waits_on_a_dead_subscribers_full_buffer(name: str, popen) -> None:
    with Mempool.create(name, min_nr=2, slot_size=64, capacity=16).destroying() as pool:
        t = pool.topic("t", depth=2)  # overflow "block"
        killed_subscriber(popen, name, pool, t, [1, 2], gets=0)  # its buffer is full
        h = pool.alloc()
        t.publish(h, timeout=10)  # no reclaim_dead first: the dead subscription is dropped, not waited on
        assert t.subscribers == 0 and pool.stats().in_use == 0


@pytest.mark.timeout(60)
def test_check_reports_a_dead_subscription_until_it_is_reclaimed(name: str, popen) -> None:
    with Mempool.create(name, min_nr=2, slot_size=64, capacity=16).destroying() as pool:
        t = pool.topic("t", depth=8)
        pid = killed_subscriber(popen, name, pool, t, range(3), gets=1)
        check = [sys.executable, "-m", "shmpool.cli", name, "--check"]
        out = subprocess.run(check, capture_output=True, text=True, timeout=60)
        assert out.returncode == 1 and f"subscription 0 of dead pid {pid}" in out.stdout, out.stdout
        assert "2 pending and 1 received" in out.stdout and "--reclaim-dead" in out.stdout
        reclaim = subprocess.run([*check[:-1], "--reclaim-dead"], capture_output=True, text=True, timeout=60)
        assert reclaim.returncode == 0, reclaim.stderr
        out = subprocess.run(check, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout
        assert pool.stats().in_use == 0 and t.subscribers == 0


@pytest.mark.timeout(180)
def test_two_publishers_three_subscribers_one_killed_midstream(name: str, spawn) -> None:
    import multiprocessing as mp

    import children

    ctx = mp.get_context("spawn")
    n = 300
    with Mempool.create(name, min_nr=4, slot_size=64, capacity=64).destroying() as pool:
        pool.topic("t", depth=16)
        go, ready, results = ctx.Event(), ctx.Queue(), ctx.Queue()
        subs = [spawn(children.topic_subscriber, name, "t", 2 * n, ready, results) for _ in range(3)]
        for _ in subs:
            ready.get(timeout=60)
        pubs = [spawn(children.topic_publisher, name, "t", n, go, results) for _ in range(2)]
        go.set()
        victim = subs[0]
        wait_for(lambda: pool.stats().published > 0, what="elements to be in flight")
        victim.kill()
        victim.join(30)
        wait_for(lambda: pool.reclaim_dead() >= 0 and pool.topic("t").subscribers == 2, timeout=60,
                 what="the dead subscriber to be dropped")
        reports = [results.get(timeout=120) for _ in range(4)]  # two publishers, two surviving subscribers
        assert not [r for r in reports if r[0] == "error"], reports
        pids = sorted(p.pid for p in pubs)
        seen = [r[2] for r in reports if r[0] == "seen"]
        assert len(seen) == 2 and all(sorted(s) == pids and set(s.values()) == {n} for s in seen), seen
        for p in pubs + subs[1:]:
            p.join(30)
            assert p.exitcode == 0
        pool.reclaim_dead()
        s = pool.stats()
        assert s.in_use == 0 and s.published == 0, s
        assert audit(pool) == []


@pytest.mark.timeout(60)
def test_closing_a_subscription_ends_a_get_blocked_on_it(name: str) -> None:
    with Mempool.create(name, min_nr=2, slot_size=64, capacity=8).destroying() as pool:
        s = pool.topic("t", depth=4).subscribe()
        ended: list[BaseException] = []

        def getter() -> None:
            try:
                s.get(timeout=30)
            except BaseException as exc:  # (what ended it is the finding)
                ended.append(exc)

        thread = threading.Thread(target=getter)
        thread.start()
        wait_for(lambda: views(pool).subs[S_GETTERS] > 0 or not thread.is_alive(),
                 what="the getter to sleep")  # (subscription 0 of topic 0)
        s.close()
        thread.join(10)
        assert not thread.is_alive() and ended and isinstance(ended[0], ValueError), ended
