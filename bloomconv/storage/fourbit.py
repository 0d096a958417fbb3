"""bitsandbytes' blockwise 4-bit weights, NF4 and FP4: packed codes plus their quant state.

Stored under the names `Linear4bit` saves (`<module>.weight` uint8 [ceil(out*in/2), 1], element 2i
in the high nibble; `.weight.absmax`, `.weight.quant_map`, with double quant `.weight.nested_absmax`
and `.weight.nested_quant_map`; `.weight.quant_state.bitsandbytes__nf4|fp4`, a JSON blob). Blocks
run over the flattened tensor. Each function gives what bitsandbytes gives on CPU, bit for bit
(tests/test_quant.py checks against bitsandbytes itself)::

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

Products go through the fused 4-bit kernel (bloomconv/kernels/csrc/fourbit.c), which decodes the
packed bytes as it multiplies; on accelerators through `bitsandbytes.matmul_4bit`.

>>> w = torch.randn(8, 64, dtype=torch.bfloat16)
>>> stored = quantize_4bit(w, QuantType.NF4, block_size=64, double_quant=True)
>>> sorted(stored) == sorted(NF4Storage.stored_names(QuantSettings(QuantType.NF4, 64, True)))
True
>>> dequantize_4bit(stored).shape, dequantize_4bit(stored).dtype
(torch.Size([8, 64]), torch.bfloat16)
"""
from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable, Mapping

import torch

from bloomconv import kernels
from bloomconv.errors import QuantizationError
from bloomconv.format import (BLOCK_SIZES_4BIT, NESTED_ABSMAX_SUFFIX, NESTED_BLOCK_SIZE,
                              NESTED_QUANT_MAP_SUFFIX, QUANT_ABSMAX_SUFFIX, QUANT_MAP_SUFFIX,
                              QUANT_STATE_SUFFIX_TEMPLATE, SOURCE_FLOAT_DTYPES, QuantType, dtype_name)
from bloomconv.kernels import fourbit as fourbit_kernel
from bloomconv.safetensors_io import StreamedTensor, tensor_bytes
from bloomconv.settings import QuantSettings

from .base import (CHUNK_ELEMENTS, NO_REPORT, STREAM_PIECE_ELEMENTS, Lookup, ReadReport, Storage, check_float_weight,
                   register, slice_granularity)
from .fallback import linear_in_pieces, products_in

__all__ = ["FP4Storage", "FourBitGrid", "FourBitState", "FourBitStorage", "FourBitWeight", "NF4Storage", "NestedScales",
           "block_errors", "code_table", "dequantize_4bit", "dynamic_map", "pack_nibbles", "quantize_4bit",
           "searched_scales"]

_LUT_BINS = 65536  # bitsandbytes' CPU 8-bit blockwise quantizer rounds x/absmax to one of these
_NESTED_NAMES = (f"weight.{NESTED_ABSMAX_SUFFIX}", f"weight.{NESTED_QUANT_MAP_SUFFIX}")


