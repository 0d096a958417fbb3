"""The quality benchmark's harness (bench/bench_quality.py) on two tiny random models: every figure
of its report is a measurement that can be reproduced from the stored files and the evaluator."""
import json
import math
import pydoc
import statistics
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

import bloomconv
from bloomconv.converters.trained_example import packaged_model

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))
import bench_quality  # noqa: E402
import quality_models  # noqa: E402

CTX = 32
CHARS = 4000


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    models = tmp_path_factory.mktemp("quality-models")
    text = pydoc.render_doc(json, renderer=pydoc.plaintext)
    for name, seed in (("tiny-a", 1), ("tiny-b", 2)):
        spec = quality_models.Outliers(name, (128, 2, 2, 4096), scale=8.0, channels=2, seed=seed)
        record = quality_models.build_outliers(spec, models / name, packaged_model() / "tokenizer.json", text)
        (models / name / quality_models.RECORD).write_text(json.dumps(record))
    schemes = [bench_quality.scheme(8, embeddings=True), bench_quality.scheme(4, "nf4", 64, False, False),
               bench_quality.scheme(4, "fp4", 128, True, False)]
    return models, bench_quality.run(models, ctx=CTX, chars=CHARS, chosen=schemes)


def _tensor_bytes(directory: Path) -> int:
    total = 0
    for path in directory.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            total += sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())
    return total


def test_sizes_are_the_stored_bytes(report, tmp_path):
    models, result = report
    row = result["models"]["tiny-a"]
    plain = bloomconv.convert(models / "tiny-a", tmp_path / "plain")
    parameters = sum(math.prod(t.shape) for f in plain.files for t in f.tensors)
    assert row["parameters"] == parameters
    assert row["schemes"]["bf16"]["bits_per_weight"] == 16.0
    baseline = bench_quality.BASELINE
    bloomconv.quantize(models / "tiny-a", tmp_path / "nf4", bits=4, quant_type="nf4", block_size=64,
                       double_quant=False, embeddings=False)
    stored = _tensor_bytes(tmp_path / "nf4")
    assert row["schemes"][baseline]["stored_bytes"] == stored
    assert row["schemes"][baseline]["bits_per_weight"] == pytest.approx(8 * stored / parameters)
    assert 4 < row["schemes"][baseline]["bits_per_weight"] < 16  # embeddings stay bf16
    assert row["schemes"]["int8+emb"]["bits_per_weight"] < row["schemes"][baseline]["bits_per_weight"] * 2


def test_agreement_is_what_the_evaluator_measures(report, tmp_path):
    from bloomconv.evaluation import evaluate
    models, result = report
    bloomconv.convert(models / "tiny-b", tmp_path / "plain")
    bloomconv.quantize(models / "tiny-b", tmp_path / "q", bits=4, quant_type="fp4", block_size=128, double_quant=True,
                       embeddings=False)
    text = (models / "tiny-b" / quality_models.HELDOUT_TEXT).read_text()[:CHARS]
    measured = evaluate(tmp_path / "q", text, ctx=CTX, reference=tmp_path / "plain")
    row = result["models"]["tiny-b"]["schemes"]["fp4-b128-dq"]
    assert row["kl_mean"] == pytest.approx(measured.kl_mean, rel=1e-6) and row["kl_mean"] > 0
    assert row["top1_agreement"] == pytest.approx(measured.top1_agreement, rel=1e-6)
    assert row["perplexity"] == pytest.approx(measured.perplexity.value, rel=1e-6)
    # 4-bit of weights with x8 outlier columns: a real error, far from both 0 and the weights' size
    assert 0.01 < row["rel_rms_mean"] <= row["rel_rms_max"] < 0.5
    int8 = result["models"]["tiny-b"]["schemes"]["int8+emb"]
    assert int8["rel_rms_max"] < row["rel_rms_max"] and int8["kl_mean"] < row["kl_mean"]


