"""`python -m bench`'s report (bench/runs.py measures, bench/reporting.py draws) on a tiny model
measured here: the markdown is well formed, every plot decodes to a real picture, and every
number the markdown prints is a figure of this run's results."""
import json
import re
import statistics
import sys
from pathlib import Path

import pytest
import torch

from bloomconv import kernels

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))
import reporting  # noqa: E402
import runs  # noqa: E402

GEOMETRY = (64, 2, 2, 512)
SECTIONS = ("conversion", "runtime", "quality")
NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?:e[+-]\d+)?")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    work = tmp_path_factory.mktemp("bench")
    sizes = runs.Sizes(threads=1, repeats=2, conversion_geometries=[GEOMETRY], conversion_schemes=("convert", "int8"),
                       runtime_geometry=GEOMETRY, runtime_presets=("none",), batches=(1, 2), prefill_tokens=(8,),
                       decode_tokens=3, llama_cpp=False, disk_probe_bytes=0)  # no page-cache drop
    threads = torch.get_num_threads()  # the benchmarks set torch's process-wide thread count
    try:
        results = runs.measure_all(sizes, work, SECTIONS, "pytest tests/test_bench_report.py", log=lambda *_: None)
    finally:
        torch.set_num_threads(threads)
    written = reporting.write_report(results, work / "report")
    return results, written, work / "report"


def _leaves(value, strings: set, numbers: set):
    """Every string and number of a JSON value (dict keys included; keys of digits are numbers)."""
    if isinstance(value, dict):
        for key, item in value.items():
            (numbers if key.isdigit() else strings).add(int(key) if key.isdigit() else key)
            _leaves(item, strings, numbers)
    elif isinstance(value, list):
        for item in value:
            _leaves(item, strings, numbers)
    elif isinstance(value, str):
        strings.add(value)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        numbers.add(value)


def test_every_number_in_the_markdown_is_a_figure_of_the_run(run):
    results, written, out = run
    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    strings, numbers = set(), set()
    _leaves(saved, strings, set())
    # the figures: the summary (computed from the raw measurements, see below) and the load
    _leaves({key: saved[key] for key in ("summary", "load_before", "load_after")}, set(), numbers)
    printed = {reporting.num(n) for n in numbers}
    text = (out / "README.md").read_text()
    # labels, the date, the commit (a short hash may be all digits), the command: not figures
    labels = {s for s in strings if re.search(r"\d", s) and re.search(r"[^\d.]", s)} | {saved["commit"]}
    for s in sorted(labels, key=len, reverse=True):
        text = text.replace(s, " ")
    found = NUMBER.findall(text)
    assert len(found) > 40  # the tables are there
    strays = [n for n in found if n not in printed]
    assert not strays, f"numbers in the report that are no figure of the run: {strays}"


def test_the_summary_is_computed_from_the_measurements(run):
    results, _, _ = run
    raw = {k: v for k, v in results.items() if k != "summary"}
    assert runs.summarize(json.loads(json.dumps(raw))) == json.loads(json.dumps(results["summary"]))
    conversion = results["conversion"][0]["rows"]
    ratios = [s / c for s, c in zip(conversion["int8"]["seconds"], conversion["cp -r + sync"]["seconds"])]
    assert len(ratios) == 2
    summary = results["summary"]["conversion"][0]["schemes"]["int8"]["ratio_to_copy"]
    assert summary == {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "runs": 2}
    formats = results["summary"]["runtime"]["formats"]
    fp32_prefill = {"runtime none float32 fp32-prefill"} if kernels.bf16_dot_products() else set()  # else the default
    assert set(formats) == {"runtime none float32", "runtime none bfloat16", "transformers bfloat16",
                            "transformers float32", *fp32_prefill}
    for label, f in formats.items():
        assert f["prefill"]
        for batch in ("1",) if label.endswith("fp32-prefill") else ("1", "2"):  # its decoding is the default's
            d = f["decode"][batch]
            assert 0 < d["tokens_per_s"]["min"] <= d["tokens_per_s"]["median"] <= d["tokens_per_s"]["max"]
            assert d["bound_tokens_per_s"]["median"] > 0
    assert results["summary"]["runtime"]["generation_peak_gb"] > 0
    assert results["summary"]["quality"]["points"]


def test_markdown_is_well_formed_and_links_every_plot(run):
    _, written, out = run
    text = (out / "README.md").read_text()
    assert text.startswith("# ")
    lines = text.splitlines()
    tables = 0
    for i, line in enumerate(lines):
        if re.fullmatch(r"\|(---\|)+", line):
            tables += 1
            columns = lines[i - 1].count("|")
            j = i + 1
            while j < len(lines) and lines[j].startswith("|"):
                assert lines[j].count("|") == columns, lines[j]
                j += 1
            assert j > i + 1, f"empty table under {lines[i - 1]}"
    assert tables >= 4
    linked = re.findall(r"!\[[^\]]+\]\(([^)]+)\)", text)
    pngs = sorted(p.name for p in written if p.suffix == ".png")
    assert sorted(linked) == pngs == ["conversion.png", "decode.png", "memory.png", "quality.png"]


def test_every_plot_decodes_to_a_real_picture(run):
    from matplotlib.image import imread
    _, written, _ = run
    for path in (p for p in written if p.suffix == ".png"):
        pixels = imread(path)
        assert pixels.ndim == 3 and pixels.shape[0] > 300 and pixels.shape[1] > 500, path
        assert pixels[..., :3].std() > 0.05, f"{path.name} is nearly blank"
        assert len({tuple(p) for p in pixels[::7, ::7, :3].reshape(-1, 3).tolist()}) > 20, path


def test_report_only_redraws_a_saved_run(run, tmp_path):
    results, _, out = run
    saved = json.loads((out / "results.json").read_text())
    del saved["summary"]
    saved["summary"] = runs.summarize(saved)
    written = reporting.write_report(saved, tmp_path)
    assert (tmp_path / "README.md").read_text() == (out / "README.md").read_text()
    assert {p.name for p in written} == {p.name for p in (out.iterdir())}


def test_measurements_are_saved_before_they_are_summarized(run):
    results, _, out = run
    measured = json.loads((out.parent / "measured.json").read_text())
    assert measured == json.loads(json.dumps({k: v for k, v in results.items() if k != "summary"}))


def test_a_scheme_refused_for_a_model_is_left_out_of_the_quality_figures():
    quality = {"models": {"m": {"kind": "random", "schemes": {
        "nf4-b128-dq-gptq": {"refused": "hidden size 320 is not a multiple of block size 128"},
        "nf4-b32-dq": {"bits_per_weight": 7.26, "kl_mean": 0.0009}}}}}
    points = runs._quality_summary(quality)["points"]
    assert [p["scheme"] for p in points] == ["nf4-b32-dq"] and points[0]["kl_mean"] == 0.0009
