"""Fidelity to the kernel for ports (issue 11), one section per point:
1 destroy, 2 poisoning, 3 GFP masks, 4 helper constructors, 5 stranded
free slots, 6 bulk. KERNEL.md lists every deliberate difference from v3.2.

The modules are imported whole (``gfp.__GFP_NOWARN``) so that a name that
is missing fails its own test, not the collection of the file.
"""

from __future__ import annotations

import mmap
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
from helpers import check_whole, snapshot, wait_for

from shmpool import (
    GFP_ATOMIC,
    GFP_KERNEL,
    Mempool,
    PoisonWarning,
    PoolBusyError,
    _debug,
    gfp,
    kernel,
)
from shmpool._layout import H_ARENA_FREE, H_CURR_NR

ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------- 1. destroy


def test_1_destroy_refuses_only_while_elements_are_held(name: str) -> None:
    pool = Mempool.create(name, min_nr=2, slot_size=16, capacity=8, fail_rate=1.0, seed=1)
    try:
        pool.resize(6)  # the arena fails: the resize succeeds, the reserve stays at 2
        s = pool.stats()
        assert (s.curr_nr, s.min_nr, s.in_use) == (2, 6, 0)
        h = pool.alloc(GFP_ATOMIC)  # from the reserve
        before = snapshot(pool)
        with pytest.raises(PoolBusyError, match="1 element"):
            kernel.mempool_destroy(pool)
        assert snapshot(pool) == before  # refused: nothing changed
        pool.free(h)
        assert pool.stats().curr_nr == 2  # under-filled, nothing held
    except BaseException:
        pool.destroy(force=True)
        raise
    kernel.mempool_destroy(pool)  # v3.2 would BUG_ON(curr_nr != min_nr); later kernels do not
    assert pool.closed
    with pytest.raises(FileNotFoundError):
        Mempool.attach(name)
    doc = kernel.mempool_destroy.__doc__ + Mempool.destroy.__doc__
    assert "only while elements are held" in kernel.mempool_destroy.__doc__
    assert "Like the kernel" not in doc


# --------------------------------------------------- 2. poisoning


def reserved_bytes(pool: Mempool) -> list[bytes]:
    """The bytes of every element in the reserve, bottom to top."""
    v = pool._core[0]
    geo = v.geo
    with pool._core[1]:
        depth = v.hdr[H_CURR_NR]
        entries = np.frombuffer(v.stack, dtype=np.uint32)[:depth].tolist()
        slots = np.frombuffer(v.data, dtype=np.uint8).reshape(geo.capacity, geo.stride)
        return [slots[idx, : geo.slot_size].tobytes() for idx in entries]


def test_2_poisoning_is_the_kernels(name: str) -> None:
    assert (_debug.POISON_FREE, _debug.POISON_END, _debug.POISON_INUSE) == (0x6B, 0xA5, 0x5A)
    free_pattern = b"\x6b" * 31 + b"\xa5"
    with Mempool.create(name, min_nr=3, slot_size=32, capacity=6, poison=True) as pool:
        assert reserved_bytes(pool) == [free_pattern] * 3  # entering the reserve: POISON_FREE, POISON_END
        pool.set_fail_rate(1.0)
        h = pool.alloc(GFP_ATOMIC)  # the arena fails: the reserve's top
        assert pool.stats().alloc_reserve == 1
        assert bytes(pool.buffer(h)) == b"\x5a" * 32  # checked, then POISON_INUSE before it is handed out
        pool.buffer(h)[:] = b"x" * 32
        pool.free(h)  # back into the reserve: poisoned again
        assert reserved_bytes(pool) == [free_pattern] * 3
        # A write after free into a reserved element is reported when it leaves.
        v = pool._core[0]
        top = np.frombuffer(v.stack, dtype=np.uint32)[2]
        v.data[int(top) * v.geo.stride] = 0
        with pytest.warns(PoisonWarning, match="written after"):
            h = pool.alloc(GFP_ATOMIC)
        assert bytes(pool.buffer(h)) == b"\x5a" * 32
        assert pool.stats().poison_errors == 1
        pool.free(h)
        check_whole(pool)
        pool.destroy()


