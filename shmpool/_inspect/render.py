"""Rendering for a person: one pool, or the listing, in 80 columns.

Everything here reads the JSON documents (``numbers.describe``,
``numbers.summarize``), never a copy: what a person sees is what a script
gets, only laid out. Each section of a pool's page is a function of its
own; ``render`` stacks them. Text that comes from the pool (queue names,
commands) is shown with anything a terminal would act on escaped, and
columns hold at 80 characters (a long pool name aside), cutting a long
command at its start (its end names the script) and giving a queue name
too long for its column a line of its own.

The slot map (see shmpool/cli.py for its legend) is drawn MAP_WIDTH
characters a row, each row led by the first slot it stands for.
"""

from __future__ import annotations

import datetime
import textwrap
from typing import Any

from .numbers import MAP_WIDTH, SLEEPERS_MAX
from .snapshot import PROG

QUEUE_NAME_SHOWN = 16  # a longer queue name gets a line of its own in the text view
LIST_NAME_MIN = 8  # the listing's name column is never narrower than this
LIST_COLUMNS = (("SLOT", "slot_size"), ("CAPACITY", "capacity"), ("MIN", "min_nr"), ("CURR", "curr_nr"),
                ("IN USE", "in_use"), ("QUEUED", "queued"), ("WAIT", "nr_waiters"))
MAP_LEGEND = ("R reserve  . arena  c cached  Q queued  H held  P parked (being freed)",
              "S shared (a topic's)  X held by a dead process  ? damaged")


