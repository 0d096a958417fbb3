"""The BLOOM forward pass, one block at a time over the weights the checkpoint holds or streams.

Same arithmetic as transformers' `BloomForCausalLM` (the correctness reference in the tests):
word embeddings → word_embeddings_layernorm → n_layer × block → ln_f → lm_head tied to the
embeddings. A block is pre-LayerNorm attention with ALiBi position bias, then a GELU (tanh) MLP,
each added to the residual stream taken before its LayerNorm.

Shapes: B batch, T new tokens, S = past + T keys, H hidden, nh heads, hs = H / nh head size.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from bloomconv import kernels
from bloomconv.format import EMBEDDINGS_UNIT, FINAL_UNIT, block_unit, dtype_name
from bloomconv.geometry import Geometry
from bloomconv.kernels import fourbit, step_ops

from .checkpoint import Checkpoint
from .memory import PREFILL_ROWS
from .records import (BlockWeights, LayerNormWeights, LinearWeights, UnitBytes, block_weights, embedding_weights,
                      final_weights)

__all__ = ["KVCache", "Transformer", "alibi_bias", "alibi_slopes", "default_prefill_dtype", "gelu"]


class KVCache:
    """Keys and values of every block for the tokens seen so far, each (B, nh, S, hs).

    Storage is allocated for `capacity` tokens (generation knows its final length) and grows
    geometrically past it, so appending one token per step does not copy the whole cache.
    """

    def __init__(self, n_layer: int, capacity: int = 0):
        self.capacity = capacity
        self._keys: list[torch.Tensor | None] = [None] * n_layer
        self._values: list[torch.Tensor | None] = [None] * n_layer
        self._lengths = [0] * n_layer

    @property
    def nbytes(self) -> int:
        """Memory the cache holds (its allocated capacity, not only the tokens cached)."""
        return sum(t.numel() * t.element_size() for t in (*self._keys, *self._values) if t is not None)

    @property
    def length(self) -> int:
        """Tokens cached (the blocks used agree once a forward pass has finished; a pipeline stage
        uses only its own)."""
        return max(self._lengths)

    def append(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add (B, nh, T, hs) keys and values; return all of this block's, (B, nh, S, hs)."""
        keys, values, start = self.reserve(layer, key.shape, key)
        end = start + key.shape[2]
        keys[:, :, start:end] = key
        values[:, :, start:end] = value
        return keys[:, :, :end], values[:, :, :end]

    def reserve(self, layer: int, shape: Sequence[int], like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Room for keys and values of `shape` (B, nh, T, hs), counted as cached from now on: this
        block's whole storage for keys and for values, (B, nh, capacity, hs) contiguous, of
        `like`'s dtype and device, and the position the T new ones go to. The caller writes them
        there."""
        start = self._lengths[layer]
        end = start + shape[2]
        stored = self._keys[layer]
        if stored is None or stored.shape[2] < end:
            capacity = max(end, 2 * start, self.capacity)
            self._keys[layer] = _grown(stored, shape, like, start, capacity)
            self._values[layer] = _grown(self._values[layer], shape, like, start, capacity)
        self._lengths[layer] = end
        return self._keys[layer], self._values[layer], start


def _grown(stored: torch.Tensor | None, shape: Sequence[int], like: torch.Tensor, length: int,
           capacity: int) -> torch.Tensor:
    B, nh, _, hs = shape
    grown = like.new_empty(B, nh, capacity, hs)
    if stored is not None:
        grown[:, :, :length] = stored[:, :, :length]
    return grown


def alibi_slopes(n_head: int) -> torch.Tensor:
    """Per-head ALiBi slopes, (nh,): a geometric series, interleaved when nh is not a power of 2."""
    closest = 2 ** math.floor(math.log2(n_head))
    slopes = torch.tensor(2 ** (-8 / closest), dtype=torch.float32) ** torch.arange(1, 1 + closest)
    if closest != n_head:
        extra = min(closest, n_head - closest)
        extra_slopes = torch.tensor(2 ** (-4 / closest), dtype=torch.float32) ** torch.arange(1, 1 + 2 * extra, 2)
        slopes = torch.cat([slopes, extra_slopes])
    return slopes


def alibi_bias(attention_mask: torch.Tensor, n_head: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, S) mask -> (B, nh, 1, S) bias. Positions count real tokens only (left padding is 0)."""
    positions = (attention_mask.cumsum(dim=-1) - 1) * attention_mask                   # (B, S)
    slopes = alibi_slopes(n_head).to(attention_mask.device)                              # (nh,)
    return (slopes[None, :, None, None] * positions[:, None, None, :]).to(dtype)       # (B, nh, 1, S)


def gelu(x: torch.Tensor) -> torch.Tensor:
    """BLOOM's GELU, x/2 · (1 + tanh(0.79788456 · x · (1 + 0.044715 x²))) as transformers' BloomGelu
    writes it: the tanh approximation, in one fused kernel (sqrt(2/π) = 0.7978845608…): the compiled
    one for fp32 on the CPU (several times faster than torch's on one thread), else torch's."""
    return step_ops.gelu_tanh(x) if step_ops.takes(x) else F.gelu(x, approximate="tanh")


PREFILL_DTYPES = (torch.float32, torch.bfloat16)


def default_prefill_dtype(dtype: torch.dtype, device: torch.device, stored_dtype: str) -> torch.dtype:
    """The products' dtype of a pass over more than PREFILL_ROWS rows when the caller names none:
    bf16 for fp32 compute on a CPU with bf16 dot products (`kernels.bf16_dot_products`) over weights
    stored in bf16 (BLOOM's own; int8 codes and 4-bit weights quantized from them stay exact in
    bf16), where torch's bf16 GEMM runs at about twice the fp32 rate for a difference in the logits
    below what a reader of them sees (README, "Prefill in bf16"); else the compute dtype."""
    bf16_pays = (dtype == torch.float32 and device.type == "cpu" and stored_dtype == dtype_name(torch.bfloat16)
                 and kernels.bf16_dot_products())
    return torch.bfloat16 if bf16_pays else dtype


class Transformer:
    """BLOOM over a Checkpoint, one file of weights at a time, in the order the checkpoint reads
    them ahead: embedding rows, blocks, ln_f, then the embeddings again as the lm_head."""

    def __init__(self, checkpoint: Checkpoint, dtype: torch.dtype = torch.float32, device="cpu",
                 prefill_dtype: torch.dtype | None = None):
        self.checkpoint = checkpoint
        self.geometry: Geometry = checkpoint.geometry
        self.dtype, self.device = dtype, torch.device(device)
        # the products of passes over PREFILL_ROWS+ rows
        self.prefill_dtype = prefill_dtype or default_prefill_dtype(dtype, self.device,
                                                                    checkpoint.manifest.model["dtype"])
        self.copies_to_device = self.device.type != "cpu"  # see _on_device; tests set it on the CPU too
        # every weight exact in bf16 (stored bf16, int8 codes or 4-bit weights quantized from bf16)
        # and the kernels multiply bf16 on AMX tiles here: the choice is the directory's, not a
        # record's, so that each piece of a streamed matrix multiplies alike
        self.bf16_tiles = (self.device.type == "cpu" and checkpoint.manifest.model["dtype"] == dtype_name(torch.bfloat16)
                           and kernels.bf16_tiles())
        # the blocks' weights are 4-bit in blocks of 32 (what `fourbit.takes_int8_activations` takes)
        # and the CPU has int8 dot products: the directory's choice too, as for the tiles
        quantization = checkpoint.manifest.quantization
        self.int8_blocks = (self.device.type == "cpu" and quantization is not None
                            and quantization.block_size == 32 and kernels.int8_dot_products())

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                past: KVCache | None = None, *, last_only: bool = False) -> tuple[torch.Tensor, KVCache]:
        """Logits (B, T, vocab) — (B, 1, vocab) with `last_only` — and the cache extended by T.

        `attention_mask` (B, past + T) marks real tokens 1 and padding 0; pad on the left.
        """
        input_ids = input_ids.to(self.device)
        B, T = input_ids.shape
        past = past if past is not None else KVCache(self.geometry.n_layer)
        bias = self.attention_bias(attention_mask, B, T, past.length)
        with self.threads_for(B * T):
            x = self.embed(input_ids)
            return self.run(x, range(self.geometry.n_layer), bias, past, head=True, last_only=last_only), past

    def attention_bias(self, attention_mask: torch.Tensor | None, B: int, T: int, cached: int) -> torch.Tensor:
        """ALiBi bias plus causal and padding mask, (B, nh, T, S), for T new tokens after `cached`."""
        S = cached + T
        if attention_mask is None:
            attention_mask = torch.ones(B, S, dtype=torch.long, device=self.device)
        attention_mask = attention_mask.to(self.device, torch.long)
        if attention_mask.shape != (B, S):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; it must be "
                             f"(batch, cached + new tokens) = ({B}, {S})")
        # Query t sits at position past + t: it sees every earlier key that is not padding. A
        # finite minimum, not -inf: a padding query that sees nothing gets a harmless uniform
        # softmax rather than NaNs that its cached keys and values would carry to later tokens.
        causal = torch.ones(T, S, dtype=torch.bool, device=self.device).tril(diagonal=cached)
        allowed = causal[None, None] & attention_mask.bool()[:, None, None, :]         # (B, 1, T, S)
        blocked = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device)
        blocked.masked_fill_(~allowed, torch.finfo(self.dtype).min)
        return alibi_bias(attention_mask, self.geometry.n_head, self.dtype) + blocked   # (B, nh, T, S)

    def threads_for(self, rows: int) -> contextlib.AbstractContextManager:
        """Where a pass over `rows` token rows runs: a decoding step on the CPU gives the cores to
        bloomconv's kernels."""
        decoding = self.device.type == "cpu" and rows <= fourbit.SMALL_BATCH_ROWS
        return kernels.kernels_own_the_cores() if decoding else contextlib.nullcontext()

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T, H): embedding rows and word_embeddings_layernorm."""
        # the B*T embedding rows are looked up where the weights live, then moved (not the matrix)
        embeddings = embedding_weights(self.checkpoint.peek(EMBEDDINGS_UNIT))
        x = embeddings.word_embeddings.rows(input_ids.cpu(), self.dtype).to(self.device)  # (B, T, H)
        return self._layer_norm(x, embeddings.layernorm.to(self.device))

    def run(self, x: torch.Tensor, layers: range, bias: torch.Tensor, past: KVCache, *, head: bool,
            last_only: bool = False) -> torch.Tensor:
        """Hidden states (B, T, H) through the blocks `layers`; with `head`, then ln_f and the
        lm_head: logits (B, T, vocab), or (B, 1, vocab) with `last_only`. A pipeline stage runs
        its own blocks (`pipeline`); the whole model runs them all and the head."""
        units = [*(block_unit(layer) for layer in layers), *((FINAL_UNIT, EMBEDDINGS_UNIT) if head else ())]
        if not units:
            return x
        with contextlib.closing(self._on_device(units)) as weights:  # closing releases a unit held on errors
            for layer in layers:
                x = self._block(x, block_weights(next(weights), layer), layer, bias, past)
            if not head:
                return x
            x = self._layer_norm(x, final_weights(next(weights)))
            if last_only:
                # standard strides: with a size-1 dim strided otherwise, F.linear goes through bmm and
                # copies the whole lm_head weight per call (50x slower for bf16)
                x = x[:, -1:].clone(memory_format=torch.contiguous_format)
            head = embedding_weights(next(weights)).word_embeddings
            return head.matmul(x, self.products_dtype(x, head=True))                        # (B, T, vocab)

    def _on_device(self, units: list[str]) -> Iterator[UnitBytes]:
        """Each unit's tensors on the compute device, in the order of a pass.

        On the CPU: the checkpoint's own views (nothing is copied). On an accelerator, unit i+1 is
        copied on a side stream while the kernels queued for unit i run (a copy on the compute
        stream would wait for them), and the compute stream waits for a unit's copy before using
        it. A streamed unit's host buffer is released only once its copy has finished.
        """
        stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

        def start(unit):
            host = contextlib.ExitStack()
            source = host.enter_context(self.checkpoint.use(unit))
            if not self.copies_to_device:
                return host, source, None
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                on_device = source.to(self.device)
                copied = stream.record_event() if stream is not None else None
            return host, on_device, copied

        pending = start(units[0])
        for following in [*units[1:], None]:
            host, tensors, copied = pending
            if copied is not None:
                torch.cuda.current_stream(self.device).wait_event(copied)
            try:
                yield tensors  # the caller queues this unit's work
            finally:
                if copied is not None:
                    copied.synchronize()
                host.close()
            pending = start(following) if following is not None else None
    def _block(self, x: torch.Tensor, w: BlockWeights, layer: int, bias: torch.Tensor,
               past: KVCache) -> torch.Tensor:
        B, T, H = x.shape
        nh = self.geometry.n_head
        hs = H // nh

        h = self._layer_norm(x, w.input_layernorm)
        fused = self._linear(h, w.query_key_value)                                      # (B, T, 3H)
        # The fused projection is laid out per head: [q_h, k_h, v_h] for head 0, 1, …
        if T == 1 and step_ops.takes(fused, bias):
            # a decoding step: cache write and attention in one compiled call
            keys, values, cached = past.reserve(layer, (B, nh, T, hs), fused)              # (B, nh, capacity, hs)
            context = step_ops.attention_step(fused, keys, values, cached, bias)         # (B, 1, H)
        else:
            q, k, v = fused.view(B, T, nh, 3, hs).permute(3, 0, 2, 1, 4)               # 3 × (B, nh, T, hs)
            k, v = past.append(layer, k, v)                                               # (B, nh, S, hs)
            # softmax(q k^T / sqrt(hs) + alibi + mask) v in one fused kernel (softmax in fp32 inside)
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)            # (B, nh, T, hs)
            context = context.transpose(1, 2).reshape(B, T, H)                            # (B, T, H)
        x = x + self._linear(context, w.dense)

        h = self._layer_norm(x, w.post_attention_layernorm)
        h = gelu(self._linear(h, w.dense_h_to_4h))                                       # (B, T, 4H)
        return x + self._linear(h, w.dense_4h_to_h)                                     # (B, T, H)

    @property
    def products_on_tiles(self) -> bool:
        """Whether batched decoding steps multiply in bf16 on AMX tiles (`products_dtype`)."""
        return self.bf16_tiles and self.prefill_dtype == torch.bfloat16

    @property
    def int8_activations(self) -> bool:
        """Whether decoding steps of fewer than kernels.BF16_TILE_ROWS sequences multiply the blocks'
        4-bit weights (blocks of 32) by int8 activations (`products_dtype`): where the CPU has int8
        dot products and the products are not asked to stay fp32 (prefill_dtype bf16, as for AMX
        tiles)."""
        return self.int8_blocks and self.prefill_dtype == torch.bfloat16

    def products_dtype(self, x: torch.Tensor, *, head: bool = False) -> torch.dtype:
        """The dtype of the products of x (B, T, H) with a weight: prefill_dtype for passes over more
        than PREFILL_ROWS rows (not the lm_head, whose logits stay in full precision); for a decoding
        step of kernels.BF16_TILE_ROWS..PREFILL_ROWS sequences (one row each; the lm_head too)
        prefill_dtype where bf16 products run on AMX tiles, several times the fp32 kernels' rate;
        for a step of fewer sequences torch.int8 where `int8_activations` (the blocks' 4-bit
        weights only: other records multiply x as it is, `products_in`; the lm_head's logits stay
        fp32 products' even when the embeddings are 4-bit); else x's."""
        rows = x.shape[:-1].numel()
        if rows > PREFILL_ROWS:
            return x.dtype if head else self.prefill_dtype
        if x.shape[-2] != 1:
            return x.dtype
        if rows >= kernels.BF16_TILE_ROWS:
            return self.prefill_dtype if self.products_on_tiles else x.dtype
        return torch.int8 if self.int8_activations and not head else x.dtype

    def _layer_norm(self, x: torch.Tensor, w: LayerNormWeights) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], *w.in_dtype(x.dtype), self.geometry.layer_norm_epsilon)

    def _linear(self, x: torch.Tensor, w: LinearWeights) -> torch.Tensor:
        # the product in products_dtype (bf16: torch's bf16 GEMM or AMX tiles), the bias and the
        # rest in x's dtype; matmul returns a new tensor: add in place
        return w.weight.matmul(x, self.products_dtype(x)).add_(w.bias_in(x.dtype))
