"""Quantization quality over a set of evaluation models: perplexity, KL divergence, top-1, bits per weight.

    python bench/quality_models.py --out /work/quality-models     # the models, once (cached)
    python bench/bench_quality.py --models /work/quality-models   # a few minutes: the main schemes
    python bench/bench_quality.py --models /work/quality-models --full --out bench/out/quality-full
    python bench/bench_quality.py --schemes nf4-b32-dq nf4-b64-dq-gptq --only fixture man-prose \
        --cache /work/quality-models/measurements   # a subset; the cache resumes and merges runs

Every model under --models (bench/quality_models.py writes them: trained BLOOMs with train.txt and
heldout.txt, random ones with outlier channels) is converted unquantized once, then quantized by
every scheme with `bloomconv.quantize`, and each result is scored with `bloomconv.evaluation`
against the unquantized conversion on the model's held-out text (llama-perplexity's protocol and
its `--kl-divergence` statistics): perplexity (trained models only), mean KL divergence of the
next-token distribution from the unquantized one, top-1 agreement; bits per weight is every
stored tensor's bytes x 8 / the model's parameter count; reconstruction error is the relative RMS
||W - deq(q(W))|| / ||W|| of each quantized tensor. Calibrated methods calibrate on the model's
train.txt, never its held-out text.

Reported per model and across models (mean and worst case), as markdown and JSON, with the check
that chooses the 4-bit default: no worse than bitsandbytes' NF4 at block 64 on every model.
"""
from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import math
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import bloomconv
from bloomconv.errors import BloomconvError
from bloomconv.evaluation import compare, perplexity, tokens_of
from bloomconv.format import QuantType
from bloomconv.settings import PRESETS, QuantSettings
from bloomconv.storage import dequantize_directory

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import jsonable  # noqa: E402
from quality_models import HELDOUT_TEXT, RECORD, TRAIN_TEXT, evaluation_models  # noqa: E402
import llamacpp  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BASELINE = "nf4-b64"   # bitsandbytes' NF4 as its users run it: block 64, no double quant, bf16 embeddings
UNQUANTIZED = "bf16"
DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I8": 1, "U8": 1, "I16": 2, "I32": 4, "I64": 8}
INT8_PPL_LIMIT_PCT = 0.05   # issue 12: int8 stays within +0.05 % perplexity
CALIBRATION_TOKENS = 16384
LLAMA_CPP_KINDS = ("Q8_0", "Q4_0", "Q4_K_M")
GGUF_BLOCK_MATRICES = r"blk\.\d+\.(attn_qkv|attn_output|ffn_up|ffn_down)\.weight"  # the blocks' 4 linears
LLAMA_CPP = "llama.cpp "  # prefix of llama.cpp's rows: compared, never candidates for a preset
# suffix of a scheme evaluated with the runtime's prefill_dtype=bfloat16: the same files, another way of
# running them (so never a candidate for a preset either); "bf16+bf16-prefill" is the unquantized model
BF16_PREFILL = "+bf16-prefill"


@dataclass(frozen=True)
class Scheme:
    """One way of storing a model: keyword arguments of `bloomconv.quantize` (none: plain convert)."""
    name: str
    options: dict = field(default_factory=dict)

    @property
    def calibrated(self) -> bool:
        return self.options.get("method") == "gptq"


def scheme(bits: int, quant_type: str | None = None, block_size: int | None = None, double_quant: bool | None = None,
           embeddings: bool | str | None = None, method: str = "rtn") -> Scheme:
    """The scheme of these options, named after what it stores: nf4-b64-dq+emb-search (+emb8: 4-bit
    blocks, int8 embeddings)."""
    if bits == 8:
        options = {"bits": 8, "embeddings": embeddings}
        name = "int8" + ("+emb" if embeddings else "")
    else:
        embeddings = embeddings or False  # named after what it stores: no suffix, 16-bit embeddings
        options = {"bits": 4, "quant_type": quant_type, "block_size": block_size, "double_quant": double_quant,
                   "embeddings": embeddings}
        name = (f"{quant_type}-b{block_size}" + ("-dq" if double_quant else "")
                + ("+emb8" if embeddings == "int8" else "+emb" if embeddings else ""))
    if method != "rtn":
        options["method"] = method
        name += f"-{method}"
    return Scheme(name, options)


