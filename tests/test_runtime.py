"""The runtime against transformers' BloomForCausalLM on the same converted directories."""
from __future__ import annotations

import dataclasses
import errno
import json
import mmap
import os
import re
import shutil
import subprocess
import sys
import threading
import time

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

import bloomconv.runtime as runtime
from bloomconv.cli import main
from bloomconv.converters.convert import convert, quantize
from bloomconv.converters.example import write_example_checkpoint
from bloomconv.errors import OptionsError, VerificationError
from bloomconv.format import EMBEDDING_WEIGHT, EMBEDDINGS_UNIT, FINAL_UNIT, PREFIX, QuantType, block_unit
from bloomconv.geometry import Geometry
from bloomconv.manifest import read_manifest
from bloomconv.settings import QuantSettings
from bloomconv.storage.int8 import dequantize_int8, quantize_int8
from bloomconv import kernels
from bloomconv.kernels import dense, fourbit
from bloomconv.runtime import files, memory, readahead, residency

from .conftest import load_dequantized, streaming_everything

GEOMETRIES = {
    # hidden, layers, heads, vocab: heads a power of two or not (ALiBi's interleaved slopes)
    "h64-l2-n4": (64, 2, 4, 1024),
    "h96-l3-n6": (96, 3, 6, 512),
    "h128-l1-n16": (128, 1, 16, 768),
}
PAD = 3  # example checkpoints: bos 1, eos 2, pad 3


@pytest.fixture(scope="module", params=list(GEOMETRIES))
def pair(request, tmp_path_factory):
    """(runtime model, transformers model) on one converted fp32 directory."""
    root = tmp_path_factory.mktemp(request.param)
    return _converted_pair(root, GEOMETRIES[request.param])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _converted_pair(tmp_path_factory.mktemp("tiny"), GEOMETRIES["h64-l2-n4"])


def _converted_pair(root, geometry):
    from transformers import BloomForCausalLM
    write_example_checkpoint(root / "src", geometry, layout="release-pickle-shards", dtype=torch.float32)
    convert(root / "src", root / "dst")
    model = runtime.load(root / "dst")
    reference = BloomForCausalLM.from_pretrained(root / "dst", dtype=torch.float32).eval()
    return model, reference


def padded_batch(vocab: int, lengths=(9, 6, 3), seed=0):
    """Random ids with left padding: (B, T) ids and mask."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(4, vocab, (len(lengths), T), generator=g)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, T - n:] = 1
    return ids.masked_fill(mask == 0, PAD), mask


def reference_logits(reference, ids, mask=None):
    with torch.no_grad():
        return reference(ids, attention_mask=mask).logits


def test_logits_match_transformers_with_left_padding(pair):
    model, reference = pair
    ids, mask = padded_batch(model.geometry.vocab_size)
    logits, _ = model.forward(ids, mask)
    real = mask.bool()  # padded positions attend to nothing: their logits are meaningless in both
    assert (logits - reference_logits(reference, ids, mask))[real].abs().max() < 1e-4


def test_logits_match_transformers_without_mask(pair):
    model, reference = pair
    ids, _ = padded_batch(model.geometry.vocab_size, lengths=(7, 7))
    logits, _ = model.forward(ids)
    assert (logits - reference_logits(reference, ids)).abs().max() < 1e-4


def test_kv_cache_matches_full_forward(pair):
    model, reference = pair
    ids, mask = padded_batch(model.geometry.vocab_size, lengths=(10, 7, 4), seed=1)
    expected = reference_logits(reference, ids, mask)
    # prompt of 5, then 2 tokens at once, then one at a time
    logits, past = model.forward(ids[:, :5], mask[:, :5])
    pieces = [logits]
    for start, end in [(5, 7), (7, 8), (8, 9), (9, 10)]:
        logits, past = model.forward(ids[:, start:end], mask[:, :end], past)
        pieces.append(logits)
    assert past.length == 10
    assert (torch.cat(pieces, dim=1) - expected)[mask.bool()].abs().max() < 1e-4


def test_greedy_generation_matches_transformers(pair):
    model, reference = pair
    ids, mask = padded_batch(model.geometry.vocab_size, lengths=(6, 4, 2), seed=2)
    ours = model.generate_ids(ids, mask, max_new_tokens=12)
    with torch.no_grad():
        theirs = reference.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    assert torch.equal(ours, theirs)


def test_sampling_is_reproducible_with_a_seed(tiny):
    model, _ = tiny
    kwargs = dict(max_new_tokens=12, temperature=1.5, top_k=50, top_p=0.95)
    first = model.generate(["The file", "a"], seed=7, **kwargs)
    assert model.generate(["The file", "a"], seed=7, **kwargs) == first
    assert any(model.generate(["The file", "a"], seed=s, **kwargs) != first for s in (8, 9, 10))


def test_stream_yields_what_generate_returns(tiny):
    model, _ = tiny
    pieces = list(model.stream("Return the", max_new_tokens=15))
    assert len(pieces) > 1 and "".join(pieces) == model.generate("Return the", max_new_tokens=15)
    sampled = dict(max_new_tokens=10, temperature=1.0, seed=3)
    assert "".join(model.stream("x", **sampled)) == model.generate("x", **sampled)


def test_generate_batches_prompts_of_different_lengths(tiny):
    model, _ = tiny
    prompts = ["Return a new list", "x"]
    batched = model.generate(prompts, max_new_tokens=8)
    assert batched == [model.generate(p, max_new_tokens=8) for p in prompts]


def test_generation_stats_count_tokens_and_time(tiny):
    model, _ = tiny
    ids, mask = padded_batch(model.geometry.vocab_size, lengths=(5, 2))
    stats = runtime.GenerationStats()
    output = model.generate_ids(ids, mask, max_new_tokens=6, stats=stats)
    assert (stats.batch, stats.prompt_tokens, stats.steps) == (2, 7, output.shape[1] - ids.shape[1])
    assert stats.prefill_seconds > 0 and stats.decode_seconds > 0
    assert stats.decode_tokens_per_s == pytest.approx(2 * (stats.steps - 1) / stats.decode_seconds)


def test_top_k_and_top_p_masks_agree_with_transformers():
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(0)) * 3
    for k in (1, 5, 299):
        assert torch.equal(runtime.top_k_mask(logits, k), TopKLogitsWarper(k)(None, logits))
    for p in (0.05, 0.5, 0.9, 0.99):
        assert torch.equal(runtime.top_p_mask(logits, p).isinf(), TopPLogitsWarper(p)(None, logits).isinf())
    assert torch.equal(runtime.top_k_mask(logits, 0), logits) and torch.equal(runtime.top_p_mask(logits, 1.0), logits)


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.tensor([[0.1, 0.5, 0.15, 0.25]]).log()
    kept = lambda p: (~runtime.top_p_mask(logits, p).isinf()).nonzero()[:, 1].tolist()  # noqa: E731
    assert kept(0.4) == [1] and kept(0.6) == [1, 3] and kept(0.8) == [1, 2, 3] and kept(0.95) == [0, 1, 2, 3]


def test_sampling_never_leaves_the_filtered_set():
    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(1))
    allowed = ~runtime.top_p_mask(runtime.top_k_mask(logits, 5), 0.7).isinf()
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        token = runtime.next_tokens(logits, 1.0, 5, 0.7, g)
        assert allowed[torch.arange(2), token].all()
    assert torch.equal(runtime.next_tokens(logits, 0.0, 5, 0.7, g), logits.argmax(-1))


def test_bf16_compute_stays_close(tiny):
    model, reference = tiny
    ids, mask = padded_batch(model.geometry.vocab_size)
    with runtime.load(model.checkpoint.directory, dtype=torch.bfloat16) as bf16:
        logits, _ = bf16.forward(ids, mask)
    expected = reference_logits(reference, ids, mask)
    assert logits.dtype == torch.bfloat16
    assert (logits.float() - expected)[mask.bool()].abs().max() < 0.05 * expected.abs().max()


@pytest.fixture(scope="module")
def bf16_pair(tmp_path_factory):
    """A bf16-stored directory and transformers' fp32 model on it."""
    from transformers import BloomForCausalLM
    root = tmp_path_factory.mktemp("bf16")
    write_example_checkpoint(root / "src", GEOMETRIES["h64-l2-n4"], dtype=torch.bfloat16)
    convert(root / "src", root / "dst")
    return root / "dst", BloomForCausalLM.from_pretrained(root / "dst", dtype=torch.float32).eval()


