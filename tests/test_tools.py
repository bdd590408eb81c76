"""The demo and the tools, run as a user would run them."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
from conftest import leftovers
from helpers import run_python

from shmpool import Mempool

BIN = os.path.dirname(sys.executable)
TOOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")


@pytest.mark.timeout(120)
def test_demo_shows_that_no_sleeping_allocation_fails(name: str) -> None:
    out = subprocess.run(
        [os.path.join(BIN, "shmpool-demo"), "--name", name, "--iterations", "30"],
        capture_output=True, text=True, timeout=100,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert "arena allocation failed; served from the reserve with" in text
    assert "mempool_free: returned to the reserve with count" in text
    assert "90 GFP_KERNEL allocations succeeded, 0 failed" in text
    assert "0 CRC mismatches" in text and "audit: clean" in text
    assert "result:  OK" in text
    assert leftovers() == []  # the demo destroyed its pool


def test_demo_refuses_a_taken_name(name: str) -> None:
    with Mempool.create(name, min_nr=1, slot_size=16, capacity=1) as p:
        out = subprocess.run(
            [os.path.join(BIN, "shmpool-demo"), "--name", name], capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 2 and "already exists and is in use" in out.stderr  # its creator (us) lives
        assert p.stats().alloc_arena == 0
        p.destroy()


def test_demo_names_a_stale_pool_stale_with_the_way_to_remove_it(name: str) -> None:
    made = subprocess.run(
        [sys.executable, "-c", f"from shmpool import Mempool; Mempool.create({name!r}, min_nr=1, slot_size=16, capacity=1)"],
        capture_output=True, text=True, timeout=60,
    )
    assert made.returncode == 0, made.stderr
    out = subprocess.run([os.path.join(BIN, "shmpool-demo"), "--name", name], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "stale" in out.stderr and f"shmpool-inspect {name} --destroy" in out.stderr
    Mempool.attach(name).destroy()


def cleanup(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, os.path.join(TOOLS, "cleanup.py"), *args], capture_output=True, text=True, timeout=60
    )


def segment(name: str) -> str:
    return os.path.join("/dev/shm", "shmpool." + name)


CREATE_AND_EXIT = (
    "import sys, shmpool\n"
    "pool = shmpool.Mempool.create(sys.argv[1], min_nr=1, slot_size=16, capacity=4)\n"
    "h = pool.alloc()\n"  # held at exit: the pool is left as a crash would leave it
)
ATTACH = "import sys, shmpool\npool = shmpool.Mempool.attach(sys.argv[1])\n"


def test_cleanup_removes_a_pool_whose_creator_and_users_are_dead(name: str) -> None:
    made = run_python(CREATE_AND_EXIT, name)
    assert made.returncode == 0, made.stderr
    used = run_python(ATTACH + "h = pool.alloc()", name)  # attaches, holds, exits
    assert used.returncode == 0, used.stderr
    listing = cleanup()
    assert name in listing.stdout.split()
    assert f"{name}  (in use" not in listing.stdout
    out = cleanup(name)
    assert out.returncode == 0 and out.stdout.strip() == f"removed {name}", out.stdout + out.stderr
    assert leftovers() == []


def test_cleanup_yes_keeps_a_pool_a_live_process_uses_until_forced(name: str, popen) -> None:
    made = run_python(CREATE_AND_EXIT, name)  # its creator is dead
    assert made.returncode == 0, made.stderr
    user = popen(ATTACH + "print('ready', flush=True)\nsys.stdin.read()", name)
    assert user.stdout.readline() == "ready\n", user.stderr.read()
    listing = cleanup()
    assert f"{name}  (in use: in use by pid {user.pid} (" in listing.stdout, listing.stdout

    kept = cleanup("--yes", "--prefix", name)
    assert kept.returncode == 0, kept.stderr
    assert kept.stdout.startswith(f"kept {name}: in use by pid {user.pid} ({sys.executable} -c"), kept.stdout
    assert leftovers() == [f"shmpool.{name}"]  # the segment is the whole pool
    named = cleanup(name)  # naming it is no different
    assert named.returncode == 0 and named.stdout.startswith(f"kept {name}: "), named.stdout
    assert leftovers() == [f"shmpool.{name}"]

    forced = cleanup("--yes", "--force", "--prefix", name)
    assert forced.returncode == 0 and forced.stdout.strip() == f"removed {name}", forced.stdout + forced.stderr
    assert leftovers() == []
    user.stdin.close()  # the user ends normally: its mapping outlived the removal
    assert user.wait(timeout=30) == 0, user.stderr.read()


def test_cleanup_keeps_a_pool_whose_creator_lives(name: str) -> None:
    Mempool.create(name, min_nr=1, slot_size=16, capacity=1).close()  # this process made it
    out = cleanup("--yes", "--prefix", name)
    assert out.returncode == 0
    assert out.stdout.startswith(f"kept {name}: created by pid {os.getpid()} ("), out.stdout
    assert os.path.exists(segment(name))
    out = cleanup("--force", name)
    assert out.stdout.strip() == f"removed {name}"
    assert leftovers() == []


def test_cleanup_leaves_semaphores_alone_they_are_no_pools(name: str) -> None:
    """The lock and the wait channels are words of the segment: a semaphore
    named after a pool is somebody else's, never listed nor removed."""
    sem = os.path.join("/dev/shm", f"sem.shmpool.{name}.lock")  # what a POSIX named semaphore is on Linux
    with open(sem, "xb") as f:
        f.write(bytes(32))
    try:
        assert name not in cleanup().stdout
        out = cleanup("--yes", "--prefix", name)
        assert out.returncode == 0 and out.stdout == "", out.stdout + out.stderr
        assert os.path.exists(sem)
    finally:
        os.unlink(sem)


