"""quantize: the CLI, the manifest's quantization record, recipes and their computed sizes."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import bloomconv
from bloomconv.cli import main
from bloomconv.converters.convert import convert
from bloomconv.errors import OptionsError
from bloomconv.format import MANIFEST_NAME, QuantType, is_quantized_weight
from bloomconv.geometry import Geometry
from bloomconv.manifest import read_manifest
from bloomconv.recipes import Recipe, all_recipes, get_recipe
from bloomconv.settings import QuantSettings
from bloomconv.verification import verify

from .conftest import SMALL, load_converted_tensors, load_dequantized, load_source_tensors

LINEAR = "transformer.h.0.mlp.dense_h_to_4h"


def run(*args):
    return CliRunner().invoke(main, [*args])


@pytest.fixture(scope="module")
def int8_dir(release_checkpoint, tmp_path_factory):
    dst = tmp_path_factory.mktemp("q") / "int8"
    result = run("quantize", "--quiet", "--bits", "8", str(release_checkpoint), str(dst))
    assert result.exit_code == 0, result.output
    return dst


def test_int8_stores_bitsandbytes_layout_and_records_it(int8_dir):
    manifest = read_manifest(int8_dir)
    assert manifest.quantization == QuantSettings(QuantType.INT8)
    assert manifest.quantization.int8_scale_from == "float16"
    tensors = {t.name: t for f in manifest.files for t in f.tensors}
    assert tensors[f"{LINEAR}.weight"].dtype == "I8" and tensors[f"{LINEAR}.weight"].quant is QuantType.INT8
    assert tensors[f"{LINEAR}.SCB"].dtype == "F32" and tensors[f"{LINEAR}.SCB"].shape == (4 * SMALL[0],)
    assert tensors[f"{LINEAR}.bias"].dtype == "BF16" and tensors[f"{LINEAR}.bias"].quant is QuantType.NONE
    assert tensors["transformer.h.0.input_layernorm.weight"].dtype == "BF16"
    assert tensors["transformer.word_embeddings.weight"].dtype == "I8"  # int8 preset: quantized too
    assert tensors["transformer.word_embeddings.SCB"].shape == (SMALL[3],)
    assert verify(int8_dir).ok


def test_quantized_values_dequantize_close_to_the_source(int8_dir, release_checkpoint):
    source = load_source_tensors(release_checkpoint)
    restored = {k.removeprefix("transformer."): v for k, v in load_dequantized(int8_dir).items()}
    assert set(restored) == set(source)
    for name, w in source.items():
        if is_quantized_weight(name, embeddings=True):
            bound = w.float().abs().amax(dim=1, keepdim=True) / 127 / 2 + 1e-6
            assert ((restored[name].float() - w.float()).abs() <= bound * 1.01).all(), name
        else:
            assert torch.equal(restored[name], w), name


@pytest.mark.parametrize("args,expected", [
    (["--bits", "4"], QuantSettings(QuantType.NF4, 32, True, "int8")),
    (["--bits", "4", "--no-embeddings"], QuantSettings(QuantType.NF4, 32, True, False)),
    (["--bits", "8", "--no-embeddings"], QuantSettings(QuantType.INT8, embeddings=False)),
    (["--bits", "4", "--quant-type", "fp4", "--block-size", "128", "--no-double-quant", "--embeddings"],
     QuantSettings(QuantType.FP4, 128, False, True)),
])
def test_4bit_options_are_recorded(release_checkpoint, tmp_path, args, expected):
    result = run("quantize", "--quiet", *args, str(release_checkpoint), str(tmp_path / "q"))
    assert result.exit_code == 0, result.output
    manifest = read_manifest(tmp_path / "q")
    assert manifest.quantization == expected
    names = {t.name for f in manifest.files for t in f.tensors}
    if expected.quant_type.is_4bit:
        assert f"{LINEAR}.weight.quant_state.bitsandbytes__{expected.quant_type.value}" in names
        assert (f"{LINEAR}.weight.nested_absmax" in names) == expected.double_quant
        assert ("transformer.word_embeddings.weight.absmax" in names) == (expected.embeddings is True)
        assert ("transformer.word_embeddings.SCB" in names) == (expected.embeddings == "int8")
    else:
        assert ("transformer.word_embeddings.SCB" in names) == expected.embeddings
    assert verify(tmp_path / "q").ok


def test_4bit_with_int8_embeddings_stores_the_int8_presets_embeddings_next_to_the_4bit_blocks(
        release_checkpoint, int8_dir, tmp_path):
    for name, args in (("mixed", ["--bits", "4"]), ("explicit", ["--bits", "4", "--int8-embeddings"]),
                       ("nf4", ["--bits", "4", "--no-embeddings"])):
        result = run("quantize", "--quiet", *args, str(release_checkpoint), str(tmp_path / name))
        assert result.exit_code == 0, result.output
    mixed = read_manifest(tmp_path / "mixed")  # the 4-bit preset
    assert mixed.quantization == read_manifest(tmp_path / "explicit").quantization
    assert mixed.quantization == QuantSettings(QuantType.NF4, embeddings="int8")
    assert mixed.quantization.to_dict()["embeddings"] == "int8"
    tags = {t.name: t.quant for f in mixed.files for t in f.tensors}
    assert tags["transformer.word_embeddings.SCB"] is QuantType.INT8 and tags[f"{LINEAR}.weight"] is QuantType.NF4
    for f in mixed.files:  # the embeddings as the int8 preset writes them, the blocks as the nf4 preset does
        if f.tensors:
            twin = int8_dir if f.name.startswith("embeddings") else tmp_path / "nf4"
            assert (tmp_path / "mixed" / f.name).read_bytes() == (twin / f.name).read_bytes(), f.name
    assert verify(tmp_path / "mixed").ok
    assert bloomconv.inspect(tmp_path / "mixed")["transformers"] == (
        "refused: quantized embeddings (bloomconv runtime only; `quantize --no-embeddings` writes the layout it loads)")


@pytest.mark.parametrize("args,message", [
    (["--bits", "8", "--int8-embeddings"], "int8 embeddings go with 4-bit blocks"),
    (["--bits", "4", "--no-embeddings", "--int8-embeddings"], "contradict each other"),
])
def test_int8_embeddings_contradictions_are_refused(release_checkpoint, tmp_path, args, message):
    result = run("quantize", *args, str(release_checkpoint), str(tmp_path / "q"))
    assert result.exit_code == 2 and message in result.output and not (tmp_path / "q").exists()


def test_int8_embeddings_take_the_int8_presets_options_and_a_weight_only_method():
    with pytest.raises(OptionsError, match="true, false or 'int8'"):
        QuantSettings(QuantType.NF4, embeddings="fp4")
    for embeddings in (False, True):
        with pytest.raises(OptionsError, match="applies to int8 only"):
            QuantSettings(QuantType.NF4, embeddings=embeddings, int8_scale_from="source")
    digest = "0" * 64
    for method, expected in (("rtn", "rtn"), ("search", "search"), ("gptq", "search")):
        settings = QuantSettings(QuantType.NF4, embeddings="int8", int8_scale_from="source", method=method,
                                 calibration_sha256=digest if method == "gptq" else None)
        embeddings = settings.settings_for("transformer.word_embeddings.weight")
        assert embeddings == QuantSettings(QuantType.INT8, embeddings=True, int8_scale_from="source", method=expected)
        assert settings.settings_for(f"{LINEAR}.weight") is settings
        assert settings.settings_for("transformer.ln_f.weight") is None
    assert QuantSettings.from_dict(settings.to_dict()) == settings


def test_quantize_resumes_after_a_kill_and_refuses_other_settings(release_checkpoint, int8_dir, tmp_path):
    before = (int8_dir / MANIFEST_NAME).read_bytes()
    assert run("quantize", "--quiet", "--bits", "8", str(release_checkpoint), str(int8_dir)).exit_code == 0
    assert (int8_dir / MANIFEST_NAME).read_bytes() == before
    result = run("quantize", "--quiet", "--bits", "4", str(release_checkpoint), str(int8_dir))
    assert result.exit_code == 2 and "different settings" in result.output


def test_quantize_from_a_bloomconv_directory(converted, release_checkpoint, tmp_path):
    from_release = convert(release_checkpoint, tmp_path / "a", quantization=QuantSettings(QuantType.NF4))
    from_converted = convert(converted, tmp_path / "b", quantization=QuantSettings(QuantType.NF4))
    a, b = load_converted_tensors(tmp_path / "a"), load_converted_tensors(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert from_converted.source_layout == "bloomconv" and from_release.files[3:] == from_converted.files[3:]


def test_usage_errors(release_checkpoint, tmp_path):
    assert run("quantize", str(release_checkpoint), str(tmp_path / "x")).exit_code == 2
    assert run("quantize", "--bits", "8", "--recipe", "bloom-560m-int8", str(release_checkpoint),
               str(tmp_path / "x")).exit_code == 2
    result = run("quantize", "--recipe", "bloom-9000b-int8", str(release_checkpoint), str(tmp_path / "x"))
    assert result.exit_code == 2 and "unknown recipe" in result.output


def test_every_released_bloom_has_recipes():
    models = {r.model for r in all_recipes()}
    assert models == {"bloom-560m", "bloom-1b1", "bloom-1b7", "bloom-3b", "bloom-7b1", "bloom-176b"}
    big = get_recipe("bloom-176b-int8")
    assert big.geometry.parameter_count() == 176_247_271_424  # BLOOM's published count
    assert big.source_bytes == 2 * big.geometry.parameter_count()


@pytest.mark.parametrize("settings_", [QuantSettings("int8"), QuantSettings("nf4"), QuantSettings("fp4"),
                                       QuantSettings("nf4", embeddings="int8")],
                         ids=["int8", "nf4", "fp4", "nf4-int8-embeddings"])
def test_recipe_sizes_match_a_real_quantization(release_checkpoint, tmp_path, settings_):
    hidden, n_layer, n_head, vocab = SMALL
    recipe = Recipe("small", "small", (), Geometry(hidden, n_layer, n_head, vocab), "bfloat16", (), settings_)
    manifest = convert(release_checkpoint, tmp_path / "q", quantization=recipe.quantization)
    data_bytes = 0
    for f in manifest.files:
        if f.tensors:
            header = json.loads((tmp_path / "q" / f.name).read_bytes()[8:8 + int.from_bytes(
                (tmp_path / "q" / f.name).read_bytes()[:8], "little")])
            blobs = sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()
                        if "quant_state" in k)
            data_bytes += f.size - 8 - int.from_bytes((tmp_path / "q" / f.name).read_bytes()[:8], "little") - blobs
    assert recipe.output_bytes == data_bytes


def test_recipes_command_lists_sizes():
    result = run("recipes", "--json")
    rows = {r["recipe"]: r for r in json.loads(result.output)}
    assert rows["bloom-176b-int8"]["output_bytes"] < 0.52 * rows["bloom-176b-int8"]["source_bytes"]
    # blocks at ~4.3 bits per weight (block 32 + double quant), bf16 embeddings (2 % of the weights)
    assert rows["bloom-176b-nf4"]["output_bytes"] < 0.29 * rows["bloom-176b-nf4"]["source_bytes"]
    assert "bloom-560m-nf4" in run("recipes").output


def test_recipe_for_another_geometry_is_refused(release_checkpoint, tmp_path):
    result = run("quantize", "--quiet", "--recipe", "bloom-176b-nf4", str(release_checkpoint), str(tmp_path / "q"))
    assert result.exit_code == 2 and "recipe bloom-176b-nf4 is for" in result.output
    assert not (tmp_path / "q").exists()
    assert get_recipe("bloom-176b-nf4").quantization == QuantSettings(QuantType.NF4)


def test_int8_beyond_fp16_range_is_refused_unless_scaled_from_source(tmp_path):
    from bloomconv.converters.example import write_example_checkpoint
    src = write_example_checkpoint(tmp_path / "src", SMALL, "pickle-single")
    state = torch.load(src / "pytorch_model.bin", weights_only=True)
    state["transformer.h.1.mlp.dense_4h_to_h.weight"][3, 5] = 1e6  # bf16 holds it, fp16 does not
    torch.save(state, src / "pytorch_model.bin")
    result = run("quantize", "--quiet", "--bits", "8", str(src), str(tmp_path / "a"))
    assert result.exit_code == 2 and "transformer.h.1.mlp.dense_4h_to_h.weight" in result.output
    assert "source" in result.output and not (tmp_path / "a" / MANIFEST_NAME).exists()
    result = run("quantize", "--quiet", "--bits", "8", "--int8-scale-from", "source", str(src), str(tmp_path / "b"))
    assert result.exit_code == 0, result.output
    manifest = read_manifest(tmp_path / "b")
    assert manifest.quantization.int8_scale_from == "source"
    scb = load_converted_tensors(tmp_path / "b")["h.1.mlp.dense_4h_to_h.SCB"]
    assert torch.isfinite(scb).all() and scb[3].item() == pytest.approx(1e6, rel=1e-2)
