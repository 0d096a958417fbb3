"""The dense kernel (bloomconv/kernels/csrc/dense.c) against F.linear on the fp32 weight, and its use by
the weight records. As in test_kernels.py, only the order of fp32 sums differs, so each output
may differ from the reference by |out - ref| <= 1e-5 * (|x| @ |W|.T), elementwise."""
from __future__ import annotations

import concurrent.futures
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from bloomconv import kernels
from bloomconv.errors import QuantizationError
from bloomconv.kernels import dense, fourbit
from bloomconv.storage.dense import DenseWeight
from bloomconv.storage.int8 import Int8Weight, dequantize_int8, quantize_int8

needs_dense = pytest.mark.skipif(not kernels.available(), reason="the C extension is not built")
ISAS = [pytest.param(isa, marks=pytest.mark.skipif(isa not in kernels.isas(), reason=f"CPU lacks {isa}"))
        for isa in ("avx512", "avx2", "scalar")]
KINDS = [torch.int8, torch.bfloat16, torch.float16]


def random_weight(rows, cols, dtype, generator):
    if dtype == torch.int8:
        return torch.randint(-127, 128, (rows, cols), dtype=torch.int8, generator=generator)
    return torch.randn(rows, cols, generator=generator).to(dtype)


def assert_close_to_reference(out, x, weight_fp32, scale=None):
    x = x.reshape(x.shape[:-1].numel(), x.shape[-1]).float()
    expected = F.linear(x, weight_fp32)
    bound = 1e-5 * F.linear(x.abs(), weight_fp32.abs())
    if scale is not None:
        expected, bound = expected * scale, bound * scale.abs()
    out = out.reshape(expected.shape)
    assert out.dtype == torch.float32
    assert ((out - expected).abs() <= bound + 1e-30).all(), (out - expected).abs().max()


@needs_dense
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", KINDS, ids=str)
@pytest.mark.parametrize("batch", [1, 3, 4, 9])
@pytest.mark.parametrize("shape", [(3072, 1024), (1030, 64), (37, 48)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_matmul_matches_linear_on_the_fp32_weight(shape, batch, dtype, isa):
    g = torch.Generator().manual_seed(batch)
    weight = random_weight(*shape, dtype, g)
    scale = torch.rand(shape[0], generator=g) if dtype == torch.int8 else None
    x = torch.randn(batch, shape[1], generator=g)
    assert_close_to_reference(dense.dense_matmul(x, weight, scale, isa=isa), x, weight.float(), scale)


@needs_dense
@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 41), cols=st.integers(0, 100), batch=st.integers(0, 6),
       dtype=st.sampled_from(KINDS), scaled=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_any_shape_matches_reference(rows, cols, batch, dtype, scaled, seed):
    """Rows not a multiple of the 4-row step, rows not a multiple of 16 (portable path), empty."""
    g = torch.Generator().manual_seed(seed)
    weight = random_weight(rows, cols, dtype, g)
    scale = torch.rand(rows, generator=g) if scaled else None
    x = torch.randn(batch, cols, generator=g)
    for isa in kernels.isas():
        assert_close_to_reference(dense.dense_matmul(x, weight, scale, isa=isa), x, weight.float(), scale)


@needs_dense
def test_fp16_subnormals_and_extremes_widen_exactly():
    specials = torch.tensor([6e-8, -6e-8, 1e-5, 65504.0, -65504.0, 3e-5, 0.0, -0.0] * 2)  # subnormals, extremes
    weight = specials.to(torch.float16).view(1, 16)
    for isa in kernels.isas():
        for position in range(16):
            x = torch.zeros(1, 16)
            x[0, position] = 1.0
            assert torch.equal(dense.dense_matmul(x, weight, isa=isa), weight.float()[:, position:position + 1])
    big = torch.tensor([3.3e38, -3.3e38, 1e-40] + [1.0] * 13).to(torch.bfloat16).view(1, 16)
    x = torch.zeros(1, 16)
    x[0, 2] = 1.0
    for isa in kernels.isas():
        assert torch.equal(dense.dense_matmul(x, big, isa=isa), big.float()[:, 2:3])


@needs_dense
def test_result_does_not_depend_on_the_thread_count_and_strides_are_handled(restores_threads):
    g = torch.Generator().manual_seed(1)
    weight = random_weight(4099, 256, torch.bfloat16, g)
    x = torch.randn(2, 256, generator=g)
    torch.set_num_threads(1)
    single = dense.dense_matmul(x, weight)
    torch.set_num_threads(2)
    assert torch.equal(dense.dense_matmul(x, weight), single)
    wide = random_weight(64, 512, torch.int8, g)[:, ::2]  # not contiguous: copied
    scale = torch.rand(64, generator=g)
    x = torch.randn(1, 256, generator=g)
    assert_close_to_reference(dense.dense_matmul(x, wide, scale), x, wide.float(), scale)


@needs_dense
def test_thread_pool_survives_fork_and_concurrent_callers(restores_threads):
    # the kernels' helper threads are a pool kept between calls (parallel.c): a forked child
    # starts its own, and two Python threads calling at once (the GIL is released) both get
    # their own results
    g = torch.Generator().manual_seed(3)
    weight = random_weight(8192, 512, torch.int8, g)  # 4 MB: several threads take part
    scale = torch.rand(8192, generator=g)
    xs = [torch.randn(1, 512, generator=g) for _ in range(4)]
    torch.set_num_threads(2)
    expected = [dense.dense_matmul(x, weight, scale) for x in xs]  # the pool is running now
    pid = os.fork()
    if pid == 0:  # child: exit status 0 only if every result is right
        ok = all(torch.equal(dense.dense_matmul(x, weight, scale), e) for x, e in zip(xs, expected))
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda x: [dense.dense_matmul(x, weight, scale) for _ in range(20)], xs))
    for result, e in zip(results, expected):
        assert all(torch.equal(r, e) for r in result)