def blob_name(quant_type: QuantType) -> str:
    """Name of the state blob next to the packed data, e.g. `weight.quant_state.bitsandbytes__nf4`."""
    return "weight." + QUANT_STATE_SUFFIX_TEMPLATE.format(quant_type=quant_type.value)


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
        return blob_name(self.quant_type)

    def to_dict(self) -> dict:
        """Exactly the non-tensor items of `QuantState.as_dict()`, in its order."""
        d = {"quant_type": self.quant_type.value, "blocksize": self.block_size,
             "dtype": dtype_name(self.dtype), "shape": list(self.shape)}
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
        if (d["quant_type"] not in ("nf4", "fp4") or d["blocksize"] not in BLOCK_SIZES_4BIT
                or d["dtype"] not in SOURCE_FLOAT_DTYPES
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


def quantize_4bit(weight: torch.Tensor, quant_type: QuantType | str, block_size: int = 64,
                  double_quant: bool = False, *, method: str = "rtn", name: str = "weight",
                  chunk_elements: int = CHUNK_ELEMENTS) -> dict[str, torch.Tensor]:
    """Blockwise 4-bit quantization: packed data plus bitsandbytes' packed state, keyed like Linear4bit.

    The arguments and their defaults are those of `bitsandbytes.functional.quantize_4bit`; what
    `quantize` stores by default is the preset in `bloomconv.settings`.

    Returns `weight` (uint8 [ceil(numel/2), 1], element 2i in the high nibble), `weight.absmax`
    (fp32 [nblocks], or uint8 codes with double quant), `weight.quant_map` (fp32 [16]), with double
    quant `weight.nested_absmax` and `weight.nested_quant_map` (fp32 [256]), and
    `weight.quant_state.bitsandbytes__<type>` (uint8 JSON). Blocks run over the flattened tensor.

    >>> stored = quantize_4bit(torch.ones(2, 32), "nf4", block_size=32)
    >>> stored["weight"].shape, stored["weight.absmax"].tolist()
    (torch.Size([32, 1]), [1.0, 1.0])

    `method="search"` stores the same layout with each block's scale chosen for the least weighted
    squared error (`searched_scales`) instead of bitsandbytes' absmax, each weight rounded to the
    code nearest it at the scale as stored.
    """
    quant_type = _check_4bit_request(weight, quant_type, block_size, name)
    flat = weight.reshape(-1)
    n = flat.numel()
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8)
    absmax = torch.empty(-(-n // block_size), dtype=torch.float32)
    packed_for = lambda start, end: packed[start // 2:(end + 1) // 2, 0]  # noqa: E731
    if method == "rtn":
        for _ in _quantized_block_runs(flat, quant_type, block_size, chunk_elements, absmax, packed_for):
            pass
        _check_finite(absmax, name)
        return {"weight": packed, **_state_tensors(weight, quant_type, block_size, double_quant, absmax)}
    _check_method(method, name)
    for _ in _searched_block_runs(flat, quant_type, block_size, chunk_elements, absmax,
                                  None if double_quant else packed_for):
        pass
    _check_finite(absmax, name)
    state = _state_tensors(weight, quant_type, block_size, double_quant, absmax)
    if double_quant:  # codes for the scales as stored, each 8-bit code chosen among its neighbours
        for _ in _searched_block_runs(flat, quant_type, block_size, chunk_elements, absmax, packed_for,
                                      nested=NestedScales.of(state)):
            pass
    return {"weight": packed, **state}


def _check_method(method: str, name: str) -> None:
    if method not in ("rtn", "search"):
        raise QuantizationError(name, f"4-bit method {method!r} is not a weight-only one",
                                "Use rtn or search here; gptq runs through the converter with calibration text.")


def _check_4bit_request(weight: torch.Tensor, quant_type: QuantType | str, block_size: int, name: str) -> QuantType:
    quant_type = QuantType(quant_type)
    check_float_weight(weight, name)
    if not quant_type.is_4bit:
        raise QuantizationError(name, f"{quant_type.value!r} is not a 4-bit type", "Use nf4 or fp4.")
    if block_size not in BLOCK_SIZES_4BIT:
        raise QuantizationError(name, f"block size {block_size} is not one bitsandbytes supports",
                                f"Use one of {', '.join(map(str, BLOCK_SIZES_4BIT))}.")
    return quant_type


def _check_finite(absmax: torch.Tensor, name: str) -> None:
    if not torch.isfinite(absmax).all():
        raise QuantizationError(name, "holds NaN or infinite values", "The checkpoint is damaged; get it again.")


def _block_runs(n: int, block_size: int, chunk_elements: int):
    """(start, end) of runs of about `chunk_elements` in whole blocks (the last may end mid-block);
    every `start` is even, so a run's codes start on a byte."""
    step = max(1, chunk_elements // block_size) * block_size
    for start in range(0, n, step):
        yield start, min(start + step, n)


def _quantized_block_runs(flat: torch.Tensor, quant_type: QuantType, block_size: int, chunk_elements: int,
                          absmax: torch.Tensor, packed_for: Callable[[int, int], torch.Tensor] | None,
                          report: ReadReport = NO_REPORT):
    """Quantize `flat` a run of blocks at a time: elements [start, end) go to `packed_for(start,
    end)` and their blocks' absmax into `absmax`; yields those codes when they are filled. With no
    `packed_for`, only the absmax are computed (and None is yielded)."""
    bounds, order = _bucket_bounds(quant_type)
    compiled = _compiled_4bit_quantizer()
    for start, end in _block_runs(flat.numel(), block_size, chunk_elements):
        packed = None if packed_for is None else packed_for(start, end)
        absmax_run = absmax[start // block_size:-(-end // block_size)]
        report.reading(start, end)
        if compiled is not None and (packed is None or packed.is_contiguous()):
            compiled(flat[start:end], block_size, bounds, order, absmax=absmax_run, packed=packed,
                     codes=packed is not None)
        else:
            run_absmax, run_packed = _quantize_4bit_chunk(flat[start:end], block_size, bounds, order)
            absmax_run.copy_(run_absmax)
            if packed is not None:
                packed.copy_(run_packed)
        if packed is not None:
            report.done(start, end)
        yield packed


# Candidate scales of the search, as fractions of the block absmax. Smaller ones clip the block's
# largest weights to resolve the rest more finely; each candidate is refined by least squares,
# SEARCH_REFITS times (each refit may move weights to other codes, so the next fit differs).
SEARCH_FACTORS = tuple(0.7 + 0.02 * i for i in range(16))
SEARCH_REFITS = 4


def searched_scales(blocks: torch.Tensor, quant_type: QuantType) -> torch.Tensor:
    """Per block (row of `blocks`, fp32 (nb, bs)), the scale s whose reconstruction
    `code[nearest(w / s)] * s` has the least weighted squared error (`_importance`) among absmax
    (round to nearest's scale) and, from each of absmax × SEARCH_FACTORS, the scales reached by
    alternating "round each weight to its nearest code" and "the weighted least-squares scale for
    those codes" SEARCH_REFITS times (llama.cpp's make_qx_quants / make_q4_K search the same way).
    Zero blocks keep scale 0.

    >>> blocks = torch.tensor([[1.0, 0.1, 0.2, -0.15]])
    >>> s, importance = searched_scales(blocks, QuantType.NF4), _importance(blocks)
    >>> absmax = blocks.abs().amax(1)
    >>> bool(block_errors(blocks, s, QuantType.NF4, importance) <= block_errors(blocks, absmax, QuantType.NF4, importance))
    True
    """
    absmax = blocks.abs().amax(dim=1)                                                   # (nb,)
    importance = _importance(blocks)
    best_scale, best_error = absmax, block_errors(blocks, absmax, quant_type, importance)
    for factor in SEARCH_FACTORS:
        scale = absmax * factor
        for refit in range(SEARCH_REFITS + 1):
            values, error = _nearest_codes(blocks, scale, quant_type, importance)      # (nb, bs), (nb,)
            better = error < best_error
            best_scale = torch.where(better, scale, best_scale)
            best_error = torch.where(better, error, best_error)
            if refit < SEARCH_REFITS:
                norm = (importance * values * values).sum(dim=1)
                fitted = (importance * blocks * values).sum(dim=1) / norm.clamp(min=1e-30)  # least squares, same codes
                scale = torch.where((norm > 0) & (fitted > 0), fitted, scale)
    return best_scale


def block_errors(blocks: torch.Tensor, scales: torch.Tensor, quant_type: QuantType,
                 importance: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Squared error per block of rounding each weight to its nearest code at `scales` (nb,),
    each weight's weighted by `importance`."""
    return _nearest_codes(blocks, scales, quant_type, importance)[1]


def _nearest_codes(blocks: torch.Tensor, scales: torch.Tensor, quant_type: QuantType,
                   importance: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    """The code value nearest each w / scale (nb, bs), and `block_errors` of them."""
    values = code_table(quant_type).to(blocks.device)[_nearest_positions(blocks, scales, quant_type)]
    return values, ((blocks - values * scales[:, None]).square_() * importance).sum(dim=1)


def _importance(blocks: torch.Tensor) -> torch.Tensor:
    """How much each weight's squared error counts in the search: rms(block) + |w|, the weights of
    llama.cpp's make_q4_K. Unweighted squared error clips a block's largest weights, which costs
    the model's outputs more than their share of that error."""
    return (blocks * blocks).mean(dim=1, keepdim=True).sqrt_() + blocks.abs()


def _nearest_positions(blocks: torch.Tensor, scales: torch.Tensor, quant_type: QuantType) -> torch.Tensor:
    """Index into `code_table` of the code nearest each w / scale (clamped to [-1, 1]); a zero scale
    gives the code of 0. Any sign of scale works: the decoder multiplies code by it."""
    inverse = torch.where(scales.abs() > 1e-38, 1.0 / scales, 0.0)
    scaled = (blocks * inverse[:, None]).clamp_(-1, 1)
    bounds, order = _bucket_bounds(quant_type)
    positions = torch.bucketize(scaled, bounds.to(blocks.device))
    return positions if order is None else order.to(blocks.device).long()[positions]


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Flat 4-bit codes (any integer dtype) → bytes, element 2i in the high nibble (an odd count
    gets a last low nibble of 0)."""
    codes = codes.reshape(-1).to(torch.uint8)
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_zeros(1)])
    return (codes[0::2] << 4) | codes[1::2]


@dataclasses.dataclass(frozen=True)
class NestedScales:
    """The double-quantized absmax as stored: 8-bit codes (refined in place), the fp32 absmax of
    each group of NESTED_BLOCK_SIZE codes, and the offset; a block's scale is
    `dynamic_map[code] * nested_absmax + offset`, computed as `dequantize_4bit` does."""

    codes: torch.Tensor          # (nblocks,) uint8
    nested_absmax: torch.Tensor  # (ceil(nblocks / 256),) fp32
    offset: float

    @classmethod
    def of(cls, state: Mapping[str, torch.Tensor]) -> "NestedScales":
        blob = next(v for k, v in state.items() if k.startswith("weight.quant_state."))
        return cls(state[f"weight.{QUANT_ABSMAX_SUFFIX}"], state[_NESTED_NAMES[0]], FourBitState.from_blob(blob).nested_offset)

    def scales(self, indices: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Stored scales of the blocks `indices` if they had `codes` (same length, any int dtype)."""
        nested_absmax = self.nested_absmax.to(codes.device)[indices // NESTED_BLOCK_SIZE]
        scales = dynamic_map().to(codes.device)[codes.long()] * nested_absmax
        return scales + torch.tensor(self.offset, dtype=torch.float32, device=codes.device)

    def set_nearest(self, indices: torch.Tensor, scales: torch.Tensor) -> None:
        """Store for the blocks `indices` the 8-bit codes nearest `scales` (bitsandbytes' rule)."""
        nested_absmax = self.nested_absmax.to(scales.device)[indices // NESTED_BLOCK_SIZE]
        normed = ((scales - self.offset) / nested_absmax.clamp(min=1e-38)).clamp_(-1, 1)
        lut = _dynamic_lut().to(scales.device)
        self.codes[indices.cpu()] = lut[((normed + 1.0) * 0.5 * (_LUT_BINS - 1) + 0.5).long()].cpu()

    def refine(self, blocks: torch.Tensor, indices: torch.Tensor, quant_type: QuantType, reach: int = 2) -> torch.Tensor:
        """For the blocks `indices` (rows of `blocks`), the 8-bit code within `reach` of the stored one
        whose scale gives the least error (as `searched_scales` weighs it); stores those codes and
        returns the scales they stand for."""
        stored = self.codes[indices.cpu()].to(blocks.device).long()
        importance = _importance(blocks)
        best_codes = stored
        best_error = block_errors(blocks, self.scales(indices, best_codes), quant_type, importance)
        for step in (*range(-reach, 0), *range(1, reach + 1)):
            candidate = (stored + step).clamp_(0, 255)
            error = block_errors(blocks, self.scales(indices, candidate), quant_type, importance)
            better = error < best_error
            best_codes = torch.where(better, candidate, best_codes)
            best_error = torch.where(better, error, best_error)
        self.codes[indices.cpu()] = best_codes.to(torch.uint8).cpu()
        return self.scales(indices, best_codes)


class FourBitGrid:
    """GPTQ's grid (bloomconv.storage.gptq) for a 4-bit weight (out, in) in bitsandbytes' layout: a
    block is `block_size` consecutive columns of a row, its scale fixed when GPTQ reaches its first
    column (searched on the weights as updated by then, and with double quant the 8-bit code of
    the scale as stored). The nested offset and absmax are those of the scales searched on the
    weight as given. `stored()` is what `quantize_4bit` returns, in the same layout."""

    def __init__(self, weight: torch.Tensor, settings: QuantSettings, *, name: str = "weight"):
        quant_type = _check_4bit_request(weight.cpu(), settings.quant_type, settings.block_size, name)
        rows, cols = weight.shape
        if cols % settings.block_size:
            raise QuantizationError(name, f"rows of {cols} are not whole blocks of {settings.block_size}, "
                                    "which GPTQ needs (a block must be columns of one row)",
                                    "Use a block size that divides the row length, or --method search.")
        self.quant_type, self.group_size, self.blocks_per_row = quant_type, settings.block_size, cols // settings.block_size
        blocks = weight.float().reshape(-1, self.group_size)                           # (out * in / bs, bs)
        absmax = searched_scales(blocks, quant_type).cpu()
        _check_finite(absmax, name)
        self.state = _state_tensors(weight.cpu(), quant_type, self.group_size, settings.double_quant, absmax)
        self.absmax = self.state[f"weight.{QUANT_ABSMAX_SUFFIX}"]
        self.nested = NestedScales.of(self.state) if settings.double_quant else None
        self.codes = torch.empty(rows, cols, dtype=torch.uint8, device=weight.device)
        self.code = code_table(quant_type).to(weight.device)

    def start_group(self, column: int, weights: torch.Tensor) -> None:
        indices = torch.arange(weights.shape[0], device=weights.device) * self.blocks_per_row + column // self.group_size
        scales = searched_scales(weights, self.quant_type)                            # (out,)
        if self.nested is None:
            self.absmax[indices.cpu()] = scales.cpu()
            self.scales = scales
        else:
            self.nested.set_nearest(indices, scales)
            self.scales = self.nested.refine(weights, indices, self.quant_type)

    def round(self, column: int, weights: torch.Tensor) -> torch.Tensor:
        positions = _nearest_positions(weights[:, None], self.scales, self.quant_type)[:, 0]   # (out,)
        self.codes[:, column] = positions.to(torch.uint8)
        return self.code[positions] * self.scales

    def stored(self) -> dict[str, torch.Tensor]:
        return {"weight": pack_nibbles(self.codes.cpu()).view(-1, 1), **self.state}


def _searched_block_runs(flat: torch.Tensor, quant_type: QuantType, block_size: int, chunk_elements: int,
                         absmax: torch.Tensor, packed_for: Callable[[int, int], torch.Tensor] | None,
                         report: ReadReport = NO_REPORT, nested: NestedScales | None = None):
    """`_quantized_block_runs` with searched scales: without `nested`, each block's scale is
    `searched_scales`' and goes into `absmax`; with it (double quant, second pass) the scale is the
    stored one, refined by `NestedScales.refine`. Codes are the nearest at the scale stored."""
    for start, end in _block_runs(flat.numel(), block_size, chunk_elements):
        first = start // block_size
        report.reading(start, end)
        run = flat[start:end].float()
        blocks = torch.nn.functional.pad(run, (0, -run.numel() % block_size)).view(-1, block_size)  # (nb, bs)
        if nested is None:
            scales = searched_scales(blocks, quant_type)
            absmax[first:first + scales.numel()] = scales
        else:
            scales = nested.refine(blocks, torch.arange(first, first + blocks.shape[0]), quant_type)
        packed = None
        if packed_for is not None:
            packed = packed_for(start, end)
            codes = _nearest_positions(blocks, scales, quant_type).view(-1)
            packed.copy_(pack_nibbles(codes[:(end - start + 1) // 2 * 2]))
            report.done(start, end)
        yield packed


def _state_tensors(weight: torch.Tensor, quant_type: QuantType, block_size: int, double_quant: bool,
                   absmax: torch.Tensor) -> dict[str, torch.Tensor]:
    """The stored tensors after `weight`, in order: absmax (fp32, or its 8-bit codes with double
    quant), the code table, the nested absmax and map, the state blob. Without double quant
    `absmax` is stored as it is, so it may still be being filled."""
    stored = {f"weight.{QUANT_ABSMAX_SUFFIX}": absmax, f"weight.{QUANT_MAP_SUFFIX}": code_table(quant_type).clone()}
    offset = None
    if double_quant:
        # offset is the mean over ALL blocks, which is why absmax is gathered before this step
        mean = absmax.mean()
        codes = torch.empty(absmax.numel(), dtype=torch.uint8)
        nested_absmax = torch.empty(-(-absmax.numel() // NESTED_BLOCK_SIZE), dtype=torch.float32)
        step = NESTED_BLOCK_SIZE * 4096  # whole nested blocks at a time: bounded temporaries
        for start in range(0, absmax.numel(), step):
            run_codes, run_absmax = _quantize_blockwise8(absmax[start:start + step] - mean)
            codes[start:start + run_codes.numel()] = run_codes
            nested_absmax[start // NESTED_BLOCK_SIZE:start // NESTED_BLOCK_SIZE + run_absmax.numel()] = run_absmax
        offset = mean.item()
        stored[f"weight.{QUANT_ABSMAX_SUFFIX}"] = codes
        stored[f"weight.{NESTED_ABSMAX_SUFFIX}"] = nested_absmax
        stored[f"weight.{NESTED_QUANT_MAP_SUFFIX}"] = dynamic_map().clone()
    state = FourBitState(quant_type, block_size, weight.dtype, tuple(weight.shape), offset)
    stored[state.blob_key] = state.to_blob()
    return stored


def _compiled_4bit_quantizer():
    """The C quantizer (bit for bit `_quantize_4bit_chunk`, one pass over the input), or None where
    the kernels were not built."""
    return fourbit_kernel.fourbit_quantize_blocks if kernels.available() else None


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
    return _dequantize(stored, FourBitState.from_blob(stored[blob_keys[0]]), dtype, chunk_elements)


def _dequantize(stored: Mapping[str, torch.Tensor], state: FourBitState, dtype: torch.dtype | None,
                chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
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


@dataclasses.dataclass(frozen=True)
class FourBitWeight:
    stored: dict[str, torch.Tensor]  # `weight` (packed uint8), `weight.absmax`, …, as bitsandbytes names them
    state: FourBitState              # parsed once, from the blob among `stored`

    @property
    def shape(self) -> tuple[int, int]:
        return self.state.shape

    @functools.cached_property
    def matrix(self) -> fourbit_kernel.FourBitMatrix:
        """The stored tensors as the fused kernels read them (views, no copy)."""
        absmax = self.stored[f"weight.{QUANT_ABSMAX_SUFFIX}"].reshape(-1)
        if self.state.nested:
            absmax = fourbit_kernel.NestedAbsmax(absmax, self.stored[_NESTED_NAMES[0]].reshape(-1),
                                                 self.stored[_NESTED_NAMES[1]].reshape(-1), self.state.nested_offset)
        return fourbit_kernel.FourBitMatrix(self.stored["weight"].reshape(-1), absmax,
                                            code_table(self.state.quant_type), self.state.block_size,
                                            self.state.shape, self.state.dtype)

    def uses_fused_kernel(self, x: torch.Tensor) -> bool:
        return kernels.available() and x.is_cpu and self.stored["weight"].is_cpu

    def matmul(self, x: torch.Tensor, products: torch.dtype | None = None) -> torch.Tensor:
        if products not in (None, x.dtype):
            return products_in(products, x, self.matmul, self._on_kernels)
        if self.uses_fused_kernel(x):
            return fourbit_kernel.fourbit_matmul(x, self.matrix).to(x.dtype)
        if x.device.type != "cpu":
            return self.bitsandbytes_matmul(x)
        return linear_in_pieces(x, self.shape, lambda start, end: self.row_slice(start, end).dequantize(x.dtype),
                                self.row_multiple)

    def _on_kernels(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        """`products_in`'s product in `dtype` (fp32 sums): bf16 x on AMX tiles, or x with int8
        activations; None where the kernels do not take it."""
        if not self.uses_fused_kernel(x):
            return None
        batch = x.shape[:-1].numel()
        if dtype == torch.int8 and fourbit_kernel.takes_int8_activations(batch, self.matrix):
            return fourbit_kernel.fourbit_matmul(x, self.matrix, int8_activations=True)
        if dtype == torch.bfloat16 and fourbit_kernel.multiplies_on_tiles(batch, self.matrix):
            return fourbit_kernel.fourbit_matmul(x, self.matrix)
        return None

    def bitsandbytes_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W.T through `bitsandbytes.matmul_4bit`, on whatever device the tensors are (on CUDA its
        fused 4-bit GEMV for a decoding step; elsewhere it dequantizes first). Imported only here:
        the CPU runtime never loads bitsandbytes."""
        import bitsandbytes
        from bitsandbytes.functional import QuantState
        state = QuantState.from_dict({k.removeprefix("weight."): v for k, v in self.stored.items() if k != "weight"},
                                     device=self.stored["weight"].device)
        return bitsandbytes.matmul_4bit(x, self.stored["weight"].t(), quant_state=state)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        if self.stored["weight"].device.type == "cpu" and kernels.available():
            return fourbit_kernel.fourbit_dequantize(self.matrix).to(dtype)
        return _dequantize(self.stored, self.state, dtype)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.stored["weight"].device.type == "cpu" and kernels.available():
            return fourbit_kernel.fourbit_dequantize(self.matrix, ids).to(dtype).reshape(*ids.shape, self.shape[1])
        # only the row slices holding the ids are dequantized (never a vocab × hidden matrix)
        step = self.row_multiple
        flat = ids.reshape(-1)
        out = torch.empty(flat.numel(), self.shape[1], dtype=dtype, device=flat.device)
        for first in (flat // step).unique().tolist():
            chosen = flat // step == first
            piece = self.row_slice(first * step, min(first * step + step, self.shape[0])).dequantize(dtype)
            out[chosen] = piece[flat[chosen] - first * step]
        return out.reshape(*ids.shape, self.shape[1])

    @property
    def row_multiple(self) -> int:
        unit = self.state.block_size * (NESTED_BLOCK_SIZE if self.state.nested else 1)
        return slice_granularity(*self.shape, unit)  # whole blocks, whole nested blocks of absmax

    def row_slice(self, start: int, end: int) -> "FourBitWeight":
        rows, cols = self.shape
        if start % self.row_multiple:
            raise ValueError(f"a 4-bit row slice must start at a multiple of {self.row_multiple} rows, not {start}")
        end = min(end, rows)
        first, last = start * cols // self.state.block_size, -(-end * cols // self.state.block_size)
        stored = dict(self.stored)
        stored["weight"] = self.stored["weight"].view(-1)[start * cols // 2:(end * cols + 1) // 2].view(-1, 1)
        absmax_key = f"weight.{QUANT_ABSMAX_SUFFIX}"
        stored[absmax_key] = self.stored[absmax_key].view(-1)[first:last]
        if self.state.nested:
            stored[_NESTED_NAMES[0]] = self.stored[_NESTED_NAMES[0]].view(-1)[
                first // NESTED_BLOCK_SIZE:-(-last // NESTED_BLOCK_SIZE)]
        state = dataclasses.replace(self.state, shape=(end - start, cols))
        stored[state.blob_key] = state.to_blob()  # bitsandbytes reads the shape from it
        return FourBitWeight(stored, state)


class FourBitStorage(Storage):
    """Blockwise 4-bit with one fp32 (or double-quantized 8-bit) absmax per block of the flattened
    weight; NF4 and FP4 differ only in their code table."""

    @classmethod
    def stored_names(cls, settings: QuantSettings | None) -> tuple[str, ...]:
        nested = _NESTED_NAMES if settings is not None and settings.double_quant else ()
        return ("weight", f"weight.{QUANT_ABSMAX_SUFFIX}", f"weight.{QUANT_MAP_SUFFIX}", *nested,
                blob_name(cls.quant_type))

    @classmethod
    def stored_bytes(cls, shape, source_itemsize, settings: QuantSettings | None) -> int:
        settings = settings or QuantSettings(cls.quant_type)
        numel = 1
        for d in shape:
            numel *= d
        blocks = -(-numel // settings.block_size)
        size = (numel + 1) // 2 + 16 * 4                     # packed nibbles + fp32 code table
        if settings.double_quant:
            size += blocks + -(-blocks // NESTED_BLOCK_SIZE) * 4 + 256 * 4  # uint8 absmax + nested
        else:
            size += blocks * 4                               # fp32 absmax
        return size

    @classmethod
    def encode(cls, weight, settings: QuantSettings | None, *, name="weight"):
        settings = settings or QuantSettings(cls.quant_type)
        return quantize_4bit(weight, cls.quant_type, settings.block_size, settings.double_quant,
                             method=settings.weight_only_method, name=name)

    @classmethod
    def encode_stream(cls, weight, settings: QuantSettings | None, *, name="weight", report=NO_REPORT):
        settings = settings or QuantSettings(cls.quant_type)
        block_size = settings.block_size
        quant_type = _check_4bit_request(weight, cls.quant_type, block_size, name)
        flat = weight.reshape(-1)
        n = flat.numel()
        absmax = torch.empty(-(-n // block_size), dtype=torch.float32)
        search = settings.weight_only_method == "search"
        runs = _searched_block_runs if search else _quantized_block_runs
        if settings.double_quant:
            # the state (the file's header) needs the mean of every absmax before any code is written:
            # a first pass takes them (the converter keeps the source's pages until the second)
            for _ in runs(flat, quant_type, block_size, STREAM_PIECE_ELEMENTS, absmax, None, report):
                pass
            _check_finite(absmax, name)
        state = _state_tensors(weight, quant_type, block_size, settings.double_quant, absmax)
        if search and settings.double_quant:
            runs = functools.partial(_searched_block_runs, nested=NestedScales.of(state))
        codes_written = []

        def codes():
            buffer = torch.empty((STREAM_PIECE_ELEMENTS + block_size) // 2, dtype=torch.uint8)  # refilled per run
            for packed in runs(flat, quant_type, block_size, STREAM_PIECE_ELEMENTS, absmax,
                               lambda start, end: buffer[:(end - start + 1) // 2], report):
                yield tensor_bytes(packed)
            _check_finite(absmax, name)
            codes_written.append(True)

        def after_codes(tensor: torch.Tensor):
            def pieces():
                if not codes_written:
                    raise RuntimeError(f"{name}: 4-bit state taken before the codes were written")
                yield tensor_bytes(tensor)
            return StreamedTensor(tensor.dtype, tuple(tensor.shape), pieces)
        return {"weight": StreamedTensor(torch.uint8, ((n + 1) // 2, 1), codes),
                **{key: after_codes(tensor) for key, tensor in state.items()}}

    @classmethod
    def gptq_grid(cls, weight: torch.Tensor, settings: QuantSettings, *, name: str = "weight") -> FourBitGrid:
        """The grid GPTQ rounds `weight` (out, in) onto (bloomconv.storage.gptq)."""
        return FourBitGrid(weight, dataclasses.replace(settings, quant_type=cls.quant_type), name=name)

    @classmethod
    def decode(cls, lookup: Lookup, *, name="weight") -> FourBitWeight:
        state = FourBitState.from_blob(cls.require(lookup, blob_name(cls.quant_type), name))
        if state.quant_type is not cls.quant_type or len(state.shape) != 2:
            raise QuantizationError(name, f"is tagged {cls.quant_type.value} but its state describes a "
                                    f"{state.quant_type.value} tensor of shape {state.shape}",
                                    "The file is damaged or was not written by bloomconv; convert again.")
        names = cls.stored_names(QuantSettings(cls.quant_type, state.block_size, state.nested))
        stored = {key: cls.require(lookup, key, name) for key in names}
        return FourBitWeight(stored, state)


@register
class NF4Storage(FourBitStorage):
    quant_type = QuantType.NF4


@register
class FP4Storage(FourBitStorage):
    quant_type = QuantType.FP4
