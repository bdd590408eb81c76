"""Process identity: a pid plus the time the process started.

A pid alone does not name a process for long: Linux reuses pids (pid_max is
often 32768), so an element or a lock recorded under a pid could otherwise be
attributed to a stranger that got the pid later. Everything shmpool records
about a process is therefore the pair (pid, start time), the start time being
the kernel's own, in clock ticks since boot (field 22 of /proc/PID/stat):
exact, and the same whoever reads it.

A zombie (exited, not yet reaped by its parent) counts as dead: it will never
free anything.
"""

from __future__ import annotations

import errno
import os

from ._layout import COUNTERS, N_PROC_COUNTERS, P_COUNTERS, P_PID, P_SLEEPING, P_START, PROC_WORDS


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


class Registry:
    """The pool's process table (see ``_layout``). Every method is called
    with the pool lock held, except that a live process's cache and counters
    are written by that process alone, without it."""

    __slots__ = ("_procs", "_max", "_hdr")

    def __init__(self, procs: memoryview, max_procs: int, hdr: memoryview) -> None:
        self._procs = procs
        self._max = max_procs
        self._hdr = hdr

    def find(self, pid: int) -> int:
        """Index of ``pid``'s entry, or -1."""
        procs = self._procs
        for i in range(0, self._max * PROC_WORDS, PROC_WORDS):
            if procs[i + P_PID] == pid:
                return i // PROC_WORDS
        return -1

    def pids(self) -> set[int]:
        """Every pid with an entry."""
        procs = self._procs
        return {procs[i] for i in range(P_PID, self._max * PROC_WORDS, PROC_WORDS)} - {0}

    def entry(self, index: int) -> tuple[int, int, int]:
        """(pid, start, sleeping) of entry ``index``."""
        base = index * PROC_WORDS
        procs = self._procs
        return procs[base + P_PID], procs[base + P_START], procs[base + P_SLEEPING]

    def holder_alive(self, pid: int) -> bool:
        """Whether the elements recorded under ``pid`` have a live holder."""
        index = self.find(pid)
        return index >= 0 and is_alive(pid, self._procs[index * PROC_WORDS + P_START])

    def vacancy(self) -> tuple[int, int]:
        """An entry to occupy: (index, 0) for a free one, else (index, pid)
        for a dead process's, which the caller must retire first. OSError if
        every entry belongs to a live process."""
        procs = self._procs
        for i in range(self._max):
            if procs[i * PROC_WORDS + P_PID] == 0:
                return i, 0
        for i in range(self._max):
            pid, start = procs[i * PROC_WORDS + P_PID], procs[i * PROC_WORDS + P_START]
            if not is_alive(pid, start):
                return i, pid
        raise OSError(errno.EUSERS, f"{self._max} live processes are attached to this pool already")

    def occupy(self, index: int, pid: int, start: int) -> None:
        base = index * PROC_WORDS
        procs = self._procs
        procs[base + P_START] = start
        procs[base + P_PID] = pid

    def retire(self, index: int) -> None:
        """Fold the entry's counters into the header's and free the entry
        (its cached slots must have been given back already)."""
        base = index * PROC_WORDS
        procs, hdr = self._procs, self._hdr
        for i in range(N_PROC_COUNTERS):
            hdr[COUNTERS[i][1]] += procs[base + P_COUNTERS + i]
        for i in range(base, base + PROC_WORDS):
            procs[i] = 0

    def add_sleeper(self, index: int, delta: int) -> None:
        self._procs[index * PROC_WORDS + P_SLEEPING] += delta

    def live_sleepers(self) -> int:
        """Clear the sleeper counts of dead processes; return the live total."""
        procs = self._procs
        total = 0
        for i in range(0, self._max * PROC_WORDS, PROC_WORDS):
            n = procs[i + P_SLEEPING]
            if n:
                if is_alive(procs[i + P_PID], procs[i + P_START]):
                    total += n
                else:
                    procs[i + P_SLEEPING] = 0
        return total
