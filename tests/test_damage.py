"""Damage: the segment is untrusted input. Bytes written over any part of it
give PoolFormatError (or a refusal that changes nothing), never a crash, a
hang, or an element handed to two holders.
"""

from __future__ import annotations

import os
import pwd
import random
import struct
import subprocess
import sys

import pytest
from helpers import check_whole, snapshot
from procs import Child, ChildError, entry_base, entry_of, header_word, read_u64, start_child, write_bytes

from shmpool import GFP_ATOMIC, Mempool, PoolFormatError, _layout
from shmpool.testing import hold_lock, slot_word_offset, views

#: Run in a fresh interpreter over the damaged pool: every operation, each
#: outcome printed ("ok", or the exception's type and message).
OPERATIONS = r"""
import sys
import numpy as np
from shmpool import GFP_ATOMIC, GFP_KERNEL, Mempool
name = sys.argv[1]
held = []
def attempt(label, fn):
    try:
        out = fn()
        print(label, "ok", flush=True)
        return out
    except Exception as exc:
        print(label, type(exc).__name__, str(exc).replace("\n", " "), flush=True)
pool = attempt("attach", lambda: Mempool.attach(name))
if pool is not None:
    attempt("stats", pool.stats)
    for label, fn in (
        ("alloc-atomic", lambda: pool.alloc(GFP_ATOMIC)),
        ("alloc-kernel", lambda: pool.alloc(GFP_KERNEL, timeout=1)),
        ("alloc-preallocated", pool.alloc_preallocated),
    ):
        h = attempt(label, fn)
        if h is not None:
            held.append(h)
    hs = attempt("alloc-bulk", lambda: pool.alloc_bulk(3, GFP_KERNEL, timeout=1))
    if hs is not None:
        attempt("free-bulk", lambda: pool.free_bulk(hs))
    for h in held:
        attempt("free", lambda: pool.free(h))
    attempt("reclaim-dead", pool.reclaim_dead)
    attempt("resize", lambda: pool.resize(2))
    attempt("set-fail-rate", lambda: pool.set_fail_rate(0.0))
    attempt("stats-again", pool.stats)
    attempt("close", pool.close)
print("end", flush=True)
"""

HOSTILE_CAPACITY = 40


def _vacant_entry(name: str) -> int:
    entry = header_word(name, _layout.H_MAX_PROCS) - 1
    base = entry_base(name, entry)
    assert all(read_u64(name, base + 8 * w) == 0 for w in range(_layout.PROC_WORDS))
    return entry


def _damage(name: str, what: str, keeper: Child) -> None:
    """Write garbage over one part of the segment (the pool idle)."""
    rng = random.Random(what)
    u64 = lambda x: struct.pack("=Q", x)  # noqa: E731
    cap = header_word(name, _layout.H_CAPACITY)
    mine = entry_base(name, entry_of(name, keeper.inner_pid))
    if what == "cache count beyond its maximum":
        write_bytes(name, mine + 8 * _layout.P_CACHE_N, u64(_layout.CACHE_MAX + 1000))
    elif what == "cache count huge":
        write_bytes(name, mine + 8 * _layout.P_CACHE_N, u64(2**63 + 5))
    elif what == "cache entries out of range":
        write_bytes(name, mine + 8 * _layout.P_CACHE, b"\xfe\xff\xff\xff" * _layout.CACHE_MAX)
    elif what == "garbage in a vacant registry entry":
        write_bytes(name, entry_base(name, _vacant_entry(name)), rng.randbytes(8 * _layout.PROC_WORDS))
    elif what == "all ones in a vacant registry entry":
        write_bytes(name, entry_base(name, _vacant_entry(name)), b"\xff" * (8 * _layout.PROC_WORDS))
    elif what == "arena_free above capacity":
        write_bytes(name, 8 * _layout.H_ARENA_FREE, u64(cap + 1))
    elif what == "arena_free huge":
        write_bytes(name, 8 * _layout.H_ARENA_FREE, u64(2**64 - 1))
    elif what == "curr_nr above min_nr":
        write_bytes(name, 8 * _layout.H_CURR_NR, u64(cap * 1000))
    elif what == "min_nr zero":
        write_bytes(name, 8 * _layout.H_MIN_NR, u64(0))
    elif what == "huge nr_waiters":
        write_bytes(name, 8 * _layout.H_NR_WAITERS, u64(2**40))
    elif what == "huge sleeping count":
        write_bytes(name, mine + 8 * _layout.P_SLEEPING, u64(2**40))
    elif what == "garbage lock owner":
        write_bytes(name, 8 * _layout.H_LOCK_OWNER, u64(0xDEAD_BEEF_DEAD_BEEF))
    elif what == "reserve stack out of range":
        write_bytes(name, header_word(name, _layout.H_OFF_STACK), b"\xff" * (4 * cap))
    elif what == "arena free list out of range":
        write_bytes(name, header_word(name, _layout.H_OFF_ARENA), b"\xff" * (4 * cap))
    elif what == "garbage slot words":
        write_bytes(name, header_word(name, _layout.H_OFF_WORDS), rng.randbytes(8 * cap))
    elif what == "garbage header":
        for index in (_layout.H_CURR_NR, _layout.H_ARENA_FREE, _layout.H_NR_WAITERS, _layout.H_EPOCH, _layout.H_LOCK_WAITERS):
            write_bytes(name, 8 * index, rng.randbytes(8))
    else:
        raise AssertionError(what)


