"""A model over 1, 2 and 3 pipeline ranks on this machine against the single-process runtime, the
cost of one hop at BLOOM-176B's hidden size, and what that makes of BLOOM-176B on N machines.

    python bench/bench_pipeline.py [--work bench/out/pipeline] [--small]

Every measurement runs in fresh processes (this script with --child), the ranks started as
torchrun starts them (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), gloo over 127.0.0.1:
  - per-rank peak RssAnon (sampled every 10 ms from before `load` to the end) for 1, 2, 3 ranks,
    and for the single-process runtime;
  - decode tokens/s at batch 1 (median step), and prefill and decode tokens/s of a batch of
    prompts in one micro-batch and in one per rank, against the single process in the same run.
    The ranks share this machine's cores: each process computes on `--threads` threads (default 1:
    on a shared 2-core machine, OpenMP threads that wait for a busy core make timings erratic);
  - one hop: a header and the hidden states of one token, (1, 1, 14336) fp32 and bf16, sent to
    the other rank and back through the pipeline's own ring, HOP_ROUND_TRIPS round trips; a hop
    is half the median round trip (and of the fastest; loopback: a lower bound for a network);
  - memory bandwidth: torch.sum over 1 GB of fp32 (the median of 5).
Then BLOOM-176B on N machines of 16 GB, batch 1: latency per token = the weight bytes read per
token × the seconds per byte + N hops (N − 1 between stages and one back to rank 0 for the
lm_head), at the measured memory bandwidth and at the runtime's own rate on the 176B slice
(`--int8-rate`, `--nf4-rate`: GB/s, from bench_176b's pinned 16 GB runs in the README); and
with micro-batches in flight keeping every stage busy, one micro-batch step per slowest stage
(an equal share of the bytes at the runtime's rate). `--report-only WORK/pipeline.json` reprints.
Writes WORK/pipeline.json and prints the tables (Markdown) for the README.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_runtime import memory_bandwidth

from bloomconv.format import dtype_name

PROMPT = "def fibonacci(n):\n    "
BATCH_PROMPTS = ["import os", "class Tree:", "def add(a, b):", "for i in range(10):", "The list of",
                 "while True:", "print(", "return"]
LARGE_BATCH = 64        # sequences: each micro-batch of 2 or 3 keeps more than MICRO_BATCH_ROWS
LARGE_BATCH_TOKENS = 8
HOP_HIDDEN = 14336  # BLOOM-176B
HOP_ROUND_TRIPS = 1000
BLOOM_176B = {"int8": 176e9, "nf4": 95e9}  # bytes read per token: the directories' weights (README)
MACHINE_BUDGET = 14.1e9  # the runtime's default budget on a 16 GB machine (README, bench_176b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("bench/out/pipeline"))
    parser.add_argument("--small", action="store_true", help="tiny sizes, to try the script")
    parser.add_argument("--geometry", default="1024,24,16,16384", help="hidden,layers,heads,vocab (bf16 weights)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1, help="run everything N times round robin; medians")
    parser.add_argument("--threads", type=int, default=1,
                        help="compute threads of each process, the single one's too (0: cores ÷ ranks)")
    parser.add_argument("--int8-rate", type=float, default=8.53 / 0.30,
                        help="GB/s the runtime reads int8 BLOOM-176B weights at, pinned (README: 8.53 GB, 0.30 s)")
    parser.add_argument("--nf4-rate", type=float, default=9.70 / 0.54,
                        help="the same for nf4 (README: 9.70 GB, 0.54 s)")
    parser.add_argument("--report-only", type=Path, help="print the tables of a finished run's pipeline.json")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    rates = {"int8": args.int8_rate, "nf4": args.nf4_rate}
    if args.child:
        return child(args.child)
    if args.report_only:
        results = json.loads(args.report_only.read_text())
        results["projection"] = projection(results, rates)
        return print(report(results))
    geometry = "64,6,4,512" if args.small else args.geometry
    tokens = 4 if args.small else args.new_tokens
    args.work.mkdir(parents=True, exist_ok=True)
    directory = model_directory(args.work, geometry)
    cores = os.cpu_count() or 1
    runs = []
    for _ in range(args.repeats):  # round robin: the machine's load drifts
        run = {"single": run_ranks(directory, args.work, 0, tokens, args.threads or cores)}
        for ranks in (1, 2, 3):
            run[f"ranks{ranks}"] = run_ranks(directory, args.work, ranks, tokens,
                                             args.threads or max(1, cores // ranks))
        run["hop"] = run_ranks(None, args.work, 2, HOP_ROUND_TRIPS, 1, kind="hop")
        run["bandwidth_gbs"] = memory_bandwidth(cores) / 1e9
        runs.append(run)
    results = {"geometry": geometry, "cores": cores, "new_tokens": tokens, "repeats": args.repeats,
               "model_bytes": sum(f.stat().st_size for f in directory.glob("*.safetensors")), **median_of(runs)}
    results["projection"] = projection(results, rates)
    (args.work / "pipeline.json").write_text(json.dumps(results, indent=1))
    print(report(results))


def median_of(runs: list):
    """The runs' median, figure by figure (the runs have the same structure)."""
    if isinstance(runs[0], dict):
        return {key: median_of([run[key] for run in runs]) for key in runs[0]}
    if isinstance(runs[0], list):
        return runs[0]
    return statistics.median(runs)


