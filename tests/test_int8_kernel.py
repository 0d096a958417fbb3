"""The compiled LLM.int8() quantizer (bloomconv.kernels.int8) against the torch code of
`quantize_int8_rows`, bit for bit, on every instruction set this CPU runs (bitsandbytes itself is
the reference of both: tests/test_quant.py)."""
from __future__ import annotations

from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bloomconv import kernels
from bloomconv.errors import QuantizationError
from bloomconv.kernels import int8 as int8_kernel
from bloomconv.storage import int8 as int8_storage
from bloomconv.storage.int8 import quantize_int8

needs_kernels = pytest.mark.skipif(not kernels.available(), reason="the C extension is not built")
ISAS = [pytest.param(isa, marks=pytest.mark.skipif(isa not in kernels.isas(), reason=f"CPU lacks {isa}"))
        for isa in ("avx512", "avx2", "scalar")]
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def torch_reference(weight, scale_from):
    with mock.patch.object(int8_storage, "_compiled_int8_quantizer", lambda: None):
        return quantize_int8(weight, scale_from)


def compiled(weight, scale_from, isa, chunk_elements=1 << 20):
    def quantizer():
        return lambda rows, CB, SCB, to_fp16: int8_kernel.int8_quantize_rows(rows, CB, SCB, to_fp16=to_fp16, isa=isa)
    with mock.patch.object(int8_storage, "_compiled_int8_quantizer", quantizer):
        return quantize_int8(weight, scale_from, chunk_elements=chunk_elements)


def assert_same(ours, reference):
    assert torch.equal(ours[0], reference[0])
    assert torch.equal(ours[1].view(torch.int32), reference[1].view(torch.int32))  # bits: +0 is not -0


def hard_rows(rows, cols, dtype, seed, scale):
    """Noise plus the edges: a zero row, a row too small for its reciprocal scale (CB 0), a row of
    ties (x * 127/absmax exactly k + 0.5), values near fp16's limit and its subnormals."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * scale
    if rows > 1:
        w[1] = 0
    if rows > 2:
        w[2] = 1e-38 * torch.sign(w[2])
    if rows > 3 and cols > 1:
        w[3] = 0.5
        w[3, 0] = 127.0                           # every other value scales to 0.5 exactly: ties to even
    if rows > 4:
        w[4] = torch.clamp(w[4] * 1e6, -65000, 65000)   # near fp16's largest finite value (in bf16 too)
    if rows > 5:
        w[5] = w[5] * 1e-3                        # fp16 subnormals after the cast
    return w.to(dtype)


@needs_kernels
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scale_from", ["float16", "source"])
@pytest.mark.parametrize("shape", [(3072, 1024), (57, 14336 // 64), (37, 91), (6, 33), (1, 1)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
def test_matches_the_torch_reference(shape, scale_from, dtype, isa):
    weight = hard_rows(*shape, dtype, seed=shape[1], scale=0.02)
    assert_same(compiled(weight, scale_from, isa, chunk_elements=1 << 16), torch_reference(weight, scale_from))


@needs_kernels
@settings(max_examples=80, deadline=None)
@given(rows=st.integers(1, 40), cols=st.integers(1, 300), dtype=st.sampled_from(DTYPES),
       scale_from=st.sampled_from(["float16", "source"]),
       scale=st.sampled_from([1e-40, 1e-36, 1e-6, 0.02, 1.0, 3000.0]), seed=st.integers(0, 2**31 - 1))
def test_any_shape_and_scale_matches_the_torch_reference(rows, cols, dtype, scale_from, scale, seed):
    weight = hard_rows(rows, cols, dtype, seed, scale)
    reference = torch_reference(weight, scale_from)
    for isa in kernels.isas():
        assert_same(compiled(weight, scale_from, isa), reference)


@needs_kernels
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), 70000.0])
def test_rows_it_cannot_quantize_get_nan_scb_and_typed_errors(bad, isa):
    weight = torch.ones(3, 64)
    weight[1, 17] = bad
    CB, SCB = torch.empty(3, 64, dtype=torch.int8), torch.empty(3)
    for scale_from in ("float16", "source"):
        int8_kernel.int8_quantize_rows(weight, CB, SCB, to_fp16=scale_from == "float16", isa=isa)
        unquantizable = bad != 70000.0 or scale_from == "float16"   # 70000 only overflows fp16
        assert torch.isnan(SCB[1]) == unquantizable and (SCB[[0, 2]] == 1).all()
        message = "beyond float16's range" if bad == 70000.0 else "NaN or infinite"
        if unquantizable:
            with pytest.raises(QuantizationError, match=message):
                compiled(weight, scale_from, isa)
            with pytest.raises(QuantizationError, match=message):
                torch_reference(weight, scale_from)


@needs_kernels
def test_result_does_not_depend_on_the_thread_count(restores_threads):
    weight = hard_rows(1000, 1024, torch.bfloat16, seed=5, scale=0.02)
    results = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        results.append(quantize_int8(weight))
    for other in results[1:]:
        assert_same(other, results[0])


@needs_kernels
def test_bad_arguments_raise_typed_errors():
    rows = torch.ones(4, 8)
    with pytest.raises(QuantizationError, match="2-D"):
        int8_kernel.int8_quantize_rows(torch.ones(8), torch.empty(8, dtype=torch.int8), torch.empty(1), to_fp16=True)
    with pytest.raises(QuantizationError, match="CB is"):
        int8_kernel.int8_quantize_rows(rows, torch.empty(4, 8), torch.empty(4), to_fp16=True)
    with pytest.raises(QuantizationError, match="SCB is"):
        int8_kernel.int8_quantize_rows(rows, torch.empty(4, 8, dtype=torch.int8), torch.empty(3), to_fp16=True)
    with pytest.raises(QuantizationError, match="int8-quantize"):
        int8_kernel.int8_quantize_rows(rows.to(torch.int32), torch.empty(4, 8, dtype=torch.int8), torch.empty(4),
                                       to_fp16=True)
