"""bloomconv where Linux-only calls are missing (macOS, Windows), checked on Linux by taking them
away: /proc, O_DIRECT, preadv, posix_fadvise, fcntl."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import bloomconv
from bloomconv import process_stats
from bloomconv.cli import main
from bloomconv.converters import destination
from bloomconv.converters.convert import quantize
from bloomconv.errors import DestinationBusyError
from bloomconv.format import LOCK_NAME
from bloomconv.manifest import read_manifest
from bloomconv.runtime import files, memory

from .conftest import SMALL, streaming_everything

PROMPT = "Return the"


def probe_ids():
    return torch.randint(4, SMALL[3], (2, 7), generator=torch.Generator().manual_seed(0))


def outputs(directory) -> dict:
    """Logits and text of `directory` with every file pinned and with every file streamed."""
    results = {}
    for budget in ("default", "min"):
        with bloomconv.load(directory) if budget == "default" else streaming_everything(directory) as model:
            results[f"logits, budget {budget}"] = model(probe_ids())
            results[f"text, budget {budget}"] = model.generate(PROMPT, max_new_tokens=6)
    return results


def same(ours: dict, theirs: dict) -> bool:
    return ours.keys() == theirs.keys() and all(
        torch.equal(a, theirs[k]) if isinstance(a, torch.Tensor) else a == theirs[k] for k, a in ours.items())


@pytest.fixture(scope="module")
def reference(release_checkpoint, converted, tmp_path_factory):
    """Manifests and outputs of a plain conversion and int8 quantization, all Linux calls present."""
    int8 = tmp_path_factory.mktemp("portability") / "int8"
    quantize(release_checkpoint, int8, bits=8)
    return {name: (read_manifest(path).files, outputs(path)) for name, path in [("bf16", converted), ("int8", int8)]}


# The whole round trip in a fresh process where `import fcntl` fails (a stand-in msvcrt takes its
# place, as on Windows), and the runtime's Linux-only calls are gone.
WITHOUT_LINUX = textwrap.dedent("""
    import os, sys, types
    from pathlib import Path
    import fcntl as real_fcntl
    import torch

    sys.modules["fcntl"] = None  # bloomconv's own `import fcntl` fails from here on
    msvcrt = types.ModuleType("msvcrt")  # Windows' lock: raises OSError while another holds it
    msvcrt.LK_NBLCK = 2
    msvcrt.locking = lambda fd, mode, nbytes: real_fcntl.flock(fd, real_fcntl.LOCK_EX | real_fcntl.LOCK_NB)
    sys.modules["msvcrt"] = msvcrt

    import bloomconv
    from bloomconv import process_stats
    from bloomconv.converters import convert, destination
    from bloomconv.runtime import files
    from tests.conftest import streaming_everything
    from tests.test_portability import outputs
    assert destination.fcntl is None and files.fcntl is None

    for name in ("O_DIRECT", "preadv", "posix_fadvise"):
        delattr(os, name)
    out, src = Path(sys.argv[1]), Path(sys.argv[2])
    process_stats.PROC = out / "no-proc"

    bloomconv.convert(src, out / "bf16")
    bloomconv.quantize(src, out / "int8", bits=8)
    results = {}
    for name in ("bf16", "int8"):
        assert bloomconv.verify(out / name).ok
        results[name] = outputs(out / name)
        with streaming_everything(out / name) as model:
            model.generate("x", max_new_tokens=2)
            read = [f.reads_around_the_page_cache for f in model.checkpoint.files.values()]
            assert False in read and True not in read, read
    torch.save(results, out / "results.pt")
""")


def test_convert_verify_and_run_without_linux_calls_give_identical_results(release_checkpoint, reference,
                                                                           tmp_path):
    subprocess.run([sys.executable, "-c", WITHOUT_LINUX, str(tmp_path), str(release_checkpoint)], check=True,
                   cwd=Path(__file__).parent.parent)
    results = torch.load(tmp_path / "results.pt")
    for name, (manifest_files, expected) in reference.items():
        assert read_manifest(tmp_path / name).files == manifest_files  # byte for byte the same files
        assert same(results[name], expected), name


def test_macos_uncached_reads_give_identical_results(converted, reference, monkeypatch):
    """F_NOCACHE's branch, with a harmless fcntl command in its place (Linux has no F_NOCACHE)."""
    import fcntl
    monkeypatch.delattr(os, "O_DIRECT")
    monkeypatch.setattr(files, "F_NOCACHE", fcntl.F_SETFD)  # sets close-on-exec, as a no-op
    with streaming_everything(converted) as model:
        model.generate("x", max_new_tokens=2)
        read = [f.reads_around_the_page_cache for f in model.checkpoint.files.values()]
        assert True in read and False not in read, read
    assert same(outputs(converted), reference["bf16"][1])