def _bar(curr: int, min_nr: int, width: int = 20) -> str:
    filled = min(width, round(width * curr / min_nr)) if min_nr > 0 else 0
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def _printable(text: str) -> str:
    """``text`` with anything a terminal would act on escaped (a queue name
    is any UTF-8 without NUL)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def lock_text(lock: dict[str, Any]) -> str:
    """The ``lock`` document in words: free, or who holds it and for how long."""
    if not lock["held"]:
        waited = lock["waited_s"] or 0
        return "free" + (f" (waited {waited * 1000:.0f} ms for a quiet copy)" if waited >= 0.001 else "")
    if lock["pid"] is None:
        text = f"held by a process no longer registered (token of entry {lock['entry']}, epoch {lock['epoch']}): dead"
    else:
        text = f"held by pid {lock['pid']} ({'alive' if lock['alive'] else 'dead'}, registry entry {lock['entry']})"
    return text + (f" for {lock['held_for_s']:.3f} s" if lock["held_for_s"] is not None else "")


def _wrapped(label: str, text: str) -> list[str]:
    return textwrap.wrap(text, 78, initial_indent=f"  {label:<10} ", subsequent_indent=" " * 13) or [""]


def _summary_lines(d: dict[str, Any]) -> list[str]:
    g, creator = d["geometry"], d["creator"]
    created = datetime.datetime.fromtimestamp(creator["created_s"]).strftime("%Y-%m-%d %H:%M:%S")
    short = d["min_nr"] - d["curr_nr"]
    dead = d["slot_counts"]["held_dead"]
    # as derive counts them: a side's count beyond the core's bound is damage, not sleepers
    on_queues = sum(n for q in d["queues"] for n in (q["getters"], q["putters"]) if n <= SLEEPERS_MAX)
    out = [f"{d['parked']} parked"] if d["parked"] else []
    out += [f"{dead} held by dead processes"] if dead else []
    rows = [
        ("segment", f"{d['path']}, {g['total_bytes']} bytes"),
        ("geometry", f"{g['capacity']} slots of {g['slot_size']} bytes (stride {g['stride']})"),
        ("reserve", f"{_bar(d['curr_nr'], d['min_nr'])} {d['curr_nr']}/{d['min_nr']} curr_nr/min_nr, "
                    + ("full" if short <= 0 else f"{short} below min_nr")),
        ("arena", f"{d['arena_free']} free ({d['arena_shared']} shared, {d['arena_cached']} in process caches)"),
        ("in use", f"{d['in_use']}" + (f" ({', '.join(out)})" if out else "")),
        ("queued", f"{d['queued']} in {len(d['queues'])} queue(s)" if d["queues"] else f"{d['queued']} (no queues)"),
        ("waiters", f"{d['nr_waiters']} sleeping" + (
            f" ({d['nr_waiters'] - on_queues} in alloc, {on_queues} on queues)" if on_queues else "")),
        ("sizing", d["sizing"]["verdict"]),
        ("attached", f"{d['attached']} process(es)"),
        ("faults", f"fail_rate {d['fail_rate']:g}, seed {d['seed']} ({d['rng']})"),
        ("poison", "on" if d["poison"] else "off"),
        ("lock", lock_text(d["lock"])),
        ("creator", f"pid {creator['pid']} ({'alive' if creator['alive'] else 'gone'}), created {created}"),
    ]
    if d["status"] != "live":
        rows.insert(0, ("status", "DESTROYED (being unlinked)"))
    return [line for label, text in rows for line in _wrapped(label, text)]


def _stack_lines(d: dict[str, Any]) -> list[str]:
    stack = d["reserve_stack"]
    head = f"reserve stack, top first ({len(stack)} of {d['curr_nr']} shown):" if len(stack) < d["curr_nr"] else (
        "reserve stack, top first:")
    body = " ".join(map(str, stack)) if stack else "(empty)"
    return [head, *textwrap.wrap(body, 78, initial_indent="  ", subsequent_indent="  ")]


def _shown_command(text: str, width: int = 20) -> str:
    """A command in ``width`` columns: a long one keeps its end (a script's
    file name), behind a leading ~."""
    text = _printable(text)
    return text if len(text) <= width else "~" + text[-(width - 1) :]


def _holder_lines(d: dict[str, Any]) -> list[str]:
    lines = [f"{'PID':>8}  {'COMMAND':<20} {'STATE':<5} {'HELD':>8} {'CACHED':>6} {'SLEEPING':>8} {'Q-WAIT':>6} "
             f"{'ENTRY':>6}"]
    for h in d["holders"]:
        entry = "-" if h["entry"] is None else str(h["entry"])
        lines.append(
            f"{h['pid']:>8}  {_shown_command(h.get('command') or h['name'] or '-'):<20} {'alive' if h['alive'] else 'DEAD':<5} "
            f"{h['held']:>8} {h['cached']:>6} {h['sleeping']:>8} {h['queue_sleeping']:>6} {entry:>6}"
        )
    if not d["holders"]:
        lines.append(f"{'':>8}  (no process holds or waits)")
    return lines


def _oldest_lines(d: dict[str, Any]) -> list[str]:
    """The held elements that have been out longest, and who holds them."""
    rows, held = d["oldest_held"], d["in_use"] - d["parked"]
    head = "oldest held elements" + (f" ({len(rows)} of {held} shown):" if len(rows) < held else ":")
    lines = [head, f"  {'AGE (s)':>10}  {'SLOT':>8}  {'HANDLE':<18}  {'PID':>8}  STATE"]
    for r in rows:
        state = "-" if r["entry"] is None else ("alive" if r["alive"] else "DEAD")
        lines.append(f"  {r['age']:>10.3f}  {r['slot']:>8}  {r['handle']:#018x}  {r['pid']:>8}  {state}")
    return lines


def _queue_lines(d: dict[str, Any]) -> list[str]:
    """Each live queue: its fill against its depth, waiters and counters
    (a name too long for its column gets a line of its own)."""
    w = QUEUE_NAME_SHOWN
    lines = [f"  {'QUEUE':<{w}} {'FILL':<14} {'COUNT/DEPTH':>13} {'WAITERS':>7} {'PUTS':>10} {'GETS':>10}"]
    for q in d["queues"]:
        name = _printable(q["name"])
        if len(name) > w:
            lines.append(f"  {name}")
            name = ""
        fill = f"{q['count']}/{q['depth']}"
        lines.append(f"  {name:<{w}} {_bar(q['count'], q['depth'], 12)} {fill:>13} {q['waiters']:>7} "
                     f"{q['puts']:>10} {q['gets']:>10}")
    return [f"queues ({len(d['queues'])}):", *lines]


def _topic_lines(d: dict[str, Any]) -> list[str]:
    """Each live topic, then its subscribers: process, backlog (pending
    against the depth), received and not released, dropped."""
    lines = [f"topics ({len(d['topics'])}):"]
    for t in d["topics"]:
        if t["overflow"] == "share":  # a share group: members holding elements together (shmpool.dask)
            lines.append(f"  {_printable(t['name'])}: a share group, {t['shared']} element(s) held together")
            lines += [f"    #{s['index']:<3} pid {s['pid']:>8} {'alive' if s['alive'] else 'DEAD':<5} holds "
                      f"{s['received']}" for s in t["subscribers"]]
            continue
        lines.append(f"  {_printable(t['name'])}: depth {t['depth']}, overflow {t['overflow']}, {t['published']} "
                     f"published, {t['shared']} out now, {t['dropped']} dropped")
        for s in t["subscribers"]:
            state = "alive" if s["alive"] else "DEAD"
            lines.append(f"    #{s['index']:<3} pid {s['pid']:>8} {state:<5} {_bar(s['pending'], t['depth'], 12)} "
                         f"{s['pending']}/{t['depth']} pending, {s['received']} received, {s['dropped']} dropped")
        if not t["subscribers"]:
            lines.append("    (no subscribers)")
    return lines


def _counter_lines(d: dict[str, Any]) -> list[str]:
    rates = d.get("rates")
    lines = ["counters" + (f"{'':>26}per second" if rates else "")]
    for key, value in d["counters"].items():
        line = f"  {key:<18} {value:>14}"
        if rates:
            line += f"  {rates[key]:>14.1f}"
        lines.append(line)
    return lines


def _map_lines(d: dict[str, Any]) -> list[str]:
    group, smap = d["slot_map_group"], d["slot_map"]
    lines = [f"slot map: {MAP_LEGEND[0]}", f"{'':10}{MAP_LEGEND[1]}"]
    if group > 1:
        lines.append(f"  1 char = {group} slots: the state of most (X or ? if any)")
    for i in range(0, len(smap), MAP_WIDTH):
        lines.append(f"{i * group:>10} {smap[i : i + MAP_WIDTH]}")
    return lines


def render(d: dict[str, Any], when: str = "") -> str:
    """One pool for a person, in 80 columns (a long pool name aside)."""
    lines = [f"pool {d['name']} (shmpool layout v{d['layout_version']})" + (f"  at {when}" if when else "")]
    if not d["consistent"]:
        lines += [f"  WARNING: the pool lock was not free for a whole copy within {d['lock']['waited_s']:.2f} s,",
                  "  so this snapshot may be inconsistent"]
    sections = [_summary_lines(d), _stack_lines(d), _holder_lines(d)]
    if d["oldest_held"]:
        sections.append(_oldest_lines(d))
    if d["queues"]:
        sections.append(_queue_lines(d))
    if d["topics"]:
        sections.append(_topic_lines(d))
    sections += [_counter_lines(d), _map_lines(d)]
    for section in sections:
        lines += section + [""]
    return "\n".join(lines[:-1])


def render_list(pools: list[dict[str, Any]]) -> str:
    """The listing: one line a pool, in 80 columns (unless numbers too big
    for them): each number column as wide as its widest entry, the name
    column what is left (a longer name ends in ~)."""
    shown = [p for p in pools if "error" not in p]
    numbered = [p for p in shown if not p.get("damaged")]
    widths = [max([len(head), *(len(str(p[key])) for p in numbered)]) for head, key in LIST_COLUMNS]
    creators = {id(p): ("alive" if p["creator_alive"] else "gone") + (" STALE" if p.get("stale") else "")
                + ("" if p["consistent"] else " (lock busy)") for p in shown}
    tail = max([len("CREATOR"), *map(len, creators.values())])
    room = 80 - sum(w + 1 for w in widths) - 1 - tail
    width = max(LIST_NAME_MIN, min(room, max([4, *(len(p["name"]) for p in pools)])))
    heads = " ".join(f"{head:>{w}}" for (head, _), w in zip(LIST_COLUMNS, widths, strict=True))
    lines = [f"{'NAME':<{width}} {heads} CREATOR"]
    for p in pools:
        name = p["name"] if len(p["name"]) <= width else p["name"][: width - 1] + "~"
        if "error" in p:
            lines += textwrap.wrap(f"{name:<{width}} ({p['error']})", 80, subsequent_indent=" " * (width + 1))
            continue
        if p.get("damaged"):
            text = f"DAMAGED: run `{PROG} {p['name']} --check`"
            lines.append(f"{name:<{width}} {text:<{sum(w + 1 for w in widths) - 1}} {creators[id(p)]}")
            continue
        numbers = " ".join(f"{p[key]:>{w}}" for (_, key), w in zip(LIST_COLUMNS, widths, strict=True))
        lines.append(f"{name:<{width}} {numbers} {creators[id(p)]}")
    if not pools:
        lines.append("(no pools)")
    return "\n".join(lines)

