"""Quantize speed, size and memory against plain convert and `cp -r` + `sync`, in one run.

    python bench/bench_quantize.py [--repeats 3] [--work bench/out]

On the bloom-560m-geometry checkpoint bench_convert.py makes (1.1 GB, random bf16 weights,
release pickle-shard layout), warm page cache, medians: wall time of `convert`, `quantize
--bits 8` and `quantize --bits 4` (nf4 and fp4, block 64, double quant, embeddings kept), output
size vs source size, peak RssAnon. Goal: quantizing at >= 0.7x the speed of convert.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_convert import BLOOMCONV, dir_bytes, make_checkpoint  # noqa: E402
from measure import gb, median, run_sampled, timed  # noqa: E402

SCHEMES = {
    "convert": ["convert"],
    "int8": ["quantize", "--bits", "8"],
    "nf4": ["quantize", "--bits", "4", "--quant-type", "nf4"],
    "fp4": ["quantize", "--bits", "4", "--quant-type", "fp4"],
    "int8 +emb": ["quantize", "--bits", "8", "--embeddings"],
    "nf4 +emb": ["quantize", "--bits", "4", "--quant-type", "nf4", "--embeddings"],
}


def measure_schemes(src: Path, out: Path, repeats: int, schemes: dict[str, list[str]] = SCHEMES,
                    series: str | None = None) -> dict:
    """Every scheme of `schemes` (name: bloomconv arguments) on `src` and `cp -r` + `sync`, page
    cache warm, `repeats` rounds; each run's seconds and peak RssAnon, each output's bytes. `series`:
    the scheme whose first run also keeps its RssAnon over time (`series` of the result)."""
    rows = {name: {"seconds": [], "rss_anon": []} for name in schemes}
    rows["cp -r + sync"] = {"seconds": [], "rss_anon": []}
    result = {"source_bytes": dir_bytes(src), "rows": rows}
    for _ in range(repeats):
        timed(["cat", *map(str, src.iterdir())], stdout=subprocess.DEVNULL)  # warm
        shutil.rmtree(out, ignore_errors=True)
        rows["cp -r + sync"]["seconds"].append(timed(["sh", "-c", f"cp -r {src} {out} && sync"]))
        for name, command in schemes.items():
            shutil.rmtree(out, ignore_errors=True)
            keep = name == series and "series" not in result
            run = run_sampled([*BLOOMCONV, *command, "--quiet", str(src), str(out)], series=keep)
            if run["returncode"]:
                raise SystemExit(f"{name} failed")
            rows[name]["seconds"].append(run["seconds"])
            rows[name]["rss_anon"].append(run["peak_rss_anon"])
            rows[name]["bytes"] = dir_bytes(out)
            if keep:
                result["series"] = run["series"]
    shutil.rmtree(out, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path(__file__).parent / "out")
    args = parser.parse_args()
    src = make_checkpoint(args.work / "bloom-560m-src", (1024, 24, 16, 250880))
    measured = measure_schemes(src, args.work / "quantized", args.repeats)
    source_bytes, rows = measured["source_bytes"], measured["rows"]
    report = {name: {"seconds": median(r["seconds"]), "peak_rss_anon": median(r["rss_anon"]) if r["rss_anon"] else None,
                     "bytes": r.get("bytes")} for name, r in rows.items()}
    (args.work / "quantize.json").write_text(json.dumps({"source_bytes": source_bytes, "rows": report}, indent=1))
    base = report["convert"]["seconds"]
    print(f"source {gb(source_bytes)} (bloom-560m geometry, bf16, release pickle shards), warm cache, "
          f"medians of {args.repeats}")
    print(f"{'scheme':14} {'seconds':>8} {'speed vs convert':>17} {'output':>9} {'vs source':>9} {'peak RssAnon':>12}")
    for name, r in report.items():
        size = f"{gb(r['bytes']):>9} {r['bytes'] / source_bytes:9.3f}" if r["bytes"] else f"{'':>9} {'':>9}"
        anon = gb(r["peak_rss_anon"]) if r["peak_rss_anon"] else ""
        print(f"{name:14} {r['seconds']:8.2f} {base / r['seconds']:16.2f}x {size} {anon:>12}")


if __name__ == "__main__":
    main()