def with_bf16_prefill(s: Scheme | None) -> Scheme:
    """`s` (None: the unquantized conversion) evaluated with prefill_dtype=torch.bfloat16."""
    return (Scheme(UNQUANTIZED + BF16_PREFILL, {"prefill_dtype": "bfloat16"}) if s is None
            else Scheme(s.name + BF16_PREFILL, {**s.options, "prefill_dtype": "bfloat16"}))


def available_methods() -> tuple[str, ...]:
    """Rounding methods `bloomconv.quantize` accepts in this checkout: rtn, and search and gptq
    once it takes `method` (and, for gptq, `calibrate`)."""
    parameters = inspect.signature(bloomconv.quantize).parameters
    if "method" not in parameters:
        return ("rtn",)
    from bloomconv.settings import METHODS
    return tuple(m for m in METHODS if m != "gptq" or "calibrate" in parameters)


def schemes(full: bool, methods: tuple[str, ...]) -> list[Scheme]:
    """The main schemes (presets and the bitsandbytes baseline) or, with `full`, every combination
    (the searched and calibrated ones with bf16 embeddings only)."""
    if not full:  # a few minutes: the presets and the baseline, rounded to nearest
        return [scheme(8, embeddings=True), scheme(4, "nf4", 64, False, False),
                *(scheme(4, kind.value, PRESETS[kind]["block_size"], PRESETS[kind]["double_quant"], False)
                  for kind in (QuantType.NF4, QuantType.FP4))]
    out = [scheme(8, embeddings=embeddings) for embeddings in (True, False)]
    out += [scheme(4, quant_type, block, dq, embeddings)
            for quant_type in ("nf4", "fp4") for block in (32, 64, 128) for dq in (False, True)
            for embeddings in (False, True, "int8")]
    out += [with_bf16_prefill(None), *(with_bf16_prefill(s) for s in out if is_preset(s))]
    for method in methods:
        if method == "rtn":
            continue
        out += [scheme(4, quant_type, block, dq, False, method)
                for quant_type in ("nf4", "fp4") for block in (32, 64, 128) for dq in (False, True)]
        if method == "gptq":
            out.append(scheme(8, embeddings=True, method=method))
    return out


def is_preset(s: Scheme) -> bool:
    """Whether `s` stores what `bloomconv quantize --bits N` stores with no other option, and is
    run as the runtime runs by default."""
    o = s.options
    if "bits" not in o or "prefill_dtype" in o:
        return False
    kind = "int8" if o["bits"] == 8 else o["quant_type"]
    preset = QuantSettings(kind)
    return (o.get("method", "rtn") == "rtn" and o.get("embeddings") == preset.embeddings
            and (o["bits"] == 8 or (o["block_size"] == preset.block_size and o["double_quant"] == preset.double_quant)))


# ------------------------------------------------------------------------------------- measuring

def stored_bytes(manifest) -> int:
    """Bytes of every tensor the directory stores (weights, their quantization state, the rest)."""
    return sum(math.prod(t.shape) * DTYPE_BYTES[t.dtype] for f in manifest.files for t in f.tensors)


def parameter_count(manifest) -> int:
    """Parameters of an unquantized conversion: every stored element."""
    return sum(math.prod(t.shape) for f in manifest.files for t in f.tensors)


def quantized_bits_per_weight(manifest, reference_manifest) -> float:
    """Bits per weight of the quantized tensors alone (their codes and quantization state)."""
    quantized = [t for f in manifest.files for t in f.tensors if t.quant.value != "none"]
    weights = {t.name for t in quantized}
    count = sum(math.prod(t.shape) for f in reference_manifest.files for t in f.tensors if t.name in weights)
    if not count:  # nothing quantized: the unquantized model run another way
        return 8 * stored_bytes(manifest) / parameter_count(manifest)
    return 8 * sum(math.prod(t.shape) * DTYPE_BYTES[t.dtype] for t in quantized) / count


