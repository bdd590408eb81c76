"""Helpers shared by the tests (importable by spawned children too)."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from shmpool import Mempool
from shmpool._layout import H_CURR_NR, Q_GETTERS, Q_PUTTERS, QUEUE_WORDS
from shmpool.queues import Queue
from shmpool.testing import audit, header_word_offset, hold_lock, queue_index, segment_path, views

#: Every pool a test makes has this in its name, so the leak checks can
#: tell this run's leftovers from anybody else's.
#: (Computed in the pytest process; children are handed full names.)
RUN_TAG = f"t{os.getpid()}x"


def snapshot(pool: Mempool) -> bytes:
    """Every byte of the pool's segment except the lock-holder words (which
    record who last took the lock, not pool state: taking the snapshot
    changes them)."""
    with hold_lock(pool), open(segment_path(pool), "rb") as f:
        raw = bytearray(f.read())
    for word in ("H_LOCK_OWNER", "H_LOCK_SINCE_NS", "H_LOCK_WAITERS", "H_LOCK_SEQ", "H_LOCK_WAKING"):
        at = header_word_offset(word)
        raw[at : at + 8] = bytes(8)
    return bytes(raw)


def check_whole(pool: Mempool) -> None:
    """Assert the pool's invariants (the audit, under the lock)."""
    assert audit(pool) == []
    s = pool.stats()
    assert s.curr_nr + s.arena_free + s.in_use + s.queued == s.capacity


def assert_settled(pool: Mempool, **expected: int) -> None:
    """The audit passes and the stats fields named say what is expected."""
    check_whole(pool)
    s = pool.stats()
    assert {field: getattr(s, field) for field in expected} == expected


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll ``predicate`` until it holds or ``timeout`` passes (then fail)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.002)


def run_python(code: str, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a separate interpreter (python -c) and wait for it."""
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


# ----------------------------------------------------------------------
# The segment's words, read and written as bytes of its file (the file is
# the shared memory itself: what is written here every process sees)


def read_word(pool: Mempool | str, offset: int) -> int:
    """The unsigned 64-bit word at byte ``offset`` of the pool's segment."""
    with open(segment_path(pool), "rb") as f:
        return int(struct.unpack("=Q", os.pread(f.fileno(), 8, offset))[0])


def write_word(pool: Mempool | str, offset: int, value: int) -> None:
    """Write one unsigned 64-bit word at byte ``offset`` of the segment (damage)."""
    with open(segment_path(pool), "r+b") as f:
        assert os.pwrite(f.fileno(), struct.pack("=Q", value), offset) == 8


def reserve_stack(pool: Mempool) -> list[int]:
    """The reserve's slots, bottom first (its top is the last), read under
    the lock."""
    with hold_lock(pool):
        v = views(pool)
        return [int(x) for x in v.stack[: v.hdr[H_CURR_NR]]]


def slot_bytes(pool: Mempool, slot: int) -> bytes:
    """The ``slot_size`` bytes of slot ``slot``, whoever holds it (read
    under the lock)."""
    with hold_lock(pool):
        v = views(pool)
        return bytes(v.data[slot * v.geo.stride : slot * v.geo.stride + pool.slot_size])


def queue_sleepers(pool: Mempool, q: Queue) -> tuple[int, int]:
    """(getters, putters): the threads asleep on queue ``q``'s two wait
    channels, a blocked get and a blocked put (each count one word, read
    without the lock)."""
    words = views(pool).queues[QUEUE_WORDS * queue_index(q) :]
    return int(words[Q_GETTERS]), int(words[Q_PUTTERS])


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Event, list[Any]]:
    """Run fn in a daemon thread: (an event set when it returned or raised,
    a list that then holds its result or its exception)."""
    done, out = threading.Event(), []

    def body() -> None:
        try:
            out.append(fn())
        except BaseException as exc:  # the test reads it
            out.append(exc)
        done.set()

    threading.Thread(target=body, daemon=True).start()
    return done, out
