from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from helpers import RUN_TAG

from shmpool.testing import segment_path

SHM = "/dev/shm"


def leftovers() -> list[str]:
    """This run's entries in /dev/shm: segments, asyncio FIFOs, and anything
    else (a pool is its segment and its FIFOs: nothing more may appear)."""
    return sorted(e for e in os.listdir(SHM) if RUN_TAG in e)


def remove_pool_files(name: str) -> None:
    """Remove pool ``name``'s segment and asyncio FIFOs, if there are any."""
    fifos = f"fifo.shmpool.{name}."
    for entry in os.listdir(SHM):
        if entry.startswith(fifos) and entry[len(fifos) :].isdigit():
            os.unlink(os.path.join(SHM, entry))
    if os.path.exists(segment_path(name)):
        os.unlink(segment_path(name))


@pytest.fixture
def name() -> Iterator[str]:
    """A fresh pool name; the pool the test left under it (closed, not
    destroyed) is removed after."""
    n = f"{RUN_TAG}-{uuid.uuid4().hex[:10]}"
    yield n
    remove_pool_files(n)


@pytest.fixture
def spawn() -> Iterator[Callable[..., Any]]:
    """Start spawned children; every one is killed (if still running) and
    joined when the test ends, passed or failed."""
    ctx = mp.get_context("spawn")
    procs: list[Any] = []

    def start(target: Callable[..., Any], *args: Any) -> Any:
        p = ctx.Process(target=target, args=args, daemon=True)
        p.start()
        procs.append(p)
        return p

    yield start
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join(10)


@pytest.fixture
def popen() -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Start separate interpreters (python -c CODE ARGS); each is killed and
    reaped when the test ends."""
    procs: list[subprocess.Popen[str]] = []

    def start(code: str, *args: str) -> subprocess.Popen[str]:
        p = subprocess.Popen(
            [sys.executable, "-c", code, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        procs.append(p)
        return p

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=10)
        for pipe in (p.stdin, p.stdout, p.stderr):
            if pipe is not None:
                pipe.close()


@pytest.fixture(autouse=True)
def no_leaks_after_each_test() -> Iterator[None]:
    """No test may leave anything in /dev/shm (after its own fixtures ran)."""
    yield
    left = leftovers()
    for entry in left:  # remove them so that one leak does not fail every later test
        os.unlink(os.path.join(SHM, entry))
    assert left == [], f"left in {SHM}: {left}"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """The whole suite's proof: nothing of this run outlives it."""
    left = leftovers()
    if left:
        print(f"\nLEAK: the suite left these in {SHM}: {left}", file=sys.stderr)
        session.exitstatus = 1


@pytest.fixture
def no_retries() -> Iterator[None]:
    """Unwoken sleepers of this process (allocations, blocked puts and
    gets) retry only after a minute: a call that returns sooner was woken
    (or, a blocked put, looked again after its nap), never rescued by the
    retry. (An allocation's long-sleep report, after 5 s, also ends a sleep:
    a test of a sleeping allocation turns it off on its pool object.)"""
    from shmpool.testing import sleep_retry

    before = sleep_retry(alloc=60.0, queue=60.0)
    yield
    sleep_retry(*before)
