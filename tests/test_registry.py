"""The registry of attached processes: one entry per process, alive while
the process is (an OFD lock, in any pid namespace), at most
``max_processes`` of them; a forked child gets its own entry or an error,
never its parent's.
"""

from __future__ import annotations

import errno
import os
import struct
import subprocess
import sys

import pytest
from helpers import check_whole
from procs import entry_of, read_u64, start_child, write_bytes

from shmpool import GFP_ATOMIC, GFP_KERNEL, Mempool
from shmpool.testing import entry_offset, registry_entry

ATTACH_ONCE = (
    "import sys\nfrom shmpool import Mempool\n"
    "try:\n    Mempool.attach(sys.argv[1])\n    print('attached')\n"
    "except OSError as exc:\n    print(type(exc).__name__, exc.errno)\n"
)


def attach_elsewhere(name: str) -> str:
    run = subprocess.run([sys.executable, "-c", ATTACH_ONCE, name], capture_output=True, text=True, timeout=60,
                         check=False)
    assert run.returncode == 0, run.stderr
    return run.stdout.strip()


def in_a_fork(fn: str, pool: Mempool) -> str:
    """Run ``fn`` (code using ``pool``, setting ``out``) in a forked child of
    this process; what it set, or the exception it raised."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            try:
                scope = {"pool": pool, "GFP_ATOMIC": GFP_ATOMIC, "GFP_KERNEL": GFP_KERNEL}
                exec(fn, scope)
                msg = str(scope.get("out"))
            except Exception as exc:
                msg = f"{type(exc).__name__} {getattr(exc, 'errno', '')}".strip()
            os.write(w, msg.encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        msg = f.read().decode()
    os.waitpid(pid, 0)
    return msg


@pytest.mark.timeout(60)
def test_max_processes_bounds_the_attached_processes(name: str, popen) -> None:
    with Mempool.create(name, min_nr=1, slot_size=16, capacity=4, max_processes=2) as pool:
        other = start_child(popen, name)
        assert attach_elsewhere(name) == f"OSError {errno.EUSERS}"
        assert other.finish() == 0  # its entry is vacated as it leaves
        assert attach_elsewhere(name) == "attached"
        pool.destroy()
    with Mempool.open(name, min_nr=1, slot_size=16, capacity=4, max_processes=1) as pool:
        assert attach_elsewhere(name) == f"OSError {errno.EUSERS}"
        pool.destroy()
    for bad in (0, 65535, -1):
        with pytest.raises(ValueError, match="max_processes"):
            Mempool.create(name, min_nr=1, slot_size=16, capacity=4, max_processes=bad)


@pytest.mark.timeout(60)
def test_a_forked_child_that_cannot_register_raises_at_its_first_use(name: str, popen) -> None:
    with Mempool.create(name, min_nr=1, slot_size=16, capacity=8, max_processes=2) as pool:
        other = start_child(popen, name)  # the last entry
        mine = registry_entry(pool)
        got = in_a_fork("out = pool.alloc(GFP_ATOMIC)", pool)
        assert got == f"OSError {errno.EUSERS}"  # not its parent's entry
        s = pool.stats()
        assert s.in_use == 0 and registry_entry(pool) == mine  # nothing recorded as ours
        assert other.finish() == 0
        pool.destroy()  # nothing held: not refused


@pytest.mark.timeout(60)
def test_a_forked_child_registers_its_own_entry(name: str) -> None:
    with Mempool.create(name, min_nr=1, slot_size=16, capacity=8) as pool:
        h = pool.alloc()
        got = in_a_fork("from shmpool.testing import registry_entry\nout = (registry_entry(pool), pool.alloc())", pool)
        entry, _theirs = eval(got)
        assert entry != registry_entry(pool)
        assert pool.stats().in_use == 2
        assert pool.reclaim_dead() == 1  # the child's, not ours: it exited holding it
        pool.buffer(h)  # ours is still held
        pool.free(h)
        check_whole(pool)
        pool.destroy()


@pytest.mark.timeout(30)
def test_a_pid_is_not_a_holders_identity(name: str, popen) -> None:
    with Mempool.create(name, min_nr=1, slot_size=16, capacity=3) as pool:
        child = start_child(popen, name)
        child.call("h = pool.alloc()")
        # Rewrite the registry's pid and start time of the child, as a process
        # in another pid namespace would look: it is alive all the same.
        entry = entry_of(name, child.pid)
        start = read_u64(name, entry_offset(pool, entry, "P_START"))
        write_bytes(name, entry_offset(pool, entry, "P_PID"), struct.pack("=Q", 1))
        write_bytes(name, entry_offset(pool, entry, "P_START"), struct.pack("=Q", start + 1))
        assert pool.reclaim_dead() == 0
        assert pool.stats().in_use == 1
        child.kill()
        assert pool.reclaim_dead() == 1
        check_whole(pool)
        pool.destroy()


