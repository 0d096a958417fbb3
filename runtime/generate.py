"""Text in, text out: `load` a bloomconv directory, then `generate` or `stream`.

>>> model = load("bloom-560m-int8")                                      # doctest: +SKIP
>>> model.generate("The capital of France is", max_new_tokens=8)         # doctest: +SKIP
>>> model.generate("Q: 2+2?\\nA:", stop="\\n", repetition_penalty=1.2)     # doctest: +SKIP
>>> for piece in model.stream("Once upon a time", temperature=0.8, top_p=0.9, seed=1):  # doctest: +SKIP
...     print(piece, end="", flush=True)
>>> ids = model.tokenizer("Hello")                # token ids, list[int]  # doctest: +SKIP
>>> logits = model(ids)                           # (1, T, vocab)         # doctest: +SKIP
>>> model.config["n_layer"], model.config.n_layer                         # doctest: +SKIP
"""
from __future__ import annotations

import copy
import dataclasses
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from bloomconv.errors import ManifestError, OptionsError
from bloomconv.format import TOKENIZER_NAMES, dtype_name
from bloomconv.kernels import step_ops
from bloomconv.settings import INT8_EMBEDDINGS, QuantSettings

from .checkpoint import Checkpoint, open_checkpoint
from .model import PREFILL_DTYPES, KVCache, Transformer

if TYPE_CHECKING:
    from .pipeline import PipelineOptions

__all__ = ["Bloom", "Config", "GenerationOptions", "GenerationStats", "Tokenizer", "load", "next_tokens",
           "repetition_penalty", "top_k_mask", "top_p_mask"]


