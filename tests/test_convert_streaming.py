"""Conversion in bounded memory, reading the source once: the streamed encoders
(`Storage.encode_stream`), the streaming writer, and the reading thread (converters/reading.py).

Everything runs at small geometry with tiny piece, chunk and read-ahead sizes forced, so the same
code paths run as on BLOOM-176B's 7 GB embeddings shard (bench/ measures that): the bytes written
must not depend on those sizes, and every source byte must be hashed from the converter's pages.
"""
from __future__ import annotations

import ctypes
import hashlib
import io
import mmap
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bloomconv.converters import reading as reading_module
from bloomconv.converters.convert import convert
from bloomconv.converters.example import write_example_checkpoint
from bloomconv.format import QuantType
from bloomconv.hashing import sha256_file
from bloomconv.manifest import read_manifest
from bloomconv.safetensors_io import StreamedTensor, write_safetensors
from bloomconv.settings import QuantSettings
from bloomconv.storage import base as storage_base
from bloomconv.storage import fourbit as fourbit_storage
from bloomconv.storage import int8 as int8_storage
from bloomconv.storage import storage_for

from .conftest import SMALL

SETTINGS = [None, QuantSettings(QuantType.INT8), QuantSettings(QuantType.INT8, int8_scale_from="source"),
            QuantSettings(QuantType.NF4), QuantSettings(QuantType.NF4, 64, double_quant=False),
            QuantSettings(QuantType.FP4, 32, embeddings=True)]
SETTING_IDS = ["dense", "int8", "int8-source", "nf4", "nf4-64-no-dq", "fp4-32-emb"]


class Recorder:
    """A ReadReport that keeps what it heard."""

    def __init__(self):
        self.read, self.finished = [], []

    def reading(self, start, end):
        self.read.append((start, end))

    def done(self, start, end):
        self.finished.append((start, end))


def written_bytes(tensors) -> bytes:
    buffer = io.BytesIO()
    write_safetensors(buffer, list(tensors.items()), {"format": "pt"})
    return buffer.getvalue()


@pytest.mark.parametrize("settings_", SETTINGS[1:], ids=SETTING_IDS[1:])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("piece", [1, 37, 4096, 1 << 24])
def test_encode_stream_writes_the_bytes_of_encode(settings_, dtype, piece, monkeypatch):
    """Whatever the piece size (1 element: one row or one block at a time), the file is the one
    `encode`'s tensors make, and every element is reported read, then done, once, in order."""
    for module in (int8_storage, fourbit_storage):
        monkeypatch.setattr(module, "STREAM_PIECE_ELEMENTS", piece)
    weight = (torch.randn(67, 99, generator=torch.Generator().manual_seed(piece)) * 0.02).to(dtype)
    weight[3] = 0
    storage = storage_for(settings_.quant_type)
    recorder = Recorder()
    streamed = storage.encode_stream(weight, settings_, report=recorder)
    assert written_bytes(streamed) == written_bytes(storage.encode(weight, settings_))
    assert recorder.finished[0][0] == 0 and recorder.finished[-1][1] == weight.numel()
    assert all(a[1] == b[0] for a, b in zip(recorder.finished, recorder.finished[1:]))  # contiguous, in order
    passes = 2 if settings_.quant_type.is_4bit and settings_.double_quant else 1  # absmax first
    assert len(recorder.read) == passes * len(recorder.finished)


def test_dense_tensors_stream_from_their_storage_in_pieces(monkeypatch):
    tensor = torch.arange(1000, dtype=torch.float32).view(10, 100)
    recorder = Recorder()
    stream = storage_base.stream_as_stored(tensor, recorder, piece_elements=300)
    pieces = []
    for piece in stream.pieces():
        assert len(recorder.finished) == len(pieces)  # a piece is done once the writer asks for the next
        pieces.append(bytes(piece))
    assert b"".join(pieces) == tensor.numpy().tobytes() and len(pieces) == 4
    assert recorder.finished == [(0, 300), (300, 600), (600, 900), (900, 1000)]


def test_companions_cannot_be_written_before_the_weight():
    weight = torch.randn(8, 64)
    for settings_ in (QuantSettings(QuantType.INT8), QuantSettings(QuantType.NF4)):
        streamed = storage_for(settings_.quant_type).encode_stream(weight, settings_)
        names = list(streamed)
        with pytest.raises(RuntimeError, match="before"):
            written_bytes({names[1]: streamed[names[1]]})


def test_non_finite_weights_are_refused_while_streaming():
    weight = torch.ones(8, 64)
    weight[5, 3] = float("nan")
    for settings_ in (QuantSettings(QuantType.INT8), QuantSettings(QuantType.NF4),
                      QuantSettings(QuantType.NF4, double_quant=False)):
        with pytest.raises(Exception, match="NaN or infinite"):
            written_bytes(storage_for(settings_.quant_type).encode_stream(weight, settings_))


def test_writer_gathers_small_pieces_and_checks_the_byte_count():
    tensor = torch.arange(10, dtype=torch.int8)
    stream = StreamedTensor(torch.int8, (10,), lambda: (memoryview(tensor.numpy())[i:i + 3] for i in range(0, 10, 3)))
    assert written_bytes({"a": stream}) == written_bytes({"a": tensor})
    short = StreamedTensor(torch.int8, (11,), lambda: iter([memoryview(tensor.numpy())]))
    with pytest.raises(ValueError, match="10 bytes streamed"):
        written_bytes({"a": short})


# ------------------------------------------------------------------------------- reading once

@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    return {layout: write_example_checkpoint(root / layout, SMALL, layout)
            for layout in ("release-pickle-shards", "safetensors-shards", "safetensors-single")}


