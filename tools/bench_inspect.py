#!/usr/bin/env python3
"""bench_inspect: how fast shmpool-inspect lists, shows and audits a big pool.

    python tools/bench_inspect.py                 # 1,000,000 slots of 64 bytes
    python tools/bench_inspect.py --json          # the figures as JSON
    python tools/bench_inspect.py --slots 100000 --reps 5

It creates one pool (a unique name), holds ``--held`` elements in this
process and ``--dead`` in a child that is then killed (so the holders table
and the slot map have a dead holder to show, and ``--check`` a finding:
elements held by a dead process), and times:

- in-process, best of ``--reps``: ``list_pools()``, ``take_copy`` (the
  metadata copy, taken without the lock: how long a critical section must
  stay out of the way for a quiet copy; and with the poison scan of the
  reserve), show (copy + describe + render), JSON (copy + describe +
  json.dumps), and ``check_pool`` (copy + audit; with a finding it confirms
  it in two more copies, 0.25 s apart in all: ``--dead 0`` times a clean
  pool);
- end to end, the installed console script as a subprocess (interpreter
  start and imports included; ``--help`` gives that floor).

The pool is idle while it is timed, so every copy is quiet at the first try.

The pool is destroyed and the child reaped in a ``finally``, also on Ctrl-C
and SIGTERM: nothing is left in /dev/shm.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

from shmpool import GFP_ATOMIC, Mempool, _segment, cli

INSPECT = os.path.join(os.path.dirname(sys.executable), "shmpool-inspect")
HOLDER = """\
import sys, shmpool
pool = shmpool.Mempool.attach(sys.argv[1])
held = pool.alloc_bulk(int(sys.argv[2]), shmpool.GFP_ATOMIC)
print("ready", flush=True)
sys.stdin.read()
"""


def timed(fn: Callable[[], object], reps: int) -> dict[str, float]:
    """Best and median wall time of ``reps`` calls, in seconds."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"best_s": round(min(times), 4), "median_s": round(statistics.median(times), 4)}


def inspect_command(*args: str) -> list[str]:
    if os.path.exists(INSPECT):
        return [INSPECT, *args]
    return [sys.executable, "-m", "shmpool.cli", *args]


def run_inspect(args: list[str], ok: tuple[int, ...] = (0,)) -> None:
    out = subprocess.run(inspect_command(*args), capture_output=True, text=True, timeout=120)
    if out.returncode not in ok:
        raise RuntimeError(f"shmpool-inspect {' '.join(args)} exited {out.returncode}: {out.stderr.strip()}")


def start_dead_holder(name: str, n: int) -> subprocess.Popen[str] | None:
    """A child that holds ``n`` elements and is then SIGKILLed (reaped by
    the caller); None for n == 0."""
    if n <= 0:
        return None
    child = subprocess.Popen(
        [sys.executable, "-c", HOLDER, name, str(n)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    if child.stdout is None or child.stdout.readline().strip() != "ready":
        raise RuntimeError("the holder child did not start")
    child.kill()
    child.wait(timeout=30)
    return child


def measure(pool: Mempool, reps: int) -> dict[str, Any]:
    name = pool.name
    _, findings = cli.check_pool(name)
    inproc = {
        "list": timed(cli.list_pools, reps),
        "copy (no lock taken)": timed(lambda: cli.take_copy(name, scan_poison=False), reps),
        "copy + poison scan": timed(lambda: cli.take_copy(name), reps),
        "show": timed(lambda: cli.render(cli.describe(cli.take_copy(name, scan_poison=False))), reps),
        "json": timed(lambda: json.dumps(cli.describe(cli.take_copy(name, scan_poison=False))), reps),
        "check": timed(lambda: cli.check_pool(name), reps),
    }
    subproc = {
        "--help (start-up floor)": timed(lambda: run_inspect(["--help"]), reps),
        "list": timed(lambda: run_inspect([]), reps),
        "show": timed(lambda: run_inspect([name]), reps),
        "json": timed(lambda: run_inspect([name, "--json"]), reps),
        "check": timed(lambda: run_inspect([name, "--check"], ok=(0, 1)), reps),  # 1: it found the dead holder
    }
    return {"in_process": inproc, "subprocess": subproc, "check_findings": findings}


def report(figures: dict[str, Any]) -> str:
    g = figures["pool"]
    lines = [
        f"shmpool-inspect on a pool of {g['slots']} slots of {g['slot_size']} bytes "
        f"({g['held']} held here, {g['dead']} by a dead process, poison {'on' if g['poison'] else 'off'})",
        "",
        f"{'':<36} {'best':>9} {'median':>9}",
    ]
    for section, label in (("in_process", "in-process (shmpool.cli)"), ("subprocess", "end to end (console script)")):
        lines.append(label)
        for what, t in figures[section].items():
            lines.append(f"  {what:<34} {t['best_s'] * 1000:>7.1f} ms {t['median_s'] * 1000:>7.1f} ms")
    findings = figures["check_findings"]
    lines += ["", "check: " + ("all checks pass" if not findings else "; ".join(findings))]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--slots", type=int, default=1_000_000, help="capacity of the pool (default 1,000,000)")
    parser.add_argument("--slot-size", type=int, default=64, help="bytes per slot (default 64)")
    parser.add_argument("--min-nr", type=int, default=1000, help="reserve size (default 1000)")
    parser.add_argument("--held", type=int, default=300_000, help="elements held by this process (default 300,000)")
    parser.add_argument("--dead", type=int, default=1000,
                        help="elements held by a killed child (default 1000; 0: none, --check passes)")
    parser.add_argument("--no-poison", action="store_true", help="create the pool without poisoning")
    parser.add_argument("--reps", type=int, default=3, help="repetitions per figure (default 3)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    if args.held + args.dead + args.min_nr > args.slots:
        parser.error("--held + --dead + --min-nr exceed --slots")

    def on_term(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)  # through the finally below

    signal.signal(signal.SIGTERM, on_term)
    name = f"bench-inspect-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    pool = None
    child = None
    try:
        pool = Mempool.create(
            name, min_nr=args.min_nr, slot_size=args.slot_size, capacity=args.slots, poison=not args.no_poison
        )
        held = pool.alloc_bulk(args.held, GFP_ATOMIC) if args.held else None
        child = start_dead_holder(name, args.dead)
        figures = {
            "pool": {"slots": args.slots, "slot_size": args.slot_size, "min_nr": args.min_nr, "held": args.held,
                     "dead": args.dead, "poison": not args.no_poison},
            **measure(pool, args.reps),
        }
        if held is not None:
            pool.free_bulk(held)
    finally:
        if child is not None and child.poll() is None:
            child.kill()
            child.wait()
        if pool is not None:
            pool.destroy(force=True)
        _segment.unlink(name)  # whatever a failed create or destroy left
    print(json.dumps(figures, indent=2) if args.json else report(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
