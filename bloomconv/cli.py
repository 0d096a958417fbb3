"""The `bloomconv` command: a thin layer of click over the library.

Every command parses its arguments and calls one library function; `_errors_to_exit_codes` is
the one place that turns exceptions into messages and exit codes.
"""
from __future__ import annotations

import contextlib
import functools
import json
import sys
import time
import warnings

import click

from .errors import BloomconvError, VerificationError, exit_code
from .progress import terminal_progress


def _errors_to_exit_codes(command):
    """Exit codes from `errors.EXIT_CODES`: 0 ok; 1 verification found problems; 2 bad input,
    unusable manifest, or anything else bloomconv refused (message on stderr, one line plus details;
    with `--json`, {"error", "message", "exit_code"} on stdout instead)."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except BloomconvError as exc:
            if kwargs.get("as_json"):
                click.echo(json.dumps({"error": type(exc).__name__, "message": str(exc),
                                       "exit_code": exit_code(exc)}, indent=1))
            else:
                click.echo(f"bloomconv: error: {exc}", err=True)
            sys.exit(exit_code(exc))
        except KeyboardInterrupt:
            click.echo("bloomconv: interrupted; re-run the same command to resume", err=True)
            sys.exit(130)
    return wrapper


def _say(message: str) -> None:
    """The library's `log` messages (e.g. "resuming: …"), on stderr beside the progress bars."""
    click.echo(message, err=True)


