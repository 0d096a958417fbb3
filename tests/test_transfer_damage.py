"""Transfer damage: every file of a converted directory flipped, truncated, zero-filled, deleted,
renamed; extra files; swapped blocks. `verify` names each with the right exit code; `load`
refuses each before computing anything. The detection counts are the suite's figures.
"""
from __future__ import annotations

import collections
import dataclasses
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

import bloomconv
from bloomconv.cli import main
from bloomconv.errors import BloomconvError, ManifestError
from bloomconv.format import MANIFEST_NAME
from bloomconv.manifest import read_manifest
from bloomconv.runtime import generate as generate_module
from bloomconv.safetensors_io import read_header
from bloomconv.verification import verify

from .conftest import FULL_RELIABILITY, record_figures, reliability_scale

FLIP_POSITIONS = reliability_scale(ci=3, full=16)  # per file, spread from the first byte to the last
DIRECTORIES = ["bf16", "int8", "nf4"] if FULL_RELIABILITY else ["bf16"]


@dataclasses.dataclass(frozen=True)
class Fault:
    kind: str                 # flip | truncate | zero tail | delete | rename | extra | swap
    files: tuple[str, ...]    # what is damaged, as named in the directory
    detail: str = ""
    at: int = 0               # first damaged byte (flip, zero tail, truncate)

    def __str__(self) -> str:
        return f"{self.kind} {' <-> '.join(self.files)} {self.detail}".strip()


