"""Create, open, map and unlink a pool's POSIX objects.

A pool named ``NAME`` is one shared-memory segment, ``/shmpool.NAME``
(``/dev/shm/shmpool.NAME`` on Linux): the pool lock and every wait channel
are words of it, waited on as futexes (``_core/lock.c``, ``_core/wake.c``),
so there is nothing else to create, open or leak. Besides it, only FIFOs
``/dev/shm/fifo.shmpool.NAME.E``: the asyncio wait channel of the process in
registry entry E, made by that process when one of its event loops first
waits for an element, removed when it detaches; a FIFO left by a killed
process is replaced by the next one in that entry, and ``unlink`` removes
them all.

Ownership of the name is decided by the segment: whoever creates it with
O_CREAT|O_EXCL owns the pool's name.

Nothing here unlinks anything on close or at exit: attaching and closing never
destroy a pool (unlike multiprocessing's resource tracker, gh-82300).
"""

from __future__ import annotations

import errno
import mmap
import os
import pwd
import stat
from dataclasses import dataclass

import posix_ipc

SHM_PREFIX = "shmpool."
FIFO_PREFIX = "fifo."
# NAME_MAX (255) bounds the longest file, "fifo.shmpool.NAME.65534".
MAX_NAME_BYTES = 255 - len(FIFO_PREFIX) - len(SHM_PREFIX) - len(".65534")
SHM_DIR = "/dev/shm"


def check_name(name: object) -> str:
    """Return ``name`` if it can name a pool; TypeError or ValueError if not."""
    if not isinstance(name, str):
        raise TypeError(f"pool name must be a str, not {type(name).__name__}")
    if not name:
        raise ValueError("pool name must not be empty")
    if "/" in name or not name.isprintable():
        raise ValueError(f"pool name {name!r} may not contain '/' or unprintable characters")
    if len(name.encode()) > MAX_NAME_BYTES:
        raise ValueError(f"pool name is longer than {MAX_NAME_BYTES} bytes")
    return name


def shm_name(name: str) -> str:
    return "/" + SHM_PREFIX + name


def segment_path(name: str) -> str:
    """Where pool ``name``'s segment is in the file system."""
    return os.path.join(SHM_DIR, SHM_PREFIX + name)


def fifo_prefix(name: str) -> str:
    """Registry entry ``e``'s asyncio wake-up FIFO is ``prefix + str(e)``:
    the freeing process writes a byte into it (``_core/wake.c``, poke_async)."""
    return os.path.join(SHM_DIR, FIFO_PREFIX + SHM_PREFIX + name + ".")


def make_fifo(path: str, mode: int) -> int:
    """A fresh FIFO at ``path`` (one left by a dead process replaced), open
    without blocking: its descriptor. Opened for reading and writing, so that
    it always has a writer: a FIFO whose last writer closed would read as
    end-of-file, and an event loop would see it readable forever."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    old = os.umask(0)
    try:
        os.mkfifo(path, mode & 0o666)
    finally:
        os.umask(old)
    try:
        return os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
    except BaseException:
        os.unlink(path)
        raise


def _unlink_fifos(name: str) -> bool:
    prefix = FIFO_PREFIX + SHM_PREFIX + name + "."
    removed = False
    try:
        entries = os.listdir(SHM_DIR)
    except OSError:
        return False
    for entry in entries:
        if entry.startswith(prefix) and entry[len(prefix) :].isdigit():
            try:
                os.unlink(os.path.join(SHM_DIR, entry))
                removed = True
            except FileNotFoundError:
                pass
    return removed


@dataclass
class Segment:
    """An open pool's mapping."""

    mm: mmap.mmap
    size: int
    fd: int  # kept open: liveness is OFD locks on the segment file (see _procs)

    def close(self) -> None:
        """Close the descriptor and the mapping (views of elements that are
        still alive keep the mapping: it goes with the last of them)."""
        try:
            os.close(self.fd)
        except OSError:
            pass
        try:
            self.mm.close()
        except BufferError:
            pass


def _translate(exc: posix_ipc.Error, what: str, creating: bool, path: str = "") -> OSError:
    if isinstance(exc, posix_ipc.ExistentialError):
        if creating:
            return FileExistsError(errno.EEXIST, f"{what} already exists")
        return FileNotFoundError(errno.ENOENT, f"{what} does not exist")
    if isinstance(exc, posix_ipc.PermissionsError):
        return PermissionError(errno.EACCES, f"{what}: permission denied: {why_denied(path)}")
    return OSError(str(exc))


def _user(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def why_denied(path: str) -> str:
    """Who owns ``path`` and what its mode admits, said for a person."""
    try:
        st = os.stat(path)
    except OSError:
        return "the pool's mode does not admit this user"
    return (
        f"it belongs to {_user(st.st_uid)} with mode {stat.S_IMODE(st.st_mode):04o}, "
        f"which does not let {_user(os.geteuid())} read and write it"
    )


def create(name: str, size: int, mode: int) -> Segment:
    """Create the segment (zero-filled, ``size`` bytes backed for real, so a
    full /dev/shm fails here with OSError instead of SIGBUS later). The caller
    initialises the header and writes the magic number last.
    FileExistsError if the name is taken."""
    try:
        shm = posix_ipc.SharedMemory(shm_name(name), posix_ipc.O_CREX, mode=mode)
    except posix_ipc.Error as exc:
        raise _translate(exc, f"pool {name!r}", creating=True) from None
    try:
        os.fchmod(shm.fd, mode)  # exactly `mode`, whatever the umask
        os.ftruncate(shm.fd, size)
        os.posix_fallocate(shm.fd, 0, size)
        mm = mmap.mmap(shm.fd, size)
        fd = os.dup(shm.fd)
    except BaseException:
        shm.unlink()
        raise
    finally:
        shm.close_fd()
    return Segment(mm, size, fd)


def open_shm(name: str, readonly: bool = False) -> tuple[mmap.mmap, int, int]:
    """Map an existing segment read-write (or read-only): (mapping, size, a
    descriptor of it that the caller closes). FileNotFoundError,
    PermissionError."""
    try:
        shm = posix_ipc.SharedMemory(shm_name(name), read_only=readonly)
    except posix_ipc.Error as exc:
        raise _translate(exc, f"pool {name!r}", creating=False, path=os.path.join(SHM_DIR, SHM_PREFIX + name)) from None
    try:
        size = os.fstat(shm.fd).st_size
        if size == 0:
            raise FileNotFoundError(errno.ENOENT, f"pool {name!r} is empty (being created, or not a pool)")
        prot = mmap.PROT_READ if readonly else mmap.PROT_READ | mmap.PROT_WRITE
        return mmap.mmap(shm.fd, size, prot=prot), size, os.dup(shm.fd)
    finally:
        shm.close_fd()


def unlink(name: str) -> bool:
    """Remove every object of pool ``name`` that exists: its FIFOs first,
    the segment (which owns the name) last. True if anything was removed.
    Mappings already open elsewhere stay usable."""
    removed = _unlink_fifos(name)
    try:
        posix_ipc.unlink_shared_memory(shm_name(name))
        removed = True
    except posix_ipc.ExistentialError:
        pass
    return removed