quiet_option = click.option("--quiet", "-q", is_flag=True, help="No progress bars.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="bloomconv")
def main():
    """Convert, quantize, verify and run BLOOM checkpoints."""


def sign_options(command):
    """--sign-key, --sign-certificate, --sign-chain: sign DST as the last step (convert, quantize)."""
    command = click.option("--sign-chain", multiple=True, type=click.Path(dir_okay=False),
                           help="With --sign-certificate: a certificate of the chain up to the root (repeatable).")(command)
    command = click.option("--sign-certificate", type=click.Path(dir_okay=False),
                           help="With --sign-key: the key's certificate, for PKI (see `bloomconv sign`).")(command)
    return click.option("--sign-key", type=click.Path(dir_okay=False),
                        help="Sign DST with this elliptic-curve private key (PEM) once it is written: model.sig, "
                        "which `bloomconv verify --public-key` and `model_signing verify` check.")(command)


def _signing_key(sign_key, sign_certificate, sign_chain):
    from .signing import SigningKey
    if sign_key is None:
        if sign_certificate or sign_chain:
            raise click.UsageError("--sign-certificate and --sign-chain go with --sign-key")
        return None
    return SigningKey(sign_key, sign_certificate, tuple(sign_chain))


@main.command()
@click.argument("src", type=click.Path(file_okay=False))
@click.argument("dst", type=click.Path(file_okay=False))
@sign_options
@quiet_option
@_errors_to_exit_codes
def convert(src, dst, sign_key, sign_certificate, sign_chain, quiet):
    """Reshard SRC into DST: one safetensors file per block, values unchanged, with a manifest.

    Re-run the same command after an interruption to resume."""
    from .converters.convert import convert as run
    started = time.monotonic()
    manifest = run(src, dst, signing=_signing_key(sign_key, sign_certificate, sign_chain),
                   progress=terminal_progress("convert", disable=quiet), log=_say)
    click.echo(f"{dst}: {_summary(manifest, started)}")


def _summary(manifest, started: float) -> str:
    """The last line of convert and quantize: what was written, against the source, and how fast."""
    written, read = sum(f.size for f in manifest.files), sum(f.size for f in manifest.source_files)
    return (f"{len(manifest.files)} files, {written:,} bytes ({written / read:.3f} of the source's {read:,}) "
            f"in {time.monotonic() - started:.1f} s")


@main.command()
@click.argument("src", type=click.Path(file_okay=False))
@click.argument("dst", type=click.Path(file_okay=False))
@click.option("--bits", type=click.Choice(["8", "4"]), help="8: LLM.int8() vector-wise; 4: NF4/FP4 blockwise.")
@click.option("--quant-type", type=click.Choice(["nf4", "fp4"]), help="4-bit code  [default: nf4]")
@click.option("--block-size", type=int, help="4-bit elements per absmax  [default: the preset's]")
@click.option("--double-quant/--no-double-quant", default=None, help="Quantize the 4-bit absmax too.")
@click.option("--embeddings/--no-embeddings", default=None,
              help="Quantize the (tied) word embeddings too  [default: the preset's]")
@click.option("--int8-embeddings", is_flag=True,
              help="4-bit: store the (tied) word embeddings int8, as the int8 preset does (the 4-bit default; bloomconv "
                   "runtime only: --no-embeddings keeps them 16-bit, which transformers loads)")
@click.option("--int8-scale-from", type=click.Choice(["float16", "source"]),
              help="int8 (and --int8-embeddings): take row absmax from the fp16 cast (as transformers does; refuses values "
                   "beyond fp16 range) or from the source dtype  [default: float16]")
@click.option("--recipe", help="Apply a preset from `bloomconv recipes`, e.g. bloom-176b-int8.")
@click.option("--method", type=click.Choice(["rtn", "search", "gptq"]),
              help="rtn: bitsandbytes' round to nearest; search: each block's scale searched for the least "
                   "error; gptq: calibrated on --calibrate text  [default: rtn, gptq with --calibrate]")
@click.option("--calibrate", type=click.Path(dir_okay=False),
              help="GPTQ: calibration text file (UTF-8); use text the model will not be evaluated on.")
@click.option("--calibration-tokens", type=int, help="GPTQ: use at most this many tokens of it  [default: 65536]")
@click.option("--device", default="cpu", show_default=True, help="GPTQ: where to compute (cpu, cuda).")
@sign_options
@quiet_option
@_errors_to_exit_codes
def quantize(src, dst, bits, quant_type, block_size, double_quant, embeddings, int8_embeddings, int8_scale_from,
             recipe, method, calibrate, calibration_tokens, device, sign_key, sign_certificate, sign_chain, quiet):
    """Convert SRC into DST with the block weights quantized (int8 or 4-bit), with a manifest.

    SRC is a released checkpoint (any layout `convert` reads) or an unquantized bloomconv
    directory. Options not given take the preset of the type (or the recipe's). Re-run the same
    command after an interruption to resume."""
    from .converters.convert import quantize as run
    from .settings import INT8_EMBEDDINGS
    if int8_embeddings:
        if embeddings is False:
            raise click.UsageError("--no-embeddings and --int8-embeddings contradict each other: give one of them.")
        embeddings = INT8_EMBEDDINGS
    started = time.monotonic()
    with _warnings_as_lines() as said:
        manifest = run(src, dst, bits, quant_type=quant_type, block_size=block_size, double_quant=double_quant,
                       embeddings=embeddings, int8_scale_from=int8_scale_from, recipe=recipe, method=method,
                       calibrate=calibrate, calibration_tokens=calibration_tokens, device=device,
                       signing=_signing_key(sign_key, sign_certificate, sign_chain),
                       progress=terminal_progress("quantize", disable=quiet), log=_say)
    click.echo(f"{dst}: {manifest.quantization.quant_type.value}, {_density(manifest)}, {_summary(manifest, started)}")
    said()


def _density(manifest) -> str:
    """Bits per weight and size against 16 bits (quantize's summary; `inspect` shows the same)."""
    from .inspection import bits_per_weight, size_ratio_to_16bit
    return f"{bits_per_weight(manifest):.2f} bits per weight, {size_ratio_to_16bit(manifest):.3f} of its 16-bit size"


@contextlib.contextmanager
def _warnings_as_lines():
    """Collect the BloomconvWarnings of the block; the function it gives prints each as one line
    (`bloomconv: warning: …`) on stderr, after the command's own output."""
    from .errors import BloomconvWarning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", BloomconvWarning)
        lines: list[str] = []
        yield lambda: [click.echo(f"bloomconv: warning: {line}", err=True) for line in lines]
    for warning in caught:
        if issubclass(warning.category, BloomconvWarning):
            lines.append(str(warning.message))
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@_errors_to_exit_codes
def recipes(as_json):
    """List the recipes (model x quantization preset) and the output size each produces."""
    from .recipes import all_recipes
    rows = [{"recipe": r.name, "variants": list(r.variants), "source_layouts": list(r.source_layouts),
             "quantization": r.quantization.to_dict(), "source_bytes": r.source_bytes,
             "output_bytes": r.output_bytes} for r in all_recipes()]
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    click.echo(f"{'recipe':<18} {'source':>10} {'output':>10}  ratio  models")
    for row in rows:
        click.echo(f"{row['recipe']:<18} {row['source_bytes'] / 1e9:>8.2f}GB {row['output_bytes'] / 1e9:>8.2f}GB"
                   f"  {row['output_bytes'] / row['source_bytes']:.3f}  {', '.join(row['variants'])}")


def trusted_signer_options(command):
    """--public-key, --certificate-chain, --identity/--issuer: who must have signed (verify, generate)."""
    command = click.option("--issuer", help="With --identity: the OpenID Connect issuer that vouched for it.")(command)
    command = click.option("--identity", help="Check a Sigstore signature: the signer's identity "
                           "(e.g. an e-mail address; needs network access).")(command)
    command = click.option("--certificate-chain", multiple=True, type=click.Path(dir_okay=False),
                           help="Check a certificate signature against this chain (PEM; repeatable).")(command)
    return click.option("--public-key", type=click.Path(dir_okay=False),
                        help="Check that the directory is signed (model.sig) by this key's owner: every file "
                        "as signed, nothing added or removed.")(command)


@main.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--key", type=click.Path(dir_okay=False), help="Elliptic-curve private key (PEM, P-256/384/521).")
@click.option("--certificate", type=click.Path(dir_okay=False), help="With --key: the key's certificate (PKI).")
@click.option("--chain", multiple=True, type=click.Path(dir_okay=False),
              help="With --certificate: a certificate of the chain up to the root (repeatable).")
@click.option("--sigstore", is_flag=True, help="Sigstore keyless signing instead of a key (network access and "
              "an OpenID Connect login; passed through to model_signing, untested by bloomconv).")
@_errors_to_exit_codes
def sign(directory, key, certificate, chain, sigstore):
    """Sign every file of DIRECTORY: write DIRECTORY/model.sig (OpenSSF model-signing format).

    The directory is checked against its manifest first; a damaged one is not signed. Anyone can
    check the signature with `bloomconv verify DIRECTORY --public-key PUBLIC.pem`, or without
    bloomconv: `model_signing verify key DIRECTORY --signature DIRECTORY/model.sig --public_key PUBLIC.pem`."""
    from .format import SIGNATURE_NAME
    from .signing import sign as run
    if key is None and (certificate or chain):
        raise click.UsageError("--certificate and --chain go with --key")
    status = run(directory, _signing_key(key, certificate, chain), sigstore=sigstore)
    click.echo(f"{directory}: signed ({status.method}): {SIGNATURE_NAME} covers every other file")


@main.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--fast", is_flag=True, help="Check sizes and safetensors headers; hash only the small files "
              "without tensors (config, tokenizer, index).")
