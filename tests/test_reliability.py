"""Reliability: killed anywhere, disk full, two writers at once, wrong models.

Reduced by default; `BLOOMCONV_FULL_RELIABILITY=1` runs the full suites (see conftest.py and the
README's Reliability section). Figures are printed at the end of the session.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from click.testing import CliRunner

from bloomconv.cli import main
from bloomconv.converters.convert import convert
from bloomconv.converters.destination import Destination
from bloomconv.converters.example import write_example_checkpoint
from bloomconv.errors import DestinationBusyError, IncompleteDirectoryError, ManifestError
from bloomconv.format import JOB_NAME, JOURNAL_DIR, LOCK_NAME, MANIFEST_NAME, TMP_MARKER, all_units
from bloomconv.verification import verify

from .conftest import FULL_RELIABILITY, SMALL, edit_config, record_figures, reliability_scale

KILL_GEOMETRY = (128, 6, 4, 2048)  # hidden, layers, heads, vocab: a run of 0.2-0.5 s, 12 files
SCHEMES = {"convert": ["convert"], "int8": ["quantize", "--bits", "8"], "nf4": ["quantize", "--bits", "4"]}
# Kill points per scheme: after delays spread evenly over an uninterrupted run, and as soon as the
# destination holds given fractions of its final bytes (or its SHA256SUMS, or its manifest).
KILLS_BY_TIME = reliability_scale(ci=1, full=16)
KILLS_BY_BYTES = reliability_scale(ci=2, full=10)
KILLS_REQUIRED = reliability_scale(ci=2, full=20)    # of these must land while the run is going

# Forks one `bloomconv` command per request from a process that has imported everything a run
# needs, so a kill point costs the run itself rather than two seconds of imports. The child runs
# the CLI's own `main`; the parent times it and SIGKILLs it through a pidfd (which cannot reach a
# recycled pid), and reaps it only when asked, so the test may signal the pid meanwhile.
LAUNCHER = r"""
import json, os, select, signal, sys, time
import bloomconv.cli, bloomconv.converters.convert, bloomconv.converters.encode, bloomconv.verification
started = {}


def stored_bytes(path):
    total, folders = 0, [path]
    while folders:
        try:
            entries = list(os.scandir(folders.pop()))
        except FileNotFoundError:
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    folders.append(entry.path)
                else:
                    total += entry.stat(follow_symlinks=False).st_size
            except FileNotFoundError:
                pass
    return total


def reached(when):
    if "after" in when:
        return time.monotonic() >= when["after"]
    if "exists" in when:
        return os.path.exists(when["exists"])
    return stored_bytes(when["bytes_in"]) >= when["bytes"]


print("ready", flush=True)
for line in sys.stdin:
    request = json.loads(line)
    if request["op"] == "start":
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        started_at = time.monotonic()
        pid = os.fork()
        if pid == 0:
            os.dup2(log, 1)
            os.dup2(log, 2)
            try:
                bloomconv.cli.main(request["args"], prog_name="bloomconv")
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        os.close(log)
        started[pid] = (os.pidfd_open(pid), started_at)
        print(json.dumps({"pid": pid}), flush=True)
    else:
        pidfd, started_at = started.pop(request["pid"])
        when, killed = request["kill_when"], False
        if when is not None and "after" in when:
            when = {"after": started_at + when["after"]}
        while when is not None and not select.select([pidfd], [], [], 0.0002)[0]:
            if reached(when):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                killed = True
                break
        _, status = os.waitpid(request["pid"], 0)
        os.close(pidfd)
        print(json.dumps({"exit": os.waitstatus_to_exitcode(status), "killed": killed,
                          "seconds": time.monotonic() - started_at}), flush=True)
