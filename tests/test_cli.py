"""shmpool-inspect, run as the installed console script against live pools."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import posix_ipc
import pytest
from helpers import wait_for

from shmpool import GFP_ATOMIC, Mempool
from shmpool._layout import H_CURR_NR

INSPECT = os.path.join(os.path.dirname(sys.executable), "shmpool-inspect")
ATTACH = "import sys, shmpool\npool = shmpool.Mempool.attach(sys.argv[1])\n"


def inspect(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([INSPECT, *args], capture_output=True, text=True, timeout=timeout)


def raw(name: str) -> bytes:
    with open(f"/dev/shm/shmpool.{name}", "rb") as f:
        return f.read()


def holder(popen, name: str, n: int):
    """A separate interpreter holding n elements; returns it once it does."""
    p = popen(ATTACH + f"hs = [pool.alloc() for _ in range({n})]\nprint('ready', flush=True)\nsys.stdin.read()", name)
    assert p.stdout.readline().strip() == "ready"
    return p


@pytest.fixture
def pool(name: str):
    p = Mempool.create(name, min_nr=3, slot_size=64, capacity=16, fail_rate=0.25, seed=7)
    yield p
    p.destroy(force=True) if not p.closed else None


@pytest.mark.timeout(60)
def test_json_agrees_with_stats_and_attributes_holders(pool: Mempool, name: str, popen) -> None:
    mine = [pool.alloc(GFP_ATOMIC) for _ in range(2)]
    child = holder(popen, name, 4)
    out = inspect(name, "--json")
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    s = pool.stats()
    for key in ("min_nr", "curr_nr", "arena_free", "in_use", "nr_waiters", "fail_rate", "seed", "poison"):
        assert d[key] == getattr(s, key), key
    assert d["counters"] == {k: getattr(s, k) for k in d["counters"]}
    assert d["geometry"]["capacity"] == 16 and d["consistent"] is True
    holders = {h["pid"]: h for h in d["holders"]}
    assert holders[os.getpid()]["held"] == 2 and holders[os.getpid()]["alive"]
    assert holders[child.pid]["held"] == 4 and holders[child.pid]["alive"]
    assert d["slot_map"].count("H") == 6 and "X" not in d["slot_map"]
    text = inspect(name).stdout  # the text shows the same numbers
    assert f"{s.curr_nr}/{s.min_nr}" in text and f"in use     {s.in_use}" in text
    assert f"{child.pid:>8}" in text
    for h in mine:
        pool.free(h)


@pytest.mark.timeout(60)
def test_a_dead_holder_shows_as_dead_and_reclaim_dead_takes_it_back(pool: Mempool, name: str, popen) -> None:
    child = holder(popen, name, 3)
    child.kill()
    child.wait(timeout=10)
    d = json.loads(inspect(name, "--json").stdout)
    dead = [h for h in d["holders"] if h["pid"] == child.pid]
    assert dead and dead[0]["alive"] is False and dead[0]["held"] == 3
    assert d["slot_map"].count("X") == 3
    out = inspect(name, "--reclaim-dead")
    assert out.returncode == 0 and "reclaimed 3 element(s)" in out.stdout
    assert f"pid {child.pid} (dead): 3 held element(s)" in out.stdout
    assert pool.stats().in_use == 0


def test_inspecting_never_changes_the_pool(pool: Mempool, name: str) -> None:
    h = pool.alloc(GFP_ATOMIC)
    before = raw(name)
    for args in ([name], [name, "--json"], [name, "--check"], [name, "--all"], []):
        assert inspect(*args).returncode == 0
    assert raw(name) == before  # every byte, the lock's words included
    pool.free(h)


def test_check_passes_on_a_healthy_pool_and_names_damage(pool: Mempool, name: str) -> None:
    ok = inspect(name, "--check")
    assert ok.returncode == 0 and "all checks pass" in ok.stdout
    with pool._core[1]:
        pool._core[0].hdr[H_CURR_NR] = 4  # damage: more than min_nr
    bad = inspect(name, "--check")
    assert bad.returncode == 1
    assert "curr_nr 4 exceeds min_nr 3" in bad.stdout
    assert json.loads(inspect(name, "--check", "--json").stdout)["findings"]
    with pool._core[1]:
        pool._core[0].hdr[H_CURR_NR] = 3


def test_missing_pool_and_usage_errors_exit_2(name: str) -> None:
    out = inspect(name)
    assert out.returncode == 2 and "no pool named" in out.stderr and out.stdout == ""
    assert inspect("--check").returncode == 2
    assert inspect(name, "--watch", "-1").returncode == 2


def test_a_segment_that_is_not_a_pool_is_refused_and_not_listed(name: str) -> None:
    shm = posix_ipc.SharedMemory(f"/shmpool.{name}", posix_ipc.O_CREX, size=4096)
    os.write(shm.fd, b"definitely not a pool")
    shm.close_fd()
    out = inspect(name)
    assert out.returncode == 2 and "not a usable shmpool pool" in out.stderr
    listing = json.loads(inspect("--json").stdout)
    assert name not in [p["name"] for p in listing]


def test_the_listing_finds_pools_by_magic(pool: Mempool, name: str) -> None:
    listing = json.loads(inspect("--json").stdout)
    mine = [p for p in listing if p["name"] == name]
    assert mine and mine[0]["capacity"] == 16 and mine[0]["creator_alive"] is True
    assert name in inspect().stdout


@pytest.mark.timeout(60)
def test_a_stuck_lock_holder_does_not_hang_it(pool: Mempool, name: str, popen) -> None:
    child = popen(ATTACH + "pool._core[1].__enter__(); print('ready', flush=True); sys.stdin.read()", name)
    assert child.stdout.readline().strip() == "ready"
    out = inspect(name, "--lock-timeout", "0.2", timeout=20)
    assert out.returncode == 0
    assert f"held by pid {child.pid} (alive)" in out.stdout and "may be inconsistent" in out.stdout
    assert max(len(line) for line in out.stdout.splitlines()) <= 80
    d = json.loads(inspect(name, "--json", "--lock-timeout", "0.2").stdout)
    assert d["consistent"] is False and d["lock"]["pid"] == child.pid and d["lock"]["held_for_s"] >= 0
    check = inspect(name, "--check", "--lock-timeout", "0.2")
    assert check.returncode == 1 and "taken without it" in check.stdout
    child.kill()
    child.wait(timeout=10)


@pytest.mark.timeout(60)
def test_watch_redraws_and_stops_on_sigint(pool: Mempool, name: str) -> None:
    p = subprocess.Popen([INSPECT, name, "--watch", "0.1", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = json.loads(p.stdout.readline())
        pool.free(pool.alloc(GFP_ATOMIC))
        second = json.loads(p.stdout.readline())
        assert "rates" in second and "rates" not in first
        p.send_signal(signal.SIGINT)
        assert p.wait(timeout=10) == 0
        assert "Traceback" not in p.stderr.read()
    finally:
        p.kill()
        p.wait()
        p.stdout.close()
        p.stderr.close()


@pytest.mark.timeout(60)
def test_watch_exits_when_the_pool_disappears(name: str) -> None:
    pool = Mempool.create(name, min_nr=1, slot_size=16, capacity=2)
    p = subprocess.Popen([INSPECT, name, "--watch", "0.1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: bool(p.stdout.readline()), what="a first frame")
        pool.destroy()
        assert p.wait(timeout=20) == 0
        assert "is gone" in p.stderr.read()
    finally:
        p.kill()
        p.wait()
        p.stdout.close()
        p.stderr.close()