def reconstruction(reference: dict[str, torch.Tensor], directory: Path, manifest) -> dict:
    """Relative RMS error of each quantized tensor against the unquantized conversion: mean and worst."""
    quantized = {t.name for f in manifest.files for t in f.tensors if t.quant.value != "none"}
    decoded = dequantize_directory(directory)
    errors = [((decoded[name] - w).pow(2).mean().sqrt() / w.pow(2).mean().sqrt()).item()
              for name, w in reference.items() if name in quantized]
    if not errors:  # nothing quantized
        return {"rel_rms_mean": 0.0, "rel_rms_max": 0.0, "tensors": 0}
    return {"rel_rms_mean": statistics.mean(errors), "rel_rms_max": max(errors), "tensors": len(errors)}


def measure_model(name: str, directory: Path, kind: str, schemes_: list[Scheme], work: Path, ctx: int,
                  chars: int | None, threads: int = 1, calibration_tokens: int | None = None,
                  cache: Path | None = None, log=print) -> dict:
    """Every scheme of one model: convert, quantize, compare with the unquantized conversion.

    With `cache` (a JSON file), a scheme measured before on the same model, text and protocol is
    read back instead of measured again, and each new measurement is added to it as it is made."""
    text = (directory / HELDOUT_TEXT).read_text(encoding="utf-8")[:chars]
    setup = {"model": _digest((directory / RECORD).read_bytes()), "text": _digest(text.encode()), "ctx": ctx,
             "calibration_tokens": calibration_tokens, "bloomconv": bloomconv.__version__}
    known = json.loads(cache.read_text()) if cache is not None and cache.exists() else {}
    if known.get("setup") != setup:
        known = {"setup": setup, "schemes": {}, "model": None}
    todo = [s for s in schemes_ if known["schemes"].get(s.name, {}).get("options") != jsonable(s.options)]
    if todo:
        _measure(name, directory, todo, work, ctx, text, threads, calibration_tokens, known, cache, log)
    return {"kind": kind, **known["model"],
            "schemes": {UNQUANTIZED: known["model"]["unquantized"],
                        **{s.name: known["schemes"][s.name]["row"] for s in schemes_}}}


