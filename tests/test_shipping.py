"""Ship-ready directories: the flat layout (format 2) other tools read, format 1 still read, what a
model repository carries, the Hugging Face Hub and cache round trip, transformers loading or
refusing, and what the converter says about a run."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import bloomconv
from bloomconv.cli import main
from bloomconv.converters.convert import command_line, convert, quantize
from bloomconv.converters.example import write_example_checkpoint
from bloomconv.errors import DestinationError, SourceError
from bloomconv.format import FORMAT_VERSION, HF_INDEX_NAME, LEGACY_BLOCKS_DIR, QuantType, all_units, unit_file
from bloomconv.manifest import FileEntry, read_manifest, write_manifest
from bloomconv.settings import QuantSettings
from bloomconv.verification import verify

from .conftest import SMALL, fail_on_nth_write

IDS = torch.randint(0, SMALL[3], (2, 7), generator=torch.Generator().manual_seed(0))


def runtime_logits(directory) -> torch.Tensor:
    with bloomconv.load(directory) as model:
        return model.forward(IDS)[0]


def downgrade_to_format_1(directory: Path) -> None:
    """Rewrite a converted directory as format 1 laid it out: blocks in blocks/, the manifest,
    the index and SHA256SUMS naming them there."""
    manifest = read_manifest(directory)
    (directory / LEGACY_BLOCKS_DIR).mkdir()
    renamed = {}
    for unit in all_units(manifest.model["n_layer"]):
        old, new = unit_file(unit), unit_file(unit, 1)
        if old != new:
            (directory / old).rename(directory / new)
            renamed[old] = new
    index = json.loads((directory / HF_INDEX_NAME).read_text())
    index["weight_map"] = {k: renamed.get(v, v) for k, v in index["weight_map"].items()}
    data = (json.dumps(index, indent=1) + "\n").encode()
    (directory / HF_INDEX_NAME).write_bytes(data)
    files = tuple(FileEntry(HF_INDEX_NAME, len(data), hashlib.sha256(data).hexdigest()) if f.name == HF_INDEX_NAME
                  else dataclasses.replace(f, name=renamed.get(f.name, f.name)) for f in manifest.files)
    write_manifest(directory, dataclasses.replace(manifest, files=files, format_version=1))


def hf_cache_repository(cache: Path, repo_id: str, directory: Path, revision: str = "a1" * 20) -> Path:
    """Lay `directory` out as huggingface_hub caches a download: blobs/<sha256> holding the bytes,
    snapshots/<rev>/<path> -> ../../blobs/<sha256>, refs/main naming <rev>. Returns the snapshot."""
    repository = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repository / "snapshots" / revision
    (repository / "blobs").mkdir(parents=True)
    (repository / "refs").mkdir()
    (repository / "refs" / "main").write_text(revision)
    for file in sorted(p for p in directory.rglob("*") if p.is_file()):
        relative = file.relative_to(directory)
        blob = repository / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, blob)
        link = snapshot / relative
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path(*[".."] * (len(relative.parts) + 1), "blobs", blob.name))
    return snapshot


@pytest.fixture(scope="module")
def fp32_converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp32")
    write_example_checkpoint(root / "src", SMALL, "safetensors-single", torch.float32, seed=2)
    convert(root / "src", root / "dst")
    return root / "dst"


# -- 1. the flat layout (format 2), and format 1 still read ---------------------------------------

def test_every_weight_file_is_at_the_top_where_the_index_names_it(converted):
    manifest = read_manifest(converted)
    assert manifest.format_version == FORMAT_VERSION == 2
    index = json.loads((converted / HF_INDEX_NAME).read_text())
    top_level = {p.name for p in converted.glob("*.safetensors")}  # what vLLM and TGI glob
    assert set(index["weight_map"].values()) == top_level == {unit_file(u) for u in all_units(SMALL[1])}
    assert not [p for p in converted.iterdir() if p.is_dir()]


def test_accelerate_disk_offload_computes_what_the_runtime_does(fp32_converted, tmp_path):
    """transformers + accelerate offload read offloaded weights from the shards, joining each
    index name to the first shard's folder: with blocks/ that was DIR/blocks/embeddings.safetensors."""
    pytest.importorskip("accelerate")
    from transformers import BloomForCausalLM
    sizes = {p.name: p.stat().st_size for p in fp32_converted.glob("*.safetensors")}
    room = sizes["embeddings.safetensors"] + sizes["block_000.safetensors"] * 3 // 2  # the rest goes to disk
    model = BloomForCausalLM.from_pretrained(fp32_converted, device_map="auto", max_memory={"cpu": room},
                                             offload_folder=tmp_path / "offload", dtype=torch.float32).eval()
    places = set(model.hf_device_map.values())
    assert places == {"cpu", "disk"}, model.hf_device_map
    with torch.no_grad():
        expected = model(IDS).logits
    assert (runtime_logits(fp32_converted) - expected).abs().max() < 1e-4


