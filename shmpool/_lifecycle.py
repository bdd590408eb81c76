"""Making and finding pools: create, attach and open, and what create says
of a name that is taken.

create writes a whole pool before anybody can see it: the segment is made
with O_CREAT|O_EXCL (whoever does owns the name), the header, the slot
words and the arena's free list are written, the reserve is filled, the
creator registers, and the magic number is written last, so a half-made
pool is never mistaken for a whole one. Any error on the way unlinks what
was made.

attach maps an existing segment, checks its header (``_mapping``) and the
cheap signs of damage (``_mapping.quick_check``), and registers the process
(``_attach``). A segment whose magic is still 0 is being created: attach
waits for it, with a deadline (a creator killed half way is reported).

open is attach, or create if there is nothing to attach to, for peers that
start in any order: two processes that open at once get one pool.
"""

from __future__ import annotations

import errno
import os
import random
import time
from typing import Any, TypeVar, cast

import numpy as np

from . import _attach, _procs, _segment
from ._args import check_create, check_fail_rate, check_int, check_queue_name, check_range, check_rng, check_seed
from ._errors import PoolClosedError, PoolFormatError
from ._layout import (
    FLAG_POISON,
    GEN_MASK,
    GEN_SHIFT,
    H_ARENA_FREE,
    H_CREATED_NS,
    H_CREATOR_PID,
    H_CREATOR_START,
    H_FAIL_RATE,
    H_FAIL_THRESHOLD,
    H_FLAGS,
    H_MAGIC,
    H_RNG,
    H_RNG_KIND,
    H_SEED,
    H_STATUS,
    HEADER_BYTES,
    MAGIC,
    MAX_TOPICS,
    OVERFLOW_NAMES,
    RNG_GLIBC,
    ST_ARENA,
    STATUS_LIVE,
    TOPIC_MAX_DEPTH,
    Geometry,
)
from ._mapping import Views, quick_check, read_geometry, write_geometry
from ._procs import self_identity
from .topics import Topic

#: How long open (and attach) wait for another process to finish creating
#: the pool they open (two processes that open at once on a loaded machine).
OPEN_WAIT_SECONDS = 10.0
ATTACH_WAIT_SECONDS = OPEN_WAIT_SECONDS
_FAULT_BITS = 53  # fault draws are 53-bit fractions, exact at 0 and 1

P = TypeVar("P")


class _NotReady(Exception):
    """The segment exists but its creator has not finished it yet."""


def create(cls: type[P], name: str, *, min_nr: object, slot_size: object, capacity: object, fail_rate: object = 0.0,
           seed: object = None, mode: object = 0o600, poison: bool = False, max_processes: object = 256,
           rng: object = "splitmix64") -> P:
    _segment.check_name(name)
    min_nr, slot_size, capacity, mode, max_processes = check_create(min_nr, slot_size, capacity, mode, max_processes)
    rate = check_fail_rate(fail_rate)
    seed = check_seed(seed)
    kind = check_rng(rng, seed)
    if seed is None:
        seed = random.SystemRandom().getrandbits(32 if kind == RNG_GLIBC else 64)
    geo = Geometry.of(slot_size, capacity, max_processes)
    try:
        seg = _segment.create(name, geo.total, mode)
    except FileExistsError:
        raise FileExistsError(errno.EEXIST, existing(name)) from None
    try:
        v = Views(seg.mm, geo)
        hdr = v.hdr
        write_geometry(hdr, geo)
        hdr[H_FLAGS] = FLAG_POISON if poison else 0
        hdr[H_CREATOR_PID], hdr[H_CREATOR_START] = self_identity()
        hdr[H_CREATED_NS] = time.time_ns()
        hdr[H_STATUS] = STATUS_LIVE
        v.fhdr[H_FAIL_RATE] = rate
        hdr[H_FAIL_THRESHOLD] = round(rate * (1 << _FAULT_BITS))
        hdr[H_SEED] = hdr[H_RNG] = seed
        hdr[H_RNG_KIND] = kind
        # Every slot in the arena, generations random, the lowest slots handed out first.
        gens = np.random.default_rng(random.SystemRandom().getrandbits(64)).integers(
            0, GEN_MASK, size=capacity, dtype=np.uint64, endpoint=True
        )
        np.frombuffer(v.words, dtype=np.uint64)[:] = (gens << np.uint64(GEN_SHIFT)) | np.uint64(ST_ARENA)
        np.frombuffer(v.arena, dtype=np.uint32)[:] = np.arange(capacity - 1, -1, -1, dtype=np.uint32)
        hdr[H_ARENA_FREE] = capacity
        pool = cls(name, seg, geo, min_nr=min_nr)  # type: ignore[call-arg]  # fills the reserve, registers
        if kind == RNG_GLIBC:  # srand(seed): the table is the core's to write
            cast(Any, pool)._core.set_faults(rate, seed)
        hdr[H_MAGIC] = MAGIC  # last: from here on the pool is whole
        del v, hdr
    except BaseException:
        _segment.unlink(name)
        raise
    return pool


def _attach_once(cls: type[P], name: str) -> P:
    mm, size, fd = _segment.open_shm(name)
    try:
        if size >= 8 and int.from_bytes(mm[:8], "little") == 0:
            raise _NotReady
        geo = read_geometry(mm, size)
        finding = quick_check(Views(mm, geo))
        if finding:
            raise PoolFormatError(f"pool {name!r} is corrupt: {finding} (shmpool-inspect --check {name} audits it)")
        return cls(name, _segment.Segment(mm, size, fd), geo)  # type: ignore[call-arg]
    except BaseException:
        try:
            mm.close()
        except BufferError:
            pass
        os.close(fd)
        raise


