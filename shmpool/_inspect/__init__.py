"""What shmpool-inspect knows about a pool, one concern a module.

Data flows one way, each module using only those before it::

    snapshot   a copy of a pool's metadata, taken without its lock (and who
               holds the lock); finding the pools in /dev/shm
    sizing     the reserve's record against min_nr (the verdict), and how
               long each held element has been out (its hand-out time)
    topics     the topic table, the subscriptions' rings, the topics rows
    numbers    the pool's numbers from a copy (the C derivation stats()
               runs), the slot map, holders, queues, counters: the JSON
    render     the JSON documents as text for a person
    audit      the audit of a pool's views (shmpool.testing.audit runs it
               under the lock) and --check over copies

``shmpool.cli`` parses arguments and runs the commands; it alone attaches
to a pool (``--reclaim-dead``, ``--destroy``). Nothing here imports
``shmpool.pool``. This package re-exports what the CLI and the tools use.
"""

from .audit import check, check_pool
from .numbers import (
    M_ARENA,
    M_CACHED,
    M_DEAD,
    M_HELD,
    M_INVALID,
    M_PARKED,
    M_QUEUED,
    M_RESERVE,
    MAP_ROWS,
    MAP_WIDTH,
    SCHEMA,
    creator,
    creator_alive,
    describe,
    slot_codes,
    slot_map,
    summarize,
)
from .render import render, render_list
from .snapshot import (
    LIST_LOCK_TIMEOUT,
    LOCK_TIMEOUT,
    PROG,
    Copy,
    InspectError,
    PoolMissing,
    find_pools,
    take_copy,
)

__all__ = [
    "LIST_LOCK_TIMEOUT",
    "LOCK_TIMEOUT",
    "MAP_ROWS",
    "MAP_WIDTH",
    "M_ARENA",
    "M_CACHED",
    "M_DEAD",
    "M_HELD",
    "M_INVALID",
    "M_PARKED",
    "M_QUEUED",
    "M_RESERVE",
    "PROG",
    "SCHEMA",
    "Copy",
    "InspectError",
    "PoolMissing",
    "check",
    "check_pool",
    "creator",
    "creator_alive",
    "describe",
    "find_pools",
    "render",
    "render_list",
    "slot_codes",
    "slot_map",
    "summarize",
    "take_copy",
]
