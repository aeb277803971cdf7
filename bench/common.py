"""Shared benchmark plumbing: machine/version info, interleaved repeats, peak RSS, JSON output.

The host is noisy (repeats can be 2-6x slower at times), so sides are compared by interleaving them in one
process and reporting min and median of several runs.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import resource
import statistics
import time
from importlib import metadata
from pathlib import Path
from typing import Callable

RESULTS = Path(__file__).resolve().parent / "results"


def versions(*packages: str) -> dict[str, str]:
    out = {"python": platform.python_version()}
    for p in packages:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = "not installed"
    return out


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem, 1) if mem else None,
            "platform": platform.platform()}


def peak_rss_gib() -> float:
    """Peak resident set size of this process so far. Linux: VmHWM from /proc/self/status, because ru_maxrss
    survives fork+exec and would report the parent's size for a child started from a big process."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def timed(fn: Callable[[], object]) -> float:
    """Wall seconds of one call."""
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def interleave(sides: dict[str, Callable[[], float | None]], repeats: int) -> dict[str, dict]:
    """Run each side once per round, alternating; a side returns its own measured seconds or None (then the
    call is timed here). Returns min/median/all per side."""
    times: dict[str, list[float]] = {k: [] for k in sides}
    for _ in range(repeats):
        for name, fn in sides.items():
            t = time.perf_counter()
            r = fn()
            times[name].append(r if r is not None else time.perf_counter() - t)
    return {k: {"min": min(v), "median": statistics.median(v), "runs": v} for k, v in times.items()}


def memory_bandwidth_gbs(size_mib: int = 1024, repeats: int = 5, threads: int | None = None) -> dict:
    """Read bandwidth (a sum over a large array, split over `threads` threads like a decode step is, since one
    core cannot saturate memory) and single-thread copy bandwidth (bytes read + written); best of repeats."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    threads = threads or os.cpu_count() or 1
    a = np.ones(size_mib * 2**20 // 4, dtype=np.float32)
    b = np.empty_like(a)
    parts = np.array_split(a, threads)
    read, copy = [], []
    pool = ThreadPoolExecutor(threads)
    for _ in range(repeats):
        t = time.perf_counter()
        list(pool.map(np.sum, parts))  # numpy releases the GIL inside the reduction
        read.append(a.nbytes / (time.perf_counter() - t) / 1e9)
        t = time.perf_counter()
        np.copyto(b, a)
        copy.append(2 * a.nbytes / (time.perf_counter() - t) / 1e9)
    pool.shutdown()
    return {"read_gbs": max(read), "copy_gbs": max(copy), "array_mib": size_mib, "read_threads": threads}


def write_result(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS / f"{name}-{stamp}.json"
    payload = {"benchmark": name, "date_utc": stamp, "machine": machine(), **payload}
    path.write_text(json.dumps(payload, indent=2))
    print(f"wrote {path}")
    return path
