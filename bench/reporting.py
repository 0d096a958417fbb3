"""The drawing half of `python -m bench`: a run's results (bench/runs.py's JSON) as a markdown report
and PNG plots. It formats and draws what the run's summary holds and computes no figure, so it can
be re-run on saved results (`python -m bench --report-only RESULTS.json`).

matplotlib (the `bench` extra) is imported here, lazily, never by the package.
"""
from __future__ import annotations

import json
from pathlib import Path

from bloomconv.atomic import atomic_file, atomic_write_bytes

__all__ = ["num", "write_report"]

RESULTS = "results.json"
REPORT = "README.md"


def num(value) -> str:
    """Every figure of the report is printed by this one function (the tests rely on it)."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return str(value)
    if value == 0:
        return "0"
    if abs(value) >= 1000:
        return f"{value:.0f}"
    if abs(value) < 0.01:
        return f"{value:.2e}"
    return f"{value:.3g}"


def _spread(s: dict) -> str:
    return f"{num(s['median'])} ({num(s['min'])}–{num(s['max'])})"


def _cell(value) -> str:
    """A figure (a number, or a spread: median (min–max)), text as it is, nothing for None."""
    if value is None:
        return ""
    if isinstance(value, dict):
        return _spread(value)
    return value if isinstance(value, str) else num(value)


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(_cell(v) for v in row) + " |" for row in rows)]


def machine_line(results: dict) -> str:
    m = results["summary"]["machine"]
    disk = m["disk_gb_per_s"]
    disk_text = (", ".join(f"{k} {num(v)}" for k, v in disk.items()) + " GB/s" if disk
                 else "not measured in this run (it needs root, to drop the page cache)")
    return (f"{m['cpu']}, {num(m['cores'])} cores ({num(m['threads'])} threads used), {num(m['memory_gb'])} GB RAM; "
            f"memory bandwidth {_spread(m['memory_gb_per_s'])} GB/s; disk read {disk_text}")


def write_report(results: dict, out: Path) -> list[Path]:
    """`out`/README.md and one PNG per section measured; `out`/results.json keeps the data (each
    file replaced whole). Returns the files written. A saved run, drawn again:

        write_report(json.loads(Path("bench/report/results.json").read_text()), Path("/tmp/report"))
    """
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / RESULTS, json.dumps(results, indent=1).encode())
    import matplotlib
    matplotlib.use("Agg")
    footer = (f"{results['date']} · {results['commit']} · {machine_line(results)}\n`{results['command']}`")
    s = results["summary"]
    md = ["# bloomconv benchmarks", "",
          f"- date: {results['date']}", f"- commit: {results['commit']}", f"- machine: {machine_line(results)}",
          f"- load average: {num(results['load_before'])} before, {num(results['load_after'])} after",
          f"- command: `{results['command']}`", "",
          "Every figure below was measured in this run; a ratio is taken per round against the baseline measured "
          "in the same round; values are medians of the runs, with the spread (min–max) in brackets.", ""]
    for name, reason in results.get("skipped", {}).items():
        md += [f"*{name}: not measured in this run ({reason}).*", ""]
    written = [out / RESULTS]
    sections = [("conversion", _conversion), ("runtime", _runtime), ("larger", _larger), (None, _memory),
                ("quality", _quality), ("slice176b", _slice)]
    for key, section in sections:
        if key is None or key in s:
            lines, figures = section(results, s, out, footer)
            md += lines
            written += figures
    atomic_write_bytes(out / REPORT, ("\n".join(md) + "\n").encode())
    return [out / REPORT, *written]


def _figure(path: Path, fig, footer: str) -> Path:
    fig.text(0.01, 0.005, footer, fontsize=6, va="bottom", wrap=True)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    with atomic_file(path) as f:
        fig.savefig(f, dpi=110, format="png")
    import matplotlib.pyplot as plt
    plt.close(fig)
    return path


def _errors(spreads: list[dict]):
    return [[x["median"] - x["min"] for x in spreads], [x["max"] - x["median"] for x in spreads]]


# ------------------------------------------------------------------------------ sections

def _conversion(results, s, out, footer):
    import matplotlib.pyplot as plt
    sizes = s["conversion"]
    fig, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 4), squeeze=False)
    md = ["## Conversion and quantization against the disk copy", "",
          "Wall time of `bloomconv convert` / `quantize` (process start to exit, page cache warm) against "
          "`cp -r` + `sync` of the same source in the same round.", ""]
    rows = []
    for ax, size in zip(axes[0], sizes):
        names = list(size["schemes"])
        seconds = [size["schemes"][n]["seconds"] for n in names]
        ax.bar(names, [x["median"] for x in seconds], yerr=_errors(seconds), capsize=4, color="tab:blue")
        ax.axhline(size["copy_seconds"]["median"], color="black", linestyle="--", label="cp -r + sync (disk copy)")
        for i, n in enumerate(names):
            ax.annotate(f"{num(size['schemes'][n]['ratio_to_copy']['median'])}× copy", (i, seconds[i]["max"]),
                        xytext=(0, 4), textcoords="offset points", ha="center", va="bottom", fontsize=8)
        ax.set_title(f"{tuple(size['geometry'])}, {num(size['source_gb'])} GB")
        ax.set_ylabel("seconds (median, min–max)")
        ax.legend(fontsize=8)
        geometry = ", ".join(map(num, size["geometry"]))
        rows.append([geometry, size["source_gb"], "`cp -r` + `sync`", size["copy_seconds"], None, None, None])
        rows += [[geometry, size["source_gb"], n, r["seconds"], r["ratio_to_copy"], r["output_gb"],
                  r["peak_rss_anon_gb"]] for n, r in size["schemes"].items()]
    md += _table(["geometry (hidden, blocks, heads, vocab)", "source GB", "scheme", "seconds", "÷ copy", "output GB",
                  "peak RssAnon GB"], rows)
    path = _figure(out / "conversion.png", fig, footer)
    return md + ["", f"![conversion and quantization time]({path.name})", ""], [path]


def _runtime(results, s, out, footer):
    import matplotlib.pyplot as plt
    r = s["runtime"]
    formats = r["formats"]
    batches = sorted({b for f in formats.values() for b in f["decode"]}, key=int)
    lengths = sorted({n for f in formats.values() for n in f["prefill"]}, key=int)
    fig, axes = plt.subplots(1, len(batches) + 1, figsize=(5.5 * (len(batches) + 1), 4.5), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        labels = [label for label in formats if batch in formats[label]["decode"]]
        d = [formats[label]["decode"][batch] for label in labels]
        y = range(len(labels))
        ax.barh(y, [x["tokens_per_s"]["median"] for x in d], xerr=_errors([x["tokens_per_s"] for x in d]),
                capsize=3, color=["tab:orange" if label.startswith("llama") else "tab:gray"
                                  if label.startswith("transformers") else "tab:blue" for label in labels])
        ax.scatter([x["bound_tokens_per_s"]["median"] for x in d], y, marker="|", s=200, color="black",
                   label="memory-bandwidth bound", zorder=3)
        ax.set_yticks(list(y), labels, fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel("tokens/s (median, min–max)")
        ax.set_title(f"decode, batch {batch}")
        ax.legend(fontsize=7)
    ax = axes[0][-1]
    width = 0.8 / max(len(lengths), 1)
    labels = list(formats)
    for i, length in enumerate(lengths):
        have = [label for label in labels if length in formats[label]["prefill"]]
        p = [formats[label]["prefill"][length]["tokens_per_s"] for label in have]
        ax.barh([labels.index(label) + i * width for label in have], [x["median"] for x in p], height=width,
                xerr=_errors(p), capsize=2, label=f"prompt of {length} tokens")
    ax.set_yticks([i + (len(lengths) - 1) * width / 2 for i in range(len(labels))], labels, fontsize=7)
    ax.set_xlabel("tokens/s (median, min–max)")
    ax.set_title("prefill")
    ax.legend(fontsize=7)
    path = _figure(out / "decode.png", fig, footer)

    md = ["## Decode and prefill against the memory-bandwidth bound", "",
          f"Geometry {tuple(r['geometry'])}, weights in the page cache, memory bandwidth measured before every "
          f"run: {_spread(r['memory_gb_per_s'])} GB/s. Bound = batch × bandwidth ÷ weight bytes read per token, "
          f"per run against the bandwidth measured next to it. Baseline: {r['baseline'] or 'none'}, same rounds.", ""]
    md += _table(["format", "GB per token", "batch", "tokens/s", "% of bound", "÷ baseline"],
                 [[label, f["weight_gb_per_token"], batch, d["tokens_per_s"], d["percent_of_bound"],
                   d.get("ratio_to_transformers")] for label, f in formats.items() for batch, d in f["decode"].items()])
    md.append("")
    md += _table(["format", "prompt tokens", "prefill tokens/s", "÷ baseline"],
                 [[label, length, d["tokens_per_s"], d.get("ratio_to_transformers")]
                  for label, f in formats.items() for length, d in f["prefill"].items()])
    md += ["", f"![decode and prefill tokens/s]({path.name})", ""]
    if r["pairs"]:
        md += [f"### Side by side with llama.cpp ({r['llama_cpp']})", "",
               "Ours at fp32 compute with the default prefill products (bf16 on CPUs with AVX512-BF16) and, "
               "as fp32-prefill, with `prefill_dtype=torch.float32`; llama.cpp's llama-bench "
               "at batch 1 and for prefill, llama-batched-bench for larger batches (where built); ratio per round.",
               ""]
        md += _table(["ours", "llama.cpp", "metric", "tokens", "ours ÷ llama.cpp", "rounds"],
                     [[f"{p['ours']} ({p.get('variant', 'fp32')})", p["llama.cpp"], p["metric"], p["tokens"],
                       p["ratio"], p["ratio"]["runs"]] for p in r["pairs"]])
        md.append("")
    else:
        md += ["*llama.cpp: no build found in this run (bench/llamacpp.py build, or $BLOOMCONV_LLAMA_CPP).*", ""]
    return md, [path]


def _larger(results, s, out, footer):
    import matplotlib.pyplot as plt
    L = s["larger"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for batch in sorted({r["batch"] for r in L["runs"]}):
        runs = sorted((r for r in L["runs"] if r["batch"] == batch), key=lambda r: r["budget_gb"])
        ax.errorbar([r["budget_gb"] for r in runs], [r["s_per_token"]["median"] for r in runs],
                    yerr=_errors([r["s_per_token"] for r in runs]), marker="o", capsize=3,
                    label=f"s/token, batch {batch} (median, min–max)")
    ones = sorted((r for r in L["runs"] if r["batch"] == 1), key=lambda r: r["budget_gb"])
    ax.plot([r["budget_gb"] for r in ones], [r["bound_s_per_step"]["median"] for r in ones], color="black",
            linestyle="--", label="disk bound: streamed bytes ÷ disk speed")
    ax.set_xlabel("RAM budget (GB)")
    ax.set_ylabel("seconds per token")
    ax.set_title(f"{num(L['model_gb'])} GB model in a {num(L['cgroup_limit_gb'])} GB cgroup")
    ax.legend(fontsize=8)
    path = _figure(out / "larger_than_memory.png", fig, footer)
    md = ["## Larger than memory: seconds per token against the RAM budget", "",
          f"Geometry {tuple(L['geometry'])}: {num(L['model_gb'])} GB = {num(L['model_over_limit'])}× the "
          f"{num(L['cgroup_limit_gb'])} GB memory cgroup the generating process runs in; page cache dropped before "
          "each run, disk speed measured next to it. The first budget is the least that runs; what is pinned is the "
          "runtime's choice (the first round's shown).", ""]
    columns = ["budget_gb", "pinned_gb", "batch", "s_per_step", "bound_s_per_step", "ratio_to_bound", "s_per_token",
               "peak_rss_anon_gb", "memory_bound_gb"]
    md += _table(["budget GB", "pinned GB", "batch", "s/step", "disk bound s/step", "÷ bound", "s/token",
                  "peak RssAnon GB", "memory bound GB"], [[r[c] for c in columns] for r in L["runs"]])
    return md + ["", f"![seconds per token against the RAM budget]({path.name})", ""], [path]


def _memory(results, s, out, footer):
    import matplotlib.pyplot as plt
    panels = []
    if "conversion" in results and results["conversion"][-1].get("series"):
        c = results["conversion"][-1]
        panels.append((f"quantize --bits 8, {tuple(c['geometry'])}", c["series"]))
    label = s["runtime"]["generation_series"] if "runtime" in s else None
    if label:
        row = next(row for row in results["runtime"]["rows"] if row["label"] == label)
        panels.append((f"generation in memory: {label}", row["runs"][0]["series"]))
    streamed = results["larger"]["rounds"][0]["runs"][-1] if "larger" in results else {}
    if streamed.get("series"):
        panels.append((f"generation streamed: budget {num(s['larger']['runs'][-1]['budget_gb'])} GB",
                       streamed["series"]))
    if not panels:
        return [], []
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.8), squeeze=False)
    for ax, (title, series) in zip(axes[0], panels):
        ax.plot([t for t, _ in series], [a / 1e9 for _, a in series])
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("seconds since process start")
        ax.set_ylabel("RssAnon (GB)")
    path = _figure(out / "memory.png", fig, footer)
    md = ["## Anonymous memory over time", "", "RssAnon of the process, sampled every few milliseconds; peaks:", ""]
    if "conversion" in s:
        c = s["conversion"][-1]
        md.append(f"- quantization ({tuple(c['geometry'])}): peak {num(c['series_peak_gb'])} GB over "
                  f"{num(c['series_seconds'])} s.")
    if label:
        md.append(f"- generation in memory ({label}): peak {num(s['runtime']['generation_peak_gb'])} GB.")
    if streamed.get("series"):
        last = s["larger"]["runs"][-1]
        md.append(f"- generation streamed at a {num(last['budget_gb'])} GB budget: peak "
                  f"{_spread(last['peak_rss_anon_gb'])} GB.")
    return md + ["", f"![anonymous memory over time]({path.name})", ""], [path]


def _quality(results, s, out, footer):
    import matplotlib.pyplot as plt
    q = s["quality"]
    trained = [p for p in q["points"] if p["perplexity"] is not None]
    fig, axes = plt.subplots(1, 2 if trained else 1, figsize=(11 if trained else 6, 4.5), squeeze=False)
    ax = axes[0][0]
    named = set()
    for model in q["models"]:
        points = [p for p in q["points"] if p["model"] == model and p["kl_mean"]]
        ax.scatter([p["bits_per_weight"] for p in points], [p["kl_mean"] for p in points], label=model)
        for p in (p for p in points if p["scheme"] not in named):  # each scheme named once
            ax.annotate(p["scheme"], (p["bits_per_weight"], p["kl_mean"]), fontsize=6)
            named.add(p["scheme"])
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (all stored tensors)")
    ax.set_ylabel("mean KL divergence from unquantized")
    ax.legend(fontsize=7)
    if trained:
        ax = axes[0][1]
        for model in sorted({p["model"] for p in trained}):
            points = [p for p in trained if p["model"] == model]
            ax.scatter([p["bits_per_weight"] for p in points], [p["perplexity"] for p in points], label=model)
        ax.set_xlabel("bits per weight")
        ax.set_ylabel("held-out perplexity")
        ax.legend(fontsize=7)
    path = _figure(out / "quality.png", fig, footer)
    source = f"bench/bench_quality.py's report (`{q['command']}`)" if q["command"] else "bench_quality.run in this run"
    md = ["## Quality against bits per weight", "", f"From {source}.", ""]
    md += _table(["model", "scheme", "bits per weight", "mean KL", "perplexity"],
                 [[p["model"], p["scheme"], p["bits_per_weight"], p["kl_mean"], p["perplexity"]] for p in q["points"]])
    return md + ["", f"![quality against bits per weight]({path.name})", ""], [path]


def _slice(results, s, out, footer):
    x = s["slice176b"]
    md = ["## BLOOM-176B slice (bench/bench_176b.py)", "",
          f"{num(x['blocks'])} blocks, {num(x['slice_gb'])} GB, cold cache; its own JSON is in results.json.", ""]
    md += _table(["conversion", "seconds", "÷ `cp -r` + `sync`", "peak RssAnon GB"],
                 [[scheme, r["seconds"], r["ratio_to_copy"], r["peak_rss_anon_gb"]]
                  for scheme, r in x["conversion"].items()])
    if x.get("generation"):
        md += ["", "Generation in a memory cgroup, default RAM budget, medians of the runs. Start-up: pinned "
               "bytes ÷ the runtime's time from the first pinned read to the last, against the disk and against "
               "the slower of the disk and the speed at which the machine hands out new memory (measured after "
               "each run over as many bytes). s/token at batch 1 against the disk bound (bytes read per token ÷ "
               "disk speed).", ""]
        md += _table(["scheme", "cgroup GB", "budget GB", "completed", "of", "ready s", "pinned GB", "start-up GB/s",
                      "÷ disk", "new memory GB/s", "÷ min(disk, new memory)", "s/token", "÷ disk bound",
                      "peak RssAnon GB", "≤ budget + 300 MB"],
                     [[g["scheme"], g["cgroup_gb"], g["budget_gb"], g["completed"], g["runs"], g["ready_s"],
                       g["pinned_gb"], g["startup_gb_per_s"], g["startup_to_disk"], g["new_memory_gb_per_s"],
                       g["startup_to_bound"], g["s_per_token"], g["ratio_to_disk_bound"], g["peak_rss_anon_gb"],
                       g["within_budget"]] for g in x["generation"]])
    return md + [""], []
