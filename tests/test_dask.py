"""shmpool.dask on a real distributed.LocalCluster of worker processes
(nannies): a pool per host, arrays by reference on one host and by value
between hosts, lifetimes that follow Dask's keys, a SIGKILLed worker's
elements coming back, and the last worker of a host destroying its pool.

Two "hosts" on one machine are two SHMPOOL_HOST_ID values, set in each
worker's environment before the plugin is registered.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import re
import signal
import subprocess
import sys
import traceback
from collections.abc import Callable
from typing import Any

import distributed  # (the test extra installs dask and distributed: never skipped)
import numpy as np
import pytest
from helpers import wait_for

import shmpool
import shmpool.dask as sd
from shmpool.testing import audit, segment_path

CASE_SECONDS = 200
pytestmark = pytest.mark.timeout(CASE_SECONDS + 40)

N = 1000  # float64s: 8,000 bytes of an 8 KiB slot


def produce(start: float) -> Any:
    a = sd.local_pool().alloc_array((N,), np.float64)
    a[:] = np.arange(N) + start
    return a


def write_first(x: Any) -> tuple[int, float, str]:
    """The consumer: writes through its argument; its handle, its sum
    before the write, and the pool its element is in."""
    total = float(x.sum())
    x[0] = -1.0
    return shmpool.handle_of(x), total, sd.local_pool().name


def look(x: Any) -> tuple[int, float]:
    return shmpool.handle_of(x), float(x[0])


def keep(x: Any) -> Any:
    return x  # the same element, now held by this worker too


def pooled(x: Any) -> bool:
    try:
        shmpool.handle_of(x)
    except ValueError:
        return False
    return True


def plain(n: int) -> Any:
    return np.arange(n, dtype=np.float64)


def in_use() -> int:
    """Elements out of this worker's host pool; -1 while the worker has
    none yet (a worker restarted by its nanny is listed by the scheduler a
    moment before its plugin's setup is done)."""
    try:
        return sd.local_pool().stats().in_use
    except LookupError:
        return -1


def set_host(host: str) -> None:
    os.environ["SHMPOOL_HOST_ID"] = host


def _run_case(case: str, name: str, processes: bool, errors: Any) -> None:
    try:
        with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=processes, dashboard_address=None,
                                      silence_logs=logging.ERROR) as cluster:
            globals()[case](cluster, name)
    except BaseException:
        errors.put(traceback.format_exc())
        sys.exit(1)


def isolated(case: Callable[[Any, str], None], name: str, *, processes: bool = True) -> None:
    """Run ``case(cluster, name)`` in a spawned interpreter of its own, on a
    LocalCluster of two workers that it starts: a process that used a
    distributed client keeps a thread (Dask-Offload), and the suite's later
    forks must find none. Bounded; its traceback is the failure."""
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    child = ctx.Process(target=_run_case, args=(case.__name__, name, processes, errors))
    child.start()
    child.join(CASE_SECONDS)
    if child.is_alive():
        child.kill()
        child.join(30)
        pytest.fail(f"{case.__name__} did not finish within {CASE_SECONDS} s")
    if child.exitcode != 0:
        try:
            why = errors.get(timeout=10)
        except queue.Empty:
            why = f"{case.__name__} exited with {child.exitcode}"
        pytest.fail(why, pytrace=False)


def workers(client: Any) -> list[str]:
    return sorted(client.scheduler_info()["workers"])


def plugin(name: str) -> sd.PoolPlugin:
    return sd.PoolPlugin(name, min_nr=2, slot_size=8192, capacity=16)


def case_same_host_hands_off_by_reference_and_frees_with_the_keys(cluster: Any, name: str) -> None:
    with distributed.Client(cluster) as client:
        client.register_plugin(plugin(name))
        a, b = workers(client)
        x = client.submit(produce, 0.0, workers=[a], pure=False)
        handle, total, pool = client.submit(write_first, x, workers=[b]).result()
        assert pool == sd.host_pool_name(name)
        assert total == float(np.arange(N).sum())
        # The producer's own array sees the consumer's write: one element, no copy.
        assert client.submit(look, x, workers=[a], pure=False).result() == (handle, -1.0)
        gathered = x.result()  # to the client: an ordinary array, copied
        assert isinstance(gathered, np.ndarray) and gathered[0] == -1.0 and gathered[1] == 1.0
        with pytest.raises(ValueError):
            shmpool.handle_of(gathered)
        assert set(client.run(in_use).values()) == {1}  # one element (shared by the workers that hold the key)
        other = client.submit(plain, N, workers=[a], pure=False)  # not a pool's: Dask's own path, untouched
        assert client.submit(pooled, other, workers=[b]).result() is False
        assert client.submit(pooled, x, workers=[b]).result() is True
        del other
        with shmpool.Mempool.attach(pool) as seen:  # (closed before the workers leave: they destroy it)
            assert audit(seen) == []
            assert seen.stats().published == 1
        shown = subprocess.run([sys.executable, "-m", "shmpool.cli", pool], capture_output=True, text=True, timeout=60)
        assert "shmpool.dask: a share group, 1 element(s) held together" in shown.stdout, shown.stdout
        # Both workers are members; the producer holds it (its key is wanted), and
        # the consumer may have let its replica go already (Dask drops it when no
        # task there needs it).
        members = re.findall(r"#\d+ +pid +\d+ alive holds ([01])", shown.stdout)
        assert len(members) == 2 and "1" in members, shown.stdout
        del x
        wait_for(lambda: set(client.run(in_use).values()) == {0}, 60, "every element back")
    assert os.path.exists(segment_path(sd.host_pool_name(name)))  # the cluster still runs
    cluster.close()
    assert not os.path.exists(segment_path(sd.host_pool_name(name)))


