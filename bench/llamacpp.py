"""llama.cpp as a same-machine baseline: find or build it, convert a checkpoint to GGUF, quantize
it, and run `llama-perplexity` (perplexity, KL divergence) and `llama-bench` (tokens/s).

Optional everywhere: benchmarks call `find()` and leave llama.cpp's rows out when it returns
None; nothing in the test suite or CI needs it.

    python bench/llamacpp.py build                      # ~10 min on 2 cores, into CACHE (with llama-batched-bench)
    python bench/llamacpp.py where                      # prints the folder found, or exits 1

Source: the llama.cpp tree vendored in the llama-cpp-python sdist (PyPI), built for the CPU
(`GGML_NATIVE=ON`). Its converter `convert_hf_to_gguf.py` runs in this project's environment with
one adjustment: a locally trained byte-level BPE tokenizer has a pre-tokenizer hash llama.cpp
does not list, and such tokenizers split text as its "gpt-2" pre-tokenizer does.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

SDIST = "llama-cpp-python==0.3.36"
CACHE = Path(os.environ.get("BLOOMCONV_BENCH_CACHE", Path.home() / ".cache" / "bloomconv-bench"))
ENV_TREE = "BLOOMCONV_LLAMA_CPP"  # a llama.cpp tree with build/bin, to use instead of CACHE's
TOOLS = ("llama-quantize", "llama-bench", "llama-perplexity")
BATCHED = "llama-batched-bench"  # batched decoding; built by `build()`, optional in a tree found
RUNS_FOR_COMPLETE_OUTPUT = 5
# Weight repacking puts Q4_0/Q8_0 matrices in the AMX buffer on CPUs with AMX, and the AMX
# matmul of the vendored tree crashes (SIGSEGV) on this machine's Xeon; repacking off = the
# AVX-512 kernels, which is also what CPUs without AMX run.
NO_AMX = ("--no-repack",)
NO_AMX_BENCH = ("--repack", "0")
# Run as `python -c` so that the converter's own imports resolve from the tree (argv: tree, args...).
_CONVERTER = """
import runpy, sys
tree = sys.argv[1]
sys.path[:0] = [tree, tree + "/gguf-py"]
import conversion.base as base
listed = base.TextModel.get_vocab_base_pre
def get_vocab_base_pre(self, tokenizer):
    try:
        return listed(self, tokenizer)
    except NotImplementedError:  # a tokenizer trained here: byte-level BPE, split like GPT-2
        return "gpt-2"
base.TextModel.get_vocab_base_pre = get_vocab_base_pre
sys.argv = [tree + "/convert_hf_to_gguf.py"] + sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@dataclass
class LlamaCpp:
    """A built llama.cpp tree."""
    tree: Path

    def tool(self, name: str) -> str:
        return str(self.tree / "build" / "bin" / name)

    def gguf(self, checkpoint: Path, out: Path, outtype: str = "bf16") -> Path:
        """`checkpoint` (a folder transformers loads as BloomForCausalLM: a Hub-style folder or the
        release's pickle shards) as GGUF; re-saved by transformers first, so that the converter
        finds the key spelling and config entries it expects."""
        with tempfile.TemporaryDirectory() as scratch:
            source = _resaved(checkpoint, Path(scratch))
            _run([sys.executable, "-c", _CONVERTER, str(self.tree), str(source), "--outtype", outtype,
                  "--outfile", str(out)])
        return out

    def quantize(self, gguf: Path, out: Path, kind: str, threads: int = 2) -> Path:
        """`kind`: Q8_0, Q4_0, Q4_K_M, ... (llama-quantize stores a tied output head as Q6_K)."""
        _run([self.tool("llama-quantize"), str(gguf), str(out), kind, str(threads)])
        return out

    def perplexity(self, gguf: Path, text: Path, ctx: int = 128, threads: int = 2, chunks: int | None = None,
                   save_logits: Path | None = None, kl_base: Path | None = None) -> dict:
        """llama-perplexity over `text` in `ctx`-token windows, the second half of each scored.
        `save_logits`: keep this model's logits as the base of a later KL run; `kl_base`: compare
        with such a file (KL divergence, top-1 agreement). Returns the figures it printed."""
        command = [self.tool("llama-perplexity"), "-m", str(gguf), "-f", str(text), "-c", str(ctx), "-b", str(ctx),
                   "-t", str(threads), *NO_AMX]
        if chunks:
            command += ["--chunks", str(chunks)]
        if save_logits:
            command += ["--kl-divergence-base", str(save_logits)]
        if kl_base:
            command = [c for c in command if c not in ("-f", str(text))]
            command += ["--kl-divergence-base", str(kl_base), "--kl-divergence"]
        # llama.cpp logs from a thread of its own and may exit before the last lines are written
        # (seen here: the summary, or even the final estimate, missing from a run that exited 0)
        for _ in range(RUNS_FOR_COMPLETE_OUTPUT):
            figures = parse_perplexity(_run(command))
            if ("kl_mean" if kl_base else "perplexity") in figures:
                return figures
        raise RuntimeError(f"llama-perplexity's output lacked its summary {RUNS_FOR_COMPLETE_OUTPUT} times: "
                           + " ".join(command))

    def tensor_sizes(self, path: Path) -> dict[str, tuple[int, int]]:
        """{tensor name: (elements, bytes)} of a GGUF (its metadata, e.g. the vocabulary, left
        out), read with the tree's own gguf-py (this project does not depend on it)."""
        sys.path.insert(0, str(self.tree / "gguf-py"))
        try:
            import gguf
            return {t.name: (int(t.n_elements), int(t.n_bytes)) for t in gguf.GGUFReader(str(path)).tensors}
        finally:
            sys.path.remove(str(self.tree / "gguf-py"))

    def batched_decode(self, gguf: Path, batch: int, prompt_tokens: int, new_tokens: int,
                       threads: int = 2) -> float | None:
        """Decoding tokens/s over `batch` sequences at once (each its own `prompt_tokens`-token
        prompt, then `new_tokens` steps), from llama-batched-bench (its S_TG, after its warm-up);
        None where the tree lacks the tool."""
        if not Path(self.tool(BATCHED)).exists():
            return None
        out = _run([self.tool(BATCHED), "-m", str(gguf), "-c", str(batch * (prompt_tokens + new_tokens)),
                    "-b", "2048", "-ub", "512", "-npp", str(prompt_tokens), "-ntg", str(new_tokens),
                    "-npl", str(batch), "-t", str(threads), "--output-format", "jsonl", *NO_AMX])
        rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        speeds = [row["speed_tg"] for row in rows if row.get("pl") == batch]
        if not speeds:
            raise RuntimeError(f"{BATCHED} printed no row for {batch} sequences:\n{out[-2000:]}")
        return float(speeds[-1])

    def bench(self, gguf: Path, prompt_tokens: int, new_tokens: int, threads: int = 2, repeats: int = 3) -> float:
        """Tokens/s from llama-bench (`-p prompt_tokens -n new_tokens`, one of them 0)."""
        out = _run([self.tool("llama-bench"), "-m", str(gguf), "-t", str(threads), "-p", str(prompt_tokens),
                    "-n", str(new_tokens), "-r", str(repeats), "-o", "json", *NO_AMX_BENCH])
        return float(json.loads(out)[0]["avg_ts"])


