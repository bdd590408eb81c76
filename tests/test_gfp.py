"""GFP masks as Linux v3.2 has them (include/linux/gfp.h): every name with
its value, every bit accepted, only ``__GFP_WAIT`` deciding whether a call
may sleep, bits no v3.2 mask has refused, ``__GFP_ZERO`` warned about.

The modules are imported whole (``gfp.__GFP_NOWARN``) so that a name that
is missing fails its own test, not the collection of the file.
"""

from __future__ import annotations

import subprocess
import sys
import warnings
from typing import Any

import pytest
from helpers import snapshot

from shmpool import GFP, GFP_ATOMIC, GFP_KERNEL, GFP_NOFS, GFP_NOIO, GFP_NOWAIT, Mempool, gfp, kernel

#: include/linux/gfp.h of Linux v3.2: every bit (__GFP_BITS_SHIFT is 24;
#: 0x2000 and 0x100000 are unused; __GFP_NOTRACK with CONFIG_KMEMCHECK).
V32_BITS = {
    "__GFP_DMA": 0x01,
    "__GFP_HIGHMEM": 0x02,
    "__GFP_DMA32": 0x04,
    "__GFP_MOVABLE": 0x08,
    "__GFP_WAIT": 0x10,
    "__GFP_HIGH": 0x20,
    "__GFP_IO": 0x40,
    "__GFP_FS": 0x80,
    "__GFP_COLD": 0x100,
    "__GFP_NOWARN": 0x200,
    "__GFP_REPEAT": 0x400,
    "__GFP_NOFAIL": 0x800,
    "__GFP_NORETRY": 0x1000,
    "__GFP_COMP": 0x4000,
    "__GFP_ZERO": 0x8000,
    "__GFP_NOMEMALLOC": 0x10000,
    "__GFP_HARDWALL": 0x20000,
    "__GFP_THISNODE": 0x40000,
    "__GFP_RECLAIMABLE": 0x80000,
    "__GFP_NOTRACK": 0x200000,
    "__GFP_NO_KSWAPD": 0x400000,
    "__GFP_OTHER_NODE": 0x800000,
}
#: v3.2's masks (GFP_THISNODE as with CONFIG_NUMA).
V32_MASKS = {
    "GFP_NOWAIT": 0,
    "GFP_ATOMIC": 0x20,
    "GFP_NOIO": 0x10,
    "GFP_NOFS": 0x50,
    "GFP_KERNEL": 0xD0,
    "GFP_TEMPORARY": 0x800D0,
    "GFP_USER": 0x200D0,
    "GFP_HIGHUSER": 0x200D2,
    "GFP_HIGHUSER_MOVABLE": 0x200DA,
    "GFP_IOFS": 0xC0,
    "GFP_TRANSHUGE": 0x200DA | 0x4000 | 0x10000 | 0x1000 | 0x200 | 0x400000,
    "GFP_THISNODE": 0x40000 | 0x200 | 0x1000,
    "GFP_DMA": 0x01,
    "GFP_DMA32": 0x04,
}
#: Bits that no v3.2 mask has.
NOT_V32 = [0x2000, 0x100000, 1 << 24, 1 << 25, 1 << 40, 0xD0 | 0x2000, -1, -0x10]


def test_the_v32_names_have_their_v32_values() -> None:
    for module in (gfp, kernel):
        for label, value in {**V32_BITS, **V32_MASKS}.items():
            assert getattr(module, label) == value, (module.__name__, label)
            assert label in module.__all__
    assert sum(V32_BITS.values()) == gfp.GFP_VALID_MASK == sum(gfp.GFP)
    assert {f"__GFP_{m.name}": m.value for m in gfp.GFP} == V32_BITS
    from shmpool.kernel import __GFP_NOWARN, GFP_TEMPORARY  # importable by their kernel names

    assert (__GFP_NOWARN, GFP_TEMPORARY) == (0x200, 0x800D0)


def test_gfp_flags_compose_like_the_kernel() -> None:
    assert GFP_KERNEL == GFP.WAIT | GFP.IO | GFP.FS
    assert GFP_NOFS == GFP.WAIT | GFP.IO
    assert GFP_NOIO == GFP.WAIT
    assert GFP_ATOMIC == GFP.HIGH and not GFP_ATOMIC & GFP.WAIT
    assert GFP_NOWAIT == 0


