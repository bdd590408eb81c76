"""The arguments that only Python takes, checked once.

Everything the compiled core takes (handles, GFP masks, timeouts, counts)
is checked by the core itself, in C (``_core/py_convert.c``); what is left
here is what a pool is made with and what names a queue. Each check raises
TypeError for a wrong type and ValueError for a wrong value, with a message
that names the argument and what it may be.
"""

from __future__ import annotations

import math

import numpy as np

from ._layout import DESC_MAX_DIMS, MAX_CAPACITY, MAX_MAX_PROCS, MAX_SLOT_SIZE, QUEUE_NAME_BYTES, RNG_GLIBC, RNG_NAMES


def check_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{what} must be an int, not {type(value).__name__}")
    return int(value)


def check_range(value: object, what: str, lo: int, hi: int, hi_name: str = "") -> int:
    n = check_int(value, what)
    if not lo <= n <= hi:
        raise ValueError(f"{what} must be from {lo} to {hi_name + ' (' + str(hi) + ')' if hi_name else hi}, not {n}")
    return n


def check_fail_rate(fail_rate: object) -> float:
    if isinstance(fail_rate, bool) or not isinstance(fail_rate, (int, float, np.integer, np.floating)):
        raise TypeError(f"fail_rate must be a number, not {type(fail_rate).__name__}")
    rate = float(fail_rate)
    if not (math.isfinite(rate) and 0.0 <= rate <= 1.0):
        raise ValueError(f"fail_rate must be a finite number from 0 to 1, not {fail_rate!r}")
    return rate


def check_rng(rng: object, seed: int | None) -> int:
    """The fault injector's generator by name (``_layout.RNG_NAMES``); a
    seed of glibc's srand() is an unsigned int."""
    if not isinstance(rng, str):
        raise TypeError(f"rng must be a str, not {type(rng).__name__}")
    if rng not in RNG_NAMES:
        raise ValueError(f"rng must be one of {', '.join(map(repr, RNG_NAMES))}, not {rng!r}")
    if RNG_NAMES[rng] == RNG_GLIBC and seed is not None and seed >= 1 << 32:
        raise ValueError(f"a seed of glibc's rand() is an unsigned int (0 to 2**32-1), not {seed}")
    return RNG_NAMES[rng]


def check_array(shape: object, dtype: object, slot_size: int) -> tuple[bytes, tuple[int, ...]]:
    """alloc_array's shape and dtype: (the dtype's code, the dimensions).
    ValueError if they do not fit a slot or a descriptor; TypeError for an
    object dtype or a shape that is no int or sequence of ints."""
    dims = (shape,) if isinstance(shape, (int, np.integer)) and not isinstance(shape, bool) else shape
    if not isinstance(dims, (tuple, list)) or any(isinstance(d, bool) or not isinstance(d, (int, np.integer))
                                                  for d in dims):
        raise TypeError(f"shape must be an int or a sequence of ints, not {shape!r}")
    dims = tuple(int(d) for d in dims)
    dt = np.dtype(dtype)  # type: ignore[call-overload]
    code = dt.str.encode("ascii")
    if dt.hasobject:
        raise TypeError("a slot cannot hold Python objects (dtype has object fields)")
    if dt.fields is not None or len(code) > 8 or dt.itemsize < 1:
        raise ValueError(f"dtype {dt} cannot be recorded with an element (a plain dtype of 8 or fewer code bytes)")
    if len(dims) > DESC_MAX_DIMS or any(d < 0 for d in dims):
        raise ValueError(f"shape {dims}: at most {DESC_MAX_DIMS} dimensions, none negative")
    if math.prod(dims) * dt.itemsize > slot_size:
        raise ValueError(f"shape {dims} of {dt} needs {math.prod(dims) * dt.itemsize} bytes, more than a slot's "
                         f"{slot_size}")
    return code, dims


def check_seed(seed: object) -> int | None:
    if seed is None:
        return None
    value = check_int(seed, "seed")
    if not 0 <= value < 1 << 64:
        raise ValueError(f"seed must be from 0 to 2**64-1, not {value}")
    return value


def check_create(
    min_nr: object, slot_size: object, capacity: object, mode: object, max_processes: object
) -> tuple[int, int, int, int, int]:
    """create()'s geometry: (min_nr, slot_size, capacity, mode, max_processes)."""
    slot_size = check_range(slot_size, "slot_size", 1, MAX_SLOT_SIZE)
    capacity = check_range(capacity, "capacity", 1, MAX_CAPACITY)
    min_nr = check_range(min_nr, "min_nr", 1, capacity, "capacity")
    mode = check_int(mode, "mode")
    if not 0 <= mode <= 0o777:
        raise ValueError(f"mode must be permission bits (0 to 0o777), not {mode:#o}")
    max_processes = check_range(max_processes, "max_processes", 1, MAX_MAX_PROCS)
    return min_nr, slot_size, capacity, mode, max_processes


def check_queue_name(name: object) -> bytes:
    if not isinstance(name, str):
        raise TypeError(f"a queue name is a str, not {type(name).__name__}")
    raw = name.encode()
    if not 1 <= len(raw) < QUEUE_NAME_BYTES or "\0" in name:
        raise ValueError(f"a queue name is 1 to {QUEUE_NAME_BYTES - 1} bytes of UTF-8 without NUL, not {name!r}")
    return raw
