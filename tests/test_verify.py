"""verify: every fault class is reported by file name, expected vs found, with the right exit code."""
from __future__ import annotations

import json
import os
import shutil

import pytest
from click.testing import CliRunner

from bloomconv.cli import main
from bloomconv.errors import ManifestError
from bloomconv.format import JOB_NAME, MANIFEST_NAME
from bloomconv.manifest import read_manifest
from bloomconv.verification import verify

BLOCK = "block_001.safetensors"


def run_verify(directory, *args):
    return CliRunner().invoke(main, ["verify", "--quiet", *args, str(directory)])


def only_problem(directory, kind, name, fast=False):
    report = verify(directory, fast=fast)
    assert [(p.file, p.kind) for p in report.problems] == [(name, kind)], report.problems
    return report.problems[0]


def test_clean_directory_passes(converted):
    assert verify(converted).ok and verify(converted, fast=True).ok
    result = run_verify(converted)
    assert result.exit_code == 0 and "OK" in result.output


def test_missing_file(converted_copy):
    (converted_copy / BLOCK).unlink()
    only_problem(converted_copy, "missing", BLOCK)
    result = run_verify(converted_copy)
    assert result.exit_code == 1 and f"{BLOCK}: missing" in result.output


def test_truncated_file(converted_copy):
    size = (converted_copy / BLOCK).stat().st_size
    os.truncate(converted_copy / BLOCK, size - 1)
    problem = only_problem(converted_copy, "truncated", BLOCK, fast=True)
    assert problem.expected == f"{size} bytes" and problem.actual == f"{size - 1} bytes"


@pytest.mark.parametrize("offset", [3, -1])  # in the header length, and the last data byte
def test_flipped_bit_is_corruption(converted_copy, offset):
    path = converted_copy / BLOCK
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    problem = only_problem(converted_copy, "corrupted", BLOCK)
    assert problem.expected == f"sha256 {read_manifest(converted_copy).file(BLOCK).sha256}"
    assert run_verify(converted_copy).exit_code == 1


def test_fast_mode_catches_damaged_header_and_swapped_blocks(converted_copy):
    a, b = converted_copy / "block_000.safetensors", converted_copy / "block_002.safetensors"
    tmp = a.with_suffix(".x")
    a.rename(tmp), b.rename(a), tmp.rename(b)
    report = verify(converted_copy, fast=True)
    assert {(p.file, p.kind) for p in report.problems} == {(a.relative_to(converted_copy).as_posix(), "header"),
                                                            (b.relative_to(converted_copy).as_posix(), "header")}
    assert "transformer.h.0" in report.problems[0].expected and "transformer.h.2" in report.problems[0].actual


def test_extra_file(converted_copy):
    (converted_copy / "block_099.safetensors").write_bytes(b"junk")
    only_problem(converted_copy, "extra", "block_099.safetensors")


def test_tampered_checksums_file(converted_copy):
    (converted_copy / "SHA256SUMS").write_text("0" * 64 + " *config.json\n")
    only_problem(converted_copy, "corrupted", "SHA256SUMS")


def test_json_report(converted_copy):
    (converted_copy / BLOCK).unlink()
    result = run_verify(converted_copy, "--json")
    assert result.exit_code == 1
    report = json.loads(result.output)
    assert report["ok"] is False and report["problems"][0]["file"] == BLOCK
    assert report["problems"][0]["kind"] == "missing"


def test_manifest_missing_unreadable_or_unknown_version_exit_2(converted_copy):
    manifest = converted_copy / MANIFEST_NAME
    original = manifest.read_bytes()
    manifest.write_bytes(original[: len(original) // 2])
    result = run_verify(converted_copy)
    assert result.exit_code == 2 and "manifest is unreadable" in result.output
    data = json.loads(original)
    data["format_version"] = 99
    manifest.write_text(json.dumps(data))
    result = run_verify(converted_copy)
    assert result.exit_code == 2 and "format version 99" in result.output
    manifest.unlink()
    result = run_verify(converted_copy)
    assert result.exit_code == 2 and "no manifest" in result.output
    with pytest.raises(ManifestError):
        verify(converted_copy)


def test_manifest_cannot_point_outside_the_directory(converted_copy):
    data = json.loads((converted_copy / MANIFEST_NAME).read_text())
    data["files"][0]["name"] = "../../etc/passwd"
    (converted_copy / MANIFEST_NAME).write_text(json.dumps(data))
    result = run_verify(converted_copy)
    assert result.exit_code == 2 and "not a normalised relative path" in result.output


def test_unfinished_conversion_is_incomplete_not_corrupt(converted_copy):
    (converted_copy / MANIFEST_NAME).unlink()
    (converted_copy / JOB_NAME).write_text("{}")
    result = run_verify(converted_copy)
    assert result.exit_code == 2 and "conversion incomplete" in result.output


def test_inspect(converted):
    result = CliRunner().invoke(main, ["inspect", "--json", str(converted)])
    assert result.exit_code == 0
    info = json.loads(result.output)
    assert info["model"]["n_layer"] == 3 and info["quantization"] is None
    assert info["total_bytes"] == sum(f["size"] for f in info["files"])
    text = CliRunner().invoke(main, ["inspect", str(converted)]).output
    assert "3 blocks" in text and "bfloat16" in text
