"""BLOOM-176B at its true geometry: conversion and generation on a slice of it, and what that
means for all 70 blocks, measured in one run.

    python bench/bench_176b.py --blocks 2 --work /work/bench176 [--repeats 3] [--gen-repeats 3]

Needs root (drops the page cache, makes cgroup-v1 memory groups) and, for two blocks, about
36 GB free: the 17.06 GB slice (kept in WORK/slice-2blocks for later runs; --clean-slice removes
it), then either a copy of it or one converted output (each removed once measured). Every
measurement runs in a fresh process (this script with --child-*), in a memory cgroup of its own.

1. The slice (bench/slice176b.py: the release's config, file names, keys and zip pickles, the full
   embedding matrix, full block shards), written once, inside a memory cgroup of
   --slice-memory-limit (1 GB): time and peak RssAnon of the writer.
2. Conversion, page cache dropped before each command, --repeats rounds of: for each of convert,
   quantize --bits 8 (the int8 preset: embeddings quantized) and quantize --bits 4 (the nf4
   preset: int8 embeddings), `cp -r` + `sync` of the slice, then the conversion (the library call the CLI makes,
   `bloomconv.convert` / `bloomconv.quantize(bits=...)`). Per pair: wall time (process start to
   exit) ÷ the copy's, peak RssAnon (the process; every process of its cgroup), peak RSS (wait4),
   bytes the process read from disk during the call ÷ the slice's size (/proc/self/io: imports
   not counted), and when each output file was finished (the progress callback).
3. Generation from the int8 and the nf4 outputs (made by the last round), for each cgroup memory
   limit of --limits, --gen-repeats times: the disk's sequential speed over the model's files just
   before (cat, and O_DIRECT reads of the runtime's read size into touched huge pages; page cache
   dropped), then, page cache dropped, a process
   in the cgroup loads the model (`bloomconv.load`, --ram-budget: `default`, the runtime's own
   choice; `fit`, the limit less FIT_MARGIN; or a size), waits until ready, runs a prompt of
   --prompt-tokens random ids and greedy steps at batch 1 (and --big-batch in the first repeat),
   counting the bytes its threads read from disk during each step (/proc/self/io read_bytes).
   Reported: whether it completed (exit status; OOM kills from memory.oom_control; a one-line
   refusal), start-to-ready (`import bloomconv` to weights in RAM) and the speed pinned weights
   came in at (pinned bytes ÷ the runtime's own time from the first pinned read to the last)
   against the disk and against min(disk, the speed this machine hands out new memory, measured
   after the run over as many bytes: `measure.fresh_memory_speed`), s/token and its ratio to the
   disk bound (bytes read per token ÷ the faster of the two disk speeds), peak RssAnon against
   the budget + 300 MB, what was pinned.
4. The extrapolation to all 70 blocks (printed, and as Markdown in WORK/bench176-readme.md):
   conversion time = the slice's wall time + (70 − blocks) × the median time between two
   finished block files; vs `cp -r` + `sync` scaled by bytes; disk = the files' sizes scaled the
   same way; RAM = the peak measured (it does not grow with blocks). Per token at batch b on a
   machine of M: t = P·c_b + (B − P)·max(1/D, c_b), with B the weight bytes of all 70 blocks +
   embeddings + ln_f; P the bytes pinned: what fits in the budget the runtime chose inside the M
   cgroup once its working set, its stream buffers and the KV cache of 70 layers (the runtime's
   default context at batch 1, --big-batch-context tokens per sequence at the big batch) are
   taken out, filled as the runtime does (ln_f, the embeddings if they fit, whole blocks, then 64 MiB pieces); D the
   slower of the disk speeds measured under the slice and under the outputs (a host cache under
   a VM's disk may still hold files just written); c_b the compute seconds per weight byte at
   batch b, measured on the slice with every file pinned. Streamed bytes cost whichever is slower,
   reading or computing (read-ahead overlaps them). The formula is checked against every slice run.

Writes WORK/bench176.json (every run, then medians) and prints the tables; --report-only JSON
redoes the summaries and tables of a finished run without measuring anything.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from measure import disk_read_speed, drop_caches, fresh_memory_speed, gb, memory_cgroup, run_sampled  # noqa: E402

PYTHON = sys.executable
HERE = Path(__file__).parent
GB, MB = 1_000_000_000, 1_000_000
FIT_MARGIN = 1 * GB          # --ram-budget fit: the cgroup limit less this
RSS_TOLERANCE = 300 * MB     # the goal: peak RssAnon <= budget + this
TUTORIAL_S_PER_TOKEN = 180   # bf16 blocks read from NVMe on a 16 GB desktop, one at a time
FULL_BLOCKS = 70
SCHEMES = {  # name: (what the child calls, the CLI command it stands for)
    "convert": ({}, "bloomconv convert SRC DST"),
    "int8": ({"bits": 8}, "bloomconv quantize --bits 8 SRC DST"),
    "nf4": ({"bits": 4}, "bloomconv quantize --bits 4 SRC DST"),
}
GENERATED = ("int8", "nf4")
LIB_VARIABLE = "BLOOMCONV_BENCH_LIB"


def use_lib_from_environment() -> None:
    """In a child: import bloomconv from the folder --lib named, not from the editable install."""
    folder = os.environ.get(LIB_VARIABLE)
    if folder:
        sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "").lower()]
        sys.path_hooks[:] = [h for h in sys.path_hooks if "editable" not in getattr(h, "__module__", "").lower()]
        sys.path.insert(0, folder)


# ------------------------------------------------------------------------------ child processes

def read_bytes_so_far() -> int:
    """Bytes this process's threads have had read from block devices (/proc/self/io)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


