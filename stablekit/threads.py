"""How many CPU threads a run should use: the cores other programs leave free now.

PyTorch's default is one thread per core. OpenMP threads spin while they wait for each other, so
when other programs hold the cores each step waits for a descheduled thread: on the 2-core machine
with two busy processes the demo model sampled 5x slower on 2 threads than on 1
(`python -m stablekit.bench.threads`). So the command line counts the cores left free by other
programs, measured from /proc/stat over a window it spends anyway (its imports and the model load),
and uses that many. No torch here: the first sample is taken before torch is imported.
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path

MIN_WINDOW = 0.2  # seconds of CPU accounting needed for a usable busy measure


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def physical_cores() -> int:
    """Cores (not hyper-threads) among those this process may use, as torch counts its default; the
    usable CPU count where the topology is not readable."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
        siblings = {Path(f"/sys/devices/system/cpu/cpu{c}/topology/thread_siblings_list").read_text().strip()
                    for c in cpus}
        return max(1, len(siblings))
    except (AttributeError, OSError):
        return usable_cores()


def _busy_seconds() -> float | None:
    """CPU seconds all processes have spent on the machine (not idle, not waiting for I/O), or None."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()[1:]
    except OSError:
        return None
    ticks = [int(v) for v in fields]
    busy = sum(ticks) - ticks[3] - (ticks[4] if len(ticks) > 4 else 0)  # less idle and iowait
    return busy / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass(frozen=True)
class CpuSample:
    """A point to measure other programs' CPU use from."""

    wall: float
    busy: float | None
    own: float

    @classmethod
    def now(cls) -> CpuSample:
        return cls(time.monotonic(), _busy_seconds(), _own_seconds())


def free_cores(since: CpuSample) -> float | None:
    """Cores not used by other programs since `since` (this process's own use does not count).

    Waits until the window is at least MIN_WINDOW long; None where the machine does not tell (not Linux)."""
    if since.busy is None:
        return None
    time.sleep(max(0.0, MIN_WINDOW - (time.monotonic() - since.wall)))
    now = CpuSample.now()
    assert now.busy is not None
    others = max(0.0, (now.busy - since.busy) - (now.own - since.own)) / (now.wall - since.wall)
    return max(0.0, usable_cores() - others)


def auto_threads(since: CpuSample) -> int:
    """Threads for a run: the CPUs free since `since`, at least 1 and at most the physical cores (torch's
    own default: a second thread on a hyper-threaded core slows these kernels down). OMP_NUM_THREADS,
    when set, is the user's choice and wins."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    free = free_cores(since)
    cap = physical_cores()
    return cap if free is None else max(1, min(cap, round(free)))