def load(directory: str | os.PathLike, *, device: str | torch.device = "cpu", verify: str = "fast",
         dtype: torch.dtype = torch.float32, ram_budget: str | int | None = None,
         threads: int | None = None, max_tokens: int | None = None, public_key: str | os.PathLike | None = None,
         certificate_chain: tuple[str | os.PathLike, ...] = (), identity: str | None = None,
         issuer: str | None = None, pipeline: "bool | PipelineOptions" = False,
         prefill_dtype: torch.dtype | None = None) -> "Bloom | None":
    """Open a converted (optionally quantized) directory for inference.

    Returns once headers are checked; the weights that stay in RAM are read on a background
    thread meanwhile (the first forward pass waits for what it needs).

    `verify`: "fast" checks sizes and headers against the manifest, "full" hashes every byte.
    `device`: "cpu", or an accelerator such as "cuda": each file is copied to it in turn, the
    next one on a side stream while the current one computes; 4-bit weights multiply through
    bitsandbytes' kernels there, int8 ones are dequantized on the device in pieces.
    `dtype`: compute dtype. float32 matches transformers' fp32 to ~1e-6 (prompts over 64 tokens
    too with prefill_dtype=torch.float32, see below); on the CPU 16-bit and
    int8 weights are widened in registers by bloomconv's kernels, never copied to fp32 (without
    a C compiler at install time, 16-bit weights are widened once at load when they fit).
    bfloat16 activations also work: torch's bf16 GEMM for large batches of bf16 weights.
    `prefill_dtype`: the dtype of the matrix products of a pass over more than PREFILL_ROWS (64)
    token rows — a prompt's prefill, or a batch that large — where multiplying, not reading the
    weights, is the cost. None: bfloat16 for float32 compute on a CPU with bf16 dot products
    (AVX512-BF16, AMX; detected by bloomconv's compiled kernels, so fp32 where they were not built)
    over bf16-stored weights (`model.default_prefill_dtype`), else `dtype`;
    torch.float32 keeps every product in fp32 (transformers' fp32 results to ~1e-6, at about half
    the prefill speed on such CPUs). torch.bfloat16 with float32 compute rounds those
    products' inputs and results to bf16 (torch's bf16 GEMM; weights stored as bf16, int8 codes and
    4-bit weights quantized from bf16 stay exact; fp16- and fp32-stored weights are rounded to
    bf16 a piece at a time, or, fp16 with the compiled kernels, multiplied in fp32 by the rounded
    x), as torch.autocast does for linear layers; layer norms, attention and the residual stream
    stay fp32. Decoding steps keep fp32 products, except steps of 4 to 64 sequences
    (`kernels.BF16_TILE_ROWS`, `kernels.TILE_BATCH_ROWS`) over bf16-stored weights (and int8 or
    4-bit ones quantized from them) on a CPU with AMX tiles: they multiply in prefill_dtype too when
    it is bfloat16 (AMX tiles, several times the fp32 rate there; the lm_head too), and, when it is
    bfloat16, steps of 1 to 3 sequences on a CPU with AVX512-VNNI multiply 4-bit weights (blocks of
    32, the preset's) by int8 activations: x rounded to int8 per 32 values, as llama.cpp does
    (`fourbit.takes_int8_activations`; several times fewer instructions than fp32 products, for a
    difference in the logits well below the 4-bit weights' own: README "Int8 activations in small
    decoding steps").
    `ram_budget`: the memory this model may take, e.g. "12GB", "800MB", "1.5GiB" or an int: the
    weights held in RAM, the buffers the rest streams through every forward pass, and the KV
    cache and working set of `max_tokens` tokens (see `checkpoint`); the process's own memory
    (torch ~150 MB, the tokenizer) comes on top: peak RssAnon stays within the budget + ~300 MB.
    "min": the least that runs. None: 90 % of available memory (MemAvailable, or the memory
    cgroup's room if smaller; psutil's figure where there is no /proc) less 128 MB
    (`memory.default_ram_budget`). Below the minimum the run needs, MemoryBudgetError names it,
    before any weight is read.
    `max_tokens`: tokens (prompt + new, summed over a batch) to plan KV cache and working set for;
    None: 256. A longer `generate` runs if the memory left holds the difference, else raises
    MemoryBudgetError.
    `threads`: torch's intra-op threads (process-wide, `torch.set_num_threads`); None leaves it.
    bloomconv's kernels use as many. During a decoding step torch's own ops run on one thread
    (process-wide too, restored after the step): run one model per process, not one per thread.
    `public_key` (or `certificate_chain`, or Sigstore's `identity` and `issuer`): the directory
    must carry a signature by that signer over exactly its files (`bloomconv.signing`), checked
    before any weight is read; this hashes every byte once, whatever `verify` says. An unsigned
    directory, another signer's, or a file changed, added or removed since signing raise
    SignatureError naming the cause.
    `pipeline`: True (or a `pipeline.PipelineOptions`) in a torchrun-launched process: this rank
    holds a share of the blocks and the ranks run the model together (`pipeline`); rank 0 gets the
    model, the other ranks serve until it is closed, then get None.
    Raises VerificationError naming each damaged file, OptionsError for a device torch lacks.

    >>> model = load("bloom-560m-int8", public_key="publisher.pub")         # doctest: +SKIP
    """
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be at least 1, not {threads}")
        torch.set_num_threads(threads)
    if prefill_dtype not in (None, *PREFILL_DTYPES):
        raise OptionsError(f"prefill_dtype {prefill_dtype} is not one the runtime multiplies in. Use "
                           f"{' or '.join(map(str, PREFILL_DTYPES))}, or None for the default.")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise OptionsError(f"device {str(device)!r} is not available: this torch ({torch.__version__}) sees no "
                           "CUDA GPU. Use device 'cpu', or install torch's CUDA build on a machine with one.")
    if pipeline:
        from .pipeline import PipelineOptions, load_pipeline
        options = pipeline if isinstance(pipeline, PipelineOptions) else PipelineOptions()
        return load_pipeline(directory, options, device=device, dtype=dtype, ram_budget=ram_budget, verify=verify,
                             max_tokens=max_tokens, public_key=public_key, certificate_chain=certificate_chain,
                             identity=identity, issuer=issuer, prefill_dtype=prefill_dtype)
    checkpoint = open_checkpoint(directory, verify=verify, ram_budget=ram_budget, dtype=dtype, max_tokens=max_tokens,
                                 public_key=public_key,
                                 certificate_chain=certificate_chain, identity=identity, issuer=issuer)
    return Bloom(checkpoint, Transformer(checkpoint, dtype=dtype, device=device, prefill_dtype=prefill_dtype))


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