# --------------------------------------------------- 3. GFP masks

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


def test_3_the_v32_names_have_their_v32_values() -> None:
    for module in (gfp, kernel):
        for label, value in {**V32_BITS, **V32_MASKS}.items():
            assert getattr(module, label) == value, (module.__name__, label)
            assert label in module.__all__
    assert sum(V32_BITS.values()) == gfp.GFP_VALID_MASK == sum(gfp.GFP)
    assert {f"__GFP_{m.name}": m.value for m in gfp.GFP} == V32_BITS
    from shmpool.kernel import __GFP_NOWARN, GFP_TEMPORARY  # importable by their kernel names

    assert (__GFP_NOWARN, GFP_TEMPORARY) == (0x200, 0x800D0)


def test_3_every_v32_bit_is_accepted_and_only_wait_sleeps(name: str) -> None:
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


def test_3_bits_no_v32_mask_has_are_refused(name: str) -> None:
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
        assert snapshot(pool) == before  # refused: nothing changed
        pool.destroy()


def test_3_gfp_zero_warns_once_per_process(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gfp, "_zero_warned", False)  # as in a fresh process
    with Mempool.create(name, min_nr=2, slot_size=16, capacity=4) as pool:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # only shmpool's own once-only may hide a repeat
            h = pool.alloc(GFP_KERNEL | gfp.__GFP_ZERO)
            pool.free(h)
            h = kernel.mempool_alloc(pool, GFP_ATOMIC | gfp.__GFP_ZERO)
            pool.free(h)
            pool.free_bulk(pool.alloc_bulk(2, gfp.GFP_USER | gfp.__GFP_ZERO))
            pool.resize(2, GFP_KERNEL | gfp.__GFP_ZERO)
        assert [type(w.message) for w in caught] == [gfp.GFPWarning]
        assert issubclass(gfp.GFPWarning, UserWarning)
        assert "__GFP_ZERO" in str(caught[0].message) and "not zero" in str(caught[0].message)
        assert caught[0].filename == __file__  # it points at the caller, not at shmpool
        pool.destroy()


# --------------------------------------------------- 4. helper constructors


def test_4_helper_constructors_make_pools_of_the_right_shape(name: str) -> None:
    page = mmap.PAGESIZE
    assert page == kernel.PAGE_SIZE
    made = [
        # (pool, slot_size, min_nr, capacity)
        (kernel.mempool_create_kmalloc_pool(3, 200, f"{name}-k"), 200, 3, 12),  # capacity: 4 x min_nr
        (kernel.mempool_create_slab_pool(2, 96, name=f"{name}-s", capacity=5), 96, 2, 5),
        (kernel.mempool_create_page_pool(2, 0, f"{name}-p0"), page, 2, 8),
        (kernel.mempool_create_page_pool(1, 2, f"{name}-p2", poison=True), page << 2, 1, 4),
        (kernel.mempool_create_node(2, f"{name}-n", 1, slot_size=64), 64, 2, 8),  # node 1 ignored
        (kernel.mempool_create_node(2, f"{name}-n2", kernel.NUMA_NO_NODE, slot_size=8, gfp_mask=GFP_KERNEL), 8, 2, 8),
        (kernel.mempool_create(2, f"{name}-c", slot_size=24), 24, 2, 8),
        (kernel.mempool_init(2, f"{name}-i", slot_size=32, capacity=3), 32, 2, 3),
        (kernel.mempool_init_kmalloc_pool(1, 40, f"{name}-ik"), 40, 1, 4),
        (kernel.mempool_init_slab_pool(1, 48, f"{name}-is"), 48, 1, 4),
        (kernel.mempool_init_page_pool(1, 1, f"{name}-ip"), page << 1, 1, 4),
        (kernel.mempool_init_node(1, f"{name}-in", 0, slot_size=56), 56, 1, 4),
    ]
    try:
        for pool, slot_size, min_nr, capacity in made:
            s = pool.stats()
            assert (s.slot_size, s.min_nr, s.curr_nr, s.capacity, s.in_use) == (
                slot_size, min_nr, min_nr, capacity, 0,
            ), pool.name
            assert s.poison == (pool is made[3][0])  # options go through to Mempool.create
            assert kernel.mempool_initialized(pool)
            h = kernel.mempool_alloc(pool)
            assert len(pool.buffer(h)) == slot_size
            kernel.mempool_free(h, pool)
    finally:
        for pool, *_ in made:
            pool.destroy(force=True)
    for bad_order, exc in ((-1, ValueError), (31, ValueError), (40, ValueError), (1.0, TypeError), (True, TypeError)):
        with pytest.raises(exc):
            kernel.mempool_create_page_pool(1, bad_order, name)
    with pytest.raises(ValueError, match="slot_size"):
        kernel.mempool_create_page_pool(1, 30, name)  # 2**30 pages: more than a slot may hold
    with pytest.raises(TypeError, match="node_id"):
        kernel.mempool_create_node(1, name, "node0", slot_size=8)
    with pytest.raises(ValueError, match="min_nr"):
        kernel.mempool_create_kmalloc_pool(0, 8, name)
    with pytest.raises(TypeError, match="min_nr"):
        kernel.mempool_create_kmalloc_pool("2", 8, name)


