"""Hostile inputs: fuzzed manifests and safetensors headers, code-running pickles, symlinks.

Every case ends in a BloomconvError subclass (or a clean result); nothing is read or written
outside the directory a manifest describes; pickled code never runs. Symlink policy (README,
Reliability): a source may be made of symlinks leading anywhere (a Hugging Face cache snapshot
links into ../../blobs/); the files a manifest lists must be regular files inside its directory;
the converter never writes through a symlink.
"""
from __future__ import annotations

import collections
import contextlib
import copy
import functools
import json
import os
import shutil
import struct
import sys
import tempfile
import tracemalloc
import zipfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bloomconv
from bloomconv.cli import main
from bloomconv.converters.convert import convert
from bloomconv.converters.source import _shard_contents
from bloomconv.errors import (BloomconvError, DestinationError, HeaderError, ManifestError, SourceError,
                              UnsafeCheckpointError)
from bloomconv.format import JOURNAL_DIR, MANIFEST_NAME, SAFETENSORS_DTYPES, TMP_MARKER
from bloomconv.inspection import inspect
from bloomconv.manifest import read_manifest
from bloomconv.runtime.records import UnitBytes
from bloomconv.safetensors_io import MAX_HEADER_BYTES, read_header
from bloomconv.verification import verify

from .conftest import fail_on_nth_write, record_figures, reliability_scale

FUZZ = settings(max_examples=reliability_scale(ci=150, full=4000), deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])
FUZZ_CASES: collections.Counter = collections.Counter()


def count_case(target: str, outcome: str) -> None:
    """Tally one case; `outcome` says how far it got (refused by the parser, or further)."""
    FUZZ_CASES[f"{target}: {outcome}"] += 1
    record_figures("fuzz", cases=dict(sorted(FUZZ_CASES.items())), total=sum(FUZZ_CASES.values()))


# -- what was opened: an audit hook sees every open() and os.open() in the process ---------------

_opened: list[str] | None = None


def _audit(event, args):
    if _opened is not None and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        _opened.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)


@contextlib.contextmanager
def opened_files():
    global _opened
    _opened = []
    try:
        yield _opened
    finally:
        _opened = None


def assert_nothing_opened_under(opened: list[str], forbidden: Path) -> None:
    reached = [p for p in opened if Path(p).resolve().is_relative_to(forbidden)]
    assert not reached, f"opened outside the directory: {reached}"


# -- the manifest parser and its readers (verify, inspect, load) ---------------------------------

@pytest.fixture(scope="module")
def planted(converted, tmp_path_factory):
    """A converted directory next to an 'outside' folder, with links leading out and in."""
    root = tmp_path_factory.mktemp("planted")
    directory = shutil.copytree(converted, root / "model")
    outside = root / "outside"
    outside.mkdir()
    shutil.copy(directory / "block_000.safetensors", outside / "secret.safetensors")
    (directory / "link.safetensors").symlink_to(outside / "secret.safetensors")
    (directory / "inner-link.safetensors").symlink_to("block_000.safetensors")
    (directory / "linked-dir").symlink_to(outside, target_is_directory=True)
    return directory, outside, json.loads((directory / MANIFEST_NAME).read_text())


HOSTILE_NAMES = [
    "../outside/secret.safetensors", "/etc/passwd", "link.safetensors", "linked-dir/secret.safetensors",
    "inner-link.safetensors", "blocks/../link.safetensors", "./config.json", ".", "..", "", "blocks",
    "blocks/", "blocks//block_000.safetensors", "a\x00b", "..\\outside\\secret.safetensors", "\udcff",
    "blocks/\udc80.safetensors", "~/secret", "%2e%2e/outside", "x" * 300, "/", "//etc/passwd",
    ".bloomconv-journal/../../outside/secret.safetensors", "blocks/block_000.safetensors/..",
]
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=8)
NAMES = st.one_of(st.sampled_from(HOSTILE_NAMES), st.text(max_size=30),
                  st.lists(st.sampled_from(["..", ".", "blocks", "link.safetensors", "", "outside", "linked-dir",
                                            "secret.safetensors", "config.json"]), min_size=1, max_size=5).map("/".join))


