"""Convert and verify speed and memory, against `cp -r` + `sync` and `sha256sum -c`, in one run.

    python bench/bench_convert.py [--repeats 3] [--work bench/out]

Needs root (drops the page cache, makes a cgroup-v1 memory group). Prints medians and writes
bench/out/convert.json. Parts:
 1. bloom-560m geometry (random bf16 weights, release pickle-shard layout, 1.1 GB): convert vs
    cp -r + sync, page cache dropped before each and warm; peak RSS and RssAnon of convert.
 2. verify vs sha256sum -c SHA256SUMS on the converted directory, warm cache.
 3. bounded memory: a checkpoint >= 4x the bound (start-up RssAnon + largest output file +
    200 MB) converted unconstrained and inside a cgroup limit of bound + 512 MB.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from measure import drop_caches, gb, median, memory_cgroup, run_sampled, timed  # noqa: E402

PYTHON = sys.executable
BLOOMCONV = [PYTHON, "-m", "bloomconv.cli"]
MB = 1_000_000


def make_checkpoint(path: Path, geometry: tuple) -> Path:
    if not (path / "pytorch_model.bin.index.json").exists():
        shutil.rmtree(path, ignore_errors=True)
        subprocess.run([PYTHON, "-c", "import sys; from bloomconv.converters.example import "
                        "write_large_release_checkpoint as w; w(sys.argv[1], tuple(map(int, sys.argv[2:])))",
                        str(path), *map(str, geometry)], check=True)
    return path


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def startup_rss_anon() -> int:
    """RssAnon of a process that has imported everything `convert` imports."""
    code = ("import torch, bloomconv.cli, bloomconv.converters.convert, safetensors;"
            "print([l for l in open('/proc/self/status') if l.startswith('RssAnon')][0].split()[1])")
    return int(subprocess.run([PYTHON, "-c", code], check=True, capture_output=True, text=True).stdout) * 1024


def convert_vs_copy(src: Path, work: Path, repeats: int) -> dict:
    results = {"cold": {"copy": [], "convert": [], "rss": [], "rss_anon": []},
               "warm": {"copy": [], "convert": [], "rss": [], "rss_anon": []}}
    for _ in range(repeats):
        for cache in ("cold", "warm"):
            r = results[cache]
            copy, out = work / "copy", work / "converted"
            shutil.rmtree(copy, ignore_errors=True), shutil.rmtree(out, ignore_errors=True)
            if cache == "cold":
                drop_caches()
            else:
                timed(["cat", *map(str, src.iterdir())], stdout=subprocess.DEVNULL)
            r["copy"].append(timed(["sh", "-c", f"cp -r {src} {copy} && sync"]))
            shutil.rmtree(copy)
            if cache == "cold":
                drop_caches()
            else:
                timed(["cat", *map(str, src.iterdir())], stdout=subprocess.DEVNULL)
            run = run_sampled([*BLOOMCONV, "convert", "--quiet", str(src), str(out)])
            if run["returncode"]:
                raise SystemExit("convert failed")
            r["convert"].append(run["seconds"]), r["rss"].append(run["peak_rss"]), r["rss_anon"].append(run["peak_rss_anon"])
    return {cache: {k: median(v) for k, v in r.items()} for cache, r in results.items()}


def verify_vs_sha256sum(directory: Path, repeats: int) -> dict:
    timed(["cat", *map(str, directory.rglob("*.safetensors"))], stdout=subprocess.DEVNULL)  # warm
    ours = [timed([*BLOOMCONV, "verify", "--quiet", str(directory)], stdout=subprocess.DEVNULL) for _ in range(repeats)]
    theirs = [timed(["sha256sum", "--quiet", "-c", "SHA256SUMS"], cwd=directory) for _ in range(repeats)]
    return {"verify": median(ours), "sha256sum": median(theirs)}


def bounded_memory(work: Path, startup: int, geometry: tuple) -> dict:
    src = make_checkpoint(work / "large-src", geometry)
    source_bytes = dir_bytes(src)
    out = work / "large-out"
    runs = {}
    for label in ("unconstrained", "cgroup"):
        shutil.rmtree(out, ignore_errors=True)
        drop_caches()
        if label == "unconstrained":
            runs[label] = run_sampled([*BLOOMCONV, "convert", "--quiet", str(src), str(out)])
        else:
            with memory_cgroup(bound + 512 * MB) as group:
                runs[label] = run_sampled([*BLOOMCONV, "convert", "--quiet", str(src), str(out)], cgroup=group)
        if runs[label]["returncode"]:
            raise SystemExit(f"convert ({label}) failed")
        if label == "unconstrained":
            largest_out = max(p.stat().st_size for p in out.rglob("*.safetensors"))
            bound = startup + largest_out + 200 * MB
    shutil.rmtree(out)
    drop_caches()
    copy_s = timed(["sh", "-c", f"cp -r {src} {work / 'large-copy'} && sync"])
    shutil.rmtree(work / "large-copy")
    return {"copy_s": copy_s, "source_bytes": source_bytes, "largest_output": largest_out, "bound": bound,
            "cgroup_limit": bound + 512 * MB, "source_over_bound": source_bytes / bound,
            "unconstrained_s": runs["unconstrained"]["seconds"], "cgroup_s": runs["cgroup"]["seconds"],
            "peak_rss_anon_unconstrained": runs["unconstrained"]["peak_rss_anon"],
            "peak_rss_anon_cgroup": runs["cgroup"]["peak_rss_anon"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path(__file__).parent / "out")
    parser.add_argument("--skip-large", action="store_true")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    src = make_checkpoint(args.work / "bloom-560m-src", (1024, 24, 16, 250880))
    startup = startup_rss_anon()
    report = {"source_bytes": dir_bytes(src), "startup_rss_anon": startup}
    report["convert"] = convert_vs_copy(src, args.work, args.repeats)
    report["verify"] = verify_vs_sha256sum(args.work / "converted", args.repeats)
    if not args.skip_large:
        report["bounded_memory"] = bounded_memory(args.work, startup, (2048, 48, 16, 16384))
    (args.work / "convert.json").write_text(json.dumps(report, indent=1))

    print(f"source: {gb(report['source_bytes'])}, bloom-560m geometry, bf16, release pickle shards; "
          f"medians of {args.repeats}")
    for cache, r in report["convert"].items():
        print(f"  {cache:5} convert {r['convert']:.2f} s  vs  cp -r + sync {r['copy']:.2f} s  "
              f"= {r['convert'] / r['copy']:.2f}x   peak RSS {gb(r['rss'])}, peak RssAnon {gb(r['rss_anon'])}")
    v = report["verify"]
    print(f"  verify {v['verify']:.2f} s  vs  sha256sum -c {v['sha256sum']:.2f} s  "
          f"= {v['sha256sum'] / v['verify']:.2f}x faster (warm)")
    print(f"  start-up RssAnon (python + torch + bloomconv imported): {gb(startup)}")
    if "bounded_memory" in report:
        b = report["bounded_memory"]
        print(f"bounded memory: source {gb(b['source_bytes'])} = {b['source_over_bound']:.1f}x the bound "
              f"{gb(b['bound'])} (start-up + largest output {gb(b['largest_output'])} + 200 MB)")
        print(f"  peak RssAnon {gb(b['peak_rss_anon_unconstrained'])} unconstrained, "
              f"{gb(b['peak_rss_anon_cgroup'])} in cgroup limit {gb(b['cgroup_limit'])}")
        print(f"  time {b['unconstrained_s']:.2f} s unconstrained, {b['cgroup_s']:.2f} s in the cgroup "
              f"= {b['cgroup_s'] / b['unconstrained_s']:.2f}x (cold cache both)")
        print(f"  at this size: convert {b['unconstrained_s']:.2f} s vs cp -r + sync {b['copy_s']:.2f} s "
              f"= {b['unconstrained_s'] / b['copy_s']:.2f}x (cold)")


if __name__ == "__main__":
    main()
