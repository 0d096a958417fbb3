"""The command line: one-line errors (JSON with --json), progress bars by tqdm's conventions,
`bloomconv env`, `python -m bloomconv`."""
from __future__ import annotations

import fcntl
import importlib.metadata
import io
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import threading

import pytest
import torch
from click.testing import CliRunner

from bloomconv import kernels
from bloomconv.cli import main
from bloomconv.converters.example import parse_geometry
from bloomconv.errors import OptionsError, RecipeError
from bloomconv.manifest import read_manifest
from bloomconv.progress import terminal_progress


def _assert_one_line_error(result, *fragments):
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    assert result.stdout == "" and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("bloomconv: error: ") and result.stderr.rstrip().endswith("."), result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


# ---------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("geometry, problem", [
    ("foo", "neither a known name nor four positive integers"),
    ("64,2", "neither a known name nor four positive integers"),
    ("64,2,4,1024,9", "neither a known name nor four positive integers"),
    ("a,b,c,d", "neither a known name nor four positive integers"),
    ("64,2,4,1.5", "neither a known name nor four positive integers"),
    ("0,2,4,1024", "neither a known name nor four positive integers"),
    ("64,-2,4,1024", "neither a known name nor four positive integers"),
    ("65,2,4,1024", "hidden size 65 is not divisible by 4 heads"),
])
def test_example_refuses_a_bad_geometry_in_one_line_naming_the_fix(tmp_path, geometry, problem):
    result = CliRunner().invoke(main, ["example", str(tmp_path / "dst"), "--geometry", geometry])
    _assert_one_line_error(result, problem, "HIDDEN,LAYERS,HEADS,VOCAB", "e.g. 64,2,4,1024")
    assert not (tmp_path / "dst").exists()


@pytest.mark.parametrize("seed", ["-1", str(2**64)])
def test_example_refuses_a_seed_torch_cannot_take(tmp_path, seed):
    result = CliRunner().invoke(main, ["example", str(tmp_path / "dst"), "--seed", seed])
    _assert_one_line_error(result, f"seed {seed} is out of range")
    assert not (tmp_path / "dst").exists()


def test_example_into_an_unwritable_destination_is_a_destination_error(tmp_path):
    (tmp_path / "a-file").write_text("")
    result = CliRunner().invoke(main, ["example", str(tmp_path / "a-file" / "dst")])
    _assert_one_line_error(result, "a-file/dst: cannot write", "Fix the destination")


def test_library_geometry_parsing_is_typed():
    assert parse_geometry("tiny") == (64, 2, 4, 1024)
    assert parse_geometry(" 128, 2,4 ,1000") == (128, 2, 4, 1000)
    assert parse_geometry((32, 1, 2, 256)) == (32, 1, 2, 256)
    for bad in ["", "64,2,4", (64, 2, 4, True), (64.0, 2, 4, 1024), (64, 2, 3, 1024)]:
        with pytest.raises(OptionsError):
            parse_geometry(bad)


# ------------------------------------------------------------------------------ JSON errors

@pytest.mark.parametrize("command", ["verify", "inspect"])
def test_json_commands_report_errors_as_json_with_the_tables_exit_code(tmp_path, command):
    result = CliRunner().invoke(main, [command, "--json", str(tmp_path / "missing")])
    assert result.exit_code == 2 and result.stderr == "", result.output
    error = json.loads(result.stdout)
    assert error == {"error": "ManifestError", "exit_code": 2, "message": error["message"]}
    assert error["message"].startswith(str(tmp_path / "missing" / "manifest.json") + ": no manifest")


@pytest.mark.parametrize("command", ["verify", "inspect"])
def test_without_json_errors_stay_human(tmp_path, command):
    result = CliRunner().invoke(main, [command, str(tmp_path / "missing")])
    _assert_one_line_error(result, "no manifest")


def test_recipes_json_error_goes_through_the_one_wrapper(monkeypatch):
    import bloomconv.recipes

    def broken():
        raise RecipeError("recipe file bloom-x.json is invalid. Reinstall bloomconv.")
    monkeypatch.setattr(bloomconv.recipes, "all_recipes", broken)
    result = CliRunner().invoke(main, ["recipes", "--json"])
    assert result.exit_code == 2 and json.loads(result.stdout) == {
        "error": "RecipeError", "message": "recipe file bloom-x.json is invalid. Reinstall bloomconv.", "exit_code": 2}


# -------------------------------------------------------------------------------- progress

class _Terminal(io.StringIO):
    def isatty(self):
        return True


def _drawn(factory, stream, monkeypatch) -> str:
    """What one bar made by `factory` writes to `stream` as sys.stderr (set here: pytest's capture
    replaces sys.stderr again between fixtures and the test)."""
    with monkeypatch.context() as patch:
        patch.setattr(sys, "stderr", stream)
        with factory(total=100, desc="convert", unit="B") as bar:
            bar.update(100)
    return stream.getvalue()


