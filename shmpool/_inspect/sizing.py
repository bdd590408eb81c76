"""How large must min_nr be: the reserve's record, and who has held what
for how long.

The question every operator of a mempool asks has two halves, and the pool
records both (layout v8):

- how close the reserve came to empty: ``H_LOW_WATER``, the lowest
  ``curr_nr`` since create (``remove_element`` lowers it), against
  ``min_nr``; and how often it was the only thing between an allocation
  and a sleep (or, for one that may not sleep, a failure): the
  ``alloc_reserve`` counter, against every allocation served; and what it
  cost when it was not enough: the sleeps, the longest one and their total
  (``H_LONGEST_SLEEP_NS``, ``H_TOTAL_SLEEP_NS``);
- who has held elements for how long: each slot's hand-out time
  (``since[]``, written when it is allocated), read here for every held
  slot and shown oldest first beside its holder. An element that has been
  out for an hour names the process that forgot it.

``verdict`` turns the first half into one line, the same for the text page
and the JSON (``sizing.verdict``). Ages are taken against the copy's own
CLOCK_MONOTONIC time (the hand-out times are the coarse clock's, a few
milliseconds behind: an age is never shown below 0).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._layout import GEN_MASK, GEN_SHIFT, HGEN_SHIFT, ST_HELD
from .snapshot import Copy

__all__ = ["held_ages", "oldest_age_per_entry", "oldest_held", "sizing", "verdict"]

OLDEST_SHOWN = 16  # held elements listed (oldest first) without --all


def held_ages(copy: Copy) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The held slots (indexes), their owner fields and their ages in
    seconds, oldest first."""
    states, owners = copy.slots
    held = np.flatnonzero(states == ST_HELD)
    since = np.frombuffer(copy.views.since, dtype=np.uint64)[held].astype(np.int64)
    ages = np.maximum(0, copy.lock.copied_ns - since) / 1e9
    order = np.argsort(-ages, kind="stable")
    return held[order], owners[held][order], ages[order]


def oldest_held(copy: Copy, holders: list[dict[str, Any]], show_all: bool = False) -> list[dict[str, Any]]:
    """The held elements, oldest first (the first OLDEST_SHOWN unless
    ``show_all``): slot, handle, age (seconds), and its holder's pid, entry
    and whether it lives, from ``holders`` (the holder rows; entry None,
    pid 0: a slot naming no process ever attached, which is damage)."""
    slots, owners, ages = held_ages(copy)
    if not show_all:
        slots, owners, ages = slots[:OLDEST_SHOWN], owners[:OLDEST_SHOWN], ages[:OLDEST_SHOWN]
    words = np.frombuffer(copy.views.words, dtype=np.uint64)
    by_entry = {row["entry"]: row for row in holders if row["entry"] is not None}
    rows = []
    for idx, owner, age in zip(slots.tolist(), owners.tolist(), ages.tolist(), strict=True):
        gen = (int(words[idx]) >> GEN_SHIFT) & GEN_MASK
        row = by_entry.get(owner - 1)
        rows.append({"slot": idx, "handle": idx | gen << HGEN_SHIFT, "age": round(age, 3),
                     "pid": row["pid"] if row else 0, "entry": row["entry"] if row else None,
                     "alive": row["alive"] if row else False})
    return rows


def oldest_age_per_entry(copy: Copy) -> dict[int, float]:
    """Each registry entry's oldest held element's age (seconds)."""
    _, owners, ages = held_ages(copy)
    oldest: dict[int, float] = {}
    for owner, age in zip(owners.tolist(), ages.tolist(), strict=True):
        if owner >= 1 and owner - 1 not in oldest:
            oldest[owner - 1] = round(age, 3)
    return oldest


def verdict(min_nr: int, low_water: int, counters: dict[str, int], longest_sleep: float, total_sleep: float) -> str:
    """One line on ``min_nr``: how close the reserve came to empty, how
    often it alone served an allocation, and whether that was enough."""
    served, allocations = counters["alloc_reserve"], counters["alloc_reserve"] + counters["alloc_arena"]
    sleeps = counters["sleeps"]
    if allocations == 0 and sleeps == 0:
        return f"min_nr {min_nr}: no allocation yet, nothing to judge by"
    share = f"it alone served {served} of {allocations} allocations ({100 * served / max(1, allocations):.1f}%)"
    if low_water >= min_nr and sleeps == 0:
        return (f"min_nr {min_nr}: the reserve was never drawn on (lowest curr_nr {low_water}): the arena served "
                f"every allocation")
    slept = f"allocations slept {sleeps} time(s), the longest {longest_sleep:.3f} s, {total_sleep:.3f} s in all"
    if low_water > 0:
        left = f"the reserve came down to {low_water} of {min_nr} ({100 * low_water / min_nr:.0f}% left)"
        if sleeps == 0:
            return f"min_nr {min_nr} is enough so far: {left}; {share}, each one the arena could not"
        return f"min_nr {min_nr}: {left}, yet {slept} (bulk allocations needing more than it held); {share}"
    if sleeps == 0:
        return (f"min_nr {min_nr} was just enough: the reserve ran dry (lowest curr_nr 0) but no allocation slept; "
                f"{share}")
    return f"min_nr {min_nr} is too small for this load: the reserve ran dry and {slept}; {share}"


def sizing(min_nr: int, numbers: dict[str, Any], counters: dict[str, int]) -> dict[str, Any]:
    """The ``sizing`` document: the reserve's record and the verdict."""
    low, longest, total = numbers["reserve_low_water"], numbers["longest_sleep"], numbers["total_sleep"]
    return {
        "min_nr": min_nr, "reserve_low_water": low, "alloc_reserve": counters["alloc_reserve"],
        "allocations": counters["alloc_reserve"] + counters["alloc_arena"], "sleeps": counters["sleeps"],
        "longest_sleep": longest, "total_sleep": total,
        "verdict": verdict(min_nr, low, counters, longest, total),
    }