@needs_dense
def test_bad_arguments_raise_typed_errors():
    weight = torch.zeros(8, 32, dtype=torch.bfloat16)
    with pytest.raises(QuantizationError, match="cannot multiply"):
        dense.dense_matmul(torch.zeros(1, 31), weight)
    with pytest.raises(QuantizationError, match="cannot multiply"):
        dense.dense_matmul(torch.zeros(1, 32), weight.float())
    with pytest.raises(QuantizationError, match="scale"):
        dense.dense_matmul(torch.zeros(1, 32), weight, torch.ones(7))
    with pytest.raises(QuantizationError, match="not available"):
        dense.dense_matmul(torch.zeros(1, 32), weight, isa="avx9000")
    assert dense.dense_matmul(torch.zeros(0, 32), weight).shape == (0, 8)
    with pytest.raises(QuantizationError, match="scale"):  # a kept matrix is checked when it is made
        dense.DenseMatrix(weight, torch.ones(8, dtype=torch.float64))


@needs_dense
def test_a_kept_matrix_multiplies_like_the_function_and_holds_its_own_copy_of_a_strided_weight():
    g = torch.Generator().manual_seed(3)
    wide = torch.randint(-127, 128, (40, 96), dtype=torch.int8, generator=g)
    weight, scale = wide[:, 16:80], torch.rand(40, generator=g)  # strided rows
    matrix = dense.DenseMatrix(weight, scale)
    assert matrix.weight.is_contiguous() and torch.equal(matrix.weight, weight)
    for x in (torch.randn(3, 64, generator=g), torch.randn(2, 5, 64, generator=g).to(torch.bfloat16),
              torch.randn(64, 2, generator=g).T):  # fp32, bf16, strided x
        out = matrix.matmul(x)
        assert out.dtype == torch.float32 and out.shape == (*x.shape[:-1], 40)
        assert torch.equal(out, dense.dense_matmul(x, weight, scale))
        assert_close_to_reference(out, x, weight.float(), scale)


# ------------------------------------------------------------------------------ weight records

def test_int8_weight_multiplies_in_fp32_with_the_kernel_and_falls_back_to_torch(monkeypatch):
    g = torch.Generator().manual_seed(0)
    CB, SCB = quantize_int8(torch.randn(192, 64, generator=g), "source")
    record = Int8Weight(CB, SCB)
    reference = dequantize_int8(CB, SCB, torch.float32)
    calls = []
    if kernels.available():
        real = dense.DenseMatrix.matmul
        monkeypatch.setattr(dense.DenseMatrix, "matmul", lambda *a, **k: calls.append(1) or real(*a, **k))
    for x in (torch.randn(2, 1, 64, generator=g), torch.randn(2, 40, 64, generator=g)):  # decode, prefill
        assert_close_to_reference(record.matmul(x), x, reference)
    assert len(calls) == 2 * int(kernels.available())

    monkeypatch.setattr(kernels, "_kernels", None)  # as installed without a C compiler
    x = torch.randn(3, 5, 64, generator=g)
    assert (record.matmul(x) - F.linear(x, reference)).abs().max() < 1e-5
    # bf16 compute: torch's fused int8 GEMM, wherever the weight starts
    shifted = torch.empty(8 + CB.numel(), dtype=torch.int8)[8:].view_as(CB).copy_(CB)
    x = torch.randn(4, 3, 64, generator=g).to(torch.bfloat16)
    assert record.uses_int8pack(x)
    assert torch.equal(Int8Weight(shifted, SCB).matmul(x), record.matmul(x))
    odd = Int8Weight(*quantize_int8(torch.randn(8, 36, generator=g), "source"))  # row length not a multiple of 16
    x = torch.randn(3, 6, 36, generator=g)
    assert not odd.uses_int8pack(x.to(torch.bfloat16))
    assert (odd.matmul(x) - F.linear(x, dequantize_int8(odd.CB, odd.SCB, torch.float32))).abs().max() < 1e-5