def model_directory(work: Path, geometry: str) -> Path:
    """A converted random model of `geometry` (bf16), reused when already there."""
    import torch

    from bloomconv.converters.convert import convert
    from bloomconv.converters.example import write_example_checkpoint
    directory = work / f"model-{geometry.replace(',', '-')}"
    if not (directory / "manifest.json").exists():
        write_example_checkpoint(work / "src", geometry, dtype=torch.bfloat16)
        convert(work / "src", directory)
    return directory


def run_ranks(directory: Path | None, work: Path, ranks: int, tokens: int, threads: int, kind: str = "model") -> dict:
    """Run `ranks` processes (0: the single-process runtime) and gather what each wrote."""
    out = work / f"{kind}-{ranks}"
    out.mkdir(exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    processes = []
    for rank in range(max(ranks, 1)):
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        if ranks:
            env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                       WORLD_SIZE=str(ranks))
        processes.append(subprocess.Popen([sys.executable, __file__, "--child", kind, str(directory), str(out),
                                           str(tokens), str(threads)], env=env))
    for process in processes:
        if process.wait() != 0:
            raise SystemExit(f"a {kind} child exited {process.returncode}")
    return {f"rank{r}": json.loads((out / f"rank{r}.json").read_text()) for r in range(max(ranks, 1))}


def child(argv: list[str]) -> None:
    kind, directory, out, tokens, threads = argv[0], argv[1], Path(argv[2]), int(argv[3]), int(argv[4])
    from bloomconv.process_stats import PeakRssAnon
    watch = PeakRssAnon()
    rank = int(os.environ.get("RANK", 0))
    figures = hop(tokens) if kind == "hop" else measure(directory, tokens, threads)
    figures["peak_rss_anon"] = watch.stop()
    (out / f"rank{rank}.json").write_text(json.dumps(figures))


