"""Shared timing helpers for the benchmark scripts: alternating repetitions, medians, ratio tables.

Every benchmark here compares an implementation against a reference *in the same run*: the
implementations are timed one after the other inside every repetition (A B A B ...), so a burst
of load from other processes hits both alike, and the table reports the median of the
repetitions and the ratio to the reference. This module never imports jax or torch, so a script
can set ``XLA_FLAGS`` / thread counts before importing either.

    from benchmarks.common import alternate, print_table, machine_line
    times = alternate({"torch": step_t, "jax": step_j}, reps=5, iters=2)     # name -> [s per iter]
    print_table(times, items=32, reference="torch", unit="samples/s")
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable, Mapping, Optional, Sequence


def timed(fn: Callable[[], object], iters: int = 1) -> float:
    """Seconds per call of ``fn`` (which must block until its work is done), over ``iters`` calls."""
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


def alternate(fns: Mapping[str, Callable[[], object]], reps: int, iters: int = 1,
              warmup: int = 1, log: Optional[Callable[[str], None]] = None) -> dict[str, list[float]]:
    """Times every function once per repetition, in turn; returns name -> seconds per call, per rep.

    ``warmup`` untimed calls of each function come first (compilation, allocator warm-up).
    """
    if reps < 1 or iters < 1:
        raise ValueError(f"reps={reps} and iters={iters} must both be >= 1")
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for rep in range(reps):
        for name, fn in fns.items():
            times[name].append(timed(fn, iters))
        if log is not None:
            log(f"rep {rep + 1}/{reps}: " + ", ".join(f"{n} {t[-1]:.3f}s" for n, t in times.items()))
    return times


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def spread(xs: Sequence[float]) -> str:
    """``min-max`` of the per-repetition times relative to their median, e.g. '-3%/+8%'."""
    m = statistics.median(xs)
    return f"-{(m - min(xs)) / m:.0%}/+{(max(xs) - m) / m:.0%}"


def rates(times: Mapping[str, Sequence[float]], items: float) -> dict[str, float]:
    """name -> items per second from the median time."""
    return {name: items / statistics.median(ts) for name, ts in times.items()}


def print_table(times: Mapping[str, Sequence[float]], items: float, reference: str, unit: str = "items/s",
                extra: Optional[Mapping[str, Mapping[str, str]]] = None, markdown: bool = True) -> None:
    """One row per implementation: rate (median), ratio to ``reference``, spread over the reps.

    ``extra``: column name -> {implementation name -> cell} (e.g. MFU).
    """
    if reference not in times:
        raise KeyError(f"reference {reference!r} is not among the timed names {sorted(times)}")
    r = rates(times, items)
    cols = list(extra or {})
    header = ["implementation", unit, f"vs {reference}", "spread"] + cols
    rows = []
    for name, ts in times.items():
        row = [name, f"{r[name]:.3f}" if r[name] < 100 else f"{r[name]:.1f}", f"{r[name] / r[reference]:.2f}x",
               spread(ts)]
        row += [(extra or {})[c].get(name, "") for c in cols]
        rows.append(row)
    if markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for row in rows:
            print("| " + " | ".join(row) + " |")
    else:
        widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
        print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
        for row in rows:
            print("  ".join(c.ljust(w) for c, w in zip(row, widths)))


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def load_average() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def machine_line() -> str:
    """CPU model, usable cores, load average (1 min): printed next to every table."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    return f"{cpu_model()}, {cores} usable cores, load average {load_average():.1f}"
