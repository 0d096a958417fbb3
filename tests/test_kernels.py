"""The fused 4-bit kernels (bloomconv.kernels.fourbit) against `F.linear` on `dequantize_4bit`'s matrix.

The kernels compute every weight exactly as dequantize_4bit does and differ only in the order of
the fp32 sums, so each output may differ from the reference by a few fp32 roundings of the sum of
|x|·|w| products: checked as |out - ref| <= 1e-5 * (|x| @ |W|.T), elementwise.
"""
from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from bloomconv import kernels
from bloomconv.errors import QuantizationError
from bloomconv.format import QuantType
from bloomconv.kernels import dense, fourbit
from bloomconv.storage.fourbit import (FourBitState, FP4Storage, NF4Storage, _bucket_bounds, _quantize_4bit_chunk,
                                       code_table, dequantize_4bit, dynamic_map, quantize_4bit)

needs_kernels = pytest.mark.skipif(not kernels.available(), reason="the C extension is not built")
ISAS = [pytest.param(isa, marks=pytest.mark.skipif(isa not in kernels.isas(), reason=f"CPU lacks {isa}"))
        for isa in ("avx512", "avx2", "scalar")]
SHAPES = [(3072, 1024), (1024, 4096), (37, 45)]  # the last: odd rows, rows starting mid-byte, scalar only


def fourbit_matrix(stored: dict[str, torch.Tensor]) -> fourbit.FourBitMatrix:
    """The kernels' view of what `quantize_4bit` stored (the caller's job: the kernels read no names)."""
    blob, = (tensor for key, tensor in stored.items() if key.startswith("weight.quant_state."))
    state = FourBitState.from_blob(blob)
    absmax = stored["weight.absmax"].reshape(-1)
    if state.nested:
        absmax = fourbit.NestedAbsmax(absmax, stored["weight.nested_absmax"].reshape(-1),
                                      stored["weight.nested_quant_map"].reshape(-1), state.nested_offset)
    return fourbit.FourBitMatrix(stored["weight"].reshape(-1), absmax, code_table(state.quant_type),
                                 state.block_size, state.shape, state.dtype)


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
    matrix = fourbit_matrix(stored)
    x = torch.randn(1 + 3 + 17, shape[1], generator=torch.Generator().manual_seed(1))
    expected, bound = summation_reference(x, weight)
    for rows in (slice(0, 1), slice(1, 4), slice(4, 21)):  # batch 1, 3, 17
        assert_matches_reference(fourbit.fourbit_matmul(x[rows], matrix, isa=isa), x[rows], weight,
                                 (expected[rows], bound[rows]))


@needs_kernels
@pytest.mark.skipif("avx512" not in kernels.isas(), reason="CPU lacks avx512")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3072, 1024), (512, 4160)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_avx512_decoding_sums_each_row_alike_whatever_the_batch(shape, dtype):
    """Groups of 8 x rows, each row with its own two running sums kept across slabs of columns: a
    row of a batch of 17 (two whole groups and one row; 4160 columns: five slabs for 8 rows, one
    for one) comes out bit for bit as that row alone (which blocks of 32 take through a loop of
    their own; 4160 columns: 130 blocks a row, so its tail of 2 too)."""
    stored, weight = quantized("nf4", 32, True, shape, dtype)
    matrix = fourbit_matrix(stored)
    x = torch.randn(17, shape[1], generator=torch.Generator().manual_seed(4))
    batched = fourbit.fourbit_matmul(x, matrix, isa="avx512")
    alone = torch.cat([fourbit.fourbit_matmul(x[i:i + 1], matrix, isa="avx512") for i in range(17)])
    assert torch.equal(batched, alone)
    assert_matches_reference(batched, x, weight)


