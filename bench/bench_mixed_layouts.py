"""What storing some of a block's linears int8 next to the 4-bit preset would buy in quality.

    python bench/bench_mixed_layouts.py --models /work/quality-models [--chars 20000] [--ctx 128]

llama.cpp's Q4_K_M keeps a few tensors at more bits (attn_v and half of ffn_down at 6). bloomconv's
formats are per tensor: NF4 (the preset: block 32, double quant) or LLM.int8(). This measures, on
every model under --models (bench/quality_models.py builds them), the KL divergence from the
unquantized model of the preset and of layouts with some linears int8 instead, by the quality
benchmark's protocol (the first --chars of heldout.txt, windows of --ctx tokens, second half
scored, mean KL(unquantized || layout) per token, as `bench_quality.py` reports it): each layout's
weights are quantized with bloomconv's own quantizers, dequantized, and swapped into transformers'
fp32 BLOOM, the tied embeddings int8 in every layout (as the preset stores them). So it answers
"which tensors, and how many bits" before any layout is built into the converter; the preset's
row reproduces bench_quality's figure for it. Bits per block weight count the stored bytes of the
four linears (codes, absmax and nested state, or int8 codes and row scales).
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from transformers import BloomForCausalLM, PreTrainedTokenizerFast

from bloomconv.evaluation import tokens_of
from bloomconv.storage.fourbit import dequantize_4bit, quantize_4bit
from bloomconv.storage.int8 import dequantize_int8, quantize_int8

LINEARS = ("self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
QKV, DENSE, H_TO_4H, FOUR_H_TO_H = LINEARS
LAYOUTS = {  # name: the linears stored int8; the rest NF4 as the preset stores them
    "nf4 preset": (),
    "+ attention out int8": (DENSE,),
    "+ dense_h_to_4h int8": (H_TO_4H,),
    "+ dense_4h_to_h int8": (FOUR_H_TO_H,),
    "+ qkv int8": (QKV,),
    "+ qkv, attention out int8": (QKV, DENSE),
    "+ qkv, dense_4h_to_h int8": (QKV, FOUR_H_TO_H),
}
EMBEDDINGS = "transformer.word_embeddings.weight"


def quantized(weight: torch.Tensor, kind: str) -> tuple[torch.Tensor, int]:
    """(the weight as `kind` stores and decodes it, fp32; its stored bytes)."""
    weight = weight.to(torch.bfloat16)  # BLOOM's dtype, what quantize reads
    if kind == "int8":
        CB, SCB = quantize_int8(weight)
        return dequantize_int8(CB, SCB, torch.float32), CB.numel() + SCB.numel() * 4
    stored = quantize_4bit(weight, "nf4", block_size=32, double_quant=True)
    return dequantize_4bit(stored).float(), sum(t.numel() * t.element_size() for t in stored.values())


def scored_log_probs(model, ids: torch.Tensor, ctx: int) -> torch.Tensor:
    """Log-probabilities of the positions predicting each window's second half."""
    out = []
    for start in range(0, ids.numel() - ctx + 1, ctx):
        with torch.inference_mode():
            logits = model(ids[start:start + ctx][None]).logits[0, ctx // 2:ctx - 1].float()
        out.append(torch.log_softmax(logits, -1))
    return torch.cat(out)


def measure(directory: Path, chars: int, ctx: int) -> dict[str, dict[str, float]]:
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(directory / "tokenizer.json"))
    ids = tokens_of(tokenizer, (directory / "heldout.txt").read_text(encoding="utf-8")[:chars])
    model = BloomForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    reference = scored_log_probs(model, ids, ctx)
    original = {key: value.clone() for key, value in model.state_dict().items()}
    weights = model.state_dict()
    cache: dict[tuple[str, str], tuple[torch.Tensor, int]] = {}

    def stored(key: str, kind: str) -> tuple[torch.Tensor, int]:
        if (key, kind) not in cache:
            cache[key, kind] = quantized(original[key], kind)
        return cache[key, kind]

    results = {}
    with torch.no_grad():
        weights[EMBEDDINGS].copy_(stored(EMBEDDINGS, "int8")[0])
        for name, int8_linears in LAYOUTS.items():
            nbytes = elements = 0
            for layer in range(model.config.n_layer):
                for linear in LINEARS:
                    key = f"transformer.h.{layer}.{linear}.weight"
                    value, size = stored(key, "int8" if linear in int8_linears else "nf4")
                    weights[key].copy_(value)
                    nbytes, elements = nbytes + size, elements + value.numel()
            log_probs = scored_log_probs(model, ids, ctx)
            kl = (reference.exp() * (reference - log_probs)).sum(-1)
            results[name] = {"kl_mean": kl.mean().item(), "bits_per_block_weight": 8 * nbytes / elements}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=Path("/work/quality-models"))
    parser.add_argument("--chars", type=int, default=20_000)
    parser.add_argument("--ctx", type=int, default=128)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    sources = sorted(p for p in args.models.iterdir() if (p / "heldout.txt").exists() and (p / "config.json").exists())
    report = {}
    for source in sources:
        report[source.name] = measure(source, args.chars, args.ctx)
        print(source.name, "  ".join(f"{name}: {r['kl_mean']:.5f}" for name, r in report[source.name].items()),
              flush=True)
    print(f"\n{'layout':28} {'bits/block weight':>17} {'KL mean':>9} {'KL worst':>9}")
    for name in LAYOUTS:
        rows = [schemes[name] for schemes in report.values()]
        kls = [r["kl_mean"] for r in rows]
        bits = statistics.mean(r["bits_per_block_weight"] for r in rows)
        print(f"{name:28} {bits:17.2f} {statistics.mean(kls):9.5f} {max(kls):9.5f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
