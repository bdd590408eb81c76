"""Helpers shared by the tests (importable by spawned children too)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Callable

from shmpool import Mempool
from shmpool.testing import audit, header_word_offset, hold_lock, segment_path

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
    for word in ("H_LOCK_OWNER", "H_LOCK_SINCE_NS", "H_LOCK_WAITERS", "H_LOCK_SEQ"):
        at = header_word_offset(word)
        raw[at : at + 8] = bytes(8)
    return bytes(raw)


def check_whole(pool: Mempool) -> None:
    """Assert the pool's invariants (the audit, under the lock)."""
    assert audit(pool) == []
    s = pool.stats()
    assert s.curr_nr + s.arena_free + s.in_use + s.queued == s.capacity


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
