"""GFP flags, composed from bits as in the kernel (include/linux/gfp.h, v3.2).

Only the may-sleep bit changes what an allocation does here: without it an
allocation that finds the arena failing and the reserve empty returns None;
with it, it sleeps and retries. The I/O and FS bits are kept so that code
ported from the kernel reads the same.
"""

from __future__ import annotations

import enum


class GFP(enum.IntFlag):
    WAIT = 0x10  # __GFP_WAIT: may sleep
    HIGH = 0x20  # __GFP_HIGH: may use emergency pools
    IO = 0x40  # __GFP_IO: may start I/O
    FS = 0x80  # __GFP_FS: may call into the file system


GFP_NOWAIT = GFP(0)
GFP_ATOMIC = GFP.HIGH
GFP_NOIO = GFP.WAIT
GFP_NOFS = GFP.WAIT | GFP.IO
GFP_KERNEL = GFP.WAIT | GFP.IO | GFP.FS

_ALL = int(GFP.WAIT | GFP.HIGH | GFP.IO | GFP.FS)
# Every valid mask -> whether it may sleep: one dict lookup on the hot path.
_MAY_SLEEP = {mask: bool(mask & GFP.WAIT) for mask in range(_ALL + 1) if not mask & ~_ALL}


def may_sleep(gfp: object) -> bool:
    """Whether ``gfp`` allows sleeping; TypeError for a non-int, ValueError
    for bits that are not GFP flags."""
    if type(gfp) is GFP or type(gfp) is int:
        answer = _MAY_SLEEP.get(gfp)  # type: ignore[call-overload]
        if answer is not None:
            return answer
        raise ValueError(f"gfp {gfp:#x} has bits that are not GFP flags (valid: {_ALL:#x})")
    raise TypeError(f"gfp must be a GFP flag combination (an int), not {type(gfp).__name__}")
