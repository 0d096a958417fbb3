"""Weight quantization in bitsandbytes' layouts: int8 (LLM.int8() vector-wise) and 4-bit NF4/FP4.

Pure PyTorch and stateless, shared by the converter (which writes these tensors) and the runtime
(which reads them), so neither imports the other and nothing here imports bitsandbytes. Work runs
over chunks of rows or of whole 4-bit blocks (`chunk_elements` at a time) written into preallocated
outputs, so memory stays bounded on a 250880×14336 matrix; there are no loops over elements.

Each function gives what bitsandbytes 0.50 gives on CPU, bit for bit (tests/test_quant.py checks
against bitsandbytes itself)::

    quantize_int8(W, "source")   == F.int8_vectorwise_quant(W, threshold=0.0)[:2]
    quantize_int8(W, "float16")  == the same of W.half(): what Linear8bitLt/transformers store
    dequantize_int8(CB, SCB, dt) == F.int8_vectorwise_dequant(CB, SCB).to(dt)
    quantize_4bit(W, t, b, dq)   == {"weight": packed, **{"weight." + k: v for k, v in
                                     state.as_dict(packed=True).items()}}
                                    for packed, state = F.quantize_4bit(W, b, quant_type=t,
                                                                        compress_statistics=dq)
    dequantize_4bit(stored)      == F.dequantize_4bit(packed, state) with bitsandbytes' reference
                                    (PyTorch) kernel

bitsandbytes' CPU C kernels for `F.dequantize_4bit` agree with its reference kernel in value but
not always in bits: the scalar one (CPUs without AVX-512, or a last dimension that is not a
multiple of 16) writes -0.0 for FP4 code 8 where the reference, AVX-512 and NEON kernels write
+0.0. The AVX-512 one also takes absmax per row, so it is wrong when the last dimension is a
multiple of 16 but not of the block size (e.g. 96 with blocks of 64); BLOOM's shapes are not.

Speed on a 2-core AMD EPYC with AVX-512 (bf16 input, best of 2-5 runs, seconds, bloomconv vs
bitsandbytes on the whole tensor, load average ~3 from other jobs; peak memory above the input)::

                         4096×1024        250880×1024     peak, 250880×1024
    nf4 quantize         0.08 vs 0.07     5.3 vs 5.3      0.54 GB vs 3.5 GB  (with double quant)
    fp4 quantize         0.07 vs 0.08     5.4 vs 22.1
    int8 quantize        0.007 vs 0.007   1.9 vs 2.9      0.39 GB vs 2.5 GB  (of W.half())
    nf4 dequantize       0.011 vs <0.001  1.5 vs 0.2      (bitsandbytes: multithreaded C)

>>> w = torch.randn(8, 64, dtype=torch.bfloat16)
>>> CB, SCB = quantize_int8(w)
>>> (dequantize_int8(CB, SCB, torch.bfloat16) - w).abs().max() <= SCB.max() / 127
tensor(True)
>>> stored = quantize_4bit(w, QuantType.NF4, block_size=64, double_quant=True)
>>> sorted(stored)                                  # doctest: +NORMALIZE_WHITESPACE
['weight', 'weight.absmax', 'weight.nested_absmax', 'weight.nested_quant_map',
 'weight.quant_map', 'weight.quant_state.bitsandbytes__nf4']
>>> dequantize_4bit(stored).shape, dequantize_4bit(stored).dtype
(torch.Size([8, 64]), torch.bfloat16)
"""
from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping

import torch

from .errors import QuantizationError
from .format import (INT8_SCALE_SUFFIX, BLOCK_SIZES_4BIT, DEFAULT_BLOCK_SIZE, DEFAULT_INT8_SCALE_FROM, INT8_SCALE_FROM,
                     NESTED_BLOCK_SIZE, NESTED_ABSMAX_SUFFIX, NESTED_QUANT_MAP_SUFFIX, QUANT_ABSMAX_SUFFIX, QUANT_MAP_SUFFIX,
                     QUANT_STATE_SUFFIX_TEMPLATE, QuantType)