def _measure(name, directory, schemes_, work, ctx, text, threads, calibration_tokens, known, cache, log) -> None:
    from bloomconv.runtime import load
    reference_dir = work / f"{name}-{UNQUANTIZED}"
    reference_manifest = bloomconv.convert(directory, reference_dir)
    parameters = parameter_count(reference_manifest)
    reference_weights = dequantize_directory(reference_dir)
    model_row = {"parameters": parameters, "text_characters": len(text), "ctx": ctx,
                 "unquantized": {"bits_per_weight": 8 * stored_bytes(reference_manifest) / parameters,
                                 "stored_bytes": stored_bytes(reference_manifest)}}
    # every product in fp32 (the runtime's default takes bf16 products for prefills on some CPUs): the
    # reference, and the schemes but for the "+bf16-prefill" ones, so a row measures its quantization
    with load(reference_dir, threads=threads, max_tokens=ctx, prefill_dtype=torch.float32) as reference:
        token_ids = tokens_of(reference, text)
        base = perplexity(reference, token_ids, ctx)
        model_row["tokens_scored"] = base.tokens_scored
        model_row["unquantized"].update(perplexity=base.value, perplexity_stderr=base.stderr)
        known["model"] = model_row
        for s in schemes_:
            target = work / f"{name}-{s.name}"
            options = dict(s.options)
            running = {"prefill_dtype": getattr(torch, options.pop("prefill_dtype", "float32"))}
            if s.calibrated:
                options.update(calibrate=directory / TRAIN_TEXT, calibration_tokens=calibration_tokens)
            started = time.monotonic()
            try:
                manifest = (bloomconv.quantize(directory, target, **options) if options
                            else bloomconv.convert(directory, target))
            except BloomconvError as exc:  # a scheme this geometry cannot take: recorded, not fatal
                known["schemes"][s.name] = {"options": jsonable(s.options), "row": {"refused": str(exc)}}
                log(f"{name:14} {s.name:24} refused: {exc}")
                _save(known, cache)
                continue
            seconds = time.monotonic() - started
            with load(target, threads=threads, max_tokens=ctx, **running) as model:
                c = compare(model, reference, token_ids, ctx)
            row = {"bits_per_weight": 8 * stored_bytes(manifest) / parameters, "stored_bytes": stored_bytes(manifest),
                   "quantized_bits_per_weight": quantized_bits_per_weight(manifest, reference_manifest),
                   "perplexity": c.perplexity.value, "perplexity_stderr": c.perplexity.stderr,
                   "perplexity_delta_pct": 100 * (c.perplexity.value / c.reference_perplexity.value - 1),
                   "kl_mean": c.kl_mean, "kl_stderr": c.kl_stderr, "kl_max": c.kl_max,
                   "top1_agreement": c.top1_agreement, "top1_stderr": c.top1_stderr,
                   **reconstruction(reference_weights, target, manifest), "quantize_seconds": round(seconds, 2)}
            known["schemes"][s.name] = {"options": jsonable(s.options), "row": row}
            _save(known, cache)
            log(f"{name:14} {s.name:24} bpw {row['bits_per_weight']:6.3f}  ppl {row['perplexity']:9.3f} "
                f"({row['perplexity_delta_pct']:+7.3f} %)  KL {row['kl_mean']:.5f}  "
                f"top1 {row['top1_agreement']:6.2f} %  "
                f"relRMS max {row['rel_rms_max']:.4f}  {seconds:.0f} s")
            _remove(target)
    _remove(reference_dir)


def measure_llama_cpp(llama: "llamacpp.LlamaCpp", directory: Path, model: dict, work: Path, ctx: int,
                      chars: int | None, threads: int, log=print) -> dict[str, dict]:
    """llama.cpp's quantizations of one model, scored by llama-perplexity on the text and windows
    bloomconv's rows use; bits per weight from the GGUF's tensor bytes (metadata left out)."""
    work.mkdir(parents=True, exist_ok=True)
    text = work / "text.txt"
    text.write_text((directory / HELDOUT_TEXT).read_text(encoding="utf-8")[:chars], encoding="utf-8")
    base = llama.gguf(directory, work / "bf16.gguf")
    reference = llama.perplexity(base, text, ctx, threads, save_logits=work / "bf16.kld")["perplexity"][0]
    rows = {}
    for kind in LLAMA_CPP_KINDS:
        quantized = llama.quantize(base, work / f"{kind}.gguf", kind, threads)
        figures = llama.perplexity(quantized, text, ctx, threads, kl_base=work / "bf16.kld")
        sizes = llama.tensor_sizes(quantized)
        blocks = [size for name, size in sizes.items() if re.fullmatch(GGUF_BLOCK_MATRICES, name)]
        row = {"bits_per_weight": 8 * sum(nbytes for _, nbytes in sizes.values()) / model["parameters"],
               "quantized_bits_per_weight": 8 * sum(b for _, b in blocks) / sum(n for n, _ in blocks),
               "perplexity": figures["perplexity"][0], "perplexity_stderr": figures["perplexity"][1],
               "perplexity_delta_pct": 100 * (figures["perplexity"][0] / reference - 1),
               "kl_mean": figures["kl_mean"][0], "kl_stderr": figures["kl_mean"][1],
               "top1_agreement": figures["top1_agreement"][0], "top1_stderr": figures["top1_agreement"][1]}
        rows[LLAMA_CPP + kind] = row
        log(f"{directory.name:14} {LLAMA_CPP + kind:24} bpw {row['bits_per_weight']:6.3f}  ppl {row['perplexity']:9.3f} "
            f"({row['perplexity_delta_pct']:+7.3f} %)  KL {row['kl_mean']:.5f}  top1 {row['top1_agreement']:6.2f} %")
    return rows