def case_two_hosts_exchange_by_value(cluster: Any, name: str) -> None:
    with distributed.Client(cluster) as client:
        # Dask's active memory manager drops duplicate replicas every few
        # seconds: if it dropped A's, A would read B's (written) replica of
        # x below. What is checked is A's own element, so both are kept.
        client.amm.stop()
        a, b = workers(client)
        client.run(set_host, "hostA", workers=[a])
        client.run(set_host, "hostB", workers=[b])
        client.register_plugin(plugin(name))
        x = client.submit(produce, 5.0, workers=[a], pure=False)
        _handle, total, pool = client.submit(write_first, x, workers=[b]).result()
        assert pool == sd.host_pool_name(name, "hostB")  # it landed in B's host's pool
        assert total == float((np.arange(N) + 5.0).sum())
        assert client.submit(look, x, workers=[a], pure=False).result()[1] == 5.0  # B wrote into its own copy
        for host in ("hostA", "hostB"):
            assert os.path.exists(segment_path(sd.host_pool_name(name, host)))
    cluster.close()
    for host in ("hostA", "hostB"):
        assert not os.path.exists(segment_path(sd.host_pool_name(name, host)))


def case_a_killed_worker_loses_no_element(cluster: Any, name: str) -> None:
    with distributed.Client(cluster) as client:
        client.register_plugin(plugin(name))
        a, b = workers(client)
        x = client.submit(produce, 1.0, workers=[a], pure=False)
        kept = client.submit(keep, x, workers=[b])  # B holds the element too, by reference
        own = client.submit(produce, 2.0, workers=[a], pure=False)  # A's alone
        kept.result(), own.result()
        assert set(client.run(in_use).values()) == {2}
        pid = client.run(os.getpid, workers=[a])[a]
        os.kill(pid, signal.SIGKILL)  # its nanny starts another, whose attach takes back what it held
        wait_for(lambda: len(client.scheduler_info()["workers"]) == 2 and a not in client.scheduler_info()["workers"], 60,
                 "the restarted worker")
        client.wait_for_workers(2)
        assert float(kept.result()[0]) == 1.0  # B's reference outlived A
        del x, own
        wait_for(lambda: set(client.run(in_use).values()) == {1}, 60, "all but B's back")
        del kept
        wait_for(lambda: set(client.run(in_use).values()) == {0}, 60, "every element back")
    cluster.close()
    assert not os.path.exists(segment_path(sd.host_pool_name(name)))


def case_unregistering_the_plugin_destroys_the_pool(cluster: Any, name: str) -> None:
    with distributed.Client(cluster) as client:
        client.register_plugin(plugin(name))
        path = segment_path(sd.host_pool_name(name))
        assert os.path.exists(path)
        client.unregister_worker_plugin(f"shmpool-{name}")
        assert not os.path.exists(path)
        with pytest.raises(LookupError):
            client.submit(sd.local_pool, pure=False).result()


def test_host_id_and_pool_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SHMPOOL_HOST_ID", raising=False)
    derived = sd.host_id()
    assert derived == sd.host_id() and len(derived) == 12
    monkeypatch.setenv("SHMPOOL_HOST_ID", "rack1.node-7")
    assert sd.host_id() == "rack1.node-7"
    assert sd.host_pool_name("frames") == "frames@rack1.node-7"
    assert sd.host_pool_name("frames", "h2") == "frames@h2"
    for bad in ("", "a/b", "x" * 65, "sp ace"):
        monkeypatch.setenv("SHMPOOL_HOST_ID", bad)
        with pytest.raises(ValueError):
            sd.host_id()
    with pytest.raises(ValueError):
        sd.PoolPlugin("a@b", min_nr=1, slot_size=64, capacity=4)
    with pytest.raises(LookupError):
        sd.local_pool()


def case_workers_in_one_process_share_its_pool_and_the_last_destroys_it(cluster: Any, name: str) -> None:
    with distributed.Client(cluster) as client:
        client.register_plugin(plugin(name))
        a, b = workers(client)
        x = client.submit(produce, 3.0, workers=[a], pure=False)
        assert client.submit(write_first, x, workers=[b]).result()[1] == float((np.arange(N) + 3.0).sum())
        assert sd.local_pool().stats().attached == 1  # one process: one entry, one membership
        del x
        client.unregister_worker_plugin(f"shmpool-{name}")  # both workers let go: the process leaves
        assert not os.path.exists(segment_path(sd.host_pool_name(name)))


def test_same_host_hands_off_by_reference_and_frees_with_the_keys(name: str) -> None:
    isolated(case_same_host_hands_off_by_reference_and_frees_with_the_keys, name)

def test_two_hosts_exchange_by_value(name: str) -> None:
    isolated(case_two_hosts_exchange_by_value, name)

def test_a_killed_worker_loses_no_element(name: str) -> None:
    isolated(case_a_killed_worker_loses_no_element, name)

def test_unregistering_the_plugin_destroys_the_pool(name: str) -> None:
    isolated(case_unregistering_the_plugin_destroys_the_pool, name)

def test_workers_in_one_process_share_its_pool_and_the_last_destroys_it(name: str) -> None:
    isolated(case_workers_in_one_process_share_its_pool_and_the_last_destroys_it, name, processes=False)