@needs_kernels
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("double_quant", [False, True], ids=["", "dq"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_dequantize_is_bit_exact_and_weights_round_to_the_stored_dtype(quant_type, double_quant, dtype, isa):
    # bf16/fp16 weights: each code·absmax is rounded to that dtype, as dequantize_4bit's final cast does
    for block_size in (32, 64, 256):
        stored, weight = quantized(quant_type, block_size, double_quant, (96, 320), dtype)
        matrix = fourbit_matrix(stored)
        assert torch.equal(fourbit.fourbit_dequantize(matrix, isa=isa), weight)
        ids = torch.tensor([[95, 0], [7, 7]])
        assert torch.equal(fourbit.fourbit_dequantize(matrix, ids, isa=isa), weight[ids.view(-1)])
        x = torch.randn(5, 320, generator=torch.Generator().manual_seed(2))
        assert_matches_reference(fourbit.fourbit_matmul(x, matrix, isa=isa), x, weight)


@needs_kernels
@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 40), cols=st.integers(1, 130), batch=st.integers(0, 6),
       block_size=st.sampled_from([32, 64, 128]), quant_type=st.sampled_from(["nf4", "fp4"]),
       double_quant=st.booleans(), seed=st.integers(0, 2**16))
def test_any_shape_matches_reference(rows, cols, batch, block_size, quant_type, double_quant, seed):
    g = torch.Generator().manual_seed(seed)
    stored = quantize_4bit(torch.randn(rows, cols, generator=g), quant_type, block_size, double_quant)
    weight = dequantize_4bit(stored).float()
    matrix = fourbit_matrix(stored)
    x = torch.randn(batch, cols, generator=g)
    for isa in kernels.isas():
        assert_matches_reference(fourbit.fourbit_matmul(x, matrix, isa=isa), x, weight)
        assert torch.equal(fourbit.fourbit_dequantize(matrix, isa=isa), weight)


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
    absmax, packed = fourbit.fourbit_quantize_blocks(values, block_size, bounds, order, isa=isa)
    assert torch.equal(absmax, expected[0]) and torch.equal(packed, expected[1])


@needs_kernels
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_quantizer_marks_non_finite_blocks(bad):
    values = torch.ones(256)
    values[70] = bad
    bounds, order = _bucket_bounds(QuantType.NF4)
    for isa in kernels.isas():
        absmax, _ = fourbit.fourbit_quantize_blocks(values, 64, bounds, order, isa=isa)
        assert absmax[0] == 1 and not torch.isfinite(absmax[1]) and (absmax[2:] == 1).all()


@needs_kernels
def test_large_batches_go_through_dequantized_tiles(monkeypatch):
    stored, weight = quantized("nf4", 64, True, (1024, 4096))
    matrix = fourbit_matrix(stored)
    monkeypatch.setattr(fourbit, "TILE_ROWS", 96)
    monkeypatch.setattr(fourbit, "DEQUANTIZE_TILE_BYTES", 300 * 4096 * 4)  # tiles of 288 rows: 3, then 160
    x = torch.randn(2, fourbit.SMALL_BATCH_ROWS + 1, 4096, generator=torch.Generator().manual_seed(3))
    out = fourbit.fourbit_matmul(x, matrix)
    assert out.shape == (2, fourbit.SMALL_BATCH_ROWS + 1, 1024)
    assert_matches_reference(out.view(-1, 1024), x.view(-1, 4096), weight)


@needs_kernels
def test_many_bf16_rows_multiply_in_bf16_on_weights_quantized_from_bf16():
    stored, weight = quantized("nf4", 64, True, (512, 1024), torch.bfloat16)
    matrix = fourbit_matrix(stored)
    assert torch.equal(weight.to(torch.bfloat16).float(), weight)  # bf16 holds every weight
    x = torch.randn(fourbit.TILE_BATCH_ROWS + 1, 1024, generator=torch.Generator().manual_seed(6))  # past both kernels
    rounded = x.to(torch.bfloat16)
    out = fourbit.fourbit_matmul(rounded, matrix)
    assert out.dtype == torch.bfloat16
    # products of the rounded rows, summed in fp32 and rounded once to bf16
    expected, bound = summation_reference(rounded.float(), weight)
    assert_matches_reference(out.float(), rounded.float(), weight, (expected, bound + expected.abs() * 2 ** -8))
    assert not torch.equal(out.float(), fourbit.fourbit_matmul(x, matrix))  # not the fp32 path's result
    rows = torch.tensor([0, 7, 511, 3])
    for isa in kernels.isas():  # the tiles straight in bf16: each weight as it is
        tile = torch.empty(4, 1024, dtype=torch.bfloat16)
        fourbit._dequantize_into(matrix, rows, tile, kernels._isa_code(isa))
        assert torch.equal(tile.float(), weight[rows]), isa
    few = rounded[:kernels.BF16_TILE_ROWS - 1]  # a decoding step's rows: the fused kernel, fp32 sums
    assert_matches_reference(fourbit.fourbit_matmul(few, matrix), few.float(), weight)
    few = rounded[:fourbit.SMALL_BATCH_ROWS]  # AMX tiles where the CPU has them (below), else the same
    if not kernels.bf16_tiles():
        assert_matches_reference(fourbit.fourbit_matmul(few, matrix), few.float(), weight)


