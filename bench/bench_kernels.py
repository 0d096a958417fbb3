"""Speed of bloomconv's CPU kernels against the other ways to multiply by the same matrix, in one run.

    python bench/bench_kernels.py [--repeats 10] [--threads 2] [--json bench/out/kernels.json]

For each shape (the tied lm_head of bloom-560m, 250880×1024, then 4096×1024 and 1024×4096) and
batch (1 and 16), with `--threads` torch threads, times (median of `--repeats`, methods taken in
turn within each repeat so a burst of load from other jobs hits them all alike):

    nf4 kernel       bloomconv.kernels.fourbit.fourbit_matmul, nf4, block 64 (bitsandbytes' default),
                     quantized from bf16 weights as BLOOM's are (so each weight is rounded to bf16)
    nf4 preset       the same for what `quantize --bits 4` stores: its block size (32) and double-
                     quantized absmax (transformers' bnb_4bit_use_double_quant)
    nf4 preset avx2  the same on the AVX2 code (where the CPU has AVX-512, which runs by default)
    nf4 preset int8x the preset with int8 activations (x rounded to int8 per 32 values; where the
                     CPU has AVX512-VNNI, batch 1: what a decoding step of 1-3 sequences runs)
    dequant+linear   F.linear(x, dequantize_4bit(stored).float()): the runtime's old 4-bit path
    fp32 linear      F.linear on the fp32 matrix
    bf16 linear      F.linear on the bf16 matrix, bf16 x
    int8pack bf16    torch._weight_int8pack_mm: int8 matrix, bf16 x and per-row scales
    int8 kernel      bloomconv.kernels.dense.dense_matmul on the int8 matrix + row scales, fp32 x
    bf16 kernel      the same on the bf16 matrix (fp32 x: what the runtime does for fp32 compute)

GB/s counts the bytes of each method's own weight (packed bytes + absmax for 4-bit) read once per
call; "% BW" relates it to the memory bandwidth measured in the same run (torch.sum over a 1 GB
fp32 tensor, before and after the timings; the larger is used).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bloomconv import kernels
from bloomconv.format import QuantType
from bloomconv.kernels import dense, fourbit
from bloomconv.settings import PRESETS
from bloomconv.storage.fourbit import NF4Storage, dequantize_4bit, quantize_4bit

SHAPES = ((250880, 1024), (4096, 1024), (1024, 4096))
BATCHES = (1, 16)


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def memory_bandwidth(repeats: int = 7) -> float:
    """GB/s of torch.sum over 1 GB of fp32 (median)."""
    data = torch.ones(1 << 28, dtype=torch.float32)
    data.sum()
    return data.numel() * 4 / statistics.median(seconds(data.sum) for _ in range(repeats)) / 1e9


def methods(rows: int, cols: int, batch: int) -> dict[str, tuple[object, int]]:
    """name -> (call, bytes of weight it reads)."""
    g = torch.Generator().manual_seed(0)
    weight_bf16 = torch.randn(rows, cols, generator=g).to(torch.bfloat16)  # BLOOM ships bf16 weights
    weight = weight_bf16.float()
    x = torch.randn(batch, cols, generator=g)
    x_bf16 = x.to(torch.bfloat16)
    stored = quantize_4bit(weight_bf16, "nf4", block_size=64)
    preset = PRESETS[QuantType.NF4]
    stored_dq = quantize_4bit(weight_bf16, "nf4", block_size=preset["block_size"], double_quant=preset["double_quant"])
    matrix, matrix_dq = NF4Storage.decode_mapping(stored).matrix, NF4Storage.decode_mapping(stored_dq).matrix
    four_bit = sum(t.numel() * t.element_size() for k, t in stored.items() if k in ("weight", "weight.absmax"))
    four_bit_dq = sum(t.numel() * t.element_size() for k, t in stored_dq.items()
                      if k in ("weight", "weight.absmax", "weight.nested_absmax"))
    scale = weight.abs().amax(dim=1) / 127
    weight_int8 = torch.round(weight / scale[:, None]).to(torch.int8)
    scale_bf16 = scale.to(torch.bfloat16)
    out = {}
    if kernels.available():
        out["nf4 kernel"] = (lambda: fourbit.fourbit_matmul(x, matrix), four_bit)
        out["nf4 preset"] = (lambda: fourbit.fourbit_matmul(x, matrix_dq), four_bit_dq)
        if "avx512" in kernels.isas():  # the AVX-512 code against the AVX2 code it replaces for batches
            out["nf4 preset avx2"] = (lambda: fourbit.fourbit_matmul(x, matrix_dq, isa="avx2"), four_bit_dq)
        if fourbit.takes_int8_activations(batch, matrix_dq):
            out["nf4 preset int8x"] = (lambda: fourbit.fourbit_matmul(x, matrix_dq, int8_activations=True),
                                       four_bit_dq)
    out["dequant+linear"] = (lambda: F.linear(x, dequantize_4bit(stored).to(x.dtype)), four_bit)
    out["fp32 linear"] = (lambda: F.linear(x, weight), weight.numel() * 4)
    out["bf16 linear"] = (lambda: F.linear(x_bf16, weight_bf16), weight.numel() * 2)
    if hasattr(torch, "_weight_int8pack_mm") and cols % 16 == 0:
        out["int8pack bf16"] = (lambda: torch._weight_int8pack_mm(x_bf16, weight_int8, scale_bf16), weight.numel())
    if kernels.available():
        out["int8 kernel"] = (lambda: dense.dense_matmul(x, weight_int8, scale), weight.numel())
        out["bf16 kernel"] = (lambda: dense.dense_matmul(x, weight_bf16), weight.numel() * 2)
    return out


def run(repeats: int, threads: int, shapes=SHAPES, batches=BATCHES) -> dict:
    torch.set_num_threads(threads)
    bandwidth_before = memory_bandwidth()
    results = []
    for rows, cols in shapes:
        for batch in batches:
            calls = methods(rows, cols, batch)
            for call, _ in calls.values():
                call()  # warm up: first-touch pages, oneDNN primitives
            times = {name: [] for name in calls}
            for _ in range(repeats):
                for name, (call, _) in calls.items():
                    times[name].append(seconds(call))
            for name, (_, nbytes) in calls.items():
                ms = statistics.median(times[name]) * 1e3
                results.append({"shape": [rows, cols], "batch": batch, "method": name, "ms": ms,
                                "weight_bytes": nbytes, "gb_per_s": nbytes / ms / 1e6})
                print(f"  {rows}x{cols} batch {batch:2d} {name:15s} {ms:9.3f} ms", file=sys.stderr, flush=True)
            del calls
    bandwidth_after = memory_bandwidth()
    bandwidth = max(bandwidth_before, bandwidth_after)
    for r in results:
        r["percent_of_bandwidth"] = 100 * r["gb_per_s"] / bandwidth
    return {"threads": threads, "repeats": repeats, "isa": kernels.isas()[:1],
            "bandwidth_gb_per_s": [bandwidth_before, bandwidth_after], "results": results}


def table(report: dict) -> str:
    before, after = report["bandwidth_gb_per_s"]
    lines = [f"memory bandwidth (torch.sum, 1 GB fp32): {before:.1f} GB/s before, {after:.1f} GB/s after; "
             f"{report['threads']} threads, median of {report['repeats']}, kernel isa {report['isa']}",
             "",
             "| shape | batch | method | ms | GB/s of weight | % BW | vs fp32 linear |",
             "|---|---|---|---|---|---|---|"]
    fp32 = {(tuple(r["shape"]), r["batch"]): r["ms"] for r in report["results"] if r["method"] == "fp32 linear"}
    for r in report["results"]:
        speedup = fp32[(tuple(r["shape"]), r["batch"])] / r["ms"]
        lines.append(f"| {r['shape'][0]}×{r['shape'][1]} | {r['batch']} | {r['method']} | {r['ms']:.3f} | "
                     f"{r['gb_per_s']:.2f} | {r['percent_of_bandwidth']:.0f}% | {speedup:.2f}× |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    report = run(args.repeats, args.threads)
    print(table(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