# ------------------------------------------------------------------------------ memory figures

def test_memory_figures_without_proc_come_from_psutil_and_getrusage(tmp_path, monkeypatch):
    import resource

    import psutil
    monkeypatch.setattr(process_stats, "PROC", tmp_path / "no-proc")
    monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(available=8 << 30))
    monkeypatch.setattr(psutil, "Process", lambda: types.SimpleNamespace(
        memory_info=lambda: types.SimpleNamespace(rss=45 << 20)))
    assert process_stats.available_memory() == 8 << 30
    assert process_stats.anonymous_rss() == 45 << 20
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert before * 1024 <= process_stats.peak_rss() <= resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert memory.default_ram_budget() == memory.default_ram_budget(8 << 30) > 0


def test_memory_figures_from_proc_and_the_cgroups(tmp_path, monkeypatch):
    proc, cgroups = tmp_path / "proc", tmp_path / "cgroup"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text("MemTotal:       8000000 kB\nMemAvailable:   4000000 kB\n")
    (proc / "self" / "status").write_text("Name:\tpython\nVmHWM:\t  2048 kB\nRssAnon:\t    1234 kB\n")
    monkeypatch.setattr(process_stats, "PROC", proc)
    monkeypatch.setattr(process_stats, "CGROUP_ROOT", cgroups)
    assert (process_stats.anonymous_rss(), process_stats.peak_rss()) == (1234 * 1024, 2048 * 1024)
    assert process_stats.available_memory() == 4000000 * 1024  # no cgroup file: MemAvailable
    (proc / "self" / "cgroup").write_text("0::/a/b\n")  # v2: the tightest memory.max on the way up
    (cgroups / "a" / "b").mkdir(parents=True)
    (cgroups / "a" / "memory.max").write_text("max\n")
    (cgroups / "a" / "b" / "memory.max").write_text("1000000000\n")
    (cgroups / "a" / "b" / "memory.stat").write_text("anon 100000000\nfile 5\n")
    assert process_stats.available_memory() == 900_000_000
    (proc / "self" / "cgroup").write_text("4:cpu,memory:/x\n")  # v1
    (cgroups / "memory" / "x").mkdir(parents=True)
    (cgroups / "memory" / "x" / "memory.stat").write_text("hierarchical_memory_limit 9000000000\ntotal_rss 5\n")
    assert process_stats.available_memory() == 4000000 * 1024  # MemAvailable is tighter


# --------------------------------------------------------------------------- destination lock

def fake_msvcrt() -> types.ModuleType:
    """Windows' msvcrt.locking semantics (OSError while another descriptor holds it) over flock."""
    import fcntl  # not at the top: WITHOUT_LINUX imports this module where `import fcntl` fails
    module = types.ModuleType("msvcrt")
    module.LK_NBLCK = 2
    module.locking = lambda fd, mode, nbytes: fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return module


def test_the_lock_without_fcntl_takes_msvcrt_and_still_excludes(tmp_path, monkeypatch):
    monkeypatch.setattr(destination, "fcntl", None)
    monkeypatch.setattr(destination, "msvcrt", fake_msvcrt())
    with destination.Destination(tmp_path / "dst"):
        with pytest.raises(DestinationBusyError, match="another bloomconv process is writing here"):
            destination.Destination(tmp_path / "dst").__enter__()
    assert not (tmp_path / "dst" / LOCK_NAME).exists()
    with destination.Destination(tmp_path / "dst"):  # free again
        pass


def test_no_lock_at_all_is_one_clear_line(release_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(destination, "fcntl", None)
    monkeypatch.setattr(destination, "msvcrt", None)
    result = CliRunner().invoke(main, ["convert", "--quiet", str(release_checkpoint), str(tmp_path / "dst")])
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and "neither fcntl.flock nor msvcrt.locking" in result.stderr
    assert not (tmp_path / "dst").exists()
