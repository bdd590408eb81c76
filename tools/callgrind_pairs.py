"""Instructions per alloc+free pair, counted by valgrind's callgrind.

Wall-clock figures on a shared VM swing by 2x from one minute to the next;
callgrind counts instructions, the same whatever else the machine does. For
each path this runs the README's idiom (``free(alloc(GFP_ATOMIC))`` in a
loop) under callgrind twice, with N and 3N pairs, and reports the difference
per pair, so interpreter start-up and pool creation cancel out:

    arena    min_nr 1, capacity 256: the process's cache serves every pair
    reserve  min_nr == capacity: the arena is dry, every alloc takes the
             reserve's top and every free refills it (the process's own
             reserve places, without the lock, after the first)
    queue    the README's hand-off, both of its sides in one process: alloc,
             pool.ndarray(h, np.uint64), q.put(h); then q.get(timeout=30),
             pool.ndarray(h, np.uint64), pool.free(h) (what shmpool adds to
             each message of tools/bench.py pipeline, without the bench's own
             work; the misses between two cores are not instructions)

OpenBLAS's threads (numpy's) spin for a while and would count as work: they
are held to one thread. Exit status 1 if valgrind is missing or a run
failed (it did no work).

    python tools/callgrind_pairs.py [--pairs N] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

CHILD = r"""
import os, sys
from shmpool import GFP_ATOMIC, Mempool
kind, n = sys.argv[1], int(sys.argv[2])
name = f"cg{os.getpid()}"
if kind == "arena":
    pool = Mempool.create(name, min_nr=1, slot_size=64, capacity=256)
elif kind == "queue":
    pool = Mempool.create(name, min_nr=8, slot_size=4096, capacity=512)
else:
    pool = Mempool.create(name, min_nr=64, slot_size=64, capacity=64)
try:
    alloc, free = pool.alloc, pool.free
    if kind == "queue":
        import numpy as np
        q, view, u64 = pool.queue("frames", depth=256), pool.ndarray, np.uint64
        put, get = q.put, q.get
        def pair():
            h = alloc()
            view(h, u64)
            put(h)
            h = get(timeout=30.0)
            view(h, u64)
            free(h)
    else:
        def pair():
            free(alloc(GFP_ATOMIC))
    for _ in range(100):
        pair()
    for _ in range(n):
        pair()
finally:
    pool.destroy()
"""


def instructions(kind: str, n: int) -> int:
    with tempfile.TemporaryDirectory(prefix="shmpool-cg-") as tmp:
        out = os.path.join(tmp, "callgrind.out")
        env = dict(os.environ, OPENBLAS_NUM_THREADS="1", PYTHONHASHSEED="0")  # (hashes decide dict probes)
        run = subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, "-c", CHILD, kind, str(n)],
            capture_output=True, text=True, env=env, timeout=1800, check=False,
        )
        found = re.search(r"Collected : (\d+)", run.stderr)
        if run.returncode != 0 or not found:
            raise RuntimeError(f"callgrind run failed ({kind}, {n}): {run.stderr[-2000:]}")
        return int(found.group(1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=10_000, help="N (default 10000)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None:
        print("callgrind_pairs: valgrind is not installed: nothing measured", file=sys.stderr)
        return 1
    result = {}
    for kind in ("arena", "reserve", "queue"):
        low, high = instructions(kind, args.pairs), instructions(kind, 3 * args.pairs)
        result[kind] = round((high - low) / (2 * args.pairs))
    if args.json:
        print(json.dumps(result))
    else:
        for kind, per in result.items():
            what = "message (both sides)" if kind == "queue" else "alloc+free pair"
            print(f"{kind:8} {per:6d} instructions per {what}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
