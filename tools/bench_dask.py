#!/usr/bin/env python3
"""bench_dask: a 1 MiB array passed between two tasks on two worker
processes of one host, through shmpool.dask against Dask's own transfer.

    python tools/bench_dask.py            # the figures, a table
    python tools/bench_dask.py --json
    python tools/bench.py dask            # the same, as a section of bench

One LocalCluster (two worker processes with nannies, one thread each) with
shmpool.dask's PoolPlugin registered. Each round hands ``n`` arrays from a
producer task on worker A to a consumer task on worker B, which reads
every byte (a sum), in both ways, one after the other:

- ``shmpool``: the producer writes into ``local_pool().alloc_array`` (the
  README's idiom): the array travels by reference (a share, then a take:
  no copy);
- ``dask``: the producer makes a plain ``np.empty``: Dask's own path
  (distributed's numpy serializer, its frames over the TCP comm, copied
  into the consumer's memory).

The figure is microseconds per hand-off (submit to gathered result, ``n``
in flight at once), every round, and the ratio of the medians. A round
whose sums are wrong, or a run that left elements held, is a failure.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from typing import Any

import numpy as np

MIB = 1 << 20


def produce_pool(i: int) -> Any:
    from shmpool.dask import local_pool

    a = local_pool().alloc_array((MIB // 8,), np.float64)
    a[:] = i
    return a


def produce_plain(i: int) -> Any:
    a = np.empty(MIB // 8, np.float64)
    a[:] = i
    return a


def consume(a: Any) -> float:
    return float(a.sum())


def in_use() -> int:
    from shmpool.dask import local_pool

    return local_pool().stats().in_use


def bench_dask(reps: int, tag: str | None = None) -> dict[str, Any]:
    from distributed import Client, LocalCluster

    from shmpool.dask import PoolPlugin

    n, rounds = (20, 3) if reps < 10 else (100, 7)
    name = f"bench-dask-{tag or os.getpid()}"  # (the host's pool: NAME@HOST)
    runs: dict[str, list[float]] = {"shmpool": [], "dask": []}
    makers = {"shmpool": produce_pool, "dask": produce_plain}
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
        client.register_plugin(PoolPlugin(name, min_nr=4, slot_size=MIB, capacity=2 * n + 8))
        a, b = sorted(client.scheduler_info()["workers"])
        for r in range(rounds + 1):  # round 0 warms both paths up, and is not counted
            for kind, make in makers.items():
                t0 = time.perf_counter()
                made = client.map(make, range(n), workers=[a], pure=False)
                sums = client.gather(client.map(consume, made, workers=[b], pure=False))
                took = time.perf_counter() - t0
                if sums != [float(i) * (MIB // 8) for i in range(n)]:
                    raise RuntimeError(f"dask bench: {kind} round {r} summed wrong")
                del made
                if r:
                    runs[kind].append(took / n * 1e6)
        deadline = time.monotonic() + 30
        while set(client.run(in_use).values()) != {0}:  # the keys released: every element back
            if time.monotonic() > deadline:
                raise RuntimeError(f"dask bench: elements still held {client.run(in_use)}")
            time.sleep(0.05)
    med = {k: statistics.median(v) for k, v in runs.items()}
    return {
        "handoffs_per_round": n, "rounds": rounds,
        "shmpool_us_per_handoff": round(med["shmpool"], 1),
        "dask_us_per_handoff": round(med["dask"], 1),
        "shmpool_runs_us": [round(x, 1) for x in runs["shmpool"]],
        "dask_runs_us": [round(x, 1) for x in runs["dask"]],
        "dask_vs_shmpool": round(med["dask"] / med["shmpool"], 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    out = bench_dask(4 if args.quick else 20)
    print(json.dumps(out, indent=2) if args.json else "\n".join(f"{k:<26} {v}" for k, v in out.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
