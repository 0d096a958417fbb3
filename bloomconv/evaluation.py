"""How well a directory models text: perplexity, and how far it strays from a reference directory.

The protocol is llama.cpp's `llama-perplexity` (tools/perplexity/perplexity.cpp), so that figures
compare with it: the text is tokenized once (no special tokens added, as bloomconv's tokenizer
does everywhere) and cut into consecutive, non-overlapping windows of `ctx` tokens (the tail
that does not fill a window is left out); each window is run on its own, from an empty cache,
and only the second half is scored: the logits of positions ctx/2 … ctx-2 predict tokens
ctx/2+1 … ctx-1, so every scored token has at least ctx/2 tokens of context.

Perplexity is exp(mean NLL) over every scored token; its standard error is llama-perplexity's:
the standard error of the mean NLL, sqrt((mean(nll²) - mean(nll)²) / (n - 1)), times the
perplexity (first-order error propagation through exp). `compare` adds what
`llama-perplexity --kl-divergence` reports against a reference: the mean over scored tokens of
KL(reference || model) = Σ_v p_ref(v) (log p_ref(v) - log p_model(v)) with the same standard
error of a mean, its maximum, and the share of tokens whose most likely next token is the same
in both (top-1 agreement, with sqrt(p(1-p)/(n-1)) as its error). llama.cpp stores the
reference's log-probabilities quantized to 16 bits and drops vocabulary entries below e^-16 from
the KL sum; here both distributions are exact float32.

Memory: one window's logits (ctx × vocab float32: 514 MB at ctx 512 for BLOOM's 250,880 tokens)
per model at a time, turned into log-probabilities in place, a few rows at a time.

>>> import bloomconv
>>> bloomconv.evaluate("bloom-560m-nf4", Path("wiki.test.raw"), reference="bloom-560m")  # doctest: +SKIP
>>> model = bloomconv.load("bloom-560m-nf4")                                            # doctest: +SKIP
>>> perplexity(model, tokens_of(model, "Some text to score ..."), ctx=128).value       # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import OptionsError
from .progress import ProgressFactory, no_progress

__all__ = ["Comparison", "Perplexity", "compare", "evaluate", "mean_and_stderr", "perplexity", "tokens_of",
           "windows_for"]

DEFAULT_CTX = 512            # llama-perplexity's default --ctx-size
MIN_CTX = 4                  # the least window that scores a token: ctx - 1 - ctx//2 >= 1
ROWS_PER_STEP = 64           # log-softmax rows at a time: bounds the temporaries to 64 × vocab floats
MAX_CONTEXT_KEYS = ("seq_length", "n_positions", "max_position_embeddings")  # where a config states one


@dataclasses.dataclass(frozen=True)
class Perplexity:
    """Perplexity of one model on one text. `stderr` is NaN with fewer than 2 tokens scored."""

    value: float            # exp(nll_mean)
    stderr: float           # value × standard error of nll_mean
    tokens_scored: int
    windows: int
    nll_mean: float         # mean negative log-likelihood per scored token, in nats
    ctx: int                # window length used

    def to_dict(self) -> dict[str, Any]:
        return _finite_or_none(dataclasses.asdict(self))


@dataclasses.dataclass(frozen=True)
class Comparison:
    """A model against a reference model of the same geometry on the same tokens (see module doc).
    KL in nats; `top1_agreement` and `top1_stderr` in percent."""

    perplexity: Perplexity
    reference_perplexity: Perplexity
    kl_mean: float
    kl_stderr: float
    kl_max: float
    top1_agreement: float
    top1_stderr: float
    tokens_scored: int

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["perplexity"], d["reference_perplexity"] = self.perplexity.to_dict(), self.reference_perplexity.to_dict()
        return _finite_or_none(d)


def _finite_or_none(d: dict) -> dict:
    """JSON has no NaN: an undefined figure (a standard error of one token) becomes null."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in d.items()}


