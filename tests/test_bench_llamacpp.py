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


def test_a_kl_run_is_read_from_its_summary_not_its_running_rows():
    figures = llamacpp.parse_perplexity(KL_RUN_SHORT + KL_SUMMARY)
    assert figures["kl_mean"] == (0.000932, 0.000015)
    assert figures["perplexity"] == (64.234126, 3.270829) and figures["perplexity_base"] == (64.138433, 3.268423)
    assert figures["kl_max"] == (0.010803, None)


def test_a_run_whose_log_lost_its_summary_is_run_again(monkeypatch, tmp_path):
    outputs = iter([KL_RUN_SHORT, "system_info: n_threads = 1\n", KL_RUN_SHORT + KL_SUMMARY])
    monkeypatch.setattr(llamacpp, "_run", lambda command: next(outputs))
    llama = llamacpp.LlamaCpp(tmp_path)
    figures = llama.perplexity(tmp_path / "q.gguf", tmp_path / "t.txt", kl_base=tmp_path / "b.kld")
    assert figures["kl_mean"] == (0.000932, 0.000015)


def test_a_run_that_never_prints_its_summary_is_an_error(monkeypatch, tmp_path):
    monkeypatch.setattr(llamacpp, "_run", lambda command: KL_RUN_SHORT)
    with pytest.raises(RuntimeError, match="lacked its summary"):
        llamacpp.LlamaCpp(tmp_path).perplexity(tmp_path / "q.gguf", tmp_path / "t.txt")


def test_find_ignores_a_tree_without_the_tools(tmp_path, monkeypatch):
    monkeypatch.setenv(llamacpp.ENV_TREE, str(tmp_path))
    monkeypatch.setattr(llamacpp, "CACHE", tmp_path / "cache")
    assert llamacpp.find() is None
    for tool in llamacpp.TOOLS:
        (tmp_path / "build" / "bin").mkdir(parents=True, exist_ok=True)
        (tmp_path / "build" / "bin" / tool).touch()
    assert llamacpp.find().tree == tmp_path


# A line as llama-batched-bench --output-format jsonl prints it (its format string, vendored tree).
BATCHED_RUN = """llama_context: n_ctx = 512
main: n_kv_max = 512, n_batch = 2048, n_ubatch = 512, flash_attn = -1, is_pp_shared = 0, n_gpu_layers = -1
{"n_kv_max": 512, "n_batch": 2048, "n_ubatch": 512, "flash_attn": -1, "is_pp_shared": 0, "n_gpu_layers": -1, \
"n_threads": 2, "n_threads_batch": 2, "pp": 16, "tg": 16, "pl": 16, "n_kv": 512, "t_pp": 0.912000, \
"speed_pp": 280.701752, "t_tg": 1.870000, "speed_tg": 136.898392, "t": 2.782000, "speed": 184.040253}
"""


def test_batched_decoding_speed_is_its_s_tg_for_that_batch(monkeypatch, tmp_path):
    llama = llamacpp.LlamaCpp(tmp_path)
    assert llama.batched_decode(tmp_path / "q.gguf", 16, 16, 16) is None  # a tree built without the tool
    (tmp_path / "build" / "bin").mkdir(parents=True)
    (tmp_path / "build" / "bin" / llamacpp.BATCHED).touch()
    commands = []
    monkeypatch.setattr(llamacpp, "_run", lambda command: commands.append(command) or BATCHED_RUN)
    assert llama.batched_decode(tmp_path / "q.gguf", 16, 16, 16) == pytest.approx(136.898392)
    assert commands[0][commands[0].index("-npl") + 1] == "16" and commands[0][commands[0].index("-c") + 1] == "512"
    with pytest.raises(RuntimeError, match="no row for 8 sequences"):
        llama.batched_decode(tmp_path / "q.gguf", 8, 16, 16)
