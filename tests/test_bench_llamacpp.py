"""The llama.cpp baseline's output parsing (llama.cpp itself is optional and never run here)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
import llamacpp  # noqa: E402

# Lines as llama-perplexity (vendored in llama-cpp-python 0.3.36) printed them on this project's fixture.
PLAIN_RUN = """0.00.475.270 I perplexity: calculating perplexity over 40 chunks, n_ctx=128, batch_size=128, n_seq=1
[1]53.1997,[2]55.5394,[3]75.8987,
0.10.196.727 I Final estimate: PPL = 64.1384 +/- 3.26842
"""
KL_RUN_SHORT = """chunk             PPL               ln(PPL(Q)/PPL(base))          KL Divergence              Δp RMS            Same top p
  39      65.5351 ±    3.3894       0.00165 ±    0.00086       0.00094 ±    0.00001     0.519 ±  0.026 %    97.639 ±  0.306 %
  40      64.2341 ±    3.2708       0.00149 ±    0.00085       0.00093 ±    0.00001     0.517 ±  0.026 %    97.698 ±  0.299 %
"""
KL_SUMMARY = """====== Perplexity statistics ======
Mean PPL(Q)                   :  64.234126 ±   3.270829
Mean PPL(base)                :  64.138433 ±   3.268423
====== KL divergence statistics ======
Mean    KLD:   0.000932 ±   0.000015
Maximum KLD:   0.010803
====== Token probability statistics ======
Same top p: 97.698 ± 0.299 %
"""


def test_a_plain_run_gives_perplexity_and_its_error():
    assert llamacpp.parse_perplexity(PLAIN_RUN) == {"perplexity": (64.1384, 3.26842)}


def test_a_short_kl_run_is_read_from_its_last_row():
    figures = llamacpp.parse_perplexity(KL_RUN_SHORT)
    assert figures["perplexity"] == (64.2341, 3.2708)
    assert figures["kl_mean"] == (0.00093, 0.00001)
    assert figures["top1_agreement"] == (97.698, 0.299)


def test_a_kl_summary_wins_over_the_rows():
    figures = llamacpp.parse_perplexity(KL_RUN_SHORT.replace("0.00093 ±", "0.5 ±") + KL_SUMMARY)
    assert figures["kl_mean"] == (0.000932, 0.000015)
    assert figures["perplexity"] == (64.234126, 3.270829) and figures["perplexity_base"] == (64.138433, 3.268423)
    assert figures["kl_max"] == (0.010803, None)


def test_output_without_figures_is_an_error():
    with pytest.raises(RuntimeError, match="printed no figure"):
        llamacpp.parse_perplexity("llama_model_load: error loading model\n")


def test_find_ignores_a_tree_without_the_tools(tmp_path, monkeypatch):
    monkeypatch.setenv(llamacpp.ENV_TREE, str(tmp_path))
    monkeypatch.setattr(llamacpp, "CACHE", tmp_path / "cache")
    assert llamacpp.find() is None
    for tool in llamacpp.TOOLS:
        (tmp_path / "build" / "bin").mkdir(parents=True, exist_ok=True)
        (tmp_path / "build" / "bin" / tool).touch()
    assert llamacpp.find().tree == tmp_path
