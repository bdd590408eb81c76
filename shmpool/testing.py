"""What tests need from a pool, without private names.

Tests of a shared-memory pool must do what no user should: hold the pool
lock across Python code (to play a stopped holder), write bytes into the
segment (to play damage), and look at the pool's own words. This module is
the one door for that, documented and kept stable, so that tests (ours and
anybody's) never reach into private attributes:

- ``hold_lock(pool, timeout=None)``: a context manager in which the calling
  process holds the pool lock as a recorded holder (its token in the lock
  word, as any holder's); TimeoutError if it does not come within
  ``timeout``. Leaving it completes the frees parked meanwhile.
- ``segment_path(pool)``: the segment's file (open it, map it, write it).
- ``slot_word_offset(pool, handle)``: the byte offset of that element's slot
  word in the segment file.
- ``header_word_offset(name)``: the byte offset of a header word (``H_*`` of
  ``shmpool._layout``, e.g. ``"H_CURR_NR"``).
- ``entry_offset(pool, entry, field)``: a registry entry's word (``P_*``).
- ``registry_entry(pool)``: this process's registry entry in the pool.
- ``cached(pool)``: how many slots this process's cache holds.
- ``queue_index(queue)``: the queue's entry in the pool's queue table (its
  words are ``views(pool).queues[QUEUE_WORDS * index + Q_*]``).
- ``audit(pool)``: every broken invariant, one sentence each (the lock held).
- ``crash_at(point)``: SIGKILL this process the next time it reaches one of
  ``CRASH_POINTS`` of the core (a test of repair after a death there).
- ``stop_at(point)``: SIGSTOP this process once, the next time it reaches
  one of ``CRASH_POINTS`` (a live process paused in the middle of an
  operation; SIGCONT lets it go on).
- ``sleep_retry(alloc=None, queue=None)``: how often an unwoken sleeper
  retries, in seconds (lengthen it so that only a wake-up can end a sleep);
  returns the previous periods.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from . import _layout, _segment
from ._core import CRASH_POINTS as _CRASH_POINTS
from ._core import crash_at as _crash_at
from ._core import retry as _retry
from ._core import set_retry as _set_retry
from ._inspect.audit import audit as audit_views
from ._mapping import Views
from .pool import Mempool
from .queues import Queue

CRASH_POINTS: tuple[str, ...] = _CRASH_POINTS

__all__ = [
    "CRASH_POINTS",
    "audit",
    "cached",
    "crash_at",
    "entry_offset",
    "header_word_offset",
    "hold_lock",
    "queue_index",
    "registry_entry",
    "segment_path",
    "sleep_retry",
    "slot_word_offset",
    "stop_at",
    "views",
]


@contextlib.contextmanager
def hold_lock(pool: Mempool, timeout: float | None = None) -> Iterator[None]:
    """Hold ``pool``'s lock for the block, as this process (a recorded
    holder: stop or kill the process inside it to test what others do).
    While it is held, every reserve place lent to a process (but one that
    process is moving this instant) is back in the reserve's stack, so
    ``views`` show the reserve as the kernel's one stack, bottom first:
    ``stack[:hdr[H_CURR_NR]]``."""
    core = pool._core
    core.hold(timeout)
    try:
        yield
    finally:
        core.unhold()


def segment_path(pool: Mempool | str) -> str:
    """The file that holds the pool's segment (``/dev/shm/shmpool.NAME``)."""
    return _segment.segment_path(pool if isinstance(pool, str) else pool.name)


def slot_word_offset(pool: Mempool, handle: int) -> int:
    """The byte offset of ``handle``'s slot word in the segment file."""
    return int(pool._geo.off_words + 8 * (handle & _layout.INDEX_MASK))


def header_word_offset(name: str) -> int:
    """The byte offset of header word ``name`` (an ``H_*`` of the layout)."""
    if not name.startswith("H_") or not isinstance(getattr(_layout, name, None), int):
        raise ValueError(f"no header word {name!r}")
    return 8 * int(getattr(_layout, name))


def entry_offset(pool: Mempool, entry: int, field: str) -> int:
    """The byte offset of word ``field`` (a ``P_*`` of the layout) of
    registry entry ``entry``."""
    if not field.startswith("P_") or not isinstance(getattr(_layout, field, None), int):
        raise ValueError(f"no registry word {field!r}")
    if not 0 <= entry < pool._geo.max_procs:
        raise ValueError(f"no registry entry {entry}")
    return int(pool._geo.off_procs + 8 * (_layout.PROC_WORDS * entry + getattr(_layout, field)))


def registry_entry(pool: Mempool) -> int:
    """This process's registry entry in ``pool`` (-1: none)."""
    return int(pool._core.entry)


def cached(pool: Mempool) -> int:
    """How many free arena slots this process's cache of ``pool`` holds."""
    return int(pool._core.cache_n)


def queue_index(queue: Queue) -> int:
    """``queue``'s entry in its pool's queue table (``Q_*`` words at
    ``views(pool).queues[QUEUE_WORDS * index:]``); -1 once the queue object
    is closed."""
    return int(queue._index)


def views(pool: Mempool) -> Views:
    """Typed views of the whole segment (header, slot words, stacks,
    registry, queue table, slots): read them under ``hold_lock`` for a
    consistent picture."""
    return Views(pool._seg.mm, pool._geo)


def audit(pool: Mempool) -> list[str]:
    """Every broken invariant of ``pool``, one sentence each (an empty list
    for a whole pool), checked with the lock held."""
    with hold_lock(pool):
        return audit_views(views(pool))


def crash_at(point: str) -> None:
    """SIGKILL this process the next time the core reaches ``point`` (one
    of CRASH_POINTS; "" turns it off)."""
    _crash_at(point)


def stop_at(point: str) -> None:
    """SIGSTOP this process once, the next time the core reaches ``point``
    (one of CRASH_POINTS; "" turns it off). It goes on from there at
    SIGCONT."""
    _crash_at(point, True)


def sleep_retry(alloc: float | None = None, queue: float | None = None) -> tuple[float, float]:
    """Set how often an unwoken sleeping alloc (``alloc``) and blocked put or
    get (``queue``) retry, in seconds, in this process; None keeps one.
    Returns the periods before."""
    before: tuple[Any, Any] = _retry()
    a = before[0] if alloc is None else int(alloc * 1e9)
    q = before[1] if queue is None else int(queue * 1e9)
    _set_retry(a, q)
    return before[0] / 1e9, before[1] / 1e9