@dataclasses.dataclass(frozen=True)
class GenerationOptions:
    """How `generate`, `stream` and `generate_ids` choose each token and when a sequence ends.

    At most `max_new_tokens` are added, fewer where the end-of-sequence token comes first.
    temperature 0 is greedy; above 0 samples, restricted to the `top_k` most likely tokens (0: all)
    and to the smallest set whose probability reaches `top_p`. `repetition_penalty` (CTRL's rule,
    as transformers applies it, before temperature and filtering): the logit of every token
    already in the sequence, prompt included, is divided by it when positive and multiplied by it
    when negative; 1 leaves logits alone. `stop`: a string or strings; a sequence ends as soon as
    a new token completes one, as transformers' `stop_strings` do (the token may run past its end,
    and it may begin at the end of the prompt), and the text returned stops before it (empty when
    it began in the prompt). `seed` makes sampling reproducible.
    """

    max_new_tokens: int = 50
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop: str | Sequence[str] | None = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        object.__setattr__(self, "stop", stop)
        if self.max_new_tokens < 0:
            raise OptionsError(f"max_new_tokens {self.max_new_tokens} is negative. Use 0 or more.")
        if self.temperature < 0:
            raise OptionsError(f"temperature {self.temperature} is negative. Use 0 for greedy, above 0 to sample.")
        if self.top_k < 0:
            raise OptionsError(f"top_k {self.top_k} is negative. Use 0 for no limit, or a positive count.")
        if not 0 < self.top_p <= 1:
            raise OptionsError(f"top_p {self.top_p} is outside (0, 1]. Use 1 for no limit.")
        if not self.repetition_penalty > 0:
            raise OptionsError(f"repetition_penalty {self.repetition_penalty} is not positive. Use 1 for none, "
                               "above 1 to discourage repeats.")
        if not all(isinstance(s, str) and s for s in stop):
            raise OptionsError(f"stop {stop!r} must be non-empty strings. Drop the empty one.")


class Config(Mapping):
    """The directory's config.json, read-only: `config["n_layer"]` or `config.n_layer`, iteration
    and `get` as a dict's; `to_dict()` for a copy you may change."""

    def __init__(self, values: dict[str, Any]):
        object.__setattr__(self, "_values", copy.deepcopy(values))

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __getattr__(self, name: str) -> Any:
        if not name.startswith("_") and name in self._values:
            return self._values[name]
        raise AttributeError(f"config.json has no {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("the config is read-only; change a copy from to_dict()")

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self._values)

    def __repr__(self) -> str:
        return f"Config({self._values!r})"


