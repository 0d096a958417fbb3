"""`bloomconv eval` / `bloomconv.evaluation`: llama-perplexity's protocol on the runtime, checked against
transformers' BloomForCausalLM on the same (dequantized) weights; bits per weight; bitsandbytes' CPU
mis-decode of 4-bit rows that the block size does not divide, and the warning pinned to it."""
from __future__ import annotations

import json
import math
import statistics
import warnings

import pytest
import torch
from click.testing import CliRunner

import bloomconv
from bloomconv.cli import main
from bloomconv.converters.example import TRAINED, write_example_checkpoint
from bloomconv.errors import BloomconvWarning, OptionsError
from bloomconv.evaluation import compare, evaluate, mean_and_stderr, perplexity, tokens_of, windows_for
from bloomconv.format import SAFETENSORS_DTYPES
from bloomconv.inspection import bitsandbytes_cpu_misdecodes, bits_per_weight, inspect
from bloomconv.manifest import read_manifest

from .conftest import load_dequantized


# ----------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def int8_dir(converted, tmp_path_factory):
    dst = tmp_path_factory.mktemp("eval-int8") / "int8"
    bloomconv.quantize(converted, dst, bits=8)
    return dst


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The trained example model (it has a tokenizer), converted, and a held-out-ish text."""
    root = tmp_path_factory.mktemp("eval-trained")
    src = write_example_checkpoint(root / "src", TRAINED)
    bloomconv.convert(src, root / "dst")
    text = root / "text.txt"
    text.write_text("The os module provides a portable way of using operating system dependent functionality. "
                    "If you just want to read or write a file see open(), if you want to manipulate paths, see "
                    "the os.path module, and if you want to read all the lines in all the files on the command "
                    "line see the fileinput module. For creating temporary files and directories see the "
                    "tempfile module, and for high-level file and directory handling see the shutil module.\n",
                    encoding="utf-8")
    return root, text


def reference_model(directory):
    """transformers' BloomForCausalLM on the directory's weights, dequantized to fp32."""
    from transformers import BloomConfig, BloomForCausalLM
    model = BloomForCausalLM(BloomConfig.from_pretrained(directory)).eval()
    state = {name: t.float() for name, t in load_dequantized(directory).items()}
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    return model.float()


def reference_log_probs(model, ids: torch.Tensor, ctx: int) -> list[torch.Tensor]:
    """Per window of `ctx`: log-probabilities (ctx - 1 - ctx//2, V) of the positions that predict
    the second half, from one transformers forward pass of the window (a hand loop of the protocol)."""
    out = []
    with torch.no_grad():
        for start in range(0, ids.numel() - ctx + 1, ctx):
            logits = model(ids[start:start + ctx][None]).logits[0].double()
            out.append(torch.log_softmax(logits, -1)[ctx // 2:ctx - 1])
    return out


def random_ids(n: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(vocab, (n,), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------- statistics

def test_stderr_is_llama_perplexity_formula_on_a_hand_example():
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0])
    mean, stderr = mean_and_stderr(values)
    # llama-perplexity: sqrt((mean(x^2) - mean(x)^2) / (n - 1)); = sample stdev / sqrt(n)
    by_hand = math.sqrt(((1 + 4 + 9 + 16 + 100) / 5 - 4.0 ** 2) / 4)
    assert mean == 4.0
    assert stderr == pytest.approx(by_hand, rel=1e-12)
    assert stderr == pytest.approx(statistics.stdev([1, 2, 3, 4, 10]) / math.sqrt(5), rel=1e-12)
    assert math.isnan(mean_and_stderr(torch.tensor([2.0]))[1])


def test_windows_follow_the_protocol_and_clamp_with_a_message():
    said = []
    assert windows_for(1000, 128) == (128, 7)                     # the tail of 104 tokens is left out
    assert windows_for(100, 512, log=said.append) == (100, 1)
    assert "100 tokens" in said[-1] and "512" in said[-1]
    assert windows_for(5000, 4096, model_max=2048, log=said.append) == (2048, 2)
    assert "2048" in said[-1]
    with pytest.raises(OptionsError, match="at least 4"):
        windows_for(1000, 3)
    with pytest.raises(OptionsError, match="Give a longer text"):
        windows_for(3, 512)


# ------------------------------------------------------------------- perplexity and KL vs transformers

@pytest.mark.parametrize("ctx", [16, 15])
def test_perplexity_equals_a_direct_computation_with_transformers(int8_dir, ctx):
    ids = random_ids(100, 512)
    with bloomconv.load(int8_dir) as model:
        result = perplexity(model, ids, ctx=ctx)
    windows = reference_log_probs(reference_model(int8_dir), ids, ctx)
    nll = torch.cat([-lp.gather(1, ids[i * ctx + ctx // 2 + 1:(i + 1) * ctx, None])[:, 0]
                     for i, lp in enumerate(windows)])
    assert (result.windows, result.tokens_scored, result.ctx) == (100 // ctx, nll.numel(), ctx)
    assert result.tokens_scored == (100 // ctx) * (ctx - 1 - ctx // 2)
    assert result.nll_mean == pytest.approx(nll.mean().item(), rel=1e-4)
    assert result.value == pytest.approx(math.exp(nll.mean().item()), rel=1e-4)
    expected_stderr = math.exp(nll.mean().item()) * nll.std().item() / math.sqrt(nll.numel())
    assert result.stderr == pytest.approx(expected_stderr, rel=1e-3)


def test_a_directory_against_itself_has_zero_kl_and_full_agreement(converted):
    ids = random_ids(96, 512, seed=1)
    with bloomconv.load(converted) as model, bloomconv.load(converted) as again:
        result = compare(model, again, ids, ctx=32)
    assert result.kl_mean == pytest.approx(0, abs=1e-9) and result.kl_max == pytest.approx(0, abs=1e-7)
    assert result.top1_agreement == 100.0
    assert result.perplexity == result.reference_perplexity
    assert result.tokens_scored == 3 * 15


@pytest.fixture(scope="module")
def trained_quantized(trained):
    root, _ = trained
    for name, options in (("int8", {"bits": 8}), ("nf4", {"bits": 4, "block_size": 64})):
        if not (root / name).exists():
            bloomconv.quantize(root / "dst", root / name, **options)
    return root


@pytest.mark.parametrize("scheme, kl_tolerance", [("int8", 2e-6), ("nf4", 1e-5)])
def test_kl_against_a_quantized_directory_equals_a_direct_computation(trained, trained_quantized, scheme,
                                                                      kl_tolerance):
    root, text = trained
    ctx = 32
    with bloomconv.load(root / scheme) as model, bloomconv.load(root / "dst") as reference:
        ids = tokens_of(reference, text.read_text())
        result = compare(model, reference, ids, ctx=ctx)
    quantized = reference_log_probs(reference_model(root / scheme), ids, ctx)
    unquantized = reference_log_probs(reference_model(root / "dst"), ids, ctx)
    kl = torch.cat([(r.exp() * (r - q)).sum(-1) for r, q in zip(unquantized, quantized)])
    same = torch.cat([r.argmax(-1) == q.argmax(-1) for r, q in zip(unquantized, quantized)])
    assert result.tokens_scored == kl.numel() == (ids.numel() // ctx) * (ctx - 1 - ctx // 2)
    # both sides compute in float32: the KL of each token agrees to ~1e-6 nats
    assert 0 < result.kl_mean < (0.001 if scheme == "int8" else 0.05)
    assert result.kl_mean == pytest.approx(kl.mean().item(), abs=kl_tolerance)
    assert result.kl_max == pytest.approx(kl.max().item(), abs=10 * kl_tolerance)
    assert result.kl_stderr == pytest.approx(kl.std().item() / math.sqrt(kl.numel()), rel=0.05)
    assert result.top1_agreement == pytest.approx(100 * same.double().mean().item())
    assert 80 < result.top1_agreement <= 100
    with bloomconv.load(root / "dst") as reference:
        assert result.reference_perplexity == perplexity(reference, ids, ctx=ctx)


def test_a_reference_of_another_geometry_is_refused(converted, trained):
    root, _ = trained
    with bloomconv.load(root / "dst") as model, bloomconv.load(converted) as other:
        with pytest.raises(OptionsError, match="another model"):
            compare(model, other, random_ids(64, 512), ctx=32)


def test_tokens_of_takes_a_model_or_a_tokenizer(trained):
    root, text = trained
    with bloomconv.load(root / "dst") as model:
        ids = tokens_of(model, text.read_text())
        assert ids.dtype == torch.long and ids.dim() == 1 and ids.numel() > 50
        assert torch.equal(tokens_of(model.tokenizer, text.read_text()), ids)
        assert torch.equal(tokens_of(model.tokenizer.backend, text.read_text()), ids)


# ------------------------------------------------------------------------------------- CLI

def test_cli_eval_text_and_json(trained):
    root, text = trained
    runner = CliRunner()
    plain = runner.invoke(main, ["eval", str(root / "dst"), "--text", str(text), "--ctx", "32", "-q"])
    assert plain.exit_code == 0, plain.output
    assert "perplexity" in plain.output and "±" in plain.output
    result = runner.invoke(main, ["eval", str(root / "dst"), "--text", str(text), "--ctx", "32",
                                  "--reference", str(root / "dst"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["kl_mean"] == pytest.approx(0, abs=1e-9) and report["top1_agreement"] == 100.0
    assert report["perplexity"]["windows"] >= 2 and report["perplexity"]["value"] > 1
    assert report["perplexity"] == report["reference_perplexity"]


def test_evaluate_measures_with_fp32_products_where_the_runtime_would_take_bf16(trained, monkeypatch):
    from bloomconv import runtime
    from bloomconv.runtime import model as model_module
    monkeypatch.setattr(model_module, "default_prefill_dtype", lambda *args: torch.bfloat16)  # a bf16 CPU
    loaded, load = [], runtime.load

    def recording(*args, **kwargs):
        model = load(*args, **kwargs)
        loaded.append(model.transformer.prefill_dtype)
        return model
    monkeypatch.setattr(runtime, "load", recording)
    root, text = trained
    with runtime.load(root / "dst") as default:
        assert default.transformer.prefill_dtype == torch.bfloat16  # the runtime's default here
    loaded.clear()
    evaluate(root / "dst", text, reference=root / "dst", ctx=32)
    assert loaded == [torch.float32, torch.float32]


def test_cli_eval_errors_are_one_line_with_exit_code_2(trained, converted, tmp_path):
    root, text = trained
    runner = CliRunner()
    missing = runner.invoke(main, ["eval", str(root / "dst"), "--text", str(tmp_path / "nothing.txt")])
    assert missing.exit_code == 2 and "no such text file" in missing.output
    other = runner.invoke(main, ["eval", str(root / "dst"), "--text", str(text), "--reference", str(converted),
                                 "--json"])
    assert other.exit_code == 2
    assert "another model" in json.loads(other.output)["message"]
    short = tmp_path / "short.txt"
    short.write_text("a", encoding="utf-8")
    too_short = runner.invoke(main, ["eval", str(root / "dst"), "--text", str(short)])
    assert too_short.exit_code == 2 and "longer text" in too_short.output


# --------------------------------------------------------------------------- bits per weight

def test_bits_per_weight_counts_every_tensor_over_the_parameters(converted, int8_dir):
    from safetensors import safe_open
    for directory in (converted, int8_dir):
        manifest = read_manifest(directory)
        stored = 0
        for entry in manifest.files:
            if entry.tensors:
                with safe_open(directory / entry.name, "pt") as f:
                    stored += sum(f.get_tensor(k).nbytes for k in f.keys())
        info = inspect(directory)
        assert info["bits_per_weight"] == pytest.approx(8 * stored / info["parameters"])
        assert info["size_ratio_to_16bit"] == info["total_bytes"] / (2 * info["parameters"])
    assert inspect(converted)["bits_per_weight"] == 16.0          # bf16 source, nothing quantized
    assert 8 < inspect(int8_dir)["bits_per_weight"] < 16           # int8 blocks + 16-bit embeddings/norms
    assert all(code in SAFETENSORS_DTYPES for f in read_manifest(int8_dir).files for code in
               (t.dtype for t in f.tensors))


def test_inspect_and_quantize_print_bits_per_weight(converted, tmp_path):
    runner = CliRunner()
    shown = runner.invoke(main, ["inspect", str(converted)])
    assert shown.exit_code == 0 and "16.00 bits per weight" in shown.output
    quantized = runner.invoke(main, ["quantize", str(converted), str(tmp_path / "q"), "--bits", "8", "-q"])
    assert quantized.exit_code == 0, quantized.output
    expected = bits_per_weight(read_manifest(tmp_path / "q"))
    assert f"{expected:.2f} bits per weight" in quantized.output and "of its 16-bit size" in quantized.output


# ------------------------------------------------- bitsandbytes' CPU mis-decode and the warning

def _cpu_has_avx512f() -> bool:
    """bitsandbytes' CPU library picks its AVX-512 kernel from the CPU's features at run time."""
    try:
        with open("/proc/cpuinfo") as f:
            return " avx512f" in f.read()
    except OSError:
        return torch.backends.cpu.get_cpu_capability() == "AVX512"


@pytest.mark.parametrize("rows, cols, block", [
    (64, 320, 128), (32, 96, 64), (5, 192, 128), (3, 64, 128), (4, 160, 64),    # block does not divide rows
    (64, 256, 128), (32, 96, 32), (16, 128, 64),                                 # it divides them
    (1, 320, 128), (2, 64, 128), (7, 100, 64), (10, 50, 64), (4, 320, 2048),     # other kernels, or one block
])
def test_bitsandbytes_cpu_decode_is_wrong_exactly_where_the_warning_says(rows, cols, block):
    import bitsandbytes.functional as F

    from bloomconv.storage.fourbit import quantize_4bit
    from bloomconv.storage.fourbit import dequantize_4bit as bloomconv_dequantize
    weight = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows * cols + block))
    packed, state = F.quantize_4bit(weight, blocksize=block, quant_type="nf4", compress_statistics=False)
    ours = quantize_4bit(weight, "nf4", block, False)
    assert torch.equal(ours["weight"].view(-1), packed.view(-1))               # the same stored bytes
    decoded_by_bitsandbytes = F.dequantize_4bit(packed, state)
    decoded_by_bloomconv = bloomconv_dequantize(ours)
    # what the stored bytes mean: code[q] * the absmax of the element's block of the flattened weight
    codes = torch.stack([packed.view(-1) >> 4, packed.view(-1) & 15], 1).view(-1)[:rows * cols].long()
    meant = (state.code[codes] * state.absmax.repeat_interleave(block)[:rows * cols]).view(rows, cols)
    assert torch.equal(decoded_by_bloomconv, meant)
    wrong = not torch.equal(decoded_by_bitsandbytes, meant)
    assert wrong == (bitsandbytes_cpu_misdecodes((rows, cols), block) and _cpu_has_avx512f())
    if wrong:  # not a rounding detail: a weight of the wrong scale
        error = (decoded_by_bitsandbytes - weight).norm() / weight.norm()
        assert error > 1.5 * (decoded_by_bloomconv - weight).norm() / weight.norm()


def test_quantize_and_inspect_warn_where_bitsandbytes_would_misdecode(trained, tmp_path):
    root, _ = trained   # hidden 192: rows of 192 at block 128 (the preset) are mis-decoded, at 64 not
    runner = CliRunner()
    bad = runner.invoke(main, ["quantize", str(root / "dst"), str(tmp_path / "b128"), "--bits", "4",
                               "--block-size", "128", "-q"])
    assert bad.exit_code == 0, bad.output
    warnings = [line for line in bad.output.splitlines() if "warning" in line]
    assert len(warnings) == 1
    assert "192" in warnings[0] and "--block-size 64" in warnings[0] and "bloomconv's runtime" in warnings[0]
    assert "mlp.dense_4h_to_h" not in warnings[0]       # its rows (768) are a multiple of 128
    assert "self_attention.query_key_value.weight (576x192)" in warnings[0]
    assert inspect(tmp_path / "b128")["warnings"] == [warnings[0].split(": ", 3)[-1]]
    shown = runner.invoke(main, ["inspect", str(tmp_path / "b128")])
    assert shown.exit_code == 0 and "--block-size 64" in shown.output
    good = runner.invoke(main, ["quantize", str(root / "dst"), str(tmp_path / "b64"), "--bits", "4",
                                "--block-size", "64", "-q"])
    assert good.exit_code == 0 and "warning" not in good.output
    assert inspect(tmp_path / "b64")["warnings"] == []


def test_the_library_warns_where_bitsandbytes_would_misdecode(trained, tmp_path):
    root, _ = trained
    with pytest.warns(BloomconvWarning, match=r"576x192.*--block-size 64") as caught:
        bloomconv.quantize(root / "dst", tmp_path / "b128", bits=4, block_size=128)
    assert len(caught) == 1 and str(tmp_path / "b128") in str(caught[0].message)
    with pytest.warns(BloomconvWarning):  # and again for a finished directory
        bloomconv.quantize(root / "dst", tmp_path / "b128", bits=4, block_size=128)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bloomconv.quantize(root / "dst", tmp_path / "b64", bits=4, block_size=64)