def test_bf16_stored_weights_are_converted_piecewise(bf16_pair, monkeypatch):
    from bloomconv.storage import fallback
    monkeypatch.setattr(fallback, "CONVERT_CHUNK_BYTES", 4096)  # lm_head in 64 pieces of 16 rows
    directory, reference = bf16_pair
    ids, mask = padded_batch(1024)
    with runtime.load(directory, ram_budget="min") as model:  # room for the files as stored, not widened
        assert not model.checkpoint.residency.widened
        assert model.checkpoint.block(0).dense.weight.weight.dtype == torch.bfloat16
        logits, _ = model.forward(ids, mask)
    assert (logits - reference_logits(reference, ids, mask))[mask.bool()].abs().max() < 1e-4


def test_bf16_weights_stay_bf16_in_ram_with_the_dense_kernel(bf16_pair):
    directory, reference = bf16_pair
    ids, mask = padded_batch(1024)
    with runtime.load(directory) as model:
        assert not model.checkpoint.residency.widened
        assert model.checkpoint.block(0).dense.weight.weight.dtype == torch.bfloat16
        logits, _ = model.forward(ids, mask)
    assert (logits - reference_logits(reference, ids, mask))[mask.bool()].abs().max() < 1e-4


def test_bf16_weights_are_widened_once_without_the_dense_kernel(bf16_pair, monkeypatch):
    """Installed without a C compiler, fp32 compute widens bf16 weights at load when they fit."""
    monkeypatch.setattr(kernels, "_kernels", None)
    directory, reference = bf16_pair
    ids, mask = padded_batch(1024)
    with runtime.load(directory) as model:
        residency = model.checkpoint.residency
        assert residency.widened and residency.pinned_bytes > 1.9 * sum(
            f.stat().st_size for f in directory.rglob("*.safetensors"))
        assert model.checkpoint.block(0).dense.weight.weight.dtype == torch.float32
        logits, _ = model.forward(ids, mask)
    assert (logits - reference_logits(reference, ids, mask))[mask.bool()].abs().max() < 1e-4
    with runtime.load(directory, dtype=torch.bfloat16) as model:  # bf16 compute: nothing to widen
        assert not model.checkpoint.residency.widened


def test_streaming_blocks_past_a_ram_budget_gives_the_same_logits(tiny):
    model, _ = tiny
    ids, mask = padded_batch(model.geometry.vocab_size)
    with streaming_everything(model.checkpoint.directory) as streamed:
        assert torch.equal(streamed.forward(ids, mask)[0], model.forward(ids, mask)[0])


def test_wrong_attention_mask_shape_is_refused(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match=r"\(2, 4\)"):
        model.forward(torch.ones(2, 4, dtype=torch.long), torch.ones(2, 3))


# ------------------------------------------------------------------------------ damaged files

BLOCK = "block_001.safetensors"


