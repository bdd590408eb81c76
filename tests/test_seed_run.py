"""The seed's simulation reproduced: glibc's rand() as the fault injector's
generator (rng="glibc"), and shmpool-demo --seed-run printing the seed
program's decisions, checked against glibc's own rand() through ctypes."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import subprocess
import sys

import pytest
from helpers import check_whole

from shmpool import GFP_ATOMIC, Mempool

LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
LIBC.srand.argtypes = [ctypes.c_uint]
LIBC.rand.restype = ctypes.c_int


def rand_percent(seed: int, n: int) -> list[int]:
    """glibc's rand() % 100, n times after srand(seed)."""
    LIBC.srand(seed)
    return [LIBC.rand() % 100 for _ in range(n)]


def the_programs_output(seed: int) -> list[str]:
    """What the seed's C program prints, its system allocator's rand()
    calls made with glibc's own rand()."""
    draws = iter(rand_percent(seed, 6))
    out = ["=== MEMPOOL SIMULATION ===", "", "[MEMPOOL] Creating pool (min=3)"]
    out += [f"  Pre-allocated object {i}" for i in range(3)]
    out += ["", "--- Allocating 6 objects ---"]
    curr, objs = 3, []
    for _ in range(6):
        out.append("[MEMPOOL] Alloc request")
        if next(draws) < 30:
            out.append("    [SYS] Allocation FAILED")
            if curr > 0:
                curr -= 1
                out.append(f"    Using pool reserve (remaining={curr})")
                objs.append(True)
            else:
                out.append("    FATAL: Pool exhausted!")
                objs.append(False)
        else:
            out.append("    Regular alloc succeeded")
            objs.append(True)
    out += ["", "--- Freeing objects ---"]
    for got in objs:
        if not got:
            continue
        if curr < 3:
            curr += 1
            out.append(f"[MEMPOOL] Free: returned to pool (count={curr})")
        else:
            out.append("[MEMPOOL] Free: freed to system")
    return out


def test_our_model_of_the_program_is_the_seeds_run() -> None:
    """The issue's account of srand(42): 66, 40, 81, 41, 12, 58; allocator
    four times, the reserve (2 left), the allocator; one free back to the
    reserve, five to the system."""
    assert rand_percent(42, 6) == [66, 40, 81, 41, 12, 58]
    out = the_programs_output(42)
    assert out.count("    Regular alloc succeeded") == 5 and "    Using pool reserve (remaining=2)" in out
    assert out[-6:] == ["[MEMPOOL] Free: returned to pool (count=3)"] + ["[MEMPOOL] Free: freed to system"] * 5


@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed", [42, 1, 5, 4294967295])
def test_seed_run_prints_the_programs_decisions(name: str, seed: int) -> None:
    out = subprocess.run([sys.executable, "-m", "shmpool.demo", "--seed-run", "--seed", str(seed), "--name", name,
                          "--processes", "2"], capture_output=True, text=True, timeout=100)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    want = the_programs_output(seed)
    assert lines[: len(want)] == want
    spread = [line for line in lines[len(want):] if "(process " in line]
    decisions = [line for line in want[8:] if line and not line.startswith("---")]  # after the pool's making
    assert [line.split("  (process ")[0] for line in spread] == decisions
    assert {line.rsplit("(process ", 1)[1] for line in spread} == {"1)", "2)"}
    assert lines[-1] == f"srand({seed}): 2 processes decided as one did"
    assert not [f for f in os.listdir("/dev/shm") if name in f]


def test_glibc_generator_draws_rand_once_per_arena_attempt(name: str) -> None:
    seed, n = 12345, 40
    with Mempool.create(name, min_nr=40, slot_size=8, capacity=80, fail_rate=0.5, seed=seed, rng="glibc") as pool:
        assert pool.rng == "glibc"
        hs, faulted = [], []
        for _ in range(n):
            before = pool.stats().faults_injected
            hs.append(pool.alloc(GFP_ATOMIC))
            faulted.append(pool.stats().faults_injected > before)
        assert faulted == [d < 50 for d in rand_percent(seed, n)]
        s = pool.stats()
        assert (s.alloc_arena, s.alloc_reserve) == (faulted.count(False), faulted.count(True))
        pool.free_bulk(hs)
        # A new seed restarts the sequence as srand(seed) does.
        pool.set_fail_rate(0.25, seed=7)
        again = []
        for _ in range(20):
            before = pool.stats().faults_injected
            pool.free(pool.alloc(GFP_ATOMIC))
            again.append(pool.stats().faults_injected > before)
        assert again == [d < 25 for d in rand_percent(7, 20)]
        check_whole(pool)
        pool.destroy()


def test_the_rng_is_checked(name: str) -> None:
    with pytest.raises(ValueError, match="rng must be one of"):
        Mempool.create(name, min_nr=1, slot_size=8, capacity=2, rng="mt19937")
    with pytest.raises(TypeError):
        Mempool.create(name, min_nr=1, slot_size=8, capacity=2, rng=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unsigned int"):
        Mempool.create(name, min_nr=1, slot_size=8, capacity=2, rng="glibc", seed=1 << 32)
    assert not [f for f in os.listdir("/dev/shm") if name in f]  # refused: nothing made
    with Mempool.create(name, min_nr=1, slot_size=8, capacity=2, rng="glibc", seed=3) as pool:
        with pytest.raises(ValueError, match="unsigned int"):
            pool.set_fail_rate(0.5, seed=1 << 40)
        assert Mempool.create.__kwdefaults__["rng"] == "splitmix64"
        pool.destroy()
    with Mempool.create(name, min_nr=1, slot_size=8, capacity=2, seed=1 << 40) as pool:
        assert pool.rng == "splitmix64"
        pool.destroy()