def _containers(node):
    """Every dict and list in a JSON tree, to pick a place to mutate."""
    yield node
    for child in (node.values() if isinstance(node, dict) else node):
        if isinstance(child, (dict, list)):
            yield from _containers(child)


@st.composite
def hostile_manifests(draw, original: dict) -> bytes:
    manifest = copy.deepcopy(original)
    for _ in range(draw(st.integers(1, 3))):
        how = draw(st.sampled_from(["name", "name", "replace", "delete", "add", "number", "raw"]))
        files = manifest.get("files") if isinstance(manifest, dict) else None
        entries = [f for f in files if isinstance(f, dict)] if isinstance(files, list) else []
        if how == "name" and entries:
            draw(st.sampled_from(entries))["name"] = draw(NAMES)
            continue
        containers = [c for c in _containers(manifest) if c] if isinstance(manifest, (dict, list)) else []
        if how in ("replace", "delete", "add", "number") and containers:
            node = draw(st.sampled_from(containers))
            key = draw(st.sampled_from(sorted(node, key=str) if isinstance(node, dict) else range(len(node))))
            if how == "delete":
                del node[key]
            elif how == "add" and isinstance(node, dict):
                node[draw(st.text(max_size=8))] = draw(JSON_VALUES)
            elif how == "number":
                node[key] = draw(st.sampled_from([-1, 0, 2**63, 2**64 + 1, 10**30, 1.5, True, None, "7"]))
            else:
                node[key] = draw(JSON_VALUES)
    raw = json.dumps(manifest).encode("utf-8", "surrogatepass")
    if draw(st.booleans()) and draw(st.booleans()):  # byte-level damage: cut, splice, invalid UTF-8
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(st.sampled_from([b"", b"\xff\xfe", b"\x00", b'"', b"]}", b"\xc3("])) + \
            raw[at + draw(st.integers(0, 8)):]
    return raw


@FUZZ
@given(data=st.data())
def test_fuzzed_manifest_is_refused_or_verified_inside_the_directory(planted, data):
    directory, outside, original = planted
    raw = data.draw(hostile_manifests(original))
    (directory / MANIFEST_NAME).write_bytes(raw)
    with opened_files() as opened:
        try:
            manifest = read_manifest(directory)
        except ManifestError:
            count_case("manifest", "refused")
            return
        count_case("manifest", "parsed, then verified and inspected")
        for entry in manifest.files:  # a parsed name never climbs out, before any symlink
            assert os.path.normpath(directory / entry.name).startswith(str(directory) + os.sep), entry.name
        with contextlib.suppress(BloomconvError):
            inspect(directory)
        with contextlib.suppress(BloomconvError):
            report = verify(directory, fast=data.draw(st.booleans()))
            links = {"link.safetensors", "linked-dir/secret.safetensors", "inner-link.safetensors"}
            for entry in manifest.files:  # a listed link is reported, never followed
                if entry.name in links:
                    assert any(p.file == entry.name and p.kind in ("outside", "not a file") for p in report.problems)
    assert_nothing_opened_under(opened, outside)


def test_manifest_listing_no_files_is_reported_not_crashed_on(converted_copy):
    manifest = json.loads((converted_copy / MANIFEST_NAME).read_text())
    manifest["files"] = []  # found by the fuzzer: the SHA256SUMS check assumed one line at least
    (converted_copy / MANIFEST_NAME).write_text(json.dumps(manifest))
    problems = verify(converted_copy).problems
    assert ("manifest.json", "corrupted") in [(p.file, p.kind) for p in problems]


