"""Small helpers: percentiles, timers, peak RSS."""

from __future__ import annotations

import resource
from pathlib import Path


def pct(samples: list[float], p: float) -> float:
    """The ``p``-th percentile (nearest rank) of ``samples``; 0 for none."""
    if not samples:
        return 0.0
    s = sorted(samples)
    k = max(0, min(len(s) - 1, int(round(p / 100 * len(s) + 0.5)) - 1))
    return s[k]


def latency_ms(samples_s: list[float]) -> dict[str, float]:
    return {"p50_ms": pct(samples_s, 50) * 1e3, "p99_ms": pct(samples_s, 99) * 1e3,
            "max_ms": max(samples_s, default=0.0) * 1e3, "n": len(samples_s)}


def peak_rss_mib(pid: int | None = None) -> float:
    """VmHWM of ``pid`` (or of this process) in MiB."""
    if pid is None:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0
