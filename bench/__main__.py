"""Every benchmark of bloomconv in one run, reported as markdown and PNG plots.

    python -m bench                     # small sizes, a few minutes on 2 cores -> bench/out/report/
    python -m bench --full              # bloom-560m geometry, larger than memory, the 176B slice -> bench/report/
    python -m bench --report-only bench/report/results.json    # redraw a saved run, measure nothing

Needs root for the cold-cache parts (page cache drops, memory cgroups); without it the
larger-than-memory section is left out and the disk speed is not measured. llama.cpp joins the
decode/prefill rounds when bench/llamacpp.py finds a build ($BLOOMCONV_LLAMA_CPP). Writes
OUT/README.md, OUT/*.png and OUT/results.json (the data the report is drawn from). The small run
writes under bench/out/ (ignored by git); a --full run's report, in bench/report/, is committed.
Plots need matplotlib: `pip install -e '.[bench]'`.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import reporting  # noqa: E402
import runs  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="the real sizes (hours; root)")
    parser.add_argument("--only", nargs="+", choices=runs.SECTIONS, help="these sections only")
    parser.add_argument("--repeats", type=int, help="rounds of every measurement (default 3)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quality-models", type=Path, help="bench/quality_models.py's folder to score "
                        "(default: two tiny random models; --full: /work/quality-models)")
    parser.add_argument("--quality-json", type=Path, help="a finished bench/bench_quality.py report (OUT.json) "
                        "to draw instead of measuring quality in this run")
    parser.add_argument("--work", type=Path, default=HERE / "out" / "bench-all", help="checkpoints and scratch")
    parser.add_argument("--out", type=Path, help="the report's folder (default bench/out/report, --full: bench/report)")
    parser.add_argument("--report-only", type=Path, metavar="RESULTS_JSON", help="redraw the report of a saved run")
    args = parser.parse_args()
    out = args.out or (HERE / "report" if args.full else HERE / "out" / "report")
    if args.report_only:
        results = json.loads(args.report_only.read_text())
        results["summary"] = runs.summarize(results)
    else:
        sizes = runs.Sizes.full() if args.full else runs.Sizes()
        sizes.threads = args.threads
        if args.repeats:
            sizes.repeats = args.repeats
        if args.quality_models:
            sizes.quality_models = args.quality_models
        sizes.quality_json = args.quality_json
        command = "python -m bench " + shlex.join(sys.argv[1:])
        results = runs.measure_all(sizes, args.work, args.only or runs.SECTIONS, command.strip())
    written = reporting.write_report(results, out)
    print("\n".join(str(p) for p in written))


if __name__ == "__main__":
    main()