def convert_child(spec: dict) -> dict:
    """One conversion through the library, recording when each output file was finished."""
    use_lib_from_environment()
    import bloomconv
    from bloomconv.process_stats import seconds_since_start

    updates = []

    class Recorder:  # a progress factory: called like tqdm(total=..., desc=..., unit="B")
        def __init__(self, **_kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n=1):
            if n:
                updates.append((seconds_since_start(), n))

    start, reads = seconds_since_start(), read_bytes_so_far()
    kwargs = SCHEMES[spec["scheme"]][0]
    if kwargs:
        bloomconv.quantize(spec["src"], spec["dst"], progress=Recorder, **kwargs)
    else:
        bloomconv.convert(spec["src"], spec["dst"], progress=Recorder)
    return {"start_s": start, "end_s": seconds_since_start(), "updates": updates,
            "read_bytes": read_bytes_so_far() - reads,  # this process, during the call: imports not counted
            "bloomconv": bloomconv.__file__}


def generate_child(spec: dict, out: Path) -> None:
    """Load, wait until ready, prefill and decode greedily at each batch size; write what was seen
    to `out` after each stage (so a process killed part-way still says how far it got)."""
    use_lib_from_environment()
    import torch

    import bloomconv
    from bloomconv.errors import BloomconvError
    from bloomconv.process_stats import anonymous_rss, seconds_since_start

    result: dict = {"spec": spec, "batches": {}}

    def save():  # whole or not at all: the process may be killed at any moment
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(result))
        os.replace(tmp, out)

    before = read_bytes_so_far()
    result.update(bloomconv=bloomconv.__file__, load_call_s=seconds_since_start())
    try:
        model = bloomconv.load(spec["dir"], ram_budget=spec["ram_budget"])
    except BloomconvError as exc:  # a budget or machine too small: the one-line refusal
        result["refused"] = f"{type(exc).__name__}: {exc}"
        save()
        sys.exit(3)
    checkpoint = getattr(model, "checkpoint", None)
    if hasattr(checkpoint, "wait_until_loaded"):
        checkpoint.wait_until_loaded()
    result.update(ready_s=seconds_since_start(), ready_read_bytes=read_bytes_so_far() - before,
                  pinned_read_s=getattr(checkpoint, "pinned_read_seconds", None),
                  rss_anon_ready=anonymous_rss(), residency=describe_residency(getattr(checkpoint, "residency", None)))
    save()
    generator = torch.Generator().manual_seed(0)
    vocab = model.config["vocab_size"]
    with torch.inference_mode():
        for batch, prompt_tokens, new_tokens in spec["batches"]:
            ids = torch.randint(4, vocab, (batch, prompt_tokens), generator=generator)
            mask = torch.ones_like(ids)
            reads, begin = read_bytes_so_far(), time.perf_counter()
            logits, past = model.forward(ids, mask, last_only=True)
            row = {"prefill_s": time.perf_counter() - begin, "prefill_read_bytes": read_bytes_so_far() - reads,
                   "step_s": [], "step_read_bytes": []}
            for _ in range(new_tokens - 1):
                token = logits[:, -1].argmax(-1, keepdim=True)
                mask = torch.cat([mask, torch.ones_like(token)], dim=1)
                reads, begin = read_bytes_so_far(), time.perf_counter()
                logits, past = model.forward(token, mask, past, last_only=True)
                row["step_s"].append(time.perf_counter() - begin)
                row["step_read_bytes"].append(read_bytes_so_far() - reads)
            del logits, past
            result["batches"][str(batch)] = row
            save()
    result["rss_anon_end"] = anonymous_rss()
    save()
    model.close()


def pinned_units(residency: dict) -> list[str] | None:
    """The pinned files of a plan, and "N pieces" of streamed files when some are pinned."""
    if residency.get("pinned") is None:
        return None
    pieces = len(residency.get("pinned_pieces") or [])
    return [*residency["pinned"], *([f"{pieces} pieces of streamed files"] if pieces else [])]


def describe_residency(residency) -> dict | None:
    """The runtime's residency plan as plain data (whatever fields this version has)."""
    if residency is None:
        return None
    fields = {}
    for name in dir(residency):
        if name.startswith("_"):
            continue
        try:
            value = getattr(residency, name)
        except Exception:  # noqa: BLE001  (a property that needs more than the plan)
            continue
        if isinstance(value, (int, float, str, bool)) or value is None:
            fields[name] = value
        elif isinstance(value, (tuple, list)) and all(isinstance(v, (int, float, str)) for v in value):
            fields[name] = list(value)
    return fields


# ------------------------------------------------------------------------------ steps

def require_free(path: Path, need: int, what: str) -> None:
    free = shutil.disk_usage(path).free
    if free < need + GB:
        raise SystemExit(f"{path}: {what} needs {gb(need)} (+1 GB margin) and the disk has {gb(free)} free. "
                         "Free space there or choose another --work.")


def remove(path: Path) -> None:
    if path.is_symlink():  # rmtree refuses links
        path.unlink()
    shutil.rmtree(path, ignore_errors=True)
    os.sync()


def make_slice(args) -> tuple[Path, dict | None]:
    """The slice, written in a memory cgroup unless it is there already; the writer's figures."""
    import slice176b
    g = args.geometry
    dst = args.work / (f"slice-{args.blocks}blocks" if g == slice176b.BLOOM_176B else
                       f"slice-{args.blocks}blocks-{g.hidden_size}x{g.n_head}x{g.vocab_size}")
    if slice176b.is_complete(dst, args.blocks, geometry=g):
        return dst, None
    require_free(args.work, slice176b.needed_bytes(g, args.blocks), "the slice")
    with memory_cgroup(args.slice_memory_limit, f"bloomconv-bench176-slice-{os.getpid()}") as group:
        run = run_sampled([PYTHON, str(HERE / "slice176b.py"), str(dst), "--blocks", str(args.blocks),
                           "--geometry", f"{g.hidden_size},{g.n_head},{g.vocab_size}"], cgroup=group, interval=0.05)
    if run["returncode"]:
        raise SystemExit(f"writing the slice failed (exit {run['returncode']}, OOM kills {run['oom_kills']}) in a "
                         f"{gb(args.slice_memory_limit)} memory cgroup")
    return dst, {**run, "memory_limit": args.slice_memory_limit, "bytes": slice176b.read_marker(dst)["bytes"]}


