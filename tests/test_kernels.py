"""The fused 4-bit kernels against `F.linear` on `bloomconv.quant.dequantize_4bit`'s matrix.

The kernels compute every weight exactly as dequantize_4bit does and differ only in the order of
the fp32 sums, so each output may differ from the reference by a few fp32 roundings of the sum of
|x|·|w| products: checked as |out - ref| <= 1e-5 * (|x| @ |W|.T), elementwise.
"""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from bloomconv.errors import QuantizationError
from bloomconv.format import QuantType
from bloomconv.quant import (FourBitState, _bucket_bounds, _quantize_4bit_chunk, code_table, dequantize_4bit,
                             dynamic_map, quantize_4bit)
from bloomconv.runtime import kernels
from bloomconv.runtime.weights import FourBitWeight

needs_kernels = pytest.mark.skipif(not kernels.available(), reason="the C extension is not built")
ISAS = [pytest.param(isa, marks=pytest.mark.skipif(isa not in kernels.isas(), reason=f"CPU lacks {isa}"))
        for isa in ("avx512", "avx2", "scalar")]
SHAPES = [(3072, 1024), (1024, 4096), (37, 45)]  # the last: odd rows, rows starting mid-byte, scalar only


@functools.cache
def quantized(quant_type: str, block_size: int, double_quant: bool, shape: tuple[int, int],
              dtype: torch.dtype = torch.float32) -> tuple[dict, torch.Tensor]:
    """(stored, its fp32 dequantized matrix) with random codes and scales, in quantize_4bit's layout
    (quantizing real weights is tested elsewhere and would dominate this file's run time)."""
    g = torch.Generator().manual_seed(hash((quant_type, block_size, double_quant, shape, dtype)) % 2**31)
    numel = shape[0] * shape[1]
    blocks = -(-numel // block_size)
    absmax = torch.rand(blocks, generator=g) * 4 + 0.01
    stored = {"weight": torch.randint(0, 256, ((numel + 1) // 2, 1), dtype=torch.uint8, generator=g),
              "weight.absmax": absmax, "weight.quant_map": code_table(QuantType(quant_type)).clone()}
    offset = None
    if double_quant:
        offset = absmax.mean().item()
        stored.update({"weight.absmax": torch.randint(0, 256, (blocks,), dtype=torch.uint8, generator=g),
                       "weight.nested_absmax": torch.rand(-(-blocks // 256), generator=g) + 0.5,
                       "weight.nested_quant_map": dynamic_map().clone()})
    state = FourBitState(QuantType(quant_type), block_size, dtype, shape, offset)
    stored[state.blob_key] = state.to_blob()
    return stored, dequantize_4bit(stored).float()


def assert_matches_reference(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                             reference: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    expected, bound = reference or summation_reference(x, weight)
    assert out.shape == expected.shape and out.dtype == torch.float32
    excess = (out - expected).abs() - bound
    assert excess.numel() == 0 or excess.max() <= 0, f"worst excess over the bound {excess.max().item():.3g}"


def summation_reference(x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """F.linear(x, weight) and the allowed difference, 1e-5 * |x| @ |W|.T."""
    return F.linear(x, weight), 1e-5 * F.linear(x.abs(), weight.abs())


@needs_kernels
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("double_quant", [False, True], ids=["", "dq"])
@pytest.mark.parametrize("block_size", [32, 64, 128, 256])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_matmul_matches_linear_on_dequantized_weight(quant_type, block_size, double_quant, shape, isa):
    stored, weight = quantized(quant_type, block_size, double_quant, shape)
    matrix = kernels.FourBitMatrix.from_stored(stored)
    x = torch.randn(1 + 3 + 17, shape[1], generator=torch.Generator().manual_seed(1))
    expected, bound = summation_reference(x, weight)
    for rows in (slice(0, 1), slice(1, 4), slice(4, 21)):  # batch 1, 3, 17
        assert_matches_reference(kernels.fourbit_matmul(x[rows], matrix, isa=isa), x[rows], weight,
                                 (expected[rows], bound[rows]))


@needs_kernels
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("double_quant", [False, True], ids=["", "dq"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_dequantize_is_bit_exact_and_weights_round_to_the_stored_dtype(quant_type, double_quant, dtype, isa):
    # bf16/fp16 weights: each code·absmax is rounded to that dtype, as dequantize_4bit's final cast does
    for block_size in (32, 64, 256):
        stored, weight = quantized(quant_type, block_size, double_quant, (96, 320), dtype)
        matrix = kernels.FourBitMatrix.from_stored(stored)
        assert torch.equal(kernels.fourbit_dequantize(matrix, isa=isa), weight)
        ids = torch.tensor([[95, 0], [7, 7]])
        assert torch.equal(kernels.fourbit_dequantize(matrix, ids, isa=isa), weight[ids.view(-1)])
        x = torch.randn(5, 320, generator=torch.Generator().manual_seed(2))
        assert_matches_reference(kernels.fourbit_matmul(x, matrix, isa=isa), x, weight)


@needs_kernels
@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 40), cols=st.integers(1, 130), batch=st.integers(0, 6),
       block_size=st.sampled_from([32, 64, 128]), quant_type=st.sampled_from(["nf4", "fp4"]),
       double_quant=st.booleans(), seed=st.integers(0, 2**16))
def test_any_shape_matches_reference(rows, cols, batch, block_size, quant_type, double_quant, seed):
    g = torch.Generator().manual_seed(seed)
    stored = quantize_4bit(torch.randn(rows, cols, generator=g), quant_type, block_size, double_quant)
    weight = dequantize_4bit(stored).float()
    matrix = kernels.FourBitMatrix.from_stored(stored)
    x = torch.randn(batch, cols, generator=g)
    for isa in kernels.isas():
        assert_matches_reference(kernels.fourbit_matmul(x, matrix, isa=isa), x, weight)
        assert torch.equal(kernels.fourbit_dequantize(matrix, isa=isa), weight)


@needs_kernels
@pytest.mark.parametrize("isa", ISAS)
@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 700), block_size=st.sampled_from([32, 64, 128, 256]),
       quant_type=st.sampled_from([QuantType.NF4, QuantType.FP4]),
       dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]),
       scale=st.sampled_from([1e-30, 0.02, 1.0, 1e4]), seed=st.integers(0, 2**31 - 1))
def test_quantizer_is_bit_exact_with_the_torch_reference(n, block_size, quant_type, dtype, scale, seed, isa):
    """Random values plus the hard cases: zero blocks, values that scale exactly onto a bucket
    boundary (ties go to the lower code), and the tensor's partial tail block."""
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(n, generator=g) * scale
    bounds, order = _bucket_bounds(quant_type)
    values[:min(n, 15)] = bounds[:min(n, 15)]                  # absmax 1: scaled == bound exactly
    values[min(n, 15):min(n, 16)] = 1.0
    zero_start = (n // 2) // block_size * block_size
    values[zero_start:zero_start + block_size] = 0              # a zero block (or the zero tail)
    values = values.clamp(-6e4, 6e4).to(dtype)                  # finite in float16 too
    expected = _quantize_4bit_chunk(values, block_size, bounds, order)
    absmax, packed = kernels.fourbit_quantize_blocks(values, block_size, bounds, order, isa=isa)
    assert torch.equal(absmax, expected[0]) and torch.equal(packed, expected[1])


@needs_kernels
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_quantizer_marks_non_finite_blocks(bad):
    values = torch.ones(256)
    values[70] = bad
    bounds, order = _bucket_bounds(QuantType.NF4)
    for isa in kernels.isas():
        absmax, _ = kernels.fourbit_quantize_blocks(values, 64, bounds, order, isa=isa)
        assert absmax[0] == 1 and not torch.isfinite(absmax[1]) and (absmax[2:] == 1).all()


@needs_kernels
def test_large_batches_go_through_dequantized_tiles(monkeypatch):
    stored, weight = quantized("nf4", 64, True, (1024, 4096))
    matrix = kernels.FourBitMatrix.from_stored(stored)
    monkeypatch.setattr(kernels, "DEQUANTIZE_TILE_BYTES", 300 * 4096 * 4)  # 4 tiles, the last partial
    x = torch.randn(2, kernels.SMALL_BATCH_ROWS + 1, 4096, generator=torch.Generator().manual_seed(3))
    out = kernels.fourbit_matmul(x, matrix)
    assert out.shape == (2, kernels.SMALL_BATCH_ROWS + 1, 1024)
    assert_matches_reference(out.view(-1, 1024), x.view(-1, 4096), weight)


@needs_kernels
def test_result_does_not_depend_on_the_thread_count(restores_threads):
    stored, _ = quantized("nf4", 64, False, (3072, 1024))
    matrix = kernels.FourBitMatrix.from_stored(stored)
    x = torch.randn(3, 1024, generator=torch.Generator().manual_seed(4))
    torch.set_num_threads(1)
    single = kernels.fourbit_matmul(x, matrix)
    torch.set_num_threads(2)
    assert torch.equal(kernels.fourbit_matmul(x, matrix), single)


@needs_kernels
def test_bad_arguments_raise_typed_errors():
    stored, _ = quantized("nf4", 64, False, (96, 320))
    matrix = kernels.FourBitMatrix.from_stored(stored)
    with pytest.raises(QuantizationError, match="last dimension is 320"):
        kernels.fourbit_matmul(torch.zeros(2, 321), matrix)
    with pytest.raises(QuantizationError, match="not available"):
        kernels.fourbit_matmul(torch.zeros(2, 320), matrix, isa="avx9000")
    with pytest.raises(QuantizationError, match="absmax"):
        kernels.FourBitMatrix(matrix.packed, matrix.absmax[:-1], matrix.code, 64, (96, 320))
    with pytest.raises(IndexError):
        kernels.fourbit_dequantize(matrix, torch.tensor([96]))
    assert kernels.fourbit_matmul(torch.zeros(0, 320), matrix).shape == (0, 96)


def test_four_bit_weight_multiplies_with_the_kernel_where_built(monkeypatch):
    stored, weight = quantized("nf4", 64, True, (96, 320))
    x = torch.randn(2, 5, 320, generator=torch.Generator().manual_seed(5))
    calls = []
    if kernels.available():
        real = kernels.fourbit_matmul
        monkeypatch.setattr(kernels, "fourbit_matmul", lambda *a, **k: calls.append(1) or real(*a, **k))
    record = FourBitWeight(stored, (96, 320))
    out = record.matmul(x)
    assert len(calls) == int(kernels.available()) and record.uses_fused_kernel(x) == kernels.available()
    assert_matches_reference(out.view(-1, 96), x.view(-1, 320), weight)
    assert torch.equal(record.rows(torch.tensor([[3, 1]]), torch.float32), weight[[3, 1]].unsqueeze(0))
    assert torch.equal(record.dequantize(torch.float32), weight)


def test_four_bit_weight_falls_back_without_the_extension(monkeypatch):
    monkeypatch.setattr(kernels, "_fourbit", None)
    stored, weight = quantized("fp4", 128, False, (96, 320))
    record = FourBitWeight(stored, (96, 320))
    x = torch.randn(3, 320, generator=torch.Generator().manual_seed(6))
    assert not kernels.available() and not record.uses_fused_kernel(x)
    assert torch.equal(record.matmul(x), F.linear(x, weight))
    assert torch.equal(record.rows(torch.tensor([4, 2]), torch.float32), weight[[4, 2]])