def test_every_v32_bit_is_accepted_and_only_wait_sleeps(name: str) -> None:
    with Mempool.create(name, min_nr=2, slot_size=16, capacity=4) as pool, warnings.catch_warnings():
        warnings.simplefilter("ignore", gfp.GFPWarning)
        for mask in [*V32_BITS.values(), *V32_MASKS.values(), *gfp.GFP, gfp.GFP_VALID_MASK]:
            for flags in (mask, GFP_ATOMIC | mask, GFP_KERNEL | mask):
                h = pool.alloc(flags)
                assert h is not None, hex(flags)
                pool.free(h)
                hs = pool.alloc_bulk(2, flags)
                pool.free_bulk(hs)
        pool.resize(3, GFP_KERNEL | gfp.__GFP_NOWARN | gfp.__GFP_NORETRY)
        assert kernel.mempool_resize(pool, 2, gfp.GFP_NOFS | gfp.__GFP_NOFAIL) == 0
        held = [pool.alloc(GFP_ATOMIC) for _ in range(4)]
        assert pool.stats().in_use == 4
        # Empty: without __GFP_WAIT every mask returns None at once, with it
        # every mask sleeps (bounded here by timeout=).
        no_wait = gfp.GFP_VALID_MASK & ~gfp.__GFP_WAIT
        assert pool.alloc(no_wait) is None
        assert pool.alloc(gfp.GFP_TRANSHUGE & ~gfp.__GFP_WAIT) is None
        assert pool.alloc_bulk(1, no_wait) is None
        with pytest.raises(TimeoutError):
            pool.alloc(gfp.__GFP_WAIT | gfp.__GFP_NORETRY | gfp.__GFP_NOWARN, timeout=0.05)
        with pytest.raises(TimeoutError):
            pool.alloc(gfp.GFP_VALID_MASK, timeout=0.05)
        pool.free_bulk(held)
        pool.destroy()


def test_bits_no_v32_mask_has_are_refused_and_change_nothing(name: str) -> None:
    with Mempool.create(name, min_nr=2, slot_size=16, capacity=4) as pool:
        before = snapshot(pool)
        for bad in NOT_V32:
            with pytest.raises(ValueError, match="v3.2"):
                pool.alloc(bad)
            with pytest.raises(ValueError, match="v3.2"):
                pool.alloc(bad, timeout=1.0)
            with pytest.raises(ValueError, match="v3.2"):
                pool.alloc_bulk(1, bad)
            with pytest.raises(ValueError, match="v3.2"):
                pool.resize(3, bad)
            with pytest.raises(ValueError, match="v3.2"):
                gfp.may_sleep(gfp.GFP(bad) if bad > 0 else bad)
        for wrong in (True, 1.0, "GFP_KERNEL", None):
            with pytest.raises(TypeError):
                gfp.may_sleep(wrong)
            with pytest.raises(TypeError):
                pool.alloc(wrong)  # type: ignore[arg-type]
        assert snapshot(pool) == before  # refused: nothing changed
        pool.destroy()


#: In a fresh process (the warning is once per process): every call that
#: takes a mask, each with __GFP_ZERO; the warnings seen, one a line as
#: "CATEGORY|FILENAME|MESSAGE"; then the same in a forked child (another
#: process: it warns again).
ZERO_WARNINGS = """
import os, sys, warnings
from shmpool import GFP_ATOMIC, GFP_KERNEL, Mempool, gfp, kernel

def calls(pool):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # only shmpool's own once-only may hide a repeat
        pool.free(pool.alloc(GFP_KERNEL | gfp.__GFP_ZERO))
        pool.free(kernel.mempool_alloc(pool, GFP_ATOMIC | gfp.__GFP_ZERO))
        pool.free_bulk(pool.alloc_bulk(2, gfp.GFP_USER | gfp.__GFP_ZERO))
        pool.resize(2, GFP_KERNEL | gfp.__GFP_ZERO)
        gfp.may_sleep(GFP_KERNEL | gfp.__GFP_ZERO)
    for w in caught:
        print(f"{w.category.__name__}|{w.filename}|{w.message}", flush=True)

with Mempool.create(sys.argv[1], min_nr=2, slot_size=16, capacity=4).destroying() as pool:
    calls(pool)
    print("fork", flush=True)
    pid = os.fork()
    if pid == 0:
        calls(pool)
        os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0
"""


def test_gfp_zero_warns_once_per_process_pointing_at_the_caller(name: str, tmp_path: Any) -> None:
    script = tmp_path / "zero.py"
    script.write_text(ZERO_WARNINGS)
    run = subprocess.run([sys.executable, str(script), name], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    parent, child = (part.strip().splitlines() for part in run.stdout.split("fork\n"))
    for seen in (parent, child):
        assert len(seen) == 1, seen
        category, filename, message = seen[0].split("|", 2)
        assert category == "GFPWarning" and issubclass(gfp.GFPWarning, UserWarning)
        assert "__GFP_ZERO" in message and "not zero" in message
        assert filename == str(script)  # it points at the caller, not at shmpool