def test_4_init_exit_and_destroy_of_none(name: str) -> None:
    kernel.mempool_destroy(None)  # a no-op, as in later kernels
    kernel.mempool_exit(None)  # a pool never initialised
    assert not kernel.mempool_initialized(None)
    pool = kernel.mempool_init(2, name, slot_size=16)
    assert kernel.mempool_initialized(pool)
    h = kernel.mempool_alloc(pool)
    with pytest.raises(PoolBusyError):
        kernel.mempool_exit(pool)  # the rules of mempool_destroy
    kernel.mempool_free(h, pool)
    kernel.mempool_exit(pool)
    assert not kernel.mempool_initialized(pool)
    kernel.mempool_exit(pool)  # ended already: nothing to do
    with pytest.raises(FileNotFoundError):
        Mempool.attach(name)


# --------------------------------------------------- 5. stranded free slots

#: A peer that fills its cache with every free arena slot (allocates them
#: all, frees them all: the reserve is full, so they stay in its cache),
#: says so, and stays alive until its stdin closes.
FILL_CACHE_AND_STAY = """
import sys
from shmpool import GFP_ATOMIC, Mempool
pool = Mempool.attach(sys.argv[1])
held = [pool.alloc(GFP_ATOMIC) for _ in range(pool.stats().arena_free)]
assert None not in held and pool.stats().alloc_reserve == 0
for h in held:
    pool.free(h)
print("ready", len(held), flush=True)
sys.stdin.read()
pool.close()
"""


def peer_fills_its_cache(pool: Mempool, popen) -> object:
    """Start the peer; return it once every free arena slot is in its cache."""
    peer = popen(FILL_CACHE_AND_STAY, pool.name)
    line = peer.stdout.readline()
    if line.split() != ["ready", str(pool.capacity - 2)]:
        peer.stdin.close()  # let it end before its stderr is read
        peer.wait(timeout=30)
        pytest.fail(f"the peer said {line!r}: {peer.stderr.read()}")
    s = pool.stats()
    assert (s.curr_nr, s.min_nr, s.arena_free, s.in_use) == (2, 2, pool.capacity - 2, 0)
    assert pool._core[0].hdr[H_ARENA_FREE] == 0  # the shared free list is dry: all of them in the peer's cache
    return peer


def end_peer(peer) -> None:
    peer.stdin.close()
    assert peer.wait(timeout=30) == 0, peer.stderr.read()


@pytest.mark.timeout(60)
def test_5_resize_takes_free_slots_from_a_live_peers_cache(name: str, popen) -> None:
    with Mempool.create(name, min_nr=2, slot_size=16, capacity=24) as pool:
        peer = peer_fills_its_cache(pool, popen)
        pool.resize(10)
        s = pool.stats()
        assert (s.curr_nr, s.min_nr, s.arena_free, s.in_use) == (10, 10, 14, 0)
        check_whole(pool)
        end_peer(peer)
        pool.destroy()


