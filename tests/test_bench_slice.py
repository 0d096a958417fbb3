"""bench/slice176b.py, the true-geometry slice generator, at a small geometry with tiny pieces: the
release's layout, the bytes torch.save writes, caching, removal, the free-disk check. (The real
slice, 17 GB for two blocks, is written by bench/bench_176b.py only.)"""
from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
import slice176b  # noqa: E402

from bloomconv.converters.convert import convert  # noqa: E402
from bloomconv.format import PICKLE_INDEX_NAME, PREFIX  # noqa: E402
from bloomconv.manifest import read_manifest  # noqa: E402

GEOMETRY = slice176b.SliceGeometry(hidden_size=64, n_head=4, vocab_size=1000, n_layer_released=70)
PATTERN = 997   # shorter than most tensors: repetitions and sign flips are exercised
PIECE = 100     # elements per write: every tensor takes several pieces, not aligned to the pattern


def quiet(_message):
    pass


@pytest.fixture(scope="module")
def small_slice(tmp_path_factory):
    return slice176b.write_slice(tmp_path_factory.mktemp("slice") / "bloom", 2, geometry=GEOMETRY,
                                 piece_elements=PIECE, pattern_elements=PATTERN, log=quiet)


def expected_shards(n_blocks):
    """The slice's values materialised whole (other piece size): what torch.save should hold."""
    values = slice176b._Values(0, 4096, PATTERN)
    shards = []
    for tensors in slice176b.shard_tensors(GEOMETRY, n_blocks):
        shards.append({name: torch.cat([p.clone() for p in values.pieces(name, slice176b._numel(shape))]).view(shape)
                       for name, shape in tensors})
    return shards


def test_release_layout(small_slice):
    config = json.loads((small_slice / "config.json").read_text())
    assert (config["n_embed"], config["num_attention_heads"], config["n_layer"], config["vocab_size"]) == (64, 4, 2, 1000)
    assert config["model_type"] == "bloom" and config["pretraining_tp"] == 4 and config["layer_norm_epsilon"] == 1e-5
    index = json.loads((small_slice / PICKLE_INDEX_NAME).read_text())
    names = [f"pytorch_model_{i:05d}-of-00004.bin" for i in range(1, 5)]
    assert sorted(set(index["weight_map"].values())) == names
    assert index["weight_map"]["word_embeddings.weight"] == names[0]
    assert index["weight_map"]["h.1.mlp.dense_4h_to_h.weight"] == names[2]
    assert index["weight_map"]["ln_f.bias"] == names[3]
    assert not any(k.startswith(PREFIX) or k.startswith("lm_head") for k in index["weight_map"])
    assert index["metadata"]["total_size"] == slice176b.needed_bytes(GEOMETRY, 2)


def test_shards_are_torch_save_bytes(small_slice, tmp_path):
    """Record for record what torch.save writes with the values in memory (CRCs included: zipfile
    checks them on read); only the serialization id, which hashes the CRCs torch computed, differs."""
    for number, expected in enumerate(expected_shards(2), start=1):
        name = f"pytorch_model_{number:05d}-of-00004.bin"
        torch.save(expected, tmp_path / name)
        ours, reference = zipfile.ZipFile(small_slice / name), zipfile.ZipFile(tmp_path / name)
        assert ours.testzip() is None
        assert ours.namelist() == reference.namelist()
        assert (small_slice / name).stat().st_size == (tmp_path / name).stat().st_size
        for member in ours.namelist():
            if not member.endswith(".data/serialization_id"):
                assert ours.read(member) == reference.read(member), (name, member)
        loaded = torch.load(small_slice / name, weights_only=True, mmap=True)
        assert list(loaded) == list(expected)
        for key, tensor in expected.items():
            assert loaded[key].dtype == torch.bfloat16 and torch.equal(loaded[key], tensor)


def test_values_look_like_weights():
    values = expected_shards(1)
    embedding = values[0]["word_embeddings.weight"].float()
    assert abs(embedding.std().item() - 0.02) < 0.002 and abs(embedding.mean().item()) < 0.002
    rows = embedding[:PATTERN // 2].abs()  # rows repeat (sign aside) once per pattern: PATTERN / hidden rows here
    assert len({tuple(row[:8].tolist()) for row in rows}) == rows.shape[0]
    assert torch.equal(values[1]["h.0.input_layernorm.weight"], torch.ones(64, dtype=torch.bfloat16))
    assert not torch.equal(values[1]["h.0.mlp.dense_h_to_4h.weight"][:4, :4], embedding[:4, :4].bfloat16())


def test_converts(small_slice, tmp_path):
    manifest = convert(small_slice, tmp_path / "out")
    assert manifest.model["n_layer"] == 2 and manifest.model["hidden_size"] == 64
    assert read_manifest(tmp_path / "out").model["dtype"] == "bfloat16"


def test_cached_then_removed(tmp_path):
    dst = tmp_path / "s"
    slice176b.write_slice(dst, 1, geometry=GEOMETRY, piece_elements=PIECE, pattern_elements=PATTERN, log=quiet)
    stamps = {p.name: p.stat().st_mtime_ns for p in dst.iterdir()}
    said = []
    slice176b.write_slice(dst, 1, geometry=GEOMETRY, piece_elements=PIECE, pattern_elements=PATTERN, log=said.append)
    assert "kept" in said[0] and {p.name: p.stat().st_mtime_ns for p in dst.iterdir()} == stamps
    # another block count: rewritten, the marker last
    slice176b.write_slice(dst, 2, geometry=GEOMETRY, piece_elements=PIECE, pattern_elements=PATTERN, log=quiet)
    assert slice176b.read_marker(dst)["blocks"] == 2 and not (dst / "pytorch_model_00003-of-00003.bin").exists()
    (dst / "mine.txt").write_text("not the slice's")
    slice176b.remove_slice(dst)
    assert [p.name for p in dst.iterdir()] == ["mine.txt"]
    (dst / "mine.txt").unlink()
    slice176b.main([str(dst), "--clean"])
    assert not dst.exists()


def test_unfinished_slice_is_rewritten(tmp_path):
    dst = tmp_path / "s"
    slice176b.write_slice(dst, 1, geometry=GEOMETRY, piece_elements=PIECE, pattern_elements=PATTERN, log=quiet)
    shard = dst / "pytorch_model_00002-of-00003.bin"
    shard.write_bytes(shard.read_bytes()[:100])  # as if killed while writing
    said = []
    slice176b.write_slice(dst, 1, geometry=GEOMETRY, piece_elements=PIECE, pattern_elements=PATTERN, log=said.append)
    assert "writing" in said[0] and zipfile.ZipFile(shard).testzip() is None


def test_free_disk_checked_first(tmp_path, monkeypatch):
    monkeypatch.setattr(slice176b.shutil, "disk_usage", lambda _path: type("Usage", (), {"free": 10**9})())
    with pytest.raises(SystemExit, match=r"needs 18\.\d\d GB free .* has 1\.00 GB"):
        slice176b.write_slice(tmp_path / "s", 2, log=quiet)
    assert not any((tmp_path / "s").iterdir())
