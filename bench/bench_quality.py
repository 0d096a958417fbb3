"""Quantization quality on the trained fixture: perplexity and per-tensor reconstruction error.

    python bench/bench_quality.py [--fixture ../shared/fixtures/bloom-tiny-trained]

Perplexity follows llama.cpp's `perplexity` protocol so figures compare with its Q8_0/Q4_0:
the held-out text is tokenized once, cut into non-overlapping 128-token windows, and in each
window only the second half is scored (positions 64..126 predicting 65..127, 63 tokens). No BOS
is inserted (BLOOM's tokenizer adds none). Logits come from `transformers.BloomForCausalLM`
loaded with the dequantized weights in fp32 (and from the bloomconv runtime when --runtime).

Reconstruction error: relative RMS ||W - deq(q(W))|| / ||W|| per quantized tensor, ours vs the
same scheme run through `bitsandbytes.functional` directly; the two must be identical.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import torch

from bloomconv.converters.convert import convert
from bloomconv.format import QuantType
from bloomconv.settings import QuantSettings
from bloomconv.storage import dequantize_directory

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_FIXTURE = ROOT.parent / "shared" / "fixtures" / "bloom-tiny-trained"
WINDOW = 128


def schemes() -> dict[str, QuantSettings | None]:
    out: dict[str, QuantSettings | None] = {"bf16 (unquantized)": None}
    for embeddings in (False, True):
        tag = " +emb" if embeddings else ""
        out[f"int8{tag}"] = QuantSettings(QuantType.INT8, embeddings=embeddings, int8_scale_from="float16")
        for quant_type in (QuantType.NF4, QuantType.FP4):
            for block in (32, 64, 128):
                out[f"{quant_type.value}-b{block}{tag}"] = QuantSettings(quant_type, block, False, embeddings)
        for block in (64, 128):
            out[f"nf4-b{block}-dq{tag}"] = QuantSettings(QuantType.NF4, block, True, embeddings)
    return out


def window_batches(token_ids: list[int], batch: int = 32):
    n_windows = len(token_ids) // WINDOW
    ids = torch.tensor(token_ids[: n_windows * WINDOW]).view(n_windows, WINDOW)
    for start in range(0, n_windows, batch):
        yield ids[start:start + batch]


def perplexity(logits_fn, token_ids: list[int]) -> float:
    """llama.cpp protocol: mean NLL over the second half of each 128-token window."""
    nll, count = 0.0, 0
    first = WINDOW // 2
    for ids in window_batches(token_ids):
        logits = logits_fn(ids).float()                                   # (B, T, V)
        logprobs = torch.log_softmax(logits[:, first:WINDOW - 1], dim=-1)  # (B, 63, V)
        targets = ids[:, first + 1:WINDOW]                                 # (B, 63)
        nll -= logprobs.gather(-1, targets.unsqueeze(-1)).sum().item()
        count += targets.numel()
    return math.exp(nll / count)


def transformers_model(directory: Path):
    from transformers import BloomConfig, BloomForCausalLM
    state = {k: v.float() for k, v in dequantize_directory(directory).items()}
    config = BloomConfig.from_json_file(directory / "config.json")
    config.quantization_config = None
    model = BloomForCausalLM(config).float().eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise SystemExit(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    return model


def reconstruction_errors(fixture: Path) -> dict[str, dict]:
    """Relative RMS error per scheme over the fixture's block weights, ours vs bitsandbytes."""
    import bitsandbytes.functional as F

    from bloomconv.converters.source import ShardCache, open_source
    from bloomconv.format import is_quantized_weight
    from bloomconv.storage.fourbit import dequantize_4bit, quantize_4bit
    from bloomconv.storage.int8 import dequantize_int8, quantize_int8
    source = open_source(fixture)
    shards = ShardCache(source.root)
    weights = {n: shards.get(m) for n, m in source.tensors.items() if is_quantized_weight(n, False)}

    def rel_rms(w, deq):
        return ((w.float() - deq.float()).pow(2).mean().sqrt() / w.float().pow(2).mean().sqrt()).item()

    out = {}
    configs = [("int8", None, False)] + [(t, b, False) for t in ("nf4", "fp4") for b in (32, 64, 128)] \
        + [("nf4", 64, True), ("nf4", 128, True)]
    for kind, block, dq in configs:
        ours, theirs = [], []
        for w in weights.values():
            if kind == "int8":
                ours.append(rel_rms(w, dequantize_int8(*quantize_int8(w, "float16"), w.dtype)))
                CB, SCB, _ = F.int8_vectorwise_quant(w.half(), threshold=0.0)
                theirs.append(rel_rms(w, F.int8_vectorwise_dequant(CB, SCB).to(w.dtype)))
            else:
                ours.append(rel_rms(w, dequantize_4bit(quantize_4bit(w, QuantType(kind), block, dq))))
                packed, state = F.quantize_4bit(w, blocksize=block, quant_type=kind, compress_statistics=dq)
                theirs.append(rel_rms(w, F.dequantize_4bit(packed, state)))
        name = kind if kind == "int8" else f"{kind}-b{block}" + ("-dq" if dq else "")
        out[name] = {"tensors": len(ours), "mean_rel_rms": sum(ours) / len(ours), "max_rel_rms": max(ours),
                     "max_abs_diff_vs_bitsandbytes": max(abs(a - b) for a, b in zip(ours, theirs))}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fixture", type=Path, default=DEFAULT_FIXTURE)
    parser.add_argument("--runtime", action="store_true", help="also score with the bloomconv runtime")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "quality.json")
    args = parser.parse_args()
    from tokenizers import Tokenizer
    tokenizer = Tokenizer.from_file(str(args.fixture / "tokenizer.json"))
    token_ids = tokenizer.encode((args.fixture / "heldout.txt").read_text(encoding="utf-8")).ids
    torch.set_grad_enabled(False)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, settings in schemes().items():
            directory = Path(tmp) / name.replace(" ", "_")
            manifest = convert(args.fixture, directory, quantization=settings)
            size = sum(f.size for f in manifest.files if f.tensors)
            model = transformers_model(directory)
            row = {"ppl": perplexity(lambda ids: model(ids).logits, token_ids), "weight_bytes": size}
            if args.runtime:
                from bloomconv.runtime import load
                with load(directory) as runtime_model:
                    row["ppl_runtime"] = perplexity(lambda ids: runtime_model.forward(ids)[0], token_ids)
            results[name] = row
            print(f"{name:22} ppl {row['ppl']:8.3f}" + (f"  runtime {row['ppl_runtime']:8.3f}" if args.runtime else "")
                  + f"  weights {size / 1e6:6.2f} MB", flush=True)
    base = results["bf16 (unquantized)"]
    print(f"\n{len(token_ids)} tokens, {len(token_ids) // WINDOW} windows of {WINDOW}, "
          f"{(len(token_ids) // WINDOW) * (WINDOW // 2 - 1)} scored")
    print(f"{'scheme':22} {'ppl':>8} {'vs bf16':>9} {'weights':>9} {'vs bf16':>8}")
    for name, row in results.items():
        print(f"{name:22} {row['ppl']:8.3f} {100 * (row['ppl'] / base['ppl'] - 1):+8.3f}% "
              f"{row['weight_bytes'] / 1e6:7.2f}MB {row['weight_bytes'] / base['weight_bytes']:8.3f}")
    errors = reconstruction_errors(args.fixture)
    print(f"\n{'scheme':14} {'mean rel RMS':>12} {'max rel RMS':>12}  |ours - bitsandbytes| (max over tensors)")
    for name, row in errors.items():
        print(f"{name:14} {row['mean_rel_rms']:12.5f} {row['max_rel_rms']:12.5f}  {row['max_abs_diff_vs_bitsandbytes']:.1e}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"tokens": len(token_ids), "results": results,
                                    "reconstruction": errors}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