"""


@dataclasses.dataclass
class Outcome:
    exit: int
    killed: bool
    seconds: float
    output: str


class Launcher:
    def __init__(self, logs):
        self.logs = logs
        self._count = 0
        self.process = subprocess.Popen([sys.executable, "-c", LAUNCHER], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)
        assert self.process.stdout.readline().strip() == "ready"

    def _ask(self, request: dict) -> dict:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())

    def start(self, args) -> tuple[int, object]:
        """Fork `bloomconv ARGS`; returns its pid (valid until `wait`) and its log path."""
        self._count += 1
        log = self.logs / f"run-{self._count}.log"
        return self._ask({"op": "start", "args": [str(a) for a in args], "log": str(log)})["pid"], log

    def wait(self, pid: int, log, kill_when: dict | None = None) -> Outcome:
        """Reap the run; SIGKILL it first if it is still running when `kill_when` is reached:
        {"after": seconds since its start}, {"exists": path} or {"bytes_in": folder, "bytes": n}."""
        reply = self._ask({"op": "wait", "pid": pid, "kill_when": kill_when})
        return Outcome(reply["exit"], reply["killed"], reply["seconds"], log.read_text(errors="replace"))

    def run(self, args, kill_when: dict | None = None) -> Outcome:
        return self.wait(*self.start(args), kill_when=kill_when)

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def launcher(tmp_path_factory):
    launcher = Launcher(tmp_path_factory.mktemp("launcher-logs"))
    yield launcher
    launcher.close()


@pytest.fixture(scope="module")
def kill_source(tmp_path_factory):
    return write_example_checkpoint(tmp_path_factory.mktemp("kill-src"), KILL_GEOMETRY, "release-pickle-shards")


def bookkeeping_left(directory) -> list[str]:
    """What a finished run must not leave behind: job record, journal, lock, temporary files."""
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                  if p.name in (JOB_NAME, JOURNAL_DIR, LOCK_NAME) or TMP_MARKER in p.name)


# -- killed anywhere -----------------------------------------------------------------------------

def state_at_kill(dst, n_units: int) -> str:
    """Which stage of a run the directory shows (the figures say where the kills landed)."""
    if (dst / MANIFEST_NAME).exists():
        return "after the manifest, before cleanup"
    if (dst / JOB_NAME).exists():
        journaled = [p for p in (dst / JOURNAL_DIR).glob("*.json") if not p.name.startswith("source__")]
        if not journaled:
            return "job recorded, no file finished"
        if len(journaled) < n_units:
            return "part of the files finished"
        return "all files finished, no manifest"
    if dst.exists() and any(dst.iterdir()):
        return "before the job record"
    return "before touching the destination"


def check_killed_directory(dst) -> None:
    """A directory with a manifest verifies in full; one without reads as incomplete, never corrupt."""
    if (dst / MANIFEST_NAME).exists():
        report = verify(dst)
        assert report.ok, f"manifest present but: {[str(p) for p in report.problems]}"
    elif (dst / JOB_NAME).exists() or (dst / LOCK_NAME).exists():
        with pytest.raises(IncompleteDirectoryError):
            verify(dst)
    else:
        with pytest.raises(ManifestError, match="no manifest"):
            verify(dst)


def kill_points(dst, duration: float, final_bytes: int) -> list[tuple[str, dict]]:
    points = [(f"{0.95 * (i + 0.5) / KILLS_BY_TIME:.0%} of the run", {"after": 0.95 * duration * (i + 0.5) / KILLS_BY_TIME})
              for i in range(KILLS_BY_TIME)]
    points += [(f"{(i + 1) / (KILLS_BY_BYTES + 1):.0%} of the bytes",
                {"bytes_in": str(dst), "bytes": final_bytes * (i + 1) // (KILLS_BY_BYTES + 1)})
               for i in range(KILLS_BY_BYTES)]
    if FULL_RELIABILITY:
        points += [(f"{name} written", {"exists": str(dst / name)}) for name in ("SHA256SUMS", MANIFEST_NAME)]
    return points


@pytest.mark.parametrize("scheme", SCHEMES)
def test_killed_anywhere_a_rerun_finishes_with_the_uninterrupted_manifest(scheme, kill_source, launcher, tmp_path):
    command = [*SCHEMES[scheme], "--quiet", kill_source]
    reference = launcher.run([*command, tmp_path / "reference"])
    assert reference.exit == 0, reference.output
    expected = (tmp_path / "reference" / MANIFEST_NAME).read_bytes()
    timing = launcher.run([*command, tmp_path / "timing"])  # warm, like the runs to kill
    assert timing.exit == 0 and (tmp_path / "timing" / MANIFEST_NAME).read_bytes() == expected
    duration = min(reference.seconds, timing.seconds)
    final_bytes = sum(p.stat().st_size for p in (tmp_path / "reference").rglob("*") if p.is_file())
    n_units = len(all_units(KILL_GEOMETRY[1]))
    states, killed, reruns_killed = collections.Counter(), 0, 0
    dst = tmp_path / "killed"
    points = kill_points(dst, duration, final_bytes)
    for number, (point, when) in enumerate(points):
        outcome = launcher.run([*command, dst], kill_when=when)
        if not outcome.killed:
            states["finished before the kill"] += 1
        else:
            killed += 1
            states[state_at_kill(dst, n_units)] += 1
            check_killed_directory(dst)
            if number % 3 == 2:  # kill the re-run too, part-way through re-hashing or redoing
                again = launcher.run([*command, dst], kill_when={"after": outcome.seconds / 2})
                if again.killed:
                    reruns_killed += 1
                    check_killed_directory(dst)
        rerun = launcher.run([*command, dst])
        assert rerun.exit == 0, f"{point}: {rerun.output}"
        assert (dst / MANIFEST_NAME).read_bytes() == expected, f"killed at {point}: manifest differs"
        report = verify(dst)
        assert report.ok, f"killed at {point}: {[str(p) for p in report.problems]}"
        assert not bookkeeping_left(dst), f"killed at {point}: {bookkeeping_left(dst)}"
        shutil.rmtree(dst)
    record_figures(f"kill-anywhere/{scheme}", kill_points=len(points), killed_mid_run=killed, survived=killed,
                   reruns_also_killed=reruns_killed, uninterrupted_seconds=round(duration, 3), where=dict(states))
    assert killed >= KILLS_REQUIRED, f"only {killed} of {len(points)} kills landed before the run ended: {states}"


def test_run_killed_between_its_manifest_and_its_cleanup_verifies_and_reruns(converted_copy, release_checkpoint):
    """The state a kill leaves after the manifest (bookkeeping and lock still there), made
    deterministically: the directory is complete, so verify passes; a re-run cleans up."""
    (converted_copy / JOB_NAME).write_text("{}")
    (converted_copy / JOURNAL_DIR).mkdir()
    (converted_copy / JOURNAL_DIR / "block_000.json").write_text("{}")
    (converted_copy / LOCK_NAME).touch()
    assert verify(converted_copy).ok
    assert CliRunner().invoke(main, ["verify", "--quiet", str(converted_copy)]).exit_code == 0
    convert(release_checkpoint, converted_copy)
    assert not bookkeeping_left(converted_copy) and verify(converted_copy).ok


def test_run_killed_before_its_job_record_reads_incomplete(tmp_path):
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / LOCK_NAME).touch()  # all a run has written before its job record
    result = CliRunner().invoke(main, ["verify", "--quiet", str(tmp_path / "dst")])
    assert result.exit_code == 2 and "conversion incomplete" in result.output


# -- disk full -----------------------------------------------------------------------------------

PAGE = 4096


class SmallDisk:
    """A tmpfs of a chosen size mounted inside the test's directory (needs root, as on CI)."""

    def __init__(self, mount_point):
        self.mount_point = mount_point
        mount_point.mkdir()
        self.mounted = False

    def _mount(self, options: list[str], size: int) -> None:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join([*options, f"size={size}"]), "tmpfs",
                               str(self.mount_point)], capture_output=True, text=True)
        if done.returncode != 0:
            if not self.mounted:
                pytest.skip(f"cannot mount a tmpfs to fill up ({done.stderr.strip()}); the disk-full suite "
                            "needs root or CAP_SYS_ADMIN")
            raise RuntimeError(done.stderr)
        self.mounted = True

    def resize(self, size: int) -> None:
        self._mount(["remount"] if self.mounted else [], size)

    def unmount(self) -> None:
        if self.mounted:
            subprocess.run(["umount", str(self.mount_point)], check=True)
            self.mounted = False


