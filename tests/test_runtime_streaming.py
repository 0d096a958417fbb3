"""The runtime streaming in pieces: the same logits however a file is held, memory bounded by the
piece buffers whatever the file size, and a budget too small for a run refused before anything is
read."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import bloomconv
from bloomconv.cli import main
from bloomconv.converters.convert import convert, quantize
from bloomconv.converters.example import write_example_checkpoint
from bloomconv.errors import MemoryBudgetError
from bloomconv.format import QuantType
from bloomconv.runtime import checkpoint, files, readahead
from bloomconv.storage import storage_for
from bloomconv.storage.base import ROW_MULTIPLE
from bloomconv.storage.fourbit import quantize_4bit

GEOMETRY = (128, 2, 4, 2048)  # hidden 128: a double-quantized 4-bit matrix spans several nested blocks
DIRECTORIES = {
    "bf16": dict(),
    "int8 with int8 embeddings": dict(bits=8, embeddings=True),
    "nf4 double quant": dict(bits=4, quant_type="nf4", block_size=128, double_quant=True),
    "nf4": dict(bits=4, quant_type="nf4", block_size=64, double_quant=False),
}


@pytest.fixture(scope="module")
def directories(tmp_path_factory):
    root = tmp_path_factory.mktemp("streaming")
    write_example_checkpoint(root / "src", GEOMETRY, dtype=torch.bfloat16)
    built = {}
    for name, options in DIRECTORIES.items():
        built[name] = root / name.replace(" ", "-")
        if options:
            quantize(root / "src", built[name], **options)
        else:
            convert(root / "src", built[name])
    return built


def loaded(directory, how, monkeypatch, **kwargs):
    """`how`: "pinned" (the default budget), "whole" (every file streamed, each matrix one piece)
    or "pieces" (every file streamed, each matrix in its smallest pieces)."""
    with monkeypatch.context() as patch:
        if how == "whole":
            patch.setattr(readahead, "STREAM_BUFFERS", 1)  # one matrix of buffer costs less than the model
        if how == "pieces":
            patch.setattr(readahead, "STREAM_PIECE_BYTES", 1)
        return bloomconv.load(directory, ram_budget=None if how == "pinned" else "min", **kwargs)


def run(model):
    g = torch.Generator().manual_seed(0)
    vocab = model.geometry.vocab_size
    decode = torch.randint(4, vocab, (3, 9), generator=g)    # 27 rows: the kernels' small-batch path
    prefill = torch.randint(4, vocab, (2, 50), generator=g)  # 100 rows: tiles and torch's GEMM
    return model(decode), model(prefill), model.generate_ids(decode, max_new_tokens=3)


# compute dtype, prefill dtype: fp32 throughout goes through the compiled kernels only; a bf16
# prefill (PREFILL_ROWS+ rows) goes to torch's GEMM, as do 4-bit tiles in either
COMPUTE = {"fp32": (torch.float32, torch.float32), "bf16": (torch.bfloat16, torch.bfloat16)}


def through_the_kernels_only(name: str, compute: str) -> bool:
    return compute == "fp32" and not name.startswith("nf4")


@pytest.mark.parametrize("compute", list(COMPUTE))
@pytest.mark.parametrize("name", list(DIRECTORIES))
def test_logits_are_the_same_pinned_streamed_whole_and_in_the_smallest_pieces(directories, monkeypatch, name, compute):
    """Bit for bit wherever the kernels multiply (decoding steps; an fp32 prefill of int8 and
    16-bit weights). torch's GEMM may round a piece's rows differently from the whole matrix's (its
    blocking depends on the shape): there, to within rounding, and the same greedy tokens."""
    dtype, prefill_dtype = COMPUTE[compute]
    results = {}
    for how in ("pinned", "whole", "pieces"):
        with loaded(directories[name], how, monkeypatch, dtype=dtype, prefill_dtype=prefill_dtype) as model:
            plan = model.checkpoint.residency
            pieces = model.checkpoint.pieces
            matrices = {(piece.unit, piece.module) for piece in pieces}
            if how == "pinned":
                assert plan.streamed == ()
            else:
                assert plan.pinned == () and len(plan.streamed) == GEOMETRY[1] + 2
                # whole: one piece per matrix; pieces: some matrices (the embeddings at least) in several
                assert (len(pieces) == len(matrices)) == (how == "whole") and len(matrices) >= 4 * GEOMETRY[1]
            results[how] = run(model)
    for how in ("whole", "pieces"):
        assert_same_results(results[how], results["pinned"], through_the_kernels_only(name, compute))


def assert_same_results(ours, expected, exact_prefill: bool):
    """`run`'s results: decoding logits and greedy tokens bit for bit, prefill logits too where
    `exact_prefill`, else to within 1 % of the largest logit."""
    (decode, prefill, ids), (expected_decode, expected_prefill, expected_ids) = ours, expected
    assert torch.equal(decode, expected_decode) and torch.equal(ids, expected_ids)
    if exact_prefill:
        assert torch.equal(prefill, expected_prefill)
    else:
        assert (prefill - expected_prefill).abs().max() <= 1e-2 * expected_prefill.abs().max()


def test_a_misaligned_stored_tensor_is_read_in_pieces_and_copied_into_place(tmp_path, monkeypatch):
    """Without double quant, a 4-bit matrix's fp32 absmax can follow an odd-sized state blob: it is
    read with its rows and copied to an aligned place, never copied whole into RAM."""
    write_example_checkpoint(tmp_path / "src", (256, 2, 4, 1024), dtype=torch.bfloat16)
    quantize(tmp_path / "src", tmp_path / "nf4", bits=4, block_size=64, double_quant=False)
    with bloomconv.load(tmp_path / "nf4") as model:
        expected = run(model)
    with loaded(tmp_path / "nf4", "pieces", monkeypatch) as model:
        assert any(piece.copies for piece in model.checkpoint.pieces)
        assert_same_results(run(model), expected, exact_prefill=False)  # 4-bit tiles: torch's GEMM


@pytest.mark.parametrize("quant", ["none-fp32", "none-bf16", "int8", "nf4", "nf4-dq", "fp4-dq"])
def test_row_slices_multiply_bit_for_bit_as_the_whole_matrix(quant):
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(704, 256, generator=g) * 0.02
    if quant.startswith("none"):
        stored = {"weight": weight.to(torch.bfloat16 if quant.endswith("bf16") else torch.float32)}
        record = storage_for("none").decode_mapping(stored)
    elif quant == "int8":
        record = storage_for("int8").decode_mapping(storage_for("int8").encode(weight.bfloat16(), None))
    else:
        kind = QuantType(quant.split("-")[0])
        stored = quantize_4bit(weight.bfloat16(), kind, 64 if quant == "nf4" else 128, quant.endswith("dq"))
        record = storage_for(kind).decode_mapping(stored)
    step = record.row_multiple
    assert step % ROW_MULTIPLE == 0 and step < weight.shape[0]
    for rows in (1, 27, 100):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(rows, 256, generator=g).to(dtype)
            parts = [record.row_slice(start, start + step).matmul(x) for start in range(0, weight.shape[0], step)]
            assert torch.equal(torch.cat(parts, dim=-1), record.matmul(x)), (rows, dtype)
    assert torch.equal(record.row_slice(step, 2 * step).rows(torch.tensor([3, 0]), torch.float32),
                       record.rows(torch.tensor([step + 3, step]), torch.float32))


def test_a_budget_below_the_minimum_is_refused_before_anything_is_read(directories, monkeypatch):
    directory = directories["int8 with int8 embeddings"]
    reads = []
    monkeypatch.setattr(files.MappedFile, "_chunk_reads", lambda *args, **kwargs: reads.append(args))
    with pytest.raises(MemoryBudgetError, match=r"the RAM budget of 0\.0 MB is below the [\d.]+ MB this run needs "
                       r"at least \(weights .* MB, KV cache .* MB and working set .* MB for 256 tokens\)\. "
                       r"Give at least \d+MB") as raised:
        bloomconv.load(directory, ram_budget="1KB")
    assert raised.value.allowed == 1000 and raised.value.needed > 1000
    monkeypatch.setattr(checkpoint, "available_memory", lambda: 100 << 20)  # a machine with 100 MB free
    with pytest.raises(MemoryBudgetError, match="this machine leaves 0 MB for the run .* Free memory"):
        bloomconv.load(directory)
    assert reads == []
    monkeypatch.undo()
    with bloomconv.load(directory, ram_budget=raised.value.needed) as model:  # the minimum runs
        assert model.checkpoint.residency.planned_bytes <= raised.value.needed
        model.generate_ids(torch.tensor([[5, 6]]), max_new_tokens=2)


def test_the_command_names_the_minimum_in_one_line_and_prints_the_plan(directories):
    directory = str(directories["nf4"])
    result = CliRunner().invoke(main, ["generate", directory, "x", "--ram-budget", "10kB"])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert "is below the" in result.stderr and "Give at least" in result.stderr
    result = CliRunner().invoke(main, ["generate", directory, "x", "--ram-budget", "min", "--max-new-tokens", "3",
                                       "--stats"])
    assert result.exit_code == 0, result.output
    # the plan is for this run: a 1-byte prompt and 3 new tokens
    for expected in ("budget", "(the minimum)", "pinned 4 files", "KV cache", "for 4 tokens"):
        assert expected in result.stderr, result.stderr


def test_a_longer_run_than_planned_is_refused_when_memory_cannot_hold_it(directories, monkeypatch):
    with bloomconv.load(directories["bf16"], max_tokens=4) as model:
        model.generate_ids(torch.tensor([[5, 6]]), max_new_tokens=2)  # as planned
        model.generate_ids(torch.tensor([[5, 6]]), max_new_tokens=20)  # more, and memory is there
        monkeypatch.setattr(checkpoint, "available_memory", lambda: 0)
        with pytest.raises(MemoryBudgetError, match="44 tokens .* than the 4 tokens planned for"):
            model.generate_ids(torch.tensor([[5, 6]] * 2), max_new_tokens=20)


# One file (the embeddings, 64 MB) far larger than the pieces (1 MiB): the anonymous memory the run
# adds stays within its piece buffers and working set, not the file's size.
BOUNDED = textwrap.dedent("""
    import sys, torch
    import bloomconv
    from bloomconv.process_stats import PeakRssAnon, anonymous_rss
    from bloomconv.runtime import readahead
    readahead.STREAM_PIECE_BYTES = 1 << 20
    torch.randn(64, 64) @ torch.randn(64, 64)  # torch's own first allocations
    before = anonymous_rss()
    watch = PeakRssAnon(interval=0.001)
    with bloomconv.load(sys.argv[1], ram_budget="min", max_tokens=16) as model:
        plan = model.checkpoint.residency
        model.generate_ids(torch.tensor([[5, 6, 7, 8]]), max_new_tokens=8)
        growth = watch.stop() - before
    print(plan.streamed_pieces, plan.stream_bytes, plan.planned_bytes, growth)
""")


def test_memory_is_bounded_by_the_piece_buffers_not_the_file_size(tmp_path):
    write_example_checkpoint(tmp_path / "src", (256, 2, 4, 131072), dtype=torch.bfloat16)
    convert(tmp_path / "src", tmp_path / "dst")
    embeddings = (tmp_path / "dst" / "embeddings.safetensors").stat().st_size
    assert embeddings > 64e6
    out = subprocess.run([sys.executable, "-c", BOUNDED, str(tmp_path / "dst")], check=True, capture_output=True,
                         text=True, cwd=Path(__file__).parent.parent).stdout
    pieces, stream_bytes, planned, growth = map(int, out.split())
    assert pieces > 64 and stream_bytes < 4e6  # 3 buffers of about 1 MiB
    assert growth < stream_bytes + 8e6 < embeddings / 4, (growth, stream_bytes)  # streamed whole: 2 × 64 MB
    assert growth < planned