def test_deeply_nested_manifest_is_refused(converted_copy):
    (converted_copy / MANIFEST_NAME).write_bytes(b'{"format": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    with pytest.raises(ManifestError, match="unreadable"):
        read_manifest(converted_copy)


@pytest.mark.parametrize("name", ["../outside/secret.safetensors", "/etc/passwd", "\udcff", ".", "a\x00b",
                                  "blocks/../../x", "blocks\\..\\..\\x"])
def test_manifest_name_leaving_or_not_naming_a_file_is_refused(converted_copy, name):
    manifest = json.loads((converted_copy / MANIFEST_NAME).read_text())
    manifest["files"][0]["name"] = name
    (converted_copy / MANIFEST_NAME).write_text(json.dumps(manifest))
    result = CliRunner().invoke(main, ["verify", "--quiet", str(converted_copy)])
    assert result.exit_code == 2 and "manifest is unreadable" in result.output, result.output
    with pytest.raises(ManifestError):
        bloomconv.load(converted_copy)


@pytest.mark.parametrize("n_layer,refused", [(10**18, False), (0, True), (-1, True), ("3", True), (None, True)])
def test_absurd_geometry_in_a_manifest_is_refused_or_shown_in_bounded_time(converted_copy, n_layer, refused):
    manifest = json.loads((converted_copy / MANIFEST_NAME).read_text())
    manifest["model"]["n_layer"] = n_layer  # counting parameters must not enumerate 10^18 blocks
    (converted_copy / MANIFEST_NAME).write_text(json.dumps(manifest))
    result = CliRunner().invoke(main, ["inspect", "--json", str(converted_copy)])
    if refused:
        assert result.exit_code == 2 and "invalid model record" in result.output, result.output
    else:
        assert result.exit_code == 0 and json.loads(result.output)["parameters"] > 10**18


# -- the safetensors header reader --------------------------------------------------------------

def _tensors_and_data(draw):
    tensors, offset = {}, 0
    for i in range(draw(st.integers(0, 4))):
        dtype = draw(st.sampled_from(sorted(SAFETENSORS_DTYPES)))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        nbytes = SAFETENSORS_DTYPES[dtype][1]
        for d in shape:
            nbytes *= d
        tensors[f"t{i}"] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    return tensors, offset


ABSURD = st.sampled_from([-1, 2**63, 2**64, 2**64 + 7, 10**40, 1.5, True, None, "8", [], {}, [1, 2, 3]])


@st.composite
def hostile_safetensors(draw) -> bytes:
    """A well-formed file, then one to three kinds of damage."""
    tensors, data_size = _tensors_and_data(draw)
    header: dict = {"__metadata__": {"format": "pt"}, **tensors}
    data = bytes(draw(st.binary(min_size=data_size, max_size=data_size)))
    header_len = None
    for _ in range(draw(st.integers(0, 3))):
        how = draw(st.sampled_from(["offsets", "overlap", "dtype", "shape", "absurd shape", "metadata",
                                    "entry", "length", "data", "name"]))
        target = tensors[draw(st.sampled_from(sorted(tensors)))] if tensors else None
        if how == "offsets" and target:
            target["data_offsets"][draw(st.integers(0, 1))] = draw(st.one_of(st.integers(-2**65, 2**65), ABSURD))
        elif how == "overlap" and len(tensors) > 1:
            first, second = (tensors[k] for k in sorted(tensors)[:2])
            second["data_offsets"] = list(first["data_offsets"])
        elif how == "dtype" and target:
            target["dtype"] = draw(st.one_of(st.sampled_from(["F8_E4M3", "C64", "I4", "", "f32", "BF16 "]), ABSURD))
        elif how == "shape" and target:
            target["shape"] = draw(st.one_of(st.lists(st.one_of(st.integers(-3, 2**66), ABSURD), max_size=4), ABSURD))
        elif how == "absurd shape" and target:
            target["shape"] = draw(st.sampled_from([[2**40, 2**40, 2**40], [1] * 5000, [2**64 - 1, 2], [0, 2**70]]))
        elif how == "metadata":
            header["__metadata__"] = draw(JSON_VALUES)
        elif how == "entry" and target:
            header[draw(st.sampled_from(sorted(tensors)))] = draw(JSON_VALUES)
        elif how == "length":
            header_len = draw(st.sampled_from([0, 1, 7, 2**63, 2**63 - 1, 2**64 - 1, MAX_HEADER_BYTES + 1,
                                               10**9, -1, +1, "cut"]))
        elif how == "data":
            data = data[:draw(st.integers(0, len(data)))] if draw(st.booleans()) else data + b"\0" * draw(st.integers(1, 9))
        elif how == "name" and len(header) > 1:
            old_name = draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
            header[draw(st.sampled_from(["\udc80", "", "__metadata__", "x" * 1000, "a\x00b"]))] = header.pop(old_name)
    raw = json.dumps(header).encode("utf-8", "surrogatepass")
    if header_len == "cut":
        raw = raw[:len(raw) // 2]
        header_len = None
    if header_len in (-1, +1):  # off by one either way
        header_len = len(raw) + header_len
    length = struct.pack("<Q", len(raw) if header_len is None else header_len)
    return length + raw + data


def check_header_consistency(path: Path) -> None:
    """read_header either refuses with HeaderError or returns offsets that tile the file exactly,
    and the runtime can view every tensor of it. Returns which."""
    try:
        header = read_header(path)
    except HeaderError:
        return "refused"
    raw = path.read_bytes()
    assert header.file_size == len(raw)
    cursor = 0
    for info in sorted(header.tensors.values(), key=lambda i: (i.begin, i.end)):  # empty ones anywhere
        assert info.begin == cursor and info.end <= header.file_size - header.data_start
        cursor = info.end
    assert cursor == header.file_size - header.data_start
    views = UnitBytes.parse(header, torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8), {})
    for name, info in header.tensors.items():
        assert tuple(views.get(name).shape) == info.shape
    return "accepted, consistent"


@FUZZ
@given(raw=hostile_safetensors())
def test_fuzzed_safetensors_header_is_refused_or_exactly_consistent(raw):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        path.write_bytes(raw)
        count_case("safetensors header", check_header_consistency(path))
        try:  # the source reader (safetensors' own parser) must refuse the same way
            _shard_contents(Path(tmp), "model.safetensors")
        except SourceError:
            pass


@FUZZ
@given(raw=st.binary(max_size=200), length=st.one_of(st.none(), st.integers(0, 2**64 - 1)))
def test_random_bytes_are_refused_as_a_header(raw, length):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.safetensors"
        path.write_bytes(raw if length is None else struct.pack("<Q", length) + raw)
        count_case("random bytes as safetensors", check_header_consistency(path))


@pytest.mark.parametrize("length", [2**64 - 1, 2**63, MAX_HEADER_BYTES + 1, MAX_HEADER_BYTES, 10**8])
def test_huge_header_length_allocates_nothing(tmp_path, length):
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", length) + b"{}")
    tracemalloc.start()
    try:
        with pytest.raises(HeaderError, match="header length"):
            read_header(path)
        assert tracemalloc.get_traced_memory()[1] < 1 << 20
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("header", [
    b"[" * 100_000 + b"]" * 100_000,                                           # nesting
    b'{"a": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 4]}}',  # 5000-digit int
    b'{"\\ud800": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}',    # lone surrogate name
    b'{"__metadata__": [], "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}',
    b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {"dtype": "F32", "shape": [1], '
    b'"data_offsets": [0, 4]}}',                                                # duplicate key: 4 bytes unclaimed
])
def test_malformed_header_is_a_header_error(tmp_path, header):
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    with pytest.raises(HeaderError):
        read_header(path)


# -- pickles that try to run code ---------------------------------------------------------------

class _Reduce:
    """Pickles as `func(*args)`: the way a malicious pickle runs code when loaded."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


class _SetState:
    """Any class import runs code on BUILD if its __setstate__ does."""

    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __setstate__(self, state):
        Path(state["sentinel"]).touch()


def _nested_globals_pickle(key: str, command: str) -> bytes:
    """{key: getattr(__import__('os'), 'system')(command)} as protocol-2 opcodes: no Python object
    pickles to calls nested this way, so they are written by hand."""
    def text(s: str) -> bytes:
        return b"X" + struct.pack("<I", len(s.encode())) + s.encode()
    call = (b"cbuiltins\ngetattr\n" + b"cbuiltins\n__import__\n" + text("os") + b"\x85R"  # TUPLE1 REDUCE
            + text("system") + b"\x86R" + text(command) + b"\x85R")
    return b"\x80\x02}" + text(key) + call + b"s."  # PROTO EMPTY_DICT … SETITEM STOP


def _routes(sentinel: Path) -> dict:
    """Each way a pickle runs code: an object to store in a shard, or a whole pickle (bytes)."""
    touch = f"open({str(sentinel)!r}, 'w').close()"
    import builtins
    import subprocess
    return {
        "os.system": _Reduce(os.system, f"touch {sentinel}"),
        "eval": _Reduce(eval, touch),
        "builtins.exec": _Reduce(builtins.exec, touch),
        "subprocess.call": _Reduce(subprocess.call, ["touch", str(sentinel)]),
        "nested getattr/__import__": _nested_globals_pickle("h.0.input_layernorm.weight", f"touch {sentinel}"),
        "setstate of an arbitrary class": _SetState(sentinel),
        "torch.load inside the pickle": _Reduce(functools.partial(torch.load, weights_only=False),
                                                str(sentinel.with_suffix(".evil"))),
    }


ROUTES = list(_routes(Path("x")))


def _write_shard(path: Path, state: dict, container: str) -> None:
    """`state` (or a whole pickle, bytes) as a torch zip archive or a plain/legacy pickle file."""
    if container == "legacy pickle":
        if isinstance(state, bytes):
            path.write_bytes(state)
        else:
            torch.save(state, path, _use_new_zipfile_serialization=False)
        return
    if not isinstance(state, bytes):
        torch.save(state, path)
        return
    torch.save({}, path)  # a genuine archive, then its data.pkl swapped for the hand-made pickle
    with zipfile.ZipFile(path) as archive:
        entries = {info.filename: archive.read(info) for info in archive.infolist()}
    entries[next(n for n in entries if n.endswith("/data.pkl"))] = state
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("container", ["torch zip", "legacy pickle"])
def test_code_running_pickle_is_refused_and_never_runs(route, container, release_checkpoint, tmp_path):
    src = shutil.copytree(release_checkpoint, tmp_path / "src")
    sentinel = tmp_path / "pwned"
    # for the torch.load route: itself a code-running pickle
    torch.save({"x": _Reduce(os.system, f"touch {sentinel}")}, sentinel.with_suffix(".evil"),
               _use_new_zipfile_serialization=False)
    shard = src / "pytorch_model_00002-of-00005.bin"
    payload = _routes(sentinel)[route]
    if isinstance(payload, bytes):
        state = payload
    else:
        state = torch.load(shard, weights_only=True)
        state["h.0.input_layernorm.weight"] = payload
    _write_shard(shard, state, container)
    result = CliRunner().invoke(main, ["convert", "--quiet", str(src), str(tmp_path / "dst")])
    assert result.exit_code == 2, result.output
    assert "pytorch_model_00002-of-00005.bin" in result.output
    with pytest.raises(SourceError) as refused:
        convert(src, tmp_path / "dst")
    if container == "torch zip":
        assert isinstance(refused.value, UnsafeCheckpointError), refused.value
    assert not sentinel.exists(), "pickled code ran"
    assert not (tmp_path / "dst").exists()
    count_case("code-running pickles", "refused, sentinel absent")


@pytest.mark.parametrize("route", ROUTES)
def test_each_route_does_run_code_when_unpickled_unsafely(route, tmp_path):
    """The payloads are live: plain pickle.loads runs every one (so the sentinel proves something)."""
    import pickle
    sentinel = tmp_path / "ran"
    torch.save({"x": _Reduce(os.system, f"touch {sentinel}")}, sentinel.with_suffix(".evil"),
               _use_new_zipfile_serialization=False)
    payload = _routes(sentinel)[route]
    pickle.loads(payload if isinstance(payload, bytes) else pickle.dumps({"w": payload}, protocol=2))
    assert sentinel.exists()


# -- symlinks -----------------------------------------------------------------------------------

def test_hugging_face_cache_snapshot_of_symlinks_converts(release_checkpoint, tmp_path):
    """snapshots/<rev>/<file> -> ../../blobs/<sha>, as huggingface_hub lays out its cache."""
    repo = tmp_path / "models--bigscience--bloom-tiny"
    snapshot = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, file in enumerate(sorted(release_checkpoint.iterdir())):
        blob = repo / "blobs" / f"blob{i:04d}"
        shutil.copy(file, blob)
        (snapshot / file.name).symlink_to(Path("../../blobs") / blob.name)
    manifest = convert(snapshot, tmp_path / "dst")
    assert {f.name for f in manifest.source_files} == {p.name for p in release_checkpoint.iterdir()
                                                         if p.name != "pytorch_model.bin.index.json"}
    assert verify(tmp_path / "dst").ok
    assert not any(p.is_symlink() for p in (tmp_path / "dst").rglob("*"))


@pytest.mark.parametrize("where", ["outside", "inside"])
def test_listed_file_replaced_by_a_symlink_is_reported_and_never_read(converted_copy, tmp_path, where):
    name = "block_001.safetensors"
    target = (tmp_path / "elsewhere" if where == "outside" else converted_copy) / "copy.safetensors"
    target.parent.mkdir(exist_ok=True)
    shutil.move(converted_copy / name, target)  # same bytes: only the link itself is wrong
    (converted_copy / name).symlink_to(target)
    with opened_files() as opened:
        report = verify(converted_copy)
        with pytest.raises(BloomconvError, match=name):
            bloomconv.load(converted_copy, verify="full")
    problem = next(p for p in report.problems if p.file == name)
    assert problem.kind == ("outside" if where == "outside" else "not a file"), report.problems
    assert str(target) not in opened and not any(p.endswith("copy.safetensors") for p in opened)


def test_fifo_in_place_of_a_listed_file_is_reported_without_blocking(converted_copy):
    name = "config.json"
    (converted_copy / name).unlink()
    os.mkfifo(converted_copy / name)
    report = verify(converted_copy)  # opening a FIFO for reading would wait forever
    assert [(p.file, p.kind) for p in report.problems] == [(name, "not a file")]


def test_file_name_that_is_not_utf8_is_reported_as_extra(converted_copy):
    (converted_copy / os.fsdecode(b"\xff\xfe.safetensors")).write_bytes(b"x")
    problems = verify(converted_copy).problems
    assert [(p.file, p.kind) for p in problems] == [("\udcff\udcfe.safetensors", "extra")]
    result = CliRunner().invoke(main, ["verify", "--quiet", "--json", str(converted_copy)])
    assert result.exit_code == 1 and json.loads(result.output)["problems"][0]["kind"] == "extra"


def test_symlinked_directory_planted_in_the_output_is_extra(converted_copy, tmp_path):
    (converted_copy / "more").symlink_to(tmp_path, target_is_directory=True)
    assert [(p.file, p.kind) for p in verify(converted_copy).problems] == [("more", "extra")]


def test_converter_never_writes_through_a_planted_symlink(release_checkpoint, tmp_path):
    """Temporary names are predictable (.NAME.tmp-PID): links planted there, dangling or not, must
    be neither followed nor truncated; the lock file is opened without following a link too."""
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim"
    victim.write_bytes(b"precious")
    dst = tmp_path / "dst"
    dst.mkdir()
    pid = os.getpid()
    for i, name in enumerate(["config.json", ".bloomconv-job.json", "SHA256SUMS", "manifest.json"]):
        (dst / f".{name}{TMP_MARKER}{pid}").symlink_to(victim if i % 2 else outside / f"created-{i}")
    convert(release_checkpoint, dst)
    assert victim.read_bytes() == b"precious" and sorted(p.name for p in outside.iterdir()) == ["victim"]
    assert verify(dst).ok

    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / ".bloomconv.lock").symlink_to(outside / "lock-target")
    with pytest.raises(DestinationError, match="symbolic link"):
        convert(release_checkpoint, locked)
    assert sorted(p.name for p in outside.iterdir()) == ["victim"]


def test_resume_refuses_a_journal_folder_replaced_by_a_symlink(release_checkpoint, tmp_path, monkeypatch):
    from bloomconv.converters import convert as convert_module
    real_write = fail_on_nth_write(monkeypatch, 3, KeyboardInterrupt())
    dst = tmp_path / "dst"
    with pytest.raises(KeyboardInterrupt):
        convert(release_checkpoint, dst)
    monkeypatch.setattr(convert_module, "write_safetensors", real_write)
    outside = tmp_path / "outside"
    shutil.move(dst / JOURNAL_DIR, outside)
    (dst / JOURNAL_DIR).symlink_to(outside, target_is_directory=True)
    before = sorted(p.name for p in outside.iterdir())
    with pytest.raises(DestinationError, match="symbolic link"):
        convert(release_checkpoint, dst)
    assert sorted(p.name for p in outside.iterdir()) == before
