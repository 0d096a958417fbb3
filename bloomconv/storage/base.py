"""What every storage type declares, and the registry that finds one by the type a manifest records.

A storage type is one way a weight matrix lives in a file: plain floats, LLM.int8() rows, 4-bit
blocks. Its class says, once, everything the converter and the runtime need about it:

    stored_names(settings)       the tensors stored for one module's weight, relative to the module
                                 (`weight`, `SCB`, `weight.absmax`, …: bitsandbytes' state-dict names)
    stored_bytes(shape, …)       their size for a weight of `shape` (the table behind `recipes`)
    encode(weight, settings)     the weight → those tensors
    decode(lookup)               those tensors → a `StoredWeight` the runtime multiplies, its state
                                 parsed once

Callers dispatch on the manifest's per-tensor `quant` tag (`storage_for(tag)`), never by probing
which tensor names happen to exist. Adding a storage type means one class here and its kernel.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, ClassVar, Protocol

import torch

from bloomconv.errors import QuantizationError
from bloomconv.format import QuantType

if TYPE_CHECKING:
    from bloomconv.manifest import QuantSettings

__all__ = ["CHUNK_ELEMENTS", "Lookup", "Storage", "StoredWeight", "check_float_weight", "register",
           "registered_types", "storage_for"]

# Quantizers work this many elements at a time into preallocated outputs: 2 MB of bf16 input and
# a few MB of fp32 temporaries stay in cache, and memory stays bounded on a 250880×14336 matrix.
CHUNK_ELEMENTS = 1 << 20

# Returns the stored tensor `<module>.<name>`, or None when the file does not hold it.
Lookup = Callable[[str], torch.Tensor | None]


class StoredWeight(Protocol):
    """A weight matrix (out, in) as its file stores it, ready to multiply."""

    shape: tuple[int, int]

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) @ W.T -> (..., out), a new tensor in x's dtype."""

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows `ids` of W in `dtype`, shaped (*ids.shape, in): the embedding lookup."""

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The whole matrix in `dtype`."""


class Storage:
    """Base of the storage types; subclasses are registered with `@register` under `quant_type`."""

    quant_type: ClassVar[QuantType]

    @classmethod
    def stored_names(cls, settings: "QuantSettings | None") -> tuple[str, ...]:
        raise NotImplementedError

    @classmethod
    def stored_bytes(cls, shape: tuple[int, ...], source_itemsize: int, settings: "QuantSettings | None") -> int:
        """Bytes of tensor data (safetensors headers and small state blobs excluded)."""
        raise NotImplementedError

    @classmethod
    def encode(cls, weight: torch.Tensor, settings: "QuantSettings | None", *,
               name: str = "weight") -> dict[str, torch.Tensor]:
        """The tensors to store for `weight`, keyed by `stored_names`; `name` only labels errors."""
        raise NotImplementedError

    @classmethod
    def decode(cls, lookup: Lookup, *, name: str = "weight") -> StoredWeight:
        raise NotImplementedError

    @classmethod
    def decode_mapping(cls, stored: Mapping[str, torch.Tensor], *, name: str = "weight") -> StoredWeight:
        """`decode` of what `encode` returned (a dict keyed like `stored_names`)."""
        return cls.decode(stored.get, name=name)

    @classmethod
    def require(cls, lookup: Lookup, key: str, name: str) -> torch.Tensor:
        """The stored tensor `key`, or a typed error naming what is missing."""
        tensor = lookup(key)
        if tensor is None:
            raise QuantizationError(name, f"is tagged {cls.quant_type.value} but its {key!r} tensor is missing",
                                    "The file is damaged or was not written by bloomconv; convert again.")
        return tensor


_REGISTRY: dict[QuantType, type[Storage]] = {}


def register(cls: type[Storage]) -> type[Storage]:
    if cls.quant_type in _REGISTRY:
        raise TypeError(f"two storage classes for {cls.quant_type}: {_REGISTRY[cls.quant_type]} and {cls}")
    _REGISTRY[cls.quant_type] = cls
    return cls


def storage_for(quant_type: QuantType | str) -> type[Storage]:
    """The storage class of a manifest's `quant` tag (or a QuantType)."""
    try:
        return _REGISTRY[QuantType(quant_type)]
    except (ValueError, KeyError):
        raise QuantizationError("weight", f"storage type {quant_type!r} is unknown",
                                f"This bloomconv reads {', '.join(t.value for t in _REGISTRY)}; "
                                "upgrade bloomconv or convert again.") from None


def registered_types() -> tuple[QuantType, ...]:
    return tuple(_REGISTRY)


def check_float_weight(weight: torch.Tensor, name: str) -> None:
    if weight.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise QuantizationError(name, f"has dtype {weight.dtype}; only bfloat16, float16 and float32 "
                                "weights can be quantized", "Quantize the floating-point weights only.")
