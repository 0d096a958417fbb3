"""Text in, text out: `load` a bloomconv directory, then `generate` or `stream`.

>>> model = load("bloom-560m-int8")                                      # doctest: +SKIP
>>> model.generate("The capital of France is", max_new_tokens=8)         # doctest: +SKIP
>>> for piece in model.stream("Once upon a time", temperature=0.8, top_p=0.9, seed=1):  # doctest: +SKIP
...     print(piece, end="", flush=True)
"""
from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterator

import torch

from bloomconv.errors import ManifestError
from bloomconv.format import TOKENIZER_NAMES

from .loader import Checkpoint, open_checkpoint
from .model import KVCache, Transformer

__all__ = ["Bloom", "GenerationStats", "load", "next_tokens", "top_k_mask", "top_p_mask"]


def load(directory: str | os.PathLike, *, device="cpu", verify: str = "fast",
         dtype: torch.dtype = torch.float32, ram_budget: str | int | None = None,
         threads: int | None = None) -> "Bloom":
    """Open a converted (optionally quantized) directory for inference.

    Returns once headers are checked; the weights that stay in RAM are read on a background
    thread meanwhile (the first forward pass waits for what it needs).

    `verify`: "fast" checks sizes and headers against the manifest, "full" hashes every byte.
    `device`: "cpu", or an accelerator such as "cuda": each file is copied to it in turn, the
    next one on a side stream while the current one computes; 4-bit weights multiply through
    bitsandbytes' kernels there, int8 ones are dequantized on the device in pieces.
    `dtype`: compute dtype. float32 matches transformers' fp32 to ~1e-6; on the CPU 16-bit and
    int8 weights are widened in registers by bloomconv's kernels, never copied to fp32 (without
    a C compiler at install time, 16-bit weights are widened once at load when they fit).
    bfloat16 activations also work: torch's bf16 GEMM for large batches of bf16 weights.
    `ram_budget`: bytes of weights to hold in RAM, e.g. "12GB", "800MB", "1.5GiB" or an int;
    files that do not fit are read from disk on every forward pass (see `loader`). None: 90 % of
    available memory (MemAvailable, or the memory cgroup's room if smaller) minus one block's
    working set and a 1024-token KV cache (`loader.default_ram_budget`).
    `threads`: torch's intra-op threads (process-wide, `torch.set_num_threads`); None leaves it.
    bloomconv's kernels use as many. During a decoding step torch's own ops run on one thread
    (process-wide too, restored after the step): run one model per process, not one per thread.
    Raises VerificationError naming each damaged file.
    """
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be at least 1, not {threads}")
        torch.set_num_threads(threads)
    checkpoint = open_checkpoint(directory, verify=verify, ram_budget=ram_budget, dtype=dtype)
    return Bloom(checkpoint, Transformer(checkpoint, dtype=dtype, device=device))


@dataclasses.dataclass
class GenerationStats:
    """Counts and compute time of one `generate`/`stream` call, filled in when passed as `stats`.

    Prefill is the first forward pass (the prompt, producing the first new token); decode is every
    later step. Times cover forward passes and sampling, not the caller's handling of the tokens.
    """

    batch: int = 0
    prompt_tokens: int = 0    # real (unpadded) prompt tokens over the batch
    steps: int = 0            # forward passes run = new tokens per sequence
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """New tokens per second over the batch, after the first."""
        return self.batch * (self.steps - 1) / self.decode_seconds if self.decode_seconds else 0.0