@trusted_signer_options
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable report.")
@quiet_option
@_errors_to_exit_codes
def verify(directory, fast, public_key, certificate_chain, identity, issuer, as_json, quiet):
    """Check every file of DIRECTORY against its manifest, and its signature when a public key
    (or certificate chain, or Sigstore identity) is given.

    Without one, says whether the directory is signed and how, which proves nothing about who
    made it. Exit 0: all good; 1: files differ, or the signature does not hold (each reported);
    2: no usable manifest, or a key that cannot be used."""
    from .verification import verify as run
    report = run(directory, fast=fast, progress=terminal_progress("verify", disable=quiet or as_json),
                 public_key=public_key, certificate_chain=certificate_chain, identity=identity, issuer=issuer)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=1))
    elif report.ok:
        mode = "sizes and headers, small files hashed" if report.fast else f"{report.bytes_hashed:,} bytes hashed"
        ignored = f"; ignored: {', '.join(report.ignored)}" if report.ignored else ""
        click.echo(f"{directory}: OK ({report.files_checked} files, {mode}{ignored}); {report.signature}")
    if as_json and not report.ok:  # the JSON report is the whole message
        try:
            report.raise_for_problems()
        except VerificationError as exc:
            sys.exit(exit_code(exc))
    report.raise_for_problems()


