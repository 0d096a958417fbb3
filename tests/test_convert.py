"""convert: bit-exact resharding from every source layout, manifests, resume, bad input."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from bloomconv.cli import main
from bloomconv.converters.convert import convert
from bloomconv.converters.example import write_example_checkpoint
from bloomconv.errors import (DestinationBusyError, DestinationError, NotBloomError, SourceError,
                              UnsafeCheckpointError)
from bloomconv.format import FORMAT_VERSION, JOB_NAME, MANIFEST_NAME, all_units, unit_file
from bloomconv.hashing import sha256_file
from bloomconv.manifest import read_manifest
from bloomconv.verification import verify

from .conftest import SMALL, edit_config, fail_on_nth_write, load_converted_tensors, load_source_tensors


@pytest.mark.parametrize("layout,dtype", [
    ("release-pickle-shards", torch.bfloat16),
    ("release-pickle-shards", torch.float16),
    ("release-pickle-shards", torch.float32),
    ("safetensors-shards", torch.bfloat16),
    ("pickle-single", torch.float16),
    ("safetensors-single", torch.float32),
])
def test_roundtrip_is_bit_exact(tmp_path, layout, dtype):
    src = write_example_checkpoint(tmp_path / "src", SMALL, layout, dtype, seed=1)
    manifest = convert(src, tmp_path / "dst")
    before, after = load_source_tensors(src), load_converted_tensors(tmp_path / "dst")
    assert set(before) == set(after)
    for name, tensor in before.items():
        assert after[name].dtype == dtype
        assert torch.equal(after[name].view(torch.uint8), tensor.contiguous().view(torch.uint8)), name
    assert manifest.model["dtype"] == str(dtype).removeprefix("torch.")
    assert verify(tmp_path / "dst").ok


def test_one_file_per_unit_with_the_right_tensors(converted):
    n_layer = SMALL[1]
    for unit in all_units(n_layer):
        with safe_open(converted / unit_file(unit), framework="pt") as f:
            names = set(f.keys())
            assert f.metadata()["bloomconv_unit"] == unit
        if unit.startswith("block_"):
            index = int(unit[6:])
            assert names and all(n.startswith(f"transformer.h.{index}.") for n in names)
    with safe_open(converted / "embeddings.safetensors", framework="pt") as f:
        assert set(f.keys()) == {"transformer.word_embeddings.weight",
                                 "transformer.word_embeddings_layernorm.weight",
                                 "transformer.word_embeddings_layernorm.bias"}
    all_names = load_converted_tensors(converted)
    assert not any("lm_head" in n for n in all_names)
    assert (converted / "tokenizer.json").is_file() and (converted / "config.json").is_file()


def test_manifest_records_sources_outputs_and_sha256sums_checks(converted, release_checkpoint):
    manifest = read_manifest(converted)
    assert manifest.format_version == FORMAT_VERSION == 2 and manifest.tool_version
    for entry in manifest.source_files:
        path = release_checkpoint / entry.name
        assert entry.size == path.stat().st_size and entry.sha256 == sha256_file(path)
    for entry in manifest.files:
        path = converted / entry.name
        assert entry.size == path.stat().st_size and entry.sha256 == sha256_file(path)
    blocks = [f for f in manifest.files if f.name.startswith("block_")]
    assert len(blocks) == SMALL[1]
    qkv = next(t for t in blocks[0].tensors if t.name.endswith("query_key_value.weight"))
    assert qkv.dtype == "BF16" and qkv.shape == (3 * SMALL[0], SMALL[0])
    done = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=converted, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count(": OK") == len(manifest.files) + 1  # and manifest.json itself


def test_transformers_reads_the_converted_directory(converted, release_checkpoint):
    from transformers import BloomForCausalLM
    model = BloomForCausalLM.from_pretrained(converted)
    source = load_source_tensors(release_checkpoint)
    assert torch.equal(model.transformer.h[1].mlp.dense_4h_to_h.weight, source["h.1.mlp.dense_4h_to_h.weight"])
    assert model.lm_head.weight.data_ptr() == model.transformer.word_embeddings.weight.data_ptr()


def test_rerun_on_finished_destination_is_a_no_op(converted, release_checkpoint):
    before = (converted / MANIFEST_NAME).read_bytes()
    mtime = (converted / "block_000.safetensors").stat().st_mtime_ns
    convert(release_checkpoint, converted)
    assert (converted / MANIFEST_NAME).read_bytes() == before
    assert (converted / "block_000.safetensors").stat().st_mtime_ns == mtime


def test_destination_holding_a_different_conversion_is_refused(converted_copy, tmp_path):
    other = write_example_checkpoint(tmp_path / "other", (32, 2, 2, 256), "safetensors-single")
    before = (converted_copy / MANIFEST_NAME).read_bytes()
    with pytest.raises(DestinationError, match="different source"):
        convert(other, converted_copy)
    assert (converted_copy / MANIFEST_NAME).read_bytes() == before


def test_non_empty_foreign_destination_is_refused(release_checkpoint, tmp_path):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(DestinationError, match="not empty"):
        convert(release_checkpoint, dst)
    assert (dst / "holiday.jpg").read_bytes() == b"precious"


def test_unfinished_different_job_is_refused(release_checkpoint, tmp_path):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / JOB_NAME).write_text(json.dumps({"something": "else"}))
    with pytest.raises(DestinationError, match="unfinished conversion"):
        convert(release_checkpoint, dst)


def test_second_writer_is_locked_out(release_checkpoint, tmp_path):
    from bloomconv.converters.destination import Destination
    dst = tmp_path / "dst"
    with Destination(dst):
        with pytest.raises(DestinationBusyError, match="another bloomconv process"):
            convert(release_checkpoint, dst)


# -- bad input: each gives a one-line error, non-zero exit, and no manifest ----------------------

def _copy(src, tmp_path):
    return shutil.copytree(src, tmp_path / "src")


def _cli_refuses(src, dst, match):
    result = CliRunner().invoke(main, ["convert", "--quiet", str(src), str(dst)])
    assert result.exit_code == 2, result.output
    assert match in result.output
    assert not (dst / MANIFEST_NAME).exists()
    return result


def test_missing_shard(release_checkpoint, tmp_path):
    src = _copy(release_checkpoint, tmp_path)
    (src / "pytorch_model_00003-of-00005.bin").unlink()
    _cli_refuses(src, tmp_path / "dst", "shard named by the index is missing")
    assert not (tmp_path / "dst").exists()


def test_truncated_shard(release_checkpoint, tmp_path):
    src = _copy(release_checkpoint, tmp_path)
    shard = src / "pytorch_model_00002-of-00005.bin"
    os.truncate(shard, shard.stat().st_size // 2)
    _cli_refuses(src, tmp_path / "dst", "pytorch_model_00002-of-00005.bin: shard is truncated or damaged")


def test_truncated_safetensors_shard(tmp_path):
    src = write_example_checkpoint(tmp_path / "src", SMALL, "safetensors-shards")
    shard = src / "model-00002-of-00002.safetensors"
    os.truncate(shard, shard.stat().st_size - 100)
    _cli_refuses(src, tmp_path / "dst", "model-00002-of-00002.safetensors: shard is truncated or damaged")


def test_index_names_a_missing_tensor(release_checkpoint, tmp_path):
    src = _copy(release_checkpoint, tmp_path)
    index = json.loads((src / "pytorch_model.bin.index.json").read_text())
    index["weight_map"]["h.0.self_attention.rotary.weight"] = "pytorch_model_00002-of-00005.bin"
    (src / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    _cli_refuses(src, tmp_path / "dst", "h.0.self_attention.rotary.weight")


def test_shape_disagrees_with_config(release_checkpoint, tmp_path):
    src = _copy(release_checkpoint, tmp_path)
    edit_config(src, vocab_size=1000)
    _cli_refuses(src, tmp_path / "dst", "config.json implies [1000, 64]")


def test_layer_count_disagrees_with_config(release_checkpoint, tmp_path):
    src = _copy(release_checkpoint, tmp_path)
    edit_config(src, n_layer=4)
    _cli_refuses(src, tmp_path / "dst", "missing tensors")


def test_not_a_bloom(release_checkpoint, tmp_path):
    src = _copy(release_checkpoint, tmp_path)
    edit_config(src, model_type="gpt2")
    with pytest.raises(NotBloomError, match="not 'bloom'"):
        convert(src, tmp_path / "dst")
    _cli_refuses(src, tmp_path / "dst", "model_type is 'gpt2'")


def test_mixed_dtypes_are_refused(release_checkpoint, tmp_path):
    src = _copy(release_checkpoint, tmp_path)
    shard = src / "pytorch_model_00003-of-00005.bin"
    state = torch.load(shard, weights_only=True)
    torch.save({k: v.float() for k, v in state.items()}, shard)
    _cli_refuses(src, tmp_path / "dst", "mixed dtypes")


def test_untied_head_is_refused(tmp_path):
    src = write_example_checkpoint(tmp_path / "src", SMALL, "pickle-single")
    state = torch.load(src / "pytorch_model.bin", weights_only=True)
    state["lm_head.weight"] = torch.randn_like(state["transformer.word_embeddings.weight"])
    torch.save(state, src / "pytorch_model.bin")
    with pytest.raises(SourceError, match="lm_head.weight differs"):
        convert(src, tmp_path / "dst")
    assert not (tmp_path / "dst" / MANIFEST_NAME).exists()


def test_tied_head_stored_in_source_is_dropped(tmp_path):
    src = write_example_checkpoint(tmp_path / "src", SMALL, "pickle-single")
    state = torch.load(src / "pytorch_model.bin", weights_only=True)
    state["lm_head.weight"] = state["transformer.word_embeddings.weight"].clone()
    torch.save(state, src / "pytorch_model.bin")
    convert(src, tmp_path / "dst")
    assert "lm_head.weight" not in load_converted_tensors(tmp_path / "dst")


class _RunsCode:
    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


def test_malicious_pickle_is_refused_and_never_runs(release_checkpoint, tmp_path):
    src = _copy(release_checkpoint, tmp_path)
    sentinel = tmp_path / "pwned"
    shard = src / "pytorch_model_00002-of-00005.bin"
    state = torch.load(shard, weights_only=True)
    state["h.0.input_layernorm.weight"] = _RunsCode(sentinel)
    torch.save(state, shard)
    with pytest.raises(UnsafeCheckpointError, match="pytorch_model_00002-of-00005.bin: refused to load"):
        convert(src, tmp_path / "dst")
    result = _cli_refuses(src, tmp_path / "dst2", "nothing from it was executed")
    assert "system" in result.output
    assert not sentinel.exists()


# -- crash safety ---------------------------------------------------------------------------------

def test_killed_conversion_resumes_to_the_same_manifest(tmp_path):
    src = write_example_checkpoint(tmp_path / "src", (256, 12, 4, 8192), "release-pickle-shards", torch.float32)
    reference = convert(src, tmp_path / "reference")
    dst = tmp_path / "dst"
    journal = dst / ".bloomconv-journal"
    process = subprocess.Popen([sys.executable, "-m", "bloomconv.cli", "convert", "--quiet", str(src), str(dst)])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        done = len(list(journal.glob("block_*.json"))) if journal.is_dir() else 0
        if 2 <= done:
            break
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the conversion finished before it could be killed"
    assert not (dst / MANIFEST_NAME).exists()
    result = verify_cli(dst)
    assert result.exit_code == 2 and "conversion incomplete" in result.output
    written_before = {p.name: p.stat().st_mtime_ns for p in dst.glob("block_*.safetensors")}
    assert written_before
    resumed = convert(src, dst)
    assert (dst / MANIFEST_NAME).read_bytes() == (tmp_path / "reference" / MANIFEST_NAME).read_bytes()
    assert resumed == reference
    kept = [n for n, t in written_before.items() if (dst / n).stat().st_mtime_ns == t]
    assert kept, "resuming rewrote every unit instead of skipping finished ones"
    assert verify(dst).ok
    assert not (dst / JOB_NAME).exists() and not journal.exists()


def verify_cli(directory, *args):
    return CliRunner().invoke(main, ["verify", "--quiet", *args, str(directory)])


def test_run_killed_before_its_job_record_leaves_a_restartable_destination(release_checkpoint, tmp_path):
    dst = tmp_path / "dst"
    (dst / ".bloomconv-journal").mkdir(parents=True)
    (dst / ".bloomconv-job.json.tmp-12345").write_text("{half")
    convert(release_checkpoint, dst)
    assert verify(dst).ok


def test_index_pointing_outside_the_checkpoint_is_refused(release_checkpoint, tmp_path):
    src = _copy(release_checkpoint, tmp_path)
    index = json.loads((src / "pytorch_model.bin.index.json").read_text())
    index["weight_map"]["ln_f.bias"] = "../../etc/passwd"
    (src / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    _cli_refuses(src, tmp_path / "dst", "index names a file outside the checkpoint")


def test_missing_config_is_refused(release_checkpoint, tmp_path):
    src = _copy(release_checkpoint, tmp_path)
    (src / "config.json").unlink()
    _cli_refuses(src, tmp_path / "dst", "config.json is missing")


def test_full_disk_names_the_destination_and_resumes(release_checkpoint, tmp_path, monkeypatch):
    import errno

    from bloomconv.converters import convert as convert_module
    real_write = fail_on_nth_write(monkeypatch, 3, OSError(errno.ENOSPC, "No space left on device"))
    dst = tmp_path / "dst"
    with pytest.raises(DestinationError, match="no space left on the destination"):
        convert(release_checkpoint, dst)
    assert not (dst / MANIFEST_NAME).exists()
    assert not [p for p in dst.rglob("*") if ".tmp-" in p.name]
    monkeypatch.setattr(convert_module, "write_safetensors", real_write)
    convert(release_checkpoint, dst)
    assert verify(dst).ok
