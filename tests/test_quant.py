"""bloomconv.quant and converters/encode.py against bitsandbytes itself, bit for bit.

Reference calls: `F.int8_vectorwise_quant`, `F.quantize_4bit` + `QuantState.as_dict(packed=True)`,
`F.quantize_blockwise` (via double quant), `F.dequantize_4bit` and its reference PyTorch kernel,
and the nn modules that load the stored tensors. That kernel is `torch.compile`d by bitsandbytes
and would recompile per shape; dynamo is switched off here to keep the file fast (compiled and
eager gave the same bits when checked).
"""
from __future__ import annotations

import json
from unittest import mock

import bitsandbytes as bnb
import bitsandbytes.functional as F
import numpy as np
import pytest
import torch
import torch.nn.functional as nnf
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from bloomconv.converters.encode import config_with_quantization, encode_for_storage
from bloomconv.errors import OptionsError, QuantizationError
from bloomconv.format import (is_quantized_weight, BLOCK_LINEAR_WEIGHTS, BLOCK_TENSORS, EMBEDDING_TENSORS, FINAL_TENSORS, PREFIX,
                              QuantType, block_tensor)
from bloomconv.settings import QuantSettings
from bloomconv.storage.fourbit import FourBitState, code_table, dequantize_4bit, dynamic_map, quantize_4bit
from bloomconv.storage.int8 import dequantize_int8, quantize_int8

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
FOUR_BIT = (QuantType.NF4, QuantType.FP4)


@pytest.fixture(scope="module", autouse=True)
def _eager_bitsandbytes():
    previous = torch._dynamo.config.disable
    torch._dynamo.config.disable = True
    yield
    torch._dynamo.config.disable = previous


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor: equality of these is bit-exactness (+0 differs from -0)."""
    return t.contiguous().view(-1).view(torch.uint8)


def assert_bit_identical(ours: dict, theirs: dict) -> None:
    assert list(ours) == list(theirs)
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype, key
        assert ours[key].shape == theirs[key].shape, key
        assert torch.equal(bits(ours[key]), bits(theirs[key])), key


def bnb_4bit(weight, quant_type, block_size, double_quant) -> dict:
    packed, state = F.quantize_4bit(weight, blocksize=block_size, quant_type=quant_type.value,
                                    compress_statistics=double_quant)
    return {"weight": packed, **{f"weight.{k}": v for k, v in state.as_dict(packed=True).items()}}


def bnb_dequantize_4bit(stored: dict, kernel: str) -> torch.Tensor:
    """F.dequantize_4bit ("public": its CPU C kernel) or the same with its reference PyTorch kernel."""
    state = F.QuantState.from_dict({k.removeprefix("weight."): v for k, v in stored.items() if k != "weight"},
                                   device="cpu")
    if kernel == "public":
        return F.dequantize_4bit(stored["weight"], state)
    absmax = state.absmax
    if state.nested:
        absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
    return _dequantize_4bit_compute(stored["weight"].view(-1), absmax, F.get_4bit_type(state.quant_type, device="cpu"),
                                    state.blocksize, state.shape, state.dtype)


def public_kernel_is_right(shape, block_size) -> bool:
    """bitsandbytes' AVX-512 kernel indexes absmax per row: wrong if rows split blocks (see quant.py)."""
    return shape[-1] % 16 != 0 or shape[-1] % block_size == 0


def bnb_int8(weight, scale_from):
    CB, SCB, _ = F.int8_vectorwise_quant(weight.half() if scale_from == "float16" else weight.clone(), threshold=0.0)
    return CB, SCB


def int8_both_ways(weight, scale_from, **chunking):
    """quantize_int8 by the compiled quantizer (when built) and by torch: bit for bit the same."""
    ours = quantize_int8(weight, scale_from, **chunking)
    with mock.patch("bloomconv.storage.int8._compiled_int8_quantizer", lambda: None):
        reference = quantize_int8(weight, scale_from, **chunking)
    assert torch.equal(ours[0], reference[0]) and torch.equal(bits(ours[1]), bits(reference[1]))
    return ours


