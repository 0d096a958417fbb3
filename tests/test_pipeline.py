"""A model run over 2 and 3 processes (gloo over 127.0.0.1) against the single-process runtime.

Every rank runs in its own process, started here with torchrun's environment variables, from its
own copy of the directory holding only its share of the files (hard links): a rank that opened
another rank's file would fail. Rank 0 saves what it computed (tensors only) for the test to compare.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import bloomconv
from bloomconv.converters.convert import convert, quantize
from bloomconv.converters.example import write_example_checkpoint
from bloomconv.errors import OptionsError, PipelineError
from bloomconv.format import CHECKSUMS_NAME, CONFIG_NAME, MANIFEST_NAME, TOKENIZER_NAMES
from bloomconv.manifest import read_manifest
from bloomconv.runtime import pipeline
from bloomconv.runtime.pipeline import PipelineOptions, Stage, plan_stages

PROMPTS = ["def add(a, b):", "import os", "The list"]  # of different lengths: left padding
NEW_TOKENS = 6
TIMEOUT = 20  # seconds a rank waits for its neighbour in these tests

def computed(model) -> dict:
    """What the test compares, on a model over a pipeline or in one process: logits of left-padded
    prompts without a cache, then with it (the prompt, three steps of one token), greedy tokens
    of the batch and of one prompt."""
    ids, mask = model.encode(PROMPTS)
    results = {"ids": ids, "mask": mask, "logits": model(ids, mask)}
    logits, past = model.forward(ids, mask)
    step, steps = logits[:, -1].argmax(-1)[:, None], []
    for _ in range(3):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        logits, past = model.forward(step, mask, past)
        steps.append(logits[:, -1])
        step = logits[:, -1].argmax(-1)[:, None]
    results["cached_steps"] = torch.stack(steps)
    results["generated"] = model.generate_ids(ids, results["mask"], max_new_tokens=NEW_TOKENS)
    results["single"] = model.generate_ids(ids[:1], results["mask"][:1], max_new_tokens=NEW_TOKENS)
    return results


# Run by every rank: one process group, each model in turn; rank 0 saves `computed` (tensors only).
# The files each rank opens are recorded by an audit hook.
RANK_SCRIPT = r"""
import json, os, sys
opened = set()
sys.addaudithook(lambda event, args: opened.add(os.fspath(args[0]))
                 if event == "open" and isinstance(args[0], (str, os.PathLike)) else None)
import torch, torch.distributed as dist, bloomconv
from bloomconv.runtime.pipeline import PipelineOptions
sys.path.insert(0, os.environ["BLOOMCONV_REPOSITORY"])
from tests.test_pipeline import computed
rank = int(os.environ["RANK"])
if "BLOOMCONV_TEST_BF16_DOT" in os.environ:  # this rank's CPU as the test says, and its products noted
    from bloomconv.runtime import model as model_module
    has_bf16_dot = os.environ["BLOOMCONV_TEST_BF16_DOT"] == "1"
    model_module.kernels.bf16_dot_products = lambda: has_bf16_dot
    built = model_module.Transformer.__init__
    def noting(self, *args, **kwargs):
        built(self, *args, **kwargs)
        json.dump(str(self.prefill_dtype), open(f"{sys.argv[2]}/prefill{rank}.json", "w"))
    model_module.Transformer.__init__ = noting
plan, out, micro_batches, timeout = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
dist.init_process_group("gloo")
for name, copies in plan.items():
    options = PipelineOptions(timeout=timeout, idle_timeout=timeout, micro_batches=micro_batches)
    model = bloomconv.load(copies[rank], pipeline=options)
    if model is None:
        continue
    with model:
        torch.save(computed(model), f"{out}/{name}.pt")
        while sys.argv[5:] == ["forever"]:  # until a rank is killed: the failure test
            model(torch.tensor([[5, 6, 7]]))
            print("step", flush=True)
