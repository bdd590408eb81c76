"""The public surface: every public name of a pool and a queue is in the
README, the geometry cannot be assigned, the compiled core is held (not
inherited), the errors are what they say; the kernel's constructors; what a
type checker sees; every README example runs; the docs claim no kernel
release for what is not in one."""

from __future__ import annotations

import gc
import mmap
import os
import pickle
import re
import subprocess
import sys
from typing import Any

import pytest

from shmpool import (
    InvalidHandleError,
    Mempool,
    PoolBusyError,
    PoolClosedError,
    PoolFormatError,
    ShmpoolError,
    kernel,
)
from shmpool.queues import Queue

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")


def public(obj: object) -> set[str]:
    return {n for n in dir(obj) if not n.startswith("_")}


# ---------------------------------------------------------------- the surface


def test_every_public_name_of_a_pool_and_a_queue_is_in_the_readme(name: str) -> None:
    with open(README) as f:
        text = f.read()
    with Mempool.create(name, min_nr=1, slot_size=16, capacity=4).destroying() as pool:
        q = pool.queue("q", depth=2)
        names = public(pool) | public(q)
        assert {"alloc", "free", "buffer", "ndarray", "queue", "put", "get"} <= names
        missing = sorted(n for n in names if not re.search(rf"\b{n}\b", text))
        assert missing == []


@pytest.mark.parametrize("attr", ["name", "min_nr", "slot_size", "capacity", "closed"])
def test_a_pools_geometry_is_read_only(name: str, attr: str) -> None:
    with Mempool.create(name, min_nr=1, slot_size=16, capacity=4).destroying() as pool:
        before = getattr(pool, attr)
        with pytest.raises(AttributeError):
            setattr(pool, attr, before)
        assert getattr(pool, attr) == before


@pytest.mark.parametrize("attr", ["name", "depth"])
def test_a_queues_name_and_depth_are_read_only(name: str, attr: str) -> None:
    with Mempool.create(name, min_nr=1, slot_size=16, capacity=4).destroying() as pool:
        q = pool.queue("q", depth=2)
        with pytest.raises(AttributeError):
            setattr(q, attr, 3)
        assert (q.name, q.depth) == ("q", 2)


def test_the_compiled_core_is_held_not_inherited(name: str) -> None:
    assert Mempool.__mro__ == (Mempool, object) and Queue.__mro__ == (Queue, object)
    for method in ("alloc", "free", "buffer", "ndarray"):
        assert getattr(Mempool, method).__doc__  # documented, typed (help() and mypy see it)
    with Mempool.create(name, min_nr=1, slot_size=16, capacity=4).destroying() as pool:
        h = Mempool.alloc(pool)  # the documented method does what the bound one does
        assert pool.stats().in_use == 1
        Mempool.free(pool, h)
        assert pool.stats().in_use == 0
        h = Mempool.alloc_preallocated(pool)
        Mempool.buffer(pool, h)[:2] = b"ok"
        assert bytes(Mempool.ndarray(pool, h)[:2]) == b"ok"
        pool.free(h)


def test_a_hot_path_method_kept_after_its_pool_is_gone_raises_closed(name: str) -> None:
    pool = Mempool.create(name, min_nr=1, slot_size=16, capacity=4)
    alloc, free = pool.alloc, pool.free
    h = alloc()
    free(h)  # works while the pool lives
    pool.close()
    del pool
    gc.collect()
    with pytest.raises(PoolClosedError):
        alloc()
    with pytest.raises(PoolClosedError):
        free(h)
    Mempool.attach(name).destroy()


def test_the_errors_are_what_they_say_and_pickle() -> None:
    assert issubclass(PoolFormatError, ValueError) and issubclass(PoolFormatError, ShmpoolError)
    assert issubclass(InvalidHandleError, ValueError) and issubclass(PoolBusyError, RuntimeError)
    err = pickle.loads(pickle.dumps(InvalidHandleError(0x1234, "in the arena")))
    assert (err.handle, err.state, str(err)) == (0x1234, "in the arena", "handle 0x1234 is not held: in the arena")
    busy = pickle.loads(pickle.dumps(PoolBusyError("busy")))
    assert isinstance(busy, RuntimeError) and str(busy) == "busy"


# ---------------------------------------------------------------- the kernel's constructors