def check_4bit_against_bnb(weight, quant_type, block_size, double_quant, **chunking):
    """Both quantizers (the compiled one, when built, and the torch one) against bitsandbytes."""
    ours = quantize_4bit(weight, quant_type, block_size, double_quant, **chunking)
    assert_bit_identical(ours, bnb_4bit(weight, quant_type, block_size, double_quant))
    with mock.patch("bloomconv.storage.fourbit._compiled_4bit_quantizer", lambda: None):
        assert_bit_identical(quantize_4bit(weight, quant_type, block_size, double_quant, **chunking), ours)
    restored = dequantize_4bit(ours, **chunking)
    assert restored.shape == weight.shape and restored.dtype == weight.dtype
    assert torch.equal(bits(restored), bits(bnb_dequantize_4bit(ours, "reference")))
    if public_kernel_is_right(weight.shape, block_size):
        # equal values; bits differ only in the sign of FP4's zero code (see quant.py)
        assert torch.equal(restored, bnb_dequantize_4bit(ours, "public").reshape(weight.shape))  # 1-D: (1, n)
    return ours, restored


def normal_weight(shape, dtype, seed=0, scale=0.02):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator) * scale).to(dtype)


# ------------------------------------------------------------------------ tables and real shapes

def test_code_tables_are_bitsandbytes_tables():
    for quant_type in FOUR_BIT:
        assert torch.equal(bits(code_table(quant_type)), bits(F.get_4bit_type(quant_type.value, device="cpu")))
    assert torch.equal(bits(dynamic_map()), bits(F.create_dynamic_map()))


@pytest.mark.parametrize("shape", [(3072, 1024), (1024, 4096), (37, 91), (5, 33), (1, 1)])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("scale_from", ["float16", "source"])
def test_int8_matches_bitsandbytes(shape, dtype, scale_from):
    weight = normal_weight(shape, dtype, seed=shape[0])
    CB, SCB = int8_both_ways(weight, scale_from, chunk_elements=1 << 18)
    ref_CB, ref_SCB = bnb_int8(weight, scale_from)
    assert CB.dtype == torch.int8 and CB.shape == shape and SCB.dtype == torch.float32 and SCB.shape == shape[:1]
    assert torch.equal(CB, ref_CB) and torch.equal(bits(SCB), bits(ref_SCB))
    for out_dtype in FLOAT_DTYPES:
        expected = F.int8_vectorwise_dequant(ref_CB, ref_SCB).to(out_dtype)
        assert torch.equal(bits(dequantize_int8(CB, SCB, out_dtype, chunk_elements=1 << 18)), bits(expected))


@pytest.mark.parametrize("quant_type", FOUR_BIT)
@pytest.mark.parametrize("block_size", [32, 64, 128, 256])
@pytest.mark.parametrize("double_quant", [False, True])
def test_4bit_matches_bitsandbytes_on_real_shapes(quant_type, block_size, double_quant):
    # 3072x1024 is BLOOM-560m's query_key_value; chunked so several chunks and nested blocks occur
    weight = normal_weight((3072, 1024), torch.bfloat16, seed=block_size)
    check_4bit_against_bnb(weight, quant_type, block_size, double_quant, chunk_elements=1 << 20)


@pytest.mark.parametrize("quant_type", FOUR_BIT)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", [(4096, 1024), (301, 99), (1000,), (7,)])
def test_4bit_matches_bitsandbytes_per_dtype(quant_type, dtype, shape):
    # (301, 99): 29799 elements, not a multiple of any block size, odd; 932 blocks of 32 = 4 nested
    weight = normal_weight(shape, dtype, seed=len(shape))
    configs = [(64, True)] if weight.numel() > 1e6 else [(32, True), (64, False), (128, True)]
    for block_size, double_quant in configs:
        check_4bit_against_bnb(weight, quant_type, block_size, double_quant)


