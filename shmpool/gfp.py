"""GFP flags with the values of Linux v3.2 (include/linux/gfp.h).

Every bit that a v3.2 mask can hold is accepted, with its v3.2 value, so that
code ported from the kernel passes its masks unchanged:

- ``__GFP_WAIT`` (0x10) is the only bit that changes what an allocation does:
  without it, an allocation that finds the arena failing and the reserve
  empty returns None; with it, it sleeps and retries, never failing.
- ``__GFP_ZERO`` (0x8000) is accepted but elements are not zeroed (a recycled
  element holds what its last user wrote, as a kernel element from the
  reserve does): the first mask with it warns once per process
  (:class:`GFPWarning`), as later kernels' ``WARN_ON_ONCE(gfp_mask &
  __GFP_ZERO)`` in mempool_alloc does.
- Every other bit means nothing to this allocator and is ignored: the zone
  bits (``__GFP_DMA``, ``__GFP_HIGHMEM``, ``__GFP_DMA32``, ``__GFP_MOVABLE``,
  combinations that v3.2 would BUG on included), ``__GFP_HIGH`` (the arena
  has no emergency pool), ``__GFP_IO`` and ``__GFP_FS`` (nothing here does
  I/O), and the modifiers ``__GFP_COLD``, ``__GFP_NOWARN``, ``__GFP_REPEAT``,
  ``__GFP_NOFAIL`` (a sleeping allocation never fails anyway),
  ``__GFP_NORETRY``, ``__GFP_COMP``, ``__GFP_NOMEMALLOC``, ``__GFP_HARDWALL``,
  ``__GFP_THISNODE``, ``__GFP_RECLAIMABLE``, ``__GFP_NOTRACK``,
  ``__GFP_NO_KSWAPD``, ``__GFP_OTHER_NODE``.
- A bit that no v3.2 mask has is refused (ValueError): 0x2000 and 0x100000
  (unused in v3.2), 0x1000000 and above (``__GFP_BITS_SHIFT`` is 24; later
  kernels' bits such as ``__GFP_WRITE`` do not exist in v3.2), and negative
  numbers.

Names: the kernel's ``__GFP_*`` bits and ``GFP_*`` masks are module
attributes (``from shmpool.gfp import __GFP_NOWARN`` works), and the
:class:`GFP` flag class has a member per bit (``GFP.NOWARN``). Python
mangles ``__GFP_*`` names used inside a class body; there, write
``GFP.NOWARN`` instead. Where v3.2's value depends on the configuration, the
one with the option on is used: ``__GFP_NOTRACK`` is 0x200000
(CONFIG_KMEMCHECK; 0 without it) and ``GFP_THISNODE`` is
``__GFP_THISNODE | __GFP_NOWARN | __GFP_NORETRY`` (CONFIG_NUMA; 0 without
it).
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from typing import Any, Final, Literal

from ._core import may_sleep as _may_sleep
from ._core import set_gfp as _set_gfp


class GFPWarning(UserWarning):
    """A GFP bit asked for something that this allocator does not do:
    ``__GFP_ZERO`` (elements are not zeroed). Issued once per process."""


class _BitsOnly(enum.EnumMeta):
    """Iterating the flag class gives its single bits only, on every Python
    (3.11 and later do so by themselves; 3.10 would give the named masks too)."""

    def __iter__(cls) -> Iterator[Any]:
        members: Iterator[Any] = super().__iter__()
        return (m for m in members if m.value and not m.value & (m.value - 1))

    def __len__(cls) -> int:
        return sum(1 for _ in cls)


class GFP(enum.IntFlag, metaclass=_BitsOnly):
    """The v3.2 GFP bits (``GFP.WAIT`` is ``__GFP_WAIT``, and so on)."""

    DMA = 0x01
    HIGHMEM = 0x02
    DMA32 = 0x04
    MOVABLE = 0x08
    WAIT = 0x10  # may sleep: the one bit that changes behaviour here
    HIGH = 0x20  # may use emergency pools
    IO = 0x40  # may start I/O
    FS = 0x80  # may call into the file system
    COLD = 0x100
    NOWARN = 0x200
    REPEAT = 0x400
    NOFAIL = 0x800
    NORETRY = 0x1000
    COMP = 0x4000
    ZERO = 0x8000  # accepted, warns once: elements are not zeroed
    NOMEMALLOC = 0x10000
    HARDWALL = 0x20000
    THISNODE = 0x40000
    RECLAIMABLE = 0x80000
    NOTRACK = 0x200000
    NO_KSWAPD = 0x400000
    OTHER_NODE = 0x800000
    # The v3.2 masks that may sleep, named too, so that a type checker knows
    # that ``alloc(GFP_KERNEL)`` gives a handle and never None (see
    # SleepingMask). Not bits: iterating GFP gives the bits alone.
    NOIO = WAIT
    NOFS = WAIT | IO
    KERNEL = WAIT | IO | FS
    TEMPORARY = WAIT | IO | FS | RECLAIMABLE
    USER = WAIT | IO | FS | HARDWALL
    HIGHUSER = WAIT | IO | FS | HARDWALL | HIGHMEM
    HIGHUSER_MOVABLE = WAIT | IO | FS | HARDWALL | HIGHMEM | MOVABLE
    TRANSHUGE = WAIT | IO | FS | HARDWALL | HIGHMEM | MOVABLE | COMP | NOMEMALLOC | NORETRY | NOWARN | NO_KSWAPD


# The bits, under their kernel names.
__GFP_DMA = GFP.DMA
__GFP_HIGHMEM = GFP.HIGHMEM
__GFP_DMA32 = GFP.DMA32
__GFP_MOVABLE = GFP.MOVABLE
__GFP_WAIT = GFP.WAIT
__GFP_HIGH = GFP.HIGH
__GFP_IO = GFP.IO
__GFP_FS = GFP.FS
__GFP_COLD = GFP.COLD
__GFP_NOWARN = GFP.NOWARN
__GFP_REPEAT = GFP.REPEAT
__GFP_NOFAIL = GFP.NOFAIL
__GFP_NORETRY = GFP.NORETRY
__GFP_COMP = GFP.COMP
__GFP_ZERO = GFP.ZERO
__GFP_NOMEMALLOC = GFP.NOMEMALLOC
__GFP_HARDWALL = GFP.HARDWALL
__GFP_THISNODE = GFP.THISNODE
__GFP_RECLAIMABLE = GFP.RECLAIMABLE
__GFP_NOTRACK = GFP.NOTRACK
__GFP_NO_KSWAPD = GFP.NO_KSWAPD
__GFP_OTHER_NODE = GFP.OTHER_NODE
__GFP_NOTRACK_FALSE_POSITIVE = __GFP_NOTRACK

# The masks, as v3.2 composes them.
GFP_ZONEMASK = __GFP_DMA | __GFP_HIGHMEM | __GFP_DMA32 | __GFP_MOVABLE
GFP_ATOMIC = __GFP_HIGH
GFP_NOWAIT = GFP(0)  # v3.2: GFP_ATOMIC & ~__GFP_HIGH
GFP_NOIO: Final = GFP.NOIO
GFP_NOFS: Final = GFP.NOFS
GFP_KERNEL: Final = GFP.KERNEL
GFP_TEMPORARY: Final = GFP.TEMPORARY
GFP_USER: Final = GFP.USER
GFP_HIGHUSER: Final = GFP.HIGHUSER
GFP_HIGHUSER_MOVABLE: Final = GFP.HIGHUSER_MOVABLE
GFP_IOFS = __GFP_IO | __GFP_FS
GFP_TRANSHUGE: Final = GFP.TRANSHUGE
GFP_THISNODE = __GFP_THISNODE | __GFP_NOWARN | __GFP_NORETRY
GFP_MOVABLE_MASK = __GFP_RECLAIMABLE | __GFP_MOVABLE
GFP_RECLAIM_MASK = (
    __GFP_WAIT | __GFP_HIGH | __GFP_IO | __GFP_FS | __GFP_NOWARN | __GFP_REPEAT | __GFP_NOFAIL
    | __GFP_NORETRY | __GFP_NOMEMALLOC
)
GFP_CONSTRAINT_MASK = __GFP_HARDWALL | __GFP_THISNODE
GFP_DMA = __GFP_DMA
GFP_DMA32 = __GFP_DMA32

#: Every bit that some v3.2 mask can hold; any other is refused.
GFP_VALID_MASK = 0xEFDFFF
#: The masks with ``__GFP_WAIT`` that v3.2 names: ``alloc`` with one of
#: them returns a handle, never None (with any other mask, a type checker
#: sees ``int | None``; a mask composed at run time is typed GFP or int).
SleepingMask = Literal[
    GFP.NOIO, GFP.NOFS, GFP.KERNEL, GFP.TEMPORARY, GFP.USER, GFP.HIGHUSER, GFP.HIGHUSER_MOVABLE, GFP.TRANSHUGE
]
_BITS = [member for name, member in GFP.__members__.items() if bin(member.value).count("1") == 1 and name != "NOIO"]
assert sum(member.value for member in _BITS) == GFP_VALID_MASK
assert GFP_KERNEL == __GFP_WAIT | __GFP_IO | __GFP_FS and GFP_NOFS == __GFP_WAIT | __GFP_IO and GFP_NOIO == __GFP_WAIT
assert GFP_TRANSHUGE == GFP_HIGHUSER_MOVABLE | __GFP_COMP | __GFP_NOMEMALLOC | __GFP_NORETRY | __GFP_NOWARN | (
    __GFP_NO_KSWAPD
)
_REFUSED = ~GFP_VALID_MASK  # also catches negative numbers
_WAIT = int(GFP.WAIT)
_ZERO = int(GFP.ZERO)

_set_gfp(GFP_VALID_MASK, _WAIT, _ZERO)


def may_sleep(gfp: object) -> bool:
    """Whether ``gfp`` allows sleeping (has ``__GFP_WAIT``): the one check
    of every mask that shmpool is given (made in C, by the compiled core,
    which checks the masks of alloc and friends the same way).

    TypeError for anything but an int (or a :class:`GFP`); ValueError for a
    bit that no v3.2 mask has. The first mask with ``__GFP_ZERO`` warns
    (:class:`GFPWarning`), once per process: elements are not zeroed.
    """
    return _may_sleep(gfp)


__all__ = ["GFP", "GFPWarning", "SleepingMask", "may_sleep"] + [name for name in list(globals()) if name.startswith(("__GFP_", "GFP_"))]
