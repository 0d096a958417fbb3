"""The library as a script uses it: public names that stay callable, one set of defaults and one
validation for every entry point, exit codes from one table, arrows that point one way."""
from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner

import bloomconv
from bloomconv.cli import main
from bloomconv.errors import (EXIT_CODES, BloomconvError, ManifestError, OptionsError, RecipeError,
                              VerificationError, exit_code)
from bloomconv.format import QuantType
from bloomconv.manifest import read_manifest
from bloomconv.settings import INT8_EMBEDDINGS, PRESETS, QuantSettings


def call_every_public_function(directory, tmp_path, round_: int) -> None:
    assert bloomconv.verify(directory).ok
    assert bloomconv.inspect(directory)["model"]["n_layer"] == 3
    assert callable(bloomconv.convert) and callable(bloomconv.quantize) and callable(bloomconv.load)
    with bloomconv.load(directory) as model:
        assert model.generate("x", max_new_tokens=1, seed=0)
    manifest = bloomconv.quantize(directory, tmp_path / f"int8-{round_}", bits=8)
    assert manifest.quantization == bloomconv.QuantSettings(bloomconv.QuantType.INT8)


def test_public_functions_work_twice_and_after_load(converted, tmp_path):
    """Importing `bloomconv.verify`'s module once rebound the package attribute to the module."""
    for round_ in range(2):
        call_every_public_function(converted, tmp_path, round_)
    for name in bloomconv.__all__:
        assert not type(getattr(bloomconv, name)).__name__ == "module", name


def test_no_submodule_shares_a_public_name():
    import pkgutil
    submodules = {m.name for m in pkgutil.iter_modules(bloomconv.__path__)}
    assert not submodules & set(bloomconv.__all__)


def test_public_names_in_a_fresh_process_in_any_order(converted):
    """Each name bound on first use, whatever was imported before it."""
    script = ("import bloomconv, bloomconv.runtime, bloomconv.verification, bloomconv.inspection\n"
              f"d = {str(converted)!r}\n"
              "for _ in range(2):\n"
              "    assert bloomconv.verify(d).ok and bloomconv.inspect(d)['parameters'] > 0\n")
    subprocess.run([sys.executable, "-c", script], check=True)


def test_the_core_never_imports_the_runtime_or_the_converters():
    script = ("import sys, bloomconv.storage, bloomconv.kernels, bloomconv.settings, bloomconv.manifest, "
              "bloomconv.verification, bloomconv.inspection, bloomconv.recipes\n"
              "bad = sorted(m for m in sys.modules if m.startswith(('bloomconv.runtime', 'bloomconv.converters')))\n"
              "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", script], check=True)


# ------------------------------------------------------------------------- defaults, validation

def test_library_defaults_are_the_presets():
    for quant_type, preset in PRESETS.items():
        expected = {"quant_type": quant_type.value, **preset}
        if preset["embeddings"] == INT8_EMBEDDINGS:  # int8 embeddings take the int8 preset's scale source
            expected["int8_scale_from"] = PRESETS[QuantType.INT8]["int8_scale_from"]
        assert QuantSettings(quant_type).to_dict() == expected


@pytest.mark.parametrize("args, expected", [
    (["--bits", "8"], QuantSettings(QuantType.INT8)),
    (["--bits", "4"], QuantSettings(QuantType.NF4)),
    (["--bits", "4", "--quant-type", "fp4", "--block-size", "64", "--no-double-quant"],
     QuantSettings(QuantType.FP4, 64, False)),
])
def test_cli_and_library_store_the_same_settings(release_checkpoint, tmp_path, args, expected):
    result = CliRunner().invoke(main, ["quantize", "-q", *args, str(release_checkpoint), str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output
    options = {"bits": int(args[1])}
    if "--quant-type" in args:
        options.update(quant_type="fp4", block_size=64, double_quant=False)
    library = bloomconv.quantize(release_checkpoint, tmp_path / "lib", **options)
    assert read_manifest(tmp_path / "cli").quantization == library.quantization == expected


@pytest.mark.parametrize("args, message", [
    (["--recipe", "bloom-560m-nf4", "--quant-type", "fp4"], "quant type fp4 contradicts it"),
    (["--recipe", "bloom-560m-nf4", "--no-embeddings", "--int8-scale-from", "source"],
     "int8_scale_from applies to int8 only"),
    (["--recipe", "bloom-560m-int8", "--block-size", "64"], "block size applies to 4-bit"),
    (["--recipe", "bloom-560m-int8", "--bits", "8"], "either bits"),
    (["--bits", "8", "--quant-type", "nf4"], "does not go with 8 bits"),
    (["--bits", "8", "--double-quant"], "double quant applies to 4-bit"),
    (["--bits", "4", "--no-embeddings", "--int8-scale-from", "source"], "int8_scale_from applies to int8 only"),
    (["--bits", "4", "--embeddings", "--int8-scale-from", "source"], "int8_scale_from applies to int8 only"),
    (["--bits", "4", "--block-size", "48"], "block size 48 is not one bitsandbytes supports"),
    ([], "either bits"),
])
def test_every_option_combination_is_validated_before_reading(release_checkpoint, tmp_path, args, message):
    """Whatever the entry; the source here is not even bloom-560m: options are checked first."""
    result = CliRunner().invoke(main, ["quantize", *args, str(release_checkpoint), str(tmp_path / "x")])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "x").exists()


def test_library_validates_like_the_cli(release_checkpoint, tmp_path):
    with pytest.raises(OptionsError, match="contradicts"):
        bloomconv.quantize(release_checkpoint, tmp_path / "x", recipe="bloom-560m-nf4", quant_type="fp4")
    with pytest.raises(OptionsError, match="applies to int8 only"):
        bloomconv.quantize(release_checkpoint, tmp_path / "x", bits=4, embeddings=False, int8_scale_from="source")
    with pytest.raises(RecipeError, match="is for bloom-560m"):
        bloomconv.quantize(release_checkpoint, tmp_path / "x", recipe="bloom-560m-nf4", block_size=64)
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------------- exit codes

def test_one_table_maps_errors_to_exit_codes():
    assert exit_code(VerificationError("d", ["x"])) == 1
    assert exit_code(ManifestError("d", "gone")) == 2 and exit_code(OptionsError("x")) == 2
    assert EXIT_CODES[-1] == (BloomconvError, 2)


def test_verify_exits_1_through_the_table(converted_copy):
    (converted_copy / "final.safetensors").write_bytes(b"damaged")
    result = CliRunner().invoke(main, ["verify", "-q", str(converted_copy)])
    assert result.exit_code == 1 and "final.safetensors" in result.output


def test_recipes_command_goes_through_the_error_wrapper(monkeypatch):
    import bloomconv.recipes

    def broken():
        raise RecipeError("recipe file bloom-x.json is invalid. Reinstall bloomconv.")
    monkeypatch.setattr(bloomconv.recipes, "all_recipes", broken)
    result = CliRunner().invoke(main, ["recipes"])
    assert result.exit_code == 2 and "bloomconv: error: recipe file" in result.output