def measure(directory: str, tokens: int, threads: int) -> dict:
    """Rank 0 (or the single process): batch-1 decode, a batch in one micro-batch and in one per
    rank; the other ranks serve. Each configuration is one `load` in the same process group."""
    import torch.distributed as dist

    import bloomconv
    from bloomconv.runtime import GenerationStats
    from bloomconv.runtime.pipeline import PipelineOptions
    ranks = int(os.environ.get("WORLD_SIZE", 0))
    if ranks:
        dist.init_process_group("gloo")
    figures: dict = {"threads": threads}
    for micro_batches in sorted({1, max(ranks, 1)}):
        pipeline = PipelineOptions(micro_batches=micro_batches) if ranks else False
        model = bloomconv.load(directory, pipeline=pipeline, threads=threads, max_tokens=512)
        if model is None:
            continue
        with model:
            model.checkpoint.wait_until_loaded()
            model.generate(PROMPT, 2)  # warm-up
            if micro_batches == 1:
                steps = []
                for _ in range(3):
                    stats = GenerationStats()
                    model.generate_ids(*model.encode([PROMPT]), max_new_tokens=tokens, stats=stats)
                    steps.append(stats.decode_seconds / max(stats.steps - 1, 1))
                figures["batch1_tokens_per_s"] = 1 / statistics.median(steps)
            for prompts, new in ((BATCH_PROMPTS, tokens), (BATCH_PROMPTS * (LARGE_BATCH // len(BATCH_PROMPTS)),
                                                           min(tokens, LARGE_BATCH_TOKENS))):
                stats = GenerationStats()
                model.generate_ids(*model.encode(prompts), max_new_tokens=new, stats=stats)
                figures[f"batch{len(prompts)}_micro{micro_batches}"] = {
                    "prefill_tokens_per_s": stats.prefill_tokens_per_s,
                    "decode_tokens_per_s": stats.decode_tokens_per_s}
            figures["stages"] = [[s.layers.start, s.layers.stop, s.nbytes] for s in getattr(model, "stages", [])]
    if ranks:
        dist.destroy_process_group()
    return figures


def hop(round_trips: int) -> dict:
    """Rank 0 sends a pass's header and one token's hidden states to rank 1, which sends them back."""
    import torch
    import torch.distributed as dist

    from bloomconv.runtime.pipeline import WORK, PipelineOptions, _Header, _Ring
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    figures = {}
    for dtype in (torch.float32, torch.bfloat16):
        ring = _Ring(rank, 2, torch.device("cpu"), str, PipelineOptions())
        header = _Header(WORK, 1, 0, 1, 1, 0, 1)
        x = torch.randn(1, 1, HOP_HIDDEN).to(dtype)
        times = []
        for _ in range(round_trips):
            start = time.perf_counter()
            if rank == 0:
                ring.send(header, x)
                ring.flush()
                ring.receive_header(60)
                ring.receive(((1, 1, HOP_HIDDEN), dtype))
            else:
                ring.receive_header(60)
                (back,) = ring.receive(((1, 1, HOP_HIDDEN), dtype))
                ring.send(header, back)
                ring.flush()
            times.append(time.perf_counter() - start)
        figures[dtype_name(dtype)] = {"hop_us": statistics.median(times[10:]) / 2 * 1e6,
                                      "fastest_hop_us": min(times) / 2 * 1e6,
                                      "bytes": x.numel() * x.element_size()}
    dist.destroy_process_group()
    return figures


def projection(results: dict, rates: dict[str, float]) -> list[dict]:
    """BLOOM-176B, batch 1, on N machines of 16 GB: from the least N whose budgets hold the weights."""
    hop_s = results["hop"]["rank0"]["float32"]["hop_us"] / 1e6
    rows = []
    for name, nbytes in BLOOM_176B.items():
        fits = math.ceil(nbytes / MACHINE_BUDGET)
        for machines in (fits, fits + 2, 2 * fits):
            hops = machines * hop_s
            rows.append({"weights": name, "machines": machines, "per_machine_gb": nbytes / machines / 1e9,
                         "at_bandwidth_s": nbytes / (results["bandwidth_gbs"] * 1e9) + hops,
                         "at_runtime_rate_s": nbytes / (rates[name] * 1e9) + hops, "hops_s": hops,
                         "runtime_rate_gbs": rates[name],
                         # every stage busy: one micro-batch step leaves the slowest (an equal share) per stage time
                         "in_flight_steps_per_s": rates[name] * 1e9 / (nbytes / machines)})
    return rows


def report(results: dict) -> str:
    gb = lambda n: f"{n / 1e9:.2f} GB"  # noqa: E731
    single = results["single"]["rank0"]
    lines = [f"Model {results['geometry']} (hidden, blocks, heads, vocab; bf16 weights, "
             f"{results['model_bytes'] / 1e6:,.0f} MB), fp32 compute, {results['new_tokens']} new tokens, "
             f"{results['cores']} cores shared by the ranks; medians of {results['repeats']} runs.", "",
             "| run | threads per rank | peak RssAnon per rank | batch 1 decode tokens/s | "
             + " | ".join(f"batch {b}, {how}: prefill / decode tokens/s" for b in (len(BATCH_PROMPTS), LARGE_BATCH)
                          for how in ("one micro-batch", "one micro-batch per rank")) + " |",
             "|---|---|---|---|---|---|---|---|"]
    for key, label in (("single", "single process"), ("ranks1", "1 rank"), ("ranks2", "2 ranks"),
                       ("ranks3", "3 ranks")):
        run = results[key]
        zero = run["rank0"]
        rss = " / ".join(gb(r["peak_rss_anon"]) for r in run.values())
        ratio = zero["batch1_tokens_per_s"] / single["batch1_tokens_per_s"]
        cells = []
        for batch in (len(BATCH_PROMPTS), LARGE_BATCH):
            for per_rank in (False, True):
                figures = zero[f"batch{batch}_micro{len(run) if per_rank else 1}"] if len(run) > per_rank else None
                cells.append(f"{figures['prefill_tokens_per_s']:.0f} / {figures['decode_tokens_per_s']:.1f}"
                             if figures else "-")
        lines.append(f"| {label} | {zero['threads']:g} | {rss} | {zero['batch1_tokens_per_s']:.1f} ({ratio:.2f}×) | "
                     + " | ".join(cells) + " |")
    hop = results["hop"]["rank0"]
    lines += ["", f"One hop over loopback (header + hidden states of one token at hidden {HOP_HIDDEN}, round trip "
              f"÷ 2, median (fastest) of {HOP_ROUND_TRIPS}): fp32 {hop['float32']['bytes'] / 1e3:.0f} kB "
              f"{hop['float32']['hop_us']:.0f} µs ({hop['float32']['fastest_hop_us']:.0f} µs), bf16 "
              f"{hop['bfloat16']['bytes'] / 1e3:.0f} kB {hop['bfloat16']['hop_us']:.0f} µs "
              f"({hop['bfloat16']['fastest_hop_us']:.0f} µs). "
              f"Memory bandwidth (torch.sum over 1 GB fp32): {results['bandwidth_gbs']:.1f} GB/s.", "",
              "| BLOOM-176B, batch 1 | machines of 16 GB | weights per machine | s/token at memory bandwidth "
              "| s/token at the runtime's rate | of which hops | micro-batch steps/s, every stage busy |",
              "|---|---|---|---|---|---|---|"]
    for row in results["projection"]:
        lines.append(f"| {row['weights']} | {row['machines']} | {row['per_machine_gb']:.1f} GB | "
                     f"{row['at_bandwidth_s']:.2f} | {row['at_runtime_rate_s']:.2f} "
                     f"({row['runtime_rate_gbs']:.1f} GB/s) | {row['hops_s'] * 1e3:.2f} ms | "
                     f"{row['in_flight_steps_per_s']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
