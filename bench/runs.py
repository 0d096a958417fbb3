"""The measuring half of `python -m bench`: each section runs one benchmark script's measurement
(as a function, at the sizes it is given) and returns its data; `summarize` turns a run's data
into the figures the report prints, in the units it prints them (ratios per round against the
baseline measured in the same round, then medians and min–max). `bench/reporting.py` draws and
writes them; it computes nothing."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_quantize  # noqa: E402
import bench_runtime  # noqa: E402
import measure  # noqa: E402
from bench_convert import make_checkpoint  # noqa: E402
from measure import spread  # noqa: E402

GB = 1e9
SECTIONS = ("conversion", "runtime", "larger", "quality", "slice176b")


@dataclass
class Sizes:
    """What one run measures: the defaults are the small run, `full()` the real one."""
    threads: int = 2
    repeats: int = 3
    conversion_geometries: list = field(default_factory=lambda: [(256, 4, 8, 4096), (512, 8, 8, 16384)])
    conversion_schemes: tuple = ("convert", "int8", "nf4")
    runtime_geometry: tuple = (256, 4, 8, 4096)
    runtime_presets: tuple = ("none", "int8", "nf4")
    batches: tuple = (1, 16)
    prefill_tokens: tuple = (128, 512)
    decode_tokens: int = 8
    llama_cpp: bool = True
    large_geometry: tuple = (512, 16, 8, 4096)
    cgroup_limit: str = "1GB"
    budgets: tuple = ("20MB", "100MB")
    large_batches: tuple = (1, 8)
    large_tokens: int = 4
    quality_models: Path | None = None  # None: two tiny random models made in the work folder
    quality_json: Path | None = None  # a finished bench_quality.py report to draw instead of measuring
    slice_blocks: int = 0  # 0: no BLOOM-176B slice
    slice_repeats: int = 2  # rounds of its conversions and runs of each generation (35 min at 2 on this machine)
    disk_probe_bytes: int = 256 << 20  # the file the disk's read speed is measured over; 0: not measured

    @classmethod
    def full(cls) -> "Sizes":
        return cls(conversion_geometries=[(1024, 24, 16, 250880), (2048, 48, 16, 16384)],
                   runtime_geometry=(1024, 24, 16, 250880), runtime_presets=("none", "int8", "nf4", "nf4+emb16"),
                   decode_tokens=64, large_geometry=(2048, 48, 16, 16384),
                   cgroup_limit="1.5GB", budgets=("400MB", "800MB"), large_batches=(1, 8, 32), large_tokens=6,
                   quality_models=Path("/work/quality-models"), slice_blocks=2, disk_probe_bytes=2 << 30)


# ------------------------------------------------------------------------------ sections

def machine(threads: int, work: Path, repeats: int, probe_bytes: int) -> dict:
    """Cores, memory, CPU; memory bandwidth (bench_runtime's torch.sum), `repeats` times; the disk's
    sequential read speed over a file of `probe_bytes` in `work` (cold cache: root only; None when not
    root or `probe_bytes` is 0)."""
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    bandwidth = [bench_runtime.memory_bandwidth(threads) for _ in range(repeats)]
    disk = bench_runtime.disk_read_speed([disk_probe(work, probe_bytes)]) if os.geteuid() == 0 and probe_bytes else None
    return {"cores": os.cpu_count(), "memory_bytes": int(meminfo["MemTotal"].split()[0]) * 1024, "cpu": cpu,
            "threads": threads, "memory_bytes_per_s": bandwidth, "disk_bytes_per_s": disk}


def disk_probe(work: Path, nbytes: int) -> Path:
    """A file of `nbytes` incompressible bytes in `work`, made once."""
    path = work / f"disk-probe-{nbytes}"
    if not path.exists() or path.stat().st_size != nbytes:
        block = os.urandom(16 << 20)
        with open(path, "wb") as f:
            for start in range(0, nbytes, len(block)):
                f.write(block[: nbytes - start])
    return path


def conversion(sizes: Sizes, work: Path) -> list[dict]:
    """bench_quantize's measurement for each geometry: every scheme and `cp -r` + `sync`, warm cache,
    round by round; the RssAnon of the first int8 quantization over time."""
    out = []
    for geometry in sizes.conversion_geometries:
        src = make_checkpoint(work / f"src-{'x'.join(map(str, geometry))}", geometry)
        schemes = {name: bench_quantize.SCHEMES[name] for name in sizes.conversion_schemes}
        measured = bench_quantize.measure_schemes(src, work / "quantized", sizes.repeats, schemes, series="int8")
        out.append({"geometry": list(geometry), **measured, "series": thinned(measured["series"])})
    return out


def thinned(series: list, points: int = 1000) -> list:
    """At most about `points` samples of a memory time series, each the highest of its stretch (the
    peak survives), so that a long run's results stay small."""
    step = max(1, -(-len(series) // points))
    return [max(series[i:i + step], key=lambda sample: sample[1]) for i in range(0, len(series), step)]


def _thin_runs(child_runs: list[dict]) -> None:
    for run in child_runs:
        if "series" in run:
            run["series"] = thinned(run["series"])


def _runtime_args(sizes: Sizes) -> argparse.Namespace:
    from bloomconv.runtime import parse_size
    llama = None
    if sizes.llama_cpp:
        import llamacpp
        llama = llamacpp.find()
    return argparse.Namespace(
        threads=sizes.threads, repeats=sizes.repeats, memory_geometry=tuple(sizes.runtime_geometry),
        presets=list(sizes.runtime_presets), batches=list(sizes.batches), prefill_tokens=list(sizes.prefill_tokens),
        decode_tokens=sizes.decode_tokens, llama_cpp=llama, dtypes=["float32", "bfloat16"], fp32_prefill=True,
        transformers=True, large_geometry=tuple(sizes.large_geometry), cgroup_limit=parse_size(sizes.cgroup_limit),
        budgets=[parse_size(b) for b in sizes.budgets], large_batches=list(sizes.large_batches),
        large_dtype="bfloat16", large_tokens=sizes.large_tokens)


def runtime(sizes: Sizes, work: Path) -> dict:
    """bench_runtime's in-page-cache section: decode and prefill per format against the memory
    bound, with transformers (and llama.cpp when found) in the same rounds."""
    args = _runtime_args(sizes)
    result = bench_runtime.in_memory(args, work)
    for row in result["rows"]:
        _thin_runs(row["runs"])
    result["llama_cpp"] = str(args.llama_cpp.tree) if args.llama_cpp else None
    return result


def larger(sizes: Sizes, work: Path) -> dict:
    """bench_runtime's larger-than-memory section (root and cgroup v1: a memory cgroup), `repeats` rounds."""
    args = _runtime_args(sizes)
    rounds = [bench_runtime.larger_than_memory(args, work) for _ in range(sizes.repeats)]
    for round_ in rounds:
        _thin_runs(round_["runs"])
    return {"rounds": rounds}


def quality(sizes: Sizes, work: Path) -> dict:
    """bench_quality's report: read from `sizes.quality_json`, or measured on `sizes.quality_models`,
    or on two tiny random models with outlier channels made here (the main schemes, short text)."""
    import bench_quality
    if sizes.quality_json is not None:
        return json.loads(sizes.quality_json.read_text())
    if sizes.quality_models is not None:
        return bench_quality.run(sizes.quality_models, chars=20_000, threads=1,  # its CLI's main-schemes run
                                 cache=work / "quality-cache", log=lambda *_: None)
    import pydoc
    import quality_models
    from bloomconv.converters.trained_example import packaged_model
    models = work / "quality-models"
    text = pydoc.render_doc(json, renderer=pydoc.plaintext)
    for name, seed in (("tiny-a", 1), ("tiny-b", 2)):
        if not (models / name / quality_models.RECORD).exists():
            spec = quality_models.Outliers(name, (128, 2, 2, 4096), scale=8.0, channels=2, seed=seed)
            record = quality_models.build_outliers(spec, models / name, packaged_model() / "tokenizer.json", text)
            (models / name / quality_models.RECORD).write_text(json.dumps(record))
    chosen = [bench_quality.scheme(8, embeddings=True), bench_quality.scheme(4, "nf4", 64, False, False),
              bench_quality.scheme(4, "nf4", 128, True, False), bench_quality.scheme(4, "fp4", 128, True, False)]
    return bench_quality.run(models, ctx=32, chars=4000, chosen=chosen, log=lambda *_: None)


def slice176b(sizes: Sizes, work: Path) -> dict:
    """bench_176b.py on a slice of `sizes.slice_blocks` blocks, in its own process; its JSON."""
    folder = work / "bench176"
    subprocess.run([sys.executable, str(HERE / "bench_176b.py"), "--blocks", str(sizes.slice_blocks),
                    "--repeats", str(sizes.slice_repeats), "--gen-repeats", str(sizes.slice_repeats),
                    "--work", str(folder)], check=True)
    return json.loads((folder / "bench176.json").read_text())


def measure_all(sizes: Sizes, work: Path, sections=SECTIONS, command: str = "", log=print) -> dict:
    """Every section of `sections` (a slice needs `sizes.slice_blocks`); the run's data with the
    date, the commit, the machine and `command`, and its summary."""
    import bench_176b
    work.mkdir(parents=True, exist_ok=True)
    results = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "commit": bench_176b.git_state(), "command": command, "sizes": measure.jsonable(vars(sizes)),
               "load_before": os.getloadavg()[0]}
    measured = {"conversion": conversion, "runtime": runtime, "larger": larger, "quality": quality,
                "slice176b": slice176b}
    for name in sections:
        if name == "slice176b" and not sizes.slice_blocks:
            continue
        if name == "larger" and not (os.geteuid() == 0 and measure.CGROUP_ROOT.exists()):
            results.setdefault("skipped", {})[name] = "needs root and a cgroup-v1 memory controller"
            continue
        log(f"bench: {name}")
        results[name] = measured[name](sizes, work)
        _save_measurements(results, work)
    results["machine"] = machine(sizes.threads, work, sizes.repeats, sizes.disk_probe_bytes)
    results["load_after"] = os.getloadavg()[0]
    _save_measurements(results, work)
    results["summary"] = summarize(results)
    return results


def _save_measurements(results: dict, work: Path) -> None:
    """The measurements so far, as WORK/measured.json, so that an hour of them survives a failure
    after it (`python -m bench --report-only WORK/measured.json` draws a finished one)."""
    from bloomconv.atomic import atomic_write_bytes
    atomic_write_bytes(work / "measured.json", json.dumps(results, default=str).encode())


# ------------------------------------------------------------------------------ summary

def summarize(results: dict) -> dict:
    """The figures the report prints, from the run's data; every value in the unit it is printed in."""
    out = {"machine": _machine_summary(results["machine"])}
    if "conversion" in results:
        out["conversion"] = [_conversion_summary(c) for c in results["conversion"]]
    if "runtime" in results:
        out["runtime"] = _runtime_summary(results["runtime"])
    if "larger" in results:
        out["larger"] = _larger_summary(results["larger"])
    if "quality" in results:
        out["quality"] = _quality_summary(results["quality"])
    if "slice176b" in results:
        out["slice176b"] = _slice_summary(results["slice176b"])
    return out


def _machine_summary(m: dict) -> dict:
    return {"cores": m["cores"], "memory_gb": m["memory_bytes"] / GB, "cpu": m["cpu"], "threads": m["threads"],
            "memory_gb_per_s": spread(b / GB for b in m["memory_bytes_per_s"]),
            "disk_gb_per_s": {k: v / GB for k, v in m["disk_bytes_per_s"].items()} if m["disk_bytes_per_s"] else None}


def _conversion_summary(c: dict) -> dict:
    copy = c["rows"]["cp -r + sync"]["seconds"]
    schemes = {}
    for name, row in c["rows"].items():
        if name == "cp -r + sync":
            continue
        schemes[name] = {"seconds": spread(row["seconds"]),
                         "ratio_to_copy": spread(s / b for s, b in zip(row["seconds"], copy)),
                         "output_gb": row["bytes"] / GB, "peak_rss_anon_gb": spread(r / GB for r in row["rss_anon"])}
    series = c.get("series") or [[0, 0]]
    return {"geometry": c["geometry"], "source_gb": c["source_bytes"] / GB, "copy_seconds": spread(copy),
            "schemes": schemes, "series_peak_gb": max(a for _, a in series) / GB,
            "series_seconds": series[-1][0]}


def _runtime_summary(r: dict) -> dict:
    rows = {row["label"]: row for row in r["rows"]}
    baseline = "transformers float32" if "transformers float32" in rows else None
    formats = {}
    for label, row in rows.items():
        runs = row["runs"]
        per_token = row["weight_bytes_per_token"]
        decode = {}
        for batch in row["decode"]:
            speeds = [run["decode"][batch]["tokens_per_s"] for run in runs]
            bounds = [int(batch) * run["memory_bytes_per_s"] / per_token for run in runs]
            entry = {"tokens_per_s": spread(speeds), "bound_tokens_per_s": spread(bounds),
                     "percent_of_bound": spread(100 * s / b for s, b in zip(speeds, bounds))}
            if baseline and label != baseline and batch in rows[baseline]["decode"]:
                theirs = [run["decode"][batch]["tokens_per_s"] for run in rows[baseline]["runs"]]
                entry["ratio_to_transformers"] = spread(s / t for s, t in zip(speeds, theirs))
            decode[batch] = entry
        prefill = {}
        for length in row["prefill"]:
            speeds = [run["prefill"][length]["tokens_per_s"] for run in runs]
            entry = {"tokens_per_s": spread(speeds)}
            if baseline and label != baseline and length in rows[baseline]["prefill"]:
                theirs = [run["prefill"][length]["tokens_per_s"] for run in rows[baseline]["runs"]]
                entry["ratio_to_transformers"] = spread(s / t for s, t in zip(speeds, theirs))
            prefill[length] = entry
        formats[label] = {"weight_gb_per_token": per_token / GB, "decode": decode, "prefill": prefill}
        if "ready_s" in row:
            formats[label]["ready_s"] = spread(run["ready_s"] for run in runs)
            formats[label]["peak_rss_anon_gb"] = spread(run["peak_rss_anon"] / GB for run in runs)
    generation = next((row for row in r["rows"] if row["runs"][0].get("series")), None)
    return {"geometry": list(r["geometry"]), "baseline": baseline, "formats": formats,
            "memory_gb_per_s": spread(b / GB for b in r["memory_bytes_per_s"]),
            "pairs": [{"ours": p["ours"], "llama.cpp": p["llama.cpp"], "metric": p["metric"], "tokens": p["tokens"],
                       "ratio": p["ratio"]} for p in r["pairs"]],
            "llama_cpp": r.get("llama_cpp"),
            "generation_series": generation["label"] if generation else None,
            "generation_peak_gb": (max(a for _, a in generation["runs"][0]["series"]) / GB if generation else None)}


def _larger_summary(larger: dict) -> dict:
    """Per budget and batch, across the rounds: s/step against the disk bound measured next to each run."""
    rounds = larger["rounds"]
    L = rounds[0]
    runs = []
    for i, run in enumerate(L["runs"]):
        same = [r["runs"][i] for r in rounds]
        for batch in run["decode"]:
            steps = [r["decode"][batch]["s_per_step"] for r in same]
            bounds = [r["bound_s_per_token"] for r in same]
            residency = run["residency"]
            runs.append({"budget_gb": residency["budget"] / GB, "pinned_gb": (residency["pinned_bytes"] + residency.get("pinned_piece_bytes", 0)) / GB,
                         "batch": int(batch), "s_per_step": spread(steps),
                         "s_per_token": spread(s / int(batch) for s in steps), "bound_s_per_step": spread(bounds),
                         "ratio_to_bound": spread(s / b for s, b in zip(steps, bounds)),
                         "peak_rss_anon_gb": spread(r["peak_rss_anon"] / GB for r in same),
                         "memory_bound_gb": spread(r["memory_bound"] / GB for r in same),
                         "disk_gb_per_s": spread(max(r["disk_speeds"].values()) / GB for r in same)})
    return {"geometry": list(L["geometry"]), "model_gb": L["model_bytes"] / GB,
            "cgroup_limit_gb": L["cgroup_limit"] / GB, "model_over_limit": L["model_over_limit"], "runs": runs}


def _quality_summary(q: dict) -> dict:
    points = []
    for model, m in q["models"].items():
        for scheme, row in m["schemes"].items():
            if "bits_per_weight" not in row:  # refused for this model (a block size its rows do not take)
                continue
            points.append({"model": model, "scheme": scheme, "bits_per_weight": row["bits_per_weight"],
                           "kl_mean": row.get("kl_mean"), "perplexity": row.get("perplexity") if m["kind"] == "trained"
                           else None})
    return {"models": sorted(q["models"]), "command": q.get("command", ""), "points": points}


def _slice_summary(report: dict) -> dict:
    conv = report.get("conversion_summary") or {}
    generation = []
    for r in report.get("generation_summary") or []:
        one = r["batches"].get("1", {})
        generation.append({
            "scheme": r["scheme"], "cgroup_gb": r["limit"] / GB, "budget_gb": (r["budget"] or 0) / GB,
            "completed": r["completed"], "runs": r["runs"], "ready_s": r["ready_s"],
            "pinned_gb": (r["pinned_bytes"] or 0) / GB, "startup_gb_per_s": (r["startup_read_speed"] or 0) / GB,
            "startup_to_disk": r.get("startup_to_disk"), "startup_to_bound": r.get("startup_to_bound"),
            "new_memory_gb_per_s": r["fresh_memory_speed"] / GB if r.get("fresh_memory_speed") else None,
            "s_per_token": one.get("s_per_step"), "ratio_to_disk_bound": one.get("ratio_to_bound"),
            "peak_rss_anon_gb": (r["peak_rss_anon"] or 0) / GB,
            "within_budget": all(x for x in r["within_budget"] if x is not None)})
    return {"blocks": report["blocks"], "slice_gb": report["slice"]["bytes"] / GB,
            "conversion": {scheme: {"seconds": r["seconds"], "ratio_to_copy": r["ratio_to_copy"],
                                    "peak_rss_anon_gb": (r["peak_rss_anon"] or 0) / GB}
                           for scheme, r in conv.items()},
            "generation": generation}