class Bloom:
    """A loaded model: `forward` on token ids, `generate` and `stream` on text."""

    def __init__(self, checkpoint: Checkpoint, transformer: Transformer):
        self.checkpoint, self.transformer = checkpoint, transformer
        self.geometry = checkpoint.geometry
        self.tokenizer = checkpoint.tokenizer
        config = checkpoint.config
        self.eos_token_id: int | None = config.get("eos_token_id")
        pad = config.get("pad_token_id")
        self.pad_token_id: int = pad if pad is not None else (self.eos_token_id or 0)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                past: KVCache | None = None, *, last_only: bool = False) -> tuple[torch.Tensor, KVCache]:
        """(B, T) ids -> (B, T, vocab) logits and the KV cache; pass `past` back to continue.

        `attention_mask` covers cached and new tokens, (B, past + T), 0 on left padding.
        `last_only`: logits of the last position only, (B, 1, vocab) (skips most of the lm_head).
        """
        return self.transformer.forward(input_ids, attention_mask, past, last_only=last_only)

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (B, T) left-padded with the pad token, and the attention mask (B, T)."""
        encodings = [self._require_tokenizer().encode(p).ids for p in prompts]
        if any(len(ids) == 0 for ids in encodings):
            raise ValueError("a prompt encodes to no tokens; give each prompt some text")
        longest = max(len(ids) for ids in encodings)
        input_ids = torch.full((len(prompts), longest), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), longest), dtype=torch.long)
        for row, ids in enumerate(encodings):
            input_ids[row, longest - len(ids):] = torch.tensor(ids)
            attention_mask[row, longest - len(ids):] = 1
        return input_ids, attention_mask

    def generate(self, prompt: str | list[str], max_new_tokens: int = 50, *, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                 stats: GenerationStats | None = None) -> str | list[str]:
        """The continuation of `prompt` (or of each prompt of a list, batched together).

        temperature 0 is greedy; above 0 samples, restricted to the `top_k` most likely tokens
        (0: all) and to the smallest set whose probability reaches `top_p`. `seed` makes
        sampling reproducible. Stops at the end-of-sequence token or after `max_new_tokens`.
        `stats`: a GenerationStats to fill in with token counts and timings.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        input_ids, attention_mask = self.encode(prompts)
        output = self.generate_ids(input_ids, attention_mask, max_new_tokens, temperature=temperature,
                                   top_k=top_k, top_p=top_p, seed=seed, stats=stats)
        texts = [self._decode(row) for row in output[:, input_ids.shape[1]:].tolist()]
        return texts[0] if isinstance(prompt, str) else texts

    def stream(self, prompt: str, max_new_tokens: int = 50, *, temperature: float = 0.0,
               top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
               stats: GenerationStats | None = None) -> Iterator[str]:
        """Yield the continuation of `prompt` piece by piece as tokens are produced."""
        input_ids, attention_mask = self.encode([prompt])
        tokens: list[int] = []
        shown = ""
        for token in self._steps(input_ids, attention_mask, max_new_tokens, temperature, top_k, top_p, seed, stats):
            if token.item() == self.eos_token_id:
                break
            tokens.append(token.item())
            text = self._decode(tokens)
            if text.endswith("\ufffd"):
                continue  # a character split over tokens: wait for the rest of its bytes
            yield text[len(shown):]
            shown = text
        text = self._decode(tokens)
        if len(text) > len(shown):
            yield text[len(shown):]

    def generate_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     max_new_tokens: int = 50, *, temperature: float = 0.0, top_k: int = 0,
                     top_p: float = 1.0, seed: int | None = None, stats: GenerationStats | None = None) -> torch.Tensor:
        """Prompt ids (B, T) followed by up to `max_new_tokens` new ones, (B, T + n); a sequence
        that has ended is filled with the pad token, as transformers' `generate` does."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        new = list(self._steps(input_ids, attention_mask, max_new_tokens, temperature, top_k, top_p, seed, stats))
        return torch.cat([input_ids.cpu(), *(token[:, None] for token in new)], dim=1)

    def _steps(self, input_ids, attention_mask, max_new_tokens, temperature, top_k, top_p, seed, stats):
        """Yield each step's next tokens, (B,), until every sequence has ended."""
        if max_new_tokens < 0 or temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
            raise ValueError("need max_new_tokens >= 0, temperature >= 0, 0 < top_p <= 1, top_k >= 0")
        stats = stats if stats is not None else GenerationStats()
        stats.batch, stats.prompt_tokens = input_ids.shape[0], int(attention_mask.sum())
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        ended = torch.zeros(input_ids.shape[0], dtype=torch.bool)
        past = KVCache(self.geometry.n_layer, capacity=input_ids.shape[1] + max_new_tokens)
        step_ids = input_ids
        for step in range(max_new_tokens):
            start = time.perf_counter()
            logits, past = self.transformer.forward(step_ids, attention_mask, past, last_only=True)
            token = next_tokens(logits[:, -1].float().cpu(), temperature, top_k, top_p, generator)  # (B,)
            elapsed = time.perf_counter() - start
            if step == 0:
                stats.prefill_seconds = elapsed
            else:
                stats.decode_seconds += elapsed
            stats.steps = step + 1
            token = token.masked_fill(ended, self.pad_token_id)
            if self.eos_token_id is not None:
                ended |= token == self.eos_token_id
            yield token
            if ended.all():
                return
            step_ids = token[:, None]
            attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)

    def _decode(self, ids: list[int]) -> str:
        if self.eos_token_id in ids:
            ids = ids[:ids.index(self.eos_token_id)]
        return self._require_tokenizer().decode(ids, skip_special_tokens=True)

    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise ManifestError(self.checkpoint.directory / TOKENIZER_NAMES[0], "no tokenizer in this directory",
                                "Convert from a checkpoint that has tokenizer.json, or call forward() with token ids.")
        return self.tokenizer

    def close(self) -> None:
        """Stop the prefetch thread and close the files (the mappings go with the last tensor)."""
        self.checkpoint.close()

    def __enter__(self) -> "Bloom":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def top_k_mask(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Set all but the `k` largest logits of each row to -inf (k = 0: keep all). (B, V) -> (B, V)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth_largest = torch.topk(logits, k, dim=-1).values[..., -1:]                      # (B, 1)
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def top_p_mask(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches `p`. (B, V) -> (B, V)."""
    if p >= 1:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)               # (B, V)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs       # probability of the more likely tokens
    drop_sorted = mass_before >= p                    # the first token always has 0 before it
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def next_tokens(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """Pick one token per row of (B, V) logits: argmax at temperature 0, else a filtered sample."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = top_p_mask(top_k_mask(logits / temperature, top_k), top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)[:, 0]