@main.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@_errors_to_exit_codes
def inspect(directory, as_json):
    """Show geometry, dtype, quantization and sizes of a converted DIRECTORY."""
    from .inspection import inspect as run
    info = run(directory)
    if as_json:
        click.echo(json.dumps(info, indent=1))
        return
    m = info["model"]
    quant = info["quantization"]
    click.echo(f"{info['directory']}  (bloomconv format {info['format_version']}, tool {info['tool_version']})")
    click.echo(f"  geometry      hidden {m['hidden_size']}, {m['n_layer']} blocks, {m['n_head']} heads, "
               f"vocab {m['vocab_size']}  ({info['parameters']:,} parameters)")
    click.echo(f"  dtype         {m['dtype']}")
    click.echo(f"  quantization  {_one_line(quant) if quant else 'none'}")
    if info.get("transformers") is not None:
        click.echo(f"  transformers  {_one_line(info['transformers'])}")
    click.echo(f"  source        {info['source_layout']}, {info['source_bytes']:,} bytes")
    for f in info["files"]:
        click.echo(f"  {f['size']:>15,}  {f['name']}")
    click.echo(f"  {info['total_bytes']:>15,}  total ({info['weight_bytes']:,} in weights)")
    click.echo(f"  density       {info['bits_per_weight']:.2f} bits per weight (every tensor's bytes x 8 / parameters), "
               f"{info['size_ratio_to_16bit']:.3f} of its 16-bit size")
    for warning in info["warnings"]:
        click.echo(f"bloomconv: warning: {directory}: {warning}", err=True)


def _one_line(value) -> str:
    """A record of `inspect` as text: a dict as key=value (None and false left out), a list comma-separated."""
    if isinstance(value, dict):
        return ", ".join(f"{k}={v if isinstance(v, (str, int, float)) else json.dumps(v)}"
                         for k, v in value.items() if v not in (None, False))
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return str(value)


@main.command("eval")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--text", "text_file", required=True, type=click.Path(dir_okay=False),
              help="UTF-8 text to score (text the model was not trained on).")
@click.option("--ctx", default=512, show_default=True, type=click.IntRange(min=4),
              help="Tokens per window; the second half of each is scored (llama-perplexity's protocol).")
@click.option("--reference", type=click.Path(file_okay=False),
              help="Another directory of the same model (e.g. the unquantized conversion): also report the KL "
              "divergence from it, top-1 agreement and its perplexity.")
@click.option("--threads", type=click.IntRange(min=1), help="Compute threads  [default: torch's]")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@quiet_option
@_errors_to_exit_codes
def evaluate(directory, text_file, ctx, reference, threads, as_json, quiet):
    """Perplexity of the model in DIRECTORY on a text, computed by bloomconv's runtime.

    As llama-perplexity: the text is cut into windows of --ctx tokens, each run from an empty
    cache, and the second half of each is scored; ± is the standard error. With --reference, also
    as llama-perplexity --kl-divergence: mean KL(reference || this) per token, and how often both
    rank the same next token first."""
    from pathlib import Path

    from .evaluation import evaluate as run
    result = run(directory, Path(text_file), ctx=ctx, reference=reference, threads=threads,
                 log=None if as_json else _say, progress=terminal_progress("eval", disable=quiet or as_json))
    if as_json:
        click.echo(json.dumps({"directory": directory, "text": text_file, "reference": reference,
                               **result.to_dict()}, indent=1))
        return
    ppl = getattr(result, "perplexity", result)
    click.echo(f"{directory}: perplexity {ppl.value:.4f} ± {ppl.stderr:.4f} ({ppl.tokens_scored:,} tokens scored "
               f"in {ppl.windows} windows of {ppl.ctx})")
    if reference is not None:
        base = result.reference_perplexity
        click.echo(f"{reference}: perplexity {base.value:.4f} ± {base.stderr:.4f} (reference)")
        click.echo(f"KL divergence from the reference: mean {result.kl_mean:.6f} ± {result.kl_stderr:.6f}, "
                   f"max {result.kl_max:.6f}; same top token {result.top1_agreement:.3f} ± {result.top1_stderr:.3f} %")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@_errors_to_exit_codes
