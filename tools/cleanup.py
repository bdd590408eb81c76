#!/usr/bin/env python3
"""Remove pools that an interrupted run left behind.

    python tools/cleanup.py                    # list this user's pools and orphans
    python tools/cleanup.py --yes              # remove those nobody uses
    python tools/cleanup.py --yes --prefix P   # only those whose name starts with P
    python tools/cleanup.py NAME...            # remove these pools (if nobody uses them)
    python tools/cleanup.py --force NAME...    # remove them even if in use

A pool is its segment /dev/shm/shmpool.NAME and its processes' asyncio
FIFOs /dev/shm/fifo.shmpool.NAME.E (its lock and wait channels are words of
the segment: nothing named sem.* is a pool's); an orphan is a FIFO whose
segment is gone, and is always removed.

A pool is in use, and kept unless --force, while its creator is alive (as
shmpool-inspect decides it: by the start time the header recorded) or a
live process is attached to it (its registry says so, across pid
namespaces) or has its segment mapped (seen in /proc, this pid namespace
only: that also covers a pool being created, or one whose registry this
shmpool cannot read). Each kept pool is named with the reason; keeping one
is not an error (exit 0). Removing a pool that processes still use does not
disturb their mappings, but nobody can attach to it any more; a process
that attaches between the check and the removal is not seen.
"""

from __future__ import annotations

import argparse
import os
import re
import struct
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from shmpool import _segment
from shmpool._inspect import creator_alive
from shmpool._layout import H_CREATED_NS, H_CREATOR_PID, H_CREATOR_START, HEADER_WORDS
from shmpool._procs import live_pids, start_ticks

FIFO = re.compile(r"^fifo\.shmpool\.(.+)\.\d+$")  # a process's asyncio wake-up FIFO


def pool_names() -> list[str]:
    """Names of this user's pools and orphan FIFOs in /dev/shm."""
    names = set()
    uid = os.getuid()
    for entry in os.listdir(_segment.SHM_DIR):
        try:
            if os.stat(os.path.join(_segment.SHM_DIR, entry)).st_uid != uid:
                continue
        except FileNotFoundError:
            continue
        if entry.startswith(_segment.SHM_PREFIX):
            names.add(entry[len(_segment.SHM_PREFIX) :])
        elif m := FIFO.match(entry):
            names.add(m.group(1))
    return sorted(names)


def _header(name: str) -> tuple[int, ...] | None:
    """The header words of segment ``name`` (read-only, however damaged),
    None if it has none: no such segment or one shorter than a header."""
    try:
        fd = os.open(_segment.segment_path(name), os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        raw = os.pread(fd, HEADER_WORDS * 8, 0)
    finally:
        os.close(fd)
    return struct.unpack(f"={HEADER_WORDS}Q", raw) if len(raw) == HEADER_WORDS * 8 else None


def mappers() -> dict[str, set[int]]:
    """Segment name -> pids (other than ours) of the processes in this pid
    namespace that map it, from /proc/PID/maps (unreadable ones skipped)."""
    prefix = _segment.segment_path("")
    found: dict[str, set[int]] = {}
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/maps") as f:
                for line in f:
                    path = line.split(maxsplit=5)[5:]
                    path = path[0].rstrip("\n") if path else ""
                    # A " (deleted)" segment is no longer the one under its name.
                    if path.startswith(prefix) and not path.endswith(" (deleted)"):
                        found.setdefault(path[len(prefix) :], set()).add(int(entry))
        except OSError:  # gone, or not ours to read
            continue
    return found


def _who(pid: int, start: int | None = None) -> str:
    """'pid 1234 (python3 -m ...)', without a command when ``pid`` is not
    the process (pid, start) in this pid namespace."""
    if start is not None and start_ticks(pid) != start:
        return f"pid {pid} (in another pid namespace)"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            command = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        command = ""
    if len(command) > 60:
        command = command[:57] + "..."
    return f"pid {pid} ({command})" if command else f"pid {pid}"


def users(name: str, mapped: set[int]) -> list[str]:
    """Why pool ``name`` is in use, one reason per process; [] if nobody
    uses it (or it has no segment: orphan FIFOs)."""
    header = _header(name)
    if header is None and not os.path.exists(_segment.segment_path(name)):
        return []
    reasons: dict[int, str] = {}
    if header is not None:
        pid, start = header[H_CREATOR_PID], header[H_CREATOR_START]
        if creator_alive(pid, header[H_CREATED_NS], start):
            reasons[pid] = f"created by {_who(pid, start or None)}, alive"
    try:
        for pid, start in live_pids(name):
            reasons.setdefault(pid, f"in use by {_who(pid, start)}")
    except Exception:  # gone, damaged, half made, another layout: the creator and /proc decide
        pass
    for pid in sorted(mapped):
        reasons.setdefault(pid, f"mapped by {_who(pid)}")
    return [reasons[pid] for pid in sorted(reasons)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="pools to remove (default: all of this user's, with --yes)")
    parser.add_argument("--yes", action="store_true", help="remove every pool of this user that nobody uses")
    parser.add_argument("--prefix", default="", help="only pools whose name starts with PREFIX")
    parser.add_argument("--force", action="store_true", help="remove pools even if live processes use them")
    args = parser.parse_args(argv)
    names = [n for n in args.names or pool_names() if n.startswith(args.prefix)]
    mapped = mappers()
    if not args.names and not args.yes:
        for n in names:
            why = users(n, mapped.get(n, set()))
            print(n + ("  (in use: " + "; ".join(why) + ")" if why else ""))
        print(f"{len(names)} pool(s); run with --yes to remove those not in use", file=sys.stderr)
        return 0
    for n in names:
        why = [] if args.force else users(n, mapped.get(n, set()))
        if why:
            print(f"kept {n}: " + "; ".join(why))
        else:
            print(("removed " if _segment.unlink(n) else "not found ") + n)
    return 0


if __name__ == "__main__":
    sys.exit(main())