def test_format_1_directory_verifies_loads_inspects_and_converts(fp32_converted, tmp_path):
    old = shutil.copytree(fp32_converted, tmp_path / "v1")
    downgrade_to_format_1(old)
    assert (old / "blocks" / "block_001.safetensors").is_file() and not (old / "block_001.safetensors").exists()
    assert verify(old).ok and verify(old, fast=True).ok
    assert bloomconv.inspect(old)["format_version"] == 1
    assert torch.equal(runtime_logits(old), runtime_logits(fp32_converted))
    # as a convert source: the same weight files as from the format-2 directory
    again, from_new = convert(old, tmp_path / "again"), convert(fp32_converted, tmp_path / "from-new")
    weights = lambda m: [(f.name, f.sha256) for f in m.files if f.tensors]  # noqa: E731
    assert again.format_version == 2 and weights(again) == weights(from_new)
    # damage is reported under the format-1 name
    (old / "blocks" / "block_001.safetensors").unlink()
    assert [(p.file, p.kind) for p in verify(old).problems] == [("blocks/block_001.safetensors", "missing")]


# -- 2. what a model repository carries travels with it --------------------------------------------

def test_repository_files_are_copied_and_listed(tmp_path):
    src = write_example_checkpoint(tmp_path / "src", (32, 1, 2, 256), "safetensors-shards")
    carried = {"README.md": b"---\nlicense: bigscience-bloom-rail-1.0\n---\n# card\n", "LICENSE": b"RAIL\n",
               "COPYING.txt": b"copying\n", "generation_config.json": b'{"max_length": 20}\n',
               "USE_POLICY.md": b"be nice\n"}
    for name, data in carried.items():
        (src / name).write_bytes(data)
    left = {"training_args.bin": b"pickle", ".gitattributes": b"*.bin filter=lfs\n",
            "flax_model.msgpack": b"x", "tf_model.h5.index.json": b"{}", "optimizer.pt": b"x"}
    for name, data in left.items():
        (src / name).write_bytes(data)
    with open(src / "big.txt", "wb") as f:
        f.truncate(10_000_001)  # over format.CARRIED_FILE_MAX_BYTES
    (src / "sub").mkdir()
    (src / "sub" / "notes.md").write_bytes(b"not at the top\n")
    manifest = convert(src, tmp_path / "dst")
    listed = {f.name: f for f in manifest.files}
    for name, data in carried.items():
        assert (tmp_path / "dst" / name).read_bytes() == data
        assert listed[name].sha256 == hashlib.sha256(data).hexdigest() and listed[name].size == len(data)
    for name in [*left, "big.txt", "sub"]:
        assert name not in listed and not (tmp_path / "dst" / name).exists(), name
    assert {"config.json", "tokenizer.json"} <= set(listed) and verify(tmp_path / "dst").ok