@pytest.mark.parametrize("layout", ["release-pickle-shards", "safetensors-shards", "safetensors-single"])
def test_shards_map_to_views_of_the_file_and_hash_as_sha256(checkpoints, layout):
    from bloomconv.converters.source import open_source
    source = open_source(checkpoints[layout])
    with reading_module.SourceReading(source.root, {}) as reading:
        for file in source.weight_files:
            shard = reading.open(file)
            assert shard._spans, "every tensor's file offset is known"
            for meta in source.tensors.values():
                if meta.file == file:
                    tensor = shard.tensor(meta.stored_name)
                    begin, end = shard._spans[meta.stored_name]
                    raw = torch.frombuffer(bytearray((source.root / file).read_bytes()[begin:end]), dtype=tensor.dtype)
                    assert torch.equal(tensor.reshape(-1), raw)
            reading.release(file)
        hashes = reading.finish(list(source.weight_files))
    assert hashes == {file: sha256_file(source.root / file) for file in source.weight_files}


def test_a_shard_whose_layout_cannot_be_told_is_hashed_after_release(tmp_path):
    """A tensor stored as a non-contiguous view: the shard's tensors come from torch.load as they
    are, and its hash waits for the converter to finish with it."""
    state = {"a": torch.randn(8, 16).t(), "b": torch.randn(5)}
    torch.save(state, tmp_path / "pytorch_model.bin")
    with reading_module.SourceReading(tmp_path, {}) as reading:
        shard = reading.open("pytorch_model.bin")
        assert not shard._spans and torch.equal(shard.tensor("a"), state["a"])
        reading.release("pytorch_model.bin")
        assert reading.finish(["pytorch_model.bin"]) == {"pytorch_model.bin": sha256_file(tmp_path / "pytorch_model.bin")}


@pytest.mark.parametrize("settings_", SETTINGS, ids=SETTING_IDS)
@pytest.mark.parametrize("layout", ["release-pickle-shards", "safetensors-shards"])
def test_output_does_not_depend_on_piece_chunk_or_read_ahead_sizes(checkpoints, settings_, layout, tmp_path,
                                                                   monkeypatch):
    convert(checkpoints[layout], tmp_path / "default", quantization=settings_)
    for module in (storage_base, int8_storage, fourbit_storage):
        monkeypatch.setattr(module, "STREAM_PIECE_ELEMENTS", 100)
    monkeypatch.setattr("bloomconv.safetensors_io.WRITE_CHUNK_BYTES", 1000)
    monkeypatch.setattr(reading_module, "READ_AHEAD_BYTES", 3 * mmap.PAGESIZE)
    monkeypatch.setattr(reading_module, "HASH_CHUNK_BYTES", 1000)
    convert(checkpoints[layout], tmp_path / "tiny", quantization=settings_)
    default, tiny = read_manifest(tmp_path / "default"), read_manifest(tmp_path / "tiny")
    assert default.files == tiny.files and default.source_files == tiny.source_files
    assert {f.name: f.sha256 for f in tiny.source_files} == {
        f.name: sha256_file(checkpoints[layout] / f.name) for f in tiny.source_files}
    for name in (f.name for f in tiny.files if f.name.endswith(".safetensors")):
        assert load_file(tmp_path / "tiny" / name).keys() == load_file(tmp_path / "default" / name).keys()


def _cached_pages(path: Path) -> int:
    """How many of a file's pages are in the page cache (mmap + mincore, through libc)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    size = path.stat().st_size
    pages = -(-size // mmap.PAGESIZE)
    vector = (ctypes.c_ubyte * pages)()
    with open(path, "rb") as f:
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, f.fileno(), 0)
        try:
            if libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(size), vector) != 0:
                pytest.skip("mincore failed")
        finally:
            libc.munmap(ctypes.c_void_p(address), ctypes.c_size_t(size))
    return sum(v & 1 for v in vector)


@pytest.mark.skipif(not Path("/proc/self/io").exists() or not hasattr(os, "posix_fadvise"),
                    reason="needs Linux's /proc/self/io and posix_fadvise")
@pytest.mark.parametrize("settings_", [None, QuantSettings(QuantType.INT8), QuantSettings(QuantType.NF4)],
                         ids=["convert", "int8", "nf4"])
def test_the_source_is_read_once_and_left_out_of_the_page_cache(tmp_path, settings_, monkeypatch):
    """Source pages evicted first (posix_fadvise, this file only): the conversion reads each byte
    from the disk once, and leaves none of the big shards' pages cached behind it."""
    src = write_example_checkpoint(tmp_path / "src", (256, 2, 8, 8192), "release-pickle-shards")
    monkeypatch.setattr(reading_module, "READ_AHEAD_BYTES", 1 << 20)
    shards = sorted(src.glob("*.bin"))
    for path in shards:
        os.sync()
        with open(path, "rb") as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    if any(_cached_pages(path) for path in shards):
        pytest.skip("this filesystem keeps the pages (tmpfs?)")

    def read_bytes():
        return int(dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())["read_bytes"])
    before = read_bytes()
    convert(src, tmp_path / "dst", quantization=settings_)
    read = read_bytes() - before
    total = sum(path.stat().st_size for path in shards)
    if read == 0:
        pytest.skip("this filesystem does not count reads (tmpfs?)")
    assert read <= total * 1.05 + (4 << 20)
    for path in shards:
        if path.stat().st_size > 1 << 20:
            assert _cached_pages(path) * mmap.PAGESIZE < 64 * 1024, path.name
    assert hashlib.sha256(shards[0].read_bytes()).hexdigest() == next(
        f.sha256 for f in read_manifest(tmp_path / "dst").source_files if f.name == shards[0].name)