def mean_and_stderr(values: torch.Tensor) -> tuple[float, float]:
    """Mean of `values` and its standard error, sqrt((mean(x²) - mean(x)²) / (n - 1)) as
    llama-perplexity computes it (= the sample standard deviation / sqrt(n)); NaN for n < 2.

    >>> mean_and_stderr(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    (2.5, 0.6454972243679028)
    """
    x = values.double()
    n = x.numel()
    if n == 0:
        return math.nan, math.nan
    mean = x.mean().item()
    if n < 2:
        return mean, math.nan
    variance = max((x * x).mean().item() - mean * mean, 0.0)
    return mean, math.sqrt(variance / (n - 1))


def tokens_of(model_or_tokenizer, text: str) -> torch.Tensor:
    """`text` as token ids, 1-D long, with no special tokens added: by a loaded model's tokenizer
    (`bloomconv.load(...)`), a `bloomconv.runtime.Tokenizer`, a `tokenizers.Tokenizer` or anything
    whose `encode(text)` gives ids."""
    tokenizer = getattr(model_or_tokenizer, "tokenizer", model_or_tokenizer)
    if tokenizer is None:
        directory = getattr(getattr(model_or_tokenizer, "checkpoint", None), "directory", "the model")
        raise OptionsError(f"{directory} has no tokenizer.json, so text cannot be scored with it. Convert "
                           "from a checkpoint that has one, or pass token ids.")
    encoded = tokenizer.encode(text)
    return torch.tensor(getattr(encoded, "ids", encoded), dtype=torch.long)


def max_context(model) -> int | None:
    """The longest context the model's config.json states, if it states one (BLOOM's ALiBi has no
    hard limit; bigscience/bloom's config says seq_length 2048)."""
    config = getattr(model, "config", {}) or {}
    return next((config[key] for key in MAX_CONTEXT_KEYS
                 if isinstance(config.get(key), int) and config[key] > 0), None)


def windows_for(n_tokens: int, ctx: int, model_max: int | None = None,
                log: Callable[[str], None] | None = None) -> tuple[int, int]:
    """(ctx, windows) to use: `ctx` clamped to the model's stated maximum and to the text's length
    (saying so through `log`), and how many whole windows of it the text holds."""
    if not isinstance(ctx, int) or ctx < MIN_CTX:
        raise OptionsError(f"ctx {ctx!r} is too short: a window scores its second half after the first, so it "
                           f"needs at least {MIN_CTX} tokens. Use --ctx {MIN_CTX} or more (llama-perplexity's "
                           f"default is {DEFAULT_CTX}).")
    if n_tokens < MIN_CTX:
        raise OptionsError(f"the text is {n_tokens} token(s) long; scoring needs at least {MIN_CTX}. "
                           "Give a longer text (`evaluate` reads a file when given a Path, not a str).")
    if model_max is not None and ctx > model_max:
        if log is not None:
            log(f"ctx {ctx} is more than the {model_max} tokens the model's config states: using {model_max}")
        ctx = model_max
    if ctx > n_tokens:
        if log is not None:
            log(f"ctx {ctx} is more than the text's {n_tokens} tokens: using one window of {n_tokens}")
        ctx = n_tokens
    return ctx, n_tokens // ctx


def _log_probs_in_place(logits: torch.Tensor) -> torch.Tensor:
    """(T, V) float logits -> log-probabilities in the same storage, ROWS_PER_STEP rows at a time."""
    for start in range(0, logits.shape[0], ROWS_PER_STEP):
        rows = logits[start:start + ROWS_PER_STEP]
        rows -= torch.logsumexp(rows, dim=-1, keepdim=True)
    return logits


def _scored_log_probs(model, window: torch.Tensor) -> torch.Tensor:
    """Log-probabilities (ctx - 1 - ctx//2, V), float32, of the positions that predict the second
    half of `window` (1-D ids). Holds one window's logits."""
    ctx = window.numel()
    first = ctx // 2
    checkpoint = getattr(model, "checkpoint", None)
    if checkpoint is not None:  # a window longer than the load planned for: refuse before running it
        checkpoint.check_room(ctx, model.transformer.dtype)
    logits = model(window[None])[0]                                           # (ctx, V)
    scored = logits[first:ctx - 1]
    if scored.dtype != torch.float32:
        scored = scored.float()
    del logits  # with float32 logits `scored` keeps their storage alive; otherwise this frees it
    return _log_probs_in_place(scored)