# -- 3. the Hub and the Hugging Face cache ---------------------------------------------------------

def test_what_hf_download_local_dir_adds_is_ignored_and_said(converted_copy):
    (converted_copy / ".gitattributes").write_text("*.safetensors filter=lfs diff=lfs merge=lfs -text\n")
    metadata = converted_copy / ".cache" / "huggingface" / "download"
    metadata.mkdir(parents=True)
    (metadata / "block_000.safetensors.metadata").write_text("abc\n")
    (converted_copy / ".cache" / "huggingface" / ".gitignore").write_text("*\n")
    result = CliRunner().invoke(main, ["verify", "--quiet", "--json", str(converted_copy)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["ignored"] == [".cache/huggingface/", ".gitattributes"]
    # exactly those: anything else there is still extra
    (converted_copy / ".cache" / "other").write_text("x")
    (converted_copy / ".gitattributes.bak").write_text("x")
    assert sorted((p.file, p.kind) for p in verify(converted_copy).problems) == [
        (".cache/other", "extra"), (".gitattributes.bak", "extra")]


def test_converted_directory_in_a_cache_snapshot_verifies_and_loads(converted, tmp_path):
    snapshot = hf_cache_repository(tmp_path / "hub", "someone/bloom-tiny-blocks", converted)
    assert all(p.is_symlink() for p in snapshot.iterdir())
    assert verify(snapshot).ok and verify(snapshot, fast=True).ok
    assert torch.equal(runtime_logits(snapshot), runtime_logits(converted))


@pytest.mark.parametrize("target", ["outside", "other repository", "inside the snapshot"])
def test_cache_snapshot_links_leading_elsewhere_are_still_refused(converted, tmp_path, target):
    snapshot = hf_cache_repository(tmp_path / "hub", "someone/bloom-tiny-blocks", converted)
    name = "block_001.safetensors"
    elsewhere = {"outside": tmp_path / "outside" / name,
                 "other repository": tmp_path / "hub" / "models--other--repo" / "blobs" / "x",
                 "inside the snapshot": snapshot / "copy.safetensors"}[target]
    elsewhere.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(converted / name, elsewhere)
    (snapshot / name).unlink()
    (snapshot / name).symlink_to(elsewhere)
    problems = {p.file: p.kind for p in verify(snapshot).problems}
    assert problems[name] == ("not a file" if target == "inside the snapshot" else "outside"), problems
    with pytest.raises(bloomconv.BloomconvError, match=name):
        bloomconv.load(snapshot)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_fifo_in_the_blobs_folder_is_not_a_file(converted, tmp_path):
    snapshot = hf_cache_repository(tmp_path / "hub", "someone/bloom-tiny-blocks", converted)
    blob = (snapshot / "config.json").resolve()
    blob.unlink()
    os.mkfifo(blob)
    assert [(p.file, p.kind) for p in verify(snapshot).problems] == [("config.json", "not a file")]


@pytest.fixture(params=["HF_HUB_CACHE", "HF_HOME"])
def hub_cache(release_checkpoint, tmp_path, monkeypatch, request):
    """The release checkpoint as `hf download org/bloom-tiny` would have cached it, the cache named
    by $HF_HUB_CACHE or found under $HF_HOME; cwd elsewhere."""
    cache = tmp_path / "hf-home" / "hub"
    hf_cache_repository(cache, "org/bloom-tiny", release_checkpoint)
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv(request.param, str(cache if request.param == "HF_HUB_CACHE" else cache.parent))
    monkeypatch.chdir(tmp_path)
    return cache


def test_hub_repo_id_and_cache_repository_as_sources(converted, hub_cache, tmp_path):
    by_id = convert("org/bloom-tiny", tmp_path / "by-id")
    by_folder = convert(hub_cache / "models--org--bloom-tiny", tmp_path / "by-folder")
    expected = read_manifest(converted)
    assert by_id.files == by_folder.files == expected.files
    assert by_id.source_files == expected.source_files
    result = CliRunner().invoke(main, ["quantize", "--quiet", "--bits", "4", "org/bloom-tiny", str(tmp_path / "nf4")])
    assert result.exit_code == 0, result.output
    assert verify(tmp_path / "nf4").ok and read_manifest(tmp_path / "nf4").quantization == QuantSettings(QuantType.NF4)


def test_repo_id_missing_from_the_cache_says_to_download_it(hub_cache, tmp_path):
    with pytest.raises(SourceError, match=r"org/missing: is neither a folder nor a model in the Hugging Face "
                                          r"cache .*Run `hf download org/missing` first"):
        convert("org/missing", tmp_path / "dst")
    result = CliRunner().invoke(main, ["quantize", "--bits", "8", "org/missing", str(tmp_path / "dst")])
    assert result.exit_code == 2 and "hf download org/missing" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "dst").exists()


# -- 4. transformers loads the directory and computes, or refuses it --------------------------------

@pytest.mark.parametrize("settings_", [QuantSettings(QuantType.INT8), QuantSettings(QuantType.NF4, embeddings=True),
                                       QuantSettings(QuantType.NF4, embeddings="int8")],
                         ids=["int8", "nf4-emb", "nf4-int8-emb"])
def test_quantized_embeddings_are_refused_by_transformers(release_checkpoint, tmp_path, settings_):
    from transformers import BloomForCausalLM
    dst = tmp_path / "q"
    convert(release_checkpoint, dst, quantization=settings_)
    with pytest.raises(ValueError, match="quant_method"):
        BloomForCausalLM.from_pretrained(dst)
    assert "bloomconv" in json.loads((dst / "config.json").read_text())["quantization_config"]["bloomconv"]
    assert bloomconv.inspect(dst)["transformers"] == (
        "refused: quantized embeddings (bloomconv runtime only; `quantize --no-embeddings` writes the layout it loads)")


def test_inspect_says_a_format_1_directory_with_quantized_embeddings_fails_in_transformers(release_checkpoint,
                                                                                           tmp_path):
    """Format 1 wrote bitsandbytes' config for them: transformers loads, then fails computing."""
    convert(release_checkpoint, tmp_path / "q", quantization=QuantSettings(QuantType.INT8))
    downgrade_to_format_1(tmp_path / "q")
    assert bloomconv.inspect(tmp_path / "q")["transformers"] == (
        "fails at the first forward pass: quantized embeddings (bloomconv runtime only; `quantize --no-embeddings` "
        "writes the layout it loads)")


def test_inspect_says_transformers_loads_the_others(converted, release_checkpoint, tmp_path):
    """That they load and compute correctly: test_convert, test_runtime and test_quant (bitsandbytes)."""
    assert bloomconv.inspect(converted)["transformers"] == "loads"
    convert(release_checkpoint, tmp_path / "q", quantization=QuantSettings(QuantType.INT8, embeddings=False))
    assert bloomconv.inspect(tmp_path / "q")["transformers"] == "loads with bitsandbytes (int8 blocks)"
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["load_in_8bit"]


# -- 5. what the converter says ---------------------------------------------------------------------

def test_a_resumed_run_says_how_much_it_kept(release_checkpoint, tmp_path, monkeypatch):
    from bloomconv.converters import convert as convert_module
    real_write = fail_on_nth_write(monkeypatch, 3, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        convert(release_checkpoint, tmp_path / "dst")
    monkeypatch.setattr(convert_module, "write_safetensors", real_write)
    kept = len(list((tmp_path / "dst").glob("*.safetensors")))  # each committed before the next is written
    said = []
    convert(release_checkpoint, tmp_path / "dst", log=said.append)
    units = len(all_units(SMALL[1]))
    assert kept == 2 and said == [f"resuming: 2 of {units} weight files already written"]
    said.clear()
    convert(release_checkpoint, tmp_path / "dst", log=said.append)
    assert said and said[0].startswith("already finished")
    fresh = []
    convert(release_checkpoint, tmp_path / "fresh", log=fresh.append)
    assert fresh == []


def test_a_quantized_bloomconv_directory_is_refused_as_a_source(release_checkpoint, tmp_path):
    convert(release_checkpoint, tmp_path / "int8", quantization=QuantSettings(QuantType.INT8))
    for settings_ in (QuantSettings(QuantType.NF4), None):
        with pytest.raises(SourceError, match=r"is already int8 .*Quantize from the original checkpoint or a "
                                              r"`bloomconv convert` output"):
            convert(tmp_path / "int8", tmp_path / "again", quantization=settings_)
    assert not (tmp_path / "again").exists()


def test_an_unfinished_job_is_named_by_its_command_and_source(release_checkpoint, tmp_path, monkeypatch):
    from bloomconv.converters import convert as convert_module
    real_write = fail_on_nth_write(monkeypatch, 2, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        quantize(release_checkpoint, tmp_path / "dst", bits=8)
    monkeypatch.setattr(convert_module, "write_safetensors", real_write)
    src = release_checkpoint.resolve()
    with pytest.raises(DestinationError) as refused:
        convert(release_checkpoint, tmp_path / "dst")
    assert str(refused.value) == (
        f"{tmp_path / 'dst'}: holds an unfinished `bloomconv quantize --bits 8` conversion of {src}. "
        f"Re-run `bloomconv quantize --bits 8 {src} {tmp_path / 'dst'}` to finish it, or choose an empty destination.")
    # the same job resumes from another path to the same source
    monkeypatch.chdir(release_checkpoint.parent)
    quantize(Path(release_checkpoint.name), tmp_path / "dst", bits=8)
    assert verify(tmp_path / "dst").ok


@pytest.mark.parametrize("settings_, expected", [
    (None, "convert"),
    (QuantSettings(QuantType.INT8), "quantize --bits 8"),
    (QuantSettings(QuantType.INT8, embeddings=False, int8_scale_from="source"),
     "quantize --bits 8 --no-embeddings --int8-scale-from source"),
    (QuantSettings(QuantType.NF4), "quantize --bits 4 --quant-type nf4"),
    (QuantSettings(QuantType.NF4, embeddings="int8"), "quantize --bits 4 --quant-type nf4"),
    (QuantSettings(QuantType.NF4, embeddings=False), "quantize --bits 4 --quant-type nf4 --no-embeddings"),
    (QuantSettings(QuantType.NF4, embeddings="int8", int8_scale_from="source"),
     "quantize --bits 4 --quant-type nf4 --int8-scale-from source"),
    (QuantSettings(QuantType.FP4, 64, double_quant=False, embeddings=True),
     "quantize --bits 4 --quant-type fp4 --block-size 64 --no-double-quant --embeddings"),
])
def test_command_line_asks_for_exactly_those_settings(release_checkpoint, tmp_path, settings_, expected):
    assert command_line(settings_) == expected
    result = CliRunner().invoke(main, [*expected.split(), "--quiet", str(release_checkpoint), str(tmp_path / "d")])
    assert result.exit_code == 0, result.output
    assert read_manifest(tmp_path / "d").quantization == settings_


def test_the_cli_prints_the_resume_message(release_checkpoint, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from bloomconv.cli import main
    from bloomconv.converters import convert as convert_module
    real_write = fail_on_nth_write(monkeypatch, 2, KeyboardInterrupt())
    args = ["quantize", "-q", "--bits", "8", str(release_checkpoint), str(tmp_path / "dst")]
    assert CliRunner().invoke(main, args).exit_code == 130
    monkeypatch.setattr(convert_module, "write_safetensors", real_write)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0 and "resuming: 1 of" in result.output, result.output