json.dump(sorted(opened), open(f"{out}/opened{rank}.json", "w"))
dist.destroy_process_group()
"""


@pytest.fixture(scope="module")
def directories(tmp_path_factory):
    """The trained example model unquantized (fp32), int8 and nf4."""
    root = tmp_path_factory.mktemp("pipeline")
    write_example_checkpoint(root / "src", "trained", dtype=torch.float32)
    convert(root / "src", root / "fp32")
    quantize(root / "src", root / "int8", bits=8)
    quantize(root / "src", root / "nf4", bits=4, quant_type="nf4")
    return root


def share_copies(directory, ranks, root):
    """One folder per rank holding only what that rank needs (hard links): the manifest, checksums
    and config, its own weight files, and on rank 0 the tokenizer."""
    manifest = read_manifest(directory)
    n_layer = json.loads((directory / CONFIG_NAME).read_text())["n_layer"]
    stages = plan_stages(manifest, n_layer, [1] * ranks)
    copies = []
    for stage in stages:
        copy = root / f"rank{stage.rank}"
        copy.mkdir(parents=True)
        names = [MANIFEST_NAME, CHECKSUMS_NAME, CONFIG_NAME, *(manifest.unit_file(u) for u in stage.units)]
        names += [n for n in TOKENIZER_NAMES if stage.rank == 0 and (directory / n).exists()]
        for name in names:
            os.link(directory / name, copy / name)
        copies.append(copy)
    return stages, copies


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_environment(rank, ranks, port):
    """What torchrun sets for a rank (one thread each: the ranks share this machine's cores)."""
    return dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                WORLD_SIZE=str(ranks), OMP_NUM_THREADS="1", BLOOMCONV_REPOSITORY=str(Path(__file__).parents[1]))


def launch(plan, ranks, out, micro_batches=2, *extra, timeout=TIMEOUT, variables=None):
    """Start one process per rank running RANK_SCRIPT over `plan` (name -> each rank's folder), with
    `variables[rank]` added to a rank's environment."""
    out.mkdir(exist_ok=True)
    port = free_port()
    arguments = [json.dumps({name: [str(c) for c in copies] for name, copies in plan.items()}), str(out),
                 str(micro_batches), str(timeout), *extra]
    return [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, *arguments],
                             env={**rank_environment(r, ranks, port), **(variables or {}).get(r, {})},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(ranks)]


def finish(processes, timeout=300):
    outputs = []
    for process in processes:
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
        outputs.append((process.returncode, out, err))
    return outputs


@pytest.mark.parametrize("ranks", [2, 3])
def test_pipeline_matches_the_single_process_runtime_and_opens_only_its_files(directories, tmp_path, ranks):
    """fp32, int8 and nf4 over `ranks` processes: logits without and with the KV cache within 1e-5 of
    one process, the same greedy tokens for left-padded batched prompts (two micro-batches) and for
    one; each rank opened exactly its own weight files."""
    names = ("fp32", "int8", "nf4")
    shares = {name: share_copies(directories / name, ranks, tmp_path / name) for name in names}
    for stages, _ in shares.values():
        assert all(len(s.layers) for s in stages[1:]) and sum(len(s.layers) for s in stages) == 4
    processes = launch({name: copies for name, (_, copies) in shares.items()}, ranks, tmp_path / "out")
    for rank, (code, _, err) in enumerate(finish(processes)):
        assert code == 0, f"rank {rank}: {err}"
    for name in names:
        got = torch.load(tmp_path / "out" / f"{name}.pt", weights_only=True)
        with bloomconv.load(directories / name) as model:
            expected = computed(model)
        assert torch.equal(got["ids"], expected["ids"]) and torch.equal(got["mask"], expected["mask"])
        real = expected["mask"].bool()
        assert (got["logits"] - expected["logits"])[real].abs().max() < 1e-5, name
        assert (got["cached_steps"] - expected["cached_steps"]).abs().max() < 1e-5, name
        assert expected["generated"].shape[1] > expected["ids"].shape[1], name
        assert torch.equal(got["generated"], expected["generated"]), name
        assert torch.equal(got["single"], expected["single"]), name
    for rank in range(ranks):
        opened = set(json.loads((tmp_path / "out" / f"opened{rank}.json").read_text()))
        for name, (stages, copies) in shares.items():
            weights = {p for p in opened if p.endswith(".safetensors") and p.startswith(str(tmp_path / name))}
            own = {str(copies[rank] / read_manifest(copies[rank]).unit_file(u)) for u in stages[rank].units}
            assert weights == own, (name, rank)


