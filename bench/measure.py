"""Shared measuring tools for the benchmarks: run a command while sampling its memory (and count
its disk reads), drop the page cache, run inside a cgroup-v1 memory limit, read the disk's
sequential speed, take medians."""
from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
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
def memory_cgroup(limit_bytes: int | None, name: str = "bloomconv-bench"):
    """A cgroup-v1 memory cgroup with a hard limit (page cache included; None: no limit, to account
    a process tree's memory); yields its folder."""
    group = CGROUP_ROOT / name
    group.mkdir(exist_ok=True)
    if limit_bytes is not None:
        (group / "memory.limit_in_bytes").write_text(str(limit_bytes))
    try:
        yield group
    finally:
        for pid in (group / "cgroup.procs").read_text().split():
            (CGROUP_ROOT / "cgroup.procs").write_text(pid)
        group.rmdir()


def cgroup_memory(group: Path) -> dict:
    """What a memory cgroup saw: anonymous memory of all its processes now (`total_rss`), peak
    usage (page cache included), times the limit was hit, OOM kills."""
    stat = dict(line.split() for line in (group / "memory.stat").read_text().splitlines())
    oom = dict(line.split() for line in (group / "memory.oom_control").read_text().splitlines())
    return {"rss": int(stat["total_rss"]), "max_usage": int((group / "memory.max_usage_in_bytes").read_text()),
            "failcnt": int((group / "memory.failcnt").read_text()), "oom_kills": int(oom.get("oom_kill", 0))}


def run_sampled(argv: list[str], cgroup: Path | None = None, interval: float = 0.005, env=None,
                stdout=None, stderr=None, series: bool = False) -> dict:
    """Run `argv`, sampling its RssAnon every `interval` s. Returns wall seconds, peak RssAnon and
    peak RSS in bytes, and the exit code (negative: killed by that signal); from the kernel's
    accounting of the process and the children it waited for (wait4): bytes it had read from and
    written to block devices (page-cache hits not counted) and its exact peak RSS. In `cgroup`:
    also the peak anonymous memory of every process in the group (sampled), and `cgroup_memory`'s
    peak usage, limit hits and OOM kills during the run. `series`: also every sample, as
    `series` = [[seconds since start, RssAnon bytes], ...]."""
    if cgroup is not None:
        argv = ["sh", "-c", f'echo $$ > {cgroup}/cgroup.procs && exec "$@"', "sh", *argv]
        before = cgroup_memory(cgroup)
        (cgroup / "memory.max_usage_in_bytes").write_text("0")
    peak_anon = peak_group_anon = 0
    samples = []
    start = time.perf_counter()
    process = subprocess.Popen(argv, env=env, stdout=stdout, stderr=stderr)
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        anon = status_kb(process.pid, "RssAnon") or 0
        peak_anon = max(peak_anon, anon)
        if series:
            samples.append([time.perf_counter() - start, anon * 1024])
        if cgroup is not None:
            peak_group_anon = max(peak_group_anon, cgroup_memory(cgroup)["rss"])
        time.sleep(interval)
    wall = time.perf_counter() - start
    process.returncode = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    result = {"seconds": wall, "peak_rss_anon": peak_anon * 1024, "peak_rss": usage.ru_maxrss * 1024,
              "returncode": process.returncode, "read_bytes": usage.ru_inblock * 512,
              "write_bytes": usage.ru_oublock * 512}
    if series:
        result["series"] = samples
    if cgroup is not None:
        after = cgroup_memory(cgroup)
        result.update(peak_group_rss_anon=peak_group_anon, group_max_usage=after["max_usage"],
                      group_failcnt=after["failcnt"] - before["failcnt"],
                      oom_kills=after["oom_kills"] - before["oom_kills"])
    return result


def disk_read_speed(files: list[Path], chunk_bytes: int = 64 << 20) -> dict[str, float]:
    """Bytes/s of one sequential pass over `files`, page cache dropped first, two ways: `cat`
    (buffered, kernel read-ahead) and O_DIRECT reads of `chunk_bytes` into a touched buffer."""
    import mmap
    total = sum(p.stat().st_size for p in files)
    drop_caches()
    start = time.perf_counter()
    subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)
    speeds = {"cat": total / (time.perf_counter() - start)}
    buffer = mmap.mmap(-1, chunk_bytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buffer.madvise(mmap.MADV_HUGEPAGE)  # fewer, larger DMA segments
    buffer.write(b"\1" * chunk_bytes)  # touched: page faults are not the disk's time
    drop_caches()
    start = time.perf_counter()
    for path in files:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        offset = 0
        while (n := os.preadv(fd, [buffer], offset)) > 0:
            offset += n
        os.close(fd)
    speeds["direct"] = total / (time.perf_counter() - start)
    buffer.close()
    return speeds


def fresh_memory_speed(nbytes: int) -> float:
    """Bytes/s at which this machine hands a process new memory: one write per page of `nbytes` of
    fresh anonymous memory, page cache dropped first (as before a cold start). Weights read at
    start-up land in such memory, so its speed bounds theirs as the disk's does; in a VM it can be
    the lower (each new page may first be taken from the host: free page reporting, ballooning).
    One fault per page from this process, outside any memory cgroup: the runtime faults its buffers
    in with madvise(MADV_POPULATE_WRITE), which saves the return to user space per page."""
    import mmap
    import numpy
    nbytes = max(nbytes, 1 << 20)
    buffer = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    pages = numpy.frombuffer(buffer, dtype=numpy.uint8)[::mmap.PAGESIZE]
    drop_caches()
    start = time.perf_counter()
    pages[:] = 1
    seconds = time.perf_counter() - start
    del pages
    buffer.close()
    return nbytes / seconds


def timed(argv: list[str], **kwargs) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, **kwargs)
    return time.perf_counter() - start


def median(values) -> float:
    return statistics.median(values)


def spread(values) -> dict:
    """Median, min and max of repeated measurements, and how many there were."""
    values = list(values)
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": len(values)}


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def jsonable(value):
    """`value` as JSON gives it back (paths and other objects as their str)."""
    return json.loads(json.dumps(value, default=str))