class Tokenizer:
    """Text to token ids and back with the directory's tokenizer.json (no special tokens added).

    `tokenizer("text")` and `encode("text")` give a list of ids (`tokenizer([...])` a list per
    text); `decode(ids)` gives the text, special tokens kept unless `skip_special_tokens`, as
    transformers' tokenizers do. `backend` is the `tokenizers.Tokenizer` itself.
    """

    def __init__(self, backend):
        self.backend = backend

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text).ids

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = False) -> str:
        """The text of one sequence of ids (a list or a 1-D tensor)."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def __call__(self, text: str | Sequence[str]) -> list[int] | list[list[int]]:
        if isinstance(text, str):
            return self.encode(text)
        return [encoding.ids for encoding in self.backend.encode_batch(list(text))]

    def __len__(self) -> int:
        """Vocabulary size, added tokens included."""
        return self.backend.get_vocab_size()

    def __repr__(self) -> str:
        return f"Tokenizer(vocab {len(self)})"


class Bloom:
    """A loaded model: `model(ids)` or `forward` on token ids, `generate` and `stream` on text.

    `config` is config.json (`Config`), `tokenizer` a `Tokenizer` (None when the directory has no
    tokenizer.json: text in or out then raises), `geometry` the shapes, `checkpoint` the files.
    """

    def __init__(self, checkpoint: Checkpoint, transformer: Transformer):
        self.checkpoint, self.transformer = checkpoint, transformer
        self.geometry = checkpoint.geometry
        self.config = Config(checkpoint.config)
        self.tokenizer = Tokenizer(checkpoint.tokenizer) if checkpoint.tokenizer is not None else None
        self.eos_token_id: int | None = self.config.get("eos_token_id")
        pad = self.config.get("pad_token_id")
        self.pad_token_id: int = pad if pad is not None else (self.eos_token_id or 0)

    def __repr__(self) -> str:
        g, residency = self.geometry, self.checkpoint.residency
        quantization = self.checkpoint.manifest.quantization
        stored = (_describe(quantization) if quantization is not None
                  else f"{self.checkpoint.manifest.model['dtype']}, not quantized")
        return (f"Bloom({str(self.checkpoint.directory)!r}: hidden {g.hidden_size}, {g.n_layer} blocks, "
                f"{g.n_head} heads, vocab {g.vocab_size}; weights {stored}; {residency.pinned_count} in RAM "
                f"({(residency.pinned_bytes + residency.pinned_piece_bytes) / 1e6:,.1f} MB), "
                f"{len(residency.streamed)} streamed from disk, budget "
                f"{residency.budget / 1e6:,.1f} MB; computes {dtype_name(self.transformer.dtype)}"
                + (f" (prefill products {dtype_name(self.transformer.prefill_dtype)}"
                   + (", batched steps' too, on AMX tiles" if self.transformer.products_on_tiles else "")
                   + ("; 4-bit steps of 1-3 sequences with int8 activations"
                      if self.transformer.int8_activations else "") + ")"
                   if self.transformer.prefill_dtype != self.transformer.dtype else "")
                + f" on {self.transformer.device})")

    def __call__(self, input_ids: torch.Tensor | Sequence[int] | Sequence[Sequence[int]],
                 attention_mask: torch.Tensor | Sequence | None = None) -> torch.Tensor:
        """Logits (B, T, vocab) of ids (B, T), as transformers' `model(input_ids).logits`; one
        sequence, (T,) or a list of ids, gives (1, T, vocab). No cache: see `forward` for one."""
        input_ids = torch.as_tensor(input_ids, dtype=torch.long)
        if attention_mask is not None:
            attention_mask = torch.as_tensor(attention_mask, dtype=torch.long)
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
            attention_mask = attention_mask[None] if attention_mask is not None else None
        return self.forward(input_ids, attention_mask)[0]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                past: KVCache | None = None, *, last_only: bool = False) -> tuple[torch.Tensor, KVCache]:
        """(B, T) ids -> (B, T, vocab) logits and the KV cache; pass `past` back to continue.

        `attention_mask` covers cached and new tokens, (B, past + T), 0 on left padding.
        `last_only`: logits of the last position only, (B, 1, vocab) (skips most of the lm_head).
        """
        return self.transformer.forward(input_ids, attention_mask, past, last_only=last_only)

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (B, T) left-padded with the pad token, and the attention mask (B, T)."""
        tokenizer = self._require_tokenizer()
        encodings = [tokenizer.encode(p) for p in prompts]
        if not encodings:
            raise OptionsError("no prompt given. Give at least one.")
        for number, ids in enumerate(encodings, 1):
            if not ids:
                raise OptionsError(f"prompt {number} of {len(prompts)} ({prompts[number - 1]!r}) encodes to no "
                                   "tokens. Give each prompt some text.")
        longest = max(len(ids) for ids in encodings)
        input_ids = torch.full((len(prompts), longest), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), longest), dtype=torch.long)
        for row, ids in enumerate(encodings):
            input_ids[row, longest - len(ids):] = torch.tensor(ids)
            attention_mask[row, longest - len(ids):] = 1
        return input_ids, attention_mask

    def generate(self, prompt: str | list[str], max_new_tokens: int = 50, *, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
                 stop: str | Sequence[str] | None = None, seed: int | None = None,
                 stats: GenerationStats | None = None) -> str | list[str]:
        """The continuation of `prompt` (or of each prompt of a list, batched together).

        The options are documented on `GenerationOptions`. Each sequence stops at the
        end-of-sequence token, at a `stop` string (not returned) or after `max_new_tokens`.
        `stats`: a GenerationStats to fill in with token counts and timings.
        """
        options = GenerationOptions(max_new_tokens, temperature, top_k, top_p, repetition_penalty, stop, seed)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        input_ids, attention_mask = self.encode(prompts)
        new = self._steps(input_ids, attention_mask, options, stats)
        output = torch.cat([input_ids[:, :0], *(token[:, None] for token in new)], dim=1)  # (B, n)
        tails = self._prompt_tails(input_ids, attention_mask, options.stop)
        texts = [_before_stop(self._decode(row), options.stop, tail) for row, tail in zip(output.tolist(), tails)]
        return texts[0] if isinstance(prompt, str) else texts

    def stream(self, prompt: str, max_new_tokens: int = 50, *, temperature: float = 0.0,
               top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
               stop: str | Sequence[str] | None = None, seed: int | None = None,
               stats: GenerationStats | None = None) -> Iterator[str]:
        """Yield the continuation of `prompt` piece by piece as tokens are produced; the pieces
        join to what `generate` returns. Text that may be the start of a `stop` string is held
        back until the next tokens show it is not. Options and prompt are checked on the call,
        before the first piece is asked for."""
        options = GenerationOptions(max_new_tokens, temperature, top_k, top_p, repetition_penalty, stop, seed)
        input_ids, attention_mask = self.encode([prompt])
        return self._pieces(input_ids, attention_mask, options, stats)

    def _pieces(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, options: GenerationOptions,
                stats: GenerationStats | None) -> Iterator[str]:
        (tail,) = self._prompt_tails(input_ids, attention_mask, options.stop)
        tokens: list[int] = []
        shown = 0  # characters yielded so far
        for token in self._steps(input_ids, attention_mask, options, stats):
            if token.item() == self.eos_token_id:
                break
            tokens.append(token.item())
            text = self._decode(tokens)
            if text.endswith("\ufffd"):
                continue  # a character split over tokens: wait for the rest of its bytes
            settled = _settled(text, options.stop, tail)
            if len(settled) > shown:
                yield settled[shown:]
                shown = len(settled)
        text = _before_stop(self._decode(tokens), options.stop, tail)
        if len(text) > shown:
            yield text[shown:]

    def generate_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     max_new_tokens: int = 50, *, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                     repetition_penalty: float = 1.0, stop: str | Sequence[str] | None = None,
                     seed: int | None = None, stats: GenerationStats | None = None) -> torch.Tensor:
        """Prompt ids (B, T) followed by up to `max_new_tokens` new ones, (B, T + n); a sequence
        that has ended is filled with the pad token, as transformers' `generate` does. A sequence
        ended by a `stop` string keeps the token that completed it."""
        options = GenerationOptions(max_new_tokens, temperature, top_k, top_p, repetition_penalty, stop, seed)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        new = list(self._steps(input_ids, attention_mask, options, stats))
        return torch.cat([input_ids.cpu(), *(token[:, None] for token in new)], dim=1)

    def _steps(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, options: GenerationOptions,
               stats: GenerationStats | None) -> Iterator[torch.Tensor]:
        """Yield each step's next tokens, (B,), until every sequence has ended."""
        stats = stats if stats is not None else GenerationStats()
        B = input_ids.shape[0]
        stats.batch, stats.prompt_tokens = B, int(attention_mask.sum())
        generator = torch.Generator().manual_seed(options.seed) if options.seed is not None else None
        ended = torch.zeros(B, dtype=torch.bool)
        rows = torch.arange(B)
        seen = None  # (B, vocab): tokens in each sequence so far, for the repetition penalty
        new_ids: list[list[int]] = [[] for _ in range(B)]  # for the stop strings
        tails = self._prompt_tails(input_ids, attention_mask, options.stop)
        self.checkpoint.check_room(B * (input_ids.shape[1] + options.max_new_tokens), self.transformer.dtype)
        past = KVCache(self.geometry.n_layer, capacity=input_ids.shape[1] + options.max_new_tokens)
        step_ids = input_ids
        for step in range(options.max_new_tokens):
            start = time.perf_counter()
            logits, past = self.transformer.forward(step_ids, attention_mask, past, last_only=True)
            logits = logits[:, -1].float().cpu()                                             # (B, V)
            if options.repetition_penalty != 1:
                if seen is None:
                    seen = torch.zeros(logits.shape, dtype=torch.bool)
                    real = attention_mask.cpu().bool()  # padding is not part of a sequence
                    seen[rows[:, None].expand_as(input_ids)[real], input_ids.cpu()[real]] = True
                logits = repetition_penalty(logits, seen, options.repetition_penalty)
            token = next_tokens(logits, options.temperature, options.top_k, options.top_p, generator)  # (B,)
            elapsed = time.perf_counter() - start
            if step == 0:
                stats.prefill_seconds = elapsed
            else:
                stats.decode_seconds += elapsed
            stats.steps = step + 1
            token = token.masked_fill(ended, self.pad_token_id)
            if seen is not None:
                seen[rows, token] = True
            if self.eos_token_id is not None:
                ended |= token == self.eos_token_id
            if options.stop:
                for row in (~ended).nonzero().flatten().tolist():
                    new_ids[row].append(int(token[row]))
                    if _stop_at(self._decode(new_ids[row]), options.stop, tails[row]) is not None:
                        ended[row] = True
            yield token
            if ended.all():
                return
            step_ids = token[:, None]
            attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)

    def _prompt_tails(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      stop: tuple[str, ...]) -> list[str]:
        """The end of each prompt's text in which a stop string could begin: one character less
        than the longest (none without stop strings)."""
        reach = max(map(len, stop), default=1) - 1
        if reach == 0:
            return [""] * input_ids.shape[0]
        tokenizer = self._require_tokenizer()
        return [tokenizer.decode(ids[real.bool()], skip_special_tokens=True)[-reach:]
                for ids, real in zip(input_ids.cpu(), attention_mask.cpu())]

    def _decode(self, ids: list[int]) -> str:
        if self.eos_token_id in ids:
            ids = ids[:ids.index(self.eos_token_id)]
        return self._require_tokenizer().decode(ids, skip_special_tokens=True)

    def _require_tokenizer(self) -> Tokenizer:
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