@pytest.fixture
def small_disk(tmp_path):
    disk = SmallDisk(tmp_path / "disk")
    try:
        yield disk
    finally:
        disk.unmount()


def pages(size: int) -> int:
    return -(-size // PAGE)


def peak_pages(directory) -> int:
    """tmpfs pages a run into `directory` holds at its peak, when the manifest is written: every
    output file plus a page each for the job record and the journal entries (one per unit file
    and one per source file)."""
    manifest = json.loads((directory / MANIFEST_NAME).read_text())
    n_units = manifest["model"]["n_layer"] + 2
    journal = 1 + n_units + len(manifest["source"]["files"])
    return sum(pages(p.stat().st_size) for p in directory.rglob("*") if p.is_file()) + journal


DISK_FULL_SCHEMES = ["convert", "int8"] if FULL_RELIABILITY else ["convert"]


@pytest.mark.parametrize("scheme", DISK_FULL_SCHEMES)
def test_disk_full_names_the_destination_leaves_no_manifest_and_resumes(scheme, release_checkpoint, small_disk,
                                                                        tmp_path):
    command = [*SCHEMES[scheme], "--quiet", str(release_checkpoint)]
    reference = tmp_path / "reference"
    assert CliRunner().invoke(main, [*command, str(reference)]).exit_code == 0
    needed = peak_pages(reference)
    # full: from one page to one page short of the peak; the last fails writing the manifest
    n_sizes = reliability_scale(ci=3, full=16)
    sizes = sorted({1 + (needed - 2) * i // (n_sizes - 1) for i in range(n_sizes)} | {needed - 1})
    failures = collections.Counter()
    for n_pages in sizes:
        small_disk.resize(n_pages * PAGE)
        dst = small_disk.mount_point / "out"
        result = CliRunner().invoke(main, [*command, str(dst)])
        assert result.exit_code == 2, f"{n_pages} pages: {result.output} {result.exception!r}"
        assert f"{dst}: no space left on the destination's filesystem" in result.output
        assert "re-run the same command to resume" in result.output
        assert not (dst / MANIFEST_NAME).exists()
        assert not [p for p in dst.rglob("*") if TMP_MARKER in p.name], "a temporary file was left on the full disk"
        failures[state_at_kill(dst, len(all_units(SMALL[1])))] += 1
        if n_pages == needed - 1:
            assert state_at_kill(dst, len(all_units(SMALL[1]))) == "all files finished, no manifest"
        small_disk.resize((needed + 16) * PAGE)  # space freed
        result = CliRunner().invoke(main, [*command, str(dst)])
        assert result.exit_code == 0, result.output
        assert (dst / MANIFEST_NAME).read_bytes() == (reference / MANIFEST_NAME).read_bytes()
        assert verify(dst).ok
        shutil.rmtree(dst)
    # the peak estimate is exact: one page more than the last failing size is enough
    small_disk.resize(needed * PAGE)
    assert CliRunner().invoke(main, [*command, str(small_disk.mount_point / "fits")]).exit_code == 0
    record_figures(f"disk-full/{scheme}", sizes_tried=len(sizes), peak_pages=needed, where=dict(failures))


# -- two writers, and verify while one runs -------------------------------------------------------

def wait_for(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.001)


def verify_outcome(directory) -> str:
    """'ok', 'incomplete', 'no manifest' or the problems: what verify says right now."""
    try:
        report = verify(directory)
    except IncompleteDirectoryError:
        return "incomplete"
    except ManifestError as exc:
        return "no manifest" if "no manifest" in str(exc) else str(exc)
    return "ok" if report.ok else "; ".join(str(p) for p in report.problems)


def test_second_writer_fails_on_the_lock_and_verify_reads_incomplete(kill_source, launcher, tmp_path):
    dst = tmp_path / "dst"
    command = [*SCHEMES["nf4"], "--quiet", kill_source, dst]
    first, first_log = launcher.start(command)
    try:
        wait_for(lambda: (dst / JOB_NAME).exists())
        os.kill(first, signal.SIGSTOP)  # holding the lock, part-way: the second writer cannot miss it
        assert verify_outcome(dst) == "incomplete"
        result = CliRunner().invoke(main, ["verify", "--quiet", str(dst)])
        assert result.exit_code == 2 and "conversion incomplete" in result.output
        second = launcher.run(command)
        assert second.exit == 2
        assert f"{dst}: another bloomconv process is writing here" in second.output
    finally:
        os.kill(first, signal.SIGCONT)
    seen, deadline = collections.Counter(), time.monotonic() + 60
    while (not (dst / MANIFEST_NAME).exists() or (dst / JOB_NAME).exists()) and time.monotonic() < deadline:
        seen[verify_outcome(dst)] += 1
        time.sleep(0.002)
    outcome = launcher.wait(first, first_log)
    assert outcome.exit == 0, outcome.output
    seen[verify_outcome(dst)] += 1
    assert set(seen) <= {"incomplete", "ok"}, seen  # never "corrupt" while the conversion runs
    assert verify(dst).ok and not bookkeeping_left(dst)
    record_figures("concurrency", verify_calls_during_a_run=dict(seen))


def test_two_writers_started_together_one_converts(kill_source, launcher, tmp_path):
    dst = tmp_path / "dst"
    command = [*SCHEMES["convert"], "--quiet", kill_source, dst]
    runs = [launcher.start(command), launcher.start(command)]
    outcomes = [launcher.wait(pid, log) for pid, log in runs]
    assert sorted(o.exit for o in outcomes)[0] == 0, [o.output for o in outcomes]
    for o in outcomes:  # the other was locked out, or came after the first had finished
        assert o.exit == 0 or (o.exit == 2 and "another bloomconv process is writing here" in o.output), o.output
    record_figures("concurrency", started_together_exit_codes=sorted(o.exit for o in outcomes))
    assert verify(dst).ok and not bookkeeping_left(dst)


def test_lock_survives_the_holder_unlinking_it_on_exit(release_checkpoint, tmp_path, monkeypatch):
    """A writer that opened the lock file just before the holder removed it must not end up
    holding a lock on the removed file while a third takes the new one."""
    import fcntl

    from bloomconv.converters import destination as destination_module
    dst = tmp_path / "dst"
    holder = Destination(dst).__enter__()
    real_flock = fcntl.flock

    def holder_leaves_first(fd, operation):
        monkeypatch.setattr(destination_module.fcntl, "flock", real_flock)
        holder.__exit__(None, None, None)  # between the late writer's open and its flock
        return real_flock(fd, operation)

    monkeypatch.setattr(destination_module.fcntl, "flock", holder_leaves_first)
    with Destination(dst):
        with pytest.raises(DestinationBusyError):
            Destination(dst).__enter__()


# -- wrong models: refused before anything is written ---------------------------------------------

def _resave(path, transform):
    torch.save(transform(torch.load(path, weights_only=True)), path)


WRONG_MODELS = {
    # name: (edit of a copy of the SMALL release checkpoint, words the refusal must contain)
    "vocab": (lambda s: edit_config(s, vocab_size=SMALL[3] * 2), "config.json implies [1024, 64]"),
    "hidden size": (lambda s: edit_config(s, hidden_size=128, n_embed=128), "config.json implies"),
    "fewer layers": (lambda s: edit_config(s, n_layer=SMALL[1] - 1), "unexpected tensors"),
    "more layers": (lambda s: edit_config(s, n_layer=SMALL[1] + 1), "missing tensors"),
    "one tensor's shape": (lambda s: _resave(s / "pytorch_model_00003-of-00005.bin", lambda d: {
        **d, "h.1.mlp.dense_4h_to_h.weight": d["h.1.mlp.dense_4h_to_h.weight"][:, :-1].clone()}),
        "'h.1.mlp.dense_4h_to_h.weight' has shape [64, 255]"),
    "mixed dtypes across shards": (lambda s: _resave(s / "pytorch_model_00004-of-00005.bin", lambda d: {
        k: v.half() for k, v in d.items()}), "mixed dtypes"),
    "integer weights": (lambda s: [_resave(p, lambda d: {k: (v * 100).to(torch.int32) for k, v in d.items()})
                                   for p in s.glob("*.bin")], "dtype torch.int32 is not supported"),
    "gpt2 config": (lambda s: edit_config(s, model_type="gpt2"), "model_type is 'gpt2', not 'bloom'"),
    "no model_type": (lambda s: (s / "config.json").write_text(json.dumps(
        {k: v for k, v in json.loads((s / "config.json").read_text()).items() if k != "model_type"})),
        "model_type is None"),
    "untied lm_head": (lambda s: edit_config(s, tie_word_embeddings=False), "tie_word_embeddings is false"),
    "gpt2 weights under a bloom config": (lambda s: _resave(s / "pytorch_model_00001-of-00005.bin", lambda d: {
        ("wte.weight" if k == "word_embeddings.weight" else k): v for k, v in d.items()}), "missing tensors ['word_embeddings.weight']"),
}


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("wrong", WRONG_MODELS)
def test_wrong_model_is_refused_before_any_output(wrong, scheme, release_checkpoint, tmp_path):
    src = shutil.copytree(release_checkpoint, tmp_path / "src")
    edit, words = WRONG_MODELS[wrong]
    edit(src)
    if wrong == "gpt2 weights under a bloom config":  # the index follows the renamed tensor
        index = json.loads((src / "pytorch_model.bin.index.json").read_text())
        index["weight_map"]["wte.weight"] = index["weight_map"].pop("word_embeddings.weight")
        (src / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    dst = tmp_path / "dst"
    result = CliRunner().invoke(main, [*SCHEMES[scheme], "--quiet", str(src), str(dst)])
    assert result.exit_code == 2, result.output
    assert words in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output  # one clear line
    assert not dst.exists(), "output written before the model was refused"