_FIGURES = {
    "perplexity": r"Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)",
    "perplexity_q": r"Mean PPL\(Q\)\s*: *([\d.]+) ± *([\d.]+)",
    "perplexity_base": r"Mean PPL\(base\)\s*: *([\d.]+) ± *([\d.]+)",
    "kl_mean": r"Mean    KLD: *([\d.]+) ± *([\d.]+)",
    "kl_max": r"Maximum KLD: *([\d.]+)()",
    "top1_agreement": r"Same top p: *([\d.]+) ± *([\d.]+) %",
}


def parse_perplexity(output: str) -> dict:
    """The figures llama-perplexity printed: {name: (value, standard error)}; top-1 agreement in
    % as printed; empty when it printed none."""
    found = {}
    for name, pattern in _FIGURES.items():
        match = re.search(pattern, output)
        if match:
            found[name] = (float(match.group(1)), float(match.group(2)) if match.group(2) else None)
    if "perplexity_q" in found:
        found["perplexity"] = found.pop("perplexity_q")
    return found


def find() -> LlamaCpp | None:
    """The llama.cpp build named by $BLOOMCONV_LLAMA_CPP, else the one `build()` made, else None."""
    for tree in (os.environ.get(ENV_TREE), _cached_tree()):
        if tree and all((Path(tree) / "build" / "bin" / tool).exists() for tool in TOOLS):
            return LlamaCpp(Path(tree))
    return None


def build(jobs: int = 2) -> LlamaCpp:
    """Download llama-cpp-python's sdist (pip), unpack its vendored llama.cpp into CACHE, build
    the three tools for this CPU."""
    CACHE.mkdir(parents=True, exist_ok=True)
    download = CACHE / "sdist"
    _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SDIST, "-d", str(download)])
    archive = next(download.glob("llama_cpp_python-*.tar.gz"))
    with tarfile.open(archive) as tar:
        tar.extractall(CACHE, filter="data")
    tree = _cached_tree()
    _run(["cmake", "-S", str(tree), "-B", str(tree / "build"), "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
          "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF",
          "-DBUILD_SHARED_LIBS=OFF"])
    _run(["cmake", "--build", str(tree / "build"), f"-j{jobs}", "--target", *TOOLS, BATCHED])
    return LlamaCpp(tree)


def _cached_tree() -> Path | None:
    trees = sorted(CACHE.glob("llama_cpp_python-*/vendor/llama.cpp"))
    return trees[-1] if trees else None


def _resaved(checkpoint: Path, scratch: Path) -> Path:
    """The checkpoint as transformers saves it (prefixed keys, safetensors) plus its tokenizer."""
    import torch
    import transformers
    model = transformers.BloomForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16)
    model.save_pretrained(scratch)
    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    tokenizer.save_pretrained(scratch)
    return scratch


def _run(command: list[str]) -> str:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{Path(command[0]).name} exited {done.returncode}:\n{(done.stdout + done.stderr)[-3000:]}")
    return done.stdout + done.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("build", "where"))
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    found = find() if args.action == "where" else build(args.jobs)
    if found is None:
        sys.exit(f"no llama.cpp build: run `python {sys.argv[0]} build` or set ${ENV_TREE}")
    print(found.tree)


if __name__ == "__main__":
    main()