def _perplexity_of(nll: torch.Tensor, ctx: int, windows: int) -> Perplexity:
    nll_mean, nll_stderr = mean_and_stderr(nll)
    value = math.exp(nll_mean)
    return Perplexity(value=value, stderr=value * nll_stderr, tokens_scored=nll.numel(), windows=windows,
                      nll_mean=nll_mean, ctx=ctx)


def _windows(token_ids: torch.Tensor, ctx: int, model, log):
    token_ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1)
    ctx, count = windows_for(token_ids.numel(), ctx, max_context(model), log)
    return ctx, count, (token_ids[i * ctx:(i + 1) * ctx] for i in range(count))


@torch.inference_mode()  # the runtime's logits are inference tensors, changed in place here
def perplexity(model, token_ids: torch.Tensor, ctx: int = DEFAULT_CTX, *,
               log: Callable[[str], None] | None = None, progress: ProgressFactory = no_progress) -> Perplexity:
    """Perplexity of `model` (a `bloomconv.load`ed Bloom, or anything whose `model(ids)` gives
    (1, T, vocab) logits) on `token_ids` by llama-perplexity's protocol (module doc).

    The figures are those of the model as loaded: load with prefill_dtype=torch.float32 for the
    weights' own, the same on every CPU (`evaluate` does).

    >>> perplexity(bloomconv.load("bloom-560m"), ids, ctx=512)      # doctest: +SKIP
    Perplexity(value=..., stderr=..., tokens_scored=..., windows=..., nll_mean=..., ctx=512)
    """
    ctx, count, windows = _windows(token_ids, ctx, model, log)
    nll = []
    with progress(total=count, desc="eval", unit="window") as bar:
        for window in windows:
            log_probs = _scored_log_probs(model, window)
            targets = window[ctx // 2 + 1:].to(log_probs.device)
            nll.append(-log_probs.gather(1, targets[:, None])[:, 0].double().cpu())
            del log_probs
            bar.update(1)
    return _perplexity_of(torch.cat(nll), ctx, count)


def check_same_model(model, reference) -> None:
    """Refuse a reference of another geometry (vocabulary included): its tokens mean other things."""
    g, r = model.geometry, reference.geometry
    if g != r:
        def describe(x):
            return f"hidden {x.hidden_size}, {x.n_layer} blocks, {x.n_head} heads, vocab {x.vocab_size}"
        raise OptionsError(f"the reference is another model ({describe(r)}) than the one evaluated ({describe(g)}). "
                           "Compare directories converted from the same checkpoint.")


@torch.inference_mode()
def compare(model, reference, token_ids: torch.Tensor, ctx: int = DEFAULT_CTX, *,
            log: Callable[[str], None] | None = None, progress: ProgressFactory = no_progress) -> Comparison:
    """`model` against `reference` (both Bloom) on `token_ids`: both perplexities, the mean KL
    divergence KL(reference || model) per scored token with its standard error and maximum, and
    top-1 agreement, as `llama-perplexity --kl-divergence` reports them (module doc). Both as
    loaded: see `perplexity` on prefill_dtype.

    >>> compare(bloomconv.load("bloom-560m-nf4"), bloomconv.load("bloom-560m"), ids).kl_mean  # doctest: +SKIP
    """
    check_same_model(model, reference)
    ctx, count, windows = _windows(token_ids, ctx, model, log)
    nll, nll_reference, kl, same_top = [], [], [], []
    with progress(total=count, desc="eval", unit="window") as bar:
        for window in windows:
            reference_log_probs = _scored_log_probs(reference, window)
            log_probs = _scored_log_probs(model, window).to(reference_log_probs.device)
            targets = window[ctx // 2 + 1:].to(log_probs.device)[:, None]
            nll.append(-log_probs.gather(1, targets)[:, 0].double().cpu())
            nll_reference.append(-reference_log_probs.gather(1, targets)[:, 0].double().cpu())
            same_top.append((log_probs.argmax(-1) == reference_log_probs.argmax(-1)).cpu())
            kl.append(_kl_rows(reference_log_probs, log_probs))
            del log_probs, reference_log_probs
            bar.update(1)
    kl_values, agreed = torch.cat(kl), torch.cat(same_top).double()
    kl_mean, kl_stderr = mean_and_stderr(kl_values)
    n = agreed.numel()
    top1 = agreed.mean().item()
    top1_stderr = math.sqrt(top1 * (1 - top1) / (n - 1)) if n > 1 else math.nan
    return Comparison(perplexity=_perplexity_of(torch.cat(nll), ctx, count),
                      reference_perplexity=_perplexity_of(torch.cat(nll_reference), ctx, count),
                      kl_mean=kl_mean, kl_stderr=kl_stderr, kl_max=kl_values.max().item(),
                      top1_agreement=100 * top1, top1_stderr=100 * top1_stderr, tokens_scored=n)


def _kl_rows(reference_log_probs: torch.Tensor, log_probs: torch.Tensor) -> torch.Tensor:
    """KL(reference || model) of each row, float64 on the CPU; ROWS_PER_STEP × vocab temporaries."""
    out = []
    for start in range(0, log_probs.shape[0], ROWS_PER_STEP):
        r = reference_log_probs[start:start + ROWS_PER_STEP]
        out.append(((r - log_probs[start:start + ROWS_PER_STEP]) * r.exp()).sum(-1).double().cpu())
    return torch.cat(out)


def evaluate(directory: str | os.PathLike, text: str | os.PathLike, *, ctx: int = DEFAULT_CTX,
             reference: str | os.PathLike | None = None, threads: int | None = None,
             log: Callable[[str], None] | None = None,
             progress: ProgressFactory = no_progress) -> Perplexity | Comparison:
    """Load `directory` (and `reference`, another directory of the same model) with the runtime and
    score `text`: a str is the text itself, a Path (any os.PathLike) a UTF-8 file to read.
    Returns `perplexity(...)`, or `compare(...)` with a reference. `threads`: torch's threads.

    >>> evaluate("bloom-560m-nf4", Path("heldout.txt"), reference="bloom-560m", ctx=256)  # doctest: +SKIP
    """
    from .runtime import load
    from .runtime.memory import default_ram_budget
    if not isinstance(text, str):
        text = _read_text(Path(text))
    # two models share the memory one would take by default
    budget = None if reference is None else max(default_ram_budget() // 2, 1)
    models = []
    try:
        for path in (directory, *([reference] if reference is not None else [])):
            # fp32 products throughout: the figures are the weights', the same on every CPU (the
            # runtime's default multiplies prefills in bf16 on some)
            models.append(load(path, threads=threads, max_tokens=ctx, ram_budget=budget, prefill_dtype=torch.float32))
        model = models[0]
        token_ids = tokens_of(model, text)
        if reference is None:
            return perplexity(model, token_ids, ctx, log=log, progress=progress)
        check_same_model(model, models[1])
        if not torch.equal(tokens_of(models[1], text), token_ids):
            raise OptionsError(f"{reference}'s tokenizer splits the text differently from {directory}'s: the two "
                               "directories hold different tokenizers. Compare directories converted from the "
                               "same checkpoint.")
        return compare(model, models[1], token_ids, ctx, log=log, progress=progress)
    finally:
        for model in models:
            model.close()


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise OptionsError(f"{path}: no such text file. Give the path of a UTF-8 text file.") from None
    except UnicodeDecodeError as exc:
        raise OptionsError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}). Convert it to UTF-8.") from None
    except OSError as exc:
        raise OptionsError(f"{path}: cannot read it ({exc.strerror}). Check the path and its permissions.") from None