#: Damage after which a free may also be refused as not held (the slot word
#: it meets may be a valid word of another state or generation).
SLOT_WORDS_DAMAGED = {"garbage slot words"}

HOSTILE = [
    "cache count beyond its maximum",
    "cache count huge",
    "cache entries out of range",
    "garbage in a vacant registry entry",
    "all ones in a vacant registry entry",
    "arena_free above capacity",
    "arena_free huge",
    "curr_nr above min_nr",
    "min_nr zero",
    "huge nr_waiters",
    "huge sleeping count",
    "garbage lock owner",
    "reserve stack out of range",
    "arena free list out of range",
    "garbage slot words",
    "garbage header",
]

def allowed(what: str, operation: str, outcome: str) -> bool:
    """What an operation on a damaged pool may do: succeed or refuse the
    pool (PoolFormatError); a timed allocation may also run out of time."""
    return (
        outcome in ("ok", "PoolFormatError")
        or (outcome == "TimeoutError" and operation.startswith("alloc"))
        or (outcome == "InvalidHandleError" and operation.startswith("free") and what in SLOT_WORDS_DAMAGED)
    )


@pytest.mark.timeout(120)
@pytest.mark.parametrize("what", HOSTILE)
def test_damaged_bytes_give_poolformaterror_never_a_crash_or_a_hang(name: str, popen, what: str) -> None:
    pool = Mempool.create(name, min_nr=4, slot_size=16, capacity=HOSTILE_CAPACITY)
    pool.close()  # the parent never runs the C path over the damage
    # A live process that holds 2 elements and caches the rest of the arena
    # (so that the others must steal from its cache).
    keeper = start_child(popen, name)
    keeper.call(
        f"xs = [pool.alloc(GFP_KERNEL, timeout=10) for _ in range({HOSTILE_CAPACITY - 4})]\n"
        "held = xs[:2]\n"
        "for x in xs[2:]: pool.free(x)"
    )
    assert header_word(name, _layout.H_ARENA_FREE) == 0  # the shared free list is dry
    _damage(name, what, keeper)
    try:
        run = subprocess.run(
            [sys.executable, "-c", OPERATIONS, name], capture_output=True, text=True, timeout=90, check=False
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{what}: the operations hung: {exc.stdout!r}")
    assert run.returncode == 0, f"{what}: exit {run.returncode} (a negative exit is a signal): {run.stderr}"
    lines = run.stdout.splitlines()
    assert lines[-1] == "end", run.stdout + run.stderr
    outcomes = [line.split(" ", 2) for line in lines[:-1]]
    wrong = [o for o in outcomes if not allowed(what, o[0], o[1])]
    assert wrong == [], f"{what}: {wrong}"
    # The keeper, who has been attached all along, meets the damage too.
    for label, code in (
        ("free", "for x in held: pool.free(x)"),
        ("stats", "pool.stats()"),
        ("reclaim-dead", "pool.reclaim_dead()"),
        ("close", "pool.close()"),
    ):
        try:
            keeper.call(code, timeout=60)
        except ChildError as exc:
            assert allowed(what, label, exc.args[0]), f"{what}: {code}: {exc.args}"
    code = keeper.finish()
    assert code == 0, f"{what}: the keeper's exit {code}: {keeper.stderr()}"



# ----------------------------------------------------------------------
# Damage met by a live pool


@pytest.fixture
def pool(name: str):
    p = Mempool.create(name, min_nr=3, slot_size=16, capacity=6)
    yield p
    p.close()


def damage_stack(pool: Mempool, entry: int, value: int) -> None:
    with hold_lock(pool):
        views(pool).stack[entry] = value


def test_attach_refuses_a_reserve_stack_entry_out_of_range(pool: Mempool, name: str) -> None:
    damage_stack(pool, 1, 999)
    with pytest.raises(PoolFormatError, match="reserve stack entry 1 is slot 999, out of range"):
        Mempool.attach(name)


def test_attach_refuses_depths_beyond_the_capacity(pool: Mempool, name: str) -> None:
    with hold_lock(pool):
        views(pool).hdr[_layout.H_ARENA_FREE] = 100
    with pytest.raises(PoolFormatError, match="exceed the capacity"):
        Mempool.attach(name)


def test_alloc_from_a_damaged_reserve_is_refused_and_changes_nothing(pool: Mempool) -> None:
    held = [pool.alloc(GFP_ATOMIC) for _ in range(3)]  # the arena is dry now
    damage_stack(pool, 2, 999)  # the top
    before = snapshot(pool)
    with pytest.raises(PoolFormatError, match="entry 2 is out of range|names slot"):
        pool.alloc(GFP_ATOMIC)
    assert snapshot(pool) == before
    damage_stack(pool, 2, views(pool).stack[1])  # names a slot... that is reserved twice
    h = pool.alloc(GFP_ATOMIC)
    with pytest.raises(PoolFormatError, match="not in the reserve"):
        pool.alloc(GFP_ATOMIC)  # the same slot again: it is held now
    for x in held + [h]:
        pool.free(x)


def test_a_stack_entry_naming_a_held_slot_is_never_handed_out_twice(pool: Mempool) -> None:
    held = [pool.alloc(GFP_ATOMIC) for _ in range(3)]
    top = views(pool).stack[2]
    damage_stack(pool, 2, held[0] & 0xFFFFFF)
    before = snapshot(pool)
    with pytest.raises(PoolFormatError, match="not in the reserve"):
        pool.alloc(GFP_ATOMIC)
    assert snapshot(pool) == before
    damage_stack(pool, 2, top)  # undo the damage
    for x in held:
        pool.free(x)
    check_whole(pool)


def attach_as(uid: int, name: str) -> str:
    """Try to attach in a forked child running as ``uid``; what it raised."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: no exec needed, shmpool is already imported
        try:
            os.setuid(uid)
            try:
                Mempool.attach(name)
                msg = "attached"
            except Exception as exc:
                msg = f"{type(exc).__name__}: {exc}"
            os.write(w, msg.encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        msg = f.read().decode()
    os.waitpid(pid, 0)
    return msg


@pytest.mark.timeout(60)
def test_another_users_owner_only_pool_is_permissionerror_saying_why(name: str) -> None:
    with Mempool.create(name, min_nr=1, slot_size=16, capacity=2, mode=0o600) as p:
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody").pw_uid
            msg = attach_as(nobody, name)
            assert msg.startswith("PermissionError:"), msg
            assert "belongs to root (uid 0) with mode 0600" in msg and "does not let nobody" in msg
        else:  # not root: a pool its owner has shut itself out of is refused alike
            os.chmod(f"/dev/shm/shmpool.{name}", 0)
            msg = attach_as(os.geteuid(), name)
            os.chmod(f"/dev/shm/shmpool.{name}", 0o600)
            assert msg.startswith("PermissionError:") and "with mode 0000" in msg, msg
        assert p.stats().alloc_arena == 0
        p.destroy()




# ----------------------------------------------------------------------
# A held slot that names no process


@pytest.mark.timeout(60)
@pytest.mark.parametrize("owner", ["vacant entry", "entry never used", "no entry"])
def test_a_held_slot_naming_no_process_is_damage_never_a_dead_holders(name: str, popen, owner: str) -> None:
    """One damaged byte in a held slot's owner field must not let the next
    process to attach "reclaim" a live holder's element and hand it out
    again."""
    with Mempool.create(name, min_nr=1, slot_size=16, capacity=4) as pool:
        holder = start_child(popen, name)
        holder.call("h = pool.alloc(GFP_KERNEL, timeout=10); pool.buffer(h)[:4] = b'mine'")
        h = holder.call("h")
        if owner == "vacant entry":
            other = start_child(popen, name)  # takes the next entry, and leaves it vacant
            assert other.finish() == 0
            field = header_word(name, _layout.H_ENTRIES_USED)  # the highest entry used, + 1
            assert read_u64(name, entry_base(name, field - 1) + 8 * _layout.P_EPOCH) == 0
        elif owner == "entry never used":
            field = header_word(name, _layout.H_ENTRIES_USED) + 1
        else:
            field = 0
        offset = slot_word_offset(pool, h) + 1  # bits 8-23: the owner field
        write_bytes(name, offset, struct.pack("=H", field))
        # A new process attaches: it must refuse the damage, not take the element.
        run = subprocess.run([sys.executable, "-c", "import sys\nfrom shmpool import Mempool\n"
                              "try:\n    Mempool.attach(sys.argv[1])\n    print('attached')\n"
                              "except Exception as exc:\n    print(type(exc).__name__)", name],
                             capture_output=True, text=True, timeout=60, check=False)
        assert run.stdout.split() == ["PoolFormatError"], run.stdout + run.stderr
        with pytest.raises(PoolFormatError, match="names no process"):
            pool.reclaim_dead()
        # Nobody else is handed that element.
        got = [pool.alloc(GFP_ATOMIC) for _ in range(4)]
        assert h not in got and (h & 0xFFFFFF) not in {x & 0xFFFFFF for x in got if x is not None}
        assert holder.call("bytes(pool.buffer(h)[:4])") == b"mine"
        inspect = os.path.join(os.path.dirname(sys.executable), "shmpool-inspect")
        check = subprocess.run([inspect, name, "--check"], capture_output=True, text=True, timeout=60, check=False)
        assert check.returncode == 1 and "names no process" in check.stdout, check.stdout + check.stderr
        holder.kill()
        pool.destroy(force=True)
