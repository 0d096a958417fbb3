"""This process's memory figures and age: the room left for the default RAM budget, and the RSS
that `--stats` and the benchmarks report.

Linux answers from /proc (MemAvailable, the memory cgroup's room, RssAnon, VmHWM); where there is
no /proc (macOS, Windows) psutil and `resource` do, with the nearest figures they have (each
function says which).

Age is measured from `import bloomconv` with the monotonic clock, not from the kernel's process
start time: /proc/self/stat's start time and /proc/uptime can disagree by tens of seconds inside
sandboxes, so they cannot be trusted everywhere. What this leaves out is the interpreter's own
start-up before the first import.
"""
from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import bloomconv

__all__ = ["PeakRssAnon", "anonymous_rss", "available_memory", "peak_rss", "seconds_since_start"]

PROC = Path("/proc")                # the tests point these elsewhere to run the fallbacks
CGROUP_ROOT = Path("/sys/fs/cgroup")


def seconds_since_start() -> float:
    """Seconds since `bloomconv` was first imported in this process."""
    return time.monotonic() - bloomconv.IMPORTED_AT


def available_memory() -> int:
    """Bytes this process may still fill without swapping or being killed: MemAvailable, or less
    when its memory cgroup (v1 or v2) leaves less (limit − anonymous memory already charged).
    Without /proc: psutil's `virtual_memory().available` (on macOS free, inactive and purgeable
    pages)."""
    meminfo = _proc_kilobyte_fields(PROC / "meminfo")
    if "MemAvailable" not in meminfo:
        import psutil
        return psutil.virtual_memory().available
    cgroup_room = _cgroup_room()
    available = meminfo["MemAvailable"]
    return available if cgroup_room is None else min(available, cgroup_room)


def anonymous_rss() -> int:
    """This process's anonymous resident memory (RssAnon: what it allocated, not file pages it
    maps). Without /proc: psutil's whole RSS, mapped file pages included (an upper bound)."""
    status = _proc_kilobyte_fields(PROC / "self" / "status")
    if "RssAnon" in status:
        return status["RssAnon"]
    import psutil
    return psutil.Process().memory_info().rss


def peak_rss() -> int:
    """This process's peak resident memory so far (VmHWM). Without /proc: `getrusage`'s maxrss
    (kilobytes on Linux and the BSDs, bytes on macOS), or psutil's peak working set on Windows."""
    status = _proc_kilobyte_fields(PROC / "self" / "status")
    if "VmHWM" in status:
        return status["VmHWM"]
    try:
        import resource
    except ImportError:  # Windows
        import psutil
        return psutil.Process().memory_info().peak_wset
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024


def _proc_kilobyte_fields(path: Path) -> dict[str, int]:
    """The `Name: N kB` lines of a /proc file, in bytes; empty where the file cannot be read."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    fields = {}
    for line in lines:
        name, _, value = line.partition(":")
        words = value.split()
        if len(words) == 2 and words[0].isdigit() and words[1] == "kB":
            fields[name] = int(words[0]) * 1024
    return fields


def _cgroup_room() -> int | None:
    try:
        lines = (PROC / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):  # v1: limit and usage of the whole hierarchy above
            stat = _read_stat(CGROUP_ROOT / "memory" / path.lstrip("/") / "memory.stat")
            if stat and "hierarchical_memory_limit" in stat:
                return stat["hierarchical_memory_limit"] - stat.get("total_rss", 0)
    for line in lines:
        if line.startswith("0::"):  # v2: the tightest memory.max on the way up
            group = CGROUP_ROOT / line[3:].lstrip("/")
            stat = _read_stat(group / "memory.stat")
            limits = []
            for directory in (group, *group.parents):
                try:
                    value = (directory / "memory.max").read_text().strip()
                except OSError:
                    break
                if value != "max":
                    limits.append(int(value))
            if limits and stat is not None:
                return min(limits) - stat.get("anon", 0)
    return None


def _read_stat(path: Path) -> dict[str, int] | None:
    try:
        return {key: int(value) for key, value in (line.split() for line in path.read_text().splitlines())}
    except (OSError, ValueError):
        return None


class PeakRssAnon:
    """Sample `anonymous_rss()` every 10 ms on a daemon thread (the kernel keeps no peak of it)."""

    def __init__(self, interval: float = 0.01):
        self.peak, self._interval, self._done = 0, interval, threading.Event()
        self._thread = threading.Thread(target=self._run, name="bloomconv-rss-sampler", daemon=True)
        self._thread.start()

    def _run(self):
        while not self._done.wait(self._interval):
            self.peak = max(self.peak, anonymous_rss())

    def stop(self) -> int:
        """Stop sampling; the peak seen, including now."""
        self._done.set()
        self._thread.join()
        return max(self.peak, anonymous_rss())