def weight_files(directory: Path) -> list[Path]:
    """The files holding tensors: the shards of a source, the manifest's of a converted directory."""
    if (directory / "manifest.json").exists():
        from bloomconv.manifest import read_manifest
        return [directory / f.name for f in read_manifest(directory).files if f.tensors]
    return sorted(directory.glob("pytorch_model_*.bin"))


def output_sizes(directory: Path) -> dict:
    files = {p.name: p.stat().st_size for p in weight_files(directory)}
    blocks = [size for name, size in files.items() if name.startswith("block_")]
    return {"total": sum(p.stat().st_size for p in directory.iterdir() if p.is_file()),
            "weights": sum(files.values()), "embeddings": files.get("embeddings.safetensors", 0),
            "final": files.get("final.safetensors", 0), "block": statistics.median(blocks) if blocks else 0,
            "blocks": len(blocks)}


def copy_seconds(src: Path, work: Path) -> float:
    """Seconds of `cp -rL` + `sync` of the slice, cold: the files it holds, also where it or they
    are links (`cp -r` of a link copies the link)."""
    copy = work / "copy"
    remove(copy)
    drop_caches()
    start = time.perf_counter()
    subprocess.run(["sh", "-c", f'cp -rL "{src}" "{copy}" && sync'], check=True)
    seconds = time.perf_counter() - start
    copied = sum(f.lstat().st_size for f in copy.rglob("*") if not f.is_symlink() and f.is_file())
    expected = sum(f.stat().st_size for f in src.rglob("*") if f.is_file())
    remove(copy)
    if copied != expected:
        raise SystemExit(f"cp -r copied {copied:,} of the slice's {expected:,} bytes: no baseline")
    return seconds


def conversion(scheme: str, src: Path, dst: Path, args, label: str) -> dict:
    remove(dst)
    drop_caches()
    out = args.work / "logs" / f"{label}.json"
    with memory_cgroup(None, f"bloomconv-bench176-{os.getpid()}") as group, \
            (args.work / "logs" / f"{label}.err").open("w") as err:
        run = run_sampled([PYTHON, __file__, "--child-convert", json.dumps({"scheme": scheme, "src": str(src),
                                                                           "dst": str(dst)}),
                           "--child-out", str(out)], cgroup=group, interval=0.01, stderr=err)
    if run["returncode"]:
        raise SystemExit(f"{scheme} failed (exit {run['returncode']}): see {args.work / 'logs' / (label + '.err')}")
    return {**run, "timeline": json.loads(out.read_text())}


def block_seconds(timeline: dict, slice_sizes: dict) -> list[float]:
    """Seconds between a finished file and the next finished block file (a block's share of the
    pipeline), from the progress updates: one per output file, counting its source bytes."""
    times = [timeline["start_s"]]
    intervals = []
    for at, n in timeline["updates"]:
        if n == slice_sizes["block_source"]:
            intervals.append(at - times[-1])
        times.append(at)
    return intervals


def generation(scheme: str, directory: Path, limit: int, mode: str, batches: list, args, label: str) -> dict:
    files = weight_files(directory)
    speeds = disk_read_speed(files)
    budget = None if mode == "default" else limit - FIT_MARGIN if mode == "fit" else parse_size(mode)
    spec = {"dir": str(directory), "ram_budget": budget, "batches": batches}
    out = args.work / "logs" / f"{label}.json"
    out.unlink(missing_ok=True)
    drop_caches()
    with memory_cgroup(limit, f"bloomconv-bench176-{os.getpid()}") as group, \
            (args.work / "logs" / f"{label}.err").open("w") as err:
        run = run_sampled([PYTHON, __file__, "--child-generate", json.dumps(spec), "--child-out", str(out)],
                          cgroup=group, interval=0.01, stderr=err)
    child = json.loads(out.read_text()) if out.exists() else {}
    if run["returncode"] == 0:
        status = "completed"
    elif run["oom_kills"] or run["returncode"] == -9:
        status = f"OOM-killed (exit {run['returncode']}, {run['oom_kills']} OOM kills)"
    elif "refused" in child:
        status = "refused: " + child["refused"]
    else:
        tail = (args.work / "logs" / f"{label}.err").read_text().strip().splitlines()[-1:]
        status = f"failed (exit {run['returncode']}): {' '.join(tail)}"
    model_bytes = sum(p.stat().st_size for p in files)
    result = {**run, "status": status, "completed": run["returncode"] == 0, "limit": limit, "mode": mode,
              "passed_budget": budget, "disk_speeds": speeds, "disk_speed": max(speeds.values()),
              "model_bytes": model_bytes, "child": child}
    residency = child.get("residency") or {}
    result["budget"] = residency.get("budget", budget)
    result["pinned_bytes"] = residency.get("pinned_bytes")
    pinned = (residency.get("pinned_bytes") or 0) + (residency.get("pinned_piece_bytes") or 0)
    if "ready_s" in child and pinned:
        # the read itself, where the runtime times it (first pinned read to last); else all of load()
        seconds = child.get("pinned_read_s") or child["ready_s"] - child["load_call_s"]
        result["startup_read_speed"] = pinned / max(seconds, 1e-9)
        result["pinned_bytes"] = pinned
        # after the run, so that the memory it frees is not the memory the run is then given
        result["fresh_memory_speed"] = fresh_memory_speed(pinned)
    for batch, row in child.get("batches", {}).items():
        if row["step_s"]:
            per_token = sum(row["step_read_bytes"]) / len(row["step_read_bytes"])
            row["s_per_step"] = statistics.median(row["step_s"])
            row["read_bytes_per_step"] = per_token
            row["bound_s"] = per_token / result["disk_speed"]
            row["ratio_to_bound"] = row["s_per_step"] / row["bound_s"] if row["bound_s"] > 0.05 else None
    if result["budget"]:
        result["within_budget"] = run["peak_rss_anon"] <= result["budget"] + RSS_TOLERANCE
    return result