def test_helper_constructors_make_pools_of_the_right_shape(name: str) -> None:
    page = mmap.PAGESIZE
    assert page == kernel.PAGE_SIZE
    made = [
        # (pool, slot_size, min_nr, capacity)
        (kernel.mempool_create_kmalloc_pool(3, 200, f"{name}-k"), 200, 3, 12),  # capacity: 4 x min_nr
        (kernel.mempool_create_slab_pool(2, 96, name=f"{name}-s", capacity=5), 96, 2, 5),
        (kernel.mempool_create_page_pool(2, 0, f"{name}-p0"), page, 2, 8),
        (kernel.mempool_create_page_pool(1, 2, f"{name}-p2", poison=True), page << 2, 1, 4),
        (kernel.mempool_create_node(2, f"{name}-n", 1, slot_size=64), 64, 2, 8),  # node 1 ignored
        (kernel.mempool_create_node(2, f"{name}-n2", kernel.NUMA_NO_NODE, slot_size=8, gfp_mask=kernel.GFP_KERNEL),
         8, 2, 8),
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


def test_init_exit_and_destroy_of_none(name: str) -> None:
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


# ---------------------------------------------------------------- what the docs claim


def test_destroys_doc_says_it_refuses_only_while_elements_are_held() -> None:
    assert kernel.mempool_destroy.__doc__ and Mempool.destroy.__doc__
    assert "only while elements are held" in kernel.mempool_destroy.__doc__
    assert "Like the kernel" not in kernel.mempool_destroy.__doc__ + Mempool.destroy.__doc__


def bulk_rows(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("|") and "bulk" in line]


def test_bulk_docs_say_what_it_is_and_claim_no_kernel_release() -> None:
    release = re.compile(r"\b(?:kernel|linux|v)\s*\d+\.\d+", re.IGNORECASE)
    for doc in (Mempool.alloc_bulk.__doc__, Mempool.free_bulk.__doc__):
        assert doc and not release.search(doc), doc
    assert "linux-next" in (Mempool.alloc_bulk.__doc__ or "")
    with open(README) as f:
        for line in f.read().splitlines():
            assert not ("bulk" in line and release.search(line)), line
    with open(os.path.join(ROOT, "KERNEL.md")) as f:
        rows = bulk_rows(f.read())
    assert rows, "KERNEL.md has no row for bulk allocation"
    table = " ".join(rows)
    for words in ("linux-next", "all or nothing", "holds nothing while", "keeps what", "returns how many"):
        assert words in table, words
    assert not re.search(r"\b\d+\.\d+\b", table.replace("v3.2", ""))


# ---------------------------------------------------------------- the README's examples


def readme_blocks() -> list[str]:
    with open(README) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), re.S)


def test_the_readme_has_its_examples() -> None:
    with open(README) as f:
        text = f.read()
    lifetimes = text.split("\n## Lifetimes and asyncio\n", 1)[1].split("\n## ", 1)[0]
    assert len(re.findall(r"```python\n", lifetimes)) == 3  # create/attach, destroying(), asyncio
    assert len(readme_blocks()) >= 5  # and the API tour, the two-process example, the typed idioms


@pytest.mark.timeout(120)
@pytest.mark.parametrize("index", range(len(readme_blocks())))
def test_a_readme_example_runs(index: int, name: str, tmp_path: Any) -> None:
    """Each Python block of the README as a script of its own, its pool
    names made this run's."""
    code = readme_blocks()[index]
    script = tmp_path / f"block{index}.py"
    script.write_text(re.sub(r'"(frames|jobs)"', lambda m: repr(f"{name}-{m.group(1)}"), code))
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=100, cwd=tmp_path)
    assert run.returncode == 0, f"block {index}:\n{code}\n{run.stdout}\n{run.stderr}"


@pytest.mark.timeout(300)
def test_every_readme_example_passes_mypy_strict(tmp_path: Any) -> None:
    """The README's examples, the typed idioms included, as a user's
    ``mypy --strict`` sees them: ``pool.alloc()`` is an int, no narrowing."""
    files = []
    for index, code in enumerate(readme_blocks()):
        script = tmp_path / f"readme_block{index}.py"
        script.write_text(code)
        files.append(str(script))
    run = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", *files],
        capture_output=True, text=True, timeout=280, cwd=ROOT,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"no issues found in {len(files)} source files" in run.stdout


@pytest.mark.timeout(300)
def test_a_type_checker_sees_a_handle_from_a_sleeping_mask_and_maybe_none_otherwise(tmp_path: Any) -> None:
    script = tmp_path / "typed_use.py"
    script.write_text(
        "from shmpool import GFP_ATOMIC, GFP_KERNEL, GFP_NOFS, Mempool\n"
        "from shmpool.gfp import __GFP_NOWARN\n"
        "def use(pool: Mempool) -> int:\n"
        "    a: int = pool.alloc()\n"
        "    b: int = pool.alloc(GFP_KERNEL, timeout=1.0)\n"
        "    c: int = pool.alloc(GFP_NOFS)\n"
        "    d: int = pool.alloc(GFP_ATOMIC)  # line 7: may be None\n"
        "    e: int = pool.alloc(GFP_KERNEL | __GFP_NOWARN)  # line 8: composed at run time\n"
        "    return a + b + c + d + e\n"
    )
    run = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(script)],
        capture_output=True, text=True, timeout=280, cwd=ROOT,
    )
    errors = [line for line in run.stdout.splitlines() if ": error:" in line]
    assert [line.split(":")[1] for line in errors] == ["7", "8"], run.stdout + run.stderr
    assert all('"int | None"' in line for line in errors), errors
