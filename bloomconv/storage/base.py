"""What every storage type declares, and the registry that finds one by the type a manifest records.

A storage type is one way a weight matrix lives in a file: plain floats, LLM.int8() rows, 4-bit
blocks. Its class says, once, everything the converter and the runtime need about it:

    stored_names(settings)       the tensors stored for one module's weight, relative to the module
                                 (`weight`, `SCB`, `weight.absmax`, …: bitsandbytes' state-dict names)
    stored_bytes(shape, …)       their size for a weight of `shape` (the table behind `recipes`)
    encode(weight, settings)     the weight → those tensors
    encode_stream(weight, …)     the same, computed piece by piece as the writer takes them
    decode(lookup)               those tensors → a `StoredWeight` the runtime multiplies, its state
                                 parsed once

Callers dispatch on the manifest's per-tensor `quant` tag (`storage_for(tag)`), never by probing
which tensor names happen to exist. Adding a storage type means one class here and its kernel.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, ClassVar, Protocol

import torch

from bloomconv.errors import QuantizationError
from bloomconv.format import QuantType
from bloomconv.safetensors_io import StreamedTensor, tensor_bytes

if TYPE_CHECKING:
    from bloomconv.manifest import QuantSettings

__all__ = ["CHUNK_ELEMENTS", "Lookup", "NO_REPORT", "ROW_MULTIPLE", "ReadReport", "STREAM_PIECE_ELEMENTS", "Storage",
           "StoredWeight", "check_float_weight", "map_tensors", "register", "registered_types", "slice_granularity",
           "storage_for", "stream_as_stored", "weight_tensors"]

# Quantizers work this many elements at a time into preallocated outputs: 2 MB of bf16 input and
# a few MB of fp32 temporaries stay in cache, and memory stays bounded on a 250880×14336 matrix.
CHUNK_ELEMENTS = 1 << 20

# Row slices of a weight (`StoredWeight.row_slice`) start at a multiple of this many rows, so that a
# product computed slice by slice is bit for bit the product of the whole matrix: the dense kernel
# computes rows in groups of 4 (a last, partial group runs other code) and torch's fp32 GEMM
# (MKL) gives the same sums only for slices of a multiple of 16 rows (tests/test_storage.py).
ROW_MULTIPLE = 64

# `encode_stream` computes a weight's stored tensors this many source elements at a time, each
# piece into one reused buffer that the writer copies (32 MB of bf16 in, 16 MB of int8 out).
STREAM_PIECE_ELEMENTS = 1 << 24

# Returns the stored tensor `<module>.<name>`, or None when the file does not hold it.
Lookup = Callable[[str], torch.Tensor | None]


class ReadReport(Protocol):
    """What `encode_stream` tells its caller about reading the source weight, in elements of the
    flattened weight: the converter hashes and frees the source's pages by it."""

    def reading(self, start: int, end: int) -> None:
        """Elements [start, end) are about to be read."""

    def done(self, start: int, end: int) -> None:
        """Elements [start, end) will not be read again."""


class _NoReport:
    def reading(self, start: int, end: int) -> None:
        pass

    def done(self, start: int, end: int) -> None:
        pass


NO_REPORT: ReadReport = _NoReport()


def stream_as_stored(tensor: torch.Tensor, report: ReadReport = NO_REPORT,
                     piece_elements: int | None = None) -> StreamedTensor:
    """`tensor` as it is, to the writer in pieces (STREAM_PIECE_ELEMENTS by default) straight from
    its (memory-mapped) storage; each piece is reported done once the writer asks for the next."""
    def pieces() -> Iterator[memoryview]:
        flat = tensor.reshape(-1)
        step = piece_elements or STREAM_PIECE_ELEMENTS
        for start in range(0, flat.numel(), step):
            end = min(start + step, flat.numel())
            report.reading(start, end)
            yield tensor_bytes(flat[start:end])
            report.done(start, end)
    return StreamedTensor(tensor.dtype, tuple(tensor.shape), pieces)


class StoredWeight(Protocol):
    """A weight matrix (out, in) as its file stores it, ready to multiply."""

    shape: tuple[int, int]

    def matmul(self, x: torch.Tensor, products: torch.dtype | None = None) -> torch.Tensor:
        """x (..., in) @ W.T -> (..., out), a new tensor in x's dtype; `products` (None: x's dtype)
        the dtype x is rounded to for the products (bf16: a bf16 prefill; int8: int8 activations,
        which only 4-bit records take; see `products_in`)."""

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows `ids` of W in `dtype`, shaped (*ids.shape, in): the embedding lookup."""

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The whole matrix in `dtype`."""

    @property
    def row_multiple(self) -> int:
        """Rows a `row_slice` must start at a multiple of."""

    def row_slice(self, start: int, end: int) -> "StoredWeight":
        """Rows [start, end) as a weight of the same type, views of this one's tensors; `start`
        a multiple of `row_multiple`. Its products are bit for bit those rows of this one's."""


def slice_granularity(rows: int, cols: int, elements: int = 1, multiple: int = ROW_MULTIPLE) -> int:
    """The smallest multiple of `multiple` rows (a multiple of ROW_MULTIPLE) of `cols` elements
    that also holds a whole number of `elements`-element groups (a 4-bit weight's blocks); `rows`
    when that is more."""
    assert multiple % ROW_MULTIPLE == 0, multiple
    per_group = elements // math.gcd(cols, elements) if cols else 1
    return min(max(rows, 1), math.lcm(multiple, per_group))


def weight_tensors(weight: StoredWeight) -> list[torch.Tensor]:
    """Every tensor a weight record holds (its fields, and the values of dict fields)."""
    found = []
    for field in dataclasses.fields(weight):
        value = getattr(weight, field.name)
        values = value.values() if isinstance(value, dict) else (value,)
        found += [v for v in values if isinstance(v, torch.Tensor)]
    return found


def map_tensors(weight: StoredWeight, function: Callable[[torch.Tensor], torch.Tensor]) -> StoredWeight:
    """The same record with each of its tensors replaced by `function(tensor)` (e.g. the same bytes
    somewhere else); cached derived values are not carried over."""
    changes = {}
    for field in dataclasses.fields(weight):
        value = getattr(weight, field.name)
        if isinstance(value, torch.Tensor):
            changes[field.name] = function(value)
        elif isinstance(value, dict):
            changes[field.name] = {k: function(v) if isinstance(v, torch.Tensor) else v for k, v in value.items()}
    return dataclasses.replace(weight, **changes)


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
    def encode_stream(cls, weight: torch.Tensor, settings: "QuantSettings | None", *, name: str = "weight",
                      report: ReadReport = NO_REPORT) -> dict[str, StreamedTensor]:
        """`encode` for the writer: the same tensors, bytes and order, computed a piece at a time as
        the writer takes them (never a whole stored tensor in memory), `report`ing what it reads.
        A tensor after the first may only be taken once the first has been."""
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