def test_aggregate_is_mean_and_worst_over_models(report):
    _, result = report
    for name, agg in result["aggregate"].items():
        kl = [m["schemes"][name]["kl_mean"] for m in result["models"].values()]
        top1 = [m["schemes"][name]["top1_agreement"] for m in result["models"].values()]
        assert agg["kl_mean_mean"] == pytest.approx(statistics.mean(kl)) and agg["kl_mean_worst"] == max(kl)
        assert agg["top1_agreement_worst"] == min(top1) and agg["kl_mean_models"] == 2
        assert "perplexity_delta_pct_mean" not in agg  # random models have no perplexity to speak of
    markdown = bench_quality.markdown(result)
    baseline = result["aggregate"][bench_quality.BASELINE]
    assert f"{baseline['kl_mean_worst']:.5f}" in markdown and "tiny-a" in markdown


def test_default_is_chosen_on_the_worst_model_not_the_mean():
    def model(kl_baseline, kl_other, bits=4.5):
        return {"kind": "outliers", "schemes": {
            bench_quality.BASELINE: {"kl_mean": kl_baseline, "bits_per_weight": 4.6},
            "nf4-b128-dq": {"kl_mean": kl_other, "bits_per_weight": bits}}}
    # better on average (0.06 vs 0.105) but worse on the second model: not chosen
    models = {"a": model(0.2, 0.1), "b": model(0.01, 0.02)}
    defaults = bench_quality.choose_defaults(models, bench_quality.aggregate(models))
    assert defaults["four_bit_choice"] == bench_quality.BASELINE
    failing = [c for c in defaults["four_bit_candidates"] if c["scheme"] == "nf4-b128-dq"]
    assert failing[0]["fails_on"] == ["b"]
    models = {"a": model(0.2, 0.1), "b": model(0.02, 0.02)}
    assert bench_quality.choose_defaults(models, bench_quality.aggregate(models))["four_bit_choice"] == "nf4-b128-dq"
    # a scheme that needs calibration text cannot be the preset: chosen separately
    defaults = bench_quality.choose_defaults(models, bench_quality.aggregate(models), frozenset({"nf4-b128-dq"}))
    assert (defaults["four_bit_choice"], defaults["four_bit_choice_calibrated"]) == (bench_quality.BASELINE,
                                                                                      "nf4-b128-dq")


def test_cached_measurements_are_reused_only_for_the_same_setup(report, tmp_path, monkeypatch):
    models, _ = report
    baseline = [bench_quality.scheme(4, "nf4", 64, False, False)]
    first = bench_quality.run(models, ctx=CTX, chars=CHARS, only=["tiny-a"], chosen=baseline, cache=tmp_path)

    def no_quantize(*args, **kwargs):
        raise AssertionError("measured again")
    monkeypatch.setattr(bench_quality.bloomconv, "quantize", no_quantize)
    again = bench_quality.run(models, ctx=CTX, chars=CHARS, only=["tiny-a"], chosen=baseline, cache=tmp_path)
    assert again["models"] == first["models"]
    with pytest.raises(AssertionError, match="measured again"):  # another text: measured anew
        bench_quality.run(models, ctx=CTX, chars=CHARS // 2, only=["tiny-a"], chosen=baseline, cache=tmp_path)


def test_bf16_prefill_rows_measure_running_the_same_files_another_way(report):
    models, _ = report
    baseline = next(s for s in bench_quality.schemes(True, ("rtn",)) if s.name == bench_quality.BASELINE)
    mixed, unquantized = bench_quality.with_bf16_prefill(baseline), bench_quality.with_bf16_prefill(None)
    ctx = 96  # windows over PREFILL_ROWS tokens, where prefill_dtype applies
    result = bench_quality.run(models, ctx=ctx, chars=CHARS, only=["tiny-a"], chosen=[baseline, mixed, unquantized])
    rows = result["models"]["tiny-a"]["schemes"]
    unquantized_mixed = rows["bf16+bf16-prefill"]["kl_mean"]  # exactly 0 were the products fp32's, as the reference
    assert unquantized_mixed != 0 and abs(unquantized_mixed) < 0.01 * rows[baseline.name]["kl_mean"]
    assert rows[mixed.name]["bits_per_weight"] == rows[baseline.name]["bits_per_weight"]  # the same files
    assert rows[mixed.name]["kl_mean"] != rows[baseline.name]["kl_mean"]
    assert {c["scheme"] for c in result["defaults"]["four_bit_candidates"]} == {baseline.name}
    assert result["presets"] == []
