"""Where one decoding step's time goes, part by part.

    python bench/profile_step.py DIR [--batch 1] [--steps 16] [--threads 2] [--prefill-dtype float32]

Loads a converted directory, prefills a 16-token random prompt, then times `--steps` greedy
decoding steps twice: plain (the step time), and with each part of the forward pass wrapped in a
timer (the wrappers cost a little: their total is printed next to the plain one). Parts: the
blocks' matrix products by weight shape, attention, layer norms, GELU, the lm_head product and
what is left (embedding lookup, ln_f, the Python around them). GB/s divides the bytes of the
weights a part multiplies (as held in RAM) by its time.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import time

import torch

import bloomconv
from bloomconv.runtime import model as model_module
from bloomconv.storage.base import weight_tensors


class Timers:
    """Seconds and weight bytes summed per part of the forward pass."""

    def __init__(self):
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self.bytes: dict[str, int] = collections.defaultdict(int)

    def clear(self) -> None:
        self.seconds.clear()
        self.bytes.clear()

    @contextlib.contextmanager
    def part(self, name: str, nbytes: int = 0):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start
            self.bytes[name] += nbytes


def weight_bytes(weight) -> int:
    """Bytes of the tensors a runtime weight record holds (as stored, or as held in RAM)."""
    return sum(t.numel() * t.element_size() for t in weight_tensors(weight))


@contextlib.contextmanager
def instrumented(timers: Timers):
    """The Transformer's parts wrapped in `timers` for the duration."""
    cls, saved = model_module.Transformer, {}

    def wrap(owner, name, make):
        saved[(owner, name)] = getattr(owner, name)
        setattr(owner, name, make(getattr(owner, name)))

    def linear(inner):
        def timed(self, x, w):
            with timers.part(f"product {tuple(w.weight.shape)}", weight_bytes(w.weight)):
                return inner(self, x, w)
        return timed

    def named(label):
        def make(inner):
            def timed(*args, **kwargs):
                with timers.part(label):
                    return inner(*args, **kwargs)
            return timed
        return make

    def embeddings(inner):
        class LmHead:  # the embeddings' matmul is the tied lm_head
            def __init__(self, weights):
                self._weights = weights

            def matmul(self, x, products=None):
                with timers.part("lm_head", weight_bytes(self._weights)):
                    return self._weights.matmul(x, products)

            def __getattr__(self, name):
                return getattr(self._weights, name)

        def wrapped(unit):
            weights = inner(unit)
            return dataclasses.replace(weights, word_embeddings=LmHead(weights.word_embeddings))
        return wrapped

    wrap(cls, "_linear", linear)
    wrap(cls, "_layer_norm", named("layer norms"))
    wrap(model_module.F, "scaled_dot_product_attention", named("attention"))  # prefill, or without the kernels
    wrap(model_module.step_ops, "attention_step", named("attention"))        # a decoding step's
    wrap(model_module, "gelu", named("gelu"))
    wrap(model_module, "embedding_weights", embeddings)
    try:
        yield
    finally:
        for (owner, name), original in saved.items():
            setattr(owner, name, original)


def step_seconds(model, batch: int, steps: int, timers: Timers | None = None) -> float:
    """Seconds per decoding step after a 16-token prefill (whose parts `timers` forgets)."""
    ids = torch.randint(4, model.geometry.vocab_size, (batch, 16), generator=torch.Generator().manual_seed(0))
    logits, past = model.forward(ids, last_only=True)
    token = logits[:, -1].argmax(-1, keepdim=True)
    if timers is not None:
        timers.clear()
    start = time.perf_counter()
    for _ in range(steps):
        logits, past = model.forward(token, past=past, last_only=True)
        token = logits[:, -1].argmax(-1, keepdim=True)
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prefill-dtype", choices=["float32", "bfloat16"],
                        help="load(prefill_dtype=...): float32 keeps a batched step's products in fp32 on AMX CPUs")
    args = parser.parse_args()
    options = {"prefill_dtype": getattr(torch, args.prefill_dtype)} if args.prefill_dtype else {}
    with bloomconv.load(args.directory, threads=args.threads, **options) as model:
        step_seconds(model, args.batch, 4)  # warm: the weights in RAM, torch's kernels chosen
        plain = min(step_seconds(model, args.batch, args.steps) for _ in range(3))
        timers = Timers()
        with instrumented(timers):
            timed = step_seconds(model, args.batch, args.steps, timers)
    print(f"{args.directory}: batch {args.batch}, step {plain * 1e3:.2f} ms ({args.batch / plain:.1f} tokens/s); "
          f"with the timers {timed * 1e3:.2f} ms")
    for name, seconds in sorted(timers.seconds.items(), key=lambda kv: -kv[1]):
        per_step = seconds / args.steps
        rate = f"  {timers.bytes[name] / seconds / 1e9:5.1f} GB/s" if timers.bytes[name] else ""
        print(f"  {name:28} {per_step * 1e3:7.2f} ms{rate}")
    print(f"  {'rest':28} {(timed - sum(timers.seconds.values()) / args.steps) * 1e3:7.2f} ms")


if __name__ == "__main__":
    main()
