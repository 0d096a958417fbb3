"""Fixtures: random BLOOM checkpoints written by the tests themselves, in every source layout."""
from __future__ import annotations

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
_hypothesis_settings.load_profile(__import__("os").environ.get("HYPOTHESIS_PROFILE", "ci"))
