"""The CPU this process runs on and how busy other work keeps it: for `info`, and bench and eval records (no torch,
no backends)."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it, else what platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    """The cores this process may use (a cpuset's, under taskset, Slurm or docker --cpuset-cpus), not the host's."""
    return len(_cpus())


# A runner is called timed on a busy machine when other work kept at least this many of its cores busy: far above
# a quiet machine's background and well below the one core that slowed eager PyTorch several-fold on the 2-core
# machine (figures: docs/benchmarks.md, "A busy machine").
BUSY_CORES = 0.25
MIN_SPAN_S = 0.4  # /proc/stat counts in 10 ms ticks: about 0.05 of a core of error per busy core over 0.4 s
STAT = Path("/proc/stat")


def _cpus() -> frozenset[int]:
    """The ids of the cores this process may use."""
    return frozenset(os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1))


def _busy_seconds(cpus: frozenset[int]) -> float | None:
    """CPU seconds spent busy (user, nice, system, irq, softirq, steal) on `cpus` since boot; None off Linux."""
    try:
        lines = STAT.read_text().splitlines()
        tick = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, AttributeError):
        return None
    busy, seen = 0, False
    for line in lines:
        name, *fields = line.split()
        if not name.startswith("cpu") or not name[3:].isdigit() or int(name[3:]) not in cpus:
            continue
        v = [int(x) for x in fields[:8]] + [0] * (8 - len(fields[:8]))
        busy += v[0] + v[1] + v[2] + v[5] + v[6] + v[7]
        seen = True
    return busy / tick if seen else None


class OtherCpuUse:
    """How many of this process's cores other work kept busy over a span: the share of a benchmark's slowdown
    that is the machine's, not the runner's. Busy time on those cores from /proc/stat (a VM's steal time
    included), less this process's own CPU time (all its threads). None where /proc/stat is missing or the span
    is too short. The cores are the affinity set: under a CPU quota without a cpuset that is the host's."""

    def __init__(self) -> None:
        self.cpus = _cpus()
        self.wall, self.busy, self.own = time.perf_counter(), _busy_seconds(self.cpus), time.process_time()

    def cores(self) -> float | None:
        busy, wall = _busy_seconds(self.cpus), time.perf_counter() - self.wall
        if busy is None or self.busy is None or wall < MIN_SPAN_S:
            return None
        others = (busy - self.busy) - (time.process_time() - self.own)
        return round(max(0.0, others / wall), 2)
