#!/usr/bin/env python3
"""bench: shmpool's figures, measured in one run, side by side.

    python tools/bench.py              # every section, a table
    python tools/bench.py --json       # the same as JSON
    python tools/bench.py --quick      # fewer repetitions (the test suite's run)
    python tools/bench.py recovery     # one section

Sections:
  recovery  time from SIGKILL of the lock holder to another process holding
            the lock: with the holder recorded, and killed before it could
            record itself (the orphan bound).

Figures are ratios or medians taken in the same run, on a noisy machine:
compare them with each other, not with another machine's. Nothing is written
into the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from shmpool import GFP_ATOMIC, Mempool  # noqa: E402

HOLD_LOCK = """
import sys, shmpool, posix_ipc
pool = shmpool.Mempool.attach(sys.argv[1])
if sys.argv[2] == "recorded":
    pool._core[1].__enter__()
else:  # taken, but killed before recording itself
    posix_ipc.Semaphore("/shmpool." + sys.argv[1] + ".lock").acquire()
print("ready", flush=True)
sys.stdin.read()
"""


def bench_recovery(reps: int) -> dict[str, Any]:
    name = f"bench-recovery-{os.getpid()}"
    out: dict[str, Any] = {}
    with Mempool.create(name, min_nr=1, slot_size=16, capacity=4) as pool:
        try:
            for kind in ("recorded", "orphan"):
                times = []
                for _ in range(reps if kind == "recorded" else max(2, reps // 4)):
                    child = subprocess.Popen(
                        [sys.executable, "-c", HOLD_LOCK, name, kind],
                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                    )
                    assert child.stdout is not None and child.stdout.readline().strip() == "ready"
                    t0 = time.perf_counter()
                    child.send_signal(signal.SIGKILL)
                    pool.free(pool.alloc(GFP_ATOMIC))  # blocks until recovered
                    times.append(time.perf_counter() - t0)
                    child.wait()
                    child.stdin.close()  # type: ignore[union-attr]
                    child.stdout.close()
                out[f"{kind}_median_ms"] = round(statistics.median(times) * 1e3, 1)
                out[f"{kind}_max_ms"] = round(max(times) * 1e3, 1)
            out["recoveries"] = pool.stats().lock_recoveries
        finally:
            pool.destroy(force=True)
    return out


SECTIONS: dict[str, Callable[[int], dict[str, Any]]] = {
    "recovery": bench_recovery,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sections", nargs="*", choices=[*SECTIONS, []], help="sections to run (default: all)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions: checks that it runs")
    args = parser.parse_args(argv)
    reps = 4 if args.quick else 20
    results: dict[str, Any] = {
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
    }
    for section in args.sections or SECTIONS:
        results[section] = SECTIONS[section](reps)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        m = results["machine"]
        print(f"shmpool bench on {m['platform']}, Python {m['python']}, {m['cpus']} CPUs")
        for section, figures in results.items():
            if section == "machine":
                continue
            print(f"\n{section}")
            for key, value in figures.items():
                print(f"  {key:<28} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
