"""A decoding step's attention, the GELU and the greedy choice (bloomconv/kernels/csrc/step_ops.c)
against torch's own ops, and the runtime's use of them."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import bloomconv.runtime as runtime
from bloomconv import kernels
from bloomconv.converters.convert import convert
from bloomconv.converters.example import write_example_checkpoint
from bloomconv.kernels import step_ops
from bloomconv.runtime.model import KVCache

needs_kernels = pytest.mark.skipif(not kernels.available(), reason="the C extension is not built")
ISAS = [pytest.param(isa, marks=pytest.mark.skipif(isa not in kernels.isas(), reason=f"CPU lacks {isa}"))
        for isa in ("avx2", "scalar")]


def cache_with(B, nh, hs, length, capacity, generator, copies=1):
    """`copies` KVCaches for one block holding the same `length` random positions, with room for
    `capacity`."""
    keys, values = (torch.randn(B, nh, length, hs, generator=generator) for _ in range(2))
    caches = [KVCache(1, capacity) for _ in range(copies)]
    for past in caches:
        past.append(0, keys, values)
    return caches if copies > 1 else caches[0]


def step_bias(lengths, nh, length):
    """ALiBi plus mask for one new token after `length` cached ones: sequences of `lengths` real
    tokens (the new one included), left-padded."""
    S = length + 1
    mask = torch.zeros(len(lengths), S, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, S - n:] = 1
    positions = (mask.cumsum(-1) - 1) * mask
    slopes = torch.tensor([2 ** (-8 * (h + 1) / nh) for h in range(nh)])
    bias = slopes[None, :, None, None] * positions[:, None, None, :].float()
    return bias.masked_fill(~mask.bool()[:, None, None, :], torch.finfo(torch.float32).min)


@needs_kernels
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("B,nh,hs,length", [(1, 16, 64, 0), (1, 4, 64, 37), (3, 6, 16, 20), (2, 3, 12, 9),
                                            (16, 2, 128, 300)])
def test_attention_step_matches_torch_and_writes_the_cache(B, nh, hs, length, isa):
    g = torch.Generator().manual_seed(length)
    H = nh * hs
    fused = torch.randn(B, 1, 3 * H, generator=g)
    lengths = [length + 1 - (row * 3) % (length + 1) for row in range(B)]  # some rows left-padded
    bias = step_bias(lengths, nh, length)
    ours, theirs = cache_with(B, nh, hs, length, length + 4, g, copies=2)
    before = [t.clone() for t in ours.reserve(0, (B, nh, 0, hs), fused)[:2]]

    q, k, v = fused.view(B, 1, nh, 3, hs).permute(3, 0, 2, 1, 4)
    keys, values = theirs.append(0, k, v)
    expected = F.scaled_dot_product_attention(q, keys, values, attn_mask=bias).transpose(1, 2).reshape(B, 1, H)
    storage_k, storage_v, cached = ours.reserve(0, k.shape, k)
    assert cached == length and ours.length == length + 1
    context = step_ops.attention_step(fused, storage_k, storage_v, cached, bias, isa=isa)

    assert (context - expected).abs().max() < 1e-5
    assert torch.equal(storage_k[:, :, :length + 1], keys) and torch.equal(storage_v[:, :, :length + 1], values)
    assert torch.equal(storage_k[:, :, :length], before[0][:, :, :length])
    # past the new position the storage is as it was (bits: unwritten storage may hold NaNs)
    assert torch.equal(storage_k[:, :, length + 1:].view(torch.int32), before[0][:, :, length + 1:].view(torch.int32))


@needs_kernels
@pytest.mark.parametrize("isa", ISAS)
def test_masked_positions_get_no_weight(isa):
    B, nh, hs, length = 2, 2, 16, 11
    g = torch.Generator().manual_seed(0)
    fused = torch.randn(B, 1, 3 * nh * hs, generator=g)
    bias = step_bias([4, 12], nh, length)
    past = cache_with(B, nh, hs, length, length + 1, g)
    keys, values, cached = past.reserve(0, (B, nh, 1, hs), fused)
    values[0, :, :length + 1 - 4] = 1e30  # the first sequence's padding: any weight on it would show
    context = step_ops.attention_step(fused, keys, values, cached, bias, isa=isa)
    assert context.isfinite().all() and context.abs().max() < 100


@needs_kernels
def test_attention_step_refuses_what_does_not_fit():
    B, nh, hs = 1, 2, 8
    past = cache_with(B, nh, hs, 3, 8, torch.Generator().manual_seed(0))
    keys, values, cached = past.reserve(0, (B, nh, 1, hs), torch.empty(0))
    fused, bias = torch.zeros(B, 1, 3 * nh * hs), torch.zeros(B, nh, 1, cached + 1)
    with pytest.raises(ValueError, match="bias"):
        step_ops.attention_step(fused, keys, values, cached, bias[..., :-1])
    with pytest.raises(ValueError, match="capacity"):
        step_ops.attention_step(fused, keys, values, keys.shape[2], torch.zeros(B, nh, 1, keys.shape[2] + 1))
    with pytest.raises(ValueError, match="contiguous"):
        step_ops.attention_step(fused, keys[:, :, :5], values[:, :, :5], cached, bias)
    with pytest.raises(ValueError):
        step_ops.attention_step(fused.double(), keys, values, cached, bias)


@needs_kernels
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("n", [0, 5, 4096 * 3 + 7, 65536])
def test_gelu_matches_torch(n, isa):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g) * 4
    x[: min(n, 4)] = torch.tensor([0.0, -30.0, 30.0, 1e-20])[: min(n, 4)]
    expected = F.gelu(x.double(), approximate="tanh")
    ours = step_ops.gelu_tanh(x, isa=isa)
    assert ours.dtype == torch.float32 and ours.shape == x.shape
    # as close as torch's own fp32 kernel: within 1.1e-7 |x| of the exact value (2.5e-7 allowed);
    # the residual stream it is added to has x's scale
    assert ((ours.double() - expected).abs() <= 2.5e-7 * x.double().abs()).all()


@needs_kernels
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("V", [1, 7, 8, 250880 + 3])
def test_argmax_is_torchs(V, isa):
    g = torch.Generator().manual_seed(V)
    logits = torch.randn(6, V, generator=g)
    logits[1] = 0.5                                       # all equal: the first
    logits[2, V // 2:] = logits[2].max() + 1              # ties at the top: the first of them
    logits[3, -1] = float("nan")                          # a NaN: its index, as torch says
    logits[4] = float("-inf")
    logits[5, V // 3] = float("inf")
    expected = logits.argmax(dim=-1)
    assert torch.equal(step_ops.argmax_rows(logits, isa=isa), expected)
    wider = torch.cat([logits, torch.full((6, 5), float("inf"))], dim=1)[:, :V]  # a strided view
    assert torch.equal(step_ops.argmax_rows(wider, isa=isa), expected)
    with pytest.raises(ValueError):
        step_ops.argmax_rows(logits[:, :0])


def test_kv_cache_reserve_grows_and_keeps_what_it_holds():
    past = KVCache(2)
    first = torch.randn(1, 2, 3, 4)
    past.append(1, first, -first)
    keys, values, start = past.reserve(1, (1, 2, 5, 4), first)
    assert start == 3 and past.length == 8 and keys.shape[2] >= 8 and keys.is_contiguous()
    assert torch.equal(keys[:, :, :3], first) and torch.equal(values[:, :, :3], -first)


@needs_kernels
def test_decoding_steps_give_what_torchs_ops_give(tmp_path, monkeypatch):
    """The runtime's decoding steps with the kernels and with torch's ops, on left-padded batches."""
    write_example_checkpoint(tmp_path / "src", (64, 2, 4, 512), layout="release-pickle-shards", dtype=torch.float32)
    convert(tmp_path / "src", tmp_path / "dst")
    ids = torch.randint(4, 512, (3, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :2] = mask[2, :4] = 0
    steps = []  # the cached length of each call: the kernel runs for decoding steps only
    attention_step = step_ops.attention_step
    monkeypatch.setattr(step_ops, "attention_step", lambda *args: steps.append(args[3]) or attention_step(*args))
    with runtime.load(tmp_path / "dst") as model:
        ours = model.generate_ids(ids, mask, max_new_tokens=8)
        assert steps == [length for length in range(6, 13) for _ in range(2)]  # 7 steps after the prompt, 2 blocks
        _, past = model.forward(ids, mask)
        step, _ = model.forward(ours[:, 6:7], torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], 1), past)
        monkeypatch.setattr(step_ops, "takes", lambda *tensors: False)
        assert torch.equal(model.generate_ids(ids, mask, max_new_tokens=8), ours)
        _, past = model.forward(ids, mask)
        expected, _ = model.forward(ours[:, 6:7], torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], 1), past)
    assert (step - expected).abs().max() < 1e-5
