"""Fixtures: random BLOOM checkpoints written by the tests themselves, in every source layout."""
from __future__ import annotations

import json
import os

import pytest
import torch

from bloomconv.converters.convert import convert
from bloomconv.converters.example import write_example_checkpoint

SMALL = (64, 3, 4, 512)  # hidden, layers, heads, vocab


@pytest.fixture(scope="session")
def release_checkpoint(tmp_path_factory):
    """bigscience/bloom layout: pickle shard per block, unprefixed keys, bf16."""
    return write_example_checkpoint(tmp_path_factory.mktemp("release"), SMALL, "release-pickle-shards")


@pytest.fixture(scope="session")
def converted(release_checkpoint, tmp_path_factory):
    """A finished conversion of `release_checkpoint`. Tests that damage it must copy it first."""
    dst = tmp_path_factory.mktemp("converted") / "out"
    convert(release_checkpoint, dst)
    return dst


@pytest.fixture
def converted_copy(converted, tmp_path):
    import shutil
    dst = tmp_path / "copy"
    shutil.copytree(converted, dst)
    return dst


@pytest.fixture(autouse=True)
def restores_threads():
    """Every test leaves torch's (process-wide) thread count as it found it: benchmarks and
    `load(threads=...)` set it, and products may round differently at another count."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def streaming_everything(directory, **kwargs):
    """`bloomconv.load` with every matrix streamed in its smallest pieces (one granule of rows):
    the least RAM budget, and the piece size forced down for the plan."""
    import bloomconv
    from bloomconv.runtime import readahead
    size, readahead.STREAM_PIECE_BYTES = readahead.STREAM_PIECE_BYTES, 1
    try:
        return bloomconv.load(directory, ram_budget="min", **kwargs)
    finally:
        readahead.STREAM_PIECE_BYTES = size


def edit_config(checkpoint, **changes):
    """Overwrite keys of a checkpoint's config.json (the test's own copy)."""
    path = checkpoint / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def fail_on_nth_write(monkeypatch, n, error):
    """Make the converter's nth safetensors write raise `error`; returns the real writer."""
    from bloomconv.converters import convert as convert_module
    real_write = convert_module.write_safetensors
    calls = {"n": 0}

    def failing(file, tensors, metadata=None):
        calls["n"] += 1
        if calls["n"] == n:
            raise error
        return real_write(file, tensors, metadata)

    monkeypatch.setattr(convert_module, "write_safetensors", failing)
    return real_write


def load_source_tensors(path):
    """Every tensor of a source checkpoint, unprefixed, whatever its layout (test oracle)."""
    from safetensors.torch import load_file
    out = {}
    for f in sorted(path.iterdir()):
        if f.suffix == ".bin":
            out.update(torch.load(f, weights_only=True))
        elif f.suffix == ".safetensors":
            out.update(load_file(f))
    return {k.removeprefix("transformer."): v for k, v in out.items()}


def load_dequantized(directory) -> dict:
    """Every tensor of a bloomconv directory, quantized weights dequantized to fp32 by the storage
    type the manifest records for them; transformers' names."""
    from bloomconv.storage import dequantize_directory
    return dequantize_directory(directory)


def load_converted_tensors(path):
    from safetensors.torch import load_file
    out = {}
    for f in sorted(path.rglob("*.safetensors")):
        out.update(load_file(f))
    return {k.removeprefix("transformer."): v for k, v in out.items()}


# Property tests are derandomized by default so that CI is reproducible: the same examples run on
# every machine. `HYPOTHESIS_PROFILE=explore pytest` draws fresh random examples (and more of them).
from hypothesis import settings as _hypothesis_settings  # noqa: E402

_hypothesis_settings.register_profile("ci", derandomize=True, print_blob=True)
_hypothesis_settings.register_profile("explore", max_examples=500, print_blob=True)
_hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# The reliability suites (test_reliability, test_transfer_damage, test_hostile_inputs) run a
# reduced form by default; BLOOMCONV_FULL_RELIABILITY=1 runs them in full (20+ kill points per
# scheme, thousands of fuzz cases). Each records its figures, printed at the end of the session
# and written as JSON to $BLOOMCONV_RELIABILITY_REPORT when that is set.
FULL_RELIABILITY = os.environ.get("BLOOMCONV_FULL_RELIABILITY") == "1"
RELIABILITY_FIGURES: dict[str, dict] = {}


def reliability_scale(ci: int, full: int) -> int:
    """How many cases a reliability test runs: `ci` by default, `full` in the full suites."""
    return full if FULL_RELIABILITY else ci


def record_figures(suite: str, **figures) -> None:
    RELIABILITY_FIGURES.setdefault(suite, {}).update(figures)


def pytest_terminal_summary(terminalreporter):
    if not RELIABILITY_FIGURES:
        return
    terminalreporter.section(f"reliability figures ({'full' if FULL_RELIABILITY else 'reduced, CI'} suites)")
    for suite, figures in sorted(RELIABILITY_FIGURES.items()):
        terminalreporter.write_line(f"{suite}: {json.dumps(figures, sort_keys=True)}")
    if os.environ.get("BLOOMCONV_RELIABILITY_REPORT"):
        with open(os.environ["BLOOMCONV_RELIABILITY_REPORT"], "w") as f:
            json.dump({"full": FULL_RELIABILITY, "figures": RELIABILITY_FIGURES}, f, indent=1, sort_keys=True)