def parse_size(text: str) -> int:
    from bloomconv.runtime import parse_size as runtime_parse_size
    return runtime_parse_size(text)


# ------------------------------------------------------------------------------ summaries

def median_of(runs: list[dict], *path):
    values = []
    for run in runs:
        value = run
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            values.append(value)
    return statistics.median(values) if values else None


def startup_ratio(runs: list[dict], *speeds: str) -> float | None:
    """The median over `runs` of the start-up read speed ÷ the slowest of `speeds` (a run's keys),
    over the runs that measured them all."""
    ratios = [r["startup_read_speed"] / min(r[k] for k in speeds) for r in runs
              if r.get("startup_read_speed") and all(r.get(k) for k in speeds)]
    return statistics.median(ratios) if ratios else None


def summarize_conversions(report: dict) -> dict:
    slice_bytes = report["slice"]["bytes"]
    full = report["slice"]["full_source_bytes"]
    summary = {}
    for scheme, runs in report["conversions"].items():
        ratios = [r["seconds"] / r["copy_s"] for r in runs]
        blocks = [s for r in runs for s in r["block_s"]]
        block_s = statistics.median(blocks) if blocks else None
        extra = FULL_BLOCKS - report["blocks"]
        full_s = [r["seconds"] + extra * block_s for r in runs] if block_s else \
                 [r["seconds"] * full / slice_bytes for r in runs]
        copy_full = statistics.median(r["copy_s"] for r in runs) * full / slice_bytes
        sizes = runs[-1]["output"]
        summary[scheme] = {
            "seconds": median_of(runs, "seconds"), "copy_s": median_of(runs, "copy_s"),
            "ratio_to_copy": statistics.median(ratios), "peak_rss_anon": median_of(runs, "peak_rss_anon"),
            "peak_group_rss_anon": median_of(runs, "peak_group_rss_anon"), "peak_rss": median_of(runs, "peak_rss"),
            "read_over_source": median_of(runs, "timeline", "read_bytes") / slice_bytes, "block_s": block_s,
            "output_bytes": sizes["total"],
            "full": {"seconds": statistics.median(full_s), "copy_s": copy_full,
                     "ratio_to_copy": statistics.median(full_s) / copy_full,
                     "output_bytes": sizes["total"] + extra * sizes["block"],
                     "method": "slice + (70 - blocks) x block interval" if block_s else "scaled by bytes"}}
    return summary


def summarize_generation(report: dict) -> list[dict]:
    rows = []
    for key, runs in report["generation"].items():
        scheme, limit, mode = key.split("|")
        row = {"scheme": scheme, "limit": int(limit), "mode": mode, "runs": len(runs),
               "completed": sum(r["completed"] for r in runs), "status": sorted({r["status"] for r in runs}),
               "ready_s": median_of(runs, "child", "ready_s"), "startup_read_speed": median_of(runs, "startup_read_speed"),
               "startup_to_disk": startup_ratio(runs, "disk_speed"),
               "startup_to_bound": startup_ratio(runs, "disk_speed", "fresh_memory_speed"),
               "fresh_memory_speed": median_of(runs, "fresh_memory_speed"),
               "disk_speed": median_of(runs, "disk_speed"), "peak_rss_anon": median_of(runs, "peak_rss_anon"),
               "peak_group_rss_anon": median_of(runs, "peak_group_rss_anon"), "budget": median_of(runs, "budget"),
               "pinned_bytes": median_of(runs, "pinned_bytes"), "model_bytes": runs[0]["model_bytes"],
               "within_budget": [r.get("within_budget") for r in runs],
               "pinned": pinned_units(runs[0]["child"].get("residency") or {}), "batches": {}}
        for batch in sorted({b for r in runs for b in r["child"].get("batches", {})}, key=int):
            measured = [r["child"]["batches"][batch] for r in runs if "s_per_step" in r["child"].get("batches", {}).get(batch, {})]
            if measured:
                row["batches"][batch] = {k: median_of(measured, k) for k in
                                         ("s_per_step", "read_bytes_per_step", "bound_s", "ratio_to_bound", "prefill_s")}
        rows.append(row)
    return rows


def summarize(report: dict) -> None:
    measured = any(r.get("copy_s") for runs in report["conversions"].values() for r in runs)
    report["conversion_summary"] = summarize_conversions(report) if measured else {}
    report["generation_summary"] = summarize_generation(report)
    report["extrapolation"] = extrapolate(report)