def env(as_json):
    """Show versions, compiled kernels, CUDA devices and platform (paste it into bug reports)."""
    from .environment import environment_report
    report = environment_report()
    if as_json:
        click.echo(json.dumps(report, indent=1))
        return
    python, kernels, system = report["python"], report["kernels"], report["platform"]
    rows = {"bloomconv": f"{report['bloomconv']['version']} ({report['bloomconv']['location']})",
            "python": f"{python['version']} ({python['implementation']}, {python['executable']})"}
    rows.update((name, version or "not installed") for name, version in report["packages"].items())
    rows["torch"] += (f", CUDA {report['torch']['cuda'] or 'none'}, CPU capability "
                      f"{report['torch']['cpu_capability']}")
    rows["kernels"] = (f"built, {', '.join(kernels['isas'])}, {kernels['threads']} threads" if kernels["built"]
                       else "not built (no C compiler at install time): torch fallback")
    devices = [f"{d['index']}: {d['name']}, compute {d['capability']}, {d['memory_bytes'] / 2**30:.1f} GiB"
               for d in report["cuda_devices"]]
    rows["CUDA devices"] = "; ".join(devices) or report.get("cuda_error") or "none"
    memory = f", {system['memory_bytes'] / 2**30:.1f} GiB RAM" if system["memory_bytes"] else ""
    rows["platform"] = (f"{system['system']}, {system['cpus']} CPUs ({system['usable_cpus']} usable)"
                        f"{memory}")
    for key, value in rows.items():
        click.echo(f"{key:<16}{value}")


@main.command("example")
@click.argument("dst", type=click.Path(file_okay=False))
@click.option("--geometry", default="trained", show_default=True,
              help="trained (the small trained model that ships with bloomconv), or random weights of "
              "tiny | small | bloom-560m | HIDDEN,LAYERS,HEADS,VOCAB")
@click.option("--layout", default="release-pickle-shards", show_default=True,
              type=click.Choice(["release-pickle-shards", "safetensors-shards", "pickle-single", "safetensors-single"]))
@click.option("--dtype", default="bfloat16", show_default=True, type=click.Choice(["bfloat16", "float16", "float32"]))
@click.option("--seed", default=0, show_default=True)
@_errors_to_exit_codes
def example(dst, geometry, layout, dtype, seed):
    """Write an example BLOOM checkpoint to DST, laid out like a release (for trying bloomconv).

    By default the small model trained on Python's documentation that ships with bloomconv;
    with --geometry, random weights of any size."""
    import torch

    from .converters.example import write_example_checkpoint
    write_example_checkpoint(dst, geometry, layout, getattr(torch, dtype), seed)
    what = "the trained example BLOOM" if geometry == "trained" else f"random BLOOM ({geometry})"
    click.echo(f"{dst}: {what}, {dtype}, in the {layout} layout")


@main.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.argument("prompt", required=False)
@click.option("-f", "--prompt-file", type=click.File("r", encoding="utf-8"),
              help="Read the prompt from FILE (- for stdin) instead of PROMPT.")
@click.option("--max-new-tokens", default=50, show_default=True, type=click.IntRange(min=0))
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(min=0),
              help="0: greedy; above 0: sample.")
@click.option("--top-k", default=0, show_default=True, type=click.IntRange(min=0), help="0: no limit.")
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True))
@click.option("--repetition-penalty", default=1.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Divide positive logits (multiply negative ones) of tokens already in the text by this, "
              "as transformers does; 1: none.")
@click.option("--stop", multiple=True, help="End when the new text contains this string (not printed); repeatable.")
@click.option("--seed", type=int, help="Make sampling reproducible.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Where to compute: cuda copies each file of weights to the GPU in turn.")
@click.option("--ram-budget", help="Memory for this run: the weights kept in RAM (the rest streams from disk "
              "each token), the stream buffers, KV cache and working set; e.g. 12GB, 800MB, 1.5GiB, or min for "
              "the least that runs.  [default: 90% of available memory less 128 MB]")
@click.option("--threads", type=click.IntRange(min=1), help="Compute threads  [default: torch's]")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True,
              help="Compute dtype: float32 matches transformers' fp32 results (over 64 prompt tokens with "
              "--prefill-dtype float32); bfloat16 is faster on CPUs "
              "with AVX512-BF16 or AMX.")
@click.option("--prefill-dtype", type=click.Choice(["float32", "bfloat16"]), help="Dtype of the matrix products "
              "of the prompt's pass (over 64 tokens): bfloat16 rounds their inputs and results to bf16 (torch's "
              "bf16 GEMM, as torch.autocast does), the rest stays in --dtype; float32 matches transformers' "
              "fp32 prefill. bfloat16 also multiplies decoding steps of 4+ sequences on AMX tiles where the CPU "
              "has them, and 4-bit weights by int8 activations in steps of 1-3 where it has AVX512-VNNI; "
              "float32 keeps every product in fp32.  [default: bfloat16 for float32 compute on a CPU with AVX512-BF16 over bf16 "
              "weights, else --dtype]")
@click.option("--verify", "verify_mode", type=click.Choice(["fast", "full"]), default="fast", show_default=True,
              help="fast: sizes and headers; full: hash every file first.")