@needs_kernels
@pytest.mark.skipif(not kernels.bf16_tiles(), reason="CPU or OS without AMX-BF16 tiles")
@pytest.mark.parametrize("shape", [(3072, 1024), (1000, 96), (40, 4160)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_a_decoding_steps_bf16_rows_multiply_on_amx_tiles(shape):
    """4..64 rows of bf16 x: bf16 products (x as given, weights exact), fp32 sums returned as they
    are; each row's result depends on that row alone (16-row tiles of x, 16-row tiles of weights:
    1000 and 40 weight rows end in a partial tile, 96 columns are 3 tiles)."""
    stored, weight = quantized("nf4", 32, True, shape, torch.bfloat16)
    matrix = fourbit_matrix(stored)
    x = torch.randn(fourbit.TILE_BATCH_ROWS, shape[1], generator=torch.Generator().manual_seed(9)).to(torch.bfloat16)
    out = fourbit.fourbit_matmul(x, matrix)
    assert out.dtype == torch.float32 and fourbit.multiplies_on_tiles(x.shape[0], matrix)
    assert_matches_reference(out, x.float(), weight)
    for rows in (slice(0, 4), slice(4, 21), slice(21, 53), slice(53, 64)):  # 4, 17, 32, 11 rows: alike
        assert torch.equal(fourbit.fourbit_matmul(x[rows], matrix), out[rows])
    forced = fourbit.fourbit_matmul(x[:32], matrix, isa="avx512")  # a forced ISA: the fp32 kernel
    assert not torch.equal(forced, out[:32])
    assert_matches_reference(forced, x[:32].float(), weight)
    fp32_weights = fourbit_matrix(quantized("nf4", 32, True, shape)[0])
    assert not fourbit.multiplies_on_tiles(x.shape[0], fp32_weights)  # bf16 would round the weights


def int8_activations_reference(x: torch.Tensor, stored: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """What the int8-activation kernel computes, in float64, and the allowed difference (fp32
    sums, in another order, of partial sums that may cancel: 1e-5 of the sum of the products'
    sizes): x rounded to int8 per 32 columns, the codes to int8, each chunk's integer sum times
    its block's absmax and x's scale."""
    blob, = (tensor for key, tensor in stored.items() if key.startswith("weight.quant_state."))
    state = FourBitState.from_blob(blob)
    rows, cols = state.shape
    packed = stored["weight"].reshape(-1)
    nibbles = torch.stack([packed >> 4, packed & 15], -1).reshape(rows, cols).long()  # element 2i: high nibble
    code = code_table(state.quant_type)
    code_max = code.abs().max()
    codes = (code * (127 / code_max)).round().long()                                  # the int8 code table
    if state.nested:  # the kernel's fp32 multiply, then add
        absmax = (stored["weight.nested_quant_map"][stored["weight.absmax"].long()]
                  * stored["weight.nested_absmax"].repeat_interleave(256)[:rows * cols // 32]) + state.nested_offset
    else:
        absmax = stored["weight.absmax"]
    chunks = x.reshape(x.shape[0], cols // 32, 32)
    amax = chunks.abs().amax(-1)                                                       # (batch, chunks)
    inverse = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    q = (chunks * inverse[..., None]).round().long()                                    # (batch, chunks, 32)
    x_scale = amax / 127 * (code_max / 127)
    weights = codes[nibbles].reshape(rows, cols // 32, 32)
    sums = torch.einsum("bcj,rcj->brc", q, weights)                                    # exact integers
    magnitudes = torch.einsum("bcj,rcj->brc", q.abs(), weights.abs())                  # of the kernel's partial sums
    scale = (absmax.reshape(rows, cols // 32)[None] * x_scale[:, None]).double()      # (batch, rows, chunks), fp32
    return (sums.double() * scale).sum(-1), 1e-5 * (magnitudes.double() * scale).sum(-1)


needs_int8_dot = pytest.mark.skipif(not kernels.int8_dot_products(), reason="CPU without AVX512-VNNI")


@needs_kernels
@needs_int8_dot
@pytest.mark.parametrize("shape", [(3072, 1024), (40, 4224)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("nested", [True, False], ids=["nested", "fp32-absmax"])
def test_int8_activations_sum_int8_x_and_codes_exactly_per_block(shape, nested):
    """1-3 rows of x, blocks of 32: x rounded to int8 per 32 columns, codes to int8, integer sums per
    block scaled in fp32 (4224 columns: 132 blocks a row, so pieces of 16 blocks end partial and
    cross the nested absmax's blocks of 256)."""
    stored, weight = quantized("nf4", 32, nested, shape, torch.bfloat16)
    matrix = fourbit_matrix(stored)
    x = torch.randn(3, shape[1], generator=torch.Generator().manual_seed(12))
    x[1, 64:96] = 0  # a chunk of zeros
    x[2, :32] *= 1000  # an outlier chunk: only its own 32 values get coarser
    assert fourbit.takes_int8_activations(3, matrix)
    out = fourbit.fourbit_matmul(x, matrix, int8_activations=True)
    expected, bound = int8_activations_reference(x, stored)
    assert out.dtype == torch.float32 and out.shape == (3, shape[0])
    assert ((out.double() - expected).abs() <= bound + 1e-30).all()
    for row in range(3):  # a row's result is its own, whatever the batch
        assert torch.equal(fourbit.fourbit_matmul(x[row:row + 1], matrix, int8_activations=True), out[row:row + 1])
    exact = fourbit.fourbit_matmul(x, matrix)  # fp32 products: about 0.7 % away
    error = (out - exact).norm(dim=-1) / exact.norm(dim=-1)
    assert (error > 1e-4).all() and (error < 0.02).all(), error
    nan = x[:1].clone()
    nan[0, 5] = float("nan")
    assert fourbit.fourbit_matmul(nan, matrix, int8_activations=True).isnan().all()


@needs_kernels
def test_int8_activations_take_only_what_they_can(monkeypatch):
    """Blocks of 32, rows of a multiple of 128, fewer than BF16_TILE_ROWS rows, a CPU with VNNI;
    asked for anything else, a typed error rather than a wrong product."""
    monkeypatch.setattr(fourbit, "int8_dot_products", lambda: True)
    preset = fourbit_matrix(quantized("nf4", 32, True, (64, 256), torch.bfloat16)[0])
    assert fourbit.takes_int8_activations(kernels.BF16_TILE_ROWS - 1, preset)
    assert not fourbit.takes_int8_activations(kernels.BF16_TILE_ROWS, preset)
    assert not fourbit.takes_int8_activations(1, fourbit_matrix(quantized("nf4", 64, True, (64, 256))[0]))
    assert not fourbit.takes_int8_activations(1, fourbit_matrix(quantized("nf4", 32, True, (64, 96))[0]))
    with pytest.raises(QuantizationError, match="int8 activations"):
        fourbit.fourbit_matmul(torch.randn(1, 256), preset, isa="scalar", int8_activations=True)
    monkeypatch.setattr(fourbit, "int8_dot_products", lambda: False)
    assert not fourbit.takes_int8_activations(1, preset)
    with pytest.raises(QuantizationError, match="int8 activations"):
        fourbit.fourbit_matmul(torch.randn(1, 256), preset, int8_activations=True)


@needs_kernels
def test_result_does_not_depend_on_the_thread_count(restores_threads):
    stored, _ = quantized("nf4", 64, False, (3072, 1024))
    matrix = fourbit_matrix(stored)
    x = torch.randn(3, 1024, generator=torch.Generator().manual_seed(4))
    torch.set_num_threads(1)
    single = fourbit.fourbit_matmul(x, matrix)
    torch.set_num_threads(2)
    assert torch.equal(fourbit.fourbit_matmul(x, matrix), single)


@needs_kernels
def test_bad_arguments_raise_typed_errors():
    stored, _ = quantized("nf4", 64, False, (96, 320))
    matrix = fourbit_matrix(stored)
    with pytest.raises(QuantizationError, match="last dimension is 320"):
        fourbit.fourbit_matmul(torch.zeros(2, 321), matrix)
    with pytest.raises(QuantizationError, match="not available"):
        fourbit.fourbit_matmul(torch.zeros(2, 320), matrix, isa="avx9000")
    with pytest.raises(QuantizationError, match="absmax"):
        fourbit.FourBitMatrix(matrix.packed, matrix.absmax[:-1], matrix.code, 64, (96, 320))
    with pytest.raises(IndexError):
        fourbit.fourbit_dequantize(matrix, torch.tensor([96]))
    assert fourbit.fourbit_matmul(torch.zeros(0, 320), matrix).shape == (0, 96)


def test_four_bit_weight_multiplies_with_the_kernel_where_built(monkeypatch):
    stored, weight = quantized("nf4", 64, True, (96, 320))
    x = torch.randn(2, 5, 320, generator=torch.Generator().manual_seed(5))
    calls = []
    if kernels.available():
        real = fourbit.fourbit_matmul
        monkeypatch.setattr(fourbit, "fourbit_matmul", lambda *a, **k: calls.append(1) or real(*a, **k))
    record = NF4Storage.decode_mapping(stored)
    out = record.matmul(x)
    assert len(calls) == int(kernels.available()) and record.uses_fused_kernel(x) == kernels.available()
    assert_matches_reference(out.view(-1, 96), x.view(-1, 320), weight)
    assert torch.equal(record.rows(torch.tensor([[3, 1]]), torch.float32), weight[[3, 1]].unsqueeze(0))
    assert torch.equal(record.dequantize(torch.float32), weight)


def test_four_bit_weight_falls_back_without_the_extension(monkeypatch):
    monkeypatch.setattr(kernels, "_kernels", None)  # as installed without a C compiler
    stored, weight = quantized("fp4", 128, False, (96, 320))
    record = FP4Storage.decode_mapping(stored)
    x = torch.randn(3, 320, generator=torch.Generator().manual_seed(6))
    assert not kernels.available() and not record.uses_fused_kernel(x)
    assert torch.equal(record.matmul(x), F.linear(x, weight))
    assert torch.equal(record.rows(torch.tensor([4, 2]), torch.float32), weight[[4, 2]])
    with pytest.raises(QuantizationError, match=r"bloomconv\.kernels\.available\(\)"):
        fourbit.fourbit_matmul(x, fourbit_matrix(stored))


@needs_kernels
@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc")
def test_one_extension_and_one_thread_pool_serve_both_kernels():
    """Both kernels call the one extension, and share its thread pool: in a fresh process (no
    earlier test has started the pool), a 4-bit product on 2 threads starts a helper, and a dense
    product after it is right and starts none of its own."""
    compiled = sorted(path.name.split(".")[0] for path in Path(kernels.__file__).parent.rglob("*")
                      if path.suffix in (".so", ".pyd"))
    assert compiled == ["_kernels"]
    assert fourbit._kernels is dense._kernels is kernels._kernels
    script = textwrap.dedent("""
        import os, torch
        import torch.nn.functional as F
        from bloomconv.kernels import dense, fourbit
        torch.set_num_threads(2)
        g = torch.Generator().manual_seed(0)
        matrix = fourbit.FourBitMatrix(torch.randint(0, 256, (2048 * 1024 // 2,), dtype=torch.uint8, generator=g),
                                       torch.rand(2048 * 1024 // 64, generator=g), torch.linspace(-1, 1, 16), 64,
                                       (2048, 1024))
        weight = torch.randint(-127, 128, (4096, 1024), dtype=torch.int8, generator=g)  # 4 MB: both threads work
        x = torch.randn(1, 1024, generator=g)
        F.linear(torch.randn(64, 1024), weight.float())  # torch's own threads start here, not below
        threads = lambda: len(os.listdir("/proc/self/task"))
        before = threads()
        four_bit = fourbit.fourbit_matmul(x, matrix)
        after_four_bit = threads()
        dense_out = dense.dense_matmul(x, weight)
        after_dense = threads()
        expected = (F.linear(x, fourbit.fourbit_dequantize(matrix)), F.linear(x, weight.float()))
        ok = all(((out - e).abs() <= 1e-4 * e.abs().max()).all() for out, e in zip((four_bit, dense_out), expected))
        print(ok, after_four_bit - before, after_dense - after_four_bit)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    ok, started_by_four_bit, started_by_dense = done.stdout.split()
    assert ok == "True" and int(started_by_four_bit) >= 1 and int(started_by_dense) == 0, done.stdout