def extrapolate(report: dict) -> dict:
    """The formula of the module docstring, fitted on the slice runs, checked on them, applied to 70 blocks."""
    out = {"machines": {}, "check": []}
    n = report["blocks"]
    for scheme in GENERATED:
        rows = [r for r in report.get("generation_summary", []) if r["scheme"] == scheme]
        if not report["conversions"].get(scheme) or not rows:
            continue
        sizes = report["conversions"][scheme][-1]["output"]
        slice_weights, full_weights = sizes["weights"], sizes["weights"] + (FULL_BLOCKS - n) * sizes["block"]
        # the slower of: the disk under the slice (written first, longest ago) and the median under the
        # outputs (written just before: a host's cache under this VM's disk may still hold them)
        disk = min(max(report["source_disk_speeds"].values()),
                   statistics.median(r["disk_speed"] for r in rows if r["disk_speed"]))
        out.setdefault("disk_speed", {})[scheme] = disk
        compute = {}  # batch -> seconds per weight byte, from the runs that read ~nothing per step
        for r in rows:
            for batch, b in r["batches"].items():
                if b.get("read_bytes_per_step") is not None and b["read_bytes_per_step"] < 0.02 * slice_weights:
                    compute.setdefault(batch, []).append(b["s_per_step"] / slice_weights)
        if not compute:  # nothing ran fully pinned: the fastest run is an upper bound on compute
            for r in rows:
                for batch, b in r["batches"].items():
                    if b.get("s_per_step"):
                        compute.setdefault(batch, []).append(b["s_per_step"] / slice_weights)
            out.setdefault("notes", []).append(f"{scheme}: no run had every file pinned; compute per byte is "
                                               "an upper bound (the fastest run's)")
        c = {batch: min(values) for batch, values in compute.items()}

        def per_step(batch, pinned, total, speed):
            return pinned * c[batch] + (total - pinned) * max(1 / speed, c[batch])

        for r in rows:  # the formula against each measured slice run
            for batch, b in r["batches"].items():
                if b.get("s_per_step") and batch in c and r["pinned_bytes"] is not None:
                    predicted = per_step(batch, r["pinned_bytes"], slice_weights, r["disk_speed"])
                    out["check"].append({"scheme": scheme, "limit": r["limit"], "mode": r["mode"], "batch": batch,
                                         "measured_s": b["s_per_step"], "predicted_s": predicted,
                                         "measured_over_predicted": b["s_per_step"] / predicted})
        buffers = max(((r0.get("residency") or {}).get("stream_bytes", 0)
                       for r0 in (run["child"] for runs in report["generation"].values() for run in runs
                                  if run["child"].get("spec", {}).get("dir", "").endswith(f"out-{scheme}"))), default=0)
        for r in rows:
            if r["mode"] != report["modes"][0]:
                continue
            key = f"{scheme}|{r['limit']}"
            if r["budget"] is None:  # never got ready on the slice: nothing to extrapolate from
                out["machines"][key] = {"scheme": scheme, "limit": r["limit"], "status": "; ".join(r["status"])}
                continue
            residency = report["generation"][f"{key}|{r['mode']}"][0]["child"].get("residency") or {}
            tokens = residency.get("max_tokens", 256)
            # KV cache bytes per layer, token and sequence: what the runtime reserved, else fp32 keys + values
            kv_unit = (residency["kv_cache_bytes"] / (n * tokens) if residency.get("kv_cache_bytes")
                       else 2 * report["slice"]["hidden_size"] * 4)
            working_set = residency.get("working_set_bytes", residency.get("reserve_bytes", 0) - residency.get("kv_cache_bytes", 0))
            machine = {"scheme": scheme, "limit": r["limit"], "budget": r["budget"], "stream_buffers": buffers,
                       "working_set": working_set, "weight_bytes": full_weights, "disk_speed": disk, "batches": {}}
            for batch in c:
                context = tokens if batch == "1" else report["big_batch_context"]
                kv = kv_unit * FULL_BLOCKS * int(batch) * context
                room = r["budget"] - working_set - kv - buffers
                entry = {"context_tokens": context, "kv_cache_bytes": kv, "compute_s_per_gb": c[batch] * GB}
                if room < 0:
                    entry["status"] = (f"does not fit: KV cache {gb(kv)} + working set {gb(working_set)} + stream "
                                       f"buffers {gb(buffers)} > budget {gb(r['budget'])}")
                else:
                    pinned = fill(room, sizes)
                    seconds = per_step(batch, pinned, full_weights, disk)
                    entry.update(pinned_bytes=pinned, s_per_step=seconds, tokens_per_s=int(batch) / seconds)
                machine["batches"][batch] = entry
            out["machines"][key] = machine
    if out.get("disk_speed"):
        out["bf16_read_s_per_token"] = report["slice"]["full_source_bytes"] / min(out["disk_speed"].values())
    return out