def _save(known: dict, cache: Path | None) -> None:
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.with_suffix(".tmp").write_text(json.dumps(known, indent=1))
        cache.with_suffix(".tmp").replace(cache)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _remove(directory: Path) -> None:
    import shutil
    shutil.rmtree(directory, ignore_errors=True)


# ------------------------------------------------------------------------------------- reporting

METRICS = (  # key, worst-case direction, only meaningful on trained models
    ("bits_per_weight", max, False),
    ("quantized_bits_per_weight", max, False),
    ("perplexity_delta_pct", max, True),
    ("kl_mean", max, False),
    ("top1_agreement", min, False),
    ("rel_rms_max", max, False),
)


def aggregate(models: dict[str, dict]) -> dict[str, dict]:
    """Per scheme: mean and worst case of each metric across the models it applies to."""
    names = [n for n in next(iter(models.values()))["schemes"] if n != UNQUANTIZED]
    out = {}
    for scheme_name in names:
        row = {}
        for key, worst, trained_only in METRICS:
            values = [m["schemes"][scheme_name][key] for m in models.values()
                      if key in m["schemes"].get(scheme_name, {}) and (m["kind"] == "trained" or not trained_only)]
            if values:
                row[f"{key}_mean"] = statistics.mean(values)
                row[f"{key}_worst"] = worst(values)
                row[f"{key}_models"] = len(values)
        out[scheme_name] = row
    return out


def choose_defaults(models: dict[str, dict], aggregated: dict[str, dict],
                    calibrated: frozenset[str] = frozenset()) -> dict:
    """The 4-bit schemes no worse than BASELINE on every model, smallest first; and whether each
    int8 scheme stays within INT8_PPL_LIMIT_PCT of the unquantized perplexity on every trained model.

    "No worse" is judged on the mean KL divergence from the unquantized model, not on perplexity:
    rounding errors can lower a perplexity by chance, while KL measures the departure itself. A
    preset cannot need calibration text, so the `calibrated` schemes are chosen among separately."""
    def no_worse(name: str, model: dict) -> bool:  # a scheme the model's geometry refuses fails on it
        row = model["schemes"][name]
        return "kl_mean" in row and row["kl_mean"] <= model["schemes"][BASELINE]["kl_mean"]

    candidates = []
    for name, agg in aggregated.items():
        if name.startswith(("int8", LLAMA_CPP)) or name.endswith(BF16_PREFILL) or BASELINE not in aggregated:
            continue
        failing = [m for m, model in models.items() if not no_worse(name, model)]
        ratio = max(m["schemes"][name].get("kl_mean", math.inf) / m["schemes"][BASELINE]["kl_mean"]
                    for m in models.values())
        candidates.append({"scheme": name, "passes": not failing, "fails_on": failing,
                           "bits_per_weight_mean": agg["bits_per_weight_mean"], "kl_mean_worst": agg["kl_mean_worst"],
                           "kl_ratio_to_baseline_worst": ratio})
    candidates.sort(key=lambda c: (not c["passes"], c["bits_per_weight_mean"]))
    int8 = {name: {"perplexity_delta_pct_worst": agg.get("perplexity_delta_pct_worst"),
                   "within_limit": agg.get("perplexity_delta_pct_worst", math.inf) <= INT8_PPL_LIMIT_PCT}
            for name, agg in aggregated.items() if name.startswith("int8") and not name.endswith(BF16_PREFILL)}
    passing = [c["scheme"] for c in candidates if c["passes"] and c["scheme"] not in calibrated]
    passing_calibrated = [c["scheme"] for c in candidates if c["passes"] and c["scheme"] in calibrated]
    return {"baseline": BASELINE, "four_bit_candidates": candidates, "four_bit_choice": passing[0] if passing else None,
            "four_bit_choice_calibrated": passing_calibrated[0] if passing_calibrated else None,
            "int8": int8, "int8_limit_pct": INT8_PPL_LIMIT_PCT}