@pytest.mark.parametrize("rank0_has_bf16_dot", [True, False])
def test_ranks_on_different_cpus_all_take_rank_0s_prefill_products(tmp_path, rank0_has_bf16_dot):
    # bf16-stored weights: the default products depend on the CPU, which the test sets per rank
    write_example_checkpoint(tmp_path / "src", (64, 2, 4, 512), "release-pickle-shards", dtype=torch.bfloat16)
    convert(tmp_path / "src", tmp_path / "bf16")
    _, copies = share_copies(tmp_path / "bf16", 2, tmp_path / "shares")
    flags = {0: rank0_has_bf16_dot, 1: not rank0_has_bf16_dot}
    processes = launch({"bf16": copies}, 2, tmp_path / "out",
                       variables={r: {"BLOOMCONV_TEST_BF16_DOT": str(int(flag))} for r, flag in flags.items()})
    for rank, (code, _, err) in enumerate(finish(processes)):
        assert code == 0, f"rank {rank}: {err}"
    chosen = {json.loads((tmp_path / "out" / f"prefill{r}.json").read_text()) for r in range(2)}
    assert chosen == {"torch.bfloat16" if rank0_has_bf16_dot else "torch.float32"}


def test_a_damaged_file_on_one_rank_stops_every_rank_naming_it(directories, tmp_path):
    stages, copies = share_copies(directories / "fp32", 2, tmp_path)
    damaged = copies[1] / read_manifest(copies[1]).unit_file(stages[1].units[0])
    data = damaged.read_bytes()
    damaged.unlink()  # a hard link: write a new file, not the shared one
    damaged.write_bytes(data[:-100])
    for rank, (code, _, err) in enumerate(finish(launch({"fp32": copies}, 2, tmp_path / "out"))):
        assert code != 0, rank
        assert "rank 1 of 2" in err and damaged.name in err and "truncated" in err, err
    assert not (tmp_path / "out" / "fp32.pt").exists()


@pytest.mark.parametrize("how", ["killed", "hung"])
def test_a_rank_lost_mid_generation_stops_the_others_naming_it(directories, tmp_path, how):
    """SIGKILL: its neighbours see its connections close, and every other rank names it at once.
    SIGSTOP: the rank waiting for it names it when the timeout passes; the others stop then too."""
    timeout = TIMEOUT if how == "killed" else 5
    _, copies = share_copies(directories / "fp32", 3, tmp_path)
    processes = launch({"fp32": copies}, 3, tmp_path / "out", 1, "forever", timeout=timeout)
    deadline = time.monotonic() + 120
    while processes[0].stdout.readline() != "step\n":  # passes are running
        assert time.monotonic() < deadline and processes[0].poll() is None, processes[0].stderr.read()
    processes[1].send_signal(signal.SIGKILL if how == "killed" else signal.SIGSTOP)
    lost_at = time.monotonic()
    try:
        for process in (processes[0], processes[2]):
            process.wait(timeout=timeout + 10)
        assert time.monotonic() - lost_at < timeout + 10
        errors = [process.stderr.read() for process in (processes[0], processes[2])]
    finally:
        processes[1].kill()
        processes[1].wait()
    assert processes[0].returncode != 0 and processes[2].returncode != 0
    assert all("PipelineError" in err for err in errors), errors
    named = errors if how == "killed" else errors[1:]  # rank 2 waits for rank 1
    assert all("rank 1 of 3" in err for err in named), errors