def test_bars_are_drawn_on_a_terminal_named_by_the_command(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    drawn = _drawn(terminal_progress("quantize"), _Terminal(), monkeypatch)
    assert "quantize:" in drawn and "convert" not in drawn


@pytest.mark.parametrize("how", ["not a terminal", "TQDM_DISABLE", "--quiet"])
def test_no_bars_off_a_terminal_with_tqdm_disable_or_quiet(monkeypatch, how):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    if how == "TQDM_DISABLE":
        monkeypatch.setenv("TQDM_DISABLE", "1")
    stream = io.StringIO() if how == "not a terminal" else _Terminal()
    assert _drawn(terminal_progress("convert", disable=how == "--quiet"), stream, monkeypatch) == ""


def test_convert_in_a_ci_log_prints_no_bar_and_ends_with_time_and_size_ratio(release_checkpoint, tmp_path):
    result = CliRunner().invoke(main, ["convert", str(release_checkpoint), str(tmp_path / "out")])
    assert result.exit_code == 0 and result.stderr == "", result.stderr  # CliRunner's stderr is no terminal
    manifest = read_manifest(tmp_path / "out")
    written, read = sum(f.size for f in manifest.files), sum(f.size for f in manifest.source_files)
    assert re.fullmatch(rf"{re.escape(str(tmp_path / 'out'))}: {len(manifest.files)} files, {written:,} bytes "
                        rf"\({written / read:.3f} of the source's {read:,}\) in \d+\.\d s\n", result.stdout), result.stdout


def test_quantize_on_a_terminal_shows_a_quantize_bar_then_the_summary(release_checkpoint, tmp_path):
    """A real process whose stderr is a pseudo-terminal, as in an interactive shell."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))  # a pty starts 0 columns wide
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    drawn = []
    with subprocess.Popen([sys.executable, "-m", "bloomconv", "quantize", "--bits", "8", str(release_checkpoint),
                           str(tmp_path / "int8")], stdout=subprocess.PIPE, stderr=follower, env=env) as process:
        os.close(follower)
        reader = threading.Thread(target=_drain, args=(leader, drawn))  # a full pty would block the child
        reader.start()
        stdout = process.communicate(timeout=120)[0].decode()
    reader.join()
    os.close(leader)
    drawn = b"".join(drawn)
    assert process.returncode == 0, drawn
    assert b"quantize:" in drawn and b"convert" not in drawn, drawn
    assert re.search(r": int8, \d+\.\d\d bits per weight, 0\.\d{3} of its 16-bit size, \d+ files, [\d,]+ bytes "
                     r"\(0\.\d{3} of the source's [\d,]+\) in \d+\.\d s$", stdout)


def _drain(fd, chunks: list) -> None:
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO once the child has closed the terminal
            return
        if not chunk:
            return
        chunks.append(chunk)


# ------------------------------------------------------------------------------------ env

def test_env_json_reports_this_installation():
    result = CliRunner().invoke(main, ["env", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    for name in ("torch", "bitsandbytes", "transformers", "safetensors", "huggingface_hub"):
        assert report["packages"][name] == importlib.metadata.version(name)
    assert report["bloomconv"]["version"] == importlib.metadata.version("bloomconv")
    assert report["python"]["version"] == ".".join(map(str, sys.version_info[:3]))
    assert report["kernels"] == {"built": kernels.available(), "isas": list(kernels.isas()),
                                 "bf16_tiles": kernels.bf16_tiles(), "int8_dot_products": kernels.int8_dot_products(),
                                 "threads": kernels.kernel_threads()}
    assert report["torch"]["cuda"] == torch.version.cuda
    assert len(report["cuda_devices"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert report["platform"]["cpus"] == os.cpu_count()


def test_env_text_names_every_package_and_a_broken_cuda(monkeypatch):
    def broken():
        raise RuntimeError("driver too old")
    monkeypatch.setattr(torch.cuda, "is_available", broken)
    result = CliRunner().invoke(main, ["env"])
    assert result.exit_code == 0, result.output
    rows = dict(line.split(None, 1) for line in result.stdout.replace("CUDA devices", "CUDA-devices").splitlines())
    assert rows["torch"].startswith(torch.__version__) and rows["CUDA-devices"] == "RuntimeError: driver too old"
    assert rows["bitsandbytes"] == importlib.metadata.version("bitsandbytes")
    assert rows["kernels"].startswith("built, " if kernels.available() else "not built")


def test_env_lists_cuda_devices(monkeypatch):
    """No GPU here: torch's answers are stood in for, to check what is made of them."""
    from types import SimpleNamespace
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(
        name=f"GPU{i}", major=9, minor=0, total_memory=(i + 1) * 2**30))
    result = CliRunner().invoke(main, ["env", "--json"])
    assert json.loads(result.stdout)["cuda_devices"] == [
        {"index": 0, "name": "GPU0", "capability": "9.0", "memory_bytes": 2**30},
        {"index": 1, "name": "GPU1", "capability": "9.0", "memory_bytes": 2**31}]
    assert "CUDA devices    0: GPU0, compute 9.0, 1.0 GiB; 1: GPU1, compute 9.0, 2.0 GiB\n" in CliRunner().invoke(
        main, ["env"]).stdout


def test_python_dash_m_bloomconv_is_the_command():
    run = subprocess.run([sys.executable, "-m", "bloomconv", "--help"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and "Usage: python -m bloomconv" in run.stdout, run.stderr
    assert {"convert", "quantize", "verify", "inspect", "env", "example"} <= set(re.findall(r"^  (\w+) ", run.stdout, re.M))
    run = subprocess.run([sys.executable, "-m", "bloomconv", "env", "--json"], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0 and json.loads(run.stdout)["packages"]["torch"] == torch.__version__, run.stderr


# -------------------------------------------------------------------------------- inspect

def test_inspect_text_shows_the_transformers_record_when_there_is_one(converted, monkeypatch):
    import bloomconv.inspection
    plain = CliRunner().invoke(main, ["inspect", str(converted)])
    assert plain.exit_code == 0 and ("transformers" in plain.stdout) == (
        bloomconv.inspection.inspect(converted).get("transformers") is not None)
    real = bloomconv.inspection.inspect
    monkeypatch.setattr(bloomconv.inspection, "inspect",
                        lambda directory: {**real(directory), "transformers": {"loads": True, "needs": None}})
    result = CliRunner().invoke(main, ["inspect", str(converted)])
    assert result.exit_code == 0 and "\n  transformers  loads=True\n" in result.stdout, result.stdout