def test_chunked_equals_whole():
    weight = normal_weight((67, 99), torch.bfloat16, seed=3)  # 208 blocks of 32, the last partial
    for quant_type in FOUR_BIT:
        whole = quantize_4bit(weight, quant_type, 32, True)
        for chunk in (1, 97, 3 * 32 + 1):  # at least one whole block per chunk, whatever is asked
            assert_bit_identical(quantize_4bit(weight, quant_type, 32, True, chunk_elements=chunk), whole)
            assert torch.equal(bits(dequantize_4bit(whole, chunk_elements=chunk)), bits(dequantize_4bit(whole)))
    CB, SCB = quantize_int8(weight)
    for chunk in (1, 99, 250):
        chunked = quantize_int8(weight, chunk_elements=chunk)
        assert torch.equal(chunked[0], CB) and torch.equal(chunked[1], SCB)
        assert torch.equal(dequantize_int8(CB, SCB, chunk_elements=chunk), dequantize_int8(CB, SCB))


# ------------------------------------------------------------------------------- properties

@st.composite
def weights(draw, max_rows=24, max_cols=200):
    """2-D float weights: either hypothesis-chosen values (repeats, zeros, extremes) or dense noise."""
    shape = (draw(st.integers(1, max_rows)), draw(st.integers(1, max_cols)))
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    if draw(st.booleans()):
        elements = st.floats(-1000, 1000, width=32, allow_subnormal=False)
        values = torch.from_numpy(draw(arrays(np.float32, shape, elements=elements)))
    else:
        values = normal_weight(shape, torch.float32, seed=draw(st.integers(0, 2**31)),
                               scale=draw(st.sampled_from([1e-4, 0.02, 1.0, 300.0])))
    return values.to(dtype)


FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(weights(), st.sampled_from(["float16", "source"]))
def test_int8_property(weight, scale_from):
    CB, SCB = int8_both_ways(weight, scale_from)
    rows, cols = weight.shape
    assert CB.dtype == torch.int8 and CB.shape == (rows, cols)
    assert SCB.dtype == torch.float32 and SCB.shape == (rows,)
    ref_CB, ref_SCB = bnb_int8(weight, scale_from)
    nonzero = ref_SCB > 0  # bitsandbytes computes 0 * inf = NaN for zero rows; ours are exactly 0
    assert torch.equal(CB[nonzero], ref_CB[nonzero]) and torch.equal(bits(SCB), bits(ref_SCB))
    assert not CB[~nonzero].any()
    quantized_from = (weight.half() if scale_from == "float16" else weight).float()
    error = (dequantize_int8(CB, SCB) - quantized_from).abs()
    # Half a step of each row's scale; a row with absmax below 127/FLT_MAX quantizes to 0 (as in bnb).
    tolerance = torch.clamp(SCB[:, None] * (0.5 / 127 + 1e-6), min=TINY_INT8_ROW)
    assert (error <= tolerance).all()


TINY_INT8_ROW = 127 / torch.finfo(torch.float32).max


def test_int8_row_too_small_for_its_reciprocal_scale_quantizes_to_zero_like_bitsandbytes():
    weight = torch.tensor([[torch.finfo(torch.float32).tiny, -1e-38], [1e-36, 5e-37]])
    CB, SCB = int8_both_ways(weight, "source")
    ref_CB, ref_SCB = bnb_int8(weight, "source")
    assert torch.equal(CB, ref_CB) and torch.equal(bits(SCB), bits(ref_SCB))
    assert CB[0].tolist() == [0, 0] and CB[1, 0] == 127
    assert ((dequantize_int8(CB, SCB) - weight).abs() < TINY_INT8_ROW).all()