@trusted_signer_options
@click.option("--stats", is_flag=True, help="Print timings and peak memory to stderr.")
@click.option("--pipeline", is_flag=True, help="One rank of several launched by torchrun: each holds a share of "
              "the blocks (within its --ram-budget); rank 0 prints the text. See README, Across several machines.")
@click.option("--pipeline-timeout", default=120.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="With --pipeline: seconds a rank waits for its neighbour before stopping every rank.")
@click.option("--micro-batches", type=click.IntRange(min=1), help="With --pipeline: parts a batch is split into "
              "to keep every rank busy  [default: one per rank when each keeps 32 prompts or more, else 1]")
@_errors_to_exit_codes
def generate(directory, prompt, prompt_file, max_new_tokens, temperature, top_k, top_p, repetition_penalty, stop,
             seed, device, ram_budget, threads, dtype, prefill_dtype, verify_mode, public_key, certificate_chain,
             identity, issuer, stats, pipeline, pipeline_timeout, micro_batches):
    """Continue PROMPT with the model in DIRECTORY, printing tokens as they are produced.

    PROMPT - (or -f FILE) reads the prompt from stdin (or FILE); one trailing newline is dropped."""
    import torch

    from .process_stats import PeakRssAnon, peak_rss, seconds_since_start
    from .runtime import GenerationStats, load, parse_size
    if (prompt is None) == (prompt_file is None):
        raise click.UsageError("give the prompt as PROMPT (- for stdin) or with -f FILE, one of the two")
    if prompt_file is not None or prompt == "-":
        text = (prompt_file or click.open_file("-", encoding="utf-8")).read()
        prompt = text[:-1] if text.endswith("\n") else text
    try:
        budget = ram_budget if ram_budget in (None, "min") else parse_size(ram_budget)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--ram-budget") from None
    watch = PeakRssAnon() if stats else None
    # plan for this run: byte-level BPE gives at most one token per byte of the prompt
    max_tokens = len(prompt.encode("utf-8")) + max_new_tokens
    if pipeline:
        import signal

        from .runtime.pipeline import PipelineOptions
        # Ctrl-C ends this rank at once, even inside a wait for a peer; the others see it gone and stop
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        # rank 0 sends passes without pause, so a serving rank waits no longer between them
        pipeline = PipelineOptions(pipeline_timeout, pipeline_timeout, micro_batches)
    model = load(directory, device=device, verify=verify_mode, ram_budget=budget, threads=threads,
                 max_tokens=max(1, max_tokens), dtype=getattr(torch, dtype),
                 prefill_dtype=getattr(torch, prefill_dtype) if prefill_dtype else None, public_key=public_key,
                 certificate_chain=certificate_chain, identity=identity, issuer=issuer, pipeline=pipeline)
    if model is None:
        return  # a pipeline rank other than 0: it served its blocks until rank 0 was done
    with model:
        if stats:
            model.checkpoint.wait_until_loaded()  # "ready": every weight that stays in RAM is there
            ready = seconds_since_start()
        counts = GenerationStats()
        pieces = model.stream(prompt, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                              repetition_penalty=repetition_penalty, stop=stop, seed=seed, stats=counts)
        click.echo(prompt, nl=False)
        for piece in pieces:
            click.echo(piece, nl=False)
            sys.stdout.flush()
        click.echo()
        residency = model.checkpoint.residency
    if stats:
        peak_anon = watch.stop()
        hwm = peak_rss()
        click.echo(f"start-to-ready {ready:.2f} s (`import bloomconv` to weights in RAM; {residency.pinned_count} "
                   f"pinned, {len(residency.streamed)} streamed, budget {residency.budget / 1e6:,.0f} MB)\n"
                   f"prefill {counts.prompt_tokens} tokens in {counts.prefill_seconds:.2f} s = "
                   f"{counts.prefill_tokens_per_s:.1f} tokens/s\n"
                   f"decode {max(counts.steps - 1, 0)} tokens in {counts.decode_seconds:.2f} s = "
                   f"{counts.decode_tokens_per_s:.2f} tokens/s\n"
                   f"peak RSS {hwm / 1e9:.2f} GB, peak RssAnon {peak_anon / 1e9:.2f} GB (sampled every 10 ms)\n"
                   f"{residency.describe()}", err=True)


if __name__ == "__main__":
    main()