def fill(room: float, sizes: dict) -> int:
    """Bytes pinned in `room`, in the runtime's order: ln_f, the embeddings if they fit, whole blocks,
    then pieces of the streamed files (taken as STREAM_PIECE_BYTES each) with what is left."""
    from bloomconv.runtime.readahead import STREAM_PIECE_BYTES
    pinned = 0
    for size in (sizes["final"], sizes["embeddings"]):
        if size <= room - pinned:
            pinned += size
    if sizes["block"]:
        pinned += min(FULL_BLOCKS, int((room - pinned) // sizes["block"])) * sizes["block"]
    total = sizes["final"] + sizes["embeddings"] + FULL_BLOCKS * sizes["block"]
    if pinned < total:
        pinned += max(0, min(total - pinned - STREAM_PIECE_BYTES,
                             (room - pinned) // STREAM_PIECE_BYTES * STREAM_PIECE_BYTES))
    return int(pinned)


# ------------------------------------------------------------------------------ report

def print_report(report: dict) -> str:
    """Print the tables; return the README's Markdown."""
    s = report["slice"]
    print(f"slice: {report['blocks']} blocks of BLOOM-176B, {gb(s['bytes'])} ({s['path']}); "
          f"all 70 blocks: {gb(s['full_source_bytes'])}")
    if s.get("written"):
        w = s["written"]
        print(f"  written in {w['seconds']:.0f} s inside a {gb(w['memory_limit'])} memory cgroup: peak RssAnon "
              f"{gb(w['peak_rss_anon'])}, peak RSS {gb(w['peak_rss'])}, cgroup peak usage {gb(w['group_max_usage'])}")
    if "source_disk_speeds" in report:
        print("  disk, cold, over the slice: " + ", ".join(f"{k} {v / GB:.2f} GB/s" for k, v in report["source_disk_speeds"].items()))
    md = []
    if report.get("conversion_summary"):
        print(f"\nconversion, cold cache, medians of {report['repeats']} (each against its own cp -r + sync)")
        print(f"  {'':8} {'seconds':>8} {'cp+sync':>8} {'ratio':>6} {'RssAnon':>9} {'cgroup anon':>11} {'RSS':>8} "
              f"{'read/src':>8} {'block s':>8} {'output':>9}")
        for scheme, r in report["conversion_summary"].items():
            print(f"  {scheme:8} {r['seconds']:8.1f} {r['copy_s']:8.1f} {r['ratio_to_copy']:6.2f} {gb(r['peak_rss_anon']):>9} "
                  f"{gb(r['peak_group_rss_anon'] or 0):>11} {gb(r['peak_rss']):>8} {r['read_over_source']:8.2f} "
                  f"{r['block_s'] or 0:8.1f} {gb(r['output_bytes']):>9}")
    if report.get("generation_summary"):
        print(f"\ngeneration, cold cache, medians of {report['gen_repeats']} (batch {report['big_batch']}: first repeat only)")
        print(f"  {'':5} {'limit':>5} {'budget':>14} {'done':>4} {'ready s':>7} {'pin GB/s':>8} {'disk GB/s':>9} {'mem GB/s':>8} {'batch':>5} "
              f"{'s/token':>8} {'read/tok':>8} {'bound s':>7} {'ratio':>5} {'RssAnon':>8} {'<=b+300':>7}  pinned")
        for r in report["generation_summary"]:
            budget = f"{r['mode']} {r['budget'] / GB:.1f}G" if r["budget"] else r["mode"]
            pinned = f"{gb(r['pinned_bytes'])}: {', '.join(r['pinned'] or [])}" if r["pinned_bytes"] is not None else ""
            first = True
            for batch, b in (r["batches"] or {"-": {}}).items():
                head = (f"  {r['scheme']:5} {r['limit'] / GB:4.1f}G {budget:>14} {r['completed']}/{r['runs']} "
                        f"{r['ready_s'] or 0:7.1f} {(r['startup_read_speed'] or 0) / GB:8.2f} {(r['disk_speed'] or 0) / GB:9.2f} {(r['fresh_memory_speed'] or 0) / GB:8.2f}"
                        if first else f"  {'':5} {'':5} {'':>14} {'':4} {'':7} {'':8} {'':9} {'':8}")
                ratio = f"{b['ratio_to_bound']:5.2f}" if b.get("ratio_to_bound") else "    -"
                tail = (f" {gb(r['peak_rss_anon']):>8} {str(all(x for x in r['within_budget'] if x is not None)):>7}  {pinned}"
                        if first else "")
                print(f"{head} {batch:>5} {b.get('s_per_step') or 0:8.2f} {(b.get('read_bytes_per_step') or 0) / GB:8.2f} "
                      f"{b.get('bound_s') or 0:7.2f} {ratio}{tail}")
                first = False
            for status in r["status"]:
                if status != "completed":
                    print(f"        {status}")
        print("  ready: `import bloomconv` to every pinned weight in RAM; pin GB/s: pinned bytes / time from the first pinned read to the last; "
              "bound: bytes read per step / the faster of cat and O_DIRECT")
    x = report.get("extrapolation")
    if x and x["machines"]:
        print("\nthe formula against the slice runs (measured / predicted): " + ", ".join(
            f"{c['scheme']} {c['limit'] / GB:.0f}G b{c['batch']} {c['measured_over_predicted']:.2f}" for c in x["check"]))
        conv = report.get("conversion_summary") or {}
        md.extend(slice_markdown(report))
        md.append(f"All 70 blocks, from the {report['blocks']}-block slice measured on this machine "
                  f"({report['machine']['cpus']} vCPUs; disk {min(x['disk_speed'].values()) / GB:.2f} GB/s sequential, "
                  f"cold; code {report['code']}):\n")
        md.append("| | convert | quantize --bits 8 | quantize --bits 4 |\n|---|---|---|---|")
        md.append("| conversion time | " + " | ".join(
            f"{conv[s]['full']['seconds'] / 60:.1f} min ({conv[s]['full']['ratio_to_copy']:.2f}× cp -r + sync)"
            for s in SCHEMES if s in conv) + " |")
        md.append("| disk (output) | " + " | ".join(f"{conv[s]['full']['output_bytes'] / GB:.0f} GB" for s in SCHEMES if s in conv) + " |")
        md.append("| RAM (peak RssAnon) | " + " | ".join(f"{conv[s]['peak_rss_anon'] / GB:.2f} GB" for s in SCHEMES if s in conv) + " |")
        md.append("")
        big = str(report["big_batch"])
        context = next((m["batches"]["1"]["context_tokens"] for m in x["machines"].values() if "1" in m.get("batches", {})), 0)
        md.append(f"| machine | weights | budget (default) | batch 1, {context}-token context: "
                  f"pinned, s/token | batch {big}, {report['big_batch_context']} tokens each: KV cache, pinned, "
                  "tokens/s |\n|---|---|---|---|---|")
        for m in x["machines"].values():
            if "status" in m:
                md.append(f"| {m['limit'] / GB:.0f} GB | {m['scheme']} | - | on the slice: {m['status']} | - |")
                continue
            cells = []
            for batch in ("1", big):
                e = m["batches"].get(batch)
                if e is None:
                    cells.append("-")
                elif "status" in e:
                    cells.append(e["status"])
                elif batch == "1":
                    cells.append(f"{e['pinned_bytes'] / GB:.1f} GB, **{e['s_per_step']:.0f} s**")
                else:
                    cells.append(f"{e['kv_cache_bytes'] / GB:.1f} GB, {e['pinned_bytes'] / GB:.1f} GB, "
                                 f"**{e['tokens_per_s']:.2f}**")
            md.append(f"| {m['limit'] / GB:.0f} GB | {m['scheme']}, {m['weight_bytes'] / GB:.0f} GB | "
                      f"{m['budget'] / GB:.1f} GB | {cells[0]} | {cells[1]} |")
        md.append(f"| 16 GB (the tutorial) | bf16, {report['slice']['full_source_bytes'] / GB:.0f} GB | - | "
                  f"**{TUTORIAL_S_PER_TOKEN} s** (its NVMe; reading the bf16 weights from this disk takes "
                  f"{x.get('bf16_read_s_per_token', 0):.0f} s) | - |")
        md.append("")
        md.append("The formula on the slice runs, measured ÷ predicted: " + ", ".join(
            f"{c['scheme']} {c['limit'] / GB:.0f} GB batch {c['batch']} {c['measured_over_predicted']:.2f}"
            for c in x["check"]) + ".\n")
        md.append("Per token at batch b: **t = P·c_b + (B − P)·max(1/D, c_b)** — B: weight bytes read per token (70 "
                  "blocks, the embeddings, which are the tied lm_head, and ln_f); P: bytes pinned, what fits in the "
                  "runtime's default budget for that machine (as it chose it in a memory cgroup of that size) after "
                  "its working set, the stream buffers and the KV cache (fp32 keys and values of 70 layers for "
                  "every token of every sequence), filled as the runtime does (ln_f, the embeddings if they fit, "
                  "whole blocks, then 64 MiB pieces of the streamed files); D: the disk's sequential speed; c_b: compute seconds per weight byte at batch b, "
                  "measured on the slice with every file pinned. Streamed bytes cost the slower of reading and "
                  f"computing them (read-ahead overlaps the two). Conversion: the slice's time + {FULL_BLOCKS - report['blocks']} × "
                  "the time between two finished block files; output scaled the same way; RAM as measured on the slice "
                  "(it does not grow with blocks).")
        markdown = "\n".join(line for line in md if line is not None)
        print("\n" + markdown)
        return markdown
    return ""


def slice_markdown(report: dict) -> list[str]:
    """The slice's own figures, as Markdown tables."""
    md = [f"On the {report['blocks']}-block slice ({report['slice']['bytes'] / GB:.2f} GB; `{report['command']}`; "
          f"code {report['code']}; {report['started']}):\n"]
    conv = report.get("conversion_summary") or {}
    if conv:
        md.append(f"| cold, medians of {report['repeats']} | seconds | ÷ `cp -r` + `sync` | peak RssAnon | peak RSS | "
                  "source read |\n|---|---|---|---|---|---|")
        for scheme, r in conv.items():
            md.append(f"| {SCHEMES[scheme][1].split(' SRC')[0]} | {r['seconds']:.0f} | {r['ratio_to_copy']:.2f} | "
                      f"{gb(r['peak_rss_anon'])} | {gb(r['peak_rss'])} | {r['read_over_source']:.2f}× |")
        md.append("")
    rows = report.get("generation_summary") or []
    if rows:
        md.append(f"| generate, cold, medians of {report['gen_repeats']} | cgroup | budget | completed | ready | "
                  "pinned read at | s/token | ÷ disk bound | peak RssAnon ≤ budget + 300 MB | pinned |\n"
                  "|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            b1 = r["batches"].get("1", {})
            speed = (f"{r['startup_to_disk']:.2f}× disk, {r['startup_to_bound']:.2f}× min(disk, new memory "
                     f"{r['fresh_memory_speed'] / GB:.1f} GB/s)" if r.get("startup_to_bound")
                     and r["pinned_bytes"] and r["pinned_bytes"] > 100 * MB else "-")
            budget = f"{r['mode']}: {r['budget'] / GB:.1f} GB" if r["budget"] else r["mode"]
            done = f"{r['completed']}/{r['runs']}" + ("" if r["completed"] == r["runs"] else
                                                       " (" + "; ".join(x for x in r["status"] if x != "completed") + ")")
            within = all(x for x in r["within_budget"] if x is not None) if r["budget"] else None
            md.append(f"| {r['scheme']} | {r['limit'] / GB:.0f} GB | {budget} | {done} | "
                      f"{r['ready_s'] or 0:.1f} s | {speed} | {b1.get('s_per_step') or 0:.2f} | "
                      f"{ratio_text(b1)} | "
                      f"{gb(r['peak_rss_anon'])} ({ {True: 'yes', False: 'NO', None: '-'}[within] }) | "
                      f"{gb(r['pinned_bytes']) if r['pinned_bytes'] is not None else '-'}: {', '.join(r['pinned'] or [])} |")
        md.append("")
    return md


def ratio_text(batch: dict) -> str:
    ratio = batch.get("ratio_to_bound")
    return f"{ratio:.2f}" if ratio else "compute-bound" if batch.get("s_per_step") else "-"


# ------------------------------------------------------------------------------ main

def git_state() -> str:
    """HEAD, and when the working tree differs, a hash of the package's sources as they are: the
    code measured, even while it is being changed."""
    import hashlib
    root = HERE.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True).stdout.strip()
    except OSError:
        head, dirty = "unknown", "unknown"
    if not dirty:
        return head
    digest = hashlib.sha256()
    for path in sorted(p for folder in ("bloomconv", "converters", "runtime") for p in (root / folder).rglob("*")
                       if p.suffix in (".py", ".c", ".h") and p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return f"{head}+working tree {digest.hexdigest()[:10]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=2, help="blocks in the slice (at least 2)")
    parser.add_argument("--work", type=Path, default=HERE / "out" / "bench176")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of the conversions")
    parser.add_argument("--gen-repeats", type=int, default=3, help="runs of each generation configuration")
    parser.add_argument("--only", choices=("convert", "generate"), help="one section (generate still converts once)")
    parser.add_argument("--schemes", default="convert,int8,nf4")
    parser.add_argument("--limits", default="16GB,4GB,2GB", help="memory cgroup limits for generation")
    parser.add_argument("--ram-budget", default="default",
                        help="comma-separated: default (the runtime's choice), fit (limit - 1 GB) or a size")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=6, help="per batch-1 run (the first is the prefill)")
    parser.add_argument("--big-batch", type=int, default=32, help="also measured in each first repeat; 0: not")
    parser.add_argument("--big-batch-prompt", type=int, default=4)
    parser.add_argument("--big-batch-tokens", type=int, default=3)
    parser.add_argument("--big-batch-context", type=int, default=32,
                        help="tokens per sequence (prompt + new) the big-batch extrapolation keeps in its KV cache")
    parser.add_argument("--lib", type=Path, help="measure the bloomconv installed in this folder (pip install "
                        "--target DIR .) instead of this checkout, e.g. the last commit's, for before/after figures")
    parser.add_argument("--report-only", type=Path, metavar="JSON",
                        help="recompute the summaries and tables of a finished run's bench176.json; measure nothing")
    parser.add_argument("--slice-memory-limit", default="1GB")
    parser.add_argument("--slice", type=Path, help="use this release-layout slice of BLOOM-176B instead of "
                        "writing one into WORK (--blocks is then its n_layer)")
    parser.add_argument("--small", action="store_true",
                        help="a small geometry (hidden 1024, vocab 32768) and limits, to try the script out")
    parser.add_argument("--clean-slice", action="store_true", help="remove the slice at the end")
    parser.add_argument("--child-convert", help=argparse.SUPPRESS)
    parser.add_argument("--child-generate", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.lib:  # the children import bloomconv from there (the environment carries it to them)
        os.environ[LIB_VARIABLE] = str(args.lib.resolve())
    if args.child_convert:
        args.child_out.write_text(json.dumps(convert_child(json.loads(args.child_convert))))
        return
    if args.child_generate:
        generate_child(json.loads(args.child_generate), args.child_out)
        return
    if args.report_only:
        report = json.loads(args.report_only.read_text())
        report.setdefault("big_batch_context", args.big_batch_context)
        summarize(report)
        args.report_only.write_text(json.dumps(report, indent=1))
        markdown = print_report(report)
        if markdown:
            args.report_only.with_name("bench176-readme.md").write_text(markdown + "\n")
        return
    if os.geteuid() != 0:
        raise SystemExit("run as root: the page cache is dropped and memory cgroups are made")
    if args.blocks < 2:
        raise SystemExit("--blocks must be at least 2 (block times are taken between two finished blocks)")
    import slice176b
    args.geometry = slice176b.BLOOM_176B
    if args.small:
        args.geometry = slice176b.SliceGeometry(1024, 16, 32768, FULL_BLOCKS)
        args.limits, args.prompt_tokens, args.big_batch = "2GB,600MB", 8, 4
    args.work = args.work.resolve()
    (args.work / "logs").mkdir(parents=True, exist_ok=True)
    args.slice_memory_limit = parse_size(args.slice_memory_limit)
    limits = [parse_size(x) for x in args.limits.split(",")]
    modes = args.ram_budget.split(",")
    schemes = args.schemes.split(",")
    for leftover in [args.work / "copy", *args.work.glob("out-*")]:
        remove(leftover)

    report = {"command": " ".join(sys.argv), "code": f"--lib {args.lib}" if args.lib else git_state(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "machine": {"cpus": os.cpu_count(), "kernel": platform.release(),
                          "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")},
              "blocks": args.blocks, "repeats": args.repeats, "gen_repeats": args.gen_repeats,
              "big_batch": args.big_batch, "big_batch_context": args.big_batch_context, "modes": modes,
              "load_before": os.getloadavg()[0]}
    src, written = (args.slice, None) if args.slice else make_slice(args)
    if args.slice:
        args.blocks = json.loads((src / "config.json").read_text())["n_layer"]
    report["slice"] = {"path": str(src), "bytes": sum(p.stat().st_size for p in src.iterdir() if p.is_file()),
                       "full_source_bytes": slice176b.needed_bytes(args.geometry, FULL_BLOCKS), "written": written,
                       "hidden_size": args.geometry.hidden_size}
    shards = weight_files(src)
    # what the converter's progress counts for one block: its tensors' source bytes
    slice_sizes = {"block_source": slice176b.needed_bytes(args.geometry, 1) - slice176b.needed_bytes(args.geometry, 0)}
    report["source_disk_speeds"] = disk_read_speed(shards)

    report["conversions"] = {s: [] for s in schemes}
    report["generation"] = {}
    rounds = 1 if args.only == "generate" else args.repeats
    for round_ in range(rounds):
        for scheme in schemes:
            dst = args.work / f"out-{scheme}"
            label = f"{scheme}-{round_}"
            require_free(args.work, report["slice"]["bytes"], f"{label}: a copy of the slice, then the output")
            copy_s = copy_seconds(src, args.work) if args.only != "generate" else None
            run = conversion(scheme, src, dst, args, label)
            run.update(copy_s=copy_s, output=output_sizes(dst), block_s=block_seconds(run["timeline"], slice_sizes))
            report["conversions"][scheme].append(run)
            print(f"{label}: {run['seconds']:.1f} s" + (f" vs cp -r + sync {copy_s:.1f} s = {run['seconds'] / copy_s:.2f}x"
                                                        if copy_s else " (not compared: --only generate)")
                  + f", peak RssAnon {gb(run['peak_rss_anon'])}, read {run['timeline']['read_bytes'] / report['slice']['bytes']:.2f}x "
                  f"the source, output {gb(run['output']['total'])}", flush=True)
            if round_ == rounds - 1 and scheme in GENERATED and args.only != "convert":
                for limit in limits:
                    for mode in modes:
                        key = f"{scheme}|{limit}|{mode}"
                        report["generation"][key] = []
                        for repeat in range(args.gen_repeats):
                            batches = [[1, args.prompt_tokens, args.new_tokens]]
                            if repeat == 0 and args.big_batch:
                                batches.append([args.big_batch, args.big_batch_prompt, args.big_batch_tokens])
                            g = generation(scheme, dst, limit, mode, batches, args,
                                           f"gen-{scheme}-{limit // GB}G-{mode}-{repeat}")
                            report["generation"][key].append(g)
                            b1 = g["child"].get("batches", {}).get("1", {})
                            print(f"gen {scheme} {gb(limit)} {mode} #{repeat}: {g['status']}; ready "
                                  f"{g['child'].get('ready_s', 0):.1f} s, {b1.get('s_per_step', 0):.2f} s/token "
                                  f"(bound {b1.get('bound_s', 0):.2f} s), peak RssAnon {gb(g['peak_rss_anon'])}",
                                  flush=True)
                            (args.work / "bench176.json").write_text(json.dumps(report, indent=1))
            remove(dst)
            (args.work / "bench176.json").write_text(json.dumps(report, indent=1))
    summarize(report)
    report["load_after"] = os.getloadavg()[0]
    report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    (args.work / "bench176.json").write_text(json.dumps(report, indent=1))
    markdown = print_report(report)
    if markdown:
        (args.work / "bench176-readme.md").write_text(markdown + "\n")
    if args.clean_slice:
        slice176b.remove_slice(src)


if __name__ == "__main__":
    main()