def _describe(quantization: QuantSettings) -> str:
    """"nf4, block 128, double quant, embeddings kept" and the like."""
    parts = [quantization.quant_type.value]
    if quantization.block_size:
        parts.append(f"block {quantization.block_size}")
    if quantization.double_quant:
        parts.append("double quant")
    parts.append("embeddings int8" if quantization.embeddings == INT8_EMBEDDINGS else
                 "embeddings quantized" if quantization.embeddings else "embeddings kept")
    return ", ".join(parts)


def _stop_at(text: str, stop: tuple[str, ...], context: str = "") -> int | None:
    """Where in the new `text` the first stop string begins (0 for one beginning in `context`,
    the end of the prompt before it); None when none ends in `text`."""
    joined = context + text
    found = [at for at in (joined.find(s, max(0, len(context) - len(s) + 1)) for s in stop) if at >= 0]
    return max(0, min(found) - len(context)) if found else None


def _before_stop(text: str, stop: tuple[str, ...], context: str = "") -> str:
    at = _stop_at(text, stop, context)
    return text if at is None else text[:at]


def _settled(text: str, stop: tuple[str, ...], context: str = "") -> str:
    """The part of `text` later tokens cannot make part of a stop string: cut before a stop
    string, and short of a tail that could be the start of one."""
    if _stop_at(text, stop, context) is not None:
        return _before_stop(text, stop, context)
    joined = context + text
    pending = max((n for s in stop for n in range(1, len(s)) if joined.endswith(s[:n])), default=0)
    return text[:len(text) - min(pending, len(text))]


def repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty, as transformers' RepetitionPenaltyLogitsProcessor applies it:
    logits of tokens already in the sequence (`seen`, bool) are divided by `penalty` when
    positive, multiplied by it when negative. (B, V) -> (B, V)."""
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


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
        return step_ops.argmax_rows(logits) if step_ops.takes(logits) else logits.argmax(dim=-1)
    logits = top_p_mask(top_k_mask(logits / temperature, top_k), top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)[:, 0]
