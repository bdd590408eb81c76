"""Real processes that tests command one line at a time, and the segment as
bytes (for tests that play a stopped holder, a killed one, or damage).

A ``Child`` is a separate interpreter attached to a pool that runs the
Python code it is sent and answers each command with one line, so a test
can make another process hold the lock, stop it anywhere, kill it, and read
what it saw, all with deadlines (never a sleep standing in for a handshake).
"""

from __future__ import annotations

import ast
import os
import select
import signal
import subprocess
import time
from collections.abc import Callable
from typing import Any

import pytest
from helpers import read_word, wait_for

from shmpool import _layout
from shmpool.testing import segment_path

TESTS = os.path.dirname(os.path.abspath(__file__))
#: The start of a ``python -c`` child attached to pool argv[1] as ``pool``.
ATTACH_CODE = "import sys, time, shmpool\npool = shmpool.Mempool.attach(sys.argv[1])\n"

#: A call that waits for a lock held by a stopped process must give up
#: within its own bound plus this much (scheduling on a loaded machine).
SLACK = 1.5

#: A separate interpreter attached to pool argv[1] that runs the Python
#: code it is sent (one repr()'d string a line) and answers each with one
#: line: "ok REPR" or "error TYPE MESSAGE". Names persist between commands.
SERVER = r"""
import ast, os, sys
sys.path.insert(0, sys.argv[2])
import numpy as np
import shmpool, shmpool.testing
from shmpool import GFP_ATOMIC, GFP_KERNEL, GFP_NOWAIT
from shmpool.testing import hold_lock
pool = shmpool.Mempool.attach(sys.argv[1])
held_lock = None
def take_lock():
    global held_lock
    held_lock = hold_lock(pool)
    held_lock.__enter__()
def give_lock():
    held_lock.__exit__(None, None, None)
print("ready", os.getpid(), flush=True)
for line in sys.stdin:
    try:
        code = ast.literal_eval(line)
        try:
            compiled, expression = compile(code, "<command>", "eval"), True
        except SyntaxError:
            compiled, expression = compile(code, "<command>", "exec"), False
        out = eval(compiled) if expression else exec(compiled)
        print("ok", repr(out), flush=True)
    except Exception as exc:
        print("error", type(exc).__name__, str(exc).replace("\n", " "), flush=True)
"""


class ChildError(Exception):
    """A command raised in the child: args are (type name, message)."""


class Child:
    """A SERVER process: send it code, read its answers with a deadline.
    ``take_lock()`` and ``give_lock()`` in it hold the pool lock across
    commands (``shmpool.testing.hold_lock``)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.pid = proc.pid
        self._buf = b""
        word, _, pid = self.line().partition(" ")
        assert word == "ready", word
        self.inner_pid = int(pid)  # its pid as it sees it (another pid namespace: another number)

    def line(self, timeout: float = 60.0) -> str:
        """Its next line of output; fails the test if none comes in time."""
        fd = self.proc.stdout.fileno()  # type: ignore[union-attr]
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"child {self.pid}: no answer within {timeout} s")
            if select.select([fd], [], [], left)[0]:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise AssertionError(f"child {self.pid} ended (exit {self.wait()}): {self.stderr()}")
                self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode()

    def send(self, code: str) -> None:
        self.proc.stdin.write(repr(code) + "\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]

    def answer(self, timeout: float = 60.0) -> Any:
        status, _, rest = self.line(timeout).partition(" ")
        if status != "ok":
            kind, _, message = rest.partition(" ")
            raise ChildError(kind, message)
        try:
            return ast.literal_eval(rest)
        except (ValueError, SyntaxError):
            return rest

    def call(self, code: str, timeout: float = 60.0) -> Any:
        self.send(code)
        return self.answer(timeout)

    def state(self) -> str:
        return proc_state(self.pid)

    def stop(self) -> None:
        stop_process(self.pid)

    def cont(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        self.wait()

    def wait(self, timeout: float = 30.0) -> int:
        return self.proc.wait(timeout=timeout)

    def finish(self) -> int:
        """Close its stdin (it returns normally) and wait for it."""
        self.proc.stdin.close()  # type: ignore[union-attr]
        return self.wait()

    def stderr(self) -> str:
        if self.proc.poll() is None:
            return "(still running)"
        return self.proc.stderr.read()  # type: ignore[union-attr]


def proc_state(pid: int) -> str:
    """The scheduler state of process ``pid`` (R, S, T when stopped, Z...)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rpartition(")")[2].split()[0]


def stop_process(pid: int) -> None:
    """SIGSTOP ``pid`` wherever it is, and wait until it has stopped."""
    os.kill(pid, signal.SIGSTOP)
    wait_for(lambda: proc_state(pid) in ("T", "t"), what=f"process {pid} to stop")


def start_child(popen: Callable[..., subprocess.Popen[str]], name: str) -> Child:
    return Child(popen(SERVER, name, TESTS))


# ----------------------------------------------------------------------
# The segment as bytes (no pool object needed: a parent must never run the
# C path over a segment it damages)


read_u64 = read_word


def write_bytes(name: str, offset: int, data: bytes) -> None:
    fd = os.open(segment_path(name), os.O_RDWR)
    try:
        assert os.pwrite(fd, data, offset) == len(data)
    finally:
        os.close(fd)


def header_word(name: str, index: int) -> int:
    return read_u64(name, 8 * index)


def entry_base(name: str, entry: int) -> int:
    return header_word(name, _layout.H_OFF_PROCS) + 8 * _layout.PROC_WORDS * entry


def entry_of(name: str, pid: int) -> int:
    """The registry entry of the live process that registered as ``pid``."""
    for entry in range(header_word(name, _layout.H_MAX_PROCS)):
        base = entry_base(name, entry)
        if read_u64(name, base + 8 * _layout.P_PID) == pid and read_u64(name, base + 8 * _layout.P_EPOCH):
            return entry
    raise AssertionError(f"no registry entry for pid {pid}")


def slot_word(name: str, slot: int) -> int:
    return read_u64(name, header_word(name, _layout.H_OFF_WORDS) + 8 * slot)


def holder_pid(name: str) -> int:
    """The pid recorded by the lock's holder (0: free), from its token."""
    token = header_word(name, _layout.H_LOCK_OWNER)
    if not token:
        return 0
    return read_u64(name, entry_base(name, (token & _layout.OWNER_MASK) - 1) + 8 * _layout.P_PID)


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.monotonic()
    out = fn()
    return out, time.monotonic() - t0


def timed_raises(exc: type[BaseException], fn: Callable[[], Any]) -> float:
    t0 = time.monotonic()
    with pytest.raises(exc):
        fn()
    return time.monotonic() - t0