def test_cleanup_removes_an_orphan_asyncio_fifo(name: str) -> None:
    fifo = os.path.join("/dev/shm", f"fifo.shmpool.{name}.3")  # registry entry 3's, its process killed
    os.mkfifo(fifo, 0o600)
    fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)  # still open, as a killed process's leftover can be
    try:
        assert leftovers() == [f"fifo.shmpool.{name}.3"]
        out = cleanup("--yes", "--prefix", name)
        assert out.returncode == 0 and out.stdout.strip() == f"removed {name}", out.stdout + out.stderr
        assert leftovers() == []
    finally:
        os.close(fd)


def chaos(name: str, *args: str) -> tuple[int, str]:
    out = subprocess.run(
        [sys.executable, os.path.join(TOOLS, "chaos.py"), "--name", name, *args],
        capture_output=True, text=True, timeout=100,
    )
    assert out.stdout.startswith("chaos: ") and out.stdout.count("\n") == 1, out.stdout + out.stderr
    return out.returncode, out.stdout.strip()


@pytest.mark.timeout(120)
def test_chaos_kills_workers_and_the_pool_survives(name: str) -> None:
    code, line = chaos(name, "--seconds", "3", "--seed", "3", "--min-kills", "10")
    assert code == 0 and line.endswith(": OK"), line
    kills = int(line.split("kills ")[1].split(",")[0])
    operations = int(line.split("operations ")[1].split(",")[0])
    assert kills >= 10 and operations > 1000, line
    assert leftovers() == []


@pytest.mark.timeout(120)
def test_chaos_beside_busy_loops_with_the_reserve_lent_out(name: str) -> None:
    """A loaded machine (two busy loops) and a reserve big enough to be lent
    to the workers as places: the workers are descheduled in the middle of
    their lock-free reserve steps and killed there, and the pool survives."""
    code, line = chaos(name, "--seconds", "3", "--seed", "5", "--min-kills", "10", "--busy", "2",
                       "--min-nr", "24", "--capacity", "32")
    assert code == 0 and line.endswith(": OK"), line
    kills = int(line.split("kills ")[1].split(",")[0])
    assert kills >= 10 and int(line.split("operations ")[1].split(",")[0]) > 1000, line
    assert leftovers() == []


@pytest.mark.timeout(120)
def test_chaos_without_a_kill_tested_nothing_and_fails(name: str) -> None:
    code, line = chaos(name, "--seconds", "0")
    assert code == 1
    assert " kills 0, " in line and line.endswith(": FAILED: no kill hit a running worker"), line
    operations = int(line.split("operations ")[1].split(",")[0])
    assert operations >= 4  # every worker ran (completed an operation) before the run began
    assert leftovers() == []


@pytest.mark.timeout(120)
def test_chaos_fails_when_workers_cannot_get_to_run(name: str) -> None:
    code, line = chaos(name, "--ready-timeout", "0", "--seconds", "3")
    assert code == 1
    assert " kills 0, " in line and "completed no operation within 0 s of its start" in line, line
    assert leftovers() == []


def test_chaos_verdict_demands_operations_and_kills() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("chaos_tool", os.path.join(TOOLS, "chaos.py"))
    assert spec is not None and spec.loader is not None
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.verdict(kills=12, operations=5000, failure="") == ""
    assert tool.verdict(kills=12, operations=0, failure="") == "no operation completed"
    assert tool.verdict(kills=0, operations=0, failure="") == "no operation completed"
    assert tool.verdict(kills=0, operations=5000, failure="") == "no kill hit a running worker"
    assert tool.verdict(kills=12, operations=5000, failure="stamp mismatch") == "stamp mismatch"