@pytest.fixture
def damaged_copy(tiny, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(tiny[0].checkpoint.directory, dst)
    return dst


def test_truncated_block_fails_load_naming_the_file(damaged_copy):
    os.truncate(damaged_copy / BLOCK, (damaged_copy / BLOCK).stat().st_size - 100)
    with pytest.raises(VerificationError, match=f"{BLOCK}: truncated"):
        runtime.load(damaged_copy)


def test_corrupted_block_fails_full_verification_naming_the_file(damaged_copy):
    path = damaged_copy / BLOCK
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    runtime.load(damaged_copy).close()  # fast: sizes and headers only; no weight byte is read at load
    with pytest.raises(VerificationError, match=f"{BLOCK}: corrupted"):
        runtime.load(damaged_copy, verify="full")


def test_damaged_header_fails_fast_load(damaged_copy):
    path = damaged_copy / BLOCK
    data = bytearray(path.read_bytes())
    data[20:24] = b"XXXX"  # inside the JSON header
    path.write_bytes(bytes(data))
    with pytest.raises(VerificationError, match=f"{BLOCK}: header"):
        runtime.load(damaged_copy)


def test_unlisted_extra_file_does_not_block_loading(damaged_copy):
    (damaged_copy / "NOTES.txt").write_text("downloaded from the lab share")
    runtime.load(damaged_copy).close()


def test_runtime_imports_neither_converters_nor_transformers(tiny):
    code = ("import sys, torch, bloomconv.runtime as r\n"
            f"m = r.load({str(tiny[0].checkpoint.directory)!r})\n"
            "m.generate('a', max_new_tokens=2)\n"
            "bad = [n for n in sys.modules if n.split('.')[0] in ('transformers', 'click', 'bitsandbytes')"
            " or n.startswith('bloomconv.converters')]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------- quantized weights

QUANTIZED = {
    # name: (settings, logits tolerance relative to the largest logit)
    "int8": (QuantSettings(QuantType.INT8, embeddings=False), 1e-5),
    "int8+embeddings": (QuantSettings(QuantType.INT8, embeddings=True), 1e-5),
    "nf4": (QuantSettings(QuantType.NF4, embeddings=False), 1e-5),
    "nf4+int8 embeddings": (QuantSettings(QuantType.NF4), 1e-5),  # the preset
    "fp4": (QuantSettings(QuantType.FP4, block_size=128, double_quant=False, embeddings=False), 1e-5),
}


@pytest.fixture(scope="module")
def quantized_dirs(tiny, tmp_path_factory):
    """`tiny`'s source converted with each of QUANTIZED's settings (built once, on first use)."""
    source = tiny[0].checkpoint.directory.parent / "src"
    root = tmp_path_factory.mktemp("quantized")
    built = {}

    def get(name):
        if name not in built:
            built[name] = root / name
            convert(source, built[name], quantization=QUANTIZED[name][0])
        return built[name]
    return get


@pytest.mark.parametrize("name", list(QUANTIZED))
def test_quantized_directory_matches_transformers_on_the_dequantized_weights(tiny, quantized_dirs, name):
    _, reference = tiny
    dst = quantized_dirs(name)
    tolerance = QUANTIZED[name][1]
    expected_model = with_weights(reference, dequantized_state(dst))
    ids, mask = padded_batch(reference.config.vocab_size)
    with runtime.load(dst) as quantized:
        logits, _ = quantized.forward(ids, mask)
    expected = reference_logits(expected_model, ids, mask)
    assert (logits - expected)[mask.bool()].abs().max() < tolerance * expected.abs().max()


@pytest.mark.parametrize("name", [None, "int8", "nf4"])
def test_bf16_prefill_products_stay_close_and_leave_decoding_steps_as_they_were(tiny, quantized_dirs, name):
    directory = tiny[0].checkpoint.directory if name is None else quantized_dirs(name)
    ids = torch.randint(4, 1024, (2, memory.PREFILL_ROWS // 2 + 8), generator=torch.Generator().manual_seed(7))
    with runtime.load(directory) as exact, runtime.load(directory, prefill_dtype=torch.bfloat16) as mixed:
        assert mixed.transformer.prefill_dtype == torch.bfloat16
        expected, _ = exact.forward(ids)
        logits, past = mixed.forward(ids)  # 2 × 40 rows: a prefill
        assert logits.dtype == torch.float32
        difference = (logits - expected).abs().max()
        assert 0 < difference < 0.02 * expected.abs().max(), difference  # bf16 products, close to fp32's
        _, same_past = mixed.forward(ids)  # a second cache like the first (a step extends the one it is given)
        step = ids[:, :1]  # 2 rows: fp32 products, but 4-bit blocks of 32 in rows of 256 take int8 activations
        stepped, expected = mixed.forward(step, past=past)[0], exact.forward(step, past=same_past)[0]
        if name == "nf4" and mixed.transformer.int8_activations:
            assert 0 < (stepped - expected).abs().max() < 0.02 * expected.abs().max()
        else:
            assert torch.equal(stepped, expected)
    with pytest.raises(OptionsError, match="prefill_dtype"):
        runtime.load(directory, prefill_dtype=torch.float16)


def bf16_directory(bf16_pair, bits: int | None):
    """bf16_pair's directory, or its source quantized with `bits` (made once)."""
    if bits is None:
        return bf16_pair[0]
    directory = bf16_pair[0].parent / f"bits{bits}"
    if not directory.exists():
        quantize(bf16_pair[0].parent / "src", directory, bits=bits)
    return directory


@pytest.mark.skipif(not kernels.bf16_tiles(), reason="CPU or OS without AMX-BF16 tiles")
@pytest.mark.parametrize("bits", [None, 8, 4])
def test_a_batched_decoding_step_multiplies_on_amx_tiles_in_bf16(bf16_pair, bits):
    """Weights exact in bf16 (stored bf16, int8, 4-bit from bf16), one token per sequence, 4..64
    sequences: bf16 products (prefill_dtype) on AMX tiles, the lm_head's too, close to fp32's;
    fewer sequences, a prompt's rows, or prefill_dtype=torch.float32: fp32 products, as before."""
    directory = bf16_directory(bf16_pair, bits)
    tokens = torch.randint(4, 1024, (16, 5), generator=torch.Generator().manual_seed(8))
    with runtime.load(directory) as tiles, runtime.load(directory, prefill_dtype=torch.float32) as exact:
        assert tiles.transformer.products_on_tiles and "batched steps' too, on AMX tiles" in repr(tiles)
        assert not exact.transformer.products_on_tiles and "AMX" not in repr(exact)
        for batch in (kernels.BF16_TILE_ROWS - 1, kernels.BF16_TILE_ROWS, 16):  # one token per sequence
            logits, expected = tiles.forward(tokens[:batch, :1])[0], exact.forward(tokens[:batch, :1])[0]
            if batch < kernels.BF16_TILE_ROWS and not (bits == 4 and tiles.transformer.int8_activations):
                assert torch.equal(logits, expected)
            else:  # AMX tiles, or for 4-bit weights (rows of 256 in blocks of 32) int8 activations
                difference = (logits - expected).abs().max()
                assert 0 < difference < 0.02 * expected.abs().max(), difference
        assert torch.equal(tiles.forward(tokens[:4])[0], exact.forward(tokens[:4])[0])  # 4 prompts of 5 tokens


@pytest.fixture(scope="module")
def nf4_h128(tmp_path_factory):
    """A bf16 model whose every 4-bit matrix takes int8 activations (rows of 128 and 512), 4-bit preset."""
    root = tmp_path_factory.mktemp("h128")
    write_example_checkpoint(root / "src", GEOMETRIES["h128-l1-n16"], dtype=torch.bfloat16)
    quantize(root / "src", root / "nf4", bits=4)
    return root / "nf4"


@pytest.mark.skipif(not kernels.int8_dot_products(), reason="CPU without AVX512-VNNI")
def test_a_decoding_step_of_few_sequences_multiplies_4bit_weights_by_int8_activations(nf4_h128):
    """1-3 sequences, one token each, prefill_dtype bf16 (the default here): int8 activations, close
    to fp32 products; prompts, and prefill_dtype=torch.float32, keep fp32 products."""
    tokens = torch.randint(4, 768, (3, 5), generator=torch.Generator().manual_seed(8))
    with runtime.load(nf4_h128) as model, runtime.load(nf4_h128, prefill_dtype=torch.float32) as exact:
        assert model.transformer.int8_activations and "int8 activations" in repr(model)
        assert not exact.transformer.int8_activations and "int8" not in repr(exact).split("computes")[1]
        assert model.transformer.products_dtype(torch.zeros(3, 1, 128)) == torch.int8
        assert model.transformer.products_dtype(torch.zeros(3, 1, 128), head=True) == torch.float32
        assert model.transformer.products_dtype(torch.zeros(1, 5, 128)) == torch.float32  # a prompt
        for batch in (1, 3):
            logits, expected = model.forward(tokens[:batch, :1])[0], exact.forward(tokens[:batch, :1])[0]
            difference = (logits - expected).abs().max()
            assert 0 < difference < 0.02 * expected.abs().max(), difference
        assert torch.equal(model.forward(tokens[:1])[0], exact.forward(tokens[:1])[0])  # a prompt of 5 tokens
        with streaming_everything(nf4_h128) as streamed:  # pieces of rows: each row's sums as pinned
            step = tokens[:3, :1]
            assert torch.equal(streamed.forward(step)[0], model.forward(step)[0])


def test_without_int8_dot_products_a_decoding_step_keeps_fp32_products(nf4_h128, monkeypatch):
    from bloomconv.runtime import model as model_module
    monkeypatch.setattr(model_module.kernels, "int8_dot_products", lambda: False)
    tokens = torch.randint(4, 768, (1, 1), generator=torch.Generator().manual_seed(8))
    with runtime.load(nf4_h128) as model, runtime.load(nf4_h128, prefill_dtype=torch.float32) as exact:
        assert not model.transformer.int8_activations and "int8 activations" not in repr(model)
        assert torch.equal(model.forward(tokens)[0], exact.forward(tokens)[0])


@pytest.mark.parametrize("bits", [None, 4])
def test_without_amx_tiles_a_batched_decoding_step_keeps_fp32_products(bf16_pair, monkeypatch, bits):
    """A CPU (or OS) without the tiles: a step of 16 sequences multiplies as prefill_dtype=float32 does."""
    monkeypatch.setattr(kernels, "bf16_tiles", lambda: False)
    directory = bf16_directory(bf16_pair, bits)
    tokens = torch.randint(4, 1024, (16, 1), generator=torch.Generator().manual_seed(8))
    with runtime.load(directory) as model, runtime.load(directory, prefill_dtype=torch.float32) as exact:
        assert not model.transformer.products_on_tiles and "AMX" not in repr(model)
        assert torch.equal(model.forward(tokens)[0], exact.forward(tokens)[0])


@pytest.mark.parametrize("has_bf16_dot", [True, False])
def test_prefill_products_default_to_bf16_only_where_the_cpu_multiplies_bf16_and_weights_are_bf16(
        tiny, bf16_pair, monkeypatch, has_bf16_dot):
    from bloomconv.runtime import model as model_module
    monkeypatch.setattr(model_module.kernels, "bf16_dot_products", lambda: has_bf16_dot)
    bf16_prefill = torch.bfloat16 if has_bf16_dot else torch.float32
    with runtime.load(bf16_pair[0]) as stored_bf16, runtime.load(tiny[0].checkpoint.directory) as stored_fp32:
        assert stored_bf16.transformer.prefill_dtype == bf16_prefill
        assert ("prefill products bfloat16" in repr(stored_bf16)) == has_bf16_dot
        assert stored_fp32.transformer.prefill_dtype == torch.float32  # rounding fp32 weights would lose bits
    with runtime.load(bf16_pair[0], prefill_dtype=torch.float32) as asked:
        assert asked.transformer.prefill_dtype == torch.float32  # the caller's choice wins
    quantized = bf16_pair[0].parent / "int8"  # codes quantized from bf16 weights: exact in bf16 too
    if not quantized.exists():
        quantize(bf16_pair[0].parent / "src", quantized, bits=8)
    with runtime.load(quantized) as int8:
        assert int8.transformer.prefill_dtype == bf16_prefill
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert model_module.default_prefill_dtype(torch.bfloat16, cpu, "bfloat16") == torch.bfloat16  # the compute dtype
    assert model_module.default_prefill_dtype(torch.float32, cuda, "bfloat16") == torch.float32  # CPUs only


def dequantized_state(directory) -> dict[str, torch.Tensor]:
    """Every weight of a quantized directory as fp32, with transformers' names."""
    return {name: t.float() for name, t in load_dequantized(directory).items()}


def with_weights(reference, state):
    from transformers import BloomForCausalLM
    model = BloomForCausalLM(reference.config).eval()
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    assert torch.equal(model.lm_head.weight, state[PREFIX + EMBEDDING_WEIGHT])
    return model


def test_quantized_layout_is_read_as_written(quantized_dirs):
    with runtime.load(quantized_dirs("nf4")) as model:
        block = model.checkpoint.block(1)
        record = block.dense_h_to_4h.weight
        assert type(record).__name__ == "FourBitWeight" and record.shape == (256, 64)
        state = json.loads(bytes(record.stored["weight.quant_state.bitsandbytes__nf4"].tolist()))
        assert state["blocksize"] == QuantSettings(QuantType.NF4).block_size
        assert type(model.checkpoint.embeddings().word_embeddings).__name__ == "DenseWeight"


# ---------------------------------------------------------------------- RAM budget and read-ahead

def test_parse_size_reads_decimal_and_binary_units():
    assert runtime.parse_size("12GB") == 12 * 10**9
    assert runtime.parse_size("800MB") == 800 * 10**6
    assert runtime.parse_size("1.5GiB") == 3 * 2**29
    assert runtime.parse_size("64k") == 64000 and runtime.parse_size(" 2 mib ") == 2 * 2**20
    assert runtime.parse_size("4096") == runtime.parse_size(4096) == 4096
    for bad in ("12XB", "", "GB", "-1GB", -1, "1.2.3GB"):
        with pytest.raises(ValueError):
            runtime.parse_size(bad)


PAGE = mmap.PAGESIZE  # stream buffers hold whole pages (O_DIRECT reads)


def sizes_for(n_layer, block=100, embeddings=50, final=1):
    return {EMBEDDINGS_UNIT: embeddings * PAGE, FINAL_UNIT: final * PAGE,
            **{block_unit(i): block * PAGE for i in range(n_layer)}}


def pieces_for(sizes, piece=10):
    """Every matrix file in pieces of `piece` pages (final: none)."""
    return {unit: residency.UnitPieces(()) if unit == FINAL_UNIT else
            residency.UnitPieces((min(size, piece * PAGE),) * -(-size // (piece * PAGE))) for unit, size in sizes.items()}


def test_residency_pins_what_fits_and_spreads_the_streamed_blocks():
    sizes = sizes_for(10)
    pieces = pieces_for(sizes)
    plan = lambda budget, **kw: residency.plan_residency(sizes, 10, budget, pieces=pieces, **kw)  # noqa: E731
    everything = plan(sum(sizes.values()) + 7 * PAGE, reserve=7 * PAGE)
    assert everything.streamed == () and everything.resident_bytes == sum(sizes.values())
    nothing = plan(residency.minimum_budget(sizes, pieces, 7 * PAGE, 3), reserve=7 * PAGE)
    assert nothing.pinned == () and set(nothing.streamed) == set(sizes)
    assert nothing.streamed[-2:] == (FINAL_UNIT, EMBEDDINGS_UNIT)  # in use order: lm_head last
    assert nothing.stream_buffers == 3 and nothing.buffer_bytes == 10 * PAGE and nothing.streamed_pieces == 105
    # 3 buffers of 10 pages (30) + final + embeddings (51) + 4 blocks (400) + a reserve of 19
    plan_4 = plan(500 * PAGE, reserve=19 * PAGE)
    assert plan_4.planned_bytes <= 500 * PAGE and plan_4.buffer_bytes == 10 * PAGE
    assert set(plan_4.pinned) == {FINAL_UNIT, EMBEDDINGS_UNIT, *(block_unit(i) for i in (2, 4, 7, 9))}
    assert plan_4.streamed == tuple(block_unit(i) for i in (0, 1, 3, 5, 6, 8))
    assert plan_4.kv_cache_bytes == 0 and "6 files in 60 pieces" in plan_4.describe()
    # however large a file, it streams through buffers of one piece
    big = sizes_for(4, embeddings=100_000)
    big_plan = residency.plan_residency(big, 4, 1000 * PAGE, pieces=pieces_for(big))
    assert EMBEDDINGS_UNIT in big_plan.streamed and big_plan.stream_bytes == 30 * PAGE
    # what is left after whole files (1000 - 30 buffers - final - 4 blocks = 569 pages) pins pieces
    assert big_plan.pinned_piece_bytes == 56 * 10 * PAGE and len(big_plan.pinned_pieces) == 56
    assert big_plan.planned_bytes <= 1000 * PAGE and big_plan.streamed_pieces == 10_000 - 56
    gaps = {b - a for a, b in zip(big_plan.pinned_pieces, big_plan.pinned_pieces[1:])}
    assert max(gaps) - min(gaps) <= 1  # evenly spaced through the cycle


def test_residency_pins_pieces_of_streamed_files_with_what_is_left():
    sizes = sizes_for(10)
    pieces = pieces_for(sizes)  # 10 pieces of 10 pages per block, 5 per embeddings
    # room for final + embeddings + buffers (81) + 4 blocks (400) + 35 pages: 3 more pieces pinned
    plan = residency.plan_residency(sizes, 10, 516 * PAGE, pieces=pieces)
    assert len(plan.pinned) == 6 and len(plan.streamed) == 6
    assert plan.pinned_pieces == (0, 20, 40) and plan.pinned_piece_bytes == 30 * PAGE
    assert plan.streamed_pieces == 60 - 3 and plan.planned_bytes <= 516 * PAGE
    assert "3 more pieces of them pinned" in plan.describe()
    # unequal pieces: never more than the room, and at least one piece streams
    uneven = {unit: residency.UnitPieces(tuple((1 + i % 3) * PAGE for i in range(12))) for unit in sizes}
    uneven[FINAL_UNIT] = residency.UnitPieces(())
    for budget in range(200, 300, 7):
        plan = residency.plan_residency(sizes, 10, budget * PAGE, pieces=uneven)
        assert plan.planned_bytes <= budget * PAGE and plan.streamed_pieces >= 1


def test_default_budget_is_a_share_of_available_memory_less_the_runtime():
    assert memory.default_ram_budget(10**10) == int(0.9 * 10**10) - memory.RUNTIME_OVERHEAD_BYTES
    assert memory.default_ram_budget(10**8) < 0


def test_the_reserve_is_the_kv_cache_and_working_set_of_this_run():
    g = Geometry(hidden_size=14336, n_layer=70, n_head=112, vocab_size=250880)  # BLOOM-176B
    assert memory.kv_cache_bytes(g, torch.float32, 40) == 70 * 2 * 14336 * 40 * 4
    # not 4·hidden²·4 bytes (3.3 GB) for a dequantized matrix: the kernels dequantize none
    assert memory.working_set_bytes(g, torch.float32, 40) < 200e6


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """Six thin blocks: enough to have pinned and streamed blocks interleaved."""
    root = tmp_path_factory.mktemp("deep")
    write_example_checkpoint(root / "src", (32, 6, 4, 256), dtype=torch.float32)
    convert(root / "src", root / "dst")
    return root / "dst"


def budget_streaming(directory, n_streamed_blocks, monkeypatch):
    """A budget that streams `n_streamed_blocks` blocks, with each matrix in its smallest pieces."""
    monkeypatch.setattr(readahead, "STREAM_PIECE_BYTES", 1)
    with streaming_everything(directory) as model:
        plan = model.checkpoint.residency
    block = -(-(directory / "block_000.safetensors").stat().st_size // PAGE) * PAGE
    embeddings, final = (-(-(directory / f"{u}.safetensors").stat().st_size // PAGE) * PAGE
                         for u in (EMBEDDINGS_UNIT, FINAL_UNIT))
    return plan.budget + embeddings + final + (6 - n_streamed_blocks) * block


def test_streaming_gives_the_same_tokens_and_reads_in_use_order(deep, monkeypatch):
    ids, mask = padded_batch(256, lengths=(5, 3))
    with runtime.load(deep) as pinned:
        expected = pinned.generate_ids(ids, mask, max_new_tokens=4)
    budget = budget_streaming(deep, 3, monkeypatch)
    reads = []
    original = files.MappedFile._chunk_reads  # every read plans its calls here, pinned or streamed
    monkeypatch.setattr(files.MappedFile, "_chunk_reads", lambda self, memory, spans, streaming:
                        reads.append((self.path.stem, streaming)) or original(self, memory, spans, streaming))
    with runtime.load(deep, ram_budget=budget) as model:
        plan = model.checkpoint.residency
        assert plan.streamed == ("block_000", "block_002", "block_004")
        cycle = [(piece.unit, piece.module, piece.rows) for piece in model.checkpoint._stream.pieces]
        assert plan.streamed_pieces == len(cycle) == 3 * 6 and plan.stream_buffers == 3  # qkv and h_to_4h: 2 each
        assert torch.equal(model.generate_ids(ids, mask, max_new_tokens=4), expected)
    pinned_reads = [(unit, False) for unit in plan.pinned]
    assert reads[:len(pinned_reads)] == pinned_reads  # each pinned file read once, in load order
    streamed = [name for name, _ in reads[len(pinned_reads):]]
    assert all(streaming for _, streaming in reads[len(pinned_reads):])
    # every forward pass reads each streamed piece once, in use order, and the next pass's first ahead
    assert [module.split(".")[-1] for _, module, _ in cycle[:6]] == [
        "query_key_value", "query_key_value", "dense", "dense_h_to_4h", "dense_h_to_4h", "dense_4h_to_h"]
    assert streamed[:4 * 18] == [unit for unit, _, _ in cycle] * 4 and len(streamed) <= 4 * 18 + 3


def test_pieces_pinned_with_what_is_left_give_the_same_tokens_and_leave_the_cycle(deep, monkeypatch):
    ids, mask = padded_batch(256, lengths=(5, 3))
    with runtime.load(deep) as pinned:
        expected = pinned.generate_ids(ids, mask, max_new_tokens=4)
        expected_logits, _ = pinned.forward(ids, mask)
    budget = budget_streaming(deep, 3, monkeypatch)
    half_a_block = (deep / "block_000.safetensors").stat().st_size // 2
    reads = []
    original = files.MappedFile._chunk_reads  # every read plans its calls here, pinned or streamed
    monkeypatch.setattr(files.MappedFile, "_chunk_reads", lambda self, memory, spans, streaming:
                        reads.append((self.path.stem, streaming)) or original(self, memory, spans, streaming))
    with runtime.load(deep, ram_budget=budget + half_a_block) as model:
        plan = model.checkpoint.residency
        assert plan.streamed == ("block_000", "block_002", "block_004")
        assert len(plan.pinned_pieces) >= 2 and plan.streamed_pieces == 3 * 6 - len(plan.pinned_pieces)
        assert len(model.checkpoint.pieces) == plan.streamed_pieces
        model.checkpoint.wait_until_loaded()
        assert model.checkpoint.pinned_read_seconds > 0
        assert torch.equal(model.forward(ids, mask)[0], expected_logits)
        assert torch.equal(model.generate_ids(ids, mask, max_new_tokens=4), expected)
    at_start = len(plan.pinned) + len(plan.pinned_pieces)
    assert all(not streaming for _, streaming in reads[:at_start])  # files and pieces read once, at start-up
    assert all(streaming for _, streaming in reads[at_start:])
    # a forward, then a prefill and 3 steps: each streamed piece once a pass, plus the reads ahead
    assert 5 * plan.streamed_pieces <= len(reads) - at_start <= 5 * plan.streamed_pieces + plan.stream_buffers


def test_a_pass_that_stops_part_way_does_not_desynchronise_read_ahead(deep, monkeypatch):
    ids, mask = padded_batch(256, lengths=(5, 3))
    with runtime.load(deep, ram_budget=budget_streaming(deep, 4, monkeypatch)) as model:
        expected, _ = model.forward(ids, mask)
        original = model.transformer._block

        def fail_at_layer_3(x, w, layer, *args):
            if layer == 3:
                raise RuntimeError("interrupted")
            return original(x, w, layer, *args)
        monkeypatch.setattr(model.transformer, "_block", fail_at_layer_3)
        with pytest.raises(RuntimeError):
            model.forward(ids, mask)
        monkeypatch.setattr(model.transformer, "_block", original)
        assert torch.equal(model.forward(ids, mask)[0], expected)


def test_weight_memory_stays_within_the_budget(deep, monkeypatch):
    allocated = []
    original = files.AnonymousBuffer.__init__

    def counting(self, size, **options):
        allocated.append(size)
        original(self, size, **options)
    monkeypatch.setattr(files.AnonymousBuffer, "__init__", counting)
    budget = budget_streaming(deep, 3, monkeypatch)
    allocated.clear()
    with runtime.load(deep, ram_budget=budget) as model:
        model.generate_ids(*padded_batch(256, lengths=(4,)), max_new_tokens=3)
        plan = model.checkpoint.residency
        assert sum(allocated) == plan.resident_bytes and plan.planned_bytes <= budget


# ----------------------------------------------------------------------------- generate command

def test_threads_sets_torchs_thread_count(tiny, restores_threads):
    runtime.load(tiny[0].checkpoint.directory, threads=1).close()
    assert torch.get_num_threads() == 1


def test_generate_command_prints_the_continuation(tiny, restores_threads):
    model, _ = tiny
    directory = str(model.checkpoint.directory)
    result = CliRunner().invoke(main, ["generate", directory, "Return the", "--max-new-tokens", "12"])
    assert result.exit_code == 0, result.output
    assert result.stdout == "Return the" + model.generate("Return the", max_new_tokens=12) + "\n"
    sampled = ["--temperature", "1.2", "--top-k", "40", "--top-p", "0.9", "--seed", "5"]
    result = CliRunner().invoke(main, ["generate", directory, "a", "--max-new-tokens", "8", *sampled,
                                       "--ram-budget", "min", "--threads", "1", "--verify", "full"])
    assert result.exit_code == 0, result.output
    assert result.stdout == "a" + model.generate("a", 8, temperature=1.2, top_k=40, top_p=0.9, seed=5) + "\n"
    result = CliRunner().invoke(main, ["generate", directory, "The", "--max-new-tokens", "6", "--dtype", "bfloat16"])
    with runtime.load(directory, dtype=torch.bfloat16) as bf16:
        assert result.stdout == "The" + bf16.generate("The", max_new_tokens=6) + "\n"
    prompt = "Return the value of x " * 8  # over PREFILL_ROWS tokens
    result = CliRunner().invoke(main, ["generate", directory, prompt, "--max-new-tokens", "6",
                                       "--prefill-dtype", "bfloat16"])
    with runtime.load(directory, prefill_dtype=torch.bfloat16) as mixed:
        assert len(mixed.tokenizer.encode(prompt)) > memory.PREFILL_ROWS
        assert result.stdout == prompt + mixed.generate(prompt, max_new_tokens=6) + "\n"


def test_generate_stats_go_to_stderr(tiny):
    result = CliRunner().invoke(main, ["generate", str(tiny[0].checkpoint.directory), "x", "--max-new-tokens", "5",
                                       "--stats"])
    assert result.exit_code == 0, result.output
    assert "prefill" not in result.stdout
    for expected in (r"start-to-ready \d+\.\d\d s", r"prefill 1 tokens .* tokens/s", r"decode 4 tokens .* tokens/s",
                     r"peak RSS \d+\.\d\d GB, peak RssAnon \d+\.\d\d GB"):
        assert re.search(expected, result.stderr), result.stderr


def test_generate_command_errors(damaged_copy):
    result = CliRunner().invoke(main, ["generate", str(damaged_copy), "x", "--ram-budget", "lots"])
    assert result.exit_code == 2 and "--ram-budget" in result.stderr
    os.truncate(damaged_copy / BLOCK, 100)
    result = CliRunner().invoke(main, ["generate", str(damaged_copy), "x"])
    assert result.exit_code == 1 and f"{BLOCK}: truncated" in result.stderr


# ------------------------------------------------------------------------ accelerator paths (on CPU)

@pytest.mark.parametrize("streamed", [False, True], ids=["pinned", "streamed"])
def test_device_copy_pipeline_gives_the_same_logits(tiny, streamed):
    """The accelerator path's control flow (copy unit i+1 while unit i computes) run on the CPU,
    where the copies are no-ops: same logits."""
    model, _ = tiny
    ids, mask = padded_batch(model.geometry.vocab_size)
    directory = model.checkpoint.directory
    with streaming_everything(directory) if streamed else runtime.load(directory) as copied:
        copied.transformer.copies_to_device = True
        logits, past = copied.forward(ids, mask)
        step, _ = copied.forward(ids[:, -1:], torch.cat([mask, torch.ones_like(mask[:, :1])], 1), past)
    expected, expected_past = model.forward(ids, mask)
    assert torch.equal(logits, expected)
    assert torch.equal(step, model.forward(ids[:, -1:], torch.cat([mask, torch.ones_like(mask[:, :1])], 1),
                                           expected_past)[0])


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_four_bit_weight_through_bitsandbytes_matches_the_dequantized_weight(quant_type):
    """What a CUDA device runs (bitsandbytes.matmul_4bit), here on bitsandbytes' CPU backend."""
    from bloomconv.storage import storage_for
    from bloomconv.storage.fourbit import dequantize_4bit, quantize_4bit
    g = torch.Generator().manual_seed(7)
    weight = (torch.randn(96, 320, generator=g) * 0.02).to(torch.bfloat16)
    stored = quantize_4bit(weight, quant_type, 64, True)
    record = storage_for(quant_type).decode_mapping(stored)
    reference = dequantize_4bit(stored, torch.float32)  # as Linear4bit: straight to the compute dtype
    for x in (torch.randn(1, 1, 320, generator=g), torch.randn(2, 5, 320, generator=g)):
        out = record.bitsandbytes_matmul(x)
        assert out.shape == (*x.shape[:-1], 96)
        assert (out - F.linear(x, reference)).abs().max() < 1e-5


def test_an_error_mid_pass_releases_the_streamed_buffer(tiny, monkeypatch):
    model, _ = tiny
    ids, mask = padded_batch(model.geometry.vocab_size)
    with streaming_everything(model.checkpoint.directory) as streamed:
        expected, _ = streamed.forward(ids, mask)
        real_block = streamed.transformer._block

        def fails_in_layer_1(x, w, layer, bias, past):
            if layer == 1:
                raise KeyboardInterrupt
            return real_block(x, w, layer, bias, past)

        monkeypatch.setattr(streamed.transformer, "_block", fails_in_layer_1)
        with pytest.raises(KeyboardInterrupt):
            streamed.forward(ids, mask)
        monkeypatch.setattr(streamed.transformer, "_block", real_block)
        assert torch.equal(streamed.forward(ids, mask)[0], expected)


def test_faulting_a_buffer_in_keeps_what_reads_already_wrote(monkeypatch):
    monkeypatch.setattr(files, "FAULT_IN_STEP", 3 * PAGE)  # many steps, so reads and faulting interleave
    buffer, other = files.AnonymousBuffer(64 * PAGE + 5), files.AnonymousBuffer(7 * PAGE)
    buffer.tensor[10 * PAGE:20 * PAGE] = 7  # a read that landed before the thread got there
    faulting = files.FaultingIn([buffer, other])
    assert faulting.started == sys.platform.startswith("linux")  # elsewhere the reads fault pages in
    buffer.tensor[40 * PAGE:41 * PAGE] = 9  # and one racing it
    other.tensor[-1] = 3
    faulting.join()
    assert (buffer.tensor[10 * PAGE:20 * PAGE] == 7).all() and (buffer.tensor[40 * PAGE:41 * PAGE] == 9).all()
    assert int(buffer.tensor[:10 * PAGE].sum()) == 0 and int(buffer.tensor[41 * PAGE:].sum()) == 0
    assert int(other.tensor.sum()) == 3
    stopped = files.FaultingIn([files.AnonymousBuffer(64 * PAGE)])
    stopped.stop()
    assert not stopped.running


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="O_DIRECT is Linux's")
@pytest.mark.parametrize("error", [None, errno.EINVAL, errno.EIO], ids=["taken", "refused", "io-error"])
def test_reads_around_the_page_cache_are_tried_once_per_filesystem(deep, monkeypatch, error):
    monkeypatch.setattr(files, "_DIRECT_READS_WORK", {})
    paths = [deep / f"{unit}.safetensors" for unit in ("block_000", "block_001", "block_002")]
    buffers = [files.AnonymousBuffer(files.whole_pages(path.stat().st_size)) for path in paths]
    ours = {buffer.memoryview().obj for buffer in buffers}
    probes, real_read_at = [], files._read_at

    def read_at(fd, view, offset):
        if view.obj not in ours:  # the try: one page at offset 0, into memory of its own
            probes.append((len(view), offset))
            if error is not None:
                raise OSError(error, os.strerror(error))
        return real_read_at(fd, view, offset)
    monkeypatch.setattr(files, "_read_at", read_at)
    opened = [files.MappedFile(path, {}) for path in paths]
    try:
        list(files.read_one_after_another([(f, b.memoryview(), f.whole) for f, b in zip(opened, buffers)],
                                          threading.Event()))
        around = {file.reads_around_the_page_cache for file in opened}
        for path, file, buffer in zip(paths, opened, buffers):
            assert bytes(buffer.memoryview()[:file.size]) == path.read_bytes()
    finally:
        for file in opened:
            file.close()
    if not probes:  # O_DIRECT refused at open here (tmpfs before Linux 6.6): buffered, nothing tried
        assert around == {False}
    elif error == errno.EIO:  # says nothing of the filesystem: each file tries, and reads buffered
        assert probes == [(PAGE, 0)] * 3 and around == {False} and not files._DIRECT_READS_WORK
    else:  # the filesystem's answer, tried once
        assert probes == [(PAGE, 0)] and around == {error is None}


def test_reads_queue_one_behind_the_other_and_stop_when_asked(deep, monkeypatch):
    monkeypatch.setattr(files, "READ_CHUNK_BYTES", PAGE)  # several calls per read
    paths = [deep / f"{unit}.safetensors" for unit in ("block_000", "block_001", "block_002")]
    opened = [files.MappedFile(path, {}) for path in paths]
    buffers = [files.AnonymousBuffer(file.padded_size) for file in opened]
    first_call_waits, second_read_started = threading.Event(), threading.Event()
    real_read_at = files._read_at

    def read_at(fd, view, offset):  # the first read's first call waits until the second read has begun
        if view.obj is buffers[0].memoryview().obj and offset == 0:
            assert second_read_started.wait(10)
        if view.obj is buffers[1].memoryview().obj:
            second_read_started.set()
        return real_read_at(fd, view, offset)
    monkeypatch.setattr(files, "_read_at", read_at)
    reads = [(file, buffer.memoryview(), file.whole) for file, buffer in zip(opened, buffers)]
    try:
        assert list(files.read_one_after_another(reads, threading.Event())) == [0, 1, 2]
        uncached = all(file.reads_around_the_page_cache for file in opened)
        assert second_read_started.is_set() or not uncached  # buffered reads run in order, one at a time
        for path, file, buffer in zip(paths, opened, buffers):
            assert bytes(buffer.memoryview()[:file.size]) == path.read_bytes()
        # stopped while the second read's calls are held: the third's never run
        stop, release = threading.Event(), threading.Event()

        def holds_the_second(fd, view, offset):
            if view.obj is buffers[1].memoryview().obj:
                assert release.wait(10)
            return real_read_at(fd, view, offset)
        monkeypatch.setattr(files, "_read_at", holds_the_second)
        for buffer in buffers:
            buffer.tensor.zero_()
        reading = files.read_one_after_another(reads, stop)
        assert next(reading) == 0
        stop.set()
        threading.Timer(0.2, release.set).start()  # after the generator has dropped what is queued
        assert list(reading) == []  # it waits for the held calls in flight, then ends
        assert int(buffers[2].tensor.sum()) == 0 and int(buffers[0].tensor.sum()) > 0
    finally:
        for file in opened:
            file.close()


def test_the_start_up_read_time_is_known_once_the_last_pinned_read_is_in(deep, monkeypatch):
    from bloomconv.runtime import checkpoint
    real = checkpoint.read_one_after_another

    def lingering(reads, stop):  # the reader thread goes on a while after the last future is set
        yield from real(reads, stop)
        time.sleep(1)
    monkeypatch.setattr(checkpoint, "read_one_after_another", lingering)
    with runtime.load(deep) as model:
        model.checkpoint.wait_until_loaded()
        assert 0 < model.checkpoint.pinned_read_seconds < 1
