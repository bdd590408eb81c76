"""shmpool-demo --seed-run: the seed's simulation, decision for decision.

The seed this project grew from (a description of Linux v3.2's mempool)
ends with a C program: a pool of 3 reserved 64-byte objects over a system
allocator that fails when ``rand() % 100 < 30`` after ``srand(42)``; six
allocations, then six frees, each decision printed. Here a real pool runs
that experiment: ``rng="glibc"`` makes its arena draw from glibc's
``rand()`` as ``srand(seed)`` starts it, one draw per arena attempt, so it
decides exactly as the program does, and this prints what the pool did in
the program's own words, line for line (the arena has room for every
allocation, as malloc has: only the draws make it fail).

Every line is read off the pool, not computed: an allocation's "[SYS]
Allocation FAILED" is the pool's count of injected failures going up, its
outcome the event the pool's trace reports, "remaining" and "count" the
reserve's depth right after.

Then the same run with the operations spread over several processes in
turn, each attached to a pool of its own: the draws are made under the pool
lock in the order the processes ask the arena, so the decisions are the
same, which the run checks (exit 1 if not).
"""

from __future__ import annotations

import multiprocessing as mp
from typing import Any

from . import GFP_ATOMIC, Mempool

MIN_NR, SLOT_SIZE, OBJECTS, FAIL_PERCENT = 3, 64, 6, 30


class _Pool:
    """One process's view of the experiment's pool: each call returns the
    program's lines for what the pool did."""

    def __init__(self, pool: Mempool) -> None:
        self.pool = pool
        self.events: list[tuple[str, int]] = []
        pool.trace = lambda event, handle, curr_nr: self.events.append((event, curr_nr))

    def alloc(self) -> tuple[list[str], int | None]:
        self.events.clear()
        faults = self.pool.stats().faults_injected
        h = self.pool.alloc(GFP_ATOMIC)
        lines = ["[MEMPOOL] Alloc request"]
        if self.pool.stats().faults_injected > faults:
            lines.append("    [SYS] Allocation FAILED")
        (event, curr_nr), = self.events
        if event == "alloc-arena":
            lines.append("    Regular alloc succeeded")
        elif event == "alloc-reserve":
            lines.append(f"    Using pool reserve (remaining={curr_nr})")
        else:
            lines.append("    FATAL: Pool exhausted!")
        return lines, h

    def free(self, h: int) -> list[str]:
        self.events.clear()
        self.pool.free(h)
        (event, curr_nr), = self.events
        if event == "free-reserve":
            return [f"[MEMPOOL] Free: returned to pool (count={curr_nr})"]
        return ["[MEMPOOL] Free: freed to system"]


def _worker(name: str, conn: Any) -> None:
    """A process of the spread run: attaches, then allocates or frees when
    told, answering with the program's lines."""
    pool = Mempool.attach(name)
    try:
        mine = _Pool(pool)
        while (order := conn.recv()) is not None:
            conn.send(mine.alloc() if order == "alloc" else (mine.free(order), None))
    finally:
        pool.close()


def _experiment(alloc: Any, free: Any) -> list[str]:
    """The program's main after the pool is made: six allocations, then the
    frees of those that succeeded, in order."""
    lines = ["", f"--- Allocating {OBJECTS} objects ---"]
    objs = []
    for i in range(OBJECTS):
        said, h = alloc(i)
        lines += said
        objs.append(h)
    lines += ["", "--- Freeing objects ---"]
    for i, h in enumerate(objs):
        if h is not None:
            lines += free(i, h)
    return lines


def _create(name: str, seed: int) -> tuple[Mempool, list[str]]:
    pool = Mempool.create(name, min_nr=MIN_NR, slot_size=SLOT_SIZE, capacity=MIN_NR + OBJECTS,
                          fail_rate=FAIL_PERCENT / 100, seed=seed, rng="glibc")
    made = pool.stats().curr_nr  # the pre-fill: exempt from the draws, as the program's malloc loop
    return pool, ["=== MEMPOOL SIMULATION ===", "", f"[MEMPOOL] Creating pool (min={pool.min_nr})"] + [
        f"  Pre-allocated object {i}" for i in range(made)]


def seed_run(name: str, seed: int, processes: int) -> list[str]:
    """The program's output from one process's pool."""
    pool, lines = _create(name, seed)
    try:
        one = _Pool(pool)
        return lines + _experiment(lambda i: one.alloc(), lambda i, h: one.free(h))
    finally:
        pool.destroy(force=True)


def spread_run(name: str, seed: int, processes: int) -> list[str]:
    """The same with operation i made by process i % processes (each frees
    what it allocated), every line tagged with its process."""
    pool, lines = _create(name, seed)
    ctx = mp.get_context("spawn")
    conns, procs = [], []
    try:
        for _ in range(processes):
            here, there = ctx.Pipe()
            p = ctx.Process(target=_worker, args=(name, there), daemon=True)
            p.start()
            conns.append(here)
            procs.append(p)

        def ask(k: int, order: object) -> Any:
            conns[k].send(order)
            if not conns[k].poll(60):
                raise TimeoutError(f"process {k + 1} of the spread run did not answer within 60 s")
            return conns[k].recv()

        def tag(said: list[str], k: int) -> list[str]:
            return [f"{line}  (process {k + 1})" for line in said]

        def alloc(i: int) -> tuple[list[str], int | None]:
            said, h = ask(i % processes, "alloc")
            return tag(said, i % processes), h

        def free(i: int, h: int) -> list[str]:
            return tag(ask(i % processes, h)[0], i % processes)

        return lines + _experiment(alloc, free)
    finally:
        for c in conns:
            c.send(None)
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
                p.join()
        pool.destroy(force=True)


def main(name: str, seed: int, processes: int) -> int:
    """Print the seed's run, then the spread one; 0 if they decided alike."""
    one = seed_run(f"{name}-seed", seed, processes)
    print("\n".join(one), flush=True)
    spread = spread_run(f"{name}-spread", seed, processes)
    start = spread.index("")  # after the pool's making: the experiment
    print(f"\n=== The same run, operation i made by process i % {processes} + 1 ===", flush=True)
    print("\n".join(spread[start + 1 :]), flush=True)
    same = [line.split("  (process ")[0] for line in spread] == one
    print(f"\nsrand({seed}): {processes} processes decided {'as one did' if same else 'OTHERWISE than one'}")
    return 0 if same else 1