@pytest.mark.timeout(60)
def test_5_a_traced_alloc_takes_free_slots_from_a_live_peers_cache(name: str, popen) -> None:
    with Mempool.create(name, min_nr=2, slot_size=16, capacity=24) as pool:
        peer = peer_fills_its_cache(pool, popen)
        events: list[str] = []
        pool.trace = lambda event, handle, curr_nr: events.append(event)
        h = pool.alloc(GFP_ATOMIC)
        assert h is not None and events == ["alloc-arena"]
        assert pool.stats().curr_nr == 2  # the reserve was not touched
        held = [h]
        while (h := pool.alloc(GFP_ATOMIC)) is not None:
            held.append(h)
        assert len(held) == 24  # every slot: none left stranded
        assert events == ["alloc-arena"] * 22 + ["alloc-reserve"] * 2 + ["alloc-failed"]
        pool.free_bulk(held)
        check_whole(pool)
        end_peer(peer)
        pool.destroy()


# --------------------------------------------------- 6. bulk

#: A peer that asks for n elements at once and reports how many it got.
BULK_PEER = """
import sys
from shmpool import GFP_KERNEL, Mempool
pool = Mempool.attach(sys.argv[1])
hs = pool.alloc_bulk(int(sys.argv[2]), GFP_KERNEL, timeout=30)
print(len(hs), flush=True)
pool.free_bulk(hs)
pool.close()
"""


def bulk_rows(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("|") and "bulk" in line]


def test_6_bulk_docs_say_what_it_is_and_claim_no_kernel_release() -> None:
    release = re.compile(r"\b(?:kernel|linux|v)\s*\d+\.\d+", re.IGNORECASE)
    for doc in (Mempool.alloc_bulk.__doc__, Mempool.free_bulk.__doc__):
        assert not release.search(doc), doc
    assert "linux-next" in Mempool.alloc_bulk.__doc__
    for line in (ROOT / "README.md").read_text().splitlines():
        assert not ("bulk" in line and release.search(line)), line
    rows = bulk_rows((ROOT / "KERNEL.md").read_text())
    assert rows, "KERNEL.md has no row for bulk allocation"
    table = " ".join(rows)
    for words in ("linux-next", "all or nothing", "holds nothing while", "keeps what", "returns how many"):
        assert words in table, words
    assert not re.search(r"\b\d+\.\d+\b", table.replace("v3.2", ""))


@pytest.mark.timeout(60)
def test_6_bulk_waits_holding_nothing_and_free_bulk_takes_everything(name: str, popen) -> None:
    with Mempool.create(name, min_nr=3, slot_size=16, capacity=6) as pool:
        pool.set_fail_rate(1.0)
        mine = pool.alloc(GFP_ATOMIC)  # from the reserve: 2 of 3 left, 3 in the arena
        pool.set_fail_rate(0.0)
        # 6 at once: 3 from the arena, 3 from a reserve of 2: all or nothing.
        assert pool.alloc_bulk(6, GFP_ATOMIC) is None
        assert pool.stats().in_use == 1
        peer = popen(BULK_PEER, name, "6")
        wait_for(lambda: pool.stats().nr_waiters == 1, what="the bulk caller to sleep")
        s = pool.stats()
        # The kernel's mempool_alloc_bulk would hold the 3 arena elements while it waits.
        assert (s.in_use, s.arena_free, s.curr_nr) == (1, 3, 2)
        pool.free(mine)  # refills the reserve and wakes it: 3 + 3
        assert peer.stdout.readline().strip() == "6", peer.stderr.read()
        assert peer.wait(timeout=30) == 0, peer.stderr.read()
        # n above min_nr is fine here (the kernel warns); free_bulk frees all
        # of them and returns nothing (the kernel's returns how many it put
        # in the reserve, leaving the rest to the caller).
        hs = pool.alloc_bulk(6, GFP_ATOMIC)
        assert pool.free_bulk(hs) is None
        s = pool.stats()
        assert (s.in_use, s.curr_nr, s.arena_free) == (0, 3, 3)
        check_whole(pool)
        pool.destroy()