def test_the_generate_command_over_two_ranks_prints_what_one_process_prints(directories, tmp_path):
    directory = directories / "nf4"
    command = [sys.executable, "-m", "bloomconv", "generate", str(directory), PROMPTS[0], "--max-new-tokens", "8"]
    single = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert single.returncode == 0, single.stderr
    port = free_port()
    processes = [subprocess.Popen([*command, "--pipeline", "--pipeline-timeout", str(TIMEOUT)],
                                  env=rank_environment(r, 2, port), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for r in range(2)]
    (code0, out0, err0), (code1, out1, err1) = finish(processes)
    assert code0 == 0 and code1 == 0, err0 + err1
    assert out0 == single.stdout and out1 == ""


def test_the_split_follows_the_budgets_and_keeps_a_block_per_rank(directories):
    manifest = read_manifest(directories / "fp32")
    even = plan_stages(manifest, 4, [1, 1])
    assert [s.layers for s in even] == [range(0, 1), range(1, 4)]  # rank 0 also holds the embeddings
    assert sum(s.nbytes for s in even) == sum(e.size for e in manifest.files if e.tensors)
    assert [s.layers for s in plan_stages(manifest, 4, [1000, 1])] == [range(0, 3), range(3, 4)]
    assert all(len(s.layers) == 1 for s in plan_stages(manifest, 4, [1, 1, 1, 1, 1])[1:])
    with pytest.raises(OptionsError, match="at most 5 ranks"):
        plan_stages(manifest, 4, [1] * 6)
    assert Stage(1, range(2, 4), 0).units == ["block_002", "block_003"]


def test_pipeline_without_torchrun_says_how_to_launch(directories, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(OptionsError, match="torchrun"):
        bloomconv.load(directories / "fp32", pipeline=True)
    with pytest.raises(OptionsError):
        PipelineOptions(timeout=0)
    assert issubclass(PipelineError, bloomconv.errors.BloomconvError)


class _Done:
    """A finished torch.distributed request."""

    def wait(self, timeout=None):
        return True


@pytest.mark.parametrize("header,refusal", [
    ([0, 1, 0, 0, 1, 1, 0, 8, 0, -1], "a header that is not bloomconv's pipeline's"),   # not our magic
    ([pipeline.MAGIC, 9, 0, 0, 1, 1, 0, 8, 0, -1], "a header that is not bloomconv's pipeline's"),  # no such kind
    ([pipeline.MAGIC, pipeline.WORK, 0, 0, 1, 9, 0, 8, 0, -1], "a pass the model cannot run"),  # beyond capacity
    ([pipeline.MAGIC, pipeline.WORK, 0, -1, 1, 1, 0, 8, 0, -1], "a pass the model cannot run"),  # no such slot
    ([pipeline.MAGIC, pipeline.WORK, 0, 0, 0, 1, 0, 8, 0, -1], "a pass the model cannot run"),  # empty batch
])
def test_a_header_a_peer_should_not_send_is_refused_before_anything_is_allocated(monkeypatch, header, refusal):
    """What a hostile or mismatched peer sends is refused naming it, and the next rank is told."""
    sent = []

    def irecv(into, source):
        into.copy_(torch.tensor(header, dtype=torch.int64))
        return _Done()

    monkeypatch.setattr(pipeline.dist, "irecv", irecv)
    monkeypatch.setattr(pipeline.dist, "isend", lambda tensor, dst: sent.append((tensor.tolist(), dst)) or _Done())
    ring = pipeline._Ring(1, 3, torch.device("cpu"), lambda rank: f"rank {rank}", PipelineOptions())
    with pytest.raises(PipelineError, match=f"rank 0 sent {refusal}.*refused"):
        ring.check(ring.receive_header(timeout=1.0))
    assert ring.broken and sent and sent[0][1] == 2 and sent[0][0][1] == pipeline.ABORT