def _f(value, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def markdown(report: dict) -> str:
    lines = [f"# Quantization quality ({len(report['models'])} models, ctx {report['ctx']})", "",
             f"Command: `{report['command']}`", "",
             "## Across models (mean / worst)", "",
             "| scheme | bits/weight | bits/quantized weight | Δppl % mean | Δppl % worst | KL mean | KL worst "
             "| top-1 % mean | top-1 % worst | rel RMS worst |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, a in sorted(report["aggregate"].items(), key=lambda kv: kv[1]["bits_per_weight_mean"]):
        mark = " (preset)" if name in report["presets"] else ""
        if a["kl_mean_models"] < len(report["models"]):
            mark += f" ({a['kl_mean_models']} models: refused by the others)"
        lines.append(f"| {name}{mark} | {a['bits_per_weight_mean']:.3f} | {a['quantized_bits_per_weight_mean']:.3f} "
                     f"| {_f(a.get('perplexity_delta_pct_mean'), '+.3f')} "
                     f"| {_f(a.get('perplexity_delta_pct_worst'), '+.3f')} | {a['kl_mean_mean']:.5f} "
                     f"| {a['kl_mean_worst']:.5f} | {a['top1_agreement_mean']:.2f} | {a['top1_agreement_worst']:.2f} "
                     f"| {_f(a.get('rel_rms_max_worst'), '.4f')} |")
    d = report["defaults"]
    lines += ["", f"## 4-bit schemes no worse than {d['baseline']} on every model (mean KL divergence)", "",
              "| scheme | bits/weight mean | KL ÷ baseline KL, worst model | passes | fails on |",
              "|---|---:|---:|---|---|"]
    lines += [f"| {c['scheme']} | {c['bits_per_weight_mean']:.3f} | {c['kl_ratio_to_baseline_worst']:.3f} "
              f"| {'yes' if c['passes'] else 'no'} | {', '.join(c['fails_on'])} |" for c in d["four_bit_candidates"]]
    lines += ["", f"Smallest passing without calibration text: **{d['four_bit_choice']}**; with it: "
                  f"**{d['four_bit_choice_calibrated']}**.", ""]
    lines += [f"- {name}: worst Δppl {_f(v['perplexity_delta_pct_worst'], '+.3f')} % "
              f"({'within' if v['within_limit'] else 'outside'} +{d['int8_limit_pct']} %)"
              for name, v in d["int8"].items()]
    for model, m in report["models"].items():
        lines += ["", f"## {model} ({m['kind']}, {m['parameters']:,} parameters, {m['text_characters']:,} characters "
                      "of held-out text)", "",
                  "| scheme | bits/weight | perplexity | Δppl % | KL mean | top-1 % | rel RMS mean | rel RMS worst |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        trained = m["kind"] == "trained"
        for name, r in m["schemes"].items():
            if "refused" in r:
                lines.append(f"| {name} | refused: {r['refused']} |||||||")
                continue
            lines.append(f"| {name} | {r['bits_per_weight']:.3f} | {_f(r['perplexity'] if trained else None, '.3f')} "
                         f"| {_f(r.get('perplexity_delta_pct') if trained else None, '+.3f')} "
                         f"| {_f(r.get('kl_mean'), '.5f')} | {_f(r.get('top1_agreement'), '.2f')} "
                         f"| {_f(r.get('rel_rms_mean'), '.4f')} | {_f(r.get('rel_rms_max'), '.4f')} |")
    return "\n".join(lines) + "\n"


def run(models_dir: Path, full: bool = False, ctx: int = 128, chars: int | None = None,
        only: list[str] | None = None, threads: int = 1, command: str = "", log=print,
        chosen: list[Scheme] | None = None, calibration_tokens: int | None = None,
        cache: Path | None = None, llama: "llamacpp.LlamaCpp | None" = None) -> dict:
    """Measure every scheme (`chosen`, by default `schemes(full, ...)`) on every model under
    `models_dir`; the report as a dict. `cache`: a folder of measurements to reuse and extend.
    `llama`: a llama.cpp build whose Q8_0/Q4_0/Q4_K_M rows join each model's (same text and ctx;
    KL against llama.cpp's own bf16 GGUF of the same weights)."""
    torch.set_grad_enabled(False)
    methods = available_methods()
    chosen = schemes(full, methods) if chosen is None else chosen
    if BASELINE not in {s.name for s in chosen}:
        raise SystemExit(f"the schemes must include the baseline {BASELINE}: the defaults are judged against it")
    models = {}
    with tempfile.TemporaryDirectory(prefix="bench-quality-") as tmp:
        for name, directory, record in evaluation_models(models_dir):
            if only and name not in only:
                continue
            models[name] = measure_model(name, directory, record["kind"], chosen, Path(tmp), ctx, chars, threads,
                                         calibration_tokens, cache and cache / f"{name}.json", log)
            if llama is not None:
                models[name]["schemes"].update(measure_llama_cpp(llama, directory, models[name], Path(tmp) / name,
                                                                 ctx, chars, threads, log))
    if not models:
        raise SystemExit(f"no evaluation model under {models_dir}: run bench/quality_models.py --out {models_dir}")
    aggregated = aggregate(models)
    return {"command": command, "ctx": ctx, "methods": list(methods), "torch": torch.__version__,
            "presets": [s.name for s in chosen if is_preset(s)], "models": models, "aggregate": aggregated,
            "defaults": choose_defaults(models, aggregated, frozenset(s.name for s in chosen if s.calibrated))}


def _llama_cpp() -> "llamacpp.LlamaCpp":
    found = llamacpp.find()
    if found is None:
        raise SystemExit(f"--llama-cpp: no llama.cpp build; run `python bench/llamacpp.py build` or set "
                         f"${llamacpp.ENV_TREE}")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=Path("/work/quality-models"))
    parser.add_argument("--full", action="store_true",
                        help="every scheme, search and gptq included (default: presets and the baseline)")
    parser.add_argument("--ctx", type=int, default=128, help="window of the perplexity protocol")
    parser.add_argument("--chars", type=int, default=None,
                        help="score only the first CHARS characters of each held-out text (default: "
                             "20,000, all with --full)")
    parser.add_argument("--only", nargs="*", help="names of the models to run (default: all)")
    parser.add_argument("--schemes", nargs="*", help="run only these schemes (names as in the report; the "
                        f"baseline {BASELINE} is always run)")
    parser.add_argument("--calibration-tokens", type=int, default=CALIBRATION_TOKENS,
                        help=f"gptq: calibration tokens (default {CALIBRATION_TOKENS:,}: a quarter of the library's, "
                        "to fit a CPU run)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--llama-cpp", action="store_true",
                        help="add llama.cpp's Q8_0, Q4_0 and Q4_K_M (bench/llamacpp.py; a build must be found)")
    parser.add_argument("--cache", type=Path, help="folder of per-model measurements to reuse and extend "
                        "(runs on different --only models may share it; keyed on model, text, ctx and options, "
                        "not on bloomconv's code: use a new folder after changing a quantizer; default: none)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "quality",
                        help="writes OUT.json and OUT.md")
    args = parser.parse_args()
    chars = args.chars if args.chars is not None else (None if args.full else 20_000)
    chosen = schemes(args.full or bool(args.schemes), available_methods())
    if args.schemes:
        unknown = set(args.schemes) - {s.name for s in chosen}
        if unknown:
            raise SystemExit(f"unknown schemes {sorted(unknown)}; known: {' '.join(s.name for s in chosen)}")
        chosen = [s for s in chosen if s.name in args.schemes or s.name == BASELINE]
    report = run(args.models, args.full, args.ctx, chars, args.only, args.threads,
                 command=" ".join(["python", *sys.argv]), chosen=chosen, calibration_tokens=args.calibration_tokens,
                 cache=args.cache, llama=_llama_cpp() if args.llama_cpp else None)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    text = markdown(report)
    args.out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
