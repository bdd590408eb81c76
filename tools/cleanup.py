#!/usr/bin/env python3
"""Remove pools that an interrupted run left behind.

    python tools/cleanup.py            # list this user's pools and orphans
    python tools/cleanup.py --yes      # remove them all
    python tools/cleanup.py NAME...    # remove these pools

A pool is its segment /dev/shm/shmpool.NAME and its semaphores
/dev/shm/sem.shmpool.NAME.lock and .wait; an orphan is a semaphore whose
segment is gone. Removing a pool that live processes still use does not
disturb their mappings, but nobody can attach to it any more.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from shmpool import _segment

SEM = re.compile(r"^sem\.shmpool\.(.+)\.(lock|wait)$")


def pool_names() -> list[str]:
    """Names of this user's pools and orphan semaphores in /dev/shm."""
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
        elif m := SEM.match(entry):
            names.add(m.group(1))
    return sorted(names)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="pools to remove (default: all of this user's, with --yes)")
    parser.add_argument("--yes", action="store_true", help="remove every pool of this user")
    args = parser.parse_args(argv)
    names = args.names or pool_names()
    if not args.names and not args.yes:
        for n in names:
            print(n)
        print(f"{len(names)} pool(s); run with --yes to remove them", file=sys.stderr)
        return 0
    for n in names:
        print(("removed " if _segment.unlink(n) else "not found ") + n)
    return 0


if __name__ == "__main__":
    sys.exit(main())
