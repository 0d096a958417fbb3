"""This process's own figures for `--stats` and the benchmarks: age, /proc/self/status fields, peak RssAnon.

Age is measured from `import bloomconv` with the monotonic clock, not from the kernel's process
start time: /proc/self/stat's start time and /proc/uptime can disagree by tens of seconds inside
sandboxes, so they cannot be trusted everywhere. What this leaves out is the interpreter's own
start-up before the first import.
"""
from __future__ import annotations

import threading
import time

import bloomconv


def seconds_since_start() -> float:
    """Seconds since `bloomconv` was first imported in this process."""
    return time.monotonic() - bloomconv.IMPORTED_AT


def status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (`RssAnon`, `VmHWM`, ...) in bytes; 0 if the kernel has none."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


class PeakRssAnon:
    """Sample this process's RssAnon every 10 ms on a daemon thread (the kernel keeps no peak of it)."""

    def __init__(self, interval: float = 0.01):
        self.peak, self._interval, self._done = 0, interval, threading.Event()
        self._thread = threading.Thread(target=self._run, name="bloomconv-rss-sampler", daemon=True)
        self._thread.start()

    def _run(self):
        while not self._done.wait(self._interval):
            self.peak = max(self.peak, status_bytes("RssAnon"))

    def stop(self) -> int:
        """Stop sampling; the peak seen, including now."""
        self._done.set()
        self._thread.join()
        return max(self.peak, status_bytes("RssAnon"))
