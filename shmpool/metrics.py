"""Prometheus metrics of a pool: the text exposition, and a collector.

One table, two writers
----------------------
``METRICS`` names every metric once: its Prometheus name, its type, its
help text and the ``stats()`` key it is read from. Two things are made from
it, and only from it:

- ``exposition(name, numbers)``: the Prometheus text format (version 0.0.4)
  of one pool, written here by hand, so that ``shmpool-inspect NAME
  --prometheus`` needs nothing beyond the core (the format is a few lines
  of text; the optional dependency is not worth a hard one);
- ``PoolCollector(pool)``: a collector for ``prometheus_client`` (the
  optional extra ``pip install 'shmpool[metrics]'``), so that a process
  serves its pool's metrics with ``prometheus_client.start_http_server``::

      from prometheus_client import REGISTRY, start_http_server
      REGISTRY.register(shmpool.metrics.PoolCollector(pool))
      start_http_server(9464)

Every sample carries the label ``pool`` (the pool's name). Gauges are the
pool's state now (``curr_nr``, ``min_nr``, ``arena_free``, ``in_use``,
``queued``, ``waiters``, ``attached``, and for sizing the reserve
``reserve_low_water`` and ``longest_sleep_seconds``); counters are every
counter of ``stats()`` (``shmpool_<counter>_total``) and the time
allocations slept (``shmpool_sleep_seconds_total``). The collector reads
``pool.stats()`` (under the pool lock, the admin bound); the inspector reads
a copy taken without it, by the same derivation, so on a quiet pool the two
agree exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

from ._layout import COUNTERS

__all__ = ["METRICS", "Metric", "PoolCollector", "exposition", "flatten"]

PREFIX = "shmpool_"


#: What each counter of the layout's COUNTERS counts (one for each: a new
#: counter without its sentence fails at import).
COUNTER_HELP = {
    "alloc_arena": "Allocations served by the arena.",
    "alloc_reserve": "Allocations served by the reserve (the arena had failed).",
    "alloc_failed": "Allocations that returned no element (None, or TimeoutError).",
    "free_reserve": "Frees that refilled the reserve.",
    "free_arena": "Frees that went back to the arena.",
    "sleeps": "Times a sleeping allocation went to sleep.",
    "faults_injected": "Arena attempts failed on purpose (fail_rate).",
    "poison_errors": "Reserved elements found written after they were freed.",
    "lock_recoveries": "Times the pool lock was taken over from a process that died holding it.",
    "reclaimed": "Elements taken back from processes that died holding them.",
}


class Metric(NamedTuple):
    name: str  # without the prefix (and, for a counter, without _total)
    kind: str  # "gauge" or "counter"
    help: str
    key: str  # the stats() key it is read from


METRICS: tuple[Metric, ...] = (
    Metric("curr_nr", "gauge", "Elements in the reserve now.", "curr_nr"),
    Metric("min_nr", "gauge", "The reserve's size (elements kept back for when the arena fails).", "min_nr"),
    Metric("arena_free", "gauge", "Free elements in the arena (shared list and process caches).", "arena_free"),
    Metric("in_use", "gauge", "Elements held by processes (parked frees included).", "in_use"),
    Metric("queued", "gauge", "Elements in the pool's queues.", "queued"),
    Metric("waiters", "gauge", "Threads asleep: in a sleeping alloc, or in a blocked put or get.", "nr_waiters"),
    Metric("attached", "gauge", "Processes attached to the pool now.", "attached"),
    Metric("published", "gauge", "Elements published to topics and not yet released by every subscriber.",
           "published"),
    Metric("reserve_low_water", "gauge", "The lowest curr_nr seen since the pool was created.", "reserve_low_water"),
    Metric("longest_sleep_seconds", "gauge", "The longest sleep of one sleeping allocation.", "longest_sleep"),
    *(Metric(key, "counter", COUNTER_HELP[key], key) for key, _ in COUNTERS),
    Metric("sleep_seconds", "counter", "Time sleeping allocations slept, in all.", "total_sleep"),
)


def flatten(document: Mapping[str, Any]) -> dict[str, Any]:
    """The numbers of ``stats().as_dict()`` or of shmpool-inspect's JSON
    document (whose counters are nested under ``counters``), flat."""
    flat = dict(document)
    flat.update(document.get("counters") or {})
    return flat


def _value(number: Any) -> str:
    if isinstance(number, bool):
        return "1" if number else "0"
    if isinstance(number, int):
        return str(number)
    x = float(number)
    return "NaN" if math.isnan(x) else "+Inf" if x == math.inf else "-Inf" if x == -math.inf else repr(x)


def _label(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def exposition(name: str, numbers: Mapping[str, Any]) -> str:
    """The Prometheus text exposition (format 0.0.4) of pool ``name`` whose
    numbers (``flatten``\\ ed) are ``numbers``."""
    flat, label = flatten(numbers), f'{{pool="{_label(name)}"}}'
    lines = []
    for m in METRICS:  # (a counter is named with its _total throughout, as prometheus_client writes this format)
        full = PREFIX + m.name + ("_total" if m.kind == "counter" else "")
        lines += [f"# HELP {full} {m.help}", f"# TYPE {full} {m.kind}", f"{full}{label} {_value(flat[m.key])}"]
    return "\n".join(lines) + "\n"


class PoolCollector:
    """A ``prometheus_client`` collector of one pool's metrics (``METRICS``),
    read from ``pool.stats()`` at each scrape. Needs the optional extra
    ``shmpool[metrics]``; ImportError saying so without it."""

    def __init__(self, pool: Any) -> None:
        try:
            from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        except ImportError as exc:
            raise ImportError("shmpool.metrics.PoolCollector needs prometheus_client: "
                              "pip install 'shmpool[metrics]'") from exc
        self._families = {"gauge": GaugeMetricFamily, "counter": CounterMetricFamily}
        self.pool = pool

    def collect(self) -> Iterator[Any]:
        flat = flatten(self.pool.stats().as_dict())
        for m in METRICS:
            family = self._families[m.kind](PREFIX + m.name, m.help, labels=["pool"])
            family.add_metric([self.pool.name], float(flat[m.key]))
            yield family

    def describe(self) -> Iterator[Any]:
        """The families without values (prometheus_client's registry asks at
        register time; no pool lock is taken for it)."""
        for m in METRICS:
            yield self._families[m.kind](PREFIX + m.name, m.help, labels=["pool"])