def faults_for(directory: Path) -> list[Fault]:
    files = sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())
    faults = []
    for name in files:
        size = (directory / name).stat().st_size
        for i in range(FLIP_POSITIONS):
            at = (size - 1) * i // (FLIP_POSITIONS - 1)
            faults.append(Fault("flip", (name,), f"byte {at}", at))
        cuts = [size // 2] if not FULL_RELIABILITY else sorted({0, 8, size // 2, size - 1})
        faults += [Fault("truncate", (name,), f"to {cut} bytes", cut) for cut in cuts]
        data = (directory / name).read_bytes()
        last_nonzero = max(i for i, b in enumerate(data) if b) if any(data) else 0
        lengths = [size // 4] if not FULL_RELIABILITY else [1, size // 4, size // 2]
        for length in lengths:  # long enough to reach a non-zero byte: zeros over zeros change nothing
            start = min(size - max(length, 1), last_nonzero)
            faults.append(Fault("zero tail", (name,), f"from byte {start}", start))
        faults.append(Fault("delete", (name,)))
        faults.append(Fault("rename", (name,), f"to {renamed(name)}"))
    faults += [Fault("extra", ("notes.txt",)), Fault("extra", ("block_099.safetensors",)),
               Fault("extra", (".DS_Store",))]
    blocks = [n for n in files if n.startswith("block_")]
    faults += [Fault("swap", (a, b)) for i, a in enumerate(blocks) for b in blocks[i + 1:]]
    return faults


def renamed(name: str) -> str:
    """How a browser names a second download of the same file."""
    path = Path(name)
    return path.with_name(f"{path.stem} (1){path.suffix}").as_posix()


def apply(directory: Path, fault: Fault) -> set[str]:
    """Damage `directory`; return the names a report must mention."""
    path = directory / fault.files[0]
    if fault.kind == "flip":
        data = bytearray(path.read_bytes())
        data[fault.at] ^= 0x10
        path.write_bytes(bytes(data))
    elif fault.kind == "truncate":
        with open(path, "r+b") as f:
            f.truncate(fault.at)
    elif fault.kind == "zero tail":
        data = path.read_bytes()
        path.write_bytes(data[:fault.at] + bytes(len(data) - fault.at))
    elif fault.kind == "delete":
        path.unlink()
    elif fault.kind == "rename":
        path.rename(directory / renamed(fault.files[0]))
        return {fault.files[0], renamed(fault.files[0])}
    elif fault.kind == "extra" and path.suffix == ".safetensors":
        shutil.copy(directory / "block_000.safetensors", path)
    elif fault.kind == "extra":
        path.write_text("downloaded from the lab share")
    elif fault.kind == "swap":
        other = directory / fault.files[1]
        path.rename(directory / "swap.tmp")
        other.rename(path)
        (directory / "swap.tmp").rename(other)
    return set(fault.files)


def within_tensor_data(directory: Path, fault: Fault) -> bool:
    """Damage that keeps the size and lands past the header of a weight file: all that a fast
    check (sizes, headers, hashes of the small files) cannot see."""
    if fault.kind not in ("flip", "zero tail") or not fault.files[0].endswith(".safetensors"):
        return False
    return fault.at >= read_header(directory / fault.files[0]).data_start


@pytest.fixture(scope="module")
def damage_sources(converted, release_checkpoint, tmp_path_factory):
    directories = {"bf16": converted}
    for name in DIRECTORIES[1:]:
        directories[name] = tmp_path_factory.mktemp(name) / "out"
        bloomconv.quantize(release_checkpoint, directories[name], 8 if name == "int8" else 4, quant_type=None if name == "int8" else name)
    return directories


@pytest.fixture
def no_compute(monkeypatch):
    """Counts models built: a refused load must not get as far as building one."""
    built = []
    real = generate_module.Transformer

    def spy(*args, **kwargs):
        built.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(generate_module, "Transformer", spy)
    return built


def loads(directory: Path, mode: str, built: list) -> bool:
    """Whether load accepts the directory; a refusal must be typed, name a file, and come first."""
    before = len(built)
    try:
        bloomconv.load(directory, verify=mode).close()
    except BloomconvError:
        assert len(built) == before, "a model was built before the refusal"
        return False
    return True


@pytest.mark.parametrize("kind", DIRECTORIES)
def test_every_fault_is_detected_by_verify_and_refused_by_load(kind, damage_sources, tmp_path, no_compute):
    source = damage_sources[kind]
    faults = faults_for(source)
    counts = collections.Counter()
    fast_load_misses = collections.Counter()
    for number, fault in enumerate(faults):
        directory = shutil.copytree(source, tmp_path / f"case-{number}")
        reported = apply(directory, fault)
        counts["injected"] += 1
        result = CliRunner().invoke(main, ["verify", "--quiet", str(directory)])
        try:
            read_manifest(directory)
            exit_code = 1  # files differ from a readable manifest
        except ManifestError:
            exit_code = 2  # the manifest itself is missing or unreadable
            reported = {MANIFEST_NAME}
        assert result.exit_code == exit_code, f"{fault}: exit {result.exit_code}\n{result.output}"
        missing = [n for n in reported if n not in result.output]
        assert not missing, f"{fault}: {missing} not named in\n{result.output}"
        counts["verify detected"] += 1
        try:
            fast_ok = verify(directory, fast=True).ok
        except BloomconvError:
            fast_ok = False
        counts["verify --fast detected"] += not fast_ok

        if fault.kind == "extra":  # an unlisted file cannot change what the model computes
            assert loads(directory, "full", no_compute)
            counts["extra files loaded (by design)"] += 1
        else:
            counts["load injected"] += 1
            assert not loads(directory, "full", no_compute), f"{fault}: load(verify='full') accepted it"
            counts["load(verify='full') refused"] += 1
            if loads(directory, "fast", no_compute):
                assert within_tensor_data(source, fault), f"{fault}: load(verify='fast') accepted it"
                fast_load_misses[fault.kind] += 1
            else:
                counts["load(verify='fast') refused"] += 1
        shutil.rmtree(directory)
    record_figures(f"transfer-damage/{kind}", files=len(list(p for p in source.rglob("*") if p.is_file())),
                   **counts, fast_load_misses_same_size_data_damage=dict(fast_load_misses))
    assert counts["verify detected"] == counts["injected"]


def test_checksums_without_the_manifest_line_are_reported(converted_copy):
    """SHA256SUMS cut just before its last line (or from before it listed manifest.json)."""
    sums = converted_copy / "SHA256SUMS"
    lines = sums.read_bytes().splitlines(keepends=True)
    assert lines[-1].endswith(b" *manifest.json\n")
    sums.write_bytes(b"".join(lines[:-1]))
    (problem,) = verify(converted_copy, fast=True).problems
    assert (problem.file, problem.kind) == ("SHA256SUMS", "corrupted") and "re-run the conversion" in problem.actual
