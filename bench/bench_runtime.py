"""Runtime speed and memory against this machine's limits and transformers, measured in one run.

    python bench/bench_runtime.py [--large] [--in-memory] [--small] [--work bench/out]

Needs root (drops the page cache, makes a cgroup-v1 memory group). With neither --large nor
--in-memory both run. Prints a table and writes bench/out/runtime.json. Every measurement runs
in a fresh process (this script with --child), so start-up is real and nothing is shared.

--large: a model >= 3x larger than the memory cgroup limit its generating process runs in
  (default 2048 hidden, 48 blocks, vocab 16384, bf16: 4.8 GB, vs a 1.5 GB limit).
  - sequential disk read speed before each run (it drifts): `cat`, and O_DIRECT 16 MB reads as
    the runtime streams, page cache dropped first;
  - s/token with everything streamed (budget 0) vs the disk-read bound model bytes / disk speed;
  - s/token at two RAM budgets vs (model - pinned bytes) / disk speed, and peak RssAnon vs
    start-up RssAnon + the weights held (pinned + stream buffers) + 200 MB;
  - decode throughput at batch 1, 8 and 32 at the second budget: prompts share each read.
  The page cache is dropped before each process. Compute is bf16 (--large-dtype).
--in-memory: bloom-560m geometry (random bf16 weights), unquantized, int8 and nf4, page cache warm.
  - memory bandwidth: torch.sum over 1 GB of fp32, same threads, measured again right before
    every run (it drifts between ~30 and ~57 GB/s here within minutes);
  - decode tokens/s at batch 1 and 16 for the runtime (fp32 and bf16 compute) and transformers'
    BloomForCausalLM (bf16, fp32) vs bandwidth / weight bytes read per token (median step); the
    % of that bound is taken per run against the bandwidth measured next to it, then the median;
  - start-to-ready (process start to weights in RAM) vs transformers' from_pretrained;
  - prefill tokens/s of 128- and 512-token prompts (--prefill-tokens) vs transformers, each timed
    after a warm-up pass of the same length (llama-bench, too, warms up before timing);
  - --llama-cpp: llama.cpp (bench/llamacpp.py, when a build is found) in the same rounds, bf16,
    Q8_0, Q4_0 and Q4_K_M GGUFs of the same checkpoint paired with unquantized, int8 and nf4:
    per-round ratios of decode at each batch (llama-batched-bench beyond 1, where built) and of
    each prefill, medians and spread.
--small shrinks every size for trying the script out. --repeats N runs the --in-memory
configurations round robin N times and reports medians (the machine is shared and noisy).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import bloomconv  # noqa: F401  (first: start-to-ready counts from this import in both kinds of child)
from bloomconv.format import dtype_name
from bloomconv.process_stats import anonymous_rss, peak_rss, seconds_since_start

sys.path.insert(0, str(Path(__file__).parent))
from bench_convert import dir_bytes, make_checkpoint  # noqa: E402
import measure  # noqa: E402
from measure import drop_caches, gb, memory_cgroup, run_sampled  # noqa: E402

PYTHON = sys.executable
MB = 1_000_000


# ------------------------------------------------------------------------------ child process

def child(spec: dict) -> dict:
    """Load one model, then time a prefill and decoding at each batch size. Runs in its own process."""
    import torch
    torch.set_num_threads(spec["threads"])
    generator = torch.Generator().manual_seed(0)
    vocab = spec["vocab"]

    def ids(batch, length):
        return torch.randint(4, vocab, (batch, length), generator=generator)

    out = {"spec": spec}
    if spec["kind"] == "runtime":
        import bloomconv.runtime as runtime
        # the plan reserves KV cache and working set for the longest run this child makes
        tokens = max([max(spec["batches"]) * (spec["prompt_tokens"] + spec["new_tokens"]), *spec["prefill_tokens"]])
        prefill_dtype = spec.get("prefill_dtype")
        model = runtime.load(spec["dir"], ram_budget=spec["ram_budget"], dtype=getattr(torch, spec["dtype"]),
                             max_tokens=tokens, prefill_dtype=getattr(torch, prefill_dtype) if prefill_dtype else None)
        model.checkpoint.wait_until_loaded()
        out["ready_s"] = seconds_since_start()
        out["prefill_dtype"] = dtype_name(model.transformer.prefill_dtype)
        r = model.checkpoint.residency
        out["residency"] = {"budget": r.budget, "pinned": len(r.pinned), "streamed": len(r.streamed),
                            "pinned_bytes": r.pinned_bytes, "resident_bytes": r.resident_bytes,
                            "widened": r.widened}

        def start(input_ids):
            mask = torch.ones_like(input_ids)
            logits, past = model.forward(input_ids, mask, last_only=True)
            return logits, (mask, past)

        def step(token, state):
            mask, past = state
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            logits, past = model.forward(token, mask, past, last_only=True)
            return logits, (mask, past)
    else:
        from transformers import BloomForCausalLM
        model = BloomForCausalLM.from_pretrained(spec["dir"], dtype=getattr(torch, spec["dtype"])).eval()
        out["ready_s"] = seconds_since_start()

        def start(input_ids):
            mask = torch.ones_like(input_ids)
            result = model(input_ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
            return result.logits, (mask, result.past_key_values)

        def step(token, state):
            mask, past = state
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            result = model(token, past_key_values=past, attention_mask=mask, use_cache=True, logits_to_keep=1)
            return result.logits, (mask, result.past_key_values)

    @torch.inference_mode()
    def run(input_ids, new_tokens):
        """Greedy decoding without stopping; seconds of the prompt pass and of each later step."""
        begin = time.perf_counter()
        logits, state = start(input_ids)
        prefill = time.perf_counter() - begin
        steps = []
        for _ in range(new_tokens - 1):
            begin = time.perf_counter()
            logits, state = step(logits[:, -1].argmax(-1, keepdim=True), state)
            steps.append(time.perf_counter() - begin)
        out["kv_cache_bytes"] = max(out.get("kv_cache_bytes", 0), getattr(state[1], "nbytes", 0))
        return prefill, steps

    out["prefill"] = {}
    for length in spec["prefill_tokens"]:
        run(ids(1, length), 1)  # warm-up: torch sets its GEMMs up per shape; llama-bench warms up too
        prefill, _ = run(ids(1, length), 1)
        out["prefill"][str(length)] = {"tokens_per_s": length / prefill}
    out["decode"] = {}
    for batch in spec["batches"]:
        _, steps = run(ids(batch, spec["prompt_tokens"]), spec["new_tokens"])
        # the median step: a noisy shared machine adds whole scheduler quanta to some steps
        median = statistics.median(steps)
        out["decode"][str(batch)] = {"s_per_step": median, "mean_s_per_step": statistics.mean(steps),
                                     "tokens_per_s": batch / median}
    out["vm_hwm"], out["rss_anon"] = peak_rss(), anonymous_rss()
    if spec["kind"] == "runtime" and model.checkpoint.residency.streamed:
        # the runtime's reader alone over the streamed files, once the model is gone (so that its
        # buffer does not add to the peak memory measured)
        from bloomconv.runtime.files import AnonymousBuffer, MappedFile
        pieces = model.checkpoint.pieces
        paths = {u: model.checkpoint.files[u].path for u in model.checkpoint.residency.streamed}
        buffer_bytes = model.checkpoint.residency.buffer_bytes
        model.close()
        del model
        buffer = AnonymousBuffer(buffer_bytes)
        buffer.tensor.fill_(1)
        files = {u: MappedFile(p, {}) for u, p in paths.items()}
        begin = time.perf_counter()
        for piece in pieces:
            files[piece.unit].read_spans(buffer.memoryview(), piece.spans, streaming=True)
        out["read_pass_bytes_per_s"] = sum(p.nbytes for p in pieces) / (time.perf_counter() - begin)
    return out


def run_child(spec: dict, work: Path, cgroup: Path | None = None, series: bool = False) -> dict:
    """`child(spec)` in a fresh process, its memory sampled (`series`: RssAnon over time too)."""
    result_path = work / "runtime-child.json"
    result_path.unlink(missing_ok=True)
    sampled = run_sampled([PYTHON, __file__, "--child", json.dumps(spec), "--child-out", str(result_path)],
                          cgroup=cgroup, interval=0.01, series=series)
    if sampled["returncode"]:
        raise SystemExit(f"child failed (exit {sampled['returncode']}): {spec}")
    extra = {"series": sampled["series"]} if series else {}
    return {**json.loads(result_path.read_text()), "peak_rss_anon": sampled["peak_rss_anon"],
            "peak_rss": sampled["peak_rss"], "wall_s": sampled["seconds"], **extra}


# ------------------------------------------------------------------------------ machine limits

def weight_files(directory: Path) -> list[Path]:
    from bloomconv.manifest import read_manifest
    return [directory / f.name for f in read_manifest(directory).files if f.tensors]


def disk_read_speed(files: list[Path]) -> dict[str, float]:
    """`measure.disk_read_speed` with O_DIRECT reads the size the runtime's streaming reads."""
    from bloomconv.runtime.files import READ_CHUNK_BYTES
    return measure.disk_read_speed(files, READ_CHUNK_BYTES)


