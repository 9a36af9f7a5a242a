"""Whether the usage writer gives way between the pieces of a batch: only while the CPU it runs on has time to
spare.

On a saturated core every yield is a switch between processes, and what the switches cost is taken from the
requests (bench/README.md, "Findings of 2026-12-07, evening"): with the gateway alone on its core at
concurrency 1 a core has time to spare (~30 % idle here), with two busy gateways on one, none. The time to
spare is read from the kernel: the idle share of the cores the writer may run on (/proc/stat), or, in a
container with a CPU limit (a cgroup's CPU quota: Kubernetes' `resources.limits.cpu`, `docker --cpus`), the
share of the quota its cgroup left unused: there the host's cores may be idle while the container is held to its
quota, and a yield then costs the gateway what it costs on a saturated core.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

# The share of spare time (over at least SPARE_TICKS clock ticks, USER_HZ: 0.2 s of one core) from which the
# writer gives way.
SPARE: Final = 0.1
SPARE_TICKS: Final = 20
CGROUP_ROOT: Final = Path("/sys/fs/cgroup")
SELF_CGROUP: Final = Path("/proc/self/cgroup")
TICKS_PER_SECOND: Final = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

# (all, idle) clock ticks so far; None where they cannot be read.
CpuTimes = tuple[float, float] | None


class Pacing:
    """Whether the writer gives way (`give_way`), decided after each batch from the time its CPU had to spare
    since the last decision (`spare_time`); never where that cannot be read."""

    def __init__(self, times: Callable[[], CpuTimes] | None = None) -> None:
        self._times = times if times is not None else cpu_times_reader()
        self._last = self._times()
        self.give_way = False

    def batch_done(self) -> None:
        now = self._times()
        if now is None or self._last is None:  # no span to judge (a reading failed): not yet, or not here
            self.give_way = False
            self._last = now
            return
        spare = spare_time(self._last, now)
        if spare is not None:  # a batch soon after the last one (a sync's) tells little: decided on a longer span
            self.give_way = spare >= SPARE
            self._last = now


def spare_time(before: tuple[float, float], after: tuple[float, float]) -> float | None:
    """The share of the time that was spare between two readings of (all, idle) clock ticks; None over fewer
    than SPARE_TICKS ticks."""
    ticks, idle = after[0] - before[0], after[1] - before[1]
    return idle / ticks if ticks >= SPARE_TICKS else None


def cpu_times_reader(root: Path = CGROUP_ROOT, self_cgroup: Path = SELF_CGROUP) -> Callable[[], CpuTimes]:
    """How this process's CPU time to spare is read: its cgroup's quota where it has one, else its cores'."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
    quota = cpu_quota(root, self_cgroup, len(cpus) or os.cpu_count() or 1)
    if quota is not None:
        return quota.times
    names = {f"cpu{number}".encode() for number in cpus}
    return lambda: _cpu_times(names)


def _cpu_times(cpus: set[bytes]) -> CpuTimes:
    """Clock ticks of the cores `cpus` so far (/proc/stat, Linux): all, and idle (waiting for I/O included;
    time a hypervisor stole is not idle)."""
    ticks = idle = 0
    try:
        with open("/proc/stat", "rb") as stat:
            for line in stat:
                fields = line.split()
                if fields and fields[0] in cpus:
                    times = [int(value) for value in fields[1:9]]  # user … steal (guests are in user)
                    ticks += sum(times)
                    idle += times[3] + times[4]
    except (OSError, ValueError, IndexError):
        return None
    return (ticks, idle) if ticks else None


@dataclass(frozen=True)
class CpuQuota:
    """A cgroup's CPU quota, in cores, and where its CPU time used so far is read: cgroup v2's `cpu.stat`
    (`usage_usec`) or v1's `cpuacct.usage` (nanoseconds)."""

    cores: float
    usage: Path
    v2: bool
    clock: Callable[[], float] = time.monotonic

    def times(self) -> CpuTimes:
        """(all, idle) clock ticks so far, the quota's time counted from an arbitrary start: only differences
        between readings mean anything."""
        try:
            data = self.usage.read_bytes()
            if self.v2:
                used = next(int(line.split()[1]) for line in data.splitlines() if line.startswith(b"usage_usec ")) / 1e6
            else:
                used = int(data) / 1e9
        except (OSError, ValueError, IndexError, StopIteration):
            return None
        capacity = self.clock() * self.cores * TICKS_PER_SECOND
        return capacity, capacity - used * TICKS_PER_SECOND


def cpu_quota(root: Path, self_cgroup: Path, cpus: int) -> CpuQuota | None:
    """The CPU quota of this process's cgroup (v2, or v1's `cpu` controller) or of the nearest of its ancestors
    that has one, at most `cpus` cores (those it may run on); None without one, or where the cgroup files cannot
    be read (not Linux, cgroups not mounted there)."""
    try:
        lines = self_cgroup.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and not controllers:
            found = _v2_quota(root, path)
        elif "cpu" in controllers.split(","):
            found = _v1_quota(root, controllers, path)
        else:
            continue
        if found is not None:
            cores, usage, v2 = found
            return CpuQuota(min(cores, float(cpus)), usage, v2)
    return None


def _v2_quota(root: Path, path: str) -> tuple[float, Path, bool] | None:
    for directory in _up_from(root, path):
        try:
            quota, period = (directory / "cpu.max").read_text().split()
            if quota != "max" and int(quota) > 0 and int(period) > 0:
                return int(quota) / int(period), directory / "cpu.stat", True
        except (OSError, ValueError):
            continue
    return None


def _v1_quota(root: Path, controllers: str, path: str) -> tuple[float, Path, bool] | None:
    # The controller's hierarchy is mounted by its name (`cpu,cpuacct`), often with a link per controller.
    mount = root / controllers
    accounting = mount if "cpuacct" in controllers.split(",") else root / "cpuacct"
    for directory in _up_from(mount, path):
        try:
            quota = int((directory / "cpu.cfs_quota_us").read_text())
            period = int((directory / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        if quota > 0 and period > 0:
            return quota / period, accounting / directory.relative_to(mount) / "cpuacct.usage", False
    return None


def _up_from(mount: Path, path: str) -> list[Path]:
    """The cgroup `path` under `mount`, then each of its ancestors up to the mount; the mount alone where the path
    is not under it (a container's own cgroup namespace mounts its cgroup as the root)."""
    directory = mount / path.strip("/")
    if not directory.is_dir():
        return [mount]
    return [directory, *(parent for parent in directory.parents if parent.is_relative_to(mount))]