__all__ = [
    "BLOCK_SIZES", "CHUNK_ELEMENTS", "DEFAULT_BLOCK_SIZE", "DEFAULT_INT8_SCALE_FROM", "FourBitState",
    "INT8_SCALE_FROM", "NESTED_BLOCK_SIZE", "code_table", "dequantize_4bit", "dequantize_int8",
    "dequantize_stored", "dynamic_map", "quantize_4bit", "quantize_int8",
]

BLOCK_SIZES = BLOCK_SIZES_4BIT
CHUNK_ELEMENTS = 1 << 20  # per step: 2 MB of bf16 input, 4 MB fp32 temporaries (in cache: 16M took 2.6x as long)

_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_INT8_DEQUANT_SCALE = 7.874015718698502e-3  # 1/127 exactly as bitsandbytes writes it
_LUT_BINS = 65536  # bitsandbytes' CPU 8-bit blockwise quantizer rounds x/absmax to one of these


# ---------------------------------------------------------------------------------------- int8

def quantize_int8(weight: torch.Tensor, scale_from: str = DEFAULT_INT8_SCALE_FROM, *, name: str = "weight",
                  chunk_elements: int = CHUNK_ELEMENTS) -> tuple[torch.Tensor, torch.Tensor]:
    """LLM.int8() vector-wise quantization of a 2-D weight: (CB int8 [out, in], SCB float32 [out]).

    SCB is each row's absmax (not absmax/127); CB = round-half-even(w * (127/SCB)) in fp32. An
    all-zero row gives SCB 0 and CB 0. A row whose absmax is below 127/FLT_MAX (~7.5e-37) also
    gets CB 0, as in bitsandbytes (127/SCB overflows): an absolute error below 7.5e-37. With `scale_from="float16"` a weight with a value float16
    cannot hold (|w| >= 65520, which casts to inf) raises QuantizationError, where bitsandbytes
    would store an infinite scale; `name` only labels errors.

    >>> CB, SCB = quantize_int8(torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0]]))
    >>> CB.tolist(), SCB.tolist()
    ([[64, -127, 32], [0, 0, 0]], [2.0, 0.0])
    """
    _check_float_weight(weight, name)
    if weight.dim() != 2:
        raise QuantizationError(name, f"int8 quantization needs a 2-D weight, got shape {tuple(weight.shape)}",
                                "Quantize only Linear weights to int8.")
    if scale_from not in INT8_SCALE_FROM:
        raise QuantizationError(name, f"unknown int8 scale_from {scale_from!r}",
                                f"Use one of {', '.join(INT8_SCALE_FROM)}.")
    rows, cols = weight.shape
    CB = torch.empty((rows, cols), dtype=torch.int8)
    SCB = torch.empty(rows, dtype=torch.float32)
    step = max(1, chunk_elements // max(cols, 1))
    for start in range(0, rows, step):
        w = weight[start:start + step]                                  # (r, in)
        if scale_from == "float16":
            w = w.to(torch.float16)
        absmax = torch.amax(w.abs(), dim=1).float()                     # (r,)
        if not torch.isfinite(absmax).all():
            raise _non_finite_int8(name, weight, scale_from)
        # `127.0 / absmax` is reciprocal-then-multiply, as in bitsandbytes; zero rows stay 0, not NaN
        multiplier = torch.where(absmax > 0, 127.0 / absmax, 0.0)
        scaled = torch.mul(w, multiplier.unsqueeze(-1)).round_()        # (r, in) fp32; one temporary
        CB[start:start + step] = scaled
        SCB[start:start + step] = absmax
    return CB, SCB


def dequantize_int8(CB: torch.Tensor, SCB: torch.Tensor, dtype: torch.dtype = torch.float32, *,
                    chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """`CB * SCB / 127` computed in fp32 (as bitsandbytes does), then cast to `dtype`.

    >>> dequantize_int8(torch.tensor([[64, -127]], dtype=torch.int8), torch.tensor([2.0]))
    tensor([[ 1.0079, -2.0000]])
    """
    rows, cols = CB.shape
    out = torch.empty((rows, cols), dtype=dtype, device=CB.device)
    step = max(1, chunk_elements // max(cols, 1))
    for start in range(0, rows, step):
        rows_SCB = SCB[start:start + step].view(-1, 1)
        out[start:start + step] = CB[start:start + step] * rows_SCB * _INT8_DEQUANT_SCALE  # same order as bnb
    return out


def _non_finite_int8(name: str, weight: torch.Tensor, scale_from: str) -> QuantizationError:
    if scale_from == "float16" and torch.isfinite(weight).all():
        peak = weight.abs().max().item()
        return QuantizationError(
            name, f"holds a value of magnitude {peak:g}, beyond float16's range, so int8 quantization of "
            "its float16 cast (what transformers does) would store an infinite scale",
            "Quantize with int8_scale_from='source' (scales taken in the weight's own dtype), or use nf4/fp4.")
    return QuantizationError(name, "holds NaN or infinite values", "The checkpoint is damaged; get it again.")


# ---------------------------------------------------------------------------------------- 4-bit

@dataclasses.dataclass(frozen=True)
class FourBitState:
    """The non-tensor part of a 4-bit weight's state: bitsandbytes' `quant_state.bitsandbytes__*` blob.

    >>> s = FourBitState(QuantType.NF4, 64, torch.bfloat16, (4, 64))
    >>> bytes(s.to_blob().tolist())
    b'{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [4, 64]}'
    >>> FourBitState.from_blob(s.to_blob()) == s
    True
    """

    quant_type: QuantType
    block_size: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    nested_offset: float | None = None  # double quant: mean(absmax), subtracted before 8-bit coding

    @property
    def nested(self) -> bool:
        return self.nested_offset is not None

    @property
    def blob_key(self) -> str:
        """Key of the blob next to the packed data, e.g. `weight.quant_state.bitsandbytes__nf4`."""
        return "weight." + QUANT_STATE_SUFFIX_TEMPLATE.format(quant_type=self.quant_type.value)

    def to_dict(self) -> dict:
        """Exactly the non-tensor items of `QuantState.as_dict()`, in its order."""
        d = {"quant_type": self.quant_type.value, "blocksize": self.block_size,
             "dtype": str(self.dtype).removeprefix("torch."), "shape": list(self.shape)}
        if self.nested:
            d.update(nested_blocksize=NESTED_BLOCK_SIZE, nested_dtype="float32", nested_offset=self.nested_offset)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "FourBitState":
        base = {"quant_type", "blocksize", "dtype", "shape"}
        nested = {"nested_blocksize", "nested_dtype", "nested_offset"}
        fix = "The quantized file is damaged or was not written by bitsandbytes/bloomconv; convert again."
        if not isinstance(d, dict) or set(d) not in (base, base | nested):
            raise QuantizationError("quant_state", f"unexpected 4-bit state {d!r}", fix)
        if (d["quant_type"] not in ("nf4", "fp4") or d["blocksize"] not in BLOCK_SIZES
                or d["dtype"] not in ("bfloat16", "float16", "float32")
                or not isinstance(d["shape"], list) or not all(type(x) is int and x >= 0 for x in d["shape"])):
            raise QuantizationError("quant_state", f"invalid 4-bit state {d!r}", fix)
        if set(d) == base:
            offset = None
        elif d["nested_blocksize"] != NESTED_BLOCK_SIZE or d["nested_dtype"] != "float32" \
                or not isinstance(d["nested_offset"], (int, float)):
            raise QuantizationError("quant_state", f"unsupported double-quant state {d!r}", fix)
        else:
            offset = float(d["nested_offset"])
        return cls(QuantType(d["quant_type"]), d["blocksize"], getattr(torch, d["dtype"]), tuple(d["shape"]),
                   offset)

    def to_blob(self) -> torch.Tensor:
        """UTF-8 JSON as a uint8 tensor, byte for byte what `QuantState.as_dict(packed=True)` stores."""
        return torch.tensor(list(json.dumps(self.to_dict()).encode("utf-8")), dtype=torch.uint8)

    @classmethod
    def from_blob(cls, blob: torch.Tensor) -> "FourBitState":
        try:
            d = json.loads(bytes(blob.to(torch.uint8).view(-1).tolist()).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise QuantizationError("quant_state", f"4-bit state blob is not JSON ({exc})",
                                    "The quantized file is damaged; copy it again or convert again.") from None
        return cls.from_dict(d)


@functools.cache
def code_table(quant_type: QuantType) -> torch.Tensor:
    """The 16 fp32 values a 4-bit code stands for, in code order (`F.get_4bit_type`)."""
    if quant_type is QuantType.NF4:
        # NormalFloat: quantiles of N(0, 1), as bitsandbytes hard-codes them
        return torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                             -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                             0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
                             0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                             0.7229568362236023, 1.0], dtype=torch.float32)
    if quant_type is QuantType.FP4:
        # sign, 2 exponent bits, 1 mantissa bit (bias 2), scaled to [-1, 1]. Code 8 is +0.0: bitsandbytes
        # writes it as `-0`, which Python reads as the integer 0
        table = torch.tensor([0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0,
                              0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0], dtype=torch.float32)
        return table.div_(table.abs().max())
    raise QuantizationError("weight", f"{quant_type!r} is not a 4-bit type", "Use nf4 or fp4.")


@functools.cache
def _bucket_bounds(quant_type: QuantType) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Midpoints of the sorted code, and sorted position -> code (uint8; None when the code is
    already sorted): bitsandbytes' CPU rule."""
    code = code_table(quant_type)
    order = torch.argsort(code)  # the same call as bitsandbytes: its tie order decides FP4's two zeros
    identity = torch.equal(order, torch.arange(16))
    return (code[order[:-1]] + code[order[1:]]) / 2, None if identity else order.to(torch.uint8)


def quantize_4bit(weight: torch.Tensor, quant_type: QuantType | str, block_size: int = DEFAULT_BLOCK_SIZE,
                  double_quant: bool = False, *, name: str = "weight",
                  chunk_elements: int = CHUNK_ELEMENTS) -> dict[str, torch.Tensor]:
    """Blockwise 4-bit quantization: packed data plus bitsandbytes' packed state, keyed like Linear4bit.

    Returns `weight` (uint8 [ceil(numel/2), 1], element 2i in the high nibble), `weight.absmax`
    (fp32 [nblocks], or uint8 codes with double quant), `weight.quant_map` (fp32 [16]), with double
    quant `weight.nested_absmax` and `weight.nested_quant_map` (fp32 [256]), and
    `weight.quant_state.bitsandbytes__<type>` (uint8 JSON). Blocks run over the flattened tensor.

    >>> stored = quantize_4bit(torch.ones(2, 32), "nf4", block_size=32)
    >>> stored["weight"].shape, stored["weight.absmax"].tolist()
    (torch.Size([32, 1]), [1.0, 1.0])
    """
    quant_type = QuantType(quant_type)
    _check_float_weight(weight, name)
    if not quant_type.is_4bit:
        raise QuantizationError(name, f"{quant_type.value!r} is not a 4-bit type", "Use nf4 or fp4.")
    if block_size not in BLOCK_SIZES:
        raise QuantizationError(name, f"block size {block_size} is not one bitsandbytes supports",
                                f"Use one of {', '.join(map(str, BLOCK_SIZES))}.")
    flat = weight.reshape(-1)
    n = flat.numel()
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8)
    absmax = torch.empty(-(-n // block_size), dtype=torch.float32)
    bounds, order = _bucket_bounds(quant_type)
    quantize_chunk = _compiled_4bit_quantizer() or _quantize_4bit_chunk
    step = max(1, chunk_elements // block_size) * block_size
    for start in range(0, n, step):  # whole blocks; `start` is even, so chunks start on a byte
        chunk_absmax, chunk_packed = quantize_chunk(flat[start:start + step], block_size, bounds, order)
        absmax[start // block_size:start // block_size + chunk_absmax.numel()] = chunk_absmax
        packed[start // 2:start // 2 + chunk_packed.numel(), 0] = chunk_packed
    if not torch.isfinite(absmax).all():
        raise QuantizationError(name, "holds NaN or infinite values", "The checkpoint is damaged; get it again.")

    stored = {"weight": packed, f"weight.{QUANT_ABSMAX_SUFFIX}": absmax,
              f"weight.{QUANT_MAP_SUFFIX}": code_table(quant_type).clone()}
    offset = None
    if double_quant:
        # offset is the mean over ALL blocks, which is why absmax is gathered before this step
        mean = absmax.mean()
        codes, nested_absmax = _quantize_blockwise8(absmax - mean)
        offset = mean.item()
        stored[f"weight.{QUANT_ABSMAX_SUFFIX}"] = codes
        stored[f"weight.{NESTED_ABSMAX_SUFFIX}"] = nested_absmax
        stored[f"weight.{NESTED_QUANT_MAP_SUFFIX}"] = dynamic_map().clone()
    state = FourBitState(quant_type, block_size, weight.dtype, tuple(weight.shape), offset)
    stored[state.blob_key] = state.to_blob()
    return stored


def _compiled_4bit_quantizer():
    """The C quantizer (bit for bit `_quantize_4bit_chunk`, ~10x faster), or None where it was not built.

    Imported late: the kernels package imports this module.
    """
    from bloomconv.runtime import kernels
    return kernels.fourbit_quantize_blocks if kernels.available() else None


def _quantize_4bit_chunk(chunk: torch.Tensor, block_size: int, bounds: torch.Tensor,
                         order: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' default `quantize_4bit` kernel on whole blocks (+ the tensor's partial tail), in
    torch: the reference for the compiled quantizer, and the path where it was not built."""
    x = chunk.float()                                                   # (n,)
    full = x.numel() - x.numel() % block_size
    blocks = x[:full].view(-1, block_size)                              # (nb, bs)
    absmax = blocks.abs().max(dim=-1).values                            # (nb,)
    # reciprocal-then-multiply, as bitsandbytes; a zero block scales by 1e38 and stays 0
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38)).view(-1, 1)).clamp_(-1, 1).view(-1)
    if full < x.numel():
        # the tensor's last, partial block: bitsandbytes divides here and keeps the clamped absmax
        tail_absmax = x[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_absmax.unsqueeze(0)])
        scaled = torch.cat([scaled, torch.clamp(x[full:] / tail_absmax, -1, 1)])
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    positions = torch.bucketize(scaled, bounds, out_int32=True)         # (n,) sorted position; ties go low
    # NF4's code is sorted, so a position is its code: skip the gather (a fifth of the time)
    codes = positions.to(torch.uint8) if order is None else order[positions]
    return absmax, (codes[0::2] << 4) | codes[1::2]


def dequantize_4bit(stored: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None, *,
                    chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """The weight `quantize_4bit` stored, in its original shape: `code[q] * absmax` in fp32, then cast.

    `stored` holds the keys `quantize_4bit` returns (a Linear4bit state dict without the bias).
    `dtype` defaults to the weight's original dtype; Linear4bit's forward dequantizes straight to
    its compute dtype instead, which `dtype=compute_dtype` reproduces.
    """
    blob_keys = [k for k in stored if k.startswith("weight.quant_state.")]
    if len(blob_keys) != 1:
        raise QuantizationError("weight", f"expected one quant_state blob, found {blob_keys}",
                                "Pass every tensor quantize_4bit stored for this weight.")
    state = FourBitState.from_blob(stored[blob_keys[0]])
    absmax = stored[f"weight.{QUANT_ABSMAX_SUFFIX}"]
    if state.nested:
        absmax = _dequantize_blockwise8(absmax, stored[f"weight.{NESTED_ABSMAX_SUFFIX}"],
                                        stored[f"weight.{NESTED_QUANT_MAP_SUFFIX}"])
        absmax += torch.tensor(state.nested_offset, dtype=torch.float32, device=absmax.device)
    # each byte holds two codes: look both values up at once
    packed = stored["weight"].view(torch.uint8).view(-1)
    code = code_table(state.quant_type).to(packed.device)
    pair_values = torch.stack([code.repeat_interleave(16), code.repeat(16)], dim=1)   # (256, 2)
    out = torch.empty(state.shape, dtype=dtype or state.dtype, device=packed.device)
    flat_out = out.view(-1)
    n, block_size = flat_out.numel(), state.block_size
    step = max(1, chunk_elements // block_size) * block_size
    for start in range(0, n, step):
        end = min(start + step, n)
        pairs = pair_values.index_select(0, packed[start // 2:(end + 1) // 2].int())         # (m/2, 2)
        values = pairs.view(-1)[:end - start]                                                   # (m,)
        scales = absmax[start // block_size:-(-end // block_size)]
        full = (end - start) - (end - start) % block_size
        flat_out[start:start + full] = (values[:full].view(-1, block_size)
                                        * scales[:full // block_size, None]).view(-1)
        if full < end - start:
            flat_out[start + full:end] = values[full:] * scales[-1]
    return out


# ------------------------------------------------------------------- double quant (8-bit dynamic)

@functools.cache
def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (`F.create_dynamic_map()`): the code of nested absmax."""
    values = [0.0, 1.0]
    for exponent in range(7):  # 7 decades, 2**e fraction steps each, both signs: 254 values
        boundaries = torch.linspace(0.1, 1, 2 ** exponent + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        scale = 10 ** (exponent - 6)
        values += (scale * means).tolist() + (-scale * means).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


@functools.cache
def _dynamic_lut() -> torch.Tensor:
    """bitsandbytes' CPU kernel maps x/absmax onto 65536 even bins over [-1, 1], then each bin to the
    nearest code (ties low); rebuilding its table reproduces its output bit for bit."""
    code = dynamic_map()
    midpoints = 0.5 * (code[:-1] + code[1:])
    bins = -1.0 + (2.0 * torch.arange(_LUT_BINS, dtype=torch.float32)) / (_LUT_BINS - 1)
    return torch.searchsorted(midpoints, bins, side="left").to(torch.uint8)


def _quantize_blockwise8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`F.quantize_blockwise(x, blocksize=256)` of a 1-D fp32 tensor: (uint8 codes, fp32 absmax)."""
    n = x.numel()
    blocks = torch.nn.functional.pad(x, (0, -n % NESTED_BLOCK_SIZE)).view(-1, NESTED_BLOCK_SIZE)  # (nb, 256)
    absmax = blocks.abs().max(dim=1).values
    inverse = torch.where(absmax > 0, 1.0 / absmax, 0.0)  # zero blocks: kept finite, coded 0 below
    normed = (blocks * inverse.unsqueeze(1)).clamp_(-1, 1)
    codes = _dynamic_lut()[((normed + 1.0) * 0.5 * (_LUT_BINS - 1) + 0.5).long()]
    codes[absmax == 0] = 0  # the kernel writes code 0 for an all-zero block
    return codes.view(-1)[:n], absmax


def _dequantize_blockwise8(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    values = code[codes.long()]
    return values * absmax.repeat_interleave(NESTED_BLOCK_SIZE)[:values.numel()]


def _check_float_weight(weight: torch.Tensor, name: str) -> None:
    if weight.dtype not in _FLOAT_DTYPES:
        raise QuantizationError(name, f"has dtype {weight.dtype}; only bfloat16, float16 and float32 "
                                "weights can be quantized", "Quantize the floating-point weights only.")


# ------------------------------------------------------------------------ whole state dicts

def dequantize_stored(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A plain state dict from stored tensors (a unit file, or a whole directory's).

    Each quantized `<module>.weight` with its `SCB` or 4-bit state becomes the float matrix it
    encodes (int8: float32; 4-bit: the dtype recorded in its state); other tensors pass through.

    >>> w = torch.randn(4, 64)
    >>> CB, SCB = quantize_int8(w)
    >>> sorted(dequantize_stored({"m.weight": CB, "m.SCB": SCB, "m.bias": torch.zeros(4)}))
    ['m.bias', 'm.weight']
    """
    out = {}
    for name, tensor in tensors.items():
        if name.endswith(f".{INT8_SCALE_SUFFIX}") or ".weight." in name:
            continue  # state of a quantized weight, consumed with it below
        module = name.removesuffix(".weight")
        scale = tensors.get(f"{module}.{INT8_SCALE_SUFFIX}") if name.endswith(".weight") else None
        if scale is not None:
            out[name] = dequantize_int8(tensor, scale)
        elif name.endswith(".weight") and any(k.startswith(f"{name}.quant_state.") for k in tensors):
            prefix = f"{module}."
            out[name] = dequantize_4bit({k.removeprefix(prefix): v for k, v in tensors.items()
                                         if k == name or k.startswith(f"{name}.")})
        else:
            out[name] = tensor
    return out
