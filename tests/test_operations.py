"""Operating a pool (issue 20): the numbers that size a reserve, the
``shmpool`` logger, and Prometheus metrics.

The numbers are checked against values the test knows: how low the reserve
went by its own allocations, how long an allocation slept between bounds
the test measured around it, how long an element has been held since the
test allocated it. The logger's records are caught with pytest's caplog;
the Prometheus output is read back with prometheus_client's own parser.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from helpers import wait_for
from procs import start_child

from shmpool import GFP_ATOMIC, Mempool, PoisonWarning, PoolFormatError
from shmpool.metrics import METRICS, PoolCollector, exposition, flatten
from shmpool.testing import views

prometheus_client = pytest.importorskip("prometheus_client")  # the test extra installs it
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

INSPECT = [sys.executable, "-m", "shmpool.cli"]
TICK = 0.02  # CLOCK_MONOTONIC_COARSE's resolution is a jiffy: 10 ms at most (HZ=100)


def inspect_json(name: str) -> dict[str, Any]:
    out = subprocess.run([*INSPECT, name, "--json"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def parsed(text: str) -> dict[str, tuple[str, dict[str, str], float]]:
    """Each family of a Prometheus text: its type, its one sample's labels
    and value."""
    families = {}
    for fam in text_string_to_metric_families(text):
        assert len(fam.samples) == 1, fam
        families[fam.name] = (fam.type, fam.samples[0].labels, fam.samples[0].value)
    return families


def expected(stats: dict[str, Any]) -> dict[str, float]:
    return {"shmpool_" + m.name: float(stats[m.key]) for m in METRICS}


def until(seconds: float) -> None:
    """Let ``seconds`` pass (the quantity under test, not a wait for
    another party)."""
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        time.sleep(left)


# ----------------------------------------------------------------------
# Sizing the reserve: low-water mark, slept time, ages, attached


def test_the_low_water_mark_is_the_lowest_curr_nr_seen(name: str, popen) -> None:
    with Mempool.create(name, min_nr=4, slot_size=16, capacity=8, fail_rate=1.0).destroying() as pool:
        assert pool.stats().reserve_low_water == 4  # never drawn on
        held = [pool.alloc(GFP_ATOMIC) for _ in range(3)]  # every arena attempt fails: the reserve serves
        assert pool.stats().reserve_low_water == 1 == pool.stats().curr_nr
        for h in held:
            pool.free(h)
        assert pool.stats().curr_nr == 4 and pool.stats().reserve_low_water == 1  # a record, not the level
        child = start_child(popen, name)  # another process draws it lower
        child.call("[pool.alloc(GFP_ATOMIC) for _ in range(4)]")
        assert pool.stats().reserve_low_water == 0
        assert inspect_json(name)["reserve_low_water"] == 0
        child.finish()
        assert pool.reclaim_dead() == 4  # (an exit does not free what a process holds)


def test_slept_time_is_recorded_within_the_bounds_the_caller_saw(name: str) -> None:
    with Mempool.create(name, min_nr=1, slot_size=16, capacity=1).destroying() as pool:
        assert (pool.stats().longest_sleep, pool.stats().total_sleep) == (0.0, 0.0)
        spans = []
        for pause in (0.4, 0.15):
            h = pool.alloc()
            result: list[Any] = []

            def sleeper(result: list[Any] = result) -> None:
                start = time.monotonic()
                got = pool.alloc(timeout=30)  # sleeps until the main thread frees
                result.append((got, time.monotonic() - start))

            t = threading.Thread(target=sleeper)
            t.start()
            wait_for(lambda: pool.stats().nr_waiters == 1, what="the allocation to sleep")
            until(pause)
            pool.free(h)
            t.join(30)
            got, span = result[0]
            spans.append(span)
            pool.free(got)
            s = pool.stats()
            assert pause <= s.longest_sleep <= max(spans)  # asleep at least the pause, at most the whole call
        assert s.longest_sleep >= 0.4 and 0.55 <= s.total_sleep <= sum(spans)
        assert s.longest_sleep < s.total_sleep


def test_an_async_allocation_sleep_counts_too(name: str) -> None:
    with Mempool.create(name, min_nr=1, slot_size=16, capacity=1).destroying() as pool:
        h = pool.alloc()

        async def main() -> float:
            start = time.monotonic()
            task = asyncio.ensure_future(pool.alloc_async(timeout=30))
            while pool.stats().nr_waiters == 0:
                assert time.monotonic() - start < 20, "alloc_async never slept"
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)
            pool.free(h)
            pool.free(await task)
            return time.monotonic() - start

        span = asyncio.run(main())
        s = pool.stats()
        assert 0.2 <= s.longest_sleep <= span and s.total_sleep == s.longest_sleep


def test_each_held_element_has_its_age_beside_its_holder(name: str, popen) -> None:
    with Mempool.create(name, min_nr=1, slot_size=16, capacity=8).destroying() as pool:
        t0 = time.monotonic()
        old = pool.alloc()
        until(0.5)
        young = pool.alloc()
        t1 = time.monotonic()
        child = start_child(popen, name)
        theirs = child.call("pool.alloc()")
        d = inspect_json(name)
        span = time.monotonic() - t0
        ages = {row["handle"]: row for row in d["oldest_held"]}
        assert set(ages) == {old, young, theirs}
        assert d["oldest_held"][0]["handle"] == old  # oldest first
        # (hand-out times are the coarse clock's: up to a tick early, so an age up to a tick more)
        assert 0.5 <= ages[old]["age"] <= span + TICK
        assert ages[young]["age"] <= time.monotonic() - t1 + TICK and ages[young]["age"] < ages[old]["age"]
        assert ages[old]["pid"] == os.getpid() and ages[theirs]["pid"] == child.pid and ages[theirs]["alive"]
        mine = next(h for h in d["holders"] if h["pid"] == os.getpid())
        assert mine["oldest_age"] == ages[old]["age"]
        assert d["attached"] == pool.stats().attached == 2
        child.call("pool.free(%d)" % theirs)
        child.finish()
        wait_for(lambda: pool.stats().attached == 1, what="the child to count as gone")
        pool.free(old)
        pool.free(young)


def test_the_verdict_on_min_nr_says_what_the_reserve_went_through(name: str) -> None:
    with Mempool.create(name, min_nr=2, slot_size=16, capacity=4).destroying() as pool:
        assert "no allocation yet" in inspect_json(name)["sizing"]["verdict"]
        h = pool.alloc()
        pool.free(h)
        assert "never drawn on" in inspect_json(name)["sizing"]["verdict"]
        pool.set_fail_rate(1.0)
        held = [pool.alloc(GFP_ATOMIC) for _ in range(2)]
        sizing = inspect_json(name)["sizing"]
        assert sizing["reserve_low_water"] == 0 and sizing["alloc_reserve"] == 2 and sizing["allocations"] == 3
        assert "just enough" in sizing["verdict"] and "2 of 3" in sizing["verdict"]
        pool.long_sleep = None
        with pytest.raises(TimeoutError):
            pool.alloc(timeout=0.1)
        sizing = inspect_json(name)["sizing"]
        assert sizing["sleeps"] >= 1 and "too small" in sizing["verdict"]
        text = subprocess.run([*INSPECT, name], capture_output=True, text=True, timeout=60).stdout
        assert "too small" in text and "oldest held elements" in text
        for x in held:
            pool.free(x)


# ----------------------------------------------------------------------
# The logger


def test_a_self_deadlocked_sleeper_is_said_plainly(name: str, caplog: pytest.LogCaptureFixture) -> None:
    with Mempool.create(name, min_nr=1, slot_size=16, capacity=2).destroying() as pool:
        assert pool.long_sleep == 5.0  # the default
        held = [pool.alloc(), pool.alloc()]  # every element: nobody else can free one
        pool.long_sleep = 0.2
        caplog.set_level("WARNING", logger="shmpool")
        with pytest.raises(TimeoutError):
            pool.alloc(timeout=1.0)
        said = [r for r in caplog.records if r.name == "shmpool"]
        assert len(said) == 1, [r.getMessage() for r in said]  # once per call
        text = said[0].getMessage()
        assert f"pid {os.getpid()}" in text and "this process itself holds every element" in text
        assert "self-deadlock" in text and said[0].levelname == "WARNING"
        for h in held:
            pool.free(h)


def test_a_long_sleep_names_the_processes_holding_the_elements(name: str, popen,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    with Mempool.create(name, min_nr=1, slot_size=16, capacity=3).destroying() as pool:
        mine = pool.alloc()
        child = start_child(popen, name)
        child.call("[pool.alloc(), pool.alloc()]")
        pool.long_sleep = 0.2
        caplog.set_level("WARNING", logger="shmpool")
        with pytest.raises(TimeoutError):
            pool.alloc(timeout=0.8)
        text = " ".join(r.getMessage() for r in caplog.records if r.name == "shmpool")
        assert f"pid {child.pid} holds 2" in text and f"pid {os.getpid()} (this process) holds 1" in text
        assert "self-deadlock" not in text
        child.finish()
        pool.reclaim_dead()
        pool.free(mine)


def test_no_record_when_the_threshold_is_not_reached_or_none(name: str, caplog: pytest.LogCaptureFixture) -> None:
    with Mempool.create(name, min_nr=1, slot_size=16, capacity=1).destroying() as pool:
        h = pool.alloc()
        caplog.set_level("DEBUG", logger="shmpool")
        with pytest.raises(TimeoutError):
            pool.alloc(timeout=0.3)  # under the default 5 s
        pool.long_sleep = None
        with pytest.raises(TimeoutError):
            pool.alloc(timeout=0.3)
        assert [r for r in caplog.records if r.name == "shmpool"] == []
        with pytest.raises(ValueError):
            pool.long_sleep = -1
        pool.free(h)


def test_a_lock_takeover_and_a_reclaim_are_logged(name: str, popen, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("WARNING", logger="shmpool")
    with Mempool.create(name, min_nr=2, slot_size=16, capacity=6).destroying() as pool:
        child = start_child(popen, name)
        child.call("[pool.alloc(GFP_ATOMIC) for _ in range(3)]")
        child.call("take_lock()")
        child.kill()
        h = pool.alloc(timeout=10)  # takes the lock over from the dead child
        texts = [r.getMessage() for r in caplog.records if r.name == "shmpool"]
        assert any(f"took the pool lock over from pid {child.pid}" in t for t in texts), texts
        assert pool.reclaim_dead() == 3
        texts = [r.getMessage() for r in caplog.records if r.name == "shmpool"]
        assert any("reclaim_dead took back 3 elements" in t for t in texts), texts
        pool.free(h)


def test_damage_and_a_poison_mismatch_are_logged(name: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("WARNING", logger="shmpool")
    with Mempool.create(name, min_nr=2, slot_size=16, capacity=2, poison=True).destroying() as pool:
        h = pool.alloc()
        mv = pool.buffer(h)
        pool.free(h)  # into the reserve, poisoned
        mv[3] = 0  # written after free
        del mv
        with pytest.warns(PoisonWarning):
            again = pool.alloc()
        poisoned = [r for r in caplog.records if "written after it was freed" in r.getMessage()]
        assert len(poisoned) == 1 and poisoned[0].levelname == "WARNING"
        other = pool.alloc()
        pool.free(other)
        pool.free(again)
        v = views(pool)
        top = v.stack[1]
        v.stack[1] = 999  # the reserve's top names no slot
        with pytest.raises(PoolFormatError):
            pool.alloc(GFP_ATOMIC)
        damage = [r for r in caplog.records if r.levelname == "ERROR" and r.name == "shmpool"]
        assert len(damage) == 1 and "is corrupt" in damage[0].getMessage() and name in damage[0].getMessage()
        v.stack[1] = top


def test_the_logger_is_silent_unless_configured() -> None:
    code = ("import logging, shmpool; lg = logging.getLogger('shmpool'); "
            "print(lg.handlers and type(lg.handlers[0]).__name__, lg.propagate)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["NullHandler", "True"], out.stdout + out.stderr


# ----------------------------------------------------------------------
# Prometheus


@pytest.fixture
def busy(name: str) -> Iterator[Mempool]:
    """A pool with some of everything: arena and reserve allocations, an
    element in a queue, four held; all given back at the end."""
    with Mempool.create(name, min_nr=2, slot_size=16, capacity=8).destroying() as pool:
        held = [pool.alloc() for _ in range(3)]
        q = pool.queue("q", depth=4)
        q.put(pool.alloc())
        pool.set_fail_rate(1.0)
        held += [pool.alloc(GFP_ATOMIC)]
        pool.set_fail_rate(0.0)
        yield pool
        for h in held:
            pool.free(h)
        pool.free(q.get())


def test_inspect_prometheus_parses_and_equals_stats(busy: Mempool) -> None:
    out = subprocess.run([*INSPECT, busy.name, "--prometheus"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stderr == ""
    got = parsed(out.stdout)
    assert {k: v[2] for k, v in got.items()} == expected(busy.stats().as_dict())
    assert all(v[1] == {"pool": busy.name} for v in got.values())
    assert got["shmpool_curr_nr"][0] == "gauge" and got["shmpool_alloc_reserve"][0] == "counter"
    assert got["shmpool_queued"][2] == 1 and got["shmpool_attached"][2] == 1 and got["shmpool_in_use"][2] == 4


def test_the_collector_serves_what_stats_says(busy: Mempool) -> None:
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry()
    registry.register(PoolCollector(busy))
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.server_address[1]}/metrics", timeout=30) as r:
            scraped = r.read().decode()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
    got = parsed(scraped)  # (a registry of its own: only the pool's families)
    assert {k: v[2] for k, v in got.items()} == expected(busy.stats().as_dict())
    assert got == parsed(exposition(busy.name, busy.stats().as_dict()))  # the CLI's text says the same


def test_flatten_reads_the_inspector_document_and_stats_alike(busy: Mempool) -> None:
    d, s = inspect_json(busy.name), busy.stats().as_dict()
    assert {m.key: flatten(d)[m.key] for m in METRICS} == {m.key: s[m.key] for m in METRICS}


def test_prometheus_is_a_mode_of_its_own() -> None:
    for extra in (["--json"], ["--check"], []):
        args = [*INSPECT, "--prometheus", *extra] + (["x"] if extra else [])
        out = subprocess.run(args, capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and "--prometheus" in out.stderr, (extra, out.stderr)
