"""Shared measuring tools for the benchmarks: run a command while sampling its memory, drop the
page cache, run inside a cgroup-v1 memory limit, take medians."""
from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import threading
import time
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup/memory")


def drop_caches() -> None:
    """Write dirty pages out, then drop the page cache (root only)."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def status_kb(pid: int, field: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


@contextlib.contextmanager
def memory_cgroup(limit_bytes: int, name: str = "bloomconv-bench"):
    """A cgroup-v1 memory cgroup with a hard limit (page cache included); yields its procs file."""
    group = CGROUP_ROOT / name
    group.mkdir(exist_ok=True)
    (group / "memory.limit_in_bytes").write_text(str(limit_bytes))
    try:
        yield group
    finally:
        for pid in (group / "cgroup.procs").read_text().split():
            (CGROUP_ROOT / "cgroup.procs").write_text(pid)
        group.rmdir()


def run_sampled(argv: list[str], cgroup: Path | None = None, interval: float = 0.005, env=None) -> dict:
    """Run `argv`, sampling RssAnon every `interval` s. Returns wall seconds, peak RssAnon and
    peak RSS (VmHWM) in bytes, and the exit code."""
    if cgroup is not None:
        argv = ["sh", "-c", f'echo $$ > {cgroup}/cgroup.procs && exec "$@"', "sh", *argv]
    peak_anon = 0
    start = time.perf_counter()
    process = subprocess.Popen(argv, env=env)
    hwm = 0
    while process.poll() is None:
        anon = status_kb(process.pid, "RssAnon")
        peak_anon = max(peak_anon, anon or 0)
        hwm = max(hwm, status_kb(process.pid, "VmHWM") or 0)
        time.sleep(interval)
    wall = time.perf_counter() - start
    return {"seconds": wall, "peak_rss_anon": peak_anon * 1024, "peak_rss": hwm * 1024,
            "returncode": process.returncode}


def timed(argv: list[str], **kwargs) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, **kwargs)
    return time.perf_counter() - start


def median(values) -> float:
    return statistics.median(values)


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"
