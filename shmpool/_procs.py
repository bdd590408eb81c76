"""Process identity: a pid plus the time the process started.

A pid alone does not name a process for long: Linux reuses pids (pid_max is
often 32768), so an element or a lock recorded under a pid could otherwise be
attributed to a stranger that got the pid later. Everything shmpool records
about a process is therefore the pair (pid, start time), the start time being
the kernel's own, in clock ticks since boot (field 22 of /proc/PID/stat):
exact, and the same whoever reads it.

A zombie (exited, not yet reaped by its parent) counts as dead: it will never
free anything.

Pids name processes for people. For the pool itself, whether a holder lives
is decided by OFD locks (``entry_alive``), which work across pid namespaces:
two containers sharing /dev/shm see each other's pids as strangers.
"""

from __future__ import annotations

import fcntl
import os
import struct

import numpy as np

from ._layout import P_EPOCH, P_PID, P_START, PROC_WORDS, Geometry
from ._typing import Array

#: fcntl's F_OFD_GETLK (Linux; the fcntl module has it from Python 3.9 on
#: some builds only).
F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)


def start_ticks(pid: int) -> int | None:
    """Start time of process ``pid`` in clock ticks since boot, or None if
    there is no such live process (absent, zombie, or unreadable)."""
    if pid <= 0:
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) may hold spaces and parentheses: fields
    # after it start past the last ')'.
    fields = stat[stat.rindex(b")") + 2 :].split()
    if fields[0] in (b"Z", b"X", b"x"):
        return None
    return int(fields[19])  # field 22 overall


def is_alive(pid: int, start: int) -> bool:
    """Whether the process that was ``pid`` when it started at ``start`` is
    still running (False once the pid belongs to somebody else)."""
    return start != 0 and start_ticks(pid) == start


def self_identity() -> tuple[int, int]:
    pid = os.getpid()
    start = start_ticks(pid)
    assert start is not None
    return pid, start


def entry_alive(fd: int, geo: Geometry, entry: int) -> bool:
    """Whether some open file description holds the OFD lock on registry
    entry ``entry``'s byte of the segment open as ``fd``: whether the
    process that registered there lives (in any pid namespace). The
    description ``fd`` must not be one that holds such locks itself."""
    flock = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, geo.live_byte(entry), 1, 0)
    try:
        got = fcntl.fcntl(fd, F_OFD_GETLK, flock)
    except OSError:
        return True  # cannot tell: never call a process dead on a guess
    return bool(struct.unpack("hhqqi4x", got)[0] != fcntl.F_UNLCK)


def live_entries(fd: int, geo: Geometry, procs: Array) -> list[int]:
    """The registry entries (rows of ``procs``, a (max_procs, PROC_WORDS)
    array) that belong to live processes."""
    return [int(e) for e in np.flatnonzero(procs[:, P_EPOCH]) if entry_alive(fd, geo, int(e))]


def live_pids(name: str) -> list[tuple[int, int]]:
    """(pid, start) of every live process attached to pool ``name``, pids
    as the process saw itself (another pid namespace's pid is not ours).
    FileNotFoundError if there is no such pool, PoolFormatError if it is not
    a shmpool pool of this layout."""
    from . import _segment
    from ._mapping import read_geometry

    mm, size, fd = _segment.open_shm(name, readonly=True)
    try:
        geo = read_geometry(mm, size)
        raw = np.frombuffer(mm, dtype=np.uint64, count=geo.max_procs * PROC_WORDS, offset=geo.off_procs)
        procs = raw.reshape(geo.max_procs, PROC_WORDS).copy()
        return [(int(procs[e, P_PID]), int(procs[e, P_START])) for e in live_entries(fd, geo, procs)]
    finally:
        os.close(fd)
        try:
            mm.close()
        except BufferError:
            pass
