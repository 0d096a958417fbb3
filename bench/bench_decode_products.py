"""What a decoding step's fast products cost in quality: KL divergence, top-1 agreement.

    python bench/quality_models.py --out /work/quality-models --only fixture example outliers-x4 outliers-x8 outliers-x16
    python bench/bench_decode_products.py --models /work/quality-models [--work DIR] [--batch 16] [--tokens 128]

By default (`Transformer.products_dtype`) a decoding step of 4 to 64 sequences multiplies in bf16
where the CPU has AMX tiles (x rounded to bf16, weights exact, fp32 sums: `--batch 16` measures
that), and a step of 1 to 3 multiplies 4-bit weights by int8 activations where it has AVX512-VNNI
(x rounded to int8 per 32 values: `--batch 3` measures that; the other schemes keep fp32 products
there, so their KL is 0). For each model under
--models (unquantized, the int8 preset, the nf4 preset, each made once under --work) this loads the
directory twice, as it runs by default and with prefill_dtype=torch.float32 (fp32 products
throughout), and feeds both `--batch` windows of the model's held-out text one token per step from
an empty cache (teacher forcing: every position is a decoding step of `--batch` rows). Per scheme:
the mean and largest KL(fp32 products || default) per token, how often both put the same token
first, and, for scale, the scheme's own KL in fp32 products from the unquantized model run the
same way — the quantization error the products' rounding adds to.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

import bloomconv
from bloomconv import kernels

sys.path.insert(0, str(Path(__file__).parent))
from bench_runtime import converted  # noqa: E402

SCHEMES = {"bf16": None, "int8 preset": "int8", "nf4 preset": "nf4"}  # name: bench_runtime's preset


def step_logits(model, windows: torch.Tensor) -> torch.Tensor:
    """(batch, tokens, vocab) log-probabilities, each position computed in a decoding step."""
    past, out = None, []
    for t in range(windows.shape[1]):
        logits, past = model.forward(windows[:, t:t + 1], past=past)
        out.append(torch.log_softmax(logits[:, -1].float(), -1))
    return torch.stack(out, 1)


def kl(reference: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """KL(reference || other) per position, from log-probabilities."""
    return (reference.exp() * (reference - other)).sum(-1)


def measure(source: Path, work: Path, batch: int, tokens: int) -> dict:
    ids = None
    results, unquantized = {}, None
    for name, preset in SCHEMES.items():
        directory = converted(source, work / f"{source.name}-{preset or 'bf16'}", preset)
        with bloomconv.load(directory) as default, bloomconv.load(directory, prefill_dtype=torch.float32) as exact:
            if ids is None:
                text = (source / "heldout.txt").read_text()
                flat = torch.tensor(exact.tokenizer(text)[:batch * tokens])
                if flat.numel() < batch * tokens:
                    raise SystemExit(f"{source}: held-out text has {flat.numel()} tokens, fewer than {batch * tokens}")
                ids = flat.reshape(batch, tokens)
            ours, reference = step_logits(default, ids), step_logits(exact, ids)
        if unquantized is None:
            unquantized = reference
        added = kl(reference, ours)
        results[name] = {"kl_mean": added.mean().item(), "kl_max": added.max().item(),
                         "top1_same_pct": 100 * (ours.argmax(-1) == reference.argmax(-1)).float().mean().item(),
                         "scheme_kl_mean": kl(unquantized, reference).mean().item()}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=Path("/work/quality-models"))
    parser.add_argument("--work", type=Path, default=Path("/work/decode-products"))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    on_tiles = args.batch >= kernels.BF16_TILE_ROWS
    fast, available = (("bf16 products", kernels.bf16_tiles()) if on_tiles else
                       ("int8 activations for 4-bit weights", kernels.int8_dot_products()))
    if not available:
        sys.exit(f"this CPU (or OS) has no AMX-BF16 tiles or no AVX512-VNNI: decoding steps of {args.batch} "
                 "sequences keep fp32 products here, nothing to measure")
    args.work.mkdir(parents=True, exist_ok=True)
    sources = sorted(p for p in args.models.iterdir() if (p / "heldout.txt").exists() and (p / "config.json").exists())
    report = {p.name: measure(p, args.work, args.batch, args.tokens) for p in sources}
    print(f"decoding steps of {args.batch} sequences ({args.tokens} tokens each, one per step): "
          f"the default ({fast}) against fp32 products")
    print(f"{'model':14} {'scheme':12} {'KL mean':>10} {'KL max':>10} {'top-1 same':>11} {'scheme KL':>11} {'added':>7}")
    for model, schemes in report.items():
        for scheme, r in schemes.items():
            share = f"{100 * r['kl_mean'] / r['scheme_kl_mean']:.1f} %" if r["scheme_kl_mean"] > 0 else "-"
            print(f"{model:14} {scheme:12} {r['kl_mean']:10.2e} {r['kl_max']:10.2e} {r['top1_same_pct']:10.2f}% "
                  f"{r['scheme_kl_mean']:11.2e} {share:>7}")
    for scheme in SCHEMES:
        means = [schemes[scheme]["kl_mean"] for schemes in report.values()]
        print(f"{'all models':14} {scheme:12} mean KL {statistics.mean(means):.2e}, worst {max(means):.2e}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
