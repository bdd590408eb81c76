"""Hostile input: damaged segments and racing misuse get clear errors, and
the pool is left exactly as it was."""

from __future__ import annotations

import multiprocessing as mp
import os
import pwd

import children
import pytest
from helpers import check_whole, snapshot

from shmpool import GFP_ATOMIC, Mempool, PoolFormatError
from shmpool._layout import H_ARENA_FREE

ctx = mp.get_context("spawn")


@pytest.fixture
def pool(name: str):
    p = Mempool.create(name, min_nr=3, slot_size=16, capacity=6)
    yield p
    p.close()


def damage_stack(pool: Mempool, entry: int, value: int) -> None:
    with pool._core[1]:
        pool._core[0].stack[entry] = value


def test_attach_refuses_a_reserve_stack_entry_out_of_range(pool: Mempool, name: str) -> None:
    damage_stack(pool, 1, 999)
    with pytest.raises(PoolFormatError, match="reserve stack entry 1 is slot 999, out of range"):
        Mempool.attach(name)


def test_attach_refuses_depths_beyond_the_capacity(pool: Mempool, name: str) -> None:
    with pool._core[1]:
        pool._core[0].hdr[H_ARENA_FREE] = 100
    with pytest.raises(PoolFormatError, match="exceed the capacity"):
        Mempool.attach(name)


def test_alloc_from_a_damaged_reserve_is_refused_and_changes_nothing(pool: Mempool) -> None:
    held = [pool.alloc(GFP_ATOMIC) for _ in range(3)]  # the arena is dry now
    damage_stack(pool, 2, 999)  # the top
    before = snapshot(pool)
    with pytest.raises(PoolFormatError, match="entry 2 is out of range|names slot"):
        pool.alloc(GFP_ATOMIC)
    assert snapshot(pool) == before
    damage_stack(pool, 2, pool._core[0].stack[1])  # names a slot... that is reserved twice
    h = pool.alloc(GFP_ATOMIC)
    with pytest.raises(PoolFormatError, match="not in the reserve"):
        pool.alloc(GFP_ATOMIC)  # the same slot again: it is held now
    for x in held + [h]:
        pool.free(x)


def test_a_stack_entry_naming_a_held_slot_is_never_handed_out_twice(pool: Mempool) -> None:
    held = [pool.alloc(GFP_ATOMIC) for _ in range(3)]
    top = pool._core[0].stack[2]
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


@pytest.mark.timeout(60)
def test_a_double_free_raced_by_several_processes_frees_once(name: str, spawn) -> None:
    with Mempool.create(name, min_nr=1, slot_size=16, capacity=4) as pool:
        for _ in range(3):
            h = pool.alloc()
            barrier, results = ctx.Barrier(4), ctx.Queue()
            for _ in range(4):
                spawn(children.free_at_once, name, h, barrier, results)
            outcomes = sorted(results.get(timeout=30) for _ in range(4))
            assert outcomes == ["InvalidHandleError"] * 3 + ["freed"]
            s = pool.stats()
            assert s.in_use == 0
        assert s.free_arena + s.free_reserve == 3
        check_whole(pool)
        pool.destroy()