@FAST
@given(weights(), st.sampled_from(FOUR_BIT), st.sampled_from([32, 64, 128, 256]), st.booleans())
def test_4bit_property(weight, quant_type, block_size, double_quant):
    stored, restored = check_4bit_against_bnb(weight, quant_type, block_size, double_quant)
    n = weight.numel()
    nblocks = -(-n // block_size)
    assert stored["weight"].dtype == torch.uint8 and stored["weight"].shape == ((n + 1) // 2, 1)
    assert stored["weight.absmax"].shape == (nblocks,)
    assert stored["weight.absmax"].dtype == (torch.uint8 if double_quant else torch.float32)
    assert stored["weight.quant_map"].shape == (16,)
    if double_quant:
        assert stored["weight.nested_absmax"].shape == (-(-nblocks // 256),)
        assert stored["weight.nested_quant_map"].shape == (256,)
    # error: half the widest gap of the code, times the block's absmax (as recovered, with double
    # quant: the 8-bit coding of absmax adds at most its own error, since |code| <= 1)
    true_absmax = quantize_4bit(weight, quant_type, block_size)["weight.absmax"]
    absmax = _recovered_absmax(stored) if double_quant else true_absmax
    code = code_table(quant_type).sort().values
    half_gap = (code[1:] - code[:-1]).max() / 2
    per_element = lambda a: a.repeat_interleave(block_size)[:n].view(weight.shape)  # noqa: E731
    bound = (per_element(torch.maximum(absmax, true_absmax)) * (half_gap + 1e-6)
             + per_element((absmax - true_absmax).abs()))
    error = (dequantize_4bit(stored, torch.float32) - weight.float()).abs()
    assert (error <= bound).all()


def _recovered_absmax(stored):
    state = FourBitState.from_blob(stored["weight.quant_state.bitsandbytes__" + _quant_type(stored)])
    codes = stored["weight.absmax"].long()
    scale = stored["weight.nested_absmax"].repeat_interleave(256)[:codes.numel()]
    return stored["weight.nested_quant_map"][codes] * scale + state.nested_offset


def _quant_type(stored):
    return next(k for k in stored if "bitsandbytes__" in k).rsplit("__", 1)[1]


# ----------------------------------------------------------------------------------- edges

def test_float16_overflow_is_refused_not_stored_as_inf():
    weight = normal_weight((4, 64), torch.bfloat16)
    weight[2, 5] = 70000.0  # bfloat16 holds it (as 70144); float16 tops out at 65504
    with pytest.raises(QuantizationError, match="int8_scale_from='source'"):
        quantize_int8(weight, "float16", name="transformer.h.0.mlp.dense_4h_to_h.weight")
    assert torch.isinf(bnb_int8(weight, "float16")[1][2])  # what transformers would have stored
    CB, SCB = int8_both_ways(weight, "source")
    assert torch.isfinite(SCB).all() and SCB[2] == 70144.0
    assert torch.equal(CB, bnb_int8(weight, "source")[0])


def test_float16_rounding_down_to_max_is_accepted():
    weight = torch.full((2, 8), 0.5, dtype=torch.float32)
    weight[0, 0] = 65510.0  # rounds to float16's max, as transformers' cast does
    CB, SCB = int8_both_ways(weight, "float16")
    assert SCB[0] == 65504.0 and torch.equal(CB, bnb_int8(weight, "float16")[0])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(bad):
    weight = torch.ones(4, 64)
    weight[1, 1] = bad
    for scale_from in ("float16", "source"):
        with pytest.raises(QuantizationError, match="NaN or infinite"):
            quantize_int8(weight, scale_from)
        with mock.patch("bloomconv.storage.int8._compiled_int8_quantizer", lambda: None), \
                pytest.raises(QuantizationError, match="NaN or infinite"):
            quantize_int8(weight, scale_from)
    with pytest.raises(QuantizationError, match="NaN or infinite"):
        quantize_4bit(weight, QuantType.NF4)


def test_zero_rows_and_zero_blocks():
    weight = normal_weight((6, 100), torch.bfloat16)
    weight[1] = 0
    weight[4, :64] = 0  # a zero block at block size 64 (the flattened 4*100 = 400 starts block 6.25)
    weight.view(-1)[-24:] = 0  # the tensor's partial tail block is zero: 600 = 9*64 + 24
    CB, SCB = int8_both_ways(weight, "float16")
    assert SCB[1] == 0 and not CB[1].any()
    assert torch.equal(dequantize_int8(CB, SCB)[1], torch.zeros(100))
    for quant_type in FOUR_BIT:
        for double_quant in (False, True):
            _, restored = check_4bit_against_bnb(weight, quant_type, 64, double_quant)
            assert not restored[1].any()
    zeros = torch.zeros(3, 64, dtype=torch.float16)
    for quant_type in FOUR_BIT:
        _, restored = check_4bit_against_bnb(zeros, quant_type, 32, True)  # offset 0, a zero nested block
        assert not restored.any()


def test_invalid_requests_raise_typed_errors():
    with pytest.raises(QuantizationError, match="2-D"):
        quantize_int8(torch.ones(8))
    with pytest.raises(QuantizationError, match="scale_from"):
        quantize_int8(torch.ones(2, 8), "bfloat16")
    with pytest.raises(QuantizationError, match="dtype"):
        quantize_4bit(torch.ones(2, 8, dtype=torch.int32), QuantType.NF4)
    with pytest.raises(QuantizationError, match="block size"):
        quantize_4bit(torch.ones(2, 8), QuantType.NF4, block_size=48)
    with pytest.raises(QuantizationError, match="4-bit"):
        quantize_4bit(torch.ones(2, 8), QuantType.INT8)
    stored = quantize_4bit(torch.ones(2, 64), QuantType.FP4)
    stored["weight.quant_state.bitsandbytes__fp4"] = torch.tensor(list(b'{"quant_type": "fp4"}'), dtype=torch.uint8)
    with pytest.raises(QuantizationError, match="state"):
        dequantize_4bit(stored)


def test_blob_is_the_json_bitsandbytes_writes():
    weight = normal_weight((64, 96), torch.float16)
    stored = quantize_4bit(weight, QuantType.FP4, 128, True)
    blob = json.loads(bytes(stored["weight.quant_state.bitsandbytes__fp4"].tolist()))
    assert list(blob) == ["quant_type", "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype",
                          "nested_offset"]
    assert blob["dtype"] == "float16" and blob["shape"] == [64, 96] and blob["nested_blocksize"] == 256
    state = FourBitState.from_blob(stored["weight.quant_state.bitsandbytes__fp4"])
    assert FourBitState.from_blob(state.to_blob()) == state and state.nested


# ------------------------------------------------------------------- loading into bnb modules

def test_int8_loads_into_linear8bitlt():
    weight, bias = normal_weight((96, 128), torch.bfloat16), normal_weight((96,), torch.float32, seed=1)
    x = normal_weight((3, 128), torch.float32, seed=2, scale=1.0)
    CB, SCB = quantize_int8(weight)
    # a fresh module refuses pre-quantized weights; after .to("cpu") it takes them
    module = bnb.nn.Linear8bitLt(128, 96, bias=True, has_fp16_weights=False).to("cpu")
    module.load_state_dict({"weight": CB, "bias": bias, "SCB": SCB}, strict=False)
    expected = nnf.linear(x, dequantize_int8(CB, SCB), bias)
    with torch.no_grad():
        train_out = module.train()(x)  # MatMul8bitFp: dequantize, then linear (1/127 rounded apart)
        eval_out = module.eval()(x)    # MatMul8bitLt: int8 activations too
    assert torch.allclose(train_out, expected, rtol=1e-5, atol=1e-6)
    assert (eval_out - expected).norm() / expected.norm() < 2e-2


@pytest.mark.parametrize("quant_type", FOUR_BIT)
@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_4bit_loads_into_linear4bit(quant_type, compute_dtype):
    weight, bias = normal_weight((96, 128), torch.bfloat16), normal_weight((96,), torch.float32, seed=1)
    x = normal_weight((3, 128), torch.float32, seed=2, scale=1.0)
    stored = quantize_4bit(weight, quant_type, 64, True)
    module = bnb.nn.Linear4bit(128, 96, bias=True, compute_dtype=compute_dtype, quant_type=quant_type.value)
    module.weight = bnb.nn.Params4bit.from_prequantized(
        stored["weight"], {k.removeprefix("weight."): v for k, v in stored.items() if k != "weight"},
        device="cpu", module=module)
    module.bias = torch.nn.Parameter(bias.clone(), requires_grad=False)
    state_dict = module.state_dict()
    assert_bit_identical({k: state_dict[k] for k in stored}, stored)  # re-saves identically
    # forward dequantizes straight to the compute dtype, then F.linear
    expected = nnf.linear(x.to(compute_dtype), dequantize_4bit(stored, compute_dtype), bias.to(compute_dtype)).float()
    with torch.no_grad():
        assert torch.equal(module.train()(x), expected)
        # eval on AVX512-BF16 CPUs repacks for a bf16 kernel: close, not equal
        eval_out = module.eval()(x)
    assert (eval_out - expected).norm() / expected.norm() < 1e-2


# ----------------------------------------------------------------------- encode for storage

def _source_names(n_layer=2):
    names = [PREFIX + n for n in EMBEDDING_TENSORS]
    names += [block_tensor(i, local) for i in range(n_layer) for local in BLOCK_TENSORS]
    return names + [PREFIX + n for n in FINAL_TENSORS]


@pytest.mark.parametrize("settings_", [
    QuantSettings(QuantType.INT8),
    QuantSettings(QuantType.INT8, int8_scale_from="source", embeddings=True),
    QuantSettings(QuantType.NF4, 64, embeddings=False),
    QuantSettings(QuantType.FP4, 32, double_quant=True, embeddings=True),
], ids=["int8", "int8-source-emb", "nf4", "fp4-dq-emb"])
def test_encode_selects_exactly_the_linear_weights(settings_):
    quantized = {block_tensor(i, w) for i in range(2) for w in BLOCK_LINEAR_WEIGHTS}
    if settings_.embeddings:
        quantized.add(PREFIX + "word_embeddings.weight")
    for name in _source_names():
        tensor = normal_weight((16, 64) if name.endswith("weight") else (64,), torch.bfloat16)
        stored = encode_for_storage(name, tensor, settings_)
        assert is_quantized_weight(name, bool(settings_.embeddings)) == (name in quantized)
        if name not in quantized:
            assert len(stored) == 1 and stored[0][0] == name and stored[0][1] is tensor
            assert stored[0][2] is QuantType.NONE
            continue
        module = name.removesuffix(".weight")
        assert all(q is settings_.quant_type for _, _, q in stored)
        got = {n: t for n, t, _ in stored}
        if settings_.quant_type is QuantType.INT8:
            assert list(got) == [f"{module}.weight", f"{module}.SCB"]
            CB, SCB = bnb_int8(tensor, settings_.int8_scale_from or "float16")
            assert torch.equal(got[f"{module}.weight"], CB) and torch.equal(got[f"{module}.SCB"], SCB)
        else:
            expected = bnb_4bit(tensor, settings_.quant_type, settings_.block_size, settings_.double_quant)
            assert_bit_identical(got, {f"{module}.{k}": v for k, v in expected.items()})


def test_encode_names_that_only_look_like_linear_weights():
    s = QuantSettings(QuantType.INT8, embeddings=False)
    for name in ["transformer.h.x.mlp.dense_4h_to_h.weight", "transformer.h.0.mlp.dense_4h_to_h.bias",
                 "lm_head.weight", "transformer.word_embeddings.weight", "transformer.h.0"]:
        assert not is_quantized_weight(name, s.embeddings), name
        assert encode_for_storage(name, torch.ones(4, 16), s)[0][2] is QuantType.NONE
    # source (unprefixed) and stored (prefixed) spellings name the same tensor
    assert is_quantized_weight("h.0.mlp.dense_4h_to_h.weight", False)


def test_config_with_quantization_is_a_bitsandbytes_config():
    from transformers import BitsAndBytesConfig
    source = json.dumps({"model_type": "bloom", "dtype": "bfloat16"}).encode()
    int8 = json.loads(config_with_quantization(source, QuantSettings(QuantType.INT8, embeddings=False)))
    assert int8["model_type"] == "bloom"
    config = BitsAndBytesConfig.from_dict(int8["quantization_config"])
    assert config.load_in_8bit and not config.load_in_4bit and config.llm_int8_skip_modules == ["lm_head"]
    nf4 = json.loads(config_with_quantization(source, QuantSettings(QuantType.NF4, 64, double_quant=True,
                                                                    embeddings=False)))
    config = BitsAndBytesConfig.from_dict(nf4["quantization_config"])
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_use_double_quant
    with pytest.raises(OptionsError, match="not a quantization"):
        QuantSettings(QuantType.NONE)


@pytest.fixture(scope="module")
def fp32_checkpoint(tmp_path_factory):
    """fp32, so the quantized model runs in fp32 and its logits differ from the dequantized model's
    by the bitsandbytes kernels alone (int8 activations; a bf16 kernel on AVX512-BF16 CPUs)."""
    pytest.importorskip("accelerate", reason="transformers loads bitsandbytes checkpoints only with accelerate")
    from bloomconv.converters.example import write_example_checkpoint

    from .conftest import SMALL
    return write_example_checkpoint(tmp_path_factory.mktemp("fp32"), SMALL, "safetensors-single", torch.float32)


@pytest.mark.parametrize("settings_", [
    QuantSettings(QuantType.INT8, embeddings=False),  # transformers keeps word_embeddings an nn.Embedding
    QuantSettings(QuantType.NF4, 64, double_quant=True, embeddings=False),
    QuantSettings(QuantType.FP4, 32, embeddings=False),
], ids=["int8", "nf4-dq", "fp4"])
def test_transformers_loads_a_quantized_directory(fp32_checkpoint, tmp_path, settings_):
    from transformers import BloomForCausalLM

    from bloomconv.converters.convert import convert

    from .conftest import load_converted_tensors

    dst = tmp_path / "dst"
    convert(fp32_checkpoint, dst, quantization=settings_)
    stored = load_converted_tensors(dst)
    # reference: the source model in fp32 with every quantized weight replaced by its dequantization
    reference = BloomForCausalLM.from_pretrained(fp32_checkpoint, dtype=torch.float32).eval()
    for i, block in enumerate(reference.transformer.h):
        for local in BLOCK_LINEAR_WEIGHTS:
            module = f"h.{i}.{local.removesuffix('.weight')}"
            if settings_.quant_type is QuantType.INT8:
                weight = dequantize_int8(stored[f"{module}.weight"], stored[f"{module}.SCB"])
            else:
                weight = dequantize_4bit({k.removeprefix(module + "."): v for k, v in stored.items()
                                          if k.startswith(module + ".weight")}, torch.float32)
            block.get_submodule(local.removesuffix(".weight")).weight.data = weight
    model = BloomForCausalLM.from_pretrained(dst).eval()
    linear = model.transformer.h[0].mlp.dense_4h_to_h
    assert isinstance(linear, bnb.nn.Linear8bitLt if settings_.quant_type is QuantType.INT8 else bnb.nn.Linear4bit)
    assert type(model.lm_head) is torch.nn.Linear  # tied to the embeddings, never quantized
    ids = torch.randint(0, 512, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = reference(ids).logits, model(ids).logits
    # 4-bit lands ~2e-4 from the dequantized model here, and ~6e-3 from the unquantized one
    assert (got - expected).norm() / expected.norm() < 3e-3