@pytest.mark.timeout(260)
def test_bench_runs_and_reports_every_section() -> None:
    """--quick --json runs every section, each with figures that did work
    (sanity, not speed), leaves nothing behind, and a run that did no work
    is a failure, not a figure."""
    import glob
    import json
    import re
    import tempfile

    out = subprocess.run(
        [sys.executable, os.path.join(TOOLS, "bench.py"), "--quick", "--json"],
        capture_output=True, text=True, timeout=250,
    )
    assert out.returncode == 0, out.stderr
    figures = json.loads(out.stdout)
    tag = figures["machine"]["tag"]
    sections = ("pipeline", "fanout", "byref", "pairs", "views", "procs", "reserve2", "bulk", "churn", "wakeup", "asyncwake",
                "floor", "scale", "inspect", "recovery", "dask")
    assert set(figures) == {"machine", *sections}
    assert not [s for s in sections if "error" in figures[s]]

    def positive(section: str, *keys: str) -> None:
        for key in keys:
            value = figures[section][key]
            assert isinstance(value, (int, float)) and value > 0, (section, key, value)

    pipe = figures["pipeline"]
    positive("pipeline", "idiom_1to1_msgs_per_s", "idiom_1to2_msgs_per_s", "batched_1to1_msgs_per_s",
             "batched_1to2_msgs_per_s", "mpqueue_1to1_msgs_per_s", "pipe_1to1_msgs_per_s", "idiom_1to2_vs_1to1",
             "batched_1to2_vs_1to1", "batched_vs_idiom", "idiom_vs_pipe", "idiom_vs_mpqueue", "idiom_worst_vs_pipe",
             "idiom_p50_vs_pipe", "idiom_p50_vs_mpqueue", "busy_1to1_msgs_per_s", "busy_1to2_msgs_per_s",
             "busy_1to2_vs_1to1")
    for who in ("idiom", "mpqueue", "pipe"):
        assert 0 < pipe[f"{who}_1to1_paced_p50_us"] <= pipe[f"{who}_1to1_paced_p99_us"]
        assert pipe[f"{who}_1to1_longest_wait_ms"] >= 0
    for who in ("idiom_1to1", "idiom_1to2", "batched_1to1", "batched_1to2", "mpqueue_1to1", "pipe_1to1", "busy_1to1",
                "busy_1to2"):
        low, high = pipe[f"{who}_min_max"]
        assert len(pipe[f"{who}_runs"]) == pipe["rounds"] and low <= pipe[f"{who}_msgs_per_s"] <= high
        assert pipe[f"{who}_switches_per_msg"] >= 0
    if pipe["iceoryx2"].startswith("peer unavailable: "):  # --quick installs nothing
        assert "iceoryx2_1to1_msgs_per_s" not in pipe and "idiom_vs_iceoryx2" not in pipe
    else:
        positive("pipeline", "iceoryx2_1to1_msgs_per_s", "idiom_vs_iceoryx2", "idiom_p50_vs_iceoryx2",
                 "iceoryx2_1to1_paced_p50_us")
    fan = figures["fanout"]
    positive("fanout", "topic_1to3_msgs_per_s")
    assert len(fan["topic_1to3_runs"]) == fan["rounds"] and fan["subscribers"] == 3
    if fan["iceoryx2"].startswith("peer unavailable: "):
        assert "topic_vs_iceoryx2" not in fan
    else:
        positive("fanout", "iceoryx2_1to3_msgs_per_s", "topic_vs_iceoryx2")
    positive("byref", "pool_64B_us_per_msg", "pool_1MiB_us_per_msg", "plain_64B_us_per_msg", "plain_1MiB_us_per_msg",
             "pool_1MiB_vs_pool_64B", "plain_1MiB_vs_pool_1MiB")
    positive("reserve2", "1proc_pairs_per_s", "2procs_pairs_per_s", "2procs_vs_1", "4procs_pairs_per_s", "4procs_vs_1",
             "reserve_pops")
    positive("views", "pair_us", "buffer_us", "ndarray_us", "ndarray_f32_32x32_us", "buffer_vs_pair",
             "ndarray_vs_pair", "ndarray_f32_32x32_vs_pair")
    positive("churn", "alloc_bulk_M_per_s", "free_bulk_M_per_s", "churn_ops")
    positive("asyncwake", "fresh_thread_median_us", "kept_thread_median_us", "async_median_us",
             "async_vs_fresh_thread", "async_vs_kept_thread")
    assert figures["asyncwake"]["samples"] >= 25
    positive("floor", "round_trip_median_us", "one_wakeup_median_us", "wakeup_vs_floor", "wakeup_vs_one_wakeup")
    assert figures["floor"]["wakeup_median_us"] == figures["wakeup"]["median_us"]  # the same run's wake-up
    positive("dask", "shmpool_us_per_handoff", "dask_us_per_handoff", "dask_vs_shmpool")
    assert len(figures["dask"]["shmpool_runs_us"]) == figures["dask"]["rounds"] == len(figures["dask"]["dask_runs_us"])
    recovery = figures["recovery"]
    assert recovery["recoveries"] >= 4  # every kill was recovered from
    assert 0 < recovery["killed_holder_median_ms"] <= recovery["killed_holder_max_ms"]
    # Nothing left: pools, semaphores, iceoryx2's files, temporary directories.
    ours = re.compile(rf"bench-[a-z0-9-]*-{tag}(\.|@|$)|^bench{tag}iox_")
    assert [e for e in os.listdir("/dev/shm") if ours.search(e)] == []
    assert glob.glob(os.path.join(tempfile.gettempdir(), f"bench-*-{tag}-*")) == []
    assert leftovers() == []

    code = f"import sys; sys.path.insert(0, {TOOLS!r}); import bench; bench.run_pipeline('pipe', 1, 0)"
    nothing = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert nothing.returncode == 1, nothing.stderr  # a run that sent nothing gives no figure
    assert "RuntimeError: pipe: 0 of 0 messages sent arrived" in nothing.stderr, nothing.stderr


