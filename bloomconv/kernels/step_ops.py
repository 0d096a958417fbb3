"""What a decoding step computes besides its matrix products, in one compiled call each: the
attention over the KV cache, BLOOM's GELU (which every pass uses) and the greedy choice of the
next token (csrc/step_ops.c).

Torch computes the first two as several ops, each with its own dispatch, and argmax with scalar
code on one thread; in a decoding step that, not the arithmetic, is what they cost. `takes` says
where these kernels apply (fp32 on the CPU, the extension built) and the runtime uses torch
elsewhere. They compute what torch does, the first two up to the order of the sums and exp's last
bit, argmax exactly (tests/test_step_ops.py compares them).

>>> context = attention_step(fused, keys, values, length, bias)        # doctest: +SKIP
>>> gelu_tanh(h)                                                      # doctest: +SKIP
>>> argmax_rows(logits)                                               # doctest: +SKIP
"""
from __future__ import annotations

import torch

from . import _isa_code, _kernels, available, kernel_threads

__all__ = ["argmax_rows", "attention_step", "gelu_tanh", "takes"]


def takes(*tensors: torch.Tensor) -> bool:
    """Whether the kernels compute on these tensors: built, fp32, in CPU memory."""
    return available() and all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)


def attention_step(fused: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, length: int,
                   bias: torch.Tensor, *, isa: str | None = None) -> torch.Tensor:
    """One new token per sequence: its key and value go into the cache, and its attention output
    comes back. fused (B, 1, 3H): the QKV projection, per head [q, k, v]; keys, values (B, nh,
    capacity, hs): the cache's storage, `length` positions filled (the step writes position
    `length`); bias (B, nh, 1, length + 1): ALiBi plus the mask. Returns (B, 1, H) =
    softmax(q K^T / sqrt(hs) + bias) V with heads side by side, as transformers' Bloom lays it out.
    """
    B, nh, capacity, hs = keys.shape
    H = nh * hs
    S = length + 1
    problems = [name for name, tensor, shape in (("fused", fused, (B, 1, 3 * H)), ("values", values, keys.shape),
                                                 ("bias", bias, (B, nh, 1, S)))
                if tuple(tensor.shape) != tuple(shape)]
    if not takes(fused, keys, values, bias) or problems or not 0 <= length < capacity:
        raise ValueError(f"cannot attend: fused {tuple(fused.shape)}, cache {tuple(keys.shape)} holding {length}, "
                         f"bias {tuple(bias.shape)} ({', '.join(problems) or 'dtype, device or capacity'} do not "
                         "fit); pass fp32 CPU tensors: fused (B, 1, 3H), cache (B, nh, capacity > length, hs), "
                         "bias (B, nh, 1, length + 1)")
    fused, bias = fused.contiguous(), bias.contiguous()
    if not (keys.is_contiguous() and values.is_contiguous()):
        raise ValueError("the cache's storage is not contiguous; pass the storage KVCache.reserve returns")
    out = torch.empty(B, 1, H, dtype=torch.float32)
    _kernels.attention_step(fused.data_ptr(), B, nh, hs, keys.data_ptr(), values.data_ptr(), capacity, length,
                            bias.data_ptr(), out.data_ptr(), kernel_threads(), _isa_code(isa))
    return out


def gelu_tanh(x: torch.Tensor, *, isa: str | None = None) -> torch.Tensor:
    """BLOOM's GELU, x/2 · (1 + tanh(0.79788456 · x · (1 + 0.044715 x²))), of fp32 CPU x, computed
    as x / (1 + exp(-2u)) (the same function; no cancellation near 0), into a new tensor."""
    if not takes(x):
        raise ValueError(f"cannot compute GELU of {x.dtype} on {x.device}; pass fp32 CPU activations "
                         "(torch's F.gelu takes the others)")
    x = x.contiguous()
    out = torch.empty_like(x)
    if x.numel():
        _kernels.gelu_tanh(x.data_ptr(), out.data_ptr(), x.numel(), kernel_threads(), _isa_code(isa))
    return out


def argmax_rows(x: torch.Tensor, *, isa: str | None = None) -> torch.Tensor:
    """x (B, V) fp32 on the CPU -> (B,) int64: each row's index of its largest value, exactly
    torch.argmax(x, dim=-1) (the first of equal ones; a row's first NaN where it has one)."""
    if not takes(x) or x.dim() != 2 or x.shape[1] == 0:
        raise ValueError(f"cannot take the argmax of {x.dtype} {tuple(x.shape)} on {x.device}; pass fp32 CPU "
                         "logits (B, V), V > 0")
    x = x.contiguous()
    out = torch.empty(x.shape[0], dtype=torch.int64)
    if x.shape[0]:
        _kernels.argmax_rows(x.data_ptr(), x.shape[0], x.shape[1], out.data_ptr(), kernel_threads(), _isa_code(isa))
    return out
