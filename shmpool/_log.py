"""The ``shmpool`` logger: what an operator should know, as it happens.

``logging.getLogger("shmpool")`` is silent unless the application configures
logging (a ``NullHandler``, as libraries do). The core says, through it:

- WARNING: the pool lock taken over from a process that died holding it;
  elements taken back from dead processes (``reclaim_dead()``, or a new
  process's attach); a reserved element written after it was freed (a poison
  mismatch, also a ``PoisonWarning``); a sleeping allocation that has slept
  longer than its pool object's ``long_sleep`` (5 s by default), with who
  holds the elements, and plainly when the caller's own process holds them
  all (a likely self-deadlock);
- ERROR: damage found (the ``PoolFormatError`` about to be raised).

The records come from the compiled core (it is handed this logger at
import), after the pool lock is released, so a handler never runs while a
pool is locked.
"""

from __future__ import annotations

import logging

__all__ = ["logger"]

logger = logging.getLogger("shmpool")
logger.addHandler(logging.NullHandler())