def _waiting(attempt: Any, name: str, seconds: float, what: str) -> Any:
    """attempt(), again while the pool is being created, up to ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return attempt()
        except _NotReady:
            if time.monotonic() > deadline:
                raise PoolFormatError(f"pool {name!r} {what} (its creator may have died while creating it)") from None
            time.sleep(0.005)  # poll with a deadline for the creator to finish


def attach(cls: type[P], name: str) -> P:
    _segment.check_name(name)
    return _waiting(lambda: _attach_once(cls, name), name, ATTACH_WAIT_SECONDS, "was never finished")  # type: ignore[no-any-return]


def open_(cls: type[P], name: str, *, create_: bool, min_nr: object, slot_size: object, capacity: object,
          **create_args: Any) -> P:
    _segment.check_name(name)
    if create_ and (min_nr is None or slot_size is None or capacity is None):
        raise TypeError("Mempool.open() needs min_nr, slot_size and capacity to create the pool (or create=False)")
    want = {k: check_int(v, k) for k, v in (("slot_size", slot_size), ("capacity", capacity)) if v is not None}
    deadline = time.monotonic() + OPEN_WAIT_SECONDS
    while True:
        try:
            pool: Any = _waiting(lambda: _attach_once(cls, name), name, max(0.0, deadline - time.monotonic()),
                                 f"was not finished within {OPEN_WAIT_SECONDS} s")
        except FileNotFoundError:
            if not create_:
                raise
            try:
                return create(cls, name, min_nr=min_nr, slot_size=slot_size, capacity=capacity, **create_args)
            except FileExistsError:
                # Created by another process since our attach found nothing (or being
                # created: a segment not yet sized reads as missing): attach to theirs.
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.001)  # poll with a deadline for the creator to size it
                continue
        have = {"slot_size": pool.slot_size, "capacity": pool.capacity}
        if any(have[k] != v for k, v in want.items()):
            pool.close()
            raise ValueError(
                f"pool {name!r} exists with slot_size={have['slot_size']}, capacity={have['capacity']}, not "
                + ", ".join(f"{k}={v}" for k, v in want.items())
            )
        return pool  # type: ignore[no-any-return]


def leave(pool: Any) -> bool:
    """Mempool.leave: this process lets go of the pool; the last to leave
    destroys it (unlinked here). Every object of the pool in this process
    is closed."""
    if pool.closed:
        raise PoolClosedError(f"pool {pool.name!r} is closed in this object")
    member: _attach.Membership = pool._member
    destroyed, others = member.depart()
    if destroyed:
        _segment.unlink(pool.name)
    for close in [pool.close, *others]:
        close()  # (the entry is gone: each closes without the lock)
    return destroyed


def existing(name: str) -> str:
    """What create() says when ``name`` is taken: whether the pool there is
    stale (its creator and every process attached to it dead) and how to
    remove it, or that it is in use."""
    remove = f"remove it with `shmpool-inspect {name} --destroy` (or `python tools/cleanup.py {name}` from a source checkout)"
    try:
        mm, size, fd = _segment.open_shm(name, readonly=True)
    except FileNotFoundError:
        return f"pool {name!r} already exists (it is being created or destroyed right now)"
    except PermissionError as exc:
        return f"pool {name!r} already exists and this user may not open it ({exc.strerror})"
    with mm:
        head = mm[:HEADER_BYTES]  # a copy: no view keeps the mapping
    os.close(fd)
    if len(head) >= 8 and int.from_bytes(head[:8], "little") == 0:
        return f"pool {name!r} already exists (it is being created right now, or its creator died creating it)"
    try:
        read_geometry(head, size)
    except PoolFormatError as exc:
        return f"pool {name!r} already exists but is no pool this shmpool can use ({exc}); {remove}"
    pid, start = (int.from_bytes(head[8 * w : 8 * w + 8], "little") for w in (H_CREATOR_PID, H_CREATOR_START))
    try:
        live = _procs.live_pids(name)
    except (OSError, PoolFormatError):
        live = []
    creator = _procs.is_alive(pid, start)
    if live or creator:
        return (
            f"pool {name!r} already exists and is in use (its creator, pid {pid}, "
            f"{'is alive' if creator else 'has exited'}; {len(live)} live process(es) attached): attach to it "
            "(Mempool.attach, or Mempool.open to create it only if missing), or choose another name"
        )
    return (
        f"pool {name!r} already exists and is stale: its creator (pid {pid}) and every process attached to it "
        f"have exited (a run that ended without destroying it); {remove}"
    )


def open_topic(member: Any, pool: str, name: str, depth: int | None, overflow: str) -> Topic:
    """Mempool.topic: the topic, created or opened (its checks)."""
    raw = check_queue_name(name)
    if overflow not in OVERFLOW_NAMES:
        raise ValueError(f"overflow is one of {sorted(OVERFLOW_NAMES)}, not {overflow!r}")
    want = 0 if depth is None else check_range(depth, "depth", 1, TOPIC_MAX_DEPTH, "TOPIC_MAX_DEPTH")
    index, have, mode = member.core.topic_open(raw, want, OVERFLOW_NAMES[overflow])
    if index == -1:
        raise FileNotFoundError(2, f"pool {pool!r} has no topic {name!r} (give a depth to create it)")
    if index == -2:
        raise OSError(28, f"pool {pool!r} has {MAX_TOPICS} topics already")
    named = next(k for k, v in OVERFLOW_NAMES.items() if v == mode)
    if want and (have != want or named != overflow):
        raise ValueError(f"topic {name!r} exists with depth {have} and overflow {named!r}, not {want} and {overflow!r}")
    return Topic(member, name, index, have, named)