def test_int8_weight_multiplies_many_bf16_rows_with_a_bf16_gemm_on_its_codes(monkeypatch):
    g = torch.Generator().manual_seed(5)
    CB, SCB = quantize_int8(torch.randn(300, 64, generator=g), "source")
    record = Int8Weight(CB, SCB)
    x = torch.randn(2, dense.SMALL_BATCH_ROWS, 64, generator=g).to(torch.bfloat16)  # more rows than the kernel's
    monkeypatch.setattr(dense.DenseMatrix, "matmul", lambda *a, **k: pytest.fail("many bf16 rows took the fp32 kernel"))
    out = record.matmul(x)
    assert out.dtype == torch.bfloat16 and out.shape == (2, dense.SMALL_BATCH_ROWS, 300)
    # exact products of the codes, fp32 sums rounded to bf16, scaled by SCB / 127, rounded again
    flat = x.reshape(-1, 64).double()
    exact = (flat @ CB.double().T) * (SCB.double() / 127)
    bound = exact.abs() * 2 ** -7 + 1e-6 * (flat.abs() @ CB.double().abs().T) * (SCB.double() / 127)
    assert ((out.reshape(exact.shape).double() - exact).abs() <= bound).all()
    monkeypatch.setattr(fourbit, "DEQUANTIZE_TILE_BYTES", 1)  # tiles of the fewest rows (TILE_ROWS): two for 300
    assert ((record.matmul(x).reshape(exact.shape).double() - exact).abs() <= bound).all()


def test_dense_weight_multiplies_bf16_storage_in_fp32(monkeypatch):
    g = torch.Generator().manual_seed(2)
    weight = torch.randn(100, 64, generator=g).to(torch.bfloat16)
    record = DenseWeight(weight)
    for rows in (1, 3, 17, dense.SMALL_BATCH_ROWS + 1):
        x = torch.randn(rows, 64, generator=g)
        out = record.matmul(x)
        assert out.dtype == torch.float32
        assert_close_to_reference(out, x, weight.float())
    many = torch.randn(dense.SMALL_BATCH_ROWS + 1, 64, generator=g).to(torch.bfloat16)
    assert torch.equal(record.matmul(many), F.linear(many, weight))  # bf16 x bf16, many rows: torch's GEMM
    monkeypatch.setattr(kernels, "_kernels", None)  # as installed without a C compiler
    x = torch.randn(1, 64, generator=g)
    assert_close_to_reference(record.matmul(x), x, weight.float())


def test_decoding_runs_torch_on_one_thread_and_the_kernels_on_all(restores_threads):
    torch.set_num_threads(2)
    with kernels.kernels_own_the_cores():
        assert torch.get_num_threads() == 1 and kernels.kernel_threads() == 2
    assert torch.get_num_threads() == 2 and kernels.kernel_threads() == 2
    with pytest.raises(RuntimeError), kernels.kernels_own_the_cores():
        raise RuntimeError("restored on errors too")
    assert torch.get_num_threads() == 2


@pytest.mark.skipif(not kernels.available() or not os.path.exists("/proc/cpuinfo"), reason="needs the kernels and Linux")
def test_bf16_dot_products_is_what_the_cpu_says():
    flags = set(next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split(":")[1].split())
    expected = {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_bf16"} <= flags
    assert kernels.bf16_dot_products() == expected


@needs_dense
@pytest.mark.skipif(not kernels.bf16_tiles(), reason="CPU or OS without AMX-BF16 tiles")
@pytest.mark.parametrize("dtype", [torch.int8, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(3072, 1024), (1030, 64), (40, 4160)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_a_decoding_steps_bf16_rows_multiply_on_amx_tiles(shape, dtype):
    """4..64 rows of bf16 x times int8 (scaled) or bf16 weights: bf16 products on AMX tiles (x as
    given, weights exact in bf16), fp32 sums, each row's result that row's alone; fewer rows, fp16
    weights or a forced ISA: the fp32 kernel."""
    g = torch.Generator().manual_seed(3)
    weight = random_weight(*shape, dtype, g)
    scale = torch.rand(shape[0], generator=g) if dtype == torch.int8 else None
    matrix = dense.DenseMatrix(weight, scale)
    x = torch.randn(dense.SMALL_BATCH_ROWS, shape[1], generator=g).to(torch.bfloat16)
    assert matrix.multiplies_on_tiles(x.shape[0]) and not matrix.multiplies_on_tiles(kernels.BF16_TILE_ROWS - 1)
    out = matrix.matmul(x)
    assert_close_to_reference(out, x, weight.float(), scale)
    for rows in (slice(0, 4), slice(4, 21), slice(21, 53), slice(53, 64)):  # 4, 17, 32, 11 rows: alike
        assert torch.equal(matrix.matmul(x[rows]), out[rows])
    forced = matrix.matmul(x, isa="avx512")
    assert not torch.equal(forced, out)
    assert_close_to_reference(forced, x, weight.float(), scale)
    assert not dense.DenseMatrix(weight.to(torch.float16) if dtype == torch.bfloat16 else weight.float().half())\
        .multiplies_on_tiles(x.shape[0])  # fp16 weights would be rounded