def memory_bandwidth(threads: int, nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes/s of torch.sum over `nbytes` of fp32 (read-bound), median of `repeats`."""
    import torch
    torch.set_num_threads(threads)
    x = torch.ones(nbytes // 4)
    x.sum()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - start)
    return nbytes / statistics.median(times)


def startup_rss_anon() -> int:
    code = ("import torch, bloomconv.runtime;"
            "print([l for l in open('/proc/self/status') if l.startswith('RssAnon')][0].split()[1])")
    return int(subprocess.run([PYTHON, "-c", code], check=True, capture_output=True, text=True).stdout) * 1024


def load_average() -> float:
    return os.getloadavg()[0]


# a 4-bit preset's variants: its embeddings (the tied lm_head) int8 (the preset's own) or 16-bit
EMBEDDING_VARIANTS = {"": None, "int8emb": "int8", "emb16": False}


def converted(src: Path, dst: Path, preset: str | None) -> Path:
    """`src` converted into `dst` with a quantization preset (None: as stored; "nf4+emb16": the
    nf4 preset with 16-bit embeddings, the layout transformers loads), made once."""
    from bloomconv.converters.convert import convert
    from bloomconv.errors import DestinationError
    from bloomconv.settings import QuantSettings
    kind, _, extra = (preset or "").partition("+")
    if extra not in EMBEDDING_VARIANTS:
        raise SystemExit(f"preset {preset!r}: the variants are nf4+emb16 and nf4+int8emb (or fp4+…)")
    settings = QuantSettings(kind, embeddings=EMBEDDING_VARIANTS[extra]) if preset else None
    try:
        convert(src, dst, quantization=settings)
    except DestinationError:  # made with other settings (a preset changed): make it again
        shutil.rmtree(dst)
        convert(src, dst, quantization=settings)
    return dst


# ------------------------------------------------------------------------------ sections

def larger_than_memory(args, work: Path) -> dict:
    geometry, limit = args.large_geometry, args.cgroup_limit
    tag = "x".join(map(str, geometry))
    directory = work / f"runtime-large-{tag}"
    if not (directory / "manifest.json").exists():
        src = make_checkpoint(work / f"runtime-large-{tag}-src", geometry)
        converted(src, directory, None)
        shutil.rmtree(src)  # only the converted directory is measured
    files = weight_files(directory)
    model_bytes = sum(p.stat().st_size for p in files)
    startup = startup_rss_anon()
    base = {"kind": "runtime", "dir": str(directory), "dtype": args.large_dtype, "threads": args.threads,
            "vocab": geometry[3], "prompt_tokens": 8, "new_tokens": args.large_tokens, "prefill_tokens": []}
    runs = []
    for budget, batches in [("min", [1]), (args.budgets[0], [1]), (args.budgets[1], args.large_batches)]:
        # this disk's speed drifts by 2x within minutes: measure it next to each run; the bound
        # takes the fastest of cat, O_DIRECT reads and the child's own read pass
        speeds = disk_read_speed(files)
        drop_caches()
        with memory_cgroup(limit, "bloomconv-bench-runtime") as group:
            result = run_child({**base, "ram_budget": budget, "batches": batches}, work, group, series=True)
        r = result["residency"]
        speeds["runtime_read_pass"] = result.get("read_pass_bytes_per_s", 0)
        result["disk_speeds"] = speeds
        result["bound_s_per_token"] = ((model_bytes - r["pinned_bytes"] - r.get("pinned_piece_bytes", 0))
                                       / max(speeds.values()))
        result["memory_bound"] = startup + r["resident_bytes"] + result["kv_cache_bytes"] + 200 * MB
        runs.append(result)
    return {"geometry": geometry, "model_bytes": model_bytes, "cgroup_limit": limit,
            "model_over_limit": model_bytes / limit, "startup_rss_anon": startup, "runs": runs}


def in_memory(args, work: Path) -> dict:
    geometry = args.memory_geometry
    tag = "x".join(map(str, geometry))
    src = make_checkpoint(work / ("bloom-560m-src" if tag == "1024x24x16x250880" else f"runtime-{tag}-src"), geometry)
    dirs = {preset: converted(src, work / f"runtime-{tag}-{preset}", None if preset == "none" else preset)
            for preset in args.presets}
    common = {"threads": args.threads, "vocab": geometry[3], "prompt_tokens": 16,
              "new_tokens": args.decode_tokens, "prefill_tokens": args.prefill_tokens, "batches": args.batches}
    configs = [(f"runtime {p} {dt}", {"kind": "runtime", "dir": str(d), "dtype": dt, "ram_budget": None})
               for p, d in dirs.items() for dt in args.dtypes]
    # fp32 compute, prefill products in fp32 too (where the default's are bf16: else these rows would be
    # the default ones again); decoding is the default's, so batch 1 only
    from bloomconv import kernels
    if args.fp32_prefill and kernels.bf16_dot_products():
        configs += [(f"runtime {p} float32 {FP32_PREFILL_LABEL}",
                     {"kind": "runtime", "dir": str(d), "dtype": "float32", "prefill_dtype": "float32",
                      "ram_budget": None, "batches": [1]})
                    for p, d in dirs.items()]
    if "none" in dirs and args.transformers:
        configs += [(f"transformers {dt}", {"kind": "transformers", "dir": str(dirs["none"]), "dtype": dt})
                    for dt in ("bfloat16", "float32")]
    llama = getattr(args, "llama_cpp", None)
    if llama is not None:
        configs += [(f"llama.cpp {kind}", {"kind": "llama.cpp", "gguf": str(path)})
                    for kind, path in llama_models(llama, src, work, tag, args.presets).items()]
    runs: dict[str, list[dict]] = {label: [] for label, _ in configs}
    for round_ in range(args.repeats):  # round robin: a burst of load from elsewhere hits every config alike
        for label, spec in configs:
            files = [Path(spec["gguf"])] if "gguf" in spec else weight_files(Path(spec["dir"]))
            subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)  # page cache warm
            bandwidth = memory_bandwidth(args.threads)  # next to the run: it drifts
            if spec["kind"] == "llama.cpp":
                run = llama_run(llama, Path(spec["gguf"]), common)
            else:
                run = run_child({**common, **spec}, work, series=round_ == 0)  # spec's batches win
            runs[label].append({**run, "memory_bytes_per_s": bandwidth})
    rows = []
    for label, spec in configs:
        # bytes read per decode step: every weight once (the lm_head is the tied embeddings) in the
        # form multiplied: what the runtime holds in RAM (16-bit widened to fp32 when it fits),
        # transformers' parameters in its dtype, llama.cpp's GGUF file
        if spec["kind"] == "runtime":
            read_per_token = runs[label][0]["residency"]["pinned_bytes"]
        elif spec["kind"] == "llama.cpp":
            read_per_token = Path(spec["gguf"]).stat().st_size
        else:
            stored = sum(p.stat().st_size for p in weight_files(Path(spec["dir"])))
            read_per_token = stored * (2 if spec["dtype"] == "float32" else 1)
        row = _medians(runs[label])
        # tokens/s per sequence over the bound of the bandwidth measured just before that run
        row["percent_of_bound"] = {
            batch: statistics.median(100 * r["decode"][batch]["tokens_per_s"] / int(batch)
                                     / (r["memory_bytes_per_s"] / read_per_token) for r in runs[label])
            for batch in row["decode"]}
        row.update(label=label, runs=runs[label], weight_bytes_per_token=read_per_token)
        rows.append(row)
    bandwidths = [r["memory_bytes_per_s"] for label in runs for r in runs[label]]
    return {"geometry": geometry, "memory_bytes_per_s": bandwidths, "rows": rows,
            "pairs": llama_pairs(runs, args.presets) if llama is not None else []}


# ------------------------------------------------------------------------------ llama.cpp, side by side

# our format -> the llama.cpp formats it is measured against (nf4: the default 4-bit preset; Q4_0 and
# Q4_K_M store the tied output head as Q6_K)
LLAMA_PAIRS = {"none": ("bf16",), "int8": ("Q8_0",), "nf4": ("Q4_0", "Q4_K_M"), "nf4+emb16": ("Q4_0", "Q4_K_M"),
               "nf4+int8emb": ("Q4_0", "Q4_K_M")}
FP32_PREFILL_LABEL = "fp32-prefill"  # label of the runs with prefill_dtype=float32 (--fp32-prefill)


def llama_models(llama, src: Path, work: Path, tag: str, presets: list[str]) -> dict[str, Path]:
    """The GGUF files of the llama.cpp formats paired with `presets`, made from the same checkpoint once."""
    def made(kind: str, make) -> Path:  # under a temporary name first: an interrupted run leaves no GGUF
        path = work / f"runtime-{tag}-{kind}.gguf"
        if not path.exists():
            partial = path.with_suffix(".partial")
            make(partial)
            partial.rename(path)
        return path

    bf16 = made("bf16", lambda out: llama.gguf(src, out, "bf16"))
    return {kind: bf16 if kind == "bf16" else made(kind, lambda out: llama.quantize(bf16, out, kind))
            for kind in (k for preset in presets for k in LLAMA_PAIRS.get(preset, ()))}


def llama_run(llama, gguf: Path, common: dict) -> dict:
    """llama-bench's decode at batch 1 and prefill tokens/s, and llama-batched-bench's decode at the
    larger batches (the same prompt and new tokens as ours, where the tree has it), in the shape of
    `child`'s result."""
    threads = common["threads"]
    decode = {"1": {"tokens_per_s": llama.bench(gguf, 0, common["new_tokens"], threads=threads, repeats=1)}}
    for batch in (b for b in common["batches"] if b > 1):
        speed = llama.batched_decode(gguf, batch, common["prompt_tokens"], common["new_tokens"], threads=threads)
        if speed is not None:
            decode[str(batch)] = {"tokens_per_s": speed}
    return {"decode": decode,
            "prefill": {str(n): {"tokens_per_s": llama.bench(gguf, n, 0, threads=threads, repeats=1)}
                        for n in common["prefill_tokens"]}}


def llama_pairs(runs: dict[str, list[dict]], presets: list[str]) -> list[dict]:
    """Ours ÷ llama.cpp per metric and pair, round by round (the two ran in the same round, next to
    each other), with the median and the spread of those ratios. Ours: fp32 compute with the default
    prefill products ("default": bf16 on CPUs with bf16 dot products; each run records which) and,
    where measured, with fp32 ones (`variant`)."""
    pairs = []
    for preset, kind, variant in ((p, k, v) for p in presets for k in LLAMA_PAIRS.get(p, ())
                                  for v in ("default", FP32_PREFILL_LABEL)):
        ours = runs.get(f"runtime {preset} float32" + ("" if variant == "default" else f" {FP32_PREFILL_LABEL}"))
        theirs = runs.get(f"llama.cpp {kind}")
        if ours and theirs:
            metrics = [("decode", b) for b in theirs[0]["decode"]] + [("prefill", n) for n in theirs[0]["prefill"]]
            for section, key in metrics:
                ratios = [a[section][key]["tokens_per_s"] / b[section][key]["tokens_per_s"]
                          for a, b in zip(ours, theirs) if key in a.get(section, {})]
                if ratios:
                    pairs.append({"ours": preset, "variant": variant, "llama.cpp": kind, "metric": section,
                                  "tokens": int(key), "ratios": ratios, "ratio": measure.spread(ratios)})
    return pairs


# ------------------------------------------------------------------------------ report

def _medians(runs: list[dict]) -> dict:
    """Per-metric medians over repeated child runs of one configuration."""
    row = {key: statistics.median(r[key] for r in runs)
           for key in ("ready_s", "peak_rss", "peak_rss_anon") if key in runs[0]}
    for section in ("decode", "prefill"):
        row[section] = {k: {key: statistics.median(r[section][k][key] for r in runs)
                            for key in runs[0][section][k]} for k in runs[0].get(section, {})}
    return row


def print_report(report: dict) -> None:
    print(f"load average {report['load_before']:.2f} before, {report['load_after']:.2f} after; "
          f"{report['threads']} threads")
    if "large" in report:
        L = report["large"]
        print(f"\nlarger than memory: {gb(L['model_bytes'])} model ({L['geometry']}) in a {gb(L['cgroup_limit'])} "
              f"cgroup = {L['model_over_limit']:.1f}x; {L['runs'][0]['spec']['dtype']} compute")
        print(f"  {'budget':>9} {'pinned':>8} {'disk GB/s':>14} {'batch':>5} {'s/step':>7} {'bound':>7} {'ratio':>5} "
              f"{'tok/s':>6} {'peak RssAnon':>12} {'mem bound':>9}")
        for run in L["runs"]:
            r = run["residency"]
            disk = "/".join(f"{v / 1e9:.2f}" for v in run["disk_speeds"].values())
            for batch, d in run["decode"].items():
                print(f"  {r['budget'] / 1e9:>7.2f}GB {r['pinned_bytes'] / 1e9:>6.2f}GB {disk:>14} {batch:>5} "
                      f"{d['s_per_step']:>7.2f} {run['bound_s_per_token']:>7.2f} "
                      f"{d['s_per_step'] / run['bound_s_per_token']:>5.2f} {d['tokens_per_s']:>6.2f} "
                      f"{gb(run['peak_rss_anon']):>12} {gb(run['memory_bound']):>9}")
        print("  disk: cat / O_DIRECT 16 MB reads (cold, before each run) / the runtime's reader alone (in the "
              "run);\n  bound = (model - pinned) / the fastest; mem bound = start-up RssAnon + pinned + stream "
              "buffers + KV cache + 200 MB")
    if "in_memory" in report:
        M = report["in_memory"]
        bandwidths = sorted(M["memory_bytes_per_s"])
        print(f"\nin page cache: {M['geometry']}; memory bandwidth (torch.sum, 1 GB fp32, before each run) "
              f"min {bandwidths[0] / 1e9:.1f} / median {statistics.median(bandwidths) / 1e9:.1f} / "
              f"max {bandwidths[-1] / 1e9:.1f} GB/s")
        batches = list(M["rows"][0]["decode"])
        head = "".join(f" {'b' + b + ' tok/s':>11} {'% bound':>7}" for b in batches)
        print(f"  {'':22} {'ready s':>7} {'prefill tok/s':>13}{head} {'peak RSS':>9} {'RssAnon':>8}")
        for row in M["rows"]:
            cells = "".join(f" {row['decode'][b]['tokens_per_s']:>11.2f} "
                            f"{row['percent_of_bound'][b]:>6.0f}%" if b in row["decode"] else f" {'-':>11} {'-':>7}"
                            for b in batches)
            prefill = max(row["prefill"].items(), key=lambda kv: int(kv[0]))[1]["tokens_per_s"] if row["prefill"] else 0
            memory = f"{gb(row['peak_rss']):>9} {gb(row['peak_rss_anon']):>8}" if "peak_rss" in row else ""
            print(f"  {row['label']:22} {row.get('ready_s', float('nan')):>7.2f} {prefill:>13.1f}{cells} {memory}")
        print("  % bound: tokens/s per sequence / (memory bandwidth / weight bytes read per token), per run "
              "against the bandwidth measured before it; medians")
        for pair in M["pairs"]:
            r = pair["ratio"]
            print(f"  ours {pair['ours']} ({pair.get('variant', 'fp32')}) vs llama.cpp {pair['llama.cpp']}, "
                  f"{pair['metric']} {pair['tokens']}: "
                  f"{r['median']:.2f}x ({r['min']:.2f}-{r['max']:.2f}, {r['runs']} rounds)")


def parse_geometry(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(","))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--large", action="store_true", help="run the larger-than-memory section (default: both)")
    parser.add_argument("--in-memory", action="store_true", help="run the in-page-cache section (default: both)")
    parser.add_argument("--small", action="store_true", help="tiny sizes, to try the script")
    parser.add_argument("--work", type=Path, default=Path(__file__).parent / "out")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--large-geometry", type=parse_geometry, default=(2048, 48, 16, 16384))
    parser.add_argument("--cgroup-limit", default="1.5GB")
    parser.add_argument("--budgets", default="400MB,800MB",
                        help="the two RAM budgets of --large (all the run allocates: pinned files, stream "
                        "buffers, KV cache, working set); the first run takes the least that runs, \"min\"")
    parser.add_argument("--large-batches", default="1,8,32")
    parser.add_argument("--large-tokens", type=int, default=6, help="new tokens per --large run")
    parser.add_argument("--large-dtype", default="bfloat16", choices=("bfloat16", "float32"),
                        help="compute dtype of --large (float32 converts each streamed bf16 matrix)")
    parser.add_argument("--memory-geometry", type=parse_geometry, default=(1024, 24, 16, 250880))
    parser.add_argument("--presets", default="none,int8,nf4",
                        help="none (as stored), int8, nf4, fp4 (the presets: 4-bit blocks, int8 embeddings), "
                             "nf4+emb16 (16-bit embeddings, as transformers loads)")
    parser.add_argument("--batches", default="1,16", help="decode batch sizes of --in-memory")
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--prefill-tokens", default="128,512", help="prompt lengths of the prefill runs")
    parser.add_argument("--llama-cpp", action="store_true", help="--in-memory: also llama.cpp side by side, "
                        "when bench/llamacpp.py finds a build (bf16, Q8_0, Q4_0, Q4_K_M)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each --in-memory configuration (medians)")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="--in-memory: the runtime's compute dtypes")
    parser.add_argument("--fp32-prefill", action="store_true", help="--in-memory: also each preset with fp32 "
                        "compute and prefill_dtype=float32 (prefill and batch-1 decode; the default multiplies "
                        "prefills in bf16 on CPUs with bf16 dot products)")
    parser.add_argument("--no-transformers", dest="transformers", action="store_false",
                        help="--in-memory: leave transformers' rows out")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.child_out.write_text(json.dumps(child(json.loads(args.child))))
        return
    if args.small:
        args.large_geometry, args.cgroup_limit, args.budgets = (512, 16, 8, 4096), "1GB", "20MB,100MB"
        args.memory_geometry, args.prefill_tokens, args.decode_tokens = (256, 4, 8, 4096), "64", 6
    from bloomconv.runtime import parse_size
    args.budgets = [parse_size(b) for b in args.budgets.split(",")]
    args.cgroup_limit = parse_size(args.cgroup_limit)
    args.large_batches = [int(b) for b in args.large_batches.split(",")]
    args.batches = [int(b) for b in args.batches.split(",")]
    args.prefill_tokens = [int(n) for n in args.prefill_tokens.split(",")]
    if args.llama_cpp:
        import llamacpp
        args.llama_cpp = llamacpp.find()
        if args.llama_cpp is None:
            print(f"no llama.cpp build found (bench/llamacpp.py build, or ${llamacpp.ENV_TREE}): its rows are left out")
    args.presets = args.presets.split(",")
    args.dtypes = args.dtypes.split(",")
    both = not args.large and not args.in_memory
    args.work.mkdir(parents=True, exist_ok=True)

    report = {"load_before": load_average(), "threads": args.threads}
    if args.large or both:
        report["large"] = larger_than_memory(args, args.work)
    if args.in_memory or both:
        report["in_memory"] = in_memory(args, args.work)
    report["load_after"] = load_average()
    (args.work / "runtime.json").write_text(json.dumps(report, indent=1))
    print_report(report)


if __name__ == "__main__":
    main()