@pytest.mark.timeout(120)
def test_demo_hold_keeps_the_pool_up_until_sigint_and_cleans_up(name: str) -> None:
    import json
    import signal

    with holding_demo(name, "0") as p:
        while "--hold" not in (line := p.stdout.readline()):
            assert line, f"the demo ended before holding: {p.communicate(timeout=30)}"
        shown = subprocess.run(
            [os.path.join(BIN, "shmpool-inspect"), name, "--json"], capture_output=True, text=True, timeout=60
        )
        assert shown.returncode == 0 and json.loads(shown.stdout)["name"] == name
        p.send_signal(signal.SIGTERM)  # SIGINT alike: both end the hold
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, out + err
        assert "result:  OK" in out
    assert leftovers() == []


@contextlib.contextmanager
def holding_demo(name: str, trace: str) -> Iterator[subprocess.Popen[str]]:
    """``shmpool-demo --hold``, killed (its pid) if the test leaves it running."""
    p = subprocess.Popen(
        [os.path.join(BIN, "shmpool-demo"), "--name", name, "--hold", "--trace", trace, "--iterations", "5"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        yield p
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()


def test_demo_help_gives_every_option_a_help_text_with_its_default() -> None:
    out = subprocess.run([os.path.join(BIN, "shmpool-demo"), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())
    options = ("--name", "--min-nr", "--slot-size", "--capacity", "--fail-rate", "--seed", "--producers",
               "--consumers", "--iterations", "--trace", "--work-ms", "--hold")
    for option in options:
        tail = text.split(f" {option} ", 1)[1] if f" {option} " in text else ""
        described = tail.split(" --", 1)[0]  # up to the next option
        assert "(default: " in described, (option, described)
    for option, default in (("--min-nr", "3"), ("--capacity", "8"), ("--fail-rate", "0.3"), ("--seed", "42"),
                            ("--producers", "3"), ("--consumers", "2"), ("--slot-size", "64")):
        assert f"(default: {default})" in text.split(f" {option} ", 1)[1].split(" --", 1)[0], option


@pytest.mark.timeout(120)
def test_demo_hold_prints_its_banner_again_after_the_last_trace_line(name: str) -> None:
    import signal

    with holding_demo(name, "3") as p:
        lines: list[str] = []
        while sum("--hold:" in line for line in lines) < 2:
            line = p.stdout.readline()
            assert line, f"the demo ended before its second banner: {lines} {p.communicate(timeout=30)}"
            lines.append(line)
        traces = [i for i, line in enumerate(lines) if line.startswith("[")]
        assert len(traces) == 3 * 5  # 3 producers and 2 consumers, 3 lines each, all before the second banner
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, out + err
        assert not any(line.startswith("[") for line in out.splitlines()), out  # no trace after it
    assert leftovers() == []
